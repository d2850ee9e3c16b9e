"""One drill: choosing the questions, taking answers, timing, scoring and the review of misses.

Both front ends (the terminal's `quantcourse drill` and the notebook panel) drive a `Drill`:

    drill = Drill(topic="nf4", count=10, seed=3)
    while (q := drill.current) is not None:
        verdict = drill.answer(text)      # AnswerError: unreadable, ask again; "" skips (a miss)
    summary = drill.finish()              # score, misses, and the history written once

Choosing: questions missed last time (on this topic) come first, asked again exactly as they
were; the rest are drawn at random, half from the numeric generators and half from the concept
bank, never the same question twice in one drill. The seed makes a drill repeatable.

Timed mode (a mock interview): `timed_minutes` sets a deadline for the whole drill. An answer
given after it is not scored, the question on screen when time runs out counts as missed, and the
drill ends; questions never reached are reported, not scored.
"""

import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import concepts, generators, history
from .questions import TOPICS, AnswerError, Question, Verdict


@dataclass(frozen=True)
class Outcome:
    """One asked question and what became of it. answer is None when skipped or out of time."""

    question: Question
    answer: str | None
    verdict: Verdict | None
    seconds: float

    @property
    def correct(self) -> bool:
        return self.verdict is not None and self.verdict.correct


@dataclass(frozen=True)
class Summary:
    outcomes: tuple[Outcome, ...]
    not_reached: int
    ended: str  # "completed", "time", "interrupted", "end of input"
    seconds: float
    history_path: Path | None
    history_warning: str | None

    @property
    def asked(self) -> int:
        return len(self.outcomes)

    @property
    def correct(self) -> int:
        return sum(o.correct for o in self.outcomes)

    @property
    def misses(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.correct]

    def by_topic(self) -> dict[str, tuple[int, int]]:
        """topic -> (right, asked)."""
        asked = Counter(o.question.topic for o in self.outcomes)
        right = Counter(o.question.topic for o in self.outcomes if o.correct)
        return {topic: (right[topic], asked[topic]) for topic in asked}


def question_from_id(qid: str, rng: random.Random) -> Question | None:
    """Rebuild a question from its history id; None if it no longer exists or is unavailable."""
    kind, _, rest = qid.partition(":")
    try:
        if kind == "gen":
            name, _, seed = rest.rpartition(":")
            if name in generators.GENERATORS and generators.GENERATORS[name].available():
                return generators.generate(name, int(seed))
        elif kind == "concept" and rest in concepts.CONCEPTS_BY_ID:
            concept = concepts.CONCEPTS_BY_ID[rest]
            return concept.question(rng) if concept.available(concepts.facts()) else None
    except (ValueError, LookupError):
        return None
    return None


