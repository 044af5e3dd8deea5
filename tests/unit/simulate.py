"""A pure, test-only simulator of executing a plan: what the hosts would report afterwards.

`simulate(plan, desired, secrets, observed)` runs every change of a `Plan` wave by wave (or of a
plain change list, in order) against a copy of the observed states and returns the states the
collector would then report.  It models systemd closely enough to catch ordering mistakes:

* write-unit changes the file on disk (text hash, fragment, drop-ins listed in the change are
  deleted); what systemd has loaded (ExecStart, Environment) only changes at the host's next
  daemon-reload, and enabling/starting a unit whose file changed since the last reload fails;
* write-env replaces the file's keys, values, secret fingerprints, owner, group and mode;
* a process started before a later write of its unit file or of an env file it loads runs
  with stale configuration: `simulate` reports that as a `SimulationError` at the end;
* enable / start / restart do what systemctl does; prune runs its steps (stop, disable,
  remove — a removed unit disappears from the collector's listing);
* an observe-only unit that is not installed is assumed to come from its distro package
  (fleet never writes it); unreachable hosts (HostError) are left alone, and any change for
  one is an error.

When given a Plan it also checks that every change runs after all of its dependencies.

Each action is simulated by one function, found in `SIMULATED` by the change's action (the
same dispatch as fleet's own resources, fleet/resources/): an action added to the vocabulary
without a simulation here fails `simulate` at once, naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from observed import DISTRO_UNIT_DIR, env_state_from, exec_argv, hashed, hashes_to_text_hash, managed_unit

from fleet.actions import Action, Change, EnvFilePayload, PrunePayload, UnitFilePayload
from fleet.model import Desired, EnvFile, EnvFileState, HostError, HostResult, HostState, UnitState
from fleet.plan import Plan
from fleet.textutil import sha256_hex
from fleet.units import as_observed_text, file_text, unit_path


class SimulationError(AssertionError):
    """The plan could not have been executed as written (or left stale processes behind)."""


@dataclass
class _Host:
    state: HostState
    units: dict[str, UnitState]
    envs: dict[str, EnvFileState]
    unreloaded: set[str] = field(default_factory=set)  # units whose file changed since daemon-reload
    pending: dict[str, dict[str, object]] = field(default_factory=dict)  # what the next reload loads
    started: dict[str, int] = field(default_factory=dict)  # unit -> clock of its last (re)start
    unit_written: dict[str, int] = field(default_factory=dict)
    env_written: dict[str, int] = field(default_factory=dict)


def simulate(plan: Plan | Sequence[Change], desired: Desired, secrets: Mapping[tuple[str, str], str],
             observed: Mapping[str, HostResult]) -> dict[str, HostResult]:
    hosts = {name: _Host(r, {u.unit: u for u in r.units}, {e.path: e for e in r.env_files})
             for name, r in observed.items() if isinstance(r, HostState)}
    if isinstance(plan, Plan):
        done: set[str] = set()
        for now, wave in enumerate(plan.waves, 1):
            finished = {g for g, members in plan.groups.items() if done.issuperset(members)}  # a group: all of it
            for cid in wave:
                missing = [d for d in plan.deps.get(cid, ()) if d not in done and d not in finished]
                if missing:
                    raise SimulationError(f"{cid} runs in a wave before its dependencies {missing}")
            # A wave runs in parallel: its changes share one clock tick, so none of them counts
            # as having happened before another (see the checks that compare ticks).
            for cid in wave:
                _execute(plan.change(cid), desired, secrets, hosts, observed, now)
            done.update(wave)
        if done != {c.id for c in plan.changes}:
            raise SimulationError(f"changes in no wave: {sorted({c.id for c in plan.changes} - done)}")
    else:
        for now, c in enumerate(plan, 1):
            _execute(c, desired, secrets, hosts, observed, now)
    _check_no_stale_processes(desired, hosts)
    out: dict[str, HostResult] = dict(observed)
    for name, h in hosts.items():
        out[name] = dataclasses.replace(h.state, units=tuple(h.units.values()), env_files=tuple(h.envs.values()))
    return out


@dataclass(frozen=True)
class _Step:
    """What one simulated step sees: the change, the declaration, and the host it runs on."""

    c: Change
    desired: Desired
    secrets: Mapping[tuple[str, str], str]
    h: _Host
    now: int


def _execute(c: Change, desired: Desired, secrets: Mapping[tuple[str, str], str], hosts: dict[str, _Host],
             observed: Mapping[str, HostResult], now: int) -> None:
    if isinstance(observed.get(c.host), HostError):
        raise SimulationError(f"{c.id}: a change for unreachable host {c.host}")
    h = hosts.get(c.host)
    if h is None:
        raise SimulationError(f"{c.id}: host {c.host} was not observed")
    simulated = SIMULATED.get(c.action)
    if simulated is None:
        raise SimulationError(f"{c.id}: no simulation of action {c.action!r}")
    simulated(_Step(c, desired, secrets, h, now))


def _daemon_reload(step: _Step) -> None:
    h = step.h
    for name in [n for n in h.unreloaded if h.unit_written[n] < step.now]:
        h.units[name] = dataclasses.replace(h.units[name], **h.pending.pop(name))  # type: ignore[arg-type]
        h.unreloaded.discard(name)


def _loaded(step: _Step) -> UnitState:
    """The unit an enable or a (re)start acts on, as systemd has it loaded."""
    c, h = step.c, step.h
    if c.target in h.unreloaded:
        raise SimulationError(f"{c.id}: {c.target} changed on disk and systemd was not reloaded first")
    u = h.units.get(c.target)
    return _package_unit(c, step.desired) if u is None or not u.exists else u


def _enable(step: _Step) -> None:
    step.h.units[step.c.target] = dataclasses.replace(_loaded(step), unit_file_state="enabled")


def _run(step: _Step) -> None:
    c, h = step.c, step.h
    h.units[c.target] = dataclasses.replace(_loaded(step), active_state="active",
                                            sub_state=_running_sub(c, step.desired), main_pid=50_000 + step.now,
                                            result="success")
    h.started[c.target] = step.now


def _prune(step: _Step) -> None:
    c, h = step.c, step.h
    u = h.units.get(c.target)
    if u is None:
        raise SimulationError(f"{c.id}: {c.target} is not on {c.host}")
    assert isinstance(c.payload, PrunePayload), c
    for name in c.payload.steps:
        if name == "stop":
            u = dataclasses.replace(u, active_state="inactive", sub_state="dead", main_pid=0)
            h.started.pop(c.target, None)
        elif name == "disable":
            u = dataclasses.replace(u, unit_file_state="disabled")
        elif name == "remove":
            if u.active_state == "active":
                raise SimulationError(f"{c.id}: removes the unit file of a running unit")
            del h.units[c.target]
            return
        else:
            raise SimulationError(f"{c.id}: unknown prune step {name!r}")
    h.units[c.target] = u


def _write_unit(step: _Step) -> None:
    """The file changes on disk for every unit loaded from it: the unit itself, or each of a
    template's instances on the host."""
    c, desired, h, now = step.c, step.desired, step.h, step.now
    s = desired.service(c.service or "")
    text = file_text(s, c.target) if s is not None else None
    if s is None or text is None:
        raise SimulationError(f"{c.id}: write-unit for {c.service!r}, which declares no file {c.target}")
    assert isinstance(c.payload, UnitFilePayload), c
    if c.payload.content_hash != sha256_hex(text):
        raise SimulationError(f"{c.id}: content_hash is not the hash of the rendered unit")
    path = unit_path(c.target)
    loaded = s.units_on(c.host) if s.is_template and c.target == s.unit else (c.target,)
    for name in loaded:
        u = h.units.get(name)
        drop_ins = tuple(p for p in (u.drop_in_paths if u else ()) if p not in c.payload.remove_files)
        # Drop-ins fleet does not delete stay part of the unit, and of its hashes.
        kept = dict(u.file_hashes if u else ())
        file_hashes = ((path, sha256_hex(text)),) + tuple((p, kept.get(p, sha256_hex(p))) for p in drop_ins)
        base = u if u is not None and u.exists else UnitState(
            unit=name, load_state="loaded", active_state="inactive", sub_state="dead", unit_file_state="disabled")
        h.units[name] = dataclasses.replace(base, fragment_path=path, drop_in_paths=drop_ins,
                                            file_hashes=file_hashes, text_hash=hashes_to_text_hash(file_hashes),
                                            text=as_observed_text(s, c.target))
        h.unreloaded.add(name)
        spec = s.wrapper.unit_spec if s.wrapper is not None and c.target == s.wrapper.unit else s.unit_spec
        assert spec is not None
        ref = managed_unit(s, unit=name if name != s.unit else None)
        h.pending[name] = {"exec_start": exec_argv(s, name if name != s.unit else None),
                           "environment": ref.environment, "environment_files": spec.environment_files,
                           "load_state": "loaded"}
        h.unit_written[name] = now


