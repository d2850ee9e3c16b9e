"""quantcourse: an interactive course on LLM quantization.

The package has four parts:

- the harness in this package: the real model and text (`models`, `corpus`), the evaluation
  (`evaluate`), model surgery shared by every lesson (`surgery`) and the `quantcourse` CLI;
- `quantcourse.reference_impl`: each lesson's algorithms, the answer key of the labs;
- `quantcourse.kernels`: Triton kernels, each with a plain-torch twin in the reference;
- `quantcourse.autograder`: grades a learner's lab against the reference.
"""

__version__ = "0.1.0"
