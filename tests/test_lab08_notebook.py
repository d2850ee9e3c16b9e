"""Lab 08's source notebook runs top to bottom in the course kernel, every test cell earns its
points, SmolLM2 runs with a cache stored by the learner's functions (its measured bytes equal the
learner's calculator, and the schemes rank as KIVI says they should), and the closing report()
shows full marks."""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / "08_kv_cache" / "08_kv_cache.ipynb"


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
    assert re.search(r"Llama-3-8B +fp16 +131072 ", shown), "the calculator table: Llama-3-8B caches 128 KiB per token in fp16"
    errors = {name: (float(a), float(b)) for name, a, b in re.findall(r"^ *(keys|values) +([\d.]+) +([\d.]+)$", shown, flags=re.MULTILINE)}
    assert set(errors) == {"keys", "values"}, shown[-3000:]
    per_token, per_channel = errors["keys"]
    assert per_channel < 0.6 * per_token, f"SmolLM2's keys: groups along a channel should beat groups along a token: {errors}"
    rows = re.findall(r"^ *(int8|kivi2|kivi2_r0|naive2) +(\d+) +(\d+) +([\d.]+) +([\d.]+)%$", shown, flags=re.MULTILINE)
    rows = {name: (int(measured), int(planned), float(kld), float(top1)) for name, measured, planned, kld, top1 in rows}
    assert list(rows) == ["int8", "kivi2", "kivi2_r0", "naive2"], shown[-3000:]
    for name, (measured, planned, _, _) in rows.items():
        assert measured == planned, f"{name}: the bytes the learner's functions stored must equal the learner's calculator"
    kld = {name: row[2] for name, row in rows.items()}
    assert kld["int8"] < kld["kivi2"] < kld["kivi2_r0"] < kld["naive2"], kld

    shown = cell_text(code[-1])
    assert code[-1].source.strip() == "report()"
    assert re.search(rf"{autograded:g} / {autograded:g} points", shown), shown[:2000]
