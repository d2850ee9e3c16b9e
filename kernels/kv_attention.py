"""Decode attention in Triton over a quantized KV cache: int8 codes or fp8 numbers, dequantized
in registers.

Generating one token, each layer attends from one query vector per head to every cached key
and value. The arithmetic is tiny (two dot products of D numbers per cached token and query
head); the cost is reading the cache: 2 (K and V) x T tokens x H_kv heads x D x bytes. For a
Llama-3-8B-like layer (8 KV heads of 128) at T = 32k tokens that is 134 MB in fp16, about 45 us
at the 3 TB/s an H100 reads. Stored in 8 bits the cache is half the bytes, so a kernel that reads
the codes and dequantizes them where the products are computed can take half the time.

Layouts (the same as reference_impl/kvcache.py):

- q [B, H_q, D] (float16, bfloat16 or float32); the output has q's shape and dtype.
- int8 cache: codes k, v [B, H_kv, T, D] int8 with one float32 scale per token and head,
  k_scale, v_scale [B, H_kv, T]: K[b, h, t] = k_scale[b, h, t] * k[b, h, t] (symmetric, s = amax/127).
- fp8 cache: k, v [B, H_kv, T, D] float8_e4m3fn or float8_e5m2 with one float32 scale each for
  the whole tensor: K = k_scale * k (vLLM's fp8 cache).
- GQA: H_q is a multiple of H_kv; query head j reads KV head j // (H_q / H_kv).
- The cache tensors may be views of a longer preallocated buffer (`k[:, :, :T]`): only the last
  dimension must be contiguous; the kernel takes the other strides.

Where the scales go. A per-token scale is a common factor of a whole dot product:
    score_t = q . K_t / sqrt(D) = (k_scale_t / sqrt(D)) * (q . k_t)
so the kernel multiplies the int8 codes (exact in fp16) by q on the tensor cores and scales each
token's score afterwards, once per token, not once per element. The values take their scale
with the softmax weight: sum_t p_t V_t = sum_t (p_t v_scale_t) v_t. An fp8 scale is one number:
it multiplies the scores and the output once.

Converting codes. The tensor cores take fp16 or bf16 operands, so every code is converted once,
in registers. int8 to fp16 does not use the GPU's int-to-float instruction, which runs at a
quarter of the arithmetic rate (16 per clock and SM on an H100): keeping up with the memory
(3 TB/s over 132 SMs) takes about 13 conversions per clock and SM, nearly all of it. Instead
the byte c + 128 goes into the mantissa of the fp16 number 1024 (whose last mantissa bit is
worth 1), giving 1152 + c, and one subtraction, two values per instruction, leaves c. On the GPU
the bytes of four codes are placed by one byte-permute (`prmt`) per pair, so four codes take
five instructions (an XOR, two permutes, two subtractions) instead of four times five. (Leaving
the 1152 in and taking 1152 * sum(q) from each score afterwards saves the subtractions, but the
tensor cores' float32 sums then lose the small difference of two large numbers: 7e-3 relative
error at 32k tokens. Not done.) fp8 numbers convert to fp16 two at a time (e4m3 by a conversion
instruction; e5m2 is the upper byte of an fp16); bf16 operands take the plain conversion.

The work division (flash-decoding):

- One program per (sequence, KV head) and slice of the cached tokens. It holds all G = H_q / H_kv
  query heads of its KV head as the rows of a small matrix, so each K and V tile is read from
  memory once for the whole group: scores [G, BLOCK_T] = q_group [G, D] @ K_tile^T, then
  acc [G, D] += P [G, BLOCK_T] @ V_tile. The tensor cores need at least 16 rows: the group is
  padded with zero rows (their results are discarded).
- Online softmax inside a slice: a running maximum m and sum l per row; when the maximum grows,
  what was accumulated is rescaled by exp(m_old - m_new). exp2 with log2(e) folded into the
  scale, as Triton's fused-attention tutorial does.
- Lanes: a tile of BLOCK_T tokens is cut into LANES runs of BLOCK_T / LANES tokens, each with
  its own online softmax: a batch of LANES small products (`tl.dot` on 3-d blocks), one per
  warp, so the row maxima and sums of a tile stay inside a warp instead of crossing all of
  them through shared memory. The lanes are merged once, after the loop, like the slices.
  At 32k tokens the 128 programs are one per SM, four warps, one per scheduler, so every
  cross-warp step stalls the SM (ncu: 0.38 instructions issued per cycle and scheduler); four
  lanes made 128k tokens 8% faster than one (the autotuner picks per length).
- Whole tiles, then the ragged one: only a slice's last tile can run past its end, so the loop
  over the others loads and computes without token masks.
- Split over T: one (sequence, head) alone is one program, 8 programs for a single sequence of
  a Llama-3-8B layer on 132 SMs. So the tokens are split into SPLITS slices, each a program, and
  their partial results (m_i, l_i, acc_i) are combined: with M = max_i m_i,
      out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i.
  The program that finishes last does it, in a fixed order (the same scheme as
  `store_split_k` in kernels/w4a16.py): one launch, and the result does not depend on which
  program finished first. Its loops are unrolled, so the loads of all slices leave at once:
  one trip to L2 instead of one per slice. A slice with no tokens (short T, many splits)
  reports m = -inf and weighs nothing.

Where the time goes (H100, 8 KV heads of 128, one sequence; benchmarks/kernels.py). Both caches
and fp16 SDPA take about 12 us plus their bytes at 3.0-3.1 TB/s (fitted on 4k, 32k and 128k
tokens): past the first tile the loop streams at the memory's speed, and the fixed part (launch,
the first loads' latency, the last program's combination) is as large as SDPA's. Half the bytes
therefore buys (12 + 43) / (12 + 22) = 1.6x at 32k tokens, 1.8x at 128k, and 2x only as T grows
without bound.

Precision: int8 codes and fp8 values are exact in fp16 and bf16, so the only roundings are q
in its own dtype, the softmax weights p v_scale rounded to q's 16-bit dtype for the second
product (flash attention rounds p the same way), and float32 accumulation. float32 q runs the
products in full float32 precision (not tf32).

Under Triton's interpreter (CPU) each kernel runs one small fixed configuration; bfloat16
products run in float32 there (numpy has no bfloat16). fp8 loads work in the interpreter of
triton 3.9 (checked for every e4m3fn bit pattern; for e5m2 every finite one: its +-inf read as
+-65536 there, and a cache holds no infinities).

Twin: `reference_decode_attention` in tests/test_kernels_kv_attention.py (dequantize, then
softmax attention in float32). Speed on an H100 against fp16 `scaled_dot_product_attention`:
benchmarks/kernels.py (the decode-attention rows).
"""

