"""GPTQ: quantize a weight column by column, and let the columns not yet quantized absorb the error.

Round-to-nearest (lesson 01) rounds every weight on its own. GPTQ (Frantar et al., 2022) asks
for the quantized weight Q that keeps the layer's *outputs* close on real inputs X [n, K]:

    minimize  ||X W^T - X Q^T||^2  =  sum over output rows r of  (w_r - q_r) H (w_r - q_r)^T,
    H = (2/n) X^T X   [K, K], the Hessian of that squared error (the same for every row).

Quantizing column j moves it by w_j - q_j. The optimal brain surgeon (OBS) answer to "how should
the columns that are still free move to compensate" is

    err   = (w_j - q_j) / [H^-1]_jj                  (one number per output row)
    W[:, j+1:] -= err * [H^-1]_{j, j+1:}              (every row, the same update direction)

after which column j leaves the problem: H^-1 loses row and column j by one step of Gaussian
elimination. `gptq_quantize_naive` is that loop, column by column, for the lesson.

Three observations make it fast (`gptq_quantize`):

1. Order: quantizing the columns in a fixed order (not OBQ's greedy order) works as well on
   large layers, and lets every row share the same sequence of eliminated inverses.
2. Cholesky: row j of the inverse, after columns 0..j-1 were eliminated, is row j of the upper
   Cholesky factor U of H^-1 (U^T U = H^-1) times U_jj. So U, computed once, holds every row the
   loop needs: err = (w_j - q_j) / U_jj, update err * U[j, j+1:].
3. Lazy batches: updates only reach columns right of j. Inside a block of 128 columns they are
   applied at once; columns right of the block receive the whole block's update as one matrix
   product Err [N, 128] @ U[block, end:], which is what makes the algorithm run at matmul speed.

Details that a faithful implementation gets right (IST-DASLab/gptq, gptq.py and quant.py):

- Dead inputs: an input that is zero on every calibration token has H_dd = 0. Its weights never
  affect the output; they are set to 0 and H_dd to 1, so H stays invertible.
- Damping: H + lambda * mean(diag H) * I, lambda = 0.01, keeps the inverse well conditioned. If
  the Cholesky factorization still fails, `gptq_quantize` retries with more damping and says so
  (a `DampingRetryWarning`; the damping used is in the result).
- act_order ("desc_act"): quantize columns in order of decreasing H_jj (the inputs with the most
  energy first, while many columns remain to absorb their error); the permutation is undone at
  the end, and g_idx records each input's group.
- Groups: a group's scale and zero point are chosen when the loop reaches the group's first
  column, from the weights as updated so far. With act_order that makes the groups follow the
  permuted order (g_idx is then a permutation-dependent map); static_groups instead fixes every
  group's parameters from the original W up front, so g_idx stays k // group_size.

The grid is lesson 01's (affine.py): asymmetric s = (max - min) / (2^b - 1) over a range that
includes 0, z = round(-min / s); symmetric s = max|w| / (2^(b-1) - 1). Every grid is stored
unsigned with a zero point, as GPTQ checkpoints do: a symmetric code c becomes c + 2^(b-1).
Two deliberate differences from the canonical code, both to keep the lesson's comparisons exact:

- quant.py's symmetric grid is s = 2 max|w| / (2^b - 1) with zero 2^(b-1): one more level and a
  slightly finer step, but the largest positive weight is clipped. Here GPTQ and RTN share one
  quantizer, so GPTQ with H = I *is* RTN, and the results table compares only the error feedback.
- gptq.py takes a group's range from W as it stood at the start of the current block of 128, so
  a group that starts inside a block misses the updates from that block's earlier columns. Here
  the range comes from the fully updated weights, and the blocked loop equals the column-by-column
  one exactly (tests/test_gptq.py). With groups of 128 aligned to blocks the two agree.

The driver `gptq_model` runs the whole model with the layer-by-layer runner (surgery.py): each
decoder layer is calibrated on the outputs of the already quantized layers before it.
`save_gptq` / `load_gptq` write and read the GPTQ checkpoint layout (AutoGPTQ "v1").
"""

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantcourse.surgery import first_layer_inputs, run_layer_by_layer, set_module

from .affine import AffineSpec, check_tensor, quantize, scale_zero_point
from .packing import INT32_BITS, pack_int32, unpack_int32

DAMP = 0.01  # lambda: damping as a fraction of mean(diag H)
DAMP_RETRIES = (0.01, 0.03, 0.1, 0.3, 1.0)  # tried in turn, above the requested one, if Cholesky fails
BLOCK_SIZE = 128


