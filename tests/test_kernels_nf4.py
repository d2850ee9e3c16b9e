"""NF4/FP4 kernels against reference_impl.nf4 (and once against bitsandbytes itself): dequantize
bit for bit, GEMV and GEMM on ragged shapes, plain and double-quantized absmax, every activation
dtype, the module, and the errors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on CPU

import dataclasses
import functools
import importlib.util

import pytest
from conftest import REPO
from kernel_devices import DEVICES, FLOATS, ON_GPU, TOLERANCE, relative_error, sizes
from torch import nn
from torch.nn import functional as F

from quantcourse.kernels.nf4 import TritonLinear4bit, dequantize_nf4, nf4_gemm, nf4_gemv, nf4_matmul, state_to
from quantcourse.reference_impl.nf4 import Linear4bit, dequantize_4bit, matmul_4bit, quantize_4bit
from quantcourse.surgery import replace_linears

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

# (N, K, blocksize, quant_type, double quantization). CPU: the GEMV's tiles are 16 x 64 and the
# GEMM's 16 x 128, so blocksize 32 gives several blocks per tile, 128 a block longer than a GEMV
# tile; N = 40, 20 end inside a row block, K = 288 and 320 inside a tile; 36 x 448 / 32 has 504
# blocks, so two absmax2 values. GPU: real layer shapes.
WEIGHTS = {
    "cpu": [(40, 320, 64, "nf4", True), (24, 288, 32, "fp4", False), (20, 384, 128, "nf4", False), (36, 448, 32, "nf4", True)],
    "cuda": [(4096, 4096, 64, "nf4", True), (11008, 4096, 64, "fp4", False), (1536, 576, 64, "nf4", True), (4096, 11008, 128, "nf4", False)],
}
ROWS = {"cpu": [2, 17], "cuda": [16, 333]}  # GEMM: M; the GEMV takes M = 1


@functools.cache
def quantized(N, K, blocksize, quant_type, nested, device, seed=0):
    """(packed, state) of a random weight, made by the twin on CPU and moved to `device` (once
    per test session: tests never modify them)."""
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    packed, state = quantize_4bit(W, blocksize, quant_type, nested)
    return packed.to(device), state_to(state, device)


def twin_matmul(x, packed, state, bias):
    """The twin in float32 (exact products), on CPU: what the kernels approximate in x's dtype."""
    return matmul_4bit(x.float().cpu(), packed.cpu(), state_to(state, "cpu"), bias.float().cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_is_the_twin_bit_for_bit(device, dtype):
    for N, K, blocksize, quant_type, nested in WEIGHTS[device]:
        packed, state = quantized(N, K, blocksize, quant_type, nested, device)
        out = dequantize_nf4(packed, state, dtype)
        ref = dequantize_4bit(packed.cpu(), state_to(state, "cpu"), torch.float32)
        assert out.shape == (N, K) and out.dtype == dtype
        if dtype == torch.bfloat16 and not ON_GPU:  # the interpreter truncates to bfloat16, torch rounds
            assert ((out.float().cpu() - ref).abs() <= ref.abs() * 2**-7).all()
        else:
            assert torch.equal(out.cpu(), ref.to(dtype)), (N, K, blocksize, quant_type, nested)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_takes_any_shape_and_plain_tensors(device):
    W = torch.randn(3, 7, 5)  # 105 values: an odd count, and a short last block
    packed, state = quantize_4bit(W, 32, "nf4", True)
    packed, state = packed.to(device), state_to(state, device)
    ref = dequantize_4bit(packed.cpu(), state_to(state, "cpu"))
    assert torch.equal(dequantize_nf4(packed, state).cpu(), ref)
    plain = dequantize_nf4(packed, state.absmax, shape=state.shape, code=state.code, blocksize=32,
                           absmax2=state.state2.absmax, dynamic_map=state.state2.code, offset=state.offset)  # fmt: skip
    assert torch.equal(plain.cpu(), ref)


@pytest.mark.skipif(ON_GPU, reason="bitsandbytes' own functions are checked on CPU")
def test_bitsandbytes_state_and_bytes_work_directly():
    bnb = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(24, 192)
    packed, state = bnb.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    W_hat = bnb.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(packed, state), W_hat)
    x = torch.randn(3, 192)
    assert relative_error(nf4_matmul(x, packed, state), x @ W_hat.T) < TOLERANCE[torch.float32]
    assert relative_error(nf4_matmul(x[:1], packed, state), x[:1] @ W_hat.T) < TOLERANCE[torch.float32]


