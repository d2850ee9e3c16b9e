"""Hidden suite of lab 07 (QLoRA: adapters on a frozen NF4 base).

Every case compares the learner's function with the reference: `reference_impl/lora_math.py`
(lora_init, lora_forward, adamw_step, lora_training_step), `reference_impl/nf4.py` (matmul_4bit)
and `reference_impl/qlora.py` (memory_plan). Case groups per function: fixed (hand-picked),
randomized (seeded generators), edge cases (r = 1, one input feature, alpha / r far from 1, dropout
masks given explicitly, bfloat16 and float16, tiny gradients where eps matters, large learning
rates where the order of weight decay shows, clipping above and below its threshold, every model
shape and option of the memory plan) and bad input, which must raise the reference's exception
types.

Allowances, stated in the lab:
- float32 results to 1e-5 relative (other association orders of the same formula land a few
  float32 steps away); the adapters after a training step to 1e-4 relative, since a step
  normalises each gradient by its own root mean square and so amplifies those differences.
- bfloat16 and float16 results: each element within one unit in the last place of the
  reference, and at most 2% of the elements off by that unit (a sum computed in float32 and
  rounded once, in another order, lands on the neighbouring value now and then; a path computed
  in 16 bits throughout is off much more often). matmul_4bit may add the bias after the product
  (x @ W_hat.T + bias, two roundings) instead of inside F.linear (one): both are accepted.
- AdamW's clipping: torch divides by the total norm plus 1e-6; leaving the 1e-6 out is within
  the tolerance.
- memory_plan: byte counts within 1 byte (the NF4 bytes are rounded to an integer).

Diagnosis: when an output differs, the outputs of common mistakes (alpha instead of alpha / r,
B random and A zero, x B A instead of x A^T B^T, dropout on the output, no 1 / (1 - p), a 16-bit
low-rank path, no bias correction, L2 instead of decoupled weight decay, the frozen base detached
from the graph, no clipping or clipping per tensor, bits counted as bytes, the double-quantization
constants forgotten, grouped-query attention ignored, ...) are computed by the small wrong
implementations below, and the feedback names the one the learner's output matches.
"""

import math
import types
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from quantcourse.autograder import testing
from quantcourse.autograder.testing import Mismatch, describe_value, expect_close, expect_raises, graded, same_kind
from quantcourse.reference_impl import lora_math, nf4, qlora

GRADED = {
    "lora_init": lora_math.lora_init,
    "matmul_4bit": nf4.matmul_4bit,
    "lora_forward": lora_math.lora_forward,
    "adamw_step": lora_math.adamw_step,
    "lora_training_step": lora_math.lora_training_step,
    "memory_plan": qlora.memory_plan,
}
# The lab spells these out operation by operation (AdamW in torch's order; the init's bound),
# so an honest solution reads like the reference.
SIMILARITY_EXEMPT = {"adamw_step", "lora_init", "matmul_4bit"}
SHAPES = qlora.MODEL_SHAPES
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def one_thread():
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


