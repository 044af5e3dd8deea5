"""`Plan.ids()`: each change's id made once per plan, for the plan file, the text's order and the
plan's own indexes (a bare 1,000-host plan has 62,000 changes; each asked its id three times).
The plan file's deps are written from each position's text, made once; a dep that is no
position (a group, a change the plan lacks) is written as `pack_document` writes it."""

from __future__ import annotations

from datetime import UTC, datetime

from observed import EXAMPLE_SECRETS, bare, example

from fleet.actions import Action, Change
from fleet.graph import EVERY_RUN
from fleet.output.text import plan_text
from fleet.plan import Plan, build_plan, pack_document, plan_file_text

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def test_a_plans_ids_are_its_changes_ids_in_plan_order() -> None:
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS, now=NOW)
    assert plan.changes
    assert plan.ids() == tuple(c.id for c in plan.changes)
    assert plan.ids() is plan.ids()  # made once
    assert all(plan.change(cid) is c for cid, c in zip(plan.ids(), plan.changes, strict=True))


def _twice() -> Plan:
    """A plan (as a damaged file could make one) where one id names two changes, and deps name a
    group and a change the plan lacks, mixed with positions."""
    first = Change("a", Action.START, "web.service", "declared to run here; now inactive", "web", "inactive", "active")
    other = Change("a", Action.ENABLE, "web.service", "declared units start at boot", "web", "absent", "enabled")
    again = Change("a", Action.START, "web.service", "declared to run here; now failed", "web", "failed", "active")
    reload = Change("b", Action.DAEMON_RELOAD, "systemd", "unit files changed")
    changes = (first, other, again, reload)
    return Plan("f", "2026-12-02T00:00:00Z", "0" * 64, ("a", "b"), {}, changes,
                {first.id: (other.id,), reload.id: (first.id, EVERY_RUN, "gone:start:x.service", other.id),
                 other.id: (EVERY_RUN, other.id)},
                ((other.id, reload.id), (first.id,)), groups={EVERY_RUN: (first.id,)})


def test_an_id_naming_two_changes_is_the_last_of_them_as_before() -> None:
    plan = _twice()
    assert plan.ids() == ("a:start:web.service", "a:enable:web.service", "a:start:web.service",
                          "b:daemon-reload:systemd")
    assert plan.change("a:start:web.service") is plan.changes[2]
    # in plan order, the id at its last change's position (2), after a:enable (1)
    assert plan.waits_for("a:enable:web.service") == ("a:enable:web.service", "a:start:web.service")


def test_the_plan_file_writes_positions_groups_and_missing_changes_as_the_packed_document() -> None:
    plan = _twice()
    text = plan.to_json()
    assert text == plan_file_text(pack_document(plan.to_dict()))
    assert '[1,"b:daemon-reload:systemd"' not in text  # not the id: the host's index, the shared middle
    assert ',[2,["@every-start-and-restart"],["gone:start:x.service"],1]]' in text
    assert "Order (2 wave(s)" in plan_text(plan)
