"""Lab 02's hidden suite against a catalog of submissions: plausible wrong versions of every
graded function must lose points in its key (and be named when the suite knows the mistake),
other correct versions must earn every point; the source notebook earns full marks, its student
version none; the notebook's points agree with the suite's.

One learner process holds the source notebook's solutions plus every version below under its
own name (`int8_matmul__int64`, ...); the suite is pointed at one of them with `aliases`.
"""

import ast
import re
import textwrap
from collections import defaultdict
from pathlib import Path

import _pytest.python
import _pytest.unraisableexception
import nbformat
import pytest

from lab_catalog import check_source_and_student_notebooks, suite_points

from quantcourse.autograder import engine
from quantcourse.autograder.notebook import is_test_cell, nbgrader_meta, read_submission
from quantcourse.autograder.sandbox import Sandbox

LAB = "02_outliers"
SOURCE = Path(__file__).resolve().parents[1] / "labs" / LAB / f"{LAB}.ipynb"

VERSIONS = textwrap.dedent("""
    import torch

    # -- outlier_channels ---------------------------------------------------------------------

    def outlier_channels__list(stats, threshold=6.0):
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        return torch.tensor([i for i, m in enumerate(stats.absmax.tolist()) if m >= threshold], dtype=torch.int64)

    def outlier_channels__where(stats, threshold=6.0):
        if not threshold > 0:
            raise ValueError("threshold must be positive")
        return torch.where(stats.absmax >= threshold)[0]

    def outlier_channels__strict(stats, threshold=6.0):
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        return torch.nonzero(stats.absmax > threshold).flatten()

    def outlier_channels__count_over(stats, threshold=6.0):
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        return torch.nonzero(stats.count_over > 0).flatten()

    def outlier_channels__mask(stats, threshold=6.0):
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        return stats.absmax >= threshold

    def outlier_channels__int32(stats, threshold=6.0):
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        return torch.nonzero(stats.absmax >= threshold).flatten().int()

    def outlier_channels__unchecked(stats, threshold=6.0):
        return torch.nonzero(stats.absmax >= threshold).flatten()

    def outlier_channels__by_size(stats, threshold=6.0):
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        found = torch.nonzero(stats.absmax >= threshold).flatten()
        return found[stats.absmax[found].argsort(descending=True)]

    # -- top_channel_frequency ----------------------------------------------------------------

    def top_channel_frequency__argsort(per_layer, k=1):
        width = len(per_layer[0].absmax)
        if k < 1 or k > width:
            raise ValueError("k out of range")
        counts = torch.zeros(width, dtype=torch.int64)
        for s in per_layer:
            for c in s.absmax.argsort(descending=True)[:k].tolist():
                counts[c] += 1
        return counts

    def top_channel_frequency__one_hot(per_layer, k=1):
        width = per_layer[0].absmax.shape[0]
        if not 0 < k <= width:
            raise ValueError("k out of range")
        chosen = torch.stack([s.absmax.topk(k).indices for s in per_layer])  # [layers, k]
        return torch.nn.functional.one_hot(chosen, width).sum(dim=(0, 1))

    def top_channel_frequency__smallest(per_layer, k=1):
        width = per_layer[0].absmax.numel()
        if not 1 <= k <= width:
            raise ValueError("k out of range")
        counts = torch.zeros(width, dtype=torch.int64)
        for s in per_layer:
            counts[s.absmax.topk(k, largest=False).indices] += 1
        return counts

    def top_channel_frequency__k_plus_one(per_layer, k=1):
        width = per_layer[0].absmax.numel()
        if not 1 <= k <= width:
            raise ValueError("k out of range")
        counts = torch.zeros(width, dtype=torch.int64)
        for s in per_layer:
            counts[s.absmax.argsort(descending=True)[: k + 1]] += 1
        return counts

    def top_channel_frequency__argmax_counts(per_layer, k=1):
        width = per_layer[0].absmax.numel()
        if not 1 <= k <= width:
            raise ValueError("k out of range")
        return sum(s.count_argmax for s in per_layer)

    def top_channel_frequency__ignores_k(per_layer, k=1):
        width = per_layer[0].absmax.numel()
        if not 1 <= k <= width:
            raise ValueError("k out of range")
        counts = torch.zeros(width, dtype=torch.int64)
        for s in per_layer:
            counts[s.absmax.argmax()] += 1
        return counts

    def top_channel_frequency__fraction(per_layer, k=1):
        width = per_layer[0].absmax.numel()
        if not 1 <= k <= width:
            raise ValueError("k out of range")
        counts = torch.zeros(width)
        for s in per_layer:
            counts[s.absmax.topk(k).indices] += 1
        return counts / len(per_layer)

    def top_channel_frequency__unchecked(per_layer, k=1):
        counts = torch.zeros(per_layer[0].absmax.numel(), dtype=torch.int64)
        for s in per_layer:
            counts[s.absmax.topk(k).indices] += 1
        return counts

    # -- int8_vectorwise_quant ----------------------------------------------------------------

    def int8_vectorwise_quant__loop(A, threshold=0.0):
        require_float_matrix(A, "A")
        if threshold < 0:
            raise ValueError("negative threshold")
        cols = None
        if threshold > 0:
            cols = torch.tensor(sorted({int(c) for c in (A.abs() >= threshold).nonzero()[:, 1]}), dtype=torch.int64)
        codes, absmax = [], []
        for row in A:
            if threshold > 0:
                row = torch.where(row.abs() >= threshold, torch.zeros_like(row), row)
            m = row.abs().max().float()
            scale = m / 127  # the other order: a / (m / 127)
            codes.append(torch.round(row.float() / scale) if m > 0 else torch.zeros(row.shape))
            absmax.append(m)
        codes = torch.stack(codes).to(torch.int8)
        if cols is not None:
            codes[:, cols] = 0
        return codes, torch.stack(absmax), cols

    def int8_vectorwise_quant__mul_div(A, threshold=0.0):
        require_float_matrix(A, "A")
        if threshold < 0:
            raise ValueError("negative threshold")
        kept = A.clone()
        cols = None
        if threshold > 0:
            outlier = A.abs() >= threshold
            kept[outlier] = 0
            cols = torch.arange(A.shape[1])[outlier.any(dim=0)]
        m = kept.abs().max(dim=1).values.float()
        safe = torch.where(m > 0, m, torch.ones_like(m))
        codes = torch.round(kept.float() * 127 / safe[:, None]).to(torch.int8)
        if cols is not None:
            codes[:, cols] = 0
        return codes, m, cols

    def int8_vectorwise_quant__float64(A, threshold=0.0):
        require_float_matrix(A, "A")
        if threshold < 0:
            raise ValueError("negative threshold")
        outlier = A.abs() >= threshold if threshold > 0 else torch.zeros(A.shape, dtype=torch.bool)
        kept = A.double().masked_fill(outlier, 0)
        m = kept.abs().amax(dim=1)
        codes = torch.round(kept * 127 / m.clamp(min=1e-300)[:, None]).to(torch.int8)
        cols = torch.unique(outlier.nonzero()[:, 1]) if threshold > 0 else None
        if cols is not None:
            codes[:, cols] = 0
        return codes, m.float(), cols

    def _vq(A, threshold=0.0, qmax=127, rounding=torch.round, axis=1, strict=False, scale_from_all=False,
            drop_columns=False, zero_columns=True, empty_cols=False, half=False, absmax_dtype=False):
        require_float_matrix(A, "A")
        if threshold < 0:
            raise ValueError("negative threshold")
        kept, cols = A, None
        if threshold > 0:
            outlier = A.abs() > threshold if strict else A.abs() >= threshold
            cols = outlier.any(dim=0).nonzero().flatten()
            kept = A.masked_fill(outlier, 0)
            if drop_columns:
                kept = A.clone()
                kept[:, cols] = 0
        source = A if scale_from_all else kept
        if half:
            m = source.abs().amax(dim=1, keepdim=True)
            codes = torch.round(kept * torch.where(m > 0, 127 / m, 0)).to(torch.int8)
            m = m[:, 0].float()
        else:
            m = source.abs().amax(dim=axis, keepdim=True).float()
            factor = torch.where(m > 0, qmax / m, torch.zeros_like(m))
            codes = rounding(kept.float() * factor).clamp(-128, 127).to(torch.int8)
            m = m.flatten()
        if cols is not None and zero_columns:
            codes[:, cols] = 0
        if empty_cols and cols is None:
            cols = torch.zeros(0, dtype=torch.int64)
        return codes, (m.to(A.dtype) if absmax_dtype else m), cols

    def int8_vectorwise_quant__scale_128(A, threshold=0.0):
        return _vq(A, threshold, qmax=128)

    def int8_vectorwise_quant__per_column(A, threshold=0.0):
        return _vq(A, threshold, axis=0)

    def int8_vectorwise_quant__floor(A, threshold=0.0):
        return _vq(A, threshold, rounding=torch.floor)

    def int8_vectorwise_quant__trunc(A, threshold=0.0):
        return _vq(A, threshold, rounding=torch.trunc)

    def int8_vectorwise_quant__half_away(A, threshold=0.0):
        return _vq(A, threshold, rounding=lambda x: torch.sign(x) * torch.floor(x.abs() + 0.5))

    def int8_vectorwise_quant__strict(A, threshold=0.0):
        return _vq(A, threshold, strict=True)

    def int8_vectorwise_quant__outliers_set_scale(A, threshold=0.0):
        return _vq(A, threshold, scale_from_all=True)

    def int8_vectorwise_quant__columns_left_out(A, threshold=0.0):
        return _vq(A, threshold, drop_columns=True)

    def int8_vectorwise_quant__columns_not_zeroed(A, threshold=0.0):
        return _vq(A, threshold, zero_columns=False)

    def int8_vectorwise_quant__empty_not_none(A, threshold=0.0):
        return _vq(A, threshold, empty_cols=True)

    def int8_vectorwise_quant__half(A, threshold=0.0):
        return _vq(A, threshold, half=True)

    def int8_vectorwise_quant__absmax_dtype(A, threshold=0.0):
        return _vq(A, threshold, absmax_dtype=True)

    # -- int8_vectorwise_dequant --------------------------------------------------------------

    def int8_vectorwise_dequant__step_first(codes, row_absmax):
        return codes.to(torch.float32) * (row_absmax / 127).unsqueeze(1)

    def int8_vectorwise_dequant__loop(codes, row_absmax):
        return torch.stack([c.float() * (m / 127) for c, m in zip(codes, row_absmax)])

    def int8_vectorwise_dequant__by_128(codes, row_absmax):
        return codes.float() * row_absmax[:, None] / 128

    def int8_vectorwise_dequant__by_127_squared(codes, row_absmax):
        return codes.float() * row_absmax[:, None] / 127**2

    def int8_vectorwise_dequant__no_division(codes, row_absmax):
        return codes.float() * row_absmax[:, None]

    def int8_vectorwise_dequant__inverse(codes, row_absmax):
        return codes.float() * 127 / row_absmax[:, None]

    def int8_vectorwise_dequant__mean_scale(codes, row_absmax):
        return codes.float() * row_absmax.mean() / 127

    def int8_vectorwise_dequant__per_column(codes, row_absmax):
        return codes.float() * row_absmax[None, :] / 127

    def int8_vectorwise_dequant__half(codes, row_absmax):
        return codes.half() * (row_absmax.half()[:, None] / 127)

    # -- int8_tensorwise_quant ----------------------------------------------------------------

    def int8_tensorwise_quant__scale(A):
        require_float_matrix(A, "A")
        m = A.float().abs().max()
        scale = m / 127 if m > 0 else torch.tensor(1.0)
        return torch.round(A.float() / scale).to(torch.int8), m.expand(A.shape[0])

    def int8_tensorwise_quant__flat(A):
        require_float_matrix(A, "A")
        flat = A.float().flatten()
        m = flat.abs().max()
        codes = torch.round(flat * 127 / m) if m > 0 else torch.zeros_like(flat)
        return codes.to(torch.int8).reshape(A.shape), torch.full((A.shape[0],), m.item())

    def int8_tensorwise_quant__expand(A):
        require_float_matrix(A, "A")
        m = A.abs().max().float()
        codes = torch.round(A.float() * torch.where(m > 0, 127 / m, 0.0)).to(torch.int8)
        return codes, m.expand(A.shape[0])

    def _tq(A, qmax=127, rounding=torch.round, per_row=False, scalar=False, signed_max=False, check=True):
        if check:
            require_float_matrix(A, "A")
        if per_row:
            m = A.abs().amax(dim=1, keepdim=True).float()
        else:
            m = (A.amax() if signed_max else A.abs().amax()).float()
        factor = torch.where(m > 0, qmax / m, torch.zeros_like(m))
        codes = rounding(A.float() * factor).clamp(-128, 127).to(torch.int8)
        if per_row:
            return codes, m.flatten()
        return codes, (m if scalar else m.repeat(A.shape[0]))

    def int8_tensorwise_quant__scale_128(A):
        return _tq(A, qmax=128)

    def int8_tensorwise_quant__scale_255(A):
        return _tq(A, qmax=255)

    def int8_tensorwise_quant__floor(A):
        return _tq(A, rounding=torch.floor)

    def int8_tensorwise_quant__per_row(A):
        return _tq(A, per_row=True)

    def int8_tensorwise_quant__scalar_absmax(A):
        return _tq(A, scalar=True)

    def int8_tensorwise_quant__signed_max(A):
        return _tq(A, signed_max=True)

    def int8_tensorwise_quant__unchecked(A):
        return _tq(A, check=False)

    # -- int8_matmul --------------------------------------------------------------------------

    def _check_int8(A, B):
        if A.dtype != torch.int8 or B.dtype != torch.int8 or A.dim() != 2 or B.dim() != 2:
            raise TypeError("int8 matrices only")
        if A.shape[1] != B.shape[1]:
            raise ValueError("inner dimensions differ")

    def int8_matmul__int64(A_int8, B_int8):
        _check_int8(A_int8, B_int8)
        return (A_int8.long() @ B_int8.long().T).int()

    def int8_matmul__float32_chunks(A_int8, B_int8):
        _check_int8(A_int8, B_int8)
        C = torch.zeros(A_int8.shape[0], B_int8.shape[0], dtype=torch.int32)
        for k in range(0, A_int8.shape[1], 1024):
            C += (A_int8[:, k : k + 1024].float() @ B_int8[:, k : k + 1024].float().T).int()
        return C

    def int8_matmul__int8_accumulator(A_int8, B_int8):
        _check_int8(A_int8, B_int8)
        return (A_int8 @ B_int8.T).to(torch.int32)

    def int8_matmul__float16(A_int8, B_int8):
        _check_int8(A_int8, B_int8)
        return (A_int8.half() @ B_int8.half().T).to(torch.int32)

    def int8_matmul__float32(A_int8, B_int8):
        _check_int8(A_int8, B_int8)
        return (A_int8.float() @ B_int8.float().T).to(torch.int32)

    def int8_matmul__int64_result(A_int8, B_int8):
        _check_int8(A_int8, B_int8)
        return A_int8.long() @ B_int8.long().T

    def int8_matmul__unchecked(A_int8, B_int8):
        return (A_int8.double() @ B_int8.double().T).to(torch.int32)

    def int8_matmul__not_transposed(A_int8, B_int8):
        _check_int8(A_int8, B_int8)
        return (A_int8.long() @ B_int8.long()).int()

    # -- int8_mm_dequant ----------------------------------------------------------------------

    def _check_c(C, row_stats, col_stats):
        if C.dtype != torch.int32 or C.dim() != 2:
            raise TypeError("C must be int32")
        if row_stats.shape != (C.shape[0],) or col_stats.shape != (C.shape[1],):
            raise ValueError("stats shapes")

    def int8_mm_dequant__float64(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        _check_c(C, row_stats, col_stats)
        Y = C.double() * torch.outer(row_stats.double(), col_stats.double()) / 16129
        return (Y + bias.double() if bias is not None else Y).to(dtype)

    def int8_mm_dequant__scaled_first(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        _check_c(C, row_stats, col_stats)
        Y = (C.float() / 127**2) * torch.outer(row_stats, col_stats)
        if bias is not None:
            Y += bias
        return Y.to(dtype)

    def _dq(C, row_stats, col_stats, bias, divisor=127**2, half=False, use_bias=True, swap=False, check=True, bias_first=False):
        if check:
            _check_c(C, row_stats, col_stats)
        if swap:
            row_stats, col_stats = col_stats, row_stats
        if bias_first and bias is not None:
            return (C.float() + bias) * row_stats[:, None] * col_stats[None, :] / divisor
        scale = row_stats[:, None] * col_stats[None, :]
        Y = (C.half() * scale.half() / divisor).float() if half else C.float() * scale / divisor
        return Y + bias if use_bias and bias is not None else Y

    def int8_mm_dequant__by_127(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        return _dq(C, row_stats, col_stats, bias, divisor=127)

    def int8_mm_dequant__by_128_squared(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        return _dq(C, row_stats, col_stats, bias, divisor=128**2)

    def int8_mm_dequant__half(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        return _dq(C, row_stats, col_stats, bias, half=True)

    def int8_mm_dequant__no_bias(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        return _dq(C, row_stats, col_stats, bias, use_bias=False)

    def int8_mm_dequant__swapped(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        return _dq(C, row_stats, col_stats, bias, swap=True, check=False)

    def int8_mm_dequant__unchecked(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        return _dq(C, row_stats, col_stats, bias, check=False)

    def int8_mm_dequant__bias_first(C, row_stats, col_stats, bias=None, dtype=torch.float32):
        return _dq(C, row_stats, col_stats, bias, bias_first=True)

    # -- int8_decomposed_matmul ---------------------------------------------------------------

    def _check_decomposed(X, W_codes, threshold):
        if not threshold > 0:
            raise ValueError("threshold must be positive")
        if X.dim() != 2 or X.shape[1] != W_codes.shape[1]:
            raise ValueError("X must be [M, K]")

    def int8_decomposed_matmul__float64(X, W_codes, W_absmax, threshold=6.0, bias=None):
        _check_decomposed(X, W_codes, threshold)
        X_codes, X_absmax, cols = int8_vectorwise_quant(X, threshold)
        W_hat = int8_vectorwise_dequant(W_codes, W_absmax).double()
        Y = int8_vectorwise_dequant(X_codes, X_absmax).double() @ W_hat.T + X[:, cols].double() @ W_hat[:, cols].T
        if bias is not None:
            Y = Y + bias.double()
        return Y.to(X.dtype), cols

    def int8_decomposed_matmul__outer_products(X, W_codes, W_absmax, threshold=6.0, bias=None):
        _check_decomposed(X, W_codes, threshold)
        X_codes, X_absmax, cols = int8_vectorwise_quant(X, threshold)
        Y = int8_mm_dequant(int8_matmul(X_codes, W_codes), X_absmax, W_absmax, bias)
        for c in cols.tolist():
            Y += torch.outer(X[:, c].float(), W_codes[:, c].float() * W_absmax / 127)
        return Y.to(X.dtype), cols

    def _dm(X, W_codes, W_absmax, threshold, bias, float_path=True, codes_in_float=False, decompose=True,
            divisor=None, bias_times=1, keep_dtype=True, zero_columns=True):
        _check_decomposed(X, W_codes, threshold)
        if decompose:
            X_codes, X_absmax, cols = int8_vectorwise_quant(X, threshold)
            if not zero_columns:
                X_codes = torch.round(X.masked_fill(X.abs() >= threshold, 0).float() * (127 / X_absmax[:, None])).to(torch.int8)
        else:
            X_codes, X_absmax, _ = int8_vectorwise_quant(X)
            cols = (X.abs() >= threshold).any(dim=0).nonzero().flatten()
        C = int8_matmul(X_codes, W_codes)
        if divisor is None:
            Y = int8_mm_dequant(C, X_absmax, W_absmax)
        else:
            Y = C.float() * X_absmax[:, None] * W_absmax[None, :] / divisor
        if bias is not None:
            Y = Y + bias_times * bias
        if decompose and float_path:
            W_cols = W_codes[:, cols].float() if codes_in_float else int8_vectorwise_dequant(W_codes[:, cols], W_absmax)
            Y = Y + X[:, cols].float() @ W_cols.T
        return (Y.to(X.dtype) if keep_dtype else Y), cols

    def int8_decomposed_matmul__dropped(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, float_path=False)

    def int8_decomposed_matmul__both_paths(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, zero_columns=False)

    def int8_decomposed_matmul__codes_in_float(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, codes_in_float=True)

    def int8_decomposed_matmul__no_decomposition(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, decompose=False)

    def int8_decomposed_matmul__by_127(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, divisor=127)

    def int8_decomposed_matmul__bias_twice(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, bias_times=2)

    def int8_decomposed_matmul__no_bias(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, bias_times=0)

    def int8_decomposed_matmul__float32_result(X, W_codes, W_absmax, threshold=6.0, bias=None):
        return _dm(X, W_codes, W_absmax, threshold, bias, keep_dtype=False)

    # -- llm_int8_matmul ----------------------------------------------------------------------

    def llm_int8_matmul__inline(X, W, threshold=6.0, bias=None):
        if not threshold > 0:
            raise ValueError("threshold must be positive")
        W_codes, W_absmax, _ = int8_vectorwise_quant(W)
        X_codes, X_absmax, cols = int8_vectorwise_quant(X, threshold)
        Y = int8_mm_dequant(int8_matmul(X_codes, W_codes), X_absmax, W_absmax, bias)
        W_hat = int8_vectorwise_dequant(W_codes, W_absmax)
        return (Y + X[:, cols].float() @ W_hat[:, cols].T).to(X.dtype)

    def llm_int8_matmul__float64(X, W, threshold=6.0, bias=None):
        if threshold <= 0:
            raise ValueError("threshold must be positive")
        W_codes, W_absmax, _ = int8_vectorwise_quant(W)
        W_hat = int8_vectorwise_dequant(W_codes, W_absmax).double()
        X_codes, X_absmax, cols = int8_vectorwise_quant(X, threshold)
        Y = int8_vectorwise_dequant(X_codes, X_absmax).double() @ W_hat.T + X[:, cols].double() @ W_hat[:, cols].T
        return (Y if bias is None else Y + bias.double()).to(X.dtype)

    def _lm(X, W, threshold, bias, original=False, fixed_threshold=False, weight="row", use_bias=True, keep_dtype=True):
        if not threshold > 0:
            raise ValueError("threshold must be positive")
        if fixed_threshold:
            threshold = 6.0
        if weight == "row":
            W_codes, W_absmax, _ = int8_vectorwise_quant(W)
            W_hat = int8_vectorwise_dequant(W_codes, W_absmax)
        elif weight == "tensor":
            W_codes, W_absmax = int8_tensorwise_quant(W)
            W_hat = int8_vectorwise_dequant(W_codes, W_absmax)
        else:  # per input column
            m = W.abs().amax(dim=0).float()
            W_hat = torch.round(W.float() * 127 / m) * m / 127
        X_codes, X_absmax, cols = int8_vectorwise_quant(X, threshold)
        if weight == "column":
            Y = int8_vectorwise_dequant(X_codes, X_absmax) @ W_hat.T
        else:
            Y = int8_mm_dequant(int8_matmul(X_codes, W_codes), X_absmax, W_absmax)
        Y = Y + X[:, cols].float() @ (W[:, cols].float() if original else W_hat[:, cols]).T
        if use_bias and bias is not None:
            Y = Y + bias
        return Y.to(X.dtype) if keep_dtype else Y

    def llm_int8_matmul__original_weights(X, W, threshold=6.0, bias=None):
        return _lm(X, W, threshold, bias, original=True)

    def llm_int8_matmul__fixed_threshold(X, W, threshold=6.0, bias=None):
        return _lm(X, W, threshold, bias, fixed_threshold=True)

    def llm_int8_matmul__weight_per_column(X, W, threshold=6.0, bias=None):
        return _lm(X, W, threshold, bias, weight="column")

    def llm_int8_matmul__weight_per_tensor(X, W, threshold=6.0, bias=None):
        return _lm(X, W, threshold, bias, weight="tensor")

    def llm_int8_matmul__no_bias(X, W, threshold=6.0, bias=None):
        return _lm(X, W, threshold, bias, use_bias=False)

    def llm_int8_matmul__float32_result(X, W, threshold=6.0, bias=None):
        return _lm(X, W, threshold, bias, keep_dtype=False)
""")

