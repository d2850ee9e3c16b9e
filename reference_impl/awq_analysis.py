"""AWQ seen from the outside: the measurements lesson 05 makes with awq.py.

awq.py holds the method (the activation statistic, the scale search, folding, clipping, the
driver and the 1%-salient-channels experiment). This module holds what the lesson measures
about it:

- The inputs of a decoder layer. awq.awq_layer calibrates one layer on the hidden states that
  enter it; `decoder_layer_inputs` returns them for chosen layers (with the keyword arguments the
  layers are called with: mask, rotary embeddings) and stops each forward pass after the deepest
  one, so the lesson can study layer 20 without running layers 21-29 and the output head.
- Why scaling a channel protects it (`scaled_rounding`). AWQ's error analysis (Lin et al., 2023):
  a weight w on a grid of step D is off by D * e(w / D), where the rounding error
  e is spread over [-1/2, 1/2]. Multiply the weight by s > 1 and divide its input by s: the
  weight's error becomes D' * e(w s / D') / s, with D' the step of the scaled group. e is spread
  the same way, so the salient weight's error shrinks by about (D' / D) / s. D' = D unless w s
  becomes the largest (or smallest) weight of its group; then D' grows, and with it the error of
  every other weight of the group. `scaled_rounding` measures both sides on a real weight: each
  group's step before and after, and every weight's error in W's units.
- The clipping search's landscape (`clip_curve`): awq.clip_objective at every shrink the search
  tries, for every row and group, so the lesson can plot the output error against the shrink and
  see which shrink each group keeps. `clip_group` shows the mechanism on one group: clamping its
  largest weights shrinks its step, which lowers the error of all the others.
- One decoder layer quantized: `quantize_layer` turns every Linear of a layer (scaled by AWQ or
  not) into the GPTQLinear awq_model would produce, and `layer_outputs` / `relative_error`
  compare the layer's outputs with the float layer's.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from quantcourse.surgery import decoder_layers, set_module

from .affine import AffineSpec, check_tensor, scale_zero_point
from .awq import (
    AWQ_SPEC,
    CLIP_GRID,
    CLIP_STEPS,
    CLIP_TOKENS,
    check_clip_inputs,
    clip_objective,
    clip_weight,
    fake_quantize_groups,
    group_size_of,
    quantized_linear,
    sample_tokens,
    scaled_fake_quant,
)
from .gptq import check_spec

# ---------------------------------------------------------------------------------------------
# The inputs of a decoder layer


class _Reached(Exception):
    """Raised by a hook once the deepest requested layer has received this window's input."""


@torch.no_grad()
def decoder_layer_inputs(model, windows: torch.Tensor, layers: Iterable[int]) -> tuple[dict[int, torch.Tensor], dict]:
    """The hidden states entering decoder layers `layers` on windows [n, L] int64.

    Returns ({i: [n, L, hidden] float32}, kwargs): kwargs are the other arguments the layers are
    called with (causal mask, rotary position embeddings), the same for every layer and window
    of length L, as awq.awq_layer expects them. Layer 0 receives the embeddings.
    """
    blocks = decoder_layers(model)
    wanted = sorted(set(layers))
    if not wanted or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks) for i in wanted):
        raise ValueError(f"layers must be decoder layer indices from 0 to {len(blocks) - 1}, got {list(layers)!r}")
    if windows.dim() != 2 or windows.dtype != torch.int64:
        raise ValueError(f"windows must be token ids [n, L] int64 (corpus.token_windows), got {windows.dtype} {tuple(windows.shape)}")
    deepest = wanted[-1]
    hidden: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    captured: dict[str, dict] = {}

    def hook_for(i):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            hidden[i].append(x.detach().float().clone())
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == deepest:
                raise _Reached

        return hook

    handles = [blocks[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in wanted]
    try:
        for window in windows:
            try:
                model(window[None], use_cache=False)
            except _Reached:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(h) for i, h in hidden.items()}, captured["kwargs"]


# ---------------------------------------------------------------------------------------------
# Why scaling helps: AWQ's error analysis, measured


