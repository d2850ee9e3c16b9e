"""Mutation catalog of lab 07: the hidden suite must fail plausible wrong versions of every graded
function (and name the mistake where the suite knows it) and pass other correct ones; the lab
notebook must hold together (points, outputs, the source at full marks, the student version at
zero); its given helpers must behave like the reference's; the bad inputs the suite feeds must
make the reference raise the exception types the suite expects.

All versions live in one notebook: the source notebook plus one cell per version, whose function
is renamed `lora_forward__alpha_scaling`. A single learner process serves them all and `aliases`
points the suite's `learner.lora_forward` at the version under test. A version calls the
notebook's correct functions unless its mistake is in one of them, so each mutant breaks one thing.
"""

import ast
import inspect
import re
from pathlib import Path

import nbformat
import pytest
import torch

from lab_catalog import (
    check_catalog_covers,
    check_full_marks,
    check_loses_points,
    check_saved_without_outputs,
    check_solution_cells_hold_only,
    check_source_and_student_notebooks,
    check_test_cells_match_the_suite,
    grade_version,
    nbgrader_cells,
    suite_points,
    version,
    versions_sandbox,
)

from quantcourse.autograder import engine
from quantcourse.autograder.sandbox import LearnerError
from quantcourse.reference_impl import lora_math, nf4, qlora

LAB = "07_qlora"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"


INIT = '''
def lora_init(in_features, out_features, r, seed=None, dtype=torch.float32):
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1 or not isinstance(out_features, int) or out_features < 1:
        raise ValueError("sizes")
    CHECK_R
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError("dtype")
    g = None if seed is None else torch.Generator().manual_seed(seed)
    bound = BOUND
    A = DRAW
    B = B_START
    return (A_OUT).to(dtype), B.to(dtype)
'''
INIT_RIGHT = {
    "CHECK_R": "check_lora_settings(r, 1, 0)", "BOUND": "1 / math.sqrt(in_features)",
    "DRAW": "torch.empty(r, in_features).uniform_(-bound, bound, generator=g)", "B_START": "torch.zeros(out_features, r)", "A_OUT": "A",
}  # fmt: skip

MATMUL = '''
def matmul_4bit(x, packed, state, bias=None):
    CHECK
    w_hat = WEIGHT
    return RESULT
'''
MATMUL_RIGHT = {
    "CHECK": 'out_f, in_f = state.shape\n    if x.shape[-1] != in_f:\n        raise ValueError("x")',
    "WEIGHT": "dequantize_4bit(packed, state, x.dtype)", "RESULT": "F.linear(x, w_hat, bias)",
}  # fmt: skip

FORWARD = '''
def lora_forward(x, base_out, A, B, alpha, r, dropout=0.0, keep=None):
    check_lora_settings(r, alpha, dropout)
    if A.shape[0] != r or B.shape[1] != r or x.shape[-1] != A.shape[1] or base_out.shape != (*x.shape[:-1], B.shape[0]):
        raise ValueError("shapes")
    h = INPUT
    if keep is not None:
        if keep.dtype != torch.bool:
            raise TypeError("keep")
        if keep.shape != x.shape:
            raise ValueError("keep shape")
        if KEEP_CHECK:
            raise ValueError("keep with dropout 0")
        h = DROPPED
    update = UPDATE
    return (RESULT).to(OUT_DTYPE)
'''
FORWARD_RIGHT = {
    "INPUT": "x.to(A.dtype)", "KEEP_CHECK": "dropout == 0", "DROPPED": "h * keep / (1 - dropout)",
    "UPDATE": "(h @ A.to(h.dtype).T) @ B.to(h.dtype).T", "RESULT": "base_out + SCALE * update", "SCALE": "(alpha / r)", "OUT_DTYPE": "base_out.dtype",
}  # fmt: skip

ADAM = '''
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    if grad.shape != param.shape or exp_avg.shape != param.shape or exp_avg_sq.shape != param.shape:
        raise ValueError("shapes")
    if STEP_CHECK:
        raise ValueError("step")
    beta1, beta2 = BETAS
    if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError("hyper-parameters")
    g = GRAD
    p = DECAYED
    m = M_NEW
    v = V_NEW
    m_hat = M_USED / (1 - beta1**STEP_T)
    v_hat = V_USED / (1 - beta2**STEP_T)
    return AFTER, m, v
'''
ADAM_RIGHT = {
    "STEP_CHECK": "isinstance(step, bool) or not isinstance(step, int) or step < 1", "BETAS": "betas", "GRAD": "grad",
    "DECAYED": "param * (1 - lr * weight_decay)", "M_NEW": "beta1 * exp_avg + (1 - beta1) * g", "V_NEW": "beta2 * exp_avg_sq + (1 - beta2) * g * g",
    "M_USED": "m", "V_USED": "v", "STEP_T": "step", "AFTER": "p - lr * m_hat / (v_hat.sqrt() + eps)",
}  # fmt: skip

