"""NF4 seen from the data's side: how weights fill a 4-bit code book, and what a better one would be.

nf4.py holds the formats (code books, blockwise quantization, double quantization) byte for byte
as bitsandbytes stores them. This module holds the measurements lesson 03 makes with them.

Every format of the lesson divides a block of weights by its absmax, so what the code book
sees is x = w / absmax in [-1, 1], and each x goes to its nearest code value (the cell between
the two midpoints around it). Three questions about a code book c_0 < ... < c_{k-1}:

- Occupancy: which fraction of the x falls in each cell? A table whose cells are equally full
  carries the most information per code: the entropy -sum p_j log2 p_j of the code stream
  reaches log2(16) = 4 bits only when every p_j = 1/16. That is the sense of QLoRA's claim that
  NF4 is "information-theoretically optimal" for normal data: its values are quantiles of a
  normal distribution, so for x ~ N(0, sigma^2) with the right sigma every code is used about
  equally often (`normal_bin_probabilities`, `nf4_sigma`).
- Mean squared error: equal occupancy is not the smallest error. The table with the least
  E[(x - c(x))^2] satisfies Lloyd's two conditions: each cell's boundaries are the midpoints
  of its neighbours (nearest-value rounding) and each value is the mean of the x in its cell.
  `lloyd_max` iterates the two to a fixed point; `lloyd_max_code_book` fits it to a weight
  matrix, weighting each x by its block's absmax^2 so that the error is counted in weight units.
- Normality itself: `normal_qq` gives the points of a QQ plot against N(0, 1), and
  `excess_kurtosis` sums up how heavy the tails are (0 for a normal distribution).

`fake_quantize_code_book` runs bitsandbytes' blockwise scheme with any table, with or without
double quantization of the absmax, so that INT4 (k / 7), FP4, NF4 and a fitted table are
compared on exactly the same blocks.
"""

import math

import torch

from .affine import check_tensor
from .formats import NF4_OFFSET
from .nf4 import (
    check_blocksize,
    check_weight,
    double_dequantize,
    double_quantize,
    fp4_code_book,
    nearest_code_4bit,
    nf4_code_book,
    scale_blocks,
)

CODE_BOOK_NAMES = ("nf4", "fp4", "int4")


def int4_code_book() -> torch.Tensor:
    """Symmetric INT4 in the absmax frame: k / 7 for k = -7..7, float32 [15], sorted.

    The 16th code of a signed 4-bit integer, -8, would lie outside [-1, 1] and is never used.
    """
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def code_book(name: str) -> torch.Tensor:
    """The distinct values of a 4-bit format, sorted ascending, float32: "nf4" [16], "fp4" [15]
    (bitsandbytes' FP4 holds 0 twice, as +0 and -0), "int4" [15]."""
    if name == "nf4":
        return nf4_code_book()
    if name == "fp4":
        return torch.unique(fp4_code_book())  # sorted; -0.0 and 0.0 are one value
    if name == "int4":
        return int4_code_book()
    raise ValueError(f"unknown code book {name!r}; choose one of {', '.join(CODE_BOOK_NAMES)}")


def check_code(code: torch.Tensor) -> torch.Tensor:
    """A 1-D float tensor of at least 2 distinct values, sorted ascending, within [-1, 1]."""
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not code.is_floating_point():
        raise TypeError("code must be a 1-D float tensor of code values, e.g. code_book('nf4')")
    if code.numel() < 2 or not bool((code.diff() > 0).all()):
        raise ValueError("code must hold at least 2 values, sorted ascending without repeats (use code_book(name))")
    if code.abs().max() > 1:
        raise ValueError(f"code values must lie in [-1, 1] (the absmax frame), got a maximum |c| of {code.abs().max():.4g}")
    return code


# ---------------------------------------------------------------- normality


