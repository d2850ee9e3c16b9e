"""SmoothQuant seen from the outside: the measurements lesson 06 makes with smoothquant.py.

smoothquant.py holds the method (calibration maxima, the factors, folding them into the model,
the W8A8 Linear). This module holds what the lesson measures about it, on one group of linear
layers that read the same input X [M, K] (q, k, v; or gate, up; or down alone):

- Where the error of W8A8 comes from. `w8a8_error` quantizes the activations, the weights, or
  both (the same codes as `SmoothQuantLinear`, dequantized: fake quantization) and returns the
  relative error of the product against X W^T for a typical token (`output_error`: the median
  over tokens of each output row's relative error). Quantizing one operand at a time splits the
  difficulty between them: SmolLM2's inputs carry a few channels tens to thousands of times
  larger than the rest, its weight columns do not, so the activations' share dominates.
- What smoothing does to the channel maxima (`channel_maxima`): for factors s [K], channel j of
  the activations peaks at max|X_j| / s_j and column j of the group's weights at max|W_j| s_j.
  The weights are stacked (`group_weight`): one s serves every layer reading X, so the column
  maximum is taken over all of them, as `smoothquant.weight_absmax` does.
- The migration strength (`alpha_tradeoff`): for each alpha, the factors
  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the largest channel maximum on each side and its
  spread (largest over median), and the three errors. Raising alpha moves range from the
  activations to the weights: the activations' error falls, the weights' eventually rises, and
  W8A8 (both) is best somewhere between. (alpha = 0 is not "no smoothing": s_j = 1 / max|W_j|
  flattens the weights' columns and sharpens the activations' outliers.)
- Why one static scale per tensor struggles (`saturated_fraction`, `zero_code_fraction`): a
  calibration maximum is a promise about future inputs (values beyond it saturate at +-127), and
  one huge value makes the step so coarse that ordinary values round to code 0.

Factors are applied as X / s and W * s here, never folded: the model is left alone.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import smoothquant as sq
from .llm_int8 import check_matrix, int8_tensorwise_quant, int8_vectorwise_dequant, int8_vectorwise_quant

# ---------------------------------------------------------------------------------------------
# Fake quantization of one operand at a time


def group_weight(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """The weights of the layers that read one input, stacked along the outputs: [sum N, K] float32.

    Per-output-row quantization treats every row on its own, so quantizing the stack is
    quantizing each layer; and its column maxima are `smoothquant.weight_absmax(linears)`.
    """
    sq.weight_absmax(linears)  # refuses an empty list or layers reading different widths
    return torch.cat([fc.weight.detach().float() for fc in linears])


def check_activation_mode(act_granularity: str, input_absmax: float | None) -> None:
    if act_granularity not in ("token", "tensor"):
        raise ValueError(f"act_granularity must be 'token' or 'tensor', got {act_granularity!r}")
    if input_absmax is not None and act_granularity != "tensor":
        raise ValueError("a static input_absmax is one scale per tensor: pass act_granularity='tensor'")
    if input_absmax is not None and not float(input_absmax) > 0:
        raise ValueError(f"input_absmax must be a positive calibration maximum of |x|, got {input_absmax!r}")


def fake_quant_activations(X: torch.Tensor, act_granularity: str = "token", input_absmax: float | None = None) -> torch.Tensor:
    """X [M, K] float -> its int8 codes dequantized, [M, K] float32, as SmoothQuantLinear quantizes it.

    "token": one absmax scale per row (dynamic); "tensor": one for the whole input, from X itself
    (dynamic) or, with input_absmax, fixed (static: values beyond it saturate at +-127).
    """
    check_matrix(X, "X")
    check_activation_mode(act_granularity, input_absmax)
    if input_absmax is not None:
        codes, absmax = sq.int8_static_quant(X, torch.tensor(float(input_absmax)))
    elif act_granularity == "tensor":
        codes, absmax = int8_tensorwise_quant(X)
    else:
        codes, absmax, _ = int8_vectorwise_quant(X)
    return int8_vectorwise_dequant(codes, absmax)


def fake_quant_weight(W: torch.Tensor) -> torch.Tensor:
    """W [N, K] float -> int8 codes with one absmax scale per output row, dequantized: [N, K] float32."""
    codes, absmax, _ = int8_vectorwise_quant(check_matrix(W, "W"))
    return int8_vectorwise_dequant(codes, absmax)


def check_same_shape(reference: torch.Tensor, approx: torch.Tensor) -> None:
    if reference.shape != approx.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} and {tuple(approx.shape)}")


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference|| / ||reference|| (Frobenius, in float64)."""
    check_same_shape(reference, approx)
    reference = reference.double()
    return ((approx.double() - reference).norm() / reference.norm()).item()


