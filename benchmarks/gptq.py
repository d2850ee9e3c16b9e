"""Lesson 04's comparison on SmolLM2-135M: GPTQ against round-to-nearest on the same grids.

For each grid (int4 g64, int3 g64, int4 per channel; asymmetric, as in the GPTQ paper) three
rows: RTN, GPTQ, and GPTQ with act-order, all through `quantcourse.recipes.evaluate_recipe`
(the held-out windows and metrics of benchmarks/baselines.py). GPTQ calibrates on 128 windows
of 512 tokens from the calibration split. Each row records the time to quantize the whole model
(wall and CPU) and the machine's load average around it; "gap closed" is the share of RTN's
perplexity increase that GPTQ removes, (ppl_RTN - ppl_GPTQ) / (ppl_RTN - ppl_reference).

Usage:  python benchmarks/gptq.py     (writes benchmarks/results/gptq.{json,md})
        python benchmarks/gptq.py --resume LOG   (reuses the rows an interrupted run printed to LOG)
With QUANTCOURSE_FAST=1 it uses fewer evaluation and calibration windows and the int3 g64 grid
only, and writes gptq.fast.* instead, never the published files.
"""

import json
import os
import sys
import time
from pathlib import Path

from baselines import machine

from quantcourse.cli import recipe_label
from quantcourse.recipes import RecipeOptions, evaluate_recipe
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = [
    RecipeOptions(bits=4, group_size=64, symmetric=False),
    RecipeOptions(bits=3, group_size=64, symmetric=False),
    RecipeOptions(bits=4, symmetric=False),  # per output channel
]
FAST_GRIDS = GRIDS[1:2]  # int3 g64
SETTINGS = ("bits", "group_size", "symmetric", "granularity", "zero_point")


