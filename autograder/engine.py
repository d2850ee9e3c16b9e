"""The grading engine: a lab's hidden pytest suite, run against a notebook's functions.

    report = grade_notebook("labs/01_affine/01_affine.ipynb")

1. `notebook.read_submission` picks the definitions out of the notebook.
2. A `Sandbox` runs them in a separate, limited learner process.
3. pytest runs the lab's suite (`autograder/suites/test_NN_topic.py`) here, in the grading
   process; its `learner` fixture forwards each call to the learner process and receives plain
   data. The reference, the comparisons and the scores never leave this process.
4. Each test is a case group worth its points; its feedback is the message of the `Mismatch` or
   `LearnerFailure` that failed it, never the test's source (which may hold hidden cases).
"""

import ast
import difflib
import importlib.util
import inspect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch

from . import testing
from .notebook import read_notebook, read_submission
from .sandbox import LearnerFailure, LoadReport, Sandbox, SandboxLimits

SUITES = Path(__file__).resolve().parent / "suites"
SIMILARITY_FLAG = 0.9  # normalised-AST similarity to the reference above which a function is flagged
SIMILARITY_MIN_NODES = 60  # shorter functions have too few ways to be written to say anything


@dataclass
class TestResult:
    name: str
    key: str
    points: float
    max_points: float
    status: str  # passed, failed, error, timeout, crashed, missing, forbidden, manual
    feedback: str


@dataclass
class Report:
    notebook: str
    lab: str
    tests: list[TestResult]
    load: LoadReport = field(default_factory=LoadReport)
    similarity: dict[str, float] = field(default_factory=dict)  # graded function -> similarity to reference
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return sum(t.points for t in self.tests if t.status != "manual")

    @property
    def max_score(self) -> float:
        return sum(t.max_points for t in self.tests if t.status != "manual")

    def flagged(self) -> dict[str, float]:
        return {name: s for name, s in self.similarity.items() if s >= SIMILARITY_FLAG}

    def to_json(self, instructor: bool = False) -> dict:
        out = {
            "notebook": self.notebook,
            "score": self.score,
            "max_score": self.max_score,
            "tests": [{k: v for k, v in asdict(t).items() if k != "key"} for t in self.tests],
            "lab": self.lab,
            "cell_errors": {str(k): v for k, v in self.load.cell_errors.items()},
            "skipped_cells": {str(k): v for k, v in self.load.skipped_cells.items()},
            "seconds": round(self.seconds, 2),
        }
        if instructor:
            out["refusals"] = self.load.refusals
            out["similarity_flags"] = self.flagged()
        return out


def suite_path(lab: str, suites: Path = SUITES) -> Path:
    path = suites / f"test_{lab}.py"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("test_") for p in suites.glob("test_*.py"))
        raise ValueError(f"no grading suite for lab {lab!r}; labs with suites: {', '.join(known)}")
    return path


def load_suite(lab: str, suites: Path = SUITES):
    """The suite module itself (for GRADED, the reference functions of the lab)."""
    spec = importlib.util.spec_from_file_location(f"quantcourse_suite_{lab}", suite_path(lab, suites))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LearnerProxy:
    """`learner.quantize(...)` calls the learner's `quantize` in the learner process."""

    def __init__(self, sandbox: Sandbox, aliases: dict[str, str]):
        self._sandbox, self._aliases = sandbox, aliases

    def __getattr__(self, name: str):
        target = self._aliases.get(name, name)
        return lambda *args, **kwargs: self._sandbox.call(target, *args, **kwargs)


class GradingPlugin:
    """Provides the `learner` fixture, selects tests by key, and records each outcome."""

    def __init__(self, sandbox: Sandbox, keys: set[str] | None, aliases: dict[str, str]):
        self.sandbox, self.keys, self.aliases = sandbox, keys, aliases
        self.results: list[TestResult] = []

    @pytest.fixture
    def learner(self):
        return LearnerProxy(self.sandbox, self.aliases)

    def pytest_collection_modifyitems(self, config, items):
        keep = [i for i in items if i.get_closest_marker("graded") and (self.keys is None or i.get_closest_marker("graded").kwargs["key"] in self.keys)]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when == "call" or (report.failed and report.when == "setup"):
            marker = item.get_closest_marker("graded").kwargs
            status, feedback = judge(call.excinfo, item.name)
            points = marker["points"] if status == "passed" else 0.0
            self.results.append(TestResult(item.name, marker["key"], points, marker["points"], status, feedback))


