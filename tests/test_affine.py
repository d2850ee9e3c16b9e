"""Affine quantization: grids, scale and zero point, granularity, rounding, and bad input."""

import pytest
import torch

from quantcourse.reference_impl.affine import (
    AffineSpec,
    block_min_max,
    dequantize,
    fake_quantize,
    quant_range,
    quantize,
    quantize_tensor,
    round_half,
    scale_zero_point,
)


def test_quant_ranges():
    assert quant_range(8, signed=True) == (-128, 127)
    assert quant_range(8, signed=False) == (0, 255)
    assert quant_range(4, signed=True) == (-8, 7)
    assert quant_range(2, signed=False) == (0, 3)


def test_symmetric_scale_uses_the_largest_magnitude():
    scale, zero = scale_zero_point(torch.tensor(-2.0), torch.tensor(1.0), bits=8, symmetric=True)
    assert scale.item() == pytest.approx(2.0 / 127) and zero.item() == 0


def test_asymmetric_grid_covers_min_to_max_and_holds_zero():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    scale, zero = scale_zero_point(x.min(), x.max(), bits=4, symmetric=False)
    assert scale.item() == pytest.approx(3.0 / 15)
    assert zero.item() == 5  # round(1 / 0.2)
    q = quantize(x, scale, zero, bits=4, signed=False)
    assert q.dtype == torch.uint8 and q.tolist() == [0, 5, 7, 15]  # 0.5 / 0.2 = 2.5 rounds to even
    assert dequantize(q, scale, zero)[1].item() == 0.0  # zero is exact


def test_asymmetric_range_is_widened_to_contain_zero():
    scale, zero = scale_zero_point(torch.tensor(1.0), torch.tensor(4.0), bits=2, symmetric=False)
    assert scale.item() == pytest.approx(4.0 / 3) and zero.item() == 0


def test_all_zero_block_needs_no_division_by_zero():
    x = torch.zeros(4, 8)
    for symmetric in (True, False):
        spec = AffineSpec(bits=4, symmetric=symmetric)
        assert torch.equal(fake_quantize(x, spec), x)


def test_constant_block_is_reconstructed_exactly():
    x = torch.full((2, 8), 3.0)
    assert torch.equal(fake_quantize(x, AffineSpec(bits=4, symmetric=False)), x)
    assert torch.equal(fake_quantize(x, AffineSpec(bits=4, symmetric=True)), x)


@pytest.mark.parametrize(
    "spec, shape",
    [
        (AffineSpec(granularity="tensor"), ()),
        (AffineSpec(granularity="channel", axis=0), (6,)),
        (AffineSpec(granularity="channel", axis=1), (8,)),
        (AffineSpec(granularity="group", group_size=4), (6, 2)),
        (AffineSpec(granularity="group", group_size=3, ragged=True), (6, 3)),
    ],
)
def test_one_scale_per_block(spec, shape):
    qt = quantize_tensor(torch.randn(6, 8), spec)
    assert tuple(qt.scale.shape) == shape
    assert qt.codes.shape == (6, 8)


def test_groups_are_quantized_independently():
    x = torch.cat([torch.randn(3, 4) * 100, torch.randn(3, 4) * 0.01], dim=1)
    spec = AffineSpec(bits=8, granularity="group", group_size=4)
    error = (fake_quantize(x, spec) - x).abs()
    assert error[:, 4:].max() < 1e-3  # the small group keeps its own fine scale


def test_ragged_last_group_has_its_own_range():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    spec = AffineSpec(bits=8, symmetric=False, granularity="group", group_size=2, ragged=True)
    xmin, xmax = block_min_max(x, spec)
    assert xmax.tolist() == [[2.0, 4.0, 100.0]]
    assert torch.allclose(fake_quantize(x, spec), x, atol=0.2)


def test_round_half_modes_differ_only_on_ties():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 1.4, -1.6])
    assert round_half(x, "half_even").tolist() == [-2, -2, -0, 0, 2, 2, 1, -2]
    assert round_half(x, "half_away").tolist() == [-3, -2, -1, 1, 2, 3, 1, -2]


def test_error_is_at_most_half_a_step():
    x = torch.randn(16, 64)
    qt = quantize_tensor(x, AffineSpec(bits=4, granularity="channel"))
    step = qt.scale[:, None]
    assert ((qt.dequantize() - x).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
        AffineSpec(bits=bits)


def test_nan_and_inf_are_located():
    x = torch.zeros(3, 4)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"2 NaN/inf values \(first at indices \[\[1, 2\], \[2, 0\]\]\)"):
        quantize_tensor(x, AffineSpec())


def test_integer_input_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"x.float\(\)"):
        quantize_tensor(torch.arange(6).view(2, 3), AffineSpec())


def test_group_size_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="group_size 5 does not divide the last dimension 8.*ragged=True"):
        quantize_tensor(torch.randn(2, 8), AffineSpec(granularity="group", group_size=5))


def test_float_zero_point_keeps_the_range_as_it_is():
    x = torch.tensor([1.0, 2.5, 4.0])
    qt = quantize_tensor(x, AffineSpec(bits=2, symmetric=False, granularity="tensor", zero_point="float"))
    assert qt.scale.item() == pytest.approx(1.0) and qt.zero.item() == pytest.approx(-1.0)
    assert qt.dequantize().tolist() == [1.0, 3.0, 4.0]  # x_hat = s * q + min; (2.5 - 1) / 1 = 1.5 rounds to 2


def test_float_zero_point_needs_an_asymmetric_grid():
    with pytest.raises(ValueError, match="symmetric=False"):
        AffineSpec(symmetric=True, zero_point="float")


def test_storage_bits_of_each_zero_point():
    x = torch.randn(4, 64)
    bits = {
        zp: quantize_tensor(x, AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32, zero_point=zp)).storage_bits()
        for zp in ("integer", "float")
    }
    assert bits == {"integer": 256 * 4 + 8 * (16 + 4), "float": 256 * 4 + 8 * (16 + 16)}


def test_asymmetric_g32_float_zero_reproduces_the_shipped_q4_1_grid(reference):
    """The reference weights were dequantized from Q4_1 (s * q + min per 32 weights): the same
    form, aligned with the same blocks, finds them again. An integer zero point cannot."""
    w = reference[0].model.layers[7].mlp.down_proj.weight
    spec = AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32, zero_point="float")
    assert (fake_quantize(w, spec) - w).abs().max() < 1e-6
    integer = AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    assert (fake_quantize(w, integer) - w).abs().max() > 1e-3
