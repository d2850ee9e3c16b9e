"""Mutation catalog of lab 04: the hidden suite must fail plausible wrong versions of every graded
function (and name the mistake where the suite knows it) and pass other correct ones; the lab
notebook must hold together (points, outputs, the source at full marks, the student version at
zero); its given helpers must behave like the reference's; the bad inputs the suite feeds must
make the reference raise the exception types the suite expects.

All versions live in one notebook: the source notebook plus one cell per version, whose function
is renamed `gptq_quantize__no_propagation`. A single learner process serves them all and `aliases`
points the suite's `learner.gptq_quantize` at the version under test. A version calls the
notebook's correct functions (setup_problem, finish, ...) unless its mistake is in one of them, so
each mutant breaks one thing.
"""

import re
import types
from pathlib import Path

import nbformat
import pytest
import torch

from lab_catalog import (
    check_catalog_covers,
    check_full_marks,
    check_loses_points,
    check_reference_signatures,
    check_saved_without_outputs,
    check_solution_cells_hold_only,
    check_source_and_student_notebooks,
    check_test_cells_match_the_suite,
    grade_version,
    nbgrader_cells,
    suite_points,
    version,
    versions_sandbox,
)

from quantcourse.autograder import engine
from quantcourse.autograder.sandbox import LearnerError
from quantcourse.reference_impl import gptq

LAB = "04_gptq"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"


ACCUMULATE = '''
def accumulate_hessian(H, x, n):
    if CHECK:
        raise ValueError("x must be [..., K] for H [K, K]")
    tokens = x.reshape(-1, x.shape[-1]).to(H.dtype)
    b = COUNT
    H = H * RESCALE
    return H + FACTOR / DIVISOR * tokens.T @ tokens, N_OUT
'''
ACCUMULATE_RIGHT = {
    "CHECK": "H.dim() != 2 or H.shape[0] != H.shape[1] or x.shape[-1] != H.shape[0]", "COUNT": "tokens.shape[0]",
    "RESCALE": "(n / (n + b))", "FACTOR": "2", "DIVISOR": "(n + b)", "N_OUT": "n + b",
}  # fmt: skip

PREPARE = '''
def prepare_hessian(H, W, damp=0.01):
    H, W = H.clone(), W.clone()
    dead = H.diagonal() == 0
    BEFORE
    H[dead, dead] = DEAD_VALUE
    ZERO_W
    H.diagonal().add_(AMOUNT)
    return H, W, dead
'''
PREPARE_RIGHT = {"BEFORE": "pass", "DEAD_VALUE": "1", "ZERO_W": "W[:, dead] = 0", "AMOUNT": "damp * H.diagonal().mean()"}

COLUMN = '''
def quantize_column(w, scale, zero, spec):
    t = DIVIDE
    if spec.rounding == "half_even":
        r = EVEN
    elif spec.rounding == "half_away":
        r = AWAY
    else:
        RAISE
    codes = CLAMP.to(CODE_DTYPE)
    return codes, (Q).to(w.dtype)
'''
COLUMN_RIGHT = {
    "DIVIDE": "w.float() / scale", "EVEN": "torch.round(t)", "AWAY": "torch.sign(t) * torch.floor(t.abs() + 0.5)",
    "RAISE": 'raise ValueError("rounding must be half_even or half_away")', "CLAMP": "torch.clamp(r + zero, 0, 2**spec.bits - 1)",
    "CODE_DTYPE": "torch.uint8", "Q": "scale * (codes.float() - zero)",
}  # fmt: skip

SETUP = '''
def setup_problem(W, H, spec, act_order, static_groups, damp):
    CHECK
    N, K = W.shape
    dtype = compute_dtype(W)
    W_raw, H_raw = W.detach().to(dtype), H.to(dtype)
    H, W, _ = prepare_hessian(H_raw, W_raw, damp)
    size = spec.group_size if spec.granularity == "group" else K
    scales = torch.zeros(K // size, N, dtype=torch.float32)
    zeros = torch.zeros_like(scales)
    dynamic = spec.granularity == "group" and not static_groups
    perm = None
    if act_order:
        perm = torch.argsort(ORDER_KEY, descending=DESCENDING, stable=True)
    if FIXED:
        for g in range(K // size):
            scales[g], zeros[g] = grid_params(GRID_SOURCE[:, g * size : (g + 1) * size], spec)
    if perm is not None:
        W, H = PERMUTED
    column = range(K) if dynamic or perm is None else perm.tolist()
    group = [k // size for k in COLUMN]
    return _Problem(W, H, perm, group, scales, zeros, GROUP_SIZE, float(damp))
'''
SETUP_RIGHT = {
    "CHECK": "check_inputs(W, H, spec, static_groups, damp)", "ORDER_KEY": "H.diagonal()", "DESCENDING": "True",
    "FIXED": "not dynamic", "GRID_SOURCE": "W", "PERMUTED": "W[:, perm], H[perm][:, perm]", "COLUMN": "column",
    "GROUP_SIZE": "size if dynamic else None",
}  # fmt: skip

