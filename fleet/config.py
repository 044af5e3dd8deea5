"""Loading desired_state.toml and hosts/*.toml into a validated `Desired`.

The only reader of those files.  Loading never stops at the first problem: every finding is
collected as a `Finding` (file, key path, line where known, what is wrong, how to fix it) so
that `fleet check` can report all of them in one run.  Domain rules (Sidekiq queues, placement,
env keys) live in `fleet.policy`; this module checks structure, types and references.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]


from fleet.envfile import ENV_KEY_HINT, key_problem
from fleet.errors import ConfigError
from fleet.model import (
    DEFAULT_PORTS,
    DEFAULT_SIDEKIQ_COMMAND,
    KINDS,
    MOVE_METHODS,
    ROLES,
    Desired,
    DiscoveryPattern,
    DropInSpec,
    EnvFile,
    Finding,
    HealthCheck,
    Host,
    Kind,
    MoveSpec,
    PlacementRule,
    SecretSource,
    Service,
    SidekiqPolicy,
    SidekiqSpec,
    StoreSpec,
    UnitSpec,
    WatchSettings,
    Wrapper,
    is_template,
)
from fleet.sidekiq import load_policy
from fleet.sidekiq_settings import parse_argv
from fleet.textutil import did_you_mean, digits
from fleet.unitfile import (
    DROPIN_NAME,
    KEY,
    MAX_LINES,
    SECTION,
    UnitSyntaxError,
    bad_specifiers,
    environment,
    environment_files,
    exec_start,
    is_yes,
    parse,
    render_directives,
)

# Names that end up in remote commands and file paths are restricted up front, so that no
# later stage has to wonder whether a name can carry shell syntax or a path separator.
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
UNIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:_.@-]{0,250}\.(service|socket|timer|target|path)$")
UNIT_GLOB = re.compile(r"^[A-Za-z0-9*?\[\]:_.@-]{1,255}$")
ADDRESS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ROLE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
INSTANCE = re.compile(r"^[A-Za-z0-9:_.-]{1,64}$")  # a template's instance: systemd's characters, no \x escapes
RESTART_VALUES = ("no", "on-success", "on-failure", "on-abnormal", "on-watchdog", "on-abort", "always")
# Units no prune pattern may ever match: pruning them would cut fleet (and everyone) off the host.
VITAL_UNITS = ("ssh.service", "sshd.service", "systemd-journald.service", "systemd-logind.service",
               "dbus.service", "systemd-networkd.service", "networking.service", "getty@tty1.service",
               "cron.service", "systemd-udevd.service", "systemd-resolved.service", "polkit.service")
MAX_FILE_BYTES = 1 << 20  # a 1 MiB desired state is already absurd; refuse before parsing

HOST_KEYS = ("name", "address", "port", "user", "sudo", "roles")
TOP_KEYS = ("fleet", "policy", "discover", "services", "env_files", "watch", "moves")
MOVE_KEYS = ("from", "to", "method")
SERVICE_KEYS = (
    "kind", "unit", "hosts", "requires", "observe_only", "unit_file", "health",
    "max_unavailable", "concurrency", "queues", "sidekiq_command", "instances", "overrides", "wrapper",
    "role", "probe", "port", "dropins",
)  # fmt: skip
UNIT_FILE_KEYS = (
    "description", "user", "group", "working_directory", "environment", "environment_files",
    "exec_start", "exec_reload", "restart", "restart_sec", "after", "wanted_by",
)  # fmt: skip
OWNED_UNIT_KEYS = ("source", "directives")  # the operator's own unit text, written byte for byte
OVERRIDE_KEYS = ("instances",)
MAX_UNIT_BYTES = 256 * 1024  # a unit file of a few KiB is large
HEALTH_KEYS = ("command", "http", "tcp", "sidekiq", "timeout")
ENV_FILE_KEYS = ("path", "services", "hosts", "owner", "group", "mode", "values", "sensitive", "overrides")


@dataclass
class _Ctx:
    """Collects findings for one file; knows its text so it can point at lines."""

    file: str
    text: str = ""
    findings: list[Finding] = field(default_factory=list)
    broken: list[tuple[str, int]] = field(default_factory=list)  # (service, index of its first error)

    def error(self, key: str, message: str, hint: str = "", code: str = "config.invalid") -> None:
        self.findings.append(
            Finding("error", code, message, file=self.file, key=key, line=locate(self.text, key), hint=hint)
        )

    def warn(self, key: str, message: str, hint: str = "", code: str = "config.warning") -> None:
        self.findings.append(
            Finding("warning", code, message, file=self.file, key=key, line=locate(self.text, key), hint=hint)
        )


def locate(text: str, key: str) -> int | None:
    """Best-effort line number of a dotted key path in TOML text (tomllib keeps no positions).

    Looks for the deepest table header that is a prefix of the key, then for `leaf =` after it.
    Good enough to send a reader to the right place; None when unsure.
    """
    if not text or not key:
        return None
    parts = key.split(".")
    lines = text.split("\n")  # TOML's line breaks; splitlines() would also break at U+2028 etc.
    start, depth = 0, 0
    for n in range(len(parts), 0, -1):
        header = ".".join(parts[:n])
        for i, line in enumerate(lines):
            s = line.strip()
            if s in (f"[{header}]", f"[[{header}]]"):
                start, depth = i, n
                break
        if depth:
            break
    if depth == len(parts):
        return start + 1
    if depth == 0:  # e.g. "services": point at the first [services.…] table
        for i, line in enumerate(lines):
            if line.strip().startswith((f"[{parts[0]}.", f"[[{parts[0]}.")):
                return i + 1
    for leaf in parts[depth:]:
        pat = re.compile(rf'^\s*"?{re.escape(leaf)}"?\s*=|[{{,]\s*"?{re.escape(leaf)}"?\s*=')
        for i in range(start, len(lines)):
            # a key never continues past the next table header (top-level keys: the first one)
            if (i > start or not depth) and lines[i].lstrip().startswith("["):
                break
            if pat.search(lines[i]):
                start = i
                break
        else:
            return start + 1 if depth else None
    return start + 1


class NotAFileError(OSError):
    """A path that is there but is no regular file (a directory, a FIFO, a device …)."""

    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a file")
        self.kind = kind


class FileTooLargeError(OSError):
    def __init__(self, path: Path, size: int) -> None:
        super().__init__(f"{path} is {size} bytes")
        self.size = size


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a file"))


def file_kind(mode: int) -> str:
    """What a stat mode says a path is, as words: `a directory`, `a FIFO (named pipe)` …"""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular_file(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file, or OSError: NotAFileError for a directory/FIFO/device (never
    blocking on a FIFO: it is opened non-blocking and judged by fstat before any read),
    FileTooLargeError when `limit` bytes would not hold it.  Read with os.read, the first read
    sized by fstat: a buffered `read(limit)` sized its buffer by the limit (1 MiB for each of
    1,000 host files of ~100 bytes)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFileError(path, file_kind(st.st_mode))
        if limit is not None and st.st_size >= limit:
            raise FileTooLargeError(path, st.st_size)
        chunks: list[bytes] = []
        left = -1 if limit is None else limit  # bytes still allowed; -1: no limit
        size = st.st_size + 1  # one more than fstat said: a file that grew since is read on to its end
        while left:
            chunk = os.read(fd, size if left < 0 else min(size, left))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk) if left > 0 else 0
            size = 1 << 16
        return b"".join(chunks)
    finally:
        os.close(fd)


# One `key = value` line of the shape every host file has (a bare key; a basic string without
# escapes or control characters, true/false, a decimal integer, an array of such strings on one
# line); a blank line; a comment.  A file of only such lines means in TOML exactly what
# _simple_toml makes of it; anything else is tomllib's to read (and to name the error in).
_STRING = r'"[^"\\\x00-\x1f\x7f]*"'
_SIMPLE_LINE = re.compile(
    rf"[ \t]*(?:#[^\x00-\x08\x0a-\x1f\x7f]*|([A-Za-z0-9_-]+)[ \t]*=[ \t]*"
    rf"({_STRING}|true|false|0|[1-9][0-9]{{0,17}}|\[[ \t]*\]|\[[ \t]*{_STRING}(?:[ \t]*,[ \t]*{_STRING})*[ \t]*\])"
    rf"[ \t]*)?")
_ARRAY_ITEM = re.compile(_STRING)


def _simple_toml(text: str) -> dict[str, Any] | None:
    """What tomllib would read from `text` when every line is a _SIMPLE_LINE and no key repeats;
    None otherwise.  A host file is such a text: read ~4× faster than by tomllib's parser."""
    out: dict[str, Any] = {}
    for line in text.split("\n"):
        m = _SIMPLE_LINE.fullmatch(line)
        if m is None:
            return None
        key, value = m.groups()
        if key is None:
            continue
        if key in out:
            return None  # tomllib names the duplicate
        if value[0] == '"':
            out[key] = value[1:-1]
        elif value[0] == "[":
            out[key] = [item[1:-1] for item in _ARRAY_ITEM.findall(value)]
        elif value in ("true", "false"):
            out[key] = value == "true"
        else:
            out[key] = int(value)
    return out


