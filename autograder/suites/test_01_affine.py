"""Hidden suite of lab 01 (affine quantization).

Every graded function has fixed cases (hand-picked, exact), randomized cases (seeded
generators) and edge cases (empty ranges, ties, bits 2 and 8, bad input), each a separate case
group so that partial credit works. Expected values come from the reference in this process.

Allowances: the lab asks for an integer zero point, half-to-even rounding unless `rounding` says
otherwise, and float32 scales; integer codes are compared exactly, float results with the default
tolerance of `expect_close` (so x / s and x * (1 / s) both pass). No case puts a value within a
rounding error of a tie except the exact ties, which the lab specifies.

The outputs of the common mistakes, each from a small wrong implementation below, are computed
when a learner's output differs from the reference, and passed as `variants=` so that the
feedback names the mistake the learner made.
"""

from dataclasses import replace

import pytest
import torch

from quantcourse.autograder.testing import Mismatch, expect_close, expect_raises, graded
from quantcourse.reference_impl import affine, calibration
from quantcourse.reference_impl.affine import AffineSpec

GRADED = {
    "quant_range": affine.quant_range,
    "round_half": affine.round_half,
    "scale_zero_point": affine.scale_zero_point,
    "quantize": affine.quantize,
    "dequantize": affine.dequantize,
    "block_min_max": affine.block_min_max,
    "fake_quantize": affine.fake_quantize,
    "mse_range": calibration.mse_range,
}


@pytest.fixture(autouse=True)
def one_thread():
    """The suite's tensors are tiny: on a busy machine, waking a second thread for each small
    reduction costs milliseconds (100x the work itself), so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def heavy_tailed(shape, seed: int) -> torch.Tensor:
    """Gaussian values with a few large ones, like a weight matrix with outliers."""
    g = generator(seed)
    x = torch.randn(shape, generator=g)
    boost = torch.where(torch.rand(shape, generator=g) < 0.03, 6.0, 1.0)
    return x * boost


def nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


def explains_all(got, variant, rtol: float, atol: float) -> bool:
    """Whether a mistake's outputs equal every element of the learner's tuple."""
    return all(
        isinstance(g, torch.Tensor) and isinstance(v, torch.Tensor) and g.shape == v.shape
        and torch.allclose(g.double(), v.double(), rtol=rtol, atol=atol, equal_nan=True)
        for g, v in zip(got, variant)
    )  # fmt: skip


def compare(got, expected, variants, rtol: float = 1e-5, atol: float = 1e-6, **kwargs) -> None:
    """expect_close, with the known mistakes (a callable: some are costly) computed only when
    the learner's output differs, to name the mistake in the feedback. For a tuple, mistakes
    that explain every element come first (two mistakes may share one element)."""
    try:
        expect_close(got, expected, rtol=rtol, atol=atol, **kwargs)
    except Mismatch:
        found = variants()
        if isinstance(expected, tuple) and isinstance(got, (tuple, list)) and len(got) == len(expected):
            whole = {k: v for k, v in found.items() if isinstance(v, tuple) and explains_all(got, v, rtol, atol)}
            found = whole or found
        expect_close(got, expected, variants=found, rtol=rtol, atol=atol, **kwargs)


# ---------------------------------------------------------------------------------------------
# quant_range


def range_as_tensor(got, call: str) -> torch.Tensor:
    """The learner's (qmin, qmax) as a float tensor, after checking it is a pair of integers."""
    def integral(v):
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            v = v.item()
        return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()

    if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(integral(v) for v in got):
        raise Mismatch(f"{call} should return a tuple of two integers (qmin, qmax), got {got!r}"[:300])
    return torch.tensor([float(v.item() if isinstance(v, torch.Tensor) else v) for v in got])