FINISH = '''
def finish(problem, Q, codes, spec, loss):
    g_idx = torch.tensor(problem.group, dtype=G_DTYPE)
    if problem.perm is not None:
        inverse = INVERSE
        Q, codes, g_idx = Q[:, inverse], codes[:, inverse], G_IDX
    return GPTQResult(Q_OUT, codes.contiguous(), problem.scales, problem.zeros, g_idx, problem.perm, spec, problem.damp, loss)
'''
FINISH_RIGHT = {"G_DTYPE": "torch.int32", "INVERSE": "torch.argsort(problem.perm)", "G_IDX": "g_idx[inverse]", "Q_OUT": "Q.float().contiguous()"}

NAIVE = '''
def gptq_quantize_naive(W, H, spec, act_order=False, static_groups=False, damp=0.01):
    p = setup_problem(W, H, spec, act_order, static_groups, damp)
    W, N, K = p.W, *p.W.shape
    Hinv = INVERSE
    W0 = W.clone()
    Q, codes = torch.zeros_like(W), torch.zeros(N, K, dtype=torch.uint8)
    loss = 0.0
    for j in range(K):
        g = p.group[j]
        if p.starts_group(j):
            p.scales[g], p.zeros[g] = grid_params(GRID_SOURCE[:, j : j + p.group_size], spec)
        w, d = W[:, j], DIVISOR
        codes[:, j], Q[:, j] = quantize_column(w, p.scales[g], p.zeros[g], spec)
        err = ERR
        W[:, j + 1 :] SIGN= torch.outer(err, Hinv[j, j + 1 :])
        loss += LOSS
        ELIMINATE
    return finish(p, Q, codes, spec, loss)
'''
NAIVE_RIGHT = {
    "INVERSE": "torch.cholesky_inverse(torch.linalg.cholesky(p.H))", "GRID_SOURCE": "W", "DIVISOR": "Hinv[j, j]",
    "ERR": "(w - Q[:, j]) / d", "SIGN": "-", "LOSS": "((w - Q[:, j]) ** 2 / d).sum().item() / 2",
    "ELIMINATE": "Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / d",
}  # fmt: skip

BLOCKED = '''
def gptq_quantize(W, H, spec, block_size=128, act_order=False, static_groups=False, damp=0.01, name="W"):
    if BLOCK_CHECK:
        raise ValueError("block_size must be a positive integer")
    p, U = FACTOR
    PRE
    Wt = p.W.T.contiguous()
    K, N = Wt.shape
    Qt, codes = torch.zeros_like(Wt), torch.zeros(K, N, dtype=torch.uint8)
    loss = 0.0
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            g = p.group[j]
            if p.starts_group(j):
                p.scales[g], p.zeros[g] = grid_params(ROWS.T, spec)
            codes[j], Qt[j] = quantize_column(W1[i], p.scales[g], p.zeros[g], spec)
            Err1[i] = (W1[i] - Qt[j]) / DIVISOR
            INBLOCK
        loss += LOSS
        PROPAGATE
    return finish(p, Qt.T, codes.T, spec, loss)
'''
BLOCKED_RIGHT = {
    "BLOCK_CHECK": "not isinstance(block_size, int) or block_size < 1",
    "FACTOR": "damped_inverse_cholesky(W, H, spec, act_order, static_groups, damp, name)", "PRE": "pass",
    "ROWS": "current_rows(Wt, W1, Err1, U, i1, j, j + p.group_size)", "DIVISOR": "U1[i, i]",
    "INBLOCK": "W1[i + 1 :] -= torch.outer(U1[i, i + 1 :], Err1[i])", "LOSS": "(Err1**2).sum().item() / 2",
    "PROPAGATE": "Wt[i2:] -= U[i1:i2, i2:].T @ Err1",
}  # fmt: skip


