"""Per-channel activation statistics, and the outlier structure of SmolLM2's real activations."""

import pytest
import torch
from torch import nn

from quantcourse.corpus import token_windows
from quantcourse.reference_impl.outliers import (
    ChannelStats,
    collect_channel_stats,
    layers_of_kind,
    outlier_channels,
    top_channel_frequency,
    track_channel_stats,
)


@pytest.fixture(scope="module")
def stats(reference):
    """Statistics of all 210 linear inputs on 4 calibration windows of 128 tokens."""
    model, tokenizer = reference
    return collect_channel_stats(model, token_windows(tokenizer, "calibration", length=128, count=4))


def toy_stats(absmax: list[float]) -> ChannelStats:
    stats = ChannelStats.empty(len(absmax), threshold=6.0)
    stats.absmax = torch.tensor(absmax)
    return stats


def test_streaming_statistics_equal_the_statistics_of_all_inputs_at_once():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    batches = [torch.randn(2, 5, 16) * 4, torch.randn(1, 7, 16) * 4]
    with track_channel_stats({"layer": layer}, threshold=6.0) as tracked:
        for x in batches:
            layer(x)
    everything = torch.cat([x.reshape(-1, 16) for x in batches]).abs()
    s = tracked["layer"]
    assert s.tokens == 17
    torch.testing.assert_close(s.absmax, everything.amax(dim=0), rtol=0, atol=0)
    assert torch.equal(s.count_over, (everything >= 6.0).sum(dim=0))
    assert torch.equal(s.count_argmax, torch.bincount(everything.argmax(dim=1), minlength=16))
    torch.testing.assert_close(s.fraction_over(), (everything >= 6.0).float().mean(dim=0))
    assert not layer._forward_pre_hooks, "hooks must be removed on exit"


def test_outlier_channels_are_those_reaching_the_threshold():
    stats = toy_stats([0.5, 6.0, 5.99, 40.0])
    assert outlier_channels(stats).tolist() == [1, 3]
    assert outlier_channels(stats, threshold=1.0).tolist() == [1, 2, 3]


def test_top_channel_frequency_counts_layers():
    layers = [toy_stats([1, 9, 2, 3]), toy_stats([1, 8, 7, 0]), toy_stats([5, 1, 2, 4])]
    assert top_channel_frequency(layers, k=1).tolist() == [1, 2, 0, 0]
    assert top_channel_frequency(layers, k=2).tolist() == [1, 2, 1, 2]


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="positive"):
        outlier_channels(toy_stats([1.0]), threshold=0)
    with pytest.raises(ValueError, match="positive"), track_channel_stats({}, threshold=-1.0):
        pass
    with pytest.raises(ValueError, match="k must be between 1 and"):
        top_channel_frequency([toy_stats([1.0, 2.0])], k=3)
    with pytest.raises(KeyError, match="q_proj"):
        layers_of_kind({"model.layers.0.mlp.up_proj": toy_stats([1.0])}, "q_proj")


def test_down_proj_outliers_reach_hundreds_and_spread_with_depth(stats):
    down = layers_of_kind(stats, "down_proj")
    assert len(down) == 30 and down[0].absmax.numel() == 1536
    assert 100 <= down[29].absmax.max() < 2000, "ANCHORS: |x| = 461 in layer 29 (4 x 512 tokens)"
    counts = [len(outlier_channels(s)) for s in down]
    assert min(counts[20:]) > max(counts[:10]), f"channels over 6 per layer: {counts}"
    assert counts[29] > 100


def test_q_proj_maxima_concentrate_on_a_few_channels(stats):
    q = layers_of_kind(stats, "q_proj")
    assert max(s.absmax.max() for s in q) < 20
    argmax_layers = top_channel_frequency(q, k=1)
    # 30 layers, 576 channels: scattered maxima would land on ~29 different channels.
    assert (argmax_layers > 0).sum() <= 8
    assert argmax_layers.topk(3).values.sum() >= 20
    assert 247 in argmax_layers.topk(3).indices.tolist()


def test_the_outlier_channel_dominates_token_after_token(stats):
    middle = layers_of_kind(stats, "q_proj")[15]
    channel = int(middle.absmax.argmax())
    assert middle.fraction_argmax()[channel] > 0.8  # the largest |x| of most tokens
    assert middle.fraction_over()[channel] > 0.2  # and >= 6 in a good share of them
    assert middle.fraction_over().sum() - middle.fraction_over()[channel] < 0.05
