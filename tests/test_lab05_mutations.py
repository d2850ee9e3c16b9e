"""Mutation catalog of lab 05: the hidden suite must fail plausible wrong versions of every graded
function (and name the mistake where the suite knows it) and pass other correct ones; the lab
notebook must hold together (points, outputs, the source at full marks, the student version at
zero); its given helpers must behave like the reference's; the bad inputs the suite feeds must
make the reference raise the exception types the suite expects.

All versions live in one notebook: the source notebook plus one cell per version, whose function
is renamed `search_group_scales__ties`. A single learner process serves them all and `aliases`
points the suite's `learner.search_group_scales` at the version under test. A version calls the
notebook's correct functions (candidate_scales, clip_objective, ...) unless its mistake is in one
of them, so each mutant breaks one thing.
"""

import ast
import re
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
from quantcourse.reference_impl import awq
from quantcourse.reference_impl.affine import AffineSpec

LAB = "05_awq"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"
SPEC = 'spec=AffineSpec(bits=4, symmetric=False, granularity="group", group_size=64)'


MEAN = '''
def activation_mean(x):
    CHECK
    t = FLAT
    return REDUCE
'''
MEAN_RIGHT = {"CHECK": 'check_tensor(x, "x")', "FLAT": "x.reshape(-1, x.shape[-1])", "REDUCE": "t.abs().float().mean(dim=0)"}

SCALES = '''
def candidate_scales(x_mean, ratio, w_mean=None):
    s = POWER
    if w_mean is not None:
        s = DUO
    s = CLAMP
    return NORMALIZE
'''
SCALES_RIGHT = {"POWER": "x_mean.pow(ratio)", "DUO": "s / (w_mean.pow(1 - ratio) + 1e-4)", "CLAMP": "s.clamp(min=1e-4)",
                "NORMALIZE": "s / (s.max() * s.min()).sqrt()"}  # fmt: skip

FAKE_QUANT = '''
def scaled_fake_quant(W, s, spec):
    s = s.to(W.dtype)
    return RESULT
'''
FAKE_QUANT_RIGHT = {"RESULT": "fake_quantize_groups(W * s, spec) / s"}

SEARCH = f'''
def search_group_scales(weights, x, {SPEC}, loss=None, duo_scaling=False, grid=20):
    CHECK
    if loss is None:
        reference = torch.cat([x @ W.T for W in weights], dim=-1)

        def loss(candidates):
            return LOSS

    x_mean = activation_mean(x)
    w_mean = WMEAN
    ratios = RATIOS
    losses = []
    best, best_loss = None, math.inf
    for ratio in ratios:
        s = candidate_scales(x_mean, ratio, w_mean)
        value = loss([CANDIDATE for W in weights])
        losses.append(value)
        if COMPARE:
            best, best_loss = (s, ratio), value
    return ScaleSearch(best[0], best[1], ratios, losses)
'''
SEARCH_RIGHT = {
    "CHECK": "check_group(weights, x, spec, grid)",
    "LOSS": "(torch.cat([x @ C.T for C in candidates], dim=-1) - reference).float().pow(2).mean().item()",
    "WMEAN": "weight_mean(weights, spec) if duo_scaling else None", "RATIOS": "[i / grid for i in range(grid)]",
    "CANDIDATE": "scaled_fake_quant(W, s, spec)", "COMPARE": "value < best_loss",
}  # fmt: skip

FOLD = '''
def folded_weights(prev_weight, prev_bias, weights, s):
    K = prev_weight.shape[0]
    if CHECK_S:
        raise ValueError("s must hold K finite positive scales")
    for W in weights:
        if W.dim() != 2 or W.shape[1] != K:
            raise ValueError("the weights must read K channels")
    prev = PREV
    bias = None if prev_bias is None else BIAS
    return prev, bias, [LINEAR for W in weights]
'''
FOLD_RIGHT = {
    "CHECK_S": "s.dim() != 1 or s.numel() != K or not torch.isfinite(s).all() or (s <= 0).any()",
    "PREV": "prev_weight / s.to(prev_weight.dtype).reshape(K, *[1] * (prev_weight.dim() - 1))",
    "BIAS": "prev_bias / s.to(prev_bias.dtype)", "LINEAR": "W * s.to(W.dtype)[None, :]",
}  # fmt: skip

