"""Ordering: the one place that decides what happens before what.

An edge a -> b means "b must happen after a".  The rules are written over what each action
declares (fleet/resources/: its phase, whether it needs systemd to reload, whether it is a
rolling restart, which units it affects), never over the actions themselves:
  * per host: a change that needs a reload -> the host's reload -> every enable and run there;
    a change that affects unit u -> every run of u (a change that needs a reload reaches the
    runs through the reload, so it gets no edge of its own when the host has one): an env file
    before the (re)start of every unit that loads it, an enable before its unit starts;
  * `requires` across hosts: every run of a required service before every run of the service
    requiring it (postgres and redis before web and Sidekiq);
  * make-before-break: every prune after every run in the plan, so a service that moves is
    running on its new host before it stops on the old one;
  * rolling restarts: restarts of one service are chained across its hosts (and a template's
    instances on each) in batches of `max_unavailable`, so never more than that many of its
    instances restart at once, and they wait for the starts of that service's missing instances
    (on other hosts, or other instances of a template).
Waves are the topological generations: everything in a wave may run in parallel.

`order` works on plain lists (changes are numbered by their position in the plan) and holds
make-before-break as one barrier: runs -> barrier -> prunes instead of |runs| x |prunes| edges.
The barrier is no change and takes no wave (its incoming edges weigh nothing), so the waves are
those of the full graph.  It stays symbolic in what `order` returns: a group, EVERY_RUN, whose
members are the plan's starts and restarts, and a prune's deps name that group instead of
listing them (|runs| + |prunes| references instead of |runs| x |prunes|; 552,600 pairs at 5,000
drift hosts).  `expand` gives the explicit form back, as `order` returned it before.
`build_graph` spells the same rules out as a networkx graph, every edge explicit; `order` only
builds it to name a cycle.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, groupby, repeat
from operator import attrgetter
from typing import TYPE_CHECKING

from fleet.actions import Action, Change, Phase
from fleet.errors import FleetError
from fleet.model import Desired
from fleet.resources.base import Resource
from fleet.resources.registry import BY_ACTION, SPECS

if TYPE_CHECKING:  # networkx is imported where a graph is drawn (a cycle, build_graph), not to order:
    import networkx as nx  # a plan pays ~0.2 s for its import otherwise


_ID = attrgetter("id")
_HOST = attrgetter("host")
_ACTION = attrgetter("action")
_PHASE = attrgetter("phase")


class CycleError(FleetError):
    pass


@dataclass(frozen=True)
class _Rules:
    """The ordering rules applied to a list of changes, by position in that list.

    `node[i]` is the node of change i: the position of the last change with its id (a change id
    is a node, as in networkx).  `edges` holds every edge a -> b but make-before-break's, each as
    the number a * (len(changes) + 1) + b (plain ints: a large plan makes hundreds of thousands
    of edges, and a tuple each would keep Python's garbage collector busy), in the order the
    rules make them.  Make-before-break ("every prune after every run") is `runs` and `prunes`,
    to be put in at `mbb_at` when the edges are spelled out.
    """

    ids: list[str]
    node: list[int]
    edges: list[int]
    runs: list[int]  # positions of the starts/restarts, in plan order
    prunes: list[int]  # positions of the prunes, in plan order
    mbb_at: int
    unique: bool  # each change's id its own: node[i] == i


def _rules(changes: Sequence[Change], desired: Desired) -> _Rules:
    ids = list(map(_ID, changes))
    count = len(ids)
    last = dict(zip(ids, range(count), strict=True))  # an id's last position, as a node
    node = list(range(count)) if len(last) == count else list(map(last.__getitem__, ids))
    width = count + 1
    edges: list[int] = []
    add = edges.append
    actions = list(map(_ACTION, changes))
    specs = list(map(SPECS.__getitem__, actions))
    phases = list(map(_PHASE, specs))
    # Per action, made once: whether it needs a reload, whether a reload comes before it, and its
    # resource's `affects` (None where the resource keeps the default: it affects nothing).
    needs = dict.fromkeys(actions, False)
    after_reload = dict(needs)
    affects: dict[Action, Callable[[Change, Desired], Iterable[str]] | None] = dict.fromkeys(needs)
    run, reload, enable = Phase.RUN, Phase.RELOAD, Phase.ENABLE
    for a in needs:
        needs[a] = SPECS[a].needs_reload
        after_reload[a] = SPECS[a].phase in (enable, run)
        owner = BY_ACTION[a]
        affects[a] = None if type(owner).affects is Resource.affects else owner.affects
    by_host: dict[str, list[int]] = {}
    at = 0
    for host, same in groupby(map(_HOST, changes)):  # a host's changes are together in a plan the diff made
        k = len(list(same))
        here = by_host.get(host)
        if here is None:
            by_host[host] = list(range(at, at + k))
        else:
            here += range(at, at + k)
        at += k
    runs = [i for i, phase in enumerate(phases) if phase is run]
    service_units = {s.name: s for s in desired.services}

    for cs in by_host.values():
        reloads = [node[i] for i in cs if phases[i] is reload]
        affecting: dict[str, list[int]] = {}  # unit -> this host's changes that affect it
        for i in cs:
            a = actions[i]
            f = affects[a]
            if f is not None and not (reloads and needs[a]):  # else it reaches the runs through the reload
                for unit in f(changes[i], desired):
                    got = affecting.get(unit)
                    if got is None:
                        affecting[unit] = [node[i]]
                    else:
                        got.append(node[i])
        if reloads:
            into = [r * width for r in reloads]  # r -> n is r * width + n
            for i in cs:
                n, a = node[i], actions[i]
                if needs[a]:
                    edges += [n * width + r for r in reloads]
                if after_reload[a]:
                    edges += [r + n for r in into]
                if affecting and phases[i] is run:
                    edges += [x * width + n for x in affecting.get(changes[i].target, ())]
        elif affecting:
            for i in cs:
                if phases[i] is run:
                    n = node[i]
                    edges += [x * width + n for x in affecting.get(changes[i].target, ())]

    runs_of: dict[str, list[int]] = defaultdict(list)  # service -> positions of its starts and restarts
    run_services = [changes[i].service or "" for i in runs]
    for i, name in zip(runs, run_services, strict=True):
        runs_of[name].append(i)

    # `requires`: what a service's runs wait for, worked out once per service (as r * width, the
    # edge r -> n being r * width + n), then given to each of its runs.
    required = {name: [node[r] * width for req in svc.requires for r in runs_of.get(req, ())]
                for name, svc in service_units.items()}
    for i, name in zip(runs, run_services, strict=True):
        before = required.get(name)
        if before:
            n = node[i]
            edges += [r + n for r in before]

    mbb_at = len(edges)

    for name, svc in service_units.items():
        mine = runs_of.get(name, [])
        # An instance being started is not available yet: restarts of the same service wait for
        # it, so a rolling restart never takes down the last instance that is up.
        starts = [i for i in mine if not specs[i].rolling]
        restarts_here = [i for i in mine if specs[i].rolling]
        for st in starts:
            for rs in restarts_here:  # another instance: on another host, or another of a template's
                if (changes[rs].host, changes[rs].target) != (changes[st].host, changes[st].target):
                    add(node[st] * width + node[rs])
        position = {h: i for i, h in enumerate(svc.hosts)}
        restarts = sorted(restarts_here, key=lambda i: position.get(changes[i].host, 0))
        k = max(1, svc.max_unavailable)
        for j in range(k, len(restarts)):
            add(node[restarts[j - k]] * width + node[restarts[j]])
    prune = Phase.PRUNE
    prunes = [i for i, phase in enumerate(phases) if phase is prune]
    return _Rules(ids=ids, node=node, edges=edges, runs=runs, prunes=prunes, mbb_at=mbb_at, unique=len(last) == count)


def _graph(rules: _Rules) -> nx.DiGraph:
    import networkx as nx

    ids, node, width = rules.ids, rules.node, len(rules.ids) + 1
    g: nx.DiGraph = nx.DiGraph()
    g.add_nodes_from(dict.fromkeys(ids))
    g.add_edges_from((ids[e // width], ids[e % width]) for e in rules.edges[:rules.mbb_at])
    g.add_edges_from((ids[node[r]], ids[node[p]]) for p in rules.prunes for r in rules.runs)
    g.add_edges_from((ids[e // width], ids[e % width]) for e in rules.edges[rules.mbb_at:])
    return g


def build_graph(changes: Sequence[Change], desired: Desired) -> nx.DiGraph:
    """Every rule as an explicit networkx graph of change ids (make-before-break as one edge per
    run and prune)."""
    return _graph(_rules(changes, desired))


Deps = dict[str, tuple[str, ...]]
Waves = tuple[tuple[str, ...], ...]
Groups = dict[str, tuple[str, ...]]

# Make-before-break's group: every start and restart of the plan.  A group's name starts with `@`,
# which no host name (config.HOST_NAME), hence no change id, starts with.
EVERY_RUN = "@every-start-and-restart"
GROUP_NAME = re.compile(r"@[a-z0-9-]{1,62}")


def order(changes: Sequence[Change], desired: Desired) -> tuple[Deps, Waves, Groups]:
    """(dependencies of each change, waves, groups).  A dependency is a change id or the name of
    a group (EVERY_RUN: a prune waits for every start and restart), and means "after every
    change of that group" (`expand`).  A cycle raises CycleError naming it."""
    rules = _rules(changes, desired)
    ids, node = rules.ids, rules.node
    width = len(ids) + 1
    barrier = width - 1  # one node more: runs -> barrier -> prunes, if there are both
    nodes = node if rules.unique else sorted(set(node))  # positions of the distinct change ids
    runs = sorted({node[i] for i in rules.runs})
    prunes = sorted({node[i] for i in rules.prunes})
    mbb = bool(runs and prunes)
    edges = rules.edges
    if mbb:
        edges = [*edges, *[r * width + barrier for r in runs], *[barrier * width + p for p in prunes]]
    # Every edge a -> b is the int a * width + b: sorted, they are grouped by a; a node's edges
    # are a slice, found from how many each node has (Counter and accumulate work in C: a bare
    # 1,000-host plan has 140,000 edges, and Python-level work per edge was most of the time).
    # Sorted as the rules made them, then repeats dropped (a rule may make an edge twice, networkx
    # keeps one): the rules make them mostly in order, and sorting that is ~7x faster than sorting
    # a set's hash order (these ints exceed 2**30, where each comparison is slow).
    out_edges = list(dict.fromkeys(sorted(edges)))
    targets = [e % width for e in out_edges]  # b of each edge, grouped by a (then ascending)
    edge_from = [e // width for e in out_edges]  # a of each edge, ascending
    out_at = _starts(Counter(edge_from), width)  # u's targets: targets[out_at[u]:out_at[u + 1]]
    # Grouped by b instead, a still ascending within: a stable sort of the edges by b alone (small
    # ints, each comparison fast), rather than of b * width + a.
    sources = list(map(edge_from.__getitem__, sorted(range(len(targets)), key=targets.__getitem__)))
    indegree = list(map(Counter(targets).get, range(width), repeat(0)))
    in_at = [0, *accumulate(indegree)]  # v's sources: sources[in_at[v]:in_at[v + 1]]

    # Topological generations (Kahn, a generation at a time): a change's wave is one more than
    # its latest predecessor's.  The barrier takes no wave: it is done in its latest run's
    # generation, and the prunes it frees go to the next.
    level = [0] * width
    ready = [v for v in nodes if not indegree[v]]
    done = generation = 0
    while ready:
        done += len(ready)
        for v in ready:
            level[v] = generation
        freed = Counter(chain.from_iterable([targets[out_at[u]:out_at[u + 1]] for u in ready]))
        ready = []
        for v, k in freed.items():
            indegree[v] -= k
            if not indegree[v]:
                ready.append(v)
        if mbb and barrier in freed and not indegree[barrier]:  # freed once: its last run was just done
            ready.remove(barrier)
            done += 1
            level[barrier] = generation
            for p in targets[out_at[barrier]:out_at[barrier + 1]]:
                indegree[p] -= 1
                if not indegree[p]:
                    ready.append(p)
        generation += 1
    if done < len(nodes) + mbb:
        import networkx as nx

        cycle = list(nx.find_cycle(_graph(rules)))
        chain_text = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise CycleError(f"the changes cannot be ordered: {chain_text}",
                         hint="this comes from `requires` between services; break the cycle there")

    # A node's deps are its sources' names, the barrier named EVERY_RUN (it is the largest node,
    # so last: a prune's deps are what else it waits for, then every run); each node's slice made
    # and named in C, in plan order of first appearance, as networkx lists nodes.
    names = [*ids, EVERY_RUN]
    named = tuple(map(names.__getitem__, sources))  # a tuple: a slice of it is the deps' tuple, made once
    firsts = node if rules.unique else list(dict.fromkeys(node))  # in plan order of first appearance
    deps: Deps = dict(zip(map(names.__getitem__, firsts), [named[in_at[v]:in_at[v + 1]] for v in firsts], strict=True))
    waves_at: dict[int, list[str]] = defaultdict(list)
    for v in nodes:
        waves_at[level[v]].append(ids[v])
    groups: Groups = {EVERY_RUN: tuple(ids[r] for r in runs)} if mbb else {}
    return deps, tuple(tuple(waves_at[k]) for k in sorted(waves_at)), groups


def _starts(counts: Counter[int], width: int) -> list[int]:
    """Where each of the nodes 0 .. width - 1 starts in a list of edges grouped by node, given
    how many edges each node has; one more item, the end."""
    return [0, *accumulate(map(counts.get, range(width), repeat(0)))]


def expand(deps: Mapping[str, tuple[str, ...]], groups: Mapping[str, tuple[str, ...]],
           position: Mapping[str, int]) -> Deps:
    """The dependencies spelled out, one change id per pair as `order` once listed them: a group
    replaced by its members, each change's deps in plan order (`position`: change id -> its
    index), without repeats.  Quadratic for make-before-break by nature: for tests and for
    readers that want pairs, not for the plan's own paths."""
    return {cid: expand_one(ds, groups, position) for cid, ds in deps.items()}


def expand_one(ds: tuple[str, ...], groups: Mapping[str, tuple[str, ...]],
               position: Mapping[str, int]) -> tuple[str, ...]:
    if not any(d in groups for d in ds):
        return tuple(ds)
    spelled = {m: None for d in ds for m in (groups[d] if d in groups else (d,))}
    return tuple(sorted(spelled, key=position.__getitem__))
