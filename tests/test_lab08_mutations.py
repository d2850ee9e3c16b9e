"""Mutation catalog of lab 08: the hidden suite must fail plausible wrong versions of every graded
function (and name the mistake where the suite knows it) and pass other correct ones; the lab
notebook must hold together (points, outputs, the source at full marks, the student version at
zero); its given helpers must behave like the reference's; the suite's wrong implementations,
with no mistake switched on, must be the reference; the bad inputs the suite feeds must make the
reference raise the exception types the suite expects.

All versions live in one notebook: the source notebook plus one cell per version, whose function
is renamed `update_residual_window__newest`. A single learner process serves them all and
`aliases` points the suite's `learner.update_residual_window` at the version under test. A
version calls the notebook's correct functions (quantized_tokens, quantize_groups, ...), so each
mutant breaks one thing.
"""

import dataclasses
import re
from pathlib import Path

import nbformat
import pytest
import torch

from lab_catalog import (
    check_catalog_covers,
    check_full_marks,
    check_loses_points,
    check_reference_signatures,
    check_saved_without_outputs,
    check_solution_cells_hold_only,
    check_source_and_student_notebooks,
    check_test_cells_match_the_suite,
    grade_version,
    nbgrader_cells,
    suite_points,
    version,
    versions_sandbox,
)

from quantcourse.autograder import engine
from quantcourse.autograder.sandbox import LearnerError
from quantcourse.reference_impl import kvcache as kv

LAB = "08_kv_cache"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"


WINDOW = '''
def quantized_tokens(scheme, context):
    if scheme.kind != "grouped":
        return OTHER
    values = OUT
    keys = KEYS if scheme.key_axis == "channel" else values
    return RESULT
'''
WINDOW_RIGHT = {"OTHER": "context, context", "OUT": "max(0, context - scheme.residual)",
                "KEYS": "values // scheme.group_size * scheme.group_size", "RESULT": "keys, values"}  # fmt: skip

MEMORY = '''
def kv_cache_memory(config, scheme, context, batch=1, float_bytes=2):
    scheme = get_scheme(scheme)
    if ARGS_CHECK:
        raise ValueError("need context >= 0 and batch >= 1")
    D = config.head_dim
    lanes = BATCH * config.layers * HEADS
    numbers = TWO * lanes * context * D
    if scheme.kind == "float":
        return KVMemory(numbers * FLOAT_BITS // 8, 0, 0)
    if scheme.kind == "int8":
        return KVMemory(numbers, INT8_CONSTANTS, 0)
    if scheme.kind == "fp8":
        return KVMemory(numbers, FP8_CONSTANTS, 0)
    G = scheme.group_size
    if DIVIDES:
        raise ValueError("head_dim is not a multiple of group_size")
    keys, values = quantized_tokens(scheme, context)
    key_groups = keys // G * D if scheme.key_axis == "channel" else keys * (D // G)
    value_groups = values * (D // G)
    codes = lanes * (keys + values) * D * scheme.bits CODE_UNIT
    constants = lanes * (key_groups + value_groups) * CONSTANT_BYTES
    return KVMemory(codes, constants, WINDOW_BYTES)
'''
MEMORY_RIGHT = {
    "ARGS_CHECK": "context < 0 or batch < 1", "BATCH": "batch", "HEADS": "config.kv_heads", "TWO": "2",
    "FLOAT_BITS": "torch.finfo(scheme.dtype).bits", "INT8_CONSTANTS": "2 * lanes * context * 4", "FP8_CONSTANTS": "2 * config.layers * 4",
    "DIVIDES": "D % G", "CODE_UNIT": "// 8", "CONSTANT_BYTES": "4", "WINDOW_BYTES": "lanes * (2 * context - keys - values) * D * float_bytes",
}  # fmt: skip

