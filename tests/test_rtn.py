"""Round-to-nearest weight-only quantized Linear."""

import pytest
import torch
from torch import nn

from quantcourse.reference_impl.affine import AffineSpec, fake_quantize
from quantcourse.reference_impl.rtn import FakeQuantLinear


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(128, 48)


@pytest.mark.parametrize(
    "spec",
    [
        AffineSpec(bits=8),
        AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32),
        AffineSpec(bits=3, granularity="group", group_size=64),
    ],
)
def test_forward_uses_the_fake_quantized_weight(linear, spec):
    layer = FakeQuantLinear.from_linear(linear, spec)
    x = torch.randn(5, 128)
    expected = torch.nn.functional.linear(x, fake_quantize(linear.weight.detach(), spec), linear.bias)
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight_count() == 128 * 48


def test_error_shrinks_with_more_bits(linear):
    errors = [
        (FakeQuantLinear.from_linear(linear, AffineSpec(bits=b)).weight - linear.weight).pow(2).mean().item()
        for b in (2, 3, 4, 8)
    ]
    assert errors == sorted(errors, reverse=True)


def test_per_channel_must_run_along_output_rows(linear):
    with pytest.raises(ValueError, match="axis=0"):
        FakeQuantLinear.from_linear(linear, AffineSpec(bits=8, axis=1))


def test_storage_bits_of_an_asymmetric_group_layer(linear):
    spec = AffineSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    layer = FakeQuantLinear.from_linear(linear, spec)
    groups = 48 * 128 // 32
    assert layer.storage_bits() == 48 * 128 * 4 + groups * (16 + 4)