def read_toml(path: Path, ctx: _Ctx) -> dict[str, Any] | None:
    """Parse one TOML file; syntax errors become findings with line and column."""
    try:
        raw = read_regular_file(path, MAX_FILE_BYTES + 1)
    except NotAFileError as e:  # a FIFO or device would block or never end
        ctx.error("", f"{path} is {e.kind}, not a regular file", "replace it with a TOML file", "config.unreadable")
        return None
    except FileTooLargeError as e:  # refused before reading: a huge file costs its size in memory
        ctx.error("", f"file is {e.size} bytes; fleet refuses files over {MAX_FILE_BYTES} bytes",
                  "this is not a desired-state file, or it is generated wrongly", "config.too-large")
        return None
    except OSError as e:
        ctx.error("", f"cannot read {path}: {e.strerror or e}", "check the path and permissions", "config.unreadable")
        return None
    if len(raw) > MAX_FILE_BYTES:
        ctx.error("", f"file is over {MAX_FILE_BYTES} bytes; fleet refuses it",
                  "this is not a desired-state file, or it is generated wrongly", "config.too-large")
        return None
    try:
        ctx.text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        ctx.error("", f"file is not valid UTF-8 (byte {e.start})", "save the file as UTF-8", "config.encoding")
        return None
    simple = _simple_toml(ctx.text)
    if simple is not None:
        return simple
    try:
        return tomllib.loads(ctx.text)
    except RecursionError:
        ctx.error("", "the file nests too deeply (arrays or tables inside each other) to be read",
                  "this is not a desired-state file, or it is generated wrongly (see docs/desired-state.md)",
                  "toml.too-deep")
        return None
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        line, col = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        what = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) if m else msg
        ctx.findings.append(
            Finding("error", "toml.syntax", f"TOML syntax error: {what}", file=ctx.file, line=line,
                    column=col, hint="fix the syntax at that position; see docs/desired-state.md")
        )
        return None


# ------------------------------------------------------------------ typed accessors


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean (true/false)", float: "a number",
             list: "an array", dict: "a table"}
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(names.get(x, x.__name__) for x in ts)


def _get(ctx: _Ctx, table: dict[str, Any], prefix: str, key: str, typ: type | tuple[type, ...],
         required: bool = False, default: Any = None) -> Any:
    path = f"{prefix}.{key}" if prefix else key
    if key not in table:
        if required:
            ctx.error(path, f"missing required key '{path}'", f"add `{key} = …` (see docs/desired-state.md)",
                      "config.missing-key")
        return default
    value = table[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    # bool is a subclass of int in Python; TOML keeps them apart, and so do we.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        ctx.error(path, f"'{path}' must be {_type_name(typ)}, not {_toml_type(value)}",
                  f"write {key} as {_type_name(typ)} (see docs/desired-state.md)", "config.wrong-type")
        return default
    return value


def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def _str_list(ctx: _Ctx, table: dict[str, Any], prefix: str, key: str, required: bool = False) -> list[str]:
    value = _get(ctx, table, prefix, key, list, required, [])
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            ctx.error(f"{prefix}.{key}", f"'{prefix}.{key}[{i}]' must be a string, not {_toml_type(item)}",
                      "quote it: every item of this list is a string", code="config.wrong-type")
        else:
            out.append(item)
    return out


def _unknown_keys(ctx: _Ctx, table: dict[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            path = f"{prefix}.{key}" if prefix else key
            hint = did_you_mean(key, allowed) or f"allowed keys here: {', '.join(allowed)}"
            ctx.error(path, f"unknown key '{path}'", hint, "config.unknown-key")


def _check_name(ctx: _Ctx, path: str, value: str, pattern: re.Pattern[str], what: str) -> bool:
    if not pattern.fullmatch(value):
        ctx.error(path, f"{what} {value!r} contains characters fleet does not accept",
                  f"use only the characters matched by {pattern.pattern}", "config.bad-name")
        return False
    return True


def _check_env_key(ctx: _Ctx, path: str, key: str) -> bool:
    """Every env variable name, wherever it is declared, through envfile's one validator."""
    problem = key_problem(key)
    if problem:
        ctx.error(path, problem, ENV_KEY_HINT, "config.bad-name")
        return False
    return True


def env_path_ok(path: str) -> bool:
    """An env file path fleet writes: absolute, a file, no `.`/`..` segment, no control character."""
    return (path.startswith("/") and not path.endswith("/") and "/../" not in path + "/" and "/./" not in path + "/"
            and not any(ord(c) < 32 or c == "\x7f" for c in path))


def _no_control(ctx: _Ctx, path: str, value: str) -> bool:
    if any(ord(c) < 32 and c != "\t" for c in value):
        ctx.error(path, f"'{path}' contains a newline or control character",
                  "unit file settings are single lines; remove it", "config.bad-value")
        return False
    return True


# ------------------------------------------------------------------ hosts


def load_hosts(hosts_dir: Path) -> tuple[tuple[Host, ...], list[Finding]]:
    """One Host per `*.toml` file in hosts_dir, sorted by name."""
    hosts, findings, _, _ = _load_hosts(hosts_dir)
    return hosts, findings


def _host_files(hosts_dir: Path) -> list[Path]:
    """The `*.toml` files of the inventory directory; ConfigError (one, naming the directory and
    the operating system's reason) when it cannot be listed: every host would be missing."""
    hint = "create it with one <name>.toml per host, or pass --hosts DIR"
    try:
        st = os.stat(hosts_dir)
    except FileNotFoundError:
        raise ConfigError(f"hosts directory {hosts_dir} does not exist", file=str(hosts_dir), hint=hint) from None
    except OSError as e:
        raise ConfigError(f"cannot read the hosts directory {hosts_dir}: {e.strerror or e}", file=str(hosts_dir),
                          hint="check the path and its permissions (fleet lists and reads it)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"hosts directory {hosts_dir} is {file_kind(st.st_mode)}, not a directory",
                          file=str(hosts_dir), hint=hint)
    try:
        with os.scandir(hosts_dir) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(".toml"))
    except OSError as e:
        raise ConfigError(f"cannot read the hosts directory {hosts_dir}: {e.strerror or e}", file=str(hosts_dir),
                          hint="check its permissions: fleet lists it and reads every *.toml in it") from None
    return [hosts_dir / n for n in names]


def _load_hosts(hosts_dir: Path) -> tuple[tuple[Host, ...], list[Finding], tuple[Host, ...], list[str]]:
    """(hosts, findings, stand-ins for the host files that failed to load, every host file's
    name).  A stand-in carries only the name: enough for the policies to count a service on it
    as declared when they judge which findings only follow from the broken file."""
    findings: list[Finding] = []
    files = _host_files(hosts_dir)
    hosts: list[Host] = []
    broken: list[Host] = []
    for path in files:
        ctx = _Ctx(str(path))
        host = _load_host(path, ctx)
        findings += ctx.findings
        if host is not None:
            hosts.append(host)
        elif HOST_NAME.fullmatch(path.stem):
            broken.append(Host(name=path.stem, address="", source=str(path)))
    if not hosts and not findings:
        findings.append(Finding("error", "hosts.empty", f"no host files (*.toml) in {hosts_dir}",
                                file=str(hosts_dir), hint="add one <name>.toml per host"))
    seen: dict[tuple[str, int], Host] = {}
    for h in hosts:
        where = (_same_address(h.address), h.port)
        other = seen.get(where)
        if other is not None:
            findings.append(Finding("error", "hosts.same-address",
                                    f"hosts {other.name} and {h.name} both point at {h.address}:{h.port}",
                                    file=h.source, key="address",
                                    hint="two names for one machine would make fleet act on it twice; "
                                         "give each host its own address"))
        seen[where] = h
    return tuple(hosts), findings, tuple(broken), [p.stem for p in files]


def _same_address(address: str) -> str:
    """One spelling per machine: DNS names are case-insensitive and may end in a dot; IP
    addresses have many spellings (0::1 is ::1)."""
    if ":" not in address and not digits(address.replace(".", "")):  # a name: no IPv6, not only ASCII digits
        return address.lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.lower().rstrip(".")


def _load_host(path: Path, ctx: _Ctx) -> Host | None:
    data = read_toml(path, ctx)
    if data is None:
        return None
    stem = path.stem
    if not _check_name(ctx, "", stem, HOST_NAME, "host file name"):
        return None
    _unknown_keys(ctx, data, "", HOST_KEYS)
    name = _get(ctx, data, "", "name", str, default=stem)
    if name != stem:
        ctx.error("name", f"file {path.name} declares name = {name!r}; the file name says {stem!r}",
                  f"rename the file to {name}.toml or set name = \"{stem}\"", "hosts.name-mismatch")
    address = _get(ctx, data, "", "address", str, required=True)
    port = _get(ctx, data, "", "port", int, default=22)
    user = _get(ctx, data, "", "user", str, default="root")
    sudo = _get(ctx, data, "", "sudo", bool, default=False)
    roles = _str_list(ctx, data, "", "roles")
    ok = address is not None and _check_name(ctx, "address", address, ADDRESS, "address")
    if not 1 <= port <= 65535:
        ctx.error("port", f"port {port} is outside 1–65535", "use the host's SSH port", "hosts.bad-port")
        ok = False
    if not _check_name(ctx, "user", user, USER_NAME, "user name"):
        ok = False
    for r in roles:
        ok = _check_name(ctx, "roles", r, ROLE, "role") and ok
    if sudo and user == "root":
        ctx.warn("sudo", "sudo = true with user = \"root\" is redundant", "drop `sudo` or use a non-root user")
    if not ok or any(f.is_error for f in ctx.findings):
        return None
    return Host(name=stem, address=address, port=port, user=user, sudo=sudo, roles=tuple(roles), source=str(path))


# ------------------------------------------------------------------ desired state


@dataclass(frozen=True)
class Loaded:
    """The result of loading: a Desired (None when the files are unusable) and every finding."""

    desired: Desired | None
    findings: tuple[Finding, ...]
    texts: tuple[tuple[str, str], ...] = ()  # (file, text) of what was read, to point at lines

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.is_error)


