"""Hidden suite of lab 04 (GPTQ).

Every case compares the learner's function with `reference_impl/gptq.py`. The Hessians are of two
kinds: random ones from correlated inputs with uneven energies (some with dead inputs, fewer
tokens than inputs, or two nearly equal inputs, so that only damping makes them invertible), and
real ones: the inputs of three linear layers of SmolLM2's first decoder layer over 4 calibration
windows of 256 tokens. Those are computed once per machine (loading the model takes seconds) and
kept in the course cache (`lab04-smollm2-hessians-v1.pt`).

Case groups per function: fixed (hand-picked), randomized (seeded generators), real Hessians,
edge cases (dead inputs, damping 0, a Cholesky factorization that fails, ties in the order of
act_order, groups that start inside a block and cross its end, block sizes 1 to K, 2 and 8 bits,
float32 next to float64) and bad input, which must raise the exception type the reference raises.

Allowances, stated in the lab:
- The GPTQ functions are compared in float64 (the reference computes in float64 when W is
  float64), where another order of the same arithmetic cannot move a code: codes, g_idx and perm
  exactly, Q, scales and zeros to float32 rounding, the loss to 1e-6 relative. gptq_quantize's
  float32 cases accept what float32 reordering does to a few rows: at least 99% of the codes
  equal and the loss within 1%.
- accumulate_hessian: float64 to 1e-10 relative; float32 to 1e-5 relative plus 1e-6 of the
  largest entry (a rescale-then-add and an add-then-divide land a few float32 steps apart).
- inverse_cholesky: the relative (Frobenius) difference to the reference below 1e-9 in float64
  and, in float32, below 3e-7 cond(H) (at least 1e-3): other correct routes (torch.linalg.inv,
  then Cholesky) round differently, by an amount that grows with the condition number.
- quantize_column: codes exactly, q to float32 rounding (the reference multiplies in float32).

Diagnosis: when an output differs, the outputs of common mistakes (the 2/n factor or the running
rescale forgotten, sequences counted instead of tokens, damping not relative to mean(diag H),
dead inputs left alone, the lower Cholesky factor, H instead of H^-1, dividing by H_jj or by
[H^-1]_jj instead of the Cholesky diagonal, no elimination of the quantized column, in-block
updates deferred to the block's end, the block's error not propagated or propagated one column
short, a group's range taken at the start of the block, act_order not undone, ...) are computed
by the small wrong implementations below, and the feedback names the one the learner's output
matches.
"""

import json
import math
import types

import pytest
import torch

from quantcourse.autograder import testing
from quantcourse.autograder.sandbox import LearnerError
from quantcourse.autograder.testing import Mismatch, describe_value, expect_close, expect_raises, graded, same_kind
from quantcourse.reference_impl import gptq
from quantcourse.reference_impl.affine import AffineSpec

GRADED = {
    "accumulate_hessian": gptq.accumulate_hessian,
    "prepare_hessian": gptq.prepare_hessian,
    "inverse_cholesky": gptq.inverse_cholesky,
    "quantize_column": gptq.quantize_column,
    "setup_problem": gptq.setup_problem,
    "finish": gptq.finish,
    "gptq_quantize_naive": gptq.gptq_quantize_naive,
    "gptq_quantize": gptq.gptq_quantize,
}
# The lab spells these out step by step, with the code of each step (the dead-input fix, the three
# torch calls of the factorization, the bookkeeping, both loops): an honest solution reads like the
# reference, so similarity says nothing. accumulate_hessian and quantize_column get formulas only.
SIMILARITY_EXEMPT = {"prepare_hessian", "inverse_cholesky", "setup_problem", "finish", "gptq_quantize_naive", "gptq_quantize"}
RESULT_FIELDS = ("Q", "codes", "scales", "zeros", "g_idx", "perm", "damp", "loss")
PROBLEM_FIELDS = ("W", "H", "perm", "group", "scales", "zeros", "group_size", "damp")


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


def spec(bits=4, symmetric=False, group_size=None, granularity=None, rounding="half_even") -> AffineSpec:
    granularity = granularity or ("group" if group_size else "channel")
    return AffineSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size, rounding=rounding)


def spec_text(s: AffineSpec) -> str:
    return s.describe() + ("" if s.rounding == "half_even" else f", {s.rounding}")


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


# ---------------------------------------------------------------------------------------------
# Problems: random inputs and Hessians, and real ones from SmolLM2


def inputs(K, tokens=256, seed=0, dead=(), twins=(), dtype=torch.float64) -> torch.Tensor:
    """Correlated inputs [tokens, K] with energies from 1 to 100. `dead` inputs are zero on every
    token; each input in `twins` copies the one before it up to a 1e-4 difference (H nearly singular)."""
    g = generator(seed)
    mix = torch.eye(K, dtype=dtype) + 0.5 * torch.randn(K, K, generator=g, dtype=dtype) / K**0.5
    X = torch.randn(tokens, K, generator=g, dtype=dtype) @ mix
    X = X * torch.logspace(0, 1, K, dtype=dtype)[torch.randperm(K, generator=g)]
    for k in twins:
        X[:, k] = X[:, k - 1] + 1e-4 * torch.randn(tokens, generator=g, dtype=dtype)
    X[:, list(dead)] = 0
    return X


def hessian(X: torch.Tensor) -> torch.Tensor:
    return gptq.accumulate_hessian(torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype), X, 0)[0]


def weight(N, K, seed=1, dtype=torch.float64) -> torch.Tensor:
    """Gaussian weights (std 0.05), a few 5x larger, like a trained weight matrix."""
    g = generator(seed)
    W = 0.05 * torch.randn(N, K, generator=g, dtype=dtype)
    return W * torch.where(torch.rand(N, K, generator=g) < 0.02, 5.0, 1.0).to(dtype)


SMOLLM2_FILE = "lab04-smollm2-hessians-v1.pt"  # in quantcourse.runtime.cache_dir()
SMOLLM2_LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")  # one per stage of layer 0 with K = 576
SMOLLM2_ROWS = 64  # output rows kept: the rows are separate problems, a few of them make a case


def model_id() -> str | None:
    """The SHA-256 of the cached reference weights, read from the cache's manifest (None if absent)."""
    from quantcourse import models

    manifest = models.reference_cache_path() / models.MANIFEST_FILE
    try:
        return json.loads(manifest.read_text())["weights"]["sha256"]
    except (OSError, ValueError, KeyError):
        return None


def smollm2_layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Name -> (W [64, 576] float32, its first 64 output rows; H [576, 576] float32) of three layers
    of SmolLM2's decoder layer 0, H from 4 calibration windows of 256 tokens. Built once per
    machine (the model loads in seconds) and kept in the course cache."""
    from quantcourse.runtime import cache_dir, exclusive_lock

    path = cache_dir() / SMOLLM2_FILE
    with exclusive_lock(path.with_name(path.name + ".lock")):
        if path.is_file():
            data = torch.load(path)
            if data["model"] == model_id():
                return data["layers"]
        from quantcourse.corpus import token_windows
        from quantcourse.models import load_reference_model
        from quantcourse.surgery import first_layer_inputs

        model, tokenizer = load_reference_model()
        torch.set_num_threads(1)
        hidden, kwargs = first_layer_inputs(model, token_windows(tokenizer, "calibration", 256, 4))
        layer = model.model.layers[0]
        stages = [stage for stage in gptq.LLAMA_STAGES if set(stage) & set(SMOLLM2_LAYERS)]
        hessians = gptq.stage_hessians(layer, hidden, kwargs, stages)
        layers = {}
        for stage, H in zip(stages, hessians):
            for name in set(stage) & set(SMOLLM2_LAYERS):
                layers[name] = (layer.get_submodule(name).weight.detach()[:SMOLLM2_ROWS].clone(), H)
        staging = path.with_name(path.name + ".part")
        torch.save({"model": model.reference_weights_sha256, "layers": layers}, staging)
        staging.rename(path)
        return layers


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_layers()


def real_problem(layers, name, rows, columns=None, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [rows, K'] and H [K', K'] in float64: the first `rows` output rows of a real layer and,
    with `columns`, a random subset of that many of its inputs (a principal submatrix of H is the
    Hessian of those inputs alone)."""
    W, H = layers[name]
    if columns is not None:
        keep = torch.randperm(W.shape[1], generator=generator(seed))[:columns].sort().values
        W, H = W[:, keep], H[keep][:, keep]
    return W[:rows].double(), H.double()


