"""QLoRA seen from outside the training loop: what a setup costs on a GPU card, and what one
adapter does in its first step.

qlora.py holds the method itself (the frozen NF4 base, the adapters, training, PEFT's format,
the measured and planned memory of a step). This module holds the measurements lesson 07 makes
with it:

- Memory plans side by side (`plan_setups`). Three ways to fine-tune the same model, each
  counted by qlora.memory_plan from the shapes alone:

      full fine-tuning  bf16 weights and gradients, fp32 master weights, fp32 Adam m and v:
                        2 + 2 + 4 + 8 = 16 bytes per parameter
      LoRA              frozen bf16 base (2 bytes per parameter), fp32 adapters with their
                        gradients and Adam states (16 bytes per adapter parameter)
      QLoRA             the same adapters on a base whose linear weights are NF4 with double
                        quantization (4.127 bits = 0.516 bytes each); embedding and norms bf16

  `smallest_card` says which of the usual 24 / 48 / 80 GB cards holds a plan. Activations are
  not planned (they depend on batch, sequence length, attention kernel and checkpointing); a
  plan that fits leaves the rest of the card for them.
- The first AdamW step of a fresh adapter (`first_step_change`). B starts at 0, so the first
  gradient reaches B only (dL/dA = s B^T dL/dy^T x is 0), and Adam's first update moves every
  entry of B by about the learning rate whatever the gradient's size. The layer's output then
  moves by s * x A^T (Delta B)^T, a sum over the r columns of A: without the scaling s = alpha / r
  it grows with r. Measured on a real layer with a real gradient, this shows why LoRA divides by r.
- One backward pass that records what chosen layers received and sent back (`trace_backward`),
  and the gradient norms of every adapter afterwards (`adapter_gradient_norms`).
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import qlora
from .qlora import LLAMA_LINEARS, LlamaShape, LoraLinear, MemoryAccount, memory_plan

GiB = 2**30

# Llama-2-13B's config.json; the other shapes are qlora.MODEL_SHAPES.
LLAMA_2_13B = LlamaShape(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, head_dim=128, vocab=32000, tied_embeddings=False)
SHAPES = {  # by size
    "SmolLM2-135M": qlora.MODEL_SHAPES["SmolLM2-135M"],
    "Llama-2-7B": qlora.MODEL_SHAPES["Llama-2-7B"],
    "Llama-3-8B": qlora.MODEL_SHAPES["Llama-3-8B"],
    "Llama-2-13B": LLAMA_2_13B,
    "Llama-2-70B": qlora.MODEL_SHAPES["Llama-2-70B"],
}

# memory_plan's settings for each setup; r, target_modules and the optimizer states' width come
# from plan_setups. 16-bit weights are bf16 (2 bytes), adapters fp32 (PEFT's default).
SETUPS = {
    "full fine-tuning": {"method": "full", "weight_bytes": 2, "master_weights": True},
    "LoRA": {"method": "lora", "weight_bytes": 2, "adapter_bytes": 4},
    "QLoRA": {"method": "qlora", "weight_bytes": 2, "adapter_bytes": 4, "blocksize": 64, "compress_statistics": True},
}
CARDS_GIB = (24, 48, 80)  # the usual GPU memory sizes: RTX 3090/4090, A6000/L40S, A100/H100


def plan_setups(shape: LlamaShape, r: int = 64, target_modules=LLAMA_LINEARS, state_bytes: int = 4) -> dict[str, MemoryAccount]:
    """The memory plan of each setup in SETUPS for one model, in bytes (activations not planned).

    r, target_modules: the adapters of LoRA and QLoRA (full fine-tuning ignores them).
    state_bytes: the width of each Adam state, 4 for 32-bit AdamW (QLoRA's paged_adamw_32bit),
    1 for an 8-bit optimizer (its per-block statistics not counted). Full fine-tuning keeps its
    fp32 master weights either way.
    """
    if state_bytes not in (1, 2, 4):
        raise ValueError(f"state_bytes is the width of one Adam state: 4 (32-bit), 2 or 1 (8-bit), got {state_bytes!r}")
    plans = {}
    for name, settings in SETUPS.items():
        adapters = {} if settings["method"] == "full" else {"r": r, "target_modules": target_modules}
        plans[name] = memory_plan(shape, state_bytes=state_bytes, **adapters, **settings)
    return plans


def smallest_card(total_bytes: float, cards_gib=CARDS_GIB) -> int | None:
    """The smallest card (GiB, from cards_gib) that holds total_bytes, or None if none does.

    A card sold as "80 GB" holds 80 GiB here; CUDA's context and the allocator's fragmentation
    take some of it, so a plan that only just fits does not fit in practice.
    """
    if total_bytes < 0:
        raise ValueError(f"total_bytes must be >= 0, got {total_bytes!r}")
    return next((card for card in sorted(cards_gib) if total_bytes <= card * GiB), None)


# ---------------------------------------------------------------- one backward pass, recorded


@dataclass
class BackwardTrace:
    """loss: the mean next-token loss; inputs[name]: what the layer received, [tokens, in];
    output_grads[name]: dL/dy it was sent back, [tokens, out]. float32, detached."""

    loss: float
    inputs: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]


def trace_backward(model: nn.Module, ids: torch.Tensor, names) -> BackwardTrace:
    """Forward and backward of the causal-LM loss on ids [batch, L], recording the input and the
    output gradient of each named module. The parameters' .grad are left in place (inspect them,
    then clear them: an optimizer step after this would include them)."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown or isinstance(names, str):
        raise ValueError(f"names must be a list of module names of this model, such as 'model.layers.0.self_attn.q_proj'; unknown: {unknown or names}")
    inputs, grads = {}, {}

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1, t.shape[-1]).float()

    def record(name: str):
        def hook(module, args, output):
            inputs[name] = flat(args[0])
            if output.requires_grad:  # dL/dy arrives here during backward
                output.register_hook(lambda grad: grads.__setitem__(name, flat(grad)))

        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in names]
    try:
        loss = qlora.causal_lm_loss(model, ids)
        if not loss.requires_grad:
            raise ValueError("the model has no trainable parameters, so no gradient flows: wrap it with qlora.add_lora first")
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in grads]
    if missing:
        raise ValueError(f"no gradient reached {missing}: neither they nor any layer before them has adapters (qlora.add_lora)")
    return BackwardTrace(loss.item(), inputs, grads)


