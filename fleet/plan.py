"""The plan: the diff as reviewable, saveable data, ordered by the graph.

A plan carries what it was computed from — a hash of the desired state and a fingerprint per
observed host — so that applying it later can refuse a stale plan.  It never holds a secret:
env file changes carry masked values and fingerprints only.

Two shapes of the same data (docs/plan.md): the plan *document* (`to_dict`, what `--json`
prints: every change an object with every field, format 2) and the plan *file* (`to_json`, what
`-o` writes and `show`/`apply` read: format 3).  The file is compact: each distinct text (a
reason, a unit's diff, an env file's key changes) is stored once in `texts` and referenced by
index from one row per change, dependencies and waves are change indices, and a unit diff's
---/+++ lines, which only name the host and unit, are left for the reader to put back.  A bare
1,000-host plan was 55 MB as a document; as a file it is a few MB.  Reading a file unpacks it
into the document and checks that exactly as before (`plan_from_document`).

In both, and in memory, make-before-break stays symbolic (fleet/graph.py): a prune's deps name
the group `@every-start-and-restart`, listed once in `groups`, instead of every start and
restart of the plan — linear in the changes, where the pairs grew as prunes x runs (552,600 of
577,708 dependencies at 5,000 drift hosts).  A dependency means "after that change", or "after
every change of that group"; `waits_for` spells one change's out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from fleet import moves
from fleet.actions import SUMMARY_BUCKETS, Action, Change, UnitFilePayload
from fleet.config import HOST_NAME, SERVICE_NAME
from fleet.diff import diff
from fleet.errors import FleetError
from fleet.graph import GROUP_NAME, expand_one, order
from fleet.model import Desired, HostResult, HostState
from fleet.resources import runbook, runbook_quiet
from fleet.resources.base import PayloadError
from fleet.resources.registry import BY_ACTION, owner
from fleet.textutil import indented_json, sha256_hex

PLAN_FORMAT = 2  # the plan document's (`--json`); 1 listed make-before-break as pairs
FILE_FORMAT = 3  # the plan file's (`-o`): compact (see the module docstring); 2 had the pairs


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
    deps: dict[str, tuple[str, ...]]  # change id -> the change ids and group names it waits for
    waves: tuple[tuple[str, ...], ...]
    unknown: tuple[tuple[str, str, str], ...] = ()  # (host, kind, message): could not be observed
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    lab: bool = False
    # Made from a kept observation (--observed), not from the hosts as they were: which one.  Such
    # a plan shows what was (or would have been) planned then; it is stale by construction.
    observed: str = ""
    # group name -> its changes, in plan order: a dependency on the group is one on each of them
    # (fleet/graph.py EVERY_RUN: a prune waits for every start and restart of the plan).
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    format: int = PLAN_FORMAT

    @property
    def complete(self) -> bool:
        """Every covered host was observed.  Apply refuses an incomplete plan."""
        return not self.unknown

    @property
    def empty(self) -> bool:
        return not self.changes

    def change(self, change_id: str) -> Change:
        """The change with this id.  Through an index built once per plan: rendering and
        executing look every change up, and a scan per lookup made `fleet plan` quadratic."""
        return self._by_id[change_id]

    @cached_property
    def _by_id(self) -> dict[str, Change]:
        return dict(zip(self._ids, self.changes, strict=True))

    def ids(self) -> tuple[str, ...]:
        """Each change's id, in plan order (a change's id is made anew each time it is asked for:
        the plan file, the text's order and the plan's own indexes ask for 62,000 of them)."""
        return self._ids

    @cached_property
    def _ids(self) -> tuple[str, ...]:
        return tuple([c.id for c in self.changes])

    def waits_for(self, change_id: str) -> tuple[str, ...]:
        """Every change `change_id` waits for, groups spelled out, in plan order (what `deps`
        listed before make-before-break stayed symbolic)."""
        return expand_one(self.deps.get(change_id, ()), self.groups, self._position)

    @cached_property
    def _position(self) -> dict[str, int]:
        return dict(zip(self._ids, range(len(self.changes)), strict=True))

    def summary(self) -> dict[str, int]:
        """How many changes fall in each bucket (install, change, start …), as each resource counts."""
        return dict(self._summary)  # a copy: the plan's own stays as it is

    @cached_property
    def _summary(self) -> dict[str, int]:  # counted once: the text and the file each show it
        counts = Counter(BY_ACTION[c.action].bucket(c) for c in self.changes)
        return {bucket: counts[bucket] for bucket in SUMMARY_BUCKETS}

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
            "groups": {name: list(members) for name, members in self.groups.items()},
            "waves": [list(w) for w in self.waves],
        } | ({"observed": self.observed} if self.observed else {})  # absent otherwise: plan ids stay as they were

    def _change_dicts(self) -> Iterator[dict[str, Any]]:
        return (c.as_dict() | {"deps": list(self.deps.get(c.id, ()))} for c in self.changes)

    def document(self) -> dict[str, Any]:
        """`to_dict()` with its changes made one by one as they are written (a generator), for
        `indented_json`: a 1,000-host plan is never whole in memory as dicts."""
        return self._data(self._change_dicts())

    def document_json(self) -> str:
        """`json.dumps(self.to_dict(), indent=2)`, the same text, written change by change."""
        return indented_json(self.document()) + "\n"

    def to_json(self) -> str:
        """The plan file: `plan_file_text(pack_document(self.to_dict()))`, the same text, made from the
        changes themselves, each distinct payload serialised once."""
        return self._file_text

    @cached_property
    def _file_text(self) -> str:  # made once: `plan -o` writes it and names the plan by its hash
        """`plan_file_text(pack_document(self.to_dict()))`, each row written as JSON here: the part
        of a row that hosts share (action, target … payload) is made once per distinct part, the
        host's index and the deps per change (a bare plan repeats each row's middle per host)."""
        texts: dict[str, int] = {}
        hosts = {h: str(i) for i, h in enumerate(self.hosts)}  # a host -> its index as text
        ids = self._ids
        # each change's position as text, made once: a row's deps and a wave are those texts joined
        # (a bare plan has 140,000 deps), unless one is a group or a change the plan lacks: then
        # each is spelled from the positions (`_position`, made only then), [name] where it is none
        spelled = dict(zip(ids, map(str, range(len(ids))), strict=True))
        payloads: dict[Any, str | None] = {}  # a payload (its key) -> its text, or None: it has none
        middles: dict[tuple[Any, ...], str] = {}  # (action, target … payload key) -> the row's fields 2 to 8
        dense = _DENSE.encode

        def text(value: str | None) -> str:  # a text field: its index in `texts`, None as [null]
            return "[null]" if value is None else str(texts.setdefault(value, len(texts)))

        def placed(refs: Iterable[str]) -> list[Any]:  # positions, or [name] where there is none
            index = self._position
            return [index[d] if d in index else [d] for d in refs]

        deps_of, spell, join, host_of, middle_of = self.deps.get, spelled.__getitem__, ",".join, hosts.get, middles.get
        rows: list[str] = []
        add = rows.append
        for c, cid in zip(self.changes, ids, strict=True):
            key: Any = c.payload
            if isinstance(key, UnitFilePayload):
                lines = diff_header(c.host, c.target)
                key = (key.content_hash, key.remove_files, key.diff[len(lines):]
                       if key.diff.startswith(lines) else (c.host, key.diff))
            whole = (c.action, c.target, c.service, c.reason, c.before, c.after, key)
            middle = middle_of(whole)
            if middle is None:
                fields = [dense(c.action._value_), text(c.target), text(c.service), text(c.reason), text(c.before),
                          text(c.after)]
                if key not in payloads:
                    payloads[key] = _payload_text(c.as_dict())
                payload = payloads[key]
                fields.append("null" if payload is None else text(payload))
                middle = middles[whole] = ",".join(fields)
            h = host_of(c.host)
            deps = deps_of(cid, ())
            try:
                refs_json = join(map(spell, deps))
            except KeyError:  # a group, or a change the plan lacks: not a position, [name]
                refs_json = dense(placed(deps))[1:-1]
            add(f"[{dense([c.host]) if h is None else h},{middle},[{refs_json}]]")
        try:  # each wave its positions' texts joined: no index of 62,000 positions built for them
            waves = ["[" + join(map(spell, w)) + "]" for w in self.waves]
        except KeyError:
            waves = [dense(placed(w)) for w in self.waves]
        groups = {name: placed(members) for name, members in self.groups.items()}
        head = {k: v for k, v in self._data([]).items() if k not in ("format", "changes", "groups", "waves")}
        return _file_text({"format": FILE_FORMAT, **head, "groups": groups},
                          {"texts": list(map(dense, texts)), "changes": rows, "waves": waves})

    @property
    def plan_id(self) -> str:
        """Content hash of the plan file: the same plan saved twice has the same id.  (It hashed
        the plan document once, which at 62,000 changes cost a second of its own.)"""
        return sha256_hex(self.to_json())[:16]


def plan_from_json(text: str, source: str = "plan") -> Plan:
    """A plan file (format 3), checked whole: refused with a PlanFileError naming `source`."""
    hint = "pass a file written by `fleet plan -o FILE`"
    try:
        d = json.loads(text)
    except RecursionError as e:
        raise PlanFileError(f"{source} nests too deeply to be a plan", hint=hint) from e
    except ValueError as e:
        raise PlanFileError(f"{source} is not JSON: {e}", hint=hint) from e
    got = d.get("format") if isinstance(d, dict) else type(d).__name__
    if got in (1, 2):  # a document (format 1 or 2), or the file of an older fleet (1, 2): never read as a file
        raise PlanFileError(f"{source}: plan format {got} is a plan document (`--json`) or a plan file of an older "
                            f"fleet, not a plan file of this fleet (format {FILE_FORMAT})",
                            hint="recompute it with `fleet plan -o FILE`")
    if got != FILE_FORMAT:
        raise PlanFileError(f"{source}: unsupported plan format {got!r} (this fleet reads format {FILE_FORMAT})",
                            hint=hint)
    keys: list[Any] = []
    return plan_from_document(unpack_document(d, source, keys), source, keys)


def plan_from_document(d: dict[str, Any], source: str = "plan", keys: list[Any] | None = None) -> Plan:
    """A plan document (`to_dict`'s shape, as a file unpacks to), checked before anything reads it.
    `keys` (from `unpack_document`): per change, what its payload is a function of, or None; the
    changes with the same key share one loaded payload (a bare plan's repeat per host).  Those of
    a diff body's key share it with the diff their own: a unit file's payload is its diff as read,
    so it is shared only when the one loaded holds the diff verbatim."""
    try:
        loaded: dict[Any, tuple[Action, Any]] = {}
        changes = tuple(_change(c, source, loaded, k) for c, k in zip(d["changes"], keys, strict=True)) \
            if keys is not None else tuple(_change(c, source) for c in d["changes"])
        _validate(changes, d, source)
        _validate_names(changes, d, source)
        return Plan(
            fleet=str(d["fleet"]), created_at=str(d["created_at"]), desired_hash=str(d["desired_hash"]),
            hosts=tuple(d["hosts"]), fingerprints={str(k): str(v) for k, v in d["fingerprints"].items()},
            changes=changes, deps={c["id"]: tuple(c.get("deps", ())) for c in d["changes"]},
            waves=tuple(tuple(w) for w in d["waves"]),
            unknown=tuple((u["host"], u["kind"], u["message"]) for u in d.get("unknown", ())),
            notes=tuple(d.get("notes", ())), problems=tuple(d.get("problems", ())), lab=bool(d.get("lab", False)),
            observed=_observed(d.get("observed", ""), source),
            groups={name: tuple(members) for name, members in d.get("groups", {}).items()},
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise PlanFileError(f"{source}: plan is incomplete or damaged (missing {e})",
                            hint="recompute it with `fleet plan -o FILE`") from e


# ------------------------------------------------------------------------------ the plan file

# A change's row in a plan file: these fields of its document, in this order, then its deps, then
# its id when it is not the one its host, action and target make.  A text field is an index into
# `texts`; any other value travels as a one-item list (`[null]`, `[5]`), so it is never misread.
ROW_FIELDS = ("host", "action", "target", "service", "reason", "before", "after")
_PAYLOAD_EMPTY: dict[str, Any] = {"diff": "", "keys": [], "content_hash": "", "remove_files": [], "steps": [],
                                  "meta": {}}
_DIFF_BODY = "diff_body"  # a diff whose ---/+++ lines are the standard ones, stored without them


def diff_header(host: str, unit: str) -> str:
    """The ---/+++ lines of a unit's diff (fleet/resources/unit_file.py makes them)."""
    return f"--- {host}:{unit} (now)\n+++ {host}:{unit} (desired)\n"


def pack_document(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A plan document as its plan file holds it (see the module docstring).  Linear: one pass
    over the changes, every lookup through a dict."""
    texts: dict[str, int] = {}
    hosts = {h: i for i, h in enumerate(doc["hosts"])} if isinstance(doc["hosts"], list) else {}
    changes = doc["changes"] if isinstance(doc["changes"], list) else list(doc["changes"])
    index = {c["id"]: i for i, c in enumerate(changes)}

    def text(value: Any) -> Any:
        return texts.setdefault(value, len(texts)) if type(value) is str else [value]

    def ref(cid: Any, table: Mapping[Any, int]) -> Any:
        return table[cid] if type(cid) is str and cid in table else [cid]

    rows = []
    for c in changes:
        host, target = c["host"], c["target"]
        row: list[Any] = [hosts[host] if type(host) is str and host in hosts else [host], c["action"],
                          *(text(c[k]) for k in ROW_FIELDS[2:])]
        payload = _payload_text(c)
        row.append(None if payload is None else text(payload))
        row.append([ref(d, index) for d in c.get("deps", [])])
        if c["id"] != f"{host}:{c['action']}:{target}":
            row.append(text(c["id"]))
        rows.append(row)
    waves = [[ref(cid, index) for cid in w] for w in doc["waves"]]
    groups = doc.get("groups", {})
    groups = {name: [ref(cid, index) for cid in members] for name, members in groups.items()} \
        if isinstance(groups, dict) else groups
    head = {k: v for k, v in doc.items() if k not in ("format", "changes", "groups", "waves")}
    return {"format": FILE_FORMAT, **head, "groups": groups, "texts": list(texts), "changes": rows, "waves": waves}


_NOT_PAYLOAD = frozenset({"id", "deps", *ROW_FIELDS})
_ABSENT = object()


def _payload_text(c: Mapping[str, Any]) -> str | None:
    """A change's fields beyond its row, those not empty, as one JSON text (None: none); a diff
    with the standard ---/+++ lines as its body alone."""
    payload = {k: v for k, v in c.items() if k not in _NOT_PAYLOAD and v != _PAYLOAD_EMPTY.get(k, _ABSENT)}
    diff, host, target = payload.get("diff"), c.get("host"), c.get("target")
    if type(diff) is str and type(host) is str and type(target) is str \
            and diff.startswith(lines := diff_header(host, target)):
        del payload["diff"]
        payload[_DIFF_BODY] = diff[len(lines):]
    return json.dumps(payload, sort_keys=True, ensure_ascii=False) if payload else None


_DENSE = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options makes one per call


def plan_file_text(packed: Mapping[str, Any]) -> str:
    """A packed plan as text: JSON with one text, one change and one wave per line, so that a plan
    file reads (and diffs) line by line."""
    return _file_text({k: v for k, v in packed.items() if k not in _LISTED},
                      {k: list(map(_DENSE.encode, packed[k])) for k in _LISTED})


_LISTED = ("texts", "changes", "waves")  # the members of a plan file written one item per line


def _file_text(head: Mapping[str, Any], listed: Mapping[str, list[str]]) -> str:
    """`plan_file_text` of a packed plan given as its other members and its listed members' items,
    each already JSON."""
    def lines(items: list[str]) -> str:
        return "[\n" + ",\n".join(items) + "\n]" if items else "[]"

    out = [f"{json.dumps(k)}: {_DENSE.encode(v)}" for k, v in head.items()]
    out += [f'"{k}": {lines(listed[k])}' for k in _LISTED]
    return "{\n" + ",\n".join(out) + "\n}\n"


def unpack_document(d: dict[str, Any], source: str, keys: list[Any] | None = None) -> dict[str, Any]:
    """The plan document a plan file holds; a PlanFileError naming `source` and the first thing
    out of shape (an index out of range, a row too short).  Linear: each distinct payload is
    parsed once.  Given `keys`, appends to it per change what its loaded payload is a function of
    — (action, payload text index), or (action, payload text index, "diff_body") for a payload
    whose diff is a body stored once under ---/+++ lines that name the host — or None when that is
    not known (a payload or action given as a value): `plan_from_document` loads each once."""
    def bad(what: str) -> PlanFileError:
        return PlanFileError(f"{source}: {what} (edited or damaged)", hint="recompute it with `fleet plan -o FILE`")

    texts, rows, hosts, waves = d.get("texts"), d.get("changes"), d.get("hosts"), d.get("waves")
    for name, value in (("texts", texts), ("changes", rows), ("hosts", hosts), ("waves", waves)):
        if not isinstance(value, list):
            raise bad(f"its {name} is not a list")
    assert isinstance(texts, list) and isinstance(rows, list) and isinstance(hosts, list) and isinstance(waves, list)
    n_texts, n_hosts = len(texts), len(hosts)

    def text(value: Any, where: str, n: int) -> Any:
        if type(value) is int and 0 <= value < n_texts:
            return texts[value]
        if type(value) is list and len(value) == 1:
            return value[0]
        raise bad(f"change {n}'s {where} is {str(value)[:40]!r}, neither a text's index nor a value")

    # payload text index -> (its fields but a diff body, the diff body or None): parsed once
    parsed: dict[int, tuple[dict[str, Any], Any]] = {}
    none: tuple[dict[str, Any], Any] = ({}, None)

    def payload_of(value: Any, n: int) -> tuple[dict[str, Any], Any]:
        if value is None:
            return none
        if type(value) is int and value in parsed:
            return parsed[value]
        raw = text(value, "payload", n)
        try:
            payload = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            raise bad(f"change {n}'s payload is not JSON") from None
        if not isinstance(payload, dict):
            raise bad(f"change {n}'s payload is not an object")
        payload = dict(payload)
        out = (payload, payload.pop(_DIFF_BODY, None))
        if type(value) is int:
            parsed[value] = out
        return out

    def field(value: Any, where: str, n: int) -> Any:  # text(), its common case inline
        return texts[value] if type(value) is int and 0 <= value < n_texts else text(value, where, n)

    # A row's fields but its host, deps and id (action, target … payload: "its middle") are the
    # same for every host of a service in a bare plan: read and checked the first time, then
    # copied.  Keyed by value and type (JSON's `true` is not the index 1) when all are plain.
    seen: dict[tuple[Any, ...], tuple[dict[str, Any], Any, Any, Any]] = {}  # middle -> (change, body, key, target)
    changes: list[dict[str, Any]] = []
    for n, row in enumerate(rows):
        if type(row) is not list or len(row) not in (9, 10):
            raise bad(f"change {n} is not a row of 9 or 10 fields")
        h = row[0]
        host = hosts[h] if type(h) is int and 0 <= h < n_hosts else text(h if type(h) is list else None, "host", n)
        middle = (*row[1:8], *map(type, row[1:8]))
        try:
            known = seen.get(middle)
        except TypeError:  # a field given as a list value: not shared, read as it comes
            known, middle = None, ()
        if known is not None:
            c, body, key, target = known
            c = c.copy()
            if body is not None:
                if type(host) is not str:
                    raise bad(f"change {n}'s diff is not text")
                c["diff"] = diff_header(host, target) + body
            if keys is not None:
                keys.append(key)
            c["id"] = field(row[9], "id", n) if len(row) == 10 else f"{host}:{c['action']}:{target}"
            c["host"] = host
            c["deps"] = row[8]
            changes.append(c)
            continue
        action, target = row[1], field(row[2], "target", n)
        payload, body = payload_of(row[7], n)
        if body is not None:
            if not all(type(x) is str for x in (body, host, target)):
                raise bad(f"change {n}'s diff is not text")
            payload = payload | {"diff": diff_header(host, target) + body}
        if keys is not None:
            p = row[7]
            keys.append(None if type(action) is not str
                        else (action, p) if body is None and (p is None or type(p) is int)
                        else (action, p, _DIFF_BODY) if body is not None and type(p) is int else None)
        cid = field(row[9], "id", n) if len(row) == 10 else f"{host}:{action}:{target}"
        changes.append({"id": cid, "host": host, "action": action, "target": target,
                        "service": field(row[3], "service", n), "reason": field(row[4], "reason", n),
                        "before": field(row[5], "before", n), "after": field(row[6], "after", n),
                        "diff": "", "keys": [], "content_hash": "", "remove_files": [], "steps": [], "meta": {},
                        **payload, "deps": row[8]})
        if middle:
            seen[middle] = (changes[-1], body, keys[-1] if keys is not None else None, target)
    ids = [c["id"] for c in changes]
    n_ids = len(ids)

    def change_id(value: Any, where: str) -> Any:
        if type(value) is int and 0 <= value < n_ids:
            return ids[value]
        if type(value) is list and len(value) == 1:
            return value[0]
        raise bad(f"{where} names {str(value)[:40]!r}, neither a change's index nor an id")

    for n, c in enumerate(changes):
        if type(c["deps"]) is not list:
            raise bad(f"change {n}'s deps are not a list")
        c["deps"] = [ids[x] if type(x) is int and 0 <= x < n_ids else change_id(x, f"change {n}'s deps")
                     for x in c["deps"]]
    groups = d.get("groups")
    if not isinstance(groups, dict) or not all(isinstance(m, list) for m in groups.values()):
        raise bad("its groups are not a table of lists")
    out = {k: v for k, v in d.items() if k not in ("texts", "changes", "groups", "waves")}
    return out | {"format": PLAN_FORMAT, "changes": changes,
                  "groups": {name: [change_id(x, f"group {str(name)[:40]!r}") for x in members]
                             for name, members in groups.items()},
                  "waves": [[change_id(x, "a wave") for x in w] if isinstance(w, list) else w for w in waves]}


def _observed(value: object, source: str) -> str:
    if not isinstance(value, str):
        _refuse(source, "its `observed` is not text")
    return str(value)


def _change(d: Mapping[str, Any], source: str, loaded: dict[Any, tuple[Action, Any]] | None = None,
            key: Any = None) -> Change:
    """One change of a plan file; its payload is read (and its shape checked) by the resource
    that owns its action — once per `key` (see `plan_from_document`): a resource's `load` reads
    the payload fields alone, and the changes of one key have the same."""
    host, value, target, reason = str(d["host"]), d["action"], str(d["target"]), str(d["reason"])
    service = d.get("service")
    try:
        if service is not None and not isinstance(service, str):
            Action(value)  # an unknown action is named first, as before
            raise PayloadError("its service is not text")
        if loaded is not None and key is not None and key in loaded:
            action, payload = loaded[key]
            if len(key) == 3:  # the unit diff's body is shared, its ---/+++ lines are this host's
                payload = UnitFilePayload(payload.content_hash, diff=d["diff"], remove_files=payload.remove_files)
        else:
            action = Action(value)
            payload = owner(action).load(action, d)
            if loaded is not None and key is not None and (
                    len(key) == 2 or type(payload) is UnitFilePayload and payload.diff == d["diff"]):
                loaded[key] = (action, payload)  # a diff: shared only where the payload is the diff, verbatim
    except (ValueError, TypeError) as e:  # PayloadError, or an action this fleet does not know
        raise PlanFileError(f"{source}: change {f'{host}:{value}:{target}'[:80]!r} is malformed ({e})",
                            hint="recompute it with `fleet plan -o FILE`") from e
    return Change(host, action, target, reason, service, before=str(d.get("before", "")),
                  after=str(d.get("after", "")), payload=payload)


def _validate(changes: tuple[Change, ...], d: dict[str, Any], source: str) -> None:
    """A plan file is data from disk: check it is whole before anything reads it."""
    texts = [d["hosts"], d.get("notes", []), d.get("problems", []),
             *([u.get("host"), u.get("kind"), u.get("message")] for u in d.get("unknown", []))]
    if not all(isinstance(t, list) and all(isinstance(x, str) for x in t) for t in texts):
        raise PlanFileError(f"{source}: its hosts, notes, problems or unobserved hosts are not all text "
                            "(edited or damaged)", hint="recompute it with `fleet plan -o FILE`")
    ids = {c.id for c in changes}
    waves = [cid for w in d["waves"] for cid in w]
    # each change in exactly one wave: as sets when all are ids (sorting 62,000 ids cost 0.06 s)
    if not (len(waves) == len(ids) and set(waves) == ids if all(type(w) is str for w in waves)
            else sorted(waves) == sorted(ids)):
        raise PlanFileError(f"{source}: its waves and its changes do not match (edited or damaged)",
                            hint="recompute it with `fleet plan -o FILE`")
    groups = d.get("groups", {})
    if not isinstance(groups, dict) or not all(
            isinstance(name, str) and GROUP_NAME.fullmatch(name) and isinstance(members, list)
            and all(isinstance(m, str) and m in ids for m in members) for name, members in groups.items()):
        raise PlanFileError(f"{source}: its groups are not named `@name` or list changes the plan does not contain "
                            "(edited or damaged)", hint="recompute it with `fleet plan -o FILE`")
    deps = {c["id"]: c.get("deps", ()) for c in d["changes"]}
    if any(dep not in ids and dep not in groups for ds in deps.values() for dep in ds):
        raise PlanFileError(f"{source}: a change depends on one the plan does not contain",
                            hint="recompute it with `fleet plan -o FILE`")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _validate_names(changes: tuple[Change, ...], d: dict[str, Any], source: str) -> None:
    """Every name and path in a plan file passes the rules `fleet check` applies to the desired
    state (and removable_unit_file for files to remove), so that neither `fleet show` nor
    `fleet apply` reads a name that could be shell syntax, a path that climbs, or a line break."""
    hosts = [str(h) for h in d["hosts"]]
    bad_host = next((h for h in hosts if not HOST_NAME.fullmatch(h)), None)
    if not hosts or bad_host is not None:
        _refuse(source, f"its host list is empty or names {bad_host!r}, which is not a host name" if hosts
                else "it covers no host")
    for h, fp in d["fingerprints"].items():
        if h not in hosts or not isinstance(fp, str) or not _SHA256.fullmatch(fp):
            _refuse(source, f"its fingerprint for {h!r} is not a sha256 of a host it covers")
    for u in d.get("unknown", ()):
        if u["host"] not in hosts:
            _refuse(source, f"it names {u['host']!r} as unknown, a host it does not cover")
    covered = set(hosts)  # a set: one lookup per change, not a scan of the hosts
    for c in changes:
        problem = _change_problem(c, covered)
        if problem:
            _refuse(source, f"change {c.id!r}: {problem}")


def _change_problem(c: Change, hosts: set[str] | list[str]) -> str | None:
    if c.host not in hosts:
        return f"host {c.host!r} is not one the plan covers"
    if c.service is not None and not SERVICE_NAME.fullmatch(c.service):
        return f"service name {c.service!r} is not one `fleet check` accepts"
    return owner(c.action).problem(c)


def _refuse(source: str, what: str) -> None:
    raise PlanFileError(f"{source}: {what} (edited or damaged)", hint="recompute it with `fleet plan -o FILE`")


# What a change carries, in the order a difference is named: first what drives execution, then
# what the reviewer read.
CHANGE_FIELDS = ("host", "action", "target", "service", "content_hash", "remove_files", "steps", "meta", "keys",
                 "before", "after", "reason", "diff")


def first_difference(saved: Plan, fresh: Plan) -> str | None:
    """How `saved` first differs from `fresh`, the plan fleet computes now from the same desired
    state and hosts; None when they are the same plan (computed at another time).  Applying a
    saved plan is only safe when fleet would plan exactly that again: anything else was edited
    or has gone stale.  Every field of every change is compared, then the order, then the rest."""
    for name in ("desired_hash", "lab", "hosts", "fingerprints"):
        if getattr(saved, name) != getattr(fresh, name):
            return f"{name} differ (plan: {_shown(getattr(saved, name))}, now: {_shown(getattr(fresh, name))})"
    now = {c.id: c for c in fresh.changes}
    ids = {c.id for c in saved.changes}
    for c in saved.changes:
        n = now.get(c.id)
        if n is None:
            return f"change {c.id} is not planned now"
        mine, theirs = c.as_dict(), n.as_dict()
        volatile = owner(c.action).volatile_fields
        for name in CHANGE_FIELDS:
            if name in volatile:
                continue
            a, b = mine[name], theirs[name]
            if a != b:
                return f"change {c.id}: {name} differs (plan: {_shown(a)}, now: {_shown(b)})"
        a_deps, b_deps = tuple(saved.deps.get(c.id, ())), tuple(fresh.deps.get(c.id, ()))
        if a_deps != b_deps:
            return f"change {c.id}: deps differ (plan: {_shown(a_deps)}, now: {_shown(b_deps)})"
    extra = next((c.id for c in fresh.changes if c.id not in ids), None)
    if extra is not None:
        return f"change {extra} is planned now but not in the plan"
    for name in sorted(saved.groups.keys() | fresh.groups.keys()):  # what a dep on a group means
        a_group, b_group = saved.groups.get(name), fresh.groups.get(name)
        if a_group != b_group:
            return f"group {name} differs (plan: {_shown(a_group)}, now: {_shown(b_group)})"
    for i, (a, b) in enumerate(zip(saved.waves, fresh.waves, strict=False), 1):
        if a != b:
            return f"waves differ from wave {i} on (plan: {_shown(a)}, now: {_shown(b)})"
    if len(saved.waves) != len(fresh.waves):
        return f"waves differ (plan: {len(saved.waves)} waves, now: {len(fresh.waves)})"
    for name in ("unknown", "notes", "problems"):
        if getattr(saved, name) != getattr(fresh, name):
            return f"{name} differ (plan: {_shown(getattr(saved, name))}, now: {_shown(getattr(fresh, name))})"
    return None


def _shown(value: Any, limit: int = 200) -> str:
    """A field's value in a one-line message: lists joined, tables as k=v, empty as `none`, cut."""
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in sorted(value.items())]
    if isinstance(value, (list, tuple)):
        text = ", ".join(_shown(v, limit) if isinstance(v, (list, tuple)) else str(v) for v in value)
    else:
        text = "" if value is None else str(value)
    text = text or "none"
    return text if len(text) <= limit else text[:limit] + "…"


# Fields the model gained after plan files existed, with their defaults: left out of the hash
# while they hold the default, so a desired state that does not use them hashes as it always did
# (and plans saved before the upgrade still apply).
_LATER_FIELDS: dict[str, dict[str, Any]] = {
    "service": {"instances": (), "host_instances": (), "wrapper": None},
    "unit_spec": {"text": None, "source": "", "remain_after_exit": False},
    "sidekiq": {"queues_from_config": False},
    "health": {"sidekiq": False},
}


def _without_defaults(data: dict[str, Any], fields: dict[str, Any]) -> None:
    for k, default in fields.items():
        if k in data and data[k] == default:
            del data[k]


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}  # a dataclass -> its fields' names, looked up once


def plain_data(value: Any) -> Any:
    """`dataclasses.asdict` for hashing: the same dicts of fields, tuples, lists and dicts, without
    asdict's deep copy of every value and its field lookups (a 1,000-host desired state: 40 -> 8 ms).
    Other values are returned as they are, not copied: the caller edits only the dicts made here."""
    cls = type(value)
    if cls is str or cls is int or cls is float or cls is bool or value is None:
        return value
    if is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(value))
        return {name: plain_data(getattr(value, name)) for name in names}
    if cls is tuple:  # kept a tuple: a field's default, compared after this (`_without_defaults`), may be ()
        return tuple([plain_data(v) for v in value])
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, dict):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    return value


