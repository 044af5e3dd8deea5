"""Rendering the systemd unit fleet writes for a service: a pure function of the declaration.

The text is deterministic (same declaration, same bytes), so a hash comparison with what the
collector saw on a host says whether the unit must be rewritten.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Iterable
from functools import lru_cache

from fleet.mastodon import looks_secret
from fleet.model import Service, UnitState
from fleet.textutil import mask, sha256_hex

UNIT_DIR = "/etc/systemd/system"


def unit_path(unit: str) -> str:
    return f"{UNIT_DIR}/{unit}"


def _own_names(unit: str) -> tuple[str, ...]:
    """The unit's own file name, and its template's for an instance (`a@1.service` → `a@.service`)."""
    if "@" in unit and "." in unit:
        return unit, unit[:unit.index("@") + 1] + unit[unit.rindex("."):]
    return (unit,)


def removable_unit_file(path: str, unit: str) -> bool:
    """May fleet remove `path`, which a host reports as a file of `unit` (its FragmentPath or a
    DropInPaths entry)?  A host's report is data, and may lie (`/etc/systemd/system/../../etc/
    shadow`): only a plain file of this very unit directly in UNIT_DIR (the fragment) or a
    `*.conf` directly in UNIT_DIR/UNIT.d/ (a drop-in) is fleet's to remove.  The one rule for
    every removal a host's report decides (diff's prunes and rewrites, the executor, saved plans)."""
    if not path or any(ord(c) < 32 or c == "\x7f" for c in path) or posixpath.normpath(path) != path:
        return False
    names = _own_names(unit)
    parent, name = posixpath.split(path)
    if parent == UNIT_DIR:
        return name in names
    top, directory = posixpath.split(parent)
    return (top == UNIT_DIR and directory in {n + ".d" for n in names}
            and name.endswith(".conf") and name != ".conf")


def refused_unit_files(unit: str, paths: Iterable[str]) -> tuple[str, ...]:
    """The paths in fleet's unit directory that a host reports for `unit` and that fleet still
    may not remove (see removable_unit_file): reported, never touched."""
    return tuple(p for p in paths if p.startswith(UNIT_DIR + "/") and not removable_unit_file(p, unit))


def _literal(value: str) -> str:
    """systemd expands %-specifiers in paths too: a literal % is written %%."""
    return value.replace("%", "%%")


def _env_assignment(key: str, value: str) -> str:
    # systemd expands %-specifiers in Environment=; a literal % must be doubled.  Quoting the
    # whole assignment keeps spaces; backslashes and quotes are escaped C-style.
    v = value.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{key}={v}"'


@lru_cache(maxsize=4096)  # a service's unit is the same on each of its hosts: render it once
def render_unit(service: Service) -> str:
    """The unit file text for a managed service.  Raises ValueError for observe-only ones."""
    spec = service.unit_spec
    if spec is None:
        raise ValueError(f"service {service.name} is observe-only: fleet never writes its unit")
    lines = [
        f"# Managed by fleet (service {service.name}). Local edits are overwritten by `fleet apply`.",
        "[Unit]",
        f"Description={_literal(spec.description or service.name)}",
    ]
    if spec.after:
        lines.append(f"After={' '.join(spec.after)}")
    lines += ["", "[Service]", "Type=simple"]
    if spec.user:
        lines.append(f"User={spec.user}")
    if spec.group:
        lines.append(f"Group={spec.group}")
    if spec.working_directory:
        lines.append(f"WorkingDirectory={_literal(spec.working_directory)}")
    for key, value in spec.environment:
        lines.append(f"Environment={_env_assignment(key, value)}")
    for path in spec.environment_files:
        lines.append(f"EnvironmentFile={_literal(path)}")
    lines.append(f"ExecStart={spec.exec_start}")
    if spec.exec_reload:
        lines.append(f"ExecReload={spec.exec_reload}")
    if spec.restart:
        lines.append(f"Restart={spec.restart}")
    if spec.restart_sec:
        lines.append(f"RestartSec={spec.restart_sec}")
    if spec.wanted_by:
        lines += ["", "[Install]", f"WantedBy={' '.join(spec.wanted_by)}"]
    return "\n".join(lines) + "\n"


def desired_text_hash(service: Service, content_hash: str | None = None) -> str:
    """The text hash the collector would report for this unit once fleet has written it
    (fragment in /etc/systemd/system, no drop-ins); see fleet.collect.parse.  `content_hash`:
    sha256 of `render_unit(service)`, when the caller has it already."""
    path = unit_path(service.unit)
    return sha256_hex(f"{path} {content_hash or sha256_hex(render_unit(service))}")


def as_observed_text(service: Service) -> str:
    """The rendered unit in the collector's `systemctl cat`-like form, for unified diffs."""
    return f"# {unit_path(service.unit)}\n{render_unit(service)}"


def masked_environment(value: str) -> tuple[tuple[str, str], ...]:
    """KEY=value pairs of an `Environment=` value (systemd's quoting), secret-looking values
    replaced by their mask at once."""
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    out = []
    for w in words:
        k, sep, v = w.partition("=")
        if sep:
            masked = looks_secret(k) and v != "(masked-on-host)"
            out.append((k, mask(v) if masked else v))
    return tuple(out)


def mask_unit_text(text: str) -> str:
    """A hand-edited unit may carry a secret in Environment=: mask it before the text is kept
    anywhere (plans show unit texts as diffs)."""
    lines = []
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("Environment="):
            pairs = masked_environment(stripped[len("Environment="):])
            if any(looks_secret(k) for k, _ in pairs):
                line = "Environment=" + " ".join(f'"{k}={v}"' for k, v in pairs)
        lines.append(line)
    return "\n".join(lines)


def unit_file_differs(service: Service, u: UnitState | None, content_hash: str | None = None) -> bool:
    """Would fleet rewrite this managed unit?  Drop-ins outside /etc/systemd/system (a
    package's, `systemctl edit --runtime`) are not fleet's to remove, so only the fragment and
    drop-ins in fleet's own directory count.  `content_hash`: sha256 of `render_unit(service)`,
    when the caller has it already (a plan asks for every host of a service)."""
    if u is None or not u.exists or any(removable_unit_file(p, service.unit) for p in u.drop_in_paths):
        return True
    want = content_hash or sha256_hex(render_unit(service))
    if u.file_hashes:
        fragment = dict(u.file_hashes).get(u.fragment_path)
        return u.fragment_path != unit_path(service.unit) or fragment != want
    return u.text_hash != desired_text_hash(service, want)  # plain data without per-file hashes


def describe_unit(u: UnitState | None) -> str:
    """`active/running, enabled, -c 10 -q default` — what a reader needs to recognise it."""
    if u is None or not u.exists:
        return "not installed"
    parts = [u.state(), u.unit_file_state or "no unit file"]
    args = _interesting_args(u.exec_start)
    if args:
        parts.append(f"`{args}`")
    return ", ".join(parts)


def _interesting_args(argv: tuple[str, ...]) -> str:
    """The part of a command line that tells processes apart (Sidekiq's -c/-q, puma's -C)."""
    if not argv:
        return ""
    for i, a in enumerate(argv):
        if a.startswith("-"):
            return shlex.join(argv[i:])
    return ""


def instance_owner(services: Iterable[Service], unit: str) -> Service | None:
    """The service an instance unit belongs to: `postgresql@15-main.service` is part of the
    service that declares `postgresql.service`."""
    if "@" not in unit:
        return None
    stem = unit.split("@", 1)[0]
    return next((s for s in services if s.unit.rsplit(".", 1)[0] == stem), None)
