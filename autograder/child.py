"""The learner process: runs a learner's solution code, then answers calls with plain data.

This file is executed as a script by `sandbox.py` in a fresh interpreter, so that nothing of the
course package is loaded in it; the grading process imports it only for `encode` and `decode`.

Inside the learner process:
- an audit hook refuses to import `quantcourse`, to open files of the course package (the
  reference is the answer key), to start processes and to open network connections; every
  refusal is reported to the grader;
- resource limits cap memory and CPU time; the grader adds a wall-clock timeout per call;
- the learner's prints go to a bounded buffer; only the first few kilobytes are kept;
- Triton kernels run in Triton's CPU interpreter (the sandbox sets TRITON_INTERPRET=1), and a
  load or store outside the tensors a kernel was given raises IndexError (`watch_triton_memory`).
  Cells are compiled under the file names "<learner cell N>" with their source in linecache,
  which is where @triton.jit and inspect find a kernel's source.

Objects of dataclasses (an `AffineSpec`, say) travel as their fields and arrive as a
`types.SimpleNamespace`: attribute access works, methods do not. torch dtypes travel by name.
numpy arrays travel like tensors, marked as arrays: a suite's numpy arguments reach the learner's
function as numpy arrays (lab 09 is written with numpy), while every result reaches the grader
as a tensor, which is what the suites compare. bytes travel as bytes.

Protocol: the grader writes one JSON request per line on stdin; answers go, one JSON object per
line, to the file descriptor named by QUANTCOURSE_SANDBOX_FD. Tensors travel as raw bytes
(base64) with dtype and shape: data only, never pickles, so the grader runs nothing it receives.
"""

import base64
import dataclasses
import io
import json
import linecache
import os
import sys
import traceback
import types

OUTPUT_LIMIT = 4000  # characters of learner output kept per call


def encode(value, depth: int = 0):
    """Plain-data form of a learner's result: tensors, dtypes, arrays, numbers, strings, containers."""
    import torch

    if depth > 20:
        return {"__unsupported__": "nesting deeper than 20"}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().clone(memory_format=torch.contiguous_format)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": base64.b64encode(data).decode()}
    if type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        if not value.ndim:  # a numpy scalar: a 0-dim tensor
            return encode(torch.tensor(value.item()), depth)
        return {**encode(torch.from_numpy(value.copy()), depth), "numpy": True}
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(value).decode()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, depth + 1) for v in value]}
    if isinstance(value, list):
        return [encode(v, depth + 1) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: encode(v, depth + 1) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type) or isinstance(value, types.SimpleNamespace):
        fields = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else vars(value)
        return {"__object__": type(value).__name__, "fields": {k: encode(v, depth + 1) for k, v in fields.items()}}
    return {"__unsupported__": f"{type(value).__name__}: {repr(value)[:200]}"}