import math

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, launch, tuning_bench
from .quantize import FLOATS
from .w4a16 import DOT_DTYPES, _dot, split_k_workspace

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
LOG2E = 1.4426950408889634
MIN_DOT_ROWS = 16  # the tensor cores' smallest row count: the query group is padded to it

# (BLOCK_T, SPLITS, LANES, num_warps, num_stages). One (sequence, KV head) per program row: with
# B = 1 and 8 KV heads, SPLITS 16 or 32 make 128 or 256 programs for 132 SMs; large batches fill
# the GPU with fewer splits, down to none. On the GPU a lane's share of a tile, BLOCK_T / LANES,
# is at least 16 tokens (the matrix units' smallest dimension). Configurations with more splits
# than tiles of tokens are pruned (they would leave slices empty).
CONFIGS = [
    triton.Config({"BLOCK_T": t, "SPLITS": s, "LANES": lanes}, num_warps=w, num_stages=st)
    for t, s, lanes, w, st in [
        (64, 1, 1, 4, 3),
        (64, 4, 1, 4, 3),
        (64, 8, 1, 4, 3),
        (64, 16, 1, 4, 3),
        (64, 16, 4, 4, 3),
        (64, 32, 1, 4, 3),
        (64, 32, 4, 4, 3),
        (128, 16, 1, 4, 3),
        (128, 16, 4, 4, 3),
        (128, 32, 1, 4, 3),
        (128, 32, 4, 4, 3),
        (128, 16, 4, 8, 3),
        (256, 16, 4, 4, 3),
        (256, 16, 4, 8, 3),
    ]
]
CPU_CONFIG = {"BLOCK_T": 16, "SPLITS": 3, "LANES": 2}  # tests' short caches span several tiles, splits and lanes


