"""reference_impl/awq_analysis.py: a decoder layer's inputs with an early stop, AWQ's error
analysis measured (steps and errors with a channel scaled), the clipping landscape against the
search's own choice, one group's clipping split, and one layer quantized as the driver does it."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantcourse.corpus import token_windows
from quantcourse.reference_impl import awq
from quantcourse.reference_impl import awq_analysis as analysis
from quantcourse.reference_impl.affine import AffineSpec, fake_quantize
from quantcourse.reference_impl.gptq import GPTQLinear

G32 = AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32)
G16_3 = AffineSpec(bits=3, symmetric=False, granularity="group", group_size=16)


def tiny_llama(layers=3, seed=0):
    """A random Llama: hidden 64, 4 heads, 2 KV heads (grouped-query, like SmolLM2)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def windows(n=3, L=24, seed=1):
    return torch.randint(0, 128, (n, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The inputs of a decoder layer


@torch.no_grad()
def test_decoder_layer_inputs_are_the_hidden_states_and_the_kwargs_run_the_layer():
    model, ids = tiny_llama(), windows()
    expected = [model(w[None], output_hidden_states=True).hidden_states for w in ids]
    hidden, kwargs = analysis.decoder_layer_inputs(model, ids, [1, 0])
    assert sorted(hidden) == [0, 1] and hidden[1].shape == (3, 24, 64)
    for i in (0, 1):
        torch.testing.assert_close(hidden[i], torch.cat([h[i] for h in expected]))
    # the kwargs are the ones the layers are called with: layer 1 run on its input gives layer 2's input
    out = analysis.layer_outputs(model.model.layers[1], hidden[1], kwargs)
    torch.testing.assert_close(out, torch.cat([h[2] for h in expected]))


def test_decoder_layer_inputs_stop_after_the_deepest_layer():
    model = tiny_llama()
    calls = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda module, args: calls.append(1))
    head = model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(2))
    analysis.decoder_layer_inputs(model, windows(), [1])
    handle.remove()
    head.remove()
    assert calls == []  # neither layer 2 nor the output head ran


def test_decoder_layer_inputs_reject_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="decoder layer indices from 0 to 2"):
        analysis.decoder_layer_inputs(model, windows(), [3])
    with pytest.raises(ValueError, match="decoder layer indices"):
        analysis.decoder_layer_inputs(model, windows(), [])
    with pytest.raises(ValueError, match=r"token ids \[n, L\] int64"):
        analysis.decoder_layer_inputs(model, windows()[0], [0])


def test_decoder_layer_inputs_on_smollm2(reference, tokenizer):
    model = reference[0]
    ids = token_windows(tokenizer, "calibration", 64, 2)
    hidden, _ = analysis.decoder_layer_inputs(model, ids, [3])
    with torch.no_grad():
        expected = torch.cat([model(w[None], output_hidden_states=True).hidden_states[3] for w in ids])
    torch.testing.assert_close(hidden[3], expected)


# ---------------------------------------------------------------------------------------------
# AWQ's error analysis, measured


def test_scaled_rounding_with_s_1_is_rtn():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    result = analysis.scaled_rounding(W, torch.tensor([3]), 1.0, G32)
    assert torch.equal(result.error_after, result.error_before) and torch.equal(result.Q, fake_quantize(W, G32))
    summary = result.summary()
    assert summary["changed"] == 0 and summary["step_ratio"] == 1 and summary["scaled_error"] == 1


def test_a_scaled_weight_inside_its_group_keeps_the_step_and_loses_error():
    w = torch.linspace(-1.0, 1.0, 32)[None]  # one row, one group: step 2/15
    w[0, 10] = 0.3037  # an ordinary weight, far from the group's extremes
    result = analysis.scaled_rounding(w, torch.tensor([10]), 2.0, G32)
    assert result.step_after[0, 0] == result.step_before[0, 0] == pytest.approx(2 / 15)
    # the error of the scaled weight: |Q(2w) - 2w| / 2 on the unchanged grid, at most a quarter step
    q = fake_quantize(w * torch.where(torch.arange(32) == 10, 2.0, 1.0), G32)
    assert result.error_after[0, 10].item() == pytest.approx(abs(q[0, 10].item() - 2 * 0.3037) / 2, abs=1e-7)
    assert result.error_after[0, 10].item() <= (2 / 15) / 4 + 1e-7
    others = [k for k in range(32) if k != 10]
    assert torch.equal(result.error_after[0, others], result.error_before[0, others])  # same grid for them


def test_a_scaled_weight_that_becomes_the_maximum_widens_the_grid_of_its_group():
    w = torch.linspace(-1.0, 1.0, 32)[None]
    result = analysis.scaled_rounding(w, torch.tensor([31]), 3.0, G32)  # 1.0 -> 3.0: the new maximum
    assert result.step_after[0, 0].item() == pytest.approx(4 / 15)  # range [-1, 3]
    assert result.summary()["changed"] == 1.0
    assert result.summary()["other_error"] > 1.2  # every other weight of the group rounds on a coarser grid


