"""Round-to-nearest on SmolLM2-135M: the baseline table of lesson 01 and of the eval harness.

Usage:  python benchmarks/rtn_table.py          (writes benchmarks/results/rtn.{json,md})
With QUANTCOURSE_FAST=1 it evaluates fewer tokens and writes rtn.fast.* instead, never the
published files.
"""

import json
import platform
import sys
import time
from pathlib import Path

from quantcourse.recipes import evaluate_recipe
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [  # (bits, group_size, symmetric)
    (8, None, True),
    (4, None, True),
    (4, 64, True),
    (4, 64, False),
    (3, 64, True),
    (3, 64, False),
]


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Round-to-nearest weight quantization of SmolLM2-135M",
        "",
        f"Reference (fp32, dequantized from the shipped Q4_1 GGUF): perplexity {rows[0]['ref_ppl']:.3f} "
        f"on {rows[0]['eval_tokens']} held-out tokens of the Python manual.",
        "All 210 decoder linear layers quantized; the tied embedding/output head stays fp32.",
        "Bits per weight count an fp16 scale per block and, for asymmetric grids, a zero point of `bits` bits.",
        "",
        "| bits | group | grid | ppl | Δppl | KLD | top-1 agreement | bits/weight | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bits']} | {r['group_size'] or 'channel'} | {'sym' if r['symmetric'] else 'asym'} "
            f"| {r['ppl']:.3f} | {100 * (r['ppl'] / r['ref_ppl'] - 1):+.2f}% | {r['kld']:.5f} "
            f"| {r['top1_agreement']:.2%} | {r['bits_per_weight']:.4f} | {r['seconds']:.0f} |"
        )
    lines += ["", f"Command: `{meta['command']}`; machine: {meta['machine']['cpu']}, "
              f"{meta['machine']['threads']} threads, Python {meta['machine']['python']}, torch "
              f"{meta['machine']['torch']}; {meta['date']}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    rows = []
    for bits, group_size, symmetric in CONFIGS:
        row = evaluate_recipe("rtn", bits, group_size=group_size, symmetric=symmetric, progress=sys.stderr.isatty())
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {
        "command": "python benchmarks/rtn_table.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "fast_mode": fast_mode(),
    }
    stem = "rtn.fast" if fast_mode() else "rtn"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(rows, meta))
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
