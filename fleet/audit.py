"""Post-incident state audits: drift classes, policy findings on the observed fleet, and what
changed between two observations — each change attributed to a journaled apply or marked as
made outside fleet.  Pure: inputs are the desired state, observed states and journal records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from fleet.actions import ObservedKind
from fleet.model import Desired, Finding, HostResult, HostState, Kind, UnitState
from fleet.policy import check_env_keys, check_env_value, check_placement, check_queues
from fleet.resources.registry import for_action
from fleet.sidekiq_settings import is_sidekiq
from fleet.snapshot import short_secret
from fleet.status import StatusReport, build_status

# driftctl's classes
MATCHING, CHANGED, MISSING, UNMANAGED = "managed", "changed", "missing", "unmanaged"


@dataclass(frozen=True)
class DriftItem:
    host: str
    kind: str  # unit | env
    target: str
    cls: str  # managed | changed | missing | unmanaged
    detail: str = ""


@dataclass(frozen=True)
class Drift:
    items: tuple[DriftItem, ...]

    def count(self, cls: str) -> int:
        return sum(1 for i in self.items if i.cls == cls)

    @property
    def coverage(self) -> float:
        """Share of what fleet found on the hosts that is declared and as declared."""
        total = len(self.items) - self.count(MISSING)
        return self.count(MATCHING) / total if total else 1.0


def classify(desired: Desired, results: Mapping[str, HostResult]) -> Drift:
    report = build_status(desired, dict(results))
    items: list[DriftItem] = []
    for row in report.rows:
        for c in row.cells:
            if c.status == "ok":
                items.append(DriftItem(c.host, "unit", row.unit, MATCHING))
            elif c.status == "drift":
                cls = MISSING if c.state == "missing" else CHANGED
                items.append(DriftItem(c.host, "unit", row.unit, cls, c.detail))
            elif c.status == "unmanaged":
                items.append(DriftItem(c.host, "unit", row.unit, UNMANAGED, c.detail))
    for host, r in results.items():
        if not isinstance(r, HostState):
            continue
        declared = {e.path for e in desired.env_files_on(host)}
        for ef in desired.env_files_on(host):
            obs = r.env_file(ef.path)
            if obs is None or not obs.present:
                items.append(DriftItem(host, "env", ef.path, MISSING, "file is missing"))
                continue
            want = ef.values_for(host)
            bad = sorted(k for k in set(want) | set(obs.value_map()) if want.get(k) != obs.value_map().get(k)
                         and k not in obs.secret_map() and k not in dict(ef.sensitive))
            bad += sorted(k for k in obs.keys if k not in want and k not in dict(ef.sensitive) and k not in bad)
            missing = [k for k, src in ef.sensitive if k not in obs.keys]
            detail = ", ".join([f"{k} differs" for k in bad] + [f"{k} missing" for k in missing])
            items.append(DriftItem(host, "env", ef.path, CHANGED if detail else MATCHING, detail))
        for e in r.env_files:
            if e.present and e.path not in declared:
                items.append(DriftItem(host, "env", e.path, UNMANAGED, "present where none is declared"))
    return Drift(tuple(items))


def infer_kind(desired: Desired, u: UnitState) -> Kind | None:
    """What an observed unit is: its declaring service's kind, else guessed from name and argv."""
    svc = next((s for s in desired.services if s.owns(u.unit)), None)
    if svc is not None:
        return svc.kind
    if is_sidekiq(u.exec_start):
        return Kind.SIDEKIQ
    name = u.unit.split("@", 1)[0].split(".", 1)[0]
    if name.startswith("postgres"):
        return Kind.POSTGRES
    if name.startswith("redis"):
        return Kind.REDIS
    if any(a.endswith("puma") for a in u.exec_start):
        return Kind.WEB
    return None


