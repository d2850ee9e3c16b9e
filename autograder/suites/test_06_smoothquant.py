"""Hidden suite of lab 06 (SmoothQuant W8A8).

Every case compares the learner's function with `reference_impl/smoothquant.py`. Besides random
inputs (activations with a few outlier channels, trained-looking weights), the cases use layer 2
of SmolLM2: its calibration maxima (2 windows of 256 tokens; its down_proj inputs reach |x| ~ 70),
the weights of q, k, v, a slice of up/down, the RMSNorm gains, and 64 held-out tokens of its q and
down_proj inputs. They are computed once per machine (the model loads in seconds) and kept in the
course cache (`lab06-smollm2-layer2-v1.pt`).

Case groups per function: fixed (hand-picked), randomized (seeded generators), real (SmolLM2),
edge cases (dead channels, zero tokens, empty batches, alpha 0 and 1, saturation, float64 and
bfloat16 input) and bad input, which must raise the exception type the reference raises.

Allowances, stated in the lab:
- accumulate_absmax and column_absmax: exact (a maximum is exact in any order and any dtype).
- smoothing_factors: float32 to 2e-6 relative (a power computed in float64 and rounded, or through
  exp and log, lands a few float32 steps from the reference's).
- smoothed_weights: each tensor in its own dtype, to 4 units in the last place of that dtype
  (g / s and g * (1 / s) round differently).
- fake_quant_w8a8: codes round(x * 127 / absmax) may be computed as x * (127 / absmax), as
  x / (absmax / 127) or in float64: these differ only for values within float rounding of a
  rounding tie. The random and real inputs are moved 1% of a step away from every tie (under the
  scale of the case), so every order gives the same codes; the hand-picked ties have exact
  scales (absmax 127 or 254). The float64 result is compared to 1e-6 relative plus 1e-6 of its
  largest entry (dequantizing in float32 or in float64 both pass).

Diagnosis: when an output differs, the outputs of common mistakes (no abs, the running max
replaced or summed, the max over one layer of the group, no clamp, alpha on the wrong side, the
norm multiplied instead of divided, the rows of W scaled instead of its input columns, the bias
left alone, one weight scale per tensor, activation scales per channel, 255 or 128 levels, codes
clamped to -128 or not at all, the static scale ignored, ...) are computed by the small wrong
implementations below, and the feedback names the one the learner's output matches.
"""

import json

import pytest
import torch

from quantcourse.autograder.testing import Mismatch, describe_value, expect_close, expect_raises, graded, same_kind
from quantcourse.reference_impl import smoothquant as sq

GRADED = {
    "accumulate_absmax": sq.accumulate_absmax,
    "column_absmax": sq.column_absmax,
    "smoothing_factors": sq.smoothing_factors,
    "smoothed_weights": sq.smoothed_weights,
    "fake_quant_w8a8": sq.fake_quant_w8a8,
}
# The lab spells accumulate_absmax out step by step (flatten, the empty batch, the running maximum,
# float32): an honest solution reads like the reference, so similarity says nothing.
SIMILARITY_EXEMPT = {"accumulate_absmax"}
QMAX = 127
TIE_MARGIN = 1e-3  # inputs whose code fraction lies within this of .5 are moved 1% of a step


@pytest.fixture(autouse=True)
def one_thread():
    """The suite's tensors are small: a second thread costs more than it saves on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def name_of(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_text(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"[{', '.join(map(str, x.shape))}] {name_of(x.dtype)}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(shape_text(t) for t in x) + "]"
    return repr(x)


def unpack(got, n: int, call: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise Mismatch(f"{call} should return a tuple of {n} values, got {describe_value(got)}")
    return tuple(got)


def expect_close_lazy(got, expected, *, call, rtol, atol, mistakes, what="values"):
    """expect_close, computing the outputs of the known mistakes only when the output differs."""
    try:
        expect_close(got, expected, call=call, rtol=rtol, atol=atol, what=what)
    except Mismatch:
        expect_close(got, expected, call=call, rtol=rtol, atol=atol, what=what, variants=mistakes())


def activations(tokens: int, K: int, seed: int, outliers=(1, 7), size=60.0, dtype=torch.float32) -> torch.Tensor:
    """Gaussian activations [tokens, K] with a few channels `size` times larger, like a norm's output."""
    g = generator(seed)
    x = torch.randn(tokens, K, generator=g, dtype=torch.float64)
    x[:, list(outliers)] *= size
    return x.to(dtype)


