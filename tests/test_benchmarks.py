"""The results scripts run end to end in fast mode, and never overwrite the published results."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

RESULTS = REPO / "benchmarks" / "results"


@pytest.mark.slow
def test_baselines_script_in_fast_mode_writes_only_fast_files():
    published = RESULTS / "baselines.json"
    before = published.read_bytes() if published.exists() else None
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "baselines.py")], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    fast = json.loads((RESULTS / "baselines.fast.json").read_text())
    assert fast["meta"]["fast_mode"] is True
    methods = {(r["method"], r.get("act_granularity"), r.get("granularity")) for r in fast["rows"]}
    assert ("w8a8", "tensor", None) in methods and ("llm_int8", None, None) in methods
    assert "Artifact: int4 g32 with a float zero point" in (RESULTS / "baselines.fast.md").read_text()
    assert (published.read_bytes() if published.exists() else None) == before
