"""benchmarks/smoothquant.py runs end to end in fast mode without touching the published results;
benchmarks/smoothquant_speed.py runs its tiny layer on CPU under Triton's interpreter."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

from quantcourse.recipes import FAST_CALIBRATION_WINDOWS

RESULTS = REPO / "benchmarks" / "results"


@pytest.mark.slow
def test_smoothquant_script_in_fast_mode_writes_only_fast_files():
    published = {name: RESULTS / name for name in ("smoothquant.json", "smoothquant.md", "smoothquant.png")}
    before = {name: path.read_bytes() if path.exists() else None for name, path in published.items()}
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    script = REPO / "benchmarks" / "smoothquant.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    fast = json.loads((RESULTS / "smoothquant.fast.json").read_text())
    assert fast["meta"]["fast_mode"] is True and fast["meta"]["calibration_windows"] == FAST_CALIBRATION_WINDOWS
    rows = fast["rows"]
    assert set(rows) == {"naive_static", "naive_dynamic_tensor", "naive_token", "sq_static", "sq_static_down", "sq_token", "sq_token_down", "smoothed_fp32"}
    assert rows["naive_token"]["ref_ppl"] == rows["sq_token"]["ref_ppl"] and rows["sq_token"]["eval_tokens"] == 4 * 511
    # smoothing alone changes nothing: the smoothed fp32 model scores like the reference
    assert abs(rows["smoothed_fp32"]["ppl"] / rows["smoothed_fp32"]["ref_ppl"] - 1) < 1e-4 and rows["smoothed_fp32"]["kld"] < 1e-4
    assert rows["sq_token"]["ppl"] < rows["naive_token"]["ppl"]
    assert rows["sq_static_down"]["ppl"] < rows["naive_static"]["ppl"]
    assert fast["meta"]["recipe_check"]["ppl"] == rows["sq_token"]["ppl"]  # quantcourse eval gives the same number
    curves = fast["sweep"]
    assert len(curves) == 4 and all([a for a, _ in c["points"]] == fast["meta"]["alphas"] for c in curves)
    for c in curves:
        assert c["best_alpha"] == min(c["points"], key=lambda p: p[1])[0]
    assert {t["target"] for t in fast["targets"]} and all(isinstance(t["met"], bool) for t in fast["targets"])
    md = (RESULTS / "smoothquant.fast.md").read_text()
    assert "## Targets" in md and "## alpha sweep" in md and "agrees with the per-token SmoothQuant row exactly" in md
    assert (RESULTS / "smoothquant.fast.png").stat().st_size > 10_000
    assert {name: path.read_bytes() if path.exists() else None for name, path in published.items()} == before


def test_speed_script_runs_on_cpu_under_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = REPO / "benchmarks" / "smoothquant_speed.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "smoothquant_speed.interpreter.json").read_text())
    assert out["meta"]["mode"] == "interpreter"
    assert {(r["M"], r["contender"]) for r in out["rows"]} == {(M, c) for M in (1, 5) for c in ("fp16", "w8a8", "w8a8 gemm only")}
    assert all(r["us"] > 0 and r["twin_error"] < 2e-3 for r in out["rows"])
    assert "| 5 |" in (tmp_path / "smoothquant_speed.interpreter.md").read_text()
    assert not (RESULTS / "smoothquant_speed.interpreter.json").exists()


def test_speed_script_refuses_cpu_without_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    script = REPO / "benchmarks" / "smoothquant_speed.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1 and "set TRITON_INTERPRET=1" in result.stderr
    assert not list(tmp_path.iterdir())