def range_variants(bits: int, signed: bool) -> dict:
    n = 2**bits
    if signed:
        wrong = {
            "one level too many at the top: qmax = 2^(b-1) instead of 2^(b-1) - 1": (-n // 2, n // 2),
            "the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1]: the lab asks for the full range down to -2^(b-1)": (-n // 2 + 1, n // 2 - 1),
            "the unsigned range [0, 2^b - 1] for a signed grid": (0, n - 1),
            "the range [-(2^b - 1), 2^b - 1]: that is 2^(b+1) - 1 levels, not 2^b": (-(n - 1), n - 1),
        }
    else:
        wrong = {
            "one level too many: qmax = 2^b instead of 2^b - 1": (0, n),
            "the signed range for an unsigned grid": (-n // 2, n // 2 - 1),
            "qmax = 2^(b-1) - 1, the signed maximum": (0, n // 2 - 1),
        }
    return {name: torch.tensor([float(lo), float(hi)]) for name, (lo, hi) in wrong.items()}


def check_range(learner, bits, signed):
    call = f"quant_range({bits}, signed={signed})"
    got = range_as_tensor(learner.quant_range(bits, signed), call)
    expected = torch.tensor([float(v) for v in affine.quant_range(bits, signed)])
    compare(got, expected, lambda: range_variants(bits, signed), call=call, what="ends", rtol=0.0, atol=0.0)


@graded("01.quant_range", points=2)
def test_quant_range_int4_int8(learner):
    for bits in (4, 8):
        for signed in (True, False):
            check_range(learner, bits, signed)


@graded("01.quant_range", points=2)
def test_quant_range_every_width(learner):
    for bits in (2, 3, 5, 6, 7):
        for signed in (True, False):
            check_range(learner, bits, signed)


@graded("01.quant_range", points=2)
def test_quant_range_refuses_bad_bits(learner):
    for bits in (1, 9, 0, 4.5):
        expect_raises(lambda: learner.quant_range(bits, True), (ValueError,), call=f"quant_range({bits!r}, True)",
                      why="bits must be an integer from 2 to 8")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# round_half

TIES = torch.tensor([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -1.7, -0.2, 0.3, 0.7, 2.49, 2.51, 0.0, 4.0])


def round_variants(x: torch.Tensor, mode: str) -> dict:
    other = "half_away" if mode == "half_even" else "half_even"
    return {
        f"rounded {other.replace('_', ' ')} instead of {mode.replace('_', ' ')}": affine.round_half(x, other),
        "rounded half up, floor(x + 0.5): negative ties go up (-2.5 -> -2)": torch.floor(x + 0.5),
        "floor instead of round": torch.floor(x),
        "truncation toward zero instead of round": torch.trunc(x),
        "ceil instead of round": torch.ceil(x),
    }


def check_round(learner, x, mode, call=None):
    call = call or f"round_half(x, {mode!r})"
    got = learner.round_half(x, mode)
    compare(got, affine.round_half(x, mode), lambda: round_variants(x, mode), call=call, inputs={"x": x}, rtol=0.0, atol=0.0)


@graded("01.round_half", points=2)
def test_round_half_even_fixed(learner):
    check_round(learner, TIES, "half_even")


@graded("01.round_half", points=2)
def test_round_half_away_fixed(learner):
    check_round(learner, TIES, "half_away")


@graded("01.round_half", points=2)
def test_round_half_randomized(learner):
    g = generator(101)
    x = torch.randn(6, 9, generator=g) * 20
    ties = torch.rand(6, 9, generator=g) < 0.3
    x = torch.where(ties, torch.floor(x) + 0.5, x)  # exact ties, both signs
    for mode in ("half_even", "half_away"):
        check_round(learner, x, mode)


@graded("01.round_half", points=1)
def test_round_half_default_dtype_and_shape(learner):
    x = TIES[:8]
    got = learner.round_half(x)
    compare(got, affine.round_half(x), lambda: round_variants(x, "half_even"), call="round_half(x) (mode left at its default)",
            inputs={"x": x}, rtol=0.0, atol=0.0)  # fmt: skip
    x64 = torch.tensor([[2.5, -0.5], [1.25, -7.5]], dtype=torch.float64)
    for mode in ("half_even", "half_away"):
        check_round(learner, x64, mode, call=f"round_half(x float64 [2, 2], {mode!r})")
        check_round(learner, torch.tensor(-2.5), mode, call=f"round_half(0-dim tensor -2.5, {mode!r})")
        check_round(learner, torch.empty(0, 3), mode, call=f"round_half(empty [0, 3] tensor, {mode!r})")


@graded("01.round_half", points=1)
def test_round_half_refuses_unknown_mode(learner):
    expect_raises(lambda: learner.round_half(TIES, "half_up"), (ValueError,), call="round_half(x, 'half_up')",
                  why="the only modes are 'half_even' and 'half_away'")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# scale_zero_point (integer zero point)


def scale_variants(xmin, xmax, bits, symmetric) -> dict:
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        qmax = 2 ** (bits - 1) - 1
        zero = torch.zeros_like(amax)
        return {
            "one level too many: divided max|x| by 2^(b-1) instead of 2^(b-1) - 1": (nonzero(amax / 2 ** (bits - 1)), zero),
            "divided by 2^b - 1, the unsigned level count: a signed grid only reaches 2^(b-1) - 1": (nonzero(amax / (2**bits - 1)), zero),
            "the multiplier (2^b - 1) / max instead of the step s = max / (2^(b-1) - 1)": ((2**bits - 1) / amax, zero),
            "used xmax alone and ignored the negative side (max |x| is max(|xmin|, |xmax|))": (nonzero(xmax / qmax), zero),
            "the asymmetric width (xmax - xmin) on a symmetric grid": (nonzero((xmax - xmin) / qmax), zero),
            "the asymmetric formula (xmax - xmin) / (2^b - 1) on a symmetric grid": (nonzero((xmax - xmin) / (2**bits - 1)), zero),
            "an empty range (max |x| = 0) gave scale 0 instead of 1": (amax / qmax, zero),
        }
    qmax = 2**bits - 1
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = nonzero((hi - lo) / qmax)
    s_levels = nonzero((hi - lo) / 2**bits)
    s_raw = nonzero((xmax - xmin) / qmax)
    return {
        "one level too many: divided by 2^b instead of 2^b - 1": (s_levels, torch.round(-lo / s_levels)),
        "range not widened to contain 0 (use min(xmin, 0) and max(xmax, 0))": (s_raw, torch.round(-xmin / s_raw)),
        "zero point not rounded to an integer": (s, -lo / s),
        "zero point with the wrong sign: xmin / s instead of -xmin / s": (s, torch.round(lo / s)),
        "the symmetric step max|x| / (2^b - 1) on an asymmetric grid": (nonzero(torch.maximum(lo.abs(), hi) / qmax), torch.round(-lo / s)),
        "an empty range (xmin = xmax = 0) gave scale 0 instead of 1": ((hi - lo) / qmax, torch.round(-lo / ((hi - lo) / qmax))),
    }


def check_scale(learner, xmin, xmax, bits, symmetric, what=""):
    call = f"scale_zero_point(xmin, xmax, bits={bits}, symmetric={symmetric}){what}"
    compare(
        learner.scale_zero_point(xmin, xmax, bits, symmetric),
        affine.scale_zero_point(xmin, xmax, bits, symmetric),
        lambda: scale_variants(xmin, xmax, bits, symmetric),
        call=call,
        inputs={"xmin": xmin, "xmax": xmax},
    )


@graded("01.scale_zero_point", points=3)
def test_scale_symmetric_fixed(learner):
    xmin, xmax = torch.tensor([-1.0, -0.5, -3.0, -0.25]), torch.tensor([0.5, 2.0, 1.0, 0.75])
    for bits in (8, 4):
        check_scale(learner, xmin, xmax, bits, True)
    check_scale(learner, torch.tensor(-6.0), torch.tensor(2.0), 3, True, " (0-dim range)")


@graded("01.scale_zero_point", points=3)
def test_scale_asymmetric_fixed(learner):
    xmin, xmax = torch.tensor([-1.0, -0.3, -3.0, -0.9]), torch.tensor([0.5, 2.0, 1.0, 0.3])
    for bits in (4, 8):
        check_scale(learner, xmin, xmax, bits, False)
    check_scale(learner, torch.tensor(-1.0), torch.tensor(3.0), 2, False, " (0-dim range)")


@graded("01.scale_zero_point", points=3)
def test_scale_randomized(learner):
    w = heavy_tailed((16, 48), 202)
    per_row = (w.amin(dim=1), w.amax(dim=1))
    groups = w.reshape(16, 3, 16)
    per_group = (groups.amin(dim=-1), groups.amax(dim=-1))
    for bits in (2, 3, 4, 5, 8):
        for symmetric in (True, False):
            check_scale(learner, *per_row, bits, symmetric, " (per-row ranges of a random matrix)")
            check_scale(learner, *per_group, bits, symmetric, " (per-group ranges, shape [16, 3])")


@graded("01.scale_zero_point", points=2)
def test_scale_range_must_contain_zero(learner):
    xmin, xmax = torch.tensor([0.5, -2.0, 0.25, -4.0]), torch.tensor([2.0, -0.5, 3.0, -1.0])
    for bits in (2, 4, 8):
        check_scale(learner, xmin, xmax, bits, False, " (all-positive and all-negative blocks)")
        check_scale(learner, xmin, xmax, bits, True, " (all-positive and all-negative blocks)")


@graded("01.scale_zero_point", points=2)
def test_scale_empty_ranges(learner):
    xmin, xmax = torch.tensor([0.0, 0.7, -1.0, 0.0]), torch.tensor([0.0, 0.7, 1.0, 0.0])
    for symmetric in (True, False):
        check_scale(learner, xmin, xmax, 4, symmetric, " (some blocks have xmin = xmax)")
    zero = torch.zeros(3, 2)
    for symmetric in (True, False):
        check_scale(learner, zero, zero, 8, symmetric, " (all-zero blocks)")


@graded("01.scale_zero_point", points=1)
def test_scale_float32_out_and_bad_bits(learner):
    xmin, xmax = torch.tensor([-1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    for symmetric in (True, False):
        check_scale(learner, xmin, xmax, 4, symmetric, " with float64 inputs (the result is float32)")
        check_scale(learner, xmin.half(), xmax.half(), 4, symmetric, " with float16 inputs (the result is float32)")
    for bits in (1, 9):
        expect_raises(lambda: learner.scale_zero_point(xmin.float(), xmax.float(), bits, False), (ValueError,),
                      call=f"scale_zero_point(xmin, xmax, bits={bits}, symmetric=False)", why="bits must be from 2 to 8")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# quantize


def quantize_variants(x, scale, zero, bits, signed, rounding="half_even") -> dict:
    qmin, qmax = affine.quant_range(bits, signed)
    dtype = torch.int8 if signed else torch.uint8
    t = x.float() / scale
    r = affine.round_half(t, rounding)
    other = "half_away" if rounding == "half_even" else "half_even"

    def codes(v, lo=qmin, hi=qmax):
        return torch.clamp(v, lo, hi).to(dtype)

    variants = {
        "floor instead of round": codes(torch.floor(t) + zero),
        "truncation toward zero instead of round": codes(torch.trunc(t) + zero),
        f"rounded {other.replace('_', ' ')} instead of {rounding.replace('_', ' ')}": codes(affine.round_half(t, other) + zero),
        "rounded half up, floor(x / s + 0.5)": codes(torch.floor(t + 0.5) + zero),
        "zero point forgotten": codes(r),
        "zero point subtracted instead of added": codes(r - zero),
        "z added before rounding, round(x / s + z): a tie then rounds differently when z is odd; round x / s first": (
            codes(affine.round_half(t + zero, rounding))),  # fmt: skip
        "multiplied by the scale instead of dividing": codes(affine.round_half(x.float() * scale, rounding) + zero),
        "no clamp: codes outside [qmin, qmax] wrapped around in the integer dtype": (r + zero).to(dtype),
        "clamped to the range of the other grid (signed vs unsigned)": codes(r + zero, *affine.quant_range(bits, not signed)),
    }
    if signed:
        variants["clamped to the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1]"] = codes(r + zero, qmin + 1, qmax)
    return variants


def check_quantize(learner, x, scale, zero, bits, signed, rounding=None, what=""):
    args = (x, scale, zero, bits, signed) + ((rounding,) if rounding else ())
    shown = f", rounding={rounding!r}" if rounding else ""
    compare(
        learner.quantize(*args),
        affine.quantize(*args),
        lambda: quantize_variants(x, scale, zero, bits, signed, rounding or "half_even"),
        call=f"quantize(x, scale, zero, bits={bits}, signed={signed}{shown}){what}",
        inputs={"x": x, "scale": scale, "zero": zero},
        what="codes",
    )


@graded("01.quantize", points=2)
def test_quantize_signed_fixed(learner):
    x = torch.tensor([-1.5, -0.9, -0.3, 0.0, 0.2, 0.45, 0.8, 2.0])
    check_quantize(learner, x, torch.tensor(0.125), torch.tensor(0.0), 4, True)
    check_quantize(learner, x, torch.tensor(0.01), torch.tensor(0.0), 8, True)


@graded("01.quantize", points=2)
def test_quantize_unsigned_fixed(learner):
    x = torch.tensor([-1.5, -0.9, -0.3, 0.0, 0.2, 0.45, 0.8, 2.0])
    check_quantize(learner, x, torch.tensor(0.25), torch.tensor(6.0), 4, False)
    check_quantize(learner, x, torch.tensor(0.02), torch.tensor(100.0), 8, False)


@graded("01.quantize", points=2)
def test_quantize_ties_and_rounding_modes(learner):
    s = torch.tensor(0.125)  # a power of two: x / s is exact, so these are true ties
    x = torch.tensor([-0.3125, -0.1875, -0.0625, 0.0625, 0.1875, 0.3125, 0.4375, -0.4375])
    for rounding in ("half_even", "half_away"):
        check_quantize(learner, x, s, torch.tensor(0.0), 4, True, rounding)
        check_quantize(learner, x, s, torch.tensor(7.0), 4, False, rounding)
    check_quantize(learner, x, s, torch.tensor(0.0), 4, True, what=" (rounding left at its default)")


@graded("01.quantize", points=3)
def test_quantize_randomized_per_channel(learner):
    w = heavy_tailed((12, 40), 303)
    for bits in (3, 4, 8):
        for symmetric in (True, False):
            s, z = affine.scale_zero_point(w.amin(dim=1) * 0.8, w.amax(dim=1) * 0.8, bits, symmetric)  # clipped: some saturate
            check_quantize(learner, w, s[:, None], z[:, None], bits, symmetric, what=" (scale and zero of shape [12, 1])")
    s, z = affine.scale_zero_point(w.amin(dim=0), w.amax(dim=0), 4, False)
    check_quantize(learner, w, s, z, 4, False, "half_away", " (scale and zero of shape [40], one per column)")


@graded("01.quantize", points=2)
def test_quantize_saturates_at_2_and_8_bits(learner):
    x = torch.tensor([-1000.0, -3.0, -1.2, -0.4, 0.0, 0.4, 1.2, 3.0, 1000.0])
    for bits in (2, 8):
        check_quantize(learner, x, torch.tensor(0.5), torch.tensor(0.0), bits, True, what=" (far values saturate)")
        check_quantize(learner, x, torch.tensor(0.5), torch.tensor(float(2 ** (bits - 1))), bits, False, what=" (far values saturate)")


@graded("01.quantize", points=2)
def test_quantize_dtypes_and_bad_bits(learner):
    x = torch.tensor([[0.3, -0.7], [1.9, -2.2]])
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        check_quantize(learner, x.to(dtype), torch.tensor(0.25), torch.tensor(0.0), 4, True, what=f" with x in {dtype}")
        check_quantize(learner, x.to(dtype), torch.tensor(0.25), torch.tensor(9.0), 4, False, what=f" with x in {dtype}")
    check_quantize(learner, torch.tensor(0.3), torch.tensor(0.25), torch.tensor(0.0), 8, True, what=" with a 0-dim x")
    for bits in (1, 9):
        expect_raises(lambda: learner.quantize(x, torch.tensor(0.25), torch.tensor(0.0), bits, True), (ValueError,),
                      call=f"quantize(x, scale, zero, bits={bits}, signed=True)", why="bits must be from 2 to 8")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dequantize


def dequantize_variants(q, scale, zero) -> dict:
    qf = q.float()
    return {
        "zero point forgotten: s * q": scale * qf,
        "zero point added instead of subtracted: s * (q + z)": scale * (qf + zero),
        "divided by the scale instead of multiplying": (qf - zero) / scale,
        "zero point subtracted after scaling: s * q - z": scale * qf - zero,
    }


def check_dequantize(learner, q, scale, zero, what=""):
    compare(
        learner.dequantize(q, scale, zero),
        affine.dequantize(q, scale, zero),
        lambda: dequantize_variants(q, scale, zero),
        call=f"dequantize(q {str(q.dtype).removeprefix('torch.')}, scale, zero){what}",
        inputs={"q": q, "scale": scale, "zero": zero},
    )


@graded("01.dequantize", points=2)
def test_dequantize_fixed(learner):
    q = torch.tensor([-8, -3, 0, 1, 7], dtype=torch.int8)
    check_dequantize(learner, q, torch.tensor(0.125), torch.tensor(0.0))
    u = torch.tensor([0, 3, 6, 9, 15], dtype=torch.uint8)
    check_dequantize(learner, u, torch.tensor(0.25), torch.tensor(6.0))


@graded("01.dequantize", points=2)
def test_dequantize_randomized_per_channel(learner):
    g = generator(404)
    u = torch.randint(0, 256, (10, 24), generator=g, dtype=torch.uint8)
    s = torch.rand(10, 1, generator=g) * 0.1 + 0.001
    z = torch.randint(0, 256, (10, 1), generator=g).float()
    check_dequantize(learner, u, s, z, " (scale and zero of shape [10, 1])")
    q = torch.randint(-8, 8, (10, 24), generator=g, dtype=torch.int8)
    check_dequantize(learner, q, torch.rand(24, generator=g) + 0.01, torch.zeros(24), " (scale and zero of shape [24])")


@graded("01.dequantize", points=2)
def test_dequantize_round_trip_edges(learner):
    x = heavy_tailed((6, 16), 405)
    for bits in (2, 8):
        for symmetric in (True, False):
            s, z = affine.scale_zero_point(x.amin(dim=1), x.amax(dim=1), bits, symmetric)
            q = affine.quantize(x, s[:, None], z[:, None], bits, symmetric)
            check_dequantize(learner, q, s[:, None], z[:, None], f" (codes of {bits}-bit quantize)")
    extremes = torch.tensor([0, 255], dtype=torch.uint8)  # 0 - z must not wrap around in uint8
    check_dequantize(learner, extremes, torch.tensor(1.0), torch.tensor(128.0), " (codes 0 and 255, zero 128)")


# ---------------------------------------------------------------------------------------------
# block_min_max


def strided_groups(x: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups of reshape(..., g, n_groups): every n_groups-th element, not neighbours."""
    r = x.reshape(*x.shape[:-1], g, x.shape[-1] // g)
    return r.amin(dim=-2), r.amax(dim=-2)


def block_variants(x: torch.Tensor, spec: AffineSpec) -> dict:
    expected_min, _ = affine.block_min_max(x, spec)
    shape = expected_min.shape
    variants = {
        "one (min, max) for the whole tensor instead of one per block": (
            x.amin().expand(shape), x.amax().expand(shape)),
    }  # fmt: skip
    if spec.granularity == "channel" and x.dim() == 2:
        variants["axes swapped: reduced along `axis` instead of over the other axes"] = (
            x.amin(dim=spec.axis), x.amax(dim=spec.axis))  # fmt: skip
    if spec.granularity == "group":
        variants["groups formed by reshape(..., group_size, n_groups): strided elements instead of neighbours"] = strided_groups(x, spec.group_size)
    return variants


def check_blocks(learner, x, spec, what=""):
    call = f"block_min_max(x {list(x.shape)}, spec with granularity={spec.granularity!r}"
    call += {"channel": f", axis={spec.axis})", "group": f", group_size={spec.group_size})"}.get(spec.granularity, ")") + what
    got = learner.block_min_max(x, spec)
    expected = affine.block_min_max(x, spec)
    if isinstance(got, (tuple, list)) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got):
        if got[0].shape != expected[0].shape:
            hint = {
                "tensor": "a per-tensor result is a 0-dim tensor (use .amin() / .amax() over everything, or .reshape(()))",
                "channel": f"per-channel over axis {spec.axis} gives one value per index of that axis: shape [{x.shape[spec.axis]}]",
                "group": "per-group gives [*x.shape[:-1], x.shape[-1] // group_size]",
            }[spec.granularity]
            raise Mismatch(f"{call} returned shape {tuple(got[0].shape)}, expected {tuple(expected[0].shape)}: {hint}")
    compare(got, expected, lambda: block_variants(x, spec), call=call, inputs={"x": x}, rtol=0.0, atol=0.0)


@graded("01.block_min_max", points=2)
def test_block_min_max_per_tensor(learner):
    x = torch.tensor([[0.5, -2.0, 1.0], [3.0, -0.25, 0.0]])
    check_blocks(learner, x, AffineSpec(granularity="tensor"))
    check_blocks(learner, heavy_tailed((2, 3, 5), 501), AffineSpec(granularity="tensor"))


@graded("01.block_min_max", points=3)
def test_block_min_max_per_channel_fixed(learner):
    x = torch.tensor([[0.5, -2.0, 1.0, 4.0], [3.0, -0.25, 0.0, 1.5], [-1.0, -3.0, 2.0, 0.1], [0.2, 0.3, -0.4, 0.6]])
    for axis in (0, 1, -1):
        check_blocks(learner, x, AffineSpec(granularity="channel", axis=axis))
    x3 = heavy_tailed((2, 3, 4), 502)
    for axis in (0, 1, 2):
        check_blocks(learner, x3, AffineSpec(granularity="channel", axis=axis), " (a 3-D tensor)")
    check_blocks(learner, x[0], AffineSpec(granularity="channel", axis=0), " (a 1-D tensor: one channel per element)")


@graded("01.block_min_max", points=3)
def test_block_min_max_per_group_fixed(learner):
    x = torch.tensor([[0.5, -2.0, 1.0, 4.0, 3.0, -0.25, 0.0, 1.5], [-1.0, -3.0, 2.0, 0.1, 0.2, 0.3, -0.4, 0.6]])
    for g in (2, 4, 8):
        check_blocks(learner, x, AffineSpec(granularity="group", group_size=g))
    check_blocks(learner, heavy_tailed((2, 3, 12), 503), AffineSpec(granularity="group", group_size=4), " (a 3-D tensor)")


@graded("01.block_min_max", points=2)
def test_block_min_max_randomized(learner):
    w = heavy_tailed((24, 64), 504)
    for spec in (
        AffineSpec(granularity="tensor"),
        AffineSpec(granularity="channel", axis=0),
        AffineSpec(granularity="channel", axis=1),
        AffineSpec(granularity="group", group_size=16),
        AffineSpec(granularity="group", group_size=64),
        AffineSpec(granularity="group", group_size=4),
    ):
        check_blocks(learner, w, spec)


@graded("01.block_min_max", points=2)
def test_block_min_max_refuses_bad_blocks(learner):
    x = torch.zeros(4, 12)
    expect_raises(lambda: learner.block_min_max(x, AffineSpec(granularity="group", group_size=5)), (ValueError,),
                  call="block_min_max(x [4, 12], group_size=5)", why="5 does not divide the last dimension 12")  # fmt: skip
    expect_raises(lambda: learner.block_min_max(x, AffineSpec(granularity="group", group_size=24)), (ValueError,),
                  call="block_min_max(x [4, 12], group_size=24)", why="24 does not divide the last dimension 12")  # fmt: skip
    for axis in (2, -3):
        expect_raises(lambda: learner.block_min_max(x, AffineSpec(granularity="channel", axis=axis)), (ValueError,),
                      call=f"block_min_max(x [4, 12], granularity='channel', axis={axis})", why="a 2-D tensor has no such axis")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# fake_quantize


def manual_fake_quantize(x, spec, *, levels=None, rnd=None, zero_in_dequantize=True, widen=True):
    """The lab's pipeline with one step done wrong (each keyword names a step)."""
    qmin, qmax = affine.quant_range(spec.bits, spec.symmetric)
    lo, hi = affine.block_min_max(x.float(), spec)
    if spec.symmetric:
        scale = nonzero(torch.maximum(lo.abs(), hi.abs()) / (levels or qmax))
        zero = torch.zeros_like(scale)
    else:
        if widen:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = nonzero((hi - lo) / (levels or qmax))
        zero = torch.round(-lo / scale)
    s, z = affine.expand_to(scale, x, spec), affine.expand_to(zero, x, spec)
    rnd = rnd or (lambda t: affine.round_half(t, spec.rounding))
    q = torch.clamp(rnd(x.float() / s) + z, qmin, qmax)
    return (s * (q - z) if zero_in_dequantize else s * q).to(x.dtype)


def fake_quantize_variants(x, spec) -> dict:
    v = {
        "one scale for the whole tensor instead of one per block": affine.fake_quantize(x, replace(spec, granularity="tensor")),
        "floor instead of round": manual_fake_quantize(x, spec, rnd=torch.floor),
        "truncation toward zero instead of round": manual_fake_quantize(x, spec, rnd=torch.trunc),
        "the symmetric and asymmetric grids swapped": affine.fake_quantize(x, replace(spec, symmetric=not spec.symmetric)),
    }
    if spec.symmetric:
        v["one level too many: max|x| / 2^(b-1)"] = manual_fake_quantize(x, spec, levels=2 ** (spec.bits - 1))
        v["step max|x| / (2^b - 1), or the multiplier (2^b - 1) / max|x|: the unsigned level count on a signed grid"] = (
            manual_fake_quantize(x, spec, levels=2**spec.bits - 1))  # fmt: skip
    else:
        v["one level too many: (max - min) / 2^b"] = manual_fake_quantize(x, spec, levels=2**spec.bits)
        v["zero point forgotten when dequantizing: x_hat = s * q"] = manual_fake_quantize(x, spec, zero_in_dequantize=False)
        v["range not widened to contain 0"] = manual_fake_quantize(x, spec, widen=False)
    if spec.rounding == "half_away":
        v["spec.rounding ignored (always half to even)"] = affine.fake_quantize(x, replace(spec, rounding="half_even"))
    if spec.granularity == "channel" and x.dim() == 2:
        v["per-channel scales along the other axis"] = affine.fake_quantize(x, replace(spec, axis=1 - spec.axis % 2))
    if spec.granularity == "group" and x.dim() == 2:
        g, n = spec.group_size, x.shape[-1] // spec.group_size
        permuted = x.reshape(x.shape[0], g, n).transpose(1, 2).reshape(x.shape)  # strided groups made contiguous
        v["groups of strided elements (reshape(..., group_size, n_groups))"] = (
            affine.fake_quantize(permuted, spec).reshape(x.shape[0], n, g).transpose(1, 2).reshape(x.shape))  # fmt: skip
        if x.shape[0] % g == 0:
            v["groups along the first axis instead of the last"] = affine.fake_quantize(x.T.contiguous(), spec).T
    return v


def check_fake_quantize(learner, x, spec, what="", rtol=1e-5, atol=1e-6):
    compare(
        learner.fake_quantize(x, spec),
        affine.fake_quantize(x, spec),
        lambda: fake_quantize_variants(x, spec),
        call=f"fake_quantize(x {list(x.shape)} {str(x.dtype).removeprefix('torch.')}, {spec.describe()}"
        + (f", rounding={spec.rounding!r}" if spec.rounding != "half_even" else "") + f"){what}",
        inputs={"x": x},
        rtol=rtol,
        atol=atol,
    )


@graded("01.fake_quantize", points=3)
def test_fake_quantize_per_tensor_fixed(learner):
    x = torch.tensor([-1.0, -0.62, -0.1, 0.0, 0.27, 0.5, 0.93, 2.0])
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            check_fake_quantize(learner, x, AffineSpec(bits, symmetric, "tensor"))


@graded("01.fake_quantize", points=3)
def test_fake_quantize_per_channel_randomized(learner):
    w = heavy_tailed((16, 48), 601)
    for bits in (3, 4, 8):
        for symmetric in (True, False):
            for axis in (0, 1):
                check_fake_quantize(learner, w, AffineSpec(bits, symmetric, "channel", axis=axis))
    check_fake_quantize(learner, heavy_tailed((4, 6, 8), 602), AffineSpec(4, False, "channel", axis=1), " (3-D)")


@graded("01.fake_quantize", points=3)
def test_fake_quantize_per_group_randomized(learner):
    w = heavy_tailed((16, 64), 603)
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            for g in (8, 32):
                check_fake_quantize(learner, w, AffineSpec(bits, symmetric, "group", g))
    check_fake_quantize(learner, heavy_tailed((3, 4, 32), 604), AffineSpec(4, True, "group", 16), " (3-D)")


@graded("01.fake_quantize", points=2)
def test_fake_quantize_rounding_and_dtypes(learner):
    # max |x| = 0.875 = 7 * 0.125: s is exactly 0.125 at 4 bits, so these are exact ties
    x = torch.tensor([[0.0625, 0.1875, -0.3125, 0.875], [-0.0625, -0.1875, 0.3125, -0.875]])
    for rounding in ("half_even", "half_away"):
        check_fake_quantize(learner, x, AffineSpec(4, True, "tensor", rounding=rounding), " (exact ties)")
    w = heavy_tailed((8, 32), 605)
    spec = AffineSpec(4, False, "group", 16)
    check_fake_quantize(learner, w.double(), spec, " (the result keeps x's dtype)")
    check_fake_quantize(learner, w.half(), spec, " (the result keeps x's dtype)", rtol=1e-3, atol=1e-3)
    check_fake_quantize(learner, w.bfloat16(), AffineSpec(8, True, "channel"), " (the result keeps x's dtype)", rtol=1e-2, atol=1e-2)


@graded("01.fake_quantize", points=3)
def test_fake_quantize_edge_blocks(learner):
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.7, 0.7, 0.7, 0.7], [-3.0, -3.0, -3.0, -3.0], [0.5, 1.0, 1.5, 2.0]])
    for bits in (2, 4, 8):
        for symmetric in (True, False):
            check_fake_quantize(learner, x, AffineSpec(bits, symmetric, "channel"),
                                " (rows: zeros, constants, all-positive)")  # fmt: skip
    check_fake_quantize(learner, torch.zeros(3, 8), AffineSpec(4, False, "group", 4), " (all zeros)")
    positive = torch.rand(6, 16, generator=generator(606)) + 0.5
    check_fake_quantize(learner, positive, AffineSpec(3, False, "group", 8), " (all values positive)")


@graded("01.fake_quantize", points=2)
def test_fake_quantize_refuses_bad_input(learner):
    spec = AffineSpec(4, True, "channel")
    expect_raises(lambda: learner.fake_quantize(torch.arange(12).reshape(3, 4), spec), (TypeError,),
                  call="fake_quantize(integer tensor, spec)", why="only float tensors can be quantized")  # fmt: skip
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.zeros(3, 4)
        x[1, 2] = bad
        expect_raises(lambda: learner.fake_quantize(x, spec), (ValueError,),
                      call=f"fake_quantize(x holding {bad}, spec)", why="NaN and inf have no place on a grid")  # fmt: skip
    expect_raises(lambda: learner.fake_quantize(torch.zeros(3, 12), AffineSpec(4, True, "group", 8)), (ValueError,),
                  call="fake_quantize(x [3, 12], group_size=8)", why="8 does not divide 12")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# mse_range


def search(x, spec, factors, norm, per_block=True, shrink_min=True):
    """The MSE search with a chosen set of factors, optionally one factor for the whole tensor."""
    xmin, xmax = affine.block_min_max(x, spec)
    best_err, best_p = torch.full_like(xmin, float("inf")), torch.ones_like(xmin)
    for p in factors:
        lo = p * xmin if shrink_min else xmin
        x_hat = affine.quantize_tensor(x, spec, lo, p * xmax).dequantize()
        err = calibration.block_error(x, x_hat, spec, norm)
        if not per_block:
            err = err.sum().expand_as(err)
        better = err < best_err
        best_err, best_p = torch.where(better, err, best_err), torch.where(better, p, best_p)
    return (best_p * xmin if shrink_min else xmin), best_p * xmax


def mse_variants(x, spec, grid, max_shrink, norm) -> dict:
    factors = calibration.shrink_factors(grid, max_shrink)
    xmin, xmax = affine.block_min_max(x, spec)
    lo, hi = calibration.mse_range(x, spec, grid, max_shrink, norm)
    v = {
        "the min-max range: no search": (xmin, xmax),
        "stopped one factor early: p = 1 - max_shrink was never tried": search(x, spec, factors[:-1], norm),
        "one factor p for the whole tensor instead of one per block": search(x, spec, factors, norm, per_block=False),
        "only xmax was shrunk": search(x, spec, factors, norm, shrink_min=False),
        "returned the range widened to contain 0": (lo.clamp(max=0), hi.clamp(min=0)),
    }
    if norm != 2:
        v["squared error (norm 2) instead of |error|^norm"] = calibration.mse_range(x, spec, grid, max_shrink, 2.0)
    if norm != 1:
        v["absolute error (norm 1) instead of |error|^norm"] = calibration.mse_range(x, spec, grid, max_shrink, 1.0)
    return v


def check_mse(learner, x, spec, what="", **params):
    grid, max_shrink, norm = params.get("grid", 100), params.get("max_shrink", 0.8), params.get("norm", 2.4)
    shown = "".join(f", {k}={v}" for k, v in params.items())
    compare(
        learner.mse_range(x, spec, **params),
        calibration.mse_range(x, spec, grid, max_shrink, norm),
        lambda: mse_variants(x, spec, grid, max_shrink, norm),
        call=f"mse_range(x {list(x.shape)}, {spec.describe()}{shown}){what}",
        inputs={"x": x},
    )


OUTLIER_ROWS = torch.cat([torch.linspace(-1, 1, 31).repeat(3, 1), torch.tensor([[8.0], [-3.0], [1.0]])], dim=1)


@graded("01.mse_range", points=3)
def test_mse_range_fixed(learner):
    x = OUTLIER_ROWS  # row 0: a far outlier, row 1: a moderate one, row 2: none
    for symmetric in (True, False):
        check_mse(learner, x, AffineSpec(4, symmetric, "channel"), " (rows with and without an outlier)")
    check_mse(learner, x[0], AffineSpec(3, True, "tensor"), " (one row with a far outlier)")
    many = torch.cat([torch.randn(200, generator=generator(701)), torch.tensor([8.0])])
    check_mse(learner, many, AffineSpec(2, True, "tensor"), " (the best factor is the smallest one)")
    check_mse(learner, many, AffineSpec(2, False, "tensor"), " (200 Gaussian values and one outlier)")


@graded("01.mse_range", points=3)
def test_mse_range_randomized(learner):
    w = heavy_tailed((12, 64), 702)
    for spec in (
        AffineSpec(4, True, "channel"),
        AffineSpec(4, False, "channel"),
        AffineSpec(3, False, "group", 16),
        AffineSpec(8, True, "tensor"),
    ):
        check_mse(learner, w, spec)


@graded("01.mse_range", points=2)
def test_mse_range_parameters(learner):
    w = heavy_tailed((8, 32), 703)
    check_mse(learner, w, AffineSpec(4, True, "channel"), grid=20, max_shrink=0.5)
    check_mse(learner, w, AffineSpec(4, False, "group", 16), norm=2.0)
    check_mse(learner, w, AffineSpec(3, True, "channel", axis=1), grid=10, max_shrink=0.9, norm=1.0)


@graded("01.mse_range", points=2)
def test_mse_range_edge_blocks(learner):
    x = torch.tensor([[0.0] * 8, [0.7] * 8, [-3.0] * 8, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]])
    for symmetric in (True, False):
        check_mse(learner, x, AffineSpec(4, symmetric, "channel"), " (rows: zeros, constants, all-positive)")


@graded("01.mse_range", points=2)
def test_mse_range_refuses_bad_input(learner):
    spec = AffineSpec(4, True, "channel")
    x = torch.randn(3, 8, generator=generator(704))
    expect_raises(lambda: learner.mse_range(torch.arange(6).reshape(2, 3), spec), (TypeError,),
                  call="mse_range(integer tensor, spec)", why="only float tensors can be quantized")  # fmt: skip
    nan = x.clone()
    nan[0, 0] = float("nan")
    expect_raises(lambda: learner.mse_range(nan, spec), (ValueError,), call="mse_range(x holding NaN, spec)",
                  why="NaN has no range")  # fmt: skip
    for params, why in (
        ({"grid": 0}, "grid must be a positive integer"),
        ({"max_shrink": 1.0}, "max_shrink must be in (0, 1)"),
        ({"max_shrink": 0.0}, "max_shrink must be in (0, 1)"),
        ({"norm": 0.0}, "norm must be positive"),
    ):
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        expect_raises(lambda: learner.mse_range(x, spec, **params), (ValueError,), call=f"mse_range(x, spec, {shown})", why=why)
