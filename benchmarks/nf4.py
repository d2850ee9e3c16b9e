"""Lesson 03's comparison: INT4 absmax, FP4, NF4 and NF4 + double quantization, blocks of 64 and 128.

Two measurements:
- weight error on all-MiniLM-L6-v2, whose fp32 weights were never quantized: mean squared error
  of every linear weight, pooled, per format and block size;
- model quality on SmolLM2-135M (perplexity, KL divergence, top-1 agreement against the fp32
  reference, bits per weight) through `quantcourse.recipes.evaluate_recipe`.

Usage:  python benchmarks/nf4.py     (writes benchmarks/results/nf4.{json,md})
With QUANTCOURSE_FAST=1 it uses MiniLM's first encoder layer, SmolLM2 at block 64 only and fewer
tokens, and writes nf4.fast.* instead, never the published files.
"""

import json
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch
from baselines import machine
from torch import nn

from quantcourse.models import load_minilm
from quantcourse.recipes import RecipeOptions, evaluate_recipe
from quantcourse.reference_impl.nf4 import Linear4bit
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = [  # (label, method, double quantization)
    ("INT4 absmax", "int4_absmax", False),
    ("FP4", "fp4", False),
    ("NF4", "nf4", False),
    ("NF4 + double quant", "nf4", True),
]
BLOCKS = (64, 128)


def minilm_linears(fast: bool) -> dict[str, nn.Linear]:
    """Every nn.Linear of MiniLM by name (in fast mode only those of encoder layer 0)."""
    model, _ = load_minilm()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {n: m for n, m in linears.items() if n.startswith("encoder.layer.0.")} if fast else linears


def excess_kurtosis(w: torch.Tensor) -> float:
    """E[(w - mean)^4] / var^2 - 3: 0 for a normal distribution, > 0 for heavier tails."""
    w = w.double().flatten()
    centred = w - w.mean()
    return (centred.pow(4).mean() / centred.pow(2).mean().pow(2) - 3).item()


def weight_errors(linears: dict[str, nn.Linear]) -> tuple[list[dict], dict]:
    """One row per (format, block): pooled MSE and SQNR over all weights, and per layer MSE."""
    rows, per_layer = [], {}
    signal = sum(m.weight.double().pow(2).sum().item() for m in linears.values())
    count = sum(m.weight.numel() for m in linears.values())
    for block in BLOCKS:
        for label, method, double_quant in FORMATS:
            squared_error, bits, layer_mse = 0.0, 0, []
            for linear in linears.values():
                q = Linear4bit.from_linear(linear, method, block, double_quant)
                error = (linear.weight.double() - q.weight.double()).pow(2)
                squared_error += error.sum().item()
                layer_mse.append(error.mean().item())
                bits += q.storage_bits()
            per_layer[(label, block)] = layer_mse
            rows.append({
                "format": label, "method": method, "block": block, "double_quant": double_quant,
                "mse": squared_error / count, "sqnr_db": 10 * torch.log10(torch.tensor(signal / squared_error)).item(),
                "bits_per_weight": bits / count,
            })  # fmt: skip
    for row in rows:
        nf4 = next(r for r in rows if r["format"] == "NF4" and r["block"] == row["block"])
        row["mse_vs_nf4"] = row["mse"] / nf4["mse"]
    return rows, per_layer


def order_sentence(rows: list[dict], per_layer: dict, block: int, layers: int) -> str:
    """The MSE ranking of the three code books at one block size, and how many layers share it."""
    labels = ["INT4 absmax", "FP4", "NF4"]
    ranked = sorted(
        labels, key=lambda label: next(r["mse"] for r in rows if r["format"] == label and r["block"] == block)
    )
    agree = sum(
        all(per_layer[(a, block)][i] < per_layer[(b, block)][i] for a, b in pairwise(ranked)) for i in range(layers)
    )
    return f"block {block}: {' < '.join(ranked)} in pooled MSE; {agree} of {layers} layers rank the same way."


