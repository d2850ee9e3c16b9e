"""The grading process as a command: `python -m quantcourse.autograder.run NOTEBOOK [--keys K ...]`.

Notebooks call it through `grade()` and `report()` so that grading never happens inside the
learner's kernel, where learner code could patch the grader. It prints one JSON report.
"""

import argparse
import json
import sys

from .engine import grade_notebook
from .notebook import NotebookError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantcourse.autograder.run")
    parser.add_argument("notebook")
    parser.add_argument("--keys", nargs="*", help="only these case groups, e.g. 01.quantize")
    parser.add_argument("--hide-inputs", action="store_true", help="keep failing inputs out of the feedback")
    args = parser.parse_args(argv)
    try:
        report = grade_notebook(args.notebook, keys=set(args.keys) if args.keys else None, reveal_inputs=not args.hide_inputs)
    except (NotebookError, ValueError) as error:
        print(json.dumps({"error": str(error)}))
        return 2
    print(json.dumps(report.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