# ---------------------------------------------------------------------------------------------
# accumulate_hessian


def accumulate_mistakes() -> dict:
    """One step (H, x, n) -> (H, n) for each known mistake."""

    def tokens(x):
        return x.reshape(-1, x.shape[-1]).to(torch.float64)

    def mean(H, x, n, scale=2.0, b=None):
        t = tokens(x)
        b = t.shape[0] if b is None else b
        return (H.double() * (n / (n + b)) + scale / (n + b) * t.T @ t).to(H.dtype), n + b

    return {
        "no factor 2: H = (1/n) X^T X; GPTQ's H is the Hessian of the squared error, (2/n) X^T X": (
            lambda H, x, n: mean(H, x, n, scale=1.0)),
        "no running rescale: each batch added as its own mean (2/b) x^T x; the old H must be scaled by n/(n+b)": (
            lambda H, x, n: ((H.double() + 2 / tokens(x).shape[0] * tokens(x).T @ tokens(x)).to(H.dtype), n + tokens(x).shape[0])),
        "the old H not rescaled: H + (2/(n+b)) x^T x; multiply H by n/(n+b) first": (
            lambda H, x, n: ((H.double() + 2 / (n + tokens(x).shape[0]) * tokens(x).T @ tokens(x)).to(H.dtype), n + tokens(x).shape[0])),
        "a sum, not a mean: H + 2 x^T x": (lambda H, x, n: ((H.double() + 2 * tokens(x).T @ tokens(x)).to(H.dtype), n + tokens(x).shape[0])),
        "sequences counted instead of tokens (x.shape[0], as IST-DASLab's gptq.py counts): n counts every row of "
        "x.reshape(-1, K)": lambda H, x, n: mean(H, x, n, b=x.shape[0]),
    }  # fmt: skip


def hessian_tolerance(H: torch.Tensor) -> tuple[float, float]:
    if H.dtype == torch.float64:
        return 1e-10, 1e-12 * max(H.abs().max().item(), 1e-30)
    return 1e-5, 1e-6 * max(H.abs().max().item(), 1e-30)


def check_accumulate(learner, H, x, n, what=""):
    """One call, from the state (H, n); returns the learner's (H, n) for the next call."""
    call = f"accumulate_hessian(H {shape_text(H)}, x {shape_text(x)}, n={n}){what}"
    expected_H, expected_n = gptq.accumulate_hessian(H.clone(), x, n)  # the reference updates H in place
    got_H, got_n = unpack(learner.accumulate_hessian(H, x, n), 2, call)
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    if isinstance(got_n, bool) or not isinstance(got_n, int) or got_n != expected_n:
        hint = " You returned n unchanged." if got_n == n else ""
        if got_n == n + x.shape[0] and x.dim() > 2:
            hint = " You counted x.shape[0] (sequences); n counts tokens: every row of x.reshape(-1, K)."
        raise Mismatch(f"{call} returned n = {describe_value(got_n)}, expected n + tokens = {n} + {tokens} = {expected_n}.{hint}")
    same_kind(got_H, expected_H, f"{call}: H")
    rtol, atol = hessian_tolerance(expected_H)
    expect_close_lazy(got_H, expected_H, call=f"{call}: H", rtol=rtol, atol=atol,
                      mistakes=lambda: {name: step(H, x, n)[0] for name, step in accumulate_mistakes().items()})  # fmt: skip
    return got_H, got_n


def check_batches(learner, batches, H=None, n=0, what=""):
    """Feed the batches one call at a time, each call starting from the learner's previous answer."""
    K = batches[0].shape[-1]
    H = torch.zeros(K, K, dtype=batches[0].dtype) if H is None else H
    for i, x in enumerate(batches):
        H, n = check_accumulate(learner, H, x, n, f"{what} (batch {i + 1} of {len(batches)})")
    return H, n


@graded("04.accumulate_hessian", points=3)
def test_accumulate_fixed(learner):
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]], dtype=torch.float64)
    H, _ = check_batches(learner, [x], what=" (three tokens)")
    expected = 2 / 3 * x.T @ x
    if not torch.allclose(H, expected, rtol=1e-12, atol=0):
        raise Mismatch(f"H for three tokens should be (2/3) X^T X = {expected.tolist()}, got {H.tolist()}")
    check_batches(learner, [x[:1], x[1:]], what=" (one token, then two)")


@graded("04.accumulate_hessian", points=4)
def test_accumulate_running_mean(learner):
    X = inputs(24, tokens=300, seed=400)
    # any batch size and shape: a token, a few, sequences [4, 12, K], the rest
    batches = [X[:1], X[1:9], X[9:57].reshape(4, 12, 24), X[57:]]
    H, _ = check_batches(learner, batches, what=" (batches of 1, 8, 4 x 12 and 243 tokens)")
    if not torch.allclose(H, 2 / 300 * X.T @ X, rtol=1e-10, atol=0):
        raise Mismatch("after all batches H should be (2/n) X^T X over all 300 tokens, whatever the batches")


@graded("04.accumulate_hessian", points=3)
def test_accumulate_dtypes_and_large_n(learner):
    X = inputs(16, tokens=64, seed=401, dtype=torch.float32)
    check_batches(learner, [X[:40], X[40:]], what=" (float32)")
    check_batches(learner, [X[:40].double()], H=torch.zeros(16, 16), what=" (float64 inputs into a float32 H: H keeps its dtype)")
    check_batches(learner, [X[:20]], H=torch.zeros(16, 16, dtype=torch.float64), what=" (float32 inputs into a float64 H)")
    H = hessian(inputs(16, tokens=100, seed=402))
    check_batches(learner, [X[:3].double(), X[3]], H=H, n=10**6, what=" (n = 10^6 tokens seen, then 3 and a single token [K])")


