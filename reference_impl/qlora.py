"""QLoRA: fine-tune low-rank adapters on top of a frozen 4-bit (NF4) model.

Full fine-tuning updates every weight W [out, in] and so keeps, per weight, the weight itself,
its gradient and (for Adam) two optimizer states. LoRA (Hu et al., 2021) freezes W and learns a
low-rank correction instead: two small matrices A [r, in] and B [out, r], r << min(in, out),

    y = x W^T + (alpha / r) * dropout(x) A^T B^T

Only A and B get gradients and optimizer states: r * (in + out) numbers instead of in * out.
A starts like an nn.Linear weight (kaiming-uniform, a = sqrt(5), as PEFT does) and B at zero, so
the wrapped model starts out computing exactly what the base model computes. The scaling
alpha / r keeps the size of the update comparable when r changes.

QLoRA (Dettmers et al., 2023) stores the frozen W in NF4 with double quantization (nf4.py,
4.127 bits per weight instead of 16), so the base model shrinks 3.9x and the adapters become the
only floating-point weights that change. The 4-bit weight is never kept dequantized:

    forward:   W_hat = dequantize_4bit(packed, state)  in the compute dtype, used, dropped
               y = x W_hat^T + (alpha / r) * dropout(x) A^T B^T
    backward:  dL/dx = dL/dy W_hat + ...   W_hat dequantized a second time

The base weight needs no gradient (it is frozen), but every layer still has to pass dL/dx down
to the adapters of the layers below it, and that needs W_hat again. `NF4Matmul` keeps only the
packed codes for backward (bitsandbytes' MatMul4Bit does the same), so the memory of a training
step is: the 4-bit base, the adapters with their gradients and optimizer states, and the
activations autograd saves. `measure_training_step` counts each of these on a real step, by the
bytes of the tensors involved; `memory_plan` computes the same terms from the shapes alone, for
any model size.

Adapters are saved in PEFT's format (adapter_model.safetensors + adapter_config.json) so that
`peft.PeftModel.from_pretrained` loads them on top of the dequantized base model.

This file also fixes the course's fine-tuning domain (`DOMAIN_TOPICS`, `domain_windows`) and the
training loop (`train_adapters`), both plain and deterministic for a given seed and thread count.
"""

import functools
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantcourse.corpus import split_topics, topics
from quantcourse.surgery import set_module

from .lora_math import check_lora_settings, lora_forward, lora_init
from .nf4 import NESTED_BLOCKSIZE, QuantState, bits_per_weight, dequantize_4bit, dynamic_map, nf4_code_book, quantize_4bit

# The seven linear layers of a Llama decoder block. The QLoRA paper puts adapters on all of them:
# adapters on the attention projections alone fell short of 16-bit full fine-tuning.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- the frozen 4-bit base


@functools.cache
def _code_books() -> tuple[torch.Tensor, torch.Tensor]:
    """NF4's 16 values and the 8-bit dynamic map of the nested state: fixed tables, built once."""
    return nf4_code_book(), dynamic_map()


