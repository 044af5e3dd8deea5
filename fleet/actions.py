"""The action vocabulary: what a plan can ask of a host, and the typed change that carries it.

`Action` names every step fleet can plan; `Phase` is where a step sits on its host (writes,
then systemd's reload, then enabling, then running, then pruning).  A `Change` is one step on
one host.  What only some steps carry travels as a typed payload of the resource that owns the
action (fleet/resources/): a unit file's diff and hash, an env file's key changes and owner,
a prune's steps.  Steps that need nothing more (reload, enable, start, restart) carry None.

A plan file keeps the flat shape it always had: every change lists the same fields in the same
order (`Change.as_dict`), each payload filling in its own and the rest left empty, so a plan
written before this vocabulary existed reads the same, byte for byte.  Reading a change back
from a plan file is the owning resource's job (it validates its payload); this module only
knows the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple


class Action(StrEnum):
    """Every step a plan can hold.  The value is what plan files, the journal and `fleet log`
    show.  (systemd's stop and disable are steps of a prune, never actions of their own.)"""

    WRITE_UNIT = "write-unit"
    WRITE_ENV = "write-env"
    WRITE_DROPIN = "write-drop-in"
    REMOVE_DROPIN = "remove-drop-in"  # an undeclared drop-in of a service that declares its drop-ins
    DAEMON_RELOAD = "daemon-reload"
    ENABLE = "enable"
    START = "start"
    RESTART = "restart"
    PRUNE = "prune"  # stop + disable + remove the unit file if fleet may remove it
    # A declared move's runbook (fleet/runbook.py): gates and actions on the data store itself.
    MOVE_CHECK = "move-check"  # the data gates, asked again of the hosts: standby of the source, caught up
    MOVE_QUIET = "move-quiet"  # every Sidekiq unit of the run sent TSTP; gate: its heartbeat says quiet
    MOVE_DRAINED = "move-drained"  # quiet Sidekiq's jobs in flight done; jobs still queued 0 or accepted
    MOVE_READ_ONLY = "move-read-only"  # the source refuses writes; open write sessions ended
    MOVE_CAUGHT_UP = "move-caught-up"  # the standby has replayed the read-only source's last WAL position
    MOVE_PROMOTE = "move-promote"  # the standby promoted; gate: it is out of recovery
    MOVE_STOP_SOURCE = "move-stop-source"  # the old server stopped, after every (re)start of the plan


class Phase(IntEnum):
    """Where a step sits among a host's steps; the ordering rules in fleet/graph.py are written
    over phases, never over actions."""

    WRITE = 1  # files on the host: unit files, drop-ins, env files
    RELOAD = 2  # systemd reads the unit files again
    ENABLE = 3  # a unit is enabled (starts at boot)
    RUN = 4  # a unit is started or restarted, behind its health gate
    PRUNE = 5  # an undeclared unit is stopped, disabled, removed: after every run (make-before-break)


class ObservedKind(StrEnum):
    """Kinds of change an audit sees between two observations (fleet/audit.py); each resource
    says which of them a step of its actions can explain."""

    UNIT_APPEARED = "unit-appeared"
    UNIT_DISAPPEARED = "unit-disappeared"
    UNIT_TEXT = "unit-text"
    UNIT_STATE = "unit-state"
    UNIT_ENABLEMENT = "unit-enablement"
    ENV_PRESENCE = "env-presence"
    ENV_KEY = "env-key"
    ENV_META = "env-meta"


# The plan summary's buckets, in the order `fleet plan` names them.  "stop" stays for the plan
# file's shape (its summary always had it) although no action counts there any more.
SUMMARY_BUCKETS = ("install", "change", "start", "restart", "stop", "prune")

KEY_OPS = ("set", "change", "remove")
PRUNE_STEPS = ("stop", "disable", "remove")


class KeyChange(NamedTuple):
    """One env key a write-env sets, changes or removes; values masked when sensitive."""

    key: str
    op: str  # set | change | remove
    before: str
    after: str


@dataclass(frozen=True, slots=True)
class UnitFilePayload:
    """write-unit: the exact text's hash, the diff the reviewer sees, and the files (drop-ins
    fleet did not write) removed with it."""

    content_hash: str  # sha256 of the exact text to write
    diff: str = ""  # unified diff, masked
    remove_files: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {"diff": self.diff, "content_hash": self.content_hash, "remove_files": list(self.remove_files)}


@dataclass(frozen=True, slots=True)
class EnvFilePayload:
    """write-env: the keys that change (masked), the hash of what is written (over secret
    fingerprints, never values), and which declared file with which owner and mode."""

    keys: tuple[KeyChange, ...]
    content_hash: str
    name: str  # the env file's name in the desired state
    owner: str
    group: str
    mode: str

    def fields(self) -> dict[str, Any]:
        return {"keys": [list(k) for k in self.keys], "content_hash": self.content_hash,
                "meta": {"group": self.group, "mode": self.mode, "name": self.name, "owner": self.owner}}


@dataclass(frozen=True, slots=True)
class PrunePayload:
    """prune: which of stop, disable, remove, and the files removed; for a unit that runs Sidekiq
    and is stopped, the env file through which its host finds Sidekiq's Redis (the stop then
    waits for its process to leave `processes`).  In the plan file that path is the meta's only
    key, and a prune without it carries no meta, as before."""

    steps: tuple[str, ...]
    remove_files: tuple[str, ...] = ()
    sidekiq_env: str = ""

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"remove_files": list(self.remove_files), "steps": list(self.steps)}
        if self.sidekiq_env:
            out["meta"] = {"sidekiq_env": self.sidekiq_env}
        return out


