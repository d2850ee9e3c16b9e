"""Decode attention over an int8 or fp8 KV cache against its twin (dequantize, then softmax
attention in float32): GQA ratios 1, 3 and 8, ragged T, B > 1, empty splits, cache views, every
query dtype, and the errors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU

import importlib.util
import math

import pytest
from conftest import REPO
from kernel_devices import DEVICES, FLOATS, ON_GPU, TOLERANCE, relative_error, sizes

from quantcourse.kernels import kv_attention
from quantcourse.kernels.kv_attention import cache_bytes, decode_attention
from quantcourse.reference_impl.kvcache import (
    dequantize_fp8,
    dequantize_int8_per_token,
    fp8_scale,
    quantize_fp8,
    quantize_int8_per_token,
)

# (B, H_q, H_kv, T, D). CPU: the interpreter's tiles are 16 tokens in 3 splits, so T = 37 fills
# three slices (the last tile ragged), T = 50 two of them (the third is empty), T = 5 one partial
# tile (in 4 lanes of 4 tokens, two lanes see no token); D = 24 is not a power of two. GQA ratios
# 1, 3 (SmolLM2: 9 query heads, 3 KV heads, D = 64) and 8. GPU: Llama-3-8B-like heads at ragged
# lengths.
SHAPES = {
    "cpu": [(2, 4, 4, 37, 32), (1, 9, 3, 50, 64), (2, 8, 1, 5, 16), (1, 2, 1, 23, 24)],
    "cuda": [(1, 32, 8, 4101, 128), (3, 9, 3, 777, 64), (2, 8, 1, 33000, 128), (4, 4, 4, 129, 32)],
}
CACHES = ["int8", torch.float8_e4m3fn, torch.float8_e5m2]


def quantize_cache(x: torch.Tensor, kind) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H_kv, T, D] float32 -> (codes, scale) by reference_impl.kvcache: int8 with a scale per
    token (amax / 127), or fp8 with one scale for the tensor (amax / the format's largest value)."""
    if kind == "int8":
        return quantize_int8_per_token(x)
    scale = fp8_scale(x.abs().amax(), kind)
    return quantize_fp8(x, scale, kind), scale


def dequantize_cache(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 K or V [B, H_kv, T, D] from codes and their scale(s)."""
    if codes.dtype == torch.int8:
        return dequantize_int8_per_token(codes, scale.float())
    return dequantize_fp8(codes, torch.as_tensor(scale, dtype=torch.float32))


def reference_decode_attention(q, k, v, k_scale, v_scale, sm_scale=None) -> torch.Tensor:
    """The twin: dequantize the cache, then softmax(q K^T * sm_scale) V in float32 on CPU.
    q [B, H_q, D]; k, v [B, H_kv, T, D] codes. Returns float32 [B, H_q, D]."""
    q, k, v = q.cpu().float(), k.cpu(), v.cpu()
    k_scale, v_scale = (torch.as_tensor(s).cpu() for s in (k_scale, v_scale))
    group = q.shape[1] // k.shape[1]
    K = dequantize_cache(k, k_scale).repeat_interleave(group, dim=1)  # query head j reads KV head j // group
    V = dequantize_cache(v, v_scale).repeat_interleave(group, dim=1)
    sm_scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    weights = torch.softmax(torch.einsum("bhd,bhtd->bht", q, K) * sm_scale, dim=-1)
    return torch.einsum("bht,bhtd->bhd", weights, V)


def make_case(B, H_q, H_kv, T, D, kind, dtype, device, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H_q, D, generator=g) * spread).to(dtype).to(device)
    k, k_scale = quantize_cache(torch.randn(B, H_kv, T, D, generator=g), kind)
    v, v_scale = quantize_cache(torch.randn(B, H_kv, T, D, generator=g), kind)
    return q, k.to(device), v.to(device), k_scale.to(device), v_scale.to(device)


def gpu_configs(lanes=None) -> list:
    """The kernel's GPU configurations of 128-token tiles in 16 splits with 4 warps (one per lane
    count, or only `lanes`): both code paths, without compiling every configuration of CONFIGS
    for every test shape."""
    return [c for c in kv_attention.CONFIGS if (c.kwargs["BLOCK_T"], c.kwargs["SPLITS"], c.num_warps) == (128, 16, 4)
            and lanes in (None, c.kwargs["LANES"])]  # fmt: skip


@pytest.fixture(autouse=True)
def few_gpu_configs(monkeypatch):
    if ON_GPU:
        monkeypatch.setattr(kv_attention._decode_attention_kernel, "configs", gpu_configs())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", CACHES, ids=["int8", "e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("lanes", [1, 4])
def test_decode_attention_matches_the_twin(device, kind, dtype, lanes, monkeypatch):
    """Each tile's tokens in one online softmax, or in four lanes merged after the loop."""
    if device == "cuda":
        monkeypatch.setattr(kv_attention._decode_attention_kernel, "configs", gpu_configs(lanes))
        monkeypatch.setattr(kv_attention._decode_attention_kernel, "cache", {})
    else:
        monkeypatch.setitem(kv_attention.CPU_CONFIG, "LANES", lanes)
    for B, H_q, H_kv, T, D in SHAPES[device]:
        q, k, v, k_scale, v_scale = make_case(B, H_q, H_kv, T, D, kind, dtype, device, spread=3.0)
        out = decode_attention(q, k, v, k_scale, v_scale)
        assert out.shape == (B, H_q, D) and out.dtype == dtype
        err = relative_error(out, reference_decode_attention(q, k, v, k_scale, v_scale))
        assert err < TOLERANCE[dtype], (B, H_q, H_kv, T, D, kind, err)