# function -> other correct versions, and wrong versions with the mistake the feedback should name
# (None where the suite has no variant for it: a wrong dtype, shape, or a missing error)
CATALOG = {
    "outlier_channels": (
        ["list", "where"],
        {"strict": "> threshold instead of >=", "count_over": "count_over", "mask": None, "int32": None,
         "unchecked": None, "by_size": None},
    ),
    "top_channel_frequency": (
        ["argsort", "one_hot"],
        {"smallest": "k smallest", "k_plus_one": "off by one", "argmax_counts": "count_argmax",
         "ignores_k": "ignored k", "fraction": None, "unchecked": None},
    ),
    "int8_vectorwise_quant": (
        ["loop", "mul_div", "float64"],
        {"scale_128": "scale by 128", "per_column": None, "floor": "floor instead of round",
         "trunc": "truncation", "half_away": "half away from zero", "strict": "> threshold instead of >=",
         "outliers_set_scale": "outlier values still set the row absmax",
         "columns_left_out": "whole outlier columns left out", "columns_not_zeroed": "not zeroed",
         "empty_not_none": None, "half": "computed in float16", "absmax_dtype": None},
    ),
    "int8_vectorwise_dequant": (
        ["step_first", "loop"],
        {"by_128": "divided by 128", "by_127_squared": "127^2", "no_division": "forgot to divide",
         "inverse": "127 / absmax", "mean_scale": "one scale for all rows", "per_column": "per column",
         "half": None},
    ),
    "int8_tensorwise_quant": (
        ["scale", "flat", "expand"],
        {"scale_128": "scale by 128", "scale_255": "scale by 255", "floor": "floor instead of round",
         "per_row": "one absmax per row", "scalar_absmax": None, "signed_max": "max instead of max |x|",
         "unchecked": None},
    ),
    "int8_matmul": (
        ["int64", "float32_chunks"],
        {"int8_accumulator": "int8", "float16": "float16", "float32": "float32 in one piece",
         "int64_result": None, "unchecked": None, "not_transposed": None},
    ),
    "int8_mm_dequant": (
        ["float64", "scaled_first"],
        {"by_127": "divided by 127 instead of 127^2", "by_128_squared": "128^2", "half": "float16",
         "no_bias": "bias forgotten", "swapped": "swapped", "unchecked": None, "bias_first": None},
    ),
    "int8_decomposed_matmul": (
        ["float64", "outer_products"],
        {"dropped": "no float path", "both_paths": "not zeroed", "codes_in_float": "int8 codes of W",
         "no_decomposition": "no decomposition", "by_127": "127 instead of 127^2", "bias_twice": "bias added twice",
         "no_bias": "bias forgotten", "float32_result": None},
    ),
    "llm_int8_matmul": (
        ["inline", "float64"],
        {"original_weights": "original weights", "fixed_threshold": "threshold ignored",
         "weight_per_column": "per input column", "weight_per_tensor": "per tensor", "no_bias": None,
         "float32_result": None},
    ),
}  # fmt: skip

