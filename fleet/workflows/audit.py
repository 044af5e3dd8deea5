"""`fleet audit`, `fleet history` and `fleet diff`: the fleet observed and judged; the runs the
hosts' history records and the kept observations (snapshots); an operator's acknowledgement of
a host's broken history chain; and what changed between two observations — each change
attributed to a fleet apply or marked as made outside fleet (fleet/audit.py does the judging,
purely)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fleet import history as host_history
from fleet.attribution import attribute_with_history
from fleet.audit import AuditReport, JournalStep, ObservedChange, build_audit, changes_between
from fleet.errors import FleetError, TransportError
from fleet.history_cache import (
    AckSeen,
    HistoryCache,
    KnownBreak,
    RunSummary,
    host_steps,
    judge_breaks,
    merged_log,
    summarize_runs,
)
from fleet.journal import Journal, SnapshotRecord, journal_path, operator, parse_since, sentence_without_time
from fleet.model import Finding, HostResult, HostState
from fleet.remote import STATE
from fleet.snapshot import unpack
from fleet.targets import resolve
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Reporter, Scope
from fleet.workflows.check import load_valid
from fleet.workflows.log import LogOptions, read_targets, refresh


@dataclass(frozen=True)
class AuditOptions:
    common: Common
    scope: Scope
    since: str | None = None  # a snapshot id or a time: also report what changed since then
    observed: str | None = None  # audit this kept observation (a file or snapshot id), contacting no host


@dataclass(frozen=True)
class HistoryOptions:
    common: Common
    since: str | None = None  # only runs started and snapshots taken since then
    cached: bool = False  # do not read the hosts' history first (as `fleet log --cached`)
    snapshots_only: bool = False  # only the kept observations: no runs, no network
    scope: Scope = Scope()


@dataclass(frozen=True)
class HistoryResult:
    journal: Path
    exists: bool  # False: nothing was ever observed or applied from this state directory, nor read from a host
    snapshots: tuple[SnapshotRecord, ...] = ()
    runs: tuple[RunSummary, ...] = ()  # newest first
    warnings: tuple[str, ...] = ()  # hosts whose history was not read, broken chains, acknowledged ones


@dataclass(frozen=True)
class AckOptions:
    common: Common
    host: str
    reason: str  # the operator's words: what was found, why the history can be trusted again
    scope: Scope = Scope()


@dataclass(frozen=True)
class AckResult:
    host: str
    seq: int  # the ack record's number in the host's history
    acknowledged: tuple[KnownBreak, ...]


@dataclass(frozen=True)
class DiffOptions:
    common: Common
    scope: Scope
    a: str  # a snapshot id (or a time)
    b: str = "now"  # another, or "now": collect live


@dataclass(frozen=True)
class DiffResult:
    a: SnapshotRecord
    b: str  # as asked: a snapshot id, or "now"
    changes: tuple[ObservedChange, ...]


def audit(options: AuditOptions, reporter: Reporter) -> AuditReport:
    common = options.common
    desired = load_valid(common, reporter)
    targets = resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=options.scope.limit)
    scoped = replace(desired, hosts=targets.hosts)
    base: SnapshotRecord | None = None
    if options.since:  # resolved before observing, so that "now" is never its own baseline
        with Journal.open(journal_path(common.state_dir)) as journal:
            base = baseline(journal, options.since)
    seen, quiet = observing.now_or_kept(common, options.scope, "audit", desired, scoped, targets, options.observed,
                                        reporter)
    report = replace(build_audit(scoped, seen.results, quiet=quiet), snapshot_id=seen.snapshot_id)
    report.findings.extend(history_findings(common, [h.name for h in targets.hosts], seen.history_problems))
    if base is None:
        return report
    with Journal.open(journal_path(common.state_dir)) as journal:
        until = max((r.collected_at for r in seen.results.values() if isinstance(r, HostState)), default=0.0)
        changes, timeline = changes_since(journal, base, seen.results, until if seen.kept else time.time())
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(base.taken))
    return replace(report, changes=changes, timeline=timeline, since=f"snapshot {base.id} ({base.command}, {taken})")


def history_findings(common: Common, hosts: list[str], problems: dict[str, str]) -> list[Finding]:
    """Each host's history that cannot be trusted, as findings: every broken chain ever found on
    it (an edit stays a finding after later clean reads), and a history that could not be read."""
    out: list[Finding] = []
    path = journal_path(common.state_dir)
    if path.exists():
        with Journal.open(path) as journal:
            cache = HistoryCache(journal)
            for host in hosts:
                acknowledged, open_ = judge_breaks(cache.breaks(host), cache.acks(host))
                for known in open_:
                    after = known.brk.after
                    out.append(Finding(
                        "error", "history.broken", known.brk.message, host=host,
                        hint=(f"look at /var/lib/fleet/history.jsonl* on {host}: " + (
                            f"records up to {after} are intact; " if after else "no record of it can be trusted; ")
                            + "changes credited to a record after the break are marked unverified; once "
                            f"understood, `fleet history ack {host} --reason TEXT` records that on the host")))
                for known, ack in acknowledged:
                    out.append(Finding("note", "history.acknowledged", f"{known.brk.message} ({ack_words(ack)})",
                                       host=host, hint="acknowledged on the host; a new break is an error again"))
    for host, why in sorted(problems.items()):
        severity = "warning" if "lock stayed busy" in why else "error"
        out.append(Finding(severity, "history.unreadable", f"the history on {host} could not be read: {why}",
                           host=host, hint="changes on it cannot be credited to fleet runs made from other "
                                           "checkouts; run the audit again, or look at /var/lib/fleet/history.jsonl*"))
    return out


def ack_words(ack: AckSeen) -> str:
    """`acknowledged by alice@laptop at 2026-12-02 05:40:01 UTC: "restored from backup"` (the
    reason is operator text: the output layer escapes it)."""
    r = ack.record
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r.started or 0.0))
    return f"acknowledged by {r.who or '(unknown operator)'} at {at} in record {r.seq}: {r.reason!r}"


def history(options: HistoryOptions) -> HistoryResult:
    """The runs, as the hosts' history (read first, as `fleet log` does) and this checkout's
    journal record them, newest first; and the kept snapshots, oldest first."""
    common = options.common
    since = parse_since(options.since) if options.since else None
    warnings: list[str] = []
    if not options.snapshots_only and not options.cached:
        targets = read_targets(LogOptions(common, scope=options.scope), warnings)
        if targets is not None:
            warnings += refresh(common, options.scope, targets)
    path = journal_path(common.state_dir)
    if not path.exists():
        return HistoryResult(path, exists=False, warnings=tuple(warnings))
    with Journal.open(path) as journal:
        snapshots = journal.snapshots(since=since)
        if options.snapshots_only:
            return HistoryResult(path, True, tuple(snapshots))
        cache = HistoryCache(journal)
        ended = {r.id for r in journal.runs() if r.ended is not None}
        found = host_steps(cache.records(), locks=cache.locks(), ended_runs=ended)
        runs = summarize_runs(found, journal.steps(), journal.runs(), since=since)
        for host in sorted({b.brk.host for b in cache.breaks()}):
            acknowledged, open_ = judge_breaks(cache.breaks(host), cache.acks(host))
            warnings += [f"warning: {b.brk.message}" for b in open_]
            warnings += [f"note: {b.brk.message} ({ack_words(a)})" for b, a in acknowledged]
    return HistoryResult(path, True, tuple(snapshots), tuple(runs), tuple(warnings))


def ack(options: AckOptions, reporter: Reporter) -> AckResult:
    """Record on `options.host`, as a new record of its history chain, that an operator looked
    into its broken chain: who, when, why, and which breaks (their record numbers and the hashes
    of the last intact records).  Every checkout reads it; the audit then reports those breaks
    as notes, and any break found later as an error again.  Refused when nothing is broken."""
    common, host = options.common, options.host
    reason = options.reason.strip()
    if not reason:
        raise FleetError("`fleet history ack` needs --reason TEXT", hint="say what you found and why the history "
                                                                          f"of {host} can be trusted again")
    desired = load_valid(common, reporter)
    if not any(h.name == host for h in desired.hosts):
        raise FleetError(f"{host} is not in the inventory", hint="name a host of `fleet status`")
    targets = resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=host)
    problems = refresh(common, options.scope, targets)
    if problems:
        raise FleetError(f"the history on {host} could not be read, so nothing was acknowledged: "
                         f"{problems[0].removeprefix('warning: ')}", hint="run it again once the host answers")
    with Journal.open(journal_path(common.state_dir)) as journal:
        cache = HistoryCache(journal)
        _, open_ = judge_breaks(cache.breaks(host), cache.acks(host))
        known = cache.known(host)
    if not open_:
        raise FleetError(f"the history on {host} has no unacknowledged break: nothing to acknowledge",
                         hint="`fleet audit` reports a broken chain as history.broken; acknowledge one only after "
                              "looking into it")
    now = time.time()
    acked = [host_history.AckedBreak(b.brk.after, known.get(b.brk.after, host_history.GENESIS), b.brk.detail)
             for b in open_]
    ack_id = time.strftime("ack-%Y%m%dT%H%M%S", time.gmtime(now)) + f"-{secrets.token_hex(3)}"
    body = host_history.ack_body(host, acked, ack_id=ack_id, who=operator(), reason=reason, at=now)
    command, stdin = host_history.append_command(body, state_dir=STATE)  # the record travels on stdin
    target = targets.hosts[0]
    with observing.open_transport(common, targets, options.scope) as transport:
        try:
            res = transport.run(target, command, stdin=stdin, timeout=60)
        except TransportError as e:
            raise FleetError(f"{host}: the acknowledgement was not recorded ({e.kind}: {e.message})",
                             hint="run it again once the host answers") from None
    out = res.stdout.decode("utf-8", "replace")
    appended = host_history.parse_appended(out)
    if b"@@ok" not in res.stdout or appended is None:
        why = (res.stderr.decode("utf-8", "replace").strip().splitlines() or [res.exit_text])[-1]
        raise FleetError(f"{host}: the acknowledgement was not recorded: {why}",
                         hint=f"look at /var/lib/fleet/history.jsonl* on {host}")
    refresh(common, options.scope, targets)  # this checkout reads its own ack back like any other
    return AckResult(host, appended[0], tuple(open_))


def diff(options: DiffOptions, reporter: Reporter) -> DiffResult:
    common = options.common
    path = journal_path(common.state_dir)
    if not path.exists():
        raise FleetError(f"no journal at {path}", hint="snapshots are kept by status, plan, apply and audit")
    with Journal.open(path) as journal:
        a = baseline(journal, options.a)
    if options.b == "now":
        desired = load_valid(common, reporter)
        targets = resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=options.scope.limit)
        with observing.open_transport(common, targets, options.scope) as transport:
            seen = observing.observe(common, options.scope, "diff", replace(desired, hosts=targets.hosts), targets,
                                     transport, reporter)
        new, until = seen.results, time.time()
    else:
        with Journal.open(path) as journal:
            b = baseline(journal, options.b)
            data = journal.snapshot_data(b.id)
        assert data is not None
        new, until = unpack(data), b.taken
    with Journal.open(path) as journal:
        changes, _ = changes_since(journal, a, new, until)
    return DiffResult(a, options.b, tuple(changes))


def baseline(journal: Journal, since: str) -> SnapshotRecord:
    """--since: a snapshot id, or the last snapshot taken at or before a time."""
    snaps = journal.snapshots()
    exact = next((x for x in snaps if x.id == since), None)
    if exact is not None:
        return exact
    t = parse_since(since)
    before = [x for x in snaps if x.taken <= t]
    if before:
        return before[-1]
    after = [x for x in snaps if x.taken > t]
    if after:  # a checkout that began observing since then: from its first observation on
        return after[0]
    raise FleetError(f"no snapshot was taken at or before {since}",
                     hint="see `fleet history` for what is kept" + (f"; the oldest is {snaps[0].id}" if snaps else ""))


def changes_since(journal: Journal, base: SnapshotRecord, new: dict[str, HostResult],
                  until: float) -> tuple[list[ObservedChange], list[tuple[float, str]]]:
    """What changed from the snapshot `base` to `new` (observed at `until`), each change
    attributed; and the timeline of the journaled steps and the changes made outside fleet."""
    data = journal.snapshot_data(base.id)
    assert data is not None
    old = unpack(data)
    scope = set(new)
    old = {h: r for h, r in old.items() if h in scope}
    cache = HistoryCache(journal)
    runs = {r.id: r for r in journal.runs(since=base.taken)}
    local = [x for x in journal.steps(since=base.taken) if x.started is None or x.started <= until]
    ended = {r.id for r in journal.runs() if r.ended is not None}
    recorded = [hs for hs in host_steps(cache.records(), locks=cache.locks(), ended_runs=ended)
                if hs.record.host in scope]
    credited = attribute_with_history(
        changes_between(old, new), recorded, base.taken, until,
        local_steps=[JournalStep(x.run_id, x.host, x.action, x.target, x.started, x.outcome,
                                 tuple(k[0] for k in x.keys)) for x in local],
        local_operators={rid: r.operator for rid, r in runs.items()})
    changes = [a.change for a in credited]
    # The timeline: every step in the window, this checkout's and those known from the hosts.
    steps, all_runs = merged_log(journal, cache, since=base.taken)
    by_run = {r.id: r for r in all_runs}
    steps = [x for x in steps if x.host in scope and (x.started is None or x.started <= until)]
    timeline = [(x.started or x.ended or base.taken, sentence_without_time(x, by_run.get(x.run_id))) for x in steps]
    timeline += [(until, f"{c.what} — changed outside fleet (between {base.id} and now)")
                 for c in changes if not c.run_id]
    return changes, sorted(timeline, key=lambda t: t[0])
