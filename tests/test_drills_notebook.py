"""course/drills.ipynb runs top to bottom in the course kernel (fast mode) and shows the drill panel;
it is committed without outputs."""

import nbformat
from conftest import REPO

NOTEBOOK = REPO / "course" / "drills.ipynb"
KERNEL = {"name": "quantcourse", "display_name": "Python (quantcourse)", "language": "python"}
WIDGET = "application/vnd.jupyter.widget-view+json"


def test_drills_notebook_is_committed_clean():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert notebook.metadata.get("kernelspec") == KERNEL
    dirty = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"clear the outputs of cells {dirty}: jupyter nbconvert --clear-output --inplace {NOTEBOOK}"


def test_drills_notebook_runs_and_shows_the_panel(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("QUANTCOURSE_FAST", "1")
    monkeypatch.setenv("QUANTCOURSE_CACHE", str(tmp_path))  # the kernel inherits it: no history in the user's cache
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name="quantcourse", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any(WIDGET in out.get("data", {}) for out in outputs), "the drill panel was not displayed"
    text = "".join(out.get("text", "") + str(out.get("data", {}).get("text/markdown", "")) for out in outputs)
    assert "not read" in text and "right (computed" in text, "section 2 shows accepted and refused answers"
    assert "what the notes say" in text and "course/03_nf4.ipynb §2" in text, "section 4 lists the corrected claims"
