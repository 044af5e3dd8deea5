"""Text for people: the tables and sentences fleet prints on a terminal.  Strings only, no I/O.

Every command's human output is made here from the plain results its workflow returns
(fleet/workflows/); markdown.py makes the audit's Markdown and json.py every JSON document.
Tables are drawn here in tabulate's "simple" format without importing tabulate (`table`): fleet
knows which of its columns are numbers, and tabulate's guessing of each cell was the larger part
of `fleet status` at 1,000 hosts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from fleet.actions import SUMMARY_BUCKETS, Change
from fleet.model import SIDEKIQ_QUEUES, Finding, HostError
from fleet.resources.base import ADDED, CHANGED, DIFF, PLAIN, REMOVED, Detail
from fleet.resources.registry import BY_ACTION, SPECS
from fleet.textutil import is_printable, printable

if TYPE_CHECKING:
    from fleet.audit import AuditReport, ObservedChange
    from fleet.history_cache import RunSummary
    from fleet.journal import RunRecord, SnapshotRecord, StepRecord
    from fleet.model import Desired
    from fleet.plan import Plan
    from fleet.results import ApplyResult
    from fleet.sidekiq import SidekiqReport
    from fleet.status import Cell, StatusReport
    from fleet.workflows.adopt import AdoptResult
    from fleet.workflows.lock import LockReport

# Every string shown to a person goes through `printable` (fleet.textutil) before it is shown:
# names, states, messages and file contents come from files and hosts, and a control character
# in them could colour, move or hide what the reviewer reads.  Colour codes are fleet's own,
# added after escaping.  JSON is never escaped here: json escapes control characters itself.


def use_color(stream_isatty: bool) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream_isatty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _paint(text: str, code: str, color: bool) -> str:
    text = printable(text, multiline=False)
    return f"\033[{code}m{text}\033[0m" if color else text


def one_line(text: str) -> str:
    """One line of output, escaped (a line break inside it is data too)."""
    return printable(text, multiline=False)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A table in tabulate's "simple" format, each cell escaped first (so that columns still line up).

    fleet draws it itself, the way tabulate draws it when told each column's alignment
    (tests/unit/test_output_tables.py holds the two side by side): tabulate, left to guess,
    read every cell for a number, and at 1,000 hosts that guessing was half of `fleet status`.
    A column of integers (counts, PIDs) and blanks is right-aligned, any other column left-aligned
    (`column_alignment`).  Cells are stripped of surrounding whitespace; a cell of several lines
    makes its row that many lines high; trailing blanks are cut from every line.
    """
    if any(len(row) != len(headers) for row in rows):
        raise ValueError(f"a table row is not {len(headers)} cells long, as its headers are")
    raw = list(zip(*rows, strict=True)) if rows else [() for _ in headers]
    escaped = [_column_text(column) for column in raw]
    right = [column_alignment(column) == "right" for column in raw]
    # a line break anywhere, even one the stripping removes, makes the table a table of multi-line
    # cells, where a row of empty cells takes no line at all (as in tabulate)
    multiline = any("\n" in h for h in headers) or any("\n" in c for column in escaped for c in column)
    columns = [[c.strip() for c in column] for column in escaped]
    width_of = _width if multiline else len
    widths = [max([width_of(h) + 2, *map(width_of, cells)]) for h, cells in zip(headers, columns, strict=True)]
    head = "  ".join(h.rjust(w) if r else h.ljust(w) for h, w, r in zip(headers, widths, right, strict=True))
    lines = [head.rstrip(), "  ".join("-" * w for w in widths)]
    padded = [[c.rjust(w) if r else c.ljust(w) for c in column] if not multiline else
              [[line.rjust(w) if r else line.ljust(w) for line in c.split("\n")] if c else [] for c in column]
              for column, w, r in zip(columns, widths, right, strict=True)]
    if not multiline:
        lines += ["  ".join(row).rstrip() for row in zip(*padded, strict=True)]
    else:
        blanks = [" " * w for w in widths]
        for row in zip(*padded, strict=True):
            height = max(map(len, row))  # an empty cell has no line: a row of empty cells none at all
            for n in range(height):
                line = "  ".join(c[n] if n < len(c) else blank for c, blank in zip(row, blanks, strict=True))
                lines.append(line.rstrip())
    return "\n".join(lines)