@graded("04.accumulate_hessian", points=2)
def test_accumulate_refuses_bad_input(learner):
    H = torch.zeros(8, 8)
    for args, why in [((H, torch.ones(5, 6), 0), "x must be [..., K] for H [K, K]: 6 inputs do not fit an 8 x 8 H"),
                      ((torch.zeros(8, 6), torch.ones(5, 6), 0), "H must be square [K, K]"),
                      ((torch.zeros(8), torch.ones(5, 8), 0), "H must be a 2-D [K, K] matrix")]:  # fmt: skip
        call = f"accumulate_hessian(H {shape_text(args[0])}, x {shape_text(args[1])}, n=0)"
        expect_raises(lambda args=args: learner.accumulate_hessian(*args), (ValueError,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# prepare_hessian


def prepare_mistakes(H: torch.Tensor, W: torch.Tensor, damp: float) -> dict:
    """(H, W, dead) for each known mistake."""
    dead = H.diagonal() == 0

    def fixed(dead_value=1.0, zero_W=True):
        Hd, Wd = H.clone(), W.clone()
        Hd[dead, dead] = dead_value
        if zero_W:
            Wd[:, dead] = 0
        return Hd, Wd

    def damped(Hd, Wd, amount):
        Hd.diagonal().add_(amount)
        return Hd, Wd, dead

    def damped_first():
        Hd, Wd = H.clone(), W.clone()
        Hd.diagonal().add_(damp * H.diagonal().mean())
        Hd[dead, dead] = 1
        Wd[:, dead] = 0
        return Hd, Wd, dead

    return {
        "damping lambda * I: the damping is relative, lambda * mean(diag H)": damped(*fixed(), damp),
        "damping lambda * max(diag H) instead of the mean": damped(*fixed(), damp * fixed()[0].diagonal().max()),
        "the mean of diag H taken before the dead entries were set to 1": damped(*fixed(), damp * H.diagonal().mean()),
        "damped before the dead entries were set to 1 (set them first: they count in the mean and get damped too)": damped_first(),
        "dead inputs' weights not zeroed (W[:, dead] = 0)": damped(*fixed(zero_W=False), damp * fixed()[0].diagonal().mean()),
        "dead H_dd left at 0 (set it to 1)": damped(*fixed(dead_value=0.0), damp * H.diagonal().mean()),
    }


def check_prepare(learner, H, W, damp=None, what="", reveal=False):
    call = f"prepare_hessian(H {shape_text(H)}, W {shape_text(W)}" + ("" if damp is None else f", damp={damp}") + f"){what}"
    expected = gptq.prepare_hessian(H, W) if damp is None else gptq.prepare_hessian(H, W, damp)
    got = unpack(learner.prepare_hessian(H, W) if damp is None else learner.prepare_hessian(H, W, damp), 3, call)

    def mistakes():
        return prepare_mistakes(H, W, gptq.DAMP if damp is None else damp)

    inputs = {"H": H, "W": W} if reveal and testing.REVEAL_INPUTS else None
    same_kind(got[2], expected[2], f"{call}: dead")
    expect_close(got[2], expected[2], call=f"{call}: dead", rtol=0, atol=0, inputs=inputs, what="entries of the dead mask")
    same_kind(got[1], expected[1], f"{call}: W")
    expect_close_lazy(got[1], expected[1], call=f"{call}: W", rtol=0, atol=0, mistakes=lambda: {k: v[1] for k, v in mistakes().items()})
    same_kind(got[0], expected[0], f"{call}: H")
    rtol, atol = hessian_tolerance(expected[0])
    expect_close_lazy(got[0], expected[0], call=f"{call}: H", rtol=rtol, atol=atol, mistakes=lambda: {k: v[0] for k, v in mistakes().items()})


@graded("04.prepare_hessian", points=3)
def test_prepare_fixed(learner):
    H = torch.tensor([[4.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]], dtype=torch.float64)  # input 1 is dead
    W = torch.tensor([[0.5, -1.0, 0.25], [1.0, 2.0, -0.5]], dtype=torch.float64)
    check_prepare(learner, H, W, 0.1, " (input 1 is dead)", reveal=True)
    check_prepare(learner, H[::2, ::2].contiguous(), W[:, ::2].contiguous(), 0.5, " (no dead input)", reveal=True)


@graded("04.prepare_hessian", points=4)
def test_prepare_random_and_real(learner, smollm2):
    for seed, (K, dead, damp) in enumerate([(32, (3,), 0.01), (48, (0, 17, 47), 0.1), (40, (), None)]):
        X = inputs(K, tokens=128, seed=410 + seed, dead=dead)
        check_prepare(learner, hessian(X), weight(12, K, seed=420 + seed), damp, f" (random, dead inputs {list(dead)})")
    W, H = smollm2["self_attn.q_proj"]
    check_prepare(learner, H, W[:16], None, " (SmolLM2 layer 0 q_proj, float32)")
    W, H = smollm2["self_attn.o_proj"]
    check_prepare(learner, H.double(), W[:16].double(), 0.03, " (SmolLM2 layer 0 o_proj)")


@graded("04.prepare_hessian", points=3)
def test_prepare_edge_cases(learner):
    check_prepare(learner, torch.zeros(6, 6, dtype=torch.float64), weight(3, 6), 0.01, " (every input dead)")
    X = inputs(24, tokens=64, seed=430, dead=(5, 6))
    check_prepare(learner, hessian(X), weight(8, 24), 0.0, " (damp = 0: dead inputs are still fixed)")
    X = inputs(20, tokens=64, seed=431, dead=(19,), dtype=torch.float32)
    check_prepare(learner, hessian(X), weight(4, 20, dtype=torch.float32), 0.01, " (float32: H and W keep their dtype)")


# ---------------------------------------------------------------------------------------------
# inverse_cholesky


def inverse_cholesky_mistakes(H: torch.Tensor) -> dict:
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    L_inv = torch.linalg.solve_triangular(L, torch.eye(H.shape[0], dtype=H.dtype), upper=False)
    return {
        "the lower factor of H^-1: GPTQ uses the upper one, U^T U = H^-1 (torch.linalg.cholesky(..., upper=True))": (
            torch.linalg.cholesky(Hinv)),
        "the upper Cholesky factor of H, not of H^-1": L.T,
        "the lower Cholesky factor of H": L,
        "H^-1 itself, not its Cholesky factor": Hinv,
        "L^-1, the inverse of H's Cholesky factor: (L^-1)^T L^-1 = H^-1 too, but L^-1 is lower triangular and its "
        "rows are not those GPTQ needs": L_inv,
        "L^-T: upper triangular, but L^-T (L^-T)^T = H^-1, the factors in the wrong order (GPTQ's U has U^T U = H^-1)": L_inv.T,
    }  # fmt: skip


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300)).item()


def check_inverse_cholesky(learner, H, what=""):
    call = f"inverse_cholesky(H {shape_text(H)}){what}"
    expected = gptq.inverse_cholesky(H)
    try:
        got = learner.inverse_cholesky(H)
    except LearnerError as error:
        if "LinAlgError" not in str(error):
            raise
        raise Mismatch(
            f"{call} raised LinAlgError, but this H is positive definite: the reference factors it. In float32 the "
            "rounding errors of an explicit inverse (torch.linalg.inv) of an ill-conditioned H can exceed its smallest "
            "eigenvalues, and its Cholesky factorization fails; build H^-1 from H's Cholesky factor with "
            "torch.cholesky_inverse, positive definite by construction."
        ) from None
    same_kind(got, expected, call)
    # float32: another correct route (torch.linalg.inv, then Cholesky) lands about cond(H) float32
    # steps away; the known mistakes differ by tens of percent.
    cond = torch.linalg.cond(H.double()).item()
    tolerance = 1e-9 if H.dtype == torch.float64 else max(1e-3, 3e-7 * cond)
    difference = relative_difference(got, expected)
    if difference <= tolerance:
        return
    message = f"{call}: differs from the upper Cholesky factor U of H^-1 by {difference:.3g} (relative, Frobenius norm)"
    if got.tril(-1).ne(0).any():
        message += "; it is not upper triangular"
    for name, value in inverse_cholesky_mistakes(H).items():
        if relative_difference(got, value) <= tolerance:
            raise Mismatch(f"{message}. Your output matches a common mistake: {name}.")
    raise Mismatch(message + ".")


@graded("04.inverse_cholesky", points=3)
def test_inverse_cholesky_fixed(learner):
    check_inverse_cholesky(learner, torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64), " (H = [[4, 2], [2, 3]])")
    check_inverse_cholesky(learner, torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)), " (diagonal H: U = diag(1/sqrt(H_jj)))")
    check_inverse_cholesky(learner, torch.tensor([[2.0]]), " (1 x 1)")


