"""Mutation catalog of lab 10: the hidden suite must fail plausible wrong kernels for every graded
launcher and pass other correct ones; the lab notebook must hold together (points, outputs, the
source at full marks, the student version at zero); the bad inputs the suite feeds must make the
course's own launchers raise the exception types the suite expects.

All versions live in one notebook: the source notebook plus one cell per version, whose launcher
is renamed `unpack_int32__reversed` and whose kernels and helpers end in `__V`, made unique per
version. A single learner process serves them all (TRITON_INTERPRET=1, set by the sandbox) and
`aliases` points the suite's `learner.unpack_int32` at the version under test. Versions call the
notebook's correct helpers (`unpack_int4`, `group_scale_zero`, `check_int4_weight`) unless the
mistake is in the helper, so each mutant breaks one thing.
"""

from pathlib import Path

import nbformat
import pytest
import torch

import lab_catalog
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

LAB = "10_triton"
NOTEBOOK = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"

UNPACK = '''
@triton.jit
def _kernel__V(packed_ptr, codes_ptr, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    word_rows = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    words = tl.load(packed_ptr + word_rows[:, None] * N + offs_n[None, :], mask=(word_rows < K // 8)[:, None] & n_ok[None, :], other=0)
    codes = UNPACK_CODES
    tl.store(codes_ptr + offs_k[:, None] * N + offs_n[None, :], codes.to(tl.uint8), mask=STORE_MASK)


def unpack_int32(packed, bits, K):
    if bits != 4:
        raise ValueError("bits")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.dim() != 2:
        raise TypeError("packed")
    if K % 8 or packed.shape[0] * 8 != K:
        raise ValueError("K")
    N = packed.shape[1]
    codes = torch.zeros(K, N, dtype=torch.uint8)
    _kernel__V[GRID](packed, codes, K, N, BLOCK_K=32, BLOCK_N=16)
    return codes
'''
UNPACK_RIGHT = {
    "UNPACK_CODES": "unpack_int4(words, BLOCK_K, BLOCK_N)",
    "STORE_MASK": "(offs_k < K)[:, None] & n_ok[None, :]",
    "GRID": "(triton.cdiv(K, 32), triton.cdiv(N, 16))",
}
SHIFT_8 = "tl.reshape((words[:, None, :] >> (SHIFTS)[None, :, None]) MASK, (BLOCK_K, BLOCK_N))"


