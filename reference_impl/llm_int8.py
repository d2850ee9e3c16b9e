"""LLM.int8(): vector-wise int8 matrix multiplication with a floating-point side path for outliers.

Vector-wise int8 (Dettmers et al., 2022) gives every row of the activations X [M, K] (a token)
and every row of the weight W [N, K] (an output channel) its own absmax scale:

    A_q = round(A * 127 / absmax_row(A))            int8 codes in [-127, 127]
    Y   = (X_q @ W_q^T) * absmax(X)_i * absmax(W)_j / 127^2      int32 accumulate, then rescale

One large value in a token sets that token's scale, and every ordinary value of the token then
falls on a few codes. Real LLMs have such values in a few fixed input features (see
`outliers.py`), so LLM.int8() splits the product by input feature:

    outlier columns O = { k : |X[i, k]| >= threshold for some token i }      (threshold 6.0)
    Y = int8 vector-wise product over the columns not in O  +  X[:, O] @ W[:, O]^T in float

This file holds the primitives (`int8_vectorwise_quant`, `int8_matmul`, `int8_mm_dequant`), the
decomposition (`llm_int8_matmul`), and two modules to swap into a model: `W8A8Linear` (all int8,
activation scales per token or per tensor; SmoothQuant in lesson 06 reuses it) and
`LLMInt8Linear` (the decomposition).

What bitsandbytes 0.50.2 computes, and this file reproduces (its CPU path is the "default"
backend, bitsandbytes/backends/default/ops.py, with torch._int_mm for the int8 product):
- It casts activations and weights to fp16 before quantizing. These functions quantize whatever
  float dtype they get (fp32 in the course's model) and give bnb's exact codes on fp16 input.
- The outlier *elements* (|x| >= threshold) are set to zero before the row absmax is taken, but
  the other elements of an outlier column still count towards it; afterwards the codes of the
  whole outlier columns are zeroed, so those columns reach the output through the float path only.
- The float path multiplies the original activations by the *dequantized int8* weight columns
  (bnb keeps no fp16 copy of the weight), not by the original weights as in the paper.
- bnb's CPU int8_mm_dequant multiplies by the literal 6.200124e-05, a transposition of
  1/127^2 = 6.200012e-05 (the value its CUDA kernel uses): its CPU results are 1.8e-5 too large
  relative. `int8_mm_dequant` here uses 1/127^2.
"""

from typing import Literal

import torch
from torch import nn

from .affine import check_tensor, quant_range
from .outliers import LLM_INT8_THRESHOLD, check_threshold

QMAX = quant_range(8, signed=True)[1]  # 127: codes use [-127, 127], symmetric around 0
ActGranularity = Literal["token", "tensor"]

# torch._int_mm multiplies int8 matrices into int32 exactly. bitsandbytes only trusts it on CPU
# from torch 2.6 with AVX-512: older versions could overflow, and without AVX-512 it runs a slow
# scalar loop. Elsewhere int8_matmul takes the exact float32 path below.
INT_MM_ON_CPU = torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.__version__ >= (2, 6)

# A float32 matmul of int8 values is exact while every partial sum is an integer float32 can
# hold: |sum| <= K * 128 * 128 <= 2^24, i.e. K <= 1024. SmolLM2's down_proj has K = 1536, so the
# float path splits K into chunks of 1024 and adds the chunk results as int32.
EXACT_FLOAT32_K = 2**24 // (128 * 128)


def check_matrix(A: torch.Tensor, what: str) -> torch.Tensor:
    """A finite float matrix [rows, cols]; anything else is refused with the reason."""
    check_tensor(A, what)
    if A.dim() != 2:
        raise ValueError(
            f"{what} must be a matrix [rows, cols], got shape {tuple(A.shape)}; "
            "flatten leading dimensions first, e.g. x.reshape(-1, x.shape[-1])"
        )
    return A


