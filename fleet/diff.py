"""diff(desired, observed) -> changes: what must happen on which host, and why.  Pure.

Level-based and idempotent, like a Kubernetes controller: the changes depend only on the
desired and the observed state, so diffing a converged fleet yields nothing.  An unreachable
host is never treated as empty: it yields no changes and is reported as unknown.

What a change is, and when one is due, is each resource's business (fleet/resources/): this
module walks the hosts and hands each to the resources in the registry's order, which is the
order of the host's changes in the plan.  Adjacent per-service resources (unit file, unit
state) are visited service by service, so that one service's changes stay together.

Secrets: desired values arrive resolved in `secrets` (never stored in a Change); a Change
only ever holds masked text and sha256 fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.actions import Action, Change, UnitFilePayload
from fleet.model import Desired, HostError, HostResult, HostState, Service
from fleet.resources.base import HostDiff, Resource
from fleet.resources.registry import RESOURCES, SPECS
from fleet.units import not_there, unit_files


@dataclass(frozen=True)
class Diff:
    changes: tuple[Change, ...]
    unknown: tuple[HostError, ...] = ()  # hosts that could not be observed: nothing planned for them
    notes: tuple[str, ...] = ()  # things reported, deliberately not changed (e.g. a db left running)
    problems: tuple[str, ...] = ()  # things fleet cannot fix (e.g. a "present" secret that is missing)


def diff(desired: Desired, observed: Mapping[str, HostResult], secrets: Mapping[tuple[str, str], str],
         *, prune: bool = True) -> Diff:
    """All changes for the observed hosts.  `secrets` maps (env file name, key) -> value."""
    changes: list[Change] = []
    unknown: list[HostError] = []
    notes: list[str] = []
    problems: list[str] = []
    # Make-before-break needs the whole fleet in view: with a host excluded (--limit) or
    # unobservable, the instance a prune would stop may be the only one left.  Report instead.
    whole = all(isinstance(observed.get(h.name), HostState) for h in desired.hosts)
    cache: dict[str, Any] = {}
    groups = _groups(RESOURCES)
    copies = _GroupCopies(groups)
    for host in desired.hosts:
        result = observed.get(host.name)
        if result is None:
            continue  # not targeted (--limit)
        if isinstance(result, HostError):
            unknown.append(result)
            continue
        ctx = HostDiff(desired=desired, state=result, secrets=secrets, specs=SPECS, prune=prune, whole=whole,
                       problems=problems, notes=notes, cache=cache)
        for group in groups:
            if group[0].per_service:
                services = desired.services_on(host.name)
                key = copies.key(ctx, group, services)
                if key is not None and copies.copy(ctx, key, services):
                    continue
                mark = copies.mark(ctx, key) if key is not None else None
                for s in services:
                    for r in group:
                        r.diff_service(ctx, s)
                if key is not None and mark is not None:
                    copies.learn(ctx, key, services, mark)
            else:
                group[0].diff_host(ctx)
        for r in RESOURCES:
            r.implied(ctx)
        changes += ctx.changes
    return Diff(changes=tuple(changes), unknown=tuple(unknown), notes=tuple(notes), problems=tuple(problems))


def _groups(resources: Sequence[Resource]) -> list[tuple[Resource, ...]]:
    """The registry cut into runs: each per-host resource alone, adjacent per-service ones together."""
    out: list[tuple[Resource, ...]] = []
    for r in resources:
        if r.per_service and out and out[-1][0].per_service:
            out[-1] += (r,)
        else:
            out.append((r,))
    return out


# A group's changes on a host copied from an earlier host.  A host where none of the units its
# services look at is there yet (`not_there`: a first install) gets, from the unit file and unit
# state resources, what every such host with the same services and units gets but for its name:
# fleet/resources/unit_file.py and unit_state.py each copy a service's changes on that ground.
# Here a whole host's run of them (1,000 bare hosts × 20 services: 60,000 `diff_service` calls)
# is copied at once from the first such host, where the name is in no field but a unit file
# diff's ---/+++ lines.  Only that group (unit file, drop-in, unit state, in the registry's
# order): with another resource in it, or a service that declares drop-ins (its drop-ins depend
# on the host's files), nothing is copied.
_COPYABLE_GROUP = ("unit file", "drop-ins", "unit state")

# per copied change: action, target, reason, service, before, after, and for a write-unit its
# content hash and the diff below its ---/+++ lines (None: no payload)
_Row = tuple[Action, str, str, "str | None", str, str, "tuple[str, str] | None"]
_Key = tuple[tuple[int, tuple[str, ...]], ...]
_Mark = tuple[int, int, int, int, bool]


class _GroupCopies:
    def __init__(self, groups: Sequence[tuple[Resource, ...]]) -> None:
        self._groups = {id(g) for g in groups if tuple(r.kind for r in g) == _COPYABLE_GROUP}
        # services' ids and all their units on the host -> (the services, the other units looked
        # at (unit files, probes), the rows, units rewritten, a reload needed), or None: learnt
        # once, not copyable
        self._made: dict[_Key, tuple[tuple[Service, ...], tuple[str, ...], tuple[_Row, ...], frozenset[str],
                                     bool] | None] = {}

    def key(self, ctx: HostDiff, group: tuple[Resource, ...], services: tuple[Service, ...]) -> _Key | None:
        """The services' ids and all their units on ctx's host, when none of them is there yet
        (on a host where one is: None at the first, with no more looked up)."""
        if id(group) not in self._groups:
            return None
        host, unit_of = ctx.host, ctx.state.unit
        out = []
        for s in services:
            units = s.all_units_on(host)
            for u in units:
                if not not_there(unit_of(u)):
                    return None
            out.append((id(s), units))
        return tuple(out)

    def copy(self, ctx: HostDiff, key: _Key, services: tuple[Service, ...]) -> bool:
        """The group's changes on ctx's host (where `key`'s units are not there), copied if an
        earlier host taught them; False if not."""
        made = self._made.get(key)
        if made is None or len(made[0]) != len(services) or not all(map(_same, made[0], services)):
            return False
        unit_of = ctx.state.unit
        for u in made[1]:
            if not not_there(unit_of(u)):
                return False
        host = ctx.host
        out = ctx.changes
        for action, target, reason, service, before, after, file in made[2]:
            if file is None:
                out.append(Change(host, action, target, reason, service, before, after))
            else:
                header = f"--- {host}:{target} (now)\n+++ {host}:{target} (desired)\n" if file[1] else ""
                out.append(Change(host, action, target, reason, service, before, after,
                                  UnitFilePayload(file[0], diff=header + file[1])))
        ctx.rewritten_units |= made[3]
        if made[4]:
            ctx.reload_needed = True
        return True

    def mark(self, ctx: HostDiff, key: _Key) -> _Mark | None:
        """Where ctx stands before the group runs, when what it makes may be learnt."""
        if key in self._made or ctx.rewritten_units:
            return None
        return (len(ctx.changes), len(ctx.problems), len(ctx.notes), len(ctx.written_paths), ctx.reload_needed)

    def learn(self, ctx: HostDiff, key: _Key, services: tuple[Service, ...], mark: _Mark) -> None:
        """What the group just made on ctx's host, kept for the next hosts with the same services
        and units if every unit looked at is not there and the host's name is in no field but the
        diff's ---/+++ lines; learnt once (a copy that cannot be made is not tried again)."""
        host = ctx.host
        mine = {u for _, units in key for u in units}
        extra: dict[str, None] = {}
        for s in services:
            for unit, _, probe in unit_files(s, host):
                extra[probe] = extra[unit] = None
        others = tuple(u for u in extra if u not in mine)
        if not all(not_there(ctx.state.unit(u)) for u in others):
            return  # not a first install here: learnt from a host where it is
        self._made[key] = None
        if (any(s.dropins is not None and not s.observe_only for s in services)
                or (len(ctx.problems), len(ctx.notes), len(ctx.written_paths)) != mark[1:4]):
            return
        made = ctx.changes[mark[0]:]
        rows: list[_Row] = []
        for c in made:
            p = c.payload
            texts = [c.target, c.reason, c.before, c.after, c.service or ""]
            file: tuple[str, str] | None = None
            if type(p) is UnitFilePayload:
                header = f"--- {host}:{c.target} (now)\n+++ {host}:{c.target} (desired)\n"
                if p.remove_files or (p.diff and not p.diff.startswith(header)):
                    return
                file = (p.content_hash, p.diff[len(header):] if p.diff else "")
                texts += file
            elif p is not None:
                return
            if c.host != host or any(host in t for t in texts):
                return
            rows.append((c.action, c.target, c.reason, c.service, c.before, c.after, file))
        self._made[key] = (services, others, tuple(rows), frozenset(ctx.rewritten_units),
                           any(ctx.specs[c.action].needs_reload for c in made))


def _same(a: Service, b: Service) -> bool:
    return a is b
