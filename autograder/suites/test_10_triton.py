"""Hidden suite of lab 10 (quantized kernels in Triton).

The learner's launchers run their kernels in the learner process, under Triton's CPU interpreter
(the sandbox sets TRITON_INTERPRET=1). There a tl.load or tl.store outside the tensors a kernel
was given raises IndexError (autograder/child.py), so a missing mask on a ragged edge fails the
call with a message naming the kernel, the line and the tensor. Expected values come from the
torch twins, computed here: packing.unpack_int32, w4a16.unpack_zeros, w4a16.dequantize_w4 and
w4a16.w4a16_matmul.

Shapes. The learner picks BLOCK_N and BLOCK_K, so no shape can be chosen to end inside "their"
last block. The shapes are ragged for every power-of-two block of 16 or more instead: symmetric
weights take odd N (5, 13, 37, 69); asymmetric ones, whose zero points pack 8 columns per word,
N = 8 x odd (8, 24, 40, 72, 200). K is 8 x odd (40, 72, 136, 200) where groups of 8 allow it,
96 (ragged for blocks of 64 and more) with groups of 32, and 64 or 256 in a few cases that
check whole tiles. Codes, zero points and g_idx are drawn uniformly, so every nibble value
appears at every position, including words whose top nibble is 8..15 (negative int32 values,
where an arithmetic shift drags the sign in).

Tolerances, each written next to the check that uses it:
- codes and zero points are integers: exact.
- dequantize, float32: W = (code - zero) * scale is one rounding of an exact product. The other
  natural order, code * scale - zero * scale, adds two roundings of products up to 15 * scale:
  2^-17 * max|scale| bounds both. A float16 result may round to either neighbour: 2^-10 relative.
- GEMV, per output n: a float32 sum of K terms in another order than the reference's differs by
  at most K * 2^-24 * S_n, S_n = sum_k |x_k W_nk| + |bias_n| (the classical bound for recursive
  summation); for float16 x a kernel may round the dequantized weight to float16 before the
  product, as tensor-core kernels do, adding sum_k |x_k| |W_nk - fp16(W_nk)|; the final rounding
  to x's dtype adds one unit in the last place. Accumulating in float16 can stay within these
  bounds on small random cases, so one case (test_gemv_accumulates_in_float32) is built to
  expose it whatever the block sizes.

Diagnosis: the outputs of common mistakes (nibbles highest first, zero point 0 instead of 8,
zero points unpacked along the wrong axis, the group of a word row instead of an input, the last
partial block never written, the bias forgotten, ...) are computed by small torch versions below
when a learner's output differs, and the feedback names the one it matches. Wrong values that
all lie past a block boundary at the end of an axis get a note about the ragged edge.
"""

import pytest
import torch

from quantcourse.autograder import testing
from quantcourse.autograder.testing import Mismatch, describe_value, expect_raises, graded, same_kind
from quantcourse.kernels import quantize as kernels_quantize
from quantcourse.kernels import w4a16 as kernels_w4a16
from quantcourse.reference_impl import packing, w4a16

GRADED = {
    "unpack_int32": packing.unpack_int32,
    "unpack_zeros": w4a16.unpack_zeros,
    "dequantize_int4": kernels_quantize.dequantize_int4,
    "w4a16_gemv": kernels_w4a16.w4a16_gemv,
}
BLOCKS = (16, 32, 64, 128, 256)  # block sizes a learner may pick, for the "last block never written" mistakes


@pytest.fixture(autouse=True)
def one_thread():
    """The suite's tensors are tiny: on a busy machine, waking a second thread for each small
    reduction costs more than the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Inputs


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [K, N] in 0..15 -> qweight [K/8, N] int32 (packing.pack_int32)."""
    return packing.pack_int32(codes.to(torch.uint8), 4)


def pack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """zero points [G, N] in 0..15 -> qzeros [G, N/8] int32, packed along N."""
    return packing.pack_int32(zeros.to(torch.uint8).T.contiguous(), 4).T.contiguous()