def wire(value):
    """A QuantState as the learner process receives it: its fields as attributes, nested too."""
    if isinstance(value, nf4.QuantState):
        return types.SimpleNamespace(**{f.name: wire(getattr(value, f.name)) for f in fields(value)})
    if isinstance(value, dict):
        return {k: wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [wire(v) for v in value]
    return value


def unpack(got, n: int, call: str) -> tuple:
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise Mismatch(f"{call} should return a tuple of {n} values, got {describe_value(got)}")
    return tuple(got)


def diagnose(got: torch.Tensor, variants: dict, rtol: float, atol: float) -> str:
    name = testing.matching_variant(got, variants, rtol, atol)
    return f" Your output matches a common mistake: {name}." if name else ""


MANTISSA = {torch.bfloat16: 7, torch.float16: 10}


def spacing(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value of a 16-bit tensor, as float64."""
    exponent = torch.floor(torch.log2(t.double().abs().clamp(min=torch.finfo(t.dtype).tiny)))
    return torch.exp2(exponent - MANTISSA[t.dtype])


def expect_half(got, expected, *, call: str, variants=None, inputs=None, alternatives=()):
    """A 16-bit result: every element within one unit in the last place of the reference (or of
    an accepted alternative order), and at most 2% of them off by that unit."""
    same_kind(got, expected, call)
    allowed = [expected, *alternatives]
    g = got.double()
    off = torch.stack([g != a.double() for a in allowed]).all(dim=0)
    far = torch.stack([(g - a.double()).abs() > spacing(a) * 1.01 for a in allowed]).all(dim=0)
    if not far.any() and off.float().mean() <= 0.02:
        return
    name = None
    for key, value in (variants or {}).items():
        if isinstance(value, torch.Tensor) and value.shape == got.shape and (g == value.double()).float().mean() >= 0.98:
            name = key
            break
    i = tuple(int(j) for j in (far if far.any() else off).nonzero()[0])
    message = (f"{call}: {int(off.sum())} of {off.numel()} values differ from the reference ({int(far.sum())} by more than one unit "
               f"in the last place); first at index {i}: got {got[i].item():.6g}, expected {expected[i].item():.6g}")  # fmt: skip
    if testing.REVEAL_INPUTS and inputs:
        message += ". Inputs: " + ", ".join(f"{k} = {describe_value(v)}" for k, v in inputs.items())
    raise Mismatch(message + "." + (f" Your output matches a common mistake: {name}." if name else ""))


def expect_result(got, expected, *, call, variants=None, inputs=None, rtol=1e-5, atol=1e-6, alternatives=()):
    if isinstance(expected, torch.Tensor) and expected.dtype in HALF:
        expect_half(got, expected, call=call, variants=variants, inputs=inputs, alternatives=alternatives)
    else:
        expect_close(got, expected, call=call, rtol=rtol, atol=atol, variants=variants, inputs=inputs)


# ---------------------------------------------------------------------------------------------
# lora_init


def kaiming(shape, bound, seed, dtype) -> torch.Tensor:
    return torch.empty(shape).uniform_(-bound, bound, generator=generator(seed)).to(dtype)


def init_mistakes(in_features, out_features, r, seed, dtype) -> dict:
    bound = 1 / math.sqrt(in_features)
    zeros_b = torch.zeros(out_features, r, dtype=dtype)
    return {
        "bound sqrt(6 / in): kaiming-uniform with a = 0 (the ReLU gain); nn.Linear uses a = sqrt(5), bound 1 / sqrt(in)": (
            kaiming((r, in_features), math.sqrt(6 / in_features), seed, dtype), zeros_b),
        "bound sqrt(3 / in): the gain sqrt(2 / (1 + a^2)) = sqrt(1/3) left out": (kaiming((r, in_features), math.sqrt(3 / in_features), seed, dtype), zeros_b),
        "fan-in taken as r (A.shape[0]): for A [r, in] the fan-in is in": (kaiming((r, in_features), 1 / math.sqrt(r), seed, dtype), zeros_b),
        "uniform on [0, bound) instead of [-bound, bound)": ((torch.rand(r, in_features, generator=generator(seed)) * bound).to(dtype), zeros_b),
        "a normal draw (kaiming-normal): nn.Linear's init is uniform": (
            (torch.randn(r, in_features, generator=generator(seed)) * bound / math.sqrt(3)).to(dtype), zeros_b),
    }  # fmt: skip


def check_init(learner, in_features, out_features, r, seed, dtype=None):
    call = f"lora_init({in_features}, {out_features}, {r}, seed={seed}" + (f", dtype=torch.{name_of(dtype)})" if dtype else ")")
    kwargs = {"seed": seed} | ({"dtype": dtype} if dtype else {})
    expected = lora_math.lora_init(in_features, out_features, r, **kwargs)
    got = unpack(learner.lora_init(in_features, out_features, r, **kwargs), 2, call)
    mistakes = init_mistakes(in_features, out_features, r, seed, dtype or torch.float32)
    same_kind(got[1], expected[1], f"{call}: B")
    if bool(got[1].ne(0).any()):
        which = ("B random and A zero (the roles swapped): A is drawn, B starts at zero"
                 if isinstance(got[0], torch.Tensor) and not got[0].ne(0).any() else "B drawn like A: B must start at zero")
        raise Mismatch(f"{call}: B has {int(got[1].ne(0).sum())} non-zero values; the update x A^T B^T must start at exactly 0. "
                       f"Your output matches a common mistake: {which}.")  # fmt: skip
    for part, name in enumerate(("A", "B")):
        g, e = got[part], expected[part]
        same_kind(g, e, f"{call}: {name}")
        expect_result(g, e, call=f"{call}: {name}", rtol=0, atol=1e-7, variants={k: v[part] for k, v in mistakes.items()})


@graded("07.lora_init", points=4)
def test_init_fixed(learner):
    check_init(learner, 48, 32, 8, seed=0)
    check_init(learner, 576, 192, 16, seed=7)


@graded("07.lora_init", points=4)
def test_init_randomized(learner):
    g = generator(700)
    for _ in range(4):
        in_features, out_features = (int(v) for v in torch.randint(2, 300, (2,), generator=g))
        r = int(torch.randint(1, 33, (1,), generator=g))
        check_init(learner, in_features, out_features, r, seed=int(torch.randint(0, 10**6, (1,), generator=g)))


@graded("07.lora_init", points=2)
def test_init_edge_cases(learner):
    check_init(learner, 1, 1, 1, seed=3)
    check_init(learner, 9, 1, 1, seed=4)
    check_init(learner, 64, 40, 4, seed=5, dtype=torch.bfloat16)
    check_init(learner, 33, 12, 2, seed=6, dtype=torch.float16)


@graded("07.lora_init", points=2)
def test_init_refuses_bad_input(learner):
    bad = [((48, 32, 0), ValueError, "r must be a positive integer"), ((48, 32, -4), ValueError, "r must be a positive integer"),
           ((48, 32, 2.5), ValueError, "r must be an integer"), ((0, 32, 4), ValueError, "in_features must be a positive integer"),
           ((48, 0, 4), ValueError, "out_features must be a positive integer")]  # fmt: skip
    for args, error, why in bad:
        expect_raises(lambda: learner.lora_init(*args), (error,), call=f"lora_init{args}", why=why)
    expect_raises(lambda: learner.lora_init(8, 8, 2, 0, torch.int32), (TypeError,), call="lora_init(8, 8, 2, 0, torch.int32)",
                  why="the adapters need a floating-point dtype")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# matmul_4bit


def quantized(shape, seed, dtype=torch.float32, blocksize=64, compress=True):
    w = (0.05 * torch.randn(shape, generator=generator(seed))).to(dtype)
    return w, *nf4.quantize_4bit(w, blocksize, "nf4", compress)


def matmul_mistakes(x, packed, state, bias) -> dict:
    w32 = nf4.dequantize_4bit(packed, state, torch.float32)
    w = w32.to(x.dtype)
    b = 0 if bias is None else bias
    found = {
        "bias left out": F.linear(x, w),
        "the result in float32: dequantize to x's dtype and multiply in it": F.linear(x.float(), w32, None if bias is None else bias.float()),
        "dequantized and multiplied in float32, then cast: the weight must be dequantized to x's dtype and the product computed in it": (
            F.linear(x.float(), w32, None if bias is None else bias.float()).to(x.dtype)),
        "the double-quantization codes used as the absmax: decode them (dequantize_4bit does)": F.linear(
            x, nf4.dequantize_blockwise_4bit(packed, state.absmax.float(), state.shape, state.blocksize, "nf4", x.dtype), bias),
    }  # fmt: skip
    if w.shape[0] == w.shape[1]:
        found["W_hat not transposed: y = x W_hat^T (a Linear weight is [out, in])"] = x @ w + b
    return found


def check_matmul(learner, x, packed, state, bias=None, what=""):
    call = f"matmul_4bit(x {shape_text(x)}, packed, state of {list(state.shape)}, bias {shape_text(bias) if bias is not None else None}){what}"
    expected = nf4.matmul_4bit(x, packed, state, bias)
    got = learner.matmul_4bit(x, packed, wire(state), bias)
    # x W^T + bias in two steps rounds twice in 16 bits: accepted beside F.linear's one rounding
    alternatives = () if bias is None else (x @ nf4.dequantize_4bit(packed, state, x.dtype).T + bias,)
    expect_result(got, expected, call=call, variants=matmul_mistakes(x, packed, state, bias), alternatives=alternatives)


@graded("07.matmul_4bit", points=3)
def test_matmul_fixed(learner):
    _, packed, state = quantized((48, 48), 710)
    x = torch.randn(5, 48, generator=generator(711))
    check_matmul(learner, x, packed, state)
    check_matmul(learner, x, packed, state, torch.linspace(-1, 1, 48))
    _, packed, state = quantized((32, 128), 712, compress=False)
    check_matmul(learner, torch.randn(3, 128, generator=generator(713)), packed, state, what=" (no double quantization)")


@graded("07.matmul_4bit", points=3)
def test_matmul_randomized(learner):
    g = generator(720)
    for seed, (out_f, in_f, blocksize) in enumerate([(40, 96, 64), (17, 33, 32), (192, 576, 64), (64, 100, 128)]):
        _, packed, state = quantized((out_f, in_f), 721 + seed, blocksize=blocksize)
        bias = torch.randn(out_f, generator=g) if seed % 2 else None
        check_matmul(learner, torch.randn(2, 7, in_f, generator=g), packed, state, bias, f" (blocks of {blocksize}, x with two leading dims)")


@graded("07.matmul_4bit", points=2)
def test_matmul_sixteen_bit_compute(learner):
    g = generator(730)
    for dtype in HALF:
        _, packed, state = quantized((64, 64), 731)
        check_matmul(learner, torch.randn(6, 64, generator=g).to(dtype), packed, state, torch.randn(64, generator=g).to(dtype),
                     f" (x in {name_of(dtype)}: the weight is dequantized to {name_of(dtype)}, the compute dtype)")  # fmt: skip
    _, packed, state = quantized((24, 64), 732, dtype=torch.bfloat16)
    check_matmul(learner, torch.randn(3, 64, generator=g), packed, state, what=" (a bfloat16 weight, float32 x: dequantize to x's dtype)")


@graded("07.matmul_4bit", points=2)
def test_matmul_refuses_bad_input(learner):
    _, packed, state = quantized((16, 64), 740)
    _, packed1, state1 = quantized((128,), 741)
    x = torch.randn(2, 64)
    cases = [((x[:, :32], packed, wire(state)), "x's last dimension must be in_features = 64"),
             ((torch.randn(2, 16), packed, wire(state)), "x's last dimension must be in_features = 64, not out_features"),
             ((torch.randn(2, 128), packed1, wire(state1)), "the state must belong to a 2-D weight [out, in]")]  # fmt: skip
    for args, why in cases:
        expect_raises(lambda: learner.matmul_4bit(*args), (ValueError,), call=f"matmul_4bit(x {shape_text(args[0])}, state of {list(args[2].shape)})", why=why)


# ---------------------------------------------------------------------------------------------
# lora_forward


def forward_mistakes(x, base_out, A, B, alpha, r, dropout, keep) -> dict:
    """Outputs of wrong forwards, in base_out's dtype."""
    xa = x.to(A.dtype)
    s = alpha / r
    dropped = xa if keep is None else xa * (keep.to(xa.dtype) / (1 - dropout))

    def out(update):
        return (base_out + update).to(base_out.dtype)

    found = {
        "scaled by alpha instead of alpha / r": out(F.linear(F.linear(dropped, A), B) * alpha),
        "scaled by r / alpha instead of alpha / r": out(F.linear(F.linear(dropped, A), B) * (r / alpha)),
        "scaled by alpha / sqrt(r) (rsLoRA's scaling; LoRA and QLoRA use alpha / r)": out(F.linear(F.linear(dropped, A), B) * (alpha / math.sqrt(r))),
        "the scaling left out": out(F.linear(F.linear(dropped, A), B)),
        "the low-rank update without the base output": (F.linear(F.linear(dropped, A), B) * s).to(base_out.dtype),
    }  # fmt: skip
    if x.shape[-1] == B.shape[0]:
        found["x B A instead of x A^T B^T (the update's matrix is B A, [out, in]; a row x multiplies its transpose)"] = out((dropped @ B) @ A * s)
    if keep is not None:
        plain = F.linear(F.linear(xa, A), B) * s
        found |= {
            "kept inputs not scaled by 1 / (1 - p): inverted dropout divides by the keep probability": out(F.linear(F.linear(xa * keep.to(xa.dtype), A), B) * s),
            "scaled by (1 - p) instead of divided by it": out(F.linear(F.linear(xa * keep.to(xa.dtype) * (1 - dropout), A), B) * s),
            "the mask inverted: True means kept": out(F.linear(F.linear(xa * (~keep).to(xa.dtype) / (1 - dropout), A), B) * s),
            "dropout ignored: apply keep / (1 - p) to x when a mask is given": out(plain),
        }  # fmt: skip
        if x.shape[-1] == B.shape[0]:
            found["dropout applied to the update (the output) instead of the adapters' input x"] = out(plain * keep.to(plain.dtype) / (1 - dropout))
            found["dropout applied to the whole output"] = ((base_out + plain) * keep.to(plain.dtype) / (1 - dropout)).to(base_out.dtype)
    if x.dtype in HALF:
        x16, A16, B16 = x, A.to(x.dtype), B.to(x.dtype)
        d16 = x16 if keep is None else x16 * (keep.to(x.dtype) / (1 - dropout))
        found["the low-rank path computed in 16 bits: cast x to the adapters' dtype (float32), not the adapters to x's"] = (
            base_out + F.linear(F.linear(d16, A16), B16) * s).to(base_out.dtype)
    return found


def check_forward(learner, x, base_out, A, B, alpha, r, dropout=0.0, keep=None, what="", reveal=False):
    extra = "" if keep is None else f", dropout={dropout}, keep {shape_text(keep)}"
    call = f"lora_forward(x {shape_text(x)}, base_out {shape_text(base_out)}, A {shape_text(A)}, B {shape_text(B)}, alpha={alpha}, r={r}{extra}){what}"
    args = (x, base_out, A, B, alpha, r) + (() if keep is None else (dropout, keep))
    expected = lora_math.lora_forward(*args)
    got = learner.lora_forward(*args)
    inputs = {"x": x, "base_out": base_out, "A": A, "B": B} if reveal else None
    expect_result(got, expected, call=call, variants=forward_mistakes(x, base_out, A, B, alpha, r, dropout, keep), inputs=inputs)


def layer_tensors(tokens, in_f, out_f, r, seed, dtype=torch.float32):
    """x, base_out, A, B with B non-zero (a trained adapter: B = 0 would hide every mistake)."""
    g = generator(seed)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    base_out = torch.randn(tokens, out_f, generator=g).to(dtype)
    A = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
    B = torch.randn(out_f, r, generator=g) * 0.5
    return x, base_out, A, B


@graded("07.lora_forward", points=4)
def test_forward_fixed(learner):
    x = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    base_out = torch.tensor([[0.1, 0.2, 0.3], [-1.0, 0.0, 1.0]])
    A = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, -1.0, 0.0]])
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    check_forward(learner, x, base_out, A, B, 4, 2, reveal=True)
    check_forward(learner, *layer_tensors(5, 16, 16, 4, 750), 8, 4, what=" (square layer)")
    check_forward(learner, *layer_tensors(6, 32, 12, 8, 751), 16, 8)


