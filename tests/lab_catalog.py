"""What the labs' mutation catalogs (tests/test_labNN_mutations.py) share: each wrong or correct
version of a graded function is renamed `function__name`, all of them are loaded into one
sandbox with the solutions, and a version is graded by aliasing the function to it; and the
checks every lab's catalog makes of its graded results and of its source notebook."""

import ast
import copy
import gc
import inspect
import re
from contextlib import contextmanager
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell
from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions

from quantcourse.autograder import engine
from quantcourse.autograder.notebook import read_submission
from quantcourse.autograder.sandbox import Sandbox


def renamed(source: str, function: str, name: str) -> str:
    new, count = re.subn(rf"^def {function}\(", f"def {function}__{name}(", source.strip("\n"), count=1, flags=re.MULTILINE)
    assert count == 1, f"{function}/{name} does not define {function}"
    return new


def suite_points(lab: str) -> dict[str, float]:
    """Total points per graded key of the lab's suite."""
    suite = engine.load_suite(lab)
    points: dict[str, float] = {}
    for name, test in vars(suite).items():
        for mark in getattr(test, "pytestmark", []) if name.startswith("test_") else []:
            if mark.name == "graded":
                points[mark.kwargs["key"]] = points.get(mark.kwargs["key"], 0) + mark.kwargs["points"]
    return points


def nbgrader_cells(notebook, kind: str):
    """(cell, nbgrader metadata) of the autograded test cells (kind "test") or manual answers ("manual")."""
    for cell in notebook.cells:
        meta = cell.metadata.get("nbgrader", {})
        if kind == "test" and meta.get("grade") and not meta.get("solution"):
            yield cell, meta
        if kind == "manual" and meta.get("grade") and meta.get("solution"):
            yield cell, meta


@contextmanager
def versions_sandbox(notebook_path: Path, wrong: dict, correct: dict, folder: Path, extra_cells: tuple[str, ...] = (), rename=renamed):
    """One sandbox holding the source notebook's solutions plus every version, renamed by `rename`.

    wrong: {function: {name: (source, expected feedback)}}; correct: {function: {name: source}}.
    """
    notebook = nbformat.read(notebook_path, as_version=4)
    for function, versions in wrong.items():
        notebook.cells += [new_code_cell(rename(src, function, name)) for name, (src, _) in versions.items()]
    for function, versions in correct.items():
        notebook.cells += [new_code_cell(rename(src, function, name)) for name, src in versions.items()]
    notebook.cells += [new_code_cell(source) for source in extra_cells]
    path = folder / f"{notebook_path.stem}_versions.ipynb"
    nbformat.write(notebook, path)
    with Sandbox(read_submission(path).cells) as box:
        assert not box.report.cell_errors, box.report.cell_errors
        # Each run_suite is a pytest session, whose end calls gc.collect(): in a process holding torch
        # and the whole test run that costs ~0.4 s. Frozen objects are not scanned.
        gc.freeze()
        try:
            yield box
        finally:
            gc.unfreeze()


def grade_version(lab: str, sandbox, function: str, name: str | None):
    """The case groups of key "NN.function", with `function` aliased to version `name` (None: the solution)."""
    key = f"{lab[:2]}.{function}"
    aliases = {function: f"{function}__{name}"} if name else {}
    results = engine.run_suite(lab, sandbox, keys={key}, aliases=aliases)
    assert results, f"no case group graded {key}"
    return results


def version(template: str, right: dict, **changes) -> str:
    """`template` with each key of `right` replaced by its value, `changes` overriding some of them."""
    source = template
    for key, value in {**right, **changes}.items():
        source = source.replace(key, value)
    return source


def check_catalog_covers(lab: str, wrong: dict, correct: dict) -> None:
    """Every graded function has at least 5 wrong and 2 correct versions, and nothing else does."""
    graded = set(engine.load_suite(lab).GRADED)
    assert set(wrong) == set(correct) == graded
    for function in graded:
        assert len(wrong[function]) >= 5 and len(correct[function]) >= 2, function