def load(desired_path: Path, hosts_dir: Path) -> Loaded:
    """Load and structurally validate the desired state and inventory.  Never raises on bad
    content; raises ConfigError only when a file or directory is missing or unreadable altogether."""
    return _load(desired_path, hosts_dir)[0]


WhatIf = Callable[[Collection[str]], Desired]


def _load(desired_path: Path, hosts_dir: Path) -> tuple[Loaded, WhatIf | None, list[tuple[str, int]]]:
    """The load, a what-if (the desired state as it would be if the given broken entities had
    loaded, as far as can be told), and the broken entities with the index of their first error
    in the findings: `host:NAME` for a host file, `service:NAME` for a service."""
    try:
        st = os.stat(desired_path)
    except FileNotFoundError:
        raise ConfigError(f"desired state file {desired_path} does not exist", file=str(desired_path),
                          hint="run fleet in the directory holding desired_state.toml, or pass --dir/--desired"
                          ) from None
    except OSError as e:
        raise ConfigError(f"cannot read the desired state file {desired_path}: {e.strerror or e}",
                          file=str(desired_path), hint="check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):  # said before anything reads it: a FIFO would block
        raise ConfigError(f"desired state file {desired_path} is {file_kind(st.st_mode)}, not a file",
                          file=str(desired_path), hint="pass the TOML file itself with --desired FILE (or --dir DIR)")
    hosts, findings, stand_ins, host_files = _load_hosts(hosts_dir)
    ctx = _Ctx(str(desired_path))
    data = read_toml(desired_path, ctx)
    texts = ((ctx.file, ctx.text),)
    if data is None:
        return Loaded(None, tuple(findings + ctx.findings), texts), None, []
    desired = _build_desired(data, hosts, ctx, desired_path, hosts_dir, host_files)
    first_error = {h.name: next((i for i, f in enumerate(findings) if f.file == h.source and f.is_error), None)
                   for h in stand_ins}
    broken = [(f"host:{name}", i) for name, i in first_error.items() if i is not None]
    broken += [(f"service:{name}", len(findings) + i) for name, i in ctx.broken]

    def what_if(entities: Collection[str]) -> Desired:
        extra = tuple(h for h in stand_ins if f"host:{h.name}" in entities)
        lenient = frozenset(e.split(":", 1)[1] for e in entities if e.startswith("service:"))
        return _build_desired(data, hosts + extra, _Ctx(ctx.file, ctx.text), desired_path, hosts_dir, host_files,
                              lenient=lenient)

    return Loaded(desired, tuple(findings + ctx.findings), texts), what_if, broken


MAX_ATTRIBUTED = 8  # broken entities judged one by one to say which follow-ons each one causes


def load_checked(desired_path: Path, hosts_dir: Path,
                 check: Callable[[Desired], list[Finding]]) -> tuple[Loaded, list[Finding]]:
    """Load, then judge the loaded fleet with `check` (the domain policies): every finding, root
    causes first.  A host file or service that fails to load is left out of the fleet the
    policies judge, so some of their findings would only be its consequences ("queue pull is
    served by nobody" when the host that serves it has port 70000): a policy finding that
    disappears once the broken entities are counted in as declared is not shown, and the
    broken entity's first error says how many were not."""
    loaded, what_if, broken = _load(desired_path, hosts_dir)
    findings = list(loaded.findings)
    if loaded.desired is None:
        return loaded, findings
    judged = with_lines(check(loaded.desired), loaded)
    if what_if is None or not broken:
        return loaded, findings + judged

    def key(f: Finding) -> tuple[str, str, str, str]:
        return (f.code, f.key, f.message, f.host)

    still = {key(f) for f in check(what_if([e for e, _ in broken]))}
    follow = [f for f in judged if key(f) not in still]
    if not follow:
        return loaded, findings + judged
    counts: dict[int, int] = {}
    left = list(follow)
    for entity, root in broken[:MAX_ATTRIBUTED]:  # whose alone is each follow-on?
        gone = {key(f) for f in check(what_if([entity]))}
        mine = [f for f in left if key(f) not in gone]
        if mine:
            counts[root] = counts.get(root, 0) + len(mine)
            left = [f for f in left if key(f) in gone]
    if left:  # follows only from several together: on the first of them
        first = min(i for _, i in broken)
        counts[first] = counts.get(first, 0) + len(left)
    for i, n in counts.items():
        what = "1 finding that follows from this was" if n == 1 else f"{n} findings that follow from this were"
        findings[i] = replace(findings[i], message=f"{findings[i].message} ({what} not shown: fix this first)")
    return loaded, findings + [f for f in judged if key(f) in still]


def with_lines(findings: list[Finding], loaded: Loaded) -> list[Finding]:
    """Give findings made without the file text (the policies) a line number where one is found."""
    texts = dict(loaded.texts)
    out = []
    for f in findings:
        if f.line is None and f.key and f.file in texts:
            f = replace(f, line=locate(texts[f.file], f.key))
        out.append(f)
    return out


def _build_desired(data: dict[str, Any], hosts: tuple[Host, ...], ctx: _Ctx, path: Path, hosts_dir: Path,
                   files: list[str], *, lenient: frozenset[str] = frozenset()) -> Desired:
    """`files`: the names of every host file (loaded or not).  `lenient`: services to keep, as
    far as they can be read, even when broken (see load_checked's what-if); never for real use."""
    _unknown_keys(ctx, data, "", TOP_KEYS)
    fleet_t = _get(ctx, data, "", "fleet", dict, default={})
    _unknown_keys(ctx, fleet_t, "fleet", ("name", "snapshot_retention_days"))
    name = _get(ctx, fleet_t, "fleet", "name", str, default=path.parent.resolve().name or "fleet")
    retention = _get(ctx, fleet_t, "fleet", "snapshot_retention_days", (int, float), default=90)
    if not 0 < retention < 36500:  # also refuses nan
        ctx.error("fleet.snapshot_retention_days",
                  f"snapshot_retention_days must be above 0 and below 100 years, got {retention}",
                  "for example snapshot_retention_days = 90", "config.bad-value")
        retention = 90

    policy_t = _get(ctx, data, "", "policy", dict, default={})
    placement, extra_keys = _load_policy(ctx, policy_t)
    discover = _load_discover(ctx, _get(ctx, data, "", "discover", list, default=[]))
    watch = _load_watch(ctx, data.get("watch"))
    host_names = [h.name for h in hosts]
    # A host whose file is invalid is reported in its own file; references to it stay valid.
    host_files = sorted(set(files) | set(host_names))

    services_t = _get(ctx, data, "", "services", dict, default={})
    services: list[Service] = []
    for sname, st in services_t.items():
        prefix = f"services.{sname}"
        if not _check_name(ctx, prefix, sname, SERVICE_NAME, "service name"):
            continue
        if not isinstance(st, dict):
            ctx.error(prefix, f"'{prefix}' must be a table", f"write it as [{prefix}]", "config.wrong-type")
            continue
        before = len(ctx.findings)
        svc = _load_service(ctx, sname, st, host_names, host_files, hosts_dir, path.parent, lenient=sname in lenient)
        first_error = next((i for i in range(before, len(ctx.findings)) if ctx.findings[i].is_error), None)
        if first_error is not None:
            ctx.broken.append((sname, first_error))
        if svc is not None:
            services.append(svc)
    if not services_t:
        ctx.error("services", "no services declared", "declare at least one [services.NAME] table",
                  "config.missing-key")

    declared = list(services_t)
    _check_references(ctx, services, declared)
    env_files = _load_env_files(ctx, _get(ctx, data, "", "env_files", dict, default={}), services, declared,
                                host_files, hosts_dir)
    moves = _load_moves(ctx, _get(ctx, data, "", "moves", dict, default={}), services, declared, host_files)
    sidekiq_policy = _load_sidekiq_policy(ctx, policy_t, _get(ctx, data, "", "env_files", dict, default={}))
    return Desired(name=name, hosts=hosts, services=tuple(services), env_files=tuple(env_files),
                   discover=tuple(discover), placement=tuple(placement), extra_env_keys=tuple(extra_keys),
                   snapshot_retention_days=float(retention), watch=watch, moves=tuple(moves),
                   source=str(path), hosts_dir=str(hosts_dir), sidekiq_policy=sidekiq_policy)


def _load_watch(ctx: _Ctx, table: object) -> WatchSettings:
    """`[watch]`: fleet.notify owns what a notification target may be; its findings get lines here."""
    if table is None:  # no [watch]: nothing to check (validate_watch's answer), and no fleet.notify to import
        return WatchSettings()  # (urllib, ssl, email: ~25 ms of every `check`, `status` and `plan`)
    # Imported here: fleet.notify reaches fleet.audit, which imports this module.
    from fleet.notify import validate_watch

    settings, findings = validate_watch(table, file=ctx.file)
    ctx.findings += [replace(f, line=locate(ctx.text, f.key)) if f.line is None and f.key else f for f in findings]
    return settings


def _load_moves(ctx: _Ctx, table: dict[str, Any], services: list[Service], declared: list[str],
                host_files: list[str]) -> list[MoveSpec]:
    """`[moves.SERVICE]`: from, to, method.  A move takes a postgres or redis service off `from`,
    onto `to`, where it is declared; the method must be the one fleet knows how to check for the
    kind (MOVE_METHODS): fleet never copies data, it checks that the operator's replication did."""
    out: list[MoveSpec] = []
    by_name = {s.name: s for s in services}
    for name, mt in table.items():
        prefix = f"moves.{name}"
        if not isinstance(mt, dict):
            ctx.error(prefix, f"'{prefix}' must be a table", f"write it as [{prefix}] with from, to and method",
                      "config.wrong-type")
            continue
        _unknown_keys(ctx, mt, prefix, MOVE_KEYS)
        source = _get(ctx, mt, prefix, "from", str, required=True)
        target = _get(ctx, mt, prefix, "to", str, required=True)
        method = _get(ctx, mt, prefix, "method", str, required=True)
        svc = by_name.get(name)
        if svc is None:
            if name not in declared:  # a declared but broken service has its own errors
                ctx.error(prefix, f"[{prefix}] names no declared service",
                          did_you_mean(name, declared) or "name the postgres or redis service that moves, "
                          "e.g. [moves.postgres]", "config.unknown-service")
            continue
        methods = MOVE_METHODS.get(svc.kind)
        if methods is None:
            ctx.error(prefix, f"[{prefix}]: service {name} is of kind {svc.kind.value!r}; only postgres and redis "
                      "services are moved this way", "remove the table: other services move by changing their hosts",
                      "config.bad-value")
            continue
        ok = True
        for key, host in (("from", source), ("to", target)):
            if host is not None and host not in host_files:
                ctx.error(f"{prefix}.{key}", f"{prefix}.{key} = {host!r} is no host of the inventory",
                          did_you_mean(host, host_files) or f"hosts: {', '.join(host_files)}", "config.unknown-host")
                ok = False
        if ok and source is not None and source == target:
            ctx.error(f"{prefix}.to", f"{prefix} moves {name} from {source} to the same host",
                      "name the host it moves to, or remove the table", "config.bad-value")
            ok = False
        if ok and target is not None and target not in svc.hosts:
            ctx.error(f"{prefix}.to", f"{prefix}.to = {target!r}, but services.{name}.hosts does not list it",
                      f"declare {name} on {target}: hosts = [\"{target}\"]", "config.bad-value")
            ok = False
        if ok and source is not None and source in svc.hosts:
            ctx.error(f"{prefix}.from", f"{prefix}.from = {source!r}, but services.{name}.hosts still lists it",
                      f"a move takes {name} off {source}: remove {source} from services.{name}.hosts",
                      "config.bad-value")
            ok = False
        if method is not None and method != methods:
            ctx.error(f"{prefix}.method", f"{prefix}.method = {method!r} is not how fleet moves a {svc.kind.value} "
                      "service", f"method = \"{methods}\" (the operator's replication; fleet checks it)",
                      "config.bad-value")
            ok = False
        if ok and source is not None and target is not None and method is not None:
            out.append(MoveSpec(service=name, source=source, target=target, method=method))
    return out


def _load_policy(ctx: _Ctx, policy: dict[str, Any]) -> tuple[list[PlacementRule], list[str]]:
    _unknown_keys(ctx, policy, "policy", ("placement", "env", "sidekiq"))
    rules: list[PlacementRule] = []
    placement = _get(ctx, policy, "policy", "placement", dict, default={})
    for role, rt in placement.items():
        prefix = f"policy.placement.{role}"
        if not isinstance(rt, dict):
            ctx.error(prefix, f"'{prefix}' must be a table", f"write [{prefix}] with forbid = [...]",
                      "config.wrong-type")
            continue
        _unknown_keys(ctx, rt, prefix, ("forbid",))
        forbid = _str_list(ctx, rt, prefix, "forbid", required=True)
        for k in forbid:
            if k not in KINDS:
                ctx.error(f"{prefix}.forbid", f"unknown service kind {k!r} in {prefix}.forbid",
                          did_you_mean(k, KINDS) or f"kinds: {', '.join(KINDS)}", "config.bad-value")
        rules.append(PlacementRule(role=role, forbid=tuple(k for k in forbid if k in KINDS)))
    env = _get(ctx, policy, "policy", "env", dict, default={})
    _unknown_keys(ctx, env, "policy.env", ("extra_keys",))
    extra = [k for k in _str_list(ctx, env, "policy.env", "extra_keys")
             if _check_env_key(ctx, "policy.env.extra_keys", k)]
    return rules, extra


def _load_sidekiq_policy(ctx: _Ctx, policy: dict[str, Any], env_files: dict[str, Any]) -> SidekiqPolicy:
    """`[policy.sidekiq]`, validated by fleet.sidekiq (which owns its meaning); its env_file must
    name a declared [env_files.NAME] table (declared, even if that table has errors of its own)."""
    loaded, found = load_policy(policy.get("sidekiq"), file=ctx.file, env_files=list(env_files))
    ctx.findings += [replace(f, line=locate(ctx.text, f.key)) for f in found]
    return loaded


def _load_discover(ctx: _Ctx, items: list[Any]) -> list[DiscoveryPattern]:
    out: list[DiscoveryPattern] = []
    for i, item in enumerate(items):
        prefix = f"discover[{i}]"
        if not isinstance(item, dict):
            ctx.error("discover", f"'{prefix}' must be a table", "write it as [[discover]] with pattern = \"…\"",
                      "config.wrong-type")
            continue
        _unknown_keys(ctx, item, "discover", ("pattern", "prune"))
        pattern = _get(ctx, item, "discover", "pattern", str, required=True)
        prune = _get(ctx, item, "discover", "prune", bool, default=False)
        if pattern is not None and _check_name(ctx, "discover.pattern", pattern, UNIT_GLOB, "discovery pattern"):
            vital = [u for u in VITAL_UNITS if fnmatch.fnmatchcase(u, pattern)]
            if prune and vital:
                ctx.error("discover.pattern", f"pattern {pattern!r} with prune = true would stop {', '.join(vital)}",
                          "narrow the pattern (e.g. \"mastodon-*\"); fleet prunes every undeclared unit it matches",
                          "config.dangerous-prune")
            else:
                out.append(DiscoveryPattern(pattern=pattern, prune=prune))
    return out


def _load_service(ctx: _Ctx, name: str, st: dict[str, Any], host_names: list[str], host_files: list[str],
                  hosts_dir: Path, base: Path, *, lenient: bool = False) -> Service | None:
    prefix = f"services.{name}"
    _unknown_keys(ctx, st, prefix, SERVICE_KEYS)
    kind_s = _get(ctx, st, prefix, "kind", str, required=True)
    kind: Kind | None = None
    if kind_s is not None:
        if kind_s in KINDS:
            kind = Kind(kind_s)
        else:
            ctx.error(f"{prefix}.kind", f"unknown kind {kind_s!r}",
                      did_you_mean(kind_s, KINDS) or f"kinds: {', '.join(KINDS)}", "config.bad-value")
    unit = _get(ctx, st, prefix, "unit", str, required=True)
    if unit is not None:
        _check_name(ctx, f"{prefix}.unit", unit, UNIT_NAME, "unit name")
    hosts = _str_list(ctx, st, prefix, "hosts", required=True)
    seen: set[str] = set()
    files = set(host_files)  # a set: a service may list every host of the inventory (a scan each was quadratic)
    for h in hosts:
        if h in seen:
            ctx.error(f"{prefix}.hosts", f"host {h!r} is listed twice in {prefix}.hosts", "list each host once",
                      "config.duplicate")
        seen.add(h)
        if h not in files:
            hint = did_you_mean(h, host_files) or f"add {hosts_dir}/{h}.toml or remove it from the list"
            ctx.error(f"{prefix}.hosts", f"service {name!r} names host {h!r}, which has no file in {hosts_dir}/",
                      hint, "config.unknown-host")
    requires = _str_list(ctx, st, prefix, "requires")
    observe_only = _get(ctx, st, prefix, "observe_only", bool, default=False)
    max_unavailable = _get(ctx, st, prefix, "max_unavailable", int, default=1)
    if max_unavailable < 1:
        ctx.error(f"{prefix}.max_unavailable", "max_unavailable must be at least 1",
                  "1 rolls one host at a time", "config.bad-value")
    health = _load_health(ctx, prefix, _get(ctx, st, prefix, "health", dict))

    unit_t = _get(ctx, st, prefix, "unit_file", dict)
    owned = unit_t is not None and any(k in unit_t for k in OWNED_UNIT_KEYS)
    sidekiq: SidekiqSpec | None = None
    sidekiq_keys = [k for k in ("concurrency", "queues", "sidekiq_command") if k in st]
    if kind == Kind.SIDEKIQ and owned:
        for k in sidekiq_keys:
            ctx.error(f"{prefix}.{k}", f"'{k}' does not apply: this Sidekiq's ExecStart is in its own unit text",
                      "remove it; fleet reads -c and -q from the unit's ExecStart, and the queues from "
                      "config/sidekiq.yml on the host when there is no -q", "config.bad-key")
    elif kind == Kind.SIDEKIQ:
        sidekiq = _load_sidekiq(ctx, prefix, st)
    elif kind is not None and sidekiq_keys:
        for k in sidekiq_keys:
            ctx.error(f"{prefix}.{k}", f"'{k}' only applies to kind = \"sidekiq\"",
                      "remove it, or set kind = \"sidekiq\"", "config.bad-key")

    store = _load_store(ctx, prefix, st, kind)

    unit_spec: UnitSpec | None = None
    if observe_only:
        if unit_t is not None:
            ctx.error(f"{prefix}.unit_file", f"{name} is observe_only, so fleet never writes its unit",
                      "remove [unit_file], or set observe_only = false", "config.bad-key")
    elif unit_t is None:
        if kind is not None:
            ctx.error(f"{prefix}.unit_file", f"service {name!r} needs a [{prefix}.unit_file] table",
                      "describe the unit (exec_start, user …), or set observe_only = true for distro units",
                      "config.missing-key")
    elif owned:
        unit_spec = _load_owned_unit(ctx, f"{prefix}.unit_file", unit_t, base)
        if unit_spec is not None and kind == Kind.SIDEKIQ:
            sidekiq = _sidekiq_of_text(ctx, f"{prefix}.unit_file", unit_spec)
    else:
        unit_spec = _load_unit(ctx, f"{prefix}.unit_file", unit_t, sidekiq, derived=kind == Kind.SIDEKIQ)

    if health is not None and health.sidekiq:
        _check_sidekiq_health(ctx, prefix, kind, unit_spec)

    template = unit is not None and UNIT_NAME.fullmatch(unit) is not None and is_template(unit)
    instances, host_instances = _load_instances(ctx, prefix, st, template, hosts)
    wrapper = _load_wrapper(ctx, prefix, st, template, observe_only, unit, base)
    dropins = _load_dropins(ctx, prefix, st, observe_only, unit, base)

    # Keep a service whose only faults are recoverable (unknown keys, unknown hosts, …) so that
    # the policies still judge the rest of the fleet; drop it only when its essence is missing.
    if kind is None or unit is None or not UNIT_NAME.fullmatch(unit) or (
            not observe_only and unit_spec is None) or (kind == Kind.SIDEKIQ and sidekiq is None) or (
            template and not instances and not host_instances):
        return _stand_in(name, st, kind, unit, hosts, sidekiq) if lenient else None
    known = set(host_names)  # a set: a service may list every host of the inventory
    return Service(name=name, kind=kind, unit=unit,
                   hosts=tuple(dict.fromkeys(hosts)) if lenient else tuple(h for h in hosts if h in known),
                   requires=tuple(requires),
                   observe_only=observe_only, unit_spec=unit_spec, sidekiq=sidekiq, health=health,
                   max_unavailable=max_unavailable, instances=instances, host_instances=host_instances,
                   wrapper=wrapper, store=store, dropins=dropins)


def _load_dropins(ctx: _Ctx, prefix: str, st: dict[str, Any], observe_only: bool, unit: Any,
                  base: Path) -> tuple[DropInSpec, ...] | None:
    """`[services.NAME.dropins]`: `"10-limits.conf" = "units/x.service.d/10-limits.conf"`, each a
    file in the repository written byte for byte to /etc/systemd/system/UNIT.d/NAME.  Absent:
    fleet declares none and owns none.  A table (an empty one too): fleet owns UNIT.d/*.conf."""
    dt = _get(ctx, st, prefix, "dropins", dict)
    if dt is None:
        return None
    p = f"{prefix}.dropins"
    if observe_only:
        ctx.error(p, "fleet writes drop-ins only for a unit it writes, and this service is observe_only",
                  "remove [dropins], or set observe_only = false with a [unit_file]", "config.bad-key")
        return None
    out: list[DropInSpec] = []
    for name, source in dt.items():
        key = f"{p}.{name}" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f"{p}.{json.dumps(name)}"
        if not DROPIN_NAME.fullmatch(name):
            ctx.error(key, f"drop-in name {name[:80]!r} is not a plain NAME.conf file name",
                      f"name it like \"10-limits.conf\": no '/', no leading dot, only the characters of "
                      f"{DROPIN_NAME.pattern}", "config.bad-name")
            continue
        if not isinstance(source, str):
            ctx.error(key, f"'{key}' must be the path of a file in the repository",
                      f"for example \"units/{unit or 'NAME.service'}.d/{name}\"", "config.wrong-type")
            continue
        text = _read_unit_source(ctx, key, source, base)
        if text is None:
            continue
        try:
            parse(text)
        except UnitSyntaxError as e:
            ctx.findings.append(Finding("error", "config.unit-syntax", f"not a drop-in ({key}): {e.reason}",
                                        file=str(base / source), line=e.line,
                                        hint="systemd reads [Section] headers, Key=value lines and # comments"))
            continue
        out.append(DropInSpec(name=name, text=text, source=source))
    return tuple(out)


def _load_instances(ctx: _Ctx, prefix: str, st: dict[str, Any], template: bool,
                    hosts: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    """A template's instances, on every host and per host (`[services.NAME.overrides.HOST]`)."""
    overrides = _get(ctx, st, prefix, "overrides", dict, default={})
    if "instances" in st and not template:
        ctx.error(f"{prefix}.instances", "instances apply only to a template unit (unit = \"NAME@.service\")",
                  "remove instances, or make unit a template", "config.bad-key")
        return (), ()
    instances = _instance_list(ctx, f"{prefix}.instances", st) if "instances" in st else []
    per_host: list[tuple[str, tuple[str, ...]]] = []
    for h, ot in overrides.items():
        op = f"{prefix}.overrides.{h}"
        if h not in hosts:
            ctx.error(op, f"override for host {h!r}, which is not one of {prefix}.hosts",
                      did_you_mean(h, hosts) or "remove the override or add the host", "config.unknown-host")
            continue
        if not isinstance(ot, dict):
            ctx.error(op, f"'{op}' must be a table", f"write it as [{op}] with instances = [...]", "config.wrong-type")
            continue
        _unknown_keys(ctx, ot, op, OVERRIDE_KEYS)
        if "instances" in ot:
            if not template:
                ctx.error(f"{op}.instances", "instances apply only to a template unit (unit = \"NAME@.service\")",
                          "remove them, or make unit a template", "config.bad-key")
                continue
            per_host.append((h, tuple(_instance_list(ctx, f"{op}.instances", ot))))
    if template:
        missing = [h for h in hosts if h not in dict(per_host)] if not instances else []
        if missing and "instances" not in st:
            ctx.error(f"{prefix}.unit", f"{st.get('unit')} is a template: systemd starts only its instances, and "
                      f"none is declared{' for ' + ', '.join(missing) if per_host else ''}",
                      "list them: instances = [\"4000\", \"4001\"] (per host in [services.NAME.overrides.HOST])",
                      "config.bare-template")
    return tuple(instances), tuple(per_host)


def _instance_list(ctx: _Ctx, path: str, table: dict[str, Any]) -> list[str]:
    key = path.rsplit(".", 1)[1]
    names = _str_list(ctx, table, path.rsplit(".", 1)[0], key)
    out: list[str] = []
    for i in names:
        if not INSTANCE.fullmatch(i):
            ctx.error(path, f"instance name {i!r} contains characters fleet does not accept",
                      f"use only the characters matched by {INSTANCE.pattern}", "config.bad-name")
        elif i in out:
            ctx.error(path, f"instance {i!r} is listed twice", "list each instance once", "config.duplicate")
        else:
            out.append(i)
    if not names and key == "instances":
        ctx.error(path, "a template needs at least one instance", "for example instances = [\"4000\"]",
                  "config.bare-template")
    return out


def _load_wrapper(ctx: _Ctx, prefix: str, st: dict[str, Any], template: bool, observe_only: bool, unit: Any,
                  base: Path) -> Wrapper | None:
    wt = _get(ctx, st, prefix, "wrapper", dict)
    if wt is None:
        return None
    p = f"{prefix}.wrapper"
    if not template:
        ctx.error(p, "a wrapper starts a template's instances together; this service's unit is no template",
                  "remove [wrapper], or make unit a template (NAME@.service)", "config.bad-key")
        return None
    if observe_only:
        ctx.error(p, "fleet writes a wrapper's unit file, and this service is observe_only",
                  "remove [wrapper], or set observe_only = false", "config.bad-key")
        return None
    name = _get(ctx, wt, p, "unit", str, required=True)
    if name is not None and _check_name(ctx, f"{p}.unit", name, UNIT_NAME, "unit name"):
        if is_template(name) or name == unit:
            ctx.error(f"{p}.unit", f"the wrapper {name!r} must be a plain unit of its own, not the template "
                      "or another template", "for example unit = \"mastodon-streaming.service\"", "config.bad-value")
            name = None
    else:
        name = None
    spec = _load_owned_unit(ctx, p, wt, base, extra=("unit",))
    if name is None or spec is None:
        return None
    return Wrapper(unit=name, unit_spec=spec)


def _load_owned_unit(ctx: _Ctx, p: str, ut: dict[str, Any], base: Path,
                     extra: tuple[str, ...] = ()) -> UnitSpec | None:
    """`unit_file = { source = "units/x.service" }` (a file in the repository, byte for byte) or
    `directives = [[SECTION, KEY, VALUE], …]` (any directive, in order, repeated keys too)."""
    for k in ut:
        if k in UNIT_FILE_KEYS:
            ctx.error(f"{p}.{k}", f"'{p}.{k}' cannot be combined with source or directives: the unit text is "
                      "the operator's own", f"remove {k} (write it in the unit text), or remove source/directives",
                      "config.bad-key")
    _unknown_keys(ctx, {k: v for k, v in ut.items() if k not in UNIT_FILE_KEYS}, p, (*OWNED_UNIT_KEYS, *extra))
    source = _get(ctx, ut, p, "source", str)
    directives = _get(ctx, ut, p, "directives", list)
    if source is not None and directives is not None:
        ctx.error(p, f"{p} has both source and directives", "keep one: the file, or the directives",
                  "config.bad-key")
        return None
    if source is None and directives is None:
        ctx.error(p, f"{p} needs source = \"units/NAME\" or directives = [[SECTION, KEY, VALUE], …]",
                  "see docs/desired-state.md", "config.missing-key")
        return None
    if source is not None:
        text = _read_unit_source(ctx, f"{p}.source", source, base)
        label = source
    else:
        text = _directives_text(ctx, f"{p}.directives", directives or [])
        label = "directives"
    if text is None:
        return None
    try:
        unit = parse(text)
    except UnitSyntaxError as e:
        if source is not None:
            ctx.findings.append(Finding("error", "config.unit-syntax", f"not a unit file: {e.reason}",
                                        file=str(base / source), line=e.line,
                                        hint="systemd reads [Section] headers, Key=value lines and # comments"))
        else:
            ctx.error(f"{p}.directives", f"the directives do not make a unit file: {e.reason}",
                      "each is [SECTION, KEY, VALUE]", "config.bad-value")
        return None
    env_files = environment_files(unit)
    for f in env_files:
        if not f.startswith("/"):
            ctx.error(p, f"EnvironmentFile={f} in {label} is not an absolute path", "systemd needs an absolute path",
                      "config.bad-value")
    return UnitSpec(exec_start=exec_start(unit), description=unit.value("Unit", "Description") or "",
                    user=unit.value("Service", "User"), group=unit.value("Service", "Group"),
                    working_directory=unit.value("Service", "WorkingDirectory"),
                    environment=tuple(environment(unit)), environment_files=tuple(env_files),
                    exec_reload=next(iter(unit.values("Service", "ExecReload")), None),
                    restart=unit.value("Service", "Restart"), restart_sec=unit.value("Service", "RestartSec"),
                    after=tuple(w for v in unit.values("Unit", "After") for w in v.split()),
                    wanted_by=tuple(w for v in unit.values("Install", "WantedBy") for w in v.split()),
                    text=text, source=label,
                    remain_after_exit=unit.value("Service", "Type") == "oneshot"
                    and is_yes(unit.value("Service", "RemainAfterExit")))


def _read_unit_source(ctx: _Ctx, p: str, source: str, base: Path) -> str | None:
    """The unit file `source` names, relative to the desired-state file's directory."""
    parts = source.split("/")
    if (not source or source.startswith("/") or any(part in ("", ".", "..") for part in parts)
            or any(ord(c) < 32 or c == "\x7f" for c in source)):
        ctx.error(p, f"source {source!r} must be a relative path inside the repository, without '.' or '..'",
                  "for example source = \"units/mastodon-web.service\"", "config.bad-value")
        return None
    path = base / source
    try:
        raw = read_regular_file(path, MAX_UNIT_BYTES + 1)
    except NotAFileError as e:
        ctx.error(p, f"{path} is {e.kind}, not a unit file", "point source at a file", "config.unreadable")
        return None
    except FileTooLargeError as e:
        ctx.error(p, f"{path} is {e.size} bytes; a unit file over {MAX_UNIT_BYTES} bytes is refused",
                  "this is not a unit file", "config.too-large")
        return None
    except OSError as e:
        ctx.error(p, f"cannot read the unit file {path}: {e.strerror or e}",
                  "check the path (relative to the desired-state file's directory) and its permissions",
                  "config.unreadable")
        return None
    if len(raw) > MAX_UNIT_BYTES:
        ctx.error(p, f"{path} is over {MAX_UNIT_BYTES} bytes; fleet refuses it", "this is not a unit file",
                  "config.too-large")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        ctx.error(p, f"{path} is not valid UTF-8 (byte {e.start})", "save the unit file as UTF-8", "config.encoding")
        return None
    if "\x00" in text:
        ctx.error(p, f"{path} contains a NUL byte", "a unit file is text", "config.bad-value")
        return None
    if text.count("\n") > MAX_LINES:
        ctx.error(p, f"{path} has more than {MAX_LINES} lines", "a unit file is a few dozen lines",
                  "config.too-large")
        return None
    return text


def _directives_text(ctx: _Ctx, p: str, items: list[Any]) -> str | None:
    triples: list[tuple[str, str, str]] = []
    ok = True
    for i, item in enumerate(items):
        where = f"{p}[{i}]"
        if not (isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) for x in item)):
            ctx.error(p, f"'{where}' must be [SECTION, KEY, VALUE], three strings",
                      "for example [\"Service\", \"LimitNOFILE\", \"65536\"]", "config.wrong-type")
            ok = False
            continue
        section, key, value = item
        if not SECTION.fullmatch(section):
            ctx.error(p, f"'{where}': {section!r} is no unit file section name", "for example \"Service\"",
                      "config.bad-name")
            ok = False
        if not KEY.fullmatch(key):
            ctx.error(p, f"'{where}': {key!r} is no unit file key", "for example \"ExecStart\"", "config.bad-name")
            ok = False
        if value != value.strip() or any(ord(c) < 32 and c != "\t" for c in value) or value.endswith("\\"):
            ctx.error(p, f"'{where}': the value of {key} is not one line as systemd reads it (a line break, a "
                      "control character, surrounding spaces or a trailing backslash)",
                      "write the value on one line; systemd would read something else", "config.bad-value")
            ok = False
        bad = bad_specifiers(value)
        if bad:
            ctx.error(p, f"'{where}': {', '.join(dict.fromkeys(bad))} in the value of {key} is no systemd specifier",
                      "write %% for a literal percent sign", "config.bad-value")
            ok = False
        triples.append((section, key, value))
    if not triples and ok:
        ctx.error(p, "directives is empty", "a unit needs at least [Service] ExecStart", "config.bad-value")
        return None
    return render_directives(triples) if ok else None


