"""Hidden suite of lab 02 (activation outliers and LLM.int8()).

Every case compares the learner's function with `reference_impl/outliers.py` and
`reference_impl/llm_int8.py` (which match bitsandbytes bit for bit). Case groups per function:
fixed (hand-picked), randomized (seeded generators), edge cases, bad input. When an output
differs, it is compared with the outputs of the usual mistakes, each from a small wrong
implementation below (computed only then, so a correct notebook grades fast), and the feedback
names the mistake it matches.

Allowances, stated in the lab:
- int8 codes are compared exactly, except where the exact value a * 127 / absmax lies within
  float32 rounding of a tie (fraction .5 up to 1e-4): there the order of the float32 operations
  decides, and either neighbour is accepted. Exact ties round half to even (torch.round); the
  "ties" groups check that without the allowance.
- int8_matmul: any exact result passes the value groups (int32, int64, or an integer-valued
  float64 result); one small group asks for the int32 dtype of the docstring.
- Float results: float32 to rounding of the operation order; fp16 results to one fp16 step.
- top_channel_frequency: the data has no ties at the k-th place, which the lab leaves open.
- fp16 inputs are tested with thresholds that fp16 holds exactly (6.0, 3.0, 1.5), because the
  reference compares in A's dtype.

torch.dtype values cannot travel to the learner process, so `int8_mm_dequant` is called with its
default `dtype` (float32) only.
"""

import torch

from quantcourse.autograder.testing import (
    Mismatch,
    close_mask,
    describe_value,
    expect_close,
    expect_equal,
    expect_raises,
    first_difference,
    graded,
    matching_variant,
    same_kind,
)
from quantcourse.reference_impl import llm_int8 as ref
from quantcourse.reference_impl import outliers
from quantcourse.reference_impl.outliers import ChannelStats

GRADED = {
    "outlier_channels": outliers.outlier_channels,
    "top_channel_frequency": outliers.top_channel_frequency,
    "int8_vectorwise_quant": ref.int8_vectorwise_quant,
    "int8_vectorwise_dequant": ref.int8_vectorwise_dequant,
    "int8_tensorwise_quant": ref.int8_tensorwise_quant,
    "int8_matmul": ref.int8_matmul,
    "int8_mm_dequant": ref.int8_mm_dequant,
    "int8_decomposed_matmul": ref.int8_decomposed_matmul,
    "llm_int8_matmul": ref.llm_int8_matmul,
}

NEAR_TIE = 1e-4  # |fraction - 0.5| below this: float32 operation order may decide the rounding
FP32 = {"rtol": 2e-6, "atol": 1e-6}
FP16 = {"rtol": 2e-3, "atol": 1e-3}  # one fp16 step: results are rounded to fp16 at the end