@graded("04.inverse_cholesky", points=3)
def test_inverse_cholesky_random_and_real(learner, smollm2):
    for seed, (K, dtype) in enumerate([(32, torch.float64), (64, torch.float32)]):
        H = hessian(inputs(K, tokens=128, seed=440 + seed, dtype=dtype))
        check_inverse_cholesky(learner, gptq.prepare_hessian(H, torch.zeros(1, K, dtype=dtype))[0], f" (random, damped, {name_of(dtype)})")
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"):
        W, H = smollm2[name]
        for dtype in (torch.float64, torch.float32):
            H_damped = gptq.prepare_hessian(H.to(dtype), W[:1].to(dtype))[0]
            check_inverse_cholesky(learner, H_damped, f" (SmolLM2 layer 0 {name.split('.')[-1]}, damped, {name_of(dtype)})")


@graded("04.inverse_cholesky", points=2)
def test_inverse_cholesky_refuses_indefinite(learner):
    H = torch.eye(4, dtype=torch.float64)
    H[0, 1] = H[1, 0] = 1.5  # an eigenvalue of -0.5
    expect_raises(lambda: learner.inverse_cholesky(H), (torch.linalg.LinAlgError,), call="inverse_cholesky(H with an eigenvalue -0.5)",
                  why="H is not positive definite: let torch.linalg.cholesky raise its LinAlgError, which the damping retry catches")  # fmt: skip
    dead = hessian(inputs(12, tokens=64, seed=450, dead=(4,)))  # a zero row and column, not prepared
    expect_raises(lambda: learner.inverse_cholesky(dead), (torch.linalg.LinAlgError,), call="inverse_cholesky(H with a dead input, not prepared)",
                  why="H_44 = 0 makes H singular: prepare_hessian's job comes first")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# quantize_column


def round_half(t: torch.Tensor, mode: str) -> torch.Tensor:
    return torch.round(t) if mode == "half_even" else torch.sign(t) * torch.floor(t.abs() + 0.5)


def column_mistakes(w, scale, zero, s: AffineSpec) -> dict:
    """codes [N] uint8 for each known mistake."""
    maxq = 2**s.bits - 1
    t = w.float() / scale
    other = "half_away" if s.rounding == "half_even" else "half_even"

    def codes(values, top=maxq):
        return torch.clamp(values, 0, top).to(torch.uint8)

    found = {
        "the zero point added before rounding, round(w / s + z): add z to the rounded value": codes(round_half(t + zero, s.rounding)),
        "floor instead of round": codes(torch.floor(t) + zero),
        f"rounded {other} although spec.rounding is {s.rounding!r}": codes(round_half(t, other) + zero),
        "no clamp to 0 .. 2^b - 1": (round_half(t, s.rounding) + zero).to(torch.uint8),
        "w / s computed in w's dtype (float64): divide w.float() by the float32 scale, as lab 01's quantize does": codes(
            round_half(w.double() / scale.double(), s.rounding) + zero),
    }
    if s.bits != 4:
        found["clamped to 0 .. 15 (4 bits) whatever spec.bits"] = codes(round_half(t, s.rounding) + zero, 15)
    return found


def check_column(learner, w, scale, zero, s: AffineSpec, what="", reveal=False):
    call = f"quantize_column(w {shape_text(w)}, scale, zero, spec {spec_text(s)}){what}"
    expected = gptq.quantize_column(w, scale, zero, s)
    got_codes, got_q = unpack(learner.quantize_column(w, scale, zero, s), 2, call)
    inputs = {"w": w, "scale": scale, "zero": zero} if reveal else None
    same_kind(got_codes, expected[0], f"{call}: codes")
    expect_close_lazy(got_codes, expected[0], call=f"{call}: codes", rtol=0, atol=0, what="codes",
                      mistakes=lambda: column_mistakes(w, scale, zero, s))  # fmt: skip
    same_kind(got_q, expected[1], f"{call}: q")
    mistakes = {"q = s * codes: the zero point not subtracted": (scale * expected[0].float()).to(w.dtype),
                "q = w: the column returned unquantized": w}  # fmt: skip
    expect_close(got_q, expected[1], call=f"{call}: q", rtol=1.2e-7, atol=0, inputs=inputs, variants=mistakes)


@graded("04.quantize_column", points=3)
def test_column_fixed(learner):
    w = torch.tensor([-0.3, -0.1, 0.0, 0.12, 0.3, 0.45, -0.9, 2.0])
    scale = torch.tensor([0.05, 0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 0.1])
    zero = torch.tensor([6.0, 6.0, 6.0, 6.0, 3.0, 3.0, 3.0, 3.0])
    check_column(learner, w, scale, zero, spec(4), " (4-bit asymmetric; the last two clamp)", reveal=True)
    check_column(learner, w, torch.full((8,), 0.1), torch.full((8,), 8.0), spec(4, True), " (4-bit symmetric: z = 8)", reveal=True)


@graded("04.quantize_column", points=3)
def test_column_randomized(learner):
    for seed, (bits, symmetric) in enumerate([(4, False), (3, True), (2, False), (8, True), (8, False), (4, True)]):
        s = spec(bits, symmetric, 32)
        W = weight(300, 32, seed=460 + seed, dtype=torch.float32)
        scale, zero = gptq.grid_params(W, s)
        check_column(learner, W[:, seed], scale, zero, s, " (a column of a random weight, grids of 32)")
        drifted = W[:, seed] + 0.02 * torch.randn(300, generator=generator(470 + seed))  # after GPTQ's updates, outside the grid
        check_column(learner, drifted, scale, zero, s, " (a column moved by earlier updates: some values leave the grid)")


@graded("04.quantize_column", points=2)
def test_column_ties_and_dtypes(learner):
    k = torch.arange(-4, 4, dtype=torch.float32)
    ties = (k + 0.5) * 0.125  # exactly halfway between two levels of a grid with step 1/8
    for rounding in ("half_even", "half_away"):
        for z in (4.0, 5.0):  # the parity of the zero point matters if it is added before rounding
            check_column(learner, ties, torch.full((8,), 0.125), torch.full((8,), z), spec(4, rounding=rounding),
                         f" (values exactly on ties, {rounding}, z = {z:g})", reveal=True)  # fmt: skip
    nudged = ties.double() + 1e-12  # in float64 just above the tie; w.float() is the tie itself
    check_column(learner, nudged, torch.full((8,), 0.125), torch.full((8,), 4.0), spec(4), " (float64 w: q comes back in float64)", reveal=True)
    W = weight(64, 16, seed=480, dtype=torch.float16)
    check_column(learner, W[:, 3], *gptq.grid_params(W.float(), spec(4, False, 16)), spec(4, False, 16), " (float16 w)")


@graded("04.quantize_column", points=2)
def test_column_refuses_unknown_rounding(learner):
    w = torch.tensor([0.1, -0.2])
    bad = types.SimpleNamespace(**{**vars(spec(4)), "rounding": "nearest"})
    expect_raises(lambda: learner.quantize_column(w, torch.full((2,), 0.1), torch.full((2,), 8.0), bad), (ValueError,),
                  call="quantize_column(w, scale, zero, spec with rounding='nearest')",
                  why="spec.rounding must be 'half_even' or 'half_away'; rounding silently one way would hide the mistake")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Results: a _Problem or a GPTQResult comes back as a namespace of its fields