class NF4Matmul(torch.autograd.Function):
    """y = x W_hat^T (+ bias), W_hat dequantized from the packed codes in x's dtype, in forward
    and again in backward; only the packed codes (the stored weight, no copy) are kept for backward.

    x: [..., in] float; packed: the uint8 codes; state: their QuantState (shape [out, in]).
    The weight is frozen: backward returns a gradient for x only.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None):
        ctx.save_for_backward(packed)
        ctx.state = state
        w_hat = dequantize_4bit(packed, state, dtype=x.dtype)  # [out, in], lives until this returns
        return F.linear(x, w_hat, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ dequantize_4bit(packed, ctx.state, dtype=grad_y.dtype)  # [..., out] @ [out, in]
        return grad_x, None, None, None


class FrozenLinear4bit(nn.Module):
    """A frozen Linear whose weight is stored as NF4 codes and dequantized on the fly.

    Buffers (the weight as stored, nothing else): weight_packed [out*in/2, 1] uint8 (two codes per
    byte); absmax: with double quantization (the QLoRA default) the uint8 codes of the block
    absmax [blocks] plus absmax2 [ceil(blocks/256)] float32 and offset (0-dim float32), without
    it the float32 absmax [blocks]; bias as the Linear had it. forward(x: [..., in]) -> [..., out]
    in x's dtype, computed in `compute_dtype` (None: x's dtype), as bitsandbytes' Linear4bit does.
    """

    def __init__(self, linear: nn.Linear, blocksize: int = 64, compress_statistics: bool = True, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear to quantize, got {type(linear).__name__}")
        if compute_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {compute_dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, "nf4", compress_statistics)
        self.blocksize, self.weight_shape, self.weight_dtype = blocksize, state.shape, state.dtype
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax", state.absmax)
        if state.nested:
            self.register_buffer("absmax2", state.state2.absmax)
            self.register_buffer("offset", state.offset)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, compress_statistics: bool = True, compute_dtype: torch.dtype | None = None) -> "FrozenLinear4bit":
        return cls(linear, blocksize, compress_statistics, compute_dtype)

    @property
    def nested(self) -> bool:
        return hasattr(self, "absmax2")

    @property
    def quant_state(self) -> QuantState:
        """The QuantState of the stored weight, built around the current buffers."""
        code, code2 = _code_books()
        common = dict(shape=self.weight_shape, code=code, blocksize=self.blocksize, quant_type="nf4", dtype=self.weight_dtype)
        if not self.nested:
            return QuantState(absmax=self.absmax, **common)
        if self.absmax2.dtype != torch.float32 or self.offset.dtype != torch.float32:
            raise TypeError(
                f"the double-quantization statistics were cast to {self.absmax2.dtype} (model.to(dtype)?), "
                "which changes the stored weight. Choose the compute dtype with compute_dtype=... instead, "
                "and convert a model to 16 bits before wrapping it with add_lora"
            )
        state2 = QuantState(absmax=self.absmax2, code=code2, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return QuantState(absmax=self.absmax, offset=self.offset, state2=state2, **common)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_hat [out, in] in `dtype` (default: the original weight's dtype)."""
        return dequantize_4bit(self.weight_packed, self.quant_state, dtype=dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        return NF4Matmul.apply(x.to(dtype), self.weight_packed, self.quant_state, self.bias).to(x.dtype)

    def storage_bits(self) -> int:
        """Bits of the stored weight: packed codes and statistics (the code books not counted)."""
        buffers = [self.weight_packed, self.absmax] + ([self.absmax2, self.offset] if self.nested else [])
        return sum(b.numel() * b.element_size() * 8 for b in buffers)

    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        dq = ", double quant" if self.nested else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block {self.blocksize}{dq}"


# ---------------------------------------------------------------- the adapter


class LoraLinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update, PEFT's LoRA Linear.

    base_layer: a FrozenLinear4bit (QLoRA) or a frozen nn.Linear (16-bit LoRA).
    lora_A: [r, in] and lora_B: [out, r] parameters in `adapter_dtype` (float32 by default, as
    PEFT keeps them). forward(x: [..., in]) -> [..., out] in the base layer's output dtype:

        y = base_layer(x) + (dropout(x) A^T B^T) * (alpha / r)

    x is cast to the adapter dtype for the low-rank path, and the sum back to the base output's
    dtype, in the order PEFT computes them, so the two give the same numbers.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_lora_settings(r, alpha, dropout)
        if not isinstance(base_layer, (nn.Linear, FrozenLinear4bit)):
            raise TypeError(f"LoRA wraps an nn.Linear or a FrozenLinear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=adapter_dtype))
        self.reset_parameters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.05, quantize: bool = True,
        blocksize: int = 64, compress_statistics: bool = True, compute_dtype: torch.dtype | None = None,
    ) -> "LoraLinear":  # fmt: skip
        """QLoRA's layer from a float Linear (quantize=True), or 16-bit LoRA over the Linear itself."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRA wraps an nn.Linear, got {type(linear).__name__}")
        check_lora_settings(r, alpha, dropout)
        base = FrozenLinear4bit(linear, blocksize, compress_statistics, compute_dtype) if quantize else linear
        return cls(base, r, alpha, dropout)

    def reset_parameters(self) -> None:
        """A as nn.Linear initialises its weight (kaiming-uniform, a = sqrt(5)), B = 0: no change yet."""
        A, B = lora_init(self.in_features, self.out_features, self.r, dtype=self.lora_A.dtype)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        p = self.dropout_p
        keep = torch.empty_like(x, dtype=self.lora_A.dtype).bernoulli_(1 - p).bool() if self.training and p > 0 else None
        return lora_forward(x, result, self.lora_A, self.lora_B, self.alpha, self.r, p, keep)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout_p}"


# ---------------------------------------------------------------- wrapping a model


def match_targets(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """The decoder linear layers whose name ends with one of `target_modules` (PEFT's rule:
    "q_proj" matches "model.layers.0.self_attn.q_proj"), by qualified name, in model order.

    Raises ValueError for a name that matches nothing and TypeError for one that matches modules
    that are not nn.Linear (e.g. "mlp", or a layer that already has adapters).
    """
    if isinstance(target_modules, str) or not target_modules:
        raise ValueError(f"target_modules must be a non-empty list of layer names such as {list(LLAMA_LINEARS)}, got {target_modules!r}")
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n != "lm_head"]
    chosen = {}
    for target in target_modules:
        hits = [n for n in modules if n == target or n.endswith("." + target)]
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise ValueError(f"no module of this model is named {target!r}; its linear layers are named {known}")
        wrong = [n for n in hits if not isinstance(modules[n], nn.Linear) or n == "lm_head"]
        if wrong:
            kind = type(modules[wrong[0]]).__name__
            hints = {"LoraLinear": "it already has adapters", "FrozenLinear4bit": "it is already quantized; name every target in one add_lora call"}
            hint = hints.get(kind, "name the linear layers inside it, e.g. 'q_proj'")
            if wrong[0] == "lm_head":
                hint = "the output head stays in floating point here (SmolLM2 ties it to the embedding)"
            raise TypeError(f"{target!r} matches {wrong[0]!r}, a {kind}, not a decoder nn.Linear: {hint}")
        chosen.update({n: modules[n] for n in hits})
    return {n: chosen[n] for n in linear_names if n in chosen}


def add_lora(
    model: nn.Module, target_modules=LLAMA_LINEARS, r: int = 8, alpha: float = 16, dropout: float = 0.05,
    quantize: bool = True, blocksize: int = 64, compress_statistics: bool = True, compute_dtype: torch.dtype | None = None,
) -> dict[str, LoraLinear]:  # fmt: skip
    """Wrap the target linear layers with adapters, in place, and freeze everything else.

    quantize=True is QLoRA: every decoder linear layer (targets or not) becomes a
    FrozenLinear4bit, as when a model is loaded in 4 bits, and the targets get adapters on top.
    quantize=False is 16-bit LoRA: the targets keep their float weights, frozen. The embedding,
    the norms and the (tied) output head stay as they are, frozen. Returns the LoraLinear modules
    by name. Convert the model to its 16-bit dtype, if wanted, before calling this. A is drawn
    from torch's global random generator: call torch.manual_seed first for a repeatable start.
    """
    check_lora_settings(r, alpha, dropout)
    targets = match_targets(model, target_modules)
    model.requires_grad_(False)
    if quantize:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name != "lm_head" and name not in targets:
                set_module(model, name, FrozenLinear4bit(module, blocksize, compress_statistics, compute_dtype).train(model.training))
    wrapped = {}
    for name, linear in targets.items():
        wrapped[name] = LoraLinear.from_linear(linear, r, alpha, dropout, quantize, blocksize, compress_statistics, compute_dtype)
        set_module(model, name, wrapped[name].train(model.training))  # a new module would start in training mode
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with add_lora(model, ...) first")
    return params


def dequantized_model(model: nn.Module, adapters: bool = True) -> nn.Module:
    """A copy of the model whose 4-bit layers are plain nn.Linear layers holding W_hat, dequantized
    once in the weight's original dtype; adapters=False also drops the adapters (the base model
    PEFT loads its adapters onto).

    With adapters and an fp32 compute dtype the copy computes exactly what the QLoRA model
    computes (nn.Linear with W_hat is the same F.linear), without dequantizing on every call:
    cheaper for evaluation and generation, at the cost of the full-size weights in memory.
    """
    import copy

    base = copy.deepcopy(model)
    for name, module in list(base.named_modules()):
        if isinstance(module, FrozenLinear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")  # no init
            linear.weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)
            linear.bias = None if module.bias is None else nn.Parameter(module.bias.to(module.weight_dtype), requires_grad=False)
            set_module(base, name, linear)
    if not adapters:
        for name, module in list(lora_modules(base).items()):
            set_module(base, name, module.base_layer)
    return base


def first_layers(model: nn.Module, n: int) -> nn.Module:
    """Keep only the first n decoder blocks, in place (a small real model for fast runs and tests)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(model.model.layers):
        raise ValueError(f"n must be between 1 and the model's {len(model.model.layers)} layers, got {n!r}")
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    return model


