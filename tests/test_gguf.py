"""GGUF blocks and files (lesson 09) against llama.cpp's own tools.

Oracles: gguf-py (`gguf.quants.quantize`/`dequantize`, bit-exact with llama.cpp for the types it
encodes; `GGUFReader`/`GGUFWriter`), bytes made by llama.cpp's C K-quant encoders
(tests/data/gguf_kquants_golden.npz), and transformers' GGUF loader.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import REPO
from quantcourse.reference_impl import gguf as Q
from quantcourse.reference_impl import gguf_file as F

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter  # noqa: E402

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
FLOAT_TRAPS = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
GOLDEN = REPO / "tests" / "data" / "gguf_kquants_golden.npz"


def oracle_quantize(x, qtype):
    return gguf.quants.quantize(np.asarray(x, np.float32), GGMLQuantizationType[qtype])


def oracle_dequantize(data, qtype):
    return gguf.quants.dequantize(data, GGMLQuantizationType[qtype])


def edge_blocks() -> np.ndarray:
    """Blocks of 32 that stress the rounding rules: [n, 32] float32."""
    rng = np.random.default_rng(1)
    blocks = [
        np.zeros(32),  # all zero: d = 0, reciprocal 0
        np.full(32, 3.0),  # constant positive
        np.full(32, -2.0),  # constant negative
        np.r_[5.0, -5.0, rng.uniform(-4, 4, 30)],  # tie in |max|: the first one (positive) wins
        np.r_[-5.0, 5.0, rng.uniform(-4, 4, 30)],  # the same tie, negative first
        np.r_[-7.0, rng.uniform(-1, 3, 31)],  # the extreme is negative
        np.arange(-16, 16) / 2.0,  # many values on exact half steps: ties in every rounding
        np.arange(32) * 127 / 31 - 63.5,  # Q8_0 halves: x / d lands on .5
        np.r_[1e-42, -1e-41, np.zeros(30)],  # subnormals
        np.r_[6e4, -1e4, rng.standard_normal(30)],  # near the fp16 limit
        np.r_[0.49999997, 0.5, 1.5, 2.5, -0.5, -1.5, np.zeros(26)],  # roundf at and around halves
        rng.standard_normal(32) * 1e-6,
    ]
    return np.stack(blocks).astype(np.float32)


def random_rows(seed=0, rows=64, width=1536) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, width)) * rng.uniform(1e-3, 2, (rows, 1))).astype(np.float32)


def minilm_weights() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from quantcourse.models import minilm_dir

    weights = load_file(minilm_dir() / "model.safetensors")
    return {k: v for k, v in weights.items() if v.ndim == 2 and v.dtype == np.float32 and k.endswith("weight")}


@pytest.fixture(scope="module")
def shipped():
    from quantcourse.models import smollm2_gguf_path

    return F.read_gguf(smollm2_gguf_path())


# ---------------------------------------------------------------- legacy blocks vs gguf-py


@FLOAT_TRAPS  # gguf-py's own encoders warn on the blocks of subnormals
@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_encoders_are_gguf_py_byte_for_byte(qtype):
    for x in (random_rows(), edge_blocks(), random_rows(1, 8, 256) * 1e3):
        ours, theirs = Q.quantize(x, qtype), oracle_quantize(x, qtype)
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs)


@FLOAT_TRAPS
@pytest.mark.parametrize("qtype", LEGACY)
@settings(max_examples=150, deadline=None)
@given(blocks=arrays(np.float32, (3, 32), elements=st.floats(-1e5, 1e5, width=32, allow_subnormal=True)))
def test_legacy_encoders_match_gguf_py_on_any_block(qtype, blocks):
    np.testing.assert_array_equal(Q.quantize(blocks, qtype), oracle_quantize(blocks, qtype))


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_encoders_on_real_weights(qtype, shipped):
    for name, w in minilm_weights().items():
        np.testing.assert_array_equal(Q.quantize(w, qtype), oracle_quantize(w, qtype), err_msg=name)
    w = shipped.values("blk.7.ffn_gate.weight")  # SmolLM2: values already on a Q4_1 grid
    np.testing.assert_array_equal(Q.quantize(w, qtype), oracle_quantize(w, qtype))


@FLOAT_TRAPS  # 65520 overflows fp16 to infinity, as intended
@pytest.mark.parametrize("qtype", ["F16", "BF16"])
def test_float_types_are_gguf_py_byte_for_byte(qtype):
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, 65520.0, 1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    for x in (random_rows(8, 4, 96), specials[None]):
        ours = Q.quantize(x, qtype)
        theirs = np.ascontiguousarray(oracle_quantize(x, qtype)).view(np.uint8)
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(Q.dequantize(ours, qtype), oracle_dequantize(theirs, qtype).reshape(x.shape))


def test_nibble_order_and_q8_rounding():
    x = np.arange(32, dtype=np.float32)[None] - 16  # max |x| is -16 at index 0
    q = Q.quantize(x, "Q4_0")[0]
    assert q[2] & 0x0F == 0 and q[2 + 15] >> 4 == 15  # weight 0 -> code 0 (the extreme), weight 31 -> 15
    half = np.zeros((1, 32), np.float32)
    half[0, :3] = [127.0, 0.5, -0.5]  # d = 1: halves round away from zero, as C's roundf
    assert list(Q.quantize(half, "Q8_0")[0, 2:5].view(np.int8)) == [127, 1, -1]


# ---------------------------------------------------------------- decoders vs gguf-py


@FLOAT_TRAPS  # random bytes hold NaN and infinite fp16 scales
@pytest.mark.parametrize("qtype", Q.QUANTIZED_TYPES)
def test_decoders_equal_gguf_py_on_every_bit_pattern(qtype):
    size = Q.BLOCK_TYPES[qtype].type_size
    data = np.random.default_rng(2).integers(0, 256, (512, size), dtype=np.uint8)
    data[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite scales in half of the rows...
    data[256:] = np.random.default_rng(3).integers(0, 256, (256, size), dtype=np.uint8)  # ...any bits in the rest
    np.testing.assert_array_equal(Q.dequantize(data, qtype), oracle_dequantize(data, qtype))
    encoded = Q.quantize(random_rows(4, 4, 1536), qtype)
    np.testing.assert_array_equal(Q.dequantize(encoded, qtype), oracle_dequantize(encoded, qtype))


# ---------------------------------------------------------------- K-quants


@pytest.mark.parametrize("qtype", Q.K_QUANTS)
def test_k_quant_encoders_are_llama_cpp_byte_for_byte(qtype):
    golden = np.load(GOLDEN)
    cases = sorted({key.split("/")[0] for key in golden.files})
    assert len(cases) == 7
    for case in cases:
        np.testing.assert_array_equal(Q.quantize(golden[f"{case}/input"], qtype), golden[f"{case}/{qtype}"], err_msg=case)


@pytest.mark.parametrize("qtype", Q.K_QUANTS)
def test_k_quant_search_beats_plain_rounding(qtype):
    """On MiniLM's real weights (the rows that 256 divides) and on random data."""
    weights = [w for w in minilm_weights().values() if w.shape[1] % 256 == 0]
    assert len(weights) == 6  # the FFN output projections, 384 x 1536
    for x in (np.concatenate(weights), random_rows(5)):
        searched, plain = Q.quantization_mse(x, qtype), Q.quantization_mse(x, qtype, search=False)
        assert searched < plain
    x = np.concatenate(weights)
    assert Q.quantization_mse(x, "Q4_K") < Q.quantization_mse(x, "Q4_0")  # same 4.5 bits per weight


