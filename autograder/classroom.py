"""nbgrader classroom: a course directory made from the labs, and the grading of what nbgrader collected.

    init_course("course")                          # nbgrader_config.py, source/<lab>/, gradebook.db
    grade_submissions("course", "01_affine", workers=4)

nbgrader's own `autograde` executes every submitted notebook in a kernel and records what its
test cells report, so learner code runs beside the tests and can patch them. Here each
submission is graded by `engine.grade_notebook` in a pool of grading processes (each of which
runs the learner's code in its own sandboxed child), and the points are written into nbgrader's
gradebook through nbgrader's API, where formgrader, `nbgrader generate_feedback` and
`nbgrader export` find them:

- an autograded test cell gets auto_score = the points of the engine's case groups whose key
  its hidden test names: `grade("01.quantize")` in cell `test_quantize`;
- manually graded answers are left to the instructor (formgrader);
- autograded/<student>/<assignment>/<notebook>.ipynb is the submission sanitised the way
  `nbgrader autograde` sanitises it (outputs cleared, locked cells restored) but not executed,
  with hidden tests removed and the grading report as its first cell: formgrader shows it for
  manual grading, and `nbgrader generate_feedback` renders it;
- feedback/<student>/<assignment>/<notebook>.html is that rendering, ready for
  `nbgrader release_feedback`. Failing inputs are never shown (classroom mode).
"""

import concurrent.futures
import contextlib
import glob
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat
import sqlalchemy
from nbgrader import preprocessors as nbgrader_steps
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.converters import GenerateFeedback
from nbgrader.coursedir import CourseDirectory
from tqdm import tqdm
from traitlets.config.loader import PyFileConfigLoader

from . import engine
from .notebook import NotebookError
from .render import as_html

COURSE_ID = "quantcourse"
LABS = Path(__file__).resolve().parents[1] / "labs"
CONFIG_FILE = "nbgrader_config.py"
GRADE_CALL = re.compile(r"""grade\(\s*["']([^"']+)["']""")
SUBMISSION_FILES = ("timestamp.txt", "submission_secret.txt")  # what release_feedback needs
QUIET = logging.getLogger("quantcourse.classroom.nbgrader")  # nbgrader's chatter, errors only
QUIET.setLevel(logging.ERROR)
REPORT_INTRO = (
    "<p><b>Autograder report.</b> Each case group below is a set of hidden cases for one function, worth its points when "
    "all of them pass. Inputs of failing cases are not shown. Written answers are scored by your instructor, on their cells.</p>"
)

CONFIG = '''"""nbgrader configuration of a quantcourse classroom (written by `quantcourse classroom init`)."""

import os

c = get_config()  # noqa: F821 (nbgrader defines it)
c.CourseDirectory.course_id = "{course_id}"
# The course is the folder holding this file, wherever it is moved or nbgrader is started.
c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
# Assignments and submissions travel through nbgrader's exchange, /srv/nbgrader/exchange by
# default; it must exist and be writable by instructor and students. To use another folder:
# c.Exchange.root = "/srv/nbgrader/exchange"
'''


class ClassroomError(Exception):
    """Something the instructor has to fix; the message says what and how."""


# -- init --------------------------------------------------------------------------------------


def course_labs() -> list[str]:
    """Labs a course can hold: a source notebook labs/<lab>/<lab>.ipynb and a grading suite."""
    return sorted(path.stem for path in LABS.glob("*/*.ipynb") if path.stem == path.parent.name and (engine.SUITES / f"test_{path.stem}.py").is_file())


@contextlib.contextmanager
def alembic_on_path():
    """nbgrader stamps a new gradebook with the schema version it asks the `alembic` command for;
    when the course's virtual environment is not activated, that command is next to python."""
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved])
    try:
        if shutil.which("alembic") is None:
            raise ClassroomError("nbgrader needs the `alembic` command to create a gradebook; install nbgrader with pip in this environment")
        yield
    finally:
        os.environ["PATH"] = saved