def test_awq_prediction_matches_the_measured_error_on_many_groups():
    """Random weights: the scaled weights' error ratio is about mean(D'/D)/s, as the paper argues."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(512, 128, generator=g)
    channels = torch.tensor([5, 40, 77, 100])
    for s in (1.5, 2.0, 4.0):
        summary = analysis.scaled_rounding(W, channels, s, G16_3).summary()
        assert summary["scaled_error"] == pytest.approx(summary["predicted"], rel=0.1)
        assert summary["scaled_error"] < 1 and summary["other_error"] >= 1  # protected, at the others' expense
    big = analysis.scaled_rounding(W, channels, 4.0, G16_3).summary()
    small = analysis.scaled_rounding(W, channels, 1.5, G16_3).summary()
    assert big["changed"] > small["changed"] and big["other_error"] > small["other_error"]


def test_touched_groups_and_q():
    W = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    result = analysis.scaled_rounding(W, torch.tensor([0, 70]), 2.0, G32)
    assert result.touched().tolist() == [[True, False, True]] * 4
    s = torch.ones(96)
    s[[0, 70]] = 2.0
    torch.testing.assert_close(result.Q, awq.scaled_fake_quant(W, s, G32))
    torch.testing.assert_close(result.error_after, (result.Q - W).abs())


def test_scaled_rounding_rejects_bad_arguments():
    W = torch.randn(4, 64)
    with pytest.raises(ValueError, match="from 0 to 63"):
        analysis.scaled_rounding(W, torch.tensor([64]), 2.0, G32)
    with pytest.raises(ValueError, match="must be positive"):
        analysis.scaled_rounding(W, torch.tensor([1]), 0.0, G32)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        analysis.scaled_rounding(W[0], torch.tensor([1]), 2.0, G32)


# ---------------------------------------------------------------------------------------------
# Clipping


def clipping_problem(seed=2):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(40, 96, generator=g)
    W[3, 10] = 9.0  # an outlier weight: its group gains from a clamp
    return W, torch.randn(700, 96, generator=g)


def test_clip_curve_agrees_with_the_search():
    W, x = clipping_problem()
    curve = analysis.clip_curve(W, x, G16_3)
    assert curve.shrinks == [1 - i / 20 for i in range(10)] and curve.errors.shape == (10, 40, 6)
    found = awq.clip_search(W, x, G16_3)
    assert torch.equal(curve.best_step(), found.step)
    xs = awq.sample_tokens(x)
    amax = W.abs().reshape(40, 6, 16).amax(-1)
    torch.testing.assert_close(curve.errors[0], awq.clip_objective(W, xs, amax, G16_3))
    torch.testing.assert_close(curve.errors[4], awq.clip_objective(W, xs, amax * 0.8, G16_3))
    assert curve.best_total() <= curve.total().min().item() and (curve.best_step() > 0).any()
    assert analysis.clip_curve(W, x, G16_3, steps=3).errors.shape[0] == 3


def test_clip_curve_rejects_bad_arguments():
    W, x = clipping_problem()
    with pytest.raises(ValueError, match="from 1 to 20"):
        analysis.clip_curve(W, x, G16_3, steps=0)
    with pytest.raises(ValueError, match=r"\[N, K\] and x \[..., K\]"):
        analysis.clip_curve(W, x[:, :64], G16_3)


def test_clip_group_splits_the_error_and_shrinks_the_step():
    w = torch.linspace(-0.5, 0.5, 16)
    w[7] = 2.0  # one outlier sets the range
    result = analysis.clip_group(w, G16_3, steps=10)
    assert result.clamped[0] == 0 and result.clamped_error[0] == 0.0
    assert result.clamped[1] == 1  # 0.95 x 2.0 clamps only the outlier
    assert all(a > b for a, b in zip(result.steps, result.steps[1:]))  # the range, and the step, shrink
    assert result.inside_error[-1] < result.inside_error[0]  # the others round on a finer grid
    for i in (0, 5):
        m = torch.tensor([[2.0 * (1 - i / 20)]])
        clamped = awq.clip_weight(w[None], m, G16_3)
        total = (fake_quantize(clamped, G16_3) - w[None]).pow(2).sum().item()
        assert result.clamped_error[i] + result.inside_error[i] == pytest.approx(total, rel=1e-5)
    with pytest.raises(ValueError, match="one group of 16"):
        analysis.clip_group(torch.randn(32), G16_3)


# ---------------------------------------------------------------------------------------------
# One layer quantized as the driver does it


def test_quantize_layer_reproduces_the_driver_on_layer_0():
    model, ids = tiny_llama(layers=1), windows(4, 32)
    driven = copy.deepcopy(model)
    options = awq.AWQOptions(spec=G32)
    awq.awq_model(driven, ids, options, progress=False)
    hidden, kwargs = analysis.decoder_layer_inputs(model, ids, [0])
    layer = copy.deepcopy(model.model.layers[0])
    _, clips = awq.awq_layer(layer, hidden[0], kwargs, options)
    analysis.quantize_layer(layer, G32, clips)
    for name, module in layer.named_modules():
        if name.endswith("_proj"):
            assert type(module) is GPTQLinear
            assert torch.equal(module.codes, driven.model.layers[0].get_submodule(name).codes)
    assert torch.equal(layer.input_layernorm.weight, driven.model.layers[0].input_layernorm.weight)


def test_quantize_layer_without_scales_is_rtn():
    layer = copy.deepcopy(tiny_llama(layers=1).model.layers[0])
    weights = {n: m.weight.detach().clone() for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    analysis.quantize_layer(layer, G32)
    for name, W in weights.items():
        torch.testing.assert_close(layer.get_submodule(name).weight, fake_quantize(W, G32), rtol=1e-3, atol=1e-3)  # fp16 scales


def test_relative_error():
    a = torch.tensor([[3.0, 4.0]])
    assert analysis.relative_error(a, a) == 0.0
    assert analysis.relative_error(torch.tensor([[3.0, 5.0]]), a) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same shape"):
        analysis.relative_error(a, a.T)