@pytest.mark.parametrize("qtype", Q.K_QUANTS)
def test_k_quant_zero_and_constant_blocks(qtype):
    x = np.zeros((3, 256), np.float32)
    x[1] = -0.75  # a constant negative super-block: only the minimum is needed
    x[2, :32] = 2.0
    data = Q.quantize(x, qtype)
    assert not data[0].any()  # all zero bytes
    np.testing.assert_allclose(oracle_dequantize(data, qtype), x, atol=0.01)


def test_q6_k_scales_are_signed():
    """The sub-block scale of largest magnitude becomes int8 -128 (the end with one more step);
    the fp16 d carries the sign: negative for a block whose extreme values are negative."""
    x = np.abs(np.random.default_rng(6).standard_normal((2, 256))).astype(np.float32)
    x[1] *= -1
    data = Q.quantize(x, "Q6_K")
    assert (data[:, 192:208].view(np.int8).min(axis=1) == -128).all()
    assert list(np.sign(data[:, 208:].view(np.float16)[:, 0])) == [1, -1]
    assert np.abs(Q.dequantize(data, "Q6_K") - x).max() < 0.05


def test_row_lengths_that_blocks_do_not_tile_are_refused():
    with pytest.raises(ValueError, match="do not tile a row of 576"):
        Q.quantize(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="unknown GGUF tensor type 'Q3_K'"):
        Q.quantize(np.zeros((2, 256), np.float32), "Q3_K")
    with pytest.raises(ValueError, match="NaN or infinite"):
        Q.quantize(np.full((1, 32), np.nan, np.float32), "Q8_0")


