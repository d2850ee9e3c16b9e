"""Where the kernel tests run, and how close a float kernel must come to its torch twin.

Each kernel test module sets TRITON_INTERPRET=1 itself (when there is no GPU) before anything
imports triton, then imports this. On CPU the kernels run under Triton's interpreter at small
shapes; on a GPU machine the same tests run compiled at real sizes.
"""

import pytest
import torch

from quantcourse.kernels.common import interpreting

ON_GPU = torch.cuda.is_available() and not interpreting()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU with the interpreter off")),
]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]

# Relative error ||out - ref|| / ||ref|| allowed where a float kernel sums in another order than
# its twin, by output dtype. bfloat16 is looser on CPU: the interpreter converts float32 to
# bfloat16 by truncation, where torch and the GPU round to nearest.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3 if ON_GPU else 1.5e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "the kernel wrote NaN or inf (an element left unwritten?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def sizes(device: str, cpu, gpu):
    """Small cases for the interpreter, real ones for the GPU."""
    return cpu if device == "cpu" else gpu
