"""Speed of the course's Triton kernels on a GPU: W4A16, W8A8 and NF4 against fp16 cuBLAS (and
bitsandbytes NF4 when it is installed), and the memory bandwidth the quantize kernels reach.

Usage (needs a CUDA GPU):  python benchmarks/kernels.py [--out DIR]
Writes kernels.json, kernels.md and kernels.png to benchmarks/results/ (or DIR). With
QUANTCOURSE_FAST=1 it measures two shapes and writes kernels.fast.* instead.

Timing (`time_us`): CUDA events around each call, median of 100 calls after a warm-up. Before
each call the GPU reads a 1 GiB buffer (about 0.35 ms): that empties the L2 cache of the weights
(they come from memory, as they do in a decoder) and keeps the GPU busy while Python launches
the call, so launch overhead counts for no contender (a decoder hides it with CUDA graphs). A read, not a write as triton.testing.do_bench uses:
after a write the L2 cache holds ~50 MB of dirty lines, and writing them back during the next
call made every contender ~10 us slower (fp16 8192 x 8192 at M = 1: 60 us instead of 50).
Bandwidth: bytes of the weight (codes, scales, zero points) over the time, as a fraction of
the read bandwidth measured in the same run (the sum of a 1 GiB tensor).
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from quantcourse.kernels import nf4 as nk
from quantcourse.kernels import quantize as qk
from quantcourse.kernels import w4a16 as w4
from quantcourse.kernels import w8a8 as w8
from quantcourse.reference_impl.llm_int8 import int8_vectorwise_quant
from quantcourse.reference_impl.nf4 import quantize_4bit
from quantcourse.runtime import fast_mode

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]  # (K, N)
ROWS = [1, 16, 64, 256, 4096]
GROUP = 128
TARGETS = [  # (kernel, K, N, M, minimum speedup, over which contender), from the course's issue
    ("w4a16", 8192, 8192, 1, 2.5, "fp16"),
    ("w4a16", 8192, 28672, 1, 3.0, "fp16"),
    ("w4a16", 4096, 4096, 1, 2.0, "fp16"),
    ("w4a16", 8192, 8192, 16, 2.0, "fp16"),
    ("w8a8", 8192, 8192, 4096, 1.5, "fp16"),
    ("w8a8-gemm", 8192, 8192, 4096, 1.5, "fp16"),
    ("nf4", 4096, 4096, 1, 2.0, "nf4 (bitsandbytes)"),
    ("nf4", 8192, 28672, 1, 2.5, "fp16"),
]
QUANTIZE_TARGET = 0.70  # fraction of the read bandwidth


_flush: list[torch.Tensor] = []


def time_us(fn, calls: int = 100, warmup: int = 5) -> float:
    """Median microseconds of fn() with a cold L2 cache (module doc)."""
    if not _flush:
        _flush.append(torch.empty(2**28, device="cuda"))  # 1 GiB
    for _ in range(warmup):  # compiles and autotunes on the first call
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(calls)]
    for start, end in zip(starts, ends):
        _flush[0].sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1000


def read_bandwidth() -> float:
    """Bytes per second of summing a 1 GiB float32 tensor."""
    x = torch.randn(2**28, device="cuda")
    return x.numel() * 4 / (time_us(x.sum, calls=30) * 1e-6)


def nf4_contenders(W: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """NF4 (blocksize 64, double quantization) of W: our kernels and, when it is installed,
    bitsandbytes' matmul_4bit, on the same bytes. Returns {name: (function of x, weight bytes)}
    and the dequantized weight (float32, for a correctness check)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_F
    except ImportError:
        bnb = None
    if bnb is not None:
        packed, state = bnb_F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    else:  # the twin, byte for byte bitsandbytes', runs on CPU
        packed, state = quantize_4bit(W.cpu(), blocksize=64, quant_type="nf4", compress_statistics=True)
        packed, state = packed.to(W.device), nk.state_to(state, W.device)
    nbytes = packed.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4
    contenders = {"nf4": ((lambda x: nk.nf4_matmul(x, packed, state)), nbytes)}
    if bnb is not None:
        contenders["nf4 (bitsandbytes)"] = ((lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)), nbytes)
    return contenders, nk.dequantize_nf4(packed, state, torch.float32)


