"""Quantize and dequantize in one pass over memory: affine int8 and packed int4 in Triton.

Lesson 01 quantizes in several torch passes: the min and max of every block, then scale and zero
point, then the codes, then (for int4) the packing. Each pass reads the tensor from memory again.
On a GPU the arithmetic is almost free and the memory traffic is the cost, so one kernel does it
all while a block sits in registers: every element is read once and every code written once.

One program handles BLOCK_R rows and one group of `group_size` columns:

    x tile [BLOCK_R, group] -> lo, hi of each row  (min and max, fused into the same pass)
                            -> scale, zero of each row               (scale_zero_point)
                            -> codes = clamp(round(x / scale) + zero)   (quantize)
                            -> int4 only: 8 codes into each int32 word  (pack_int32)

The grid is (cdiv(rows, BLOCK_R), groups). "Per channel" is a single group as long as the row. A
group longer than one tile (BLOCK_C columns) is read twice: a first loop finds its min and max,
a second one quantizes it; the second read mostly hits the L2 cache.

The codes match `reference_impl.affine.quantize_tensor` bit for bit. That takes two details:
- Division: Triton's `/` on float32 is a fast approximation (up to 2 ulp off), torch's is IEEE;
  `tl.math.div_rn` is the IEEE division, so x / s lands on the same side of every rounding tie.
- Rounding: torch.round rounds half to even. `round_half_even` below gets that from the hardware.

Layouts (the W8A8 and W4A16 kernels read exactly these):
- int8: codes [R, C] like x, int8 on a symmetric grid (-127..127), uint8 on an asymmetric one;
  scale and zero [R, G] float32, G = C / group_size (G = 1 per channel).
- int4: GPTQ's checkpoint layout for a Linear weight W [N, K] (N outputs, K inputs):
  qweight [K/8, N] int32, word i of column n holding the codes of W[n, 8i:8i+8], lowest bits
  first; scales [G, N] float32; qzeros [G, N/8] int32, the zero points packed along N the same
  way. Codes are unsigned 0..15: a symmetric grid (-7..7) is stored shifted by 8, its zero point
  is 8 for every group, and no qzeros is stored. qzeros holds the zero point itself, as GPTQModel's
  "v2" format does; AutoGPTQ's "v1" checkpoints store zero - 1 (see reference_impl/w4a16.py).

Twins: `reference_impl.affine` (quantize_tensor, QuantizedTensor.dequantize) for int8 and
`reference_impl.w4a16` (quantize_w4, dequantize_w4, built on packing.pack_int32) for int4.
"""

import torch
import triton
import triton.language as tl

from .common import check_device, check_tensor, interpreting

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TILE = 4096  # elements per program: enough loads in flight per SM, few enough registers


# ----------------------------------------------------------------------------------------------
# Building blocks shared with the matmul kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def round_half_even(t):
    """Round float32 to the nearest integer, ties to even (torch.round), for |t| < 2^22.

    Adding 1.5 * 2^23 leaves no bits for a fraction in the float32 mantissa, so the hardware's
    round-to-nearest-even addition does the rounding; subtracting it brings the value back.
    """
    return (t + 12582912.0) - 12582912.0