CORRECT = [(name, name) for name in CATALOG] + [(n, f"{n}__{v}") for n, (ok, _) in CATALOG.items() for v in ok]
WRONG = [(n, f"{n}__{v}", hint) for n, (_, bad) in CATALOG.items() for v, hint in bad.items()]


def rounds(versions: list[tuple]) -> list[dict[str, str]]:
    """Aliases for as few suite runs as possible: each run grades one version of every function
    (a version of one function never calls another's version, so they do not interfere)."""
    planned = defaultdict(dict)
    used = defaultdict(int)
    for function, version, *_ in versions:
        planned[used[function]][function] = version
        used[function] += 1
    return list(planned.values())


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    notebook = nbformat.read(SOURCE, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(VERSIONS))
    path = tmp_path_factory.mktemp("lab02") / f"{LAB}_versions.ipynb"
    nbformat.write(notebook, path)
    with Sandbox(read_submission(path).cells) as box:
        assert not box.report.cell_errors, box.report.cell_errors
        yield box


@pytest.fixture(scope="module")
def max_points():
    return suite_points(LAB)


@pytest.fixture(scope="module")
def results(sandbox):
    """version -> its results (the case groups of its function's key), from a few suite runs.

    Two costs of pytest that grading does not need are switched off while they run: the long
    failure report (it parses the suite's source once per failing case group; the engine takes
    feedback from the exception itself) and the garbage collection at the end of each session
    (slow in a process this large). Together they were more than half of the time.
    """
    graded = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_pytest.python.Function, "repr_failure", lambda self, excinfo: str(excinfo.value))
        patch.setattr(_pytest.unraisableexception, "gc_collect_harder", lambda iterations: None)
        for aliases in rounds(CORRECT + WRONG):
            by_key = defaultdict(list)
            for result in engine.run_suite(LAB, sandbox, keys={f"02.{f}" for f in aliases}, aliases=aliases):
                by_key[result.key].append(result)
            graded.update({version: by_key[f"02.{function}"] for function, version in aliases.items()})
    return graded


