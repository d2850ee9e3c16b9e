"""Affine (uniform) quantization: the map every later lesson builds on.

A real value x is stored as an integer code q on a grid of 2^b levels:

    q = clamp(round(x / s) + z, q_min, q_max)        x_hat = s * (q - z)

- scale s: the step between neighbouring levels, s = (range covered) / (number of steps).
- zero point z: the code that stands for the real value 0 (exactly representable).

Symmetric: signed grid [-2^(b-1), 2^(b-1) - 1], z = 0, s = max|x| / (2^(b-1) - 1); the most
negative code is unused by the rounding, which keeps the grid symmetric around 0.
Asymmetric: unsigned grid [0, 2^b - 1], the range [min(x, 0), max(x, 0)] is widened to contain 0,
s = (max - min) / (2^b - 1), z = round(-min / s): an integer zero point (GPTQ, AWQ).
Asymmetric with a float zero point: the range is [min, max] as it is, z = -min / s unrounded, so
x_hat = s * q + min (llama.cpp's Q4_1 stores exactly this s and min). The grid fits the data
more tightly, but 0 is no longer exactly representable.

Granularity says which elements share one (s, z): the whole tensor, each channel (a slice along
one axis, e.g. each output row of a Linear weight [out, in]), or each group of `group_size`
consecutive elements along the last axis (the input dimension of a Linear weight).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]
Rounding = Literal["half_even", "half_away"]
ZeroPoint = Literal["integer", "float"]
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class AffineSpec:
    """How to quantize a tensor.

    bits: 2..8. symmetric: signed grid and z = 0, else unsigned grid with a zero point.
    granularity: "tensor", "channel" (one scale per index along `axis`) or "group"
    (`group_size` consecutive elements of the last axis). rounding: "half_even" (torch.round,
    GPTQ) or "half_away" (C's roundf, llama.cpp's Q8_0). ragged: allow a last group shorter than
    group_size when it does not divide the last axis. zero_point (asymmetric only): "integer"
    (stored in `bits` bits, 0 exact) or "float" (stored as fp16, x_hat = s * q + min).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None
    axis: int = 0
    rounding: Rounding = "half_even"
    ragged: bool = False
    zero_point: ZeroPoint = "integer"

    def __post_init__(self):
        check_bits(self.bits)
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}")
        if self.rounding not in ("half_even", "half_away"):
            raise ValueError(f"rounding must be 'half_even' or 'half_away', got {self.rounding!r}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError(f"granularity 'group' needs a positive group_size, got {self.group_size!r}")
        if self.zero_point not in ("integer", "float"):
            raise ValueError(f"zero_point must be 'integer' or 'float', got {self.zero_point!r}")
        if self.zero_point == "float" and self.symmetric:
            raise ValueError("a float zero point needs an asymmetric grid: pass symmetric=False")

    @property
    def qmin(self) -> int:
        return quant_range(self.bits, signed=self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.bits, signed=self.symmetric)[1]

    def describe(self) -> str:
        kind = "sym" if self.symmetric else ("asym" if self.zero_point == "integer" else "asym-float-zero")
        where = {"tensor": "per-tensor", "channel": f"per-channel(axis {self.axis})"}.get(
            self.granularity, f"g{self.group_size}"
        )
        return f"int{self.bits} {kind} {where}"


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest code: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    check_bits(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def round_half(x: torch.Tensor, mode: Rounding = "half_even") -> torch.Tensor:
    """Round to the nearest integer; ties to even (2.5 -> 2) or away from zero (2.5 -> 3)."""
    if mode == "half_even":
        return torch.round(x)
    if mode == "half_away":
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    raise ValueError(f"rounding must be 'half_even' or 'half_away', got {mode!r}")


def check_tensor(x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    """Refuse integer and non-finite inputs with a message that says where the problem is."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} has dtype {x.dtype}: quantization maps real values to codes, so pass a float "
            f"tensor (for example x.float())"
        )
    bad = ~torch.isfinite(x)
    if bad.any():
        where = bad.nonzero()[:3].tolist()
        raise ValueError(
            f"{what} has {int(bad.sum())} NaN/inf values (first at indices {where}); "
            "their range is undefined, so find where they come from before quantizing"
        )
    return x


def check_axis(x: torch.Tensor, spec: AffineSpec) -> None:
    """A per-channel spec's axis must exist in x."""
    if spec.granularity == "channel" and not -x.dim() <= spec.axis < x.dim():
        raise ValueError(
            f"axis {spec.axis} is out of range for a tensor of shape {tuple(x.shape)}; "
            f"per-channel scales need an axis from {-x.dim()} to {x.dim() - 1}"
        )


def group_lengths(size: int, spec: AffineSpec) -> list[int]:
    """Lengths of the groups along the last axis: all group_size, the last shorter if ragged."""
    g = spec.group_size
    if size % g and not spec.ragged:
        raise ValueError(
            f"group_size {g} does not divide the last dimension {size}. Choose a divisor of {size} "
            f"(e.g. {', '.join(str(d) for d in (32, 64, 128) if size % d == 0) or 'another size'}), "
            "or pass ragged=True to allow a shorter last group."
        )
    return [g] * (size // g) + ([size % g] if size % g else [])


def block_reduce(x: torch.Tensor, spec: AffineSpec, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a row reduction to every block of elements that shares one (scale, zero point).

    reduce: [n_blocks, block_size] -> [n_blocks]. Returns tensor -> [], channel ->
    [x.shape[axis]], group -> [*x.shape[:-1], n_groups].
    """
    check_axis(x, spec)
    if spec.granularity == "tensor":
        return reduce(x.reshape(1, -1)).reshape(())
    if spec.granularity == "channel":
        return reduce(x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1))
    parts = torch.split(x, group_lengths(x.shape[-1], spec), dim=-1)
    return torch.stack([reduce(p.reshape(-1, p.shape[-1])).reshape(p.shape[:-1]) for p in parts], dim=-1)


def block_min_max(x: torch.Tensor, spec: AffineSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of each block (shapes of `block_reduce`)."""
    return (
        block_reduce(x, spec, lambda rows: rows.min(dim=1).values),
        block_reduce(x, spec, lambda rows: rows.max(dim=1).values),
    )


def expand_to(params: torch.Tensor, x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Broadcast per-block parameters (shapes of `block_min_max`) back to x's shape."""
    if spec.granularity == "tensor":
        return params.expand_as(x)
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        return params.reshape(shape).expand_as(x)
    lengths = group_lengths(x.shape[-1], spec)
    if len(set(lengths)) == 1:  # an int repeat is much faster than a tensor of repeats
        return params.repeat_interleave(lengths[0], dim=-1)
    return params.repeat_interleave(torch.tensor(lengths, device=params.device), dim=-1)


def scale_zero_point(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool, zero_point: ZeroPoint = "integer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for blocks with the given min and max (any matching shapes).

    Returns (scale float32, zero float32; integers unless zero_point="float"). A block whose
    range is empty gets s = 1: it is represented exactly and nothing is divided by zero.
    """
    qmin, qmax = quant_range(bits, signed=symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        scale = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        zero = torch.zeros_like(scale)
    else:
        if zero_point == "integer":
            xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)  # the grid must contain 0
        scale = (xmax - xmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = -xmin / scale
        if zero_point == "integer":
            zero = torch.clamp(torch.round(zero), qmin, qmax)
    return scale, zero


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    signed: bool,
    rounding: Rounding = "half_even",
    zero_point: ZeroPoint = "integer",
) -> torch.Tensor:
    """Codes q = clamp(round(x / s) + z, q_min, q_max); scale and zero broadcast against x.

    With an integer zero point, adding z after rounding is the textbook (and GPTQ) order. A
    float zero point is rounded together with x / s: q = round((x - min) / s), as Q4_1 does.
    Returns int8 codes for a signed grid, uint8 for an unsigned one, shaped like x.
    """
    qmin, qmax = quant_range(bits, signed)
    t = x.float() / scale
    q = round_half(t, rounding) + zero if zero_point == "integer" else round_half(t + zero, rounding)
    return torch.clamp(q, qmin, qmax).to(torch.int8 if signed else torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x_hat = s * (q - z), float32; scale and zero broadcast against q."""
    return scale * (q.float() - zero)


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes plus the constants needed to reconstruct them.

    codes: int8/uint8 shaped like the original; scale, zero: float32 per block (shapes of
    `block_min_max`).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: AffineSpec

    def dequantize(self) -> torch.Tensor:
        """The reconstructed float32 tensor, shaped like the original."""
        s = expand_to(self.scale, self.codes, self.spec)
        z = expand_to(self.zero, self.codes, self.spec)
        return dequantize(self.codes, s, z)

    def storage_bits(self, scale_bits: int = 16) -> int:
        """Bits to store it: b per code, plus an fp16 scale per block and, for an asymmetric
        grid, a b-bit integer zero point (GPTQ/AWQ checkpoints) or an fp16 minimum (Q4_1)."""
        zero_bits = 0 if self.spec.symmetric else (self.spec.bits if self.spec.zero_point == "integer" else 16)
        return self.codes.numel() * self.spec.bits + self.scale.numel() * (scale_bits + zero_bits)


def quantize_tensor(
    x: torch.Tensor,
    spec: AffineSpec,
    xmin: torch.Tensor | None = None,
    xmax: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize x with one (scale, zero point) per block, as `spec` says.

    The range of each block is its min and max unless `xmin`/`xmax` are given (shapes of
    `block_min_max`), e.g. a clipped range from calibration; values outside it saturate.
    """
    check_tensor(x)
    if (xmin is None) != (xmax is None):
        raise ValueError("give both xmin and xmax, or neither (then the block min and max are used)")
    if xmin is None:
        xmin, xmax = block_min_max(x.float(), spec)
    scale, zero = scale_zero_point(xmin, xmax, spec.bits, spec.symmetric, spec.zero_point)
    s, z = expand_to(scale, x, spec), expand_to(zero, x, spec)
    codes = quantize(x, s, z, spec.bits, spec.symmetric, spec.rounding, spec.zero_point)
    return QuantizedTensor(codes, scale, zero, spec)


def fake_quantize(x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Quantize then dequantize: the float tensor the quantized model computes with."""
    return quantize_tensor(x, spec).dequantize().to(x.dtype)
