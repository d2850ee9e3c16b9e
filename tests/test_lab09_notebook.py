"""Lab 09's source notebook runs top to bottom in the course kernel, every test cell earns its
points, the demo's bytes equal gguf-py's and its tables hold together (the SmolLM2 file's tensors
end where the file does; Q4_K beats Q4_0 at the same bits per weight), and the closing report()
shows full marks."""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / "09_gguf" / "09_gguf.ipynb"


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

    shown = "\n".join(cell_text(cell) for cell in code)
    ends = re.search(r"the last tensor ends at byte ([\d,]+); the file has ([\d,]+) bytes", shown)
    assert ends and ends[1] == ends[2], shown[-3000:]
    assert re.search(r"^Q8_0: .*identical to gguf-py's: True$", shown, flags=re.MULTILINE), shown[-3000:]
    assert re.search(r"^Q4_0: .*identical to gguf-py's: True$", shown, flags=re.MULTILINE), shown[-3000:]
    assert re.search(r"^Q4_K: .*identical to gguf-py's decoder: True$", shown, flags=re.MULTILINE), shown[-3000:]
    sqnr = {name.strip(): [float(v) for v in values.split()]
            for name, values in re.findall(r"^ *(Q\S+(?:, no search)?) +[\d.]+ +([-\d. ]+)$", shown, flags=re.MULTILINE)}  # fmt: skip
    assert set(sqnr) == {"Q8_0", "Q4_0", "Q4_1", "Q4_K, no search", "Q4_K"}, shown[-3000:]
    for layer in range(2):
        assert sqnr["Q8_0"][layer] > sqnr["Q4_K"][layer] > sqnr["Q4_0"][layer], sqnr
        assert sqnr["Q4_K"][layer] >= sqnr["Q4_K, no search"][layer], sqnr

    shown = cell_text(code[-1])
    assert code[-1].source.strip() == "report()"
    assert re.search(rf"{autograded:g} / {autograded:g} points", shown), shown[:2000]
