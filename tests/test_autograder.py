"""The grading engine against adversarial submissions: each misbehaviour costs only the tests it
touches, with a clear message, and grading carries on."""

import inspect
import json
import subprocess
import sys
import textwrap

import nbformat
import pytest

from quantcourse.autograder.engine import grade_notebook
from quantcourse.autograder.notebook import read_submission
from quantcourse.autograder.sandbox import SandboxLimits

SUITE = '''
import torch
from quantcourse.autograder.testing import graded, expect_close

GRADED = {}

def check_double(learner, name):
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    expect_close(getattr(learner, name)(x), 2 * x, call=f"{name}(x)", inputs={"x": x})

@graded("99.first", points=1)
def test_first(learner):
    check_double(learner, "double")

@graded("99.raises", points=1)
def test_raises(learner):
    check_double(learner, "raises")

@graded("99.sys_exit", points=1)
def test_sys_exit(learner):
    check_double(learner, "sys_exit")

@graded("99.os_exit", points=1)
def test_os_exit(learner):
    check_double(learner, "os_exit")

@graded("99.segfault", points=1)
def test_segfault(learner):
    check_double(learner, "segfault")

@graded("99.loop", points=1)
def test_loop(learner):
    check_double(learner, "loop")

@graded("99.memory", points=1)
def test_memory(learner):
    check_double(learner, "memory")

@graded("99.flood", points=1)
def test_flood(learner):
    check_double(learner, "flood")

@graded("99.patch", points=1)
def test_patch(learner):
    check_double(learner, "patch")

@graded("99.cheat", points=1)
def test_cheat(learner):
    check_double(learner, "cheat")

@graded("99.peek", points=1)
def test_peek(learner):
    check_double(learner, "peek")

@graded("99.broken_cell", points=1)
def test_broken_cell(learner):
    check_double(learner, "in_broken_cell")

@graded("99.killer_cell", points=1)
def test_killer_cell(learner):
    check_double(learner, "after_killer")

@graded("99.last", points=1)
def test_last(learner):
    check_double(learner, "double")
'''

CELLS = {
    "good": """
        import torch
        def double(x):
            return 2 * x
    """,
    "raises": """
        def raises(x):
            return x[5, 5]
    """,
    "exits": """
        import os, sys, ctypes
        def sys_exit(x):
            sys.exit(3)
        def os_exit(x):
            os._exit(3)
        def segfault(x):
            return ctypes.string_at(0)
    """,
    "loops": """
        def loop(x):
            while True:
                pass
        def memory(x):
            hoard = [bytearray(1 << 29) for _ in range(1000)]  # past the 2 GiB limit in a few allocations, even on a busy machine
            return 2 * x
        def flood(x):
            for _ in range(200_000):
                print("spam" * 20)
            return 2 * x
    """,
    "patch": """
        import torch
        def patch(x):
            torch.isclose = lambda *a, **k: torch.ones(1, dtype=torch.bool)
            torch.allclose = lambda *a, **k: True
            return x
    """,
    "cheat": """
        def cheat(x):
            from quantcourse.reference_impl import affine
            return 2 * x
        def peek(x):
            import quantcourse
            return 2 * x
    """,
    "broken": """
        def in_broken_cell(x):
            return 2 * x
        def oops(:
    """,
    "killer": """
        import os
        ### BEGIN SOLUTION
        KILLED = os._exit(0)
        ### END SOLUTION
        def after_killer(x):
            return 2 * x
    """,
    "test cell a learner edited": """
        grade("99.first")
        double = lambda x: 2 * x
    """,
}


def write_notebook(path, cells: dict[str, str]):
    nb = nbformat.v4.new_notebook()
    nb.metadata["quantcourse"] = {"lab": "99_probe"}
    nb.cells = [nbformat.v4.new_markdown_cell("# probe")]
    nb.cells += [nbformat.v4.new_code_cell(textwrap.dedent(source).strip()) for source in cells.values()]
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    folder = tmp_path_factory.mktemp("suites")
    (folder / "test_99_probe.py").write_text(SUITE)
    return folder


@pytest.fixture(scope="module")
def adversarial_report(suites, tmp_path_factory):
    path = write_notebook(tmp_path_factory.mktemp("nb") / "99_probe.ipynb", CELLS)
    before = path.read_bytes()
    report = grade_notebook(path, suites=suites, limits=SandboxLimits(call_timeout=5, memory_mb=2048))
    assert path.read_bytes() == before, "grading must never modify the notebook"
    return {t.name: t for t in report.tests}, report


@pytest.mark.slow
@pytest.mark.parametrize(
    "test, status, words",
    [
        ("test_first", "passed", "correct"),
        ("test_raises", "error", "IndexError"),
        ("test_sys_exit", "error", "SystemExit"),
        ("test_os_exit", "crashed", "ended the Python process"),
        ("test_segfault", "crashed", "ended the Python process"),
        ("test_loop", "timeout", "did not return within 5 s"),
        ("test_memory", "crashed", "memory"),
        ("test_flood", "passed", "correct"),
        ("test_patch", "failed", "5 of 6 values differ"),
        ("test_cheat", "forbidden", "import quantcourse.reference_impl"),
        ("test_peek", "forbidden", "import quantcourse"),
        ("test_broken_cell", "missing", "SyntaxError"),
        ("test_killer_cell", "missing", "ended the Python process"),
        ("test_last", "passed", "correct"),
    ],
)
def test_each_misbehaviour_costs_only_its_own_test(adversarial_report, test, status, words):
    results, _ = adversarial_report
    assert results[test].status == status, results[test].feedback
    assert words in results[test].feedback
    assert results[test].points == (1 if status == "passed" else 0)


