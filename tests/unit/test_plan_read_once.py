"""Reading a plan file loads each distinct payload once (issue #19: `fleet show` of a bare
1,000-host plan spent ~0.4 s of CPU loading the same payload per host), and reads the same plan
as loading every change did."""

from __future__ import annotations

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
    # a unit's diff names its host: loaded per change, as before
    assert calls["write-unit"] == per_action["write-unit"]


def test_the_shared_loads_read_the_plan_that_loading_every_change_reads() -> None:
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS, now=NOW)
    d = json.loads(plan.to_json())
    keys: list[Any] = []
    shared = plan_from_document(unpack_document(json.loads(plan.to_json()), "plan.json", keys), "plan.json", keys)
    assert len(keys) == len(plan.changes) and any(k is not None for k in keys)
    assert shared == plan_from_document(unpack_document(d, "plan.json"), "plan.json") == plan