@dataclass(frozen=True, slots=True)
class MovePayload:
    """A runbook step of a declared move: the two hosts and the clusters (port, unit) it works on,
    as the observation the plan was made from found them."""

    source: str
    target: str
    source_port: int
    target_port: int
    source_unit: str  # the source's cluster unit, e.g. postgresql@15-main.service (stopped last)

    def fields(self) -> dict[str, Any]:
        return {"meta": {"source": self.source, "source_port": str(self.source_port),
                         "source_unit": self.source_unit, "target": self.target,
                         "target_port": str(self.target_port)}}


@dataclass(frozen=True, slots=True)
class QuietPayload:
    """move-quiet, move-drained: the Sidekiq units a move's run quiets, as `(host, unit)` in plan
    order, and the env file through which the step's host (the Sidekiq Redis host) finds
    Sidekiq's Redis.  In the plan file: `steps` holds "HOST UNIT" lines, `meta` the env file."""

    units: tuple[tuple[str, str], ...]
    sidekiq_env: str

    def fields(self) -> dict[str, Any]:
        return {"steps": [f"{h} {u}" for h, u in self.units], "meta": {"sidekiq_env": self.sidekiq_env}}


Payload = UnitFilePayload | EnvFilePayload | PrunePayload | MovePayload | QuietPayload | None


def flat_fields(payload: Payload) -> dict[str, Any]:
    """The payload as the plan file's flat fields, every one present, in the file's order."""
    empty: dict[str, Any] = {"diff": "", "keys": [], "content_hash": "", "remove_files": [], "steps": [], "meta": {}}
    return empty if payload is None else empty | payload.fields()


@dataclass(frozen=True, slots=True, init=False)
class Change:
    """One step on one host.  `before`/`after` are short human texts, masked."""

    host: str
    action: Action
    target: str  # unit name, env file path, or "systemd"
    reason: str
    service: str | None = None
    before: str = ""
    after: str = ""
    payload: Payload = None

    def __init__(self, host: str, action: Action, target: str, reason: str, service: str | None = None,
                 before: str = "", after: str = "", payload: Payload = None) -> None:
        # The __init__ dataclass would make, each field set through its slot's own setter: the
        # generated one of a frozen class calls object.__setattr__ per field, twice the cost, and
        # a bare 1,000-host plan makes 62,000 changes (reading its file, as many again).
        # tests/unit/test_plan.py holds it to the fields, their order and defaults.
        _set_host(self, host)
        _set_action(self, action)
        _set_target(self, target)
        _set_reason(self, reason)
        _set_service(self, service)
        _set_before(self, before)
        _set_after(self, after)
        _set_payload(self, payload)

    @property
    def id(self) -> str:
        # `_value_`: the member's value as a plain attribute; `.value` goes through enum's
        # descriptor, three times the cost, and a 62,000-change plan asks for ids ~200,000 times
        return f"{self.host}:{self.action._value_}:{self.target}"

    def fields(self) -> dict[str, Any]:
        """The payload's fields as a plan file holds them (see flat_fields)."""
        return flat_fields(self.payload)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "host": self.host, "action": self.action._value_, "target": self.target,
                "service": self.service, "reason": self.reason, "before": self.before, "after": self.after,
                **self.fields()}


_set_host, _set_action, _set_target, _set_reason, _set_service, _set_before, _set_after, _set_payload = (
    vars(Change)[name].__set__
    for name in ("host", "action", "target", "reason", "service", "before", "after", "payload"))
