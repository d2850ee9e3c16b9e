"""The autograder: grades a learner's lab notebook against `quantcourse.reference_impl`.

In a lab notebook:

    from quantcourse.autograder import grade, report
    grade("01.quantize")   # one case group: prints feedback, returns the points earned
    report()               # the whole lab, as a table

Both grade the notebook *as saved on disk*, in a separate grading process that runs the
learner's code in its own sandboxed process (see engine.py); nothing is computed in the
notebook's kernel. From a terminal: `quantcourse check NOTEBOOK`.
"""

import datetime
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from .render import as_html, as_text

NOTEBOOK_ENV = "QUANTCOURSE_NOTEBOOK"


def current_notebook(key: str | None = None) -> Path:
    """The notebook file this kernel belongs to.

    Tried in order: $QUANTCOURSE_NOTEBOOK; the `__session__` path JupyterLab gives the kernel;
    $JPY_SESSION_NAME; a lab notebook NN_*.ipynb in the working directory (nbgrader and nbclient
    run notebooks from their own folder), NN taken from the key.
    """
    candidates = [os.environ.get(NOTEBOOK_ENV)]
    try:
        candidates.append(get_ipython().user_ns.get("__session__"))  # noqa: F821 (IPython builtin)
    except NameError:
        pass
    candidates.append(os.environ.get("JPY_SESSION_NAME"))
    for candidate in candidates:
        if candidate and candidate.endswith(".ipynb") and Path(candidate).is_file():
            return Path(candidate)
    pattern = f"{key.split('.')[0]}_*.ipynb" if key else "[0-9][0-9]_*.ipynb"
    found = sorted(glob.glob(pattern))
    if len(found) == 1:
        return Path(found[0])
    raise FileNotFoundError(
        "cannot tell which notebook to grade; set the environment variable "
        f"{NOTEBOOK_ENV} to its path, or run `quantcourse check PATH` in a terminal"
    )


def grade_in_subprocess(notebook: Path, keys: list[str] | None, hide_inputs: bool = False) -> dict:
    command = [sys.executable, "-m", "quantcourse.autograder.run", str(notebook)]
    if keys:
        command += ["--keys", *keys]
    if hide_inputs:
        command.append("--hide-inputs")
    result = subprocess.run(command, capture_output=True, text=True)
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"the grader failed to run:\n{result.stderr[-2000:]}") from None
    if "error" in report:
        raise ValueError(report["error"])
    return report


def saved_note(notebook: Path) -> str:
    saved = datetime.datetime.fromtimestamp(notebook.stat().st_mtime).strftime("%H:%M:%S")
    return f"(graded {notebook.name} as saved at {saved}; save with Ctrl+S first to grade your latest edits)"


def grade(key: str) -> float:
    """Grade one case group of the current notebook; print its feedback; return the points.

    The return value is what nbgrader records as the cell's partial credit.
    """
    notebook = current_notebook(key)
    # under `nbgrader autograde` the output becomes classroom feedback: no failing inputs in it
    report = grade_in_subprocess(notebook, [key], hide_inputs="NBGRADER_EXECUTION" in os.environ)
    print(as_text(report))
    print(saved_note(notebook))
    return float(report["score"])


def report(notebook: str | None = None) -> None:
    """Grade the whole lab and show the table (HTML in Jupyter, text elsewhere)."""
    path = Path(notebook) if notebook else current_notebook()
    result = grade_in_subprocess(path, None)
    try:
        from IPython.display import HTML, display

        display(HTML(as_html(result) + f"<p><small>{saved_note(path)}</small></p>"))
    except ImportError:
        print(as_text(result))
        print(saved_note(path))
