"""reference_impl/qlora_analysis.py: memory plans of the three setups and the cards that hold
them, the first AdamW step of a fresh adapter against Adam's closed form, and the recorded
backward pass on SmolLM2 (first two blocks) against the adapter's gradient formula."""

import copy
import math

import pytest
import torch
from torch import nn

from quantcourse.reference_impl import qlora
from quantcourse.reference_impl import qlora_analysis as analysis
from quantcourse.reference_impl.nf4 import bits_per_weight

GiB = 2**30


@pytest.fixture(scope="module")
def qsmall(reference):
    """SmolLM2's first two blocks with fresh QLoRA adapters (r=8, alpha=16) on all seven linears."""
    model = qlora.first_layers(copy.deepcopy(reference[0]), 2)
    torch.manual_seed(0)
    qlora.add_lora(model, r=8, alpha=16, dropout=0.05)
    return model


def random_linear(out_features=48, in_features=80, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=False)


def layer_data(linear: nn.Linear, tokens=12, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, linear.in_features, generator=g), torch.randn(tokens, linear.out_features, generator=g)


# ---------------------------------------------------------------- plans and cards


def test_llama_2_13b_has_its_published_parameter_count_and_shapes_are_sorted_by_size():
    assert analysis.SHAPES["Llama-2-13B"].parameters() == 13_015_864_320
    sizes = [shape.parameters() for shape in analysis.SHAPES.values()]
    assert sizes == sorted(sizes)
    for name, shape in qlora.MODEL_SHAPES.items():
        assert analysis.SHAPES[name] == shape


def test_plans_count_the_bytes_of_each_setup():
    shape, r = analysis.SHAPES["Llama-2-7B"], 64
    plans = analysis.plan_setups(shape, r=r)
    n, tensors = shape.parameters(), shape.parameter_tensors()
    full = plans["full fine-tuning"]
    assert full.trainable_weights == full.gradients == 2 * n
    assert full.optimizer_states == (4 + 4 + 4) * n + 4 * tensors  # m, v and the master weights; a step counter per tensor
    assert math.isclose(full.total / n, 16, rel_tol=1e-6)

    adapter_params = shape.layers * sum(r * (o + i) for o, i in shape.linear_shapes().values())
    for name in ("LoRA", "QLoRA"):
        plan = plans[name]
        assert plan.trainable_weights == plan.gradients == 4 * adapter_params, name
        assert plan.optimizer_states == 8 * adapter_params + 4 * 2 * 7 * shape.layers, name
    assert plans["LoRA"].frozen_weights == 2 * n
    expected = shape.linear_weights() * bits_per_weight(64, True) / 8 + shape.other_weights() * 2
    assert plans["QLoRA"].frozen_weights == round(expected)
    assert all(plan.activations is None for plan in plans.values())


def test_eight_bit_states_and_fewer_targets_shrink_only_their_terms():
    shape = analysis.SHAPES["Llama-2-13B"]
    wide, narrow = analysis.plan_setups(shape, r=16), analysis.plan_setups(shape, r=16, state_bytes=1)
    counters = 4 * 2 * 7 * shape.layers
    assert narrow["QLoRA"].optimizer_states - counters == (wide["QLoRA"].optimizer_states - counters) // 4
    assert narrow["QLoRA"].frozen_weights == wide["QLoRA"].frozen_weights
    n = shape.parameters()
    assert narrow["full fine-tuning"].optimizer_states == (1 + 1 + 4) * n + 4 * shape.parameter_tensors()  # master weights stay fp32
    q_v = analysis.plan_setups(shape, r=16, target_modules=("q_proj", "v_proj"))
    assert q_v["QLoRA"].trainable_weights == 4 * 16 * shape.layers * (2 * 5120 + 2 * 5120)
    with pytest.raises(ValueError, match="width of one Adam state"):
        analysis.plan_setups(shape, state_bytes=3)


def test_cards_for_the_published_claims():
    """QLoRA's headline: a 65-70B model fine-tunes on one 48 GB card; full fine-tuning fits none."""
    big = analysis.plan_setups(analysis.SHAPES["Llama-2-70B"], r=64)
    assert analysis.smallest_card(big["QLoRA"].total) == 48
    assert analysis.smallest_card(big["LoRA"].total) is None
    assert analysis.smallest_card(big["full fine-tuning"].total) is None
    small = analysis.plan_setups(analysis.SHAPES["Llama-2-7B"], r=64)
    assert analysis.smallest_card(small["QLoRA"].total) == 24
    assert analysis.smallest_card(small["full fine-tuning"].total) is None


def test_smallest_card_boundaries():
    assert analysis.smallest_card(0) == 24
    assert analysis.smallest_card(24 * GiB) == 24
    assert analysis.smallest_card(24 * GiB + 1) == 48
    assert analysis.smallest_card(80 * GiB + 1) is None
    assert analysis.smallest_card(100 * GiB, cards_gib=(141, 80)) == 141
    with pytest.raises(ValueError):
        analysis.smallest_card(-1)


# ---------------------------------------------------------------- the first step


