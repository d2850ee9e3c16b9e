"""Mutation catalog of lab 03: the hidden suite must fail plausible wrong versions of every graded
function (and name the mistake where the suite knows it) and pass other correct ones; the lab
notebook must hold together (points, outputs, the source at full marks, the student version at
zero); its given helpers must behave like the reference's; the bad inputs the suite feeds must
make the reference raise the exception types the suite expects.

All versions live in one notebook: the source notebook plus one cell per version, whose function
is renamed `quantize_blockwise_4bit__low_nibble_first`. A single learner process serves them all
and `aliases` points the suite's `learner.quantize_blockwise_4bit` at the version under test. A
version calls the notebook's correct functions and helpers unless its mistake is in one of them,
so each mutant breaks one thing.
"""

from pathlib import Path

import nbformat
import pytest
import torch

from lab_catalog import (
    check_catalog_covers,
    check_full_marks,
    check_loses_points,
    check_saved_without_outputs,
    check_solution_cells_hold_only,
    check_source_and_student_notebooks,
    check_test_cells_match_the_suite,
    grade_version,
    nbgrader_cells,
    suite_points,
    versions_sandbox,
)

from quantcourse.autograder import engine
from quantcourse.autograder.sandbox import LearnerError
from quantcourse.reference_impl import nf4

LAB = "03_nf4"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"

CODE_BOOK = '''
def nf4_code_book(offset=0.9677083):
    positive = torch.special.ndtri(POSITIVE_P)
    negative = -torch.special.ndtri(NEGATIVE_P)
    values = BUILD
    return values / NORM
'''
CODE_BOOK_RIGHT = {
    "POSITIVE_P": "torch.linspace(offset, 0.5, 9)[:-1].double()",
    "NEGATIVE_P": "torch.linspace(offset, 0.5, 8)[:-1].double()",
    "BUILD": "torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values",
    "NORM": "values.max()",
}


