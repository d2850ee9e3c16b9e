"""Quantize/dequantize kernels against reference_impl.affine and reference_impl.w4a16: every
code, scale and zero point bit for bit, ragged edges, long rows read in two passes, errors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU

import pytest
from kernel_devices import DEVICES, FLOATS, sizes

from quantcourse.kernels.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from quantcourse.reference_impl.affine import AffineSpec, quantize_tensor
from quantcourse.reference_impl.w4a16 import dequantize_w4, quantize_w4

# The interpreter builds an int32 word in int64 and wraps it to int32, as the GPU's int32
# arithmetic does; numpy warns about the wrap.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

# (rows, cols, group_size). CPU: the interpreter's tiles are 32 columns, so 96 columns per
# channel take the two-pass path and 13 or 5 rows end inside a block. GPU: real weights.
INT8_CASES = {
    "cpu": [(13, 96, None), (13, 96, 32), (5, 40, 8)],
    "cuda": [(4096, 4096, 128), (1000, 11008, None), (333, 576, 64)],
}
INT4_CASES = {  # rows a multiple of 8: asymmetric int4 packs 8 zero points per word
    "cpu": [(16, 96, None), (24, 64, 32), (40, 48, 8)],
    "cuda": [(4096, 4096, 128), (1536, 576, 64), (512, 11008, None)],
}


def weights(rows: int, cols: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Normal values with an outlier, an all-zero row and an all-positive row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[0, 0] = 9.0
    x[-1] = 0.0
    x[1 % rows] = x[1 % rows].abs()
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_quantize_and_dequantize_match_the_reference_exactly(device, symmetric, dtype):
    for rows, cols, group in INT8_CASES[device]:
        x = weights(rows, cols, dtype, device)
        codes, scale, zero = quantize_int8(x, group, symmetric)
        granularity = "channel" if group is None else "group"
        ref = quantize_tensor(x.cpu(), AffineSpec(bits=8, symmetric=symmetric, granularity=granularity, group_size=group))
        assert codes.dtype == ref.codes.dtype and torch.equal(codes.cpu(), ref.codes), (rows, cols, group)
        assert torch.equal(scale.cpu(), ref.scale.reshape(scale.shape))
        assert torch.equal(zero.cpu(), ref.zero.reshape(zero.shape))
        assert torch.equal(dequantize_int8(codes, scale, zero, group).cpu(), ref.dequantize())
        assert torch.equal(scale[-1].cpu(), torch.ones(scale.shape[1]))  # the all-zero row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int4_gptq_quantize_and_dequantize_match_the_reference_exactly(device, symmetric, dtype):
    for rows, cols, group in INT4_CASES[device]:
        w = weights(rows, cols, dtype, device, seed=1)
        qweight, scales, qzeros = quantize_int4(w, group, symmetric)
        ref_qweight, ref_scales, ref_qzeros = quantize_w4(w, group, symmetric)
        assert torch.equal(qweight.cpu(), ref_qweight.cpu()), (rows, cols, group)
        assert torch.equal(scales.cpu(), ref_scales.cpu())
        assert (qzeros is None) == symmetric and (symmetric or torch.equal(qzeros.cpu(), ref_qzeros.cpu()))
        out_dtype = torch.float16 if dtype == torch.float16 else torch.float32  # (bf16 output: see TOLERANCE)
        W = dequantize_int4(qweight, scales, qzeros, group, dtype=out_dtype)
        assert torch.equal(W.cpu(), dequantize_w4(ref_qweight, ref_scales, ref_qzeros, group).cpu().to(out_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_int4_dequantize_with_act_order_g_idx(device):
    rows, cols, group = sizes(device, (16, 64, 16), (4096, 4096, 128))
    qweight, scales, qzeros = quantize_int4(weights(rows, cols, torch.float32, device), group, symmetric=False)
    g_idx = torch.randint(0, cols // group, (cols,), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    W = dequantize_int4(qweight, scales, qzeros, group, g_idx=g_idx.to(device))
    assert torch.equal(W.cpu(), dequantize_w4(qweight.cpu(), scales.cpu(), qzeros.cpu(), group, g_idx))


@pytest.mark.parametrize("device", DEVICES)
def test_int4_codes_by_hand(device):
    # 8 output rows of the same 8 weights, symmetric: absmax 7 -> scale 1, codes = values + 8.
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, -2.0, -3.0, 7.0]], device=device).repeat(8, 1)
    qweight, scales, _ = quantize_int4(w, None)
    # nibbles 8, 9, 10, 11, 7, 6, 5, 15 from the lowest: 0xF567BA98, negative as int32
    assert qweight[0, 0].item() == 0xF567BA98 - 2**32
    assert scales.flatten().tolist() == [1.0] * 8


@pytest.mark.parametrize("device", DEVICES)
def test_errors_speak_to_the_learner(device):
    x = torch.randn(8, 96, device=device)
    with pytest.raises(TypeError, match="dtype"):
        quantize_int8(x.double())
    with pytest.raises(ValueError, match="contiguous"):
        quantize_int8(x.t())
    with pytest.raises(ValueError, match="not a multiple of group_size 64"):
        quantize_int8(x, group_size=64)
    with pytest.raises(ValueError, match="576-wide layers take 64"):
        quantize_int4(torch.randn(8, 576, device=device), group_size=128)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize_int4(x, group_size=12)
    codes = torch.zeros(8, 96, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="shape"):
        dequantize_int8(codes, torch.ones(8, 2, device=device), torch.zeros(8, 2, device=device), group_size=32)


def test_cpu_tensors_without_the_interpreter_say_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing triton"):
        quantize_int8(torch.randn(8, 96))
