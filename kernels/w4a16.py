"""W4A16 in Triton: 4-bit weights dequantized inside the matrix product.

Generating one token multiplies a vector x [1, K] by every weight matrix W [N, K]: 2 flops per
weight, and every weight read from memory once. An H100 reads about 3 TB/s and computes hundreds
of TFLOP/s, so the time is the time to read W: 134 MB for an 8192 x 8192 fp16 matrix, about
45 us (cuBLAS takes 50). Stored in 4 bits (plus a 16-bit scale per group of 128), the same matrix is 34 MB, so a
kernel that reads the codes and dequantizes them in registers can approach 4x fewer bytes,
and 4x less time. Everything in this file serves that: read the packed words once, coalesced,
with enough of them in flight, and never write a dequantized weight back to memory.

The layout is GPTQ's (kernels/quantize.py, reference_impl/w4a16.py): qweight [K/8, N] int32,
eight consecutive input features of one output column per word; scales [G, N]; optional qzeros
[G, N/8] (absent: symmetric, zero point 8) and g_idx [K] (act-order checkpoints). A load of
qweight rows is contiguous along N, so neighbouring threads read neighbouring words.

Two kernels, chosen by the number of rows M of x:

- GEMV (M = 1, decoding one sequence): no matrix unit. Each program takes BLOCK_N output columns
  and a slice of K, and for each word row multiplies the 8 codes by x and accumulates. At 3 TB/s
  of 4-bit weights an H100 must decode about 20 weights per SM per clock, so instructions per
  weight count. Two decoders:
  * fp16 pairs (GPU, fp16 x): `dot8_f16x2` below takes two codes at once into the mantissas of
    a pair of fp16 numbers and multiplies both by x in one instruction: about 2.5 instructions
    per weight. The float32 partial sum of each word is scaled once per word.
  * float32 (bf16/fp32 x, act-order g_idx, the interpreter): each code is masked in place into
    the mantissa of 2^23 (the float 2^23 + c exactly, no int-to-float conversion; at 16^p c for
    codes still in place), then subtract, multiply, add: about 7 instructions per weight. Profiled
    with ncu this path is issue-bound (DRAM 36% busy); the pairs path took the 8192 x 8192 GEMV
    from 24.8 to 18.8 us.
- GEMM (2 <= M < DEQUANTIZE_MIN_M): tiles of x [BLOCK_M, BLOCK_K] and of the weight [BLOCK_K,
  BLOCK_N]; the weight tile is dequantized to fp16/bf16 in registers (fp16: `weight_tile_f16x2`,
  the same pair trick), then `tl.dot` runs it on the tensor cores. Rows of x beyond M are masked:
  M = 2 costs about what M = 16 does. For a few rows the product is computed transposed,
  out^T = W x^T (SWAP_AB): the weight tile becomes the left operand, which Hopper's matrix
  instructions can read from registers, and x's few rows the narrow right one.
- Prefill (M >= DEQUANTIZE_MIN_M): compute-bound, and a fused kernel that dequantizes in every
  tile runs at about 60% of cuBLAS fp16 there, so W is dequantized once (`dequantize_int4`) and
  cuBLAS multiplies: 0.93x of fp16 at M = 4096 instead of 0.57x. Only the decode-time paths above
  save time; prefill pays one extra pass over W (benchmarks/results/kernels.md has the numbers).

Split-K: one program per BLOCK_N columns would leave most of the GPU idle at M = 1 (64 programs
for N = 8192 on 132 SMs), so K is also split into SPLIT_K slices, each a program of its own.
Their partial sums must then be added. Here each program writes its partial tile to a float32
workspace and increments a per-tile counter (an atomic); the program that arrives last adds the
SPLIT_K partials in a fixed order and writes the result. One launch, and the result does not
depend on which program finished first (atomic adds of floats would).

Latency: a program that loads a tile and then decodes it leaves memory idle while it computes.
The GEMV issues the next tile's loads before decoding the current one (prefetch), so both run.

Autotuning: `GEMV_CONFIGS` and `GEMM_CONFIGS` below (chosen from sweeps on an H100), timed once
per shape (GEMM: per power-of-2 bucket of M); under the interpreter each kernel runs one small
fixed configuration instead.

Twin: `reference_impl.w4a16.w4a16_matmul` (unpack, dequantize, multiply in torch). The float
results differ by summation order and rounding: the float32 GEMV accumulates in float32, the
fp16-pair GEMV sums each word's 8 products in fp16 first, the GEMM multiplies fp16/bf16 weights
(the dequantized value rounded once) with float32 accumulation, as cuBLAS does. All stay within
2e-3 relative error of the twin in fp16 (tests/test_kernels_w4a16.py, on the GPU too).
"""