def token_errors(reference: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """||approx_i - reference_i|| / ||reference_i|| for each row (token) i of [M, N]: [M] float64.

    A row whose reference is exactly zero gets 0 if approx is zero there too, else inf.
    """
    check_same_shape(reference, approx)
    if reference.dim() != 2:
        raise ValueError(f"expected outputs [tokens, features], got shape {tuple(reference.shape)}")
    reference = reference.double()
    diff = (approx.double() - reference).norm(dim=1)
    norm = reference.norm(dim=1)
    return torch.where(norm > 0, diff / norm, torch.where(diff > 0, torch.inf, 0.0))


def output_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """The median over tokens of `token_errors`: the error of a typical token (for an even
    number of tokens, torch's median: the lower of the two middle values).

    Not the Frobenius error of the whole output: SmolLM2 puts a "massive activation" of |x| in
    the thousands into a window's first token, whose output then dominates any global norm and
    hides what happens to every other token (lesson 02 measures its SQNR per token for the
    same reason).
    """
    return token_errors(reference, approx).median().item()


def w8a8_error(
    X: torch.Tensor,
    W: torch.Tensor,
    act_granularity: str = "token",
    input_absmax: float | None = None,
    activations: bool = True,
    weights: bool = True,
) -> float:
    """The typical token's relative error (`output_error`) of the product with the chosen
    operands quantized to int8, against X W^T.

    X: [M, K] float inputs; W: [N, K] float weight (a stack from `group_weight` for a group).
    activations / weights: which operands to quantize (both: W8A8, what SmoothQuantLinear
    computes, equal to `smoothquant.fake_quant_w8a8` to float rounding).
    """
    if not (activations or weights):
        raise ValueError("quantize at least one operand: activations=True, weights=True or both")
    check_matrix(W, "W")
    X_hat = fake_quant_activations(X, act_granularity, input_absmax) if activations else X
    W_hat = fake_quant_weight(W) if weights else W
    return output_error(X.double() @ W.double().t(), X_hat.double() @ W_hat.double().t())


# ---------------------------------------------------------------------------------------------
# Smoothing, seen on the channel maxima


def channel_maxima(
    act_absmax: torch.Tensor, linears: Sequence[nn.Linear], s: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input channel j: (max|X_j| / s_j, max|W_j| * s_j), both [K] float32.

    act_absmax: [K] calibration maxima of the input; linears: the layers reading it (the weight
    maximum is over all of them, clamped at 1e-5 like smooth.py); s: [K] factors, None for
    none (the maxima before smoothing).
    """
    w_absmax = sq.weight_absmax(linears)
    if act_absmax.shape != w_absmax.shape:
        raise ValueError(f"act_absmax has {act_absmax.numel()} channels, the layers read {w_absmax.numel()}")
    if s is None:
        return act_absmax.float(), w_absmax
    return act_absmax.float() / s, w_absmax * s


def spread(maxima: torch.Tensor) -> float:
    """Largest over median of per-channel maxima: how uneven the channels are (1: all equal)."""
    return (maxima.max() / maxima.median()).item()


@dataclass(frozen=True)
class AlphaPoint:
    """One migration strength on one group. Maxima are calibration maxima after smoothing; errors
    are a typical token's relative output error (`output_error`) on the given inputs X (with
    static, the activations take one fixed scale: the smoothed calibration maximum)."""

    alpha: float
    act_max: float  # max over j of max|X_j| / s_j
    act_spread: float  # its largest / median over the channels
    weight_max: float  # max over j of max|W_j| s_j, over the group's layers
    weight_spread: float
    act_error: float  # activations quantized, weights exact
    weight_error: float  # weights quantized, activations exact
    error: float  # both: W8A8


def alpha_tradeoff(
    X: torch.Tensor,
    linears: Sequence[nn.Linear],
    act_absmax: torch.Tensor,
    alphas: Iterable[float],
    act_granularity: str = "token",
    static: bool = False,
) -> list[AlphaPoint]:
    """Smooth the group with each alpha (X / s, W * s, never folded) and measure it.

    X: [M, K] inputs of the group (held-out tokens, say); linears: the layers reading them;
    act_absmax: [K] max |X_j| on calibration tokens, from which s is computed
    (`smoothquant.smoothing_factors` with `smoothquant.weight_absmax(linears)`).
    act_granularity: "token" or "tensor"; static (with "tensor"): one fixed activation scale,
    the largest smoothed calibration maximum. Returns one AlphaPoint per alpha, in order.
    """
    if static and act_granularity != "tensor":
        raise ValueError("static scales are one per tensor: pass act_granularity='tensor' with static=True")
    check_activation_mode(act_granularity, None)
    W = group_weight(linears)
    w_absmax = sq.weight_absmax(linears)
    if X.dim() != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"X must be [tokens, {W.shape[1]}] (the layers' in_features), got {tuple(X.shape)}")
    reference = X.double() @ W.double().t()  # = (X / s)(W s)^T up to float rounding: one serves every alpha
    points = []
    for alpha in alphas:
        s = sq.smoothing_factors(act_absmax, w_absmax, alpha)
        act_max, weight_max = channel_maxima(act_absmax, linears, s)
        X_s, W_s = (X.float() / s).double(), (W * s).double()
        X_hat = fake_quant_activations(X_s, act_granularity, act_max.max().item() if static else None).double()
        W_hat = fake_quant_weight(W_s).double()
        points.append(
            AlphaPoint(
                alpha=float(alpha),
                act_max=act_max.max().item(),
                act_spread=spread(act_max),
                weight_max=weight_max.max().item(),
                weight_spread=spread(weight_max),
                act_error=output_error(reference, X_hat @ W_s.t()),
                weight_error=output_error(reference, X_s @ W_hat.t()),
                error=output_error(reference, X_hat @ W_hat.t()),
            )
        )
    return points


# ---------------------------------------------------------------------------------------------
# One static scale per tensor


def saturated_fraction(X: torch.Tensor, input_absmax: float) -> float:
    """Share of the entries of X with |x| > input_absmax: clipped to +-127 by a static scale."""
    if not float(input_absmax) > 0:
        raise ValueError(f"input_absmax must be a positive calibration maximum of |x|, got {input_absmax!r}")
    return (X.abs() > float(input_absmax)).float().mean().item()


def zero_code_fraction(X: torch.Tensor, act_granularity: str = "token", input_absmax: float | None = None) -> float:
    """Share of the nonzero entries of X [M, K] that get int8 code 0 (their information is lost)."""
    X_hat = fake_quant_activations(X, act_granularity, input_absmax)
    nonzero = X != 0
    return ((X_hat == 0) & nonzero).sum().item() / max(nonzero.sum().item(), 1)
