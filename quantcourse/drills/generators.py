"""Question generators: randomized numeric drills whose answers the course's own code computes.

Each generator draws its parameters from a `random.Random` and asks the package for the answer,
so an answer is never typed by hand and always agrees with what the lectures compute:

| generator          | asks for                                               | computed by                               |
|--------------------|--------------------------------------------------------|-------------------------------------------|
| memory             | GB of weights (constants, double quant) + KV cache     | formats.memory_bytes, kvcache.kv_cache_memory |
| qlora_memory       | GB of a QLoRA training step before activations         | qlora.memory_plan                         |
| scale_zero_point   | scale or zero point of a range                         | affine.scale_zero_point                   |
| quantize_code      | the code of a value                                    | affine.quantize                           |
| dequantize_affine  | the value of a code                                    | affine.dequantize                         |
| dequantize_nf4     | the value of a packed NF4 code                         | nf4.dequantize_blockwise_4bit             |
| dequantize_gguf    | the value of a weight in a GGUF block                  | gguf.dequantize                           |
| bits_group         | bits per weight of a grouped integer grid              | formats.bits_per_param                    |
| bits_nf4           | bits per weight of NF4, with or without double quant   | nf4.bits_per_weight                       |
| bits_gguf          | bits per weight of a GGUF block type                   | gguf.BLOCK_TYPES                          |
| speedup_ceiling    | best weight-only speedup over fp16 at batch 1          | roofline.speedup_ceiling                  |
| gemv_time          | shortest time of a batch-1 matmul at a bandwidth       | roofline.matmul_seconds                   |
| kv_bytes_per_token | bytes of KV cache per token                            | kvcache.bytes_per_token                   |
| recipe_pair        | which of two measured recipes loses less, and why      | benchmarks/results/*.json                 |

`generate(name, seed)` is deterministic: the history stores (name, seed) and a missed question
comes back exactly as it was asked. Parameters are drawn so that a question is fair: no value
sits on a rounding tie that float32 could break either way.
"""

import dataclasses
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from ..reference_impl import affine, formats, gguf, kvcache, nf4, qlora, roofline
from ..reference_impl.qlora_analysis import SHAPES, smallest_card
from .questions import Question, format_number

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class Generator:
    name: str
    topic: str
    make: Callable[[random.Random], Question]
    available: Callable[[], bool] = lambda: True


def gb(n_bytes: float) -> str:
    return f"{format_number(n_bytes / 1e9)} GB"


# ---------------------------------------------------------------- memory of a model


def storage_text(fmt: str, kwargs: dict) -> str:
    """Words for a formats.memory_bytes setting, with every constant the count needs."""
    text = f"{fmt} codes of {formats.bits_per_element(fmt)} bits"
    g = kwargs.get("group_size")
    if g is None:
        return text + (" (the one scale per tensor is negligible: leave it out)" if fmt.startswith("fp8") else "")
    zero = f" and a {kwargs['zero_bits']}-bit zero point" if kwargs.get("zero_bits") else ""
    text += f", with a {kwargs.get('scale_bits', 16)}-bit scale{zero} per {g} weights"
    if kwargs.get("double_quant_group_size"):
        text += (f"; the scales are quantized again, adding one {kwargs.get('double_quant_scale_bits', 32)}-bit "
                 f"constant per {kwargs['double_quant_group_size']} scales (double quantization)")  # fmt: skip
    return text


KV_STORAGE = {  # scheme of kvcache.SCHEMES -> what it stores, in words
    "fp16": "fp16, 2 bytes per value",
    "fp8_e4m3": "fp8 e4m3, 1 byte per value, plus one fp32 scale for K and one for V in each layer",
    "int8": "int8, 1 byte per value, plus one fp32 scale per token, per KV head, for K and for V",
    "fp32": "fp32, 4 bytes per value",
}


def kv_config(name: str, shape: qlora.LlamaShape) -> kvcache.KVConfig:
    return kvcache.KVConfig(name, shape.layers, shape.kv_heads, shape.head_dim, shape.heads)


def shape_text(name: str, shape: qlora.LlamaShape) -> str:
    others = "embedding, norms" if shape.tied_embeddings else "embedding, output head, norms"
    return (f"{name} has {shape.linear_weights():,} weights in its decoder's linear layers and "
            f"{shape.other_weights():,} other parameters ({others}); {shape.layers} layers with "
            f"{shape.kv_heads} KV heads of dimension {shape.head_dim}.")  # fmt: skip