# ---------------------------------------------------------------- PEFT's file format

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the wrapped transformers model
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names, e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight -> [r, in]."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().contiguous()
    if not state:
        raise ValueError("the model has no LoRA adapters to save: wrap it with add_lora first")
    return state


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json PEFT needs to rebuild the same LoraConfig."""
    modules = lora_modules(model)
    settings = {(m.r, m.alpha, m.dropout_p) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"PEFT's config holds one rank, alpha and dropout; these adapters mix {sorted(settings)}")
    (r, alpha, dropout), = settings  # fmt: skip
    # PEFT adapts every module whose name ends with a target: the layer names (q_proj, ...) when
    # they pick exactly these modules (as add_lora wraps them), else the full names.
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in modules})
    picked = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in suffixes}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": suffixes if picked == modules.keys() else sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_model.safetensors and adapter_config.json into `directory`; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model_name_or_path)
    save_file(adapter_state_dict(model), directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Copy saved adapters into a model already wrapped with the same targets and rank."""
    from safetensors.torch import load_file

    saved = load_file(Path(directory) / ADAPTER_WEIGHTS)
    expected = adapter_state_dict(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(f"the saved adapters do not fit this model: missing {missing[:2]}, unexpected {extra[:2]}; wrap it with the saved target_modules")
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            for part in ("lora_A", "lora_B"):
                tensor = saved[f"{PEFT_PREFIX}{name}.{part}.weight"]
                if tensor.shape != getattr(module, part).shape:
                    raise ValueError(f"{name}.{part} is {tuple(tensor.shape)} in the file but {tuple(getattr(module, part).shape)} here: another rank?")
                getattr(module, part).copy_(tensor)


# ---------------------------------------------------------------- the domain and the training loop

# The "Built-in Types" chapter of the Library Reference (Doc/library/stdtypes.rst), restricted
# to the calibration split: method entries ("str.center(width[, fillchar])" then an indented
# description), operation tables and >>> examples. The rest of the corpus is mostly the Language
# Reference's grammar and prose, so the adapters have a distinct register to learn, and the
# general held-out split (corpus.py) stays disjoint from the training text.
DOMAIN_TOPICS = (
    "bltin-code-objects", "bltin-null-object", "bltin-type-objects", "specialattrs", "string-methods",
    "typesfunctions", "typesmapping", "typesmethods", "typesseq", "typesseq-mutable",
)  # fmt: skip
DOMAIN_HELDOUT_FRACTION = 0.2


def domain_tokens(tokenizer) -> torch.Tensor:
    """The domain's tokens: its topics (those this Python ships), sorted, joined by blank lines. [n] int64."""
    manual, calibration = topics(), set(split_topics()["calibration"])
    names = [n for n in sorted(DOMAIN_TOPICS) if n in manual and n in calibration]
    ids = tokenizer("\n\n".join(manual[n] for n in names), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def domain_windows(tokenizer, length: int, heldout_fraction: float = DOMAIN_HELDOUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of the domain text: (train [n, length], heldout [m, length]) int64.

    The last `heldout_fraction` of the tokens is held out (never trained on); both parts are cut
    into windows from their start, a short remainder dropped.
    """
    if length < 2 or not 0 < heldout_fraction < 1:
        raise ValueError(f"need length >= 2 and 0 < heldout_fraction < 1, got {length}, {heldout_fraction}")
    ids = domain_tokens(tokenizer)
    cut = int(ids.numel() * (1 - heldout_fraction))
    train, heldout = ids[:cut], ids[cut:]
    if heldout.numel() < length:
        raise ValueError(f"the held-out part has {heldout.numel()} tokens, less than one window of {length}")
    return (train[: train.numel() // length * length].view(-1, length).clone(),
            heldout[: heldout.numel() // length * length].view(-1, length).clone())  # fmt: skip


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch ids [batch, L] int64 (B * (L-1) predictions)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over windows [n, L] int64, several windows per forward pass.

    The same quantity as quantcourse.evaluate.perplexity (n * (L-1) predictions), batched: a
    4-bit model dequantizes its weights once per forward pass, so fewer passes cost less.
    """
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        predictions = batch.shape[0] * (batch.shape[1] - 1)
        nll += causal_lm_loss(model, batch).double().item() * predictions
        count += predictions
    return math.exp(nll / count)


def batch_schedule(count: int, batch_size: int, batches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`batches` index batches of `batch_size` windows out of `count`: one shuffled pass after
    another (a pass's leftover windows are dropped), so every window is seen once per epoch."""
    if batch_size > count:
        raise ValueError(f"batch_size {batch_size} exceeds the {count} training windows; lower it or use shorter windows")
    per_epoch = count // batch_size
    order = torch.cat([torch.randperm(count, generator=generator)[: per_epoch * batch_size] for _ in range(math.ceil(batches / per_epoch))])
    return list(order.view(-1, batch_size)[:batches])


def train_adapters(
    model: nn.Module, windows: torch.Tensor, steps: int, batch_size: int = 4, grad_accum: int = 1,
    lr: float = 1e-3, max_grad_norm: float = 0.3, seed: int = 0, on_step=None,
) -> list[float]:  # fmt: skip
    """Fine-tune the trainable parameters (the adapters) with AdamW; returns the loss of each step.

    windows: [n, L] int64 training windows. Each optimizer step averages the loss of `grad_accum`
    micro-batches of `batch_size` windows. AdamW without weight decay, a constant learning rate
    and gradient clipping at `max_grad_norm` (0.3) are the defaults of the QLoRA authors' training
    script. Dropout and the batch order come from `seed`. on_step(step, loss), if given, is
    called after every step.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    params = trainable_parameters(model)
    torch.manual_seed(seed)  # dropout masks
    schedule = batch_schedule(windows.shape[0], batch_size, steps * grad_accum, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    try:
        for step in range(steps):
            total = 0.0
            for index in schedule[step * grad_accum : (step + 1) * grad_accum]:
                loss = causal_lm_loss(model, windows[index]) / grad_accum
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if on_step is not None:
                on_step(step, total)
    finally:
        model.eval()
    return losses


@torch.inference_mode()
def greedy_continuation(model: nn.Module, tokenizer, prompt: str, new_tokens: int = 32) -> str:
    """The model's greedy continuation of `prompt` (the new text only)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- memory: measured


@dataclass(frozen=True)
class MemoryAccount:
    """Bytes of each kind of tensor a training step keeps; activations and peak only when measured.

    frozen_weights: parameters and buffers that do not train (the 4-bit base, embedding, norms);
    trainable_weights: the parameters that train (the adapters, or every weight in full
    fine-tuning); gradients; optimizer_states; activations: what autograd saved for backward,
    tensors already counted as weights excluded; peak: the most bytes held at once during the step.
    """

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer_states: int
    activations: int | None = None
    peak: int | None = None

    @property
    def total(self) -> int:
        """Weights, gradients, optimizer states and activations (the peak also holds temporaries)."""
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer_states + (self.activations or 0)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def storages(tensors) -> dict[int, int]:
    """Distinct storages of the tensors: address -> bytes (a tied weight or a view counts once)."""
    found = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq and a 0-dim step)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def allocation_peak(prof) -> int:
    """The most bytes torch's CPU allocator held above its level at the start of a profile.

    prof: a finished torch.profiler.profile(profile_memory=True). Every allocation and free is an
    event with a size (+ or -) among the profiler's raw events (kineto_results, not a documented
    interface); their running sum, in time order, peaks here.
    """
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def measure_training_step(model: nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer, seed: int = 0) -> MemoryAccount:
    """Run one real training step on ids [batch, L] and account for its memory.

    Forward and loss run under saved_tensors_hooks, which see every tensor autograd keeps for
    backward; then backward and optimizer.step(). Weights, gradients and optimizer states are the
    distinct storages of the model's parameters and buffers, of p.grad and of the optimizer's
    state. The peak adds to the bytes resident before the step (weights, and states of earlier
    steps) the largest rise of the allocator's level during it (torch.profiler), which includes
    the temporaries: a dequantized weight, the logits, the softmax.
    """
    from torch.profiler import ProfilerActivity, profile

    params = list(model.parameters())
    weights = storages(params + list(model.buffers()))
    trainable = storages(p for p in params if p.requires_grad)
    if not trainable:
        raise ValueError("the model has no trainable parameters: nothing to measure")
    resident = sum((weights | storages(p.grad for p in params) | storages(optimizer_tensors(optimizer))).values())
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:  # record the storage, keep no reference to it
        saved.update(storages([t]))
        return t

    torch.manual_seed(seed)
    model.train()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = causal_lm_loss(model, ids)
            loss.backward()
            optimizer.step()
    finally:
        model.eval()
    grads = storages(p.grad for p in params)
    return MemoryAccount(
        frozen_weights=sum(b for ptr, b in weights.items() if ptr not in trainable),
        trainable_weights=sum(trainable.values()),
        gradients=sum(grads.values()),
        optimizer_states=sum(storages(optimizer_tensors(optimizer)).values()),
        activations=sum(b for ptr, b in saved.items() if ptr not in weights),
        peak=resident + allocation_peak(prof),
    )


# ---------------------------------------------------------------- memory: from the shapes alone


@dataclass(frozen=True)
class LlamaShape:
    """What the memory of a Llama-architecture model depends on (its config.json values)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config) -> "LlamaShape":
        """From a transformers LlamaConfig (e.g. model.config of load_reference_model())."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.vocab_size, bool(config.tie_word_embeddings))  # fmt: skip

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of the seven linear layers of one decoder block."""
        q, kv, d, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}  # fmt: skip

    def linear_weights(self) -> int:
        return self.layers * sum(o * i for o, i in self.linear_shapes().values())

    def other_weights(self) -> int:
        """Embedding, output head if untied, two RMSNorm vectors per block and the final one."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + (2 * self.layers + 1) * self.hidden

    def parameters(self) -> int:
        return self.linear_weights() + self.other_weights()

    def parameter_tensors(self) -> int:
        return self.layers * 9 + 1 + (1 if self.tied_embeddings else 2)


# Published architectures (their config.json); SmolLM2-135M is the course's model.
MODEL_SHAPES = {
    "SmolLM2-135M": LlamaShape(576, 1536, 30, 9, 3, 64, 49152, True),
    "Llama-2-7B": LlamaShape(4096, 11008, 32, 32, 32, 128, 32000, False),
    "Llama-3-8B": LlamaShape(4096, 14336, 32, 32, 8, 128, 128256, False),
    "Llama-2-70B": LlamaShape(8192, 28672, 80, 64, 8, 128, 32000, False),
}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}  # state tensors per trainable weight


def memory_plan(
    shape: LlamaShape, method: str = "qlora", r: int = 8, target_modules=LLAMA_LINEARS,
    weight_bytes: int = 2, adapter_bytes: int = 4, optimizer: str = "adamw", state_bytes: int | None = None,
    master_weights: bool = False, blocksize: int = 64, compress_statistics: bool = True,
) -> MemoryAccount:  # fmt: skip
    """Weights, gradients and optimizer states of a training step, from the shapes alone (bytes).

    method: "qlora" (decoder linears in NF4 at nf4.bits_per_weight(blocksize, compress_statistics),
    adapters on target_modules), "lora" (16-bit frozen base, adapters) or "full" (every weight
    trains). weight_bytes: the float weights' width (2 for bf16, 4 for fp32); adapter_bytes: the
    adapters' and their gradients' width. state_bytes: the width of each optimizer state (default:
    that of the weights it belongs to, as torch's AdamW keeps them); master_weights adds a float32
    copy of every trained weight (mixed-precision full fine-tuning). torch's AdamW also keeps a
    float32 step counter per parameter tensor: counted, 4 bytes each. Activations depend on batch,
    sequence length and checkpointing and are measured, not planned (MemoryAccount.activations None).
    """
    if method not in ("qlora", "lora", "full"):
        raise ValueError(f"method must be 'qlora', 'lora' or 'full', got {method!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    counters = 4 if optimizer == "adamw" else 0
    if method == "full":
        n = shape.parameters()
        states = OPTIMIZER_STATES[optimizer] * n * (state_bytes or weight_bytes) + counters * shape.parameter_tensors()
        return MemoryAccount(0, n * weight_bytes, n * weight_bytes, states + (4 * n if master_weights else 0))
    check_lora_settings(r, 1, 0)
    linears = shape.linear_shapes()
    unknown = [t for t in target_modules if t not in linears]
    if unknown or isinstance(target_modules, str):
        raise ValueError(f"target_modules must name Llama linear layers {list(linears)}, got {target_modules!r}")
    adapters = shape.layers * sum(r * (linears[t][0] + linears[t][1]) for t in set(target_modules))
    tensors = 2 * shape.layers * len(set(target_modules))
    if method == "qlora":
        frozen = shape.linear_weights() * bits_per_weight(blocksize, compress_statistics) / 8 + shape.other_weights() * weight_bytes
    else:
        frozen = shape.parameters() * weight_bytes
    states = OPTIMIZER_STATES[optimizer] * adapters * (state_bytes or adapter_bytes) + counters * tensors
    return MemoryAccount(round(frozen), adapters * adapter_bytes, adapters * adapter_bytes, states)