def normal_qq(x: torch.Tensor, points: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a QQ plot of x against the standard normal distribution.

    x: any shape, float. The data are standardized, z = (x - mean) / std, and compared at the
    probabilities p_i = (i + 1/2) / points: theoretical Phi^-1(p_i) against the empirical
    p_i-quantile of z. Returns two float64 tensors [points]; for normal data they lie on the
    line y = x, heavier tails bend away from it at both ends.
    """
    check_tensor(x, "x")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    z = x.detach().reshape(-1).double()
    if z.numel() < 2 or z.std() == 0:
        raise ValueError("x needs at least 2 values that are not all equal to be compared with a normal distribution")
    z = ((z - z.mean()) / z.std()).sort().values
    p = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    position = p * (z.numel() - 1)  # linear interpolation between order statistics
    below = position.floor().long()
    above = (below + 1).clamp(max=z.numel() - 1)
    fraction = position - below
    return torch.special.ndtri(p), z[below] * (1 - fraction) + z[above] * fraction


def excess_kurtosis(x: torch.Tensor) -> float:
    """E[(x - mean)^4] / var^2 - 3 over all elements: 0 for a normal distribution, -1.2 for a
    uniform one, 3 for a Laplace one; a few large values make it large."""
    check_tensor(x, "x")
    centred = x.detach().reshape(-1).double()
    centred = centred - centred.mean()
    variance = centred.pow(2).mean()
    if variance == 0:
        raise ValueError("x is constant: its kurtosis is undefined")
    return (centred.pow(4).mean() / variance.pow(2) - 3).item()


def nf4_sigma(offset: float = NF4_OFFSET) -> float:
    """The standard deviation, in units of the block absmax, of the normal distribution whose
    quantiles NF4's values are: 1 / Phi^-1(offset) (about 0.541).

    build_nf4_codebook divides the quantiles Phi^-1(p) by the largest, Phi^-1(offset); so the
    values are the quantiles of N(0, sigma^2) with sigma = 1 / Phi^-1(offset).
    """
    if not 0.5 < offset < 1:
        raise ValueError(f"offset must lie strictly between 0.5 and 1, got {offset}")
    return 1 / torch.special.ndtri(torch.tensor(offset, dtype=torch.float64)).item()


# ---------------------------------------------------------------- occupancy


def code_cells(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (into the sorted code) of the nearest code value of each x: int64, shaped like x.

    Cells are bounded by the midpoints of neighbouring values; a value on a midpoint takes the
    lower one, as bitsandbytes rounds.
    """
    check_tensor(x, "x")
    check_code(code)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x.float(), midpoints.float())


