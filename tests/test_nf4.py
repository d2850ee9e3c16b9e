"""NF4 / FP4 / double quantization (reference_impl/nf4.py) against bitsandbytes 0.50.x on CPU:
code books, packed bytes, absmax and nested state byte for byte, dequantization, error bounds,
storage cost, the matmul twin, the Linear module and the errors a learner meets."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from quantcourse.reference_impl.affine import AffineSpec, fake_quantize
from quantcourse.reference_impl.formats import nearest_code
from quantcourse.reference_impl.nf4 import (
    BLOCKSIZES,
    Linear4bit,
    QuantState,
    bits_per_weight,
    dequantize_4bit,
    dequantize_blockwise_4bit,
    double_dequantize,
    double_quantize,
    dynamic_map,
    fp4_code_book,
    int4_absmax,
    matmul_4bit,
    nearest_code_4bit,
    nearest_code_8bit,
    nf4_code_book,
    quantize_4bit,
    quantize_blockwise_4bit,
    quantize_blockwise_8bit,
    storage_bits,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# odd counts, counts below / not a multiple of every block size, rows shorter than a block,
# 1-D, 3-D, SmolLM2's 576 and 1536 widths
SHAPES = [
    (1,), (3,), (7, 5), (33,), (64,), (65,), (127,), (2, 64), (49, 64), (3, 5, 7), (10, 63),
    (129, 3), (576, 64), (192, 576), (31, 1536), (5000,), (4097,), (9000, 1), (2, 3, 4, 5),
]  # fmt: skip


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def bnb_dequantize_reference():
    """bitsandbytes' own plain-torch dequantization (its "default" backend), uncompiled."""
    ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    return ops._dequantize_4bit_compute.__wrapped__


def weights(shape, dtype=torch.float32, seed=0, kind="normal"):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.randint(-3, 2, (1,), generator=g).item()
    w = torch.randn(shape, generator=g) * scale
    if kind == "sparse":  # many exact zeros: ties between FP4's two zeros, zero blocks
        w = w * (torch.rand(shape, generator=g) < 0.3)
    elif kind == "zeros":
        w = torch.zeros(shape)
    return w.to(dtype)


def assert_same_state(state: QuantState, expected) -> None:
    """Our QuantState against bitsandbytes' one, field by field, bit for bit."""
    assert torch.equal(state.absmax, expected.absmax) and state.absmax.dtype == expected.absmax.dtype
    assert state.shape == expected.shape and state.dtype == expected.dtype
    assert state.blocksize == expected.blocksize and state.quant_type == expected.quant_type
    assert torch.equal(state.code, expected.code)
    assert state.nested == expected.nested
    if state.nested:
        assert torch.equal(state.offset, expected.offset) and state.offset.shape == ()
        assert torch.equal(state.state2.absmax, expected.state2.absmax)
        assert torch.equal(state.state2.code, expected.state2.code)
        assert state.state2.blocksize == expected.state2.blocksize == 256
        assert state.state2.dtype == expected.state2.dtype == torch.float32


# ---------------------------------------------------------------- code books


def test_nf4_code_book_is_bitsandbytes_table(bnb):
    book = nf4_code_book()
    table = bnb.get_4bit_type("nf4", device="cpu")
    assert book.dtype == torch.float32 and book.shape == (16,)
    torch.testing.assert_close(book, table, atol=1e-7, rtol=0)
    assert torch.equal(book, table)  # in fact bit for bit
    assert torch.equal(book, book.sort().values) and book[0] == -1 and book[-1] == 1
    assert (book == 0).sum() == 1 and (book > 0).sum() == 8 and (book < 0).sum() == 7
    assert not torch.allclose(nf4_code_book(0.99), book, atol=1e-3)  # the offset matters


