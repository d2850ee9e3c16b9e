"""Lab 06's source notebook runs top to bottom in the course kernel, every test cell earns its
points, the SmolLM2 demo shows folding that leaves layer 2's output alone and smoothing that lowers
the W8A8 error (alpha 0 raising it), and the closing report() shows full marks."""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / "06_smoothquant" / "06_smoothquant.ipynb"
INPUTS = ("q, k, v", "gate, up", "down")


def cell_text(cell) -> str:
    """Everything a code cell showed: streams, results and displayed HTML or text."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/html") or output.data.get("text/plain", ""))
    return "\n".join(parts)


def error_table(shown: str) -> dict:
    """alpha label -> {(input, "token" | "static"): relative error}, from the sweep's first table."""
    table = shown.split("W8A8 relative output error", 1)[1].split("largest / median", 1)[0]
    rows = {}
    for label, numbers in re.findall(r"^ *(none|[\d.]+)((?: +[\d.]+){6})$", table, flags=re.MULTILINE):
        values = [float(v) for v in numbers.split()]
        rows[label] = {(name, mode): values[2 * i + j] for i, name in enumerate(INPUTS) for j, mode in enumerate(("token", "static"))}
    return rows


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
    change = re.search(r"layer 2's output changed by ([\d.e+-]+)", shown)
    assert change and float(change[1]) < 1e-5, f"folding must leave layer 2's output alone:\n{shown[-3000:]}"
    distances = [float(d) for d in re.findall(r"distance to X / s ([\d.e+-]+)", shown)]
    assert len(distances) == 3 and max(distances) < 1e-5, distances
    rows = error_table(shown)
    assert set(rows) == {"none", "0.0", "0.5", "0.75", "0.85", "1.0"}, rows
    smoothed = [label for label in rows if label != "none"]
    for name in INPUTS:
        none = rows["none"][name, "token"]
        assert min(rows[a][name, "token"] for a in smoothed) < 0.8 * none, (name, rows)
        assert rows["0.0"][name, "token"] > none, f"alpha 0 must be worse than no smoothing for {name}: {rows}"
        assert rows["none"][name, "static"] > none, f"static per tensor must be worse than per token without smoothing: {rows}"
    down_static = rows["none"]["down", "static"]
    assert min(rows[a]["down", "static"] for a in smoothed) < down_static / 3, rows

    shown = cell_text(code[-1])
    assert code[-1].source.strip() == "report()"
    assert re.search(rf"{autograded:g} / {autograded:g} points", shown), shown[:2000]