OBJECTIVE = '''
def clip_objective(W, x, max_val, spec):
    N, K = W.shape
    size = group_size_of(spec, K)
    G = K // size
    m = max_val.to(W.dtype)[..., None]
    clamped = CLAMP.reshape(N, K)
    Q = QUANT
    error = torch.einsum("tgk,ngk->ntg", XS, (Q - TARGET).reshape(N, G, size) ** POWER)
    return REDUCE
'''
OBJECTIVE_RIGHT = {
    "CLAMP": "torch.clamp(W.reshape(N, G, size), -m, m)", "QUANT": "fake_quantize_groups(clamped, spec)", "TARGET": "W",
    "XS": "x.reshape(-1, G, size).to(W.dtype)", "POWER": "1", "REDUCE": "error.float().pow(2).mean(dim=1)",
}  # fmt: skip

CLIP = f'''
def clip_search(W, x, {SPEC}, steps=10, tokens=512, batch=256):
    CHECK
    N, K = W.shape
    size = group_size_of(spec, K)
    x = SAMPLE
    amax = AMAX.float()
    best_val, best_step = amax.clone(), torch.zeros_like(amax, dtype=STEP_DTYPE)
    best_error = torch.full_like(amax, math.inf)
    for i in CANDIDATES:
        max_val = amax * (1 - i / FRACTION)
        error = OBJECTIVE(W, x, max_val, spec)
        PER_ROW
        better = COMPARE
        best_error[better], best_val[better], best_step[better] = error[better], max_val[better], i
    return ClipSearch(best_val, best_step)
'''
CLIP_RIGHT = {
    "CHECK": "check_clip_inputs(W, x, spec, steps)", "SAMPLE": "sample_tokens(x, tokens)",
    "AMAX": "W.abs().reshape(N, K // size, size).amax(dim=-1)", "STEP_DTYPE": "torch.int64", "CANDIDATES": "range(steps)",
    "FRACTION": "20", "OBJECTIVE": "clip_objective", "PER_ROW": "pass", "COMPARE": "error < best_error",
}  # fmt: skip
# a clip_objective with one mistake, for the clip_search versions that call it
OBJECTIVE_MIN_ONLY = '''
def _objective_min_only(W, x, max_val, spec):
    N, K = W.shape
    size = group_size_of(spec, K)
    m = max_val.to(W.dtype)[..., None]
    Q = fake_quantize_groups(torch.clamp(W.reshape(N, K // size, size), min=-m).reshape(N, K), spec)
    error = torch.einsum("tgk,ngk->ntg", x.reshape(-1, K // size, size).to(W.dtype), (Q - W).reshape(N, K // size, size))
    return error.float().pow(2).mean(dim=1)
'''

LAYER = f'''
def search_layer_clips(weights, inputs, {SPEC}):
    return {{name: None if SKIP else RESULT for name, W in weights.items()}}
'''
LAYER_RIGHT = {"SKIP": 'name.rpartition(".")[2] in ("q_proj", "k_proj")', "RESULT": "clip_search(W, inputs[name], spec)"}


def mean_version(**changes):
    return version(MEAN, MEAN_RIGHT, **changes)


def scales_version(**changes):
    return version(SCALES, SCALES_RIGHT, **changes)


def fake_quant_version(**changes):
    return version(FAKE_QUANT, FAKE_QUANT_RIGHT, **changes)


def search_version(**changes):
    return version(SEARCH, SEARCH_RIGHT, **changes)


def fold_version(**changes):
    return version(FOLD, FOLD_RIGHT, **changes)


def objective_version(**changes):
    return version(OBJECTIVE, OBJECTIVE_RIGHT, **changes)


def clip_version(**changes):
    return version(CLIP, CLIP_RIGHT, **changes)


def layer_version(**changes):
    return version(LAYER, LAYER_RIGHT, **changes)


OUTPUT_LOSS = "(torch.cat([x @ C.T for C in candidates], dim=-1) - reference).float().pow(2)"

# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "activation_mean": {
        "signed": (mean_version(REDUCE="t.float().mean(dim=0)"), "the signed mean"),
        "max": (mean_version(REDUCE="t.abs().float().amax(dim=0)"), "largest |x|"),
        "rms": (mean_version(REDUCE="t.float().pow(2).mean(dim=0).sqrt()"), "root mean square"),
        "sum": (mean_version(REDUCE="t.abs().float().sum(dim=0)"), "the sum over the tokens"),
        "mean_in_half": (mean_version(REDUCE="t.abs().mean(dim=0).float()"), "averaged in x's own dtype"),
        "first_dim": (mean_version(FLAT="x"), "averaged over the first dimension only"),
        "per_token": (mean_version(REDUCE="t.abs().float().mean(dim=-1)"), "one number per token"),
        "no_check": (mean_version(CHECK="pass"), "instead of raising"),
    },
    "candidate_scales": {
        "no_normalisation": (scales_version(NORMALIZE="s"), "no normalisation"),
        "by_max": (scales_version(NORMALIZE="s / s.max()"), "normalised by max s"),
        "by_mean": (scales_version(NORMALIZE="s / s.mean()"), "normalised by the mean of s"),
        "clamp_after": (scales_version(CLAMP="s", NORMALIZE="(s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)"), "clamp first, then normalise"),
        "no_clamp": (scales_version(CLAMP="s"), "no clamp to 1e-4"),
        "exp_log": (scales_version(POWER="torch.exp(ratio * x_mean.log())"), "exp(r log x_mean)"),
        "one_minus_r": (scales_version(POWER="x_mean.pow(1 - ratio)"), "x_mean^(1 - r)"),
        "duo_no_eps": (scales_version(DUO="s / w_mean.pow(1 - ratio)"), "without the + 1e-4"),
        "duo_multiplied": (scales_version(DUO="s * (w_mean.pow(1 - ratio) + 1e-4)"), "multiplied by w_mean^(1-r)"),
        "duo_ignored": (scales_version(DUO="s"), "w_mean ignored"),
    },
    "scaled_fake_quant": {
        "undivided": (fake_quant_version(RESULT="fake_quantize_groups(W * s, spec)"), "not divided by s"),
        "inverse": (fake_quant_version(RESULT="fake_quantize_groups(W / s, spec) * s"), "the inverse scaling"),
        "unscaled": (fake_quant_version(RESULT="fake_quantize_groups(W, spec)"), "the scales had no effect"),
        "unrounded": (fake_quant_version(RESULT="W * s / s"), "never rounded"),
        "rows": (fake_quant_version(RESULT="fake_quantize_groups(W * s[:, None], spec) / s[:, None]"), "applied to the output rows"),
        "symmetric": (fake_quant_version(RESULT="fake_quantize_groups(W * s, AffineSpec(spec.bits, True, spec.granularity, spec.group_size)) / s"),
                      "symmetric grid"),
        "per_row": (fake_quant_version(RESULT="fake_quantize_groups(W * s, AffineSpec(spec.bits, spec.symmetric, 'channel')) / s"),
                    "one grid per output row"),
        "float32_result": (fake_quant_version(RESULT="(fake_quantize_groups(W * s, spec) / s).float()"), "expected float64"),
    },
    "search_group_scales": {
        "linspace": (search_version(RATIOS="torch.linspace(0, 1, grid).tolist()"), "torch.linspace(0, 1, grid)"),
        "inclusive": (search_version(RATIOS="[i / grid for i in range(grid + 1)]"), "grid + 1 ratios"),
        "from_one": (search_version(RATIOS="[i / grid for i in range(1, grid + 1)]"), "r from 1 / grid to 1"),
        "undivided": (search_version(CANDIDATE="fake_quantize_groups(W * s, spec)"), "not divided by s"),
        "sum": (search_version(LOSS=OUTPUT_LOSS + ".sum().item()"), "the sum of the squared output errors"),
        "per_linear": (search_version(LOSS="sum((x @ C.T - x @ W.T).pow(2).mean().item() for C, W in zip(candidates, weights)) / len(weights)"),
                       "averaged over the linears"),
        "weight_error": (search_version(LOSS="torch.cat([(C - W).reshape(-1) for C, W in zip(candidates, weights)]).pow(2).mean().item()"),
                         "the squared error of the weights"),
        "rms": (search_version(LOSS=OUTPUT_LOSS + ".mean().sqrt().item()"), "the root of the mean squared error"),
        "no_duo": (search_version(WMEAN="None"), "duo_scaling ignored"),
        "ties": (search_version(COMPARE="value <= best_loss"), "ties keep the larger r"),
        "last": (search_version(COMPARE="True"), "the scales of the last r tried"),
        "no_check": (search_version(CHECK="pass"), "expected ValueError"),
    },
    "folded_weights": {
        "inverted": (fold_version(PREV="prev_weight * s.to(prev_weight.dtype).reshape(K, *[1] * (prev_weight.dim() - 1))",
                                  BIAS="prev_bias * s", LINEAR="W / s.to(W.dtype)[None, :]"), "the fold inverted"),
        "prev_multiplied": (fold_version(PREV="prev_weight * s.to(prev_weight.dtype).reshape(K, *[1] * (prev_weight.dim() - 1))"),
                            "the previous op multiplied by s"),
        "linears_divided": (fold_version(LINEAR="W / s.to(W.dtype)[None, :]"), "the linears divided by s"),
        "prev_columns": (fold_version(PREV="prev_weight / s.to(prev_weight.dtype)"), "input columns divided"),
        "linear_rows": (fold_version(LINEAR="W * s.to(W.dtype)[:, None]"), "output rows multiplied"),
        "bias_not_divided": (fold_version(BIAS="prev_bias"), "bias of the previous op not divided"),
        "prev_unchanged": (fold_version(PREV="prev_weight.clone()"), "previous op left unchanged"),
        "no_positive_check": (fold_version(CHECK_S="s.dim() != 1 or s.numel() != K"), "instead of raising ValueError"),
    },
    "clip_objective": {
        "min_only": (objective_version(CLAMP="torch.clamp(W.reshape(N, G, size), min=-m)"), "clamped below only"),
        "max_only": (objective_version(CLAMP="torch.clamp(W.reshape(N, G, size), max=m)"), "clamped above only"),
        "no_clamp": (objective_version(CLAMP="W.reshape(N, G, size)"), "not clamped"),
        "after_rounding": (objective_version(QUANT="torch.clamp(fake_quantize_groups(W, spec).reshape(N, G, size), -m, m).reshape(N, K)"),
                           "clamped after rounding"),
        "not_rounded": (objective_version(QUANT="clamped"), "not rounded"),
        "against_clamped": (objective_version(TARGET="clamped"), "compared with the clamped weights"),
        "squares": (objective_version(XS="x.reshape(-1, G, size).to(W.dtype) ** 2", POWER="2", REDUCE="error.float().mean(dim=1)"),
                    "square the dot product"),
        "sum": (objective_version(REDUCE="error.float().pow(2).sum(dim=1)"), "the sum over the tokens"),
        "row": (objective_version(REDUCE="(x.reshape(-1, K).to(W.dtype) @ (Q - W).T).float().pow(2).mean(dim=0)"), "one error per row"),
    },
    "clip_search": {
        "tenths": (clip_version(FRACTION="10"), "(1 - i/10)"),
        "inclusive": (clip_version(CANDIDATES="range(steps + 1)"), "steps + 1 candidates"),
        "from_one": (clip_version(CANDIDATES="range(1, steps + 1)"), "i from 1"),
        "all_tokens": (clip_version(SAMPLE="x.reshape(-1, K)"), "every token used"),
        "ties": (clip_version(COMPARE="error <= best_error"), "ties keep the larger shrink"),
        "max_w": (clip_version(AMAX="W.reshape(N, K // size, size).amax(dim=-1)"), "m from max w"),
        "per_row": (clip_version(PER_ROW="error = error.sum(dim=1, keepdim=True).expand_as(error)"), "one clamp step per row"),
        "min_only": (OBJECTIVE_MIN_ONLY + clip_version(OBJECTIVE="_objective_min_only"), "clamped below only"),
        "int32_step": (clip_version(STEP_DTYPE="torch.int32"), "expected int64"),
        "no_check": (clip_version(CHECK="pass"), "instead of raising ValueError"),
    },
    "search_layer_clips": {
        "clips_all": (layer_version(SKIP="False"), "q_proj and k_proj are never clipped"),
        "skips_v": (layer_version(SKIP='name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj")'), "only q_proj and k_proj are skipped"),
        "skips_attention": (layer_version(SKIP='"attn" in name or name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj")'),
                            "but it is clipped"),
        "exact_names": (layer_version(SKIP='name in ("self_attn.q_proj", "self_attn.k_proj")'), "was clipped"),
        "omits_skipped": (f'''
def search_layer_clips(weights, inputs, {SPEC}):
    return {{name: clip_search(W, inputs[name], spec) for name, W in weights.items() if name.rpartition(".")[2] not in ("q_proj", "k_proj")}}
''', "expected every linear's name"),
        "max_val_only": (layer_version(RESULT="clip_search(W, inputs[name], spec).max_val"), "should return a ClipSearch"),
    },
}  # fmt: skip

