"""Mutation catalog of lab 09: the hidden suite must fail plausible wrong versions of every graded
function (and name the mistake where the suite knows it) and pass other correct ones; the lab
notebook must hold together (points, no outputs, the source at full marks, the student version at
zero); its given helpers must behave like the reference's; the bad inputs the suite feeds must
make the reference raise the exception types the suite expects; and the sandbox must hand numpy
arrays and bytes to the learner's functions as numpy arrays and bytes.

All versions live in one notebook: the source notebook plus one cell per version, whose function
is renamed `quantize_q4_0__swapped_nibbles`. A single learner process serves them all and
`aliases` points the suite's `learner.quantize_q4_0` at the version under test.
"""

import ast
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from lab_catalog import (
    check_catalog_covers,
    check_full_marks,
    check_loses_points,
    check_reference_signatures,
    check_saved_without_outputs,
    check_solution_cells_hold_only,
    check_source_and_student_notebooks,
    check_test_cells_match_the_suite,
    grade_version,
    nbgrader_cells,
    suite_points,
    version,
    versions_sandbox,
)

from quantcourse.autograder import engine
from quantcourse.autograder.sandbox import LearnerError
from quantcourse.reference_impl import gguf as Q
from quantcourse.reference_impl import gguf_file as F

LAB = "09_gguf"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"


Q8 = '''
def quantize_q8_0(blocks):
    x = CHECK
    d = np.abs(x).max(axis=1) / np.float32(DIVISOR)
    inverse = np.divide(np.float32(1), D_USED, out=np.zeros_like(d), where=d != 0)
    v = VALUE
    q = ROUND
    return np.concatenate([d.astype(D_TYPE).view(np.uint8).reshape(-1, D_BYTES), CODES], axis=1)
'''
Q8_RIGHT = {
    "CHECK": "check_blocks(blocks, 32)", "DIVISOR": "127", "D_USED": "d", "VALUE": "x * inverse[:, None]",
    "ROUND": "np.sign(v) * (np.floor(np.abs(v)) + (np.abs(v) - np.floor(np.abs(v)) >= 0.5))", "D_TYPE": '"<f2"',
    "D_BYTES": "2", "CODES": "q.astype(np.int8).view(np.uint8)",
}  # fmt: skip

Q4 = '''
def quantize_q4_0(blocks):
    x = CHECK
    peak = PEAK
    d = peak / np.float32(DIVISOR)
    inverse = np.divide(np.float32(1), D_USED, out=np.zeros_like(d), where=d != 0)
    q = CODES.astype(np.uint8)
    packed = PACK
    return np.concatenate([d.astype(D_TYPE).view(np.uint8).reshape(-1, D_BYTES), packed], axis=1)
'''
Q4_RIGHT = {
    "CHECK": "check_blocks(blocks, 32)", "PEAK": "x[np.arange(x.shape[0]), np.abs(x).argmax(axis=1)]", "DIVISOR": "-8",
    "D_USED": "d", "CODES": "np.clip(np.trunc(x * inverse[:, None] + np.float32(8.5)), 0, 15)",
    "PACK": "q[:, :16] | (q[:, 16:] << 4)", "D_TYPE": '"<f2"', "D_BYTES": "2",
}  # fmt: skip

Q4K = '''
def dequantize_q4_k(data):
    data = CHECK
    n = data.shape[0]
    d = data[:, 0:2].copy().view(ORDER).astype(np.float32)
    dmin = data[:, 2:4].copy().view(ORDER).astype(np.float32)
    s = data[:, 4:16]
    scales = np.concatenate([s[:, 0:4] & 63, LOW_S | ((HIGH_S >> 6) << SHIFT)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, LOW_M | ((HIGH_M >> 6) << SHIFT)], axis=1)
    chunks = data[:, 16:].reshape(n, 4, 1, 32)
    q = NIBBLES.reshape(n, 8, 32)
    x = (D * scales)[:, :, None] * q SIGN (DMIN * mins)[:, :, None]
    return x.reshape(n, 256).astype(np.float32)
'''
Q4K_RIGHT = {
    "CHECK": "check_data(data, 144)", "ORDER": '"<f2"', "LOW_S": "(s[:, 8:12] & 15)", "LOW_M": "(s[:, 8:12] >> 4)",
    "HIGH_S": "s[:, 0:4]", "HIGH_M": "s[:, 4:8]", "SHIFT": "4", "NIBBLES": "np.concatenate([chunks & 15, chunks >> 4], axis=2)",
    "SIGN": "-", "DMIN": "dmin", "D ": "d ",
}  # fmt: skip


