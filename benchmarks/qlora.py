"""Lesson 07's QLoRA run: LoRA adapters fine-tuned on a frozen NF4 SmolLM2-135M, on CPU.

The domain is the "Built-in Types" chapter of the Library Reference (qlora.DOMAIN_TOPICS): its
first 80% trains the adapters, its last 20% is the domain's held-out text. The general held-out
split of the course corpus (corpus.py) shows whether the adaptation hurt elsewhere. Perplexity and
generations come from the dequantized copy of the model (qlora.dequantized_model), which computes
exactly what the 4-bit model computes without dequantizing every weight on every call.

Memory: one real training step on the same batch for each way of fine-tuning, every term counted
from the tensors involved (qlora.measure_training_step), beside the analytic plan for the same
model (qlora.memory_plan) and the plan for 7B-70B models.

Usage:  python benchmarks/qlora.py     (writes benchmarks/results/qlora.{json,md}, ~10 min on 2 cores)
With QUANTCOURSE_FAST=1 it keeps the first two decoder blocks, shorter windows and three steps,
and writes qlora.fast.* instead, never the published files.
"""

import copy
import json
import time
from pathlib import Path

import torch
from baselines import machine

from quantcourse.corpus import token_windows
from quantcourse.models import load_reference_model
from quantcourse.reference_impl import qlora
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {  # the published run
    "length": 256, "batch_size": 2, "grad_accum": 1, "steps": 24, "lr": 2e-3, "r": 16, "alpha": 32,
    "dropout": 0.05, "seed": 0, "domain_eval_windows": None, "general_eval_windows": 6, "new_tokens": 32, "layers": None,
}  # fmt: skip
# domain_eval_windows None: every held-out window of the domain.
FAST_SETTINGS = SETTINGS | {"length": 64, "steps": 3, "domain_eval_windows": 2, "general_eval_windows": 2, "new_tokens": 8, "layers": 2}
# Methods of built-in types whose documentation is not in the corpus at all: the model has to
# carry the domain's style over to them.
PROMPTS = ["set.isdisjoint(other)\n\n   ", "int.bit_length()\n\n   ", "bytes.hex([sep[, bytes_per_sep]])\n\n   "]
GiB = 2**30
NO_DROPOUT = "QLoRA, NF4 base, bf16 compute, no adapter dropout"


def evaluate(model, tokenizer, domain, general, new_tokens: int) -> dict:
    """Perplexities on the domain's and the corpus' held-out windows, and greedy continuations."""
    plain = qlora.dequantized_model(model)
    return {
        "domain_ppl": qlora.perplexity(plain, domain),
        "general_ppl": qlora.perplexity(plain, general),
        "generations": [qlora.greedy_continuation(plain, tokenizer, prompt, new_tokens) for prompt in PROMPTS],
    }


def measured_row(label: str, model, ids, plan: qlora.MemoryAccount | None) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    account = qlora.measure_training_step(model, ids, optimizer)
    return {"setup": label, "measured": account.as_dict(), "plan": None if plan is None else plan.as_dict()}


def memory_rows(reference, trained, ids, s: dict) -> list[dict]:
    """One real step on the same batch for each way of fine-tuning, with the plan beside it."""
    shape = qlora.LlamaShape.from_config(reference.config)
    lora = dict(r=s["r"], alpha=s["alpha"], dropout=s["dropout"])
    rows = [measured_row("full fine-tuning, fp32, AdamW", copy.deepcopy(reference).requires_grad_(True), ids,
                         qlora.memory_plan(shape, "full", weight_bytes=4))]  # fmt: skip
    rows.append(measured_row("full fine-tuning, bf16, AdamW", copy.deepcopy(reference).to(torch.bfloat16).requires_grad_(True), ids,
                             qlora.memory_plan(shape, "full", weight_bytes=2)))  # fmt: skip
    model = copy.deepcopy(reference).to(torch.bfloat16)
    qlora.add_lora(model, quantize=False, **lora)
    rows.append(measured_row("LoRA, bf16 base", model, ids, qlora.memory_plan(shape, "lora", r=s["r"], weight_bytes=2)))
    model = copy.deepcopy(reference).to(torch.bfloat16)
    qlora.add_lora(model, compute_dtype=torch.bfloat16, **lora)
    rows.append(measured_row("QLoRA, NF4 base, bf16 compute", model, ids, qlora.memory_plan(shape, "qlora", r=s["r"], weight_bytes=2)))
    for layer in qlora.lora_modules(model).values():  # dropout keeps a copy of every adapted layer's input
        layer.dropout = torch.nn.Identity()
    rows.append(measured_row(NO_DROPOUT, model, ids, qlora.memory_plan(shape, "qlora", r=s["r"], weight_bytes=2)))
    rows.append(measured_row("QLoRA, NF4 base, fp32 compute (this run)", trained, ids, qlora.memory_plan(shape, "qlora", r=s["r"], weight_bytes=4)))
    return rows


