"""W8A8 in Triton: int8 activations times int8 weights on the tensor cores, one rescale at the end.

Lesson 02's vector-wise int8 (LLM.int8() without outliers, SmoothQuant's W8A8) gives every token
(row of X [M, K]) and every output channel (row of W [N, K]) its own absmax scale:

    X_q = round(X * 127 / absmax_row(X))       W_q = round(W * 127 / absmax_row(W))   (int8)
    Y   = (X_q @ W_q^T) * absmax(X)_i * absmax(W)_j / 127^2

The middle product is all integers: int8 x int8 products accumulated in int32 are exact, and
the H100's tensor cores do them at twice the rate of fp16 (about 2000 vs 1000 TOPS dense). The
scales only matter once per output element, so they are applied in the matmul's epilogue, while
the int32 tile is still in registers: no int32 [M, N] matrix ever goes to memory.

Two kernels:
- `quantize_per_token`: one program per row; reads the row once for its absmax (a second time,
  from cache, when the row is longer than one tile) and writes the int8 codes. The activations
  are quantized at every call ("dynamic"), so this pass is part of the layer's cost.
- `int8_matmul` / `w8a8_matmul`: the Triton matmul tutorial's tiled GEMM on int8 tiles,
  `tl.dot(a, b, acc)` with an int32 accumulator; then either the raw int32 (exact; the twin of
  torch._int_mm) or the fused epilogue Y = acc * (sx_i * sw_j) / 127^2 (+ bias) in fp16/bf16/fp32.

B is the weight as a Linear stores it, W [N, K] row-major: a [BLOCK_K, BLOCK_N] tile of W^T is
read with K contiguous, which is the "K-major" operand layout int8 tensor-core instructions
need, so nothing is transposed in memory.

Twins: `reference_impl.llm_int8` (int8_vectorwise_quant, int8_matmul, int8_mm_dequant, W8A8Linear).
"""

import torch
import triton
import triton.language as tl

from quantcourse.reference_impl.llm_int8 import Int8WeightLinear

from .common import check_device, check_tensor, interpreting, launch, tuning_bench
from .quantize import FLOATS, round_half_even

QMAX = tl.constexpr(127.0)  # largest code; a constexpr, so the kernels may read it
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROW_TILE = 8192  # longest row quantize_per_token holds in registers; longer rows take two passes

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): large tiles for large M (each int8 tile of
# 128 x 128 bytes is one 16 KB shared-memory stage per operand); small ones for a few tokens.
W8A8_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for m, n, k, w, s in [
        (128, 128, 128, 8, 3),  # the best of 36 configs at M = 4096, K = N = 8192 on an H100
        (128, 256, 128, 8, 3),
        (128, 256, 128, 8, 4),
        (256, 128, 128, 8, 3),
        (256, 128, 128, 8, 4),
        (128, 128, 128, 8, 4),
        (64, 128, 128, 4, 4),
        (32, 64, 128, 4, 4),
        (16, 64, 256, 4, 3),
    ]
]
W8A8_CPU = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}


# ----------------------------------------------------------------------------------------------
# Dynamic per-token quantization
# ----------------------------------------------------------------------------------------------


@triton.jit
def _quantize_per_token_kernel(x_ptr, codes_ptr, absmax_ptr, K, BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr):
    """Row r of x [M, K] -> codes[r] = round(x[r] * (127 / absmax)) int8, absmax[r] float32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:  # the row fits in one tile: read it once
        x = tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=0)
    else:  # a running elementwise max over the tiles, reduced once at the end
        running = tl.zeros([BLOCK_K], tl.float32)
        for k in range(0, K, BLOCK_K):
            chunk = tl.load(x_ptr + row * K + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
            running = tl.maximum(running, tl.abs(chunk))
        absmax = tl.max(running, axis=0)
    # The reference multiplies by the float32 factor 127 / absmax (not divides by absmax / 127),
    # and torch computes 127 / absmax as reciprocal(absmax) * 127: two roundings, reproduced
    # here. An all-zero row gets factor 0 (and no division by zero is computed at all).
    factor = tl.where(absmax > 0, tl.math.div_rn(1.0, tl.where(absmax > 0, absmax, 1.0)) * QMAX, 0.0)
    tl.store(absmax_ptr + row, absmax)
    if ONE_TILE:
        tl.store(codes_ptr + row * K + offs, round_half_even(x * factor).to(tl.int8), mask=offs < K)
    else:
        for k in range(0, K, BLOCK_K):
            chunk = tl.load(x_ptr + row * K + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
            tl.store(codes_ptr + row * K + k + offs, round_half_even(chunk * factor).to(tl.int8), mask=k + offs < K)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization: bitsandbytes' int8_vectorwise_quant (threshold 0).

    x: [M, K] float32/float16/bfloat16, contiguous. Returns codes [M, K] int8 (x_hat = codes *
    absmax / 127) and absmax [M] float32: the same values as the reference, bit for bit.
    """
    check_tensor(x, "x", FLOATS)
    check_device(x)
    M, K = x.shape
    codes = torch.empty(M, K, dtype=torch.int8, device=x.device)
    absmax = torch.empty(M, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(K), 64 if interpreting() else ROW_TILE)
    if M:
        # enable_fp_fusion=False: x * factor must be rounded to float32 before it is rounded to an
        # integer, as torch does; fused into one multiply-add with round_half_even's addition, it
        # would not be, and a few codes would land on the other side of a tie.
        _quantize_per_token_kernel[(M,)](
            x, codes, absmax, K, BLOCK_K=block, ONE_TILE=K <= block, num_warps=4 if block <= 2048 else 8,
            enable_fp_fusion=False,
        )  # fmt: skip
    return codes, absmax