def check(path, M, dtype, device, N, K, blocksize, quant_type, nested):
    packed, state = quantized(N, K, blocksize, quant_type, nested, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    bias = torch.randn(N, generator=g).to(dtype).to(device)
    out = path(x, packed, state, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    err = relative_error(out, twin_matmul(x, packed, state, bias))
    assert err < TOLERANCE[dtype], (M, N, K, blocksize, quant_type, nested, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gemv_matches_the_twin(device, dtype):
    for case in WEIGHTS[device]:
        check(nf4_gemv, 1, dtype, device, *case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_gemm_matches_the_twin(device, dtype):
    for case, M in zip(WEIGHTS[device], ROWS[device] * 2):
        check(nf4_gemm, M, dtype, device, *case)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_picks_the_path_keeps_leading_dimensions_and_takes_plain_tensors(device):
    N, K = sizes(device, (24, 128), (4096, 4096))
    packed, state = quantized(N, K, 64, "nf4", True, device)
    x = torch.randn(2, 3, K, device=device).half()
    y = nf4_matmul(x, packed, state)
    assert y.shape == (2, 3, N)
    if ON_GPU:  # several rows: W dequantized once, then cuBLAS (nf4_matmul's doc)
        assert torch.equal(y, F.linear(x, dequantize_nf4(packed, state, x.dtype)))
    else:
        assert torch.equal(y.reshape(6, N), nf4_gemm(x.reshape(6, K), packed, state))
    one = x[:1, :1]
    assert torch.equal(nf4_matmul(one, packed, state), nf4_gemv(one, packed, state))
    plain = {"shape": (N, K), "code": state.code, "blocksize": 64, "absmax2": state.state2.absmax,
             "dynamic_map": state.state2.code, "offset": state.offset}  # fmt: skip
    assert torch.equal(nf4_matmul(x, packed, state.absmax, **plain), y)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs programs one after another: no race to see")
def test_split_k_results_do_not_depend_on_which_program_finishes_last():
    packed, state = quantized(8192, 8192, 64, "nf4", True, "cuda")
    for M in (1, 16):
        x = torch.randn(M, 8192, device="cuda").half()
        first = nf4_matmul(x, packed, state)
        assert all(torch.equal(first, nf4_matmul(x, packed, state)) for _ in range(20))


@pytest.mark.parametrize("device", DEVICES)
def test_module_plugs_into_replace_linears(device):
    hidden = sizes(device, 64, 576)  # SmolLM2's width: blocks of 64 divide it
    model = nn.Sequential(nn.Linear(hidden, 3 * hidden), nn.SiLU(), nn.Linear(3 * hidden, hidden))
    reference = nn.Sequential(*(Linear4bit.from_linear(m, "nf4", 64, True) if isinstance(m, nn.Linear) else m for m in model))
    replaced = replace_linears(model, lambda name, linear: TritonLinear4bit.from_linear(linear))
    model.to(device)
    assert all(isinstance(m, TritonLinear4bit) for m in replaced.values())
    for ours, ref in zip(replaced.values(), (reference[0], reference[2])):  # the twin's bytes, bit for bit
        assert torch.equal(ours.packed.cpu(), ref.packed) and torch.equal(ours.dequantize().cpu(), ref.weight)
        blocks = ours.weight_count() // 64  # 4 bits a weight, 8 a block, 32 per 256 blocks and for the offset
        assert ours.storage_bits() == ref.storage_bits() == ours.weight_count() * 4 + blocks * 8 + -(-blocks // 256) * 32 + 32
    for M in (1, 7):
        x = torch.randn(M, hidden)
        assert relative_error(model(x.to(device)), reference(x)) < TOLERANCE[torch.float32]


@pytest.mark.skipif(not ON_GPU, reason="relaunching skips Triton's dispatch on a GPU; the interpreter has none")
def test_module_relaunches_the_gemv_only_for_the_inputs_it_was_made_for():
    layer = TritonLinear4bit.from_linear(nn.Linear(576, 1536)).cuda()  # with a bias
    plain = {"shape": (1536, 576), "code": layer.code, "blocksize": 64, "absmax2": layer.absmax2,
             "dynamic_map": layer.dynamic_map, "offset": layer.offset}  # fmt: skip

    def expected(x):
        return nf4_gemv(x, layer.packed, layer.absmax, layer.bias, **plain)

    storage = torch.randn(4, 600, device="cuda")
    for x in (storage[0, :576].half(), storage[1, :576].half()[None], storage[:1, :576].bfloat16(), storage[2, :576]):
        for _ in range(3):  # the first call launches through Triton, the next two relaunch
            assert torch.equal(layer(x), expected(x))
    assert len(layer._relaunches) == 3  # one per dtype: 1-d and [1, K] fp16 x share theirs
    odd = torch.randn(600, device="cuda").half()[1:577]  # 2 bytes past a 16-byte boundary
    assert torch.equal(layer(odd), expected(odd)) and torch.equal(layer(odd), expected(odd))
    assert len(layer._relaunches) == 4
    layer.absmax2 = layer.absmax2 * 2  # a buffer replaced: relaunches would read the old one
    plain["absmax2"] = layer.absmax2
    x = storage[3, :576].half()
    assert torch.equal(layer(x), expected(x)) and len(layer._relaunches) == 1
    assert torch.equal(layer(x), expected(x))
    with pytest.raises(ValueError, match="K = 576"):
        layer(torch.randn(575, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_errors_speak_to_the_learner(device, monkeypatch):
    packed, state = quantized(16, 128, 64, "nf4", True, device)
    x = torch.randn(1, 128, device=device)
    with pytest.raises(TypeError, match="x must be"):
        nf4_matmul(x.to(torch.int32), packed, state)
    with pytest.raises(ValueError, match="K = 128"):
        nf4_matmul(torch.randn(1, 64, device=device), packed, state)
    with pytest.raises(ValueError, match="contiguous"):
        nf4_matmul(torch.randn(128, 2, device=device).t(), packed, state)
    with pytest.raises(TypeError, match="packed must have dtype uint8"):
        nf4_matmul(x, packed.to(torch.int32), state)
    with pytest.raises(ValueError, match="one entry per block of 64"):
        nf4_matmul(x, packed, dataclasses.replace(state, absmax=state.absmax[:-1]))
    with pytest.raises(ValueError, match="absmax2, dynamic_map and offset"):
        nf4_matmul(x, packed, state.absmax, shape=(16, 128), code=state.code, blocksize=64)
    ragged, ragged_state = quantized(8, 96, 64, "nf4", False, device)  # 12 blocks over rows of 96
    with pytest.raises(ValueError, match="not a multiple of blocksize 64"):
        nf4_matmul(torch.randn(1, 96, device=device), ragged, ragged_state)
    assert dequantize_nf4(ragged, ragged_state).shape == (8, 96)  # dequantizing needs no whole rows
    with pytest.raises(ValueError, match="not a multiple of blocksize 64"):
        TritonLinear4bit.from_linear(nn.Linear(96, 8))
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="interpreter is off"):
            nf4_matmul(x, packed, state)
        layer = TritonLinear4bit.from_linear(nn.Linear(128, 16))  # made on CPU, as before model.cuda()
        with pytest.raises(RuntimeError, match="interpreter is off"):
            layer(x)


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # the GPU benchmarks import and build their tables without a GPU
    return bench


def test_benchmark_targets_compare_with_the_contender_they_name(monkeypatch):
    bench = load_benchmark("kernels")
    monkeypatch.setattr(bench, "TARGETS", bench.TARGETS + [("nf4", 4096, 4096, 1, 2.0, "nf4 (bitsandbytes)")])

    def row(kernel, us, K=4096, N=4096):
        return {"kernel": kernel, "K": K, "N": N, "M": 1, "us": us, "weight_GBps": 1.0, "read_fraction": 0.5,
                "speedup": 1.0}  # fmt: skip

    rows = [row("fp16", 19.0), row("nf4 (bitsandbytes)", 14.0), row("nf4", 7.0),
            row("fp16", 170.0, 8192, 28672), row("nf4", 80.0, 8192, 28672)]  # fmt: skip
    meta = {"device": "H100", "torch": "2", "triton": "3", "bitsandbytes": "0.50", "read_TBps": 3.0, "fast_mode": True}
    quant = [{"kernel": "quantize", "us": 1.0, "GBps": 1.0, "read_fraction": 0.8}]
    text = bench.markdown(meta, rows, quant)
    assert "| nf4 | 4096 x 4096 | 1 | 2.0x over nf4 (bitsandbytes) | 2.00x | met |" in text
    assert "| nf4 | 8192 x 28672 | 1 | 2.5x over fp16 | 2.12x | missed by 18% |" in text
    assert "2.0x over nf4 (bitsandbytes), per Python call | per_call.md" in text  # the issue's own target
    text = bench.markdown(meta, [r for r in rows if r["kernel"] != "nf4 (bitsandbytes)"], quant)
    assert "| nf4 | 4096 x 4096 | 1 | 2.0x over nf4 (bitsandbytes) | nf4 (bitsandbytes) not measured | |" in text


def test_per_call_target_compares_the_layer_with_bitsandbytes():
    pytest.importorskip("bitsandbytes")  # per_call.py imports it at the top
    bench = load_benchmark("per_call")

    def row(kernel, us):
        return {"kernel": kernel, "K": 4096, "N": 4096, "per_call_us": us, "host_us": us}

    meta = {"device": "H100", "torch": "2", "triton": "3", "bitsandbytes": "0.50", "date": "today"}
    rows = [row("fp16", 30.0), row("nf4 (TritonLinear4bit)", 20.0), row("nf4 (nf4_matmul)", 120.0),
            row("nf4 (bitsandbytes)", 50.0)]  # fmt: skip
    text = bench.markdown(rows, meta)
    assert "| nf4 (TritonLinear4bit) | 4096 x 4096 | 2.0x over nf4 (bitsandbytes) | 2.50x | met |" in text
    assert "| nf4 (nf4_matmul) | 4096 x 4096 | 120.0 | 120.0 | 0.42x |" in text
    rows[1] = row("nf4 (TritonLinear4bit)", 40.0)
    assert "| 1.25x | missed by 60% |" in bench.markdown(rows, meta)