@pytest.mark.slow
def test_the_report_adds_up_and_notes_the_cells(adversarial_report):
    _, report = adversarial_report
    assert (report.score, report.max_score) == (3, 14)
    assert any("SyntaxError" in why for why in report.load.cell_errors.values())
    assert list(report.load.skipped_cells.values()) == ["it ended the Python process"]
    assert "import quantcourse.reference_impl" in report.load.refusals


def test_test_cells_and_demo_code_are_not_run(tmp_path):
    path = write_notebook(tmp_path / "99_probe.ipynb", {
        "demo": "import torch\nprint('plot')\nmodel = load_model()\ndef double(x):\n    return 2 * x",
        "tests": 'assert double(1) == 2\n### BEGIN HIDDEN TESTS\ngrade("99.first")\n### END HIDDEN TESTS',
        "course import": "from quantcourse.models import load_reference_model\ndef f():\n    return 1",
    })  # fmt: skip
    cells = read_submission(path).cells
    sources = "\n".join(c.source for c in cells)
    assert "def double" in sources and "def f" in sources
    assert "print(" not in sources and "load_model" not in sources and "grade(" not in sources
    assert "quantcourse" not in sources


def test_check_command_json_contract_and_exit_codes(suites, tmp_path):
    path = write_notebook(tmp_path / "99_probe.ipynb", {"good": CELLS["good"]})
    # the CLI looks suites up in the package; probe the contract on a missing lab instead
    result = subprocess.run([sys.executable, "-m", "quantcourse", "check", str(path), "--json"], capture_output=True, text=True)
    assert result.returncode == 2 and "no grading suite for lab '99_probe'" in result.stderr
    result = subprocess.run([sys.executable, "-m", "quantcourse", "check", str(tmp_path / "missing.ipynb")], capture_output=True, text=True)
    assert result.returncode == 2 and "does not exist" in result.stderr
    (tmp_path / "01_affine.ipynb").write_text("not json")
    result = subprocess.run([sys.executable, "-m", "quantcourse", "check", str(tmp_path / "01_affine.ipynb")], capture_output=True, text=True)
    assert result.returncode == 2 and "not a readable Jupyter notebook" in result.stderr


def test_report_json_has_the_documented_keys(suites, tmp_path):
    path = write_notebook(tmp_path / "99_probe.ipynb", {"good": CELLS["good"]})
    report = grade_notebook(path, keys={"99.first", "99.raises"}, suites=suites).to_json()
    assert {"notebook", "score", "max_score", "tests"} <= report.keys()
    assert report["score"] == 1 and report["max_score"] == 2
    assert all(set(t) == {"name", "points", "max_points", "status", "feedback"} for t in report["tests"])
    assert json.loads(json.dumps(report)) == report


TRITON_CELL = """
import os
import torch
import triton
import triton.language as tl

@triton.jit
def _double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n if MASKED else offs >= 0
    tl.store(out_ptr + offs, 2 * tl.load(x_ptr + offs, mask=ok, other=0.0), mask=ok)

def double(x, masked=True):
    out = torch.empty_like(x)
    _double_kernel[(triton.cdiv(x.numel(), 16),)](x, out, x.numel(), BLOCK=16, MASKED=masked)
    return out

def interpreter_flag():
    return os.environ.get("TRITON_INTERPRET")

def same(value):
    return value

def cheat():
    import quantcourse.kernels.w4a16
"""


def test_learner_process_runs_triton_kernels_under_the_interpreter():
    """Lab 10: a kernel defined in a notebook cell runs in the learner process (TRITON_INTERPRET=1,
    its source found through linecache); an out-of-bounds access raises IndexError there instead
    of touching memory; dtypes travel; the reference kernels stay out of reach."""
    import torch

    from quantcourse.autograder.sandbox import Cell, Forbidden, LearnerError, Sandbox

    with Sandbox([Cell(1, TRITON_CELL)]) as box:
        assert box.call("interpreter_flag") == "1"
        x = torch.arange(40, dtype=torch.float32)
        assert torch.equal(box.call("double", x), 2 * x)
        with pytest.raises(LearnerError, match=r"out-of-bounds tl.load in _double_kernel \(cell 1, line 11\).*element 40 of x_ptr, which holds 40"):
            box.call("double", x, masked=False)
        assert torch.equal(box.call("double", x[:17]), 2 * x[:17]), "the process keeps working after the refusal"
        assert box.call("same", torch.float16) is torch.float16
        with pytest.raises(Forbidden, match="import quantcourse"):
            box.call("cheat")


def test_similarity_scores_graded_functions_except_those_the_lab_dictates():
    from quantcourse.autograder.engine import SIMILARITY_MIN_NODES, similarity_to_reference
    from quantcourse.reference_impl import affine

    source = inspect.getsource(affine.scale_zero_point)
    assert len(engine_ast(source)) >= SIMILARITY_MIN_NODES  # long enough to be scored
    graded = {"scale_zero_point": affine.scale_zero_point}
    assert similarity_to_reference({0: source}, graded) == {"scale_zero_point": 1.0}
    assert similarity_to_reference({0: source}, graded, frozenset({"scale_zero_point"})) == {}


def engine_ast(source):
    from quantcourse.autograder.engine import normalised_ast

    return normalised_ast(source)
