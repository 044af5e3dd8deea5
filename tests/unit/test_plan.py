"""The plan as data: what it carries, its JSON round trip, the fingerprints that make a saved
plan go stale, and the property that executing a plan yields the desired state.

Execution is tests/unit/simulate.py: a pure model of what each change does to what the
collector reports (including daemon-reload and stale-process checks).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from observed import (
    EXAMPLE_SECRETS,
    bare,
    change_unit,
    converged,
    distro_unit,
    edited,
    env_meta,
    example,
    fleets,
    set_env_secret,
    set_env_value,
    stopped,
    undeclared_sidekiq,
    unit_of,
    unreachable,
    with_drop_in,
    with_unit,
)
from simulate import SimulationError, simulate

from fleet.actions import Action
from fleet.collect.parse import parse_host
from fleet.diff import diff
from fleet.graph import EVERY_RUN
from fleet.model import Desired, HostResult, HostState
from fleet.moves import MoveRefused, pending
from fleet.plan import (
    FILE_FORMAT,
    PLAN_FORMAT,
    Plan,
    PlanFileError,
    build_plan,
    desired_hash,
    fingerprint,
    pack_document,
    plain_data,
    plan_file_text,
    plan_from_document,
    plan_from_json,
    unpack_document,
)
from fleet.status import DRIFT, OK, build_status
from fleet.textutil import indented_json

S = EXAMPLE_SECRETS
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan_for(observed: Mapping[str, HostResult], *, prune: bool = True, desired: Desired | None = None) -> Plan:
    return build_plan(desired or example(), observed, S, prune=prune, now=NOW)


def drifted() -> dict[str, HostResult]:
    """A bit of everything except env writes: a stopped unit, an edited one, an undeclared
    Sidekiq to prune, an old postgres to note, and an unreachable host."""
    observed: dict[str, HostResult] = dict(converged(example(), S))
    fleet = converged(example(), S)
    observed["fritz"] = edited(stopped(fleet["fritz"], "mastodon-streaming.service"), "mastodon-web.service")
    observed["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    observed["freud"] = with_unit(fleet["freud"], distro_unit("postgresql.service", sub="exited"))
    observed["nietzsche"] = unreachable("nietzsche")
    return observed


def strings(value: Any) -> Iterator[str]:
    """Every string anywhere in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


# ------------------------------------------------------------------ what a plan carries


def test_the_plan_json_carries_format_fleet_time_hashes_fingerprints_changes_and_waves() -> None:
    observed = bare(example())
    plan = plan_for(observed)
    doc = json.loads(plan.document_json())
    assert doc["format"] == PLAN_FORMAT == 2
    assert doc["groups"] == {}  # nothing to prune: no make-before-break
    assert doc["fleet"] == "hachyderm"
    assert doc["created_at"] == "2026-11-28T12:00:00Z"
    assert doc["desired_hash"] == desired_hash(example()) and len(doc["desired_hash"]) == 64
    assert doc["fingerprints"] == {h: fingerprint(s) for h, s in observed.items()}
    assert doc["hosts"] == ["franz", "freud", "fritz", "nietzsche"]
    assert doc["complete"] is True and doc["unknown"] == []
    assert [c["id"] for c in doc["changes"]] == [c.id for c in plan.changes]
    for c in doc["changes"]:
        assert {"host", "action", "target", "service", "reason", "before", "after", "deps"} <= set(c)
    assert sorted(i for w in doc["waves"] for i in w) == sorted(c.id for c in plan.changes)
    assert doc["summary"] == {"install": 11, "change": 13, "start": 9, "restart": 0, "stop": 0, "prune": 0}


def test_a_converged_fleet_makes_an_empty_complete_plan() -> None:
    plan = plan_for(converged(example(), S))
    assert plan.empty and plan.complete and plan.waves == () and plan.deps == {}


def test_an_unreachable_host_makes_the_plan_incomplete_and_lists_nothing_for_it() -> None:
    plan = plan_for(drifted())
    assert not plan.complete
    assert plan.unknown == (("nietzsche", "unreachable", "nietzsche: connection refused"),)
    assert "nietzsche" in plan.hosts and "nietzsche" not in plan.fingerprints
    assert not any(c.host == "nietzsche" for c in plan.changes)
    assert json.loads(plan.to_json())["complete"] is False and plan.to_dict()["complete"] is False


