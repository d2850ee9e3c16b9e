"""GPTQ seen from the outside: the measurements lesson 04 makes with gptq.py.

gptq.py holds the algorithm (the Hessian, the column loop in its naive and blocked forms, the
driver, the checkpoint). This module holds what the lesson measures about it:

- The inputs of a layer and their Hessian. `collect_layer_inputs` records what chosen linear
  layers receive and stops each forward pass as soon as it has them (the inputs of layer 5 do
  not need layers 6-29 or the output head); `hessian` is H = (2/n) X^T X.
- What H says before anything is quantized. Its eigenvalues (`spectrum`, with or without
  damping) and condition number: fewer calibration tokens than inputs (n < K) make H singular,
  which is what damping is for. And the share of a lone column's error that the other columns
  can cancel (`compensable_fraction`): quantizing column j alone with error e costs e^2 H_jj / 2
  in the quadratic objective; after the best compensation by all the other columns (OBS) it costs
  e^2 / (2 [H^-1]_jj), which is smaller whenever input j is correlated with the others:

      fraction_j = 1 - 1 / (H_jj [H^-1]_jj)      (0 when H is diagonal)

- The optimal brain surgeon update itself (`obs_update`): after column j is rounded with
  error e = w_j - q_j (one number per output row), every column moves by

      delta = -(e / [H^-1]_jj) [H^-1]_{j,:}          (delta_j = -e: column j lands on q_j)

  and `eliminated_row` shows why GPTQ needs only one Cholesky factor: once the columns before
  j are quantized, the inverse Hessian of the columns still free is the inverse of the trailing
  block H[j:, j:], and its first row is the row j of the upper Cholesky factor U of H^-1 (the
  factor gptq.py uses) times U_jj.
- The loop, replayed from its result (`error_trace`). GPTQ's errors err_j = (w_j - q_j) / U_jj,
  with w_j column j as the loop found it, satisfy W - Q = Err U (column j of the right side is
  the sum of the updates it received plus its own rounding), so the whole history of the loop
  follows from the result by one triangular solve: the state of W when the loop reaches column
  j, and each column's share of the loss, err_j^2 / 2 summed over rows. It also shows why the
  loss is the quadratic objective: U^-1 U^-T = H, so sum(Err^2) = trace((W-Q) H (W-Q)^T).
- The order of the columns. OBQ (Frantar and Alistarh, 2022, "Optimal Brain Compression") quantizes
  the weights of each row greedily, always the one that adds the least loss next; each row then
  has its own order and its own inverse Hessian to eliminate, O(N K^3) work. `obq_quantize` does
  that (per-channel or per-tensor grids), so the lesson can compare it with GPTQ's one order for
  all rows.
- Lazy batches (`update_costs`). The number of multiply-adds does not depend on the block size;
  the memory traffic does: without blocks every column's update reads and writes all the columns
  after it; with blocks of B only the block's own columns are touched column by column, and the
  rest of W is read and written once per block.
- Errors: `quadratic_loss` is GPTQ's objective for any quantized weight (RTN's too), computed
  with the damped H; `output_error` the relative error of the layer's outputs on any tokens
  (held-out ones included); `gap_closed` the share of RTN's perplexity increase a method removes.
"""

from dataclasses import dataclass

import torch
from torch import nn

from . import gptq
from .affine import AffineSpec

# ---------------------------------------------------------------------------------------------
# A layer's inputs and its Hessian


class _Collected(Exception):
    """Raised by a hook once every requested layer has received this window's input."""


@torch.no_grad()
def collect_layer_inputs(model: nn.Module, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """What the named modules receive on windows [n, L] int64: name -> [n*L, in_features] float32.

    The same as surgery.collect_inputs, but each window's forward pass stops as soon as every
    named module has seen its input, so the layers after the deepest one (and the output head,
    the most expensive single matmul of SmolLM2) are never computed.
    """
    if isinstance(names, str) or not names:
        raise ValueError("names must be a non-empty list of module names, such as ['model.layers.5.self_attn.q_proj']")
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise KeyError(f"not modules of this model: {unknown[:3]}; see dict(model.named_modules())")
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    pending: set[str] = set()

    def hook_for(name):
        def hook(module, args):
            if name in pending:  # a module called twice in one forward pass keeps its first input
                x = args[0].detach()
                recorded[name].append(x.reshape(-1, x.shape[-1]).float())
                pending.discard(name)
            if not pending:
                raise _Collected

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        for window in windows:
            pending.update(names)
            try:
                model(window[None], use_cache=False)
            except _Collected:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in recorded.items()}


