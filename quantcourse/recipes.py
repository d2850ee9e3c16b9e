"""Quantization recipes applied to the whole reference model, and their evaluation.

A recipe takes the fp32 reference model and replaces its linear layers (all 210 in the decoder;
the tied output head stays in floating point) by quantized modules. `evaluate_recipe` loads the
model, scores the recipe against the reference on held-out text and returns one flat dict, the
row that `quantcourse eval` prints and the results tables collect. Later lessons add methods to
`METHODS`.
"""

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch

from .corpus import token_windows
from .evaluate import compare_to_reference, model_bits_per_weight, reference_logprobs
from .models import load_reference_model
from .reference_impl.affine import MAX_BITS, MIN_BITS, AffineSpec, Granularity, ZeroPoint
from .reference_impl.awq import AWQ_CALIBRATION_WINDOWS, AWQOptions, awq_model
from .reference_impl.gptq import CALIBRATION_LENGTH, CALIBRATION_WINDOWS, DAMP, GPTQOptions, gptq_model
from .reference_impl.llm_int8 import LLM_INT8_THRESHOLD, LLMInt8Linear, W8A8Linear
from .reference_impl.nf4 import BLOCKSIZES, Linear4bit
from .reference_impl.rtn import FakeQuantLinear
from .reference_impl.smoothquant import ALPHA_LLAMA as SQ_ALPHA
from .reference_impl.smoothquant import SmoothQuantOptions, smoothquant_model
from .runtime import fast_mode
from .surgery import linear_layers, replace_linears

EVAL_WINDOW_LENGTH = 512
EVAL_WINDOWS = 32  # 32 x 511 = 16,352 scored held-out tokens
FAST_EVAL_WINDOWS = 4
FAST_CALIBRATION_WINDOWS = 4  # calibration windows of 512 tokens in fast mode (else 128; 32 for awq)


class RecipeError(ValueError):
    """A recipe was asked for with arguments it cannot honour; the message says what to change."""


@dataclass(frozen=True)
class RecipeOptions:
    """Everything a recipe may be asked for; each recipe checks the fields it uses.

    granularity: "tensor", "channel" or "group" for weight scales (None: "group" when a group
    size is given, else "channel"). zero_point: "integer" or "float" (asymmetric grids; "float"
    is llama.cpp's Q4_1 form x = s * q + min). act_granularity: "token" or "tensor" for W8A8 activations.
    threshold: LLM.int8()'s outlier threshold on |x|. double_quant: nf4/fp4 quantize their block
    absmax to 8 bits (bitsandbytes' compress_statistics, QLoRA's double quantization).
    gptq: act_order (columns by decreasing H_jj), static_groups (group grids from the original
    weights), damp (fraction of mean(diag H) added to the diagonal), calibration_samples
    (windows of 512 calibration tokens; None: 128, or 8 in fast mode).
    """

    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    granularity: Granularity | None = None
    zero_point: ZeroPoint = "integer"
    act_granularity: str = "token"
    threshold: float = LLM_INT8_THRESHOLD
    double_quant: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = DAMP
    calibration_samples: int | None = None
    # smoothquant: migration strength (None: 0.85), and the up_proj -> down_proj extension
    alpha: float | None = None
    smooth_down: bool = False
    # awq, awq_gptq: AutoAWQ's duo scaling (s = x_mean^r / w_mean^(1-r)), and the clipping search
    duo_scaling: bool = False
    clip: bool = True

    def weight_granularity(self) -> Granularity:
        return self.granularity or ("group" if self.group_size is not None else "channel")


@dataclass(frozen=True)
class Recipe:
    name: str
    help: str
    check: Callable[[RecipeOptions], RecipeOptions]  # refuse bad options, fill in defaults
    apply: Callable[[object, RecipeOptions, bool], None]  # apply(model, options, progress)
    columns: tuple[str, ...]  # the options this recipe reports in its results row
    groups_tile_rows: bool = True  # groups run along each row and must tile it; False: blocks of the flattened weight


def check_bits(bits: int | None) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise RecipeError(f"--bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits}")


