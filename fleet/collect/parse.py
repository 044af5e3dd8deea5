"""Pure parsers for what the collection script prints (see fleet.collect.script).

Input is text, output is a `HostState`; anything unexpected — garbage, truncation, a foreign
version — raises `ParseError` naming the section, never another exception.  The facts and units
sections are parsed here; every other section goes to the parser of the kind of resource that
prints it (fleet/collect/sections.py, fleet/resources/), by its name.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace

from fleet.collect.script import MAX_TEXT_LINES, SCRIPT_VERSION, UNIT_PROPERTIES
from fleet.collect.sections import Collected, capped, to_int, too_much
from fleet.errors import ParseError
from fleet.model import EnvFileState, HostFacts, HostState, UnitState
from fleet.resources.env_file import fill_known
from fleet.resources.registry import RESOURCES
from fleet.textutil import sha256_hex
from fleet.units import mask_unit_text, masked_environment

_PROP = re.compile(r"^([A-Za-z][A-Za-z0-9]*)=(.*)$")
_HASH = re.compile(r"^([0-9a-f]{64})  (/.+)$")
_ARGV = re.compile(r"argv\[\]=(.*?) ; ignore_errors=")
_ENVFILE = re.compile(r"(/\S+) \(ignore_errors=(?:yes|no)\)")


def parse_host(host: str, text: str, *, collected_at: float = 0.0, duration: float = 0.0,
               idle: Sequence[UnitState] = (), known_env: Mapping[str, EnvFileState] | None = None) -> HostState:
    """Parse a whole collection output for `host`; `idle`: the kept units the script was offered
    (fleet.collect.script.idle_offers), those it names in @@reused are taken as they were kept
    unless the `show` printed them anyway (loaded since: the fresh block wins); `known_env`: path ->
    the kept parse of each env file whose hash (its `sha256`) was offered as known: an env section
    saying `known` is that parse with the meta read now, and only for a hash offered for its path."""
    try:
        return _parse(host, text, collected_at, duration, idle, known_env or {})
    except ParseError:
        raise
    except (ValueError, IndexError, KeyError) as e:  # defensive: a malformed field somewhere
        raise ParseError(f"{host}: malformed collection output ({e})", host=host,
                         hint="run `fleet status` again; if it persists, report the host's output") from e


# What one host's output may hold.  Beyond these, the output is refused with a ParseError rather
# than parsed: a parse costs memory in proportion to what it keeps, and these bound what it keeps
# (docs/RELIABILITY.md, "a host that prints 100 MB").
MAX_FACT_LINES = 1_000  # the script prints about a dozen
MAX_UNITS = 10_000  # systemctl show blocks: declared units plus discovered ones
MAX_UNIT_LINES = MAX_UNITS * (len(UNIT_PROPERTIES) + 4)
MAX_FILES = 50_000  # unit fragments and drop-ins, in @@hashes and in @@text
_FACTS = ("hostname", "os", "kernel", "Version", "SystemState", "uptime", "load", "mem_total_kb",
          "mem_available_kb")
_UNIT_PROPS = frozenset(UNIT_PROPERTIES)
_HEADER = re.compile(r"^@@(?!file |truncated)(.*)$", re.MULTILINE)


def _sections(host: str, text: str) -> Iterator[tuple[str, int, int]]:
    """(name, start, stop) of each complete section: its body is text[start:stop], without its last
    newline.  Nothing is copied: the output may be large and sections are parsed where they lie."""
    nl = text.find("\n")
    first = text if nl < 0 else text[:nl]
    if not first.startswith("@@fleet "):
        raise ParseError(f"{host}: output does not start with the fleet header (got {first[:80]!r})", host=host,
                         section="header",
                         hint="something on the host prints to stdout before commands run (a shell profile?)")
    if first != f"@@fleet {SCRIPT_VERSION}":
        raise ParseError(f"{host}: collection output version {first[8:88]!r}, expected {SCRIPT_VERSION}",
                         host=host, section="header")
    name, start = "", 0
    if nl >= 0:
        for m in _HEADER.finditer(text, nl + 1):
            if name:
                yield name, start, m.start() - 1
            if m.group(1) == "end":
                return
            name, start = m.group(1), m.end() + 1
    raise ParseError(f"{host}: collection output is truncated (no @@end after section {name[:40] or 'header'!r})",
                     host=host, section=name[:40] or "header",
                     hint="the connection dropped or the output was cut; run again")


def _lines(text: str, start: int, stop: int, window: int = 1 << 16) -> Iterator[str]:
    """The lines of text[start:stop], split a window of whole lines at a time: C-speed splitting,
    and never a list of all the lines of a large output."""
    while True:
        cut = stop
        if stop - start > window:
            cut = text.rfind("\n", start, start + window)
            if cut < 0:  # one line longer than the window
                cut = text.find("\n", start + window, stop)
                cut = stop if cut < 0 else cut
        yield from text[start:cut].split("\n")
        if cut >= stop:
            return
        start = cut + 1


def _parse(host: str, text: str, collected_at: float, duration: float, idle: Sequence[UnitState],
           known_env: Mapping[str, EnvFileState]) -> HostState:
    facts: HostFacts | None = None
    reused: list[UnitState] = []
    blocks: list[dict[str, str]] | None = None
    hashes: dict[str, str] | None = None
    texts: dict[str, list[tuple[str, str]]] | None = None
    kinds = {r.section: r.parser(host) for r in RESOURCES if r.section}
    seen: set[str] = set()
    for name, start, stop in _sections(host, text):
        # The script prints each section once (env paths are unique per host): a repeat is not
        # fleet's output, and a flood of repeats would cost a parse each.
        if name in seen:
            raise ParseError(f"{host}: section {name[:40]!r} appears twice in the collection output", host=host,
                             section=name[:40], hint="something on the host prints to stdout besides the script")
        seen.add(name)
        lines = _lines(text, start, stop)
        word, _, arg = name.partition(" ")
        if name == "facts":
            facts = parse_facts(host, capped(lines, MAX_FACT_LINES, host, name))
        elif name == "units":
            blocks = unit_blocks(host, capped(lines, MAX_UNIT_LINES, host, name))
        elif name == "hashes":
            hashes = parse_hashes(host, lines)
        elif name == "text":
            texts = parse_texts(host, lines)
        elif name == "reused":
            reused = parse_reused(host, lines, idle)
        elif word in kinds:
            kinds[word].section(arg, lines)
        else:
            raise ParseError(f"{host}: unknown section {name[:40]!r} in collection output", host=host,
                             section=name[:40])
    for required, value in (("facts", facts), ("units", blocks), ("hashes", hashes), ("text", texts)):
        if value is None:
            raise ParseError(f"{host}: section {required!r} missing from collection output", host=host,
                             section=required)
    assert facts is not None and blocks is not None and hashes is not None and texts is not None
    collected = Collected(host)
    for parser in kinds.values():
        parser.finish(collected)
    units = build_units(host, blocks, hashes, texts)
    if reused:
        fresh = {u.unit for u in units}
        units += tuple(u for u in reused if u.unit not in fresh)
    return HostState(host=host, facts=facts, units=units,
                     env_files=env_files(host, collected, hashes, known_env), collected_at=collected_at,
                     duration=duration,
                     extra=tuple(collected.extra.items()))


def env_files(host: str, collected: Collected, hashes: Mapping[str, str],
              known: Mapping[str, EnvFileState]) -> tuple[EnvFileState, ...]:
    """The env files as parsed, a `known` one filled in from the kept parse offered for it, and a
    fresh parse's hash kept only when the file hashed the same in the units' `sha256sum` before it
    was read and after (it did not change meanwhile: the parse is then the parse of that hash)."""
    out = []
    for e in collected.env_files:
        if e.path in collected.known_env:
            kept = known.get(e.path)
            e = fill_known(host, e, kept.sha256 if kept is not None else "", kept)
        elif e.sha256 and hashes.get(e.path) != e.sha256:
            e = replace(e, sha256="")
        out.append(e)
    return tuple(out)


def parse_facts(host: str, lines: Iterable[str]) -> HostFacts:
    kv: dict[str, str] = {}
    for line in lines:
        k, eq, v = line.partition("=")
        if eq and k in _FACTS:
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
        mem_total_kb=to_int(kv.get("mem_total_kb", "0")),
        mem_available_kb=to_int(kv.get("mem_available_kb", "0")),
    )


def parse_reused(host: str, lines: Iterable[str], idle: Sequence[UnitState]) -> list[UnitState]:
    """The kept idle units the script left out of its `show`: each must be one it was offered."""
    offered = {u.unit: u for u in idle}
    out: dict[str, UnitState] = {}
    for line in lines:
        if not line:
            continue
        if line not in offered:
            raise ParseError(f"{host}: the script reused {line[:80]!r}, a unit it was not offered", host=host,
                             section="reused", hint="something on the host prints to stdout besides the script")
        out[line] = offered[line]
    return list(out.values())


def parse_hashes(host: str, lines: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        if len(out) >= MAX_FILES:
            raise too_much(host, "hashes", f"{MAX_FILES:,} unit files")
        m = _HASH.match(line)
        if not m:
            raise ParseError(f"{host}: unexpected line in unit hashes: {line[:80]!r}", host=host, section="hashes")
        out[m.group(2)] = m.group(1)
    return out


def parse_texts(host: str, lines: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """unit -> [(path, content)] in the order printed (fragment first, then drop-ins)."""
    out: dict[str, list[tuple[str, str]]] = {}
    files = 0
    body: list[str] | None = None  # the current file's lines: one file at most is held as a list

    def close() -> None:
        if body is not None:
            out[unit].append((path, mask_unit_text("".join(f"{b}\n" for b in body))))

    def too_long(which: str) -> ParseError:  # the script says so (@@truncated), or it did not stop
        return ParseError(f"{host}: a unit file is longer than fleet accepts{which}", host=host, section="text",
                          hint="a unit file of thousands of lines is not a unit file; inspect it by hand")

    unit = path = ""
    for line in lines:
        if line.startswith("@@file "):
            parts = line[7:].split(" ", 1)
            if len(parts) != 2:
                raise ParseError(f"{host}: malformed file header {line[:80]!r}", host=host, section="text")
            close()
            files += 1
            if files > MAX_FILES:
                raise too_much(host, "text", f"{MAX_FILES:,} unit files")
            unit, path = parts
            out.setdefault(unit, [])
            body = []
        elif line == "@@truncated":
            raise too_long("")
        elif line.startswith("|") and body is not None:
            if len(body) >= MAX_TEXT_LINES:
                raise too_long(f" ({path[:80]})")
            body.append(line[1:])
        elif line:
            raise ParseError(f"{host}: unexpected line in unit texts: {line[:80]!r}", host=host, section="text")
    close()
    return out


def parse_units(host: str, lines: Iterable[str], hashes: dict[str, str],
                texts: dict[str, list[tuple[str, str]]]) -> tuple[UnitState, ...]:
    return build_units(host, unit_blocks(host, lines), hashes, texts)


def unit_blocks(host: str, lines: Iterable[str]) -> list[dict[str, str]]:
    """The `systemctl show` blocks, each keeping only the properties fleet asked for."""
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in itertools.chain(lines, ("",)):
        if not line:
            if cur:
                if len(blocks) >= MAX_UNITS:
                    raise too_much(host, "units", f"{MAX_UNITS:,} units")
                blocks.append(cur)
                cur = {}
            continue
        m = _PROP.match(line)
        if m and m.group(1) in _UNIT_PROPS:
            cur[m.group(1)] = m.group(2)
        # other lines are systemctl's complaints about a name; the unit is then simply absent
    return blocks


def build_units(host: str, blocks: list[dict[str, str]], hashes: dict[str, str],
                texts: dict[str, list[tuple[str, str]]]) -> tuple[UnitState, ...]:
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
            main_pid=to_int(b.get("MainPID", "0")),
            fragment_path=fragment,
            drop_in_paths=drop_ins,
            active_enter=b.get("ActiveEnterTimestamp", ""),
            n_restarts=to_int(b.get("NRestarts", "0")),
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


def _float(s: str) -> float:
    """Facts are shown and written as JSON: a host printing nan or 1e999 gets 0."""
    try:
        value = float(s.strip() or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0