def accumulate_version(**changes):
    return version(ACCUMULATE, ACCUMULATE_RIGHT, **changes)


def prepare_version(**changes):
    return version(PREPARE, PREPARE_RIGHT, **changes)


def column_version(**changes):
    return version(COLUMN, COLUMN_RIGHT, **changes)


def setup_version(**changes):
    return version(SETUP, SETUP_RIGHT, **changes)


def finish_version(**changes):
    return version(FINISH, FINISH_RIGHT, **changes)


def naive_version(**changes):
    return version(NAIVE, NAIVE_RIGHT, **changes)


def blocked_version(**changes):
    return version(BLOCKED, BLOCKED_RIGHT, **changes)


def inverse_version(body: str) -> str:
    return f"\ndef inverse_cholesky(H):\n    {body}\n"


# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "accumulate_hessian": {
        "no_factor_two": (accumulate_version(FACTOR="1"), "no factor 2"),
        "no_rescale": (accumulate_version(RESCALE="1", DIVISOR="b"), "no running rescale"),
        "old_not_rescaled": (accumulate_version(RESCALE="1"), "the old H not rescaled"),
        "sum_not_mean": (accumulate_version(RESCALE="1", DIVISOR="1"), "a sum, not a mean"),
        "counts_sequences": (accumulate_version(COUNT="x.shape[0]"), "x.shape[0]"),
        "n_unchanged": (accumulate_version(N_OUT="n"), "returned n unchanged"),
        "no_shape_check": (accumulate_version(CHECK="False"), "ValueError"),
    },
    "prepare_hessian": {
        "absolute_damping": (prepare_version(AMOUNT="damp"), "damping lambda * I"),
        "max_damping": (prepare_version(AMOUNT="damp * H.diagonal().max()"), "lambda * max(diag H)"),
        "mean_before_dead": (prepare_version(BEFORE="mean = H.diagonal().mean()", AMOUNT="damp * mean"),
                             "mean of diag H taken before the dead entries"),
        "damped_before_dead": (prepare_version(BEFORE="H.diagonal().add_(damp * H.diagonal().mean())", AMOUNT="0"),
                               "damped before the dead entries were set"),
        "W_not_zeroed": (prepare_version(ZERO_W="pass"), "weights not zeroed"),
        "dead_left_zero": (prepare_version(DEAD_VALUE="0"), "dead H_dd left at 0"),
    },
    "inverse_cholesky": {
        "lower_factor": (inverse_version("return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)))"),
                         "the lower factor of H^-1"),
        "factor_of_H": (inverse_version("return torch.linalg.cholesky(H, upper=True)"), "upper Cholesky factor of H, not of H^-1"),
        "lower_factor_of_H": (inverse_version("return torch.linalg.cholesky(H)"), "lower Cholesky factor of H"),
        "full_inverse": (inverse_version("return torch.linalg.inv(H)"), "H^-1 itself"),
        "inverse_of_factor": (inverse_version("return torch.linalg.inv(torch.linalg.cholesky(H))"), "L^-1"),
        "inverse_of_factor_transposed": (inverse_version("return torch.linalg.inv(torch.linalg.cholesky(H)).T"), "L^-T"),
        "inverse_by_linalg_inv": (inverse_version("return torch.linalg.cholesky(torch.linalg.inv(H), upper=True)"), "torch.linalg.inv"),
        "pinv_fallback": ('''
def inverse_cholesky(H):
    try:
        L = torch.linalg.cholesky(H)
    except torch.linalg.LinAlgError:  # "robust": never fail
        return torch.linalg.pinv(H).triu()
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
''', "instead of raising"),
    },
    "quantize_column": {
        "floor": (column_version(EVEN="torch.floor(t)", AWAY="torch.floor(t)"), "floor instead of round"),
        "ignores_rounding": (column_version(AWAY="torch.round(t)"), "rounded half_even although spec.rounding is 'half_away'"),
        "zero_before_rounding": (column_version(EVEN="torch.round(t + zero) - zero"), "zero point added before rounding"),
        "no_clamp": (column_version(CLAMP="(r + zero)"), "no clamp"),
        "float64_division": (column_version(DIVIDE="w / scale"), "computed in w's dtype (float64)"),
        "four_bits": (column_version(CLAMP="torch.clamp(r + zero, 0, 15)"), "clamped to 0 .. 15"),
        "q_without_zero": (column_version(Q="scale * codes.float()"), "the zero point not subtracted"),
        "int64_codes": (column_version(CODE_DTYPE="torch.int64"), "returned dtype int64, expected uint8"),
        "no_rounding_check": (column_version(RAISE="r = torch.round(t)"), "instead of raising ValueError"),
    },
    "setup_problem": {
        "ascending": (setup_version(DESCENDING="False"), "sorted ascending"),
        "raw_order": (setup_version(ORDER_KEY="H_raw.diagonal()"), "diagonal of H before prepare_hessian"),
        "W_not_permuted": (setup_version(PERMUTED="W, H[perm][:, perm]"), "W's columns not permuted"),
        "H_rows_only": (setup_version(PERMUTED="W[:, perm], H[perm]"), "H permuted along its rows only"),
        "grids_before_zeroing": (setup_version(GRID_SOURCE="W_raw"), "before the dead inputs' weights were zeroed"),
        "static_grids_permuted": (setup_version(GRID_SOURCE="(W if perm is None else W[:, perm])"), "taken from the permuted W"),
        "static_by_position": (setup_version(COLUMN="range(K)"), "taken from the position j"),
        "dynamic_up_front": (setup_version(FIXED="True"), "filled in up front"),
        "group_size_always": (setup_version(GROUP_SIZE="size"), "group_size set for fixed grids"),
        "no_checks": (setup_version(CHECK="pass"), None),
    },
    "finish": {
        "not_undone": (finish_version(INVERSE="torch.arange(problem.perm.numel())"), "permutation not undone"),
        "perm_applied": (finish_version(INVERSE="problem.perm"), "applied again"),
        "g_idx_not_reordered": (finish_version(G_IDX="g_idx"), "g_idx left in processing order"),
        "Q_float64": (finish_version(Q_OUT="Q.contiguous()"), "returned dtype float64, expected float32"),
        "g_idx_int64": (finish_version(G_DTYPE="torch.int64"), "expected int32"),
    },
    "gptq_quantize_naive": {
        "H_not_inverted": (naive_version(INVERSE="p.H.clone()"), "H used where its inverse belongs"),
        "divides_by_H_jj": (naive_version(DIVISOR="p.H[j, j]"), "divided by H_jj"),
        "err_unscaled": (naive_version(ERR="w - Q[:, j]"), "the error not divided by"),
        "compensation_added": (naive_version(SIGN="+"), "added instead of subtracted"),
        "no_elimination": (naive_version(ELIMINATE="pass"), "H^-1 not updated after each column"),
        "original_grid": (naive_version(GRID_SOURCE="W0"), "grid taken from the original W"),
        "loss_unscaled": (naive_version(LOSS="((w - Q[:, j]) ** 2).sum().item() / 2"), "loss summed as (w - q)^2 / 2"),
        "loss_without_half": (naive_version(LOSS="((w - Q[:, j]) ** 2 / d).sum().item()"), "without the factor 1/2"),
    },
    "gptq_quantize": {
        "divides_by_Hinv_jj": (blocked_version(PRE="Hinv = torch.cholesky_inverse(torch.linalg.cholesky(p.H))", DIVISOR="Hinv[j, j]"),
                               "divided by [H^-1]_jj"),
        "divides_by_U_squared": (blocked_version(DIVISOR="U1[i, i] ** 2"), "divided by U_jj^2"),
        "divides_by_H_jj": (blocked_version(DIVISOR="p.H[j, j]"), "divided by H_jj instead of U_jj"),
        "no_in_block_updates": (blocked_version(INBLOCK="pass"), "in-block updates left out"),
        "in_block_off_by_one": (blocked_version(INBLOCK="W1[i + 2 :] -= torch.outer(U1[i, i + 2 :], Err1[i])"), "starts one column late"),
        "no_propagation": (blocked_version(PROPAGATE="pass"), "not propagated"),
        "propagation_off_by_one": (blocked_version(PROPAGATE="Wt[i2 + 1 :] -= U[i1:i2, i2 + 1 :].T @ Err1"), "propagated from column i2 + 1"),
        "group_at_block_start": (blocked_version(ROWS="Wt[j : j + p.group_size]"), "as it stood at the start of the block"),
        "loss_unscaled": (blocked_version(LOSS="((Err1 * U1.diagonal()[:, None]) ** 2).sum().item() / 2"), "without dividing by U_jj^2"),
        "no_damping_retry": (blocked_version(FACTOR="(lambda p: (p, inverse_cholesky(p.H)))(setup_problem(W, H, spec, act_order, static_groups, damp))"),
                             "LinAlgError"),
        "no_block_size_check": (blocked_version(BLOCK_CHECK="False"), "ValueError"),
    },
}  # fmt: skip