INT8 = '''
def quantize_int8_per_token(x):
    xf = x.float()
    scale = AMAX / LEVELS
    scale = ZERO_FIX
    codes = ROUND(xf / scale[..., None]).clamp(-127, 127).to(CODE_DTYPE)
    return codes, scale
'''
INT8_RIGHT = {"AMAX": "xf.abs().amax(dim=-1)", "LEVELS": "127", "ZERO_FIX": "torch.where(scale > 0, scale, torch.ones_like(scale))",
              "ROUND": "torch.round", "CODE_DTYPE": "torch.int8"}  # fmt: skip

GROUPS = '''
def quantize_groups(x, bits, group_size):
    n = x.shape[-1]
    if BITS_CHECK:
        raise ValueError("bits must be 2, 4 or 8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError("group_size must be a positive integer dividing the last axis")
    top = 2**bits - 1
    groups = x.float().reshape(*x.shape[:-1], n // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = SCALE
    scale = ZERO_FIX
    minimum = MINIMUM
    q = ROUND(QUOTIENT)CLAMP
    return GroupCodes(PACK(q.to(torch.uint8).reshape(x.shape), bits), scale, minimum, bits, group_size)


def pack_high_first(codes, bits):
    per_byte = 8 // bits
    parts = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros_like(parts[..., 0])
    for k in range(per_byte):
        packed |= parts[..., k] << (bits * (per_byte - 1 - k))
    return packed
'''
GROUPS_RIGHT = {
    "BITS_CHECK": "bits not in (2, 4, 8)", "SCALE": "((high - low) / top).half()",
    "ZERO_FIX": "torch.where(scale > 0, scale, torch.ones_like(scale))", "MINIMUM": "low.half()", "ROUND": "torch.round",
    "QUOTIENT": "(groups - minimum.float()[..., None]) / scale.float()[..., None]", "CLAMP": ".clamp(0, top)", "PACK": "pack_codes",
}  # fmt: skip

DEQUANT = '''
def dequantize_groups(g):
    q = UNPACK(g.codes, g.bits).float()
    q = q.reshape(*q.shape[:-1], -1, g.group_size)
    return (FORMULA).flatten(-2)


def unpack_high_first(packed, bits):
    per_byte = 8 // bits
    parts = [(packed >> (bits * (per_byte - 1 - k))) & (2**bits - 1) for k in range(per_byte)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)
'''
DEQUANT_RIGHT = {"UNPACK": "unpack_codes", "FORMULA": "q * g.scale.float()[..., None] + g.minimum.float()[..., None]"}

UPDATE = '''
def update_residual_window(quantized, window, x, bits, group_size, residual, axis):
    if AXIS_CHECK:
        raise ValueError("axis must be 'channel' or 'token'")
    if residual < 0 or residual % group_size:
        raise ValueError("residual must be a non-negative multiple of group_size")
    window = APPEND
    leaving = LEAVING
    if WHOLE_GROUPS:
        leaving = ROUNDING
    if leaving == 0:
        return quantized, window
    old, window = SPLIT
    if axis == "channel":
        return CONCAT(quantized, quantize_groups(KEYS_IN, bits, group_size), dim=KEY_DIM), window
    return CONCAT(quantized, quantize_groups(old, bits, group_size), dim=-2), window


def concat_new_first(a, b, dim):
    return b if a is None else concat_groups(b, a, dim)
'''
UPDATE_RIGHT = {
    "AXIS_CHECK": 'axis not in ("channel", "token")', "APPEND": "x if window is None else torch.cat([window, x], dim=-2)",
    "LEAVING": "max(0, window.shape[-2] - residual)", "WHOLE_GROUPS": 'axis == "channel"', "ROUNDING": "leaving // group_size * group_size",
    "SPLIT": "window[..., :leaving, :], window[..., leaving:, :]", "CONCAT": "concat_groups", "KEYS_IN": "old.transpose(-1, -2)", "KEY_DIM": "-1",
}  # fmt: skip


def window_version(**changes):
    return version(WINDOW, WINDOW_RIGHT, **changes)


def memory_version(**changes):
    return version(MEMORY, MEMORY_RIGHT, **changes)


