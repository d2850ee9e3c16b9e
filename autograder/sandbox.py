"""The grading process's handle on the learner process (see child.py for the other side).

`Sandbox` starts a fresh interpreter with memory and CPU limits, loads the learner's solution
cells into it one by one, and forwards calls to the learner's functions, each with a wall-clock
timeout. If the learner process dies (os._exit, a segfault, a memory bomb) or hangs, the sandbox
reports that for the call in question and starts a new process for the next one; a cell that
kills or hangs the process while loading is left out of the next start. The grading process
never imports anything the learner wrote: it receives JSON and turns tensors back into tensors.
"""

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import quantcourse
from quantcourse import autograder, kernels, reference_impl

from . import child

# The learner process may not read these: the reference is the answer key.
PACKAGE_DIRS = [str(Path(p.__file__).resolve().parent) for p in (quantcourse, reference_impl, kernels, autograder)]
MAX_MESSAGE = 256 << 20  # a single answer above this is refused (and counts as a crash)


class LearnerFailure(Exception):
    """A call into learner code did not return a value. `kind` says why, the message explains."""

    kind = "error"


class LearnerError(LearnerFailure):
    kind = "error"  # the learner's function raised


class LearnerTimeout(LearnerFailure):
    kind = "timeout"


class LearnerCrash(LearnerFailure):
    kind = "crashed"  # the process died: os._exit, segfault, memory limit, CPU limit


class LearnerMissing(LearnerFailure):
    kind = "missing"  # the function is not defined by the notebook


class Forbidden(LearnerFailure):
    kind = "forbidden"  # the learner tried to reach the reference or the grader


@dataclass
class Cell:
    index: int  # position in the notebook, for messages
    source: str


@dataclass
class SandboxLimits:
    call_timeout: float = 20.0  # seconds of wall clock per call
    load_timeout: float = 60.0  # per cell while loading
    memory_mb: int = 3072
    cpu_seconds: int = 600  # for the whole learner process


@dataclass
class LoadReport:
    """What loading the notebook's solution cells did."""

    names: list[str] = field(default_factory=list)
    cell_errors: dict[int, str] = field(default_factory=dict)  # cell index -> message
    skipped_cells: dict[int, str] = field(default_factory=dict)  # cells that killed or hung the process
    refusals: list[str] = field(default_factory=list)  # forbidden actions attempted
    output: str = ""


class Sandbox:
    """Run one notebook's solution code in a separate, limited process."""

    def __init__(self, cells: list[Cell], limits: SandboxLimits | None = None):
        self.cells = cells
        self.limits = limits or SandboxLimits()
        self.report = LoadReport()
        self.process: subprocess.Popen | None = None
        self.answers = None
        self.restarts = 0

    # -- process management -------------------------------------------------------------------

    def _spawn(self) -> None:
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            "QUANTCOURSE_SANDBOX_FD": str(write_fd),
            "QUANTCOURSE_FORBIDDEN": os.pathsep.join(PACKAGE_DIRS),
            "QUANTCOURSE_MEMORY_MB": str(self.limits.memory_mb),
            "QUANTCOURSE_CPU_SECONDS": str(self.limits.cpu_seconds),
            "OMP_NUM_THREADS": "1",
            "TRITON_INTERPRET": "1",  # before the learner's cells import triton: kernels run on CPU tensors
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            [sys.executable, "-I", child.__file__],  # -I: no PYTHON* variables, no script dir on sys.path
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,), env=env, text=True, start_new_session=True,
        )  # fmt: skip
        os.close(write_fd)
        self.answers = os.fdopen(read_fd, "rb")
        self._buffer = b""

    def _kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
        if self.process:
            self.process.wait()
        if self.answers:
            self.answers.close()
        self.process = self.answers = None

    def close(self) -> None:
        self._kill()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def _receive(self, timeout: float) -> dict | None:
        """The next answer, or None if `timeout` passed (self.hung) or the process died."""
        deadline = time.monotonic() + timeout
        fd = self.answers.fileno()
        self.hung = False
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.hung = True
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk or len(self._buffer) + len(chunk) > MAX_MESSAGE:
                return None  # the learner process is gone, or answers absurdly much
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        self.last_refusals = message.pop("refusals", [])
        self.report.refusals += self.last_refusals
        return message

    def start(self) -> LoadReport:
        """(Re)start the learner process and load every cell not known to kill it."""
        while True:
            self._kill()
            self._spawn()
            cells = [c for c in self.cells if c.index not in self.report.skipped_cells]
            self._send({"op": "load", "cells": [{"index": c.index, "source": c.source} for c in cells]})
            current, failed = None, None
            timeout = 120.0  # the first answer waits for torch to import
            while True:
                message = self._receive(timeout)
                timeout = self.limits.load_timeout
                if message is None:
                    failed = current
                    break
                if message.get("event") == "cell_start":
                    current = message["index"]
                elif message.get("event") == "cell_done":
                    if message["error"]:
                        error = message["error"]
                        self.report.cell_errors[message["index"]] = f"{error['type']}: {error['message']}"
                    self.report.output += message.get("output", "")
                elif message.get("event") == "loaded":
                    self.report.names = message["names"]
                    return self.report
            if failed is None:
                raise RuntimeError("the learner process could not start: is torch importable?")
            self.report.skipped_cells[failed] = "it ran too long" if self.hung else "it ended the Python process"
            self.restarts += 1

    # -- calls ---------------------------------------------------------------------------------

    def call(self, name: str, *args, timeout: float | None = None, **kwargs):
        """Call the learner's `name` with plain-data arguments; return its decoded result.

        Raises LearnerMissing, LearnerError (the function raised), LearnerTimeout, LearnerCrash
        (the process died; it is restarted for the next call) or Forbidden.
        """
        if self.process is None:
            self.start()
        if name not in self.report.names:
            raise LearnerMissing(missing_message(name, self.report))
        self._send({"op": "call", "name": name, "args": child.encode(list(args)), "kwargs": child.encode(kwargs)})
        message = self._receive(timeout or self.limits.call_timeout)
        if message is None:
            hung = self.hung
            self._kill()
            self.start()
            if hung:
                raise LearnerTimeout(f"{name} did not return within {timeout or self.limits.call_timeout:.0f} s (an endless loop?)")
            raise LearnerCrash(
                f"{name} ended the Python process (os._exit, a crash, or more than "
                f"{self.limits.memory_mb} MB of memory)"
            )
        refused = [r for r in self.last_refusals if r.startswith(("import quantcourse", "open"))]
        if refused:
            raise Forbidden(f"{name} tried to reach the course's reference ({refused[0]}): not allowed while grading")
        if not message["ok"]:
            error = message["error"]
            if error["type"] == "MemoryError":
                raise LearnerCrash(f"{name} ran out of memory (the limit is {self.limits.memory_mb} MB)")
            where = f"\n{error['where']}" if error["where"] else ""
            raise LearnerError(f"{name} raised {error['type']}: {error['message']}{where}")
        return child.decode(message["value"])


def missing_message(name: str, report: LoadReport) -> str:
    """Why a graded function is not there, with the likely cause."""
    hints = []
    if report.cell_errors:
        first = min(report.cell_errors)
        hints.append(f"cell {first} failed to run ({report.cell_errors[first]})")
    for index, why in report.skipped_cells.items():
        hints.append(f"cell {index} was left out because {why}")
    hint = "; ".join(hints) if hints else "was its cell deleted, or the function renamed?"
    return f"{name} is not defined by your notebook: {hint}"
