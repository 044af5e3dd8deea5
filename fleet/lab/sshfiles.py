"""The client side of the lab's SSH: the lab key pair, known_hosts and an ssh_config.

All paths written into these files are absolute, so `ssh -F <state>/lab/ssh_config fritz`
works from any directory, and strict host-key checking is on: every host gets its own key,
written by us before boot, so known_hosts is right from the first connection.
"""

from __future__ import annotations

import os
from pathlib import Path

from fleet.lab import settings, system
from fleet.lab.inventory import LabHost


def ensure_client_key(identity: Path) -> str:
    """Create the lab's client key once (reused across ups); returns the public key line."""
    identity.parent.mkdir(parents=True, exist_ok=True)
    public = identity.with_name(identity.name + ".pub")
    if not (identity.is_file() and public.is_file()):
        for stale in (identity, public):
            stale.unlink(missing_ok=True)
        system.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-lab",
                    "-f", identity])
    os.chmod(identity, 0o600)
    os.chmod(public, 0o600)
    return public.read_text().strip()


def generate_host_key(etc_ssh: Path, name: str) -> str:
    """A fresh ed25519 host key in <etc_ssh>; returns its public half ("ssh-ed25519 AAAA…")."""
    key = etc_ssh / "ssh_host_ed25519_key"
    for stale in (key, key.with_name(key.name + ".pub")):
        stale.unlink(missing_ok=True)
    system.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", key])
    kind, blob, *_ = key.with_name(key.name + ".pub").read_text().split()
    return f"{kind} {blob}"


def known_hosts_text(hosts: list[LabHost], host_keys: dict[str, str]) -> str:
    return "".join(f"{h.name},{h.address} {host_keys[h.name]}\n" for h in hosts)


def ssh_config_text(hosts: list[LabHost], identity: Path, known_hosts: Path) -> str:
    lines = ["# Written by `fleet lab up`; rewritten on every up.  Use: ssh -F THIS_FILE HOST", ""]
    for h in hosts:
        lines += [
            f"Host {h.name}",
            f"    HostName {h.address}",
            f"    Port {settings.SSH_PORT}",
            f"    User {h.user}",
            f"    IdentityFile {identity}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            "    UpdateHostKeys no",
            "    CheckHostIP no",
            "    PasswordAuthentication no",
            "    KbdInteractiveAuthentication no",
            "    BatchMode yes",
            "    ConnectTimeout 5",
            "    ControlMaster no",
            "    ControlPath none",
            "    ForwardAgent no",
            "    LogLevel ERROR",
            "",
        ]
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """Write text to path atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
