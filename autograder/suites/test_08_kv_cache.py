"""Hidden suite of lab 08 (KV-cache quantization).

Every case compares the learner's function with `reference_impl/kvcache.py`. The K/V-like states
are Gaussian [B, H, T, D] tensors, some with a few key channels 20 times larger and shifted (the
channel outliers KIVI is built around). Case groups per function: fixed (hand-picked), randomized
(seeded generators), edge cases (all-zero tokens, constant groups, large offsets whose fp16
minimum lies beyond the data, fp16 scales that underflow, float16/bfloat16 input, transposed
views, windows shorter than R, R = 0, contexts on and next to group boundaries) and bad input,
which must raise the exception type the reference raises.

Allowances, stated in the lab:
- Rounding: a value that lies within 10^-3 of a rounding midpoint (ties included) may land on
  either neighbouring code: x / scale and x * (1 / scale), or another order of the same float32
  arithmetic, move such values by a last bit. Every other code must equal the reference's.
- Scales: the int8 scale to 3e-7 relative (max|x| / 127, or a product with 1 / 127); KIVI's fp16
  scale and minimum exactly (the lab gives the recipe: (max - min) / (2^bits - 1) in float32,
  then fp16). Dequantized values to 10^-6 of the group's magnitude. Byte counts exactly.

Diagnosis: when an output differs, the outputs of common mistakes (attention heads instead of KV
heads, K or V counted once, bits instead of bytes, fp8 scales per sequence, the window ignored,
keys leaving the window token by token, an off-by-one window, a group flushed early, per-token
int8 over the wrong axis, 2^b levels instead of 2^b - 1, the grid anchored at the max, constants
not rounded to fp16 before the codes, the packing order, keys grouped per token, ...) are computed
by the small wrong implementations below, and the feedback names the one the learner's output
matches.
"""

import math

import pytest
import torch

from quantcourse.autograder import testing
from quantcourse.autograder.testing import Mismatch, describe_value, expect_close, expect_raises, graded, same_kind
from quantcourse.reference_impl import kvcache as kv

GRADED = {
    "quantized_tokens": kv.quantized_tokens,
    "kv_cache_memory": kv.kv_cache_memory,
    "quantize_int8_per_token": kv.quantize_int8_per_token,
    "quantize_groups": kv.quantize_groups,
    "dequantize_groups": kv.dequantize_groups,
    "update_residual_window": kv.update_residual_window,
}
# The lab spells these out step by step (the quantizer's six-step recipe, scale * q + minimum after
# the given unpacking, the window update's append, count, slice, transpose and concat): an honest
# solution reads like the reference, so similarity says nothing there.
SIMILARITY_EXEMPT = {"quantize_groups", "dequantize_groups", "update_residual_window"}
SMOLLM2 = kv.KNOWN_CONFIGS["smollm2-135m"]
NEAR_TIE = 1e-3  # distance to a rounding midpoint within which either neighbouring code is accepted


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
    return "None" if x is None else type(x).__name__


def states(B=1, H=2, T=16, D=32, seed=0, outlier_channels=(), dtype=torch.float32) -> torch.Tensor:
    """K/V-like states [B, H, T, D]: standard normal; the chosen channels 20x larger and shifted by
    +8 (keys' outlier channels)."""
    x = torch.randn(B, H, T, D, generator=generator(seed))
    for c in outlier_channels:
        x[..., c] = x[..., c] * 20 + 8
    return x.to(dtype)


def grouped(bits=4, group_size=32, residual=128, key_axis="channel") -> kv.KVScheme:
    return kv.KVScheme(f"custom{bits}", "grouped", bits, group_size=group_size, residual=residual, key_axis=key_axis)


def scheme_text(s: kv.KVScheme) -> str:
    if kv.SCHEMES.get(s.name) == s:
        return repr(s.name)
    return f"KVScheme(grouped, bits={s.bits}, group_size={s.group_size}, residual={s.residual}, key_axis={s.key_axis!r})"


def whole_numbers(got, n: int, call: str, names: tuple[str, ...]) -> list[int]:
    """The learner's n numbers (a tuple/list, or an object with the named fields) as ints."""
    if names and not isinstance(got, (tuple, list)):
        if isinstance(got, dict):
            got = [got.get(k) for k in names]
        elif all(hasattr(got, k) for k in names):
            got = [getattr(got, k) for k in names]
        else:
            raise Mismatch(f"{call} should return a KVMemory ({', '.join(names)}), got {describe_value(got)}")
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise Mismatch(f"{call} should return a tuple of {n} whole numbers, got {describe_value(got)}")
    values = []
    for value in got:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
            raise Mismatch(f"{call} returned {describe_value(list(got))}: each value must be a whole number (an int)")
        values.append(int(value))
    return values


def diagnose(got: torch.Tensor, variants: dict) -> str:
    name = testing.matching_variant(got, variants, 0.0, 0.0)
    return f" Your output matches a common mistake: {name}." if name else ""


# ---------------------------------------------------------------------------------------------
# quantized_tokens


