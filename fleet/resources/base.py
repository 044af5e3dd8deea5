"""What every kind of resource provides: the `Resource` protocol, and the contexts it works in.

A resource is one kind of thing fleet looks at or manages on a host (a unit file, a unit's
running state, an env file, an undeclared unit to prune …).  It owns, for the actions it
declares, everything fleet does with them: how they are diffed (`diff_host`/`diff_service`, in a
`HostDiff` that carries what earlier resources decided on that host), how they are carried out
and rolled back (through the `Execution` the executor hands it), the content check before
apply, the journal sentence, the plan symbol, summary bucket and detail lines, which observed
changes they explain in an audit, how they are ordered (`ActionSpec`: phase, reload, rolling;
`affects`), and how their payload is read back from a plan file and checked.

`Resource` is a base class whose defaults do nothing, so that a kind only spells out what it
has: an observed-only kind declares no actions at all.  Dispatch is by the registry
(fleet/resources/registry.py): nothing outside fleet/resources/ compares actions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from fleet.actions import Action, Change, KeyChange, ObservedKind, Payload, Phase
from fleet.collect.sections import SectionParser
from fleet.errors import FleetError
from fleet.model import Desired, Host, HostState, Service
from fleet.units import UNIT_DIR, removable_unit_file

# Plan text detail lines are (style, text); fleet/output/text.py paints them.
PLAIN, ADDED, REMOVED, CHANGED, DIFF = "plain", "added", "removed", "changed", "diff"
Detail = tuple[str, str]

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ActionSpec:
    """What the rest of fleet knows about an action without knowing the action."""

    phase: Phase
    symbol: str  # in the plan text: + new, ~ changed, - removed, ↻ restarted
    bucket: str  # in the plan summary (one of actions.SUMMARY_BUCKETS)
    past: str = ""  # the journal's verb for a plain "<verb> <target> (was …)" sentence
    needs_reload: bool = False  # systemd must re-read unit files after it, before units (re)start
    rolling: bool = False  # a RUN that takes a running instance down: rolled by max_unavailable
    shows_target: bool = True  # plan text and logs name the target (a reload's is just "systemd")


@dataclass(frozen=True)
class Problem:
    """Something a kind of resource found wrong with a declared service on a host, beyond its unit's
    own state: its status cell is drift `(!)` with the message in its detail, and `fleet audit`
    reports it as an error finding with this code, naming the service and host."""

    code: str  # the finding's code, e.g. "store.cluster-failed"
    message: str  # short, about the service on that host: "cluster unit postgresql@15-main.service failed"
    hint: str = ""  # how to fix it


class PayloadError(ValueError):
    """A plan file's change does not have the shape of its action."""


