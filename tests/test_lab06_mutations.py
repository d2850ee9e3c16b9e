"""Mutation catalog of lab 06: the hidden suite must fail plausible wrong versions of every graded
function (and name the mistake where the suite knows it) and pass other correct ones; the lab
notebook must hold together (points, signatures, outputs, the source at full marks, the student
version at zero); the bad inputs the suite feeds must make the reference raise the exception types
the suite expects.

All versions live in one notebook: the source notebook plus one cell per version, whose function
is renamed `fake_quant_w8a8__floor`. A single learner process serves them all and `aliases` points
the suite's `learner.fake_quant_w8a8` at the version under test.
"""

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

from quantcourse.reference_impl import smoothquant as sq

LAB = "06_smoothquant"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"


ACCUMULATE = '''
def accumulate_absmax(absmax, x):
    if not isinstance(absmax, torch.Tensor) or not absmax.is_floating_point() or absmax.dim() != 1:
        raise TypeError("absmax must be a float vector [K]")
    CHECK_X
    K = absmax.shape[0]
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError("x must be [..., K]")
    tokens = FLATTEN
    if tokens.shape[0] == 0:
        return absmax.float().clone()
    return COMBINE(absmax.float(), REDUCE)
'''
ACCUMULATE_RIGHT = {
    "CHECK_X": 'check_tensor(x, "x")', "FLATTEN": "x.reshape(-1, K)", "COMBINE": "torch.maximum",
    "REDUCE": "tokens.abs().amax(dim=0).float()",
}  # fmt: skip

COLUMNS = '''
def column_absmax(weights):
    if isinstance(weights, torch.Tensor) or len(weights) == 0 or not all(W.is_floating_point() and W.dim() == 2 for W in weights):
        raise TypeError("a non-empty list of float matrices")
    K = weights[0].shape[1]
    if CHECK_K:
        raise ValueError("one input")
    per_layer = torch.stack([REDUCE for W in LAYERS])
    return COMBINE.clamp(min=FLOOR)
'''
COLUMNS_RIGHT = {
    "CHECK_K": "any(W.shape[1] != K for W in weights)", "REDUCE": "W.abs().amax(dim=0).float()", "LAYERS": "weights",
    "COMBINE": "per_layer.amax(dim=0)", "FLOOR": "1e-5",
}  # fmt: skip

FACTORS = '''
def smoothing_factors(act_absmax, w_absmax, alpha):
    alpha = check_alpha(alpha)
    if act_absmax.dim() != 1 or act_absmax.shape != w_absmax.shape:
        raise ValueError("vectors over the same channels")
    if CHECK_VALUES:
        raise ValueError("finite and >= 0")
    s = FORMULA
    return CLAMP
'''
FACTORS_RIGHT = {
    "CHECK_VALUES": "not torch.isfinite(act_absmax).all() or (act_absmax < 0).any() or (w_absmax < 0).any()",
    "FORMULA": "act_absmax.float() ** alpha / w_absmax.float() ** (1 - alpha)", "CLAMP": "s.clamp(min=1e-5)",
}  # fmt: skip

FOLD = '''
def smoothed_weights(previous_weight, previous_bias, weights, s):
    if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.dim() != 1:
        raise TypeError("s must be a float vector")
    if CHECK_S:
        raise ValueError("s must be finite and > 0")
    K = s.shape[0]
    if previous_weight.dim() not in (1, 2) or previous_weight.shape[0] != K:
        raise ValueError("the op before must produce K channels")
    if previous_bias is not None and previous_bias.shape != (K,):
        raise ValueError("previous_bias must be [K]")
    if any(W.dim() != 2 or W.shape[1] != K for W in weights):
        raise ValueError("every reader must have K columns")
    d = S_PREV
    if previous_weight.dim() == 2:
        d = PREV_AXIS
    new_previous = previous_weight PREV_OP d
    new_bias = None if previous_bias is None else BIAS
    new_weights = [READER for i, W in enumerate(weights)]
    return new_previous, new_bias, new_weights
'''
FOLD_RIGHT = {
    "CHECK_S": "not (torch.isfinite(s).all() and (s > 0).all())", "S_PREV": "s.to(previous_weight.dtype)",
    "PREV_AXIS": "d[:, None]", "PREV_OP": "/", "BIAS": "previous_bias / s.to(previous_bias.dtype)",
    "READER": "W * s.to(W.dtype)[None, :]",
}  # fmt: skip

