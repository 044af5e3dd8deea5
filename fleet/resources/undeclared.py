"""Undeclared units: a unit found by a discovery pattern on a host where nothing declares it is
stopped, disabled and (when it is fleet's to remove) deleted — a prune.

An instance of a declared template that no service declares on the host (`x@4002.service` next
to a declared `x@.service` with instances 4000 and 4001) is an undeclared unit like any other;
its prune removes only its own files, never the template file the declared instances share.

A prune that stops a unit running Sidekiq (its observed ExecStart is a sidekiq command) is done
only once that process has left Sidekiq's `processes`, as a Sidekiq restart is (unit_state.py):
until then Sidekiq's own view and Mastodon's admin check still count it.  The plan records the env
file through which the host finds Redis; the executor captures the unit's MainPID before the stop
and waits for its heartbeat to go, failing the step if it still beats after the bound.

Make-before-break needs the whole fleet in view: with a host excluded (--limit) or not
observed, the instance a prune would stop may be the only one left, so the prune becomes a
note instead.  A pattern with `prune = false` and `--no-prune` do the same.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from fleet import remote
from fleet.actions import PRUNE_STEPS, Action, Change, ObservedKind, Payload, Phase, PrunePayload
from fleet.config import UNIT_NAME, env_path_ok
from fleet.errors import FleetError
from fleet.model import Desired, DiscoveryPattern, UnitState
from fleet.resources.base import (
    PLAIN,
    ActionSpec,
    Detail,
    Execution,
    HostDiff,
    PayloadError,
    Resource,
    StepView,
    empty,
    refuse_removals,
    removal_problem,
    report_refused,
    text,
    texts,
    was,
)
from fleet.sidekiq import BEAT_EXPIRY, RedisSource, gone_script, gone_timeout, locate_redis
from fleet.sidekiq_settings import parse_argv
from fleet.units import describe_unit, instance_owner, prunable_files, refused_unit_files


class UndeclaredUnits(Resource):
    kind = "undeclared unit"
    actions = {Action.PRUNE: ActionSpec(Phase.PRUNE, "-", "prune")}
    explained = {Action.PRUNE: frozenset({ObservedKind.UNIT_DISAPPEARED, ObservedKind.UNIT_STATE,
                                          ObservedKind.UNIT_ENABLEMENT})}

    # -- diff

    def diff_host(self, ctx: HostDiff) -> None:
        desired, state, host = ctx.desired, ctx.state, ctx.host
        declared_here = {unit for s in desired.services_on(host) for unit in (s.unit, *s.all_units_on(host))}
        for u in state.units:
            if u.unit in declared_here or not u.exists or instance_owner(desired.services_on(host), u.unit) is not None:
                continue
            pattern = _matching_pattern(desired.discover, u.unit)
            active = u.active_state in ("active", "activating", "reloading")
            if pattern is None:
                continue  # declared for another host, not matching discovery: not our business here
            report_refused(ctx, u.unit, refused_unit_files(u.unit, (u.fragment_path, *u.drop_in_paths)))
            own = prunable_files(u)
            ours = u.fragment_path in own
            if not active and not u.enabled and not ours:
                continue  # an installed, idle distro unit (postgresql on a non-db host): nothing to say
            if not (pattern.prune and ctx.prune and ctx.whole):
                why = (f"{pattern.pattern} has prune = false" if not pattern.prune
                       else "pruning is off for this run (--no-prune)" if not ctx.prune
                       else "not every host is in view (--limit or unreachable), so fleet cannot make sure "
                            "it runs elsewhere before stopping it here")
                ctx.notes.append(f"on {host}, {u.unit} is undeclared ({describe_unit(u)}); left alone: {why}")
                continue
            steps = [s for s, need in (("stop", active), ("disable", u.enabled and u.unit_file_state != "static"),
                                       ("remove", ours)) if need]
            if not steps:
                continue
            files = ((u.fragment_path,) if "remove" in steps else ()) + tuple(p for p in own if p != u.fragment_path)
            ctx.add(Change(host, Action.PRUNE, u.unit,
                           f"undeclared on {host} (matches {pattern.pattern}, prune = true)",
                           _service_of(desired, u.unit), before=describe_unit(u),
                           after="stopped, disabled" + (", unit file removed" if "remove" in steps else ""),
                           payload=PrunePayload(steps=tuple(steps), remove_files=files if "remove" in steps else (),
                                                sidekiq_env=_sidekiq_env(desired, u) if "stop" in steps else "")))

    # -- plan file

    def load(self, action: Action, fields: Mapping[str, Any]) -> Payload:
        empty(fields, "diff", "keys", "content_hash")
        meta = fields.get("meta") or {}
        if not isinstance(meta, dict) or set(meta) - {"sidekiq_env"}:
            raise PayloadError("its meta holds more than sidekiq_env")
        return PrunePayload(steps=texts(fields, "steps"), remove_files=texts(fields, "remove_files"),
                            sidekiq_env=text(meta, "sidekiq_env"))

    def problem(self, change: Change) -> str | None:
        if not UNIT_NAME.fullmatch(change.target):
            return f"unit name {change.target!r} is not one `fleet check` accepts"
        p = _payload(change)
        problem = removal_problem(p.remove_files, change.target)
        if problem:
            return problem
        if any(s not in PRUNE_STEPS for s in p.steps) or len(set(p.steps)) != len(p.steps):
            return f"steps {list(p.steps)!r} are not prune steps ({', '.join(PRUNE_STEPS)})"
        if p.sidekiq_env and not env_path_ok(p.sidekiq_env):
            return f"sidekiq_env {p.sidekiq_env!r} is not an absolute file path without '..'"
        return None

    # -- apply

    def execute(self, change: Change, step: Execution) -> None:
        p = _payload(change)
        refuse_removals(p.remove_files, change.target)
        if not p.sidekiq_env:
            step.run(remote.prune(change.target, p.steps, p.remove_files, run_id=step.run_id), timeout=120)
            return
        out = step.run(prune_sidekiq(change.target, p, run_id=step.run_id), timeout=120 + BEAT_EXPIRY + 20)
        old = gone_timeout(out)
        if old is not None:
            raise FleetError(f"the Sidekiq process {old} of {change.target} still heartbeats in Redis "
                             f"{BEAT_EXPIRY:g} s after the unit was stopped",
                             hint="it outlived its unit's stop: find it (ps) and stop it")

    # -- journal and plan text

    def sentence(self, step: StepView) -> str:
        """`stopped and disabled X and removed its unit file (was …)`."""
        done = [str(s) for s in step.details.get("steps", ())]
        verbs = [v for s, v in (("stop", "stopped"), ("disable", "disabled")) if s in done] or (
            [] if "remove" in done else ["stopped", "disabled"])
        t = step.target
        if verbs:
            phrase = f"{' and '.join(verbs)} {t}" + (" and removed its unit file" if "remove" in done else "")
        else:
            phrase = f"removed the unit file of {t}"
        return phrase + was(step.before)

    def details(self, change: Change) -> list[Detail]:
        out: list[Detail] = [(PLAIN, f"was {change.before}; will be {change.after}")]
        env = _payload(change).sidekiq_env
        if env:
            out.append((PLAIN, f"then waits until its Sidekiq process has left `processes` (Redis as {env} says)"))
        return out


def prune_sidekiq(unit: str, p: PrunePayload, *, run_id: str, timeout: int = int(BEAT_EXPIRY) + 10) -> str:
    """The prune of a unit running Sidekiq, in one remote command: its MainPID read before the stop,
    the prune, then the wait for that process to leave `processes` (gone_script, which always ends
    0 and prints its one line: `set +e`, as the prune's `set -e` would end it at Redis's first
    refusal before it says why)."""
    return (f"p0=$(systemctl show -p MainPID --value -- {remote.q(unit)})\n"
            + remote.prune(unit, p.steps, p.remove_files, run_id=run_id)
            + "set +e\n" + gone_script(p.sidekiq_env, '"$p0"', timeout=timeout) + "\n")


def _payload(change: Change) -> PrunePayload:
    if not isinstance(change.payload, PrunePayload):
        raise FleetError(f"{change.id} carries no prune steps")  # only a Change built by hand lacks them
    return change.payload


def _sidekiq_env(desired: Desired, u: UnitState) -> str:
    """For an observed unit whose ExecStart runs Sidekiq: the env file its host finds Sidekiq's
    Redis through — one the unit loads (the one Sidekiq's view reads, if it loads that), else the
    one Sidekiq's view reads; "" for any other unit, or when fleet knows of none."""
    if parse_argv(u.exec_start) is None:
        return ""
    where = locate_redis(desired, desired.sidekiq_policy)
    view = where.env_path if isinstance(where, RedisSource) else ""
    loaded = [f for f in u.environment_files if env_path_ok(f)]  # what a host reports is checked, as a plan is
    return (view if view in loaded else loaded[0]) if loaded else view


def _matching_pattern(patterns: tuple[DiscoveryPattern, ...], unit: str) -> DiscoveryPattern | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(unit, p.pattern)), None)


def _service_of(desired: Desired, unit: str) -> str | None:
    return next((s.name for s in desired.services if s.owns(unit)), None)
