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
    if row.get("alpha") is not None:  # smoothquant: per-tensor activation scales are static (calibrated)
        parts += (["static"] if row["act_granularity"] == "tensor" else []) + [f"alpha {row['alpha']:g}"]
        parts += ["smooth-down"] if row.get("smooth_down") else []
    parts += ["duo-scaling"] if row.get("duo_scaling") else []  # awq, awq_gptq
    parts += ["no-clip"] if row.get("clip") is False else []
    if row.get("threshold") is not None:
        parts += ["int8", f"threshold {row['threshold']:g}"]
    if row.get("double_quant") is not None:
        parts += [f"block {row['group_size']}", "double quant" if row["double_quant"] else "fp32 absmax"]
    return " ".join(parts)


def format_table(row: dict) -> str:
    """A readable two-line summary of one evaluation."""
    delta = 100 * (row["ppl"] / row["ref_ppl"] - 1)
    label = recipe_label(row)
    width = max(10, len(row["method"]) + 2)
    header = f"{'method':<{width}}{'settings':<{len(label) + 2}}{'ppl':>9}{'ref ppl':>9}{'Δppl':>9}{'KLD':>9}{'top-1':>8}{'bits/w':>8}{'tokens':>8}{'sec':>7}"
    line = (
        f"{row['method']:<{width}}{label:<{len(label) + 2}}{row['ppl']:>9.3f}{row['ref_ppl']:>9.3f}"
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
        alpha=args.alpha,
        smooth_down=args.smooth_down,
        duo_scaling=args.duo_scaling,
        clip=args.clip,
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


def add_kv_parser(commands) -> None:
    """`quantcourse kv memory` (the calculator) and `quantcourse kv eval` (a scheme on SmolLM2), lesson 08."""
    from .reference_impl.kvcache import KNOWN_CONFIGS, SCHEMES

    kv = commands.add_parser("kv", help="KV-cache quantization: memory of a model's cache, or a scheme's quality on SmolLM2")
    actions = kv.add_subparsers(dest="kv_command", required=True)
    memory = actions.add_parser("memory", help="bytes of the KV cache in every scheme, constants and KIVI's window included")
    memory.add_argument("--model", choices=list(KNOWN_CONFIGS), default="smollm2-135m", help="published config (default smollm2-135m)")
    memory.add_argument("--context", type=int, default=4096, help="tokens per sequence (default 4096)")
    memory.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    memory.add_argument("--float-bytes", type=int, default=2, choices=[2, 4], help="bytes of KIVI's full-precision window: 2 (fp16/bf16 model, default) or 4")
    memory.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    evaluate = actions.add_parser("eval", help="perplexity, KLD and top-1 of SmolLM2 with its KV cache in one scheme, against the fp32 cache")
    evaluate.add_argument("--scheme", required=True, choices=list(SCHEMES))
    evaluate.add_argument("--windows", type=int, default=1, help="held-out windows (default 1)")
    evaluate.add_argument("--context", type=int, default=2048, help="tokens per window (default 2048)")
    evaluate.add_argument("--chunk-size", type=int, default=32, help="tokens fed to the cache per forward pass (default 32)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_kv(args) -> int:
    from .reference_impl import kvcache

    if args.kv_command == "memory":
        config = kvcache.KNOWN_CONFIGS[args.model]
        rows = []
        for name, scheme in kvcache.SCHEMES.items():
            m = kvcache.kv_cache_memory(config, scheme, args.context, args.batch, args.float_bytes)
            rows.append({"model": config.name, "scheme": name, "bits": scheme.bits, "context": args.context, "batch": args.batch,
                         "bytes": m.total, "bytes_per_token": m.total / (args.context * args.batch), "codes": m.codes,
                         "constants": m.constants, "full_precision": m.full_precision})  # fmt: skip
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{config.name}: {config.layers} layers x {config.kv_heads} KV heads x head_dim {config.head_dim}, "
              f"context {args.context}, batch {args.batch}")  # fmt: skip
        print(f"{'scheme':<10}{'bits':>5}{'bytes/token':>13}{'GiB':>10}{'constants':>11}{'full prec.':>12}")
        for r in rows:
            print(f"{r['scheme']:<10}{r['bits']:>5}{r['bytes_per_token']:>13.1f}{r['bytes'] / 2**30:>10.3f}"
                  f"{r['constants'] / r['bytes']:>10.1%}{r['full_precision'] / r['bytes']:>11.1%}")  # fmt: skip
        return 0
    from .corpus import token_windows
    from .models import load_reference_model

    scheme = kvcache.SCHEMES[args.scheme]
    model, tokenizer = load_reference_model()
    windows = token_windows(tokenizer, "heldout", args.context, args.windows)
    scales = {}
    if scheme.kind == "fp8":
        amax = kvcache.calibrate_kv_amax(model, token_windows(tokenizer, "calibration", 512, 1))
        scales[args.scheme] = kvcache.fp8_scale(amax, scheme.dtype)
    result = kvcache.score_schemes(model, windows, ["fp32", args.scheme], args.chunk_size, scales)
    row = {"scheme": args.scheme, **result[args.scheme], "ref_ppl": result["fp32"]["ppl"], "context": args.context}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.scheme}: ppl {row['ppl']:.3f} (fp32 cache {row['ref_ppl']:.3f}, {100 * (row['ppl'] / row['ref_ppl'] - 1):+.2f}%), "
              f"KLD {row['kld']:.5f}, top-1 {row['top1_agreement']:.2%}, {row['bytes_per_token']:.0f} bytes/token, "
              f"{row['tokens']} positions at context {args.context}")  # fmt: skip
    return 0