class DampingRetryWarning(UserWarning):
    """The Cholesky factorization failed at the requested damping and succeeded at a higher one."""


# ---------------------------------------------------------------------------------------------
# The Hessian


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Add a batch of inputs to H = (2/n) sum_t x_t x_t^T, the mean over all tokens seen so far.

    H: [K, K] float32 (zeros to start), updated in place; x: [..., K] float, one token per row;
    n: tokens seen so far. Returns (H, n + tokens in x). The running rescale H * n/(n+b) keeps H
    a mean whatever the batch sizes. (IST-DASLab's counts sequences instead of tokens: H differs by
    a constant factor, which changes nothing, since damping is relative to mean(diag H).)
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1] or x.shape[-1] != H.shape[0]:
        raise ValueError(f"x must be [..., K] for H of shape [K, K]; got x {tuple(x.shape)}, H {tuple(H.shape)}")
    x = x.reshape(-1, x.shape[-1]).to(H.dtype)
    b = x.shape[0]
    H.mul_(n / (n + b))
    n += b
    x = math.sqrt(2 / n) * x
    H.addmm_(x.T, x)
    return H, n


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead inputs and damping, on copies: returns (H damped [K, K], W [N, K], dead [K] bool).

    Where H_dd = 0 (input d was zero on every token): H_dd = 1 and W[:, d] = 0. Then
    H += damp * mean(diag H) * I.
    """
    H, W = H.clone(), W.clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * H.diagonal().mean())
    return H, W, dead


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1), the only form of the inverse GPTQ needs.

    H: [K, K] symmetric positive definite. Raises torch.linalg.LinAlgError when it is not
    (numerically), which damping cures.
    """
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def check_hessian(H: torch.Tensor, K: int) -> None:
    """H must be a finite [K, K] float matrix with a non-negative diagonal."""
    if not isinstance(H, torch.Tensor) or not H.is_floating_point():
        raise TypeError(f"H must be a float torch.Tensor, got {getattr(H, 'dtype', type(H).__name__)}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square [K, K] matrix, got shape {tuple(H.shape)}")
    if H.shape[0] != K:
        raise ValueError(f"H is {H.shape[0]} x {H.shape[0]} but W has K = {K} input columns: use the Hessian of this layer's inputs")
    if not torch.isfinite(H).all():
        raise ValueError(
            "H has NaN or inf entries: a calibration input contained NaN/inf (or overflowed). "
            "Check the activations reaching this layer before quantizing it."
        )
    if (H.diagonal() < 0).any():
        raise ValueError("H has a negative diagonal entry; (2/n) X^T X never does. Build H with accumulate_hessian.")


# ---------------------------------------------------------------------------------------------
# The quantizer: one grid per output row, for a group of columns (or all of them)


def check_spec(spec: AffineSpec, K: int) -> None:
    """GPTQ quantizes a Linear weight [N, K]: per tensor, per output row, or in whole groups along K,
    with integer zero points (the checkpoint layout has no float zero point)."""
    if not isinstance(spec, AffineSpec):
        raise TypeError(f"spec must be an AffineSpec, got {type(spec).__name__}")
    if spec.zero_point != "integer":
        raise ValueError("GPTQ stores integer zero points: use zero_point='integer' (the Q4_1 float zero is lesson 09's)")
    if spec.granularity == "channel" and spec.axis not in (0, -2):
        raise ValueError("per-channel GPTQ uses axis=0: one scale per output row of W [N, K]")
    if spec.granularity == "group" and K % spec.group_size:
        fits = [g for g in (32, 64, 128) if K % g == 0]
        raise ValueError(
            f"group_size {spec.group_size} does not divide K = {K}: GPTQ's groups must be whole. "
            f"Choose a divisor of {K} ({', '.join(map(str, fits)) or 'another size'})."
        )


