"""Write gguf_kquants_golden.npz: llama.cpp's own K-quant bytes for fixed inputs.

gguf-py has no K-quant encoder, so tests/test_gguf.py holds reference_impl/gguf.py's Q4_K, Q5_K
and Q6_K encoders against bytes made by llama.cpp's C reference functions
(quantize_row_q{4,5,6}_K_ref in ggml/src/ggml-quants.c), stored here with their inputs.

To regenerate (needs a C compiler and the llama.cpp sources that the llama-cpp-python sdist
vendors; nothing of them is kept in this repository):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llamacpp
    tar xzf /tmp/llamacpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/llamacpp
    python tests/data/make_gguf_kquants_golden.py /tmp/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp

The C file is compiled with -ffp-contract=off: ISO C float arithmetic, every product rounded
before it is added. A build that lets the compiler fuse multiply-adds (FMA, e.g. -march=native)
rounds some sums differently and disagrees with this one in a small fraction of super-blocks;
the script reports that fraction when the machine has FMA.
"""

import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "gguf_kquants_golden.npz"
FUNCTIONS = {"Q4_K": ("quantize_row_q4_K_ref", 144), "Q5_K": ("quantize_row_q5_K_ref", 176), "Q6_K": ("quantize_row_q6_K_ref", 210)}
STUBS = """
#include <stdio.h>
#include <stdlib.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "%s:%d\\n", file, line); abort(); }
size_t ggml_row_size(int type, long long ne) { return 0; }
const char * ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { return 0; }
"""


def inputs() -> dict[str, np.ndarray]:
    """Eight super-blocks of 256 float32 values per case: [8, 256] each."""
    from quantcourse.models import minilm_dir, smollm2_gguf_path
    from quantcourse.reference_impl.gguf_file import read_gguf
    from safetensors.numpy import load_file

    rng = np.random.default_rng(2024)
    sparse = np.zeros((8, 256), np.float32)
    sparse[1, :32] = 1.0  # one constant sub-block
    sparse[2, 100] = -3.0  # a single value
    sparse[3, ::7] = 0.5
    sparse[4, :16] = -2.0  # constant negative sub-block
    sparse[5] = 1e-20  # far below the scales' fp16 range
    sparse[6, :32] = rng.standard_normal(32)
    sparse[7] = np.linspace(-1, 1, 256)
    minilm = load_file(minilm_dir() / "model.safetensors")["encoder.layer.0.output.dense.weight"]
    smollm2 = read_gguf(smollm2_gguf_path()).values("blk.0.ffn_down.weight")
    return {
        "normal": (rng.standard_normal((8, 256)) * rng.uniform(1e-3, 1, (8, 1))).astype(np.float32),
        "heavy_tailed": (rng.standard_t(3, (8, 256)) * 0.02).astype(np.float32),
        "positive": np.abs(rng.standard_normal((8, 256))).astype(np.float32),
        "negative": (-np.abs(rng.standard_normal((8, 256))) - 1).astype(np.float32),
        "sparse": sparse,
        "minilm": np.ascontiguousarray(minilm[:8, :256]),
        "smollm2_q4_1": np.ascontiguousarray(smollm2[:8, :256]),
    }


def build(llama_cpp: Path, flags: list[str], workdir: Path) -> ctypes.CDLL:
    ggml = llama_cpp / "ggml"
    (workdir / "stubs.c").write_text(STUBS)
    lib = workdir / f"libquants{len(flags)}.so"
    command = ["gcc", "-O2", "-fPIC", "-shared", *flags, f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
               str(ggml / "src" / "ggml-quants.c"), str(workdir / "stubs.c"), "-o", str(lib), "-lm"]  # fmt: skip
    subprocess.run(command, check=True)
    return ctypes.CDLL(str(lib))


def encode(lib: ctypes.CDLL, qtype: str, x: np.ndarray) -> np.ndarray:
    function, size = FUNCTIONS[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], size), np.uint8)
    getattr(lib, function)(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out


def main(llama_cpp: Path) -> None:
    cases = inputs()
    with tempfile.TemporaryDirectory() as tmp:
        iso = build(llama_cpp, ["-ffp-contract=off"], Path(tmp))
        fused = build(llama_cpp, ["-march=native", "-ffp-contract=fast"], Path(tmp))
        arrays = {}
        for case, x in cases.items():
            arrays[f"{case}/input"] = x
            for qtype in FUNCTIONS:
                arrays[f"{case}/{qtype}"] = golden = encode(iso, qtype, x)
                agree = (encode(fused, qtype, x) == golden).all(axis=1).mean()
                print(f"{case:14s} {qtype}: FMA build agrees on {agree:.0%} of super-blocks")
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
