"""Which hosts a command talks to, and how: real inventory, or the lab (`--lab`).

With `--lab`, every host is rewritten to its lab address from the lab's own record before any
transport exists, and the lab's ssh_config/known_hosts are the only ones read: a lab run can
never reach a real address, and a real run never reads the lab's files.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from pathlib import Path

from fleet.errors import FleetError
from fleet.model import Desired, Host


@dataclass(frozen=True)
class Targets:
    hosts: tuple[Host, ...]
    ssh_config: str | None  # None: the user's ~/.ssh/config, if any
    known_hosts: tuple[str, ...] | None  # None: the user's and the system's known_hosts
    lab: bool


def select(hosts: tuple[Host, ...], limit: str | None) -> tuple[Host, ...]:
    """`--limit fritz,fr*`: names or globs, comma-separated; an unmatched pattern is an error, and
    so is a limit that names nothing (`--limit ,,`): selecting no host is never "all is well"."""
    if limit is None:
        return hosts
    patterns = [p.strip() for p in limit.split(",") if p.strip()]
    if not patterns:
        raise FleetError(f"--limit {limit!r} names no host", hint=f"hosts: {', '.join(h.name for h in hosts)}")
    chosen = [h for h in hosts if any(fnmatch.fnmatchcase(h.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(h.name, p) for h in hosts)]
    if unmatched:
        raise FleetError(f"--limit {','.join(unmatched)} matches no host in the inventory",
                         hint=f"hosts: {', '.join(h.name for h in hosts)}")
    if not chosen:  # no pattern unmatched, yet nothing chosen: an empty inventory
        raise FleetError(f"--limit {limit} selects no host", hint="the inventory has no host to select")
    return tuple(chosen)


def resolve(desired: Desired, *, state_dir: str, lab: bool, limit: str | None = None) -> Targets:
    hosts = select(desired.hosts, limit)
    if not lab:
        return Targets(hosts=hosts, ssh_config=None, known_hosts=None, lab=False)
    from fleet.lab.lifecycle import read_record
    from fleet.lab.settings import LabPaths

    paths = LabPaths.from_state_dir(state_dir)
    record = read_record(paths)
    if record is None:
        raise FleetError(f"--lab: no lab is recorded in {paths.state}",
                         hint="start it with `fleet lab up` (same --dir/--state-dir)")
    lab_hosts = {str(h["name"]): h for h in record.hosts}
    missing = [h.name for h in hosts if h.name not in lab_hosts]
    if missing:
        raise FleetError(f"--lab: host(s) {', '.join(missing)} are not in the running lab",
                         hint="run `fleet lab up` with this inventory (--hosts) so every host has a lab twin")
    rewritten = tuple(
        replace(h, address=str(lab_hosts[h.name]["address"]), port=22,
                user=str(lab_hosts[h.name].get("user", h.user)))
        for h in hosts
    )
    return Targets(hosts=rewritten, ssh_config=str(Path(record.ssh_config)),
                   known_hosts=(str(Path(record.known_hosts)),), lab=True)