def memory_question(rng: random.Random) -> Question:
    name = rng.choice(sorted(SHAPES))
    shape = SHAPES[name]
    label, fmt, kwargs = rng.choice(formats.MEMORY_SCHEMES)
    rest_bf16 = fmt not in ("fp32", "fp16") and rng.random() < 0.7
    kv_scheme = rng.choice(["fp16", "fp8_e4m3", "int8"])
    context = rng.choice([2048, 4096, 8192, 32768, 131072])
    batch = rng.choice([1, 1, 4, 16])
    if rest_bf16:
        linear = formats.memory_bytes(shape.linear_weights(), fmt, **kwargs)
        rest = formats.memory_bytes(shape.other_weights(), "bf16")
        where = f"The linear weights are stored as {storage_text(fmt, kwargs)}; everything else in bf16."
    else:
        linear, rest = formats.memory_bytes(shape.parameters(), fmt, **kwargs), 0.0
        where = f"Every parameter is stored as {storage_text(fmt, kwargs)}."
    kv = kvcache.kv_cache_memory(kv_config(name, shape), kv_scheme, context, batch)
    total = linear + rest + kv.total
    sequences = f"{batch} sequences" if batch > 1 else "one sequence"
    prompt = (f"{shape_text(name, shape)}\n{where}\nThe KV cache is {KV_STORAGE[kv_scheme]}, for {sequences} "
              f"of {context:,} tokens.\nHow many GB (10^9 bytes) do the weights and the KV cache take together?")  # fmt: skip
    per_param = formats.bits_per_param(fmt, **kwargs)
    explanation = (
        f"Weights: {per_param:.4g} bits per {'linear weight' if rest_bf16 else 'parameter'} ({label}), "
        f"{gb(linear)}" + (f", plus {gb(rest)} for the bf16 rest" if rest_bf16 else "") + ". "
        f"KV cache: 2 (K and V) x {shape.layers} layers x {shape.kv_heads} KV heads x {shape.head_dim} = "
        f"{kv_config(name, shape).elements_per_token:,} values per token, x {context * batch:,} tokens: "
        f"{gb(kv.codes)}" + (f" plus {gb(kv.constants)} of scales" if kv.constants else "") + ". "
        f"Total {gb(total)} = {format_number(total / 2**30)} GiB. Forgetting the constants or the cache is "
        "the usual miss; GB (10^9) against GiB (2^30) is a 7% difference."
    )
    details = dict(model=name, fmt=fmt, kwargs=kwargs, rest_bf16=rest_bf16, kv_scheme=kv_scheme, context=context, batch=batch)
    return Question("", "memory", prompt, total / 1e9, explanation, "course/00_welcome.ipynb §3", unit="GB",
                    reference="reference_impl/formats.py, reference_impl/kvcache.py", details=details)  # fmt: skip


def qlora_memory_question(rng: random.Random) -> Question:
    name = rng.choice(sorted(SHAPES))
    shape = SHAPES[name]
    r = rng.choice([8, 16, 64])
    targets = rng.choice([qlora.LLAMA_LINEARS, ("q_proj", "v_proj")])
    plan = qlora.memory_plan(shape, "qlora", r=r, target_modules=targets, weight_bytes=2, adapter_bytes=4,
                             optimizer="adamw", state_bytes=4, blocksize=64, compress_statistics=True)  # fmt: skip
    adapters = plan.trainable_weights // 4
    where = "all seven linear layers" if len(targets) == 7 else "q_proj and v_proj"
    prompt = (f"QLoRA on {name}: its {shape.linear_weights():,} decoder linear weights are frozen in NF4 "
              f"(blocks of 64, double quantization with second-level blocks of 256), its {shape.other_weights():,} "
              f"other parameters frozen in bf16. LoRA adapters of rank {r} on {where} of every layer add "
              f"{adapters:,} parameters, kept in fp32 and trained with 32-bit AdamW.\n"
              "How many GB (10^9 bytes) do weights, gradients and optimizer states take (activations left out)?")  # fmt: skip
    bits = nf4.bits_per_weight(64, True)
    card = smallest_card(plan.total)
    explanation = (
        f"Frozen base: {shape.linear_weights():,} x {bits:.4g} bits / 8 + {shape.other_weights():,} x 2 bytes = "
        f"{gb(plan.frozen_weights)}. Each adapter parameter costs 16 bytes: its fp32 value, gradient and AdamW's m "
        f"and v: {adapters:,} x 16 = {gb(plan.trainable_weights + plan.gradients + plan.optimizer_states)} "
        f"(plus AdamW's step counters, a few bytes). Total {gb(plan.total)}"
        + (f", which fits a {card} GB card before activations." if card else ", more than an 80 GB card holds.")
        + " The frozen base gets no gradient and no optimizer state: that is the whole saving."
    )
    return Question("", "qlora", prompt, plan.total / 1e9, explanation, "course/07_qlora.ipynb §2", unit="GB",
                    reference="reference_impl/qlora.py", details=dict(model=name, r=r, targets=targets))  # fmt: skip


# ---------------------------------------------------------------- affine: scale, zero point, codes


def tie_free(t: float, margin: float = 0.05) -> bool:
    """False when t is within `margin` of a rounding tie (k + 0.5), where float32 could go either way."""
    return abs((t - math.floor(t)) - 0.5) > margin