def test_a_limited_plan_covers_only_the_observed_hosts() -> None:
    fleet = converged(example(), S)
    plan = plan_for({"fritz": stopped(fleet["fritz"], "mastodon-web.service")})
    assert plan.hosts == ("fritz",) and list(plan.fingerprints) == ["fritz"]
    assert [c.id for c in plan.changes] == ["fritz:start:mastodon-web.service"]


def whole_drifted() -> dict[str, HostResult]:
    """drifted() with every host in view, so that fleet may prune (make-before-break)."""
    observed = drifted()
    observed["nietzsche"] = converged(example(), S)["nietzsche"]
    return observed


def test_the_plan_carries_each_changes_dependencies_and_its_waves() -> None:
    plan = plan_for(whole_drifted())
    assert set(plan.deps) == {c.id for c in plan.changes}
    position = {cid: i for i, w in enumerate(plan.waves) for cid in w}
    for cid in plan.deps:
        assert all(position[d] < position[cid] for d in plan.waits_for(cid))
    runs = ("fritz:restart:mastodon-web.service", "fritz:start:mastodon-streaming.service")
    assert plan.groups == {EVERY_RUN: runs}
    assert plan.deps["franz:prune:mastodon-sidekiq.service"] == (EVERY_RUN,)  # make-before-break, kept symbolic
    assert plan.waits_for("franz:prune:mastodon-sidekiq.service") == runs
    doc = plan.to_dict()
    assert doc["groups"] == {EVERY_RUN: list(runs)}
    assert next(c for c in doc["changes"] if c["action"] == "prune")["deps"] == [EVERY_RUN]
    assert plan.notes == ("on freud, postgresql.service is undeclared (active/exited, enabled); "
                          "left alone: postgresql* has prune = false",)


def test_an_unreachable_host_stops_all_pruning_because_make_before_break_cannot_be_checked() -> None:
    plan = plan_for(drifted())
    assert not any(c.action == "prune" for c in plan.changes)
    assert any("mastodon-sidekiq.service" in n and "not every host is in view" in n for n in plan.notes)


def test_no_prune_leaves_undeclared_units_alone_and_says_so() -> None:
    plan = plan_for(whole_drifted(), prune=False)
    assert not any(c.action == "prune" for c in plan.changes)
    assert any("mastodon-sidekiq.service" in n and "--no-prune" in n for n in plan.notes)


def test_the_plan_never_holds_a_secret_value() -> None:
    observed: dict[str, HostResult] = dict(bare(example()))
    fleet = converged(example(), S)
    observed["fritz"] = set_env_secret(fleet["fritz"], "DB_PASS", "the-old-db-password")
    plan = plan_for(observed)
    text = plan.to_json()
    everything = "\n".join(strings(json.loads(text)))
    for value in [*S.values(), "the-old-db-password"]:
        assert value not in text and value not in everything, value
    masked = [k for c in plan.changes for k in c.fields()["keys"] if k[0] == "DB_PASS"]
    assert masked and all(k[3].startswith("(sensitive, sha256:") for k in masked)


def test_the_plan_id_is_a_content_hash() -> None:
    assert plan_for(drifted()).plan_id == plan_for(drifted()).plan_id
    assert plan_for(drifted()).plan_id != plan_for(drifted(), prune=False).plan_id


# ------------------------------------------------------------------ JSON round trip


def test_a_plan_without_env_writes_survives_the_json_round_trip_unchanged() -> None:
    plan = plan_for(drifted())
    assert plan.changes and plan.notes and plan.unknown
    assert plan_from_json(plan.to_json()) == plan


def test_a_round_tripped_plan_writes_the_same_json_document() -> None:
    plan = plan_for(bare(example()))
    again = plan_from_json(plan.to_json())
    assert json.loads(again.to_json()) == json.loads(plan.to_json())
    assert again.plan_id == plan.plan_id


def test_a_plan_with_env_writes_survives_the_json_round_trip_unchanged() -> None:
    plan = plan_for(bare(example()))
    assert plan_from_json(plan.to_json()) == plan


@pytest.mark.parametrize("observed", [pytest.param(bare, id="bare"), pytest.param(lambda _: drifted(), id="drifted")])
def test_the_plan_json_is_the_text_json_writes_with_an_indent_of_two(observed: Any) -> None:
    plan = plan_for(observed(example()))
    assert plan.document_json() == json.dumps(plan.to_dict(), indent=2) + "\n"