# -- data --------------------------------------------------------------------------------------


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def activations(rows, cols, outlier_cols=(), seed=0, dtype=torch.float32, zero_row=False) -> torch.Tensor:
    """~N(0, 1) activations; the listed columns scaled by 20..60 (outlier features)."""
    g = generator(seed)
    X = torch.randn(rows, cols, generator=g)
    if len(outlier_cols):
        X[:, list(outlier_cols)] *= 20 + 40 * torch.rand(len(outlier_cols), generator=g)
    if zero_row:
        X[rows // 2] = 0
    return X.to(dtype)


def weights(out_features, in_features, seed=0, dtype=torch.float32) -> torch.Tensor:
    return (0.05 * torch.randn(out_features, in_features, generator=generator(seed))).to(dtype)


def random_codes(rows, cols, seed, low=-127) -> torch.Tensor:
    return torch.randint(low, 128, (rows, cols), dtype=torch.int8, generator=generator(seed))


def stats_of(absmax, threshold=6.0) -> ChannelStats:
    """A ChannelStats of one token with the given max |x| per channel."""
    absmax = torch.as_tensor(absmax, dtype=torch.float32)
    stats = ChannelStats.empty(absmax.numel(), threshold)
    stats.absmax = absmax
    stats.count_over = (absmax >= threshold).long()
    stats.tokens = 1
    return stats


def measured_stats(X: torch.Tensor, threshold: float) -> ChannelStats:
    stats = ChannelStats.empty(X.shape[1], threshold)
    stats.update(X)
    return stats


# -- comparisons -------------------------------------------------------------------------------


def unpack(got, n: int, call: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise Mismatch(f"{call} should return a tuple of {n} values, got {describe_value(got)}")
    return tuple(got)


def exact_scaled(A: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """a * 127 / absmax in float64 (0 where absmax is 0): the value the codes round."""
    absmax = absmax.double()
    return torch.where(absmax > 0, A.double() * 127 / absmax.where(absmax > 0, torch.ones_like(absmax)), 0.0)


def lazily(make):
    """`make()` computed on the first call only: the known mistakes are worked out only when a
    learner's output differs, which keeps grading a correct notebook fast."""
    cache = []

    def get():
        if not cache:
            cache.append(make())
        return cache[0]

    return get


def expect_diagnosed(expect, got, expected, mistakes=None, **kwargs):
    """`expect(got, expected, **kwargs)`; on a mismatch, again with `variants=mistakes()`, so that
    the feedback names the known mistake the output matches."""
    try:
        expect(got, expected, **kwargs)
    except Mismatch as error:
        if mistakes is None:
            raise
        rtol, atol = kwargs.get("rtol", 0.0), kwargs.get("atol", 0.0)
        raise Mismatch(diagnose(str(error), got, expected, mistakes(), rtol, atol)) from None


def diagnose(message: str, got, expected, variants: dict, rtol: float, atol: float) -> str:
    """The feedback plus the known mistake the output equals, if any, shapes and dtypes included
    (a wrong number of indices is often exactly a known mistake). Mistakes that give the right
    answer on this input say nothing about it and are left out."""
    if not isinstance(got, torch.Tensor):
        return message
    telling = {
        name: v for name, v in variants.items()
        if not (v.shape == expected.shape and bool(close_mask(v.to(expected.dtype), expected, rtol, atol).all()))
    }  # fmt: skip
    variant = matching_variant(got, telling, rtol, atol)
    if not variant:
        return message
    return message.rstrip(".") + f". Your output matches a common mistake: {variant}."


def expect_codes(got, expected, scaled, *, call, inputs, mistakes=None, near_ties=True):
    """int8 codes, exact; where `scaled` (float64) is within NEAR_TIE of a tie, either neighbour.
    mistakes: None or a function returning {name: codes of that mistake}."""
    try:
        same_kind(got, expected, call)
    except Mismatch as error:
        raise Mismatch(diagnose(str(error), got, expected, mistakes() if mistakes else {}, 0.0, 0.0)) from None
    ok = got == expected
    if near_ties:
        fraction = scaled.abs() - scaled.abs().floor()
        ok |= ((fraction - 0.5).abs() < NEAR_TIE) & ((got.long() - expected.long()).abs() == 1)
    if bool(ok.all()):
        return
    message = f"{call}: {int((~ok).sum())} of {ok.numel()} codes differ; {first_difference(got, expected, inputs, ok)}."
    raise Mismatch(diagnose(message, got, expected, mistakes() if mistakes else {}, 0.0, 0.0))


def expect_outlier_cols(got, expected, *, call, inputs, mistakes=None):
    if expected is None:
        if got is not None:
            raise Mismatch(f"{call} returned {describe_value(got)} as outlier_cols; with threshold 0 it must be None")
        return
    if got is None:
        raise Mismatch(f"{call} returned None as outlier_cols; with a threshold above 0 it must be the int64 indices")
    expect_diagnosed(expect_equal, got, expected, mistakes, call=call, inputs=inputs, what="indices")


def pick(mistakes, i: int):
    """From a function returning {name: tuple of outputs}, one returning {name: output i}."""
    return lambda: {
        name: v[i] for name, v in mistakes().items() if isinstance(v, tuple) and isinstance(v[i], torch.Tensor)
    }


# -- common mistakes ---------------------------------------------------------------------------


def quantize_rows(A, absmax, qmax=127, rounding=torch.round):
    factor = torch.where(absmax > 0, qmax / absmax, torch.zeros_like(absmax))
    return rounding(A.float() * factor).clamp(-128, 127).to(torch.int8)


def round_half_away(x):
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def vectorwise_mistake(A: torch.Tensor, threshold: float, mistake: str) -> tuple:
    """int8_vectorwise_quant with one known mistake."""
    is_outlier = A.abs() >= threshold if threshold > 0 else torch.zeros_like(A, dtype=torch.bool)
    if mistake == "outlier test |x| > threshold instead of >=":
        is_outlier = A.abs() > threshold
    cols = torch.nonzero(is_outlier.any(dim=0)).flatten()
    inliers = A.masked_fill(is_outlier, 0)
    if mistake == "whole outlier columns left out of the row absmax (only the outlier values are zeroed first)":
        inliers = A.clone()
        inliers[:, cols] = 0
    absmax = inliers.abs().amax(dim=1).float()
    if mistake == "outlier values still set the row absmax":
        absmax = A.abs().amax(dim=1).float()
    qmax, rounding, scale = 127, torch.round, absmax[:, None]
    if mistake.startswith("scale by 128"):
        qmax = 128
    elif mistake.startswith("scale by 255"):
        qmax = 255
    elif mistake == "floor instead of round":
        rounding = torch.floor
    elif mistake == "truncation (.to(torch.int8) without rounding)":
        rounding = torch.trunc
    elif mistake == "round half away from zero instead of half to even (torch.round)":
        rounding = round_half_away
    elif mistake == "absmax per column instead of per row":
        absmax = inliers.abs().amax(dim=0).float()
        scale = absmax[None, :]
    elif mistake == "one absmax for the whole tensor instead of one per row":
        absmax = inliers.abs().amax().float().expand(A.shape[0])
        scale = absmax[:, None]
    codes = quantize_rows(inliers, scale, qmax, rounding)
    if mistake == "computed in float16":
        half_max = inliers.abs().amax(dim=1, keepdim=True)
        codes = torch.round(inliers * torch.where(half_max > 0, 127 / half_max, 0)).to(torch.int8)
    if threshold > 0 and mistake != "outlier columns not zeroed after quantizing":
        codes[:, cols] = 0
    return codes, absmax, cols if threshold > 0 else None


PLAIN_MISTAKES = (
    "scale by 128 instead of 127",
    "scale by 255 instead of 127 ((2^n - 1) / max)",
    "floor instead of round",
    "truncation (.to(torch.int8) without rounding)",
    "round half away from zero instead of half to even (torch.round)",
    "absmax per column instead of per row",
    "one absmax for the whole tensor instead of one per row",
)
OUTLIER_MISTAKES = (
    "outlier test |x| > threshold instead of >=",
    "outlier values still set the row absmax",
    "whole outlier columns left out of the row absmax (only the outlier values are zeroed first)",
    "outlier columns not zeroed after quantizing",
)


def tensorwise_mistakes(A: torch.Tensor) -> dict:
    absmax = A.abs().amax().float()
    rows = A.shape[0]
    return {
        "scale by 128 instead of 127": (quantize_rows(A, absmax, 128), absmax.expand(rows)),
        "scale by 255 instead of 127 ((2^n - 1) / max)": (quantize_rows(A, absmax, 255), absmax.expand(rows)),
        "floor instead of round": (quantize_rows(A, absmax, rounding=torch.floor), absmax.expand(rows)),
        "one absmax per row (that is int8_vectorwise_quant)": ref.int8_vectorwise_quant(A)[:2],
        "max instead of max |x|": (quantize_rows(A, A.amax().float()), A.amax().float().expand(rows)),
    }


def dequant_mistakes(codes: torch.Tensor, absmax: torch.Tensor) -> dict:
    c = codes.float()
    out = {
        "divided by 128 instead of 127": c * absmax[:, None] / 128,
        "divided by 127^2 (that is for a product of two codes)": c * absmax[:, None] / 127**2,
        "forgot to divide by 127": c * absmax[:, None],
        "multiplied by 127 / absmax (that is the quantization factor)": c * 127 / absmax[:, None],
        "one scale for all rows (the mean absmax)": c * absmax.mean() / 127,
    }
    if codes.shape[0] == codes.shape[1]:
        out["absmax applied per column instead of per row"] = c * absmax[None, :] / 127
    return out


def matmul_mistakes(A: torch.Tensor, B: torch.Tensor) -> dict:
    in_int8, in_float16, in_float32 = A @ B.t(), A.half() @ B.half().t(), A.float() @ B.float().t()
    return {
        "accumulated in int8 (the sums overflow and wrap around)": in_int8.to(torch.int32),
        "accumulated in float16 (inexact above 2048)": in_float16.to(torch.int32),
        "accumulated in float32 in one piece (inexact above 2^24, i.e. for K > 1024)": in_float32.to(torch.int32),
    }


def mm_dequant_mistakes(C, row_stats, col_stats, bias=None) -> dict:
    scale = row_stats[:, None] * col_stats[None, :]
    plus = (lambda Y: Y + bias) if bias is not None else (lambda Y: Y)
    out = {
        "divided by 127 instead of 127^2 (each operand contributes one 127)": plus(C.float() * scale / 127),
        "divided by 128^2 instead of 127^2": plus(C.float() * scale / 128**2),
        "computed in float16 (C above 65504 overflows)": plus((C.half() * scale.half() / 127**2).float()),
    }
    if bias is not None:
        out["bias forgotten"] = C.float() * scale / 127**2
    if C.shape[0] == C.shape[1]:
        out["row_stats and col_stats swapped"] = plus(C.float() * (col_stats[:, None] * row_stats[None, :]) / 127**2)
    return out


DECOMPOSED_MISTAKES = OUTLIER_MISTAKES + (
    "outlier columns dropped (no float path)",
    "float path multiplies the int8 codes of W, not the dequantized weights",
    "no decomposition (plain vector-wise int8 for every column)",
    "int8 part divided by 127 instead of 127^2",
    "bias forgotten",
    "bias added twice",
)


def decomposed_mistake(X, W_codes, W_absmax, threshold, bias, mistake) -> tuple:
    """int8_decomposed_matmul with one known mistake; returns (Y, outlier_cols)."""
    X_codes, X_absmax, cols = vectorwise_mistake(X, threshold, mistake)
    if mistake.startswith("no decomposition"):
        X_codes, X_absmax, _ = ref.int8_vectorwise_quant(X)
    divisor = 127 if mistake.startswith("int8 part divided by 127") else 127**2
    Y = ref.int8_matmul(X_codes, W_codes).float() * (X_absmax[:, None] * W_absmax[None, :]) / divisor
    if mistake.startswith("float path multiplies the int8 codes"):
        W_outliers = W_codes[:, cols].float()
    else:
        W_outliers = ref.int8_vectorwise_dequant(W_codes[:, cols], W_absmax)
    if not mistake.startswith(("outlier columns dropped", "no decomposition")):
        Y += X[:, cols].float() @ W_outliers.t()
    if bias is not None and mistake != "bias forgotten":
        Y += 2 * bias if mistake == "bias added twice" else bias
    return Y.to(X.dtype), cols


def llm_int8_mistakes(X, W, threshold, bias=None) -> dict:
    W_codes, W_absmax, _ = ref.int8_vectorwise_quant(W)
    X_codes, X_absmax, cols = ref.int8_vectorwise_quant(X, threshold)
    int8_part = ref.int8_mm_dequant(ref.int8_matmul(X_codes, W_codes), X_absmax, W_absmax, bias)
    out = {
        "float path with the original weights (bitsandbytes keeps only the int8 weights)": int8_part
        + X[:, cols].float() @ W[:, cols].float().t(),
        "threshold ignored (always 6.0)": ref.llm_int8_matmul(X, W, 6.0, bias),
    }
    per_column = W.abs().amax(dim=0).float()
    Wc_codes = quantize_rows(W, per_column[None, :])
    W_hat_cols = Wc_codes.float() * per_column[None, :] / 127
    X_hat = ref.int8_vectorwise_dequant(X_codes, X_absmax)
    out["weight absmax per input column instead of per output row"] = (
        X_hat @ W_hat_cols.t() + X[:, cols].float() @ W_hat_cols[:, cols].t() + (bias if bias is not None else 0)
    )
    W_t_codes, W_t_absmax = ref.int8_tensorwise_quant(W)
    out["weight quantized per tensor instead of per output row"] = ref.int8_decomposed_matmul(
        X, W_t_codes, W_t_absmax, threshold, bias
    )[0]
    return {name: Y.to(X.dtype) for name, Y in out.items()}


def float_tolerance(Y: torch.Tensor, X: torch.Tensor, W_hat: torch.Tensor) -> dict:
    """rtol/atol for a product: float32 rounding relative to sum |x| |w| (the order of the sums
    is the learner's); one fp16 step for fp16 results."""
    magnitude = float((X.float().abs() @ W_hat.abs().t()).max()) if X.numel() and W_hat.numel() else 1.0
    if Y.dtype == torch.float16:
        return {"rtol": FP16["rtol"], "atol": FP16["atol"] + 1e-5 * magnitude}
    return {"rtol": 1e-5, "atol": 1e-5 * max(magnitude, 1.0)}


# -- 02.outlier_channels (8 points) ------------------------------------------------------------


def check_outlier_channels(learner, stats, threshold, call):
    got = learner.outlier_channels(stats, threshold)
    expected = outliers.outlier_channels(stats, threshold)
    expect_diagnosed(
        expect_equal, got, expected, lambda: outlier_channel_mistakes(stats, threshold),
        call=call, inputs={"stats.absmax": stats.absmax, "threshold": threshold}, what="indices",
    )  # fmt: skip


def outlier_channel_mistakes(stats, threshold) -> dict:
    def where(mask):
        return torch.nonzero(mask).flatten()

    return {
        "|x| > threshold instead of >=": where(stats.absmax > threshold),
        "read from count_over, which was counted with the stats' own threshold": where(stats.count_over > 0),
        "channels below the threshold": where(stats.absmax < threshold),
    }


@graded("02.outlier_channels", points=3)
def test_outlier_channels_fixed(learner):
    stats = stats_of([0.5, 6.0, 5.99, 40.0, 0.0, 6.01])
    check_outlier_channels(learner, stats, 6.0, "outlier_channels(stats, 6.0)")
    check_outlier_channels(learner, stats, 1.0, "outlier_channels(stats, 1.0)")


@graded("02.outlier_channels", points=3)
def test_outlier_channels_random(learner):
    for seed, (rows, cols) in enumerate([(64, 96), (300, 576), (8, 1536)]):
        X = activations(rows, cols, outlier_cols=range(seed, cols, 37), seed=seed)
        stats = measured_stats(X, threshold=6.0)
        for threshold in (6.0, 3.0, 20.0):
            call = f"outlier_channels(stats, {threshold}) on stats of {rows} random tokens (stats.threshold = 6.0)"
            check_outlier_channels(learner, stats, threshold, call)


@graded("02.outlier_channels", points=2)
def test_outlier_channels_edges(learner):
    quiet = stats_of([0.1, 2.0, 5.5])
    check_outlier_channels(learner, quiet, 6.0, "outlier_channels(stats, 6.0) with no outliers (an empty int64 tensor)")
    loud = stats_of([7.0, 6.0, 100.0])
    check_outlier_channels(learner, loud, 6.0, "outlier_channels(stats, 6.0) with every channel an outlier")
    for threshold in (0.0, -6.0):
        expect_raises(
            lambda t=threshold: learner.outlier_channels(quiet, t),
            (ValueError,),
            call=f"outlier_channels(stats, {threshold})",
            why="the threshold is a positive magnitude",
        )


# -- 02.top_channel_frequency (10 points) ------------------------------------------------------


def frequency_mistakes(per_layer, k) -> dict:
    def count(pick_indices):
        counts = torch.zeros(per_layer[0].absmax.numel(), dtype=torch.int64)
        for s in per_layer:
            counts[pick_indices(s)] += 1
        return counts

    out = {
        "counted the k smallest channels instead of the k largest": count(
            lambda s: s.absmax.topk(k, largest=False).indices
        ),
        "counted the top k+1 channels (off by one)": count(
            lambda s: s.absmax.topk(min(k + 1, s.absmax.numel())).indices
        ),
        "summed count_argmax over layers instead of counting top-k membership": sum(s.count_argmax for s in per_layer),
    }
    if k > 1:
        out["counted only the largest channel (ignored k)"] = count(lambda s: s.absmax.argmax())
    return out


def layers_of(seed, n_layers, channels, hot=()) -> list[ChannelStats]:
    """Random per-layer absmax (no ties), with the `hot` channels large in most layers."""
    g = generator(seed)
    layers = []
    for _ in range(n_layers):
        absmax = torch.rand(channels, generator=g) * 5
        if hot:
            absmax[list(hot)] += 10 * torch.rand(len(hot), generator=g)
        stats = stats_of(absmax)
        stats.count_argmax = torch.bincount(torch.randint(0, channels, (7,), generator=g), minlength=channels)
        layers.append(stats)
    return layers


def check_frequency(learner, per_layer, k, call):
    expect_diagnosed(
        expect_equal,
        learner.top_channel_frequency(per_layer, k),
        outliers.top_channel_frequency(per_layer, k),
        lambda: frequency_mistakes(per_layer, k),
        call=call,
        inputs={f"layer {i} absmax": s.absmax for i, s in enumerate(per_layer[:3])},
        what="counts",
    )


@graded("02.top_channel_frequency", points=3)
def test_top_channel_frequency_fixed(learner):
    layers = [stats_of([1, 9, 2, 3]), stats_of([1, 8, 7, 0]), stats_of([5, 1, 2, 4])]
    for layer, argmax in zip(layers, (1, 1, 0)):
        layer.count_argmax = torch.nn.functional.one_hot(torch.tensor(argmax), 4) * 3
    check_frequency(learner, layers, 1, "top_channel_frequency(3 layers of 4 channels, k=1)")
    check_frequency(learner, layers, 2, "top_channel_frequency(3 layers of 4 channels, k=2)")


@graded("02.top_channel_frequency", points=4)
def test_top_channel_frequency_random(learner):
    for seed, (n_layers, channels, hot) in enumerate([(30, 576, (247, 507, 17)), (30, 1536, ()), (7, 64, (3,))]):
        layers = layers_of(seed, n_layers, channels, hot)
        for k in (1, 3, 8):
            check_frequency(
                learner, layers, k, f"top_channel_frequency({n_layers} random layers of {channels} channels, k={k})"
            )


@graded("02.top_channel_frequency", points=2)
def test_top_channel_frequency_edges(learner):
    single = layers_of(10, 1, 16)
    check_frequency(learner, single, 1, "top_channel_frequency(one layer, k=1)")
    check_frequency(learner, single, 16, "top_channel_frequency(one layer, k=in_features=16)")
    many = layers_of(11, 5, 6)
    check_frequency(learner, many, 6, "top_channel_frequency(5 layers, k=in_features=6): every channel in every layer")


@graded("02.top_channel_frequency", points=1)
def test_top_channel_frequency_bad_k(learner):
    layers = layers_of(12, 3, 8)
    for k in (0, 9):
        expect_raises(
            lambda k=k: learner.top_channel_frequency(layers, k),
            (ValueError,),
            call=f"top_channel_frequency(layers of 8 channels, k={k})",
            why="k must be between 1 and in_features",
        )


# -- 02.int8_vectorwise_quant (24 points) ------------------------------------------------------


def check_vectorwise(learner, A, threshold, call, mistakes=(), near_ties=True):
    expected = ref.int8_vectorwise_quant(A, threshold)
    got = unpack(learner.int8_vectorwise_quant(A, threshold), 3, call)
    variants = lazily(lambda: {name: vectorwise_mistake(A, threshold, name) for name in mistakes})
    inputs = {"A": A, "threshold": threshold}
    expect_outlier_cols(
        got[2], expected[2], call=f"{call}[2] (outlier_cols)", inputs=inputs, mistakes=pick(variants, 2)
    )
    expect_diagnosed(
        expect_equal, got[1], expected[1], pick(variants, 1), call=f"{call}[1] (row_absmax)", inputs=inputs
    )
    inliers = A if threshold == 0 else A.masked_fill(A.abs() >= threshold, 0)
    scaled = exact_scaled(inliers, expected[1][:, None])
    if expected[2] is not None:
        scaled[:, expected[2]] = 0
    expect_codes(
        got[0],
        expected[0],
        scaled,
        call=f"{call}[0] (codes)",
        inputs=inputs,
        mistakes=pick(variants, 0),
        near_ties=near_ties,
    )


@graded("02.int8_vectorwise_quant", points=3)
def test_vectorwise_quant_fixed(learner):
    A = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.1, 0.2, -0.3, 0.05], [-8.0, 3.0, 2.0, 1.0]])
    check_vectorwise(learner, A, 0.0, "int8_vectorwise_quant(A, threshold=0.0)", PLAIN_MISTAKES)
    B = torch.tensor([[0.3, -0.7, 1.1], [-2.5, 0.0, 2.4], [1.0, 1.0, -1.0]])
    check_vectorwise(learner, B, 0.0, "int8_vectorwise_quant(A, threshold=0.0)", PLAIN_MISTAKES)


