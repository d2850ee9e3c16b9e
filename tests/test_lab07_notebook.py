"""Lab 07's source notebook runs top to bottom in the course kernel, every test cell earns its
points, the SmolLM2 demo's training lowers the held-out loss, and the closing report() shows full
marks."""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / "07_qlora" / "07_qlora.ipynb"


def cell_text(cell) -> str:
    """Everything a code cell showed: streams, results and displayed HTML or text."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/html") or output.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_source_notebook_runs_with_full_marks(tmp_path, monkeypatch):
    path = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, path)
    monkeypatch.setenv("QUANTCOURSE_FAST", "1")
    monkeypatch.setenv("QUANTCOURSE_NOTEBOOK", str(path))  # what grade() and report() grade
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name="quantcourse", timeout=600, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    client.execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [(cell.source[:60], out.ename, out.evalue) for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors

    autograded = 0
    for cell in code:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            autograded += meta["points"]
            results = [out for out in cell.outputs if out.output_type == "execute_result"]
            assert results and float(results[-1].data["text/plain"]) == meta["points"], (meta["grade_id"], cell_text(cell))

    trained = re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", "\n".join(cell_text(cell) for cell in code))
    assert trained and float(trained[2]) < float(trained[1]), "the SmolLM2 demo's adapters should lower the held-out loss"

    shown = cell_text(code[-1])
    assert code[-1].source.strip() == "report()"
    assert re.search(rf"{autograded:g} / {autograded:g} points", shown), shown[:2000]