def q8_version(**changes):
    return version(Q8, Q8_RIGHT, **changes)


def q4_version(**changes):
    return version(Q4, Q4_RIGHT, **changes)


def q4k_version(**changes):
    return version(Q4K, Q4K_RIGHT, **changes)


def notebook_solution(name: str) -> str:
    """The source notebook's solution of `name`, its SOLUTION markers removed."""
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == name:
            return "\n".join(line for line in cell.source.splitlines() if "### " not in line)
    raise KeyError(name)


def header_version(*replacements: tuple[str, str]) -> str:
    source = notebook_solution("parse_header")
    for old, new in replacements:
        assert source.count(old) == 1, (old, source.count(old))
        source = source.replace(old, new)
    return source


PADDED = "(pos + alignment - 1) // alignment * alignment"

# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "quantize_q8_0": {
        "half_even": (q8_version(ROUND="np.rint(v)"), "round half to even"),
        "floor_plus_half": (q8_version(ROUND="np.sign(v) * np.floor(np.abs(v) + 0.5)"), "0.49999997"),
        "fp16_d_for_codes": (q8_version(D_USED="d.astype(np.float16).astype(np.float32)"), "fp16-rounded d"),
        "divides": (q8_version(VALUE="x / np.where(d == 0, np.float32(1), d)[:, None]"), "x / d instead of x * (1 / d)"),
        "float64": (q8_version(CHECK="check_blocks(blocks, 32).astype(np.float64)"), "computed in float64"),
        "float32_d": (q8_version(D_TYPE='"<f4"', D_BYTES="4"), "d stored as float32"),
        "big_endian_d": (q8_version(D_TYPE='">f2"'), "big-endian"),
        "unsigned_codes": (q8_version(CODES="(q + 128).astype(np.uint8)"), "shifted by 128"),
        "no_check": (q8_version(CHECK="blocks.reshape(-1, 32).astype(np.float32)"), "instead of raising ValueError"),
    },
    "quantize_q4_0": {
        "unsigned_absmax": (q4_version(PEAK="np.abs(x).max(axis=1)"), "absmax taken unsigned"),
        "half_even": (q4_version(CODES="np.clip(np.rint(x * inverse[:, None]) + 8, 0, 15)"), "round half to even"),
        "no_clip": (q4_version(CODES="np.clip(np.trunc(x * inverse[:, None] + np.float32(8.5)), 0, 255)"), "not clipped to 15"),
        "interleaved": (q4_version(PACK="q[:, 0::2] | (q[:, 1::2] << 4)"), "nibbles interleaved"),
        "swapped_nibbles": (q4_version(PACK="(q[:, :16] << 4) | q[:, 16:]"), "nibbles swapped"),
        "fp16_d_for_codes": (q4_version(D_USED="d.astype(np.float16).astype(np.float32)"), "fp16-rounded d"),
        "divides": (q4_version(CODES="np.clip(np.trunc(x / np.where(d == 0, np.float32(1), d)[:, None] + np.float32(8.5)), 0, 15)"),
                    "x / d instead of x * (1 / d)"),
        "float64": (q4_version(CHECK="check_blocks(blocks, 32).astype(np.float64)"), "computed in float64"),
        "one_byte_per_code": (q4_version(PACK="q"), "one byte per code"),
    },
    "dequantize_q4_k": {
        "high_bits_swapped": (q4k_version(HIGH_S="s[:, 4:8]", HIGH_M="s[:, 0:4]"), "top 2 bits of scales 4-7 and of mins 4-7 swapped"),
        "low_nibbles_swapped": (q4k_version(LOW_S="(s[:, 8:12] >> 4)", LOW_M="(s[:, 8:12] & 15)"), "nibbles of bytes 8-11 swapped"),
        "high_bits_not_shifted": (q4k_version(SHIFT="0"), "not shifted into place"),
        "q4_0_code_order": (q4k_version(NIBBLES="np.concatenate([data[:, 16:] & 15, data[:, 16:] >> 4], axis=1)"), "Q4_0's order"),
        "interleaved_codes": (q4k_version(NIBBLES="np.stack([data[:, 16:] & 15, data[:, 16:] >> 4], axis=2)"), "codes interleaved"),
        "high_nibble_first": (q4k_version(NIBBLES="np.concatenate([chunks >> 4, chunks & 15], axis=2)"), "high nibble read first"),
        "min_added": (q4k_version(SIGN="+"), "min added instead of subtracted"),
        "d_dmin_swapped": (q4k_version(**{"D ": "dmin ", "DMIN": "d"}), "d and dmin swapped"),
        "no_check": (q4k_version(CHECK="np.asarray(data).reshape(-1, 144).astype(np.uint8)"), "instead of raising"),
    },
    "parse_header": {
        "dims_not_reversed": (header_version(("tuple(reversed(dims))", "tuple(dims)")), "dims not reversed"),
        "alignment_ignored": (header_version(('metadata["general.alignment"].value if "general.alignment" in metadata else 32', "32")),
                              "general.alignment ignored"),
        "not_padded": (header_version((PADDED, "pos")), "not rounded up"),
        "absolute_offsets": (header_version(("return Header(", "tensors = {k: TensorInfo(t.name, t.qtype, t.shape, t.offset + "
                                             f"{PADDED}) for k, t in tensors.items()}}\n    return Header(")), "made absolute"),
        "latin1": (header_version(('decode("utf-8")', 'decode("latin-1")')), "Latin-1"),
        "bool_as_int": (header_version(("one(scalar_format(value_type))",
                                        '''one("<B" if value_type == ValueType.BOOL else scalar_format(value_type))''')), "BOOL values read as integers"),
        "item_type_dropped": (header_version(("MetadataValue(ValueType.ARRAY, items, ValueType(item_type))",
                                              "MetadataValue(ValueType.ARRAY, items)")), "item_type not recorded"),
        "big_endian": (header_version(('f"<{count}{fmt[1:]}"', 'f">{count}{fmt[1:]}"')), "big-endian"),
        "no_bounds_check": (header_version(("if pos + size > len(data):", "if False:"), ("if pos + length > len(data):", "if False:")),
                            "expected GGUFError"),
        "no_version_check": (header_version(("if version not in (2, 3):", "if False:")), "instead of raising GGUFError"),
    },
}  # fmt: skip

