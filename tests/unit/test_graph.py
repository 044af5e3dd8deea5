"""graph.order: every ordering rule in one place — per-host steps, `requires` across hosts,
make-before-break for moves, rolling restarts — as dependencies and waves; cycles are errors.

Most tests order the changes diff() makes for the shipped example; a few order hand-made
changes on a two-host fleet built directly from dataclasses.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from observed import (
    ENV_PATH,
    EXAMPLE_SECRETS,
    bare,
    bare_host,
    converged,
    edited,
    example,
    fleets,
    service,
    set_env_value,
    stopped,
    undeclared_sidekiq,
    unit_of,
    with_unit,
)

from fleet.actions import Action, Change, PrunePayload, UnitFilePayload
from fleet.diff import diff
from fleet.graph import EVERY_RUN, CycleError, build_graph, expand
from fleet.graph import order as symbolic_order
from fleet.model import Desired, Host, HostResult, Kind, Service, UnitSpec

S = EXAMPLE_SECRETS
WEB, STREAMING = "mastodon-web.service", "mastodon-streaming.service"
SK_DEFAULT = "mastodon-sidekiq-default.service"
Deps = dict[str, tuple[str, ...]]
Waves = tuple[tuple[str, ...], ...]


def order(changes: Sequence[Change], desired: Desired) -> tuple[Deps, Waves]:
    """`graph.order` with make-before-break spelled out as pairs (`expand`): what these tests
    were written against, before the group kept it symbolic."""
    deps, waves, groups = symbolic_order(changes, desired)
    return expand(deps, groups, {c.id: i for i, c in enumerate(changes)}), waves


def ordered(desired: Desired, observed: Mapping[str, HostResult]) -> tuple[list[Change], Deps, Waves]:
    changes = list(diff(desired, observed, S).changes)
    deps, waves = order(changes, desired)
    return changes, deps, waves


def wave_of(waves: Waves, change_id: str) -> int:
    return next(i for i, w in enumerate(waves) if change_id in w)


def ancestors(deps: Deps, change_id: str) -> set[str]:
    """Everything that must have happened before `change_id`, transitively."""
    seen: set[str] = set()
    todo = list(deps[change_id])
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo += deps[c]
    return seen


def assert_well_formed(changes: Sequence[Change], deps: Deps, waves: Waves) -> None:
    flat = [c for w in waves for c in w]
    assert sorted(flat) == sorted(c.id for c in changes), "waves are a partition of the changes"
    for cid, before in deps.items():
        for b in before:
            assert wave_of(waves, b) < wave_of(waves, cid), f"{b} must come before {cid}"


# ------------------------------------------------------------------ per host


def test_on_a_bare_host_writes_come_before_the_reload_which_comes_before_enable_and_start() -> None:
    desired = example()
    changes, deps, waves = ordered(desired, {"fritz": bare_host(desired, "fritz")})
    assert_well_formed(changes, deps, waves)
    reload_ = "fritz:daemon-reload:systemd"
    assert set(deps[reload_]) == {f"fritz:write-unit:{WEB}", f"fritz:write-unit:{STREAMING}"}
    for unit in (WEB, STREAMING):
        assert reload_ in deps[f"fritz:enable:{unit}"]
        assert {reload_, f"fritz:enable:{unit}", f"fritz:write-env:{ENV_PATH}"} <= set(deps[f"fritz:start:{unit}"])
    assert [len(w) for w in waves] == [3, 1, 2, 2]


def test_an_env_change_is_written_before_every_restart_of_a_unit_that_loads_it() -> None:
    desired = example()
    observed = converged(desired, S)
    observed["fritz"] = set_env_value(observed["fritz"], "DB_PORT", "6432")
    changes, deps, waves = ordered(desired, observed)
    write = f"fritz:write-env:{ENV_PATH}"
    assert deps[f"fritz:restart:{WEB}"] == (write,)
    assert deps[f"fritz:restart:{STREAMING}"] == (write,)
    assert waves == ((write,), (f"fritz:restart:{WEB}", f"fritz:restart:{STREAMING}"))


def test_only_starts_restarts_and_prunes_wait_for_other_hosts_and_only_for_their_runs() -> None:
    desired = example()
    observed = bare(desired)
    observed["franz"] = with_unit(observed["franz"], undeclared_sidekiq())
    changes, deps, _ = ordered(desired, observed)
    by_id = {c.id: c for c in changes}
    crossing = [(by_id[b], by_id[c]) for c, before in deps.items() for b in before if by_id[b].host != by_id[c].host]
    assert crossing
    for b, c in crossing:
        assert c.action in ("start", "restart", "prune") and b.action in ("start", "restart"), (b.id, c.id)


# ------------------------------------------------------------------ requires, across hosts


def test_web_and_sidekiq_start_only_after_postgres_and_redis_on_the_db_host() -> None:
    desired = example()
    changes, deps, waves = ordered(desired, bare(desired))
    assert_well_formed(changes, deps, waves)
    db = {"nietzsche:start:postgresql.service", "nietzsche:start:redis-server.service"}
    for start in (f"fritz:start:{WEB}", f"franz:start:{WEB}", f"fritz:start:{STREAMING}",
                  f"freud:start:{SK_DEFAULT}", "nietzsche:start:mastodon-sidekiq-scheduler.service"):
        assert db <= set(deps[start]), start
    assert not db & ancestors(deps, "nietzsche:start:postgresql.service")
    assert wave_of(waves, f"franz:start:{WEB}") > max(wave_of(waves, d) for d in db)


def test_a_service_whose_requirements_already_run_waits_for_nothing_across_hosts() -> None:
    desired = example()
    observed = converged(desired, S)
    observed["franz"] = bare_host(desired, "franz")
    _, deps, _ = ordered(desired, observed)
    assert {d.split(":")[0] for d in ancestors(deps, f"franz:start:{WEB}")} == {"franz"}


# ------------------------------------------------------------------ make-before-break


def test_a_moved_service_starts_on_its_new_host_before_it_is_pruned_on_the_old() -> None:
    """sidekiq-default now belongs on freud (bare), and still runs on franz, where it was."""
    desired = example()
    observed = converged(desired, S)
    observed["franz"] = with_unit(observed["franz"], unit_of(observed["freud"], SK_DEFAULT))
    observed["freud"] = bare_host(desired, "freud")
    changes, deps, waves = ordered(desired, observed)
    assert_well_formed(changes, deps, waves)
    prune, start = f"franz:prune:{SK_DEFAULT}", f"freud:start:{SK_DEFAULT}"
    assert start in ancestors(deps, prune)
    assert f"freud:write-unit:{SK_DEFAULT}" in ancestors(deps, prune)
    assert wave_of(waves, prune) == len(waves) - 1


def test_an_undeclared_unit_is_pruned_only_after_every_start_of_the_plan() -> None:
    desired = example()
    observed = bare(desired)
    observed["franz"] = with_unit(observed["franz"], undeclared_sidekiq())
    changes, deps, _ = ordered(desired, observed)
    runs = {c.id for c in changes if c.action in ("start", "restart")}
    assert runs <= set(deps["franz:prune:mastodon-sidekiq.service"])


def test_a_service_already_running_in_its_new_place_is_pruned_from_the_old_at_once() -> None:
    desired = example()
    observed = converged(desired, S)
    observed["franz"] = with_unit(observed["franz"], unit_of(observed["freud"], SK_DEFAULT))
    changes, deps, waves = ordered(desired, observed)
    assert [c.id for c in changes] == [f"franz:prune:{SK_DEFAULT}"]
    assert deps == {f"franz:prune:{SK_DEFAULT}": ()} and waves == ((f"franz:prune:{SK_DEFAULT}",),)


# ------------------------------------------------------------------ rolling restarts


def _web_env_drift(desired: Desired) -> dict[str, HostResult]:
    observed: dict[str, HostResult] = dict(converged(desired, S))
    for h in ("fritz", "franz"):
        observed[h] = set_env_value(converged(desired, S)[h], "S3_REGION", "eu-central-1")
    return observed


def test_restarts_of_web_roll_one_host_at_a_time_with_max_unavailable_one() -> None:
    desired = example()
    assert service(desired, "web").max_unavailable == 1
    changes, deps, waves = ordered(desired, _web_env_drift(desired))
    assert_well_formed(changes, deps, waves)
    fritz, franz = f"fritz:restart:{WEB}", f"franz:restart:{WEB}"
    assert wave_of(waves, fritz) != wave_of(waves, franz)
    assert fritz in deps[franz]  # in the declared order of hosts: fritz first


def test_max_unavailable_two_lets_both_web_hosts_restart_in_one_wave() -> None:
    desired = example()
    web = dataclasses.replace(service(desired, "web"), max_unavailable=2)
    desired2 = dataclasses.replace(desired, services=tuple(web if s.name == "web" else s for s in desired.services))
    _, deps, waves = ordered(desired2, _web_env_drift(desired))
    assert wave_of(waves, f"fritz:restart:{WEB}") == wave_of(waves, f"franz:restart:{WEB}")


def test_a_rolling_restart_does_not_chain_different_services() -> None:
    desired = example()
    _, deps, _ = ordered(desired, _web_env_drift(desired))
    assert f"fritz:restart:{STREAMING}" not in ancestors(deps, f"franz:restart:{WEB}") - {f"fritz:restart:{WEB}"}
    assert deps[f"fritz:restart:{STREAMING}"] == (f"fritz:write-env:{ENV_PATH}",)


# ------------------------------------------------------------------ hand-made fleets and cycles


def _tiny(requires: Mapping[str, tuple[str, ...]]) -> Desired:
    """Hosts a and b; service x on a, y on b, z on a, with the given requires (unchecked)."""
    def svc(name: str, host: str) -> Service:
        return Service(name=name, kind=Kind.GENERIC, unit=f"{name}.service", hosts=(host,),
                       requires=requires.get(name, ()), unit_spec=UnitSpec(exec_start=f"/usr/bin/{name}"))
    return Desired(name="tiny", hosts=(Host("a", "a.example.org"), Host("b", "b.example.org")),
                   services=(svc("x", "a"), svc("y", "b"), svc("z", "a")))


def _starts(*names_hosts: tuple[str, str]) -> list[Change]:
    return [Change(h, Action.START, f"{n}.service", "declared to run here", n) for n, h in names_hosts]


def test_order_of_no_changes_is_no_waves() -> None:
    assert order([], example()) == ({}, ())


def test_independent_changes_all_run_in_the_first_wave_in_plan_order() -> None:
    changes = _starts(("z", "a"), ("y", "b"), ("x", "a"))
    deps, waves = order(changes, _tiny({}))
    assert waves == (("a:start:z.service", "b:start:y.service", "a:start:x.service"),)
    assert deps == {c.id: () for c in changes}


def test_a_chain_of_requires_becomes_one_wave_per_link() -> None:
    deps, waves = order(_starts(("x", "a"), ("y", "b"), ("z", "a")), _tiny({"y": ("x",), "z": ("y",)}))
    assert waves == (("a:start:x.service",), ("b:start:y.service",), ("a:start:z.service",))
    assert deps["a:start:z.service"] == ("b:start:y.service",)


def test_a_requires_cycle_is_an_error_that_names_the_cycle() -> None:
    desired = _tiny({"x": ("y",), "y": ("z",), "z": ("x",)})
    with pytest.raises(CycleError) as e:
        order(_starts(("x", "a"), ("y", "b"), ("z", "a")), desired)
    msg = str(e.value)
    assert msg.startswith("the changes cannot be ordered: ")
    chain = msg.split(": ", 1)[1].split("\n")[0].split(" -> ")
    assert chain[0] == chain[-1] and len(chain) == 4
    assert set(chain) == {"a:start:x.service", "b:start:y.service", "a:start:z.service"}
    assert "requires" in e.value.hint


def test_a_cycle_in_the_example_shows_up_when_both_ends_must_start() -> None:
    desired = example()
    pg = dataclasses.replace(service(desired, "postgres"), requires=("web",))
    cyclic = dataclasses.replace(desired, services=tuple(pg if s.name == "postgres" else s for s in desired.services))
    changes = list(diff(cyclic, bare(cyclic), S).changes)
    with pytest.raises(CycleError, match=r"nietzsche:start:postgresql\.service") as e:
        order(changes, cyclic)
    assert "start:mastodon-web.service" in str(e.value)
    assert not nx.is_directed_acyclic_graph(build_graph(changes, cyclic))


def test_a_cycle_between_services_with_nothing_to_start_is_no_error() -> None:
    desired = _tiny({"x": ("y",), "y": ("x",)})
    deps, waves = order(_starts(("z", "a")), desired)
    assert waves == (("a:start:z.service",),)


# ------------------------------------------------------------------ against a straightforward reference
#
# order() keeps make-before-break as one barrier node (runs -> barrier -> prunes) and computes the
# waves itself.  The reference below is the rules as first written: every edge explicit in a
# networkx graph, one per (run, prune) pair, and networkx's topological generations as waves.


def reference_graph(changes: Sequence[Change], desired: Desired) -> nx.DiGraph:
    g: nx.DiGraph = nx.DiGraph()
    g.add_nodes_from(c.id for c in changes)
    service_units = {s.name: s for s in desired.services}
    runs = [c for c in changes if c.action in (Action.START, Action.RESTART)]
    by_host: dict[str, list[Change]] = defaultdict(list)
    for c in changes:
        by_host[c.host].append(c)
    for cs in by_host.values():
        reload_ = [c for c in cs if c.action == Action.DAEMON_RELOAD]
        for c in cs:
            if c.action == Action.WRITE_UNIT:
                g.add_edges_from((c.id, r.id) for r in reload_)
            if c.action in (Action.ENABLE, Action.START, Action.RESTART):
                g.add_edges_from((r.id, c.id) for r in reload_)
            if c.action in (Action.START, Action.RESTART):
                svc = service_units.get(c.service or "")
                loads = svc.unit_spec.environment_files if svc is not None and svc.unit_spec else ()
                for e in cs:
                    if e.action == Action.ENABLE and e.target == c.target:
                        g.add_edge(e.id, c.id)
                    if e.action == Action.WRITE_UNIT and e.target == c.target and not reload_:
                        g.add_edge(e.id, c.id)
                    if e.action == Action.WRITE_ENV and e.target in loads:
                        g.add_edge(e.id, c.id)
    for c in runs:
        svc = service_units.get(c.service or "")
        for r in runs:
            if svc is not None and r.service in svc.requires:
                g.add_edge(r.id, c.id)
    for p in changes:
        if p.action == Action.PRUNE:
            g.add_edges_from((r.id, p.id) for r in runs)
    for name, svc in service_units.items():
        starts = [c for c in runs if c.service == name and c.action == Action.START]
        restarts = [c for c in runs if c.service == name and c.action == Action.RESTART]
        g.add_edges_from((st.id, rs.id) for st in starts for rs in restarts if rs.host != st.host)
        position = {h: i for i, h in enumerate(svc.hosts)}
        restarts.sort(key=lambda c: position.get(c.host, 0))
        k = max(1, svc.max_unavailable)
        g.add_edges_from((restarts[i - k].id, restarts[i].id) for i in range(k, len(restarts)))
    return g


def reference_order(changes: Sequence[Change], desired: Desired) -> tuple[Deps, Waves]:
    g = reference_graph(changes, desired)
    position = {c.id: i for i, c in enumerate(changes)}
    deps = {n: tuple(sorted(g.predecessors(n), key=position.__getitem__)) for n in g.nodes}
    waves = tuple(tuple(sorted(gen, key=position.__getitem__)) for gen in nx.topological_generations(g))
    return deps, waves


def assert_as_reference(changes: Sequence[Change], desired: Desired) -> None:
    """The same waves as the explicit graph, and the same dependencies once the symbolic
    make-before-break is spelled out; symbolic, it lists each start/restart once in all."""
    symbolic, waves, groups = symbolic_order(changes, desired)
    deps = expand(symbolic, groups, {c.id: i for i, c in enumerate(changes)})
    want_deps, want_waves = reference_order(changes, desired)
    assert waves == want_waves
    assert deps == want_deps
    ids = {c.id for c in changes}
    assert set(deps) == ids and {d for ds in deps.values() for d in ds} <= ids  # no barrier once spelled out
    assert sorted(c for w in waves for c in w) == sorted(ids)
    prunes = [c.id for c in changes if c.action == Action.PRUNE]
    runs = list(dict.fromkeys(c.id for c in changes if c.action in (Action.START, Action.RESTART)))
    if prunes and runs:  # make-before-break: one group of every run, each prune names it once
        assert set(groups) == {EVERY_RUN} and sorted(groups[EVERY_RUN]) == sorted(runs)
        assert all(symbolic[p].count(EVERY_RUN) == 1 and not set(symbolic[p]) & set(runs) - set(want_deps[p])
                   for p in prunes)
    else:
        assert groups == {} and symbolic == want_deps
    assert set(build_graph(changes, desired).edges) == set(reference_graph(changes, desired).edges)


def _move(desired: Desired) -> dict[str, HostResult]:
    """sidekiq-default moves from franz (still running there) to freud (bare)."""
    observed: dict[str, HostResult] = dict(converged(desired, S))
    observed["franz"] = with_unit(converged(desired, S)["franz"], unit_of(converged(desired, S)["freud"], SK_DEFAULT))
    observed["freud"] = bare_host(desired, "freud")
    return observed


def _everything(desired: Desired) -> dict[str, HostResult]:
    """Prunes on two hosts, restarts rolling across hosts, a start of a service that also restarts
    elsewhere, a bare host, an env write."""
    observed: dict[str, HostResult] = dict(_web_env_drift(desired))
    observed["fritz"] = with_unit(edited(observed["fritz"], STREAMING), undeclared_sidekiq())  # type: ignore[arg-type]
    observed["franz"] = with_unit(stopped(observed["franz"], WEB),  # type: ignore[arg-type]
                                  undeclared_sidekiq("mastodon-sidekiq-old.service"))
    observed["freud"] = bare_host(desired, "freud")
    return observed


SCENARIOS: dict[str, Callable[[Desired], Mapping[str, HostResult]]] = {
    "bare": bare,
    "bare, and an undeclared Sidekiq to prune": lambda d: {**bare(d), "franz": with_unit(
        bare(d)["franz"], undeclared_sidekiq())},
    "a move (make-before-break)": _move,
    "a moved service already running": lambda d: {**converged(d, S), "franz": with_unit(
        converged(d, S)["franz"], unit_of(converged(d, S)["freud"], SK_DEFAULT))},
    "rolling restarts": _web_env_drift,
    "prunes, restarts, starts and installs at once": _everything,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_order_matches_the_reference_on_the_example(scenario: str) -> None:
    desired = example()
    changes = list(diff(desired, SCENARIOS[scenario](desired), S).changes)
    assert changes
    assert_as_reference(changes, desired)


def test_order_matches_the_reference_with_max_unavailable_two_and_a_move() -> None:
    desired = example()
    web = dataclasses.replace(service(desired, "web"), max_unavailable=2)
    desired2 = dataclasses.replace(desired, services=tuple(web if s.name == "web" else s for s in desired.services))
    assert_as_reference(list(diff(desired2, _everything(desired2), S).changes), desired2)


def _prune(host: str, unit: str) -> Change:
    return Change(host, Action.PRUNE, unit, "undeclared", None, payload=PrunePayload(steps=("stop",)))


@pytest.mark.parametrize("changes", [
    pytest.param([_prune("a", "old.service")], id="a prune and no run"),
    pytest.param([*_starts(("x", "a"), ("y", "b")), _prune("a", "old.service"), _prune("b", "older.service")],
                 id="two prunes after two independent starts"),
    pytest.param([_prune("b", "old.service"), *_starts(("x", "a"), ("y", "b"), ("z", "a"))],
                 id="a prune listed first waits for a chain of requires"),
    pytest.param([*_starts(("x", "a")), Change("b", Action.RESTART, "y.service", "env", "y"),
                  _prune("a", "old.service")],
                 id="a restart that requires a start, then a prune"),
    pytest.param([*_starts(("x", "a")),
                  Change("b", Action.WRITE_UNIT, "y.service", "edited", "y", payload=UnitFilePayload("0" * 64)),
                  Change("b", Action.DAEMON_RELOAD, "systemd", "unit files changed"), _prune("b", "old.service")],
                 id="a prune in the same wave as a reload that waits for a write"),
])
def test_order_matches_the_reference_on_hand_made_plans(changes: list[Change]) -> None:
    assert_as_reference(changes, _tiny({"y": ("x", "x"), "z": ("y",)}))  # x twice: the same edge twice


def test_a_prune_waits_in_the_wave_after_the_last_run_and_lists_every_run() -> None:
    changes = [_prune("b", "old.service"), *_starts(("x", "a"), ("y", "b"), ("z", "a"))]
    deps, waves = order(changes, _tiny({"y": ("x",), "z": ("y",)}))
    assert waves == (("a:start:x.service",), ("b:start:y.service",), ("a:start:z.service",), ("b:prune:old.service",))
    assert deps["b:prune:old.service"] == ("a:start:x.service", "b:start:y.service", "a:start:z.service")


def test_a_cycle_is_named_as_in_the_reference_graph() -> None:
    desired = example()
    pg = dataclasses.replace(service(desired, "postgres"), requires=("web",))
    cyclic = dataclasses.replace(desired, services=tuple(pg if s.name == "postgres" else s for s in desired.services))
    observed = {**bare(cyclic), "franz": with_unit(bare(cyclic)["franz"], undeclared_sidekiq())}
    changes = list(diff(cyclic, observed, S).changes)
    cycle = nx.find_cycle(reference_graph(changes, cyclic))
    with pytest.raises(CycleError) as e:
        order(changes, cyclic)
    assert str(e.value).split("\n")[0].split(": ", 1)[1] == " -> ".join([a for a, _ in cycle] + [cycle[0][0]])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_order_matches_the_reference_on_any_fleet(data: st.DataObject) -> None:
    desired = example()
    observed = data.draw(fleets(desired, S), label="observed")
    assert_as_reference(list(diff(desired, observed, S).changes), desired)


# `order` takes shortcuts that hold for a plan the diff made — a host's changes next to each other,
# each id once, its rules' edges mostly in order — and must not depend on them: the same changes
# in any order, some listed twice (but a run), are still ordered as the reference orders them.

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_order_matches_the_reference_with_the_changes_shuffled_and_repeated(data: st.DataObject) -> None:
    desired = example()
    observed = data.draw(fleets(desired, S), label="observed")
    changes = list(diff(desired, observed, S).changes)
    shuffled = data.draw(st.permutations(changes), label="shuffled")
    # a start or restart listed twice would wait for itself (a rolling restart's chain), here as in the reference
    once = [c for c in changes if c.action not in (Action.START, Action.RESTART)]
    again = data.draw(st.lists(st.sampled_from(once), max_size=3) if once else st.just([]), label="again")
    assert_as_reference([*shuffled, *again], desired)


def test_a_hosts_changes_apart_in_the_plan_are_still_ordered_as_one_hosts() -> None:
    """fritz's write and reload, then another host's, then fritz's enable and start: the reload
    still comes between them (the rules group a host's changes wherever they stand)."""
    desired = example()
    changes = list(diff(desired, bare(desired), S).changes)
    fritz = [c for c in changes if c.host == "fritz"]
    cut = next(i for i, c in enumerate(fritz) if c.action == Action.ENABLE)
    others = [c for c in changes if c.host != "fritz"]
    mixed = [*fritz[:cut], *others, *fritz[cut:]]
    assert_as_reference(mixed, desired)
    deps, _ = order(mixed, desired)
    enable = fritz[cut]
    assert "fritz:daemon-reload:systemd" in deps[enable.id]