def scale_zero_point_question(rng: random.Random) -> Question:
    while True:
        bits = rng.choice([2, 3, 4, 8])
        symmetric = rng.random() < 0.4
        xmax = rng.randint(5, 800) / 100
        xmin = -rng.randint(0, 800) / 100 if rng.random() < 0.85 else rng.randint(1, 400) / 100
        xmin, xmax = min(xmin, xmax), max(xmin, xmax)
        scale, zero = affine.scale_zero_point(torch.tensor(xmin), torch.tensor(xmax), bits, symmetric)
        lo, hi = min(xmin, 0.0), max(xmax, 0.0)
        if symmetric or tie_free(-lo / ((hi - lo) / (2**bits - 1))):
            break
    ask_zero = not symmetric and rng.random() < 0.5
    grid = (f"the symmetric signed {bits}-bit grid (zero point 0)" if symmetric
            else f"the asymmetric unsigned {bits}-bit grid with an integer zero point")  # fmt: skip
    prompt = (f"A block of values spans [{xmin:g}, {xmax:g}]. It is quantized to {grid}, with min-max range "
              f"(no clipping).\nWhat is its {'zero point' if ask_zero else 'scale s'}?")  # fmt: skip
    qmax = affine.quant_range(bits, signed=symmetric)[1]
    if symmetric:
        how = f"s = max|x| / (2^{bits - 1} - 1) = {max(abs(xmin), abs(xmax)):g} / {qmax} = {float(scale):.6g}"
    else:
        how = (f"the range is widened to contain 0: [{lo:g}, {hi:g}]; s = ({hi:g} - ({lo:g})) / {qmax} = "
               f"{float(scale):.6g}; z = round(-min / s) = round({-lo / float(scale):.4f}) = {int(zero)}")  # fmt: skip
    explanation = f"{how}. Then x = 0 maps to the code z exactly." + (
        " A positive minimum is a trap: the grid must still contain 0, so the range starts at 0." if xmin > 0 else ""
    )
    answer = int(zero) if ask_zero else float(scale)
    details = dict(xmin=xmin, xmax=xmax, bits=bits, symmetric=symmetric, ask="zero" if ask_zero else "scale")
    return Question("", "affine", prompt, answer, explanation, "course/01_affine.ipynb §1",
                    rel_tol=0.0 if ask_zero else 0.005, reference="reference_impl/affine.py", details=details)  # fmt: skip


def random_grid(rng: random.Random) -> tuple[int, bool, float, int]:
    """(bits, symmetric, scale, zero point) of a plausible grid."""
    bits = rng.choice([3, 4, 8])
    symmetric = rng.random() < 0.5
    scale = rng.randint(5, 400) / 1000 if bits < 8 else rng.randint(1, 200) / 10000
    zero = 0 if symmetric else rng.randint(0, 2**bits - 1)
    return bits, symmetric, scale, zero


def grid_text(bits: int, symmetric: bool, scale: float, zero: int) -> str:
    lo, hi = affine.quant_range(bits, signed=symmetric)
    kind = "symmetric, signed" if symmetric else "asymmetric, unsigned"
    return f"{'an' if bits == 8 else 'a'} {bits}-bit {kind} grid (codes {lo}..{hi}) with scale s = {scale:g} and zero point z = {zero}"


def quantize_code_question(rng: random.Random) -> Question:
    while True:
        bits, symmetric, scale, zero = random_grid(rng)
        lo, hi = affine.quant_range(bits, signed=symmetric)
        x = round(rng.uniform((lo - zero - 2) * scale, (hi - zero + 2) * scale), 4)
        if tie_free(np.float32(x) / np.float32(scale)):
            break
    code = int(affine.quantize(torch.tensor([x]), torch.tensor(scale), torch.tensor(float(zero)), bits, symmetric)[0])
    prompt = f"Quantize x = {x:g} on {grid_text(bits, symmetric, scale, zero)}.\nWhich code q is stored?"
    t = x / scale
    clipped = not lo <= round(t) + zero <= hi
    explanation = (f"q = clamp(round(x / s) + z, {lo}, {hi}) = clamp(round({t:.4f}) + {zero}) = {code}"
                   + (": the value lies outside the grid's range and saturates." if clipped else "."))  # fmt: skip
    return Question("", "affine", prompt, code, explanation, "course/01_affine.ipynb §1", rel_tol=0.0,
                    reference="reference_impl/affine.py",
                    details=dict(x=x, bits=bits, symmetric=symmetric, scale=scale, zero=zero))  # fmt: skip


def dequantize_affine_question(rng: random.Random) -> Question:
    bits, symmetric, scale, zero = random_grid(rng)
    lo, hi = affine.quant_range(bits, signed=symmetric)
    code = rng.choice([q for q in range(lo, hi + 1) if q != zero])
    value = float(affine.dequantize(torch.tensor(code), torch.tensor(scale), torch.tensor(float(zero))))
    prompt = f"A weight is stored as code q = {code} on {grid_text(bits, symmetric, scale, zero)}.\nWhat value does it stand for?"
    explanation = f"x_hat = s (q - z) = {scale:g} x ({code} - {zero}) = {value:.6g}."
    return Question("", "affine", prompt, value, explanation, "course/01_affine.ipynb §1", rel_tol=0.005,
                    abs_tol=scale / 100, reference="reference_impl/affine.py",
                    details=dict(code=code, bits=bits, symmetric=symmetric, scale=scale, zero=zero))  # fmt: skip


def dequantize_nf4_question(rng: random.Random) -> Question:
    absmax = rng.randint(5, 300) / 100
    byte = rng.randint(0, 255)
    which = rng.choice([0, 1])
    values = nf4.dequantize_blockwise_4bit(torch.tensor([[byte]], dtype=torch.uint8), torch.tensor([absmax]), (2,))
    code = nf4.nf4_code_book()
    table = ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(code.tolist()))
    prompt = (f"bitsandbytes' NF4 code book (index: value) is {table}.\nIn a block with absmax {absmax:g}, the byte "
              f"0x{byte:02X} holds the codes of two consecutive weights, packed the bitsandbytes way.\n"
              f"What is the {'first' if which == 0 else 'second'} of the two weights?")  # fmt: skip
    nibble = byte >> 4 if which == 0 else byte & 0xF
    explanation = (f"bitsandbytes puts the first weight in the high nibble: 0x{byte:02X} -> codes {byte >> 4} and "
                   f"{byte & 0xF}. This one is code {nibble}, value {code[nibble].item():.4f} x absmax {absmax:g} = "
                   f"{values[which].item():.6g}. (GGUF's 4-bit blocks do it the other way: weight j in the low "
                   "nibble of byte j, weight j + 16 in its high nibble.)")  # fmt: skip
    return Question("", "nf4", prompt, values[which].item(), explanation, "course/03_nf4.ipynb §4", rel_tol=0.005,
                    abs_tol=absmax / 1000, reference="reference_impl/nf4.py",
                    details=dict(byte=byte, absmax=absmax, which=which))  # fmt: skip