def check_group_size(model, group_size: int | None) -> None:
    """A group size must divide every quantized layer's input width (no ragged groups here)."""
    if group_size is None:
        return
    widths = sorted({layer.in_features for layer in linear_layers(model).values()})
    bad = [w for w in widths if w % group_size]
    if bad:
        fits = [g for g in (16, 32, 64, 96, 192) if all(w % g == 0 for w in widths)]
        raise RecipeError(
            f"--group-size {group_size} does not divide the input width {bad[0]} of some layers "
            f"(widths here: {widths}); groups must tile each row exactly. "
            f"Sizes that fit: {', '.join(map(str, fits))}."
        )


def weight_spec(options: RecipeOptions) -> AffineSpec:
    """The weight quantizer of a weight-only recipe: per tensor, per output row, or per group."""
    granularity = options.weight_granularity()
    if options.group_size is not None and options.group_size < 1:
        raise RecipeError(f"--group-size must be positive, got {options.group_size}")
    if (granularity == "group") != (options.group_size is not None):
        raise RecipeError(
            "--granularity group needs --group-size, and --group-size only makes sense with "
            f"--granularity group (got granularity={granularity}, group size={options.group_size})"
        )
    if options.zero_point == "float" and options.symmetric:
        raise RecipeError("--zero-point float needs --asymmetric (a symmetric grid has no zero point)")
    return AffineSpec(
        bits=options.bits,
        symmetric=options.symmetric,
        granularity=granularity,
        group_size=options.group_size,
        axis=0,
        zero_point=options.zero_point,
    )


def check_rtn(options: RecipeOptions) -> RecipeOptions:
    check_bits(options.bits)
    weight_spec(options)
    return options


def apply_rtn(model, options: RecipeOptions, progress: bool = True) -> None:
    """Round-to-nearest weights with min-max ranges, every decoder linear layer (WxA16)."""
    spec = weight_spec(options)
    check_group_size(model, options.group_size)
    replace_linears(model, lambda name, linear: FakeQuantLinear.from_linear(linear, spec), progress=progress)


def check_int8_only(method: str, options: RecipeOptions) -> RecipeOptions:
    if options.bits not in (None, 8):
        raise RecipeError(f"{method} uses 8-bit integers only; drop --bits or pass --bits 8")
    if options.group_size is not None or options.granularity not in (None, "channel"):
        raise RecipeError(f"{method} scales weights per output channel; drop --group-size and --granularity")
    return replace(options, bits=8)


def check_w8a8(options: RecipeOptions) -> RecipeOptions:
    if options.act_granularity not in ("token", "tensor"):
        raise RecipeError(f"--act-granularity must be 'token' or 'tensor', got {options.act_granularity!r}")
    return check_int8_only("w8a8", options)


def apply_w8a8(model, options: RecipeOptions, progress: bool = True) -> None:
    """int8 weights per output channel x int8 activations per token or per tensor (dynamic)."""
    make = lambda name, linear: W8A8Linear.from_linear(linear, act_granularity=options.act_granularity)  # noqa: E731
    replace_linears(model, make, progress=progress)


def check_llm_int8(options: RecipeOptions) -> RecipeOptions:
    if not options.threshold > 0:
        raise RecipeError(f"--threshold must be positive, got {options.threshold}")
    return check_int8_only("llm_int8", options)


def apply_llm_int8(model, options: RecipeOptions, progress: bool = True) -> None:
    """LLM.int8(): vector-wise int8, input columns with any |x| >= threshold kept in float."""
    make = lambda name, linear: LLMInt8Linear.from_linear(linear, threshold=options.threshold)  # noqa: E731
    replace_linears(model, make, progress=progress)


def check_4bit_blocks(method: str, options: RecipeOptions) -> RecipeOptions:
    """nf4, fp4, int4_absmax: 4-bit codes, one absmax per block of the flattened weight."""
    if options.bits not in (None, 4):
        raise RecipeError(f"{method} stores 4-bit codes; drop --bits or pass --bits 4")
    if options.granularity not in (None, "group") or not options.symmetric or options.zero_point != "integer":
        raise RecipeError(
            f"{method} scales each block of --group-size weights by its absmax; drop --granularity, "
            "--asymmetric and --zero-point"
        )
    block = 64 if options.group_size is None else options.group_size
    if block not in BLOCKSIZES:
        raise RecipeError(
            f"--group-size for {method} is bitsandbytes' blocksize: one of {', '.join(map(str, BLOCKSIZES))}, got {block}"
        )
    if options.double_quant and method == "int4_absmax":
        raise RecipeError("--double-quant applies to nf4 and fp4 (bitsandbytes' compress_statistics), not int4_absmax")
    return replace(options, bits=4, group_size=block)


