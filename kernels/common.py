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


def launch(kernel, grid, *args, cpu_config: dict, relaunchable: bool = False, **kwargs) -> "Relaunch | None":
    """Run an autotuned kernel: tuned on a GPU, `cpu_config` under the interpreter.

    kernel: a `triton.autotune` object (its `.fn` is the kernel it tunes). grid: a tuple or a
    function of the chosen meta-parameters, as Triton takes it. relaunchable: on a GPU, return a
    `Relaunch` of this launch (otherwise, and under the interpreter, None).
    """
    if interpreting():
        kernel.fn[grid](*args, **kwargs, **cpu_config)
        return None
    with torch.cuda.device(args[0].device):
        compiled = kernel[grid](*args, **kwargs)
    return Relaunch.of(kernel, grid, args, kwargs, compiled) if relaunchable else None


class Relaunch:
    """A launch to repeat with other tensors in a few places: a layer's kernel called once per
    generated token, say, whose weights, configuration and shapes stay the same.

    Each Triton launch from Python binds the arguments to the kernel's parameters, looks up the
    autotuner's choice and the compiled kernel by their specializations (dtypes, 16-byte
    alignment of every pointer, which integers are 1 or multiples of 16), and only then calls the
    launcher, which asks every tensor for its address and the driver whether that address is a
    GPU's. On a slow host that costs several times the launch itself (the H100 machine's,
    benchmarks/results/per_call.md). A Relaunch does all that once, and afterwards calls the
    compiled kernel's launcher directly with addresses, as Triton's own launch path does at its
    end (without launch hooks: a profiler such as proton does not see relaunches). Replacement
    tensors must keep what the kernel was specialized for: dtype, device and 16-byte alignment;
    the caller checks that (TritonLinear4bit keys its relaunches by them).
    """

    def __init__(self, compiled, grid: tuple[int, ...], args: list, device: int):
        from triton.runtime import driver

        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.compiled = compiled
        self.kept = [a for a in args if isinstance(a, torch.Tensor)]  # alive as long as their addresses below
        self.args = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        self.device = device
        self.current_device, self.stream_of = driver.active.get_current_device, driver.active.get_current_stream

    @classmethod
    def of(cls, kernel, grid, args: tuple, kwargs: dict, compiled) -> "Relaunch":
        """The launch `kernel[grid](*args, **kwargs)` that compiled `compiled`: its arguments
        resolved as the autotuner (its choice) and the heuristics resolved them."""
        from triton.runtime.autotuner import Autotuner, Heuristics

        values, fn = dict(kwargs), kernel
        while isinstance(fn, (Autotuner, Heuristics)):
            named = {**dict(zip(fn.arg_names, args)), **values}
            if isinstance(fn, Autotuner):
                values.update(fn.best_config.kwargs)
            else:
                values.update({name: rule(named) for name, rule in fn.values.items()})
            fn = fn.fn
        named = {**dict(zip(fn.arg_names, args)), **values}
        full = [named[name] for name in fn.arg_names]
        return cls(compiled, grid(named) if callable(grid) else grid, full, args[0].device.index)

    def __call__(self, *replacements: tuple[int, torch.Tensor]) -> None:
        """Launch again with argument i replaced by tensor t for each (i, t) (positions as in the
        original launch's `args`), on the current stream of the original device."""
        args = list(self.args)
        for i, t in replacements:
            args[i] = t.data_ptr()
        if self.current_device() == self.device:
            self._run(args)
        else:  # the kernel is loaded in its device's context
            with torch.cuda.device(self.device):
                self._run(args)

    def _run(self, args: list) -> None:
        kernel = self.compiled
        # (grid, stream, function, metadata, launch metadata and enter/exit hooks: none, arguments)
        kernel.run(*self.grid, self.stream_of(self.device), kernel.function, kernel.packed_metadata, None, None, None, *args)


def tuning_bench(kernel_call, quantiles):
    """What the autotuners time configurations with: a shorter run than Triton's default."""
    import triton

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