def adapter_gradient_norms(model: nn.Module) -> dict[str, tuple[float, float]]:
    """(||dL/dA||, ||dL/dB||) of every adapter after a backward pass, by layer name (0.0 where
    no gradient arrived)."""
    norms = {}
    for name, layer in qlora.lora_modules(model).items():
        norms[name] = tuple(0.0 if p.grad is None else p.grad.norm().item() for p in (layer.lora_A, layer.lora_B))
    return norms


# ---------------------------------------------------------------- the first step and the scaling


def first_step_change(base_layer: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, r: int, scaling: float, lr: float = 1e-3, seed: int = 0) -> float:
    """||y_1 - y_0|| / ||y_0||: how far one AdamW step moves a fresh adapter's output.

    base_layer: the frozen layer (nn.Linear or qlora.FrozenLinear4bit, copied, not changed);
    x: [tokens, in] its input; grad_y: [tokens, out], the gradient dL/dy the step follows (the
    loss is sum(y * grad_y), so a real one from trace_backward reproduces the language-model
    loss's first step for this layer alone). The adapter starts as PEFT's (A kaiming-uniform
    drawn from `seed`, B = 0, no dropout) with rank r and output scaling `scaling` (alpha =
    scaling * r); AdamW with lr, no weight decay. y_0 is the base layer's output.
    """
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0:
        raise ValueError(f"scaling multiplies the adapter's output (alpha / r in LoRA) and must be > 0, got {scaling!r}")
    if x.dim() != 2 or grad_y.dim() != 2 or x.shape[0] != grad_y.shape[0]:
        raise ValueError(f"x must be [tokens, in] and grad_y [tokens, out] with the same tokens, got {tuple(x.shape)} and {tuple(grad_y.shape)}")
    with torch.random.fork_rng():  # A's draw leaves the caller's random state alone
        torch.manual_seed(seed)
        layer = LoraLinear(copy.deepcopy(base_layer), r=r, alpha=scaling * r, dropout=0.0)
    if grad_y.shape[1] != layer.out_features or x.shape[1] != layer.in_features:
        raise ValueError(f"the layer is [{layer.out_features}, {layer.in_features}] (out, in); x is {tuple(x.shape)}, grad_y {tuple(grad_y.shape)}")
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=lr, weight_decay=0.0)
    y0 = layer(x)
    (y0 * grad_y).sum().backward()
    optimizer.step()
    with torch.no_grad():
        y1 = layer(x)
    return ((y1 - y0).norm() / y0.norm()).item()