def int8_version(**changes):
    return version(INT8, INT8_RIGHT, **changes)


def groups_version(**changes):
    return version(GROUPS, GROUPS_RIGHT, **changes)


def dequant_version(**changes):
    return version(DEQUANT, DEQUANT_RIGHT, **changes)


def update_version(**changes):
    return version(UPDATE, UPDATE_RIGHT, **changes)


# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "quantized_tokens": {
        "keys_per_token": (window_version(KEYS="values"), "keys leave the window one token at a time"),
        "r_plus_one": (window_version(OUT="max(0, context - scheme.residual - 1)"), "R + 1 tokens kept"),
        "flush_at_g_minus_one": (window_version(KEYS="max(0, context - scheme.residual + 1) // scheme.group_size * scheme.group_size"),
                                 "G - 1 of its tokens"),
        "rounded_up": (window_version(KEYS="min(context, -(-values // scheme.group_size) * scheme.group_size)"), "rounded up"),
        "no_max": (window_version(OUT="context - scheme.residual"), "no max(0, ...)"),
        "swapped": (window_version(RESULT="values, keys"), "keys and values swapped"),
        "values_in_groups": (window_version(RESULT="keys, values // scheme.group_size * scheme.group_size"), "values rounded to whole groups"),
        "no_window_for_others": (window_version(OTHER="0, 0"), "no tokens counted as quantized"),
    },
    "kv_cache_memory": {
        "query_heads": (memory_version(HEADS="config.query_heads"), "query heads counted instead of KV heads"),
        "no_factor_two": (memory_version(TWO="1"), "K and V not both counted"),
        "bits": (memory_version(FLOAT_BITS="torch.finfo(scheme.dtype).bits * 8"), "the codes counted in bits"),
        "grouped_bits": (memory_version(CODE_UNIT=""), "the codes counted in bits"),
        "float_bytes_for_floats": (memory_version(FLOAT_BITS="8 * float_bytes"), "taken from float_bytes"),
        "int8_scales_fp16": (memory_version(INT8_CONSTANTS="2 * lanes * context * 2"), "int8 scales counted as 2 bytes"),
        "fp8_per_sequence": (memory_version(FP8_CONSTANTS="2 * batch * config.layers * 4"), "one fp8 scale per sequence"),
        "scale_only": (memory_version(CONSTANT_BYTES="2"), "only the scale counted per group"),
        "window_ignored": (memory_version(WINDOW_BYTES="0"), "the residual window not counted"),
        "window_two_bytes": (memory_version(WINDOW_BYTES="lanes * (2 * context - keys - values) * D * 2"), "regardless of float_bytes"),
        "no_batch": (memory_version(BATCH="1"), "batch not multiplied in"),
        "no_argument_check": (memory_version(ARGS_CHECK="False"), "ValueError"),
        "no_group_check": (memory_version(DIVIDES="False"), "ValueError"),
    },
    "quantize_int8_per_token": {
        "levels_128": (int8_version(LEVELS="128"), "max|x| / 128"),
        "levels_255": (int8_version(LEVELS="255"), "max|x| / 255"),
        "signed_max": (int8_version(AMAX="xf.amax(dim=-1)"), "max(x) instead of max|x|"),
        "floor": (int8_version(ROUND="torch.floor"), "floor instead of round"),
        "truncated": (int8_version(ROUND="torch.trunc"), "truncated toward zero"),
        "zero_scale": (int8_version(ZERO_FIX="scale"), "scale 0"),
        "uint8_codes": (int8_version(CODE_DTYPE="torch.uint8"), "expected int8"),
        "over_tokens": ('''
def quantize_int8_per_token(x):
    xf = x.float()
    scale = xf.abs().amax(dim=-2) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / scale[..., None, :]).clamp(-127, 127).to(torch.int8), scale
''', "per channel"),
    },
    "quantize_groups": {
        "levels": (groups_version(SCALE="((high - low) / 2**bits).half()"), "scale = (max - min) / 2^bits"),
        "float32_codes": (groups_version(QUOTIENT="(groups - low[..., None]) / torch.where(high > low, (high - low) / top, 1.0)[..., None]"),
                          "computed with the float32 scale and minimum"),
        "fp16_arithmetic": (groups_version(SCALE="(high.half() - low.half()) / top"), "fp16 arithmetic"),
        "max_offset": (groups_version(MINIMUM="high.half()"), "anchored at the group's max"),
        "floor": (groups_version(ROUND="torch.floor"), "floor instead of round"),
        "no_clamp": (groups_version(CLAMP=""), None),
        "high_first": (groups_version(PACK="pack_high_first"), "highest bits"),
        "zero_scale": (groups_version(ZERO_FIX="scale"), "constant group given scale 0"),
        "no_bits_check": (groups_version(BITS_CHECK="False"), "ValueError"),
    },
    "dequantize_groups": {
        "no_minimum": (dequant_version(FORMULA="q * g.scale.float()[..., None]"), "the minimum not added"),
        "zero_point": (dequant_version(FORMULA="g.scale.float()[..., None] * (q - g.minimum.float()[..., None])"), "not a zero point"),
        "high_first": (dequant_version(UNPACK="unpack_high_first"), "highest bits"),
        "float16": (dequant_version(FORMULA="q.half() * g.scale[..., None] + g.minimum[..., None]"), "expected float32"),
        "packed_bytes": (dequant_version(UNPACK="(lambda codes, bits: codes)"), None),
        "tiled": ('''
def dequantize_groups(g):
    q = unpack_codes(g.codes, g.bits).float()
    reps = q.shape[-1] // g.scale.shape[-1]
    return q * g.scale.float().repeat(*[1] * (q.dim() - 1), reps) + g.minimum.float().repeat(*[1] * (q.dim() - 1), reps)
''', "repeat_interleave"),
    },
    "update_residual_window": {
        "keys_per_token": (update_version(KEYS_IN="old", KEY_DIM="-2"), "keys grouped per token"),
        "r_plus_one": (update_version(LEAVING="max(0, window.shape[-2] - residual - 1)"), "R + 1 tokens kept"),
        "flush_at_g_minus_one": (update_version(ROUNDING="min(window.shape[-2], (leaving + 1) // group_size * group_size)"), "G - 1 of its tokens"),
        "partial_group": (update_version(ROUNDING="min(window.shape[-2], -(-leaving // group_size) * group_size)"), "partial key group"),
        "values_in_groups": (update_version(WHOLE_GROUPS="True"), "values held back"),
        "no_window": (update_version(LEAVING="window.shape[-2]"), "residual window ignored"),
        "newest_quantized": (update_version(SPLIT="window[..., window.shape[-2] - leaving :, :], window[..., : window.shape[-2] - leaving, :]"),
                             "newest tokens quantized"),
        "prepended": (update_version(CONCAT="concat_new_first"), "new groups put before the old ones"),
        "x_first": (update_version(APPEND="x if window is None else torch.cat([x, window], dim=-2)"), "new tokens put before the window"),
        "no_axis_check": (update_version(AXIS_CHECK="False"), "ValueError"),
        "window_float32": (update_version(APPEND="(x if window is None else torch.cat([window, x], dim=-2)).float()"), "expected float16"),
    },
}  # fmt: skip