def unpack_version(**changes) -> str:
    source = UNPACK
    for key, value in {**UNPACK_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


ZEROS = '''
@triton.jit
def _kernel__V(qzeros_ptr, zeros_ptr, N, BLOCK_N: tl.constexpr):
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    words = tl.load(qzeros_ptr + g * (N // 8) + WORD, mask=n_ok, other=0)
    zeros = (words >> (4 * (NIBBLE))) & 0xF
    tl.store(zeros_ptr + g * N + offs_n, (zeros PLUS).to(tl.float32), mask=STORE_MASK)


def unpack_zeros(qzeros, groups, N):
    if qzeros is None:
        return torch.full((groups, N), SYMMETRIC)
    if not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.int32 or qzeros.dim() != 2:
        raise TypeError("qzeros")
    if N % 8 or qzeros.shape[1] * 8 != N:
        raise ValueError("N")
    zeros = torch.zeros(qzeros.shape[0], N)
    _kernel__V[(qzeros.shape[0], GRID_N)](qzeros, zeros, N, BLOCK_N=16)
    return zeros
'''
ZEROS_RIGHT = {
    "WORD": "offs_n // 8", "NIBBLE": "offs_n % 8", "PLUS": "", "SYMMETRIC": "8.0",
    "STORE_MASK": "n_ok", "GRID_N": "triton.cdiv(N, 16)",
}  # fmt: skip


def zeros_version(**changes) -> str:
    source = ZEROS
    for key, value in {**ZEROS_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


DEQUANT = '''
@triton.jit
def _kernel__V(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, out_ptr, N, K, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
               HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    word_rows = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, n_ok = offs_k < K, offs_n < N
    words = tl.load(qweight_ptr + word_rows[:, None] * N + offs_n[None, :], mask=(word_rows < K // 8)[:, None] & n_ok[None, :], other=0)
    codes = UNPACK_CODES
    if HAS_G_IDX:
        groups = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
    else:
        groups = GROUPS
    ok = k_ok[:, None] & n_ok[None, :]
    scale = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=SCALE_MASK, other=0.0)SCALE_TYPE
    if HAS_ZEROS:
        zw = tl.load(qzeros_ptr + groups[:, None] * (N // 8) + (offs_n // 8)[None, :], mask=ok, other=0)
        zero = (zw >> (4 * (offs_n % 8))[None, :]) & 0xF
    else:
        zero = tl.full(scale.shape, SYMMETRIC, tl.int32)
    w = FORMULA
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_int4(qweight, scales, qzeros=None, group_size=128, g_idx=None, dtype=torch.float32):
    N, K, group = check_int4_weight(qweight, scales, qzeros, g_idx, group_size)
    out = torch.zeros(N, K, dtype=dtype)
    _kernel__V[(triton.cdiv(K, 32), GRID_N)](
        qweight, scales, qweight if qzeros is None else qzeros, qweight if g_idx is None else g_idx, out, N, K,
        GROUP=group, HAS_ZEROS=qzeros is not None, HAS_G_IDX=USE_G_IDX, BLOCK_K=32, BLOCK_N=16)
    return out
'''
DEQUANT_RIGHT = {
    "UNPACK_CODES": "unpack_int4(words, BLOCK_K, BLOCK_N)", "GROUPS": "offs_k // GROUP", "SCALE_MASK": "ok",
    "SCALE_TYPE": ".to(tl.float32)", "SYMMETRIC": "8", "FORMULA": "(codes - zero) * scale",
    "GRID_N": "triton.cdiv(N, 16)", "USE_G_IDX": "g_idx is not None",
}  # fmt: skip


def dequant_version(**changes) -> str:
    source = DEQUANT
    for key, value in {**DEQUANT_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


GEMV = '''
@triton.jit
def _kernel__V(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr, N, K, GROUP: tl.constexpr,
               HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=ACC_TYPE)
    for k0 in range(0, LOOP_END, BLOCK_K):
        word_rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        words = tl.load(qweight_ptr + word_rows[:, None] * N + offs_n[None, :], mask=(word_rows < K // 8)[:, None] & n_ok[None, :], other=0)
        codes = UNPACK_CODES.to(tl.float32)
        if HAS_G_IDX:
            groups = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
        else:
            groups = GROUPS
        ok = k_ok[:, None] & n_ok[None, :]
        scale, zero = group_scale_zero(scales_ptr, qzeros_ptr, groups, offs_n, ok, N, HAS_ZEROS)
        x = X_LOAD
        acc += PRODUCT
    if ADD_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def w4a16_gemv(x, qweight, scales, qzeros=None, g_idx=None, group_size=128, bias=None):
    N, K, group = check_int4_weight(qweight, scales, qzeros, g_idx, group_size)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("x")
    if X_CHECK:
        raise ValueError("x")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError("bias")
    x = x.contiguous()
    out = torch.zeros(N, dtype=x.dtype)
    _kernel__V[(triton.cdiv(N, 16),)](
        x, qweight, scales, qweight if qzeros is None else qzeros, qweight if g_idx is None else g_idx,
        out if bias is None else bias, out, N, K, GROUP=group, HAS_ZEROS=qzeros is not None,
        HAS_G_IDX=g_idx is not None, HAS_BIAS=bias is not None, BLOCK_K=32, BLOCK_N=16)
    return out.reshape(*x.shape[:-1], N)
'''
GEMV_RIGHT = {
    "ACC_TYPE": "tl.float32", "LOOP_END": "K", "UNPACK_CODES": "unpack_int4(words, BLOCK_K, BLOCK_N)",
    "GROUPS": "offs_k // GROUP", "X_LOAD": "tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)",
    "PRODUCT": "tl.sum((codes - zero) * scale * x[:, None], axis=0)", "ADD_BIAS": "HAS_BIAS",
    "X_CHECK": "x.dim() == 0 or x.shape[-1] != K or x.numel() != K",
}  # fmt: skip


def gemv_version(**changes) -> str:
    source = GEMV
    for key, value in {**GEMV_RIGHT, **changes}.items():
        source = source.replace(key, value)
    return source


REVERSED = SHIFT_8.replace("SHIFTS", "4 * (7 - tl.arange(0, 8))").replace("MASK", "& 0xF")

# function -> {version: (source, substring the feedback must contain, or None)}
WRONG = {
    "unpack_int32": {
        "reversed": (unpack_version(UNPACK_CODES=REVERSED), "nibbles read highest first"),
        "stacked": (unpack_version(UNPACK_CODES="tl.reshape((words[None, :, :] >> (4 * tl.arange(0, 8))[:, None, None]) & 0xF, (BLOCK_K, BLOCK_N))"),
                    "(BLOCK_K = 32?)"),
        "no_mask": (unpack_version(UNPACK_CODES=SHIFT_8.replace("SHIFTS", "4 * tl.arange(0, 8)").replace("MASK", "")),
                    "next nibble leaks"),
        "mask_before_shift": (unpack_version(UNPACK_CODES="tl.reshape((words[:, None, :] & (0xF << (4 * tl.arange(0, 8)))[None, :, None]) >> (4 * tl.arange(0, 8))[None, :, None], (BLOCK_K, BLOCK_N))"),
                              "copies the sign bit"),
        "floor_grid": (unpack_version(GRID="(K // 32, N // 16)"), "was never computed"),
        "store_unmasked": (unpack_version(STORE_MASK="offs_k[:, None] < K"), "out-of-bounds tl.store"),
        "type_error_for_bits": (unpack_version().replace('raise ValueError("bits")', 'raise TypeError("bits")'),
                                "raised TypeError; expected ValueError"),
    },
    "unpack_zeros": {
        "reversed": (zeros_version(NIBBLE="7 - offs_n % 8"), "read highest first"),
        "stacked": (zeros_version(WORD="offs_n % (N // 8)", NIBBLE="offs_n // (N // 8)"), "nibble n // (N/8)"),
        "by_group": (zeros_version(NIBBLE="g % 8"), "wrong axis"),
        "v1": (zeros_version(PLUS="+ 1"), "AutoGPTQ's v1"),
        "symmetric_zero": (zeros_version(SYMMETRIC="0.0"), "zero point 0 for a symmetric grid"),
        "floor_grid": (zeros_version(GRID_N="N // 16"), "was never computed"),
        "store_unmasked": (zeros_version(STORE_MASK="offs_n >= 0"), "out-of-bounds"),
    },
    "dequantize_int4": {
        "reversed": (dequant_version(UNPACK_CODES=REVERSED), "nibbles read highest first"),
        "symmetric_zero": (dequant_version(SYMMETRIC="0"), "zero point 0 for a symmetric grid"),
        "zeros_ignored": (dequant_version().replace("if HAS_ZEROS:", "if False:"), "qzeros ignored"),
        "zeros_by_group": (dequant_version().replace("4 * (offs_n % 8))[None, :]", "4 * (groups % 8))[:, None]"), "wrong axis"),
        "word_row_group": (dequant_version(GROUPS="(offs_k // 8) // GROUP"), "the group of word row"),
        "zero_not_scaled": (dequant_version(FORMULA="codes * scale - zero"), "subtracted before scaling"),
        "float16_math": (dequant_version(SCALE_TYPE="", FORMULA="(codes - zero) * scale"), "computed in float16"),
        "g_idx_ignored": (dequant_version(USE_G_IDX="False"), "g_idx ignored"),
        "scales_unmasked": (dequant_version(SCALE_MASK="n_ok[None, :]"), "out-of-bounds tl.load"),
        "floor_grid": (dequant_version(GRID_N="N // 16"), "was never computed"),
    },
    "w4a16_gemv": {
        "float16_accumulator": (gemv_version(
            ACC_TYPE="x_ptr.dtype.element_ty",
            X_LOAD="tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)",
            PRODUCT="tl.sum(((codes - zero) * scale).to(x_ptr.dtype.element_ty) * x[:, None], axis=0)"), "float16 accumulator"),
        "bias_forgotten": (gemv_version(ADD_BIAS="False"), "bias forgotten"),
        "reversed": (gemv_version(UNPACK_CODES=REVERSED), "nibbles read highest first"),
        "x_unmasked": (gemv_version(X_LOAD="tl.load(x_ptr + offs_k).to(tl.float32)"), "out-of-bounds tl.load"),
        "last_tile_skipped": (gemv_version(LOOP_END="K - BLOCK_K + 1"), "last, partial tile of K (BLOCK_K = "),
        "word_row_group": (gemv_version(GROUPS="(offs_k // 8) // GROUP"), "the group of word row"),
        "two_rows_accepted": (gemv_version(X_CHECK="x.shape[-1] != K"), "expected ValueError because the GEMV takes one row"),
    },
}

CORRECT = {
    "unpack_int32": {
        "row_pointers": '''
@triton.jit
def _kernel__V(packed_ptr, codes_ptr, K, N, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # each code row points at its own word and shift: no 3-D block, no reshape
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(packed_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=ok, other=0)
    codes = (words >> (4 * (offs_k % 8))[:, None]) & 0xF
    tl.store(codes_ptr + offs_k[:, None] * N + offs_n[None, :], codes.to(tl.uint8), mask=ok)


def unpack_int32(packed, bits, K):
    if bits not in (2, 3, 4, 8) or bits != 4:
        raise ValueError("only 4-bit codes")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.ndim != 2:
        raise TypeError("packed must be 2-D int32")
    if K % 8 != 0 or K != 8 * packed.shape[0]:
        raise ValueError("K does not match")
    codes = torch.empty(K, packed.shape[1], dtype=torch.uint8)
    grid = (triton.cdiv(K, 16), triton.cdiv(packed.shape[1], 64))
    _kernel__V[grid](packed, codes, K, packed.shape[1], BLOCK_K=16, BLOCK_N=64)
    return codes
''',
        "one_axis_grid_nibble_loop": '''
@triton.jit
def _kernel__V(packed_ptr, codes_ptr, K, N, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    # a 1-D grid over tiles of BLOCK_W words, and one strided store per nibble position
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_w, pid_n = tl.program_id(0) // tiles_n, tl.program_id(0) % tiles_n
    rows = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows < K // 8)[:, None] & (offs_n < N)[None, :]
    words = tl.load(packed_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0)
    for j in tl.static_range(8):
        code = (words >> (4 * j)) & 0xF
        tl.store(codes_ptr + (8 * rows + j)[:, None] * N + offs_n[None, :], code.to(tl.uint8), mask=ok)


def unpack_int32(packed, bits, K):
    if bits != 4:
        raise ValueError("bits must be 4")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.ndim != 2:
        raise TypeError("packed")
    if K % 8 or packed.shape[0] != K // 8:
        raise ValueError("K")
    N = packed.shape[1]
    codes = torch.empty(K, N, dtype=torch.uint8)
    _kernel__V[(triton.cdiv(K // 8, 4) * triton.cdiv(N, 8),)](packed, codes, K, N, BLOCK_W=4, BLOCK_N=8)
    return codes
''',
    },
    "unpack_zeros": {
        "word_tile_reshape": '''
@triton.jit
def _kernel__V(qzeros_ptr, zeros_ptr, G, W, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr):
    # a tile of words [BLOCK_G, BLOCK_W], each expanded into its 8 columns
    rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (rows < G)[:, None] & (cols < W)[None, :]
    words = tl.load(qzeros_ptr + rows[:, None] * W + cols[None, :], mask=ok, other=0)
    nib = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF
    n = 8 * cols[:, None] + tl.arange(0, 8)[None, :]
    out = tl.reshape(nib, (BLOCK_G, BLOCK_W * 8)).to(tl.float32)
    n_flat = tl.reshape(n, (BLOCK_W * 8,))
    ok8 = (rows < G)[:, None] & (n_flat < 8 * W)[None, :]
    tl.store(zeros_ptr + rows[:, None] * (8 * W) + n_flat[None, :], out, mask=ok8)


def unpack_zeros(qzeros, groups, N):
    if qzeros is None:
        return 8.0 * torch.ones(groups, N)
    if not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.int32 or qzeros.dim() != 2:
        raise TypeError("qzeros")
    if N % 8 != 0 or N // 8 != qzeros.shape[1]:
        raise ValueError("N")
    G, W = qzeros.shape
    zeros = torch.empty(G, N)
    _kernel__V[(triton.cdiv(G, 2), triton.cdiv(W, 4))](qzeros, zeros, G, W, BLOCK_G=2, BLOCK_W=4)
    return zeros
''',
        "group_loop": '''
@triton.jit
def _kernel__V(qzeros_ptr, zeros_ptr, N, BLOCK_N: tl.constexpr):
    # one program per group, looping over its columns
    g = tl.program_id(0)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        word = tl.load(qzeros_ptr + g * (N // 8) + n // 8, mask=n < N, other=0)
        tl.store(zeros_ptr + g * N + n, ((word >> ((n % 8) * 4)) & 15).to(tl.float32), mask=n < N)


def unpack_zeros(qzeros, groups, N):
    if qzeros is None:
        return torch.full((groups, N), 8.0)
    if not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.int32 or qzeros.dim() != 2:
        raise TypeError("qzeros")
    if N % 8 or qzeros.shape[1] * 8 != N:
        raise ValueError("N")
    zeros = torch.empty(qzeros.shape[0], N)
    _kernel__V[(qzeros.shape[0],)](qzeros, zeros, N, BLOCK_N=32)
    return zeros
''',
    },
    "dequantize_int4": {
        "clamped_groups_other_order": '''
@triton.jit
def _kernel__V(qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, out_ptr, N, K, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
               HAS_G_IDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # codes from per-row word pointers; groups clamped into range instead of masked; c*s - z*s
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    words = tl.load(qweight_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :], mask=ok, other=0)
    codes = ((words >> (4 * (offs_k % 8))[:, None]) & 0xF).to(tl.float32)
    if HAS_G_IDX:
        groups = tl.load(g_idx_ptr + tl.minimum(offs_k, K - 1))
    else:
        groups = tl.minimum(offs_k, K - 1) // GROUP
    n_safe = tl.minimum(offs_n, N - 1)
    scale = tl.load(scales_ptr + groups[:, None] * N + n_safe[None, :]).to(tl.float32)
    if HAS_ZEROS:
        zero = ((tl.load(qzeros_ptr + groups[:, None] * (N // 8) + (n_safe // 8)[None, :]) >> (4 * (n_safe % 8))[None, :]) & 0xF).to(tl.float32)
    else:
        zero = 8.0
    w = codes * scale - zero * scale
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_int4(qweight, scales, qzeros=None, group_size=128, g_idx=None, dtype=torch.float32):
    N, K, group = check_int4_weight(qweight, scales, qzeros, g_idx, group_size)
    out = torch.empty(N, K, dtype=dtype)
    _kernel__V[(triton.cdiv(N, 32), triton.cdiv(K, 16))](
        qweight, scales, qzeros if qzeros is not None else scales, g_idx if g_idx is not None else scales, out, N, K,
        GROUP=group, HAS_ZEROS=qzeros is not None, HAS_G_IDX=g_idx is not None, BLOCK_K=16, BLOCK_N=32)
    return out
''',
        "via_unpack_launchers": '''
@triton.jit
def _kernel__V(codes_ptr, scales_ptr, zeros_ptr, groups_ptr, out_ptr, N, K, BLOCK: tl.constexpr):
    # a second pass over codes [K, N] uint8 and zero points [G, N] already unpacked by the two
    # earlier launchers: one flat block of BLOCK elements of W [N, K] per program
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N * K
    n, k = i // K, i % K
    g = tl.load(groups_ptr + k, mask=ok, other=0)
    code = tl.load(codes_ptr + k * N + n, mask=ok, other=0).to(tl.float32)
    zero = tl.load(zeros_ptr + g * N + n, mask=ok, other=0.0)
    scale = tl.load(scales_ptr + g * N + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, (scale * (code - zero)).to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_int4(qweight, scales, qzeros=None, group_size=128, g_idx=None, dtype=torch.float32):
    N, K, group = check_int4_weight(qweight, scales, qzeros, g_idx, group_size)
    codes = unpack_int32(qweight, 4, K)
    zeros = unpack_zeros(qzeros, K // group, N)
    groups = (torch.arange(K) // group).to(torch.int32) if g_idx is None else g_idx
    out = torch.empty(N, K, dtype=dtype)
    _kernel__V[(triton.cdiv(N * K, 256),)](codes, scales, zeros, groups, out, N, K, BLOCK=256)
    return out
''',
    },
    "w4a16_gemv": {
        "nibble_loop": '''
@triton.jit
def _kernel__V(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr, N, K, GROUP: tl.constexpr,
               HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # word rows at a time; code j of each word meets its own x; acc [BLOCK_W, BLOCK_N] summed at the end
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
    for w0 in range(0, K // 8, BLOCK_W):
        rows = w0 + tl.arange(0, BLOCK_W)
        ok = (rows < K // 8)[:, None] & n_ok[None, :]
        words = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0)
        for j in tl.static_range(8):
            k = 8 * rows + j
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + k, mask=k < K, other=0)
            else:
                g = k // GROUP
            scale, zero = group_scale_zero(scales_ptr, qzeros_ptr, g, offs_n, ok, N, HAS_ZEROS)
            xj = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
            acc += (((words >> (4 * j)) & 0xF).to(tl.float32) - zero) * scale * xj[:, None]
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def w4a16_gemv(x, qweight, scales, qzeros=None, g_idx=None, group_size=128, bias=None):
    N, K, group = check_int4_weight(qweight, scales, qzeros, g_idx, group_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == torch.float64:
        raise TypeError("x must be float16/bfloat16/float32")
    if x.numel() != K or x.shape[-1] != K:
        raise ValueError("x must be one row of K")
    if bias is not None and bias.shape != (N,):
        raise ValueError("bias must be [N]")
    y = torch.empty(N, dtype=x.dtype)
    _kernel__V[(triton.cdiv(N, 64),)](
        x.contiguous(), qweight, scales, qzeros if qzeros is not None else qweight, g_idx if g_idx is not None else qweight,
        bias if bias is not None else y, y, N, K, GROUP=group, HAS_ZEROS=qzeros is not None, HAS_G_IDX=g_idx is not None,
        HAS_BIAS=bias is not None, BLOCK_W=4, BLOCK_N=64)
    return y.reshape(x.shape[:-1] + (N,))
''',
        "fp16_weights_fp32_sum": gemv_version(
            PRODUCT="tl.sum(((codes - zero) * scale).to(x_ptr.dtype.element_ty).to(tl.float32) * x[:, None], axis=0)"),
    },
}


def renamed(source: str, function: str, version: str) -> str:
    """lab_catalog.renamed, and kernels named `..._kernel__V` made unique per version."""
    return lab_catalog.renamed(source, function, version).replace("__V", f"__{function}__{version}")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with versions_sandbox(NOTEBOOK, WRONG, CORRECT, tmp_path_factory.mktemp("lab10"), rename=renamed) as box:
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
def test_source_notebook_gets_full_marks_and_student_version_zero(tmp_path):
    check_source_and_student_notebooks(LAB, NOTEBOOK, tmp_path)


def test_bad_inputs_raise_what_the_references_raise(monkeypatch):
    """The exception types the suite expects are those the course's own launchers raise."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels' device check reads it at call time
    from quantcourse.kernels.quantize import dequantize_int4
    from quantcourse.kernels.w4a16 import w4a16_gemv
    from quantcourse.reference_impl import packing, w4a16

    suite = engine.load_suite(LAB)
    packed = suite.pack_codes(torch.randint(0, 16, (16, 3), generator=suite.generator(1)))
    for args, error in [((packed, 5, 16), ValueError), ((packed.long(), 4, 16), TypeError),
                        ((packed, 4, 20), ValueError), ((packed, 4, 24), ValueError)]:  # fmt: skip
        with pytest.raises(error):
            packing.unpack_int32(*args)
    qzeros = suite.pack_zeros(torch.randint(0, 16, (2, 16), generator=suite.generator(2)))
    for args, error in [((qzeros, 2, 12), ValueError), ((qzeros, 2, 24), ValueError), ((qzeros.long(), 2, 16), TypeError)]:
        with pytest.raises(error):
            w4a16.unpack_zeros(*args)
    qweight, scales, qzeros, _ = suite.random_weight(16, 40, 8, False, 700)
    for args, error in [
        ((qweight.long(), scales, qzeros, 8), TypeError), ((qweight, scales.int(), qzeros, 8), TypeError),
        ((qweight, scales[:, :8].contiguous(), qzeros, 8), ValueError), ((qweight, scales, qzeros, 12), ValueError),
        ((qweight, scales, qzeros, 16), ValueError),
        ((qweight[:, :13].contiguous(), scales[:, :13].contiguous(), qzeros, 8), ValueError),
    ]:  # fmt: skip
        with pytest.raises(error):
            dequantize_int4(*args)
    qweight, scales, qzeros, _ = suite.random_weight(16, 64, 32, False, 1200)
    x = torch.randn(1, 64)
    for args, kwargs, error in [
        ((torch.arange(64, dtype=torch.int32)[None], qweight, scales, qzeros), {}, TypeError),
        ((x.tolist(), qweight, scales, qzeros), {}, TypeError),
        ((torch.randn(1, 72), qweight, scales, qzeros), {}, ValueError),
        ((torch.randn(2, 64), qweight, scales, qzeros), {}, ValueError),
        ((x, qweight, scales, qzeros), {"bias": torch.zeros(17)}, ValueError),
        ((x, qweight.long(), scales, qzeros), {}, TypeError),
    ]:  # fmt: skip
        with pytest.raises(error):
            w4a16_gemv(*args, group_size=32, **kwargs)


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


def test_interpreter_is_switched_on_before_triton_is_imported():
    first = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code").source
    assert first.index('os.environ["TRITON_INTERPRET"] = "1"') < first.index("import triton")


def test_notebook_is_saved_without_outputs():
    check_saved_without_outputs(NOTEBOOK)


def test_solution_cells_hold_only_definitions():
    check_solution_cells_hold_only(NOTEBOOK)