import torch
import triton
import triton.language as tl

from quantcourse.reference_impl.w4a16 import W4A16Linear

from .common import check_device, interpreting, launch, tuning_bench
from .quantize import FLOATS, check_int4_weight, dequantize_int4, group_scale_zero, quantize_int4, unpack_int4

F16X2_ENABLED = True  # off: every launch takes the float32 paths (to compare them)
# From M = 1024 rows on, dequantizing W once (one pass: read 4 bits, write 16 per weight) and
# calling cuBLAS beats the fused GEMM, whose dequantization in every tile competes with the tensor
# cores (H100, K = N = 8192: 785 us against 1247 at M = 4096; the fused kernel wins at M = 256).
DEQUANTIZE_MIN_M = 1024
GEMM_SPLIT_K_MAX_M = 64  # split K only while tiles alone cannot fill the GPU

# The autotuner picks among these, timed once per shape (GEMM: per power-of-2 bucket of M).
# GEMV: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps). Narrow column blocks and split K give 512 to
# 2048 programs, several per SM, so that many tiles are in flight. From a sweep of 72 configs on
# an H100 (BLOCK_N 32-128, BLOCK_K 64-256, SPLIT_K 4-32, 2 or 4 warps) at the benchmark's shapes:
# each shape's best one or two, all within 5% of the best of the 72 at every shape.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w)
    for n, k, s, w in [
        (128, 128, 16, 4),
        (128, 64, 32, 4),
        (32, 256, 4, 4),
        (32, 256, 8, 4),
        (128, 64, 16, 4),
        (128, 64, 8, 2),
        (64, 128, 8, 2),
        (64, 64, 16, 4),
    ]
]
# GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, SWAP_AB, num_warps, num_stages). Small M: one row
# block, split K, and SWAP_AB (the weight tile as the matrix unit's left operand, module doc):
# memory-bound, like the GEMV. Large M: big tiles, no split: compute-bound.
GEMM_CONFIGS = [
    triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s, "SWAP_AB": swap, "GROUP_M": 8},
        num_warps=w,
        num_stages=st,
    )
    for m, n, k, s, swap, w, st in [
        (16, 64, 128, 4, True, 4, 3),  # M <= 16: the best of 64 configs at three shapes
        (16, 64, 64, 8, True, 4, 3),
        (16, 64, 64, 4, True, 4, 4),
        (32, 128, 128, 2, False, 4, 3),
        (64, 128, 128, 1, False, 4, 3),
        (64, 128, 64, 1, True, 4, 3),
        (128, 128, 64, 1, False, 8, 3),
        (128, 128, 64, 1, True, 8, 3),
        (128, 256, 64, 1, False, 8, 3),
    ]
]
GEMV_CPU = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}
GEMM_CPU = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 2}  # SWAP_AB: M <= 16