def _prune(configs, named_args, **kwargs):
    """Drop configurations whose splits outnumber the tiles of tokens (empty slices)."""
    T = named_args["T"]
    kept = [c for c in configs if c.kwargs["SPLITS"] <= triton.cdiv(T, c.kwargs["BLOCK_T"])]
    return kept or [min(configs, key=lambda c: c.kwargs["SPLITS"] * c.kwargs["BLOCK_T"])]


@triton.jit
def _codes_to(codes, DOT_DTYPE: tl.constexpr, BYTE_PERMUTE: tl.constexpr):
    """int8 codes or fp8 numbers -> DOT_DTYPE, exactly. int8 to fp16 by the mantissa trick of the
    module doc: c XOR 0x80 = c + 128 written under the high byte 0x64 of fp16 1024 is the number
    1152 + c. On the GPU (BYTE_PERMUTE) one `prmt` builds two such numbers from a register of four
    codes and one `sub.f16x2` takes 1152 from both; the interpreter has no PTX and does the same
    one code at a time."""
    if codes.dtype == tl.int8 and DOT_DTYPE == tl.float16:
        if BYTE_PERMUTE:
            return tl.inline_asm_elementwise(
                """{
                .reg .b32 u, offset;
                xor.b32 u, $2, 0x80808080;
                prmt.b32 $0, u, 0x64646464, 0x4140;
                prmt.b32 $1, u, 0x64646464, 0x4342;
                mov.b32 offset, 0x64806480;
                sub.f16x2 $0, $0, offset;
                sub.f16x2 $1, $1, offset;
                }""",
                "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4,
            )  # fmt: skip
        bits = ((codes.to(tl.int16) ^ 0x80) & 0xFF) | 0x6400
        return bits.to(tl.float16, bitcast=True) - 1152.0
    return codes.to(DOT_DTYPE)


@triton.jit
def _attend_tile(q, m, l, acc, k_base, v_base, k_scales, v_scales, k_factor, t0, t_end, d, d_ok, stride_t, scale_t,
                 PER_TOKEN: tl.constexpr, DOT_DTYPE: tl.constexpr, BYTE_PERMUTE: tl.constexpr, BLOCK_T: tl.constexpr,
                 LANES: tl.constexpr, RAGGED: tl.constexpr):  # fmt: skip
    """Tokens t0 .. t0 + BLOCK_T - 1 into the running (m, l, acc) of every lane; returns them.

    Lane i takes the SUB = BLOCK_T / LANES tokens from t0 + i * SUB. q: [LANES, GROUP_PAD, BLOCK_D]
    (the group's rows, repeated per lane); m, l: [LANES, GROUP_PAD]; acc: [LANES, GROUP_PAD, BLOCK_D].
    k_factor: the scale of the scores (fp8: times the tensor's k scale). RAGGED: the tile may run
    past t_end (the last one of a slice); the others load and compute without token masks."""
    SUB: tl.constexpr = BLOCK_T // LANES
    t = t0 + tl.arange(0, LANES)[:, None] * SUB + tl.arange(0, SUB)[None, :]  # [LANES, SUB]
    t_ok = t < t_end
    tile_offs = t[:, :, None] * stride_t + d[None, None, :]  # within one head's slice: int32 is enough
    if RAGGED:
        tile_mask = t_ok[:, :, None] & d_ok[None, None, :]
    else:
        tile_mask = d_ok[None, None, :]
    k = _codes_to(tl.load(k_base + tile_offs, mask=tile_mask, other=0.0), DOT_DTYPE, BYTE_PERMUTE)
    v = _codes_to(tl.load(v_base + tile_offs, mask=tile_mask, other=0.0), DOT_DTYPE, BYTE_PERMUTE)
    scores = _dot(q, tl.trans(k, (0, 2, 1)), tl.zeros([LANES, q.shape[1], SUB], tl.float32), DOT_DTYPE)
    if PER_TOKEN:
        scores = scores * (tl.load(k_scales + t * scale_t, mask=t_ok, other=0.0) * k_factor)[:, None, :]
    else:
        scores = scores * k_factor
    if RAGGED:
        scores = tl.where(t_ok[:, None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 2))
    m_ref = m_new
    if RAGGED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane that has seen no token yet: no NaN
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(scores - m_ref[:, :, None])
    l = l * alpha + tl.sum(p, 2)
    if PER_TOKEN:
        p = p * tl.load(v_scales + t * scale_t, mask=t_ok, other=0.0)[:, None, :]
    acc = _dot(p.to(DOT_DTYPE), v, acc * alpha[:, :, None], DOT_DTYPE)
    return m_new, l, acc


