"""GGUF files: the container around the blocks, read, written and requantized without gguf-py.

A GGUF file (version 3, little-endian) is four parts in a row:

    header        b"GGUF", uint32 version, uint64 tensor count, uint64 key/value count
    metadata      per entry: string key, uint32 value type, value
    tensor infos  per tensor: string name, uint32 n_dims, uint64 dims[n_dims], uint32 type,
                  uint64 offset of its bytes from the start of the data section
    data          zeros up to a multiple of the alignment, then each tensor's bytes, each
                  padded with zeros to the alignment (32 unless the key general.alignment says)

A string is a uint64 byte count and that many UTF-8 bytes, no terminator. A value type is one of
the 13 in `ValueType`; an array is a uint32 item type, a uint64 count and the items.

Dims are stored fastest-varying first, as ggml counts them: ne[0] is the row length. A numpy
array [rows, cols] is therefore stored with dims (cols, rows), the reverse of its shape. Blocks
(reference_impl/gguf.py) run along ne[0], so a weight [out_features, in_features] is quantized
in blocks of its input dimension, one row per output feature.

Reading takes two steps: `parse_header` turns the file's first bytes into a `Header` (bytes in,
fields out, nothing else touched: lab 09 asks learners to write it), and `read_gguf` maps the
file, calls it, and checks that every tensor's bytes lie inside the file.

Requantizing follows llama.cpp's `llama-quantize`: every 2-D weight (not the norms) gets a type
chosen by the file type ("ftype") recipe, is decoded to float32 and encoded again; a tensor whose
type does not change is copied byte for byte. `tensor_type` implements a documented subset of
llama.cpp's rules (src/llama-quant.cpp, llama_tensor_get_type) for dense models without an
importance matrix (left out: the I-quant, Q2_K and Q3_K recipes, mixture-of-experts, fused QKV,
Falcon and 70B special cases):

- token_embd (when the output head is tied to it) and output: Q6_K, or Q8_0 when the row length
  is not a multiple of the recipe's block size (Q8_0 recipes keep Q8_0).
- Q4_K_M and Q5_K_M: attn_v and ffn_down at Q6_K in the layers where `use_more_bits` holds (the
  first and last eighth of the layers and every third layer between).
- Q4_K_S: attn_v of layers 0-3 and ffn_down of the first eighth of the layers at Q5_K.
- A row length that the chosen type's blocks do not tile falls back: Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 if even 32 does not divide it.
- `pure` skips the first three rules (llama.cpp's --pure); `overrides` are (regex, type) pairs
  matched against tensor names before them (llama.cpp's --tensor-type).

llama.cpp counts attn_v and ffn_down tensors as it meets them, visiting tensors sorted by the
layer number in their name, so its count is the layer number that `recipe_type` reads from the
name. The written file keeps the input's tensor order (llama-quantize would sort it that way).
"""

import mmap
import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from .gguf import BLOCK_TYPES, TYPES_BY_ID, block_type, dequantize, quantize, row_bytes

MAGIC = b"GGUF"
VERSION = 3
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
FILE_TYPE_KEY = "general.file_type"
QUANTIZATION_VERSION_KEY = "general.quantization_version"
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, written by llama-quantize


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_FORMATS = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}  # fmt: skip


class GGUFError(ValueError):
    """A file is not a GGUF file, is damaged, or asks for something this module does not do."""


@dataclass(frozen=True)
class MetadataValue:
    """One metadata value: its GGUF type and a Python value (int, float, bool, str or a list).

    Arrays: type ARRAY, `item_type` the type of the items, `value` a list (of MetadataValue when
    the items are arrays themselves).
    """

    type: ValueType
    value: object
    item_type: ValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the data section. shape: numpy order, row length last."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def dims(self) -> tuple[int, ...]:
        """The dims as GGUF stores them: ne[0] (the row length) first."""
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.n_elements // self.shape[-1] * row_bytes(self.shape[-1], self.qtype)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.n_elements