CORRECT = {
    "activation_mean": {
        "sum_then_divide": '''
def activation_mean(x):
    check_tensor(x, "x")
    tokens = x.float().reshape(-1, x.shape[-1]).abs()
    return tokens.sum(dim=0) / tokens.shape[0]
''',
        "over_leading_dims": '''
def activation_mean(x):
    x = check_tensor(x, "x").to(torch.float32).abs()
    if x.dim() == 1:
        return x
    return x.mean(dim=tuple(range(x.dim() - 1)))
''',
    },
    "candidate_scales": {
        "two_roots": '''
def candidate_scales(x_mean, ratio, w_mean=None):
    s = x_mean**ratio
    if w_mean is not None:
        s = s / (w_mean ** (1 - ratio) + 1e-4)
    s = torch.clamp(s, min=1e-4)
    return s / torch.sqrt(s.max()) / torch.sqrt(s.min())
''',
        "float64_inside": '''
def candidate_scales(x_mean, ratio, w_mean=None):
    s = x_mean.double().pow(ratio)
    if w_mean is not None:
        s = s / (w_mean.double().pow(1 - ratio) + 1e-4)
    s = s.clamp(min=1e-4)
    return (s / math.sqrt(s.max().item() * s.min().item())).to(x_mean.dtype)
''',
    },
    "scaled_fake_quant": {
        "diagonal_matrices": '''
def scaled_fake_quant(W, s, spec):
    s = s.to(W.dtype)
    return fake_quantize_groups(W @ torch.diag(s), spec) @ torch.diag(1 / s)
''',
        "column_loop": '''
def scaled_fake_quant(W, s, spec):
    scaled = W.clone()
    for k in range(W.shape[1]):
        scaled[:, k] = W[:, k] * s[k].to(W.dtype)
    Q = fake_quantize_groups(scaled, spec)
    for k in range(W.shape[1]):
        Q[:, k] = Q[:, k] / s[k].to(W.dtype)
    return Q
''',
    },
    "search_group_scales": {
        "weight_difference_argmin": f'''
def search_group_scales(weights, x, {SPEC}, loss=None, duo_scaling=False, grid=20):
    check_group(weights, x, spec, grid)
    if loss is None:
        def loss(candidates):
            errors = [(x @ (C - W).T).reshape(-1) for C, W in zip(candidates, weights)]
            return torch.cat(errors).float().pow(2).mean().item()
    x_mean = activation_mean(x)
    w_mean = weight_mean(weights, spec) if duo_scaling else None
    ratios = [i / grid for i in range(grid)]
    scales = [candidate_scales(x_mean, r, w_mean) for r in ratios]
    losses = [loss([scaled_fake_quant(W, s, spec) for W in weights]) for s in scales]
    best = int(torch.tensor(losses, dtype=torch.float64).argmin())  # the first of equal minima
    return ScaleSearch(scales[best], ratios[best], ratios, losses)
''',
        "sum_over_count": f'''
def search_group_scales(weights, x, {SPEC}, loss=None, duo_scaling=False, grid=20):
    check_group(weights, x, spec, grid)
    tokens = x.reshape(-1, x.shape[-1])
    exact = [tokens @ W.T for W in weights]
    count = tokens.shape[0] * sum(W.shape[0] for W in weights)

    def own_outputs(candidates):
        total = sum(((tokens @ C.T) - Y).double().pow(2).sum() for C, Y in zip(candidates, exact))
        return float(total / count)

    loss = own_outputs if loss is None else loss
    x_mean = activation_mean(x)
    w_mean = weight_mean(weights, spec) if duo_scaling else None
    ratios, losses, found = [], [], {{}}
    for i in range(grid):
        r = i / grid
        s = candidate_scales(x_mean, r, w_mean)
        ratios.append(r)
        losses.append(loss([scaled_fake_quant(W, s, spec) for W in weights]))
        found[r] = s
    best = min(range(grid), key=lambda i: losses[i])
    return ScaleSearch(found[ratios[best]], ratios[best], ratios, losses)
''',
    },
    "folded_weights": {
        "by_case": '''
def folded_weights(prev_weight, prev_bias, weights, s):
    K = prev_weight.shape[0]
    if not (s.dim() == 1 and s.shape[0] == K) or not bool(torch.all(torch.isfinite(s) & (s > 0))):
        raise ValueError("s must be [K], finite and positive")
    if any(W.shape[-1] != K or W.dim() != 2 for W in weights):
        raise ValueError("every weight must be [N, K]")
    if prev_weight.dim() == 1:
        prev = prev_weight / s.to(prev_weight.dtype)
    else:
        prev = prev_weight / s.to(prev_weight.dtype)[:, None]
    bias = prev_bias / s.to(prev_bias.dtype) if prev_bias is not None else None
    return prev, bias, [W * s.to(W.dtype) for W in weights]
''',
        "diagonal_matrices": '''
def folded_weights(prev_weight, prev_bias, weights, s):
    K = prev_weight.shape[0]
    if s.shape != (K,) or not torch.isfinite(s).all() or s.min() <= 0:
        raise ValueError(f"s must hold {K} finite positive scales")
    for W in weights:
        if W.shape[-1] != K:
            raise ValueError("each weight must read the previous op's K channels")
    inverse = 1 / s.double()
    if prev_weight.dim() == 2:
        prev = (torch.diag(inverse) @ prev_weight.double()).to(prev_weight.dtype)
    else:
        prev = (prev_weight.double() * inverse).to(prev_weight.dtype)
    bias = None if prev_bias is None else (prev_bias.double() * inverse).to(prev_bias.dtype)
    return prev, bias, [W @ torch.diag(s.to(W.dtype)) for W in weights]
''',
    },
    "clip_objective": {
        "group_loop": '''
def clip_objective(W, x, max_val, spec):
    N, K = W.shape
    size = group_size_of(spec, K)
    G = K // size
    clamped = W.clone()
    for g in range(G):
        cols = slice(g * size, (g + 1) * size)
        m = max_val[:, g].to(W.dtype)[:, None]
        clamped[:, cols] = torch.maximum(torch.minimum(W[:, cols], m), -m)
    Q = fake_quantize_groups(clamped, spec)
    x = x.reshape(-1, K).to(W.dtype)
    out = torch.zeros(N, G)
    for g in range(G):
        cols = slice(g * size, (g + 1) * size)
        out[:, g] = ((x[:, cols] @ (Q - W)[:, cols].T) ** 2).float().mean(dim=0)
    return out
''',
        "broadcast": '''
def clip_objective(W, x, max_val, spec):
    N, K = W.shape
    size = group_size_of(spec, K)
    G = K // size
    m = max_val.to(W.dtype).unsqueeze(-1)
    grouped = W.reshape(N, G, size)
    Q = fake_quantize_groups(grouped.clamp(-m, m).reshape(N, K), spec).reshape(N, G, size)
    xs = x.reshape(-1, 1, G, size).to(W.dtype)
    return ((xs * (Q - grouped)[None]).sum(-1).float() ** 2).mean(0)
''',
    },
    "clip_search": {
        "whole_layer": clip_version(),
        "stacked_argmin": f'''
def clip_search(W, x, {SPEC}, steps=10, tokens=512, batch=256):
    check_clip_inputs(W, x, spec, steps)
    N, K = W.shape
    size = group_size_of(spec, K)
    xs = sample_tokens(x, tokens)
    amax = W.abs().reshape(N, K // size, size).amax(dim=-1).float()
    errors = torch.stack([clip_objective(W, xs, amax * (1 - i / 20), spec) for i in range(steps)])
    step = errors.argmin(dim=0)  # the first of equal errors
    return ClipSearch(amax * (1 - step / 20), step)
''',
    },
    "search_layer_clips": {
        "loop": f'''
def search_layer_clips(weights, inputs, {SPEC}):
    found = {{}}
    for name in weights:
        if name.split(".")[-1] in {{"q_proj", "k_proj"}}:
            found[name] = None
        else:
            found[name] = clip_search(weights[name], inputs[name], spec)
    return found
''',
        "endswith": layer_version(SKIP='name.endswith(("q_proj", "k_proj"))'),
    },
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab05")) as box:
        yield box


@pytest.mark.parametrize("function, name", [(f, v) for f, versions in WRONG.items() for v in versions])
def test_wrong_version_loses_points(sandbox, function, name):
    check_loses_points(grade_version(LAB, sandbox, function, name), f"{function}__{name}", WRONG[function][name][1])


@pytest.mark.parametrize("function, name", [(f, v) for f, versions in CORRECT.items() for v in versions] + [(f, None) for f in WRONG])
def test_correct_version_gets_full_marks(sandbox, function, name):
    check_full_marks(grade_version(LAB, sandbox, function, name))


def test_catalog_covers_every_graded_function():
    check_catalog_covers(LAB, WRONG, CORRECT)


def test_given_helpers_behave_like_the_reference(sandbox):
    """The notebook's given grid, weight statistic, sampling and checks are the reference's, so a
    learner who calls them is graded against the same arithmetic."""
    suite = engine.load_suite(LAB)
    W = suite.weight(24, 128, seed=3)
    for s in (suite.spec(4, 32), suite.spec(3, 64), suite.spec(8, None), suite.spec(2, 16, True),
              AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32, rounding="half_away")):  # fmt: skip
        for block in (W, W.double(), 7 * W[:, :64]):
            assert torch.equal(sandbox.call("fake_quantize_groups", block, s), awq.fake_quantize_groups(block, s)), s
        assert torch.equal(sandbox.call("weight_mean", [W, W[:5] * 3], s), awq.weight_mean([W, W[:5] * 3], s))
    x = suite.activations((3, 700, 16), seed=4)
    for tokens in (512, 100, 5000):
        assert torch.equal(sandbox.call("sample_tokens", x, tokens), awq.sample_tokens(x, tokens))
    for args, error, _ in suite.bad_searches():
        with pytest.raises(error):
            awq.check_group(args[0], args[1], args[2], args[5] if len(args) > 5 else 20)
        with pytest.raises(LearnerError, match=f" raised {error.__name__}:"):
            sandbox.call("check_group", args[0], args[1], args[2], args[5] if len(args) > 5 else 20)
    for args, error, _ in suite.bad_clips():
        with pytest.raises(error):
            awq.check_clip_inputs(*args)
        with pytest.raises(LearnerError, match=f" raised {error.__name__}:"):
            sandbox.call("check_clip_inputs", *args)
    weights, x = suite.salient_group(seed=5)
    assert sandbox.call("check_group", weights, x, suite.spec(4, 32), 20) is None
    assert sandbox.call("check_clip_inputs", weights[0], x, suite.spec(4, 32), 10) is None