def desired_hash(desired: Desired) -> str:
    data = plain_data(desired)
    data.pop("source", None)
    data.pop("hosts_dir", None)
    if not data["moves"]:  # no move declared: hashed as before moves existed (saved plans stay valid)
        data.pop("moves")
    for h in data["hosts"]:
        h.pop("source", None)
    for s in data["services"]:
        _without_defaults(s, _LATER_FIELDS["service"])
        for spec in (s.get("unit_spec"), (s.get("wrapper") or {}).get("unit_spec")):
            if spec is not None:
                _without_defaults(spec, _LATER_FIELDS["unit_spec"])
        for later in ("sidekiq", "health"):
            if s.get(later) is not None:
                _without_defaults(s[later], _LATER_FIELDS[later])
        if s.get("store") is None:  # declared nothing of a data store: hashed as before `store` existed,
            s.pop("store", None)  # so saved plans of fleets that do not use it stay valid
    return sha256_hex(json.dumps(data, sort_keys=True, default=str))


def fingerprint(state: HostState) -> str:
    """What a plan for this host depends on.  Volatile facts (PIDs, timestamps, restart
    counters, load) are left out, so a plan stays valid while nothing relevant changed."""
    units = [
        (u.unit, u.load_state, u.active_state, u.sub_state, u.unit_file_state, list(u.exec_start), u.text_hash,
         u.fragment_path, list(u.drop_in_paths))
        for u in sorted(state.units, key=lambda u: u.unit)
    ]
    # Secret fingerprints as a kept observation holds them (8 hex digits): a collection that
    # reused an env file's kept parse (fleet/resources/env_file.py `env_offers`) has no more.
    envs = [(e.path, e.present, e.mode, e.owner, e.group, list(e.keys), list(e.values),
             [(k, fp if fp.startswith("sha256:") else f"sha256:{fp[:8]}") for k, fp in e.secrets],
             e.invalid_lines) for e in sorted(state.env_files, key=lambda e: e.path)]
    return sha256_hex(json.dumps([units, envs], sort_keys=True))


def build_plan(desired: Desired, observed: Mapping[str, HostResult], secrets: Mapping[tuple[str, str], str], *,
               prune: bool = True, lab: bool = False, now: datetime | None = None,
               inventory: Desired | None = None) -> Plan:
    """`inventory`: the desired state before --limit scoped its hosts (a move is judged on it)."""
    declared = moves.refuse_undeclared(inventory or desired, observed)
    scope = {h.name for h in desired.hosts}
    d = diff(desired, observed, secrets, prune=prune)
    book = [c for m in declared for c in runbook_quiet.around(runbook.steps(inventory or desired, m, observed, scope),
                                                              inventory or desired, m, observed, scope, d.changes)]
    changes, deps, waves, groups = runbook.wrap(book, d.changes, *order(d.changes, desired))
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Plan(
        fleet=desired.name, created_at=created, desired_hash=desired_hash(desired),
        hosts=tuple(h.name for h in desired.hosts if h.name in observed),
        fingerprints={h: fingerprint(r) for h, r in observed.items() if isinstance(r, HostState)},
        changes=changes, deps=deps, waves=waves, groups=groups,
        unknown=tuple((e.host, e.kind, e.message) for e in d.unknown),
        notes=d.notes, problems=d.problems, lab=lab,
    )
