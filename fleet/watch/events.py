"""What `fleet watch` tells the team: events, not noise.  Pure.

Input: what was last announced (the `NotifiedState`) and one observation cycle — the audit's
findings and drift, who answered, the changes since the previous observation with their
attribution, and the apply runs the journal shows.  Output: the events of this cycle and the new
notified state.  An event is a *new* finding or drift (first seen), a *changed* drift, a
*resolved* one, a change made *outside fleet*, an apply *started* / *finished*, a host
*unreachable* / *back*, and — with a reminder interval — a *reminder* of something still open.
A finding that persists is announced once.

Identity is what makes "the same finding" recognisable across cycles: a finding is its code,
host, file, key and the subject its rule is about (the queue, unit, env key or path — taken
from the message by a per-rule pattern, because the observed findings do not carry them as
fields), never the whole message text, which holds values and counts that move while the
finding persists.  A drift item is host, kind and target.

A host that cannot be observed keeps its open items open (silence is not a fix): only its own
"unreachable" event is news.  The notified state is JSON-serialisable plain data, persisted by
the caller together with the events it produced (fleet.notify.Outbox.commit does both in one
atomic write), so a crash either loses a whole cycle — recomputed on restart, nothing sent — or
none of it.

Every text is built from structured data and passed through `fleet.output.redact`: the value of
a sensitive key, and its fingerprint, never reach an event.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from fleet.audit import MATCHING, MISSING, UNMANAGED, AuditReport, DriftItem, ObservedChange
from fleet.errors import FleetError
from fleet.mastodon import looks_secret
from fleet.model import Finding, HostError, HostResult, HostState
from fleet.output.redact import redact
from fleet.textutil import printable, sha256_hex

FORMAT = 1

FINDING_NEW = "finding.new"
FINDING_RESOLVED = "finding.resolved"
DRIFT_NEW = "drift.new"
DRIFT_CHANGED = "drift.changed"
DRIFT_RESOLVED = "drift.resolved"
CHANGE_OUTSIDE = "change.outside"
APPLY_STARTED = "apply.started"
APPLY_FINISHED = "apply.finished"
HOST_UNREACHABLE = "host.unreachable"
HOST_BACK = "host.back"
REMINDER = "reminder"
KINDS = (HOST_UNREACHABLE, HOST_BACK, APPLY_STARTED, APPLY_FINISHED, CHANGE_OUTSIDE, DRIFT_NEW, DRIFT_CHANGED,
         FINDING_NEW, DRIFT_RESOLVED, FINDING_RESOLVED, REMINDER)  # the order events of one cycle are told in

SEVERITIES = ("error", "warning", "info", "ok")

# How long an announced apply run is remembered (to announce its end once, and never its start
# twice); the journal is read from the previous observation on, so older runs never come back.
RUN_MEMORY_SECONDS = 7 * 86400.0

RECENT_EVENTS = 50  # how many past events the state keeps for the status page's timeline

# The rule codes whose findings are told by another event: an unobservable host is a host event,
# a declared unit that is down is its drift event.
_TOLD_ELSEWHERE = frozenset({"audit.unreachable", "unit.down"})

# Per rule: what in its message names the subject (queue, unit, key, path).  `None`: the rule is
# fleet-wide and has one finding at most, whatever its message says (the scheduler count).
# tests/unit/test_watch_events.py holds every code the policies and the audit emit to a pattern
# that matches their real messages, so a reworded message fails a test instead of re-announcing.
_SUBJECT: Mapping[str, re.Pattern[str] | None] = {
    "sidekiq.queue-unserved": re.compile(r"^queue (.+?) is served by no "),
    "sidekiq.scheduler-count": None,
    "sidekiq.db-pool": re.compile(r"^(.+?) on \S+ runs "),
    "sidekiq.unknown-queue": re.compile(r"^(.+?) on \S+ serves queue (.+), which Mastodon never uses$"),
    "sidekiq.config-unreadable": re.compile(r"^(\S+) on \S+: "),
    "sidekiq.coverage-unknown": None,
    "placement.forbidden": re.compile(r"^(\S+) \((.+?)\) on \S+, whose role "),
    "env.unknown-key": re.compile(r"^(.+?) is not a Mastodon setting"),
    "env.near-miss": re.compile(r"^(.+?) is not a Mastodon setting"),
    "env.not-boolean": re.compile(r"^([^=]+)="),
    "env.inconsistent": re.compile(r"^(\S+) in (.+?) differs between hosts of (.+?): "),
    "env.file-missing": re.compile(r"^(.+) is missing on \S+$"),
    "env.file-unexpected": re.compile(r"^(.+) exists on \S+, where no env file is declared$"),
    "env.invalid-lines": re.compile(r"^(.+) on \S+ has \d+ line"),
}


class WatchStateError(FleetError):
    """The persisted notified state cannot be read."""


@dataclass(frozen=True)
class Event:
    """One thing worth telling.  `text` is one line for people (it names the host, unit or key,
    old → new where not sensitive, the run id); `data` the same as fields for machines."""

    id: str
    kind: str
    at: float
    severity: str  # error | warning | info | ok
    text: str
    host: str = ""
    subject: str = ""  # the stable identity of what it is about
    data: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "at": self.at, "time": utc(self.at), "severity": self.severity,
                "host": self.host, "subject": self.subject, "text": self.text, "data": dict(self.data)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        data = d.get("data", {})
        if not isinstance(data, Mapping):
            raise TypeError("data is not an object")
        return cls(id=_str(d, "id"), kind=_str(d, "kind"), at=_num(d, "at"), severity=_str(d, "severity"),
                   text=_str(d, "text"), host=_str(d, "host"), subject=_str(d, "subject"),
                   data=tuple((str(k), str(v)) for k, v in data.items()))


@dataclass(frozen=True)
class ApplyRun:
    """What the events need of a journaled apply run (fleet.journal.RunRecord has these fields)."""

    id: str
    operator: str
    started: float
    ended: float | None = None
    outcome: str | None = None
    summary: str = ""
    fleet: str = ""
    lab: bool = False

    @classmethod
    def of(cls, record: Any) -> ApplyRun:
        """From a fleet.journal.RunRecord (or anything with its fields)."""
        return cls(id=record.id, operator=record.operator, started=record.started, ended=record.ended,
                   outcome=record.outcome, summary=record.summary, fleet=record.fleet, lab=bool(record.lab))


@dataclass(frozen=True)
class Cycle:
    """One observation, as the events need it."""

    at: float
    results: Mapping[str, HostResult]  # every host in scope: HostState, or HostError (unreachable)
    findings: Sequence[Finding] = ()
    drift: Sequence[DriftItem] = ()
    changes: Sequence[ObservedChange] = ()  # since the previous observation, attributed (fleet.audit.attribute)
    runs: Sequence[ApplyRun] = ()  # the journal's runs from `runs_to_read`
    previous: Mapping[str, HostResult] = field(default_factory=dict)  # the baseline: old values of env keys
    snapshot: str = ""  # this observation's snapshot id: the next cycle's baseline
    sensitive_keys: frozenset[str] = frozenset()  # declared sensitive: never shown, whatever their name

    @classmethod
    def from_audit(cls, report: AuditReport, *, at: float, changes: Sequence[ObservedChange] = (),
                   runs: Iterable[Any] = (), previous: Mapping[str, HostResult] | None = None, snapshot: str = "",
                   sensitive_keys: Iterable[str] = ()) -> Cycle:
        return cls(at=at, results=dict(report.status.results), findings=tuple(report.findings),
                   drift=report.drift.items, changes=tuple(changes),
                   runs=tuple(r if isinstance(r, ApplyRun) else ApplyRun.of(r) for r in runs),
                   previous=dict(previous or {}), snapshot=snapshot or report.snapshot_id,
                   sensitive_keys=frozenset(sensitive_keys))


@dataclass(frozen=True)
class Open:
    """Something announced and not resolved yet."""

    subject: str
    type: str  # finding | drift | host
    host: str
    severity: str
    text: str  # as announced: what "resolved" refers to
    first_seen: float
    announced: float  # when it was last told (first time, or a reminder)
    detail: str = ""  # for drift: class and detail, to notice that it changed


@dataclass(frozen=True)
class RunSeen:
    started: float
    finished: bool


@dataclass(frozen=True)
class NotifiedState:
    """What was last announced, and which observation it was based on."""

    open: Mapping[str, Open] = field(default_factory=dict)  # subject -> Open
    runs: Mapping[str, RunSeen] = field(default_factory=dict)  # apply run id -> what was told of it
    observed_at: float | None = None  # when the last committed cycle observed; None: never
    snapshot: str = ""  # that observation's snapshot: the baseline of "what changed" next cycle
    recent: tuple[Event, ...] = ()  # the last RECENT_EVENTS events, newest last: the status page's timeline

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "observed_at": self.observed_at,
            "snapshot": self.snapshot,
            "open": [{"subject": o.subject, "type": o.type, "host": o.host, "severity": o.severity, "text": o.text,
                      "first_seen": o.first_seen, "announced": o.announced, "detail": o.detail}
                     for o in sorted(self.open.values(), key=lambda o: o.subject)],
            "runs": {rid: {"started": r.started, "finished": r.finished} for rid, r in sorted(self.runs.items())},
            "recent": [e.as_dict() for e in self.recent],
        }

    @classmethod
    def from_json(cls, d: Any, *, where: str = "the watch state") -> NotifiedState:
        if d is None:
            return cls()
        try:
            if not isinstance(d, Mapping) or d.get("format") != FORMAT:
                got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
                raise WatchStateError(f"{where} has format {got!r}, not {FORMAT}",
                                      hint="upgrade fleet, or move the file away to start announcing afresh")
            opened = {}
            for o in d["open"]:
                item = Open(subject=_str(o, "subject"), type=_str(o, "type"), host=_str(o, "host"),
                            severity=_str(o, "severity"), text=_str(o, "text"), first_seen=_num(o, "first_seen"),
                            announced=_num(o, "announced"), detail=_str(o, "detail"))
                opened[item.subject] = item
            runs = {str(k): RunSeen(started=_num(v, "started"), finished=bool(v["finished"]))
                    for k, v in d["runs"].items()}
            at = d["observed_at"]
            if at is not None and not _finite(at):
                raise TypeError("observed_at is not a number")
            recent = tuple(Event.from_dict(e) for e in d.get("recent", ()))
            return cls(open=opened, runs=runs, observed_at=None if at is None else float(at),
                       snapshot=str(d.get("snapshot", "")), recent=recent)
        except WatchStateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise WatchStateError(f"{where} is damaged ({type(e).__name__}: {e})",
                                  hint="move it away: the next cycle announces what is open afresh") from e


def runs_to_read(state: NotifiedState, now: float) -> tuple[float, tuple[str, ...]]:
    """Which journal runs the next cycle needs: those started since the previous observation
    (since `now` on a first cycle: a new watch does not replay the journal's history), plus the
    runs announced as started and not yet as finished (by id: they may have started earlier)."""
    since = now if state.observed_at is None else state.observed_at
    return since, tuple(sorted(rid for rid, r in state.runs.items() if not r.finished))


def advance(state: NotifiedState, cycle: Cycle, *, remind_every: float | None = None) -> tuple[
        list[Event], NotifiedState]:
    """The events of `cycle` given what was announced, and what will have been announced."""
    now = cycle.at
    events: list[Event] = []
    opened: dict[str, Open] = dict(state.open)
    down = {h for h, r in cycle.results.items() if not isinstance(r, HostState)}
    in_scope = set(cycle.results)

    events += _hosts(cycle, opened, now)
    runs, run_events = _runs(state.runs, cycle.runs, now)
    events += run_events
    events += _changes(cycle)
    seen: set[str] = set()
    for subject, item, detail, text, severity, data in _current(cycle):
        seen.add(subject)
        old = opened.get(subject)
        if old is None:
            kind = DRIFT_NEW if item.type == "drift" else FINDING_NEW
            opened[subject] = replace(item, first_seen=now, announced=now, detail=detail)
            events.append(_event(kind, now, severity, text, item.host, subject, data))
        elif item.type == "drift" and old.detail != detail:
            opened[subject] = replace(old, text=text, severity=severity, detail=detail, announced=now)
            events.append(_event(DRIFT_CHANGED, now, severity, f"{text} (was: {old.text})", item.host, subject,
                                 data))
    for subject, old in sorted(state.open.items()):
        if subject in seen or old.type == "host":
            continue
        if old.host and (old.host in down or old.host not in in_scope):
            continue  # not observed this time: still open as far as anyone knows
        del opened[subject]
        kind = DRIFT_RESOLVED if old.type == "drift" else FINDING_RESOLVED
        events.append(_event(kind, now, "ok", f"resolved: {old.text}", old.host, subject, ()))
    if remind_every is not None and remind_every > 0:
        for subject, o in sorted(opened.items()):
            if now - o.announced >= remind_every and not (o.type != "host" and o.host in down):
                opened[subject] = replace(o, announced=now)
                events.append(_event(REMINDER, now, o.severity, f"still open since {utc(o.first_seen)}: {o.text}",
                                     o.host, subject, (("type", o.type),)))
    events.sort(key=lambda e: (KINDS.index(e.kind), e.host, e.subject))
    recent = (*state.recent, *events)[-RECENT_EVENTS:]
    new_state = NotifiedState(open=opened, runs=runs, observed_at=now, snapshot=cycle.snapshot, recent=recent)
    return events, new_state


# ---------------------------------------------------------------- identities


def finding_subject(f: Finding) -> str:
    """The identity of a finding across cycles: code, host, file, key and its rule's subject —
    `extra["subject"]` when the rule says it (what the redesign's findings should carry), else
    taken from the message by the rule's pattern."""
    pattern = _SUBJECT.get(f.code, re.compile(r"^(.*)$"))
    what: list[str] = []
    if f.extra.get("subject"):
        what = [f.extra["subject"]]
    elif pattern is not None:
        m = pattern.search(f.message)
        # A rule fleet does not know (or a message that no longer matches its pattern, which a
        # unit test catches) falls back to the whole message: it may re-announce, never merge
        # two different findings into one.
        what = list(m.groups()) if m else [f.message]
    return _identity("finding", f.code, f.host, f.file, f.key, *what)


def drift_subject(d: DriftItem) -> str:
    return _identity("drift", d.host, d.kind, d.target)


def host_subject(host: str) -> str:
    return _identity("host", host)


def _identity(*parts: str) -> str:
    """Unambiguous whatever the parts hold (a `|` in a unit name cannot make two subjects one);
    redacted, since subjects are kept in the state and sent with events (a message that fell back
    to being its own subject may quote a fingerprint)."""
    return json.dumps([redact(p) for p in parts], ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------- the parts of a cycle


_Current = tuple[str, "Open", str, str, str, tuple[tuple[str, str], ...]]


def _current(cycle: Cycle) -> list[_Current]:
    """(subject, item, detail, text, severity, data) of every finding and drift item open now."""
    out: dict[str, _Current] = {}
    for d in cycle.drift:
        if d.cls == MATCHING:
            continue
        subject = drift_subject(d)
        severity = "error" if d.cls == MISSING else "warning"
        what = {MISSING: "missing", UNMANAGED: "unmanaged"}.get(d.cls, "drift")
        text = _clean(f"{what}: {d.target} on {d.host}" + (f" — {d.detail}" if d.detail else ""))
        item = Open(subject, "drift", d.host, severity, text, 0.0, 0.0)
        data: tuple[tuple[str, str], ...] = (
            ("type", "drift"), ("host", _clean(d.host)), ("kind", d.kind), ("target", _clean(d.target)),
            ("class", d.cls), ("detail", _clean(d.detail)))
        out.setdefault(subject, (subject, item, f"{d.cls}: {d.detail}", text, severity, data))
    for f in cycle.findings:
        if f.code in _TOLD_ELSEWHERE:
            continue
        subject = finding_subject(f)
        message = f.message if not f.host or f.host in f.message else f"{f.message} (on {f.host})"
        core = _clean(f"{f.severity}: {message} [{f.code}]")  # what "resolved: …" repeats, without the hint
        text = core + (_clean(f" — {f.hint}") if f.hint else "")
        item = Open(subject, "finding", f.host, f.severity if f.severity in SEVERITIES else "warning", core, 0.0, 0.0)
        data = (("type", "finding"), ("code", _clean(f.code)), ("host", _clean(f.host)), ("severity", item.severity))
        out.setdefault(subject, (subject, item, "", text, item.severity, data))
    return list(out.values())


def _hosts(cycle: Cycle, opened: dict[str, Open], now: float) -> list[Event]:
    events = []
    for host, r in sorted(cycle.results.items()):
        subject = host_subject(host)
        if isinstance(r, HostError) and subject not in opened:
            text = _clean(f"{host} cannot be observed ({r.kind}: {r.message})" + (f" — {r.hint}" if r.hint else ""))
            opened[subject] = Open(subject, "host", host, "error", text, now, now)
            events.append(_event(HOST_UNREACHABLE, now, "error", text, host, subject, (("error", r.kind),)))
        elif isinstance(r, HostState) and subject in opened:
            was = opened.pop(subject)
            events.append(_event(HOST_BACK, now, "ok", _clean(f"{host} answers again (unobservable since "
                                                               f"{utc(was.first_seen)})"), host, subject, ()))
    return events


def _runs(seen: Mapping[str, RunSeen], runs: Sequence[ApplyRun], now: float) -> tuple[dict[str, RunSeen],
                                                                                       list[Event]]:
    out = {rid: r for rid, r in seen.items() if r.started >= now - RUN_MEMORY_SECONDS}
    events = []
    for run in sorted(runs, key=lambda r: (r.started, r.id)):
        known = out.get(run.id)
        if known is None:
            events.append(apply_started(run))
        if run.ended is not None and (known is None or not known.finished):
            events.append(apply_finished(run))
        out[run.id] = RunSeen(started=run.started, finished=run.ended is not None)
    return out, events


def apply_started(run: ApplyRun) -> Event:
    """The event of an apply's start; its id is the run's, so that `fleet apply` posting it and
    `fleet watch` reading it from the journal are one event (the outbox drops the second)."""
    where = " on the lab" if run.lab else ""
    text = _clean(f"fleet apply run {run.id} started by {run.operator}{where}")
    return Event(id=f"{APPLY_STARTED}:{run.id}", kind=APPLY_STARTED, at=run.started, severity="info", text=text,
                 subject=f"run|{run.id}", data=(("run_id", run.id), ("operator", _clean(run.operator)),
                                                ("fleet", _clean(run.fleet)), ("lab", str(run.lab).lower())))


_OUTCOME_SEVERITY = {"ok": "ok", "failed": "error", "interrupted": "error", "refused": "warning"}


def apply_finished(run: ApplyRun) -> Event:
    outcome = run.outcome or "unknown"
    text = f"fleet apply run {run.id} by {run.operator} finished: {outcome}" + (f" — {run.summary}" if run.summary
                                                                              else "")
    return Event(id=f"{APPLY_FINISHED}:{run.id}", kind=APPLY_FINISHED, at=run.ended or run.started,
                 severity=_OUTCOME_SEVERITY.get(outcome, "warning"), text=_clean(text), subject=f"run|{run.id}",
                 data=(("run_id", run.id), ("operator", _clean(run.operator)), ("outcome", _clean(outcome)),
                       ("summary", _clean(run.summary)), ("fleet", _clean(run.fleet)), ("lab", str(run.lab).lower())))


def _changes(cycle: Cycle) -> list[Event]:
    events = []
    for c in cycle.changes:
        if c.run_id or c.target == "(host)":
            continue  # fleet's own (its apply events tell it) / a host answering or not (a host event)
        subject = _identity("change", c.host, c.target, c.kind, c.key)
        data: list[tuple[str, str]] = [("host", c.host), ("target", c.target), ("change", c.kind),
                                       ("attribution", "changed outside fleet")]
        if c.kind == "env-key" and _sensitive(cycle, c):
            text = f"on {c.host}, {c.key} in {c.target} changed (sensitive: value not shown)"
            data.append(("key", c.key))
        else:
            text = c.what
            if c.kind == "env-key":
                data.append(("key", c.key))
                data += [(k, v) for k, v in (("old", _env_value(cycle.previous, c)),
                                             ("new", _env_value(cycle.results, c))) if v is not None]
        text = _clean(f"{text} — changed outside fleet")
        events.append(_event(CHANGE_OUTSIDE, cycle.at, "warning", text, c.host, subject,
                             tuple((k, _clean(v)) for k, v in data)))
    return events


def _sensitive(cycle: Cycle, c: ObservedChange) -> bool:
    return (c.key in cycle.sensitive_keys or looks_secret(c.key) or looks_secret(c.key.upper())
            or "(sensitive" in c.what or _reported_secret(cycle.previous, c) or _reported_secret(cycle.results, c))


def _reported_secret(results: Mapping[str, HostResult], c: ObservedChange) -> bool:
    r = results.get(c.host)
    e = r.env_file(c.target) if isinstance(r, HostState) else None
    return e is not None and c.key in e.secret_map()


def _env_value(results: Mapping[str, HostResult], c: ObservedChange) -> str | None:
    r = results.get(c.host)
    e = r.env_file(c.target) if isinstance(r, HostState) else None
    return None if e is None else e.value_map().get(c.key)


def _event(kind: str, at: float, severity: str, text: str, host: str, subject: str,
           data: Iterable[tuple[str, str]]) -> Event:
    # Deterministic: the same cycle computed twice gives the same ids (delivery deduplicates by id).
    eid = f"{kind}:{sha256_hex(f'{kind}|{subject}|{at!r}|{text}')[:20]}"
    return Event(id=eid, kind=kind, at=at, severity=severity, text=text, host=host, subject=subject,
                 data=tuple(data))


def _clean(text: str) -> str:
    """One line, safe to show anywhere: control characters spelled out, secrets masked."""
    return redact(printable(text, multiline=False))


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _str(d: Mapping[str, Any], key: str) -> str:
    v = d[key]
    if not isinstance(v, str):
        raise TypeError(f"{key} is not a string")
    return v


def _num(d: Mapping[str, Any], key: str) -> float:
    v = d[key]
    if not _finite(v):
        raise TypeError(f"{key} is not a number")
    return float(v)


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