def dequantize_gguf_question(rng: random.Random) -> Question:
    qtype = rng.choice(["Q4_0", "Q4_1", "Q8_0"])
    d = np.float16(rng.randint(10, 600) / 10000)
    header = gguf.fp16_bytes(np.array([d], dtype=np.float32))[0].tolist()
    m = None
    if qtype == "Q4_1":
        m = np.float16(-rng.randint(10, 400) / 1000)
        header += gguf.fp16_bytes(np.array([m], dtype=np.float32))[0].tolist()
    n_code_bytes = 32 if qtype == "Q8_0" else 16
    codes = [rng.randint(0, 255) for _ in range(n_code_bytes)]
    block = np.array(header + codes, dtype=np.uint8)[None]
    j = rng.randint(0, 31)
    value = float(gguf.dequantize(block, qtype)[0, j])
    dump = " ".join(f"{b:02X}" for b in codes)
    if qtype == "Q8_0":
        layout = f"d = {float(d):.6g} (fp16), then 32 int8 codes (two's complement) in hex: {dump}"
        q = codes[j] - 256 if codes[j] > 127 else codes[j]
        how = f"byte {j} is 0x{codes[j]:02X} = {q} as int8; x = d q = {float(d):.6g} x {q} = {value:.6g}"
    else:
        layout = (f"d = {float(d):.6g} (fp16)" + (f", m = {float(m):.6g} (fp16)" if m is not None else "")
                  + f", then 16 bytes of 4-bit codes in hex: {dump}")  # fmt: skip
        byte = codes[j % 16]
        q = byte & 0xF if j < 16 else byte >> 4
        nibble = "low" if j < 16 else "high"
        rule = f"d (q - 8) = {float(d):.6g} x ({q} - 8)" if qtype == "Q4_0" else f"d q + m = {float(d):.6g} x {q} + ({float(m):.6g})"
        how = (f"weight {j} is the {nibble} nibble of byte {j % 16} (0x{byte:02X}): q = {q}; x = {rule} = {value:.6g}. "
               "Weights 0-15 sit in the low nibbles, 16-31 in the high ones")  # fmt: skip
    prompt = f"A GGUF {qtype} block of 32 weights holds {layout}.\nWhat is weight {j} (counting from 0)?"
    details = dict(qtype=qtype, d=float(d), m=None if m is None else float(m), codes=codes, j=j)
    return Question("", "gguf", prompt, value, how + ".", "course/09_gguf.ipynb §3", rel_tol=0.005,
                    abs_tol=float(d) / 100, reference="reference_impl/gguf.py", details=details)  # fmt: skip


# ---------------------------------------------------------------- bits per weight


def bits_group_question(rng: random.Random) -> Question:
    bits = rng.choice([2, 3, 4, 8])
    g = rng.choice([32, 64, 128, 256])
    zero_kind = rng.choice(["none", "code", "fp16"])
    zero_bits = {"none": 0, "code": bits, "fp16": 16}[zero_kind]
    fmt = f"int{bits}" if zero_kind == "none" else f"uint{bits}"
    answer = formats.bits_per_param(fmt, group_size=g, zero_bits=zero_bits)
    zero_text = {"none": "a symmetric grid (no zero point)", "code": f"a {bits}-bit integer zero point per group (GPTQ/AWQ checkpoints)",
                 "fp16": "an fp16 minimum per group (llama.cpp Q4_1 style)"}[zero_kind]  # fmt: skip
    prompt = (f"Weights are stored as {bits}-bit codes in groups of {g}, each group with an fp16 scale and "
              f"{zero_text}.\nHow many bits per weight, constants included?")  # fmt: skip
    explanation = f"b + (scale bits + zero bits) / g = {bits} + (16 + {zero_bits}) / {g} = {answer:.6g}."
    return Question("", "affine", prompt, answer, explanation, "course/01_affine.ipynb §4", unit="bits", rel_tol=0.002,
                    reference="reference_impl/formats.py", details=dict(bits=bits, group=g, zero_bits=zero_bits))  # fmt: skip


def bits_nf4_question(rng: random.Random) -> Question:
    blocksize = rng.choice(nf4.BLOCKSIZES[:5])
    double = rng.random() < 0.6
    answer = nf4.bits_per_weight(blocksize, double)
    setting = (f"with double quantization (QLoRA's: second-level blocks of {nf4.NESTED_BLOCKSIZE})" if double
               else "without double quantization")  # fmt: skip
    prompt = f"bitsandbytes NF4 in blocks of {blocksize}, {setting}.\nHow many bits per weight for a large tensor?"
    how = (f"4 + 8/{blocksize} + 32/({blocksize} x 256): an 8-bit absmax per block and an fp32 constant per 256 blocks"
           if double else f"4 + 32/{blocksize}: an fp32 absmax per block")  # fmt: skip
    explanation = f"{how} = {answer:.6g} (the one fp32 offset per tensor is negligible)."
    return Question("", "nf4", prompt, answer, explanation, "course/03_nf4.ipynb §4", unit="bits", rel_tol=0.002,
                    reference="reference_impl/nf4.py", details=dict(blocksize=blocksize, double=double))  # fmt: skip


