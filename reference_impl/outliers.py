"""Activation outliers: where the large values in the inputs of linear layers live.

LLM.int8() and SmoothQuant exist because activations are not like weights. A few input channels
(hidden dimensions) of some linear layers carry values tens or hundreds of times larger than the
rest, and they are the *same* channels token after token. A per-token int8 scale is set by that
one large value, so every ordinary value of the token lands on a handful of codes.

This module measures that on the real model, without keeping the activations:

- `collect_channel_stats`: forward pre-hooks reduce each batch of inputs on the fly to three
  vectors per layer (max |x| per channel, tokens with |x| >= threshold per channel, tokens whose
  largest |x| sits in the channel), so memory stays the same for 500 tokens or 50,000.
- `outlier_channels`: the channels whose max |x| reaches the threshold (6.0 in LLM.int8()).
- concentration: across layers (`top_channel_frequency`: how often each channel is among a
  layer's top-k) and across tokens (`ChannelStats.fraction_over`, `ChannelStats.fraction_argmax`).
"""

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantcourse.surgery import linear_layers

LLM_INT8_THRESHOLD = 6.0  # the outlier threshold of the LLM.int8() paper


@dataclass
class ChannelStats:
    """Running statistics of one layer's inputs, per input channel.

    absmax: [in_features] float32, max |x| over every token seen.
    count_over: [in_features] int64, tokens with |x| >= threshold in that channel.
    count_argmax: [in_features] int64, tokens whose largest |x| is in that channel.
    tokens: tokens seen. threshold: the threshold `count_over` was counted with.
    """

    absmax: torch.Tensor
    count_over: torch.Tensor
    count_argmax: torch.Tensor
    tokens: int
    threshold: float

    @classmethod
    def empty(cls, in_features: int, threshold: float) -> "ChannelStats":
        zeros = torch.zeros(in_features, dtype=torch.int64)
        return cls(torch.zeros(in_features), zeros, zeros.clone(), 0, threshold)

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs into the statistics. x: [..., in_features], any float dtype."""
        a = x.detach().reshape(-1, x.shape[-1]).abs().float()
        self.absmax = torch.maximum(self.absmax, a.amax(dim=0))
        self.count_over += (a >= self.threshold).sum(dim=0)
        self.count_argmax += torch.bincount(a.argmax(dim=1), minlength=a.shape[1])
        self.tokens += a.shape[0]

    def fraction_over(self) -> torch.Tensor:
        """[in_features] float32: share of tokens where the channel's |x| >= threshold."""
        return self.count_over.float() / max(self.tokens, 1)

    def fraction_argmax(self) -> torch.Tensor:
        """[in_features] float32: share of tokens whose largest |x| is in the channel."""
        return self.count_argmax.float() / max(self.tokens, 1)


@contextmanager
def track_channel_stats(modules: dict[str, nn.Module], threshold: float = LLM_INT8_THRESHOLD):
    """While active, fold every input of each module into `stats[name]` (a `ChannelStats`).

    Usage: `with track_channel_stats(linear_layers(model)) as stats: model(ids)`.
    """
    check_threshold(threshold)
    stats = {name: ChannelStats.empty(m.in_features, threshold) for name, m in modules.items()}

    def hook_for(name):
        def hook(module, args):
            stats[name].update(args[0])

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect_channel_stats(
    model, windows: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD, names: Iterable[str] | None = None
) -> dict[str, ChannelStats]:
    """Per-channel input statistics of the named linear layers (default: all 210) on windows
    [n, L] int64, one window at a time. Returns name -> `ChannelStats`, in forward order."""
    layers = linear_layers(model)
    chosen = {n: layers[n] for n in (layers if names is None else names)}
    with track_channel_stats(chosen, threshold) as stats:
        for window in windows:
            model(window[None], use_cache=False)
    return stats


def check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive magnitude, got {threshold!r}; LLM.int8() uses 6.0")


def outlier_channels(stats: ChannelStats, threshold: float = LLM_INT8_THRESHOLD) -> torch.Tensor:
    """Indices (int64, ascending) of the channels whose max |x| reaches `threshold`."""
    check_threshold(threshold)
    return torch.nonzero(stats.absmax >= threshold).flatten()


def layers_of_kind(stats: dict[str, ChannelStats], kind: str) -> list[ChannelStats]:
    """The statistics of every layer named `...<kind>` (e.g. "q_proj", "mlp.down_proj"), in
    forward order, i.e. index i is decoder layer i."""
    chosen = [s for name, s in stats.items() if name.endswith("." + kind)]
    if not chosen:
        raise KeyError(
            f"no layer name ends with '.{kind}'; kinds look like 'q_proj' or 'down_proj', "
            f"names like {next(iter(stats), '(none collected)')!r}"
        )
    return chosen


def top_channel_frequency(per_layer: list[ChannelStats], k: int = 1) -> torch.Tensor:
    """[in_features] int64: in how many layers each channel is among the k largest by max |x|.

    k=1 counts how often a channel is the layer's argmax. If outliers were scattered at random,
    each channel would score about k * layers / in_features; systematic outlier features score
    close to the number of layers.
    """
    if not 1 <= k <= per_layer[0].absmax.numel():
        raise ValueError(f"k must be between 1 and in_features ({per_layer[0].absmax.numel()}), got {k}")
    counts = torch.zeros_like(per_layer[0].count_over)
    for s in per_layer:
        counts[s.absmax.topk(k).indices] += 1
    return counts
