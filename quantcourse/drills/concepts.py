"""The concept bank: interview questions about the ideas, in the course's own words.

Every concept is data: a prompt, choices (the first is the right one; they are shuffled when
asked) or a numeric answer, an explanation, the lecture section that teaches it, and, where a
commissioning document (the "seeds" the course was written against) states it wrongly or too
simply, a note that says what it claimed and what is right.

Numbers are never typed in. Prompts, choices and explanations are templates whose `{fields}` are
filled from `facts()`: values the package computes (bits per weight, format limits, KV-cache and
QLoRA memory) and measurements read from the published results in benchmarks/results/. A numeric
concept names the fact that is its answer. A concept whose facts are missing (a results file not
generated yet) is left out of the drill rather than asked with a made-up number. Figures from
papers are quoted as such, with their source.

Lessons 05 (AWQ), 06 (SmoothQuant), 08 (KV cache) and 09 (GGUF) have no lecture notebook yet:
their concepts point to the lecture section that already touches the idea and name the reference
module that holds the details.
"""

import json
import math
import random
import string
from dataclasses import dataclass
from functools import cache

from .generators import RESULTS_DIR
from .questions import Question


@dataclass(frozen=True)
class Concept:
    """One concept question. choices[0] is the right answer; an empty `choices` makes it numeric,
    with the value of facts()[answer_fact] expected in `unit`."""

    cid: str
    topic: str
    prompt: str
    explanation: str
    pointer: str
    choices: tuple[str, ...] = ()
    answer_fact: str = ""
    unit: str = ""
    rel_tol: float = 0.01
    reference: str = ""
    seed_note: str = ""

    def fields(self) -> set[str]:
        """The facts its texts need."""
        texts = [self.prompt, self.explanation, self.seed_note, *self.choices]
        return {name for text in texts for _, name, _, _ in string.Formatter().parse(text) if name} | (
            {self.answer_fact} if self.answer_fact else set()
        )

    def available(self, known: dict) -> bool:
        return self.fields() <= known.keys()

    def question(self, rng: random.Random, known: dict | None = None) -> Question:
        """The concept as a drill question, its choices shuffled by rng. KeyError if a fact is missing."""
        known = facts() if known is None else known
        missing = self.fields() - known.keys()
        if missing:
            raise KeyError(f"concept {self.cid} needs facts that are not available: {', '.join(sorted(missing))}")
        fill = lambda text: text.format_map(known)
        choices, answer = (), known.get(self.answer_fact)
        if self.choices:
            order = list(range(len(self.choices)))
            rng.shuffle(order)
            choices, answer = tuple(fill(self.choices[i]) for i in order), order.index(0)
        return Question(f"concept:{self.cid}", self.topic, fill(self.prompt), answer, fill(self.explanation), self.pointer,
                        choices=choices, unit=self.unit, rel_tol=self.rel_tol, reference=self.reference,
                        seed_note=fill(self.seed_note))  # fmt: skip


# ---------------------------------------------------------------- facts: every number the bank quotes


def _results(name: str) -> dict | None:
    try:
        data = json.loads((RESULTS_DIR / name).read_text())
    except (OSError, ValueError):
        return None
    return None if not isinstance(data, dict) or data.get("meta", {}).get("fast_mode") else data


def _row(rows: list[dict], **settings) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in settings.items())), None)


def _measured_facts() -> dict:
    """Facts read from benchmarks/results/*.json (absent files give no facts)."""
    out = {}
    baselines = _results("baselines.json")
    if baselines:
        rows = baselines["rows"]
        picks = {
            "int8_tensor": dict(method="rtn", bits=8, granularity="tensor"),
            "int8_channel": dict(method="rtn", bits=8, granularity="channel"),
            "int4_channel": dict(method="rtn", bits=4, granularity="channel", symmetric=True),
            "int4_g64_sym": dict(method="rtn", bits=4, group_size=64, symmetric=True),
            "int4_g64_asym": dict(method="rtn", bits=4, group_size=64, symmetric=False),
            "int4_g32_asym": dict(method="rtn", bits=4, group_size=32, symmetric=False, zero_point="integer"),
            "int4_g32_float": dict(method="rtn", bits=4, group_size=32, zero_point="float"),
            "int3_g64_asym": dict(method="rtn", bits=3, group_size=64, symmetric=False),
            "w8a8_tensor": dict(method="w8a8", act_granularity="tensor"),
            "w8a8_token": dict(method="w8a8", act_granularity="token"),
            "llm_int8": dict(method="llm_int8"),
        }
        for key, settings in picks.items():
            row = _row(rows, **settings)
            if row:
                out[f"{key}_dppl"] = 100 * (row["ppl"] / row["ref_ppl"] - 1)
                out[f"{key}_kld"] = row["kld"]
                out["ref_ppl"] = row["ref_ppl"]
    nf4_results = _results("nf4.json")
    if nf4_results:
        minilm = nf4_results.get("minilm", [])
        for method in ("fp4", "int4_absmax"):
            row = _row(minilm, method=method, block=64)
            if row:
                out[f"minilm_{method}_mse_ratio"] = row["mse_vs_nf4"]
        for key, settings in {"nf4_g64": dict(method="nf4", group_size=64, double_quant=False),
                              "nf4dq_g64": dict(method="nf4", group_size=64, double_quant=True),
                              "fp4_g64": dict(method="fp4", group_size=64),
                              "int4_absmax_g64": dict(method="int4_absmax", group_size=64)}.items():  # fmt: skip
            row = _row(nf4_results.get("smollm2", []), **settings)
            if row:
                out[f"{key}_dppl"] = 100 * (row["ppl"] / row["ref_ppl"] - 1)
                out[f"{key}_kld"] = row["kld"]
    per_call = _results("per_call.json")
    if per_call:
        for key, kernel in (("fp16", "fp16"), ("bnb", "nf4 (bitsandbytes)"), ("nf4_layer", "nf4 (TritonLinear4bit)")):
            row = _row(per_call["rows"], kernel=kernel, K=4096, N=4096)
            if row:
                out[f"{key}_call_us"], out[f"{key}_host_us"] = row["per_call_us"], row["host_us"]
    kernels = _results("kernels.json")
    if kernels:
        for key, kernel in (("fp16", "fp16"), ("bnb", "nf4 (bitsandbytes)")):
            row = _row(kernels["rows"], kernel=kernel, K=4096, N=4096, M=1)
            if row:
                out[f"{key}_gpu_us"] = row["us"]
        row = _row(kernels["rows"], kernel="w4a16", K=8192, N=28672, M=1)
        if row:
            out["w4a16_big_speedup"] = row["speedup"]
    return out