def _sidekiq_of_text(ctx: _Ctx, p: str, spec: UnitSpec) -> SidekiqSpec | None:
    """What a Sidekiq unit of the operator's runs, read from its ExecStart: -c and -q, or (no -q)
    queues Sidekiq reads from config/sidekiq.yml on the host, which `fleet status` reads."""
    args = parse_argv(spec.exec_start.split())
    if args is None:
        ctx.error(p, f"a kind = \"sidekiq\" service whose ExecStart ({spec.exec_start[:80] or 'none'}) does not run "
                  "sidekiq", "set the right kind, or fix ExecStart in the unit text", "config.bad-value")
        return None
    return SidekiqSpec(concurrency=args.concurrency, queues=args.queues, command="",
                       queues_from_config=not args.queues)


_ROLE_KINDS = (Kind.POSTGRES, Kind.REDIS)  # the kinds that replicate: a primary and its standbys


def _load_store(ctx: _Ctx, prefix: str, st: dict[str, Any], kind: Kind | None) -> StoreSpec | None:
    """`role`, `probe` and `port` of a data store; None when none of them is given, so that a
    service declaring none of them is the same data as before they existed (plan.desired_hash)."""
    role = _get(ctx, st, prefix, "role", str)
    probe = _get(ctx, st, prefix, "probe", bool, default=False)
    port = _get(ctx, st, prefix, "port", int)
    if kind is not None:
        if role is not None and kind not in _ROLE_KINDS:
            ctx.error(f"{prefix}.role", f"'role' only applies to kind = \"postgres\" or \"redis\", not {kind.value!r}",
                      "remove it", "config.bad-key")
            role = None
        if "probe" in st and kind != Kind.POSTGRES:
            ctx.error(f"{prefix}.probe", f"'probe' only applies to kind = \"postgres\", not {kind.value!r}",
                      "remove it (fleet reads Redis with redis-cli without being asked)", "config.bad-key")
            probe = False
        if port is not None and kind not in DEFAULT_PORTS:
            ctx.error(f"{prefix}.port", f"'port' only applies to the data stores "
                      f"({', '.join(k.value for k in DEFAULT_PORTS)}), not {kind.value!r}", "remove it",
                      "config.bad-key")
            port = None
    if role is not None and role not in ROLES:
        ctx.error(f"{prefix}.role", f"role {role!r} is neither \"primary\" nor \"standby\"",
                  did_you_mean(role, ROLES) or "role = \"primary\" (takes writes) or \"standby\" (a replica)",
                  "config.bad-value")
        role = None
    if port is not None and not 1 <= port <= 65535:
        ctx.error(f"{prefix}.port", f"port {port} is outside 1–65535", "the TCP port it listens on, e.g. port = 5432",
                  "config.bad-value")
        port = None
    if role is None and not probe and port is None:
        return None
    return StoreSpec(role=role, probe=probe, port=port)


