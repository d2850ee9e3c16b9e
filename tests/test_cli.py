"""The `quantcourse` command: eval's JSON contract, clear errors, info, and lab's server."""

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, run_cli

EVAL_KEYS = {"method", "bits", "group_size", "ppl", "ref_ppl", "kld", "top1_agreement",
             "bits_per_weight", "eval_tokens", "seconds"}  # fmt: skip


def test_eval_json_contract():
    result = run_cli("eval", "--method", "rtn", "--bits", "8", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert EVAL_KEYS <= row.keys()
    assert (row["method"], row["bits"], row["group_size"], row["symmetric"]) == ("rtn", 8, None, True)
    assert row["fast_mode"] is True and row["eval_tokens"] == 4 * 511
    assert abs(row["ppl"] / row["ref_ppl"] - 1) < 0.01  # int8 per channel costs < 1% perplexity
    assert 0 < row["kld"] < 0.02 and row["top1_agreement"] > 0.9
    assert 8 < row["bits_per_weight"] < 8.1


def test_eval_group_asymmetric_table():
    result = run_cli("eval", "--method", "rtn", "--bits", "4", "--group-size", "64", "--asymmetric")
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.strip().splitlines()[-2:]
    assert header.split()[:3] == ["method", "settings", "ppl"]
    assert line.split()[:4] == ["rtn", "int4", "g64", "asym"]
    assert float(line.split()[-3]) == pytest.approx(4 + 20 / 64)  # bits per weight column


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--method", "rtn", "--bits", "8", "--granularity", "tensor"], {"granularity": "tensor", "bits": 8}),
        (["--method", "w8a8", "--act-granularity", "tensor"], {"act_granularity": "tensor", "bits": 8}),
        (["--method", "llm_int8", "--threshold", "6"], {"threshold": 6.0, "bits": 8}),
    ],
)
def test_eval_other_methods_report_their_settings(args, expected):
    result = run_cli("eval", *args, "--json", "--windows", "1")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert expected.items() <= row.items()
    assert EVAL_KEYS <= row.keys() and row["eval_tokens"] == 511
    assert row["ref_ppl"] < row["ppl"] < 3 * row["ref_ppl"]  # per-tensor W8A8 loses most, ~+80%


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "magic", "--bits", "4"], "unknown method 'magic'; choose one of: rtn"),
        (["--method", "rtn", "--bits", "9"], "--bits must be an integer from 2 to 8, got 9"),
        (["--method", "rtn", "--bits", "1"], "--bits must be an integer from 2 to 8, got 1"),
        (["--method", "rtn", "--bits", "4", "--group-size", "100"], "--group-size 100 does not divide the input width 576"),
        (["--method", "rtn", "--bits", "4", "--group-size", "0"], "--group-size must be positive"),
        (["--method", "rtn", "--bits", "four"], "invalid int value: 'four'"),
        (["--method", "rtn"], "--bits must be an integer from 2 to 8, got None"),
        (["--method", "rtn", "--bits", "4", "--granularity", "group"], "--granularity group needs --group-size"),
        (["--method", "w8a8", "--bits", "4"], "w8a8 uses 8-bit integers only"),
        (["--method", "llm_int8", "--threshold", "-1"], "--threshold must be positive, got -1.0"),
        (["--method", "w8a8", "--group-size", "64"], "w8a8 scales weights per output channel"),
    ],
)
def test_eval_bad_arguments_fail_with_a_clear_message(args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_info_reports_models_and_cache(tmp_path):
    result = run_cli("info", "--json", QUANTCOURSE_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["smollm2_gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info["cache_dir"] == str(tmp_path)
    assert info["gpu"] == "none (CPU only)" or info["gpu"]
    assert info["torch"] != "not installed"


def test_lab_serves_the_course_on_loopback():
    token = secrets.token_hex(8)
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen(
        [sys.executable, "-m", "quantcourse", "lab", "--no-browser", "--port", str(port), "--token", token],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO / "tests",
    )  # fmt: skip
    try:
        first_line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/lab/tree/course?token={token}" in first_line
        listing = None
        for _ in range(120):
            try:
                url = f"http://127.0.0.1:{port}/api/contents/course?token={token}"
                listing = json.load(urllib.request.urlopen(url, timeout=2))
                break
            except OSError:
                time.sleep(0.5)
        assert listing is not None, "JupyterLab did not answer within 60 s"
        assert listing["type"] == "directory"
        assert "README.md" in {item["name"] for item in listing["content"]}
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/lab/tree/course?token={token}", timeout=5)
        assert page.status == 200 and b"JupyterLab" in page.read()
        kernels = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}"))
        assert "quantcourse" in kernels["kernelspecs"]  # registered by `make setup`
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_eval_nf4_with_double_quant():
    result = run_cli("eval", "--method", "nf4", "--group-size", "64", "--double-quant", "--json", "--windows", "1")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert EVAL_KEYS <= row.keys()
    assert (row["method"], row["bits"], row["group_size"], row["double_quant"]) == ("nf4", 4, 64, True)
    assert 4.127 < row["bits_per_weight"] < 4.128  # 4 + 8/64 + 32/(64*256), plus an fp32 offset per layer
    assert row["ref_ppl"] < row["ppl"] < 2 * row["ref_ppl"]


def test_recipe_label_of_4bit_block_methods():
    from quantcourse.cli import recipe_label

    assert recipe_label({"method": "nf4", "bits": 4, "group_size": 128, "double_quant": False}) == "block 128 fp32 absmax"
    assert recipe_label({"method": "fp4", "bits": 4, "group_size": 64, "double_quant": True}) == "block 64 double quant"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "nf4", "--group-size", "100"], "--group-size for nf4 is bitsandbytes' blocksize: one of 32, 64, 128"),
        (["--method", "fp4", "--bits", "8"], "fp4 stores 4-bit codes"),
        (["--method", "nf4", "--asymmetric"], "nf4 scales each block of --group-size weights by its absmax"),
        (["--method", "int4_absmax", "--double-quant"], "--double-quant applies to nf4 and fp4"),
        (["--method", "rtn", "--bits", "4", "--double-quant"], "--double-quant applies to nf4 and fp4 only, not rtn"),
    ],
)
def test_eval_4bit_block_methods_refuse_bad_arguments(args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_gptq_with_act_order():
    result = run_cli(
        "eval", "--method", "gptq", "--bits", "4", "--group-size", "64", "--asymmetric", "--act-order",
        "--calibration-samples", "2", "--json", "--windows", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert EVAL_KEYS <= row.keys()
    settings = {k: row[k] for k in ("method", "bits", "group_size", "symmetric", "act_order", "static_groups", "damp", "calibration_samples")}
    assert settings == {
        "method": "gptq", "bits": 4, "group_size": 64, "symmetric": False, "act_order": True,
        "static_groups": False, "damp": 0.01, "calibration_samples": 2,
    }  # fmt: skip
    # codes, an fp16 scale and a 4-bit zero per 64 weights, and act-order's int32 g_idx per input
    assert 4 + 20 / 64 < row["bits_per_weight"] < 4 + 20 / 64 + 32 / 192
    assert 0 < row["quantize_seconds"] < row["seconds"]
    assert row["ref_ppl"] < row["ppl"] < 1.5 * row["ref_ppl"]


def test_recipe_label_of_gptq():
    from quantcourse.cli import recipe_label

    row = {"method": "gptq", "bits": 3, "group_size": 64, "granularity": "group", "symmetric": False, "zero_point": "integer"}
    assert recipe_label(row) == "int3 g64 asym"
    assert recipe_label({**row, "act_order": True}) == "int3 g64 asym act-order"
    assert recipe_label({**row, "act_order": True, "static_groups": True}) == "int3 g64 asym act-order static-groups"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "gptq"], "--bits must be an integer from 2 to 8, got None"),
        (["--method", "gptq", "--bits", "4", "--damp", "1.5"], "--damp is a fraction of mean(diag H), from 0 to 1"),
        (["--method", "gptq", "--bits", "4", "--calibration-samples", "0"], "--calibration-samples must be at least 1, got 0"),
        (["--method", "gptq", "--bits", "4", "--static-groups"], "--static-groups fixes each group's grid up front: it needs --group-size"),
        (["--method", "gptq", "--bits", "4", "--asymmetric", "--zero-point", "float"], "gptq stores integer zero points"),
        (["--method", "gptq", "--bits", "4", "--group-size", "100"], "--group-size 100 does not divide the input width 576"),
        (["--method", "rtn", "--bits", "4", "--act-order"], "--act-order applies to gptq only, not rtn"),
        (["--method", "nf4", "--damp", "0.1"], "--damp applies to gptq only, not nf4"),
        (["--method", "rtn", "--bits", "4", "--calibration-samples", "8"], "--calibration-samples applies to gptq, smoothquant, awq and awq_gptq only, not rtn"),
        (["--method", "gptq", "--bits", "4", "--calibration-samples", "1000", "--windows", "1"], "--calibration-samples 1000: the calibration split has"),
    ],
)
def test_eval_gptq_refuses_bad_arguments(args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
