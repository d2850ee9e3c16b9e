"""NF4 in Triton: QLoRA's 4-bit weights, decoded by a table lookup inside the matrix product.

bitsandbytes stores a Linear weight W [N, K] (flattened row by row) as blocks of `blocksize`
consecutive values (64 by default). Each block keeps one float, its absmax, and each value one
4-bit index into a code book of 16 floats in [-1, 1]:

    W.flatten()[i] = code[q_i] * absmax[i // blocksize]

NF4's code book holds quantiles of a normal distribution (FP4's the 16 values of a tiny float
format: the same kernels run either, given its table). Two indices share a byte, the first in
the HIGH nibble: byte j holds elements 2j (bits 4..7) and 2j + 1 (bits 0..3). With double
quantization (`compress_statistics=True`) the absmax are themselves quantized: one uint8 code
per block, a float32 absmax2 per 256 blocks, and one float offset (their mean):

    absmax[b] = dynamic_map[codes[b]] * absmax2[b // 256] + offset

That costs two lookups per block of 64 weights, so the kernels decode it themselves: 4.127 bits
per weight travel from memory instead of 4.5.

The kernels read the packed bytes as int32 words along K, where they are contiguous: a word
holds inputs 8i .. 8i + 7 of a row, and since byte j of a (little-endian) word is bits
8j .. 8j + 7, input 8i + e sits in nibble e XOR 1. A block's absmax multiplies the sum of its
weights' products, once per block and row, not once per weight.

The lookup is the hard part. Unlike GPTQ's integers (kernels/w4a16.py), a code is no affine
function of its index, so every weight needs code[index]. A load from the 64-byte table per
weight is the simple answer, and on an H100 a slow one: the matmuls then decoded about 3.5
weights per clock and SM, where streaming 3 TB/s of 4-bit weights takes about 25. So on a GPU,
for fp16 and bf16 activations, the table lives in 8 registers and a byte-permute instruction
looks up 4 weights at once (section "The code book in registers"). Float32 activations, which
need the exact float32 values, and the CPU interpreter, which runs no GPU assembly, take the
load path.

Three kernels:

- `dequantize_nf4`: W back to float16/bfloat16/float32, one pass, bit for bit bitsandbytes'
  `dequantize_4bit` (on a GPU; the interpreter truncates to bfloat16 where torch rounds).
- GEMV (M = 1, generating one token): each program takes BLOCK_N rows of W and a slice of K,
  tile by tile, issuing the next tile's loads before decoding the current one so that memory
  keeps working while the ALUs do. A tile is held as [rows, quantization blocks, words], so a
  block's absmax multiplies its word sums at once; the absmax are decoded a tile ahead of use.
  Float32 accumulation (with the register table, each word's 8 products are summed in fp16/bf16
  pairs first, as kernels/w4a16.py does).
- GEMM (M >= 2): the weight tile is decoded to fp16/bf16, scaled by its absmax, and handed to
  `tl.dot` (tensor cores). On an H100 it lost to "dequantize W once, then cuBLAS" at every M
  from 2 to 256 (4096 x 4096: 44 us against 31 at M = 2, 294 against 38 at M = 256), so
  `nf4_matmul` takes that path on a GPU for M >= 2, as bitsandbytes does; `nf4_gemm` remains,
  tested, and `FUSED_GEMM` routes to it.

Split-K (both matmuls): with few output rows per program, K is also split into SPLIT_K slices;
their partial sums meet in a float32 workspace, added in a fixed order by whichever program
arrives last (`store_split_k`, kernels/w4a16.py): deterministic, one launch.

The fused matmuls need K to be a multiple of blocksize, so that no block straddles two rows of W
(bitsandbytes itself only requires the total to be); `dequantize_nf4` takes any shape.

Measured on an H100 (fp16 x, M = 1, cold L2 as benchmarks/kernels.py measures, the best
configuration found): 4096 x 4096 11.1 us (fp16 cuBLAS 18.8, bitsandbytes 14.9 in
benchmarks/results/kernels.md), 8192 x 8192 23.9 us (50.4), 8192 x 28672 64.2 us (170.8,
bitsandbytes 105.6): 1.7x to 2.7x over fp16. At that shape reading the weight alone takes about
40 us, and decoding it alone about as long (21 integer instructions per word of 8 weights, on
the pipe that issues half as many per clock as the float one, counted in the compiled code):
the 64 us are the two overlapping imperfectly. Called one token at a time from Python, a layer
costs its host time, not its GPU time: `TritonLinear4bit` relaunches its GEMV without Triton's
per-call dispatch (kernels.common.Relaunch), 18 us per call at 4096 x 4096 against bitsandbytes'
52 (benchmarks/results/per_call.md).

Twin: `reference_impl.nf4` (quantize_4bit, dequantize_4bit, matmul_4bit), itself checked byte
for byte against bitsandbytes.
"""

import dataclasses
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import nn
from torch.nn import functional as F

from quantcourse.reference_impl.nf4 import QuantState, quantize_4bit, storage_bits

from .common import Relaunch, check_device, check_tensor, interpreting, launch, tuning_bench
from .quantize import FLOATS
from .w4a16 import DOT_DTYPES, GEMM_SPLIT_K_MAX_M, split_k_workspace, store_split_k