def _stand_in(name: str, st: dict[str, Any], kind: Kind | None, unit: Any, hosts: list[str],
              sidekiq: SidekiqSpec | None) -> Service:
    """A broken service as far as it can be read, for load_checked's what-if only: on every host
    it lists, serving the queues it names."""
    raw = st.get("queues")
    queues = tuple((q, None) for q in (raw if isinstance(raw, (dict, list)) else ()) if isinstance(q, str))
    if kind is None:
        kind = Kind.SIDEKIQ if queues else Kind.GENERIC
    if kind == Kind.SIDEKIQ and sidekiq is None:
        concurrency = st.get("concurrency")
        sidekiq = SidekiqSpec(concurrency=concurrency if isinstance(concurrency, int) and concurrency > 0 else 1,
                              queues=queues)
    return Service(name=name, kind=kind, unit=unit if isinstance(unit, str) else f"{name}.service",
                   hosts=tuple(dict.fromkeys(hosts)), observe_only=True, sidekiq=sidekiq)


def _load_health(ctx: _Ctx, prefix: str, ht: dict[str, Any] | None) -> HealthCheck | None:
    if ht is None:
        return None
    p = f"{prefix}.health"
    _unknown_keys(ctx, ht, p, HEALTH_KEYS)
    command = _get(ctx, ht, p, "command", str)
    http = _get(ctx, ht, p, "http", str)
    tcp = _get(ctx, ht, p, "tcp", int)
    sidekiq = _get(ctx, ht, p, "sidekiq", bool, default=False)
    timeout = _get(ctx, ht, p, "timeout", (int, float), default=10)
    given = [k for k, v in (("command", command), ("http", http), ("tcp", tcp), ("sidekiq", sidekiq or None))
             if v is not None]
    if len(given) != 1:
        ctx.error(p, f"{p} needs exactly one of command, http, tcp, sidekiq = true (has {', '.join(given) or 'none'})",
                  "for example health = { http = \"http://127.0.0.1:3000/health\" }", "config.bad-value")
        return None
    if sidekiq and "timeout" in ht:
        ctx.error(f"{p}.timeout", "the Sidekiq health check has no timeout of its own",
                  "remove it: the new process must heartbeat within apply's --start-timeout", "config.bad-key")
        return None
    if http is not None and not re.fullmatch(r"https?://[^\s'\"]+", http):
        ctx.error(f"{p}.http", f"{http!r} is not an http:// or https:// URL",
                  "for example http = \"http://127.0.0.1:3000/health\"", "config.bad-value")
        return None
    if tcp is not None and not 1 <= tcp <= 65535:
        ctx.error(f"{p}.tcp", f"port {tcp} is outside 1–65535",
                  "the TCP port the service listens on, e.g. tcp = 5432", "config.bad-value")
        return None
    if command is not None and not _no_control(ctx, f"{p}.command", command):
        return None
    if not 0 < timeout < 86400:  # also refuses nan and inf
        ctx.error(f"{p}.timeout", f"timeout must be positive and below a day (seconds), got {timeout}",
                  "for example timeout = 30", "config.bad-value")
        return None
    return HealthCheck(command=command, http=http, tcp=tcp, timeout=float(timeout), sidekiq=sidekiq)


