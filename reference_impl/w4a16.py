"""W4A16: 4-bit weights, 16-bit activations, the weight-only format of GPTQ and AWQ checkpoints.

A decoder generating one token multiplies a vector by every weight matrix of the model: the
time goes into reading the weights, not into arithmetic. Four-bit codes are a quarter of the
bytes of fp16 weights, so a kernel that reads the codes and dequantizes them on the fly can run
up to ~4x faster (kernels/w4a16.py). This file is its answer key in plain torch:
unpack, dequantize, multiply.

Layout: GPTQ's checkpoint format (AutoGPTQ, GPTQModel; ANCHORS section 3), for a Linear weight
W [N, K] (N = out_features, K = in_features) quantized in groups of `group_size` inputs:

    qweight [K/8, N] int32   unsigned 4-bit codes of W^T, packed along K, lowest bits first
    scales  [G, N]   float   one scale per group and output (fp16 in checkpoints), G = K / group
    qzeros  [G, N/8] int32   the zero points, packed along N the same way; None: symmetric
    g_idx   [K]      int32   optional: the group of each input feature (GPTQ's act_order)

    W[n, k] = scales[g, n] * (code[k, n] - zero[g, n]),   g = g_idx[k]  (default k // group)

A symmetric grid (-7..7, affine.py) is stored shifted by 8: codes 1..15 with zero point 8, the
way GPTQ stores its symmetric grids, and needs no qzeros.

Zero points: AutoGPTQ's "v1" checkpoints store zero - 1 in qzeros (a quirk from an old kernel
that added 1 back); everything here takes the zero point itself ("v2", as GPTQModel converts
to on load). `zeros_from_v1` converts a v1 qzeros.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .affine import AffineSpec, quantize_tensor
from .packing import pack_int32, unpack_int32

BITS = 4
SYMMETRIC_ZERO = 2 ** (BITS - 1)  # 8: the zero point of a symmetric grid stored unsigned


def check_group_size(K: int, group_size: int | None) -> int:
    """The group size to use for K input features: K itself if None (one group per output row).

    It must be a multiple of 8 (the 8 codes of one int32 word share a group) that divides K.
    """
    group = K if group_size is None else group_size
    if not isinstance(group, int) or group < 8 or group % 8:
        raise ValueError(f"group_size must be a multiple of 8 (or None for per-channel), got {group_size!r}")
    if K % group:
        hint = " SmolLM2's 576-wide layers take group_size=64 or 32." if K == 576 else ""
        raise ValueError(
            f"in_features = {K} is not a multiple of group_size {group}: every group must be whole. "
            f"Choose a multiple of 8 that divides {K}.{hint}"
        )
    return group


def quantize_w4(
    W: torch.Tensor, group_size: int | None = 128, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest 4-bit quantization of a Linear weight into GPTQ's layout.

    W: [N, K] float. Min-max groups along K (lesson 01's quantize_tensor), then packing.
    Returns qweight [K/8, N] int32, scales [G, N] float32, qzeros [G, N/8] int32 (None when
    symmetric; asymmetric needs N to be a multiple of 8), on W's device; the work is done on CPU,
    where packing.py builds its words (kernels/quantize.py's quantize_int4 is the GPU twin).
    """
    K = W.shape[1]
    group = check_group_size(K, group_size)
    spec = AffineSpec(bits=BITS, symmetric=symmetric, granularity="group", group_size=group)
    q = quantize_tensor(W.detach().cpu().float(), spec)  # codes [N, K], scale and zero [N, G]
    codes = q.codes.to(torch.int16) + (SYMMETRIC_ZERO if symmetric else 0)  # unsigned 0..15
    qweight = pack_int32(codes.to(torch.uint8).T.contiguous(), BITS)
    qzeros = None if symmetric else pack_int32(q.zero.to(torch.uint8), BITS).T.contiguous()
    device = W.device
    return qweight.to(device), q.scale.T.contiguous().to(device), None if qzeros is None else qzeros.to(device)


def unpack_zeros(qzeros: torch.Tensor | None, groups: int, N: int) -> torch.Tensor:
    """Zero points [G, N] float32 from qzeros [G, N/8] int32, or all 8 when qzeros is None."""
    if qzeros is None:
        return torch.full((groups, N), float(SYMMETRIC_ZERO))
    return unpack_int32(qzeros.cpu().T.contiguous(), BITS, N).T.float()


