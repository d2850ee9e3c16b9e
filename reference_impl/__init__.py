"""Reference implementations: each lesson's algorithms, the answer key of its lab.

One topic per module (`affine` for lesson 01, ...). Functions state shapes and dtypes in their
docstrings; the labs ask learners for the same functions with the same signatures.
"""