def absmax_quantize(A: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """int8 codes round(A * 127 / absmax), ties to even. absmax: float32, broadcastable to A.

    Multiplies by the float32 factor 127 / absmax (as bitsandbytes does, so codes match bit for
    bit); a block whose absmax is 0 holds only zeros and gets codes 0 instead of 0 * inf = NaN.
    """
    factor = torch.where(absmax > 0, QMAX / absmax, torch.zeros_like(absmax))
    return torch.round(A.float() * factor).to(torch.int8)


def int8_vectorwise_quant(
    A: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize each row of A with its own absmax scale (bitsandbytes' int8_vectorwise_quant).

    A: [rows, cols] float (fp16 in bitsandbytes; any float dtype here).
    threshold: 0 quantizes everything. Above 0, the columns holding any |A| >= threshold are
        outlier columns: their outlier values do not set the row scale and all their codes are 0.
    Returns codes [rows, cols] int8, row_absmax [rows] float32 (x_hat = codes * row_absmax / 127),
    and outlier_cols [n] int64 ascending (None when threshold is 0).
    """
    check_matrix(A, "A")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (0 turns the outlier split off), got {threshold!r}")
    if threshold == 0:
        row_absmax = A.abs().amax(dim=1).float()
        return absmax_quantize(A, row_absmax[:, None]), row_absmax, None
    is_outlier = A.abs() >= threshold  # compared in A's dtype, like bitsandbytes
    outlier_cols = torch.nonzero(is_outlier.any(dim=0)).flatten()
    inliers = A.masked_fill(is_outlier, 0)
    row_absmax = inliers.abs().amax(dim=1).float()
    codes = absmax_quantize(inliers, row_absmax[:, None])
    codes[:, outlier_cols] = 0
    return codes, row_absmax, outlier_cols


def int8_vectorwise_dequant(codes: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """x_hat = codes * row_absmax / 127. codes: [rows, cols] int8; returns float32."""
    return codes.float() * (row_absmax[:, None] / QMAX)


def int8_tensorwise_quant(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize all of A with one absmax scale. A: [rows, cols] float.

    Returns codes [rows, cols] int8 and absmax [rows] float32 (the same value in every row, so
    that `int8_mm_dequant` treats it like per-row statistics).
    """
    check_matrix(A, "A")
    absmax = A.abs().amax().float()
    return absmax_quantize(A, absmax), absmax.expand(A.shape[0])


def check_int8_operands(A: torch.Tensor, B: torch.Tensor) -> None:
    for what, T in (("A_int8", A), ("B_int8", B)):
        if not isinstance(T, torch.Tensor) or T.dtype != torch.int8 or T.dim() != 2:
            raise TypeError(
                f"{what} must be an int8 matrix, got "
                f"{T.dtype if isinstance(T, torch.Tensor) else type(T).__name__} of shape "
                f"{tuple(getattr(T, 'shape', ()))}; quantize it first with int8_vectorwise_quant"
            )
    if A.shape[1] != B.shape[1]:
        raise ValueError(
            f"inner dimensions differ: A_int8 is {tuple(A.shape)} [M, K], B_int8 is {tuple(B.shape)} "
            "[N, K]; B is laid out like a Linear weight (one row per output), not transposed"
        )


def int8_matmul(A_int8: torch.Tensor, B_int8: torch.Tensor) -> torch.Tensor:
    """Exact integer product C = A_int8 @ B_int8^T. A_int8: [M, K], B_int8: [N, K] int8.

    Returns [M, N] int32. Uses torch._int_mm on a CPU that runs it fast, else the exact float32
    path `int8_matmul_via_float32`.
    """
    check_int8_operands(A_int8, B_int8)
    if A_int8.device.type == "cpu" and INT_MM_ON_CPU:
        return torch._int_mm(A_int8, B_int8.t())
    return int8_matmul_via_float32(A_int8, B_int8)


def int8_matmul_via_float32(A_int8: torch.Tensor, B_int8: torch.Tensor) -> torch.Tensor:
    """C = A_int8 @ B_int8^T [M, N] int32, exact, from float32 matmuls over K-chunks of 1024."""
    check_int8_operands(A_int8, B_int8)
    C = torch.zeros(A_int8.shape[0], B_int8.shape[0], dtype=torch.int32, device=A_int8.device)
    for k in range(0, A_int8.shape[1], EXACT_FLOAT32_K):
        chunk = slice(k, k + EXACT_FLOAT32_K)
        C += (A_int8[:, chunk].float() @ B_int8[:, chunk].float().t()).to(torch.int32)
    return C


def int8_mm_dequant(
    C: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Y = C * row_stats_i * col_stats_j / 127^2 (+ bias), cast to `dtype`.

    C: [M, N] int32 from `int8_matmul`; row_stats: [M] float32 absmax of each activation row;
    col_stats: [N] float32 absmax of each weight row; bias: [N] or None. Computed in float32 in
    bitsandbytes' order: C * (row x col) * (1/127^2), then + bias.
    """
    if C.dtype != torch.int32 or C.dim() != 2:
        raise TypeError(f"C must be the int32 [M, N] result of int8_matmul, got {C.dtype} {tuple(C.shape)}")
    if row_stats.shape != (C.shape[0],) or col_stats.shape != (C.shape[1],):
        raise ValueError(
            f"C is {tuple(C.shape)}: expected row_stats of shape ({C.shape[0]},) and col_stats of "
            f"shape ({C.shape[1]},), got {tuple(row_stats.shape)} and {tuple(col_stats.shape)}"
        )
    Y = C.float() * (row_stats.float()[:, None] * col_stats.float()[None, :]) * (1 / QMAX**2)
    if bias is not None:
        Y += bias
    return Y.to(dtype)


def int8_decomposed_matmul(
    X: torch.Tensor,
    W_codes: torch.Tensor,
    W_absmax: torch.Tensor,
    threshold: float = LLM_INT8_THRESHOLD,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() product with a weight already quantized by `int8_vectorwise_quant`.

    X: [M, K] float; W_codes: [N, K] int8; W_absmax: [N] float32; bias: [N] or None.
    Returns Y [M, N] in X's dtype (computed in float32) and outlier_cols [n] int64: the input
    features that took the float path. Like bitsandbytes, that path multiplies X[:, O] by the
    dequantized int8 weight columns: int8 weights are all that is stored.
    """
    check_threshold(threshold)
    if X.dim() != 2 or X.shape[1] != W_codes.shape[1]:
        raise ValueError(
            f"X must be [M, K] with K = {W_codes.shape[1]} (the weight's in_features), got {tuple(X.shape)}"
        )
    X_codes, X_absmax, outlier_cols = int8_vectorwise_quant(X, threshold)
    Y = int8_mm_dequant(int8_matmul(X_codes, W_codes), X_absmax, W_absmax, bias)
    if outlier_cols.numel():
        W_outliers = int8_vectorwise_dequant(W_codes[:, outlier_cols], W_absmax)  # [N, n] float32
        Y.addmm_(X[:, outlier_cols].float(), W_outliers.t())
    return Y.to(X.dtype), outlier_cols


def llm_int8_matmul(
    X: torch.Tensor, W: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Y = X @ W^T (+ bias) the LLM.int8() way: vector-wise int8 plus float outlier columns.

    X: [M, K] float activations; W: [N, K] float weight (a Linear's layout); bias: [N] or None.
    Returns [M, N] in X's dtype. On fp16 inputs it matches bitsandbytes' MatMul8bitLt with
    `threshold` to fp16 rounding.
    """
    check_matrix(W, "W")
    W_codes, W_absmax, _ = int8_vectorwise_quant(W)
    return int8_decomposed_matmul(check_matrix(X, "X"), W_codes, W_absmax, threshold, bias)[0]


class Int8WeightLinear(nn.Module):
    """The stored part shared by the int8 Linears: weight codes and scales, one per output row.

    weight_codes: [out_features, in_features] int8; weight_absmax: [out_features] float32
    (w_hat = codes * absmax / 127); bias: [out_features] in the Linear's dtype, or None.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear to quantize, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, absmax, _ = int8_vectorwise_quant(linear.weight.detach())
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_absmax", absmax)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def flatten_input(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [tokens, in_features]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features in its last dimension, but this layer expects "
                f"in_features={self.in_features}"
            )
        return x.reshape(-1, self.in_features)

    def storage_bits(self) -> int:
        """8 bits per weight code + one float32 scale per output row (bitsandbytes keeps its
        row statistics, SCB, in float32). The bias, kept in float, is not counted."""
        return self.weight_codes.numel() * 8 + self.weight_absmax.numel() * 32

    def weight_count(self) -> int:
        return self.weight_codes.numel()


class W8A8Linear(Int8WeightLinear):
    """A Linear computed entirely in int8: W8A8 with dynamic activation scales.

    Weights: int8 per output row (absmax / 127). Activations: quantized at every call, one
    absmax scale per token ("token") or one for the whole input ("tensor"); then int8 x int8 ->
    int32 and one rescale. Per-tensor is what cheap int8 hardware paths want; with SmolLM2's
    outliers it loses most tokens' resolution, which is the point of lessons 02 and 06.
    """

    def __init__(self, linear: nn.Linear, act_granularity: ActGranularity):
        if act_granularity not in ("token", "tensor"):
            raise ValueError(f"act_granularity must be 'token' or 'tensor', got {act_granularity!r}")
        super().__init__(linear)
        self.act_granularity = act_granularity

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_granularity: ActGranularity = "token") -> "W8A8Linear":
        return cls(linear, act_granularity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        X = self.flatten_input(x)
        if self.act_granularity == "token":
            X_codes, X_absmax, _ = int8_vectorwise_quant(X)
        else:
            X_codes, X_absmax = int8_tensorwise_quant(X)
        Y = int8_mm_dequant(int8_matmul(X_codes, self.weight_codes), X_absmax, self.weight_absmax, self.bias)
        return Y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 per-{self.act_granularity}"


class LLMInt8Linear(Int8WeightLinear):
    """A Linear computed the LLM.int8() way: int8 weights per output row, and at every call
    vector-wise int8 activations except the input features that reach `threshold`, which take
    the float path.

    last_outlier_cols: [n] int64, the input features that took the float path in the last
    forward (None before the first); its length is what the lecture plots per layer.
    """

    def __init__(self, linear: nn.Linear, threshold: float):
        check_threshold(threshold)
        super().__init__(linear)
        self.threshold = threshold
        self.last_outlier_cols: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = LLM_INT8_THRESHOLD) -> "LLMInt8Linear":
        return cls(linear, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        Y, self.last_outlier_cols = int8_decomposed_matmul(
            self.flatten_input(x), self.weight_codes, self.weight_absmax, self.threshold, self.bias
        )
        return Y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"
