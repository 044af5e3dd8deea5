"""`fleet adopt TARGET`: the live hosts of the inventory written as a fleet directory — TARGET/
desired_state.toml, hosts/ (the inventory's files, as they are) and units/ (the hosts' own unit
files, byte for byte) — so that the next `fleet --dir TARGET plan` is empty.

Two collections, both read-only: the first finds the units the discovery patterns match on each
host; the second declares them and the env files they load (in memory only) so that the collector
dumps their text and its per-file sha256, and reads the files (a secret as its sha256 only),
which is what lets fleet/adopt.py write each file exactly as the host has it.
A non-empty TARGET is refused unless `force`; nothing is written before everything is known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fleet import config
from fleet.adopt import Adopted, build
from fleet.config import env_path_ok
from fleet.errors import FleetError
from fleet.model import (
    Desired,
    DiscoveryPattern,
    EnvFile,
    Host,
    HostError,
    HostResult,
    HostState,
    Kind,
    Service,
    UnitSpec,
)
from fleet.targets import resolve
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Reporter, Scope

# Mastodon's units, and Debian's units of the data stores its settings name (declared observe-only,
# so that `fleet check` finds the database DB_HOST points at).
DEFAULT_PATTERNS = ("mastodon-*", "postgresql.service", "redis-server.service")


@dataclass(frozen=True)
class AdoptOptions:
    common: Common
    scope: Scope
    target: Path
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    force: bool = False
    name: str | None = None  # the fleet's name; default: TARGET's directory name


@dataclass(frozen=True)
class AdoptResult:
    target: Path
    adopted: Adopted
    written: tuple[str, ...]  # paths under target, in the order written
    unreachable: tuple[HostError, ...]

    @property
    def complete(self) -> bool:
        return not self.unreachable


def adopt(options: AdoptOptions, reporter: Reporter) -> AdoptResult:
    common, target = options.common, options.target
    _check_target(target, options.force)
    hosts, findings = config.load_hosts(common.hosts)
    errors = [f for f in findings if f.is_error]
    if errors:
        reporter.findings(errors)
        raise FleetError(f"the inventory {common.hosts} has {len(errors)} error(s)",
                         hint="fix them (see `fleet check`)")
    if not hosts:
        raise FleetError(f"the inventory {common.hosts} has no host files", hint="add hosts/NAME.toml for each host")
    name = options.name or _fleet_name(target)
    seen = Desired(name=name, hosts=hosts, services=(),
                   discover=tuple(DiscoveryPattern(p) for p in options.patterns))
    targets = resolve(seen, state_dir=str(common.state_dir), lab=common.lab, limit=options.scope.limit)
    with observing.open_transport(common, targets, options.scope) as transport:
        first = observing.observe(common, options.scope, "adopt", seen, targets, transport, reporter)
        declared = _declare_all(seen, first.results)
        second = observing.observe(common, options.scope, "adopt", declared, targets, transport, reporter)
    states = {h: r for h, r in second.results.items() if isinstance(r, HostState)}
    unreachable = tuple(r for r in second.results.values() if isinstance(r, HostError))
    adopted = build(name, options.patterns, states)
    written = _write(target, adopted, [h for h in hosts if h.name in states])
    return AdoptResult(target, adopted, tuple(written), unreachable)


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise FleetError(f"{target} is not a directory", hint="name a new or empty directory to write the fleet into")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise FleetError(f"{target} is not empty; adopt writes desired_state.toml, hosts/ and units/ there",
                         hint="name a new or empty directory, or pass --force to overwrite those files")


def _fleet_name(target: Path) -> str:
    base = target.resolve().name
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip("-.")
    return cleaned or "fleet"


def _declare_all(seen: Desired, results: dict[str, HostResult]) -> Desired:
    """The first collection's units declared, and the env files they load, so that the second
    dumps their text and reads the files (secrets as sha256 only).  Never loaded from or written
    to a file: only the collector's choice of what to read depends on it."""
    services, env_files = [], []
    for host, r in results.items():
        if isinstance(r, HostError):
            continue
        paths: list[str] = []
        for i, u in enumerate(r.units):
            if u.exists:
                services.append(Service(name=f"{host}-{i}", kind=Kind.GENERIC, unit=u.unit, hosts=(host,),
                                        unit_spec=UnitSpec(exec_start="")))
                paths += [p for p in u.environment_files if env_path_ok(p) and p not in paths]
        env_files += [EnvFile(name=f"{host}-env-{j}", path=p, hosts=(host,)) for j, p in enumerate(paths)]
    return Desired(name=seen.name, hosts=seen.hosts, services=tuple(services), env_files=tuple(env_files),
                   discover=seen.discover)


def _write(target: Path, adopted: Adopted, hosts: list[Host]) -> list[str]:
    """Every file, each written whole (a temporary file renamed into place)."""
    files: list[tuple[str, bytes]] = [("desired_state.toml", adopted.desired_state.encode())]
    for h in hosts:
        files.append((f"hosts/{h.name}.toml", Path(h.source).read_bytes()))
    files += [(path, text.encode()) for path, text in adopted.units]
    out = []
    for rel, data in files:
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        out.append(rel)
    return out