def apply_4bit_blocks(quant_type: str, model, options: RecipeOptions, progress: bool = True) -> None:
    """4-bit codes from a code book (NF4, FP4) or the INT4 grid, blocks over the flattened weight
    (so a block may span rows: 576-wide rows take blocks of 128), optional double quantization."""
    make = lambda name, linear: Linear4bit.from_linear(linear, quant_type, options.group_size, options.double_quant)  # noqa: E731
    replace_linears(model, make, progress=progress)


def check_gptq(options: RecipeOptions) -> RecipeOptions:
    check_bits(options.bits)
    spec = weight_spec(options)
    if options.zero_point != "integer":
        raise RecipeError("gptq stores integer zero points (the GPTQ checkpoint layout); drop --zero-point float")
    if options.static_groups and spec.granularity != "group":
        raise RecipeError("--static-groups fixes each group's grid up front: it needs --group-size")
    if not 0 <= options.damp < 1:
        raise RecipeError(f"--damp is a fraction of mean(diag H), from 0 to 1 (GPTQ uses 0.01), got {options.damp}")
    samples = options.calibration_samples
    if samples is None:
        samples = FAST_CALIBRATION_WINDOWS if fast_mode() else CALIBRATION_WINDOWS
    if samples < 1:
        raise RecipeError(f"--calibration-samples must be at least 1, got {samples}")
    return replace(options, calibration_samples=samples)


def apply_gptq(model, options: RecipeOptions, progress: bool = True) -> None:
    """GPTQ, layer by layer on windows of the calibration split, every decoder linear layer."""
    from transformers import AutoTokenizer

    from .models import ensure_reference_cache

    tokenizer = AutoTokenizer.from_pretrained(ensure_reference_cache().path, local_files_only=True)
    try:
        windows = token_windows(tokenizer, "calibration", CALIBRATION_LENGTH, options.calibration_samples)
    except ValueError as error:
        raise RecipeError(f"--calibration-samples {options.calibration_samples}: {error}") from None
    gptq_options = GPTQOptions(weight_spec(options), options.act_order, options.static_groups, options.damp)
    gptq_model(model, windows, gptq_options, progress=progress)


GPTQ_ONLY = {"act_order": "--act-order", "static_groups": "--static-groups", "damp": "--damp", "calibration_samples": "--calibration-samples"}


SMOOTHQUANT_ONLY = {"alpha": "--alpha", "smooth_down": "--smooth-down"}


def check_gptq_only(method: str, options: RecipeOptions) -> None:
    """Refuse a method's own options (set away from their defaults) for the methods whose recipe
    does not list them in its columns (--calibration-samples: gptq, smoothquant, awq, awq_gptq)."""
    for name, flag in {**GPTQ_ONLY, **SMOOTHQUANT_ONLY, **AWQ_ONLY}.items():
        if name not in METHODS[method].columns and getattr(options, name) != getattr(RecipeOptions(), name):
            takers = [m for m, recipe in METHODS.items() if name in recipe.columns]
            listed = " and ".join([", ".join(takers[:-1]), takers[-1]] if len(takers) > 1 else takers)
            raise RecipeError(f"{flag} applies to {listed} only, not {method}")