@graded("02.int8_vectorwise_quant", points=4)
def test_vectorwise_quant_random_float32(learner):
    for seed, shape in enumerate([(1, 7), (5, 64), (33, 576), (12, 1536)]):
        A = activations(*shape, seed=seed) * (0.1 + seed)
        check_vectorwise(learner, A, 0.0, f"int8_vectorwise_quant(random float32 A of shape {shape})", PLAIN_MISTAKES)


@graded("02.int8_vectorwise_quant", points=2)
def test_vectorwise_quant_random_float16(learner):
    for seed, shape in enumerate([(9, 64), (40, 576)], start=10):
        A = activations(*shape, outlier_cols=[3, 17], seed=seed, dtype=torch.float16)
        check_vectorwise(
            learner,
            A,
            0.0,
            f"int8_vectorwise_quant(random float16 A of shape {shape})",
            PLAIN_MISTAKES + ("computed in float16",),
        )


@graded("02.int8_vectorwise_quant", points=2)
def test_vectorwise_quant_ties_round_half_to_even(learner):
    for dtype in (torch.float32, torch.float16):
        A = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, 63.5, -0.5, 100.5]], dtype=dtype)
        mistakes = ("round half away from zero instead of half to even (torch.round)", "floor instead of round")
        call = f"int8_vectorwise_quant({name_of(dtype)} A with ties, absmax 127)"
        check_vectorwise(learner, A, 0.0, call, mistakes, near_ties=False)