@graded("07.lora_forward", points=3)
def test_forward_scaling(learner):
    check_forward(learner, *layer_tensors(4, 20, 20, 1, 752), 1, 1, what=" (r = 1)")
    check_forward(learner, *layer_tensors(4, 20, 30, 1, 753), 16, 1, what=" (r = 1, alpha = 16)")
    check_forward(learner, *layer_tensors(4, 24, 10, 16, 754), 4, 16, what=" (alpha / r = 1/4)")
    check_forward(learner, *layer_tensors(4, 24, 24, 64, 755), 128, 64, what=" (r = 64 > in: still a valid shape)")


@graded("07.lora_forward", points=4)
def test_forward_dropout_masks(learner):
    g = generator(760)
    for seed, (in_f, out_f, p) in enumerate([(16, 16, 0.1), (24, 24, 0.5), (40, 12, 0.05)]):
        x, base_out, A, B = layer_tensors(6, in_f, out_f, 4, 761 + seed)
        keep = torch.rand(x.shape, generator=g) >= p
        check_forward(learner, x, base_out, A, B, 8, 4, p, keep, f" (dropout {p})")
    x, base_out, A, B = layer_tensors(3, 8, 8, 2, 765)
    check_forward(learner, x, base_out, A, B, 4, 2, 0.2, torch.ones(3, 8, dtype=torch.bool), " (every input kept)", reveal=True)