def matmul_rows(K: int, N: int, rows: list[int], read_bps: float) -> list[dict]:
    """Every contender on one weight shape, for every M."""
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float16) * 0.02
    qweight, scales, _ = qk.quantize_int4(W, GROUP)
    scales = scales.half()
    _, _, qzeros = qk.quantize_int4(W, GROUP, symmetric=False)
    w_codes, w_absmax, _ = int8_vectorwise_quant(W)
    W_hat = qk.dequantize_int4(qweight, scales, None, GROUP)  # float32, for a correctness check
    contenders = {  # name -> (function of x, weight bytes)
        "fp16": (lambda x: F.linear(x, W), W.numel() * 2),
        "w4a16": (lambda x: w4.w4a16_matmul(x, qweight, scales), qweight.numel() * 4 + scales.numel() * 2),
        "w4a16-asym": (
            lambda x: w4.w4a16_matmul(x, qweight, scales, qzeros),
            qweight.numel() * 4 + scales.numel() * 2 + qzeros.numel() * 4,
        ),
        "w8a8": (
            lambda x: w8.w8a8_matmul(*w8.quantize_per_token(x), w_codes, w_absmax),
            w_codes.numel() + w_absmax.numel() * 4,
        ),
    }
    nf4, W_nf4 = nf4_contenders(W)
    contenders.update(nf4)
    out = []
    for M in rows:
        x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.float16)
        x_codes, x_absmax = w8.quantize_per_token(x)
        calls = {name: (lambda fn=fn, x=x: fn(x), nbytes) for name, (fn, nbytes) in contenders.items()}
        gemm_only = lambda codes=x_codes, absmax=x_absmax: w8.w8a8_matmul(codes, absmax, w_codes, w_absmax)
        calls["w8a8-gemm"] = (gemm_only, contenders["w8a8"][1])
        reference = F.linear(x.float(), W_hat)
        err = (w4.w4a16_matmul(x, qweight, scales).float() - reference).norm() / reference.norm()
        assert err < 2e-3, f"w4a16 is wrong at K={K} N={N} M={M}: relative error {err:.2e}"
        reference = F.linear(x.float(), W_nf4)
        err = (nf4["nf4"][0](x).float() - reference).norm() / reference.norm()
        assert err < 2e-3, f"nf4 is wrong at K={K} N={N} M={M}: relative error {err:.2e}"
        for name, (fn, nbytes) in calls.items():
            if name == "w4a16-asym" and M > 16:
                continue
            us = time_us(fn)
            out.append({"kernel": name, "K": K, "N": N, "M": M, "us": us, "weight_bytes": nbytes,
                        "weight_GBps": nbytes / us / 1e3, "read_fraction": nbytes / (us * 1e-6) / read_bps})  # fmt: skip
        out.append({"kernel": "configs", "K": K, "N": N, "M": M,
                    "w4a16": "dequantize_int4 + cuBLAS" if M >= w4.DEQUANTIZE_MIN_M else
                    str((w4._w4a16_gemv_kernel if M == 1 else w4._w4a16_gemm_kernel).best_config),
                    "w8a8": str(w8._int8_matmul_kernel.best_config),
                    "nf4": str(nk._nf4_gemv_kernel.best_config) if M == 1 else "dequantize_nf4 + cuBLAS"})  # fmt: skip
        fp16 = next(r["us"] for r in out if r["kernel"] == "fp16" and r["M"] == M)
        for r in out:
            if r["M"] == M and "us" in r:
                r["speedup"] = fp16 / r["us"]
        print(f"K={K:5d} N={N:5d} M={M:4d}: " + "  ".join(
            f"{r['kernel']} {r['us']:.1f}us x{r['speedup']:.2f}" for r in out if r["M"] == M and "us" in r
        ), flush=True)  # fmt: skip
    return out