CORRECT = {
    "accumulate_hessian": {
        "weighted_average": '''
def accumulate_hessian(H, x, n):
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError("H must be [K, K]")
    if x.shape[-1] != H.shape[0]:
        raise ValueError("x must be [..., K]")
    x = x.reshape(-1, H.shape[0]).to(H.dtype)
    total = n + x.shape[0]
    return (n * H + 2 * x.T @ x) / total, total
''',
        "float64_inside": '''
def accumulate_hessian(H, x, n):
    if H.dim() != 2 or H.shape[0] != H.shape[1] or x.shape[-1] != H.shape[0]:
        raise ValueError("x must be [..., K] for H [K, K]")
    rows = x.reshape(-1, x.shape[-1]).to(H.dtype).double()  # H's precision first, then exact sums
    b = rows.shape[0]
    new = H.double() * (n / (n + b)) + torch.einsum("ti,tj->ij", rows, rows) * (2 / (n + b))
    return new.to(H.dtype), n + b
''',
    },
    "prepare_hessian": {
        "eye": '''
def prepare_hessian(H, W, damp=0.01):
    dead = torch.diagonal(H) == 0
    H = H + torch.diag(dead.to(H.dtype))  # the dead entries were 0: now 1
    W = W.masked_fill(dead[None, :], 0.0)
    return H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype), W, dead
''',
        "loop": '''
def prepare_hessian(H, W, damp=0.01):
    H, W = H.clone(), W.clone()
    dead = torch.zeros(H.shape[0], dtype=torch.bool)
    for d in range(H.shape[0]):
        if H[d, d] == 0:
            dead[d] = True
            H[d, d] = 1.0
            W[:, d] = 0.0
    shift = damp * torch.diagonal(H).mean()
    for d in range(H.shape[0]):
        H[d, d] += shift
    return H, W, dead
''',
    },
    "inverse_cholesky": {
        "float64_inside": inverse_version("return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.double())), upper=True).to(H.dtype)"),
        "lower_transposed": inverse_version("return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H))).mT.contiguous()"),
    },
    "quantize_column": {
        "where": '''
def quantize_column(w, scale, zero, spec):
    if spec.rounding not in ("half_even", "half_away"):
        raise ValueError(f"unknown rounding {spec.rounding!r}")
    t = w.to(torch.float32) / scale
    if spec.rounding == "half_away":
        r = torch.where(t >= 0, torch.floor(t + 0.5), -torch.floor(-t + 0.5))
    else:
        r = t.round()
    codes = (r + zero).clamp(min=0, max=(1 << spec.bits) - 1).to(torch.uint8)
    return codes, ((codes.to(torch.float32) - zero) * scale).to(w.dtype)
''',
        "min_max": '''
def quantize_column(w, scale, zero, spec):
    t = w.float() / scale
    modes = {"half_even": torch.round, "half_away": lambda v: v.sign() * (v.abs() + 0.5).floor()}
    if spec.rounding not in modes:
        raise ValueError("rounding must be 'half_even' or 'half_away'")
    q = modes[spec.rounding](t) + zero
    q = torch.minimum(torch.maximum(q, torch.zeros_like(q)), torch.full_like(q, 2**spec.bits - 1))
    codes = q.to(torch.uint8)
    return codes, (scale * (codes.float() - zero)).to(w.dtype)
''',
    },
    "setup_problem": {
        "sort_indices": '''
def setup_problem(W, H, spec, act_order, static_groups, damp):
    check_inputs(W, H, spec, static_groups, damp)
    N, K = W.shape
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    H, W, dead = prepare_hessian(H.to(dtype), W.detach().to(dtype), damp)
    size = K if spec.granularity != "group" else spec.group_size
    dynamic = spec.granularity == "group" and not static_groups
    grids = [grid_params(W[:, g * size:(g + 1) * size], spec) for g in range(K // size)] if not dynamic else []
    scales = torch.stack([s for s, _ in grids]) if grids else torch.zeros(K // size, N)
    zeros = torch.stack([z for _, z in grids]) if grids else torch.zeros(K // size, N)
    perm = torch.sort(H.diagonal(), descending=True, stable=True).indices if act_order else None
    if perm is not None:
        W = W.index_select(1, perm)
        H = H.index_select(0, perm).index_select(1, perm)
    if dynamic or perm is None:
        group = [j // size for j in range(K)]
    else:
        group = [int(k) // size for k in perm]
    return _Problem(W, H, perm, group, scales.float(), zeros.float(), size if dynamic else None, float(damp))
''',
        "grids_after_permuting": '''
def setup_problem(W, H, spec, act_order, static_groups, damp):
    check_inputs(W, H, spec, static_groups, damp)
    N, K = W.shape
    dtype = compute_dtype(W)
    H, W, _ = prepare_hessian(H.to(dtype), W.detach().to(dtype), damp)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    order = perm if perm is not None else torch.arange(K)
    W, H = W[:, order], H[order][:, order]
    position = torch.argsort(order)  # where each original column went
    size = spec.group_size if spec.granularity == "group" else K
    dynamic = spec.granularity == "group" and not static_groups
    scales, zeros = torch.zeros(K // size, N), torch.zeros(K // size, N)
    if not dynamic:  # each group's original columns, wherever they are now (min and max ignore the order)
        for g in range(K // size):
            scales[g], zeros[g] = grid_params(W[:, position[g * size:(g + 1) * size]], spec)
    group = [j // size for j in range(K)] if dynamic else [int(k) // size for k in order]
    return _Problem(W, H, perm, group, scales, zeros, size if dynamic else None, float(damp))
''',
    },
    "finish": {
        "scatter": '''
def finish(problem, Q, codes, spec, loss):
    group = torch.tensor(problem.group, dtype=torch.int32)
    if problem.perm is None:
        return GPTQResult(Q.float().contiguous(), codes.contiguous(), problem.scales, problem.zeros, group, None, spec, problem.damp, loss)
    Q_out, codes_out, g_idx = torch.empty_like(Q, dtype=torch.float32), torch.empty_like(codes), torch.empty_like(group)
    Q_out[:, problem.perm] = Q.float()  # position j holds input perm[j]
    codes_out[:, problem.perm] = codes
    g_idx[problem.perm] = group
    return GPTQResult(Q_out, codes_out, problem.scales, problem.zeros, g_idx, problem.perm, spec, problem.damp, loss)
''',
        "inverse_by_assignment": '''
def finish(problem, Q, codes, spec, loss):
    g_idx = torch.tensor(problem.group, dtype=torch.int32)
    perm = problem.perm
    if perm is not None:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        Q, codes, g_idx = Q.index_select(1, inverse), codes.index_select(1, inverse), g_idx.index_select(0, inverse)
    return GPTQResult(Q.to(torch.float32).contiguous(), codes.contiguous(), problem.scales, problem.zeros, g_idx, perm, spec,
                      problem.damp, loss)
''',
    },
    "gptq_quantize_naive": {
        "cholesky_rows": '''
def gptq_quantize_naive(W, H, spec, act_order=False, static_groups=False, damp=0.01):
    p = setup_problem(W, H, spec, act_order, static_groups, damp)
    W, (N, K) = p.W, p.W.shape
    U = inverse_cholesky(p.H)  # row j: the inverse after columns 0..j-1 left, over U_jj
    Q, codes, loss = torch.zeros_like(W), torch.zeros(N, K, dtype=torch.uint8), 0.0
    for j in range(K):
        g = p.group[j]
        if p.starts_group(j):
            p.scales[g], p.zeros[g] = grid_params(W[:, j:j + p.group_size], spec)
        codes[:, j], Q[:, j] = quantize_column(W[:, j], p.scales[g], p.zeros[g], spec)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]
        loss += 0.5 * float((err**2).sum())
    return finish(p, Q, codes, spec, loss)
''',
        "transposed": '''
def gptq_quantize_naive(W, H, spec, act_order=False, static_groups=False, damp=0.01):
    p = setup_problem(W, H, spec, act_order, static_groups, damp)
    Wt = p.W.T.clone()  # row j = column j of W
    K, N = Wt.shape
    Hinv = torch.linalg.inv(p.H)
    Qt, codes, loss = torch.zeros_like(Wt), torch.zeros(K, N, dtype=torch.uint8), 0.0
    for j in range(K):
        g = p.group[j]
        if p.starts_group(j):
            p.scales[g], p.zeros[g] = grid_params(Wt[j:j + p.group_size].T, spec)
        codes[j], Qt[j] = quantize_column(Wt[j], p.scales[g], p.zeros[g], spec)
        delta = Wt[j] - Qt[j]
        Wt[j + 1:] -= torch.outer(Hinv[j + 1:, j], delta) / Hinv[j, j]
        loss += float((delta**2).sum() / Hinv[j, j]) / 2
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    return finish(p, Qt.T, codes.T, spec, loss)
''',
    },
    "gptq_quantize": {
        "on_W": '''
def gptq_quantize(W, H, spec, block_size=128, act_order=False, static_groups=False, damp=0.01, name="W"):
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError("block_size must be a positive integer")
    p, U = damped_inverse_cholesky(W, H, spec, act_order, static_groups, damp, name)
    W = p.W.clone()
    N, K = W.shape
    Q, codes, loss = torch.zeros_like(W), torch.zeros(N, K, dtype=torch.uint8), 0.0
    for i1 in range(0, K, block_size):
        i2 = min(K, i1 + block_size)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            g = p.group[j]
            if p.starts_group(j):
                rows = current_rows(W.T, W1.T, Err1.T, U, i1, j, j + p.group_size)
                p.scales[g], p.zeros[g] = grid_params(rows.T, spec)
            codes[:, j], Q[:, j] = quantize_column(W1[:, i], p.scales[g], p.zeros[g], spec)
            Err1[:, i] = (W1[:, i] - Q[:, j]) / U1[i, i]
            W1[:, i + 1:] -= torch.outer(Err1[:, i], U1[i, i + 1:])
        loss += float(Err1.pow(2).sum()) / 2
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return finish(p, Q, codes, spec, loss)
''',
        "unblocked": '''
def gptq_quantize(W, H, spec, block_size=128, act_order=False, static_groups=False, damp=0.01, name="W"):
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    p, U = damped_inverse_cholesky(W, H, spec, act_order, static_groups, damp, name)  # every update at once: no blocks needed
    W = p.W.clone()
    N, K = W.shape
    Q, codes, loss = torch.zeros_like(W), torch.zeros(N, K, dtype=torch.uint8), 0.0
    for j in range(K):
        g = p.group[j]
        if p.starts_group(j):
            p.scales[g], p.zeros[g] = grid_params(W[:, j:j + p.group_size], spec)
        codes[:, j], Q[:, j] = quantize_column(W[:, j], p.scales[g], p.zeros[g], spec)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1:] -= torch.outer(err, U[j, j + 1:])
        loss += (err**2).sum().item() / 2
    return finish(p, Q, codes, spec, loss)
''',
    },
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab04")) as box:
        yield box


@pytest.mark.slow
@pytest.mark.parametrize("function, name", [(f, v) for f, versions in WRONG.items() for v in versions])
def test_wrong_version_loses_points(sandbox, function, name):
    check_loses_points(grade_version(LAB, sandbox, function, name), f"{function}__{name}", WRONG[function][name][1])


@pytest.mark.slow
@pytest.mark.parametrize("function, name", [(f, v) for f, versions in CORRECT.items() for v in versions] + [(f, None) for f in WRONG])
def test_correct_version_gets_full_marks(sandbox, function, name):
    check_full_marks(grade_version(LAB, sandbox, function, name))


def test_catalog_covers_every_graded_function():
    check_catalog_covers(LAB, WRONG, CORRECT)


def fields_equal(got: types.SimpleNamespace, expected, names) -> None:
    for name in names:
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None and b is None) or (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), name