@graded("07.lora_forward", points=4)
def test_forward_dtypes_and_shapes(learner):
    for seed, dtype in enumerate(HALF):
        x, base_out, A, B = layer_tensors(64, 48, 40, 8, 770 + seed, dtype)
        check_forward(learner, x, base_out, A, B * 4, 16, 8, what=f" (x and base_out in {name_of(dtype)}, adapters in float32)")
    x, base_out, A, B = layer_tensors(30, 16, 16, 4, 772, torch.bfloat16)
    check_forward(learner, x, base_out, A, B, 8, 4, 0.1, torch.rand(30, 16, generator=generator(773)) > 0.1, " (bfloat16 with dropout)")
    g = generator(774)
    x3 = torch.randn(2, 3, 5, 24, generator=g)
    check_forward(learner, x3, torch.randn(2, 3, 5, 10, generator=g), torch.randn(4, 24, generator=g), torch.randn(10, 4, generator=g),
                  8, 4, what=" (x with three leading dims)")  # fmt: skip
    check_forward(learner, torch.randn(7, 1, generator=g), torch.randn(7, 3, generator=g), torch.randn(2, 1, generator=g),
                  torch.randn(3, 2, generator=g), 2, 2, what=" (one input feature)")  # fmt: skip
    A, B = lora_math.lora_init(24, 10, 4, seed=1)
    x, base_out = torch.randn(5, 24, generator=g), torch.randn(5, 10, generator=g)
    check_forward(learner, x, base_out, A, B, 8, 4, what=" (B = 0 at the start: the output is base_out)")


@graded("07.lora_forward", points=3)
def test_forward_refuses_bad_input(learner):
    x, base_out, A, B = layer_tensors(3, 20, 12, 4, 780)
    keep = torch.ones(3, 20, dtype=torch.bool)
    cases = [
        ((x, base_out, A, B, 8, 3), ValueError, "A has 4 rows but r = 3"),
        ((x, base_out, A, B, 8, 0), ValueError, "r must be a positive integer"),
        ((x, base_out, A, B, 0, 4), ValueError, "alpha must be positive"),
        ((x, base_out, A, B, 8, 4, 1.0, keep), ValueError, "dropout must be in [0, 1)"),
        ((x[:, :10], base_out, A, B, 8, 4), ValueError, "x has 10 features but A expects 20"),
        ((x, base_out[:, :6], A, B, 8, 4), ValueError, "base_out must be [3, 12]: x's rows, B's out"),
        ((x, base_out, A, B, 8, 4, 0.1, keep.float()), TypeError, "keep must be a bool tensor"),
        ((x, base_out, A, B, 8, 4, 0.1, keep[:2]), ValueError, "keep must be shaped like x"),
        ((x, base_out, A, B, 8, 4, 0.0, keep), ValueError, "a keep mask with dropout 0 is contradictory"),
    ]  # fmt: skip
    for args, error, why in cases:
        shown = ", ".join(shape_text(a) if isinstance(a, torch.Tensor) else repr(a) for a in args)
        expect_raises(lambda: learner.lora_forward(*args), (error,), call=f"lora_forward({shown})", why=why)


# ---------------------------------------------------------------------------------------------
# adamw_step


def adam_mistakes(param, grad, m, v, step, lr, betas, eps, wd) -> dict:
    b1, b2 = betas
    m1 = b1 * m + (1 - b1) * grad
    v1 = b2 * v + (1 - b2) * grad * grad
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    decayed = param * (1 - lr * wd)

    def update(p, mm, vv, c1=bc1, c2=bc2, e=eps):
        return p - lr * (mm / c1) / ((vv / c2).sqrt() + e)

    l2_grad = grad + wd * param
    l2m, l2v = b1 * m + (1 - b1) * l2_grad, b2 * v + (1 - b2) * l2_grad * l2_grad
    found = {
        "no bias correction: divide m by 1 - beta1^step and v by 1 - beta2^step": (update(decayed, m1, v1, 1, 1), m1, v1),
        "m's bias correction left out": (update(decayed, m1, v1, 1, bc2), m1, v1),
        "v's bias correction left out": (update(decayed, m1, v1, bc1, 1), m1, v1),
        "eps inside the square root": (decayed - lr * (m1 / bc1) / (v1 / bc2 + eps).sqrt(), m1, v1),
        "eps added before v's bias correction: (sqrt(v) + eps) / sqrt(1 - beta2^step)": (
            decayed - lr * (m1 / bc1) / ((v1.sqrt() + eps) / math.sqrt(bc2)), m1, v1),
        "the previous m and v used in the update (update the moments first)": (update(decayed, m, v), m1, v1),
        "beta1 and beta2 swapped": (update(decayed, b2 * m + (1 - b2) * grad, b1 * v + (1 - b1) * grad * grad, 1 - b2**step, 1 - b1**step),
                                    b2 * m + (1 - b2) * grad, b1 * v + (1 - b1) * grad * grad),
        "m mixes as (1 - beta1) m + beta1 g: the old moment keeps weight beta1": (
            update(decayed, (1 - b1) * m + b1 * grad, v1), (1 - b1) * m + b1 * grad, v1),
        "v averages |g| instead of g^2": (update(decayed, m1, b2 * v + (1 - b2) * grad.abs()), m1, b2 * v + (1 - b2) * grad.abs()),
        "bias correction with step - 1: the first update is step 1": (
            update(decayed, m1, v1, 1 - b1 ** (step - 1), 1 - b2 ** (step - 1)), m1, v1),
    }  # fmt: skip
    if wd:
        found |= {
            "weight decay added to the gradient (L2, Adam) instead of decoupled (AdamW: p <- p (1 - lr wd))": (update(param, l2m, l2v), l2m, l2v),
            "weight decay not multiplied by lr: p <- p (1 - lr * weight_decay)": (update(param * (1 - wd), m1, v1), m1, v1),
            "weight decay left out": (update(param, m1, v1), m1, v1),
            "weight decay applied after the Adam update instead of before it": (update(param, m1, v1) * (1 - lr * wd), m1, v1),
        }  # fmt: skip
    return found