def smollm2_rows() -> list[dict]:
    rows = []
    for block in BLOCKS[:1] if fast_mode() else BLOCKS:
        for label, method, double_quant in FORMATS:
            row = evaluate_recipe(
                method, RecipeOptions(group_size=block, double_quant=double_quant), progress=sys.stderr.isatty()
            )
            row["format"] = label
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(minilm: list[dict], sentences: list[str], kurtosis: dict, smollm2: list[dict], meta: dict) -> str:
    lines = [
        "# NF4, FP4 and INT4 absmax (lesson 03)",
        "",
        "Every format: blocks of `block` consecutive weights of the flattened tensor, one absmax per",
        "block (fp32, or 8-bit with double quantization), 4-bit codes. INT4 absmax is the evenly spaced",
        "grid k/7; FP4 and NF4 are bitsandbytes' code books (reference_impl/nf4.py, byte-identical to",
        "bitsandbytes 0.50.2). Bits per weight count the packed codes and the statistics actually stored.",
        "",
        f"## Weight error on all-MiniLM-L6-v2 ({meta['minilm_layers']} linear weights, "
        f"{meta['minilm_weights']:,} values, fp32, never quantized)",
        "",
        f"Excess kurtosis of the weights (0 for a normal distribution): median {kurtosis['median']:.2f}, "
        f"range {kurtosis['min']:.2f} to {kurtosis['max']:.2f} over the layers.",
        "",
        "| format | block | MSE | MSE / NF4's | SQNR (dB) | bits/weight |",
        "|---|---|---|---|---|---|",
    ]
    for r in minilm:
        lines.append(
            f"| {r['format']} | {r['block']} | {r['mse']:.4e} | {r['mse_vs_nf4']:.3f} | {r['sqnr_db']:.2f} | {r['bits_per_weight']:.4f} |"
        )
    lines += ["", *(f"- {s}" for s in sentences), ""]
    ref = smollm2[0]
    lines += [
        "## SmolLM2-135M: all 210 decoder linear layers",
        "",
        f"Reference (fp32, dequantized from the shipped Q4_1 GGUF): perplexity {ref['ref_ppl']:.3f} on "
        f"{ref['eval_tokens']} held-out tokens of the Python manual. The reference weights are themselves",
        "4-bit (Q4_1, asymmetric blocks of 32), so every format here re-quantizes a 16-level grid: MiniLM's",
        "fp32 weights are the cleaner test of how well a code book fits the weight distribution.",
        "",
        "| format | block | ppl | Δppl | KLD | top-1 agreement | bits/weight | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in smollm2:
        lines.append(
            f"| {r['format']} | {r['group_size']} | {r['ppl']:.3f} | {100 * (r['ppl'] / r['ref_ppl'] - 1):+.2f}% | "
            f"{r['kld']:.5f} | {r['top1_agreement']:.2%} | {r['bits_per_weight']:.4f} | {r['seconds']:.1f} |"
        )
    lines.append("")
    for block in sorted({r["group_size"] for r in smollm2}):
        ranked = sorted(
            (r for r in smollm2 if r["group_size"] == block and not r["double_quant"]), key=lambda r: r["kld"]
        )
        lines.append(f"- block {block}: {' < '.join(r['format'] for r in ranked)} in KL divergence.")
    lines += [
        "",
        f"Command: `{meta['command']}`; machine: {meta['machine']['cpu']}, {meta['machine']['threads']} threads, "
        f"Python {meta['machine']['python']}, torch {meta['machine']['torch']}; {meta['date']}; "
        f"total {meta['total_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    linears = minilm_linears(fast_mode())
    kurt = sorted(excess_kurtosis(m.weight) for m in linears.values())
    kurtosis = {"median": kurt[len(kurt) // 2], "min": kurt[0], "max": kurt[-1]}
    minilm, per_layer = weight_errors(linears)
    sentences = [order_sentence(minilm, per_layer, block, len(linears)) for block in BLOCKS]
    for s in sentences:
        print(s, flush=True)
    smollm2 = smollm2_rows()
    meta = {
        "command": "python benchmarks/nf4.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "fast_mode": fast_mode(),
        "minilm_layers": len(linears),
        "minilm_weights": sum(m.weight.numel() for m in linears.values()),
        "total_seconds": time.perf_counter() - started,
    }
    stem = "nf4.fast" if fast_mode() else "nf4"
    RESULTS.mkdir(exist_ok=True)
    data = {"meta": meta, "minilm": minilm, "minilm_order": sentences, "minilm_kurtosis": kurtosis, "smollm2": smollm2}
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(minilm, sentences, kurtosis, smollm2, meta))
    print(f"wrote {RESULTS / stem}.json and .md in {meta['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
