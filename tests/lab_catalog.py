"""What the labs' mutation catalogs (tests/test_labNN_mutations.py) share: each wrong or correct
version of a graded function is renamed `function__name`, all of them are loaded into one
sandbox with the solutions, and a version is graded by aliasing the function to it."""

import gc
import re
from contextlib import contextmanager
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell

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