FAKE = '''
def fake_quant_w8a8(x, weight, act_granularity="token", input_absmax=None):
    if act_granularity not in ("token", "tensor"):
        raise ValueError("act_granularity must be 'token' or 'tensor'")
    if input_absmax is not None:
        if STATIC_CHECK:
            raise ValueError("a static scale needs act_granularity='tensor'")
        if not float(input_absmax) > 0:
            raise ValueError("input_absmax must be positive")
    check_matrix(x, "x")
    check_matrix(weight, "weight")
    if x.shape[1] != weight.shape[1]:
        raise ValueError("K differs")

    def fake_quantize(A, absmax):
        absmax = absmax.float()
        factor = FACTOR
        codes = ROUND(A.float() * factor)
        codes = CLAMP
        return codes * (absmax / LEVELS)

    W_hat = fake_quantize(weight, W_ABSMAX)
    if input_absmax is not None:
        a = STATIC
    elif act_granularity == "tensor":
        a = x.abs().amax()
    else:
        a = TOKEN
    X_hat = fake_quantize(x, a)
    return PRODUCT
'''
FAKE_RIGHT = {
    "STATIC_CHECK": "act_granularity != 'tensor'", "FACTOR": "torch.where(absmax > 0, LEVELS / absmax, torch.zeros_like(absmax))",
    "LEVELS": "127", "ROUND": "torch.round", "CLAMP": "codes.clamp(-127, 127)", "W_ABSMAX": "weight.abs().amax(dim=1, keepdim=True)",
    "STATIC": "torch.tensor(float(input_absmax))", "TOKEN": "x.abs().amax(dim=1, keepdim=True)",
    "PRODUCT": "X_hat.double() @ W_hat.double().T",
}  # fmt: skip


def accumulate_version(**changes):
    return version(ACCUMULATE, ACCUMULATE_RIGHT, **changes)


def columns_version(**changes):
    return version(COLUMNS, COLUMNS_RIGHT, **changes)


def factors_version(**changes):
    return version(FACTORS, FACTORS_RIGHT, **changes)


def fold_version(**changes):
    return version(FOLD, FOLD_RIGHT, **changes)


def fake_version(**changes):
    return version(FAKE, FAKE_RIGHT, **changes)


# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "accumulate_absmax": {
        "no_abs": (accumulate_version(REDUCE="tokens.amax(dim=0).float()"), "the signed max (no abs)"),
        "replaced": (accumulate_version(COMBINE="(lambda old, new: new)"), "absmax replaced by this batch's max"),
        "summed": (accumulate_version(COMBINE="torch.add"), "the old maxima added to the batch's"),
        "mean": (accumulate_version(REDUCE="tokens.abs().mean(dim=0).float()"), "mean |x| over the tokens"),
        "minimum": (accumulate_version(COMBINE="torch.minimum"), "the smaller of the two kept"),
        "first_sequence": (accumulate_version(FLATTEN="x[0] if x.dim() == 3 else x.reshape(-1, K)"), "only the first sequence"),
        "per_token": (accumulate_version(COMBINE="(lambda old, new: new)", REDUCE="tokens.abs().amax(dim=1).float()"), "one max per token"),
        "dtype_of_x": (accumulate_version(REDUCE="tokens.abs().amax(dim=0)"), "returned dtype float64, expected float32"),
        "no_nan_check": (accumulate_version(CHECK_X="pass"), "instead of raising ValueError"),
    },
    "column_absmax": {
        "first_layer": (columns_version(LAYERS="weights[:1]"), "the max over the first layer only"),
        "no_clamp": (columns_version(FLOOR="0.0"), "no clamp"),
        "rows": (columns_version(REDUCE="W.abs().amax(dim=1).float()"), "the max over each output row"),
        "signed": (columns_version(REDUCE="W.amax(dim=0).float()"), "the signed max (no abs)"),
        "summed": (columns_version(COMBINE="per_layer.sum(dim=0)"), "summed"),
        "mean": (columns_version(COMBINE="per_layer.mean(dim=0)"), "averaged"),
        "no_width_check": (columns_version(CHECK_K="False"), "expected ValueError"),
    },
    "smoothing_factors": {
        "wrong_side": (factors_version(FORMULA="w_absmax.float() ** alpha / act_absmax.float() ** (1 - alpha)"), "alpha on the wrong side"),
        "swapped_exponents": (factors_version(FORMULA="act_absmax.float() ** (1 - alpha) / w_absmax.float() ** alpha"), "the exponents swapped"),
        "inverse": (factors_version(FORMULA="w_absmax.float() ** (1 - alpha) / act_absmax.float() ** alpha"), "the inverse, 1 / s"),
        "product": (factors_version(FORMULA="act_absmax.float() ** alpha * w_absmax.float() ** (1 - alpha)"), "a product"),
        "no_clamp": (factors_version(CLAMP="s"), "no clamp"),
        "clamped_act": (factors_version(FORMULA="act_absmax.float().clamp(min=1e-5) ** alpha / w_absmax.float() ** (1 - alpha)", CLAMP="s"),
                        "max|X_j| clamped to 1e-5 instead of s"),
        "same_exponent": (factors_version(FORMULA="(act_absmax.float() / w_absmax.float()) ** alpha"), "the same exponent for both"),
        "float64": (factors_version(FORMULA="act_absmax.double() ** alpha / w_absmax.double() ** (1 - alpha)"), "expected float32"),
        "no_value_check": (factors_version(CHECK_VALUES="False"), "instead of raising ValueError"),
    },
    "smoothed_weights": {
        "norm_multiplied": (fold_version(PREV_OP="*"), "multiplied by s instead of divided"),
        "readers_divided": (fold_version(READER="W / s.to(W.dtype)[None, :]"), "divided by s instead of multiplied"),
        "swapped": (fold_version(PREV_OP="*", READER="W / s.to(W.dtype)[None, :]"), "swapped everywhere"),
        "reader_rows": (fold_version(READER="W * s.to(W.dtype)[:, None]"), "the readers' rows (output channels) scaled"),
        "previous_columns": (fold_version(PREV_AXIS="d[None, :]"), "the previous Linear's columns divided"),
        "bias_unchanged": (fold_version(BIAS="previous_bias"), "bias of the op before left unchanged"),
        "bias_multiplied": (fold_version(BIAS="previous_bias * s.to(previous_bias.dtype)"), "the bias multiplied by s"),
        "first_reader_only": (fold_version(READER="(W * s.to(W.dtype)[None, :] if i == 0 else W)"), "only the first reader scaled"),
        "no_cast": (fold_version(S_PREV="s", READER="W * s[None, :]"), "expected bfloat16"),
        "no_s_check": (fold_version(CHECK_S="False"), "instead of raising ValueError"),
    },
    "fake_quant_w8a8": {
        "act_per_channel": (fake_version(TOKEN="x.abs().amax(dim=0, keepdim=True)"), "activation scales per input channel"),
        "act_per_tensor": (fake_version(TOKEN="x.abs().amax()"), "one activation scale for the whole x"),
        "weight_per_tensor": (fake_version(W_ABSMAX="weight.abs().amax()"), "one weight scale for the whole W"),
        "weight_per_column": (fake_version(W_ABSMAX="weight.abs().amax(dim=0, keepdim=True)"), "weight scales per input column"),
        "levels_255": (fake_version(LEVELS="255"), "scale absmax / 255"),
        "levels_255_unclamped": (fake_version(LEVELS="255", CLAMP="codes"), "scale absmax / 255"),
        "levels_128": (fake_version(LEVELS="128"), "scale absmax / 128"),
        "floor": (fake_version(ROUND="torch.floor"), "floor instead of round"),
        "half_away": (fake_version(ROUND="(lambda t: torch.sign(t) * torch.floor(t.abs() + 0.5))"), "ties rounded away from zero"),
        "clamp_128": (fake_version(CLAMP="codes.clamp(-128, 127)"), "clamped to [-128, 127]"),
        "no_clamp": (fake_version(CLAMP="codes"), "no clamp with the static scale"),
        "int8_wraps": (fake_version(CLAMP="codes.to(torch.int16).to(torch.int8).float()"), "cast to int8 without clamping"),
        "static_ignored": (fake_version(STATIC="x.abs().amax()"), "input_absmax ignored"),
        "activations_float": (fake_version(PRODUCT="x.double() @ W_hat.double().T"), "W8A16"),
        "weights_float": (fake_version(PRODUCT="X_hat.double() @ weight.double().T"), "the weights left in float"),
        "no_zero_guard": (fake_version(FACTOR="LEVELS / absmax"), "NaN for an all-zero row"),
        "no_static_check": (fake_version(STATIC_CHECK="False"), "instead of raising ValueError"),
    },
}  # fmt: skip