def code_occupancy(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Fraction of the values of x whose nearest code value is each c_j: float64 [len(code)].

    x: any shape, already in the absmax frame (w / absmax of its block, `nf4.scale_blocks`);
    code: sorted distinct values (`code_book`). The fractions sum to 1.
    """
    if x.numel() == 0:
        raise ValueError("x is empty: there is no occupancy to measure")
    counts = torch.bincount(code_cells(x, code).reshape(-1), minlength=code.numel())
    return counts.double() / x.numel()


def occupancy_entropy(fractions: torch.Tensor) -> float:
    """Entropy of the code stream in bits, -sum p log2 p (empty cells count 0): log2(k) when all
    k codes are used equally, less otherwise. fractions: [k] summing to 1 (`code_occupancy`)."""
    if not isinstance(fractions, torch.Tensor) or fractions.dim() != 1:
        raise TypeError("fractions must be a 1-D tensor of probabilities, e.g. from code_occupancy")
    if fractions.min() < 0 or not math.isclose(fractions.sum().item(), 1, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got a sum of {fractions.sum().item():.6g}")
    p = fractions.double()
    p = p[p > 0]
    return -(p * p.log2()).sum().item()


def normal_bin_probabilities(code: torch.Tensor, sigma: float) -> torch.Tensor:
    """Probability of each code's cell for x ~ N(0, sigma^2) clamped to [-1, 1]: float64 [k].

    Values beyond +-1 land in the outermost cells (blockwise scaling never produces them, but a
    normal model does), so the probabilities sum to 1: P_j = Phi(b_{j+1} / sigma) - Phi(b_j / sigma),
    with b the midpoints between code values and b_0 = -inf, b_k = +inf.
    """
    check_code(code)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    midpoints = (code[:-1] + code[1:]).double() / 2
    edges = torch.cat([torch.tensor([-math.inf]), midpoints, torch.tensor([math.inf])]).double()
    return torch.special.ndtr(edges[1:] / sigma) - torch.special.ndtr(edges[:-1] / sigma)


# ---------------------------------------------------------------- any code book, blockwise


def fake_quantize_code_book(
    w: torch.Tensor, code: torch.Tensor, blocksize: int = 64, double_quant: bool = False
) -> torch.Tensor:
    """Quantize w to a code book on bitsandbytes' blocks and return the reconstruction.

    w: any shape, fp32/fp16/bf16, flattened row-major into blocks of `blocksize`; code: any
    table of values in [-1, 1] (unsorted and repeated values allowed, e.g. fp4_code_book()).
    Each value gets the nearest code of w / absmax; w_hat = code * absmax, where with
    double_quant the absmax is first stored as 8 bits and read back (nf4.double_quantize), as
    QLoRA does. For the NF4 and FP4 tables this is dequantize_4bit(quantize_4bit(w, ...)), for
    int4_code_book() it is nf4.int4_absmax. Returns float32 shaped like w.
    """
    check_weight(w)
    check_blocksize(blocksize)
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not code.is_floating_point():
        raise TypeError("code must be a 1-D float tensor of code values, e.g. code_book('nf4')")
    if not 2 <= code.numel() <= 256:
        raise ValueError(f"code must hold from 2 to 256 values, got {code.numel()}")
    n = w.numel()
    scaled, absmax = scale_blocks(w.reshape(-1), blocksize)
    codes = nearest_code_4bit(scaled, code.float())
    if double_quant:
        absmax = double_dequantize(*double_quantize(absmax))
    return (code.float()[codes.long()] * absmax.repeat_interleave(blocksize)[:n]).reshape(w.shape)


# ---------------------------------------------------------------- the MSE-optimal table


def lloyd_max(
    x: torch.Tensor,
    weights: torch.Tensor | None = None,
    levels: int = 16,
    iterations: int = 300,
    bins: int = 8192,
) -> torch.Tensor:
    """The `levels` values that minimize sum_i weights_i (x_i - nearest value)^2, by Lloyd's method.

    x: any shape, values in [-1, 1]; weights: same shape, non-negative (default 1). Returns
    float32 [levels], sorted. Starts from the weighted quantiles at (j + 1/2) / levels, then
    alternates the two optimality conditions: cells bounded by the midpoints of the current
    values, each value moved to the weighted mean of its cell. Each step lowers the error, so
    it converges to a fixed point (for a one-peaked density like a normal one, the optimum).

    To stay fast on millions of values, x is first summarized on a grid of `bins` equal cells of
    [-1, 1] (mass and weighted mean of each); a value can only be misassigned inside the one grid
    cell a midpoint crosses, 2 / bins wide.
    """
    check_tensor(x, "x")
    x = x.detach().reshape(-1).double()
    weights = torch.ones_like(x) if weights is None else weights.detach().reshape(-1).double()
    if weights.shape != x.shape or bool((weights < 0).any()):
        raise ValueError("weights must have one non-negative value per element of x")
    if x.numel() == 0 or x.abs().max() > 1:
        raise ValueError("x must be non-empty and lie in [-1, 1] (divide each block by its absmax first)")
    for name, value, low in (("levels", levels, 2), ("iterations", iterations, 1), ("bins", bins, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    cell = ((x + 1) / 2 * bins).long().clamp(0, bins - 1)
    mass = torch.zeros(bins, dtype=torch.float64).index_add_(0, cell, weights)
    moment = torch.zeros(bins, dtype=torch.float64).index_add_(0, cell, weights * x)
    used = mass > 0
    if used.sum() < levels:
        raise ValueError(f"x takes fewer than {levels} distinct values on the grid: fit fewer levels")
    atom, mass = moment[used] / mass[used], mass[used]  # sorted, since the grid cells are
    cumulative = mass.cumsum(0) / mass.sum()
    targets = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    values = atom[torch.searchsorted(cumulative, targets).clamp(max=atom.numel() - 1)]
    for _ in range(iterations):
        owner = torch.bucketize(atom, (values[:-1] + values[1:]) / 2)
        cell_mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, owner, mass)
        cell_moment = torch.zeros(levels, dtype=torch.float64).index_add_(0, owner, mass * atom)
        updated = torch.where(cell_mass > 0, cell_moment / cell_mass.clamp(min=1e-300), values).sort().values
        if torch.allclose(updated, values, rtol=0, atol=1e-9):
            break
        values = updated
    return updated.float()


def lloyd_max_code_book(w: torch.Tensor, blocksize: int = 64, levels: int = 16, iterations: int = 300) -> torch.Tensor:
    """The table of `levels` values with the least weight error for w's blocks: float32 [levels].

    w: any shape, fp32/fp16/bf16, in bitsandbytes' blocks of `blocksize`. Each x = w / absmax
    is weighted by absmax^2, because its error in weight units is absmax * (x - c): the table
    minimizes the mean squared error of fake_quantize_code_book(w, table, blocksize).
    """
    check_weight(w)
    check_blocksize(blocksize)
    scaled, absmax = scale_blocks(w.reshape(-1), blocksize)
    weights = absmax.double().pow(2).repeat_interleave(blocksize)[: scaled.numel()]
    return lloyd_max(scaled, weights, levels, iterations)