@pytest.mark.slow
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_reference_raises():
    """The exception types the suite expects are those the reference raises for the same input."""
    suite = engine.load_suite(LAB)
    with pytest.raises(TypeError):
        awq.activation_mean(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError):
        awq.activation_mean(torch.tensor([[1.0, float("nan")]]))
    for args, error, _ in suite.bad_searches():
        with pytest.raises(error):
            awq.search_group_scales(*args)
    for args, _ in suite.bad_folds():
        with pytest.raises(ValueError):
            awq.folded_weights(*args)
    for args, error, _ in suite.bad_clips():
        with pytest.raises(error):
            awq.clip_search(*args)


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
            stated[f"05.{function}"] = float(value)
    assert stated == suite_points(LAB), "the introduction's table states each function's points"


def default_value(node: ast.expr):
    """A default of the notebook's signatures: a literal, or an AffineSpec(...) built with the course's class."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return eval(compile(ast.Expression(node), "<default>", "eval"), {"AffineSpec": AffineSpec})


def test_graded_functions_have_the_reference_signatures():
    """Same names, parameters and defaults as reference_impl/awq.py (the lab promises it)."""
    check_reference_signatures(LAB, NOTEBOOK, default_value)


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    check_solution_cells_hold_only(NOTEBOOK)
