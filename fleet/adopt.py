"""`fleet adopt`'s pure half: what the live hosts run, written as a desired state.  No I/O.

From the units observed on each host (a collection that dumped their text, fleet/workflows/adopt.py)
it builds `desired_state.toml` and the `units/` files so that the next `fleet plan` of the written
fleet is empty: every running, enabled unit becomes a service whose unit file is the host's own
text, byte for byte (`unit_file = { source = "units/NAME" }`); the instances of a template become
one service with `instances` (per-host `overrides` where hosts differ), with the template's
`NAME.service` wrapper when the host has one.  The drop-ins in the unit's own directory
(`/etc/systemd/system/UNIT.d/*.conf`) are declared as they are (`[services.NAME.dropins]`, files
in `units/UNIT.d/`), so the service then owns that directory.  What it cannot write so that the plan stays empty
is declared `observe_only` or left out, and said in `notes` — never silently dropped:

- a unit whose file is not fleet's to write (a package's, under /lib/systemd/system);
- a unit whose text did not come back byte for byte (a secret in `Environment=` is masked on the
  host before it leaves; a file without its final newline), checked against the file's sha256;
- a unit with a drop-in fleet cannot declare: an instance's own (`x@4000.service.d/`, fleet declares
  a template's drop-ins, which every instance loads), one whose name is not a plain `NAME.conf`,
  or one whose text did not come back byte for byte;
- a unit that is not running or not enabled (declaring it would make the plan start it).

The env files the units load (EnvironmentFile=) are declared as they are: their non-sensitive
values, their owner, group and mode, and every sensitive key as `"present"` — a secret's value
never leaves the host (the collector sends only its sha256), so it is never written anywhere.
One `[env_files.NAME]` per set of hosts holding the same file; a file fleet could not rewrite
identically (a key twice, a line that is not KEY=value, a control character in a value) is
left out and said.  Health checks are not observed; `notes` say so once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet.config import USER_NAME
from fleet.model import EnvFileState, HostState, UnitState, instance_of, is_template, template_of
from fleet.sidekiq_settings import is_sidekiq
from fleet.textutil import sha256_hex
from fleet.unitfile import DROPIN_NAME
from fleet.units import UNIT_DIR, drop_in_dir, removable_unit_file, unit_file_texts

UNITS_DIR = "units"


@dataclass(frozen=True)
class Adopted:
    """What adopt writes, relative to the target directory, and what it could not express."""

    desired_state: str  # the text of desired_state.toml
    units: tuple[tuple[str, str], ...]  # (path under the target, e.g. "units/x.service", exact text)
    services: tuple[str, ...]  # the services declared, in file order
    notes: tuple[str, ...]  # one line each: what was not expressed, and why


@dataclass
class _Unit:
    """One unit file to declare: its name, its text and the hosts (with their instances) that run it."""

    unit: str
    text: str | None  # None: declared observe_only
    hosts: dict[str, tuple[str, ...]]  # host -> instances (empty for a plain unit)
    kind: str
    wrapper: tuple[str, str] | None = None  # (unit, text)
    dropins: tuple[tuple[str, str], ...] = ()  # (name, exact text) in the unit's own directory


def toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's."""
    return json.dumps(value)


def fragment_text(u: UnitState) -> str | None:
    """The fragment's text as the host has it, or None when what came back is not the file byte
    for byte (masked secret, no final newline: the per-file sha256 says so)."""
    if u.text is None or not u.file_hashes:
        return None
    head = f"# {u.fragment_path}\n"
    if not u.text.startswith(head):
        return None
    body = u.text[len(head):]
    if u.drop_in_paths:
        cut = body.find(f"# {u.drop_in_paths[0]}\n")
        while cut >= 0 and sha256_hex(body[:cut]) != u.file_hashes[0][1]:
            cut = body.find(f"# {u.drop_in_paths[0]}\n", cut + 1)
        if cut < 0:
            return None
        body = body[:cut]
    return body if sha256_hex(body) == dict(u.file_hashes).get(u.fragment_path) else None


