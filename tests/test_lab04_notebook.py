"""Lab 04's source notebook runs top to bottom in the course kernel, every test cell earns its
points, the SmolLM2 demo shows GPTQ below round-to-nearest and the block size leaving the codes
alone, and the closing report() shows full marks."""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / "04_gptq" / "04_gptq.ipynb"


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
    for bits in (4, 3):  # relative output error on the calibration tokens
        rtn = re.search(rf"{bits}-bit g64 RTN +([\d.]+)", shown)
        gptq = re.search(rf"{bits}-bit g64 GPTQ +([\d.]+)", shown)
        assert rtn and gptq and float(gptq[1]) < 0.6 * float(rtn[1]), f"{bits} bits: GPTQ should be well below RTN on SmolLM2:\n{shown[-3000:]}"
    equal = [float(v) for v in re.findall(r"block_size +\d+: .* codes equal to blocks of 128: ([\d.]+)%", shown)]
    assert len(equal) == 4 and min(equal) >= 99.9, f"the block size must not change the codes: {equal}"

    shown = cell_text(code[-1])
    assert code[-1].source.strip() == "report()"
    assert re.search(rf"{autograded:g} / {autograded:g} points", shown), shown[:2000]
