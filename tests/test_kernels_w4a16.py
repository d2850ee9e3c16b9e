"""W4A16 GEMV and GEMM kernels against reference_impl.w4a16: symmetric and asymmetric groups,
act-order g_idx, bias, every activation dtype, ragged shapes, split-K determinism, the module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU

import pytest
from kernel_devices import DEVICES, FLOATS, ON_GPU, TOLERANCE, relative_error, sizes
from torch import nn

from quantcourse.kernels.quantize import quantize_int4
from quantcourse.kernels.w4a16 import TritonW4A16Linear, w4a16_gemm, w4a16_gemv, w4a16_matmul
from quantcourse.reference_impl.w4a16 import W4A16Linear, zeros_from_v1
from quantcourse.reference_impl.w4a16 import w4a16_matmul as reference_matmul
from quantcourse.surgery import replace_linears

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

# (N, K, group_size, symmetric, act_order). CPU: the interpreter's tiles are 32 inputs, so
# groups of 32 take the one-scale-per-tile path and groups of 16 or 8 the per-word-row path;
# N = 40 ends inside a 16-column block, K = 80 inside a 32-input tile. GPU: real layer shapes.
WEIGHTS = {
    "cpu": [(40, 96, 32, True, False), (40, 80, 16, False, False), (24, 64, 8, False, True)],
    "cuda": [(4096, 4096, 128, True, False), (11008, 4096, 128, False, False), (1536, 576, 64, True, True)],
}
ROWS = {"cpu": [2, 17, 70], "cuda": [16, 333]}  # GEMM: M (70: past GEMM_SPLIT_K_MAX_M); the GEMV takes M = 1


def quantized_weight(N, K, group, symmetric, act_order, device, seed=0):
    """(qweight, fp16 scales, qzeros, g_idx) of a random Linear weight, made by the kernel."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g).to(device)
    qweight, scales, qzeros = quantize_int4(W, group, symmetric)
    g_idx = None
    if act_order:  # groups formed in a permuted order, as GPTQ's act_order does
        g_idx = (torch.argsort(torch.randperm(K, generator=g)) // group).to(torch.int32).to(device)
    return qweight, scales.half(), qzeros, g_idx


def check(path, M, dtype, device, N, K, group, symmetric, act_order):
    qweight, scales, qzeros, g_idx = quantized_weight(N, K, group, symmetric, act_order, device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    bias = torch.randn(N).to(dtype).to(device)
    out = path(x, qweight, scales, qzeros, g_idx, group, bias)
    ref = reference_matmul(x, qweight, scales, qzeros, g_idx, group, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert relative_error(out, ref) < TOLERANCE[dtype], (M, N, K, group, symmetric, act_order)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gemv_matches_the_reference(device, dtype):
    for case in WEIGHTS[device]:
        check(w4a16_gemv, 1, dtype, device, *case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gemm_matches_the_reference(device, dtype):
    for case, M in zip(WEIGHTS[device], ROWS[device] * 2):
        check(w4a16_gemm, M, dtype, device, *case)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_picks_the_path_and_keeps_leading_dimensions(device):
    N, K, group = sizes(device, (16, 64, 32), (4096, 4096, 128))
    qweight, scales, qzeros, _ = quantized_weight(N, K, group, False, False, device)
    x = torch.randn(2, 3, K, device=device).half()
    y = w4a16_matmul(x, qweight, scales, qzeros, group_size=group)
    assert y.shape == (2, 3, N)
    assert torch.equal(y.reshape(6, N), w4a16_gemm(x.reshape(6, K), qweight, scales, qzeros, group_size=group))
    one = x[:1, :1]
    assert torch.equal(w4a16_matmul(one, qweight, scales, qzeros, group_size=group), w4a16_gemv(one, qweight, scales, qzeros, group_size=group))


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs programs one after another: no race to see")
def test_split_k_results_do_not_depend_on_which_program_finishes_last():
    qweight, scales, qzeros, _ = quantized_weight(8192, 8192, 128, True, False, "cuda")
    for M in (1, 16):
        x = torch.randn(M, 8192, device="cuda").half()
        first = w4a16_matmul(x, qweight, scales, qzeros)
        assert all(torch.equal(first, w4a16_matmul(x, qweight, scales, qzeros)) for _ in range(20))


@pytest.mark.parametrize("device", DEVICES)
def test_module_plugs_into_replace_linears(device):
    hidden = sizes(device, 64, 576)  # SmolLM2's width: group 64
    model = nn.Sequential(nn.Linear(hidden, 3 * hidden), nn.SiLU(), nn.Linear(3 * hidden, hidden)).to(device)
    reference = nn.Sequential(*(W4A16Linear.from_linear(m, 64) if isinstance(m, nn.Linear) else m for m in model))
    replaced = replace_linears(model, lambda name, linear: TritonW4A16Linear.from_linear(linear, group_size=64))
    assert all(isinstance(m, TritonW4A16Linear) for m in replaced.values())
    for ours, ref in zip(replaced.values(), (reference[0], reference[2])):  # the same codes, bit for bit
        assert torch.equal(ours.qweight, ref.qweight) and torch.equal(ours.scales, ref.scales)
        assert ours.storage_bits() == ref.storage_bits() == ours.weight_count() * 4 + ours.scales.numel() * 16
    for M in (1, 7):
        x = torch.randn(M, hidden, device=device)
        assert relative_error(model(x), reference(x)) < TOLERANCE[torch.float32]


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="576-wide layers take group_size=64"):
        W4A16Linear.from_linear(nn.Linear(576, 64), group_size=128)


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_v1_zero_points_are_converted(device):
    N, K, group = 16, 64, 32
    qweight, scales, qzeros, _ = quantized_weight(N, K, group, False, False, device)
    zeros = torch.stack([(qzeros >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [G, N/8, 8]
    v1 = torch.zeros_like(qzeros)  # AutoGPTQ's v1 stores zero - 1 in each nibble
    for i in range(8):
        v1 |= ((zeros[..., i] - 1) & 0xF) << (4 * i)
    assert torch.equal(zeros_from_v1(v1), qzeros)
    trivial = torch.arange(K, dtype=torch.int32) // group
    module = TritonW4A16Linear.from_gptq(qweight, v1, scales, g_idx=trivial, group_size=group)
    assert module.g_idx is None and torch.equal(module.qzeros, qzeros)  # a trivial g_idx is dropped


@pytest.mark.parametrize("device", DEVICES)
def test_errors_speak_to_the_learner(device):
    qweight, scales, qzeros, _ = quantized_weight(16, 64, 32, False, False, device)
    x = torch.randn(1, 64, device=device)
    with pytest.raises(TypeError, match="x must be"):
        w4a16_matmul(x.to(torch.int32), qweight, scales, qzeros, group_size=32)
    with pytest.raises(ValueError, match="K = 64"):
        w4a16_matmul(torch.randn(1, 32, device=device), qweight, scales, qzeros, group_size=32)
    with pytest.raises(ValueError, match="contiguous"):
        w4a16_matmul(torch.randn(64, 2, device=device).t(), qweight, scales, qzeros, group_size=32)
    with pytest.raises(ValueError, match="scales must have shape"):
        w4a16_matmul(x, qweight, scales, qzeros, group_size=16)
    with pytest.raises(TypeError, match="qweight must have dtype int32"):
        w4a16_matmul(x, qweight.to(torch.int64), scales, qzeros, group_size=32)


@pytest.mark.skipif(not ON_GPU, reason="the fp16-pair decoding is inline PTX: GPU only")
@pytest.mark.parametrize("symmetric", [True, False])
def test_fp16_pairs_and_float32_decoding_agree(symmetric, monkeypatch):
    """The same fp16 product through the fp16-pair path and the float32 path, both near the twin;
    group 64 with 128-wide tiles takes a scale per word row in the GEMV."""
    from quantcourse.kernels import w4a16

    for N, K, group in [(4096, 4096, 128), (1536, 576, 64)]:
        qweight, scales, qzeros, _ = quantized_weight(N, K, group, symmetric, False, "cuda")
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda").half()
            ref = reference_matmul(x, qweight, scales, qzeros, None, group)
            monkeypatch.setattr(w4a16, "F16X2_ENABLED", True)
            pairs = w4a16_matmul(x, qweight, scales, qzeros, group_size=group)
            monkeypatch.setattr(w4a16, "F16X2_ENABLED", False)
            float32 = w4a16_matmul(x, qweight, scales, qzeros, group_size=group)
            assert relative_error(pairs, ref) < TOLERANCE[torch.float16], (N, K, M)
            assert relative_error(float32, ref) < TOLERANCE[torch.float16], (N, K, M)


@pytest.mark.skipif(not ON_GPU, reason="the prefill path runs on a GPU only")
def test_prefill_rows_take_dequantize_then_cublas():
    from quantcourse.kernels.w4a16 import DEQUANTIZE_MIN_M

    qweight, scales, qzeros, _ = quantized_weight(1024, 512, 128, False, False, "cuda")
    x = torch.randn(DEQUANTIZE_MIN_M + 3, 512, device="cuda").half()
    ref = reference_matmul(x, qweight, scales, qzeros, None, 128)
    assert relative_error(w4a16_matmul(x, qweight, scales, qzeros), ref) < TOLERANCE[torch.float16]
