"""End-to-end int8 speed of one decoder layer's linear layers: W8A8, as SmoothQuant deploys it,
against fp16 cuBLAS.

A Llama decoder layer has seven linear layers reading four distinct inputs: q, k, v read the
attention norm's output, o the attention output, gate and up the MLP norm's output, down the
gated product. fp16: seven `F.linear` calls. W8A8: each of the four inputs quantized per token
once (`kernels.w8a8.quantize_per_token`, at every call: it is part of the cost), then seven
int8 GEMMs with the rescale fused (`kernels.w8a8.w8a8_matmul`, fp16 out). "w8a8 gemm only"
leaves the quantization out, to show what it costs. Smoothing costs nothing here: its factors
are folded into the weights and the norms.

Two layer shapes: Llama-7B (hidden 4096, FFN 11008, 32 heads of 64, no GQA) and SmolLM2-135M
(hidden 576, FFN 1536, 9 query and 3 key/value heads of 64). M tokens: 1 (decoding) to 4096
(prefill). Each contender's whole layer is captured in one CUDA graph and replayed, so Python's
launch overhead (eleven launches for W8A8) counts for neither; the timing is
benchmarks/kernels.py's: median of CUDA events with the L2 cache emptied before each call.

Usage (needs a CUDA GPU):  python benchmarks/smoothquant_speed.py [--out DIR]
Writes smoothquant_speed.{json,md} to benchmarks/results/ (or DIR); with QUANTCOURSE_FAST=1 two
values of M and smoothquant_speed.fast.*. Without a GPU, under TRITON_INTERPRET=1, it runs a tiny
layer on CPU as a smoke test (timings of the interpreter mean nothing) and writes
smoothquant_speed.interpreter.*.
"""

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = [1, 16, 64, 256, 1024, 4096]
FAST_ROWS = [1, 4096]
INTERPRETER_ROWS = [1, 5]
PUBLISHED = "SmoothQuant paper: up to 1.56x end to end; TensorRT-LLM INT8-SQ on H100: 1.47x at batch 1."


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    ffn: int
    q_out: int  # query heads x head dim
    kv_out: int  # key/value heads x head dim

    def linears(self) -> list[tuple[str, str, int, int]]:
        """(name, input it reads, K, N) for the seven linear layers, in forward order."""
        return [
            ("q_proj", "x", self.hidden, self.q_out),
            ("k_proj", "x", self.hidden, self.kv_out),
            ("v_proj", "x", self.hidden, self.kv_out),
            ("o_proj", "attn", self.q_out, self.hidden),
            ("gate_proj", "h", self.hidden, self.ffn),
            ("up_proj", "h", self.hidden, self.ffn),
            ("down_proj", "m", self.ffn, self.hidden),
        ]


LAYERS = {"Llama-7B": LayerShape(4096, 11008, 4096, 4096), "SmolLM2-135M": LayerShape(576, 1536, 576, 192)}
INTERPRETER_LAYERS = {"tiny": LayerShape(64, 96, 64, 32)}


