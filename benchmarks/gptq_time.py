"""How long GPTQ takes to quantize all of SmolLM2-135M: on N CPU threads, or on a GPU.

The lesson's target is under 5 minutes on 2 CPU cores with the full calibration set (128 windows
of 512 tokens), int4 g64 asymmetric, the setting of benchmarks/gptq.py. One run quantizes every
decoder linear layer (210 of them) through `gptq_model`, layer by layer, and records:

- the wall time of `gptq_model` (calibration forwards, Hessians, GPTQ itself), and its CPU time;
- the time spent inside `gptq_quantize` (the column loop) across all layers, from its report;
- with --generic, the same run with the generic stage passes (every stage re-runs the layer up to
  its input) instead of `sequential_llama_layer`, to show what computing each intermediate once saves.

Each run appends one row to benchmarks/results/gptq_time.json (rows of other machines and devices
are kept) and rewrites gptq_time.md from all rows.

Usage:
    taskset -c 0,1 python benchmarks/gptq_time.py --threads 2     # a 2-core CPU measurement
    python benchmarks/gptq_time.py --device cuda                    # on a GPU
With QUANTCOURSE_FAST=1: 8 windows, results in gptq_time.fast.* (never the published files).
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from baselines import machine
from quantcourse.reference_impl import gptq
from quantcourse.reference_impl.affine import AffineSpec

from quantcourse.corpus import token_windows
from quantcourse.models import load_reference_model
from quantcourse.recipes import FAST_CALIBRATION_WINDOWS
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
SPEC = AffineSpec(bits=4, symmetric=False, granularity="group", group_size=64)


def time_gptq(device: str, windows: int, generic: bool) -> dict:
    """Quantize the whole model once; the timings and what was run."""
    model, tokenizer = load_reference_model()
    model.to(device)
    calibration = token_windows(tokenizer, "calibration", gptq.CALIBRATION_LENGTH, windows).to(device)
    options = gptq.GPTQOptions(SPEC)
    is_llama_layer = gptq.is_llama_layer
    if generic:  # is_llama_layer False: every stage through stage_hessians, outputs recomputed
        gptq.is_llama_layer = lambda layer: False
    try:
        if device == "cuda":
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        report = gptq.gptq_model(model, calibration, options, progress=False)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        gptq.is_llama_layer = is_llama_layer
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "driver": "generic stage passes" if generic else "sequential_llama_layer",
        "calibration_windows": windows,
        "layers": len(report),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "gptq_quantize_seconds": round(sum(r["seconds"] for r in report.values()), 1),
        "load_before": None,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Time to quantize all of SmolLM2-135M with GPTQ",
        "",
        (
            "int4 g64 asymmetric, 128 calibration windows of 512 tokens, true-sequential, blocks of 128 "
            "(benchmarks/gptq.py's setting). `seconds`: wall time of `gptq_model` (calibration forwards, Hessians "
            "and the column loops); `gptq_quantize`: the column loops alone. Target: under 300 s on 2 CPU cores."
        ),
        "",
        "| device | threads | driver | windows | layers | seconds | CPU s | gptq_quantize s | load | machine | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['threads']} | {r['driver']} | {r['calibration_windows']} | {r['layers']} "
            f"| {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['gptq_quantize_seconds']:.1f} "
            f"| {r['load_before']} | {r['machine']['cpu']} | {r['date']} |"
        )
    commands = (
        "Commands: `taskset -c 0,1 python benchmarks/gptq_time.py --threads 2` and "
        "`python benchmarks/gptq_time.py --device cuda` (add `--generic` for the generic driver)."
    )
    lines += ["", commands, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--generic", action="store_true", help="time the generic stage passes instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = FAST_CALIBRATION_WINDOWS if fast_mode() else gptq.CALIBRATION_WINDOWS
    load_before = round(os.getloadavg()[0], 2)
    row = time_gptq(args.device, windows, args.generic)
    row.update(load_before=load_before, machine=machine(), date=time.strftime("%Y-%m-%d"), fast_mode=fast_mode())
    print(json.dumps(row), flush=True)
    stem = "gptq_time.fast" if fast_mode() else "gptq_time"
    path = RESULTS / f"{stem}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(rows))
    print(f"wrote {path} and {stem}.md")


if __name__ == "__main__":
    main()