def group_steps(W: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """The step (scale) of each group's min-max grid: W [N, K] -> [N, K // group] float32."""
    N, K = W.shape
    size = group_size_of(spec, K)
    blocks = W.detach().float().reshape(N, K // size, size)
    return scale_zero_point(blocks.amin(dim=-1), blocks.amax(dim=-1), spec.bits, spec.symmetric)[0]


@dataclass(frozen=True)
class ScaledRounding:
    """The result of `scaled_rounding`: what multiplying input channels `channels` of W by s
    does to the rounding.

    step_before, step_after: [N, G] float32, the step of each group's grid for W and for
    W diag(s) (in the units of the scaled weights). error_before, error_after: [N, K] float32,
    |Q(W) - W| and |Q(W diag(s)) diag(s)^-1 - W|, both in W's units. Q: [N, K] float32, the
    weight the scaled, rounded layer computes with, Q(W diag(s)) diag(s)^-1.
    """

    channels: torch.Tensor
    s: float
    group_size: int
    step_before: torch.Tensor
    step_after: torch.Tensor
    error_before: torch.Tensor
    error_after: torch.Tensor
    Q: torch.Tensor

    def touched(self) -> torch.Tensor:
        """[N, G] bool: the groups that hold a scaled channel (in every row)."""
        N, K = self.error_before.shape
        holds = torch.zeros(K // self.group_size, dtype=torch.bool)
        holds[self.channels // self.group_size] = True
        return holds.expand(N, -1)

    def summary(self) -> dict[str, float]:
        """Over the groups that hold a scaled channel: the share whose step changed, the mean step
        ratio D'/D, AWQ's prediction for the scaled weights' error ratio, mean (D'/D) / s, and the
        measured ratios (mean error after / mean error before) of the scaled weights and of the
        other weights of those groups."""
        touched = self.touched()
        ratio = (self.step_after / self.step_before)[touched]
        scaled = torch.zeros(self.error_before.shape[1], dtype=torch.bool)
        scaled[self.channels] = True
        others = touched.repeat_interleave(self.group_size, dim=1) & ~scaled
        return {
            "changed": (self.step_after != self.step_before)[touched].float().mean().item(),
            "step_ratio": ratio.mean().item(),
            "predicted": (ratio / self.s).mean().item(),
            "scaled_error": (self.error_after[:, scaled].mean() / self.error_before[:, scaled].mean()).item(),
            "other_error": (self.error_after[others].mean() / self.error_before[others].mean()).item(),
        }


@torch.no_grad()
def scaled_rounding(W: torch.Tensor, channels: torch.Tensor, s: float, spec: AffineSpec = AWQ_SPEC) -> ScaledRounding:
    """Round W [N, K] with input channels `channels` ([c] int64) multiplied by s (the others by 1),
    as AWQ does, and measure the steps and errors against plain rounding (`ScaledRounding`).

    s = 1 is round-to-nearest. The grid is min-max per group (spec), the one awq.py uses.
    """
    check_tensor(W, "W")
    if W.dim() != 2:
        raise ValueError(f"W must be a weight matrix [N, K], got shape {tuple(W.shape)}")
    K = W.shape[1]
    check_spec(spec, K)
    channels = torch.as_tensor(channels, dtype=torch.int64).reshape(-1)
    if channels.numel() == 0 or channels.min() < 0 or channels.max() >= K:
        raise ValueError(f"channels must be input channel indices from 0 to {K - 1}, got {channels.tolist()[:8]}")
    if not s > 0:
        raise ValueError(f"s is the factor applied to the channels' weights; it must be positive, got {s!r}")
    W = W.detach().float()
    factor = torch.ones(K)
    factor[channels] = s
    Q = scaled_fake_quant(W, factor, spec)
    return ScaledRounding(
        channels=channels, s=float(s), group_size=group_size_of(spec, K),
        step_before=group_steps(W, spec), step_after=group_steps(W * factor, spec),
        error_before=(fake_quantize_groups(W, spec) - W).abs(), error_after=(Q - W).abs(), Q=Q,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The clipping search's landscape


@dataclass(frozen=True)
class ClipCurve:
    """The result of `clip_curve`. shrinks: [steps] the clamp m / max|w| tried (1, 0.95, ...);
    errors: [steps, N, G] float32, awq.clip_objective of every row and group at each shrink."""

    shrinks: list[float]
    errors: torch.Tensor

    def total(self) -> torch.Tensor:
        """[steps]: the summed error when every group uses the same shrink."""
        return self.errors.sum(dim=(1, 2))

    def best_step(self) -> torch.Tensor:
        """[N, G] int64: the step each group keeps (the first of equal errors, as clip_search)."""
        return self.errors.argmin(dim=0)

    def best_total(self) -> float:
        """The summed error when every group keeps its own best shrink."""
        return self.errors.min(dim=0).values.sum().item()


@torch.no_grad()
def clip_curve(W: torch.Tensor, x: torch.Tensor, spec: AffineSpec = AWQ_SPEC, steps: int = CLIP_STEPS, tokens: int = CLIP_TOKENS) -> ClipCurve:
    """awq.clip_objective at m = max|w| * (1 - i/20), i = 0 .. steps-1, for every row and group of
    W [N, K] on `tokens` tokens sampled from x [..., K] as awq.clip_search samples them.

    Its best_step() is the step awq.clip_search keeps. Memory: steps x N x G floats.
    """
    check_clip_inputs(W, x, spec, steps)
    N, K = W.shape
    size = group_size_of(spec, K)
    xs = sample_tokens(x, tokens)
    amax = W.detach().abs().reshape(N, K // size, size).amax(dim=-1).float()
    shrinks = [1 - i / CLIP_GRID for i in range(steps)]
    errors = torch.stack([clip_objective(W, xs, amax * shrink, spec) for shrink in shrinks])
    return ClipCurve(shrinks, errors)


@dataclass(frozen=True)
class GroupClip:
    """The result of `clip_group`, one entry per shrink: the group's step, how many weights the
    clamp changes, and the summed squared weight error of those (clamped) and of the others."""

    shrinks: list[float]
    steps: list[float]
    clamped: list[int]
    clamped_error: list[float]
    inside_error: list[float]


@torch.no_grad()
def clip_group(w: torch.Tensor, spec: AffineSpec = AWQ_SPEC, steps: int = CLIP_STEPS) -> GroupClip:
    """Clamp one group w [group] to [-m, m], m = max|w| * (1 - i/20), round it, and split its
    squared error sum((Q(clamp(w)) - w)^2) between the weights the clamp moved and the others."""
    check_tensor(w, "w")
    if w.dim() != 1 or group_size_of(spec, w.numel()) != w.numel():
        raise ValueError(f"w must be one group of {spec.group_size} weights (a 1-D tensor), got shape {tuple(w.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= CLIP_GRID:
        raise ValueError(f"steps must be an integer from 1 to {CLIP_GRID}, got {steps!r}")
    W = w.detach().float()[None]
    amax = W.abs().amax()
    result = GroupClip([], [], [], [], [])
    for i in range(steps):
        shrink = 1 - i / CLIP_GRID
        m = (amax * shrink).reshape(1, 1)
        clamped = clip_weight(W, m, spec)
        error = (fake_quantize_groups(clamped, spec) - W).pow(2)[0]
        moved = clamped[0] != W[0]
        result.shrinks.append(shrink)
        result.steps.append(group_steps(clamped, spec).item())
        result.clamped.append(int(moved.sum()))
        result.clamped_error.append(error[moved].sum().item())
        result.inside_error.append(error[~moved].sum().item())
    return result


# ---------------------------------------------------------------------------------------------
# One decoder layer, quantized and compared


def quantize_layer(layer: nn.Module, spec: AffineSpec = AWQ_SPEC, clips: dict[str, torch.Tensor | None] | None = None) -> nn.Module:
    """Replace every nn.Linear of `layer` by awq.quantized_linear (clamped to clips[name] when
    given: the clips awq.awq_layer returns), in place; returns the layer. On an unscaled layer
    this is round-to-nearest; on a layer awq_layer has scaled, it is what awq_model produces."""
    for name, module in list(layer.named_modules()):
        if isinstance(module, nn.Linear):
            set_module(layer, name, quantized_linear(module, spec, (clips or {}).get(name)))
    return layer


@torch.no_grad()
def layer_outputs(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """A decoder layer's outputs on hidden [n, L, H], window by window: [n, L, H]."""
    outputs = []
    for h in hidden:
        out = layer(h[None], **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outputs)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| (Frobenius), in float64."""
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} and reference {tuple(reference.shape)} must have the same shape")
    reference = reference.double()
    return ((output.double() - reference).norm() / reference.norm()).item()