def grid_params(w: torch.Tensor, spec: AffineSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of w [N, m] (a group of columns, or all of them).

    Per tensor, one pair from all of w, repeated per row. Returns (scale [N], zero [N]) float32;
    zero is on the unsigned grid 0..2^b-1 (a symmetric grid's zero is 2^(b-1)).
    """
    if spec.granularity == "tensor":
        xmin, xmax = w.min().expand(w.shape[0]), w.max().expand(w.shape[0])
    else:
        xmin, xmax = w.min(dim=1).values, w.max(dim=1).values
    scale, zero = scale_zero_point(xmin, xmax, spec.bits, spec.symmetric)
    if spec.symmetric:
        zero = zero + 2 ** (spec.bits - 1)
    return scale, zero


def quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: AffineSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round one column w [N] to its rows' grids: codes [N] uint8 and their values q [N] in w's dtype.

    codes = clamp(round(w / s) + z, 0, 2^b - 1); q = s * (codes - z).
    """
    codes = quantize(w, scale, zero, spec.bits, signed=False, rounding=spec.rounding)
    return codes, (scale * (codes.float() - zero)).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# Column order and groups, shared by both versions of the algorithm


@dataclass(frozen=True)
class GPTQResult:
    """A weight quantized by GPTQ, in the original column order.

    Q: [N, K] float32, the quantized weight (codes times float32 scales). codes: [N, K] uint8 on
    the unsigned grid. scales: [G, N] float32; zeros: [G, N] float32 (integers); G = K / group
    size, or 1 per channel / per tensor. g_idx: [K] int32, the group of each input column.
    perm: [K] int64, the order the columns were quantized in (act_order), else None.
    damp: the damping used (above the requested one if Cholesky failed). loss: sum of err^2 / 2,
    which equals trace((W - Q) H (W - Q)^T) / 2 with the damped H, i.e. ~ ||X W^T - X Q^T||^2 / n.
    """

    Q: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    spec: AffineSpec
    damp: float
    loss: float


@dataclass
class _Problem:
    """W and H in processing order, and where each processed column takes its grid from."""

    W: torch.Tensor  # [N, K], dead inputs zeroed, columns permuted by perm
    H: torch.Tensor  # [K, K] damped, permuted
    perm: torch.Tensor | None
    group: list[int]  # the group of the column processed at each position
    scales: torch.Tensor  # [G, N] float32: filled up front (fixed grids), or as the loop reaches each group
    zeros: torch.Tensor
    group_size: int | None  # set when a group's grid is chosen as the loop reaches its first column
    damp: float

    def starts_group(self, j: int) -> bool:
        return self.group_size is not None and j % self.group_size == 0


def compute_dtype(W: torch.Tensor) -> torch.dtype:
    """float64 if W is (for exact tests), else float32: GPTQ's own precision (never TF32)."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def setup_problem(
    W: torch.Tensor, H: torch.Tensor, spec: AffineSpec, act_order: bool, static_groups: bool, damp: float
) -> _Problem:
    """Check the inputs, zero dead inputs, damp H, fix the order and the fixed grids."""
    check_tensor(W, "W")
    if W.dim() != 2:
        raise ValueError(f"W must be a Linear weight [N, K], got shape {tuple(W.shape)}")
    N, K = W.shape
    check_spec(spec, K)
    check_hessian(H, K)
    if static_groups and spec.granularity != "group":
        raise ValueError("static_groups fixes the grid of each group up front: it needs granularity='group'")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp is a fraction of mean(diag H), e.g. 0.01; got {damp!r}")
    dtype = compute_dtype(W)
    H, W, _ = prepare_hessian(H.to(dtype), W.detach().to(dtype), damp)
    size = spec.group_size if spec.granularity == "group" else K  # columns per group
    scales = torch.zeros(K // size, N, dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    dynamic = spec.granularity == "group" and not static_groups
    # Per tensor, per channel, static groups: every grid from the original W, dead inputs zeroed
    # (IST-DASLab takes a per-channel grid before zeroing them; weights that never meet a nonzero
    # input should not stretch the grid).
    if not dynamic:
        for g in range(K // size):
            scales[g], zeros[g] = grid_params(W[:, g * size : (g + 1) * size], spec)
    perm = None
    if act_order:  # the same damping on every diagonal entry keeps their order
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    # Dynamic groups are runs of consecutive *positions*; fixed ones belong to original columns.
    column = range(K) if dynamic or perm is None else perm.tolist()
    group = [k // size for k in column]
    return _Problem(W, H, perm, group, scales, zeros, size if dynamic else None, float(damp))


def finish(problem: _Problem, Q: torch.Tensor, codes: torch.Tensor, spec: AffineSpec, loss: float) -> GPTQResult:
    """Undo the permutation and package the result."""
    g_idx = torch.tensor(problem.group, dtype=torch.int32)
    if problem.perm is not None:
        inverse = torch.argsort(problem.perm)
        Q, codes = Q[:, inverse], codes[:, inverse]
        g_idx = g_idx[inverse.cpu()]
    return GPTQResult(
        Q.float().contiguous(), codes.contiguous(), problem.scales, problem.zeros,
        g_idx, problem.perm, spec, problem.damp, loss,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The algorithm, twice: column by column (the lesson), and blocked (the real one)


def gptq_quantize_naive(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: AffineSpec,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = DAMP,
) -> GPTQResult:
    """GPTQ one column at a time, keeping the inverse Hessian explicitly (OBQ's update, fixed order).

    W: [N, K] float (a Linear weight), H: [K, K] from `accumulate_hessian`; act_order,
    static_groups, damp as in `gptq_quantize` (no retry: a failed factorization raises).
    O(K^3 + N K^2): for the lesson and the tests; `gptq_quantize` computes the same, faster.
    """
    p = setup_problem(W, H, spec, act_order, static_groups, damp)
    W, N, K = p.W, *p.W.shape
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(p.H))
    Q, codes = torch.zeros_like(W), torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    loss = 0.0
    for j in range(K):
        g = p.group[j]
        if p.starts_group(j):
            p.scales[g], p.zeros[g] = grid_params(W[:, j : j + p.group_size], spec)
        w, d = W[:, j], Hinv[j, j]
        codes[:, j], Q[:, j] = quantize_column(w, p.scales[g], p.zeros[g], spec)
        err = (w - Q[:, j]) / d  # OBS: the best compensation moves the rest by -err * Hinv[j, :]
        W[:, j + 1 :] -= torch.outer(err, Hinv[j, j + 1 :])
        loss += ((w - Q[:, j]) ** 2 / d).sum().item() / 2
        Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / d  # column j leaves the problem
    return finish(p, Q, codes, spec, loss)


def damped_inverse_cholesky(
    W: torch.Tensor, H: torch.Tensor, spec: AffineSpec, act_order: bool, static_groups: bool, damp: float, name: str
) -> tuple[_Problem, torch.Tensor]:
    """`setup_problem` and `inverse_cholesky`, raising the damping while the factorization fails."""
    tries = [damp] + [d for d in DAMP_RETRIES if d > damp]
    for attempt, next_damp in zip(tries, tries[1:] + [None]):
        problem = setup_problem(W, H, spec, act_order, static_groups, attempt)
        try:
            return problem, inverse_cholesky(problem.H)
        except torch.linalg.LinAlgError:
            if next_damp is None:
                raise ValueError(
                    f"{name}: H is not positive definite even with damping {attempt} x mean(diag H). "
                    "Are the calibration inputs finite and is H built by accumulate_hessian?"
                ) from None
            warnings.warn(
                f"{name}: Cholesky factorization failed with damping {attempt}; retrying with {next_damp}",
                DampingRetryWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable")


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: AffineSpec,
    block_size: int = BLOCK_SIZE,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = DAMP,
    name: str = "W",
) -> GPTQResult:
    """GPTQ with the Cholesky form of the inverse and lazy batch updates (module doc).

    W: [N, K] float (a Linear weight, not modified), H: [K, K] float32 from `accumulate_hessian`.
    block_size: columns whose updates are applied together (128). act_order: quantize columns by
    decreasing H_jj. static_groups: every group's grid from the original W (needs groups).
    damp: lambda, as a fraction of mean(diag H). name: the layer, in messages.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (128 in GPTQ), got {block_size!r}")
    p, U = damped_inverse_cholesky(W, H, spec, act_order, static_groups, damp, name)
    # The loop works on W^T [K, N]: column j of W is row j, contiguous. (An outer-product update
    # of a column slice of a row-major W ran 100 to 1000 times slower here than one of rows.)
    Wt = p.W.T.contiguous()
    K, N = Wt.shape
    Qt, codes = torch.zeros_like(Wt), torch.zeros(K, N, dtype=torch.uint8, device=Wt.device)
    loss = 0.0
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            g = p.group[j]
            if p.starts_group(j):
                p.scales[g], p.zeros[g] = grid_params(current_rows(Wt, W1, Err1, U, i1, j, j + p.group_size).T, spec)
            w = W1[i]
            codes[j], Qt[j] = quantize_column(w, p.scales[g], p.zeros[g], spec)
            Err1[i] = (w - Qt[j]) / U1[i, i]
            W1[i + 1 :].addr_(U1[i, i + 1 :], Err1[i], alpha=-1)
        loss += (Err1**2).sum().item() / 2
        Wt[i2:] -= U[i1:i2, i2:].T @ Err1  # the block's updates reach the later columns at once
    return finish(p, Qt.T, codes.T, spec, loss)


def current_rows(Wt: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor, i1: int, j: int, end: int) -> torch.Tensor:
    """Columns j..end-1 of W (rows of Wt, in processing order; j in the block that starts at i1)
    as they stand now, every earlier column's update included: inside the block from W1; past
    it, Wt minus the updates the block has produced so far (Err1 is zero for the columns not yet
    quantized). Returns [end - j, N]."""
    i2 = i1 + W1.shape[0]
    inside = W1[j - i1 : min(end, i2) - i1]
    if end <= i2:
        return inside
    return torch.cat([inside, Wt[i2:end] - U[i1:i2, i2:end].T @ Err1])


# ---------------------------------------------------------------------------------------------
# A Linear holding a GPTQ-quantized weight


def is_sequential(g_idx: torch.Tensor, group_size: int | None) -> bool:
    """True when g_idx is just k // group_size (no act_order, or static groups): nothing to store."""
    K = g_idx.numel()
    expected = torch.arange(K) // (group_size or K)
    return torch.equal(g_idx.cpu().long(), expected)


class GPTQLinear(nn.Module):
    """A Linear whose weight GPTQ quantized, kept as a checkpoint stores it.

    Buffers: codes [N, K] uint8 (unsigned grid), scales [G, N] float16, zeros [G, N] uint8,
    g_idx [K] int32, bias [N] or None, and weight [N, K] float32, the dequantized weight it
    computes with: W[n, k] = scales[g, n] * (codes[n, k] - zeros[g, n]), g = g_idx[k], with the
    fp16 scales, so the model is exactly the one `save_gptq` writes and `load_gptq` reads.
    """

    def __init__(self, codes, scales, zeros, g_idx, bias, bits: int, group_size: int | None, symmetric: bool):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(torch.float16))
        self.register_buffer("zeros", zeros.to(torch.uint8))
        self.register_buffer("g_idx", g_idx.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("weight", dequantize_gptq(codes, self.scales, self.zeros, self.g_idx))

    @classmethod
    def from_result(cls, result: GPTQResult, bias: torch.Tensor | None = None) -> "GPTQLinear":
        spec = result.spec
        group = spec.group_size if spec.granularity == "group" else None
        return cls(result.codes, result.scales, result.zeros, result.g_idx, bias, spec.bits, group, spec.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def storage_bits(self) -> int:
        """b bits per weight, an fp16 scale per group and output, a b-bit zero point each when
        asymmetric (lesson 01's accounting), and 32 bits per input when g_idx is not k // group."""
        bits = self.codes.numel() * self.bits + self.scales.numel() * (16 + (0 if self.symmetric else self.bits))
        return bits + (0 if is_sequential(self.g_idx, self.group_size) else 32 * self.in_features)

    def weight_count(self) -> int:
        return self.codes.numel()

    def extra_repr(self) -> str:
        where = f"g{self.group_size}" if self.group_size else "per-channel"
        order = "" if is_sequential(self.g_idx, self.group_size) else ", act_order g_idx"
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} {'sym' if self.symmetric else 'asym'} {where}{order}"


def dequantize_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W [N, K] float32 = scales[g_idx] * (codes - zeros[g_idx]), computed as the W4A16 reference does.

    codes [N, K] uint8; scales [G, N] (fp16 in checkpoints); zeros [G, N]; g_idx [K] int.
    """
    g = g_idx.long()
    W_t = (codes.T.float() - zeros.float()[g]) * scales.float()[g]  # [K, N]: row k uses group g_idx[k]
    return W_t.T.contiguous()


# ---------------------------------------------------------------------------------------------
# The driver: the whole model, layer by layer


# The linear layers of a Llama decoder layer, in the order their inputs become available. The
# layers of one stage read the same input tensor, so they share one Hessian.
LLAMA_STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
CALIBRATION_WINDOWS = 128  # x 512 tokens from the calibration split (the paper: 128 x 2048)
CALIBRATION_LENGTH = 512
SMOLLM2_SPEC = AffineSpec(bits=4, symmetric=True, granularity="group", group_size=64)  # 576 = 9 x 64


@dataclass(frozen=True)
class GPTQOptions:
    """Everything `gptq_model` needs besides the model and the calibration windows.

    true_sequential: quantize the stages of a layer one after another, each calibrated on the
    outputs of the stages already quantized (o_proj sees quantized q, k, v); False: one pass
    collects every stage's inputs from the unquantized layer.
    """

    spec: AffineSpec = SMOLLM2_SPEC
    act_order: bool = False
    static_groups: bool = False
    damp: float = DAMP
    block_size: int = BLOCK_SIZE
    true_sequential: bool = True


class _StopLayer(Exception):
    """Raised by a hook once the last input a pass needs is recorded: the rest is not computed."""


@torch.no_grad()
def stage_hessians(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, stages: Iterable[tuple[str, ...]]) -> list[torch.Tensor]:
    """One Hessian per stage, from the inputs its first linear layer receives on every window.

    layer: a decoder layer; hidden: [n, L, hidden] its inputs; kwargs: its other arguments
    (first_layer_inputs). Each window's forward stops once the last stage's input is recorded.
    Returns [K, K] float32 per stage.
    """
    stages = list(stages)
    modules = [layer.get_submodule(stage[0]) for stage in stages]
    sums = [[torch.zeros(m.in_features, m.in_features, device=hidden.device), 0] for m in modules]

    def hook_for(i):
        def hook(module, args):
            sums[i][0], sums[i][1] = accumulate_hessian(sums[i][0], args[0].detach().float(), sums[i][1])
            if i == len(modules) - 1:
                raise _StopLayer

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        for h in hidden:
            try:
                layer(h[None], **kwargs)
            except _StopLayer:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return [H for H, _ in sums]


def gptq_model(model, windows: torch.Tensor, options: GPTQOptions = GPTQOptions(), progress: bool = True) -> dict[str, dict]:
    """Quantize every decoder linear layer of a Llama model with GPTQ, in place.

    windows: [n, L] int64 calibration token ids. Layer by layer (surgery.run_layer_by_layer):
    the Hessians of layer i come from the outputs of layers 0..i-1 already quantized, and each
    nn.Linear becomes a GPTQLinear. Returns, per layer name, {"damp", "loss", "seconds"}.
    """
    names = {module: name for name, module in model.named_modules()}
    _, kwargs = first_layer_inputs(model, windows[:1])  # the same for every window of length L
    chunks = [[stage] for stage in LLAMA_STAGES] if options.true_sequential else [list(LLAMA_STAGES)]
    report = {}

    def quantize_stage(layer: nn.Module, stage: tuple[str, ...], H: torch.Tensor) -> None:
        for name in stage:
            started = time.perf_counter()
            linear = layer.get_submodule(name)
            full_name = f"{names[layer]}.{name}"
            result = gptq_quantize(
                linear.weight, H, options.spec, options.block_size, options.act_order,
                options.static_groups, options.damp, name=full_name,
            )  # fmt: skip
            set_module(layer, name, GPTQLinear.from_result(result, linear.bias))
            report[full_name] = {"damp": result.damp, "loss": result.loss, "seconds": time.perf_counter() - started}

    def step(i: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        if options.true_sequential and is_llama_layer(layer):
            return sequential_llama_layer(layer, hidden, kwargs, lambda stage, H: quantize_stage(layer, stage, H))
        for chunk in chunks:
            for stage, H in zip(chunk, stage_hessians(layer, hidden, kwargs, chunk)):
                quantize_stage(layer, stage, H)
        return None  # the runner recomputes the layer's outputs

    run_layer_by_layer(model, windows, step, progress=progress)
    return report


def is_llama_layer(layer: nn.Module) -> bool:
    """Whether `sequential_llama_layer` can run this decoder layer: a Llama-style layer (two
    RMSNorms, attention with q, k, v, o and a gated MLP) whose forward it repeats."""
    parts = ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "mlp.act_fn", "mlp.down_proj")
    names = {name for name, _ in layer.named_modules()}
    return all(part in names for part in parts) and all(name in names for stage in LLAMA_STAGES for name in stage)


@torch.no_grad()
def sequential_llama_layer(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict, quantize_stage: Callable[[tuple[str, ...], torch.Tensor], None]
) -> torch.Tensor:
    """True-sequential GPTQ of one Llama decoder layer, computing every intermediate once.

    The generic path (`stage_hessians`) runs the layer again for every stage, up to that stage's
    input: 4 partial forwards plus the runner's full one. Here the layer's forward
    (LlamaDecoderLayer: x + attn(norm1(x)), then h + mlp(norm2(h)), mlp = down(act(gate) * up))
    is taken apart, and each stage's inputs come from the pieces already computed, with the
    stages before it quantized:

        q, k, v   <- norm1(x)
        o_proj    <- attention with the quantized q, k, v (recorded at o_proj's input)
        gate, up  <- norm2(h),  h = x + o_proj(that)  with o_proj quantized
        down_proj <- act(gate(.)) * up(.)             with gate and up quantized

    The same stages see the same inputs as in the generic path, so the result is the same (the
    tests compare them), in about a third of the time. hidden [n, L, d]: the layer's inputs, one
    window per row; kwargs: the layer's other arguments; quantize_stage(stage, H) replaces the
    stage's linear layers. Returns the quantized layer's outputs [n, L, d], equal to layer(hidden).
    """
    attention, mlp = layer.self_attn, layer.mlp
    stages = iter(LLAMA_STAGES)

    def calibrate(inputs: list[torch.Tensor]) -> None:
        H, n = torch.zeros(inputs[0].shape[-1], inputs[0].shape[-1], device=inputs[0].device), 0
        for x in inputs:
            H, n = accumulate_hessian(H, x.float(), n)
        quantize_stage(next(stages), H)

    normed = [layer.input_layernorm(x[None]) for x in hidden]
    calibrate(normed)
    attended = []  # o_proj's inputs, recorded by a hook: the attention output before the projection
    handle = attention.o_proj.register_forward_pre_hook(lambda module, args: attended.append(args[0]))
    try:
        for x in normed:
            attention(hidden_states=x, **kwargs)
    finally:
        handle.remove()
    normed.clear()
    calibrate(attended)
    residual = [x[None] + attention.o_proj(a) for x, a in zip(hidden, attended)]
    attended.clear()
    calibrate([layer.post_attention_layernorm(h) for h in residual])
    gated = []
    for h in residual:
        x = layer.post_attention_layernorm(h)
        gated.append(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    calibrate(gated)
    return torch.cat([h + mlp.down_proj(g) for h, g in zip(residual, gated)])


def gptq_layers(model) -> dict[str, GPTQLinear]:
    """The GPTQLinear modules of a model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GPTQLinear)}


# ---------------------------------------------------------------------------------------------
# The checkpoint: GPTQ's layout (AutoGPTQ "v1") in safetensors, with quantize_config.json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quantize_config.json"


def pack_gptq(layer: GPTQLinear) -> dict[str, torch.Tensor]:
    """A GPTQLinear's checkpoint tensors: qweight [K*b/32, N] int32 (codes of W^T packed along K,
    lowest bits first), qzeros [G, N*b/32] int32 (zero - 1, packed along N), scales [G, N]
    float16, g_idx [K] int32, and bias when there is one.

    v1 stores zero - 1 modulo 2^b: a zero point of 0 is written as 2^b - 1 and comes back with
    the same wrap-around (a loader that adds 1 without it would read 2^b).
    """
    b = layer.bits
    zeros_v1 = ((layer.zeros.to(torch.int16) - 1) % 2**b).to(torch.uint8)
    tensors = {
        "qweight": pack_int32(layer.codes.T.contiguous(), b),
        "qzeros": pack_int32(zeros_v1.T.contiguous(), b).T.contiguous(),
        "scales": layer.scales.contiguous(),
        "g_idx": layer.g_idx.contiguous(),
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.contiguous()
    return tensors


def quantize_config(layers: dict[str, GPTQLinear], options: GPTQOptions, calibration: dict | None = None) -> dict:
    """quantize_config.json as AutoGPTQ writes it (group_size -1: one group per row)."""
    bits = {layer.bits for layer in layers.values()}
    if len(bits) != 1:
        raise ValueError(f"a GPTQ checkpoint has one bit width; these layers have {sorted(bits)}")
    spec = options.spec
    return {
        "bits": bits.pop(),
        "group_size": spec.group_size if spec.granularity == "group" else -1,
        "damp_percent": options.damp,
        "desc_act": options.act_order,
        "static_groups": options.static_groups,
        "sym": spec.symmetric,
        "true_sequential": options.true_sequential,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "model_file_base_name": Path(WEIGHTS_FILE).stem,
        "meta": {"quantizer": "quantcourse", "block_size": options.block_size, "calibration": calibration or {}},
    }


def save_gptq(
    model, folder: str | Path, options: GPTQOptions, calibration: dict | None = None,
    floats: dict[str, torch.Tensor] | None = None,
) -> Path:  # fmt: skip
    """Write every GPTQLinear of `model` to folder/model.safetensors and folder/quantize_config.json.

    Tensor names are "<layer name>.qweight" etc. The rest of the model (embeddings, norms) is the
    reference model's and is not written, except `floats`: float tensors of the model, by their
    state-dict names, that the quantization changed outside its quantized layers (AWQ's scaled
    norm weights, `awq.save_awq`). They go into the same file and `load_gptq` copies them back.
    Returns the folder.
    """
    from safetensors.torch import save_file

    layers = gptq_layers(model)
    if not layers:
        raise ValueError("the model has no GPTQLinear layers: quantize it with gptq_model first")
    bad = [n for n, m in layers.items() if m.bits not in INT32_BITS]
    if bad:
        raise ValueError(f"GPTQ's int32 layout packs {INT32_BITS} bits; {bad[0]} has {layers[bad[0]].bits}")
    floats = floats or {}
    inside = [key for key in floats if key.rpartition(".")[0] in layers]
    if inside:
        raise ValueError(f"{inside[0]} belongs to a quantized layer, whose codes the checkpoint stores: pass only float modules' tensors")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{key}": t.cpu() for name, layer in layers.items() for key, t in pack_gptq(layer).items()}
    tensors.update({key: t.detach().cpu().contiguous() for key, t in floats.items()})
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "quant_method": "gptq"})
    config = quantize_config(layers, options, calibration)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


@torch.no_grad()
def restore_floats(model, floats: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model's parameters of the same state-dict names, in place.
    All names and shapes are checked first: on an error the model is left as it was."""
    parameters = dict(model.named_parameters())
    for key, t in floats.items():
        if key not in parameters:
            raise ValueError(f"the checkpoint holds {key}, which this model lacks: load it into the model it was quantized from")
        if parameters[key].shape != t.shape:
            raise ValueError(
                f"the checkpoint's {key} has shape {tuple(t.shape)}, the model's {tuple(parameters[key].shape)}: "
                "load it into the model it was quantized from"
            )
    for key, t in floats.items():
        parameters[key].copy_(t)


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [N, K] uint8 and zeros [G, N] uint8 from a layer's qweight and v1 qzeros."""
    qweight, qzeros = tensors["qweight"], tensors["qzeros"]
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    codes = unpack_int32(qweight, bits, K).T.contiguous()
    zeros_v1 = unpack_int32(qzeros.T.contiguous(), bits, N).T
    return codes, ((zeros_v1.to(torch.int16) + 1) % 2**bits).to(torch.uint8)


def load_gptq(folder: str | Path, model=None, triton: bool | None = None) -> dict[str, nn.Module]:
    """Read a GPTQ checkpoint; returns a module per layer name, and puts them into `model` if given.

    4-bit layers run through the W4A16 path: the Triton kernel (TritonW4A16Linear) when the
    tensors are on a GPU or `triton=True` (on CPU that needs TRITON_INTERPRET=1), else the torch
    reference W4A16Linear. Other widths become GPTQLinear (dequantized weight, any device).
    Float tensors stored beside the layers (`save_gptq`'s `floats`) are copied into `model`;
    without a model only the layers are read.
    """
    from safetensors.torch import load_file

    from .w4a16 import W4A16Linear

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{folder}: checkpoint_format {config['checkpoint_format']!r}; this loader reads AutoGPTQ's 'gptq' (v1 zeros)")
    bits, group = config["bits"], None if config["group_size"] == -1 else config["group_size"]
    anchor = None if model is None else next(model.parameters(), next(model.buffers(), None))
    device = torch.device("cpu") if anchor is None else anchor.device
    flat = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, part = key.rpartition(".")
        by_layer.setdefault(name, {})[part] = tensor
    linear_4bit = W4A16Linear
    if device.type == "cuda" if triton is None else triton:
        # imports triton: only when asked
        from quantcourse.kernels.w4a16 import TritonW4A16Linear

        linear_4bit = TritonW4A16Linear
    floats = {key: t for key, t in flat.items() if "qweight" not in by_layer[key.rpartition(".")[0]]}
    if model is not None:
        restore_floats(model, floats)
    modules = {}
    for name, t in by_layer.items():
        if "qweight" not in t:
            continue
        if bits == 4:
            modules[name] = linear_4bit.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t.get("bias"), group, "v1")
        else:
            codes, zeros = unpack_gptq(t, bits)
            modules[name] = GPTQLinear(codes, t["scales"], zeros, t["g_idx"], t.get("bias"), bits, group, config["sym"])
        if model is not None:
            set_module(model, name, modules[name])
    return modules
