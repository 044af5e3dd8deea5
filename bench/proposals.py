"""Measured proposals for fleet's pure core: the same plan, computed without the quadratic parts.

NOT used by fleet.  This module re-implements, for measurement only, the few functions the
profile of `build_plan` blames (docs/PERFORMANCE.md), each with the smallest change that removes
its super-linear cost, and checks that the result is identical (same changes, same deps, same
waves) to fleet's own `build_plan` on the same input:

1. `fleet.model.Desired.services_on` / `env_files_on` scan every service's host tuple
   (`host in s.hosts`): O(services × hosts) per call, called per host → O(hosts² × services).
   Proposal: a per-host index built once (here: memoised per Desired object).
2. `fleet.diff.diff` checks `any(c.action == WRITE_UNIT and c.host == host.name for c in changes)`
   over *all* changes so far, once per host → O(hosts × changes).  Proposal: look at this
   host's own changes only.
3. `fleet.graph.build_graph` finds the runs of a required service, and the starts/restarts of
   a service, by scanning every run for every run → O(runs²); it sorts restarts with
   `svc.hosts.index(host)` → O(restarts × hosts).  Proposal: group runs by service (and
   action) once; a host → position dict.
4. `fleet.graph.order` calls `nx.find_cycle` on every plan.  On an acyclic graph it restarts
   an edge DFS from every node that is not yet explored and re-walks what those nodes reach,
   which is super-linear on long chains (rolling restarts, make-before-break).  Proposal: compute
   `nx.topological_generations` first (linear; it raises NetworkXUnfeasible on a cycle) and
   only then call `find_cycle`, to name the cycle in the error.

6. (constant factor) `_service_changes` renders every unit text two or three times per host
   (`unit_file_differs`, `as_observed_text`, `content_hash`) and runs difflib for every host
   that lacks the unit, although the text and the diff body depend on the service only.
   Proposal: render once per service per plan; compute a new unit's diff body once.

5. (changes the graph, not the plan) make-before-break adds an edge from every start/restart to
   every prune: |runs| × |prunes| edges, quadratic in hosts when drift grows with the fleet.
   Proposal: one barrier node (runs -> barrier -> prunes) that adds no wave of its own; the plan's
   deps and waves stay exactly the same.

`python -m bench.proposals --hosts 1000 --scenario drift` prints one JSON object: timings of
fleet's build_plan, of 1-4 and of 1-6, whether the plans are identical, and the edge count the
make-before-break rule contributes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import statistics
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import networkx as nx

from bench import core
from fleet import diff as diff_mod
from fleet import graph as graph_mod
from fleet import plan as plan_mod
from fleet import units as units_mod
from fleet.diff import DAEMON_RELOAD, ENABLE, PRUNE, RESTART, START, WRITE_ENV, WRITE_UNIT, Change, Diff
from fleet.model import Desired, EnvFile, HostError, HostResult, HostState, Service

# ----------------------------------------------------------------------------- 1. per-host index

_INDEX: dict[int, tuple[Desired, dict[str, tuple[Service, ...]], dict[str, tuple[EnvFile, ...]]]] = {}


def _index(desired: Desired) -> tuple[dict[str, tuple[Service, ...]], dict[str, tuple[EnvFile, ...]]]:
    hit = _INDEX.get(id(desired))
    if hit is not None and hit[0] is desired:
        return hit[1], hit[2]
    services: dict[str, list[Service]] = defaultdict(list)
    for s in desired.services:
        for h in dict.fromkeys(s.hosts):
            services[h].append(s)
    envs: dict[str, list[EnvFile]] = defaultdict(list)
    for e in desired.env_files:
        for h in dict.fromkeys(e.hosts):
            envs[h].append(e)
    by_s = {h: tuple(v) for h, v in services.items()}
    by_e = {h: tuple(v) for h, v in envs.items()}
    _INDEX[id(desired)] = (desired, by_s, by_e)
    return by_s, by_e


def services_on(self: Desired, host: str) -> tuple[Service, ...]:
    return _index(self)[0].get(host, ())


def env_files_on(self: Desired, host: str) -> tuple[EnvFile, ...]:
    return _index(self)[1].get(host, ())


# ----------------------------------------------------------------------------- 2. diff


def diff(desired: Desired, observed: Mapping[str, HostResult], secrets: Mapping[tuple[str, str], str],
         *, prune: bool = True) -> Diff:
    """fleet.diff.diff with the daemon-reload check looking at this host's changes only."""
    changes: list[Change] = []
    unknown: list[HostError] = []
    notes: list[str] = []
    problems: list[str] = []
    whole = all(isinstance(observed.get(h.name), HostState) for h in desired.hosts)
    for host in desired.hosts:
        result = observed.get(host.name)
        if result is None:
            continue
        if isinstance(result, HostError):
            unknown.append(result)
            continue
        here = diff_mod._host_changes(desired, result, secrets, problems)  # noqa: SLF001
        pruned, host_notes = diff_mod._prune_changes(desired, result, prune, whole)  # noqa: SLF001
        here += pruned
        notes += host_notes
        if any(c.action == WRITE_UNIT for c in here):  # was: over every change of every host so far
            here.append(Change(host.name, DAEMON_RELOAD, "systemd", "unit files changed on this host"))
        changes += here
    return Diff(changes=tuple(changes), unknown=tuple(unknown), notes=tuple(notes), problems=tuple(problems))


