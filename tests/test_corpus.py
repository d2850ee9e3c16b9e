"""The calibration and held-out splits of the Python manual are fixed, disjoint and complete."""

import pytest
import torch

from quantcourse import corpus


def test_splits_are_disjoint_and_cover_every_topic():
    split = corpus.split_topics()
    calibration, heldout = set(split["calibration"]), set(split["heldout"])
    assert not calibration & heldout
    assert calibration | heldout == set(corpus.topics())
    assert split["heldout"] == sorted(corpus.topics())[::4]


def test_split_texts_share_no_topic_text():
    heldout = corpus.split_text("heldout")
    for name in corpus.split_topics()["calibration"]:
        assert corpus.topics()[name] not in heldout


def test_splits_are_deterministic():
    assert corpus.split_text("heldout") == corpus.split_text("heldout")
    assert corpus.split_topics() == corpus.split_topics()


def test_windows_have_the_asked_shape_and_follow_the_text(tokenizer):
    windows = corpus.token_windows(tokenizer, "heldout", length=128, count=3)
    assert windows.shape == (3, 128) and windows.dtype == torch.int64
    ids = corpus.split_tokens(tokenizer, "heldout")
    assert torch.equal(windows.flatten(), ids[: 3 * 128])


def test_heldout_split_holds_the_default_evaluation(tokenizer):
    assert corpus.split_tokens(tokenizer, "heldout").numel() >= 32 * 512
    assert corpus.split_tokens(tokenizer, "calibration").numel() >= 64 * 512


def test_too_many_windows_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="at most .* windows of 512 tokens"):
        corpus.token_windows(tokenizer, "heldout", length=512, count=10_000)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="'calibration' or 'heldout'"):
        corpus.split_text("train")


def test_fingerprint_depends_on_content_and_shape():
    a = torch.arange(8).view(2, 4)
    assert corpus.windows_fingerprint(a) == corpus.windows_fingerprint(a.clone())
    assert corpus.windows_fingerprint(a) != corpus.windows_fingerprint(a.view(4, 2))
    assert corpus.windows_fingerprint(a) != corpus.windows_fingerprint(a + 1)