def _check_sidekiq_health(ctx: _Ctx, prefix: str, kind: Kind | None, unit_spec: UnitSpec | None) -> None:
    """`health.sidekiq` reads the new process's heartbeat from the Redis its env file names: only a
    Sidekiq service has one, and only one that loads an env file says where that Redis is."""
    p = f"{prefix}.health.sidekiq"
    if kind != Kind.SIDEKIQ:
        ctx.error(p, "the Sidekiq health check only applies to kind = \"sidekiq\"",
                  "use command, http or tcp for this service, or set kind = \"sidekiq\"", "config.bad-value")
    elif unit_spec is not None and not unit_spec.environment_files:
        ctx.error(p, "the Sidekiq health check reads Sidekiq's Redis as the service finds it, from its env file, "
                  "and this service loads none", "add the env file to unit_file.environment_files, or remove "
                  "health.sidekiq", "config.bad-value")


def _load_sidekiq(ctx: _Ctx, prefix: str, st: dict[str, Any]) -> SidekiqSpec | None:
    concurrency = _get(ctx, st, prefix, "concurrency", int, required=True)
    command = _get(ctx, st, prefix, "sidekiq_command", str, default=DEFAULT_SIDEKIQ_COMMAND)
    raw = _get(ctx, st, prefix, "queues", (dict, list), required=True)
    queues: list[tuple[str, int | None]] = []
    if isinstance(raw, dict):
        for q, w in raw.items():
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                ctx.error(f"{prefix}.queues.{q}", f"weight of queue {q!r} must be a positive integer",
                          "for example queues = { default = 8, push = 6 }", "config.bad-value")
                continue
            queues.append((q, w))
    elif isinstance(raw, list):
        for q in raw:
            if not isinstance(q, str):
                ctx.error(f"{prefix}.queues", "queue names must be strings",
                          "for example queues = [\"default\", \"push\"]", "config.wrong-type")
                continue
            queues.append((q, None))
    if raw is not None and not queues and not any(f.key.startswith(f"{prefix}.queues") for f in ctx.findings):
        ctx.error(f"{prefix}.queues", "a Sidekiq process must serve at least one queue",
                  "for example queues = { default = 8, push = 6 }", "config.bad-value")
    if concurrency is not None and not 1 <= concurrency <= 1000:
        ctx.error(f"{prefix}.concurrency", f"concurrency {concurrency} is outside 1–1000",
                  "Sidekiq threads per process; Mastodon's default is 25", "config.bad-value")
        return None
    for q, _ in queues:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", q):
            ctx.error(f"{prefix}.queues", f"queue name {q!r} contains characters Sidekiq does not use", "",
                      "config.bad-name")
            return None
    if concurrency is None or not queues or not _no_control(ctx, f"{prefix}.sidekiq_command", command):
        return None
    return SidekiqSpec(concurrency=concurrency, queues=tuple(queues), command=command)


