"""Hidden suite of lab 03 (NF4, FP4 and double quantization).

Every case compares the learner's function with `reference_impl/nf4.py`, which matches
bitsandbytes 0.50.x byte for byte on CPU. Case groups per function: fixed (hand-picked), randomized
(seeded generators), edge cases (all-zero blocks, a block with one non-zero value, values exactly
on code midpoints, counts that are odd or not a multiple of the block, float16/bfloat16 input,
block sizes 32 to 4096) and bad input, which must raise the exception type the reference raises.

Allowances, stated in the lab:
- Dividing a block by its absmax: bitsandbytes multiplies full blocks by the float32 reciprocal
  1 / absmax and divides the short last block. x / absmax and x * (1 / absmax) differ in the last
  bit now and then, which moves a value that sits right on a code midpoint (with float16 input
  and FP4's simple fractions this happens) to the neighbouring code. Every code is accepted when
  it equals the code of the division or of the reciprocal product; both are computed here.
  The same holds for the 8-bit codes of double quantization.
- A block of zeros: absmax 0 or bitsandbytes' floor 1e-38 (it stores 1e-38 for an all-zero
  short last block): both pass.
- double_quantize: the codes are judged against the learner's own offset and absmax2 when those
  are within float32 rounding of the reference (the lab asks for absmax.mean()).
- Otherwise codes and packed bytes are compared exactly; the code book exactly (the lab gives the
  float32/float64 recipe that reproduces bitsandbytes' table); dequantized float32 values to
  2^-23 relative (one rounding), float16 and bfloat16 results to one unit in the last place.

Diagnosis: when an output differs, the outputs of common mistakes (the low nibble first, a code
book without the offset or without an exact zero, argmin with its own tie-breaking, one absmax for
the whole tensor, the mean not subtracted before double quantization, nested blocks of 64, 1 /
absmax stored, ...) are computed by the small wrong implementations below, and the feedback names
the one the learner's output matches. Wrong shapes get a sentence of their own.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from quantcourse.autograder import testing
from quantcourse.autograder.testing import Mismatch, describe_value, expect_close, expect_raises, graded, same_kind
from quantcourse.reference_impl import formats, nf4

GRADED = {
    "nf4_code_book": formats.build_nf4_codebook,  # nf4.nf4_code_book only calls it
    "nearest_code_4bit": nf4.nearest_code_4bit,
    "quantize_blockwise_4bit": nf4.quantize_blockwise_4bit,
    "dequantize_blockwise_4bit": nf4.dequantize_blockwise_4bit,
    "double_quantize": nf4.double_quantize,
    "double_dequantize": nf4.double_dequantize,
    "bits_per_weight": nf4.bits_per_weight,
}
# The lab spells these two out step by step (the float32/float64 recipe of the code book, the
# midpoint search): an honest solution matches the reference's text, so similarity says nothing.
SIMILARITY_EXEMPT = {"nf4_code_book", "nearest_code_4bit"}
NF4 = nf4.nf4_code_book()
FP4 = nf4.fp4_code_book()
DYNAMIC = nf4.dynamic_map()


@pytest.fixture(autouse=True)
def one_thread():
    """The suite's tensors are small: waking a second thread for each reduction costs more than
    the work itself on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weights(shape, seed: int, dtype=torch.float32, outliers: bool = True) -> torch.Tensor:
    """Gaussian weights (std 0.05), a few of them 6x larger, like a trained weight matrix."""
    g = generator(seed)
    w = 0.05 * torch.randn(shape, generator=g)
    if outliers:
        w = w * torch.where(torch.rand(shape, generator=g) < 0.02, 6.0, 1.0)
    return w.to(dtype)


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_text(x) -> str:
    return f"[{', '.join(map(str, x.shape))}] {name_of(x.dtype)}" if isinstance(x, torch.Tensor) else type(x).__name__


def unpack(got, n: int, call: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise Mismatch(f"{call} should return a tuple of {n} values, got {describe_value(got)}")
    return tuple(got)


def first_wrong(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def diagnose(got: torch.Tensor, variants: dict, rtol: float = 0.0, atol: float = 0.0) -> str:
    """' Your output matches a common mistake: ...' for the first mistake that explains `got`."""
    name = testing.matching_variant(got, variants, rtol, atol)
    return f" Your output matches a common mistake: {name}." if name else ""


def reveal(inputs: dict) -> str:
    if not testing.REVEAL_INPUTS or not inputs:
        return ""
    return ". Inputs: " + ", ".join(f"{k} = {describe_value(v)}" for k, v in inputs.items())


# ---------------------------------------------------------------------------------------------
# Code books and their mistakes


def quantiles(p: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(p.double())


def code_book_mistakes(offset: float) -> dict:
    """[16] float32 code books that learners build by mistake (each normalised like the real one)."""

    def normalised(values: torch.Tensor, sort: bool = True) -> torch.Tensor:
        values = values.float()
        values = values.sort().values if sort else values
        return values / values.abs().max()

    zero = torch.zeros(1, dtype=torch.float64)
    positive8 = quantiles(torch.linspace(offset, 0.5, 9)[:-1])
    negative7 = -quantiles(torch.linspace(offset, 0.5, 8)[:-1])
    positive64 = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative64 = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    right = torch.cat([negative7, zero, positive8])
    raw = right.float().sort().values
    return {
        "16 quantiles spaced symmetrically from 1 - offset to offset: no exact zero (NF4 has 8 positive and "
        "7 negative quantiles plus an exact 0)": normalised(quantiles(torch.linspace(1 - offset, offset, 16))),
        "the centres of 16 equal-probability bins, Phi^-1((i + 0.5) / 16), ignoring the offset: a symmetric "
        "book without an exact zero": normalised(quantiles((torch.arange(16) + 0.5) / 16)),
        "8 positive and 8 negative quantiles: no exact zero": normalised(torch.cat([-positive8, positive8])),
        "8 negative and 7 positive quantiles (the sides swapped)": normalised(-right),
        "not divided by the largest value: NF4's values lie in [-1, 1]": raw,
        "divided in float64 (or spaced in float64): bitsandbytes spaces the probabilities in float32 "
        "(torch.linspace's default), takes the quantiles in float64, then divides in float32": normalised(
            torch.cat([negative64, zero, positive64]).sort().values.double() / positive64.max()),
        "probabilities spaced in float64 (torch.linspace(..., dtype=torch.float64)): bitsandbytes spaces them in "
        "float32 (torch.linspace's default) and only takes the quantiles in float64": normalised(
            torch.cat([negative64, zero, positive64])),
        "quantiles taken in float32 (torch.special.ndtri of a float32 tensor): take them in float64 "
        "(p.double()), then convert": normalised(torch.cat([
            -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1]), torch.zeros(1),
            torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1])])),
        "not sorted: the values must be in ascending order": normalised(right, sort=False),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# nf4_code_book