@pytest.mark.parametrize("device", DEVICES)
def test_online_softmax_follows_a_moving_maximum(device):
    """Scores that grow along T (every new tile raises the running maximum) and scores whose
    largest value comes first: both orders of the rescaling exp(m_old - m_new)."""
    B, H_q, H_kv, T, D = sizes(device, (1, 4, 2, 48, 32), (1, 32, 8, 8192, 128))
    q = torch.ones(B, H_q, D, device=device)
    ramp = torch.linspace(-4, 4, T).repeat(B, H_kv, D, 1).transpose(-1, -2).contiguous()  # key t: ramp[t] everywhere
    for keys in (ramp, ramp.flip(-2)):
        k, k_scale = quantize_cache(keys, "int8")
        v, v_scale = quantize_cache(torch.randn(B, H_kv, T, D), "int8")
        k, v, k_scale, v_scale = k.to(device), v.to(device), k_scale.to(device), v_scale.to(device)
        out = decode_attention(q, k, v, k_scale, v_scale)
        assert relative_error(out, reference_decode_attention(q, k, v, k_scale, v_scale)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_cache_views_and_sm_scale(device):
    """The first T tokens of a longer preallocated cache, read in place (no copy), and an
    explicit softmax scale."""
    B, H_q, H_kv, T, T_max, D = sizes(device, (2, 6, 3, 29, 40, 32), (2, 32, 8, 3000, 4096, 128))
    q, k_all, v_all, ks_all, vs_all = make_case(B, H_q, H_kv, T_max, D, "int8", torch.float16, device)
    k, v, k_scale, v_scale = k_all[:, :, :T], v_all[:, :, :T], ks_all[:, :, :T], vs_all[:, :, :T]
    assert not k.is_contiguous() and not k_scale.is_contiguous()
    out = decode_attention(q, k, v, k_scale, v_scale, sm_scale=0.3)
    ref = reference_decode_attention(q, k, v, k_scale, v_scale, sm_scale=0.3)
    assert relative_error(out, ref) < TOLERANCE[torch.float16]
    copies = (t.contiguous() for t in (k, v, k_scale, v_scale))
    assert torch.equal(out, decode_attention(q, *copies, 0.3))
    fp8, scale = quantize_cache(torch.randn(B, H_kv, T_max, D), torch.float8_e4m3fn)
    fp8 = fp8.to(device)
    out = decode_attention(q, fp8[:, :, :T], fp8[:, :, :T], scale.to(device), scale.item())  # a tensor, a float
    ref = reference_decode_attention(q, fp8[:, :, :T], fp8[:, :, :T], scale, scale)
    assert relative_error(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.skipif(ON_GPU, reason="the interpreter's configuration is the one to change")
def test_one_split_stores_its_result_directly(monkeypatch):
    """SPLITS = 1 (a configuration for large batches): no workspace, no combination."""
    monkeypatch.setitem(kv_attention.CPU_CONFIG, "SPLITS", 1)
    q, k, v, k_scale, v_scale = make_case(2, 6, 2, 40, 32, "int8", torch.float32, "cpu")
    out = decode_attention(q, k, v, k_scale, v_scale)
    assert relative_error(out, reference_decode_attention(q, k, v, k_scale, v_scale)) < TOLERANCE[torch.float32]


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs programs one after another: no race to see")
def test_split_results_do_not_depend_on_which_program_finishes_last():
    q, k, v, k_scale, v_scale = make_case(1, 32, 8, 32768, 128, "int8", torch.float16, "cuda")
    first = decode_attention(q, k, v, k_scale, v_scale)
    assert all(torch.equal(first, decode_attention(q, k, v, k_scale, v_scale)) for _ in range(20))


def test_cache_bytes_counts_codes_and_scales():
    k = torch.zeros(2, 8, 100, 128, dtype=torch.int8)
    assert cache_bytes(k) == 2 * (2 * 8 * 100 * 128 + 2 * 8 * 100 * 4)
    assert cache_bytes(k.to(torch.float8_e4m3fn)) == 2 * (2 * 8 * 100 * 128 + 4)
    assert cache_bytes(k.half()) == 2 * 2 * 8 * 100 * 128 * 2


@pytest.mark.parametrize("device", DEVICES)
def test_errors_speak_to_the_learner(device, monkeypatch):
    q, k, v, k_scale, v_scale = make_case(1, 4, 2, 20, 16, "int8", torch.float32, device)
    with pytest.raises(TypeError, match="q must be float32"):
        decode_attention(q.to(torch.int32), k, v, k_scale, v_scale)
    with pytest.raises(ValueError, match=r"q must be \[B, H_q, D\]"):
        decode_attention(q[:, :, None], k, v, k_scale, v_scale)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        decode_attention(q[:, :3].contiguous(), k, v, k_scale, v_scale)
    with pytest.raises(ValueError, match="one scale per token"):
        decode_attention(q, k, v, k_scale[..., 0], v_scale)
    with pytest.raises(ValueError, match="T = 0"):
        decode_attention(q, k[:, :, :0], v[:, :, :0], k_scale[:, :, :0], v_scale[:, :, :0])
    with pytest.raises(ValueError, match="one shape, dtype and layout"):
        decode_attention(q, k, v[:, :, :10], k_scale, v_scale)
    with pytest.raises(ValueError, match="contiguous along D"):
        strided = k.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, D the slow axis
        decode_attention(q, strided, strided, k_scale, v_scale)
    with pytest.raises(TypeError, match="int8 codes"):
        decode_attention(q, k.half(), v.half(), k_scale, v_scale)
    fp8 = k.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8 cache takes k_scale as one number"):
        decode_attention(q, fp8, fp8, k_scale, v_scale)
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="interpreter is off"):
            decode_attention(q, k, v, k_scale, v_scale)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", REPO / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # the GPU benchmark imports and builds its tables without a GPU
    return bench


META = {"device": "H100", "torch": "2", "triton": "3", "bitsandbytes": "0.50", "read_TBps": 3.0, "fast_mode": False}


def test_benchmark_reports_decode_attention_and_its_target():
    bench = load_benchmark()
    assert bench.ATTENTION_TOKENS == [4096, 32768, 131072] and bench.ATTENTION_HEADS == (32, 8, 128)
    assert ("attention int8", 32768, 1.6, "attention fp16 (SDPA)") in bench.ATTENTION_TARGETS
    rows = [
        {"kernel": "attention fp16 (SDPA)", "backend": "flash", "T": 32768, "us": 50.0, "bytes": 134e6, "GBps": 2680.0,
         "read_fraction": 0.88, "speedup": 1.0},
        {"kernel": "attention fp16 (SDPA flash)", "T": 32768, "us": 50.0, "bytes": 134e6, "GBps": 2680.0,
         "read_fraction": 0.88, "speedup": 1.0},
        {"kernel": "attention int8", "T": 32768, "us": 28.0, "bytes": 69e6, "GBps": 2464.0, "read_fraction": 0.81,
         "speedup": 50 / 28},
    ]  # fmt: skip
    text = bench.markdown(META, [], [], attention=rows)
    assert "| attention int8 | T = 32768 | 1 | 1.6x over attention fp16 (SDPA) | 1.79x | met |" in text
    assert "| attention fp16 (SDPA), fastest: flash | 32768 | 50.0 | 2680 | 88% | 1.00x |" in text
    assert "| attention int8 | 32768 | 28.0 | 2464 | 81% | 1.79x |" in text
    rows[2]["us"] = 40.0
    assert "| 1.6x over attention fp16 (SDPA) | 1.25x | missed by 28% |" in bench.markdown(META, [], [], attention=rows)


def test_benchmark_only_keeps_the_sections_it_does_not_measure():
    """`--only attention` replaces the attention rows and keeps the rest of the previous file,
    with the previous run's meta for the matmul rows (the lab reads them together)."""
    bench = load_benchmark()
    old_meta = {**META, "read_TBps": 3.05, "group_size": 128}
    previous = {"meta": old_meta, "rows": [{"kernel": "fp16"}], "configs": [], "quantize": [{"kernel": "q"}],
                "attention": [{"kernel": "old"}]}  # fmt: skip
    fresh = {"attention": {"attention": [{"kernel": "new"}], "attention_configs": [{"kernel": "configs"}]}}
    results = bench.combine(previous, fresh, {**META, "read_TBps": 2.9})
    assert results["rows"] == [{"kernel": "fp16"}] and results["quantize"] == [{"kernel": "q"}]
    assert results["attention"] == [{"kernel": "new"}] and results["gguf"] == []
    assert results["meta"]["read_TBps"] == 3.05 and results["meta"]["group_size"] == 128
    sections = results["meta"]["sections"]
    assert sections["attention"] == {"device": "H100", "read_TBps": 2.9}
    assert sections["matmuls"]["kept"] and sections["quantize"]["kept"] and "gguf" not in sections
    line = "\n".join(bench.runs_line(results["meta"]))
    assert "Measured in this run: attention (H100, read bandwidth 2.90 TB/s)" in line
    assert "Kept from an earlier run: matmuls (H100, read bandwidth 3.05 TB/s), quantize" in line
    everything = bench.combine({}, {"attention": fresh["attention"]}, META)
    assert bench.runs_line(everything["meta"]) == [] and everything["meta"]["read_TBps"] == 3.0