@graded("02.int8_vectorwise_quant", points=2)
def test_vectorwise_quant_zero_and_constant_rows(learner):
    A = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [-3.0, -3.0, -3.0], [0.0, -1e-3, 0.0]])
    check_vectorwise(learner, A, 0.0, "int8_vectorwise_quant(A with a zero row and constant rows)", PLAIN_MISTAKES)
    check_vectorwise(learner, torch.zeros(3, 5, dtype=torch.float16), 0.0, "int8_vectorwise_quant(all-zero float16 A)")


@graded("02.int8_vectorwise_quant", points=3)
def test_vectorwise_quant_outliers_fixed(learner):
    A = torch.tensor([[8.0, 1.0, -0.5], [2.0, 0.5, 0.25], [9.0, 7.0, 0.0]])
    for dtype in (torch.float32, torch.float16):
        call = f"int8_vectorwise_quant({name_of(dtype)} A, threshold=6.0)"
        check_vectorwise(learner, A.to(dtype), 6.0, call, OUTLIER_MISTAKES)
    B = torch.tensor([[0.5, -6.0, 1.0, 2.0], [1.0, 3.0, -2.0, 0.25], [-0.5, 0.0, 7.5, -1.0]])
    check_vectorwise(learner, B, 6.0, "int8_vectorwise_quant(A, threshold=6.0)", OUTLIER_MISTAKES)


