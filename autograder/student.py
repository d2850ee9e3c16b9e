"""The learner's copy of each lab, made by nbgrader's own `generate_assignment`.

`labs/NN_topic/NN_topic.ipynb` is the nbgrader source (solutions, hidden tests);
`labs/NN_topic/student/NN_topic.ipynb` is what learners open: solutions replaced by stubs, hidden
tests removed. The committed student copy must equal what nbgrader generates from the committed
source (`stale_labs` says which do not, and a test fails on it). Writing the copies never
overwrites a learner's work: a student copy with changes not in git is left alone and the fresh
version is written beside it.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABS = REPO / "labs"


def source_notebooks() -> dict[str, Path]:
    """Lab name -> nbgrader source notebook, for every labs/NN_topic/NN_topic.ipynb."""
    return {p.parent.name: p for p in sorted(LABS.glob("[0-9][0-9]_*/[0-9][0-9]_*.ipynb")) if p.stem == p.parent.name}


def student_path(lab: str) -> Path:
    return LABS / lab / "student" / f"{lab}.ipynb"


def nbgrader_env() -> dict:
    """nbgrader runs `alembic` as a program: the venv's bin folder must be on PATH."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def generate(source: Path) -> str:
    """The student version of a source notebook, as nbgrader generate_assignment writes it."""
    lab = source.parent.name
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "source" / lab).mkdir(parents=True)
        shutil.copy(source, Path(tmp) / "source" / lab / source.name)
        nbgrader = Path(sys.executable).parent / "nbgrader"
        result = subprocess.run(
            [str(nbgrader), "generate_assignment", lab, "--force", "--create", f"--CourseDirectory.root={tmp}"],
            capture_output=True, text=True, env=nbgrader_env(), cwd=tmp,
        )  # fmt: skip
        released = Path(tmp) / "release" / lab / source.name
        if result.returncode != 0 or not released.is_file():
            raise RuntimeError(f"nbgrader generate_assignment failed for {lab}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return released.read_text()


def committed_text(path: Path) -> str | None:
    """The file as committed in git (the learner's edits do not count), or as it is on disk."""
    try:
        relative = path.relative_to(REPO)
        result = subprocess.run(["git", "show", f"HEAD:{relative}"], cwd=REPO, capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout
    except (OSError, ValueError):
        pass
    return path.read_text() if path.is_file() else None


def stale_labs() -> list[str]:
    """Labs whose committed student copy differs from what nbgrader makes of the source."""
    return [lab for lab, source in source_notebooks().items() if committed_text(student_path(lab)) != generate(source)]


def write_student_copies() -> list[str]:
    """(Re)write each student copy; returns one line per lab saying what was done."""
    done = []
    for lab, source in source_notebooks().items():
        fresh, target = generate(source), student_path(lab)
        if target.is_file() and target.read_text() == fresh:
            done.append(f"{lab}: up to date")
            continue
        if target.is_file() and target.read_text() != committed_text(target):
            beside = target.with_name(f"{lab}.regenerated.ipynb")
            beside.write_text(fresh)
            done.append(f"{lab}: you have edited {target.relative_to(REPO)}; left it alone and wrote {beside.name} beside it")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(fresh)
        done.append(f"{lab}: wrote {target.relative_to(REPO)}")
    return done