@triton.jit
def _combine_splits(m_i, l_i, acc_i, stats_ptr, partial_ptr, count_ptr, out_ptrs, out_mask, pid_bh, pid_s,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):  # fmt: skip
    """Write this slice's (m, l, acc) for the GROUP real rows; the program that arrives last
    combines all SPLITS of them in a fixed order and stores the output. The combining loops are
    unrolled, so their loads leave together: one trip to L2, not SPLITS of them.

    stats_ptr: float32 [BH, SPLITS, 2, GROUP_PAD] (m then l); partial_ptr: float32
    [BH, SPLITS, GROUP_PAD, BLOCK_D]; count_ptr: int32 per (sequence, KV head), 0 between launches."""
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    tile = g[:, None] * BLOCK_D + d[None, :]
    slot = pid_bh * SPLITS + pid_s
    tl.store(stats_ptr + slot * 2 * GROUP_PAD + g, m_i, mask=g_ok)
    tl.store(stats_ptr + slot * 2 * GROUP_PAD + GROUP_PAD + g, l_i, mask=g_ok)
    tl.store(partial_ptr + slot * GROUP_PAD * BLOCK_D + tile, acc_i, mask=g_ok[:, None])
    tl.debug_barrier()  # all threads' partials are written before the count goes up
    # acq_rel: our partials are visible to whoever sees the count, and we see theirs.
    arrived = tl.atomic_add(count_ptr + pid_bh, 1, sem="acq_rel")
    if arrived == SPLITS - 1:
        first = pid_bh * SPLITS
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            m = tl.maximum(m, tl.load(stats_ptr + (first + s) * 2 * GROUP_PAD + g, mask=g_ok, other=0.0, cache_modifier=".cg"))
        l = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
        for s in tl.static_range(SPLITS):  # a fixed order: the same sum whoever came last
            stats = stats_ptr + (first + s) * 2 * GROUP_PAD + g
            weight = tl.exp2(tl.load(stats, mask=g_ok, other=0.0, cache_modifier=".cg") - m)
            l += weight * tl.load(stats + GROUP_PAD, mask=g_ok, other=0.0, cache_modifier=".cg")
            partial = tl.load(partial_ptr + (first + s) * GROUP_PAD * BLOCK_D + tile, mask=g_ok[:, None], other=0.0,
                              cache_modifier=".cg")  # fmt: skip
            acc += weight[:, None] * partial
        tl.store(count_ptr + pid_bh, 0)  # ready for the next launch
        tl.store(out_ptrs, (acc / l[:, None]).to(out_ptrs.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=CONFIGS,
    key=["T_BUCKET", "BH", "GROUP", "HEAD_DIM", "PER_TOKEN"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=tuning_bench,
)
@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, out_ptr, stats_ptr, partial_ptr, count_ptr,
    T, T_BUCKET, BH, H_KV, stride_b, stride_h, stride_t, scale_b, scale_h, scale_t, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PER_TOKEN: tl.constexpr, DOT_DTYPE: tl.constexpr, BYTE_PERMUTE: tl.constexpr,
    BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, LANES: tl.constexpr,
):  # fmt: skip
    """out [B, H_q, D] = softmax(q K^T / sqrt(D)) V over tokens 0 .. T-1. Grid: (B * H_KV, SPLITS).

    k, v: codes [B, H_KV, >= T, D] (strides stride_b, stride_h, stride_t; unit stride along D).
    PER_TOKEN (int8): k_scale, v_scale [B, H_KV, >= T] float32 with strides scale_b, scale_h,
    scale_t; else (fp8) one float32 each. qk_scale: log2(e) / sqrt(D) (or the caller's scale).
    T_BUCKET (T rounded up to a power of two) and BH (B * H_KV): the autotuner's key, so that a
    growing cache is not tuned again at every step."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    # q, out as [B * H_q, D]: the query heads of KV head h of sequence b are rows pid_bh * GROUP + g
    q_offs = (pid_bh * GROUP + g)[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    span = tl.cdiv(tl.cdiv(T, BLOCK_T), SPLITS) * BLOCK_T  # tokens per slice, whole tiles
    t_start = pid_s * span
    t_end = tl.minimum(T, t_start + span)
    k_base = k_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    v_base = v_ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    if PER_TOKEN:
        k_scales = k_scale_ptr + b * scale_b + h * scale_h
        v_scales = v_scale_ptr + b * scale_b + h * scale_h
        k_factor = qk_scale
    else:
        k_scales, v_scales = k_scale_ptr, v_scale_ptr
        k_factor = tl.load(k_scale_ptr) * qk_scale

    # LANES independent online softmaxes (module doc), merged after the loop.
    q = tl.broadcast_to(q[None, :, :], [LANES, GROUP_PAD, BLOCK_D])
    m = tl.full([LANES, GROUP_PAD], float("-inf"), tl.float32)  # running max of each row's scores (log2 units)
    l = tl.zeros([LANES, GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([LANES, GROUP_PAD, BLOCK_D], tl.float32)  # running sum of exp2(score - m) * V
    whole_end = t_start + tl.maximum(t_end - t_start, 0) // BLOCK_T * BLOCK_T
    for t0 in range(t_start, whole_end, BLOCK_T):
        m, l, acc = _attend_tile(q, m, l, acc, k_base, v_base, k_scales, v_scales, k_factor, t0, t_end, d, d_ok,
                                 stride_t, scale_t, PER_TOKEN, DOT_DTYPE, BYTE_PERMUTE, BLOCK_T, LANES, False)  # fmt: skip
    if whole_end < t_end:
        m, l, acc = _attend_tile(q, m, l, acc, k_base, v_base, k_scales, v_scales, k_factor, whole_end, t_end, d, d_ok,
                                 stride_t, scale_t, PER_TOKEN, DOT_DTYPE, BYTE_PERMUTE, BLOCK_T, LANES, True)  # fmt: skip
    # merge the lanes: the same rescaling as across splits
    m_all = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all)[None, :])
    l = tl.sum(weight * l, 0)
    acc = tl.sum(weight[:, :, None] * acc, 0)
    m = m_all
    if not PER_TOKEN:
        acc = acc * tl.load(v_scale_ptr)

    out_ptrs = out_ptr + q_offs
    out_mask = g_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        tl.store(out_ptrs, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        _combine_splits(m, l, acc, stats_ptr, partial_ptr, count_ptr, out_ptrs, out_mask, pid_bh, pid_s,
                        GROUP, GROUP_PAD, BLOCK_D, SPLITS)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _check_cache(q, k, v, k_scale, v_scale):
    """The cache's checked shapes (B, H_q, H_kv, T, D) and scales as float32 tensors on k's device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in FLOATS:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 3 or k.dim() != 4:
        raise ValueError(
            f"q must be [B, H_q, D] (one decoded token per sequence) and k, v [B, H_kv, T, D]; got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if k.shape != v.shape or k.dtype != v.dtype or k.stride() != v.stride():
        raise ValueError(
            f"k and v must have one shape, dtype and layout; got k {k.dtype} {tuple(k.shape)} strides {k.stride()}, "
            f"v {v.dtype} {tuple(v.shape)} strides {v.stride()}"
        )
    B, H_q, D = q.shape
    _, H_kv, T, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k, v must be [B={B}, H_kv, T, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if H_kv == 0 or H_q % H_kv:
        raise ValueError(f"the query heads ({H_q}) must be a multiple of the KV heads ({H_kv}) (GQA)")
    if T == 0:
        raise ValueError("the cache holds no tokens (T = 0): there is nothing to attend to")
    if not q.is_contiguous():
        raise ValueError("q is not contiguous: the kernel indexes its heads by their length. Pass q.contiguous().")
    if k.stride(3) != 1:
        raise ValueError(f"k and v must be contiguous along D (their last stride is {k.stride(3)}): pass k.contiguous()")
    if k.dtype == torch.int8:
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != (B, H_kv, T):
                raise ValueError(
                    f"an int8 cache takes {name} as a float32 tensor [B, H_kv, T] = {(B, H_kv, T)} (one scale per "
                    f"token and head), got {getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}"
                )
        if k_scale.stride() != v_scale.stride():
            raise ValueError("k_scale and v_scale must have one layout (the same strides)")
    elif k.dtype in FP8:
        scales = []
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if isinstance(s, (int, float)):
                s = torch.full((1,), float(s), dtype=torch.float32, device=k.device)
            if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dtype != torch.float32:
                raise ValueError(
                    f"an fp8 cache takes {name} as one number: a float or a one-element float32 tensor, got "
                    f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}"
                )
            scales.append(s.to(k.device).reshape(1))
        k_scale, v_scale = scales
    else:
        raise TypeError(
            f"the cache must hold int8 codes (with per-token scales) or float8_e4m3fn / float8_e5m2 numbers, got {k.dtype}"
        )
    check_device(q, k, v, k_scale, v_scale)
    return (B, H_q, H_kv, T, D), k_scale, v_scale


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_scale: torch.Tensor | float,
    v_scale: torch.Tensor | float,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over a quantized KV cache.

    q: [B, H_q, D] float16/bfloat16/float32, contiguous. k, v: [B, H_kv, T, D] int8 codes with
    k_scale, v_scale [B, H_kv, T] float32 (one scale per token and head), or float8_e4m3fn /
    float8_e5m2 values with k_scale, v_scale floats or one-element float32 tensors (pass tensors
    on the GPU to spare a copy per call). k, v may be views of a longer buffer (unit stride
    along D). H_q a multiple of H_kv (GQA). sm_scale: 1/sqrt(D) by default.
    Returns [B, H_q, D] in q's dtype: softmax(q K^T * sm_scale) V per head.
    """
    (B, H_q, H_kv, T, D), k_scale, v_scale = _check_cache(q, k, v, k_scale, v_scale)
    group = H_q // H_kv
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    per_token = k.dtype == torch.int8
    sm_scale = 1 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    # bfloat16 products do not run in the interpreter (numpy has no bfloat16): it multiplies in float32.
    dot_dtype = tl.float32 if interpreting() and q.dtype == torch.bfloat16 else DOT_DTYPES[q.dtype]
    group_pad = triton.next_power_of_2(group) if interpreting() else max(MIN_DOT_ROWS, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(D))
    splits = CPU_CONFIG["SPLITS"] if interpreting() else max(c.kwargs["SPLITS"] for c in CONFIGS)
    slots = B * H_kv * splits * group_pad
    workspace, count = split_k_workspace(q.device, slots * (2 + block_d), B * H_kv)
    stats, partial = workspace[: 2 * slots], workspace[2 * slots : slots * (2 + block_d)]
    scale_strides = k_scale.stride() if per_token else (0, 0, 0)
    grid = lambda meta: (B * H_kv, meta["SPLITS"])
    launch(
        _decode_attention_kernel, grid, q, k, v, k_scale, v_scale, out, stats, partial, count,
        T, triton.next_power_of_2(T), B * H_kv, H_kv, *k.stride()[:3], *scale_strides, sm_scale * LOG2E,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=D, BLOCK_D=block_d, PER_TOKEN=per_token, DOT_DTYPE=dot_dtype,
        BYTE_PERMUTE=not interpreting(),
        cpu_config=CPU_CONFIG,
    )  # fmt: skip
    return out


def cache_bytes(k: torch.Tensor) -> int:
    """Bytes one decode step reads from a cache shaped and typed like k, K and V together with
    their scales (float32: one per token and head for int8, one per tensor for fp8)."""
    B, H_kv, T, D = k.shape
    scales = B * H_kv * T * 4 if k.dtype == torch.int8 else 4 if k.dtype in FP8 else 0
    return 2 * (B * H_kv * T * D * k.element_size() + scales)
