"""The `quantcourse` command: open the course, describe the setup, evaluate a recipe."""

import argparse
import importlib.metadata
import json
import os
import platform
import secrets
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def course_root() -> Path:
    """The checkout holding course/ and labs/ (the package is installed editable from it)."""
    if not (REPO_ROOT / "course").is_dir():
        raise SystemExit(
            f"quantcourse lab: no course/ folder next to the package ({REPO_ROOT}). Run it from a "
            "clone of the course repository installed with `make lab` (pip install -e .)."
        )
    return REPO_ROOT


def free_port(start: int = 8888) -> int:
    """The first port from `start` on which nothing listens on 127.0.0.1."""
    for port in range(start, start + 100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise SystemExit(f"quantcourse lab: ports {start}-{start + 99} are all in use; pass --port")


def lab_command(root: Path, port: int, token: str, open_browser: bool) -> list[str]:
    """The jupyter lab command line: loopback only, opened at course/, with a fixed token."""
    return [
        sys.executable, "-m", "jupyter", "lab",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.open_browser={open_browser}",
        "--LabApp.default_url=/lab/tree/course",
        # containers and CI run as root; Jupyter refuses that unless told
        f"--ServerApp.allow_root={os.geteuid() == 0}",
    ]  # fmt: skip


def cmd_lab(args) -> int:
    root = course_root()
    port = args.port or free_port()
    token = args.token or secrets.token_hex(16)
    print(f"quantcourse: JupyterLab at http://127.0.0.1:{port}/lab/tree/course?token={token}", flush=True)
    print("quantcourse: stop it with Ctrl-C.", flush=True)
    os.execv(sys.executable, lab_command(root, port, token, not args.no_browser))


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    import torch

    from .models import ModelNotFoundError, minilm_dir, reference_cache_path, smollm2_gguf_path
    from .runtime import cache_dir, fast_mode

    def found(locate):
        try:
            return str(locate())
        except ModelNotFoundError as error:
            return "MISSING: " + str(error).splitlines()[1].strip()

    cache = reference_cache_path()
    info = {
        "quantcourse": version_of("quantcourse"),
        "python": platform.python_version(),
        **{name: version_of(name) for name in ("torch", "triton", "transformers", "gguf", "jupyterlab", "nbgrader")},
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
        "smollm2_gguf": found(smollm2_gguf_path),
        "minilm": found(minilm_dir),
        "cache_dir": str(cache_dir()),
        "reference_cache": "built" if (cache / "manifest.json").is_file() else "not built yet (first load builds it, ~20 s)",
        "fast_mode": fast_mode(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def recipe_label(row: dict) -> str:
    """Short description of a results row's settings, e.g. 'int4 g64 asym' or 'act per token'."""
    parts = []
    if row.get("granularity"):
        where = {"tensor": "per-tensor", "channel": "per-channel"}.get(row["granularity"], f"g{row['group_size']}")
        grid = "sym" if row["symmetric"] else ("asym" if row["zero_point"] == "integer" else "asym-float-zero")
        parts += [f"int{row['bits']}", where, grid]
    if row.get("act_order"):
        parts.append("act-order" + (" static-groups" if row.get("static_groups") else ""))
    if row.get("act_granularity"):
        parts += ["W8A8", f"act per {row['act_granularity']}"]
    if row.get("threshold") is not None:
        parts += ["int8", f"threshold {row['threshold']:g}"]
    if row.get("double_quant") is not None:
        parts += [f"block {row['group_size']}", "double quant" if row["double_quant"] else "fp32 absmax"]
    return " ".join(parts)


def format_table(row: dict) -> str:
    """A readable two-line summary of one evaluation."""
    delta = 100 * (row["ppl"] / row["ref_ppl"] - 1)
    label = recipe_label(row)
    header = f"{'method':<10}{'settings':<{len(label) + 2}}{'ppl':>9}{'ref ppl':>9}{'Δppl':>9}{'KLD':>9}{'top-1':>8}{'bits/w':>8}{'tokens':>8}{'sec':>7}"
    line = (
        f"{row['method']:<10}{label:<{len(label) + 2}}{row['ppl']:>9.3f}{row['ref_ppl']:>9.3f}"
        f"{delta:>+8.2f}%{row['kld']:>9.5f}{row['top1_agreement']:>8.2%}{row['bits_per_weight']:>8.4f}"
        f"{row['eval_tokens']:>8}{row['seconds']:>7.1f}"
    )
    return header + "\n" + line


def cmd_eval(args, parser) -> int:
    from .recipes import RecipeError, RecipeOptions, evaluate_recipe

    options = RecipeOptions(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=args.symmetric,
        granularity=args.granularity,
        zero_point=args.zero_point,
        act_granularity=args.act_granularity,
        threshold=args.threshold,
        double_quant=args.double_quant,
        act_order=args.act_order,
        static_groups=args.static_groups,
        damp=args.damp,
        calibration_samples=args.calibration_samples,
    )
    try:
        row = evaluate_recipe(args.method, options, windows=args.windows, progress=not args.json and sys.stderr.isatty())
    except RecipeError as error:
        parser.error(str(error))
    print(json.dumps(row) if args.json else format_table(row))
    return 0


def cmd_check(args) -> int:
    from .autograder.engine import grade_notebook
    from .autograder.notebook import NotebookError
    from .autograder.render import as_text

    try:
        report = grade_notebook(args.notebook)
    except (NotebookError, ValueError) as error:
        print(f"quantcourse check: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json()) if args.json else as_text(report.to_json()))
    return 0


def cmd_labs(args) -> int:
    from .autograder import student

    if args.check:
        stale = student.stale_labs()
        for lab in stale:
            print(f"{lab}: the committed student copy is stale; run `quantcourse labs` and commit it", file=sys.stderr)
        return 1 if stale else 0
    for line in student.write_student_copies():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .recipes import DAMP, METHODS

    parser = argparse.ArgumentParser(prog="quantcourse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    lab = commands.add_parser("lab", help="start JupyterLab on 127.0.0.1, opened at course/")
    lab.add_argument("--port", type=int, help="port (default: the first free one from 8888)")
    lab.add_argument("--token", help="access token (default: a random one, printed)")
    lab.add_argument("--no-browser", action="store_true", help="do not open a browser")

    check = commands.add_parser("check", help="grade a lab notebook and explain what is wrong (never modifies it)")
    check.add_argument("notebook", help="path of a lab notebook, e.g. labs/01_affine/student/01_affine.ipynb")
    check.add_argument("--json", action="store_true", help="print one JSON object")

    labs = commands.add_parser("labs", help="write each lab's student copy with nbgrader (never over your edits)")
    labs.add_argument("--check", action="store_true", help="only report labs whose committed student copy is stale")

    classroom = commands.add_parser("classroom", help="nbgrader course: create it from the labs, grade collected submissions")
    steps = classroom.add_subparsers(dest="step", required=True)
    init = steps.add_parser("init", help="create an nbgrader course directory (nbgrader_config.py, source/, gradebook.db)")
    init.add_argument("directory", type=Path)
    init.add_argument("--labs", nargs="+", help="only these labs (default: every lab with a grading suite)")
    grade = steps.add_parser("grade", help="grade every collected submission into nbgrader's gradebook and write feedback")
    grade.add_argument("directory", type=Path)
    grade.add_argument("assignment", help="the assignment (lab) to grade, e.g. 01_affine")
    grade.add_argument("--workers", type=int, default=2, help="notebooks graded at once (default 2)")
    grade.add_argument("--student", action="append", dest="students", help="only this student (repeatable)")

    info = commands.add_parser("info", help="versions, models, GPU and cache location")
    info.add_argument("--json", action="store_true", help="print one JSON object")

    evaluate = commands.add_parser(
        "eval",
        help="quantize the reference model with a recipe and score it on held-out text",
        description="Quantize every decoder linear layer of SmolLM2-135M and report perplexity, "
        "KL divergence and top-1 agreement against the fp32 reference, and the storage cost.",
    )
    evaluate.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    evaluate.add_argument("--bits", type=int, help="bits per weight code, 2..8 (rtn, gptq: required; w8a8, llm_int8: 8)")
    evaluate.add_argument("--granularity", choices=["tensor", "channel", "group"], help="weight scales per tensor, per output channel (default) or per group")
    evaluate.add_argument("--group-size", type=int, help="weights per scale along the input dimension (implies --granularity group); nf4, fp4, int4_absmax: blocksize over the flattened weight, 32..4096, default 64")
    grid = evaluate.add_mutually_exclusive_group()
    grid.add_argument("--symmetric", dest="symmetric", action="store_true", default=True, help="signed grid, zero point 0 (default)")
    grid.add_argument("--asymmetric", dest="symmetric", action="store_false", help="unsigned grid with a zero point")
    evaluate.add_argument("--zero-point", choices=["integer", "float"], default="integer", help="asymmetric grids: integer zero point (GPTQ/AWQ, default) or float minimum (llama.cpp Q4_1)")
    evaluate.add_argument("--act-granularity", choices=["token", "tensor"], default="token", help="w8a8: activation scales per token (default) or per tensor")
    evaluate.add_argument("--threshold", type=float, default=6.0, help="llm_int8: input columns with any |x| >= this stay in float (default 6.0)")
    evaluate.add_argument("--double-quant", action="store_true", help="nf4, fp4: quantize the block absmax to 8 bits (QLoRA's double quantization, 4.127 bits per weight at block 64)")
    evaluate.add_argument("--act-order", action="store_true", help="gptq: quantize input columns by decreasing H_jj (desc_act)")
    evaluate.add_argument("--static-groups", action="store_true", help="gptq: every group's grid from the original weights, so act-order keeps g_idx sequential")
    evaluate.add_argument("--damp", type=float, default=DAMP, help=f"gptq: damping added to diag(H), as a fraction of its mean (default {DAMP})")
    evaluate.add_argument("--calibration-samples", type=int, help="gptq: calibration windows of 512 tokens (default 128; 8 in fast mode)")
    evaluate.add_argument("--windows", type=int, help="held-out windows of 512 tokens (default 32; 4 in fast mode)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.set_defaults(parser=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "lab":
        return cmd_lab(args)
    if args.command == "classroom":
        from .autograder.classroom import cmd_classroom

        return cmd_classroom(args)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "labs":
        return cmd_labs(args)
    return cmd_eval(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
