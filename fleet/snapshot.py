"""Observed state as a compact, masked record, and back.  Pure.

Every collection (status, plan, apply, audit) is kept in the journal as a snapshot, so that
after an incident one can say what the fleet looked like at any point and what changed since.
A snapshot keeps what an audit compares (unit states, command lines, unit file hashes, env
keys and non-secret values, Sidekiq's view of its processes and queues) and the (masked) texts
of fleet-managed units, each distinct text once: what `--observed` needs to show a unit diff,
at a small cost, since a fleet's hosts mostly share their units' texts.  Secret fingerprints are
cut to the same 8 hex digits fleet shows everywhere else: enough to tell that a secret changed,
useless for guessing it.  An env file keeps the sha256 of the whole file its parse was read from
(a later collection that finds the same hash reuses the parse): it tells no more of a secret than
its 8-digit fingerprint, since checking a guess against it also needs every other secret of the file.

The same record is the observation `fleet status --json` carries (docs/status.md) and that
`--observed FILE` reads back.  A record is data from disk: `from_record` checks every field,
within the bounds a collection is held to (fleet/collect/parse.py), and names the key of the
first one that is wrong.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping
from typing import Any

from fleet.config import HOST_NAME
from fleet.errors import FleetError
from fleet.model import EnvFileState, HostError, HostFacts, HostResult, HostState, UnitState
from fleet.sidekiq import SECTION, SidekiqView, view_from_record, view_record
from fleet.textutil import printable
from fleet.unitfile import MAX_LINES
from fleet.units import mask_unit_text

FORMAT = 1
_UNIT_FIELDS = ("unit", "load_state", "active_state", "sub_state", "unit_file_state", "main_pid", "fragment_path",
                "active_enter", "n_restarts", "result", "text_hash")


def short_secret(fp: str) -> str:
    return fp if fp.startswith("sha256:") else f"sha256:{fp[:8]}"


def to_record(results: Mapping[str, HostResult]) -> dict[str, Any]:
    hosts: dict[str, Any] = {}
    texts: dict[str, int] = {}  # text -> its index in the record's "texts": each distinct text once

    def text_ref(text: str | None) -> int | None:
        return None if text is None else texts.setdefault(mask_unit_text(text), len(texts))

    for name, r in results.items():
        if isinstance(r, HostError):
            hosts[name] = {"error": {"kind": r.kind, "message": r.message}, "at": r.collected_at}
            continue
        f = r.facts
        hosts[name] = {
            "at": r.collected_at,
            "facts": {"hostname": f.hostname, "os": f.os, "kernel": f.kernel, "systemd": f.systemd_version,
                      "state": f.system_state, "uptime": f.uptime_seconds, "load": list(f.load),
                      "mem_total_kb": f.mem_total_kb, "mem_available_kb": f.mem_available_kb},
            "units": [{k: getattr(u, k) for k in _UNIT_FIELDS} | {
                "exec_start": list(u.exec_start), "drop_ins": list(u.drop_in_paths),
                "environment": [list(kv) for kv in u.environment], "environment_files": list(u.environment_files),
                "file_hashes": [list(fh) for fh in u.file_hashes], "text": text_ref(u.text)} for u in r.units],
            "env_files": [{"path": e.path, "present": e.present, "mode": e.mode, "owner": e.owner, "group": e.group,
                           "keys": list(e.keys), "values": [list(kv) for kv in e.values],
                           "secrets": [[k, short_secret(v)] for k, v in e.secrets], "invalid": e.invalid_lines}
                          | ({"sha256": e.sha256, "parse": ENV_PARSE} if e.sha256 else {})
                          for e in r.env_files],
        }
        view = r.facts_of(SECTION)
        if isinstance(view, SidekiqView):  # Sidekiq's view, on the host it was read from (audit, watch)
            hosts[name]["sidekiq"] = view_record(view)
    return {"format": FORMAT, "hosts": hosts, "texts": list(texts)}


def from_record(record: object, source: str = "a snapshot in the journal") -> dict[str, HostResult]:
    """The host results a record holds; FleetError naming `source` and the first wrong key
    (snapshots written before unit texts were kept read back with `text` None)."""
    return _from_record(record, source, fast=True)


def _from_record(record: object, source: str, *, fast: bool) -> dict[str, HostResult]:
    """`from_record`; `fast`: each host through `_host_fast` first, and through the checking
    reader only when the fast path declines it (the reader then names the first wrong key, or
    reads a value the fast path was too strict for).  Tests compare the two ways."""
    # The collector's bounds, imported here: `fleet check` reaches this module (through
    # fleet.audit) and needs nothing of the collector's.
    from fleet.collect.parse import MAX_FILES

    r = _Reader(source)
    top = r.obj(record, "the record")
    if top.get("format") != FORMAT:
        raise FleetError(f"{source}: observation format {top.get('format')!r} is not {FORMAT}",
                         hint="upgrade fleet, or observe again with this one")
    texts = r.texts(top.get("texts", []), "texts", limit=MAX_FILES, longest=MAX_TEXT)
    hosts = r.obj(r.key(top, "hosts", "the record"), "hosts")
    out: dict[str, HostResult] = {}
    bare: dict[_Bare, UnitState] = {}
    for name, h in hosts.items():
        where = f"hosts.{name}"
        if not HOST_NAME.fullmatch(name):
            raise r.bad(where, "is not a host name")
        got = _host_fast(name, h, texts, bare) if fast else None
        out[name] = got if got is not None else _host(r, name, r.obj(h, where), texts, where)
    return out


# The fast path: the same rules as the reader's, checked per unit in one function instead of a
# method call (and a key name made) per field — at 1,000 hosts × 20 services, a second of every
# `--observed` command.  It never raises: anything it does not accept as plainly valid (a wrong
# type, a value too long, a subclass, a missing key) returns None, and the reader, which checks
# the same host field by field, accepts it or names the first wrong key.  Exact types only
# (`type(x) is str`): what json.loads makes; the reader takes subclasses as well.

def _texts_fast(value: object, limit: int) -> tuple[str, ...] | None:
    """A list of at most `limit` texts, each no longer than MAX_TEXT (all of them together no
    longer than MAX_TEXT: a joined length over it is left to the reader)."""
    if type(value) is not list or len(value) > limit:
        return None
    try:
        if len("".join(value)) > MAX_TEXT:
            return None
    except TypeError:  # an item that is not text
        return None
    if not all(type(x) is str for x in value):
        return None
    return tuple(value)


def _pairs_fast(value: object, limit: int) -> tuple[tuple[str, str], ...] | None:
    if type(value) is not list or len(value) > limit:
        return None
    out = []
    for p in value:
        if type(p) is not list or len(p) != 2:
            return None
        a, b = p
        if type(a) is not str or type(b) is not str or len(a) > MAX_TEXT or len(b) > MAX_TEXT:
            return None
        out.append((a, b))
    return tuple(out)


def _number_fast(value: object) -> float | None:
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int and -_EXACT < value < _EXACT:
        return float(value)
    return None


_EXACT = 2 ** 53  # an int this small is a float without overflow (larger ones: the reader's way)


_Bare = tuple[str, str, str, str, str, int, str, str, int, str, str, "int | None"]


def _unit_fast(u: object, texts: list[str], max_files: int,
               bare: dict[_Bare, UnitState] | None = None) -> UnitState | None:
    """`bare`: the units read so far that have nothing in their lists (a unit not installed: the
    same 20 on each of 1,000 bare hosts), by their scalars; an equal one is the same `UnitState`
    (frozen), not made again."""
    if type(u) is not dict:
        return None
    try:
        name, load, active, sub, file_state, pid, fragment, enter, restarts, result, text_hash = (
            u["unit"], u["load_state"], u["active_state"], u["sub_state"], u["unit_file_state"], u["main_pid"],
            u["fragment_path"], u["active_enter"], u["n_restarts"], u["result"], u["text_hash"])
        exec_start, drop_ins, environment = u["exec_start"], u["drop_ins"], u["environment"]
        environment_files, file_hashes = u["environment_files"], u["file_hashes"]
    except KeyError:
        return None
    if (type(name) is not str or type(load) is not str or type(active) is not str or type(sub) is not str
            or type(file_state) is not str or type(fragment) is not str or type(enter) is not str
            or type(result) is not str or type(text_hash) is not str):
        return None
    if len(name) + len(load) + len(active) + len(sub) + len(file_state) + len(fragment) + len(enter) + len(
            result) + len(text_hash) > MAX_TEXT:
        return None
    if type(pid) is not int or type(restarts) is not int:
        return None
    ref = u.get("text")
    if ref is not None and (type(ref) is not int or not 0 <= ref < len(texts)):
        return None
    key: _Bare | None = None
    if (bare is not None and exec_start == [] and drop_ins == [] and environment == [] and environment_files == []
            and file_hashes == [] and type(exec_start) is list and type(drop_ins) is list
            and type(environment) is list and type(environment_files) is list and type(file_hashes) is list):
        key = (name, load, active, sub, file_state, pid, fragment, enter, restarts, result, text_hash, ref)
        known = bare.get(key)
        if known is not None:
            return known
    argv = _texts_fast(exec_start, MAX_VALUES)
    paths = _texts_fast(drop_ins, max_files)
    env = _pairs_fast(environment, max_files)
    env_paths = _texts_fast(environment_files, MAX_VALUES)
    hashes = _pairs_fast(file_hashes, max_files)
    if argv is None or paths is None or env is None or env_paths is None or hashes is None:
        return None
    state = UnitState(unit=name, load_state=load, active_state=active, sub_state=sub, unit_file_state=file_state,
                      main_pid=pid, fragment_path=fragment, active_enter=enter, n_restarts=restarts, result=result,
                      text_hash=text_hash, exec_start=argv, drop_in_paths=paths, environment=env,
                      environment_files=env_paths, file_hashes=hashes, text=None if ref is None else texts[ref])
    if key is not None and bare is not None:
        bare[key] = state
    return state


def _env_file_fast(e: object, max_files: int) -> EnvFileState | None:
    if type(e) is not dict:
        return None
    try:
        path, present, mode, owner, group, keys, values, secrets, invalid = (
            e["path"], e["present"], e["mode"], e["owner"], e["group"], e["keys"], e["values"], e["secrets"],
            e["invalid"])
    except KeyError:
        return None
    scalars = (path, mode, owner, group)
    if not all(type(x) is str for x in scalars) or len("".join(scalars)) > MAX_TEXT:
        return None
    if type(present) is not bool or type(invalid) is not int:
        return None
    pairs = _pairs_fast(secrets, max_files)
    if pairs is None or not all(_FINGERPRINT.fullmatch(fp) for _, fp in pairs):
        return None
    names, kept = _texts_fast(keys, MAX_VALUES), _pairs_fast(values, max_files)
    if names is None or kept is None:
        return None
    digest = e.get("sha256", "")
    if type(digest) is not str or not _DIGEST.fullmatch(digest):
        return None
    if e.get("parse") != ENV_PARSE:  # parsed by another version of the script: not reused
        digest = ""
    return EnvFileState(path=path, present=present, mode=mode, owner=owner, group=group, keys=names, values=kept,
                        secrets=pairs, invalid_lines=invalid, sha256=digest)


def _host_fast(name: str, h: object, texts: list[str], bare: dict[_Bare, UnitState] | None = None) -> HostState | None:
    """A plainly valid host's state, or None (see above).  Hosts that could not be observed
    (`error`) are left to the reader: there are few.  `bare`: see `_unit_fast`."""
    from fleet.collect.parse import MAX_FILES, MAX_UNITS

    if type(h) is not dict or "error" in h:
        return None
    at = _number_fast(h.get("at", 0.0))
    f, units, envs = h.get("facts"), h.get("units"), h.get("env_files")
    if at is None or type(f) is not dict or type(units) is not list or len(units) > MAX_UNITS:
        return None
    if type(envs) is not list or len(envs) > MAX_UNITS:
        return None
    try:
        hostname, os_, kernel, systemd, state = f["hostname"], f["os"], f["kernel"], f["systemd"], f["state"]
        uptime, load, total, available = f["uptime"], f["load"], f["mem_total_kb"], f["mem_available_kb"]
    except KeyError:
        return None
    scalars = (hostname, os_, kernel, systemd, state)
    if not all(type(x) is str for x in scalars) or len("".join(scalars)) > MAX_TEXT:
        return None
    if type(load) is not list or len(load) != 3 or type(total) is not int or type(available) is not int:
        return None
    up, l1, l5, l15 = _number_fast(uptime), _number_fast(load[0]), _number_fast(load[1]), _number_fast(load[2])
    if up is None or l1 is None or l5 is None or l15 is None:
        return None
    facts = HostFacts(hostname=hostname, os=os_, kernel=kernel, systemd_version=systemd, system_state=state,
                      uptime_seconds=up, load=(l1, l5, l15), mem_total_kb=total, mem_available_kb=available)
    unit_states = []
    for u in units:
        unit = _unit_fast(u, texts, MAX_FILES, bare)
        if unit is None:
            return None
        unit_states.append(unit)
    env_states = []
    for e in envs:
        env = _env_file_fast(e, MAX_FILES)
        if env is None:
            return None
        env_states.append(env)
    extra: tuple[tuple[str, object], ...] = ()
    if "sidekiq" in h:
        try:
            extra = ((SECTION, view_from_record(h["sidekiq"])),)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError):
            return None
    return HostState(host=name, facts=facts, units=tuple(unit_states), env_files=tuple(env_states), collected_at=at,
                     extra=extra)


def _host(r: _Reader, name: str, h: dict[str, Any], texts: list[str], where: str) -> HostResult:
    from fleet.collect.parse import MAX_UNITS

    at = r.number(h.get("at", 0.0), f"{where}.at")
    if "error" in h:
        e = r.obj(h["error"], f"{where}.error")
        return HostError(host=name, kind=r.text(r.key(e, "kind", f"{where}.error"), f"{where}.error.kind"),
                         message=r.text(r.key(e, "message", f"{where}.error"), f"{where}.error.message"),
                         collected_at=at)
    fw = f"{where}.facts"
    f = r.obj(r.key(h, "facts", where), fw)
    load = r.items(r.key(f, "load", fw), f"{fw}.load", limit=3)
    if len(load) != 3:
        raise r.bad(f"{fw}.load", "is not three numbers")
    facts = HostFacts(hostname=r.text(r.key(f, "hostname", fw), f"{fw}.hostname"),
                      os=r.text(r.key(f, "os", fw), f"{fw}.os"), kernel=r.text(r.key(f, "kernel", fw), f"{fw}.kernel"),
                      systemd_version=r.text(r.key(f, "systemd", fw), f"{fw}.systemd"),
                      system_state=r.text(r.key(f, "state", fw), f"{fw}.state"),
                      uptime_seconds=r.number(r.key(f, "uptime", fw), f"{fw}.uptime"),
                      load=(r.number(load[0], f"{fw}.load"), r.number(load[1], f"{fw}.load"),
                            r.number(load[2], f"{fw}.load")),
                      mem_total_kb=r.integer(r.key(f, "mem_total_kb", fw), f"{fw}.mem_total_kb"),
                      mem_available_kb=r.integer(r.key(f, "mem_available_kb", fw), f"{fw}.mem_available_kb"))
    units = tuple(_unit(r, r.obj(u, f"{where}.units[{i}]"), texts, f"{where}.units[{i}]")
                  for i, u in enumerate(r.items(r.key(h, "units", where), f"{where}.units", limit=MAX_UNITS)))
    envs = tuple(_env_file(r, r.obj(e, f"{where}.env_files[{i}]"), f"{where}.env_files[{i}]")
                 for i, e in enumerate(r.items(r.key(h, "env_files", where), f"{where}.env_files", limit=MAX_UNITS)))
    extra: tuple[tuple[str, object], ...] = ()
    if "sidekiq" in h:
        try:
            extra = ((SECTION, view_from_record(h["sidekiq"])),)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            raise r.bad(f"{where}.sidekiq", f"is not Sidekiq's view ({type(e).__name__}: {e})") from None
    return HostState(host=name, facts=facts, units=units, env_files=envs, collected_at=at, extra=extra)


def _unit(r: _Reader, u: dict[str, Any], texts: list[str], where: str) -> UnitState:
    from fleet.collect.parse import MAX_FILES

    fields: dict[str, Any] = {k: (r.integer if k in _INT_FIELDS else r.text)(r.key(u, k, where), f"{where}.{k}")
                              for k in _UNIT_FIELDS}
    ref = u.get("text")
    if ref is not None and (not isinstance(ref, int) or isinstance(ref, bool) or not 0 <= ref < len(texts)):
        raise r.bad(f"{where}.text", f"is {_shown(ref)}, not the index of one of the record's texts")
    return UnitState(**fields, exec_start=tuple(r.texts(r.key(u, "exec_start", where), f"{where}.exec_start")),
                     drop_in_paths=tuple(r.texts(r.key(u, "drop_ins", where), f"{where}.drop_ins", limit=MAX_FILES)),
                     environment=r.pairs(r.key(u, "environment", where), f"{where}.environment"),
                     environment_files=tuple(r.texts(r.key(u, "environment_files", where),
                                                    f"{where}.environment_files")),
                     file_hashes=r.pairs(r.key(u, "file_hashes", where), f"{where}.file_hashes"),
                     text=None if ref is None else texts[ref])


def _env_file(r: _Reader, e: dict[str, Any], where: str) -> EnvFileState:
    secrets = r.pairs(r.key(e, "secrets", where), f"{where}.secrets")
    bad = next((k for k, fp in secrets if not _FINGERPRINT.fullmatch(fp)), None)
    if bad is not None:
        raise r.bad(f"{where}.secrets", f"holds {_shown(bad)} as something else than a fingerprint "
                    "(sha256:8 hex digits): a secret is never kept in clear")
    return EnvFileState(path=r.text(r.key(e, "path", where), f"{where}.path"),
                        present=r.flag(r.key(e, "present", where), f"{where}.present"),
                        mode=r.text(r.key(e, "mode", where), f"{where}.mode"),
                        owner=r.text(r.key(e, "owner", where), f"{where}.owner"),
                        group=r.text(r.key(e, "group", where), f"{where}.group"),
                        keys=tuple(r.texts(r.key(e, "keys", where), f"{where}.keys")),
                        values=r.pairs(r.key(e, "values", where), f"{where}.values"),
                        secrets=secrets, invalid_lines=r.integer(r.key(e, "invalid", where), f"{where}.invalid"),
                        sha256=_digest(r, e.get("sha256", ""), f"{where}.sha256") if e.get("parse") == ENV_PARSE
                        else "")


def _digest(r: _Reader, value: object, key: str) -> str:
    text = r.text(value, key)
    if not _DIGEST.fullmatch(text):
        raise r.bad(key, f"is {_shown(text)}, not a sha256 (64 hex digits) or empty")
    return text


_INT_FIELDS = frozenset({"main_pid", "n_restarts"})
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{8}|[0-9a-f]{64}")
_DIGEST = re.compile(r"(?:[0-9a-f]{64})?")  # an env file's whole-file hash, or "" (not known)
# The version of the env file's parse (fleet/resources/env_file.py: its awk, `parse_env`) a kept
# hash stands for: a kept parse is reused for a file that hashes the same, so a change to how a
# file is parsed must raise this, and the parses kept before it are then read with no hash.
ENV_PARSE = 1
MAX_TEXT = MAX_LINES * 4096  # characters of one unit text: its lines, each well within a line's length
MAX_VALUES = MAX_LINES  # items of any other list: command words, env keys


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


class _Reader:
    """Typed access to a record's fields, each failure a FleetError naming the source and key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def bad(self, key: str, what: str) -> FleetError:
        return FleetError(f"{self.source}: {printable(key)} {printable(what)}",
                          hint="pass a file written by `fleet status --json`, or a snapshot id from `fleet history`")

    def key(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise self.bad(f"{where}.{key}" if where != "the record" else key, "is missing")
        return obj[key]

    def obj(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(key, f"is {_shown(value)}, not an object")
        return value

    def items(self, value: object, key: str, *, limit: int = MAX_VALUES) -> list[Any]:
        if not isinstance(value, list):
            raise self.bad(key, f"is {_shown(value)}, not a list")
        if len(value) > limit:
            raise self.bad(key, f"holds {len(value)} items, more than a collection may ({limit})")
        return value

    def text(self, value: object, key: str, *, longest: int = MAX_TEXT) -> str:
        if not isinstance(value, str):
            raise self.bad(key, f"is {_shown(value)}, not text")
        if len(value) > longest:
            raise self.bad(key, f"is {len(value)} characters long, more than a collection keeps ({longest})")
        return value

    def texts(self, value: object, key: str, *, limit: int = MAX_VALUES, longest: int = MAX_TEXT) -> list[str]:
        return [self.text(x, key, longest=longest) for x in self.items(value, key, limit=limit)]

    def pairs(self, value: object, key: str) -> tuple[tuple[str, str], ...]:
        from fleet.collect.parse import MAX_FILES

        out = []
        for x in self.items(value, key, limit=MAX_FILES):
            pair = self.texts(x, key)
            if len(pair) != 2:
                raise self.bad(key, f"holds {_shown(x)}, not a pair of texts")
            out.append((pair[0], pair[1]))
        return tuple(out)

    def integer(self, value: object, key: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(key, f"is {_shown(value)}, not an integer")
        return value

    def number(self, value: object, key: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.bad(key, f"is {_shown(value)}, not a number")
        return float(value)

    def flag(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.bad(key, f"is {_shown(value)}, not true or false")
        return value


def pack(results: Mapping[str, HostResult]) -> bytes:
    return zlib.compress(json.dumps(to_record(results), separators=(",", ":")).encode(), 6)


def unpack(data: bytes) -> dict[str, HostResult]:
    try:
        return from_record(json.loads(zlib.decompress(data)))
    except FleetError:
        raise
    except (zlib.error, ValueError, RecursionError) as e:
        raise FleetError(f"a snapshot in the journal is damaged ({type(e).__name__}: {e})",
                         hint="pick another snapshot (fleet history)") from e


def host_summary(results: Mapping[str, HostResult]) -> dict[str, str]:
    return {h: ("ok" if isinstance(r, HostState) else r.kind) for h, r in results.items()}