def code_masses(book: torch.Tensor) -> torch.Tensor:
    """Probability that a standard normal, scaled so that the table's 1 sits at the quantile
    Phi^-1(0.9677083), lands nearest to each code."""
    scale = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    inf = torch.tensor([math.inf], dtype=torch.float64)
    s = book.double().sort().values
    edges = torch.cat([-inf, (s[1:] + s[:-1]) / 2 * scale, inf])
    return torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1])


def test_nf4_codes_are_used_about_equally_often_on_normal_weights():
    nf4 = code_masses(nf4_code_book())
    evenly_spaced = code_masses(torch.arange(-7, 8) / 7)  # the INT4 grid
    assert nf4.min() > 0.055 and nf4.max() < 0.072  # 1/16 = 0.0625 each would be ideal
    assert nf4.max() / nf4.min() < 1.3 and evenly_spaced.max() / evenly_spaced.min() > 3


def test_fp4_code_book_is_bitsandbytes_table(bnb):
    book = fp4_code_book()
    assert torch.equal(book, bnb.get_4bit_type("fp4", device="cpu"))
    assert (book[:8] * 12).tolist() == [0, 0.0625, 8, 12, 4, 6, 2, 3]
    assert torch.equal(book[8:], -book[:8])  # bit 3 is the sign


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_map(bnb, signed):
    code = dynamic_map(signed)
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.equal(code, bnb.create_dynamic_map(signed=signed))
    assert torch.equal(code, code.sort().values) and code.max() == 1 and len(set(code.tolist())) == 256


# ---------------------------------------------------------------- byte identity with bitsandbytes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_4bit_is_byte_identical_to_bitsandbytes(bnb, quant_type, compress_statistics, dtype):
    for i, shape in enumerate(SHAPES):
        blocksize = BLOCKSIZES[i % len(BLOCKSIZES)]
        kind = ("normal", "normal", "sparse", "zeros")[i % 4] if i < 16 else "normal"
        w = weights(shape, dtype, seed=i, kind=kind)
        packed, state = quantize_4bit(w, blocksize, quant_type, compress_statistics)
        expected_packed, expected_state = bnb.quantize_4bit(
            w, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics
        )
        assert packed.dtype == torch.uint8 and packed.shape == expected_packed.shape == (math.ceil(w.numel() / 2), 1)
        assert torch.equal(packed, expected_packed), (shape, blocksize)
        assert_same_state(state, expected_state)


def test_single_level_core_is_quantize_4bit_without_double_quant(bnb):
    w = weights((10, 63), torch.float16)
    packed, absmax = quantize_blockwise_4bit(w, 128, "fp4")
    expected_packed, expected_state = bnb.quantize_4bit(w, blocksize=128, quant_type="fp4", compress_statistics=False)
    assert torch.equal(packed, expected_packed) and torch.equal(absmax, expected_state.absmax)
    w_hat = dequantize_blockwise_4bit(packed, absmax, w.shape, 128, "fp4", torch.float16)
    assert torch.equal(w_hat, dequantize_4bit(*quantize_4bit(w, 128, "fp4", compress_statistics=False)))


@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_byte_identity_on_a_smollm2_sized_weight(bnb, blocksize):
    w = weights((1536, 576), seed=blocksize) * 0.02
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, blocksize, quant_type, compress_statistics=True)
        expected_packed, expected_state = bnb.quantize_4bit(
            w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
        )
        assert torch.equal(packed, expected_packed)
        assert_same_state(state, expected_state)


