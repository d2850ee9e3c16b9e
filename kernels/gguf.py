"""GGUF Q4_0 and Q8_0 in Triton: a matrix-vector product that reads llama.cpp's blocks as they
are stored, and decodes them in registers.

llama.cpp stores a weight W [N, K] row by row in blocks of 32 consecutive weights of a row, each
block a float16 scale d followed by the codes:

    Q4_0, 18 bytes: d, then 16 bytes; byte j holds element j in its low nibble and element
          j + 16 in its high nibble; W = d * (q - 8), q in 0..15 (4.5 bits per weight).
    Q8_0, 34 bytes: d, then 32 int8 codes in order; W = d * q (8.5 bits per weight).

So the tensor is uint8 [N, K/32 * 18] (or * 34), exactly what `reference_impl.gguf.quantize`
(and llama.cpp's `gguf.quants.quantize`) returns and a GGUF file holds. K must be a multiple of
32: a block never straddles two rows.

Reading 18-byte blocks. A block starts at a multiple of 18 (34) bytes: only 2-byte aligned. A
4-byte load of the codes would straddle blocks and need a different shift for every
position, so the kernels read the weight as 16-bit halfwords: halfword 0 of a block is d, and
halfwords 1 .. 8 (Q4_0) or 1 .. 16 (Q8_0) the codes, two bytes each. Every halfword is aligned,
and there are half as many load instructions as with byte loads. A tile of BLOCK_B blocks of
BLOCK_N rows is held flattened, [BLOCK_N, BLOCK_B * 8] (Q4_0): column f is code halfword f % 8
of block f // 8, so neighbouring threads read neighbouring halfwords (a warp covers four Q4_0
blocks, 72 consecutive bytes) and each thread keeps its column for several rows, which share
its x values. Halfword i of a Q4_0 block holds four codes: elements 2i (bits 0..3), 2i + 16
(bits 4..7), 2i + 1 (bits 8..11) and 2i + 17 (bits 12..15); of a Q8_0 block two: elements 2i
(low byte) and 2i + 1 (high byte).

Decoding without shifts (the trick of kernels/w4a16.py's float32 path). A code c kept in place
at bit position 4p (Q4_0) or 8p (Q8_0) among the bits of the float 2^23 reads as the float
2^23 + c * 16^p (or c * 256^p): 2^23's mantissa counts units. So each halfword is OR-ed once with
the bits of 2^23, and each of its codes is then one AND away from being a float; subtracting
2^23 + 8 * 16^p leaves (q - 8) * 16^p exactly, and multiplying by x * 16^-p (x scaled once per
tile, shared by the rows) gives (q - 8) * x: an AND, a subtraction and a multiply-add per
weight. Q8_0's halfwords also get an XOR with 0x8080, which maps each signed byte q in
-128..127 to q + 128 in 0..255. Each halfword's products are summed, then multiplied by its
block's d (once per halfword, not per weight); the columns are summed at the end. Compiled for
an H100 (sm_90), the loops spend about 6 (Q4_0) and 9 (Q8_0) instructions per weight in the
leanest configurations (counted in their SASS), where reading at full bandwidth leaves an SM
about 5.5 and 10.5: Q4_0 is at the edge of being limited by instruction issue, not memory.

Kernels:

- GEMV (M = 1, generating one token): each program takes BLOCK_N rows of W and a slice of the
  blocks of K (split-K: SPLIT_K slices, their partial sums added by the last program to arrive,
  `store_split_k` of kernels/w4a16.py: deterministic, one launch). The next tile's halfwords are
  loaded before the current tile is decoded, so memory keeps working while the ALUs do. Rows
  past N are clamped to the last row (their output is not stored); blocks past a slice's end
  are not read (when K is whole tiles of every slice, `EVEN_K`, one condition covers the tile).
- Small M: the same kernel with one program per row of x (grid axis 0, so the programs of one
  weight tile are launched side by side, and the tile one of them brings from memory is
  likely still in the L2 cache for the others). Decoding is repeated per row, so from
  DEQUANTIZE_MIN_M rows on W is dequantized once (`dequantize_gguf`) and cuBLAS multiplies (one
  of llama.cpp's paths for prompts).
- `dequantize_gguf`: W back to float32/float16/bfloat16, bit for bit `reference_impl.gguf.dequantize`
  (d * (q - 8) and d * q are exact in float32).

Float results differ from the dequantized product by summation order only (float32
accumulation). Twin: `reference_impl.gguf` (numpy, bit-exact with llama.cpp), held against
llama.cpp's own gguf-py as well in tests/test_kernels_gguf.py. Speed on an H100 against fp16
cuBLAS: benchmarks/kernels.py.
"""

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from .common import check_device, check_tensor, interpreting, launch, tuning_bench
from .quantize import FLOATS
from .w4a16 import split_k_workspace, store_split_k

