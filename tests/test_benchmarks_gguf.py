"""benchmarks/gguf_types.py runs end to end in fast mode and never overwrites the published results."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

RESULTS = REPO / "benchmarks" / "results"


@pytest.mark.slow
def test_gguf_script_in_fast_mode_writes_only_fast_files():
    published = [RESULTS / "gguf.json", RESULTS / "gguf.md"]
    before = [p.read_bytes() if p.exists() else None for p in published]
    env = {**os.environ, "QUANTCOURSE_FAST": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gguf_types.py")], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    fast = json.loads((RESULTS / "gguf.fast.json").read_text())
    assert fast["meta"]["fast_mode"] is True

    shipped = fast["shipped"]
    assert shipped["ppl"] == shipped["ref_ppl"]  # transformers sees exactly the reference weights...
    assert shipped["kld"] < 1e-5 and shipped["top1_agreement"] > 0.999  # ...up to the fp16 reference log-probs
    assert shipped["linear_bits_per_weight"] == 5.0 and shipped["weight_rel_error"] == 0.0
    rows = {r["label"]: r for r in fast["file_types"] + fast["ffn_down"]}
    assert set(rows) == {"Q8_0", "Q4_K_M", "Q4_0", "ffn_down Q4_K", "ffn_down Q4_0"}
    q8, q4_k_m, q4_0 = rows["Q8_0"], rows["Q4_K_M"], rows["Q4_0"]
    assert q8["linear_bits_per_weight"] == 8.5 and q4_0["linear_bits_per_weight"] == 4.5
    assert q8["kld"] < 0.01 and q8["top1_agreement"] > 0.95  # about lossless
    assert q8["kld"] < q4_k_m["kld"] < q4_0["kld"]
    assert q4_k_m["types"] == {"F32": 61, "Q8_0": 15, "Q6_K": 14, "Q4_K": 16, "Q5_0": 166}
    down_k, down_0 = rows["ffn_down Q4_K"], rows["ffn_down Q4_0"]
    assert down_k["linear_bits_per_weight"] == down_0["linear_bits_per_weight"]  # the same 4.5 bits on ffn_down
    assert down_k["kld"] < down_0["kld"] and down_k["weight_rel_error"] < down_0["weight_rel_error"]

    minilm = {(r["type"], r["search"]): r["mse"] for r in fast["minilm"]}
    assert minilm[("Q4_K", True)] < minilm[("Q4_K", False)] and minilm[("Q4_K", True)] < minilm[("Q4_0", True)]
    assert fast["reencode"] == {"Q4_1": [3317760, 3317760], "Q8_0": [884736, 884736]}
    text = (RESULTS / "gguf.fast.md").read_text()
    assert "## One type for ffn_down, everything else as shipped" in text and "576 = 2.25 x 256" in text
    assert [p.read_bytes() if p.exists() else None for p in published] == before
