"""LoRA's arithmetic as plain functions of tensors: the adapters' start, their forward pass, the
AdamW update and one training step of a stack of QLoRA layers.

qlora.py builds modules (LoraLinear, FrozenLinear4bit) and trains a real model; this file holds
the same mathematics without modules, so that each piece can be read, tested and rewritten on
its own (lab 07 asks for these functions by name).

A LoRA layer adds to a frozen layer's output y_base = x W^T a low-rank update:

    y = y_base + (alpha / r) * dropout(x) A^T B^T          A: [r, in], B: [out, r]

- Start (`lora_init`): A as nn.Linear initialises a weight, kaiming-uniform with a = sqrt(5),
  which is uniform on [-1/sqrt(in), 1/sqrt(in)]; B = 0. The update is then exactly zero: the
  wrapped model computes what the frozen model computes, and training starts from it.
- Scaling: alpha / r. The update is a sum over r rank-one terms; dividing by r keeps its size
  about the same when r changes, so one alpha (and one learning rate) serves several ranks.
- Dropout acts on the adapters' input only (the base path sees x unchanged), in the inverted
  form of nn.Dropout: an input is kept with probability 1 - p and then scaled by 1 / (1 - p),
  so the expected input is unchanged. Here the kept positions are passed in (`keep`), which
  makes the step deterministic; qlora.LoraLinear draws them as nn.Dropout does.

Training touches only A and B. The frozen weight still takes part in backward: a layer's input
gradient dL/dx = dL/dy W_hat + (LoRA terms) is what the adapters of the layers below it learn
from, so a frozen layer must not be cut out of the graph (computing it under no_grad, or
detaching its output, silences every adapter beneath it). Gradients are clipped to a total norm
(0.3 in the QLoRA authors' script), then AdamW, without weight decay, moves A and B:

    m <- beta1 m + (1 - beta1) g          v <- beta2 v + (1 - beta2) g^2
    p <- p (1 - lr * wd) - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

`adamw_step` performs these operations in torch.optim.AdamW's order, so its numbers are torch's.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .nf4 import matmul_4bit

ADAMW_BETAS = (0.9, 0.999)  # torch's defaults, used by the QLoRA authors' script
ADAMW_EPS = 1e-8
CLIP_NORM = 0.3  # max_grad_norm of the QLoRA authors' training script


def check_lora_settings(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"the LoRA rank r must be a positive integer, got {r!r}; QLoRA used 64, small models do well with 8-16")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number (the update is scaled by alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}; QLoRA used 0.05-0.1")


def check_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")


# ---------------------------------------------------------------- the adapter


def lora_init(in_features: int, out_features: int, r: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters' starting values, as PEFT sets them: (A [r, in], B [out, r]) in `dtype`.

    A: kaiming-uniform with a = sqrt(5) (nn.Linear's weight init), i.e. uniform on
    [-1/sqrt(in), 1/sqrt(in)]: gain sqrt(2 / (1 + a^2)) = sqrt(1/3), bound gain * sqrt(3 / in).
    B: zeros, so that the update starts at exactly 0. seed: draw A from
    torch.Generator().manual_seed(seed); None: from torch's global generator (what
    nn.init does inside a module). The values are drawn in `dtype` (float16 and bfloat16 get the
    float32 draw, rounded).
    """
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_lora_settings(r, 1, 0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype (adapters train in float32 by default), got {dtype!r}")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    A = torch.empty(r, in_features, dtype=dtype)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A, torch.zeros(out_features, r, dtype=dtype)


def lora_forward(
    x: torch.Tensor, base_out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, r: int,
    dropout: float = 0.0, keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """PEFT's LoRA Linear on top of the frozen layer's output: [..., out] in base_out's dtype.

        y = base_out + (alpha / r) * (dropout(x) A^T) B^T

    x: [..., in] float (the layer's input); base_out: [..., out] float (the frozen layer's
    output for x); A: [r, in], B: [out, r], both in the adapter dtype (float32 by default).
    dropout: the probability p; keep: None (no dropout: evaluation, or p = 0) or a bool tensor
    shaped like x, True where an input is kept: dropout(x) = x * keep / (1 - p).
    The low-rank path runs in A's dtype (x is cast to it) and the sum is cast back to
    base_out's dtype, the order PEFT computes in.
    """
    check_lora_settings(r, alpha, dropout)
    check_tensors(x=x, base_out=base_out, A=A, B=B)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ValueError(f"A must be [r, in] and B [out, r] with r = {r}, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must share one dtype (the adapter dtype), got {A.dtype} and {B.dtype}")
    if x.dim() == 0 or x.shape[-1] != A.shape[1]:
        raise ValueError(f"x must be [..., {A.shape[1]}] to match A [r, in] = {tuple(A.shape)}, got {tuple(x.shape)}")
    if base_out.shape != x.shape[:-1] + (B.shape[0],):
        raise ValueError(f"base_out must be {tuple(x.shape[:-1]) + (B.shape[0],)} (x's leading dims, out = B.shape[0]), got {tuple(base_out.shape)}")
    x = x.to(A.dtype)
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor (True = input kept), got {keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__}")
        if keep.shape != x.shape:
            raise ValueError(f"keep must be shaped like x {tuple(x.shape)}, got {tuple(keep.shape)}")
        if dropout == 0:
            raise ValueError("a keep mask was given but dropout is 0: with p = 0 every input is kept; pass keep=None")
        x = x * (keep.to(x.dtype) / (1 - dropout))  # nn.Dropout's arithmetic: input times (mask / (1 - p))
    update = F.linear(F.linear(x, A), B) * (alpha / r)  # [..., r], then [..., out]
    return (base_out + update).to(base_out.dtype)


# ---------------------------------------------------------------- the optimizer


def adamw_step(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
    lr: float = 1e-3, betas: tuple[float, float] = ADAMW_BETAS, eps: float = ADAMW_EPS, weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One AdamW update of one tensor, torch.optim.AdamW's arithmetic; the inputs are not changed.

    param, grad, exp_avg (m), exp_avg_sq (v): tensors of one shape and dtype; step: the number
    of this update, 1 for the first (bias correction divides by 1 - beta^step). Returns the new
    (param, exp_avg, exp_avg_sq). Weight decay is decoupled (AdamW): the parameter shrinks by
    lr * weight_decay of itself, apart from the gradient; QLoRA trains with weight_decay 0.
    """
    check_tensors(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape or t.dtype != param.dtype:
            raise ValueError(f"{name} must match param ({tuple(param.shape)}, {param.dtype}), got {tuple(t.shape)}, {t.dtype}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step is the number of this update, counted from 1, got {step!r}")
    beta1, beta2 = betas
    if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
    param = param * (1 - lr * weight_decay) if weight_decay != 0 else param.clone()
    exp_avg = exp_avg.lerp(grad, 1 - beta1)  # beta1 m + (1 - beta1) g
    exp_avg_sq = (exp_avg_sq * beta2).addcmul(grad, grad, value=1 - beta2)  # beta2 v + (1 - beta2) g^2
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add(eps)
    return param.addcdiv(exp_avg, denom, value=-step_size), exp_avg, exp_avg_sq


# ---------------------------------------------------------------- one training step


def lora_training_step(
    x: torch.Tensor, labels: torch.Tensor, bases: list[dict], adapters: list, alpha: float, r: int,
    optimizer_state: dict | None = None, lr: float = 1e-3, max_grad_norm: float = CLIP_NORM,
    dropout: float = 0.0, keeps: list | None = None,
) -> tuple[float, list[tuple[torch.Tensor, torch.Tensor]], dict]:  # fmt: skip
    """One optimizer step of the adapters of a stack of QLoRA layers, as qlora.train_adapters
    takes it on a model: forward, loss, backward, clipping, AdamW.

    The model: h_0 = x; h_l = lora_forward(h_{l-1}, matmul_4bit(h_{l-1}, packed_l, state_l,
    bias_l), A_l, B_l, alpha, r, dropout, keep_l); the last h are logits over classes, and the
    loss is their mean cross-entropy with `labels`.
    x: [tokens, in] float32; labels: [tokens] int64. bases: one dict per layer, {"packed":
    uint8 codes, "state": their QuantState ([out_l, in_l]), "bias": [out_l] or None}, frozen.
    adapters: one (A_l [r, in_l], B_l [out_l, r]) float32 pair per layer. optimizer_state: None
    (a fresh AdamW: step 0, moments zero) or {"step": updates taken so far, "exp_avg": one
    (m_A, m_B) pair per layer, "exp_avg_sq": one (v_A, v_B) pair per layer}. keeps: None or
    one bool mask (or None) per layer, shaped like that layer's input.

    Gradients reach A and B only; they are clipped together to a total L2 norm of at most
    max_grad_norm (torch.nn.utils.clip_grad_norm_), then AdamW (betas 0.9, 0.999, eps 1e-8, no
    weight decay) updates them. Returns (the loss before the update, as a float; the new
    adapters, a list of (A, B); the new optimizer state).
    """
    if not bases or len(bases) != len(adapters) or (keeps is not None and len(keeps) != len(bases)):
        raise ValueError(f"need one base, one (A, B) pair and one keep mask (or keeps=None) per layer, got {len(bases)}, {len(adapters)}, {None if keeps is None else len(keeps)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise TypeError("labels must be an int64 tensor of class indices [tokens]")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm!r}")
    params = [t.detach().clone().requires_grad_(True) for pair in adapters for t in pair]  # A_1, B_1, A_2, ...
    if optimizer_state is None:
        optimizer_state = {"step": 0, "exp_avg": [(torch.zeros_like(A), torch.zeros_like(B)) for A, B in adapters],
                           "exp_avg_sq": [(torch.zeros_like(A), torch.zeros_like(B)) for A, B in adapters]}  # fmt: skip
    h = x
    for layer, base in enumerate(bases):
        A, B = params[2 * layer], params[2 * layer + 1]
        base_out = matmul_4bit(h, base["packed"], base["state"], base["bias"])  # frozen, but in the graph: dL/dh flows through it
        h = lora_forward(h, base_out, A, B, alpha, r, dropout, None if keeps is None else keeps[layer])
    loss = F.cross_entropy(h, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # one norm over every adapter's gradient
    step = optimizer_state["step"] + 1
    moments = [m for pair in optimizer_state["exp_avg"] for m in pair]
    squares = [v for pair in optimizer_state["exp_avg_sq"] for v in pair]
    new_params, new_moments, new_squares = zip(*[adamw_step(p.detach(), p.grad, m, v, step, lr) for p, m, v in zip(params, moments, squares)])
    new_state = {"step": step, "exp_avg": as_pairs(new_moments), "exp_avg_sq": as_pairs(new_squares)}
    return loss.item(), as_pairs(new_params), new_state


def as_pairs(tensors) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[A_1, B_1, A_2, B_2, ...] -> [(A_1, B_1), (A_2, B_2), ...]."""
    return list(zip(tensors[0::2], tensors[1::2]))