# (count, bits, what) for one block: what llama.cpp stores, field by field
GGUF_LAYOUTS = {
    "Q4_0": [(1, 16, "fp16 scale"), (32, 4, "4-bit codes")],
    "Q4_1": [(1, 16, "fp16 scale"), (1, 16, "fp16 minimum"), (32, 4, "4-bit codes")],
    "Q5_0": [(1, 16, "fp16 scale"), (32, 5, "5-bit codes")],
    "Q5_1": [(1, 16, "fp16 scale"), (1, 16, "fp16 minimum"), (32, 5, "5-bit codes")],
    "Q8_0": [(1, 16, "fp16 scale"), (32, 8, "8-bit codes")],
    "Q4_K": [(1, 16, "fp16 super-block scale"), (1, 16, "fp16 super-block scale of the minimums"),
             (8, 6, "6-bit sub-block scales (one per 32 weights)"), (8, 6, "6-bit sub-block minimums"), (256, 4, "4-bit codes")],
    "Q5_K": [(1, 16, "fp16 super-block scale"), (1, 16, "fp16 super-block scale of the minimums"),
             (8, 6, "6-bit sub-block scales (one per 32 weights)"), (8, 6, "6-bit sub-block minimums"), (256, 5, "5-bit codes")],
    "Q6_K": [(1, 16, "fp16 super-block scale"), (16, 8, "8-bit sub-block scales (one per 16 weights)"), (256, 6, "6-bit codes")],
}  # fmt: skip


def bits_gguf_question(rng: random.Random) -> Question:
    qtype = rng.choice(sorted(GGUF_LAYOUTS))
    t = gguf.block_type(qtype)
    parts = ", ".join(f"{n} x {what}" if n > 1 else what for n, _, what in GGUF_LAYOUTS[qtype])
    prompt = f"A llama.cpp {qtype} block covers {t.block_size} weights and stores: {parts}.\nHow many bits per weight?"
    sums = " + ".join(f"{n} x {b}" if n > 1 else str(b) for n, b, _ in GGUF_LAYOUTS[qtype])
    explanation = (f"({sums}) bits / {t.block_size} weights = {8 * t.type_size} / {t.block_size} = {t.bits_per_weight:.6g}: "
                   f"{t.type_size} bytes per block.")  # fmt: skip
    if qtype in gguf.K_QUANTS:
        explanation += (" The sub-block scales are themselves quantized against the fp16 super-block scale: that is "
                        "how a K-quant affords a scale per 16 or 32 weights.")  # fmt: skip
    return Question("", "gguf", prompt, t.bits_per_weight, explanation, "course/09_gguf.ipynb §5", unit="bits",
                    rel_tol=0.002, reference="reference_impl/gguf.py", details=dict(qtype=qtype))  # fmt: skip


# ---------------------------------------------------------------- kernels: bandwidth and the roofline


def weight_formats() -> dict[str, float]:
    """Formats a weight-only kernel reads, with their bits per weight (constants included)."""
    return {
        "int4 with an fp16 scale and a 4-bit zero point per 128 weights (GPTQ/AWQ)": formats.bits_per_param("uint4", group_size=128, zero_bits=4),
        "int4 with an fp16 scale per 64 weights": formats.bits_per_param("int4", group_size=64),
        "int4 with an fp16 scale per 32 weights (GGUF Q4_0)": gguf.block_type("Q4_0").bits_per_weight,
        "NF4 with double quantization, blocks of 64 (QLoRA)": nf4.bits_per_weight(64, True),
        "GGUF Q4_K": gguf.block_type("Q4_K").bits_per_weight,
        "GGUF Q6_K": gguf.block_type("Q6_K").bits_per_weight,
        "int8 with an fp16 scale per 32 weights (GGUF Q8_0)": gguf.block_type("Q8_0").bits_per_weight,
        "int3 with an fp16 scale and a 3-bit zero point per 128 weights": formats.bits_per_param("uint3", group_size=128, zero_bits=3),
    }  # fmt: skip


def speedup_ceiling_question(rng: random.Random) -> Question:
    label, bits = rng.choice(sorted(weight_formats().items()))
    answer = roofline.speedup_ceiling(bits)
    prompt = (f"Decoding at batch 1, a linear layer's time is the time to read its weights. Stored as {label} instead "
              "of fp16, what is the best speedup a weight-only kernel can reach (activations neglected)?")  # fmt: skip
    explanation = (f"The ratio of bytes: 16 / {bits:.4g} bits = {answer:.4g}x. Only a ceiling: the kernel must hide "
                   "its unpacking behind the memory traffic. Published H100 numbers at 8192 x 8192, 4-bit g128: "
                   "torchao tinygemm 2.27x, Marlin 2.2x (ANCHORS); Marlin reaches 3.87x on an A10.")  # fmt: skip
    return Question("", "kernels", prompt, answer, explanation, "course/10_triton_kernels.ipynb §1", unit="x",
                    reference="reference_impl/roofline.py", details=dict(format=label))  # fmt: skip