def weight(N: int, K: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Gaussian weights (std 0.05), a few 5x larger, like a trained weight matrix."""
    g = generator(seed)
    W = 0.05 * torch.randn(N, K, generator=g, dtype=torch.float64)
    return (W * torch.where(torch.rand(N, K, generator=g) < 0.02, 5.0, 1.0).double()).to(dtype)


# ---------------------------------------------------------------------------------------------
# Real data: SmolLM2's decoder layer 2


SMOLLM2_FILE = "lab06-smollm2-layer2-v1.pt"  # in quantcourse.runtime.cache_dir()
LAYER = 2
DOWN_CHANNELS = 128  # the up/down slice: down_proj's 16 largest input channels and 112 others


def model_id() -> str | None:
    """The SHA-256 of the cached reference weights, read from the cache's manifest (None if absent)."""
    from quantcourse import models

    manifest = models.reference_cache_path() / models.MANIFEST_FILE
    try:
        return json.loads(manifest.read_text())["weights"]["sha256"]
    except (OSError, ValueError, KeyError):
        return None


class _Stop(Exception):
    pass


def layer_inputs(model, windows: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """name -> every token's input [tokens, in_features] of those linear layers of decoder layer 2;
    each forward pass stops at the end of the layer."""
    seen = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0][0].detach()))
               for name in names]  # fmt: skip

    def stop(module, args, output):
        raise _Stop

    handles.append(model.model.layers[LAYER].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for window in windows:
                try:
                    model(window[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def smollm2_layer() -> dict[str, torch.Tensor]:
    """Layer 2 of SmolLM2, as the cases use it (see the module docstring). Built once per machine."""
    from quantcourse.runtime import cache_dir, exclusive_lock

    path = cache_dir() / SMOLLM2_FILE
    with exclusive_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            data = torch.load(path)
            if data["model"] == model_id():
                return data["tensors"]
        from quantcourse.corpus import token_windows
        from quantcourse.models import load_reference_model

        model, tokenizer = load_reference_model()
        torch.set_num_threads(1)
        block = f"model.layers.{LAYER}"
        names = [f"{block}.self_attn.q_proj", f"{block}.mlp.gate_proj", f"{block}.mlp.down_proj"]
        calibration = layer_inputs(model, token_windows(tokenizer, "calibration", 256, 2), names)
        heldout = layer_inputs(model, token_windows(tokenizer, "heldout", 64, 1), names)
        layer = model.model.layers[LAYER]
        attn, mlp = layer.self_attn, layer.mlp
        act_down = calibration[names[2]].abs().amax(dim=0)
        top = act_down.topk(16).indices
        others = torch.randperm(act_down.numel(), generator=generator(6))
        others = others[~torch.isin(others, top)][: DOWN_CHANNELS - 16]
        channels = torch.cat([top, others]).sort().values
        tensors = {
            "gain_attn": layer.input_layernorm.weight.detach().clone(),
            "gain_mlp": layer.post_attention_layernorm.weight.detach().clone(),
            "q": attn.q_proj.weight.detach().clone(),
            "k": attn.k_proj.weight.detach().clone(),
            "v": attn.v_proj.weight.detach().clone(),
            "act_attn": calibration[names[0]].abs().amax(dim=0),
            "act_mlp": calibration[names[1]].abs().amax(dim=0),
            "act_down": act_down,
            "w_absmax_mlp": sq.weight_absmax([mlp.gate_proj, mlp.up_proj]),
            "w_absmax_down": sq.weight_absmax([mlp.down_proj]),
            "channels": channels,
            "up_rows": mlp.up_proj.weight.detach()[channels].clone(),
            "down_cols": mlp.down_proj.weight.detach()[:96, channels].clone(),
            "down_rows": mlp.down_proj.weight.detach()[:64].clone(),
            "x_attn": heldout[names[0]],
            "x_down": heldout[names[2]],
        }
        staging = path.with_name(path.name + ".part")
        torch.save({"model": model.reference_weights_sha256, "tensors": tensors}, staging)
        staging.rename(path)
        return tensors


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_layer()


# ---------------------------------------------------------------------------------------------
# accumulate_absmax


def accumulate_mistakes(absmax: torch.Tensor, x: torch.Tensor) -> dict:
    tokens = x.reshape(-1, x.shape[-1]).float()
    old = absmax.float()
    batch = tokens.abs().amax(dim=0)
    mistakes = {
        "the signed max (no abs): a channel whose largest value is negative, like -40, must count as 40": (
            torch.maximum(old, tokens.amax(dim=0))),
        "absmax replaced by this batch's max: a running max keeps the larger of the old maxima and the batch's": batch,
        "the old maxima added to the batch's (absmax + max|x|): a running max keeps the larger of the two": old + batch,
        "mean |x| over the tokens instead of the max": torch.maximum(old, tokens.abs().mean(dim=0)),
        "the smaller of the two kept (torch.minimum) instead of the larger": torch.minimum(old, batch),
    }  # fmt: skip
    if x.dim() == 3:
        mistakes["only the first sequence of a batch [batch, length, K] counted: flatten every leading dimension"] = (
            torch.maximum(old, x[0].abs().amax(dim=0).float()))  # fmt: skip
    return mistakes


def check_accumulate(learner, absmax, x, what=""):
    """One call from the state absmax; returns the learner's answer for the next call."""
    call = f"accumulate_absmax(absmax {shape_text(absmax)}, x {shape_text(x)}){what}"
    expected = sq.accumulate_absmax(absmax, x)
    got = learner.accumulate_absmax(absmax, x)
    if isinstance(got, torch.Tensor) and got.shape != expected.shape and x.dim() >= 2:
        if got.shape == x.shape[:-1] or got.shape == (x.reshape(-1, x.shape[-1]).shape[0],):
            raise Mismatch(f"{call} returned shape {tuple(got.shape)}: one max per token. Reduce over the tokens, "
                           f"one max per channel j, shape ({x.shape[-1]},)")  # fmt: skip
        if x.dim() == 3 and got.shape == x.shape[1:]:
            raise Mismatch(f"{call} returned shape {tuple(got.shape)}: reduced over the first dimension only; "
                           "flatten every leading dimension first, x.reshape(-1, K)")  # fmt: skip
    same_kind(got, expected, call)
    expect_close_lazy(got, expected, call=call, rtol=0, atol=0, mistakes=lambda: accumulate_mistakes(absmax, x))
    return got


def check_stream(learner, K, batches, what=""):
    absmax = torch.zeros(K)
    for i, x in enumerate(batches):
        absmax = check_accumulate(learner, absmax, x, f"{what} (batch {i + 1} of {len(batches)})")
    return absmax


@graded("06.accumulate_absmax", points=3)
def test_accumulate_fixed(learner):
    x = torch.tensor([[0.5, -3.0, 1.0, 0.0], [-2.0, 1.0, 0.25, 0.0], [1.5, 2.0, -0.75, 0.0]])
    got = check_stream(learner, 4, [x], " (three tokens, from zeros)")
    if got.tolist() != [2.0, 3.0, 1.0, 0.0]:
        raise Mismatch(f"max |x| per channel of these three tokens is [2, 3, 1, 0], got {got.tolist()}")
    check_accumulate(learner, torch.tensor([4.0, 1.0, 0.5, 0.0]), x, " (some old maxima are larger, some smaller)")
    check_accumulate(learner, torch.zeros(4), x[1], " (one token [K])")


@graded("06.accumulate_absmax", points=4)
def test_accumulate_batches(learner):
    X = activations(300, 48, seed=10, outliers=(3, 20, 41))
    X[:, 20] = -X[:, 20].abs()  # an outlier channel that is always negative
    batches = [X[:1], X[1:40], X[40:100].reshape(4, 15, 48), X[100:]]
    got = check_stream(learner, 48, batches, " (batches of 1, 39, 4 x 15 and 200 tokens)")
    if not torch.equal(got, X.abs().amax(dim=0)):
        raise Mismatch("after all batches absmax must be max |x_j| over all 300 tokens, whatever the batches")
    Y = activations(2 * 64, 96, seed=11, outliers=(0, 95), size=400.0).reshape(2, 64, 96)
    check_stream(learner, 96, [Y, 0.5 * Y, 2 * Y[1:]], " (sequences [batch, length, K])")


@graded("06.accumulate_absmax", points=3)
def test_accumulate_dtypes(learner):
    x = activations(64, 32, seed=12)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        check_accumulate(learner, torch.zeros(32), x.to(dtype), f" (x in {name_of(dtype)}: absmax stays float32)")
    check_accumulate(learner, torch.rand(32, generator=generator(13), dtype=torch.float64) * 50, x,
                     " (absmax given in float64: the result is float32)")  # fmt: skip


@graded("06.accumulate_absmax", points=2)
def test_accumulate_edge_cases(learner):
    old = torch.tensor([1.0, 0.0, 7.5])
    check_accumulate(learner, old, torch.zeros(0, 3), " (a batch with no tokens)")
    check_accumulate(learner, old, torch.zeros(5, 3), " (all-zero tokens)")
    check_accumulate(learner, old, torch.full((2, 4, 3), -7.5), " (ties with the old maximum, negative values)")


@graded("06.accumulate_absmax", points=2)
def test_accumulate_refuses_bad_input(learner):
    cases = [
        ((torch.zeros(4), torch.ones(3, 5)), ValueError, "x has 5 channels but absmax has 4"),
        ((torch.zeros(4), torch.tensor([[1.0, float("nan"), 0.0, 2.0]])), ValueError, "x holds NaN: the maxima would be NaN"),
        ((torch.zeros(4), torch.ones(3, 4, dtype=torch.int32)), TypeError, "x must be a float tensor"),
        ((torch.zeros(2, 4), torch.ones(3, 4)), TypeError, "absmax must be a float vector [K]"),
    ]
    for args, error, why in cases:
        call = f"accumulate_absmax(absmax {shape_text(args[0])}, x {shape_text(args[1])})"
        expect_raises(lambda args=args: learner.accumulate_absmax(*args), (error,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# column_absmax


def column_mistakes(weights) -> dict:
    stacked = torch.stack([W.abs().amax(dim=0).float() for W in weights])
    clamp = sq.SCALE_MIN
    mistakes = {
        "the max over the first layer only (q_proj alone): take it over every layer that reads the input": (
            weights[0].abs().amax(dim=0).float().clamp(min=clamp)),
        "no clamp: a column that is zero in every layer must give 1e-5, not 0 (s would divide by zero)": stacked.amax(dim=0),
        "the signed max (no abs)": torch.stack([W.amax(dim=0).float() for W in weights]).amax(dim=0).clamp(min=clamp),
        "the column maxima of the layers summed: take the largest": stacked.sum(dim=0).clamp(min=clamp),
        "the column maxima of the layers averaged: take the largest": stacked.mean(dim=0).clamp(min=clamp),
        "the max of the last layer only: take it over every layer": weights[-1].abs().amax(dim=0).float().clamp(min=clamp),
    }  # fmt: skip
    if all(W.shape[0] == W.shape[1] for W in weights):
        mistakes["the max over each output row (dim=1) instead of each input column j (dim=0)"] = (
            torch.stack([W.abs().amax(dim=1).float() for W in weights]).amax(dim=0).clamp(min=clamp))  # fmt: skip
    return mistakes


def check_columns(learner, weights, what=""):
    call = f"column_absmax({shape_text(weights)}){what}"
    expected = sq.column_absmax(weights)
    got = learner.column_absmax(weights)
    if isinstance(got, torch.Tensor) and got.shape != expected.shape and got.shape == (weights[0].shape[0],):
        raise Mismatch(f"{call} returned shape {tuple(got.shape)}: one max per output row. Take one per input column j "
                       f"(dim 0 of W [N, K]), shape ({expected.shape[0]},)")  # fmt: skip
    same_kind(got, expected, call)
    expect_close_lazy(got, expected, call=call, rtol=0, atol=0, mistakes=lambda: column_mistakes(weights))
    return got


@graded("06.column_absmax", points=3)
def test_columns_fixed(learner):
    q = torch.tensor([[0.5, -0.1, 0.0], [-0.2, 0.3, 0.0]])
    k = torch.tensor([[0.1, -0.9, 0.0]])
    got = check_columns(learner, [q, k], " (two layers; column 1's max is in the second)")
    if got.tolist() != pytest.approx([0.5, 0.9, 1e-5]):
        raise Mismatch(f"the column maxima over both layers are [0.5, 0.9, 1e-5] (column 2 is zero: clamped), got {got.tolist()}")
    check_columns(learner, [q], " (one layer)")
    check_columns(learner, (k, q), " (a tuple of weights)")


@graded("06.column_absmax", points=3)
def test_columns_randomized(learner):
    check_columns(learner, [weight(32, 32, seed=25, dtype=torch.float64), weight(32, 32, seed=26, dtype=torch.float64)],
                  " (two square float64 weights: the maxima are float32)")  # fmt: skip
    q, k, v = weight(48, 48, seed=20), weight(16, 48, seed=21), weight(16, 48, seed=22)
    k[3, 5], v[9, 30] = 2.0, -3.0  # the largest values of columns 5 and 30 sit in k and v
    check_columns(learner, [q, k, v], " (q, k, v: 48, 16 and 16 rows)")
    check_columns(learner, [weight(64, 24, seed=23), weight(64, 24, seed=24)], " (gate and up)")


@graded("06.column_absmax", points=2)
def test_columns_real_layer(learner, smollm2):
    check_columns(learner, [smollm2["q"], smollm2["k"], smollm2["v"]], " (SmolLM2 layer 2: q, k, v)")


@graded("06.column_absmax", points=1)
def test_columns_dead_columns(learner):
    a, b = weight(8, 6, seed=27), weight(4, 6, seed=28)
    a[:, 2], b[:, 2], b[:, 4] = 0, 0, 0  # column 2 dead in both layers, column 4 in one
    check_columns(learner, [a, b], " (column 2 zero in both layers, column 4 in one)")
    check_columns(learner, [torch.full((3, 3), 1e-7)], " (every value below the clamp)")


@graded("06.column_absmax", points=1)
def test_columns_refuse_bad_input(learner):
    cases = [
        ([], TypeError, "an empty list has no columns"),
        ([torch.ones(3, 4), torch.ones(2, 5)], ValueError, "the layers read 4 and 5 channels: one smoothing group reads one input"),
        ([torch.ones(4)], TypeError, "a weight is a matrix [N, K]"),
    ]
    for weights, error, why in cases:
        expect_raises(lambda weights=weights: learner.column_absmax(weights), (error,), call=f"column_absmax({shape_text(weights)})", why=why)


# ---------------------------------------------------------------------------------------------
# smoothing_factors


def factor_mistakes(act, w, alpha) -> dict:
    a, b = act.double(), w.double()
    floor = sq.SCALE_MIN

    def clamped(s):
        return s.clamp(min=floor).float()

    return {
        "alpha on the wrong side: max|W_j|^alpha / max|X_j|^(1 - alpha); s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)": (
            clamped(b**alpha / a.clamp(min=1e-30) ** (1 - alpha))),
        "the exponents swapped: max|X_j|^(1 - alpha) / max|W_j|^alpha": clamped(a ** (1 - alpha) / b**alpha),
        "the inverse, 1 / s: max|W_j|^(1 - alpha) / max|X_j|^alpha": clamped(b ** (1 - alpha) / a.clamp(min=1e-30) ** alpha),
        "a product, max|X_j|^alpha * max|W_j|^(1 - alpha), instead of the quotient": clamped(a**alpha * b ** (1 - alpha)),
        "no clamp: a channel never active in calibration gets s = 0, and the norm then divides by 0; clamp s to >= 1e-5": (
            (a**alpha / b ** (1 - alpha)).float()),
        "max|X_j| clamped to 1e-5 instead of s": clamped(a.clamp(min=floor) ** alpha / b ** (1 - alpha)),
        "the same exponent for both: (max|X_j| / max|W_j|)^alpha": clamped((a / b) ** alpha),
    }  # fmt: skip


def check_factors(learner, act, w, alpha, what=""):
    call = f"smoothing_factors(act_absmax {shape_text(act)}, w_absmax {shape_text(w)}, alpha={alpha}){what}"
    expected = sq.smoothing_factors(act, w, alpha)
    got = learner.smoothing_factors(act, w, alpha)
    same_kind(got, expected, call)
    expect_close_lazy(got, expected, call=call, rtol=2e-6, atol=0, mistakes=lambda: factor_mistakes(act, w, alpha))
    return got


@graded("06.smoothing_factors", points=4)
def test_factors_fixed(learner):
    act = torch.tensor([4.0, 100.0, 1.0, 0.25])
    w = torch.tensor([1.0, 0.25, 4.0, 0.25])
    got = check_factors(learner, act, w, 0.5, " (alpha 0.5: s = sqrt(max|X| / max|W|))")
    if not torch.allclose(got, torch.tensor([2.0, 20.0, 0.5, 1.0])):
        raise Mismatch(f"at alpha 0.5, s = sqrt(max|X_j| / max|W_j|) = [2, 20, 0.5, 1], got {got.tolist()}")
    check_factors(learner, act, w, 0.85, " (alpha 0.85)")
    check_factors(learner, act, w, 0.25, " (alpha 0.25)")


@graded("06.smoothing_factors", points=4)
def test_factors_randomized(learner):
    g = generator(30)
    act = torch.rand(64, generator=g) * 3
    act[[5, 40, 41]] = torch.tensor([80.0, 250.0, 35.0])
    w = (torch.rand(64, generator=g) * 0.3 + 0.01).clamp(min=sq.SCALE_MIN)
    for alpha in (0.3, 0.5, 0.75, 0.85):
        check_factors(learner, act, w, alpha)
    check_factors(learner, act.double(), w.double(), 0.6, " (float64 maxima: s is float32)")


@graded("06.smoothing_factors", points=3)
def test_factors_real_layer(learner, smollm2):
    w_attn = sq.column_absmax([smollm2["q"], smollm2["k"], smollm2["v"]])
    check_factors(learner, smollm2["act_attn"], w_attn, 0.85, " (SmolLM2 layer 2: q, k, v)")
    check_factors(learner, smollm2["act_mlp"], smollm2["w_absmax_mlp"], 0.5, " (SmolLM2 layer 2: gate, up)")
    check_factors(learner, smollm2["act_down"], smollm2["w_absmax_down"], 0.85, " (SmolLM2 layer 2: down_proj's inputs)")


@graded("06.smoothing_factors", points=3)
def test_factors_limits(learner):
    act = torch.tensor([3.0, 60.0, 0.5, 8.0])
    w = torch.tensor([0.2, 0.05, 0.4, 1e-5])
    s1 = check_factors(learner, act, w, 1.0, " (alpha 1: s = max|X_j|)")
    s0 = check_factors(learner, act, w, 0.0, " (alpha 0: s = 1 / max|W_j|)")
    if not torch.allclose(act / s1, torch.ones(4)):
        raise Mismatch("at alpha = 1 every smoothed activation maximum max|X_j| / s_j must be 1")
    if not torch.allclose(w * s0, torch.ones(4)):
        raise Mismatch("at alpha = 0 every smoothed weight maximum max|W_j| * s_j must be 1")
    s = check_factors(learner, act, w, 0.5, " (alpha 0.5)")
    if not torch.allclose(act / s, w * s, rtol=1e-5):
        raise Mismatch("at alpha = 0.5 the smoothed maxima max|X_j| / s_j and max|W_j| * s_j must be equal")


@graded("06.smoothing_factors", points=1)
def test_factors_dead_channels(learner):
    act = torch.tensor([0.0, 1e-12, 5.0, 0.0])
    w = torch.tensor([0.5, 0.5, 0.5, 1e-5])
    for alpha in (0.5, 0.85):
        check_factors(learner, act, w, alpha, " (channels 0 and 3 never active, channel 1 nearly)")
    check_factors(learner, act, w, 0.0, " (alpha 0: 0^0 = 1, so s = 1 / max|W_j| even for a dead channel)")


@graded("06.smoothing_factors", points=1)
def test_factors_refuse_bad_input(learner):
    ones = torch.ones(3)
    cases = [
        ((ones, ones, 1.5), "alpha is a share, from 0 to 1"),
        ((ones, ones, -0.1), "alpha is a share, from 0 to 1"),
        ((ones, ones, float("nan")), "alpha is NaN"),
        ((ones, torch.ones(4), 0.5), "the maxima cover 3 and 4 channels"),
        ((torch.tensor([1.0, -1.0, 2.0]), ones, 0.5), "a maximum of |x| cannot be negative"),
        ((torch.tensor([1.0, float("inf"), 2.0]), ones, 0.5), "max|X_j| is infinite"),
    ]
    for args, why in cases:
        call = f"smoothing_factors({shape_text(args[0])}, {shape_text(args[1])}, alpha={args[2]})"
        expect_raises(lambda args=args: learner.smoothing_factors(*args), (ValueError,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# smoothed_weights


def fold_mistakes(previous_weight, previous_bias, weights, s) -> dict:
    def fold(prev_op=torch.div, bias_op=torch.div, weight_op=torch.mul, rows=False, prev_columns=False, first_only=False):
        d = s.to(previous_weight.dtype)
        if previous_weight.dim() == 2:
            prev = prev_op(previous_weight, d[None, :] if prev_columns else d[:, None])
        else:
            prev = prev_op(previous_weight, d)
        bias = None if previous_bias is None else bias_op(previous_bias, s.to(previous_bias.dtype))
        out = []
        for i, W in enumerate(weights):
            f = s.to(W.dtype)
            out.append(W if first_only and i else weight_op(W, f[:, None] if rows else f[None, :]))
        return prev, bias, out

    def keep(a, b):
        return a  # the operation that leaves its first argument alone
    mistakes = {
        "the op before multiplied by s instead of divided (its output must become X / s)": fold(prev_op=torch.mul),
        "the readers' weights divided by s instead of multiplied (W[:, j] * s_j compensates X_j / s_j)": fold(weight_op=torch.div),
        "s and 1 / s swapped everywhere: the op before multiplied, the weights divided": fold(prev_op=torch.mul, weight_op=torch.div),
        "the op before left unchanged": fold(prev_op=keep),
        "only the first reader scaled: every layer that reads the input needs W[:, j] * s_j": fold(first_only=True),
    }  # fmt: skip
    if previous_bias is not None:
        mistakes["the bias of the op before left unchanged: b_j must be divided by s_j too"] = fold(bias_op=keep)
        mistakes["the bias multiplied by s instead of divided"] = fold(bias_op=torch.mul)
    if all(W.shape[0] == W.shape[1] for W in weights):
        mistakes["the readers' rows (output channels) scaled, W * s[:, None]: s belongs to the input columns, W * s[None, :]"] = fold(rows=True)
    if previous_weight.dim() == 2 and previous_weight.shape[0] == previous_weight.shape[1]:
        mistakes["the previous Linear's columns divided (W_prev / s[None, :]): divide its rows, the outputs it produces"] = fold(prev_columns=True)
    return mistakes


def check_fold(learner, previous_weight, previous_bias, weights, s, what=""):
    call = (f"smoothed_weights({shape_text(previous_weight)}, {shape_text(previous_bias)}, {shape_text(weights)}, "
            f"s {shape_text(s)}){what}")  # fmt: skip
    expected = sq.smoothed_weights(previous_weight, previous_bias, weights, s)
    got = unpack(learner.smoothed_weights(previous_weight, previous_bias, weights, s), 3, call)
    if expected[1] is None and got[1] is not None:
        raise Mismatch(f"{call}: previous_bias should be None (there is no bias), got {describe_value(got[1])}")
    if not isinstance(got[2], (list, tuple)) or len(got[2]) != len(weights):
        raise Mismatch(f"{call}: weights should be a list of {len(weights)} tensors, one per reader, got {describe_value(got[2])}")
    parts = [("previous_weight", got[0], expected[0], lambda v: v[0])]
    if expected[1] is not None:
        parts.append(("previous_bias", got[1], expected[1], lambda v: v[1]))
    parts += [(f"weights[{i}]", g, e, lambda v, i=i: v[2][i]) for i, (g, e) in enumerate(zip(got[2], expected[2]))]
    for label, g, e, _ in parts:
        same_kind(g, e, f"{call}: {label}")

    def tolerance(t):
        return 4 * torch.finfo(t.dtype).eps

    def close(g, e):
        return isinstance(g, torch.Tensor) and g.shape == e.shape and bool(torch.isclose(g.double(), e.double(), rtol=tolerance(e), atol=0).all())

    if all(close(g, e) for _, g, e, _ in parts):
        return got
    mistakes = fold_mistakes(previous_weight, previous_bias, weights, s)
    # a mistake is named where it explains every part the learner returned, else part by part
    whole = [name for name, v in mistakes.items() if all(close(g, pick(v)) for _, g, _, pick in parts)]
    named = {whole[0]: mistakes[whole[0]]} if whole else mistakes
    for label, g, e, pick in parts:
        expect_close(g, e, call=f"{call}: {label}", rtol=tolerance(e), atol=0, variants={n: pick(v) for n, v in named.items()})
    return got


def factors(K: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.exp(torch.randn(K, generator=generator(seed), dtype=torch.float64) * 1.5).to(dtype)


@graded("06.smoothed_weights", points=4)
def test_fold_fixed(learner):
    g = torch.tensor([1.0, 0.5, 2.0, -1.0])
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, -1.0, 0.0], [2.0, 1.0, 0.0, -2.0]])
    k = torch.tensor([[0.25, -0.5, 1.0, 2.0]])
    s = torch.tensor([2.0, 0.5, 1.0, 4.0])
    check_fold(learner, g, None, [q], s, " (a norm's gain, one reader [4, 4])")
    got = check_fold(learner, g, None, [q, k], s, " (a norm's gain, two readers)")
    if got[0].tolist() != [0.5, 1.0, 2.0, -0.25]:
        raise Mismatch(f"the gain divided by s is [0.5, 1, 2, -0.25], got {got[0].tolist()}")
    check_fold(learner, g, torch.tensor([0.1, -0.2, 0.0, 0.8]), [k], s, " (a LayerNorm with a bias)")


@graded("06.smoothed_weights", points=4)
def test_fold_keeps_the_output(learner):
    """(x * g' + b') @ W'^T = (x * g + b) @ W^T: the readers compute what they did."""
    K = 32
    x = activations(20, K, seed=40, outliers=(2, 17))
    g, b = torch.rand(K, generator=generator(41)) + 0.5, torch.randn(K, generator=generator(42)) * 0.1
    weights = [weight(K, K, seed=43), weight(8, K, seed=44), weight(8, K, seed=45)]  # q is square: rows and columns differ
    s = factors(K, seed=46)
    got = check_fold(learner, g, b, weights, s, " (a LayerNorm and three readers)")
    for i, (W, W_new) in enumerate(zip(weights, got[2])):
        before, after = (x * g + b) @ W.T, (x * got[0] + got[1]) @ W_new.T
        if not torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item()):
            raise Mismatch(f"reader {i}'s output changed after folding: the op before must output X / s and W[:, j] * s_j undo it")
    check_fold(learner, g, None, weights[1:], factors(K, seed=47), " (an RMSNorm)")


@graded("06.smoothed_weights", points=4)
def test_fold_into_a_linear(learner):
    """The course's down_proj extension: up_proj's rows divided, down_proj's columns multiplied."""
    square = weight(32, 32, seed=53)
    check_fold(learner, square, torch.randn(32, generator=generator(54)), [weight(16, 32, seed=55)], factors(32, seed=56),
               " (a square Linear with a bias before)")  # fmt: skip
    up, down = weight(48, 24, seed=50), weight(24, 48, seed=51)
    check_fold(learner, up, None, [down], factors(48, seed=52), " (up_proj [48, 24] -> down_proj)")


@graded("06.smoothed_weights", points=3)
def test_fold_real_layer(learner, smollm2):
    w = sq.column_absmax([smollm2["q"], smollm2["k"], smollm2["v"]])
    s = sq.smoothing_factors(smollm2["act_attn"], w, 0.85)
    check_fold(learner, smollm2["gain_attn"], None, [smollm2["q"], smollm2["k"], smollm2["v"]], s,
               " (SmolLM2 layer 2: input_layernorm -> q, k, v)")  # fmt: skip
    channels = smollm2["channels"]
    s = sq.smoothing_factors(smollm2["act_down"][channels], smollm2["w_absmax_down"][channels], 0.85)
    check_fold(learner, smollm2["up_rows"], None, [smollm2["down_cols"]], s,
               f" (SmolLM2 layer 2: up_proj -> down_proj, {DOWN_CHANNELS} of the 1536 channels)")  # fmt: skip


@graded("06.smoothed_weights", points=2)
def test_fold_dtypes(learner):
    K = 16
    W64 = [weight(8, K, seed=57, dtype=torch.float64)]
    check_fold(learner, torch.rand(K, generator=generator(58), dtype=torch.float64) + 0.5, None, W64, factors(K, 59),
               " (float64 parameters, float32 s: each result float64)")  # fmt: skip
    check_fold(learner, (torch.rand(K, generator=generator(60)) + 0.5).bfloat16(), None, [weight(8, K, seed=61).bfloat16()],
               factors(K, 62), " (bfloat16 parameters: cast s to bfloat16 first, the results stay bfloat16)")  # fmt: skip


@graded("06.smoothed_weights", points=1)
def test_fold_refuses_bad_input(learner):
    g, W = torch.ones(4), [torch.ones(2, 4)]
    cases = [
        ((g, None, W, torch.tensor([1.0, 0.0, 1.0, 1.0])), "s_j = 0: the op before would divide by zero"),
        ((g, None, W, torch.tensor([1.0, -2.0, 1.0, 1.0])), "a negative s_j flips the sign of channel j twice, and makes no sense as a scale"),
        ((torch.ones(3), None, W, torch.ones(4)), "the gain has 3 channels, s has 4"),
        ((g, None, [torch.ones(2, 5)], torch.ones(4)), "a reader has 5 input columns, s has 4"),
    ]  # fmt: skip
    for args, why in cases:
        call = f"smoothed_weights({shape_text(args[0])}, None, {shape_text(args[2])}, s {describe_value(args[3])})"
        expect_raises(lambda args=args: learner.smoothed_weights(*args), (ValueError,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# fake_quant_w8a8


def off_ties(A: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """A with every value whose code fraction |A| * 127 / absmax - floor(...) lies within 1e-3 of .5
    moved 1% of a step, so that every arithmetic order gives the same codes. absmax broadcasts
    against A (one per row, or one for all); the largest value of a row sits on a code."""
    absmax32 = absmax.float().double()
    t = A.double() * QMAX / torch.where(absmax32 > 0, absmax32, torch.ones_like(absmax32))
    near = ((t - t.floor()) - 0.5).abs() < TIE_MARGIN
    moved = torch.where(near, A.double() + 0.01 * absmax32 / QMAX, A.double()).to(A.dtype)
    t = moved.double() * QMAX / torch.where(absmax32 > 0, absmax32, torch.ones_like(absmax32))
    assert not (((t - t.floor()) - 0.5).abs() < TIE_MARGIN / 2).any()
    return moved


def act_absmax(x: torch.Tensor, granularity: str, input_absmax) -> torch.Tensor:
    if input_absmax is not None:
        return torch.tensor(float(input_absmax))
    return x.abs().amax(dim=1, keepdim=True) if granularity == "token" else x.abs().amax()


def tie_free(x, W, granularity="token", input_absmax=None):
    """x and W moved off the rounding ties of this case (x's after the weight, whose scale is fixed)."""
    W = off_ties(W, W.abs().amax(dim=1, keepdim=True))
    return off_ties(x, act_absmax(x, granularity, input_absmax)), W


def codes_of(A: torch.Tensor, absmax: torch.Tensor, levels=QMAX, low=-QMAX, high=QMAX, rounding=torch.round, guard=True) -> torch.Tensor:
    factor = levels / absmax.float()
    if guard:
        factor = torch.where(absmax > 0, factor, torch.zeros_like(factor))
    t = A.float() * factor
    return rounding(t) if low is None else rounding(t).clamp(low, high)


def fake_quant_with(x, W, granularity="token", input_absmax=None, mistake=None, clamp_dynamic=True):
    """The reference's arithmetic with one known mistake switched on; [M, N] float64. clamp_dynamic:
    whether the codes of the dynamic scales (the weights', and x's unless static) are clamped too,
    which matters only with a mistaken number of levels or rounding."""
    levels = {"255 levels": 255, "128 levels": 128}.get(mistake, QMAX)
    rounding = {"floor": torch.floor, "half away": lambda t: torch.sign(t) * torch.floor(t.abs() + 0.5)}.get(mistake, torch.round)
    guard = mistake != "zero guard"
    low, high = {"clamp -128": (-128, QMAX), "no clamp": (None, None)}.get(mistake, (-QMAX, QMAX))
    dynamic_low, dynamic_high = (low, high) if clamp_dynamic else (None, None)
    w_absmax = {"weight per tensor": W.abs().amax().float().expand(W.shape[0], 1),
                "weight per column": W.abs().amax(dim=0, keepdim=True).float()}.get(mistake, W.abs().amax(dim=1, keepdim=True).float())  # fmt: skip
    W_codes = codes_of(W, w_absmax, levels, dynamic_low, dynamic_high, rounding, guard)
    W_hat = W.float() if mistake == "weights not quantized" else W_codes * (w_absmax / levels)
    static = input_absmax is not None and mistake != "static ignored"
    if static:
        a = torch.tensor(float(input_absmax))
    elif mistake == "act per channel":
        a = x.abs().amax(dim=0, keepdim=True).float()
    elif granularity == "tensor" or mistake == "act per tensor":
        a = x.abs().amax().float()
    else:
        a = x.abs().amax(dim=1, keepdim=True).float()
    codes = codes_of(x, a, levels, low if static else dynamic_low, high if static else dynamic_high, rounding, guard)
    if static and mistake == "int8 wraps":
        codes = codes_of(x, a, levels, None, None, rounding).to(torch.int16).to(torch.int8).float()
    X_hat = x.float() if mistake == "activations not quantized" else codes * (a / levels)
    return X_hat.double() @ W_hat.double().T


FAKE_QUANT_MISTAKES = {
    "act per channel": "activation scales per input channel (the max over tokens, dim 0): SmoothQuant's dynamic scale is "
    "one per token, the max over each row of x",
    "act per tensor": "one activation scale for the whole x although act_granularity is 'token' (one per row)",
    "weight per tensor": "one weight scale for the whole W: the weights get one absmax scale per output row",
    "weight per column": "weight scales per input column (dim 0 of W): one per output row, the max over dim 1",
    "255 levels": "scale absmax / 255: int8 codes are symmetric, -127..127, so the step is absmax / 127",
    "128 levels": "scale absmax / 128: the largest |x| must land on code 127, step absmax / 127",
    "floor": "floor instead of round",
    "half away": "ties rounded away from zero: torch.round rounds them to even (2.5 -> 2)",
    "clamp -128": "codes clamped to [-128, 127]: SmoothQuant's codes are symmetric, [-127, 127]",
    "no clamp": "no clamp with the static scale: values beyond input_absmax must saturate at +-127",
    "int8 wraps": "codes cast to int8 without clamping: 128 wraps around to -128; clamp to [-127, 127] first",
    "static ignored": "input_absmax ignored: the static scale is input_absmax / 127, whatever x holds",
    "activations not quantized": "the activations left in float (that is W8A16): quantize x as well",
    "weights not quantized": "the weights left in float: quantize W per output row as well",
    "zero guard": "NaN for an all-zero row: its absmax is 0, so 127 / absmax is inf and 0 * inf is NaN; give such a row codes 0",
}


def check_fake_quant(learner, x, W, granularity=None, input_absmax=None, what=""):
    """One call; granularity None calls with the defaults (per token, dynamic)."""
    shown = "" if granularity is None else f", {granularity!r}" + ("" if input_absmax is None else f", {input_absmax}")
    call = f"fake_quant_w8a8(x {shape_text(x)}, weight {shape_text(W)}{shown}){what}"
    if granularity is None:
        expected, got = sq.fake_quant_w8a8(x, W), learner.fake_quant_w8a8(x, W)
    else:
        expected, got = sq.fake_quant_w8a8(x, W, granularity, input_absmax), learner.fake_quant_w8a8(x, W, granularity, input_absmax)
    same_kind(got, expected, call)
    atol = 1e-6 * max(expected.abs().max().item(), 1e-30) if expected.numel() else 0.0
    mode = granularity or "token"

    def mistakes():
        found = {}
        for key, text in FAKE_QUANT_MISTAKES.items():
            outputs = []  # with the dynamic codes clamped to the grid or not, where that differs
            for clamp_dynamic in (True, False):
                output = fake_quant_with(x, W, mode, input_absmax, key, clamp_dynamic)
                if not torch.isclose(output, expected, rtol=1e-6, atol=atol).all() and not any(torch.equal(output, o) for o in outputs):
                    outputs.append(output)
            found.update({text + ("" if i == 0 else " (and your codes go beyond +-127)"): output for i, output in enumerate(outputs)})
        return found

    expect_close_lazy(got, expected, call=call, rtol=1e-6, atol=atol, mistakes=mistakes)
    return got


@graded("06.fake_quant_w8a8", points=4)
def test_fake_quant_fixed(learner):
    # absmax 127 and 254: exact scales, so 2.5 and 5.0 are exact ties (torch.round: to even)
    x = torch.tensor([[127.0, 2.5, -3.5, 0.4], [0.0, 254.0, 5.0, -1.0]])
    W = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]) * 127
    got = check_fake_quant(learner, x, W, what=" (x's rows have absmax 127 and 254)")
    expected = torch.tensor([[127.0 * 127, -4.0 * 127, 2.0 * 127], [0.0, 4.0 * 127, 254.0 * 127]], dtype=torch.float64)
    if not torch.allclose(got, expected, rtol=1e-12):
        raise Mismatch(f"with exact scales the codes of row 0 are [127, 2, -4, 0] and of row 1 [0, 127, 2, -0]: "
                       f"expected {expected.tolist()}, got {got.tolist()}")  # fmt: skip
    check_fake_quant(learner, x, W, "tensor", None, " (one scale for all of x: absmax 254)")
    check_fake_quant(learner, x, W, "tensor", 127.0, " (static scale 127 / 127 = 1: 254 saturates at 127)")


@graded("06.fake_quant_w8a8", points=5)
def test_fake_quant_per_token(learner):
    for M, K, N, seed in ((37, 64, 29, 70), (8, 96, 48, 71), (1, 40, 12, 72)):
        x, W = tie_free(activations(M, K, seed=seed, outliers=(1, K // 2)), weight(N, K, seed=seed + 100))
        check_fake_quant(learner, x, W, what=" (defaults: per token)")
        check_fake_quant(learner, x, W, "token", None, " (per token)")


@graded("06.fake_quant_w8a8", points=3)
def test_fake_quant_per_tensor(learner):
    x, W = tie_free(activations(24, 64, seed=73), weight(16, 64, seed=74), "tensor")
    check_fake_quant(learner, x, W, "tensor", None, " (dynamic per tensor)")


@graded("06.fake_quant_w8a8", points=5)
def test_fake_quant_static(learner):
    x0, W0 = activations(24, 64, seed=75, outliers=(3, 9), size=40.0), weight(16, 64, seed=76)
    largest = x0.abs().max().item()
    for input_absmax, what in ((2 * largest, "a calibration maximum above every value"),
                               (0.5 * largest, "values beyond the calibration maximum saturate"),
                               (3.0, "only the outlier channels saturate")):  # fmt: skip
        x, W = tie_free(x0, W0, "tensor", input_absmax)
        check_fake_quant(learner, x, W, "tensor", input_absmax, f" (static: {what})")


@graded("06.fake_quant_w8a8", points=4)
def test_fake_quant_real_layer(learner, smollm2):
    x, W = tie_free(smollm2["x_down"], smollm2["down_rows"])
    check_fake_quant(learner, x, W, "token", None, " (SmolLM2 layer 2: down_proj, 64 held-out tokens, 64 outputs)")
    static = smollm2["act_down"].max().item()
    x, W = tie_free(smollm2["x_down"], smollm2["down_rows"], "tensor", static)
    check_fake_quant(learner, x, W, "tensor", static, " (SmolLM2 layer 2: down_proj, static calibration maximum)")
    q = smollm2["q"][:96]
    w = sq.column_absmax([smollm2["q"], smollm2["k"], smollm2["v"]])
    s = sq.smoothing_factors(smollm2["act_attn"], w, 0.85)
    x, W = tie_free(smollm2["x_attn"] / s, q * s)
    check_fake_quant(learner, x, W, "token", None, " (SmolLM2 layer 2: q_proj after smoothing at alpha 0.85)")


@graded("06.fake_quant_w8a8", points=3)
def test_fake_quant_edge_cases(learner):
    x, W = tie_free(activations(6, 32, seed=77), weight(8, 32, seed=78))
    x[2], W[5] = 0, 0
    check_fake_quant(learner, x, W, "token", None, " (an all-zero token and an all-zero weight row: codes 0, not NaN)")
    check_fake_quant(learner, torch.zeros(3, 32), W, "tensor", None, " (all of x zero, per tensor)")
    x, W = tie_free(activations(5, 1, seed=79, outliers=()), weight(3, 1, seed=80))
    check_fake_quant(learner, x, W, "token", None, " (K = 1)")
    x, W = tie_free(activations(10, 48, seed=81, dtype=torch.float64), weight(6, 48, seed=82, dtype=torch.float64))
    check_fake_quant(learner, x, W, "token", None, " (float64 input: quantized like float32)")


@graded("06.fake_quant_w8a8", points=2)
def test_fake_quant_refuses_bad_input(learner):
    x, W = torch.ones(4, 8), torch.ones(3, 8)
    cases = [
        ((x, W, "channel", None), "act_granularity is 'token' or 'tensor'"),
        ((x, W, "token", 5.0), "a static input_absmax is one scale per tensor: it needs act_granularity='tensor'"),
        ((x, W, "tensor", 0.0), "input_absmax must be a positive calibration maximum"),
        ((x, torch.ones(3, 6), "token", None), "x has 8 input channels, the weight 6"),
        ((torch.ones(2, 4, 8), W, "token", None), "x must be a matrix [M, K]"),
    ]
    for args, why in cases:
        call = f"fake_quant_w8a8(x {shape_text(args[0])}, weight {shape_text(args[1])}, {args[2]!r}, {args[3]})"
        expect_raises(lambda args=args: learner.fake_quant_w8a8(*args), (ValueError,), call=call, why=why)
