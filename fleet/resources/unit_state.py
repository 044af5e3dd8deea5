"""Unit state: a declared unit enabled and running (enable, start, restart), behind a health gate.

A declared unit that is not enabled is enabled; one that does not run is started (restarted
when systemd has it active but not running); one that runs is restarted when an earlier
resource rewrote its unit file or an env file it loads.  A template's units are its instances
on the host, each converged on its own (rolled by max_unavailable across hosts and instances,
fleet/graph.py); its wrapper is enabled and started, never restarted (through PartOf= that
would restart every instance at once).  Every start and restart passes the health gate
(fleet.remote.health_gate) or fails; a failed one rolls its service on that host back to the
files it had before this run.
"""

from __future__ import annotations

from collections.abc import Iterable

from fleet import remote
from fleet.actions import Action, Change, ObservedKind, Phase
from fleet.config import UNIT_NAME
from fleet.errors import FleetError, TransportError
from fleet.model import Desired, Kind, Service, UnitState
from fleet.resources.base import PLAIN, ActionSpec, AuditStep, Detail, Execution, HostDiff, Resource
from fleet.sidekiq import (
    BEAT,
    BEAT_EXPIRY,
    RedisSource,
    beat_script,
    gone_script,
    gone_timeout,
    judge_beat,
    locate_redis,
)
from fleet.units import describe_unit, is_up, not_there, unit_path, up_state

_RUNS = (Action.START, Action.RESTART)
# A failed start or restart rolled files back and stopped or restarted its unit: it explains file
# and enablement changes only when it failed; the state change it made, either way.
_ROLLED_BACK = frozenset({ObservedKind.UNIT_DISAPPEARED, ObservedKind.UNIT_TEXT, ObservedKind.UNIT_ENABLEMENT,
                          ObservedKind.ENV_PRESENCE})


# A service's enables and starts on a host where none of its units is there yet (`not_there`): the same on
# every such host with the same units but for the host's name, so worked out on the first and
# copied (a first install of 1,000 hosts made them 1,000 times).  Per service and units: the
# changes made on the first such host, or None when they name it and cannot be copied.
_FIRST_STARTS = "unit state: first starts"


