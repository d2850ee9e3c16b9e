"""AWQ: scale the weights that matter before rounding them, and fold the inverse scale away.

Round-to-nearest (lesson 01) treats every weight alike. AWQ (Lin et al., 2023) starts from an
observation: a weight's error matters in proportion to the input it multiplies. About 1% of the
input channels of a layer carry much larger activations than the rest; keeping just those
channels' weights in full precision recovers most of what 3- or 4-bit rounding loses
(`keep_channels_model` reproduces that experiment). Mixed precision is awkward to run, so AWQ
gets the same effect with one grid for everything: multiply input channel k of W by s_k > 1
and divide the input by s_k,

    y = W x = (W diag(s)) (diag(s)^-1 x),   quantized as   Q(W diag(s)) diag(s)^-1 x.

The rounding error of a weight is at most half a step whatever its size; after the division by
s_k it shrinks by s_k, while the step of the group grows only a little (if s_k does not set the
group's maximum). Salient channels get a finer effective grid at almost no cost to the others.
The division diag(s)^-1 x costs nothing at run time: it is folded into the op that produces x,
the RMSNorm's weight or the previous Linear's output rows (`folded_weights`, `fold_scales`).

How s is found (mit-han-lab/llm-awq, auto_scale.py). No gradients, a grid search per group:

    x_mean_k = mean over tokens of |x_k|                          (activation_mean)
    s(r) = x_mean^r, clamped to >= 1e-4, divided by sqrt(max s * min s)   (candidate_scales)
    for r in 0, 1/20, ..., 19/20: W_i <- Q(W_i diag(s)) diag(s)^-1 for the group's linears,
        loss(r) = mean squared difference of the block's output from the unquantized output
    keep the s of the lowest loss                                  (search_group_scales)

`search_group_scales` works on tensors and takes the loss as a function of the candidate
weights; `search_scales` gives it the block's output error.

r = 0 is plain RTN (s = 1), so the search never does worse than RTN on its own objective. The
normalisation puts the geometric middle of the scales at 1 (max s * min s = 1); only the ratios
between channels matter to the search, and it keeps both folded factors in a sane range.
AutoAWQ's "duo scaling" (its default) divides by a weight statistic as well,
s = x_mean^r / (w_mean^(1-r) + 1e-4), w_mean_k = mean over rows of |w_k| / max|w| of its group.

Which linears share a scale (`LLAMA_SCALE_GROUPS`): those reading the same input, scaled
together because one previous op is divided by s for all of them.

    input_layernorm          -> q_proj, k_proj, v_proj   (the search compares self_attn's output)
    v_proj                   -> o_proj                   (only when the shapes allow it)
    post_attention_layernorm -> gate_proj, up_proj       (compares the MLP's output)
    up_proj                  -> down_proj                (compares down_proj's output; exact,
                                                          since SiLU(gate) * up is linear in up)

v_proj -> o_proj needs one v_proj output per o_proj input. With grouped-query attention they
differ: SmolLM2's v_proj has 192 outputs (3 KV heads x 64) and o_proj reads 576 (9 heads x 64),
each value channel feeding three heads. llm-awq skips the pair when the weight shapes differ;
here `fold_problem` checks the widths and the driver reports the skip with its reason.

Clipping (auto_clip.py): after scaling, each group of each output row may clamp its weights to
[-m, m], m = max|w| * (1 - i/20) for i = 0..9, keeping the m whose output error (that group's
share of the layer output, on 512 sampled tokens) is lowest (`clip_search`). i = 0 is no
clipping. q_proj and k_proj are not clipped: their outputs meet in q.k^T, where an error in one
is multiplied by the other, so a per-layer output error does not measure what clipping costs
(`search_layer_clips` skips them).

The model driver (`awq_model`) walks the decoder layer by layer (surgery.run_layer_by_layer).
Faithful to llm-awq, every layer is calibrated on the activations of the *floating-point*
model: llm-awq computes a layer's outputs (the next layer's inputs) before it changes that
layer, and only rounds the weights after the whole search (pseudo_quantize_model_weight). Here
each layer is scaled in place during the walk (an exact identity in real arithmetic, so the next
layer sees the float model's activations up to rounding) and its clipping and rounding wait
until the walk is over. Inside a layer, all groups are searched on the unscaled weights, then
all scales are folded, then clipping is searched on the scaled weights and scaled inputs.
GPTQ (lesson 04) does the opposite: it calibrates each layer on the outputs of the already
quantized layers before it. `AWQOptions(gptq=GPTQOptions(...))` combines the two: AWQ's scales
and clipping, then GPTQ instead of rounding to nearest.

The quantizer: asymmetric integer grids in groups along K (llm-awq: 4 bits, groups of 128; 64
here, since 576 = 9 x 64), lesson 01's `affine.quantize_tensor`. One difference from llm-awq's
pseudo_quantize_tensor: there the range of a group is its own [min, max]; here it always
contains 0 (as in GPTQ and every grid of the course). They differ only for a group whose weights
all have one sign, which a group of 64 real weights practically never is. The final layers are
`gptq.GPTQLinear` (codes, fp16 scales, zero points), the data of a GPTQ checkpoint.

Export (`save_awq`): the quantized linears are not the whole AWQ model. Folding divided the
RMSNorm weights by s, and a checkpoint of the linears alone, loaded into the original model,
feeds them inputs that were never divided (logits off by tens of percent on SmolLM2). A fold
into a previous Linear (up_proj's rows for down_proj) needs nothing more: that Linear is
quantized with its rows already divided. So `save_awq` writes the linears in the GPTQ layout
(`gptq.save_gptq`) and the scaled norm weights beside them in the same file, as AutoAWQ's
checkpoints carry the model's whole state; `gptq.load_gptq(folder, model)` puts both into a
fresh reference model and runs the 4-bit layers through the W4A16 kernel path.
"""

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantcourse.surgery import decoder_layers, first_layer_inputs, linear_layers, replace_linears, run_layer_by_layer, set_module

