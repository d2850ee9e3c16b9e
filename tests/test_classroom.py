"""The nbgrader classroom, run the way the README tells an instructor to, with the real nbgrader:
classroom init, generate_assignment, release, fetch, submit, collect, classroom grade, a manual
grade, generate_feedback, release_feedback, fetch_feedback, export."""

import csv
import html
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import nbformat
import pytest
from nbconvert.exporters import HTMLExporter
from nbgrader.api import Gradebook
from nbgrader.server_extensions.formgrader.handlers import template_path as formgrader_templates

from quantcourse.autograder import classroom, engine

LAB = "01_affine"
NBGRADER = Path(sys.executable).parent / "nbgrader"
IMPORTS_THE_REFERENCE = '### BEGIN SOLUTION\nreference = __import__("quantcourse.reference_impl.calibration")\n### END SOLUTION'
SKIPS_THE_INPUT_CHECKS = '''

def mse_range(x, spec, grid=100, max_shrink=0.8, norm=2.4):
    """Forgets to refuse integer tensors: converts them instead."""
    return _mse_range_checked(x.float(), spec, grid, max_shrink, norm)
'''


def nbgrader(*args: str, cwd: Path) -> str:
    """Run an nbgrader command as an instructor or student would (the venv's bin on PATH)."""
    env = {
        **os.environ,
        "PATH": f"{NBGRADER.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "JUPYTER_CONFIG_DIR": str(cwd / ".jupyter"),  # no personal nbgrader config
    }
    result = subprocess.run([str(NBGRADER), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def cell_with_id(nb, grade_id: str):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def partly_wrong(source: Path) -> nbformat.NotebookNode:
    """The solution, except that mse_range converts integer input instead of refusing it, plus a
    cell that tries to import the reference."""
    nb = nbformat.read(source, as_version=4)
    cell = cell_with_id(nb, "mse_range")
    cell.source = cell.source.replace("def mse_range(", "def _mse_range_checked(") + SKIPS_THE_INPUT_CHECKS
    nb.cells.insert(len(nb.cells) - 1, nbformat.v4.new_code_cell(IMPORTS_THE_REFERENCE))
    return nb


def test_init_never_overwrites_a_course(tmp_path, capsys):
    course = tmp_path / "course"
    assert classroom.cmd_classroom(Namespace(step="init", directory=course, labs=[LAB])) == 0
    assert f"nbgrader generate_assignment {LAB}" in capsys.readouterr().out
    config = (course / "nbgrader_config.py").read_text()
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", classroom.COURSE_ID) as gb:
        assert [a.name for a in gb.assignments] == [LAB]
    assert (course / "source" / LAB / f"{LAB}.ipynb").read_bytes() == (classroom.LABS / LAB / f"{LAB}.ipynb").read_bytes()
    assert classroom.cmd_classroom(Namespace(step="init", directory=course, labs=None)) == 2
    assert "nbgrader_config.py already exists" in capsys.readouterr().err
    assert (course / "nbgrader_config.py").read_text() == config
    with pytest.raises(classroom.ClassroomError, match="no gradable lab named 99_nothing.*01_affine"):
        classroom.init_course(tmp_path / "other", ["99_nothing"])
    assert not (tmp_path / "other").exists()
    with pytest.raises(classroom.ClassroomError, match=f"nbgrader generate_assignment {LAB}"):
        classroom.grade_submissions(course, LAB)


def test_summary_names_flags_and_failures():
    rows = [
        {"student": "alice", "score": 87.0, "max_score": 87.0, "manual_points": 13.0, "error": None, "warnings": [],
         "flags": ["near copy of the reference solution: function quantize similarity 0.97 — review, not penalised automatically"]},
        {"student": "dave", "score": None, "max_score": 87.0, "manual_points": 13.0, "error": "not a notebook", "warnings": [], "flags": []},
    ]  # fmt: skip
    text = classroom.summary_text(rows, LAB)
    assert "alice" in text and "87 / 87" in text and "similarity 0.97 — review, not penalised automatically" in text
    assert "dave" in text and "not graded" in text and "could not grade: not a notebook" in text
    assert "13 points per student" in text and f"nbgrader release_feedback {LAB}" in text


@pytest.mark.slow
def test_classroom_workflow_with_nbgrader(tmp_path):
    exchange, course = tmp_path / "exchange", tmp_path / "course"
    exchange.mkdir()
    on_exchange = [f"--Exchange.root={exchange}"]
    classroom.init_course(course, [LAB])
    nbgrader("generate_assignment", LAB, cwd=course)
    nbgrader("release_assignment", LAB, *on_exchange, cwd=course)

    source = nbformat.read(course / "source" / LAB / f"{LAB}.ipynb", as_version=4)
    alice = tmp_path / "alice"
    alice.mkdir()
    as_alice = [*on_exchange, f"--Exchange.cache={alice / '.cache'}", "--course", classroom.COURSE_ID, "--student", "alice"]
    nbgrader("fetch_assignment", LAB, *as_alice, cwd=alice)
    nbformat.write(source, alice / LAB / f"{LAB}.ipynb")  # alice hands in the solution
    nbgrader("submit", LAB, *as_alice, cwd=alice)
    nbgrader("collect", LAB, *on_exchange, cwd=course)
    collected = course / "submitted" / "alice" / LAB
    assert {"timestamp.txt", "submission_secret.txt", f"{LAB}.ipynb"} <= {p.name for p in collected.iterdir()}
    # bob (the stubs nbgrader generated) and carol (partly wrong) are laid out as collect leaves
    # them; two more fetch and submit rounds through the exchange would only cost time
    others = {"bob": nbformat.read(course / "release" / LAB / f"{LAB}.ipynb", as_version=4), "carol": partly_wrong(course / "source" / LAB / f"{LAB}.ipynb")}
    for student, nb in others.items():
        folder = course / "submitted" / student / LAB
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{LAB}.ipynb")
        (folder / "timestamp.txt").write_text("2030-01-01 09:00:00.000000 UTC")
        (folder / "submission_secret.txt").write_text(f"secret of {student}")
    broken = course / "submitted" / "dave" / LAB
    broken.mkdir(parents=True)
    (broken / f"{LAB}.ipynb").write_text('{"cells": [')  # a file cut short

    summaries = {s["student"]: s for s in classroom.grade_submissions(course, LAB, workers=2, progress=False)}

    points = {c.metadata.nbgrader["grade_id"]: float(c.metadata.nbgrader["points"]) for c in source.cells if c.metadata.get("nbgrader", {}).get("grade")}
    manual = {name for name in points if cell_with_id(source, name).cell_type == "markdown"}
    auto = {name: p for name, p in points.items() if name not in manual}
    failed = [t for t in summaries["carol"]["tests"] if t["status"] not in ("passed", "manual")]
    assert failed and all(t["key"] == "01.mse_range" and "instead of raising" in t["feedback"] for t in failed), failed
    lost = sum(t["max_points"] for t in failed)
    assert 0 < lost < auto["test_mse_range"], "carol earns part of mse_range's points"
    expected = {
        "alice": dict(auto),
        "bob": dict.fromkeys(auto, 0.0),
        "carol": {**auto, "test_mse_range": auto["test_mse_range"] - lost},
        "dave": dict.fromkeys(auto),  # not graded: left for the instructor
    }
    for student, scores in expected.items():
        assert summaries[student]["score"] == (None if student == "dave" else sum(scores.values())), student
    assert "not a readable Jupyter notebook" in summaries["dave"]["error"]
    assert all(summaries[s]["error"] is None for s in ("alice", "bob", "carol"))
    assert any("near copy of the reference solution" in f for f in summaries["alice"]["flags"])
    assert any(f.startswith("tried to import the reference") for f in summaries["carol"]["flags"])
    assert not summaries["bob"]["flags"]

    db = f"sqlite:///{course / 'gradebook.db'}"
    with Gradebook(db, classroom.COURSE_ID) as gb:
        for student, scores in expected.items():
            for name, score in scores.items():
                grade = gb.find_grade(name, LAB, LAB, student)
                assert grade.auto_score == score, (student, name)
                assert grade.needs_manual_grade == (score is None), (student, name)
            for name in manual:
                grade = gb.find_grade(name, LAB, LAB, student)
                assert grade.auto_score is None and grade.needs_manual_grade, (student, name)
        for name in manual:  # the instructor grades alice's answers in formgrader
            gb.find_grade(name, LAB, LAB, "alice").manual_score = points[name]
        gb.db.commit()

    formgrade = HTMLExporter(template_name="formgrade", extra_template_basedirs=[formgrader_templates])
    page, _ = formgrade.from_filename(str(course / "autograded" / "carol" / LAB / f"{LAB}.ipynb"), resources={"index": 0, "total": 4})
    assert "Autograder report" in page and all(name in page for name in manual), "formgrader shows the report and the answers"
    assert "BEGIN HIDDEN TESTS" not in page

    nbgrader("generate_feedback", LAB, "--force", cwd=course)
    nbgrader("release_feedback", LAB, *on_exchange, cwd=course)
    nbgrader("fetch_feedback", LAB, *as_alice, cwd=alice)
    (fetched,) = (alice / LAB / "feedback").glob(f"*/{LAB}.html")
    assert fetched.read_text() == (course / "feedback" / "alice" / LAB / f"{LAB}.html").read_text()

    nbgrader("export", cwd=course)
    with open(course / "grades.csv") as fh:
        exported = {row["student_id"]: row for row in csv.DictReader(fh)}
    total = sum(points.values())
    assert {s: float(r["score"]) for s, r in exported.items()} == {
        "alice": total, "bob": 0.0, "carol": sum(expected["carol"].values()), "dave": 0.0,
    }  # fmt: skip
    assert all(float(r["max_score"]) == total for r in exported.values())

    assert not (course / "feedback" / "dave").exists()
    suite = (engine.SUITES / f"test_{LAB}.py").read_text()
    handed_out = "\n".join(c.source for c in source.cells + others["bob"].cells)  # what students may show back
    suite_lines = {line.strip() for line in suite.splitlines() if len(line.strip()) > 30 and line.strip() not in handed_out}
    for student in ("alice", "bob", "carol"):
        page = (course / "feedback" / student / LAB / f"{LAB}.html").read_text()
        text = html.unescape(page)
        assert "Autograder report" in text and "case group" in text, student
        assert "BEGIN HIDDEN TESTS" not in text and "grade(" not in text, student
        assert "Inputs:" not in text, f"{student}: classroom feedback shows no failing inputs"
        leaked = [line for line in suite_lines if line in text]
        assert not leaked, f"{student}'s feedback shows the hidden suite: {leaked[:3]}"
    carol = html.unescape((course / "feedback" / "carol" / LAB / f"{LAB}.html").read_text())
    assert "instead of raising" in carol and "did not run: ImportError" in carol
    bob = html.unescape((course / "feedback" / "bob" / LAB / f"{LAB}.html").read_text())
    assert "Grading notes" not in bob, "the mark scheme of the written answers stays with the instructor"
    assert f"Score: {total:.1f} / {total:.1f}" in html.unescape(fetched.read_text())
