"""`quantcourse eval --method awq / awq_gptq`: the JSON row, the table label, and clear errors."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_eval_awq_json_row():
    result = run_cli(
        "eval", "--method", "awq", "--bits", "4", "--group-size", "64", "--calibration-samples", "1", "--windows", "1", "--json",
        timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout)
    expected = {
        "method": "awq", "bits": 4, "group_size": 64, "symmetric": False, "granularity": "group", "zero_point": "integer",
        "duo_scaling": False, "clip": True, "calibration_samples": 1,
    }  # fmt: skip
    assert expected.items() <= row.items()
    assert row["bits_per_weight"] == pytest.approx(4 + 20 / 64)  # codes, fp16 scale and 4-bit zero per 64
    assert row["eval_tokens"] == 511 and row["quantize_seconds"] > 0
    assert row["ref_ppl"] < row["ppl"] < 1.3 * row["ref_ppl"]


@pytest.mark.slow
def test_eval_awq_gptq_table_shows_the_options():
    result = run_cli(
        "eval", "--method", "awq_gptq", "--bits", "3", "--group-size", "64", "--duo-scaling", "--no-clip",
        "--calibration-samples", "1", "--windows", "1", timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    header, line = result.stdout.strip().splitlines()[-2:]
    assert header.split()[:3] == ["method", "settings", "ppl"]
    assert line.split()[:6] == ["awq_gptq", "int3", "g64", "asym", "duo-scaling", "no-clip"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "awq", "--bits", "9"], "--bits must be an integer from 2 to 8, got 9"),
        (["--method", "awq"], "--bits must be an integer from 2 to 8, got None"),
        (["--method", "awq", "--bits", "4", "--asymmetric", "--zero-point", "float"], "awq stores integer zero points"),
        (["--method", "awq", "--bits", "4", "--granularity", "tensor"], "awq scales weights in groups (--group-size) or per output channel"),
        (["--method", "awq_gptq", "--bits", "4", "--calibration-samples", "0"], "--calibration-samples must be at least 1, got 0"),
        (["--method", "rtn", "--bits", "4", "--duo-scaling"], "--duo-scaling applies to awq and awq_gptq only, not rtn"),
        (["--method", "gptq", "--bits", "4", "--no-clip"], "--no-clip applies to awq and awq_gptq only, not gptq"),
        (["--method", "awq", "--bits", "4", "--act-order"], "--act-order applies to gptq only, not awq"),
        (["--method", "awq_gptq", "--bits", "4", "--damp", "0.1"], "--damp applies to gptq only, not awq_gptq"),
    ],
)
def test_eval_awq_bad_arguments_fail_with_a_clear_message(args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