@dataclass
class GGUFFile:
    """A GGUF file read by `read_gguf`: metadata and tensor infos in file order, data mapped lazily."""

    path: Path
    version: int
    metadata: dict[str, MetadataValue]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int  # absolute offset of the data section
    _map: np.ndarray | None = field(default=None, repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor: uint8 [*shape[:-1], row bytes], memory-mapped (read-only)."""
        info = self.tensors[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self.data_offset + info.offset
        data = self._map[start : start + info.nbytes]
        return data.reshape(*info.shape[:-1], row_bytes(info.shape[-1], info.qtype))

    def values(self, name: str) -> np.ndarray:
        """A tensor decoded to float32 [*shape] with reference_impl.gguf.dequantize."""
        return dequantize(self.raw(name), self.tensors[name].qtype)

    def value(self, key: str):
        """The Python value of a metadata key; KeyError naming the file if it is missing."""
        if key not in self.metadata:
            raise KeyError(f"{self.path.name} has no metadata key {key!r}")
        return self.metadata[key].value


# ---------------------------------------------------------------- reading


class Cursor:
    """Reads little-endian GGUF fields from a buffer, raising GGUFError where the buffer ends."""

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise GGUFError(f"the data ends in the middle of the header (at byte {self.pos}): the file is truncated")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buffer):
            raise GGUFError(f"a string at byte {self.pos} runs past the end of the data: the file is truncated")
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8")

    def value(self, vtype: int) -> MetadataValue:
        if vtype == ValueType.STRING:
            return MetadataValue(ValueType.STRING, self.string())
        if vtype == ValueType.ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in SCALAR_FORMATS:
                fmt = SCALAR_FORMATS[ValueType(item_type)]
                size = struct.calcsize(fmt) * count
                if self.pos + size > len(self.buffer):
                    raise GGUFError(f"an array at byte {self.pos} runs past the end of the data: the file is truncated")
                items = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buffer, self.pos))
                self.pos += size
            elif item_type == ValueType.STRING:
                items = [self.string() for _ in range(count)]
            elif item_type == ValueType.ARRAY:
                items = [self.value(ValueType.ARRAY) for _ in range(count)]
            else:
                raise GGUFError(f"unknown array item type {item_type} at byte {self.pos}")
            return MetadataValue(ValueType.ARRAY, items, ValueType(item_type))
        if vtype in SCALAR_FORMATS:
            return MetadataValue(ValueType(vtype), self.unpack(SCALAR_FORMATS[ValueType(vtype)]))
        raise GGUFError(f"unknown metadata value type {vtype} at byte {self.pos}")


@dataclass(frozen=True)
class Header:
    """Everything a GGUF file says before its tensor data, as `parse_header` reads it.

    metadata and tensors keep the file's order. data_offset: where the data section starts, the
    end of the tensor infos rounded up to `alignment`; each tensor's bytes start `offset` later.
    """

    version: int
    metadata: dict[str, MetadataValue]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int


def parse_header(data) -> Header:
    """Read a GGUF file's header, metadata and tensor infos from its first bytes.

    data: bytes (or any buffer: an mmap, a memoryview) from the start of the file to at least the
    end of its tensor infos; bytes beyond are ignored. Raises GGUFError when the data is not a
    GGUF file, has a version other than 2 or 3, ends in the middle of a field, or holds a value
    type or a tensor type this module does not know.
    """
    start = bytes(data[: len(MAGIC)])
    if start != MAGIC:
        raise GGUFError(
            f"this is not a GGUF file: it starts with {start!r}, a GGUF file with {MAGIC!r}. "
            "Pass a .gguf model file (llama.cpp's format)."
        )
    cursor = Cursor(data)
    cursor.pos = len(MAGIC)
    version = cursor.unpack("<I")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " It is a big-endian file; this reader reads little-endian ones." if swapped in (2, 3) else ""
        raise GGUFError(f"GGUF version {version} is not supported (versions 2 and 3 are).{hint}")
    n_tensors, n_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
        type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        if type_id not in TYPES_BY_ID:
            raise GGUFError(
                f"tensor {name} has GGML type {type_id}, which this reader does not decode "
                f"(it handles {', '.join(BLOCK_TYPES)})"
            )
        tensors[name] = TensorInfo(name, TYPES_BY_ID[type_id].name, tuple(reversed(dims)), offset)
    alignment = alignment_of(metadata)
    return Header(version, metadata, tensors, alignment, padded(cursor.pos, alignment))


def alignment_of(metadata: dict[str, MetadataValue]) -> int:
    """The data alignment: general.alignment if the metadata has it (a power of two), else 32."""
    alignment = metadata[ALIGNMENT_KEY].value if ALIGNMENT_KEY in metadata else DEFAULT_ALIGNMENT
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise GGUFError(f"{ALIGNMENT_KEY} must be a power of two, got {alignment!r}")
    return alignment


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor infos; tensor bytes stay on disk until used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    if path.stat().st_size == 0:  # mmap cannot map an empty file
        raise GGUFError(f"{path} is empty, not a GGUF file. Pass a .gguf model file (llama.cpp's format).")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        return parse(buffer, path)


def parse(buffer, path: Path) -> GGUFFile:
    """The GGUF file mapped in `buffer`: its header (parse_header), checked against its size."""
    try:
        header = parse_header(buffer)
    except GGUFError as error:
        raise GGUFError(f"{path}: {error}") from None
    for info in header.tensors.values():
        if header.data_offset + info.offset + info.nbytes > len(buffer):
            raise GGUFError(f"{path}: the bytes of tensor {info.name} run past the end of the file: it is truncated")
    return GGUFFile(path, header.version, header.metadata, header.tensors, header.alignment, header.data_offset)


def padded(n: int, alignment: int) -> int:
    """The smallest multiple of `alignment` that is >= n."""
    return (n + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------- writing


def pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def pack_value(v: MetadataValue) -> bytes:
    """The bytes of a value without its type tag (arrays include their item type and count)."""
    if v.type == ValueType.STRING:
        return pack_string(v.value)
    if v.type == ValueType.ARRAY:
        head = struct.pack("<IQ", v.item_type, len(v.value))
        if v.item_type in SCALAR_FORMATS:
            fmt = SCALAR_FORMATS[v.item_type]
            return head + struct.pack(f"<{len(v.value)}{fmt[1]}", *v.value)
        if v.item_type == ValueType.STRING:
            return head + b"".join(pack_string(s) for s in v.value)
        return head + b"".join(pack_value(item) for item in v.value)
    try:
        return struct.pack(SCALAR_FORMATS[v.type], v.value)
    except struct.error as error:
        raise GGUFError(f"value {v.value!r} does not fit GGUF type {v.type.name}: {error}") from None


@dataclass(frozen=True)
class TensorData:
    """A tensor to write: name, type, numpy shape (row length last) and its encoded bytes."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, any shape, exactly the tensor's byte count


def write_gguf(path: str | Path, metadata: dict[str, MetadataValue], tensors: list[TensorData]) -> int:
    """Write a GGUF v3 file; returns its size in bytes. The alignment is metadata's
    general.alignment if present, else 32. Metadata and tensors keep the order given."""
    alignment = alignment_of(metadata)
    header = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    for key, v in metadata.items():
        header += [pack_string(key), struct.pack("<I", v.type), pack_value(v)]
    offset = 0
    for t in tensors:
        expected = TensorInfo(t.name, t.qtype, tuple(t.shape), offset).nbytes
        if t.data.nbytes != expected:
            raise GGUFError(f"tensor {t.name}: {t.qtype} {tuple(t.shape)} takes {expected} bytes, got {t.data.nbytes}")
        header += [pack_string(t.name), struct.pack("<I", len(t.shape)), struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))]
        header += [struct.pack("<IQ", block_type(t.qtype).ggml_type, offset)]
        offset += padded(expected, alignment)
    head = b"".join(header)
    with open(path, "wb") as f:
        f.write(head + bytes(padded(len(head), alignment) - len(head)))
        for t in tensors:
            f.write(np.ascontiguousarray(t.data).view(np.uint8).tobytes())
            f.write(bytes(padded(t.data.nbytes, alignment) - t.data.nbytes))
        return f.tell()