from .affine import AffineSpec, QuantizedTensor, check_tensor, dequantize, quantize, quantize_tensor, scale_zero_point
from .gptq import GPTQLinear, GPTQOptions, check_spec, gptq_model, save_gptq
from .rtn import FakeQuantLinear

GRID_POINTS = 20  # r = 0, 1/20, ..., 19/20
SCALE_FLOOR = 1e-4  # s = x_mean^r is clamped to at least this before normalising
DUO_EPS = 1e-4  # duo scaling: s = x_mean^r / (w_mean^(1-r) + DUO_EPS)
WEIGHT_EPS = 1e-6  # duo scaling: |w| / (max|w| of its group + WEIGHT_EPS)
CLIP_GRID = 20  # the clipping search tries m = max|w| * (1 - i / CLIP_GRID) ...
CLIP_STEPS = 10  # ... for i = 0 .. CLIP_STEPS - 1: at most 45% shrink
CLIP_TOKENS = 512  # tokens sampled (evenly spaced) for the clipping search
CLIP_BATCH = 256  # output rows per batch of the clipping search: bounds its memory
CLIP_SKIP = ("q_proj", "k_proj")  # linears named like this are never clipped (their outputs meet in q.k^T)
WINDOW_BATCH = 8  # calibration windows per forward call of the scale search
KEEP_FRACTION = 0.01  # the mixed-precision experiment keeps 1% of the input channels
KEEP_KINDS = ("activation", "random", "weight")
AWQ_SPEC = AffineSpec(bits=4, symmetric=False, granularity="group", group_size=64)  # 576 = 9 x 64
# Calibration windows of 512 tokens (gptq.CALIBRATION_LENGTH). llm-awq concatenates 128 texts of
# at most 512 tokens each, usually fewer tokens than 128 full windows; here 32 full windows
# (16,384 tokens). The search costs 20 forward passes of each block per layer over all of them,
# about 40x a forward pass of the model, so the count sets the time: 32 windows take tens of
# minutes on 2 CPU cores, 128 would take hours.
AWQ_CALIBRATION_WINDOWS = 32


# ---------------------------------------------------------------------------------------------
# Statistics and candidate scales


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """x_mean: the mean |x| of each input channel over every token. x: [..., K] float -> [K] float32."""
    check_tensor(x, "x")
    return x.detach().reshape(-1, x.shape[-1]).abs().float().mean(dim=0)


def group_size_of(spec: AffineSpec, K: int) -> int:
    """Columns per group: spec.group_size, or K when there is one grid per output row."""
    if spec.granularity == "group":
        return spec.group_size
    if spec.granularity == "channel":
        return K
    raise ValueError(
        "AWQ scales weights in groups along the input dimension or per output row; "
        f"use granularity 'group' or 'channel', not {spec.granularity!r}"
    )


def weight_mean(weights: Iterable[torch.Tensor], spec: AffineSpec) -> torch.Tensor:
    """w_mean for duo scaling: the mean over output rows of |w| / max|w| of its group.

    weights: the [N_i, K] weights of the linears that share one scale (stacked along rows).
    Returns [K] float32. Each weight is measured relative to the largest one of its group, so a
    channel whose weights are large *for their group* gets a large w_mean.
    """
    W = torch.cat([w.detach().float() for w in weights])
    N, K = W.shape
    size = group_size_of(spec, K)
    grouped = W.abs().reshape(N, K // size, size)
    relative = grouped / (grouped.amax(dim=-1, keepdim=True) + WEIGHT_EPS)
    return relative.reshape(N, K).mean(dim=0)


def normalize_scales(s: torch.Tensor) -> torch.Tensor:
    """s / sqrt(max s * min s): the largest and smallest scale become reciprocal (their product 1)."""
    return s / (s.max() * s.min()).sqrt()


def candidate_scales(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """The scales tried at one grid point: s = x_mean^ratio (AWQ), or with duo scaling
    s = x_mean^ratio / (w_mean^(1 - ratio) + 1e-4); clamped to >= 1e-4, then normalised.

    x_mean, w_mean: [K] float32. Returns [K] float32. ratio 0 gives s = 1 (no scaling) without
    duo scaling (0^0 = 1, so even a dead channel's scale is 1).
    """
    s = x_mean.pow(ratio)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - ratio) + DUO_EPS)
    return normalize_scales(s.clamp(min=SCALE_FLOOR))