def hessian(X: torch.Tensor) -> torch.Tensor:
    """H = (2/n) X^T X [K, K] in X's dtype, from inputs X [n, K] (gptq.accumulate_hessian)."""
    if X.dim() != 2 or not X.is_floating_point():
        raise ValueError(f"X must be a float matrix [tokens, K], got {X.dtype} of shape {tuple(X.shape)}")
    H = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
    return gptq.accumulate_hessian(H, X, 0)[0]


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H as GPTQ factorizes it: dead inputs set to 1 on the diagonal, plus damp * mean(diag H) * I."""
    gptq.check_hessian(H, H.shape[0])
    return gptq.prepare_hessian(H, H.new_zeros(1, H.shape[0]), damp)[0]


def spectrum(H: torch.Tensor, damp: float | None = None) -> torch.Tensor:
    """Eigenvalues of H [K], ascending, float64; of GPTQ's damped H if `damp` is given.

    H is symmetric positive semi-definite, so they are >= 0 up to rounding (a few tiny negative
    ones come from float32 accumulation when H is singular).
    """
    gptq.check_hessian(H, H.shape[0])
    M = H if damp is None else damped(H, damp)
    return torch.linalg.eigvalsh(M.double())


def condition_number(eigenvalues: torch.Tensor) -> float:
    """Largest over smallest eigenvalue; inf when the smallest is <= 0 (H singular)."""
    smallest, largest = eigenvalues.min().item(), eigenvalues.max().item()
    return largest / smallest if smallest > 0 else float("inf")


def compensable_fraction(H: torch.Tensor, damp: float = gptq.DAMP) -> torch.Tensor:
    """For each input j [K] float64: the share of a lone column's quadratic error that the best
    update of all the other columns cancels, 1 - 1 / (H_jj [H^-1]_jj), with GPTQ's damped H.

    It is the R^2 of predicting input j from the other inputs by least squares on the calibration
    tokens (uncentered; with damping, a ridge regression): for two inputs, H_01^2 / (H_00 H_11).
    """
    Hd = damped(H, damp).double()
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    return 1 - 1 / (Hd.diagonal() * Hinv.diagonal())


# ---------------------------------------------------------------------------------------------
# One step of the optimal brain surgeon, and the Cholesky rows


def obs_update(Hinv: torch.Tensor, j: int, error: torch.Tensor) -> torch.Tensor:
    """The OBS update of every column after column j is rounded: delta [N, K].

    Hinv: [K, K] the inverse Hessian of the columns still free (the damped H^-1 at the start);
    error: [N] w_j - q_j, per output row. delta = -(error / Hinv_jj) outer Hinv[j, :], so
    W + delta has column j equal to q_j and the other columns moved to minimize the quadratic
    objective with column j fixed.
    """
    if Hinv.dim() != 2 or Hinv.shape[0] != Hinv.shape[1] or error.dim() != 1:
        raise ValueError(f"Hinv must be [K, K] and error [N]; got {tuple(Hinv.shape)} and {tuple(error.shape)}")
    if not 0 <= j < Hinv.shape[0]:
        raise ValueError(f"j must be a column index from 0 to {Hinv.shape[0] - 1}, got {j}")
    return -torch.outer(error / Hinv[j, j], Hinv[j])


def eliminated_row(H: torch.Tensor, j: int) -> torch.Tensor:
    """Row j of the inverse Hessian once columns 0..j-1 are quantized and out of the problem:
    row 0 of (H[j:, j:])^-1, [K - j] float64. H: the (damped) Hessian, positive definite."""
    if not 0 <= j < H.shape[0]:
        raise ValueError(f"j must be a column index from 0 to {H.shape[0] - 1}, got {j}")
    return torch.linalg.inv(H[j:, j:].double())[0]


# ---------------------------------------------------------------------------------------------
# Errors


def quadratic_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, damp: float = gptq.DAMP) -> float:
    """GPTQ's objective for any quantized weight Q of W [N, K]: trace((W - Q) H (W - Q)^T) / 2
    with the damped H, i.e. about ||X W^T - X Q^T||^2 / n. Dead inputs (H_dd = 0) count nothing.

    It equals the `loss` gptq_quantize reports for its own Q, and puts RTN on the same scale.
    """
    if W.shape != Q.shape or W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W and Q must be [N, K] and H [K, K]; got {tuple(W.shape)}, {tuple(Q.shape)}, {tuple(H.shape)}")
    D = W.double() - Q.double()
    D[:, H.diagonal() == 0] = 0  # inputs that never carry a signal: their weights do not matter
    return (torch.trace(D @ damped(H, damp).double() @ D.T) / 2).item()


def output_error(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    """||X W^T - X Q^T|| / ||X W^T|| (Frobenius) on inputs X [n, K]: how much of the layer's
    output the quantization changes, on any tokens."""
    X, W = X.double(), W.double()
    return ((X @ (W - Q.double()).T).norm() / (X @ W.T).norm()).item()


def gap_closed(reference_ppl: float, rtn_ppl: float, ppl: float) -> float:
    """The share of RTN's perplexity increase that a method removes: (RTN - it) / (RTN - reference)."""
    if rtn_ppl == reference_ppl:
        raise ValueError("RTN's perplexity equals the reference's: there is no gap to close")
    return (rtn_ppl - ppl) / (rtn_ppl - reference_ppl)