# ---------------------------------------------------------------- llama.cpp's choice of types

FTYPES = {  # llama.cpp's LLAMA_FTYPE_MOSTLY_<name>: (general.file_type, base block type)
    "Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
    "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
    "Q6_K": (18, "Q6_K"),
}  # fmt: skip
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # when 256 does not divide the row length
LAYER = re.compile(r"^blk\.(\d+)\.")


def check_ftype(ftype: str) -> str:
    if ftype not in FTYPES:
        raise GGUFError(f"unknown file type {ftype!r}; choose one of: {', '.join(FTYPES)}")
    return ftype


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in _M recipes: the first and last eighth,
    and every third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp quantizes 2-D (and larger) weights, never norms or position embeddings."""
    return (
        len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name and "position_embd" not in name and "token_types" not in name
    )  # fmt: skip


def shape_fallback(qtype: str, row_length: int) -> str:
    """The type llama.cpp uses when `qtype`'s blocks do not tile a row of `row_length`."""
    if row_length % BLOCK_TYPES[qtype].block_size == 0:
        return qtype
    fallback = FALLBACK.get(qtype, "F16")
    return fallback if row_length % BLOCK_TYPES[fallback].block_size == 0 else "F16"


def tensor_type(
    name: str,
    shape: tuple[int, ...],
    ftype: str,
    n_layers: int,
    tied_output: bool = True,
    pure: bool = False,
    overrides: list[tuple[str, str]] = (),
) -> str:
    """The type llama-quantize gives tensor `name` of numpy shape `shape` in an `ftype` file.

    tied_output: the file has no output.weight, so token_embd is also the output head.
    overrides: (regex, type) pairs; the first whose regex is found in the name decides.
    """
    base = FTYPES[check_ftype(ftype)][1]
    chosen = next((t for pattern, t in overrides if re.search(pattern, name)), None)
    if chosen is None:
        chosen = base if pure else recipe_type(name, shape, ftype, base, n_layers, tied_output)
    return shape_fallback(block_type(chosen).name, shape[-1])