def observed_findings(desired: Desired, results: Mapping[str, HostResult], report: StatusReport) -> list[Finding]:
    """The domain policies judged on what runs, not on what was declared."""
    out: list[Finding] = []
    running: list[tuple[str, Kind, str, str]] = []
    for host, r in results.items():
        if not isinstance(r, HostState):
            out.append(Finding("error", "audit.unreachable", f"{host} could not be observed: {r.message}",
                               host=host, hint=r.hint))
            continue
        for u in r.units:
            kind = infer_kind(desired, u)
            if kind is not None and u.active_state == "active":
                running.append((host, kind, u.unit, ""))
    out += [_observed(f) for f in check_placement(desired, running)]
    out += _down(report)
    out += check_queues([p.as_policy() for p in report.sidekiq], what="running")
    out += _env_findings(desired, results)
    out += _service_problems(report)
    out += _sidekiq_findings(report)
    return out


def _sidekiq_findings(report: StatusReport) -> list[Finding]:
    """What Sidekiq's own view says against systemd and the declaration (fleet/sidekiq.py: check)."""
    if report.live is None:
        return []
    return list(report.live.findings)


def _down(report: StatusReport) -> list[Finding]:
    """A declared unit that does not run where it is declared (missing, failed, stopped) is an
    error: a failed `mastodon-streaming@4001.service` is one of four streaming processes gone."""
    return [Finding("error", "unit.down", f"{row.unit} on {c.host} is {c.state}: declared to run there "
                                          f"({row.service})", host=c.host,
                    hint="`fleet apply` starts it; its journal says why it stopped")
            for row in report.rows for c in row.cells if c.down]
def _service_problems(report: StatusReport) -> list[Finding]:
    """What the kinds of resource found wrong behind declared units (a failed database cluster under
    an `active/exited` parent, a Redis that does not answer): errors, each naming service and host."""
    return [Finding("error", p.code, f"{row.service} on {c.host}: {p.message}", host=c.host, hint=p.hint)
            for row in report.rows for c in row.cells for p in c.problems]


def _observed(f: Finding) -> Finding:
    """Placement findings point at hosts, not at the desired-state file."""
    return Finding(f.severity, f.code, f.message, host=f.host, hint="stop it there (fleet apply prunes undeclared "
                   "Mastodon units) or change the placement policy")


def _env_findings(desired: Desired, results: Mapping[str, HostResult]) -> list[Finding]:
    out: list[Finding] = []
    for host, r in results.items():
        if not isinstance(r, HostState):
            continue
        declared = {e.path for e in desired.env_files_on(host)}
        for e in r.env_files:
            if not e.present:
                if e.path in declared:
                    out.append(Finding("error", "env.file-missing", f"{e.path} is missing on {host}", host=host,
                                       hint="`fleet apply` writes it"))
                continue
            if e.path not in declared:
                out.append(Finding("warning", "env.file-unexpected",
                                   f"{e.path} exists on {host}, where no env file is declared", host=host))
            out += [Finding(f.severity, f.code, f.message, host=host, hint=f.hint)
                    for f in check_env_keys(((f"{host}:{e.path}", "", k, host) for k in dict.fromkeys(e.keys)),
                                            desired.extra_env_keys)]
            for k, v in e.values:
                out += [Finding(f.severity, f.code, f.message, host=host, hint=f.hint)
                        for f in check_env_value("", "", k, v, host)]
            if e.invalid_lines:
                out.append(Finding("warning", "env.invalid-lines",
                                   f"{e.path} on {host} has {e.invalid_lines} line(s) that are not KEY=value",
                                   host=host, hint="Mastodon's dotenv ignores them; `fleet apply` rewrites the file"))
    out += _inconsistent(desired, results)
    return out