@pytest.mark.parametrize("observed", [pytest.param(bare, id="bare"), pytest.param(lambda _: drifted(), id="drifted")])
def test_the_plan_file_is_the_packed_document(observed: Any) -> None:
    plan = plan_for(observed(example()))
    assert plan.to_json() == plan_file_text(pack_document(plan.to_dict()))
    assert json.loads(plan.to_json())["format"] == FILE_FORMAT == 3
    assert unpack_document(json.loads(plan.to_json()), "plan.json") == plan.to_dict()


def test_the_plan_file_keeps_each_distinct_text_once_and_a_change_per_row() -> None:
    plan = plan_for(bare(example()))
    packed = json.loads(plan.to_json())
    assert len(packed["texts"]) == len(set(packed["texts"])) and len(packed["changes"]) == len(plan.changes)
    writes = [c for c in plan.changes if c.action == "write-unit"]
    bodies = {c.fields()["diff"].split("\n", 2)[2] for c in writes}  # a diff without its ---/+++ lines
    assert len(writes) > len(bodies)  # hosts share a service's unit: its diff is written once
    payloads = [json.loads(t) for t in packed["texts"] if t.startswith("{")]
    assert sorted(p["diff_body"] for p in payloads if "diff_body" in p) == sorted(bodies)  # each once, no host named
    assert not any("diff" in p for p in payloads)


def test_a_plan_document_or_an_older_plan_file_is_refused_naming_its_format(tmp_path: Path) -> None:
    plan = plan_for(drifted())
    path = tmp_path / "plan.json"
    path.write_text(plan.document_json())  # `fleet plan --json > plan.json`
    with pytest.raises(PlanFileError, match=r"plan format 2 is a plan document \(`--json`\) or a plan file of an "
                                            r"older fleet, not a plan file of this fleet \(format 3\)"):
        plan_from_json(path.read_text(), str(path))


@pytest.mark.parametrize("older", [1, 2])
def test_a_plan_file_of_an_older_fleet_is_refused_naming_its_format_and_what_to_do(older: int) -> None:
    """Format 2 listed make-before-break as pairs; format 1 was the document's shape.  Neither is
    misread: the message names the format and the hint says to plan again."""
    packed = json.loads(plan_for(whole_drifted()).to_json())
    packed["format"] = older
    packed.pop("groups")
    with pytest.raises(PlanFileError, match=f"plan.json: plan format {older} is a plan document .* a plan file of an "
                                            r"older fleet, not a plan file of this fleet \(format 3\)") as e:
        plan_from_json(json.dumps(packed), "plan.json")
    assert e.value.hint == "recompute it with `fleet plan -o FILE`"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=3).map(tuple)
                   | st.dictionaries(st.text(max_size=5), inner, max_size=4)
                   | st.dictionaries(st.integers() | st.booleans() | st.none(), inner, max_size=3)),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_indented_json_writes_what_json_dumps_writes(value: Any) -> None:
    assert indented_json(value) == json.dumps(value, indent=2)


def test_indented_json_writes_a_generator_as_a_list_and_refuses_what_json_refuses() -> None:
    items: list[Any] = [1, "é\n", {"k": None}]
    assert indented_json({"a": (x for x in items), "b": (x for x in items[:0])}) == json.dumps(
        {"a": items, "b": []}, indent=2)
    with pytest.raises(TypeError):
        indented_json({"a": [object()]})


@pytest.mark.parametrize(("text", "says"), [
    ("{not json", "is not JSON"),
    ("", "is not JSON"),
    ("[1, 2]", "unsupported plan format 'list'"),
    ('{"format": 99}', "unsupported plan format 99"),
    ('{"fleet": "hachyderm"}', "unsupported plan format None"),
    ('{"format": 1, "fleet": "x"}', "plan format 1 is a plan document"),
    ('{"format": 3, "fleet": "x"}', "its texts is not a list"),
    ('{"format": 3, "fleet": "x", "texts": [], "hosts": [], "waves": [], "changes": [[0]]}', "change 0 is not a row"),
])
def test_a_damaged_or_foreign_plan_file_is_a_plan_file_error(text: str, says: str) -> None:
    with pytest.raises(PlanFileError, match=says) as e:
        plan_from_json(text, source="plan.json")
    assert str(e.value).startswith("plan.json") and e.value.hint