# ----------------------------------------------------------------------------- 3 + 4. graph


def build_graph(changes: Sequence[Change], desired: Desired) -> nx.DiGraph:
    """fleet.graph.build_graph, same edges, runs grouped by service instead of rescanned."""
    g: nx.DiGraph = nx.DiGraph()
    g.add_nodes_from(c.id for c in changes)
    by_host: dict[str, list[Change]] = defaultdict(list)
    for c in changes:
        by_host[c.host].append(c)
    runs = [c for c in changes if c.action in (START, RESTART)]
    runs_of: dict[str | None, list[Change]] = defaultdict(list)
    for r in runs:
        runs_of[r.service].append(r)
    service_units = {s.name: s for s in desired.services}

    for cs in by_host.values():  # unchanged: per host, small
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
        starts = [c for c in mine if c.action == START]
        restarts_all = [c for c in mine if c.action == RESTART]
        for st in starts:
            for rs in restarts_all:
                if rs.host != st.host:
                    g.add_edge(st.id, rs.id)
        position: dict[str, int] = {}
        for i, h in enumerate(svc.hosts):
            position.setdefault(h, i)
        restarts = sorted(restarts_all, key=lambda c: position.get(c.host, 0))
        k = max(1, svc.max_unavailable)
        for i in range(k, len(restarts)):
            g.add_edge(restarts[i - k].id, restarts[i].id)
    return g


def order(changes: Sequence[Change], desired: Desired) -> tuple[graph_mod.Deps, graph_mod.Waves]:
    """fleet.graph.order: topological generations first; find_cycle only to name a cycle."""
    return _deps_and_waves(build_graph(changes, desired), changes)


def _deps_and_waves(g: nx.DiGraph, changes: Sequence[Change]) -> tuple[graph_mod.Deps, graph_mod.Waves]:
    try:
        generations = list(nx.topological_generations(g))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        chain = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise graph_mod.CycleError(f"the changes cannot be ordered: {chain}",
                                   hint="this comes from `requires` between services; break the cycle there") from None
    position = {c.id: i for i, c in enumerate(changes)}
    deps = {n: tuple(sorted(g.predecessors(n), key=position.__getitem__)) for n in g.nodes}
    waves = tuple(tuple(sorted(gen, key=position.__getitem__)) for gen in generations)
    return deps, waves


# ----------------------------------------------------------------------------- 5. barrier

BARRIER = "\x00make-before-break"  # a node id no change can have


