"""benchmarks/kvcache.py runs end to end in fast mode and never overwrites the published results."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

RESULTS = REPO / "benchmarks" / "results"


@pytest.mark.slow
def test_kvcache_script_in_fast_mode_writes_only_fast_files():
    published = [RESULTS / "kvcache.json", RESULTS / "kvcache.md"]
    before = [p.read_bytes() if p.exists() else None for p in published]
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kvcache.py")], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    fast = json.loads((RESULTS / "kvcache.fast.json").read_text())
    context = fast["meta"]["settings"]["context"]
    assert fast["meta"]["fast_mode"] is True and context == 1024
    rows = {r["scheme"]: r for r in fast["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "kivi4", "kivi2", "kivi2_r0", "naive4", "naive2"]
    assert all(r["tokens"] == context - 1 and r["tokens_second_half"] == context // 2 - 1 for r in rows.values())
    assert rows["fp32"]["kld"] == 0 and rows["fp32"]["generation"]["same_tokens"] == 1
    assert fast["meta"]["bytes_match_calculator"] is True
    assert rows["fp32"]["bytes_per_token"] == 46080 and rows["int8"]["bytes_per_token"] == 12240
    # ordering that holds on any window: more bits, less damage; KIVI's key axis beats per-token keys
    assert rows["fp16"]["kld"] < rows["int8"]["kld"] < rows["kivi2"]["kld"] < rows["naive2"]["kld"]
    assert rows["kivi4"]["kld"] < rows["naive4"]["kld"] and rows["kivi2_r0"]["kld"] < rows["naive2"]["kld"]
    assert rows["kivi2"]["kld"] < rows["kivi2_r0"]["kld"]  # the full-precision window helps
    assert [t["met"] for t in fast["targets"]][::2] == [True, True]  # int8 within 0.5%, KIVI int4 within 3%
    text = (RESULTS / "kvcache.fast.md").read_text()
    assert f"| KIVI int2 (G32, R128) | 2 | {rows['kivi2']['bytes_per_token']:.0f} |" in text and "at 1024 tokens of context" in text and "## The calculator on published configs" in text
    assert [p.read_bytes() if p.exists() else None for p in published] == before
