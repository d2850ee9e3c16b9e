"""Lab 05's source notebook runs top to bottom in the course kernel, every test cell earns its
points, the SmolLM2 demos show AWQ's scales below round-to-nearest on q/k/v and on the MLP, the
folded float MLP unchanged and clipping adding to the scales, and the closing report() shows full
marks."""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / "05_awq" / "05_awq.ipynb"


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
    qkv = re.findall(r"(calibration|held-out): q/k/v output error, RTN ([\d.]+), AWQ ([\d.]+)", shown)
    assert len(qkv) == 2 and all(float(awq) < 0.6 * float(rtn) for _, rtn, awq in qkv), f"AWQ should cut q/k/v's error:\n{shown[-3000:]}"
    unchanged = [float(v) for v in re.findall(r"the folded float MLP differs by ([\d.e+-]+);", shown)]
    assert len(unchanged) == 2 and max(unchanged) < 1e-5, f"folding must leave the float MLP unchanged: {unchanged}"
    rows = {label: (float(a), float(b)) for label, a, b in re.findall(r"^ *(RTN|AWQ scales|AWQ scales \+ clipping) +([\d.]+) +([\d.]+)$", shown, re.MULTILINE)}
    assert set(rows) == {"RTN", "AWQ scales", "AWQ scales + clipping"}, shown[-2000:]
    for i in (0, 1):  # 4 and 3 bits
        assert rows["AWQ scales + clipping"][i] < rows["AWQ scales"][i] < rows["RTN"][i], rows

    shown = cell_text(code[-1])
    assert code[-1].source.strip() == "report()"
    assert re.search(rf"{autograded:g} / {autograded:g} points", shown), shown[:2000]