CORRECT = {
    "quantized_tokens": {
        "token_by_token": '''
def quantized_tokens(scheme, context):
    if scheme.kind != "grouped":
        return context, context
    keys = values = 0
    for t in range(1, context + 1):  # the window rule, replayed one token at a time
        if t - values > scheme.residual:
            values += 1
        if scheme.key_axis == "token":
            keys = values
        elif t - keys - scheme.residual >= scheme.group_size:
            keys += scheme.group_size
    return keys, values
''',
        "floor": '''
def quantized_tokens(scheme, context):
    if scheme.kind == "grouped":
        out = max(context - scheme.residual, 0)
        whole = math.floor(out / scheme.group_size) * scheme.group_size
        return (whole if scheme.key_axis == "channel" else out), out
    return (context, context)
''',
    },
    "kv_cache_memory": {
        "per_tensor": '''
def kv_cache_memory(config, scheme, context, batch=1, float_bytes=2):
    scheme = get_scheme(scheme)
    if context < 0 or batch < 1:
        raise ValueError("context must be >= 0 and batch >= 1")
    if scheme.kind == "grouped" and config.head_dim % scheme.group_size:
        raise ValueError("group_size must divide head_dim")
    D, G = config.head_dim, scheme.group_size
    memory = [0, 0, 0]
    axes = {"key": scheme.key_axis, "value": "token"}
    for which, tq in zip(("key", "value"), quantized_tokens(scheme, context)):
        for _ in range(batch * config.layers * config.kv_heads):  # one [context, D] tensor each
            if scheme.kind == "float":
                memory[0] += context * D * torch.finfo(scheme.dtype).bits // 8
            elif scheme.kind in ("int8", "fp8"):
                memory[0] += context * D
                memory[1] += 4 * context if scheme.kind == "int8" else 0
            else:
                memory[0] += tq * D * scheme.bits // 8
                groups = (tq // G) * D if axes[which] == "channel" else tq * (D // G)
                memory[1] += 4 * groups
                memory[2] += (context - tq) * D * float_bytes
        if scheme.kind == "fp8":
            memory[1] += 4 * config.layers
    return KVMemory(*memory)
''',
        "bits_then_bytes": '''
def kv_cache_memory(config, scheme, context, batch=1, float_bytes=2):
    s = get_scheme(scheme)
    if context < 0 or batch < 1:
        raise ValueError("bad context or batch")
    per_token_numbers = 2 * config.layers * config.kv_heads * config.head_dim
    if s.kind in ("float", "int8", "fp8"):
        code_bits = batch * context * per_token_numbers * s.bits
        scale_bits = {"float": 0, "int8": 2 * batch * config.layers * config.kv_heads * context * 32, "fp8": 2 * config.layers * 32}[s.kind]
        return KVMemory(code_bits // 8, scale_bits // 8, 0)
    if config.head_dim % s.group_size:
        raise ValueError("head_dim must be a multiple of group_size")
    tk, tv = quantized_tokens(s, context)
    lane_numbers = config.head_dim * batch * config.layers * config.kv_heads
    code_bits = (tk + tv) * lane_numbers * s.bits
    group_bits = 32 * (tk + tv) * lane_numbers // s.group_size  # keys per channel or per token: the same count
    window_bits = (2 * context - tk - tv) * lane_numbers * 8 * float_bytes
    return KVMemory(code_bits // 8, group_bits // 8, window_bits // 8)
''',
    },
    "quantize_int8_per_token": {
        "reciprocal": '''
def quantize_int8_per_token(x):
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.ones_like(amax))
    codes = torch.round(x.float() * inverse).clamp(-127, 127).to(torch.int8)
    return codes, torch.where(amax > 0, amax * (1 / 127), torch.ones_like(amax)).squeeze(-1)
''',
        "masked": '''
def quantize_int8_per_token(x):
    scale = x.float().abs().max(dim=-1).values / 127.0
    scale[scale == 0] = 1.0
    codes = (x.float() / scale.unsqueeze(-1)).round().to(torch.int8)
    return codes, scale
''',
    },
    "quantize_groups": {
        "loop": '''
def quantize_groups(x, bits, group_size):
    if bits not in (2, 4, 8):
        raise ValueError("bits must be 2, 4 or 8")
    n = x.shape[-1]
    if type(group_size) is not int or group_size <= 0 or n % group_size != 0:
        raise ValueError("group_size must divide the last axis")
    rows = x.float().reshape(-1, n)
    codes = torch.zeros(rows.shape, dtype=torch.uint8)
    scale = torch.zeros(rows.shape[0], n // group_size, dtype=torch.float16)
    minimum = torch.zeros_like(scale)
    for k in range(n // group_size):
        part = rows[:, k * group_size : (k + 1) * group_size]
        lo, hi = part.min(dim=1).values, part.max(dim=1).values
        s = ((hi - lo) / (2**bits - 1)).to(torch.float16)
        s[s == 0] = 1
        scale[:, k], minimum[:, k] = s, lo.to(torch.float16)
        q = torch.round((part - minimum[:, k, None].float()) / s[:, None].float())
        codes[:, k * group_size : (k + 1) * group_size] = q.clamp(0, 2**bits - 1).to(torch.uint8)
    lead = x.shape[:-1]
    return GroupCodes(pack_codes(codes.reshape(x.shape), bits), scale.reshape(*lead, -1), minimum.reshape(*lead, -1), bits, group_size)
''',
        "reciprocal_and_arithmetic_packing": '''
def quantize_groups(x, bits, group_size):
    n = x.shape[-1]
    if bits not in (2, 4, 8) or isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError("bad bits or group_size")
    per_byte = 8 // bits
    if n % per_byte:
        raise ValueError("the codes do not fill whole bytes")
    groups = x.float().reshape(*x.shape[:-1], n // group_size, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).to(torch.float16)
    scale = scale.masked_fill(scale == 0, 1.0)
    minimum = lo.to(torch.float16)
    q = ((groups - minimum.float()) * (1.0 / scale.float())).round().clamp(0, 2**bits - 1)
    q = q.reshape(*x.shape[:-1], n // per_byte, per_byte)
    weights = 2.0 ** (bits * torch.arange(per_byte))
    packed = (q * weights).sum(-1).to(torch.uint8)
    return GroupCodes(packed, scale.squeeze(-1), minimum.squeeze(-1), bits, group_size)
''',
    },
    "dequantize_groups": {
        "repeat_interleave": '''
def dequantize_groups(g):
    q = unpack_codes(g.codes, g.bits).float()
    scale = g.scale.float().repeat_interleave(g.group_size, dim=-1)
    minimum = g.minimum.float().repeat_interleave(g.group_size, dim=-1)
    return scale * q + minimum
''',
        "addcmul": '''
def dequantize_groups(g):
    q = unpack_codes(g.codes, g.bits).to(torch.float32)
    q = q.unflatten(-1, (-1, g.group_size))
    return torch.addcmul(g.minimum.float().unsqueeze(-1), q, g.scale.float().unsqueeze(-1)).flatten(-2)
''',
    },
    "update_residual_window": {
        "group_by_group": '''
def update_residual_window(quantized, window, x, bits, group_size, residual, axis):
    if axis not in ("channel", "token"):
        raise ValueError("axis must be 'channel' or 'token'")
    if residual < 0 or residual % group_size:
        raise ValueError("residual must be a non-negative multiple of group_size")
    window = x if window is None else torch.cat((window, x), dim=2)
    if axis == "token":  # every token older than the newest R leaves
        leaving = max(window.shape[2] - residual, 0)
        if leaving:
            quantized = concat_groups(quantized, quantize_groups(window[:, :, :leaving], bits, group_size), -2)
            window = window[:, :, leaving:].clone()
        return quantized, window
    while window.shape[2] - residual >= group_size:  # one key group at a time
        group = window[:, :, :group_size].transpose(2, 3).contiguous()
        quantized = concat_groups(quantized, quantize_groups(group, bits, group_size), -1)
        window = window[:, :, group_size:]
    return quantized, window
''',
        "narrow": '''
def update_residual_window(quantized, window, x, bits, group_size, residual, axis):
    if axis not in ("channel", "token") or residual < 0 or residual % group_size:
        raise ValueError("axis must be 'channel' or 'token', residual a non-negative multiple of group_size")
    window = torch.cat([window, x], dim=-2) if window is not None else x
    extra = window.size(-2) - residual
    leaving = 0 if extra <= 0 else (extra - extra % group_size if axis == "channel" else extra)
    if not leaving:
        return quantized, window
    old = window.narrow(-2, 0, leaving)
    window = window.narrow(-2, leaving, window.size(-2) - leaving)
    if axis == "channel":
        return concat_groups(quantized, quantize_groups(old.mT, bits, group_size), dim=-1), window
    return concat_groups(quantized, quantize_groups(old, bits, group_size), dim=-2), window
''',
    },
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab08")) as box:
        yield box


@pytest.mark.slow
@pytest.mark.parametrize("function, name", [(f, v) for f, versions in WRONG.items() for v in versions])
def test_wrong_version_loses_points(sandbox, function, name):
    check_loses_points(grade_version(LAB, sandbox, function, name), f"{function}__{name}", WRONG[function][name][1])


@pytest.mark.slow
@pytest.mark.parametrize("function, name", [(f, v) for f, versions in CORRECT.items() for v in versions] + [(f, None) for f in WRONG])
def test_correct_version_gets_full_marks(sandbox, function, name):
    check_full_marks(grade_version(LAB, sandbox, function, name))


def test_catalog_covers_every_graded_function():
    check_catalog_covers(LAB, WRONG, CORRECT)


@pytest.mark.slow
def test_given_helpers_behave_like_the_reference(sandbox):
    """The notebook's schemes, packing, concatenation and int8 decoding are the reference's, so a
    learner who calls them is graded against the same arithmetic."""
    for name, scheme in kv.SCHEMES.items():
        assert vars(sandbox.call("get_scheme", name)) == dataclasses.asdict(scheme), name
    with pytest.raises(LearnerError, match=" raised ValueError:"):
        sandbox.call("get_scheme", "int3")
    g = torch.Generator().manual_seed(5)
    for bits in (2, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 5, 32), generator=g, dtype=torch.uint8)
        packed = sandbox.call("pack_codes", codes, bits)
        assert torch.equal(packed, kv.pack_codes(codes, bits)) and torch.equal(sandbox.call("unpack_codes", packed, bits), codes)
    with pytest.raises(LearnerError, match=" raised ValueError:"):
        sandbox.call("pack_codes", torch.zeros(30, dtype=torch.uint8), 2)
    a = kv.quantize_groups(torch.randn(2, 3, 64, generator=g), 4, 32)
    b = kv.quantize_groups(torch.randn(2, 5, 64, generator=g), 4, 32)
    joined, expected = sandbox.call("concat_groups", a, b, -2), kv.concat_groups(a, b, -2)
    assert all(torch.equal(getattr(joined, f), getattr(expected, f)) for f in ("codes", "scale", "minimum"))
    assert sandbox.call("concat_groups", None, b, -1).codes.shape == b.codes.shape
    codes, scale = kv.quantize_int8_per_token(torch.randn(2, 7, 16, generator=g))
    assert torch.equal(sandbox.call("dequantize_int8_per_token", codes, scale), kv.dequantize_int8_per_token(codes, scale))