def _load_unit(ctx: _Ctx, p: str, ut: dict[str, Any], sidekiq: SidekiqSpec | None,
               derived: bool) -> UnitSpec | None:
    """`derived`: the service is a Sidekiq one, whose ExecStart comes from `sidekiq` (None when
    its settings were invalid: already reported, so no second finding about exec_start)."""
    _unknown_keys(ctx, ut, p, UNIT_FILE_KEYS)
    get_s: Callable[[str], str | None] = lambda k: _get(ctx, ut, p, k, str)  # noqa: E731
    exec_start = get_s("exec_start")
    if derived:
        if exec_start is not None:
            ctx.error(f"{p}.exec_start", "a Sidekiq service's ExecStart is derived from concurrency and queues",
                      "remove exec_start; set concurrency, queues (and sidekiq_command) on the service",
                      "config.bad-key")
        if sidekiq is None:
            return None
        exec_start = sidekiq.exec_start()
    elif exec_start is None:
        ctx.error(f"{p}.exec_start", f"missing required key '{p}.exec_start'",
                  "the command systemd starts, with an absolute path", "config.missing-key")
        return None
    if not exec_start.strip():
        ctx.error(f"{p}.exec_start", "ExecStart is empty", "write the command systemd starts, with an absolute path",
                  "config.bad-value")
        return None
    if not exec_start.startswith("/") and not exec_start.startswith("-/"):
        ctx.error(f"{p}.exec_start", f"ExecStart must start with an absolute path, got {exec_start.split()[0]!r}",
                  "write the full path of the executable", "config.bad-value")
    env_t = _get(ctx, ut, p, "environment", dict, default={})
    environment: list[tuple[str, str]] = []
    for k, v in env_t.items():
        if not _check_env_key(ctx, f"{p}.environment.{k}", k):
            continue
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            environment.append((k, str(v)))
        else:
            ctx.error(f"{p}.environment.{k}", f"'{p}.environment.{k}' must be a string",
                      f"write {k} = \"…\"", "config.wrong-type")
    if sidekiq is not None and "DB_POOL" not in env_t:
        environment.append(("DB_POOL", str(sidekiq.concurrency)))  # one connection per Sidekiq thread
    env_files = _str_list(ctx, ut, p, "environment_files")
    for f in env_files:
        if not f.startswith("/") or "/../" in f + "/":
            ctx.error(f"{p}.environment_files", f"environment file {f!r} must be an absolute path without '..'",
                      "for example \"/home/mastodon/live/.env.production\"", "config.bad-value")
        else:
            _no_control(ctx, f"{p}.environment_files", f)
    restart = get_s("restart")
    if restart is not None and restart not in RESTART_VALUES:
        ctx.error(f"{p}.restart", f"Restart={restart!r} is not a systemd value",
                  did_you_mean(restart, RESTART_VALUES) or f"one of {', '.join(RESTART_VALUES)}", "config.bad-value")
    user = get_s("user")
    if user is not None:
        _check_name(ctx, f"{p}.user", user, USER_NAME, "user name")
    spec_fields = {k: get_s(k) for k in ("description", "group", "working_directory", "exec_reload", "restart_sec")}
    for k, v in [("exec_start", exec_start), *spec_fields.items(), *((f"environment.{k}", v) for k, v in environment)]:
        if v is not None:
            _no_control(ctx, f"{p}.{k}", v)
    after = _str_list(ctx, ut, p, "after") if "after" in ut else ["network.target"]
    wanted_by = _str_list(ctx, ut, p, "wanted_by") if "wanted_by" in ut else ["multi-user.target"]
    for u in after + wanted_by:
        _check_name(ctx, p, u, UNIT_NAME, "unit name")
    return UnitSpec(exec_start=exec_start, description=spec_fields["description"] or "", user=user,
                    group=spec_fields["group"], working_directory=spec_fields["working_directory"],
                    environment=tuple(environment), environment_files=tuple(env_files),
                    exec_reload=spec_fields["exec_reload"], restart=restart, restart_sec=spec_fields["restart_sec"],
                    after=tuple(after), wanted_by=tuple(wanted_by))