def run(method: str, options: RecipeOptions, done: list[dict] = ()) -> dict:
    """One evaluated row, with the 1-minute load average before and after it.

    A row of `done` (printed by an earlier, interrupted run in the same mode) with the same method
    and settings is returned instead of evaluating again.
    """
    wanted = (method, options.bits, options.group_size, options.symmetric, options.act_order, fast_mode())
    for row in done:
        if (row["method"], row["bits"], row["group_size"], row["symmetric"], row.get("act_order", False), row["fast_mode"]) == wanted:
            print(json.dumps(row), flush=True)
            return row
    load_before = os.getloadavg()[0]
    row = evaluate_recipe(method, options, progress=sys.stderr.isatty())
    row["load_before"], row["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    return row


def gap_closed(gptq: dict, rtn: dict) -> float:
    """The share of RTN's perplexity increase over the reference that GPTQ removes."""
    return (rtn["ppl"] - gptq["ppl"]) / (rtn["ppl"] - rtn["ref_ppl"])


def baselines_path() -> Path:
    """benchmarks/baselines.py's results for the same evaluation windows (fast mode: its fast file)."""
    return RESULTS / ("baselines.fast.json" if fast_mode() else "baselines.json")


def baseline_rows() -> list[dict]:
    path = baselines_path()
    return json.loads(path.read_text())["rows"] if path.exists() else []


def same_settings(a: dict, b: dict) -> bool:
    return a["method"] == b["method"] and all(a.get(k) == b.get(k) for k in SETTINGS)


def markdown(rows: list[dict], meta: dict) -> str:
    ref = rows[0]
    lines = [
        "# GPTQ against round-to-nearest on SmolLM2-135M",
        "",
        (
            f"Reference (fp32, dequantized from the shipped Q4_1 GGUF): perplexity {ref['ref_ppl']:.3f} on "
            f"{ref['eval_tokens']} held-out tokens of the Python manual (the windows of baselines.md)."
        ),
        (
            f"GPTQ: {meta['calibration_windows']} calibration windows of 512 tokens, damping 0.01, blocks of 128, "
            "true-sequential, layer by layer with quantized inputs. Asymmetric grids with integer zero points."
        ),
        (
            "Bits per weight: codes, an fp16 scale and a `bits`-bit zero point per group, and for act-order "
            "an int32 g_idx entry per input (GPTQ's checkpoint layout)."
        ),
        "",
        "| method | settings | ppl | Δppl | KLD | top-1 | bits/weight | gap closed | quantize s (wall) | CPU s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        closed = f"{r['gap_closed']:.0%}" if "gap_closed" in r else ""
        lines.append(
            f"| {r['method']} | {recipe_label(r)} | {r['ppl']:.3f} | {100 * (r['ppl'] / r['ref_ppl'] - 1):+.2f}% "
            f"| {r['kld']:.4f} | {r['top1_agreement']:.2%} | {r['bits_per_weight']:.4f} | {closed} "
            f"| {r['quantize_seconds']:.1f} | {r['quantize_cpu_seconds']:.1f} | {r['load_before']:.1f} → {r['load_after']:.1f} |"
        )
    checked = [r for r in rows if "baseline_ppl" in r]
    if checked:
        worst = max(abs(r["ppl"] - r["baseline_ppl"]) for r in checked)
        agreement = "exactly" if worst == 0 else f"to {worst:.2g} in perplexity"
        lines += ["", f"The {len(checked)} RTN rows that {baselines_path().name} also holds agree with it {agreement}."]
    gptq = [r for r in rows if r["method"] == "gptq"]
    calm = min(gptq, key=lambda r: max(r["load_before"], r["load_after"]))
    lines += [
        "",
        (
            f"Time to quantize the whole model with GPTQ: {min(r['quantize_seconds'] for r in gptq):.0f} to "
            f"{max(r['quantize_seconds'] for r in gptq):.0f} s wall time on a machine shared with other jobs (load "
            "average in the last column: above 2, the 2 cores were oversubscribed). The least loaded run, "
            f"{recipe_label(calm)}, took {calm['quantize_seconds']:.0f} s at load {calm['load_before']:.1f} → "
            f"{calm['load_after']:.1f}. CPU seconds count both threads, spin-waiting included, so contention inflates them too."
        ),
        "",
        (
            "The reference weights are themselves Q4_1 blocks of 32 (an fp16 scale and minimum each). The grids "
            "here (groups of 64, whole rows) do not line up with those blocks, so neither RTN nor GPTQ is "
            "flattered by that artifact; int4 g32 rows would be (see baselines.md)."
        ),
        "",
        (
            f"Command: `{meta['command']}`; machine: {meta['machine']['cpu']}, {meta['machine']['threads']} threads, "
            f"Python {meta['machine']['python']}, torch {meta['machine']['torch']}; {meta['date']}."
        ),
        "",
    ]
    return "\n".join(lines)


def printed_rows(argv: list[str]) -> list[dict]:
    """The JSON rows of `--resume LOG` (an earlier run's standard output), else none."""
    if not argv:
        return []
    if len(argv) != 2 or argv[0] != "--resume":
        sys.exit("usage: python benchmarks/gptq.py [--resume LOG]  (LOG: the output of an interrupted run)")
    lines = Path(argv[1]).read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"method"')]


def main() -> None:
    baselines = baseline_rows()
    done = printed_rows(sys.argv[1:])
    rows = []
    for grid in FAST_GRIDS if fast_mode() else GRIDS:
        rtn = run("rtn", grid, done)
        match = next((b for b in baselines if same_settings(b, rtn)), None)
        if match is not None:
            rtn["baseline_ppl"] = match["ppl"]
        rows.append(rtn)
        for act_order in (False, True):
            row = run("gptq", RecipeOptions(**{k: getattr(grid, k) for k in ("bits", "group_size", "symmetric")}, act_order=act_order), done)
            row["gap_closed"] = gap_closed(row, rtn)
            rows.append(row)
    gptq = next(r for r in rows if r["method"] == "gptq")
    meta = {
        "command": "python benchmarks/gptq.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "fast_mode": fast_mode(),
        "calibration_windows": gptq["calibration_samples"],
    }
    stem = "gptq.fast" if fast_mode() else "gptq"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(rows, meta))
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