def cpu_time_us(fn, calls: int = 1) -> float:
    """Median wall microseconds (the interpreter smoke test only: no cache control)."""
    fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def graphed(fn):
    """fn captured in a CUDA graph after a warm-up (compiles and autotunes); returns the replay."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def layer_contenders(shape: LayerShape, M: int, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[dict, float]:
    """The layer's three contenders at M tokens, as functions of nothing, and the worst relative
    error of a W8A8 output against its fp32 twin (reference_impl.llm_int8's int8 path)."""
    from quantcourse.kernels import w8a8 as w8
    from quantcourse.reference_impl.llm_int8 import int8_matmul, int8_mm_dequant, int8_vectorwise_quant

    g = torch.Generator(device=device).manual_seed(seed)
    linears = shape.linears()
    widths = {src: K for _, src, K, _ in linears}
    inputs = {src: torch.randn(M, K, device=device, generator=g, dtype=dtype) for src, K in widths.items()}
    weights = {name: torch.randn(N, K, device=device, generator=g, dtype=dtype) * K**-0.5 for name, _, K, N in linears}
    quantized = {name: int8_vectorwise_quant(W)[:2] for name, W in weights.items()}
    codes = {src: w8.quantize_per_token(x) for src, x in inputs.items()}

    def fp16():
        return [F.linear(inputs[src], weights[name]) for name, src, _, _ in linears]

    def w8a8():
        q = {src: w8.quantize_per_token(x) for src, x in inputs.items()}
        return [w8.w8a8_matmul(*q[src], *quantized[name], out_dtype=dtype) for name, src, _, _ in linears]

    def gemm_only():
        return [w8.w8a8_matmul(*codes[src], *quantized[name], out_dtype=dtype) for name, src, _, _ in linears]

    worst = 0.0
    for (name, src, _, _), out in zip(linears, w8a8()):
        twin = int8_mm_dequant(int8_matmul(codes[src][0], quantized[name][0]), codes[src][1], quantized[name][1])
        worst = max(worst, ((out.float() - twin).norm() / twin.norm()).item())
    return {"fp16": fp16, "w8a8": w8a8, "w8a8 gemm only": gemm_only}, worst


def measure(layers: dict[str, LayerShape], rows: list[int], on_gpu: bool) -> list[dict]:
    device, dtype = ("cuda", torch.float16) if on_gpu else ("cpu", torch.float32)
    if on_gpu:
        from kernels import time_us  # benchmarks/kernels.py (this folder), not the quantcourse.kernels package
    results = []
    for model, shape in layers.items():
        for M in rows:
            contenders, error = layer_contenders(shape, M, device, dtype)
            assert error < 2e-3, f"W8A8 disagrees with its int8 twin for {model} at M={M}: relative error {error:.2e}"
            times = {name: time_us(graphed(fn)) if on_gpu else cpu_time_us(fn) for name, fn in contenders.items()}
            for name, us in times.items():
                results.append({"model": model, "M": M, "contender": name, "us": us, "speedup": times["fp16"] / us, "twin_error": error})
            print(f"{model} M={M:5d}: " + "  ".join(f"{n} {us:.1f} us x{times['fp16'] / us:.2f}" for n, us in times.items()), flush=True)
    return results


def markdown(meta: dict, results: list[dict], layers: dict[str, LayerShape]) -> str:
    lines = [
        "# One decoder layer's linear layers: W8A8 against fp16",
        "",
        f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}. Written by `benchmarks/smoothquant_speed.py`"
        + {"full": ".", "fast": " (fast mode).", "interpreter": " on CPU under Triton's interpreter: a smoke test, the times mean nothing."}[meta["mode"]],
        "",
        (
            "Seven linear layers per call (q, k, v, o, gate, up, down), each contender captured in one CUDA graph. "
            "w8a8: four per-token quantizations of the layer's distinct inputs plus seven int8 GEMMs with the rescale "
            "fused, fp16 in and out; w8a8 gemm only: the GEMMs on activations quantized beforehand. Microseconds are "
            "medians with a cold L2 cache; speedup over fp16 `F.linear`."
        ),
        "",
    ]
    for model, shape in layers.items():
        lines += [
            f"## {model}: hidden {shape.hidden}, FFN {shape.ffn}, q {shape.q_out}, k/v {shape.kv_out}",
            "",
            "| M | fp16 us | w8a8 us | speedup | w8a8 gemm only us | speedup |",
            "|---|---|---|---|---|---|",
        ]
        for M in sorted({r["M"] for r in results if r["model"] == model}):
            r = {x["contender"]: x for x in results if x["model"] == model and x["M"] == M}
            lines.append(
                f"| {M} | {r['fp16']['us']:.1f} | {r['w8a8']['us']:.1f} | {r['w8a8']['speedup']:.2f}x "
                f"| {r['w8a8 gemm only']['us']:.1f} | {r['w8a8 gemm only']['speedup']:.2f}x |"
            )
        lines.append("")
    lines += [f"Published: {PUBLISHED}", ""]
    return "\n".join(lines)


def main() -> None:
    import triton

    from quantcourse.kernels.common import ENV_HINT, interpreting
    from quantcourse.runtime import fast_mode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for smoothquant_speed.{json,md}")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available() and not interpreting()
    if not on_gpu and not interpreting():
        raise SystemExit(f"benchmarks/smoothquant_speed.py measures GPU kernels: run it on a CUDA GPU, or {ENV_HINT} for the CPU smoke test")
    mode = "interpreter" if not on_gpu else ("fast" if fast_mode() else "full")
    layers = LAYERS if on_gpu else INTERPRETER_LAYERS
    rows = {"full": ROWS, "fast": FAST_ROWS, "interpreter": INTERPRETER_ROWS}[mode]
    results = measure(layers, rows, on_gpu)
    meta = {
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "mode": mode,
        "layers": {name: asdict(shape) for name, shape in layers.items()},
        "date": time.strftime("%Y-%m-%d"),
    }
    stem = {"full": "smoothquant_speed", "fast": "smoothquant_speed.fast", "interpreter": "smoothquant_speed.interpreter"}[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(meta, results, layers))
    print(markdown(meta, results, layers))


if __name__ == "__main__":
    main()