def check_code_book(learner, offset=None):
    call = "nf4_code_book()" if offset is None else f"nf4_code_book({offset})"
    expected = nf4.nf4_code_book() if offset is None else nf4.nf4_code_book(offset)
    got = learner.nf4_code_book() if offset is None else learner.nf4_code_book(offset)
    same_kind(got, expected, call)
    if torch.equal(got, expected):
        return
    bad = got != expected
    i = first_wrong(bad)[0]
    ulps = ((got.double() - expected.double()).abs() / torch.finfo(torch.float32).eps).max().item()
    message = (f"{call}: {int(bad.sum())} of 16 values differ; first at index {i}: got {got[i].item()!r}, "
               f"expected {expected[i].item()!r}")  # fmt: skip
    if ulps <= 4:
        message += " (a difference in the last bits: check which steps run in float32 and which in float64)"
    if offset is not None and offset != formats.NF4_OFFSET and torch.equal(got, NF4):
        raise Mismatch(message + ": that is the table of the default offset 0.9677083; build it from the `offset` argument")
    mistakes = code_book_mistakes(offset or formats.NF4_OFFSET)
    # exactly first; then to a few float32 steps (a mistake computed in another order than the learner's)
    raise Mismatch(message + "." + (diagnose(got, mistakes) or diagnose(got, mistakes, rtol=1e-6)))


@graded("03.nf4_code_book", points=4)
def test_code_book_is_bitsandbytes_table(learner):
    check_code_book(learner)


@graded("03.nf4_code_book", points=5)
def test_code_book_other_offsets(learner):
    for offset in (0.99, 0.95, 0.9, 0.9677083):
        check_code_book(learner, offset)


@graded("03.nf4_code_book", points=3)
def test_code_book_has_exact_zero_and_ends(learner):
    for offset in (0.8, 0.999):
        got = learner.nf4_code_book(offset)
        call = f"nf4_code_book({offset})"
        same_kind(got, nf4.nf4_code_book(offset), call)
        if not (got[7] == 0 and got[0] == -1 and got[15] == 1 and bool((got[1:] > got[:-1]).all())):
            raise Mismatch(f"{call} = {[round(v, 4) for v in got.tolist()]}: expected ascending values from -1 to 1 "
                           "with an exact 0 at index 7 (7 negative values below it, 8 positive above)")  # fmt: skip
        check_code_book(learner, offset)


# ---------------------------------------------------------------------------------------------
# nearest_code_4bit


