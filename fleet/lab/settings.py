"""Fixed names and locations of the lab: everything teardown must find without any records.

Kernel objects (network namespaces, links, cgroups, mounts) outlive the process that made them,
and CI runs from a fresh clone in another folder, so every object the lab creates is named from
the constants below and every directory lives under a machine-wide root, never under the repo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LAB_NAME = "fleetlab"
"""Name of the lab's cgroup directory and prefix of every link and namespace it owns."""

BRIDGE = "fleetlab0"
VETH_PREFIX = "fleetlab-v"  # host side of host i's veth pair: fleetlab-v<i> (<= 15 chars)
NETNS_PREFIX = "fleetlab-"  # network namespace of host NAME: fleetlab-NAME
GUEST_IFACE = "host0"  # the name systemd-nspawn itself gives a container's interface

SUBNET = "10.251.0"
GATEWAY = f"{SUBNET}.1"
PREFIX_LEN = 24
FIRST_HOST_OCTET = 10
MAX_HOSTS = 254 - FIRST_HOST_OCTET

SSH_PORT = 22
NSPAWN_RUN = Path("/run/systemd/nspawn")
NSPAWN_TMPFS_MARKER = ".fleet-lab-tmpfs"
CGROUP_ROOT = Path("/sys/fs/cgroup")
INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify/max_user_instances")
INOTIFY_WANTED = 1024

DEFAULT_CACHE = "/var/cache/fleet-lab"
DEFAULT_RUNTIME = "/var/lib/fleet-lab"

# Seconds `fleet lab up` waits for the hosts to boot and answer (--timeout).  Here, where the
# CLI's parser can read it without importing the lab's machinery (fleet.lab.lifecycle).
DEFAULT_TIMEOUT = 120.0


def address_of(index: int) -> str:
    """The lab address of the host at `index` in sorted name order."""
    return f"{SUBNET}.{FIRST_HOST_OCTET + index}"


def netns_of(name: str) -> str:
    return f"{NETNS_PREFIX}{name}"


def veth_of(index: int) -> str:
    return f"{VETH_PREFIX}{index}"


@dataclass(frozen=True)
class LabPaths:
    """Where the lab keeps things.  `state` is per checkout; cache and runtime are machine-wide."""

    state: Path  # <state_dir>/lab: client key, known_hosts, ssh_config, lab.json
    cache: Path  # image tarballs, shared by every checkout on the machine
    runtime: Path  # lower dir, per-host overlays, console logs, saved sysctl

    @classmethod
    def from_state_dir(cls, state_dir: str | os.PathLike[str]) -> LabPaths:
        """Paths for a state dir, honouring FLEET_LAB_CACHE and FLEET_LAB_RUNTIME."""
        return cls(
            state=Path(state_dir).absolute() / "lab",
            cache=Path(os.environ.get("FLEET_LAB_CACHE") or DEFAULT_CACHE).absolute(),
            runtime=Path(os.environ.get("FLEET_LAB_RUNTIME") or DEFAULT_RUNTIME).absolute(),
        )

    # -- state (per checkout)
    @property
    def identity(self) -> Path:
        return self.state / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.state / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.state / "ssh_config"

    @property
    def record(self) -> Path:
        return self.state / "lab.json"

    # -- runtime (machine-wide)
    @property
    def lock(self) -> Path:
        return self.runtime / ".lock"

    @property
    def current(self) -> Path:
        return self.runtime / "current"

    @property
    def lower(self) -> Path:
        return self.runtime / "lower"

    @property
    def hosts(self) -> Path:
        return self.runtime / "hosts"

    @property
    def logs(self) -> Path:
        return self.runtime / "logs"

    @property
    def saved_sysctl(self) -> Path:
        return self.runtime / "inotify-max-user-instances.orig"

    def host_dir(self, name: str) -> Path:
        return self.hosts / name

    def merged(self, name: str) -> Path:
        return self.hosts / name / "merged"

    def console_log(self, name: str) -> Path:
        return self.logs / f"{name}.console.log"