def large_model_rows(r: int) -> list[dict]:
    """The analytic plan for published model sizes, 16-bit weights, fp32 adapters and Adam states."""
    setups = [
        ("QLoRA (NF4 + double quant)", dict(method="qlora", r=r)),
        ("LoRA, bf16 base", dict(method="lora", r=r)),
        ("full fine-tuning, bf16 + fp32 Adam and master weights", dict(method="full", state_bytes=4, master_weights=True)),
    ]
    rows = []
    for name in ("Llama-2-7B", "Llama-3-8B", "Llama-2-70B"):
        shape = qlora.MODEL_SHAPES[name]
        for label, kwargs in setups:
            plan = qlora.memory_plan(shape, weight_bytes=2, **kwargs)
            rows.append({"model": name, "parameters": shape.parameters(), "setup": label, "plan": plan.as_dict()})
    return rows


def gib(n: int | None) -> str:
    return "" if n is None else f"{n / GiB:.3f}"


def markdown(result: dict) -> str:
    s, m = result["settings"], result["meta"]
    before, after = result["before"], result["after"]
    lines = [
        "# QLoRA on SmolLM2-135M: adapters on a frozen NF4 base, fine-tuned on CPU",
        "",
        f"Domain: {', '.join(result['domain_topics'])} (the Library Reference's Built-in Types chapter); "
        f"{result['train_windows']} training windows of {s['length']} tokens, {result['domain_eval_windows']} held-out "
        f"domain windows, {s['general_eval_windows']} windows of the corpus' general held-out split.",
        f"Adapters: r={s['r']}, alpha={s['alpha']}, dropout={s['dropout']} on {', '.join(qlora.LLAMA_LINEARS)} of every "
        f"block ({result['adapter_parameters']:,} parameters); base: every decoder linear in NF4 with double "
        f"quantization ({result['base_bits_per_weight']:.4f} bits per weight), compute in fp32.",
        f"Training: {s['steps']} steps of {s['batch_size']} x {s['grad_accum']} windows ({result['tokens']:,} tokens), "
        f"AdamW lr {s['lr']}, constant, no weight decay, gradients clipped at 0.3, seed {s['seed']}: "
        f"{result['train_minutes']:.1f} min; whole script {result['total_minutes']:.1f} min.",
        "",
        "| perplexity | before | after | change |",
        "|---|---|---|---|",
        f"| domain held-out | {before['domain_ppl']:.3f} | {after['domain_ppl']:.3f} | {100 * (after['domain_ppl'] / before['domain_ppl'] - 1):+.1f}% |",
        f"| general held-out | {before['general_ppl']:.3f} | {after['general_ppl']:.3f} | {100 * (after['general_ppl'] / before['general_ppl'] - 1):+.1f}% |",
        "",
        "Training loss per step: " + ", ".join(f"{x:.3f}" for x in result["losses"]),
        "",
        "## Memory of one training step (GiB), measured on the same batch",
        "",
        f"Batch: {s['batch_size']} x {s['length']} tokens. Measured: the bytes of the actual tensors (parameters and "
        "buffers by storage, gradients after backward, optimizer states after the step, activations saved for backward); "
        "peak: the most bytes torch's allocator held during the step (temporaries included). Plan: qlora.memory_plan.",
        "",
        "| setup | frozen weights | trainable weights | gradients | optimizer states | activations | peak | plan: weights + grads + states |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["memory"]:
        me, plan = row["measured"], row["plan"]
        lines.append(
            f"| {row['setup']} | {gib(me['frozen_weights'])} | {gib(me['trainable_weights'])} | {gib(me['gradients'])} "
            f"| {gib(me['optimizer_states'])} | {gib(me['activations'])} | {gib(me['peak'])} | {gib(plan['total'])} |"
        )
    rows = {row["setup"]: row["measured"] for row in result["memory"]}
    with_dropout, without = rows["QLoRA, NF4 base, bf16 compute"], rows[NO_DROPOUT]
    full = rows["full fine-tuning, bf16, AdamW"]
    weights = {name: sum(row[k] for k in ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")) for name, row in (("full", full), ("qlora", with_dropout))}
    lines += [
        "",
        "The peak can be below weights + gradients + states + activations: backward frees the activations "
        "while it fills the gradients, and the optimizer states appear after that. Adapter dropout saves a dropped "
        f"copy of each adapted layer's input (and its mask): {gib(with_dropout['activations'])} GiB of activations "
        f"with it, {gib(without['activations'])} GiB without, in the same QLoRA step.",
        "",
        f"Weights, gradients and optimizer states: {gib(weights['full'])} GiB for full bf16 fine-tuning, "
        f"{gib(weights['qlora'])} GiB for QLoRA. Peaks on this batch: {gib(full['peak'])} and "
        f"{gib(with_dropout['peak'])} GiB: the QLoRA step's activations ({gib(with_dropout['activations'])} GiB) are "
        f"{with_dropout['activations'] / weights['full']:.0%} of what full fine-tuning keeps for its weights, gradients and states. Activations "
        "grow with batch and sequence length, weights with the model: the plan below has the weights' side for larger models.",
        "",
        "## Planned memory for larger models (GiB, before activations)",
        "",
        f"16-bit frozen weights, fp32 adapters (r={s['r']}, all seven linears) and fp32 Adam states. A 24 / 48 / 80 GB "
        "card holds 24 / 48 / 80 GiB; activations, temporaries and the framework's own memory come on top.",
        "",
        "| model | parameters | setup | weights | gradients | optimizer states | total | fits 24 / 48 / 80 GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["large_models"]:
        p = row["plan"]
        fits = " / ".join("yes" if p["total"] < gb * GiB else "no" for gb in (24, 48, 80))
        lines.append(
            f"| {row['model']} | {row['parameters'] / 1e9:.2f}B | {row['setup']} | {gib(p['frozen_weights'] + p['trainable_weights'])} "
            f"| {gib(p['gradients'])} | {gib(p['optimizer_states'])} | {gib(p['total'])} | {fits} |"
        )
    lines += ["", "## Greedy continuations (before -> after)", ""]
    for prompt, old, new in zip(PROMPTS, before["generations"], after["generations"]):
        lines += [f"Prompt `{prompt.strip()}`", "", f"- before: `{old!r}`", f"- after: `{new!r}`", ""]
    lines += [f"Command: `{m['command']}`; machine: {m['machine']['cpu']}, {m['machine']['threads']} threads, "
              f"Python {m['machine']['python']}, torch {m['machine']['torch']}; {m['date']}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    s = FAST_SETTINGS if fast_mode() else SETTINGS
    reference, tokenizer = load_reference_model()
    if s["layers"]:
        qlora.first_layers(reference, s["layers"])
    train, domain = qlora.domain_windows(tokenizer, s["length"])
    domain = domain[: s["domain_eval_windows"]]  # [:None] keeps them all
    general = token_windows(tokenizer, "heldout", s["length"], s["general_eval_windows"])

    model = copy.deepcopy(reference)
    torch.manual_seed(s["seed"])  # the adapters' initial A
    qlora.add_lora(model, r=s["r"], alpha=s["alpha"], dropout=s["dropout"])
    before = evaluate(model, tokenizer, domain, general, s["new_tokens"])
    print(json.dumps({"before": before}), flush=True)
    train_started = time.perf_counter()
    losses = qlora.train_adapters(
        model, train, s["steps"], s["batch_size"], s["grad_accum"], lr=s["lr"], seed=s["seed"],
        on_step=lambda step, loss: print(f"step {step + 1}/{s['steps']}: loss {loss:.4f}", flush=True),
    )  # fmt: skip
    train_minutes = (time.perf_counter() - train_started) / 60
    after = evaluate(model, tokenizer, domain, general, s["new_tokens"])
    print(json.dumps({"after": after}), flush=True)

    base = [m for m in model.modules() if isinstance(m, qlora.FrozenLinear4bit)]
    result = {
        "settings": s,
        "domain_topics": sorted(qlora.DOMAIN_TOPICS),
        "prompts": PROMPTS,
        "train_windows": train.shape[0],
        "domain_eval_windows": domain.shape[0],
        "tokens": s["steps"] * s["grad_accum"] * s["batch_size"] * s["length"],
        "adapter_parameters": sum(p.numel() for p in qlora.trainable_parameters(model)),
        "base_bits_per_weight": sum(b.storage_bits() for b in base) / sum(b.weight_count() for b in base),
        "before": before,
        "after": after,
        "losses": losses,
        "train_minutes": train_minutes,
        "memory": memory_rows(reference, model, train[: s["batch_size"]], s),
        "large_models": large_model_rows(s["r"]),
    }
    result["total_minutes"] = (time.perf_counter() - started) / 60
    result["meta"] = {"command": "python benchmarks/qlora.py", "date": time.strftime("%Y-%m-%d"), "machine": machine(), "fast_mode": fast_mode()}
    stem = "qlora.fast" if fast_mode() else "qlora"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(f"wrote {RESULTS / stem}.json and .md in {result['total_minutes']:.1f} min")


if __name__ == "__main__":
    main()
