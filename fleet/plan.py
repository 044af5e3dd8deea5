"""The plan: the diff as reviewable, saveable data, ordered by the graph.

A plan carries what it was computed from — a hash of the desired state and a fingerprint per
observed host — so that applying it later can refuse a stale plan.  It never holds a secret:
env file changes carry masked values and fingerprints only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from types import GeneratorType
from typing import Any

from fleet.diff import (
    ACTIONS,
    DAEMON_RELOAD,
    ENABLE,
    PRUNE,
    RESTART,
    START,
    STOP,
    WRITE_ENV,
    WRITE_UNIT,
    Change,
    diff,
)
from fleet.errors import FleetError
from fleet.graph import order
from fleet.model import Desired, HostResult, HostState
from fleet.textutil import sha256_hex

PLAN_FORMAT = 1


class PlanFileError(FleetError):
    pass


@dataclass(frozen=True)
class Plan:
    fleet: str
    created_at: str  # ISO 8601, UTC
    desired_hash: str
    hosts: tuple[str, ...]  # the hosts this plan covers (after --limit)
    fingerprints: dict[str, str]  # host -> fingerprint of the observed state the plan is based on
    changes: tuple[Change, ...]
    deps: dict[str, tuple[str, ...]]
    waves: tuple[tuple[str, ...], ...]
    unknown: tuple[tuple[str, str, str], ...] = ()  # (host, kind, message): could not be observed
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    lab: bool = False
    format: int = PLAN_FORMAT

    @property
    def complete(self) -> bool:
        """Every covered host was observed.  Apply refuses an incomplete plan."""
        return not self.unknown

    @property
    def empty(self) -> bool:
        return not self.changes

    def change(self, change_id: str) -> Change:
        return next(c for c in self.changes if c.id == change_id)

    def summary(self) -> dict[str, int]:
        n = Counter(c.action for c in self.changes)
        new_units = sum(1 for c in self.changes if c.action == WRITE_UNIT and c.before == "absent")
        new_envs = sum(1 for c in self.changes if c.action == WRITE_ENV and c.before == "absent")
        return {
            "install": new_units + new_envs,
            "change": n[WRITE_UNIT] + n[WRITE_ENV] - new_units - new_envs + n[ENABLE] + n[DAEMON_RELOAD],
            "start": n[START],
            "restart": n[RESTART],
            "stop": n[STOP],
            "prune": n[PRUNE],
        }

    def to_dict(self) -> dict[str, Any]:
        return self._data(list(self._change_dicts()))

    def _data(self, changes: Iterable[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": self.format, "fleet": self.fleet, "created_at": self.created_at,
            "desired_hash": self.desired_hash, "hosts": list(self.hosts), "fingerprints": self.fingerprints,
            "complete": self.complete, "lab": self.lab, "summary": self.summary(),
            "unknown": [{"host": h, "kind": k, "message": m} for h, k, m in self.unknown],
            "notes": list(self.notes), "problems": list(self.problems),
            "changes": changes,
            "waves": [list(w) for w in self.waves],
        }

    def _change_dicts(self) -> Iterator[dict[str, Any]]:
        return (c.as_dict() | {"deps": list(self.deps.get(c.id, ()))} for c in self.changes)

    def to_json(self) -> str:
        """`json.dumps(self.to_dict(), indent=2)`, the same text, written change by change."""
        return indented_json(self._data(self._change_dicts())) + "\n"

    @property
    def plan_id(self) -> str:
        """Content hash: the same plan saved twice has the same id."""
        return sha256_hex(json.dumps(self.to_dict(), sort_keys=True))[:16]


_string = encode_basestring_ascii  # json's own C function for a string, as json.dumps writes it


def indented_json(value: Any, newline: str = "\n") -> str:
    """`json.dumps(value, indent=2)`, the same text, at C speed for the strings.  json's own
    indenting encoder is written in Python and, given a plan's whole dict, keeps every change's
    dict alive at once: for a first install of 1,000 hosts (62,000 changes, 55 MB) it took longer
    than planning.  A generator stands for a list whose items are made and written one by one.
    `newline` is a newline and the indentation of the line `value` starts on."""
    if type(value) is str:
        return _string(value)
    if type(value) is dict and (not value or set(map(type, value)) == {str}):
        if not value:
            return "{}"
        inner = newline + "  "
        return "{" + inner + ("," + inner).join([
            _string(k) + ": " + (_string(v) if type(v) is str else indented_json(v, inner))
            for k, v in value.items()]) + newline + "}"
    if type(value) in (list, tuple, GeneratorType):
        inner = newline + "  "
        items = [_string(v) if type(v) is str else indented_json(v, inner) for v in value]
        return "[" + inner + ("," + inner).join(items) + newline + "]" if items else "[]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return int.__repr__(value)
    # Anything else (floats, subclasses, dicts with other keys, what json refuses): json itself;
    # its lines only need this line's indentation, since no JSON string holds a raw newline.
    return json.dumps(value, indent=2).replace("\n", newline)


def plan_from_json(text: str, source: str = "plan") -> Plan:
    try:
        d = json.loads(text)
    except RecursionError as e:
        raise PlanFileError(f"{source} nests too deeply to be a plan",
                            hint="pass a file written by `fleet plan -o FILE`") from e
    except ValueError as e:
        raise PlanFileError(f"{source} is not JSON: {e}", hint="pass a file written by `fleet plan -o FILE`") from e
    if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise PlanFileError(f"{source}: unsupported plan format {got!r} (this fleet reads format {PLAN_FORMAT})",
                            hint="recompute it with `fleet plan -o FILE`")
    try:
        changes = tuple(Change.from_dict(c) for c in d["changes"])
        _validate(changes, d, source)
        return Plan(
            fleet=str(d["fleet"]), created_at=str(d["created_at"]), desired_hash=str(d["desired_hash"]),
            hosts=tuple(d["hosts"]), fingerprints={str(k): str(v) for k, v in d["fingerprints"].items()},
            changes=changes, deps={c["id"]: tuple(c.get("deps", ())) for c in d["changes"]},
            waves=tuple(tuple(w) for w in d["waves"]),
            unknown=tuple((u["host"], u["kind"], u["message"]) for u in d.get("unknown", ())),
            notes=tuple(d.get("notes", ())), problems=tuple(d.get("problems", ())), lab=bool(d.get("lab", False)),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise PlanFileError(f"{source}: plan is incomplete or damaged (missing {e})",
                            hint="recompute it with `fleet plan -o FILE`") from e


def _validate(changes: tuple[Change, ...], d: dict[str, Any], source: str) -> None:
    """A plan file is data from disk: check it is whole before anything reads it."""
    texts = [d["hosts"], d.get("notes", []), d.get("problems", []),
             *([u.get("host"), u.get("kind"), u.get("message")] for u in d.get("unknown", []))]
    if not all(isinstance(t, list) and all(isinstance(x, str) for x in t) for t in texts):
        raise PlanFileError(f"{source}: its hosts, notes, problems or unobserved hosts are not all text "
                            "(edited or damaged)", hint="recompute it with `fleet plan -o FILE`")
    ids = {c.id for c in changes}
    waves = [cid for w in d["waves"] for cid in w]
    if sorted(waves) != sorted(ids):
        raise PlanFileError(f"{source}: its waves and its changes do not match (edited or damaged)",
                            hint="recompute it with `fleet plan -o FILE`")
    for c in changes:
        bad_keys = any(len(k) != 4 or k[1] not in ("set", "change", "remove") for k in c.keys)
        if c.action not in ACTIONS or bad_keys or not _texts(c):
            raise PlanFileError(f"{source}: change {c.id[:80]!r} is malformed",
                                hint="recompute it with `fleet plan -o FILE`")
    deps = {c["id"]: c.get("deps", ()) for c in d["changes"]}
    if any(dep not in ids for ds in deps.values() for dep in ds):
        raise PlanFileError(f"{source}: a change depends on one the plan does not contain",
                            hint="recompute it with `fleet plan -o FILE`")


def _texts(c: Change) -> bool:
    """The fields `Change.from_dict` passes through unconverted hold text, as apply reads them
    (a `null` among the files to remove reached the remote script builder as None)."""
    return ((c.service is None or isinstance(c.service, str))
            and all(isinstance(x, str) for x in (*c.remove_files, *c.steps))
            and all(isinstance(k, str) and isinstance(v, str) for k, v in c.meta))


def desired_hash(desired: Desired) -> str:
    data = asdict(desired)
    data.pop("source", None)
    data.pop("hosts_dir", None)
    for h in data["hosts"]:
        h.pop("source", None)
    return sha256_hex(json.dumps(data, sort_keys=True, default=str))


def fingerprint(state: HostState) -> str:
    """What a plan for this host depends on.  Volatile facts (PIDs, timestamps, restart
    counters, load) are left out, so a plan stays valid while nothing relevant changed."""
    units = [
        (u.unit, u.load_state, u.active_state, u.sub_state, u.unit_file_state, list(u.exec_start), u.text_hash,
         u.fragment_path, list(u.drop_in_paths))
        for u in sorted(state.units, key=lambda u: u.unit)
    ]
    envs = [(e.path, e.present, e.mode, e.owner, e.group, list(e.keys), list(e.values), list(e.secrets),
             e.invalid_lines) for e in sorted(state.env_files, key=lambda e: e.path)]
    return sha256_hex(json.dumps([units, envs], sort_keys=True))


def build_plan(desired: Desired, observed: Mapping[str, HostResult], secrets: Mapping[tuple[str, str], str], *,
               prune: bool = True, lab: bool = False, now: datetime | None = None) -> Plan:
    d = diff(desired, observed, secrets, prune=prune)
    deps, waves = order(d.changes, desired)
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Plan(
        fleet=desired.name, created_at=created, desired_hash=desired_hash(desired),
        hosts=tuple(h.name for h in desired.hosts if h.name in observed),
        fingerprints={h: fingerprint(r) for h, r in observed.items() if isinstance(r, HostState)},
        changes=d.changes, deps=deps, waves=waves,
        unknown=tuple((e.host, e.kind, e.message) for e in d.unknown),
        notes=d.notes, problems=d.problems, lab=lab,
    )