def init_course(directory: Path, labs: list[str] | None = None, course_id: str = COURSE_ID) -> Path:
    """Create an nbgrader course directory: config, source/<lab>/<lab>.ipynb, gradebook.db.

    `labs` defaults to every lab with a source notebook and a grading suite. Nothing that
    exists is ever overwritten: the call refuses, naming the file, before writing anything.
    """
    directory = Path(directory).resolve()
    available = course_labs()
    chosen = available if labs is None else list(labs)
    unknown = [lab for lab in chosen if lab not in available]
    if unknown or not chosen:
        problem = f"no gradable lab named {', '.join(unknown)}" if unknown else "no lab to put in the course"
        raise ClassroomError(f"{problem}; labs with a notebook and a grading suite: {', '.join(available) or 'none yet'}")
    targets = [directory / CONFIG_FILE, directory / "gradebook.db"] + [directory / "source" / lab for lab in chosen]
    for target in targets:
        if target.exists():
            raise ClassroomError(
                f"{target} already exists: `quantcourse classroom init` never overwrites a course's files. "
                f"Give a new directory, or move {target.name} out of the way if you mean to start over."
            )
    directory.mkdir(parents=True, exist_ok=True)
    gradebook = directory / "gradebook.db"
    try:
        with alembic_on_path(), Gradebook(f"sqlite:///{gradebook}", course_id) as gb:
            for lab in chosen:
                gb.update_or_create_assignment(lab)
    except BaseException:
        gradebook.unlink(missing_ok=True)  # ours, half made: a second try must not find it
        raise
    for lab in chosen:
        (directory / "source" / lab).mkdir(parents=True)
        shutil.copyfile(LABS / lab / f"{lab}.ipynb", directory / "source" / lab / f"{lab}.ipynb")
    (directory / CONFIG_FILE).write_text(CONFIG.format(course_id=course_id))
    return directory


# -- the course as nbgrader sees it ------------------------------------------------------------


@dataclass
class Course:
    """A course directory with its nbgrader configuration loaded, as nbgrader's commands load it."""

    root: Path
    config: object  # traitlets Config
    coursedir: CourseDirectory

    @classmethod
    def open(cls, directory: Path) -> "Course":
        root = Path(directory).resolve()
        if not (root / CONFIG_FILE).is_file():
            raise ClassroomError(f"{root} has no {CONFIG_FILE}: is it a course directory? Create one with `quantcourse classroom init {root}`")
        config = PyFileConfigLoader(CONFIG_FILE, path=str(root)).load_config()
        coursedir = CourseDirectory(config=config)
        if "root" not in config.CourseDirectory:
            coursedir.root = str(root)
        return cls(Path(coursedir.root), config, coursedir)

    def path(self, step: str, student: str, assignment: str) -> Path:
        """Where nbgrader keeps `step` (submitted, autograded, feedback...) of one student."""
        return Path(self.coursedir.format_path(getattr(self.coursedir, f"{step}_directory"), student, assignment))

    def gradebook(self) -> Gradebook:
        return Gradebook(self.coursedir.db_url, self.coursedir.course_id)

    def students(self, assignment: str) -> list[str]:
        """Students with a folder in submitted/ for this assignment (nbgrader collect's layout)."""
        submitted = self.coursedir.submitted_directory
        pattern = re.compile(self.coursedir.format_path(submitted, "(?P<student>[^/]+)", re.escape(assignment), escape=True) + "$")
        matches = (pattern.match(path) for path in glob.glob(self.coursedir.format_path(submitted, "*", assignment)))
        return sorted(m["student"] for m in matches if m and os.path.isdir(m.string))


@dataclass
class GradeCell:
    """An autograded test cell of the assignment, as registered by `nbgrader generate_assignment`."""

    name: str  # grade_id, e.g. test_quantize
    keys: list[str]  # engine keys its hidden tests grade, e.g. ["01.quantize"]
    max_score: float


@dataclass
class Layout:
    notebooks: dict[str, list[GradeCell]]  # notebook name -> its autograded cells
    manual: dict[str, dict[str, float]]  # notebook name -> manually graded cell -> points
    lab: dict[str, str | None]  # notebook name -> lab, from the source notebook


