"""The baselines of lessons 01 and 02 on SmolLM2-135M: round-to-nearest at every granularity,
W8A8 with per-tensor and per-token activations, and LLM.int8().

Usage:  python benchmarks/baselines.py     (writes benchmarks/results/baselines.{json,md})
With QUANTCOURSE_FAST=1 it evaluates fewer tokens and writes baselines.fast.* instead, never the
published files.
"""

import json
import platform
import sys
import time
from pathlib import Path

from quantcourse.cli import recipe_label
from quantcourse.recipes import RecipeOptions, evaluate_recipe
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [  # (method, options)
    ("rtn", RecipeOptions(bits=8, granularity="tensor")),
    ("rtn", RecipeOptions(bits=8)),
    ("rtn", RecipeOptions(bits=4)),
    ("rtn", RecipeOptions(bits=4, group_size=64)),
    ("rtn", RecipeOptions(bits=4, group_size=64, symmetric=False)),
    ("rtn", RecipeOptions(bits=4, group_size=32)),
    ("rtn", RecipeOptions(bits=4, group_size=32, symmetric=False)),
    ("rtn", RecipeOptions(bits=4, group_size=32, symmetric=False, zero_point="float")),
    ("rtn", RecipeOptions(bits=3, group_size=64)),
    ("rtn", RecipeOptions(bits=3, group_size=64, symmetric=False)),
    ("w8a8", RecipeOptions(act_granularity="tensor")),
    ("w8a8", RecipeOptions(act_granularity="token")),
    ("llm_int8", RecipeOptions(threshold=6.0)),
]


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}


def q4_1_note(rows: list[dict]) -> list[str]:
    """The artifact of this reference model, stated with the measured numbers."""
    def find(zero_point):
        return next(
            (r for r in rows if r["method"] == "rtn" and r["bits"] == 4 and r["group_size"] == 32
             and not r["symmetric"] and r["zero_point"] == zero_point), None,
        )  # fmt: skip

    exact, integer = find("float"), find("integer")
    if not (exact and integer):
        return []
    return [
        f"Artifact: int4 g32 with a float zero point (x_hat = s * q + min) scores KLD {exact['kld']:.2g}: the "
        "reference weights *are* Q4_1 blocks of 32 (fp16 s and min), so the same form on the same blocks "
        "finds them again. This is a property of the reference model, not a merit of the recipe. "
        f"An integer zero point (the GPTQ/AWQ form) on the same groups scores KLD {integer['kld']:.3f}, "
        "because z = round(-min / s) shifts the grid by up to half a step.",
        "",
    ]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Baselines on SmolLM2-135M: round-to-nearest, W8A8, LLM.int8()",
        "",
        f"Reference (fp32, dequantized from the shipped Q4_1 GGUF): perplexity {rows[0]['ref_ppl']:.3f} "
        f"on {rows[0]['eval_tokens']} held-out tokens of the Python manual.",
        "All 210 decoder linear layers quantized; the tied embedding/output head stays fp32.",
        "Bits per weight count the codes plus their constants: an fp16 scale per block and, for",
        "asymmetric grids, a zero point of `bits` bits (rtn); an fp32 scale per output row (int8).",
        "",
        "| method | settings | ppl | Δppl | KLD | top-1 agreement | bits/weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {recipe_label(r)} | {r['ppl']:.3f} | {100 * (r['ppl'] / r['ref_ppl'] - 1):+.2f}% | {r['kld']:.5f} "
            f"| {r['top1_agreement']:.2%} | {r['bits_per_weight']:.4f} |"
        )
    lines += ["", *q4_1_note(rows)]
    lines += ["", f"Command: `{meta['command']}`; machine: {meta['machine']['cpu']}, "
              f"{meta['machine']['threads']} threads, Python {meta['machine']['python']}, torch "
              f"{meta['machine']['torch']}; {meta['date']}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    rows = []
    for method, options in CONFIGS:
        row = evaluate_recipe(method, options, progress=sys.stderr.isatty())
        print(json.dumps(row), flush=True)  # seconds are only meaningful on an idle machine
        rows.append(row)
    meta = {
        "command": "python benchmarks/baselines.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "fast_mode": fast_mode(),
    }
    stem = "baselines.fast" if fast_mode() else "baselines"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(rows, meta))
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
