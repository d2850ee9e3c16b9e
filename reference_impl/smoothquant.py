"""SmoothQuant: move the difficulty of quantizing activations into the weights, then run W8A8.

Lesson 02 showed why int8 activations are hard: a few input channels of a layer carry values
tens or hundreds of times larger than the rest, the same channels token after token, and one
such value sets the whole token's int8 step. Weights have no such channels. SmoothQuant (Xiao
et al., 2023) rescales every input channel j of a linear layer by a factor s_j:

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T          X: [tokens, K], W: [N, K]

which changes nothing in exact arithmetic, but divides column j of the activations by s_j and
multiplies column j of the weight by s_j. With

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (clamped to >= 1e-5)

the smoothed maxima become max|X_j|^(1-alpha) max|W_j|^(1-alpha) for the activations and
max|X_j|^alpha max|W_j|^alpha for the weights: alpha = 0.5 gives both the same range per
channel, alpha -> 1 flattens the activations (every channel's max becomes 1) and piles the
outliers into the weights, alpha = 0 does the opposite. max|X_j| comes from calibration text
(`activation_absmax`, a running max folded in batch by batch by `accumulate_absmax`); max|W_j|
is taken over every linear layer that reads the same input (`column_absmax`: q, k and v share
one s, so do gate and up), because one factor must serve them all.

Nothing is left to run at inference: 1/s is folded into the op that produces X. In a Llama
block that is the RMSNorm before q, k, v and the one before gate, up (y = g * x / rms(x), so
g_j <- g_j / s_j divides channel j of its output). o_proj and down_proj have no such op in front
of them in the paper's recipe and stay unsmoothed. The extension this module adds, for SmolLM2's
down_proj inputs (|x| near 3000 in layer 11 and 2400 in layer 28 on the calibration text, a few
hundred in others; smoothquant.md lists them): the MLP computes down(SiLU(gate(x)) * up(x)),
which is linear in up(x), so dividing row j of up_proj's weight (and bias) by s_j divides
channel j of down_proj's input by s_j exactly; down_proj's column j takes the s_j.
(`smoothed_weights` computes the folded parameters from the old ones; `fold_factors` writes
them into the model's modules.)

Then every linear layer becomes W8A8 (`SmoothQuantLinear`): int8 weights with one absmax
scale per output channel, and int8 activations with either one scale per token, computed at
every call ("dynamic", the lesson's main setting), or one scale per tensor fixed from the
calibration maximum ("static", what the cheapest int8 paths want, and the paper's O3 setting).
The int8 x int8 product is real integer arithmetic: the W8A8 Triton kernel on a GPU, torch's
integer matmul on CPU (`llm_int8.int8_matmul`), both exact, so the module's output equals
fake quantization (`fake_quant_w8a8`: quantize, dequantize, float matmul) to float rounding.

Follows mit-han-lab/smoothquant (smooth.py, fake_quant.py, calibration.py), with the Llama
RMSNorm variant of its smoothing; the int8 codes are bitsandbytes' (round(x * 127 / absmax)),
as everywhere in the course, where fake_quant.py computes round(x / (absmax / 127)): the two can
differ by one code on rare ties.
"""

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from quantcourse.surgery import decoder_layers, linear_layers, replace_linears

from .affine import check_tensor
from .llm_int8 import (
    QMAX,
    W8A8Linear,
    check_matrix,
    int8_matmul,
    int8_mm_dequant,
    int8_tensorwise_quant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)

SCALE_MIN = 1e-5  # smooth.py clamps max|W_j| and s_j from below by this
ALPHA_LLAMA = 0.85  # the migration strength smoothquant's repository uses for Llama-family models
ALPHA_PAPER = 0.5  # the paper's default (OPT, BLOOM)
ActGranularity = Literal["token", "tensor"]


# ---------------------------------------------------------------------------------------------
# Calibration: max |X_j| per input channel


def shared_inputs(model) -> dict[str, str]:
    """Every decoder linear layer -> the layer whose input it shares (itself if none).

    In a Llama block k_proj and v_proj read q_proj's input (the attention RMSNorm's output) and
    up_proj reads gate_proj's (the MLP RMSNorm's output); o_proj and down_proj read their own.
    """
    sources = {}
    for name in linear_layers(model):
        block, _, kind = name.rpartition(".")
        sources[name] = {"k_proj": f"{block}.q_proj", "v_proj": f"{block}.q_proj", "up_proj": f"{block}.gate_proj"}.get(kind, name)
    return sources