BLOCK = 32  # weights per GGUF block
FORMATS = {"Q4_0": 18, "Q8_0": 34}  # bytes per block
# From this many rows of x on, dequantize W once and call cuBLAS (on a GPU). An estimate, not yet
# a measurement: the compiled Q4_0 GEMV spends about 6 instructions per weight (module doc), so
# each extra row of an 8192 x 8192 weight costs about 14 us of an H100's issue slots, while
# dequantizing (read 38 MB, write 134 MB) and cuBLAS at small M take about 110 us together.
DEQUANTIZE_MIN_M = 8

# GEMV: (BLOCK_N rows, BLOCK_B blocks of 32 inputs, SPLIT_K, num_warps). Chosen from the code
# compiled for sm_90 (triton 3.6), not yet timed: the more rows a thread holds, the fewer
# instructions per weight (64 rows x 2 blocks on 2 warps: 6.0 for Q4_0, 9.2 for Q8_0; 16 x 8
# blocks on 4 warps: 8.4 and 11.2) and the more registers (up to 128 a thread for Q4_0, 254 for
# Q8_0, none spilled). The autotuner picks one per shape.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_B": b, "SPLIT_K": s}, num_warps=w)
    for n, b, s, w in [
        (64, 2, 4, 2),
        (64, 2, 8, 2),
        (128, 2, 4, 4),
        (64, 4, 2, 4),
        (64, 4, 4, 4),
        (128, 4, 2, 8),
        (32, 4, 4, 4),
        (32, 8, 2, 4),
        (16, 8, 8, 4),
    ]
]
GEMV_CPU = {"BLOCK_N": 8, "BLOCK_B": 2, "SPLIT_K": 2}
MIN_BLOCK_N = min(c["BLOCK_N"] for c in [GEMV_CPU] + [c.kwargs for c in GEMV_CONFIGS])  # sizes the split-K counters
DEQUANTIZE_TILE = {"BLOCK_N": 16, "BLOCK_B": 8}  # dequantize_gguf (the interpreter: 4 x 2)


def _format(qtype: str) -> tuple[int, bool]:
    """(bytes per block, whether it is Q8_0) of a format name."""
    name = str(qtype).upper()
    if name not in FORMATS:
        raise ValueError(f"the kernels read GGUF Q4_0 and Q8_0 blocks, got qtype={qtype!r}")
    return FORMATS[name], name == "Q8_0"


@triton.jit
def _biased(codes, Q8: tl.constexpr):
    """Code halfwords (int32, sign-extended) with the bits of 2^23 set (and, for Q8_0, the sign
    bit of each byte flipped: q + 128), once per halfword; `_code_times_x` then masks one code."""
    if Q8:
        return (codes ^ 0x8080) | 0x4B000000
    return codes | 0x4B000000


@triton.jit
def _code_times_x(biased, x, p: tl.constexpr, Q8: tl.constexpr):
    """(q - 8) * x (Q4_0) or q * x (Q8_0) for the code at position p of each halfword, float32,
    from the halfwords' bits `_biased` made; x was scaled by 16^-p (256^-p) to match (module doc)."""
    if Q8:
        bits = biased & (0x4B000000 | (0xFF << (8 * p)))  # 2^23 + (q + 128) * 256^p
        value = bits.to(tl.float32, bitcast=True) - (8388608.0 + 128.0 * (1 << (8 * p)))
    else:
        bits = biased & (0x4B000000 | (0xF << (4 * p)))  # 2^23 + q * 16^p
        value = bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (1 << (4 * p)))
    return value * x


