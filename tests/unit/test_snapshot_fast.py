"""The observation reader's fast path (fleet/snapshot.py `_host_fast`) against the checking
reader it stands in front of: for any record, valid or damaged anywhere, `from_record` gives the
same hosts, or the same error (message and hint, naming the same key), as the reader alone.
And it does take the plainly valid hosts: otherwise it would be no faster."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from observed import EXAMPLE_SECRETS, bare, converged, fleets, unreachable
from observed import example as example_desired

from fleet import snapshot
from fleet.errors import FleetError
from fleet.model import HostState
from fleet.sidekiq import SECTION, QueueState, RedisTarget, SidekiqProcess, SidekiqView

MANY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Text(str):
    """A str subclass: the reader takes it, the fast path leaves it to the reader."""


class Whole(int):
    pass


LONG_TEXT = "x" * (snapshot.MAX_TEXT + 1)
HALF_TEXT = "y" * (snapshot.MAX_TEXT // 2 + 1)  # two of these in one unit: each fits, together they do not
TOO_MANY_TEXTS = ["a"] * (snapshot.MAX_VALUES + 1)
TOO_MANY_PAIRS = [["a", "b"]] * 50_001  # fleet.collect.parse.MAX_FILES + 1

# What a damaged or hostile record may hold where a value was: every JSON type, the edges of
# each bound, and what only a Python caller could pass (subclasses, tuples).
hostile = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 53 - 2, max_value=2 ** 53 + 2),
    st.integers(min_value=-(2 ** 53) - 2, max_value=-(2 ** 53) + 2), st.just(10 ** 400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["sha256:0123abcd", "0" * 64, "sha256:XYZ", "loaded", "", LONG_TEXT, HALF_TEXT]),
    st.just(Text("web")), st.just(Whole(3)), st.just(("a", "b")), st.just(TOO_MANY_TEXTS), st.just(TOO_MANY_PAIRS),
    st.lists(st.one_of(st.text(max_size=4), st.integers(), st.none()), max_size=3),
    st.lists(st.lists(st.text(max_size=4), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
).map(copy.deepcopy)  # each draw its own copy: `damaged` edits what it put in place (appends to it,
# replaces its items), and an edit to the shared constants above would carry into every later
# example, until a list held itself and `places` recursed without end


@settings(derandomize=True, max_examples=300, database=None, deadline=None)
@given(hostile)
def test_a_drawn_hostile_value_is_never_a_shared_constant_itself(value: Any) -> None:
    """Reproduces, deterministically, what failed a full unit run once (2 December): a record damaged
    with TOO_MANY_PAIRS, then damaged again inside it, changed the constant for later examples.
    Edit what was drawn as `damaged` does; the constants must not change."""
    assert all(value is not c for c in (TOO_MANY_TEXTS, TOO_MANY_PAIRS))
    if isinstance(value, list) and value:
        if isinstance(value[0], list):
            value[0].append("edited")
        value[0] = "edited"
        value.append(value)
    assert TOO_MANY_TEXTS == ["a"] * (snapshot.MAX_VALUES + 1)
    assert len(TOO_MANY_PAIRS) == 50_001 and TOO_MANY_PAIRS[0] == ["a", "b"]


def sidekiq_record() -> dict[str, Any]:
    view = SidekiqView(
        target=RedisTarget("default", "127.0.0.1", 6379, 0, False, True), redis_time=1790000000.0,
        processes=(SidekiqProcess("host:1:abc", "fritz", 4242, "mastodon", 10, (("default", 6), ("push", 2)),
                                  ("web",), 1789990000.0, "7.2.4", 1, 1790000000.0, False, 123456, 250),),
        queues=(QueueState("default", 0, None, 0.0),), processes_total=1, queues_total=1)
    return snapshot.view_record(view)


def base_record(results: dict[str, Any], with_sidekiq: bool) -> dict[str, Any]:
    record = json.loads(json.dumps(snapshot.to_record(results)))
    if with_sidekiq:
        first = next((h for h in record["hosts"].values() if "error" not in h), None)
        if first is not None:
            first["sidekiq"] = json.loads(json.dumps(sidekiq_record()))
    return record


def places(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the tree (the root left out), each as its path of keys and indices."""
    out = [path] if path else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out += places(child, (*path, key))
    return out


