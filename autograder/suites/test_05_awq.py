"""Hidden suite of lab 05 (AWQ).

Every case compares the learner's function with `reference_impl/awq.py`. The inputs are of two
kinds: random activations whose channels have uneven magnitudes (a few salient ones 10 to 50 times
larger, some dead ones, some tiny ones), and real ones: the inputs and some output rows of the
linears of SmolLM2's decoder layer 2 over 2 calibration windows of 256 tokens. Those are computed
once per machine (loading the model takes seconds) and kept in the course cache
(`lab05-smollm2-activations-v1.pt`).

Case groups per function: fixed (hand-picked), randomized (seeded generators), real activations,
edge cases (dead channels, channels below the 1e-4 floor, every channel alike so that every r
ties, a group of silent inputs so that every clamp ties, 2 to 8 bits, per-channel grids, float64
next to float32, square weights where a wrong axis still has the right shape) and bad input,
which must raise the exception type the reference raises.

Allowances, stated in the lab:
- x_mean, the scales, the folded weights and the clamps are compared to float32 rounding (a few
  units in the last place: another order of the same arithmetic); dequantized weights too, so a
  code that moved one level is an error.
- The losses of the scale search and the objective of the clipping search are means of many
  squares: another order of the sums, or x (W_hat - W)^T instead of x W_hat^T - x W^T, moves them
  by float32 rounding. The losses are compared to 1e-3 relative (float32 inputs) or 1e-5
  (float64), the objective to 1e-4 or 1e-5 (both square in float32, as the reference does).
- The choice of r and of each clamp: when two candidates' losses are equal up to that rounding
  (as the reference computes them), either choice is accepted, with the scales or clamp of the
  choice made.

Diagnosis: when an output differs, the outputs of common mistakes (the signed mean or max |x|
instead of the mean |x|, no sqrt(max s * min s) normalisation, the clamp after it, Q(W s) not
divided by s, the scales on the output rows, a grid of r from 0 to 1 inclusive, the sum or the
weight error instead of the mean output error, ties to the larger r, the fold multiplied instead of
divided or put on the wrong axis of the previous Linear, a clamp of one side only, clamping after
rounding, shrinking in steps of 1/10, no token sampling, q_proj and k_proj clipped, ...) are
computed by the small wrong implementations below, and the feedback names the one the learner's
output matches.
"""

import json
import math

import pytest
import torch

from quantcourse.autograder import testing
from quantcourse.autograder.testing import Mismatch, describe_value, expect_close, expect_raises, graded, same_kind
from quantcourse.reference_impl import awq
from quantcourse.reference_impl.affine import AffineSpec

GRADED = {
    "activation_mean": awq.activation_mean,
    "candidate_scales": awq.candidate_scales,
    "scaled_fake_quant": awq.scaled_fake_quant,
    "search_group_scales": awq.search_group_scales,
    "folded_weights": awq.folded_weights,
    "clip_objective": awq.clip_objective,
    "clip_search": awq.clip_search,
    "search_layer_clips": awq.search_layer_clips,
}
# The lab spells out the loops of the two searches step by step: an honest solution reads like the
# reference, so similarity says nothing about them.
SIMILARITY_EXEMPT = {"search_group_scales", "clip_search"}
SEARCH_FIELDS = ("scales", "ratio", "ratios", "losses")
CLIP_FIELDS = ("max_val", "step")


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
    return f"[{', '.join(map(str, x.shape))}] {name_of(x.dtype)}" if isinstance(x, torch.Tensor) else type(x).__name__


def spec(bits=4, group_size=64, symmetric=False) -> AffineSpec:
    granularity = "group" if group_size else "channel"
    return AffineSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)


def spec_text(s: AffineSpec) -> str:
    return s.describe()


def activations(shape, seed, salient=(), boost=30.0, dead=(), tiny=(), dtype=torch.float32) -> torch.Tensor:
    """Activations [..., K]: each channel's magnitude drawn log-uniformly over 0.3 .. 3, channels
    `salient` `boost` times larger, `dead` ones zero and `tiny` ones 1e-9 (below the 1e-4 floor
    of the scales even after a square root)."""
    g = generator(seed)
    K = shape[-1]
    x = torch.randn(shape, generator=g) * torch.exp(torch.empty(K).uniform_(-1.2, 1.1, generator=g))
    x[..., list(salient)] *= boost
    x[..., list(dead)] = 0
    x[..., list(tiny)] = 1e-9 * torch.sign(x[..., list(tiny)])
    return x.to(dtype)


def weight(N, K, seed, dtype=torch.float32) -> torch.Tensor:
    """Gaussian weights (std 0.05), a few 5x larger, like a trained weight matrix."""
    g = generator(seed)
    W = 0.05 * torch.randn(N, K, generator=g)
    return (W * torch.where(torch.rand(N, K, generator=g) < 0.02, 5.0, 1.0)).to(dtype)


def unpack(got, n: int, call: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise Mismatch(f"{call} should return a tuple of {n} values, got {describe_value(got)}")
    return tuple(got)


def fields_of(got, names, kind: str, call: str):
    missing = [n for n in names if not hasattr(got, n)]
    if missing:
        raise Mismatch(f"{call} should return a {kind} (the given dataclass), got {describe_value(got)}: missing {', '.join(missing)}")
    return got


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    return a.shape == b.shape and bool(testing.close_mask(a.to(b.dtype), b, rtol, atol).all())


def merged(variants: dict) -> dict:
    """Known mistakes whose outputs coincide on this input, named together."""
    out: dict = {}
    for name, value in variants.items():
        same = next((k for k, v in out.items() if isinstance(v, torch.Tensor) and isinstance(value, torch.Tensor) and v.shape == value.shape
                     and v.dtype == value.dtype and torch.equal(v.nan_to_num(), value.nan_to_num())), None)  # fmt: skip
        if same is None:
            out[name] = value
        else:
            out[f"{same}; or (the same output here) {name}"] = out.pop(same)
    return out


def check_tensor_output(got, expected, *, call, rtol, atol, mistakes=None, what="values", inputs=None):
    """same_kind and expect_close, computing the known mistakes' outputs only when the output
    differs; a wrong shape that a known mistake produces is named too."""
    if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor) and got.shape != expected.shape and mistakes:
        for name, value in merged(mistakes()).items():
            if isinstance(value, torch.Tensor) and close(got, value, rtol, atol):
                raise Mismatch(f"{call} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}. "
                               f"Your output matches a common mistake: {name}.")  # fmt: skip
    same_kind(got, expected, call)
    try:
        expect_close(got, expected, call=call, rtol=rtol, atol=atol, what=what, inputs=inputs)
    except Mismatch:
        if not mistakes:
            raise
        expect_close(got, expected, call=call, rtol=rtol, atol=atol, what=what, inputs=inputs, variants=merged(mistakes()))


# ---------------------------------------------------------------------------------------------
# Real activations from SmolLM2


SMOLLM2_FILE = "lab05-smollm2-activations-v1.pt"  # in quantcourse.runtime.cache_dir()
SMOLLM2_LAYER = 2
SMOLLM2_ROWS = {"q": 64, "k": 32, "v": 32, "o": 48, "gate": 48, "up": 48, "down": 48}  # output rows kept


