"""GGUF block formats: llama.cpp's quantized weight types, encoded and decoded with numpy.

A GGUF tensor is stored row by row, and every row is cut into blocks of consecutive weights
(32 for the "legacy" types, 256 for the K-quants). A block is a fixed number of bytes holding its
own scale(s) and its codes, so any block can be decoded without looking at another one. A row
must hold a whole number of blocks: 576-wide rows (SmolLM2's hidden size) take blocks of 32, not
of 256.

Legacy types, one block = 32 weights (x is the block, d its scale, q the integer codes):

| type | bytes | bits/weight | layout                                | decode          |
|------|-------|-------------|---------------------------------------|-----------------|
| Q4_0 | 18    | 4.5         | fp16 d, 16 bytes of 4-bit q           | d * (q - 8)     |
| Q4_1 | 20    | 5.0         | fp16 d, fp16 m, 16 bytes of 4-bit q   | d * q + m       |
| Q5_0 | 22    | 5.5         | fp16 d, 4 bytes of 5th bits, 16 bytes | d * (q - 16)    |
| Q5_1 | 24    | 6.0         | fp16 d, fp16 m, 4 bytes, 16 bytes     | d * q + m       |
| Q8_0 | 34    | 8.5         | fp16 d, 32 int8 q                     | d * q           |

Nibbles: byte j of a 4-bit block holds weight j in its low nibble and weight j + 16 in its high
nibble. The 5-bit types keep the low four bits that way and the fifth bit of weight j in bit j of
a little-endian uint32.

The encoders are one pass each, and exact float32 arithmetic matters, because llama.cpp (and
gguf-py, which copies it) define the bytes:

- Q4_0 / Q5_0 (symmetric): take the signed value of largest magnitude, `max` (the first one if
  two tie), and d = max / -8 (or -16). The negative sign puts `max` on code 0, the end of the
  grid with one more step (codes run -8..7), so the block's extreme sits on the grid (up to
  d's rounding to fp16) and the other side gets all 7 positive steps.
  q = trunc(x / d + 8.5), clipped to 0..15: truncating after adding 0.5 rounds half up.
- Q4_1 / Q5_1 (asymmetric): m = min(x), d = (max - min) / 15 (or 31), q = trunc((x - m) / d + 0.5).
- Q8_0: d = max|x| / 127, q = round(x / d) with halves away from zero (C's roundf).

In every case the code is computed with the float32 d and its float32 reciprocal, and only then
is d rounded to fp16 for storage. Decoding uses the rounded d, so even a block that holds only
grid values may come back slightly different when re-encoded.

K-quants, one super-block = 256 weights in sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q6_K). Each
sub-block has its own scale (and minimum); those scales are themselves quantized to 6 bits
(Q4_K, Q5_K) or 8 bits (Q6_K) against one fp16 super-scale:

| type | bytes | bits/weight | layout                                                        |
|------|-------|-------------|---------------------------------------------------------------|
| Q4_K | 144   | 4.5         | fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes q |
| Q5_K | 176   | 5.5         | as Q4_K, then 32 bytes of fifth bits before the 128 bytes     |
| Q6_K | 210   | 6.5625      | 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, d |

    Q4_K, Q5_K:  x_hat = (d * sc_j) * q - dmin * m_j      q in 0..15 (0..31), sc_j, m_j in 0..63
    Q6_K:        x_hat = (d * sc_j) * (q - 32)            q in 0..63, sc_j an int8

The K-quant encoders do not take the block's min and max as they are: they search. For each
sub-block, `make_qkx2_quants` (Q4_K, Q5_K) tries 21 (16) slightly different grid widths, and for
each rounding it finds the scale and minimum that minimise the weighted squared error by least
squares; `make_qx_quants` (Q6_K) does the same for a symmetric grid with 18 trial widths. The
functions here follow llama.cpp's `quantize_row_q4_K_ref`, `..._q5_K_ref` and `..._q6_K_ref`
(ggml-quants.c; what `llama-quantize` runs when no importance matrix is given) operation by
operation in float32, sums accumulated left to right as the C loops do. gguf-py has no K-quant
encoder, so the tests hold these against bytes made by the C functions themselves
(tests/data/make_gguf_kquants_golden.py). Those were compiled as ISO C, every product rounded
before it is added; a build that fuses multiply-adds (FMA, -march=native) rounds some sums
differently, so llama.cpp binaries can disagree among themselves in an occasional code, and no
encoder can match every build. `search=False` turns the search off and leaves plain
round-to-nearest on each sub-block's min-max (or absmax) grid, the baseline the search has to beat.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK = 32  # weights per legacy block
QK_K = 256  # weights per K-quant super-block
GROUP_MAX_EPS = np.float32(1e-15)  # llama.cpp: a sub-block below this absmax counts as zero
CHUNK_BLOCKS = 256  # K-quant encoders work on this many super-blocks at a time (fits in cache)


@dataclass(frozen=True)
class BlockType:
    """One GGML tensor type: its id in GGUF tensor infos, weights per block, bytes per block."""

    name: str
    ggml_type: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


BLOCK_TYPES = {
    t.name: t
    for t in (
        BlockType("F32", 0, 1, 4),
        BlockType("F16", 1, 1, 2),
        BlockType("Q4_0", 2, QK, 18),
        BlockType("Q4_1", 3, QK, 20),
        BlockType("Q5_0", 6, QK, 22),
        BlockType("Q5_1", 7, QK, 24),
        BlockType("Q8_0", 8, QK, 34),
        BlockType("Q4_K", 12, QK_K, 144),
        BlockType("Q5_K", 13, QK_K, 176),
        BlockType("Q6_K", 14, QK_K, 210),
        BlockType("BF16", 30, 1, 2),
    )
}
TYPES_BY_ID = {t.ggml_type: t for t in BLOCK_TYPES.values()}
QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def block_type(name: str) -> BlockType:
    """The BlockType called `name` ("Q4_0", ...); ValueError naming the choices otherwise."""
    if name not in BLOCK_TYPES:
        raise ValueError(f"unknown GGUF tensor type {name!r}; this module handles: {', '.join(BLOCK_TYPES)}")
    return BLOCK_TYPES[name]


# ---------------------------------------------------------------- shared helpers


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """[n] float32 -> [n, 2] uint8: the fp16 value (round to nearest even) as little-endian bytes."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def fp16_value(b: np.ndarray) -> np.ndarray:
    """[n, 2] uint8 -> [n] float32: read little-endian fp16 bytes back (exact)."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(np.float32)


def sequential_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right in float32, as a C `for` loop adds (numpy's own sum
    adds pairwise, which rounds differently)."""
    columns = np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32)  # each term contiguous
    total = np.zeros(a.shape[:-1], dtype=np.float32)
    for term in columns:
        total += term
    return total


def nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even (it adds 1.5 * 2^23 in float32), as int32."""
    return np.rint(v).astype(np.int32)


def signed_absmax(x: np.ndarray) -> np.ndarray:
    """[n, k] -> [n]: the value of largest magnitude, keeping its sign; the first one on a tie."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]


def reciprocal(d: np.ndarray) -> np.ndarray:
    """1 / d in float32, 0 where d == 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def codes(v: np.ndarray, top: int) -> np.ndarray:
    """Truncated float codes -> uint8 in 0..top. Cast first, then clip, as gguf-py does: the order
    only matters when 1/d overflows (a block of subnormals), where the C code's float-to-int
    conversion is undefined and numpy's cast gives the bytes gguf-py writes."""
    return v.astype(np.uint8).clip(0, top)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero. Exact, unlike trunc(v + 0.5), which rounds
    0.49999997 up because the sum is rounded to float32 first."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + (a - whole >= 0.5))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes 0..15 -> [n, 16] bytes: weight j low nibble, weight j + 16 high nibble."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes 0..15 (uint8)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def pack_high_bits(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit codes -> [n, 4] bytes: bit 4 of weight j as bit j of a little-endian uint32."""
    return np.packbits((q.astype(np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes -> [n, 32] values 0 or 16."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4


def check_blocks(blocks: np.ndarray, size: int) -> np.ndarray:
    if blocks.ndim != 2 or blocks.shape[1] != size:
        raise ValueError(f"expected blocks of shape [n, {size}], got {blocks.shape}")
    return blocks.astype(np.float32, copy=False)


def check_data(data: np.ndarray, type_size: int) -> np.ndarray:
    """Encoded blocks, one row of `type_size` bytes each: uint8 [n, type_size], else an error."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise TypeError(f"expected encoded blocks as a numpy uint8 array, got {getattr(data, 'dtype', type(data).__name__)}")
    if data.ndim != 2 or data.shape[1] != type_size:
        raise ValueError(f"expected encoded blocks of shape [n, {type_size}] (one row per block), got {data.shape}")
    return data


# ---------------------------------------------------------------- legacy types: blocks of 32


def quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """[n, 32] float32 -> [n, 18] uint8: fp16 d = max / -8, codes trunc(x / d + 8.5) in 0..15."""
    x = check_blocks(blocks, QK)
    d = signed_absmax(x) / np.float32(-8)
    q = codes(np.trunc(x * reciprocal(d)[:, None] + np.float32(8.5)), 15)
    return np.concatenate([fp16_bytes(d), pack_nibbles(q)], axis=1)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    """[n, 18] uint8 -> [n, 32] float32: d * (q - 8)."""
    data = check_data(data, 18)
    d = fp16_value(data[:, :2])
    q = unpack_nibbles(data[:, 2:]).astype(np.int8) - np.int8(8)
    return d[:, None] * q.astype(np.float32)


def quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """[n, 32] float32 -> [n, 20] uint8: fp16 d = (max - min) / 15, fp16 m = min, q in 0..15."""
    x = check_blocks(blocks, QK)
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / np.float32(15)
    q = codes(np.trunc((x - lo[:, None]) * reciprocal(d)[:, None] + np.float32(0.5)), 15)
    return np.concatenate([fp16_bytes(d), fp16_bytes(lo), pack_nibbles(q)], axis=1)


def dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    """[n, 20] uint8 -> [n, 32] float32: d * q + m."""
    data = check_data(data, 20)
    d, m = fp16_value(data[:, :2]), fp16_value(data[:, 2:4])
    return d[:, None] * unpack_nibbles(data[:, 4:]).astype(np.float32) + m[:, None]


def quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """[n, 32] float32 -> [n, 22] uint8: fp16 d = max / -16, fifth bits, low nibbles; q in 0..31."""
    x = check_blocks(blocks, QK)
    d = signed_absmax(x) / np.float32(-16)
    q = codes(np.trunc(x * reciprocal(d)[:, None] + np.float32(16.5)), 31)
    return np.concatenate([fp16_bytes(d), pack_high_bits(q), pack_nibbles(q.astype(np.uint8) & 0x0F)], axis=1)


def dequantize_q5_0(data: np.ndarray) -> np.ndarray:
    """[n, 22] uint8 -> [n, 32] float32: d * (q - 16)."""
    data = check_data(data, 22)
    d = fp16_value(data[:, :2])
    q = (unpack_nibbles(data[:, 6:]) | unpack_high_bits(data[:, 2:6])).astype(np.int8) - np.int8(16)
    return d[:, None] * q.astype(np.float32)


def quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """[n, 32] float32 -> [n, 24] uint8: fp16 d = (max - min) / 31, fp16 m = min, q in 0..31."""
    x = check_blocks(blocks, QK)
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / np.float32(31)
    q = codes(np.trunc((x - lo[:, None]) * reciprocal(d)[:, None] + np.float32(0.5)), 31)
    parts = [fp16_bytes(d), fp16_bytes(lo), pack_high_bits(q), pack_nibbles(q.astype(np.uint8) & 0x0F)]
    return np.concatenate(parts, axis=1)


def dequantize_q5_1(data: np.ndarray) -> np.ndarray:
    """[n, 24] uint8 -> [n, 32] float32: d * q + m."""
    data = check_data(data, 24)
    d, m = fp16_value(data[:, :2]), fp16_value(data[:, 2:4])
    q = unpack_nibbles(data[:, 8:]) | unpack_high_bits(data[:, 4:8])
    return d[:, None] * q.astype(np.float32) + m[:, None]


def quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """[n, 32] float32 -> [n, 34] uint8: fp16 d = max|x| / 127, int8 q = round(x / d)."""
    x = check_blocks(blocks, QK)
    d = np.abs(x).max(axis=1) / np.float32(127)
    q = round_half_away(x * reciprocal(d)[:, None]).astype(np.int8)
    return np.concatenate([fp16_bytes(d), q.view(np.uint8)], axis=1)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    """[n, 34] uint8 -> [n, 32] float32: d * q."""
    data = check_data(data, 34)
    d = fp16_value(data[:, :2])
    return data[:, 2:].view(np.int8).astype(np.float32) * d[:, None]


# ---------------------------------------------------------------- K-quants: the scale searches


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric codes for sub-blocks, x_hat = scale * L - the_min, by llama.cpp's grid search.

    x, weights: [n, m] float32 (weights: importance of each value in the error). Returns
    scale [n] float32, the_min [n] float32 (>= 0: the grid's minimum is -the_min <= 0) and
    L [n, m] uint8 codes in 0..nmax.

    Start from the min-max grid (the minimum clamped to <= 0, so zero is always on the grid).
    Then for is = 0..nstep, stretch the grid to (nmax + rmin + rdelta * is) steps over the range,
    round, and solve the 2x2 least-squares problem for the scale and minimum that best fit those
    codes (the minimum clamped to <= 0 again); keep the trial with the lowest weighted squared
    error. As in llama.cpp, each trial measures the range from the best minimum found so far,
    not from the block's own minimum. nstep < 1 skips the search: plain round-to-nearest.
    """
    x, w = x.astype(np.float32, copy=False), weights.astype(np.float32, copy=False)
    hi = x.max(axis=1)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    flat = hi == lo  # every value equal (and <= 0): codes 0, scale 0
    sum_w, sum_x = sequential_sum(w), sequential_sum(w * x)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(nmax) / (hi - lo)
        scale = np.float32(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(np.float32)
        diff = scale[:, None] * L + lo[:, None] - x
        best = sequential_sum(w * (diff * diff))
        for step in range(nstep + 1 if nstep >= 1 else 0):
            stretch = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
            iscale = stretch / (hi - lo)
            l = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(np.float32)
            wl = w * l
            sum_l, sum_l2, sum_xl = sequential_sum(wl), sequential_sum(wl * l), sequential_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0  # a minimum above zero is clamped; refit the scale alone
            this_min = np.where(positive, np.float32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            diff = this_scale[:, None] * l + this_min[:, None] - x
            error = sequential_sum(w * (diff * diff))
            better = (D > 0) & (error < best) & ~flat
            L = np.where(better[:, None], l, L)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    L = np.where(flat[:, None], 0, L).astype(np.uint8)
    scale = np.where(flat, np.float32(0), scale).astype(np.float32)
    return scale, (-lo).astype(np.float32), L


def make_qx_quants(x: np.ndarray, nmax: int, search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes for sub-blocks, x_hat = scale * (L - nmax), by llama.cpp's search (rmse_type 1).

    x: [n, m] float32. Returns scale [n] float32 (may be negative) and L [n, m] uint8 in
    0..2*nmax-1. The grid puts the value of largest magnitude on -nmax, the end with one more
    step. With search, 18 other widths (nmax +- 0.1 ... 0.9) are tried and each one's best
    scale sum(w x l) / sum(w l^2) is kept when it lowers the error weighted by w = x^2.
    Without search: plain round-to-nearest, scale = max / -nmax. All-zero sub-blocks: 0, codes 0.
    """
    x = x.astype(np.float32, copy=False)
    peak = signed_absmax(x)
    zero = np.abs(peak) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(-nmax) / peak
        l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        L = l + nmax
        if not search:
            scale = np.float32(1) / iscale
        else:
            w = x * x
            lf = l.astype(np.float32)
            sum_lx, sum_l2 = sequential_sum(w * x * lf), sequential_sum(w * lf * lf)
            scale = np.where(sum_l2 != 0, sum_lx / sum_l2, np.float32(0))
            best = scale * sum_lx
            for step in (*range(-9, 0), *range(1, 10)):
                iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / peak
                l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
                lf = l.astype(np.float32)
                sum_lx, sum_l2 = sequential_sum(w * x * lf), sequential_sum(w * lf * lf)
                better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
                L = np.where(better[:, None], l + nmax, L)
                scale = np.where(better, sum_lx / sum_l2, scale)
                best = np.where(better, scale * sum_lx, best)
    L = np.where(zero[:, None], 0, L).astype(np.uint8)
    return np.where(zero, np.float32(0), scale).astype(np.float32), L


# ---------------------------------------------------------------- K-quants: Q4_K and Q5_K


def pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins [n, 8] -> [n, 12] bytes.

    Bytes 0-3: scales 0-3 (low 6 bits), top 2 bits = high bits of scale 4-7.
    Bytes 4-7: mins 0-3, top 2 bits = high bits of min 4-7.
    Bytes 8-11: low nibble = low 4 bits of scale 4-7, high nibble = low 4 bits of min 4-7.
    """
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1)


def unpack_scales_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 12] bytes -> (scales [n, 8], mins [n, 8]) as uint8 in 0..63; inverse of pack_scales_k4."""
    first, second, third = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    ls = np.concatenate([first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)], axis=1)
    lm = np.concatenate([second & 0x3F, (third >> 4) | ((second >> 6) << 4)], axis=1)
    return ls, lm


def quantize_kx(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared body of Q4_K and Q5_K: [n, 256] float32 -> (d, dmin [n, 2] fp16 bytes,
    scales [n, 12] bytes, codes [n, 256] uint8 in 0..nmax).

    1. Per sub-block of 32: weights av_x + |x| (av_x = RMS of the sub-block), make_qkx2_quants.
    2. The 8 scales and 8 mins of the super-block become 6-bit integers against
       d = max(scale) / 63 and dmin = max(min) / 63, both stored as fp16.
    3. Every weight is rounded again with the stored, quantized scale and min, because those are
       what the decoder will use (a sub-block whose quantized scale is 0 keeps its step-1 codes).
    """
    n = blocks.shape[0]
    x = blocks.reshape(n * 8, 32)
    av_x = np.sqrt(sequential_sum(x * x) / np.float32(32))
    weights = av_x[:, None] + np.abs(x)
    scales, mins, L = make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), np.float32(0))
    max_min = np.maximum(mins.max(axis=1), np.float32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, np.float32(0))
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, np.float32(0))
    # C stores nearest_int() in a uint8 (wrapping a negative) and then caps it at 63
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    d16, dmin16 = fp16_bytes(max_scale / np.float32(63)), fp16_bytes(max_min / np.float32(63))
    d = fp16_value(d16)[:, None] * ls.astype(np.float32)
    dm = fp16_value(dmin16)[:, None] * lm.astype(np.float32)
    xs = blocks.reshape(n, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requantized = np.clip(nearest_int((xs + dm[..., None]) / d[..., None]), 0, nmax)
    L = np.where((d != 0)[..., None], requantized, L).astype(np.uint8).reshape(n, QK_K)
    return d16, dmin16, pack_scales_k4(ls, lm), L


def pack_q4_k_codes(L: np.ndarray) -> np.ndarray:
    """[n, 256] codes 0..15 -> [n, 128] bytes: in each 64-weight chunk, byte l holds weight l
    (low nibble) and weight l + 32 (high nibble)."""
    chunks = L.reshape(-1, 4, 2, 32)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)


def unpack_q4_k_codes(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes -> [n, 256] codes 0..15."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, QK_K)


def quantize_q4_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """[n, 256] float32 -> [n, 144] uint8 (d, dmin, 12 scale bytes, 128 code bytes).

    llama.cpp's quantize_row_q4_K_ref: make_qkx2_quants with nmax 15 and grid widths
    15 - 1.0, 15 - 0.9, ..., 15 + 1.0 (21 trials). search=False: min-max rounding only.
    """
    x = check_blocks(blocks, QK_K)
    d, dmin, scales, L = quantize_kx(x, 15, -1.0, 0.1, 20 if search else 0)
    return np.concatenate([d, dmin, scales, pack_q4_k_codes(L)], axis=1)


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    """[n, 144] uint8 -> [n, 256] float32: (d * sc_j) * q - dmin * m_j per sub-block j of 32."""
    data = check_data(data, 144)
    n = data.shape[0]
    d, dmin = fp16_value(data[:, 0:2]), fp16_value(data[:, 2:4])
    ls, lm = unpack_scales_k4(data[:, 4:16])
    scale = (d[:, None] * ls.astype(np.float32))[..., None]
    offset = (dmin[:, None] * lm.astype(np.float32))[..., None]
    q = unpack_q4_k_codes(data[:, 16:]).reshape(n, 8, 32).astype(np.float32)
    return (scale * q - offset).reshape(n, QK_K)


def quantize_q5_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """[n, 256] float32 -> [n, 176] uint8 (d, dmin, 12 scale bytes, 32 high-bit bytes, 128 bytes).

    llama.cpp's quantize_row_q5_K_ref: make_qkx2_quants with nmax 31 and grid widths
    31 - 0.5, ..., 31 + 1.0 (16 trials). Fifth bits: in 64-weight chunk c, weight l sets bit 2c
    and weight l + 32 bit 2c + 1 of byte l.
    """
    x = check_blocks(blocks, QK_K)
    d, dmin, scales, L = quantize_kx(x, 31, -0.5, 0.1, 15 if search else 0)
    chunks = L.reshape(-1, 4, 2, 32) >> 4  # [n, chunk, half, l] fifth bits
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (chunks << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([d, dmin, scales, qh, pack_q4_k_codes(L & 0x0F)], axis=1)


def dequantize_q5_k(data: np.ndarray) -> np.ndarray:
    """[n, 176] uint8 -> [n, 256] float32: (d * sc_j) * q - dmin * m_j, q in 0..31."""
    data = check_data(data, 176)
    n = data.shape[0]
    d, dmin = fp16_value(data[:, 0:2]), fp16_value(data[:, 2:4])
    ls, lm = unpack_scales_k4(data[:, 4:16])
    qh = data[:, 16:48]
    shifts = np.arange(8, dtype=np.uint8)  # bit 2c + h belongs to chunk c, half h
    high = ((qh[:, None, :] >> shifts[None, :, None]) & 1).reshape(n, QK_K) << 4
    q = (unpack_q4_k_codes(data[:, 48:]) | high).reshape(n, 8, 32).astype(np.float32)
    scale = (d[:, None] * ls.astype(np.float32))[..., None]
    offset = (dmin[:, None] * lm.astype(np.float32))[..., None]
    return (scale * q - offset).reshape(n, QK_K)


# ---------------------------------------------------------------- K-quants: Q6_K


def quantize_q6_k(blocks: np.ndarray, search: bool = True) -> np.ndarray:
    """[n, 256] float32 -> [n, 210] uint8 (ql 128, qh 64, int8 scales 16, fp16 d).

    llama.cpp's quantize_row_q6_K_ref: make_qx_quants(nmax 32) on each sub-block of 16; the 16
    scales become int8 against d = max_scale / -128 (max_scale: the scale of largest magnitude);
    every weight is rounded again with d * sc_j. A super-block whose scales are all below 1e-15
    is stored as zeros. Codes: in each half of 128 weights, ql byte l holds weight l (low) and
    l + 64 (high nibble), ql byte 32 + l holds l + 32 and l + 96; qh byte l holds the top two
    bits of l, l + 32, l + 64, l + 96 at bits 0, 2, 4, 6.
    """
    x = check_blocks(blocks, QK_K)
    n = x.shape[0]
    scales, L = make_qx_quants(x.reshape(n * 16, 16), 32, search)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16).astype(np.int32)
    max_scale = signed_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(-128) / max_scale
        d16 = fp16_bytes(np.float32(1) / iscale)
        sc = np.minimum(nearest_int(iscale[:, None] * scales), 127)
        sc = np.where(zero[:, None], 0, sc).astype(np.int8)
        d = fp16_value(d16)[:, None] * sc.astype(np.float32)
        requantized = np.clip(nearest_int(x.reshape(n, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], requantized, L).reshape(n, 2, 4, 32).astype(np.uint8)
    low = L & 0x0F  # uint8: `<< 4` keeps the low nibble only
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d16], axis=1)
    out[zero] = 0
    return out


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """[n, 210] uint8 -> [n, 256] float32: (d * sc_j) * (q - 32) per sub-block j of 16."""
    data = check_data(data, 210)
    n = data.shape[0]
    ql = data[:, :128].reshape(n, 2, 2, 32)  # [n, half, byte group, l]
    qh = data[:, 128:192].reshape(n, 2, 1, 32)
    sc = data[:, 192:208].view(np.int8).astype(np.float32)
    d = fp16_value(data[:, 208:210])
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # quarters 0, 1, 2, 3 of each half
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return ((d[:, None] * sc)[..., None] * q).reshape(n, QK_K)


# ---------------------------------------------------------------- whole tensors

ENCODERS: dict[str, Callable] = {
    "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1, "Q5_0": quantize_q5_0, "Q5_1": quantize_q5_1,
    "Q8_0": quantize_q8_0, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k,
}  # fmt: skip
DECODERS: dict[str, Callable] = {
    "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1, "Q5_0": dequantize_q5_0, "Q5_1": dequantize_q5_1,
    "Q8_0": dequantize_q8_0, "Q4_K": dequantize_q4_k, "Q5_K": dequantize_q5_k, "Q6_K": dequantize_q6_k,
}  # fmt: skip


def row_bytes(row_length: int, qtype: str) -> int:
    """Bytes of one row of `row_length` weights in `qtype`; ValueError if blocks do not tile it."""
    t = block_type(qtype)
    if row_length % t.block_size:
        raise ValueError(
            f"{qtype} stores blocks of {t.block_size} weights, which do not tile a row of {row_length}; "
            f"pick a type whose block size divides {row_length} (llama.cpp falls back, e.g. Q4_K -> Q5_0)"
        )
    return row_length // t.block_size * t.type_size


def quantize(x: np.ndarray, qtype: str, search: bool = True) -> np.ndarray:
    """Encode x [..., k] (any float dtype) as `qtype`: returns uint8 [..., k / block * bytes].

    The same contract as gguf.quants.quantize: blocks run along the last axis. F32, F16 and BF16
    are plain casts (BF16 rounds to nearest even, NaNs made quiet). search=False turns the
    K-quant scale search off (round-to-nearest on each sub-block).
    """
    t = block_type(qtype)
    x = np.asarray(x, dtype=np.float32)
    if qtype == "F32":
        return np.ascontiguousarray(x).view(np.uint8)
    if qtype == "F16":
        return np.ascontiguousarray(x.astype("<f2")).view(np.uint8)
    if qtype == "BF16":
        bits = np.ascontiguousarray(x).view(np.uint32)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = (bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = np.where(nan, (bits >> 16) | 0x40, rounded).astype("<u2")
        return out.view(np.uint8)
    if not np.isfinite(x).all():
        raise ValueError(f"cannot encode NaN or infinite values as {qtype}; check the tensor first")
    out_shape = (*x.shape[:-1], row_bytes(x.shape[-1], qtype))
    blocks = x.reshape(-1, t.block_size)
    encode = ENCODERS[qtype]
    if qtype in K_QUANTS:
        parts = [encode(blocks[i : i + CHUNK_BLOCKS], search) for i in range(0, blocks.shape[0], CHUNK_BLOCKS)]
        data = np.concatenate(parts) if parts else np.zeros((0, t.type_size), np.uint8)
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # only blocks of subnormals overflow 1/d
            data = encode(blocks)
    return data.reshape(out_shape)


def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Decode uint8 [..., row bytes] of `qtype` into float32 [..., row length]."""
    t = block_type(qtype)
    data = np.ascontiguousarray(data).view(np.uint8)
    if data.shape[-1] % t.type_size:
        raise ValueError(f"a {qtype} row has a multiple of {t.type_size} bytes, got {data.shape[-1]}")
    out_shape = (*data.shape[:-1], data.shape[-1] // t.type_size * t.block_size)
    if qtype == "F32":
        return data.view("<f4").astype(np.float32).reshape(out_shape)
    if qtype == "F16":
        return data.view("<f2").astype(np.float32).reshape(out_shape)
    if qtype == "BF16":
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(out_shape)
    return DECODERS[qtype](data.reshape(-1, t.type_size)).reshape(out_shape)


def quantization_mse(x: np.ndarray, qtype: str, search: bool = True) -> float:
    """Mean squared error of encoding then decoding x [..., k] as `qtype`, in float64."""
    x = np.asarray(x, dtype=np.float32)
    x_hat = dequantize(quantize(x, qtype, search), qtype)
    return float(np.mean((x.astype(np.float64) - x_hat) ** 2))
