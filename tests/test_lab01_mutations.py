"""Mutation catalog of lab 01: the hidden suite must fail plausible wrong versions of every graded
function and pass other correct ones; and the lab notebook must hold together (points, outputs,
source at full marks, student version at zero).

All versions live in one notebook built from the source notebook plus one cell per version,
each defined under its own name (`quantize__floor`); a single learner process serves them all and
`aliases` points the suite's `learner.quantize` at the version under test. A version calls the
notebook's correct helpers, so each mutant breaks exactly one function.
"""

from pathlib import Path

import nbformat
import pytest

from lab_catalog import (
    check_catalog_covers,
    check_full_marks,
    check_loses_points,
    check_saved_without_outputs,
    check_solution_cells_hold_only,
    check_source_and_student_notebooks,
    check_test_cells_match_the_suite,
    grade_version,
    nbgrader_cells,
    suite_points,
    versions_sandbox,
)


LAB = "01_affine"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"

# function -> {version name: (source defining the function under its own name, substring the
# feedback must contain, or None where no known-mistake diagnosis applies)}
WRONG = {
    "quant_range": {
        "signed_top_too_high": ("""
def quant_range(bits, signed):
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError("bits")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits - 1)
""", "one level too many at the top"),
        "narrow_signed": ("""
def quant_range(bits, signed):
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError("bits")
    return (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
""", "narrow range"),
        "unsigned_off_by_one": ("""
def quant_range(bits, signed):
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError("bits")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits)
""", "qmax = 2^b instead of 2^b - 1"),
        "swapped_grids": ("""
def quant_range(bits, signed):
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError("bits")
    return (0, 2**bits - 1) if signed else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
""", "unsigned range [0, 2^b - 1] for a signed grid"),
        "no_check": ("""
def quant_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
""", "instead of raising ValueError"),
        "type_error_for_floats": ("""
def quant_range(bits, signed):
    if not isinstance(bits, int):
        raise TypeError("bits must be an int")
    if not 2 <= bits <= 8:
        raise ValueError("bits")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
""", "raised TypeError; expected ValueError"),
    },
    "round_half": {
        "half_up": ("""
def round_half(x, mode="half_even"):
    if mode == "half_even":
        return torch.round(x)
    if mode == "half_away":
        return torch.floor(x + 0.5)
    raise ValueError(mode)
""", "rounded half up"),
        "always_half_even": ("""
def round_half(x, mode="half_even"):
    if mode not in ("half_even", "half_away"):
        raise ValueError(mode)
    return torch.round(x)
""", "rounded half even instead of half away"),
        "always_half_away": ("""
def round_half(x, mode="half_even"):
    if mode not in ("half_even", "half_away"):
        raise ValueError(mode)
    return torch.sign(x) * torch.floor(x.abs() + 0.5)
""", "rounded half away instead of half even"),
        "truncation": ("""
def round_half(x, mode="half_even"):
    if mode == "half_even":
        return torch.round(x)
    if mode == "half_away":
        return torch.trunc(x)
    raise ValueError(mode)
""", "truncation toward zero"),
        "unknown_mode_accepted": ("""
def round_half(x, mode="half_even"):
    if mode == "half_away":
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    return torch.round(x)
""", "instead of raising ValueError"),
        "integer_result": ("""
def round_half(x, mode="half_even"):
    if mode == "half_even":
        return torch.round(x).long()
    if mode == "half_away":
        return (torch.sign(x) * torch.floor(x.abs() + 0.5)).long()
    raise ValueError(mode)
""", "dtype int64"),
    },
    "scale_zero_point": {
        "symmetric_too_many_levels": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        s = torch.maximum(xmin.abs(), xmax.abs()) / 2 ** (bits - 1)
        s = torch.where(s > 0, s, 1.0)
        return s, torch.zeros_like(s)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, torch.round(-lo / s)
""", "divided max|x| by 2^(b-1)"),
        "seeds_multiplier": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        s = (2**bits - 1) / torch.maximum(xmin.abs(), xmax.abs())
        return s, torch.zeros_like(s)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, torch.round(-lo / s)
""", "the multiplier (2^b - 1) / max"),
        "unsigned_count_on_signed_grid": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        s = torch.maximum(xmin.abs(), xmax.abs()) / (2**bits - 1)
        s = torch.where(s > 0, s, 1.0)
        return s, torch.zeros_like(s)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, torch.round(-lo / s)
""", "the unsigned level count"),
        "not_widened": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        s = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        s = torch.where(s > 0, s, 1.0)
        return s, torch.zeros_like(s)
    s = torch.where(xmax > xmin, (xmax - xmin) / qmax, 1.0)
    return s, torch.round(-xmin / s)
""", "not widened to contain 0"),
        "zero_not_rounded": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        s = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        s = torch.where(s > 0, s, 1.0)
        return s, torch.zeros_like(s)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, -lo / s