def build_graph_barrier(changes: Sequence[Change], desired: Desired) -> nx.DiGraph:
    """`build_graph`, with "every prune after every start/restart" as runs -> BARRIER -> prunes:
    |runs| + |prunes| edges instead of |runs| x |prunes|."""
    no_prunes = [c for c in changes if c.action != PRUNE]
    g = build_graph(no_prunes, desired)
    prunes = [c for c in changes if c.action == PRUNE]
    g.add_nodes_from(c.id for c in prunes)
    runs = [c for c in changes if c.action in (START, RESTART)]
    if prunes and runs:
        g.add_node(BARRIER)
        for r in runs:
            g.add_edge(r.id, BARRIER)
        for p in prunes:
            g.add_edge(BARRIER, p.id)
    return g


def order_barrier(changes: Sequence[Change], desired: Desired) -> tuple[graph_mod.Deps, graph_mod.Waves]:
    """Same deps and waves as fleet.graph.order: the barrier adds no wave of its own (its incoming
    edges weigh 0 in the longest-path layering), and a prune's deps list every run, as before."""
    g = build_graph_barrier(changes, desired)
    if BARRIER not in g:  # nothing to prune: exactly proposal 4
        return _deps_and_waves(g, changes)
    try:
        topo = list(nx.topological_sort(g))
    except nx.NetworkXUnfeasible:
        cycle = nx.find_cycle(g)
        chain = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise graph_mod.CycleError(f"the changes cannot be ordered: {chain}",
                                   hint="this comes from `requires` between services; break the cycle there") from None
    level: dict[str, int] = {}
    for n in topo:
        preds = list(g.predecessors(n))
        if n == BARRIER:
            level[n] = max(level[p] for p in preds)
        else:
            level[n] = max((level[p] + 1 for p in preds), default=0)
    position = {c.id: i for i, c in enumerate(changes)}
    runs = tuple(sorted((c.id for c in changes if c.action in (START, RESTART)), key=position.__getitem__))
    deps: dict[str, tuple[str, ...]] = {}
    for c in changes:  # in the graph's node order: changes first, as fleet adds them
        preds = [p for p in g.predecessors(c.id) if p != BARRIER]
        if g.has_edge(BARRIER, c.id):
            preds = sorted(set(preds) | set(runs), key=position.__getitem__)
            deps[c.id] = tuple(preds)
        else:
            deps[c.id] = tuple(sorted(preds, key=position.__getitem__))
    by_level: dict[int, list[str]] = defaultdict(list)
    for c in changes:
        by_level[level[c.id]].append(c.id)
    waves = tuple(tuple(sorted(by_level[k], key=position.__getitem__)) for k in sorted(by_level))
    return deps, waves


# ----------------------------------------------------------------------------- 6. per-service work once

_RENDERED: dict[int, tuple[Service, str]] = {}
_real_render_unit = units_mod.render_unit
_real_unified_diff = difflib.unified_diff
_DIFF_BODIES: dict[tuple[str, str], list[str]] = {}


def render_unit_once(service: Service) -> str:
    """fleet.units.render_unit, rendered once per Service object (it is a pure function of it)."""
    hit = _RENDERED.get(id(service))
    if hit is not None and hit[0] is service:
        return hit[1]
    text = _real_render_unit(service)
    _RENDERED[id(service)] = (service, text)
    return text


class _DifflibOnce:
    """difflib with unified_diff's body computed once per (before, after) pair: every host
    that lacks a unit gets the same body, only the ---/+++ headers name the host."""

    def __getattr__(self, name: str) -> Any:
        return getattr(difflib, name)

    @staticmethod
    def unified_diff(a: Sequence[str], b: Sequence[str], fromfile: str = "", tofile: str = "",
                     **kw: Any) -> list[str]:
        if kw:
            return list(_real_unified_diff(a, b, fromfile, tofile, **kw))
        key = ("".join(a), "".join(b))
        body = _DIFF_BODIES.get(key)
        if body is None:
            body = list(_real_unified_diff(a, b, "F", "T"))[2:]
            _DIFF_BODIES[key] = body
        if not body:
            return []
        return [f"--- {fromfile}\n", f"+++ {tofile}\n", *body]


