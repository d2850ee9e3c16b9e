"""A grading report as text (terminal), HTML (notebook, classroom feedback) and JSON."""

import html

STATUS_MARK = {"passed": "ok", "failed": "wrong", "error": "error", "timeout": "timeout", "crashed": "crashed",
               "missing": "missing", "forbidden": "refused", "manual": "manual"}  # fmt: skip


def as_text(report: dict) -> str:
    """report: the dict of Report.to_json()."""
    lines = [f"{report['notebook']}: {report['score']:g} / {report['max_score']:g} points", ""]
    for test in report["tests"]:
        mark = STATUS_MARK.get(test["status"], test["status"])
        lines.append(f"  [{mark:>7}] {test['name']:<40} {test['points']:g}/{test['max_points']:g}")
        if test["status"] not in ("passed", "manual"):
            lines += [f"            {line}" for line in test["feedback"].splitlines()]
    for cell, why in report.get("cell_errors", {}).items():
        lines.append(f"  note: cell {cell} did not run: {why}")
    for cell, why in report.get("skipped_cells", {}).items():
        lines.append(f"  note: cell {cell} was left out because {why}")
    return "\n".join(lines)


def as_html(report: dict) -> str:
    """A self-contained HTML table (no scripts); safe to show to learners."""
    rows = []
    for test in report["tests"]:
        ok = test["status"] == "passed"
        color = "#1a7f37" if ok else ("#6e7781" if test["status"] == "manual" else "#cf222e")
        rows.append(
            f"<tr><td>{html.escape(test['name'])}</td>"
            f"<td style='color:{color}'>{html.escape(STATUS_MARK.get(test['status'], test['status']))}</td>"
            f"<td>{test['points']:g} / {test['max_points']:g}</td>"
            f"<td style='white-space:pre-wrap'>{html.escape(test['feedback'])}</td></tr>"
        )
    notes = [f"<li>cell {html.escape(str(c))} did not run: {html.escape(w)}</li>" for c, w in report.get("cell_errors", {}).items()]
    notes += [f"<li>cell {html.escape(str(c))} was left out because {html.escape(w)}</li>" for c, w in report.get("skipped_cells", {}).items()]
    return (
        f"<div class='quantcourse-report'><h3>{html.escape(str(report['notebook']))}: "
        f"{report['score']:g} / {report['max_score']:g} points</h3>"
        "<table><thead><tr><th>case group</th><th>result</th><th>points</th><th>feedback</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        + (f"<ul>{''.join(notes)}</ul>" if notes else "")
        + "</div>"
    )