def random_weight(N: int, K: int, group: int, symmetric: bool, seed: int, scales_dtype=torch.float32, act_order=False):
    """(qweight, scales, qzeros, g_idx) with uniform codes and zero points and positive scales."""
    g = generator(seed)
    qweight = pack_codes(torch.randint(0, 16, (K, N), generator=g))
    scales = (0.01 + 0.1 * torch.rand(K // group, N, generator=g)).to(scales_dtype)
    qzeros = None if symmetric else pack_zeros(torch.randint(0, 16, (K // group, N), generator=g))
    g_idx = (torch.argsort(torch.randperm(K, generator=g)) // group).to(torch.int32) if act_order else None
    return qweight, scales, qzeros, g_idx


def real_weight(N: int, K: int, group: int, symmetric: bool, seed: int):
    """A heavy-tailed weight quantized by the reference (quantize_w4), fp16 scales as in checkpoints."""
    g = generator(seed)
    W = torch.randn(N, K, generator=g) * torch.where(torch.rand(N, K, generator=g) < 0.02, 8.0, 1.0)
    qweight, scales, qzeros = w4a16.quantize_w4(W, group, symmetric)
    return qweight, scales.half(), qzeros, None


def fixed_weight(symmetric: bool):
    """N = 8 outputs, K = 16 inputs, groups of 8, every value exact in float32:
    code[k, n] = (k + 3n) % 16, zero[g, n] = (5 + g + n) % 16, scale[g, n] = (1 + n)(1 + g) / 8."""
    k, n, g = torch.arange(16)[:, None], torch.arange(8)[None, :], torch.arange(2)[:, None]
    qweight = pack_codes((k + 3 * n) % 16)
    scales = ((1 + n) * (1 + g) / 8).float()
    qzeros = None if symmetric else pack_zeros((5 + g + n) % 16)
    return qweight, scales, qzeros, None


def shape_of(t) -> str:
    return "None" if t is None else f"[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')}"


# ---------------------------------------------------------------------------------------------
# Comparison


def block_starts(length: int) -> dict[int, list[int]]:
    """Where the last, partial block of an axis of `length` starts, for each block size a learner
    may pick: {start: [block sizes]} (blocks that divide `length` leave none)."""
    starts: dict[int, list[int]] = {}
    for block in BLOCKS:
        if length % block:
            starts.setdefault(length // block * block, []).append(block)
    return starts


def tail_variants(expected: torch.Tensor, axes: dict[int, str]) -> dict:
    """The reference with the end of an axis left at 0, as when the last (partial) block is never
    computed: a grid of n // BLOCK programs instead of cdiv(n, BLOCK), or a loop that stops early."""
    found = {}
    for axis, what in axes.items():
        length = expected.shape[axis]
        for start, blocks in block_starts(length).items():
            wrong = expected.clone()
            wrong.narrow(axis, start, length - start).zero_()
            found[
                f"{what} {start} to {length - 1} are 0: the last, partial block (BLOCK = "
                f"{' or '.join(map(str, blocks))}?) was never computed. Launch cdiv({length}, BLOCK) programs, "
                f"not {length} // BLOCK, and mask that block"
            ] = wrong
    return found


def tail_note(bad: torch.Tensor, axes: dict[int, str]) -> str:
    """A note when every wrong value lies at the end of one axis, from a multiple of 16 on."""
    for axis, what in axes.items():
        hit = bad.movedim(axis, 0).reshape(bad.shape[axis], -1).any(dim=1).nonzero().flatten()
        if len(hit) and hit[0] > 0 and hit[0] % 16 == 0:
            return (
                f" Every wrong value lies in {what} {int(hit[0])} to {bad.shape[axis] - 1}, after a multiple of 16:"
                " look at the last, partial block of that axis (the grid's cdiv, the masks of its loads and"
                " stores, the last iteration of the loop over K)."
            )
    return ""


def expect_within(got, expected, allowed, *, call: str, mistakes=None, axes=None, inputs=None, hint: str = ""):
    """Every element of `got` within `allowed` (0 for exact, or a tensor like `expected`) of the
    reference. On a mismatch: how many differ, the first one, the known mistake that explains the
    output (`mistakes`: a function returning {name: output}), a note about ragged edges (`axes`:
    {axis: name}) and `hint`."""
    if isinstance(got, torch.Tensor) and got.dim() == 2 and expected.dim() == 2 and got.shape == expected.shape[::-1] != expected.shape:
        raise Mismatch(
            f"{call} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}: the result looks "
            "transposed. W is [N, K] like a Linear's weight (out_features, in_features), while qweight is [K/8, N]."
        )
    same_kind(got, expected, call)
    allowed = torch.as_tensor(allowed, dtype=torch.float64)

    def within(output):
        return (output.double() - expected.double()).abs() <= allowed

    ok = within(got)
    if bool(ok.all()):
        return
    bad = ~ok
    index = tuple(int(i) for i in bad.nonzero()[0])
    limit = allowed.expand(expected.shape)[index].item()
    message = (
        f"{call}: {int(bad.sum())} of {bad.numel()} values differ; first at index {index}: got "
        f"{describe_value(got[index].item())}, expected {describe_value(expected[index].item())}"
        + (f" (allowed difference {limit:.3g})" if limit else "")
    )
    if testing.REVEAL_INPUTS and inputs:
        message += ". Inputs: " + ", ".join(f"{k} = {describe_value(v)}" for k, v in inputs.items())
    message += "."
    wrong = dict(mistakes() if mistakes else {})
    wrong.update(tail_variants(expected, axes or {}))
    for name, output in wrong.items():
        telling = output.shape == expected.shape and not bool(within(output).all())
        if telling and bool(((got.double() - output.double()).abs() <= allowed).all()):
            message += f" Your output matches a common mistake: {name}."
            break
    else:
        message += tail_note(bad, axes or {})
    raise Mismatch(message + (f" {hint}" if hint else ""))


# ---------------------------------------------------------------------------------------------
# Common mistakes, each a small torch version of the wrong computation


def nibbles(words: torch.Tensor, reverse: bool = False, width: int | None = 0xF) -> torch.Tensor:
    """words [R, C] int32 -> [R, 8, C] int64: nibble j of each word (highest first if reverse),
    shifted as Triton shifts an int32, arithmetically (the sign bit comes along). width 0xFF
    keeps the next nibble too, as a shift without a mask before a cast to uint8 does; None keeps
    every bit above."""
    j = torch.arange(8)
    shifts = 4 * (7 - j) if reverse else 4 * j
    shifted = words.to(torch.int64)[:, None, :] >> shifts[None, :, None]
    return shifted if width is None else shifted & width


CODE_MISTAKES = {
    "reversed": "nibbles read highest first: code j of a word is in bits 4j..4j+3, the lowest nibble first",
    "no mask": "the shifted word was not masked with 0xF, so the next nibble leaks into the code",
    "sign": "codes 8..15 of the top nibble came out negative: >> on an int32 copies the sign bit, so mask after "
            "shifting, (word >> 4j) & 0xF, not before",
}


def codes_with(qweight: torch.Tensor, mistake: str | None = None) -> torch.Tensor:
    """codes [K, N] int64 as unpacked with one of CODE_MISTAKES (None: correctly); stored as
    uint8 they wrap modulo 256, as a Triton cast does."""
    parts = nibbles(qweight, reverse=mistake == "reversed", width=0xFF if mistake == "no mask" else 0xF)
    if mistake == "sign":
        parts[:, 7] = nibbles(qweight, width=None)[:, 7]
    return parts.reshape(-1, qweight.shape[1])


def codes_stacked(qweight: torch.Tensor, tile: int) -> torch.Tensor:
    """codes [K, N] as a kernel with tiles of `tile` codes lays them out when it builds the 3-D
    block [8, tile/8, N] instead of [tile/8, 8, N]: nibble j of word row i of a tile lands on
    row j * tile/8 + i of the tile."""
    rows, N = qweight.shape
    per_tile = tile // 8
    tiles = -(-rows // per_tile)
    padded = torch.zeros(tiles * per_tile, N, dtype=torch.int32)
    padded[:rows] = qweight  # masked word rows past K read 0
    parts = nibbles(padded).reshape(tiles, per_tile, 8, N).transpose(1, 2)
    return parts.reshape(tiles * tile, N)[: 8 * rows]


def code_mistakes(qweight: torch.Tensor) -> dict:
    """{description: codes [K, N] int64} for every known unpacking mistake."""
    found = {text: codes_with(qweight, m) for m, text in CODE_MISTAKES.items()}
    K = 8 * qweight.shape[0]
    for tile in sorted(set(BLOCKS) | {K}):
        found[
            f"nibble j of word row i put at row j*(BLOCK_K/8) + i of its tile (BLOCK_K = {tile}?) instead of "
            "8i + j: the 3-D block was built [8, BLOCK_K/8, BLOCK_N], shifts on the first axis, before tl.reshape"
        ] = codes_stacked(qweight, tile)
    return found


ZERO_MISTAKES = {
    "reversed": "the nibbles of qzeros read highest first",
    "spread": "column n taken from nibble n // (N/8) of word n % (N/8): zero point n is nibble n % 8 of word n // 8",
    "by group": "qzeros unpacked along the wrong axis (the nibble chosen by the group, not by the column n % 8)",
    "v1": "1 added to every zero point (AutoGPTQ's v1 files store zero - 1; this course stores the zero point itself)",
}


def zeros_with(qzeros: torch.Tensor, N: int, mistake: str | None = None) -> torch.Tensor:
    """Zero points [G, N] float32 as unpacked with one of ZERO_MISTAKES (None: correctly)."""
    G = qzeros.shape[0]
    parts = nibbles(qzeros, reverse=mistake == "reversed")  # [G, 8, N/8]: nibble j of word w
    if mistake == "spread":
        return parts.reshape(G, N).float()
    zeros = parts.transpose(1, 2).reshape(G, N)  # column 8w + j
    if mistake == "by group":
        n, g = torch.arange(N), torch.arange(G)[:, None]
        zeros = parts[g, g % 8, n // 8]
    if mistake == "v1":
        zeros = zeros + 1
    return zeros.float()


def zeros_mistakes(qzeros, groups: int, N: int) -> dict:
    if qzeros is None:
        return {"zero point 0 for a symmetric grid: its codes are stored shifted by 8, so its zero point is 8": torch.zeros(groups, N)}
    return {text: zeros_with(qzeros, N, mistake) for mistake, text in ZERO_MISTAKES.items()}


def weight_mistakes(qweight, scales, qzeros, group: int, g_idx) -> dict:
    """W [N, K] float32 for each known mistake of a dequantization that applies to this weight."""
    K, N = 8 * qweight.shape[0], qweight.shape[1]
    G = scales.shape[0]
    s = scales.float()
    right_groups = torch.arange(K) // group if g_idx is None else g_idx.long()
    right_zeros = w4a16.unpack_zeros(qzeros, G, N)
    codes = codes_with(qweight).float()

    def weight(codes=codes, zeros=right_zeros, groups=right_groups, formula=None):
        z, sc = zeros[groups], s[groups]  # [K, N]
        if formula == "zero not scaled":
            return (codes * sc - z).T.contiguous()
        if formula == "float16":
            return ((codes - z).half() * sc.half()).float().T.contiguous()
        return ((codes - z) * sc).T.contiguous()

    found = {text: weight(codes=wrong.float()) for text, wrong in code_mistakes(qweight).items() if "leaks" not in text}
    found |= {
        "the group of word row k // 8 used for input k: the group of input k is k // group_size":
            weight(groups=(torch.arange(K) // 8 // group).clamp(max=G - 1)),
        "code * scale - zero: the zero point must be subtracted before scaling, W = scale * (code - zero)":
            weight(formula="zero not scaled"),
        "computed in float16 (the scale multiplied in its own dtype): compute in float32": weight(formula="float16"),
    }  # fmt: skip
    if g_idx is not None:
        found["g_idx ignored: with act-order, input k belongs to group g_idx[k], not k // group_size"] = weight(
            groups=torch.arange(K) // group
        )
    for name, zeros in zeros_mistakes(qzeros, G, N).items():
        found[name] = weight(zeros=zeros)
    if qzeros is not None:
        found["qzeros ignored: 8 used as every zero point"] = weight(zeros=torch.full((G, N), 8.0))
    return found


# ---------------------------------------------------------------------------------------------
# unpack_int32


def check_unpack(learner, packed: torch.Tensor, K: int, reveal: bool = False):
    call = f"unpack_int32(packed {shape_of(packed)}, 4, K={K})"
    expected = packing.unpack_int32(packed, 4, K)

    def mistakes():
        return {text: (codes & 0xFF).to(torch.uint8) for text, codes in code_mistakes(packed).items()}

    expect_within(learner.unpack_int32(packed, 4, K), expected, 0, call=call, mistakes=mistakes,
                  axes={0: "rows (inputs k)", 1: "columns (outputs n)"}, inputs={"packed": packed} if reveal else None)  # fmt: skip


def words(*values: int) -> list[int]:
    """Unsigned 32-bit words written in hex, as the int32 values a tensor stores."""
    return [v - (1 << 32) if v >= 1 << 31 else v for v in values]


@graded("10.unpack_int32", points=4)
def test_unpack_int32_fixed_words(learner):
    packed = torch.tensor([
        words(0x76543210, 0xFEDCBA98, 0x0000000F),
        words(0xFFFFFFFF, 0x00000000, 0x10000000),
    ], dtype=torch.int32)  # fmt: skip
    check_unpack(learner, packed, 16, reveal=True)


@graded("10.unpack_int32", points=6)
def test_unpack_int32_random_ragged_shapes(learner):
    for seed, (K, N) in enumerate([(8, 1), (40, 24), (72, 37), (136, 5), (256, 69)]):
        codes = torch.randint(0, 16, (K, N), generator=generator(100 + seed))
        check_unpack(learner, pack_codes(codes), K)


@graded("10.unpack_int32", points=4)
def test_unpack_int32_refuses_bad_input(learner):
    packed = pack_codes(torch.randint(0, 16, (16, 3), generator=generator(1)))
    expect_raises(lambda: learner.unpack_int32(packed, 5, 16), (ValueError,), call="unpack_int32(packed, 5, 16)",
                  why="bits must be one of 2, 3, 4, 8 (and this lab's kernel takes 4)")  # fmt: skip
    expect_raises(lambda: learner.unpack_int32(packed.long(), 4, 16), (TypeError,), call="unpack_int32(int64 packed, 4, 16)",
                  why="packed must be an int32 tensor, like GPTQ's qweight")  # fmt: skip
    expect_raises(lambda: learner.unpack_int32(packed, 4, 20), (ValueError,), call="unpack_int32(packed, 4, K=20)",
                  why="K must be a multiple of 8: each int32 word holds 8 codes")  # fmt: skip
    expect_raises(lambda: learner.unpack_int32(packed, 4, 24), (ValueError,), call="unpack_int32(packed [2, 3], 4, K=24)",
                  why="24 codes fill 3 word rows, and packed has 2")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# unpack_zeros


def check_zeros(learner, qzeros, groups: int, N: int, reveal: bool = False):
    call = f"unpack_zeros(qzeros {shape_of(qzeros)}, groups={groups}, N={N})"
    expected = w4a16.unpack_zeros(qzeros, groups, N)
    expect_within(learner.unpack_zeros(qzeros, groups, N), expected, 0, call=call,
                  mistakes=lambda: zeros_mistakes(qzeros, groups, N), axes={1: "columns (outputs n)"},
                  inputs={"qzeros": qzeros} if reveal else None)  # fmt: skip


@graded("10.unpack_zeros", points=3)
def test_unpack_zeros_fixed_words(learner):
    qzeros = torch.tensor([words(0x76543210, 0x89ABCDEF), words(0x11111111, 0xFFFFFFFF)], dtype=torch.int32)
    check_zeros(learner, qzeros, 2, 16, reveal=True)


@graded("10.unpack_zeros", points=5)
def test_unpack_zeros_random_ragged_shapes(learner):
    for seed, (G, N) in enumerate([(1, 8), (3, 24), (5, 40), (2, 72), (4, 200)]):
        zeros = torch.randint(0, 16, (G, N), generator=generator(200 + seed))
        check_zeros(learner, pack_zeros(zeros), G, N)


@graded("10.unpack_zeros", points=2)
def test_unpack_zeros_symmetric_is_eight(learner):
    for groups, N in [(3, 13), (1, 8)]:
        check_zeros(learner, None, groups, N)


@graded("10.unpack_zeros", points=2)
def test_unpack_zeros_refuses_bad_input(learner):
    qzeros = pack_zeros(torch.randint(0, 16, (2, 16), generator=generator(2)))
    expect_raises(lambda: learner.unpack_zeros(qzeros, 2, 12), (ValueError,), call="unpack_zeros(qzeros [2, 2], 2, N=12)",
                  why="zero points pack 8 per word along N: N must be a multiple of 8")  # fmt: skip
    expect_raises(lambda: learner.unpack_zeros(qzeros, 2, 24), (ValueError,), call="unpack_zeros(qzeros [2, 2], 2, N=24)",
                  why="24 columns need 3 words per group, and qzeros has 2")  # fmt: skip
    expect_raises(lambda: learner.unpack_zeros(qzeros.long(), 2, 16), (TypeError,), call="unpack_zeros(int64 qzeros, 2, 16)",
                  why="qzeros must be an int32 tensor")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dequantize_int4

DEQUANT_AXES = {0: "rows (outputs n)", 1: "columns (inputs k)"}


def check_dequantize(learner, weight, group_size, dtype=torch.float32, reveal=False):
    qweight, scales, qzeros, g_idx = weight
    K = 8 * qweight.shape[0]
    group = K if group_size is None else group_size
    call = (f"dequantize_int4(qweight {shape_of(qweight)}, scales {shape_of(scales)}, qzeros {shape_of(qzeros)}, "
            f"group_size={group_size}, g_idx {shape_of(g_idx)}, dtype={str(dtype).removeprefix('torch.')})")  # fmt: skip
    expected = w4a16.dequantize_w4(qweight, scales, qzeros, group_size, g_idx).to(dtype)
    # (code - zero) * scale is one rounding; code * scale - zero * scale adds two roundings of
    # products up to 15 * scale: 2^-17 max|scale| bounds the difference. float16 output: 1 ulp.
    allowed = 2**-17 * scales.float().abs().max().item() + (2**-10 * expected.double().abs() if dtype == torch.float16 else 0)

    def mistakes():
        return {name: W.to(dtype) for name, W in weight_mistakes(qweight, scales, qzeros, group, g_idx).items()}

    got = learner.dequantize_int4(qweight, scales, qzeros, group_size, g_idx, dtype)
    inputs = {"qweight": qweight, "scales": scales, "qzeros": qzeros} if reveal else None
    expect_within(got, expected, allowed, call=call, mistakes=mistakes, axes=DEQUANT_AXES, inputs=inputs)


@graded("10.dequantize_int4", points=4)
def test_dequantize_fixed_weight(learner):
    for symmetric in (True, False):
        check_dequantize(learner, fixed_weight(symmetric), 8, reveal=True)


@graded("10.dequantize_int4", points=6)
def test_dequantize_symmetric_ragged_shapes(learner):
    cases = [(13, 64, 32, torch.float32), (37, 40, 8, torch.float16), (69, 136, 8, torch.float32), (5, 96, 32, torch.float16)]
    for seed, (N, K, group, scales_dtype) in enumerate(cases):
        check_dequantize(learner, random_weight(N, K, group, True, 300 + seed, scales_dtype), group)


@graded("10.dequantize_int4", points=6)
def test_dequantize_asymmetric_ragged_shapes(learner):
    cases = [(24, 72, 8, 8), (40, 96, 32, 32), (72, 200, 8, 8), (8, 48, None, 48)]
    for seed, (N, K, group_size, group) in enumerate(cases):
        check_dequantize(learner, random_weight(N, K, group, False, 400 + seed, torch.float16), group_size)


@graded("10.dequantize_int4", points=4)
def test_dequantize_act_order_g_idx(learner):
    for seed, (N, K, group, symmetric) in enumerate([(24, 96, 32, False), (13, 40, 8, True)]):
        check_dequantize(learner, random_weight(N, K, group, symmetric, 500 + seed, act_order=True), group)


@graded("10.dequantize_int4", points=4)
def test_dequantize_float16_output_and_real_weights(learner):
    check_dequantize(learner, random_weight(37, 72, 8, True, 600), 8, dtype=torch.float16)
    check_dequantize(learner, real_weight(40, 96, 32, False, 601), 32, dtype=torch.float16)
    check_dequantize(learner, real_weight(13, 64, 32, True, 602), 32)


@graded("10.dequantize_int4", points=4)
def test_dequantize_refuses_bad_input(learner):
    qweight, scales, qzeros, _ = random_weight(16, 40, 8, False, 700)
    bad = [
        ((qweight.long(), scales, qzeros, 8), TypeError, "qweight must be int32"),
        ((qweight, scales.int(), qzeros, 8), TypeError, "scales must be a float tensor"),
        ((qweight, scales[:, :8].contiguous(), qzeros, 8), ValueError, "scales must be [K / group_size, N] = [5, 16]"),
        ((qweight, scales, qzeros, 12), ValueError, "group_size must be a multiple of 8"),
        ((qweight, scales, qzeros, 16), ValueError, "group_size 16 does not divide K = 40"),
        ((qweight[:, :13].contiguous(), scales[:, :13].contiguous(), qzeros, 8), ValueError,
         "qzeros packs 8 columns per word: N = 13 cannot have zero points"),
    ]  # fmt: skip
    for args, error, why in bad:
        call = f"dequantize_int4(qweight {shape_of(args[0])}, scales {shape_of(args[1])}, qzeros {shape_of(args[2])}, group_size={args[3]})"
        expect_raises(lambda: learner.dequantize_int4(*args), (error,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# w4a16_gemv


def gemv_allowed(x: torch.Tensor, W: torch.Tensor, bias, expected: torch.Tensor) -> torch.Tensor:
    """Per output, how far a correct float32-accumulating kernel may land from the reference
    (the module docstring derives each term)."""
    x64, W64 = x.double().reshape(1, -1), W.double()
    K = W.shape[1]
    S = (x64.abs() * W64.abs()).sum(dim=1) + (0 if bias is None else bias.double().abs())
    allowed = K * 2**-24 * S
    if x.dtype != torch.float32:
        rounded = W.to(x.dtype).double()
        allowed = allowed + (x64.abs() * (W64 - rounded).abs()).sum(dim=1)
    ulp = 2**-10 if x.dtype == torch.float16 else 2**-7 if x.dtype == torch.bfloat16 else 2**-23
    return allowed.reshape(expected.shape) + ulp * expected.double().abs()


def gemv_mistakes(x, weight, group, bias, expected) -> dict:
    qweight, scales, qzeros, g_idx = weight
    K = x.shape[-1]

    def apply(W, b=bias):
        y = x.float().reshape(1, K) @ W.T + (0 if b is None else b.float())
        return y.reshape(expected.shape).to(x.dtype)

    found = {name: apply(W) for name, W in weight_mistakes(qweight, scales, qzeros, group, g_idx).items()}
    W = w4a16.dequantize_w4(qweight, scales, qzeros, group, g_idx)
    if bias is not None:
        found["bias forgotten"] = apply(W, None)
        found["bias added twice"] = apply(W, 2 * bias.float())
    for start, blocks in block_starts(K).items():
        found[f"inputs {start} to {K - 1} left out: the last, partial tile of K (BLOCK_K = {' or '.join(map(str, blocks))}?) "
              "was skipped; loop over range(0, K, BLOCK_K) and mask that tile"] = apply(W * (torch.arange(K) < start))  # fmt: skip
    return found


def check_gemv(learner, x, weight, group_size, bias=None, reveal=False, hint=""):
    qweight, scales, qzeros, g_idx = weight
    K = 8 * qweight.shape[0]
    group = K if group_size is None else group_size
    call = (f"w4a16_gemv(x {shape_of(x)}, qweight {shape_of(qweight)}, scales {shape_of(scales)}, qzeros {shape_of(qzeros)}, "
            f"g_idx {shape_of(g_idx)}, group_size={group_size}, bias {shape_of(bias)})")  # fmt: skip
    expected = w4a16.w4a16_matmul(x, qweight, scales, qzeros, g_idx, group_size, bias)
    W = w4a16.dequantize_w4(qweight, scales, qzeros, group_size, g_idx)
    got = learner.w4a16_gemv(x, qweight, scales, qzeros, g_idx, group_size, bias)
    inputs = {"x": x, "qweight": qweight, "scales": scales, "qzeros": qzeros} if reveal else None
    expect_within(got, expected, gemv_allowed(x, W, bias, expected), call=call, inputs=inputs, hint=hint,
                  mistakes=lambda: gemv_mistakes(x, weight, group, bias, expected), axes={expected.dim() - 1: "outputs"})  # fmt: skip


def random_x(K: int, dtype, seed: int, shape=None) -> torch.Tensor:
    return torch.randn(shape or (1, K), generator=generator(seed)).to(dtype)


@graded("10.w4a16_gemv", points=4)
def test_gemv_fixed_weight(learner):
    x = (torch.arange(16, dtype=torch.float32) / 8).reshape(1, 16)
    for symmetric in (True, False):
        check_gemv(learner, x, fixed_weight(symmetric), 8, reveal=True)


@graded("10.w4a16_gemv", points=6)
def test_gemv_symmetric_ragged_shapes(learner):
    cases = [(13, 64, 32), (37, 40, 8), (69, 136, 8), (5, 256, None)]
    for seed, (N, K, group_size) in enumerate(cases):
        weight = random_weight(N, K, group_size or K, True, 800 + seed)
        check_gemv(learner, random_x(K, torch.float32, 850 + seed), weight, group_size)


@graded("10.w4a16_gemv", points=6)
def test_gemv_asymmetric_float16_ragged_shapes(learner):
    cases = [(24, 72, 8), (40, 96, 32), (72, 256, 64), (8, 200, 8)]
    for seed, (N, K, group) in enumerate(cases):
        weight = random_weight(N, K, group, False, 900 + seed, torch.float16)
        check_gemv(learner, random_x(K, torch.float16, 950 + seed), weight, group)


@graded("10.w4a16_gemv", points=5)
def test_gemv_act_order_and_bias(learner):
    weight = random_weight(24, 96, 32, False, 1000, act_order=True)
    check_gemv(learner, random_x(96, torch.float32, 1001), weight, 32, bias=torch.randn(24, generator=generator(1002)))
    weight = random_weight(13, 40, 8, True, 1003, torch.float16, act_order=True)
    check_gemv(learner, random_x(40, torch.float16, 1004), weight, 8, bias=torch.randn(13, generator=generator(1005)).half())
    check_gemv(learner, random_x(64, torch.float16, 1006), real_weight(40, 64, 32, False, 1007), 32)


@graded("10.w4a16_gemv", points=3)
def test_gemv_keeps_the_shape_of_x(learner):
    weight = random_weight(13, 64, 32, True, 1100)
    check_gemv(learner, random_x(64, torch.float32, 1101, shape=(64,)), weight, 32)
    check_gemv(learner, random_x(64, torch.float32, 1102, shape=(1, 64)), weight, 32)


def cancelling_weight():
    """N = 24, K = 2048, groups of 128, symmetric; with x = 1 every output is exactly 24.

    Inputs 0..255 contribute +56 each (code 15, scale 8): the running sum reaches 14336, where
    float16's spacing is 8. The 1536 middle inputs add 1/64 each (code 9, scale 1/64): a tile of
    up to 256 of them adds at most 4, half a spacing, which a float16 sum rounds away. The last
    256 inputs take the 14336 back (code 1). A float32 accumulator keeps the 24; float16 gives 0."""
    K, N, group = 2048, 24, 128
    k = torch.arange(K)
    code = torch.where(k < 256, 15, torch.where(k >= K - 256, 1, 9))
    qweight = pack_codes(code[:, None].expand(K, N))
    g = torch.arange(K // group)[:, None].expand(K // group, N)
    scales = torch.where((g < 2) | (g >= K // group - 2), 8.0, 1 / 64).half()
    return qweight, scales, None, None


@graded("10.w4a16_gemv", points=5)
def test_gemv_accumulates_in_float32(learner):
    x = torch.ones(1, 2048, dtype=torch.float16)
    check_gemv(learner, x, cancelling_weight(), 128, hint=(
        "In this case a large running sum (14336) takes many small terms and cancels at the end. A float16 "
        "accumulator (or float16 products summed in float16) loses the small terms: keep the accumulator in "
        "float32 (tl.zeros(..., dtype=tl.float32)), convert each tile to float32 before summing, and convert "
        "to x's dtype only when storing."
    ))  # fmt: skip


@graded("10.w4a16_gemv", points=5)
def test_gemv_refuses_bad_input(learner):
    weight = random_weight(16, 64, 32, False, 1200)
    qweight, scales, qzeros, _ = weight
    x = random_x(64, torch.float32, 1201)
    bad = [
        ((torch.arange(64, dtype=torch.int32)[None], qweight, scales, qzeros), {}, TypeError, "x must be a float tensor"),
        ((x.tolist(), qweight, scales, qzeros), {}, TypeError, "x must be a torch.Tensor"),
        ((random_x(72, torch.float32, 1202), qweight, scales, qzeros), {}, ValueError, "x must have K = 64 inputs"),
        ((random_x(64, torch.float32, 1203, shape=(2, 64)), qweight, scales, qzeros), {}, ValueError,
         "the GEMV takes one row of x, and this x has 2"),
        ((x, qweight, scales, qzeros), {"bias": torch.zeros(17)}, ValueError, "bias must have shape (N,) = (16,)"),
        ((x, qweight.long(), scales, qzeros), {}, TypeError, "qweight must be int32"),
    ]  # fmt: skip
    for args, kwargs, error, why in bad:
        call = f"w4a16_gemv(x {shape_of(args[0]) if isinstance(args[0], torch.Tensor) else 'list'}, qweight {shape_of(args[1])}, ...{', bias [17]' if kwargs else ''})"
        expect_raises(lambda: learner.w4a16_gemv(*args, group_size=32, **kwargs), (error,), call=call, why=why)