def test_a_truncated_plan_file_is_a_plan_file_error() -> None:
    text = plan_for(drifted()).to_json()
    with pytest.raises(PlanFileError):
        plan_from_json(text[: len(text) // 2])


def test_a_plan_missing_a_change_field_is_a_plan_file_error() -> None:
    doc = plan_for(drifted()).to_dict()
    del doc["changes"][0]["host"]
    with pytest.raises(PlanFileError, match="missing 'host'"):
        plan_from_document(doc)


@pytest.mark.parametrize("meta", ["x", [["owner"]], [[1, 2, 3]]])
def test_a_plan_with_a_damaged_meta_field_is_a_plan_file_error(meta: Any) -> None:
    doc = plan_for(bare(example())).to_dict()
    doc["changes"][0]["meta"] = meta
    with pytest.raises(PlanFileError):
        plan_from_json(plan_file_text(pack_document(doc)))


def _renamed(doc: dict[str, Any], change: dict[str, Any], action: str) -> None:
    """`change` now names `action`, its id, waves and deps following."""
    old, change["action"] = change["id"], action
    change["id"] = f"{change['host']}:{action}:{change['target']}"
    doc["waves"] = [[change["id"] if x == old else x for x in w] for w in doc["waves"]]
    for c in doc["changes"]:
        c["deps"] = [change["id"] if x == old else x for x in c["deps"]]


@pytest.mark.parametrize("action", ["stop", "disable", "reboot"])
def test_a_plan_naming_an_action_fleet_does_not_have_is_malformed(action: str) -> None:
    doc = plan_for(drifted()).to_dict()
    _renamed(doc, next(c for c in doc["changes"] if c["action"] == "start"), action)
    with pytest.raises(PlanFileError, match=f"change '[a-z]+:{action}:[^']+' is malformed"):
        plan_from_json(plan_file_text(pack_document(doc)))


@pytest.mark.parametrize(("action", "field", "value"), [
    ("write-unit", "keys", [["S3_ENABLED", "set", "", "true"]]),
    ("write-unit", "steps", ["stop"]),
    ("prune", "diff", "-ExecStart=/bin/true\n"),
    ("restart", "remove_files", ["/etc/systemd/system/mastodon-web.service.d/x.conf"]),
    ("daemon-reload", "content_hash", "0" * 64),
    ("write-env", "meta", {"owner": "root", "group": "root", "mode": "0600"}),  # no name
])
def test_a_plan_whose_change_carries_a_field_its_action_never_has_is_malformed(action: str, field: str,
                                                                                value: Any) -> None:
    fleet = converged(example(), S)  # every host in view, so that the undeclared Sidekiq is pruned
    doc = plan_for(drifted() | {"nietzsche": fleet["nietzsche"],
                                "freud": env_meta(fleet["freud"], mode="0644")}).to_dict()
    plan_from_json(plan_file_text(pack_document(doc)))  # as fleet wrote it: loads
    change = next(c for c in doc["changes"] if c["action"] == action)
    change[field] = value
    with pytest.raises(PlanFileError, match=r"is malformed \((carries|its meta)"):
        plan_from_json(plan_file_text(pack_document(doc)))


# ------------------------------------------------------------------ fingerprints and hashes


def _web(state: HostState, **fields: Any) -> HostState:
    return change_unit(state, "mastodon-web.service", **fields)


def test_a_fingerprint_ignores_pids_start_times_and_restart_counts() -> None:
    fritz = converged(example(), S)["fritz"]
    volatile = _web(fritz, main_pid=999, active_enter="Tue 2026-11-24 08:00:00 UTC", n_restarts=3)
    volatile = dataclasses.replace(volatile, collected_at=5.0, duration=2.0,
                                   facts=dataclasses.replace(fritz.facts, load=(9.0, 9.0, 9.0), uptime_seconds=1.0))
    assert fingerprint(volatile) == fingerprint(fritz)


@pytest.mark.parametrize("fields", [
    {"active_state": "failed"}, {"sub_state": "exited"}, {"unit_file_state": "disabled"},
    {"text_hash": "0" * 64}, {"exec_start": ("/usr/bin/other",)}, {"drop_in_paths": ("/etc/x.d/a.conf",)},
])
def test_a_fingerprint_changes_when_the_unit_state_changes(fields: dict[str, Any]) -> None:
    fritz = converged(example(), S)["fritz"]
    assert fingerprint(_web(fritz, **fields)) != fingerprint(fritz)


def test_a_fingerprint_changes_when_an_env_value_or_secret_changes() -> None:
    fritz = converged(example(), S)["fritz"]
    assert fingerprint(set_env_value(fritz, "S3_BUCKET", "other")) != fingerprint(fritz)
    assert fingerprint(set_env_secret(fritz, "DB_PASS", "other")) != fingerprint(fritz)


def test_a_fingerprint_does_not_depend_on_the_order_units_were_listed_in() -> None:
    fritz = converged(example(), S)["fritz"]
    assert fingerprint(dataclasses.replace(fritz, units=fritz.units[::-1])) == fingerprint(fritz)


def test_the_desired_hash_ignores_where_the_files_were_read_from_but_not_what_they_say() -> None:
    d = example()
    assert desired_hash(dataclasses.replace(d, source="/elsewhere/desired_state.toml", hosts_dir="/x")) == (
        desired_hash(d))
    web = dataclasses.replace(d.services[2], max_unavailable=2)
    assert desired_hash(dataclasses.replace(d, services=(*d.services[:2], web, *d.services[3:]))) != desired_hash(d)


EXAMPLE_DESIRED_HASH = "56b8a8329ee2163f7cf8baf7a7eccd8e57845807ed5034889a7001613e15067f"  # asdict's, before plain_data


@dataclasses.dataclass(frozen=True)
class _Leaf:
    name: str
    weight: float = 1.0
    flag: bool | None = None


@dataclasses.dataclass(frozen=True)
class _Node:
    leaves: tuple[_Leaf, ...]
    table: dict[str, Any]
    items: list[Any]
    kind: Any = None


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
                     st.sampled_from(list(Action)))
_leaves = st.builds(_Leaf, st.text(max_size=5), st.floats(allow_nan=False), st.one_of(st.none(), st.booleans()))
_values = st.recursive(st.one_of(_scalars, _leaves), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=4), inner, max_size=3),
    st.builds(_Node, st.lists(_leaves, max_size=2).map(tuple), st.dictionaries(st.text(max_size=3), inner, max_size=2),
              st.lists(inner, max_size=2), _scalars)), max_leaves=12)


