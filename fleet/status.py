"""What runs where: the pure comparison behind `fleet status` (and later `fleet audit`).

Input: the declared fleet and what each host reported.  Output: a `StatusReport` of plain
data — one row per declared unit (a template's: one per instance, then its wrapper) and per
undeclared unit found by the discovery patterns or beside a declared template, one cell per
host — plus the Sidekiq view (which process serves which queue, from its command line or, without
-q, from the config file Sidekiq reads, and the findings of the same queue policy `fleet check`
applies to the declared state).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from fleet.model import Desired, Finding, HostError, HostResult, HostState, Service, UnitSpec, UnitState
from fleet.policy import SidekiqProcess, check_queues
from fleet.resources.base import Problem, Resource
from fleet.resources.registry import RESOURCES
from fleet.resources.sidekiq_config import collected, config_file
from fleet.sidekiq import SidekiqReport, sidekiq_report
from fleet.sidekiq_settings import Served, SidekiqArgs, environment_of, parse_argv, served
from fleet.textutil import sha256_hex
from fleet.unitfile import words
from fleet.units import instance_owner, is_up, render_unit, unit_file_differs, up_state

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
    down: bool = False  # declared here, and not up (missing, failed, stopped): an error in `fleet audit`
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
    source: str = "-q"  # where the queues come from: "-q", a config file's path, or "defaults"
    problem: str = ""  # why its queues are unknown (an unreadable config file); queues are then ()

    def as_policy(self) -> SidekiqProcess:
        """The process as the queue rules judge it (fleet/policy.py)."""
        return SidekiqProcess(host=self.host, unit=self.unit, queues=tuple(q for q, _ in self.queues),
                              concurrency=self.concurrency, db_pool=self.db_pool, unknown=self.problem,
                              source=self.source)


@dataclass(frozen=True)
class StatusReport:
    fleet: str
    hosts: tuple[str, ...]
    results: dict[str, HostResult]
    rows: tuple[Row, ...]
    sidekiq: tuple[QueueProcess, ...]
    queue_findings: tuple[Finding, ...]
    live: SidekiqReport | None = None  # Sidekiq's own view from its Redis, when it was read

    @property
    def unreachable(self) -> tuple[HostError, ...]:
        return tuple(r for r in self.results.values() if isinstance(r, HostError))


def build_status(desired: Desired, results: dict[str, HostResult], *,
                 quiet: Mapping[str, float] | None = None) -> StatusReport:
    """`quiet`: since when each Sidekiq process was known quiet (sidekiq.quiet_since of the previous
    observation), for the stuck-quiet finding."""
    hosts = tuple(h.name for h in desired.hosts if h.name in results)
    rows: list[Row] = []
    declared_units = {u for s in desired.services for u in (s.unit, *s.run_units())} | {
        s.wrapper.unit for s in desired.services if s.wrapper is not None}
    kinds = _Kinds(_saying("notes"), _saying("problems"))
    for s in desired.services:
        # per service, not per cell: a set for "declared here?" and the unit's hash, rendered once
        # (both are O(hosts) to recompute, which made status quadratic in hosts)
        want = sha256_hex(render_unit(s)) if s.unit_spec is not None else None
        for unit in s.run_units():
            here = frozenset(h for h in s.hosts if unit in s.units_on(h)) if s.is_template else frozenset(s.hosts)
            cells = tuple(_noted(_declared_cell(s, unit, h, results[h], here, want, kinds), results[h], unit, kinds)
                          for h in hosts)
            rows.append(Row(unit=unit, service=s.name, kind=s.kind.value, declared_hosts=tuple(sorted(
                here, key=s.hosts.index)) if s.is_template else s.hosts, cells=cells))
        if s.wrapper is not None:
            w, here = s.wrapper, frozenset(s.hosts)
            want_w = sha256_hex(w.unit_spec.text or "")
            cells = tuple(_noted(_declared_cell(s, w.unit, h, results[h], here, want_w, kinds), results[h], w.unit,
                                 kinds) for h in hosts)
            rows.append(Row(unit=w.unit, service=s.name, kind=s.kind.value, declared_hosts=s.hosts, cells=cells))
    # Units found by discovery that no service declares, e.g. a hand-made mastodon-sidekiq.service,
    # or an instance of a declared template that no service declares.
    extra: dict[str, None] = {}
    for h in hosts:
        r = results[h]
        if isinstance(r, HostState):
            for u in r.units:
                if u.unit not in declared_units and u.exists and instance_owner(desired.services, u.unit) is None:
                    extra.setdefault(u.unit)
    for unit in sorted(extra):
        cells = tuple(_noted(_undeclared_cell(h, results[h], unit), results[h], unit, kinds) for h in hosts)
        rows.append(Row(unit=unit, service=None, kind="", declared_hosts=(), cells=cells))
    procs = observed_sidekiq(desired, results)
    findings = check_queues([p.as_policy() for p in procs], what="running")
    return StatusReport(fleet=desired.name, hosts=hosts, results=results, rows=tuple(rows), sidekiq=tuple(procs),
                        queue_findings=tuple(findings), live=sidekiq_report(desired, results, quiet=quiet))


@dataclass(frozen=True)
class _Kinds:
    """The kinds of resource that have something to say in a cell: asked per cell (23,000 cells
    at 1,000 hosts), the kinds that keep the base class's silence would only cost calls."""

    noting: tuple[Resource, ...]
    judging: tuple[Resource, ...]


