"""Interview drills: randomized numeric questions and a concept bank, in the terminal
(`quantcourse drill`) and as a widget panel (`course/drills.ipynb`).

- `questions`: what a question is; reading and checking an answer (units, tolerance).
- `generators`: numeric questions whose answers the reference implementation computes.
- `concepts`: the concept bank (multiple choice and short numeric answers), with explanations
  and lecture pointers; numbers in explanations are computed when a question is asked.
- `history`: the local record of past answers, so that missed items come back first.
- `session`: one drill: picking the questions, scoring, timing, the review of misses.
- `terminal` and `panel`: the two front ends.
"""
