"""What a hidden test suite uses: the `graded` marker and comparisons that explain themselves.

A suite is a plain pytest module in `autograder/suites/`. Each test is one case group, worth its
points when every check in it passes:

    @graded("01.quantize", points=4)
    def test_quantize_fixed_cases(learner):
        x = torch.tensor([...])
        expect_equal(
            learner.quantize(x, scale, zero, 4, False),      # runs in the learner process
            affine.quantize(x, scale, zero, 4, False),        # the reference, here
            call="quantize(x, scale, zero, bits=4, signed=False)",
            inputs={"x": x, "scale": scale, "zero": zero},
            variants={"floor instead of round": ...},         # known mistakes, for diagnosis
        )

`learner.NAME(...)` raises a `LearnerFailure` when the learner's function is missing, raises,
hangs or crashes; the engine turns that into the test's feedback. A failed expectation raises
`Mismatch`, whose message is the feedback: what was called, what differs, which known mistake
the output matches, and (in self-study mode) the first differing input in small form.
"""

import math

import pytest
import torch

REVEAL_INPUTS = True  # the engine sets this to False for classroom feedback


class Mismatch(AssertionError):
    """The learner's output differs from the reference; the message is shown as feedback."""


def graded(key: str, points: float):
    """Mark a test as a graded case group: `key` is the short name the notebook's test cell
    passes to grade(), e.g. "01.quantize"; the group earns `points` when all its checks pass."""
    return pytest.mark.graded(key=key, points=points)


def describe_value(value, limit: int = 8) -> str:
    """A short, readable rendering of a value (small tensors in full, large ones by shape)."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= limit:
            return f"tensor({value.tolist()}, dtype={str(value.dtype).removeprefix('torch.')})"
        return f"tensor of shape {tuple(value.shape)}, dtype {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)[:80]


def same_kind(got, expected, call: str) -> None:
    """Type, dtype and shape must match before values are compared."""
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise Mismatch(f"{call} should return a tuple of {len(expected)} values, got {describe_value(got)}")
        return
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise Mismatch(f"{call} should return a torch.Tensor, got {type(got).__name__}: {describe_value(got)}")
        if got.shape != expected.shape:
            raise Mismatch(f"{call} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        if got.dtype != expected.dtype:
            raise Mismatch(
                f"{call} returned dtype {str(got.dtype).removeprefix('torch.')}, expected "
                f"{str(expected.dtype).removeprefix('torch.')}"
            )


def close_mask(got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    if not got.is_floating_point() and not expected.is_floating_point():
        return got == expected
    return torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


def matching_variant(got: torch.Tensor, variants: dict, rtol: float, atol: float) -> str | None:
    """The name of the first known mistake whose output the learner's output equals."""
    for name, output in (variants or {}).items():
        if isinstance(output, torch.Tensor) and output.shape == got.shape:
            if close_mask(got.to(output.dtype) if got.dtype != output.dtype else got, output, rtol, atol).all():
                return name
    return None


def first_difference(got, expected, inputs: dict | None, mask: torch.Tensor) -> str:
    index = tuple(int(i) for i in (~mask).nonzero()[0])
    text = f"first at index {index}: got {describe_value(got[index].item())}, expected {describe_value(expected[index].item())}"
    if REVEAL_INPUTS and inputs:
        shown = ", ".join(f"{k} = {describe_value(v)}" for k, v in inputs.items())
        text += f". Inputs: {shown}"
    return text


def expect_close(got, expected, *, call: str, rtol: float = 1e-5, atol: float = 1e-6, inputs=None, variants=None, what="values"):
    """Compare a tensor (or a tuple of tensors/numbers) with the reference, with tolerance.

    Integer tensors are compared exactly. On mismatch, raise Mismatch naming the call, how many
    elements differ, the first difference, and the known mistake the output matches, if any.
    """
    same_kind(got, expected, call)
    if isinstance(expected, tuple):
        for i, (g, e) in enumerate(zip(got, expected)):
            variant_i = {k: v[i] for k, v in (variants or {}).items() if isinstance(v, tuple)}
            expect_close(g, e, call=f"{call}[{i}]", rtol=rtol, atol=atol, inputs=inputs, variants=variant_i, what=what)
        return
    if not isinstance(expected, torch.Tensor):
        if not isinstance(got, (int, float)) or not math.isclose(float(got), float(expected), rel_tol=rtol, abs_tol=atol):
            raise Mismatch(f"{call} returned {describe_value(got)}, expected {describe_value(expected)}")
        return
    mask = close_mask(got, expected, rtol, atol)
    if bool(mask.all()):
        return
    count = int((~mask).sum())
    message = f"{call}: {count} of {mask.numel()} {what} differ; {first_difference(got, expected, inputs, mask)}."
    variant = matching_variant(got, variants, rtol, atol)
    if variant:
        message += f" Your output matches a common mistake: {variant}."
    raise Mismatch(message)


def expect_equal(got, expected, *, call: str, inputs=None, variants=None, what="values"):
    """Exact comparison (integer codes, shapes, counts): expect_close with no tolerance."""
    expect_close(got, expected, call=call, rtol=0.0, atol=0.0, inputs=inputs, variants=variants, what=what)


def expect_raises(call_learner, error_types: tuple[type, ...], *, call: str, why: str):
    """The learner's function must refuse bad input (raise one of `error_types`, by name)."""
    from .sandbox import LearnerError

    try:
        result = call_learner()
    except LearnerError as error:
        names = {t.__name__ for t in error_types}
        raised = str(error).split(" raised ", 1)[-1].split(":", 1)[0]
        if raised not in names:
            raise Mismatch(f"{call} raised {raised}; expected {' or '.join(sorted(names))} because {why}") from None
        return
    raise Mismatch(f"{call} returned {describe_value(result)} instead of raising {error_types[0].__name__}: {why}")
