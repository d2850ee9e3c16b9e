"""reference_impl/gguf_analysis.py: the byte map of a GGUF file, the field and bit maps of every
block type, and llama.cpp's file-type plans (against gguf_file.plan_types and llama.cpp's
published bits per weight)."""

from itertools import pairwise

import numpy as np
import pytest

from quantcourse.reference_impl import gguf as Q
from quantcourse.reference_impl import gguf_analysis as A
from quantcourse.reference_impl import gguf_file as F
from quantcourse.reference_impl.qlora import MODEL_SHAPES


@pytest.fixture(scope="module")
def shipped():
    from quantcourse.models import smollm2_gguf_path

    return F.read_gguf(smollm2_gguf_path())


def random_blocks(qtype, n=6, seed=0):
    """n encoded blocks of normal values: uint8 [n, bytes]."""
    x = np.random.default_rng(seed).standard_normal((n, Q.block_type(qtype).block_size)).astype(np.float32)
    return Q.quantize(x, qtype)


def assert_contiguous(fields, size):
    assert fields[0].start == 0 and fields[-1].stop == size
    for before, after in pairwise(fields):
        assert before.stop == after.start, (before, after)
        assert after.size > 0, after


# ---------------------------------------------------------------- the file


def small_file(tmp_path):
    """A GGUF file with two metadata entries, a Q4_0 [2, 64] tensor (72 bytes, padded to 96) and an
    F32 [3] one (12 bytes, padded to 32)."""
    w = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    metadata = {
        "general.name": F.MetadataValue(F.ValueType.STRING, "tiny"),
        "sizes": F.MetadataValue(F.ValueType.ARRAY, [3, 1, 4], F.ValueType.UINT32),
    }
    tensors = [
        F.TensorData("w", "Q4_0", (2, 64), Q.quantize(w, "Q4_0")),
        F.TensorData("b", "F32", (3,), np.arange(3, dtype=np.float32).view(np.uint8)),
    ]
    path = tmp_path / "tiny.gguf"
    F.write_gguf(path, metadata, tensors)
    return path


def test_file_fields_of_a_small_file_split_and_cover_every_byte(tmp_path):
    path = small_file(tmp_path)
    raw = path.read_bytes()
    fields = A.file_fields(path, detail=1)
    assert_contiguous(fields, len(raw))
    head = {f.label: f.value for f in fields if f.part == "header"}
    assert head == {"magic": b"GGUF", "version": 3, "tensor count": 2, "metadata count": 2}
    entry = [f for f in fields if f.part == "metadata"]
    assert [f.label for f in entry] == ["key length", "key", "value type", "value of general.name", "sizes"]
    assert entry[0].value == len("general.name") and raw[entry[1].start : entry[1].stop] == b"general.name"
    assert entry[2].value == "STRING" and entry[3].value.value == "tiny" and entry[4].value.value == [3, 1, 4]
    info = [f for f in fields if f.part == "tensor info"]
    assert [f.label for f in info[:5]] == ["name (length, bytes)", "n_dims", "dims (ne[0] first)", "type", "offset"]
    assert info[0].value == "w" and info[2].value == (64, 2)  # dims reversed: the row length first
    assert info[3].value == Q.block_type("Q4_0").ggml_type and info[4].value == 0
    assert info[5].label == "b" and info[5].value == ((3,), 0, 96)  # one field: dims, type id, offset
    file = F.read_gguf(path)
    data = [f for f in fields if f.part == "tensor data"]
    assert [(f.label, f.size) for f in data] == [("w", 72), ("b", 12)]
    for f in data:
        assert raw[f.start : f.stop] == file.raw(f.label).tobytes()
    padding = [f for f in fields if f.part == "padding"]
    assert all(raw[f.start : f.stop] == bytes(f.size) for f in padding)
    assert [f.size for f in padding][-2:] == [96 - 72, 32 - 12]  # each tensor padded to the alignment
    assert (info[-1].stop + fields[fields.index(info[-1]) + 1].size) % 32 == 0  # the data section is aligned


def test_file_fields_of_the_shipped_file(shipped):
    fields = A.file_fields(shipped.path, detail=2)
    assert_contiguous(fields, shipped.path.stat().st_size)
    head = {f.label: f.value for f in fields if f.part == "header"}
    assert head["tensor count"] == len(shipped.tensors) and head["metadata count"] == len(shipped.metadata)
    keys = [f for f in fields if f.part == "metadata" and f.label == "key"]
    assert [k.value for k in keys] == list(shipped.metadata)[:2]
    whole = [f.label for f in fields if f.part == "metadata" and f.label in shipped.metadata]
    assert whole == list(shipped.metadata)[2:]
    data = [f for f in fields if f.part == "tensor data"]
    assert len(data) == len(shipped.tensors)
    for f in data:
        assert f.start == shipped.data_offset + shipped.tensors[f.label].offset and f.value == shipped.tensors[f.label].qtype
    sizes = A.part_sizes(fields)
    assert sizes["tensor data"] == sum(t.nbytes for t in shipped.tensors.values())
    assert sum(sizes.values()) == shipped.path.stat().st_size