""", "zero point not rounded"),
        "empty_range_scale_zero": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        s = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        return s, torch.zeros_like(s)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = (hi - lo) / qmax
    return s, torch.round(-lo / s)
""", "empty range"),
        "positive_side_only": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        s = xmax / qmax
        s = torch.where(s > 0, s, 1.0)
        return s, torch.zeros_like(s)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, torch.round(-lo / s)
""", "ignored the negative side"),
        "input_dtype_kept": ("""
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    if symmetric:
        s = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        s = torch.where(s > 0, s, 1.0)
        return s, torch.zeros_like(s)
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / qmax, 1.0)
    return s, torch.round(-lo / s)
""", "expected float32"),
    },
    "quantize": {
        "floor": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = torch.floor(x.float() / scale) + zero
    return q.clamp(qmin, qmax).to(torch.int8 if signed else torch.uint8)
""", "floor instead of round"),
        "no_clamp": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    q = round_half(x.float() / scale, rounding) + zero
    return q.to(torch.int8 if signed else torch.uint8)
""", "no clamp"),
        "zero_forgotten": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = round_half(x.float() / scale, rounding)
    return q.clamp(qmin, qmax).to(torch.int8 if signed else torch.uint8)
""", "zero point forgotten"),
        "rounding_ignored": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = torch.round(x.float() / scale) + zero
    return q.clamp(qmin, qmax).to(torch.int8 if signed else torch.uint8)
""", "rounded half even instead of half away"),
        "multiplied": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = round_half(x.float() * scale, rounding) + zero
    return q.clamp(qmin, qmax).to(torch.int8 if signed else torch.uint8)
""", "multiplied by the scale"),
        "zero_subtracted": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = round_half(x.float() / scale, rounding) - zero
    return q.clamp(qmin, qmax).to(torch.int8 if signed else torch.uint8)
""", "zero point subtracted"),
        "zero_inside_round": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = round_half(x.float() / scale + zero, rounding)
    return q.clamp(qmin, qmax).to(torch.int8 if signed else torch.uint8)
""", "z added before rounding"),
        "always_int8": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = round_half(x.float() / scale, rounding) + zero
    return q.clamp(qmin, qmax).to(torch.int8)
""", "expected uint8"),
        "narrow_clamp": ("""
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = round_half(x.float() / scale, rounding) + zero
    return q.clamp(-qmax if signed else 0, qmax).to(torch.int8 if signed else torch.uint8)
""", "narrow range"),
    },
    "dequantize": {
        "zero_forgotten": ("""
def dequantize(q, scale, zero):
    return scale * q.float()
""", "zero point forgotten"),
        "zero_added": ("""
def dequantize(q, scale, zero):
    return scale * (q.float() + zero)
""", "zero point added"),
        "divided": ("""
def dequantize(q, scale, zero):
    return (q.float() - zero) / scale
""", "divided by the scale"),
        "zero_after_scaling": ("""
def dequantize(q, scale, zero):
    return scale * q.float() - zero
""", "subtracted after scaling"),
        "integer_subtraction": ("""
def dequantize(q, scale, zero):
    return scale * (q - zero.to(q.dtype)).float()
""", None),
        "half_precision": ("""
