"""Number formats: what a float, an integer code and a 4-bit code book can hold, and what it costs.

A binary float is three fields, sign S, exponent field E (e bits) and mantissa field M (m bits):

    normal    (E > 0):  (-1)^S * 2^(E - bias)  * (1 + M / 2^m)
    subnormal (E = 0):  (-1)^S * 2^(1 - bias)  * (M / 2^m)

so each binade [2^e, 2^(e+1)) holds 2^m equally spaced values, 2^(e-m) apart. Formats differ in
e, m, the bias, and what the top exponent field means:

- IEEE-like (FP32, FP16, BF16, FP8 E5M2): E all ones is infinity (M = 0) or NaN (M != 0).
- OCP FP8 E4M3 "fn" (finite, NaN): no infinities; only S.1111.111 is NaN, the rest of the top
  binade holds numbers, which is how it reaches 448 with 4 exponent bits.
- OCP FP4 E2M1 (MXFP4, NVFP4 elements): no infinities and no NaN at all.

`encode` and `decode` work from these definitions alone (no dtype conversion), so the tests can
hold them against torch's own float16, bfloat16 and float8 types.

Integer codes (INT-n) are the grids of lesson 01 (`affine.quant_range`). NF4 and bitsandbytes' FP4
are code books: 16 real values in [-1, 1], the 4-bit code is an index into the table.

The memory arithmetic at the end counts the quantization constants too: int4 with one fp16 scale
per 64 weights costs 4 + 16/64 = 4.25 bits per weight, not 4.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .affine import check_bits, check_tensor, quant_range

NanEncoding = Literal["ieee", "all_ones", "none"]


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with 1 sign bit.

    nan: "ieee" (E all ones and M != 0 is NaN, E all ones and M = 0 is infinity; needs has_inf),
    "all_ones" (only S.11..1.11..1 is NaN, no infinity: OCP E4M3), "none" (every pattern is a
    number: OCP E2M1).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    has_inf: bool
    nan: NanEncoding

    def __post_init__(self):
        if self.exponent_bits < 1 or self.mantissa_bits < 1:
            raise ValueError(
                f"{self.name}: exponent_bits and mantissa_bits must be at least 1, got "
                f"{self.exponent_bits} and {self.mantissa_bits}"
            )
        if self.nan not in ("ieee", "all_ones", "none"):
            raise ValueError(f"{self.name}: nan must be 'ieee', 'all_ones' or 'none', got {self.nan!r}")
        if (self.nan == "ieee") != self.has_inf:
            raise ValueError(
                f"{self.name}: IEEE-style NaN (nan='ieee') and infinities come together, since both "
                f"live in the all-ones exponent; got has_inf={self.has_inf}, nan={self.nan!r}"
            )

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bytes_per_param(self) -> float:
        return self.bits / 8

    @property
    def min_exponent(self) -> int:
        """e_min = 1 - bias: the exponent of the smallest normal and of every subnormal."""
        return 1 - self.bias

    @property
    def max_magnitude_pattern(self) -> int:
        """Bit pattern (sign 0) of the largest finite value."""
        top_exponent = 2**self.exponent_bits - 1
        all_mantissa = 2**self.mantissa_bits - 1
        if self.nan == "ieee":  # the top exponent is reserved for inf and NaN
            return ((top_exponent - 1) << self.mantissa_bits) | all_mantissa
        if self.nan == "all_ones":  # only mantissa all ones is reserved, for NaN
            return (top_exponent << self.mantissa_bits) | (all_mantissa - 1)
        return (top_exponent << self.mantissa_bits) | all_mantissa

    @property
    def max_finite(self) -> float:
        return decode(self, torch.tensor(self.max_magnitude_pattern)).item()

    @property
    def smallest_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Spacing of the values just above 1 (machine epsilon): 2^-m."""
        return 2.0**-self.mantissa_bits