def check_adam(learner, param, grad, m, v, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.0, what="", reveal=False, defaults=False):
    args = (param, grad, m, v, step) + (() if defaults else (lr, betas, eps, wd))
    call = (f"adamw_step(param {shape_text(param)}, grad, exp_avg, exp_avg_sq, step={step}"
            + ("" if defaults else f", lr={lr}, betas={betas}, eps={eps}, weight_decay={wd}") + f"){what}")  # fmt: skip
    expected = lora_math.adamw_step(*args)
    got = unpack(learner.adamw_step(*args), 3, call)
    mistakes = adam_mistakes(param.double(), grad.double(), m.double(), v.double(), step, lr, betas, eps, wd)
    mistakes = {k: tuple(t.to(param.dtype) for t in value) for k, value in mistakes.items()}
    inputs = {"param": param, "grad": grad, "exp_avg": m, "exp_avg_sq": v} if reveal else None
    for i, name in enumerate(("new param", "new exp_avg", "new exp_avg_sq")):
        same_kind(got[i], expected[i], f"{call}: {name}")
    # A moment is a sum of two terms that may cancel: its tolerance follows the size of the terms.
    atol = {1: 1e-6 * float(m.abs().max() + grad.abs().max()), 2: 1e-6 * float(v.abs().max() + grad.square().max()) + 1e-30, 0: 1e-7}
    # the moments first: a wrong moment explains a wrong parameter
    for i, name in ((1, "new exp_avg"), (2, "new exp_avg_sq"), (0, "new param")):
        expect_close(got[i], expected[i], call=f"{call}: {name}", rtol=1e-5 if i else 1e-6, atol=atol[i], inputs=inputs,
                     variants={k: v[i] for k, v in mistakes.items()})  # fmt: skip


def adam_state(shape, seed, scale=1.0, steps=3):
    """A parameter, a gradient and moments as a few steps of training leave them."""
    g = generator(seed)
    param = torch.randn(shape, generator=g)
    grads = [torch.randn(shape, generator=g) * scale for _ in range(steps + 1)]
    m = sum(0.1 * 0.9 ** (steps - 1 - k) * grads[k] for k in range(steps)) if steps else torch.zeros(shape)
    v = sum(0.001 * 0.999 ** (steps - 1 - k) * grads[k] ** 2 for k in range(steps)) if steps else torch.zeros(shape)
    return param, grads[-1], m, v


@graded("07.adamw_step", points=3)
def test_adam_first_step(learner):
    param = torch.tensor([1.0, -2.0, 0.5, 0.0])
    grad = torch.tensor([0.1, -0.3, 0.0, 2.0])
    zero = torch.zeros(4)
    check_adam(learner, param, grad, zero, zero, 1, lr=0.01, what=" (first step: |update| = lr where g != 0)", reveal=True)
    check_adam(learner, *adam_state((6, 5), 790, steps=0), 1, what=" (first step, default arguments)", defaults=True)


@graded("07.adamw_step", points=4)
def test_adam_later_steps(learner):
    for seed, step in enumerate((2, 4, 10, 1000)):
        param, grad, m, v = adam_state((8, 12), 791 + seed, steps=step if step < 10 else 10)
        check_adam(learner, param, grad, m, v, step, lr=2e-3, what=f" (step {step}, moments from earlier steps)")
    check_adam(learner, *adam_state((4, 4), 796), 3, lr=1e-3, betas=(0.8, 0.95), what=" (other betas)")


@graded("07.adamw_step", points=4)
def test_adam_weight_decay(learner):
    check_adam(learner, *adam_state((5, 7), 800), 3, lr=0.01, wd=0.01, what=" (torch's default weight decay 0.01)")
    check_adam(learner, *adam_state((5, 7), 801), 2, lr=0.1, wd=0.5, what=" (large lr and weight decay: the order of the two shows)")
    param, grad, m, v = adam_state((3, 3), 802)
    check_adam(learner, param * 100, grad, m, v, 4, lr=0.05, wd=0.1, what=" (large weights)")


@graded("07.adamw_step", points=3)
def test_adam_small_gradients(learner):
    check_adam(learner, *adam_state((6, 6), 810, scale=1e-6), 3, lr=1e-3, what=" (gradients near 1e-6: eps = 1e-8 matters)")
    check_adam(learner, *adam_state((6, 6), 811, scale=1e-7), 1, lr=1e-3, eps=1e-6, what=" (gradients below eps)")
    param, grad, m, v = adam_state((5,), 812)
    check_adam(learner, param, torch.zeros(5), m, v, 5, lr=1e-3, what=" (a zero gradient: the moments still decay)")


@graded("07.adamw_step", points=2)
def test_adam_refuses_bad_input(learner):
    param, grad, m, v = adam_state((3, 4), 820)
    cases = [((param, grad, m, v, 0), "step counts updates from 1 (step 0 would divide by 1 - beta^0 = 0)"),
             ((param, grad[:2], m, v, 1), "grad must have param's shape"),
             ((param, grad, m[:, :2], v, 1), "exp_avg must have param's shape"),
             ((param, grad, m, v, 1, 1e-3, (0.9, 1.0)), "beta2 must be below 1"),
             ((param, grad, m, v, 1, -1e-3), "lr must not be negative")]  # fmt: skip
    for args, why in cases:
        expect_raises(lambda: learner.adamw_step(*args), (ValueError,), call=f"adamw_step(..., {', '.join(map(repr, args[4:]))})", why=why)


# ---------------------------------------------------------------------------------------------
# lora_training_step


def tiny_problem(seed, widths=(24, 40, 10), tokens=12, r=4, trained=True, bias=(True, False)):
    """x, labels, bases and adapters of a stack of NF4 layers with adapters (B non-zero if trained)."""
    g = generator(seed)
    x = torch.randn(tokens, widths[0], generator=g) * 2
    labels = torch.randint(0, widths[-1], (tokens,), generator=g)
    bases, adapters = [], []
    for i, (in_f, out_f) in enumerate(zip(widths[:-1], widths[1:])):
        packed, state = nf4.quantize_4bit(torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f))
        bases.append({"packed": packed, "state": state, "bias": torch.randn(out_f, generator=g) * 0.1 if bias[i % len(bias)] else None})
        A, B = lora_math.lora_init(in_f, out_f, r, seed=seed + i)
        adapters.append((A, torch.randn(out_f, r, generator=g) * 0.3 if trained else B))
    return x, labels, bases, adapters