class Drill:
    """A drill of `count` questions on `topic` (None: all topics).

    seed: makes the choice repeatable (None: a random one, kept in `self.seed`).
    timed_minutes: a deadline for the whole drill (mock interview), or None.
    history_path: where the history lives (None: history.default_path()); use_history=False
    neither reads nor writes it. clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, topic: str | None = None, count: int = 10, seed: int | None = None,
                 timed_minutes: float | None = None, history_path: Path | None = None, use_history: bool = True,
                 clock=time.monotonic):  # fmt: skip
        if topic is not None and topic not in TOPICS:
            raise ValueError(f"unknown topic {topic!r}; choose one of: {', '.join(TOPICS)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive whole number of questions, got {count!r}")
        if timed_minutes is not None and not timed_minutes > 0:
            raise ValueError(f"timed_minutes must be a positive number of minutes, got {timed_minutes!r}")
        self.topic, self.count, self.timed_minutes, self.clock = topic, count, timed_minutes, clock
        self.seed = seed if seed is not None else secrets.randbelow(10**6)
        self.use_history = use_history
        self.history_path = Path(history_path) if history_path else (history.default_path() if use_history else None)
        past = history.read(self.history_path) if use_history else history.History(Path("."))
        self.history_warning = past.warning
        self.questions = self.choose(past)
        self.outcomes: list[Outcome] = []
        self.started = clock()
        self.asked_at = self.started
        self.summary: Summary | None = None

    # ------------------------------------------------------------ choosing

    def choose(self, past: history.History) -> list[Question]:
        rng = random.Random(self.seed)
        chosen, seen = [], set()
        for qid in past.missed_first(self.topic):
            if len(chosen) == self.count:
                break
            question = question_from_id(qid, rng)
            if question is not None and qid not in seen:
                chosen.append(question)
                seen |= {qid, question.explanation}
        makers = [g for g in generators.GENERATORS.values() if (self.topic in (None, g.topic)) and g.available()]
        bank = [c for c in concepts.available_concepts(self.topic) if f"concept:{c.cid}" not in seen]
        rng.shuffle(bank)
        if not makers and not bank and not chosen:
            raise LookupError(f"no questions are available on topic {self.topic!r}")
        attempts = 0
        while len(chosen) < self.count and attempts < 50 * self.count:
            attempts += 1
            if bank and (not makers or rng.random() < 0.5):
                question = bank.pop().question(rng)
            elif makers:
                question = generators.generate(rng.choice(makers).name, rng.randrange(10**6))
            else:
                break
            # the same content under another seed (a recipe pair, a block size) counts as seen too
            if question.qid not in seen and question.explanation not in seen:
                chosen.append(question)
                seen |= {question.qid, question.explanation}
        return chosen

    # ------------------------------------------------------------ asking

    @property
    def current(self) -> Question | None:
        if self.summary is not None or len(self.outcomes) >= len(self.questions):
            return None
        return self.questions[len(self.outcomes)]

    @property
    def position(self) -> int:
        """1-based number of the current question."""
        return len(self.outcomes) + 1

    def time_left(self) -> float | None:
        """Seconds left in timed mode (never below 0), None when untimed."""
        if self.timed_minutes is None:
            return None
        return max(0.0, self.started + 60 * self.timed_minutes - self.clock())

    def expired(self) -> bool:
        left = self.time_left()
        return left is not None and left <= 0

    def _record(self, answer: str | None, verdict: Verdict | None) -> None:
        moment = self.clock()
        self.outcomes.append(Outcome(self.current, answer, verdict, moment - self.asked_at))
        self.asked_at = moment

    def answer(self, raw: str) -> Verdict | None:
        """Judge `raw` for the current question and move on.

        Returns the verdict; None when `raw` is empty (skipped: counted as a miss) or when the
        time was up before it came (then the drill ends). Raises AnswerError when `raw` cannot be
        read; the question stays current, nothing is recorded.
        """
        question = self.current
        if question is None:
            raise RuntimeError("the drill has no current question: it is finished")
        if self.expired():
            self.time_up()
            return None
        if not raw.strip():
            self._record(None, None)
            return None
        verdict = question.check(raw)
        self._record(raw.strip(), verdict)
        return verdict

    def time_up(self) -> Summary:
        """End a timed drill: the question on screen counts as missed (no answer in time)."""
        if self.current is not None:
            self._record(None, None)
        return self.finish("time")

    # ------------------------------------------------------------ finishing

    def finish(self, ended: str | None = None) -> Summary:
        """Close the drill (idempotent) and write its answers to the history once."""
        if self.summary is not None:
            return self.summary
        ended = ended or "completed"
        warning = self.history_warning
        if self.use_history and self.outcomes:
            try:
                written = history.record(
                    self.history_path,
                    [(o.question.qid, o.question.topic, o.correct) for o in self.outcomes],
                    {"asked": len(self.outcomes), "correct": sum(o.correct for o in self.outcomes), "topic": self.topic,
                     "timed_minutes": self.timed_minutes, "ended": ended, "seed": self.seed},
                )  # fmt: skip
                warning = warning or written.warning
            except OSError as error:  # a read-only or full disk costs the record, never the drill
                warning = f"the drill history could not be saved to {self.history_path}: {error}"
        self.summary = Summary(tuple(self.outcomes), len(self.questions) - len(self.outcomes), ended,
                               self.clock() - self.started, self.history_path if self.use_history else None, warning)  # fmt: skip
        return self.summary


__all__ = ["AnswerError", "Drill", "Outcome", "Summary"]
