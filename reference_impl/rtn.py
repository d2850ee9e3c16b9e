"""Round-to-nearest (RTN) weight-only quantization: the baseline every method is measured against.

Each weight is rounded to the nearest level of its block's min-max grid, independently of the
others and of the data the layer sees. GPTQ (lesson 04) and AWQ (lesson 05) improve on exactly
this.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .affine import AffineSpec, QuantizedTensor, quantize_tensor


class FakeQuantLinear(nn.Module):
    """A Linear whose weight is stored quantized (WxA16): codes, scales and zero points.

    Computes in floating point with the dequantized weight ("fake quantization"): the numbers
    are exactly those of a real low-bit kernel, without its speed (lesson 10 brings the speed).
    weight: [out_features, in_features], dequantized once at construction.
    """

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.qweight = qweight
        self.in_features = qweight.codes.shape[1]
        self.out_features = qweight.codes.shape[0]
        self.register_buffer("weight", qweight.dequantize().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: AffineSpec) -> "FakeQuantLinear":
        """Quantize a float Linear's weight with min-max blocks as `spec` says.

        Per-channel specs must use axis 0 (one scale per output row); groups run along the
        input dimension.
        """
        if spec.granularity == "channel" and spec.axis not in (0, -2):
            raise ValueError("per-channel weight quantization uses axis=0: one scale per output row")
        qweight = quantize_tensor(linear.weight.detach(), spec)
        return cls(qweight, linear.bias, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def storage_bits(self) -> int:
        return self.qweight.storage_bits()

    def weight_count(self) -> int:
        return self.qweight.codes.numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qweight.spec.describe()}"
