"""What every launcher in this folder does before a kernel runs: check its inputs, and launch it
autotuned on a GPU or with one fixed configuration under Triton's interpreter.

Why two ways to launch: `triton.autotune` times each configuration with CUDA events, which a
CPU does not have. Under the interpreter (`TRITON_INTERPRET=1`) timings mean nothing anyway, so
each kernel names one small configuration for it (`cpu_config`), small enough that the tests'
tiny shapes still span several blocks and exercise every ragged edge.
"""

import os

import torch

ENV_HINT = (
    "set TRITON_INTERPRET=1 before importing triton (as the first lines of the notebook or script: "
    "import os; os.environ['TRITON_INTERPRET'] = '1')"
)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET` set and not 0)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


def check_device(*tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device, and that device one a kernel can run on; returns it."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "a Triton GPU kernel got CPU tensors while Triton's interpreter is off. On a machine "
            f"without a GPU, {ENV_HINT}; on a GPU machine, move the tensors there with .cuda()."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the kernels run on CUDA GPUs (or on CPU under the interpreter), got {device}")
    return device


def check_tensor(
    t: torch.Tensor, what: str, dtypes: tuple[torch.dtype, ...], dims: int | None = 2, shape: tuple | None = None
) -> torch.Tensor:
    """Refuse a wrong type, dtype, number of dimensions, shape or memory layout, saying which."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{what} must have dtype {names}; got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{what} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(
            f"{what} is not contiguous (strides {t.stride()} for shape {tuple(t.shape)}): the kernels "
            "index rows by their length. Pass .contiguous()."
        )
    return t


def launch(kernel, grid, *args, cpu_config: dict, **kwargs) -> None:
    """Run an autotuned kernel: tuned on a GPU, `cpu_config` under the interpreter.

    kernel: a `triton.autotune` object (its `.fn` is the kernel it tunes). grid: a tuple or a
    function of the chosen meta-parameters, as Triton takes it.
    """
    if interpreting():
        kernel.fn[grid](*args, **kwargs, **cpu_config)
        return
    with torch.cuda.device(args[0].device):
        kernel[grid](*args, **kwargs)


def tuning_bench(kernel_call, quantiles):
    """What the autotuners time configurations with: a shorter run than Triton's default."""
    import triton

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
