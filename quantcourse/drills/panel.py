"""The drills as an ipywidgets panel, for course/drills.ipynb.

`DrillPanel()` shows one question at a time: a text box for numeric answers (units and
arithmetic as in the terminal) or radio buttons for a choice, Check and Skip buttons, then the
verdict, the explanation, a note where common interview-prep notes get it wrong, and the
lecture section to read. After the last question (or when a timed drill runs out) it shows the
score by topic and the review of misses, and writes the history, so that missed questions come
back first, in the notebook and in `quantcourse drill` alike. "New drill" starts another with
the topic, count and time limit chosen in the controls.

The panel is driven by `session.Drill`; the clock is checked whenever a button is pressed (a
notebook has no input to interrupt).
"""

import html

import ipywidgets as widgets

from .questions import TOPICS, AnswerError, Question
from .session import Drill, Summary

ALL = "all topics"


def esc(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


class DrillPanel:
    """A drill in a widget. `panel.widget` is the VBox to display (the panel displays itself too).

    topic, count, seed, timed_minutes, history_path, use_history: as for session.Drill.
    """

    def __init__(self, topic: str | None = None, count: int = 10, seed: int | None = None,
                 timed_minutes: float | None = None, history_path=None, use_history: bool = True):  # fmt: skip
        self.history_path, self.use_history = history_path, use_history
        self.topic_menu = widgets.Dropdown(options=[ALL, *TOPICS], value=topic or ALL, description="topic")
        self.count_box = widgets.BoundedIntText(value=count, min=1, max=100, description="questions")
        self.timed_box = widgets.BoundedFloatText(value=timed_minutes or 0, min=0, max=240, step=1,
                                                  description="minutes", tooltip="0: untimed")  # fmt: skip
        self.new_button = widgets.Button(description="New drill", icon="refresh")
        self.status = widgets.HTML()
        self.question_view = widgets.HTML()
        self.text_answer = widgets.Text(placeholder="e.g. 4.127, 12.5 GB, 16/4.125", description="answer")
        self.choice_answer = widgets.RadioButtons(options=[], layout=widgets.Layout(width="auto"))
        self.check_button = widgets.Button(description="Check", button_style="primary")
        self.skip_button = widgets.Button(description="Skip")
        self.next_button = widgets.Button(description="Next", disabled=True)
        self.feedback = widgets.HTML()
        self.answer_box = widgets.VBox()
        self.check_button.on_click(lambda _: self.check())
        self.skip_button.on_click(lambda _: self.skip())
        self.next_button.on_click(lambda _: self.next())
        self.new_button.on_click(lambda _: self.start(seed=None))
        self.widget = widgets.VBox([
            widgets.HBox([self.topic_menu, self.count_box, self.timed_box, self.new_button]),
            self.status, self.question_view, self.answer_box,
            widgets.HBox([self.check_button, self.skip_button, self.next_button]), self.feedback,
        ])  # fmt: skip
        self.start(seed)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------ driving the drill

    def start(self, seed: int | None = None) -> None:
        topic = None if self.topic_menu.value == ALL else self.topic_menu.value
        minutes = self.timed_box.value or None
        self.drill = Drill(topic, int(self.count_box.value), seed, minutes, self.history_path, self.use_history)
        self.feedback.value = (f"<span style='color:#b36b00'>{esc(self.drill.history_warning)}</span>"
                               if self.drill.history_warning else "")  # fmt: skip
        self.show()

    @property
    def question(self) -> Question | None:
        return self.drill.current

    def show(self) -> None:
        """Draw the current question, or the summary when the drill is over."""
        question = self.question
        if question is None:
            return self.show_summary(self.drill.finish())
        left = self.drill.time_left()
        clock = f" · {int(left) // 60}:{int(left) % 60:02d} left" if left is not None else ""
        right = sum(o.correct for o in self.drill.outcomes)
        self.status.value = (f"<b>question {self.drill.position} of {len(self.drill.questions)}</b> · {question.topic}"
                             f" · {right} right so far{clock} · seed {self.drill.seed}")  # fmt: skip
        self.question_view.value = f"<div style='font-size:1.05em'>{esc(question.prompt)}</div>"
        if question.choices:
            self.choice_answer.options = [(f"{'abcdefgh'[i]}) {c}", i) for i, c in enumerate(question.choices)]
            self.choice_answer.value = None
            self.answer_box.children = [self.choice_answer]
        else:
            self.text_answer.value = ""
            self.text_answer.description = f"answer ({question.unit})" if question.unit else "answer"
            self.answer_box.children = [self.text_answer]
        self.check_button.disabled = self.skip_button.disabled = False
        self.next_button.disabled = True

    def typed(self) -> str:
        """The current answer as text, the way the terminal would receive it."""
        if self.question.choices:
            return "" if self.choice_answer.value is None else "abcdefgh"[self.choice_answer.value]
        return self.text_answer.value

    def check(self) -> None:
        if self.question is None or self.check_button.disabled:
            return
        if not self.typed().strip():
            self.feedback.value = "<span style='color:#b36b00'>Type an answer (or press Skip).</span>"
            return
        self._judge(self.typed())

    def skip(self) -> None:
        if self.question is not None and not self.skip_button.disabled:
            self._judge("")

    def _judge(self, raw: str) -> None:
        question = self.question
        try:
            verdict = self.drill.answer(raw)
        except AnswerError as error:
            self.feedback.value = f"<span style='color:#b36b00'>{esc(str(error))}</span>"
            return
        if self.drill.summary is not None and self.drill.summary.ended == "time":
            return self.show_summary(self.drill.summary, "Time is up: that answer came too late and is not scored.")
        if self.drill.timed_minutes is not None:  # a mock interview: verdicts and explanations wait for the end
            self.feedback.value = "<i>Answer recorded.</i>"
        elif verdict is None:
            self.feedback.value = f"<b style='color:#b36b00'>Skipped.</b> The answer is {esc(question.expected_text())}." + self.explain(question)
        else:
            color, mark = ("green", "✓") if verdict.correct else ("#c00", "✗")
            self.feedback.value = f"<b style='color:{color}'>{mark} {esc(verdict.comment)}</b>" + self.explain(question)
        self.check_button.disabled = self.skip_button.disabled = True
        self.next_button.disabled = False
        if self.drill.expired() and self.drill.current is not None:
            self.next_button.description = "Summary"

    @staticmethod
    def explain(question: Question) -> str:
        text = f"<p>{esc(question.explanation)}</p>"
        if question.seed_note:
            text += f"<p><i>Where interview-prep notes go wrong:</i> {esc(question.seed_note)}</p>"
        where = question.pointer + (f"; details in {question.reference}" if question.reference else "")
        return text + f"<p style='color:#666'>Read: {esc(where)}</p>"

    def next(self) -> None:
        self.next_button.description = "Next"
        if self.drill.expired() and self.drill.current is not None:
            return self.show_summary(self.drill.finish("time"), "Time is up.")
        self.feedback.value = ""
        self.show()

    # ------------------------------------------------------------ the end

    def show_summary(self, summary: Summary, note: str = "") -> None:
        self.check_button.disabled = self.skip_button.disabled = self.next_button.disabled = True
        self.answer_box.children = []
        self.question_view.value = ""
        self.status.value = "<b>Drill finished.</b> " + esc(note)
        self.feedback.value = summary_html(summary)


def summary_html(summary: Summary) -> str:
    """Score, score by topic and the review of misses, as HTML."""
    if not summary.asked:
        return "<p>No question was answered.</p>"
    parts = [f"<h4>{summary.correct} of {summary.asked} right ({100 * summary.correct / summary.asked:.0f}%)"
             + (f", {summary.not_reached} not reached" if summary.not_reached else "") + "</h4>"]  # fmt: skip
    rows = "".join(f"<tr><td>{t}</td><td>{r}/{a}</td></tr>" for t, (r, a) in sorted(summary.by_topic().items()))
    parts.append(f"<table><tr><th>topic</th><th>right</th></tr>{rows}</table>")
    if summary.misses:
        parts.append("<h4>Review of misses</h4>")
        for outcome in summary.misses:
            q = outcome.question
            parts.append(f"<div style='margin-bottom:1em'><b>{esc(q.prompt)}</b><br>you: {esc(outcome.answer or '(no answer)')}"
                         f" · answer: {esc(q.expected_text())}{DrillPanel.explain(q)}</div>")  # fmt: skip
        parts.append("<p>Missed questions come back first in your next drill.</p>")
    if summary.history_warning:
        parts.append(f"<p style='color:#b36b00'>{esc(summary.history_warning)}</p>")
    return "".join(parts)
