"""Lab 02's source notebook, executed top to bottom as a learner would (fast mode): no cell
fails, every test cell's grade() returns its points, and the final report shows full marks."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

SOURCE = Path(__file__).resolve().parents[1] / "labs" / "02_outliers" / "02_outliers.ipynb"


@pytest.mark.slow
def test_source_notebook_runs_with_full_marks(tmp_path, monkeypatch):
    path = tmp_path / SOURCE.name
    shutil.copy(SOURCE, path)
    monkeypatch.setenv("QUANTCOURSE_FAST", "1")
    monkeypatch.setenv("QUANTCOURSE_NOTEBOOK", str(path))  # what grade() and report() grade
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, kernel_name="quantcourse", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [
        (cell.source[:60], out.get("ename"), out.get("evalue"))
        for cell in code_cells
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
    for cell in code_cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade") and not meta.get("solution"):
            returned = [out["data"]["text/plain"] for out in cell.outputs if out.output_type == "execute_result"]
            assert returned == [repr(float(meta["points"]))], (meta["grade_id"], cell.outputs)
    report = "".join(out.get("data", {}).get("text/html", "") for out in code_cells[-1].outputs)
    assert "100 / 100 points" in report, report[:500]