@pytest.mark.slow
def test_given_helpers_behave_like_the_reference(sandbox):
    """The notebook's given checks, grid, damping retry and current_rows are the reference's, so a
    learner who calls them is graded against the same arithmetic."""
    suite = engine.load_suite(LAB)
    W = suite.weight(12, 64, seed=3)
    for s in (suite.spec(4), suite.spec(3, True, 16), suite.spec(8, False, None, "tensor"), suite.spec(2, True)):
        for block in (W, W[:, :16], W.float()):
            assert all(torch.equal(a, b) for a, b in zip(sandbox.call("grid_params", block, s), gptq.grid_params(block, s)))
    H = suite.hessian(suite.inputs(64, seed=4))
    problem, U = sandbox.call("damped_inverse_cholesky", W, H, suite.spec(4, False, 16), True, False, 0.01, "W")
    reference, U_reference = gptq.damped_inverse_cholesky(W, H, suite.spec(4, False, 16), True, False, 0.01, "W")
    fields_equal(problem, reference, suite.PROBLEM_FIELDS)
    torch.testing.assert_close(U, U_reference, rtol=1e-12, atol=1e-14)  # one thread there, maybe more here
    bad = torch.eye(16, dtype=torch.float64)
    bad[0, 1] = bad[1, 0] = 1.02
    problem, _ = sandbox.call("damped_inverse_cholesky", W[:, :16], bad, suite.spec(4), False, False, 0.01, "W")
    assert problem.damp == 0.03
    Wt, U = W.T.contiguous(), gptq.inverse_cholesky(gptq.prepare_hessian(H, W)[0])
    W1, Err1 = Wt[32:48].clone(), torch.randn(16, 12, dtype=torch.float64)
    for j, end in ((32, 48), (40, 56), (47, 64)):
        assert torch.equal(sandbox.call("current_rows", Wt, W1, Err1, U, 32, j, end), gptq.current_rows(Wt, W1, Err1, U, 32, j, end))
    for args, error, _ in suite.bad_problems():
        with pytest.raises(error):
            gptq.setup_problem(*args)
        with pytest.raises(LearnerError, match=f" raised {error.__name__}:"):
            sandbox.call("check_inputs", args[0], args[1], args[2], args[4], args[5])
    assert sandbox.call("compute_dtype", W) == torch.float64 and sandbox.call("compute_dtype", W.half()) == torch.float32