def fields_of(got, names, kind: str, call: str) -> types.SimpleNamespace:
    if not isinstance(got, types.SimpleNamespace) or any(not hasattr(got, n) for n in names):
        raise Mismatch(f"{call} should return a {kind} (the given dataclass, with fields {', '.join(names)}), got {describe_value(got)}")
    return got


def same_value(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.shape == b.shape and bool(testing.close_mask(a, b.to(a.dtype), 1.2e-7, 0).all())
    if isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


class Mistakes:
    """The outputs of the known mistakes, each computed on first use: naming the learner's mistake
    usually takes a few of them, not all (each is a whole GPTQ run)."""

    def __init__(self, makers: dict):
        self.makers, self.outputs = makers, {}

    def items(self):
        for name, make in self.makers.items():
            if name not in self.outputs:
                try:
                    self.outputs[name] = make()
                except (RuntimeError, ValueError):  # a mistake that breaks the factorization is not the learner's output
                    self.outputs[name] = None
            if self.outputs[name] is not None:
                yield name, self.outputs[name]

    def explaining(self, got, field: str, checked=()) -> str:
        """' Your output matches a common mistake: ...' for the first mistake whose `field` equals the
        learner's, preferring one that also agrees on the fields `checked` before."""
        value = getattr(got, field)
        for strict in (True, False):
            for name, m in self.items():
                if same_value(value, getattr(m, field)) and (not strict or all(same_value(getattr(got, f), getattr(m, f)) for f in checked)):
                    return f" Your output matches a common mistake: {name}."
        return ""


def expect_field(got, expected, field: str, call: str, mistakes: Mistakes, rtol=0.0, atol=0.0, checked=()):
    """One field of a _Problem or GPTQResult, explained by the known mistakes when it differs."""
    g, e = getattr(got, field), getattr(expected, field)
    where = f"{call}: {field}"
    if e is None or g is None:
        if not (e is None and g is None):
            raise Mismatch(f"{where} is {describe_value(g)}, expected {describe_value(e)}.{mistakes.explaining(got, field, checked)}")
        return
    if isinstance(e, list):  # the group of each column
        if not isinstance(g, list) or g != e:
            first = next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), min(len(g), len(e))) if isinstance(g, list) else 0
            raise Mismatch(f"{where} should be a list of {len(e)} ints; differs first at position {first}.{mistakes.explaining(got, field, checked)}")
        return
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isclose(g, e, rel_tol=max(rtol, 1e-12), abs_tol=0):
            raise Mismatch(f"{where} is {describe_value(g)}, expected {describe_value(e)}.{mistakes.explaining(got, field, checked)}")
        return
    same_kind(g, e, where)
    try:
        expect_close(g, e, call=where, rtol=rtol, atol=atol, what="codes" if field == "codes" else "values")
    except Mismatch as error:
        raise Mismatch(str(error) + mistakes.explaining(got, field, checked)) from None


def check_gptq_result(got, expected, call, mistakes):
    """Every field of a GPTQResult computed in float64: integers exactly, floats to float32 rounding."""
    got = fields_of(got, RESULT_FIELDS, "GPTQResult", call)
    order = ("codes", "Q", "g_idx", "perm", "scales", "zeros", "damp", "loss")
    for i, field in enumerate(order):
        expect_field(got, expected, field, call, mistakes, rtol=1e-6 if field == "loss" else 1.2e-7, checked=order[:i])


# ---------------------------------------------------------------------------------------------
# setup_problem


