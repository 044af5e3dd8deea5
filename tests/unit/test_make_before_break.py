"""Make-before-break kept symbolic (issue 19): a prune waits for every start and restart of the
plan, and the plan says so once — the group `@every-start-and-restart`, which each prune's deps
name — instead of one pair per (run, prune).  Spelled back out, it is exactly the plan of the
explicit graph: the same dependencies, the same waves.
"""

from __future__ import annotations

import json
from typing import Any

import networkx as nx
import pytest
from observed import EXAMPLE_SECRETS, converged, example, stopped, undeclared_sidekiq, with_unit

from bench.core import synthetic_desired, synthetic_observed, synthetic_secrets
from fleet.actions import Action
from fleet.diff import diff
from fleet.graph import EVERY_RUN, build_graph
from fleet.plan import Plan, PlanFileError, build_plan, plan_from_json


def explicit(plan: Plan, desired: Any, observed: Any, secrets: Any) -> tuple[dict[str, tuple[str, ...]],
                                                                             tuple[tuple[str, ...], ...]]:
    """The plan's dependencies and waves as the explicit graph has them: every rule an edge,
    make-before-break one edge per (run, prune), networkx's topological generations as waves."""
    changes = diff(desired, observed, secrets).changes
    g = build_graph(changes, desired)
    position = {c.id: i for i, c in enumerate(changes)}
    deps = {n: tuple(sorted(g.predecessors(n), key=position.__getitem__)) for n in g.nodes}
    waves = tuple(tuple(sorted(gen, key=position.__getitem__)) for gen in nx.topological_generations(g))
    return deps, waves


@pytest.mark.parametrize("scenario", ["converged", "drift", "bare"])
def test_on_the_benchs_100_host_fleets_the_symbolic_plan_spells_out_to_the_explicit_graphs_pairs_and_waves(
        scenario: str) -> None:
    desired, secrets = synthetic_desired(100), synthetic_secrets()
    observed = synthetic_observed(desired, scenario, secrets)
    plan = build_plan(desired, observed, secrets)
    want_deps, want_waves = explicit(plan, desired, observed, secrets)
    assert plan.waves == want_waves
    assert {c.id: plan.waits_for(c.id) for c in plan.changes} == want_deps
    loaded = plan_from_json(plan.to_json())  # and as `show` and `apply` read it back
    assert loaded == plan and loaded.waves == want_waves
    assert {c.id: loaded.waits_for(c.id) for c in loaded.changes} == want_deps

    prunes = [c.id for c in plan.changes if c.action == Action.PRUNE]
    runs = [c.id for c in plan.changes if c.action in (Action.START, Action.RESTART)]
    pairs = sum(map(len, want_deps.values()))
    stored = sum(map(len, plan.deps.values())) + sum(map(len, plan.groups.values()))
    if scenario == "drift":
        assert prunes and runs
        assert plan.groups == {EVERY_RUN: tuple(runs)}
        assert all(plan.deps[p][-1] == EVERY_RUN for p in prunes)
        # runs + prunes references where there were runs x prunes pairs
        assert stored == pairs - len(prunes) * len(runs) + len(prunes) + len(runs)
        index = {c.id: i for i, c in enumerate(plan.changes)}
        assert json.loads(plan.to_json())["groups"] == {EVERY_RUN: [index[r] for r in runs]}  # listed once
    else:
        assert not prunes and plan.groups == {} and stored == pairs


def drift_with_a_prune() -> Plan:
    """The example with web stopped on fritz and an undeclared Sidekiq on franz to prune."""
    fleet = converged(example(), EXAMPLE_SECRETS)
    observed = fleet | {"franz": with_unit(fleet["franz"], undeclared_sidekiq()),
                        "fritz": stopped(fleet["fritz"], "mastodon-web.service")}
    plan = build_plan(example(), observed, EXAMPLE_SECRETS)
    assert plan.groups and any(c.action == Action.PRUNE for c in plan.changes)
    return plan


def edited(plan: Plan, edit: Any) -> str:
    packed = json.loads(plan.to_json())
    edit(packed)
    return json.dumps(packed)


def prune_row(packed: dict[str, Any]) -> list[Any]:
    [row] = [row for row in packed["changes"] if row[1] == "prune"]
    return row


@pytest.mark.parametrize(("edit", "says"), [
    pytest.param(lambda p: p.pop("groups"), "its groups are not a table of lists", id="no groups"),
    pytest.param(lambda p: p.update(groups=[[0]]), "its groups are not a table of lists", id="groups not a table"),
    pytest.param(lambda p: p["groups"].update({EVERY_RUN: 0}), "its groups are not a table of lists",
                 id="a group not a list"),
    pytest.param(lambda p: p["groups"].update({EVERY_RUN: [999]}),
                 "group '@every-start-and-restart' names '999', neither a change's index nor an id",
                 id="a member out of range"),
    pytest.param(lambda p: p["groups"].update({EVERY_RUN: [["nobody:start:x.service"]]}),
                 "its groups are not named `@name` or list changes the plan does not contain",
                 id="a member the plan does not contain"),
    pytest.param(lambda p: p.update(groups={"every-run; rm -rf /": p["groups"][EVERY_RUN]}),
                 "its groups are not named `@name`", id="a group named like a shell command"),
    pytest.param(lambda p: prune_row(p)[8].append(["@nothing-of-the-kind"]),
                 "a change depends on one the plan does not contain", id="a dep on a group that is not there"),
])
def test_an_edited_group_is_a_plan_file_error(edit: Any, says: str) -> None:
    plan = drift_with_a_prune()
    plan_from_json(edited(plan, lambda p: None))  # unedited: loads
    with pytest.raises(PlanFileError, match=says) as e:
        plan_from_json(edited(plan, edit), "plan.json")
    assert str(e.value).startswith("plan.json: ") and e.value.hint == "recompute it with `fleet plan -o FILE`"


def test_the_plan_file_names_every_start_and_restart_once_and_each_prune_refers_to_them() -> None:
    plan = drift_with_a_prune()
    packed = json.loads(plan.to_json())
    index = {c.id: i for i, c in enumerate(plan.changes)}
    runs = [c.id for c in plan.changes if c.action in (Action.START, Action.RESTART)]
    assert packed["groups"] == {EVERY_RUN: [index[r] for r in runs]}
    assert prune_row(packed)[8] == [[EVERY_RUN]]
    assert plan_from_json(plan.to_json()).groups == plan.groups == {EVERY_RUN: tuple(runs)}
