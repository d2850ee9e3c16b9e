"""Lesson 09's results: llama.cpp's GGUF file types on SmolLM2-135M, requantized from the shipped file.

The shipped GGUF holds every linear weight as Q4_1 and the (tied) embedding as Q8_0; decoded, it
is the course's fp32 reference model. Each row requantizes it with
`reference_impl.gguf_file.requantize_file` (llama-quantize's recipes, our encoders), loads the
written file with transformers' own GGUF loader and scores it against the reference on the
held-out windows of benchmarks/baselines.py: perplexity, KL divergence, top-1 agreement. Storage
is counted from the file: bits per weight over all tensors (llama.cpp's figure) and over the
linear layers, and the file size.

Three more measurements:
- ffn_down only: one block type for the 30 ffn_down weights, every other tensor as shipped
  (`--tensor-type ffn_down=T` on a Q4_1 file). Their rows are 1536 wide, so every type fits, and
  the types compete at their own bits per weight.
- Weight error on all-MiniLM-L6-v2's FFN output weights (fp32, never quantized; 1536-wide rows):
  mean squared error per block type, and for the K-quants with the scale search turned off.
- Re-encoding the shipped blocks: decode each Q4_1 and Q8_0 tensor and encode it again.

Usage:  python benchmarks/gguf_types.py     (writes benchmarks/results/gguf.{json,md})
(The script is not called gguf.py: in this folder that name would shadow the gguf package that
transformers imports.)
With QUANTCOURSE_FAST=1 it evaluates fewer types on fewer tokens and MiniLM's first layer only,
and writes gguf.fast.* instead, never the published files.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from baselines import machine

from quantcourse.evaluate import compare_to_reference, reference_logprobs
from quantcourse.models import load_minilm, load_reference_model, smollm2_gguf_path
from quantcourse.recipes import eval_windows
from quantcourse.reference_impl import gguf as blocks
from quantcourse.reference_impl.gguf_file import (
    GGUFFile, bits_per_weight, is_linear_weight, load_with_transformers, read_gguf, reencode_identical,
    requantize_file, type_counts,
)  # fmt: skip
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
FILE_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0"]
FAST_FILE_TYPES = ["Q8_0", "Q4_K_M", "Q4_0"]
FFN_DOWN_TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0"]
FAST_FFN_DOWN_TYPES = ["Q4_K", "Q4_0"]
LLAMA_CPP_LLAMA3_8B = {"Q8_0": 0.003, "Q4_K_M": 0.175, "Q4_0": 0.469}  # published Δppl (f16: 6.2332)


def weight_error(src: GGUFFile, out: GGUFFile) -> float:
    """Relative error ||W_new - W_ref|| / ||W_ref|| over all linear weights (unchanged ones add 0)."""
    noise = signal = 0.0
    for name, info in src.tensors.items():
        if not is_linear_weight(name, info.shape):
            continue
        ref = src.values(name).astype(np.float64)
        signal += float((ref**2).sum())
        if out.tensors[name].qtype != info.qtype:
            noise += float(((out.values(name) - ref) ** 2).sum())
    return (noise / signal) ** 0.5


def evaluate_file(label: str, path: Path, src: GGUFFile, reference, config) -> dict:
    """Load a GGUF file with transformers and score it; storage and weight error from the file."""
    file = read_gguf(path)
    started = time.perf_counter()
    model = load_with_transformers(path, config=config)
    load_seconds = time.perf_counter() - started
    scores = compare_to_reference(model, reference, progress=sys.stderr.isatty())
    del model
    return {
        "label": label,
        "types": type_counts(file),
        "bits_per_weight": bits_per_weight(file),
        "linear_bits_per_weight": bits_per_weight(file, linear_only=True),
        "file_bytes": path.stat().st_size,
        "weight_rel_error": weight_error(src, file),
        "ppl": scores.ppl,
        "ref_ppl": scores.ref_ppl,
        "kld": scores.kld,
        "top1_agreement": scores.top1_agreement,
        "eval_tokens": scores.eval_tokens,
        "load_seconds": round(load_seconds, 1),
    }


def requantized_row(label: str, ftype: str, overrides: list, src: GGUFFile, reference, config, folder: Path) -> dict:
    path = folder / f"{label}.gguf"
    started = time.perf_counter()
    requantize_file(src.path, path, ftype, overrides=overrides)
    quantize_seconds = time.perf_counter() - started
    row = {"file_type": ftype, "overrides": overrides, **evaluate_file(label, path, src, reference, config)}
    row["quantize_seconds"] = round(quantize_seconds, 1)
    path.unlink()
    print(json.dumps(row), flush=True)
    return row


def minilm_errors(fast: bool) -> list[dict]:
    """MSE per block type on MiniLM's FFN output weights [384, 1536] (layer 0 only in fast mode)."""
    model, _ = load_minilm()
    layers = model.encoder.layer[:1] if fast else model.encoder.layer
    w = np.concatenate([layer.output.dense.weight.detach().numpy() for layer in layers])
    rows = []
    for qtype in blocks.QUANTIZED_TYPES:
        for search in (True, False) if qtype in blocks.K_QUANTS else (True,):
            rows.append({
                "type": qtype, "search": search, "bits_per_weight": blocks.BLOCK_TYPES[qtype].bits_per_weight,
                "mse": blocks.quantization_mse(w, qtype, search), "weights": int(w.size),
            })  # fmt: skip
    signal = float((w.astype(np.float64) ** 2).mean())
    for row in rows:
        row["sqnr_db"] = 10 * np.log10(signal / row["mse"])
    return rows


