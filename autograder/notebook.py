"""Which code of a submitted notebook the grader runs.

The grader does not execute the notebook top to bottom. It takes, from every code cell in
notebook order, the statements that *define* things: imports, functions, classes, and (in the
cells nbgrader marks as solutions) assignments. Plots, prints and demo calls are left out, and
so are test cells: the pristine tests ship with the package, so editing a test cell changes
nothing. This survives what learners do to notebooks: cells deleted, split, duplicated or moved
(a later definition wins, as when running top to bottom), metadata lost, a syntax error in one
cell (that cell alone is lost).
"""

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .sandbox import Cell

HIDDEN_TESTS = "### BEGIN HIDDEN TESTS"
GRADE_CALL = re.compile(r"^\s*grade\(\s*[\"']", re.MULTILINE)


class NotebookError(ValueError):
    """The file cannot be graded (missing, not a notebook); the message says what to do."""


@dataclass(frozen=True)
class Submission:
    path: Path
    cells: list[Cell]  # what the learner process loads, in notebook order
    sources: dict[int, str]  # cell index -> full source of every code cell (for integrity checks)
    lab: str | None  # e.g. "01_affine", from the notebook's metadata or file name


def read_notebook(path: Path) -> nbformat.NotebookNode:
    path = Path(path)
    if not path.is_file():
        raise NotebookError(f"{path} does not exist. Give the path of a lab notebook, e.g. labs/01_affine/01_affine.ipynb")
    try:
        return nbformat.read(path, as_version=4)
    except Exception as error:  # nbformat raises several types for a broken file
        raise NotebookError(f"{path} is not a readable Jupyter notebook ({type(error).__name__}: {error})") from None


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_test_cell(cell) -> bool:
    meta = nbgrader_meta(cell)
    if meta.get("grade") and not meta.get("solution"):
        return True
    source = cell.get("source", "")
    return HIDDEN_TESTS in source or bool(GRADE_CALL.search(source))


def without_magics(source: str) -> str:
    """IPython magics and shell escapes are not Python: blank them, keeping line numbers."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def definitions_only(source: str, keep_assignments: bool) -> str:
    """The cell's top-level definitions, other lines blanked so line numbers stay true.

    A cell that does not parse is returned whole: running it reports the SyntaxError where it is.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    kinds = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    if keep_assignments:
        kinds += (ast.Assign, ast.AnnAssign)
    lines = source.splitlines()
    keep = [False] * len(lines)
    for node in tree.body:
        if isinstance(node, kinds) and not imports_course(node):
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            for i in range(first - 1, node.end_lineno):
                keep[i] = True
    return "\n".join(line if k else "" for line, k in zip(lines, keep))


def imports_course(node: ast.stmt) -> bool:
    """`from quantcourse... import` in a lab is for its demos; the grader leaves it out."""
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "quantcourse"
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "quantcourse" for alias in node.names)
    return False


def lab_of(notebook, path: Path) -> str | None:
    lab = notebook.get("metadata", {}).get("quantcourse", {}).get("lab")
    if lab:
        return lab
    match = re.match(r"(\d\d_[a-z0-9_]+?)(?:[._-]|$)", path.stem)
    return match.group(1) if match else None


def read_submission(path: Path) -> Submission:
    """The cells the grader will run from the notebook at `path`."""
    notebook = read_notebook(path)
    cells, sources = [], {}
    for index, cell in enumerate(notebook.cells, start=1):
        if cell.get("cell_type") != "code":
            continue
        source = without_magics(cell.get("source", ""))
        sources[index] = source
        if is_test_cell(cell):
            continue
        solution = bool(nbgrader_meta(cell).get("solution")) or "### BEGIN SOLUTION" in source
        code = definitions_only(source, keep_assignments=solution)
        if code.strip():
            cells.append(Cell(index, code))
    return Submission(Path(path), cells, sources, lab_of(notebook, Path(path)))