def guess_kind(unit: str, argv: Sequence[str]) -> str:
    """The kind whose rules fit what the unit runs: Sidekiq by its command line, streaming and
    web by Mastodon's unit names and commands; anything else is generic."""
    base = unit.split("@")[0].split(".")[0]
    words = [a.rsplit("/", 1)[-1] for a in argv]
    if is_sidekiq(argv):
        return "sidekiq"
    if "streaming" in base or any("streaming" in w for w in words):
        return "streaming"
    if base.endswith("-web") or "puma" in words:
        return "web"
    return _STORES.get(base, "generic")


# Debian's units of the data stores Mastodon's settings point at (DB_HOST, REDIS_HOST …): declared
# with their kind, so that `fleet check` knows where they run.
_STORES = {"postgresql": "postgres", "redis-server": "redis", "redis": "redis", "pgbouncer": "pgbouncer",
           "elasticsearch": "elasticsearch", "opensearch": "elasticsearch"}


def service_name(unit: str) -> str:
    """`mastodon-streaming@.service` -> `streaming`."""
    base = unit.split("@")[0].rsplit(".", 1)[0]
    base = base.removeprefix("mastodon-") or base
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", base).strip("-.") or "unit"
    return name if name[0].isalnum() else "u" + name


def _why_not(host: str, u: UnitState) -> str | None:
    """Why this unit cannot be declared as running there without the plan changing it."""
    if u.active_state != "active":
        return f"{host}: {u.unit} is {u.state()}: not declared (declared, fleet would start it)"
    if not u.enabled:
        return f"{host}: {u.unit} is {u.unit_file_state or 'not enabled'}: not declared (declared, fleet would " \
               "enable it)"
    return None


def _observe_reason(host: str, u: UnitState, file_unit: str) -> str | None:
    """Why this unit's file cannot be fleet's (it is then declared observe_only)."""
    if not u.fragment_path.startswith(UNIT_DIR + "/"):
        return f"{host}: {u.unit} comes from {u.fragment_path or 'no file'}, not {UNIT_DIR}: declared observe_only"
    own = [p for p in u.drop_in_paths if removable_unit_file(p, file_unit) or removable_unit_file(p, u.unit)]
    texts = unit_file_texts(u)
    odd = [p for p in own if p.rsplit("/", 1)[0] != drop_in_dir(file_unit) or not DROPIN_NAME.fullmatch(
        p.rsplit("/", 1)[1]) or p not in texts]
    if odd:
        return f"{host}: {u.unit} has drop-ins fleet cannot declare ({', '.join(odd)}: an instance's own, a name " \
               "that is not a plain NAME.conf, or a text that did not come back byte for byte): declared " \
               "observe_only (fold them into the unit file, or the template's drop-ins, to manage it)"
    if fragment_text(u) is None:
        return f"{host}: {u.unit}'s file did not come back byte for byte (a secret in Environment= is masked on " \
               "the host; or no final newline): declared observe_only (move the secret to an env file)"
    return None


def own_drop_ins(u: UnitState, file_unit: str) -> tuple[tuple[str, str], ...]:
    """(name, text) of the drop-ins in `file_unit`'s own directory that `u` loads, byte for byte."""
    texts = unit_file_texts(u)
    directory = drop_in_dir(file_unit)
    return tuple((p.rsplit("/", 1)[1], texts[p]) for p in u.drop_in_paths
                 if p.rsplit("/", 1)[0] == directory and p in texts)