def _write_env(step: _Step) -> None:
    c, desired, secrets, h, now = step.c, step.desired, step.secrets, step.h, step.now
    ef = _env_file(desired, c)
    assert isinstance(c.payload, EnvFilePayload), c
    meta = {"owner": c.payload.owner, "group": c.payload.group, "mode": c.payload.mode}
    old = h.envs.get(ef.path)
    had = old if old is not None and old.present else None
    items = list(ef.values_for(c.host).items())
    items += [(k, secrets[(ef.name, k)]) for k, src in ef.sensitive
              if src.kind != "present" and (ef.name, k) in secrets]
    kept = [(k, fp) for k, src in ef.sensitive if src.kind == "present"
            for fp in [dict(had.secrets).get(k) if had else None] if fp is not None]
    h.envs[ef.path] = env_state_from(
        ef, items, owner=meta.get("owner") or (had.owner if had else "root"),
        group=meta.get("group") or (had.group if had else "root"), mode=meta.get("mode") or ef.mode,
        extra_secrets=kept)
    h.env_written[ef.path] = now


def _env_file(desired: Desired, c: Change) -> EnvFile:
    name = c.payload.name if isinstance(c.payload, EnvFilePayload) else None
    for ef in desired.env_files_on(c.host):
        if ef.path == c.target and (name is None or ef.name == name):
            return ef
    raise SimulationError(f"{c.id}: no env file declared at {c.target} for {c.host}")


