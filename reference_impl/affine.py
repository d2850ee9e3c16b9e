"""Affine (uniform) quantization: the map every later lesson builds on.

A real value x is stored as an integer code q on a grid of 2^b levels:

    q = clamp(round(x / s) + z, q_min, q_max)        x_hat = s * (q - z)

- scale s: the step between neighbouring levels, s = (range covered) / (number of steps).
- zero point z: the code that stands for the real value 0 (exactly representable).

Symmetric: signed grid [-2^(b-1), 2^(b-1) - 1], z = 0, s = max|x| / (2^(b-1) - 1); the most
negative code is unused by the rounding, which keeps the grid symmetric around 0.
Asymmetric: unsigned grid [0, 2^b - 1], the range [min(x, 0), max(x, 0)] is widened to contain 0,
s = (max - min) / (2^b - 1), z = round(-min / s).

Granularity says which elements share one (s, z): the whole tensor, each channel (a slice along
one axis, e.g. each output row of a Linear weight [out, in]), or each group of `group_size`
consecutive elements along the last axis (the input dimension of a Linear weight).
"""

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]
Rounding = Literal["half_even", "half_away"]
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class AffineSpec:
    """How to quantize a tensor.

    bits: 2..8. symmetric: signed grid and z = 0, else unsigned grid with a zero point.
    granularity: "tensor", "channel" (one scale per index along `axis`) or "group"
    (`group_size` consecutive elements of the last axis). rounding: "half_even" (torch.round,
    GPTQ) or "half_away" (C's roundf, llama.cpp's Q8_0). ragged: allow a last group shorter than
    group_size when it does not divide the last axis.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None
    axis: int = 0
    rounding: Rounding = "half_even"
    ragged: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {self.granularity!r}")
        if self.rounding not in ("half_even", "half_away"):
            raise ValueError(f"rounding must be 'half_even' or 'half_away', got {self.rounding!r}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError(f"granularity 'group' needs a positive group_size, got {self.group_size!r}")

    @property
    def qmin(self) -> int:
        return quant_range(self.bits, signed=self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return quant_range(self.bits, signed=self.symmetric)[1]

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
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


def block_min_max(x: torch.Tensor, spec: AffineSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of each block of elements that shares one (scale, zero point).

    Shapes: tensor -> [], channel -> [x.shape[axis]], group -> [*x.shape[:-1], n_groups].
    """
    if spec.granularity == "tensor":
        return x.min(), x.max()
    if spec.granularity == "channel":
        rows = x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
        return rows.min(dim=1).values, rows.max(dim=1).values
    parts = torch.split(x, group_lengths(x.shape[-1], spec), dim=-1)
    return (
        torch.stack([p.min(dim=-1).values for p in parts], dim=-1),
        torch.stack([p.max(dim=-1).values for p in parts], dim=-1),
    )


def expand_to(params: torch.Tensor, x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Broadcast per-block parameters (shapes of `block_min_max`) back to x's shape."""
    if spec.granularity == "tensor":
        return params.expand_as(x)
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        return params.reshape(shape).expand_as(x)
    lengths = torch.tensor(group_lengths(x.shape[-1], spec), device=params.device)
    return params.repeat_interleave(lengths, dim=-1)


def scale_zero_point(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for blocks with the given min and max (any matching shapes).

    Returns (scale float32, zero float32 holding integers). A block of zeros gets s = 1, z as
    usual: any scale represents it exactly, and no division by zero happens.
    """
    qmin, qmax = quant_range(bits, signed=symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        scale = torch.maximum(xmin.abs(), xmax.abs()) / qmax
        zero = torch.zeros_like(scale)
    else:
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)  # the grid must contain 0
        scale = (xmax - xmin) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.clamp(torch.round(-xmin / scale), qmin, qmax)
    return scale, zero


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    signed: bool,
    rounding: Rounding = "half_even",
) -> torch.Tensor:
    """Codes q = clamp(round(x / s) + z, q_min, q_max); scale and zero broadcast against x.

    Returns int8 codes for a signed grid, uint8 for an unsigned one, shaped like x.
    """
    qmin, qmax = quant_range(bits, signed)
    q = torch.clamp(round_half(x.float() / scale, rounding) + zero, qmin, qmax)
    return q.to(torch.int8 if signed else torch.uint8)


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
        grid, a b-bit zero point per block (the layout of GPTQ/AWQ checkpoints)."""
        zero_bits = 0 if self.spec.symmetric else self.spec.bits
        return self.codes.numel() * self.spec.bits + self.scale.numel() * (scale_bits + zero_bits)


def quantize_tensor(x: torch.Tensor, spec: AffineSpec) -> QuantizedTensor:
    """Quantize x with min-max ranges per block, as `spec` says."""
    check_tensor(x)
    if spec.granularity == "channel" and not -x.dim() <= spec.axis < x.dim():
        raise ValueError(f"axis {spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    xmin, xmax = block_min_max(x.float(), spec)
    scale, zero = scale_zero_point(xmin, xmax, spec.bits, spec.symmetric)
    codes = quantize(x, expand_to(scale, x, spec), expand_to(zero, x, spec), spec.bits, spec.symmetric, spec.rounding)
    return QuantizedTensor(codes, scale, zero, spec)


def fake_quantize(x: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Quantize then dequantize: the float tensor the quantized model computes with."""
    return quantize_tensor(x, spec).dequantize().to(x.dtype)
