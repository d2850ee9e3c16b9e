"""`quantcourse eval --method smoothquant`: its settings in the results row and the table, and
clear refusals of arguments it cannot honour (and of its own flags for other methods)."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_eval_smoothquant_per_token_json():
    result = run_cli(
        "eval", "--method", "smoothquant", "--alpha", "0.85", "--calibration-samples", "2", "--json", "--windows", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    settings = {k: row[k] for k in ("method", "bits", "alpha", "act_granularity", "smooth_down", "calibration_samples")}
    assert settings == {
        "method": "smoothquant", "bits": 8, "alpha": 0.85, "act_granularity": "token", "smooth_down": False,
        "calibration_samples": 2,
    }  # fmt: skip
    assert row["eval_tokens"] == 511 and 0 < row["quantize_seconds"] < row["seconds"]
    assert 8 < row["bits_per_weight"] < 8 + 32 / 576 + 1e-9  # int8 codes and an fp32 scale per output row
    assert row["ref_ppl"] < row["ppl"] < 1.1 * row["ref_ppl"]


@pytest.mark.slow
def test_eval_smoothquant_static_with_down_table():
    result = run_cli(
        "eval", "--method", "smoothquant", "--alpha", "0.6", "--act-granularity", "tensor", "--smooth-down",
        "--calibration-samples", "2", "--windows", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.strip().splitlines()[-2:]
    assert header.split()[:3] == ["method", "settings", "ppl"]
    assert line.startswith("smoothquant  W8A8 act per tensor static alpha 0.6 smooth-down ")
    ppl, ref_ppl = map(float, line.split()[9:11])
    assert ref_ppl < ppl < 2 * ref_ppl


def test_recipe_label_of_smoothquant():
    from quantcourse.cli import recipe_label

    row = {"method": "smoothquant", "bits": 8, "alpha": 0.85, "act_granularity": "token", "smooth_down": False}
    assert recipe_label(row) == "W8A8 act per token alpha 0.85"
    assert recipe_label({**row, "act_granularity": "tensor", "smooth_down": True}) == "W8A8 act per tensor static alpha 0.85 smooth-down"
    assert recipe_label({"method": "w8a8", "bits": 8, "act_granularity": "tensor"}) == "W8A8 act per tensor"  # dynamic


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "smoothquant", "--alpha", "1.5"], "--alpha is the migration strength, from 0 to 1"),
        (["--method", "smoothquant", "--alpha", "-0.1"], "--alpha is the migration strength, from 0 to 1"),
        (["--method", "smoothquant", "--bits", "4"], "smoothquant uses 8-bit integers only"),
        (["--method", "smoothquant", "--group-size", "64"], "smoothquant scales weights per output channel"),
        (["--method", "smoothquant", "--calibration-samples", "0"], "--calibration-samples must be at least 1, got 0"),
        (["--method", "smoothquant", "--act-order"], "--act-order applies to gptq only, not smoothquant"),
        (["--method", "rtn", "--bits", "8", "--alpha", "0.5"], "--alpha applies to smoothquant only, not rtn"),
        (["--method", "w8a8", "--smooth-down"], "--smooth-down applies to smoothquant only, not w8a8"),
        (["--method", "smoothquant", "--act-granularity", "channel"], "invalid choice: 'channel'"),
    ],
)
def test_eval_smoothquant_refuses_bad_arguments(args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_smoothquant_refuses_more_calibration_windows_than_the_split_holds():
    result = run_cli("eval", "--method", "smoothquant", "--calibration-samples", "1000", "--windows", "1")
    assert result.returncode == 2
    assert "--calibration-samples 1000: the calibration split has" in result.stderr
    assert "Traceback" not in result.stderr