def setup_with(W, H, s, act_order, static_groups, damp, mistake=None) -> gptq._Problem:
    """The reference's setup_problem, with one known mistake switched on."""
    N, K = W.shape
    dtype = gptq.compute_dtype(W)
    W_raw, H_raw = W.detach().to(dtype), H.to(dtype)
    H, W, _ = gptq.prepare_hessian(H_raw, W_raw, damp)
    size = s.group_size if s.granularity == "group" else K
    scales = torch.zeros(K // size, N, dtype=torch.float32)
    zeros = torch.zeros_like(scales)
    dynamic = s.granularity == "group" and not static_groups
    perm = None
    if act_order:
        key = H_raw.diagonal() if mistake == "raw order" else H.diagonal()
        perm = torch.argsort(key, descending=mistake != "ascending", stable=True)
    source = W_raw if mistake == "grids before zeroing" else W
    if mistake == "static grids permuted" and perm is not None:
        source = W[:, perm]
    if not dynamic or mistake == "dynamic up front":
        for g in range(K // size):
            scales[g], zeros[g] = gptq.grid_params(source[:, g * size : (g + 1) * size], s)
    if perm is not None:
        W = W if mistake == "W not permuted" else W[:, perm]
        H = H[perm] if mistake == "H rows only" else H[perm][:, perm]
    column = range(K) if dynamic or perm is None or mistake == "static by position" else perm.tolist()
    group = [k // size for k in column]
    group_size = size if dynamic or mistake == "group_size for fixed grids" else None
    return gptq._Problem(W, H, perm, group, scales, zeros, group_size, float(damp))


SETUP_MISTAKES = {
    "ascending": "act_order sorted ascending: the inputs with the largest H_jj come first (descending=True)",
    "raw order": "act_order sorted by the diagonal of H before prepare_hessian: sort the prepared H, where dead inputs have H_dd = 1",
    "W not permuted": "W's columns not permuted with H's",
    "H rows only": "H permuted along its rows only: H[perm][:, perm] permutes rows and columns",
    "grids before zeroing": "the fixed grids taken from W before the dead inputs' weights were zeroed",
    "static grids permuted": "the static groups' grids taken from the permuted W: they belong to the original columns",
    "static by position": "with static groups, group[j] taken from the position j: it is the group of the original column perm[j]",
    "dynamic up front": "the grids of dynamic groups filled in up front: they are chosen when the loop reaches each group (leave zeros)",
    "group_size for fixed grids": "group_size set for fixed grids: it is None unless the loop chooses each group's grid",
}


def check_setup(learner, W, H, s, act_order=False, static_groups=False, damp=0.01, what=""):
    call = (f"setup_problem(W {shape_text(W)}, H {shape_text(H)}, {spec_text(s)}, act_order={act_order}, "
            f"static_groups={static_groups}, damp={damp}){what}")  # fmt: skip
    expected = gptq.setup_problem(W, H, s, act_order, static_groups, damp)
    got = fields_of(learner.setup_problem(W, H, s, act_order, static_groups, damp), PROBLEM_FIELDS, "_Problem", call)
    mistakes = Mistakes({text: lambda key=key: setup_with(W, H, s, act_order, static_groups, damp, key) for key, text in SETUP_MISTAKES.items()})
    order = ("perm", "W", "H", "group", "scales", "zeros", "group_size", "damp")
    for i, field in enumerate(order):
        expect_field(got, expected, field, call, mistakes, rtol=1e-12 if field in ("W", "H") else 1.2e-7, checked=order[:i])


@graded("04.setup_problem", points=3)
def test_setup_plain_order(learner):
    X = inputs(32, tokens=128, seed=500, dead=(7,))
    W, H = weight(6, 32, seed=501), hessian(X)
    check_setup(learner, W, H, spec(4), what=" (per channel, an input dead)")
    check_setup(learner, W, H, spec(3, True, None, "tensor"), damp=0.1, what=" (per tensor)")
    check_setup(learner, W, H, spec(4, False, 8), what=" (groups of 8: chosen in the loop)")


@graded("04.setup_problem", points=3)
def test_setup_act_order(learner, smollm2):
    X = inputs(48, tokens=128, seed=510, dead=(3, 40))
    W, H = weight(8, 48, seed=511), hessian(X)
    check_setup(learner, W, H, spec(4), act_order=True, what=" (per channel, two inputs dead)")
    check_setup(learner, W, H, spec(4, True, 16), act_order=True, what=" (groups of 16)")
    X = 0.05 * inputs(24, tokens=128, seed=514, dead=(2, 9))  # H_jj below 1: the prepared dead inputs come early
    check_setup(learner, weight(4, 24, seed=515), hessian(X), spec(4), act_order=True, damp=0.0, what=" (small activations, two inputs dead)")
    W, H = real_problem(smollm2, "self_attn.q_proj", rows=8, columns=96, seed=512)
    check_setup(learner, W, H, spec(4, False, 32), act_order=True, what=" (SmolLM2 q_proj, 96 of its inputs)")
    ties = torch.diag(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    check_setup(learner, weight(3, 6, seed=513), ties, spec(4), act_order=True, what=" (equal H_jj: a stable sort keeps their order)")


@graded("04.setup_problem", points=3)
def test_setup_static_groups(learner):
    X = inputs(64, tokens=128, seed=520, dead=(9,))
    W, H = weight(8, 64, seed=521), hessian(X)
    check_setup(learner, W, H, spec(4, False, 16), static_groups=True, what=" (static groups, plain order)")
    check_setup(learner, W, H, spec(3, True, 16), act_order=True, static_groups=True, what=" (static groups with act_order)")


@graded("04.setup_problem", points=1)
def test_setup_float32(learner):
    X = inputs(40, tokens=128, seed=530, dtype=torch.float32)
    W, H = weight(8, 40, seed=531, dtype=torch.float32), hessian(X)
    check_setup(learner, W, H, spec(4, False, 8), act_order=True, what=" (float32: computed in float32)")
    check_setup(learner, W, H.double(), spec(4), what=" (float32 W, float64 H: W's dtype decides)")


def bad_problems():
    """(arguments of setup_problem, exception, why): what the reference refuses."""
    W, H = weight(8, 128, dtype=torch.float32), hessian(inputs(128, dtype=torch.float32))
    s = spec(4, False, 32)
    return [
        ((W, H, spec(4, False, 48), False, False, 0.01), ValueError, "group_size 48 does not divide K = 128 (check_spec)"),
        ((W, H[:, :64], s, False, False, 0.01), ValueError, "H must be square (check_hessian)"),
        ((W, H[:64, :64], s, False, False, 0.01), ValueError, "H is 64 x 64 but W has K = 128 inputs (check_hessian)"),
        ((W, H * float("nan"), s, False, False, 0.01), ValueError, "H has NaN entries (check_hessian)"),
        ((W, -H, s, False, False, 0.01), ValueError, "H has a negative diagonal (check_hessian)"),
        ((W, H, AffineSpec(bits=4, symmetric=False, zero_point="float"), False, False, 0.01), ValueError,
         "GPTQ stores integer zero points (check_spec)"),
        ((W, H, spec(4), False, True, 0.01), ValueError, "static_groups needs granularity 'group'"),
        ((W[0], H, s, False, False, 0.01), ValueError, "W must be a 2-D Linear weight [N, K]"),
        ((W.long(), H, s, False, False, 0.01), TypeError, "W must be a float tensor (check_tensor)"),
        ((W, H, s, False, False, -1.0), ValueError, "damp is a non-negative fraction of mean(diag H)"),
    ]  # fmt: skip


@graded("04.setup_problem", points=2)
def test_setup_refuses_bad_input(learner):
    for args, error, why in bad_problems():
        call = f"setup_problem(W {shape_text(args[0])}, H {shape_text(args[1])}, {spec_text(args[2])}, static_groups={args[4]}, damp={args[5]})"
        expect_raises(lambda args=args: learner.setup_problem(*args), (error,), call=call, why=why)


# ---------------------------------------------------------------------------------------------
# finish


def finish_mistakes(problem, Q, codes, s, loss) -> dict:
    expected = gptq.finish(problem, Q, codes, s, loss)
    perm = problem.perm
    inverse = torch.argsort(perm)
    g_idx = torch.tensor(problem.group, dtype=torch.int32)

    def result(Q, codes, g_idx):
        return types.SimpleNamespace(**{**vars(expected), "Q": Q.float(), "codes": codes, "g_idx": g_idx})

    return {
        "the act_order permutation not undone: column k of the result must be input k": result(Q, codes, g_idx),
        "Q[:, perm] applied again instead of undoing it with the inverse permutation argsort(perm)": result(
            Q[:, perm], codes[:, perm], g_idx[perm]),
        "g_idx left in processing order: reorder it like the columns": result(Q[:, inverse], codes[:, inverse], g_idx),
    }


def check_finish(learner, problem, Q, codes, s, loss, what=""):
    call = f"finish(problem, Q {shape_text(Q)}, codes {shape_text(codes)}, {spec_text(s)}, loss={loss:.6g}){what}"
    expected = gptq.finish(problem, Q, codes, s, loss)
    got = fields_of(learner.finish(problem, Q, codes, s, loss), RESULT_FIELDS, "GPTQResult", call)
    found = finish_mistakes(problem, Q, codes, s, loss) if problem.perm is not None else {}
    mistakes = Mistakes({name: lambda value=value: value for name, value in found.items()})
    for i, field in enumerate(RESULT_FIELDS):
        expect_field(got, expected, field, call, mistakes, checked=RESULT_FIELDS[:i])


def processed(problem, seed):
    """A Q [N, K] (float64, in processing order) and its codes, as the loop would leave them."""
    N, K = problem.W.shape
    codes = torch.randint(0, 16, (N, K), generator=generator(seed), dtype=torch.uint8)
    return codes.double() * 0.01 - 0.08, codes


@graded("04.finish", points=2)
def test_finish_plain_order(learner):
    W, H = weight(6, 32, seed=540), hessian(inputs(32, tokens=64, seed=541))
    for s in (spec(4), spec(4, False, 8)):
        problem = gptq.setup_problem(W, H, s, False, False, 0.01)
        check_finish(learner, problem, *processed(problem, 542), s, 1.25, f" ({spec_text(s)}, no act_order)")


@graded("04.finish", points=4)
def test_finish_undoes_act_order(learner):
    W, H = weight(6, 48, seed=550), hessian(inputs(48, tokens=96, seed=551))
    for s, static in ((spec(4, False, 8), False), (spec(4), False), (spec(3, True, 16), True)):
        problem = gptq.setup_problem(W, H, s, True, static, 0.01)
        where = f" (act_order, {spec_text(s)}" + (", static groups)" if static else ")")
        check_finish(learner, problem, *processed(problem, 552), s, 0.5, where)


# ---------------------------------------------------------------------------------------------
# The algorithm: column by column, and in blocks


def unpermuted(expected) -> dict:
    """The result left in processing order, when act_order permuted the columns."""
    if expected.perm is None:
        return {}
    perm = expected.perm
    left = types.SimpleNamespace(**{**vars(expected), "Q": expected.Q[:, perm], "codes": expected.codes[:, perm],
                                    "g_idx": expected.g_idx[perm]})  # fmt: skip
    return {"the act_order permutation not undone (finish must put column k back at input k)": left}


def naive_with(W, H, s, act_order=False, static_groups=False, damp=0.01, mistake=None) -> gptq.GPTQResult:
    """The reference's gptq_quantize_naive, with one known mistake switched on."""
    p = gptq.setup_problem(W, H, s, act_order, static_groups, damp)
    W, N, K = p.W, *p.W.shape
    Hinv = p.H.clone() if mistake == "H" else torch.cholesky_inverse(torch.linalg.cholesky(p.H))
    W0 = W.clone()
    Q, codes = torch.zeros_like(W), torch.zeros(N, K, dtype=torch.uint8)
    loss = 0.0
    for j in range(K):
        g = p.group[j]
        if p.starts_group(j):
            source = W0 if mistake == "original grid" else W
            p.scales[g], p.zeros[g] = gptq.grid_params(source[:, j : j + p.group_size], s)
        w = W[:, j]
        d = p.H[j, j] if mistake == "H_jj" else Hinv[j, j]
        codes[:, j], Q[:, j] = gptq.quantize_column(w, p.scales[g], p.zeros[g], s)
        err = (w - Q[:, j]) / (1.0 if mistake == "unscaled" else d)
        W[:, j + 1 :] -= (-1 if mistake == "added" else 1) * torch.outer(err, Hinv[j, j + 1 :])
        loss += ((w - Q[:, j]) ** 2 / (1.0 if mistake == "loss unscaled" else d)).sum().item() / (1 if mistake == "loss without half" else 2)
        if mistake != "no elimination":
            Hinv -= torch.outer(Hinv[:, j], Hinv[j, :]) / d
    return gptq.finish(p, Q, codes, s, loss)


NAIVE_MISTAKES = {
    "H": "H used where its inverse belongs: the compensation uses the rows of H^-1",
    "H_jj": "divided by H_jj: OBS divides the error by [H^-1]_jj, the diagonal of the inverse",
    "unscaled": "the error not divided by [H^-1]_jj before the update W[:, j+1:] -= err * H^-1[j, j+1:]",
    "added": "the compensation added instead of subtracted",
    "no elimination": "H^-1 not updated after each column: column j must leave the problem "
    "(H^-1 -= H^-1[:, j] H^-1[j, :] / [H^-1]_jj)",
    "original grid": "a group's grid taken from the original W: take it from the columns as they stand when the loop reaches the group",
    "loss unscaled": "the loss summed as (w - q)^2 / 2 without dividing by [H^-1]_jj",
    "loss without half": "the loss without the factor 1/2: sum of (w - q)^2 / [H^-1]_jj / 2",
}


def blocked_with(W, H, s, block_size=128, act_order=False, static_groups=False, damp=0.01, mistake=None) -> gptq.GPTQResult:
    """The reference's gptq_quantize, with one known mistake switched on."""
    p, U = gptq.damped_inverse_cholesky(W, H, s, act_order, static_groups, damp, "W")
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(p.H))
    U = {"cholesky of H": torch.linalg.cholesky(p.H, upper=True), "rows of H^-1": Hinv, "lower factor": U.T}.get(mistake, U)
    Wt = p.W.T.contiguous()
    K, N = Wt.shape
    Qt, codes = torch.zeros_like(Wt), torch.zeros(K, N, dtype=torch.uint8)
    loss = 0.0
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            g = p.group[j]
            if p.starts_group(j):
                end = j + p.group_size
                rows = Wt[j:end] if mistake == "group at block start" else gptq.current_rows(Wt, W1, Err1, U, i1, j, end)
                p.scales[g], p.zeros[g] = gptq.grid_params(rows.T, s)
            w = W1[i]
            codes[j], Qt[j] = gptq.quantize_column(w, p.scales[g], p.zeros[g], s)
            d = {"Hinv_jj": Hinv[j, j], "H_jj": p.H[j, j], "U_jj^2": U1[i, i] ** 2}.get(mistake, U1[i, i])
            Err1[i] = (w - Qt[j]) / d
            if mistake != "deferred":
                start = i + 2 if mistake == "in-block off by one" else i + 1
                W1[start:].addr_(U1[i, start:], Err1[i], alpha=-1)
        scaled = Err1 * U1.diagonal()[:, None] if mistake == "loss unscaled" else Err1
        loss += (scaled**2).sum().item() / 2
        if mistake != "no propagation":
            start = i2 + 1 if mistake == "propagation off by one" else i2
            Wt[start:] -= U[i1:i2, start:].T @ Err1
    return gptq.finish(p, Qt.T, codes.T, s, loss)


BLOCKED_MISTAKES = {
    "Hinv_jj": "divided by [H^-1]_jj, the diagonal of the full inverse: with the Cholesky rows divide by U_jj",
    "U_jj^2": "divided by U_jj^2 (that is [H^-1]_jj after the earlier columns left, the OBS divisor for the rows of the "
    "eliminated inverse); with the rows of U divide by U_jj",
    "H_jj": "divided by H_jj instead of U_jj, the diagonal of the Cholesky factor of H^-1",
    "cholesky of H": "the Cholesky factor of H used instead of that of H^-1",
    "rows of H^-1": "the rows of H^-1 used for the updates: those of its upper Cholesky factor U hold the eliminated inverse",
    "lower factor": "the lower Cholesky factor of H^-1: its rows have nothing right of the diagonal, so nothing is compensated",
    "deferred": "the in-block updates left out (or deferred to the end of the block): each column must see the updates "
    "of the block's earlier columns before it is rounded",
    "in-block off by one": "the in-block update starts one column late (W1[i + 2:]): it reaches every column after i",
    "no propagation": "the block's error not propagated to the columns after the block (W[:, i2:] -= Err1 @ U[i1:i2, i2:])",
    "propagation off by one": "the block's error propagated from column i2 + 1: column i2, the first after the block, missed it",
    "group at block start": "a group's range taken from W as it stood at the start of the block (IST-DASLab's gptq.py): take it "
    "from the columns as they stand now, every earlier update included (the given current_rows)",
    "loss unscaled": "the loss summed as (w - q)^2 / 2 without dividing by U_jj^2",
}


def check_gptq(learner, function, W, H, s, what="", **options):
    """One call of gptq_quantize_naive or gptq_quantize, compared field by field in float64."""
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    call = f"{function}(W {shape_text(W)}, H {shape_text(H)}, {spec_text(s)}{', ' + shown if shown else ''}){what}"
    reference = getattr(gptq, function)
    expected = reference(W, H, s, **options)
    got = getattr(learner, function)(W, H, s, **options)
    wrong = naive_with if function == "gptq_quantize_naive" else blocked_with
    table = NAIVE_MISTAKES if function == "gptq_quantize_naive" else BLOCKED_MISTAKES
    makers = {name: lambda value=value: value for name, value in unpermuted(expected).items()}
    makers.update({text: lambda key=key: wrong(W, H, s, **options, mistake=key) for key, text in table.items()})
    check_gptq_result(got, expected, call, Mistakes(makers))
    return got


def check_gptq_float32(learner, function, W, H, s, what="", **options):
    """float32: what another float32 order of the same arithmetic may change, no more."""
    shown = ", ".join(f"{k}={v}" for k, v in options.items())
    call = f"{function}(W {shape_text(W)}, H {shape_text(H)}, {spec_text(s)}{', ' + shown if shown else ''}){what}"
    expected = getattr(gptq, function)(W, H, s, **options)
    got = fields_of(getattr(learner, function)(W, H, s, **options), RESULT_FIELDS, "GPTQResult", call)
    for field in ("Q", "codes", "scales", "g_idx"):
        same_kind(getattr(got, field), getattr(expected, field), f"{call}: {field}")
    equal = (got.codes == expected.codes).double().mean().item()
    if equal < 0.99:
        raise Mismatch(f"{call}: only {equal:.1%} of the codes equal the reference's; float32 rounding explains at most 1%")
    if not isinstance(got.loss, float) or not math.isclose(got.loss, expected.loss, rel_tol=1e-2):
        raise Mismatch(f"{call}: loss {describe_value(got.loss)}, expected {expected.loss:.6g} (within 1% in float32)")
    if not torch.equal(got.g_idx, expected.g_idx):
        raise Mismatch(f"{call}: g_idx differs from the reference's")


CASES = [  # (spec, act_order, static_groups)
    (spec(4, False, 16), False, False),
    (spec(4, True, 16), True, False),
    (spec(3, False, 32), True, True),
    (spec(2, False), True, False),
    (spec(8, True), False, False),
    (spec(3, True, None, "tensor"), False, False),
]


@graded("04.gptq_quantize_naive", points=4)
def test_naive_fixed(learner):
    X = torch.tensor([[1.0, 0.9, 0.0, 0.2], [0.5, 0.6, 1.0, 0.0], [-1.0, -0.8, 0.5, 1.0], [0.0, 0.1, -1.0, 0.5],
                      [2.0, 1.9, 0.0, -0.5], [0.3, 0.2, 0.4, 0.1]], dtype=torch.float64)  # inputs 0 and 1 nearly equal
    W = torch.tensor([[0.30, -0.25, 0.10, 0.05], [-0.40, 0.45, 0.20, -0.10], [0.12, 0.13, -0.30, 0.26]], dtype=torch.float64)
    for s in (spec(2), spec(4, True)):
        check_gptq(learner, "gptq_quantize_naive", W, hessian(X), s, " (6 tokens, 4 inputs)")
    check_gptq(learner, "gptq_quantize_naive", W, hessian(X), spec(3), " (6 tokens, 4 inputs)", act_order=True)


@graded("04.gptq_quantize_naive", points=5)
def test_naive_randomized(learner):
    W, H = weight(12, 64, seed=600), hessian(inputs(64, tokens=256, seed=601))
    for s, act_order, static in CASES:
        check_gptq(learner, "gptq_quantize_naive", W, H, s, act_order=act_order, static_groups=static)


@graded("04.gptq_quantize_naive", points=5)
def test_naive_real_hessians(learner, smollm2):
    W, H = real_problem(smollm2, "self_attn.q_proj", rows=16, columns=128, seed=610)
    check_gptq(learner, "gptq_quantize_naive", W, H, spec(4, False, 32), " (SmolLM2 q_proj, 128 of its inputs)", act_order=True)
    check_gptq(learner, "gptq_quantize_naive", W, H, spec(3, True), " (SmolLM2 q_proj, 128 of its inputs)")
    W, H = real_problem(smollm2, "self_attn.o_proj", rows=16, columns=96, seed=611)
    check_gptq(learner, "gptq_quantize_naive", W, H, spec(4, False, 32), " (SmolLM2 o_proj, 96 of its inputs)", static_groups=True, act_order=True)


@graded("04.gptq_quantize_naive", points=4)
def test_naive_dead_inputs_and_damping(learner):
    W = weight(8, 48, seed=620)
    H = hessian(inputs(48, tokens=128, seed=621, dead=(0, 20)))
    check_gptq(learner, "gptq_quantize_naive", W, H, spec(4, False, 16), " (two dead inputs, no damping)", damp=0.0, act_order=True)
    H = hessian(inputs(48, tokens=30, seed=622, twins=(11,)))  # 30 tokens: rank 30 of 48, singular without damping
    check_gptq(learner, "gptq_quantize_naive", W, H, spec(4), " (30 tokens for 48 inputs, two nearly equal inputs)", damp=0.1)


@graded("04.gptq_quantize", points=6)
def test_blocked_block_sizes(learner):
    W, H = weight(16, 128, seed=630), hessian(inputs(128, tokens=256, seed=631))
    for block_size in (128, 48, 5, 1):  # 48 and 5: groups that start inside a block and cross its end
        check_gptq(learner, "gptq_quantize", W, H, spec(4, False, 32), f" (block_size {block_size})", block_size=block_size, act_order=True)
    for s, act_order, static in CASES[2:]:
        check_gptq(learner, "gptq_quantize", W, H, s, block_size=40, act_order=act_order, static_groups=static)
    check_gptq(learner, "gptq_quantize", W[:, :100], H[:100, :100], spec(4), " (K = 100: a last block of 4 columns)", block_size=32)


@graded("04.gptq_quantize", points=6)
def test_blocked_real_hessians(learner, smollm2):
    W, H = real_problem(smollm2, "self_attn.q_proj", rows=24)
    check_gptq(learner, "gptq_quantize", W, H, spec(4, False, 64), " (SmolLM2 q_proj, all 576 inputs)", act_order=True)
    W, H = real_problem(smollm2, "self_attn.o_proj", rows=24)
    check_gptq(learner, "gptq_quantize", W, H, spec(4, True, 64), " (SmolLM2 o_proj: groups cross blocks of 100)", block_size=100)
    W, H = real_problem(smollm2, "mlp.up_proj", rows=24)
    check_gptq(learner, "gptq_quantize", W, H, spec(3), " (SmolLM2 up_proj)", act_order=True)


@graded("04.gptq_quantize", points=4)
def test_blocked_dead_inputs_and_damping_retry(learner):
    W = weight(8, 64, seed=640)
    H = hessian(inputs(64, tokens=128, seed=641, dead=(5, 63)))
    check_gptq(learner, "gptq_quantize", W, H, spec(4, False, 16), " (two dead inputs, no damping)", block_size=24, damp=0.0, act_order=True)
    H = torch.eye(32, dtype=torch.float64)
    H[0, 1] = H[1, 0] = 1.02  # an eigenvalue of -0.02: damping 0.01 is not enough, 0.03 is
    got = check_gptq(learner, "gptq_quantize", weight(8, 32, seed=642), H, spec(4), " (Cholesky fails at damping 0.01)")
    if got.damp != 0.03:
        raise Mismatch("the result's damp must be the damping that worked, 0.03")


@graded("04.gptq_quantize", points=4)
def test_blocked_float32(learner, smollm2):
    W, H = smollm2["self_attn.q_proj"]
    check_gptq_float32(learner, "gptq_quantize", W[:48], H, spec(4, False, 64), " (SmolLM2 q_proj in float32)", act_order=True)
    W, H = smollm2["mlp.up_proj"]
    check_gptq_float32(learner, "gptq_quantize", W[:48], H, spec(4, True, 32), " (SmolLM2 up_proj in float32)", block_size=64)


@graded("04.gptq_quantize", points=2)
def test_blocked_identity_hessian_is_rtn(learner):
    from quantcourse.reference_impl.affine import quantize_tensor

    W = weight(16, 64, seed=650, dtype=torch.float32)
    for s in (spec(4, False, 16), spec(3, True)):
        got = check_gptq(learner, "gptq_quantize", W, torch.eye(64), s, " (H = I: nothing to compensate)")
        if not torch.equal(got.Q, quantize_tensor(W, s).dequantize()):
            raise Mismatch(f"with H = I, GPTQ is round-to-nearest: Q must equal lab 01's fake quantization ({spec_text(s)})")


@graded("04.gptq_quantize", points=2)
def test_blocked_refuses_bad_input(learner):
    W, H = weight(8, 64, dtype=torch.float32), hessian(inputs(64, dtype=torch.float32))
    for block_size in (0, -128, 2.5, "128"):
        expect_raises(lambda block_size=block_size: learner.gptq_quantize(W, H, spec(), block_size), (ValueError,), call=f"gptq_quantize(W, H, spec, block_size={block_size!r})",
                      why="block_size must be a positive integer")  # fmt: skip
    for args, error, why in bad_problems()[::3]:
        call = f"gptq_quantize(W {shape_text(args[0])}, H {shape_text(args[1])}, {spec_text(args[2])}, damp={args[5]})"
        expect_raises(lambda args=args: learner.gptq_quantize(*args[:3], 128, *args[3:]), (error,), call=call, why=why)
