"""GGUF seen from the outside: the maps and plans lesson 09 draws, from gguf.py and gguf_file.py.

gguf.py holds the block encoders and decoders, gguf_file.py the container and llama.cpp's choice
of types. This module holds what the lesson shows about them, derived from those functions
rather than typed in, so that a figure cannot drift from the code it explains:

- Where every byte of a file belongs (`file_fields`): the header's four fields, each metadata
  entry, each tensor info, the padding and each tensor's bytes, as contiguous byte ranges from 0
  to the end of the file. The first `detail` metadata entries and tensor infos are split into
  their own fields (string length, key bytes, value type, value; name, n_dims, dims, type,
  offset), which is what a hex view annotates.
- Where every field of a block lies (`block_fields`): the byte ranges of d, m, dmin, the scales
  and the codes of each block type, and how many bits per weight each field costs
  (`bits_breakdown`). `code_bit_map` finds, for every bit of a block, the weight and the bit of
  its code that the bit stores, and `read_codes` reads any block's codes with that map. The map
  is not typed in: a block whose scales make the decoder return its codes (`unit_block`: d = 1,
  minimums 0, sub-block scales 1) has one bit flipped at a time, and `gguf.dequantize` says
  which weight moved and by how much (2^b for bit b of a code). `k4_scale_bit_map` does the
  same for the 12 bytes that hold Q4_K's and Q5_K's eight 6-bit scales and eight 6-bit
  minimums, through `gguf.unpack_scales_k4`.
- The types a file type gives each tensor (`recipe_plan`): what llama.cpp's recipe asks for and
  what the tensor gets once the row length has had its say (a super-block of 256 does not tile a
  row of 576), for a real file (`tensor_shapes`) or for a published architecture's shapes
  (`llama_tensors`, e.g. Llama-3-8B), and the bits per weight that plan stores
  (`planned_bits_per_weight`, llama.cpp's figure: 8 x bytes / weights over every tensor).
"""

import mmap
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from . import gguf, gguf_file
from .gguf_file import Cursor, GGUFFile, TensorInfo, ValueType
from .qlora import LlamaShape

# ---------------------------------------------------------------- the file, byte by byte


@dataclass(frozen=True)
class Field:
    """Bytes [start, stop) of a GGUF file: the part they belong to, a label and the value read.

    part: "header", "metadata", "tensor info", "padding" or "tensor data".
    """

    start: int
    stop: int
    part: str
    label: str
    value: object = None

    @property
    def size(self) -> int:
        return self.stop - self.start


def file_fields(path: str | Path, detail: int = 2) -> list[Field]:
    """Every byte of a GGUF file in a field, in file order: contiguous, from 0 to the file size.

    The first `detail` metadata entries and the first `detail` tensor infos are split into their
    parts (for a hex view); every other entry, tensor info and tensor is one field. Values are
    read with gguf_file's own Cursor, so they are what `read_gguf` reads.
    """
    path = Path(path)
    file = gguf_file.read_gguf(path)  # checks the magic and the version, and finds the data section
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        cursor = Cursor(buffer)
        fields = [Field(0, 4, "header", "magic", bytes(buffer[0:4]))]
        cursor.pos = 4
        for label, fmt in (("version", "<I"), ("tensor count", "<Q"), ("metadata count", "<Q")):
            start = cursor.pos
            fields.append(Field(start, start + int(np.dtype(fmt).itemsize), "header", label, cursor.unpack(fmt)))
        for i in range(len(file.metadata)):
            fields += metadata_entry(cursor, split=i < detail)
        for i in range(len(file.tensors)):
            fields += tensor_info(cursor, split=i < detail)
        size = len(buffer)
    if cursor.pos != file.data_offset:
        fields.append(Field(cursor.pos, file.data_offset, "padding", f"zeros up to a multiple of {file.alignment}"))
    position = file.data_offset
    for info in sorted(file.tensors.values(), key=lambda t: t.offset):
        start = file.data_offset + info.offset
        if start > position:
            fields.append(Field(position, start, "padding", f"zeros up to a multiple of {file.alignment}"))
        fields.append(Field(start, start + info.nbytes, "tensor data", info.name, info.qtype))
        position = start + info.nbytes
    if position < size:
        fields.append(Field(position, size, "padding", "zeros after the last tensor"))
    return fields