FP32 = FloatFormat("fp32", exponent_bits=8, mantissa_bits=23, bias=127, has_inf=True, nan="ieee")
FP16 = FloatFormat("fp16", exponent_bits=5, mantissa_bits=10, bias=15, has_inf=True, nan="ieee")
BF16 = FloatFormat("bf16", exponent_bits=8, mantissa_bits=7, bias=127, has_inf=True, nan="ieee")
FP8_E4M3 = FloatFormat("fp8_e4m3", exponent_bits=4, mantissa_bits=3, bias=7, has_inf=False, nan="all_ones")
FP8_E5M2 = FloatFormat("fp8_e5m2", exponent_bits=5, mantissa_bits=2, bias=15, has_inf=True, nan="ieee")
FP4_E2M1 = FloatFormat("fp4_e2m1", exponent_bits=2, mantissa_bits=1, bias=1, has_inf=False, nan="none")
FLOAT_FORMATS = {f.name: f for f in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2, FP4_E2M1)}


def encode(fmt: FloatFormat, x: torch.Tensor) -> torch.Tensor:
    """Round x to the nearest value of `fmt` (ties to even) and return its bit pattern.

    x: any shape, any float dtype. Returns int64 of the same shape holding the unsigned pattern
    (0 .. 2^bits - 1); `bits.to(torch.int16).view(torch.float16)` etc. turns it into a tensor.

    Overflow: formats with infinities follow IEEE (values that round past the largest finite
    value become +-inf). Formats without infinities saturate: every |x| > max, inf included,
    becomes +-max. That is what torch 2.13 does for `.to(torch.float8_e4m3fn)` (448 for 500 and
    for inf); the OCP spec also allows a non-saturating mode that returns NaN instead.
    NaN: sign kept, all exponent and mantissa bits set (E4M3's only NaN; a valid quiet NaN in the
    IEEE formats). E2M1 has no NaN, so a NaN input is an error.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"encode needs a float tensor, got {got}; convert it first, e.g. x.double()")
    if fmt.nan == "none" and torch.isnan(x).any():
        raise ValueError(f"{fmt.name} has no NaN encoding, but x holds NaN; remove or replace them first")
    m = fmt.mantissa_bits
    x = x.to(torch.float64)
    a = torch.where(torch.isfinite(x), x.abs(), 0.0)  # inf and NaN get their patterns at the end
    # Binade of a: 2^e <= a < 2^(e+1), floored at e_min, where the subnormals (and 0) share its
    # spacing. frexp writes a = f * 2^k with 0.5 <= f < 1, so e = k - 1.
    e = torch.frexp(a).exponent.to(torch.int64) - 1
    e = torch.where(a > 0, torch.clamp(e, min=fmt.min_exponent), fmt.min_exponent)
    # n = a in units of the spacing 2^(e - m); a normal has 2^m <= n < 2^(m+1). The scaling by a
    # power of two is exact in float64, so the only rounding is this one (torch.round: half to even).
    n = torch.round(a * torch.exp2((m - e).to(torch.float64))).to(torch.int64)
    # Pattern of the magnitude: exponent field (e - e_min + 1) above the mantissa field n - 2^m,
    # which adds up to (e - e_min) * 2^m + n. A subnormal (e = e_min, n < 2^m) gets field 0, and n
    # rounding up to 2^(m+1) carries into the exponent field by itself.
    magnitude = ((e - fmt.min_exponent) << m) + n
    overflow = (magnitude > fmt.max_magnitude_pattern) | torch.isinf(x)
    infinity_or_max = fmt.max_magnitude_pattern + 1 if fmt.has_inf else fmt.max_magnitude_pattern
    magnitude = torch.where(overflow, infinity_or_max, magnitude)
    magnitude = torch.where(torch.isnan(x), 2 ** (fmt.bits - 1) - 1, magnitude)  # all ones
    sign = torch.signbit(x).to(torch.int64) << (fmt.bits - 1)
    return sign | magnitude


def decode(fmt: FloatFormat, bits: torch.Tensor) -> torch.Tensor:
    """The real value of each bit pattern, as float64 (exact for every format here).

    bits: integer tensor of patterns, unsigned (0 .. 2^bits - 1) or a signed view of the same
    bits (`x.view(torch.int16)` of a float16 tensor works as is).
    """
    if not isinstance(bits, torch.Tensor) or bits.is_floating_point() or bits.dtype == torch.bool:
        raise TypeError(
            "decode needs an integer tensor of bit patterns; for a float16 tensor x pass "
            "x.view(torch.int16), for float8 x.view(torch.uint8)"
        )
    b = bits.to(torch.int64)
    lo, hi = -(2 ** (fmt.bits - 1)), 2**fmt.bits
    if b.numel() and (b.min() < lo or b.max() >= hi):
        raise ValueError(
            f"{fmt.name} patterns are {fmt.bits}-bit: expected values in [{lo}, {hi}), got "
            f"[{b.min().item()}, {b.max().item()}]"
        )
    m = fmt.mantissa_bits
    b = b & (2**fmt.bits - 1)
    negative = (b >> (fmt.bits - 1)) == 1
    exponent_field = (b >> m) & (2**fmt.exponent_bits - 1)
    mantissa_field = b & (2**m - 1)
    # normal: (2^m + M) * 2^(E - bias - m); subnormal: M * 2^(1 - bias - m)
    significand = torch.where(exponent_field > 0, mantissa_field + 2**m, mantissa_field)
    exponent = torch.clamp(exponent_field, min=1) - fmt.bias - m
    value = significand.to(torch.float64) * torch.exp2(exponent.to(torch.float64))
    top = exponent_field == 2**fmt.exponent_bits - 1
    if fmt.nan == "ieee":
        value = torch.where(top & (mantissa_field == 0), math.inf, value)
        value = torch.where(top & (mantissa_field != 0), math.nan, value)
    elif fmt.nan == "all_ones":
        value = torch.where(top & (mantissa_field == 2**m - 1), math.nan, value)
    return torch.where(negative, -value, value)


@dataclass(frozen=True)
class IntFormat:
    """An n-bit integer grid: signed [-2^(n-1), 2^(n-1) - 1] or unsigned [0, 2^n - 1]."""

    bits: int
    signed: bool = True

    def __post_init__(self):
        check_bits(self.bits)

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def range(self) -> tuple[int, int]:
        return quant_range(self.bits, signed=self.signed)

    @property
    def bytes_per_param(self) -> float:
        return self.bits / 8


INT_FORMATS = {f.name: f for f in (IntFormat(b, s) for b in range(2, 9) for s in (True, False))}
INT8, INT4 = INT_FORMATS["int8"], INT_FORMATS["int4"]

# NF4 (QLoRA, bitsandbytes): code i is the i-th value, sorted; exact float32 table.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip

# bitsandbytes' FP4, indexed by the 4-bit pattern S.E1E0.M, divided by 12 so the largest is 1.
# Not OCP E2M1: its exponent field counts down (01 -> 8, 10 -> 4, 11 -> 2, times 1 or 1.5) and
# its one subnormal is 0.0625; OCP E2M1 (FP4_E2M1 above) holds 0, 0.5, 1, 1.5, 2, 3, 4, 6.
FP4_CODEBOOK = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12

NF4_OFFSET = 0.9677083


def build_nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Rebuild NF4 from quantiles of the standard normal: [16] float32, sorted.

    8 positive values Phi^-1(p) for p evenly spaced from `offset` down to 0.5 (9 points, 0.5
    dropped), 7 negative ones from 8 points the same way, and an exact 0 so that zero padding
    and zero weights stay exact. The asymmetry (8 vs 7) spends all 16 codes. Dividing by the
    largest maps the table onto [-1, 1]. The offset keeps the outermost quantile finite: with
    p = 1 it would be infinite. Equal to bitsandbytes' create_normal_map (which uses scipy), bit
    for bit: like it, the probabilities are spaced in float32 and the quantiles divided in float32
    (float64 throughout lands 1 ulp away on some values).
    """
    if not 0.5 < offset < 1:
        raise ValueError(
            f"offset must lie strictly between 0.5 and 1, got {offset}: it is the probability of the outermost "
            "quantile, Phi^-1(1) is infinite and offsets at or below 0.5 leave no positive half (bitsandbytes: 0.9677083)"
        )
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return values / values.max()