class StepView(Protocol):
    """A journaled step as a resource reads it (fleet.journal.StepRecord)."""

    @property
    def action(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def before(self) -> str: ...
    @property
    def after(self) -> str: ...
    @property
    def details(self) -> Mapping[str, Any]: ...
    @property
    def keys(self) -> tuple[KeyChange, ...]: ...


class AuditStep(Protocol):
    """A journaled step as attribution reads it (fleet.audit.JournalStep)."""

    @property
    def action(self) -> str: ...
    @property
    def outcome(self) -> str | None: ...
    @property
    def keys(self) -> tuple[str, ...]: ...


class Execution(Protocol):
    """What the executor gives a resource to carry out one change on its host (fleet.apply)."""

    desired: Desired
    secrets: Mapping[tuple[str, str], str]
    run_id: str
    settle: float
    start_timeout: float
    command_grace: float  # seconds a remote command may run past its own budget (--command-grace)
    host: Host
    detail: str  # what to show under a failure (a unit's last journal lines)
    accept_queued: int | None  # jobs left queued in quiet Sidekiq the operator accepted (--accept-queued)
    plan_changes: tuple[Change, ...]  # the plan's changes: a runbook step's rollback reads the steps before it

    def run(self, command: str, *, stdin: bytes | None = None, timeout: float = 120) -> str:
        """Run a remote command; its output, or a FleetError when it did not print its @@ marker."""
        ...

    def run_unchecked(self, command: str, *, timeout: float) -> None:
        """Run a remote command for its effect alone (rollback); TransportError when unreachable."""
        ...

    def run_on(self, host: str, command: str, *, timeout: float = 120) -> str:
        """`run` on another host of the plan (a move's gate asks the source and the target)."""
        ...

    def write(self, path: str, text: str, *, mode: str, owner: str | None, group: str | None,
              keep_keys: tuple[str, ...] = ()) -> None:
        """Replace `path` atomically with `text`, the old file backed up for rollback."""
        ...

    def backed_up(self, paths: Iterable[str]) -> None:
        """Files this run replaced or removed, with a backup, outside `write`."""
        ...

    def written(self) -> list[str]:
        """Every file this run backed up on this host so far."""
        ...

    def service(self, name: str | None) -> Service:
        """The declared service a change names; FleetError when it is no longer declared."""
        ...


@dataclass
class HostDiff:
    """One host's diff in progress.  Resources add changes in the registry's order and leave
    word for later ones: which units' files are rewritten, which other files are written."""

    desired: Desired
    state: HostState
    secrets: Mapping[tuple[str, str], str]
    specs: Mapping[Action, ActionSpec]
    prune: bool  # pruning asked for (not --no-prune)
    whole: bool  # every host of the fleet observed: make-before-break can be checked
    problems: list[str]  # fleet-wide: things fleet cannot fix
    notes: list[str]  # fleet-wide: things reported, deliberately not changed
    cache: dict[str, Any]  # per diff(), across hosts: a resource's memo
    changes: list[Change] = field(default_factory=list)
    rewritten_units: set[str] = field(default_factory=set)  # units whose own files change
    written_paths: set[str] = field(default_factory=set)  # other files written (env files)
    reload_needed: bool = False  # a change so far needs systemd to re-read unit files

    @property
    def host(self) -> str:
        return self.state.host

    def add(self, change: Change) -> None:
        self.changes.append(change)
        if self.specs[change.action].needs_reload:
            self.reload_needed = True


class Resource:
    """One kind of resource.  Subclasses set `kind` and `actions` and override what they do."""

    kind: ClassVar[str] = ""
    actions: ClassVar[Mapping[Action, ActionSpec]] = {}
    # Which observed kinds of change (fleet/audit.py) a journaled step of each action can explain.
    explained: ClassVar[Mapping[Action, frozenset[ObservedKind]]] = {}
    # Diffed service by service, together with the adjacent per-service resources of the registry,
    # so that one service's changes stay together in the plan.
    per_service: ClassVar[bool] = False
    # The NAME of its `@@NAME [ARG]` sections in the collection output; "" when it has none (it
    # reads what the facts and units sections report).
    section: ClassVar[str] = ""
    # Fields of its changes that a saved plan may hold otherwise than the plan computed now (a
    # move's gate answers at plan time): left out of the saved plan's verification.
    volatile_fields: ClassVar[frozenset[str]] = frozenset()

    # -- collection (fleet/collect/) --------------------------------------------------------

    def to_collect(self, desired: Desired, host: str) -> Any:
        """What this kind looks at on `host`, as plain data for `script`; empty: nothing."""
        return None

    def script(self, what: Any) -> str:
        """Its part of the one remote script (POSIX sh, every name quoted): prints its sections."""
        return ""

    def parser(self, host: str) -> SectionParser:
        """A parser for its sections in one host's output."""
        raise NotImplementedError(f"{self.kind} prints no section")

    # -- status (fleet/status.py, and so fleet audit) ---------------------------------------

    def notes(self, state: HostState, unit: str) -> list[str]:
        """What this kind observed about `unit` on the host, shown in its status cell (and so in
        `fleet audit`): short phrases, e.g. `has drop-ins: override.conf sha256:1a2b3c4d`."""
        return []

    def problems(self, state: HostState, service: Service) -> list[Problem]:
        """What this kind found wrong with `service`, declared on the host (e.g. a failed database
        cluster behind an `active/exited` parent unit)."""
        return []

    # -- diff -------------------------------------------------------------------------------

    def diff_host(self, ctx: HostDiff) -> None:
        """Add this kind's changes for the host (when not per_service)."""

    def diff_service(self, ctx: HostDiff, service: Service) -> None:
        """Add this kind's changes for one service declared on the host (when per_service)."""

    def implied(self, ctx: HostDiff) -> None:
        """Add the changes that the host's other changes imply (after every resource diffed it)."""

    # -- ordering (fleet/graph.py) ----------------------------------------------------------

    def affects(self, change: Change, desired: Desired) -> Iterable[str]:
        """The units on the change's host whose start or restart must come after it."""
        return ()

    # -- plan file --------------------------------------------------------------------------

    def load(self, action: Action, fields: Mapping[str, Any]) -> Payload:
        """The payload of a change read from a plan file (its flat fields); PayloadError when
        the fields are not of this action's shape.  By default: none, every field empty."""
        empty(fields, "diff", "keys", "content_hash", "remove_files", "steps", "meta")
        return None

    def problem(self, change: Change) -> str | None:
        """Why a loaded change's target or payload must not reach a host, or None."""
        return None

    # -- apply ------------------------------------------------------------------------------

    def check_content(self, change: Change, desired: Desired, secrets: Mapping[tuple[str, str], str]) -> str | None:
        """Why what apply would write now differs from what the plan showed, or None."""
        return None

    def execute(self, change: Change, step: Execution) -> None:
        raise FleetError(f"fleet cannot carry out {change.action} (no resource executes it)")

    def rollback(self, change: Change, step: Execution) -> str:
        """After `change` failed: put its host back as it was; what was done, or ""."""
        return ""

    # -- journal ----------------------------------------------------------------------------

    def sentence(self, step: StepView) -> str:
        """The past-tense phrase `fleet log` shows: `enabled X (was disabled)`."""
        return f"{self.actions[Action(step.action)].past} {step.target}" + was(step.before)

    # -- plan text --------------------------------------------------------------------------

    def symbol(self, change: Change) -> str:
        return self.actions[change.action].symbol

    def bucket(self, change: Change) -> str:
        return self.actions[change.action].bucket

    def details(self, change: Change) -> list[Detail]:
        """The lines the plan text shows under the change, as (style, text)."""
        return []

    # -- audit ------------------------------------------------------------------------------

    def explains(self, step: AuditStep, kind: ObservedKind, key: str) -> bool:
        """Could a journaled step of this kind's action have made an observed change of `kind`?"""
        return kind in self.explained.get(Action(step.action), frozenset())


# ------------------------------------------------------------------ helpers the kinds share


def was(before: str) -> str:
    return f" (was {before})" if before else ""


def empty(fields: Mapping[str, Any], *names: str) -> None:
    """Fields an action never carries must be absent or empty in a plan file."""
    if any(fields.get(n) not in (None, "", [], {}) for n in names):
        raise PayloadError(f"carries {', '.join(n for n in names if fields.get(n) not in (None, '', [], {}))}")


def text(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise PayloadError(f"its {name} is not text")
    return value


def texts(fields: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = fields.get(name, [])
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise PayloadError(f"its {name} is not a list of texts")
    return tuple(value)


def hash_problem(content_hash: str) -> str | None:
    return "its content_hash is not a sha256" if content_hash and not _SHA256.fullmatch(content_hash) else None


def removal_problem(files: Iterable[str], unit: str) -> str | None:
    """Every file a change removes must be one of the unit's own (units.removable_unit_file)."""
    refused = [p for p in files if not removable_unit_file(p, unit)]
    if refused:
        return f"would remove {', '.join(map(repr, refused))}, which is not a file of {unit} fleet may remove"
    return None


def refuse_removals(files: Iterable[str], unit: str) -> None:
    """The executor's last line of defence before `rm` on a host (the diff never plans these)."""
    refused = [p for p in files if not removable_unit_file(p, unit)]
    if refused:
        raise FleetError(f"refusing to remove {', '.join(map(repr, refused))}: not a file of {unit} in {UNIT_DIR}")


def report_refused(ctx: HostDiff, unit: str, refused: tuple[str, ...]) -> None:
    """Files a host reports for a unit that fleet may not remove: said, never touched."""
    if refused:
        ctx.problems.append(f"on {ctx.host}, {unit} is reported with unit file(s) {', '.join(repr(p) for p in refused)}"
                            f": not a plain file of that unit in {UNIT_DIR} or its {unit}.d/ directory, so fleet "
                            "never removes them; look at the host: what it reports is not what systemd writes")
