"""QLoRA (reference_impl/qlora.py): the 4-bit base with adapters against its formula, what trains
and what stays frozen, one training step, PEFT's file format and forward, the memory accounting
measured against the analytic plan, and the errors a learner meets.

Most tests use SmolLM2 cut to its first two decoder blocks: real weights, a fraction of the time.
"""

import copy
import json
import math
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantcourse.reference_impl import qlora
from quantcourse.reference_impl.nf4 import bits_per_weight, dequantize_4bit, matmul_4bit, quantize_4bit, storage_bits
from quantcourse.reference_impl.qlora import FrozenLinear4bit, LoraLinear


@pytest.fixture(scope="module")
def small(reference):
    """SmolLM2's embedding, first two decoder blocks and head: fp32, frozen. Copy before changing."""
    return qlora.first_layers(copy.deepcopy(reference[0]), 2)


@pytest.fixture(scope="module")
def qsmall(small):
    """`small` with QLoRA adapters (r=8, alpha=16, dropout=0.05) on all seven linears. Copy it."""
    torch.manual_seed(0)
    return wrapped(small, r=8, alpha=16, dropout=0.05)


@pytest.fixture(scope="module")
def windows(tokenizer):
    train, heldout = qlora.domain_windows(tokenizer, 64)
    return train, heldout