def judge(excinfo, test_name: str) -> tuple[str, str]:
    """Status and feedback of one case group from the exception that ended it (if any)."""
    if excinfo is None:
        return "passed", "correct"
    error = excinfo.value
    if isinstance(error, testing.Mismatch):
        return "failed", str(error)
    if isinstance(error, LearnerFailure):
        return error.kind, str(error)
    return "error", f"internal grader error in {test_name} ({type(error).__name__}: {str(error)[:200]}); please report it to the course"


def run_suite(
    lab: str,
    sandbox: Sandbox,
    keys: set[str] | None = None,
    aliases: dict[str, str] | None = None,
    suites: Path = SUITES,
) -> list[TestResult]:
    """Run the lab's suite against the learner process; returns one result per case group.

    aliases: grade another function under a graded name ({"quantize": "quantize__floor"}),
    which lets the mutation catalogs grade many versions in one learner process.
    """
    plugin = GradingPlugin(sandbox, keys, aliases or {})
    args = [
        str(suite_path(lab, suites)), "-p", "no:terminal", "-p", "no:cacheprovider", "-p", "no:xdist",
        "-p", "no:randomly", "-p", "no:unraisableexception", "--import-mode=importlib", "--rootdir", str(SUITES), "-c", str(SUITES / "pytest.ini"),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suites' tensors are tiny: threads only add overhead
    try:
        code = pytest.main(args, plugins=[plugin])
    finally:
        torch.set_num_threads(threads)
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.NO_TESTS_COLLECTED):
        raise RuntimeError(f"the grading suite of lab {lab} could not run (pytest exit code {code})")
    return plugin.results


def manual_questions(path: Path) -> list[TestResult]:
    """nbgrader's manually graded answers: listed with their points, scored by the instructor."""
    results = []
    for cell in read_notebook(path).cells:
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("grade") and meta.get("solution"):
            results.append(TestResult(meta.get("grade_id", "answer"), "manual", 0.0, float(meta.get("points", 0)), "manual", "graded by your instructor"))
    return results


def normalised_ast(source: str) -> list[str]:
    """Node types of a function's AST with names, constants and docstrings erased."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body.pop(0)  # a docstring
    return [type(node).__name__ for node in ast.walk(tree)]


def function_source(sources: dict[int, str], name: str) -> str | None:
    """The last definition of `name` among the notebook's cells."""
    found = None
    for source in sources.values():
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                found = ast.get_source_segment(source, node)
    return found


def similarity_to_reference(sources: dict[int, str], graded: dict, dictated: frozenset = frozenset()) -> dict[str, float]:
    """How close each graded function is to the reference's, as a ratio of AST node sequences.

    `dictated`: functions whose text the lab all but dictates (a formula spelled out step by
    step), where an honest solution matches the reference anyway; a suite names them in
    SIMILARITY_EXEMPT and they are not scored."""
    scores = {}
    for name, reference in graded.items():
        if name in dictated:
            continue
        learner = function_source(sources, name)
        if learner is None:
            continue
        a, b = normalised_ast(learner), normalised_ast(inspect.getsource(reference))
        if min(len(a), len(b)) < SIMILARITY_MIN_NODES:
            continue
        scores[name] = round(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio(), 3)
    return scores


def grade_notebook(
    path: Path,
    keys: set[str] | None = None,
    reveal_inputs: bool = True,
    limits: SandboxLimits | None = None,
    aliases: dict[str, str] | None = None,
    suites: Path = SUITES,
) -> Report:
    """Grade one notebook (never modifying it). `keys` limits grading to some case groups;
    `reveal_inputs=False` keeps failing inputs out of the feedback (classroom mode); `suites`
    is where the lab's suite is looked up (tests use their own)."""
    started = time.perf_counter()
    submission = read_submission(Path(path))
    if submission.lab is None:
        raise ValueError(f"{path}: cannot tell which lab this is (name it like 01_affine.ipynb)")
    suite = load_suite(submission.lab, suites)
    testing.REVEAL_INPUTS = reveal_inputs
    with Sandbox(submission.cells, limits) as sandbox:
        tests = run_suite(submission.lab, sandbox, keys, aliases, suites)
        load = sandbox.report
    if keys is None:
        tests += manual_questions(Path(path))
    return Report(
        notebook=str(path),
        lab=submission.lab,
        tests=tests,
        load=load,
        similarity=similarity_to_reference(
            submission.sources, getattr(suite, "GRADED", {}), frozenset(getattr(suite, "SIMILARITY_EXEMPT", ()))
        ),
        seconds=time.perf_counter() - started,
    )