def _saying(method: str) -> tuple[Resource, ...]:
    """The kinds that override `Resource.<method>` (the base says nothing)."""
    return tuple(r for r in RESOURCES if getattr(type(r), method) is not getattr(Resource, method))


def _declared_cell(s: Service, unit: str, host: str, result: HostResult, declared_on: frozenset[str],
                   content_hash: str | None, kinds: _Kinds) -> Cell:
    """The cell of one of the service's units (its unit, an instance, its wrapper) on `host`."""
    if isinstance(result, HostError):
        return Cell(host, UNKNOWN)
    u = result.unit(unit)
    if host not in declared_on:
        return _undeclared_cell(host, result, unit)
    if u is None or not u.exists:
        return Cell(host, DRIFT, "missing", "not installed", u, down=True)
    wrapper = s.wrapper is not None and unit == s.wrapper.unit
    spec = s.wrapper.unit_spec if s.wrapper is not None and wrapper else s.unit_spec
    problems = []
    down = not (u.active_state == "active" if wrapper else is_up(s, u))
    if down:
        problems.append(f"should be {'active' if wrapper or s.observe_only else up_state(s, unit)}")
    if not u.enabled:
        problems.append(u.unit_file_state or "not enabled")
    if spec is not None and u.exec_start and _exec_differs(spec, u):
        problems.append("ExecStart differs")
    elif spec is not None and unit_file_differs(s, u, content_hash, s.wrapper.unit if wrapper and s.wrapper else None):
        problems.append("unit file differs")
    # What the kinds find behind the unit: a failed Postgres cluster under an active/exited parent.
    found = tuple(p for r in kinds.judging for p in r.problems(result, s))
    problems += [p.message for p in found]
    return Cell(host, DRIFT if problems else OK, u.state(), ", ".join(problems), u, down=down, problems=found)


def _exec_differs(spec: UnitSpec, u: UnitState) -> bool:
    """Does the running ExecStart differ from the declared one?  systemd shows argv with its words
    joined by spaces and specifiers expanded: the operator's text is unquoted as systemd does, and
    a command with a specifier (`%i`) is left to the unit file comparison."""
    if spec.text is None:
        return tuple(spec.exec_start.split()) != u.exec_start
    if "%" in spec.exec_start:
        return False
    return tuple(" ".join(words(spec.exec_start)).split()) != u.exec_start


def _noted(cell: Cell, result: HostResult, unit: str, kinds: _Kinds) -> Cell:
    """The cell with what each kind of resource says about the unit on that host."""
    if not isinstance(result, HostState) or cell.unit is None:
        return cell
    notes = tuple(n for r in kinds.noting for n in r.notes(result, unit))
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


def _to_int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def observed_sidekiq(desired: Desired, results: dict[str, HostResult]) -> list[QueueProcess]:
    """Every running Sidekiq process: its -c and -q, or without -q the queues (and concurrency)
    of the config file Sidekiq reads, as the host printed it (fleet/resources/sidekiq_config.py).
    A file that could not be read leaves the process with no queues and says why."""
    declared = {(h, u) for s in desired.services for h in s.hosts for u in s.units_on(h)}
    out: list[QueueProcess] = []
    # a fleet runs a few distinct command lines on many hosts: each is read once (parse_argv is
    # pure, and its answer depends on the argv alone; the rest below is read per host)
    parsed: dict[tuple[str, ...], SidekiqArgs | None] = {}
    for host, r in results.items():
        if not isinstance(r, HostState):
            continue
        for u in r.units:
            if u.active_state != "active":
                continue
            argv = u.exec_start
            args = parsed[argv] if argv in parsed else parsed.setdefault(argv, parse_argv(argv))
            if args is None:
                continue
            served = _served(r, u, args)
            out.append(QueueProcess(host=host, unit=u.unit, concurrency=served.concurrency, queues=served.queues,
                                    db_pool=_observed_db_pool(r, u), declared=(host, u.unit) in declared,
                                    source=served.source, problem=served.problem))
    return out


def _served(state: HostState, u: UnitState, args: SidekiqArgs) -> Served:
    if args.queues:  # -q: the file's queue list does not count; its concurrency is not read
        return Served(args.concurrency, args.queues, "-q")
    env = _observed_env(state, u)
    f = config_file(state, u.unit)
    if f is None:
        why = ("the config file Sidekiq reads was not collected (the host ran an older collection)"
               if not collected(state) else "fleet found no config file for it")
        return Served(args.concurrency, (), "config/sidekiq.yml", why)
    if f.status == "none":
        return served(args, environment_of(args, env), f.path, None, "", env)
    return served(args, environment_of(args, env), f.path, f.config, f.problem(), env)


def _observed_env(state: HostState, u: UnitState) -> list[tuple[str, str]]:
    """The unit's environment as far as fleet sees it: Environment=, then the env files it loads."""
    env = dict(u.environment)
    for path in u.environment_files:  # EnvironmentFile= overrides Environment=
        ef = state.env_file(path)
        if ef is not None:
            env.update(ef.value_map())
    return list(env.items())


def _observed_db_pool(state: HostState, u: UnitState) -> int | None:
    value = dict(u.environment).get("DB_POOL")
    for path in u.environment_files:  # EnvironmentFile= overrides Environment=
        ef = state.env_file(path)
        if ef is not None and "DB_POOL" in ef.value_map():
            value = ef.value_map()["DB_POOL"]
    return _to_int(value) if value is not None else None
