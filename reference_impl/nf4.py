"""NF4, FP4 and double quantization: bitsandbytes' 4-bit weights (QLoRA), byte for byte.

A 4-bit code book is a table of 16 real values in [-1, 1]; a code is an index into it. A weight
tensor is flattened and cut into blocks of `blocksize` consecutive values (64 by default; the
last block may be shorter). Each block is divided by its largest magnitude, its absmax, and every
value becomes the index of the nearest table entry:

    codes[i] = argmin_j | w[i] / absmax[b] - code[j] |        w_hat[i] = code[codes[i]] * absmax[b]

The three formats differ only in where the 16 values sit:

- INT4 absmax: evenly spaced, k / 7 for k = -7..7 (affine.py's symmetric grid; `int4_absmax`).
- FP4: bitsandbytes' 4-bit float, magnitudes 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1: dense near 0,
  sparse near the ends (formats.FP4_CODEBOOK).
- NF4 (NormalFloat): quantiles of the standard normal distribution, so that each code is used
  equally often when the weights of a block are normally distributed, which trained weights
  roughly are. Eight positive and seven negative quantiles plus an exact zero spend all 16 codes.

Storage: the codes are packed two per byte, the first element of each pair in the HIGH nibble
(packing.pack_nibbles_bnb), into a uint8 tensor of shape [ceil(n/2), 1]. Each block also keeps
its absmax as float32: 32/64 = 0.5 bits per weight on top of the 4, an eighth of the total.

Double quantization (QLoRA's "compress_statistics") shrinks that eighth. The absmax values of a
tensor are all positive and similar, so:

    offset = mean(absmax)                                    one float32 per tensor
    codes2, absmax2 = blockwise 8-bit quantization of (absmax - offset), blocks of 256,
                      with the signed 8-bit dynamic map      one uint8 per block of weights,
                                                             one float32 per 256 blocks

Subtracting the mean centres the values so that both halves of the signed map are used. Bits per
weight, for blocksize B = 64 and nested blocksize B2 = 256:

    without:  4 + 32/B               = 4 + 0.5                    = 4.5
    with:     4 + 8/B + 32/(B * B2)  = 4 + 0.125 + 0.00195...     = 4.127

(plus the one float32 offset per tensor, nothing per weight). `bits_per_weight` computes it.

What bitsandbytes 0.50.2 does on CPU, which these functions reproduce byte for byte:

- 4-bit (torch code in bnb's "default" backend): full blocks are multiplied by the float32
  reciprocal 1/absmax, the short last block is divided by its absmax; clamp to [-1, 1]; the
  code is found by comparing with the midpoints between neighbouring sorted code values (a value
  exactly on a midpoint takes the lower code). An odd count is padded with one 0.0 before
  packing. An all-zero block stores absmax 0, a short all-zero last block 1e-38.
- FP4 holds zero twice (patterns 0000 and 1000, the "negative zero"). The midpoint between them
  is 0, so small values <= 0 get pattern 0000 and small positive ones pattern 1000. Both decode
  to zero; the sign of that zero differs between bnb's C kernel (-0.0) and its torch code (+0.0).
- 8-bit, for double quantization (bnb's C code): multiply by the float32 reciprocal 1/absmax,
  snap the result to a grid of 65536 points on [-1, 1], then take the code nearest to the grid
  point (`nearest_code_8bit`). A block of zeros gets code 0.
- Dequantization is code[codes] * absmax in float32, then a cast: bnb's torch code. Its AVX-512
  C kernel (used for even row lengths) looks the absmax up per row of the 2-D tensor, which
  gives other values when the row length is not a multiple of blocksize and a block spans rows;
  everywhere else it agrees with its torch code and with `dequantize_4bit` here.

Plain-torch twins for the kernels: `dequantize_4bit` and `matmul_4bit` (y = x @ W_hat^T).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .affine import AffineSpec, check_tensor, fake_quantize
from .formats import FP4_CODEBOOK, NF4_OFFSET, bits_per_param, build_nf4_codebook
from .packing import pack_nibbles_bnb, unpack_nibbles_bnb

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
NESTED_BLOCKSIZE = 256
QUANT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TINY = 1e-38  # bitsandbytes' floor on absmax before dividing by it


# ---------------------------------------------------------------- code books


def nf4_code_book(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4's 16 values, sorted ascending, float32 [16]: normal quantiles scaled onto [-1, 1].

    Built by formats.build_nf4_codebook; with the default offset it is bitsandbytes' table.
    """
    return build_nf4_codebook(offset)


