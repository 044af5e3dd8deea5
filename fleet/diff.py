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

from fleet.actions import Change
from fleet.model import Desired, HostError, HostResult, HostState
from fleet.resources.base import HostDiff, Resource
from fleet.resources.registry import RESOURCES, SPECS


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
                for s in desired.services_on(host.name):
                    for r in group:
                        r.diff_service(ctx, s)
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