# ---------------------------------------------------------------- blocks


@pytest.mark.parametrize("qtype", Q.QUANTIZED_TYPES)
def test_block_fields_tile_the_block_and_the_bits_add_up(qtype):
    fields = A.block_fields(qtype)
    assert fields[0][1] == 0 and fields[-1][2] == Q.block_type(qtype).type_size
    assert all(a[2] == b[1] for a, b in pairwise(fields))
    assert sum(A.bits_breakdown(qtype).values()) == pytest.approx(Q.block_type(qtype).bits_per_weight)
    assert A.code_bits(qtype) == {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[qtype]


@pytest.mark.parametrize("qtype", Q.QUANTIZED_TYPES)
def test_d_field_is_where_the_decoder_reads_the_scale(qtype):
    """Zeroing the bytes called d leaves only the minimum (if any): the map names the right bytes."""
    blocks = random_blocks(qtype)
    start, stop = next((s, e) for name, s, e in A.block_fields(qtype) if name == "d")
    zeroed = blocks.copy()
    zeroed[:, start:stop] = 0
    decoded = Q.dequantize(zeroed, qtype)
    if qtype in ("Q4_1", "Q5_1"):
        m = Q.fp16_value(blocks[:, 2:4])
        np.testing.assert_array_equal(decoded, np.broadcast_to(m[:, None], decoded.shape))
    elif qtype in ("Q4_K", "Q5_K"):
        dmin = Q.fp16_value(blocks[:, 2:4])
        _, mins = Q.unpack_scales_k4(blocks[:, 4:16])
        expected = np.repeat(-(dmin[:, None] * mins.astype(np.float32)), 32, axis=1)
        np.testing.assert_array_equal(decoded, expected)
    else:
        assert not decoded.any()
    assert Q.dequantize(blocks, qtype).any()


@pytest.mark.parametrize("qtype", Q.QUANTIZED_TYPES)
def test_code_bit_map_is_one_to_one_onto_the_code_bits(qtype):
    weight, bit = A.code_bit_map(qtype)
    n, bits = Q.block_type(qtype).block_size, A.code_bits(qtype)
    pairs = {(w, b) for w, b in zip(weight[weight >= 0].tolist(), bit[weight >= 0].tolist())}
    assert len(pairs) == int((weight >= 0).sum()) == n * bits
    assert pairs == {(w, b) for w in range(n) for b in range(bits)}
    code_bytes = [i for name, s, e in A.block_fields(qtype) if name in A.CODE_FIELDS for i in range(s, e)]
    assert sorted(set(np.nonzero(weight >= 0)[0].tolist())) == code_bytes  # no code bit outside the code fields


def test_code_bit_map_matches_the_documented_layouts():
    w, b = A.code_bit_map("Q4_0")
    assert list(w[2]) == [0] * 4 + [16] * 4 and list(w[17]) == [15] * 4 + [31] * 4 and list(b[2]) == [0, 1, 2, 3] * 2
    w, b = A.code_bit_map("Q5_0")
    assert w[2:6].ravel().tolist() == list(range(32)) and (b[2:6] == 4).all()  # bit j of the uint32: weight j's 5th bit
    w, b = A.code_bit_map("Q8_0")
    assert (w[2:] == np.arange(32)[:, None]).all() and (b[2:] == np.arange(8)).all()
    w, b = A.code_bit_map("Q4_K")
    assert list(w[16]) == [0] * 4 + [32] * 4 and list(w[16 + 32]) == [64] * 4 + [96] * 4
    w, b = A.code_bit_map("Q6_K")
    assert list(w[0]) == [0] * 4 + [64] * 4 and list(w[32]) == [32] * 4 + [96] * 4
    assert list(w[128]) == [0, 0, 32, 32, 64, 64, 96, 96] and list(b[128]) == [4, 5] * 4


@pytest.mark.parametrize("qtype", Q.QUANTIZED_TYPES)
def test_read_codes_agrees_with_the_decoders(qtype):
    blocks = random_blocks(qtype, n=5, seed=3)
    codes = A.read_codes(blocks, qtype)
    if qtype in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"):
        body = blocks[:, -16:] if qtype != "Q8_0" else None
        if qtype == "Q8_0":
            expected = blocks[:, 2:].view(np.int8)
        elif qtype in ("Q5_0", "Q5_1"):
            qh = blocks[:, 2:6] if qtype == "Q5_0" else blocks[:, 4:8]
            expected = Q.unpack_nibbles(body) | Q.unpack_high_bits(qh)
        else:
            expected = Q.unpack_nibbles(body)
        np.testing.assert_array_equal(codes, expected)
    else:
        # put the real codes under unit scales: the decoder then returns code - offset, weight by weight
        unit = np.repeat(A.unit_block(qtype), blocks.shape[0], axis=0)
        for name, s, e in A.block_fields(qtype):
            if name in A.CODE_FIELDS:
                unit[:, s:e] = blocks[:, s:e]
        offset = 32 if qtype == "Q6_K" else 0
        np.testing.assert_array_equal(Q.dequantize(unit, qtype), codes - offset)
    with pytest.raises(ValueError, match="shape"):
        A.read_codes(blocks[:, 1:], qtype)


def test_k4_scale_bit_map_inverts_pack_scales_k4():
    value, bit = A.k4_scale_bit_map()
    assert {(v, b) for v, b in zip(value.ravel().tolist(), bit.ravel().tolist())} == {(v, b) for v in range(16) for b in range(6)}
    rng = np.random.default_rng(4)
    ls, lm = rng.integers(0, 64, (7, 8)), rng.integers(0, 64, (7, 8))
    packed = Q.pack_scales_k4(ls, lm)
    bits = np.unpackbits(packed, axis=1, bitorder="little").reshape(7, 12, 8).astype(int)
    rebuilt = np.zeros((7, 16), int)
    for byte in range(12):
        for b in range(8):
            rebuilt[:, value[byte, b]] |= bits[:, byte, b] << bit[byte, b]
    np.testing.assert_array_equal(rebuilt, np.concatenate([ls, lm], axis=1))
    assert list(value[0]) == [0] * 6 + [4] * 2 and list(value[8]) == [4] * 4 + [12] * 4  # the documented packing


def test_block_maps_reject_unquantized_types():
    for function in (A.block_fields, A.bits_breakdown, A.code_bit_map, A.unit_block):
        with pytest.raises(ValueError, match="quantized types"):
            function("F16")


# ---------------------------------------------------------------- file types


@pytest.mark.parametrize("ftype", list(F.FTYPES))
def test_recipe_plan_chooses_what_plan_types_chooses(shipped, ftype):
    plan = A.recipe_plan(A.tensor_shapes(shipped), ftype, shipped.value("llama.block_count"))
    assert {name: p.chosen for name, p in plan.items()} == F.plan_types(shipped, ftype)
    for name, p in plan.items():
        if p.fell_back:  # only ever because the wanted blocks do not tile the row
            assert p.shape[-1] % Q.block_type(p.wanted).block_size != 0, name
            assert p.chosen == F.FALLBACK[p.wanted]
    assert sum(A.fallback_counts(plan).values()) == sum(p.fell_back for p in plan.values())


def test_q4_k_m_on_smollm2_falls_back_except_ffn_down(shipped):
    plan = A.recipe_plan(A.tensor_shapes(shipped), "Q4_K_M", 30)
    downs = {name: p for name, p in plan.items() if ".ffn_down." in name}
    assert len(downs) == 30 and not any(p.fell_back for p in downs.values())  # rows of 1536 = 6 x 256
    assert {p.chosen for p in downs.values()} == {"Q4_K", "Q6_K"}
    assert all(p.chosen in ("Q5_0", "Q8_0") for name, p in plan.items() if p.fell_back)
    grid = A.type_of_layers(plan, 30, ("attn_v", "ffn_down"))
    assert [len(row) for row in grid] == [30, 30]
    assert [g == "Q6_K" for g in grid[1]] == [F.use_more_bits(i, 30) for i in range(30)]


def test_planned_bits_of_the_shipped_types_are_the_files(shipped):
    keep = {name: A.PlannedTensor(shape, qtype, qtype, qtype) for name, (shape, qtype) in A.tensor_shapes(shipped).items()}
    assert A.planned_bits_per_weight(keep) == pytest.approx(F.bits_per_weight(shipped), rel=1e-12)
    linear = [n for n, t in shipped.tensors.items() if F.is_linear_weight(n, t.shape)]
    assert A.planned_bits_per_weight(keep, linear) == pytest.approx(5.0)  # every linear weight is Q4_1
    with pytest.raises(ValueError, match="no tensors"):
        A.planned_bits_per_weight(keep, [])


def test_llama_3_8b_plans_match_llama_cpp_published_bits_per_weight():
    shape = MODEL_SHAPES["Llama-3-8B"]
    tensors = A.llama_tensors(shape)
    assert sum(int(np.prod(s)) for s, _ in tensors.values()) == shape.parameters()
    published = {"Q4_K_M": 4.89, "Q5_K_M": 5.70, "Q8_0": 8.50}  # llama.cpp's Llama-3-8B perplexity scoreboard
    for ftype, bits in published.items():
        plan = A.recipe_plan(tensors, ftype, shape.layers)
        assert not A.fallback_counts(plan)  # 4096 and 14336 are multiples of 256
        assert A.planned_bits_per_weight(plan) == pytest.approx(bits, abs=0.006), ftype
    plan = A.recipe_plan(tensors, "Q4_K_M", shape.layers)
    assert sum(p.chosen == "Q6_K" for p in plan.values()) == 2 * sum(F.use_more_bits(i, 32) for i in range(32)) + 1
