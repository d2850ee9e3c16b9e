"""How much a quantization recipe changes the model: perplexity, KL divergence, top-1 agreement,
weight error and storage cost.

The quality metrics follow llama.cpp's `perplexity --kl-divergence`: run the reference model once,
keep its next-token log-probabilities on disk (fp16, like llama.cpp's base-logits file), then score
any quantized model against them token by token:

- perplexity  PPL = exp( -(1/T) * sum_t log q(x_t | x_<t) )
- KL divergence  KLD = (1/T) * sum_t sum_v p_t(v) * (log p_t(v) - log q_t(v)),  p = reference
- top-1 agreement: the fraction of positions where argmax_v p_t(v) == argmax_v q_t(v)

T counts scored positions: each window of L tokens scores its L-1 next-token predictions.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .corpus import windows_fingerprint
from .runtime import cache_dir, exclusive_lock


@torch.inference_mode()
def window_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of one window.

    window: [L] int64 token ids. Returns [L-1, vocab] float32: row t is log q(. | x_0..x_t),
    the distribution that scores token x_{t+1}.
    """
    logits = model(window[None], use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def perplexity(model, windows: torch.Tensor, progress: bool = True) -> float:
    """Perplexity of `model` on windows [n, L] int64, over all n*(L-1) next-token predictions."""
    nll, count = 0.0, 0
    for window in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
        logprobs = window_logprobs(model, window)
        nll -= logprobs.gather(1, window[1:, None]).double().sum().item()
        count += window.numel() - 1
    return math.exp(nll / count)


@dataclass(frozen=True)
class ReferenceLogprobs:
    """The reference model's log-probs on fixed windows, memory-mapped from the cache.

    logprobs: [n, L-1, vocab] float16; nll: [n, L-1] float32 (computed before rounding to fp16,
    so the reference perplexity is exact).
    """

    windows: torch.Tensor
    logprobs: np.ndarray
    nll: np.ndarray

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.astype(np.float64).mean()))


def reference_logprobs(model, windows: torch.Tensor, progress: bool = True) -> ReferenceLogprobs:
    """Load, or compute once and cache, the reference model's log-probs on `windows`.

    `model` must be the unmodified reference model from `load_reference_model()`: the cache is
    keyed by its weights' hash and the windows' hash. Call this before quantizing the model.
    """
    weights = getattr(model, "reference_weights_sha256", None)
    if weights is None:
        raise ValueError(
            "reference_logprobs() needs the model returned by load_reference_model(), before any "
            "quantization: its cache key is the reference weights' hash."
        )
    folder = cache_dir() / "reference-logprobs"
    stem = f"{weights[:16]}-{windows_fingerprint(windows)}"
    lp_path, nll_path = folder / f"{stem}.logprobs.npy", folder / f"{stem}.nll.npy"
    with exclusive_lock(folder / f"{stem}.lock"):
        if not (lp_path.is_file() and nll_path.is_file()):
            _write_reference(model, windows, lp_path, nll_path, progress)
    logprobs = np.load(lp_path, mmap_mode="r")
    nll = np.load(nll_path)
    if logprobs.shape[:2] != (windows.shape[0], windows.shape[1] - 1):
        raise RuntimeError(f"cached reference log-probs {lp_path} have the wrong shape; delete it")
    return ReferenceLogprobs(windows, logprobs, nll)


def _write_reference(model, windows, lp_path: Path, nll_path: Path, progress: bool) -> None:
    n, length = windows.shape
    vocab = model.config.vocab_size
    tmp = lp_path.with_name(f".{lp_path.name}.{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, length - 1, vocab))
    nll = np.empty((n, length - 1), dtype=np.float32)
    for i, window in enumerate(tqdm(windows, desc="reference log-probs", disable=not progress)):
        logprobs = window_logprobs(model, window)
        nll[i] = -logprobs.gather(1, window[1:, None])[:, 0].numpy()
        out[i] = logprobs.numpy().astype(np.float16)
    out.flush()
    del out
    np.save(nll_path, nll)
    tmp.rename(lp_path)


@dataclass(frozen=True)
class Comparison:
    """A model scored against the reference on the same windows."""

    ppl: float
    ref_ppl: float
    kld: float
    top1_agreement: float
    eval_tokens: int


def compare_to_reference(model, reference: ReferenceLogprobs, progress: bool = True) -> Comparison:
    """Perplexity of `model`, and its KLD and top-1 agreement against the reference."""
    nll = kld = agree = 0.0
    count = 0
    for i, window in enumerate(tqdm(reference.windows, desc="evaluate", disable=not progress)):
        logq = window_logprobs(model, window)
        logp = torch.from_numpy(np.array(reference.logprobs[i], dtype=np.float32))
        p = logp.exp()
        nll -= logq.gather(1, window[1:, None]).double().sum().item()
        kld += (p * (logp - logq)).sum(dim=-1).double().sum().item()
        agree += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
        count += window.numel() - 1
    return Comparison(
        ppl=math.exp(nll / count),
        ref_ppl=reference.perplexity,
        kld=kld / count,
        top1_agreement=agree / count,
        eval_tokens=count,
    )


@dataclass(frozen=True)
class WeightError:
    """How far a quantized weight is from the original, over all its elements."""

    mse: float  # mean (w - w_hat)^2
    relative_error: float  # ||w - w_hat||_F / ||w||_F
    sqnr_db: float  # 10 log10(||w||^2 / ||w - w_hat||^2), signal to quantization noise
    max_abs_error: float


def weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> WeightError:
    """Error metrics of w_hat against w (same shape, any float dtype; computed in float64)."""
    if w.shape != w_hat.shape:
        raise ValueError(f"shapes differ: original {tuple(w.shape)}, quantized {tuple(w_hat.shape)}")
    w, w_hat = w.double(), w_hat.double()
    noise = (w - w_hat).pow(2).sum().item()
    signal = w.pow(2).sum().item()
    return WeightError(
        mse=noise / w.numel(),
        relative_error=math.sqrt(noise / signal) if signal > 0 else math.inf,
        sqnr_db=10 * math.log10(signal / noise) if noise > 0 else math.inf,
        max_abs_error=(w - w_hat).abs().max().item(),
    )


def model_bits_per_weight(model) -> float:
    """Storage cost of the quantized linear layers, in bits per weight, constants included.

    Every quantized module in the course reports `storage_bits()` (codes + scales + zeros) and
    its number of weights. Layers left in floating point are not counted; with no quantized
    layer at all the answer is the float weights' own width (32 for the fp32 reference).
    """
    bits = weights = 0
    for module in model.modules():
        if hasattr(module, "storage_bits"):
            bits += module.storage_bits()
            weights += module.weight_count()
    if weights == 0:
        return float(torch.finfo(next(model.parameters()).dtype).bits)
    return bits / weights


def save_json(obj, path: Path) -> None:
    """Write results as indented JSON (dataclasses become dicts)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
