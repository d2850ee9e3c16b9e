"""What one matmul costs a Python caller at M = 1, launch overhead included.

benchmarks/kernels.py times the GPU alone: the launch is hidden behind a 1 GiB read, as a decoder
hides it with CUDA graphs. A plain PyTorch decode loop has no graphs, and then a small matmul
costs what its Python call costs, whatever the kernel. That is how ANCHORS.md's bitsandbytes
figure (matmul_4bit, 47.6 us at 4096 x 4096, the target's baseline) behaves: 47-48 us at 4096 x
4096, 4096 x 11008 and 8192 x 8192 alike, so it measures the call, not the kernel.

Here each contender is called back to back, `calls` times, from Python, with the weight warm in
L2 (as in such a loop at small shapes) and one synchronization at the end: microseconds per call
= elapsed / calls. Also reported: the host time of one call (the GPU idle, synchronized after
each call), i.e. the floor that launch overhead sets. The host's speed drifts (the same fp16
call measured 22 to 33 us in different runs), so the contenders take turns, ROUNDS times, and
each figure is the median of its rounds.

Our NF4 GEMV runs two ways: `TritonLinear4bit` (the layer, as a model calls it: nn.Module call,
then the GEMV relaunched without Triton's per-call dispatch, kernels/common.py's Relaunch), and
the function `nf4_matmul`, which checks its arguments and goes through Triton's dispatch on
every call. The issue's target is the layer's: at least 2x bitsandbytes' matmul_4bit per call
at 4096 x 4096 (TARGET).

Usage (needs a CUDA GPU):  python benchmarks/per_call.py   -> benchmarks/results/per_call.{json,md}
"""

import json
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_F
import torch
import triton
from quantcourse.kernels import nf4 as nk

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 4096), (4096, 11008), (8192, 8192), (8192, 28672)]  # (K, N) of W [N, K], x [1, K]
BASELINE = "nf4 (bitsandbytes)"
TARGET = ("nf4 (TritonLinear4bit)", 4096, 4096, 2.0)  # (kernel, K, N, minimum speedup per call over BASELINE)
ROUNDS = 7


def back_to_back_us(fn, calls: int = 500) -> float:
    """Microseconds per call when `calls` calls are issued back to back (one sync at the end)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def host_us(fn, calls: int = 200) -> float:
    """Median microseconds the host spends issuing one call (GPU idle before each)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def contenders(W: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """fp16 cuBLAS, our NF4 layer and function, and bitsandbytes' matmul on the same NF4 bytes
    (block 64, double quantization); and those bytes dequantized (to check the results)."""
    packed, state = bnb_F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    layer = nk.TritonLinear4bit(packed, state)
    return {
        "fp16": lambda x: x @ W.T,
        "nf4 (TritonLinear4bit)": layer,
        "nf4 (nf4_matmul)": lambda x: nk.nf4_matmul(x, packed, state),
        BASELINE: lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state),
    }, bnb_F.dequantize_4bit(packed, state)


def rows() -> list[dict]:
    out = []
    for K, N in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        W = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float16) * 0.02
        x = torch.randn(1, K, device="cuda", generator=g, dtype=torch.float16)
        calls, W_hat = contenders(W)
        for name, fn in calls.items():
            expected = x @ (W if name == "fp16" else W_hat).T
            assert (fn(x) - expected).abs().max() <= 0.01 * expected.abs().max(), name  # fp16 sums in other orders
        rounds = {name: [] for name in calls}
        for _ in range(ROUNDS):
            for name, fn in calls.items():
                call = partial(fn, x)
                rounds[name].append((back_to_back_us(call), host_us(call)))
        for name, measured in rounds.items():
            per_call, host = (statistics.median(m[i] for m in measured) for i in (0, 1))
            out.append({"kernel": name, "K": K, "N": N, "per_call_us": per_call, "host_us": host, "rounds": measured})
            print(json.dumps({k: v for k, v in out[-1].items() if k != "rounds"}), flush=True)
    return out


def target_line(rows: list[dict]) -> str:
    """The issue's target, met or missed, from the measured rows."""
    kernel, K, N, target = TARGET
    ours = next((r for r in rows if (r["kernel"], r["K"], r["N"]) == (kernel, K, N)), None)
    base = next((r for r in rows if (r["kernel"], r["K"], r["N"]) == (BASELINE, K, N)), None)
    if ours is None or base is None:
        return f"| {kernel} | {N} x {K} | {target:.1f}x over {BASELINE} | not measured | |"
    speedup = base["per_call_us"] / ours["per_call_us"]
    verdict = "met" if speedup >= target else f"missed by {target / speedup - 1:.0%}"
    return f"| {kernel} | {N} x {K} | {target:.1f}x over {BASELINE} | {speedup:.2f}x | {verdict} |"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# One matmul per Python call, launch overhead included (M = 1)",
        "",
        (
            "Back-to-back calls from Python with one synchronization at the end (per call = elapsed / calls), "
            f"and the host's time to issue one call; medians of {ROUNDS} rounds in which the contenders take turns. "
            "This is the measurement under ANCHORS.md's bitsandbytes figures; benchmarks/kernels.md times the GPU alone."
        ),
        "",
        "| kernel | W [N x K] | target per call | measured | |",
        "|---|---|---|---|---|",
        target_line(rows),
        "",
        "| kernel | W [N x K] | per call us | host us per call | vs bitsandbytes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((b for b in rows if b["kernel"] == BASELINE and (b["K"], b["N"]) == (r["K"], r["N"])), None)
        ratio = f"{base['per_call_us'] / r['per_call_us']:.2f}x" if base else ""
        lines.append(f"| {r['kernel']} | {r['N']} x {r['K']} | {r['per_call_us']:.1f} | {r['host_us']:.1f} | {ratio} |")
    machine = (
        f"Machine: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, bitsandbytes "
        f"{meta['bitsandbytes']}; {meta['date']}. Command: `python benchmarks/per_call.py`."
    )
    lines += ["", machine, ""]
    return "\n".join(lines)


def main() -> None:
    measured = rows()
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "bitsandbytes": bnb.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "per_call.json").write_text(json.dumps({"meta": meta, "rows": measured}, indent=2) + "\n")
    (RESULTS / "per_call.md").write_text(markdown(measured, meta))
    print(markdown(measured, meta))


if __name__ == "__main__":
    main()