def _package_unit(c: Change, desired: Desired) -> UnitState:
    s = desired.service(c.service or "")
    if s is None or not s.observe_only:
        raise SimulationError(f"{c.id}: {c.target} is not installed and fleet does not install it")
    path = f"{DISTRO_UNIT_DIR}/{s.unit}"
    return UnitState(unit=c.target, load_state="loaded", active_state="inactive", sub_state="dead",
                     unit_file_state="disabled", fragment_path=path, **hashed([(path, "package")]))


def _running_sub(c: Change, desired: Desired) -> str:
    s = desired.service(c.service or "")
    if s is not None and s.wrapper is not None and c.target == s.wrapper.unit:
        return "exited" if s.wrapper.unit_spec.remain_after_exit else "running"
    if s is not None and s.unit_spec is not None and s.unit_spec.remain_after_exit:
        return "exited"
    return "exited" if s is not None and s.observe_only and s.kind.value == "postgres" else "running"


SIMULATED: dict[Action, Callable[[_Step], None]] = {
    Action.WRITE_UNIT: _write_unit,
    Action.WRITE_ENV: _write_env,
    Action.DAEMON_RELOAD: _daemon_reload,
    Action.ENABLE: _enable,
    Action.START: _run,
    Action.RESTART: _run,
    Action.PRUNE: _prune,
}


def _check_no_stale_processes(desired: Desired, hosts: dict[str, _Host]) -> None:
    for name, h in hosts.items():
        if h.unreloaded:
            raise SimulationError(f"{name}: unit files of {sorted(h.unreloaded)} written, systemd never reloaded")
        for s in desired.services_on(name):
            for unit in s.units_on(name):  # a wrapper is never restarted: it only starts the instances
                u = h.units.get(unit)
                if u is None or u.active_state != "active":
                    continue
                since = h.started.get(unit, 0)
                if unit in h.unit_written and h.unit_written[unit] >= since:
                    raise SimulationError(f"{name}: {unit} still runs its old unit file")
                for path in s.unit_spec.environment_files if s.unit_spec else ():
                    if path in h.env_written and h.env_written[path] >= since:
                        raise SimulationError(f"{name}: {unit} still runs with the old {path}")