def _check_references(ctx: _Ctx, services: list[Service], declared: list[str]) -> None:
    """`declared` holds every service name in the file, including ones that failed to load, so
    that a broken service is reported once, not again by everything that refers to it."""
    names = [s.name for s in services]
    edges: list[tuple[str, str]] = []
    for s in services:
        for r in s.requires:
            if r == s.name:
                ctx.error(f"services.{s.name}.requires", f"service {s.name!r} requires itself", "remove it",
                          "config.cycle")
            elif r not in declared:
                ctx.error(f"services.{s.name}.requires", f"service {s.name!r} requires unknown service {r!r}",
                          did_you_mean(r, declared) or "declare it or remove it from requires",
                          "config.unknown-service")
            elif r in names:
                edges.append((r, s.name))
    cycle = _find_cycle(names, edges) if _has_cycle(names, edges) else []
    if cycle:
        chain = " -> ".join([e[1] for e in cycle] + [cycle[0][1]])
        ctx.error(f"services.{cycle[0][1]}.requires", f"dependency cycle: {chain} (each requires the previous)",
                  "break the cycle by removing one of these requires", "config.cycle")
    owners: dict[tuple[str, str], str] = {}
    for s in services:
        # a plain unit's units are the same on every host: listed once, not once per host
        same = None if s.is_template else tuple(dict.fromkeys((s.unit, *s.all_units_on(""))))
        for h in s.hosts:
            for unit in same or dict.fromkeys((s.unit, *s.all_units_on(h))):  # a template's file, instances, wrapper
                other = owners.get((h, unit))
                if other is not None:
                    ctx.error(f"services.{s.name}.unit",
                              f"services {other!r} and {s.name!r} both claim {unit} on host {h}",
                              "give each service its own unit name on a host", "config.duplicate-unit")
                owners[(h, unit)] = s.name



def _has_cycle(names: list[str], edges: list[tuple[str, str]]) -> bool:
    """Kahn's algorithm: a cycle is what is left when no service waits for another."""
    waiting = {n: 0 for n in names}
    after: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        if a != b:
            waiting[b] += 1
            after[a].append(b)
    ready = [n for n, w in waiting.items() if not w]
    seen = 0
    while ready:
        seen += 1
        for b in after[ready.pop()]:
            waiting[b] -= 1
            if not waiting[b]:
                ready.append(b)
    return seen < len(names)


def _find_cycle(names: list[str], edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The cycle to name, as networkx finds it.  Imported only when there is one: networkx
    costs ~100 ms of CPU, and `fleet check` of a desired state without a cycle never needs it."""
    import networkx as nx

    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from(names)
    graph.add_edges_from(edges)
    try:
        return list(nx.find_cycle(graph))
    except nx.NetworkXNoCycle:
        return []


def _load_env_files(ctx: _Ctx, table: dict[str, Any], services: list[Service], declared: list[str],
                    host_names: list[str], hosts_dir: Path) -> list[EnvFile]:
    out: list[EnvFile] = []
    by_name = {s.name: s for s in services}
    for name, et in table.items():
        p = f"env_files.{name}"
        if not isinstance(et, dict):
            ctx.error(p, f"'{p}' must be a table", f"write it as [{p}]", "config.wrong-type")
            continue
        before = len(ctx.findings)
        _unknown_keys(ctx, et, p, ENV_FILE_KEYS)
        path = _get(ctx, et, p, "path", str, required=True)
        if path is not None and _no_control(ctx, f"{p}.path", path) and not env_path_ok(path):
            ctx.error(f"{p}.path", f"env file path {path!r} must be an absolute file path, without '..' or a "
                                   "trailing '/'",
                      "for example path = \"/home/mastodon/live/.env.production\"", "config.bad-value")
        svc_names = _str_list(ctx, et, p, "services")
        hosts = _str_list(ctx, et, p, "hosts")
        for s in svc_names:
            if s not in declared:
                ctx.error(f"{p}.services", f"env file {name!r} names unknown service {s!r}",
                          did_you_mean(s, declared) or "declare the service or remove it", "config.unknown-service")
        for h in hosts:
            if h not in host_names:
                ctx.error(f"{p}.hosts", f"env file {name!r} names host {h!r}, which has no file in {hosts_dir}/",
                          did_you_mean(h, host_names) or f"add {hosts_dir}/{h}.toml or remove it from the list",
                          "config.unknown-host")
        resolved = list(dict.fromkeys(hosts + [h for s in svc_names if s in by_name for h in by_name[s].hosts]))
        if not svc_names and not hosts:
            ctx.error(p, f"env file {name!r} says neither which services nor which hosts need it",
                      "add services = [...] or hosts = [...]", "config.missing-key")
        owner = _get(ctx, et, p, "owner", str)
        group = _get(ctx, et, p, "group", str)
        for k, v in (("owner", owner), ("group", group)):
            if v is not None:
                _check_name(ctx, f"{p}.{k}", v, USER_NAME, k)
        mode = _get(ctx, et, p, "mode", str, default="0600")
        if not re.fullmatch(r"0?[0-7]{3}", mode):
            ctx.error(f"{p}.mode", f"mode {mode!r} is not an octal file mode", "for example mode = \"0600\"",
                      "config.bad-value")
        values = _env_values(ctx, f"{p}.values", _get(ctx, et, p, "values", dict, default={}))
        sensitive: list[tuple[str, SecretSource]] = []
        for k, src in _get(ctx, et, p, "sensitive", dict, default={}).items():
            source = _secret_source(ctx, f"{p}.sensitive.{k}", src)
            if _check_env_key(ctx, f"{p}.sensitive.{k}", k) and source is not None:
                sensitive.append((k, source))
        overrides: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        for h, ot in _get(ctx, et, p, "overrides", dict, default={}).items():
            op = f"{p}.overrides.{h}"
            if h not in resolved:
                ctx.error(op, f"override for host {h!r}, which does not get env file {name!r}",
                          did_you_mean(h, resolved) or "remove the override or add the host", "config.unknown-host")
            if not isinstance(ot, dict):
                ctx.error(op, f"'{op}' must be a table of KEY = \"value\"",
                          f"write it as [{op}] with KEY = \"value\" lines", "config.wrong-type")
                continue
            overrides.append((h, tuple(_env_values(ctx, op, ot))))
        if any(f.is_error for f in ctx.findings[before:]) or path is None:
            continue
        out.append(EnvFile(name=name, path=path, hosts=tuple(resolved), services=tuple(svc_names),
                           values=tuple(values), sensitive=tuple(sensitive), overrides=tuple(overrides),
                           owner=owner, group=group, mode=mode if len(mode) == 4 else "0" + mode))
    _check_env_conflicts(ctx, out)
    return out


def _env_values(ctx: _Ctx, p: str, table: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in table.items():
        if not _check_env_key(ctx, f"{p}.{k}", k):
            continue
        if isinstance(v, bool):
            out.append((k, "true" if v else "false"))
        elif isinstance(v, str) and any(ord(c) < 32 and c not in "\t\n" or c == "\x7f" for c in v):
            ctx.error(f"{p}.{k}", f"the value of {k} contains a control character (NUL, CR, escape …)",
                      "an env file cannot carry it: systemd and Mastodon would read something else; remove it",
                      "config.bad-value")
        elif isinstance(v, (str, int)):
            out.append((k, str(v)))
        else:
            ctx.error(f"{p}.{k}", f"'{p}.{k}' must be a string, not {_toml_type(v)}",
                      f"write {k} = \"…\" (env files hold text)", "config.wrong-type")
    return out


def _secret_source(ctx: _Ctx, p: str, src: Any) -> SecretSource | None:
    if isinstance(src, str):
        if src in ("file", "present"):
            return SecretSource(src)
        m = re.fullmatch(r"env:([A-Za-z_][A-Za-z0-9_]*)", src)
        if m:
            return SecretSource("env", m.group(1))
    ctx.error(p, f"'{p}' must say where the secret comes from, not hold it",
              "use \"file\" (local secrets file), \"env:VARIABLE\" or \"present\" (never managed); "
              "if you wrote the secret itself here, rotate it: it is now in the repository",
              "env.bad-secret-source")
    return None


def _check_env_conflicts(ctx: _Ctx, files: list[EnvFile]) -> None:
    """The same path declared twice for one host would make two tables fight over one file."""
    claimed: dict[tuple[str, str], str] = {}
    for ef in files:
        for h in ef.hosts:
            other = claimed.get((h, ef.path))
            if other is not None and other != ef.name:
                ctx.error(f"env_files.{ef.name}.path",
                          f"env files {other!r} and {ef.name!r} both write {ef.path} on host {h}",
                          "merge them, and use [env_files.NAME.overrides.HOST] for per-host values",
                          "env.duplicate-path")
            claimed[(h, ef.path)] = ef.name


def default_paths(directory: str, desired: str | None, hosts: str | None) -> tuple[Path, Path]:
    base = Path(directory)
    return (Path(desired) if desired else base / "desired_state.toml",
            Path(hosts) if hosts else base / "hosts")

