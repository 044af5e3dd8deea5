"""The plan file's deps and waves are each change's position as text, joined, when every entry
is a change's position: no index of positions (`Plan._position`) is made for them.  Where one is
not (a dep on a group or on a change the plan lacks, a wave naming one), that row or wave is
spelled from the index, [name] for what is no position.  Either way the file is the packed
document's text: on the plans where the shortcut must not apply, on those whose hosts' rows
differ from each other's (a drifted host, a host with an undeclared unit, a template's
instances), and on a bare fleet, where it must."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from observed import EXAMPLE_SECRETS, bare, edited, example, hand_made_unit, with_unit
from test_worked_out_once import first_install_fleet

from fleet.actions import Action, Change
from fleet.graph import EVERY_RUN
from fleet.plan import Plan, build_plan, pack_document, plan_file_text

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def packed(plan: Plan) -> str:
    return plan_file_text(pack_document(plan.to_dict()))


def test_a_bare_fleet_is_written_from_the_position_texts_alone() -> None:
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS, now=NOW)
    assert len(plan.hosts) > 1 and sum(bool(ds) for ds in plan.deps.values()) > 10 and not plan.groups
    assert plan.to_json() == packed(plan)
    assert "_position" not in vars(plan)  # every dep and wave entry a position: no index made


def _hosts_that_differ() -> list[tuple[str, Any, dict[str, Any]]]:
    desired = example()
    hosts = [h.name for h in desired.hosts]
    drifted = bare(desired)
    first = build_plan(desired, drifted, EXAMPLE_SECRETS, now=NOW)
    unit = next(c.target for c in first.changes if c.host == hosts[1] and c.action is Action.WRITE_UNIT)
    from observed import converged
    conv = converged(desired, EXAMPLE_SECRETS)
    tmpl = first_install_fleet(("t1", "t2", "t3"))
    return [
        ("one host drifted", desired, conv | {hosts[1]: edited(conv[hosts[1]], unit)}),
        ("one host with an undeclared unit", desired,
         bare(desired) | {hosts[0]: with_unit(bare(desired)[hosts[0]], hand_made_unit("extra.service", "/bin/x"))}),
        ("a template's instances, differing on the last host", tmpl, bare(tmpl)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_plans_whose_hosts_rows_differ_are_written_as_the_packed_document(case: int) -> None:
    name, desired, observed = _hosts_that_differ()[case]
    plan = build_plan(desired, observed, EXAMPLE_SECRETS, now=NOW)
    assert plan.changes, name
    assert plan.to_json() == packed(plan), name


def _unplaced() -> Plan:
    """A plan (as a damaged file could make one) whose deps and waves name a group and a change the
    plan lacks beside positions."""
    start = Change("a", Action.START, "web.service", "declared to run here; now inactive", "web", "inactive", "active")
    enable = Change("a", Action.ENABLE, "web.service", "declared units start at boot", "web", "absent", "enabled")
    other = Change("b", Action.START, "web.service", "declared to run here; now inactive", "web", "inactive", "active")
    return Plan("f", "2026-12-02T00:00:00Z", "0" * 64, ("a", "b"), {}, (start, enable, other),
                {start.id: (enable.id,), other.id: (EVERY_RUN, start.id, "gone:start:x.service")},
                ((enable.id, "gone:start:x.service"), (start.id, other.id)), groups={EVERY_RUN: (start.id,)})


def test_deps_and_waves_that_are_no_position_are_spelled_from_the_index() -> None:
    plan = _unplaced()
    text = plan.to_json()
    assert "_position" in vars(plan)
    assert text == packed(plan)
    assert ',[["@every-start-and-restart"],0,["gone:start:x.service"]]]' in text
    assert '[1,["gone:start:x.service"]]' in text  # the wave, by position where it is one
    assert ',[1]]' in text and '"@every-start-and-restart":[0]' in text  # start's deps; the group


def test_a_wave_naming_a_change_the_plan_lacks_is_written_as_the_packed_document() -> None:
    start = Change("a", Action.START, "web.service", "why", "web")
    enable = Change("a", Action.ENABLE, "web.service", "why", "web")
    plan = Plan("f", "2026-12-02T00:00:00Z", "0" * 64, ("a",), {}, (start, enable), {start.id: (enable.id,)},
                ((enable.id,), ("a:stop:web.service", start.id)))
    assert plan.to_json() == packed(plan)
    assert '[["a:stop:web.service"],0]' in plan.to_json()
    assert ',[1]]' in plan.to_json()  # start's deps, a position
