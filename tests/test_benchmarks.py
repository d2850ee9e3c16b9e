"""The results scripts run end to end in fast mode, and never overwrite the published results."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

from quantcourse.recipes import FAST_CALIBRATION_WINDOWS

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


@pytest.mark.slow
def test_nf4_script_in_fast_mode_writes_only_fast_files():
    published = RESULTS / "nf4.json"
    before = published.read_bytes() if published.exists() else None
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "nf4.py")], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    fast = json.loads((RESULTS / "nf4.fast.json").read_text())
    assert fast["meta"]["fast_mode"] is True
    assert {(r["format"], r["block"]) for r in fast["minilm"]} == {
        (label, block) for label in ("INT4 absmax", "FP4", "NF4", "NF4 + double quant") for block in (64, 128)
    }
    assert {r["method"] for r in fast["smollm2"]} == {"int4_absmax", "fp4", "nf4"}
    double_quant = next(r for r in fast["smollm2"] if r["double_quant"])
    assert round(double_quant["bits_per_weight"], 3) == 4.127
    nf4 = {r["block"]: r["mse"] for r in fast["minilm"] if r["format"] == "NF4"}
    int4 = {r["block"]: r["mse"] for r in fast["minilm"] if r["format"] == "INT4 absmax"}
    assert all(nf4[b] < int4[b] for b in (64, 128))  # MiniLM's real weights: NF4 fits them best
    assert "## SmolLM2-135M" in (RESULTS / "nf4.fast.md").read_text()
    assert (published.read_bytes() if published.exists() else None) == before


@pytest.mark.slow
def test_qlora_script_in_fast_mode_writes_only_fast_files():
    published = RESULTS / "qlora.json"
    before = published.read_bytes() if published.exists() else None
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "qlora.py")], capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    fast = json.loads((RESULTS / "qlora.fast.json").read_text())
    assert fast["meta"]["fast_mode"] is True
    assert len(fast["losses"]) == fast["settings"]["steps"] and all(loss > 0 for loss in fast["losses"])
    assert fast["after"]["domain_ppl"] < fast["before"]["domain_ppl"]
    assert len(fast["after"]["generations"]) == 3
    rows = {row["setup"]: row for row in fast["memory"]}
    qlora, full = rows["QLoRA, NF4 base, bf16 compute"], rows["full fine-tuning, bf16, AdamW"]
    assert qlora["measured"]["peak"] < full["measured"]["peak"]
    no_dropout = rows["QLoRA, NF4 base, bf16 compute, no adapter dropout"]["measured"]
    assert no_dropout["activations"] < qlora["measured"]["activations"]
    for row in fast["memory"]:  # the plan reproduces the measured trainable weights, gradients and optimizer states
        assert all(row["measured"][k] == row["plan"][k] for k in ("trainable_weights", "gradients", "optimizer_states"))
    assert round(fast["base_bits_per_weight"], 3) == 4.127
    assert "## Memory of one training step" in (RESULTS / "qlora.fast.md").read_text()
    assert (published.read_bytes() if published.exists() else None) == before


@pytest.mark.slow
def test_gptq_time_script_in_fast_mode_appends_a_fast_row():
    published = RESULTS / "gptq_time.json"
    before = published.read_bytes() if published.exists() else None
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    script = REPO / "benchmarks" / "gptq_time.py"
    result = subprocess.run([sys.executable, str(script), "--threads", "2"], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads((RESULTS / "gptq_time.fast.json").read_text())["rows"][-1]
    assert row["fast_mode"] is True and row["calibration_windows"] == FAST_CALIBRATION_WINDOWS and row["threads"] == 2
    assert row["layers"] == 210 and row["driver"] == "sequential_llama_layer"
    assert 0 < row["gptq_quantize_seconds"] < row["seconds"]
    assert f"| cpu | 2 | sequential_llama_layer | {FAST_CALIBRATION_WINDOWS} | 210 |" in (RESULTS / "gptq_time.fast.md").read_text()
    assert (published.read_bytes() if published.exists() else None) == before