def check_loses_points(results, label: str, expected: str | None) -> list:
    """A wrong version: some case group loses points, by failing (not by a grader error), and the
    feedback names the mistake when `expected` is given. Returns the groups that lost points."""
    lost = [r for r in results if r.points < r.max_points]
    assert lost, f"{label} got full marks"
    assert all(r.status in ("failed", "error") for r in lost), [(r.name, r.status, r.feedback) for r in lost]
    assert not any(r.feedback.startswith("internal grader error") for r in lost), [r.feedback for r in lost]
    if expected:
        feedback = "\n".join(r.feedback for r in lost)
        assert expected in feedback, f"feedback does not name the mistake ({expected!r}):\n{feedback}"
    return lost


def check_full_marks(results) -> None:
    """A correct version: every case group earns all its points."""
    wrong = [(r.name, r.status, r.feedback) for r in results if r.points != r.max_points]
    assert not wrong, wrong


def check_source_and_student_notebooks(lab: str, notebook_path: Path, tmp_path: Path) -> None:
    """The source notebook earns full marks; its student version (nbgrader's own preprocessors, as
    generate_assignment runs them, and the committed student copy where there is one) earns 0,
    every error a NotImplementedError of a function left to write."""
    points = sum(suite_points(lab).values())
    report = engine.grade_notebook(notebook_path)
    assert report.max_score == points
    assert report.score == report.max_score, [(t.name, t.feedback) for t in report.tests if t.status not in ("passed", "manual")]
    assert not report.load.cell_errors and not report.load.refusals
    student = nbformat.read(notebook_path, as_version=4)
    student, _ = ClearSolutions().preprocess(copy.deepcopy(student), {})
    student, _ = ClearHiddenTests().preprocess(student, {})
    path = tmp_path / f"{lab}.ipynb"
    nbformat.write(student, path)
    committed = notebook_path.parent / "student" / notebook_path.name
    for student_version in [path] + ([committed] if committed.is_file() else []):
        report = engine.grade_notebook(student_version)
        assert report.max_score == points
        assert report.score == 0, [(t.name, t.feedback) for t in report.tests if t.points]
        assert not report.load.cell_errors, report.load.cell_errors
        assert all("NotImplementedError" in t.feedback for t in report.tests if t.status == "error"), student_version


def check_test_cells_match_the_suite(lab: str, notebook_path: Path) -> None:
    """One hidden-test cell per graded key, named test_<function>, worth the suite's points."""
    prefix = f"{lab[:2]}."
    cell_points = {}
    for cell, meta in nbgrader_cells(nbformat.read(notebook_path, as_version=4), "test"):
        keys = re.findall(r'^grade\("([^"]+)"\)', cell.source, flags=re.MULTILINE)
        assert len(keys) == 1 and "### BEGIN HIDDEN TESTS" in cell.source, cell.source
        assert meta["grade_id"] == "test_" + keys[0].removeprefix(prefix), meta
        cell_points[keys[0]] = meta["points"]
    assert cell_points == suite_points(lab)
    assert {key.removeprefix(prefix) for key in cell_points} == set(engine.load_suite(lab).GRADED)


def check_reference_signatures(lab: str, notebook_path: Path, default_value=ast.literal_eval) -> None:
    """The graded functions of the notebook have the reference's names, parameters and defaults
    (the lab promises the reference's signatures). default_value: the value of a default's
    expression in the notebook (literals unless the lab says otherwise)."""
    defined = {}
    for cell in nbformat.read(notebook_path, as_version=4).cells:
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.FunctionDef):
                    defined[node.name] = [a.arg for a in node.args.args], [default_value(d) for d in node.args.defaults]
    for name, reference in engine.load_suite(lab).GRADED.items():
        parameters = inspect.signature(reference).parameters.values()
        names = [p.name for p in parameters]
        defaults = [p.default for p in parameters if p.default is not inspect.Parameter.empty]
        assert defined[name] == (names, defaults), (name, defined[name], names, defaults)


def check_saved_without_outputs(notebook_path: Path) -> None:
    for cell in nbformat.read(notebook_path, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def check_solution_cells_hold_only(notebook_path: Path, allowed=(ast.FunctionDef, ast.Import, ast.ImportFrom)) -> None:
    """The grader runs only definitions (and whatever else `allowed` names); a top-level call in a
    solution cell would be lost."""
    for cell in nbformat.read(notebook_path, as_version=4).cells:
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            for node in ast.parse(cell.source).body:
                assert isinstance(node, allowed), ast.dump(node)[:80]