def nearest_mistakes(scaled: torch.Tensor, code: torch.Tensor) -> dict:
    sorted_code, order = torch.sort(code, stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return {
        "argmin of |x - code|: on a midpoint its float32 distances decide the tie (either way), and for FP4's "
        "two zeros it keeps the first; compare with the midpoints instead": (
            (scaled.float()[..., None] - code).abs().argmin(dim=-1).to(torch.uint8)),
        "a value on a midpoint took the upper code (bucketize with right=True, or x >= midpoint): it takes the "
        "lower one": order[torch.bucketize(scaled, midpoints, right=True)].to(torch.uint8),
        "the position in the sorted code book, not the index into `code`: map it back through the sort's "
        "permutation (FP4's code book is not sorted)": torch.bucketize(scaled, midpoints).to(torch.uint8),
        "the code of the lower neighbour (floor), not the nearest": order[
            (torch.bucketize(scaled, sorted_code, right=True) - 1).clamp(0, 15)].to(torch.uint8),
    }


def check_nearest(learner, scaled, code, what="", reveal_inputs=False):
    call = f"nearest_code_4bit(scaled {shape_text(scaled)}, code){what}"
    expected = nf4.nearest_code_4bit(scaled, code)
    got = learner.nearest_code_4bit(scaled, code)
    same_kind(got, expected, call)
    if torch.equal(got, expected):
        return
    bad = got != expected
    i = first_wrong(bad)
    message = (f"{call}: {int(bad.sum())} of {bad.numel()} codes differ; first at index {i}: scaled value "
               f"{scaled[i].item()!r} got code {got[i].item()}, expected {expected[i].item()}")  # fmt: skip
    inputs = {"scaled": scaled, "code": code} if reveal_inputs else {}
    raise Mismatch(message + reveal(inputs) + "." + diagnose(got, nearest_mistakes(scaled, code)))


def midpoints_of(code: torch.Tensor) -> torch.Tensor:
    s = torch.sort(code, stable=True).values
    return (s[:-1] + s[1:]) / 2


@graded("03.nearest_code_4bit", points=4)
def test_nearest_nf4_fixed_and_midpoints(learner):
    x = torch.tensor([-1.0, -0.8, -0.3, -0.05, 0.0, 0.04, 0.1, 0.2, 0.5, 0.65, 0.9, 1.0])
    check_nearest(learner, x, NF4, " (NF4)", reveal_inputs=True)
    check_nearest(learner, midpoints_of(NF4), NF4, " (NF4, every value exactly on a midpoint)", reveal_inputs=True)
    nudged = torch.cat([torch.nextafter(midpoints_of(NF4), torch.tensor(2.0)), torch.nextafter(midpoints_of(NF4), torch.tensor(-2.0))])
    check_nearest(learner, nudged, NF4, " (NF4, one float32 step either side of each midpoint)")


@graded("03.nearest_code_4bit", points=4)
def test_nearest_fp4_unsorted_with_two_zeros(learner):
    x = torch.tensor([0.0, -0.0, 0.001, -0.001, 0.0026, -0.0026, 0.004, 1 / 12, 0.3, -0.45, 0.9, -1.0, 1.0])
    check_nearest(learner, x, FP4, " (FP4, in bit-pattern order, holding 0 and -0)", reveal_inputs=True)
    check_nearest(learner, midpoints_of(FP4), FP4, " (FP4, every value on a midpoint)", reveal_inputs=True)


@graded("03.nearest_code_4bit", points=4)
def test_nearest_randomized(learner):
    g = generator(310)
    scaled = torch.rand(6, 77, generator=g) * 2 - 1
    check_nearest(learner, scaled, NF4, " (NF4, random values)")
    check_nearest(learner, scaled, FP4, " (FP4, random values)")
    book = (torch.rand(16, generator=g) * 2 - 1)[torch.randperm(16, generator=g)]
    check_nearest(learner, scaled, book, " (a random, unsorted code book)")
    check_nearest(learner, torch.cat([midpoints_of(book), scaled[0]]), book, " (a random code book, values on its midpoints)")


@graded("03.nearest_code_4bit", points=2)
def test_nearest_any_shape(learner):
    g = generator(311)
    check_nearest(learner, torch.rand(2, 3, 5, generator=g) * 2 - 1, NF4, " (a 3-D tensor: the result keeps its shape)")
    check_nearest(learner, torch.tensor(0.3), NF4, " (a 0-dim tensor)")
    check_nearest(learner, torch.tensor([1.0, -1.0, 0.0]), NF4[torch.randperm(16, generator=g)], " (a shuffled NF4 book)")


# ---------------------------------------------------------------------------------------------
# quantize_blockwise_4bit


def code_book(quant_type: str) -> torch.Tensor:
    return NF4 if quant_type == "nf4" else FP4


def scaled_values(flat: torch.Tensor, blocksize: int, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [n] float32 divided by the absmax of its block: (scaled [n], absmax [blocks]).

    how: "bnb" (full blocks times the reciprocal, the short last block divided: the reference),
    "divide" (every block divided), "reciprocal" (every block times the reciprocal)."""
    if how == "bnb":
        return nf4.scale_blocks(flat, blocksize)
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    safe = absmax.clamp(min=nf4.TINY)[:, None]
    scaled = padded / safe if how == "divide" else padded * (1.0 / safe)
    return scaled.reshape(-1)[:n].clamp(-1, 1), absmax


def codes_of(scaled: torch.Tensor, code: torch.Tensor, pad_code: int | None = None) -> torch.Tensor:
    """4-bit codes [n, padded to even] of scaled values; the pad is the code of 0.0 unless given."""
    codes = nf4.nearest_code_4bit(scaled, code)
    if codes.numel() % 2:
        pad = nf4.nearest_code_4bit(torch.zeros(1), code) if pad_code is None else torch.tensor([pad_code], dtype=torch.uint8)
        codes = torch.cat([codes, pad])
    return codes


def pack(codes: torch.Tensor, low_first: bool = False) -> torch.Tensor:
    first, second = codes[0::2], codes[1::2]
    return ((second << 4) | first if low_first else (first << 4) | second)[:, None]


def quantize_mistakes(w: torch.Tensor, blocksize: int, quant_type: str) -> dict:
    """(packed, absmax) for each known mistake of blockwise quantization."""
    code = code_book(quant_type)
    flat = w.reshape(-1).float()
    n = flat.numel()
    scaled, absmax = scaled_values(flat, blocksize, "bnb")
    codes = codes_of(scaled, code)
    right = pack(codes)
    whole = flat.abs().max().expand(absmax.shape).clone()
    found = {
        "the first element of each pair in the LOW nibble (GPTQ's order): bitsandbytes puts element 2j in the "
        "high nibble, (codes[0::2] << 4) | codes[1::2]": (pack(codes, low_first=True), absmax),
        "1 / absmax stored instead of absmax: store the block's largest magnitude itself": (right, 1 / absmax),
        "every block divided by the absmax of the whole tensor: each block has its own absmax": (
            pack(codes_of((flat / whole[0]).clamp(-1, 1), code)), whole),
    }
    ties = {
        "argmin of |x - code| instead of midpoints (ties broken another way)": lambda s: (
            (s[:, None] - code).abs().argmin(dim=1).to(torch.uint8)),
        "a value on a midpoint took the upper code instead of the lower": lambda s: torch.sort(code, stable=True)[1][
            torch.bucketize(s, midpoints_of(code), right=True)].to(torch.uint8),
    }
    for name, nearest in ties.items():
        raw = nearest(scaled)
        if n % 2:
            raw = torch.cat([raw, nearest(torch.zeros(1))])
        found[name] = (pack(raw), absmax)
    if quant_type == "nf4":
        for name, book in code_book_mistakes(formats.NF4_OFFSET).items():
            found[f"codes of a wrong code book, {name} (check nf4_code_book)"] = (pack(codes_of(scaled, book)), absmax)
    else:
        found["the NF4 code book used for quant_type='fp4'"] = (pack(codes_of(scaled, NF4)), absmax)
    if n % 2:
        found["the odd count padded with code 0 instead of the code of the value 0.0 (bitsandbytes pads with a "
              "0.0 before looking up the codes)"] = (pack(codes_of(scaled, code, pad_code=0)), absmax)  # fmt: skip
    if w.dtype != torch.float32:
        low = w.reshape(-1)
        absmax_low = F.pad(low, (0, absmax.numel() * blocksize - n)).reshape(-1, blocksize).abs().amax(dim=1)
        scaled_low = (F.pad(low, (0, absmax.numel() * blocksize - n)).reshape(-1, blocksize) / absmax_low[:, None])
        scaled_low = scaled_low.nan_to_num(0.0).reshape(-1)[:n].float()
        found[f"the block divided in {name_of(w.dtype)}: convert w to float32 first"] = (
            pack(codes_of(scaled_low, code)), absmax_low.float())
    if w.dim() == 2:
        columns, _ = scaled_values(w.T.reshape(-1).float(), blocksize, "bnb")
        found["w flattened column by column (w.T): flatten in row-major order, w.reshape(-1)"] = (
            pack(codes_of(columns, code)), scaled_values(w.T.reshape(-1).float(), blocksize, "bnb")[1])
    return found


def quantize_call(w, blocksize, quant_type) -> str:
    return f"quantize_blockwise_4bit(w {shape_text(w)}, blocksize={blocksize}, quant_type={quant_type!r})"


def check_quantize(learner, w, blocksize=64, quant_type="nf4", what="", reveal_inputs=False):
    """Packed bytes and absmax as bitsandbytes makes them; each code may also be that of x / absmax
    or x * (1 / absmax) (the allowance in the module docstring)."""
    call = quantize_call(w, blocksize, quant_type) + what
    expected_packed, expected_absmax = nf4.quantize_blockwise_4bit(w, blocksize, quant_type)
    got = unpack(learner.quantize_blockwise_4bit(w, blocksize, quant_type), 2, call)
    got_packed, got_absmax = got
    n = w.numel()
    blocks = math.ceil(n / blocksize)
    if isinstance(got_absmax, torch.Tensor) and got_absmax.numel() == 1 and blocks > 1:
        raise Mismatch(f"{call} returned one absmax for the whole tensor; expected one per block of {blocksize} "
                       f"values: {blocks} of them (ceil({n} / {blocksize}))")  # fmt: skip
    if isinstance(got_packed, torch.Tensor) and got_packed.numel() == n and n > 1:
        raise Mismatch(f"{call} returned {n} values in `packed`, one per weight: pack two 4-bit codes per byte, "
                       f"[ceil(n / 2), 1] = [{math.ceil(n / 2)}, 1]")  # fmt: skip
    if isinstance(got_packed, torch.Tensor) and got_packed.shape == (math.ceil(n / 2),):
        raise Mismatch(f"{call} returned packed of shape {tuple(got_packed.shape)}; bitsandbytes keeps it as a column, "
                       f"[ceil(n / 2), 1] = [{math.ceil(n / 2)}, 1] (add [:, None])")  # fmt: skip
    same_kind(got_packed, expected_packed, f"{call}[0] (packed)")
    same_kind(got_absmax, expected_absmax, f"{call}[1] (absmax)")

    def mistakes():  # costly: computed only on a mismatch
        return quantize_mistakes(w, blocksize, quant_type)

    # absmax: exact, but a block of zeros may store 0 or 1e-38
    absmax_ok = (got_absmax == expected_absmax) | ((got_absmax.abs() <= nf4.TINY) & (expected_absmax.abs() <= nf4.TINY))
    if not bool(absmax_ok.all()):
        b = first_wrong(~absmax_ok)[0]
        found = {k: v[1] for k, v in mistakes().items() if not torch.equal(v[1], expected_absmax)}
        raise Mismatch(f"{call}: {int((~absmax_ok).sum())} of {blocks} absmax values differ; first in block {b}: got "
                       f"{got_absmax[b].item()!r}, expected {expected_absmax[b].item()!r} (the largest |w| of "
                       f"elements {b * blocksize} to {min(n, (b + 1) * blocksize) - 1})" + reveal(
                           {"w": w} if reveal_inputs else {}) + "." + diagnose(got_absmax, found))  # fmt: skip

    code = code_book(quant_type)
    flat = w.reshape(-1).float()
    allowed = [codes_of(scaled_values(flat, blocksize, how)[0], code) for how in ("bnb", "divide", "reciprocal")]
    got_codes = torch.stack([got_packed[:, 0] >> 4, got_packed[:, 0] & 0xF], dim=1).reshape(-1)
    ok = torch.zeros_like(got_codes, dtype=torch.bool)
    for codes in allowed:
        ok |= got_codes == codes
    if bool(ok.all()):
        return
    i = first_wrong(~ok)[0]
    element = f"element {i}" if i < n else f"the padding after element {n - 1} (the odd count)"
    value = f" (w = {flat[i].item()!r}, block absmax {expected_absmax[i // blocksize].item()!r})" if i < n else ""
    found = {k: v[0] for k, v in mistakes().items() if not torch.equal(v[0], expected_packed)}
    raise Mismatch(
        f"{call}: {int((~ok).sum())} of {got_codes.numel()} codes differ; first at {element}{value}: got code "
        f"{got_codes[i].item()}, expected {allowed[0][i].item()} (byte {i // 2}, the "
        f"{'high' if i % 2 == 0 else 'low'} nibble)" + reveal({"w": w} if reveal_inputs else {}) + "."
        + diagnose(got_packed, found)
    )  # fmt: skip


@graded("03.quantize_blockwise_4bit", points=3)
def test_quantize_fixed(learner):
    w = torch.tensor([0.5, -1.0, 0.0, 1.0, 0.25])
    check_quantize(learner, w, 64, "nf4", " (the worked example of the lab)", reveal_inputs=True)
    w = torch.tensor([[0.3, -0.12, 0.05, 0.6], [-0.6, 0.0, 0.44, -0.07]])
    check_quantize(learner, w, 32, "nf4", reveal_inputs=True)


@graded("03.quantize_blockwise_4bit", points=4)
def test_quantize_randomized_nf4(learner):
    for seed, shape in enumerate([(64,), (16, 64), (48, 96), (7, 5, 64)]):
        check_quantize(learner, weights(shape, 320 + seed), 64, "nf4")


@graded("03.quantize_blockwise_4bit", points=4)
def test_quantize_block_sizes_and_ragged_counts(learner):
    cases = [((1000,), 32), ((33, 10), 64), ((127,), 64), ((3, 300), 128), ((1, 257), 256), ((2, 3000), 4096), ((65,), 64)]
    for seed, (shape, blocksize) in enumerate(cases):
        check_quantize(learner, weights(shape, 330 + seed), blocksize, "nf4", " (the count is not a multiple of the block)")


@graded("03.quantize_blockwise_4bit", points=3)
def test_quantize_fp4(learner):
    check_quantize(learner, torch.tensor([0.0, 0.001, -0.001, 0.5, -0.9, 1.0, 0.3]), 64, "fp4", reveal_inputs=True)
    for seed, (shape, blocksize) in enumerate([((20, 64), 64), ((333,), 128), ((9, 7), 32)]):
        check_quantize(learner, weights(shape, 340 + seed), blocksize, "fp4")


@graded("03.quantize_blockwise_4bit", points=3)
def test_quantize_half_precision_input(learner):
    for seed, dtype in enumerate((torch.float16, torch.bfloat16)):
        for quant_type in ("nf4", "fp4"):
            check_quantize(learner, weights((49, 64), 350 + seed, dtype), 64, quant_type, f" ({name_of(dtype)} input)")
            check_quantize(learner, weights((3, 37), 352 + seed, dtype), 128, quant_type, f" ({name_of(dtype)} input)")


def block_with(values: list[float], blocksize: int = 64) -> torch.Tensor:
    """One block holding `values`, then zeros up to blocksize."""
    return torch.tensor(values + [0.0] * (blocksize - len(values)))


@graded("03.quantize_blockwise_4bit", points=3)
def test_quantize_zero_blocks_single_values_and_ties(learner):
    zeros = torch.zeros(200)
    zeros[70] = -0.3  # block 1 holds a single non-zero value; blocks 0 and 2 are all zero, block 3 short
    check_quantize(learner, zeros, 64, "nf4", " (all-zero blocks and a block with one non-zero value)", reveal_inputs=True)
    check_quantize(learner, torch.zeros(3, 7), 64, "nf4", " (one short block of zeros)")
    check_quantize(learner, torch.zeros(5), 32, "fp4", " (one short block of zeros, FP4)")
    for quant_type in ("nf4", "fp4"):
        mids = midpoints_of(code_book(quant_type)).tolist()
        # absmax 1 and 2: powers of two, so x / absmax is exact and every value lies on a midpoint
        tied = torch.cat([block_with(mids + [1.0]), 2 * block_with(mids + [-1.0])])
        check_quantize(learner, tied, 64, quant_type, " (values exactly on the midpoints between codes)", reveal_inputs=True)


@graded("03.quantize_blockwise_4bit", points=2)
def test_quantize_refuses_bad_input(learner):
    w = weights((4, 64), 360)
    bad = [
        ((w.double(), 64, "nf4"), TypeError, "bitsandbytes quantizes float32, float16 and bfloat16"),
        ((torch.arange(64, dtype=torch.int32), 64, "nf4"), TypeError, "w must be a float tensor"),
        ((torch.empty(0, 64), 64, "nf4"), ValueError, "w is empty"),
        ((torch.tensor([0.1, float("nan")]), 64, "nf4"), ValueError, "w holds NaN"),
        ((w, 100, "nf4"), ValueError, "blocksize must be one of 32, 64, ..., 4096"),
        ((w, 64, "int4"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
    ]
    for args, error, why in bad:
        expect_raises(lambda: learner.quantize_blockwise_4bit(*args), (error,),
                      call=quantize_call(*args), why=why)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dequantize_blockwise_4bit

TOLERANCE = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def dequantize_mistakes(packed, absmax, shape, blocksize, quant_type, dtype) -> dict:
    code = code_book(quant_type)
    n = math.prod(shape)
    flat = packed.reshape(-1)
    high_first = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    low_first = torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)[:n].long()
    per_element = absmax.repeat_interleave(blocksize)[:n]
    tiled = absmax.repeat(blocksize)[:n]

    def out(values):
        return values.to(dtype).reshape(shape)

    found = {
        "the low nibble read first: bitsandbytes keeps element 2j in the HIGH nibble of byte j": out(code[low_first] * per_element),
        "divided by absmax instead of multiplying": out(code[high_first] / per_element),
        "absmax.repeat(blocksize) (tiles the whole vector) instead of absmax.repeat_interleave(blocksize) "
        "(repeats each block's value)": out(code[high_first] * tiled),
        "the NF4 book used for FP4, or the other way round": out((FP4 if quant_type == "nf4" else NF4)[high_first] * per_element),
        "the codes themselves multiplied by absmax: look them up in the code book first": out(high_first.float() * per_element),
    }
    if dtype != torch.float32:
        found[f"computed in {name_of(dtype)}: compute code[codes] * absmax in float32, then convert"] = (
            (code[high_first].to(dtype) * per_element.to(dtype)).reshape(shape))
    return found


def check_dequantize(learner, packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.float32, what="",
                     reveal_inputs=False):  # fmt: skip
    call = (f"dequantize_blockwise_4bit(packed {shape_text(packed)}, absmax {shape_text(absmax)}, shape={tuple(shape)}, "
            f"blocksize={blocksize}, quant_type={quant_type!r}, dtype={name_of(dtype)}){what}")  # fmt: skip
    expected = nf4.dequantize_blockwise_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    got = learner.dequantize_blockwise_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    if isinstance(got, torch.Tensor) and got.numel() == expected.numel() + 1 and got.dim() == 1:
        raise Mismatch(f"{call} returned {got.numel()} values for {expected.numel()} weights: drop the padding code "
                       "of an odd count ([:n]) and reshape to `shape`")  # fmt: skip
    expect_close(got, expected, call=call, rtol=TOLERANCE[dtype], atol=0.0,
                 inputs={"packed": packed, "absmax": absmax} if reveal_inputs else None,
                 variants=dequantize_mistakes(packed, absmax, shape, blocksize, quant_type, dtype))  # fmt: skip


def quantized(shape, seed, blocksize=64, quant_type="nf4", dtype=torch.float32):
    w = weights(shape, seed, dtype)
    packed, absmax = nf4.quantize_blockwise_4bit(w, blocksize, quant_type)
    return packed, absmax, tuple(w.shape)


@graded("03.dequantize_blockwise_4bit", points=3)
def test_dequantize_fixed_bytes(learner):
    packed = torch.tensor([[0x0F], [0x7A], [0xC3], [0x80]], dtype=torch.uint8)
    check_dequantize(learner, packed, torch.tensor([2.0]), (8,), 64, "nf4", what=" (bytes 0x0F, 0x7A, 0xC3, 0x80)",
                     reveal_inputs=True)  # fmt: skip
    check_dequantize(learner, packed[:3], torch.tensor([1.0]), (5,), 64, "nf4", what=" (5 weights: the last low nibble is padding)",
                     reveal_inputs=True)  # fmt: skip
    many = (torch.arange(20, dtype=torch.uint8) * 13)[:, None]  # 40 weights: a block of 32, then one of 8
    check_dequantize(learner, many, torch.tensor([0.5, 4.0]), (5, 8), 32, "fp4", what=" (two blocks)", reveal_inputs=True)


@graded("03.dequantize_blockwise_4bit", points=3)
def test_dequantize_randomized(learner):
    for seed, (shape, quant_type) in enumerate([((16, 64), "nf4"), ((48, 96), "fp4"), ((7, 5, 64), "nf4")]):
        check_dequantize(learner, *quantized(shape, 400 + seed, 64, quant_type), 64, quant_type)


@graded("03.dequantize_blockwise_4bit", points=3)
def test_dequantize_half_precision_output_and_flat_bytes(learner):
    packed, absmax, shape = quantized((33, 64), 410)
    for dtype in (torch.float16, torch.bfloat16):
        check_dequantize(learner, packed, absmax, shape, 64, "nf4", dtype)
    packed, absmax, shape = quantized((9, 10), 411, 32, "fp4")
    check_dequantize(learner, packed.reshape(-1), absmax, shape, 32, "fp4", torch.bfloat16, " (packed given flat, [45])")


@graded("03.dequantize_blockwise_4bit", points=3)
def test_dequantize_block_sizes_and_ragged_counts(learner):
    cases = [((1000,), 32), ((33, 10), 64), ((127,), 64), ((3, 300), 128), ((1, 257), 256), ((2, 3000), 4096), ((3,), 64)]
    for seed, (shape, blocksize) in enumerate(cases):
        check_dequantize(learner, *quantized(shape, 420 + seed, blocksize), blocksize)


@graded("03.dequantize_blockwise_4bit", points=2)
def test_dequantize_refuses_bad_input(learner):
    packed, absmax, shape = quantized((4, 64), 430)
    bad = [
        ((packed[:-1], absmax, shape, 64), ValueError, "256 weights pack into 128 bytes, and packed holds 127"),
        ((packed, absmax[:-1], shape, 64), ValueError, "256 weights in blocks of 64 need 4 absmax values"),
        ((packed, absmax, shape, 32), ValueError, "256 weights in blocks of 32 need 8 absmax values, not 4"),
        ((packed, absmax, shape, 100), ValueError, "blocksize must be one of 32, 64, ..., 4096"),
        ((packed, absmax, shape, 64, "int4"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
        ((packed, absmax, shape, 64, "nf4", torch.int8), TypeError, "dtype must be float32, float16 or bfloat16"),
    ]
    for args, error, why in bad:
        call = f"dequantize_blockwise_4bit(packed {shape_text(args[0])}, absmax {shape_text(args[1])}, {args[2]}, {', '.join(map(repr, args[3:]))})"
        expect_raises(lambda: learner.dequantize_blockwise_4bit(*args), (error,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# double_quantize


def codes_8bit(values: torch.Tensor, absmax2: torch.Tensor, blocksize: int, how: str) -> torch.Tensor:
    """8-bit codes of values [n] in blocks with the given absmax2, scaled by x * (1 / absmax2)
    ("reciprocal", bitsandbytes) or x / absmax2 ("divide"); a block of zeros gets code 0."""
    n = values.numel()
    per_element = absmax2.repeat_interleave(blocksize)[:n]
    normed = values * (1.0 / per_element) if how == "reciprocal" else values / per_element
    codes = nf4.nearest_code_8bit(normed.nan_to_num(0.0), DYNAMIC)
    return torch.where(per_element == 0, 0, codes).to(torch.uint8)


def double_mistakes(absmax: torch.Tensor, blocksize: int) -> dict:
    """(codes, absmax2, offset) for each known mistake of double quantization."""
    offset = absmax.mean()
    n = absmax.numel()

    def nested(values, size=blocksize):
        codes, absmax2 = nf4.quantize_blockwise_8bit(values, DYNAMIC, size)
        return codes, absmax2

    right_codes, right_absmax2 = nested(absmax - offset)
    no_centre = nested(absmax)
    one_block = (absmax - offset).abs().max().expand(right_absmax2.shape).clone()
    found = {
        "the mean not subtracted: quantize absmax - offset, where offset = absmax.mean(), so that both halves of "
        "the signed map are used": (*no_centre, offset),
        "the mean not subtracted and offset 0": (*no_centre, torch.zeros(())),
        "1 / absmax2 stored instead of absmax2": (right_codes, 1 / right_absmax2, offset),
        "one absmax2 for all nested blocks: each block of `blocksize` values has its own": (
            codes_8bit(absmax - offset, one_block, blocksize, "reciprocal"), one_block, offset),
        "a block of zeros got the code of 0.0 (127) instead of code 0, bitsandbytes' convention": (
            torch.where(right_absmax2.repeat_interleave(blocksize)[:n] == 0, 127, right_codes).to(torch.uint8),
            right_absmax2, offset),
        "the offset is the median, not the mean": (*nested(absmax - absmax.median()), absmax.median()),
    }
    if blocksize != 64:
        found["nested blocks of 64 (the 4-bit block size) instead of `blocksize`"] = (*nested(absmax - offset, 64), offset)
    return found


def check_double(learner, absmax, blocksize=None, what="", reveal_inputs=False):
    size = blocksize or nf4.NESTED_BLOCKSIZE
    call = f"double_quantize(absmax {shape_text(absmax)}" + (f", blocksize={blocksize})" if blocksize else ")") + what
    expected = nf4.double_quantize(absmax, size)
    got = unpack(learner.double_quantize(absmax) if blocksize is None else learner.double_quantize(absmax, blocksize), 3, call)
    got_codes, got_absmax2, got_offset = got
    n = absmax.numel()
    if isinstance(got_absmax2, torch.Tensor) and got_absmax2.dim() == 1 and got_absmax2.numel() != expected[1].numel():
        hint = f"one per nested block of {size}: ceil({n} / {size}) = {expected[1].numel()}"
        if got_absmax2.numel() == math.ceil(n / 64) and size != 64:
            hint += "; yours has one per 64 values, the 4-bit block size: the nested blocks hold `blocksize` values"
        raise Mismatch(f"{call} returned absmax2 with {got_absmax2.numel()} values; expected {hint}")
    for value, reference, name in zip(got, expected, ("codes", "absmax2", "offset")):
        same_kind(value, reference, f"{call} ({name})")
    inputs = {"absmax": absmax} if reveal_inputs else None
    close_offset = torch.isclose(got_offset, expected[2], rtol=1e-6, atol=0)
    close_absmax2 = torch.isclose(got_absmax2, expected[1], rtol=1e-6, atol=1e-12).all()
    if close_offset and close_absmax2:
        allowed = [expected[0]] + [
            codes_8bit(absmax - offset, absmax2, size, how)
            for offset, absmax2 in ((got_offset, got_absmax2), (expected[2], expected[1]))
            for how in ("reciprocal", "divide")
        ]  # fmt: skip
        ok = torch.zeros_like(got_codes, dtype=torch.bool)
        for codes in allowed:
            ok |= got_codes == codes
        if bool(ok.all()):
            return
    found = double_mistakes(absmax, size)
    whole = {k: v for k, v in found.items() if all(
        isinstance(g, torch.Tensor) and g.shape == e.shape and torch.allclose(g.double(), e.double(), rtol=1e-6, atol=1e-12)
        for g, e in zip(got, v))}  # fmt: skip
    found = whole or found
    expect_close(got[2], expected[2], call=f"{call}: offset", rtol=1e-6, atol=0.0, inputs=inputs,
                 variants={k: v[2] for k, v in found.items()})  # fmt: skip
    expect_close(got[1], expected[1], call=f"{call}: absmax2", rtol=1e-6, atol=1e-12, inputs=inputs,
                 variants={k: v[1] for k, v in found.items()})  # fmt: skip
    expect_close(got[0], expected[0], call=f"{call}: codes", rtol=0.0, atol=0.0, inputs=inputs, what="codes",
                 variants={k: v[0] for k, v in found.items()})  # fmt: skip


def absmax_of(shape, seed, blocksize=64) -> torch.Tensor:
    return nf4.quantize_blockwise_4bit(weights(shape, seed), blocksize)[1]


@graded("03.double_quantize", points=3)
def test_double_fixed(learner):
    check_double(learner, torch.tensor([0.5, 0.25, 0.75, 0.5, 1.0, 0.125, 0.375, 0.5]), reveal_inputs=True)
    check_double(learner, torch.tensor([0.12, 0.2, 0.09, 0.31, 0.15, 0.18]), 4, reveal_inputs=True)


@graded("03.double_quantize", points=4)
def test_double_randomized(learner):
    for seed, shape in enumerate([(256, 64), (1000, 64), (96, 576)]):
        check_double(learner, absmax_of(shape, 440 + seed), what=" (absmax of a random weight, blocks of 64)")
    check_double(learner, absmax_of((64, 500), 443, 32), what=" (absmax of a random weight, blocks of 32)")


@graded("03.double_quantize", points=3)
def test_double_nested_block_sizes(learner):
    absmax = absmax_of((600, 64), 450)  # 600 blocks: not a multiple of 64, 128 or 256
    for blocksize in (64, 128, 256):
        check_double(learner, absmax, blocksize)
    check_double(learner, absmax[:257], 256, " (257 values: the last nested block holds one)")


@graded("03.double_quantize", points=3)
def test_double_edge_cases(learner):
    check_double(learner, torch.tensor([0.7]), what=" (a single block: absmax - offset is 0, so absmax2 is 0)", reveal_inputs=True)
    check_double(learner, torch.full((300,), 0.25), what=" (all equal)")
    spiky = torch.full((512,), 0.05)
    spiky[300] = 3.0
    check_double(learner, spiky, what=" (one block with a large outlier)")
    check_double(learner, torch.tensor([0.0, 0.0, 0.5, 1e-38]), 2, what=" (zeros and bitsandbytes' 1e-38)", reveal_inputs=True)


@graded("03.double_quantize", points=3)
def test_double_refuses_bad_input(learner):
    absmax = absmax_of((8, 64), 460)
    bad = [
        ((absmax.double(),), TypeError, "absmax must be float32, as quantize_blockwise_4bit returns it"),
        ((absmax.reshape(2, 4),), TypeError, "absmax must be 1-D"),
        ((torch.empty(0),), TypeError, "absmax must not be empty"),
        ((absmax.tolist(),), TypeError, "absmax must be a tensor"),
        ((absmax, 0), ValueError, "blocksize must be a positive integer"),
        ((absmax, -256), ValueError, "blocksize must be a positive integer"),
    ]
    for args, error, why in bad:
        call = f"double_quantize({shape_text(args[0])}{', ' + str(args[1]) if len(args) > 1 else ''})"
        expect_raises(lambda: learner.double_quantize(*args), (error,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# double_dequantize


def double_dequantize_mistakes(codes, absmax2, offset, blocksize) -> dict:
    n = codes.numel()
    per_element = absmax2.repeat_interleave(blocksize)[:n]
    values = DYNAMIC[codes.long()]
    found = {
        "offset not added back": values * per_element,
        "offset subtracted instead of added": values * per_element - offset,
        "absmax2.repeat(blocksize) (tiles the vector) instead of repeat_interleave (repeats each block's value)": (
            values * absmax2.repeat(blocksize)[:n] + offset),
        "divided by absmax2 instead of multiplying": values / per_element + offset,
        "the codes decoded as evenly spaced values, 2 * code / 255 - 1: look them up in dynamic_map()": (
            (2 * codes.float() / 255 - 1) * per_element + offset),
        "the unsigned dynamic map (dynamic_map(signed=False)): double quantization uses the signed one": (
            nf4.dynamic_map(signed=False)[codes.long()] * per_element + offset),
    }
    if blocksize != 64 and absmax2.numel() * 64 >= n:
        found["nested blocks of 64 instead of `blocksize`"] = values * absmax2.repeat_interleave(64)[:n] + offset
    return found


def check_double_dequantize(learner, codes, absmax2, offset, blocksize=None, what="", reveal_inputs=False):
    size = blocksize or nf4.NESTED_BLOCKSIZE
    call = (f"double_dequantize(codes {shape_text(codes)}, absmax2 {shape_text(absmax2)}, offset "
            f"{offset.item():.6g}" + (f", blocksize={blocksize})" if blocksize else ")") + what)  # fmt: skip
    expected = nf4.double_dequantize(codes, absmax2, offset, size)
    args = (codes, absmax2, offset) + ((blocksize,) if blocksize else ())
    got = learner.double_dequantize(*args)
    expect_close(got, expected, call=call, rtol=2e-7, atol=1e-9,
                 inputs={"codes": codes, "absmax2": absmax2} if reveal_inputs else None,
                 variants=double_dequantize_mistakes(codes, absmax2, offset, size))  # fmt: skip


@graded("03.double_dequantize", points=2)
def test_double_dequantize_fixed(learner):
    codes = torch.tensor([0, 127, 128, 255, 200, 50], dtype=torch.uint8)
    check_double_dequantize(learner, codes, torch.tensor([0.5]), torch.tensor(0.25), reveal_inputs=True)
    check_double_dequantize(learner, codes, torch.tensor([0.5, 2.0]), torch.tensor(0.25), 4, reveal_inputs=True)


@graded("03.double_dequantize", points=3)
def test_double_dequantize_round_trip(learner):
    for seed, shape in enumerate([(256, 64), (1000, 64), (96, 576)]):
        absmax = absmax_of(shape, 470 + seed)
        check_double_dequantize(learner, *nf4.double_quantize(absmax), what=" (double_quantize's output for a random weight)")


@graded("03.double_dequantize", points=3)
def test_double_dequantize_nested_block_sizes(learner):
    absmax = absmax_of((600, 64), 480)
    for blocksize in (64, 128, 256, 3):
        check_double_dequantize(learner, *nf4.double_quantize(absmax, blocksize), blocksize)
    check_double_dequantize(learner, *nf4.double_quantize(torch.tensor([0.7])), what=" (a single block)")


# ---------------------------------------------------------------------------------------------
# bits_per_weight


def bits_mistakes(blocksize: int, compress: bool, nested: int) -> dict:
    B, B2 = blocksize, nested
    table = {}
    if compress:
        table.update({
            "absmax2 charged per nested block only, 32 / B2: each absmax2 covers B2 blocks of B weights, 32 / (B * B2)": 4 + 8 / B + 32 / B2,
            "the absmax2 term left out (4 + 8 / B)": 4 + 8 / B,
            "double quantization ignored: 4 + 32 / B": 4 + 32 / B,
            "the 8-bit absmax charged per nested block (8 / B2) instead of per block (8 / B)": 4 + 8 / B2 + 32 / (B * B2),
        })  # fmt: skip
    else:
        table["double quantization applied although compress_statistics is False"] = 4 + 8 / B + 32 / (B * B2)
    table.update({
        "the 4 bits of the code itself left out": (32 / B) if not compress else 8 / B + 32 / (B * B2),
        "a 16-bit absmax (bitsandbytes stores float32: 32 bits)": 4 + 16 / B,
        "bytes instead of bits": (4 + 32 / B) / 8 if not compress else (4 + 8 / B + 32 / (B * B2)) / 8,
    })  # fmt: skip
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in table.items()}


def check_bits(learner, *args):
    call = f"bits_per_weight({', '.join(map(repr, args))})"
    expected = nf4.bits_per_weight(*args)
    got = learner.bits_per_weight(*args)
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        raise Mismatch(f"{call} should return a number (float), got {describe_value(got)}")
    if not math.isclose(got, expected, rel_tol=1e-12, abs_tol=0.0):
        full = dict(zip(("blocksize", "compress_statistics", "nested_blocksize"), (64, True, 256)))
        full.update(dict(zip(full, args)))
        variant = diagnose(torch.tensor(float(got), dtype=torch.float64), bits_mistakes(*full.values()), rtol=1e-12)
        raise Mismatch(f"{call} returned {got!r}, expected {expected!r}.{variant}")


@graded("03.bits_per_weight", points=2)
def test_bits_defaults(learner):
    check_bits(learner)
    check_bits(learner, 64, False)
    check_bits(learner, 64, True)


@graded("03.bits_per_weight", points=2)
def test_bits_every_block_size(learner):
    for blocksize in nf4.BLOCKSIZES:
        for compress in (True, False):
            check_bits(learner, blocksize, compress)
    check_bits(learner, 64, True, 128)
    check_bits(learner, 32, True, 64)


@graded("03.bits_per_weight", points=2)
def test_bits_refuses_bad_input(learner):
    for args, why in [((100,), "blocksize must be one of 32, 64, ..., 4096"), ((48, False), "blocksize must be a power of two from 32 to 4096"),
                      ((64, True, 0), "nested_blocksize must be a positive integer")]:  # fmt: skip
        expect_raises(lambda: learner.bits_per_weight(*args), (ValueError,), call=f"bits_per_weight({', '.join(map(repr, args))})", why=why)