@triton.jit
def unpack_int4(words, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """GPTQ words [BLOCK_K/8, BLOCK_N] int32 -> codes [BLOCK_K, BLOCK_N] int32 in 0..15.

    Row 8i + j of the result is nibble j of word row i (bits 4j..4j+3), as pack_int32 lays it.
    """
    shifts = 4 * tl.arange(0, 8)
    codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K/8, 8, BLOCK_N]
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def group_scale_zero(scales_ptr, qzeros_ptr, groups, offs_n, n_ok, N, HAS_ZEROS: tl.constexpr):
    """Scale and zero point of `groups` [R] for the columns offs_n [BLOCK_N]: two [R, BLOCK_N]
    float32 tiles. Without qzeros the grid is symmetric and every zero point is 8."""
    mask = n_ok[None, :]
    scale = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        word = tl.load(qzeros_ptr + groups[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=mask, other=0)
        zero = ((word >> (4 * (offs_n % 8))[None, :]) & 0xF).to(tl.float32)
    else:
        zero = tl.full(scale.shape, 8.0, tl.float32)
    return scale, zero


# ----------------------------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------------------------


@triton.jit
def _scale_zero(lo, hi, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Scale and zero point of each row from its min and max (affine.scale_zero_point)."""
    if SYMMETRIC:
        scale = tl.math.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), QMAX)
    else:
        lo = tl.minimum(lo, 0.0)  # the grid must contain 0
        hi = tl.maximum(hi, 0.0)
        scale = tl.math.div_rn(hi - lo, QMAX - QMIN)
    scale = tl.where(scale > 0, scale, 1.0)  # an all-zero block: any scale represents it exactly
    if SYMMETRIC:
        zero = tl.zeros_like(scale)
    else:
        zero = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(-lo, scale)), QMIN), QMAX)
    return scale, zero


@triton.jit
def _load_chunk(x_ptr, rows, cols, row_ok, col_ok, C):
    """x[rows, cols] as float32; masked elements read 0, which never changes a range that must
    contain 0 anyway (absmax, or min/max clamped around 0)."""
    mask = row_ok[:, None] & col_ok[None, :]
    return tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_codes(
    x, scale, zero, codes_ptr, rows, row_ok, col0, n_cols, R, C,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, PACK_INT4: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Quantize the tile x [BLOCK_R, BLOCK_C], columns col0.. of which the first n_cols are real,
    and store its codes: int8 rows, or GPTQ words (col0 is then a multiple of 8)."""
    q = round_half_even(tl.math.div_rn(x, scale[:, None])) + zero[:, None]
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    if PACK_INT4:
        unsigned = q.to(tl.int32) + (8 if SYMMETRIC else 0)
        nibbles = tl.reshape(unsigned, (BLOCK_R, BLOCK_C // 8, 8)) << (4 * tl.arange(0, 8))[None, None, :]
        words = tl.sum(nibbles, axis=2)  # the nibbles do not overlap: their sum is their bitwise OR
        offs = tl.arange(0, BLOCK_C // 8)
        mask = row_ok[:, None] & (offs * 8 < n_cols)[None, :]
        tl.store(codes_ptr + (col0 // 8 + offs)[None, :] * R + rows[:, None], words, mask=mask)  # [C/8, R]
    else:
        offs = tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (offs < n_cols)[None, :]
        tl.store(codes_ptr + rows[:, None] * C + col0 + offs[None, :], q.to(codes_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, R, C,
    GROUP: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr,
    PACK_INT4: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """x [R, C] float -> codes, scale and zero of groups of GROUP columns (layouts: module doc)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    row_ok = rows < R
    start = group * GROUP
    offs = tl.arange(0, BLOCK_C)

    # 1. min and max of each row's group: from the tile itself, or a first pass over a long group
    if GROUP <= BLOCK_C:
        x = _load_chunk(x_ptr, rows, start + offs, row_ok, offs < GROUP, C)
        lo = tl.min(x, axis=1)
        hi = tl.max(x, axis=1)
    else:
        lo = tl.zeros([BLOCK_R], tl.float32)
        hi = tl.zeros([BLOCK_R], tl.float32)
        for c in range(0, GROUP, BLOCK_C):
            chunk = _load_chunk(x_ptr, rows, start + c + offs, row_ok, c + offs < GROUP, C)
            lo = tl.minimum(lo, tl.min(chunk, axis=1))
            hi = tl.maximum(hi, tl.max(chunk, axis=1))

    # 2. scale and zero point, stored where the consumer of each layout expects them
    scale, zero = _scale_zero(lo, hi, QMIN, QMAX, SYMMETRIC)
    if PACK_INT4:
        tl.store(scale_ptr + group * R + rows, scale, mask=row_ok)  # scales [G, N]
        if not SYMMETRIC:  # qzeros [G, N/8]: 8 zero points per word, packed along N
            packed = tl.reshape(zero.to(tl.int32), (BLOCK_R // 8, 8)) << (4 * tl.arange(0, 8))[None, :]
            word_cols = tl.program_id(0) * (BLOCK_R // 8) + tl.arange(0, BLOCK_R // 8)
            tl.store(zero_ptr + group * (R // 8) + word_cols, tl.sum(packed, axis=1), mask=word_cols < R // 8)
    else:
        groups = C // GROUP
        tl.store(scale_ptr + rows * groups + group, scale, mask=row_ok)  # scale, zero [R, G]
        tl.store(zero_ptr + rows * groups + group, zero, mask=row_ok)

    # 3. codes
    if GROUP <= BLOCK_C:
        _store_codes(x, scale, zero, codes_ptr, rows, row_ok, start, GROUP, R, C,
                     QMIN, QMAX, SYMMETRIC, PACK_INT4, BLOCK_R, BLOCK_C)  # fmt: skip
    else:
        for c in range(0, GROUP, BLOCK_C):
            chunk = _load_chunk(x_ptr, rows, start + c + offs, row_ok, c + offs < GROUP, C)
            _store_codes(chunk, scale, zero, codes_ptr, rows, row_ok, start + c, GROUP - c, R, C,
                         QMIN, QMAX, SYMMETRIC, PACK_INT4, BLOCK_R, BLOCK_C)  # fmt: skip


def check_group(length: int, group_size: int | None, what: str, multiple: int = 1) -> int:
    """The group size a kernel uses: `length` (per channel) if None; it must divide `length`."""
    group = length if group_size is None else group_size
    if not isinstance(group, int) or group < 1 or group % multiple:
        need = f"a positive multiple of {multiple}" if multiple > 1 else "a positive integer"
        raise ValueError(f"group_size must be {need} (or None for one group per row), got {group_size!r}")
    if length % group:
        divisors = [d for d in (32, 64, 128) if length % d == 0 and d % multiple == 0]
        raise ValueError(
            f"{what} = {length} is not a multiple of group_size {group}: the kernels need whole groups. "
            f"Try group_size={divisors[-1] if divisors else 'None'}"
            + (" (SmolLM2's 576-wide layers take 64 or 32)" if length == 576 else "")
            + "; the torch reference also allows a ragged last group (AffineSpec(ragged=True))."
        )
    return group


def _blocks(group: int, pack: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): a tile of about TILE elements, longer (up to 8192) when a
    whole row fits; int4 packing needs 8 rows per program (8 zero points fill a word). The
    interpreter gets small tiles, so that tiny test shapes still span several programs and chunks."""
    min_rows = 8 if pack else 1
    limit, tile = (32, 64) if interpreting() else (8192 // min_rows, TILE)
    block_c = min(triton.next_power_of_2(group), limit)
    block_r = max(min_rows, tile // block_c)
    return block_r, block_c, 4 if block_r * block_c <= 4096 else 8


def _launch_quantize(x, codes, scale, zero, group, bits, symmetric, pack) -> None:
    R, C = x.shape
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    block_r, block_c, warps = _blocks(group, pack)
    grid = (triton.cdiv(R, block_r), C // group)
    _quantize_kernel[grid](
        x, codes, scale, zero, R, C, GROUP=group, QMIN=float(qmin), QMAX=float(qmax), SYMMETRIC=symmetric,
        PACK_INT4=pack, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip


def quantize_int8(
    x: torch.Tensor, group_size: int | None = None, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine int8 quantization of each row (group_size None) or each group of a row.

    x: [R, C] float32/float16/bfloat16, contiguous; group_size must divide C.
    Returns codes [R, C] (int8 if symmetric, else uint8), scale [R, G] and zero [R, G] float32:
    what quantize_tensor(x, AffineSpec(bits=8, symmetric, granularity="group" or "channel"))
    holds (its per-channel scale is [R]: ours is [R, 1]).
    """
    check_tensor(x, "x", FLOATS)
    check_device(x)
    R, C = x.shape
    group = check_group(C, group_size, "the number of columns")
    codes = torch.empty(R, C, dtype=torch.int8 if symmetric else torch.uint8, device=x.device)
    scale = torch.empty(R, C // group, dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    _launch_quantize(x, codes, scale, zero, group, 8, symmetric, pack=False)
    return codes, scale, zero


def quantize_int4(
    w: torch.Tensor, group_size: int | None = 128, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Affine int4 quantization of a Linear weight into GPTQ's packed layout (module doc).

    w: [N, K] float32/float16/bfloat16, contiguous; groups of group_size input features (None:
    one group per output row); group_size a multiple of 8 dividing K; N a multiple of 8 when
    asymmetric (qzeros packs 8 columns per word).
    Returns qweight [K/8, N] int32, scales [G, N] float32 and qzeros [G, N/8] int32 (None when
    symmetric): `reference_impl.w4a16.quantize_w4` bit for bit.
    """
    check_tensor(w, "w", FLOATS)
    check_device(w)
    N, K = w.shape
    group = check_group(K, group_size, "in_features K", multiple=8)
    if not symmetric and N % 8:
        raise ValueError(f"asymmetric int4 packs 8 zero points per int32 word along N: N = {N} must be a multiple of 8")
    qweight = torch.empty(K // 8, N, dtype=torch.int32, device=w.device)
    scales = torch.empty(K // group, N, dtype=torch.float32, device=w.device)
    qzeros = None if symmetric else torch.empty(K // group, N // 8, dtype=torch.int32, device=w.device)
    # The kernel needs some pointer for qzeros even when it stores none: qweight stands in.
    _launch_quantize(w, qweight, scales, qweight if symmetric else qzeros, group, 4, symmetric, pack=True)
    return qweight, scales, qzeros


# ----------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_int8_kernel(
    codes_ptr, scale_ptr, zero_ptr, out_ptr, R, C, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """out = scale * (codes - zero) for BLOCK_R rows of one stretch of BLOCK_C columns of one group.

    Grid: (cdiv(R, BLOCK_R), groups, cdiv(GROUP, BLOCK_C)); each row's scale is read once.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # columns inside the group
    row_ok = rows < R
    scale = tl.load(scale_ptr + rows * (C // GROUP) + group, mask=row_ok, other=1.0)
    zero = tl.load(zero_ptr + rows * (C // GROUP) + group, mask=row_ok, other=0.0)
    mask = row_ok[:, None] & (offs < GROUP)[None, :]
    where = rows[:, None] * C + group * GROUP + offs[None, :]
    q = tl.load(codes_ptr + where, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + where, ((q - zero[:, None]) * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_int4_kernel(
    qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, out_ptr, N, K,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """GPTQ layout -> W [N, K]: W[n, k] = scale[g, n] * (code[k, n] - zero[g, n])."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    word_rows = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    n_ok, k_ok = offs_n < N, offs_k < K
    words = tl.load(
        qweight_ptr + word_rows[:, None] * N + offs_n[None, :], mask=(word_rows < K // 8)[:, None] & n_ok[None, :], other=0
    )
    codes = unpack_int4(words, BLOCK_K, BLOCK_N).to(tl.float32)  # [BLOCK_K, BLOCK_N]
    if HAS_G_IDX:
        groups = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
    else:
        groups = tl.minimum(offs_k, K - 1) // GROUP  # past K: any valid group, never read beyond scales
    scale, zero = group_scale_zero(scales_ptr, qzeros_ptr, groups, offs_n, n_ok, N, HAS_ZEROS)
    w = (codes - zero) * scale
    mask = k_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int8(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """x_hat = scale * (codes - zero), the inverse map of `quantize_int8`.

    codes: [R, C] int8 or uint8; scale, zero: [R, G] float32, G = C / group_size (1 if None).
    Returns [R, C] in `dtype` (computed in float32, as QuantizedTensor.dequantize does).
    """
    check_tensor(codes, "codes", (torch.int8, torch.uint8))
    R, C = codes.shape
    group = check_group(C, group_size, "the number of columns")
    check_tensor(scale, "scale", (torch.float32,), shape=(R, C // group))
    check_tensor(zero, "zero", (torch.float32,), shape=(R, C // group))
    check_device(codes, scale, zero)
    out = torch.empty(R, C, dtype=dtype, device=codes.device)
    block_r, block_c, warps = _blocks(group, pack=False)
    grid = (triton.cdiv(R, block_r), C // group, triton.cdiv(group, block_c))
    _dequantize_int8_kernel[grid](
        codes, scale, zero, out, R, C, GROUP=group, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps
    )
    return out


def check_int4_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    group_size: int | None,
) -> tuple[int, int, int]:
    """Check a GPTQ-layout weight; returns (N, K, group size)."""
    check_tensor(qweight, "qweight", (torch.int32,))
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    group = check_group(K, group_size, "in_features K (8 x qweight rows)", multiple=8)
    check_tensor(scales, "scales", FLOATS, shape=(K // group, N))
    if qzeros is not None:
        if N % 8:
            raise ValueError(f"qzeros packs 8 columns per word: N = {N} must be a multiple of 8")
        check_tensor(qzeros, "qzeros", (torch.int32,), shape=(K // group, N // 8))
    if g_idx is not None:
        check_tensor(g_idx, "g_idx", (torch.int32,), dims=1, shape=(K,))
    check_device(qweight, scales, qzeros, g_idx)
    return N, K, group


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    group_size: int | None = 128,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unpack and dequantize a GPTQ-layout weight (module doc) into W [N, K], a Linear's layout.

    qweight: [K/8, N] int32; scales: [G, N] float; qzeros: [G, N/8] int32 or None (symmetric,
    zero point 8); g_idx: [K] int32 group of each input feature, or None (k // group_size).
    Returns [N, K] in `dtype`, computed in float32: `reference_impl.w4a16.dequantize_w4`.
    """
    N, K, group = check_int4_weight(qweight, scales, qzeros, g_idx, group_size)
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    block_n, block_k = (16, 32) if interpreting() else (64, 64)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequantize_int4_kernel[grid](
        qweight, scales, qweight if qzeros is None else qzeros, qweight if g_idx is None else g_idx, out, N, K,
        GROUP=group, HAS_ZEROS=qzeros is not None, HAS_G_IDX=g_idx is not None, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
