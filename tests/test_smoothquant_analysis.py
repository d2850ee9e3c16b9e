"""reference_impl/smoothquant_analysis.py: one operand quantized at a time against an independent
computation and against the W8A8 module, the typical-token error measure, the channel maxima
before and after smoothing (alpha 0, 0.5, 1), the alpha trade-off against hand-smoothed operands,
the static-scale fractions, and the error split on real SmolLM2 layers."""

import numpy as np
import pytest
import torch
from torch import nn

from quantcourse.corpus import token_windows
from quantcourse.reference_impl import smoothquant as sq
from quantcourse.reference_impl import smoothquant_analysis as analysis
from quantcourse.reference_impl.gptq_analysis import collect_layer_inputs
from quantcourse.reference_impl.llm_int8 import int8_vectorwise_quant


def outlier_inputs(M: int = 65, K: int = 48, seed: int = 0, massive: bool = True) -> torch.Tensor:
    """Activations with two outlier channels (x40 in every token) and, if massive, one huge
    value in the first token. M odd: the median token is one token (numpy would average two)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(M, K, generator=g)
    X[:, [3, 30]] *= 40
    if massive:
        X[0, 7] = 2000.0
    return X


def readers(K: int = 48, sizes=(40, 16, 16), seed: int = 1) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(K, n, bias=False) for n in sizes]


def independent_fake_quant(A: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """round(a * 127 / absmax), clipped to +-127, times absmax / 127 (absmax per row, broadcast)."""
    return np.clip(np.round(A * (127 / absmax)), -127, 127) * (absmax / 127)


# ---------------------------------------------------------------------------------------------
# One operand at a time


def test_group_weight_stacks_the_readers_and_its_column_max_is_weight_absmax():
    linears = readers()
    W = analysis.group_weight(linears)
    assert W.shape == (72, 48) and W.dtype == torch.float32
    assert torch.equal(W[40:56], linears[1].weight.detach())
    assert torch.equal(W.abs().amax(dim=0), sq.weight_absmax(linears))
    with pytest.raises(ValueError, match="must read the same input"):
        analysis.group_weight([nn.Linear(4, 2), nn.Linear(5, 2)])


def test_fake_quant_activations_match_an_independent_computation_and_the_module():
    X = outlier_inputs()
    A = X.double().numpy()
    expected = {
        ("token", None): independent_fake_quant(A, np.abs(A).max(axis=1, keepdims=True)),
        ("tensor", None): independent_fake_quant(A, np.abs(A).max()),
        ("tensor", 50.0): independent_fake_quant(A, 50.0),  # static: the massive value and the outliers saturate
    }
    linear = nn.Linear(48, 8)
    for (granularity, absmax), reference in expected.items():
        X_hat = analysis.fake_quant_activations(X, granularity, absmax)
        np.testing.assert_allclose(X_hat.double().numpy(), reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())
        module = sq.SmoothQuantLinear.from_linear(linear, granularity, absmax)
        codes, row_absmax = module.quantize_input(X)  # the codes the W8A8 layer multiplies
        torch.testing.assert_close(X_hat, codes.float() * row_absmax[:, None] / 127)
    assert analysis.fake_quant_activations(X, "tensor", 50.0).abs().max() == pytest.approx(50.0)


def test_fake_quant_weight_is_per_output_row():
    W = torch.randn(12, 48, generator=torch.Generator().manual_seed(2))
    W[5] *= 100  # a large row must not change the other rows' grids
    W_hat = analysis.fake_quant_weight(W)
    reference = independent_fake_quant(W.double().numpy(), np.abs(W.double().numpy()).max(axis=1, keepdims=True))
    np.testing.assert_allclose(W_hat.double().numpy(), reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(analysis.fake_quant_weight(W[:5]), W_hat[:5])


def test_w8a8_error_with_both_operands_is_the_module_and_fake_quant_w8a8():
    X, W = outlier_inputs(), analysis.group_weight(readers())
    reference = X.double() @ W.double().t()
    for granularity, absmax in (("token", None), ("tensor", None), ("tensor", 80.0)):
        expected = analysis.output_error(reference, sq.fake_quant_w8a8(X, W, granularity, absmax))
        assert analysis.w8a8_error(X, W, granularity, absmax) == pytest.approx(expected, rel=1e-9)
        module = sq.SmoothQuantLinear.from_linear(nn.Linear(48, 72, bias=False), granularity, absmax)
        module.weight_codes, module.weight_absmax = int8_vectorwise_quant(W)[:2]
        assert analysis.output_error(reference, module(X)) == pytest.approx(expected, rel=1e-5)


def test_w8a8_error_splits_the_operands():
    X, W = outlier_inputs(), analysis.group_weight(readers())
    reference = X.double().numpy() @ W.double().numpy().T
    A = X.double().numpy()
    X_hat = independent_fake_quant(A, np.abs(A).max(axis=1, keepdims=True))
    W_hat = analysis.fake_quant_weight(W).double().numpy()

    def median_row_error(Y):
        return float(np.median(np.linalg.norm(Y - reference, axis=1) / np.linalg.norm(reference, axis=1)))

    only_x = analysis.w8a8_error(X, W, "token", weights=False)
    only_w = analysis.w8a8_error(X, W, activations=False)
    assert only_x == pytest.approx(median_row_error(X_hat @ W.double().numpy().T), rel=1e-4)
    assert only_w == pytest.approx(median_row_error(A @ W_hat.T), rel=1e-4)
    assert only_x > 3 * only_w  # the outlier channels make the activations the hard operand
    with pytest.raises(ValueError, match="quantize at least one operand"):
        analysis.w8a8_error(X, W, activations=False, weights=False)


def test_output_error_is_the_typical_token():
    reference = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [600.0, 800.0], [0.0, 2.0]])
    approx = torch.tensor([[3.0, 4.5], [1.0, 0.2], [0.0, 0.0], [600.0, 800.0], [0.0, 2.6]])
    errors = analysis.token_errors(reference, approx)
    torch.testing.assert_close(errors, torch.tensor([0.1, 0.2, 0.0, 0.0, 0.3], dtype=torch.float64))
    assert analysis.output_error(reference, approx) == pytest.approx(0.1)
    assert analysis.token_errors(reference[2:3], torch.tensor([[0.0, 1.0]]))[0] == float("inf")
    # one massive token hides per-tensor quantization from a global norm, not from the typical token
    X, W = outlier_inputs(), analysis.group_weight(readers())
    Y = X.double() @ W.double().t()
    Y_tensor = sq.fake_quant_w8a8(X, W, "tensor")
    assert analysis.relative_error(Y, Y_tensor) < analysis.output_error(Y, Y_tensor) / 3
    with pytest.raises(ValueError, match="shapes differ"):
        analysis.output_error(Y, Y[:3])


# ---------------------------------------------------------------------------------------------
# Smoothing


def test_channel_maxima_before_and_after_smoothing():
    X, linears = outlier_inputs(), readers()
    a = X.abs().amax(dim=0)
    w = sq.weight_absmax(linears)
    before = analysis.channel_maxima(a, linears)
    assert torch.equal(before[0], a) and torch.equal(before[1], w)
    half = analysis.channel_maxima(a, linears, sq.smoothing_factors(a, w, 0.5))
    torch.testing.assert_close(half[0], half[1])  # alpha 0.5: both sides sqrt(max|X_j| max|W_j|)
    torch.testing.assert_close(half[0], (a * w).sqrt())
    one = analysis.channel_maxima(a, linears, sq.smoothing_factors(a, w, 1.0))
    torch.testing.assert_close(one[0], torch.ones(48))  # alpha 1: the activations are flat
    zero = analysis.channel_maxima(a, linears, sq.smoothing_factors(a, w, 0.0))
    torch.testing.assert_close(zero[1], torch.ones(48))  # alpha 0: the weights are
    assert analysis.spread(a) > 100 and analysis.spread(one[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="the layers read 48"):
        analysis.channel_maxima(a[:40], linears)


def test_alpha_tradeoff_measures_the_hand_smoothed_operands():
    X, linears = outlier_inputs(M=97, massive=False), readers()
    calibration = outlier_inputs(M=97, seed=5, massive=False).abs().amax(dim=0)
    W = analysis.group_weight(linears)
    alphas = [0.0, 0.5, 0.85, 1.0]
    for granularity, static in (("token", False), ("tensor", True)):
        points = analysis.alpha_tradeoff(X, linears, calibration, alphas, granularity, static)
        assert [p.alpha for p in points] == alphas
        for p in points:
            s = sq.smoothing_factors(calibration, sq.weight_absmax(linears), p.alpha)
            X_s, W_s = X / s, W * s
            absmax = (calibration / s).max().item() if static else None
            assert p.act_max == pytest.approx(absmax if static else (calibration / s).max().item(), rel=1e-6)
            assert p.weight_max == pytest.approx((W_s.abs().amax(dim=0)).max().item(), rel=1e-6)
            assert p.error == pytest.approx(analysis.w8a8_error(X_s, W_s, granularity, absmax), rel=1e-4)
            assert p.act_error == pytest.approx(analysis.w8a8_error(X_s, W_s, granularity, absmax, weights=False), rel=1e-4)
            assert p.weight_error == pytest.approx(analysis.w8a8_error(X_s, W_s, activations=False), rel=1e-4)
        by = {p.alpha: p for p in points}
        assert by[1.0].act_error < by[0.0].act_error and by[1.0].weight_error > by[0.0].weight_error  # range moves
        assert by[1.0].act_spread == pytest.approx(1.0) and by[0.0].weight_spread == pytest.approx(1.0)
        naive = analysis.w8a8_error(X, W, granularity, calibration.max().item() if static else None)
        assert min(p.error for p in points) < naive


def test_static_fractions():
    X = torch.tensor([[0.5, -2.0, 1.0, 0.0], [3.0, -0.5, 0.004, 100.0]])
    assert analysis.saturated_fraction(X, 2.0) == pytest.approx(2 / 8)  # 3.0 and 100.0 exceed 2.0
    # a static step of 300 / 127 = 2.36: |x| < 1.18 rounds to 0 (0.5, 1.0, -0.5, 0.004); the exact zero does not count
    assert analysis.zero_code_fraction(X, "tensor", 300.0) == pytest.approx(4 / 7)
    assert analysis.zero_code_fraction(X, "token") == pytest.approx(1 / 7)  # 0.004, in the row of 100
    with pytest.raises(ValueError, match="positive calibration maximum"):
        analysis.saturated_fraction(X, 0.0)


def test_bad_modes_are_refused():
    X, linears = outlier_inputs(), readers()
    with pytest.raises(ValueError, match="'token' or 'tensor'"):
        analysis.fake_quant_activations(X, "channel")
    with pytest.raises(ValueError, match="pass act_granularity='tensor'"):
        analysis.fake_quant_activations(X, "token", 10.0)
    with pytest.raises(ValueError, match="with static=True"):
        analysis.alpha_tradeoff(X, linears, X.abs().amax(dim=0), [0.5], "token", static=True)
    with pytest.raises(ValueError, match=r"X must be \[tokens, 48\]"):
        analysis.alpha_tradeoff(X[:, :40], linears, X.abs().amax(dim=0), [0.5])
    with pytest.raises(ValueError, match="alpha must be a number from 0 to 1"):
        analysis.alpha_tradeoff(X, linears, X.abs().amax(dim=0), [1.5])


# ---------------------------------------------------------------------------------------------
# On real SmolLM2 layers


def test_on_smollm2_the_activations_are_the_hard_operand_and_smoothing_helps(reference, tokenizer):
    """Layer 2 (the first layers only run): its q/k/v input and its down_proj input, whose
    calibration maximum is tens of times its typical value."""
    model = reference[0]
    groups = {
        "qkv": [model.get_submodule(f"model.layers.2.self_attn.{p}_proj") for p in "qkv"],
        "down": [model.get_submodule("model.layers.2.mlp.down_proj")],
    }
    names = {"qkv": "model.layers.2.self_attn.q_proj", "down": "model.layers.2.mlp.down_proj"}
    calibration = collect_layer_inputs(model, token_windows(tokenizer, "calibration", 256, 1), list(names.values()))
    held = collect_layer_inputs(model, token_windows(tokenizer, "heldout", 128, 1), list(names.values()))
    for group, linears in groups.items():
        X, a, W = held[names[group]], calibration[names[group]].abs().amax(dim=0), analysis.group_weight(linears)
        assert analysis.spread(a) > 3 * analysis.spread(sq.weight_absmax(linears))
        only_x, only_w = analysis.w8a8_error(X, W, "token", weights=False), analysis.w8a8_error(X, W, activations=False)
        assert only_x > 2 * only_w
        naive_static = analysis.w8a8_error(X, W, "tensor", a.max().item())
        assert naive_static > analysis.w8a8_error(X, W, "token")
        static = analysis.alpha_tradeoff(X, linears, a, [0.5, 0.85], "tensor", static=True)
        assert min(p.error for p in static) < naive_static / 1.5