@triton.jit
def _tile_loads(row_ptrs, b0, live, ZERO_DEAD: tl.constexpr, Q8: tl.constexpr, HALVES: tl.constexpr,
                CODE_HALVES: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    """Loads of blocks b0 .. b0 + BLOCK_B - 1 of the rows starting at row_ptrs [R] (uint16
    pointers), flattened: column f of the tile is code halfword f % CODE_HALVES of block
    b0 + f // CODE_HALVES. Returns that block's d [R, F] float32 and the halfwords [R, F] int32
    as `_biased` makes them. live [F] or [1]: which columns to read; with ZERO_DEAD the others
    read as 0 (a zero d: they add nothing), else they are left undefined (never used)."""
    f = tl.arange(0, BLOCK_B * CODE_HALVES)
    start = (b0 + f // CODE_HALVES) * HALVES  # halfword 0 (d) of each column's block
    ptrs = row_ptrs[:, None] + start[None, :]
    if ZERO_DEAD:
        d = tl.load(ptrs, mask=live[None, :], other=0)
        codes = tl.load(ptrs + 1 + (f % CODE_HALVES)[None, :], mask=live[None, :], other=0)
    else:
        d = tl.load(ptrs, mask=live[None, :])
        codes = tl.load(ptrs + 1 + (f % CODE_HALVES)[None, :], mask=live[None, :])
    d = d.to(tl.float16, bitcast=True).to(tl.float32)
    return d, _biased(codes.to(tl.int32), Q8)


@triton.jit
def _x_at(x_tile, element, live, p: tl.constexpr, Q8: tl.constexpr):
    """x at `element` [F] (offsets from x_tile) scaled by 16^-p (256^-p): [1, F] float32, 0 where
    not live."""
    x = tl.load(x_tile + element, mask=live, other=0.0).to(tl.float32)
    return (x * (1.0 / (1 << (8 * p if Q8 else 4 * p))))[None, :]


@triton.autotune(configs=GEMV_CONFIGS, key=["M", "N", "K", "Q8"], do_bench=tuning_bench)
@triton.heuristics({"EVEN_K": lambda args: (args["K"] // 32) % (args["BLOCK_B"] * args["SPLIT_K"]) == 0})
@triton.jit
def _gguf_gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, count_ptr, M, N, K,
    Q8: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):  # fmt: skip
    """out [M, N] = x [M, K] @ W^T, W as GGUF blocks (uint8 [N, K/32 * 2 * HALVES], read as
    uint16 halfwords). Grid: (M, cdiv(N, BLOCK_N), SPLIT_K); one row of x per program.

    EVEN_K (set by the heuristic): every K slice is whole tiles of blocks, so only the prefetch
    past a slice's end needs a condition, one for the whole tile instead of one per block."""
    HALVES: tl.constexpr = 17 if Q8 else 9
    CODE_HALVES: tl.constexpr = 16 if Q8 else 8
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)  # past N: a valid row, its output not stored
    blocks_per_row = K // 32
    row_ptrs = w_ptr.to(tl.pointer_type(tl.uint16)) + rows.to(tl.int64) * (blocks_per_row * HALVES)
    span = tl.cdiv(tl.cdiv(blocks_per_row, BLOCK_B), SPLIT_K) * BLOCK_B  # blocks per K slice
    b_start = pid_k * span
    b_end = tl.minimum(blocks_per_row, b_start + span)
    x_row = x_ptr + pid_m.to(tl.int64) * K
    F: tl.constexpr = BLOCK_B * CODE_HALVES
    f = tl.arange(0, F)
    first = f // CODE_HALVES * 32 + 2 * (f % CODE_HALVES)  # x offset of the halfword's first element

    acc = tl.zeros([BLOCK_N, F], tl.float32)
    if EVEN_K:
        live = tl.full([1], 1, tl.int1) & (b_start < b_end)
    else:
        live = b_start + f // CODE_HALVES < b_end
    d, codes = _tile_loads(row_ptrs, b_start, live, not EVEN_K, Q8, HALVES, CODE_HALVES, BLOCK_B)
    for b0 in range(b_start, b_end, BLOCK_B):
        # Prefetch: the next tile's loads are issued before this one is decoded.
        if EVEN_K:
            next_live = tl.full([1], 1, tl.int1) & (b0 + BLOCK_B < b_end)
        else:
            next_live = b0 + BLOCK_B + f // CODE_HALVES < b_end
        next_d, next_codes = _tile_loads(row_ptrs, b0 + BLOCK_B, next_live, not EVEN_K, Q8, HALVES, CODE_HALVES,
                                         BLOCK_B)  # fmt: skip
        x_tile = x_row + b0 * 32
        if Q8:  # halfword i: elements 2i, 2i + 1
            s = _code_times_x(codes, _x_at(x_tile, first, live, 0, Q8), 0, Q8)
            s += _code_times_x(codes, _x_at(x_tile, first + 1, live, 1, Q8), 1, Q8)
        else:  # halfword i: elements 2i, 2i + 16, 2i + 1, 2i + 17
            s = _code_times_x(codes, _x_at(x_tile, first, live, 0, Q8), 0, Q8)
            s += _code_times_x(codes, _x_at(x_tile, first + 16, live, 1, Q8), 1, Q8)
            s += _code_times_x(codes, _x_at(x_tile, first + 1, live, 2, Q8), 2, Q8)
            s += _code_times_x(codes, _x_at(x_tile, first + 17, live, 3, Q8), 3, Q8)
        acc += s * d
        d, codes, live = next_d, next_codes, next_live

    partial = tl.sum(acc, axis=1)[None, :]
    store_split_k(partial, out_ptr, bias_ptr, partial_ptr, count_ptr, pid_m + tl.arange(0, 1), offs_n, M, N,
                  pid_m * tl.cdiv(N, BLOCK_N) + pid_n, pid_k, HAS_BIAS, SPLIT_K)  # fmt: skip


@triton.jit
def _dequantize_kernel(w_ptr, out_ptr, N, K, Q8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """out [N, K] = W in out's dtype. Grid: (cdiv(N, BLOCK_N), cdiv(K / 32, BLOCK_B))."""
    HALVES: tl.constexpr = 17 if Q8 else 9
    CODE_HALVES: tl.constexpr = 16 if Q8 else 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    blocks = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    blocks_per_row = K // 32
    rows = tl.minimum(offs_n, N - 1)  # past N: a valid row, not stored
    row_ptrs = w_ptr.to(tl.pointer_type(tl.uint16)) + rows.to(tl.int64) * (blocks_per_row * HALVES)
    live = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B * CODE_HALVES) // CODE_HALVES < blocks_per_row
    d, codes = _tile_loads(row_ptrs, tl.program_id(1) * BLOCK_B, live, True, Q8, HALVES, CODE_HALVES, BLOCK_B)
    d = tl.reshape(d, (BLOCK_N, BLOCK_B, CODE_HALVES))
    codes = tl.reshape(codes, (BLOCK_N, BLOCK_B, CODE_HALVES))
    one = tl.full([1, 1, 1], 1.0, tl.float32)
    if Q8:  # elements 2i, 2i + 1 of halfword i: join and flatten gives the natural order
        values = tl.join(_code_times_x(codes, one, 0, Q8) * d, _code_times_x(codes, one / 256, 1, Q8) * d)
    else:  # elements 0..15 from positions 0 and 2, elements 16..31 from positions 1 and 3
        low = tl.join(_code_times_x(codes, one, 0, Q8) * d, _code_times_x(codes, one / 256, 2, Q8) * d)
        high = tl.join(_code_times_x(codes, one / 16, 1, Q8) * d, _code_times_x(codes, one / 4096, 3, Q8) * d)
        values = tl.permute(tl.join(tl.reshape(low, (BLOCK_N, BLOCK_B, 16)), tl.reshape(high, (BLOCK_N, BLOCK_B, 16))),
                            (0, 1, 3, 2))  # fmt: skip
    values = tl.reshape(values, (BLOCK_N, BLOCK_B, 32))
    k = blocks[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]
    mask = (offs_n < N)[:, None, None] & (blocks < blocks_per_row)[None, :, None]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None, None] * K + k, values.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def gguf_weight(blocks: torch.Tensor, qtype: str) -> tuple[int, int, bool]:
    """Check GGUF blocks uint8 [N, K/32 * bytes per block]: returns N, K and whether Q8_0."""
    block_bytes, q8 = _format(qtype)
    check_tensor(blocks, f"{qtype} blocks", (torch.uint8,), dims=2)
    N, row_bytes = blocks.shape
    if row_bytes == 0 or row_bytes % block_bytes:
        raise ValueError(
            f"a row of {qtype} blocks is a whole number of {block_bytes}-byte blocks (32 weights each); got rows of "
            f"{row_bytes} bytes. A weight [N, K] with K % 32 == 0 takes uint8 [N, K/32 * {block_bytes}]."
        )
    if blocks.data_ptr() % 2:
        raise ValueError("the blocks must start at an even address (they are read as 16-bit halfwords): pass .clone()")
    return N, row_bytes // block_bytes * BLOCK, q8


def _check_x(x, K, N, bias):
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOATS:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] with K = {K} (32 x blocks per row), got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x is not contiguous: the kernels index its rows by their length. Pass x.contiguous().")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (N,) or bias.dtype not in FLOATS):
        got = f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}"
        raise ValueError(f"bias must be a float tensor of shape ({N},), got {got}")