def shape(record: dict[str, Any], path: tuple[Any, ...]) -> tuple[Any, ...]:
    """A place's position in the schema: list indices and host names as `*`."""
    node: Any = record
    out: list[Any] = []
    for i, key in enumerate(path):
        out.append("*" if isinstance(node, list) or (i == 1 and path[0] == "hosts") else key)
        node = node[key]
    return tuple(out)


OVERFLOW = (3, 4, snapshot.MAX_VALUES + 1, 50_001, 10_001)  # load's 3; values', files', units' limits + 1


@st.composite
def damaged(draw: st.DrawFn, record: dict[str, Any]) -> dict[str, Any]:
    """The record changed in one to three places, each picked by its position in the schema
    first (so that a fingerprint deep in an env file is as likely as a host's name): a value
    replaced by a hostile one, a key or item removed, one added, a list grown to a bound."""
    record = copy.deepcopy(record)
    for _ in range(draw(st.integers(1, 3))):
        by_shape: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        for path in places(record):
            by_shape.setdefault(shape(record, path), []).append(path)
        if not by_shape:
            break
        path = draw(st.sampled_from(by_shape[draw(st.sampled_from(sorted(by_shape, key=repr)))]))
        parent: Any = record
        for key in path[:-1]:
            parent = parent[key]
        key, node = path[-1], parent[path[-1]]
        what = draw(st.sampled_from(["replace", "replace", "delete", "add", "overflow"]))
        if what == "replace" or (what in ("add", "overflow") and not isinstance(node, (dict, list))):
            parent[key] = draw(hostile)
        elif what == "delete":
            del parent[key]
        elif isinstance(node, dict):
            node[draw(st.text(max_size=6))] = draw(hostile)
        elif what == "add" or not node:
            node.append(draw(hostile))
        else:
            parent[key] = [node[0]] * draw(st.sampled_from(OVERFLOW))
    return record


def outcome(record: object, fast: bool) -> tuple[Any, ...]:
    try:
        return ("read", snapshot._from_record(record, "obs.json", fast=fast))
    except FleetError as e:
        return ("refused", type(e), e.message, e.hint)
    except Exception as e:  # what the reader lets escape, the fast path must let escape alike
        return ("raised", type(e))


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    results = draw(fleets(example_desired(), EXAMPLE_SECRETS, unreachable_hosts=True))
    record = base_record(results, draw(st.booleans()))
    return draw(damaged(record)) if draw(st.integers(0, 9)) else record  # mostly damaged


@MANY
@given(records())
def test_the_fast_path_reads_and_refuses_exactly_as_the_reader(record: dict[str, Any]) -> None:
    assert outcome(record, fast=True) == outcome(record, fast=False)


# One value of every kind at every place of the schema, each alone: the exhaustive half of the
# comparison (the random half above damages several places at once).
VALUES = [None, True, False, 0, -1, 3, 2 ** 53 - 1, 2 ** 53, -(2 ** 53), 10 ** 400, 0.5, math.nan, math.inf, "",
          "x", "sha256:XYZ", "sha256:0123abcd", "0" * 64, LONG_TEXT, HALF_TEXT, Text("web"), Whole(3), ("a", "b"),
          [], ["a"], ["a", "b"], ["a", "b", "c"], [1, 2, 3], [["a", "b"]], [("a", "b")], {}, {"a": 1}]


def one_by_one(record: dict[str, Any]) -> Any:
    """The record damaged at one place at a time (one place per position in the schema), then
    restored: each value of VALUES put there, the key or item removed, the list grown to each
    bound."""
    by_shape: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for path in places(record):
        by_shape.setdefault(shape(record, path), path)
    for path in by_shape.values():
        parent: Any = record
        for key in path[:-1]:
            parent = parent[key]
        key, node = path[-1], parent[path[-1]]
        for value in VALUES:
            parent[key] = value
            yield path, value
        parent[key] = node
        if isinstance(parent, dict):
            items = list(parent.items())
            del parent[key]
            yield path, "removed"
            parent.clear()
            parent.update(items)
        if isinstance(node, list) and node:
            for n in OVERFLOW:
                parent[key] = [node[0]] * n
                yield path, f"{n} items"
            parent[key] = node