def _column_text(column: Sequence[object]) -> list[str]:
    """A column's cells as shown (before stripping): an integer in digits, nothing for None,
    anything else escaped — looked at once per column: a text has something to escape exactly
    when one of its parts has (what is escaped is single characters)."""
    texts = ["" if c is None else c if isinstance(c, str) else str(c) for c in column]
    return texts if is_printable("".join(texts)) else [printable(t) for t in texts]


def _width(cell: str) -> int:
    return max(map(len, cell.split("\n")))


def column_alignment(column: Sequence[object]) -> str:
    """"right" for a column of integers and blanks (at least one integer), else "left".

    Only a Python int is a number here: a bool is shown as text (as tabulate shows it), and so is
    a string of digits — fleet's numbers reach its tables as ints, its names and states as
    strings, and a host called "1e3" is not the number 1000.  A column that mixes numbers with
    text ("?" for unknown) is a text column."""
    number = False
    for value in column:
        if type(value) is int:
            number = True
        elif value is not None and value != "":
            return "left"
    return "right" if number else "left"


def finding_location(f: Finding) -> str:
    loc = f.file or ""
    if f.line is not None:
        loc += f":{f.line}" + (f":{f.column}" if f.column is not None else "")
    return loc


def findings_text(findings: Sequence[Finding], *, color: bool = False) -> str:
    """Errors first, then warnings; each with where, what, and how to fix it."""
    lines: list[str] = []
    ordered = sorted(findings, key=lambda f: (not f.is_error, f.file, f.line or 0))
    for f in ordered:
        label = _paint(f"{f.severity}:", "31;1" if f.is_error else "33;1", color)
        where = finding_location(f)
        head = f"{label} " + one_line(where + (f" [{f.key}]" if f.key else ""))
        lines.append(head.rstrip())
        lines.append(one_line(f"  {f.message}"))
        if f.hint:
            lines.append(one_line(f"  hint: {f.hint}"))
    return "\n".join(lines)


def findings_summary(findings: Sequence[Finding]) -> str:
    errors = sum(f.is_error for f in findings)
    notes = sum(f.severity == "note" for f in findings)  # an acknowledged broken history chain
    warnings = len(findings) - errors - notes
    return (f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
            + (f", {notes} note{'s' * (notes != 1)}" if notes else ""))