# ---------------------------------------------------------------- the container


def test_reads_the_shipped_file_as_gguf_py_does(shipped):
    reader = GGUFReader(shipped.path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == list(shipped.metadata)
    for key in keys:
        field, ours = reader.fields[key], shipped.metadata[key]
        assert ours.type == field.types[0], key
        if ours.type == F.ValueType.ARRAY:
            assert ours.item_type == field.types[-1], key
        assert ours.value == field.contents(), key
    assert [t.name for t in reader.tensors] == list(shipped.tensors)
    for t in reader.tensors:
        ours = shipped.tensors[t.name]
        assert (ours.qtype, ours.dims, ours.nbytes) == (t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes))
        assert shipped.data_offset + ours.offset == t.data_offset
        np.testing.assert_array_equal(shipped.raw(t.name).reshape(-1), np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
    assert F.type_counts(shipped) == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert shipped.tensors["token_embd.weight"].shape == (49152, 576)  # dims (576, 49152) reversed


def test_writing_the_shipped_file_back_is_byte_identical(shipped, tmp_path):
    tensors = [F.TensorData(name, t.qtype, t.shape, shipped.raw(name)) for name, t in shipped.tensors.items()]
    size = F.write_gguf(tmp_path / "copy.gguf", shipped.metadata, tensors)
    assert size == shipped.path.stat().st_size
    assert (tmp_path / "copy.gguf").read_bytes() == shipped.path.read_bytes()


def synthetic_content():
    """Metadata of every value type and tensors of every type, with odd shapes."""
    rng = np.random.default_rng(7)
    metadata = {
        "general.architecture": ("llama", GGUFValueType.STRING),
        "test.u8": (200, GGUFValueType.UINT8), "test.i8": (-100, GGUFValueType.INT8),
        "test.u16": (60000, GGUFValueType.UINT16), "test.i16": (-30000, GGUFValueType.INT16),
        "test.u32": (4_000_000_000, GGUFValueType.UINT32), "test.i32": (-2_000_000_000, GGUFValueType.INT32),
        "test.f32": (0.1, GGUFValueType.FLOAT32), "test.bool": (True, GGUFValueType.BOOL),
        "test.u64": (2**63 + 5, GGUFValueType.UINT64), "test.i64": (-(2**62), GGUFValueType.INT64),
        "test.f64": (1 / 3, GGUFValueType.FLOAT64), "test.unicode": ("naïve ☃", GGUFValueType.STRING),
        "test.ints": ([1, -2, 3], GGUFValueType.ARRAY), "test.strings": (["a", "", "ccc"], GGUFValueType.ARRAY),
        "test.floats": ([0.5, -1.25], GGUFValueType.ARRAY),
    }  # fmt: skip
    tensors = {}
    for qtype in ("F32", "F16", *Q.QUANTIZED_TYPES):
        shape = (3, 2, 512) if qtype == "F32" else (5, 256 if qtype in Q.K_QUANTS else 96)
        tensors[f"t.{qtype.lower()}"] = (qtype, shape, Q.quantize(rng.standard_normal(shape).astype(np.float32), qtype))
    return metadata, tensors


def ours_from(metadata) -> dict:
    item_types = {"test.ints": F.ValueType.INT32, "test.strings": F.ValueType.STRING, "test.floats": F.ValueType.FLOAT32}
    return {
        k: F.MetadataValue(F.ValueType(int(t)), v, item_types.get(k))
        for k, (v, t) in metadata.items()
    }  # fmt: skip


@pytest.mark.parametrize("alignment", [None, 64])
def test_our_files_equal_gguf_writer_files_and_read_back(tmp_path, alignment):
    metadata, tensors = synthetic_content()
    writer = GGUFWriter(tmp_path / "theirs.gguf", "llama")
    for key, (value, vtype) in metadata.items():
        if key != "general.architecture":
            sub = {"test.ints": GGUFValueType.INT32, "test.floats": GGUFValueType.FLOAT32}.get(key)
            writer.add_key_value(key, value, vtype, sub_type=sub)
    if alignment:
        writer.add_custom_alignment(alignment)
        metadata["general.alignment"] = (alignment, GGUFValueType.UINT32)
    for name, (qtype, shape, data) in tensors.items():
        raw = data if qtype not in ("F32", "F16") else data.view(np.float32 if qtype == "F32" else np.float16).reshape(shape)
        writer.add_tensor(name, raw, raw_dtype=None if qtype in ("F32", "F16") else GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = [F.TensorData(name, qtype, shape, data) for name, (qtype, shape, data) in tensors.items()]
    F.write_gguf(tmp_path / "ours.gguf", ours_from(metadata), ours)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes()

    reader, back = GGUFReader(tmp_path / "ours.gguf"), F.read_gguf(tmp_path / "ours.gguf")
    for key, (value, vtype) in metadata.items():
        assert reader.fields[key].types[0] == vtype
        expected = np.float32(value).item() if vtype == GGUFValueType.FLOAT32 else value
        if key == "test.floats":
            expected = [np.float32(v).item() for v in value]
        assert reader.fields[key].contents() == expected == back.value(key), key
    assert back.alignment == (alignment or 32)
    for t in reader.tensors:
        qtype, shape, data = tensors[t.name]
        assert t.tensor_type.name == qtype and tuple(int(d) for d in t.shape) == tuple(reversed(shape))
        assert (F.padded(back.data_offset, back.alignment), back.tensors[t.name].offset % back.alignment) == (back.data_offset, 0)
        np.testing.assert_array_equal(back.raw(t.name).reshape(-1), data.reshape(-1))
        np.testing.assert_array_equal(back.values(t.name), Q.dequantize(data, qtype))


def test_nested_arrays_round_trip(tmp_path):
    inner = [F.MetadataValue(F.ValueType.ARRAY, [1, 2], F.ValueType.UINT8), F.MetadataValue(F.ValueType.ARRAY, [3], F.ValueType.UINT8)]
    metadata = {"general.architecture": F.MetadataValue(F.ValueType.STRING, "llama"),
                "test.nested": F.MetadataValue(F.ValueType.ARRAY, inner, F.ValueType.ARRAY)}  # fmt: skip
    F.write_gguf(tmp_path / "n.gguf", metadata, [])
    assert F.read_gguf(tmp_path / "n.gguf").metadata == metadata


def test_file_errors_name_the_problem(tmp_path, shipped):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        F.read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("hello world")
    with pytest.raises(F.GGUFError, match="is not a GGUF file: it starts with b'hell'"):
        F.read_gguf(tmp_path / "text.gguf")
    head = shipped.path.read_bytes()[:5000]
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(F.GGUFError, match="truncated|past the end"):
        F.read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(16))
    with pytest.raises(F.GGUFError, match="version 9 is not supported"):
        F.read_gguf(tmp_path / "v9.gguf")
    with pytest.raises(F.GGUFError, match="takes 68 bytes, got 34"):
        F.write_gguf(tmp_path / "bad.gguf", {}, [F.TensorData("w", "Q8_0", (2, 32), np.zeros(34, np.uint8))])


# ---------------------------------------------------------------- llama.cpp's recipes on SmolLM2


def test_use_more_bits_layers():
    assert [i for i in range(30) if F.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(32) if F.use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_plan_on_smollm2(shipped):
    plan = F.plan_types(shipped, "Q4_K_M")
    counts = {t: list(plan.values()).count(t) for t in set(plan.values())}
    assert counts == {"F32": 61, "Q8_0": 15, "Q6_K": 14, "Q4_K": 16, "Q5_0": 166}
    assert plan["token_embd.weight"] == "Q8_0"  # tied output: Q6_K wanted, 576 % 256 != 0 falls back
    assert plan["blk.0.ffn_down.weight"] == "Q6_K" and plan["blk.3.ffn_down.weight"] == "Q4_K"  # 1536-wide rows
    assert plan["blk.0.attn_v.weight"] == "Q8_0" and plan["blk.3.attn_v.weight"] == "Q5_0"  # 576-wide rows fall back
    assert plan["blk.3.ffn_gate.weight"] == "Q5_0" and plan["output_norm.weight"] == "F32"
    pure = F.plan_types(shipped, "Q4_K_M", pure=True)
    assert pure["token_embd.weight"] == pure["blk.0.attn_v.weight"] == "Q5_0" and pure["blk.0.ffn_down.weight"] == "Q4_K"
    only_down = F.plan_types(shipped, "Q4_1", overrides=[("ffn_down", "Q4_K")])
    assert {t for n, t in only_down.items() if "ffn_down" in n} == {"Q4_K"}
    assert {t for n, t in only_down.items() if "ffn_down" not in n} == {"Q4_1", "Q8_0", "F32"}


def test_q4_0_plan_and_a_requantized_file(shipped, tmp_path):
    plan = F.plan_types(shipped, "Q4_0")
    assert plan["token_embd.weight"] == "Q8_0" and {plan[n] for n in plan if n.startswith("blk.") and "norm" not in n} == {"Q4_0"}
    out = F.requantize_file(shipped.path, tmp_path / "q4_0.gguf", "Q4_0")
    assert out.value("general.file_type") == 2 and out.value("general.quantization_version") == 2
    assert out.metadata["tokenizer.ggml.merges"] == shipped.metadata["tokenizer.ggml.merges"]
    np.testing.assert_array_equal(out.raw("token_embd.weight"), shipped.raw("token_embd.weight"))  # same type: copied
    np.testing.assert_array_equal(out.raw("blk.4.ffn_up.weight"), Q.quantize(shipped.values("blk.4.ffn_up.weight"), "Q4_0"))
    assert F.bits_per_weight(out, linear_only=True) == 4.5
    reader = GGUFReader(out.path)
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_0", "Q8_0", "F32"}
    with pytest.raises(F.GGUFError, match="is the input file"):
        F.requantize_file(out.path, out.path, "Q8_0")


def test_shipped_q4_1_blocks_reencode_byte_for_byte(shipped):
    """Dequantize each Q4_1 (and the Q8_0 embedding) and encode again: every block comes back.
    Each stored block holds code 0 (its minimum) and code 15 (its maximum), so the minimum and
    the range are recovered, and their float32 rounding is far below half an fp16 step."""
    counts = F.reencode_identical(shipped)
    assert counts == {"Q4_1": (3317760, 3317760), "Q8_0": (884736, 884736)}


@pytest.mark.slow
def test_requantized_file_loads_in_transformers(shipped, tmp_path, reference):
    """Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors) through transformers' GGUF loader."""
    import torch

    out = F.requantize_file(shipped.path, tmp_path / "q4_k_m.gguf", "Q4_K_M")
    model = F.load_with_transformers(out.path, config=reference[0].config)
    layer = model.model.layers[0]
    np.testing.assert_array_equal(layer.mlp.down_proj.weight.numpy(), out.values("blk.0.ffn_down.weight"))  # Q6_K
    np.testing.assert_array_equal(model.model.layers[3].mlp.down_proj.weight.numpy(), out.values("blk.3.ffn_down.weight"))
    np.testing.assert_array_equal(layer.self_attn.v_proj.weight.numpy(), out.values("blk.0.attn_v.weight"))  # Q8_0
    np.testing.assert_array_equal(layer.mlp.up_proj.weight.numpy(), out.values("blk.0.ffn_up.weight"))  # Q5_0
    ids = reference[1]("def f(x):\n    return x + 1", return_tensors="pt").input_ids
    logits, ref_logits = model(ids).logits, reference[0](ids).logits
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.8