def recipe_type(name: str, shape: tuple[int, ...], ftype: str, base: str, n_layers: int, tied_output: bool) -> str:
    """The ftype recipe's rules before the shape fallback (see the module docstring)."""
    match = LAYER.match(name)
    layer = int(match.group(1)) if match else -1
    if name == "output.weight" or (tied_output and name == "token_embd.weight"):
        if shape[-1] % BLOCK_TYPES[base].block_size:
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if ".attn_v." in name:
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            return "Q6_K"
        if ftype == "Q4_K_S" and layer < 4:
            return "Q5_K"
    if ".ffn_down" in name:
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            return "Q6_K"
        if ftype == "Q4_K_S" and layer < n_layers // 8:
            return "Q5_K"
    return base


def plan_types(src: GGUFFile, ftype: str, pure: bool = False, overrides: list[tuple[str, str]] = ()) -> dict[str, str]:
    """Every tensor's type in the requantized file, name -> type (unquantizable ones keep theirs)."""
    arch = src.value("general.architecture")
    n_layers = src.value(f"{arch}.block_count")
    tied = "output.weight" not in src.tensors
    return {
        name: tensor_type(name, info.shape, ftype, n_layers, tied, pure, overrides)
        if is_quantizable(name, info.shape) else info.qtype
        for name, info in src.tensors.items()
    }  # fmt: skip