STEP = '''
def lora_training_step(x, labels, bases, adapters, alpha, r, optimizer_state=None, lr=1e-3, max_grad_norm=0.3, dropout=0.0, keeps=None):
    if not bases or len(adapters) != len(bases) or (keeps is not None and len(keeps) != len(bases)):
        raise ValueError("layers")
    if labels.dtype != torch.int64:
        raise TypeError("labels")
    if not max_grad_norm > 0:
        raise ValueError("max_grad_norm")
    params = [t.clone().requires_grad_() for pair in adapters for t in pair]
    weights = [dequantize_4bit(b["packed"], b["state"], torch.float32).requires_grad_(WEIGHT_GRAD) for b in bases]
    if optimizer_state is None:
        optimizer_state = {"step": 0, "exp_avg": [[torch.zeros_like(t) for t in pair] for pair in adapters],
                           "exp_avg_sq": [[torch.zeros_like(t) for t in pair] for pair in adapters]}

    def loss_of(ps):
        h = x
        for i, b in enumerate(bases):
            base_out = BASE_OUT
            keep = None if keeps is None else keeps[i]
            h = lora_forward(h, base_out, ps[2 * i], ps[2 * i + 1], alpha, r, dropout, KEEP)
        return F.cross_entropy(h, labels, reduction=REDUCTION)

    loss = loss_of(params)
    loss.backward()
    grads = [p.grad for p in params]
    counted = grads + EXTRA_NORM
    total = torch.sqrt(sum((t * t).sum() for t in counted))
    grads = CLIPPED
    step = STEP_NUMBER
    new = [adamw_step(p.detach(), g, m, v, step, lr, weight_decay=DECAY) for p, g, m, v in zip(
        params, grads, [t for pair in optimizer_state["exp_avg"] for t in pair], [t for pair in optimizer_state["exp_avg_sq"] for t in pair])]
    value = loss.item()
    if LOSS_AFTER:
        with torch.no_grad():
            value = loss_of([n[0] for n in new]).item()
    pairs = lambda k: [(new[i][k], new[i + 1][k]) for i in range(0, len(new), 2)]
    return value, pairs(0), {"step": optimizer_state["step"] + 1, "exp_avg": pairs(1), "exp_avg_sq": pairs(2)}
'''
STEP_RIGHT = {
    "WEIGHT_GRAD": "False", "BASE_OUT": 'F.linear(h, weights[i], b["bias"])', "KEEP": "keep", "REDUCTION": '"mean"',
    "EXTRA_NORM": "[]", "CLIPPED": "[g * min(1.0, max_grad_norm / (total.item() + 1e-6)) for g in grads]",
    "STEP_NUMBER": 'optimizer_state["step"] + 1', "DECAY": "0.0", "LOSS_AFTER": "False",
}  # fmt: skip

PLAN = '''
def memory_plan(shape, method="qlora", r=8, target_modules=LLAMA_LINEARS, weight_bytes=2, adapter_bytes=4, optimizer="adamw",
                state_bytes=None, master_weights=False, blocksize=64, compress_statistics=True):
    if method not in ("qlora", "lora", "full") or optimizer not in ("adamw", "sgd"):
        raise ValueError("method or optimizer")
    d, f, hd = shape.hidden, shape.intermediate, shape.head_dim
    shapes = {"q_proj": (shape.heads * hd, d), "k_proj": (KV, d), "v_proj": (KV, d), "o_proj": (d, shape.heads * hd),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    linear = shape.layers * sum(o * i for o, i in shapes.values())
    other = OTHER
    states_per = STATES_PER if optimizer == "adamw" else 0
    counter = COUNTER if optimizer == "adamw" else 0
    if method == "full":
        n = linear + other
        tensors = 9 * shape.layers + 1 + (1 if shape.tied_embeddings else 2)
        return MemoryAccount(0, n * weight_bytes, n * weight_bytes, n * states_per * (state_bytes or weight_bytes) + counter * tensors + MASTER)
    check_lora_settings(r, 1, 0)
    if isinstance(target_modules, str) or not set(target_modules) <= set(shapes):
        raise ValueError("targets")
    adapters = shape.layers * sum(r * sum(shapes[t]) for t in set(target_modules))
    frozen = (linear * BITS / 8 + other * weight_bytes) if method == "qlora" else (linear + other) * weight_bytes
    grads = GRADS
    states = adapters * states_per * (state_bytes or adapter_bytes) + counter * 2 * shape.layers * len(set(target_modules))
    return MemoryAccount(round(frozen), adapters * adapter_bytes, grads, states)
'''
PLAN_RIGHT = {
    "KV": "shape.kv_heads * hd", "OTHER": "shape.vocab * d * (1 if shape.tied_embeddings else 2) + (2 * shape.layers + 1) * d",
    "STATES_PER": "2", "COUNTER": "4", "MASTER": "(4 * n if master_weights else 0)",
    "BITS": "bits_per_weight(blocksize, compress_statistics)", "GRADS": "adapters * adapter_bytes",
}  # fmt: skip

# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "lora_init": {
        "roles_swapped": (version(INIT, INIT_RIGHT, DRAW="torch.zeros(r, in_features)",
                                  B_START="torch.empty(out_features, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=g)"),
                          "B random and A zero"),
        "b_drawn_too": (version(INIT, INIT_RIGHT, B_START="torch.empty(out_features, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=g)"),
                        "B drawn like A"),
        "relu_gain": (version(INIT, INIT_RIGHT, BOUND="math.sqrt(6 / in_features)"), "bound sqrt(6 / in)"),
        "fan_in_r": (version(INIT, INIT_RIGHT, BOUND="1 / math.sqrt(r)"), "fan-in taken as r"),
        "one_sided": (version(INIT, INIT_RIGHT, DRAW="torch.rand(r, in_features, generator=g) * bound"), "[0, bound)"),
        "normal": (version(INIT, INIT_RIGHT, DRAW="torch.randn(r, in_features, generator=g) * bound / math.sqrt(3)"), "a normal draw"),
        "seed_ignored": (version(INIT, INIT_RIGHT, DRAW="torch.empty(r, in_features).uniform_(-bound, bound)"), None),
        "transposed": (version(INIT, INIT_RIGHT, A_OUT="A.T"), "returned shape"),
        "no_rank_check": (version(INIT, INIT_RIGHT, CHECK_R="pass"), "instead of raising ValueError"),
    },
    "matmul_4bit": {
        "bias_left_out": (version(MATMUL, MATMUL_RIGHT, RESULT="F.linear(x, w_hat)"), "bias left out"),
        "float32_then_cast": (version(MATMUL, MATMUL_RIGHT, WEIGHT="dequantize_4bit(packed, state, torch.float32)",
                                      RESULT="F.linear(x.float(), w_hat, None if bias is None else bias.float()).to(x.dtype)"),
                              "dequantized and multiplied in float32, then cast"),
        "float32_result": (version(MATMUL, MATMUL_RIGHT, WEIGHT="dequantize_4bit(packed, state, torch.float32)",
                                   RESULT="F.linear(x.float(), w_hat, None if bias is None else bias.float())"), "returned dtype float32"),
        "not_transposed": (version(MATMUL, MATMUL_RIGHT, RESULT="x @ w_hat + (0 if bias is None else bias)"), "not transposed"),
        "codes_as_absmax": (version(MATMUL, MATMUL_RIGHT, WEIGHT=(
            "(nf4_code_book()[torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1).long()][:math.prod(state.shape)]"
            " * state.absmax.float().repeat_interleave(state.blocksize)[:math.prod(state.shape)]).reshape(state.shape).to(x.dtype)")),
                            "codes used as the absmax"),
        "no_shape_check": (version(MATMUL, MATMUL_RIGHT, CHECK="pass"), "raised RuntimeError; expected ValueError"),
        "original_dtype": (version(MATMUL, MATMUL_RIGHT, WEIGHT="dequantize_4bit(packed, state)"), None),
    },
    "lora_forward": {
        "alpha_scaling": (version(FORWARD, FORWARD_RIGHT, SCALE="alpha"), "scaled by alpha instead of alpha / r"),
        "rslora": (version(FORWARD, FORWARD_RIGHT, SCALE="(alpha / math.sqrt(r))"), "alpha / sqrt(r)"),
        "no_scaling": (version(FORWARD, FORWARD_RIGHT, SCALE="1"), "scaling left out"),
        "b_then_a": (version(FORWARD, FORWARD_RIGHT, UPDATE="(h @ B.to(h.dtype)) @ A.to(h.dtype)"), "x B A instead of x A^T B^T"),
        "dropout_on_output": (version(FORWARD, FORWARD_RIGHT, DROPPED="h", RESULT="base_out + SCALE * update * (1 if keep is None else keep / (1 - dropout))"),
                              "dropout applied to the update"),
        "not_rescaled": (version(FORWARD, FORWARD_RIGHT, DROPPED="h * keep"), "not scaled by 1 / (1 - p)"),
        "times_keep_prob": (version(FORWARD, FORWARD_RIGHT, DROPPED="h * keep * (1 - dropout)"), "scaled by (1 - p) instead of divided"),
        "mask_inverted": (version(FORWARD, FORWARD_RIGHT, DROPPED="h * ~keep / (1 - dropout)"), "the mask inverted"),
        "mask_ignored": (version(FORWARD, FORWARD_RIGHT, DROPPED="h"), "dropout ignored"),
        "sixteen_bit_path": (version(FORWARD, FORWARD_RIGHT, INPUT="x"), "the low-rank path computed in 16 bits"),
        "no_base": (version(FORWARD, FORWARD_RIGHT, RESULT="SCALE * update"), "without the base output"),
        "float32_result": (version(FORWARD, FORWARD_RIGHT, OUT_DTYPE="A.dtype"), "returned dtype float32"),
        "keep_with_zero_dropout": (version(FORWARD, FORWARD_RIGHT, KEEP_CHECK="False"), "instead of raising ValueError"),
    },
    "adamw_step": {
        "no_bias_correction": (version(ADAM, ADAM_RIGHT, STEP_T="1e9"), "no bias correction"),
        "eps_in_sqrt": (version(ADAM, ADAM_RIGHT, AFTER="p - lr * m_hat / (v_hat + eps).sqrt()"), "eps inside the square root"),
        "l2_decay": (version(ADAM, ADAM_RIGHT, GRAD="grad + weight_decay * param", DECAYED="param"), "weight decay added to the gradient"),
        "decay_without_lr": (version(ADAM, ADAM_RIGHT, DECAYED="param * (1 - weight_decay)"), "not multiplied by lr"),
        "decay_after": (version(ADAM, ADAM_RIGHT, DECAYED="param", AFTER="(p - lr * m_hat / (v_hat.sqrt() + eps)) * (1 - lr * weight_decay)"),
                        "applied after the Adam update"),
        "betas_swapped": (version(ADAM, ADAM_RIGHT, BETAS="betas[1], betas[0]"), "beta1 and beta2 swapped"),
        "old_moments": (version(ADAM, ADAM_RIGHT, M_USED="exp_avg", V_USED="exp_avg_sq"), "previous m and v"),
        "abs_gradient": (version(ADAM, ADAM_RIGHT, V_NEW="beta2 * exp_avg_sq + (1 - beta2) * g.abs()"), "|g| instead of g^2"),
        "step_from_zero": (version(ADAM, ADAM_RIGHT, STEP_T="(step - 1)"), None),
        "no_step_check": (version(ADAM, ADAM_RIGHT, STEP_CHECK="False"), "instead of raising ValueError"),
    },
    "lora_training_step": {
        "base_detached": (version(STEP, STEP_RIGHT, BASE_OUT='F.linear(h, weights[i], b["bias"]).detach()'), "outputs detached"),
        "no_clipping": (version(STEP, STEP_RIGHT, CLIPPED="grads"), "no gradient clipping"),
        "clipped_per_tensor": (version(STEP, STEP_RIGHT, CLIPPED="[g * min(1.0, max_grad_norm / (g.norm().item() + 1e-6)) for g in grads]"),
                               "each gradient clipped on its own"),
        "always_rescaled": (version(STEP, STEP_RIGHT, CLIPPED="[g * max_grad_norm / (total.item() + 1e-6) for g in grads]"), "always rescaled"),
        "base_in_norm": (version(STEP, STEP_RIGHT, WEIGHT_GRAD="True", EXTRA_NORM="[w.grad for w in weights]"), "frozen weights' gradients counted"),
        "summed_loss": (version(STEP, STEP_RIGHT, REDUCTION='"sum"'), "summed cross-entropy"),
        "loss_after_update": (version(STEP, STEP_RIGHT, LOSS_AFTER="True"), "loss after the update"),
        "masks_ignored": (version(STEP, STEP_RIGHT, KEEP="None"), "dropout masks ignored"),
        "step_not_advanced": (version(STEP, STEP_RIGHT, STEP_NUMBER="1"), "step number not advanced"),
        "torch_default_decay": (version(STEP, STEP_RIGHT, DECAY="0.01"), "weight decay 0.01"),
    },
    "memory_plan": {
        "bits_as_bytes": (version(PLAN, PLAN_RIGHT, BITS="bits_per_weight(blocksize, compress_statistics) * 8"), "bits counted as bytes"),
        "four_bits": (version(PLAN, PLAN_RIGHT, BITS="4"), "NF4 weights at 4 bits"),
        "double_quant_forgotten": (version(PLAN, PLAN_RIGHT, BITS="bits_per_weight(blocksize, False)"), "double-quantization constants forgotten"),
        "base_gradients": (version(PLAN, PLAN_RIGHT, GRADS="adapters * adapter_bytes + (linear + other) * weight_bytes"), "frozen base given gradients"),
        "no_step_counters": (version(PLAN, PLAN_RIGHT, COUNTER="0"), "step counters left out"),
        "one_state": (version(PLAN, PLAN_RIGHT, STATES_PER="1"), "one optimizer state per"),
        "gqa_ignored": (version(PLAN, PLAN_RIGHT, KV="d"), "grouped-query attention"),
        "head_forgotten": (version(PLAN, PLAN_RIGHT, OTHER="shape.vocab * d + (2 * shape.layers + 1) * d"), "output head forgotten"),
        "no_master_copy": (version(PLAN, PLAN_RIGHT, MASTER="0"), "master copy left out"),
        "norms_forgotten": (version(PLAN, PLAN_RIGHT, OTHER="shape.vocab * d * (1 if shape.tied_embeddings else 2)"), None),
    },
}  # fmt: skip