def _inconsistent(desired: Desired, results: Mapping[str, HostResult]) -> list[Finding]:
    """A key whose value differs between hosts of the same service (S3_ENABLED=false on one)."""
    out: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    for svc in desired.services:
        for path in svc.unit_spec.environment_files if svc.unit_spec else ():
            values: dict[str, dict[str, str]] = defaultdict(dict)
            for host in svc.hosts:
                r = results.get(host)
                e = r.env_file(path) if isinstance(r, HostState) else None
                if e is None or not e.present:
                    continue
                for k, v in e.values:
                    values[k][host] = v
                for k, fp in e.secrets:
                    values[k][host] = short_secret(fp)
            for k, per_host in values.items():
                if len(set(per_host.values())) > 1 and (path, k) not in seen:
                    seen.add((path, k))
                    shown = ", ".join(f"{h}={v}" for h, v in sorted(per_host.items()))
                    out.append(Finding("error", "env.inconsistent",
                                       f"{k} in {path} differs between hosts of {svc.name}: {shown}",
                                       hint="one was changed by hand; `fleet apply` restores the declared value"))
    return out


# ---------------------------------------------------------------- what changed


@dataclass(frozen=True)
class ObservedChange:
    host: str
    target: str  # unit name or env file path
    what: str  # a sentence fragment: "ExecStart of X changed from `…` to `…`"
    attribution: str = ""  # "fleet apply run R by alice@laptop" | "changed outside fleet"
    run_id: str = ""
    at: float | None = None  # when the attributed step ran
    kind: str = ""  # which kind of change (an actions.ObservedKind): what a fleet step could have done
    key: str = ""  # for kind "env-key": the key


def changes_between(old: Mapping[str, HostResult], new: Mapping[str, HostResult]) -> list[ObservedChange]:
    out: list[ObservedChange] = []
    for host in sorted(set(old) | set(new)):
        a, b = old.get(host), new.get(host)
        if not isinstance(a, HostState) or not isinstance(b, HostState):
            if isinstance(a, HostState) != isinstance(b, HostState):
                was = "answering" if isinstance(a, HostState) else "not answering"
                now = "answering" if isinstance(b, HostState) else "not answering"
                out.append(ObservedChange(host, "(host)", f"on {host}, the host went from {was} to {now}"))
            continue
        out += _unit_changes(host, a, b) + _env_changes(host, a, b)
    return out


def _unit_changes(host: str, a: HostState, b: HostState) -> list[ObservedChange]:
    out = []
    ua = {u.unit: u for u in a.units if u.exists}
    ub = {u.unit: u for u in b.units if u.exists}
    for name in sorted(set(ua) | set(ub)):
        x, y = ua.get(name), ub.get(name)
        if x is None and y is not None:
            out.append(ObservedChange(host, name, f"on {host}, {name} appeared ({_desc(y)})", kind="unit-appeared"))
        elif y is None and x is not None:
            out.append(ObservedChange(host, name, f"on {host}, {name} disappeared (was {_desc(x)})",
                                      kind="unit-disappeared"))
        elif x is not None and y is not None:
            if x.exec_start != y.exec_start:
                out.append(ObservedChange(host, name, f"on {host}, ExecStart of {name} changed from "
                                                      f"`{' '.join(x.exec_start)}` to `{' '.join(y.exec_start)}`",
                                          kind="unit-text"))
            elif x.text_hash != y.text_hash:
                out.append(ObservedChange(host, name, f"on {host}, the unit file of {name} changed", kind="unit-text"))
            if x.state() != y.state():
                out.append(ObservedChange(host, name, f"on {host}, {name} went from {x.state()} to {y.state()}",
                                          kind="unit-state"))
            if x.unit_file_state != y.unit_file_state:
                before, after = x.unit_file_state or "no unit file", y.unit_file_state or "no unit file"
                out.append(ObservedChange(host, name, f"on {host}, {name} went from {before} to {after}",
                                          kind="unit-enablement"))
    return out


def _desc(u: UnitState) -> str:
    args = " ".join(u.exec_start)
    return f"{u.state()}, {u.unit_file_state}" + (f", `{args}`" if args else "")