LAYER_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]  # K x N, ANCHORS' H100 table


def gemv_time_question(rng: random.Random) -> Question:
    K, N = rng.choice(LAYER_SHAPES)
    choices = {"fp16": 16.0, **weight_formats()}
    label = rng.choice(["fp16", *sorted(weight_formats())[:4]])
    bits = choices[label]
    bandwidth = rng.choice([3.0e12, 3.35e12, 2.0e12, 0.9e12])
    seconds = roofline.matmul_seconds(1, N, K, bits, bandwidth, roofline.H100_FP16_DENSE_FLOPS)
    prompt = (f"y = x W^T with one token (x is 1 x {K}, fp16), W is {N} x {K} stored as {label}, y is fp16. The GPU "
              f"reads memory at {bandwidth / 1e12:g} TB/s. What is the shortest possible time of this product, "
              "in microseconds?")  # fmt: skip
    nbytes = roofline.matmul_bytes(1, N, K, bits)
    explanation = (f"Memory-bound: bytes = weights {N} x {K} x {bits:.4g} / 8 + x 2 x {K} + y 2 x {N} = "
                   f"{format_number(nbytes)} bytes; / {bandwidth / 1e12:g}e12 B/s = {seconds * 1e6:.4g} us. The "
                   f"{2 * N * K:,} flops would take {2 * N * K / roofline.H100_FP16_DENSE_FLOPS * 1e6:.3g} us on an "
                   "H100's tensor cores: arithmetic is not the limit at batch 1.")  # fmt: skip
    return Question("", "kernels", prompt, seconds * 1e6, explanation, "course/10_triton_kernels.ipynb §1", unit="us",
                    reference="reference_impl/roofline.py", details=dict(K=K, N=N, format=label, bandwidth=bandwidth))  # fmt: skip


# ---------------------------------------------------------------- KV cache


def kv_bytes_per_token_question(rng: random.Random) -> Question:
    if rng.random() < 0.5:
        config = rng.choice(list(kvcache.KNOWN_CONFIGS.values()))
    else:
        heads = rng.choice([16, 32, 64])
        config = kvcache.KVConfig("a model", rng.choice([16, 24, 28, 32, 48, 80]), rng.choice([1, 2, 4, 8, heads]),
                                  rng.choice([64, 128, 256]), heads)  # fmt: skip
    scheme = rng.choice(sorted(KV_STORAGE))
    context = rng.choice([1024, 4096, 32768])
    answer = kvcache.bytes_per_token(config, scheme, context)
    gqa = f"{config.query_heads} query heads share {config.kv_heads} KV heads" if config.query_heads else f"{config.kv_heads} KV heads"
    prompt = (f"{config.name}: {config.layers} layers, {gqa} of dimension {config.head_dim}. Its KV cache is "
              f"{KV_STORAGE[scheme]}.\nHow many bytes does one token of one sequence take in the cache "
              f"(at a context of {context:,} tokens)?")  # fmt: skip
    memory = kvcache.kv_cache_memory(config, scheme, context)
    explanation = (f"2 (K and V) x {config.layers} x {config.kv_heads} x {config.head_dim} = {config.elements_per_token:,} "
                   f"values per token; in {scheme}: {format_number(memory.codes / context)} bytes"
                   + (f", plus {format_number(memory.constants / context)} bytes of scales = {format_number(answer)} bytes"
                      if memory.constants else "")
                   + ". The query heads do not matter: only K/V heads are cached.")  # fmt: skip
    details = dict(layers=config.layers, kv_heads=config.kv_heads, head_dim=config.head_dim, scheme=scheme, context=context)
    return Question("", "kvcache", prompt, answer, explanation, "course/08_kv_cache.ipynb §1", unit="bytes",
                    rel_tol=0.005, reference="reference_impl/kvcache.py", details=details)  # fmt: skip


# ---------------------------------------------------------------- measured recipes: which loses less, and why


def recipe_settings(row: dict) -> dict | None:
    """The settings of a results row that the reasons below talk about, or None for a row no
    reason covers (those rows are never paired)."""
    method = row.get("method")
    if method in ("nf4", "fp4", "int4_absmax"):
        return {"family": "codebook", "format": method, "block": row["group_size"], "double_quant": bool(row.get("double_quant"))}
    if method not in ("rtn", "gptq", "awq", "w8a8", "llm_int8") or row.get("static_groups") or row.get("duo_scaling"):
        return None
    if method in ("w8a8", "llm_int8"):  # int8 weights per output channel, symmetric
        act = "token+outliers" if method == "llm_int8" else row["act_granularity"]
        return {"family": "int", "algorithm": "rtn", "bits": 8, "where": "channel", "grid": "sym", "act": act, "act_order": False}
    where = row["granularity"] if row["granularity"] != "group" else f"g{row['group_size']}"
    grid = "sym" if row["symmetric"] else ("asym" if row["zero_point"] == "integer" else "asym-float")
    return {"family": "int", "algorithm": method, "bits": row["bits"], "where": where, "grid": grid,
            "act": None, "act_order": bool(row.get("act_order"))}  # fmt: skip


FINENESS = {"tensor": 0, "channel": 1, "g128": 2, "g64": 3, "g32": 4}