@cache
def facts() -> dict:
    """Every number the concept bank may quote, computed by the package or read from results."""
    from ..reference_impl import formats as F
    from ..reference_impl import gguf, kvcache, nf4, roofline
    from ..reference_impl.gguf_file import shape_fallback
    from ..reference_impl.outliers import LLM_INT8_THRESHOLD
    from ..reference_impl.qlora import LLAMA_LINEARS, MODEL_SHAPES, memory_plan
    from ..reference_impl.qlora_analysis import SHAPES, plan_setups

    llama3 = kvcache.KNOWN_CONFIGS["llama-3-8b"]
    n8b = MODEL_SHAPES["Llama-3-8B"].parameters()
    n70 = MODEL_SHAPES["Llama-2-70B"].parameters()
    kv_token = kvcache.bytes_per_token(llama3, "fp16", 1)
    bf16_8b = F.memory_bytes(n8b, "bf16")
    plans_70b = plan_setups(SHAPES["Llama-2-70B"])
    int4_g128 = F.bits_per_param("uint4", group_size=128, zero_bits=4)
    full_7b = memory_plan(SHAPES["Llama-2-7B"], "full", weight_bytes=2, state_bytes=4, master_weights=True)
    ridge = roofline.ridge_intensity(roofline.H100_HBM_BYTES_PER_S, roofline.H100_FP16_DENSE_FLOPS)
    return {
        "fp16_max": F.FP16.max_finite, "bf16_max": F.BF16.max_finite,
        "e4m3_max": F.FP8_E4M3.max_finite, "e5m2_max": F.FP8_E5M2.max_finite,
        "fp16_mantissa": F.FP16.mantissa_bits, "bf16_mantissa": F.BF16.mantissa_bits,
        "fp16_exponent": F.FP16.exponent_bits, "bf16_exponent": F.BF16.exponent_bits,
        "gib_of_140gb": 140e9 / 2**30,
        "n70b_bf16_gb": F.memory_bytes(n70, "bf16") / 1e9,
        "llama3_kv_token": kv_token, "llama3_kv_token_kib": kv_token / 2**10,
        "llama3_kv_2m_gb": kvcache.kv_cache_memory(llama3, "fp16", 2_000_000).total / 1e9,
        "llama3_kv_2m_fp8_gb": kvcache.kv_cache_memory(llama3, "fp8_e4m3", 2_000_000).total / 1e9,
        "llama3_kv_2m_kivi2_gb": kvcache.kv_cache_memory(llama3, "kivi2", 2_000_000).total / 1e9,
        "llama3_gqa": llama3.query_heads // llama3.kv_heads,
        "llama3_bf16_gb": bf16_8b / 1e9,
        "llama3_kv_equals_weights_tokens": bf16_8b / kv_token,
        "int4_g64_bits": F.bits_per_param("int4", group_size=64),
        "int4_g128_bits": int4_g128,
        "nf4_bits": nf4.bits_per_weight(64, False), "nf4dq_bits": nf4.bits_per_weight(64, True),
        "dq_saving_65b_gb": 65e9 * (nf4.bits_per_weight(64, False) - nf4.bits_per_weight(64, True)) / 8 / 1e9,
        "nf4_offset": F.NF4_OFFSET,
        "db_per_bit": 20 * math.log10(2),
        "llm_int8_threshold": LLM_INT8_THRESHOLD,
        "qlora70_gib": plans_70b["QLoRA"].total / 2**30, "lora70_gib": plans_70b["LoRA"].total / 2**30,
        "full70_gib": plans_70b["full fine-tuning"].total / 2**30,
        "qlora70_left_gib": 48 - plans_70b["QLoRA"].total / 2**30,  # a "48 GB" card holds 48 GiB
        "full_bytes_per_param": full_7b.total / SHAPES["Llama-2-7B"].parameters(),
        "seven_linears": len(LLAMA_LINEARS),
        "ceiling_int4_g128": roofline.speedup_ceiling(int4_g128),
        "ceiling_int4_g128_sym": roofline.speedup_ceiling(F.bits_per_param("int4", group_size=128)),
        "intensity_fp16_m1": roofline.arithmetic_intensity(1, 8192, 8192, 16),
        "intensity_int4_m1": roofline.arithmetic_intensity(1, 8192, 8192, int4_g128),
        "h100_ridge": ridge,
        "q4_k_bits": gguf.block_type("Q4_K").bits_per_weight, "q6_k_bits": gguf.block_type("Q6_K").bits_per_weight,
        "q8_0_bits": gguf.block_type("Q8_0").bits_per_weight, "q4_0_bits": gguf.block_type("Q4_0").bits_per_weight,
        "smollm2_hidden": MODEL_SHAPES["SmolLM2-135M"].hidden,
        "smollm2_q4k_fallback": shape_fallback("Q4_K", MODEL_SHAPES["SmolLM2-135M"].hidden),
        "bitnet_bits": math.log2(3),
        **_measured_facts(),
    }  # fmt: skip


# ---------------------------------------------------------------- the bank

L00, L01, L02, L03 = "course/00_welcome.ipynb", "course/01_affine.ipynb", "course/02_outliers.ipynb", "course/03_nf4.ipynb"
L04, L07, L10 = "course/04_gptq.ipynb", "course/07_qlora.ipynb", "course/10_triton_kernels.ipynb"
L05, L06 = "course/05_awq.ipynb", "course/06_smoothquant.ipynb"
L08, L09 = "course/08_kv_cache.ipynb", "course/09_gguf.ipynb"