def fake_quantize_groups(W: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """`affine.fake_quantize` of a Linear weight W [N, K] whose groups tile each row (or one grid
    per row), computed on a [N, G, group] view: the search calls it hundreds of times per layer.
    Returns [N, K] in W's dtype, equal to affine.fake_quantize(W, spec)."""
    N, K = W.shape
    size = group_size_of(spec, K)
    blocks = W.reshape(N, K // size, size)
    scale, zero = scale_zero_point(blocks.amin(dim=-1), blocks.amax(dim=-1), spec.bits, spec.symmetric)
    scale, zero = scale[..., None], zero[..., None]
    codes = quantize(blocks, scale, zero, spec.bits, spec.symmetric, spec.rounding)
    return dequantize(codes, scale, zero).reshape(N, K).to(W.dtype)


def scaled_fake_quant(W: torch.Tensor, s: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Q(W diag(s)) diag(s)^-1: the weight a linear computes with after scaling and rounding.

    W: [N, K] float, s: [K] float32. Returns [N, K] in W's dtype. Multiplied by the input divided
    by s, it is exactly what the quantized, scale-folded layer computes.
    """
    s = s.to(W.dtype)
    return fake_quantize_groups(W * s, spec) / s


# ---------------------------------------------------------------------------------------------
# The scale search for one group


@dataclass(frozen=True)
class ScaleSearch:
    """The result of `search_group_scales` (and `search_scales`).

    scales: [K] float32, the best s (the one to fold). ratio: its r. ratios, losses: every grid
    point and the mean squared output error it gave (the curve the lecture plots).
    """

    scales: torch.Tensor
    ratio: float
    ratios: list[float]
    losses: list[float]


def check_group(weights: list[torch.Tensor], x: torch.Tensor, spec: AffineSpec, grid: int) -> None:
    """What `search_group_scales` needs: float weights [N_i, K] reading x [..., K], whole groups, a grid of at least 1."""
    check_tensor(x, "x")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid is the number of ratios r = 0, 1/grid, ...; llm-awq uses 20. Got {grid!r}")
    if not weights:
        raise ValueError("a scale group needs at least one linear layer to scale")
    for i, W in enumerate(weights):
        check_tensor(W, f"weight {i}")
        if W.dim() != 2 or W.shape[1] != x.shape[-1]:
            raise ValueError(
                f"weight {i} has shape {tuple(W.shape)} but x has {x.shape[-1]} channels: a group's weights are "
                "[N_i, K], K the channels of their common input x"
            )
        check_spec(spec, W.shape[1])
        group_size_of(spec, W.shape[1])


def linear_output_error(weights: list[torch.Tensor], x: torch.Tensor) -> Callable[[list[torch.Tensor]], float]:
    """The default loss of `search_group_scales`: the mean squared difference of the linears'
    outputs x W_i^T (concatenated) computed with candidate weights from those with the originals.

    weights: [N_i, K]; x: [..., K]. Returns loss(candidates: list of [N_i, K]) -> float.
    """
    reference = torch.cat([x @ W.T for W in weights], dim=-1)

    def loss(candidates: list[torch.Tensor]) -> float:
        out = torch.cat([x @ W.T for W in candidates], dim=-1)
        return (out - reference).float().pow(2).mean().item()

    return loss


@torch.no_grad()
def search_group_scales(
    weights: list[torch.Tensor],
    x: torch.Tensor,
    spec: AffineSpec = AWQ_SPEC,
    loss: Callable[[list[torch.Tensor]], float] | None = None,
    duo_scaling: bool = False,
    grid: int = GRID_POINTS,
) -> ScaleSearch:
    """AWQ's grid search for one group: the linears `weights` [N_i, K] that read the same x [..., K].

    For each r in 0, 1/grid, ..., (grid-1)/grid: s = candidate_scales(x_mean, r), every linear
    computes with Q(W_i diag(s)) diag(s)^-1, and loss(those weights) measures the damage; the s
    of the lowest loss is kept (ties keep the smaller r, as llm-awq does). loss: None compares
    the linears' own outputs (`linear_output_error`: the block's output when the group is one
    linear, o_proj or down_proj); `search_scales` passes the error of the whole block's output.
    Nothing is modified.
    """
    check_group(weights, x, spec, grid)
    loss = linear_output_error(weights, x) if loss is None else loss
    x_mean = activation_mean(x)
    w_mean = weight_mean(weights, spec) if duo_scaling else None
    ratios = [i / grid for i in range(grid)]
    losses = []
    best, best_loss = None, math.inf
    for ratio in ratios:
        s = candidate_scales(x_mean, ratio, w_mean)
        value = loss([scaled_fake_quant(W, s, spec) for W in weights])
        losses.append(value)
        if value < best_loss:  # strictly lower: ties keep the smaller r
            best, best_loss = (s, ratio), value
    if best is None:
        raise ValueError(f"every grid point gave a NaN loss ({losses[:3]}...): check the group's inputs and weights")
    return ScaleSearch(best[0], best[1], ratios, losses)


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict | None = None, weights: dict | None = None) -> torch.Tensor:
    """The block's output on x, batch by batch along the first dimension, with some of its
    weights replaced by `weights` ({"q_proj.weight": tensor, ...}) for this call only.

    x: [n, L, K] windows (or [tokens, K]). kwargs: the block's other arguments (the attention's
    rotary embeddings). Returns the outputs concatenated, [n, L, N]; a tuple output (attention
    returns (output, weights)) contributes its first element.
    """
    outputs = []
    for batch in x.split(WINDOW_BATCH):
        out = torch.func.functional_call(block, weights or {}, (batch,), kwargs or {})
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outputs)


def weight_key(name: str) -> str:
    """The parameter name of a linear's weight inside the block ("" is the block itself)."""
    return f"{name}.weight" if name else "weight"


def check_search_inputs(block: nn.Module, names: tuple[str, ...], x: torch.Tensor, spec: AffineSpec, grid: int) -> list[nn.Linear]:
    """The linears `names` of `block`, after checking that the search can run on them."""
    check_tensor(x, "x")
    if not names:
        raise ValueError("a scale group needs at least one linear layer to scale")
    linears = []
    for name in names:
        module = block.get_submodule(name) if name else block
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name or 'the block'} is a {type(module).__name__}, not an nn.Linear: AWQ scales the input columns of linear weights")
        if module.in_features != x.shape[-1]:
            raise ValueError(
                f"{name or 'the block'} reads {module.in_features} input channels but x has {x.shape[-1]}: "
                "pass the input of the group's linears (the output of the op the scales fold into)"
            )
        linears.append(module)
    check_group([m.weight for m in linears], x, spec, grid)
    return linears


