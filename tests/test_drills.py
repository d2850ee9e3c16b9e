"""The interview drills (quantcourse/drills/): every generator's answer against an independent
computation, the concept bank's integrity, answer reading, the history's safety, the session
logic, the notebook panel driven by its buttons, and `quantcourse drill` driven through stdin."""

import json
import math
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import REPO
from quantcourse.reference_impl.qlora_analysis import SHAPES

from quantcourse.drills import concepts, generators, history
from quantcourse.drills.questions import (
    TOPICS,
    AnswerError,
    Question,
    parse_quantity,
    read_choice,
    read_number,
)
from quantcourse.drills.session import Drill

SEEDS = range(60)

# ---------------------------------------------------------------- independent arithmetic

ELEMENT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8_e4m3": 8, "int8": 8, "int4": 4, "uint4": 4, "nf4": 4, "uint3": 3, "uint2": 2}
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]  # fmt: skip  (ANCHORS §3, bitsandbytes' table)
GGUF_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
              "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}  # fmt: skip  (weights, bytes per block)
FORMAT_BITS = {  # the formats the kernel questions name, bits per weight worked out by hand
    "int4 with an fp16 scale and a 4-bit zero point per 128 weights (GPTQ/AWQ)": 4 + 20 / 128,
    "int4 with an fp16 scale per 64 weights": 4 + 16 / 64,
    "int4 with an fp16 scale per 32 weights (GGUF Q4_0)": 18 * 8 / 32,
    "NF4 with double quantization, blocks of 64 (QLoRA)": 4 + 8 / 64 + 32 / (64 * 256),
    "GGUF Q4_K": 144 * 8 / 256,
    "GGUF Q6_K": 210 * 8 / 256,
    "int8 with an fp16 scale per 32 weights (GGUF Q8_0)": 34 * 8 / 32,
    "int3 with an fp16 scale and a 3-bit zero point per 128 weights": 3 + 19 / 128,
    "fp16": 16,
}


def counts(shape) -> tuple[int, int]:
    """(linear weights, other parameters) of a Llama shape, from its config numbers."""
    d, f, q, kv = shape.hidden, shape.intermediate, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    linear = shape.layers * (d * q + 2 * d * kv + q * d + 3 * d * f)
    other = shape.vocab * d * (1 if shape.tied_embeddings else 2) + (2 * shape.layers + 1) * d
    return linear, other


