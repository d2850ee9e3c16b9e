"""What a drill question is, and how an answer typed by a person is read and checked.

A question is either **numeric** (one number with a unit, checked with a tolerance) or
**multiple choice** (the index of the right choice). Both carry an explanation and a pointer to
the lecture section that teaches the idea, so that a miss always says where to read.

Reading a numeric answer is forgiving where a person would be:

- units: "12.5 GB", "11.6 GiB", "1.25e10 bytes" and "12500 MB" are the same answer to a question
  asked in GB; "3.9x" and "3.9" the same ratio. A unit of another kind (seconds for bytes) is
  refused with a message rather than marked wrong: it is a slip of the keyboard, not of thought.
- arithmetic: "16/4.125" or "2*32*8*128*2" is read as the number it computes (only numbers,
  + - * / ** and parentheses; nothing else is evaluated).
- separators: "1,048,576" and "1_048_576" are one number.

A value is right when |given - expected| <= max(rel_tol * |expected|, abs_tol).

This module is pure Python: the command line can list topics without importing torch.
"""

import ast
import math
import operator
import re
from dataclasses import dataclass, field

# topic -> what it drills (and the lesson that teaches it)
TOPICS = {
    "formats": "number formats: fp16, bf16, fp8, int, code books (lesson 00)",
    "memory": "memory of a model: weights in a format, constants, KV cache (lesson 00)",
    "affine": "scale, zero point, codes, granularity, rounding (lesson 01)",
    "outliers": "activation outliers, LLM.int8(), W8A8 (lesson 02)",
    "nf4": "NF4, FP4 and double quantization (lesson 03)",
    "gptq": "GPTQ (lesson 04)",
    "awq": "AWQ (lesson 05)",
    "smoothquant": "SmoothQuant (lesson 06)",
    "qlora": "QLoRA (lesson 07)",
    "kvcache": "KV-cache size and quantization (lesson 08)",
    "gguf": "GGUF block formats (lesson 09)",
    "kernels": "bandwidth, roofline, quantized kernels (lesson 10)",
    "recipes": "which of two measured recipes loses less on SmolLM2, and why",
    "production": "choosing a method and a level; PTQ against QAT",
}

# unit -> (dimension, factor to the dimension's base unit). Keys are lower case.
UNITS = {
    "": ("number", 1.0),
    "byte": ("bytes", 1.0), "bytes": ("bytes", 1.0),
    "kb": ("bytes", 1e3), "mb": ("bytes", 1e6), "gb": ("bytes", 1e9), "tb": ("bytes", 1e12),
    "kib": ("bytes", 2.0**10), "mib": ("bytes", 2.0**20), "gib": ("bytes", 2.0**30), "tib": ("bytes", 2.0**40),
    "bit": ("bits", 1.0), "bits": ("bits", 1.0),
    "s": ("seconds", 1.0), "sec": ("seconds", 1.0), "ms": ("seconds", 1e-3),
    "us": ("seconds", 1e-6), "µs": ("seconds", 1e-6), "μs": ("seconds", 1e-6), "ns": ("seconds", 1e-9),
    "x": ("ratio", 1.0), "×": ("ratio", 1.0), "times": ("ratio", 1.0),
    "flop/byte": ("intensity", 1.0), "flop/b": ("intensity", 1.0), "flops/byte": ("intensity", 1.0),
    "db": ("decibels", 1.0), "token": ("tokens", 1.0), "tokens": ("tokens", 1.0),
}  # fmt: skip
# "bits per weight", "bytes/token" and the like: the "per ..." part names what is counted, not a unit
PER_SUFFIX = re.compile(r"\s*(/|per\s+)\s*(weight|param|parameter|token|value|element|w)s?\s*$", re.IGNORECASE)
NUMBER_AND_UNIT = re.compile(r"^(?P<expr>.*?)\s*(?P<unit>[A-Za-zµμ×][A-Za-zµμ×/ ]*)?$")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
MAX_EXPONENT = 64  # "2**1000000" would hang the drill; no answer here needs more


class AnswerError(ValueError):
    """An answer that cannot be read (not a number, an unknown or mismatched unit, no such choice).

    The message says what was wrong and what is expected; the drill asks again.
    """


def dimension_of(unit: str) -> tuple[str, float]:
    """(dimension, factor) of a unit such as "GB" or "µs"; AnswerError if unknown.

    Case does not matter, except for the single letter: "B" is a byte and "b" a bit.
    """
    if unit.strip() in ("B", "b"):
        return ("bytes", 1.0) if unit.strip() == "B" else ("bits", 1.0)
    key = unit.strip().lower()
    if key not in UNITS:
        known = sorted({u for u in UNITS if u} | {"B", "b"})
        raise AnswerError(f"unknown unit {unit.strip()!r}; use one of: {', '.join(known)}")
    return UNITS[key]


_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip


def evaluate_arithmetic(text: str) -> float:
    """The value of an arithmetic expression of numbers: + - * / ** and parentheses only.

    Names, calls, attributes and everything else Python could do are refused: the text is parsed
    into a syntax tree and only number and operator nodes are evaluated.
    """

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise AnswerError(f"exponents above {MAX_EXPONENT} are not needed here; write the number instead")
            if isinstance(node.op, ast.Div) and right == 0:
                raise AnswerError("the expression divides by zero")
            return _OPERATORS[type(node.op)](left, right)
        raise AnswerError("write a number, optionally with a unit (e.g. 4.127, 12.5 GB, 16/4.125)")

    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise AnswerError(f"could not read {text!r} as a number; write e.g. 4.127, 12.5 GB or 16/4.125") from None
    result = value(tree)
    if not math.isfinite(result):
        raise AnswerError(f"{text!r} is not a finite number")
    return result


