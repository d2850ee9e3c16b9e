"""GGUF Q4_0 / Q8_0 kernels against their twin, reference_impl.gguf (numpy, bit-exact with
llama.cpp), and against llama.cpp's own Python (gguf-py): dequantize bit for bit, the fused GEMV
on ragged shapes with every activation dtype, small M, every code value, reads that stay inside
the weight, the block layout, and the errors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU

import functools
import importlib.util

import pytest
from conftest import REPO
from gguf import GGMLQuantizationType
from gguf import quants as gguf_py
from kernel_devices import DEVICES, FLOATS, ON_GPU, TOLERANCE, relative_error, sizes

from quantcourse.kernels import gguf as gguf_kernels
from quantcourse.kernels.gguf import dequantize_gguf, gguf_gemv, gguf_matmul, pack_blocks
from quantcourse.reference_impl import gguf as reference

QTYPES = ["Q4_0", "Q8_0"]
# (N, K). CPU: the interpreter's tiles are 8 rows x 2 blocks in 2 K slices, so N = 20 and 13 end
# inside a row tile, K = 96 (3 blocks) ends inside a tile, K = 256 is two whole tiles per slice
# (the EVEN_K path), and K = 32 (one block) leaves the second slice empty. GPU: real layer shapes.
WEIGHTS = {"cpu": [(20, 96), (13, 256), (8, 32)], "cuda": [(4096, 4096), (11008, 4096), (1536, 576), (4100, 14336)]}


@functools.cache
def quantized(N, K, qtype, device, seed=0):
    """GGUF blocks of a random weight, made by the twin (llama.cpp's rounding), once per session."""
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    return torch.from_numpy(reference.quantize(W.numpy(), qtype)).to(device)


def twin_dequantize(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """W [N, K] float32 by the twin, on CPU."""
    return torch.from_numpy(reference.dequantize(blocks.cpu().numpy(), qtype))


def gguf_py_dequantize(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """W [N, K] float32 by llama.cpp's gguf-py, on CPU."""
    return torch.from_numpy(gguf_py.dequantize(blocks.cpu().numpy(), getattr(GGMLQuantizationType, qtype)))


def twin_matmul(x, blocks, qtype, bias=None):
    """x @ W^T (+ bias) in float32 on CPU, W dequantized by the twin."""
    out = x.float().cpu() @ twin_dequantize(blocks, qtype).T
    return out if bias is None else out + bias.float().cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_is_the_twin_bit_for_bit(device, qtype, dtype):
    for N, K in WEIGHTS[device]:
        blocks = quantized(N, K, qtype, device)
        out = dequantize_gguf(blocks, qtype, dtype)
        ref = twin_dequantize(blocks, qtype)
        assert out.shape == (N, K) and out.dtype == dtype
        if dtype == torch.bfloat16 and not ON_GPU:  # the interpreter truncates to bfloat16, torch rounds
            assert ((out.float().cpu() - ref).abs() <= ref.abs() * 2**-7).all()
        else:
            assert torch.equal(out.cpu(), ref.to(dtype)), (qtype, N, K)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gemv_matches_the_twin(device, qtype, dtype):
    for N, K in WEIGHTS[device]:
        blocks = quantized(N, K, qtype, device)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, K, generator=g).to(dtype).to(device)
        bias = torch.randn(N, generator=g).to(dtype).to(device)
        for b in (None, bias):
            out = gguf_gemv(x, blocks, qtype, b)
            assert out.shape == (1, N) and out.dtype == dtype
            err = relative_error(out, twin_matmul(x, blocks, qtype, b))
            assert err < TOLERANCE[dtype], (qtype, N, K, b is None, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_every_code_value_and_the_block_layout(device, qtype):
    """Random codes over the whole range (Q4_0 0..15, Q8_0 -128..127, beyond what a quantizer
    writes) and scales of both signs, packed by `pack_blocks`: gguf-py and the twin read the same
    weight d * (q - 8) or d * q, and so do the kernels."""
    N, K = sizes(device, (11, 128), (1000, 4096))
    g = torch.Generator().manual_seed(2)
    low, high = (-128, 128) if qtype == "Q8_0" else (0, 16)
    codes = torch.randint(low, high, (N, K), generator=g)
    d = torch.randn(N, K // 32, generator=g).half()
    W = d.float().repeat_interleave(32, dim=1) * (codes - (0 if qtype == "Q8_0" else 8)).float()
    blocks = pack_blocks(d, codes, qtype)
    assert blocks.shape == (N, K // 32 * gguf_kernels.FORMATS[qtype]) and blocks.dtype == torch.uint8
    assert torch.equal(gguf_py_dequantize(blocks, qtype), W) and torch.equal(twin_dequantize(blocks, qtype), W)
    blocks = blocks.to(device)
    assert torch.equal(dequantize_gguf(blocks, qtype).cpu(), W)
    x = torch.randn(1, K, generator=g).to(device)
    assert relative_error(gguf_gemv(x, blocks, qtype), x.cpu() @ W.T) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_reads_stay_inside_the_weight(device, qtype):
    """The weight at the start of a buffer whose next bytes read as NaN scales (0xFF 0xFF): a
    tile (or a prefetch) reaching past the last block of the last row would bring NaN into the
    sums. K = 96 (CPU) ends inside a tile; K = 128 is whole tiles (the EVEN_K path)."""
    for N, K in sizes(device, [(20, 96), (12, 128)], [(4100, 4128), (4096, 4096)]):
        blocks = quantized(N, K, qtype, "cpu")
        buffer = torch.full((blocks.numel() + 4096,), 0xFF, dtype=torch.uint8)
        buffer[: blocks.numel()] = blocks.reshape(-1)
        inside = buffer.to(device)[: blocks.numel()].view(blocks.shape)
        x = torch.randn(1, K).to(device)
        assert relative_error(gguf_gemv(x, inside, qtype), twin_matmul(x, blocks, qtype)) < TOLERANCE[torch.float32]
        assert torch.equal(dequantize_gguf(inside, qtype).cpu(), twin_dequantize(blocks, qtype))


def test_pack_blocks_writes_llama_cpp_bytes():
    """One block by hand: d = 1.0 is float16 0x3C00, stored little-endian; Q4_0 byte j holds
    element j in its low nibble and element j + 16 in its high one; Q8_0 bytes are the codes."""
    d = torch.ones(1, 1)
    codes = torch.arange(32).reshape(1, 32)
    q4 = pack_blocks(d, codes % 16, "Q4_0")[0].tolist()
    assert q4 == [0x00, 0x3C] + [j | (j << 4) for j in range(16)]
    q8 = pack_blocks(d, codes - 16, "Q8_0")[0].tolist()
    assert q8 == [0x00, 0x3C] + [(j - 16) % 256 for j in range(32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_small_m_and_leading_dimensions(device, qtype):
    """Rows of x: each row's result is the GEMV of that row, bit for bit, under the fused path;
    from DEQUANTIZE_MIN_M rows on a GPU W is dequantized and cuBLAS multiplies."""
    N, K = sizes(device, (20, 96), (4096, 4096))
    blocks = quantized(N, K, qtype, device)
    x = torch.randn(2, 3, K, device=device).half()
    y = gguf_matmul(x, blocks, qtype)
    assert y.shape == (2, 3, N) and y.dtype == torch.float16
    rows = x.reshape(6, K)
    assert all(torch.equal(y.reshape(6, N)[m], gguf_gemv(rows[m], blocks, qtype)) for m in range(6))
    many = torch.randn(sizes(device, 9, 333), K, device=device).half()
    assert relative_error(gguf_matmul(many, blocks, qtype), twin_matmul(many, blocks, qtype)) < TOLERANCE[torch.float16]


@pytest.mark.skipif(ON_GPU, reason="the interpreter's configuration is the one to change")
def test_one_k_slice_stores_its_result_directly(monkeypatch):
    """SPLIT_K = 1 (configurations for wide matrices): no workspace, no last arriver."""
    monkeypatch.setitem(gguf_kernels.GEMV_CPU, "SPLIT_K", 1)
    for qtype in QTYPES:
        blocks = quantized(20, 96, qtype, "cpu")
        x = torch.randn(3, 96)
        assert relative_error(gguf_matmul(x, blocks, qtype), twin_matmul(x, blocks, qtype)) < TOLERANCE[torch.float32]


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs programs one after another: no race to see")
def test_split_k_results_do_not_depend_on_which_program_finishes_last():
    for qtype in QTYPES:
        blocks = quantized(8192, 8192, qtype, "cuda")
        x = torch.randn(1, 8192, device="cuda").half()
        first = gguf_gemv(x, blocks, qtype)
        assert all(torch.equal(first, gguf_gemv(x, blocks, qtype)) for _ in range(20))


@pytest.mark.parametrize("device", DEVICES)
def test_errors_speak_to_the_learner(device, monkeypatch):
    blocks = quantized(8, 64, "Q4_0", device)
    x = torch.randn(1, 64, device=device)
    with pytest.raises(ValueError, match="Q4_0 and Q8_0"):
        gguf_matmul(x, blocks, "Q4_1")
    with pytest.raises(TypeError, match="Q4_0 blocks must have dtype uint8"):
        gguf_matmul(x, blocks.view(torch.int8), "Q4_0")
    with pytest.raises(ValueError, match="whole number of 34-byte blocks"):
        gguf_matmul(x, blocks, "Q8_0")  # 36 bytes a row: two Q4_0 blocks, not Q8_0 ones
    with pytest.raises(ValueError, match="whole number of 18-byte blocks"):
        gguf_matmul(torch.randn(1, 40, device=device), blocks[:, :20].contiguous(), "Q4_0")  # K = 40
    with pytest.raises(ValueError, match="K % 32 == 0"):
        pack_blocks(torch.ones(2, 1), torch.zeros(2, 40, dtype=torch.int64), "Q4_0")
    with pytest.raises(ValueError, match="K = 64"):
        gguf_matmul(torch.randn(1, 32, device=device), blocks, "Q4_0")
    with pytest.raises(TypeError, match="x must be"):
        gguf_matmul(x.to(torch.int32), blocks, "Q4_0")
    with pytest.raises(ValueError, match="contiguous"):
        gguf_matmul(torch.randn(64, 2, device=device).t(), blocks, "Q4_0")
    with pytest.raises(ValueError, match="bias must be"):
        gguf_matmul(x, blocks, "Q4_0", torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="even address"):
        odd = torch.empty(8 * 36 + 1, dtype=torch.uint8, device=device)[1:].view(8, 36)
        gguf_matmul(x, odd, "Q4_0")
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="interpreter is off"):
            gguf_matmul(x, blocks, "Q4_0")


def test_benchmark_reports_gguf_rows():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", REPO / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # the GPU benchmark imports and builds its tables without a GPU
    assert bench.GGUF_SHAPES == [(4096, 4096), (8192, 8192), (8192, 28672)]
    rows = [
        {"kernel": "fp16", "K": 8192, "N": 8192, "M": 1, "us": 50.0, "weight_bytes": 134e6, "weight_GBps": 2684.0,
         "read_fraction": 0.88, "speedup": 1.0},
        {"kernel": "gguf Q4_0", "K": 8192, "N": 8192, "M": 1, "us": 20.0, "weight_bytes": 37.7e6, "weight_GBps": 1887.0,
         "read_fraction": 0.62, "speedup": 2.5},
        {"kernel": "dequantize_gguf Q4_0 -> fp16", "K": 8192, "N": 8192, "us": 60.0, "bytes": 172e6, "GBps": 2866.0,
         "read_fraction": 0.94},
    ]  # fmt: skip
    meta = {"device": "H100", "torch": "2", "triton": "3", "bitsandbytes": "0.50", "read_TBps": 3.0, "fast_mode": False}
    text = bench.markdown(meta, [], [], gguf=rows)
    assert "| gguf Q4_0 | 8192 x 8192 | 1 | 20.0 | 1887 | 62% | 2.50x |" in text
    assert "| dequantize_gguf Q4_0 -> fp16 | 8192 x 8192 | 60.0 | 2866 | 94% |" in text