def check_text(desired: Desired | None, findings: Sequence[Finding], *, color: bool = False) -> str:
    """`fleet check`: every finding, then what was checked, or that the check failed."""
    out = [findings_text(findings, color=color), ""] if findings else []
    if desired is not None and not any(f.is_error for f in findings):
        out.append(printable(f"{desired.name}: {len(desired.hosts)} hosts, {len(desired.services)} services, "
                             f"{len(desired.env_files)} env files — {findings_summary(findings)}"))
    else:
        out.append(f"check failed: {findings_summary(findings)}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- status

_MARK = {"ok": "", "drift": " (!)", "unmanaged": " (unmanaged)", "present": " (undeclared)", "absent": "",
         "unknown": "?"}


def cell_text(c: Cell) -> str:
    if c.status == "absent":
        return "·"
    if c.status == "unknown":
        return "?"
    text = c.state + _MARK[c.status]
    if c.status == "drift" and c.detail:
        text += f"\n{c.detail}"
    if c.notes:
        text += "\n" + "; ".join(c.notes)
    return text


def status_text(report: StatusReport, *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    out: list[str] = []
    headers = ["SERVICE", "UNIT", *report.hosts]
    rows = []
    for row in report.rows:
        label = row.service if row.service else "(undeclared)"
        rows.append([label, row.unit, *(cell_text(c) for c in row.cells)])
    out.append(table(rows, headers))
    out.append("legend: (!) differs from the desired state · (unmanaged) runs where nobody declared it · "
               "(undeclared) installed, not declared here · '·' absent · '?' host did not answer")
    out.append("")
    out.append(hosts_text(report, now))
    out.append("")
    out.append(sidekiq_text(report))
    if report.live is not None:
        out += ["", sidekiq_live_text(report.live)]
    return printable("\n".join(out).rstrip() + "\n")


def hosts_text(report: StatusReport, now: float) -> str:
    # what the kinds found wrong behind each host's units (a failed database cluster …), gathered
    # in one pass: looked for per host among every cell, it made `status` quadratic in hosts
    problems_of: dict[str, list[str]] = {}
    for row in report.rows:
        for c in row.cells:
            for p in c.problems:
                problems_of.setdefault(c.host, []).append(f"(!) {row.service}: {p.message}")
    rows = []
    for name in report.hosts:
        r = report.results[name]
        if isinstance(r, HostError):
            rows.append([name, f"NO: {r.kind}", "", "", "", "", r.message + (f" — {r.hint}" if r.hint else "")])
            continue
        f = r.facts
        used = f.mem_total_kb - f.mem_available_kb
        mem = f"{used / 1024:.0f}/{f.mem_total_kb / 1024:.0f} MiB" if f.mem_total_kb else ""
        age = max(0.0, now - r.collected_at)
        systemd = f.systemd_version.split()[0] if f.systemd_version else "?"
        problems = problems_of.get(name, [])
        rows.append([name, "yes", f.system_state, " ".join(f"{x:.2f}" for x in f.load), mem,
                     f"{age:.0f}s ago ({r.duration:.2f}s)", "\n".join([f"{f.os}, systemd {systemd}", *problems])])
    return table(rows, ["HOST", "REACHABLE", "SYSTEM", "LOAD", "MEMORY", "DATA", "DETAIL"])


def sidekiq_text(report: StatusReport) -> str:
    out = ["Sidekiq"]
    rows = []
    for p in report.sidekiq:
        queues = " ".join(q if w is None else f"{q},{w}" for q, w in p.queues) or "(config/sidekiq.yml)"
        rows.append([p.host, p.unit, p.concurrency if p.concurrency is not None else "?", queues,
                     p.db_pool if p.db_pool is not None else "?", "" if p.declared else "UNDECLARED"])
    if rows:
        headers = ["HOST", "UNIT", "-c", "QUEUES", "DB_POOL", ""]
        if not any(r[-1] for r in rows):  # no UNDECLARED mark: no empty column either
            rows, headers = [r[:-1] for r in rows], headers[:-1]
        out.append(table(rows, headers))
    else:
        out.append("  no running Sidekiq process found")
    # one pass over the processes (a queue list per process, not per process and queue)
    servers: dict[str, list[str]] = {q: [] for q in SIDEKIQ_QUEUES}
    for p in report.sidekiq:
        for q in dict(p.queues):  # a queue named twice in one process: that process once
            if q in servers:
                servers[q].append(f"{p.host}:{p.unit}")
    cover = [[q, ", ".join(by) if by else "NOBODY (!)"] for q, by in servers.items()]
    out.append("")
    out.append(table(cover, ["QUEUE", "SERVED BY"]))
    if report.queue_findings:
        out.append("")
        out += [f"! {f.message}" for f in report.queue_findings if f.code != "sidekiq.queue-unserved"]
        unserved = [f for f in report.queue_findings if f.code == "sidekiq.queue-unserved"]
        if unserved:
            out.append(f"! {len(unserved)} queue(s) served by no running Sidekiq process: their jobs pile up")
    if report.unreachable:
        out.append(f"note: {len(report.unreachable)} host(s) did not answer; queue coverage may be incomplete")
    return printable("\n".join(out))


def _age(seconds: float | None) -> str:
    return "" if seconds is None else f"{max(0.0, seconds):.0f}s"


def sidekiq_live_text(live: SidekiqReport) -> str:
    """Sidekiq's own view (its heartbeats and queues in Redis) beside systemd's: each live process
    with the unit it was joined to, each queue with who serves it by systemd and by heartbeat."""
    view = live.view
    where = f" ({view.target.describe()})" if view.target else ""
    out = [f"Sidekiq's own view: Redis read on {live.host}{where}"]
    if view.error:
        out.append(f"  unavailable: {view.error}")
    else:
        rows: list[list[object]] = []
        for m in live.matches:
            p = m.process
            unit = f"{m.unit.unit} (by {m.how})" if m.unit else "NO UNIT (!)"
            rows.append([m.host or f"{p.hostname} (?)", p.pid, p.tag, p.concurrency,
                         " ".join(q if not w else f"{q},{w}" for q, w in p.queues) or "none", p.busy,
                         f"{_age(live.now - p.beat)} ago", "quiet" if p.quiet else "", unit])
        for u in live.silent:
            if u.active:
                rows.append([u.host, u.main_pid, "", "", "", "", "no heartbeat", "", f"{u.unit} (!)"])
        if rows:
            out.append(table(rows, ["HOST", "PID", "TAG", "-c", "QUEUES", "BUSY", "LAST BEAT", "QUIET", "UNIT"]))
        else:
            out.append("  no live Sidekiq process heartbeats in Redis")
        queues = [[q.name, "" if q.size is None else q.size, _age(q.latency) if q.size else "",
                   ", ".join(q.by_systemd) or "-", ", ".join(q.by_heartbeat) or ("NOBODY (!)" if q.size else "-")]
                  for q in live.queues]
        out += ["", table(queues, ["QUEUE", "SIZE", "LATENCY", "BY SYSTEMD", "BY HEARTBEAT"])]
    if live.findings:
        out.append("")
        out += [f"{'!' if f.is_error else '~'} {f.message}" for f in live.findings]
    return printable("\n".join(out))


# ---------------------------------------------------------------- plan

_SYMBOL_COLORS = {"+": "32", "~": "33", "-": "31", "↻": "36"}
# How a detail line of a change (resources.base) is painted, and whether its colour includes the
# indentation: key lines are painted whole, diff lines from their first character.
_DETAIL_COLORS = {PLAIN: ("0", False), ADDED: ("32", True), REMOVED: ("31", True), CHANGED: ("33", True)}


def _title(c: Change) -> str:
    """`write-unit mastodon-web.service`, or `daemon-reload`: what the change does to what."""
    return f"{c.action} {c.target}" if SPECS[c.action].shows_target else str(c.action)


def _diff_lines(text: str, color: bool) -> list[str]:
    """A diff's lines as the plan shows them: indented, `+` green and `-` red, each escaped."""
    return _diff_lines_of(text.rstrip("\n").split("\n"), is_printable(text), color)


def _diff_lines_of(lines: list[str], clean: bool, color: bool) -> list[str]:
    """`lines` (of a diff, `clean`: none with anything to escape) as the plan shows them."""
    if clean:  # no line to escape (true of a text exactly when of each line): a bare plan's 500,000
        if not color:
            return ["      " + line for line in lines]
        return [f"      \033[32m{line}\033[0m" if line.startswith("+") else
                f"      \033[31m{line}\033[0m" if line.startswith("-") else "      " + line for line in lines]
    out = []
    for line in lines:
        code = "32" if line.startswith("+") else "31" if line.startswith("-") else "0"
        out.append("      " + _paint(line, code, color and code != "0"))  # escapes even unpainted
    return out


class _Rendered:
    """What `plan_text` has rendered already, by what it depends on.  A bare 1,000-host plan shows
    each service's new-unit diff once per host: the same lines under a ---/+++ pair that names the
    host, so a diff's body (after those two lines) is rendered once, as one block of lines, and
    so is each distinct heading and detail line."""

    def __init__(self, color: bool) -> None:
        self.color = color
        self.heads: dict[tuple[str, str, str, str], str] = {}
        self.bodies: dict[str, str] = {}
        self.lines: dict[tuple[str, str], str] = {}

    def head(self, sym: str, c: Change) -> str:
        key = (sym, c.action, c.target, c.reason)
        line = self.heads.get(key)
        if line is None:
            head = _paint(f"  {sym} {_title(c)}", _SYMBOL_COLORS.get(sym, "0"), self.color)
            line = self.heads[key] = head + one_line(f"  — {c.reason}")
        return line

    def details(self, details: list[Detail]) -> list[str]:
        out: list[str] = []
        for detail in details:
            line = self.lines.get(detail)
            if line is not None:
                out.append(line)
            elif detail[0] != DIFF:
                out.append(self.line(detail))
            else:
                out += self.diff(detail[1])
        return out

    def line(self, detail: Detail) -> str:
        style, text = detail
        code, whole = _DETAIL_COLORS[style]
        line = self.lines[detail] = _paint(f"      {text}", code, self.color) if whole else one_line(f"      {text}")
        return line

    def diff(self, text: str) -> list[str]:
        # Lines are rendered one by one, each alone: the ---/+++ pair, then the body, which the
        # hosts share, as one block (`plan_text` joins every entry with a line break).
        second = text.find("\n", text.find("\n") + 1)
        body = text[second + 1:] if second >= 0 else ""
        if not body.rstrip("\n"):  # no body to share: as it comes
            return _diff_lines(text, self.color)
        head = text[:second]
        block = self.bodies.get(body)
        if block is None:
            block = self.bodies[body] = "\n".join(_diff_lines(body, self.color))
        return [*_diff_lines_of(head.split("\n"), is_printable(head), self.color), block]


def _details(c: Change, color: bool) -> list[str]:
    """The detail lines under a change in the plan text."""
    return _Rendered(color).details(BY_ACTION[c.action].details(c))


def plan_text(plan: Plan, *, color: bool = False, show_waves: bool = True) -> str:
    return "\n".join(plan_lines(plan, color=color, show_waves=show_waves)) + "\n"


def joined(lines: list[str], per: int = 4096) -> Iterator[str]:
    """`"\n".join(lines) + "\n"` in pieces of `per` lines, each ending in its line break: what
    `"".join` of them makes is that text exactly.  A bare 1,000-host plan is 570,000 lines, 25 MB;
    printed in pieces it is never in memory whole (once joined, once more with its last line
    break, once encoded: ~125 MB of fresh pages, 0.1 s of page faults, for nothing)."""
    if not lines:
        yield "\n"
    for i in range(0, len(lines), per):
        yield "\n".join(lines[i:i + per]) + "\n"


def plan_lines(plan: Plan, *, color: bool = False, show_waves: bool = True) -> list[str]:
    """`plan_text`'s lines (an entry may hold several, a shared diff body), before they are joined."""
    out = [one_line(f"Plan for {plan.fleet}{' (lab)' if plan.lab else ''}: {len(plan.hosts)} host(s), "
                 f"computed {plan.created_at}")]
    if plan.observed:
        out.append(one_line(f"Planned from a kept observation, {plan.observed}, not from the hosts now: "
                            "it shows what was planned then, and `fleet apply` refuses it"))
    for host, kind, message in plan.unknown:
        out.append(_paint(f"! {host}: UNKNOWN — could not be observed ({kind}): {message}", "31", color))
        out.append("  nothing is planned for it; this plan is INCOMPLETE and `fleet apply` will refuse it "
                   "(exclude the host with --limit to proceed without it)")
    by_host: dict[str, list[Change]] = {}
    for c in plan.changes:
        by_host.setdefault(c.host, []).append(c)
    rendered = _Rendered(color)
    lines = rendered.lines
    for host in plan.hosts:
        cs = by_host.get(host, [])
        if not cs:
            continue
        out.append("")
        out.append(one_line(f"on {host}:"))
        for c in cs:
            resource = BY_ACTION[c.action]
            out.append(rendered.head(resource.symbol(c), c))
            for detail in resource.details(c):
                line = lines.get(detail)
                if line is not None:
                    out.append(line)
                else:
                    out += rendered.details([detail])
    if plan.notes:
        out.append("")
        out.append("Reported, not changed:")
        out += [one_line(f"  • {n}") for n in plan.notes]
    if plan.problems:
        out.append("")
        out.append("Cannot be fixed by fleet:")
        out += [one_line(f"  ! {p}") for p in plan.problems]
    if show_waves and plan.waves and plan.changes:
        out.append("")
        out.append(f"Order ({len(plan.waves)} wave(s); each wave runs in parallel after the previous one):")
        shorts = _Shorts()
        short = dict(zip(plan.ids(), map(shorts.of, plan.changes), strict=True))  # an id: its last change's
        for i, wave in enumerate(plan.waves, 1):
            out.append(one_line(f"  {i}. " + ", ".join(map(short.__getitem__, wave))))
    out.append("")
    out.append(summary_line(plan))
    return out


def _short(c: Change) -> str:
    return f"{c.host}:{c.action}" + (f" {c.target.rsplit('/', 1)[-1]}" if SPECS[c.action].shows_target else "")


class _Shorts:
    """`_short` of many changes: what follows the host is made once per action and target."""

    def __init__(self) -> None:
        self.tails: dict[tuple[str, str], str] = {}

    def of(self, c: Change) -> str:
        tail = self.tails.get((c.action, c.target))
        if tail is None:
            tail = self.tails[(c.action, c.target)] = _short(c)[len(c.host):]
        return c.host + tail


def summary_line(plan: Plan) -> str:
    if plan.empty:
        tail = " (incomplete: some hosts could not be observed)" if not plan.complete else ""
        return f"No changes. The fleet matches the desired state{tail}."
    s = plan.summary()
    return ("Plan: " + ", ".join(f"{s[k]} to {k}" for k in SUMMARY_BUCKETS)
            + "." + ("" if plan.complete else " INCOMPLETE."))


# ---------------------------------------------------------------- apply


def apply_summary(result: ApplyResult) -> str:
    n = {k: sum(1 for o in result.outcomes if o.outcome == k) for k in ("ok", "failed", "skipped")}
    head = "Apply complete" if result.ok else "Apply FAILED"
    return f"{head}: {n['ok']} done, {n['failed']} failed, {n['skipped']} not attempted."


def apply_text(result: ApplyResult) -> str:
    out = ["", apply_summary(result)]
    failed = result.failed
    if failed:
        out.append("")
        out.append("Failed:")
        for o in failed:
            c = o.change
            out.append(f"  ✗ on {c.host}, {c.action} {c.target}: {o.error}")
            if o.rollback:
                out.append(f"    {o.rollback}")
            if o.detail:
                out.append("    last journal lines of the unit:")
                out += [f"      {line}" for line in o.detail.splitlines()]
        done = [o for o in result.outcomes if o.outcome == "ok"]
        if done:
            out.append("")
            out.append("Done before the halt:")
            out += [f"  ✓ on {o.change.host}, {o.change.action} {o.change.target}" for o in done]
        skipped = [o for o in result.outcomes if o.outcome == "skipped"]
        if skipped:
            out.append("")
            out.append("Not attempted:")
            out += [f"  · on {o.change.host}, {o.change.action} {o.change.target}" for o in skipped]
    return "\n".join(map(one_line, out)) + "\n"


# ---------------------------------------------------------------- audit


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t is not None else "?"


def audit_text(report: AuditReport, *, now: float | None = None) -> str:
    out = [one_line(f"Audit of {report.fleet}, {when(now or time.time())}"
                 + (f" (snapshot {report.snapshot_id})" if report.snapshot_id else "")), ""]
    out.append(status_text(report.status, now=now).rstrip())  # escaped, and a table of many lines
    out += ["", drift_line(report)]
    rows = [[i.host, i.kind, i.target, i.cls, i.detail] for i in report.drift.items if i.cls != "managed"]
    if rows:
        out.append(table(rows, ["HOST", "KIND", "TARGET", "CLASS", "DETAIL"]))
    lines = ["", f"Findings on the observed fleet: {findings_summary(report.findings)}"]
    for f in sorted(report.findings, key=lambda f: (not f.is_error, f.host)):
        lines.append(f"  {f.severity}: {f.message}" + (f" — {f.hint}" if f.hint else ""))
    if report.since:
        lines += ["", f"Changes since {report.since}:"]
        if not report.changes:
            lines.append("  none")
        for c in report.changes:
            lines.append(f"  • {c.what} — {c.attribution}")
        if report.timeline:
            lines += ["", "Timeline:"]
            lines += [f"  {when(t)}  {text}" for t, text in report.timeline]
    return "\n".join(out + [one_line(x) for x in lines]) + "\n"


def drift_line(report: AuditReport) -> str:
    d = report.drift
    return (f"Drift: {d.count('managed')} managed and matching, {d.count('changed')} changed, "
            f"{d.count('missing')} missing, {d.count('unmanaged')} unmanaged — coverage {d.coverage:.0%}")


def diff_text(a: str, b: str, changes: Sequence[ObservedChange]) -> str:
    """`fleet diff A B`: each change in words, with who made it."""
    out = [printable(f"Changes from {a} to {b}:" if changes else f"No changes from {a} to {b}.")]
    out += [one_line(f"  • {c.what} — {c.attribution}") for c in changes]
    return "\n".join(out) + "\n"


def history_text(snapshots: Sequence[SnapshotRecord], runs: Sequence[RunSummary] | None = None) -> str:
    """`fleet history`: the runs, newest first (unless `--snapshots`), then the kept observations,
    oldest first."""
    rows = [[x.id, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(x.taken)), x.operator, x.command,
             x.fleet + (" (lab)" if x.lab else ""),
             ", ".join(h if v == "ok" else f"{h}: {v}" for h, v in sorted(x.hosts.items()))] for x in snapshots]
    shots = table(rows, ["SNAPSHOT", "TAKEN (UTC)", "OPERATOR", "BY", "FLEET", "HOSTS"]) + "\n"
    if runs is None:
        return shots
    out = "Runs (newest first):\n" + (table([run_row(r) for r in runs],
                                            ["RUN", "STARTED (UTC)", "WHO", "DESIRED STATE", "HOSTS", "STEPS"])
                                      if runs else "  none recorded") + "\n\n"
    return out + "Snapshots (oldest first):\n" + (shots if snapshots else "  none kept\n")


def run_row(r: RunSummary) -> list[str]:
    """One run of `fleet history`: `3 ok, 1 failed, 1 interrupted` (zero counts left out)."""
    counts = [(r.ok, "ok"), (r.failed, "failed"), (r.skipped, "skipped"), (r.interrupted, "interrupted"),
              (r.running, "running")]
    desired = (f"git {r.commit[:12]}" + (" (dirty)" if r.dirty else "")) if r.commit else "not in git"
    return [r.run_id, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.started)), r.who, desired,
            ", ".join(r.hosts), ", ".join(f"{n} {word}" for n, word in counts if n)]


