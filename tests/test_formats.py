"""Number formats: bit-level encode/decode against torch's own dtypes, format properties, integer
ranges, the NF4 and FP4 code books, and the memory arithmetic."""

import math

import pytest
import torch

from quantcourse.reference_impl.formats import (
    BF16,
    FP4_CODEBOOK,
    FP4_E2M1,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    INT4,
    INT8,
    INT_FORMATS,
    NF4_CODEBOOK,
    FloatFormat,
    bits_per_param,
    build_nf4_codebook,
    codebook_decode,
    decode,
    encode,
    format_memory_table,
    memory_bytes,
    memory_table,
    nearest_code,
)

FP8 = [(FP8_E4M3, torch.float8_e4m3fn), (FP8_E5M2, torch.float8_e5m2)]
HALF = [(FP16, torch.float16), (BF16, torch.bfloat16)]
VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def torch_patterns(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch's own rounding of x to dtype, as unsigned int64 bit patterns."""
    y = x.to(dtype)
    bits = 8 * y.element_size()
    return y.view(VIEW[y.element_size()]).to(torch.int64) & (2**bits - 1)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as floats, NaN where the other is NaN, and -0 told apart from +0."""
    both_nan = a.isnan() & b.isnan()
    equal = (a == b) & (torch.signbit(a) == torch.signbit(b))
    return bool((both_nan | equal).all())


def midpoints(fmt: FloatFormat) -> torch.Tensor:
    """The exact midpoint between every pair of neighbouring non-negative finite values (float64)."""
    values = decode(fmt, torch.arange(fmt.max_magnitude_pattern + 1))
    return (values[:-1] + values[1:]) / 2


@pytest.mark.parametrize(("fmt", "dtype"), FP8, ids=["e4m3fn", "e5m2"])
def test_fp8_decode_matches_torch_for_all_256_patterns(fmt, dtype):
    patterns = torch.arange(256)
    assert same_values(decode(fmt, patterns), patterns.to(torch.uint8).view(dtype).double())


@pytest.mark.parametrize(("fmt", "dtype"), HALF, ids=["fp16", "bf16"])
def test_16_bit_decode_matches_torch_for_all_65536_patterns(fmt, dtype):
    patterns = torch.arange(2**16)
    assert same_values(decode(fmt, patterns), patterns.to(torch.int16).view(dtype).double())


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP8_E5M2, FP16, BF16], ids=lambda f: f.name)
def test_encode_recovers_every_pattern_that_is_not_nan(fmt):
    patterns = torch.arange(2**fmt.bits)
    values = decode(fmt, patterns)
    keep = ~values.isnan()
    assert torch.equal(encode(fmt, values[keep]), patterns[keep])


@pytest.mark.parametrize(("fmt", "dtype"), FP8 + HALF, ids=["e4m3fn", "e5m2", "fp16", "bf16"])
def test_encode_rounds_like_torch(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    mids = midpoints(fmt).float()  # exact in float32: one bit more than the format's mantissa
    assert torch.equal(mids.double(), midpoints(fmt))
    just_above = torch.nextafter(mids, torch.tensor(math.inf))
    just_below = torch.nextafter(mids, torch.tensor(0.0))
    # log-uniform magnitudes from far below the smallest subnormal to far above the maximum
    low, high = math.log2(fmt.smallest_subnormal) - 3, math.log2(fmt.max_finite) + 3
    spread = torch.exp2(torch.empty(20_000).uniform_(low, high, generator=g))
    overflow = torch.tensor([fmt.max_finite * 1.03, fmt.max_finite * 1.5, 1e30, math.inf])
    x = torch.cat([mids, just_above, just_below, spread, overflow, torch.tensor([0.0])])
    x = torch.cat([x, -x])
    assert torch.equal(encode(fmt, x), torch_patterns(x, dtype))


def test_fp16_encode_of_random_float32_bit_patterns_matches_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-(2**31), 2**31, (20_000,), dtype=torch.int64, generator=g).to(torch.int32).view(torch.float32)
    x = x[~x.isnan()]
    assert torch.equal(encode(FP16, x), torch_patterns(x, torch.float16))
    assert torch.equal(encode(BF16, x), torch_patterns(x, torch.bfloat16))


def test_fp32_encode_rounds_float64_like_torch():
    g = torch.Generator().manual_seed(2)
    magnitudes = torch.exp2(torch.empty(10_000, dtype=torch.float64).uniform_(-155, 130, generator=g))
    x = torch.cat([magnitudes, -magnitudes])
    assert torch.equal(encode(FP32, x), torch_patterns(x, torch.float32))
    # float32 values themselves come back bit for bit
    y = x.float()
    assert torch.equal(encode(FP32, y), y.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)


def test_overflow_saturates_without_infinity_and_goes_to_inf_with_it():
    # e4m3fn: 0x7E = S.1111.110 = 1.75 * 2^8 = 448 is the largest; 0x7F is NaN. Saturate, as torch does.
    big = torch.tensor([449.0, 464.0, 500.0, 1e9, math.inf, -500.0, -math.inf])
    assert encode(FP8_E4M3, big).tolist() == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE]
    # fp16: the largest is 65504, the next step would be 65536; the midpoint 65520 rounds up to inf.
    assert encode(FP16, torch.tensor([65519.0, 65520.0, -1e6])).tolist() == [0x7BFF, 0x7C00, 0xFC00]
    # e5m2: 57344 = 1.75 * 2^15; 61440 is the midpoint to the would-be 65536.
    assert encode(FP8_E5M2, torch.tensor([61439.0, 61440.0])).tolist() == [0x7B, 0x7C]


def test_nan_keeps_its_sign_and_sets_every_bit():
    nan = torch.tensor([math.nan, -math.nan])
    assert encode(FP8_E4M3, nan).tolist() == [0x7F, 0xFF]
    assert encode(FP8_E4M3, nan).tolist() == torch_patterns(nan, torch.float8_e4m3fn).tolist()
    assert decode(FP16, encode(FP16, nan)).isnan().all()
    with pytest.raises(ValueError, match="no NaN"):
        encode(FP4_E2M1, nan)


def test_subnormals_and_ties_to_even_by_hand():
    # fp16 smallest subnormal 2^-24; half of it is a tie between 0 (even) and 1 -> 0,
    # 1.5 * 2^-24 is a tie between codes 1 and 2 -> 2 (even).
    tiny = 2.0**-24
    assert encode(FP16, torch.tensor([tiny, tiny / 2, 1.5 * tiny, -tiny])).tolist() == [1, 0, 2, 0x8001]
    # e4m3: 1 + 1/16 is halfway between 1 (mantissa 000) and 1.125 (001): stays at 1 = 0x38
    assert encode(FP8_E4M3, torch.tensor([1.0625, 1.1875])).tolist() == [0x38, 0x3A]


def test_decode_reads_signed_views_and_refuses_bad_input():
    x = torch.tensor([-2.5, 1.0], dtype=torch.float16)
    assert decode(FP16, x.view(torch.int16)).tolist() == [-2.5, 1.0]
    with pytest.raises(ValueError, match="8-bit"):
        decode(FP8_E4M3, torch.tensor([256]))
    with pytest.raises(TypeError, match="integer tensor"):
        decode(FP16, x)
    with pytest.raises(TypeError, match="float tensor"):
        encode(FP16, torch.tensor([1, 2]))


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [(FP32, torch.float32), (FP16, torch.float16), (BF16, torch.bfloat16)] + FP8,
    ids=["fp32", "fp16", "bf16", "e4m3fn", "e5m2"],
)
def test_properties_match_torch_finfo(fmt, dtype):
    info = torch.finfo(dtype)
    assert fmt.max_finite == info.max
    assert fmt.smallest_normal == info.smallest_normal
    assert fmt.eps == info.eps
    assert fmt.bits == info.bits and fmt.bytes_per_param == info.bits / 8
    one = torch.tensor(1, dtype=VIEW[info.bits // 8])  # pattern 0...01: the smallest subnormal
    assert fmt.smallest_subnormal == one.view(dtype).item()


def test_known_format_constants():
    assert (FP8_E4M3.max_finite, FP8_E5M2.max_finite) == (448.0, 57344.0)
    assert FP8_E4M3.smallest_subnormal == 2.0**-9 and FP8_E5M2.smallest_subnormal == 2.0**-16
    assert decode(FP4_E2M1, torch.arange(8)).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert FP4_E2M1.max_finite == 6.0 and FP4_E2M1.bytes_per_param == 0.5


def test_inconsistent_format_is_refused():
    with pytest.raises(ValueError, match="come together"):
        FloatFormat("odd", exponent_bits=4, mantissa_bits=3, bias=7, has_inf=True, nan="all_ones")


def test_integer_formats():
    assert INT8.range == (-128, 127) and INT4.range == (-8, 7)
    assert INT_FORMATS["uint4"].range == (0, 15) and INT_FORMATS["int2"].range == (-2, 1)
    assert sorted(f.bits for f in INT_FORMATS.values() if f.signed) == list(range(2, 9))
    assert INT4.bytes_per_param == 0.5 and INT_FORMATS["int3"].bytes_per_param == 0.375


def test_nf4_rebuilt_from_normal_quantiles_matches_the_table():
    exact = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]  # fmt: skip
    assert NF4_CODEBOOK.tolist() == exact
    built = build_nf4_codebook()
    assert built.dtype == torch.float32 and built.shape == (16,)
    torch.testing.assert_close(built, NF4_CODEBOOK, atol=1e-6, rtol=0)
    assert (built == 0).sum() == 1 and (built > 0).sum() == 8  # 8 positive, 7 negative, one 0
    assert not torch.allclose(build_nf4_codebook(0.99), NF4_CODEBOOK, atol=1e-3)
    for offset in (1.0, 0.5, 0.3):  # an infinite outer quantile; no positive half
        with pytest.raises(ValueError, match="strictly between 0.5 and 1"):
            build_nf4_codebook(offset)


def test_fp4_codebook_is_bitsandbytes_bit_pattern_order():
    assert (FP4_CODEBOOK * 12).tolist()[:8] == [0, 0.0625, 8, 12, 4, 6, 2, 3]
    assert torch.equal(FP4_CODEBOOK[8:], -FP4_CODEBOOK[:8]) and torch.signbit(FP4_CODEBOOK[8])
    # the same normal values as OCP E2M1 (times 2), but a smaller subnormal
    ocp = decode(FP4_E2M1, torch.arange(8)) * 2
    assert sorted((FP4_CODEBOOK[:8] * 12).tolist())[2:] == sorted(ocp.tolist())[2:]


def test_codebooks_match_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(functional.get_4bit_type("nf4", device="cpu").float(), NF4_CODEBOOK)
    assert torch.equal(functional.get_4bit_type("fp4", device="cpu").float(), FP4_CODEBOOK)


def test_nearest_code_by_hand_and_ties_go_low():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.03, 0.05, 0.5, -0.7])
    # 0.03 is below the 0 / 0.0796 midpoint (0.0398), 0.05 above; 0.5 is nearer 0.4407 than 0.5626
    assert nearest_code(NF4_CODEBOOK, x).tolist() == [0, 7, 15, 7, 8, 12, 1]
    assert nearest_code(torch.tensor([0.0, 1.0]), torch.tensor([0.5])).tolist() == [0]
    assert nearest_code(NF4_CODEBOOK, x).dtype == torch.uint8


def test_nearest_code_is_the_closest_and_decodes():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(64, 32, generator=g) * 2 - 1
    for book in (NF4_CODEBOOK, FP4_CODEBOOK):
        codes = nearest_code(book, x)
        error = (codebook_decode(book, codes) - x).abs()
        best = (x.unsqueeze(-1) - book).abs().min(dim=-1).values
        assert codes.shape == x.shape and torch.equal(error, best)


def test_codebook_errors_teach():
    with pytest.raises(ValueError, match="0..15"):
        codebook_decode(NF4_CODEBOOK, torch.tensor([16]))
    with pytest.raises(TypeError, match="integer"):
        codebook_decode(NF4_CODEBOOK, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        nearest_code(NF4_CODEBOOK, torch.tensor([math.nan]))
    book = torch.linspace(-1, 1, 256)
    assert codebook_decode(book, torch.tensor([255], dtype=torch.uint8)).item() == 1.0


def test_70b_fp16_is_140_gb_or_130_4_gib():
    assert memory_bytes(70e9, "fp16") == 140e9
    rows = {r["format"]: r for r in memory_table(70e9)}
    fp16 = rows["FP16 / BF16"]
    assert fp16["gb"] == 140.0 and round(fp16["gib"], 1) == 130.4
    text = format_memory_table(memory_table(70e9))
    line = next(line for line in text.splitlines() if line.startswith("FP16 / BF16"))
    assert line.split()[-3:] == ["16.000", "140.0", "130.4"]
    assert "GB (1e9 B)" in text and "GiB (2^30 B)" in text


def test_bits_per_param_counts_the_constants():
    assert bits_per_param("int4", group_size=64) == 4.25
    assert bits_per_param("nf4", group_size=64, scale_bits=32) == 4.5
    dq = bits_per_param("nf4", group_size=64, scale_bits=8, double_quant_group_size=256)
    assert dq == 4 + 8 / 64 + 32 / (64 * 256) and round(dq, 3) == 4.127
    assert bits_per_param("uint4", group_size=128, zero_bits=4) == 4 + 20 / 128
    assert bits_per_param("bf16") == 16 and bits_per_param(3) == 3
    rows = memory_table(1e9)
    assert all(r["bytes"] == pytest.approx(r["bits_per_param"] * 1e9 / 8) for r in rows)


def test_memory_bytes_counts_a_last_partial_group():
    # 100 int4 weights in groups of 64: 2 groups (the second partial), each with a 16-bit scale
    assert memory_bytes(100, "int4", group_size=64) == (100 * 4 + 2 * 16) / 8
    # 64 * 256 * 2 + 1 weights: 513 groups of 64, so 3 second-level groups of 256 scales
    n = 64 * 256 * 2 + 1
    expected = n * 4 + 513 * 8 + 3 * 32
    assert memory_bytes(n, "nf4", group_size=64, scale_bits=8, double_quant_group_size=256) == expected / 8


def test_memory_errors_teach():
    with pytest.raises(ValueError, match="known: .*fp16"):
        memory_bytes(10, "fp12")
    with pytest.raises(ValueError, match="whole number"):
        memory_bytes(2.5, "fp16")
    with pytest.raises(ValueError, match="give group_size"):
        memory_bytes(10, "nf4", double_quant_group_size=256)