@graded("02.int8_vectorwise_quant", points=4)
def test_vectorwise_quant_outliers_random(learner):
    cases = [((64, 96), 6.0, torch.float32), ((33, 576), 6.0, torch.float16), ((64, 200), 3.0, torch.float32),
             ((16, 128), 1.5, torch.float16), ((24, 1536), 6.0, torch.float32)]  # fmt: skip
    for seed, (shape, threshold, dtype) in enumerate(cases, start=20):
        A = activations(*shape, outlier_cols=range(seed % 5, shape[1], 11), seed=seed, dtype=dtype, zero_row=True)
        call = f"int8_vectorwise_quant(random {name_of(dtype)} A of shape {shape}, threshold={threshold})"
        check_vectorwise(learner, A, threshold, call, OUTLIER_MISTAKES)


@graded("02.int8_vectorwise_quant", points=2)
def test_vectorwise_quant_outlier_edges(learner):
    at_threshold = torch.tensor([[6.0, 1.0, 2.0], [1.0, -5.5, 3.0], [-1.0, 2.0, -6.0]])
    for dtype in (torch.float32, torch.float16):
        check_vectorwise(
            learner,
            at_threshold.to(dtype),
            6.0,
            f"int8_vectorwise_quant({name_of(dtype)} A with |x| = 6.0 exactly, threshold=6.0)",
            OUTLIER_MISTAKES,
        )
    quiet = activations(8, 32, seed=30).clamp(-5.9, 5.9)
    check_vectorwise(
        learner,
        quiet,
        6.0,
        "int8_vectorwise_quant(A without outliers, threshold=6.0): empty outlier_cols",
        OUTLIER_MISTAKES,
    )
    every_column = torch.tensor([[7.0, 0.5, -9.0], [1.0, -8.0, 2.0]])
    check_vectorwise(
        learner,
        every_column,
        6.0,
        "int8_vectorwise_quant(A whose every column is an outlier column, threshold=6.0)",
        OUTLIER_MISTAKES,
    )
    all_outliers = torch.full((2, 3), -10.0)
    check_vectorwise(
        learner,
        all_outliers,
        6.0,
        "int8_vectorwise_quant(A whose every value is an outlier, threshold=6.0)",
        OUTLIER_MISTAKES,
    )


@graded("02.int8_vectorwise_quant", points=2)
def test_vectorwise_quant_bad_input(learner):
    cases = [  # (A, threshold, error, call, why)
        (torch.ones(2, 3, 4), 0.0, ValueError, "int8_vectorwise_quant(A of shape (2, 3, 4))", "A must be a matrix"),
        (torch.ones(2, 3), -1.0, ValueError, "int8_vectorwise_quant(A, threshold=-1.0)", "the threshold must be >= 0"),
        (
            torch.ones(2, 3, dtype=torch.int32),
            0.0,
            TypeError,
            "int8_vectorwise_quant(int32 A)",
            "only floats are quantized",
        ),
    ]
    for A, threshold, error, call, why in cases:
        expect_raises(lambda A=A, t=threshold: learner.int8_vectorwise_quant(A, t), (error,), call=call, why=why)


# -- 02.int8_vectorwise_dequant (6 points) -----------------------------------------------------


def check_dequant(learner, codes, absmax, call):
    expect_diagnosed(
        expect_close, learner.int8_vectorwise_dequant(codes, absmax), ref.int8_vectorwise_dequant(codes, absmax),
        lambda: dequant_mistakes(codes, absmax), call=call, inputs={"codes": codes, "row_absmax": absmax}, **FP32,
    )  # fmt: skip


@graded("02.int8_vectorwise_dequant", points=2)
def test_vectorwise_dequant_fixed(learner):
    square = torch.tensor([[127, -127], [50, 10]], dtype=torch.int8)
    check_dequant(
        learner, square, torch.tensor([1.0, 3.0]), "int8_vectorwise_dequant(2x2 codes, row_absmax=[1.0, 3.0])"
    )
    codes = torch.tensor([[127, -64, 0], [1, 2, 3]], dtype=torch.int8)
    check_dequant(learner, codes, torch.tensor([2.0, 0.5]), "int8_vectorwise_dequant(codes, row_absmax=[2.0, 0.5])")


@graded("02.int8_vectorwise_dequant", points=2)
def test_vectorwise_dequant_random(learner):
    for seed, shape in enumerate([(1, 5), (33, 576), (64, 64)]):
        codes = random_codes(*shape, seed=seed)
        absmax = torch.rand(shape[0], generator=generator(seed)) * 50
        check_dequant(learner, codes, absmax, f"int8_vectorwise_dequant(random codes of shape {shape})")
    A = activations(20, 100, outlier_cols=[4], seed=5, dtype=torch.float16)
    codes, absmax, _ = ref.int8_vectorwise_quant(A)
    check_dequant(learner, codes, absmax, "int8_vectorwise_dequant(*int8_vectorwise_quant(float16 A)[:2])")


