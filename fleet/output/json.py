"""Every JSON document fleet prints, and the one function that writes them.

One place, so that every `--json` follows one convention and a reader of one knows them all:
a document is one JSON object whose first member is `"format": N` (the version of that
document's shape; a list is a member of it: `steps`, `snapshots`, `changes`, `locks`), made
here from the plain results a workflow returns, documented (docs/desired-state.md, status.md,
plan.md, journal.md, audit.md, apply.md), and written by `dumps` — two-space indentation, ASCII
only (json's `\\uXXXX` escapes), a trailing newline.  Values are never escaped for a terminal:
json escapes control characters itself, so the document stays exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fleet.model import SIDEKIQ_QUEUES, Finding, HostError
from fleet.textutil import indented_json

if TYPE_CHECKING:
    from fleet.audit import AuditReport, ObservedChange
    from fleet.history_cache import RunSummary
    from fleet.journal import RunRecord, SnapshotRecord, StepRecord
    from fleet.plan import Plan
    from fleet.sidekiq import SidekiqReport
    from fleet.status import StatusReport
    from fleet.workflows.lock import LockReport

# The version of each document's shape: raised when a field changes meaning or goes away (a
# field added is not a new format).  The plan's is the plan file's own (fleet.plan.PLAN_FORMAT).
FORMAT = 1


def dumps(document: Mapping[str, Any]) -> str:
    """The text of a JSON document as fleet prints it: what `json.dumps(document, indent=2)`
    writes (ASCII, `ensure_ascii`), and a newline.  A plan's changes may be a generator."""
    return indented_json(document) + "\n"


def check_json(findings: Sequence[Finding]) -> dict[str, Any]:
    """`fleet check --json` (docs/desired-state.md)."""
    errors = sum(f.is_error for f in findings)
    return {"format": FORMAT, "ok": not errors, "errors": errors, "warnings": len(findings) - errors,
            "findings": [f.as_dict() for f in findings]}


def status_json(report: StatusReport) -> dict[str, Any]:
    """The documented `fleet status --json` document (docs/status.md)."""
    from fleet.snapshot import to_record  # here: `check --json` needs none of the collector's modules

    hosts: dict[str, Any] = {}
    for name in report.hosts:
        r = report.results[name]
        if isinstance(r, HostError):
            hosts[name] = {"reachable": False, "error": {"kind": r.kind, "message": r.message, "hint": r.hint}}
        else:
            f = r.facts
            hosts[name] = {
                "reachable": True, "error": None, "collected_at": r.collected_at, "duration": round(r.duration, 3),
                "facts": {"hostname": f.hostname, "os": f.os, "kernel": f.kernel, "systemd": f.systemd_version,
                          "system_state": f.system_state, "uptime_seconds": f.uptime_seconds, "load": list(f.load),
                          "mem_total_kb": f.mem_total_kb, "mem_available_kb": f.mem_available_kb},
            }
    rows = []
    for row in report.rows:
        cells = {}
        for c in row.cells:
            u = c.unit
            cells[c.host] = {
                "status": c.status, "state": c.state, "detail": c.detail,
                "declared": c.host in row.declared_hosts, "notes": list(c.notes),
                "problems": [{"code": p.code, "message": p.message, "hint": p.hint} for p in c.problems],
                "unit": None if u is None else {
                    "load_state": u.load_state, "active_state": u.active_state, "sub_state": u.sub_state,
                    "unit_file_state": u.unit_file_state, "exec_start": list(u.exec_start), "main_pid": u.main_pid,
                    "fragment_path": u.fragment_path, "drop_in_paths": list(u.drop_in_paths),
                    "active_enter": u.active_enter, "n_restarts": u.n_restarts, "text_hash": u.text_hash},
            }
        rows.append({"unit": row.unit, "service": row.service, "kind": row.kind,
                     "declared_hosts": list(row.declared_hosts), "cells": cells})
    return {
        "format": FORMAT,
        "fleet": report.fleet,
        "hosts": hosts,
        "services": rows,
        "sidekiq": {
            "processes": [{"host": p.host, "unit": p.unit, "concurrency": p.concurrency, "db_pool": p.db_pool,
                           "declared": p.declared, "queues": [{"name": q, "weight": w} for q, w in p.queues],
                           "queues_from": p.source, "problem": p.problem}
                          for p in report.sidekiq],
            "queues": {q: [f"{p.host}:{p.unit}" for p in report.sidekiq if q in dict(p.queues)]
                       for q in _all_queues(report)},
            "findings": [f.as_dict() for f in report.queue_findings],
            "live": None if report.live is None else sidekiq_live_json(report.live),
        },
        # What `--observed FILE` reads back: everything the diff needs (fleet/snapshot.py).
        "observation": to_record({h: report.results[h] for h in report.hosts}),
    }