def model_id() -> str | None:
    """The SHA-256 of the cached reference weights, read from the cache's manifest (None if absent)."""
    from quantcourse import models

    manifest = models.reference_cache_path() / models.MANIFEST_FILE
    try:
        return json.loads(manifest.read_text())["weights"]["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def smollm2_tensors() -> dict[str, torch.Tensor]:
    """Decoder layer 2 of SmolLM2 on 2 calibration windows of 256 tokens: the inputs [512, K]
    float32 of its linears ("attn_x" of q/k/v, "o_x", "mlp_x" of gate/up, "down_x"), the first
    rows of each linear's weight ("q", "k", ..., "down") and post_attention_layernorm's weight
    ("post_norm"). Built once per machine and kept in the course cache."""
    from quantcourse.runtime import cache_dir, exclusive_lock

    path = cache_dir() / SMOLLM2_FILE
    with exclusive_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            data = torch.load(path)
            if data["model"] == model_id():
                return data["tensors"]
        from quantcourse.corpus import token_windows
        from quantcourse.models import load_reference_model
        from quantcourse.surgery import first_layer_inputs

        model, tokenizer = load_reference_model()
        torch.set_num_threads(1)
        hidden, kwargs = first_layer_inputs(model, token_windows(tokenizer, "calibration", 256, 2))
        with torch.no_grad():
            for layer in model.model.layers[:SMOLLM2_LAYER]:
                hidden = torch.cat([layer(h[None], **kwargs) for h in hidden])
        layer = model.model.layers[SMOLLM2_LAYER]
        recorded = awq.record_layer_inputs(layer, hidden, kwargs, ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"])
        tensors = {key: recorded[name].reshape(-1, recorded[name].shape[-1]).contiguous()
                   for key, name in (("attn_x", "self_attn.q_proj"), ("o_x", "self_attn.o_proj"), ("mlp_x", "mlp.gate_proj"),
                                     ("down_x", "mlp.down_proj"))}  # fmt: skip
        for key, rows in SMOLLM2_ROWS.items():
            part = "self_attn" if key in ("q", "k", "v", "o") else "mlp"
            tensors[key] = layer.get_submodule(f"{part}.{key}_proj").weight.detach()[:rows].clone()
        tensors["post_norm"] = layer.post_attention_layernorm.weight.detach().clone()
        staging = path.with_name(path.name + ".part")
        torch.save({"model": model.reference_weights_sha256, "tensors": tensors}, staging)
        staging.rename(path)
        return tensors


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tensors()


# ---------------------------------------------------------------------------------------------
# activation_mean


def mean_mistakes(x: torch.Tensor) -> dict:
    t = x.reshape(-1, x.shape[-1])
    return {
        "the signed mean of x: take |x| first (a channel of large negative inputs matters as much as a positive one)": t.float().mean(0),
        "the largest |x| of each channel (SmoothQuant's statistic): AWQ averages |x| over the tokens": t.abs().float().amax(0),
        "the root mean square sqrt(mean x^2): AWQ averages |x|": t.float().pow(2).mean(0).sqrt(),
        "the sum over the tokens, not the mean": t.abs().float().sum(0),
        "averaged in x's own dtype, then converted: convert to float32 before averaging": t.abs().mean(0).float(),
        "averaged over the first dimension only (one row per position of x [n, L, K]): flatten every token with "
        "x.reshape(-1, K)": x.abs().float().mean(0),
        "one number per token (the mean over the channels): x_mean has one entry per input channel, x's last dimension": (
            x.abs().float().mean(-1)),
    }  # fmt: skip


def check_mean(learner, x, what="", reveal=False):
    call = f"activation_mean(x {shape_text(x)}){what}"
    check_tensor_output(learner.activation_mean(x), awq.activation_mean(x), call=call, rtol=2e-6, atol=1e-12,
                        mistakes=lambda: mean_mistakes(x), inputs={"x": x} if reveal else None)  # fmt: skip


@graded("05.activation_mean", points=2)
def test_mean_fixed(learner):
    x = torch.tensor([[[1.0, -2.0, 0.0]], [[-3.0, 2.0, 0.0]]])
    check_mean(learner, x, " (two windows of one token)", reveal=True)
    check_mean(learner, torch.tensor([[0.5, -4.0], [-1.5, 0.0], [2.0, 1.0]]), " (three tokens)", reveal=True)


@graded("05.activation_mean", points=2)
def test_mean_random_and_real(learner, smollm2):
    check_mean(learner, activations((4, 32, 64), seed=500, salient=(3, 40), dead=(7,)), " (4 windows of 32 tokens)")
    check_mean(learner, activations((300, 48), seed=501), " (300 tokens)")
    check_mean(learner, activations((48,), seed=502), " (a single token [K])")
    check_mean(learner, smollm2["attn_x"], " (SmolLM2 layer 2, the input of q/k/v)")
    check_mean(learner, smollm2["down_x"].reshape(2, 256, 1536), " (SmolLM2 layer 2, the input of down_proj, 2 windows)")


@graded("05.activation_mean", points=2)
def test_mean_dtypes_and_bad_input(learner):
    x = activations((2048, 32), seed=503, salient=(1,), boost=40.0)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        check_mean(learner, x.to(dtype), f" ({name_of(dtype)}: x_mean is float32 whatever x's dtype)")
    expect_raises(lambda: learner.activation_mean(torch.ones(4, 8, dtype=torch.int64)), (TypeError,),
                  call="activation_mean(x int64)", why="check_tensor refuses integer tensors")  # fmt: skip
    bad = torch.ones(4, 8)
    bad[2, 3] = float("nan")
    expect_raises(lambda: learner.activation_mean(bad), (ValueError,), call="activation_mean(x with a NaN)", why="check_tensor refuses NaN/inf")


# ---------------------------------------------------------------------------------------------
# candidate_scales


def normalized(s: torch.Tensor) -> torch.Tensor:
    return s / (s.max() * s.min()).sqrt()


def late_or_no_clamp(raw: torch.Tensor) -> dict:
    """The clamp to 1e-4 after the normalisation, or none: with a dead channel both divide by 0."""
    late, none = normalized(raw).clamp(min=1e-4), normalized(raw)
    if torch.equal(late.nan_to_num(), none.nan_to_num()):
        return {"no clamp to 1e-4 before normalising: a dead channel (x_mean = 0) makes min s = 0 and the normalisation divides "
                "by 0; clamp first, then normalise": none}  # fmt: skip
    return {"normalised before the clamp to 1e-4: clamp first, then normalise": late,
            "no clamp to 1e-4: a channel of x_mean^r below 1e-4 must be raised to the floor before normalising": none}


def scales_mistakes(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None) -> dict:
    def duo(s, exponent=1 - ratio, eps=1e-4, divide=True):
        if w_mean is None:
            return s
        factor = w_mean.pow(exponent) + eps
        return s / factor if divide else s * factor

    raw = duo(x_mean.pow(ratio))
    clamped = raw.clamp(min=1e-4)
    found = {
        "no normalisation: divide s = x_mean^r by sqrt(max s * min s)": clamped,
        "normalised by max s: divide by sqrt(max s * min s), which puts the geometric middle of the range at 1": clamped / clamped.max(),
        "normalised by the mean of s: divide by sqrt(max s * min s)": clamped / clamped.mean(),
        "normalised by the geometric mean of all the scales: llm-awq divides by sqrt(max s * min s)": clamped / clamped.log().mean().exp(),
        **late_or_no_clamp(raw),
        "s = x_mean^(1 - r): the exponent is r": normalized(duo(x_mean.pow(1 - ratio)).clamp(min=1e-4)),
        "s = exp(r log x_mean): for r = 0 a dead channel gets exp(0 * -inf) = NaN; x_mean.pow(r) gives 0^0 = 1": normalized(
            duo(torch.exp(ratio * x_mean.log())).clamp(min=1e-4)),
    }  # fmt: skip
    if w_mean is not None:
        found |= {
            "duo scaling without the + 1e-4: s = x_mean^r / (w_mean^(1-r) + 1e-4)": normalized(duo(x_mean.pow(ratio), eps=0.0).clamp(min=1e-4)),
            "duo scaling multiplied by w_mean^(1-r): the weight statistic divides": normalized(duo(x_mean.pow(ratio), divide=False).clamp(min=1e-4)),
            "duo scaling with w_mean^r: the weight statistic's exponent is 1 - r": normalized(duo(x_mean.pow(ratio), exponent=ratio).clamp(min=1e-4)),
            "w_mean ignored: with w_mean given, divide by w_mean^(1-r) + 1e-4": normalized(x_mean.pow(ratio).clamp(min=1e-4)),
        }  # fmt: skip
    return found


def check_scales(learner, x_mean, ratio, w_mean=None, what="", reveal=False):
    call = f"candidate_scales(x_mean {shape_text(x_mean)}, ratio={ratio:g}" + ("" if w_mean is None else f", w_mean {shape_text(w_mean)}") + f"){what}"
    expected = awq.candidate_scales(x_mean, ratio, w_mean)
    got = learner.candidate_scales(x_mean, ratio) if w_mean is None else learner.candidate_scales(x_mean, ratio, w_mean)
    inputs = {"x_mean": x_mean} if reveal else None
    check_tensor_output(got, expected, call=call, rtol=2e-6, atol=0, mistakes=lambda: scales_mistakes(x_mean, ratio, w_mean), inputs=inputs)


@graded("05.candidate_scales", points=3)
def test_scales_fixed(learner):
    x_mean = torch.tensor([0.5, 2.0, 8.0, 0.0, 1.0])
    check_scales(learner, x_mean, 0.0, what=" (r = 0: every scale 1, the dead channel too)", reveal=True)
    check_scales(learner, x_mean, 0.5, what=" (a dead channel: its scale is clamped to 1e-4 before normalising)", reveal=True)
    check_scales(learner, torch.tensor([0.25, 1.0, 4.0]), 0.5, what=" (s = [0.5, 1, 2]: already max s * min s = 1)", reveal=True)


@graded("05.candidate_scales", points=3)
def test_scales_randomized(learner):
    for seed, K in enumerate((64, 128, 576)):
        x_mean = awq.activation_mean(activations((256, K), seed=510 + seed, salient=(1, K // 2), dead=(K - 1,)))
        for ratio in (0.05, 0.35, 0.95):
            check_scales(learner, x_mean, ratio, what=f" (random activations, {K} channels, one dead)")
    check_scales(learner, awq.activation_mean(activations((64, 32), seed=514, tiny=(4, 9))), 0.5,
                 what=" (two channels of mean |x| 1e-9: their x_mean^0.5 is below the 1e-4 floor)")  # fmt: skip


@graded("05.candidate_scales", points=2)
def test_scales_duo(learner):
    x = activations((128, 64), seed=520, salient=(5,), dead=(11,))
    W = [weight(24, 64, seed=521), weight(8, 64, seed=522)]
    w_mean = awq.weight_mean(W, spec(4, 32))
    for ratio in (0.0, 0.3, 0.85):
        check_scales(learner, awq.activation_mean(x), ratio, w_mean, " (duo scaling)")


@graded("05.candidate_scales", points=2)
def test_scales_edge_and_real(learner, smollm2):
    check_scales(learner, torch.full((16,), 0.7), 0.6, what=" (every channel alike: every scale 1)")
    check_scales(learner, torch.tensor([3.0]), 0.5, what=" (a single channel)")
    x_mean = awq.activation_mean(smollm2["attn_x"])
    for ratio in (0.25, 0.5, 0.9):
        check_scales(learner, x_mean, ratio, what=" (SmolLM2 layer 2, the input of q/k/v)")


# ---------------------------------------------------------------------------------------------
# scaled_fake_quant


def fake_quant_mistakes(W: torch.Tensor, s: torch.Tensor, sp: AffineSpec) -> dict:
    q = awq.fake_quantize_groups
    st = s.to(W.dtype)
    found = {
        "Q(W diag(s)) not divided by s (or the division left to the input x): return the weight that multiplies the "
        "unscaled input, Q(W diag(s)) diag(s)^-1": q(W * st, sp),
        "the inverse scaling Q(W diag(s)^-1) diag(s): multiply the columns by s before rounding, divide after": q(W / st, sp) * st,
        "Q(W): the scales had no effect (not applied, or applied to the output rows, W * s[:, None], which each row's own grid "
        "undoes): s scales input column k, W * s[None, :]": q(W, sp),
        "W diag(s) diag(s)^-1 = W: the weight was never rounded": W.clone(),
        "Q(W diag(s)) / s with a symmetric grid: use spec (the given fake_quantize_groups)": q(W * st, AffineSpec(
            bits=sp.bits, symmetric=not sp.symmetric, granularity=sp.granularity, group_size=sp.group_size)) / st,
    }  # fmt: skip
    if sp.granularity == "group":
        found["one grid per output row: the groups of spec were ignored"] = q(W * st, AffineSpec(bits=sp.bits, symmetric=sp.symmetric,
                                                                                                  granularity="channel")) / st  # fmt: skip
    return found


def check_fake_quant(learner, W, s, sp, what="", reveal=False):
    call = f"scaled_fake_quant(W {shape_text(W)}, s {shape_text(s)}, {spec_text(sp)}){what}"
    expected = awq.scaled_fake_quant(W, s, sp)
    rtol = 1e-12 if W.dtype == torch.float64 else 1e-6
    check_tensor_output(learner.scaled_fake_quant(W, s, sp), expected, call=call, rtol=rtol, atol=0,
                        mistakes=lambda: fake_quant_mistakes(W, s, sp), inputs={"W": W, "s": s} if reveal else None)  # fmt: skip


def scales_for(K, seed, ratio=0.5, salient=(2,), dead=()) -> torch.Tensor:
    return awq.candidate_scales(awq.activation_mean(activations((128, K), seed=seed, salient=salient, dead=dead)), ratio)


@graded("05.scaled_fake_quant", points=3)
def test_fake_quant_fixed(learner):
    W = torch.tensor([[0.30, -0.12, 0.05, 0.02], [-0.40, 0.20, 0.11, -0.07]])
    s = torch.tensor([2.0, 1.0, 0.5, 1.0])
    check_fake_quant(learner, W, s, spec(2, 4), " (2 bits, one group of 4 per row)", reveal=True)
    check_fake_quant(learner, W, torch.ones(4), spec(3, 2), " (s = 1: plain round-to-nearest)", reveal=True)
    check_fake_quant(learner, W[:, :2].T.contiguous() @ W[:, :2], torch.tensor([4.0, 0.25]), spec(4, None), " (a square weight)", reveal=True)


@graded("05.scaled_fake_quant", points=4)
def test_fake_quant_randomized(learner):
    check_fake_quant(learner, weight(64, 64, seed=536), scales_for(64, 546, ratio=0.8), spec(4, 32), " (a square weight)")
    cases = [(spec(4, 32), 48, 64), (spec(3, 16), 40, 64), (spec(8, None), 24, 96), (spec(2, 64), 32, 128), (spec(4, 16, True), 16, 32)]
    for seed, (sp, N, K) in enumerate(cases):
        check_fake_quant(learner, weight(N, K, seed=530 + seed), scales_for(K, 540 + seed, salient=(1, K - 3)), sp, " (random)")
    check_fake_quant(learner, weight(32, 64, seed=537, dtype=torch.float64), scales_for(64, 547), spec(3, 32), " (float64 W: the result is float64)")


@graded("05.scaled_fake_quant", points=3)
def test_fake_quant_real(learner, smollm2):
    x_mean = awq.activation_mean(smollm2["attn_x"])
    for ratio, bits in ((0.5, 4), (0.8, 3)):
        s = awq.candidate_scales(x_mean, ratio)
        check_fake_quant(learner, smollm2["q"], s, spec(bits, 64), f" (SmolLM2 q_proj's first 64 rows, r = {ratio})")
    s = awq.candidate_scales(awq.activation_mean(smollm2["down_x"]), 0.5)
    check_fake_quant(learner, smollm2["down"], s, spec(4, 64), " (SmolLM2 down_proj's first 48 rows, r = 0.5)")


# ---------------------------------------------------------------------------------------------
# search_group_scales


def search_with(weights, x, sp, duo_scaling=False, grid=20, mistake=None) -> awq.ScaleSearch:
    """The reference's search with one known mistake switched on."""
    ratios = {
        "linspace": torch.linspace(0, 1, grid).tolist(),
        "inclusive": [i / grid for i in range(grid + 1)],
        "from one": [i / grid for i in range(1, grid + 1)],
    }.get(mistake, [i / grid for i in range(grid)])
    x_mean = awq.activation_mean(x)
    w_mean = awq.weight_mean(weights, sp) if duo_scaling and mistake != "no duo" else None
    reference = [x @ W.T for W in weights]
    losses, best, best_loss = [], None, math.inf
    for ratio in ratios:
        s = awq.candidate_scales(x_mean, ratio, w_mean)
        candidates = [awq.fake_quantize_groups(W * s, sp) if mistake == "undivided" else awq.scaled_fake_quant(W, s, sp) for W in weights]
        errors = [((x @ C.T) - R).float().pow(2) for C, R in zip(candidates, reference)]
        if mistake == "sum":
            loss = sum(e.sum().item() for e in errors)
        elif mistake == "per linear":
            loss = sum(e.mean().item() for e in errors) / len(errors)
        elif mistake == "weights":
            loss = torch.cat([(C - W).float().pow(2).reshape(-1) for C, W in zip(candidates, weights)]).mean().item()
        elif mistake == "rms":
            loss = torch.cat([e.reshape(-1) for e in errors]).mean().sqrt().item()
        else:
            loss = torch.cat([e.reshape(-1) for e in errors]).mean().item()
        losses.append(loss)
        if loss < best_loss or (mistake == "ties" and loss <= best_loss) or mistake == "last":
            best, best_loss = (s, ratio), loss
    return awq.ScaleSearch(best[0], best[1], ratios, losses)


SEARCH_MISTAKES = {
    "linspace": "r = torch.linspace(0, 1, grid): 20 points from 0 to 1 inclusive; llm-awq tries r = i / grid for i = 0 .. grid - 1 "
    "(0, 0.05, ..., 0.95), never r = 1",
    "inclusive": "grid + 1 ratios, r = 0 .. 1 inclusive: r = i / grid for i = 0 .. grid - 1",
    "from one": "r from 1 / grid to 1: r = 0 (plain round-to-nearest, s = 1) must be a candidate, so that the search never does worse than RTN",
    "undivided": "the candidates Q(W diag(s)) not divided by s: the outputs compared must be those of Q(W diag(s)) diag(s)^-1 on x",
    "sum": "the sum of the squared output errors: the loss is their mean",
    "per linear": "the mean error of each linear, averaged over the linears: take the mean over all their outputs together "
    "(concatenated), so that a linear with more outputs weighs more",
    "weights": "the squared error of the weights, (W_hat - W)^2: AWQ compares the outputs x W_hat^T with x W^T",
    "rms": "the root of the mean squared error: the loss is the mean squared error itself",
    "no duo": "duo_scaling ignored: with duo_scaling=True, pass w_mean = weight_mean(weights, spec) to candidate_scales",
    "ties": "ties keep the larger r (<=): keep the first of equal losses, the smaller r, as llm-awq does",
    "last": "the scales of the last r tried, not of the lowest loss",
}


def loss_tolerance(x: torch.Tensor) -> float:
    return 1e-5 if x.dtype == torch.float64 else 1e-3


def near(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-30)


def check_search(learner, weights, x, sp, what="", duo_scaling=False, grid=20, pass_loss=False):
    options = {"duo_scaling": duo_scaling} if duo_scaling else {}
    if grid != 20:
        options["grid"] = grid
    shown = "".join(f", {k}={v}" for k, v in options.items())
    call = f"search_group_scales([{', '.join(shape_text(W) for W in weights)}], x {shape_text(x)}, {spec_text(sp)}{shown}){what}"
    expected = awq.search_group_scales(weights, x, sp, None, duo_scaling, grid)
    got = learner.search_group_scales(weights, x, sp, None, **options) if pass_loss else learner.search_group_scales(weights, x, sp, **options)
    got = fields_of(got, SEARCH_FIELDS, "ScaleSearch", call)

    def mistaken(key):
        return search_with(weights, x, sp, duo_scaling, grid, key)

    if not isinstance(got.ratios, (list, tuple)) or len(got.ratios) != len(expected.ratios) or not all(
            isinstance(r, (int, float)) and near(r, e, 1e-9) for r, e in zip(got.ratios, expected.ratios)):
        if isinstance(got.ratios, (list, tuple)) and got.ratios and all(isinstance(r, (int, float)) for r in got.ratios):
            shown_ratios = f"{len(got.ratios)} values {[round(r, 4) for r in got.ratios[:3]]} ... {round(got.ratios[-1], 4)}"
        else:
            shown_ratios = describe_value(got.ratios)
        message = f"{call}: ratios {shown_ratios}, expected {len(expected.ratios)} values {expected.ratios[:3]} ... {expected.ratios[-1]}"
        for key in ("linspace", "inclusive", "from one"):
            ratios = mistaken(key).ratios
            if isinstance(got.ratios, (list, tuple)) and len(got.ratios) == len(ratios) and all(near(r, e, 1e-6) for r, e in zip(got.ratios, ratios)):
                message += f". Your grid matches a common mistake: {SEARCH_MISTAKES[key]}"
        raise Mismatch(message + ".")
    rtol = loss_tolerance(x)
    if not isinstance(got.losses, (list, tuple)) or len(got.losses) != len(expected.losses):
        raise Mismatch(f"{call}: losses should be a list of {len(expected.losses)} floats (one per ratio), got {describe_value(got.losses)}")
    if not all(isinstance(v, (int, float)) and near(v, e, rtol) for v, e in zip(got.losses, expected.losses)):
        i = next(i for i, (v, e) in enumerate(zip(got.losses, expected.losses)) if not (isinstance(v, (int, float)) and near(v, e, rtol)))
        message = f"{call}: the loss at r = {expected.ratios[i]:g} is {describe_value(got.losses[i])}, expected {expected.losses[i]:.6g}"
        for key in ("undivided", "sum", "per linear", "weights", "rms", "no duo"):
            if key == "no duo" and not duo_scaling:
                continue
            if all(isinstance(v, (int, float)) and near(v, e, rtol) for v, e in zip(got.losses, mistaken(key).losses)):
                message += f". Your losses match a common mistake: {SEARCH_MISTAKES[key]}"
                break
        raise Mismatch(message + ".")
    if not isinstance(got.ratio, (int, float)) or not any(near(got.ratio, r, 1e-9) for r in expected.ratios):
        raise Mismatch(f"{call}: ratio {describe_value(got.ratio)} is not one of the ratios tried")
    chosen = min(range(len(expected.ratios)), key=lambda i: abs(expected.ratios[i] - got.ratio))
    best = expected.ratios.index(expected.ratio)
    exact_tie = expected.losses[chosen] == expected.losses[best]  # equal candidates: the first (smaller r) is the rule
    if chosen != best and (exact_tie or not near(expected.losses[chosen], expected.losses[best], 1e-6)):
        message = (f"{call}: chose r = {got.ratio:g} (loss {expected.losses[chosen]:.6g}), but r = {expected.ratio:g} has the lowest loss "
                   f"({expected.losses[best]:.6g})")  # fmt: skip
        for key in ("ties", "last"):
            if near(mistaken(key).ratio, got.ratio, 1e-9):
                message += f". Your choice matches a common mistake: {SEARCH_MISTAKES[key]}"
                break
        raise Mismatch(message + ".")
    x_mean = awq.activation_mean(x)
    w_mean = awq.weight_mean(weights, sp) if duo_scaling else None
    expected_scales = awq.candidate_scales(x_mean, expected.ratios[chosen], w_mean)
    check_tensor_output(got.scales, expected_scales, call=f"{call}: scales (of r = {expected.ratios[chosen]:g})", rtol=2e-6, atol=0,
                        mistakes=lambda: {"the scales of the last r tried, not of the lowest loss": mistaken("last").scales,
                                          "x_mean returned instead of the scales": x_mean})  # fmt: skip


def salient_group(K=64, sizes=(48, 16, 16), tokens=(4, 32), seed=0, salient=(5,), boost=30.0, dtype=torch.float32):
    x = activations((*tokens, K), seed=seed, salient=salient, boost=boost, dtype=dtype)
    g = generator(seed + 1)
    weights = [(scale * torch.randn(N, K, generator=g) / K**0.5).to(dtype) for N, scale in zip(sizes, (1.0, 3.0, 0.5, 2.0))]
    return weights, x


@graded("05.search_group_scales", points=4)
def test_search_fixed(learner):
    weights, x = salient_group(K=32, sizes=(16,), tokens=(64,), seed=550)
    check_search(learner, weights, x, spec(3, 16), " (one linear, a salient channel 30x the others)")
    check_search(learner, weights, x, spec(3, 16), " (grid of 5: r = 0, 0.2, ..., 0.8)", grid=5)
    check_search(learner, weights, x, spec(3, 16), " (loss=None passed)", pass_loss=True)


@graded("05.search_group_scales", points=5)
def test_search_randomized(learner):
    weights, x = salient_group(seed=560)
    check_search(learner, weights, x, spec(4, 32), " (three linears of 48, 16 and 16 outputs reading one x)")
    check_search(learner, weights, x, spec(2, 64), " (three linears)", grid=7)
    check_search(learner, weights, x, spec(3, 32), " (three linears)", duo_scaling=True)
    weights, x = salient_group(K=96, sizes=(24, 40), tokens=(100,), seed=561, salient=(0, 50, 95), boost=12.0, dtype=torch.float64)
    check_search(learner, weights, x, spec(3, 32), " (float64)")


@graded("05.search_group_scales", points=5)
def test_search_real(learner, smollm2):
    qkv = [smollm2["q"], smollm2["k"], smollm2["v"]]
    check_search(learner, qkv, smollm2["attn_x"], spec(4, 64), " (SmolLM2 q_proj, k_proj, v_proj rows on their real input)")
    check_search(learner, qkv, smollm2["attn_x"], spec(3, 64), " (SmolLM2 q_proj, k_proj, v_proj rows on their real input)")
    check_search(learner, [smollm2["down"]], smollm2["down_x"], spec(4, 64), " (SmolLM2 down_proj rows on their real input)")


@graded("05.search_group_scales", points=2)
def test_search_ties(learner):
    weights, x = salient_group(K=32, sizes=(16, 8), tokens=(64,), seed=570, salient=())
    x = x.sign() * 0.7  # every channel has mean |x| 0.7: every r gives s = 1 and the same loss
    check_search(learner, weights, x, spec(4, 16), " (every channel alike: twenty equal losses)")


def bad_searches():
    weights, x = salient_group(K=64, sizes=(16, 8), tokens=(32,), seed=580)
    return [
        ((weights, x, spec(4, 32), None, False, 0), ValueError, "grid must be a positive integer"),
        ((weights, x, spec(4, 32), None, False, -3), ValueError, "grid must be a positive integer"),
        (([], x, spec(4, 32)), ValueError, "a group needs at least one linear"),
        (([weights[0], weights[1][:, :32]], x, spec(4, 32)), ValueError, "every weight must read x's K channels"),
        ((weights, x.long(), spec(4, 32)), TypeError, "x must be a float tensor"),
        ((weights, x, spec(4, 48)), ValueError, "group_size 48 does not divide K = 64"),
        ((weights, x, AffineSpec(bits=4, granularity="tensor")), ValueError, "AWQ scales groups along K or whole rows, not the whole tensor"),
    ]


@graded("05.search_group_scales", points=2)
def test_search_refuses_bad_input(learner):
    for args, error, why in bad_searches():
        shown = f"search_group_scales({len(args[0])} weights, x {shape_text(args[1])}, {args[2].describe()}" + (f", grid={args[5]}" if len(args) > 5 else "") + ")"
        expect_raises(lambda args=args: learner.search_group_scales(*args), (error,), call=shown, why=why)


# ---------------------------------------------------------------------------------------------
# folded_weights


def fold_mistakes(prev_weight, prev_bias, weights, s) -> dict:
    """(prev_weight, prev_bias, weights) for each known mistake."""

    def along_rows(t, v):
        return v.to(t.dtype).reshape(-1, *[1] * (t.dim() - 1))

    right = awq.folded_weights(prev_weight, prev_bias, weights, s)
    found = {
        "the fold inverted: the previous op multiplied by s and the linears divided by s; the linears' inputs are divided by s, "
        "so their weights are multiplied": (prev_weight * along_rows(prev_weight, s), None if prev_bias is None else prev_bias * s,
                                            [W / s.to(W.dtype) for W in weights]),
        "the previous op multiplied by s: it must produce x / s, so divide it": (prev_weight * along_rows(prev_weight, s), right[1], right[2]),
        "the linears divided by s: they read x / s, so multiply their input columns by s": (right[0], right[1], [W / s.to(W.dtype) for W in weights]),
        "the previous op left unchanged: divide its output channels by s": (prev_weight.clone(), right[1], right[2]),
        "the bias of the previous op not divided by s: every output channel k, bias included, is divided by s_k": (right[0], prev_bias, right[2]),
    }  # fmt: skip
    if prev_weight.dim() == 2 and prev_weight.shape[1] == s.numel():
        found["the previous Linear's input columns divided (prev_weight / s[None, :]): its output rows produce the channels, "
              "divide row k by s_k"] = (prev_weight / s.to(prev_weight.dtype)[None, :], right[1], right[2])  # fmt: skip
    if all(W.shape[0] == s.numel() for W in weights):
        found["the linears' output rows multiplied (W * s[:, None]): s scales input column k, W * s[None, :]"] = (
            right[0], right[1], [W * s.to(W.dtype)[:, None] for W in weights])  # fmt: skip
    return found


def check_fold(learner, prev_weight, prev_bias, weights, s, what="", reveal=False):
    call = (f"folded_weights(prev_weight {shape_text(prev_weight)}, prev_bias {'None' if prev_bias is None else shape_text(prev_bias)}, "
            f"[{', '.join(shape_text(W) for W in weights)}], s){what}")  # fmt: skip
    expected = awq.folded_weights(prev_weight, prev_bias, weights, s)
    got = unpack(learner.folded_weights(prev_weight, prev_bias, weights, s), 3, call)
    rtol = 1e-12 if prev_weight.dtype == torch.float64 else 1e-6
    inputs = {"prev_weight": prev_weight, "s": s} if reveal else None
    mistakes = fold_mistakes(prev_weight, prev_bias, weights, s)
    check_tensor_output(got[0], expected[0], call=f"{call}: prev_weight", rtol=rtol, atol=0, inputs=inputs,
                        mistakes=lambda: {k: v[0] for k, v in mistakes.items()})  # fmt: skip
    if expected[1] is None:
        if got[1] is not None:
            raise Mismatch(f"{call}: prev_bias should stay None (the previous op has no bias), got {describe_value(got[1])}")
    else:
        check_tensor_output(got[1], expected[1], call=f"{call}: prev_bias", rtol=rtol, atol=0, mistakes=lambda: {k: v[1] for k, v in mistakes.items()})
    if not isinstance(got[2], (list, tuple)) or len(got[2]) != len(weights):
        raise Mismatch(f"{call}: the third value should be a list of {len(weights)} weights, got {describe_value(got[2])}")
    for i, (g, e) in enumerate(zip(got[2], expected[2])):
        check_tensor_output(g, e, call=f"{call}: weights[{i}]", rtol=rtol, atol=0, mistakes=lambda i=i: {k: v[2][i] for k, v in mistakes.items()})


def positive_scales(K, seed, dtype=torch.float32) -> torch.Tensor:
    return torch.exp(torch.empty(K).uniform_(-1.5, 1.5, generator=generator(seed))).to(dtype)


@graded("05.folded_weights", points=3)
def test_fold_fixed(learner):
    norm = torch.tensor([1.0, 0.5, 2.0, 1.5])
    W1 = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, 1.0, 1.0, -2.0], [3.0, -1.0, 0.0, 1.0]])
    W2 = torch.tensor([[0.5, 0.5, 0.5, 0.5], [-1.0, 2.0, -3.0, 4.0]])
    s = torch.tensor([2.0, 0.5, 1.0, 4.0])
    check_fold(learner, norm, None, [W1, W2], s, " (an RMSNorm's weight and two linears)", reveal=True)
    check_fold(learner, norm, torch.tensor([0.1, -0.2, 0.3, 0.0]), [W1], s, " (a LayerNorm: weight and bias)", reveal=True)


@graded("05.folded_weights", points=4)
def test_fold_into_linears(learner):
    v, o = weight(48, 48, seed=595), weight(48, 48, seed=596)  # square: a wrong axis keeps the shapes
    check_fold(learner, v, None, [o], positive_scales(48, 597), " (v_proj [48, 48] -> o_proj [48, 48], multi-head attention)")
    up, bias, down = weight(64, 32, seed=590), 0.1 * torch.randn(64, generator=generator(591)), weight(16, 64, seed=592)
    check_fold(learner, up, bias, [down], positive_scales(64, 593), " (up_proj [64, 32] -> down_proj [16, 64], with a bias)")
    check_fold(learner, up.double(), None, [down.double()], positive_scales(64, 594, torch.float64), " (float64)")
    check_fold(learner, torch.rand(40, generator=generator(598)) + 0.5, None, [weight(40, 40, seed=599), weight(8, 40, seed=600)],
               positive_scales(40, 601), " (a norm and two linears, one square)")  # fmt: skip


@graded("05.folded_weights", points=3)
def test_fold_real(learner, smollm2):
    search = awq.search_group_scales([smollm2["gate"], smollm2["up"]], smollm2["mlp_x"], spec(4, 64), grid=4)
    s = awq.candidate_scales(awq.activation_mean(smollm2["mlp_x"]), 0.5)
    for scales, label in ((search.scales, f"searched scales, r = {search.ratio:g}"), (s, "r = 0.5")):
        check_fold(learner, smollm2["post_norm"], None, [smollm2["gate"], smollm2["up"]], scales,
                   f" (SmolLM2 post_attention_layernorm -> gate_proj, up_proj rows, {label})")  # fmt: skip


def bad_folds():
    norm, W = torch.ones(8), weight(4, 8, seed=610)
    s = positive_scales(8, 611)
    zero, negative, nan = s.clone(), s.clone(), s.clone()
    zero[3], negative[0], nan[5] = 0.0, -1.0, float("nan")
    return [
        ((norm, None, [W], zero), "a scale of 0: the previous op would divide by 0"),
        ((norm, None, [W], negative), "a negative scale"),
        ((norm, None, [W], nan), "a NaN scale"),
        ((norm, None, [W], s[:6]), "6 scales for 8 channels"),
        ((norm, None, [W], s[None, :]), "s of shape [1, 8]: one scale per channel, [K]"),
        ((norm, None, [W, weight(4, 6, seed=612)], torch.ones(8)), "a weight reading 6 channels where the previous op produces 8"),
    ]


@graded("05.folded_weights", points=2)
def test_fold_refuses_bad_input(learner):
    for args, why in bad_folds():
        call = f"folded_weights(norm [8], None, {len(args[2])} weights, s {shape_text(args[3])})"
        expect_raises(lambda args=args: learner.folded_weights(*args), (ValueError,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# clip_objective


def objective_with(W, x, max_val, sp, mistake) -> torch.Tensor:
    N, K = W.shape
    size = awq.group_size_of(sp, K)
    G = K // size
    m = max_val.to(W.dtype)[..., None]
    blocks = W.reshape(N, G, size)
    clamped = {
        "min only": torch.clamp(blocks, min=-m), "max only": torch.clamp(blocks, max=m), "none": blocks,
    }.get(mistake, torch.clamp(blocks, -m, m)).reshape(N, K)  # fmt: skip
    Q = awq.fake_quantize_groups(clamped, sp)
    if mistake == "after rounding":
        Q = torch.clamp(awq.fake_quantize_groups(W, sp).reshape(N, G, size), -m, m).reshape(N, K)
    if mistake == "not rounded":
        Q = clamped
    target = clamped if mistake == "against clamped" else W
    xs = x.reshape(-1, G, size).to(W.dtype)
    diff = (Q - target).reshape(N, G, size)
    if mistake == "squares":
        return torch.einsum("tgk,ngk->ng", xs**2, diff**2).float() / xs.shape[0]
    error = torch.einsum("tgk,ngk->ntg", xs, diff).float().pow(2)
    if mistake == "sum":
        return error.sum(dim=1)
    if mistake in ("row", "one per row"):
        row = (x.reshape(-1, K).to(W.dtype) @ (Q - target).T).float().pow(2).mean(dim=0)  # [N]
        return row if mistake == "one per row" else row[:, None].expand(N, G).contiguous()
    return error.mean(dim=1)


OBJECTIVE_MISTAKES = {
    "min only": "clamped below only (torch.clamp(w, min=-m)): clamp both sides, to [-m, m]",
    "max only": "clamped above only (torch.clamp(w, max=m)): clamp both sides, to [-m, m]",
    "none": "the weights not clamped to [-m, m] before rounding",
    "after rounding": "clamped after rounding: clamp w to [-m, m] first, so that the clamp sets the group's grid, then round",
    "not rounded": "the clamped weights not rounded: the error is that of Q(clamp(w)), the weight the layer will compute with",
    "against clamped": "compared with the clamped weights: the error is Q(clamp(w)) - w, against the original weights",
    "squares": "sum_k x_k^2 (q_k - w_k)^2: square the dot product x_g . (q_g - w_g) itself (the errors of a group's weights can cancel)",
    "sum": "the sum over the tokens, not the mean",
    "row": "the error of the whole row (all groups together): each group gets its own error, x_g . (q_g - w_g) on its own inputs",
    "one per row": "one error per row (all groups together, [N]): return one error per row and group, [N, G]",
}


def check_objective(learner, W, x, max_val, sp, what="", reveal=False):
    call = f"clip_objective(W {shape_text(W)}, x {shape_text(x)}, max_val {shape_text(max_val)}, {spec_text(sp)}){what}"
    expected = awq.clip_objective(W, x, max_val, sp)
    got = learner.clip_objective(W, x, max_val, sp)
    rtol = 1e-5 if W.dtype == torch.float64 else 1e-4  # float32 squares either way (the result is float32)
    atol = 1e-7 * max(expected.abs().max().item(), 1e-30)
    check_tensor_output(got, expected, call=call, rtol=rtol, atol=atol, what="errors", inputs={"W": W, "max_val": max_val} if reveal else None,
                        mistakes=lambda: {text: objective_with(W, x, max_val, sp, key) for key, text in OBJECTIVE_MISTAKES.items()})  # fmt: skip


def shrunk(W, sp, seed, steps=10) -> torch.Tensor:
    """amax * (1 - i / 20) of each group, i random in 0 .. steps - 1."""
    N, K = W.shape
    size = awq.group_size_of(sp, K)
    amax = W.abs().reshape(N, K // size, size).amax(-1).float()
    i = torch.randint(0, steps, amax.shape, generator=generator(seed))
    return amax * (1 - i / 20)


@graded("05.clip_objective", points=3)
def test_objective_fixed(learner):
    W = torch.tensor([[0.9, -0.1, 0.2, -0.3, 0.05, 0.1, -0.15, 0.6], [-0.2, 0.25, 0.1, 0.0, -0.8, 0.3, 0.1, -0.1]])
    x = torch.tensor([[1.0, 0.5, -1.0, 2.0, 0.3, -0.2, 1.0, 0.5], [0.0, 1.0, 1.0, -1.0, 2.0, 1.0, 0.0, -1.0],
                      [1.5, -0.5, 0.5, 0.5, -1.0, 0.0, 1.0, 1.0]])  # fmt: skip
    max_val = torch.tensor([[0.9, 0.45], [0.2, 0.8]])
    check_objective(learner, W, x, max_val, spec(2, 4), " (2 rows, groups of 4, three tokens)", reveal=True)
    check_objective(learner, W, x, torch.tensor([[0.6], [0.5]]), spec(3, None), " (one grid per row)", reveal=True)


@graded("05.clip_objective", points=4)
def test_objective_randomized(learner):
    for seed, (sp, N, K, dtype) in enumerate([(spec(4, 32), 24, 128, torch.float32), (spec(3, 16), 16, 64, torch.float32),
                                              (spec(2, 64), 8, 128, torch.float64), (spec(4, None), 12, 48, torch.float32)]):  # fmt: skip
        W = weight(N, K, seed=620 + seed, dtype=dtype)
        x = activations((200, K), seed=630 + seed, salient=(3,), dtype=dtype)
        check_objective(learner, W, x, shrunk(W, sp, 640 + seed), sp, f" (random, {name_of(dtype)})")


@graded("05.clip_objective", points=3)
def test_objective_real(learner, smollm2):
    x = awq.sample_tokens(smollm2["down_x"], 128)
    W = smollm2["down"]
    check_objective(learner, W, x, shrunk(W, spec(4, 64), 650), spec(4, 64), " (SmolLM2 down_proj rows on 128 of their real inputs)")
    x = awq.sample_tokens(smollm2["mlp_x"], 128)
    check_objective(learner, smollm2["up"], x, shrunk(smollm2["up"], spec(3, 64), 651), spec(3, 64), " (SmolLM2 up_proj rows)")


# ---------------------------------------------------------------------------------------------
# clip_search


def clip_with(W, x, sp, steps=10, tokens=512, mistake=None) -> awq.ClipSearch:
    """The reference's search with one known mistake switched on."""
    N, K = W.shape
    size = awq.group_size_of(sp, K)
    xs = x.reshape(-1, K) if mistake == "all tokens" else awq.sample_tokens(x, tokens)
    blocks = W.detach().reshape(N, K // size, size)
    amax = (blocks.amax(-1) if mistake == "max w" else blocks.abs().amax(-1)).float()
    fraction = {"tenths": 10}.get(mistake, 20)
    candidates = {"inclusive": range(steps + 1), "from one": range(1, steps + 1)}.get(mistake, range(steps))
    objective = {"min only": "min only", "after rounding": "after rounding"}.get(mistake)
    best_val, best_step = amax.clone(), torch.zeros_like(amax, dtype=torch.int64)
    best_error = torch.full_like(amax, math.inf)
    for i in candidates:
        max_val = amax * (1 - i / fraction)
        error = objective_with(W, xs, max_val, sp, objective) if objective else awq.clip_objective(W, xs, max_val, sp)
        if mistake == "per row":
            error = error.sum(dim=1, keepdim=True).expand_as(error)
        better = error <= best_error if mistake == "ties" else error < best_error
        best_error[better], best_val[better], best_step[better] = error[better], max_val[better], i
    return awq.ClipSearch(best_val, best_step)


CLIP_MISTAKES = {
    "tenths": "m = max|w| (1 - i/10): llm-awq shrinks in steps of 1/20 (i = 0 .. 9, at most 45%)",
    "inclusive": "steps + 1 candidates, i = 0 .. steps: i runs from 0 to steps - 1",
    "from one": "i from 1: i = 0 (no clipping) must be a candidate, so that clipping never does worse than none",
    "all tokens": "every token used: sample them with the given sample_tokens(x, tokens), as llm-awq does",
    "ties": "ties keep the larger shrink (<=): keep the first of equal errors, the smaller i (a group whose inputs are silent keeps i = 0)",
    "max w": "m from max w: shrink max |w|, the larger side of the group's range",
    "per row": "one clamp step per row (the error summed over its groups): each group of each row chooses its own",
    "min only": "clamped below only (through clip_objective): clamp both sides, to [-m, m]",
    "after rounding": "clamped after rounding (through clip_objective): clamp first, then round",
}


def check_clip(learner, W, x, sp, what="", steps=10, tokens=512, batch=None, reveal=False):
    options = {k: v for k, v in (("steps", steps), ("tokens", tokens)) if v != {"steps": 10, "tokens": 512}[k]}
    if batch is not None:
        options["batch"] = batch
    shown = "".join(f", {k}={v}" for k, v in options.items())
    call = f"clip_search(W {shape_text(W)}, x {shape_text(x)}, {spec_text(sp)}{shown}){what}"
    expected = awq.clip_search(W, x, sp, steps, tokens)
    got = fields_of(learner.clip_search(W, x, sp, **options), CLIP_FIELDS, "ClipSearch", call)
    same_kind(got.step, expected.step, f"{call}: step")
    same_kind(got.max_val, expected.max_val, f"{call}: max_val")
    N, K = W.shape
    size = awq.group_size_of(sp, K)
    amax = W.abs().reshape(N, K // size, size).amax(-1).float()
    mistakes = {text: lambda key=key: clip_with(W, x, sp, steps, tokens, key) for key, text in CLIP_MISTAKES.items()}

    def named(message):
        for text, make in mistakes.items():
            result = make()
            if close(got.max_val, result.max_val, 1e-6, 0) and torch.equal(got.step.long(), result.step):
                return f"{message} Your output matches a common mistake: {text}."
        return message

    differs = got.step != expected.step
    if differs.any():
        # a different step is accepted where the two clamps' errors tie up to rounding
        xs = awq.sample_tokens(x, tokens)
        candidates = torch.stack([awq.clip_objective(W, xs, amax * (1 - i / 20), sp) for i in range(steps)])  # [steps, N, G]
        valid = (got.step >= 0) & (got.step < steps)
        if not valid.all():
            raise Mismatch(named(f"{call}: step holds values outside 0 .. {steps - 1}: {describe_value(got.step[~valid][:4])}."))
        mine = candidates.gather(0, got.step.long()[None])[0]
        best = candidates.gather(0, expected.step[None])[0]
        # an exact tie (a silent group: every error 0) must keep the smaller i, as the reference does
        tied = torch.isclose(mine.double(), best.double(), rtol=1e-5, atol=1e-12 * max(best.max().item(), 1e-30)) & (mine != best)
        wrong = differs & ~tied
        if wrong.any():
            n, g = (int(i) for i in wrong.nonzero()[0])
            raise Mismatch(named(
                f"{call}: {int(wrong.sum())} of {wrong.numel()} groups chose another clamp; first at row {n}, group {g}: step "
                f"{int(got.step[n, g])} (error {mine[n, g].item():.6g}), expected {int(expected.step[n, g])} (error {best[n, g].item():.6g})."))
    expected_val = amax * (1 - got.step.long() / 20)
    try:
        expect_close(got.max_val, expected_val, call=f"{call}: max_val", rtol=1e-6, atol=0, inputs={"W": W} if reveal else None)
    except Mismatch as error:
        raise Mismatch(named(str(error))) from None


@graded("05.clip_search", points=3)
def test_clip_fixed(learner):
    W = weight(4, 16, seed=660)
    W[1, 2] = 0.9  # an outlier: its group gains from clipping
    x = activations((40, 16), seed=661)
    check_clip(learner, W, x, spec(3, 8), " (4 rows, groups of 8, one outlier weight)", reveal=True)
    check_clip(learner, W, x, spec(4, None), " (one grid per row)", steps=5)


@graded("05.clip_search", points=4)
def test_clip_randomized(learner):
    W = weight(70, 128, seed=670)
    W[3, 10] = 0.6
    x = activations((600, 128), seed=671, salient=(5,))
    check_clip(learner, W, x, spec(3, 32), " (70 rows in batches of 32: 32, 32 and 6)", batch=32)
    check_clip(learner, W, x, spec(4, 64), " (every 4th token: 600 // 128)", tokens=128)
    check_clip(learner, W.double(), x.double(), spec(2, 32), " (float64)", steps=20)
    check_clip(learner, W[:16], x.reshape(6, 100, 128), spec(4, 16), " (x [6, 100, K])", steps=3)


@graded("05.clip_search", points=4)
def test_clip_real(learner, smollm2):
    check_clip(learner, smollm2["down"], smollm2["down_x"], spec(4, 64), " (SmolLM2 down_proj rows on 256 of their real inputs)", tokens=256)
    check_clip(learner, smollm2["o"], smollm2["o_x"], spec(3, 64), " (SmolLM2 o_proj rows)")


@graded("05.clip_search", points=3)
def test_clip_silent_group_and_bad_input(learner):
    W = weight(12, 64, seed=680)
    x = activations((100, 64), seed=681)
    x[:, 32:] = 0  # the second group's inputs are silent: every clamp has error 0, and i = 0 is kept
    check_clip(learner, W, x, spec(4, 32), " (a group whose inputs are all zero)")
    for args, error, why in bad_clips():
        call = f"clip_search(W {shape_text(args[0])}, x {shape_text(args[1])}, {spec_text(args[2])}, steps={args[3]})"
        expect_raises(lambda args=args: learner.clip_search(*args), (error,), call=call, why=why)


def bad_clips():
    W, x = weight(8, 32, seed=690), activations((20, 32), seed=691)
    return [
        ((W, x, spec(4, 16), 0), ValueError, "steps must be an integer from 1 to 20"),
        ((W, x, spec(4, 16), 21), ValueError, "steps must be an integer from 1 to 20 (m would turn negative)"),
        ((W, x[:, :16], spec(4, 16), 10), ValueError, "x's last dimension must be W's K"),
        ((W[0], x, spec(4, 16), 10), ValueError, "W must be [N, K]"),
        ((W, x.long(), spec(4, 16), 10), TypeError, "x must be a float tensor"),
        ((W, x, spec(4, 24), 10), ValueError, "group_size 24 does not divide K = 32"),
    ]


# ---------------------------------------------------------------------------------------------
# search_layer_clips

LLAMA_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_layer(prefix="", seed=700, K=32, inner=48):
    shapes = {"q_proj": (K, K), "k_proj": (16, K), "v_proj": (16, K), "o_proj": (K, K), "gate_proj": (inner, K), "up_proj": (inner, K),
              "down_proj": (K, inner)}  # fmt: skip
    weights, inputs = {}, {}
    for i, name in enumerate(LLAMA_NAMES):
        N, k = shapes[name.rpartition(".")[2]]
        weights[prefix + name] = weight(N, k, seed=seed + i)
        inputs[prefix + name] = activations((64, k), seed=seed + 10 + i, salient=(1,))
    return weights, inputs


def check_layer_clips(learner, weights, inputs, sp, what=""):
    call = f"search_layer_clips({len(weights)} linears, {spec_text(sp)}){what}"
    expected = awq.search_layer_clips(weights, inputs, sp)
    got = learner.search_layer_clips(weights, inputs, sp)
    if not isinstance(got, dict):
        raise Mismatch(f"{call} should return a dict name -> ClipSearch or None, got {describe_value(got)}")
    if set(got) != set(expected):
        raise Mismatch(f"{call}: keys {sorted(got)}, expected every linear's name {sorted(expected)}")
    for name, e in expected.items():
        g = got[name]
        if e is None and g is not None:
            raise Mismatch(f"{call}: {name} was clipped. q_proj and k_proj are never clipped (their outputs meet in q.k^T, where "
                           "an output error of one is multiplied by the other): return None for them")  # fmt: skip
        if e is not None and g is None:
            short = name.rpartition(".")[2]
            hint = " (only q_proj and k_proj are skipped; v_proj's output goes straight to the weighted sum)" if short == "v_proj" else ""
            raise Mismatch(f"{call}: {name} got None, but it is clipped{hint}")
        if e is not None:
            g = fields_of(g, CLIP_FIELDS, "ClipSearch", f"{call}: {name}")
            same_kind(g.step, e.step, f"{call}: {name}.step")
            if not torch.equal(g.step, e.step):
                raise Mismatch(f"{call}: {name}: the clamp steps differ from clip_search's on that linear's own input")
            expect_close(g.max_val, e.max_val, call=f"{call}: {name}.max_val", rtol=1e-6, atol=0)


@graded("05.search_layer_clips", points=4)
def test_layer_clips_llama(learner):
    weights, inputs = tiny_layer()
    check_layer_clips(learner, weights, inputs, spec(3, 16), " (a Llama decoder layer)")


@graded("05.search_layer_clips", points=2)
def test_layer_clips_names(learner):
    weights, inputs = tiny_layer(prefix="model.layers.3.", seed=720)
    check_layer_clips(learner, weights, inputs, spec(4, 16), " (full names, model.layers.3.self_attn.q_proj, ...)")
    bare = {name: name.rpartition(".")[2] for name in weights if "self_attn" in name}
    check_layer_clips(learner, {b: weights[n] for n, b in bare.items()}, {b: inputs[n] for n, b in bare.items()}, spec(4, 16),
                      " (bare names: q_proj, k_proj, v_proj, o_proj)")  # fmt: skip
