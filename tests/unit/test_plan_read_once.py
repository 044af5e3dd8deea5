"""Reading a plan file loads each distinct payload once (issue #19: `fleet show` of a bare
1,000-host plan spent ~0.4 s of CPU loading the same payload per host) — a unit diff once per
distinct body, under each host's own ---/+++ lines — and reads the same plan as loading every
change did."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from observed import EXAMPLE_SECRETS, bare, example

import fleet.plan
from fleet.actions import Action
from fleet.plan import build_plan, plan_from_document, plan_from_json, unpack_document

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def counting_loads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    calls: Counter[str] = Counter()
    real = fleet.plan.owner

    class Counted:
        def __init__(self, action: Action) -> None:
            self.resource = real(action)

        def load(self, action: Action, fields: Any) -> Any:
            calls[action.value] += 1
            return self.resource.load(action, fields)

        def __getattr__(self, name: str) -> Any:  # problem(), as the resource
            return getattr(self.resource, name)

    monkeypatch.setattr(fleet.plan, "owner", Counted)
    return calls


def test_a_plan_file_loads_each_distinct_payload_once(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS, now=NOW)
    text = plan.to_json()
    per_action = Counter(c.action.value for c in plan.changes)
    calls = counting_loads(monkeypatch)
    again = plan_from_json(text)
    assert again == plan
    # a start, enable or daemon-reload carries no payload: one load per action, not per host
    for action in ("start", "enable", "daemon-reload"):
        assert per_action[action] > 1 and calls[action] == 1, (action, per_action[action], calls[action])
    # a unit's diff names its host in its ---/+++ lines only: loaded once per distinct body and
    # payload (the plan file's payload text), each change with its own host's diff (`again == plan`)
    rows = json.loads(text)["changes"]
    bodies = {row[7] for row in rows if row[1] == "write-unit"}
    assert per_action["write-unit"] > len(bodies) and calls["write-unit"] == len(bodies)


def test_the_shared_loads_read_the_plan_that_loading_every_change_reads() -> None:
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS, now=NOW)
    d = json.loads(plan.to_json())
    keys: list[Any] = []
    shared = plan_from_document(unpack_document(json.loads(plan.to_json()), "plan.json", keys), "plan.json", keys)
    assert len(keys) == len(plan.changes) and any(k is not None for k in keys)
    assert shared == plan_from_document(unpack_document(d, "plan.json"), "plan.json") == plan


def shared_rows() -> tuple[dict[str, Any], int, int]:
    """A bare plan's file and two rows of different hosts that share their middle (action, target
    … payload): rows are read once per distinct middle, then copied."""
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS, now=NOW)
    d = json.loads(plan.to_json())
    first: dict[str, int] = {}
    for n, row in enumerate(d["changes"]):
        key = json.dumps(row[1:8])
        if key in first and row[0] != d["changes"][first[key]][0] and row[7] is not None \
                and "diff_body" in d["texts"][row[7]]:
            return d, first[key], n
        first.setdefault(key, n)
    raise AssertionError("no two hosts share a write-unit row")


def swap_texts(d: dict[str, Any], i: int, j: int) -> None:
    """Texts i and j change places, and every row's reference to them: the same plan."""
    texts = d["texts"]
    texts[i], texts[j] = texts[j], texts[i]
    for row in d["changes"]:
        for k in (*range(2, 8), *range(9, len(row))):
            if type(row[k]) is int and row[k] in (i, j):
                row[k] = i + j - row[k]


@pytest.mark.parametrize("value", [True, False, 0.0, 1.0])
@pytest.mark.parametrize("at", range(2, 8))
def test_a_field_that_equals_a_shared_one_but_is_not_an_index_is_refused(at: int, value: Any) -> None:
    """JSON's `true` and `1.0` equal the index 1 in Python: a row that matches an earlier one but
    for such a field is not taken for it."""
    d, a, b = shared_rows()
    rows = d["changes"]
    assert type(rows[a][at]) is int and rows[a][at] == rows[b][at]
    swap_texts(d, int(value), rows[a][at])  # the shared index is now 0 or 1
    expected = unpack_document(json.loads(json.dumps(d)), "plan.json")
    assert [c["id"] for c in expected["changes"]] == [c["id"] for c in unpack_document(d, "plan.json")["changes"]]
    rows[b][at] = value
    with pytest.raises(fleet.plan.PlanFileError, match=f"change {b}'s"):
        unpack_document(d, "plan.json")


def test_a_row_that_shares_a_diff_but_names_its_host_by_a_value_that_is_not_text_is_refused() -> None:
    d, a, b = shared_rows()
    d["changes"][b][0] = [5]
    with pytest.raises(fleet.plan.PlanFileError, match=f"change {b}'s diff is not text"):
        unpack_document(d, "plan.json")
    d["changes"][a][0] = [5]  # the first of them: refused the same way, read alone
    with pytest.raises(fleet.plan.PlanFileError, match=f"change {a}'s diff is not text"):
        unpack_document(d, "plan.json")


def test_a_shared_diff_body_is_not_shared_with_a_payload_that_does_not_hold_the_diff_as_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sharing a loaded unit payload across hosts relies on it holding the diff as read: a load
    that did not (a resource that changed the text) is done again for each change."""
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS, now=NOW)
    calls: Counter[str] = Counter()
    real = fleet.plan.owner

    class Rewriting:
        def __init__(self, action: Action) -> None:
            self.resource = real(action)

        def load(self, action: Action, fields: Any) -> Any:
            calls[action.value] += 1
            payload = self.resource.load(action, fields)
            return dataclasses.replace(payload, diff=payload.diff.upper()) if action == Action.WRITE_UNIT else payload

        def __getattr__(self, name: str) -> Any:
            return getattr(self.resource, name)

    monkeypatch.setattr(fleet.plan, "owner", Rewriting)
    again = plan_from_json(plan.to_json())
    writes = [(c, a) for c, a in zip(plan.changes, again.changes, strict=True) if c.action == Action.WRITE_UNIT]
    assert calls["write-unit"] == len(writes) > 1
    assert all(a.fields()["diff"] == c.fields()["diff"].upper() for c, a in writes)