METHODS: dict[str, Recipe] = {
    "rtn": Recipe(
        "rtn", "round-to-nearest weights, min-max per tensor, per channel or per group", check_rtn, apply_rtn,
        ("bits", "group_size", "symmetric", "granularity", "zero_point"),
    ),
    "w8a8": Recipe(
        "w8a8", "int8 weights per channel x int8 activations per token or per tensor", check_w8a8, apply_w8a8,
        ("bits", "act_granularity"),
    ),
    "llm_int8": Recipe(
        "llm_int8", "LLM.int8(): vector-wise int8 with outlier columns in float", check_llm_int8, apply_llm_int8,
        ("bits", "threshold"),
    ),
    "nf4": Recipe(
        "nf4", "NF4 (QLoRA, bitsandbytes): normal-quantile code book, absmax per block, --double-quant",
        partial(check_4bit_blocks, "nf4"), partial(apply_4bit_blocks, "nf4"), ("bits", "group_size", "double_quant"), groups_tile_rows=False,
    ),
    "fp4": Recipe(
        "fp4", "bitsandbytes' FP4 code book, absmax per block, --double-quant",
        partial(check_4bit_blocks, "fp4"), partial(apply_4bit_blocks, "fp4"), ("bits", "group_size", "double_quant"), groups_tile_rows=False,
    ),
    "int4_absmax": Recipe(
        "int4_absmax", "symmetric INT4 (absmax / 7) on nf4's blocks: QLoRA's Int4 baseline",
        partial(check_4bit_blocks, "int4_absmax"), partial(apply_4bit_blocks, "int4_absmax"), ("bits", "group_size", "double_quant"), groups_tile_rows=False,
    ),
    "gptq": Recipe(
        "gptq", "GPTQ: layer by layer on calibration text, each column's error absorbed by the columns after it",
        check_gptq, apply_gptq,
        ("bits", "group_size", "symmetric", "granularity", "zero_point", "act_order", "static_groups", "damp", "calibration_samples"),
    ),
}  # fmt: skip


def calibration_windows(samples: int) -> torch.Tensor:
    """The first `samples` windows of 512 tokens of the calibration split: [samples, 512] int64."""
    from transformers import AutoTokenizer

    from .models import ensure_reference_cache

    tokenizer = AutoTokenizer.from_pretrained(ensure_reference_cache().path, local_files_only=True)
    try:
        return token_windows(tokenizer, "calibration", CALIBRATION_LENGTH, samples)
    except ValueError as error:
        raise RecipeError(f"--calibration-samples {samples}: {error}") from None


def check_smoothquant(options: RecipeOptions) -> RecipeOptions:
    if options.act_granularity not in ("token", "tensor"):
        raise RecipeError(f"--act-granularity must be 'token' or 'tensor', got {options.act_granularity!r}")
    alpha = SQ_ALPHA if options.alpha is None else options.alpha
    if not 0 <= alpha <= 1:
        raise RecipeError(f"--alpha is the migration strength, from 0 to 1 (0.5 in the paper, 0.85 for Llama), got {alpha}")
    samples = options.calibration_samples
    if samples is None:
        samples = FAST_CALIBRATION_WINDOWS if fast_mode() else CALIBRATION_WINDOWS
    if samples < 1:
        raise RecipeError(f"--calibration-samples must be at least 1, got {samples}")
    return replace(check_int8_only("smoothquant", options), alpha=alpha, calibration_samples=samples)


def apply_smoothquant(model, options: RecipeOptions, progress: bool = True) -> None:
    """SmoothQuant: per-channel max |x| on calibration windows, factors folded into the RMSNorms
    (and up_proj with --smooth-down), then W8A8: activations per token (dynamic) or per tensor
    (static, the calibrated max / 127)."""
    sq_options = SmoothQuantOptions(options.alpha, options.act_granularity, options.smooth_down)
    smoothquant_model(model, calibration_windows(options.calibration_samples), sq_options, progress)


METHODS["smoothquant"] = Recipe(
    "smoothquant", "SmoothQuant: activation outliers moved into the weights (--alpha), then W8A8 per token or static per tensor",
    check_smoothquant, apply_smoothquant, ("bits", "alpha", "act_granularity", "smooth_down", "calibration_samples"),
)  # fmt: skip


AWQ_ONLY = {"duo_scaling": "--duo-scaling", "clip": "--no-clip"}


def check_awq(options: RecipeOptions) -> RecipeOptions:
    """AWQ's grid is asymmetric with integer zero points (llm-awq's zero_point=True), in groups or
    per output channel: --symmetric is not offered, the grid is always asymmetric."""
    check_bits(options.bits)
    options = replace(options, symmetric=False)
    spec = weight_spec(options)
    if options.zero_point != "integer":
        raise RecipeError("awq stores integer zero points (GPTQ's checkpoint layout); drop --zero-point float")
    if spec.granularity == "tensor":
        raise RecipeError("awq scales weights in groups (--group-size) or per output channel, not per tensor")
    samples = options.calibration_samples
    if samples is None:
        samples = FAST_CALIBRATION_WINDOWS if fast_mode() else AWQ_CALIBRATION_WINDOWS
    if samples < 1:
        raise RecipeError(f"--calibration-samples must be at least 1, got {samples}")
    return replace(options, calibration_samples=samples)