def stored_bytes(n: int, fmt: str, group_size=None, scale_bits=16, zero_bits=0, double_quant_group_size=None,
                 double_quant_scale_bits=32) -> float:  # fmt: skip
    bits = n * ELEMENT_BITS[fmt]
    if group_size:
        groups = -(-n // group_size)
        bits += groups * (scale_bits + zero_bits)
        if double_quant_group_size:
            bits += -(-groups // double_quant_group_size) * double_quant_scale_bits
    return bits / 8


def kv_bytes(layers, kv_heads, head_dim, scheme, tokens) -> float:
    values = 2 * layers * kv_heads * head_dim * tokens
    return {"fp16": 2 * values, "fp32": 4 * values, "fp8_e4m3": values + 2 * layers * 4,
            "int8": values + 2 * layers * kv_heads * tokens * 4}[scheme]  # fmt: skip


def close(a, b, rel=1e-6):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


# ---------------------------------------------------------------- generators against it


def check_memory(q: Question) -> None:
    d = q.details
    shape = SHAPES[d["model"]]
    linear, other = counts(shape)
    if d["rest_bf16"]:
        weights = stored_bytes(linear, d["fmt"], **d["kwargs"]) + 2 * other
    else:
        weights = stored_bytes(linear + other, d["fmt"], **d["kwargs"])
    kv = kv_bytes(shape.layers, shape.kv_heads, shape.head_dim, d["kv_scheme"], d["context"] * d["batch"])
    assert close(q.answer, (weights + kv) / 1e9), (q.qid, d)
    assert f"{linear:,}" in q.prompt and f"{d['context']:,}" in q.prompt


def test_memory_answers():
    for seed in SEEDS:
        check_memory(generators.generate("memory", seed))


def test_the_independent_check_can_fail():
    """An answer off by 0.1% (less than forgetting the KV cache's scales) is caught."""
    q = generators.generate("memory", 1)
    with pytest.raises(AssertionError):
        check_memory(Question(q.qid, q.topic, q.prompt, q.answer * 1.001, q.explanation, q.pointer, unit=q.unit, details=q.details))


def test_qlora_memory_answers():
    for seed in SEEDS:
        q = generators.generate("qlora_memory", seed)
        d = q.details
        shape = SHAPES[d["model"]]
        linear, other = counts(shape)
        dims = {"q_proj": (shape.heads * shape.head_dim, shape.hidden), "k_proj": (shape.kv_heads * shape.head_dim, shape.hidden),
                "v_proj": (shape.kv_heads * shape.head_dim, shape.hidden), "o_proj": (shape.hidden, shape.heads * shape.head_dim),
                "gate_proj": (shape.intermediate, shape.hidden), "up_proj": (shape.intermediate, shape.hidden),
                "down_proj": (shape.hidden, shape.intermediate)}  # fmt: skip
        adapters = shape.layers * sum(d["r"] * (o + i) for o, i in (dims[t] for t in d["targets"]))
        frozen = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 2 * other
        steps = 4 * 2 * shape.layers * len(d["targets"])  # AdamW's fp32 step counter per adapter tensor
        assert math.isclose(q.answer, (frozen + 16 * adapters + steps) / 1e9, rel_tol=1e-6), (seed, d)
        assert f"{adapters:,}" in q.prompt


def test_scale_and_zero_point_answers():
    for seed in SEEDS:
        q = generators.generate("scale_zero_point", seed)
        d = q.details
        if d["symmetric"]:
            scale, zero = max(abs(d["xmin"]), abs(d["xmax"])) / (2 ** (d["bits"] - 1) - 1), 0
        else:
            lo, hi = min(d["xmin"], 0), max(d["xmax"], 0)
            scale = (hi - lo) / (2 ** d["bits"] - 1)
            zero = min(max(round(-lo / scale), 0), 2 ** d["bits"] - 1)  # Python rounds half to even, as torch
        expected = zero if d["ask"] == "zero" else scale
        assert math.isclose(q.answer, expected, rel_tol=1e-5), (seed, d)
        assert f"{d['xmin']:g}" in q.prompt and f"{d['xmax']:g}" in q.prompt


def test_code_and_dequantize_answers():
    for seed in SEEDS:
        q = generators.generate("quantize_code", seed)
        d = q.details
        lo, hi = (-(2 ** (d["bits"] - 1)), 2 ** (d["bits"] - 1) - 1) if d["symmetric"] else (0, 2 ** d["bits"] - 1)
        assert q.answer == min(max(round(d["x"] / d["scale"]) + d["zero"], lo), hi), (seed, d)
        q = generators.generate("dequantize_affine", seed)
        d = q.details
        assert math.isclose(q.answer, d["scale"] * (d["code"] - d["zero"]), rel_tol=1e-6, abs_tol=1e-9), (seed, d)
        assert d["code"] != d["zero"]


def test_nf4_and_gguf_dequantize_answers():
    for seed in SEEDS:
        q = generators.generate("dequantize_nf4", seed)
        d = q.details
        code = d["byte"] >> 4 if d["which"] == 0 else d["byte"] & 0xF  # bitsandbytes: first weight in the high nibble
        assert math.isclose(q.answer, NF4_TABLE[code] * d["absmax"], rel_tol=1e-6, abs_tol=1e-9), (seed, d)
        q = generators.generate("dequantize_gguf", seed)
        d = q.details
        j, codes = d["j"], d["codes"]
        if d["qtype"] == "Q8_0":
            expected = d["d"] * (codes[j] - 256 if codes[j] > 127 else codes[j])
        else:
            nibble = codes[j] & 0xF if j < 16 else codes[j - 16] >> 4  # GGUF: j low nibble of byte j, j+16 high
            expected = d["d"] * (nibble - 8) if d["qtype"] == "Q4_0" else d["d"] * nibble + d["m"]
        assert math.isclose(q.answer, expected, rel_tol=1e-5, abs_tol=1e-6), (seed, d)


def test_bits_per_weight_answers():
    for seed in SEEDS:
        d = (q := generators.generate("bits_group", seed)).details
        assert close(q.answer, d["bits"] + (16 + d["zero_bits"]) / d["group"])
        d = (q := generators.generate("bits_nf4", seed)).details
        b = d["blocksize"]
        assert close(q.answer, 4 + 8 / b + 32 / (b * 256) if d["double"] else 4 + 32 / b)
        d = (q := generators.generate("bits_gguf", seed)).details
        weights, nbytes = GGUF_BYTES[d["qtype"]]
        assert close(q.answer, 8 * nbytes / weights)
    for qtype, layout in generators.GGUF_LAYOUTS.items():  # the layout the prompt describes adds up to the block
        weights, nbytes = GGUF_BYTES[qtype]
        assert sum(n * b for n, b, _ in layout) == 8 * nbytes, qtype


def test_kernel_answers():
    assert set(generators.weight_formats()) | {"fp16"} == set(FORMAT_BITS)
    for seed in SEEDS:
        d = (q := generators.generate("speedup_ceiling", seed)).details
        assert close(q.answer, 16 / FORMAT_BITS[d["format"]])
        d = (q := generators.generate("gemv_time", seed)).details
        nbytes = d["N"] * d["K"] * FORMAT_BITS[d["format"]] / 8 + 2 * d["K"] + 2 * d["N"]
        assert close(q.answer, nbytes / d["bandwidth"] * 1e6)


def test_kv_answers():
    for seed in SEEDS:
        d = (q := generators.generate("kv_bytes_per_token", seed)).details
        expected = kv_bytes(d["layers"], d["kv_heads"], d["head_dim"], d["scheme"], d["context"]) / d["context"]
        assert close(q.answer, expected), (seed, d)


def results_rows(folder: Path) -> list[dict]:
    """The rows pair questions may use; awq.json's copies of gptq.json's rows count as gptq.json's."""
    rows = []
    for name, key in (("awq.json", "rows"), ("baselines.json", "rows"), ("nf4.json", "smollm2"), ("gptq.json", "rows")):
        if (folder / name).exists():
            rows += [{**row, "source": name} for row in json.loads((folder / name).read_text())[key]
                     if row.get("source", name) in (name, "computed")]  # fmt: skip
    return rows


def check_pair(q: Question, rows: list[dict]) -> None:
    def named(label: str, source: str) -> list[dict]:  # the rtn rows of gptq.json repeat baselines'
        return [row for row in rows if row["source"] == source and generators.label_of(row) == label]

    winner, loser = named(q.details["winner"], q.details["source"]), named(q.details["loser"], q.details["loser_source"])
    assert len(winner) == len(loser) == 1, "a label must name one row"
    assert winner[0]["kld"] < loser[0]["kld"] and winner[0]["ppl"] < loser[0]["ppl"]
    assert q.choices[q.answer].startswith(q.details["winner"] + ":")
    a, b = generators.recipe_settings(winner[0]), generators.recipe_settings(loser[0])
    assert [k for k in a if a[k] != b[k]] == [q.details["field"]]


def test_recipe_pairs_come_from_the_published_results():
    rows = results_rows(generators.RESULTS_DIR)
    fields = set()
    for seed in SEEDS:
        q = generators.generate("recipe_pair", seed)
        check_pair(q, rows)
        fields.add(q.details["field"])
    assert {"where", "grid", "bits", "act", "format", "block"} <= fields


def test_awq_rows_pair_with_rtn_and_copied_rows_keep_their_source():
    pairs = generators.recipe_pairs()
    assert any(w["method"] == "awq" and l["method"] == "rtn" and field == "algorithm" for w, l, field, _ in pairs)
    for row in (r for pair in pairs for r in pair[:2]):
        assert not (row["source"] == "awq.json" and row["method"] == "gptq"), "awq.json's GPTQ rows are gptq.json's"


def test_recipe_pairs_use_gptq_results_when_present(tmp_path):
    for name in ("baselines.json", "nf4.json", "gptq.json"):
        shutil.copy(generators.RESULTS_DIR / name, tmp_path / name)
    (tmp_path / "broken.json").write_text("{not json")
    pairs = generators.recipe_pairs(tmp_path)
    assert {"algorithm", "act_order"} <= {field for _, _, field, _ in pairs}
    rows = results_rows(tmp_path)
    for seed in SEEDS:
        check_pair(generators.recipe_pair_question(random.Random(seed), tmp_path), rows)


def test_fast_mode_results_are_never_used(tmp_path):
    published = json.loads((generators.RESULTS_DIR / "gptq.json").read_text())
    fast = {"meta": {**published["meta"], "fast_mode": True}, "rows": [{**r, "fast_mode": True} for r in published["rows"]]}
    (tmp_path / "gptq.fast.json").write_text(json.dumps(published))  # the name alone marks it
    (tmp_path / "renamed.json").write_text(json.dumps(fast))  # the flags mark it
    assert generators.recipe_pairs(tmp_path) == ()
    with pytest.raises(LookupError, match="no comparable recipe pairs"):
        generators.recipe_pair_question(random.Random(0), tmp_path)


def test_generation_is_deterministic_and_the_printed_answer_is_accepted():
    for name in generators.GENERATORS:
        for seed in range(5):
            q = generators.generate(name, seed)
            again = generators.generate(name, seed)
            assert (q.prompt, q.answer, q.choices) == (again.prompt, again.answer, again.choices)
            assert q.qid == f"gen:{name}:{seed}" and q.topic in TOPICS
            typed = q.expected_text().split(")")[0] if q.choices else q.expected_text()
            assert q.check(typed).correct, (name, seed, typed)


# ---------------------------------------------------------------- the concept bank

# Every interview question of the seed documents (/work/shared/seeds, the course's commissioning
# documents), and the concepts that answer it.
SEED_QUESTIONS = {
    "Why use NF4 instead of standard Float4 for QLoRA? (seed 001)": ["nf4-vs-fp4"],
    "How does AWQ differ from GPTQ? (seed 001)": ["awq-vs-gptq"],
    "GPTQ vs AWQ vs GGUF: when to use each? (seed 002)": ["gptq-awq-gguf", "awq-vs-gptq"],
    "How does quantization affect model quality? At what point does it degrade? (seed 002)": ["quality"],
    "What is QLoRA and how does NF4 quantization work? (seed 002)": ["qlora", "nf4-how"],
    "How would you decide the right quantization level for a production model? (seed 002)": ["production-level"],
    "PTQ vs QAT: trade-offs? (seed 002)": ["ptq-vs-qat"],
    "Data types to know: FP16, BF16, INT8, NF4 (seed 000, interview summary)": ["bf16-vs-fp16", "nf4-how", "int8-255-levels"],
    "KV-cache quantization and its memory (seeds 000, 001)": ["kv-2m-tokens", "kivi-axes"],
}
SEED_ANSWER_IDS = {cid for ids in SEED_QUESTIONS.values() for cid in ids}


def section_numbers(notebook: Path) -> set[int]:
    cells = nbformat.read(notebook, as_version=4).cells
    return {int(m.group(1)) for c in cells if c.cell_type == "markdown" for m in re.finditer(r"^## (\d+)\.", c.source, re.MULTILINE)}


def test_every_seed_question_is_covered_and_40_more():
    ids = [c.cid for c in concepts.CONCEPTS]
    assert len(ids) == len(set(ids)), "concept ids must be unique"
    missing = SEED_ANSWER_IDS - set(ids)
    assert not missing, f"seed questions without their concepts: {missing}"
    assert len(set(ids) - SEED_ANSWER_IDS) >= 40
    topics = {c.topic for c in concepts.CONCEPTS} | {g.topic for g in generators.GENERATORS.values()}
    assert topics == set(TOPICS), "every topic has questions"


def test_every_pointer_names_an_existing_lecture_section():
    pointers = {c.pointer for c in concepts.CONCEPTS} | {generators.generate(n, 0).pointer for n in generators.GENERATORS}
    pointers |= set(generators.POINTERS.values()) | {"course/02_outliers.ipynb §5"}
    for pointer in pointers:
        match = re.fullmatch(r"(course/\d\d_\w+\.ipynb) §(\d+)", pointer)
        assert match, f"pointer {pointer!r} must read 'course/NN_topic.ipynb §N'"
        notebook = REPO / match.group(1)
        assert notebook.is_file(), f"{pointer}: no such lecture"
        assert int(match.group(2)) in section_numbers(notebook), f"{pointer}: the lecture has no section {match.group(2)}"


def test_references_name_existing_files():
    references = {c.reference for c in concepts.CONCEPTS} | {generators.generate(n, 0).reference for n in generators.GENERATORS}
    for reference in filter(None, references):
        for part in reference.split(", "):
            path = REPO / part.split(" (")[0]
            assert path.exists(), f"reference {part!r} names no file"


def test_concepts_render_with_computed_numbers():
    known = concepts.facts()
    assert [c.cid for c in concepts.CONCEPTS if not c.available(known)] == []
    for c in concepts.CONCEPTS:
        assert c.choices or c.answer_fact, c.cid
        if c.choices:
            assert len(c.choices) >= 3 and len(set(c.choices)) == len(c.choices), c.cid
        q = c.question(random.Random(0))
        for text in (q.prompt, q.explanation, q.seed_note, *q.choices):
            assert "{" not in text.replace("{-1, 0, +1}", ""), (c.cid, text)
        if q.choices:  # the right choice survives the shuffle
            assert q.choices[q.answer] == c.choices[0].format_map(known)


def test_numeric_concepts_against_independent_values():
    expected = {
        "e4m3-max": 448, "gb-vs-gib": 140e9 / 2**30, "kv-per-token": 2 * 32 * 8 * 128 * 2,
        "kv-2m-tokens": 2 * 32 * 8 * 128 * 2 * 2e6 / 1e9, "nf4dq-bits": 4 + 8 / 64 + 32 / (64 * 256),
        "q8_0-bits": 8.5, "db-per-bit": 10 * math.log10(4), "llm-int8-threshold": 6.0,
        "dq-saving": 65e9 * (0.5 - 8 / 64 - 32 / (64 * 256)) / 8 / 1e9,
    }  # fmt: skip
    for cid, value in expected.items():
        q = concepts.CONCEPTS_BY_ID[cid].question(random.Random(0))
        assert math.isclose(q.answer, value, rel_tol=1e-9), cid
    full = concepts.CONCEPTS_BY_ID["full-ft-bytes"].question(random.Random(0))
    assert 16 <= full.answer < 16.001  # 16 bytes per parameter plus AdamW's step counters


def test_seed_corrections_are_stated_where_seeds_are_wrong():
    for cid in ("nf4-vs-fp4", "awq-vs-gptq", "gptq-awq-gguf", "quality", "qlora", "production-level", "ptq-vs-qat",
                "kv-2m-tokens", "scale-formula"):  # fmt: skip
        assert concepts.CONCEPTS_BY_ID[cid].seed_note, f"{cid}: a seed gets this wrong, the explanation must say so"


SEEDS_DIR = Path("/work/shared/seeds")


@pytest.mark.skipif(not SEEDS_DIR.is_dir(), reason="the seed documents are not on this machine")
def test_no_seed_sentence_is_copied():
    words = lambda text: re.findall(r"[a-z0-9]+", text.lower())
    seed_runs = set()
    for path in SEEDS_DIR.glob("*.txt"):
        w = words(path.read_text())
        seed_runs |= {" ".join(w[i : i + 8]) for i in range(len(w) - 7)}
    for c in concepts.CONCEPTS:
        text = words(" ".join([c.prompt, c.explanation, c.seed_note, *c.choices]))
        copied = {" ".join(text[i : i + 8]) for i in range(len(text) - 7)} & seed_runs
        assert not copied, f"{c.cid} repeats a seed's words: {copied}"


# ---------------------------------------------------------------- reading and checking answers


def test_numbers_units_and_arithmetic():
    assert parse_quantity("12.5 GB") == (12.5, "GB")
    assert parse_quantity("1,048,576 bytes/token") == (1048576.0, "bytes")
    assert parse_quantity("4.127 bits per weight") == (4.127, "bits")
    assert parse_quantity("1.2e10") == (1.2e10, "")
    assert parse_quantity("16/4.125")[0] == pytest.approx(3.8787878)
    assert parse_quantity("2*32*8*128*2 B") == (131072.0, "B")
    assert parse_quantity("3.9x") == (3.9, "x")
    assert parse_quantity("-0.25") == (-0.25, "")
    assert read_number("11.64 GiB", "GB") == pytest.approx(11.64 * 2**30 / 1e9)
    assert read_number("12500 MB", "GB") == pytest.approx(12.5)
    assert read_number("7.7 µs", "us") == pytest.approx(7.7)
    assert read_number("0.0077 ms", "us") == pytest.approx(7.7)
    assert read_number("128 KiB", "bytes") == 131072
    assert read_number("4 b", "bits") == 4 and read_number("4 B", "bytes") == 4


@pytest.mark.parametrize("raw, message", [
    ("", "empty"), ("hello", "no number"), ("12 parsecs", "unknown unit"), ("__import__('os')", "number"),
    ("2**1000000", "exponents"), ("1/0", "divides by zero"), ("3 s", "measures seconds"), ("1e400", "finite"),
])  # fmt: skip
def test_unreadable_answers_are_refused_with_a_reason(raw, message):
    with pytest.raises(AnswerError, match=message):
        read_number(raw, "GB")


def test_tolerance_and_choices():
    q = Question("t", "memory", "?", 10.0, "", "course/00_welcome.ipynb §3", unit="GB", rel_tol=0.01)
    assert q.check("10.09").correct and not q.check("10.11").correct
    assert "too high" in q.check("11").comment and "too low" in q.check("9 GB").comment
    exact = Question("z", "affine", "?", 13, "", "course/01_affine.ipynb §1", rel_tol=0.0)
    assert exact.check("13").correct and not exact.check("12.6").correct
    choices = ("one", "two", "three")
    assert read_choice("b", choices) == 1 and read_choice("B)", choices) == 1 and read_choice("3", choices) == 2
    assert read_choice("Two", choices) == 1
    with pytest.raises(AnswerError, match="letter from a to c"):
        read_choice("d", choices)
    with pytest.raises(ValueError, match="not an index"):
        Question("bad", "memory", "?", 5, "", "", choices=choices)
    with pytest.raises(ValueError, match="unknown topic"):
        Question("bad", "cooking", "?", 1.0, "", "")


# ---------------------------------------------------------------- the history file


def test_history_records_and_orders_misses(tmp_path):
    path = tmp_path / "h" / "history.json"
    history.record(path, [("a", "nf4", False), ("b", "gguf", True), ("c", "nf4", False)], {"asked": 3})
    history.record(path, [("c", "nf4", False), ("b", "gguf", False)], {"asked": 2})
    h = history.read(path)
    assert h.warning is None and len(h.data["sessions"]) == 2
    assert h.data["items"]["c"] == {**h.data["items"]["c"], "asked": 2, "missed": 2, "last_correct": False}
    assert h.missed_first() == ["c", "a", "b"]
    assert h.missed_first("nf4") == ["c", "a"]
    history.record(path, [("c", "nf4", True)], {"asked": 1})
    assert history.read(path).missed_first() == ["a", "b"]
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_history_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "history.json"
    history.record(path, [("a", "nf4", False)], {"asked": 1})
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk pulled out mid-write")

    monkeypatch.setattr(history.os, "replace", crash)
    with pytest.raises(OSError):
        history.record(path, [("b", "nf4", True)], {"asked": 1})
    assert path.read_text() == before, "a failed write must leave the old file whole"
    assert [p for p in tmp_path.iterdir() if p.suffix == ".tmp"] == [], "no temporary file may be left behind"


@pytest.mark.parametrize("content, reason", [
    ("{\"version\": 1, \"items\": {\"a\": ", "JSONDecodeError"),
    ("[1, 2, 3]", "version"),
    ("{\"version\": 0, \"items\": {}}", "version 1, found 0"),
    ("{\"version\": 1, \"items\": [], \"sessions\": []}", "wrong type"),
    ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "could not be read"),
])  # fmt: skip
def test_corrupt_history_is_set_aside_and_replaced(tmp_path, content, reason):
    path = tmp_path / "history.json"
    path.write_text(content, encoding="latin-1")
    h = history.read(path)
    assert h.data == history.empty() and reason in h.warning
    backups = list(tmp_path.glob("history.json.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_text(encoding="latin-1") == content
    written = history.record(path, [("a", "nf4", True)], {"asked": 1})
    assert written.warning is None and history.read(path).data["items"]["a"]["asked"] == 1


def test_malformed_entries_are_dropped_the_rest_kept(tmp_path):
    path = tmp_path / "history.json"
    good = {"topic": "nf4", "asked": 2, "missed": 1, "last": "2026-01-01T00:00:00+00:00", "last_correct": False}
    bad = {"topic": "nf4", "asked": 1, "missed": 5, "last": "x", "last_correct": False}
    path.write_text(json.dumps({"version": 1, "items": {"g": good, "b": bad, "n": "nope"}, "sessions": []}))
    h = history.read(path)
    assert set(h.data["items"]) == {"g"} and "2 malformed entries" in h.warning


def test_a_history_that_cannot_be_saved_costs_a_warning_not_the_drill(tmp_path):
    (tmp_path / "not_a_folder").write_text("a file where the history's folder should be")
    drill = Drill(count=1, seed=1, history_path=tmp_path / "not_a_folder" / "history.json")
    drill.answer("")
    summary = drill.finish()
    assert summary.asked == 1 and "could not be saved" in summary.history_warning


# ---------------------------------------------------------------- a drill session


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_drill_choice_is_repeatable_varied_and_on_topic(tmp_path):
    a = Drill(count=12, seed=7, use_history=False)
    b = Drill(count=12, seed=7, use_history=False)
    assert [q.qid for q in a.questions] == [q.qid for q in b.questions]
    assert len({q.qid for q in a.questions}) == 12
    assert any(q.qid.startswith("gen:") for q in a.questions) and any(q.qid.startswith("concept:") for q in a.questions)
    for topic in ("nf4", "recipes", "smoothquant"):
        drill = Drill(topic=topic, count=5, seed=1, use_history=False)
        assert {q.topic for q in drill.questions} == {topic}
    with pytest.raises(ValueError, match="unknown topic"):
        Drill(topic="cooking")
    with pytest.raises(ValueError, match="count"):
        Drill(count=0)


def test_missed_questions_come_back_first(tmp_path):
    path = tmp_path / "history.json"
    first = Drill(count=4, seed=3, history_path=path)
    missed = []
    for i in range(4):
        q = first.current
        if i % 2:
            first.answer("")  # skipped: a miss
            missed.append(q)
        else:
            first.answer(q.expected_text().split(")")[0] if q.choices else q.expected_text())
    summary = first.finish()
    assert (summary.correct, summary.asked, len(summary.misses)) == (2, 4, 2)
    second = Drill(count=4, seed=99, history_path=path)
    assert {q.qid for q in second.questions[:2]} == {q.qid for q in missed}
    right = lambda q: q.choices[q.answer] if q.choices else q.answer
    again = {q.qid: (q.prompt, right(q)) for q in second.questions[:2]}
    assert again == {q.qid: (q.prompt, right(q)) for q in missed}, "a missed question comes back as it was asked"


def test_unreadable_answer_keeps_the_question_and_skip_is_a_miss():
    drill = Drill(topic="affine", count=2, seed=2, use_history=False)
    q = drill.current
    with pytest.raises(AnswerError):
        drill.answer("not a number" if not q.choices else "z")
    assert drill.current is q and drill.outcomes == []
    assert drill.answer("  ") is None and drill.outcomes[0].correct is False


def test_timed_drill_ends_and_late_answers_are_not_scored():
    clock = FakeClock()
    drill = Drill(count=5, seed=4, timed_minutes=1, use_history=False, clock=clock)
    q = drill.current
    clock.t += 30
    drill.answer(q.expected_text().split(")")[0] if q.choices else q.expected_text())
    assert drill.time_left() == pytest.approx(30)
    clock.t += 31
    assert drill.answer("1") is None
    summary = drill.summary
    assert summary.ended == "time" and summary.correct == 1 and summary.asked == 2 and summary.not_reached == 3


# ---------------------------------------------------------------- the notebook panel, by its buttons


def test_panel_runs_a_drill_through_its_buttons(tmp_path):
    from quantcourse.drills.panel import DrillPanel

    path = tmp_path / "history.json"
    panel = DrillPanel(count=3, seed=5, history_path=path)
    for i in range(3):
        q = panel.question
        if q.choices:
            panel.check_button.click()  # nothing chosen yet: a reminder, no score
            assert "Type an answer" in panel.feedback.value and not panel.drill.outcomes[i:]
            panel.choice_answer.value = q.answer if i != 1 else (q.answer + 1) % len(q.choices)
        else:
            panel.text_answer.value = "seven"
            panel.check_button.click()
            assert "no number" in panel.feedback.value
            right = q.expected_text() if i != 1 else str(q.answer * 2 + 1) + (f" {q.unit}" if q.unit else "")
            panel.text_answer.value = right
        panel.check_button.click()
        assert ("✓" in panel.feedback.value) == (i != 1)
        assert q.pointer in panel.feedback.value
        panel.next_button.click()
    assert "2 of 3 right" in panel.feedback.value and "Review of misses" in panel.feedback.value
    assert history.read(path).data["sessions"][-1]["correct"] == 2
    panel.new_button.click()
    assert panel.question is not None and panel.question.qid == panel.drill.questions[0].qid


# ---------------------------------------------------------------- the terminal, through stdin


def drill_process(tmp_path, *args):
    env = {**os.environ, "QUANTCOURSE_CACHE": str(tmp_path), "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}
    return subprocess.Popen([sys.executable, "-m", "quantcourse", "drill", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO / "tests")  # fmt: skip


class Output:
    """What a drill process has printed so far, read as it comes."""

    def __init__(self, process):
        self.process, self.text, self.seen = process, "", 0

    def until(self, marker: str, timeout: float = 180) -> str:
        """Wait for `marker` after everything matched so far; returns the text up to it."""
        deadline = time.monotonic() + timeout
        while (found := self.text.find(marker, self.seen)) < 0:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {marker!r} within {timeout} s; got {self.text[-2000:]}")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"the drill ended before printing {marker!r}: {self.text[-2000:]}")
            self.text += chunk.decode(errors="replace")
        self.seen = found + len(marker)
        return self.text[: self.seen]


def valid_history(tmp_path) -> dict:
    h = history.read(tmp_path / "drills" / "history.json")
    assert h.warning is None
    return h.data


def test_terminal_drill_with_garbage_skips_and_end_of_input(tmp_path):
    typed = "what?\n42 parsecs\n\na\n\n1\n12 GB\n"  # garbage, a bad unit, skips, a letter, numbers
    process = drill_process(tmp_path, "--count", "3", "--seed", "11")
    out, err = process.communicate(typed.encode(), timeout=300)
    out, err = out.decode(), err.decode()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "try again" in out and "skipped" in out and "summary" in out
    data = valid_history(tmp_path)
    assert data["sessions"][-1]["seed"] == 11 and data["sessions"][-1]["asked"] >= 2


def test_terminal_ctrl_c_gives_a_summary_and_a_valid_history(tmp_path):
    process = drill_process(tmp_path, "--count", "5", "--seed", "3")
    output = Output(process)
    output.until("answer>")
    process.stdin.write(b"\n")  # skip the first question
    process.stdin.flush()
    output.until("question 2 of 5")
    output.until("answer>")
    process.send_signal(signal.SIGINT)
    output.until("summary")  # before closing stdin: the end of input must not be what stops it
    out, err = process.communicate(timeout=120)
    out = output.text + out.decode()
    assert process.returncode == 130, err.decode()
    assert "Traceback" not in err.decode()
    assert "stopped" in out and "summary" in out and "0 of 1 right" in out
    assert valid_history(tmp_path)["sessions"][-1]["ended"] == "interrupted"


def test_terminal_mock_interview_stops_when_time_is_up(tmp_path):
    process = drill_process(tmp_path, "--count", "5", "--seed", "8", "--timed", "0.05")
    output = Output(process)
    assert "mock interview" in output.until("question 1 of 5")
    output.until("summary", timeout=120)  # no answer, stdin left open: the alarm must end the drill on its own
    out, err = process.communicate(timeout=120)
    out = output.text + out.decode()
    assert process.returncode == 0, err.decode()
    assert "time is up" in out and "0 of 1 right" in out and "4 not reached" in out
    assert valid_history(tmp_path)["sessions"][-1]["ended"] == "time"


def test_cli_refuses_bad_options():
    command = [sys.executable, "-m", "quantcourse", "drill", "--count", "zero", "--timed", "-1"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO / "tests", check=False)
    assert result.returncode == 2 and "not a whole number" in result.stderr