# ----------------------------------------------------------------------------------------------
# Split-K: who adds the partial sums
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """out[offs_m, offs_n] = acc (+ bias), in out's dtype. acc: [len(offs_m), len(offs_n)] float32."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_split_k(
    acc, out_ptr, bias_ptr, partial_ptr, count_ptr, offs_m, offs_n, M, N, tile, pid_k,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """Store this program's share of output tile `tile`; with split-K the last one to arrive sums.

    partial_ptr: float32 workspace [SPLIT_K, M, N]; count_ptr: int32 per tile, 0 between launches.
    """
    if SPLIT_K == 1:
        _store_output(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_BIAS)
    else:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # all threads' partials are written before the count goes up
        # acq_rel: our partial is visible to whoever sees the count, and we see theirs.
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):  # a fixed order: the same sum whoever came last
                total += tl.load(partial_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + tile, 0)  # ready for the next launch
            _store_output(total, out_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_BIAS)


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_k_workspace(device: torch.device, partials: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 buffer of at least `partials` elements and `tiles` zeroed int32 counters.

    Kept between calls (the kernels leave every counter at 0). Launches on one device share
    it, so run them on one stream at a time, as a model's forward pass does.
    """
    partial, count = _workspaces.get(device, (None, None))
    if partial is None or partial.numel() < partials:
        partial = torch.empty(max(partials, 1), dtype=torch.float32, device=device)
    if count is None or count.numel() < tiles:
        count = torch.zeros(max(tiles, 1), dtype=torch.int32, device=device)
    _workspaces[device] = (partial, count)
    return partial, count


# ----------------------------------------------------------------------------------------------
# Half-precision pairs: eight codes of a word dequantized with a few instructions (GPU, fp16)
# ----------------------------------------------------------------------------------------------
#
# At 3 TB/s of 4-bit weights an H100 has about 2 instructions per weight to spare (module doc);
# unpacking one code at a time into float32 spends 7. The trick below (FasterTransformer's and
# Marlin's) works on two codes at once, as a pair of fp16 numbers in one 32-bit register:
#   (word >> 4j) & 0x000F000F  keeps nibble j in bits 0..3 and nibble j+4 in bits 16..19;
#   OR 0x64006400              puts each in the mantissa of 1024.0 (fp16 0x6400, whose last
#                              mantissa bit is worth 1): the pair (1024 + c_j, 1024 + c_j+4);
# one `lop3` instruction does the AND and the OR. Subtracting the pair (1024 + z, 1024 + z) leaves
# c - z exactly, and `f16x2` instructions then multiply and add both halves at once. Triton has no
# pair type, so these run as inline PTX: on the GPU only, for fp16 activations and weights
# grouped by k // group (no g_idx); everything else takes the float32 code paths.


@triton.jit
def half2_bits(lo, hi):
    """Two float16 tensors -> int32 tensor holding the pair (lo in bits 0..15, hi in 16..31)."""
    lo = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
    return lo | (hi << 16)


@triton.jit
def zero_pair(zero):
    """Zero points 0..15 (float32) -> int32 pairs (1024 + z, 1024 + z) in fp16 bits."""
    bits = 0x6400 + zero.to(tl.int32)
    return bits | (bits << 16)


