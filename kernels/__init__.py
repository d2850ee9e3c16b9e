"""Triton kernels of the course, installed as `quantcourse.kernels` (never as top-level `kernels`:
transformers and bitsandbytes probe for a PyPI package of that name).

Each kernel has a plain-torch twin in `quantcourse.reference_impl` that its tests compare against;
on CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set before importing
triton).
"""