def why(field: str, winner, loser) -> str | None:
    """The reason `winner` (a value of `field`) loses less than `loser`, or None where the course
    has no reason to give (such pairs are not asked)."""
    if field == "where" and FINENESS.get(winner, -1) > FINENESS.get(loser, 99):
        return ("smaller blocks each get their own scale, so a large weight sets the step only for its own block; "
                "the price is more constants per weight")  # fmt: skip
    if field == "block" and winner < loser:
        return "a smaller block's absmax is closer to its weights, so the code book's levels sit closer to them"
    if field == "bits" and winner > loser:
        return "each extra bit halves the step, so the rounding error's power falls by 4 (about 6 dB)"
    if field == "grid" and (winner, loser) == ("asym", "sym"):
        return ("the asymmetric grid spends every level on the group's own [min, max]; the symmetric one is centred "
                "on 0 and leaves levels unused on the side the group does not reach")  # fmt: skip
    if field == "grid" and winner == "asym-float":
        return ("SmolLM2's reference weights ARE Q4_1 blocks of 32 (fp16 scale and minimum), so this grid finds them "
                "again almost exactly: an artifact of the reference model, not a merit of the recipe")  # fmt: skip
    if field == "algorithm" and (winner, loser) == ("gptq", "rtn"):
        return ("on the same grid and storage, GPTQ picks each code with the calibration inputs' Hessian and moves the "
                "not-yet-quantized weights to cancel the output error; RTN rounds every weight on its own")  # fmt: skip
    if field == "algorithm" and (winner, loser) == ("awq", "rtn"):
        return ("on the same grid and storage, AWQ scales up the weights of the input channels with the largest "
                "activations before rounding (their inputs are divided by the same scale), so the errors the inputs "
                "amplify most shrink; RTN rounds every weight alike")  # fmt: skip
    if field == "act_order" and winner:
        return "act-order quantizes the loudest inputs first, while every other column is still free to absorb their error"
    if field == "act":
        if winner is None:
            return "weight-only: the activations stay in float, so only the weights are rounded"
        if (winner, loser) == ("token", "tensor"):
            return "a scale per token: a token with huge values sets only its own step, not every token's"
        if (winner, loser) == ("token+outliers", "token"):
            return ("LLM.int8() sends the input columns with |x| >= 6 through a float path, so the int8 scales of the "
                    "ordinary columns are no longer set by the outliers")  # fmt: skip
    if field == "format" and winner == "nf4":
        return ("NF4's levels are normal quantiles and match how block-scaled weights are spread; FP4 crowds its levels "
                "near 0 and INT4 spaces them evenly")  # fmt: skip
    return None


def misconception(field: str, loser) -> str:
    """A plausible wrong reason why the loser would lose less."""
    return {
        "where": "a larger block averages out the rounding errors of its weights",
        "block": "a larger block averages out the rounding errors of its weights",
        "bits": "fewer levels mean fewer rounding decisions, so less error accumulates",
        "grid": "a grid with an exact integer zero point represents the weights more faithfully",
        "algorithm": "round-to-nearest puts every weight on its nearest level, which no method can beat on the same grid",
        "act_order": "the natural order keeps each group's columns together, which loses less than any permutation",
        "act": "a scale computed over more values is better calibrated",
        "format": "evenly spaced or float levels cover the weights' wide dynamic range better",
    }[field]


def label_of(row: dict) -> str:
    from ..cli import (
        recipe_label,  # the CLI's wording of a results row, e.g. "int4 g64 asym"
    )

    if row["method"] in ("nf4", "fp4", "int4_absmax"):
        return f"{row.get('format', row['method'])}, block {row['group_size']}"
    return f"{row['method']} {recipe_label(row)}".strip()


POINTERS = {"baselines.json": "course/01_affine.ipynb §9", "nf4.json": "course/03_nf4.ipynb §3", "gptq.json": "course/04_gptq.ipynb §7",
            "awq.json": "course/05_awq.ipynb §6"}