CHECKS = {
    "accumulate_absmax": '''
    if not isinstance(absmax, torch.Tensor) or not absmax.is_floating_point() or absmax.dim() != 1:
        raise TypeError("absmax must be a float vector [K]")
    check_tensor(x, "x")
    if x.dim() == 0 or x.shape[-1] != absmax.shape[0]:
        raise ValueError("x must be [..., K]")''',
    "smoothed_weights": '''
    if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.dim() != 1:
        raise TypeError("s must be a float vector")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("s must be finite and > 0")
    K = s.shape[0]
    if previous_weight.dim() not in (1, 2) or previous_weight.shape[0] != K:
        raise ValueError("the op before must produce K channels")
    if previous_bias is not None and previous_bias.shape != (K,):
        raise ValueError("previous_bias must be [K]")
    if any(W.dim() != 2 or W.shape[1] != K for W in weights):
        raise ValueError("every reader must have K columns")''',
    "fake_quant_w8a8": '''
    if act_granularity not in ("token", "tensor"):
        raise ValueError("act_granularity must be 'token' or 'tensor'")
    if input_absmax is not None and (act_granularity != "tensor" or not float(input_absmax) > 0):
        raise ValueError("a static scale: act_granularity='tensor' and input_absmax > 0")
    check_matrix(x, "x")
    check_matrix(weight, "weight")
    if x.shape[1] != weight.shape[1]:
        raise ValueError("K differs")''',
}

