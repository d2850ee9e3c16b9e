"""`quantcourse drill`: the drills in a terminal, with rich panels and tables.

Typing: a number with or without a unit ("12.5 GB", "11.6 GiB", "16/4.125"), or a choice's
letter. Enter alone skips (the question counts as missed and comes back next time). Input that
cannot be read is explained and asked again. Ctrl-C or the end of input stops the drill early
and still shows the summary and saves the history; in timed mode (a mock interview) the drill
stops when the time is up, also in the middle of typing, and keeps its verdicts and explanations
for the review at the end, as an interviewer would.
"""

import signal
import sys
import threading

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from .questions import TOPICS, AnswerError, Question
from .session import Drill, Summary


class TimeUp(Exception):
    """Raised by the alarm in timed mode, to leave a pending input()."""


def clock_text(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def show_question(console: Console, drill: Drill, question: Question) -> None:
    title = f"question {drill.position} of {len(drill.questions)} · {question.topic}"
    left = drill.time_left()
    if left is not None:
        title += f" · {clock_text(left)} left"
    body = escape(question.prompt)
    if question.choices:
        body += "\n\n" + "\n".join(f"  {'abcdefgh'[i]}) {escape(c)}" for i, c in enumerate(question.choices))
        hint = "answer with a letter; Enter skips"
    else:
        hint = f"answer in {question.unit} (other units work too); Enter skips" if question.unit else "a number; Enter skips"
    console.print(Panel(body, title=title, subtitle=hint, expand=False))


def show_feedback(console: Console, question: Question, verdict) -> None:
    if verdict is None:
        console.print(f"[yellow]skipped[/]: the answer is {escape(question.expected_text())}")
    elif verdict.correct:
        console.print(f"[green]✓ {escape(verdict.comment)}[/]")
    else:
        console.print(f"[red]✗ {escape(verdict.comment)}[/]")
    show_explanation(console, question)


def show_explanation(console: Console, question: Question) -> None:
    console.print(escape(question.explanation))
    if question.seed_note:
        console.print(f"[magenta]Where interview-prep notes go wrong:[/] {escape(question.seed_note)}")
    where = question.pointer + (f"; details in {question.reference}" if question.reference else "")
    console.print(f"[dim]Read: {escape(where)}[/]\n")


def ask(console: Console, drill: Drill, question: Question):
    """Read answers until one can be judged; returns the verdict (None: skipped or time up)."""
    while True:
        raw = console.input("[bold]answer>[/] ")
        try:
            return drill.answer(raw)
        except AnswerError as error:
            console.print(f"[yellow]{escape(str(error))}[/]; try again.")


def show_summary(console: Console, summary: Summary, explain: bool = False) -> None:
    """Score, score by topic, and the review of misses (with their explanations if `explain`:
    a mock interview gives no feedback until the end)."""
    reasons = {"time": "time is up", "interrupted": "stopped with Ctrl-C", "end of input": "input ended",
               "completed": "all questions answered"}  # fmt: skip
    console.rule(f"summary: {reasons[summary.ended]}")
    if not summary.asked:
        console.print("No question was answered.")
    else:
        percent = 100 * summary.correct / summary.asked
        line = f"[bold]{summary.correct} of {summary.asked} right ({percent:.0f}%)[/] in {clock_text(summary.seconds)}"
        if summary.not_reached:
            line += f"; {summary.not_reached} not reached"
        console.print(line)
        topics = Table(title="by topic")
        topics.add_column("topic")
        topics.add_column("right", justify="right")
        for topic, (right, asked) in sorted(summary.by_topic().items()):
            topics.add_row(topic, f"{right}/{asked}")
        console.print(topics)
    if summary.misses:
        review = Table(title="review of misses", show_lines=True)
        for column in ("#", "question", "you", "answer", "read"):
            review.add_column(column, overflow="fold")
        for i, outcome in enumerate(summary.outcomes, 1):
            if outcome.correct:
                continue
            q = outcome.question
            prompt = q.prompt.splitlines()[-1] if len(q.prompt) > 160 else q.prompt
            review.add_row(str(i), escape(prompt), escape(outcome.answer or "(no answer)"), escape(q.expected_text()),
                           escape(q.pointer))  # fmt: skip
        console.print(review)
        if explain:
            for i, outcome in enumerate(summary.outcomes, 1):
                if not outcome.correct:
                    console.print(f"[bold]{i}.[/] answer: {escape(outcome.question.expected_text())}")
                    show_explanation(console, outcome.question)
        console.print("Missed questions come back first in your next drill.")
    if summary.history_warning:
        console.print(f"[yellow]warning: {escape(summary.history_warning)}[/]")
    if summary.history_path:
        console.print(f"[dim]history: {summary.history_path}[/]")


def run(topic: str | None = None, count: int = 10, timed_minutes: float | None = None, seed: int | None = None,
        console: Console | None = None, history_path=None) -> int:  # fmt: skip
    """Run one drill in the terminal. Returns the exit status: 0, or 130 after Ctrl-C."""
    console = console or Console(highlight=False)
    drill = Drill(topic, count, seed, timed_minutes, history_path)
    what = TOPICS[topic] if topic else "all topics"
    mode = f", timed: {timed_minutes:g} minutes (mock interview)" if timed_minutes else ""
    console.print(f"[bold]quantcourse drill[/]: {len(drill.questions)} questions on {escape(what)}{mode}. "
                  f"Seed {drill.seed} (pass --seed {drill.seed} to repeat). Ctrl-C ends the drill.\n")  # fmt: skip
    if drill.history_warning:
        console.print(f"[yellow]warning: {escape(drill.history_warning)}[/]\n")
    alarm = timed_minutes is not None and hasattr(signal, "SIGALRM")
    previous = None
    if alarm:
        def on_alarm(signum, frame):
            raise TimeUp

        previous = signal.signal(signal.SIGALRM, on_alarm)
    ended = "completed"
    try:
        while (question := drill.current) is not None:
            show_question(console, drill, question)
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, max(drill.time_left(), 0.001))
            verdict = ask(console, drill, question)
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if drill.summary is not None:  # the answer came after the deadline
                ended = "time"
                console.print("[yellow]time is up: that answer came too late and is not scored.[/]")
                break
            if timed_minutes is None:
                show_feedback(console, question, verdict)
            else:  # a mock interview: the verdicts and explanations wait for the end
                console.print("[dim]answer recorded.[/]\n")
            if drill.expired() and drill.current is not None:
                ended = "time"
                drill.finish("time")
                break
    except TimeUp:
        console.print("\n[yellow]time is up.[/]")
        drill.time_up()
        ended = "time"
    except KeyboardInterrupt:
        console.print("\n[yellow]stopped.[/]")
        ended = "interrupted"
    except EOFError:
        console.print("\n[yellow]end of input.[/]")
        ended = "end of input"
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    # the history is written here: a second Ctrl-C must not cut the summary short (the write itself is atomic)
    main_thread = threading.current_thread() is threading.main_thread()
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        summary = drill.finish(ended)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous_int)
    show_summary(console, summary, explain=timed_minutes is not None)
    return 130 if ended == "interrupted" else 0


def main(argv=None) -> int:
    """Entry point for `python -m quantcourse.drills.terminal` (the CLI calls `run`)."""
    from ..cli import main as cli_main

    return cli_main(["drill", *(argv if argv is not None else sys.argv[1:])])