def metadata_entry(cursor: Cursor, split: bool) -> list[Field]:
    """The fields of the metadata entry at cursor.pos (one field, or four when `split`)."""
    start = cursor.pos
    key = cursor.string()
    key_end = cursor.pos
    vtype = ValueType(cursor.unpack("<I"))
    value = cursor.value(vtype)
    if not split:
        return [Field(start, cursor.pos, "metadata", key, value)]
    return [
        Field(start, start + 8, "metadata", "key length", key_end - start - 8),
        Field(start + 8, key_end, "metadata", "key", key),
        Field(key_end, key_end + 4, "metadata", "value type", vtype.name),
        Field(key_end + 4, cursor.pos, "metadata", f"value of {key}", value),
    ]


def tensor_info(cursor: Cursor, split: bool) -> list[Field]:
    """The fields of the tensor info at cursor.pos (one field, or five when `split`)."""
    start = cursor.pos
    name = cursor.string()
    name_end = cursor.pos
    n_dims = cursor.unpack("<I")
    dims = tuple(cursor.unpack("<Q") for _ in range(n_dims))
    dims_end = cursor.pos
    type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
    if not split:
        return [Field(start, cursor.pos, "tensor info", name, (dims, type_id, offset))]
    return [
        Field(start, name_end, "tensor info", "name (length, bytes)", name),
        Field(name_end, name_end + 4, "tensor info", "n_dims", n_dims),
        Field(name_end + 4, dims_end, "tensor info", "dims (ne[0] first)", dims),
        Field(dims_end, dims_end + 4, "tensor info", "type", type_id),
        Field(dims_end + 4, cursor.pos, "tensor info", "offset", offset),
    ]


def part_sizes(fields: list[Field]) -> dict[str, int]:
    """Bytes per part of the file, in order of first appearance."""
    sizes: dict[str, int] = {}
    for f in fields:
        sizes[f.part] = sizes.get(f.part, 0) + f.size
    return sizes


# ---------------------------------------------------------------- the block, byte by byte

# Each type's fields in storage order: (name, bytes). gguf.py's decoders read them at these offsets.
BLOCK_LAYOUTS: dict[str, tuple[tuple[str, int], ...]] = {
    "Q4_0": (("d", 2), ("qs", 16)),
    "Q4_1": (("d", 2), ("m", 2), ("qs", 16)),
    "Q5_0": (("d", 2), ("qh", 4), ("qs", 16)),
    "Q5_1": (("d", 2), ("m", 2), ("qh", 4), ("qs", 16)),
    "Q8_0": (("d", 2), ("qs", 32)),
    "Q4_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)),
    "Q5_K": (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)),
    "Q6_K": (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)),
}
CODE_FIELDS = ("qs", "qh", "ql")  # the fields that hold the weights' codes; the rest are scales


def check_quantized(qtype: str) -> str:
    if qtype not in gguf.QUANTIZED_TYPES:
        raise ValueError(f"{qtype!r} has no block layout; pick one of the quantized types: {', '.join(gguf.QUANTIZED_TYPES)}")
    return qtype


def block_fields(qtype: str) -> list[tuple[str, int, int]]:
    """(field, first byte, byte after the last) of each field of a `qtype` block, in storage order."""
    fields, start = [], 0
    for name, size in BLOCK_LAYOUTS[check_quantized(qtype)]:
        fields.append((name, start, start + size))
        start += size
    return fields


def bits_breakdown(qtype: str) -> dict[str, float]:
    """Bits per weight spent on each field of a `qtype` block: {"d": 0.5, "qs": 4.0} for Q4_0.
    The values add up to the type's bits per weight."""
    n = gguf.block_type(check_quantized(qtype)).block_size
    return {name: 8 * (stop - start) / n for name, start, stop in block_fields(qtype)}


def code_bits(qtype: str) -> int:
    """Bits of code per weight (the code fields), e.g. 4 for Q4_0 and Q4_K, 6 for Q6_K."""
    code_bytes = sum(stop - start for name, start, stop in block_fields(qtype) if name in CODE_FIELDS)
    return 8 * code_bytes // gguf.block_type(qtype).block_size


