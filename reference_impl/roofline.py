"""Roofline arithmetic for a linear layer: bytes moved, flops, and the time they take.

A linear layer computes y = x W^T with x [M, K] (M tokens), W [N, K] and y [M, N]. It does

    flops = 2 M N K                                   (one multiply and one add per weight and token)
    bytes = N K b_w / 8  +  M K b_x  +  M N b_y        (weights, inputs, outputs; each moved once)

where b_w is the weight's storage in bits per weight, its quantization constants included
(`formats.bits_per_param`: 16 for fp16, 4 + 16/128 for int4 with an fp16 scale per 128), and
b_x, b_y the bytes of one activation (2 for fp16). Their ratio is the **arithmetic intensity**
I = flops / bytes, in flop per byte. A machine with memory bandwidth B (bytes/s) and a compute
peak P (flop/s) cannot go faster than either:

    time >= max(bytes / B, flops / P),     attainable flop/s = min(P, I * B)     (the roofline)

The two roofs meet at the **ridge** I* = P / B. Below it the layer is memory-bound: its time
is the time to read its bytes, whatever the arithmetic. Decoding (M = 1) sits far below it:
every weight is read for 2 flops, so I is about 2 / (b_w / 8), 1 flop per byte in fp16. That is
why storing weights in 4 bits speeds decoding up: fewer bytes, same flops, until M is large
enough for the layer to reach the ridge (`compute_bound_rows`).

A Triton kernel splits the work into programs, one per output tile (BLOCK_M x BLOCK_N) and,
with split-K, one per slice of K: `TiledMatmul` counts them against the GPU's SMs and adds the
traffic of split-K's float32 partial sums.

Constants: the published figures of the NVIDIA H100 SXM5, the "H100 80GB HBM3" that
benchmarks/results/kernels.json was measured on. The course draws its rooflines with the
bandwidth and flop rates measured there; these are the data-sheet ceilings beside them.
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np

# NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), H100 SXM5 column: 132 SMs; dense
# tensor-core peaks (the whitepaper doubles them "with sparsity"): 989.4 TFLOP/s fp16 or bf16
# with float32 accumulation, 1978.9 TOP/s int8. H100 SXM data sheet: 3.35 TB/s of HBM3.
H100_SMS = 132
H100_FP16_DENSE_FLOPS = 989.4e12
H100_INT8_DENSE_OPS = 1978.9e12
H100_HBM_BYTES_PER_S = 3.35e12


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer (a matrix dimension or a tile size), got {value!r}")


def matmul_flops(M: int, N: int, K: int) -> int:
    """Flops of y = x W^T with x [M, K], W [N, K]: 2 M N K (a multiply-add is 2 flops)."""
    _check_sizes(M=M, N=N, K=K)
    return 2 * M * N * K


def weight_bytes(N: int, K: int, weight_bits: float) -> float:
    """Bytes of a weight [N, K] stored at weight_bits per weight (constants included)."""
    _check_sizes(N=N, K=K)
    _check_positive(weight_bits=weight_bits)
    return N * K * weight_bits / 8


def matmul_bytes(M: int, N: int, K: int, weight_bits: float, act_bytes: float = 2, out_bytes: float = 2) -> float:
    """Fewest bytes y = x W^T must move: the weight, x [M, K] and y [M, N], each once.

    weight_bits: bits per weight with constants (`formats.bits_per_param`); act_bytes, out_bytes:
    bytes of one element of x and of y (2 for fp16).
    """
    _check_positive(act_bytes=act_bytes, out_bytes=out_bytes)
    return weight_bytes(N, K, weight_bits) + M * K * act_bytes + M * N * out_bytes


def arithmetic_intensity(
    M: int, N: int, K: int, weight_bits: float, act_bytes: float = 2, out_bytes: float = 2
) -> float:
    """Flop per byte of y = x W^T: matmul_flops / matmul_bytes."""
    return matmul_flops(M, N, K) / matmul_bytes(M, N, K, weight_bits, act_bytes, out_bytes)


def ridge_intensity(bandwidth: float, peak: float) -> float:
    """The intensity P / B (flop/byte) where the memory roof meets the compute roof."""
    _check_positive(bandwidth=bandwidth, peak=peak)
    return peak / bandwidth


def attainable_flops(intensity, bandwidth: float, peak: float):
    """The roofline: min(peak, intensity * bandwidth) flop/s. intensity: a float or an array."""
    _check_positive(bandwidth=bandwidth, peak=peak)
    return np.minimum(peak, np.asarray(intensity, dtype=float) * bandwidth)


def roofline_seconds(flops: float, nbytes: float, bandwidth: float, peak: float) -> float:
    """Lower bound on the time of `flops` flops over `nbytes` bytes: max(bytes / B, flops / P)."""
    _check_positive(flops=flops, nbytes=nbytes, bandwidth=bandwidth, peak=peak)
    return max(nbytes / bandwidth, flops / peak)


def matmul_seconds(
    M: int, N: int, K: int, weight_bits: float, bandwidth: float, peak: float, act_bytes: float = 2,
    out_bytes: float = 2,
) -> float:  # fmt: skip
    """Roofline time of y = x W^T (seconds) on a machine with bandwidth B and peak P."""
    nbytes = matmul_bytes(M, N, K, weight_bits, act_bytes, out_bytes)
    return roofline_seconds(matmul_flops(M, N, K), nbytes, bandwidth, peak)


def roofline_speedup(
    M: int, N: int, K: int, weight_bits: float, bandwidth: float, peak: float, base_bits: float = 16
) -> float:
    """How much faster the roofline says a weight of weight_bits runs than one of base_bits.

    Memory-bound (small M) it approaches base_bits / weight_bits (`speedup_ceiling`); once both
    layers are compute-bound it is 1: the same flops at the same peak.
    """
    base = matmul_seconds(M, N, K, base_bits, bandwidth, peak)
    return base / matmul_seconds(M, N, K, weight_bits, bandwidth, peak)


def speedup_ceiling(weight_bits: float, base_bits: float = 16) -> float:
    """The best a weight-only format can do at M = 1 over base_bits weights: the ratio of bytes,
    activations neglected. int4 with an fp16 scale per 128 weights: 16 / (4 + 16/128) = 3.88."""
    _check_positive(weight_bits=weight_bits, base_bits=base_bits)
    return base_bits / weight_bits


def compute_bound_rows(
    N: int, K: int, weight_bits: float, bandwidth: float, peak: float, act_bytes: float = 2, out_bytes: float = 2
) -> int | None:
    """Fewest rows M at which y = x W^T reaches the ridge, or None if no M does.

    Solving 2 M N K >= I* (N K b_w/8 + M (K b_x + N b_y)) for M:
        M >= I* N K b_w / 8 / (2 N K - I* (K b_x + N b_y)),
    reachable only while the denominator is positive: as M grows, the intensity tends to
    2 N K / (K b_x + N b_y), which a small layer may never lift above the ridge.
    """
    ridge = ridge_intensity(bandwidth, peak)
    denominator = 2 * N * K - ridge * (K * act_bytes + N * out_bytes)
    if denominator <= 0:
        return None
    return max(1, math.ceil(ridge * weight_bytes(N, K, weight_bits) / denominator))


@dataclass(frozen=True)
class TiledMatmul:
    """y = x W^T cut into Triton programs: output tiles of block_m x block_n, K in split_k slices.

    The grid has cdiv(M, block_m) * cdiv(N, block_n) * split_k programs. Each reads its slice of
    x and its [K / split_k, block_n] piece of the weight (on average: the last tile of a ragged
    edge is smaller). With split_k > 1 each program also writes an M x N float32 partial of its
    tile, and the last one of the tile reads them all back (kernels/w4a16.py, `store_split_k`):
    2 * split_k * M * N * 4 more bytes.

    Bytes assume that every weight byte comes from memory once; when several row blocks read
    the same weight tile, the L2 cache serves the re-reads (the GEMM's GROUP_M ordering).
    """

    M: int
    N: int
    K: int
    weight_bits: float
    block_m: int
    block_n: int
    split_k: int
    act_bytes: float = 2
    out_bytes: float = 2

    def __post_init__(self):
        _check_sizes(M=self.M, N=self.N, K=self.K, block_m=self.block_m, block_n=self.block_n, split_k=self.split_k)
        _check_positive(weight_bits=self.weight_bits, act_bytes=self.act_bytes, out_bytes=self.out_bytes)
        if self.split_k > self.K:
            raise ValueError(f"split_k = {self.split_k} is larger than K = {self.K}: some slices would be empty")

    @property
    def programs(self) -> int:
        """Programs in the grid."""
        return math.ceil(self.M / self.block_m) * math.ceil(self.N / self.block_n) * self.split_k

    def programs_per_sm(self, sms: int = H100_SMS) -> float:
        """Programs per streaming multiprocessor: below 1, some SMs get no work at all."""
        _check_sizes(sms=sms)
        return self.programs / sms

    @property
    def bytes_per_program(self) -> float:
        """Average bytes one program reads: its weight piece and its slice of x."""
        k_slice = self.K / self.split_k
        rows = min(self.M, self.block_m)
        return self.block_n * k_slice * self.weight_bits / 8 + rows * k_slice * self.act_bytes

    @property
    def split_k_bytes(self) -> float:
        """Bytes of the float32 partial sums: written by every slice, read back by the last."""
        return 0.0 if self.split_k == 1 else 2.0 * self.split_k * self.M * self.N * 4

    @property
    def total_bytes(self) -> float:
        """matmul_bytes plus the split-K partials."""
        moved = matmul_bytes(self.M, self.N, self.K, self.weight_bits, self.act_bytes, self.out_bytes)
        return moved + self.split_k_bytes

    def seconds(self, bandwidth: float, peak: float) -> float:
        """Roofline time of this launch, the split-K traffic included."""
        return roofline_seconds(matmul_flops(self.M, self.N, self.K), self.total_bytes, bandwidth, peak)