# ---------------------------------------------------------------------------------------------
# The loop replayed from its result


@dataclass(frozen=True)
class ErrorTrace:
    """GPTQ's column loop, reconstructed. All in processing order (act_order's, if used), float64.

    W: [N, K] the start (dead inputs zeroed); Q: [N, K] the result; U: [K, K] the upper Cholesky
    factor of the damped H^-1; Err: [N, K] err_j = (w_j - q_j) / U_jj with w_j as the loop found
    it; perm: the processing order of the original columns (None: natural order).
    """

    W: torch.Tensor
    Q: torch.Tensor
    U: torch.Tensor
    Err: torch.Tensor
    perm: torch.Tensor | None

    def state(self, j: int) -> torch.Tensor:
        """W as the loop holds it when it reaches column j: [N, K]; columns < j quantized,
        columns >= j moved by every update so far, W[:, j:] - Err[:, :j] @ U[:j, j:]."""
        K = self.W.shape[1]
        if not 0 <= j <= K:
            raise ValueError(f"j must be from 0 (nothing quantized yet) to K = {K} (all done), got {j}")
        moved = self.W[:, j:] - self.Err[:, :j] @ self.U[:j, j:]
        return torch.cat([self.Q[:, :j], moved], dim=1)

    def column_loss(self) -> torch.Tensor:
        """Each column's share of the loss, err_j^2 / 2 summed over rows: [K]; they add up to the loss."""
        return (self.Err**2).sum(dim=0) / 2


def error_trace(W: torch.Tensor, H: torch.Tensor, result: gptq.GPTQResult) -> ErrorTrace:
    """The history of the loop that produced `result` from W [N, K] and H [K, K].

    W - Q = Err U with U upper triangular: column j of the right side is every update column j
    received from the columns before it plus its own rounding error. One triangular solve gives
    Err (for the naive and the blocked algorithm alike: they compute the same thing).
    """
    act_order = result.perm is not None
    p = gptq.setup_problem(W, H, result.spec, act_order, False, result.damp)  # the same W, H and order as the run
    U = gptq.inverse_cholesky(p.H.double())
    W0 = p.W.double()
    Q = result.Q.double() if result.perm is None else result.Q.double()[:, result.perm]
    Err = torch.linalg.solve_triangular(U, W0 - Q, upper=True, left=False)
    return ErrorTrace(W0, Q, U, Err, result.perm)


# ---------------------------------------------------------------------------------------------
# OBQ: a greedy order per row


@dataclass(frozen=True)
class OBQResult:
    """Q: [N, K] float32; codes: [N, K] uint8; order: [N, K] int64, the column each row quantized
    at each step; loss: the quadratic objective, as in GPTQResult."""

    Q: torch.Tensor
    codes: torch.Tensor
    order: torch.Tensor
    loss: float


OBQ_MAX_ELEMENTS = 2**26  # N * K^2: one inverse Hessian per row (64 M floats = 512 MB in float64)