def unit_block(qtype: str) -> np.ndarray:
    """One `qtype` block, uint8 [1, bytes], whose codes are all 0 and whose scales make the
    decoder return each weight's code (minus the type's fixed offset): d = 1, minimums 0 and,
    for the K-quants, every sub-block scale 1. Flipping one code bit b then moves one weight by 2^b."""
    block = np.zeros((1, gguf.block_type(check_quantized(qtype)).type_size), np.uint8)
    fields = {name: (start, stop) for name, start, stop in block_fields(qtype)}
    start, stop = fields["d"]
    block[0, start:stop] = gguf.fp16_bytes(np.array([1.0], np.float32))[0]
    if qtype in ("Q4_K", "Q5_K"):
        start, stop = fields["scales"]
        block[0, start:stop] = gguf.pack_scales_k4(np.ones((1, 8), np.uint8), np.zeros((1, 8), np.uint8))[0]
    if qtype == "Q6_K":
        start, stop = fields["scales"]
        block[0, start:stop] = 1
    return block


@cache
def code_bit_map(qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """For every bit of a `qtype` block: the weight whose code it stores and which bit of that code.

    Returns (weight, bit), two int arrays [bytes, 8] (bit 0 = least significant), -1 for the bits
    of the scale fields. Found by decoding: each code bit of `unit_block` is flipped alone and the
    one weight that moves, by 2^bit, is recorded (by -2^7 for the sign bit of Q8_0's int8 codes;
    ValueError if a bit moves several weights or by another amount: the layout would not be a
    plain code field). Cached: the arrays are shared, read them without writing.
    """
    base = unit_block(qtype)
    reference = gguf.dequantize(base, qtype)[0]
    weight = np.full((base.shape[1], 8), -1)
    bit = np.full((base.shape[1], 8), -1)
    for name, start, stop in block_fields(qtype):
        if name not in CODE_FIELDS:
            continue
        for byte in range(start, stop):
            for b in range(8):
                probe = base.copy()
                probe[0, byte] ^= np.uint8(1 << b)
                moved = gguf.dequantize(probe, qtype)[0] - reference
                which = np.flatnonzero(moved)
                step = abs(float(moved[which[0]])) if which.size == 1 else 0.0  # Q8_0's bit 7 moves by -128
                if which.size != 1 or step == 0 or not np.log2(step).is_integer():
                    raise ValueError(f"{qtype}: bit {b} of byte {byte} does not move one weight by a power of two")
                weight[byte, b], bit[byte, b] = which[0], int(np.log2(step))
    return weight, bit


def read_codes(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """The codes of `qtype` blocks uint8 [n, bytes], read bit by bit through `code_bit_map`:
    int64 [n, weights per block], as the decoder reads them (Q8_0: signed, -128..127; every other
    type 0..2^bits - 1, before the type's offset of 8, 16 or 32 is subtracted)."""
    size = gguf.block_type(check_quantized(qtype)).type_size
    blocks = np.asarray(blocks, np.uint8)
    if blocks.ndim != 2 or blocks.shape[1] != size:
        raise ValueError(f"expected {qtype} blocks of shape [n, {size}], got {blocks.shape}")
    weight, bit = code_bit_map(qtype)
    bits = np.unpackbits(blocks, axis=1, bitorder="little").reshape(blocks.shape[0], size, 8).astype(np.int64)
    codes = np.zeros((blocks.shape[0], gguf.block_type(qtype).block_size), np.int64)
    for byte, b in zip(*np.nonzero(weight >= 0)):
        codes[:, weight[byte, b]] |= bits[:, byte, b] << bit[byte, b]
    return np.where(codes >= 128, codes - 256, codes) if qtype == "Q8_0" else codes


def k4_scale_bit_map() -> tuple[np.ndarray, np.ndarray]:
    """For each bit of Q4_K's (and Q5_K's) 12 scale bytes: which 6-bit value it stores and which bit.

    Returns (value, bit), int arrays [12, 8]; values 0-7 are the sub-block scales, 8-15 the
    sub-block minimums. Found by flipping each bit alone and unpacking with gguf.unpack_scales_k4.
    """
    zeros = np.zeros((1, 12), np.uint8)
    value = np.full((12, 8), -1)
    bit = np.full((12, 8), -1)
    for byte in range(12):
        for b in range(8):
            probe = zeros.copy()
            probe[0, byte] = 1 << b
            scales, mins = gguf.unpack_scales_k4(probe)
            unpacked = np.concatenate([scales[0], mins[0]]).astype(int)
            which = np.flatnonzero(unpacked)
            if which.size != 1:
                raise ValueError(f"bit {b} of scale byte {byte} sets {which.size} values; expected exactly one")
            value[byte, b], bit[byte, b] = which[0], int(unpacked[which[0]]).bit_length() - 1
    return value, bit


# ---------------------------------------------------------------- llama.cpp's file types, planned

GGUF_LINEAR_NAMES = {  # transformers' Llama module -> GGUF tensor name
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
}  # fmt: skip


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a planned file: numpy shape, the type before, the type the recipe asks for,
    and the type it gets (after the fallback when the recipe's blocks do not tile its rows)."""

    shape: tuple[int, ...]
    source: str
    wanted: str
    chosen: str

    @property
    def fell_back(self) -> bool:
        return self.wanted != self.chosen


def tensor_shapes(file: GGUFFile) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (numpy shape, type)} of every tensor of a GGUF file, in file order."""
    return {name: (info.shape, info.qtype) for name, info in file.tensors.items()}


def llama_tensors(shape: LlamaShape, weight_type: str = "F16") -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors of a Llama-architecture GGUF file (as llama.cpp's converter names them), from
    the architecture alone: {name: (numpy shape, type)}; weights in `weight_type`, norms F32."""
    tensors = {"token_embd.weight": ((shape.vocab, shape.hidden), weight_type)}
    for layer in range(shape.layers):
        tensors[f"blk.{layer}.attn_norm.weight"] = ((shape.hidden,), "F32")
        for module, (out_features, in_features) in shape.linear_shapes().items():
            tensors[f"blk.{layer}.{GGUF_LINEAR_NAMES[module]}.weight"] = ((out_features, in_features), weight_type)
        tensors[f"blk.{layer}.ffn_norm.weight"] = ((shape.hidden,), "F32")
    tensors["output_norm.weight"] = ((shape.hidden,), "F32")
    if not shape.tied_embeddings:
        tensors["output.weight"] = ((shape.vocab, shape.hidden), weight_type)
    return tensors


def recipe_plan(tensors: dict[str, tuple[tuple[int, ...], str]], ftype: str, n_layers: int) -> dict[str, PlannedTensor]:
    """The type llama-quantize's `ftype` recipe gives every tensor, and the type it wanted.

    tensors: {name: (numpy shape, current type)}, e.g. `tensor_shapes(file)`. The output head is
    tied to the embedding when there is no output.weight. Tensors llama.cpp never quantizes
    (norms) keep their type. `chosen` is exactly what gguf_file.plan_types returns for a file.
    """
    base = gguf_file.FTYPES[gguf_file.check_ftype(ftype)][1]
    tied = "output.weight" not in tensors
    plan = {}
    for name, (shape, source) in tensors.items():
        if not gguf_file.is_quantizable(name, shape):
            plan[name] = PlannedTensor(tuple(shape), source, source, source)
            continue
        wanted = gguf_file.recipe_type(name, shape, ftype, base, n_layers, tied)
        plan[name] = PlannedTensor(tuple(shape), source, wanted, gguf_file.tensor_type(name, shape, ftype, n_layers, tied))
    return plan


def fallback_counts(plan: dict[str, PlannedTensor]) -> Counter:
    """How many tensors fell back, per (wanted, chosen) pair of types."""
    return Counter((p.wanted, p.chosen) for p in plan.values() if p.fell_back)


def planned_bits_per_weight(plan: dict[str, PlannedTensor], names: list[str] | None = None) -> float:
    """8 x bytes / weights of the planned types over `names` (default: every tensor): llama.cpp's
    bits per weight of the file the plan describes."""
    chosen = [TensorInfo(n, plan[n].chosen, plan[n].shape, 0) for n in (names if names is not None else plan)]
    if not chosen:
        raise ValueError("no tensors to count: pass at least one tensor name of the plan")
    return 8 * sum(t.nbytes for t in chosen) / sum(t.n_elements for t in chosen)


def type_of_layers(plan: dict[str, PlannedTensor], n_layers: int, kinds: tuple[str, ...]) -> list[list[str]]:
    """The chosen type of blk.{layer}.{kind}.weight, as a [kind][layer] grid (for a picture of a recipe)."""
    return [[plan[f"blk.{layer}.{kind}.weight"].chosen for layer in range(n_layers)] for kind in kinds]