def assignment_layout(course: Course, gb: Gradebook, assignment: str) -> Layout:
    """The notebooks and graded cells of an assignment, from the gradebook (where generate_assignment
    registered them; the keys are read from the test cells' source it stored there)."""
    try:
        notebooks = gb.find_assignment(assignment).notebooks
    except MissingEntry:
        notebooks = []
    if not notebooks:
        raise ClassroomError(
            f"the gradebook has no notebooks for assignment {assignment!r}: run `nbgrader generate_assignment {assignment}` in {course.root} first"
        )
    layout = Layout({}, {}, {})
    for notebook in notebooks:
        answers = {cell.name for cell in notebook.solution_cells}
        layout.notebooks[notebook.name] = [
            GradeCell(cell.name, GRADE_CALL.findall(gb.find_source_cell(cell.name, notebook.name, assignment).source), float(cell.max_score))
            for cell in notebook.grade_cells
            if cell.name not in answers
        ]
        layout.manual[notebook.name] = {cell.name: float(cell.max_score) for cell in notebook.grade_cells if cell.name in answers}
        source = course.path("source", ".", assignment) / f"{notebook.name}.ipynb"
        layout.lab[notebook.name] = nbformat.read(source, as_version=4).metadata.get("quantcourse", {}).get("lab") if source.is_file() else None
    return layout


# -- grading -----------------------------------------------------------------------------------


BROKEN = "the grading process died while grading this notebook"


def outcome_of(future: concurrent.futures.Future):
    """A Report, or why there is none (BROKEN when the pool lost a process)."""
    try:
        return future.result()
    except concurrent.futures.process.BrokenProcessPool:
        return BROKEN
    except NotebookError as error:  # not a notebook: the message says what is wrong with the file
        return str(error)
    except Exception as error:  # the grader failed on this notebook; the others go on
        return f"{type(error).__name__}: {error}"


def run_pool(jobs: dict, workers: int):
    """Yield (job, outcome) as each grading finishes, `workers` at a time. Spawned processes:
    forking one that holds torch's thread pools can deadlock."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(engine.grade_notebook, path, reveal_inputs=False): job for job, path in jobs.items()}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], outcome_of(future)


def grade_in_pool(jobs: dict, workers: int, progress: bool):
    """Yield (job, Report or error message) for every job, in the order they finish.

    A grading process that dies breaks the whole pool: the jobs it took down are graded again
    one at a time, so only the notebook that kills its grader is reported as failed.
    """
    with tqdm(total=len(jobs), desc="grading", unit="notebook", disable=not progress) as bar:
        broken = []
        for job, outcome in run_pool(jobs, workers):
            if outcome == BROKEN:
                broken.append(job)
                continue
            bar.update()
            yield job, outcome
        for job in broken:
            for retried, outcome in run_pool({job: jobs[job]}, 1):
                bar.update()
                yield retried, outcome


def auto_scores(cells: list[GradeCell], report: engine.Report) -> tuple[dict[str, float | None], list[str]]:
    """auto_score of each autograded cell from the engine's case groups, and what did not add up."""
    scores, notes = {}, []
    for cell in cells:
        groups = [t for t in report.tests if t.key in cell.keys]
        earned, possible = sum(t.points for t in groups), sum(t.max_points for t in groups)
        if not groups:
            scores[cell.name] = None  # left to the instructor
            notes.append(f"cell {cell.name}: no case group of the suite has key {' or '.join(cell.keys) or '(no grade() call in the cell)'}; grade it by hand")
        elif possible != cell.max_score:
            scores[cell.name] = round(earned * cell.max_score / possible, 4)
            notes.append(f"cell {cell.name} is worth {cell.max_score:g} points but its case groups total {possible:g}; scaled")
        else:
            scores[cell.name] = earned
    used = {key for cell in cells for key in cell.keys}
    unused = sorted({t.key for t in report.tests if t.key != "manual" and t.key not in used})
    if unused:
        notes.append(f"case groups {', '.join(unused)} belong to no test cell of the notebook; not counted")
    return scores, notes


