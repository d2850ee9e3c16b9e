"""Roofline arithmetic (reference_impl/roofline.py): counts checked by hand, against the real GPTQ
layout's bytes, and against the H100 measurements, which must never beat the data-sheet roofs."""

import json
import math
from pathlib import Path

import pytest
import torch

from quantcourse.reference_impl import roofline
from quantcourse.reference_impl.formats import bits_per_param
from quantcourse.reference_impl.w4a16 import quantize_w4

REPO = Path(__file__).resolve().parents[1]
B, P = roofline.H100_HBM_BYTES_PER_S, roofline.H100_FP16_DENSE_FLOPS
INT4_G128 = bits_per_param(4, group_size=128)  # 4.125


def test_flops_and_bytes_by_hand():
    # x [1, 16] @ W^T, W [8, 16] in fp16: 8*16*2 weight bytes, 16*2 in, 8*2 out
    assert roofline.matmul_flops(1, 8, 16) == 256
    assert roofline.matmul_bytes(1, 8, 16, 16) == 256 + 32 + 16
    assert roofline.arithmetic_intensity(1, 8, 16, 16) == 256 / 304
    assert roofline.weight_bytes(8, 16, bits_per_param(4, group_size=8)) == 8 * 16 * 6 / 8  # 4 + 16/8 bits
    assert roofline.matmul_bytes(3, 8, 16, 16, act_bytes=1, out_bytes=4) == 256 + 3 * 16 + 3 * 8 * 4


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_bytes_match_the_gptq_layout(symmetric):
    """bits_per_param's count is what the kernels read: qweight, fp16 scales and packed zero points."""
    N, K, group = 24, 256, 64
    qweight, scales, qzeros = quantize_w4(torch.randn(N, K), group, symmetric)
    stored = qweight.numel() * 4 + scales.numel() * 2 + (0 if qzeros is None else qzeros.numel() * 4)
    bits = bits_per_param(4, group_size=group, zero_bits=0 if symmetric else 4)
    assert roofline.weight_bytes(N, K, bits) == stored


def test_decoding_is_memory_bound_and_4_bits_buy_the_ratio_of_bytes():
    N = K = 8192
    assert 0.99 < roofline.arithmetic_intensity(1, N, K, 16) < 1.0  # 2 flops per 2-byte weight
    assert roofline.speedup_ceiling(INT4_G128) == 16 / 4.125
    at_one = roofline.roofline_speedup(1, N, K, INT4_G128, B, P)
    assert 0.99 * roofline.speedup_ceiling(INT4_G128) < at_one < roofline.speedup_ceiling(INT4_G128)
    assert roofline.roofline_speedup(65536, N, K, INT4_G128, B, P) == 1.0  # both compute-bound: same flops
    intensities = [roofline.arithmetic_intensity(M, N, K, INT4_G128) for M in (1, 2, 16, 256, 4096)]
    assert intensities == sorted(intensities)


def test_roofline_time_is_the_slower_roof():
    assert roofline.roofline_seconds(1e6, 1e9, 1e12, 1e15) == 1e-3  # bytes dominate
    assert roofline.roofline_seconds(1e15, 1e3, 1e12, 1e15) == 1.0  # flops dominate
    M, N, K = 1, 4096, 4096
    assert roofline.matmul_seconds(M, N, K, 16, B, P) == roofline.matmul_bytes(M, N, K, 16) / B


def test_attainable_flops_bends_at_the_ridge():
    ridge = roofline.ridge_intensity(B, P)
    assert ridge == P / B
    values = roofline.attainable_flops([ridge / 10, ridge, ridge * 10], B, P)
    assert values[0] == pytest.approx(ridge / 10 * B)
    assert values[1] == pytest.approx(P) and values[2] == P


def test_compute_bound_rows_is_the_first_row_count_past_the_ridge():
    ridge = roofline.ridge_intensity(B, P)
    for bits in (16, 8, INT4_G128):
        M = roofline.compute_bound_rows(8192, 8192, bits, B, P)
        assert roofline.arithmetic_intensity(M, 8192, 8192, bits) >= ridge
        assert roofline.arithmetic_intensity(M - 1, 8192, 8192, bits) < ridge
    assert roofline.compute_bound_rows(8192, 8192, INT4_G128, B, P) < roofline.compute_bound_rows(8192, 8192, 16, B, P)
    # a 64 x 64 layer tends to 2*64*64 / (2*64 + 2*64) = 32 flop/byte, below any H100 ridge
    assert roofline.compute_bound_rows(64, 64, 16, B, P) is None


def test_tiled_matmul_counts_programs_and_bytes():
    gemv = roofline.TiledMatmul(M=1, N=8192, K=8192, weight_bits=INT4_G128, block_m=1, block_n=64, split_k=8)
    assert gemv.programs == 128 * 8
    assert gemv.programs_per_sm() == 1024 / 132
    # all programs together read the weight once and x once per column block
    together = gemv.programs * gemv.bytes_per_program
    assert together == pytest.approx(roofline.weight_bytes(8192, 8192, INT4_G128) + 128 * 8192 * 2)
    assert gemv.split_k_bytes == 2 * 8 * 1 * 8192 * 4
    ragged = roofline.TiledMatmul(M=24, N=44, K=200, weight_bits=16, block_m=16, block_n=16, split_k=2)
    assert ragged.programs == 2 * 3 * 2
    single = roofline.TiledMatmul(M=1, N=8192, K=8192, weight_bits=INT4_G128, block_m=1, block_n=64, split_k=1)
    assert single.split_k_bytes == 0 and single.total_bytes == roofline.matmul_bytes(1, 8192, 8192, INT4_G128)
    assert gemv.seconds(B, P) > single.seconds(B, P)  # partials cost bytes; they buy programs


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: roofline.matmul_flops(0, 8, 8), "M"),
        (lambda: roofline.weight_bytes(8, 8, 0), "weight_bits"),
        (lambda: roofline.roofline_seconds(1, 1, -1, 1), "bandwidth"),
        (lambda: roofline.TiledMatmul(1, 8, 8, 4, 1, 1.5, 1), "block_n"),
        (lambda: roofline.TiledMatmul(1, 8, 8, 4, 1, 8, 16), "split_k"),
    ],
)
def test_bad_arguments_are_named(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_h100_measurements_stay_under_the_data_sheet_roofs():
    """No measured matmul may beat max(bytes / 3.35 TB/s, flops / peak): if one did, the timing
    or the byte count would be wrong. The int8 GEMMs run on the int8 roof, the rest on fp16's."""
    path = REPO / "benchmarks" / "results" / "kernels.json"
    if not path.is_file():
        pytest.skip("benchmarks/results/kernels.json is not there (python benchmarks/kernels.py writes it)")
    rows = json.loads(path.read_text())["rows"]
    assert rows, "kernels.json holds no matmul rows"
    for r in rows:
        peak = roofline.H100_INT8_DENSE_OPS if r["kernel"].startswith("w8a8") else roofline.H100_FP16_DENSE_FLOPS
        flops = roofline.matmul_flops(r["M"], r["N"], r["K"])
        nbytes = r["weight_bytes"] + 2 * r["M"] * r["K"] + 2 * r["M"] * r["N"]
        bound = roofline.roofline_seconds(flops, nbytes, roofline.H100_HBM_BYTES_PER_S, peak)
        assert r["us"] * 1e-6 >= bound, f"{r['kernel']} K={r['K']} N={r['N']} M={r['M']} beats the roofline"
        assert math.isclose(r["weight_GBps"], r["weight_bytes"] / r["us"] / 1e3, rel_tol=1e-9)