def zeros_from_v1(qzeros_v1: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ v1 qzeros (zero - 1 per nibble) -> the zero points themselves (v2).

    A v1 zero of 0 was stored as -1, i.e. 15, and reads back as 16, which 4 bits cannot hold:
    v1 checkpoints cannot represent it, and this maps it to 0.
    """
    words = qzeros_v1.shape[1]
    zeros = unpack_int32(qzeros_v1.cpu().T.contiguous(), BITS, words * 8).to(torch.int16)
    return pack_int32(((zeros + 1) % 16).to(torch.uint8), BITS).T.contiguous().to(qzeros_v1.device)


def dequantize_w4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    group_size: int | None = 128,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight W [N, K] float32 that a GPTQ-layout checkpoint stands for (module doc)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    group = check_group_size(K, group_size)
    codes = unpack_int32(qweight.cpu(), BITS, K).float()  # [K, N]
    groups = torch.arange(K) // group if g_idx is None else g_idx.cpu().long()
    zeros = unpack_zeros(qzeros, scales.shape[0], N)  # [G, N]
    W_t = (codes - zeros[groups]) * scales.cpu().float()[groups]  # [K, N]: row k uses group g(k)
    return W_t.T.contiguous().to(qweight.device)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    group_size: int | None = 128,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = x @ W^T (+ bias) with W stored in 4 bits: unpack, dequantize, multiply.

    x: [..., K] float. Returns [..., N] in x's dtype, computed in float32.
    """
    W = dequantize_w4(qweight, scales, qzeros, group_size, g_idx).to(x.device)
    Y = F.linear(x.float(), W, None if bias is None else bias.float())
    return Y.to(x.dtype)


class W4A16Linear(nn.Module):
    """A Linear stored as GPTQ-layout 4-bit weights, computed by unpacking and dequantizing.

    Buffers: qweight [K/8, N] int32, scales [G, N] fp16 (as checkpoints store them), qzeros
    [G, N/8] int32 or None, g_idx [K] int32 or None, bias [N] or None.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        qzeros: torch.Tensor | None,
        g_idx: torch.Tensor | None,
        bias: torch.Tensor | None,
        group_size: int | None,
    ):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[0] * 8, qweight.shape[1]
        self.group_size = check_group_size(self.in_features, group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(torch.float16))
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("g_idx", g_idx)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = 128, symmetric: bool = True) -> "W4A16Linear":
        """Round-to-nearest 4-bit groups of a float Linear (group 128; 64 for SmolLM2's 576)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear to quantize, got {type(linear).__name__}")
        qweight, scales, qzeros = quantize_w4(linear.weight.detach(), group_size, symmetric)
        return cls(qweight, scales, qzeros, None, linear.bias, group_size)

    @classmethod
    def from_gptq(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        group_size: int | None = 128,
        zeros_format: str = "v1",
    ) -> "W4A16Linear":
        """From a GPTQ checkpoint's tensors; zeros_format "v1" (AutoGPTQ, zero - 1) or "v2".

        A g_idx that is just k // group_size (no act_order) is dropped: it changes nothing.
        """
        if zeros_format not in ("v1", "v2"):
            raise ValueError(f"zeros_format must be 'v1' (AutoGPTQ) or 'v2' (GPTQModel), got {zeros_format!r}")
        qzeros = zeros_from_v1(qzeros) if zeros_format == "v1" else qzeros
        K = qweight.shape[0] * 8
        group = check_group_size(K, group_size)
        if g_idx is not None:
            g_idx = g_idx.to(torch.int32)
            if torch.equal(g_idx.cpu(), (torch.arange(K) // group).to(torch.int32)):
                g_idx = None
        return cls(qweight, scales, qzeros, g_idx, bias, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x's dtype."""
        return w4a16_matmul(x, self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size, self.bias)

    def storage_bits(self) -> int:
        """4 bits per weight, a 16-bit scale per group and output, a 4-bit zero point each when
        asymmetric, and 32 bits per input feature for g_idx. The bias is not counted."""
        bits = self.qweight.numel() * 32 + self.scales.numel() * 16
        bits += 0 if self.qzeros is None else self.qzeros.numel() * 32
        return bits + (0 if self.g_idx is None else self.g_idx.numel() * 32)

    def weight_count(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        kind = "sym" if self.qzeros is None else "asym"
        act = ", act_order g_idx" if self.g_idx is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 {kind} g{self.group_size}{act}"
