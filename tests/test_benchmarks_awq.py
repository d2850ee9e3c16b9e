"""benchmarks/gptq.py and then benchmarks/awq.py (which reuses GPTQ's rows) run end to end in fast
mode, write only their fast files, GPTQ beats RTN and AWQ beats RTN."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

from quantcourse.recipes import FAST_CALIBRATION_WINDOWS

RESULTS = REPO / "benchmarks" / "results"
PUBLISHED = [RESULTS / name for name in ("gptq.json", "gptq.md", "awq.json", "awq.md")]


def run_fast(script: str) -> None:
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_gptq_then_awq_scripts_in_fast_mode_write_only_fast_files():
    """One test, so that AWQ's table reuses the GPTQ rows just computed instead of computing them again."""
    before = [p.read_bytes() if p.exists() else None for p in PUBLISHED]
    run_fast("gptq.py")
    check_gptq_fast(json.loads((RESULTS / "gptq.fast.json").read_text()), (RESULTS / "gptq.fast.md").read_text())
    run_fast("awq.py")
    check_awq_fast(json.loads((RESULTS / "awq.fast.json").read_text()), (RESULTS / "awq.fast.md").read_text())
    assert [p.read_bytes() if p.exists() else None for p in PUBLISHED] == before


def check_gptq_fast(fast: dict, text: str) -> None:
    """The structure of gptq.fast.json (int3 g64 only) and what must hold in it."""
    assert fast["meta"]["fast_mode"] is True and fast["meta"]["calibration_windows"] == FAST_CALIBRATION_WINDOWS
    rows = fast["rows"]
    assert [(r["method"], r["bits"], r["group_size"]) for r in rows] == [(m, 3, 64) for m in ("rtn", "gptq", "gptq")]
    for rtn, plain, ordered in zip(rows[::3], rows[1::3], rows[2::3]):
        assert (plain["act_order"], ordered["act_order"]) == (False, True)
        for gptq in (plain, ordered):
            assert all(gptq[k] == rtn[k] for k in ("bits", "group_size", "symmetric", "granularity"))
            assert gptq["gap_closed"] == pytest.approx((rtn["ppl"] - gptq["ppl"]) / (rtn["ppl"] - rtn["ref_ppl"]))
            assert gptq["kld"] < rtn["kld"] and gptq["quantize_seconds"] > 0
    assert "| gptq | int3 g64 asym act-order |" in text


def check_awq_fast(fast: dict, text: str) -> None:
    """The structure of awq.fast.json and .md (int3 g64: RTN, GPTQ, AWQ), and the comparisons that must hold."""
    assert fast["meta"]["fast_mode"] is True and fast["meta"]["awq_calibration_windows"] == FAST_CALIBRATION_WINDOWS
    rows = fast["rows"]
    methods = [(r["method"], r["bits"], bool(r.get("act_order")), bool(r.get("duo_scaling"))) for r in rows]
    assert methods == [("rtn", 3, False, False), ("gptq", 3, False, False), ("gptq", 3, True, False), ("awq", 3, False, False)]
    rtn = rows[0]
    for row in rows[1:]:
        assert all(row[k] == rtn[k] for k in ("bits", "group_size", "symmetric", "granularity", "ref_ppl", "eval_tokens"))
        assert row["gap_closed"] == pytest.approx((rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - rtn["ref_ppl"]))
        assert row["bits_per_weight"] == rtn["bits_per_weight"] or row.get("act_order")  # same storage, g_idx aside
    assert [r["source"] for r in rows[1:3]] == ["gptq.fast.json"] * 2  # reused, not recomputed
    awq = rows[3]
    assert awq["ppl"] < rtn["ppl"] and awq["kld"] < rtn["kld"] and awq["quantize_seconds"] > 0  # target: awq.md
    ablation = fast["ablation"]
    assert [(r["grid"], r["kept"]) for r in ablation] == [
        (grid, kept) for grid in ("int3 asym g64", "int4 asym per-channel(axis 0)") for kept in ("none (RTN)", "activation", "random", "weight")
    ]
    for i in (0, 4):  # keeping the channels with the largest inputs beats keeping random ones
        assert ablation[i + 1]["ppl"] < ablation[i + 2]["ppl"] and ablation[i + 1]["bits_per_weight"] > ablation[i]["bits_per_weight"]
    assert "| awq | int3 g64 asym |" in text and "Target (AWQ closes at least 50%" in text
    assert "## Keeping 1% of the input channels in fp32" in text
