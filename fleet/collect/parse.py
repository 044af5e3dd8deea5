"""Pure parsers for what the collection script prints (see fleet.collect.script).

Input is text, output is a `HostState`; anything unexpected — garbage, truncation, a foreign
version — raises `ParseError` naming the section, never another exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from fleet.collect.script import SCRIPT_VERSION
from fleet.envfile import parse_value
from fleet.errors import ParseError
from fleet.model import EnvFileState, HostFacts, HostState, UnitState
from fleet.textutil import sha256_hex
from fleet.units import mask_unit_text, masked_environment

_PROP = re.compile(r"^([A-Za-z][A-Za-z0-9]*)=(.*)$")
_HASH = re.compile(r"^([0-9a-f]{64})  (/.+)$")
_ARGV = re.compile(r"argv\[\]=(.*?) ; ignore_errors=")
_ENVFILE = re.compile(r"(/\S+) \(ignore_errors=(?:yes|no)\)")


def parse_host(host: str, text: str, *, collected_at: float = 0.0, duration: float = 0.0) -> HostState:
    """Parse a whole collection output for `host`."""
    try:
        return _parse(host, text, collected_at, duration)
    except ParseError:
        raise
    except (ValueError, IndexError, KeyError) as e:  # defensive: a malformed field somewhere
        raise ParseError(f"{host}: malformed collection output ({e})", host=host,
                         hint="run `fleet status` again; if it persists, report the host's output") from e


def _sections(host: str, text: str) -> Iterator[tuple[str, list[str]]]:
    lines = text.split("\n")
    if not lines or not lines[0].startswith("@@fleet "):
        first = lines[0][:80] if lines else ""
        raise ParseError(f"{host}: output does not start with the fleet header (got {first!r})", host=host,
                         section="header",
                         hint="something on the host prints to stdout before commands run (a shell profile?)")
    if lines[0] != f"@@fleet {SCRIPT_VERSION}":
        raise ParseError(f"{host}: collection output version {lines[0][8:]!r}, expected {SCRIPT_VERSION}",
                         host=host, section="header")
    name, body = "", list[str]()
    ended = False
    for line in lines[1:]:
        if line.startswith("@@") and not line.startswith(("@@file ", "@@truncated")):
            if name:
                yield name, body
            if line == "@@end":
                ended = True
                break
            name, body = line[2:], []
        else:
            body.append(line)
    if not ended:
        raise ParseError(f"{host}: collection output is truncated (no @@end after section {name or 'header'!r})",
                         host=host, section=name or "header",
                         hint="the connection dropped or the output was cut; run again")


def _parse(host: str, text: str, collected_at: float, duration: float) -> HostState:
    sections: dict[str, list[str]] = {}
    env_sections: list[tuple[str, list[str]]] = []
    for name, body in _sections(host, text):
        if name.startswith("env "):
            env_sections.append((name[4:], body))
        elif name in ("facts", "units", "hashes", "text"):
            sections[name] = body
        else:
            raise ParseError(f"{host}: unknown section {name[:40]!r} in collection output", host=host, section=name)
    for required in ("facts", "units", "hashes", "text"):
        if required not in sections:
            raise ParseError(f"{host}: section {required!r} missing from collection output", host=host,
                             section=required)
    facts = parse_facts(host, sections["facts"])
    hashes = parse_hashes(host, sections["hashes"])
    texts = parse_texts(host, sections["text"])
    units = parse_units(host, sections["units"], hashes, texts)
    env_files = tuple(parse_env(host, path, body) for path, body in env_sections)
    return HostState(host=host, facts=facts, units=units, env_files=env_files, collected_at=collected_at,
                     duration=duration)


def parse_facts(host: str, lines: list[str]) -> HostFacts:
    kv: dict[str, str] = {}
    for line in lines:
        if "=" in line:
            k, v = line.split("=", 1)
            kv[k] = v
    load = tuple(_float(x) for x in kv.get("load", "").split()[:3])
    os_name = kv.get("os", "")
    if len(os_name) >= 2 and os_name[0] == os_name[-1] == '"':
        os_name = os_name[1:-1]
    return HostFacts(
        hostname=kv.get("hostname", ""),
        os=os_name,
        kernel=kv.get("kernel", ""),
        systemd_version=kv.get("Version", ""),
        system_state=kv.get("SystemState", ""),
        uptime_seconds=_float(kv.get("uptime", "0")),
        load=(load + (0.0, 0.0, 0.0))[:3],  # type: ignore[arg-type]
        mem_total_kb=_int(kv.get("mem_total_kb", "0")),
        mem_available_kb=_int(kv.get("mem_available_kb", "0")),
    )


def parse_hashes(host: str, lines: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        m = _HASH.match(line)
        if not m:
            raise ParseError(f"{host}: unexpected line in unit hashes: {line[:80]!r}", host=host, section="hashes")
        out[m.group(2)] = m.group(1)
    return out


def parse_texts(host: str, lines: list[str]) -> dict[str, list[tuple[str, str]]]:
    """unit -> [(path, content)] in the order printed (fragment first, then drop-ins)."""
    files: list[tuple[str, str, list[str]]] = []  # (unit, path, lines)
    for line in lines:
        if line.startswith("@@file "):
            parts = line[7:].split(" ", 1)
            if len(parts) != 2:
                raise ParseError(f"{host}: malformed file header {line[:80]!r}", host=host, section="text")
            files.append((parts[0], parts[1], []))
        elif line == "@@truncated":
            raise ParseError(f"{host}: a unit file is longer than fleet accepts", host=host, section="text",
                             hint="a unit file of thousands of lines is not a unit file; inspect it by hand")
        elif line.startswith("|") and files:
            files[-1][2].append(line[1:])
        elif line:
            raise ParseError(f"{host}: unexpected line in unit texts: {line[:80]!r}", host=host, section="text")
    out: dict[str, list[tuple[str, str]]] = {}
    for unit, path, body in files:
        out.setdefault(unit, []).append((path, mask_unit_text("".join(f"{b}\n" for b in body))))
    return out


def parse_units(host: str, lines: list[str], hashes: dict[str, str],
                texts: dict[str, list[tuple[str, str]]]) -> tuple[UnitState, ...]:
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in lines + [""]:
        if not line:
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        m = _PROP.match(line)
        if m:
            cur[m.group(1)] = m.group(2)
        # other lines are systemctl's complaints about a name; the unit is then simply absent
    units: dict[str, UnitState] = {}
    for b in blocks:
        if "Id" not in b:
            raise ParseError(f"{host}: a unit block without Id in systemctl output", host=host, section="units")
        unit = b["Id"]
        if unit in units:
            continue
        drop_ins = tuple(b.get("DropInPaths", "").split())
        fragment = b.get("FragmentPath", "")
        files = ([fragment] if fragment else []) + list(drop_ins)
        file_hashes = tuple((p, hashes.get(p, "-")) for p in files)
        text_hash = sha256_hex("\n".join(f"{p} {h}" for p, h in file_hashes)) if files else ""
        text = None
        if unit in texts:
            text = "".join(f"# {p}\n{content}" for p, content in texts[unit])
        units[unit] = UnitState(
            unit=unit,
            load_state=b.get("LoadState", ""),
            active_state=b.get("ActiveState", ""),
            sub_state=b.get("SubState", ""),
            unit_file_state=b.get("UnitFileState", ""),
            exec_start=parse_exec_start(b.get("ExecStart", "")),
            main_pid=_int(b.get("MainPID", "0")),
            fragment_path=fragment,
            drop_in_paths=drop_ins,
            active_enter=b.get("ActiveEnterTimestamp", ""),
            n_restarts=_int(b.get("NRestarts", "0")),
            result=b.get("Result", ""),
            text_hash=text_hash,
            file_hashes=file_hashes,
            text=text,
            environment=masked_environment(b.get("Environment", "")),
            environment_files=tuple(m.group(1) for m in _ENVFILE.finditer(b.get("EnvironmentFiles", ""))),
        )
    return tuple(units.values())


def parse_exec_start(value: str) -> tuple[str, ...]:
    """argv of the first command in systemd's `{ path=… ; argv[]=… ; … }` rendering."""
    m = _ARGV.search(value)
    return tuple(m.group(1).split()) if m else ()