def code_book_version(**changes) -> str:
    source = CODE_BOOK
    for key, value in {**CODE_BOOK_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


NEAREST = '''
def nearest_code_4bit(scaled, code):
    sorted_code, order = torch.sort(code, stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return RESULT
'''


def nearest_version(result: str) -> str:
    return NEAREST.replace("RESULT", result)


QUANTIZE = '''
def quantize_blockwise_4bit(w, blocksize=64, quant_type="nf4"):
    CHECK_WEIGHT
    check_blocksize(blocksize)
    code = nf4_code_book() if check_quant_type(quant_type) == FP4_CHOICE else fp4_code_book()
    flat = FLATTEN
    n = flat.numel()
    blocks = math.ceil(n / blocksize)
    padded = F.pad(flat, (0, blocks * blocksize - n)).reshape(blocks, blocksize)
    absmax = ABSMAX
    scaled = (padded / absmax.clamp(min=1e-38)[:, None]).reshape(-1)[:n].float()
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    codes = NEAREST_CALL
    if PAD_ZERO and n % 2:
        codes[-1] = 0
    return (PACK)SHAPE, STORED
'''
QUANTIZE_RIGHT = {
    "CHECK_WEIGHT": "check_weight(w)", "FP4_CHOICE": '"nf4"', "FLATTEN": "w.reshape(-1).float()",
    "ABSMAX": "padded.abs().amax(dim=1)", "NEAREST_CALL": "nearest_code_4bit(scaled, code)", "PAD_ZERO": "False",
    "PACK": "(codes[0::2] << 4) | codes[1::2]", "SHAPE": "[:, None]", "STORED": "absmax",
}  # fmt: skip


def quantize_version(**changes) -> str:
    source = QUANTIZE
    for key, value in {**QUANTIZE_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


DEQUANTIZE = '''
def dequantize_blockwise_4bit(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.float32):
    check_blocksize(blocksize)
    code = nf4_code_book() if check_quant_type(quant_type) == "nf4" else fp4_code_book()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("dtype")
    n = math.prod(shape)
    packed = packed.reshape(-1)
    if COUNT_CHECK:
        raise ValueError("bytes")
    if absmax.shape != (math.ceil(n / blocksize),):
        raise ValueError("absmax")
    codes = torch.stack([UNPACK], dim=1).reshape(-1)[:KEEP]
    per_element = PER_ELEMENT
    return (VALUES).to(dtype)RESHAPE
'''
DEQUANTIZE_RIGHT = {
    "COUNT_CHECK": "packed.numel() != math.ceil(n / 2)", "UNPACK": "packed >> 4, packed & 0xF", "KEEP": "n",
    "PER_ELEMENT": "absmax.float().repeat_interleave(blocksize)[:n]", "VALUES": "code[codes.long()] * per_element",
    "RESHAPE": ".reshape(shape)",
}  # fmt: skip


def dequantize_version(**changes) -> str:
    source = DEQUANTIZE
    for key, value in {**DEQUANTIZE_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


DOUBLE = '''
def double_quantize(absmax, blocksize=256):
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1 or absmax.numel() == 0:
        raise ABSMAX_ERROR("absmax")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError("blocksize")
    offset = OFFSET
    centred = CENTRED
    size = SIZE
    n = centred.numel()
    blocks = math.ceil(n / size)
    absmax2 = ABSMAX2
    per_element = absmax2.repeat_interleave(size)[:n]
    codes = nearest_code_8bit(centred * (1.0 / per_element), dynamic_map())
    return torch.where(per_element > 0, codes, ZERO_CODE).to(torch.uint8), STORED, offset
'''
DOUBLE_RIGHT = {
    "ABSMAX_ERROR": "TypeError", "OFFSET": "absmax.mean()", "CENTRED": "absmax - offset", "SIZE": "blocksize",
    "ABSMAX2": "F.pad(centred, (0, blocks * size - n)).reshape(blocks, size).abs().amax(dim=1)",
    "ZERO_CODE": "0", "STORED": "absmax2",
}  # fmt: skip


def double_version(**changes) -> str:
    source = DOUBLE
    for key, value in {**DOUBLE_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


DOUBLE_BACK = '''
def double_dequantize(codes, absmax2, offset, blocksize=256):
    n = codes.numel()
    return MAP[INDEX] * PER_ELEMENT + OFFSET
'''
DOUBLE_BACK_RIGHT = {
    "MAP": "dynamic_map()", "INDEX": "codes.long()", "PER_ELEMENT": "absmax2.repeat_interleave(blocksize)[:n]", "OFFSET": "offset",
}  # fmt: skip


def double_back_version(**changes) -> str:
    source = DOUBLE_BACK
    for key, value in {**DOUBLE_BACK_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


BITS = '''
def bits_per_weight(blocksize=64, compress_statistics=True, nested_blocksize=256):
    CHECK
    if not compress_statistics:
        return PLAIN
    if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize < 1:
        raise ValueError("nested_blocksize")
    return NESTED
'''
BITS_RIGHT = {"CHECK": "check_blocksize(blocksize)", "PLAIN": "4 + 32 / blocksize",
              "NESTED": "4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)"}  # fmt: skip


def bits_version(**changes) -> str:
    source = BITS
    for key, value in {**BITS_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "nf4_code_book": {
        "symmetric_16": (code_book_version(
            BUILD="torch.special.ndtri(torch.linspace(1 - offset, offset, 16).double()).float()", NORM="values.max()"),
            "16 quantiles spaced symmetrically"),
        "eight_and_eight": (code_book_version(BUILD="torch.cat([-positive, positive]).float().sort().values"),
                            "8 positive and 8 negative quantiles"),
        "sides_swapped": (code_book_version(BUILD="torch.cat([-positive, torch.zeros(1, dtype=torch.float64), -negative]).float().sort().values"),
                          "sides swapped"),
        "not_normalised": (code_book_version(NORM="1.0"), "not divided by the largest value"),
        "float64_spacing": (code_book_version(POSITIVE_P="torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1]",
                                              NEGATIVE_P="torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1]"),
                            "spaced in float64"),
        "float32_quantiles": (code_book_version(POSITIVE_P="torch.linspace(offset, 0.5, 9)[:-1]",
                                                NEGATIVE_P="torch.linspace(offset, 0.5, 8)[:-1]",
                                                BUILD="torch.cat([negative, torch.zeros(1), positive]).sort().values"),
                              "quantiles taken in float32"),
        "not_sorted": (code_book_version(BUILD="torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()"),
                       "not sorted"),
        "bin_centres": (code_book_version(BUILD="torch.special.ndtri((torch.arange(16) + 0.5).double() / 16).float()"),
                        "centres of 16 equal-probability bins"),
        "hard_coded_table": ('''
def nf4_code_book(offset=0.9677083):
    return torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                         0.7229568362236023, 1.0])
''', "build it from the `offset` argument"),
    },
    "nearest_code_4bit": {
        "argmin": (nearest_version("(scaled[..., None] - code).abs().argmin(dim=-1).to(torch.uint8)"), "argmin of |x - code|"),
        "ties_up": (nearest_version("order[torch.bucketize(scaled, midpoints, right=True)].to(torch.uint8)"), "took the upper code"),
        "sorted_position": (nearest_version("torch.bucketize(scaled, midpoints).to(torch.uint8)"), "not the index into `code`"),
        "floor": (nearest_version("order[(torch.bucketize(scaled, sorted_code, right=True) - 1).clamp(0, 15)].to(torch.uint8)"),
                  "lower neighbour (floor)"),
        "int64_codes": (nearest_version("order[torch.bucketize(scaled, midpoints)]"), "returned dtype int64, expected uint8"),
        "unsorted_midpoints": (nearest_version("torch.bucketize(scaled, ((code[:-1] + code[1:]) / 2).sort().values).to(torch.uint8)"), None),
    },
    "quantize_blockwise_4bit": {
        "low_nibble_first": (quantize_version(PACK="(codes[1::2] << 4) | codes[0::2]"), "LOW nibble"),
        "tensor_absmax_per_block": (quantize_version(ABSMAX="padded.abs().max().expand(blocks).clone()"), "absmax of the whole tensor"),
        "one_absmax": (quantize_version(ABSMAX="padded.abs().max().expand(blocks)", STORED="absmax[:1]"), "one absmax for the whole tensor"),
        "stores_reciprocal": (quantize_version(STORED="1 / absmax"), "1 / absmax stored"),
        "pad_code_zero": (quantize_version(PAD_ZERO="True"), "padded with code 0"),
        "argmin": (quantize_version(NEAREST_CALL="(scaled[:, None] - code).abs().argmin(dim=1).to(torch.uint8)"),
                   "argmin of |x - code| instead of midpoints"),
        "half_precision_division": (quantize_version(FLATTEN="w.reshape(-1)", STORED="absmax.float()"),
                                    "divided in float16"),
        "column_major": (quantize_version(FLATTEN="(w.T if w.dim() == 2 else w).reshape(-1).float()"), "column by column"),
        "flat_packed": (quantize_version(SHAPE=""), "add [:, None]"),
        "nf4_for_fp4": (quantize_version(FP4_CHOICE="quant_type"), "NF4 code book used for quant_type='fp4'"),
        "float64_accepted": (quantize_version(CHECK_WEIGHT="w = w.float()"), "instead of raising TypeError"),
        "symmetric_code_book": (quantize_version().replace(
            "code = nf4_code_book() if", "code = nf4_code_book__symmetric_16() if"), "codes of a wrong code book"),
    },
    "dequantize_blockwise_4bit": {
        "low_nibble_first": (dequantize_version(UNPACK="packed & 0xF, packed >> 4"), "low nibble read first"),
        "divides": (dequantize_version(VALUES="code[codes.long()] / per_element"), "divided by absmax instead of multiplying"),
        "tiled_absmax": (dequantize_version(PER_ELEMENT="absmax.float().repeat(blocksize)[:n]"), "absmax.repeat(blocksize)"),
        "half_precision_math": (dequantize_version(VALUES="code[codes.long()].to(dtype) * per_element.to(dtype)"), "computed in bfloat16"),
        "padding_kept": (dequantize_version(KEEP="", RESHAPE="", PER_ELEMENT="absmax.float().repeat_interleave(blocksize)[:codes.numel()]"),
                         "drop the padding"),
        "no_byte_count_check": (dequantize_version(COUNT_CHECK="False"), "expected ValueError because 256 weights pack into 128 bytes"),
        "codes_not_looked_up": (dequantize_version(VALUES="codes.float() * per_element"), "look them up in the code book"),
    },
    "double_quantize": {
        "mean_not_subtracted": (double_version(CENTRED="absmax"), "the mean not subtracted"),
        "nested_blocks_of_64": (double_version(SIZE="64"), "one per 64 values"),
        "stores_reciprocal": (double_version(STORED="1 / absmax2"), "1 / absmax2 stored"),
        "zero_block_code_127": (double_version(ZERO_CODE="127"), "code of 0.0 (127)"),
        "median_offset": (double_version(OFFSET="absmax.median()"), "median"),
        "one_absmax2": (double_version(ABSMAX2="centred.abs().max().expand(blocks).clone()"), "one absmax2 for all nested blocks"),
        "value_error_for_dtype": (double_version(ABSMAX_ERROR="ValueError"), "raised ValueError; expected TypeError"),
    },
    "double_dequantize": {
        "offset_forgotten": (double_back_version(OFFSET="0"), "offset not added back"),
        "tiled_absmax2": (double_back_version(PER_ELEMENT="absmax2.repeat(blocksize)[:n]"), "repeat(blocksize) (tiles"),
        "divides": (double_back_version().replace("* absmax2", "/ absmax2"), "divided by absmax2"),
        "linear_codes": (double_back_version(MAP="(2 * torch.arange(256) / 255 - 1)"), "evenly spaced values"),
        "unsigned_map": (double_back_version(MAP="dynamic_map(signed=False)"), "unsigned dynamic map"),
        "blocks_of_64": (double_back_version(PER_ELEMENT="absmax2.repeat_interleave(64)[:n]"), "nested blocks of 64"),
    },
    "bits_per_weight": {
        "code_bits_left_out": (bits_version(PLAIN="32 / blocksize", NESTED="8 / blocksize + 32 / (blocksize * nested_blocksize)"),
                               "4 bits of the code itself left out"),
        "fp16_absmax": (bits_version(PLAIN="4 + 16 / blocksize"), "16-bit absmax"),
        "absmax2_per_nested_block": (bits_version(NESTED="4 + 8 / blocksize + 32 / nested_blocksize"), "charged per nested block only"),
        "absmax2_left_out": (bits_version(NESTED="4 + 8 / blocksize"), "absmax2 term left out"),
        "compress_ignored": (bits_version(NESTED="4 + 32 / blocksize"), "double quantization ignored"),
        "bytes": (bits_version(PLAIN="(4 + 32 / blocksize) / 8", NESTED="(4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)) / 8"),
                  "bytes instead of bits"),
        "no_block_check": (bits_version(CHECK="pass"), "instead of raising ValueError"),
    },
}  # fmt: skip

CORRECT = {
    "nf4_code_book": {
        "erfinv": '''
def nf4_code_book(offset=0.9677083):
    # Phi^-1(p) = sqrt(2) erfinv(2p - 1), in float64, on float32-spaced probabilities
    p_pos = torch.linspace(offset, 0.5, 9)[:-1].double()
    p_neg = torch.linspace(offset, 0.5, 8)[:-1].double()
    q_pos = math.sqrt(2) * torch.erfinv(2 * p_pos - 1)
    q_neg = -math.sqrt(2) * torch.erfinv(2 * p_neg - 1)
    table = torch.sort(torch.cat([q_pos, q_neg, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)).values
    return table / table[-1]
''',
        "normal_dist": '''
def nf4_code_book(offset=0.9677083):
    from statistics import NormalDist
    normal = NormalDist()
    positive = [normal.inv_cdf(p) for p in torch.linspace(offset, 0.5, 9).tolist()[:-1]]
    negative = [-normal.inv_cdf(p) for p in torch.linspace(offset, 0.5, 8).tolist()[:-1]]
    values = torch.tensor(sorted(negative + [0.0] + positive), dtype=torch.float32)
    return values / values.max()
''',
    },
    "nearest_code_4bit": {
        "count_midpoints": '''
def nearest_code_4bit(scaled, code):
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    midpoints = (ordered[1:] + ordered[:-1]) * 0.5
    position = (scaled.unsqueeze(-1) > midpoints).sum(dim=-1)  # midpoints strictly below
    return order[position].to(torch.uint8)
''',
        "searchsorted": '''
def nearest_code_4bit(scaled, code):
    values, order = code.sort(stable=True)
    edges = values[:-1] + (values[1:] - values[:-1]) / 2
    return order[torch.searchsorted(edges, scaled.contiguous(), right=False)].byte()
''',
    },
    "quantize_blockwise_4bit": {
        "reciprocal_loop": '''
def quantize_blockwise_4bit(w, blocksize=64, quant_type="nf4"):
    check_weight(w)
    check_blocksize(blocksize)
    book = {"nf4": nf4_code_book, "fp4": fp4_code_book}[check_quant_type(quant_type)]()
    flat = w.flatten().to(torch.float32)
    absmax, parts = [], []
    for start in range(0, flat.numel(), blocksize):  # every block times the reciprocal of its absmax
        block = flat[start:start + blocksize]
        a = block.abs().max()
        absmax.append(a)
        parts.append(block * (1.0 / a) if a > 0 else torch.zeros_like(block))
    scaled = torch.cat(parts + ([torch.zeros(1)] if flat.numel() % 2 else []))
    codes = nearest_code_4bit(scaled, book).reshape(-1, 2)
    return (codes[:, 0] * 16 + codes[:, 1]).to(torch.uint8).reshape(-1, 1), torch.stack(absmax)
''',
        "bitsandbytes_exact": '''
def quantize_blockwise_4bit(w, blocksize=64, quant_type="nf4"):
    # bitsandbytes' own arithmetic: full blocks times 1/absmax, the short tail divided, its absmax floored
    check_weight(w)
    check_blocksize(blocksize)
    book = nf4_code_book() if check_quant_type(quant_type) == "nf4" else fp4_code_book()
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail).clamp(-1, 1)])
    codes = nearest_code_4bit(F.pad(scaled, (0, n % 2)), book)
    return (codes[0::2] << 4 | codes[1::2]).unsqueeze(1), absmax
''',
    },
    "dequantize_blockwise_4bit": {
        "block_index": '''
def dequantize_blockwise_4bit(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.float32):
    check_blocksize(blocksize)
    book = nf4_code_book() if check_quant_type(quant_type) == "nf4" else fp4_code_book()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {dtype}")
    n = 1
    for size in shape:
        n *= size
    data = packed.flatten()
    if 2 * data.numel() - n not in (0, 1):
        raise ValueError("packed does not match shape")
    if absmax.dim() != 1 or absmax.numel() != -(-n // blocksize):
        raise ValueError("absmax does not match shape and blocksize")
    codes = torch.empty(2 * data.numel(), dtype=torch.long)
    codes[0::2], codes[1::2] = data // 16, data % 16
    index = torch.arange(n) // blocksize
    return (book[codes[:n]] * absmax[index]).to(dtype).view(*shape)
''',
        "block_loop": '''
def dequantize_blockwise_4bit(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.float32):
    check_blocksize(blocksize)
    book = fp4_code_book() if check_quant_type(quant_type) == "fp4" else nf4_code_book()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("dtype")
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError("bytes")
    if tuple(absmax.shape) != ((n + blocksize - 1) // blocksize,):
        raise ValueError("absmax")
    bytes_ = packed.reshape(-1).long()
    codes = torch.stack([bytes_ >> 4, bytes_ & 15], dim=-1).flatten()[:n]
    out = torch.empty(n, dtype=torch.float32)
    for b in range(absmax.numel()):
        part = slice(b * blocksize, min(n, (b + 1) * blocksize))
        out[part] = book[codes[part]] * absmax[b]
    return out.to(dtype).reshape(shape)
''',
    },
    "double_quantize": {
        "block_loop_divide": '''
def double_quantize(absmax, blocksize=256):
    if not (isinstance(absmax, torch.Tensor) and absmax.dtype == torch.float32 and absmax.ndim == 1 and absmax.numel()):
        raise TypeError("absmax must be a non-empty 1-D float32 tensor")
    if type(blocksize) is not int or blocksize <= 0:
        raise ValueError("blocksize must be a positive int")
    offset = absmax.sum() / absmax.numel()
    centred = absmax - offset
    codes, absmax2 = [], []
    for start in range(0, centred.numel(), blocksize):
        block = centred[start:start + blocksize]
        a = block.abs().max()
        absmax2.append(a)
        codes.append(nearest_code_8bit(block / a, dynamic_map()) if a > 0 else torch.zeros(block.numel(), dtype=torch.uint8))
    return torch.cat(codes), torch.stack(absmax2), offset
''',
        "padded_reciprocal": '''
def double_quantize(absmax, blocksize=256):
    if not isinstance(absmax, torch.Tensor) or absmax.dtype is not torch.float32 or list(absmax.shape) in ([], [0]) or absmax.dim() > 1:
        raise TypeError("absmax")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError("blocksize")
    offset = absmax.mean()
    n = absmax.numel()
    blocks = -(-n // blocksize)
    centred = torch.zeros(blocks * blocksize)
    centred[:n] = absmax - offset
    centred = centred.view(blocks, blocksize)
    absmax2 = centred.abs().amax(dim=1)
    inverse = torch.where(absmax2 > 0, 1.0 / absmax2, 0.0)
    codes = nearest_code_8bit(centred * inverse[:, None], dynamic_map())
    codes = torch.where((absmax2 > 0)[:, None], codes, torch.zeros_like(codes))
    return codes.flatten()[:n], absmax2, offset
''',
    },
    "double_dequantize": {
        "block_index": '''
def double_dequantize(codes, absmax2, offset, blocksize=256):
    block = torch.arange(codes.numel()) // blocksize
    return offset + dynamic_map()[codes.long()] * absmax2[block]
''',
        "block_loop": '''
def double_dequantize(codes, absmax2, offset, blocksize=256):
    table = dynamic_map()
    out = torch.empty(codes.numel())
    for b in range(absmax2.numel()):
        part = slice(b * blocksize, (b + 1) * blocksize)
        out[part] = table[codes[part].long()] * absmax2[b] + offset
    return out
''',
    },
    "bits_per_weight": {
        "counted_bits": '''
def bits_per_weight(blocksize=64, compress_statistics=True, nested_blocksize=256):
    check_blocksize(blocksize)
    if compress_statistics and (isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize < 1):
        raise ValueError("nested_blocksize must be a positive integer")
    n = blocksize * (nested_blocksize if compress_statistics else 1) * 1000  # whole blocks of every level
    blocks = n // blocksize
    bits = 4 * n + (8 * blocks + 32 * (blocks // nested_blocksize) if compress_statistics else 32 * blocks)
    return bits / n
''',
        "fractions": '''
def bits_per_weight(blocksize=64, compress_statistics=True, nested_blocksize=256):
    from fractions import Fraction
    check_blocksize(blocksize)
    bits = Fraction(4)
    if not compress_statistics:
        return float(bits + Fraction(32, blocksize))
    if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise ValueError("nested_blocksize")
    return float(bits + Fraction(8, blocksize) + Fraction(32, blocksize * nested_blocksize))
''',
    },
}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab03")) as box:
        yield box


@pytest.mark.slow
@pytest.mark.parametrize("function, version", [(f, v) for f, versions in WRONG.items() for v in versions])
def test_wrong_version_loses_points(sandbox, function, version):
    check_loses_points(grade_version(LAB, sandbox, function, version), f"{function}__{version}", WRONG[function][version][1])


@pytest.mark.slow
@pytest.mark.parametrize("function, version", [(f, v) for f, versions in CORRECT.items() for v in versions] + [(f, None) for f in WRONG])
def test_correct_version_gets_full_marks(sandbox, function, version):
    check_full_marks(grade_version(LAB, sandbox, function, version))


def test_catalog_covers_every_graded_function():
    check_catalog_covers(LAB, WRONG, CORRECT)


@pytest.mark.slow
def test_given_helpers_behave_like_the_reference(sandbox):
    """The helpers the notebook gives (code books, dynamic map, 8-bit search, checks) are the
    reference's, so a learner who calls them is graded against the same arithmetic."""
    assert torch.equal(sandbox.call("fp4_code_book"), nf4.fp4_code_book())
    assert torch.equal(sandbox.call("fp4_code_book").signbit(), nf4.fp4_code_book().signbit())
    for signed in (True, False):
        assert torch.equal(sandbox.call("dynamic_map", signed), nf4.dynamic_map(signed))
    normed = torch.cat([torch.linspace(-1, 1, 5001), torch.rand(3000, generator=torch.Generator().manual_seed(0)) * 2 - 1])
    assert torch.equal(sandbox.call("nearest_code_8bit", normed, nf4.dynamic_map()), nf4.nearest_code_8bit(normed, nf4.dynamic_map()))
    bad = [torch.arange(4), torch.ones(3, dtype=torch.float64), torch.empty(0), torch.tensor([1.0, float("inf")]), [1.0]]
    for w in bad:
        with pytest.raises(Exception) as reference_error:
            nf4.check_weight(w)
        with pytest.raises(LearnerError, match=f" raised {type(reference_error.value).__name__}:"):
            sandbox.call("check_weight", w)
    for blocksize in (16, 48, 8192, True, 64.5):
        with pytest.raises(ValueError):
            nf4.check_blocksize(blocksize)
        with pytest.raises(LearnerError, match=" raised ValueError:"):
            sandbox.call("check_blocksize", blocksize)
    assert [sandbox.call("check_blocksize", b) for b in nf4.BLOCKSIZES] == list(nf4.BLOCKSIZES)


@pytest.mark.slow
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_reference_raises():
    """The exception types the suite expects are those the reference raises for the same input."""
    suite = engine.load_suite(LAB)
    w = suite.weights((4, 64), 360)
    for args, error in [((w.double(), 64, "nf4"), TypeError), ((torch.arange(64, dtype=torch.int32), 64, "nf4"), TypeError),
                        ((torch.empty(0, 64), 64, "nf4"), ValueError), ((torch.tensor([0.1, float("nan")]), 64, "nf4"), ValueError),
                        ((w, 100, "nf4"), ValueError), ((w, 64, "int4"), ValueError)]:  # fmt: skip
        with pytest.raises(error):
            nf4.quantize_blockwise_4bit(*args)
    packed, absmax, shape = suite.quantized((4, 64), 430)
    for args, error in [((packed[:-1], absmax, shape, 64), ValueError), ((packed, absmax[:-1], shape, 64), ValueError),
                        ((packed, absmax, shape, 32), ValueError), ((packed, absmax, shape, 100), ValueError),
                        ((packed, absmax, shape, 64, "int4"), ValueError), ((packed, absmax, shape, 64, "nf4", torch.int8), TypeError)]:  # fmt: skip
        with pytest.raises(error):
            nf4.dequantize_blockwise_4bit(*args)
    absmax = suite.absmax_of((8, 64), 460)
    for args, error in [((absmax.double(),), TypeError), ((absmax.reshape(2, 4),), TypeError), ((torch.empty(0),), TypeError),
                        ((absmax.tolist(),), TypeError), ((absmax, 0), ValueError), ((absmax, -256), ValueError)]:  # fmt: skip
        with pytest.raises(error):
            nf4.double_quantize(*args)
    for args in [(100,), (48, False), (64, True, 0)]:
        with pytest.raises(ValueError):
            nf4.bits_per_weight(*args)


def test_test_cells_match_the_suite():
    check_test_cells_match_the_suite(LAB, NOTEBOOK)


def test_points_and_metadata():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    manual = sum(meta["points"] for _, meta in nbgrader_cells(notebook, "manual"))
    assert manual > 0 and sum(suite_points(LAB).values()) + manual >= 100
    assert notebook.metadata["quantcourse"] == {"lab": LAB}
    assert notebook.metadata["kernelspec"]["name"] == "quantcourse"
    ids = [c.metadata["nbgrader"]["grade_id"] for c in notebook.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), "grade_id values must be unique"
    assert notebook.cells[-1].source.strip() == "report()"


def test_graded_functions_have_the_reference_signatures():
    """Same names, parameters and defaults as reference_impl/nf4.py (the lab promises it)."""
    import ast
    import inspect

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    defined = {}
    for cell in notebook.cells:
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.FunctionDef):
                    defined[node.name] = [a.arg for a in node.args.args], [ast.literal_eval(d) if not isinstance(d, ast.Attribute)
                                                                          else ast.unparse(d) for d in node.args.defaults]  # fmt: skip
    for name in engine.load_suite(LAB).GRADED:
        parameters = inspect.signature(getattr(nf4, name)).parameters.values()
        names = [p.name for p in parameters]
        defaults = [p.default if not isinstance(p.default, torch.dtype) else str(p.default)
                    for p in parameters if p.default is not inspect.Parameter.empty]  # fmt: skip
        assert defined[name] == (names, defaults), (name, defined[name], names, defaults)


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    check_solution_cells_hold_only(NOTEBOOK)
