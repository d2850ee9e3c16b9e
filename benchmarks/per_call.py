"""What one matmul costs a Python caller at M = 1, launch overhead included.

benchmarks/kernels.py times the GPU alone: the launch is hidden behind a 1 GiB read, as a decoder
hides it with CUDA graphs. A plain PyTorch decode loop has no graphs, and then a small matmul
costs what its Python call costs, whatever the kernel. That is how ANCHORS.md's bitsandbytes
figure (matmul_4bit, 47.6 us at 4096 x 4096, the target's baseline) behaves: 47-48 us at 4096 x
4096, 4096 x 11008 and 8192 x 8192 alike, so it measures the call, not the kernel.

Here each contender is called back to back, `calls` times, from Python, with the weight warm in
L2 (as in such a loop at small shapes) and one synchronization at the end: microseconds per call
= elapsed / calls. Also reported: the host time of one call (the GPU idle, synchronized after
each call), i.e. the floor that launch overhead sets.

Usage (needs a CUDA GPU):  python benchmarks/per_call.py   -> benchmarks/results/per_call.{json,md}
"""

import json
import platform
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


def back_to_back_us(fn, calls: int = 2000) -> float:
    """Microseconds per call when `calls` calls are issued back to back (one sync at the end)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def host_us(fn, calls: int = 500) -> float:
    """Median microseconds the host spends issuing one call (GPU idle before each)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def contenders(W: torch.Tensor) -> dict:
    """fp16 cuBLAS, our NF4 matmul and bitsandbytes' on the same NF4 bytes (block 64, double quant)."""
    packed, state = bnb_F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    return {
        "fp16": lambda x: x @ W.T,
        "nf4": lambda x: nk.nf4_matmul(x, packed, state),
        "nf4 (bitsandbytes)": lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state),
    }


def rows() -> list[dict]:
    out = []
    for K, N in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        W = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float16) * 0.02
        x = torch.randn(1, K, device="cuda", generator=g, dtype=torch.float16)
        for name, fn in contenders(W).items():
            call = partial(fn, x)
            out.append({"kernel": name, "K": K, "N": N, "per_call_us": back_to_back_us(call), "host_us": host_us(call)})
            print(json.dumps(out[-1]), flush=True)
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# One matmul per Python call, launch overhead included (M = 1)",
        "",
        (
            "Back-to-back calls from Python with one synchronization at the end (per call = elapsed / calls), "
            "and the host's time to issue one call. This is the measurement under ANCHORS.md's bitsandbytes figures; "
            "benchmarks/kernels.md times the GPU alone."
        ),
        "",
        "| kernel | W [N x K] | per call us | host us per call | vs bitsandbytes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((b for b in rows if b["kernel"] == "nf4 (bitsandbytes)" and (b["K"], b["N"]) == (r["K"], r["N"])), None)
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
