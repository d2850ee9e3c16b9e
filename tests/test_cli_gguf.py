"""`quantcourse gguf inspect` and `quantcourse gguf quantize`: tables, JSON, recipes, clear errors."""

import json

import numpy as np
import pytest

from conftest import run_cli
from quantcourse.reference_impl import gguf_file as F


@pytest.fixture(scope="module")
def shipped_path():
    from quantcourse.models import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture
def tiny(tmp_path):
    """A two-layer llama-style GGUF with float32 weights: 256-wide rows, so K-quants fit."""
    rng = np.random.default_rng(0)
    metadata = {
        "general.architecture": F.MetadataValue(F.ValueType.STRING, "llama"),
        "llama.block_count": F.MetadataValue(F.ValueType.UINT32, 2),
        "general.file_type": F.MetadataValue(F.ValueType.UINT32, 0),
    }
    shapes = {"token_embd.weight": (64, 256), "output_norm.weight": (256,)}
    for layer in range(2):
        shapes |= {f"blk.{layer}.attn_norm.weight": (256,), f"blk.{layer}.attn_v.weight": (64, 256),
                   f"blk.{layer}.ffn_up.weight": (512, 256), f"blk.{layer}.ffn_down.weight": (256, 512)}  # fmt: skip
    tensors = [F.TensorData(n, "F32", s, rng.standard_normal(s).astype(np.float32).view(np.uint8)) for n, s in shapes.items()]
    path = tmp_path / "tiny.gguf"
    F.write_gguf(path, metadata, tensors)
    return path


def test_inspect_table_of_the_shipped_file(shipped_path):
    result = run_cli("gguf", "inspect", str(shipped_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "type", "shape", "bytes", "bits/w"]
    assert lines[1].split() == ["token_embd.weight", "Q8_0", "49152", "x", "576", "30081024", "8.5000"]
    rows = [line for line in lines[1:] if line.startswith(("blk.", "token_embd", "output"))]
    assert len(rows) == 272
    assert ["blk.0.ffn_down.weight", "Q4_1", "576", "x", "1536", "552960", "5.0000"] in [r.split() for r in rows]
    assert "272 tensors (1 Q8_0, 61 F32, 210 Q4_1)" in result.stdout
    assert "134,515,008 weights" in result.stdout and "5.0000 over the linear layers" in result.stdout


def test_inspect_json(shipped_path):
    result = run_cli("gguf", "inspect", str(shipped_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["totals"]["types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert report["totals"]["file_bytes"] == shipped_path.stat().st_size
    norm = next(r for r in report["tensors"] if r["name"] == "output_norm.weight")
    assert norm == {"name": "output_norm.weight", "type": "F32", "shape": [576], "bytes": 2304, "bits_per_weight": 32.0}


def test_quantize_follows_the_recipe_and_refuses_to_overwrite(tiny, tmp_path):
    out = tmp_path / "tiny-q4_k_m.gguf"
    result = run_cli("gguf", "quantize", str(tiny), str(out), "--type", "q4_k_m")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (Q4_K_M)" in result.stdout
    written = F.read_gguf(out)
    types = {name: t.qtype for name, t in written.tensors.items()}
    # 2 layers: use_more_bits holds for layer 1 only (the last eighth); the tied embedding gets Q6_K
    assert types == {
        "token_embd.weight": "Q6_K", "output_norm.weight": "F32",
        "blk.0.attn_norm.weight": "F32", "blk.0.attn_v.weight": "Q4_K", "blk.0.ffn_up.weight": "Q4_K", "blk.0.ffn_down.weight": "Q4_K",
        "blk.1.attn_norm.weight": "F32", "blk.1.attn_v.weight": "Q6_K", "blk.1.ffn_up.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K",
    }  # fmt: skip
    assert written.value("general.file_type") == 15

    before = out.read_bytes()
    again = run_cli("gguf", "quantize", str(tiny), str(out), "--type", "Q8_0")
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert out.read_bytes() == before
    forced = run_cli("gguf", "quantize", str(tiny), str(out), "--type", "Q8_0", "--pure", "--tensor-type", "ffn_down=q5_k", "--force")
    assert forced.returncode == 0, forced.stderr
    types = {name: t.qtype for name, t in F.read_gguf(out).tensors.items()}
    assert types["token_embd.weight"] == types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q5_K"


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "{tmp}/missing.gguf"], "quantcourse gguf: no such GGUF file: {tmp}/missing.gguf"),
        (["inspect", "{tmp}/notes.txt"], "is not a GGUF file: it starts with b'some'"),
        (["quantize", "{tmp}/missing.gguf", "{tmp}/out.gguf", "--type", "Q4_0"], "no such GGUF file"),
        (["quantize", "{tiny}", "{tmp}/out.gguf", "--type", "Q3_K"], "invalid choice: 'Q3_K' (choose from 'Q4_0'"),
        (["quantize", "{tiny}", "{tmp}/out.gguf", "--type", "Q4_0", "--tensor-type", "down=Q7"], "--tensor-type wants REGEX=TYPE"),
        (["quantize", "{tiny}", "{tiny}", "--type", "Q4_0", "--force"], "is the input file"),
    ],
)
def test_errors_name_the_problem(tiny, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("some notes, not a model")
    fill = {"tmp": str(tmp_path), "tiny": str(tiny)}
    result = run_cli("gguf", *(a.format(**fill) for a in args))
    assert result.returncode == 2
    assert message.format(**fill) in result.stderr
    assert "Traceback" not in result.stderr
