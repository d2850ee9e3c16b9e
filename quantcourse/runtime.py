"""Process-wide settings: fast mode, cache location, threads.

Fast mode (`QUANTCOURSE_FAST=1`) lowers sample counts so the test suite can execute notebooks and
results scripts on 2 cores. The test suite sets it for the processes it starts; published results
are never produced in fast mode (the results scripts refuse to write them).
"""

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import platformdirs
import torch

FAST_ENV = "QUANTCOURSE_FAST"
CACHE_ENV = "QUANTCOURSE_CACHE"


def fast_mode() -> bool:
    """True when `QUANTCOURSE_FAST` is set to a non-empty value other than 0."""
    return os.environ.get(FAST_ENV, "0") not in ("", "0")


def cache_dir() -> Path:
    """Where derived files (the dequantized model, reference log-probs) are kept.

    `QUANTCOURSE_CACHE` overrides the per-user default (~/.cache/quantcourse on Linux).
    """
    override = os.environ.get(CACHE_ENV)
    path = Path(override) if override else Path(platformdirs.user_cache_dir("quantcourse"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_all_cores() -> int:
    """Let torch use every core this process may run on; returns the thread count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores or 1))
    return torch.get_num_threads()


@contextmanager
def exclusive_lock(lock_path: Path):
    """Hold an exclusive file lock, so that parallel processes build a cached file once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