# GEMV: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps); a row's tile is BLOCK_K / 2 contiguous bytes.
# Measured on an H100 with the code book in registers (fp16 x, cold L2, about 50 configurations
# at 4096 x 4096, 8192 x 8192 and 8192 x 28672): one warp per program, 16 rows of 256 inputs
# (128 bytes a row), K split in 2 or 4, was fastest at all three (128 registers: 16 warps per
# SM); four warps on 32 rows were 9% slower at 8192 x 28672. The tiles of 64 inputs serve
# in_features that 128 does not divide (576 = 9 x 64), where the others would need masks.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w)
    for n, k, s, w in [
        (16, 256, 2, 1),
        (16, 256, 4, 1),
        (16, 128, 4, 1),
        (16, 128, 8, 1),
        (32, 128, 4, 1),
        (32, 256, 4, 4),
        (16, 64, 8, 1),
        (64, 64, 8, 2),
    ]
]
# GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, SWAP_AB, num_warps, num_stages), as kernels/w4a16.py.
GEMM_CONFIGS = [
    triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s, "SWAP_AB": swap, "GROUP_M": 8},
        num_warps=w,
        num_stages=st,
    )
    for m, n, k, s, swap, w, st in [
        (16, 64, 128, 8, True, 4, 3),
        (16, 128, 128, 4, True, 4, 3),
        (32, 128, 128, 2, True, 4, 3),
        (64, 128, 128, 1, False, 4, 3),
        (64, 128, 128, 1, True, 4, 3),
        (128, 128, 128, 1, False, 8, 3),
        (128, 128, 128, 1, True, 8, 3),
        (128, 256, 128, 1, False, 8, 3),
    ]
]
GEMV_CPU = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2}
GEMM_CPU = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 2, "GROUP_M": 2}  # SWAP_AB: M <= 16
MIN_TILE = 16  # the narrowest BLOCK_M and BLOCK_N of any configuration: sizes the split-K counters
TABLE_IN_REGISTERS = True  # off: GPU launches read the code book from memory too (to compare)
FUSED_GEMM = False  # on a GPU, whether nf4_matmul takes the fused GEMM for M >= 2 (nf4_matmul's doc)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def block_absmax(stats, blocks, absmax2_ptr, map_ptr, offset_ptr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
    """The absmax of quantization blocks `blocks`, given what was loaded for them (`stats`):
    the float32 absmax itself, or with double quantization its uint8 code, decoded here."""
    if NESTED:
        absmax = tl.load(map_ptr + stats.to(tl.int32)) * tl.load(absmax2_ptr + blocks // NESTED_BS) + tl.load(offset_ptr)
    else:
        absmax = stats
    return absmax


@triton.jit
def _weight_tile(packed_ptr, absmax_ptr, rows, k0, k_end, K, BS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Loads of the weight tile of rows `rows` [R] and inputs k0 .. k0 + BLOCK_K - 1: its words
    [R, BLOCK_K/8] (0 from k_end on), and the index of the quantization block of each word
    with what is stored for it (absmax, or its code): [R, 1] when a block holds the whole tile
    row, else [R, BLOCK_K/8]. Block indices are clamped, so that every load is in bounds."""
    w = tl.arange(0, BLOCK_K // 8)
    words = tl.load(
        packed_ptr + rows[:, None] * (K // 8) + (k0 // 8 + w)[None, :], mask=(k0 + 8 * w < k_end)[None, :], other=0
    )
    if BLOCK_K <= BS:  # tiles start at multiples of BLOCK_K: one block per row of the tile
        blocks = rows[:, None] * (K // BS) + tl.minimum(k0, K - 1) // BS
    else:
        blocks = rows[:, None] * (K // BS) + (tl.minimum(k0 + 8 * w, K - 1) // BS)[None, :]
    return words, tl.load(absmax_ptr + blocks), blocks


@triton.jit
def _lookup(code_ptr, indices):
    """code[indices], one load per index from the 64-byte table (it stays in the L1 cache): exact
    float32 values, but slow on a GPU (module doc); the path of the interpreter and of float32."""
    return tl.load(code_ptr + indices)


@triton.jit
def nibble_values(words, p: tl.constexpr, code_ptr):
    """code[nibble p] of every word, float32 shaped like `words`: the weights of inputs
    8i + (p ^ 1) of word i (module doc)."""
    return _lookup(code_ptr, (words >> (4 * p)) & 0xF)


# ----------------------------------------------------------------------------------------------
# The code book in registers (GPU, fp16 and bf16 activations)
# ----------------------------------------------------------------------------------------------
#
# A load per weight caps the matmuls at a few weights per clock and SM (measured on an H100:
# about 3.5, where reading 3 TB/s of 4-bit weights takes about 25). So on a GPU the 16 code
# values, rounded to the activations' 16-bit type, sit in 8 registers instead: the low bytes of
# entries 0-3, 4-7, 8-11, 12-15 in L0..L3, their high bytes in H0..H3. `prmt` (byte permute)
# picks 4 bytes out of two registers by 4 three-bit selectors, and 4 nibbles of a word are
# exactly 4 selectors:
#   prmt(L0, L1, c & 0x7777)        low bytes of entries (c & 7)       for the 4 nibbles of c
#   prmt(L2, L3, c & 0x7777)        low bytes of entries 8 + (c & 7)
#   prmt(those two, q)              per byte, the second if the nibble's bit 3 is set:
#                                   q = 0x3210 | ((c >> 1) & 0x4444) selects byte i or i + 4
# and the same for the high bytes; two more `prmt` interleave low and high bytes into two fp16
# pairs in input order. `prmt` reads only the low 16 bits of its selector, so the selectors of
# the word's upper 4 nibbles are those of the lower 4 shifted down by 16. 21 instructions for
# the 8 weights of a word, no memory access. The values are then the code book rounded to fp16
# (or bf16), which the results' type rounds anyway. Triton has no byte permute: these are inline
# PTX, so the interpreter (and float32 activations, which need the exact values) take the
# `nibble_values` path.


def _decode_ptx(word: str, table: list[str]) -> list[str]:
    """PTX: the 8 weights of `word` as fp16/bf16 pairs p0..p3 = (w0, w1), .. (w6, w7)."""
    lines = [
        f"and.b32 s, {word}, 0x77777777;",  # byte selectors: entry (nibble & 7)
        f"shr.u32 q, {word}, 1;",
        "lop3.b32 q, q, 0x44444444, 0x32103210, 0xEA;",  # (q & 0x44444444) | 0x32103210: bit 3 picks
    ]
    for chunk, (pair_a, pair_b) in enumerate((("p0", "p1"), ("p2", "p3"))):
        if chunk:  # nibbles 4..7
            lines += ["shr.u32 s, s, 16;", "shr.u32 q, q, 16;"]
        lines += [
            f"prmt.b32 a, {table[0]}, {table[1]}, s;",
            f"prmt.b32 b, {table[2]}, {table[3]}, s;",
            "prmt.b32 lo, a, b, q;",
            f"prmt.b32 a, {table[4]}, {table[5]}, s;",
            f"prmt.b32 b, {table[6]}, {table[7]}, s;",
            "prmt.b32 hi, a, b, q;",
            # In the word, element 2j is the high nibble of byte j: nibbles 0..3 of the chunk are
            # elements 1, 0, 3, 2, so the pairs take bytes (1, 0) and (3, 2) of lo and hi.
            f"prmt.b32 {pair_a}, lo, hi, 0x4051;",
            f"prmt.b32 {pair_b}, lo, hi, 0x6273;",
        ]
    return lines


def _ptx(half: str, result: str) -> tl.constexpr:
    """Inline PTX for `dot8_nf4` (result "dot") or `dequantize8_nf4` (result "pairs"); half: f16 or bf16."""
    head = [".reg .b32 s, q, a, b, lo, hi, p0, p1, p2, p3, acc;", ".reg .b16 l16, h16;", ".reg .f32 fl, fh;"]
    table = [f"${i}" for i in range(6, 14)]
    if result == "dot":  # $0 = sum of the 8 products; $1 word; $2..$5 activation pairs
        body = _decode_ptx("$1", table) + [
            f"mul.rn.{half}x2 acc, p0, $2;",
            f"fma.rn.{half}x2 acc, p1, $3, acc;",
            f"fma.rn.{half}x2 acc, p2, $4, acc;",
            f"fma.rn.{half}x2 acc, p3, $5, acc;",
        ]
        if half == "f16":
            body += ["mov.b32 {l16, h16}, acc;", "cvt.f32.f16 fl, l16;", "cvt.f32.f16 fh, h16;"]
        else:  # a bfloat16 is the upper half of a float32
            body += ["shl.b32 a, acc, 16;", "and.b32 b, acc, 0xFFFF0000;", "mov.b32 fl, a;", "mov.b32 fh, b;"]
        body += ["add.f32 fl, fl, fh;", "mov.b32 $0, fl;"]
    else:  # $0..$3 = the 4 pairs times the block's absmax; $4 word; $5 absmax pair
        body = _decode_ptx("$4", table) + [f"mul.rn.{half}x2 ${i}, p{i}, $5;" for i in range(4)]
    return tl.constexpr("{\n" + "\n".join(head + body) + "\n}")


DOT8_F16, DOT8_BF16 = _ptx("f16", "dot"), _ptx("bf16", "dot")
PAIRS_F16, PAIRS_BF16 = _ptx("f16", "pairs"), _ptx("bf16", "pairs")


@triton.jit
def _table_byte(code_ptr, entry: tl.constexpr, shift: tl.constexpr, HALF: tl.constexpr):
    """Byte shift / 8 of code[entry] in HALF bits, at byte entry % 4 of an int32."""
    bits = tl.load(code_ptr + entry).to(HALF).to(tl.int16, bitcast=True).to(tl.int32)
    return ((bits >> shift) & 0xFF) << (8 * (entry % 4))


@triton.jit
def _table_word(code_ptr, first: tl.constexpr, shift: tl.constexpr, HALF: tl.constexpr):
    """Byte shift / 8 of code[first .. first + 3] rounded to HALF, packed in one int32."""
    return (_table_byte(code_ptr, first, shift, HALF) | _table_byte(code_ptr, first + 1, shift, HALF)
            | _table_byte(code_ptr, first + 2, shift, HALF) | _table_byte(code_ptr, first + 3, shift, HALF))  # fmt: skip


@triton.jit
def code_registers(code_ptr, HALF: tl.constexpr):
    """The code book [16] as the 8 int32 registers L0..L3, H0..H3 that `prmt` reads (see above)."""
    return (_table_word(code_ptr, 0, 0, HALF), _table_word(code_ptr, 4, 0, HALF), _table_word(code_ptr, 8, 0, HALF),
            _table_word(code_ptr, 12, 0, HALF), _table_word(code_ptr, 0, 8, HALF), _table_word(code_ptr, 4, 8, HALF),
            _table_word(code_ptr, 8, 8, HALF), _table_word(code_ptr, 12, 8, HALF))  # fmt: skip


@triton.jit
def half_pair(value, HALF: tl.constexpr):
    """float32 tensor -> int32 tensor holding the pair (value, value) in HALF (fp16 or bf16) bits."""
    bits = value.to(HALF).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def split_pair(pairs, HALF: tl.constexpr):
    """int32 pairs -> (low half, high half) as two HALF tensors."""
    return pairs.to(tl.int16).to(HALF, bitcast=True), (pairs >> 16).to(tl.int16).to(HALF, bitcast=True)


@triton.jit
def dot8_nf4(words, x01, x23, x45, x67, l0, l1, l2, l3, h0, h1, h2, h3, HALF: tl.constexpr):
    """sum over the 8 weights of each word of code[index] * x, float32 shaped like words.
    x01 .. x67 int32, broadcastable to words: the activation pairs (x_8i, x_8i+1), ..,
    (x_8i+6, x_8i+7) of each word's inputs 8i .. 8i+7; l0 .. h3: `code_registers`. The 8
    products are summed in HALF pairs, then the two halves in float32: with |code| <= 1, an fp16
    sum overflows only past |x| = 8188 on all 8."""
    z = tl.zeros_like(words)
    args = [words, x01 + z, x23 + z, x45 + z, x67 + z, l0 + z, l1 + z, l2 + z, l3 + z, h0 + z, h1 + z, h2 + z, h3 + z]
    if HALF == tl.bfloat16:
        sums = tl.inline_asm_elementwise(DOT8_BF16, "=r" + ",r" * 13, args, dtype=tl.int32, is_pure=True, pack=1)
    else:
        sums = tl.inline_asm_elementwise(DOT8_F16, "=r" + ",r" * 13, args, dtype=tl.int32, is_pure=True, pack=1)
    return sums.to(tl.float32, bitcast=True)


@triton.jit
def dequantize8_nf4(words, absmax, l0, l1, l2, l3, h0, h1, h2, h3, HALF: tl.constexpr):
    """The 8 weights of each word, code[index] * absmax in HALF: 8 tensors shaped like words,
    inputs 8i + 0 .. 8i + 7 of word column i. absmax: broadcastable to words; l0 .. h3: `code_registers`."""
    z = tl.zeros_like(words)
    args = [words, half_pair(absmax, HALF) + z, l0 + z, l1 + z, l2 + z, l3 + z, h0 + z, h1 + z, h2 + z, h3 + z]
    if HALF == tl.bfloat16:
        p01, p23, p45, p67 = tl.inline_asm_elementwise(PAIRS_BF16, "=r,=r,=r,=r" + ",r" * 10, args,
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)  # fmt: skip
    else:
        p01, p23, p45, p67 = tl.inline_asm_elementwise(PAIRS_F16, "=r,=r,=r,=r" + ",r" * 10, args,
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)  # fmt: skip
    w0, w1 = split_pair(p01, HALF)
    w2, w3 = split_pair(p23, HALF)
    w4, w5 = split_pair(p45, HALF)
    w6, w7 = split_pair(p67, HALF)
    return w0, w1, w2, w3, w4, w5, w6, w7


# ----------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, map_ptr, offset_ptr, code_ptr, out_ptr, n,
    BS: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, ROWS: tl.constexpr, BYTES: tl.constexpr,
):  # fmt: skip
    """out[:n] = code[index] * absmax[block], element by element of the flattened weight.

    A program takes ROWS x BYTES consecutive bytes (2 x that many elements); BYTES divides
    BS / 2, so each of its rows lies in one block and needs one absmax."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    byte = rows[:, None] * BYTES + tl.arange(0, BYTES)[None, :]
    b = tl.load(packed_ptr + byte, mask=byte < tl.cdiv(n, 2), other=0).to(tl.int32)
    blocks = tl.minimum(rows * (2 * BYTES), n - 1) // BS
    scale = block_absmax(tl.load(absmax_ptr + blocks), blocks, absmax2_ptr, map_ptr, offset_ptr, NESTED, NESTED_BS)
    first = _lookup(code_ptr, b >> 4) * scale[:, None]  # element 2j: the high nibble
    second = _lookup(code_ptr, b & 0xF) * scale[:, None]
    values = tl.reshape(tl.join(first, second), (ROWS, 2 * BYTES))  # interleaved: 2j, 2j + 1, ...
    element = rows[:, None] * (2 * BYTES) + tl.arange(0, 2 * BYTES)[None, :]
    tl.store(out_ptr + element, values.to(out_ptr.dtype.element_ty), mask=element < n)


# ----------------------------------------------------------------------------------------------
# GEMV: M = 1
# ----------------------------------------------------------------------------------------------


def cold_cache_bench(kernel_call, quantiles, reps: int = 30) -> list[float]:
    """What the GEMV's autotuner times configurations with (milliseconds at `quantiles`): each
    call after reading 256 MB, so that the weight comes from memory, as in a decoder, where the
    other layers' weights pass through the L2 cache between two calls of this one. Triton's
    do_bench clears the cache by writing; the dirty lines then drain during the timed call, and
    on an H100 it chose a configuration 40% slower on 8192 x 28672 than the best under reads."""
    flush = torch.empty(2**26, dtype=torch.float32, device="cuda")
    kernel_call()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.sum()
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(end) for start, end in events])
    return [torch.quantile(times, q).item() for q in quantiles]