def test_the_suites_wrong_implementations_start_from_the_reference():
    """With no mistake switched on, the suite's re-implementations compute the reference's
    numbers: every variant then differs from the reference by its one mistake."""
    suite = engine.load_suite(LAB)
    g = torch.Generator().manual_seed(6)
    configs = list(kv.KNOWN_CONFIGS.values()) + [kv.KVConfig("small", 3, 2, 32, 6)]
    schemes = list(kv.SCHEMES.values()) + [suite.grouped(8, 1, 3), suite.grouped(4, 16, 32, "token"), suite.grouped(2, 32, 64)]
    for config in configs:
        for scheme in schemes:
            if config.head_dim % scheme.group_size:
                continue
            for context, batch, float_bytes in ((0, 1, 2), (161, 3, 4), (2047, 2, 2)):
                memory = kv.kv_cache_memory(config, scheme, context, batch, float_bytes)
                assert suite.memory_with(config, scheme, context, batch, float_bytes) == [memory.codes, memory.constants, memory.full_precision]
    x = torch.randn(2, 3, 8, 64, generator=g)
    x[0, 1, 2] = 0
    assert all(torch.equal(a, b) for a, b in zip(suite.int8_with(x, None), kv.quantize_int8_per_token(x)))
    for bits, G in ((2, 32), (4, 8), (8, 1)):
        got, expected = suite.groups_with(x, bits, G, None), kv.quantize_groups(x, bits, G)
        assert all(torch.equal(getattr(got, f), getattr(expected, f)) for f in ("codes", "scale", "minimum"))
        assert torch.equal(suite.dequantize_with(expected, None), kv.dequantize_groups(expected))
    for axis in ("channel", "token"):
        state = (None, None)
        for start in range(0, 8, 3):
            piece = x[..., start : start + 3, :]
            got = suite.update_with(*state, piece, 4, 2, 2, axis, None)
            state = kv.update_residual_window(*state, piece, 4, 2, 2, axis)
            assert torch.equal(got[1], state[1]) and (got[0] is None) == (state[0] is None)
            assert got[0] is None or all(torch.equal(getattr(got[0], f), getattr(state[0], f)) for f in ("codes", "scale", "minimum"))