@graded("02.int8_vectorwise_dequant", points=2)
def test_vectorwise_dequant_edges(learner):
    codes = torch.zeros(3, 4, dtype=torch.int8)
    codes[1] = torch.tensor([127, -127, 1, -1], dtype=torch.int8)
    check_dequant(
        learner,
        codes,
        torch.tensor([0.0, 127.0, 0.0]),
        "int8_vectorwise_dequant(codes with zero rows, row_absmax with zeros)",
    )
    check_dequant(
        learner,
        random_codes(6, 6, seed=7, low=-128),
        torch.rand(6, generator=generator(7)) + 0.5,
        "int8_vectorwise_dequant(6x6 codes including -128)",
    )


# -- 02.int8_tensorwise_quant (8 points) -------------------------------------------------------


def check_tensorwise(learner, A, call, near_ties=True):
    expected = ref.int8_tensorwise_quant(A)
    got = unpack(learner.int8_tensorwise_quant(A), 2, call)
    variants = lazily(lambda: tensorwise_mistakes(A))
    inputs = {"A": A}
    expect_diagnosed(
        expect_equal,
        got[1],
        expected[1],
        pick(variants, 1),
        call=f"{call}[1] (absmax, one copy per row)",
        inputs=inputs,
    )
    scaled = exact_scaled(A, A.abs().amax().float().reshape(1, 1))
    expect_codes(
        got[0],
        expected[0],
        scaled,
        call=f"{call}[0] (codes)",
        inputs=inputs,
        mistakes=pick(variants, 0),
        near_ties=near_ties,
    )


@graded("02.int8_tensorwise_quant", points=2)
def test_tensorwise_quant_fixed(learner):
    check_tensorwise(learner, torch.tensor([[1.0, -2.0, 0.5], [0.1, 4.0, -0.3]]), "int8_tensorwise_quant(2x3 A)")
    check_tensorwise(
        learner,
        torch.tensor([[-8.0, 3.0], [2.0, 1.0], [0.2, -0.1]]),
        "int8_tensorwise_quant(3x2 A, largest |x| negative)",
    )


@graded("02.int8_tensorwise_quant", points=3)
def test_tensorwise_quant_random(learner):
    for seed, (shape, dtype, cols) in enumerate(
        [((2, 7), torch.float32, ()), ((33, 576), torch.float32, (5, 100)), ((12, 1536), torch.float16, (7,))]
    ):
        A = activations(*shape, outlier_cols=cols, seed=seed, dtype=dtype)
        check_tensorwise(learner, A, f"int8_tensorwise_quant(random {name_of(dtype)} A of shape {shape})")


@graded("02.int8_tensorwise_quant", points=2)
def test_tensorwise_quant_edges(learner):
    check_tensorwise(learner, torch.zeros(3, 4), "int8_tensorwise_quant(all-zero A)")
    check_tensorwise(learner, torch.full((2, 2), -0.75), "int8_tensorwise_quant(constant negative A)")
    ties = torch.tensor([[127.0, 0.5, 1.5], [2.5, -2.5, 63.5]])
    check_tensorwise(
        learner, ties, "int8_tensorwise_quant(A with ties, absmax 127: round half to even)", near_ties=False
    )


@graded("02.int8_tensorwise_quant", points=1)
def test_tensorwise_quant_bad_input(learner):
    expect_raises(
        lambda: learner.int8_tensorwise_quant(torch.ones(5)),
        (ValueError,),
        call="int8_tensorwise_quant(A of shape (5,))",
        why="A must be a matrix [rows, cols]",
    )
    expect_raises(
        lambda: learner.int8_tensorwise_quant(torch.ones(2, 2, dtype=torch.int8)),
        (TypeError,),
        call="int8_tensorwise_quant(int8 A)",
        why="only float tensors are quantized",
    )


# -- 02.int8_matmul (10 points) ----------------------------------------------------------------


def check_matmul(learner, A, B, call):
    """Any exact result passes here (int32, int64, integer-valued float64)."""
    got = learner.int8_matmul(A, B)
    expected = ref.int8_matmul(A, B)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        same_kind(got, expected, call)
    values, exact = got.double(), (A.long() @ B.long().t()).double()
    if bool(torch.isfinite(values).all()) and torch.equal(values, values.round()):
        values, exact = values.long(), exact.long()  # integers, shown in full in the feedback
    expect_diagnosed(
        expect_equal, values, exact, lambda: {k: v.to(exact.dtype) for k, v in matmul_mistakes(A, B).items()},
        call=call, inputs={"A_int8": A, "B_int8": B},
    )  # fmt: skip


@graded("02.int8_matmul", points=2)
def test_int8_matmul_fixed(learner):
    A = torch.tensor([[1, -2, 3], [-128, 127, 0]], dtype=torch.int8)
    B = torch.tensor([[4, 5, -6], [1, 1, 1], [-128, -128, -128], [0, 2, 0]], dtype=torch.int8)
    check_matmul(learner, A, B, "int8_matmul(2x3 A_int8, 4x3 B_int8)")
    check_matmul(learner, B, B, "int8_matmul(B_int8, B_int8)")


@graded("02.int8_matmul", points=3)
def test_int8_matmul_random(learner):
    for M, K, N in [(1, 3, 5), (17, 576, 192), (32, 1536, 256), (8, 3000, 40)]:
        g = generator(K)
        A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
        B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        check_matmul(learner, A, B, f"int8_matmul(random A_int8 [{M}, {K}], B_int8 [{N}, {K}])")


