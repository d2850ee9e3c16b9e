"""How long `quantcourse classroom grade` takes for a class: 20 submissions of lab 01 (correct,
stubs as nbgrader generates them, partly wrong) in a fresh nbgrader course, graded with 2 workers.

Usage:  python benchmarks/classroom_grading.py [--students 20] [--workers 2]
Writes benchmarks/results/classroom_grading.json. The time covers everything `classroom grade`
does: grading, the gradebook, and the feedback of every student. Target: under 10 minutes.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from quantcourse.autograder import classroom

LAB = "01_affine"
RESULTS = Path(__file__).resolve().parent / "results"
# Partly wrong versions: the solution's function renamed and wrapped with a plausible mistake.
MISTAKES = {
    "mse_range": """

def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    return _mse_range_original(x.float(), spec, grid, max_shrink, norm)  # integer input accepted
""",
    "quant_range": """

def quant_range(bits, signed):
    lo, hi = _quant_range_original(bits, signed)
    return (lo, hi) if signed else (lo, hi - 1)  # off by one on unsigned grids
""",
}


def partly_wrong(source: Path, function: str) -> nbformat.NotebookNode:
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == function)
    cell.source = cell.source.replace(f"def {function}(", f"def _{function}_original(") + MISTAKES[function]
    return nb


def build_course(root: Path, students: int) -> dict[str, str]:
    """A course with `students` collected submissions of lab 01; student -> kind of submission."""
    classroom.init_course(root, [LAB])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(Path(sys.executable).parent / "nbgrader"), "generate_assignment", LAB], cwd=root, env=env, check=True, capture_output=True)
    source, stub = root / "source" / LAB / f"{LAB}.ipynb", root / "release" / LAB / f"{LAB}.ipynb"
    versions = {
        "correct": nbformat.read(source, as_version=4),
        "stub": nbformat.read(stub, as_version=4),
        "no input checks in mse_range": partly_wrong(source, "mse_range"),
        "off-by-one quant_range": partly_wrong(source, "quant_range"),
    }
    kinds = {}
    for i in range(students):
        kind = list(versions)[i % len(versions)]
        student = f"student{i + 1:02d}"
        folder = root / "submitted" / student / LAB
        folder.mkdir(parents=True)
        nbformat.write(versions[kind], folder / f"{LAB}.ipynb")
        (folder / "timestamp.txt").write_text("2030-01-01 09:00:00.000000 UTC")
        (folder / "submission_secret.txt").write_text(f"secret of {student}")
        kinds[student] = kind
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        course = Path(tmp) / "course"
        kinds = build_course(course, args.students)
        load_before = os.getloadavg()
        started = time.perf_counter()
        summaries = classroom.grade_submissions(course, LAB, workers=args.workers, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()
    by_kind = {}
    for s in summaries:
        by_kind.setdefault(kinds[s["student"]], set()).add(f"{s['score']:g} / {s['max_score']:g}")
    result = {
        "meta": {
            "cpu": next(
                (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
                platform.processor(),
            ),
            "cores": os.cpu_count(),
            "load_average_1min_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "lab": LAB,
        "students": args.students,
        "workers": args.workers,
        "seconds": round(seconds, 1),
        "target_seconds": 600,
        "seconds_per_notebook_in_its_grader": sorted(round(s["seconds"], 1) for s in summaries if s["seconds"] is not None),
        "scores_by_kind": {kind: sorted(scores) for kind, scores in by_kind.items()},
        "errors": [s["error"] for s in summaries if s["error"]],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "classroom_grading.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"graded {args.students} submissions of {LAB} with {args.workers} workers in {seconds:.0f} s (target 600 s)")
    print(json.dumps(result["scores_by_kind"], indent=1))


if __name__ == "__main__":
    main()