def quantize_rows(read_bps: float) -> list[dict]:
    """Bytes read plus bytes written per second, for each quantize kernel on real tensors."""
    W = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    X = torch.randn(4096, 8192, device="cuda", dtype=torch.float16)
    q4 = qk.quantize_int4(W, GROUP)
    q4_scales = q4[1].half()
    q8 = qk.quantize_int8(W, GROUP)
    n = W.numel()
    cases = [  # (name, call, bytes moved)
        ("quantize_int8 per-channel", lambda: qk.quantize_int8(W), n * 3 + 8192 * 8),
        ("quantize_int8 g128", lambda: qk.quantize_int8(W, GROUP), n * 3 + n // GROUP * 8),
        ("quantize_int4 g128 sym", lambda: qk.quantize_int4(W, GROUP), n * 2.5 + n // GROUP * 4),
        ("quantize_int4 g128 asym", lambda: qk.quantize_int4(W, GROUP, False), n * 2.5 + n // GROUP * 4.5),
        ("dequantize_int8 g128 -> fp16", lambda: qk.dequantize_int8(*q8, GROUP, torch.float16), n * 3 + n // GROUP * 8),
        ("dequantize_int4 g128 -> fp16", lambda: qk.dequantize_int4(q4[0], q4_scales, None, GROUP, dtype=torch.float16),
         n * 2.5 + n // GROUP * 2),
        ("quantize_per_token (4096 x 8192)", lambda: w8.quantize_per_token(X), X.numel() * 3 + 4096 * 4),
    ]  # fmt: skip
    rows = []
    for name, fn, nbytes in cases:
        us = time_us(fn)
        rows.append({"kernel": name, "us": us, "bytes": nbytes, "GBps": nbytes / us / 1e3,
                     "read_fraction": nbytes / (us * 1e-6) / read_bps})  # fmt: skip
        print(f"{name}: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s ({rows[-1]['read_fraction']:.0%})", flush=True)
    return rows


def find(rows, kernel, K, N, M):
    return next((r for r in rows if r["kernel"] == kernel and (r["K"], r["N"], r["M"]) == (K, N, M)), None)


def markdown(meta: dict, rows: list[dict], quant: list[dict]) -> str:
    lines = [
        "# Triton kernels on the GPU",
        "",
        (
            f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bitsandbytes']}; "
            f"measured read bandwidth {meta['read_TBps']:.2f} TB/s. Written by `benchmarks/kernels.py`"
            + (" (fast mode)." if meta["fast_mode"] else ".")
        ),
        "",
        (
            f"W4A16: GPTQ layout, int4 groups of {GROUP} with fp16 scales (symmetric unless marked asym). "
            "W8A8: per-token int8 activations (quantized at every call, included) x per-channel int8 "
            "weights; w8a8-gemm is the int8 GEMM with its fused rescale alone. NF4: bitsandbytes' layout, "
            "blocks of 64 with double quantization, the same bytes for ours (`nf4`: the fused GEMV at M = 1, "
            "dequantize_nf4 + cuBLAS above) and for bitsandbytes' matmul_4bit. Microseconds are medians "
            "with a cold L2 cache; GB/s counts the weight's bytes (codes, scales, zero points, absmax); "
            "'of read BW' is that over the measured read bandwidth; speedup is over fp16 `F.linear`, "
            "except where a target names another contender."
        ),
        "",
        "## Targets",
        "",
        "| kernel | K x N | M | target | measured | |",
        "|---|---|---|---|---|---|",
    ]
    for kernel, K, N, M, target, baseline in TARGETS:
        r, base = find(rows, kernel, K, N, M), find(rows, baseline, K, N, M)
        if r and base:
            speedup = base["us"] / r["us"]
            verdict = "met" if speedup >= target else f"missed by {target / speedup - 1:.0%}"
            lines.append(f"| {kernel} | {K} x {N} | {M} | {target:.1f}x over {baseline} | {speedup:.2f}x | {verdict} |")
        elif r:
            lines.append(f"| {kernel} | {K} x {N} | {M} | {target:.1f}x over {baseline} | {baseline} not measured | |")
    worst = min(quant, key=lambda r: r["read_fraction"])
    lines.append(
        f"| quantize kernels | | | {QUANTIZE_TARGET:.0%} of read BW | lowest {worst['read_fraction']:.0%} "
        f"({worst['kernel']}) | {'met' if worst['read_fraction'] >= QUANTIZE_TARGET else 'missed'} |"
    )
    lines += ["", "## Matmuls", "", "| kernel | K x N | M | us | weight GB/s | of read BW | speedup vs fp16 |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "us" in r:
            lines.append(
                f"| {r['kernel']} | {r['K']} x {r['N']} | {r['M']} | {r['us']:.1f} | {r['weight_GBps']:.0f} "
                f"| {r['read_fraction']:.0%} | {r['speedup']:.2f}x |"
            )
    lines += ["", "## Quantize kernels (8192 x 8192 fp16 weight)", "",
              "| kernel | us | GB/s read + written | of read BW |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['kernel']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['read_fraction']:.0%} |" for r in quant]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], shapes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), sharey=True, squeeze=False)
    for ax, (K, N) in zip(axes[0], shapes):
        for kernel in ("w4a16", "nf4", "nf4 (bitsandbytes)", "w8a8", "w8a8-gemm"):
            points = [(r["M"], r["speedup"]) for r in rows if r["kernel"] == kernel and (r["K"], r["N"]) == (K, N)]
            if points:
                ax.plot(*zip(*points), marker="o", label=kernel)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"K x N = {K} x {N}")
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("speedup over fp16 F.linear")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for kernels.{json,md,png}")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py measures GPU kernels: it needs a CUDA GPU")
    fast = fast_mode()
    shapes, rows = (SHAPES[:1] + SHAPES[3:4], ROWS[:2]) if fast else (SHAPES, ROWS)
    read_bps = read_bandwidth()
    print(f"read bandwidth {read_bps / 1e12:.2f} TB/s", flush=True)
    results = [r for K, N in shapes for r in matmul_rows(K, N, rows, read_bps)]
    quant = quantize_rows(read_bps)
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "not installed"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "bitsandbytes": bnb_version, "python": platform.python_version(), "read_TBps": read_bps / 1e12,
            "group_size": GROUP, "fast_mode": fast}  # fmt: skip
    stem = "kernels.fast" if fast else "kernels"
    args.out.mkdir(parents=True, exist_ok=True)
    matmuls = [r for r in results if "us" in r]
    configs = [r for r in results if "us" not in r]
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "rows": matmuls, "configs": configs, "quantize": quant}, indent=1)
    )
    (args.out / f"{stem}.md").write_text(markdown(meta, matmuls, quant))
    plot(matmuls, shapes, args.out / f"{stem}.png")
    print(markdown(meta, matmuls, quant))


if __name__ == "__main__":
    main()
