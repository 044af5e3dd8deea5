"""The kinds of resource fleet handles, in the order a host is diffed, and the lookup by action.

The order is the diff order, and so the order of a host's changes in a plan: env files first
(a unit that loads one restarts after it is written), then each declared service's unit file
and state together, then undeclared units.  Adding a kind is one line here (docs/ARCHITECTURE.md,
"How to add a kind of resource").
"""

from __future__ import annotations

from collections.abc import Mapping

from fleet.actions import Action
from fleet.resources.base import ActionSpec, Resource
from fleet.resources.drop_ins import DropIns
from fleet.resources.env_file import EnvFiles
from fleet.resources.runbook import MoveSteps
from fleet.resources.runbook_quiet import QuietSteps
from fleet.resources.sidekiq_config import SidekiqConfigs
from fleet.resources.sidekiq_view import SidekiqHeartbeats
from fleet.resources.stores import DataStores
from fleet.resources.undeclared import UndeclaredUnits
from fleet.resources.unit_file import UnitFiles
from fleet.resources.unit_state import UnitStates

RESOURCES: tuple[Resource, ...] = (
    EnvFiles(),
    UnitFiles(),
    DropIns(),  # after the unit file, before its state: a changed drop-in restarts the unit
    UnitStates(),
    UndeclaredUnits(),
    SidekiqConfigs(),
    DataStores(),
    SidekiqHeartbeats(),
    MoveSteps(),
    QuietSteps(),
)


def _owners() -> dict[Action, Resource]:
    owners: dict[Action, Resource] = {}
    for r in RESOURCES:
        for action in r.actions:
            if action in owners:
                raise AssertionError(f"{action} is declared by both {owners[action].kind} and {r.kind}")
            owners[action] = r
    missing = set(Action) - set(owners)
    if missing:
        raise AssertionError(f"no resource declares {', '.join(sorted(missing))}")
    return owners


BY_ACTION: Mapping[Action, Resource] = _owners()
SPECS: Mapping[Action, ActionSpec] = {a: r.actions[a] for a, r in BY_ACTION.items()}


def for_action(action: Action | str) -> Resource | None:
    """The resource that owns `action` (a journal's or an audit's text works too); None if none."""
    try:
        return BY_ACTION[Action(action)]
    except ValueError:
        return None


def owner(action: Action) -> Resource:
    """The resource that owns `action`, which every Action has (checked above, at import)."""
    return BY_ACTION[action]