CORRECT = {
    "quantize_q8_0": {
        "gguf_py_roundf": '''
def quantize_q8_0(blocks):
    blocks = check_blocks(blocks, 32)
    d = abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        id = np.where(d == 0, 0, 1 / d)
    v = blocks * id
    a = abs(v)
    floored = np.floor(a)
    qs = np.sign(v) * (floored + np.floor(2 * (a - floored)))  # gguf-py's np_roundf
    d = d.astype(np.float16).view(np.uint8)
    return np.concatenate([d, qs.astype(np.int8).view(np.uint8)], axis=1)
''',
        "structured_loop": '''
def quantize_q8_0(blocks):
    x = check_blocks(blocks, 32)
    layout = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
    out = np.zeros(x.shape[0], dtype=layout)
    for i, row in enumerate(x):
        d = np.float32(np.abs(row).max()) / np.float32(127)
        inverse = np.float32(1) / d if d else np.float32(0)
        v = row * inverse
        out["d"][i] = d
        out["qs"][i] = np.where(v < 0, -np.floor(-v + np.float64(0.5)), np.floor(v.astype(np.float64) + 0.5))
    return out.view(np.uint8).reshape(x.shape[0], 34)
''',
    },
    "quantize_q4_0": {
        "gguf_py": '''
def quantize_q4_0(blocks):
    blocks = check_blocks(blocks, 32)
    n = blocks.shape[0]
    imax = abs(blocks).argmax(axis=-1, keepdims=True)
    max = np.take_along_axis(blocks, imax, axis=-1)
    d = max / -8
    with np.errstate(divide="ignore"):
        id = np.where(d == 0, 0, 1 / d)
    qs = np.trunc((blocks * id) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    qs = qs.reshape((n, 2, 16))
    qs = qs[..., 0, :] | (qs[..., 1, :] << np.uint8(4))
    d = d.astype(np.float16).view(np.uint8)
    return np.concatenate([d, qs], axis=-1)
''',
        "structured_loop": '''
def quantize_q4_0(blocks):
    x = check_blocks(blocks, 32)
    layout = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
    out = np.zeros(x.shape[0], dtype=layout)
    for i, row in enumerate(x):
        peak = row[int(np.argmax(np.abs(row)))]
        d = peak / np.float32(-8)
        inverse = np.float32(1) / d if d != 0 else np.float32(0)
        codes = [min(15, int(np.float32(value * inverse) + np.float32(8.5))) for value in row]
        out["d"][i] = d
        out["qs"][i] = [codes[j] + 16 * codes[j + 16] for j in range(16)]
    return out.view(np.uint8).reshape(x.shape[0], 18)
''',
    },
    "dequantize_q4_k": {
        "float64": '''
def dequantize_q4_k(data):
    data = check_data(data, 144)
    n = data.shape[0]
    d = data[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = data[:, 2:4].copy().view(np.float16).astype(np.float64)
    s = data[:, 4:16].astype(np.int64)
    scales = np.hstack([s[:, :4] % 64, s[:, 8:] % 16 + s[:, :4] // 64 * 16])
    mins = np.hstack([s[:, 4:8] % 64, s[:, 8:] // 16 + s[:, 4:8] // 64 * 16])
    qs = data[:, 16:].reshape(n, 4, 32).astype(np.int64)
    q = np.stack([qs % 16, qs // 16], axis=2).reshape(n, 8, 32)
    return ((d * scales)[..., None] * q - (dmin * mins)[..., None]).reshape(n, 256).astype(np.float32)
''',
        "llama_cpp_loops": '''
def dequantize_q4_k(data):
    data = check_data(data, 144)
    out = np.empty((data.shape[0], 256), np.float32)
    for b, block in enumerate(data):
        d, dmin = block[0:4].copy().view("<f2").astype(np.float32)
        s = [int(v) for v in block[4:16]]
        for j in range(8):  # llama.cpp's get_scale_min_k4
            if j < 4:
                sc, m = s[j] & 63, s[j + 4] & 63
            else:
                sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)
                m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4)
            chunk = block[16 + 32 * (j // 2) : 16 + 32 * (j // 2 + 1)]
            q = (chunk & 0xF) if j % 2 == 0 else (chunk >> 4)
            out[b, 32 * j : 32 * (j + 1)] = (d * np.float32(sc)) * q.astype(np.float32) - dmin * np.float32(m)
    return out
''',
    },
    "parse_header": {
        "cursor_class": '''
class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, size):
        if size > len(self.data) - self.pos:
            raise GGUFError("truncated")
        start, self.pos = self.pos, self.pos + size
        return self.data[start:self.pos]

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def text(self):
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8")

    def value(self, kind):
        if kind == ValueType.STRING:
            return MetadataValue(ValueType.STRING, self.text())
        if kind != ValueType.ARRAY:
            if scalar_format(kind) is None:
                raise GGUFError(f"value type {kind}")
            return MetadataValue(ValueType(kind), self.scalar(scalar_format(kind)))
        item, count = self.scalar("<I"), self.scalar("<Q")
        if item == ValueType.STRING:
            items = [self.text() for _ in range(count)]
        elif item == ValueType.ARRAY:
            items = [self.value(item) for _ in range(count)]
        elif scalar_format(item) is not None:
            fmt = scalar_format(item)
            items = [v for (v,) in struct.iter_unpack(fmt, self.take(count * struct.calcsize(fmt)))]
        else:
            raise GGUFError(f"item type {item}")
        return MetadataValue(ValueType.ARRAY, items, ValueType(item))


def parse_header(data):
    r = _Reader(data)
    if len(data) < 4 or r.take(4) != b"GGUF":
        raise GGUFError("not GGUF")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise GGUFError(f"version {version}")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.text()
        metadata[key] = r.value(r.scalar("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = r.text()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        qtype = ggml_type_name(r.scalar("<I"), name)
        tensors[name] = TensorInfo(name, qtype, tuple(dims[::-1]), r.scalar("<Q"))
    alignment = metadata.get("general.alignment", MetadataValue(ValueType.UINT32, 32)).value
    if alignment <= 0 or bin(alignment).count("1") != 1:
        raise GGUFError("alignment")
    return Header(version, metadata, tensors, alignment, -(-r.pos // alignment) * alignment)
''',
        "bytes_io": '''
import io


def _need(stream, size):
    chunk = stream.read(size)
    if len(chunk) != size:
        raise GGUFError(f"the data ends {size - len(chunk)} bytes early")
    return chunk


def _value(stream, kind):
    if kind == 8:
        return MetadataValue(ValueType.STRING, _need(stream, int.from_bytes(_need(stream, 8), "little")).decode())
    if kind == 9:
        item = int.from_bytes(_need(stream, 4), "little")
        count = int.from_bytes(_need(stream, 8), "little")
        if item in (8, 9):
            items = [_value(stream, item) for _ in range(count)]
            items = [v.value for v in items] if item == 8 else items
        elif scalar_format(item):
            fmt = scalar_format(item)
            items = list(struct.unpack(f"<{count}{fmt[1]}", _need(stream, count * struct.calcsize(fmt))))
        else:
            raise GGUFError("unknown item type")
        return MetadataValue(ValueType.ARRAY, items, ValueType(item))
    if not scalar_format(kind):
        raise GGUFError("unknown value type")
    fmt = scalar_format(kind)
    return MetadataValue(ValueType(kind), struct.unpack(fmt, _need(stream, struct.calcsize(fmt)))[0])


def parse_header(data):
    stream = io.BytesIO(bytes(data))
    magic = stream.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"magic {magic!r}")
    version, n_tensors, n_kv = struct.unpack("<IQQ", _need(stream, 20)) if len(data) >= 24 else (None, 0, 0)
    if version not in (2, 3):
        raise GGUFError(f"version {version}")
    metadata = {}
    for _ in range(n_kv):
        key = _value(stream, 8).value
        metadata[key] = _value(stream, int.from_bytes(_need(stream, 4), "little"))
    tensors = {}
    for _ in range(n_tensors):
        name = _value(stream, 8).value
        n_dims = int.from_bytes(_need(stream, 4), "little")
        dims = struct.unpack(f"<{n_dims}Q", _need(stream, 8 * n_dims))
        type_id, offset = struct.unpack("<IQ", _need(stream, 12))
        tensors[name] = TensorInfo(name, ggml_type_name(type_id, name), dims[::-1], offset)
    alignment = metadata["general.alignment"].value if "general.alignment" in metadata else 32
    if alignment & (alignment - 1) or not alignment:
        raise GGUFError("alignment")
    end = stream.tell()
    return Header(version, metadata, tensors, alignment, end + (-end) % alignment)
''',
    },
}