def wrapped(small, **settings) -> nn.Module:
    model = copy.deepcopy(small)
    qlora.add_lora(model, **settings)
    return model


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """B = 0 makes the adapters invisible; give both matrices random values to test the math."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in qlora.lora_modules(model).values():
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=g) * 0.05)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.05)


def random_linear(out_features=96, in_features=160, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: PEFT must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- the layer


def test_forward_is_quantized_base_plus_scaled_low_rank_update():
    linear = random_linear()
    layer = LoraLinear.from_linear(linear, r=4, alpha=12, dropout=0.1).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, 160)
    packed, state = quantize_4bit(linear.weight.detach())  # double quantization, as QLoRA
    w_hat = dequantize_4bit(packed, state)
    expected = x @ w_hat.T + linear.bias + (x @ layer.lora_A.T @ layer.lora_B.T) * (12 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.scaling == 3.0 and layer.r == 4


def test_dropout_applies_to_the_adapter_input_only():
    layer = LoraLinear.from_linear(random_linear(), r=4, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 160)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5, training=True)
    base = matmul_4bit(x, layer.base_layer.weight_packed, layer.base_layer.quant_state, layer.base_layer.bias)
    torch.testing.assert_close(y, base + (dropped @ layer.lora_A.T @ layer.lora_B.T) * 2, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_outputs_exactly_the_quantized_base():
    linear = random_linear()
    layer = LoraLinear.from_linear(linear)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(4, 160)
    base = layer.base_layer
    assert torch.equal(layer(x), matmul_4bit(x, base.weight_packed, base.quant_state, base.bias))


def test_adapters_are_initialised_as_peft_does():
    linear = random_linear(seed=9)
    torch.manual_seed(3)
    layer = LoraLinear(linear, r=8)
    torch.manual_seed(3)
    expected = torch.empty(8, 160)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))  # peft's reset_lora_parameters
    assert torch.equal(layer.lora_A.detach(), expected)
    assert torch.equal(layer.lora_B.detach(), torch.zeros(96, 8))
    assert layer.lora_A.dtype == torch.float32


def test_base_weight_is_stored_packed_with_double_quantization():
    linear = random_linear(out_features=576, in_features=576, bias=False)
    base = FrozenLinear4bit.from_linear(linear)
    float_buffers = [b for b in base.buffers() if b.is_floating_point() and b.numel() >= 64]
    assert float_buffers == [], "a dequantized copy of the weight is kept"
    assert base.nested and base.weight_packed.dtype == torch.uint8 and base.weight_packed.numel() == 576 * 576 // 2
    packed, state = quantize_4bit(linear.weight.detach())
    assert torch.equal(base.weight_packed, packed) and torch.equal(base.absmax, state.absmax)
    assert torch.equal(base.dequantized_weight(), dequantize_4bit(packed, state))
    assert base.storage_bits() == storage_bits(packed, state)
    assert base.storage_bits() / base.weight_count() == pytest.approx(bits_per_weight(64, True), rel=1e-3)
    assert not any(p.requires_grad for p in base.parameters())


def test_backward_dequantizes_again_and_keeps_no_float_weight():
    base = FrozenLinear4bit.from_linear(random_linear(bias=False))
    x = torch.randn(6, 160, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = base(x)
    assert [t.dtype for t in saved] == [torch.uint8], "only the packed codes may be saved for backward"
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ base.dequantized_weight(), rtol=1e-5, atol=1e-5)


def test_compute_dtype_casts_in_and_out():
    base = FrozenLinear4bit.from_linear(random_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 160)
    y = base(x)
    assert y.dtype == torch.float32
    expected = F.linear(x.bfloat16(), base.dequantized_weight(torch.bfloat16), base.bias.bfloat16()).float()
    assert torch.equal(y, expected)


# ---------------------------------------------------------------- the model


def test_add_lora_wraps_targets_quantizes_every_linear_and_freezes_the_rest(small):
    model = copy.deepcopy(small)
    wrapped_layers = qlora.add_lora(model, target_modules=["q_proj", "v_proj"], r=4)
    assert sorted(wrapped_layers) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert isinstance(model.model.layers[0].self_attn.k_proj, FrozenLinear4bit)  # loaded in 4 bits, no adapter
    assert isinstance(model.model.layers[1].mlp.down_proj, FrozenLinear4bit)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_fresh_qlora_model_equals_its_dequantized_base_and_the_copy_is_exact(qsmall, windows):
    model = copy.deepcopy(qsmall)
    ids = windows[1][:2]
    plain = qlora.dequantized_model(model, adapters=False)
    assert not any(isinstance(m, (FrozenLinear4bit, LoraLinear)) for m in plain.modules())
    with torch.no_grad():
        fresh = model(ids).logits
        assert torch.equal(fresh, plain(ids).logits)
        randomize_adapters(model)
        adapted = model(ids).logits
        assert not torch.equal(adapted, fresh)
        assert torch.equal(adapted, qlora.dequantized_model(model)(ids).logits)


def test_batched_perplexity_matches_the_harness(qsmall, windows):
    from quantcourse.evaluate import perplexity

    model = qlora.dequantized_model(qsmall)
    heldout = windows[1][:3]
    assert qlora.perplexity(model, heldout, batch_size=2) == pytest.approx(perplexity(model, heldout, progress=False), rel=1e-5)


# ---------------------------------------------------------------- training


def test_only_adapters_get_gradients_and_the_base_stays_byte_identical(qsmall, windows):
    model = copy.deepcopy(qsmall)
    qlora.causal_lm_loss(model, windows[0][:2]).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))} and len(with_grad) == 28
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    model.zero_grad(set_to_none=True)
    frozen = {n: t.detach().clone() for n, t in [*model.named_buffers(), *model.named_parameters()] if "lora_" not in n}
    qlora.train_adapters(model, windows[0][:4], steps=1, batch_size=2, grad_accum=2)
    for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
        if "lora_" not in name:
            assert tensor.dtype == frozen[name].dtype and torch.equal(tensor, frozen[name]), f"{name} changed"
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in qlora.lora_modules(model).values())


def test_one_step_lowers_the_loss_on_a_fixed_batch(qsmall, windows):
    model = copy.deepcopy(qsmall)
    batch = windows[0][:4]
    with torch.no_grad():
        before = qlora.causal_lm_loss(model, batch).item()
    losses = qlora.train_adapters(model, batch, steps=1, batch_size=4, lr=1e-3)
    with torch.no_grad():
        after = qlora.causal_lm_loss(model, batch).item()
    assert losses[0] == pytest.approx(before, rel=0.05)  # the same batch, with dropout on the adapter inputs
    assert after < before - 1e-3


def test_training_is_deterministic_for_a_seed(qsmall, windows):
    runs = []
    for _ in range(2):
        model = copy.deepcopy(qsmall)
        losses = qlora.train_adapters(model, windows[0][:6], steps=2, batch_size=2, seed=7)
        runs.append((losses, qlora.adapter_state_dict(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_domain_is_disjoint_from_the_general_heldout_split(tokenizer):
    from quantcourse.corpus import split_topics

    assert not set(qlora.DOMAIN_TOPICS) & set(split_topics()["heldout"])
    train, heldout = qlora.domain_windows(tokenizer, 128)
    tokens = qlora.domain_tokens(tokenizer)
    assert heldout.shape[0] >= 1 and train.shape[0] > 3 * heldout.shape[0]
    assert torch.equal(train.reshape(-1), tokens[: train.numel()])
    cut = int(tokens.numel() * 0.8)
    assert torch.equal(heldout.reshape(-1), tokens[cut : cut + heldout.numel()])


# ---------------------------------------------------------------- PEFT


def test_peft_loads_saved_adapters_and_gives_identical_outputs(qsmall, windows, tmp_path, no_network):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(qsmall)
    randomize_adapters(model)
    directory = qlora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="SmolLM2-135M")
    from safetensors.torch import load_file

    keys = set(load_file(directory / qlora.ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 2 * 7
    config = json.loads((directory / qlora.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)

    ids = windows[1][:2]
    peft_model = peft.PeftModel.from_pretrained(qlora.dequantized_model(model, adapters=False), directory).eval()
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(qlora.LLAMA_LINEARS)
    with torch.inference_mode():
        assert torch.equal(peft_model(ids).logits, model(ids).logits)

    reloaded = copy.deepcopy(qsmall)  # our own loader, the round trip
    qlora.load_adapter(reloaded, directory)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_our_forward_equals_peft_lora_on_the_same_weights(qsmall, windows, no_network):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(qsmall)
    randomize_adapters(model, seed=1)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=list(qlora.LLAMA_LINEARS), task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(qlora.dequantized_model(model, adapters=False), config).eval()
    ours = qlora.adapter_state_dict(model)
    theirs = peft.get_peft_model_state_dict(peft_model)
    assert set(ours) == set(theirs), "adapter key names differ from PEFT's"
    peft.set_peft_model_state_dict(peft_model, ours)
    ids = windows[1][:2]
    with torch.inference_mode():
        assert torch.equal(peft_model(ids).logits, model(ids).logits)


# ---------------------------------------------------------------- memory


def test_parameter_counts_of_the_published_shapes(reference):
    shapes = qlora.MODEL_SHAPES
    assert shapes["SmolLM2-135M"] == qlora.LlamaShape.from_config(reference[0].config)
    assert shapes["SmolLM2-135M"].parameters() == sum(p.numel() for p in reference[0].parameters()) == 134_515_008
    assert shapes["Llama-2-7B"].parameters() == 6_738_415_616
    assert shapes["Llama-2-70B"].parameters() == 68_976_648_192
    assert shapes["Llama-3-8B"].parameters() == 8_030_261_248


def measured(model: nn.Module, ids: torch.Tensor) -> qlora.MemoryAccount:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return qlora.measure_training_step(model, ids, optimizer)


def assert_matches_plan(account: qlora.MemoryAccount, plan: qlora.MemoryAccount) -> None:
    assert account.trainable_weights == plan.trainable_weights
    assert account.gradients == plan.gradients
    assert account.optimizer_states == plan.optimizer_states
    assert account.frozen_weights == pytest.approx(plan.frozen_weights, rel=1e-3, abs=1024)  # + rotary buffers
    assert 0 < account.activations < account.peak
    assert account.peak >= account.total - account.activations  # weights, grads and states are all live after the step


def test_memory_measured_on_a_step_matches_the_plan(small, qsmall, windows):
    ids = windows[0][:2]
    shape = qlora.LlamaShape.from_config(small.config)
    q = measured(copy.deepcopy(qsmall), ids)
    assert_matches_plan(q, qlora.memory_plan(shape, "qlora", r=8, weight_bytes=4))
    lora = copy.deepcopy(small).to(torch.bfloat16)
    qlora.add_lora(lora, r=8, quantize=False)
    assert_matches_plan(measured(lora, ids), qlora.memory_plan(shape, "lora", r=8, weight_bytes=2))
    full = copy.deepcopy(small).requires_grad_(True)
    f = measured(full, ids)
    assert_matches_plan(f, qlora.memory_plan(shape, "full", weight_bytes=4))
    assert q.peak < f.peak and q.gradients < f.gradients / 10


@pytest.mark.slow
def test_memory_plan_matches_a_step_of_the_full_smollm2(reference, tokenizer):
    model = copy.deepcopy(reference[0])
    qlora.add_lora(model, r=16)
    ids = qlora.domain_windows(tokenizer, 16)[0][:1]
    assert_matches_plan(measured(model, ids), qlora.memory_plan(qlora.MODEL_SHAPES["SmolLM2-135M"], "qlora", r=16, weight_bytes=4))


def test_memory_plan_for_large_models():
    shape = qlora.MODEL_SHAPES["Llama-2-70B"]
    q = qlora.memory_plan(shape, "qlora", r=16)
    assert q.frozen_weights == pytest.approx(shape.linear_weights() * 4.127 / 8 + shape.other_weights() * 2, rel=1e-4)
    assert q.gradients == q.trainable_weights == 4 * 80 * 16 * (2 * 8192 + 2 * (1024 + 8192) + 2 * 8192 + 3 * (28672 + 8192))
    assert q.total < 40e9  # a 48 GB GPU holds it, with room for activations
    mixed = qlora.memory_plan(shape, "full", weight_bytes=2, state_bytes=4, master_weights=True)
    assert mixed.total == pytest.approx(16 * shape.parameters(), rel=1e-6)  # 2 + 2 + 4 + 4 + 4 bytes per weight
    assert qlora.memory_plan(shape, "full", weight_bytes=4).total == pytest.approx(16 * shape.parameters(), rel=1e-6)
    with pytest.raises(ValueError, match="method"):
        qlora.memory_plan(shape, "adapters")
    with pytest.raises(ValueError, match="target_modules"):
        qlora.memory_plan(shape, target_modules=["query"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("r", [0, -1, 2.5, True, None])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoraLinear.from_linear(random_linear(), r=r)


@pytest.mark.parametrize(("alpha", "dropout"), [(0, 0.0), (16, 1.0), (16, -0.1)])
def test_alpha_and_dropout_are_checked(alpha, dropout):
    with pytest.raises(ValueError, match="alpha|dropout"):
        LoraLinear.from_linear(random_linear(), alpha=alpha, dropout=dropout)


def test_unknown_target_names_the_linear_layers(small):
    with pytest.raises(ValueError, match=r"no module of this model is named 'qproj'.*'q_proj'"):
        qlora.add_lora(copy.deepcopy(small), target_modules=["qproj"])
    with pytest.raises(ValueError, match="non-empty list"):
        qlora.add_lora(copy.deepcopy(small), target_modules="q_proj")


@pytest.mark.parametrize("target", ["mlp", "input_layernorm", "lm_head"])
def test_target_that_is_not_a_decoder_linear_is_refused(small, target):
    with pytest.raises(TypeError, match="not a decoder nn.Linear"):
        qlora.add_lora(copy.deepcopy(small), target_modules=[target])


def test_non_linear_layers_and_double_wrapping_are_refused(small):
    with pytest.raises(TypeError, match="nn.Linear"):
        LoraLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="nn.Linear"):
        FrozenLinear4bit.from_linear(nn.Embedding(10, 4))
    model = wrapped(small, target_modules=["q_proj"], quantize=False)
    with pytest.raises(TypeError, match="already has adapters"):
        qlora.add_lora(model, target_modules=["q_proj"])


def test_training_without_adapters_and_casting_the_statistics_are_refused(small, windows):
    with pytest.raises(ValueError, match="add_lora"):
        qlora.train_adapters(copy.deepcopy(small), windows[0][:2], steps=1, batch_size=2)
    layer = LoraLinear.from_linear(random_linear()).to(torch.bfloat16)
    with pytest.raises(TypeError, match="compute_dtype"):
        layer(torch.randn(2, 160, dtype=torch.bfloat16))


def test_adapter_config_names_the_layers_peft_will_find(small):
    model = wrapped(small, target_modules=["q_proj", "v_proj"], r=4, quantize=False)
    assert qlora.adapter_config(model)["target_modules"] == ["q_proj", "v_proj"]
    first = model.model.layers[0].self_attn
    first.q_proj = first.q_proj.base_layer  # no adapter there: "q_proj" would make PEFT add one
    assert qlora.adapter_config(model)["target_modules"] == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_loading_adapters_of_another_shape_is_refused(small, tmp_path):
    directory = qlora.save_adapter(wrapped(small, target_modules=["q_proj"], r=4, quantize=False), tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        qlora.load_adapter(wrapped(small, target_modules=["v_proj"], r=4, quantize=False), directory)
    with pytest.raises(ValueError, match="another rank"):
        qlora.load_adapter(wrapped(small, target_modules=["q_proj"], r=8, quantize=False), directory)