def add_gguf_parser(commands) -> None:
    """`quantcourse gguf inspect FILE` and `quantcourse gguf quantize IN OUT --type T` (lesson 09)."""
    from .reference_impl.gguf_file import FTYPES

    gguf = commands.add_parser("gguf", help="list a GGUF file's tensors, or requantize it as llama-quantize does")
    actions = gguf.add_subparsers(dest="gguf_command", required=True)
    inspect = actions.add_parser("inspect", help="tensor table: name, type, shape, bytes, bits per weight")
    inspect.add_argument("file", type=Path, help="a .gguf file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    quantize = actions.add_parser(
        "quantize",
        help="requantize a GGUF file to a llama.cpp file type",
        description="Decode every 2-D weight and encode it again with llama.cpp's rules for the file type "
        "(reference_impl/gguf_file.py lists the subset implemented). Tensors whose type does not change are copied.",
    )
    quantize.add_argument("input", type=Path, help="the GGUF file to read")
    quantize.add_argument("output", type=Path, help="the GGUF file to write (refused if it exists, unless --force)")
    quantize.add_argument("--type", required=True, type=str.upper, choices=list(FTYPES), help="llama.cpp file type, e.g. Q4_K_M")
    quantize.add_argument("--pure", action="store_true", help="every quantizable tensor in the base type (llama-quantize --pure)")
    quantize.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE", help="tensors whose name matches REGEX get TYPE, e.g. ffn_down=Q6_K (repeatable)")
    quantize.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    quantize.set_defaults(gguf_parser=quantize)


def gguf_table(file) -> tuple[list[dict], dict]:
    """One row per tensor of a read GGUF file, and the file's totals."""
    from .reference_impl.gguf_file import bits_per_weight, type_counts

    rows = [
        {"name": t.name, "type": t.qtype, "shape": list(t.shape), "bytes": t.nbytes, "bits_per_weight": t.bits_per_weight}
        for t in file.tensors.values()
    ]
    totals = {
        "file": str(file.path),
        "file_bytes": file.path.stat().st_size,
        "version": file.version,
        "tensors": len(rows),
        "metadata_keys": len(file.metadata),
        "weights": sum(t.n_elements for t in file.tensors.values()),
        "tensor_bytes": sum(r["bytes"] for r in rows),
        "bits_per_weight": bits_per_weight(file),
        "linear_bits_per_weight": bits_per_weight(file, linear_only=True),
        "types": type_counts(file),
    }
    return rows, totals


def format_gguf_table(rows: list[dict], totals: dict) -> str:
    width = max(len("name"), *(len(r["name"]) for r in rows))
    lines = [f"{'name':<{width}}  {'type':<5}  {'shape':>14}  {'bytes':>10}  {'bits/w':>7}"]
    for r in rows:
        shape = " x ".join(map(str, r["shape"]))
        lines.append(f"{r['name']:<{width}}  {r['type']:<5}  {shape:>14}  {r['bytes']:>10}  {r['bits_per_weight']:>7.4f}")
    types = ", ".join(f"{n} {t}" for t, n in totals["types"].items())
    lines += [
        "",
        f"{totals['file']}: GGUF v{totals['version']}, {totals['tensors']} tensors ({types}), {totals['metadata_keys']} metadata keys",
        f"{totals['weights']:,} weights in {totals['tensor_bytes']:,} bytes: {totals['bits_per_weight']:.4f} bits per weight, "
        f"{totals['linear_bits_per_weight']:.4f} over the linear layers; file {totals['file_bytes']:,} bytes",
        "shape: rows x row length (numpy order; GGUF stores the dims reversed); blocks run along each row",
    ]
    return "\n".join(lines)