def build(fleet_name: str, patterns: Sequence[str], results: Mapping[str, HostState]) -> Adopted:
    """The desired state of the units observed on `results`' hosts (host -> state, in inventory order)."""
    notes: list[str] = []
    groups: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], _Unit] = {}  # (file unit, text, drop-ins)
    plain_on: dict[str, dict[str, UnitState]] = {}
    for host, state in results.items():
        plain_on[host] = {}
        for u in state.units:
            if not u.exists:
                continue
            why = _why_not(host, u)
            if why:
                notes.append(why)
                continue
            if is_template(u.unit):
                continue
            template = template_of(u.unit)
            file_unit = template or u.unit
            reason = _observe_reason(host, u, file_unit)
            if reason:
                notes.append(reason)
            text = None if reason else fragment_text(u)
            dropins = own_drop_ins(u, file_unit) if text is not None else ()
            if template is None and text is not None and not dropins:  # a wrapper with drop-ins stays a service
                plain_on[host][u.unit] = u
            key = (file_unit, text, dropins)
            g = groups.setdefault(key, _Unit(file_unit, text, {}, guess_kind(u.unit, u.exec_start), dropins=dropins))
            inst = instance_of(u.unit)
            g.hosts[host] = g.hosts.get(host, ()) + ((inst,) if inst is not None else ())
    # A template's wrapper: the plain `NAME.service` beside `NAME@.service` on the same host.
    for (file_unit, text, _), g in list(groups.items()):
        if not is_template(file_unit) or text is None:
            continue
        wrapper = file_unit.replace("@.", ".", 1)
        texts = {fragment_text(w) if (w := plain_on[h].get(wrapper)) is not None else None for h in g.hosts}
        (wtext,) = texts if len(texts) == 1 else (None,)
        own = groups.get((wrapper, wtext, ())) if wtext is not None else None
        # The wrapper goes with the template only where it runs with it on exactly its hosts.
        if wtext is not None and own is not None and set(own.hosts) == set(g.hosts):
            g.wrapper = (wrapper, wtext)
            del groups[(wrapper, wtext, ())]
    return _write(fleet_name, patterns, list(groups.values()), _env_files(results, notes), notes)


def _env_files(results: Mapping[str, HostState], notes: list[str]) -> list[tuple[EnvFileState, list[str]]]:
    """Each env file observed, with the hosts holding exactly that file (path, keys, values, meta)."""
    groups: dict[tuple[object, ...], tuple[EnvFileState, list[str]]] = {}
    for host, state in results.items():
        for ef in state.env_files:
            why = _env_why_not(ef)
            if why:
                notes.append(f"{host}: {ef.path} {why}: not declared")
                continue
            key = (ef.path, ef.keys, ef.values, tuple(sorted(k for k, _ in ef.secrets)), ef.owner, ef.group, ef.mode)
            groups.setdefault(key, (ef, []))[1].append(host)
    return list(groups.values())


def _env_why_not(ef: EnvFileState) -> str | None:
    if not ef.present:
        return "is loaded by a unit but absent"
    if len(ef.keys) != len(set(ef.keys)):
        return "has a key more than once (fleet would rewrite it)"
    if ef.invalid_lines:
        return f"has {ef.invalid_lines} line(s) that are not KEY=value (fleet would rewrite it)"
    if any(ord(c) < 32 and c not in "\t\n" or c == "\x7f" for _, v in ef.values for c in v):
        return "has a control character in a value"
    return None