def record(gb: Gradebook, assignment: str, student: str, notebook: str, scores: dict[str, float | None], timestamp) -> None:
    """Write auto scores into the gradebook the way nbgrader's SaveAutoGrades does: a manual
    score the instructor gave stays, and asks for review again."""
    gb.update_or_create_student(student)
    with warnings.catch_warnings():  # nbgrader's add_submission trips SQLAlchemy 2's autoflush warnings; harmless
        warnings.simplefilter("ignore", sqlalchemy.exc.SAWarning)
        gb.update_or_create_submission(assignment, student, **({"timestamp": timestamp} if timestamp else {}))
    for name, score in scores.items():
        grade = gb.find_grade(name, notebook, assignment, student)
        grade.auto_score = score
        grade.needs_manual_grade = score is None or grade.manual_score is not None
    gb.db.commit()


def student_report(report: engine.Report, notebook: str) -> dict:
    """The report as the learner may see it: no manual rows, internal errors without details."""
    data = report.to_json()
    data["notebook"] = f"{notebook}.ipynb"
    data["tests"] = [t for t in data["tests"] if t["status"] != "manual"]
    for test in data["tests"]:
        if test["feedback"].startswith("internal grader error"):
            test["feedback"] = "internal grader error; your instructor has the details"
    return data


def write_autograded(course: Course, assignment: str, student: str, notebook: str, report_html: str) -> None:
    """autograded/<student>/<assignment>/<notebook>.ipynb: the submission sanitised as nbgrader
    autograde does (not executed), hidden tests and mark schemes removed, the report on top."""
    submitted, autograded = course.path("submitted", student, assignment), course.path("autograded", student, assignment)
    nb = nbformat.read(submitted / f"{notebook}.ipynb", as_version=4)
    resources = {"nbgrader": {"notebook": notebook, "assignment": assignment, "student": student, "db_url": course.coursedir.db_url}}
    steps = [
        nbgrader_steps.ClearOutput(), nbgrader_steps.DeduplicateIds(), nbgrader_steps.OverwriteKernelspec(),
        nbgrader_steps.OverwriteCells(), nbgrader_steps.ClearHiddenTests(enforce_metadata=False),
        nbgrader_steps.ClearMarkScheme(enforce_metadata=False), nbgrader_steps.AssignLatePenalties(config=course.config),
        nbgrader_steps.CheckCellMetadata(),
    ]  # fmt: skip
    for step in steps:
        step.log = QUIET
        nb, resources = step.preprocess(nb, resources)
    # one line: a blank line would end the HTML block in the markdown cell
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(report_html.replace("\n", "&#10;"), metadata={"quantcourse": {"report": True}}))
    autograded.mkdir(parents=True, exist_ok=True)
    for name in SUBMISSION_FILES:
        if (submitted / name).is_file():
            shutil.copyfile(submitted / name, autograded / name)
    nbformat.write(nb, autograded / f"{notebook}.ipynb")


def write_feedback(course: Course, assignment: str, student: str) -> None:
    """feedback/<student>/<assignment>/*.html, rendered by nbgrader's generate_feedback."""
    coursedir = CourseDirectory(config=course.config, root=str(course.root), assignment_id=assignment, student_id=student)
    converter = GenerateFeedback(coursedir=coursedir, config=course.config, log=QUIET)
    converter.force = True
    converter.start()


def write_feedback_page(course: Course, assignment: str, student: str, notebook: str, report_html: str) -> None:
    """When the notebook cannot go through nbgrader: the report alone, in the same place."""
    submitted, feedback = course.path("submitted", student, assignment), course.path("feedback", student, assignment)
    feedback.mkdir(parents=True, exist_ok=True)
    for name in SUBMISSION_FILES:
        if (submitted / name).is_file():
            shutil.copyfile(submitted / name, feedback / name)
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{notebook}</title></head><body>{report_html}</body></html>"
    (feedback / f"{notebook}.html").write_text(page)


