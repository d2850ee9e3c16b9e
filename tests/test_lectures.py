"""The lecture notebooks run top to bottom and draw their figures, and no notebook in course/ or labs/
is committed with outputs."""

import subprocess
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
COURSE = REPO / "course"
LECTURES = sorted(COURSE.glob("[0-9][0-9]_*.ipynb"))
KERNEL = {"name": "quantcourse", "display_name": "Python (quantcourse)", "language": "python"}


def test_lectures_exist_and_use_the_course_kernel():
    assert LECTURES, f"no lecture notebooks (NN_topic.ipynb) in {COURSE}"
    for path in LECTURES:
        kernelspec = nbformat.read(path, as_version=4).metadata.get("kernelspec")
        assert kernelspec == KERNEL, f"{path.name}: kernelspec is {kernelspec}, expected {KERNEL}"


@pytest.mark.slow
@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.stem)
def test_lecture_runs_top_to_bottom(path, monkeypatch):
    """Executed as a learner would, from course/, in the course kernel, with fast mode on."""
    from nbclient import NotebookClient

    monkeypatch.setenv("QUANTCOURSE_FAST", "1")  # the kernel inherits the environment
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name="quantcourse", timeout=600, resources={"metadata": {"path": str(COURSE)}})
    client.execute()  # raises CellExecutionError, with the traceback, at the first failing cell
    outputs = [(i, out) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" for out in cell.outputs]
    errors = [f"cell {i}: {out.get('ename')}: {out.get('evalue')}" for i, out in outputs if out.output_type == "error"]
    assert not errors, f"{path.name} produced error outputs: {errors}"
    assert any("image/png" in out.get("data", {}) for _, out in outputs), f"{path.name} drew no figure"


def notebooks_as_committed() -> dict[str, str]:
    """Every notebook under course/ and labs/, as it is (or is about to be) committed.

    Tracked files are read from the git index, so a learner's executed copy in the working tree
    does not count; new files not ignored by git are read from disk. Outside a git checkout, the
    files on disk are used.
    """
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "course", "labs"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listing.returncode != 0:
        paths = [p.relative_to(REPO).as_posix() for folder in ("course", "labs") for p in (REPO / folder).rglob("*.ipynb")]
        return {p: (REPO / p).read_text() for p in paths if ".ipynb_checkpoints" not in p}
    texts = {}
    for path in sorted(set(filter(None, listing.stdout.split("\0")))):
        if not path.endswith(".ipynb") or ".ipynb_checkpoints" in path:
            continue
        staged = subprocess.run(["git", "show", f":{path}"], cwd=REPO, capture_output=True, text=True, check=False)
        if staged.returncode == 0:
            texts[path] = staged.stdout
        elif (REPO / path).is_file():
            texts[path] = (REPO / path).read_text()
    return texts


def test_no_notebook_is_committed_with_outputs():
    offenders = []
    for path, text in notebooks_as_committed().items():
        cells = [
            i for i, cell in enumerate(nbformat.reads(text, as_version=4).cells)
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
        ]  # fmt: skip
        if cells:
            offenders.append(f"{path} ({len(cells)} cells, the first is cell {cells[0]})")
    assert not offenders, (
        "notebooks must be committed without outputs or execution counts; clear them with "
        "`jupyter nbconvert --clear-output --inplace FILE`: " + ", ".join(offenders)
    )