def parse_env(host: str, path: str, lines: list[str]) -> EnvFileState:
    lines = [line for line in lines if line]
    if lines == ["absent"]:
        return EnvFileState(path=path, present=False)
    if not lines or not lines[0].startswith("meta "):
        raise ParseError(f"{host}: env file section for {path} lacks its meta line", host=host, section="env")
    meta = lines[0].split(" ")
    if len(meta) != 5:
        raise ParseError(f"{host}: malformed meta line for {path}: {lines[0][:80]!r}", host=host, section="env")
    mode = meta[1][-4:].rjust(4, "0")
    keys: list[str] = []
    values: list[tuple[str, str]] = []
    secrets: list[tuple[str, str]] = []
    invalid = 0
    for line in lines[1:]:
        if line.startswith("V "):
            key, _, raw = line[2:].partition(" ")
            keys.append(key)
            values.append((key, parse_value(raw)))
        elif line.startswith("secret "):
            parts = line.split(" ")
            if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
                raise ParseError(f"{host}: malformed secret line in {path}", host=host, section="env")
            keys.append(parts[1])
            secrets.append((parts[1], parts[2]))
        elif line == "invalid":
            invalid += 1
        else:
            raise ParseError(f"{host}: unexpected line in env file section for {path}: {line[:80]!r}",
                             host=host, section="env")
    return EnvFileState(path=path, present=True, mode=mode, owner=meta[2], group=meta[3], size=_int(meta[4]),
                        keys=tuple(keys), values=tuple(values), secrets=tuple(secrets), invalid_lines=invalid)


def _int(s: str) -> int:
    try:
        return int(s.strip() or 0)
    except ValueError:
        return 0


def _float(s: str) -> float:
    """Facts are shown and written as JSON: a host printing nan or 1e999 gets 0."""
    try:
        value = float(s.strip() or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0