def test_each_place_damaged_alone_is_read_or_refused_exactly_as_the_reader() -> None:
    results: dict[str, Any] = dict(converged(example_desired(), EXAMPLE_SECRETS))
    last = list(results)[-1]
    results[last] = unreachable(last)
    record = base_record(results, with_sidekiq=True)
    cases = 0
    for path, value in one_by_one(record):
        assert outcome(record, fast=True) == outcome(record, fast=False), (path, str(value)[:40])
        cases += 1
    assert cases > 3000


def test_the_fast_path_takes_every_plainly_valid_host() -> None:
    record = base_record(converged(example_desired(), EXAMPLE_SECRETS), with_sidekiq=True)
    texts = record["texts"]
    for name, h in record["hosts"].items():
        fast = snapshot._host_fast(name, h, texts)
        assert isinstance(fast, HostState), name
        assert fast == snapshot._from_record(record, "obs.json", fast=False)[name]
    assert any(h.facts_of(SECTION) is not None for h in snapshot.from_record(record).values()
               if isinstance(h, HostState))


def test_what_the_fast_path_declines_the_reader_still_reads() -> None:
    """A subclass of str, or an int as large as a float holds exactly: valid, and read."""
    record = base_record(converged(example_desired(), EXAMPLE_SECRETS), with_sidekiq=False)
    host = next(iter(record["hosts"]))
    record["hosts"][host]["units"][0]["unit_file_state"] = Text("enabled")
    record["hosts"][host]["facts"]["uptime"] = 2 ** 60
    assert snapshot._host_fast(host, record["hosts"][host], record["texts"]) is None
    read = snapshot.from_record(record)[host]
    assert isinstance(read, HostState)
    assert read.units[0].unit_file_state == "enabled" and read.facts.uptime_seconds == float(2 ** 60)


def test_a_unit_not_installed_is_read_once_for_every_host_that_has_it_alike() -> None:
    """A bare fleet's hosts hold the same not-installed units (nothing in their lists): the fast
    path makes each once and hands the same frozen `UnitState` to the next host."""
    record = base_record(bare(example_desired()), with_sidekiq=False)
    read = [h for h in snapshot.from_record(record).values() if isinstance(h, HostState)]
    first, *others = read
    assert others and first.units
    for h in others:
        for u in h.units:
            same = first.unit(u.unit)
            assert same is None or u is same
    assert read == [h for h in snapshot._from_record(record, "obs.json", fast=False).values()
                    if isinstance(h, HostState)]


def test_a_later_host_s_unit_equal_in_value_but_not_in_type_is_refused_as_the_reader_refuses_it() -> None:
    """The units read before are keyed by value, and `False == 0`, `0.0 == 0`, `Whole(0) == 0`:
    each place of a later host's bare unit damaged alone still reads, or is refused, as the
    reader alone does."""
    record = base_record(bare(example_desired()), with_sidekiq=False)
    hosts = list(record["hosts"])
    earlier = [u for h in hosts[:-1] for u in record["hosts"][h]["units"]]
    unit = next(u for u in record["hosts"][hosts[-1]]["units"] if u in earlier)  # read before, alike
    assert not any(unit[k] for k in ("exec_start", "drop_ins", "environment", "environment_files", "file_hashes"))
    cases = 0
    for key, original in list(unit.items()):
        for value in [*VALUES, False, 0.0, Whole(0), Text(original) if isinstance(original, str) else 1.0]:
            unit[key] = value
            assert outcome(record, fast=True) == outcome(record, fast=False), (key, str(value)[:40])
            cases += 1
        unit[key] = original
    assert cases > 400