@torch.no_grad()
def search_scales(
    block: nn.Module,
    names: tuple[str, ...],
    x: torch.Tensor,
    kwargs: dict | None = None,
    spec: AffineSpec = AWQ_SPEC,
    duo_scaling: bool = False,
    grid: int = GRID_POINTS,
) -> ScaleSearch:
    """`search_group_scales` for linears inside a block, judged by the block's output.

    block: the module whose output is compared (self_attn, mlp, or the linear itself); names:
    the group's linears inside it ("q_proj", ...; "" for the block itself); x: [n, L, K] their
    common input (what the block receives). The loss of a candidate is the mean squared
    difference of the block's output, computed with the candidate weights, from its unquantized
    output. The block is not modified.
    """
    linears = check_search_inputs(block, names, x, spec, grid)
    reference = block_forward(block, x, kwargs)
    keys = [weight_key(n) for n in names]

    def block_error(candidates: list[torch.Tensor]) -> float:
        out = block_forward(block, x, kwargs, dict(zip(keys, candidates)))
        return (out - reference).float().pow(2).mean().item()

    return search_group_scales([m.weight for m in linears], x, spec, block_error, duo_scaling, grid)


# ---------------------------------------------------------------------------------------------
# Folding 1/s into the previous op


def output_width(prev: nn.Module) -> int:
    """How many channels `prev` produces: a Linear's out_features, a norm's weight length."""
    if isinstance(prev, nn.Linear):
        return prev.out_features
    weight = getattr(prev, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.numel()
    raise TypeError(
        f"cannot fold scales into a {type(prev).__name__}: AWQ folds 1/s into a norm's per-channel "
        "weight (RMSNorm, LayerNorm) or into a Linear's output rows"
    )


def fold_problem(prev: nn.Module, linears: list[nn.Linear]) -> str | None:
    """Why 1/s cannot be folded into `prev` for these linears, or None when it can.

    Folding needs exactly one output channel of `prev` per input channel of the linears.
    """
    widths = sorted({m.in_features for m in linears})
    if len(widths) != 1:
        return f"the linears read different input widths {widths}; one scale vector cannot serve them all"
    produced, read = output_width(prev), widths[0]
    if produced == read:
        return None
    reason = f"it produces {produced} channels but the scaled layers read {read}"
    if isinstance(prev, nn.Linear) and read % produced == 0:
        reason += (
            f" (as under grouped-query attention, where each value channel feeds {read // produced} heads: one "
            f"channel cannot be divided by the {read // produced} different scales of the inputs it feeds)"
        )
    return reason


def folded_weights(
    prev_weight: torch.Tensor, prev_bias: torch.Tensor | None, weights: list[torch.Tensor], s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """The weights after folding: output channel k of the previous op divided by s_k, input
    column k of every linear of the group multiplied by s_k. New tensors; nothing is modified.

    prev_weight: a norm's weight [K] or a Linear's weight [K, M] (its output rows); prev_bias:
    [K] or None; weights: the group's [N_i, K]; s: [K] positive. Returns (prev_weight / s along
    dim 0, prev_bias / s or None, [W_i diag(s)]), each in its input's dtype. The layer computes
    the same function afterwards: the linears read x / s, and (W diag(s)) (x / s) = W x.
    """
    if prev_weight.dim() not in (1, 2):
        raise ValueError(f"prev_weight must be a norm's weight [K] or a Linear's [K, M], got shape {tuple(prev_weight.shape)}")
    K = prev_weight.shape[0]
    if s.dim() != 1 or s.numel() != K or not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"s must hold {K} finite positive scales (one per output channel of the previous op), got shape {tuple(s.shape)}")
    for i, W in enumerate(weights):
        if W.dim() != 2 or W.shape[1] != K:
            raise ValueError(f"weight {i} has shape {tuple(W.shape)}: the linears must read the previous op's {K} output channels")
    divisor = s.to(prev_weight.dtype).reshape(K, *[1] * (prev_weight.dim() - 1))
    bias = None if prev_bias is None else prev_bias / s.to(prev_bias.dtype)
    return prev_weight / divisor, bias, [W * s.to(W.dtype)[None, :] for W in weights]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """`folded_weights` applied to the modules, in place.

    prev: an RMSNorm/LayerNorm (weight [K], and bias if any, divided by s) or an nn.Linear
    (output rows W[k, :] and bias[k] divided by s_k). linears: each weight [N, K] becomes
    W diag(s). The float model computes the same function afterwards (up to rounding).
    """
    problem = fold_problem(prev, linears)
    if problem is not None:
        raise ValueError(f"cannot fold scales into {type(prev).__name__}: {problem}")
    bias = getattr(prev, "bias", None)
    prev_weight, prev_bias, weights = folded_weights(prev.weight, bias, [m.weight for m in linears], s)
    prev.weight.copy_(prev_weight)
    if bias is not None:
        bias.copy_(prev_bias)
    for linear, W in zip(linears, weights):
        linear.weight.copy_(W)


# ---------------------------------------------------------------------------------------------
# Clipping


def clip_weight(W: torch.Tensor, max_val: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """Clamp each group of each row to [-m, m]. W: [N, K]; max_val m: [N, G]. Returns [N, K]."""
    N, K = W.shape
    size = group_size_of(spec, K)
    m = max_val.to(W.dtype)[..., None]
    return torch.clamp(W.reshape(N, K // size, size), -m, m).reshape(N, K)


def clip_objective(W: torch.Tensor, x: torch.Tensor, max_val: torch.Tensor, spec: AffineSpec) -> torch.Tensor:
    """The clipping search's loss: for each output row n and group g, the mean over tokens of

        (x_g . (Q(clamp(w_ng, -m, m)) - w_ng))^2,   m = max_val[n, g],

    the error of that group's share of the output. W: [N, K], x: [T, K], max_val: [N, G].
    Returns [N, G] float32.
    """
    N, K = W.shape
    size = group_size_of(spec, K)
    G = K // size
    Q = fake_quantize_groups(clip_weight(W, max_val, spec), spec)
    error = torch.einsum("tgk,ngk->ntg", x.reshape(-1, G, size).to(W.dtype), (Q - W).reshape(N, G, size))
    return error.float().pow(2).mean(dim=1)


def sample_tokens(x: torch.Tensor, tokens: int = CLIP_TOKENS) -> torch.Tensor:
    """Every (T // tokens)-th token of x [..., K], as llm-awq samples them: [>= tokens (or T), K]."""
    flat = x.reshape(-1, x.shape[-1])
    return flat[:: max(1, flat.shape[0] // tokens)]


@dataclass(frozen=True)
class ClipSearch:
    """The result of `clip_search`: max_val [N, G] float32 (the clamp of each group, in W's
    units), and step [N, G] int64, the i of m = max|w| * (1 - i / 20) that was kept."""

    max_val: torch.Tensor
    step: torch.Tensor


def check_clip_inputs(W: torch.Tensor, x: torch.Tensor, spec: AffineSpec, steps: int) -> None:
    """What `clip_search` needs: float W [N, K] and x [..., K], whole groups, 1 to 20 steps."""
    check_tensor(W, "W")
    check_tensor(x, "x")
    if W.dim() != 2 or x.shape[-1] != W.shape[1]:
        raise ValueError(f"W must be [N, K] and x [..., K]; got W {tuple(W.shape)}, x {tuple(x.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= CLIP_GRID:
        raise ValueError(f"steps must be an integer from 1 to {CLIP_GRID} (llm-awq uses {CLIP_STEPS}), got {steps!r}")
    check_spec(spec, W.shape[1])
    group_size_of(spec, W.shape[1])


@torch.no_grad()
def clip_search(
    W: torch.Tensor,
    x: torch.Tensor,
    spec: AffineSpec = AWQ_SPEC,
    steps: int = CLIP_STEPS,
    tokens: int = CLIP_TOKENS,
    batch: int = CLIP_BATCH,
) -> ClipSearch:
    """llm-awq's clipping search: per output row and group, the clamp m that minimises
    `clip_objective` among m = max|w| * (1 - i/20), i = 0 .. steps-1 (i = 0: no clipping).

    W: [N, K] float, the (scaled) weight; x: [..., K] its (scaled) inputs, of which `tokens` are
    sampled. Rows are processed `batch` at a time, which bounds the memory of the search.
    """
    check_clip_inputs(W, x, spec, steps)
    N, K = W.shape
    size = group_size_of(spec, K)
    x = sample_tokens(x, tokens)
    amax = W.detach().abs().reshape(N, K // size, size).amax(dim=-1).float()  # [N, G]
    best_val, best_step = amax.clone(), torch.zeros_like(amax, dtype=torch.int64)
    for r0 in range(0, N, batch):
        rows = slice(r0, min(r0 + batch, N))
        best_error = torch.full_like(amax[rows], math.inf)
        for i in range(steps):
            max_val = amax[rows] * (1 - i / CLIP_GRID)
            error = clip_objective(W[rows], x, max_val, spec)
            better = error < best_error
            best_error[better] = error[better]
            best_val[rows][better] = max_val[better]
            best_step[rows][better] = i
    return ClipSearch(best_val, best_step)


def clip_skipped(name: str) -> bool:
    """q and k projections are never clipped (module doc)."""
    return name.rpartition(".")[2] in CLIP_SKIP


def search_layer_clips(
    weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], spec: AffineSpec = AWQ_SPEC
) -> dict[str, ClipSearch | None]:
    """The clipping search of each linear of a decoder layer, by name ("self_attn.v_proj", ...).

    weights: name -> [N, K] (scaled); inputs: name -> [..., K], the input it reads (scaled).
    Returns name -> `clip_search`'s result, or None for q_proj and k_proj, which are never clipped.
    """
    return {name: None if clip_skipped(name) else clip_search(W, inputs[name], spec) for name, W in weights.items()}


# ---------------------------------------------------------------------------------------------
# Rounding: the final layers, in GPTQ's layout


def quantized_linear(linear: nn.Linear, spec: AffineSpec = AWQ_SPEC, max_val: torch.Tensor | None = None) -> GPTQLinear:
    """Round a (scaled) Linear to a GPTQLinear: clamp to max_val if given, then min-max grids.

    The codes, scales and zero points are the checkpoint's (unsigned grid; a symmetric grid is
    stored shifted by 2^(b-1)); the layer computes with fp16 scales, like the W4A16 kernel.
    """
    W = linear.weight.detach().float()
    N, K = W.shape
    check_spec(spec, K)
    size = group_size_of(spec, K)
    if max_val is not None:
        W = clip_weight(W, max_val, spec)
    q: QuantizedTensor = quantize_tensor(W, spec)
    shift = 2 ** (spec.bits - 1) if spec.symmetric else 0
    codes = (q.codes.to(torch.int16) + shift).to(torch.uint8)
    scales, zeros = q.scale.reshape(N, -1).T, (q.zero + shift).reshape(N, -1).T  # [G, N]
    g_idx = (torch.arange(K) // size).to(torch.int32)
    group = spec.group_size if spec.granularity == "group" else None
    return GPTQLinear(codes, scales.contiguous(), zeros.contiguous(), g_idx, linear.bias, spec.bits, group, spec.symmetric)


# ---------------------------------------------------------------------------------------------
# The model driver


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, the op that produces it, and the block whose output the
    search compares. Names are relative to the decoder layer. layer_kwargs: the block needs the
    layer's keyword arguments (the attention's rotary embeddings)."""

    prev: str
    linears: tuple[str, ...]
    block: str
    layer_kwargs: bool = False


LLAMA_SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", layer_kwargs=True),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


@dataclass(frozen=True)
class AWQOptions:
    """Everything `awq_model` needs besides the model and the calibration windows.

    spec: the weight grid (asymmetric int4 g64). duo_scaling: AutoAWQ's s = x_mean^r / w_mean^(1-r).
    clip: run the clipping search. grid: ratios tried per group (20). gptq: GPTQ's options to
    quantize the scaled (and clipped) weights with GPTQ instead of rounding to nearest (its spec
    must be `spec`); None: round to nearest, as AWQ does. groups: the scale groups of a decoder
    layer; a group whose previous op cannot take the fold is skipped and reported.
    """

    spec: AffineSpec = AWQ_SPEC
    duo_scaling: bool = False
    clip: bool = True
    grid: int = GRID_POINTS
    gptq: GPTQOptions | None = None
    groups: tuple[ScaleGroup, ...] = LLAMA_SCALE_GROUPS


def relative_name(name: str, block: str) -> str:
    """`name` seen from inside `block` ("self_attn.q_proj" in "self_attn" is "q_proj")."""
    if name == block:
        return ""
    if not name.startswith(block + "."):
        raise ValueError(f"{name} is not inside {block}: a group's linears must belong to the block the search compares")
    return name[len(block) + 1 :]


def input_sources(layer: nn.Module, groups: Iterable[ScaleGroup]) -> dict[str, str]:
    """For each linear of the layer, the linear whose recorded input it shares: the first one of
    its scale group (a group is linears reading one tensor), else itself."""
    sources = {name: name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    for group in groups:
        for name in group.linears:
            sources[name] = group.linears[0]
    return sources


@torch.no_grad()
def record_layer_inputs(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The inputs of the named submodules of a decoder layer: hidden [n, L, H] -> {name: [n, L, K]}.

    One window at a time, as the layer-by-layer runner feeds it; float32 copies.
    """
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook_for(name):
        def hook(module, args):
            recorded[name].append(args[0].detach().float().clone())

        return hook

    handles = [layer.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in recorded]
    try:
        for h in hidden:
            layer(h[None], **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in recorded.items()}


@torch.no_grad()
def awq_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, options: AWQOptions) -> tuple[dict, dict[str, torch.Tensor | None]]:
    """Search and fold the scales of one decoder layer, in place, and search its clipping.

    hidden: [n, L, H] the layer's inputs (the float model's); kwargs: its other arguments.
    Returns (report, clips): the report holds every group's ratio and loss curve and every
    skipped group's reason; clips maps each linear (name in the layer) to its clamp [N, G], or
    None when it is not clipped. The layer stays in floating point: rounding comes later.
    """
    report = {"groups": [], "skipped": [], "clip_steps": {}}
    groups = []
    for group in options.groups:
        problem = fold_problem(layer.get_submodule(group.prev), [layer.get_submodule(n) for n in group.linears])
        if problem is None:
            groups.append(group)
        else:
            report["skipped"].append({"prev": group.prev, "linears": list(group.linears), "reason": f"{group.prev}: {problem}"})
    sources = input_sources(layer, groups)
    inputs = record_layer_inputs(layer, hidden, kwargs, sorted(set(sources.values())))
    # llm-awq searches every group on the unscaled layer, then folds all the scales.
    searches = []
    for group in groups:
        started = time.perf_counter()
        block = layer.get_submodule(group.block)
        names = tuple(relative_name(n, group.block) for n in group.linears)
        search = search_scales(
            block, names, inputs[group.linears[0]], kwargs if group.layer_kwargs else None,
            options.spec, options.duo_scaling, options.grid,
        )  # fmt: skip
        searches.append(search)
        report["groups"].append({
            "prev": group.prev, "linears": list(group.linears), "ratio": search.ratio,
            "losses": search.losses, "seconds": time.perf_counter() - started,
        })  # fmt: skip
    for group, search in zip(groups, searches):
        fold_scales(layer.get_submodule(group.prev), [layer.get_submodule(n) for n in group.linears], search.scales)
        inputs[group.linears[0]] /= search.scales  # the linears now receive x / s
    clips: dict[str, torch.Tensor | None] = dict.fromkeys(sources)
    if options.clip:
        weights = {name: layer.get_submodule(name).weight for name in sources}
        found = search_layer_clips(weights, {name: inputs[sources[name]] for name in sources}, options.spec)
        for name, result in found.items():
            if result is not None:
                clips[name] = result.max_val
                report["clip_steps"][name] = result.step.float().mean().item()
    return report, clips


def check_options(model, options: AWQOptions) -> None:
    if not isinstance(options, AWQOptions):
        raise TypeError(f"options must be an AWQOptions, got {type(options).__name__}")
    for linear in linear_layers(model).values():
        check_spec(options.spec, linear.in_features)
        group_size_of(options.spec, linear.in_features)
    if options.gptq is not None and options.gptq.spec != options.spec:
        raise ValueError(
            f"AWQ + GPTQ quantizes with one grid: options.gptq.spec is {options.gptq.spec.describe()} "
            f"but options.spec is {options.spec.describe()}"
        )


def awq_model(model, windows: torch.Tensor, options: AWQOptions = AWQOptions(), progress: bool = True) -> dict[str, dict]:
    """Quantize every decoder linear layer of a Llama model with AWQ, in place.

    windows: [n, L] int64 calibration token ids. Layer by layer, each layer is scaled (folded
    into its norms and linears) and its clipping searched on the float model's activations;
    then every linear is clipped and rounded to a GPTQLinear (or, with options.gptq, quantized
    by GPTQ). Returns, per decoder layer name, the report of `awq_layer` plus its seconds.
    """
    check_options(model, options)
    names = {module: name for name, module in model.named_modules()}
    _, kwargs = first_layer_inputs(model, windows[:1])  # the same for every window of length L
    report: dict[str, dict] = {}
    clips: dict[str, torch.Tensor | None] = {}

    def step(i: int, layer: nn.Module, hidden: torch.Tensor) -> None:
        started = time.perf_counter()
        layer_report, layer_clips = awq_layer(layer, hidden, kwargs, options)
        prefix = names[layer]
        report[prefix] = {**layer_report, "seconds": time.perf_counter() - started}
        clips.update({f"{prefix}.{name}": max_val for name, max_val in layer_clips.items()})

    run_layer_by_layer(model, windows, step, progress=progress)
    if options.gptq is None:
        for name, max_val in clips.items():
            set_module(model, name, quantized_linear(model.get_submodule(name), options.spec, max_val))
        return report
    with torch.no_grad():
        for name, max_val in clips.items():
            if max_val is not None:
                linear = model.get_submodule(name)
                linear.weight.copy_(clip_weight(linear.weight, max_val, options.spec))
    report["gptq"] = gptq_model(model, windows, options.gptq, progress=progress)
    return report


# ---------------------------------------------------------------------------------------------
# Export: the quantized linears and the norms that the folding changed


def folded_float_tensors(model, groups: Iterable[ScaleGroup] = LLAMA_SCALE_GROUPS) -> dict[str, torch.Tensor]:
    """The float tensors AWQ changed outside its quantized layers, by state-dict name: the
    parameters (weight [K], and bias if any) of every scale group's previous op that is not a
    GPTQLinear, i.e. the norms. A previous Linear is quantized, its divided rows in its codes.
    A group whose fold was skipped contributes its unchanged norm, which is harmless."""
    names = {module: name for name, module in model.named_modules()}
    tensors = {}
    for layer in decoder_layers(model):
        for group in groups:
            prev = layer.get_submodule(group.prev)
            if not isinstance(prev, GPTQLinear):
                tensors.update({f"{names[prev]}.{key}": p.detach() for key, p in prev.named_parameters()})
    return tensors


def save_awq(model, folder: str | Path, options: AWQOptions = AWQOptions(), calibration: dict | None = None) -> Path:
    """Write a model quantized by `awq_model` as a GPTQ checkpoint that loads into the reference
    model: its GPTQLinear layers plus the folded norm weights (`folded_float_tensors`), both in
    folder/model.safetensors, and quantize_config.json. Read it with `gptq.load_gptq(folder,
    model)`. options: the ones `awq_model` ran with (their groups name the folded norms; with
    options.gptq, quantize_config records its settings). Returns the folder."""
    if not isinstance(options, AWQOptions):
        raise TypeError(f"options must be the AWQOptions the model was quantized with, got {type(options).__name__}")
    gptq_options = options.gptq or GPTQOptions(spec=options.spec)
    return save_gptq(model, folder, gptq_options, calibration, floats=folded_float_tensors(model, options.groups))


# ---------------------------------------------------------------------------------------------
# The experiment that motivates AWQ: keep 1% of the input channels in full precision


@torch.no_grad()
def mean_abs_inputs(model, windows: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """x_mean of every named linear layer (default: all decoder linears) on windows [n, L] int64,
    reduced on the fly (nothing kept but a [K] sum per layer). Returns name -> [K] float32."""
    layers = linear_layers(model)
    chosen = {n: layers[n] for n in (layers if names is None else names)}
    sums = {n: torch.zeros(m.in_features) for n, m in chosen.items()}
    counts = dict.fromkeys(chosen, 0)

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.abs().float().sum(dim=0).cpu()
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in chosen.items()]
    try:
        for window in windows:
            model(window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sums[n] / counts[n] for n in chosen}


def channel_importance(kind: str, W: torch.Tensor, x_mean: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A score per input channel of W [N, K]; the highest 1% are kept. Returns [K] float32.

    "activation": x_mean, the mean |x| of the channel's input (AWQ's criterion).
    "weight": the mean |w| of the channel's weight column. "random": uniform noise (a control).
    """
    if kind == "activation":
        if x_mean is None:
            raise ValueError("kind 'activation' needs x_mean, the mean |x| per input channel (mean_abs_inputs)")
        return x_mean.float()
    if kind == "weight":
        return W.detach().abs().float().mean(dim=0)
    if kind == "random":
        return torch.rand(W.shape[1], generator=generator)
    raise ValueError(f"kind must be one of {KEEP_KINDS}, got {kind!r}")


def salient_channels(importance: torch.Tensor, fraction: float = KEEP_FRACTION) -> torch.Tensor:
    """The indices of the int(fraction * K) (at least 1) most important channels: [k] int64, sorted."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction is the share of input channels kept, between 0 and 1 (0.01 is 1%), got {fraction!r}")
    k = max(1, int(fraction * importance.numel()))
    return torch.topk(importance, k).indices.sort().values


class KeptChannelsLinear(FakeQuantLinear):
    """A round-to-nearest Linear whose weight columns `kept` stay at their fp32 values.

    The grids are those of the whole weight (the kept columns included, as in MIT's experiment);
    then the kept columns are put back. Storage: the codes and grids of every weight, plus 32
    bits per kept weight and 32 bits per kept index.
    """

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype, kept: torch.Tensor, columns: torch.Tensor):
        super().__init__(qweight, bias, dtype)
        self.register_buffer("kept", kept)
        self.weight[:, kept] = columns.to(dtype)

    @classmethod
    def from_linear_keeping(cls, linear: nn.Linear, spec: AffineSpec, kept: torch.Tensor) -> "KeptChannelsLinear":
        W = linear.weight.detach()
        return cls(quantize_tensor(W, spec), linear.bias, W.dtype, kept, W[:, kept].clone())

    def storage_bits(self) -> int:
        return super().storage_bits() + self.kept.numel() * (self.out_features + 1) * 32

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.kept.numel()} input channels in fp32"


def keep_channels_model(
    model,
    windows: torch.Tensor | None,
    spec: AffineSpec,
    kind: str,
    fraction: float = KEEP_FRACTION,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Round every decoder linear to nearest, keeping `fraction` of its input channels in fp32,
    chosen by `kind` ("activation": largest mean |x| on `windows`; "weight": largest mean |w|;
    "random"). In place; returns the kept channel indices per layer name."""
    if kind not in KEEP_KINDS:
        raise ValueError(f"kind must be one of {KEEP_KINDS}, got {kind!r}")
    if kind == "activation" and windows is None:
        raise ValueError("keeping channels by activation needs calibration windows to measure mean |x|")
    x_means = mean_abs_inputs(model, windows) if kind == "activation" else {}
    generator = torch.Generator().manual_seed(seed)
    kept = {}

    def make(name: str, linear: nn.Linear) -> KeptChannelsLinear:
        kept[name] = salient_channels(channel_importance(kind, linear.weight, x_means.get(name), generator), fraction)
        return KeptChannelsLinear.from_linear_keeping(linear, spec, kept[name])

    replace_linears(model, make, progress=progress)
    return kept