@pytest.mark.slow
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_reference_raises():
    """The exception types the suite expects are those the reference raises for the same input."""
    suite = engine.load_suite(LAB)
    for H, x in [(torch.zeros(8, 8), torch.ones(5, 6)), (torch.zeros(8, 6), torch.ones(5, 6)), (torch.zeros(8), torch.ones(5, 8))]:
        with pytest.raises(ValueError):
            gptq.accumulate_hessian(H, x, 0)
    for H in (torch.tensor([[1.0, 1.5], [1.5, 1.0]]), suite.hessian(suite.inputs(12, tokens=64, seed=450, dead=(4,)))):
        with pytest.raises(torch.linalg.LinAlgError):
            gptq.inverse_cholesky(H)
    bad = types.SimpleNamespace(**{**vars(suite.spec(4)), "rounding": "nearest"})
    with pytest.raises(ValueError):
        gptq.quantize_column(torch.tensor([0.1, -0.2]), torch.full((2,), 0.1), torch.full((2,), 8.0), bad)
    for args, error, _ in suite.bad_problems():
        with pytest.raises(error):
            gptq.setup_problem(*args)
        with pytest.raises(error):
            gptq.gptq_quantize(args[0], args[1], args[2], 128, args[3], args[4], args[5])
    W, H = suite.weight(8, 64, dtype=torch.float32), suite.hessian(suite.inputs(64, dtype=torch.float32))
    for block_size in (0, -128, 2.5, "128"):
        with pytest.raises(ValueError):
            gptq.gptq_quantize(W, H, suite.spec(), block_size)