def apply_awq(model, options: RecipeOptions, progress: bool = True, then_gptq: bool = False) -> None:
    """AWQ, layer by layer on windows of the calibration split: scales searched and folded,
    clipping searched, then every decoder linear rounded to nearest (or, then_gptq, quantized by
    GPTQ with its default options on the same windows)."""
    spec = weight_spec(options)
    gptq_options = GPTQOptions(spec) if then_gptq else None
    awq_options = AWQOptions(spec, duo_scaling=options.duo_scaling, clip=options.clip, gptq=gptq_options)
    awq_model(model, calibration_windows(options.calibration_samples), awq_options, progress=progress)


AWQ_COLUMNS = ("bits", "group_size", "symmetric", "granularity", "zero_point", "duo_scaling", "clip", "calibration_samples")
METHODS["awq"] = Recipe(
    "awq", "AWQ: salient input channels scaled up before rounding (scale search per layer, clipping search), asymmetric grid",
    check_awq, apply_awq, AWQ_COLUMNS,
)  # fmt: skip
METHODS["awq_gptq"] = Recipe(
    "awq_gptq", "AWQ's scales and clipping, then GPTQ (default options) instead of rounding to nearest",
    check_awq, partial(apply_awq, then_gptq=True), AWQ_COLUMNS,
)  # fmt: skip


def eval_windows(tokenizer, count: int | None = None) -> torch.Tensor:
    """The held-out windows every evaluation uses: [count, 512] int64 (fewer in fast mode)."""
    if count is None:
        count = FAST_EVAL_WINDOWS if fast_mode() else EVAL_WINDOWS
    return token_windows(tokenizer, "heldout", EVAL_WINDOW_LENGTH, count)


def evaluate_recipe(method: str, options: RecipeOptions, windows: int | None = None, progress: bool = True) -> dict:
    """Quantize the reference model with one recipe and score it on held-out text.

    Returns a flat dict: method, the recipe's options (bits, group_size, ...), ppl, ref_ppl,
    kld, top1_agreement, bits_per_weight, eval_tokens, seconds (wall time, model load
    included), quantize_seconds (the recipe alone, wall time) and quantize_cpu_seconds (its CPU
    time over all threads, which a busy machine does not inflate), plus the versions the figures
    depend on.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    recipe = METHODS[method]
    if options.double_quant and "double_quant" not in recipe.columns:
        raise RecipeError(f"--double-quant applies to nf4 and fp4 only, not {method}")
    check_gptq_only(method, options)
    options = recipe.check(options)  # before the model load, so a typo fails at once
    model, tokenizer = load_reference_model()
    if recipe.groups_tile_rows:
        check_group_size(model, options.group_size)
    reference = reference_logprobs(model, eval_windows(tokenizer, windows), progress=progress)
    quantize_started, quantize_cpu_started = time.perf_counter(), time.process_time()
    recipe.apply(model, options, progress)
    quantize_seconds = time.perf_counter() - quantize_started
    quantize_cpu_seconds = time.process_time() - quantize_cpu_started
    scores = compare_to_reference(model, reference, progress=progress)
    settings = {name: getattr(options, name) for name in recipe.columns}
    if "granularity" in settings:
        settings["granularity"] = options.weight_granularity()
    return {
        "method": method,
        "group_size": None,
        **settings,
        "ppl": scores.ppl,
        "ref_ppl": scores.ref_ppl,
        "kld": scores.kld,
        "top1_agreement": scores.top1_agreement,
        "bits_per_weight": model_bits_per_weight(model),
        "eval_tokens": scores.eval_tokens,
        "seconds": round(time.perf_counter() - started, 1),
        "quantize_seconds": round(quantize_seconds, 1),
        "quantize_cpu_seconds": round(quantize_cpu_seconds, 1),
        "fast_mode": fast_mode(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