def dequantize(q, scale, zero):
    return (scale * (q.float() - zero)).half()
""", "expected float32"),
    },
    "block_min_max": {
        "always_per_tensor": ("""
def block_min_max(x, spec):
    return x.amin(), x.amax()
""", "one value per index of that axis"),
        "axes_swapped": ("""
def block_min_max(x, spec):
    if spec.granularity == "channel":
        return x.amin(dim=spec.axis), x.amax(dim=spec.axis)
    return block_reduce(x, spec, lambda r: r.amin(dim=1)), block_reduce(x, spec, lambda r: r.amax(dim=1))
""", "axes swapped"),
        "strided_groups": ("""
def block_min_max(x, spec):
    if spec.granularity == "group":
        g = spec.group_size
        if x.shape[-1] % g:
            raise ValueError("group size")
        r = x.reshape(*x.shape[:-1], g, x.shape[-1] // g)
        return r.amin(dim=-2), r.amax(dim=-2)
    return block_reduce(x, spec, lambda r: r.amin(dim=1)), block_reduce(x, spec, lambda r: r.amax(dim=1))
""", "strided elements"),
        "reshape_without_movedim": ("""
def block_min_max(x, spec):
    if spec.granularity == "channel":
        if not -x.dim() <= spec.axis < x.dim():
            raise ValueError("axis")
        rows = x.reshape(x.shape[spec.axis], -1)
        return rows.amin(dim=1), rows.amax(dim=1)
    return block_reduce(x, spec, lambda r: r.amin(dim=1)), block_reduce(x, spec, lambda r: r.amax(dim=1))
""", None),
        "no_group_check": ("""
def block_min_max(x, spec):
    if spec.granularity == "group":
        r = x.reshape(-1, spec.group_size)
        return r.amin(dim=1).reshape(*x.shape[:-1], -1), r.amax(dim=1).reshape(*x.shape[:-1], -1)
    return block_reduce(x, spec, lambda r: r.amin(dim=1)), block_reduce(x, spec, lambda r: r.amax(dim=1))
""", "expected ValueError"),
        "no_axis_check": ("""
def block_min_max(x, spec):
    if spec.granularity == "channel":
        rows = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
        return rows.amin(dim=1), rows.amax(dim=1)
    return block_reduce(x, spec, lambda r: r.amin(dim=1)), block_reduce(x, spec, lambda r: r.amax(dim=1))
""", "expected ValueError"),
        "per_tensor_as_one_element": ("""
def block_min_max(x, spec):
    if spec.granularity == "tensor":
        return x.reshape(1, -1).amin(dim=1), x.reshape(1, -1).amax(dim=1)
    return block_reduce(x, spec, lambda r: r.amin(dim=1)), block_reduce(x, spec, lambda r: r.amax(dim=1))
""", "0-dim tensor"),
    },
    "fake_quantize": {
        "always_per_tensor": ("""
def fake_quantize(x, spec):
    x32 = check_tensor(x).float()
    s, z = scale_zero_point(x32.amin(), x32.amax(), spec.bits, spec.symmetric)
    return dequantize(quantize(x32, s, z, spec.bits, spec.symmetric, spec.rounding), s, z).to(x.dtype)
""", "one scale for the whole tensor"),
        "rounding_ignored": ("""
def fake_quantize(x, spec):
    x32 = check_tensor(x).float()
    lo, hi = block_min_max(x32, spec)
    s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    s, z = expand_to(s, x32, spec), expand_to(z, x32, spec)
    return dequantize(quantize(x32, s, z, spec.bits, spec.symmetric), s, z).to(x.dtype)
""", "spec.rounding ignored"),
        "zero_forgotten_in_dequantize": ("""
def fake_quantize(x, spec):
    x32 = check_tensor(x).float()
    lo, hi = block_min_max(x32, spec)
    s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    s, z = expand_to(s, x32, spec), expand_to(z, x32, spec)
    return (s * quantize(x32, s, z, spec.bits, spec.symmetric, spec.rounding).float()).to(x.dtype)
""", "zero point forgotten when dequantizing"),
        "no_input_check": ("""
def fake_quantize(x, spec):
    x32 = x.float()
    lo, hi = block_min_max(x32, spec)
    s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    s, z = expand_to(s, x32, spec), expand_to(z, x32, spec)
    return dequantize(quantize(x32, s, z, spec.bits, spec.symmetric, spec.rounding), s, z).to(x.dtype)
""", "instead of raising"),
        "float32_result": ("""
def fake_quantize(x, spec):
    x32 = check_tensor(x).float()
    lo, hi = block_min_max(x32, spec)
    s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    s, z = expand_to(s, x32, spec), expand_to(z, x32, spec)
    return dequantize(quantize(x32, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
""", "expected float64"),
        "seeds_multiplier": ("""
def fake_quantize(x, spec):
    x32 = check_tensor(x).float()
    lo, hi = block_min_max(x32, spec)
    if spec.symmetric:
        m = (2**spec.bits - 1) / torch.maximum(lo.abs(), hi.abs())
        m = expand_to(torch.where(m.isfinite(), m, 1.0), x32, spec)
        qmin, qmax = quant_range(spec.bits, True)
        return (torch.clamp(torch.round(x32 * m), qmin, qmax) / m).to(x.dtype)
    s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    s, z = expand_to(s, x32, spec), expand_to(z, x32, spec)
    return dequantize(quantize(x32, s, z, spec.bits, spec.symmetric, spec.rounding), s, z).to(x.dtype)
""", "the multiplier (2^b - 1) / max|x|: the unsigned level count"),
        "channel_axis_ignored": ("""
def fake_quantize(x, spec):
    x32 = check_tensor(x).float()
    lo, hi = block_min_max(x32, spec)
    s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[-1] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    else:
        s, z = expand_to(s, x32, spec), expand_to(z, x32, spec)
    return dequantize(quantize(x32, s, z, spec.bits, spec.symmetric, spec.rounding), s, z).to(x.dtype)
""", None),
        "asymmetric_not_widened": ("""
def fake_quantize(x, spec):
    x32 = check_tensor(x).float()
    lo, hi = block_min_max(x32, spec)
    qmin, qmax = quant_range(spec.bits, spec.symmetric)
    if spec.symmetric:
        s, z = scale_zero_point(lo, hi, spec.bits, True)
    else:
        s = torch.where(hi > lo, (hi - lo) / qmax, 1.0)
        z = torch.round(-lo / s)
    s, z = expand_to(s, x32, spec), expand_to(z, x32, spec)
    q = torch.clamp(round_half(x32 / s, spec.rounding) + z, qmin, qmax)
    return (s * (q - z)).to(x.dtype)
""", "range not widened to contain 0"),
    },
    "mse_range": {
        "no_search": ("""
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    if not isinstance(grid, int) or grid < 1 or not 0 < max_shrink < 1 or not norm > 0:
        raise ValueError("bad parameters")
    return block_min_max(x, spec)
""", "no search"),
        "stops_one_early": ("""
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    if not isinstance(grid, int) or grid < 1 or not 0 < max_shrink < 1 or not norm > 0:
        raise ValueError("bad parameters")
    xmin, xmax = block_min_max(x, spec)
    best_p, best_err = torch.ones_like(xmin), torch.full_like(xmin, math.inf)
    for i in range(round(max_shrink * grid)):
        p = 1 - i / grid
        s, z = scale_zero_point(p * xmin, p * xmax, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        err = block_reduce((x - x_hat).abs() ** norm, spec, lambda r: r.sum(dim=1))
        best_p = torch.where(err < best_err, p, best_p)
        best_err = torch.minimum(err, best_err)
    return best_p * xmin, best_p * xmax
""", "p = 1 - max_shrink was never tried"),
        "one_factor_for_all_blocks": ("""
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    if not isinstance(grid, int) or grid < 1 or not 0 < max_shrink < 1 or not norm > 0:
        raise ValueError("bad parameters")
    xmin, xmax = block_min_max(x, spec)
    best_p, best_err = 1.0, math.inf
    for i in range(round(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = scale_zero_point(p * xmin, p * xmax, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        err = ((x - x_hat).abs() ** norm).sum().item()
        if err < best_err:
            best_p, best_err = p, err
    return best_p * xmin, best_p * xmax
""", "one factor p for the whole tensor"),
        "squared_error": ("""
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    if not isinstance(grid, int) or grid < 1 or not 0 < max_shrink < 1 or not norm > 0:
        raise ValueError("bad parameters")
    xmin, xmax = block_min_max(x, spec)
    best_p, best_err = torch.ones_like(xmin), torch.full_like(xmin, math.inf)
    for i in range(round(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = scale_zero_point(p * xmin, p * xmax, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        err = block_reduce((x - x_hat) ** 2, spec, lambda r: r.sum(dim=1))
        best_p = torch.where(err < best_err, p, best_p)
        best_err = torch.minimum(err, best_err)
    return best_p * xmin, best_p * xmax
""", "squared error (norm 2)"),
        "only_xmax_shrunk": ("""
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    if not isinstance(grid, int) or grid < 1 or not 0 < max_shrink < 1 or not norm > 0:
        raise ValueError("bad parameters")
    xmin, xmax = block_min_max(x, spec)
    best_p, best_err = torch.ones_like(xmin), torch.full_like(xmin, math.inf)
    for i in range(round(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = scale_zero_point(xmin, p * xmax, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        err = block_reduce((x - x_hat).abs() ** norm, spec, lambda r: r.sum(dim=1))
        best_p = torch.where(err < best_err, p, best_p)
        best_err = torch.minimum(err, best_err)
    return xmin, best_p * xmax
""", "only xmax was shrunk"),
        "widened_result": ("""
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    if not isinstance(grid, int) or grid < 1 or not 0 < max_shrink < 1 or not norm > 0:
        raise ValueError("bad parameters")
    xmin, xmax = block_min_max(x, spec)
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    best_p, best_err = torch.ones_like(xmin), torch.full_like(xmin, math.inf)
    for i in range(round(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = scale_zero_point(p * xmin, p * xmax, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        err = block_reduce((x - x_hat).abs() ** norm, spec, lambda r: r.sum(dim=1))
        best_p = torch.where(err < best_err, p, best_p)
        best_err = torch.minimum(err, best_err)
    return best_p * xmin, best_p * xmax
""", None),
        "no_parameter_checks": ("""
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    xmin, xmax = block_min_max(x, spec)
    best_p, best_err = torch.ones_like(xmin), torch.full_like(xmin, math.inf)
    for i in range(math.floor(max_shrink * grid) + 1):
        p = 1 - i / grid
        s, z = scale_zero_point(p * xmin, p * xmax, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        err = block_reduce((x - x_hat).abs() ** norm, spec, lambda r: r.sum(dim=1))
        best_p = torch.where(err < best_err, p, best_p)
        best_err = torch.minimum(err, best_err)
    return best_p * xmin, best_p * xmax
""", "expected ValueError"),
    },
}

# function -> {version name: source}: other correct ways to write it (full marks required)
CORRECT = {
    "quant_range": {
        "range_membership": """
def quant_range(bits, signed):
    if bits not in range(2, 9) or isinstance(bits, bool):
        raise ValueError(f"bits must be 2..8, got {bits}")
    half = 2 ** (bits - 1)
    return (-half, half - 1) if signed else (0, 2 * half - 1)
""",
        "offset": """
def quant_range(bits, signed):
    if type(bits) is not int or bits < 2 or bits > 8:
        raise ValueError("bits must be an integer from 2 to 8")
    low = -(1 << (bits - 1)) if signed else 0
    return low, low + (1 << bits) - 1
""",
    },
    "round_half": {
        "by_fraction": """
def round_half(x, mode="half_even"):
    if mode not in ("half_even", "half_away"):
        raise ValueError(f"unknown mode {mode}")
    f = torch.floor(x)
    d = x - f
    if mode == "half_even":
        tie = torch.where(torch.remainder(f, 2) == 0, f, f + 1)
    else:
        tie = torch.where(x >= 0, f + 1, f)
    return torch.where(d > 0.5, f + 1, torch.where(d < 0.5, f, tie))
""",
        "where_sign": """
def round_half(x, mode="half_even"):
    if mode == "half_even":
        return x.round()
    if mode == "half_away":
        return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))
    raise ValueError(mode)
""",
    },
    "scale_zero_point": {
        "other_order": """
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    lo, hi = xmin.to(torch.float32), xmax.to(torch.float32)
    if symmetric:
        amax = torch.stack([lo.abs(), hi.abs()]).amax(dim=0)
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / qmax)
        return scale, torch.zeros_like(scale)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    width = hi - lo
    scale = torch.where(width == 0, torch.ones_like(width), width / (2**bits - 1))
    return scale, -torch.round(lo / scale)
""",
        "elementwise_loop": """
def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = quant_range(bits, symmetric)
    scales, zeros = [], []
    for lo, hi in zip(xmin.float().reshape(-1).tolist(), xmax.float().reshape(-1).tolist()):
        if symmetric:
            s = max(abs(lo), abs(hi)) / qmax
            z = 0.0
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            s = (hi - lo) / (qmax - qmin)
        s = torch.tensor(s, dtype=torch.float32).item() if s > 0 else 1.0
        if not symmetric:
            z = float(torch.round(torch.tensor(-lo, dtype=torch.float32) / torch.tensor(s, dtype=torch.float32)))
        scales.append(s)
        zeros.append(z)
    shape = xmin.shape
    return torch.tensor(scales, dtype=torch.float32).reshape(shape), torch.tensor(zeros, dtype=torch.float32).reshape(shape)
""",
    },
    "quantize": {
        "integer_arithmetic": """
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    q = round_half(x.to(torch.float32) / scale, rounding).to(torch.int32) + zero.to(torch.int32)
    return q.clamp(min=qmin).clamp(max=qmax).to(torch.int8 if signed else torch.uint8)
""",
        "minimum_maximum": """
def quantize(x, scale, zero, bits, signed, rounding="half_even"):
    qmin, qmax = quant_range(bits, signed)
    t = round_half(x.float() / scale, rounding) + zero
    t = torch.maximum(torch.minimum(t, torch.tensor(float(qmax))), torch.tensor(float(qmin)))
    return t.to(dtype=torch.int8 if signed else torch.uint8)
""",
    },
    "dequantize": {
        "codes_first": """
def dequantize(q, scale, zero):
    return (q.to(torch.float32) - zero) * scale
""",
        "expanded": """
def dequantize(q, scale, zero):
    return q.float() * scale - zero * scale
""",
    },
    "block_min_max": {
        "unfold_and_amin": """
def block_min_max(x, spec):
    if spec.granularity == "tensor":
        return x.min(), x.max()
    if spec.granularity == "channel":
        if spec.axis >= x.dim() or spec.axis < -x.dim():
            raise ValueError("no such axis")
        others = [d for d in range(x.dim()) if d != spec.axis % x.dim()]
        if not others:
            return x.clone(), x.clone()
        return x.amin(dim=others), x.amax(dim=others)
    if x.shape[-1] % spec.group_size != 0:
        raise ValueError("group_size must divide the last dimension")
    blocks = x.unfold(-1, spec.group_size, spec.group_size)
    return blocks.amin(dim=-1), blocks.amax(dim=-1)
""",
        "python_loop": """
def block_min_max(x, spec):
    if spec.granularity == "tensor":
        return x.amin(), x.amax()
    if spec.granularity == "channel":
        if not -x.dim() <= spec.axis < x.dim():
            raise ValueError("no such axis")
        slices = [x.select(spec.axis, i) for i in range(x.shape[spec.axis])]
        return torch.stack([s.min() for s in slices]), torch.stack([s.max() for s in slices])
    g = spec.group_size
    if x.shape[-1] % g:
        raise ValueError("group_size must divide the last dimension")
    parts = x.split(g, dim=-1)
    return torch.stack([p.amin(dim=-1) for p in parts], dim=-1), torch.stack([p.amax(dim=-1) for p in parts], dim=-1)
""",
    },
    "fake_quantize": {
        "reshaped_blocks": """
def fake_quantize(x, spec):
    if not torch.is_tensor(x) or not torch.is_floating_point(x):
        raise TypeError("x must be a float tensor")
    if torch.isnan(x).any() or torch.isinf(x).any():
        raise ValueError("x has NaN or inf")
    lo, hi = block_min_max(x.float(), spec)
    s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    if spec.granularity == "group":
        shape = (*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)
        xb = x.float().reshape(shape)
        s, z = s.unsqueeze(-1), z.unsqueeze(-1)
        out = dequantize(quantize(xb, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        return out.reshape(x.shape).to(x.dtype)
    if spec.granularity == "channel":
        view = [1] * x.dim()
        view[spec.axis] = -1
        s, z = s.reshape(view), z.reshape(view)
    out = dequantize(quantize(x.float(), s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
    return out.to(x.dtype)
""",
        "explicit_steps": """
def fake_quantize(x, spec):
    x = check_tensor(x)
    work = x.to(torch.float32)
    lo, hi = block_min_max(work, spec)
    scale, zero = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
    qmin, qmax = quant_range(spec.bits, spec.symmetric)
    s, z = expand_to(scale, work, spec), expand_to(zero, work, spec)
    codes = torch.clamp(round_half(work / s, spec.rounding) + z, qmin, qmax)
    return ((codes - z) * s).type(x.dtype)
""",
    },
    "mse_range": {
        "all_candidates_then_argmin": """
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).to(torch.float32)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError("grid")
    if max_shrink <= 0 or max_shrink >= 1:
        raise ValueError("max_shrink")
    if norm <= 0:
        raise ValueError("norm")
    xmin, xmax = block_min_max(x, spec)
    factors = 1 - torch.arange(int(max_shrink * grid + 1e-9) + 1, dtype=torch.float32) / grid
    errors = []
    for p in factors:
        s, z = scale_zero_point(p * xmin, p * xmax, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        errors.append(block_reduce((x - x_hat).abs().pow(norm), spec, lambda r: r.sum(dim=1)))
    best = factors[torch.stack(errors).argmin(dim=0)]  # argmin returns the first minimum: the largest p
    return best * xmin, best * xmax
""",
        "python_floats": """
def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    x = check_tensor(x).float()
    if type(grid) is not int or grid < 1 or not (0 < max_shrink < 1) or not (norm > 0):
        raise ValueError("grid >= 1, 0 < max_shrink < 1 and norm > 0 are required")
    xmin, xmax = block_min_max(x, spec)
    best_lo, best_hi = xmin.clone(), xmax.clone()
    best_err = None
    steps = round(max_shrink * grid)
    for i in range(steps + 1):
        p = (grid - i) / grid
        lo, hi = xmin * p, xmax * p
        s, z = scale_zero_point(lo, hi, spec.bits, spec.symmetric)
        s, z = expand_to(s, x, spec), expand_to(z, x, spec)
        x_hat = dequantize(quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding), s, z)
        err = block_reduce(torch.abs(x - x_hat) ** norm, spec, lambda r: r.sum(1))
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        best_err = torch.where(better, err, best_err)
    return best_lo, best_hi
""",
    },
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab01")) as box:
        yield box


@pytest.mark.parametrize("function, version", [(f, v) for f, versions in WRONG.items() for v in versions])
def test_wrong_version_loses_points(sandbox, function, version):
    check_loses_points(grade_version(LAB, sandbox, function, version), f"{function}__{version}", WRONG[function][version][1])


@pytest.mark.parametrize("function, version", [(f, v) for f, versions in CORRECT.items() for v in versions] + [(f, None) for f in WRONG])
def test_correct_version_gets_full_marks(sandbox, function, version):
    check_full_marks(grade_version(LAB, sandbox, function, version))


def test_catalog_covers_every_graded_function():
    check_catalog_covers(LAB, WRONG, CORRECT)


def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


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


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    check_solution_cells_hold_only(NOTEBOOK)
