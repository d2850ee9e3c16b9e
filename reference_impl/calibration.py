"""Calibration: choosing the range [xmin, xmax] that each block's grid covers.

Min-max covers every value, so one outlier stretches the step s for all the others. Clipping
picks a narrower range: the few values outside saturate to the end codes (a large error on a
few elements) while the rest get a finer step (a smaller error on most). Which trade wins is an
empirical question, and each method below answers it differently:

- min-max:     the whole range (no clipping).
- percentile:  drop a fixed fraction of the largest magnitudes.
- MSE search:  try shrinking the range by a factor p and keep the p with the least error (GPTQ).
- KL:          keep the threshold whose quantized histogram stays closest to the original one
               (TensorRT's entropy calibration of int8 activations).

Every method returns per-block (xmin, xmax) in the shapes of `affine.block_min_max`, ready for
`affine.quantize_tensor(x, spec, xmin, xmax)`. Observers collect the same ranges from
activations that arrive one batch at a time.
"""

import math
from functools import partial

import torch

from .affine import (
    AffineSpec,
    block_min_max,
    block_reduce,
    check_bits,
    check_tensor,
    quantize_tensor,
    scale_zero_point,
)

Range = tuple[torch.Tensor, torch.Tensor]


def minmax_range(x: torch.Tensor, spec: AffineSpec) -> Range:
    """The plain range of each block: (min, max), float32, shapes of `block_min_max`."""
    return block_min_max(check_tensor(x, "x").float(), spec)


# ---------------------------------------------------------------------------------------------
# Percentile