class UnitStates(Resource):
    kind = "unit state"
    actions = {
        Action.ENABLE: ActionSpec(Phase.ENABLE, "+", "change", past="enabled"),
        Action.START: ActionSpec(Phase.RUN, "+", "start", past="started"),
        Action.RESTART: ActionSpec(Phase.RUN, "↻", "restart", past="restarted", rolling=True),
    }
    explained = {
        Action.ENABLE: frozenset({ObservedKind.UNIT_ENABLEMENT}),
        Action.START: _ROLLED_BACK | {ObservedKind.UNIT_STATE},
        Action.RESTART: _ROLLED_BACK | {ObservedKind.UNIT_STATE},
    }
    per_service = True

    # -- diff

    def diff_service(self, ctx: HostDiff, service: Service) -> None:
        s, host = service, ctx.host
        runs = s.units_on(host)
        unit_of = ctx.state.unit
        if runs and not not_there(unit_of(runs[0])):  # it is (partly) here: converged here, nothing learnt
            self._diff_units(ctx, s)
            return
        units = s.all_units_on(host)
        firsts: dict[tuple[int, tuple[str, ...]], tuple[Service, tuple[Change, ...] | None]] | None = \
            ctx.cache.get(_FIRST_STARTS)
        if firsts is None:
            firsts = ctx.cache[_FIRST_STARTS] = {}
        known = firsts.get((id(s), units))
        if known is not None and known[0] is s and known[1] is not None:
            for u in units:
                if not not_there(unit_of(u)):
                    break
            else:  # none of its units here yet: as on the host it was learnt from
                for c in known[1]:
                    ctx.add(Change(host, c.action, c.target, c.reason, c.service, before=c.before, after=c.after))
                return
        first = (len(ctx.changes), len(ctx.problems), len(ctx.notes))
        self._diff_units(ctx, s)
        if (known is None or known[0] is not s) and all(not_there(unit_of(u)) for u in units):
            made = tuple(ctx.changes[first[0]:])
            copyable = (len(ctx.problems), len(ctx.notes)) == first[1:] and all(
                c.host == host and c.payload is None and host not in c.reason + c.before + c.after for c in made)
            firsts[(id(s), units)] = (s, made if copyable else None)

    def _diff_units(self, ctx: HostDiff, s: Service) -> None:
        loads_changed = [p for p in (s.unit_spec.environment_files if s.unit_spec else ()) if p in ctx.written_paths]
        for unit in s.units_on(ctx.host):
            self._converge(ctx, s, unit, loads_changed)
        if s.wrapper is not None:
            self._start_wrapper(ctx, s, s.wrapper.unit)

    def _converge(self, ctx: HostDiff, s: Service, unit: str, loads_changed: list[str]) -> None:
        host = ctx.host
        u = ctx.state.unit(unit)
        self._enable(ctx, s, unit, u)
        running = u is not None and is_up(s, u)
        if not running:
            was = describe_unit(u)
            action = Action.RESTART if u is not None and u.active_state == "active" else Action.START
            ctx.add(Change(host, action, unit, f"declared to run here; now {was}", s.name,
                           before=was, after=up_state(s, unit)))
        elif s.unit in ctx.rewritten_units or loads_changed:
            why = "its unit file changes" if s.unit in ctx.rewritten_units else f"{', '.join(loads_changed)} changes"
            ctx.add(Change(host, Action.RESTART, unit, f"running, and {why}", s.name,
                           before=describe_unit(u), after=f"{up_state(s, unit)} with the new configuration"))

    def _enable(self, ctx: HostDiff, s: Service, unit: str, u: UnitState | None) -> None:
        if u is None or not u.exists or not u.enabled:
            ctx.add(Change(ctx.host, Action.ENABLE, unit, "declared units start at boot", s.name,
                           before=(u.unit_file_state or "absent") if u is not None else "absent", after="enabled"))

    def _start_wrapper(self, ctx: HostDiff, s: Service, unit: str) -> None:
        """Enabled, and active (a oneshot wrapper stays active/exited); never restarted."""
        u = ctx.state.unit(unit)
        self._enable(ctx, s, unit, u)
        if u is None or u.active_state != "active":
            was = describe_unit(u)
            ctx.add(Change(ctx.host, Action.START, unit, f"starts the instances of {s.unit} together; now {was}",
                           s.name, before=was, after="active"))

    def affects(self, change: Change, desired: Desired) -> Iterable[str]:
        return (change.target,) if change.action == Action.ENABLE else ()  # enabled before it starts

    # -- plan file

    def problem(self, change: Change) -> str | None:
        return None if UNIT_NAME.fullmatch(change.target) else \
            f"unit name {change.target!r} is not one `fleet check` accepts"

    # -- apply

    def execute(self, change: Change, step: Execution) -> None:
        if change.action == Action.ENABLE:
            step.run(remote.systemctl("enable --quiet", change.target))
            return
        # reset-failed first: a unit that crash-looped earlier (this run's rollback, or by
        # hand) would otherwise be refused by systemd's start limit for a while.
        verb = "start" if change.action == Action.START else "restart"
        env = _sidekiq_env(step.desired, step.service(change.service)) if verb == "restart" else None
        if env is None:
            step.run(remote.reset_failed(change.target) + remote.systemctl(verb, change.target),
                     timeout=step.start_timeout + step.command_grace)
        else:
            self._restart_sidekiq(change, step, env)
        self._gate(change, step)

    def _restart_sidekiq(self, change: Change, step: Execution, env_path: str) -> None:
        """A Sidekiq restart is done when its old process has left Sidekiq's `processes` too: until
        then Sidekiq's own view (and Mastodon's admin check) still counts it, and a process that
        outlived its unit's stop is still taking jobs."""
        unit = remote.q(change.target)
        out = step.run(f"p0=$(systemctl show -p MainPID --value -- {unit}); " + remote.reset_failed(change.target)
                       + f"systemctl restart -- {unit} && echo @@ok && " + gone_script(env_path, '"$p0"'),
                       timeout=step.start_timeout + step.command_grace + BEAT_EXPIRY + 20)
        old = gone_timeout(out)
        if old is not None:
            raise FleetError(f"the old Sidekiq process {old} still heartbeats in Redis "
                             f"{BEAT_EXPIRY:g} s after the restart of {change.target}",
                             hint="it outlived its unit's stop: find it (ps) and stop it")

    def _gate(self, change: Change, step: Execution) -> None:
        service = step.service(change.service)
        check = service.health_for(change.target)
        then, window = "", 0.0
        if check is not None and check.sidekiq:
            then, window = sidekiq_gate(step.desired, service, start_timeout=step.start_timeout)
        budget = step.start_timeout + step.settle + (check.timeout if check else 0) + window + step.command_grace
        out = step.run(remote.health_gate(change.target, check, settle=step.settle, start_timeout=step.start_timeout,
                                          then=then), timeout=budget)
        lines = out.splitlines()
        failed = next((ln for ln in lines if ln.startswith("@@gate fail")), None)
        if failed is None and "@@gate ok" in lines:  # the marker line itself, not a log line quoting it
            why = judge_beat(out, step.host.name, service.sidekiq, window) if then and service.sidekiq else ""
            if not why:
                return
            step.detail = "\n".join(ln for ln in lines if ln.startswith(BEAT))
            raise FleetError(f"the Sidekiq health check failed: {why}",
                             hint="check the unit's -q/-c or config/sidekiq.yml, and the Redis its env file names")
        step.detail = "\n".join(ln[2:] for ln in lines if ln.startswith("| "))
        raise FleetError((failed or "@@gate fail (no reason)")[len("@@gate fail "):])

    def rollback(self, change: Change, step: Execution) -> str:
        """Put the failed service on this host back to its previous unit/env content."""
        if change.action not in _RUNS:
            return ""
        svc = step.desired.service(change.service or "")
        if svc is None:
            return ""
        unit = change.target  # the unit that failed: the service's unit, or one of its instances
        files = {unit_path(svc.unit), unit_path(unit)}  # a template's instance: its file is the template's
        mine = [p for p in step.written() if any(p == f or p.startswith(f + ".d/") for f in files)
                or (svc.unit_spec is not None and p in svc.unit_spec.environment_files)]
        was_running = change.before.startswith("active")
        env = _sidekiq_env(step.desired, svc)
        outlived = None
        try:
            if not was_running and env is not None:
                outlived = self._stop_sidekiq(unit, step, env)
            elif not was_running:  # stop first: a crash-looping new unit must not restart meanwhile
                step.run_unchecked(remote.systemctl("stop", unit) + remote.reset_failed(unit),
                                   timeout=step.start_timeout + step.command_grace)
            for path in mine:
                step.run_unchecked(remote.restore_file(path, run_id=step.run_id), timeout=60)
            if mine:
                step.run_unchecked(remote.systemctl("daemon-reload"), timeout=60)
            if was_running:
                step.run_unchecked(remote.systemctl("restart", unit),
                                   timeout=step.start_timeout + step.command_grace)
        except TransportError as e:
            return f"rollback on {change.host} failed: {e.message}"
        restored = ", ".join(mine) if mine else "nothing written"
        still = (f"; its Sidekiq process {outlived} still heartbeats in Redis {BEAT_EXPIRY:g} s after the stop: "
                 "find it (ps) and stop it") if outlived else ""
        return (f"rolled back {unit} on {change.host}: restored {restored}; "
                + ("restarted it" if was_running else "stopped it (it was not running before)") + still)

    def _stop_sidekiq(self, unit: str, step: Execution, env_path: str) -> str | None:
        """The rollback's stop of a Sidekiq unit, done (as a prune's) when the process it stopped has
        left Sidekiq's `processes`: a new process that failed its gate may be heartbeating, taking
        jobs from queues it should not serve.  The identity of one still there after the wait, else None."""
        u = remote.q(unit)
        out = step.run(f"p0=$(systemctl show -p MainPID --value -- {u}); systemctl stop -- {u}; "
                       + remote.reset_failed(unit) + "echo @@ok; " + gone_script(env_path, '"$p0"'),
                       timeout=step.start_timeout + step.command_grace + BEAT_EXPIRY + 20)
        return gone_timeout(out)

    # -- plan text and audit

    def details(self, change: Change) -> list[Detail]:
        return [(PLAIN, f"was {change.before}")] if change.before else []

    def explains(self, step: AuditStep, kind: ObservedKind, key: str) -> bool:
        if not super().explains(step, kind, key):
            return False
        return not (step.action in _RUNS and kind in _ROLLED_BACK and step.outcome != "failed")


def sidekiq_gate(desired: Desired, service: Service, *, start_timeout: float) -> tuple[str, float]:
    """The shell that waits for a Sidekiq unit's new process to heartbeat (watching the unit stays
    up), for the end of its health gate, and how long it waits: apply's start timeout."""
    env = _sidekiq_env(desired, service)
    if env is None:  # fleet check refuses health.sidekiq without an env file
        raise FleetError(f"service {service.name!r} declares the Sidekiq health check but loads no env file")
    window = float(int(start_timeout) + 1)
    return beat_script(env, '"$p0"', timeout=int(window), each="up"), window


def _sidekiq_env(desired: Desired, service: Service) -> str | None:
    """The env file a Sidekiq service's host finds Redis with (the one the collection reads, when the
    service loads it, else its first); None for any other service, or when it loads none."""
    if service.kind != Kind.SIDEKIQ or service.unit_spec is None or not service.unit_spec.environment_files:
        return None
    files = service.unit_spec.environment_files
    where = locate_redis(desired, desired.sidekiq_policy)
    return where.env_path if isinstance(where, RedisSource) and where.env_path in files else files[0]