def test_test_cells_match_the_suite():
    check_test_cells_match_the_suite(LAB, NOTEBOOK)


def test_points_and_metadata():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    manual = sum(meta["points"] for _, meta in nbgrader_cells(notebook, "manual"))
    assert manual > 0 and sum(suite_points(LAB).values()) + manual >= 100
    assert notebook.metadata["quantcourse"] == {"lab": LAB}
    assert notebook.metadata["kernelspec"]["name"] == "quantcourse"
    ids = [c.metadata["nbgrader"]["grade_id"] for c in notebook.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "grade_id values must be unique"
    assert notebook.cells[-1].source.strip() == "report()"
    table = notebook.cells[0].source
    rows = re.findall(r"^\| \d\. [^|]+\| ([^|]+)\| ([\d +]+) \|$", table, flags=re.MULTILINE)
    stated = {}
    for functions, points in rows:
        for function, value in zip(re.findall(r"`(\w+)`", functions), points.split("+")):
            stated[f"04.{function}"] = float(value)
    assert stated == suite_points(LAB), "the introduction's table states each function's points"


def test_graded_functions_have_the_reference_signatures():
    """Same names, parameters and defaults as reference_impl/gptq.py (the lab promises it)."""
    check_reference_signatures(LAB, NOTEBOOK)


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    check_solution_cells_hold_only(NOTEBOOK)