def wrong_step(x, labels, bases, adapters, alpha, r, optimizer_state=None, lr=1e-3, max_grad_norm=0.3, dropout=0.0, keeps=None, *,
               detach_base=False, clip="total", reduction="mean", loss_after=False, ignore_keeps=False, fixed_step=None, weight_decay=0.0):  # fmt: skip
    """lora_training_step with one mistake; returns the same (loss, adapters, state)."""
    params = [t.detach().clone().requires_grad_(True) for pair in adapters for t in pair]
    weights = [nf4.dequantize_4bit(b["packed"], b["state"], torch.float32).requires_grad_(clip == "with_base") for b in bases]
    if optimizer_state is None:
        optimizer_state = {"step": 0, "exp_avg": [tuple(torch.zeros_like(t) for t in p) for p in adapters],
                           "exp_avg_sq": [tuple(torch.zeros_like(t) for t in p) for p in adapters]}  # fmt: skip

    def forward(ps):
        h = x
        for i, base in enumerate(bases):
            base_out = F.linear(h, weights[i], base["bias"])
            if detach_base:
                base_out = base_out.detach()
            keep = None if keeps is None or ignore_keeps else keeps[i]
            h = lora_math.lora_forward(h, base_out, ps[2 * i], ps[2 * i + 1], alpha, r, dropout if keep is not None else 0.0, keep)
        return F.cross_entropy(h, labels, reduction=reduction)

    loss = forward(params)
    loss.backward()
    grads = [p.grad for p in params]
    if clip in ("total", "with_base", "always"):
        counted = grads + ([w.grad for w in weights] if clip == "with_base" else [])
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in counted]))
        coef = max_grad_norm / (total + 1e-6)
        grads = [t * (coef if clip == "always" else coef.clamp(max=1.0)) for t in grads]
    elif clip == "per_tensor":
        grads = [t * (max_grad_norm / (torch.linalg.vector_norm(t) + 1e-6)).clamp(max=1.0) for t in grads]
    step = fixed_step or optimizer_state["step"] + 1
    moments = [t for pair in optimizer_state["exp_avg"] for t in pair]
    squares = [t for pair in optimizer_state["exp_avg_sq"] for t in pair]
    new = [lora_math.adamw_step(p.detach(), gr, m, v, step, lr, weight_decay=weight_decay) for p, gr, m, v in zip(params, grads, moments, squares)]
    new_params = [n[0] for n in new]
    if loss_after:
        with torch.no_grad():
            loss = forward(new_params)
    state = {"step": optimizer_state["step"] + 1, "exp_avg": lora_math.as_pairs([n[1] for n in new]),
             "exp_avg_sq": lora_math.as_pairs([n[2] for n in new])}  # fmt: skip
    return loss.item(), lora_math.as_pairs(new_params), state


STEP_MISTAKES = {
    "the frozen layers' outputs detached (or computed under torch.no_grad()): the adapters below them lose the gradient "
    "that flows back through the frozen weights": {"detach_base": True},
    "no gradient clipping: clip all adapter gradients together to max_grad_norm": {"clip": "none"},
    "each gradient clipped on its own: torch.nn.utils.clip_grad_norm_ scales all of them by one factor from their total norm": {"clip": "per_tensor"},
    "gradients always rescaled to norm max_grad_norm: clipping only shrinks gradients whose total norm exceeds it": {"clip": "always"},
    "the frozen weights' gradients counted in the clipping norm: only the adapters have gradients": {"clip": "with_base"},
    "the summed cross-entropy: the loss is the mean over tokens": {"reduction": "sum"},
    "the loss after the update returned: return the loss the gradients came from": {"loss_after": True},
    "the dropout masks ignored": {"ignore_keeps": True},
    "AdamW's step number not advanced: it is optimizer_state['step'] + 1": {"fixed_step": 1},
    "weight decay 0.01 (torch.optim.AdamW's default): QLoRA trains without weight decay": {"weight_decay": 0.01},
}  # fmt: skip


def flat(adapters) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for pair in adapters for t in pair])


def check_step(learner, x, labels, bases, adapters, alpha, r, state=None, what="", **options):
    call = f"lora_training_step(x {shape_text(x)}, labels, {len(bases)} layers, alpha={alpha}, r={r}" + (
        ", optimizer_state from earlier steps" if state else "") + "".join(f", {k}={v!r}" for k, v in options.items() if k != "keeps") + (
        ", keeps=masks" if options.get("keeps") else "") + f"){what}"  # fmt: skip
    expected = lora_math.lora_training_step(x, labels, bases, adapters, alpha, r, state, **options)
    got = unpack(learner.lora_training_step(x, labels, wire(bases), adapters, alpha, r, state, **options), 3, call)
    loss, new_adapters, new_state = got
    variants = {name: wrong_step(x, labels, bases, adapters, alpha, r, state, **options, **mistake) for name, mistake in STEP_MISTAKES.items()}
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        loss = loss.item()
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isclose(loss, expected[0], rel_tol=1e-5, abs_tol=1e-6):
        name = next((k for k, v in variants.items() if isinstance(loss, (int, float)) and math.isclose(loss, v[0], rel_tol=1e-5)), None)
        raise Mismatch(f"{call} returned the loss {describe_value(loss)}, expected {expected[0]:.6g}."
                       + (f" Your output matches a common mistake: {name}." if name else ""))  # fmt: skip
    shapes = [tuple(t.shape) for pair in expected[1] for t in pair]
    if (not isinstance(new_adapters, (list, tuple)) or len(new_adapters) != len(adapters)
            or any(not isinstance(p, (list, tuple)) or len(p) != 2 or not all(isinstance(t, torch.Tensor) for t in p) for p in new_adapters)):  # fmt: skip
        raise Mismatch(f"{call} should return the new adapters as a list of {len(adapters)} (A, B) pairs, got {describe_value(new_adapters)}")
    if [tuple(t.shape) for pair in new_adapters for t in pair] != shapes:
        raise Mismatch(f"{call}: the new adapters have shapes {[tuple(t.shape) for pair in new_adapters for t in pair]}, expected {shapes}")
    expect_close(flat(new_adapters), flat(expected[1]), call=f"{call}: the new adapters (A_1, B_1, A_2, ... flattened)", rtol=1e-4, atol=1e-6,
                 variants={k: flat(v[1]) for k, v in variants.items()})  # fmt: skip
    if not isinstance(new_state, dict) or set(new_state) != {"step", "exp_avg", "exp_avg_sq"}:
        raise Mismatch(f"{call} should return the optimizer state as a dict with keys 'step', 'exp_avg', 'exp_avg_sq', got {describe_value(new_state)}")
    if new_state["step"] != expected[2]["step"]:
        raise Mismatch(f"{call}: the new optimizer state has step {new_state['step']!r}, expected {expected[2]['step']}")
    for key in ("exp_avg", "exp_avg_sq"):  # Adam's first step does not depend on the gradients' scale: the moments do
        expect_close(flat(new_state[key]), flat(expected[2][key]), call=f"{call}: the new state's {key}", rtol=1e-4, atol=1e-9,
                     variants={k: flat(v[2][key]) for k, v in variants.items()})  # fmt: skip
    return expected


