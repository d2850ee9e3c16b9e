"""Hidden suite of lab 09 (GGUF block formats and the file header).

Every case compares the learner's function with the course's reference: `reference_impl/gguf.py`
(the Q8_0 and Q4_0 encoders, byte for byte with gguf-py and llama.cpp, and the Q4_K decoder) and
`reference_impl/gguf_file.py` (`parse_header`). The learner's functions take and return numpy
arrays and bytes: the sandbox hands numpy arguments over as numpy arrays, and the results come
back here as tensors.

Case groups per function: fixed (hand-picked), randomized (seeded generators), real weights (rows
of all-MiniLM-L6-v2, which were never quantized; for the header, SmolLM2's own), edge cases, and
bad input, which must raise the exception type the reference raises.

- quantize_q8_0, quantize_q4_0: the bytes exactly. Edge cases: all-zero and constant blocks, two
  values of the same largest magnitude, x / d exactly on a half step, 0.49999997, -max (code 16
  before Q4_0's clip), a d too small for fp16 (the codes use the float32 d). The "float order"
  groups hold values where x * (1 / d) and x / d, or float32 and float64 arithmetic, give another
  code; they are found at run time among the float32 values within a few steps of each rounding
  boundary, and kept out of the other groups' blocks.
- dequantize_q4_k: float32 values to 2^-23 relative. Every product in the decoder is exact in
  float32 (an fp16 times a 6-bit integer times a 4-bit code), so only the final subtraction
  rounds; float64 arithmetic converted at the end gives the same values. Bytes from the
  reference encoder (llama.cpp's), random bytes (every bit of the packed scales in use) and
  hand-built blocks.
- parse_header: every field of the Header: version; the metadata in file order, each entry's
  type, value and item type (a bool must be a bool, an int an int, a float a float); the tensor
  infos in file order (name, type name, numpy shape, offset); alignment and data_offset.
  SmolLM2's header is graded with its three vocabulary arrays (49152 tokens, their types, 48900
  merges) cut to their first 256 entries and every other entry kept: the whole file's 150 000
  strings would take seconds to carry between the processes. The lab's visible test and its demo
  read the whole file.

Diagnosis: an encoding that differs is described field by field (d's two fp16 bytes or the codes,
the first differing block decoded weight by weight), a header by its first differing fields; the
outputs of common mistakes, computed by the small wrong implementations below, are named when the
learner's output matches one (round half to even, codes from the fp16 d, the unsigned absmax,
interleaved or swapped nibbles, a float32 d, big-endian bytes, the 6-bit scales unpacked with the
high bits mixed up, dims not reversed, the alignment ignored, ...).
"""

import dataclasses
import functools
import struct
import types

import numpy as np
import torch

from quantcourse.autograder import testing
from quantcourse.autograder.sandbox import LearnerError
from quantcourse.autograder.testing import Mismatch, describe_value, expect_raises, graded
from quantcourse.reference_impl import gguf as Q
from quantcourse.reference_impl import gguf_file as F

GRADED = {
    "quantize_q8_0": Q.quantize_q8_0,
    "quantize_q4_0": Q.quantize_q4_0,
    "dequantize_q4_k": Q.dequantize_q4_k,
    "parse_header": F.parse_header,
}
F32 = np.float32
ENCODER = {"Q8_0": "quantize_q8_0", "Q4_0": "quantize_q4_0"}
REFERENCE = {"Q8_0": Q.quantize_q8_0, "Q4_0": Q.quantize_q4_0}
LAYOUT = {
    "Q8_0": "2 bytes of fp16 d, then 32 int8 codes (34 bytes)",
    "Q4_0": "2 bytes of fp16 d, then 16 bytes holding two 4-bit codes each (18 bytes)",
}
MINILM_ROWS = ("encoder.layer.2.attention.self.query.weight", "encoder.layer.4.output.dense.weight")


