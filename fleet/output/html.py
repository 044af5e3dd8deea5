"""The status page: one self-contained `index.html` an on-call opens on a phone.

`fleet watch --html DIR` writes it each cycle: the what-runs-where matrix coloured ok / drift /
unmanaged / unreachable, the hosts, the Sidekiq queues and who serves them, the open findings,
and a timeline of the last events.  No external asset, no JavaScript: inline CSS only, allowed
by a Content-Security-Policy that names that stylesheet by its hash and forbids everything else
— so even a value that escaped escaping could neither run a script nor load anything.  Every
value shown (names, states, messages: they come from hosts and files) is spelled out when it
holds control characters, redacted (fleet.output.redact) and HTML-escaped.  Colour is never the
only signal: every cell also says its state in words.  The page reloads itself every `refresh`
seconds (a meta refresh, no script).
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
from collections.abc import Sequence
from pathlib import Path

from fleet.audit import MATCHING, AuditReport, DriftItem
from fleet.audit import UNMANAGED as UNMANAGED_ITEM
from fleet.errors import FleetError
from fleet.model import SIDEKIQ_QUEUES, Finding, HostError, HostState
from fleet.output.files import write_atomic
from fleet.output.redact import redact
from fleet.status import ABSENT, DRIFT, OK, PRESENT, UNKNOWN, UNMANAGED, Cell, StatusReport
from fleet.textutil import printable
from fleet.watch.events import Event, utc

INDEX = "index.html"

_STATUS_TEXT = {OK: "ok", DRIFT: "drift", UNMANAGED: "unmanaged", PRESENT: "installed, not declared here",
                UNKNOWN: "unreachable", ABSENT: "absent"}

CSS = """
:root{color-scheme:light dark;--ok:#d7f0dc;--ok-fg:#14532d;--drift:#fbd5d5;--drift-fg:#7f1d1d;--unmanaged:#fde7b0;
--unmanaged-fg:#713f12;--present:#e0e7ff;--present-fg:#312e81;--unknown:#d4d4d8;--unknown-fg:#27272a;--line:#c8c8cc;
--muted:#5f6368;--bg:#fff;--fg:#111}
@media (prefers-color-scheme:dark){:root{--ok:#173d24;--ok-fg:#c9f2d5;--drift:#4c1616;--drift-fg:#fecaca;
--unmanaged:#4a3510;--unmanaged-fg:#fde68a;--present:#262a55;--present-fg:#c7d2fe;--unknown:#3f3f46;
--unknown-fg:#e4e4e7;--line:#3f3f46;--muted:#a1a1aa;--bg:#111;--fg:#eee}}
*{box-sizing:border-box}
body{margin:0;padding:.75rem;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);
color:var(--fg);overflow-wrap:break-word}
h1{font-size:1.3rem;margin:0 0 .25rem}h2{font-size:1.1rem;margin:1.25rem 0 .5rem}
.summary,.muted,footer{color:var(--muted)}.summary{margin:0}
.badges span{display:inline-block;margin:.25rem .25rem 0 0;padding:.1rem .5rem;border-radius:1rem;font-weight:600}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;border:1px solid var(--line);border-radius:.4rem}
table{border-collapse:collapse;width:100%}
th,td{padding:.35rem .5rem;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
thead th{position:sticky;top:0;background:var(--bg)}
.matrix th[scope=row]{position:sticky;left:0;background:var(--bg);min-width:7rem}
.matrix td{min-width:6.5rem;font-size:.9rem;overflow-wrap:normal}
.unit{display:block;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.75rem;font-weight:400;
color:var(--muted);overflow-wrap:anywhere}
.st{display:block;font-weight:600}.detail{display:block;font-size:.8rem}
.ok{background:var(--ok);color:var(--ok-fg)}.drift{background:var(--drift);color:var(--drift-fg)}
.unmanaged{background:var(--unmanaged);color:var(--unmanaged-fg)}
.present{background:var(--present);color:var(--present-fg)}
.unknown{background:var(--unknown);color:var(--unknown-fg)}.absent{color:var(--muted)}
.error{border-left:.3rem solid #dc2626}.warning{border-left:.3rem solid #d97706}
.info{border-left:.3rem solid #2563eb}.okev{border-left:.3rem solid #16a34a}
ul.findings,ol.timeline{list-style:none;margin:0;padding:0}
ul.findings li,ol.timeline li{padding:.4rem .6rem;margin:0 0 .4rem;background:color-mix(in srgb,var(--fg) 4%,
var(--bg));border-radius:.3rem}
.code,.when{font-size:.8rem;color:var(--muted)}.hint{display:block;font-size:.85rem;color:var(--muted)}
.nobody{background:var(--drift);color:var(--drift-fg);font-weight:600}
.legend span{display:inline-block;margin:.25rem .4rem 0 0;padding:.05rem .45rem;border-radius:.3rem;font-size:.85rem}
""".strip()


def csp_hash(css: str = CSS) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()


def status_page(report: AuditReport, events: Sequence[Event] = (), *, now: float, refresh: int | None = 300,
                max_events: int = 50) -> str:
    """The whole page for one observation (`report` from fleet.audit.build_audit) and the last
    events (oldest first; the newest `max_events` are shown, newest first)."""
    status = report.status
    drift = [d for d in report.drift.items if d.cls != MATCHING]
    errors = sum(f.is_error for f in report.findings)
    warnings = len(report.findings) - errors
    down = [h for h in status.hosts if isinstance(status.results.get(h), HostError)]
    title = f"fleet {report.fleet}: " + (f"{len(drift)} drift, {errors} error(s)" if drift or errors else "all as "
                                                                                                        "declared")
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        f"style-src '{csp_hash()}'; base-uri 'none'; form-action 'none'\">",
        '<meta name="referrer" content="no-referrer">',
        f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else "",
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
    ]
    body = [
        "<body>",
        "<header>",
        f"<h1>fleet {_e(report.fleet)}</h1>",
        f'<p class="summary">observed {_e(utc(now))} · {len(status.hosts)} host(s)'
        + (f", {len(down)} unreachable: {_e(', '.join(down))}" if down else "") + "</p>",
        '<p class="badges">'
        + f'<span class="{"drift" if drift else "ok"}" id="drift-count">{len(drift)} drift</span>'
        + f'<span class="{"drift" if errors else "ok"}">{errors} error(s)</span>'
        + f'<span class="{"unmanaged" if warnings else "ok"}">{warnings} warning(s)</span>'
        + f'<span class="{"unknown" if down else "ok"}">{len(down)} unreachable</span>'
        + f'<span class="present">coverage {report.drift.coverage:.0%}</span></p>',
        "</header>",
        "<main>",
        *_matrix(status, report.drift.items),
        *_hosts(status, now),
        *_sidekiq(status),
        *_findings(report.findings),
        *_timeline(events, max_events),
        "</main>",
        f"<footer><p>written by fleet watch at {_e(utc(now))}"
        + (f"; this page reloads every {int(refresh)} s" if refresh else "") + "</p></footer>",
        "</body>",
        "</html>",
    ]
    return "\n".join(line for line in head + body if line) + "\n"


def write_status_page(directory: str | os.PathLike[str], page: str) -> Path:
    """DIR/index.html, atomically (a web server may be serving it), readable by that server."""
    d = Path(directory)
    try:
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise FleetError(f"cannot create the status page directory {d}: {e.strerror or e}",
                         hint="give --html a directory fleet may write to") from None
    path = d / INDEX
    write_atomic(path, page.encode("utf-8"), mode=0o644, what="the status page")
    return path


# ---------------------------------------------------------------- sections


def _matrix(status: StatusReport, drift: Sequence[DriftItem]) -> list[str]:
    out = ['<section id="matrix">', "<h2>What runs where</h2>", '<div class="scroll"><table class="matrix">',
           '<thead><tr><th scope="col">service / unit</th>']
    for h in status.hosts:
        r = status.results.get(h)
        mark = ' <span class="muted">(unreachable)</span>' if isinstance(r, HostError) else ""
        out.append(f'<th scope="col" data-host="{_e(h)}">{_e(h)}{mark}</th>')
    out.append("</tr></thead><tbody>")
    for row in status.rows:
        label = _e(row.service) if row.service else '<span class="muted">(undeclared)</span>'
        out.append(f'<tr data-unit="{_e(row.unit)}"><th scope="row">{label}<span class="unit">{_e(row.unit)}</span>'
                   "</th>")
        out += [_cell(c) for c in row.cells]
        out.append("</tr>")
    for path, cells in _env_rows(status, drift):
        out.append(f'<tr data-env="{_e(path)}"><th scope="row">env file<span class="unit">{_e(path)}</span></th>')
        out += [_cell(c) for c in cells]
        out.append("</tr>")
    if not status.rows:
        out.append(f'<tr><td colspan="{len(status.hosts) + 1}">no service declared, no unit found</td></tr>')
    out.append("</tbody></table></div>")
    out.append('<p class="legend">' + "".join(f'<span class="{s}">{_STATUS_TEXT[s]}</span>'
                                              for s in (OK, DRIFT, UNMANAGED, PRESENT, UNKNOWN)) + "</p>")
    out.append("</section>")
    return out


def _env_rows(status: StatusReport, drift: Sequence[DriftItem]) -> list[tuple[str, list[Cell]]]:
    """The env files as matrix rows, from the audit's drift classes: a hand edit of
    .env.production shows where the on-call looks first."""
    by_path: dict[str, dict[str, DriftItem]] = {}
    for item in drift:
        if item.kind == "env":
            by_path.setdefault(item.target, {})[item.host] = item
    rows = []
    for path in sorted(by_path):
        cells = []
        for h in status.hosts:
            d = by_path[path].get(h)
            if isinstance(status.results.get(h), HostError):
                cells.append(Cell(h, UNKNOWN))
            elif d is None:
                cells.append(Cell(h, ABSENT))
            elif d.cls == MATCHING:
                cells.append(Cell(h, OK, "as declared"))
            elif d.cls == UNMANAGED_ITEM:
                cells.append(Cell(h, UNMANAGED, "present", d.detail))
            else:
                cells.append(Cell(h, DRIFT, d.cls, d.detail))
        rows.append((path, cells))
    return rows


def _cell(c: Cell) -> str:
    attrs = f'class="cell {c.status}" data-host="{_e(c.host)}" data-status="{_e(c.status)}"'
    if c.status == ABSENT:
        return f'<td {attrs}><span class="st" aria-label="absent">·</span></td>'
    status = _STATUS_TEXT.get(c.status, c.status)
    words = c.state or status
    label = "" if c.status == OK or words == status else f" ({status})"
    detail = f'<span class="detail">{_e(c.detail)}</span>' if c.detail else ""
    return f'<td {attrs}><span class="st">{_e(words)}{_e(label)}</span>{detail}</td>'


def _hosts(status: StatusReport, now: float) -> list[str]:
    out = ['<section id="hosts">', "<h2>Hosts</h2>", '<div class="scroll"><table>',
           '<thead><tr><th scope="col">host</th><th scope="col">state</th><th scope="col">detail</th></tr></thead>'
           "<tbody>"]
    for h in status.hosts:
        r = status.results.get(h)
        if isinstance(r, HostError):
            detail = r.message + (f" — {r.hint}" if r.hint else "")
            kind = "" if r.kind == "unreachable" else f" ({r.kind})"
            out.append(f'<tr data-host="{_e(h)}"><th scope="row">{_e(h)}</th><td class="unknown">unreachable'
                       f"{_e(kind)}</td><td>{_e(detail)}</td></tr>")
        elif isinstance(r, HostState):
            f = r.facts
            age = max(0.0, now - r.collected_at)
            detail = f"{f.os}, systemd {f.systemd_version.split()[0] if f.systemd_version else '?'}; load " \
                     f"{' '.join(f'{x:.2f}' for x in f.load)}; observed {age:.0f} s before this page"
            cls = "ok" if f.system_state in ("running", "") else "unmanaged"
            out.append(f'<tr data-host="{_e(h)}"><th scope="row">{_e(h)}</th><td class="{cls}">'
                       f"{_e(f.system_state or 'answering')}</td><td>{_e(detail)}</td></tr>")
    out.append("</tbody></table></div></section>")
    return out


def _sidekiq(status: StatusReport) -> list[str]:
    out = ['<section id="sidekiq">', "<h2>Sidekiq queues</h2>", '<div class="scroll"><table class="queues">',
           '<thead><tr><th scope="col">queue</th><th scope="col">served by</th></tr></thead><tbody>']
    extra = sorted({q for p in status.sidekiq for q, _ in p.queues if q not in SIDEKIQ_QUEUES})
    for q in (*SIDEKIQ_QUEUES, *extra):
        servers = [f"{p.host}:{p.unit}" for p in status.sidekiq if q in dict(p.queues)]
        if servers:
            out.append(f'<tr data-queue="{_e(q)}"><th scope="row">{_e(q)}</th><td>{_e(", ".join(servers))}</td></tr>')
        else:
            out.append(f'<tr data-queue="{_e(q)}"><th scope="row">{_e(q)}</th><td class="nobody">nobody: its jobs '
                       "pile up</td></tr>")
    out.append("</tbody></table></div>")
    if status.sidekiq:
        out += ['<div class="scroll"><table class="processes">',
                '<thead><tr><th scope="col">host</th><th scope="col">unit</th><th scope="col">-c</th>'
                '<th scope="col">queues</th><th scope="col">DB_POOL</th><th scope="col"></th></tr></thead><tbody>']
        for p in status.sidekiq:
            queues = " ".join(q if w is None else f"{q},{w}" for q, w in p.queues) or "(config/sidekiq.yml)"
            c = "?" if p.concurrency is None else str(p.concurrency)
            pool = "?" if p.db_pool is None else str(p.db_pool)
            undeclared = '<td class="unmanaged">undeclared</td>' if not p.declared else "<td></td>"
            out.append(f"<tr><td>{_e(p.host)}</td><td>{_e(p.unit)}</td><td>{_e(c)}</td><td>{_e(queues)}</td>"
                       f"<td>{_e(pool)}</td>{undeclared}</tr>")
        out.append("</tbody></table></div>")
    else:
        out.append('<p class="muted">no running Sidekiq process found</p>')
    if status.unreachable:
        out.append(f'<p class="muted">{len(status.unreachable)} host(s) did not answer: queue coverage may be '
                   "incomplete</p>")
    out.append("</section>")
    return out


def _findings(findings: Sequence[Finding]) -> list[str]:
    ordered = sorted(findings, key=lambda f: (not f.is_error, f.host, f.code))
    out = ['<section id="findings">', f"<h2>Open findings ({len(ordered)})</h2>"]
    if not ordered:
        return out + ['<p class="muted">none</p>', "</section>"]
    out.append('<ul class="findings">')
    for f in ordered:
        sev = "error" if f.is_error else "warning"
        hint = f'<span class="hint">{_e(f.hint)}</span>' if f.hint else ""
        where = f" on {f.host}" if f.host and f.host not in f.message else ""
        out.append(f'<li class="{sev}" data-code="{_e(f.code)}"><strong>{sev}</strong> {_e(f.message + where)} '
                   f'<span class="code">[{_e(f.code)}]</span>{hint}</li>')
    return out + ["</ul>", "</section>"]


_EVENT_CLASS = {"error": "error", "warning": "warning", "info": "info", "ok": "okev"}


def _timeline(events: Sequence[Event], max_events: int) -> list[str]:
    shown = list(events)[-max_events:][::-1]
    out = ['<section id="events">', "<h2>Last events</h2>"]
    if not shown:
        return out + ['<p class="muted">none yet</p>', "</section>"]
    out.append('<ol class="timeline">')
    for e in shown:
        out.append(f'<li class="{_EVENT_CLASS.get(e.severity, "info")}" data-kind="{_e(e.kind)}">'
                   f'<span class="when">{_e(utc(e.at))} · {_e(e.kind)}</span><br>{_e(e.text)}</li>')
    return out + ["</ol>", "</section>"]


def _e(value: object) -> str:
    """Any value as HTML text: control characters spelled out, secrets redacted, escaped (quotes
    too: the same function fills attributes)."""
    return html.escape(redact(printable(str(value), multiline=False)), quote=True)