@triton.jit
def dot8_f16x2(words, x04, x15, x26, x37, zero2):
    """sum_j (c_j - z) x_j over the 8 codes c_j of each word, as float32 (computed in fp16 pairs).

    words [R, C] int32; x04 .. x37 [R, C] int32: the fp16 pairs (x_0, x_4), (x_1, x_5), ... that
    meet each word's pairs of codes; zero2 [R, C] from `zero_pair`. The 8 products are summed in
    fp16 (exact products of c - z with x, one rounding per addition), then the two halves in
    float32: an fp16 partial sum overflows only if it passes 65504, e.g. |x| > 546 on all 8 inputs.
    """
    sums = tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 c, t, acc;
        .reg .f16 lo, hi;
        .reg .f32 flo, fhi;
        lop3.b32 c, $1, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $6;
        mul.rn.f16x2 acc, c, $2;
        shr.u32 t, $1, 4;
        lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $6;
        fma.rn.f16x2 acc, c, $3, acc;
        shr.u32 t, $1, 8;
        lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $6;
        fma.rn.f16x2 acc, c, $4, acc;
        shr.u32 t, $1, 12;
        lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $6;
        fma.rn.f16x2 acc, c, $5, acc;
        mov.b32 {lo, hi}, acc;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.f32 flo, flo, fhi;
        mov.b32 $0, flo;
        }""",
        constraints="=r,r,r,r,r,r,r",
        args=[words, x04, x15, x26, x37, zero2],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )
    return sums.to(tl.float32, bitcast=True)


@triton.jit
def dequantize8_f16x2(words, zero2, scale2):
    """The 8 codes of each word dequantized, (c_j - z) * s in fp16: four int32 tensors of pairs,
    (w_0, w_4), (w_1, w_5), (w_2, w_6), (w_3, w_7), each [R, C] like words. scale2: fp16 pairs (s, s)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 c, t;
        lop3.b32 c, $4, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $5;
        mul.rn.f16x2 $0, c, $6;
        shr.u32 t, $4, 4;
        lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $5;
        mul.rn.f16x2 $1, c, $6;
        shr.u32 t, $4, 8;
        lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $5;
        mul.rn.f16x2 $2, c, $6;
        shr.u32 t, $4, 12;
        lop3.b32 c, t, 0x000F000F, 0x64006400, 0xEA;
        sub.f16x2 c, c, $5;
        mul.rn.f16x2 $3, c, $6;
        }""",
        constraints="=r,=r,=r,=r,r,r,r",
        args=[words, zero2, scale2],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True,
        pack=1,
    )


@triton.jit
def split_half2(pairs):
    """int32 pairs -> (low half, high half) as two float16 tensors."""
    lo = pairs.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def weight_tile_f16x2(words, zero, scale, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """words [BLOCK_K/8, BLOCK_N] -> dequantized fp16 tile [BLOCK_K, BLOCK_N] in natural k order.

    zero, scale: [1, BLOCK_N] float32 (the tile lies in one group)."""
    scale2 = half2_bits(scale, scale)
    p04, p15, p26, p37 = dequantize8_f16x2(words, zero_pair(zero) + tl.zeros_like(words), scale2 + tl.zeros_like(words))
    w0, w4 = split_half2(p04)
    w1, w5 = split_half2(p15)
    w2, w6 = split_half2(p26)
    w3, w7 = split_half2(p37)
    # join adds a last axis of 2: nesting three of them indexes the 8 codes as j = 4a + 2b + c.
    w = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
    w = tl.reshape(w, (BLOCK_K // 8, BLOCK_N, 8))
    return tl.reshape(tl.permute(w, (0, 2, 1)), (BLOCK_K, BLOCK_N))


# ----------------------------------------------------------------------------------------------
# GEMV: M = 1
# ----------------------------------------------------------------------------------------------


def _prune_configs(configs, named_args, **kwargs):
    """GEMV: all of them. GEMM: tiles no longer than a group (one scale per tile, which the fp16
    pair path needs) when any config allows it, row blocks no taller than needed, and split K only
    for small M (module doc)."""
    if "BLOCK_M" not in configs[0].kwargs:
        return configs
    group, M = named_args["GROUP"] if "GROUP" in named_args else kwargs["GROUP"], named_args.get("M", 1)
    by_group = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0] or configs
    block_m = max(16, triton.next_power_of_2(M))
    kept = [c for c in by_group if c.kwargs["BLOCK_M"] <= block_m and (c.kwargs["SPLIT_K"] == 1 or M <= GEMM_SPLIT_K_MAX_M)]
    return kept or by_group[:1]


@triton.jit
def _gemv_tile(qweight_ptr, scales_ptr, qzeros_ptr, k0, k_end, rows, offs_n, n_ok, N, K,
               GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Words [BLOCK_K/8, BLOCK_N] of the tile starting at input k0 (0 from k_end on), and its
    scales and zero points: [1, BLOCK_N] when the tile lies in one group, else one row per word row."""
    word_rows = k0 // 8 + rows
    mask = (word_rows * 8 < k_end)[:, None] & n_ok[None, :]
    words = tl.load(qweight_ptr + word_rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if GROUP % BLOCK_K == 0:
        groups = tl.zeros([1], tl.int32) + tl.minimum(k0, K - 1) // GROUP  # past the end: any valid group
    else:
        groups = tl.minimum(word_rows * 8, K - 1) // GROUP
    scale, zero = group_scale_zero(scales_ptr, qzeros_ptr, groups, offs_n, n_ok, N, HAS_ZEROS)
    return words, scale, zero


@triton.jit
def _load_x(x_ptr, k, K, EVEN_K: tl.constexpr):
    """x[k] (0 past K; EVEN_K: no element is past K, so no mask)."""
    if EVEN_K:
        return tl.load(x_ptr + k)
    return tl.load(x_ptr + k, mask=k < K, other=0.0)


@triton.jit
def _decode_f32(x_ptr, words, scale, zero, k_rows, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile's contribution [BLOCK_K/8, BLOCK_N] (float32): word row i holds inputs k_rows[i] + 0..7.

    Codes 0..2 sit in bits 0..11 of the word; shifted down by 12 bits, codes 3..7 sit in bits
    0..19. Code j, at nibble position p of its source, is masked in place (no shift) into the
    mantissa of 2^23: the float 2^23 + c * 16^p. Subtracting 2^23 + z * 16^p leaves (c - z) * 16^p
    exactly, and x_j is scaled by 16^-p to match.
    """
    high = words >> 12
    dot = tl.zeros([BLOCK_K // 8, BLOCK_N], tl.float32)
    for j in tl.static_range(8):
        source = words if j < 3 else high
        p = j if j < 3 else j - 3
        unit = 1 << (4 * p)  # 16^p
        xj = _load_x(x_ptr, k_rows + j, K, EVEN_K).to(tl.float32) * (1.0 / unit)
        as_float = (source & (0xF << (4 * p))) | 0x4B000000  # bits of 2^23 + c * 16^p
        dot += (as_float.to(tl.float32, bitcast=True) - (8388608.0 + zero * unit)) * xj[:, None]
    return dot * scale


@triton.jit
def _decode_f16x2(x_ptr, words, scale, zero, k_rows, K, EVEN_K: tl.constexpr):
    """`_decode_f32` with fp16 pairs (`dot8_f16x2`): x must be float16."""
    x04 = half2_bits(_load_x(x_ptr, k_rows, K, EVEN_K), _load_x(x_ptr, k_rows + 4, K, EVEN_K))
    x15 = half2_bits(_load_x(x_ptr, k_rows + 1, K, EVEN_K), _load_x(x_ptr, k_rows + 5, K, EVEN_K))
    x26 = half2_bits(_load_x(x_ptr, k_rows + 2, K, EVEN_K), _load_x(x_ptr, k_rows + 6, K, EVEN_K))
    x37 = half2_bits(_load_x(x_ptr, k_rows + 3, K, EVEN_K), _load_x(x_ptr, k_rows + 7, K, EVEN_K))
    zero2 = zero_pair(zero) + tl.zeros_like(words)
    x04, x15 = tl.broadcast_to(x04[:, None], words.shape), tl.broadcast_to(x15[:, None], words.shape)
    x26, x37 = tl.broadcast_to(x26[:, None], words.shape), tl.broadcast_to(x37[:, None], words.shape)
    return dot8_f16x2(words, x04, x15, x26, x37, zero2) * scale


@triton.autotune(
    configs=GEMV_CONFIGS,
    key=["N", "K", "GROUP", "HAS_ZEROS", "HAS_G_IDX"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=tuning_bench,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr, partial_ptr, count_ptr, N, K,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    F16X2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """out [1, N] = x [1, K] @ W^T for a GPTQ-layout W. Grid: (cdiv(N, BLOCK_N), SPLIT_K).

    F16X2: decode with `dot8_f16x2` (fp16 x on a GPU, no g_idx), else in float32 as below.

    EVEN_K (K a multiple of BLOCK_K, set by the heuristic): every tile is whole, so the loads of x
    need no mask; a compare and a select saved on each of them counts at this rate."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)  # word rows of a tile; row i holds inputs 8i .. 8i+7
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # inputs per K slice
    k_start = pid_k * span
    k_end = tl.minimum(K, k_start + span)

    # acc[i, n]: what word row i of every tile contributed to column n; summed over i at the end
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], tl.float32)
    if HAS_G_IDX:  # act-order: each input feature has its own group, so each weight its scale
        for k0 in range(k_start, k_end, BLOCK_K):
            word_rows = k0 // 8 + rows
            w_mask = (word_rows * 8 < k_end)[:, None] & n_ok[None, :]
            words = tl.load(qweight_ptr + word_rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
            for j in tl.static_range(8):
                k = k0 + 8 * rows + j
                xj = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                groups = tl.load(g_idx_ptr + k, mask=k < K, other=0)
                scale, zero = group_scale_zero(scales_ptr, qzeros_ptr, groups, offs_n, n_ok, N, HAS_ZEROS)
                code = ((words >> (4 * j)) & 0xF).to(tl.float32)
                acc += (code - zero) * scale * xj[:, None]
    else:
        # Prefetch: the next tile's loads are issued before this tile is decoded, so that memory
        # works while the ALUs do (at the cost of registers for two tiles).
        words, scale, zero = _gemv_tile(qweight_ptr, scales_ptr, qzeros_ptr, k_start, k_end, rows, offs_n, n_ok,
                                        N, K, GROUP, HAS_ZEROS, BLOCK_K)  # fmt: skip
        for k0 in range(k_start, k_end, BLOCK_K):
            next_words, next_scale, next_zero = _gemv_tile(
                qweight_ptr, scales_ptr, qzeros_ptr, k0 + BLOCK_K, k_end, rows, offs_n, n_ok, N, K,
                GROUP, HAS_ZEROS, BLOCK_K,
            )  # fmt: skip
            if F16X2:
                acc += _decode_f16x2(x_ptr, words, scale, zero, k0 + 8 * rows, K, EVEN_K)
            else:
                acc += _decode_f32(x_ptr, words, scale, zero, k0 + 8 * rows, K, EVEN_K, BLOCK_K, BLOCK_N)
            words, scale, zero = next_words, next_scale, next_zero

    partial = tl.sum(acc, axis=0)[None, :]
    store_split_k(partial, out_ptr, bias_ptr, partial_ptr, count_ptr, tl.arange(0, 1), offs_n, 1, N, pid_n, pid_k,
                  HAS_BIAS, SPLIT_K)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# GEMM: M >= 2
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b on the matrix units; float32 operands at full precision, not tf32."""
    if DOT_DTYPE == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dequantize_tile(words, scales_ptr, qzeros_ptr, g_idx_ptr, k0, offs_k, offs_n, n_ok, N, K,
                     GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """words [BLOCK_K/8, BLOCK_N] of inputs offs_k -> weight tile [BLOCK_K, BLOCK_N] in DOT_DTYPE,
    computed in float32 (any group layout, any dtype, the interpreter)."""
    codes = unpack_int4(words, BLOCK_K, BLOCK_N).to(tl.float32)
    if HAS_G_IDX:
        groups = tl.load(g_idx_ptr + offs_k, mask=offs_k < K, other=0)
    elif GROUP % BLOCK_K == 0:
        groups = tl.zeros([1], tl.int32) + k0 // GROUP
    else:  # past K (masked codes), any valid group: an unread scale could be NaN, and NaN * 0 is NaN
        groups = tl.minimum(offs_k, K - 1) // GROUP
    scale, zero = group_scale_zero(scales_ptr, qzeros_ptr, groups, offs_n, n_ok, N, HAS_ZEROS)
    return ((codes - zero) * scale).to(DOT_DTYPE)


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "GROUP", "HAS_ZEROS", "HAS_G_IDX"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=tuning_bench,
)
@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr, partial_ptr, count_ptr,
    M, N, K, M_BUCKET,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, F16X2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out [M, N] = x [M, K] @ W^T. Grid: (tiles of out, SPLIT_K). M_BUCKET: the autotuner's key.

    F16X2: dequantize with `weight_tile_f16x2` (fp16 on a GPU, no g_idx, every tile in one group)."""
    # Neighbouring programs take GROUP_M row blocks of the same columns: their weight tiles are
    # read from memory once and from the L2 cache after that (the Triton matmul tutorial's order).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_end = tl.minimum(K, (pid_k + 1) * span)

    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * span, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        word_rows = k0 // 8 + rows
        w_mask = (word_rows < K // 8)[:, None] & n_ok[None, :]
        words = tl.load(qweight_ptr + word_rows[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
        if F16X2:  # one group per tile (the launcher checks): scale and zero [1, BLOCK_N]
            groups = tl.zeros([1], tl.int32) + k0 // GROUP
            scale, zero = group_scale_zero(scales_ptr, qzeros_ptr, groups, offs_n, n_ok, N, HAS_ZEROS)
            w = weight_tile_f16x2(words, zero, scale, BLOCK_K, BLOCK_N)
        else:
            w = _dequantize_tile(words, scales_ptr, qzeros_ptr, g_idx_ptr, k0, offs_k, offs_n, n_ok, N, K,
                                 GROUP, HAS_ZEROS, HAS_G_IDX, DOT_DTYPE, BLOCK_K, BLOCK_N)  # fmt: skip
        a = a.to(DOT_DTYPE)
        if SWAP_AB:  # out^T [BLOCK_N, BLOCK_M] += W tile^T @ x tile^T
            acc = _dot(tl.trans(w), tl.trans(a), acc, DOT_DTYPE)
        else:
            acc = _dot(a, w, acc, DOT_DTYPE)

    if SWAP_AB:
        acc = tl.trans(acc)
    store_split_k(acc, out_ptr, bias_ptr, partial_ptr, count_ptr, offs_m, offs_n, M, N, pid_m * num_n + pid_n, pid_k,
                  HAS_BIAS, SPLIT_K)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_inputs(x, qweight, scales, qzeros, g_idx, group_size, bias):
    N, K, group = check_int4_weight(qweight, scales, qzeros, g_idx, group_size)
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOATS:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] with K = {K} (8 x qweight rows), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x is not contiguous: the kernels index its rows by their length. Pass x.contiguous().")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in FLOATS):
        raise ValueError(f"bias must be a float tensor of shape ({N},), got {bias.dtype} {tuple(bias.shape)}")
    check_device(x, qweight, bias)
    return N, K, group


def _launch(kernel, grid, x, out, qweight, scales, qzeros, g_idx, bias, group, cpu_config, sizes, constants):
    """Both kernels take the same pointers and flags; None tensors get a stand-in pointer."""
    M, N = out.shape
    if interpreting():  # the interpreter runs cpu_config, whatever M
        max_split = cpu_config["SPLIT_K"]
    else:
        max_split = max(c.kwargs["SPLIT_K"] for c in kernel.configs) if M <= GEMM_SPLIT_K_MAX_M else 1
    partial, count = split_k_workspace(out.device, max_split * M * N, triton.cdiv(M, 16) * triton.cdiv(N, 16))
    launch(
        kernel, grid, x, qweight, scales, qweight if qzeros is None else qzeros, qweight if g_idx is None else g_idx,
        out if bias is None else bias, out, partial, count, *sizes,
        GROUP=group, HAS_ZEROS=qzeros is not None, HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None,
        cpu_config=cpu_config, **constants,
    )  # fmt: skip


def use_f16x2(x: torch.Tensor, g_idx: torch.Tensor | None) -> bool:
    """Whether the kernels may decode in fp16 pairs (inline PTX: compiled for a GPU only)."""
    return x.dtype == torch.float16 and g_idx is None and not interpreting() and F16X2_ENABLED


def w4a16_gemv(x, qweight, scales, qzeros=None, g_idx=None, group_size=128, bias=None) -> torch.Tensor:
    """The M = 1 path of `w4a16_matmul` (same arguments); x: [1, K] or [K]."""
    N, K, group = _check_inputs(x, qweight, scales, qzeros, g_idx, group_size, bias)
    if x.numel() != K:
        raise ValueError(f"the GEMV path takes one row of K = {K} inputs, got x of shape {tuple(x.shape)}")
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    _launch(_w4a16_gemv_kernel, grid, x, out, qweight, scales, qzeros, g_idx, bias, group, GEMV_CPU, (N, K),
            {"F16X2": use_f16x2(x, g_idx)})  # fmt: skip
    return out.reshape(*x.shape[:-1], N)


def w4a16_gemm(x, qweight, scales, qzeros=None, g_idx=None, group_size=128, bias=None) -> torch.Tensor:
    """The M >= 2 path of `w4a16_matmul` (same arguments); also right, if slower, at M = 1."""
    N, K, group = _check_inputs(x, qweight, scales, qzeros, g_idx, group_size, bias)
    X = x.reshape(-1, K)
    M = X.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    # bfloat16 products do not run in the interpreter (numpy has no bfloat16): it multiplies in float32.
    dot_dtype = tl.float32 if interpreting() and x.dtype == torch.bfloat16 else DOT_DTYPES[x.dtype]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    sizes = (M, N, K, triton.next_power_of_2(M))
    cpu_config = {**GEMM_CPU, "SWAP_AB": M <= 16}  # the interpreter runs both orientations in the tests
    f16x2 = use_f16x2(x, g_idx) and any(group % c.kwargs["BLOCK_K"] == 0 for c in GEMM_CONFIGS)  # the rest are pruned
    _launch(_w4a16_gemm_kernel, grid, X, out, qweight, scales, qzeros, g_idx, bias, group, cpu_config, sizes,
            {"DOT_DTYPE": dot_dtype, "F16X2": f16x2})  # fmt: skip
    return out.reshape(*x.shape[:-1], N)


def dequantize_then_matmul(x, qweight, scales, qzeros=None, g_idx=None, group_size=128, bias=None) -> torch.Tensor:
    """The prefill path of `w4a16_matmul` (same arguments): W dequantized to x's dtype by
    `quantize.dequantize_int4`, then cuBLAS. Worth it once M is large (`DEQUANTIZE_MIN_M`)."""
    N, K, group = _check_inputs(x, qweight, scales, qzeros, g_idx, group_size, bias)
    W = dequantize_int4(qweight, scales, qzeros, group, g_idx, dtype=x.dtype)
    return torch.nn.functional.linear(x, W, bias)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    group_size: int | None = 128,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = x @ W^T (+ bias) with W in GPTQ's 4-bit layout, dequantized on the fly.

    x: [..., K] float16/bfloat16/float32, contiguous; qweight [K/8, N] int32; scales [G, N];
    qzeros [G, N/8] int32 or None (symmetric); g_idx [K] int32 or None; bias [N] or None.
    One row (M = 1) takes the GEMV kernel, up to DEQUANTIZE_MIN_M rows the GEMM kernel, more
    rows (prefill) `dequantize_then_matmul` on a GPU.
    Returns [..., N] in x's dtype. Twin: reference_impl.w4a16.w4a16_matmul.
    """
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if rows == 1:
        path = w4a16_gemv
    elif rows >= DEQUANTIZE_MIN_M and not interpreting():
        path = dequantize_then_matmul
    else:
        path = w4a16_gemm
    return path(x, qweight, scales, qzeros, g_idx, group_size, bias)


class TritonW4A16Linear(W4A16Linear):
    """`reference_impl.w4a16.W4A16Linear` with its forward pass on the Triton kernels.

    Same buffers, same `from_linear` / `from_gptq`; plugs into `replace_linears`:
    `replace_linears(model, lambda name, lin: TritonW4A16Linear.from_linear(lin, group_size=64))`.
    """

    @classmethod
    def from_linear(cls, linear, group_size: int | None = 128, symmetric: bool = True) -> "TritonW4A16Linear":
        """On a GPU the weight is quantized by `quantize_int4`; on CPU by the torch reference
        (the same codes bit for bit; the interpreter would take minutes for a whole model)."""
        if not linear.weight.is_cuda:
            return super().from_linear(linear, group_size, symmetric)
        qweight, scales, qzeros = quantize_int4(linear.weight.detach().contiguous(), group_size, symmetric)
        return cls(qweight, scales, qzeros, None, linear.bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_matmul(x.contiguous(), self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size, self.bias)
