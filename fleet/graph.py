"""Ordering: the one place that decides what happens before what (networkx).

An edge a -> b means "b must happen after a".  Rules:
  * per host: unit writes -> daemon-reload -> enable/start/restart; an env file write before
    the (re)start of every unit that loads it; enable before start;
  * `requires` across hosts: every start/restart of a required service before every
    start/restart of the service requiring it (postgres and redis before web and Sidekiq);
  * make-before-break: every prune after every start/restart in the plan, so a service that
    moves is running on its new host before it stops on the old one;
  * rolling restarts: restarts of one service are chained across its hosts in batches of
    `max_unavailable`, so never more than that many of its instances restart at once, and they
    wait for the starts of that service's missing instances.
Waves are the topological generations: everything in a wave may run in parallel.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import networkx as nx

from fleet.diff import DAEMON_RELOAD, ENABLE, PRUNE, RESTART, START, WRITE_ENV, WRITE_UNIT, Change
from fleet.errors import FleetError
from fleet.model import Desired


class CycleError(FleetError):
    pass


def build_graph(changes: Sequence[Change], desired: Desired) -> nx.DiGraph:
    g: nx.DiGraph = nx.DiGraph()
    by_id = {c.id: c for c in changes}
    g.add_nodes_from(by_id)
    by_host: dict[str, list[Change]] = defaultdict(list)
    for c in changes:
        by_host[c.host].append(c)
    runs = [c for c in changes if c.action in (START, RESTART)]
    service_units = {s.name: s for s in desired.services}

    for cs in by_host.values():
        reload_ = [c for c in cs if c.action == DAEMON_RELOAD]
        for c in cs:
            if c.action == WRITE_UNIT:
                for r in reload_:
                    g.add_edge(c.id, r.id)
            if c.action in (ENABLE, START, RESTART):
                for r in reload_:
                    g.add_edge(r.id, c.id)
            if c.action in (START, RESTART):
                for e in cs:
                    if e.action == ENABLE and e.target == c.target:
                        g.add_edge(e.id, c.id)
                    if e.action == WRITE_UNIT and e.target == c.target and not reload_:
                        g.add_edge(e.id, c.id)
                svc = service_units.get(c.service or "")
                loads = svc.unit_spec.environment_files if svc is not None and svc.unit_spec else ()
                for w in cs:
                    if w.action == WRITE_ENV and w.target in loads:
                        g.add_edge(w.id, c.id)

    runs_of: dict[str, list[Change]] = defaultdict(list)  # service -> its starts and restarts
    for c in runs:
        runs_of[c.service or ""].append(c)

    for c in runs:
        svc = service_units.get(c.service or "")
        for req in svc.requires if svc is not None else ():
            for r in runs_of.get(req, ()):
                g.add_edge(r.id, c.id)

    for p in changes:
        if p.action == PRUNE:
            for r in runs:
                g.add_edge(r.id, p.id)

    for name, svc in service_units.items():
        mine = runs_of.get(name, [])
        # An instance being started is not available yet: restarts of the same service wait for
        # it, so a rolling restart never takes down the last instance that is up.
        starts = [c for c in mine if c.action == START]
        restarts_here = [c for c in mine if c.action == RESTART]
        for st in starts:
            for rs in restarts_here:
                if rs.host != st.host:
                    g.add_edge(st.id, rs.id)
        position = {h: i for i, h in enumerate(svc.hosts)}
        restarts = sorted(restarts_here, key=lambda c: position.get(c.host, 0))
        k = max(1, svc.max_unavailable)
        for i in range(k, len(restarts)):
            g.add_edge(restarts[i - k].id, restarts[i].id)
    return g


Deps = dict[str, tuple[str, ...]]
Waves = tuple[tuple[str, ...], ...]


def order(changes: Sequence[Change], desired: Desired) -> tuple[Deps, Waves]:
    """(dependencies of each change, waves).  A cycle raises CycleError naming it."""
    g = build_graph(changes, desired)
    try:
        generations = list(nx.topological_generations(g))
        cycle: list[tuple[str, str]] = []
    except nx.NetworkXUnfeasible:  # only then look for the cycle, to name it (find_cycle is costly)
        generations = []
        cycle = list(nx.find_cycle(g))
    if cycle:
        chain = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise CycleError(f"the changes cannot be ordered: {chain}",
                         hint="this comes from `requires` between services; break the cycle there")
    position = {c.id: i for i, c in enumerate(changes)}
    deps = {n: tuple(sorted(g.predecessors(n), key=position.__getitem__)) for n in g.nodes}
    waves = tuple(tuple(sorted(gen, key=position.__getitem__)) for gen in generations)
    return deps, waves