def describe_types(types: dict) -> str:
    return ", ".join(f"{n} {t}" for t, n in sorted(types.items(), key=lambda kv: -kv[1]) if t != "F32")


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| file | tensor types (besides 61 F32 norms) | bits/weight (all) | bits/weight (linear) | size MB | ppl | Δppl | KLD | top-1 | weight rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {describe_types(r['types'])} | {r['bits_per_weight']:.3f} | {r['linear_bits_per_weight']:.3f} "
            f"| {r['file_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | {100 * (r['ppl'] / r['ref_ppl'] - 1):+.2f}% "
            f"| {r['kld']:.5f} | {r['top1_agreement']:.2%} | {r['weight_rel_error']:.4f} |"
        )
    return lines


def markdown(data: dict) -> str:
    meta, shipped = data["meta"], data["shipped"]
    reencode = data["reencode"]
    q4_k_m = next((r for r in data["file_types"] if r["label"] == "Q4_K_M"), None)
    lines = [
        "# GGUF file types on SmolLM2-135M",
        "",
        (
            f"Reference: the shipped {meta['source']} (linear weights Q4_1, embedding Q8_0), decoded to fp32; perplexity "
            f"{shipped['ref_ppl']:.3f} on {shipped['eval_tokens']} held-out tokens of the Python manual (the windows of "
            "baselines.md). Every other file is requantized from it with our encoders and llama.cpp's recipes "
            "(reference_impl/gguf_file.py), written to disk, and loaded back with transformers' GGUF loader."
        ),
        "",
        *table([shipped, *data["file_types"]]),
        "",
        (
            f"The shipped file, loaded the same way, scores the reference perplexity{' exactly' if shipped['ppl'] == shipped['ref_ppl'] else ''}; "
            f"its KLD {shipped['kld']:.1e} and top-1 {shipped['top1_agreement']:.2%} are the floor of the measurement, "
            "set by keeping the reference log-probabilities in fp16 (evaluate.py), which rounds some near-ties."
        ),
        "",
        (
            "SmolLM2's hidden size is 576 = 2.25 x 256, so K-quant super-blocks of 256 do not tile the rows of q, k, v, o, "
            "gate, up or the embedding. llama.cpp then falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and only "
            "the 30 ffn_down weights (1536-wide rows) get K-quants. A \"Q4_K\" file of this model is mostly Q5_0"
            + (f" ({describe_types(q4_k_m['types'])} for Q4_K_M)" if q4_k_m else "")
            + ", so its bits per weight are not those of Q4_0 and the full-file rows do not compare Q4_K with Q4_0 "
            "at equal size. The next table does."
        ),
        "",
        "## One type for ffn_down, everything else as shipped",
        "",
        *table(data["ffn_down"]),
        "",
        (
            "Caution: the reference weights are Q4_1 blocks of 32 (fp16 scale and minimum). Q4_K's sub-blocks are "
            "also 32 weights with a scale and a minimum, aligned with those blocks, so Q4_K can land close to the "
            "shipped grid (not on it: its scales and minimums are rounded to 6 bits, and its minimum is never above "
            "zero). That flatters Q4_K against the symmetric Q4_0 here. The MiniLM table below has no such artifact."
        ),
        "",
        "## Weight error on all-MiniLM-L6-v2 (fp32 weights never quantized)",
        "",
        f"FFN output weights, {data['minilm'][0]['weights']:,} values with 1536-wide rows.",
        "",
        "| type | scale search | bits/weight | MSE | SQNR dB |",
        "|---|---|---|---|---|",
        *[
            f"| {r['type']} | {'yes' if r['search'] else 'no (round to nearest)'} | {r['bits_per_weight']:.4f} "
            f"| {r['mse']:.3e} | {r['sqnr_db']:.2f} |"
            for r in data["minilm"]
        ],
        "",
        "## Re-encoding the shipped blocks",
        "",
        *[
            f"- {qtype}: {same:,} of {total:,} blocks ({same / total:.4%}) come back byte for byte after decode and encode."
            for qtype, (same, total) in reencode.items()
        ],
        "",
        (
            "Each stored Q4_1 block holds code 0 (its minimum) and code 15 (its maximum), because the encoder puts them "
            "there. Decoding gives back the minimum m exactly and the maximum 15 d + m up to a float32 rounding, so the "
            "encoder finds the same m, a range that moves d far less than half an fp16 step, and the same codes. A Q8_0 "
            "block holds +-127 d for its largest magnitude in the same way."
        ),
        "",
        (
            "llama.cpp's published figures for Llama-3-8B (f16 perplexity 6.2332), for scale: "
            + ", ".join(f"{k} {v:+.3f}" for k, v in LLAMA_CPP_LLAMA3_8B.items())
            + " in perplexity. There the rows are 4096 wide and every tensor gets its K-quant."
        ),
        "",
        (
            f"Command: `{meta['command']}`; machine: {meta['machine']['cpu']}, {meta['machine']['threads']} threads, "
            f"Python {meta['machine']['python']}, torch {meta['machine']['torch']}, gguf {meta['gguf']}, "
            f"transformers {meta['transformers']}; {meta['date']}."
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    from importlib.metadata import version

    fast = fast_mode()
    source = smollm2_gguf_path()
    src = read_gguf(source)
    model, tokenizer = load_reference_model()
    reference = reference_logprobs(model, eval_windows(tokenizer), progress=sys.stderr.isatty())
    config = model.config
    del model
    data = {"shipped": evaluate_file("shipped Q4_1", source, src, reference, config)}
    print(json.dumps(data["shipped"]), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        data["file_types"] = [
            requantized_row(ftype, ftype, [], src, reference, config, Path(folder))
            for ftype in (FAST_FILE_TYPES if fast else FILE_TYPES)
        ]
        data["ffn_down"] = [
            requantized_row(f"ffn_down {qtype}", "Q4_1", [("ffn_down", qtype)], src, reference, config, Path(folder))
            for qtype in (FAST_FFN_DOWN_TYPES if fast else FFN_DOWN_TYPES)
        ]
    data["minilm"] = minilm_errors(fast)
    data["reencode"] = reencode_identical(src)
    data["meta"] = {
        "command": "python benchmarks/gguf_types.py",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "fast_mode": fast,
        "source": source.name,
        "gguf": version("gguf"),
        "transformers": version("transformers"),
        "torch_threads": torch.get_num_threads(),
    }
    stem = "gguf.fast" if fast else "gguf"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(data))
    print(f"wrote {RESULTS / stem}.json and .md")


if __name__ == "__main__":
    main()