def _env_changes(host: str, a: HostState, b: HostState) -> list[ObservedChange]:
    out = []
    paths = sorted({e.path for e in a.env_files} | {e.path for e in b.env_files})
    for path in paths:
        x, y = a.env_file(path), b.env_file(path)
        xp, yp = bool(x and x.present), bool(y and y.present)
        if xp != yp:
            out.append(ObservedChange(host, path, f"on {host}, {path} {'appeared' if yp else 'disappeared'}",
                                      kind="env-presence"))
            continue
        if not (x and y and xp):
            continue
        xv = {**x.value_map(), **{k: short_secret(v) for k, v in x.secrets}}
        yv = {**y.value_map(), **{k: short_secret(v) for k, v in y.secrets}}
        secret = {k for k, _ in x.secrets} | {k for k, _ in y.secrets}
        for k in sorted(set(xv) | set(yv)):
            def shown(v: str, sensitive: bool = k in secret) -> str:
                return f"(sensitive, {v})" if sensitive else f"`{v}`"

            if k not in xv:
                what = f"on {host}, {k} was added to {path} ({shown(yv[k])})"
            elif k not in yv:
                what = f"on {host}, {k} was removed from {path} (was {shown(xv[k])})"
            elif xv[k] != yv[k]:
                what = f"on {host}, {k} in {path} changed from {shown(xv[k])} to {shown(yv[k])}"
            else:
                continue
            out.append(ObservedChange(host, path, what, kind="env-key", key=k))
        if (x.mode, x.owner, x.group) != (y.mode, y.owner, y.group):
            out.append(ObservedChange(host, path, f"on {host}, owner/mode of {path} changed from "
                                                  f"{x.owner}:{x.group} {x.mode} to {y.owner}:{y.group} {y.mode}",
                                      kind="env-meta"))
    return out


@dataclass(frozen=True)
class JournalStep:
    """What attribution needs of a journal step (fleet.journal.StepRecord has these fields)."""

    run_id: str
    host: str
    action: str
    target: str
    started: float | None
    outcome: str | None
    keys: tuple[str, ...] = ()  # for write-env: the keys the step set, changed or removed


def attribute(changes: Sequence[ObservedChange], steps: Sequence[JournalStep], operators: Mapping[str, str],
              t0: float, t1: float) -> list[ObservedChange]:
    """A change seen between t0 and t1 is fleet's when a journaled step in that window, on the
    same host and target, could have made it: the right kind of action (a write-env that did not
    touch a key does not explain that key's change, a start does not explain a new ExecStart);
    otherwise it was made outside fleet — even while an apply ran."""
    out = []
    for c in changes:
        step = next((s for s in steps if s.host == c.host and s.started is not None and t0 <= s.started <= t1
                     and s.outcome in ("ok", "failed", None) and _explains(s, c)), None)
        if step is None:
            out.append(replace(c, attribution="changed outside fleet", run_id="", at=None))
        else:
            who = operators.get(step.run_id, "?")
            out.append(replace(c, attribution=f"fleet apply run {step.run_id} by {who}", run_id=step.run_id,
                               at=step.started))
    return out


def _explains(step: JournalStep, c: ObservedChange) -> bool:
    """Could `step` have made `c`?  The resource of the step's action says, by the kind of change
    (a failed start/restart rolled files back; a write-env explains only the keys it touched)."""
    if step.target != c.target:
        return False
    if c.kind not in _KINDS:  # a change fleet does not classify: the target is all there is to go by
        return True
    resource = for_action(step.action)
    return resource is not None and resource.explains(step, ObservedKind(c.kind), c.key)


_KINDS = frozenset(ObservedKind)


@dataclass
class AuditReport:
    fleet: str
    status: StatusReport
    drift: Drift
    findings: list[Finding]
    since: str = ""  # what --since resolved to (a snapshot id and time), "" without --since
    changes: list[ObservedChange] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (time, sentence), journal + changes
    snapshot_id: str = ""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.is_error]


def build_audit(desired: Desired, results: Mapping[str, HostResult], *,
                quiet: Mapping[str, float] | None = None) -> AuditReport:
    status = build_status(desired, dict(results), quiet=quiet)
    return AuditReport(fleet=desired.name, status=status, drift=classify(desired, results),
                       findings=observed_findings(desired, results, status))