@pytest.mark.slow
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_reference_raises():
    """The exception types the suite expects are those the reference raises for the same input."""
    suite = engine.load_suite(LAB)
    smol = kv.KNOWN_CONFIGS["smollm2-135m"]
    for scheme, context, batch in ((kv.SCHEMES["fp16"], -1, 1), (kv.SCHEMES["int8"], 100, 0), (suite.grouped(4, 48, 0), 100, 1), ("int3", 100, 1)):
        with pytest.raises(ValueError):
            kv.kv_cache_memory(smol, scheme, context, batch)
    x = suite.states(B=1, H=1, T=2, D=32, seed=870)
    for bits, G, n in ((3, 8, 32), (4, 24, 32), (4, 0, 32), (2, 2, 30)):
        with pytest.raises(ValueError):
            kv.quantize_groups(x[..., :n], bits, G)
    x = suite.states(B=1, H=1, T=40, D=16, seed=906)
    for G, R, axis in ((8, 16, "tokens"), (8, 16, "key"), (8, 12, "channel"), (8, -8, "token")):
        with pytest.raises(ValueError):
            kv.update_residual_window(None, None, x, 4, G, R, axis)


def test_test_cells_match_the_suite():
    check_test_cells_match_the_suite(LAB, NOTEBOOK)


