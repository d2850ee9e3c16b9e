"""W8A8 kernels against reference_impl.llm_int8: per-token quantization and the int32 product
bit for bit, the fused rescale within one output rounding, the module inside replace_linears."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU

import pytest
from kernel_devices import DEVICES, FLOATS, TOLERANCE, relative_error
from torch import nn

from quantcourse.kernels.w8a8 import TritonW8A8Linear, int8_matmul, quantize_per_token, w8a8_matmul
from quantcourse.reference_impl.llm_int8 import W8A8Linear, int8_mm_dequant, int8_vectorwise_quant
from quantcourse.reference_impl.llm_int8 import int8_matmul as reference_int8_matmul
from quantcourse.surgery import replace_linears

# (M, N, K): ragged against every block size. CPU: the interpreter's tiles are 16 x 16 x 32 and
# rows longer than 64 take two passes. GPU: real layers, M from decoding to prefill.
CASES = {
    "cpu": [(1, 24, 64), (17, 40, 200), (33, 16, 40)],
    "cuda": [(1, 4096, 4096), (333, 11008, 4096), (1024, 4096, 11008)],
}


def activations(M: int, K: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """~N(0, 1) with outlier features and an all-zero first row (absmax 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, : max(1, K // 50)] *= 30
    x[0] = 0.0
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_per_token_quantization_is_bitsandbytes_exact(device, dtype):
    for M, _, K in CASES[device] + [(3, 0, 28672 if device == "cuda" else 100)]:
        x = activations(M, K, dtype, device)
        codes, absmax = quantize_per_token(x)
        ref_codes, ref_absmax, _ = int8_vectorwise_quant(x)
        assert torch.equal(codes, ref_codes), (M, K)
        assert torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_matmul_is_exact(device):
    for M, N, K in CASES[device]:
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
        b[0] = 127  # a row of extremes: the largest sums an int32 must hold
        a[0] = -127
        assert torch.equal(int8_matmul(a, b), reference_int8_matmul(a, b)), (M, N, K)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_fused_rescale_matches_int8_mm_dequant(device, out_dtype):
    for M, N, K in CASES[device]:
        a, a_absmax = quantize_per_token(activations(M, K, torch.float16, device))
        b, b_absmax, _ = int8_vectorwise_quant(torch.randn(N, K).to(device))
        bias = torch.randn(N, device=device)
        out = w8a8_matmul(a, a_absmax, b, b_absmax, bias, out_dtype)
        ref = int8_mm_dequant(reference_int8_matmul(a, b), a_absmax, b_absmax, bias)
        assert out.dtype == out_dtype and relative_error(out, ref) < TOLERANCE[out_dtype], (M, N, K)


@pytest.mark.parametrize("device", DEVICES)
def test_module_plugs_into_replace_linears(device):
    hidden = 96 if device == "cpu" else 2048
    model = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden, bias=False))
    model = model.to(device)
    reference = nn.Sequential(*(W8A8Linear.from_linear(m) if isinstance(m, nn.Linear) else m for m in model))
    replaced = replace_linears(model, lambda name, linear: TritonW8A8Linear.from_linear(linear))
    assert len(replaced) == 2 and all(isinstance(m, TritonW8A8Linear) for m in replaced.values())
    x = torch.randn(2, 5, hidden, device=device)
    assert relative_error(model(x), reference(x)) < TOLERANCE[torch.float32]
    assert model[0].storage_bits() == reference[0].storage_bits()


@pytest.mark.parametrize("device", DEVICES)
def test_errors_speak_to_the_learner(device):
    a = torch.zeros(4, 64, dtype=torch.int8, device=device)
    with pytest.raises(TypeError, match="int8"):
        int8_matmul(a.float(), a)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        int8_matmul(a, torch.zeros(8, 32, dtype=torch.int8, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        int8_matmul(a, torch.zeros(64, 8, dtype=torch.int8, device=device).t())
    with pytest.raises(ValueError, match="shape"):
        w8a8_matmul(a, torch.ones(3, device=device), a, torch.ones(4, device=device))
    with pytest.raises(TypeError, match="out_dtype"):
        w8a8_matmul(a, torch.ones(4, device=device), a, torch.ones(4, device=device), out_dtype=torch.int32)
