"""Each lab's student copy is nbgrader's own output for the committed source, and regenerating
the copies never overwrites a learner's work."""

import json

import pytest

from quantcourse.autograder import student
from quantcourse.autograder.notebook import GRADE_CALL


def test_every_lab_has_a_student_copy():
    labs = student.source_notebooks()
    assert labs, "no lab source notebooks found under labs/"
    for lab in labs:
        assert student.student_path(lab).is_file(), f"run `quantcourse labs` to create {lab}'s student copy"


@pytest.mark.slow
def test_committed_student_copies_are_in_sync_with_their_sources():
    assert student.stale_labs() == []


def test_student_copies_hold_no_solutions_or_hidden_tests():
    for lab in student.source_notebooks():
        text = student.student_path(lab).read_text()
        assert "### BEGIN SOLUTION" not in text and "### BEGIN HIDDEN TESTS" not in text
        cells = json.loads(text)["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        assert not any(GRADE_CALL.search(source) for source in code), "a hidden grade() call was left in"
        assert any("raise NotImplementedError()" in "".join(c["source"]) for c in cells)


def test_writing_copies_leaves_a_learners_edits_alone(tmp_path, monkeypatch):
    lab = "01_demo"
    (tmp_path / lab / "student").mkdir(parents=True)
    source = tmp_path / lab / f"{lab}.ipynb"
    source.write_text("{}")
    edited = tmp_path / lab / "student" / f"{lab}.ipynb"
    edited.write_text("the learner's work")
    monkeypatch.setattr(student, "LABS", tmp_path)
    monkeypatch.setattr(student, "REPO", tmp_path)
    monkeypatch.setattr(student, "generate", lambda src: "fresh stub")
    monkeypatch.setattr(student, "committed_text", lambda path: "stub as committed")
    lines = student.write_student_copies()
    assert edited.read_text() == "the learner's work"
    assert (tmp_path / lab / "student" / f"{lab}.regenerated.ipynb").read_text() == "fresh stub"
    assert "left it alone" in lines[0]