@graded("07.lora_training_step", points=4)
def test_step_from_a_fresh_start(learner):
    x, labels, bases, adapters = tiny_problem(830)
    check_step(learner, x, labels, bases, adapters, 8, 4, what=" (a fresh optimizer, trained adapters)")
    x, labels, bases, adapters = tiny_problem(831, trained=False)
    check_step(learner, x, labels, bases, adapters, 8, 4, lr=0.01, what=" (adapters from lora_init: B = 0, so A stays put)")


@graded("07.lora_training_step", points=5)
def test_step_carries_the_optimizer_state(learner):
    x, labels, bases, adapters = tiny_problem(840)
    state = None
    g = generator(841)
    for step in range(3):  # the reference's state after each step feeds the next
        x = torch.randn(x.shape, generator=g) * 2
        _, adapters, state = check_step(learner, x, labels, bases, adapters, 16, 4, state, lr=0.01, what=f" (step {step + 1} of 3)")
    x, labels, bases, adapters = tiny_problem(842, widths=(16, 32, 32, 6), r=2, bias=(True,))
    check_step(learner, x, labels, bases, adapters, 4, 2, what=" (three layers, r = 2)")


@graded("07.lora_training_step", points=4)
def test_step_with_dropout(learner):
    x, labels, bases, adapters = tiny_problem(850)
    g = generator(851)
    keeps = [torch.rand(12, 24, generator=g) >= 0.1, torch.rand(12, 40, generator=g) >= 0.1]
    check_step(learner, x, labels, bases, adapters, 8, 4, dropout=0.1, keeps=keeps, what=" (dropout 0.1, masks per layer)")
    check_step(learner, x, labels, bases, adapters, 8, 4, dropout=0.1, keeps=[keeps[0], None], what=" (a mask for the first layer only)")


@graded("07.lora_training_step", points=4)
def test_step_clipping_regimes(learner):
    x, labels, bases, adapters = tiny_problem(860, widths=(32, 24, 8), r=8)
    check_step(learner, x, labels, bases, adapters, 16, 8, max_grad_norm=100.0, what=" (max_grad_norm far above the norm: nothing clipped)")
    check_step(learner, x, labels, bases, adapters, 16, 8, max_grad_norm=0.01, what=" (a tight max_grad_norm)")
    _, adapters2, state = lora_math.lora_training_step(x, labels, bases, adapters, 16, 8)
    check_step(learner, x * 0.01, labels, bases, adapters2, 16, 8, state, max_grad_norm=5.0, what=" (small inputs, nothing clipped, second step)")