# ---------------------------------------------------------------- journal and locks


def log_text(steps: Sequence[StepRecord], runs: Sequence[RunRecord]) -> str:
    """`fleet log`: one sentence per step, oldest first; each run's steps headed by the run: its
    id, who ran it and the desired state's git commit (again when another run's steps came between)."""
    from fleet.journal import sentence

    by_id = {r.id: r for r in runs}
    out: list[str] = []
    current = None
    for step in steps:
        run = by_id.get(step.run_id)
        if step.run_id != current:
            current = step.run_id
            out.append(one_line(run_heading(step.run_id, run)) + "\n")
        out.append("  " + one_line(sentence(step, run)) + "\n")
    return "".join(out)


def run_heading(run_id: str, run: RunRecord | None) -> str:
    """`run 20261128T140307-a1b2c3 by alice@laptop, desired state at git 3f2a9c1d0b7e (dirty)`."""
    if run is None:
        return f"run {run_id} (not known to this checkout)"
    where = run.provenance() or "desired state not in git"
    return f"run {run_id} by {run.operator}, {where}"


def lock_text(report: LockReport) -> str:
    """`fleet lock status|break`: each host's lock and who holds it."""
    return table([[r.host, r.lock, r.holder] for r in report.rows], ["HOST", "LOCK", "HOLDER"]) + "\n"


def adopt_text(result: AdoptResult) -> str:
    """What `fleet adopt` wrote, and every line of what it could not express."""
    a = result.adopted
    lines = [f"Wrote {printable(str(result.target))}: desired_state.toml, {len(a.services)} service(s), "
             f"{len(a.units)} unit file(s) in units/."]
    lines += [f"  {printable(s)}" for s in a.services]
    if a.notes:
        lines += ["", "Not expressed (review these):"] + [f"  - {one_line(n)}" for n in a.notes]
    for e in result.unreachable:
        lines.append(f"  - {printable(e.host)}: not observed ({printable(e.kind)}: {one_line(e.message)}): "
                     "nothing of it adopted")
    lines += ["", f"Next: fleet --dir {printable(str(result.target))} check, then plan (it should show no changes)."]
    return "\n".join(lines) + "\n"
