"""Property-based tests of affine quantization (hypothesis): the guarantees lesson 01 states."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcourse.reference_impl.affine import AffineSpec, expand_to, fake_quantize, quantize, quantize_tensor

settings.register_profile("course", max_examples=60, deadline=None)
settings.load_profile("course")

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@st.composite
def tensors_and_specs(draw):
    rows = draw(st.integers(1, 4))
    groups, group_size = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    values = draw(st.lists(finite, min_size=rows * groups * group_size, max_size=rows * groups * group_size))
    x = torch.tensor(values, dtype=torch.float32).view(rows, groups * group_size)
    granularity = draw(st.sampled_from(["tensor", "channel", "group"]))
    symmetric = draw(st.booleans())
    spec = AffineSpec(
        bits=draw(st.integers(2, 8)),
        symmetric=symmetric,
        zero_point="integer" if symmetric else draw(st.sampled_from(["integer", "float"])),
        granularity=granularity,
        group_size=group_size if granularity == "group" else None,
        rounding=draw(st.sampled_from(["half_even", "half_away"])),
    )
    return x, spec


def step_of(qt, x):
    return expand_to(qt.scale, x, qt.spec)


@given(tensors_and_specs())
def test_round_trip_error_is_at_most_half_a_step(case):
    x, spec = case
    qt = quantize_tensor(x, spec)
    error = (qt.dequantize() - x).abs()
    assert (error <= step_of(qt, x) / 2 * (1 + 1e-5) + 1e-6).all()


@given(tensors_and_specs())
def test_zero_is_exactly_representable(case):
    """Symmetric grids and integer zero points hold 0 exactly (a float zero point need not)."""
    x, spec = case
    if spec.zero_point == "float":
        spec = AffineSpec(spec.bits, False, spec.granularity, spec.group_size, rounding=spec.rounding)
    x = x.clone()
    x.view(-1)[0] = 0.0
    assert fake_quantize(x, spec).view(-1)[0].item() == 0.0


@given(tensors_and_specs())
def test_fake_quantize_is_idempotent_for_fixed_parameters(case):
    """Re-quantizing x_hat with the same scale and zero point gives back the same codes.

    (Recomputing min-max from x_hat may choose another asymmetric grid: the rounded zero point
    shifts the grid, so x_hat's range differs from x's. The operator with fixed parameters is the
    one that is idempotent.)
    """
    x, spec = case
    qt = quantize_tensor(x, spec)
    s, z = expand_to(qt.scale, x, spec), expand_to(qt.zero, x, spec)
    again = quantize(qt.dequantize(), s, z, spec.bits, spec.symmetric, spec.rounding, spec.zero_point)
    assert torch.equal(again, qt.codes)


@given(st.lists(finite, min_size=2, max_size=64), st.integers(2, 8), st.booleans())
def test_quantize_is_monotonic(values, bits, symmetric):
    x = torch.tensor(sorted(values), dtype=torch.float32)
    codes = quantize_tensor(x, AffineSpec(bits=bits, symmetric=symmetric, granularity="tensor")).codes
    assert (codes[1:].int() >= codes[:-1].int()).all()


@given(tensors_and_specs())
def test_codes_stay_on_the_grid(case):
    x, spec = case
    codes = quantize_tensor(x, spec).codes.int()
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