@graded("07.lora_training_step", points=3)
def test_step_refuses_bad_input(learner):
    x, labels, bases, adapters = tiny_problem(870)
    cases = [((x, labels, wire(bases), adapters[:1], 8, 4), {}, ValueError, "one (A, B) pair per layer"),
             ((x, labels, [], [], 8, 4), {}, ValueError, "at least one layer"),
             ((x, labels.float(), wire(bases), adapters, 8, 4), {}, TypeError, "labels are int64 class indices"),
             ((x, labels, wire(bases), adapters, 8, 4), {"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be positive"),
             ((x, labels, wire(bases), adapters, 8, 4), {"keeps": [None]}, ValueError, "one keep mask (or None) per layer")]  # fmt: skip
    for args, kwargs, error, why in cases:
        expect_raises(lambda: learner.lora_training_step(*args, **kwargs), (error,), call=f"lora_training_step(..., {why})", why=why)


# ---------------------------------------------------------------------------------------------
# memory_plan


def plan_vector(account) -> torch.Tensor:
    return torch.tensor([float(getattr(account, k)) for k in ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")], dtype=torch.float64)


def plan_mistakes(shape, method="qlora", r=8, target_modules=qlora.LLAMA_LINEARS, weight_bytes=2, adapter_bytes=4, optimizer="adamw",
                  state_bytes=None, master_weights=False, blocksize=64, compress_statistics=True) -> dict:  # fmt: skip
    """[frozen, trainable, gradients, states] of wrong plans, as float64 vectors."""
    options = dict(method=method, r=r, target_modules=target_modules, weight_bytes=weight_bytes, adapter_bytes=adapter_bytes, optimizer=optimizer,
                   state_bytes=state_bytes, master_weights=master_weights, blocksize=blocksize, compress_statistics=compress_statistics)  # fmt: skip
    found = {}
    # mistakes about the architecture: the reference's plan for a model that differs in one way
    if shape.kv_heads * shape.head_dim != shape.hidden:
        found["k_proj and v_proj taken as hidden x hidden: with grouped-query attention they are [kv_heads * head_dim, hidden]"] = (
            qlora.memory_plan(replace(shape, kv_heads=shape.hidden // shape.head_dim), **options))
    if not shape.tied_embeddings:
        found["the output head forgotten: an untied model (Llama-2, Llama-3) has its own, vocab x hidden"] = (
            qlora.memory_plan(replace(shape, tied_embeddings=True), **options))
    found = {k: plan_vector(v).tolist() for k, v in found.items()}
    n_states = qlora.OPTIMIZER_STATES[optimizer]
    counters = 4 * (optimizer == "adamw")
    if method == "full":
        n = shape.parameters()
        states = n_states * n * (state_bytes or weight_bytes) + counters * shape.parameter_tensors()
        right = [0, n * weight_bytes, n * weight_bytes, states + (4 * n if master_weights else 0)]
        if master_weights:  # before "one state": with fp32 states over bf16 weights the two can give the same total
            found["the float32 master copy left out (master_weights=True keeps one)"] = [0, right[1], right[2], states]
        found |= {
            "AdamW's step counters left out (one float32 per parameter tensor)": [0, right[1], right[2], right[3] - counters * shape.parameter_tensors()],
            "one optimizer state per weight: AdamW keeps two (m and v)": [0, right[1], right[2], right[3] - n * (state_bytes or weight_bytes) * (n_states // 2)],
            "the optimizer states in float32 regardless of state_bytes / weight_bytes": [
                0, right[1], right[2], n_states * n * 4 + counters * shape.parameter_tensors() + (4 * n if master_weights else 0)],
        }  # fmt: skip
        return {k: torch.tensor([float(x) for x in v], dtype=torch.float64) for k, v in found.items()}
    linears = shape.linear_shapes()
    targets = set(target_modules)
    adapters = shape.layers * sum(r * sum(linears[t]) for t in targets)
    tensors = 2 * shape.layers * len(targets)
    bpw = nf4.bits_per_weight(blocksize, compress_statistics) if method == "qlora" else None
    other = shape.other_weights() * weight_bytes
    frozen = shape.linear_weights() * bpw / 8 + other if method == "qlora" else shape.parameters() * weight_bytes
    states = n_states * adapters * (state_bytes or adapter_bytes) + counters * tensors
    right = [frozen, adapters * adapter_bytes, adapters * adapter_bytes, states]
    found |= {
        "the frozen base given gradients: only the adapters train": [frozen, right[1], right[2] + shape.parameters() * weight_bytes, states],
        "optimizer states for every weight: only the adapters have them": [frozen, right[1], right[2], states + n_states * shape.parameters() * (state_bytes or adapter_bytes)],
        "AdamW's step counters left out (one float32 per adapter tensor)": [frozen, right[1], right[2], states - counters * tensors],
        "one optimizer state per adapter weight: AdamW keeps two (m and v)": [frozen, right[1], right[2], states - adapters * (state_bytes or adapter_bytes) * (n_states // 2)],
        "the adapters counted once per model instead of once per layer": [frozen, right[1] / shape.layers, right[2] / shape.layers,
                                                                          n_states * adapters / shape.layers * (state_bytes or adapter_bytes) + counters * tensors],
    }  # fmt: skip
    if method == "qlora":
        linear = shape.linear_weights()
        found |= {
            "bits counted as bytes: bits_per_weight is in bits, divide by 8": [linear * bpw + other, *right[1:]],
            "the NF4 weights at 4 bits: the block constants (absmax and, with double quantization, absmax2) cost bits too": [linear * 4 / 8 + other, *right[1:]],
            "the double-quantization constants forgotten: 4.5 bits per weight (a float32 absmax per block of 64)": [
                linear * nf4.bits_per_weight(blocksize, False) / 8 + other, *right[1:]],
            "the embedding, norms (and untied head) left out of the frozen weights": [linear * bpw / 8, *right[1:]],
            "the embedding and norms stored in NF4 too: only the decoder's linear layers are quantized": [shape.parameters() * bpw / 8, *right[1:]],
            "the 16-bit copy of the base counted as well (LoRA's frozen weights)": [shape.parameters() * weight_bytes, *right[1:]],
        }  # fmt: skip
    return {k: torch.tensor([float(x) for x in v], dtype=torch.float64) for k, v in found.items()}


def check_plan(learner, shape_name, what="", **options):
    shape = SHAPES[shape_name] if isinstance(shape_name, str) else shape_name
    label = shape_name if isinstance(shape_name, str) else "a custom LlamaShape"
    call = f"memory_plan({label}{''.join(f', {k}={v!r}' for k, v in options.items())}){what}"
    expected = qlora.memory_plan(shape, **options)
    got = learner.memory_plan(shape, **options)
    names = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
    if not all(hasattr(got, n) or (isinstance(got, dict) and n in got) for n in names):
        raise Mismatch(f"{call} should return a MemoryAccount (frozen_weights, trainable_weights, gradients, optimizer_states), got {describe_value(got)}")
    values = [getattr(got, n) if hasattr(got, n) else got[n] for n in names]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise Mismatch(f"{call}: each field is a number of bytes, got {dict(zip(names, map(describe_value, values)))}")
    for field, value in zip(("activations", "peak"), (getattr(got, "activations", None), getattr(got, "peak", None))):
        if value is not None:
            raise Mismatch(f"{call}: {field} should stay None in a plan (they are measured, not planned), got {describe_value(value)}")
    got_vector = torch.tensor([float(v) for v in values], dtype=torch.float64)
    mask = (got_vector - plan_vector(expected)).abs() <= 1.0
    if bool(mask.all()):
        return
    i = int((~mask).nonzero()[0])
    message = (f"{call}: {names[i]} is {values[i]:,.0f} bytes, expected {getattr(expected, names[i]):,} "
               f"(all four: got {[round(v) for v in got_vector.tolist()]}, expected {[round(v) for v in plan_vector(expected).tolist()]})")  # fmt: skip
    raise Mismatch(message + "." + diagnose(got_vector, plan_mistakes(shape, **options), rtol=0, atol=1.0))


@graded("07.memory_plan", points=4)
def test_plan_smollm2(learner):
    check_plan(learner, "SmolLM2-135M")
    check_plan(learner, "SmolLM2-135M", r=16, what=" (the published run's rank)")
    check_plan(learner, "SmolLM2-135M", method="lora")


@graded("07.memory_plan", points=5)
def test_plan_published_models(learner):
    for name in ("Llama-2-7B", "Llama-3-8B", "Llama-2-70B"):
        check_plan(learner, name, r=16)
        check_plan(learner, name, method="lora", r=16)
        check_plan(learner, name, method="full", state_bytes=4, master_weights=True, what=" (bf16 weights, fp32 Adam states and master copy)")


@graded("07.memory_plan", points=4)
def test_plan_options(learner):
    check_plan(learner, "Llama-2-7B", r=64, target_modules=("q_proj", "v_proj"), what=" (the original LoRA paper's targets)")
    check_plan(learner, "Llama-3-8B", r=8, target_modules=("k_proj", "v_proj", "k_proj"), what=" (a target named twice counts once)")
    check_plan(learner, "SmolLM2-135M", blocksize=128, compress_statistics=False)
    check_plan(learner, "SmolLM2-135M", blocksize=32)
    check_plan(learner, "SmolLM2-135M", weight_bytes=4, adapter_bytes=2, state_bytes=4)
    check_plan(learner, "SmolLM2-135M", optimizer="sgd")
    check_plan(learner, "SmolLM2-135M", method="full", weight_bytes=4)
    check_plan(learner, "Llama-2-7B", method="full", optimizer="sgd", weight_bytes=2)
    check_plan(learner, qlora.LlamaShape(256, 640, 3, 4, 2, 64, 1000, False), r=1, what=" (r = 1, untied head)")


@graded("07.memory_plan", points=3)
def test_plan_refuses_bad_input(learner):
    shape = SHAPES["SmolLM2-135M"]
    cases = [({"method": "qlora4"}, "method must be 'qlora', 'lora' or 'full'"), ({"optimizer": "adam"}, "optimizer must be 'adamw' or 'sgd'"),
             ({"r": 0}, "r must be a positive integer"), ({"target_modules": ("q_proj", "mlp")}, "'mlp' is not a linear layer of a Llama block"),
             ({"target_modules": "q_proj"}, "target_modules is a list of names, not one string"),
             ({"blocksize": 100}, "blocksize must be one of 32, 64, ..., 4096")]  # fmt: skip
    for kwargs, why in cases:
        expect_raises(lambda: learner.memory_plan(shape, **kwargs), (ValueError,), call=f"memory_plan(SmolLM2-135M, {kwargs})", why=why)