CORRECT = {
    "lora_init": {
        "nn_init": '''
def lora_init(in_features, out_features, r, seed=None, dtype=torch.float32):
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (in_features, out_features)):
        raise ValueError("in_features and out_features must be positive integers")
    check_lora_settings(r, 1, 0)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError("a floating-point dtype")
    A = torch.empty(r, in_features)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=None if seed is None else torch.Generator().manual_seed(seed))
    return A.to(dtype), A.new_zeros(out_features, r).to(dtype)
''',
        "rand_rescaled": '''
def lora_init(in_features, out_features, r, seed=None, dtype=torch.float32):
    for size in (in_features, out_features):
        if type(size) is not int or size <= 0:
            raise ValueError(f"bad size {size!r}")
    check_lora_settings(r, 1, 0)
    if not isinstance(dtype, torch.dtype) or not torch.empty(0, dtype=dtype).is_floating_point():
        raise TypeError(f"bad dtype {dtype!r}")
    kwargs = {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}
    u = torch.rand(r, in_features, **kwargs)  # the same draws as uniform_
    return ((2 * u - 1) / math.sqrt(in_features)).to(dtype), torch.zeros((out_features, r), dtype=dtype)
''',
    },
    "matmul_4bit": {
        "transpose_and_add": '''
def matmul_4bit(x, packed, state, bias=None):
    if len(state.shape) != 2:
        raise ValueError("a 2-D weight")
    if x.shape[-1] != state.shape[1]:
        raise ValueError("x does not match the weight")
    y = x @ dequantize_4bit(packed, state, dtype=x.dtype).T
    return y if bias is None else y + bias
''',
        "flattened_tokens": '''
def matmul_4bit(x, packed, state, bias=None):
    try:
        n, k = state.shape
    except ValueError:
        raise ValueError("the state of a 2-D weight is needed") from None
    if x.ndim == 0 or x.size(-1) != k:
        raise ValueError(f"x must end in {k}")
    w = dequantize_4bit(packed, state, x.dtype)
    flat = x.reshape(-1, k)
    out = torch.addmm(bias.expand(flat.shape[0], n), flat, w.t()) if bias is not None else flat @ w.t()
    return out.reshape(*x.shape[:-1], n)
''',
    },
    "lora_forward": {
        "merged_delta": '''
def lora_forward(x, base_out, A, B, alpha, r, dropout=0.0, keep=None):
    check_lora_settings(r, alpha, dropout)
    if tuple(A.shape) != (r, x.shape[-1]) or B.shape[1] != r or base_out.shape[-1] != B.shape[0] or base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError("A [r, in], B [out, r], x [..., in], base_out [..., out]")
    h = x.to(A.dtype)
    if keep is not None:
        if keep.dtype is not torch.bool:
            raise TypeError("keep is a bool mask")
        if keep.shape != x.shape or dropout == 0:
            raise ValueError("keep must be shaped like x, with dropout > 0")
        h = torch.where(keep, h / (1 - dropout), torch.zeros_like(h))
    delta = (alpha / r) * (B @ A)  # [out, in]: the update as one matrix
    return (base_out.to(A.dtype) + F.linear(h, delta)).to(base_out.dtype)
''',
        "einsum": '''
def lora_forward(x, base_out, A, B, alpha, r, dropout=0.0, keep=None):
    check_lora_settings(r, alpha, dropout)
    if A.shape[0] != r or B.shape[1] != r:
        raise ValueError("rank")
    if x.shape[-1] != A.shape[1] or base_out.shape != x.shape[:-1] + (B.shape[0],):
        raise ValueError("shapes")
    if keep is not None and keep.dtype != torch.bool:
        raise TypeError("keep")
    if keep is not None and (keep.shape != x.shape or dropout == 0):
        raise ValueError("keep")
    h = x.float() if A.dtype == torch.float32 else x.to(A.dtype)
    if keep is not None:
        h = h * keep.to(h.dtype) * (1.0 / (1.0 - dropout))
    low = torch.einsum("...i,ri->...r", h, A)
    update = torch.einsum("...r,or->...o", low, B * (alpha / r))
    return (update + base_out).to(base_out.dtype)
''',
    },
    "adamw_step": {
        "torch_optimizer": '''
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    if not (grad.shape == exp_avg.shape == exp_avg_sq.shape == param.shape):
        raise ValueError("shapes differ")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError("step counts from 1")
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    optimizer = torch.optim.AdamW([p], lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)  # validates the rest
    optimizer.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    optimizer.step()
    return p.detach(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]
''',
        "lerp_order": '''
def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    if any(t.shape != param.shape for t in (grad, exp_avg, exp_avg_sq)):
        raise ValueError("grad and moments must be shaped like param")
    if type(step) is not int or step < 1:
        raise ValueError("step >= 1")
    b1, b2 = betas
    if min(lr, eps, weight_decay) < 0 or not (0 <= b1 < 1) or not (0 <= b2 < 1):
        raise ValueError("bad hyper-parameters")
    m = exp_avg.lerp(grad, 1 - b1)
    v = exp_avg_sq.mul(b2).addcmul(grad, grad, value=1 - b2)
    denom = v.sqrt() / math.sqrt(1 - b2**step) + eps
    return param.mul(1 - lr * weight_decay).addcdiv(m, denom, value=-lr / (1 - b1**step)), m, v
''',
    },
    "lora_training_step": {
        "clip_grad_norm": '''
def lora_training_step(x, labels, bases, adapters, alpha, r, optimizer_state=None, lr=1e-3, max_grad_norm=0.3, dropout=0.0, keeps=None):
    if len(bases) == 0 or len(bases) != len(adapters) or (keeps is not None and len(keeps) != len(bases)):
        raise ValueError("one base, one pair and one mask per layer")
    if labels.dtype != torch.long:
        raise TypeError("int64 labels")
    if max_grad_norm <= 0:
        raise ValueError("max_grad_norm > 0")
    A_s = [A.detach().clone().requires_grad_(True) for A, _ in adapters]
    B_s = [B.detach().clone().requires_grad_(True) for _, B in adapters]
    h = x
    for i, base in enumerate(bases):
        y = matmul_4bit(h, base["packed"], base["state"], base.get("bias"))
        h = lora_forward(h, y, A_s[i], B_s[i], alpha, r, dropout, keeps[i] if keeps else None)
    loss = F.cross_entropy(h, labels)
    loss.backward()
    params = [t for pair in zip(A_s, B_s) for t in pair]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    t = 1 if optimizer_state is None else optimizer_state["step"] + 1
    new, ms, vs = [], [], []
    for i in range(len(bases)):
        pair = []
        for j, p in enumerate((A_s[i], B_s[i])):
            m = torch.zeros_like(p) if optimizer_state is None else optimizer_state["exp_avg"][i][j]
            v = torch.zeros_like(p) if optimizer_state is None else optimizer_state["exp_avg_sq"][i][j]
            pair.append(adamw_step(p.detach(), p.grad, m, v, t, lr))
        new.append((pair[0][0], pair[1][0]))
        ms.append((pair[0][1], pair[1][1]))
        vs.append((pair[0][2], pair[1][2]))
    return float(loss), new, {"step": t, "exp_avg": ms, "exp_avg_sq": vs}
''',
        "flat_norm_no_epsilon": '''
def lora_training_step(x, labels, bases, adapters, alpha, r, optimizer_state=None, lr=1e-3, max_grad_norm=0.3, dropout=0.0, keeps=None):
    n = len(bases)
    if n < 1 or len(adapters) != n or (keeps is not None and len(keeps) != n):
        raise ValueError("layers")
    if not isinstance(labels, torch.Tensor) or labels.dtype is not torch.int64:
        raise TypeError("labels")
    if max_grad_norm <= 0:
        raise ValueError("max_grad_norm")
    state = optimizer_state or {"step": 0, "exp_avg": [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in adapters],
                                "exp_avg_sq": [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in adapters]}
    leaves = [torch.tensor(t.tolist(), requires_grad=True) for pair in adapters for t in pair]
    h = x
    for i in range(n):
        w = dequantize_4bit(bases[i]["packed"], bases[i]["state"], h.dtype)
        y = h @ w.T if bases[i]["bias"] is None else h @ w.T + bases[i]["bias"]
        h = lora_forward(h, y, leaves[2 * i], leaves[2 * i + 1], alpha, r, dropout, None if keeps is None else keeps[i])
    loss = F.cross_entropy(h, labels)
    grads = torch.autograd.grad(loss, leaves)
    norm = torch.cat([g.flatten() for g in grads]).norm()
    if norm > max_grad_norm:  # 1e-6 left out: inside the tolerance
        grads = [g * (max_grad_norm / norm) for g in grads]
    step = state["step"] + 1
    out = [adamw_step(p.detach(), g, m, v, step, lr) for p, g, m, v in
           zip(leaves, grads, [t for pair in state["exp_avg"] for t in pair], [t for pair in state["exp_avg_sq"] for t in pair])]
    regroup = lambda k: [(out[i][k], out[i + 1][k]) for i in range(0, 2 * n, 2)]
    return loss.item(), regroup(0), {"step": step, "exp_avg": regroup(1), "exp_avg_sq": regroup(2)}
''',
    },
    "memory_plan": {
        "per_layer_loop": '''
def memory_plan(shape, method="qlora", r=8, target_modules=LLAMA_LINEARS, weight_bytes=2, adapter_bytes=4, optimizer="adamw",
                state_bytes=None, master_weights=False, blocksize=64, compress_statistics=True):
    if method not in {"qlora", "lora", "full"}:
        raise ValueError("method")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError("optimizer")
    d, hd = shape.hidden, shape.head_dim
    layer = dict(q_proj=(shape.heads * hd, d), k_proj=(shape.kv_heads * hd, d), v_proj=(shape.kv_heads * hd, d),
                 o_proj=(d, shape.heads * hd), gate_proj=(shape.intermediate, d), up_proj=(shape.intermediate, d),
                 down_proj=(d, shape.intermediate))
    params, linear, tensors = 0, 0, 0
    for _ in range(shape.layers):
        for out_f, in_f in layer.values():
            linear += out_f * in_f
        params += 2 * d
        tensors += 9
    params += d + shape.vocab * d * (1 if shape.tied_embeddings else 2)
    tensors += 1 + (1 if shape.tied_embeddings else 2)
    k = OPTIMIZER_STATES[optimizer]
    step_bytes = 4 * (optimizer == "adamw")
    if method == "full":
        n = params + linear
        extra = 4 * n if master_weights else 0
        return MemoryAccount(0, n * weight_bytes, n * weight_bytes, k * n * (state_bytes or weight_bytes) + step_bytes * tensors + extra)
    check_lora_settings(r, 1, 0)
    if isinstance(target_modules, str):
        raise ValueError("a list of names")
    chosen = []
    for t in target_modules:
        if t not in layer:
            raise ValueError(f"unknown layer {t}")
        if t not in chosen:
            chosen.append(t)
    adapter = 0
    for _ in range(shape.layers):
        for t in chosen:
            adapter += r * (layer[t][0] + layer[t][1])
    base = linear * bits_per_weight(blocksize, compress_statistics) / 8 + params * weight_bytes if method == "qlora" else (linear + params) * weight_bytes
    opt = k * adapter * (state_bytes or adapter_bytes) + step_bytes * 2 * len(chosen) * shape.layers
    return MemoryAccount(int(round(base)), adapter * adapter_bytes, adapter * adapter_bytes, opt)
''',
        "from_totals": '''
def memory_plan(shape, method="qlora", r=8, target_modules=LLAMA_LINEARS, weight_bytes=2, adapter_bytes=4, optimizer="adamw",
                state_bytes=None, master_weights=False, blocksize=64, compress_statistics=True):
    if method not in ("qlora", "lora", "full") or optimizer not in ("adamw", "sgd"):
        raise ValueError(f"unknown method {method!r} or optimizer {optimizer!r}")
    d, f, L = shape.hidden, shape.intermediate, shape.layers
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # per block: q and o are q x d, k and v are kv x d, the MLP has three f x d matrices
    linear = L * (2 * q * d + 2 * kv * d + 3 * f * d)
    untied = not shape.tied_embeddings
    everything = linear + (1 + untied) * shape.vocab * d + (2 * L + 1) * d
    adam = optimizer == "adamw"
    if method == "full":
        states = 2 * adam * everything * (state_bytes or weight_bytes) + 4 * adam * (9 * L + 2 + untied)
        return MemoryAccount(0, everything * weight_bytes, everything * weight_bytes, states + 4 * everything * master_weights)
    check_lora_settings(r, 1, 0)
    sums = {"q_proj": q + d, "k_proj": kv + d, "v_proj": kv + d, "o_proj": d + q, "gate_proj": f + d, "up_proj": f + d, "down_proj": d + f}
    if isinstance(target_modules, str) or any(t not in sums for t in target_modules):
        raise ValueError("target_modules")
    unique = set(target_modules)
    n = L * r * sum(sums[t] for t in unique)
    if method == "qlora":
        frozen = linear * bits_per_weight(blocksize, compress_statistics) / 8 + (everything - linear) * weight_bytes
    else:
        frozen = everything * weight_bytes
    return MemoryAccount(round(frozen), n * adapter_bytes, n * adapter_bytes,
                         2 * adam * n * (state_bytes or adapter_bytes) + 4 * adam * 2 * L * len(unique))
''',
    },
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab07")) as box:
        yield box


@pytest.mark.slow
@pytest.mark.parametrize("function, version_name", [(f, v) for f, versions in WRONG.items() for v in versions])
def test_wrong_version_loses_points(sandbox, function, version_name):
    check_loses_points(grade_version(LAB, sandbox, function, version_name), f"{function}__{version_name}", WRONG[function][version_name][1])


@pytest.mark.slow
@pytest.mark.parametrize("function, version_name", [(f, v) for f, versions in CORRECT.items() for v in versions] + [(f, None) for f in WRONG])
def test_correct_version_gets_full_marks(sandbox, function, version_name):
    check_full_marks(grade_version(LAB, sandbox, function, version_name))


def test_catalog_covers_every_graded_function():
    check_catalog_covers(LAB, WRONG, CORRECT)


@pytest.mark.slow
def test_given_helpers_behave_like_the_reference(sandbox):
    """The notebook's given decoding, table, map, checks and bits per weight are the reference's,
    so a learner who calls them is graded against the same arithmetic."""
    assert torch.equal(sandbox.call("nf4_code_book"), nf4.nf4_code_book())
    assert torch.equal(sandbox.call("dynamic_map"), nf4.dynamic_map())
    suite = engine.load_suite(LAB)
    g = torch.Generator().manual_seed(0)
    for shape, blocksize, compress, dtype in [((96, 64), 64, True, torch.float32), ((33, 17), 32, True, torch.bfloat16),
                                              ((40, 300), 128, False, torch.float16), ((5,), 64, True, torch.float32)]:  # fmt: skip
        packed, state = nf4.quantize_4bit((torch.randn(shape, generator=g) * 0.1).to(dtype), blocksize, "nf4", compress)
        for out_dtype in (None, torch.float32, torch.bfloat16):
            assert torch.equal(sandbox.call("dequantize_4bit", packed, suite.wire(state), out_dtype), nf4.dequantize_4bit(packed, state, out_dtype))
    for blocksize in nf4.BLOCKSIZES:
        for compress in (True, False):
            assert sandbox.call("bits_per_weight", blocksize, compress) == nf4.bits_per_weight(blocksize, compress)
    with pytest.raises(LearnerError, match=" raised ValueError:"):
        sandbox.call("bits_per_weight", 100)
    for args in [(0, 1, 0), (2.0, 1, 0), (True, 1, 0), (4, 0, 0), (4, -1, 0), (4, 1, 1.0), (4, 1, -0.1), (4, "1", 0)]:
        with pytest.raises(ValueError):
            lora_math.check_lora_settings(*args)
        with pytest.raises(LearnerError, match=" raised ValueError:"):
            sandbox.call("check_lora_settings", *args)
    assert sandbox.call("check_lora_settings", 8, 16, 0.05) is None


@pytest.mark.slow
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_reference_raises():
    """The exception types the suite expects are those the reference raises for the same input."""
    suite = engine.load_suite(LAB)
    for args, error in [((48, 32, 0), ValueError), ((48, 32, -4), ValueError), ((48, 32, 2.5), ValueError), ((0, 32, 4), ValueError),
                        ((48, 0, 4), ValueError), ((8, 8, 2, 0, torch.int32), TypeError)]:  # fmt: skip
        with pytest.raises(error):
            lora_math.lora_init(*args)
    _, packed, state = suite.quantized((16, 64), 740)
    _, packed1, state1 = suite.quantized((128,), 741)
    for args in [(torch.randn(2, 32), packed, state), (torch.randn(2, 16), packed, state), (torch.randn(2, 128), packed1, state1)]:
        with pytest.raises(ValueError):
            nf4.matmul_4bit(*args)
    x, base_out, A, B = suite.layer_tensors(3, 20, 12, 4, 780)
    keep = torch.ones(3, 20, dtype=torch.bool)
    for args, error in [((x, base_out, A, B, 8, 3), ValueError), ((x, base_out, A, B, 8, 0), ValueError), ((x, base_out, A, B, 0, 4), ValueError),
                        ((x, base_out, A, B, 8, 4, 1.0, keep), ValueError), ((x[:, :10], base_out, A, B, 8, 4), ValueError),
                        ((x, base_out[:, :6], A, B, 8, 4), ValueError), ((x, base_out, A, B, 8, 4, 0.1, keep.float()), TypeError),
                        ((x, base_out, A, B, 8, 4, 0.1, keep[:2]), ValueError), ((x, base_out, A, B, 8, 4, 0.0, keep), ValueError)]:  # fmt: skip
        with pytest.raises(error):
            lora_math.lora_forward(*args)
    param, grad, m, v = suite.adam_state((3, 4), 820)
    for args in [(param, grad, m, v, 0), (param, grad[:2], m, v, 1), (param, grad, m[:, :2], v, 1),
                 (param, grad, m, v, 1, 1e-3, (0.9, 1.0)), (param, grad, m, v, 1, -1e-3)]:  # fmt: skip
        with pytest.raises(ValueError):
            lora_math.adamw_step(*args)
    x, labels, bases, adapters = suite.tiny_problem(870)
    for args, kwargs, error in [((x, labels, bases, adapters[:1], 8, 4), {}, ValueError), ((x, labels, [], [], 8, 4), {}, ValueError),
                                ((x, labels.float(), bases, adapters, 8, 4), {}, TypeError),
                                ((x, labels, bases, adapters, 8, 4), {"max_grad_norm": 0.0}, ValueError),
                                ((x, labels, bases, adapters, 8, 4), {"keeps": [None]}, ValueError)]:  # fmt: skip
        with pytest.raises(error):
            lora_math.lora_training_step(*args, **kwargs)
    shape = qlora.MODEL_SHAPES["SmolLM2-135M"]
    for kwargs in [{"method": "qlora4"}, {"optimizer": "adam"}, {"r": 0}, {"target_modules": ("q_proj", "mlp")},
                   {"target_modules": "q_proj"}, {"blocksize": 100}]:  # fmt: skip
        with pytest.raises(ValueError):
            qlora.memory_plan(shape, **kwargs)


def test_test_cells_match_the_suite():
    check_test_cells_match_the_suite(LAB, NOTEBOOK)


def test_points_and_metadata():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    manual = sum(meta["points"] for _, meta in nbgrader_cells(notebook, "manual"))
    assert manual > 0 and sum(suite_points(LAB).values()) + manual >= 100
    assert notebook.metadata["quantcourse"] == {"lab": LAB}
    assert notebook.metadata["kernelspec"]["name"] == "quantcourse"
    ids = [c.metadata["nbgrader"]["grade_id"] for c in notebook.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "grade_id values must be unique"
    assert notebook.cells[-1].source.strip() == "report()"
    table = notebook.cells[0].source
    for key, points in suite_points(LAB).items():  # the introduction's table states each function's points
        assert re.search(rf"`{key.removeprefix('07.')}` \| {points:g} \|", table), key


def test_graded_functions_have_the_reference_signatures():
    """Same names, parameters and defaults as the reference (the lab promises it). A default that
    names a constant of the notebook (target_modules=LLAMA_LINEARS) is compared by its value."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    defined, constants = {}, {}
    for cell in notebook.cells:
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign):
                    constants[node.targets[0].id] = ast.literal_eval(node.value)
                if isinstance(node, ast.FunctionDef):
                    defaults = [constants[d.id] if isinstance(d, ast.Name) else ast.unparse(d) if isinstance(d, ast.Attribute)
                                else ast.literal_eval(d) for d in node.args.defaults]  # fmt: skip
                    defined[node.name] = [a.arg for a in node.args.args], defaults
    for name, reference in engine.load_suite(LAB).GRADED.items():
        parameters = inspect.signature(reference).parameters.values()
        names = [p.name for p in parameters]
        defaults = [str(p.default) if isinstance(p.default, torch.dtype) else p.default for p in parameters if p.default is not inspect.Parameter.empty]
        assert defined[name] == (names, defaults), (name, defined[name], names, defaults)


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs definitions and the constants of solution cells; a call would be lost."""
    check_solution_cells_hold_only(NOTEBOOK, (ast.FunctionDef, ast.Import, ast.ImportFrom, ast.Assign))
