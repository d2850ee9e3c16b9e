"""reference_impl/gptq_analysis.py: inputs collected with an early stop, the Hessian's spectrum,
the OBS update and the Cholesky rows, the loop replayed from its result, OBQ's greedy order,
the lazy-batch arithmetic, and the error measures."""

import pytest
import torch

from quantcourse.corpus import token_windows
from quantcourse.reference_impl import gptq
from quantcourse.reference_impl import gptq_analysis as analysis
from quantcourse.reference_impl.affine import AffineSpec, quantize_tensor
from quantcourse.surgery import collect_inputs


def inputs(K, tokens=400, seed=0):
    """Correlated float64 inputs [tokens, K] with channel energies from 1 to 100."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K, dtype=torch.float64) + 0.5 * torch.randn(K, K, generator=g, dtype=torch.float64) / K**0.5
    X = torch.randn(tokens, K, generator=g, dtype=torch.float64) @ mix
    return X * torch.logspace(0, 1, K, dtype=torch.float64)[torch.randperm(K, generator=g)]


def weight(N, K, seed=1):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


PER_CHANNEL = AffineSpec(bits=4, symmetric=False, granularity="channel")
G32 = AffineSpec(bits=3, symmetric=False, granularity="group", group_size=32)


# ---------------------------------------------------------------------------------------------
# The Hessian


def test_hessian_is_two_over_n_xtx():
    X = inputs(24, tokens=50)
    torch.testing.assert_close(analysis.hessian(X), 2 / 50 * X.T @ X, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"float matrix \[tokens, K\]"):
        analysis.hessian(X.long())


def test_fewer_tokens_than_inputs_make_h_singular_and_damping_cures_it():
    X = inputs(64, tokens=40).float()  # 40 tokens, 64 inputs: rank 40
    H = analysis.hessian(X)
    raw = analysis.spectrum(H)
    assert raw.dtype == torch.float64 and bool((raw.diff() >= 0).all())
    assert int((raw < 1e-5 * raw.max()).sum()) == 64 - 40  # zero up to float32 rounding
    assert analysis.condition_number(raw) == float("inf") or analysis.condition_number(raw) > 1e6
    damped = analysis.spectrum(H, damp=0.01)  # no dead inputs: the same eigenvalues, shifted
    torch.testing.assert_close(damped, raw + 0.01 * H.diagonal().mean().double(), rtol=1e-5, atol=1e-6)
    assert damped.min() > 0.009 * H.diagonal().mean()
    assert analysis.condition_number(damped) < analysis.condition_number(analysis.spectrum(H, damp=0.001)) < 1e6
    assert analysis.condition_number(torch.tensor([0.0, 1.0])) == float("inf")


def test_compensable_fraction_is_what_the_other_columns_can_cancel():
    H = analysis.hessian(inputs(32))
    fraction = analysis.compensable_fraction(H, damp=0.01)
    assert fraction.shape == (32,) and bool(((fraction >= 0) & (fraction < 1)).all())
    # the definition: quantize column j alone with error 1, with and without the best compensation
    Hd = analysis.damped(H, 0.01).double()
    j = 7
    free = [k for k in range(32) if k != j]
    d = torch.zeros(32, dtype=torch.float64)
    d[j] = 1.0
    alone = d @ Hd @ d
    d[free] = -torch.linalg.solve(Hd[free][:, free], Hd[free, j])  # least squares for the free columns
    compensated = d @ Hd @ d
    assert fraction[j].item() == pytest.approx(1 - (compensated / alone).item(), rel=1e-9)
    # two inputs: their squared (uncentered) correlation
    two = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
    assert analysis.compensable_fraction(two, damp=0.0)[0].item() == pytest.approx(2**2 / (4 * 3), rel=1e-12)
    # uncorrelated inputs: nothing to compensate with
    assert analysis.compensable_fraction(torch.diag(H.diagonal())).abs().max() < 1e-12


def test_dead_inputs_are_damped_like_gptq():
    X = inputs(16)
    X[:, 3] = 0
    H = analysis.hessian(X)
    Hd = analysis.damped(H, 0.1)
    torch.testing.assert_close(Hd, gptq.prepare_hessian(H, weight(2, 16), 0.1)[0])
    assert Hd[3, 3] > 1  # 1 plus the damping: invertible
    with pytest.raises(ValueError, match="negative diagonal"):
        analysis.spectrum(-H)


# ---------------------------------------------------------------------------------------------
# OBS and the Cholesky rows


def test_obs_update_is_the_best_compensation_with_column_j_fixed():
    H, W = analysis.damped(analysis.hessian(inputs(20)), 0.01), weight(5, 20)
    Hinv = torch.linalg.inv(H)
    j, q = 4, torch.round(W[:, 4] * 2) / 2  # any rounding of column j
    delta = analysis.obs_update(Hinv, j, W[:, j] - q)
    assert torch.allclose(W[:, j] + delta[:, j], q, atol=1e-12)
    free = [k for k in range(20) if k != j]  # the constrained least-squares optimum, row by row
    expected = (W[:, j] - q)[:, None] * torch.linalg.solve(H[free][:, free], H[free, j])[None, :]
    torch.testing.assert_close(delta[:, free], expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="column index from 0 to 19"):
        analysis.obs_update(Hinv, 20, W[:, 0])


def test_eliminated_rows_are_the_rows_of_the_cholesky_factor():
    H = analysis.damped(analysis.hessian(inputs(24)), 0.01).double()
    U = gptq.inverse_cholesky(H)
    Hinv = torch.linalg.inv(H)
    for j in range(24):  # Gaussian elimination of columns 0..j-1, one at a time, against the formula
        torch.testing.assert_close(analysis.eliminated_row(H, j), Hinv[j, j:], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(analysis.eliminated_row(H, j), U[j, j:] * U[j, j], rtol=1e-9, atol=1e-12)
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]


# ---------------------------------------------------------------------------------------------
# The loop, replayed


def snapshots(W, H, spec, damp=0.01):
    """The column loop written out with an explicit inverse, keeping W before each column: [K+1]."""
    Hd, W = analysis.damped(H, damp).double(), W.clone()
    Hinv, K = torch.linalg.inv(Hd), W.shape[1]
    states, size = [], spec.group_size if spec.granularity == "group" else K
    for j in range(K):
        states.append(W.clone())
        if j % size == 0:
            scale, zero = gptq.grid_params(W[:, j : j + size], spec)
        _, q = gptq.quantize_column(W[:, j], scale, zero, spec)
        W = W - torch.outer((W[:, j] - q) / Hinv[j, j], Hinv[j])
        W[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    return states + [W]


@pytest.mark.parametrize("spec", [PER_CHANNEL, G32], ids=lambda s: s.describe())
def test_error_trace_replays_every_state_of_the_loop(spec):
    W, H = weight(12, 96), analysis.hessian(inputs(96))
    result = gptq.gptq_quantize(W, H, spec, block_size=40)
    trace = analysis.error_trace(W, H, result)
    for j, expected in enumerate(snapshots(W, H, spec)):
        torch.testing.assert_close(trace.state(j), expected, rtol=1e-9, atol=1e-9)
    assert trace.column_loss().sum().item() == pytest.approx(result.loss, rel=1e-9)
    torch.testing.assert_close(trace.Err, (trace.W - trace.Q) @ torch.linalg.inv(trace.U), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="from 0"):
        trace.state(97)


def test_error_trace_follows_act_order():
    W, H = weight(12, 96), analysis.hessian(inputs(96))
    result = gptq.gptq_quantize(W, H, G32, act_order=True)
    trace = analysis.error_trace(W, H, result)
    assert torch.equal(trace.perm, result.perm)
    perm = result.perm
    for j, expected in enumerate(snapshots(W[:, perm], H[perm][:, perm], G32)):
        torch.testing.assert_close(trace.state(j), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(trace.state(96)[:, torch.argsort(perm)], result.Q.double(), rtol=0, atol=0)


def test_quadratic_loss_is_gptqs_loss_and_puts_rtn_on_the_same_scale():
    X = inputs(64)
    X[:, 9] = 0  # a dead input
    W, H = weight(16, 64), analysis.hessian(X)
    result = gptq.gptq_quantize(W, H, PER_CHANNEL)
    assert analysis.quadratic_loss(W, result.Q, H) == pytest.approx(result.loss, rel=1e-9)
    rtn = quantize_tensor(W.float(), PER_CHANNEL).dequantize()
    assert analysis.quadratic_loss(W, rtn, H) > 1.1 * result.loss  # correlated inputs: GPTQ compensates
    eye = torch.eye(64, dtype=torch.float64)  # H = I: the objective is the squared weight error, damped
    assert analysis.quadratic_loss(W, rtn, eye, damp=0.01) == pytest.approx(1.01 * ((W - rtn) ** 2).sum().item() / 2, rel=1e-9)
    W2 = W.clone()
    W2[:, 9] += 5  # the weights of a dead input do not count
    assert analysis.quadratic_loss(W2, rtn, H) == analysis.quadratic_loss(W, rtn, H)


def test_output_error_and_gap_closed():
    X, W = inputs(16, tokens=30), weight(4, 16)
    assert analysis.output_error(X, W, W) == 0
    assert analysis.output_error(X, W, 0.9 * W) == pytest.approx(0.1, rel=1e-9)
    assert analysis.gap_closed(10.0, 14.0, 11.0) == pytest.approx(0.75)
    assert analysis.gap_closed(27.65, 37.28, 31.12) == pytest.approx(0.6397, abs=1e-4)  # the GPTQ paper's OPT-125M, 4 bits
    with pytest.raises(ValueError, match="no gap"):
        analysis.gap_closed(10.0, 10.0, 11.0)


# ---------------------------------------------------------------------------------------------
# OBQ


def test_obq_is_gptq_in_each_rows_own_greedy_order():
    W, H = weight(6, 48), analysis.hessian(inputs(48))
    result = analysis.obq_quantize(W, H, PER_CHANNEL)
    assert result.loss == pytest.approx(analysis.quadratic_loss(W, result.Q, H), rel=1e-9)
    for r in range(6):
        order = result.order[r]
        assert sorted(order.tolist()) == list(range(48))
        fixed = gptq.gptq_quantize_naive(W[r : r + 1, order], H[order][:, order], PER_CHANNEL)
        assert torch.equal(fixed.codes[0], result.codes[r, order])
    # the first pick is the cheapest weight: least (w - q)^2 / [H^-1]_jj on the original row
    Hinv = torch.linalg.inv(analysis.damped(H, 0.01).double())
    scale, zero = gptq.grid_params(W, PER_CHANNEL)
    _, q = gptq.quantize_column(W.T, scale, zero, PER_CHANNEL)
    assert torch.equal(result.order[:, 0], ((W - q.T) ** 2 / Hinv.diagonal()).argmin(dim=1))


def test_obq_without_correlations_is_rtn_and_refuses_groups_and_huge_problems():
    W = weight(8, 32).float()
    result = analysis.obq_quantize(W, torch.eye(32), PER_CHANNEL)
    assert torch.equal(result.Q, quantize_tensor(W, PER_CHANNEL).dequantize())
    with pytest.raises(ValueError, match="granularity='channel'"):
        analysis.obq_quantize(W, torch.eye(32), G32)
    with pytest.raises(ValueError, match="too many"):
        analysis.obq_quantize(torch.zeros(1024, 512), torch.eye(512), PER_CHANNEL)


# ---------------------------------------------------------------------------------------------
# Lazy batches


def test_update_costs_count_the_same_work_and_less_traffic():
    N, K = 64, 256
    one = analysis.update_costs(N, K, 1)
    assert one.flops == N * K * (K - 1)
    assert one.bytes == 4 * (2 * N * K + N * K * (K - 1) + K * (K - 1) // 2 + K)  # sum over j of 2N(K - j) + (K - j)
    whole = analysis.update_costs(N, K, K)
    assert whole.flops == one.flops and whole.bytes == 4 * (2 * N * K + K * (K + 1) // 2)
    blocked = analysis.update_costs(4096, 4096, 128)
    ratio = analysis.update_costs(4096, 4096, 1).bytes / blocked.bytes
    assert 100 < ratio < 128  # about the block size
    assert blocked.intensity > 100 * analysis.update_costs(4096, 4096, 1).intensity
    assert analysis.update_costs(N, K, 100).flops == one.flops  # a ragged last block
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        analysis.update_costs(N, K, 0)


# ---------------------------------------------------------------------------------------------
# Real inputs


def test_collect_layer_inputs_stops_after_the_last_layer_it_needs(reference, tokenizer):
    model = reference[0]
    names = ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    windows = token_windows(tokenizer, "calibration", 32, 2)
    calls = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        ours = analysis.collect_layer_inputs(model, windows, names)
    finally:
        handle.remove()
    assert not calls  # layer 2 never ran
    full = collect_inputs(model, windows, names)
    for name in names:
        assert ours[name].shape == (64, model.get_submodule(name).in_features)
        assert torch.equal(ours[name], full[name])
    with pytest.raises(KeyError, match="not modules of this model"):
        analysis.collect_layer_inputs(model, windows, ["model.layers.0.nope"])