def flags_of(report: engine.Report) -> list[str]:
    """What the instructor should look at; nothing here changes the score."""
    flags = [
        f"near copy of the reference solution: function {name} similarity {similarity:.2f} — review, not penalised automatically"
        for name, similarity in sorted(report.flagged().items())
    ]
    refusals = report.load.refusals
    if any(r.startswith("import") for r in refusals):
        flags.append("tried to import the reference (" + ", ".join(sorted({r for r in refusals if r.startswith("import")})) + ")")
    if any(r.startswith("open") for r in refusals):
        flags.append("tried to read the course's files (" + ", ".join(sorted({r for r in refusals if r.startswith("open")})[:3]) + ")")
    others = sorted({r for r in refusals if not r.startswith(("import", "open"))})
    if others:
        flags.append("attempted forbidden actions: " + ", ".join(others[:5]))
    return flags


def conclude(course: Course, gb: Gradebook, assignment: str, layout: Layout, job: tuple[str, str], outcome, summary: dict) -> None:
    """Record one grading in the gradebook and write its feedback; fill in its summary."""
    student, notebook = job
    cells = layout.notebooks[notebook]
    timestamp = course.coursedir.get_existing_timestamp(str(course.path("submitted", student, assignment)))
    expected = layout.lab[notebook]
    if not isinstance(outcome, str) and expected and outcome.lab != expected:
        outcome = f"its metadata says it is lab {outcome.lab}, but {assignment} is lab {expected}; fix the metadata and grade again"
    if isinstance(outcome, str):  # not graded: the scores of an older version must not stay either
        summary["error"] = outcome
        record(gb, assignment, student, notebook, dict.fromkeys((c.name for c in cells), None), timestamp)
        return
    scores, notes = auto_scores(cells, outcome)
    record(gb, assignment, student, notebook, scores, timestamp)
    summary.update(
        score=float(sum(s for s in scores.values() if s is not None)), flags=flags_of(outcome), similarity=outcome.flagged(),
        refusals=list(dict.fromkeys(outcome.load.refusals)), seconds=round(outcome.seconds, 2), tests=[asdict(t) for t in outcome.tests],
        warnings=notes + [f"{t.name}: {t.feedback}" for t in outcome.tests if t.feedback.startswith("internal grader error")],
    )  # fmt: skip
    report_html = REPORT_INTRO + as_html(student_report(outcome, notebook))
    try:
        write_autograded(course, assignment, student, notebook, report_html)
        write_feedback(course, assignment, student)
    except Exception as error:  # a notebook nbgrader cannot sanitise still gets its report
        summary["warnings"].append(f"nbgrader could not render this notebook ({type(error).__name__}: {error}); its feedback is the report alone")
        write_feedback_page(course, assignment, student, notebook, report_html)
    summary["feedback"] = str(course.path("feedback", student, assignment) / f"{notebook}.html")