def gguf_gemv(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = x @ W^T (+ bias) by the fused kernel, one program row per row of x (the M = 1 path
    of `gguf_matmul`, and its small-M path). x: [..., K] float, contiguous; blocks: uint8
    [N, K/32 * 18] (Q4_0) or [N, K/32 * 34] (Q8_0); bias [N] or None. Returns [..., N] in x's dtype."""
    N, K, q8 = gguf_weight(blocks, qtype)
    _check_x(x, K, N, bias)
    check_device(x, blocks, bias)
    X = x.reshape(-1, K)
    M = X.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out.reshape(*x.shape[:-1], N)
    max_split = GEMV_CPU["SPLIT_K"] if interpreting() else max(c.kwargs["SPLIT_K"] for c in GEMV_CONFIGS)
    partial, count = split_k_workspace(x.device, max_split * M * N, M * triton.cdiv(N, MIN_BLOCK_N))
    grid = lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    launch(_gguf_gemv_kernel, grid, X, blocks, out if bias is None else bias, out, partial, count, M, N, K,
           Q8=q8, HAS_BIAS=bias is not None, cpu_config=GEMV_CPU)  # fmt: skip
    return out.reshape(*x.shape[:-1], N)


def dequantize_gguf(blocks: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in `dtype` from GGUF blocks uint8 [N, K/32 * 18] (Q4_0) or [N, K/32 * 34] (Q8_0):
    bit for bit `reference_impl.gguf.dequantize` in float32 (rounded once to float16/bfloat16)."""
    N, K, q8 = gguf_weight(blocks, qtype)
    if dtype not in FLOATS:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    check_device(blocks)
    out = torch.empty(N, K, dtype=dtype, device=blocks.device)
    tile = {"BLOCK_N": 4, "BLOCK_B": 2} if interpreting() else DEQUANTIZE_TILE
    if out.numel():
        grid = (triton.cdiv(N, tile["BLOCK_N"]), triton.cdiv(K // BLOCK, tile["BLOCK_B"]))
        _dequantize_kernel[grid](blocks, out, N, K, Q8=q8, **tile)
    return out


def gguf_matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = x @ W^T (+ bias) with W [N, K] stored as GGUF Q4_0 or Q8_0 blocks (uint8 [N, K/32 * 18]
    or [N, K/32 * 34], as `reference_impl.gguf.quantize` returns and a GGUF file holds).

    x: [..., K] float16/bfloat16/float32, contiguous; bias [N] or None. Fewer than
    DEQUANTIZE_MIN_M rows (and every M under the interpreter) take the fused kernel; more rows on
    a GPU dequantize W once, in x's dtype, and call cuBLAS. Returns [..., N] in x's dtype.
    Twin: x @ reference_impl.gguf.dequantize(blocks, qtype).T.
    """
    rows = x.numel() // max(x.shape[-1], 1) if isinstance(x, torch.Tensor) and x.dim() else 0
    if rows < DEQUANTIZE_MIN_M or interpreting():
        return gguf_gemv(x, blocks, qtype, bias)
    N, K, _ = gguf_weight(blocks, qtype)
    _check_x(x, K, N, bias)
    check_device(x, blocks, bias)
    return F.linear(x, dequantize_gguf(blocks, qtype, x.dtype), None if bias is None else bias.to(x.dtype))


def pack_blocks(d: torch.Tensor, codes: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF blocks uint8 [N, K/32 * bytes] from scales d [N, K/32] (rounded to float16) and codes
    [N, K]: Q4_0 integers 0..15 (W = d * (q - 8)), Q8_0 integers -128..127 (W = d * q).
    Plain torch on any device: how the benchmark builds large weights on the GPU."""
    block_bytes, q8 = _format(qtype)
    N, K = codes.shape
    if K % BLOCK or tuple(d.shape) != (N, K // BLOCK):
        raise ValueError(
            f"codes [N, K] with K % 32 == 0 and d [N, K/32] are needed, got {tuple(codes.shape)} and {tuple(d.shape)}"
        )
    q = codes.reshape(N, K // BLOCK, BLOCK).to(torch.int16)
    if q8:
        body = q.to(torch.int8).view(torch.uint8)
    else:
        body = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)  # byte j: element j low, j + 16 high
    scale = d.to(torch.float16).contiguous().view(torch.uint8).reshape(N, K // BLOCK, 2)  # little-endian
    return torch.cat([scale, body], dim=-1).reshape(N, K // BLOCK * block_bytes)
