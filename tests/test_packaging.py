"""The distribution installs one package, `quantcourse`, with the course folders as subpackages."""

import subprocess
import sys

from conftest import REPO


def python_in(cwd, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_course_folders_are_subpackages():
    import quantcourse.autograder
    import quantcourse.kernels
    import quantcourse.reference_impl

    assert quantcourse.reference_impl.__file__.startswith(str(REPO / "reference_impl"))
    assert quantcourse.kernels.__file__.startswith(str(REPO / "kernels"))
    assert quantcourse.autograder.__file__.startswith(str(REPO / "autograder"))


def test_no_top_level_kernels_module_is_installed(tmp_path):
    result = python_in(tmp_path, "import importlib.util; print(importlib.util.find_spec('kernels'))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"


def test_transformers_does_not_mistake_the_kernels_folder_for_the_hub_package():
    # Even from the checkout's root, where kernels/ is on sys.path, transformers needs the PyPI
    # package's metadata to consider it installed.
    code = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    result = python_in(REPO, code)
    assert result.stdout.strip() == "False", result.stderr


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "quantcourse", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("lab", "info", "eval"):
        assert command in result.stdout


def test_installed_environment_matches_the_makefile():
    """`make -q setup` exits 0 when the stamp is newer than pyproject.toml and the Makefile."""
    stamp = REPO / ".venv" / ".quantcourse-installed"
    if not stamp.exists() or not sys.prefix.startswith(str(REPO / ".venv")):
        import pytest

        pytest.skip("not running inside the .venv that `make` builds")
    result = subprocess.run(["make", "-q", "setup"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, "the .venv is older than pyproject.toml or the Makefile"