@given(value=_values)
def test_plain_data_is_asdict_as_json_writes_it(value: Any) -> None:
    """desired_hash hashes `plain_data` where it hashed `dataclasses.asdict`: the JSON must be the
    same, or every saved plan would be refused as made for another desired state."""
    expected = dataclasses.asdict(_Node((), {}, [value]))
    got = plain_data(_Node((), {}, [value]))
    assert json.dumps(got, sort_keys=True, default=str) == json.dumps(expected, sort_keys=True, default=str)
    assert [type(v) for v in got["items"]] == [type(v) for v in expected["items"]]


def test_the_desired_hash_is_the_one_asdict_gave_so_saved_plans_stay_valid() -> None:
    for d in (example(), dataclasses.replace(example(), source="/x", hosts_dir="/y")):
        assert plain_data(d) == dataclasses.asdict(d)  # equal as Python values: () stays () (defaults compare to it)
    # the example's hash, pinned: a change here refuses every plan saved before it
    assert desired_hash(example()) == EXAMPLE_DESIRED_HASH


# ------------------------------------------------------------------ executing a plan


def test_executing_the_plan_for_a_bare_fleet_converges_it() -> None:
    d = example()
    after = simulate(plan_for(bare(d)), d, S, bare(d))
    assert diff(d, after, S).changes == ()
    assert fingerprint(after["fritz"]) == fingerprint(converged(d, S)["fritz"])  # type: ignore[arg-type]


def test_the_simulator_refuses_a_plan_executed_out_of_order() -> None:
    """The simulator has teeth: running the waves backwards is caught."""
    d = example()
    plan = plan_for(bare(d))
    with pytest.raises(SimulationError):
        simulate(dataclasses.replace(plan, waves=plan.waves[::-1]), d, S, bare(d))
    with pytest.raises(SimulationError, match="systemd was not reloaded first"):
        simulate(list(plan.changes), d, S, bare(d))  # diff order: daemon-reload last on each host


def test_the_simulator_refuses_a_plan_that_leaves_a_stale_process() -> None:
    d = example()
    observed = converged(d, S)
    observed["fritz"] = set_env_value(observed["fritz"], "S3_BUCKET", "old")
    plan = plan_for(observed)
    no_restarts = [c for c in plan.changes if c.action != "restart"]
    with pytest.raises(SimulationError, match="still runs with the old"):
        simulate(no_restarts, d, S, observed)


