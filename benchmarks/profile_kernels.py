"""One launch of a kernel that missed its target, for Nsight Compute to profile.

Usage on the GPU machine (results in benchmarks/results/profiles/):
    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        --section InstructionStats --section Occupancy python benchmarks/profile_kernels.py CASE
CASE: gemm16 (W4A16, M = 16, K = N = 8192), gemv4096 (W4A16, M = 1, 4096 x 4096),
quant_asym (quantize_int4 asymmetric, g128, 8192 x 8192), w8a8 (M = 4096, K = N = 8192).
Each kernel runs five times first (compiles and autotunes), then once between
cudaProfilerStart/Stop, so ncu sees only the tuned launch.
"""
import sys
import torch
from quantcourse.kernels import quantize as qk, w4a16 as w4, w8a8 as w8
from quantcourse.reference_impl.llm_int8 import int8_vectorwise_quant

CASES = ("gemm16", "gemv4096", "quant_asym", "w8a8")
if len(sys.argv) != 2 or sys.argv[1] not in CASES:
    sys.exit(f"usage: profile_kernels.py {{{'|'.join(CASES)}}}")
case = sys.argv[1]
g = torch.Generator(device="cuda").manual_seed(0)
if case == "gemm16":
    K = N = 8192
    W = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float16) * 0.02
    qw, sc, _ = qk.quantize_int4(W, 128); sc = sc.half()
    x = torch.randn(16, K, device="cuda", generator=g, dtype=torch.float16)
    fn = lambda: w4.w4a16_matmul(x, qw, sc)
elif case == "gemv4096":
    K = N = 4096
    W = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float16) * 0.02
    qw, sc, _ = qk.quantize_int4(W, 128); sc = sc.half()
    x = torch.randn(1, K, device="cuda", generator=g, dtype=torch.float16)
    fn = lambda: w4.w4a16_matmul(x, qw, sc)
elif case == "quant_asym":
    W = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    fn = lambda: qk.quantize_int4(W, 128, False)
elif case == "w8a8":
    W = torch.randn(8192, 8192, device="cuda", generator=g, dtype=torch.float16)
    wc, wa, _ = int8_vectorwise_quant(W)
    x = torch.randn(4096, 8192, device="cuda", generator=g, dtype=torch.float16)
    fn = lambda: w8.w8a8_matmul(*w8.quantize_per_token(x), wc, wa)
for _ in range(5):
    fn()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
fn()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
