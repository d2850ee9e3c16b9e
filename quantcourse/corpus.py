"""The course's text: the Python reference manual that every CPython ships.

`pydoc_data.topics.topics` maps about 80-90 topic names ("assignment", "class", "for", ...) to
their manual text, ~465k characters and ~113k SmolLM2 tokens. It is English technical prose the
model never saw in this exact form, and it is on every machine without a download.

The split is deterministic and documented so every lesson, lab and results table agrees:
sort the topic names; the topics at positions 0, 4, 8, ... (every fourth, starting with the first)
are the held-out evaluation set; all others are the calibration set. Within each set, topics are
joined in sorted order, separated by a blank line. With Python 3.11 that gives 20 held-out topics
(~29.7k tokens) and 59 calibration topics (~83k tokens). The manual differs slightly between
Python versions, so results record the Python version they were computed with.
"""

import hashlib
from typing import Literal

import torch

HELDOUT_EVERY = 4
Split = Literal["calibration", "heldout"]


def topics() -> dict[str, str]:
    """All manual topics, name -> text."""
    from pydoc_data.topics import topics as manual

    return dict(manual)


def split_topics() -> dict[str, list[str]]:
    """Topic names of each split, sorted: {"calibration": [...], "heldout": [...]}."""
    names = sorted(topics())
    return {
        "calibration": [n for i, n in enumerate(names) if i % HELDOUT_EVERY != 0],
        "heldout": [n for i, n in enumerate(names) if i % HELDOUT_EVERY == 0],
    }


def split_text(split: Split) -> str:
    """The text of one split: its topics in sorted order, joined by a blank line."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
    manual = topics()
    return "\n\n".join(manual[name] for name in split_topics()[split])


def split_tokens(tokenizer, split: Split) -> torch.Tensor:
    """All token ids of one split: [n_tokens] int64, no BOS token added."""
    ids = tokenizer(split_text(split), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokenizer, split: Split, length: int, count: int) -> torch.Tensor:
    """`count` consecutive, non-overlapping windows of `length` tokens from the split's start.

    Returns [count, length] int64. Raises ValueError if the split is too short.
    """
    if length < 2 or count < 1:
        raise ValueError(f"need length >= 2 and count >= 1, got length={length}, count={count}")
    ids = split_tokens(tokenizer, split)
    available = ids.numel() // length
    if count > available:
        raise ValueError(
            f"the {split} split has {ids.numel()} tokens: at most {available} windows of "
            f"{length} tokens, but {count} were asked for. Ask for fewer or shorter windows."
        )
    return ids[: count * length].view(count, length).clone()


def windows_fingerprint(windows: torch.Tensor) -> str:
    """Short SHA-256 of a window tensor, to key cached results computed on it."""
    data = windows.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data + str(tuple(windows.shape)).encode()).hexdigest()[:16]