def _write(fleet_name: str, patterns: Sequence[str], groups: list[_Unit],
           env_files: list[tuple[EnvFileState, list[str]]], notes: list[str]) -> Adopted:
    lines = [
        "# Written by `fleet adopt` from what the hosts run: review it, then commit it.",
        "# Unit files are the hosts' own, byte for byte, in units/.  File format: docs/desired-state.md.",
        "",
        "[fleet]",
        f"name = {toml_string(fleet_name)}",
    ]
    for p in patterns:
        lines += ["", "[[discover]]", f"pattern = {toml_string(p)}"]
    names: list[str] = []
    units: list[tuple[str, str]] = []
    taken_files: dict[str, str] = {}
    for g in groups:
        name = _unique(service_name(g.unit), names)
        names.append(name)
        hosts = list(g.hosts)
        p = f"services.{toml_key(name)}"
        lines += ["", f"[{p}]", f"kind = {toml_string(_kind(g))}",
                  f"unit = {toml_string(g.unit)}", f"hosts = {_array(hosts)}"]
        if g.text is None:
            lines.append("observe_only = true")
        if is_template(g.unit):
            insts = {h: g.hosts[h] for h in hosts}
            # the list most hosts run (the first host's on a tie: the same text for the same hosts)
            lists = list(insts.values())
            common = max(dict.fromkeys(lists), key=lists.count)
            lines.append(f"instances = {_array(common)}")
            for h, own in insts.items():
                if own != common:
                    lines += ["", f"[{p}.overrides.{toml_key(h)}]", f"instances = {_array(own)}"]
        if g.text is not None:
            source = _unit_file(g.unit, g.text, taken_files, units)
            lines += ["", f"[{p}.unit_file]", f"source = {toml_string(source)}"]
            if g.wrapper is not None:
                wsource = _unit_file(g.wrapper[0], g.wrapper[1], taken_files, units)
                lines += ["", f"[{p}.wrapper]", f"unit = {toml_string(g.wrapper[0])}",
                          f"source = {toml_string(wsource)}"]
            if g.dropins:
                lines += ["", f"[{p}.dropins]"]
                for dname, dtext in g.dropins:
                    dsource = _unit_file(f"{g.unit}.d/{dname}", dtext, taken_files, units)
                    lines.append(f"{toml_string(dname)} = {toml_string(dsource)}")
    env_names: list[str] = []
    for ef, hosts in env_files:
        name = _unique(env_name(ef.path), env_names)
        env_names.append(name)
        p = f"env_files.{toml_key(name)}"
        lines += ["", f"[{p}]", f"path = {toml_string(ef.path)}", f"hosts = {_array(hosts)}"]
        lines += [f"{k} = {toml_string(v)}" for k, v in (("owner", ef.owner), ("group", ef.group))
                  if USER_NAME.fullmatch(v)]
        lines.append(f"mode = {toml_string(ef.mode)}")
        if ef.values:
            lines += ["", f"[{p}.values]"] + [f"{toml_key(k)} = {toml_string(v)}" for k, v in ef.values]
        if ef.secrets:
            lines += ["", f"[{p}.sensitive]"] + [f"{toml_key(k)} = \"present\"" for k, _ in ef.secrets]
    if names:
        notes.append("health checks are not observed: none declared (add `health` per service, "
                     "docs/desired-state.md)")
    return Adopted("\n".join(lines) + "\n", tuple(units), tuple(names), tuple(notes))


def env_name(path: str) -> str:
    """`/home/mastodon/live/.env.production` -> `production`."""
    base = path.rsplit("/", 1)[-1].removeprefix(".env").strip(".") or "env"
    name = re.sub(r"[^A-Za-z0-9_-]", "-", base).strip("-")
    return name if name and name[0].isalnum() else "env" + name


def _kind(g: _Unit) -> str:
    """An observe-only unit keeps only a data store's kind: the others' rules need the unit text."""
    return g.kind if g.text is not None or g.kind in _STORES.values() else "generic"


def _unit_file(unit: str, text: str, taken: dict[str, str], units: list[tuple[str, str]]) -> str:
    """units/UNIT, or units/UNIT.2 … when hosts run different texts under one name."""
    path = f"{UNITS_DIR}/{unit}"
    n = 1
    while path in taken and taken[path] != text:
        n += 1
        path = f"{UNITS_DIR}/{n}/{unit}"
    if path not in taken:
        taken[path] = text
        units.append((path, text))
    return path


def _unique(name: str, taken: list[str]) -> str:
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}-{n}"
    return out


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def _array(items: Sequence[str]) -> str:
    return "[" + ", ".join(toml_string(i) for i in items) + "]"