def test_quant_storage_views_the_same_bytes(bnb):
    w = weights((64, 64))
    for storage in (torch.bfloat16, torch.float32):
        packed, state = quantize_4bit(w, quant_storage=storage)
        expected, _ = bnb.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=storage
        )
        assert packed.dtype == storage and torch.equal(packed.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(quantize_4bit(w)[0], state))
    with pytest.raises(ValueError, match="do not fill whole torch.float32 elements"):
        quantize_4bit(weights((3, 3)), quant_storage=torch.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_dequantize_4bit_equals_bitsandbytes(bnb, bnb_dequantize_reference, quant_type, compress_statistics):
    """Equal values (+0 and -0 compare equal: FP4's pattern 1000 decodes to -0.0 in bnb's C kernel
    and here, +0.0 in bnb's torch code) in every output dtype."""
    for i, shape in enumerate(SHAPES):
        blocksize = BLOCKSIZES[(i + 3) % len(BLOCKSIZES)]
        w = weights(shape, DTYPES[i % 3], seed=100 + i, kind="sparse" if i % 5 == 0 else "normal")
        packed, state = bnb.quantize_4bit(
            w, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics
        )
        our_packed, our_state = quantize_4bit(w, blocksize, quant_type, compress_statistics)
        ours = dequantize_4bit(our_packed, our_state)
        assert ours.shape == w.shape and ours.dtype == w.dtype
        absmax = (
            bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset if compress_statistics else state.absmax
        )
        code = bnb.get_4bit_type(quant_type, device="cpu")
        for dtype in DTYPES:
            expected = bnb_dequantize_reference(packed.reshape(-1), absmax, code, blocksize, shape, dtype)
            assert torch.equal(dequantize_4bit(our_packed, our_state, dtype), expected), (shape, blocksize, dtype)
        if len(shape) == 1 or shape[-1] % blocksize == 0 or w.numel() <= blocksize:
            # where bnb's CPU kernel reads the right absmax (see the next test)
            assert torch.equal(ours, bnb.dequantize_4bit(packed, state).reshape(shape)), (shape, blocksize)


def state_of(w, blocksize, quant_type, compress_statistics) -> QuantState:
    return quantize_4bit(w, blocksize, quant_type, compress_statistics)[1]


def test_bitsandbytes_avx512_kernel_reads_absmax_per_row(bnb, bnb_dequantize_reference):
    """Pins the documented discrepancy: with AVX-512, bnb 0.50.2's CPU dequantize_4bit looks up
    absmax per row, wrong when a 128-block spans two 64-wide rows. Fails when bnb fixes it."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the AVX-512 kernel only runs on AVX-512 CPUs")
    w = weights((49, 64))
    packed, state = bnb.quantize_4bit(w, blocksize=128, quant_type="nf4", compress_statistics=False)
    kernel = bnb.dequantize_4bit(packed, state)
    reference = bnb_dequantize_reference(packed.reshape(-1), state.absmax, state.code, 128, (49, 64), torch.float32)
    ours = dequantize_4bit(packed, QuantState(state.absmax, (49, 64), nf4_code_book(), 128, "nf4", torch.float32))
    assert torch.equal(ours, reference)
    assert torch.equal(kernel[:2], ours[:2]) and not torch.equal(kernel[2:], ours[2:])  # rows 0-1 are block 0


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, st.integers(1, 700), elements=st.floats(-1e6, 1e6, width=32)),
    st.sampled_from(BLOCKSIZES[:4]),
    st.sampled_from(["nf4", "fp4"]),
)
def test_property_byte_identity_on_arbitrary_values(values, blocksize, quant_type):
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.from_numpy(values.copy())
    packed, state = quantize_4bit(w, blocksize, quant_type, compress_statistics=True)
    expected_packed, expected_state = bnb.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
    )
    assert torch.equal(packed, expected_packed)
    assert_same_state(state, expected_state)


# ---------------------------------------------------------------- the nearest-code rules


def test_nearest_code_4bit_is_the_nearest_and_ties_go_low():
    x = torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for book in (nf4_code_book(), fp4_code_book()):
        got = (book[nearest_code_4bit(x, book).long()] - x).abs()
        best = (book[nearest_code(book, x).long()] - x).abs()
        assert torch.allclose(got, best, atol=1e-7, rtol=0)
    nf4 = nf4_code_book()
    midpoint = (nf4[8] + nf4[9]) / 2
    assert nearest_code_4bit(midpoint[None], nf4).item() == 8  # exactly on a midpoint: the lower code
    fp4 = fp4_code_book()  # two zeros: values <= 0 take pattern 0000, small positive ones 1000
    assert nearest_code_4bit(torch.tensor([-1e-4, 0.0, 1e-4]), fp4).tolist() == [0, 0, 8]


@pytest.mark.parametrize("spread", [1.0, 1e-2, 1e-5])
def test_double_quantize_equals_bitsandbytes_quantize_blockwise(bnb, spread):
    """The spread of the absmax values around their mean decides which codes of the dynamic
    map are used; a tiny spread with one outlier exercises the dense codes near 0."""
    g = torch.Generator().manual_seed(0)
    absmax = 1.0 + spread * torch.rand(3000, generator=g)
    absmax[::700] += 0.5
    codes, absmax2, _ = double_quantize(absmax)
    expected_codes, expected_state = bnb.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert torch.equal(codes, expected_codes) and torch.equal(absmax2, expected_state.absmax)


def test_bitsandbytes_8bit_search_snaps_to_a_grid_first(bnb):
    """A value whose grid point (65536 points on [-1, 1]) lies across a midpoint: bnb's code,
    and ours, is the second nearest to the value itself."""
    code = dynamic_map()
    x = torch.tensor([-0.0011061985278502107, 1.0])
    expected, _ = bnb.quantize_blockwise(x, blocksize=256)
    assert nearest_code_8bit(x, code).tolist() == expected.tolist() == [111, 255]
    assert (x[0] - code[112]).abs() < (x[0] - code[111]).abs()
    # two more found by search: the grid index 65535 * (x + 1) / 2 + 0.5 is rounded to float32
    # before truncation (bnb's fused multiply-add), and x is scaled by the reciprocal of absmax
    # (dividing gives 232 here)
    for block, codes in (
        ([0.2687418758869171, 1.0], [203, 255]),
        ([1.4539850950241089, 2.105323314666748], [233, 255]),
    ):
        block = torch.tensor(block)
        assert bnb.quantize_blockwise(block, blocksize=256)[0].tolist() == codes
        assert quantize_blockwise_8bit(block, code, 256)[0].tolist() == codes
    x = torch.rand(50000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    error = (code[nearest_code_8bit(x, code).long()] - x).abs()
    best = (code[:, None] - x).abs().min(dim=0).values
    assert (error - best).max() <= 2 / 65535 + 1e-7  # the snap moves x by up to 1/65535, twice that at worst


def test_double_quantize_round_trip_and_offset(bnb):
    absmax = weights((5000,)).abs() + 0.01
    codes, absmax2, offset = double_quantize(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == absmax.shape
    assert absmax2.shape == (math.ceil(5000 / 256),) and offset.shape == () and offset == absmax.mean()
    restored = double_dequantize(codes, absmax2, offset)
    code = dynamic_map()
    half_gap = (code[1:] - code[:-1]).max() / 2 + 2 / 65535  # nearest code of the snapped grid point
    bound = half_gap * absmax2.repeat_interleave(256)[:5000] * (1 + 1e-6) + 1e-7
    assert ((restored - absmax).abs() <= bound).all()


# ---------------------------------------------------------------- error bounds and storage


def largest_half_gap(book: torch.Tensor) -> float:
    s = book.sort().values
    return ((s[1:] - s[:-1]).max() / 2).item()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 600),
    st.sampled_from(BLOCKSIZES[:5]),
    st.sampled_from(["nf4", "fp4"]),
    st.floats(1e-4, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_property_round_trip_error_bound(n, blocksize, quant_type, scale, seed):
    """|w - w_hat| <= (half the largest code gap) x absmax of the block, without double quant;
    with it, plus the absmax error."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    book = nf4_code_book() if quant_type == "nf4" else fp4_code_book()
    blocks = math.ceil(n / blocksize)
    absmax = torch.stack([w[b * blocksize : (b + 1) * blocksize].abs().max() for b in range(blocks)])
    per_weight = absmax.repeat_interleave(blocksize)[:n]
    error = (w - dequantize_4bit(*quantize_4bit(w, blocksize, quant_type, compress_statistics=False))).abs()
    assert (error <= largest_half_gap(book) * per_weight * (1 + 1e-6)).all()
    packed, state = quantize_4bit(w, blocksize, quant_type, compress_statistics=True)
    absmax_hat = double_dequantize(state.absmax, state.state2.absmax, state.offset)
    error_dq = (w - dequantize_4bit(packed, state)).abs()
    slack = (absmax_hat - absmax).abs().repeat_interleave(blocksize)[:n]
    assert (
        error_dq
        <= largest_half_gap(book) * torch.maximum(per_weight, absmax_hat.repeat_interleave(blocksize)[:n]) * (1 + 1e-6)
        + slack
    ).all()


def test_bits_per_weight_derivation():
    assert round(bits_per_weight(), 3) == 4.127
    assert bits_per_weight() == 4 + 8 / 64 + 32 / (64 * 256)
    assert bits_per_weight(compress_statistics=False) == 4.5
    assert bits_per_weight(128) == 4 + 8 / 128 + 32 / (128 * 256)
    assert bits_per_weight(128, compress_statistics=False) == 4.25
    w = weights((1536, 576))
    for compress in (False, True):
        stored = storage_bits(*quantize_4bit(w, 64, "nf4", compress))
        extra = 32 * (compress + math.ceil(1536 * 576 / 64 / 256) * compress)  # offset; absmax2 rounding
        assert stored / w.numel() == pytest.approx(bits_per_weight(64, compress), abs=extra / w.numel() + 1e-12)


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    """Mean squared error on N(0, 1) weights, blocks of 64. bnb's FP4 spends a code pair on
    +-1/192 (almost zero), so on normal data it is worse than evenly spaced INT4 here."""
    w = weights((1024, 512), seed=7)
    mse = {
        "int4": (w - int4_absmax(w)).pow(2).mean().item(),
        "fp4": (w - dequantize_4bit(*quantize_4bit(w, quant_type="fp4"))).pow(2).mean().item(),
        "nf4": (w - dequantize_4bit(*quantize_4bit(w, quant_type="nf4"))).pow(2).mean().item(),
    }
    scale2 = w.pow(2).mean().item()
    assert mse["nf4"] < 0.8 * mse["int4"] and mse["int4"] < mse["fp4"], mse
    assert mse["nf4"] < 0.01 * scale2


def test_int4_absmax_reuses_the_affine_grid_on_the_same_blocks():
    w = weights((48, 128))
    assert torch.equal(int4_absmax(w, 64), fake_quantize(w, AffineSpec(bits=4, granularity="group", group_size=64)))
    w = weights((7, 30))  # 210 weights: blocks straddle rows, the last one has 18
    w_hat = int4_absmax(w, 64)
    flat, flat_hat = w.reshape(-1), w_hat.reshape(-1)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    for start in range(0, 210, 64):
        block, block_hat = flat[start : start + 64], flat_hat[start : start + 64]
        step = block.abs().max() / 7
        assert torch.allclose(block_hat / step, (block_hat / step).round(), atol=1e-4)  # on the grid k * absmax / 7
        assert ((block - block_hat).abs() <= step / 2 + 1e-6).all()


# ---------------------------------------------------------------- the matmul twin and the module


def test_matmul_4bit_is_x_times_dequantized_weight_transposed(bnb):
    W = weights((96, 128)) * 0.05
    packed, state = quantize_4bit(W, 64, "nf4")
    x, bias = weights((2, 5, 128), seed=1), weights((96,), seed=2)
    y = matmul_4bit(x, packed, state, bias)
    assert y.shape == (2, 5, 96) and y.dtype == x.dtype
    torch.testing.assert_close(y, x @ dequantize_4bit(packed, state).T + bias)
    expected_packed, expected_state = bnb.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    torch.testing.assert_close(
        y, pytest.importorskip("bitsandbytes").matmul_4bit(x, expected_packed.t(), expected_state, bias=bias)
    )
    y16 = matmul_4bit(x.half(), packed, state)
    assert y16.dtype == torch.float16
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 128\]"):
        matmul_4bit(weights((3, 127)), packed, state)
    with pytest.raises(ValueError, match="2-D weight"):
        matmul_4bit(x, *quantize_4bit(weights((128,))))