def test_points_and_metadata():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    manual = {meta["grade_id"]: meta["points"] for _, meta in nbgrader_cells(notebook, "manual")}
    assert manual and sum(suite_points(LAB).values()) + sum(manual.values()) >= 100
    assert notebook.metadata["quantcourse"] == {"lab": LAB}
    assert notebook.metadata["kernelspec"]["name"] == "quantcourse"
    ids = [c.metadata["nbgrader"]["grade_id"] for c in notebook.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "grade_id values must be unique"
    assert notebook.cells[-1].source.strip() == "report()"
    table = notebook.cells[0].source
    rows = re.findall(r"^\| \d\. [^|]+\| ([^|]+)\| ([\d +]+) \|$", table, flags=re.MULTILINE)
    stated, questions = {}, []
    for functions, points in rows:
        names = re.findall(r"`(\w+)`", functions)
        values = [float(v) for v in points.split("+")]
        if names:
            stated.update({f"08.{function}": value for function, value in zip(names, values, strict=True)})
        else:
            questions += values
    assert stated == suite_points(LAB), "the introduction's table states each function's points"
    assert sorted(questions) == sorted(manual.values()), "and the questions' points"


def test_graded_functions_have_the_reference_signatures():
    """Same names, parameters and defaults as reference_impl/kvcache.py (the lab promises it)."""
    check_reference_signatures(LAB, NOTEBOOK)


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    check_solution_cells_hold_only(NOTEBOOK)