def requantize(
    src: GGUFFile, ftype: str, pure: bool = False, overrides: list[tuple[str, str]] = (), search: bool = True
) -> tuple[dict[str, MetadataValue], list[TensorData]]:
    """Metadata and tensors of `src` requantized to the `ftype` recipe (llama-quantize with
    --allow-requantize). A tensor whose type does not change keeps its bytes; every other one is
    decoded to float32 and encoded again. general.file_type and general.quantization_version are
    set as llama.cpp sets them; every other metadata entry is copied."""
    types = plan_types(src, ftype, pure, overrides)
    metadata = dict(src.metadata)
    metadata[FILE_TYPE_KEY] = MetadataValue(ValueType.UINT32, FTYPES[ftype][0])
    metadata[QUANTIZATION_VERSION_KEY] = MetadataValue(ValueType.UINT32, QUANTIZATION_VERSION)
    tensors = []
    for name, info in src.tensors.items():
        new = types[name]
        data = src.raw(name) if new == info.qtype else quantize(src.values(name), new, search)
        tensors.append(TensorData(name, new, info.shape, data))
    return metadata, tensors


def requantize_file(
    src_path: str | Path, out_path: str | Path, ftype: str, pure: bool = False, overrides: list[tuple[str, str]] = ()
) -> GGUFFile:
    """Requantize a GGUF file to `ftype` and write it; returns the written file, read back.

    The file is written under a temporary name next to `out_path` and renamed when complete, so
    an interrupted run never leaves a half-written model behind."""
    src_path, out_path = Path(src_path), Path(out_path)
    if out_path.resolve() == src_path.resolve():
        raise GGUFError(f"the output {out_path} is the input file; write the requantized model to a new file")
    metadata, tensors = requantize(read_gguf(src_path), ftype, pure, overrides)
    partial = out_path.with_name(f".{out_path.name}.partial")
    try:
        write_gguf(partial, metadata, tensors)
        partial.replace(out_path)
    finally:
        partial.unlink(missing_ok=True)
    return read_gguf(out_path)


# ---------------------------------------------------------------- storage accounting


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """The decoder's linear layers: quantizable weights other than the embedding and output head."""
    return is_quantizable(name, shape) and name not in ("token_embd.weight", "output.weight")


def bits_per_weight(file: GGUFFile, linear_only: bool = False) -> float:
    """8 * bytes / weights over every tensor (llama.cpp's BPW), or over the linear weights only."""
    infos = [t for t in file.tensors.values() if not linear_only or is_linear_weight(t.name, t.shape)]
    return 8 * sum(t.nbytes for t in infos) / sum(t.n_elements for t in infos)


def type_counts(file: GGUFFile) -> dict[str, int]:
    """How many tensors of each type the file holds, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
    counts: dict[str, int] = {}
    for t in file.tensors.values():
        counts[t.qtype] = counts.get(t.qtype, 0) + 1
    return counts


def reencode_identical(src: GGUFFile, qtypes: tuple[str, ...] = ("Q4_1", "Q8_0")) -> dict[str, tuple[int, int]]:
    """Decode every `qtypes` tensor to float32, encode it again as the same type, and count the
    blocks that come back byte for byte: {type: (identical blocks, all blocks)}."""
    counts = {}
    for name, info in src.tensors.items():
        if info.qtype in qtypes:
            size = BLOCK_TYPES[info.qtype].type_size
            stored = src.raw(name).reshape(-1, size)
            again = quantize(src.values(name), info.qtype).reshape(-1, size)
            same, total = counts.get(info.qtype, (0, 0))
            counts[info.qtype] = (same + int((stored == again).all(axis=1).sum()), total + stored.shape[0])
    return counts


def load_with_transformers(path: str | Path, config=None, progress: bool = False):
    """A GGUF file as a float32 transformers model in eval mode, through transformers' own GGUF
    loader (which decodes with gguf-py). `config`: pass the model's config to skip parsing it
    from the file again. progress=False hides the loader's progress bar (it writes to stderr)."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    return model.eval().requires_grad_(False)
