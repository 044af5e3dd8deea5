"""What runs where: the pure comparison behind `fleet status` (and later `fleet audit`).

Input: the declared fleet and what each host reported.  Output: a `StatusReport` of plain
data — one row per declared service and per undeclared unit found by the discovery patterns,
one cell per host — plus the Sidekiq view (which process serves which queue, and the
findings of the same queue policy `fleet check` applies to the declared state).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fleet.model import Desired, Finding, HostError, HostResult, HostState, Service, UnitState
from fleet.policy import SidekiqProcess, check_queues
from fleet.resources.base import Problem
from fleet.resources.registry import RESOURCES
from fleet.textutil import sha256_hex
from fleet.units import instance_owner, render_unit, unit_file_differs

# Cell statuses, from best to worst news:
OK = "ok"  # declared here and as declared
ABSENT = "absent"  # not declared here and not present
PRESENT = "present"  # not declared here; installed but not running
DRIFT = "drift"  # declared here, but not as declared (stopped, disabled, missing, changed)
UNMANAGED = "unmanaged"  # running here and nobody declared it here
UNKNOWN = "unknown"  # the host did not answer


@dataclass(frozen=True)
class Cell:
    host: str
    status: str
    state: str = ""  # ActiveState/SubState, "missing", or "" when absent/unknown
    detail: str = ""  # why it is drift: "disabled", "ExecStart differs" …
    unit: UnitState | None = None
    notes: tuple[str, ...] = ()  # what kinds of resource observed about the unit: "has drop-ins …"
    problems: tuple[Problem, ...] = ()  # what kinds of resource found wrong with the service here (in detail too)


@dataclass(frozen=True)
class Row:
    unit: str
    service: str | None  # None: a unit found by discovery that no service declares
    kind: str
    declared_hosts: tuple[str, ...]
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class QueueProcess:
    host: str
    unit: str
    concurrency: int | None
    queues: tuple[tuple[str, int | None], ...]
    db_pool: int | None
    declared: bool


@dataclass(frozen=True)
class StatusReport:
    fleet: str
    hosts: tuple[str, ...]
    results: dict[str, HostResult]
    rows: tuple[Row, ...]
    sidekiq: tuple[QueueProcess, ...]
    queue_findings: tuple[Finding, ...]

    @property
    def unreachable(self) -> tuple[HostError, ...]:
        return tuple(r for r in self.results.values() if isinstance(r, HostError))


def build_status(desired: Desired, results: dict[str, HostResult]) -> StatusReport:
    hosts = tuple(h.name for h in desired.hosts if h.name in results)
    rows: list[Row] = []
    declared_units = {s.unit for s in desired.services}
    for s in desired.services:
        # per service, not per cell: a set for "declared here?" and the unit's hash, rendered once
        # (both are O(hosts) to recompute, which made status quadratic in hosts)
        here = frozenset(s.hosts)
        want = sha256_hex(render_unit(s)) if s.unit_spec is not None else None
        cells = tuple(_noted(_declared_cell(s, h, results[h], here, want), results[h], s.unit) for h in hosts)
        rows.append(Row(unit=s.unit, service=s.name, kind=s.kind.value, declared_hosts=s.hosts, cells=cells))
    # Units found by discovery that no service declares, e.g. a hand-made mastodon-sidekiq.service.
    extra: dict[str, None] = {}
    for h in hosts:
        r = results[h]
        if isinstance(r, HostState):
            for u in r.units:
                if u.unit not in declared_units and u.exists and instance_owner(desired.services, u.unit) is None:
                    extra.setdefault(u.unit)
    for unit in sorted(extra):
        cells = tuple(_noted(_undeclared_cell(h, results[h], unit), results[h], unit) for h in hosts)
        rows.append(Row(unit=unit, service=None, kind="", declared_hosts=(), cells=cells))
    procs = observed_sidekiq(desired, results)
    findings = check_queues(
        [SidekiqProcess(host=p.host, unit=p.unit, queues=tuple(q for q, _ in p.queues), concurrency=p.concurrency,
                        db_pool=p.db_pool) for p in procs],
        what="running")
    return StatusReport(fleet=desired.name, hosts=hosts, results=results, rows=tuple(rows), sidekiq=tuple(procs),
                        queue_findings=tuple(findings))


def _declared_cell(s: Service, host: str, result: HostResult, declared_on: frozenset[str],
                   content_hash: str | None) -> Cell:
    if isinstance(result, HostError):
        return Cell(host, UNKNOWN)
    u = result.unit(s.unit)
    if host not in declared_on:
        return _undeclared_cell(host, result, s.unit)
    if u is None or not u.exists:
        return Cell(host, DRIFT, "missing", "not installed", u)
    problems = []
    healthy = u.active_state == "active" and (u.sub_state == "running" or s.observe_only)
    if not healthy:
        problems.append(f"should be active{'' if s.observe_only else '/running'}")
    if not u.enabled:
        problems.append(u.unit_file_state or "not enabled")
    if s.unit_spec is not None and u.exec_start and tuple(s.unit_spec.exec_start.split()) != u.exec_start:
        problems.append("ExecStart differs")
    elif s.unit_spec is not None and unit_file_differs(s, u, content_hash):
        problems.append("unit file differs")
    # What the kinds find behind the unit: a failed Postgres cluster under an active/exited parent.
    found = tuple(p for r in RESOURCES for p in r.problems(result, s))
    problems += [p.message for p in found]
    return Cell(host, DRIFT if problems else OK, u.state(), ", ".join(problems), u, problems=found)


def _noted(cell: Cell, result: HostResult, unit: str) -> Cell:
    """The cell with what each kind of resource says about the unit on that host."""
    if not isinstance(result, HostState) or cell.unit is None:
        return cell
    notes = tuple(n for r in RESOURCES for n in r.notes(result, unit))
    return replace(cell, notes=notes) if notes else cell


def _undeclared_cell(host: str, result: HostResult, unit: str) -> Cell:
    if isinstance(result, HostError):
        return Cell(host, UNKNOWN)
    u = result.unit(unit)
    if u is None or not u.exists:
        return Cell(host, ABSENT)
    if u.active_state in ("active", "activating", "reloading"):
        return Cell(host, UNMANAGED, u.state(), "not declared on this host", u)
    return Cell(host, PRESENT, u.state(), "installed, not declared here", u)


def parse_sidekiq_argv(argv: tuple[str, ...]) -> tuple[int | None, tuple[tuple[str, int | None], ...]] | None:
    """(-c, [(queue, weight)]) from a Sidekiq command line; None when it is not Sidekiq."""
    if not any(a.rsplit("/", 1)[-1] == "sidekiq" for a in argv):
        return None
    concurrency: int | None = None
    queues: list[tuple[str, int | None]] = []
    it = iter(argv)
    for a in it:
        if a in ("-c", "--concurrency"):
            concurrency = _to_int(next(it, ""))
        elif a.startswith("--concurrency="):
            concurrency = _to_int(a.split("=", 1)[1])
        elif a in ("-q", "--queue"):
            queues.append(_queue(next(it, "")))
        elif a.startswith("--queue="):
            queues.append(_queue(a.split("=", 1)[1]))
    return concurrency, tuple(q for q in queues if q[0])


def _queue(spec: str) -> tuple[str, int | None]:
    name, _, weight = spec.partition(",")
    return name, _to_int(weight) if weight else None


def _to_int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def observed_sidekiq(desired: Desired, results: dict[str, HostResult]) -> list[QueueProcess]:
    """Every running Sidekiq process, as its ExecStart says.  Without -q, Sidekiq reads
    config/sidekiq.yml, which fleet cannot see: such a process is listed with no queues."""
    declared = {(h, s.unit) for s in desired.services for h in s.hosts}
    out: list[QueueProcess] = []
    for host, r in results.items():
        if not isinstance(r, HostState):
            continue
        for u in r.units:
            if u.active_state != "active":
                continue
            parsed = parse_sidekiq_argv(u.exec_start)
            if parsed is None:
                continue
            concurrency, queues = parsed
            out.append(QueueProcess(host=host, unit=u.unit, concurrency=concurrency, queues=queues,
                                    db_pool=_observed_db_pool(r, u), declared=(host, u.unit) in declared))
    return out


def _observed_db_pool(state: HostState, u: UnitState) -> int | None:
    value = dict(u.environment).get("DB_POOL")
    for path in u.environment_files:  # EnvironmentFile= overrides Environment=
        ef = state.env_file(path)
        if ef is not None and "DB_POOL" in ef.value_map():
            value = ef.value_map()["DB_POOL"]
    return _to_int(value) if value is not None else None