def obq_quantize(W: torch.Tensor, H: torch.Tensor, spec: AffineSpec, damp: float = gptq.DAMP) -> OBQResult:
    """OBQ: in each row, quantize next the weight that adds the least loss, (w_j - q_j)^2 / [H^-1]_jj,
    apply the OBS update, eliminate j from that row's inverse Hessian; repeat K times.

    W: [N, K] float; H: [K, K]; spec: per-channel (axis 0) or per-tensor, whose grid is fixed
    from W before the loop (GPTQ's groups take their grid when one order reaches them, which a
    per-row order cannot share). Keeps N inverse Hessians [K, K]: for slices of a layer.
    """
    if spec.granularity == "group":
        raise ValueError(
            "OBQ orders each row's columns differently, but a group's grid is chosen when the loop reaches "
            "the group in one shared order: use granularity='channel' (or 'tensor') to compare orders"
        )
    p = gptq.setup_problem(W, H, spec, act_order=False, static_groups=False, damp=damp)
    W1 = p.W.clone()
    N, K = W1.shape
    if N * K * K > OBQ_MAX_ELEMENTS:
        raise ValueError(f"OBQ keeps one [K, K] inverse per row: N * K^2 = {N * K * K:,} numbers is too many; quantize a slice (fewer rows or columns)")
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(p.H)).expand(N, K, K).clone()
    scale, zero = p.scales[0], p.zeros[0]  # [N]: one grid per row
    Q, codes = torch.zeros_like(W1), torch.zeros(N, K, dtype=torch.uint8)
    order = torch.zeros(N, K, dtype=torch.int64)
    done = torch.zeros(N, K, dtype=torch.bool)
    rows = torch.arange(N)
    loss = 0.0
    for step in range(K):
        codes_now, q_now = gptq.quantize_column(W1.T, scale, zero, spec)  # every column rounded as it stands: [K, N]
        d = Hinv.diagonal(dim1=1, dim2=2)  # [N, K]
        added = torch.where(done, torch.inf, (W1 - q_now.T) ** 2 / d)
        j = added.argmin(dim=1)  # the cheapest weight of each row
        e, dj = W1[rows, j] - q_now.T[rows, j], d[rows, j]
        loss += (e**2 / dj).sum().item() / 2
        row_j = Hinv[rows, j].clone()  # [N, K]
        W1 -= (e / dj)[:, None] * row_j  # OBS: column j lands on q_j, the others compensate
        Hinv -= row_j[:, :, None] * row_j[:, None, :] / dj[:, None, None]  # j leaves each row's problem
        Q[rows, j], codes[rows, j] = q_now.T[rows, j], codes_now.T[rows, j]
        W1[rows, j] = Q[rows, j]
        done[rows, j] = True
        order[:, step] = j
    return OBQResult(Q.float(), codes, order, loss)


# ---------------------------------------------------------------------------------------------
# Lazy batches: work and memory traffic of the column updates


@dataclass(frozen=True)
class UpdateCost:
    """flops: multiply-adds x 2 of all the column updates; bytes: memory traffic of W and U for them."""

    flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        """flop per byte."""
        return self.flops / self.bytes


def update_costs(N: int, K: int, block_size: int, value_bytes: int = 4) -> UpdateCost:
    """Work and traffic of GPTQ's updates of a weight [N, K] in blocks of `block_size` columns.

    Every pair of columns i < k costs one multiply-add per row: flops = N K (K - 1), whatever
    the blocks. Traffic, assuming one block of W fits in fast memory (registers, shared memory,
    cache) and the whole of W does not: each block of b columns is read and written once, the
    columns after it are read and written once (Err1 @ U[block, rest]), and U's rows are read once:

        bytes = value_bytes * sum over blocks [2 N b + 2 N (K - end) + b (K - end) + b (b + 1) / 2]

    block_size = 1 is the loop without lazy batches: 2 N (K - j - 1) values per column j.
    """
    for name, value in (("N", N), ("K", K), ("block_size", block_size), ("value_bytes", value_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    values = 0
    for start in range(0, K, block_size):
        b = min(block_size, K - start)
        rest = K - start - b
        values += 2 * N * b + 2 * N * rest + b * rest + b * (b + 1) // 2
    return UpdateCost(flops=N * K * (K - 1), bytes=values * value_bytes)
