"""Speed of the course's Triton kernels on a GPU: W4A16, W8A8, NF4 and GGUF Q4_0/Q8_0 against
fp16 cuBLAS (and bitsandbytes NF4 when it is installed), the memory bandwidth the quantize
kernels reach, and decode attention over an int8/fp8 KV cache against fp16
`scaled_dot_product_attention`.

Usage (needs a CUDA GPU):  python benchmarks/kernels.py [--out DIR] [--only SECTION ...]
Writes kernels.json, kernels.md and kernels.png to benchmarks/results/ (or DIR). With
QUANTCOURSE_FAST=1 it measures fewer shapes and writes kernels.fast.* instead. Sections:
matmuls, quantize, attention, gguf (all by default). `--only attention gguf` measures those
two and keeps the other sections' rows from the results file already there (the report says
which rows come from which run).

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

from quantcourse.kernels import gguf as gk
from quantcourse.kernels import kv_attention as ka
from quantcourse.kernels import nf4 as nk
from quantcourse.kernels import quantize as qk
from quantcourse.kernels import w4a16 as w4
from quantcourse.kernels import w8a8 as w8
from quantcourse.reference_impl.kvcache import (
    dequantize_fp8,
    dequantize_int8_per_token,
    fp8_scale,
    quantize_fp8,
    quantize_int8_per_token,
)
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
    ("nf4", 8192, 28672, 1, 2.5, "fp16"),
]
# The NF4 target at 4096 x 4096 (2x bitsandbytes' matmul_4bit, 47.6 us in ANCHORS.md) is one per
# Python call: a GEMV of that size takes far less GPU time than its call, for bitsandbytes too.
# benchmarks/per_call.py measures it; the table below points there.
PER_CALL_TARGET = "| nf4 | 4096 x 4096 | 1 | 2.0x over nf4 (bitsandbytes), per Python call | per_call.md | |"
QUANTIZE_TARGET = 0.70  # fraction of the read bandwidth
# Decode attention: one new token per sequence over T cached tokens, Llama-3-8B-like heads.
ATTENTION_TOKENS = [4096, 32768, 131072]
ATTENTION_HEADS = (32, 8, 128)  # query heads, KV heads, head dim
ATTENTION_BASELINE = "attention fp16 (SDPA)"  # the fastest SDPA backend that runs, on the dequantized cache
ATTENTION_TARGETS = [  # (kernel, T, minimum speedup, over): issue 11, either cache type
    ("attention int8", 32768, 1.6, ATTENTION_BASELINE),
    ("attention fp8 e4m3", 32768, 1.6, ATTENTION_BASELINE),
]
GGUF_SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672)]  # (K, N), M = 1
SECTIONS = {  # section -> its keys in kernels.json
    "matmuls": ("rows", "configs"),
    "quantize": ("quantize",),
    "attention": ("attention", "attention_configs"),
    "gguf": ("gguf", "gguf_configs"),
}


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


def sdpa_backends():
    """(name, backend) of the scaled_dot_product_attention backends to try on the GPU."""
    from torch.nn.attention import SDPBackend

    return [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]  # fmt: skip


def attention_rows(T: int, read_bps: float) -> list[dict]:
    """Decode attention at T cached tokens (batch 1): our kernel on an int8 and an fp8 e4m3 cache
    against fp16 SDPA on the int8 cache dequantized to fp16, every backend that runs; the
    baseline row is the fastest of them. Bytes: the cache (codes and scales) read once."""
    from torch.nn.attention import sdpa_kernel

    H_q, H_kv, D = ATTENTION_HEADS
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H_q, D, device="cuda", generator=g, dtype=torch.float16)
    k = torch.randn(1, H_kv, T, D, device="cuda", generator=g, dtype=torch.float16)
    v = torch.randn(1, H_kv, T, D, device="cuda", generator=g, dtype=torch.float16)
    k8, k8_scale = quantize_int8_per_token(k)
    v8, v8_scale = quantize_int8_per_token(v)
    k16, v16 = dequantize_int8_per_token(k8, k8_scale).half(), dequantize_int8_per_token(v8, v8_scale).half()
    fp8 = torch.float8_e4m3fn
    kf_scale, vf_scale = fp8_scale(k.abs().amax(), fp8), fp8_scale(v.abs().amax(), fp8)
    kf, vf = quantize_fp8(k, kf_scale, fp8), quantize_fp8(v, vf_scale, fp8)
    del k, v

    def sdpa(keys, values, backend=None):
        def call():
            if backend is None:  # torch's own choice
                return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]

        return call

    fp16_bytes = 2 * k16.numel() * 2
    calls = {"attention fp16 (SDPA default)": (sdpa(k16, v16), fp16_bytes)}  # name -> (call, bytes)
    for name, backend in sdpa_backends():
        try:
            sdpa(k16, v16, backend)()
        except RuntimeError:  # this backend does not take these shapes (or is not built in)
            continue
        calls[f"attention fp16 (SDPA {name})"] = (sdpa(k16, v16, backend), fp16_bytes)
    calls["attention int8"] = (lambda: ka.decode_attention(q, k8, v8, k8_scale, v8_scale), ka.cache_bytes(k8))
    calls["attention fp8 e4m3"] = (lambda: ka.decode_attention(q, kf, vf, kf_scale, vf_scale), ka.cache_bytes(kf))
    kf16, vf16 = dequantize_fp8(kf, kf_scale).half(), dequantize_fp8(vf, vf_scale).half()
    expected = {"attention int8": sdpa(k16, v16)(), "attention fp8 e4m3": sdpa(kf16, vf16)()}
    for name, ref in expected.items():
        err = (calls[name][0]().float() - ref.float()).norm() / ref.float().norm()
        assert err < 5e-3, f"{name} is wrong at T={T}: relative error {err:.2e} against SDPA"
    out, configs = [], {"kernel": "configs", "T": T}
    for name, (fn, nbytes) in calls.items():
        us = time_us(fn)
        out.append({"kernel": name, "T": T, "us": us, "bytes": nbytes, "GBps": nbytes / us / 1e3,
                    "read_fraction": nbytes / (us * 1e-6) / read_bps})  # fmt: skip
        if not name.startswith("attention fp16"):
            configs[name] = str(ka._decode_attention_kernel.best_config)
    fastest = min((r for r in out if r["kernel"].startswith("attention fp16")), key=lambda r: r["us"])
    backend = fastest["kernel"].removeprefix("attention fp16 (SDPA ").removesuffix(")")
    out.insert(0, {**fastest, "kernel": ATTENTION_BASELINE, "backend": backend})
    for r in out:
        r["speedup"] = fastest["us"] / r["us"]
    print(f"T={T:6d}: " + "  ".join(f"{r['kernel']} {r['us']:.1f}us x{r['speedup']:.2f}" for r in out[1:]), flush=True)
    return out + [configs]


def gguf_rows(K: int, N: int, read_bps: float) -> list[dict]:
    """GGUF Q4_0 and Q8_0 GEMV at M = 1 against fp16 F.linear on the same weight dequantized, and
    dequantize_gguf to fp16. Random codes and scales (any bytes make valid blocks), built on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    d = torch.rand(N, K // 32, device="cuda", generator=g) * 0.004 + 0.001
    blocks = {
        "Q4_0": gk.pack_blocks(d, torch.randint(0, 16, (N, K), device="cuda", generator=g), "Q4_0"),
        "Q8_0": gk.pack_blocks(d / 16, torch.randint(-127, 128, (N, K), device="cuda", generator=g), "Q8_0"),
    }
    W = gk.dequantize_gguf(blocks["Q4_0"], "Q4_0", torch.float16)
    x = torch.randn(1, K, device="cuda", generator=g, dtype=torch.float16)
    calls = {"fp16": (lambda: F.linear(x, W), W.numel() * 2)}
    for qtype, b in blocks.items():
        reference = F.linear(x.float(), gk.dequantize_gguf(b, qtype))
        err = (gk.gguf_matmul(x, b, qtype).float() - reference).norm() / reference.norm()
        assert err < 2e-3, f"gguf {qtype} is wrong at K={K} N={N}: relative error {err:.2e}"
        calls[f"gguf {qtype}"] = (lambda b=b, qtype=qtype: gk.gguf_matmul(x, b, qtype), b.numel())
    out, configs = [], {"kernel": "configs", "K": K, "N": N, "M": 1}
    for name, (fn, nbytes) in calls.items():
        us = time_us(fn)
        out.append({"kernel": name, "K": K, "N": N, "M": 1, "us": us, "weight_bytes": nbytes,
                    "weight_GBps": nbytes / us / 1e3, "read_fraction": nbytes / (us * 1e-6) / read_bps})  # fmt: skip
        if name.startswith("gguf"):
            configs[name] = str(gk._gguf_gemv_kernel.best_config)
    for r in out:
        r["speedup"] = out[0]["us"] / r["us"]
    for qtype, b in blocks.items():  # one pass: read the blocks, write fp16 (bytes moved: both)
        us = time_us(lambda b=b, qtype=qtype: gk.dequantize_gguf(b, qtype, torch.float16))
        nbytes = b.numel() + N * K * 2
        out.append({"kernel": f"dequantize_gguf {qtype} -> fp16", "K": K, "N": N, "us": us, "bytes": nbytes,
                    "GBps": nbytes / us / 1e3, "read_fraction": nbytes / (us * 1e-6) / read_bps})  # fmt: skip
    print(f"K={K:5d} N={N:5d} M=1: " + "  ".join(f"{r['kernel']} {r['us']:.1f}us" for r in out), flush=True)
    return out + [configs]


def find(rows, kernel, K, N, M):
    return next((r for r in rows if r["kernel"] == kernel and (r["K"], r["N"], r["M"]) == (K, N, M)), None)


def attention_target_lines(rows: list[dict]) -> list[str]:
    """Rows of the Targets table for decode attention (T cached tokens, one query token)."""
    lines = []
    for kernel, T, target, baseline in ATTENTION_TARGETS:
        r = next((r for r in rows if r["kernel"] == kernel and r["T"] == T), None)
        base = next((r for r in rows if r["kernel"] == baseline and r["T"] == T), None)
        if r and base:
            speedup = base["us"] / r["us"]
            verdict = "met" if speedup >= target else f"missed by {target / speedup - 1:.0%}"
            lines.append(f"| {kernel} | T = {T} | 1 | {target:.1f}x over {baseline} | {speedup:.2f}x | {verdict} |")
    return lines


def attention_markdown(rows: list[dict]) -> list[str]:
    H_q, H_kv, D = ATTENTION_HEADS
    about = (
        f"One new token per sequence (batch 1) over T cached tokens, {H_q} query heads, {H_kv} KV heads of "
        f"{D} (Llama-3-8B-like): `kv_attention.decode_attention` on an int8 cache (one float32 scale per "
        "token and head) and an fp8 e4m3 cache (one scale per tensor), against fp16 "
        "`scaled_dot_product_attention` (enable_gqa) on the int8 cache dequantized to fp16; each SDPA "
        f"backend that runs is timed, and '{ATTENTION_BASELINE}' is the fastest of them. GB/s counts the "
        "cache's bytes (K and V codes and scales) read once."
    )
    lines = ["", "## Decode attention (quantized KV cache)", "", about, "",
             "| kernel | cached tokens | us | GB/s | of read BW | speedup vs fp16 SDPA |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "us" in r:
            name = f"{r['kernel']}, fastest: {r['backend']}" if "backend" in r else r["kernel"]
            lines.append(f"| {name} | {r['T']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['read_fraction']:.0%} "
                         f"| {r['speedup']:.2f}x |")  # fmt: skip
    return lines


def gguf_markdown(rows: list[dict]) -> list[str]:
    about = (
        "`gguf.gguf_matmul` reading llama.cpp's blocks (Q4_0: 18 bytes per 32 weights, Q8_0: 34) against "
        "fp16 `F.linear` on the same weight dequantized. GB/s counts the weight's bytes (blocks, scales "
        "included); the dequantize rows count the blocks read and the fp16 weight written."
    )
    lines = ["", "## GGUF Q4_0 / Q8_0 (M = 1)", "", about, "",
             "| kernel | K x N | M | us | weight GB/s | of read BW | speedup vs fp16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "weight_GBps" in r:
            lines.append(f"| {r['kernel']} | {r['K']} x {r['N']} | {r['M']} | {r['us']:.1f} | {r['weight_GBps']:.0f} "
                         f"| {r['read_fraction']:.0%} | {r['speedup']:.2f}x |")  # fmt: skip
    dequantize = [r for r in rows if r["kernel"].startswith("dequantize")]
    if dequantize:
        lines += ["", "| kernel | K x N | us | GB/s read + written | of read BW |", "|---|---|---|---|---|"]
        for r in dequantize:
            lines.append(f"| {r['kernel']} | {r['K']} x {r['N']} | {r['us']:.1f} | {r['GBps']:.0f} | {r['read_fraction']:.0%} |")
    return lines


def runs_line(meta: dict) -> list[str]:
    """Which sections an earlier run measured, when `--only` kept them (meta['sections'])."""
    sections = meta.get("sections", {})
    kept = [name for name, run in sections.items() if run.get("kept")]
    if not kept:
        return []

    def describe(names):
        return ", ".join(f"{n} ({sections[n]['device']}, read bandwidth {sections[n]['read_TBps']:.2f} TB/s)" for n in names)

    measured = [name for name in sections if name not in kept]
    return ["", f"Measured in this run: {describe(measured) or 'nothing'}. Kept from an earlier run: {describe(kept)}."]


def markdown(meta: dict, rows: list[dict], quant: list[dict], attention: list[dict] = (), gguf: list[dict] = ()) -> str:
    lines = [
        "# Triton kernels on the GPU",
        "",
        (
            f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bitsandbytes']}; "
            f"measured read bandwidth {meta['read_TBps']:.2f} TB/s. Written by `benchmarks/kernels.py`"
            + (" (fast mode)." if meta["fast_mode"] else ".")
        ),
        *runs_line(meta),
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
    lines.append(PER_CALL_TARGET)
    lines += attention_target_lines(list(attention))
    if quant:
        worst = min(quant, key=lambda r: r["read_fraction"])
        lines.append(
            f"| quantize kernels | | | {QUANTIZE_TARGET:.0%} of read BW | lowest {worst['read_fraction']:.0%} "
            f"({worst['kernel']}) | {'met' if worst['read_fraction'] >= QUANTIZE_TARGET else 'missed'} |"
        )
    if rows:
        lines += ["", "## Matmuls", "", "| kernel | K x N | M | us | weight GB/s | of read BW | speedup vs fp16 |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            if "us" in r:
                lines.append(
                    f"| {r['kernel']} | {r['K']} x {r['N']} | {r['M']} | {r['us']:.1f} | {r['weight_GBps']:.0f} "
                    f"| {r['read_fraction']:.0%} | {r['speedup']:.2f}x |"
                )
    if gguf:
        lines += gguf_markdown(list(gguf))
    if attention:
        lines += attention_markdown(list(attention))
    if quant:
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


def measure(section: str, fast: bool, read_bps: float) -> dict[str, list]:
    """Run one section; returns its rows under their kernels.json keys (SECTIONS)."""
    if section == "matmuls":
        shapes, rows = (SHAPES[:1] + SHAPES[3:4], ROWS[:2]) if fast else (SHAPES, ROWS)
        results = [r for K, N in shapes for r in matmul_rows(K, N, rows, read_bps)]
        return {"rows": [r for r in results if "us" in r], "configs": [r for r in results if "us" not in r]}
    if section == "quantize":
        return {"quantize": quantize_rows(read_bps)}
    if section == "attention":
        results = [r for T in (ATTENTION_TOKENS[:2] if fast else ATTENTION_TOKENS) for r in attention_rows(T, read_bps)]
        return {"attention": [r for r in results if "us" in r],
                "attention_configs": [r for r in results if "us" not in r]}  # fmt: skip
    results = [r for K, N in (GGUF_SHAPES[:2] if fast else GGUF_SHAPES) for r in gguf_rows(K, N, read_bps)]
    return {"gguf": [r for r in results if "us" in r], "gguf_configs": [r for r in results if "us" not in r]}


def combine(previous: dict, fresh: dict[str, dict], meta: dict) -> dict:
    """The contents of kernels.json: the sections measured now (`fresh`: section -> its keys and
    rows) and, for the others, the rows of the previous file. meta['sections'] records each
    section's run; the top-level meta stays that of the matmul rows' run (the lab reads it with them)."""
    data = {key: [] for keys in SECTIONS.values() for key in keys}
    sections = {}
    old_meta = previous.get("meta", {})
    for section, keys in SECTIONS.items():
        if section in fresh:
            data.update(fresh[section])
            sections[section] = {"device": meta["device"], "read_TBps": meta["read_TBps"]}
        elif any(previous.get(key) for key in keys):
            data.update({key: previous.get(key, []) for key in keys})
            run = old_meta.get("sections", {}).get(section, old_meta)
            sections[section] = {"device": run["device"], "read_TBps": run["read_TBps"], "kept": True}
    if sections.get("matmuls", {}).get("kept"):
        meta = {key: value for key, value in old_meta.items() if key != "sections"}
    return {"meta": {**meta, "sections": sections}, **data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for kernels.{json,md,png}")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="measure these sections; the others keep their rows from the results file")  # fmt: skip
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite kernels.md and .png from kernels.json (after a change to the tables)")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        render(args.out / "kernels.json")
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py measures GPU kernels: it needs a CUDA GPU")
    fast = fast_mode()
    stem = "kernels.fast" if fast else "kernels"
    path = args.out / f"{stem}.json"
    previous = json.loads(path.read_text()) if set(args.only) != set(SECTIONS) and path.is_file() else {}
    read_bps = read_bandwidth()
    print(f"read bandwidth {read_bps / 1e12:.2f} TB/s", flush=True)
    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = "not installed"
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "bitsandbytes": bnb_version, "python": platform.python_version(), "read_TBps": read_bps / 1e12,
            "group_size": GROUP, "fast_mode": fast}  # fmt: skip
    fresh = {section: measure(section, fast, read_bps) for section in SECTIONS if section in args.only}
    results = combine(previous, fresh, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    render(path)


def render(path: Path) -> None:
    """kernels.md and kernels.png next to the results file `path`, from its rows."""
    results = json.loads(path.read_text())
    text = markdown(results["meta"], results["rows"], results["quantize"], results["attention"], results["gguf"])
    path.with_suffix(".md").write_text(text)
    if results["rows"]:
        shapes = sorted({(r["K"], r["N"]) for r in results["rows"]}, key=SHAPES.index)
        plot(results["rows"], shapes, path.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