CORRECT = {
    "accumulate_absmax": {
        "token_loop": f'''
def accumulate_absmax(absmax, x):{CHECKS["accumulate_absmax"]}
    result = absmax.float().clone()
    for token in x.reshape(-1, x.shape[-1]):
        result = torch.maximum(result, token.abs().float())
    return result
''',
        "concatenated": f'''
def accumulate_absmax(absmax, x):{CHECKS["accumulate_absmax"]}
    rows = torch.cat([absmax.float()[None], x.reshape(-1, x.shape[-1]).abs().float()])
    return rows.amax(dim=0)
''',
    },
    "column_absmax": {
        "concatenated": '''
def column_absmax(weights):
    if isinstance(weights, torch.Tensor) or not weights or any(not W.is_floating_point() or W.dim() != 2 for W in weights):
        raise TypeError("a non-empty list of float matrices")
    if len({W.shape[1] for W in weights}) != 1:
        raise ValueError("one input")
    return torch.cat([W.float() for W in weights]).abs().amax(dim=0).clamp(min=1e-5)
''',
        "running_max": '''
def column_absmax(weights):
    if isinstance(weights, torch.Tensor) or not weights or any(not W.is_floating_point() or W.dim() != 2 for W in weights):
        raise TypeError("a non-empty list of float matrices")
    result = torch.full((weights[0].shape[1],), 1e-5)
    for W in weights:
        if W.shape[1] != result.shape[0]:
            raise ValueError("one input")
        result = torch.maximum(result, W.abs().amax(dim=0).float())
    return result
''',
    },
    "smoothing_factors": {
        "float64_then_rounded": '''
def smoothing_factors(act_absmax, w_absmax, alpha):
    alpha = check_alpha(alpha)
    if act_absmax.shape != w_absmax.shape or act_absmax.dim() != 1:
        raise ValueError("vectors over the same channels")
    if not (torch.isfinite(act_absmax).all() and torch.isfinite(w_absmax).all()) or (act_absmax < 0).any() or (w_absmax < 0).any():
        raise ValueError("finite and >= 0")
    s = act_absmax.double() ** alpha / w_absmax.double() ** (1 - alpha)
    return s.clamp(min=1e-5).float()
''',
        "pow_and_maximum": '''
def smoothing_factors(act_absmax, w_absmax, alpha):
    alpha = check_alpha(alpha)
    if act_absmax.shape != w_absmax.shape or act_absmax.dim() != 1:
        raise ValueError("vectors over the same channels")
    if torch.isnan(act_absmax).any() or torch.isinf(act_absmax).any() or act_absmax.min() < 0 or w_absmax.min() < 0:
        raise ValueError("finite and >= 0")
    s = torch.pow(act_absmax.float(), alpha) * torch.pow(w_absmax.float(), alpha - 1)
    return torch.maximum(s, torch.tensor(1e-5))
''',
    },
    "smoothed_weights": {
        "diagonal_matrices": f'''
def smoothed_weights(previous_weight, previous_bias, weights, s):{CHECKS["smoothed_weights"]}
    inverse = 1 / s.to(previous_weight.dtype)
    new_previous = inverse[:, None] * previous_weight if previous_weight.dim() == 2 else previous_weight * inverse
    new_bias = None if previous_bias is None else previous_bias * (1 / s.to(previous_bias.dtype))
    return new_previous, new_bias, [W @ torch.diag(s.to(W.dtype)) for W in weights]
''',
        "in_place_on_copies": f'''
def smoothed_weights(previous_weight, previous_bias, weights, s):{CHECKS["smoothed_weights"]}
    new_previous = previous_weight.clone()
    if new_previous.dim() == 2:
        new_previous = new_previous.T.div_(s.to(new_previous.dtype)).T
    else:
        new_previous.div_(s.to(new_previous.dtype))
    new_bias = None if previous_bias is None else previous_bias.clone().div_(s.to(previous_bias.dtype))
    new_weights = []
    for W in weights:
        new_weights.append(W.clone().mul_(s.to(W.dtype)))
    return new_previous, new_bias, new_weights
''',
    },
    "fake_quant_w8a8": {
        "integer_product": f'''
def fake_quant_w8a8(x, weight, act_granularity="token", input_absmax=None):{CHECKS["fake_quant_w8a8"]}
    def codes(A, absmax):
        absmax = absmax.float()
        factor = torch.where(absmax > 0, 127 / absmax, torch.zeros_like(absmax))
        return torch.round(A.float() * factor).clamp(-127, 127).to(torch.int8), absmax
    W_codes, W_absmax = codes(weight, weight.abs().amax(dim=1, keepdim=True))
    if input_absmax is not None:
        X_codes, X_absmax = codes(x, torch.tensor(float(input_absmax)).expand(x.shape[0], 1))
    elif act_granularity == "tensor":
        X_codes, X_absmax = codes(x, x.abs().amax().expand(x.shape[0], 1))
    else:
        X_codes, X_absmax = codes(x, x.abs().amax(dim=1, keepdim=True))
    C = X_codes.long() @ W_codes.long().T  # the int32 accumulation of an int8 kernel, exact
    return C.double() * (X_absmax.double() / 127) * (W_absmax.double().T / 127)
''',
        "divide_by_step_in_float64": f'''
def fake_quant_w8a8(x, weight, act_granularity="token", input_absmax=None):{CHECKS["fake_quant_w8a8"]}
    def fake(A, absmax):
        step = absmax.double() / 127
        safe = torch.where(step > 0, step, torch.ones_like(step))
        return torch.round(A.double() / safe).clamp(-127, 127) * step
    W_hat = fake(weight, weight.abs().amax(dim=1, keepdim=True))
    if input_absmax is not None:
        X_hat = fake(x, torch.tensor(float(input_absmax)))
    elif act_granularity == "tensor":
        X_hat = fake(x, x.abs().amax())
    else:
        X_hat = fake(x, x.abs().amax(dim=1, keepdim=True))
    return X_hat @ W_hat.T
''',
    },
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab06")) as box:
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


@pytest.mark.slow
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_reference_raises():
    """The exception types the suite expects are those the reference raises for the same input."""
    ones = torch.ones(3)
    for absmax, x, error in [(torch.zeros(4), torch.ones(3, 5), ValueError), (torch.zeros(4), torch.tensor([[1.0, float("nan"), 0, 2]]), ValueError),
                             (torch.zeros(4), torch.ones(3, 4, dtype=torch.int32), TypeError), (torch.zeros(2, 4), torch.ones(3, 4), TypeError)]:  # fmt: skip
        with pytest.raises(error):
            sq.accumulate_absmax(absmax, x)
    for weights, error in [([], TypeError), ([torch.ones(3, 4), torch.ones(2, 5)], ValueError), ([torch.ones(4)], TypeError)]:
        with pytest.raises(error):
            sq.column_absmax(weights)
    for args in [(ones, ones, 1.5), (ones, ones, -0.1), (ones, ones, float("nan")), (ones, torch.ones(4), 0.5),
                 (torch.tensor([1.0, -1.0, 2.0]), ones, 0.5), (torch.tensor([1.0, float("inf"), 2.0]), ones, 0.5)]:  # fmt: skip
        with pytest.raises(ValueError):
            sq.smoothing_factors(*args)
    g, W = torch.ones(4), [torch.ones(2, 4)]
    for args in [(g, None, W, torch.tensor([1.0, 0.0, 1.0, 1.0])), (g, None, W, torch.tensor([1.0, -2.0, 1.0, 1.0])),
                 (torch.ones(3), None, W, torch.ones(4)), (g, None, [torch.ones(2, 5)], torch.ones(4))]:  # fmt: skip
        with pytest.raises(ValueError):
            sq.smoothed_weights(*args)
    x, W = torch.ones(4, 8), torch.ones(3, 8)
    for args in [(x, W, "channel", None), (x, W, "token", 5.0), (x, W, "tensor", 0.0), (x, torch.ones(3, 6), "token", None),
                 (torch.ones(2, 4, 8), W, "token", None)]:  # fmt: skip
        with pytest.raises(ValueError):
            sq.fake_quant_w8a8(*args)


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
    stated, questions = {}, []
    for functions, points in rows:
        names = re.findall(r"`(\w+)`", functions)
        questions += [] if names else [float(p) for p in points.split("+")]
        for function, value in zip(names, points.split("+")):
            stated[f"06.{function}"] = float(value)
    assert stated == suite_points(LAB), "the introduction's table states each function's points"
    assert sorted(questions) == sorted(meta["points"] for _, meta in nbgrader_cells(notebook, "manual"))


def test_graded_functions_have_the_reference_signatures():
    """Same names, parameters and defaults as reference_impl/smoothquant.py (the lab promises it)."""
    check_reference_signatures(LAB, NOTEBOOK)


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    check_solution_cells_hold_only(NOTEBOOK)