# Arguments the sandbox must hand over as they are (numpy arrays, bytes), and results it sends back.
PROBE = '''
def describe_arguments(*args):
    return [f"{type(a).__module__}.{type(a).__name__} {getattr(a, 'dtype', '')}" for a in args]


def echo(value):
    return value
'''


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab09"), extra_cells=(PROBE,)) as box:
        yield box


@pytest.mark.parametrize("function, name", [(f, v) for f, versions in WRONG.items() for v in versions])
def test_wrong_version_loses_points(sandbox, function, name):
    lost = check_loses_points(grade_version(LAB, sandbox, function, name), f"{function}__{name}", WRONG[function][name][1])
    if name in ("divides", "float64"):  # x / d or float64 change a code only next to a rounding boundary
        assert {r.name for r in lost} == {f"test_{function.removeprefix('quantize_')}_float_order"}, [r.name for r in lost]


@pytest.mark.parametrize("function, name", [(f, v) for f, versions in CORRECT.items() for v in versions] + [(f, None) for f in WRONG])
def test_correct_version_gets_full_marks(sandbox, function, name):
    check_full_marks(grade_version(LAB, sandbox, function, name))


def test_sandbox_carries_numpy_arrays_and_bytes(sandbox):
    kinds = sandbox.call("describe_arguments", np.zeros(3, np.float16), np.ones((2, 2), np.uint8), b"GGUF", torch.zeros(2))
    assert kinds == ["numpy.ndarray float16", "numpy.ndarray uint8", "builtins.bytes ", "torch.Tensor torch.float32"]
    back = sandbox.call("echo", np.arange(6, dtype=np.int8).reshape(2, 3))
    assert isinstance(back, torch.Tensor) and back.dtype == torch.int8 and back.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert sandbox.call("echo", b"\x00GGUF\xff") == b"\x00GGUF\xff"
    assert sandbox.call("echo", {"a": [np.float32(1.5)]}) == {"a": [torch.tensor(1.5)]}