def check_codebook(codebook: torch.Tensor) -> None:
    """A code book is a 1-D float tensor of at most 256 values (a uint8 code indexes it)."""
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 1 or not codebook.is_floating_point():
        raise TypeError("codebook must be a 1-D float tensor of code values, e.g. NF4_CODEBOOK")
    if not 1 <= codebook.numel() <= 256:
        raise ValueError(f"a uint8 code indexes at most 256 values; this codebook has {codebook.numel()}")


def nearest_code(codebook: torch.Tensor, x_normalized: torch.Tensor) -> torch.Tensor:
    """Index of the closest code book value for each element: uint8, shaped like x_normalized.

    x_normalized: float, already divided by its block's absmax (so in [-1, 1] for NF4/FP4).
    Ties go to the lower index.
    """
    check_codebook(codebook)
    check_tensor(x_normalized, "x_normalized")
    distance = (x_normalized.float().unsqueeze(-1) - codebook.float()).abs()  # [..., n_codes]
    return distance.argmin(dim=-1).to(torch.uint8)


def codebook_decode(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Look the codes up: float32 shaped like codes."""
    check_codebook(codebook)
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor of indices, got {codes.dtype}")
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)  # Python ints: no uint8 wrap
    if lo < 0 or hi >= codebook.numel():
        raise ValueError(
            f"codes must index the {codebook.numel()}-entry codebook (0..{codebook.numel() - 1}), "
            f"got values from {lo} to {hi}"
        )
    return codebook.float()[codes.long()]


CODEBOOK_BITS = {"nf4": 4, "fp4": 4}


def bits_per_element(fmt: str | int) -> int:
    """Bits of one stored element: a format name ("fp16", "int4", "nf4", ...) or a bit count."""
    if isinstance(fmt, bool) or not isinstance(fmt, (str, int)):
        raise TypeError(f"give a format name like 'fp16' or a number of bits, got {fmt!r}")
    if isinstance(fmt, int):
        if not 1 <= fmt <= 64:
            raise ValueError(f"bits per element must be from 1 to 64, got {fmt}")
        return fmt
    known = {**{k: f.bits for k, f in FLOAT_FORMATS.items()}, **{k: f.bits for k, f in INT_FORMATS.items()}}
    known.update(CODEBOOK_BITS)
    if fmt.lower() not in known:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(sorted(known))}, or pass a bit count")
    return known[fmt.lower()]


def bits_per_param(
    fmt: str | int,
    group_size: int | None = None,
    scale_bits: int = 16,
    zero_bits: int = 0,
    double_quant_group_size: int | None = None,
    double_quant_scale_bits: int = 32,
) -> float:
    """Average storage bits per parameter, quantization constants included.

    b + (scale_bits + zero_bits) / g  [+ double_quant_scale_bits / (g * g2)]

    group_size g: one scale (and zero point) per g parameters; None means no constants. With
    double quantization the scales themselves are stored in scale_bits and quantized in groups of
    g2 = double_quant_group_size, each with one double_quant_scale_bits constant. NF4 as in QLoRA:
    4 + 8/64 + 32/(64*256) = 4.127 bits (bitsandbytes also keeps one fp32 offset per tensor).
    """
    bits = float(bits_per_element(fmt))
    if check_groups(group_size, double_quant_group_size):
        bits += (scale_bits + zero_bits) / group_size
    if double_quant_group_size is not None:
        bits += double_quant_scale_bits / (group_size * double_quant_group_size)
    return bits


def memory_bytes(
    n_params: int | float,
    fmt: str | int,
    group_size: int | None = None,
    scale_bits: int = 16,
    zero_bits: int = 0,
    double_quant_group_size: int | None = None,
    double_quant_scale_bits: int = 32,
) -> float:
    """Bytes to store n_params parameters in `fmt`, constants included (see `bits_per_param`).

    Counted for one flat tensor, where a last partial group still needs its constants:
    n*b + ceil(n/g)*(scale_bits + zero_bits) + ceil(ceil(n/g)/g2)*double_quant_scale_bits bits.
    memory_bytes(70e9, "fp16") = 140e9 bytes: 140 GB, or 130.4 GiB, for the weights alone.
    """
    n = check_count(n_params)
    bits = n * bits_per_element(fmt)
    if check_groups(group_size, double_quant_group_size):
        groups = math.ceil(n / group_size)
        bits += groups * (scale_bits + zero_bits)
        if double_quant_group_size is not None:
            bits += math.ceil(groups / double_quant_group_size) * double_quant_scale_bits
    return bits / 8


def check_groups(group_size: int | None, double_quant_group_size: int | None) -> bool:
    """Validate the group sizes; True when there are quantization constants to count."""
    if group_size is None:
        if double_quant_group_size is not None:
            raise ValueError("double quantization quantizes the group scales: give group_size too")
        return False
    check_count(group_size, "group_size")
    if double_quant_group_size is not None:
        check_count(double_quant_group_size, "double_quant_group_size")
    return True


def check_count(n: int | float, what: str = "n_params") -> int:
    """A positive whole number; 70e9 is accepted as 70_000_000_000."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 1:
        raise ValueError(f"{what} must be a positive whole number, got {n!r}")
    return int(n)


# (label, format, keyword arguments of memory_bytes)
MEMORY_SCHEMES = (
    ("FP32", "fp32", {}),
    ("FP16 / BF16", "fp16", {}),
    ("FP8 E4M3 (one scale per tensor)", "fp8_e4m3", {}),
    ("INT8 g32 + fp16 scale (GGUF Q8_0)", "int8", {"group_size": 32}),
    ("INT4 g32 + fp16 scale (GGUF Q4_0)", "int4", {"group_size": 32}),
    ("NF4 g64 + fp32 absmax (bitsandbytes)", "nf4", {"group_size": 64, "scale_bits": 32}),
    ("INT4 g64 + fp16 scale", "int4", {"group_size": 64}),
    ("INT4 g128 + fp16 scale + 4-bit zero (GPTQ/AWQ)", "uint4", {"group_size": 128, "zero_bits": 4}),
    ("NF4 g64 + double quant (QLoRA)", "nf4", {"group_size": 64, "scale_bits": 8, "double_quant_group_size": 256}),
    ("INT3 g128 + fp16 scale + 3-bit zero", "uint3", {"group_size": 128, "zero_bits": 3}),
    ("INT2 g64 + fp16 scale + 2-bit zero", "uint2", {"group_size": 64, "zero_bits": 2}),
)  # fmt: skip


def memory_table(n_params: int | float) -> list[dict]:
    """One row per storage scheme of MEMORY_SCHEMES: weights only (no KV cache, activations,
    or optimizer state). Keys: format, bits_per_param, bytes, gb (1e9 bytes), gib (2^30 bytes)."""
    rows = []
    for label, fmt, kwargs in MEMORY_SCHEMES:
        size = memory_bytes(n_params, fmt, **kwargs)
        rows.append({
            "format": label,
            "bits_per_param": bits_per_param(fmt, **kwargs),
            "bytes": size,
            "gb": size / 1e9,
            "gib": size / 2**30,
        })  # fmt: skip
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """A text table of `memory_table` rows, GB and GiB side by side, units spelled out."""
    width = max(len("format"), *(len(r["format"]) for r in rows))
    lines = [f"{'format':<{width}}  {'bits/param':>10}  {'GB (1e9 B)':>11}  {'GiB (2^30 B)':>12}"]
    for r in rows:
        lines.append(f"{r['format']:<{width}}  {r['bits_per_param']:>10.3f}  {r['gb']:>11.1f}  {r['gib']:>12.1f}")
    lines.append("Weights only: KV cache, activations and runtime buffers come on top.")
    return "\n".join(lines)