def generator(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian(n: int, seed: int, width: int = 32) -> np.ndarray:
    """[n, width] float32: Gaussian rows at scales from 1e-3 to 10, 2% of the values 6x larger."""
    g = generator(seed)
    x = g.standard_normal((n, width)) * np.exp(g.uniform(np.log(1e-3), np.log(10), (n, 1)))
    return (x * np.where(g.random((n, width)) < 0.02, 6.0, 1.0)).astype(F32)


def heavy_tailed(n: int, seed: int, width: int = 32) -> np.ndarray:
    return (generator(seed).standard_t(3, (n, width)) * 0.02).astype(F32)


@functools.cache
def minilm(name: str) -> np.ndarray:
    """A weight of all-MiniLM-L6-v2 (trained in float32, never quantized), [out, in] float32."""
    from safetensors import safe_open

    from quantcourse.models import minilm_dir

    with safe_open(minilm_dir() / "model.safetensors", "np") as f:
        return np.ascontiguousarray(f.get_slice(name)[:64], dtype=F32)


def fp16_bytes(v: np.ndarray, order: str = "<") -> np.ndarray:
    """float32 (or float64: one rounding, straight to fp16) [n] -> [n, 2] bytes of fp16."""
    with np.errstate(over="ignore"):
        return np.asarray(v).astype(f"{order}f2").view(np.uint8).reshape(-1, 2)


def roundf(v: np.ndarray) -> np.ndarray:
    return Q.round_half_away(v)


def num(v) -> str:
    return f"{float(v):.9g}"


def diagnose(got: np.ndarray, variants: dict, rtol: float = 0.0) -> str:
    """' Your output matches a common mistake: ...', naming every known mistake whose output equals
    `got` (to `rtol`): on some cases two mistakes give the same bytes."""
    got = torch.from_numpy(np.ascontiguousarray(got))
    names = [name for name, v in variants.items()
             if testing.matching_variant(got, {name: torch.from_numpy(np.ascontiguousarray(v))}, rtol, 0.0)]  # fmt: skip
    if len(names) == 1:
        return f" Your output matches a common mistake: {names[0]}."
    if names:
        return " Your output matches common mistakes (this case cannot tell them apart): " + "; or ".join(names) + "."
    return ""


# ---------------------------------------------------------------------------------------------
# Known mistakes of the encoders: each a small wrong implementation, [n, 32] -> bytes


def q8_variants(x: np.ndarray) -> dict[str, np.ndarray]:
    amax = np.abs(x).max(axis=1)
    d = amax / F32(127)
    inv = Q.reciprocal(d)[:, None]

    def block(d_stored, q, order="<"):
        q = np.nan_to_num(q, nan=0.0, posinf=127, neginf=-127)
        return np.concatenate([fp16_bytes(d_stored, order), q.astype(np.int64).astype(np.int8).view(np.uint8)], axis=1)

    with np.errstate(all="ignore"):
        v = x * inv
        d64 = amax.astype(np.float64) / 127
        found = {
            "round half to even (np.round / np.rint): llama.cpp rounds halves away from zero, as C's roundf": block(d, np.rint(v)),
            "floor(|x / d| + 0.5) in float32: the sum rounds 0.49999997 up to 1.0 before the floor; round exactly "
            "(halves away from zero)": block(d, np.sign(v) * np.floor(np.abs(v) + F32(0.5))),
            "floor(x / d + 0.5): halves rounded up, so -0.5 becomes 0; llama.cpp rounds halves away from zero": block(d, np.floor(v + F32(0.5))),
            "trunc(x / d + 0.5): negative halves rounded toward zero; llama.cpp rounds halves away from zero": block(d, np.trunc(v + F32(0.5))),
            "the codes truncated instead of rounded": block(d, np.trunc(v)),
            "codes computed with the fp16-rounded d: llama.cpp divides by the float32 d (times its reciprocal) and "
            "rounds d to fp16 only to store it": block(d, roundf(x * Q.reciprocal(Q.fp16_value(fp16_bytes(d)))[:, None])),
            "x / d instead of x * (1 / d): llama.cpp multiplies by the float32 reciprocal of d, which rounds "
            "differently now and then": block(d, roundf(np.where(d[:, None] == 0, F32(0), x / d[:, None]))),
            "computed in float64: llama.cpp computes d, 1 / d and x * (1 / d) in float32": block(
                d64, roundf(np.where(d64[:, None] == 0, 0.0, x * (1 / d64)[:, None]))),
            "d = max|x| / 128: the codes must reach +-127, so d = max|x| / 127": block(amax / F32(128), roundf(x * Q.reciprocal(amax / F32(128))[:, None])),
            "d = max|x| / 255: Q8_0's codes are signed, -127..127, so d = max|x| / 127": block(amax / F32(255), roundf(x * Q.reciprocal(amax / F32(255))[:, None])),
            "the signed value of largest magnitude / 127 (Q4_0's rule): Q8_0 uses max|x| / 127": block(
                Q.signed_absmax(x) / F32(127), roundf(x * Q.reciprocal(Q.signed_absmax(x) / F32(127))[:, None])),
            "d's two bytes in big-endian order: GGUF is little-endian (the low byte first)": block(d, roundf(v), ">"),
            "codes shifted by 128 into 0..255: Q8_0 stores signed int8 codes (view them as uint8)": block(d, roundf(v) + 128),
        }  # fmt: skip
    return found


def pack_codes(q: np.ndarray, how: str = "gguf") -> np.ndarray:
    """[n, 32] codes -> [n, 16] bytes: GGUF's order, or a wrong one; no masking of codes above 15."""
    q = q.astype(np.int64)
    if how == "interleaved":
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
    elif how == "swapped":
        packed = (q[:, :16] << 4) | q[:, 16:]
    elif how == "masked":
        packed = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    else:
        packed = q[:, :16] | (q[:, 16:] << 4)
    return (packed & 0xFF).astype(np.uint8)


def q4_variants(x: np.ndarray) -> dict[str, np.ndarray]:
    peak = Q.signed_absmax(x)
    amax = np.abs(x).max(axis=1)
    d = peak / F32(-8)
    inv = Q.reciprocal(d)[:, None]

    def block(d_stored, q, how="gguf", order="<"):
        q = np.nan_to_num(q, nan=0.0, posinf=15, neginf=0)
        return np.concatenate([fp16_bytes(d_stored, order), pack_codes(q, how)], axis=1)

    def codes(d_used, v=None):
        v = x * Q.reciprocal(d_used)[:, None] if v is None else v
        return np.clip(np.trunc(v + F32(8.5)), 0, 15)

    with np.errstate(all="ignore"):
        right = codes(d)
        d64 = peak.astype(np.float64) / -8
        sym = amax / F32(7)
        found = {
            "the absmax taken unsigned, d = max|x| / -8: llama.cpp keeps the sign of the value of largest "
            "magnitude, d = max / -8, so that value lands on code 0": block(amax / F32(-8), codes(amax / F32(-8))),
            "d = max|x| / 8 (positive): d = max / -8 with the signed max puts the extreme on code 0, the end of "
            "the grid with the extra step": block(amax / F32(8), codes(amax / F32(8))),
            "d = max / 8: the sign of d flipped (d = max / -8)": block(peak / F32(8), codes(peak / F32(8))),
            "lab 01's symmetric grid, d = max|x| / 7 and codes round(x / d) + 8: Q4_0 uses d = max / -8 and "
            "trunc(x / d + 8.5)": block(sym, np.clip(roundf(x * Q.reciprocal(sym)[:, None]) + 8, 0, 15)),
            "round half to even, rint(x / d) + 8: llama.cpp truncates x / d + 8.5, which rounds halves up":
                block(d, np.clip(np.rint(x * inv) + 8, 0, 15)),
            "round half away from zero, roundf(x / d) + 8: llama.cpp truncates x / d + 8.5, which rounds halves "
            "up (-2.5 -> -2)": block(d, np.clip(roundf(x * inv) + 8, 0, 15)),
            "the codes not clipped to 15: x = -max gives x / d + 8.5 = 16.5, code 16, which spills into the "
            "next nibble": block(d, np.clip(np.trunc(x * inv + F32(8.5)), 0, None)),
            "the codes not clipped to 15 (code 16 masked to 0): clip to 0..15 before packing": block(
                d, np.clip(np.trunc(x * inv + F32(8.5)), 0, None), "masked"),
            "codes computed with the fp16-rounded d: llama.cpp uses the float32 d and its reciprocal, and rounds "
            "d to fp16 only to store it": block(d, codes(Q.fp16_value(fp16_bytes(d)))),
            "x / d instead of x * (1 / d): llama.cpp multiplies by the float32 reciprocal of d":
                block(d, codes(d, np.where(d[:, None] == 0, F32(0), x / d[:, None]))),
            "computed in float64: llama.cpp adds 8.5 to x * (1 / d) in float32, and that sum's rounding "
            "decides values next to a boundary": block(d64, np.clip(np.trunc(np.where(
                d64[:, None] == 0, 0.0, x * (1 / d64)[:, None]) + 8.5), 0, 15)),
            "the nibbles interleaved (byte j: weights 2j and 2j + 1): GGUF puts weight j in the low nibble of "
            "byte j and weight j + 16 in its high nibble": block(d, right, "interleaved"),
            "the nibbles swapped (weight j in the high nibble): weight j goes in the low nibble of byte j, "
            "weight j + 16 in the high one": block(d, right, "swapped"),
            "d's two bytes in big-endian order: GGUF is little-endian (the low byte first)": block(d, right, order=">"),
        }  # fmt: skip
    return found


VARIANTS = {"Q8_0": q8_variants, "Q4_0": q4_variants}


# ---------------------------------------------------------------------------------------------
# Checking an encoding


def width_hint(qtype: str, shape: tuple, expected: tuple) -> str:
    n, width = expected
    layout = f"one row per block: {LAYOUT[qtype]}"
    if len(shape) == 2 and shape[0] == n:
        if shape[1] == width + 2:
            return f"two bytes too many per block: d stored as float32? GGUF stores d as fp16; {layout}"
        if qtype == "Q4_0" and shape[1] == 34:
            return f"one byte per code? Pack two 4-bit codes into each byte; {layout}"
        if shape[1] == width - 2:
            return f"d is missing: each block starts with d's two fp16 bytes; {layout}"
    if len(shape) == 1 and shape[0] == n * width:
        return f"a flat array; {layout}"
    return layout


def learner_bytes(got, expected: np.ndarray, call: str, qtype: str) -> np.ndarray:
    """The learner's encoding as a uint8 array shaped like the reference's, or a Mismatch."""
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{call} should return a numpy uint8 array of shape {list(expected.shape)}, got {describe_value(got)}")
    if tuple(got.shape) != expected.shape:
        raise Mismatch(f"{call} returned shape {list(got.shape)}, expected {list(expected.shape)}: {width_hint(qtype, tuple(got.shape), expected.shape)}")
    if got.dtype != torch.uint8:
        dtype = str(got.dtype).removeprefix("torch.")
        raise Mismatch(f"{call} returned dtype {dtype}, expected uint8: a block is bytes (view d's fp16 array and the "
                       "codes as uint8 before putting them side by side)")  # fmt: skip
    return got.numpy()


def block_codes(data: np.ndarray, qtype: str) -> np.ndarray:
    """[n, 34|18] bytes -> [n, 32] codes in weight order (int8 for Q8_0, 0..15 for Q4_0)."""
    return data[:, 2:].view(np.int8).astype(np.int64) if qtype == "Q8_0" else Q.unpack_nibbles(data[:, 2:]).astype(np.int64)


def describe_difference(got: np.ndarray, expected: np.ndarray, x: np.ndarray, qtype: str) -> str:
    bad = got != expected
    rows = bad.any(axis=1)
    d_rows, q_rows = bad[:, :2].any(axis=1), bad[:, 2:].any(axis=1)
    width = expected.shape[1]
    text = (f"{int(rows.sum())} of {len(rows)} blocks differ: d (bytes 0-1, fp16) in {int(d_rows.sum())}, "
            f"the codes (bytes 2-{width - 1}) in {int(q_rows.sum())}")  # fmt: skip
    b = int(np.argmax(rows))
    peak = int(np.abs(x[b]).argmax())
    text += f". Block {b} (its value of largest magnitude: x[{peak}] = {num(x[b, peak])})"
    if d_rows[b]:
        g, e = got[b, :2], expected[b, :2]
        text += (f": d bytes {g[0]:#04x} {g[1]:#04x} (fp16 {num(Q.fp16_value(g[None])[0])}), expected {e[0]:#04x} "
                 f"{e[1]:#04x} (fp16 {num(Q.fp16_value(e[None])[0])})")  # fmt: skip
    if q_rows[b]:
        g, e = block_codes(got[b : b + 1], qtype)[0], block_codes(expected[b : b + 1], qtype)[0]
        j = int(np.argmax(g != e))
        text += (f"{';' if d_rows[b] else ':'} {int((g != e).sum())} of 32 codes differ (read in GGUF's order), the "
                 f"first at weight {j}: x = {num(x[b, j])} got code {g[j]}, expected {e[j]}")  # fmt: skip
    return text


def check_encoder(learner, qtype: str, x: np.ndarray, what: str = "") -> None:
    name = ENCODER[qtype]
    call = f"{name}(blocks [{x.shape[0]}, 32] float32){what}"
    with np.errstate(all="ignore"):
        expected = REFERENCE[qtype](x)
    got = learner_bytes(getattr(learner, name)(x), expected, call, qtype)
    if np.array_equal(got, expected):
        return
    raise Mismatch(f"{call}: {describe_difference(got, expected, x, qtype)}." + diagnose(got, VARIANTS[qtype](x)))


def near_boundaries(d: np.float32, centres: np.ndarray, steps: int = 3) -> np.ndarray:
    """float32 values within `steps` float32 steps of centre * d for each centre (a grid boundary)."""
    base = (centres.astype(F32) * d).astype(F32)
    values, up, down = [base], base, base
    for _ in range(steps):
        up, down = np.nextafter(up, F32(np.inf)), np.nextafter(down, F32(-np.inf))
        values += [up, down]
    return np.concatenate(values)


def float_order_blocks(qtype: str) -> np.ndarray:
    """Blocks whose codes change when x / d replaces x * (1 / d) or float64 replaces float32.

    For each block peak a, the candidates are the float32 values next to a rounding boundary of
    the grid d(a); each is tried in a probe block [a, value, 0, ...], and those whose code differs
    under either variant are packed, 31 at a time, into blocks that start with a."""
    variants = VARIANTS[qtype]
    names = [n for n in variants(np.ones((1, 32), F32)) if n.startswith(("x / d instead", "computed in float64"))]
    blocks = []
    for a in (1.0, 0.7, -0.3, 3.3, -0.05, 12.9, 200.0):
        a = F32(a)
        if qtype == "Q8_0":
            d, centres = a / F32(127), np.arange(-126, 126) + 0.5
        else:
            d, centres = a / F32(-8), np.arange(1, 17) - 8.5
        values = near_boundaries(abs(d) if qtype == "Q8_0" else d, centres)
        values = np.unique(values[np.abs(values) < abs(a)])
        probe = np.zeros((len(values), 32), F32)
        probe[:, 0], probe[:, 1] = a, values
        expected, found = REFERENCE[qtype](probe), variants(probe)
        differ = np.zeros(len(values), bool)
        for name in names:  # the codes only: float64 may also round d to another fp16 value
            differ |= (found[name][:, 2:] != expected[:, 2:]).any(axis=1)
        picked = values[differ]
        for start in range(0, len(picked), 31):
            row = np.zeros(32, F32)
            row[0], chunk = a, picked[start : start + 31]
            row[1 : 1 + len(chunk)] = chunk
            blocks.append(row)
    return np.stack(blocks)


def bad_blocks() -> list:
    x = gaussian(4, 90)
    return [
        (x[:, :31], "a block holds 32 weights: blocks [n, 31] cannot be encoded"),
        (x.reshape(-1), "blocks must be 2-D, [n, 32] (reshape a weight row to rows of 32 first)"),
        (x.reshape(2, 64), "a block holds 32 weights, not 64"),
        (x.reshape(4, 32, 1), "blocks must be 2-D, [n, 32]"),
    ]


def check_refuses(learner, qtype: str) -> None:
    name = ENCODER[qtype]
    for x, why in bad_blocks():
        call = f"{name}(blocks of shape {list(x.shape)})"
        expect_raises(lambda: getattr(learner, name)(x), (ValueError,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# quantize_q8_0


@graded("09.quantize_q8_0", points=4)
def test_q8_0_fixed(learner):
    ramp = np.arange(32, dtype=F32) - 16  # max|x| = 16 at index 0
    halves = np.zeros(32, F32)
    halves[:8] = [127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5]  # d = 1: every code a tie
    mixed = np.array([0.1 * k * (-1) ** k for k in range(32)], F32)  # the extreme is negative: -3.1
    check_encoder(learner, "Q8_0", ramp[None], " (the ramp -16 .. 15)")
    check_encoder(learner, "Q8_0", halves[None], " (d = 1 and x on half steps: ties)")
    check_encoder(learner, "Q8_0", np.stack([ramp, halves, mixed]), " (three blocks)")


@graded("09.quantize_q8_0", points=5)
def test_q8_0_randomized(learner):
    check_encoder(learner, "Q8_0", gaussian(96, 910), " (Gaussian blocks at scales 1e-3 to 10)")
    check_encoder(learner, "Q8_0", heavy_tailed(64, 911), " (heavy-tailed blocks)")
    check_encoder(learner, "Q8_0", (generator(912).random((32, 32)) * 50).astype(F32), " (positive values only)")


@graded("09.quantize_q8_0", points=3)
def test_q8_0_real_weights(learner):
    for name in MINILM_ROWS:
        check_encoder(learner, "Q8_0", minilm(name).reshape(-1, 32), f" (MiniLM's {name}, 64 rows)")


@graded("09.quantize_q8_0", points=4)
def test_q8_0_edge_cases(learner):
    rows = np.zeros((7, 32), F32)
    rows[1] = 3.0  # constant
    rows[2] = -2.0
    rows[3, :3] = [5.0, -5.0, 1.0]  # two values of the largest magnitude
    rows[4, :6] = [127.0, 0.49999997, -0.49999997, 0.50000006, 63.5, -63.5]  # d = 1: just below and above a half
    rows[5, :4] = [1e-36, -4e-37, 3e-37, 1e-38]  # d = 7.9e-39: fp16 stores 0, the codes use the float32 d
    rows[6, :3] = [6e4, -1e4, 0.3]  # d near fp16's range
    check_encoder(learner, "Q8_0", rows[:1], " (a block of zeros: d = 0, every code 0)")
    check_encoder(learner, "Q8_0", rows, " (zeros, constants, ties in |max|, values next to a half, a d below fp16's range)")


@graded("09.quantize_q8_0", points=3)
def test_q8_0_float_order(learner):
    check_encoder(learner, "Q8_0", float_order_blocks("Q8_0"), " (values where x * (1 / d), x / d and float64 give different codes)")


@graded("09.quantize_q8_0", points=3)
def test_q8_0_refuses_bad_input(learner):
    check_refuses(learner, "Q8_0")


# ---------------------------------------------------------------------------------------------
# quantize_q4_0


@graded("09.quantize_q4_0", points=4)
def test_q4_0_fixed(learner):
    ramp = np.arange(32, dtype=F32) - 16  # the extreme -16 is negative: d = 2, code 0
    positive = np.linspace(-1.1, 3.3, 32, dtype=F32)  # the extreme 3.3 is positive: d < 0
    check_encoder(learner, "Q4_0", ramp[None], " (the ramp -16 .. 15)")
    check_encoder(learner, "Q4_0", positive[None], " (-1.1 .. 3.3: the extreme is positive)")
    check_encoder(learner, "Q4_0", np.stack([ramp, positive, -positive]), " (three blocks)")


@graded("09.quantize_q4_0", points=4)
def test_q4_0_nibble_layout(learner):
    steps = np.tile(np.arange(-8, 8, dtype=F32), 2)  # d = 1: codes 0..15 twice
    distinct = np.concatenate([np.arange(-8, 8), np.arange(7, -9, -1)]).astype(F32)  # weight j and j + 16 differ
    check_encoder(learner, "Q4_0", steps[None], " (codes 0..15, then 0..15 again)")
    check_encoder(learner, "Q4_0", distinct[None], " (weights j and j + 16 on different codes)")


@graded("09.quantize_q4_0", points=5)
def test_q4_0_randomized(learner):
    check_encoder(learner, "Q4_0", gaussian(96, 920), " (Gaussian blocks at scales 1e-3 to 10)")
    check_encoder(learner, "Q4_0", heavy_tailed(64, 921), " (heavy-tailed blocks)")
    check_encoder(learner, "Q4_0", -(generator(922).random((32, 32)) * 50).astype(F32), " (negative values only)")


@graded("09.quantize_q4_0", points=3)
def test_q4_0_real_weights(learner):
    for name in MINILM_ROWS:
        check_encoder(learner, "Q4_0", minilm(name).reshape(-1, 32), f" (MiniLM's {name}, 64 rows)")


@graded("09.quantize_q4_0", points=5)
def test_q4_0_edge_cases(learner):
    rows = np.zeros((8, 32), F32)
    rows[1] = 3.0  # constant positive: every code 0
    rows[2] = -2.0
    rows[3, :3] = [5.0, -5.0, 1.0]  # |max| tied, the positive first: -5 lands on code 16, clipped to 15
    rows[4, :3] = [-5.0, 5.0, 1.0]  # the same tie, the negative first
    rows[5] = np.arange(-16, 16, dtype=F32) / 2  # d = 1: half steps everywhere
    rows[6, :4] = [1e-36, -4e-37, 3e-37, 1e-38]  # d below fp16's range
    rows[7, :3] = [6e4, -1e4, 0.3]
    check_encoder(learner, "Q4_0", rows[:1], " (a block of zeros: d = 0, every code 8)")
    check_encoder(learner, "Q4_0", rows[3:5], " (two values of the largest magnitude, +5 and -5)")
    check_encoder(learner, "Q4_0", rows, " (zeros, constants, ties in |max|, half steps, a d below fp16's range)")


@graded("09.quantize_q4_0", points=3)
def test_q4_0_float_order(learner):
    check_encoder(learner, "Q4_0", float_order_blocks("Q4_0"), " (values where x * (1 / d) + 8.5, x / d and float64 give different codes)")


@graded("09.quantize_q4_0", points=2)
def test_q4_0_refuses_bad_input(learner):
    check_refuses(learner, "Q4_0")


# ---------------------------------------------------------------------------------------------
# dequantize_q4_k


def q4k_block(d: float, dmin: float, scales, mins, codes) -> np.ndarray:
    """One Q4_K super-block [144] uint8 from its fields, in GGUF's layout (the reference's packing)."""
    ls, lm = np.asarray(scales, np.uint8)[None], np.asarray(mins, np.uint8)[None]
    parts = [fp16_bytes(np.array([d])), fp16_bytes(np.array([dmin])), Q.pack_scales_k4(ls, lm),
             Q.pack_q4_k_codes(np.asarray(codes, np.uint8)[None])]  # fmt: skip
    return np.concatenate(parts, axis=1)[0]


def random_q4k(n: int, seed: int) -> np.ndarray:
    """[n, 144] random bytes, d and dmin random finite fp16 values (some zero)."""
    g = generator(seed)
    data = g.integers(0, 256, (n, 144), dtype=np.uint8)
    scale = np.exp(g.uniform(np.log(1e-5), np.log(1.0), (n, 2))) * (g.random((n, 2)) > 0.05)
    data[:, :4] = fp16_bytes(scale.reshape(-1)).reshape(n, 4)
    return data


def q4k_fields(data: np.ndarray):
    """(d [n], dmin [n], scales [n, 8], mins [n, 8], codes [n, 8, 32]) read the reference's way."""
    d, dmin = Q.fp16_value(data[:, 0:2]), Q.fp16_value(data[:, 2:4])
    ls, lm = Q.unpack_scales_k4(data[:, 4:16])
    return d, dmin, ls, lm, Q.unpack_q4_k_codes(data[:, 16:]).reshape(-1, 8, 32)


def q4k_assemble(d, dmin, ls, lm, q, sign: float = -1.0) -> np.ndarray:
    scale = (d[:, None] * ls.astype(F32))[..., None]
    offset = (dmin[:, None] * lm.astype(F32))[..., None]
    return (scale * q.astype(F32) + F32(sign) * offset).reshape(-1, 256).astype(F32)


def bitstream_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bits = np.unpackbits(s, axis=1, bitorder="little").reshape(-1, 16, 6)
    values = (bits * (1 << np.arange(6))).sum(axis=2).astype(np.uint8)
    return values[:, :8], values[:, 8:]


def q4k_variants(data: np.ndarray) -> dict[str, np.ndarray]:
    d, dmin, ls, lm, q = q4k_fields(data)
    s = data[:, 4:16]
    first, second, third = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    qs = data[:, 16:]

    def scales(high_s, high_m, low_s, low_m, shift=4):
        return (np.concatenate([first & 63, low_s | ((high_s >> 6) << shift)], axis=1),
                np.concatenate([second & 63, low_m | ((high_m >> 6) << shift)], axis=1))  # fmt: skip

    with np.errstate(all="ignore"):
        found = {
            "the top 2 bits of scales 4-7 and of mins 4-7 swapped: scale j + 4 takes the top bits of byte j "
            "(a scale byte), min j + 4 those of byte j + 4 (a min byte)": q4k_assemble(d, dmin, *scales(second, first, third & 15, third >> 4), q),
            "the nibbles of bytes 8-11 swapped: the low nibble holds scale j + 4's low 4 bits, the high nibble "
            "min j + 4's": q4k_assemble(d, dmin, *scales(first, second, third >> 4, third & 15), q),
            "the top 2 bits of scales and mins 4-7 not shifted into place: they are bits 4 and 5 of the 6-bit "
            "value, (byte >> 6) << 4": q4k_assemble(d, dmin, *scales(first, second, third & 15, third >> 4, 0), q),
            "scales and mins 4-7 without their top 2 bits (the top bits of bytes 0-7)": q4k_assemble(
                d, dmin, np.concatenate([first & 63, third & 15], axis=1), np.concatenate([second & 63, third >> 4], axis=1), q),
            "the 16 six-bit values read as one bit stream: llama.cpp packs scales and mins 0-3 in the low 6 bits "
            "of bytes 0-7, 4-7 in bytes 8-11 and the top bits of bytes 0-7": q4k_assemble(d, dmin, *bitstream_scales(s), q),
            "the codes in Q4_0's order over the whole super-block (byte l: weights l and l + 128): Q4_K packs each "
            "64 weights in 32 bytes, weight l low and l + 32 high": q4k_assemble(
                d, dmin, ls, lm, np.concatenate([qs & 15, qs >> 4], axis=1).reshape(-1, 8, 32)),
            "the codes interleaved (byte l: weights 2l and 2l + 1): in each 64 weights, byte l holds weight l "
            "(low nibble) and weight l + 32 (high)": q4k_assemble(
                d, dmin, ls, lm, np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)),
            "the high nibble read first: the low nibble of byte l holds weight l, the high nibble weight l + 32":
                q4k_assemble(d, dmin, ls, lm, q.reshape(-1, 4, 2, 32)[:, :, ::-1].reshape(-1, 8, 32)),
            "the min added instead of subtracted: x = d * sc * q - dmin * m": q4k_assemble(d, dmin, ls, lm, q, +1.0),
            "d and dmin swapped: d comes first (bytes 0-1), dmin second (bytes 2-3)": q4k_assemble(dmin, d, ls, lm, q),
            "the codes centred like Q4_0's (q - 8): Q4_K's codes run 0..15 and the min does the shifting":
                q4k_assemble(d, dmin, ls, lm, q.astype(np.int64) - 8),
            "the min left out: x = d * sc * q - dmin * m": q4k_assemble(d, dmin, ls, lm, q, 0.0),
            "d and dmin read big-endian: GGUF is little-endian": q4k_assemble(
                np.ascontiguousarray(data[:, 0:2]).view(">f2").reshape(-1).astype(F32),
                np.ascontiguousarray(data[:, 2:4]).view(">f2").reshape(-1).astype(F32), ls, lm, q),
            "d * sc and dmin * m multiplied in float16: convert d and dmin to float32 first": (
                (d.astype(np.float16)[:, None] * ls.astype(np.float16))[..., None].astype(F32) * q.astype(F32)
                - (dmin.astype(np.float16)[:, None] * lm.astype(np.float16))[..., None].astype(F32)).reshape(-1, 256),
        }  # fmt: skip
    return found


def check_q4k(learner, data: np.ndarray, what: str = "") -> None:
    n = data.shape[0]
    call = f"dequantize_q4_k(data [{n}, 144] uint8){what}"
    expected = Q.dequantize_q4_k(data)
    got = learner.dequantize_q4_k(data)
    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{call} should return a numpy float32 array of shape [{n}, 256], got {describe_value(got)}")
    if tuple(got.shape) != expected.shape:
        hint = " (one row of 256 weights per super-block)" if got.numel() == expected.size else ""
        raise Mismatch(f"{call} returned shape {list(got.shape)}, expected [{n}, 256]{hint}")
    if got.dtype != torch.float32:
        raise Mismatch(f"{call} returned dtype {str(got.dtype).removeprefix('torch.')}, expected float32")
    values = got.numpy()
    rtol = 2.0**-23
    close = np.isclose(values.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=0.0, equal_nan=True)
    if close.all():
        return
    wrong = ~close.reshape(n, 8, 32).all(axis=2)  # [n, 8] sub-blocks with a wrong value
    b, j = (int(i) for i in np.argwhere(~close)[0])
    d, dmin, ls, lm, q = q4k_fields(data[b : b + 1])
    message = (f"{call}: {int((~close).sum())} of {close.size} values differ, in {int(wrong.sum())} of {wrong.size} "
               f"sub-blocks of 32; first in super-block {b} at weight {j} (sub-block {j // 32}): got {num(values[b, j])}, "
               f"expected {num(expected[b, j])} = {num(d[0])} * {ls[0, j // 32]} * {q[0, j // 32, j % 32]} - {num(dmin[0])} * "
               f"{lm[0, j // 32]} (d * scale * code - dmin * min)")  # fmt: skip
    if not wrong[:, :4].any():
        message += (". Sub-blocks 0-3 are right and only 4-7 differ: their 6-bit scales and mins are split between "
                    "bytes 8-11 (low 4 bits) and the top 2 bits of bytes 0-7")  # fmt: skip
    variants = {name: np.asarray(v, dtype=F32) for name, v in q4k_variants(data).items()}
    raise Mismatch(message + "." + diagnose(values, variants, rtol))


@graded("09.dequantize_q4_k", points=4)
def test_q4_k_fixed(learner):
    codes = np.arange(256) % 16
    one = q4k_block(1.0, 0.5, [1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6, 7], codes)
    high = q4k_block(0.25, 0.125, [63, 17, 32, 48, 40, 33, 62, 16], [16, 63, 1, 47, 63, 32, 17, 50], codes[::-1])
    check_q4k(learner, one[None], " (d = 1, dmin = 0.5, scales 1..8, mins 0..7, codes 0..15 repeated)")
    check_q4k(learner, high[None], " (scales and mins with their top 2 bits set)")
    check_q4k(learner, np.stack([one, high]), " (two super-blocks)")


@graded("09.dequantize_q4_k", points=5)
def test_q4_k_llama_cpp_bytes(learner):
    g = generator(930)
    x = (g.standard_normal((16, 256)) * np.exp(g.uniform(-6, 1, (16, 1)))).astype(F32)
    check_q4k(learner, Q.quantize_q4_k(x), " (llama.cpp's encoding of Gaussian super-blocks)")
    check_q4k(learner, Q.quantize_q4_k(np.abs(x) + F32(0.1)), " (llama.cpp's encoding of positive values: every min 0)")


@graded("09.dequantize_q4_k", points=5)
def test_q4_k_random_bytes(learner):
    check_q4k(learner, random_q4k(64, 931), " (random bytes: every bit of the packed scales and mins in use)")


@graded("09.dequantize_q4_k", points=4)
def test_q4_k_real_weights(learner):
    w = minilm("encoder.layer.4.output.dense.weight")[:8]  # rows of 1536: 6 super-blocks each
    check_q4k(learner, Q.quantize_q4_k(w.reshape(-1, 256)), " (llama.cpp's encoding of 8 rows of MiniLM's layer 4 FFN output)")
    check_q4k(learner, Q.quantize_q4_k(w.reshape(-1, 256), search=False), " (the same rows, min-max rounding)")


@graded("09.dequantize_q4_k", points=4)
def test_q4_k_edge_cases(learner):
    zero = np.zeros(144, np.uint8)
    only_min = q4k_block(0.0, 0.75, [5] * 8, [63, 0, 1, 2, 60, 61, 62, 63], np.full(256, 15))
    extremes = q4k_block(65504.0, 65504.0, [63] * 8, [63] * 8, np.full(256, 15))
    tiny = q4k_block(6e-8, 1e-7, [63, 1, 0, 2, 3, 4, 5, 6], [1, 0, 63, 2, 3, 4, 5, 6], np.arange(256) % 16)
    check_q4k(learner, zero[None], " (all bytes zero)")
    check_q4k(learner, np.stack([zero, only_min, extremes, tiny]), " (zeros; d = 0 with dmin > 0; fp16's largest d and dmin; subnormal d and dmin)")
    check_q4k(learner, np.zeros((0, 144), np.uint8), " (no super-blocks: [0, 144] -> [0, 256])")


@graded("09.dequantize_q4_k", points=2)
def test_q4_k_refuses_bad_input(learner):
    data = random_q4k(2, 940)
    bad = [
        (data[:, :143], ValueError, "a Q4_K super-block is 144 bytes"),
        (data.reshape(-1), ValueError, "the data must be 2-D, [n, 144]"),
        (data.reshape(1, 288), ValueError, "a Q4_K super-block is 144 bytes, not 288"),
        (data.astype(np.float32), TypeError, "the data are bytes: uint8"),
        (data.view(np.int8), TypeError, "the data are bytes: uint8, not int8"),
    ]
    for array, error, why in bad:
        call = f"dequantize_q4_k(data of shape {list(array.shape)}, dtype {array.dtype})"
        expect_raises(lambda: learner.dequantize_q4_k(array), (error,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# parse_header: files built here, and their expected Header


def mv(vtype: F.ValueType, value, item_type=None) -> F.MetadataValue:
    return F.MetadataValue(vtype, value, item_type)


def gguf_bytes(metadata: dict, tensors: list, version: int = 3, magic: bytes = F.MAGIC, tail: int = 40) -> tuple[bytes, int]:
    """A GGUF file's first bytes: header, metadata, tensor infos, then `tail` bytes of data.

    metadata: key -> MetadataValue; tensors: (name, numpy shape, type name or GGML id, offset).
    Returns (bytes, where the tensor infos end)."""
    parts = [magic, struct.pack("<IQQ", version, len(tensors), len(metadata))]
    for key, value in metadata.items():
        parts += [F.pack_string(key), struct.pack("<I", value.type), F.pack_value(value)]
    for name, shape, qtype, offset in tensors:
        type_id = qtype if isinstance(qtype, int) else Q.block_type(qtype).ggml_type
        parts += [F.pack_string(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}Q", *reversed(shape)),
                  struct.pack("<IQ", type_id, offset)]  # fmt: skip
    head = b"".join(parts)
    return head + bytes(range(tail)), len(head)


def canonical(value):
    """A metadata value with its Python type made explicit: a bool is not the int 1. numpy numbers
    and arrays (they arrive as tensors) count as the Python numbers and lists they hold."""
    if isinstance(value, torch.Tensor):
        return canonical(value.item()) if value.dim() == 0 else canonical(value.tolist())
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, (list, tuple)):
        return ("list", [canonical(v) for v in value])
    if isinstance(value, (dict, types.SimpleNamespace)):
        return ("value", entry(value, "an array item"))
    return ("other", repr(value)[:60])


def field(obj, name: str, where: str):
    if isinstance(obj, dict) and name in obj:
        return obj[name]
    if not isinstance(obj, dict) and hasattr(obj, name):
        return getattr(obj, name)
    raise Mismatch(f"{where} has no field {name!r} (got {describe_value(obj)}): use the given dataclasses, "
                   "Header, MetadataValue and TensorInfo")  # fmt: skip


def entry(value, where: str) -> tuple:
    item = field(value, "item_type", where)
    return (field(value, "type", where), canonical(field(value, "value", where)), None if item is None else item)


def as_int(value):
    """A numpy integer (a 0-dim tensor here) as the Python int it holds; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        return int(value.item())
    return value


def plain_header(header, who: str = "parse_header(...)") -> dict:
    """A Header (the reference's, or the learner's as it arrives here) as comparable plain data."""
    if dataclasses.is_dataclass(header):
        header = dataclasses.asdict(header)
    where = f"the Header {who} returned"
    metadata, tensors = field(header, "metadata", where), field(header, "tensors", where)
    for name, value in (("metadata", metadata), ("tensors", tensors)):
        if not isinstance(value, dict):
            raise Mismatch(f"{where}: {name} should be a dict (name -> entry, in file order), got {describe_value(value)}")
    infos = []
    for name, info in tensors.items():
        at = f"tensors[{name!r}]"
        shape = field(info, "shape", at)
        shape = tuple(as_int(s) for s in shape) if isinstance(shape, (list, tuple, torch.Tensor)) else shape
        infos.append((name, (field(info, "name", at), field(info, "qtype", at), shape, as_int(field(info, "offset", at)))))
    return {
        "version": canonical(field(header, "version", where)),
        "metadata": [(key, entry(value, f"metadata[{key!r}]")) for key, value in metadata.items()],
        "tensors": infos,
        "alignment": canonical(field(header, "alignment", where)),
        "data_offset": canonical(field(header, "data_offset", where)),
    }


def show(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        kind, raw = value
        if kind == "list":
            return f"a list of {len(raw)} items"
        if kind == "value":
            return f"a MetadataValue of type {raw[0]}"
        return f"{raw!r} ({kind})" if kind in ("bool", "int", "float", "str") else f"{raw!r}"[:80]
    return repr(value)[:80]


def value_difference(got, expected, path: str) -> str | None:
    if got == expected:
        return None
    if got[0] == expected[0] == "list":
        if len(got[1]) != len(expected[1]):
            return f"{path} holds {len(got[1])} items, expected {len(expected[1])}"
        i = next(i for i, (g, e) in enumerate(zip(got[1], expected[1])) if g != e)
        return value_difference(got[1][i], expected[1][i], f"{path}[{i}]")
    if got[0] == expected[0] == "value":
        return entry_difference(got[1], expected[1], path)
    return f"{path} = {show(got)}, expected {show(expected)}"


def entry_difference(got: tuple, expected: tuple, path: str) -> str | None:
    for name, g, e in zip(("type", "value", "item_type"), got, expected):
        if name == "value":
            found = value_difference(g, e, f"{path}.value")
            if found:
                return found
        elif g != e:
            return f"{path}.{name} = {g!r}, expected {int(e) if e is not None else None!r}"
    return None


def header_differences(got: dict, expected: dict) -> list[str]:
    found = []
    if got["version"] != expected["version"]:
        found.append(f"version = {show(got['version'])}, expected {show(expected['version'])}")
    keys, expected_keys = [k for k, _ in got["metadata"]], [k for k, _ in expected["metadata"]]
    if keys != expected_keys:
        missing = [k for k in expected_keys if k not in keys]
        extra = [k for k in keys if k not in expected_keys]
        found.append(f"the metadata keys differ: {len(keys)} keys, expected {len(expected_keys)}"
                     + (f"; missing {missing[:3]}" if missing else "") + (f"; unexpected {extra[:3]}" if extra else "")
                     + ("; the same keys in another order (keep the file's order)" if not missing and not extra else ""))  # fmt: skip
    else:
        for (key, g), (_, e) in zip(got["metadata"], expected["metadata"]):
            difference = entry_difference(g, e, f"metadata[{key!r}]")
            if difference:
                found.append(difference)
    names, expected_names = [n for n, _ in got["tensors"]], [n for n, _ in expected["tensors"]]
    if names != expected_names:
        i = next((i for i, (a, b) in enumerate(zip(names, expected_names)) if a != b), min(len(names), len(expected_names)))
        got_name = repr(names[i]) if i < len(names) else "nothing"
        expected_name = repr(expected_names[i]) if i < len(expected_names) else "nothing"
        found.append(f"the tensor names differ: {len(names)} tensors, expected {len(expected_names)}; tensor {i} is "
                     f"{got_name}, expected {expected_name}")  # fmt: skip
    else:
        for (name, g), (_, e) in zip(got["tensors"], expected["tensors"]):
            for label, a, b in zip(("name", "qtype", "shape", "offset"), g, e):
                if a != b or type(a) is not type(b):
                    found.append(f"tensors[{name!r}].{label} = {a!r}, expected {b!r}")
                    break
    for name in ("alignment", "data_offset"):
        if got[name] != expected[name]:
            found.append(f"{name} = {show(got[name])}, expected {show(expected[name])}")
    return found


def header_variants(expected: dict, end: int) -> dict[str, dict]:
    """The plain headers of common mistakes, derived from the right one and where the infos end."""
    alignment = expected["alignment"][1]
    type_ids = {t.name: t.ggml_type for t in Q.BLOCK_TYPES.values()}

    def with_tensors(change):
        return {**expected, "tensors": [(n, change(info)) for n, info in expected["tensors"]]}

    def with_metadata(change):
        return {**expected, "metadata": [(k, change(e)) for k, e in expected["metadata"]]}

    def latin1(text: str) -> str:
        return text.encode("utf-8").decode("latin-1")

    def latin1_value(v):
        if v[0] == "str":
            return ("str", latin1(v[1]))
        if v[0] == "list":
            return ("list", [latin1_value(x) for x in v[1]])
        if v[0] == "value":
            return ("value", (v[1][0], latin1_value(v[1][1]), v[1][2]))
        return v

    def bool_as_int(e):
        return (e[0], ("int", int(e[1][1])), e[2]) if e[1][0] == "bool" else e

    def padded(n, a):
        return ("int", F.padded(n, a))

    return {
        "the dims not reversed: GGUF stores ne[0], the row length, first; the numpy shape is the reverse":
            with_tensors(lambda i: (i[0], i[1], tuple(reversed(i[2])), i[3])),
        "the tensor offsets made absolute (data_offset added): the offset in a tensor info counts from the "
        "start of the data section": with_tensors(lambda i: (i[0], i[1], i[2], i[3] + expected["data_offset"][1])),
        "qtype left as the GGML type id: give the type's name (ggml_type_name)": with_tensors(lambda i: (i[0], type_ids[i[1]], i[2], i[3])),
        "BOOL values read as integers: struct's '<?' gives a Python bool": with_metadata(bool_as_int),
        "item_type not recorded for arrays: an array's MetadataValue keeps the type of its items": with_metadata(
            lambda e: (e[0], e[1], None)),
        "strings decoded as Latin-1: GGUF strings are UTF-8": {
            **with_metadata(lambda e: (e[0], latin1_value(e[1]), e[2])),
            "metadata": [(latin1(k), (e[0], latin1_value(e[1]), e[2])) for k, e in expected["metadata"]],
            "tensors": [(latin1(n), (latin1(i[0]), *i[1:])) for n, i in expected["tensors"]]},
        "general.alignment ignored: the data section is aligned to the key's value when the file has it (32 "
        "otherwise)": {**expected, "alignment": ("int", 32), "data_offset": padded(end, 32)},
        "data_offset rounded up to 32 although general.alignment says otherwise": {**expected, "data_offset": padded(end, 32)},
        "data_offset not rounded up: the data section starts at the next multiple of the alignment after the "
        "tensor infos": {**expected, "data_offset": ("int", end)},
        "data_offset rounded up to alignment + 1 when already aligned (n + alignment - n % alignment): pad only "
        "when needed": {**expected, "data_offset": ("int", end + alignment - end % alignment)},
    }  # fmt: skip


ENDIAN_HINTS = {"50331648": "you read the version big-endian: GGUF is little-endian ('<I')",
                "33554432": "you read the version big-endian: GGUF is little-endian ('<I')"}  # fmt: skip


def check_header(learner, data: bytes, end: int, what: str) -> None:
    call = f"parse_header({len(data)} bytes){what}"
    expected = plain_header(F.parse_header(data))
    try:
        result = learner.parse_header(data)
    except LearnerError as error:
        hint = next((h for k, h in ENDIAN_HINTS.items() if k in str(error)), None)
        if hint:
            raise Mismatch(f"{call}: {str(error)[:300]} ({hint})") from None
        raise
    got = plain_header(result, call)
    found = header_differences(got, expected)
    if not found:
        return
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    count = "1 field differs" if len(found) == 1 else f"{len(found)} fields differ"
    message = f"{call}: {count}: " + "; ".join(found[:3]) + more + "."
    variant = next((name for name, v in header_variants(expected, end).items() if v == got), None)
    raise Mismatch(message + (f" Your output matches a common mistake: {variant}." if variant else ""))


def scalar_metadata() -> dict:
    T = F.ValueType
    return {
        "general.architecture": mv(T.STRING, "llama"),
        "test.uint8": mv(T.UINT8, 200), "test.int8": mv(T.INT8, -100), "test.uint16": mv(T.UINT16, 65535),
        "test.int16": mv(T.INT16, -12345), "test.uint32": mv(T.UINT32, 4_000_000_000), "test.int32": mv(T.INT32, -7),
        "test.float32": mv(T.FLOAT32, float(F32(0.1))), "test.true": mv(T.BOOL, True), "test.false": mv(T.BOOL, False),
        "test.uint64": mv(T.UINT64, 2**63 + 5), "test.int64": mv(T.INT64, -(2**40)), "test.float64": mv(T.FLOAT64, -1e300),
        "llama.block_count": mv(T.UINT32, 30),
    }  # fmt: skip


def array_metadata() -> dict:
    T = F.ValueType
    nested = [mv(T.ARRAY, [1, 2, 3], T.UINT8), mv(T.ARRAY, [], T.UINT8), mv(T.ARRAY, [255], T.UINT8)]
    return {
        "général.nom": mv(T.STRING, "modèle ünïcode 模型 🙂"),
        "test.empty": mv(T.STRING, ""),
        "tokenizer.ggml.tokens": mv(T.ARRAY, ["<s>", "Ġthe", "", "é", "\n"], T.STRING),
        "tokenizer.ggml.token_type": mv(T.ARRAY, [3, 1, 1, -2, 6], T.INT32),
        "test.floats": mv(T.ARRAY, [float(F32(v)) for v in (0.5, -1.25, 1e-3)], T.FLOAT32),
        "test.bools": mv(T.ARRAY, [True, False, True], T.BOOL),
        "test.no_items": mv(T.ARRAY, [], T.UINT64),
        "test.nested": mv(T.ARRAY, nested, T.ARRAY),
        "test.after": mv(T.UINT16, 7),
    }


def tensor_infos() -> list:
    return [
        ("token_embd.weight", (49152, 576), "Q8_0", 0),
        ("blk.0.attn_norm.weight", (576,), "F32", 30081024),
        ("blk.0.ffn_down.weight", (576, 1536), "Q4_K", 30083328),
        ("blk.0.attn_v.weight", (192, 576), "Q4_0", 30580992),
        ("conv.weight", (8, 3, 4, 256), "Q6_K", 30643200),
        ("blk.0.ffn_up.weight", (1536, 576), "F16", 30668416),
        ("rope_freqs", (32,), "BF16", 32437888),
        ("блок.1.тензор", (64, 32), "Q4_1", 32437952),
    ]


@functools.cache
def smollm2_header() -> tuple[bytes, int]:
    """SmolLM2's header, metadata and tensor infos, its three vocabulary arrays cut to 256 entries."""
    from quantcourse.models import smollm2_gguf_path

    with open(smollm2_gguf_path(), "rb") as f:
        header = F.parse_header(f.read(2 << 20))
    metadata = {
        key: mv(v.type, v.value[:256], v.item_type) if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                               "tokenizer.ggml.merges") else v
        for key, v in header.metadata.items()
    }  # fmt: skip
    tensors = [(t.name, t.shape, t.qtype, t.offset) for t in header.tensors.values()]
    return gguf_bytes(metadata, tensors, header.version)


@graded("09.parse_header", points=3)
def test_header_counts(learner):
    check_header(learner, *gguf_bytes({}, [], tail=0), " (version 3, no metadata, no tensors)")
    check_header(learner, *gguf_bytes({}, [], version=2), " (version 2, no metadata, no tensors)")
    T = F.ValueType
    check_header(learner, *gguf_bytes({"general.architecture": mv(T.STRING, "llama")}, [("w", (2, 32), "Q8_0", 0)]),
                 " (one key, one tensor)")  # fmt: skip


@graded("09.parse_header", points=4)
def test_header_scalar_values(learner):
    check_header(learner, *gguf_bytes(scalar_metadata(), []), " (one key of each scalar type)")


@graded("09.parse_header", points=5)
def test_header_strings_and_arrays(learner):
    check_header(learner, *gguf_bytes(array_metadata(), []), " (UTF-8 strings, arrays of strings, numbers and bools, empty and nested arrays)")


@graded("09.parse_header", points=5)
def test_header_tensor_infos(learner):
    T = F.ValueType
    meta = {"general.architecture": mv(T.STRING, "llama"), "general.file_type": mv(T.UINT32, 15)}
    check_header(learner, *gguf_bytes(meta, tensor_infos()), " (tensors of 1 to 4 dims and 8 types)")


@graded("09.parse_header", points=3)
def test_header_alignment(learner):
    T = F.ValueType
    infos = tensor_infos()[:3]
    for alignment in (64, 1, 256, 32):
        meta = {"general.architecture": mv(T.STRING, "x" * alignment), "general.alignment": mv(T.UINT32, alignment)}
        check_header(learner, *gguf_bytes(meta, infos), f" (general.alignment = {alignment})")
    exact, end = gguf_bytes({"pad": mv(T.STRING, "")}, [("t", (32,), "F32", 0)])
    exact, end = gguf_bytes({"pad": mv(T.STRING, "p" * (-end % 32))}, [("t", (32,), "F32", 0)])
    check_header(learner, exact, end, " (tensor infos that end on a multiple of 32)")


@graded("09.parse_header", points=4)
def test_header_smollm2(learner):
    check_header(learner, *smollm2_header(), " (SmolLM2-135M-Instruct.Q4_1.gguf, vocabulary arrays cut to 256 entries)")


def bad_headers() -> list[tuple[bytes, str]]:
    """(data, why it must raise GGUFError)."""
    T = F.ValueType
    meta = {"general.architecture": mv(T.STRING, "llama"), "tokenizer.ggml.token_type": mv(T.ARRAY, [1, 2, 3, 4], T.INT32)}
    good, end = gguf_bytes(meta, tensor_infos()[:2], tail=0)
    key_at = good.index(b"general.architecture")
    array_at = good.index(b"tokenizer.ggml.token_type") + len("tokenizer.ggml.token_type") + 4 + 4 + 8
    info_at = good.index(b"blk.0.attn_norm.weight") + len("blk.0.attn_norm.weight") + 4 + 3
    from quantcourse.models import smollm2_gguf_path

    with open(smollm2_gguf_path(), "rb") as f:
        smollm2_start = f.read(4096)
    start = F.MAGIC + struct.pack("<IQQ", 3, 0, 1) + F.pack_string("k")  # one key, its value type and value next
    unknown_value = start + struct.pack("<IB", 13, 1)
    unknown_item = start + struct.pack("<IIQB", T.ARRAY, 13, 1, 1)
    return [
        (b"", "empty data is not a GGUF file"),
        (b"GG", "two bytes are not a GGUF file"),
        (b"GGML" + good[4:], "the magic must be b'GGUF'"),
        (b"gguf" + good[4:], "the magic must be b'GGUF' (upper case)"),
        (gguf_bytes({}, [], version=1)[0], "version 1 (uint32 counts and lengths) is not supported"),
        (gguf_bytes({}, [], version=4)[0], "version 4 is not supported"),
        (b"GGUF" + (3).to_bytes(4, "big") + bytes(16), "a big-endian file: the version reads as 50331648"),
        (good[:14], "the data ends inside the tensor count"),
        (good[: key_at + 5], "the data ends inside a key"),
        (good[: array_at + 6], "the data ends inside an array"),
        (good[:info_at], "the data ends inside a tensor's dims"),
        (good[: end - 3], "the data ends inside the last tensor's offset"),
        (unknown_value, "value type 13 does not exist"),
        (unknown_item, "array item type 13 does not exist"),
        (gguf_bytes({}, [("w", (4, 256), 10, 0)])[0], "GGML type 10 (Q2_K) is not one this reader decodes"),
        (gguf_bytes({}, [("w", (4, 256), 99, 0)])[0], "GGML type 99 does not exist"),
        (gguf_bytes({"general.alignment": mv(T.UINT32, 48)}, [])[0], "general.alignment must be a power of two, not 48"),
        (gguf_bytes({"general.alignment": mv(T.UINT32, 0)}, [])[0], "general.alignment must be a power of two, not 0"),
        (smollm2_start, "SmolLM2's first 4096 bytes end inside its token list"),
    ]


@graded("09.parse_header", points=4)
def test_header_refuses_bad_input(learner):
    for data, why in bad_headers():
        call = f"parse_header({len(data)} bytes starting {data[:8]!r})"
        expect_raises(lambda: learner.parse_header(data), (F.GGUFError,), call=call, why=why)