def test_catalog_covers_every_graded_function():
    check_catalog_covers(LAB, WRONG, CORRECT)


def test_given_helpers_behave_like_the_reference(sandbox):
    """The notebook's given checks, tables and types are the reference's, so a learner who uses them
    is graded against the same rules."""
    suite = engine.load_suite(LAB)
    for x, _ in suite.bad_blocks():
        with pytest.raises(ValueError):
            Q.check_blocks(x, 32)
        with pytest.raises(LearnerError, match=" raised ValueError:"):
            sandbox.call("check_blocks", x, 32)
    good = suite.gaussian(3, 1)
    assert sandbox.call("check_blocks", good, 32).numpy().tobytes() == Q.check_blocks(good, 32).tobytes()
    data = suite.random_q4k(2, 2)
    for bad, error in ((data[:, :143], ValueError), (data.reshape(-1), ValueError), (data.astype(np.float32), TypeError)):
        with pytest.raises(error):
            Q.check_data(bad, 144)
        with pytest.raises(LearnerError, match=f" raised {error.__name__}:"):
            sandbox.call("check_data", bad, 144)
    for value_type in range(-1, 15):
        assert sandbox.call("scalar_format", value_type) == F.SCALAR_FORMATS.get(value_type)
    for type_id in range(40):
        if type_id in Q.TYPES_BY_ID:
            assert sandbox.call("ggml_type_name", type_id, "w") == Q.TYPES_BY_ID[type_id].name
        else:
            with pytest.raises(LearnerError, match=" raised GGUFError:"):
                sandbox.call("ggml_type_name", type_id, "w")
    given = {node.name: node for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"
             for node in ast.parse(cell.source).body if isinstance(node, ast.ClassDef)}  # fmt: skip
    members = [t.targets[0].id for t in given["ValueType"].body if isinstance(t, ast.Assign)]
    assert members == [v.name for v in F.ValueType]
    for name, reference in (("MetadataValue", F.MetadataValue), ("TensorInfo", F.TensorInfo), ("Header", F.Header)):
        fields = [n.target.id for n in given[name].body if isinstance(n, ast.AnnAssign)]
        assert fields == [f.name for f in reference.__dataclass_fields__.values()], name


