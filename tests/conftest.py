"""Shared fixtures: one reference model per test process (pytest-xdist runs one per core)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Longest first: the results scripts, then the other slow tests, then the rest. pytest-xdist
    hands tests to the workers in this order, so no long test starts near the end of the run while
    the other core sits idle."""
    def rank(item) -> tuple[bool, bool, bool]:
        name = item.path.name
        script = name.startswith("test_benchmarks")
        return item.get_closest_marker("slow") is None, not script, name == "test_benchmarks.py"  # its tests are shorter

    items.sort(key=rank)


@pytest.fixture(scope="session")
def reference():
    """(model, tokenizer): the fp32 SmolLM2 reference. Never modify it; use `fresh_model`."""
    from quantcourse.models import load_reference_model

    return load_reference_model()


@pytest.fixture
def fresh_model(reference):
    """A private copy of the reference model that a test may quantize or change."""
    model = copy.deepcopy(reference[0])
    model.reference_weights_sha256 = reference[0].reference_weights_sha256
    return model


@pytest.fixture(scope="session")
def tokenizer(reference):
    return reference[1]


def run_cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m quantcourse ARGS` in fast mode from a neutral directory."""
    environment = {**os.environ, "QUANTCOURSE_FAST": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "quantcourse", *args],
        capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO / "tests",
    )  # fmt: skip
