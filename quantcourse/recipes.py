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
from dataclasses import dataclass

import torch

from .corpus import token_windows
from .evaluate import compare_to_reference, model_bits_per_weight, reference_logprobs
from .models import load_reference_model
from .reference_impl.affine import MAX_BITS, MIN_BITS, AffineSpec
from .reference_impl.rtn import FakeQuantLinear
from .runtime import fast_mode
from .surgery import linear_layers, replace_linears

EVAL_WINDOW_LENGTH = 512
EVAL_WINDOWS = 32  # 32 x 511 = 16,352 scored held-out tokens
FAST_EVAL_WINDOWS = 4


class RecipeError(ValueError):
    """A recipe was asked for with arguments it cannot honour; the message says what to change."""


@dataclass(frozen=True)
class Recipe:
    name: str
    help: str
    apply: Callable[..., None]  # apply(model, bits=, group_size=, symmetric=, progress=)


def weight_spec(bits: int, group_size: int | None, symmetric: bool) -> AffineSpec:
    """Per output channel without a group size, else groups of `group_size` input features."""
    if group_size is None:
        return AffineSpec(bits=bits, symmetric=symmetric, granularity="channel", axis=0)
    return AffineSpec(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise RecipeError(f"--bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits}")


def check_group_size(model, group_size: int | None) -> None:
    """A group size must divide every quantized layer's input width (no ragged groups here)."""
    if group_size is None:
        return
    if group_size < 1:
        raise RecipeError(f"--group-size must be positive, got {group_size}")
    widths = sorted({layer.in_features for layer in linear_layers(model).values()})
    bad = [w for w in widths if w % group_size]
    if bad:
        fits = [g for g in (16, 32, 64, 96, 192) if all(w % g == 0 for w in widths)]
        raise RecipeError(
            f"--group-size {group_size} does not divide the input width {bad[0]} of some layers "
            f"(widths here: {widths}); groups must tile each row exactly. "
            f"Sizes that fit: {', '.join(map(str, fits))}."
        )


def apply_rtn(model, bits: int, group_size: int | None, symmetric: bool, progress: bool = True) -> None:
    """Round-to-nearest, min-max ranges, every decoder linear layer."""
    spec = weight_spec(bits, group_size, symmetric)
    replace_linears(model, lambda name, linear: FakeQuantLinear.from_linear(linear, spec), progress=progress)


METHODS: dict[str, Recipe] = {
    "rtn": Recipe("rtn", "round-to-nearest weights, min-max per channel or per group", apply_rtn),
}


def eval_windows(tokenizer, count: int | None = None) -> torch.Tensor:
    """The held-out windows every evaluation uses: [count, 512] int64 (fewer in fast mode)."""
    if count is None:
        count = FAST_EVAL_WINDOWS if fast_mode() else EVAL_WINDOWS
    return token_windows(tokenizer, "heldout", EVAL_WINDOW_LENGTH, count)


def evaluate_recipe(
    method: str,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    windows: int | None = None,
    progress: bool = True,
) -> dict:
    """Quantize the reference model with one recipe and score it on held-out text.

    Returns a flat dict: method, bits, group_size, symmetric, ppl, ref_ppl, kld,
    top1_agreement, bits_per_weight, eval_tokens, seconds (wall time, model load included),
    plus the versions the figures depend on.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    check_bits(bits)
    model, tokenizer = load_reference_model()
    check_group_size(model, group_size)
    reference = reference_logprobs(model, eval_windows(tokenizer, windows), progress=progress)
    METHODS[method].apply(model, bits=bits, group_size=group_size, symmetric=symmetric, progress=progress)
    scores = compare_to_reference(model, reference, progress=progress)
    return {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "symmetric": symmetric,
        "ppl": scores.ppl,
        "ref_ppl": scores.ref_ppl,
        "kld": scores.kld,
        "top1_agreement": scores.top1_agreement,
        "bits_per_weight": model_bits_per_weight(model),
        "eval_tokens": scores.eval_tokens,
        "seconds": round(time.perf_counter() - started, 1),
        "fast_mode": fast_mode(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