def test_catalog_covers_every_graded_function():
    assert set(CATALOG) == set(engine.load_suite(LAB).GRADED)
    for name, (other_correct, wrong) in CATALOG.items():
        assert len(other_correct) >= 1 and len(wrong) >= 5, name  # the solution is a correct version too


@pytest.mark.parametrize("function, version", CORRECT, ids=[v for _, v in CORRECT])
def test_correct_versions_earn_every_point(results, max_points, function, version):
    failed = [f"{r.name}: {r.feedback}" for r in results[version] if r.status != "passed"]
    assert not failed, "\n".join(failed)
    assert sum(r.points for r in results[version]) == max_points[f"02.{function}"]


@pytest.mark.parametrize("function, version, hint", WRONG, ids=[v for _, v, _ in WRONG])
def test_wrong_versions_lose_points(results, max_points, function, version, hint):
    assert results[version], f"no case group of 02.{function} ran"
    assert sum(r.points for r in results[version]) < max_points[f"02.{function}"], f"{version} earned every point"
    feedback = "\n".join(r.feedback for r in results[version] if r.status != "passed")
    assert "internal grader error" not in feedback, feedback
    if hint:
        assert hint in feedback, f"the feedback should name the mistake ({hint!r}):\n{feedback}"


def test_source_notebook_earns_full_marks_and_the_student_version_none(tmp_path):
    check_source_and_student_notebooks(LAB, SOURCE, tmp_path)