@pytest.mark.parametrize(
    "quant_type, compress", [("nf4", True), ("nf4", False), ("fp4", False), ("int4_absmax", False)]
)
def test_linear4bit_module(quant_type, compress):
    linear = nn.Linear(128, 64)
    module = Linear4bit.from_linear(linear, quant_type, blocksize=64, compress_statistics=compress)
    x = torch.randn(3, 128)
    assert module.weight.shape == (64, 128) and module.weight_count() == 64 * 128
    if quant_type == "int4_absmax":
        torch.testing.assert_close(module.weight, int4_absmax(linear.weight.detach(), 64))
        assert module.storage_bits() == 64 * 128 * 4 + 128 * 32
    else:
        torch.testing.assert_close(module(x), matmul_4bit(x, module.packed, module.state, linear.bias), rtol=0, atol=0)
        assert module.storage_bits() == storage_bits(module.packed, module.state)
        assert module.storage_bits() / module.weight_count() == pytest.approx(4.5 if not compress else 4.13, abs=0.01)
    assert f"{quant_type} block 64" in repr(module)
    with pytest.raises(ValueError, match="nf4 and fp4"):
        Linear4bit.from_linear(linear, "int4_absmax", 64, compress_statistics=True)


# ---------------------------------------------------------------- errors a learner meets


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: quantize_4bit(torch.arange(64)), TypeError, "float tensor"),
        (lambda: quantize_4bit(torch.randn(64).double()), TypeError, r"pass w\.float\(\)"),
        (lambda: quantize_4bit(torch.randn(0, 64)), ValueError, "w is empty"),
        (lambda: quantize_4bit(torch.tensor([1.0, float("nan")])), ValueError, "NaN/inf"),
        (lambda: quantize_4bit(torch.randn(64), blocksize=100), ValueError, "32, 64, 128, 256, 512, 1024, 2048, 4096"),
        (lambda: quantize_4bit(torch.randn(64), blocksize=16), ValueError, "blocksize must be one of"),
        (lambda: quantize_4bit(torch.randn(64), quant_type="int4"), ValueError, "'nf4' or 'fp4'"),
        (lambda: quantize_4bit(torch.randn(64), quant_storage="uint8"), TypeError, "torch dtype"),
        (lambda: dequantize_4bit(quantize_4bit(torch.randn(64))[0], state_of(torch.randn(66), 64, "nf4", True)), ValueError, "packed holds 32 bytes"),
        (lambda: dequantize_4bit(quantize_4bit(torch.randn(200))[0], replace(state_of(torch.randn(200), 128, "nf4", False), blocksize=64)), ValueError, "need 4 absmax"),
        (lambda: dequantize_4bit(quantize_4bit(torch.randn(64))[0], {"absmax": 1}), TypeError, "QuantState"),
        (lambda: dequantize_4bit([1, 2], state_of(torch.randn(4), 64, "nf4", False)), TypeError, "packed must be the tensor"),
        (lambda: double_quantize(torch.tensor([1, 2])), TypeError, "1-D float32"),
        (lambda: double_quantize(torch.rand(10), blocksize=0), ValueError, "positive integer"),
    ],
)  # fmt: skip
def test_errors_say_what_to_do(call, error, message):
    with pytest.raises(error, match=message):
        call()