@pytest.mark.slow
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_reference_raises():
    """The exception types the suite expects are those the reference raises for the same input."""
    suite = engine.load_suite(LAB)
    for data, why in suite.bad_headers():
        with pytest.raises(F.GGUFError):
            F.parse_header(data)
    for x, _ in suite.bad_blocks():
        for encode in (Q.quantize_q8_0, Q.quantize_q4_0):
            with pytest.raises(ValueError):
                encode(x)
    data = suite.random_q4k(2, 940)
    for bad, error in ((data[:, :143], ValueError), (data.reshape(1, 288), ValueError), (data.view(np.int8), TypeError)):
        with pytest.raises(error):
            Q.dequantize_q4_k(bad)


def test_suite_cases_stay_inside_what_is_defined():
    """No graded block makes 1 / d overflow (C leaves the codes undefined there, numpy's cast picks
    one), and the float-order groups really separate the float32 reciprocal from its variants."""
    suite = engine.load_suite(LAB)
    for qtype in ("Q8_0", "Q4_0"):
        blocks = suite.float_order_blocks(qtype)
        assert len(blocks) >= 3
        reference = suite.REFERENCE[qtype](blocks)
        for name, output in suite.VARIANTS[qtype](blocks).items():
            if name.startswith(("x / d instead", "computed in float64")):
                assert (output[:, 2:] != reference[:, 2:]).any(), name
    with np.errstate(over="raise", divide="ignore"):
        for x in (suite.gaussian(96, 910), suite.heavy_tailed(64, 911)):
            Q.reciprocal(np.abs(x).max(axis=1) / np.float32(127))


def test_test_cells_match_the_suite():
    check_test_cells_match_the_suite(LAB, NOTEBOOK)


def test_points_and_metadata():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    manual = sum(meta["points"] for _, meta in nbgrader_cells(notebook, "manual"))
    assert manual > 0 and sum(suite_points(LAB).values()) + manual >= 100
    assert notebook.metadata["quantcourse"] == {"lab": LAB}
    assert notebook.metadata["kernelspec"]["name"] == "quantcourse"
    ids = [c.metadata["nbgrader"]["grade_id"] for c in notebook.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "grade_id values must be unique"
    assert notebook.cells[-1].source.strip() == "report()"
    table = notebook.cells[0].source
    rows = re.findall(r"^\| \d\. [^|]+\| ([^|]+)\| ([\d +]+) \|$", table, flags=re.MULTILINE)
    stated = {}
    for functions, points in rows:
        for function, value in zip(re.findall(r"`(\w+)`", functions), points.split("+")):
            stated[f"09.{function}"] = float(value)
    assert stated == suite_points(LAB), "the introduction's table states each function's points"


def test_graded_functions_have_the_reference_signatures():
    """Same names, parameters and defaults as the reference (the lab promises it)."""
    check_reference_signatures(LAB, NOTEBOOK)


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    check_solution_cells_hold_only(NOTEBOOK)
