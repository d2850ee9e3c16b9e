"""benchmarks/awq.py runs end to end in fast mode, writes only its fast files, and AWQ beats RTN."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

RESULTS = REPO / "benchmarks" / "results"


@pytest.mark.slow
def test_awq_script_in_fast_mode_writes_only_fast_files():
    published = RESULTS / "awq.json"
    before = published.read_bytes() if published.exists() else None
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "awq.py")], capture_output=True, text=True, env=env, timeout=4 * 3600)
    assert result.returncode == 0, result.stderr[-3000:]
    check_fast_results(json.loads((RESULTS / "awq.fast.json").read_text()), (RESULTS / "awq.fast.md").read_text())
    assert (published.read_bytes() if published.exists() else None) == before


def check_fast_results(fast: dict, text: str) -> None:
    """The structure of awq.fast.json and .md, and the comparisons that must hold in them."""
    assert fast["meta"]["fast_mode"] is True and fast["meta"]["awq_calibration_windows"] == 8
    rows = fast["rows"]
    methods = [(r["method"], r["bits"], bool(r.get("act_order")), bool(r.get("duo_scaling"))) for r in rows]
    assert methods == [
        ("rtn", 4, False, False), ("gptq", 4, False, False), ("gptq", 4, True, False), ("awq", 4, False, False),
        ("rtn", 3, False, False), ("gptq", 3, False, False), ("gptq", 3, True, False), ("awq", 3, False, False),
        ("awq", 3, False, True), ("awq_gptq", 3, False, False),
    ]  # fmt: skip
    for rtn, others in ((rows[0], rows[1:4]), (rows[4], rows[5:])):
        for row in others:
            assert all(row[k] == rtn[k] for k in ("bits", "group_size", "symmetric", "granularity", "ref_ppl", "eval_tokens"))
            assert row["gap_closed"] == pytest.approx((rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - rtn["ref_ppl"]))
            assert row["bits_per_weight"] == rtn["bits_per_weight"] or row.get("act_order")  # same storage, g_idx aside
    awq4, awq3 = rows[3], rows[7]
    for awq, rtn in ((awq4, rows[0]), (awq3, rows[4])):
        assert awq["ppl"] < rtn["ppl"] and awq["kld"] < rtn["kld"] and awq["quantize_seconds"] > 0
    assert awq3["gap_closed"] > 0.5  # the target, met even with 8 calibration windows
    ablation = fast["ablation"]
    assert [(r["grid"], r["kept"]) for r in ablation] == [
        (grid, kept) for grid in ("int3 asym g64", "int4 asym per-channel(axis 0)") for kept in ("none (RTN)", "activation", "random", "weight")
    ]
    for i in (0, 4):  # keeping the channels with the largest inputs beats keeping random ones
        assert ablation[i + 1]["ppl"] < ablation[i + 2]["ppl"] and ablation[i + 1]["bits_per_weight"] > ablation[i]["bits_per_weight"]
    assert "| awq | int3 g64 asym |" in text and "Target (AWQ closes at least 50%" in text
    assert "## Keeping 1% of the input channels in fp32" in text