def decode(value, numpy_arrays: bool = False):
    """Inverse of `encode` (used on both sides: arguments go down, results come back).

    numpy_arrays: what was a numpy array comes back as one (the learner process decodes its
    arguments so); otherwise every array becomes a tensor (the grader decodes results so).
    """
    import torch

    if isinstance(value, list):
        return [decode(v, numpy_arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__dtype__" in value:
        dtype = getattr(torch, str(value["__dtype__"]), None)
        return dtype if isinstance(dtype, torch.dtype) else Unsupported(f"dtype {value['__dtype__']!r}")
    if "__tensor__" in value:
        dtype = getattr(torch, value["__tensor__"])
        raw = bytearray(base64.b64decode(value["data"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensor = flat.view(dtype).reshape(value["shape"]).clone()
        return tensor.numpy() if numpy_arrays and value.get("numpy") else tensor
    if "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if "__tuple__" in value:
        return tuple(decode(v, numpy_arrays) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode(v, numpy_arrays) for k, v in value["__dict__"].items()}
    if "__object__" in value:  # a dataclass such as AffineSpec: its fields, as attributes
        return types.SimpleNamespace(**{k: decode(v, numpy_arrays) for k, v in value["fields"].items()})
    return Unsupported(value.get("__unsupported__", "unknown value"))


class Unsupported:
    """A result the wire cannot carry (an object of the learner's own class, a generator...)."""

    def __init__(self, description: str):
        self.description = description

    def __repr__(self):
        return f"<unsupported result {self.description}>"


class BoundedOutput(io.TextIOBase):
    """sys.stdout/stderr replacement that keeps the first OUTPUT_LIMIT characters."""

    def __init__(self):
        self.parts, self.size, self.dropped = [], 0, 0

    def write(self, text):
        room = OUTPUT_LIMIT - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def take(self) -> str:
        text = "".join(self.parts) + (f"\n... ({self.dropped} more characters not kept)" if self.dropped else "")
        self.parts, self.size, self.dropped = [], 0, 0
        return text


def install_guard(forbidden_dirs: list[str], refusals: list[str]) -> None:
    """Audit hook: no course package, no course files, no processes, no network."""
    blocked_events = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "subprocess.Popen", "os.kill", "os.killpg", "socket.connect", "socket.bind",
    }  # fmt: skip

    def hook(event, args):
        if event == "import" and str(args[0]).split(".")[0] == "quantcourse":
            refusals.append(f"import {args[0]}")
            raise ImportError(
                f"the grader runs your code without the course package: 'import {args[0]}' is not "
                "allowed here. Write the function with torch (and math/numpy) only."
            )
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if any(path.startswith(d) for d in forbidden_dirs):
                refusals.append(f"open {path}")
                raise PermissionError(f"reading the course's own files is not allowed while grading: {path}")
        if event in blocked_events:
            refusals.append(event)
            raise PermissionError(f"{event} is not allowed while grading")

    sys.addaudithook(hook)


def apply_limits(memory_mb: int, cpu_seconds: int) -> None:
    import resource

    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


CELL_FILE = "<learner cell {}>"


def watch_triton_memory() -> None:
    """Under Triton's interpreter, make a tl.load or tl.store outside every tensor the kernel was
    given raise IndexError, instead of reading or overwriting whatever memory lies there.

    Neither a GPU nor the interpreter checks: a block that runs past the edge of a tensor with no
    mask reads garbage or overwrites a neighbour, and the damage shows up elsewhere, or never.
    Here every unmasked address is checked against the storage of the kernel's tensor arguments.
    Installed once the learner's code has loaded the interpreter (TRITON_INTERPRET=1, set by the
    sandbox); a Triton without these internals is left unchecked.
    """
    interpreter = sys.modules.get("triton.runtime.interpreter")
    executor = getattr(interpreter, "GridExecutor", None)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if executor is None or builder is None or getattr(interpreter, "bounds_watched", False):
        return
    import numpy as np

    interpreter.bounds_watched = True
    run, load, store = executor.__call__, builder.create_masked_load, builder.create_masked_store
    kernel = {"name": "", "spans": []}  # the running kernel: (first byte, end byte, name, element size) per tensor

    def call(self, *args, **kwargs):
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        spans = []
        for name, value in named.items():
            if hasattr(value, "untyped_storage"):
                storage = value.untyped_storage()
                spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name, value.element_size()))
        outer = dict(kernel)
        kernel.update(name=self.fn.__name__, spans=spans)
        try:
            return run(self, *args, **kwargs)
        finally:
            kernel.update(outer)

    def where(address: int) -> str:
        def distance(span):
            start, end = span[:2]
            return start - address if address < start else max(0, address - end + 1)

        start, end, name, size = min(kernel["spans"], key=distance)
        index, length = (address - start) // size, (end - start) // size
        if address < start:
            return f"{-index} element(s) before the start of {name}"
        return f"element {index} of {name}, which holds {length}"

    def check(op: str, ptrs, mask) -> None:
        if not kernel["spans"]:
            return
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.int64)
        size = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        inside = np.zeros(addresses.shape, dtype=bool)
        for start, end, _, _ in kernel["spans"]:
            inside |= (addresses >= start) & (addresses + size <= end)
        if inside.all():
            return
        frames = [f for f in traceback.extract_stack() if f.filename.startswith("<learner cell ")]
        line = f" (cell {frames[-1].filename[14:-1]}, line {frames[-1].lineno})" if frames else ""
        example = "tl.load(ptrs, mask=offs < n, other=0)" if op == "load" else "tl.store(ptrs, value, mask=offs < n)"
        raise IndexError(
            f"out-of-bounds tl.{op} in {kernel['name']}{line}: {int((~inside).sum())} of its "
            f"{addresses.size} unmasked addresses lie outside every tensor passed to the kernel; the "
            f"first is {where(int(addresses[~inside][0]))}. A block that runs past the edge of a "
            f"tensor needs a mask: {example}"
        )

    def masked_load(self, ptrs, mask, other, *args):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, other, *args)

    def masked_store(self, ptrs, value, mask, *args):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    executor.__call__, builder.create_masked_load, builder.create_masked_store = call, masked_load, masked_store


