"""The drill history: which questions were asked and missed, in a small JSON file.

Where: `<cache dir>/drills/history.json`, in the course's cache directory (runtime.cache_dir:
the per-user cache, ~/.cache/quantcourse on Linux, or the folder QUANTCOURSE_CACHE names).

What (version 1):

    {"version": 1,
     "items": {"<question id>": {"topic": "nf4", "asked": 3, "missed": 2,
                                 "last": "2026-11-24T10:00:00+00:00", "last_correct": false}},
     "sessions": [{"finished": "...", "asked": 10, "correct": 7, "topic": null,
                   "timed_minutes": null, "ended": "completed"}]}

A question id is "gen:<generator>:<seed>" or "concept:<id>", enough to ask the same question
again. Items whose last answer was wrong come back first in the next drill (`missed_first`).

Safety, because a learner's record should never be lost to a crash or a Ctrl-C:

- Atomic writes: the new content goes to a temporary file in the same folder, is flushed to
  disk, and replaces the old file with os.replace, which is atomic on POSIX and Windows; an
  interruption leaves the old file or the new one, never half of one.
- Concurrent drills: an update takes a file lock, re-reads the file, applies its answers and
  writes, so two drills that finish together both count.
- A file that cannot be used (not JSON, the wrong shape, another version) is moved aside to
  `history.json.corrupt-<time>` and the drill starts a fresh history with a warning. Single
  malformed entries are dropped, the rest kept.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..runtime import cache_dir, exclusive_lock

VERSION = 1
MAX_SESSIONS = 200


def default_path() -> Path:
    return cache_dir() / "drills" / "history.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def empty() -> dict:
    return {"version": VERSION, "items": {}, "sessions": []}


def valid_item(item) -> bool:
    counts = ("asked", "missed")
    return (
        isinstance(item, dict)
        and all(isinstance(item.get(k), int) and not isinstance(item.get(k), bool) and item[k] >= 0 for k in counts)
        and item["missed"] <= item["asked"]
        and isinstance(item.get("last_correct"), bool)
        and isinstance(item.get("topic"), str)
        and isinstance(item.get("last"), str)
    )


@dataclass
class History:
    """The history as read: `data` in the version-1 shape, and a warning if the file had to be
    repaired or set aside (None when it read cleanly or did not exist)."""

    path: Path
    data: dict = field(default_factory=empty)
    warning: str | None = None

    def missed_first(self, topic: str | None = None) -> list[str]:
        """Ids of the questions whose last answer was wrong: most often missed first, then the
        longest ago."""
        missed = [(qid, item) for qid, item in self.data["items"].items()
                  if not item["last_correct"] and (topic is None or item["topic"] == topic)]  # fmt: skip
        missed.sort(key=lambda pair: pair[1]["last"])
        missed.sort(key=lambda pair: -pair[1]["missed"])
        return [qid for qid, _ in missed]


def set_aside(path: Path, reason: str) -> str:
    """Move an unusable history file out of the way; return the warning to show."""
    backup = path.with_name(f"{path.name}.corrupt-{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
    try:
        os.replace(path, backup)
        kept = f"it was moved to {backup}"
    except OSError as error:
        kept = f"it could not be moved aside ({error}) and will be overwritten"
    return f"the drill history {path} could not be read ({reason}); {kept}. Starting a fresh history."


def read(path: Path) -> History:
    """Read the history, tolerating a missing, corrupt or foreign file (never raises for those)."""
    path = Path(path)
    if not path.exists():
        return History(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return History(path, empty(), set_aside(path, f"{type(error).__name__}: {error}"))
    if not isinstance(data, dict) or data.get("version") != VERSION:
        found = data.get("version") if isinstance(data, dict) else type(data).__name__
        return History(path, empty(), set_aside(path, f"expected version {VERSION}, found {found!r}"))
    items, sessions = data.get("items"), data.get("sessions")
    if not isinstance(items, dict) or not isinstance(sessions, list):
        return History(path, empty(), set_aside(path, "'items' or 'sessions' has the wrong type"))
    good = {qid: item for qid, item in items.items() if isinstance(qid, str) and valid_item(item)}
    sessions = [s for s in sessions if isinstance(s, dict)]
    dropped = len(items) - len(good)
    warning = f"{dropped} malformed entries of the drill history {path} were dropped" if dropped else None
    return History(path, {"version": VERSION, "items": good, "sessions": sessions}, warning)


def write_atomic(path: Path, data: dict) -> None:
    """Replace `path` with the JSON of `data` in one step (temporary file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def record(path: Path, answers: list[tuple[str, str, bool]], session: dict) -> History:
    """Add one drill's answers, (question id, topic, correct), and its session summary.

    Re-reads the file under a lock so that concurrent drills do not overwrite each other; returns
    the history as written (its warning says if the old file had to be set aside).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(path.name + ".lock")):
        history = read(path)
        items = history.data["items"]
        stamp = now()
        for qid, topic, correct in answers:
            item = items.setdefault(qid, {"topic": topic, "asked": 0, "missed": 0, "last": stamp, "last_correct": True})
            item.update(topic=topic, asked=item["asked"] + 1, missed=item["missed"] + (not correct), last=stamp,
                        last_correct=bool(correct))  # fmt: skip
        history.data["sessions"] = (history.data["sessions"] + [{"finished": stamp, **session}])[-MAX_SESSIONS:]
        write_atomic(path, history.data)
    return history