def grade_submissions(directory: Path, assignment: str, workers: int = 2, progress: bool = True, students: list[str] | None = None) -> list[dict]:
    """Grade every collected submission of `assignment` (submitted/<student>/<assignment>/),
    record the scores in the gradebook and write the feedback; one summary per student and
    notebook, in student order. Scores are recorded as each grading finishes.

    Summary keys: student, notebook, score and max_score (the autograded part, as recorded),
    manual_points (left to the instructor), flags (for review, never penalised), similarity
    (flagged functions), refusals, warnings, error (None, or why it was not graded), feedback
    (path of the HTML, or None), seconds (grading time), tests (the engine's case groups, with
    key and full feedback: for the instructor's eyes).
    """
    if workers < 1:
        raise ClassroomError(f"workers must be at least 1, got {workers}")
    course = Course.open(directory)
    with course.gradebook() as gb:
        layout = assignment_layout(course, gb, assignment)
    found = course.students(assignment)
    if students is not None and set(students) - set(found):
        missing = ", ".join(sorted(set(students) - set(found)))
        raise ClassroomError(f"no submission of {assignment} from {missing} in {course.path('submitted', '*', assignment)}")
    chosen = found if students is None else sorted(students)
    if not chosen:
        raise ClassroomError(
            f"no submissions of {assignment} in {course.path('submitted', '*', assignment)}: run `nbgrader collect {assignment}` "
            "there, or copy each student's notebook into submitted/<student>/" + assignment
        )
    jobs = {(s, nb): course.path("submitted", s, assignment) / f"{nb}.ipynb" for s in chosen for nb in layout.notebooks}
    summaries = {
        (s, nb): {
            "student": s, "notebook": nb, "score": None, "max_score": sum(c.max_score for c in layout.notebooks[nb]),
            "manual_points": sum(layout.manual[nb].values()), "flags": [], "similarity": {}, "refusals": [],
            "warnings": [], "error": None, "feedback": None, "seconds": None, "tests": [],
        }
        for s, nb in jobs
    }  # fmt: skip
    with course.gradebook() as gb:
        for (student, notebook), path in jobs.items():
            if not path.is_file():  # zero, as nbgrader autograde gives for a missing notebook
                others = ", ".join(sorted(p.name for p in path.parent.glob("*.ipynb")))
                summaries[student, notebook].update(
                    score=0.0, error=f"no {path.name} in {path.parent}" + (f" (found {others}: rename it and grade again)" if others else "")
                )
                timestamp = course.coursedir.get_existing_timestamp(str(path.parent))
                record(gb, assignment, student, notebook, {c.name: 0.0 for c in layout.notebooks[notebook]}, timestamp)
        present = {job: path for job, path in jobs.items() if path.is_file()}
        for job, outcome in grade_in_pool(present, workers, progress):
            try:
                conclude(course, gb, assignment, layout, job, outcome, summaries[job])
            except Exception as error:  # recorded or not, the other submissions go on
                gb.db.rollback()
                summaries[job]["error"] = f"recording the grade failed ({type(error).__name__}: {error})"
    return list(summaries.values())


# -- the command -------------------------------------------------------------------------------


def summary_text(summaries: list[dict], assignment: str) -> str:
    """The instructor's table: one line per student, then what to look at."""
    width = max([7] + [len(s["student"]) for s in summaries])
    lines = [f"{'student':<{width}}  {'score':>13}  notes"]
    for s in summaries:
        score = f"{s['score']:g} / {s['max_score']:g}" if s["score"] is not None else "not graded"
        notes = ([f"could not grade: {s['error']}"] if s["error"] else []) + s["flags"]
        lines.append(f"{s['student']:<{width}}  {score:>13}  {notes[0] if notes else ''}")
        lines += [f"{'':<{width}}  {'':>13}  {note}" for note in notes[1:] + s["warnings"]]
    manual = max((s["manual_points"] for s in summaries), default=0)
    if manual:
        lines.append(f"\nManually graded questions ({manual:g} points per student) wait in formgrader.")
    lines.append(f"Scores are in the gradebook; feedback in feedback/<student>/{assignment}/ (release it with `nbgrader release_feedback {assignment}`).")
    return "\n".join(lines)


def cmd_classroom(args) -> int:
    """`quantcourse classroom init DIR [--labs LAB ...]` and
    `quantcourse classroom grade DIR ASSIGNMENT [--workers N] [--student ID ...]`; exit code 0 when
    every submission was graded, 1 when some could not be, 2 when nothing could be done."""
    try:
        if args.step == "init":
            root = init_course(args.directory, args.labs)
            labs = sorted(p.name for p in (root / "source").iterdir())
            print(f"created the course {root} with {', '.join(labs)}; next: cd {root} && nbgrader generate_assignment {labs[0]}")
            return 0
        started = time.perf_counter()
        summaries = grade_submissions(args.directory, args.assignment, args.workers, sys.stderr.isatty(), args.students)
    except ClassroomError as error:
        print(f"quantcourse classroom: {error}", file=sys.stderr)
        return 2
    print(f"graded {len(summaries)} submissions of {args.assignment} in {time.perf_counter() - started:.0f} s with {args.workers} workers\n")
    print(summary_text(summaries, args.assignment))
    return 1 if any(s["error"] for s in summaries) else 0