def accumulate_absmax(absmax: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fold a batch of activations into the running max |X_j| of every input channel j.

    absmax: [K] float, the maxima so far (zeros to start: |x| >= 0). x: [..., K] float, one token
    per row ([K], [tokens, K] or [batch, length, K]). Returns a new [K] float32 tensor,
    max(absmax_j, max over the tokens of x of |x_j|); absmax is not modified. A batch without
    tokens leaves the maxima as they were.
    """
    if not isinstance(absmax, torch.Tensor) or not absmax.is_floating_point() or absmax.dim() != 1:
        raise TypeError(
            f"absmax must be a float vector [K] of the maxima so far (torch.zeros(K) to start), got "
            f"{getattr(absmax, 'dtype', type(absmax).__name__)} of shape {tuple(getattr(absmax, 'shape', ()))}"
        )
    check_tensor(x, "x")
    if x.dim() == 0 or x.shape[-1] != absmax.shape[0]:
        raise ValueError(
            f"x must be [..., K] with K = {absmax.shape[0]} channels (one token per row), got shape {tuple(x.shape)}"
        )
    tokens = x.detach().reshape(-1, x.shape[-1])
    if tokens.shape[0] == 0:
        return absmax.float().clone()
    return torch.maximum(absmax.float(), tokens.abs().amax(dim=0).float())


@torch.no_grad()
def activation_absmax(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """max |X_j| over the calibration tokens, for every input channel of every decoder linear layer.

    windows: [n, L] int64 token ids of calibration text, run through the (float) model one window
    at a time; forward pre-hooks fold each input into its layer's maxima on the fly
    (`accumulate_absmax`), once per distinct input: layers that share an input share the same
    tensor. Returns name -> [in_features] float32, in forward order.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise TypeError(
            f"windows must be an int64 tensor [n, L] of token ids, got {getattr(windows, 'dtype', type(windows))} "
            f"of shape {tuple(getattr(windows, 'shape', ()))}; use corpus.token_windows(tokenizer, 'calibration', 512, n)"
        )
    sources = shared_inputs(model)
    layers = linear_layers(model)
    absmax = {
        source: torch.zeros(layers[source].in_features, device=layers[source].weight.device)
        for source in dict.fromkeys(sources.values())
    }

    def hook_for(source):
        def hook(module, args):
            absmax[source] = accumulate_absmax(absmax[source], args[0])

        return hook

    handles = [layers[source].register_forward_pre_hook(hook_for(source)) for source in absmax]
    try:
        for window in windows:
            model(window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: absmax[source] for name, source in sources.items()}


# ---------------------------------------------------------------------------------------------
# Smoothing factors


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(
            f"alpha must be a number from 0 to 1 (the share of the activations' range moved into the "
            f"weights), got {alpha!r}; the paper uses 0.5, Llama-family models 0.8 to 0.85"
        )
    return float(alpha)


def column_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |W[:, j]| over the rows of every weight in `weights`, clamped to >= 1e-5.

    weights: the [N_i, K] weights of the layers that read one input (in SmolLM2, q, k, v:
    [576, 576], [192, 576], [192, 576]). Returns [K] float32. The clamp keeps a column that is
    zero in every layer from dividing by zero in `smoothing_factors`.
    """
    if (
        isinstance(weights, torch.Tensor)
        or not weights
        or not all(isinstance(W, torch.Tensor) and W.is_floating_point() and W.dim() == 2 for W in weights)
    ):
        raise TypeError(
            "weights must be a non-empty list of float weight matrices [N, K] reading the same input; [W] for one layer"
        )
    widths = sorted({W.shape[1] for W in weights})
    if len(widths) != 1:
        raise ValueError(f"the layers of one smoothing group must read the same input, got in_features {widths}")
    columns = torch.stack([W.detach().abs().amax(dim=0).float() for W in weights])  # [layers, K]
    return columns.amax(dim=0).clamp(min=SCALE_MIN)


def weight_absmax(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """`column_absmax` of the weights of `linears`, the layers that read one input. Returns [K] float32."""
    if not linears or not all(isinstance(fc, nn.Linear) for fc in linears):
        raise TypeError("linears must be a non-empty list of nn.Linear reading the same input")
    return column_absmax([fc.weight for fc in linears])


def smoothing_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), clamped to >= 1e-5.

    act_absmax, w_absmax: [K] float, non-negative (w_absmax from `weight_absmax`, already
    clamped). Returns [K] float32. A channel the calibration never saw active (max|X_j| = 0)
    gets the floor 1e-5 for alpha > 0.
    """
    alpha = check_alpha(alpha)
    if act_absmax.shape != w_absmax.shape or act_absmax.dim() != 1:
        raise ValueError(
            f"act_absmax and w_absmax must be vectors over the same input channels, got shapes "
            f"{tuple(act_absmax.shape)} and {tuple(w_absmax.shape)}"
        )
    if (act_absmax < 0).any() or (w_absmax < 0).any() or not torch.isfinite(act_absmax).all():
        raise ValueError("act_absmax and w_absmax are maxima of |x|: they must be finite and >= 0")
    s = act_absmax.float().pow(alpha) / w_absmax.float().pow(1 - alpha)
    return s.clamp(min=SCALE_MIN)


# ---------------------------------------------------------------------------------------------
# Folding the factors into the model


def smoothed_weights(
    previous_weight: torch.Tensor, previous_bias: torch.Tensor | None, weights: Sequence[torch.Tensor], s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """The parameters with s folded in: output channel j of the op before divided by s_j, input
    column j of every layer after multiplied by s_j.

    previous_weight: a norm's gain g [K] (y_j = g_j * xhat_j + b_j, so g_j / s_j) or the weight
    [K, in] of a Linear that produces the input (row j / s_j). previous_bias: its bias [K]
    (b_j / s_j) or None. weights: the [N_i, K] weights of the layers reading the input
    (W[:, j] * s_j). s: [K] positive. Returns (previous_weight, previous_bias, weights) as new
    tensors, each in its input's dtype (s is cast to that dtype first); the inputs are unchanged.
    """
    if not isinstance(s, torch.Tensor) or not s.is_floating_point() or s.dim() != 1:
        raise TypeError(f"s must be a float vector [K] of smoothing factors, got {getattr(s, 'dtype', type(s).__name__)}")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("the smoothing factors s must be finite and > 0: the op before divides by them")
    K = s.shape[0]
    if previous_weight.dim() not in (1, 2) or previous_weight.shape[0] != K:
        raise ValueError(
            f"the previous op has {previous_weight.shape[0] if previous_weight.dim() else 0} outputs, but s has {K} channels "
            f"(previous_weight must be a norm's gain [K] or a Linear weight [K, in], got {tuple(previous_weight.shape)})"
        )
    if previous_bias is not None and previous_bias.shape != (K,):
        raise ValueError(f"previous_bias must be [K] = [{K}] or None, got shape {tuple(previous_bias.shape)}")
    for W in weights:
        if W.dim() != 2 or W.shape[1] != K:
            raise ValueError(f"a linear layer reads {W.shape[-1] if W.dim() else 0} channels, but s has {K}")
    divisor = s.to(previous_weight.dtype)
    previous_weight = previous_weight / (divisor[:, None] if previous_weight.dim() == 2 else divisor)
    if previous_bias is not None:
        previous_bias = previous_bias / s.to(previous_bias.dtype)
    return previous_weight, previous_bias, [W * s.to(W.dtype)[None, :] for W in weights]


@torch.no_grad()
def fold_factors(previous: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Divide the output channels of `previous` by s and multiply the input columns of `linears` by s.

    previous: an RMSNorm or LayerNorm (weight [K], bias [K] if any) or an nn.Linear producing
    the input (weight [K, in]); linears: the layers reading it. The arithmetic is
    `smoothed_weights`'; in exact arithmetic the layers' outputs do not change. In place.
    """
    weight = getattr(previous, "weight", None)
    if not isinstance(previous, nn.Linear) and not (isinstance(weight, torch.Tensor) and weight.dim() == 1):
        raise TypeError(
            f"cannot fold factors into {type(previous).__name__}: expected a norm with a weight of "
            f"shape ({s.numel()},) or an nn.Linear with {s.numel()} outputs"
        )
    bias = getattr(previous, "bias", None)
    new_weight, new_bias, new_weights = smoothed_weights(weight, bias, [fc.weight for fc in linears], s)
    weight.copy_(new_weight)
    if bias is not None:
        bias.copy_(new_bias)
    for fc, W in zip(linears, new_weights):
        fc.weight.copy_(W)


@dataclass(frozen=True)
class SmoothingGroup:
    """One place a factor vector can hide: the op producing an input, and the layers reading it."""

    previous: str  # e.g. "model.layers.0.input_layernorm"
    linears: tuple[str, ...]  # e.g. ("model.layers.0.self_attn.q_proj", "...k_proj", "...v_proj")


def smoothing_groups(model, smooth_down: bool = False) -> list[SmoothingGroup]:
    """The smoothing groups of a Llama decoder, layer by layer.

    Per layer: input_layernorm -> q, k, v and post_attention_layernorm -> gate, up (the paper's
    recipe); with smooth_down also up_proj -> down_proj (this course's extension).
    """
    groups = []
    for i, _ in enumerate(decoder_layers(model)):
        layer = f"model.layers.{i}"
        groups.append(SmoothingGroup(f"{layer}.input_layernorm", tuple(f"{layer}.self_attn.{p}_proj" for p in "qkv")))
        groups.append(SmoothingGroup(f"{layer}.post_attention_layernorm", (f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj")))
        if smooth_down:
            groups.append(SmoothingGroup(f"{layer}.mlp.up_proj", (f"{layer}.mlp.down_proj",)))
    return groups


@torch.no_grad()
def smooth_model(
    model, act_absmax: dict[str, torch.Tensor], alpha: float = ALPHA_LLAMA, smooth_down: bool = False
) -> dict[str, torch.Tensor]:
    """Smooth every group of `smoothing_groups(model, smooth_down)` in place.

    act_absmax: name -> [in_features] float32 from `activation_absmax` on the *unsmoothed* model
    (smoothing a group leaves every other layer's input unchanged, so the statistics stay valid
    while the groups are folded one after another). Returns name -> s [in_features] float32 for
    each smoothed layer: its input is now X / s.
    """
    check_alpha(alpha)
    factors = {}
    for group in smoothing_groups(model, smooth_down):
        linears = [model.get_submodule(name) for name in group.linears]
        missing = [name for name in group.linears if name not in act_absmax]
        if missing:
            raise KeyError(f"no activation statistics for {missing[0]}: compute them with activation_absmax(model, windows)")
        s = smoothing_factors(act_absmax[group.linears[0]], weight_absmax(linears), alpha)
        fold_factors(model.get_submodule(group.previous), linears, s)
        factors.update(dict.fromkeys(group.linears, s))
    return factors


def smoothed_absmax(act_absmax: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """max |X_j / s_j| = max|X_j| / s_j: the calibration maxima of the smoothed model's inputs.

    Exact (s_j > 0), so the smoothed model needs no second calibration pass.
    """
    return {name: a / factors[name] if name in factors else a for name, a in act_absmax.items()}


# ---------------------------------------------------------------------------------------------
# W8A8 with real int8 arithmetic


def int8_static_quant(X: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize X [M, K] with one fixed scale absmax / 127 (a calibration maximum).

    Values beyond the calibrated range saturate at +-127. absmax: 0-dim float32, > 0.
    Returns codes [M, K] int8 and absmax expanded to [M] float32, the per-row statistics
    `int8_mm_dequant` and the Triton kernel take.
    """
    check_matrix(X, "X")
    factor = QMAX / absmax.float()
    codes = torch.round(X.float() * factor).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, absmax.float().expand(X.shape[0]).contiguous()


def int8_linear(
    X_codes: torch.Tensor,
    X_absmax: torch.Tensor,
    W_codes: torch.Tensor,
    W_absmax: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    use_triton: bool,
) -> torch.Tensor:
    """Y = (X_codes @ W_codes^T) * X_absmax_i * W_absmax_j / 127^2 (+ bias): an int32 product, one rescale.

    X_codes [M, K], W_codes [N, K] int8; X_absmax [M], W_absmax [N] float32; returns [M, N]
    out_dtype. use_triton: the W8A8 kernel (kernels/w8a8.py, rescale fused into the GEMM; on
    CPU only under TRITON_INTERPRET=1); otherwise torch's exact integer matmul, then the rescale.
    """
    if use_triton:
        from quantcourse.kernels.w8a8 import w8a8_matmul  # imports triton: only where it runs

        return w8a8_matmul(X_codes.contiguous(), X_absmax.contiguous(), W_codes, W_absmax, bias, out_dtype=out_dtype)
    return int8_mm_dequant(int8_matmul(X_codes, W_codes), X_absmax, W_absmax, bias, out_dtype)


class SmoothQuantLinear(W8A8Linear):
    """The W8A8 Linear that SmoothQuant deploys; before smoothing, it is the naive W8A8 baseline.

    Weights: int8, one absmax scale per output row (weight_codes [N, K] int8, weight_absmax
    [N] float32). Activations, at every call:
    - "token": one absmax scale per token, computed from the input (dynamic);
    - "tensor" with input_absmax: one fixed scale input_absmax / 127 from calibration (static);
      values beyond it saturate;
    - "tensor" without input_absmax: one scale from the whole input (dynamic, as W8A8Linear).
    Then an exact int8 x int8 -> int32 product and one rescale: the W8A8 Triton kernel when the
    input is on a GPU, torch's integer matmul on CPU.
    """

    def __init__(self, linear: nn.Linear, act_granularity: ActGranularity, input_absmax: float | None = None):
        super().__init__(linear, act_granularity)
        if input_absmax is not None:
            if act_granularity != "tensor":
                raise ValueError("a static input_absmax is one scale per tensor: pass act_granularity='tensor'")
            if not float(input_absmax) > 0:
                raise ValueError(f"input_absmax must be a positive calibration maximum of |x|, got {input_absmax!r}")
            input_absmax = torch.tensor(float(input_absmax))
        self.register_buffer("input_absmax", input_absmax)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, act_granularity: ActGranularity = "token", input_absmax: float | None = None
    ) -> "SmoothQuantLinear":
        return cls(linear, act_granularity, input_absmax)

    @property
    def static(self) -> bool:
        return self.input_absmax is not None

    def quantize_input(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """X [M, K] float -> codes [M, K] int8 and their scales' absmax [M] float32."""
        if self.static:
            return int8_static_quant(X, self.input_absmax)
        if self.act_granularity == "tensor":
            return int8_tensorwise_quant(X)
        if X.is_cuda:
            from quantcourse.kernels.w8a8 import quantize_per_token

            return quantize_per_token(X.contiguous())
        codes, absmax, _ = int8_vectorwise_quant(X)
        return codes, absmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        X_codes, X_absmax = self.quantize_input(self.flatten_input(x))
        Y = int8_linear(X_codes, X_absmax, self.weight_codes, self.weight_absmax, self.bias, x.dtype, x.is_cuda)
        return Y.reshape(*x.shape[:-1], self.out_features)

    def storage_bits(self) -> int:
        """W8A8Linear's, plus the static activation scale (float32) when there is one."""
        return super().storage_bits() + (32 if self.static else 0)

    def extra_repr(self) -> str:
        mode = "static" if self.static else "dynamic"
        return f"{super().extra_repr()} ({mode})"


def fake_quant_w8a8(
    x: torch.Tensor, weight: torch.Tensor, act_granularity: ActGranularity = "token", input_absmax: float | None = None
) -> torch.Tensor:
    """What SmoothQuantLinear computes, by fake quantization: quantize, dequantize, matmul in float64.

    x: [M, K] float; weight: [N, K] float. The same codes as the int8 module, dequantized in
    float32 and multiplied in float64: it differs from the int8 path only by the float32
    rounding of the scales (~1e-7 relative), so any error in the integer accumulation shows.
    Returns [M, N] float64 (no bias).
    """
    if act_granularity not in ("token", "tensor"):
        raise ValueError(f"act_granularity must be 'token' or 'tensor', got {act_granularity!r}")
    if input_absmax is not None:
        if act_granularity != "tensor":
            raise ValueError("a static input_absmax is one scale per tensor: pass act_granularity='tensor'")
        if not float(input_absmax) > 0:
            raise ValueError(f"input_absmax must be a positive calibration maximum of |x|, got {input_absmax!r}")
    check_matrix(x, "x")
    check_matrix(weight, "weight")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x is {tuple(x.shape)} [M, K] but weight is {tuple(weight.shape)} [N, K]: K must agree")
    W_codes, W_absmax, _ = int8_vectorwise_quant(weight)
    if input_absmax is not None:
        X_codes, X_absmax = int8_static_quant(x, torch.tensor(float(input_absmax)))
    elif act_granularity == "tensor":
        X_codes, X_absmax = int8_tensorwise_quant(x)
    else:
        X_codes, X_absmax, _ = int8_vectorwise_quant(x)
    X_hat = int8_vectorwise_dequant(X_codes, X_absmax).double()
    W_hat = int8_vectorwise_dequant(W_codes, W_absmax).double()
    return X_hat @ W_hat.t()


def quantize_w8a8(
    model,
    act_granularity: ActGranularity = "token",
    input_absmax: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, SmoothQuantLinear]:
    """Replace every decoder linear layer by a SmoothQuantLinear, in place.

    act_granularity "token": dynamic per-token activations. "tensor" needs input_absmax (name ->
    [in_features] calibration maxima of the layer's input, as the model is *now*: after
    smoothing, `smoothed_absmax`): each layer's static scale is its largest entry / 127.
    """
    if act_granularity not in ("token", "tensor"):
        raise ValueError(f"act_granularity must be 'token' or 'tensor', got {act_granularity!r}")
    if act_granularity == "tensor" and input_absmax is None:
        raise ValueError(
            "static per-tensor activations need the calibration maxima: pass input_absmax "
            "(smoothed_absmax(activation_absmax(model, windows), factors))"
        )

    def make(name: str, linear: nn.Linear) -> SmoothQuantLinear:
        static = None if act_granularity == "token" else input_absmax[name].max().item()
        return SmoothQuantLinear.from_linear(linear, act_granularity, static)

    return replace_linears(model, make, progress=progress)


# ---------------------------------------------------------------------------------------------
# The whole recipe, and the alpha sweep


@dataclass(frozen=True)
class SmoothQuantOptions:
    """alpha: migration strength, 0..1, or None for no smoothing at all (naive W8A8 with the same
    calibration and quantizers). act_granularity: "token" (dynamic) or "tensor" (static).
    smooth_down: also smooth up_proj -> down_proj (the extension)."""

    alpha: float | None = ALPHA_LLAMA
    act_granularity: ActGranularity = "token"
    smooth_down: bool = False

    def __post_init__(self):
        if self.alpha is not None:
            check_alpha(self.alpha)
        if self.act_granularity not in ("token", "tensor"):
            raise ValueError(f"act_granularity must be 'token' or 'tensor', got {self.act_granularity!r}")
        if self.smooth_down and self.alpha is None:
            raise ValueError("smooth_down smooths with the factors of alpha: give an alpha, or drop smooth_down")


def apply_smoothquant(
    model, act_absmax: dict[str, torch.Tensor], options: SmoothQuantOptions = SmoothQuantOptions(), progress: bool = False
) -> dict[str, torch.Tensor]:
    """Smooth (unless options.alpha is None), then quantize every decoder linear layer to W8A8.

    act_absmax: `activation_absmax` of the unsmoothed model. In place; returns the factors.
    """
    factors = {} if options.alpha is None else smooth_model(model, act_absmax, options.alpha, options.smooth_down)
    static = smoothed_absmax(act_absmax, factors) if options.act_granularity == "tensor" else None
    quantize_w8a8(model, options.act_granularity, static, progress)
    return factors


def smoothquant_model(
    model, windows: torch.Tensor, options: SmoothQuantOptions = SmoothQuantOptions(), progress: bool = False
) -> dict[str, torch.Tensor]:
    """SmoothQuant end to end: calibrate on windows [n, L] int64, smooth, quantize. In place."""
    return apply_smoothquant(model, activation_absmax(model, windows), options, progress)


def alpha_sweep(
    model,
    act_absmax: dict[str, torch.Tensor],
    alphas: Iterable[float],
    score: Callable[[nn.Module], float],
    act_granularity: ActGranularity = "token",
    smooth_down: bool = False,
) -> list[tuple[float, float]]:
    """score(model smoothed with alpha and quantized) for each alpha; `model` is left as it is.

    Each alpha works on a fresh copy of the float model with the same calibration statistics
    (they do not depend on alpha). score: e.g. perplexity on some windows. Returns
    [(alpha, score)] in the order of `alphas`.
    """
    results = []
    for alpha in alphas:
        candidate = copy.deepcopy(model)
        apply_smoothquant(candidate, act_absmax, SmoothQuantOptions(alpha, act_granularity, smooth_down))
        results.append((alpha, score(candidate)))
        del candidate
    return results