def parse_quantity(raw: str) -> tuple[float, str]:
    """Split a typed answer into (value, unit as typed, "" if none).

    "12.5 GB" -> (12.5, "GB"); "1,048,576 bytes/token" -> (1048576.0, "bytes"); "16/4.125" ->
    (3.878..., ""). AnswerError with a readable message when there is no number.
    """
    text = PER_SUFFIX.sub("", raw.strip())
    if not text:
        raise AnswerError("the answer is empty")
    match = NUMBER_AND_UNIT.match(text)
    expr, unit = match.group("expr"), (match.group("unit") or "").strip()
    if not expr.strip():
        raise AnswerError(f"no number in {raw.strip()!r}; write e.g. 4.127, 12.5 GB or 16/4.125")
    expr = THOUSANDS.sub("", expr.replace("_", ""))
    if unit:
        dimension_of(unit)
    return evaluate_arithmetic(expr), unit


@dataclass(frozen=True)
class Verdict:
    """The outcome of one answer: right or not, the value as read (in the question's unit), and a
    one-line comment for the person."""

    correct: bool
    value: float | int | None
    comment: str


@dataclass(frozen=True)
class Question:
    """One drill item.

    qid: stable identity used by the history ("gen:<generator>:<seed>" or "concept:<id>").
    answer: the expected value in `unit` (numeric) or the index into `choices` (multiple choice).
    pointer: the lecture section that teaches it, e.g. "course/03_nf4.ipynb §4".
    reference: the module whose docstring holds the details (optional).
    seed_note: what the commissioning documents got wrong or oversimplified here (optional).
    """

    qid: str
    topic: str
    prompt: str
    answer: float | int
    explanation: str
    pointer: str
    choices: tuple[str, ...] = ()
    unit: str = ""
    rel_tol: float = 0.01
    abs_tol: float = 0.0
    reference: str = ""
    seed_note: str = ""
    details: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.topic not in TOPICS:
            raise ValueError(f"question {self.qid}: unknown topic {self.topic!r}; topics are {', '.join(TOPICS)}")
        if self.choices and not (isinstance(self.answer, int) and 0 <= self.answer < len(self.choices)):
            raise ValueError(f"question {self.qid}: answer {self.answer!r} is not an index of its {len(self.choices)} choices")
        if not self.choices:
            dimension_of(self.unit)
            if not math.isfinite(float(self.answer)):
                raise ValueError(f"question {self.qid}: the expected answer {self.answer!r} is not finite")

    @property
    def kind(self) -> str:
        return "choice" if self.choices else "numeric"

    def expected_text(self) -> str:
        """The right answer, written for a person."""
        if self.choices:
            return f"{'abcdefgh'[self.answer]}) {self.choices[self.answer]}"
        return f"{format_number(self.answer)}{' ' + self.unit if self.unit else ''}"

    def read(self, raw: str) -> float | int:
        """The answer as a value in this question's unit, or a choice index. AnswerError if unreadable."""
        return read_choice(raw, self.choices) if self.choices else read_number(raw, self.unit)

    def check(self, raw: str) -> Verdict:
        """Judge a typed answer. Raises AnswerError when it cannot be read (ask again, do not score)."""
        value = self.read(raw)
        if self.choices:
            right = value == self.answer
            return Verdict(right, value, "right" if right else f"the answer is {self.expected_text()}")
        tolerance = max(self.rel_tol * abs(self.answer), self.abs_tol)
        right = abs(value - self.answer) <= tolerance
        if right:
            return Verdict(True, value, f"right (computed: {self.expected_text()})")
        direction = "high" if value > self.answer else "low"
        ratio = f", {value / self.answer:.3g} times the answer" if self.answer else ""
        return Verdict(False, value, f"too {direction}{ratio}: the answer is {self.expected_text()}")


def read_number(raw: str, unit: str) -> float:
    """A typed quantity converted to `unit`; a bare number is taken to be in `unit` already."""
    value, typed = parse_quantity(raw)
    if not typed:
        return value
    want_dimension, want_factor = dimension_of(unit)
    got_dimension, got_factor = dimension_of(typed)
    if got_dimension != want_dimension:
        raise AnswerError(f"{typed!r} measures {got_dimension}, but the question asks for {unit or 'a plain number'}")
    return value * got_factor / want_factor


def read_choice(raw: str, choices: tuple[str, ...]) -> int:
    """A choice typed as its letter ("b", "b)"), its number ("2") or its full text."""
    text = raw.strip().lower().rstrip(").:")
    letters = "abcdefgh"[: len(choices)]
    if len(text) == 1 and text in letters:
        return letters.index(text)
    if text.isdigit() and 1 <= int(text) <= len(choices):
        return int(text) - 1
    for i, choice in enumerate(choices):
        if text == choice.strip().lower():
            return i
    raise AnswerError(f"answer with a letter from a to {letters[-1]} (or its number, 1 to {len(choices)})")


def format_number(x: float) -> str:
    """A number the way the drills print it: 4 significant digits, thousands separated, no
    scientific notation between 0.001 and 10^15."""
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e15):
        return f"{x:.4g}"
    digits = max(0, 3 - math.floor(math.log10(abs(x)))) if x else 0
    return f"{x:,.{digits}f}"