def error_info(error: BaseException) -> dict:
    """Type, message and the learner's part of the traceback (frames of their cells only)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith("<learner cell ")]
    lines = [f"  cell {f.filename[14:-1]}, line {f.lineno}, in {f.name}: {f.line}" for f in frames]
    return {"type": type(error).__name__, "message": str(error)[:2000], "where": "\n".join(lines[-5:])}


def serve() -> None:
    answers = os.fdopen(int(os.environ["QUANTCOURSE_SANDBOX_FD"]), "w", buffering=1)
    forbidden = [d for d in os.environ.get("QUANTCOURSE_FORBIDDEN", "").split(os.pathsep) if d]
    refusals: list[str] = []
    output = BoundedOutput()
    requests = sys.stdin
    sys.stdin = io.StringIO("")  # input() in learner code gets EOF instead of the protocol
    apply_limits(int(os.environ["QUANTCOURSE_MEMORY_MB"]), int(os.environ["QUANTCOURSE_CPU_SECONDS"]))
    import torch  # noqa: F401  (before the guard: torch opens many files of its own)

    torch.set_num_threads(1)
    install_guard(forbidden, refusals)
    sys.stdout = sys.stderr = output
    namespace = {"__name__": "__learner__"}

    def send(message: dict) -> None:
        message["refusals"] = refusals[:]
        refusals.clear()
        answers.write(json.dumps(message) + "\n")

    for line in requests:
        request = json.loads(line)
        if request["op"] == "load":
            for cell in request["cells"]:
                send({"event": "cell_start", "index": cell["index"]})
                error = None
                filename = CELL_FILE.format(cell["index"])
                linecache.cache[filename] = (len(cell["source"]), None, cell["source"].splitlines(True), filename)
                try:
                    exec(compile(cell["source"], filename, "exec"), namespace)
                except BaseException as exc:  # noqa: BLE001  (SystemExit and KeyboardInterrupt too)
                    error = error_info(exc)
                send({"event": "cell_done", "index": cell["index"], "error": error, "output": output.take()})
            names = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("__"))
            send({"event": "loaded", "names": names})
        elif request["op"] == "call":
            watch_triton_memory()
            function = namespace.get(request["name"])
            try:
                if not callable(function):
                    raise NameError(f"{request['name']} is not defined")
                args = decode(request["args"], numpy_arrays=True)
                kwargs = decode(request["kwargs"], numpy_arrays=True)
                result = {"ok": True, "value": encode(function(*args, **kwargs))}
            except BaseException as exc:  # noqa: BLE001
                result = {"ok": False, "error": error_info(exc)}
            result["output"] = output.take()
            send(result)


if __name__ == "__main__":
    serve()