def sidekiq_live_json(live: SidekiqReport) -> dict[str, Any]:
    """Sidekiq's own view beside systemd's, in `fleet status --json` under sidekiq.live (docs/status.md)."""
    view = live.view
    t = view.target
    return {
        "read_on": live.host,
        "redis": None if t is None else {"source": t.source, "host": t.host, "port": t.port, "db": t.db,
                                         "tls": t.tls, "auth": t.auth},
        "error": view.error or None,
        "complete": view.complete,
        "time": live.now,
        "processes": [{"identity": m.process.identity, "host": m.host or None, "hostname": m.process.hostname,
                       "pid": m.process.pid, "tag": m.process.tag, "concurrency": m.process.concurrency,
                       "queues": [{"name": q, "weight": w or None} for q, w in m.process.queues],
                       "busy": m.process.busy, "beat": m.process.beat, "quiet": m.process.quiet,
                       "version": m.process.version, "unit": m.unit.unit if m.unit else None,
                       "unit_declared": bool(m.unit and m.unit.declared), "joined_by": m.how or None}
                      for m in live.matches],
        "silent_units": [{"host": u.host, "unit": u.unit, "active": u.active, "main_pid": u.main_pid}
                         for u in live.silent],
        "queues": [{"name": q.name, "size": q.size, "latency": q.latency, "by_systemd": list(q.by_systemd),
                    "by_heartbeat": list(q.by_heartbeat)} for q in live.queues],
        "findings": [f.as_dict() for f in live.findings],
    }


def _all_queues(report: StatusReport) -> list[str]:
    extra = [q for p in report.sidekiq for q, _ in p.queues if q not in SIDEKIQ_QUEUES]
    return list(SIDEKIQ_QUEUES) + sorted(set(extra))


def plan_json(plan: Plan) -> dict[str, Any]:
    """`fleet plan --json` and `fleet show --json`: the plan file's own document (docs/plan.md)."""
    return plan.document()


def log_json(steps: Iterable[StepRecord], runs: Iterable[RunRecord]) -> dict[str, Any]:
    """`fleet log --json`: one object per step, with its run's facts (docs/journal.md)."""
    from fleet.journal import iso_time, sentence  # here: `fleet check --json` needs no journal (sqlite3)

    by_id = {r.id: r for r in runs}
    out: list[dict[str, Any]] = []
    for s in steps:
        run = by_id.get(s.run_id)
        out.append({
            "run_id": s.run_id,
            "operator": run.operator if run else None,
            "time": iso_time(s.started if s.started is not None else s.ended),
            "ended": iso_time(s.ended),
            "host": s.host, "action": s.action, "target": s.target, "service": s.service,
            "reason": s.reason, "before": s.before, "after": s.after, "details": dict(s.details),
            "outcome": s.outcome, "error": s.error,
            "sentence": sentence(s, run),
            "step_id": s.id, "change_id": s.change_id,
            "fleet": run.fleet if run else None, "lab": run.lab if run else None,
            "plan_id": run.plan_id if run else None, "run_outcome": run.outcome if run else None,
            "commit": run.commit if run else None, "dirty": run.dirty if run else None,
        })
    return {"format": FORMAT, "steps": out}


def _changes(changes: Iterable[ObservedChange]) -> list[dict[str, Any]]:
    return [{"host": c.host, "target": c.target, "change": c.what, "attribution": c.attribution,
             "run_id": c.run_id or None} for c in changes]


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def audit_json(report: AuditReport) -> dict[str, Any]:
    """`fleet audit --format json` (docs/audit.md)."""
    return {
        "format": FORMAT,
        "fleet": report.fleet,
        "snapshot": report.snapshot_id,
        "status": status_json(report.status),
        "drift": {"coverage": round(report.drift.coverage, 4),
                  "counts": {c: report.drift.count(c) for c in ("managed", "changed", "missing", "unmanaged")},
                  "items": [{"host": i.host, "kind": i.kind, "target": i.target, "class": i.cls, "detail": i.detail}
                            for i in report.drift.items]},
        "findings": [f.as_dict() for f in report.findings],
        "since": report.since,
        "changes": _changes(report.changes),
        "timeline": [{"time": _when(t), "event": text} for t, text in report.timeline],
    }


def history_json(snapshots: Iterable[SnapshotRecord], runs: Iterable[RunSummary] | None = None) -> dict[str, Any]:
    """`fleet history --json` (docs/journal.md, docs/audit.md): the runs newest first (left out
    with `--snapshots`), the snapshots oldest first."""
    document: dict[str, Any] = {"format": FORMAT}
    if runs is not None:
        document["runs"] = [
            {"run_id": r.run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.started)),
             "operator": r.who, "commit": r.commit, "dirty": r.dirty, "hosts": list(r.hosts),
             "steps": {"ok": r.ok, "failed": r.failed, "skipped": r.skipped, "interrupted": r.interrupted,
                       "running": r.running},
             "on_hosts": r.on_hosts}
            for r in runs]
    document["snapshots"] = [
        {"id": x.id, "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(x.taken)), "operator": x.operator,
         "command": x.command, "fleet": x.fleet, "lab": x.lab, "hosts": x.hosts}
        for x in snapshots]
    return document


def diff_json(changes: Iterable[ObservedChange]) -> dict[str, Any]:
    """`fleet diff A [B] --json` (docs/audit.md)."""
    return {"format": FORMAT, "changes": _changes(changes)}


def lock_json(report: LockReport) -> dict[str, Any]:
    """`fleet lock status --json` (docs/apply.md): the holder's record without its token."""
    return {"format": FORMAT, "locks": [
        {"host": r.host, "lock": r.lock, "holder": r.holder, "record": r.record.public() if r.record else None}
        for r in report.rows]}
