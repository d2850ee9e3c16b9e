"""SmoothQuant (reference_impl/smoothquant.py): the factors against an independent computation,
the limits alpha = 0 and 1, folding that leaves the float model unchanged (on real SmolLM2
layers, with and without the down_proj extension), and the W8A8 module's int8 arithmetic
against fake quantization, per token and with a static per-tensor scale."""

import copy
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: int8_linear's kernel path runs on CPU

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantcourse.corpus import token_windows
from quantcourse.reference_impl import smoothquant as sq
from quantcourse.reference_impl.llm_int8 import W8A8Linear, int8_matmul, int8_vectorwise_quant
from quantcourse.surgery import collect_inputs, linear_layers


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32, FFN 64, GQA 4/2 heads) with random norm weights and three
    outlier channels in the embeddings, so the smoothing groups see real outliers."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
        model.model.embed_tokens.weight[:, [3, 17, 30]] *= 40
    return model


def windows(n: int = 3, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# Statistics and factors


def test_activation_absmax_is_the_channel_max_of_every_input():
    model = tiny_llama()
    ids = windows()
    absmax = sq.activation_absmax(model, ids)
    inputs = collect_inputs(model, ids)  # every token of every layer's input, kept
    assert list(absmax) == list(linear_layers(model))
    for name, x in inputs.items():
        assert torch.equal(absmax[name], x.abs().amax(dim=0)), name
    assert absmax["model.layers.0.self_attn.k_proj"] is absmax["model.layers.0.self_attn.q_proj"]
    assert absmax["model.layers.1.mlp.up_proj"] is absmax["model.layers.1.mlp.gate_proj"]


def test_factors_match_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    act = torch.rand(48, generator=g) * 10
    act[[2, 9]] = torch.tensor([300.0, 0.0])  # an outlier channel, a dead one
    linears = [nn.Linear(48, n, bias=False) for n in (40, 16, 16)]
    with torch.no_grad():
        linears[2].weight[:, 5] = 0  # a dead column in one layer only
        for fc in linears:
            fc.weight[:, 11] = 0  # a column dead in every layer: max|W_j| clamps to 1e-5
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        s = sq.smoothing_factors(act, sq.weight_absmax(linears), alpha)
        W = np.concatenate([fc.weight.detach().double().numpy() for fc in linears])  # [96, 48]
        expected = [
            max(float(act[j]) ** alpha / max(np.abs(W[:, j]).max(), 1e-5) ** (1 - alpha), 1e-5) for j in range(48)
        ]
        np.testing.assert_allclose(s.double().numpy(), expected, rtol=2e-6)
        assert s.dtype == torch.float32


def test_weight_max_is_taken_over_every_linear_that_shares_the_norm():
    model = tiny_llama()
    with torch.no_grad():  # the largest |W[:, j]| of the group in k_proj for j = 4, in v_proj for j = 7
        model.model.layers[0].self_attn.k_proj.weight[2, 4] = 9.0
        model.model.layers[0].self_attn.v_proj.weight[0, 7] = -7.0
    absmax = sq.activation_absmax(model, windows())
    qkv = [linear_layers(model)[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"]
    w_max = sq.weight_absmax(qkv)
    assert w_max[4] == 9.0 and w_max[7] == 7.0
    assert w_max[4] > sq.weight_absmax(qkv[:1])[4]  # q_proj alone would not see it
    factors = sq.smooth_model(copy.deepcopy(model), absmax, alpha=0.5)
    expected = sq.smoothing_factors(absmax["model.layers.0.self_attn.q_proj"], w_max, 0.5)
    for p in "qkv":
        assert torch.equal(factors[f"model.layers.0.self_attn.{p}_proj"], expected)
    assert "model.layers.0.self_attn.o_proj" not in factors and "model.layers.0.mlp.down_proj" not in factors


def test_factors_clamp_at_1e_minus_5():
    act = torch.tensor([0.0, 1e-12, 4.0])
    w_max = torch.tensor([2.0, 2.0, 1e-5])
    s = sq.smoothing_factors(act, w_max, 0.5)
    assert s[0] == s[1] == torch.tensor(1e-5)  # a dead channel would otherwise get s = 0 and 1/s = inf
    assert s[2] == pytest.approx(4**0.5 / 1e-5**0.5)
    dead = nn.Linear(3, 2, bias=False)
    nn.init.zeros_(dead.weight)
    assert torch.equal(sq.weight_absmax([dead]), torch.full((3,), 1e-5))


def test_alpha_one_flattens_the_activations_and_alpha_zero_the_weights():
    model = tiny_llama()
    absmax = sq.activation_absmax(model, windows())
    for alpha in (1.0, 0.0):
        smoothed = copy.deepcopy(model)
        factors = sq.smooth_model(smoothed, absmax, alpha, smooth_down=True)
        after = sq.smoothed_absmax(absmax, factors)
        layers = linear_layers(smoothed)
        groups = sq.smoothing_groups(smoothed, smooth_down=True)
        refolded = {g.previous for g in groups}  # up_proj: its rows are divided again by down's factors
        for group in groups:
            if alpha == 1:  # s = max|X_j|: every channel's max becomes 1
                torch.testing.assert_close(after[group.linears[0]], torch.ones_like(after[group.linears[0]]))
            elif not refolded & set(group.linears):  # s = 1 / max|W_j|: every column's max over the group becomes 1
                w_max = torch.stack([layers[n].weight.abs().amax(dim=0) for n in group.linears]).amax(dim=0)
                torch.testing.assert_close(w_max, torch.ones_like(w_max))
        measured = {n: x.abs().amax(dim=0) for n, x in collect_inputs(smoothed, windows()).items()}
        for name in factors:  # and the smoothed model's real inputs have exactly those maxima
            torch.testing.assert_close(measured[name], after[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("previous", [nn.LayerNorm(8), nn.Linear(6, 8)], ids=["layernorm", "linear"])
def test_folding_into_an_op_with_a_bias_keeps_the_output(previous):
    """The paper's OPT case (LayerNorm with a bias) and a Linear with a bias (up_proj in general)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in previous.parameters():
            p.uniform_(-2, 2)
    readers = [nn.Linear(8, 5), nn.Linear(8, 3)]
    x = torch.randn(10, previous.weight.shape[-1])
    before = [fc(previous(x)) for fc in readers]
    s = torch.rand(8) * 10 + 0.1
    sq.fold_factors(previous, readers, s)
    for fc, expected in zip(readers, before):
        torch.testing.assert_close(fc(previous(x)), expected, rtol=1e-5, atol=1e-5)


def test_smoothing_keeps_the_tiny_model_output_and_the_alpha_sweep_leaves_it_alone():
    model = tiny_llama()
    ids = windows()
    absmax = sq.activation_absmax(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model, ids)
    for smooth_down in (False, True):
        smoothed = copy.deepcopy(model)
        sq.smooth_model(smoothed, absmax, 0.85, smooth_down)
        torch.testing.assert_close(logits(smoothed, ids), reference, rtol=1e-5, atol=1e-5)
    scores = sq.alpha_sweep(model, absmax, [0.2, 0.9], lambda m: (logits(m, ids) - reference).norm().item())
    assert [a for a, _ in scores] == [0.2, 0.9] and all(0 < e < reference.norm() for _, e in scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.Linear) for m in linear_layers(model).values())


# ---------------------------------------------------------------------------------------------
# On real SmolLM2 layers


@pytest.fixture(scope="module")
def three_layers(reference, tokenizer):
    """SmolLM2 cut to its first 3 decoder layers (layer 2's down_proj inputs reach |x| ~ 70),
    its statistics on 2 calibration windows of 256 tokens, and a held-out window."""
    model = copy.deepcopy(reference[0])
    model.model.layers = model.model.layers[:3]
    absmax = sq.activation_absmax(model, token_windows(tokenizer, "calibration", 256, 2))
    return model, absmax, token_windows(tokenizer, "heldout", 128, 1)


def test_smoothing_keeps_smollm2_output(three_layers):
    model, absmax, ids = three_layers
    reference = logits(model, ids)
    assert absmax["model.layers.2.mlp.down_proj"].max() > 30  # real outliers to move
    for smooth_down in (False, True):
        smoothed = copy.deepcopy(model)
        factors = sq.smooth_model(smoothed, absmax, sq.ALPHA_LLAMA, smooth_down)
        assert len(factors) == 3 * (6 if smooth_down else 5)
        out = logits(smoothed, ids)
        assert (out - reference).abs().max() < 1e-4 * reference.abs().max()
        assert (out.argmax(-1) == reference.argmax(-1)).all()


def test_down_proj_extension_divides_its_input_exactly(three_layers):
    """SiLU(gate(x)) * up(x) is linear in up(x): rows of up_proj divided by s divide down_proj's
    input by s, and down_proj's output does not change."""
    model, absmax, ids = three_layers
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    smoothed = copy.deepcopy(model)
    factors = sq.smooth_model(smoothed, absmax, 0.85, smooth_down=True)
    before, after = collect_inputs(model, ids, down), collect_inputs(smoothed, ids, down)
    for name in down:
        torch.testing.assert_close(after[name], before[name] / factors[name], rtol=1e-4, atol=1e-5)
    layer2 = "model.layers.2.mlp.down_proj"
    assert after[layer2].abs().max() < before[layer2].abs().max() / 5  # |x| 64 -> 5 on this window
    assert sq.smoothed_absmax(absmax, factors)["model.layers.2.mlp.down_proj"].max() < 10


def test_w8a8_on_smollm2_smoothing_beats_naive(three_layers):
    """Relative error of the 3-layer model's logits: smoothing at alpha 0.85 beats naive W8A8 at
    either granularity, and naive static per tensor is the worst of all."""
    model, absmax, ids = three_layers
    reference = logits(model, ids)

    def error(options):
        candidate = copy.deepcopy(model)
        sq.apply_smoothquant(candidate, absmax, options)
        return ((logits(candidate, ids) - reference).norm() / reference.norm()).item()

    naive_token = error(sq.SmoothQuantOptions(alpha=None))
    smooth_token = error(sq.SmoothQuantOptions(alpha=0.85))
    naive_static = error(sq.SmoothQuantOptions(alpha=None, act_granularity="tensor"))
    smooth_static = error(sq.SmoothQuantOptions(alpha=0.85, act_granularity="tensor", smooth_down=True))
    assert smooth_token < naive_token < naive_static
    assert smooth_static < naive_static / 1.5


# ---------------------------------------------------------------------------------------------
# The W8A8 module: real int8 arithmetic equals fake quantization


def outlier_activations(M: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, [1, K // 2]] *= 60
    return x


@pytest.mark.parametrize("K", [64, 1536])  # 1536: down_proj's width, past the float32 path's exact range
def test_int8_product_is_exact_integer_accumulation(K):
    X_codes, _, _ = int8_vectorwise_quant(outlier_activations(37, K))
    W_codes = torch.randint(-127, 128, (29, K), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    W_codes[0] = 127
    X_codes[0] = 127  # the largest sum: K * 127^2
    C = int8_matmul(X_codes, W_codes)
    assert C.dtype == torch.int32
    assert torch.equal(C.long(), X_codes.long() @ W_codes.long().t())


@pytest.mark.parametrize(
    "act_granularity, input_absmax",
    [("token", None), ("tensor", None), ("tensor", 200.0), ("tensor", 50.0)],  # 50: most outliers saturate
)
def test_module_equals_fake_quantization(act_granularity, input_absmax):
    torch.manual_seed(0)
    linear = nn.Linear(1536, 48)
    x = outlier_activations(2 * 19, 1536).reshape(2, 19, 1536)
    module = sq.SmoothQuantLinear.from_linear(linear, act_granularity, input_absmax)
    out = module(x)
    expected = sq.fake_quant_w8a8(x.reshape(-1, 1536), linear.weight.detach(), act_granularity, input_absmax)
    expected += linear.bias.detach().double()
    assert out.shape == (2, 19, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.reshape(-1, 48).double(), expected, rtol=1e-6, atol=1e-6)
    if act_granularity == "token":  # the same numbers as lesson 02's W8A8Linear
        assert torch.equal(out, W8A8Linear.from_linear(linear, "token")(x))


def test_static_scale_is_the_calibrated_max_and_saturates():
    x = torch.tensor([[0.5, -2.0, 1.0], [3.0, -0.25, 0.0]])
    codes, absmax = sq.int8_static_quant(x, torch.tensor(2.0))
    assert torch.equal(absmax, torch.full((2,), 2.0))
    assert torch.equal(codes, torch.tensor([[32, -127, 64], [127, -16, 0]], dtype=torch.int8))  # 3.0 saturates


def test_quantize_w8a8_gives_each_layer_its_static_scale():
    model = tiny_llama()
    absmax = sq.activation_absmax(model, windows())
    factors = sq.smooth_model(model, absmax, 0.7, smooth_down=True)
    smoothed = sq.smoothed_absmax(absmax, factors)
    replaced = sq.quantize_w8a8(model, "tensor", smoothed)
    assert len(replaced) == 14
    for name, module in replaced.items():
        assert module.static and module.input_absmax.item() == smoothed[name].max().item()
        assert module.storage_bits() == module.weight_codes.numel() * 8 + module.out_features * 32 + 32


def test_kernel_path_equals_the_torch_path():
    """int8_linear(use_triton=True) runs kernels/w8a8.py (under the interpreter on CPU)."""
    x = outlier_activations(5, 40)
    W_codes, W_absmax, _ = int8_vectorwise_quant(torch.randn(24, 40))
    bias = torch.randn(24)
    for X_codes, X_absmax in (int8_vectorwise_quant(x)[:2], sq.int8_static_quant(x, torch.tensor(30.0))):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        args = [t.to(device) for t in (X_codes, X_absmax, W_codes, W_absmax, bias)]
        kernel = sq.int8_linear(*args, torch.float32, use_triton=True).cpu()
        torch_path = sq.int8_linear(X_codes, X_absmax, W_codes, W_absmax, bias, torch.float32, use_triton=False)
        torch.testing.assert_close(kernel, torch_path, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "0.5", float("nan")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be a number from 0 to 1"):
        sq.smoothing_factors(torch.ones(3), torch.ones(3), alpha)


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="same input channels"):
        sq.smoothing_factors(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="finite and >= 0"):
        sq.smoothing_factors(torch.tensor([1.0, -1.0]), torch.ones(2), 0.5)
    with pytest.raises(ValueError, match="must read the same input"):
        sq.weight_absmax([nn.Linear(4, 2), nn.Linear(5, 2)])
    with pytest.raises(TypeError, match="non-empty list of nn.Linear"):
        sq.weight_absmax([])
    with pytest.raises(TypeError, match="cannot fold factors into ReLU"):
        sq.fold_factors(nn.ReLU(), [nn.Linear(4, 2)], torch.ones(4))
    with pytest.raises(ValueError, match="has 3 outputs, but s has 4"):
        sq.fold_factors(nn.Linear(2, 3), [nn.Linear(4, 2)], torch.ones(4))
    with pytest.raises(TypeError, match="windows must be an int64 tensor"):
        sq.activation_absmax(tiny_llama(), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="pass act_granularity='tensor'"):
        sq.SmoothQuantLinear(nn.Linear(4, 2), "token", input_absmax=3.0)
    with pytest.raises(ValueError, match="positive calibration maximum"):
        sq.SmoothQuantLinear(nn.Linear(4, 2), "tensor", input_absmax=0.0)
    with pytest.raises(ValueError, match="static per-tensor activations need the calibration maxima"):
        sq.quantize_w8a8(tiny_llama(), "tensor")
    with pytest.raises(ValueError, match="give an alpha, or drop smooth_down"):
        sq.SmoothQuantOptions(alpha=None, smooth_down=True)
    with pytest.raises(KeyError, match="compute them with activation_absmax"):
        sq.smooth_model(tiny_llama(), {}, 0.5)