def test_executing_a_move_stops_the_old_instance_only_after_starting_the_new() -> None:
    d = example()
    fleet = converged(d, S)
    observed: dict[str, HostResult] = {**fleet, "freud": bare(d)["freud"],
                                       "franz": with_unit(fleet["franz"],
                                                          unit_of(fleet["freud"], "mastodon-sidekiq-default.service"))}
    plan = plan_for(observed)
    after = simulate(plan, d, S, observed)
    assert diff(d, after, S).changes == ()
    assert after["franz"].unit("mastodon-sidekiq-default.service") is None  # type: ignore[union-attr]


def test_a_unit_with_a_drop_in_fleet_may_not_remove_converges_after_one_apply() -> None:
    d = example()
    observed = converged(d, S)
    observed["fritz"] = with_drop_in(observed["fritz"], "mastodon-web.service", directory="/run/systemd/system")
    after = simulate(plan_for(observed), d, S, observed)
    assert diff(d, after, S).changes == ()


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "collect"
CAPTURED = {"franz": "drifted-franz", "fritz": "bare-fritz", "freud": "bare-freud", "nietzsche": "databases-nietzsche"}


def test_the_postmortem_fleet_as_captured_on_the_lab_gets_a_plan_that_converges_it() -> None:
    """Real collector output: franz has the hand-made Sidekiq and web (with a drop-in) and a
    hand-written env file; fritz and freud are bare; nietzsche runs the databases."""
    d = example()
    observed: dict[str, HostResult] = {h: parse_host(h, (FIXTURES / f"{n}.txt").read_text())
                                       for h, n in CAPTURED.items()}
    plan = plan_for(observed)
    franz = {c.action: c for c in plan.changes if c.host == "franz"}
    assert set(franz) == {"write-env", "write-unit", "restart", "prune", "daemon-reload"}
    assert franz["prune"].target == "mastodon-sidekiq.service"
    assert franz["prune"].payload.steps == ("stop", "disable", "remove")
    assert franz["write-unit"].payload.remove_files == ("/etc/systemd/system/mastodon-web.service.d/override.conf",)
    assert "-Environment=PORT=3001" in franz["write-unit"].payload.diff
    env = franz["write-env"]
    want = {("S3_ENABLED", "change", "FALSE", "true"), ("3_BUCKET", "remove", "hachyderm-media", "")}
    assert want <= set(env.payload.keys)
    assert "1 line(s) are not KEY=value" in env.reason and "0644" in env.reason
    assert not any(c.host == "nietzsche" and "postgres" in c.target for c in plan.changes)
    text = plan.to_json()
    for secret in ("do-not-leak-me", "also secret", "clear-secret-in-unit"):
        assert secret not in text
    after = simulate(plan, d, S, observed)
    assert diff(d, after, S).changes == ()


@PROPERTY
@given(st.data())
def test_executing_any_plan_yields_the_desired_state(data: st.DataObject) -> None:
    d = example()
    observed = data.draw(fleets(d, S, unreachable_hosts=True), label="observed")
    assume(not pending(d, observed))  # a move of a data store is refused (test_moves.py), not planned
    plan = build_plan(d, observed, S, prune=True, now=NOW)
    after = simulate(plan, d, S, observed)
    again = diff(d, after, S, prune=True)
    assert again.changes == (), "\n".join(c.id for c in again.changes)
    assert plan.problems == () and again.unknown == tuple(r for r in observed.values() if not isinstance(r, HostState))
    report = build_status(d, after)
    for row in report.rows:
        for cell in row.cells:
            if cell.host in row.declared_hosts and isinstance(observed[cell.host], HostState):
                assert cell.status == OK, (row.unit, cell)
    assert plan_from_json(plan.to_json()).to_dict() == plan.to_dict()
    text = plan.to_json()
    assert not any(v in text for v in S.values())


@PROPERTY
@given(st.data())
def test_without_pruning_a_plan_converges_everything_but_undeclared_units(data: st.DataObject) -> None:
    d = example()
    observed = data.draw(fleets(d, S), label="observed")
    assume(not pending(d, observed))  # a move of a data store is refused (test_moves.py), not planned
    plan = build_plan(d, observed, S, prune=False, now=NOW)
    assert not any(c.action == "prune" for c in plan.changes)
    after = simulate(plan, d, S, observed)
    again = diff(d, after, S, prune=False)
    assert again.changes == () and again.notes == plan.notes
    report = build_status(d, after)
    assert not any(c.status == DRIFT for r in report.rows for c in r.cells)