def all_127(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every dot product is 16129 (K - 1) + 2: above 2^24 and odd for K = 1536, so float32
    (whose integers above 2^24 are even) cannot hold it."""
    A = torch.full((2, K), 127, dtype=torch.int8)
    B = torch.full((3, K), 127, dtype=torch.int8)
    A[:, -1], B[:, -1] = 1, 2
    return A, B


@graded("02.int8_matmul", points=3)
def test_int8_matmul_exact_for_large_sums(learner):
    for K in (1536, 3000):
        A, B = all_127(K)
        check_matmul(learner, A, B, f"int8_matmul(A_int8, B_int8) with K = {K} and every code 127: sums above 2^24")
    A = torch.full((4, 2048), -128, dtype=torch.int8)
    check_matmul(learner, A, A, "int8_matmul(A_int8, A_int8) with K = 2048 and every code -128: sums of 2^25")


@graded("02.int8_matmul", points=1)
def test_int8_matmul_returns_int32(learner):
    A, B = random_codes(3, 8, seed=1), random_codes(5, 8, seed=2)
    expect_equal(
        learner.int8_matmul(A, B),
        ref.int8_matmul(A, B),
        call="int8_matmul(A_int8, B_int8) (should return int32, like torch._int_mm)",
    )


@graded("02.int8_matmul", points=1)
def test_int8_matmul_bad_input(learner):
    A, B = random_codes(3, 8, seed=1), random_codes(5, 8, seed=2)
    expect_raises(
        lambda: learner.int8_matmul(A.float(), B),
        (TypeError,),
        call="int8_matmul(float32 A, int8 B)",
        why="both operands must be int8 matrices",
    )
    expect_raises(
        lambda: learner.int8_matmul(A, random_codes(5, 9, seed=3)),
        (ValueError,),
        call="int8_matmul(A_int8 [3, 8], B_int8 [5, 9])",
        why="the inner dimensions differ",
    )


# -- 02.int8_mm_dequant (10 points) ------------------------------------------------------------


def check_mm_dequant(learner, C, row_stats, col_stats, bias, call):
    got = (
        learner.int8_mm_dequant(C, row_stats, col_stats)
        if bias is None
        else learner.int8_mm_dequant(C, row_stats, col_stats, bias)
    )
    expect_diagnosed(
        expect_close, got, ref.int8_mm_dequant(C, row_stats, col_stats, bias),
        lambda: mm_dequant_mistakes(C, row_stats, col_stats, bias), call=call,
        inputs={"C": C, "row_stats": row_stats, "col_stats": col_stats, "bias": bias}, **FP32,
    )  # fmt: skip


@graded("02.int8_mm_dequant", points=2)
def test_mm_dequant_fixed(learner):
    C = torch.tensor([[16129, -16129, 0], [100, 2000, -30000]], dtype=torch.int32)
    check_mm_dequant(
        learner,
        C,
        torch.tensor([1.0, 2.0]),
        torch.tensor([1.0, 0.5, 3.0]),
        None,
        "int8_mm_dequant(C, row_stats=[1, 2], col_stats=[1, 0.5, 3])",
    )
    square = torch.tensor([[16129, 1000], [-5000, 7]], dtype=torch.int32)
    check_mm_dequant(
        learner,
        square,
        torch.tensor([1.0, 4.0]),
        torch.tensor([0.5, 2.0]),
        None,
        "int8_mm_dequant(2x2 C, row_stats=[1, 4], col_stats=[0.5, 2])",
    )


@graded("02.int8_mm_dequant", points=3)
def test_mm_dequant_random(learner):
    for seed, (M, N) in enumerate([(1, 5), (16, 24), (64, 576)]):
        g = generator(seed)
        C = torch.randint(-(2**22), 2**22, (M, N), dtype=torch.int32, generator=g)
        rows, cols = torch.rand(M, generator=g) * 50, torch.rand(N, generator=g) * 0.2
        check_mm_dequant(learner, C, rows, cols, None, f"int8_mm_dequant(random C [{M}, {N}])")


@graded("02.int8_mm_dequant", points=2)
def test_mm_dequant_bias(learner):
    for seed, (M, N) in enumerate([(3, 3), (16, 24)], start=5):
        g = generator(seed)
        C = torch.randint(-(2**20), 2**20, (M, N), dtype=torch.int32, generator=g)
        rows, cols, bias = torch.rand(M, generator=g) * 10, torch.rand(N, generator=g), torch.randn(N, generator=g)
        check_mm_dequant(learner, C, rows, cols, bias, f"int8_mm_dequant(random C [{M}, {N}], ..., bias)")


@graded("02.int8_mm_dequant", points=2)
def test_mm_dequant_large_sums_and_zero_stats(learner):
    C = torch.tensor([[2**30, -(2**29), 70000], [123456789, 0, -70000]], dtype=torch.int32)
    check_mm_dequant(
        learner,
        C,
        torch.tensor([1e-3, 2e-3]),
        torch.tensor([0.01, 0.02, 0.5]),
        None,
        "int8_mm_dequant(C with sums far above 65504)",
    )
    C = torch.tensor([[500, -20], [0, 0], [7, 9]], dtype=torch.int32)
    check_mm_dequant(
        learner,
        C,
        torch.tensor([3.0, 0.0, 1.0]),
        torch.tensor([0.0, 2.0]),
        None,
        "int8_mm_dequant(C, row_stats and col_stats with zeros)",
    )


@graded("02.int8_mm_dequant", points=1)
def test_mm_dequant_bad_input(learner):
    C = torch.ones(2, 3, dtype=torch.int32)
    rows, cols = torch.ones(2), torch.ones(3)
    expect_raises(
        lambda: learner.int8_mm_dequant(C.long(), rows, cols),
        (TypeError,),
        call="int8_mm_dequant(int64 C, ...)",
        why="C must be the int32 result of int8_matmul",
    )
    expect_raises(
        lambda: learner.int8_mm_dequant(C, cols, rows),
        (ValueError,),
        call="int8_mm_dequant(C [2, 3], row_stats of shape (3,), col_stats of shape (2,))",
        why="row_stats needs one value per row of C and col_stats one per column",
    )


# -- 02.int8_decomposed_matmul (16 points) -----------------------------------------------------


def check_decomposed(learner, X, W, threshold, bias, call):
    W_codes, W_absmax, _ = ref.int8_vectorwise_quant(W)
    expected = ref.int8_decomposed_matmul(X, W_codes, W_absmax, threshold, bias)
    got = unpack(learner.int8_decomposed_matmul(X, W_codes, W_absmax, threshold, bias), 2, call)
    variants = lazily(
        lambda: {name: decomposed_mistake(X, W_codes, W_absmax, threshold, bias, name) for name in DECOMPOSED_MISTAKES}
    )
    inputs = {"X": X, "W_codes": W_codes, "W_absmax": W_absmax, "threshold": threshold, "bias": bias}
    expect_diagnosed(
        expect_equal,
        got[1],
        expected[1],
        pick(variants, 1),
        call=f"{call}[1] (outlier_cols)",
        inputs=inputs,
        what="indices",
    )
    tolerance = float_tolerance(expected[0], X, ref.int8_vectorwise_dequant(W_codes, W_absmax))
    expect_diagnosed(
        expect_close, got[0], expected[0], pick(variants, 0), call=f"{call}[0] (Y)", inputs=inputs, **tolerance
    )


@graded("02.int8_decomposed_matmul", points=3)
def test_decomposed_fixed(learner):
    X = torch.tensor([[8.0, 1.0, -0.5, 0.25], [2.0, 0.5, 0.25, -1.0], [-9.0, 0.0, 1.0, 2.0]])
    W = torch.tensor([[0.1, -0.2, 0.3, 0.05], [-0.4, 0.1, 0.0, 0.2]])
    check_decomposed(
        learner, X, W, 6.0, None, "int8_decomposed_matmul(X with an outlier column, W_codes, W_absmax, 6.0)"
    )
    check_decomposed(learner, X, W, 1.5, None, "int8_decomposed_matmul(X, W_codes, W_absmax, 1.5)")


@graded("02.int8_decomposed_matmul", points=3)
def test_decomposed_without_outliers(learner):
    for seed, (M, K, N) in enumerate([(4, 16, 3), (64, 256, 32)]):
        X = activations(M, K, seed=seed).clamp(-5.9, 5.9)
        check_decomposed(
            learner,
            X,
            weights(N, K, seed),
            6.0,
            None,
            f"int8_decomposed_matmul(X [{M}, {K}] without outliers, ...): plain vector-wise int8",
        )


@graded("02.int8_decomposed_matmul", points=4)
def test_decomposed_random(learner):
    cases = [
        ((32, 576, 64), (3, 50, 400), 6.0),
        ((12, 1536, 40), tuple(range(0, 1536, 97)), 6.0),
        ((64, 200, 48), (7,), 3.0),
    ]
    for seed, ((M, K, N), cols, threshold) in enumerate(cases, start=40):
        X = activations(M, K, outlier_cols=cols, seed=seed)
        check_decomposed(
            learner,
            X,
            weights(N, K, seed),
            threshold,
            None,
            f"int8_decomposed_matmul(random X [{M}, {K}], W [{N}, {K}], threshold={threshold})",
        )


@graded("02.int8_decomposed_matmul", points=2)
def test_decomposed_float16(learner):
    X = activations(48, 576, outlier_cols=(1, 200), seed=50, dtype=torch.float16)
    W = weights(80, 576, seed=50, dtype=torch.float16)
    check_decomposed(learner, X, W, 6.0, None, "int8_decomposed_matmul(float16 X [48, 576], ...)")


@graded("02.int8_decomposed_matmul", points=2)
def test_decomposed_bias(learner):
    X = activations(32, 128, outlier_cols=(9, 64), seed=60)
    W = weights(24, 128, seed=60)
    bias = torch.randn(24, generator=generator(60))
    check_decomposed(learner, X, W, 6.0, bias, "int8_decomposed_matmul(X, W_codes, W_absmax, 6.0, bias)")


@graded("02.int8_decomposed_matmul", points=1)
def test_decomposed_edges(learner):
    W = weights(5, 4, seed=70)
    at_threshold = torch.tensor([[6.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -5.5, 3.0, 0.5]])
    check_decomposed(
        learner, at_threshold, W, 6.0, None, "int8_decomposed_matmul(X with |x| = 6.0 exactly and a zero row, ...)"
    )
    every_column = torch.tensor([[7.0, 0.5, -9.0, 6.5], [1.0, -8.0, 2.0, 0.1]])
    check_decomposed(
        learner, every_column, W, 6.0, None, "int8_decomposed_matmul(X whose every column is an outlier column, ...)"
    )


@graded("02.int8_decomposed_matmul", points=1)
def test_decomposed_bad_input(learner):
    W_codes, W_absmax, _ = ref.int8_vectorwise_quant(weights(5, 4, seed=71))
    X = activations(3, 4, seed=71)
    expect_raises(
        lambda: learner.int8_decomposed_matmul(X, W_codes, W_absmax, 0.0),
        (ValueError,),
        call="int8_decomposed_matmul(X, W_codes, W_absmax, threshold=0.0)",
        why="the decomposition needs a positive threshold",
    )
    expect_raises(
        lambda: learner.int8_decomposed_matmul(activations(3, 6, seed=71), W_codes, W_absmax),
        (ValueError,),
        call="int8_decomposed_matmul(X [3, 6], W_codes [5, 4], ...)",
        why="X must have as many columns as the weight's in_features",
    )


# -- 02.llm_int8_matmul (8 points) -------------------------------------------------------------


def check_llm_int8(learner, X, W, threshold, bias, call):
    expected = ref.llm_int8_matmul(X, W, threshold, bias)
    got = learner.llm_int8_matmul(X, W, threshold, bias)
    W_hat = ref.int8_vectorwise_dequant(*ref.int8_vectorwise_quant(W)[:2])
    expect_diagnosed(
        expect_close, got, expected, lambda: llm_int8_mistakes(X, W, threshold, bias), call=call,
        inputs={"X": X, "W": W, "threshold": threshold, "bias": bias}, **float_tolerance(expected, X, W_hat),
    )  # fmt: skip


@graded("02.llm_int8_matmul", points=3)
def test_llm_int8_random(learner):
    for seed, ((M, K, N), cols) in enumerate([((32, 576, 64), (3, 50, 400)), ((8, 1536, 32), (11, 900))], start=80):
        X = activations(M, K, outlier_cols=cols, seed=seed)
        check_llm_int8(
            learner, X, weights(N, K, seed), 6.0, None, f"llm_int8_matmul(random X [{M}, {K}], W [{N}, {K}])"
        )


@graded("02.llm_int8_matmul", points=2)
def test_llm_int8_float16_and_bias(learner):
    X = activations(32, 576, outlier_cols=(3, 50, 400), seed=90, dtype=torch.float16)
    W = weights(64, 576, seed=90, dtype=torch.float16)
    bias = torch.randn(64, generator=generator(90)).half()
    check_llm_int8(learner, X, W, 6.0, bias, "llm_int8_matmul(float16 X, float16 W, 6.0, float16 bias)")
    X = activations(16, 64, outlier_cols=(5,), seed=91)
    W = weights(8, 64, seed=91)
    check_llm_int8(learner, X, W, 6.0, torch.randn(8, generator=generator(91)), "llm_int8_matmul(X, W, 6.0, bias)")


@graded("02.llm_int8_matmul", points=2)
def test_llm_int8_threshold(learner):
    X = activations(64, 128, outlier_cols=(3, 4), seed=95)
    W = weights(16, 128, seed=95)
    for threshold in (3.0, 1.5, 100.0):
        check_llm_int8(learner, X, W, threshold, None, f"llm_int8_matmul(X, W, threshold={threshold})")


@graded("02.llm_int8_matmul", points=1)
def test_llm_int8_bad_threshold(learner):
    X, W = activations(3, 4, seed=96), weights(2, 4, seed=96)
    expect_raises(
        lambda: learner.llm_int8_matmul(X, W, 0.0),
        (ValueError,),
        call="llm_int8_matmul(X, W, threshold=0.0)",
        why="the decomposition needs a positive threshold",
    )