# ----------------------------------------------------------------------------- switching


@contextmanager
def proposed(barrier: bool = False) -> Any:
    """Route build_plan through the proposed functions (1-4, or with `barrier` 1-6), for this
    process only."""
    saved = (Desired.services_on, Desired.env_files_on, vars(plan_mod)["diff"], vars(plan_mod)["order"])
    Desired.services_on = services_on  # type: ignore[method-assign]
    Desired.env_files_on = env_files_on  # type: ignore[method-assign]
    vars(plan_mod)["diff"] = diff
    vars(plan_mod)["order"] = order_barrier if barrier else order
    if barrier:  # the "1-6" variant: also render each unit and each new-unit diff body once
        vars(units_mod)["render_unit"] = render_unit_once
        vars(diff_mod)["render_unit"] = render_unit_once
        vars(diff_mod)["difflib"] = _DifflibOnce()
    try:
        yield
    finally:
        Desired.services_on, Desired.env_files_on = saved[0], saved[1]  # type: ignore[method-assign]
        vars(plan_mod)["diff"], vars(plan_mod)["order"] = saved[2], saved[3]
        vars(units_mod)["render_unit"] = _real_render_unit
        vars(diff_mod)["render_unit"] = _real_render_unit
        vars(diff_mod)["difflib"] = difflib
        _INDEX.clear()
        _RENDERED.clear()
        _DIFF_BODIES.clear()


def _timed(fn: Any, repeats: int) -> tuple[list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def compare(n_hosts: int, n_services: int, scenario: str, repeats: int, *, current: bool) -> dict[str, Any]:
    desired = core.synthetic_desired(n_hosts, n_services)
    secrets = core.synthetic_secrets()
    observed = core.synthetic_observed(desired, scenario, secrets)
    now = __import__("datetime").datetime(2026, 11, 28)
    out: dict[str, Any] = {"hosts": n_hosts, "services_per_host": n_services, "scenario": scenario}
    with proposed():
        times, new = _timed(lambda: plan_mod.build_plan(desired, observed, secrets, now=now), repeats)
        tracemalloc.start()
        plan_mod.build_plan(desired, observed, secrets, now=now)
        out["proposed_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    out["proposed_median_s"] = statistics.median(times)
    with proposed(barrier=True):
        times, new_b = _timed(lambda: plan_mod.build_plan(desired, observed, secrets, now=now), repeats)
        tracemalloc.start()
        plan_mod.build_plan(desired, observed, secrets, now=now)
        out["barrier_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    out["barrier_median_s"] = statistics.median(times)
    out["barrier_identical_to_proposed"] = (new_b.changes == new.changes and new_b.deps == new.deps
                                            and new_b.waves == new.waves)
    out["changes"] = len(new.changes)
    out["edges"] = sum(len(v) for v in new.deps.values())
    prunes = sum(1 for c in new.changes if c.action == PRUNE)
    runs = sum(1 for c in new.changes if c.action in (START, RESTART))
    out["make_before_break_edges"] = prunes * runs
    if current:
        times, old = _timed(lambda: plan_mod.build_plan(desired, observed, secrets, now=now), 1)
        out["current_s"] = times[0]
        out["identical"] = (old.changes == new.changes and old.deps == new.deps and old.waves == new.waves
                            and old.to_json() == new.to_json())
        out["speedup"] = out["current_s"] / out["proposed_median_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proposals")
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--scenario", choices=core.SCENARIOS, default="drift")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-current", action="store_true", help="do not time (or compare with) fleet's own build_plan")
    args = p.parse_args(argv)
    json.dump(compare(args.hosts, args.services, args.scenario, args.repeats, current=not args.no_current),
              sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