@triton.jit
def _gemv_words(row_ptr, word, k0, k_end, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The words [R, NB, WB] of the tile at input k0 (row_ptr [R, NB, WB]: the tile at input 0).
    EVEN_K: the tile is whole (k0 in range, as the caller clamps it); else 0 from k_end on."""
    ptrs = row_ptr + tl.multiple_of(k0 // 8, BLOCK_K // 8)
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(k0 + 8 * word < k_end)[None, :, :], other=0)


@triton.jit
def _gemv_stats(absmax_ptr, rows, k0, K, BS: tl.constexpr, NB: tl.constexpr):
    """[R, NB]: the quantization blocks of the tile at input k0 (clamped into their row: past the
    end, any block will do) and what is stored for them (absmax, or its code)."""
    first = tl.minimum(k0, K - 1) // BS
    blocks = rows[:, None] * (K // BS) + tl.minimum(first + tl.arange(0, NB)[None, :], K // BS - 1)
    return tl.load(absmax_ptr + blocks), blocks


@triton.jit
def _gemv_pairs(pairs_ptr, k0, k_end, NB: tl.constexpr, WB: tl.constexpr, EVEN_K: tl.constexpr):
    """x as the pairs (x_8i, x_8i+1), .., (x_8i+6, x_8i+7) of the tile's words: 4 int32 [NB, WB],
    read in one contiguous load (0 from k_end on)."""
    i = tl.arange(0, NB * WB * 4)
    ptrs = pairs_ptr + tl.multiple_of(k0 // 2, NB * WB * 4) + i
    if EVEN_K:
        pairs = tl.load(ptrs)
    else:
        pairs = tl.load(ptrs, mask=k0 + 2 * i < k_end, other=0)
    even, odd = tl.split(tl.reshape(pairs, [NB, WB, 2, 2]))  # pairs 4w + (0, 2) and 4w + (1, 3)
    x01, x45 = tl.split(even)
    x23, x67 = tl.split(odd)
    return x01, x23, x45, x67


@triton.jit
def _gemv_tile_dot(words, x_ptr, k0, k_end, word, code_ptr, l0, l1, l2, l3, h0, h1, h2, h3, X_DTYPE: tl.constexpr,
                   REGISTER_TABLE: tl.constexpr, NB: tl.constexpr, WB: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    """sum over the 8 weights of each word of code[index] * x: float32 [R, NB, WB]."""
    if REGISTER_TABLE:
        x01, x23, x45, x67 = _gemv_pairs(x_ptr.to(tl.pointer_type(tl.int32)), k0, k_end, NB, WB, EVEN_K)
        dot = dot8_nf4(words, x01[None, :, :], x23[None, :, :], x45[None, :, :], x67[None, :, :],
                       l0, l1, l2, l3, h0, h1, h2, h3, X_DTYPE)  # fmt: skip
    else:
        dot = tl.zeros(words.shape, tl.float32)
        for p in tl.static_range(8):  # nibble p of every word: inputs 8i + (p ^ 1)
            k = k0 + 8 * word + (p ^ 1)
            if EVEN_K:
                xk = tl.load(x_ptr + k)
            else:
                xk = tl.load(x_ptr + k, mask=k < k_end, other=0.0)
            dot += nibble_values(words, p, code_ptr) * xk.to(tl.float32)[None, :, :]
    return dot


@triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "BS", "NESTED"], do_bench=cold_cache_bench)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "WB": lambda args: min(args["BLOCK_K"], args["BS"]) // 8})  # fmt: skip
@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, map_ptr, offset_ptr, code_ptr, bias_ptr, out_ptr,
    partial_ptr, count_ptr, N, K, K_WORDS,
    BS: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr, REGISTER_TABLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, WB: tl.constexpr,
):  # fmt: skip
    """out [1, N] = x [1, K] @ W^T for W [N, K] in bitsandbytes' layout. Grid: (cdiv(N, BLOCK_N), SPLIT_K).
    K_WORDS = K / 8, a row's words: an argument of its own, so that Triton specializes it as a
    multiple of 16 (K a multiple of 128) and loads a row's words 16 bytes at a time.

    A tile is BLOCK_N rows by BLOCK_K inputs, held as words [BLOCK_N, NB, WB]: NB quantization
    blocks of WB words each (one partial block when blocks are longer than the tile), in their
    loaded layout, never reshuffled (on a GPU a round trip through shared memory). Each block's
    absmax then multiplies its WB word sums at once. REGISTER_TABLE (x fp16 or bf16 on a GPU):
    each word meets its 8 inputs as 4 pairs, the code book in registers (`dot8_nf4`); otherwise
    nibble p of every word is looked up at once and meets the inputs x[8i + (p ^ 1)].

    Pipelining: the next tile's words are loaded before this one is decoded, and the absmax
    are decoded one tile ahead of use from codes loaded two tiles ahead (with double
    quantization, an absmax is two dependent loads after its code). EVEN_K (K a multiple of
    BLOCK_K, set by the heuristic): every tile is whole, so no load needs a mask; the
    prefetches past the slice's end are clamped onto its last tile instead."""
    NB: tl.constexpr = BLOCK_K // (8 * WB)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # rows past N read row N - 1 and are never stored
    word = tl.arange(0, NB)[:, None] * WB + tl.arange(0, WB)[None, :]  # [NB, WB]: word w holds inputs 8w .. 8w + 7
    row_ptr = packed_ptr + rows[:, None, None] * K_WORDS + word[None, :, :]
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # inputs per K slice
    k_start = pid_k * span
    k_end = tl.minimum(K, k_start + span)
    last = K  # prefetches past the slice's end: masked off, or (EVEN_K) clamped onto the last tile
    if EVEN_K:
        last = K - BLOCK_K
    if REGISTER_TABLE:
        l0, l1, l2, l3, h0, h1, h2, h3 = code_registers(code_ptr, X_DTYPE)
    else:  # unused
        l0, l1, l2, l3, h0, h1, h2, h3 = 0, 0, 0, 0, 0, 0, 0, 0

    # acc[n, b, j]: word j of block b of every tile, times its block's absmax; summed at the end
    acc = tl.zeros([BLOCK_N, NB, WB], tl.float32)
    k_first = tl.minimum(k_start, last)
    words = _gemv_words(row_ptr, word, k_first, k_end, BLOCK_K, EVEN_K)
    stats, blocks = _gemv_stats(absmax_ptr, rows, k_first, K, BS, NB)
    scale = block_absmax(stats, blocks, absmax2_ptr, map_ptr, offset_ptr, NESTED, NESTED_BS)
    stats, blocks = _gemv_stats(absmax_ptr, rows, tl.minimum(k_first + BLOCK_K, last), K, BS, NB)
    for k0 in range(k_start, k_end, BLOCK_K):
        next_words = _gemv_words(row_ptr, word, tl.minimum(k0 + BLOCK_K, last), k_end, BLOCK_K, EVEN_K)
        next_scale = block_absmax(stats, blocks, absmax2_ptr, map_ptr, offset_ptr, NESTED, NESTED_BS)
        stats, blocks = _gemv_stats(absmax_ptr, rows, tl.minimum(k0 + 2 * BLOCK_K, last), K, BS, NB)
        dot = _gemv_tile_dot(words, x_ptr, k0, k_end, word, code_ptr, l0, l1, l2, l3, h0, h1, h2, h3, X_DTYPE,
                             REGISTER_TABLE, NB, WB, EVEN_K)  # fmt: skip
        acc += dot * scale[:, :, None]
        words, scale = next_words, next_scale

    partial = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    store_split_k(partial, out_ptr, bias_ptr, partial_ptr, count_ptr, tl.arange(0, 1), offs_n, 1, N, pid_n, pid_k,
                  HAS_BIAS, SPLIT_K)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# GEMM: M >= 2
# ----------------------------------------------------------------------------------------------


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Row blocks no taller than needed, and split K only for small M (kernels/w4a16.py)."""
    M = named_args["M"]
    block_m = max(16, triton.next_power_of_2(M))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= block_m and (c.kwargs["SPLIT_K"] == 1 or M <= GEMM_SPLIT_K_MAX_M)]
    return kept or configs[:1]


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """acc + a @ b on the matrix units; float32 operands at full precision, not tf32."""
    if DOT_DTYPE == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "BS", "NESTED"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
    do_bench=tuning_bench,
)
@triton.jit
def _nf4_gemm_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, map_ptr, offset_ptr, code_ptr, bias_ptr, out_ptr,
    partial_ptr, count_ptr, M, N, K, M_BUCKET,
    BS: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, REGISTER_TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out [M, N] = x [M, K] @ W^T. Grid: (tiles of out, SPLIT_K). M_BUCKET: the autotuner's key.

    As in the GEMV, the words [BLOCK_N, BLOCK_K/8] are never reshuffled: the tile's product is
    the sum of 8 products of BLOCK_K/8 inputs each, weight j of every word (scaled, in
    DOT_DTYPE) times the columns 8i + j of x. REGISTER_TABLE (fp16/bf16 on a GPU): the 8
    weights come from `dequantize8_nf4`; otherwise from `nibble_values` (nibble j ^ 1)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M  # GROUP_M row blocks share weight tiles in L2
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * num_n)) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    m_ok = offs_m < M
    w = tl.arange(0, BLOCK_K // 8)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_end = tl.minimum(K, (pid_k + 1) * span)

    acc = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], tl.float32)
    if REGISTER_TABLE:
        l0, l1, l2, l3, h0, h1, h2, h3 = code_registers(code_ptr, DOT_DTYPE)
    for k0 in range(pid_k * span, k_end, BLOCK_K):
        words, stats, blocks = _weight_tile(packed_ptr, absmax_ptr, rows, k0, K, K, BS, BLOCK_K)
        scale = block_absmax(stats, blocks, absmax2_ptr, map_ptr, offset_ptr, NESTED, NESTED_BS)
        if REGISTER_TABLE:
            ws = dequantize8_nf4(words, scale, l0, l1, l2, l3, h0, h1, h2, h3, DOT_DTYPE)
        for j in tl.static_range(8):  # nibble p = j ^ 1 of every word: inputs 8i + j
            k = k0 + 8 * w + j
            a = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            if REGISTER_TABLE:
                wj = ws[j]
            else:
                wj = (nibble_values(words, j ^ 1, code_ptr) * scale).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_K/8]
            if SWAP_AB:  # out^T [BLOCK_N, BLOCK_M] += W part @ x part^T
                acc = _dot(wj, tl.trans(a.to(DOT_DTYPE)), acc, DOT_DTYPE)
            else:
                acc = _dot(a.to(DOT_DTYPE), tl.trans(wj), acc, DOT_DTYPE)

    if SWAP_AB:
        acc = tl.trans(acc)
    store_split_k(acc, out_ptr, bias_ptr, partial_ptr, count_ptr, offs_m, offs_n, M, N, pid_m * num_n + pid_n, pid_k,
                  HAS_BIAS, SPLIT_K)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Checks and launchers
# ----------------------------------------------------------------------------------------------


class NF4Weight(NamedTuple):
    """What the kernels read of a 4-bit weight, checked (`nf4_weight`). absmax: float32
    [blocks], or uint8 codes [blocks] when nested (absmax2, dynamic_map and offset then set)."""

    packed: torch.Tensor  # uint8, N*K/2 bytes (bitsandbytes: [N*K/2, 1])
    absmax: torch.Tensor
    code: torch.Tensor  # float32 [16]
    shape: tuple[int, ...]
    blocksize: int
    absmax2: torch.Tensor | None = None  # float32 [ceil(blocks / nested_blocksize)]
    dynamic_map: torch.Tensor | None = None  # float32 [256]
    offset: torch.Tensor | None = None  # float32 [1]
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def nf4_weight(packed: torch.Tensor, absmax, **tensors) -> NF4Weight:
    """Check a 4-bit weight given as plain tensors or by a QuantState (`absmax` is then the
    state: bitsandbytes' or reference_impl.nf4's, same fields), and return its NF4Weight.

    Plain tensors: absmax float32 [blocks], or uint8 codes [blocks] with the keywords absmax2
    float32 [ceil(blocks / nested_blocksize)], dynamic_map float32 [256] and offset (a float or
    a one-element tensor); always shape, code float32 [16] and blocksize (a power of two >= 8)."""
    weight = _weight(packed, absmax, **tensors)
    check_device(weight.packed, weight.absmax, weight.code, weight.absmax2, weight.dynamic_map, weight.offset)
    return weight


def _weight(
    packed: torch.Tensor,
    absmax,
    shape=None,
    code: torch.Tensor | None = None,
    blocksize: int | None = None,
    absmax2: torch.Tensor | None = None,
    dynamic_map: torch.Tensor | None = None,
    offset=None,
    nested_blocksize: int = 256,
) -> NF4Weight:
    """`nf4_weight` without the check that a kernel can run on the tensors' device."""
    if not isinstance(absmax, torch.Tensor) and hasattr(absmax, "absmax"):  # a QuantState
        state = absmax
        if state.nested:
            absmax2, dynamic_map = state.state2.absmax, state.state2.code
            offset, nested_blocksize = state.offset, state.state2.blocksize
        absmax, shape, code, blocksize = state.absmax, tuple(state.shape), state.code, state.blocksize
    if shape is None or code is None or blocksize is None:
        raise TypeError("pass a QuantState, or the plain tensors with shape, code and blocksize")
    check_tensor(packed, "packed", (torch.uint8,), dims=None)
    if not isinstance(blocksize, int) or blocksize < 8 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two of at least 8 (bitsandbytes: 64 to 4096), got {blocksize!r}")
    numel = math.prod(shape)
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed holds {packed.numel()} bytes; a weight of shape {tuple(shape)} takes {(numel + 1) // 2}")
    blocks = -(-numel // blocksize)
    nested = absmax2 is not None
    if absmax.dtype == torch.uint8 and not nested:
        raise ValueError("absmax is uint8: double-quantized statistics need absmax2, dynamic_map and offset too")
    check_tensor(absmax, "absmax (uint8 codes)" if nested else "absmax", (torch.uint8,) if nested else (torch.float32,), dims=None)
    if absmax.numel() != blocks:
        raise ValueError(f"absmax must have one entry per block of {blocksize}: {blocks}, got {absmax.numel()}")
    # The code book and dynamic map are tables of the format, shared by every tensor: a state
    # made on CPU may hold them there while its codes live on the GPU.
    code = code.to(packed.device) if isinstance(code, torch.Tensor) else code
    check_tensor(code, "code (the 16-entry code book)", (torch.float32,), dims=1, shape=(16,))
    if nested:
        if dynamic_map is None or offset is None:
            raise ValueError("double quantization needs absmax2, dynamic_map and offset together")
        check_tensor(absmax2, "absmax2", (torch.float32,), dims=1, shape=(-(-blocks // nested_blocksize),))
        dynamic_map = dynamic_map.to(packed.device) if isinstance(dynamic_map, torch.Tensor) else dynamic_map
        check_tensor(dynamic_map, "dynamic_map", (torch.float32,), dims=1, shape=(256,))
        offset = torch.as_tensor(offset, dtype=torch.float32, device=absmax.device).reshape(1)
    return NF4Weight(packed, absmax, code, tuple(shape), blocksize, absmax2, dynamic_map, offset, nested_blocksize)


def state_to(state: QuantState, device) -> QuantState:
    """reference_impl.nf4's QuantState with every tensor on `device` (the twin quantizes on CPU;
    the kernels run where the weight will be used)."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    fields = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in fields.items()}
    if state.state2 is not None:
        fields["state2"] = state_to(state.state2, device)
    return dataclasses.replace(state, **fields)


def _pointers(weight: NF4Weight) -> tuple:
    """The kernels' statistics pointers; without double quantization absmax stands in for the rest."""
    if weight.nested:
        return weight.absmax, weight.absmax2, weight.dynamic_map, weight.offset
    return weight.absmax, weight.absmax, weight.absmax, weight.absmax


def dequantize_nf4(packed: torch.Tensor, absmax, dtype: torch.dtype | None = None, **tensors) -> torch.Tensor:
    """W = code[index] * absmax[block], unpacked to its shape: bitsandbytes' dequantize_4bit.

    `absmax`: a QuantState, or the float32 absmax (uint8 codes when nested) with the rest as
    keywords of `nf4_weight`: shape, code, blocksize (and absmax2, dynamic_map, offset).
    dtype: of the result; by default the state's, float32 for plain tensors. Any shape, any
    number of elements. Twin: reference_impl.nf4.dequantize_4bit.
    """
    weight = nf4_weight(packed, absmax, **tensors)
    dtype = dtype or (torch.float32 if isinstance(absmax, torch.Tensor) else absmax.dtype)
    if dtype not in FLOATS:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    out = torch.empty(weight.shape, dtype=dtype, device=packed.device)
    n = out.numel()
    if n == 0:
        return out
    row_bytes = min(weight.blocksize // 2, 16 if interpreting() else 128)  # a row of the tile: in one block
    rows = (64 if interpreting() else 4096) // row_bytes
    grid = (triton.cdiv(triton.cdiv(n, 2), rows * row_bytes),)
    # No fused multiply-add: the nested absmax is map * absmax2 + offset rounded twice, as in torch.
    options = {} if interpreting() else {"enable_fp_fusion": False}
    _dequantize_kernel[grid](
        weight.packed, *_pointers(weight), weight.code, out, n, BS=weight.blocksize, NESTED=weight.nested,
        NESTED_BS=weight.nested_blocksize, ROWS=rows, BYTES=row_bytes, **options,
    )  # fmt: skip
    return out


def _check_matmul(x, packed, absmax, bias, tensors) -> tuple[NF4Weight, torch.Tensor]:
    """The checked weight and the packed bytes as int32 words [N * K / 8]."""
    weight = nf4_weight(packed, absmax, **tensors)
    if len(weight.shape) != 2:
        raise ValueError(f"the matmul takes a Linear weight [N, K]; this one has shape {weight.shape}")
    N, K = weight.shape
    if K % weight.blocksize:
        raise ValueError(
            f"in_features K = {K} is not a multiple of blocksize {weight.blocksize}: a block of the fused "
            "kernels must not straddle two rows of W. Quantize with a blocksize that divides K, or "
            "multiply by dequantize_nf4(...) instead."
        )
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOATS:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] with K = {K} (the weight's in_features), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x is not contiguous: the kernels index its rows by their length. Pass x.contiguous().")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (N,) or bias.dtype not in FLOATS):
        raise ValueError(f"bias must be a float tensor of shape ({N},), got {getattr(bias, 'dtype', type(bias).__name__)} "
                         f"{tuple(getattr(bias, 'shape', ()))}")  # fmt: skip
    check_device(x, weight.packed, bias)
    if weight.packed.data_ptr() % 4:
        raise ValueError("packed must start at a 4-byte boundary (the kernels read it as int32 words): pass packed.clone()")
    return weight, weight.packed.reshape(-1).view(torch.int32)


X_ARG, OUT_ARG = 0, 8  # where x and out are among the matmul kernels' arguments (for a Relaunch)


def _launch(kernel, grid, x, out, words, weight, bias, cpu_config, sizes, constants, relaunchable=False):
    """Both matmul kernels take the same pointers and flags; None tensors get a stand-in pointer.
    relaunchable: return a `Relaunch` of this launch (on a GPU; else None)."""
    M, N = out.shape
    if interpreting():
        max_split = cpu_config["SPLIT_K"]
    else:
        max_split = max(c.kwargs["SPLIT_K"] for c in kernel.configs) if M <= GEMM_SPLIT_K_MAX_M else 1
    partial, count = split_k_workspace(out.device, max_split * M * N, triton.cdiv(M, MIN_TILE) * triton.cdiv(N, MIN_TILE))
    return launch(
        kernel, grid, x, words, *_pointers(weight), weight.code, out if bias is None else bias, out, partial, count,
        *sizes, BS=weight.blocksize, NESTED=weight.nested, NESTED_BS=weight.nested_blocksize,
        HAS_BIAS=bias is not None, cpu_config=cpu_config, relaunchable=relaunchable, **constants,
    )  # fmt: skip


def register_table(x: torch.Tensor) -> bool:
    """Whether the kernels keep the code book in registers for these activations (section above):
    fp16 or bf16 on a GPU, 4-byte aligned (read as pairs)."""
    return TABLE_IN_REGISTERS and not interpreting() and x.dtype in (torch.float16, torch.bfloat16) and x.data_ptr() % 4 == 0


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax, bias: torch.Tensor | None = None, **tensors) -> torch.Tensor:
    """The M = 1 path of `nf4_matmul` (same arguments); x: [1, K] or [K]."""
    return _gemv(x, packed, absmax, bias, tensors)[0]


def _gemv(x, packed, absmax, bias, tensors, relaunchable=False) -> tuple[torch.Tensor, "Relaunch | None"]:
    """`nf4_gemv`, and with `relaunchable` (on a GPU) a Relaunch of it: x at X_ARG, out [1, N] at OUT_ARG."""
    weight, words = _check_matmul(x, packed, absmax, bias, tensors)
    N, K = weight.shape
    if x.numel() != K:
        raise ValueError(f"the GEMV path takes one row of K = {K} inputs, got x of shape {tuple(x.shape)}")
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    relaunch = _launch(_nf4_gemv_kernel, grid, x, out, words, weight, bias, GEMV_CPU, (N, K, K // 8),
                       {"X_DTYPE": DOT_DTYPES[x.dtype], "REGISTER_TABLE": register_table(x)}, relaunchable)  # fmt: skip
    return out.reshape(*x.shape[:-1], N), relaunch


def nf4_gemm(x: torch.Tensor, packed: torch.Tensor, absmax, bias: torch.Tensor | None = None, **tensors) -> torch.Tensor:
    """The M >= 2 path of `nf4_matmul` (same arguments); also right, if slower, at M = 1."""
    weight, words = _check_matmul(x, packed, absmax, bias, tensors)
    N, K = weight.shape
    X = x.reshape(-1, K)
    M = X.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    # bfloat16 products do not run in the interpreter (numpy has no bfloat16): it multiplies in float32.
    dot_dtype = tl.float32 if interpreting() and x.dtype == torch.bfloat16 else DOT_DTYPES[x.dtype]

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    cpu_config = {**GEMM_CPU, "SWAP_AB": M <= 16}  # the interpreter runs both orientations in the tests
    _launch(_nf4_gemm_kernel, grid, X, out, words, weight, bias, cpu_config, (M, N, K, triton.next_power_of_2(M)),
            {"DOT_DTYPE": dot_dtype, "REGISTER_TABLE": register_table(x)})  # fmt: skip
    return out.reshape(*x.shape[:-1], N)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax, bias: torch.Tensor | None = None, **tensors) -> torch.Tensor:
    """Y = x @ W^T (+ bias) with W in bitsandbytes' 4-bit layout (NF4 or FP4).

    x: [..., K] float16/bfloat16/float32, contiguous. `absmax`: a QuantState (bitsandbytes' or
    reference_impl.nf4's), or plain tensors: absmax with shape=(N, K), code, blocksize and, for
    double quantization, absmax2, dynamic_map, offset as keywords (`nf4_weight`). K must be a
    multiple of blocksize. bias: [N] or None. Returns [..., N] in x's dtype.
    Twin: reference_impl.nf4.matmul_4bit(x, packed, state, bias).

    One row takes the fused GEMV. More rows take the fused GEMM under the interpreter and with
    FUSED_GEMM set; otherwise W is dequantized once, in x's dtype, and multiplied by cuBLAS,
    as bitsandbytes does: on an H100 that was faster than the fused GEMM at every M from 2 to
    256 (module doc).
    """
    rows = x.numel() // max(x.shape[-1], 1) if isinstance(x, torch.Tensor) and x.dim() else 0
    if rows == 1:
        return nf4_gemv(x, packed, absmax, bias, **tensors)
    if FUSED_GEMM or interpreting():
        return nf4_gemm(x, packed, absmax, bias, **tensors)
    _check_matmul(x, packed, absmax, bias, tensors)
    W = dequantize_nf4(packed, absmax, x.dtype, **tensors)
    return F.linear(x, W, None if bias is None else bias.to(x.dtype))


class TritonLinear4bit(nn.Module):
    """A Linear stored in bitsandbytes' 4-bit layout (NF4 or FP4, double-quantized or not), its
    forward pass on the Triton kernels: QLoRA's frozen base layer.

    Buffers: packed [N*K/2, 1] uint8, absmax [N*K/blocksize] (float32, or uint8 codes when
    nested, with absmax2, dynamic_map and offset), code [16] float32, bias [N] or None. Unlike
    reference_impl.nf4.Linear4bit, no dequantized copy of the weight is kept. Plugs into
    `replace_linears`: `replace_linears(model, lambda name, lin: TritonLinear4bit.from_linear(lin))`.

    One row on a GPU (a token being generated) takes the GEMV, checked and dispatched through
    Triton once per kind of input (dtype, device, alignment) and relaunched directly afterwards
    (`kernels.common.Relaunch`): the per-call cost that decides small layers (per_call.md).
    """

    def __init__(self, packed: torch.Tensor, state, bias: torch.Tensor | None = None):
        super().__init__()
        weight = _weight(packed, state)  # made on CPU, a GPU model's layers reach the GPU later
        if len(weight.shape) != 2 or weight.shape[1] % weight.blocksize:
            raise ValueError(
                f"a Linear weight [N, K] with K a multiple of blocksize {weight.blocksize} is needed, got shape "
                f"{weight.shape}; quantize with a blocksize that divides in_features"
            )
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.nested_blocksize = weight.blocksize, weight.nested_blocksize
        self.quant_type = getattr(state, "quant_type", None)
        for name in ("packed", "absmax", "code", "absmax2", "dynamic_map", "offset"):
            self.register_buffer(name, getattr(weight, name))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._relaunches: dict = {}  # (x dtype, device index, address mod 16) -> (Relaunch of the GEMV, an output)
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = True
    ) -> "TritonLinear4bit":
        """Quantize a float Linear by reference_impl.nf4.quantize_4bit (bitsandbytes' bytes)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear to quantize, got {type(linear).__name__}")
        if linear.in_features % blocksize:
            raise ValueError(
                f"in_features = {linear.in_features} is not a multiple of blocksize {blocksize}: the fused kernels "
                "need whole blocks in every row of W. Try blocksize=64 or 32."
            )
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, compress_statistics)
        return cls(packed, state, linear.bias)

    def _tensors(self) -> dict:
        return {"shape": (self.out_features, self.in_features), "code": self.code, "blocksize": self.blocksize,
                "absmax2": self.absmax2, "dynamic_map": self.dynamic_map, "offset": self.offset,
                "nested_blocksize": self.nested_blocksize}  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        x = x.contiguous()
        if x.is_cuda and x.numel() == self.in_features and x.dim():
            return self._one_row(x)
        return nf4_matmul(x, self.packed, self.absmax, self.bias, **self._tensors())

    def _one_row(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMV on a GPU: the first call of each kind of x is checked and launched by
        `nf4_gemv`; later ones relaunch it."""
        key = (x.dtype, x.get_device(), x.data_ptr() % 16)
        if key not in self._relaunches:
            out, relaunch = _gemv(x, self.packed, self.absmax, self.bias, self._tensors(), relaunchable=True)
            self._relaunches[key] = (relaunch, out.reshape(1, self.out_features))
            return out
        relaunch, like = self._relaunches[key]
        out = torch.empty_like(like)  # [1, N]: cheaper to make than by shape, dtype and device
        relaunch((X_ARG, x), (OUT_ARG, out))
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def __setattr__(self, name: str, value) -> None:
        """Relaunches read the buffers they were made with: replacing one drops them."""
        if name in self.__dict__.get("_buffers", ()):
            self.__dict__["_relaunches"] = {}
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.cuda()`, `.half()` ... replace the buffers too."""
        self.__dict__["_relaunches"] = {}
        return super()._apply(fn, *args, **kwargs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out_features, in_features] as the kernels see it."""
        return dequantize_nf4(self.packed, self.absmax, dtype, **self._tensors())

    def storage_bits(self) -> int:
        """Packed codes and statistics, as reference_impl.nf4.storage_bits counts them (the code
        book and dynamic map are tables of the format, not counted); the bias is not counted."""
        state = QuantState(self.absmax, offset=self.offset, state2=None if self.absmax2 is None else QuantState(self.absmax2))
        return storage_bits(self.packed, state)

    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        dq = ", double quant" if self.absmax2 is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type} block {self.blocksize}{dq}"
