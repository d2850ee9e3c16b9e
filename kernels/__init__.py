"""Triton kernels of the course, installed as `quantcourse.kernels` (never as top-level `kernels`:
transformers and bitsandbytes probe for a PyPI package of that name).

Each kernel has a plain-torch twin in `quantcourse.reference_impl` that its tests compare against;
on CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set before importing
triton).

- `quantize`: affine int8 and packed int4 quantize/dequantize, statistics fused in (twins:
  reference_impl.affine, reference_impl.w4a16). Defines the int4 layout: GPTQ's qweight
  [K/8, N] int32, scales [G, N], qzeros [G, N/8] holding the zero points themselves.
- `w8a8`: per-token int8 activation quantization and the int8 x int8 -> int32 GEMM with a fused
  rescale; `TritonW8A8Linear` (twin: reference_impl.llm_int8).
- `w4a16`: 4-bit weight x fp16/bf16 activation GEMV (M = 1) and GEMM (M >= 2), split-K,
  optional act-order g_idx; `TritonW4A16Linear` (twin: reference_impl.w4a16).
- `nf4`: bitsandbytes' 4-bit layout (NF4/FP4, plain or double-quantized absmax): dequantize,
  the fused GEMV (code book in registers on a GPU) and GEMM; `TritonLinear4bit` (twin:
  reference_impl.nf4).
- `gguf`: llama.cpp's Q4_0 and Q8_0 blocks read as stored (18 and 34 bytes per 32 weights):
  the fused GEMV (small M too) and `dequantize_gguf` (twin: reference_impl.gguf).
- `kv_attention`: decode attention (one query token, GQA, split over the cached tokens) over an
  int8 (per-token scales) or fp8 KV cache, dequantized in registers (layout of
  reference_impl.kvcache).
- `common`: input checks and the launch helper (autotuned on a GPU, one fixed configuration
  under the interpreter).

Speed on an H100: benchmarks/kernels.py, results in benchmarks/results/kernels.md.
"""