def row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0 <= q <= 1) of each row: [n, L] -> [n], same dtype.

    Linear interpolation between the two order statistics around rank q * (L - 1), the
    definition of torch.quantile, but found with kthvalue (a selection, O(L)) so it has no
    limit on the size of the input (torch.quantile refuses more than 2^24 elements).
    """
    rank = q * (rows.shape[1] - 1)
    below = math.floor(rank)
    low = rows.kthvalue(below + 1, dim=1).values  # kthvalue counts from 1
    if rank == below:
        return low
    high = rows.kthvalue(below + 2, dim=1).values
    return torch.lerp(low, high, rank - below)


def percentile_range(x: torch.Tensor, spec: AffineSpec, percentile: float = 99.99) -> Range:
    """Clip each block at a percentile of its values.

    Symmetric grid: t = percentile of |x| in the block, range (-t, t). Asymmetric grid: the range
    runs from the (100 - percentile)-th to the percentile-th percentile of x, so both tails lose
    the same fraction. percentile = 100 gives min-max. Returns float32, shapes of `block_min_max`.
    """
    x = check_tensor(x, "x").float()
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ValueError(
            f"percentile must be a number in (0, 100], got {percentile!r}: 99.99 keeps all but the "
            "largest 0.01% of the values, 100 keeps them all (min-max)"
        )
    q = percentile / 100
    if spec.symmetric:
        t = block_reduce(x.abs(), spec, partial(row_quantile, q=q))
        return -t, t
    if percentile < 50:
        raise ValueError(
            f"an asymmetric range needs percentile >= 50, got {percentile}: the lower end is the "
            f"{100 - percentile}-th percentile and would lie above the upper end"
        )
    lower = block_reduce(x, spec, partial(row_quantile, q=1 - q))
    return lower, block_reduce(x, spec, partial(row_quantile, q=q))


# ---------------------------------------------------------------------------------------------
# MSE search (GPTQ's find_params with mse=True)


def block_error(x: torch.Tensor, x_hat: torch.Tensor, spec: AffineSpec, norm: float = 2.0) -> torch.Tensor:
    """sum |x - x_hat|^norm over each block: float32, shapes of `block_min_max`."""
    return block_reduce((x.float() - x_hat.float()).abs().pow(norm), spec, partial(torch.sum, dim=1))


def shrink_factors(grid: int, max_shrink: float) -> torch.Tensor:
    """Candidate factors p = 1, 1 - 1/grid, 1 - 2/grid, ... down to 1 - max_shrink: float32.

    GPTQ's loop stops one step before 1 - max_shrink (p >= 0.21 for its defaults); here the end
    point is included (p >= 0.2), so the smallest factor that max_shrink names is tried too.
    """
    steps = math.floor(max_shrink * grid + 1e-9)  # 0.8 * 100 must give 80 steps, not 79
    return 1 - torch.arange(steps + 1, dtype=torch.float32) / grid


def mse_range(
    x: torch.Tensor, spec: AffineSpec, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> Range:
    """Search, per block, the shrunk range [p * xmin, p * xmax] with the least error.

    For each p of `shrink_factors(grid, max_shrink)`, quantize every block with its shrunk range
    and measure  err(p) = sum over the block of |x - Q_p(x)|^norm;  keep, per block, the p with
    the smallest err (the largest p on a tie). p = 1 (min-max) is the first candidate, so the
    result is never worse than min-max on this criterion.

    norm = 2.4 is GPTQ's default: between the mean squared error (2) and the max error (inf), it
    weights the large errors of the clipped outliers a little more than MSE does. With norm = 2
    the search minimizes the quantization MSE itself.

    x: any shape, float. Returns float32 (xmin, xmax), shapes of `block_min_max`; the blocks are
    searched together, one pass over x per candidate.
    """
    x = check_tensor(x, "x").float()
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(
            f"grid must be a positive integer (the number of steps from p = 1 to p = 0), got {grid!r}; "
            "GPTQ uses 100"
        )
    if not 0 < max_shrink < 1:
        raise ValueError(
            f"max_shrink must be in (0, 1), got {max_shrink!r}: the range is shrunk down to "
            "(1 - max_shrink) times min-max; GPTQ uses 0.8"
        )
    if not norm > 0:
        raise ValueError(f"norm must be positive, got {norm!r}: 2 is the squared error, GPTQ uses 2.4")
    xmin, xmax = block_min_max(x, spec)
    best_err = torch.full_like(xmin, math.inf)
    best_p = torch.ones_like(xmin)
    for p in shrink_factors(grid, max_shrink):
        x_hat = quantize_tensor(x, spec, p * xmin, p * xmax).dequantize()
        err = block_error(x, x_hat, spec, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, p, best_p)
    return best_p * xmin, best_p * xmax


# ---------------------------------------------------------------------------------------------
# KL divergence (TensorRT's entropy calibration)


def abs_histogram(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, float]:
    """Histogram of |x| over [0, max|x|] in `bins` equal bins.

    x: any shape, float, with max|x| > 0. Returns (counts float64 [bins], bin width). Bin k holds
    k*width <= |x| < (k+1)*width; max|x| falls in the last bin. Counts come from bincount, exact
    for any number of elements.
    """
    a = x.abs().flatten()
    width = a.max().item() / bins
    index = (a / width).long().clamp_(max=bins - 1)
    return torch.bincount(index, minlength=bins).double(), width


def clipping_kl(hist: torch.Tensor, i: int, levels: int) -> float:
    """KL(P || Q) of clipping the histogram at bin i (threshold = i * width) onto `levels` levels.

    hist: [bins] counts of |x| (computed in float64); levels <= i <= bins.
    P: the first i bins, with all the mass beyond folded into bin i-1 (those values saturate).
    Q: the first i bins *before* folding, merged into `levels` runs of neighbouring bins (bin k
       joins level floor(k * levels / i), so run lengths differ by at most one) and expanded
       back: each run's count is spread evenly over its non-empty bins, empty bins stay empty.
       Q is what remains of the clipped distribution after quantization, and it lacks the
       clipped mass: that is what makes clipping cost something. (Merging the folded P instead
       would give Q = P at i = levels, one bin per level, so the smallest threshold would always
       win with KL = 0.)
    A bin where P > 0 and Q = 0 (bin i-1 empty before folding, when the threshold sits in a gap
    between the bulk and rare outliers) gets one pseudo-count in Q, so KL is large but finite.
    NVIDIA's pytorch-quantization scores such thresholds infinite, which makes the search jump
    over the gap to the outliers themselves.
    """
    hist = hist.double()
    p = hist[:i].clone()
    p[-1] += hist[i:].sum()
    level = torch.arange(i) * levels // i  # the level each bin merges into
    nonempty = hist[:i] > 0
    run_count = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, hist[:i])
    run_nonempty = torch.zeros(levels, dtype=torch.float64).index_add_(0, level, nonempty.double())
    q = torch.where(nonempty, run_count[level] / run_nonempty[level].clamp(min=1), 0.0)
    support = p > 0
    q = torch.where(support & (q == 0), 1.0, q)
    p, q = p[support] / p.sum(), q[support] / q.sum()
    return (p * (p / q).log()).sum().item()  # KL(P||Q) = sum P log(P / Q)


def kl_range(x: torch.Tensor, bits: int = 8, bins: int = 2048) -> Range:
    """Per-tensor symmetric range (-T, T) whose int`bits` quantization loses the least information.

    The candidates are the bin edges T = i * width for i = levels ... bins, levels = 2^(bits-1)
    (the magnitudes a signed grid can tell apart: 128 for int8); each is scored by
    `clipping_kl` and the smallest KL wins. Starting at i = levels gives every level at least one
    bin, so T >= levels / bins * max|x| (max/16 for int8 with 2048 bins); more bins allow
    smaller thresholds. The zero bin is used as it is (NVIDIA's pytorch-quantization copies bin 1
    into bin 0 to tame the spike of ReLU zeros).

    x: any shape, float (typically activations collected from calibration batches).
    Returns float32 0-dim tensors (-T, T) for `quantize_tensor` with a per-tensor symmetric spec.
    """
    x = check_tensor(x, "x").float()
    check_bits(bits)
    levels = 2 ** (bits - 1)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < levels:
        raise ValueError(
            f"bins must be an integer >= {levels} (one bin per level of int{bits}), got {bins!r}; "
            "TensorRT uses 2048"
        )
    if x.numel() == 0 or not x.abs().max() > 0:
        zero = torch.zeros(())
        return zero, zero
    hist, width = abs_histogram(x, bins)
    kl = torch.tensor([clipping_kl(hist, i, levels) for i in range(levels, bins + 1)])
    t = torch.tensor((int(kl.argmin()) + levels) * width, dtype=torch.float32)
    return -t, t


# ---------------------------------------------------------------------------------------------
# Observers: ranges of activations that arrive one batch at a time


class MinMaxObserver:
    """Running min and max of every batch seen: the min-max range of all calibration data.

    per_channel=False: one (min, max) for the whole tensor, shape []. per_channel=True: one per
    feature (the last dimension), shape [features]. Statistics are float32.
    """

    def __init__(self, per_channel: bool = False):
        self.per_channel = per_channel
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch x: [..., features] float into the statistics."""
        batch_min, batch_max = self.batch_range(x)
        if self.min_val is None:
            self.min_val, self.max_val = batch_min, batch_max
        else:
            self.min_val, self.max_val = self.combine(batch_min, batch_max)

    def batch_range(self, x: torch.Tensor) -> Range:
        """(min, max) of one batch: shapes [] or [features], float32."""
        x = check_tensor(x, "batch").float()
        if x.numel() == 0 or (self.per_channel and x.dim() == 0):
            raise ValueError(
                f"a batch must hold values along a feature dimension, got shape {tuple(x.shape)}"
            )
        if self.per_channel and self.min_val is not None and x.shape[-1] != self.min_val.shape[0]:
            raise ValueError(
                f"this observer has seen batches with {self.min_val.shape[0]} features (last dimension), "
                f"got shape {tuple(x.shape)}: use one observer per tensor"
            )
        if not self.per_channel:
            return x.amin(), x.amax()
        rows = x.reshape(-1, x.shape[-1])
        return rows.amin(dim=0), rows.amax(dim=0)

    def combine(self, batch_min: torch.Tensor, batch_max: torch.Tensor) -> Range:
        """New statistics from the current ones and one batch's: the running extremes."""
        return torch.minimum(self.min_val, batch_min), torch.maximum(self.max_val, batch_max)

    def range(self) -> Range:
        """(xmin, xmax) float32, shape [] or [features]."""
        if self.min_val is None:
            raise RuntimeError(
                f"{type(self).__name__} has no statistics yet: call update(batch) on at least one "
                "calibration batch before asking for its range"
            )
        return self.min_val, self.max_val

    def scale_zero_point(self, bits: int = 8, symmetric: bool = False) -> Range:
        """(scale, zero point) float32 of the observed range, as `affine.scale_zero_point`."""
        return scale_zero_point(*self.range(), bits, symmetric)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (torch.ao's observer of the same name).

    The first batch sets the statistics; every later one moves them a fraction `momentum`
    towards its own:  min <- min + momentum * (batch_min - min), the same for max.
    One batch of outliers then shifts the range by only `momentum` of its excess.
    """

    def __init__(self, momentum: float = 0.01, per_channel: bool = False):
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}: 0.01 averages over ~100 batches")
        super().__init__(per_channel)
        self.momentum = momentum

    def combine(self, batch_min: torch.Tensor, batch_max: torch.Tensor) -> Range:
        """The statistics moved `momentum` of the way towards this batch's."""
        return (
            self.min_val + self.momentum * (batch_min - self.min_val),
            self.max_val + self.momentum * (batch_max - self.max_val),
        )


# ---------------------------------------------------------------------------------------------
# Comparing methods


def quantization_mse(x: torch.Tensor, spec: AffineSpec, xmin: torch.Tensor, xmax: torch.Tensor) -> float:
    """Mean of (x - x_hat)^2 when x is quantized with the given per-block range."""
    x_hat = quantize_tensor(x, spec, xmin, xmax).dequantize()
    return (x.float() - x_hat).pow(2).mean().item()


def compare_ranges(x: torch.Tensor, spec: AffineSpec, percentile: float = 99.99) -> dict[str, float]:
    """Quantization MSE of x under each calibration method, for one spec.

    Keys "minmax", "percentile", "mse" (each method with its defaults, MSE search with GPTQ's
    norm 2.4) and, for a per-tensor symmetric spec only, "kl" (TensorRT's method is defined for
    that case).
    """
    ranges = {
        "minmax": minmax_range(x, spec),
        "percentile": percentile_range(x, spec, percentile),
        "mse": mse_range(x, spec),
    }
    if spec.granularity == "tensor" and spec.symmetric:
        ranges["kl"] = kl_range(x, spec.bits)
    return {name: quantization_mse(x, spec, xmin, xmax) for name, (xmin, xmax) in ranges.items()}
