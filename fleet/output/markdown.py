"""The audit as Markdown, ready to paste into a postmortem: headings, tables, a timeline.
Strings only, no I/O; cells are escaped like every text fleet prints (fleet/output/text.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fleet.model import SIDEKIQ_QUEUES
from fleet.output.text import cell_text, drift_line, findings_summary, one_line, when

if TYPE_CHECKING:
    from fleet.audit import AuditReport


def _md(text: object) -> str:
    return one_line(str(text).replace("|", "\\|").replace("\n", "<br>"))


def _md_table(headers: list[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return out


def audit_markdown(report: AuditReport, *, now: float | None = None) -> str:
    """Ready to paste into a postmortem: headings, tables, a timeline."""
    st = report.status
    out = [f"# Fleet audit: {report.fleet}", "",
           f"Taken {when(now or time.time())}" + (f", snapshot `{report.snapshot_id}`" if report.snapshot_id else "")
           + ".", "", "## Summary", "",
           f"- Hosts: {len(st.hosts) - len(st.unreachable)} observed, {len(st.unreachable)} unreachable"
           + (f" ({', '.join(e.host for e in st.unreachable)})" if st.unreachable else ""),
           f"- {drift_line(report)}",
           f"- Findings: {findings_summary(report.findings)}", "", "## What runs where", ""]
    rows: list[list[object]] = []
    for row in st.rows:
        rows.append([row.service or "*(undeclared)*", f"`{row.unit}`",
                     *(cell_text(c).replace("\n", " — ") for c in row.cells)])
    out += _md_table(["Service", "Unit", *st.hosts], rows)
    out += ["", "### Sidekiq queues", ""]
    cover = [[q, ", ".join(f"{p.host} `{p.unit}`" for p in st.sidekiq if q in dict(p.queues)) or "**nobody**"]
             for q in SIDEKIQ_QUEUES]
    out += _md_table(["Queue", "Served by"], cover)
    out += ["", "## Drift", ""]
    drift = [[i.host, i.kind, f"`{i.target}`", i.cls, i.detail] for i in report.drift.items if i.cls != "managed"]
    out += _md_table(["Host", "Kind", "Target", "Class", "Detail"], drift) if drift else ["No drift."]
    out += ["", "## Findings", ""]
    fs = [[f.severity, f.host or "fleet", f.message, f.hint] for f in
          sorted(report.findings, key=lambda f: (not f.is_error, f.host))]
    out += _md_table(["Severity", "Host", "Finding", "How to fix"], fs) if fs else ["None."]
    if report.since:
        out += ["", f"## Changes since {report.since}", ""]
        ch = [[c.host, c.what, c.attribution] for c in report.changes]
        out += _md_table(["Host", "Change", "Made by"], ch) if ch else ["None."]
        out += ["", "## Timeline", ""]
        out += [f"- **{when(t)}** — {_md(text)}" for t, text in report.timeline] or ["- (nothing journaled)"]
    return "\n".join(map(one_line, out)) + "\n"  # every line is one line: a line break in data is <br>