def window_mistakes(s: kv.KVScheme, T: int) -> dict:
    """(keys, values) counts of known mistakes, as int64 [2]."""
    if s.kind != "grouped":
        found = {"no tokens counted as quantized for a float, int8 or fp8 scheme: those quantize (or store) every "
                 "token, (T, T); only grouped schemes keep a window": (0, 0)}  # fmt: skip
        return {k: torch.tensor(v) for k, v in found.items()}
    R, G, channel = s.residual, s.group_size, s.key_axis == "channel"

    def keys(n: int) -> int:
        return n // G * G if channel else n

    out = max(0, T - R)
    found = {}
    if channel:
        found["keys leave the window one token at a time: a key group spans G tokens, so keys leave in whole groups of G"] = (out, out)
        found["a key group counted when G - 1 of its tokens have left the window: all G must be older than the newest R"] = (
            max(0, T - R + 1) // G * G, out)
        found["a partial key group counted (rounded up): keys leave only in whole groups of G, rounded down"] = (min(T, -(-out // G) * G), out)
    else:
        found["the naive scheme's keys rounded to whole groups: with key_axis 'token' keys leave one token at a time, like values"] = (
            out // G * G, out)
    found["R + 1 tokens kept in full precision (T - R - 1 quantized): only the newest R stay"] = (keys(max(0, T - R - 1)), max(0, T - R - 1))
    found["R - 1 tokens kept in full precision (T - R + 1 quantized): the newest R stay"] = (keys(max(0, T - R + 1)), max(0, T - R + 1))
    found["values rounded to whole groups of G: each value token is grouped over its channels, so it leaves on its own"] = (keys(out), out // G * G)
    found["no max(0, ...): with fewer than R tokens nothing is quantized, the counts cannot go negative"] = (
        (T - R) // G * G if channel else T - R, T - R)
    found["keys and values swapped: return (keys, values)"] = (out, keys(out))
    return {k: torch.tensor(v) for k, v in found.items()}


def check_window_counts(learner, s: kv.KVScheme, T: int, what: str = "") -> None:
    call = f"quantized_tokens({scheme_text(s)}, context={T}){what}"
    expected = kv.quantized_tokens(s, T)
    got = whole_numbers(learner.quantized_tokens(s, T), 2, call, ())
    if tuple(got) != expected:
        raise Mismatch(f"{call} returned (keys, values) = {tuple(got)}, expected {expected}." + diagnose(torch.tensor(got), window_mistakes(s, T)))


@graded("08.quantized_tokens", points=3)
def test_window_counts_fixed(learner):
    kivi2 = kv.SCHEMES["kivi2"]  # G = 32, R = 128
    for T in (0, 1, 100, 128, 129, 159, 160, 161, 191, 192, 2047, 2048):
        check_window_counts(learner, kivi2, T)
    check_window_counts(learner, kv.SCHEMES["kivi2_r0"], 45, " (no window: the last partial key group stays exact)")
    check_window_counts(learner, kv.SCHEMES["naive2"], 45, " (keys per token, no window)")


@graded("08.quantized_tokens", points=3)
def test_window_counts_randomized(learner):
    g = generator(800)
    for i in range(40):
        bits = (2, 4, 8)[i % 3]
        G = (8, 16, 32, 64)[int(torch.randint(0, 4, (), generator=g))]
        R = G * int(torch.randint(0, 5, (), generator=g))
        axis = "token" if i % 5 == 4 else "channel"
        T = int(torch.randint(0, 6 * G + R, (), generator=g))
        check_window_counts(learner, grouped(bits, G, R, axis), T)


@graded("08.quantized_tokens", points=2)
def test_window_counts_other_schemes(learner):
    for name in ("fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2"):
        for T in (0, 7, 2048):
            check_window_counts(learner, kv.SCHEMES[name], T, " (every token is stored in the scheme's format)")
    s = grouped(8, 1, 3)  # G = 1: keys leave one token at a time as well
    for T in (0, 3, 4, 10):
        check_window_counts(learner, s, T, " (group_size 1)")


# ---------------------------------------------------------------------------------------------
# kv_cache_memory

MEMORY_FIELDS = ("codes", "constants", "full_precision")
MEMORY_MISTAKES = {
    "gqa": "query heads counted instead of KV heads: under grouped-query attention only kv_heads heads are cached",
    "no_two": "K and V not both counted: the cache holds keys and values, a factor 2",
    "bits": "the codes counted in bits: divide by 8 for bytes",
    "all_bits": "everything counted in bits: divide by 8 for bytes",
    "float_bytes_codes": "the float scheme's width taken from float_bytes: that is the width of KIVI's window; the scheme's dtype gives its own",
    "int8_scale_fp16": "the int8 scales counted as 2 bytes: they are float32, 4 bytes",
    "no_constants": "the quantization constants not counted (scales, and for grouped schemes the minimums)",
    "fp8_per_batch": "one fp8 scale per sequence: the scales belong to the layer (one for K, one for V), whatever the batch",
    "fp8_per_head": "one fp8 scale per KV head: the scale is per layer (per tensor), one for K and one for V",
    "fp8_per_token": "fp8 scales per token and head like int8: fp8 uses one scale per layer for K and for V",
    "scale_only": "only the scale counted per group: each group stores an fp16 scale and an fp16 minimum",
    "fp32_constants": "the group constants counted as float32: KIVI stores its scale and minimum in fp16",
    "window_ignored": "the residual window not counted: the newest tokens are stored in full precision (float_bytes each)",
    "window_as_codes": "the residual window counted as quantized: the newest R tokens are kept in full precision",
    "window_fixed_2": "the window counted at 2 bytes regardless of float_bytes",
    "window_fixed_4": "the window counted at 4 bytes regardless of float_bytes",
    "keys_per_token": "keys leaving the window one token at a time: per-channel key groups leave in whole groups of G (quantized_tokens)",
    "no_batch": "batch not multiplied in: every sequence has its own cache",
}


def memory_with(config: kv.KVConfig, scheme, context: int, batch: int = 1, float_bytes: int = 2, mistake: str | None = None) -> list[int]:
    """[codes, constants, full_precision] bytes, with one known mistake switched on (None: the
    reference's figures, which `test_memory_with_no_mistake_is_the_reference` checks)."""
    s = kv.get_scheme(scheme)
    if mistake == "no_batch":
        batch = 1
    heads = config.query_heads if mistake == "gqa" else config.kv_heads
    factor = 1 if mistake == "no_two" else 2
    lanes, D = batch * config.layers * heads, config.head_dim

    def code_bytes(n: int, bits: int) -> int:
        return n * bits if mistake in ("bits", "all_bits") else n * bits // 8

    elements = factor * lanes * context * D
    if s.kind == "float":
        out = [code_bytes(elements, 8 * float_bytes if mistake == "float_bytes_codes" else torch.finfo(s.dtype).bits), 0, 0]
    elif s.kind == "int8":
        out = [code_bytes(elements, 8), factor * lanes * context * {"int8_scale_fp16": 2, "no_constants": 0}.get(mistake, 4), 0]
    elif s.kind == "fp8":
        scales = {"fp8_per_batch": batch * config.layers, "fp8_per_head": lanes, "fp8_per_token": lanes * context}.get(mistake, config.layers)
        out = [code_bytes(elements, 8), 0 if mistake == "no_constants" else factor * scales * 4, 0]
    else:
        G = s.group_size
        R = 0 if mistake == "window_as_codes" else s.residual
        key_axis = "token" if mistake == "keys_per_token" else s.key_axis
        per_token = max(0, context - R)
        per_channel = per_token // G * G
        parts = [(per_channel if key_axis == "channel" else per_token, key_axis), (per_token, "token")][2 - factor :]
        constant_bytes = {"scale_only": 2, "fp32_constants": 8, "no_constants": 0}.get(mistake, 4)
        width = {"window_fixed_2": 2, "window_fixed_4": 4}.get(mistake, float_bytes)
        out = [0, 0, 0]
        for tq, axis in parts:
            out[0] += code_bytes(lanes * tq * D, s.bits)
            out[1] += lanes * (tq // G * D if axis == "channel" else tq * (D // G)) * constant_bytes
            out[2] += 0 if mistake == "window_ignored" else lanes * (context - tq) * D * width
    return [8 * v for v in out] if mistake == "all_bits" else out


def memory_mistakes(config, scheme, context, batch, float_bytes) -> dict:
    found = {}
    for key, text in MEMORY_MISTAKES.items():
        if key == "gqa" and not config.query_heads:
            continue
        found[text] = torch.tensor(memory_with(config, scheme, context, batch, float_bytes, key))
    return found


def check_memory(learner, config: kv.KVConfig, scheme, context: int, batch: int = 1, float_bytes: int = 2, what: str = "") -> None:
    """scheme: a name (passed to the learner as the name) or a KVScheme."""
    s = kv.get_scheme(scheme)
    call = f"kv_cache_memory({config.name}, {scheme_text(s) if not isinstance(scheme, str) else repr(scheme)}, context={context}, batch={batch}, float_bytes={float_bytes}){what}"
    expected = kv.kv_cache_memory(config, scheme, context, batch, float_bytes)
    got = whole_numbers(learner.kv_cache_memory(config, scheme, context, batch, float_bytes), 3, call, MEMORY_FIELDS)
    right = [expected.codes, expected.constants, expected.full_precision]
    if got == right:
        return
    wrong = [f"{name} {g:,} (expected {e:,})" for name, g, e in zip(MEMORY_FIELDS, got, right) if g != e]
    message = f"{call}: " + ", ".join(wrong) + " bytes."
    raise Mismatch(message + diagnose(torch.tensor(got), memory_mistakes(config, scheme, context, batch, float_bytes)))


@graded("08.kv_cache_memory", points=5)
def test_memory_smollm2(learner):
    for name in ("fp16", "int8", "kivi4", "naive2"):
        check_memory(learner, SMOLLM2, name, 2048, float_bytes=4, what=" (the scheme given by name; the fp32 model of this course)")
    for name in kv.SCHEMES:
        check_memory(learner, SMOLLM2, kv.SCHEMES[name], 2048, what=" (an fp16 model: the window in 2 bytes)")


@graded("08.kv_cache_memory", points=4)
def test_memory_published_models(learner):
    for key in ("llama-2-7b", "llama-3-8b", "llama-2-70b"):
        config = kv.KNOWN_CONFIGS[key]
        for name in ("fp16", "int8", "fp8_e4m3", "kivi2"):
            check_memory(learner, config, kv.SCHEMES[name], 4096)
            check_memory(learner, config, kv.SCHEMES[name], 32768, batch=8)


@graded("08.kv_cache_memory", points=6)
def test_memory_randomized(learner):
    g = generator(810)

    def pick(options):
        return options[int(torch.randint(0, len(options), (), generator=g))]

    for i in range(30):
        kv_heads = pick((1, 2, 4, 8))
        config = kv.KVConfig(f"a {i}th config", layers=pick((1, 2, 12, 40)), kv_heads=kv_heads, head_dim=pick((32, 64, 96, 128)),
                             query_heads=kv_heads * pick((1, 2, 3, 8)))  # fmt: skip
        if i % 2:
            bits = pick((2, 4, 8))
            G = pick((8, 16, 32))
            scheme = grouped(bits, G, G * pick((0, 1, 4)), pick(("channel", "channel", "token")))
        else:
            scheme = kv.SCHEMES[pick(list(kv.SCHEMES))]
        context = int(torch.randint(0, 3000, (), generator=g))
        check_memory(learner, config, scheme, context, batch=pick((1, 3, 16)), float_bytes=pick((2, 4)))


@graded("08.kv_cache_memory", points=4)
def test_memory_edges(learner):
    kivi = kv.SCHEMES["kivi4"]  # G = 32, R = 128
    for context in (0, 1, 127, 128, 129, 159, 160, 161):
        check_memory(learner, SMOLLM2, kivi, context, float_bytes=4, what=" (around the window and the first key group)")
    check_memory(learner, SMOLLM2, kv.SCHEMES["fp8_e5m2"], 1000, batch=16, what=" (fp8 scales do not grow with the batch)")
    check_memory(learner, SMOLLM2, kv.SCHEMES["fp8_e4m3"], 0, what=" (an empty cache still has its per-layer scales)")
    check_memory(learner, SMOLLM2, kv.float_scheme(torch.bfloat16), 300, batch=2)
    check_memory(learner, SMOLLM2, grouped(2, 64, 64), 200, what=" (group_size = head_dim)")
    check_memory(learner, SMOLLM2, grouped(8, 1, 0, "token"), 33, what=" (8 bits, groups of 1)")


@graded("08.kv_cache_memory", points=3)
def test_memory_refuses_bad_input(learner):
    cases = [
        (SMOLLM2, kv.SCHEMES["fp16"], -1, 1, "context must be >= 0"),
        (SMOLLM2, kv.SCHEMES["int8"], 100, 0, "batch must be >= 1"),
        (SMOLLM2, grouped(4, 48, 0), 100, 1, "head_dim 64 is not a multiple of group_size 48 (values are grouped over channels)"),
        (SMOLLM2, "int3", 100, 1, "there is no scheme named 'int3' (the given get_scheme raises)"),
    ]
    for config, scheme, context, batch, why in cases:
        expect_raises(lambda config=config, scheme=scheme, context=context, batch=batch: learner.kv_cache_memory(config, scheme, context, batch),
                      (ValueError,),
                      call=f"kv_cache_memory({config.name}, {scheme if isinstance(scheme, str) else scheme_text(scheme)}, context={context}, batch={batch})",
                      why=why)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Codes with the rounding allowance


def expect_codes(got: torch.Tensor, expected: torch.Tensor, near: torch.Tensor, *, call: str, mistakes, inputs=None) -> None:
    """Integer codes equal to the reference's, except that a code whose value lies within NEAR_TIE
    of a rounding midpoint (`near`) may be the neighbouring one."""
    same_kind(got, expected, call)
    ok = (got == expected) | (near & ((got.long() - expected.long()).abs() == 1))
    if bool(ok.all()):
        return
    count = int((~ok).sum())
    index = tuple(int(i) for i in (~ok).nonzero()[0])
    message = (f"{call}: {count} of {ok.numel()} codes differ; first at index {index}: got {got[index].item()}, "
               f"expected {expected[index].item()}")  # fmt: skip
    if testing.REVEAL_INPUTS and inputs:
        message += ". Inputs: " + ", ".join(f"{k} = {describe_value(v)}" for k, v in inputs.items())
    raise Mismatch(message + "." + diagnose(got, mistakes()))


def near_midpoint(t: torch.Tensor) -> torch.Tensor:
    frac = t.double() - t.double().floor()
    return (frac - 0.5).abs() < NEAR_TIE


# ---------------------------------------------------------------------------------------------
# quantize_int8_per_token

INT8_MISTAKES = {
    "128": "scale = max|x| / 128: the largest magnitude must land on code 127, the top of the symmetric grid (scale = max|x| / 127)",
    "255": "scale = max|x| / 255 (2^8 - 1 levels, an unsigned range): symmetric int8 codes run from -127 to 127, so scale = max|x| / 127",
    "tokens": "the maximum taken over the tokens (dim -2), one scale per channel: per-token quantization takes max|x| over each "
    "token's channels (dim -1)",
    "signed max": "max(x) instead of max|x|: a token whose largest magnitude is negative gets clipped",
    "floor": "floor instead of round",
    "trunc": "codes truncated toward zero (cast to int8 without torch.round)",
    "zero scale": "an all-zero token given scale 0 (0 / 0 is NaN): give it scale 1, its codes are 0 either way",
}


def int8_with(x: torch.Tensor, mistake: str) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    if mistake == "tokens":
        scale = xf.abs().amax(dim=-2) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.round(xf / scale[..., None, :]).clamp(-128, 127).to(torch.int8), scale
    amax = xf.amax(dim=-1) if mistake == "signed max" else xf.abs().amax(dim=-1)
    scale = amax / {"128": 128, "255": 255}.get(mistake, 127)
    if mistake != "zero scale":
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    t = xf / scale[..., None]
    r = {"floor": torch.floor, "trunc": torch.trunc}.get(mistake, torch.round)(t)
    return r.nan_to_num(0.0).clamp(-128, 127).to(torch.int8), scale


def check_int8(learner, x: torch.Tensor, what: str = "") -> None:
    call = f"quantize_int8_per_token(x {shape_text(x)}){what}"
    codes_ref, scale_ref = kv.quantize_int8_per_token(x)
    got = learner.quantize_int8_per_token(x)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"{call} should return a tuple (codes, scale), got {describe_value(got)}")
    codes, scale = got
    if isinstance(scale, torch.Tensor) and x.dim() >= 2 and scale.shape == x.shape[:-2] + x.shape[-1:] and x.shape[-2] != x.shape[-1]:
        raise Mismatch(f"{call}: scale has shape {tuple(scale.shape)}, one per channel; expected {tuple(scale_ref.shape)}, one per "
                       "token: take max|x| over the last axis (each token's channels)")  # fmt: skip
    mistakes = {}

    def variants():
        if not mistakes:
            mistakes.update({text: int8_with(x, key) for key, text in INT8_MISTAKES.items()})
        return mistakes

    same_kind(scale, scale_ref, f"{call}: scale")
    try:
        expect_close(scale, scale_ref, call=f"{call}: scale", rtol=3e-7, atol=0.0)
    except Mismatch:
        expect_close(scale, scale_ref, call=f"{call}: scale", rtol=3e-7, atol=0.0, variants={k: v[1] for k, v in variants().items()})
    near = near_midpoint(x.float() / scale_ref[..., None])
    expect_codes(codes, codes_ref, near, call=f"{call}: codes", mistakes=lambda: {k: v[0] for k, v in variants().items()},
                 inputs={"x": x})  # fmt: skip


@graded("08.quantize_int8_per_token", points=4)
def test_int8_fixed(learner):
    x = torch.tensor([[0.5, -1.27, 0.01, 1.0], [-2.0, 0.3, 1.5, -0.2], [0.0, 0.0, 0.0, 0.0], [3.0, 2.0, 1.0, -0.5]])
    check_int8(learner, x, " (four tokens of 4 channels; the second has its largest magnitude negative, the third is zero)")
    check_int8(learner, torch.tensor([[127.0, 63.5, -0.5, 1.5, 2.5, -126.5]]), " (max|x| = 127: scale 1, codes x rounded; ties)")
    check_int8(learner, torch.tensor([0.25, -0.125, 0.0625]), " (a single token [D])")


@graded("08.quantize_int8_per_token", points=5)
def test_int8_randomized(learner):
    check_int8(learner, states(B=2, H=3, T=40, D=64, seed=820))
    check_int8(learner, states(B=1, H=2, T=32, D=32, seed=821, outlier_channels=(3, 17)), " (T = D, outlier channels)")
    check_int8(learner, states(B=1, H=1, T=7, D=128, seed=822) * 1e3, " (large values)")
    check_int8(learner, states(B=3, H=1, T=5, D=16, seed=823) * 1e-4, " (small values)")
    check_int8(learner, torch.randn(50, 24, generator=generator(824)), " ([T, D])")


@graded("08.quantize_int8_per_token", points=5)
def test_int8_edges(learner):
    x = states(B=1, H=2, T=8, D=16, seed=830)
    x[0, 1, 3] = 0
    x[0, 0, 5] = -x[0, 0, 5].abs()  # every value negative
    x[0, 0, 6] = 0.0
    x[0, 0, 6, 2] = 1e-30  # a token with one tiny non-zero value
    check_int8(learner, x, " (an all-zero token, an all-negative token, a token with one tiny value)")
    for dtype in (torch.float16, torch.bfloat16):
        check_int8(learner, states(B=1, H=3, T=10, D=64, seed=831, dtype=dtype), f" ({name_of(dtype)} input: scales in float32)")
    check_int8(learner, states(B=2, H=2, T=9, D=1, seed=832), " (D = 1: every code is +-127 or 0)")
    check_int8(learner, states(B=1, H=2, T=12, D=32, seed=833)[..., ::2], " (a strided view, every other channel)")


# ---------------------------------------------------------------------------------------------
# quantize_groups

GROUP_FIELDS = ("codes", "scale", "minimum", "bits", "group_size")
GROUP_MISTAKES = {
    "levels": "scale = (max - min) / 2^bits: a b-bit code has 2^b - 1 steps between its lowest and highest level",
    "fp32 codes": "the codes computed with the float32 scale and minimum: round them to fp16 first and compute the codes "
    "with the rounded values, so that dequantizing reproduces what the codes were chosen for",
    "fp16 arithmetic": "the scale computed in fp16 arithmetic: compute (max - min) / (2^bits - 1) in float32, then round it to fp16",
    "max offset": "the grid anchored at the group's max (minimum = max): min and max mixed up",
    "floor": "floor instead of round",
    "no clamp": "codes not clamped to 0 .. 2^bits - 1: the fp16-rounded minimum and scale can put a value just outside",
    "high first": "codes packed with the first code in the highest bits: the course packs lowest bits first (the given pack_codes)",
    "zero scale": "a constant group given scale 0 (0 / 0 is NaN): give it scale 1, its codes are 0 either way",
}


def pack_high_first(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    parts = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros_like(parts[..., 0])
    for k in range(per_byte):
        packed |= parts[..., k] << (bits * (per_byte - 1 - k))
    return packed


def groups_with(x: torch.Tensor, bits: int, G: int, mistake: str) -> kv.GroupCodes:
    qmax = 2**bits - 1
    groups = x.float().reshape(*x.shape[:-1], -1, G)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    if mistake == "fp16 arithmetic":
        scale = (high.half() - low.half()) / qmax
    else:
        scale = ((high - low) / (2**bits if mistake == "levels" else qmax)).half()
    if mistake != "zero scale":
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    minimum = (high if mistake == "max offset" else low).half()
    if mistake == "fp32 codes":
        scale32 = (high - low) / qmax
        scale32 = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
        t = (groups - low[..., None]) / scale32[..., None]
    else:
        t = (groups - minimum.float()[..., None]) / scale.float()[..., None]
    q = torch.floor(t) if mistake == "floor" else torch.round(t)
    q = q.nan_to_num(0.0)
    q = q.clamp(-255, 255 + qmax).remainder(256) if mistake == "no clamp" else q.clamp(0, qmax)
    codes = q.to(torch.uint8).reshape(x.shape)
    packed = pack_high_first(codes, bits) if mistake == "high first" else kv.pack_codes(codes, bits)
    return kv.GroupCodes(packed, scale, minimum, bits, G)


def group_fields(got, call: str):
    if not all(hasattr(got, f) for f in GROUP_FIELDS):
        raise Mismatch(f"{call} should return a GroupCodes ({', '.join(GROUP_FIELDS)}), got {describe_value(got)}")
    return got


def check_group_codes(got, expected: kv.GroupCodes, source: torch.Tensor, call: str, mistakes) -> None:
    """got: the learner's GroupCodes (as attributes); source: the float tensor the codes stand for,
    in the codes' layout (groups along its last axis), for the rounding allowance. mistakes: a
    function returning {name: GroupCodes} of known wrong versions."""
    got = group_fields(got, call)
    for field in ("bits", "group_size"):
        if getattr(got, field) != getattr(expected, field):
            raise Mismatch(f"{call}: {field} is {describe_value(getattr(got, field))}, expected {getattr(expected, field)}")
    cache = {}

    def variants(field):
        if not cache:
            cache.update(mistakes())
        if field == "codes":
            return {k: kv.unpack_codes(v.codes, v.bits) for k, v in cache.items() if v.codes.shape == expected.codes.shape}
        return {k: getattr(v, field) for k, v in cache.items()}

    for field in ("scale", "minimum"):
        value, right = getattr(got, field), getattr(expected, field)
        same_kind(value, right, f"{call}: {field}")
        mask = testing.close_mask(value, right, 0.0, 0.0)
        if not bool(mask.all()):
            index = tuple(int(i) for i in (~mask).nonzero()[0])
            raise Mismatch(f"{call}: {int((~mask).sum())} of {mask.numel()} {field}s differ; first at group {index}: got "
                           f"{value[index].item():.6g}, expected {right[index].item():.6g}." + diagnose(value, variants(field)))  # fmt: skip
    codes = got.codes
    if isinstance(codes, torch.Tensor) and codes.shape == source.shape and codes.shape != expected.codes.shape:
        raise Mismatch(f"{call}: codes have shape {tuple(codes.shape)}, one byte per code; expected {tuple(expected.codes.shape)}: "
                       f"pack {8 // expected.bits} codes per byte with the given pack_codes")  # fmt: skip
    same_kind(codes, expected.codes, f"{call}: codes")
    G = expected.group_size
    t = (source.float().reshape(*source.shape[:-1], -1, G) - expected.minimum.float()[..., None]) / expected.scale.float()[..., None]
    near = near_midpoint(t).flatten(-2)
    expect_codes(kv.unpack_codes(codes, expected.bits), kv.unpack_codes(expected.codes, expected.bits), near,
                 call=f"{call}: codes (unpacked)", mistakes=lambda: variants("codes"))  # fmt: skip


def check_groups(learner, x: torch.Tensor, bits: int, G: int, what: str = "") -> None:
    call = f"quantize_groups(x {shape_text(x)}, bits={bits}, group_size={G}){what}"
    expected = kv.quantize_groups(x, bits, G)
    got = learner.quantize_groups(x, bits, G)
    check_group_codes(got, expected, x, call, lambda: {text: groups_with(x, bits, G, key) for key, text in GROUP_MISTAKES.items()})


@graded("08.quantize_groups", points=4)
def test_groups_fixed(learner):
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, -0.5, 0.5, 1.0], [4.0, 4.0, 4.0, 4.0, 0.1, 0.7, 0.3, 0.2]])
    check_groups(learner, x, 2, 4, " (groups of 4: one constant group)")
    check_groups(learner, x, 4, 8)
    check_groups(learner, x, 8, 2)
    check_groups(learner, torch.tensor([-3.0, 1.5, 0.0, 7.25]), 2, 4, " (a single group)")


@graded("08.quantize_groups", points=6)
def test_groups_randomized(learner):
    for i, (bits, G) in enumerate([(2, 32), (4, 32), (8, 16), (2, 8), (4, 64), (2, 4)]):
        check_groups(learner, states(B=2, H=3, T=12, D=64, seed=840 + i), bits, G)
    keys = states(B=1, H=2, T=64, D=32, seed=850, outlier_channels=(4, 21))
    check_groups(learner, keys.transpose(-1, -2).contiguous(), 2, 32, " (keys [B, H, D, T]: each channel over 32 tokens)")
    check_groups(learner, keys, 2, 32, " (the same keys grouped per token: outlier channels in every group)")


@graded("08.quantize_groups", points=6)
def test_groups_edges(learner):
    x = states(B=1, H=2, T=6, D=32, seed=860)
    x[0, 0, 1] = 0.25  # constant groups
    x[0, 1, 2, :16] = -3.0
    check_groups(learner, x, 4, 16, " (constant groups: scale 1)")
    offset = 1000.3 + 0.3 * torch.rand(2, 64, generator=generator(861))
    check_groups(learner, offset, 4, 32, " (values near 1000 with a range of 0.3: the fp16 minimum is 0.5 away)")
    check_groups(learner, -offset, 2, 32, " (values near -1000 with a range of 0.3)")
    tiny = 1e-3 + 1e-9 * torch.arange(32.0)
    check_groups(learner, tiny[None], 2, 32, " (a range of 3e-8: the fp16 scale rounds to 0, so scale 1)")
    for dtype in (torch.float16, torch.bfloat16):
        check_groups(learner, states(B=1, H=1, T=8, D=64, seed=862, dtype=dtype), 4, 32, f" ({name_of(dtype)} input)")
    view = states(B=1, H=2, T=32, D=16, seed=863).transpose(-1, -2)
    check_groups(learner, view, 4, 16, " (a transposed view, not contiguous)")
    check_groups(learner, torch.arange(16.0)[None] / 5, 2, 8, " (evenly spaced values: ties between codes)")


@graded("08.quantize_groups", points=2)
def test_groups_refuse_bad_input(learner):
    x = states(B=1, H=1, T=2, D=32, seed=870)
    for bits, G, why in [(3, 8, "3-bit codes do not fill whole bytes: bits must be 2, 4 or 8"),
                         (4, 24, "32 channels are not a multiple of group_size 24"),
                         (4, 0, "group_size must be a positive integer"),
                         (2, 2, "2-bit codes come four to a byte: two codes per group cannot be packed")]:  # fmt: skip
        expect_raises(lambda bits=bits, G=G: learner.quantize_groups(x[..., : 30 if bits == 2 and G == 2 else 32], bits, G), (ValueError,),
                      call=f"quantize_groups(x, bits={bits}, group_size={G})", why=why)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dequantize_groups

DEQUANT_MISTAKES = {
    "no minimum": "the minimum not added: x = scale * q + minimum",
    "zero point": "x = scale * (q - minimum): the minimum is a value to add, not a zero point to subtract",
    "tiled": "the constants repeated group after group (repeat) instead of each G times in a row (repeat_interleave): "
    "constant k belongs to codes k*G .. k*G + G - 1",
    "high first": "codes unpacked with the first code in the highest bits: the course packs lowest bits first (the given unpack_codes)",
}


def dequantize_with(g: kv.GroupCodes, mistake: str) -> torch.Tensor:
    if mistake == "high first":
        per_byte = 8 // g.bits
        parts = [(g.codes >> (g.bits * (per_byte - 1 - k))) & (2**g.bits - 1) for k in range(per_byte)]
        q = torch.stack(parts, dim=-1).reshape(*g.codes.shape[:-1], -1).float()
    else:
        q = kv.unpack_codes(g.codes, g.bits).float()
    if mistake == "tiled":
        reps = q.shape[-1] // g.scale.shape[-1]
        return q * g.scale.float().tile((reps,)) + g.minimum.float().tile((reps,))
    q = q.reshape(*q.shape[:-1], -1, g.group_size)
    scale, minimum = g.scale.float()[..., None], g.minimum.float()[..., None]
    x = {"no minimum": q * scale, "zero point": scale * (q - minimum)}.get(mistake, q * scale + minimum)
    return x.flatten(-2)


def check_dequantize(learner, g: kv.GroupCodes, what: str = "") -> None:
    call = f"dequantize_groups(GroupCodes: codes {shape_text(g.codes)}, bits={g.bits}, group_size={g.group_size}){what}"
    expected = kv.dequantize_groups(g)
    got = learner.dequantize_groups(g)
    magnitude = (g.minimum.float().abs() + g.scale.float() * (2**g.bits - 1)).max().item()
    try:
        expect_close(got, expected, call=call, rtol=1e-6, atol=1e-6 * magnitude)
    except Mismatch:
        expect_close(got, expected, call=call, rtol=1e-6, atol=1e-6 * magnitude,
                     variants={text: dequantize_with(g, key) for key, text in DEQUANT_MISTAKES.items()})  # fmt: skip


@graded("08.dequantize_groups", points=2)
def test_dequantize_fixed(learner):
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, -0.5, 0.5, 1.0], [4.0, 4.0, 4.0, 4.0, 0.1, 0.7, 0.3, 0.2]])
    for bits, G in ((2, 4), (4, 8), (8, 2)):
        check_dequantize(learner, kv.quantize_groups(x, bits, G))


@graded("08.dequantize_groups", points=4)
def test_dequantize_randomized(learner):
    for i, (bits, G) in enumerate([(2, 32), (4, 32), (8, 16), (2, 8), (4, 64)]):
        check_dequantize(learner, kv.quantize_groups(states(B=2, H=3, T=10, D=64, seed=880 + i, outlier_channels=(5,)), bits, G))
    keys = states(B=1, H=2, T=64, D=32, seed=886).transpose(-1, -2).contiguous()
    check_dequantize(learner, kv.quantize_groups(keys, 2, 32), " (keys stored [B, H, D, T])")


@graded("08.dequantize_groups", points=2)
def test_dequantize_edges(learner):
    x = states(B=1, H=1, T=3, D=16, seed=890)
    x[0, 0, 1] = 2.5
    check_dequantize(learner, kv.quantize_groups(x, 4, 16), " (a constant group: scale 1, codes 0)")
    check_dequantize(learner, kv.quantize_groups(1000.3 + 0.3 * torch.rand(1, 32, generator=generator(891)), 4, 32),
                     " (values near 1000)")  # fmt: skip
    check_dequantize(learner, kv.quantize_groups(states(B=1, H=1, T=4, D=8, seed=892), 8, 1), " (8 bits, groups of 1)")


# ---------------------------------------------------------------------------------------------
# update_residual_window

UPDATE_MISTAKES = {
    "keys per token": "keys grouped per token (over channels) like the values: KIVI groups each key channel over G consecutive "
    "tokens; quantize the leaving keys transposed, [B, H, D, tokens]",
    "R + 1": "R + 1 tokens kept in full precision: only the newest R stay",
    "flush at G - 1": "a key group quantized when G - 1 of its tokens have left the window: wait until all G are older than the newest R",
    "partial group": "a partial key group quantized (the count rounded up): keys leave only in whole groups of G",
    "values in groups": "values held back until G of them have left the window: each value token is grouped over its own "
    "channels and leaves as soon as it is older than the newest R",
    "no window": "the residual window ignored: the newest R tokens stay in full precision",
    "newest": "the newest tokens quantized and the oldest kept: the window holds the newest R tokens",
    "prepended": "the new groups put before the old ones: append them after (concat_groups(quantized, new, dim))",
    "x first": "the new tokens put before the window: append them after it (torch.cat([window, x], dim=-2))",
}


def update_with(quantized, window, x, bits, G, R, axis, mistake):
    """The reference's update_residual_window with one known mistake switched on."""
    window = x if window is None else torch.cat([x, window] if mistake == "x first" else [window, x], dim=-2)
    w = window.shape[-2]
    by_channel = axis == "channel" and mistake != "keys per token"
    out = max(0, w - (0 if mistake == "no window" else R) - (1 if mistake == "R + 1" else 0))
    if by_channel or mistake == "values in groups":
        if mistake == "flush at G - 1":
            out = min(w, max(0, w - R + 1) // G * G)
        elif mistake == "partial group":
            out = min(w, -(-out // G) * G)
        else:
            out = out // G * G
    if not out:
        return quantized, window
    old, window = (window[..., w - out :, :], window[..., : w - out, :]) if mistake == "newest" else (window[..., :out, :], window[..., out:, :])
    if by_channel:
        new, dim = kv.quantize_groups(old.transpose(-1, -2).contiguous(), bits, G), -1
    else:
        new, dim = kv.quantize_groups(old, bits, G), -2
    if quantized is None:
        return new, window.clone()
    return (kv.concat_groups(new, quantized, dim) if mistake == "prepended" else kv.concat_groups(quantized, new, dim)), window.clone()


def same_state(got_q, got_w, q, w) -> bool:
    if not isinstance(got_w, torch.Tensor) or got_w.shape != w.shape or not torch.equal(got_w, w.to(got_w.dtype)):
        return False
    if (got_q is None) != (q is None):
        return False
    if q is None:
        return True
    return all(isinstance(getattr(got_q, f, None), torch.Tensor) and getattr(got_q, f).shape == getattr(q, f).shape
               and torch.equal(getattr(got_q, f), getattr(q, f)) for f in ("codes", "scale", "minimum"))  # fmt: skip


def update_diagnosis(got_q, got_w, quantized, window, x, bits, G, R, axis) -> str:
    for key, text in UPDATE_MISTAKES.items():
        try:
            q, w = update_with(quantized, window, x, bits, G, R, axis, key)
        except (RuntimeError, ValueError):  # a mistake whose layout cannot extend the given state
            continue
        if same_state(got_q, got_w, q, w):
            return f" Your output matches a common mistake: {text}."
    return ""


def tokens_of(q: kv.GroupCodes | None, axis: str) -> int:
    if q is None:
        return 0
    return q.scale.shape[-1] * q.group_size if axis == "channel" else q.scale.shape[-2]


def check_update(learner, state, x, bits, G, R, axis, what=""):
    """One call from `state` = (quantized, window); returns the learner's new state."""
    quantized, window = state
    call = (f"update_residual_window(quantized holding {tokens_of(quantized, axis)} tokens, window {shape_text(window)}, "
            f"x {shape_text(x)}, bits={bits}, group_size={G}, residual={R}, axis={axis!r}){what}")  # fmt: skip
    expected_q, expected_w = kv.update_residual_window(quantized, window, x, bits, G, R, axis)
    got = learner.update_residual_window(quantized, window, x, bits, G, R, axis)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"{call} should return a tuple (quantized, window), got {describe_value(got)}")
    got_q, got_w = got

    def hint():
        return update_diagnosis(got_q, got_w, quantized, window, x, bits, G, R, axis)

    if not isinstance(got_w, torch.Tensor):
        raise Mismatch(f"{call}: the window should be a tensor [B, H, tokens, D], got {describe_value(got_w)}")
    if got_w.shape[:-2] + got_w.shape[-1:] == expected_w.shape[:-2] + expected_w.shape[-1:] and got_w.shape != expected_w.shape:
        raise Mismatch(f"{call}: the window holds {got_w.shape[-2]} tokens, expected {expected_w.shape[-2]}." + hint())
    same_kind(got_w, expected_w, f"{call}: window")
    if not torch.equal(got_w, expected_w):
        raise Mismatch(f"{call}: the window's tokens differ from the newest {expected_w.shape[-2]} tokens, unchanged." + hint())
    if expected_q is None:
        if got_q is not None:
            raise Mismatch(f"{call}: nothing should be quantized yet (quantized None), got {describe_value(got_q)}." + hint())
        return got_q, got_w
    if got_q is None:
        raise Mismatch(f"{call}: quantized is None, expected {tokens_of(expected_q, axis)} quantized tokens." + hint())
    got_q = group_fields(got_q, f"{call}: quantized")
    if not all(isinstance(getattr(got_q, f), torch.Tensor) for f in ("codes", "scale", "minimum")):
        raise Mismatch(f"{call}: quantized.codes, .scale and .minimum should be tensors, got {describe_value(got_q)}")
    if got_q.scale.shape != expected_q.scale.shape or got_q.codes.shape != expected_q.codes.shape:
        raise Mismatch(f"{call}: quantized has codes {shape_text(got_q.codes)} and scale {shape_text(got_q.scale)}, expected codes "
                       f"{shape_text(expected_q.codes)} and scale {shape_text(expected_q.scale)}." + hint())  # fmt: skip
    # what the codes stand for, in their layout: the dequantized earlier groups (whole codes, never
    # near a midpoint) followed by the tokens that left the window in this call
    stream = x if window is None else torch.cat([window, x], dim=-2)
    left = stream[..., : stream.shape[-2] - expected_w.shape[-2], :].float()
    if axis == "channel":
        left = left.transpose(-1, -2)
    source = left if quantized is None else torch.cat([kv.dequantize_groups(quantized), left], dim=-1 if axis == "channel" else -2)
    try:
        check_group_codes(got_q, expected_q, source, f"{call}: quantized", dict)
    except Mismatch as error:
        raise Mismatch(str(error) + hint()) from None
    return got_q, got_w


def feed(learner, x, chunks, bits, G, R, axis, what=""):
    """Write x [B, H, T, D] in chunks of the given sizes (cycled), each call from the learner's
    previous state; returns the final state."""
    state, start, i = (None, None), 0, 0
    while start < x.shape[-2]:
        size = chunks[i % len(chunks)]
        state = check_update(learner, state, x[..., start : start + size, :], bits, G, R, axis,
                             f"{what} (tokens {start}..{min(start + size, x.shape[-2]) - 1} of {x.shape[-2]})")  # fmt: skip
        start, i = start + size, i + 1
    return state


@graded("08.update_residual_window", points=4)
def test_update_fixed(learner):
    x = states(B=1, H=1, T=12, D=4, seed=900, outlier_channels=(1,))
    feed(learner, x, [1], 4, 2, 4, "channel", " (keys, G = 2, R = 4, one token at a time)")
    feed(learner, x, [1], 4, 2, 4, "token", " (values, G = 2, R = 4, one token at a time)")
    feed(learner, x, [5], 4, 2, 4, "channel", " (keys, chunks of 5)")


@graded("08.update_residual_window", points=5)
def test_update_decode(learner):
    x = states(B=2, H=2, T=48, D=32, seed=901, outlier_channels=(7,))
    feed(learner, x, [1], 2, 8, 16, "channel", " (KIVI keys, token by token)")
    feed(learner, x, [1], 2, 8, 16, "token", " (KIVI values, token by token)")


@graded("08.update_residual_window", points=4)
def test_update_prefill_then_decode(learner):
    x = states(B=1, H=3, T=150, D=64, seed=902, outlier_channels=(2, 40))
    for axis in ("channel", "token"):
        feed(learner, x, [100, 1, 1, 1, 47], 4, 16, 32, axis, " (a prompt of 100 tokens, then decoding)")
        feed(learner, x, [31, 64, 5], 2, 32, 64, axis, " (chunks of 31, 64 and 5)")


@graded("08.update_residual_window", points=3)
def test_update_no_window_and_naive_keys(learner):
    x = states(B=2, H=1, T=70, D=32, seed=903, outlier_channels=(9,))
    feed(learner, x, [13], 2, 32, 0, "channel", " (R = 0: only the last partial key group stays exact)")
    feed(learner, x, [13], 2, 32, 0, "token", " (R = 0: every value is quantized at once)")
    feed(learner, x, [1, 9], 4, 16, 32, "token", " (the naive scheme's keys: per token, R = 32)")


@graded("08.update_residual_window", points=2)
def test_update_edges(learner):
    for dtype in (torch.float16, torch.bfloat16):
        x = states(B=1, H=2, T=40, D=16, seed=904, dtype=dtype)
        feed(learner, x, [15], 4, 8, 16, "channel", f" ({name_of(dtype)} tokens: the window keeps their dtype)")
    x = states(B=1, H=1, T=9, D=8, seed=905)
    feed(learner, x, [3], 8, 1, 2, "channel", " (8 bits, groups of 1 token)")
    check_update(learner, (None, None), x[..., :5, :], 2, 4, 8, "channel", " (a first write shorter than R: nothing leaves)")


@graded("08.update_residual_window", points=2)
def test_update_refuses_bad_input(learner):
    x = states(B=1, H=1, T=40, D=16, seed=906)
    for G, R, axis, why in [(8, 16, "tokens", "axis must be 'channel' or 'token'"),
                            (8, 16, "key", "axis must be 'channel' or 'token'"),
                            (8, 12, "channel", "residual 12 is not a multiple of group_size 8"),
                            (8, -8, "token", "residual must not be negative")]:  # fmt: skip
        expect_raises(lambda G=G, R=R, axis=axis: learner.update_residual_window(None, None, x, 4, G, R, axis), (ValueError,),
                      call=f"update_residual_window(None, None, x, bits=4, group_size={G}, residual={R}, axis={axis!r})", why=why)  # fmt: skip