CONCEPTS: tuple[Concept, ...] = (
    # ------------------------------------------------ questions the seed documents ask
    Concept(
        "nf4-vs-fp4", "nf4",
        "QLoRA stores its frozen base model in NF4, not in a 4-bit float (FP4). Which reason survives measurement?",
        "NF4's 16 values are quantiles of a normal distribution. Weights divided by their block's absmax are close "
        "to normal, so they use NF4's levels far more evenly than FP4's, whose values crowd near 0 and leave wide gaps "
        "towards +-1. Same 4 bits, same absmax per block: on MiniLM's genuine fp32 weights FP4's error is "
        "{minilm_fp4_mse_ratio:.2f} times NF4's (INT4 absmax {minilm_int4_absmax_mse_ratio:.2f} times), and on SmolLM2 "
        "NF4 raises perplexity by {nf4_g64_dppl:.1f}% against FP4's {fp4_g64_dppl:.1f}%. The QLoRA paper reports the "
        "same order (mean Pile-CC perplexity over 125M-13B models: Int4 34.34, FP4 31.07, NF4 + double quant 27.41).",
        f"{L03} §3",
        choices=(
            ("after absmax scaling, block-scaled weights are close to normal, and NF4's levels (normal quantiles) are "
            "used more evenly than FP4's, which bunch near 0: lower error at the same storage"),
            "NF4 is the code book with the least mean squared error for normal weights",
            "NF4 stores fewer constants per block than FP4, so it costs fewer bits per weight",
            "NF4 has no exact zero, so small weights are not all rounded to the same level",
        ),
        reference="reference_impl/nf4.py, reference_impl/nf4_analysis.py",
        seed_note="A widely shared model answer says NF4 is built so that every bin holds exactly the same share of normal "
        "values and that this gives much better accuracy than 4-bit integers. Even for ideal normal data the cells "
        "end at midpoints between quantiles, so the shares are only close to equal; on real blocks of 64 the outer "
        "codes are used less than the inner ones; equal use is not least error (a Lloyd-Max table fitted to the "
        "weights has a lower MSE, lecture 03 §2); and the question was about FP4, not integers.",
    ),
    Concept(
        "nf4-how", "nf4",
        "How does bitsandbytes quantize a weight tensor to NF4?",
        "The table: 8 positive and 7 negative normal quantiles (probabilities from 0.5 to {nf4_offset:.7f}) plus an "
        "exact 0, divided by the largest so it spans [-1, 1]. Each block of 64 consecutive weights of the flattened "
        "tensor is divided by its absmax, every value is replaced by the index of the nearest table value, and two "
        "indices are packed per byte (first weight in the high nibble). Stored: the codes and one absmax per block "
        "({nf4_bits:g} bits per weight), or with double quantization an 8-bit absmax ({nf4dq_bits:.3f} bits).",
        f"{L03} §2",
        choices=(
            ("blocks of 64 are divided by their absmax and each value is rounded to the nearest of 16 fixed values "
            "built from normal quantiles; the 4-bit index and one absmax per block are stored"),
            "each tensor gets one scale and 16 evenly spaced levels fitted to its standard deviation",
            "the weights are converted to a float format with 2 exponent bits and 1 mantissa bit",
            "the 16 values are fitted to each tensor by k-means and stored with it",
        ),
        reference="reference_impl/nf4.py",
        seed_note="Prep notes call NF4 'information-theoretically optimal' without saying for what: it makes the 16 codes "
        "nearly equally used for normal data (maximal entropy), which is not the same as the least error.",
    ),
    Concept(
        "awq-vs-gptq", "awq",
        "How do AWQ and GPTQ differ?",
        "Both are post-training methods that calibrate on activations and end with every weight on the same kind of "
        "4-bit grid (a scale and zero point per group); neither keeps weights in higher precision. GPTQ minimizes each "
        "layer's output error ||XW^T - XW_hat^T||^2: it rounds one input column at a time and updates the columns not "
        "yet rounded to cancel the error, using H = 2X^T X/n. AWQ multiplies each input channel's weights by "
        "s = mean|x|^r (r searched on a grid of 20 values against the block's output error), rounds, and folds 1/s into "
        "the previous operation, so salient channels get a finer effective grid. The two can be combined.",
        f"{L05} §6",
        choices=(
            ("both calibrate on activations and store every weight on one 4-bit grid; GPTQ corrects rounding errors "
            "by updating the remaining weights with the inputs' Hessian, AWQ rescales salient input channels before "
            "rounding"),
            "GPTQ minimizes the weights' own squared error and ignores activations; AWQ is the activation-aware one",
            "AWQ keeps about 1% of the weights in fp16 and quantizes the rest; GPTQ quantizes all of them",
            "GPTQ needs no calibration data; AWQ needs a calibration set",
        ),
        reference="reference_impl/gptq.py, reference_impl/awq.py",
        seed_note="Prep notes say GPTQ minimizes the weights' mean squared error and keeps critical outlier weights in "
        "higher precision, and that AWQ keeps the ~1% salient weights in higher precision. Lecture 04 §1 measures "
        "GPTQ's weights further from the originals than RTN's (its objective is the layer output); AWQ's 1% fp16 "
        "experiment is its paper's motivation, and the method replaces it with per-channel scaling so that nothing is "
        "mixed precision. 'AWQ beats GPTQ' holds in the AWQ paper's Llama-2-7B g128 table (INT4 5.60 against 5.69, "
        "INT3 6.24 against 6.43 WikiText-2 perplexity) but is not a law.",
    ),
    Concept(
        "gptq-awq-gguf", "production",
        "GPTQ, AWQ, GGUF: what is each, and what decides between them?",
        "GPTQ and AWQ are algorithms: they decide which grid point each weight gets, and their checkpoints (int4 codes, "
        "fp16 scales, zero points per group) are served by GPU kernels (Marlin, ExLlama, vLLM's). GGUF is llama.cpp's "
        "file format with its own block types (Q4_0, Q4_K, Q6_K, ... mixed per tensor by file types such as Q4_K_M); "
        "llama.cpp runs it on CPUs, Apple GPUs and CUDA GPUs, with layers split between CPU and GPU when memory is "
        "short. So the choice is first a choice of runtime: a GPU serving stack with batching, or llama.cpp on "
        "whatever hardware is at hand; then the bits that fit. The course's own SmolLM2 ships as a GGUF file (Q4_1).",
        f"{L00} §6",
        choices=(
            ("GPTQ and AWQ are quantization algorithms whose int4 checkpoints GPU serving kernels read; GGUF is "
            "llama.cpp's file format with its own block types, for llama.cpp on CPU and GPU; pick the runtime first"),
            "GGUF is a CPU-only quantization algorithm; GPTQ and AWQ are GPU-only file formats",
            "GGUF always holds 4-bit weights and GPTQ always 8-bit ones",
            "all three are the same int4 format under different names",
        ),
        reference="reference_impl/gguf.py, reference_impl/gguf_file.py, reference_impl/gptq.py",
        seed_note="A prep note lists GGUF as a 'CPU-optimized' post-training method beside GPTQ and AWQ, and another "
        "calls it slower than GPU formats: GGUF is a container and a family of block formats, not an algorithm "
        "(its K-quants do search their scales, and llama.cpp can weight that search with an importance matrix), "
        "and llama.cpp runs it on GPUs too.",
    ),
    Concept(
        "quality", "production",
        "On the course's SmolLM2-135M, with plain round-to-nearest, which statement matches the measurements?",
        "Measured on held-out text (benchmarks/results/baselines.json), perplexity change against the reference: "
        "int8 per channel {int8_channel_dppl:+.2f}%, int8 per tensor {int8_tensor_dppl:+.1f}%, int4 per channel "
        "{int4_channel_dppl:+.1f}%, int4 in asymmetric groups of 64 {int4_g64_asym_dppl:+.1f}% and of 32 "
        "{int4_g32_asym_dppl:+.1f}%, int3 g64 asymmetric {int3_g64_asym_dppl:+.0f}%. Quality degrades with fewer bits, "
        "coarser granularity and smaller models; 8 bits per channel is close to free, 4 bits needs groups and a "
        "better algorithm (GPTQ, AWQ), 3 bits collapses without one. A 135M model is fragile: the GPTQ paper's "
        "OPT-125M goes from 27.65 (fp16) to 37.28 with 4-bit RTN, larger models lose far less.",
        f"{L01} §9",
        choices=(
            ("int8 per channel is nearly lossless, 4 bits costs noticeably (less with small groups and an asymmetric "
            "grid), and 3 bits collapses without a better algorithm than rounding"),
            "every bit removed costs about the same amount of perplexity",
            "8 bits is lossless whatever the granularity",
            "4-bit quantization costs 1-2% of quality on any model",
        ),
        reference="benchmarks/results/baselines.md",
        seed_note="Prep notes put 4-bit NF4 at a 1-2% quality loss and INT8 at 'minimal loss' with no condition. On this "
        "135M model NF4 (block 64) costs {nf4_g64_dppl:+.1f}% perplexity and int8 per tensor {int8_tensor_dppl:+.1f}%: "
        "the loss depends on model size, granularity and method, so a single percentage is not an answer.",
    ),
    Concept(
        "qlora", "qlora",
        "What is QLoRA?",
        "The base model is frozen in NF4 with double quantization (0.516 bytes per linear weight); each 4-bit weight "
        "is dequantized to bf16 right before its matmul and dropped after; LoRA adapters (A, B, with B = 0 at the "
        "start) on every linear layer are the only trained parameters; paged optimizers absorb memory spikes. "
        "Gradients flow through the frozen layers to their inputs (the adapters below need them) but the stored "
        "weights get no gradient and no optimizer state.",
        f"{L07} §1",
        choices=(
            ("a frozen NF4 base (double quantization), dequantized to bf16 for each matmul, with trainable LoRA "
            "adapters on all linear layers; only the adapters get gradients and optimizer states"),
            "LoRA whose adapters are quantized to 4 bits so that they train faster",
            "full fine-tuning of a 4-bit model with straight-through gradients into its codes",
            "the base dequantized once to bf16 and kept in memory during training, the adapters in 4 bits",
        ),
        reference="reference_impl/qlora.py",
        seed_note="A prep note says QLoRA lets a 70B model be fine-tuned on one 48 GB GPU. The paper's claim is a 65B model. "
        "The course's plan for Llama-2-70B (r = 64 on all seven linears, fp32 adapters, 32-bit AdamW) is "
        "{qlora70_gib:.1f} GiB before any activation, leaving about {qlora70_left_gib:.1f} GiB of a 48 GB (48 GiB) card: "
        "feasible only with gradient checkpointing and short sequences.",
    ),
    Concept(
        "production-level", "production",
        "How would you choose the quantization level for a production model?",
        "Budget first: weights in each candidate format plus the KV cache at the target context and batch, against "
        "the GPU's memory. Then measure quality on your own task and against the unquantized model (KL divergence and "
        "top-1 agreement catch what an average perplexity hides), and speed with the kernels you will serve with, at "
        "your batch size: weight-only 4-bit speeds up memory-bound decoding (ceiling {ceiling_int4_g128:.2f}x for int4 "
        "g128), but large batches are compute-bound and gain from W8A8 or FP8 instead. Keep the highest-quality option "
        "that meets both budgets; try GPTQ/AWQ before giving up on 4 bits, and keep sensitive tensors (embedding, "
        "output head) in more bits.",
        f"{L10} §1",
        choices=(
            ("fit weights plus KV cache in memory, then measure task quality against the unquantized model and speed "
            "with the serving kernels at the real batch size; keep the best option that meets both"),
            "use 4 bits everywhere: the quality loss is always 1-2%",
            "use the fewest bits the runtime supports and fix the quality later with QAT",
            "use 8 bits, because lower precision always makes matrix multiplication faster",
        ),
        reference="reference_impl/roofline.py",
        seed_note="A prep note says lower precision means faster matrix multiplication. Weight-only formats speed up only "
        "memory-bound decoding, and only when the kernel and its launches keep up: called from Python one layer at a "
        "time at batch 1 on an H100, bitsandbytes' NF4 matmul took {bnb_call_us:.0f} us per call for a 4096 x 4096 "
        "layer against fp16's {fp16_call_us:.0f} us; at large batch the bytes saved no longer matter at all.",
    ),
    Concept(
        "ptq-vs-qat", "production",
        "Post-training quantization (PTQ) or quantization-aware training (QAT): what are the trade-offs?",
        "PTQ quantizes a trained model directly: round-to-nearest needs no data at all, GPTQ/AWQ a few hundred "
        "calibration sequences; minutes to hours (Llama-3-8B on an A100: RTN about a minute, GPTQ about half an "
        "hour). QAT puts fake quantization (quantize, dequantize) in the forward pass and trains through it with a "
        "straight-through gradient, so the weights adapt to the grid: it needs a training loop, data and compute, and "
        "pays mostly at low bit widths where PTQ loses much. It usually fine-tunes an already trained model rather "
        "than training from scratch.",
        f"{L01} §9",
        choices=(
            ("PTQ is cheap and needs little or no data but loses more at low bits; QAT trains through fake "
            "quantization so the weights adapt, at the cost of a training loop with data"),
            "QAT needs no data, PTQ needs the full training set",
            "PTQ always needs calibration data, while QAT works from the weights alone",
            "QAT means training the quantized model from scratch",
        ),
        seed_note="Prep notes say PTQ requires calibration (weight-only round-to-nearest needs none), that QAT requires a "
        "full training run (it usually fine-tunes), that QAT is mandatory below 3B parameters (int8 per-channel PTQ "
        "costs SmolLM2-135M {int8_channel_dppl:+.2f}% perplexity), and describe fake quantization to 8 bits as if "
        "that were the only width (QAT is used at 4 bits and below, where it matters most).",
    ),
    Concept(
        "bf16-vs-fp16", "formats",
        "bf16 and fp16 are both 16 bits. How do they differ, and why does training prefer bf16?",
        "bf16 keeps float32's {bf16_exponent} exponent bits (largest value {bf16_max:.3g}) and only {bf16_mantissa} "
        "mantissa bits; fp16 has {fp16_exponent} exponent bits (largest {fp16_max:g}) and {fp16_mantissa} mantissa "
        "bits. bf16 trades precision for range: small gradients do not underflow to 0 and large activations do not "
        "overflow, so training needs no loss scaling (fp16 training multiplies the loss to keep small gradients "
        "representable); fp16 is more precise inside its range.",
        f"{L00} §2",
        choices=(
            ("bf16 has float32's exponent range and fewer mantissa bits; fp16 is more precise but its range ends at "
            "{fp16_max:g} and small gradients underflow, so fp16 training needs loss scaling and bf16 does not"),
            "bf16 has more mantissa bits than fp16, so it is more precise",
            "they have the same range; bf16 is simply faster on every GPU",
            "fp16 has the larger range, bf16 the better precision",
        ),
        reference="reference_impl/formats.py",
        seed_note="A prep note says FP8 gives int8's speed with fp16's dynamic range: e4m3 stops at {e4m3_max:g} and e5m2 "
        "at {e5m2_max:g}, against fp16's {fp16_max:g}; only e5m2 comes near fp16's range, and both have far fewer "
        "mantissa bits.",
    ),
    Concept(
        "kv-2m-tokens", "kvcache",
        "Llama-3-8B (32 layers, 8 KV heads of dimension 128) holds a KV cache of 2,000,000 tokens in bf16. How many GB "
        "(10^9 bytes) is that?",
        "2 x 32 x 8 x 128 = 65,536 values per token, 2 bytes each: {llama3_kv_token:,.0f} bytes per token; x 2M tokens "
        "= {llama3_kv_2m_gb:.0f} GB. An fp8 cache halves it ({llama3_kv_2m_fp8_gb:.0f} GB); even KIVI's 2-bit cache "
        "is {llama3_kv_2m_kivi2_gb:.0f} GB.",
        f"{L08} §1",
        answer_fact="llama3_kv_2m_gb", unit="GB", rel_tol=0.02,
        reference="reference_impl/kvcache.py",
        seed_note="A prep note puts this at about 32 GB in bf16 and 8-16 GB in fp8 or int4: {llama3_kv_2m_gb:.0f} GB and "
        "{llama3_kv_2m_fp8_gb:.0f} GB are the counts. Another credits an fp8 cache with twice the maximum context: "
        "it doubles the tokens that fit in the memory left for the cache, which is not the context a model supports.",
    ),
    # ------------------------------------------------ number formats and memory (lesson 00)
    Concept(
        "e4m3-max", "formats", "What is the largest finite value of fp8 E4M3 (OCP e4m3fn)?",
        "{e4m3_max:g} = 2^8 x 1.75: e4m3fn has no infinities, and only S.1111.111 is NaN, so the top binade holds "
        "numbers. AMD's e4m3fnuz variant stops at 240.",
        f"{L00} §2", answer_fact="e4m3_max", rel_tol=0.0, reference="reference_impl/formats.py",
    ),
    Concept(
        "e4m3-why-448", "formats",
        "With 4 exponent bits and bias 7, an IEEE-style format would top out at 240. How does e4m3fn reach 448?",
        "e4m3fn (finite, NaN) drops infinities: only the all-ones pattern S.1111.111 is NaN, so the exponent field "
        "1111 holds ordinary numbers up to 1.75 x 2^8 = {e4m3_max:g}.",
        f"{L00} §2",
        choices=(
            "it has no infinities: only S.1111.111 is NaN, so the top exponent field holds numbers",
            "it uses a bias of 3 instead of 7",
            "it stores an extra hidden exponent bit",
            "448 is reached only with a per-tensor scale",
        ),
    ),
    Concept(
        "gb-vs-gib", "formats", "A model needs 140 GB (10^9 bytes). How many GiB (2^30 bytes) is that?",
        "140e9 / 2^30 = {gib_of_140gb:.1f} GiB. nvidia-smi and PyTorch report GiB; model sizes are usually written in "
        "GB: a 7% difference.",
        f"{L00} §3", answer_fact="gib_of_140gb", unit="GiB", rel_tol=0.005,
    ),
    Concept(
        "70b-140gb", "memory", "'A 70B model in 16-bit needs 140 GB.' What does this leave out?",
        "The 140 GB are the weights alone ({n70b_bf16_gb:.0f} GB for Llama-2-70B in bf16). Serving adds the KV cache "
        "(it grows with context and batch), activations and runtime buffers; and 140 GB is {gib_of_140gb:.1f} GiB, "
        "the unit GPU tools report.",
        f"{L00} §3",
        choices=(
            "the KV cache, activations and runtime buffers; and GB against GiB",
            "nothing: 2 bytes per parameter is the whole footprint",
            "the optimizer states, which inference also keeps",
            "the gradients, which every forward pass computes",
        ),
    ),
    Concept(
        "half-byte-int4", "memory", "Does an int4 model take 0.5 bytes per parameter?",
        "The codes do; the constants come on top. One fp16 scale per 64 weights makes {int4_g64_bits:g} bits; GPTQ's "
        "fp16 scale and 4-bit zero per 128 weights {int4_g128_bits:.4g}; bitsandbytes' NF4 with an fp32 absmax per 64 "
        "{nf4_bits:g}. Embedding and output head are often kept in 16 bits as well.",
        f"{L00} §3",
        choices=(
            "no: scales and zero points add 0.1 to 0.5 bits per weight, and the embedding and head often stay 16-bit",
            "yes, exactly: 4 bits are half a byte",
            "no: int4 values are stored one per byte",
            "no: every int4 weight needs its own fp16 scale",
        ),
        seed_note="Prep notes' precision tables give INT4 and NF4 as 0.5 bytes per parameter, counting the codes only.",
    ),
    Concept(
        "kv-per-token", "memory", "How many bytes of fp16 KV cache does one token of Llama-3-8B take (32 layers, 8 KV "
        "heads of dimension 128)?",
        "2 (K and V) x 32 x 8 x 128 x 2 bytes = {llama3_kv_token:,.0f} bytes = {llama3_kv_token_kib:.0f} KiB.",
        f"{L08} §1", answer_fact="llama3_kv_token", unit="bytes", rel_tol=0.0,
        reference="reference_impl/kvcache.py",
    ),
    Concept(
        "gqa", "memory", "Llama-3-8B has 32 query heads and 8 KV heads. What does grouped-query attention do to its "
        "KV cache?",
        "Only K and V are cached, one pair per KV head: with 8 instead of 32 the cache is {llama3_gqa} times smaller "
        "than with multi-head attention. The query heads cost nothing in the cache.",
        f"{L08} §1",
        choices=(
            "it makes the cache {llama3_gqa} times smaller: only the 8 KV heads are cached",
            "nothing: the cache size depends on the query heads",
            "it makes the cache 32 times smaller",
            "it doubles the cache, because keys and values are stored per query head",
        ),
    ),
    Concept(
        "kv-vs-weights", "memory", "At how many tokens in the cache (context x batch) does Llama-3-8B's fp16 KV cache "
        "weigh as much as its bf16 weights?",
        "Weights {llama3_bf16_gb:.2f} GB / {llama3_kv_token:,.0f} bytes per token = {llama3_kv_equals_weights_tokens:,.0f} "
        "tokens: one 128k-token sequence, or 16 sequences of 8k. Beyond that the cache, not the weights, fills the GPU.",
        f"{L08} §1", answer_fact="llama3_kv_equals_weights_tokens", unit="tokens", rel_tol=0.02,
    ),
    # ------------------------------------------------ affine quantization (lesson 01)
    Concept(
        "zero-exact", "affine", "Why does the asymmetric quantizer widen the range to contain 0 and round the zero "
        "point to an integer?",
        "So that the real value 0 is a grid point: x = 0 gives q = z and x_hat = 0 exactly. Zero padding, masked "
        "values and ReLU outputs survive quantization unchanged.",
        f"{L01} §1",
        choices=(
            "so that 0 is exactly representable: x = 0 maps to the code z and back to 0",
            "so that the scale is a power of two",
            "to make the grid symmetric around 0",
            "because integer matmuls cannot handle a non-zero zero point",
        ),
    ),
    Concept(
        "int8-255-levels", "affine", "A symmetric int8 grid with s = max|x| / 127 uses how many of int8's 256 codes?",
        "Codes -127..127, 255 of them: -128 is never produced for values inside the range, which keeps the grid "
        "symmetric around 0.",
        f"{L01} §1",
        choices=("255: -128 is never used", "256", "254", "127"),
    ),
    Concept(
        "scale-formula", "affine", "A tutorial gives the int8 'scale' as (2^n - 1) / max|x| = 255 / max|x| and stores "
        "round(x * scale). What is wrong?",
        "Two things: it is a multiplier, the inverse of the scale s of every library (q = round(x / s)); and 255 is "
        "the wrong level count for a signed grid: x * 255 / max spans -255..255, which needs 9 bits, so everything "
        "above 127/255 of the maximum saturates. The symmetric multiplier is (2^(n-1) - 1) / max|x| = 127 / max|x|.",
        f"{L01} §8",
        choices=(
            "it is 1/s, not s, and a signed grid reaches only +-127, so values above about half the maximum saturate",
            "nothing: it is the standard int8 scale",
            "it should use 256 instead of 255",
            "it needs a zero point of 128 to be correct",
        ),
        seed_note="A prep note gives exactly this formula as the scale factor (with 'the 255 values of INT8'); int8 has 256 "
        "codes, of which a symmetric grid uses 255, and the formula is right only for an unsigned grid over [0, max].",
    ),
    Concept(
        "round-half", "affine", "torch.round(2.5) returns 2. What does llama.cpp's Q8_0 (C's roundf) give for 2.5?",
        "3: roundf rounds halves away from zero; torch (and GPTQ) round half to even, which has no bias on average. "
        "A grader comparing codes exactly must know which rule was used.",
        f"{L01} §5",
        choices=("3: halves away from zero", "2: halves to even", "2: truncation", "3: always up, also for -2.5 -> -2"),
    ),
    Concept(
        "db-per-bit", "affine", "Each extra bit of a uniform grid improves the signal-to-quantization-noise ratio by "
        "how many dB?",
        "The step halves, the rounding error's power (s^2/12) falls by 4: 10 log10(4) = {db_per_bit:.2f} dB per bit, "
        "until clipping or a handful of levels breaks the uniform-error assumption at 2-3 bits.",
        f"{L01} §7", answer_fact="db_per_bit", unit="dB", rel_tol=0.01,
    ),
    Concept(
        "per-channel-rows", "affine", "For a Linear weight W [out, in], why are per-channel scales taken per output "
        "row?",
        "Each output is the dot product of one row with the input, so a row's range is what matters for it, and a "
        "scale per row factors out of the sum over inputs: y_j = s_j sum_k q_jk x_k.",
        f"{L01} §4",
        choices=(
            "each output uses one row, and a per-row scale factors out of that row's dot product",
            "because rows are stored contiguously in memory, nothing else",
            "because input columns never differ in range",
            "per-row scales make the zero point unnecessary",
        ),
    ),
    Concept(
        "clipping", "affine", "When does clipping the range (a smaller max than the data's) lower the error?",
        "Shrinking the range by p < 1 shrinks the rounding error (s^2/12) by p^2, but every value beyond the new range "
        "gets an error of |x| - p max. With few bits the step is large and clipping a few outliers pays; with many "
        "bits it rarely does.",
        f"{L01} §5",
        choices=(
            "at low bit widths, where the large step costs more than the few clipped outliers",
            "at high bit widths, where the step is already small",
            "never: min-max is always optimal",
            "always, by the same factor at every bit width",
        ),
    ),
    Concept(
        "calibration-bits", "affine", "Calibrating an activation's int8 range, min-max is close to the best method; at "
        "4 bits, percentile/MSE/KL methods win by a large factor. Why?",
        "At 8 bits the step is small, so covering the rare large values costs little; at 4 bits the step min-max would "
        "force on every value is large, and clipping the rare ones is cheaper.",
        f"{L01} §6",
        choices=(
            ("at 4 bits the step is coarse, and clipping rare large values costs less than the step they would force "
            "on everything else"),
            "KL divergence only works at 4 bits",
            "at 8 bits there are no outliers",
            "percentile calibration changes the number of levels",
        ),
    ),
    Concept(
        "float-zero", "affine", "llama.cpp's Q4_1 stores a scale and the block minimum (x_hat = s q + min) instead of an "
        "integer zero point. What does it give up?",
        "The grid fits [min, max] exactly, but 0 is in general no longer a grid point: a true 0 comes back as a small "
        "non-zero number. An integer zero point keeps 0 exact at the price of shifting the grid by up to half a step.",
        f"{L01} §3",
        choices=(
            "an exact zero: 0 is generally not on the grid any more",
            "nothing: it is strictly better",
            "the ability to represent negative values",
            "half of its levels",
        ),
    ),
    Concept(
        "q4_1-artifact", "recipes", "On SmolLM2, int4 groups of 32 with a float zero point reproduce the reference "
        "almost exactly (KLD {int4_g32_float_kld:.1e}), while an integer zero point on the same groups scores "
        "{int4_g32_asym_kld:.3f}. Why?",
        "The reference weights are SmolLM2's GGUF Q4_1 blocks of 32 dequantized: they already lie on a grid "
        "x = s q + min per block. The same form on the same blocks finds each block's (s, min) again. It is a "
        "property of the reference model, not a merit of the recipe; on genuine fp16 weights the two zero points are "
        "within a fraction of a dB.",
        f"{L01} §9",
        choices=(
            "the reference weights are Q4_1 blocks of 32, so this grid finds them again: an artifact, not a merit",
            "a float zero point is always far better than an integer one",
            "groups of 32 are small enough to be lossless at 4 bits",
            "the float zero point stores more bits per weight",
        ),
    ),
    # ------------------------------------------------ outliers and LLM.int8() (lesson 02)
    Concept(
        "per-tensor-act", "outliers", "Why does one int8 scale per activation tensor fail on LLMs?",
        "A few channels (the same ones in every token) and a few tokens (the first, an attention sink) carry values "
        "tens to hundreds of times the typical one; one scale set by them rounds most ordinary values to 0. On "
        "SmolLM2, W8A8 with per-tensor activations costs {w8a8_tensor_dppl:+.1f}% perplexity, per-token "
        "{w8a8_token_dppl:+.1f}%.",
        f"{L02} §2",
        choices=(
            "a few outlier channels and tokens set the step, and most ordinary values round to 0",
            "int8 cannot represent negative activations",
            "activations change between batches, so any scale is stale",
            "the int32 accumulator overflows",
        ),
    ),
    Concept(
        "vectorwise", "outliers", "In an int8 matmul Y = X W^T, which scales can be applied after the integer "
        "product?",
        "One per row of X (token) and one per row of W (output channel): they do not depend on the summation index k, "
        "so Y_ij = a_i b_j / 127^2 sum_k A_ik B_jk with an exact int32 sum. A scale per input feature k would sit inside "
        "the sum: that is why outlier columns need another trick.",
        f"{L02} §3",
        choices=(
            "a scale per token and a scale per output channel; not a scale per input feature",
            "a scale per input feature only",
            "any scale: integer arithmetic is linear",
            "only one scale per tensor",
        ),
    ),
    Concept(
        "llm-int8-threshold", "outliers", "LLM.int8() sends an input column through the float path when any of its "
        "values reaches what magnitude?",
        "{llm_int8_threshold:g}: columns with any |x| >= {llm_int8_threshold:g} are multiplied in float, the rest in "
        "vector-wise int8. On SmolLM2 that takes W8A8 per token from {w8a8_token_dppl:+.2f}% to {llm_int8_dppl:+.2f}% "
        "perplexity.",
        f"{L02} §4", answer_fact="llm_int8_threshold", rel_tol=0.0, reference="reference_impl/llm_int8.py",
    ),
    Concept(
        "feature-vs-token-outliers", "outliers", "Per-token activation scales repair some layers and not others. Which?",
        "They repair layers whose outliers sit in a few tokens (each such token pays alone). They barely help when one "
        "channel is large in every token (a feature outlier): every token's scale is set by it, and only taking that "
        "column out (LLM.int8()) or moving it into the weights (SmoothQuant) helps.",
        f"{L02} §4",
        choices=(
            "they fix token outliers; feature outliers (one channel large in every token) still set every token's scale",
            "they fix feature outliers; token outliers still set every token's scale",
            "they fix both kinds equally",
            "they fix neither; only per-tensor scales work",
        ),
    ),
    Concept(
        "llm-int8-cost", "outliers", "Is LLM.int8()'s float path always cheap?",
        "Only when few columns reach the threshold. The paper finds a few systematic outlier features from about 6.7B "
        "parameters on; SmolLM2's late down_proj inputs have hundreds of channels above 6, so a real kernel would do "
        "much of that product in float.",
        f"{L02} §4",
        choices=(
            "no: it is cheap only when few input columns reach the threshold, which depends on the model and the layer",
            "yes: outliers are always fewer than 1% of the columns",
            "yes: the float path runs on the int8 tensor cores",
            "no: it always doubles the time of the matmul",
        ),
    ),
    # ------------------------------------------------ NF4 and double quantization (lesson 03)
    Concept(
        "nf4dq-bits", "nf4", "Bits per weight of NF4 with double quantization at QLoRA's settings (blocks of 64, "
        "second-level blocks of 256)?",
        "4 + 8/64 + 32/(64 x 256) = {nf4dq_bits:.4f}: 4-bit codes, an 8-bit absmax per block, an fp32 constant per 256 "
        "blocks (plus one fp32 offset per tensor). Without double quantization: {nf4_bits:g}.",
        f"{L03} §4", answer_fact="nf4dq_bits", unit="bits", rel_tol=0.002, reference="reference_impl/nf4.py",
    ),
    Concept(
        "nf4-asymmetric", "nf4", "NF4 has 8 positive values, 7 negative ones and an exact 0. Why not 8 and 8?",
        "A table symmetric around an exact zero has an odd number of values: 15 would waste one of the 16 codes. NF4 "
        "keeps the exact zero (zero weights and padding come back as 0) and spends the 16th code on one more positive "
        "value.",
        f"{L03} §2",
        choices=(
            "to keep an exact 0 and still use all 16 codes: a symmetric table around 0 has an odd count",
            "because trained weights are mostly positive",
            "because the sign bit takes one code",
            "to make the table match FP4's",
        ),
    ),
    Concept(
        "nf4-offset", "nf4", "NF4's outermost quantile is taken at probability {nf4_offset:.7f}, not 1. Why?",
        "Phi^-1(1) is infinite. {nf4_offset:.7f} is the mean of 31/32 and 29/30, the centres of the last slice when "
        "[0, 1] is split into 16 or 15 equal slices: the end values sit at the centre of the outermost slice.",
        f"{L03} §2",
        choices=(
            "the quantile at 1 is infinite; the end value sits at the centre of the last probability slice",
            "it was fitted to LLaMA's weights by gradient descent",
            "it makes the table sum to zero",
            "it is the probability that a weight is an outlier",
        ),
    ),
    Concept(
        "dq-mean", "nf4", "Double quantization subtracts the mean of the absmax values before quantizing them to 8 "
        "bits. Why?",
        "Every absmax is positive and they cluster; bitsandbytes' signed 8-bit dynamic map spends half its values on "
        "negatives and is densest near 0. Centred on their mean, the absmax values use both halves of the map.",
        f"{L03} §4",
        choices=(
            "the absmax values are all positive, and the signed 8-bit map would waste its negative half",
            "to make them fit in 4 bits",
            "the mean is needed to dequantize the NF4 codes",
            "to remove outlier blocks",
        ),
    ),
    Concept(
        "dq-saving", "nf4", "How many GB (10^9 bytes) does double quantization save on a 65B-parameter model at blocks "
        "of 64, every parameter counted as quantized?",
        "65e9 x ({nf4_bits:g} - {nf4dq_bits:.4f}) bits / 8 = {dq_saving_65b_gb:.2f} GB: about 3 GB, as the QLoRA paper "
        "rounds it. The 4-bit codes, 4 of the {nf4dq_bits:.3f} bits, are untouched.",
        f"{L03} §4", answer_fact="dq_saving_65b_gb", unit="GB", rel_tol=0.02,
    ),
    Concept(
        "bnb-nibbles", "nf4", "bitsandbytes packs two 4-bit codes per byte. Where does the first weight go?",
        "In the high nibble (element 2j in the high nibble of byte j, 2j + 1 in the low one). GGUF's Q4 blocks differ: "
        "weight j in the low nibble of byte j, weight j + 16 in the high nibble.",
        f"{L03} §4",
        choices=("the high nibble", "the low nibble", "it depends on the block's absmax", "a separate byte"),
    ),
    Concept(
        "entropy-not-mse", "nf4", "QLoRA calls NF4 information-theoretically optimal for normal weights. What does that "
        "mean, precisely?",
        "That its 16 codes are (nearly) equally used by normal data, so each 4-bit code carries close to 4 bits of "
        "information. It does not mean least error: the MSE-optimal (Lloyd-Max) table spaces its values more evenly "
        "than quantiles and has a lower MSE on the same weights.",
        f"{L03} §2",
        choices=(
            "its codes are nearly equally used (maximal entropy) by normal data; it is not the least-error table",
            "it has the lowest mean squared error of any 16-value table",
            "it needs no scale per block",
            "it is lossless for normally distributed weights",
        ),
    ),
    Concept(
        "nf4-blocksize", "nf4", "NF4 is one fixed table. What happens to the block-scaled values x = w / absmax as "
        "the block grows?",
        "The absmax of a block of B normal values grows with B (roughly like sqrt(2 ln B) standard deviations), so x "
        "crowds towards 0 and the outer codes empty out; smaller blocks fit better but cost more constants.",
        f"{L03} §1",
        choices=(
            "they crowd towards 0, because a larger block's absmax is larger relative to its spread",
            "they spread towards +-1",
            "nothing: x is independent of the block size",
            "they become uniformly distributed",
        ),
    ),
    # ------------------------------------------------ GPTQ (lesson 04)
    Concept(
        "gptq-objective", "gptq", "What does GPTQ minimize, for each linear layer?",
        "The output error on calibration inputs, ||X W^T - X W_hat^T||^2 / n, which splits into one quadratic per "
        "output row with the same Hessian H = 2 X^T X / n. Round-to-nearest is this with H = I.",
        f"{L04} §1",
        choices=(
            "the layer's output error on calibration inputs, with the Hessian H = 2X^T X/n",
            "the squared error of the weights themselves",
            "the model's final loss, by backpropagation",
            "the number of weights kept in fp16",
        ),
    ),
    Concept(
        "gptq-weight-error", "gptq", "Compared with round-to-nearest on the same grid, GPTQ's quantized weights are ...",
        "... further from the original weights (higher weight MSE), and the layer's outputs closer, also on held-out "
        "tokens: GPTQ gives up accuracy on the weights to gain it on the outputs.",
        f"{L04} §1",
        choices=(
            "further from the original weights, with a smaller output error",
            "closer to the original weights and with a smaller output error",
            "identical; only the scales differ",
            "stored with more bits per weight",
        ),
    ),
    Concept(
        "gptq-damping", "gptq", "Why does GPTQ add 0.01 x mean(diag H) to the diagonal of H?",
        "H is badly conditioned, and singular when there are fewer calibration tokens than inputs; damping lifts the "
        "smallest eigenvalues so the Cholesky factorization of H^-1 exists and is stable. More damping pulls the "
        "result towards RTN.",
        f"{L04} §2",
        choices=(
            "to make H invertible and well conditioned; more damping moves the result towards RTN",
            "to speed the algorithm up",
            "to add noise that regularizes the codes",
            "to normalize the scales of the groups",
        ),
    ),
    Concept(
        "gptq-act-order", "gptq", "What does GPTQ's act-order do, and what does it cost in the checkpoint?",
        "Columns are quantized by decreasing H_jj, the loudest inputs first, while every other column can still absorb "
        "their error. With groups, a group becomes scattered inputs, so the checkpoint needs g_idx (an int32 per "
        "input) and the kernel a scale lookup per input, unless static groups fix every group's grid up front.",
        f"{L04} §6",
        choices=(
            "loudest inputs first; with groups it needs g_idx (or static groups) in the checkpoint",
            "random column order, to avoid bias",
            "it quantizes the activations in order of size",
            "it sorts the output rows; the checkpoint is unchanged",
        ),
    ),
    Concept(
        "gptq-dead", "gptq", "An input of a layer is zero on every calibration token. What does GPTQ do with it?",
        "Its H_jj is 0: GPTQ sets H_jj = 1 and the weights of that column to 0, since they never reach the output on "
        "the calibration data.",
        f"{L04} §2",
        choices=(
            "sets H_jj = 1 and zeroes that column's weights",
            "keeps that column in fp16",
            "drops the input from the model",
            "stops with an error",
        ),
    ),
    Concept(
        "gptq-overfit", "gptq", "What goes wrong when GPTQ calibrates on few tokens relative to a layer's number of "
        "inputs K?",
        "H describes those tokens only; GPTQ fits them at the others' expense and can do worse than RTN on held-out "
        "tokens. The course calibrates on 128 windows of 512 tokens, more than 40 tokens per input even for "
        "down_proj's 1536.",
        f"{L04} §2",
        choices=(
            "it overfits the calibration tokens and can lose to RTN on held-out text",
            "nothing: GPTQ needs no more tokens than one",
            "it runs out of memory",
            "the scales become zero",
        ),
    ),
    Concept(
        "gptq-sequential", "gptq", "GPTQ's driver quantizes the model layer by layer. Which inputs calibrate layer i?",
        "The outputs of the already quantized layers before it (and inside a block, o_proj sees the quantized q, k, "
        "v): each layer is calibrated on what it will receive and can compensate part of the earlier error.",
        f"{L04} §7",
        choices=(
            "the outputs of the layers before it, already quantized",
            "the float model's activations, recorded once at the start",
            "random Gaussian inputs",
            "the final layer's gradients",
        ),
    ),
    Concept(
        "gptq-qzeros", "gptq", "In AutoGPTQ's v1 checkpoint, what does qzeros hold?",
        "Each group's zero point minus 1, packed 8 per int32 along the outputs: a quirk of the kernel the layout was "
        "written for (a zero point of 0 wraps to 15).",
        f"{L04} §8",
        choices=(
            "the zero point minus 1, packed eight per int32",
            "the zero point plus 8",
            "the minimum of each group in fp16",
            "the indices of the zero weights",
        ),
    ),
    # ------------------------------------------------ AWQ and SmoothQuant (lessons 05, 06)
    Concept(
        "awq-scale-effect", "awq", "AWQ multiplies a salient input channel's weights by s > 1 and divides its input by "
        "s. Why does that reduce the error?",
        "The rounding error of a weight is at most half a step; after dividing by s it shrinks by s, while the group's "
        "step grows little (other weights set the group's max). The division is folded into the previous op, so it "
        "costs nothing at run time.",
        f"{L05} §2",
        choices=(
            "the weight's rounding error is divided by s while the group's step barely changes",
            "the scaled weights are kept in fp16",
            "scaling makes the weights normally distributed",
            "it removes the channel from the matmul",
        ),
        reference="reference_impl/awq.py",
    ),
    Concept(
        "awq-search", "awq", "How does AWQ choose its per-channel scales?",
        "s = mean|x|^r per input channel (normalized so max s x min s = 1), r tried on a grid 0, 0.05, ..., 0.95, "
        "keeping the r with the lowest squared error of the block's output after quantization. r = 0 is RTN, so the "
        "search never does worse than RTN on its objective. No gradients.",
        f"{L05} §3",
        choices=(
            "a grid search over r in s = mean|x|^r, scored by the block's output error after quantization",
            "by gradient descent on the model's loss",
            "from the weights' magnitudes only",
            "by keeping the top 1% of channels in fp16",
        ),
        reference="reference_impl/awq.py",
    ),
    Concept(
        "awq-gqa", "awq", "Why does AWQ not scale v_proj -> o_proj in SmolLM2?",
        "The scale must fold into one v_proj output per o_proj input. Under grouped-query attention v_proj has 192 "
        "outputs (3 KV heads x 64) and o_proj reads 576 (9 heads): each value channel feeds three heads, so the pair "
        "is skipped.",
        f"{L05} §3",
        choices=(
            "grouped-query attention: v_proj's 192 outputs do not match o_proj's 576 inputs",
            "o_proj has no salient channels",
            "v_proj is kept in fp16",
            "it would change the attention scores",
        ),
        reference="reference_impl/awq.py",
    ),
    Concept(
        "smoothquant", "smoothquant", "What does SmoothQuant do before running a layer in W8A8?",
        "It divides activation channel j by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) and multiplies weight column j "
        "by s_j: exact in real arithmetic, but it moves the outliers' difficulty from the activations (hard to "
        "quantize) into the weights (easy). 1/s is folded into the preceding RMSNorm.",
        f"{L06} §2",
        choices=(
            "migrates outlier magnitude from activations into weights with per-channel scales, folded into the norm",
            "keeps outlier channels in fp16",
            "quantizes the activations to 4 bits",
            "clips the activations at 6",
        ),
        reference="reference_impl/smoothquant.py",
    ),
    Concept(
        "smoothquant-where", "smoothquant", "Which Llama layers does SmoothQuant's recipe smooth?",
        "Those with a norm in front to absorb 1/s: q, k, v (input_layernorm) and gate, up (post_attention_layernorm). "
        "o_proj and down_proj have no such op and stay unsmoothed in the paper's recipe.",
        f"{L06} §3",
        choices=(
            "q, k, v and gate, up: the ones behind an RMSNorm that can absorb 1/s",
            "o_proj and down_proj only",
            "every linear layer, with the factor stored separately",
            "only the output head",
        ),
        reference="reference_impl/smoothquant.py",
    ),
    # ------------------------------------------------ QLoRA (lesson 07)
    Concept(
        "lora-b-zero", "qlora", "LoRA starts A random and B at zero. Why?",
        "The update (alpha/r) x A^T B^T is then exactly zero: training starts at the (quantized) model itself. Both "
        "random would add noise to every layer; both zero would leave every gradient at zero forever.",
        f"{L07} §1",
        choices=(
            "so the adapted model starts exactly at the base model, while gradients can still flow",
            "so A learns first and B later",
            "to save memory for B",
            "because B is quantized",
        ),
    ),
    Concept(
        "qlora-gradient", "qlora", "In QLoRA, does the frozen 4-bit layer take part in backpropagation?",
        "Yes: the gradient with respect to its input, G W_hat, is what the adapters below learn from, so the layer "
        "dequantizes its weight again in backward. The stored codes get no gradient (a uint8 tensor cannot hold one).",
        f"{L07} §1",
        choices=(
            "yes: it passes the gradient to its input, dequantizing again in backward; its codes get no gradient",
            "no: frozen layers are cut out of the graph",
            "yes: its codes are updated with a straight-through gradient",
            "only in the last layer",
        ),
    ),
    Concept(
        "lora-alpha-r", "qlora", "Why does LoRA scale its update by alpha / r?",
        "Adam's first update moves every entry of B by about the learning rate whatever the rank; the output change "
        "sums over the r columns of A, so it grows with r. Dividing by r lets one alpha and one learning rate serve "
        "every rank.",
        f"{L07} §1",
        choices=(
            "so the size of an update does not grow with the rank, and one alpha serves every rank",
            "to keep the adapters in fp16 range",
            "because alpha is the learning rate",
            "to make the adapters orthogonal",
        ),
    ),
    Concept(
        "full-ft-bytes", "qlora", "Full fine-tuning in mixed precision with AdamW keeps how many bytes per parameter "
        "(before activations)?",
        "bf16 weight 2 + bf16 gradient 2 + fp32 master copy 4 + Adam's m and v 4 + 4 = 16 (the plan gives "
        "{full_bytes_per_param:.2f} with AdamW's step counters). For Llama-2-70B that is {full70_gib:,.0f} GiB, "
        "against {lora70_gib:.0f} GiB for LoRA and {qlora70_gib:.1f} GiB for QLoRA.",
        f"{L07} §2", answer_fact="full_bytes_per_param", unit="bytes", rel_tol=0.01,
    ),
    Concept(
        "paged-optimizers", "qlora", "What do QLoRA's paged optimizers do?",
        "They allocate Adam's states in CUDA unified memory, which the driver pages between GPU and CPU RAM on demand: "
        "a memory spike evicts optimizer pages instead of crashing the run. The memory a step needs does not shrink.",
        f"{L07} §1",
        choices=(
            "put optimizer states in unified memory so a spike pages them to CPU instead of running out of memory",
            "quantize the optimizer states to 4 bits",
            "split the batch into pages",
            "store the base model on disk",
        ),
    ),
    Concept(
        "merge-adapter", "qlora", "You merge a trained adapter into the base (W_hat + (alpha/r) B A) and serve it in "
        "4 bits. What is the risk?",
        "The merged matrix is off the NF4 grid; quantizing it again rounds away part of the small learned change. "
        "Keeping the adapter separate, on the same quantized base it was trained with, avoids that.",
        f"{L07} §4",
        choices=(
            "re-quantizing the merged weights rounds away part of what the adapter learned",
            "none: merging is exact in 4 bits",
            "the adapter's rank doubles",
            "the model can no longer be saved",
        ),
    ),
    # ------------------------------------------------ KV cache (lesson 08)
    Concept(
        "kivi-axes", "kvcache", "KIVI quantizes keys per channel and values per token. Why not the same axis for both?",
        "Keys have a few outlier channels in every token: a group along a channel sees one magnitude, a group along a "
        "token would span the outliers and round the small channels away. Values have no such channels, and each "
        "attention output mixes value rows, so a per-token error stays in its row.",
        f"{L08} §2",
        choices=(
            "keys have fixed outlier channels, values do not; grouping along the channel keeps one magnitude per group",
            "keys are larger than values",
            "values are never quantized",
            "it makes the cache layout contiguous",
        ),
        reference="reference_impl/kvcache.py",
    ),
    Concept(
        "kivi-window", "kvcache", "Why does KIVI keep the newest R tokens in full precision?",
        "Recent tokens get most of the attention, and keys are grouped over G tokens along each channel: a group can "
        "only be quantized once it is complete. R (a multiple of G) tokens stay exact.",
        f"{L08} §5",
        choices=(
            "recent tokens get most attention, and key groups of G tokens must be complete before quantizing",
            "to store the prompt",
            "because fp16 is faster for new tokens",
            "to hold the attention sink",
        ),
        reference="reference_impl/kvcache.py",
    ),
    Concept(
        "fp8-kv-scale", "kvcache", "vLLM's fp8 e4m3 KV cache uses one scale per layer for K and one for V. How is it "
        "chosen?",
        "It maps the largest magnitude seen (calibrated) onto e4m3's largest value, {e4m3_max:g}: x_hat = scale x "
        "fp8(x / scale). Larger values later saturate.",
        f"{L08} §3",
        choices=(
            "amax / {e4m3_max:g}, from calibration, so the largest value lands on e4m3's maximum",
            "amax / 127, as for int8",
            "one scale per token, computed on the fly",
            "no scale: fp8 needs none",
        ),
        reference="reference_impl/kvcache.py",
    ),
    # ------------------------------------------------ GGUF (lesson 09)
    Concept(
        "q4_k_m", "gguf", "What is Q4_K_M?",
        "A llama.cpp file type, not a block type: most tensors in Q4_K ({q4_k_bits:g} bits per weight), with attn_v "
        "and ffn_down in Q6_K ({q6_k_bits:.4g} bits) in the first and last eighth of the layers and every third layer "
        "between, and the output head in Q6_K. llama.cpp reports 4.89 bits per weight for Llama-3-8B.",
        f"{L09} §6",
        choices=(
            "a file type mixing Q4_K with Q6_K for the most sensitive tensors",
            "a single block type with 4.0 bits per weight",
            "Q4_0 with medium group size",
            "a GPTQ variant for llama.cpp",
        ),
        reference="reference_impl/gguf_file.py",
    ),
    Concept(
        "q4_0-sign", "gguf", "Q4_0 sets d = (the block's signed value of largest magnitude) / -8. Why the minus sign?",
        "Codes run -8..7 (q - 8 with q in 0..15): the side with 8 steps is the negative one. Dividing by -8 puts the "
        "extreme value exactly on code 0, the end with one more step, and leaves all 7 positive steps to the other "
        "side.",
        f"{L09} §3",
        choices=(
            "so the block's extreme lands on code 0, the end of the grid with one more step",
            "to store the sign of the block",
            "to make d always positive",
            "because llama.cpp stores codes in reverse",
        ),
        reference="reference_impl/gguf.py",
    ),
    Concept(
        "kquant-row", "gguf", "Requantizing SmolLM2 (hidden size {smollm2_hidden}) to Q4_K_M, most linear weights come "
        "out in another type. Which one, and why?",
        "K-quant super-blocks hold 256 weights and a row must hold whole blocks; {smollm2_hidden} is not a multiple of "
        "256, so llama.cpp falls back from Q4_K to {smollm2_q4k_fallback} (blocks of 32).",
        f"{L09} §6",
        choices=(
            "{smollm2_q4k_fallback}: 256-weight super-blocks do not tile a row of {smollm2_hidden}",
            "F16: small models are not quantized",
            "Q8_0: small models need more bits",
            "none: every tensor stays Q4_K",
        ),
        reference="reference_impl/gguf_file.py",
    ),
    Concept(
        "q8_0-bits", "gguf", "Bits per weight of GGUF Q8_0 (blocks of 32 int8 codes with an fp16 scale)?",
        "(32 x 8 + 16) / 32 = {q8_0_bits:g}.",
        f"{L09} §5", answer_fact="q8_0_bits", unit="bits", rel_tol=0.002, reference="reference_impl/gguf.py",
    ),
    # ------------------------------------------------ kernels (lesson 10)
    Concept(
        "decode-memory-bound", "kernels", "Why does weight-only quantization speed up token generation at batch 1?",
        "Each weight is read once for 2 flops: the intensity is about {intensity_fp16_m1:.2f} flop/byte in fp16, far "
        "below the H100's ridge (about {h100_ridge:.0f} flop/byte on its data sheet). The time is the time to read the "
        "weights, so fewer bytes means proportionally less time, if the kernel hides its unpacking.",
        f"{L10} §1",
        choices=(
            "decoding is memory-bound: time is bytes read / bandwidth, and 4-bit weights are about a quarter of the bytes",
            "4-bit arithmetic is four times faster than fp16 arithmetic",
            "quantized models have fewer layers",
            "the KV cache becomes smaller",
        ),
    ),
    Concept(
        "intensity-int4", "kernels", "Arithmetic intensity (flop per byte) of an 8192 x 8192 int4 g128 layer (fp16 "
        "scale and 4-bit zero per group, fp16 activations) at one token?",
        "2 N K flops over N K x {int4_g128_bits:.4g} / 8 bytes of weights plus the tiny input and output: "
        "{intensity_int4_m1:.2f} flop/byte, against {intensity_fp16_m1:.2f} in fp16.",
        f"{L10} §1", answer_fact="intensity_int4_m1", unit="flop/byte", rel_tol=0.01,
        reference="reference_impl/roofline.py",
    ),
    Concept(
        "large-batch", "kernels", "What happens to a weight-only int4 kernel's advantage as the batch grows?",
        "The same weights serve more tokens per read; once the layer reaches the compute roof, the bytes saved no "
        "longer buy time, and fp16 catches up. Weight-only quantization is a decoding optimization; large batches "
        "need int8/fp8 arithmetic (W8A8) to go faster.",
        f"{L10} §1",
        choices=(
            "it disappears once the layer is compute-bound; then W8A8 or FP8 arithmetic is what helps",
            "it grows with the batch",
            "it stays at 4x at every batch size",
            "int4 becomes more accurate at large batch",
        ),
    ),
    Concept(
        "fp32-accumulator", "kernels", "Why does the W4A16 GEMV accumulate in float32, not fp16?",
        "A dot product of thousands of terms summed in fp16 (11-bit significand) loses the small terms once the running "
        "sum is large; float32 has 24 bits.",
        f"{L10} §3",
        choices=(
            "fp16's 11-bit significand loses small terms in long sums; float32 keeps 24 bits",
            "float32 is faster on tensor cores",
            "int4 codes cannot be converted to fp16",
            "to save registers",
        ),
    ),
    Concept(
        "split-k", "kernels", "At batch 1, why does the GEMV split K across programs?",
        "With one program per BLOCK_N outputs there are too few programs to occupy 132 SMs and keep enough loads in "
        "flight to reach full bandwidth; split-K multiplies the programs. Its partial sums are added in a fixed order "
        "so results are reproducible.",
        f"{L10} §4",
        choices=(
            "to create enough programs to fill the SMs and keep memory busy; partials are summed in a fixed order",
            "to reduce the number of flops",
            "because K is too large for a register",
            "to avoid dequantizing the weights",
        ),
    ),
    Concept(
        "per-call-overhead", "kernels",
        "On the course's H100, bitsandbytes' NF4 matmul for a 4096 x 4096 layer at batch 1 takes {bnb_gpu_us:.1f} us "
        "of GPU time, against {fp16_gpu_us:.1f} us for fp16; called from Python one matmul at a time it takes "
        "{bnb_call_us:.0f} us per call, against fp16's {fp16_call_us:.0f} us. What explains the gap?",
        "At batch 1 a small layer's GPU work is shorter than the host's work to issue it: bitsandbytes spends "
        "{bnb_host_us:.0f} us of host time per call (argument checks, several kernel launches), so per-call timing "
        "measures launch overhead, not bytes. Fewer bytes pay only once that overhead is hidden (CUDA graphs, fused "
        "kernels, larger layers) or cut: the course's TritonLinear4bit checks its inputs once and relaunches its "
        "compiled kernel directly, {nf4_layer_call_us:.0f} us per call on the same layer. Timed on the GPU, the "
        "course's W4A16 kernel reaches {w4a16_big_speedup:.2f}x over fp16 on an 8192 x 28672 layer, against a "
        "ceiling of {ceiling_int4_g128_sym:.2f}x.",
        f"{L10} §6",
        choices=(
            ("the host needs longer to issue the call than the GPU needs to run it, so per-call timing measures "
            "launch overhead, not bytes"),
            "NF4 stores more bytes than fp16",
            "the GPU timing is too optimistic because its L2 cache was warm",
            "batch 1 is compute-bound, so the 4-bit weights cannot help",
        ),
        reference="benchmarks/results/per_call.md, benchmarks/results/kernels.md",
    ),
    Concept(
        "bitnet", "production", "BitNet b1.58 is said to use '1.58 bits' per weight. What are its weights, and can you "
        "get there by post-training quantization?",
        "Ternary values {{-1, 0, +1}}: log2(3) = {bitnet_bits:.2f} bits of information each. The model is trained that "
        "way from the start; it is not a post-training format for an existing model.",
        f"{L00} §2",
        choices=(
            "ternary weights (-1, 0, +1), trained that way from scratch; not a PTQ format",
            "binary weights stored with a 0.58-bit scale",
            "any model quantized to 1.58 bits with GPTQ",
            "1-bit weights plus 8-bit activations",
        ),
        seed_note="A prep note lists 1.5-bit BitNet beside FP8 and 4-bit as a level one quantizes to, and another calls it "
        "a binary-weight model: it is ternary and trained for it.",
    ),
    Concept(
        "kld-vs-ppl", "production", "Why does the course report KL divergence and top-1 agreement beside perplexity?",
        "Perplexity averages the probability of the right token; two models with the same perplexity can disagree on "
        "many tokens. KLD measures how far each next-token distribution moved from the reference, and top-1 how often "
        "the most likely token changed (llama.cpp's perplexity --kl-divergence reports the same).",
        f"{L01} §9",
        choices=(
            ("perplexity can hide changes that average out; KLD and top-1 measure each token's distribution against "
            "the reference"),
            "perplexity cannot be computed for quantized models",
            "KLD is cheaper to compute",
            "top-1 agreement is the same as perplexity",
        ),
    ),
    Concept(
        "w8a8-vs-weight-only", "production", "Serving at large batch on an H100, which helps more: int4 weight-only or "
        "W8A8 (int8 weights and activations)?",
        "Large batches are compute-bound, so fewer bytes no longer help; W8A8 runs on int8 tensor cores, whose dense "
        "peak is twice fp16's. On SmolLM2, W8A8 with per-token activation scales costs {w8a8_token_dppl:+.1f}% "
        "perplexity.",
        f"{L10} §5",
        choices=(
            "W8A8: the int8 tensor cores double the compute peak, which is what limits a large batch",
            "int4 weight-only: fewer bytes always win",
            "neither: quantization never helps at large batch",
            "int4 weight-only, because it has fewer flops",
        ),
    ),
)

CONCEPTS_BY_ID = {c.cid: c for c in CONCEPTS}


def available_concepts(topic: str | None = None) -> list[Concept]:
    """Concepts whose facts are all known (and of `topic`, if given)."""
    known = facts()
    return [c for c in CONCEPTS if c.available(known) and (topic is None or c.topic == topic)]


def concept_question(cid: str, rng: random.Random) -> Question:
    if cid not in CONCEPTS_BY_ID:
        raise KeyError(f"no concept {cid!r} in the bank")
    return CONCEPTS_BY_ID[cid].question(rng)