def test_notebook_points_match_the_suite():
    notebook = nbformat.read(SOURCE, as_version=4)
    cells, manual = {}, 0.0
    for cell in notebook.cells:
        meta = nbgrader_meta(cell)
        if cell.cell_type == "code" and is_test_cell(cell):
            keys = re.findall(r'^grade\("([^"]+)"\)', cell.source, flags=re.MULTILINE)
            assert len(keys) == 1 and "### BEGIN HIDDEN TESTS" in cell.source, cell.source
            assert meta["grade_id"] == f"test_{keys[0].removeprefix('02.')}"
            cells[keys[0]] = meta["points"]
        elif meta.get("grade") and meta.get("solution"):
            manual += meta["points"]
    assert cells == suite_points(LAB)
    assert {key.removeprefix("02.") for key in cells} == set(engine.load_suite(LAB).GRADED)
    assert manual > 0 and sum(cells.values()) + manual >= 100


def test_notebook_is_committed_clean():
    notebook = nbformat.read(SOURCE, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["quantcourse"] == {"lab": LAB}
    assert notebook.metadata["kernelspec"]["name"] == "quantcourse"
    ids = [nbgrader_meta(c)["grade_id"] for c in notebook.cells if nbgrader_meta(c)]
    assert len(ids) == len(set(ids)), "grade_ids must be unique"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert notebook.cells[-1].source.strip() == "report()"


def test_solution_cells_hold_only_definitions():
    """The grader runs only definitions; a top-level call in a solution cell would be lost."""
    for cell in nbformat.read(SOURCE, as_version=4).cells:
        if cell.cell_type == "code" and nbgrader_meta(cell).get("solution"):
            assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source
            for node in ast.parse(cell.source).body:
                assert isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom)), ast.dump(node)[:80]