def test_first_step_change_matches_adams_closed_form():
    """Step 1 of Adam: m_hat = g, v_hat = g^2, so Delta B = -lr g / (|g| + eps), and A stays put
    (its gradient s B^T G^T x is 0 while B = 0). Delta y = s x A^T Delta B^T."""
    linear = random_linear()
    x, G = layer_data(linear)
    r, s, lr = 4, 0.5, 1e-2
    with torch.random.fork_rng():
        torch.manual_seed(7)
        A = qlora.LoraLinear(copy.deepcopy(linear), r=r, alpha=s * r, dropout=0.0).lora_A.detach()
    H = x @ A.T  # [tokens, r]
    g_B = s * G.T @ H  # [out, r]
    delta_B = -lr * g_B / (g_B.abs() + 1e-8)
    y0 = x @ linear.weight.detach().T
    expected = (s * H @ delta_B.T).norm() / y0.norm()
    got = analysis.first_step_change(linear, x, G, r=r, scaling=s, lr=lr, seed=7)
    assert math.isclose(got, expected.item(), rel_tol=1e-5)


def test_first_step_change_is_proportional_to_the_scaling_and_grows_with_r_without_it():
    linear = random_linear(96, 128)
    x, G = layer_data(linear, tokens=64)
    one = analysis.first_step_change(linear, x, G, r=8, scaling=1.0)
    assert math.isclose(analysis.first_step_change(linear, x, G, r=8, scaling=3.0), 3 * one, rel_tol=1e-4)
    unscaled = [analysis.first_step_change(linear, x, G, r=r, scaling=1.0) for r in (1, 8, 64)]
    assert unscaled[0] < unscaled[1] < unscaled[2]  # a sum over r columns of A ...
    assert 4 < unscaled[2] / unscaled[0] < 128  # ... growing like r^(1/2) (random signs) to r (aligned)


def test_first_step_change_changes_neither_the_layer_nor_the_random_state():
    linear = random_linear()
    x, G = layer_data(linear)
    weight, state = linear.weight.detach().clone(), torch.get_rng_state()
    first = analysis.first_step_change(linear, x, G, r=4, scaling=2.0, seed=3)
    assert torch.equal(linear.weight, weight) and linear.weight.requires_grad
    assert torch.equal(torch.get_rng_state(), state)
    assert analysis.first_step_change(linear, x, G, r=4, scaling=2.0, seed=3) == first
    assert analysis.first_step_change(linear, x, G, r=4, scaling=2.0, seed=4) != first


def test_first_step_change_on_a_4bit_base_and_refused_inputs():
    linear = random_linear(64, 128)
    x, G = layer_data(linear)
    base = qlora.FrozenLinear4bit(linear)
    assert analysis.first_step_change(base, x, G, r=4, scaling=1.0) > 0
    with pytest.raises(ValueError, match="scaling"):
        analysis.first_step_change(linear, x, G, r=4, scaling=0)
    with pytest.raises(ValueError, match=r"\[tokens, in\]"):
        analysis.first_step_change(linear, x[0], G, r=4, scaling=1.0)
    with pytest.raises(ValueError, match="out, in"):
        analysis.first_step_change(linear, x, G[:, :10], r=4, scaling=1.0)
    with pytest.raises(ValueError, match="rank"):
        analysis.first_step_change(linear, x, G, r=0, scaling=1.0)


# ---------------------------------------------------------------- the recorded backward pass


def test_trace_backward_gives_the_adapters_gradient_formula(qsmall, tokenizer):
    """With B = 0: dL/dA = 0 exactly, dL/dB = s (dL/dy)^T (x A^T), and the 4-bit base gets nothing."""
    model = copy.deepcopy(qsmall)
    ids = qlora.domain_windows(tokenizer, 32)[0][:2]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    trace = analysis.trace_backward(model, ids, names)
    assert math.isfinite(trace.loss) and trace.loss > 0
    for name in names:
        layer = dict(model.named_modules())[name]
        x, G = trace.inputs[name], trace.output_grads[name]
        assert x.shape == (ids.numel(), layer.in_features) and G.shape == (ids.numel(), layer.out_features)
        expected = layer.scaling * G.T @ (x @ layer.lora_A.detach().T)
        torch.testing.assert_close(layer.lora_B.grad, expected, rtol=1e-4, atol=1e-7)
    norms = analysis.adapter_gradient_norms(model)
    assert len(norms) == 14
    assert all(a == 0.0 and b > 0 for a, b in norms.values())
    frozen = [m for m in model.modules() if isinstance(m, qlora.FrozenLinear4bit)]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_trace_backward_refuses_unknown_names_and_untrainable_models(qsmall, reference, tokenizer):
    ids = qlora.domain_windows(tokenizer, 16)[0][:1]
    with pytest.raises(ValueError, match="unknown"):
        analysis.trace_backward(copy.deepcopy(qsmall), ids, ["model.layers.0.q_proj"])
    frozen = qlora.first_layers(copy.deepcopy(reference[0]), 1).requires_grad_(False)
    with pytest.raises(ValueError, match="add_lora"):
        analysis.trace_backward(frozen, ids, ["model.layers.0.self_attn.q_proj"])
    assert analysis.adapter_gradient_norms(frozen) == {}