def fp4_code_book() -> torch.Tensor:
    """bitsandbytes' FP4 values in bit-pattern order (sign, 2 exponent bits, 1 mantissa bit),
    float32 [16]: code k decodes to fp4_code_book()[k] (formats.FP4_CODEBOOK)."""
    return FP4_CODEBOOK.clone()


CODE_BOOKS = {"nf4": nf4_code_book, "fp4": fp4_code_book}


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (create_dynamic_map with 7 exponent bits), float32 [256].

    Values of the form 10^-e * f for e = 6, 5, ..., 0: each power of ten gets twice as many
    fractions f in (0.1, 1) as the one below it (1, 2, 4, ..., 64 when signed; double that when
    unsigned), the midpoints of an even split of [0.1, 1]. So small magnitudes keep their
    relative precision, like a float, while large ones get most of the codes. Together with 0
    and 1 (and the negatives when signed) that is exactly 256 values, sorted ascending.
    """
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        fractions = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, fractions + 1)
        decade = 10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2)
        values += [decade, -decade] if signed else [decade]
    return torch.cat(values).sort().values


# ---------------------------------------------------------------- checks


def check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))} (the sizes bitsandbytes' "
            f"quantize_4bit accepts), got {blocksize!r}; 64 is the QLoRA default"
        )
    return blocksize


def check_quant_type(quant_type: str) -> str:
    if quant_type not in CODE_BOOKS:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def check_weight(w: torch.Tensor) -> torch.Tensor:
    """A non-empty, finite fp32/fp16/bf16 tensor (the dtypes bitsandbytes quantizes)."""
    check_tensor(w, "w")
    if w.dtype not in QUANT_DTYPES:
        raise TypeError(f"w has dtype {w.dtype}; bitsandbytes quantizes float32, float16 and bfloat16: pass w.float()")
    if w.numel() == 0:
        raise ValueError(f"w is empty (shape {tuple(w.shape)}): there is nothing to quantize")
    return w


# ---------------------------------------------------------------- single level: 4-bit codes


def scale_blocks(w_flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide every block by its absmax, bitsandbytes' way.

    w_flat: [n] float. Returns scaled [n] float32 in [-1, 1] and absmax [ceil(n/blocksize)] float32.
    """
    w_flat = w_flat.float()
    n = w_flat.numel()
    full = n - n % blocksize
    body = w_flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=TINY))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:  # the short last block: divided, and its stored absmax floored at TINY
        tail_absmax = w_flat[full:].abs().max().clamp(min=TINY)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (w_flat[full:] / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def nearest_code_4bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value for each element, uint8 shaped like `scaled`.

    Compares with the midpoints between neighbouring values of the sorted code book: a value on
    a midpoint takes the lower code. code: [16] float32 in any order (FP4's is not sorted). Two
    equal values (FP4's 0 and -0) keep their index order, so their midpoint 0 sends values <= 0
    to the smaller index and small positive values to the larger one, as in bitsandbytes.
    """
    sorted_code, order = torch.sort(code, stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)].to(torch.uint8)


def quantize_blockwise_4bit(
    w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of blockwise 4-bit quantization: codes packed two per byte, one absmax per block.

    w: any shape, fp32/fp16/bf16, flattened in row-major order. Returns packed [ceil(n/2), 1]
    uint8 (element 2j in the high nibble of byte j, 2j+1 in the low one) and absmax
    [ceil(n/blocksize)] float32.
    """
    check_weight(w)
    check_blocksize(blocksize)
    code = CODE_BOOKS[check_quant_type(quant_type)]()
    scaled, absmax = scale_blocks(w.reshape(-1), blocksize)
    if scaled.numel() % 2:  # one zero value fills the last byte's low nibble
        scaled = F.pad(scaled, (0, 1))
    codes = nearest_code_4bit(scaled, code)
    return pack_nibbles_bnb(codes)[:, None], absmax


def dequantize_blockwise_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int = 64,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w_hat = code[codes] * absmax of the block, computed in float32, returned as `dtype`.

    packed: [ceil(n/2), 1] (or any shape holding those bytes) uint8, or another dtype viewed as
    bytes (quant_storage); absmax: [ceil(n/blocksize)] float32; shape: the original shape, n its
    number of elements. Returns a tensor of that shape.
    """
    check_blocksize(blocksize)
    code = CODE_BOOKS[check_quant_type(quant_type)]()
    if dtype not in QUANT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    n = math.prod(shape)
    packed_bytes = as_bytes(packed)
    if packed_bytes.numel() != math.ceil(n / 2):
        raise ValueError(
            f"packed holds {packed_bytes.numel()} bytes, but shape {tuple(shape)} ({n} weights) needs "
            f"ceil({n}/2) = {math.ceil(n / 2)}; are the packed codes and the state from the same tensor?"
        )
    blocks = math.ceil(n / blocksize)
    if absmax.shape != (blocks,):
        raise ValueError(
            f"{n} weights in blocks of {blocksize} need {blocks} absmax values, got shape "
            f"{tuple(absmax.shape)}; check the blocksize and that the state belongs to these codes"
        )
    codes = unpack_nibbles_bnb(packed_bytes)[:n]
    w_hat = code[codes.long()] * absmax.float().repeat_interleave(blocksize)[:n]
    return w_hat.to(dtype).reshape(shape)


def as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed codes as a flat uint8 tensor, whatever dtype they are stored in."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be the tensor returned by quantize_4bit, got {type(packed).__name__}")
    return packed.reshape(-1).view(torch.uint8)


# ---------------------------------------------------------------- double quantization: 8-bit absmax


def nearest_code_8bit(normed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU code search: uint8 indices into a sorted 256-value code, shaped like x.

    normed: float32 in [-1, 1]. bnb first snaps x to the nearest of 65536 evenly spaced points
    g_j = 2j/65535 - 1 (float32 arithmetic), then takes the code nearest to g_j (a point on a
    midpoint takes the lower code). The snap moves x by up to 1.5e-5, so near a midpoint the
    code can be the second nearest to x itself; only the dense codes near 0 are that close.
    """
    h = (normed.clamp(-1, 1) + 1) * 0.5  # a multiple of 2^-25: 65535 * h + 0.5 is exact in float64
    j = (65535 * h.double() + 0.5).float().trunc()  # rounded to float32 once, like bnb's fused multiply-add
    grid = (2 * j) / 65535 - 1
    midpoints = (code[:-1] + code[1:]) * 0.5
    return torch.bucketize(grid, midpoints).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with a code book, as bitsandbytes' C code does it on CPU.

    x: [n] float32; code: [256] float32 sorted. Returns codes [n] uint8 and absmax
    [ceil(n/blocksize)] float32. x is scaled by the float32 reciprocal 1/absmax; a block of
    zeros (absmax 0) gets code 0 everywhere.
    """
    n = x.numel()
    blocks = math.ceil(n / blocksize)
    padded = F.pad(x.float(), (0, blocks * blocksize - n)).reshape(blocks, blocksize)  # zeros change no absmax
    absmax = padded.abs().amax(dim=1)
    inverse = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    codes = nearest_code_8bit(x.float() * inverse, code)
    return torch.where(torch.isinf(inverse), 0, codes).to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """x_hat = code[codes] * absmax of the block: float32 [n]."""
    n = codes.numel()
    return code[codes.long()] * absmax.repeat_interleave(blocksize)[:n]


def double_quantize(
    absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the block absmax values themselves (QLoRA's double quantization).

    absmax: [blocks] float32. Returns codes [blocks] uint8, absmax2 [ceil(blocks/blocksize)]
    float32 and offset, a 0-dim float32 tensor (the mean of absmax).
    """
    if (
        not isinstance(absmax, torch.Tensor)
        or absmax.dtype != torch.float32
        or absmax.dim() != 1
        or absmax.numel() == 0
    ):
        raise TypeError(
            "absmax must be a non-empty 1-D float32 tensor: the per-block absmax of quantize_blockwise_4bit"
        )
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}; QLoRA uses 256")
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset, dynamic_map(), blocksize)
    return codes, absmax2, offset


def double_dequantize(
    codes: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """The absmax values back from `double_quantize`'s output: [blocks] float32."""
    return dequantize_blockwise_8bit(codes, absmax2, dynamic_map(), blocksize) + offset


# ---------------------------------------------------------------- bitsandbytes' interface


@dataclass(frozen=True, eq=False)  # tensor fields: compare them one by one
class QuantState:
    """What `dequantize_4bit` needs besides the packed codes; fields named as in bitsandbytes.

    absmax: [blocks] float32, or with double quantization the uint8 codes of (absmax - offset).
    shape, dtype: the original tensor's. code: the [16] float32 code book (or the [256] dynamic
    map in a nested state). quant_type: "nf4" or "fp4". offset: 0-dim float32 mean of absmax
    (double quantization only). state2: the nested state of the absmax values (double
    quantization only): its absmax is absmax2 [ceil(blocks/256)] float32, its code the dynamic
    map, its blocksize 256, its dtype float32.
    """

    absmax: torch.Tensor
    shape: torch.Size | None = None
    code: torch.Tensor | None = None
    blocksize: int | None = None
    quant_type: str | None = None
    dtype: torch.dtype | None = None
    offset: torch.Tensor | None = None
    state2: "QuantState | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """bitsandbytes' quantize_4bit: packed codes and their QuantState.

    w: any shape, fp32/fp16/bf16. compress_statistics: double-quantize the absmax values.
    quant_storage: the dtype the packed bytes are viewed as (bnb allows e.g. bfloat16 for FSDP);
    the byte count ceil(n/2) must then fill whole elements. Returns packed [ceil(n/2) / size, 1]
    and the state.
    """
    packed, absmax = quantize_blockwise_4bit(w, blocksize, quant_type)
    if quant_storage != torch.uint8:
        packed = view_as_storage(packed, quant_storage)
    code = CODE_BOOKS[quant_type]()
    common = {"shape": w.shape, "code": code, "blocksize": blocksize, "quant_type": quant_type, "dtype": w.dtype}
    if not compress_statistics:
        return packed, QuantState(absmax=absmax, **common)
    codes, absmax2, offset = double_quantize(absmax)
    state2 = QuantState(absmax=absmax2, code=dynamic_map(), blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
    return packed, QuantState(absmax=codes, offset=offset, state2=state2, **common)


def view_as_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """packed [m, 1] uint8 -> [m / size, 1] quant_storage, the same bytes."""
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage must be a torch dtype such as torch.uint8, got {quant_storage!r}")
    size = quant_storage.itemsize
    if packed.numel() % size:
        raise ValueError(
            f"{packed.numel()} packed bytes do not fill whole {quant_storage} elements ({size} bytes each); "
            "use quant_storage=torch.uint8 for this tensor"
        )
    return packed.reshape(-1).view(quant_storage)[:, None]


def state_absmax(state: QuantState) -> torch.Tensor:
    """The float32 absmax of every 4-bit block [blocks], decoded first if double-quantized."""
    if not state.nested:
        return state.absmax
    s2 = state.state2
    return dequantize_blockwise_8bit(state.absmax, s2.absmax, s2.code, s2.blocksize) + state.offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit: the tensor back in its original shape, as `dtype`
    (default: the original dtype). Computed in float32, then cast."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be the QuantState returned with the packed codes, got {type(state).__name__}")
    if state.nested and state.absmax.dtype != torch.uint8:
        raise ValueError("a double-quantized state holds uint8 absmax codes; this state is inconsistent")
    return dequantize_blockwise_4bit(
        packed, state_absmax(state), state.shape, state.blocksize, state.quant_type, dtype or state.dtype
    )


def matmul_4bit(
    x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W_hat^T (+ bias), W_hat = dequantize_4bit(packed, state): the twin of a fused kernel.

    x: [..., K] float; the state's shape must be a Linear weight [N, K]. Returns [..., N] in
    x's dtype (the weight is dequantized straight to it, as bitsandbytes does).
    """
    if not isinstance(state, QuantState) or state.shape is None or len(state.shape) != 2:
        raise ValueError("matmul_4bit needs the state of a 2-D weight [out_features, in_features]")
    N, K = state.shape
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != K:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [..., {K}] (the weight is [{N}, {K}] = [out, in]), got {got}")
    return F.linear(x, dequantize_4bit(packed, state, dtype=x.dtype), bias)


# ---------------------------------------------------------------- storage and the INT4 baseline


def bits_per_weight(
    blocksize: int = 64, compress_statistics: bool = True, nested_blocksize: int = NESTED_BLOCKSIZE
) -> float:
    """Average storage per weight for a large tensor: 4 + 32/B, or 4 + 8/B + 32/(B*B2) with
    double quantization (4.5 and 4.127 at B = 64, B2 = 256; the module docstring derives it)."""
    check_blocksize(blocksize)
    if compress_statistics:
        return bits_per_param("nf4", group_size=blocksize, scale_bits=8, double_quant_group_size=nested_blocksize)
    return bits_per_param("nf4", group_size=blocksize, scale_bits=32)


def storage_bits(packed: torch.Tensor, state: QuantState) -> int:
    """Bits actually stored for one tensor: the packed bytes and the statistics (absmax, or its
    codes plus absmax2 and the offset). The code books are fixed tables and are not counted."""
    bits = as_bytes(packed).numel() * 8 + state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        bits += state.state2.absmax.numel() * 32 + 32
    return bits


def int4_absmax(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Fake-quantize w to symmetric INT4 on the same blocks as `quantize_4bit`.

    The scale of a block is absmax / 7 (affine.py's symmetric 4-bit grid), so this is the
    code book k / 7, k = -7..7, in the same frame as NF4 and FP4. Returns w_hat in w's dtype and
    shape. Stored like NF4 without double quantization (4 + 32/blocksize bits per weight).
    """
    check_weight(w)
    check_blocksize(blocksize)
    flat = w.reshape(-1)
    # Blocks as rows when they tile the tensor; otherwise one row with a shorter last group.
    blocks = flat.reshape(-1, blocksize) if flat.numel() % blocksize == 0 else flat[None]
    spec = AffineSpec(bits=4, symmetric=True, granularity="group", group_size=blocksize, ragged=True)
    return fake_quantize(blocks, spec).reshape(w.shape)


QUANT_TYPES = ("nf4", "fp4", "int4_absmax")


class Linear4bit(nn.Module):
    """A Linear with 4-bit blockwise weights: NF4 or FP4 (bitsandbytes' storage), or INT4 absmax.

    packed, state: the stored weight (None for "int4_absmax", kept as its dequantized values only).
    weight: [out_features, in_features], dequantized once at construction, in the Linear's
    dtype; forward computes F.linear with it, the same numbers as
    matmul_4bit(x, packed, state, bias) for an fp32 model.
    """

    def __init__(self, linear: nn.Linear, quant_type: str, blocksize: int, compress_statistics: bool):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear to quantize, got {type(linear).__name__}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
        if quant_type == "int4_absmax" and compress_statistics:
            raise ValueError("double quantization is defined here for nf4 and fp4 (bitsandbytes' quantize_4bit) only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.blocksize, self.compress_statistics = quant_type, blocksize, compress_statistics
        w = linear.weight.detach()
        if quant_type == "int4_absmax":
            self.packed = self.state = None
            w_hat = int4_absmax(w, blocksize)
            self.bits = math.ceil(w.numel() / 2) * 8 + math.ceil(w.numel() / blocksize) * 32
        else:
            self.packed, self.state = quantize_4bit(w, blocksize, quant_type, compress_statistics)
            w_hat = dequantize_4bit(self.packed, self.state)
            self.bits = storage_bits(self.packed, self.state)
        self.register_buffer("weight", w_hat)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, compress_statistics: bool = False
    ) -> "Linear4bit":
        return cls(linear, quant_type, blocksize, compress_statistics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def storage_bits(self) -> int:
        return self.bits

    def weight_count(self) -> int:
        return self.weight.numel()

    def extra_repr(self) -> str:
        scheme = f"{self.quant_type} block {self.blocksize}" + (", double quant" if self.compress_statistics else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {scheme}"