def parse_tensor_types(items: list[str], parser) -> list[tuple[str, str]]:
    """--tensor-type REGEX=TYPE arguments as (regex, TYPE) pairs, checked."""
    import re

    from .reference_impl.gguf import BLOCK_TYPES

    pairs = []
    for item in items:
        pattern, _, qtype = item.rpartition("=")
        if not pattern or qtype.upper() not in BLOCK_TYPES:
            parser.error(f"--tensor-type wants REGEX=TYPE with TYPE one of {', '.join(BLOCK_TYPES)}; got {item!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            parser.error(f"--tensor-type {item!r}: the regex does not compile ({error})")
        pairs.append((pattern, qtype.upper()))
    return pairs


def cmd_gguf(args) -> int:
    import time

    from .reference_impl.gguf_file import GGUFError, read_gguf, requantize_file

    try:
        if args.gguf_command == "inspect":
            rows, totals = gguf_table(read_gguf(args.file))
            print(json.dumps({"tensors": rows, "totals": totals}) if args.json else format_gguf_table(rows, totals))
            return 0
        overrides = parse_tensor_types(args.tensor_type, args.gguf_parser)
        if not args.input.is_file():
            raise FileNotFoundError(f"no such GGUF file: {args.input}")
        if args.output.exists() and not args.force:
            raise FileExistsError(f"{args.output} exists; pass --force to overwrite it, or choose another name")
        started = time.perf_counter()
        written = requantize_file(args.input, args.output, args.type, pure=args.pure, overrides=overrides)
    except (GGUFError, FileNotFoundError, FileExistsError) as error:
        print(f"quantcourse gguf: {error}", file=sys.stderr)
        return 2
    _, totals = gguf_table(written)
    types = ", ".join(f"{n} {t}" for t, n in totals["types"].items())
    print(
        f"wrote {args.output} ({args.type}{', pure' if args.pure else ''}) in {time.perf_counter() - started:.1f} s: "
        f"{totals['file_bytes']:,} bytes, {totals['bits_per_weight']:.4f} bits per weight "
        f"({totals['linear_bits_per_weight']:.4f} over the linear layers); tensors: {types}"
    )
    return 0


def positive(kind):
    """An argparse type: a number of `kind` (int or float) above 0, refused with a usable message."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value

    return parse


def add_drill_parser(commands) -> None:
    """`quantcourse drill`: interview drills in the terminal (quantcourse/drills/)."""
    from .drills.questions import TOPICS

    drill = commands.add_parser(
        "drill",
        help="interview drills: numeric questions and concepts, scored, with a review of misses",
        description="Randomized numeric questions whose answers the course's code computes, and concept questions "
        "with explanations and lecture pointers. Missed questions come back first next time (history in the "
        "course's cache folder). Topics: " + "; ".join(f"{t}: {what}" for t, what in TOPICS.items()),
    )
    drill.add_argument("--topic", choices=list(TOPICS), help="only this topic (default: all)")
    drill.add_argument("--count", type=positive(int), default=10, help="questions (default 10)")
    drill.add_argument("--timed", type=positive(float), metavar="MINUTES", help="mock interview: the whole drill within MINUTES")
    drill.add_argument("--seed", type=int, help="repeat a drill: the seed it printed")


def cmd_drill(args) -> int:
    from .drills.terminal import run

    return run(args.topic, args.count, args.timed, args.seed)


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
    evaluate.add_argument("--act-granularity", choices=["token", "tensor"], default="token", help="w8a8, smoothquant: activation scales per token (default) or per tensor (smoothquant: static, the calibrated max)")
    evaluate.add_argument("--threshold", type=float, default=6.0, help="llm_int8: input columns with any |x| >= this stay in float (default 6.0)")
    evaluate.add_argument("--double-quant", action="store_true", help="nf4, fp4: quantize the block absmax to 8 bits (QLoRA's double quantization, 4.127 bits per weight at block 64)")
    evaluate.add_argument("--act-order", action="store_true", help="gptq: quantize input columns by decreasing H_jj (desc_act)")
    evaluate.add_argument("--static-groups", action="store_true", help="gptq: every group's grid from the original weights, so act-order keeps g_idx sequential")
    evaluate.add_argument("--damp", type=float, default=DAMP, help=f"gptq: damping added to diag(H), as a fraction of its mean (default {DAMP})")
    evaluate.add_argument("--calibration-samples", type=int, help="gptq, smoothquant, awq, awq_gptq: calibration windows of 512 tokens (default 128, awq 32; 8 in fast mode)")
    evaluate.add_argument("--alpha", type=float, help="smoothquant: migration strength from 0 to 1, s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (default 0.85)")
    evaluate.add_argument("--smooth-down", action="store_true", help="smoothquant: also smooth down_proj's inputs, folding 1/s into up_proj's rows")
    evaluate.add_argument("--duo-scaling", action="store_true", help="awq, awq_gptq: AutoAWQ's scales s = x_mean^r / w_mean^(1-r) instead of x_mean^r (the grid is always asymmetric)")
    evaluate.add_argument("--no-clip", dest="clip", action="store_false", help="awq, awq_gptq: skip the clipping search (keep each group's min-max range)")
    evaluate.add_argument("--windows", type=int, help="held-out windows of 512 tokens (default 32; 4 in fast mode)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.set_defaults(parser=evaluate)
    add_gguf_parser(commands)
    add_kv_parser(commands)
    add_drill_parser(commands)
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
    if args.command == "gguf":
        return cmd_gguf(args)
    if args.command == "kv":
        return cmd_kv(args)
    if args.command == "drill":
        return cmd_drill(args)
    return cmd_eval(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