# ----------------------------------------------------------------------------------------------
# int8 GEMM with a fused rescale
# ----------------------------------------------------------------------------------------------


def _prune_configs(configs, named_args, **kwargs):
    """Row blocks no taller than needed for M."""
    block_m = max(16, triton.next_power_of_2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= block_m] or configs[-1:]


@triton.autotune(
    configs=W8A8_CONFIGS,
    key=["M_BUCKET", "N", "K", "RESCALE"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=tuning_bench,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, out_ptr, a_absmax_ptr, b_absmax_ptr, bias_ptr, M, N, K, M_BUCKET,
    RESCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """out [M, N] = A [M, K] @ B[N, K]^T in int32; with RESCALE, * absmax_a * absmax_b / 127^2.

    EVEN_K (K a multiple of BLOCK_K, set by the heuristic): the loads need no mask, which lets the
    compiler issue them as whole asynchronous copies into shared memory."""
    # Grouped order (Triton's matmul tutorial): programs running together share B tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past M (columns past N) wrap around to valid ones: the loads need no mask there, and
    # those results are never stored.
    a_ptrs = a_ptr + (offs_m % M)[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + (offs_n % N)[None, :].to(tl.int64) * K + offs_k[:, None]  # W^T tile from W [N, K]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 x int8 -> int32, exact
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    m_ok, n_ok = offs_m < M, offs_n < N
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if RESCALE:
        absmax_a = tl.load(a_absmax_ptr + offs_m, mask=m_ok, other=0.0)
        absmax_b = tl.load(b_absmax_ptr + offs_n, mask=n_ok, other=0.0)
        # bitsandbytes' order: C * (row x col) * (1 / 127^2), then + bias
        y = acc.to(tl.float32) * (absmax_a[:, None] * absmax_b[None, :]) * (1.0 / (QMAX * QMAX))
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(out_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    check_tensor(a, "a (int8 activations [M, K])", (torch.int8,))
    check_tensor(b, "b (int8 weight [N, K], a Linear's layout)", (torch.int8,))
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"inner dimensions differ: a is {tuple(a.shape)} [M, K], b is {tuple(b.shape)} [N, K] "
            "(b is laid out like a Linear weight, one row per output, not transposed)"
        )
    return a.shape[0], b.shape[0], a.shape[1]


def _run(a, b, out, a_absmax, b_absmax, bias, rescale: bool) -> torch.Tensor:
    M, N, K = out.shape[0], out.shape[1], a.shape[1]
    if M == 0 or N == 0:
        return out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    # Pointers the kernel does not use under these flags still need a tensor: `out` stands in.
    launch(
        _int8_matmul_kernel, grid, a, b, out, out if a_absmax is None else a_absmax,
        out if b_absmax is None else b_absmax, out if bias is None else bias, M, N, K, triton.next_power_of_2(M),
        RESCALE=rescale, HAS_BIAS=bias is not None, cpu_config=W8A8_CPU,
        enable_fp_fusion=False,  # the rescale rounds after each step, in bitsandbytes' order
    )  # fmt: skip
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer product a @ b^T. a: [M, K] int8, b: [N, K] int8 -> [M, N] int32.

    Twin: reference_impl.llm_int8.int8_matmul (torch._int_mm).
    """
    M, N, _ = _check_operands(a, b)
    check_device(a, b)
    out = torch.empty(M, N, dtype=torch.int32, device=a.device)
    return _run(a, b, out, None, None, None, rescale=False)


def w8a8_matmul(
    a: torch.Tensor,
    a_absmax: torch.Tensor,
    b: torch.Tensor,
    b_absmax: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Y = (a @ b^T) * a_absmax_i * b_absmax_j / 127^2 (+ bias), rescaled inside the GEMM.

    a: [M, K] int8 and a_absmax [M] float32 (from `quantize_per_token`); b: [N, K] int8 and
    b_absmax [N] float32 (a weight quantized per output row); bias: [N] float or None.
    Returns [M, N] in out_dtype (float16, bfloat16 or float32), computed in float32:
    int8_mm_dequant(int8_matmul(a, b), a_absmax, b_absmax, bias, out_dtype) of the reference.
    """
    M, N, _ = _check_operands(a, b)
    check_tensor(a_absmax, "a_absmax", (torch.float32,), dims=1, shape=(M,))
    check_tensor(b_absmax, "b_absmax", (torch.float32,), dims=1, shape=(N,))
    if bias is not None:
        check_tensor(bias, "bias", FLOATS, dims=1, shape=(N,))
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_device(a, a_absmax, b, b_absmax, bias)
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    return _run(a, b, out, a_absmax, b_absmax, bias, rescale=True)


class TritonW8A8Linear(Int8WeightLinear):
    """`reference_impl.llm_int8.W8A8Linear` (per-token activations) on the Triton kernels.

    Same buffers (weight_codes [N, K] int8, weight_absmax [N] float32, bias). Every call
    quantizes the activations per token, then runs one int8 GEMM with the rescale fused.
    Plugs into `replace_linears(model, lambda name, lin: TritonW8A8Linear.from_linear(lin))`.
    """

    @classmethod
    def from_linear(cls, linear) -> "TritonW8A8Linear":
        return cls(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        X = self.flatten_input(x).contiguous()
        codes, absmax = quantize_per_token(X)
        Y = w8a8_matmul(codes, absmax, self.weight_codes, self.weight_absmax, self.bias, out_dtype=x.dtype)
        return Y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 per-token (Triton)"
