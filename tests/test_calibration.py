"""Calibration: percentile, MSE search, KL, observers, on hand-made tensors and real weights."""

import math

import pytest
import torch

from quantcourse.reference_impl.affine import AffineSpec, block_min_max, quantize_tensor, scale_zero_point
from quantcourse.reference_impl.calibration import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    block_error,
    block_reduce,
    clipping_kl,
    compare_ranges,
    kl_range,
    minmax_range,
    mse_range,
    percentile_range,
    quantization_mse,
    row_quantile,
    shrink_factors,
)

SPECS = [
    AffineSpec(bits=4, granularity="tensor"),
    AffineSpec(bits=4, granularity="channel", axis=0),
    AffineSpec(bits=3, symmetric=False, granularity="channel", axis=1),
    AffineSpec(bits=4, symmetric=False, granularity="group", group_size=8),
    AffineSpec(bits=3, granularity="group", group_size=12, ragged=True),
]


def heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    """Student-t with 3 degrees of freedom: a bell with rare large values, like LLM weights."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample(shape)


def gaussian_with_outliers(size: float) -> torch.Tensor:
    """10,000 samples of N(0, 1), four of them replaced by outliers of about `size`."""
    torch.manual_seed(1)
    x = torch.randn(10_000)
    x[:4] = torch.tensor([1.0, -1.0, 0.8, -0.9]) * size
    return x


# --- blocks and min-max ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_block_reduce_sees_the_blocks_of_block_min_max(spec):
    x = torch.randn(6, 40)
    xmin, xmax = block_min_max(x, spec)
    assert torch.equal(block_reduce(x, spec, lambda rows: rows.amin(dim=1)), xmin)
    assert torch.equal(block_reduce(x, spec, lambda rows: rows.amax(dim=1)), xmax)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_every_method_returns_one_range_per_block(spec):
    x = heavy_tailed(6, 40)
    shape = block_min_max(x, spec)[0].shape
    for xmin, xmax in (minmax_range(x, spec), percentile_range(x, spec, 99), mse_range(x, spec, grid=10)):
        assert xmin.shape == xmax.shape == shape and xmin.dtype == torch.float32
        assert (xmin <= xmax).all()


def test_minmax_range_reproduces_the_default_quantization():
    x = torch.randn(8, 16, dtype=torch.float64)
    spec = AffineSpec(bits=4, symmetric=False)
    assert torch.equal(quantize_tensor(x, spec, *minmax_range(x, spec)).codes, quantize_tensor(x, spec).codes)


# --- percentile -------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9999, 1.0])
def test_row_quantile_matches_torch_quantile(q):
    rows = torch.randn(5, 101)
    assert torch.allclose(row_quantile(rows, q), torch.quantile(rows, q, dim=1), atol=1e-6)


def test_symmetric_percentile_is_taken_of_the_magnitudes():
    x = torch.randn(4, 50)
    xmin, xmax = percentile_range(x, AffineSpec(granularity="channel"), percentile=90)
    expected = torch.quantile(x.abs(), 0.9, dim=1)
    assert torch.allclose(xmax, expected) and torch.equal(xmin, -xmax)


def test_asymmetric_percentile_cuts_both_tails_of_each_group():
    x = torch.randn(3, 40)
    spec = AffineSpec(symmetric=False, granularity="group", group_size=20)
    xmin, xmax = percentile_range(x, spec, percentile=95)
    groups = x.reshape(3, 2, 20)
    assert torch.allclose(xmin, torch.quantile(groups, 0.05, dim=-1))
    assert torch.allclose(xmax, torch.quantile(groups, 0.95, dim=-1))


def test_percentile_100_is_min_max():
    x = torch.randn(4, 30)
    asym = AffineSpec(symmetric=False)
    assert all(torch.equal(a, b) for a, b in zip(percentile_range(x, asym, 100), minmax_range(x, asym)))
    _, t = percentile_range(x, AffineSpec(), 100)
    assert torch.equal(t, x.abs().amax(dim=1))


def test_percentile_handles_more_elements_than_torch_quantile_accepts():
    n = 2**24 + 1  # torch.quantile refuses inputs larger than 2^24 elements
    x = (torch.arange(n) * 7919 % n).float()  # 0 .. 2^24 shuffled (7919 is prime to n), exact in float32
    xmin, xmax = percentile_range(x, AffineSpec(symmetric=False, granularity="tensor"), 75)
    assert xmin.item() == 2**22 and xmax.item() == 3 * 2**22  # ranks 0.25 and 0.75 of 0 .. 2^24


# --- clipping outliers ------------------------------------------------------------------------


def test_percentile_and_mse_clip_outliers_that_min_max_keeps():
    x = gaussian_with_outliers(12.0)
    spec = AffineSpec(bits=3, granularity="tensor")
    ranges = {
        "minmax": minmax_range(x, spec),
        "percentile": percentile_range(x, spec, 99.9),
        "mse": mse_range(x, spec),
    }
    assert ranges["minmax"][1].item() == 12.0
    assert 3.0 < ranges["percentile"][1].item() < 4.0  # the 99.9th percentile of |N(0, 1)| is 3.29
    assert ranges["mse"][1].item() < 6.0
    error = {name: quantization_mse(x, spec, *r) for name, r in ranges.items()}
    assert error["percentile"] < error["minmax"] / 2 and error["mse"] < error["minmax"] / 2


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_mse_search_never_loses_to_min_max_on_its_criterion(spec):
    x = heavy_tailed(6, 40, seed=2)
    err_minmax = block_error(x, quantize_tensor(x, spec).dequantize(), spec)
    err_mse = block_error(x, quantize_tensor(x, spec, *mse_range(x, spec, norm=2.0)).dequantize(), spec)
    assert (err_mse <= err_minmax).all()  # p = 1, min-max itself, is a candidate
    assert (err_mse < err_minmax).any()  # and on heavy tails some block gains from clipping


def test_mse_search_keeps_the_best_candidate_of_each_block():
    x = heavy_tailed(8, 64)
    spec = AffineSpec(bits=3, symmetric=False, granularity="channel")
    xmin, xmax = block_min_max(x, spec)
    candidates = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # grid 10, max_shrink 0.5
    errors = torch.stack([
        ((quantize_tensor(x, spec, p * xmin, p * xmax).dequantize() - x).abs() ** 2.4).sum(dim=1)
        for p in candidates
    ])  # fmt: skip
    best = torch.tensor(candidates)[errors.argmin(dim=0)]
    found_min, found_max = mse_range(x, spec, grid=10, max_shrink=0.5)
    assert torch.allclose(found_max, best * xmax) and torch.allclose(found_min, best * xmin)
    assert len(set(best.tolist())) > 1  # the blocks do not all agree, so per-block choice is tested


def test_shrink_factors_end_at_one_minus_max_shrink():
    p = shrink_factors(grid=100, max_shrink=0.8)
    assert len(p) == 81 and p[0].item() == 1.0 and p[-1].item() == pytest.approx(0.2)
    assert shrink_factors(grid=4, max_shrink=0.6).tolist() == [1.0, 0.75, 0.5]


def test_mse_search_reaches_the_smallest_candidate():
    # 1000 values at 0.15 and one at 1: at 2 bits (codes -2..1) a range of p puts 0.15 on the
    # level p when p <= 0.3, so the error keeps falling down to the last candidate, p = 0.2.
    x = torch.full((1001,), 0.15)
    x[0] = 1.0
    _, xmax = mse_range(x, AffineSpec(bits=2, granularity="tensor"))
    assert xmax.item() == pytest.approx(0.2)


# --- KL ---------------------------------------------------------------------------------------


def test_clipping_kl_known_answers():
    # Nothing clipped, runs of two bins [1, 3] and [2, 2] each spread evenly: Q = [2, 2, 2, 2].
    assert clipping_kl(torch.tensor([1.0, 3.0, 2.0, 2.0]), 4, 2) == pytest.approx(
        (1 / 8) * math.log(1 / 2) + (3 / 8) * math.log(3 / 2)
    )
    hist = torch.tensor([4.0, 0.0, 2.0, 2.0])
    assert clipping_kl(hist, 4, 2) == pytest.approx(0.0)  # the empty bin stays empty in Q
    # Clip at 3 bins: P = [4, 0, 2+2], runs [4, 0] and [2]: Q = [4, 0, 2].
    expected = 0.5 * math.log(0.5 / (4 / 6)) + 0.5 * math.log(0.5 / (2 / 6))
    assert clipping_kl(hist, 3, 2) == pytest.approx(expected)
    # Clip at 2 bins: P = [4, 4], Q = [4, 0] and its empty last bin gets one pseudo-count: [4, 1].
    assert clipping_kl(hist, 2, 2) == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2))


def test_kl_threshold_on_a_gaussian_is_a_few_sigma():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    _, t8 = kl_range(x, bits=8)
    amax = x.abs().max().item()
    assert 3.5 < t8.item() < amax
    steps = t8.item() / (amax / 2048)
    assert steps == pytest.approx(round(steps), abs=1e-3) and round(steps) >= 128  # a bin edge
    _, t2 = kl_range(x, bits=2)
    assert 2.0 < t2.item() < 3.5  # fewer levels: clipping more pays


def test_kl_clips_rare_outliers():
    x = gaussian_with_outliers(50.0)
    xmin, xmax = kl_range(x, bits=8)
    assert xmax.item() < 5.0 and xmin.item() == -xmax.item()


def test_kl_keeps_the_range_of_a_distribution_without_tails():
    torch.manual_seed(0)
    x = torch.rand(50_000) * 2 - 1
    _, t = kl_range(x, bits=8)
    assert t.item() > 0.99 * x.abs().max().item()


def test_kl_of_zeros_is_a_zero_range():
    xmin, xmax = kl_range(torch.zeros(10))
    assert xmin.item() == xmax.item() == 0.0


# --- observers --------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_running_min_max_is_that_of_the_concatenation(per_channel):
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5), torch.randn(7, 5) * 3, torch.randn(5) - 2]
    observer = MinMaxObserver(per_channel=per_channel)
    for b in batches:
        observer.update(b)
    everything = torch.cat([b.reshape(-1, 5) for b in batches])
    xmin, xmax = observer.range()
    if per_channel:
        assert xmin.shape == (5,)
        assert torch.equal(xmin, everything.amin(dim=0)) and torch.equal(xmax, everything.amax(dim=0))
    else:
        assert xmin.shape == () and xmin == everything.min() and xmax == everything.max()


def test_moving_average_follows_its_recurrence():
    observer = MovingAverageMinMaxObserver(momentum=0.25)
    observer.update(torch.tensor([-2.0, 4.0]))  # first batch: (-2, 4)
    observer.update(torch.tensor([-6.0, 8.0]))  # -2 + 0.25 (-6 + 2) = -3,  4 + 0.25 (8 - 4) = 5
    observer.update(torch.tensor([1.0, 2.0]))  # -3 + 0.25 (1 + 3) = -2,   5 + 0.25 (2 - 5) = 4.25
    assert [v.item() for v in observer.range()] == [-2.0, 4.25]


def test_per_channel_moving_average_and_its_scale():
    observer = MovingAverageMinMaxObserver(momentum=0.5, per_channel=True)
    observer.update(torch.tensor([[0.0, -1.0, 2.0], [1.0, -3.0, 4.0]]))  # (0, -3, 2), (1, -1, 4)
    observer.update(torch.tensor([[2.0, 1.0, 0.0]]))
    xmin, xmax = observer.range()
    assert xmin.tolist() == [1.0, -1.0, 1.0] and xmax.tolist() == [1.5, 0.0, 2.0]
    scale, zero = observer.scale_zero_point(bits=8, symmetric=False)
    expected = scale_zero_point(xmin, xmax, bits=8, symmetric=False)
    assert scale.shape == zero.shape == (3,)
    assert torch.equal(scale, expected[0]) and torch.equal(zero, expected[1])


def test_observer_asked_too_early_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"call update\(batch\)"):
        MovingAverageMinMaxObserver().scale_zero_point()


def test_observer_refuses_a_batch_with_other_features():
    observer = MinMaxObserver(per_channel=True)
    observer.update(torch.randn(2, 8))
    with pytest.raises(ValueError, match="seen batches with 8 features"):
        observer.update(torch.randn(2, 9))


# --- comparing methods, real weights ----------------------------------------------------------


def test_clipping_wins_at_low_bits_on_heavy_tails():
    x = heavy_tailed(4096, seed=4)
    errors = compare_ranges(x, AffineSpec(bits=3, granularity="tensor"))
    assert set(errors) == {"minmax", "percentile", "mse", "kl"}
    assert min(errors.values()) < errors["minmax"] / 2
    assert "kl" not in compare_ranges(x.view(64, 64), AffineSpec(bits=3, granularity="channel"))


@pytest.fixture(scope="module")
def minilm_query_weight():
    from quantcourse.models import load_minilm

    model, _ = load_minilm()
    return model.encoder.layer[0].attention.self.query.weight.detach()  # [384, 384]


@pytest.mark.parametrize("bits", [3, 4])
def test_mse_search_reduces_the_error_of_real_weights(minilm_query_weight, bits):
    w = minilm_query_weight
    spec = AffineSpec(bits=bits, granularity="channel", axis=0)
    error_minmax = quantization_mse(w, spec, *minmax_range(w, spec))
    error_mse = quantization_mse(w, spec, *mse_range(w, spec))
    assert error_mse < 0.8 * error_minmax


# --- bad input --------------------------------------------------------------------------------

CALLS = {
    "minmax": lambda x: minmax_range(x, AffineSpec()),
    "percentile": lambda x: percentile_range(x, AffineSpec()),
    "mse": lambda x: mse_range(x, AffineSpec(), grid=2),
    "kl": lambda x: kl_range(x),
    "observer": lambda x: MinMaxObserver().update(x),
}


@pytest.mark.parametrize("name", CALLS)
def test_nan_and_inf_are_refused(name):
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    x[2, 0] = float("-inf")
    with pytest.raises(ValueError, match="2 NaN/inf values"):
        CALLS[name](x)


@pytest.mark.parametrize("name", CALLS)
def test_integer_tensors_are_refused_with_the_fix(name):
    with pytest.raises(TypeError, match=r"x.float\(\)"):
        CALLS[name](torch.arange(12).view(3, 4))


@pytest.mark.parametrize("percentile", [0, -1.0, 100.5, True, "99"])
def test_percentile_outside_0_100_is_refused(percentile):
    with pytest.raises(ValueError, match=r"percentile must be a number in \(0, 100\]"):
        percentile_range(torch.randn(2, 8), AffineSpec(), percentile)


def test_asymmetric_percentile_below_50_is_refused():
    with pytest.raises(ValueError, match="needs percentile >= 50"):
        percentile_range(torch.randn(2, 8), AffineSpec(symmetric=False), 30)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid": 0}, "grid must be a positive integer"),
        ({"grid": 2.5}, "grid must be a positive integer"),
        ({"max_shrink": 0.0}, r"max_shrink must be in \(0, 1\)"),
        ({"max_shrink": 1.0}, r"max_shrink must be in \(0, 1\)"),
        ({"norm": 0}, "norm must be positive"),
    ],
)
def test_bad_search_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mse_range(torch.randn(2, 8), AffineSpec(), **kwargs)


def test_bad_kl_settings_are_refused():
    with pytest.raises(ValueError, match=r"bins must be an integer >= 128"):
        kl_range(torch.randn(100), bits=8, bins=64)
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        kl_range(torch.randn(100), bits=9)


@pytest.mark.parametrize("momentum", [0.0, 1.5])
def test_momentum_outside_0_1_is_refused(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]"):
        MovingAverageMinMaxObserver(momentum)