@cache
def result_rows(results_dir: Path = RESULTS_DIR) -> tuple[dict, ...]:
    """Rows of the published (not fast-mode) results files that a pair question can use.

    Each row gets `source` (its file name). Files that are missing, unreadable or made in fast
    mode are skipped: a question must rest on the published measurement. A row that names
    another results file as its source (awq.json repeats gptq.json's rows) is that file's.
    """
    rows = []
    for path in sorted(Path(results_dir).glob("*.json")):
        if path.name.endswith(".fast.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("meta", {}).get("fast_mode", False):
            continue
        candidates = data.get("rows", []) if path.name != "nf4.json" else data.get("smollm2", [])
        for row in candidates if isinstance(candidates, list) else []:
            needed = ("method", "ppl", "ref_ppl", "kld", "eval_tokens", "bits_per_weight")
            copied = str(row.get("source", "")).endswith(".json") and row.get("source") != path.name
            if isinstance(row, dict) and all(k in row for k in needed) and not row.get("fast_mode", False) and not copied:
                rows.append({**row, "source": path.name})
    return tuple(rows)


@cache
def recipe_pairs(results_dir: Path = RESULTS_DIR) -> tuple[tuple[dict, dict, str, str], ...]:
    """(winner, loser, field, reason) for every pair of rows measured on the same held-out tokens
    that differ in exactly one setting, where the winner's KLD is at least 15% lower, its
    perplexity lower too, and `why` has a reason."""
    rows, seen = [], set()
    for r in result_rows(results_dir):
        settings = recipe_settings(r)
        key = (label_of(r), r["eval_tokens"], round(r["ref_ppl"], 6))  # gptq.json repeats baselines' RTN rows
        if settings is not None and key not in seen:
            seen.add(key)
            rows.append((r, settings))
    pairs = []
    for i, (a, sa) in enumerate(rows):
        for b, sb in rows[i + 1 :]:
            same_eval = (a["eval_tokens"], round(a["ref_ppl"], 6)) == (b["eval_tokens"], round(b["ref_ppl"], 6))
            if not same_eval or sa.keys() != sb.keys():
                continue
            differ = [k for k in sa if sa[k] != sb[k]]
            if len(differ) != 1:
                continue
            win, lose = (a, b) if a["kld"] < b["kld"] else (b, a)
            s_win, s_lose = (sa, sb) if win is a else (sb, sa)
            reason = why(differ[0], s_win[differ[0]], s_lose[differ[0]])
            if reason and lose["kld"] >= 1.15 * win["kld"] and win["ppl"] < lose["ppl"]:
                pairs.append((win, lose, differ[0], reason))
    return tuple(pairs)


def recipe_pair_question(rng: random.Random, results_dir: Path = RESULTS_DIR) -> Question:
    pairs = recipe_pairs(results_dir)
    if not pairs:
        raise LookupError(f"no comparable recipe pairs in {results_dir}: run benchmarks/baselines.py first")
    win, lose, field, reason = rng.choice(pairs)
    first, second = (win, lose) if rng.random() < 0.5 else (lose, win)
    # a reason about a setting both recipes share (never the field itself, nor its twin "block")
    other = rng.choice([f for f in ("bits", "where", "act", "algorithm") if f != field and not (f == "where" and field == "block")])
    other_reason = {"bits": why("bits", 8, 4), "where": why("where", "g32", "tensor"),
                    "act": why("act", "token", "tensor"), "algorithm": why("algorithm", "gptq", "rtn")}[other]  # fmt: skip
    options = [
        (f"{label_of(win)}: {reason}", True),
        (f"{label_of(lose)}: {misconception(field, lose)}", False),
        (f"{label_of(win)}: {other_reason}", False),
        ("they lose about the same: this setting hardly matters on this model", False),
    ]
    rng.shuffle(options)
    choices = tuple(text for text, _ in options)
    answer = next(i for i, (_, right) in enumerate(options) if right)

    def measured(row):
        return (f"{label_of(row)}: KLD {row['kld']:.4g}, perplexity {row['ppl']:.3f} ({100 * (row['ppl'] / row['ref_ppl'] - 1):+.1f}%), "
                f"{row['bits_per_weight']:.4g} bits per weight")  # fmt: skip

    sources = list(dict.fromkeys((win["source"], lose["source"])))
    prompt = (f"Two recipes, each applied to all decoder linear layers of SmolLM2-135M and scored on the same "
              f"{win['eval_tokens']:,} held-out tokens ({', '.join(sources)}):\n  A. {label_of(first)}\n  B. {label_of(second)}\n"
              "Which changes the model less (lower KL divergence from the reference), and why?")  # fmt: skip
    explanation = (f"Measured: {measured(win)}; {measured(lose)}. They differ only in {field.replace('_', '-')}: "
                   f"{reason}. The third choice names a setting the two share, so it cannot explain the difference.")  # fmt: skip
    pointer = POINTERS.get(win["source"], "course/01_affine.ipynb §9")
    if win["source"] == "baselines.json" and field == "act":
        pointer = "course/02_outliers.ipynb §5"
    details = {"field": field, "winner": label_of(win), "loser": label_of(lose), "source": win["source"], "loser_source": lose["source"]}
    return Question("", "recipes", prompt, answer, explanation, pointer, choices=choices,
                    reference=", ".join(f"benchmarks/results/{name}" for name in sources), details=details)  # fmt: skip


GENERATORS = {
    g.name: g
    for g in [
        Generator("memory", "memory", memory_question),
        Generator("qlora_memory", "qlora", qlora_memory_question),
        Generator("scale_zero_point", "affine", scale_zero_point_question),
        Generator("quantize_code", "affine", quantize_code_question),
        Generator("dequantize_affine", "affine", dequantize_affine_question),
        Generator("dequantize_nf4", "nf4", dequantize_nf4_question),
        Generator("dequantize_gguf", "gguf", dequantize_gguf_question),
        Generator("bits_group", "affine", bits_group_question),
        Generator("bits_nf4", "nf4", bits_nf4_question),
        Generator("bits_gguf", "gguf", bits_gguf_question),
        Generator("speedup_ceiling", "kernels", speedup_ceiling_question),
        Generator("gemv_time", "kernels", gemv_time_question),
        Generator("kv_bytes_per_token", "kvcache", kv_bytes_per_token_question),
        Generator("recipe_pair", "recipes", recipe_pair_question, lambda: bool(recipe_pairs())),
    ]
}


def generate(name: str, seed: int) -> Question:
    """The question generator `name` makes for `seed`; the same (name, seed) always gives the same question."""
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}; generators are: {', '.join(GENERATORS)}")
    rng = random.Random(f"{name}:{seed}")
    question = GENERATORS[name].make(rng)
    return dataclasses.replace(question, qid=f"gen:{name}:{seed}", details={**question.details, "generator": name, "seed": seed})
