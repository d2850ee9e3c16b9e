"""Bit packing: GPTQ's int32 words (3-bit straddling and the sign bit included), bytes, and
bitsandbytes' nibble order; round trips, hand-computed words, and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcourse.reference_impl.formats import NF4_CODEBOOK, nearest_code
from quantcourse.reference_impl.packing import (
    pack_int32,
    pack_nibbles_bnb,
    pack_uint8,
    unpack_int32,
    unpack_nibbles_bnb,
    unpack_uint8,
)

CHUNK = {2: 16, 3: 32, 4: 8, 8: 4}  # codes per whole number of int32 words


def column(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)[:, None]


def as_int32(word: int) -> int:
    """The signed int32 that has the same 32 bits as the unsigned `word`."""
    return word - 2**32 if word >= 2**31 else word


def oracle_words(codes: list[int], bits: int) -> list[int]:
    """One big Python integer as the bit stream: code k at bit bits*k; then cut into 32-bit words."""
    stream = sum(c << (bits * k) for k, c in enumerate(codes))
    return [as_int32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(len(codes) * bits // 32)]


def test_4_bit_word_by_hand():
    # codes 1..8, lowest bits first: nibble k holds code k, so the word reads 0x87654321 in hex.
    # 0x87654321 = 2271560481 >= 2^31, so as int32 it is 2271560481 - 2^32 = -2023406815.
    assert pack_int32(column([1, 2, 3, 4, 5, 6, 7, 8]), 4).item() == -2023406815
    assert pack_int32(column([0, 1, 2, 3, 4, 5, 6, 7]), 4).item() == 0x76543210  # 1985229328


def test_2_and_8_bit_words_by_hand():
    # 2 bits: codes 1, 2, 3, 0 make the byte 0b00_11_10_01 = 0x39; four times over: 0x39393939
    assert pack_int32(column([1, 2, 3, 0] * 4), 2).item() == 0x39393939
    # 8 bits: bytes 0x01, 0x02, 0x03, 0xFF from the lowest up: 0xFF030201, negative as int32
    assert pack_int32(column([1, 2, 3, 255]), 8).item() == 0xFF030201 - 2**32


def test_3_bit_codes_straddle_word_boundaries():
    # code 10 starts at stream bit 30: its low two bits end word 0, its high bit starts word 1.
    codes = [0] * 32
    codes[10] = 7
    assert pack_int32(column(codes), 3).flatten().tolist() == [-(2**30), 1, 0]  # 0xC0000000, 0x1
    # code 21 starts at bit 63: its low bit is bit 31 of word 1, its high two bits begin word 2.
    codes = [0] * 32
    codes[21] = 7
    assert pack_int32(column(codes), 3).flatten().tolist() == [0, -(2**31), 3]
    # code 22 starts at bit 66 = bit 2 of word 2, code 31 ends exactly at bit 95.
    codes = [0] * 32
    codes[22], codes[31] = 5, 7
    assert pack_int32(column(codes), 3).flatten().tolist() == [0, 0, as_int32((5 << 2) | (7 << 29))]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_ones_codes_give_words_of_minus_one(bits):
    codes = torch.full((CHUNK[bits] * 2, 3), 2**bits - 1, dtype=torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (2 * CHUNK[bits] * bits // 32, 3)
    assert (packed == -1).all()
    assert torch.equal(unpack_int32(packed, bits, codes.shape[0]), codes)


@st.composite
def int32_case(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    K = CHUNK[bits] * draw(st.integers(1, 4))
    N = draw(st.integers(1, 5))
    flat = draw(st.lists(st.integers(0, 2**bits - 1), min_size=K * N, max_size=K * N))
    return bits, torch.tensor(flat, dtype=torch.uint8).reshape(K, N)


@settings(max_examples=60, deadline=None)
@given(int32_case())
def test_int32_round_trip_and_matches_a_bit_stream(case):
    bits, codes = case
    packed = pack_int32(codes, bits)
    assert packed.shape == (codes.shape[0] * bits // 32, codes.shape[1])
    assert torch.equal(unpack_int32(packed, bits, codes.shape[0]), codes)
    for n in range(codes.shape[1]):
        assert packed[:, n].tolist() == oracle_words(codes[:, n].tolist(), bits)


@st.composite
def uint8_case(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    n = (8 // bits) * draw(st.integers(1, 6))
    size = n * math.prod(lead)
    flat = draw(st.lists(st.integers(0, 2**bits - 1), min_size=size, max_size=size))
    return bits, torch.tensor(flat, dtype=torch.uint8).reshape(*lead, n)


@settings(max_examples=60, deadline=None)
@given(uint8_case())
def test_uint8_round_trip(case):
    bits, codes = case
    packed = pack_uint8(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*codes.shape[:-1], codes.shape[-1] * bits // 8)
    assert torch.equal(unpack_uint8(packed, bits), codes)


def test_uint8_bytes_by_hand():
    u8 = lambda values: torch.tensor(values, dtype=torch.uint8)  # noqa: E731
    assert pack_uint8(u8([1, 2]), 4).tolist() == [0x21]  # first code in the LOW nibble
    assert pack_uint8(u8([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_uint8(u8([[7, 255]]), 8).tolist() == [[7, 255]]
    assert unpack_uint8(u8([0xF0, 0x0F]), 4).tolist() == [0, 15, 15, 0]


def test_bnb_nibbles_put_the_first_code_high():
    codes = torch.tensor([1, 2, 15, 0, 0, 15], dtype=torch.uint8)
    packed = pack_nibbles_bnb(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x0F]
    assert torch.equal(unpack_nibbles_bnb(packed), codes)
    # the opposite nibble order of pack_uint8
    assert pack_uint8(codes, 4).tolist() == [0x21, 0x0F, 0xF0]
    grid = torch.randint(0, 16, (3, 4, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_nibbles_bnb(pack_nibbles_bnb(grid)), grid)


def test_bnb_nibbles_match_bitsandbytes_quantize_4bit():
    functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    packed, state = functional.quantize_4bit(x, blocksize=64, quant_type="nf4")
    absmax = x.abs().amax(dim=1, keepdim=True)  # one block of 64 per row
    codes = nearest_code(NF4_CODEBOOK, x / absmax)
    assert torch.equal(pack_nibbles_bnb(codes.flatten())[:, None], packed)


def test_errors_teach():
    codes = torch.zeros(8, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\)"):
        pack_int32(codes, 5)
    with pytest.raises(ValueError, match=r"0\.\.15 for 4 bits, got a maximum of 16"):
        pack_int32(torch.full((8, 2), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="K = 12 is not a multiple of 8"):
        pack_int32(torch.zeros(12, 2, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="K = 16 is not a multiple of 32"):
        pack_int32(torch.zeros(16, 2, dtype=torch.uint8), 3)
    with pytest.raises(TypeError, match="shifted by 2\\^\\(bits-1\\) = 8"):
        pack_int32(codes.to(torch.int8), 4)
    with pytest.raises(TypeError, match="uint8"):
        pack_int32(codes.to(torch.int32), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack_int32(torch.zeros(8, dtype=torch.uint8), 4)
    packed = pack_int32(codes, 4)
    with pytest.raises(ValueError, match="packed has 1 rows"):
        unpack_int32(packed, 4, 16)
    with pytest.raises(TypeError, match="int32"):
        unpack_int32(packed.to(torch.int64), 4, 8)
    with pytest.raises(ValueError, match="bits must be one of \\(2, 4, 8\\)"):
        pack_uint8(codes, 3)
    with pytest.raises(ValueError, match="last dimension = 3 is not a multiple of 2"):
        pack_uint8(torch.zeros(2, 3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="must be even"):
        pack_nibbles_bnb(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles_bnb(torch.tensor([16, 0], dtype=torch.uint8))


def test_8_bit_codes_use_the_full_byte():
    codes = torch.tensor([[255], [0], [128], [1]], dtype=torch.uint8)
    assert torch.equal(unpack_int32(pack_int32(codes, 8), 8, 4), codes)
    assert torch.equal(unpack_uint8(pack_uint8(codes.T, 8), 8), codes.T)