@PROPERTY
@given(st.data())
def test_a_plan_is_refused_exactly_when_it_would_move_an_undeclared_data_store(data: st.DataObject) -> None:
    d = example()
    observed = data.draw(fleets(d, S, unreachable_hosts=True), label="observed")
    moves = pending(d, observed)
    try:
        build_plan(d, observed, S, now=NOW)
    except MoveRefused as e:
        assert moves and all(f"[moves.{m.service}]" in e.hint for m in moves)
    else:
        assert not moves


@PROPERTY
@given(st.data())
def test_diffing_twice_gives_the_same_changes(data: st.DataObject) -> None:
    d = example()
    observed = data.draw(fleets(d, S, unreachable_hosts=True), label="observed")
    assume(not pending(d, observed))  # a move of a data store is refused (test_moves.py), not planned
    assert diff(d, observed, S) == diff(d, dict(observed), S)
    assert plan_for(observed).plan_id == plan_for(dict(observed)).plan_id


def test_the_plan_file_is_the_packed_document_whatever_rows_share() -> None:
    """`to_json` writes a row's shared middle once per distinct (action, target, service, reason,
    before, after, payload): rows that differ in any one of them, a diff whose ---/+++ lines are
    not the standard ones, a service of None, a host the plan does not cover, and deps on a group
    and on a change the plan lacks are all written as `pack_document` writes them."""
    from fleet.actions import Action, Change, UnitFilePayload

    def unit(host: str, reason: str = "unit is not installed", service: str | None = "web", before: str = "absent",
             diff: str | None = None, h: str = "a" * 64) -> Change:
        body = "+[Unit]\n+Description=x\n"
        text = diff if diff is not None else f"--- {host}:web.service (now)\n+++ {host}:web.service (desired)\n{body}"
        return Change(host, Action.WRITE_UNIT, "web.service", reason, service, before=before,
                      after="/etc/systemd/system/web.service", payload=UnitFilePayload(h, diff=text))

    changes = (unit("a1"), unit("a2"), unit("a3", reason="unit file differs"), unit("a4", service=None),
               unit("a5", before="/lib/x"), unit("a6", diff="--- elsewhere\n+++ x\n+y\n"), unit("a7", h="b" * 64),
               unit("stranger"), Change("a1", Action.DAEMON_RELOAD, "systemd", "unit files changed"))
    ids = [c.id for c in changes]
    plan = Plan("f", "2026-12-02T00:00:00Z", "0" * 64, ("a1", "a2", "a3", "a4", "a5", "a6", "a7"), {}, changes,
                {ids[8]: (ids[0], "@every-start-and-restart", "gone:start:x.service"), ids[1]: (ids[0],)},
                (tuple(ids),), groups={"@every-start-and-restart": (ids[2],)})
    assert plan.to_json() == plan_file_text(pack_document(plan.to_dict()))
    packed = json.loads(plan.to_json())
    assert len({json.dumps(row[1:8]) for row in packed["changes"]}) == 7  # a1, a2 and the stranger share theirs


def test_a_changes_own_init_takes_its_fields_in_order_with_their_defaults() -> None:
    """Change sets its fields itself (fleet/actions.py): what dataclass would generate, held here
    to the fields, so that a field added without it is caught."""
    import dataclasses
    import inspect

    from fleet.actions import Action, Change, UnitFilePayload

    params = list(inspect.signature(Change.__init__).parameters.values())[1:]
    fields = dataclasses.fields(Change)
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
                                           for f in fields]
    payload = UnitFilePayload("a" * 64, diff="d")
    c = Change("h", Action.WRITE_UNIT, "x.service", "why", "web", "was", "will", payload)
    assert [getattr(c, f.name) for f in fields] == ["h", Action.WRITE_UNIT, "x.service", "why", "web", "was", "will",
                                                   payload]
    assert c == Change(host="h", action=Action.WRITE_UNIT, target="x.service", reason="why", service="web",
                       before="was", after="will", payload=payload)
    assert dataclasses.replace(c, host="g").host == "g" and dataclasses.replace(c, host="g").payload is payload
    assert Change("h", Action.START, "x", "r") == Change("h", Action.START, "x", "r", None, "", "", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.host = "other"  # type: ignore[misc]
