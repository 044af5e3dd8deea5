"""OpenSSH client configuration: where and how a `Host` is reached.

Owns the step from an inventory `Host` plus its ssh config entry to an `SSHTarget`: HostName,
Port, User, IdentityFile/IdentitiesOnly, UserKnownHostsFile/GlobalKnownHostsFile (and where
accept-new records a key), HostKeyAlias, HashKnownHosts, ConnectTimeout, ProxyJump and
ProxyCommand; reading the config file (a clear ConfigError when it cannot be read) and parsing
ProxyJump hops.  The config's *matching* (Host/Match blocks, tokens) is paramiko's SSHConfig,
which only `fleet.transport.ssh` imports: it hands this module the entry it looked up, as a
plain mapping.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.errors import ConfigError
from fleet.model import Host
from fleet.transport.known_hosts import (
    DEFAULT_GLOBAL_KNOWN_HOSTS,
    DEFAULT_KNOWN_HOSTS,
    DEFAULT_USER_KNOWN_HOSTS,
    hostkey_name,
)

DEFAULT_SSH_CONFIG = "~/.ssh/config"
# The default identities OpenSSH tries, restricted to the key types paramiko can load.
DEFAULT_IDENTITY_FILES: tuple[str, ...] = ("~/.ssh/id_rsa", "~/.ssh/id_ecdsa", "~/.ssh/id_ed25519")
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_PROXY_JUMPS = 8

_MATCH_EXEC = re.compile(r"^\s*match\b.*\bexec\b", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class SSHTarget:
    """A `Host` resolved through the ssh config: where and how to connect."""

    name: str
    address: str
    port: int
    user: str
    hostkey_name: str  # the name looked up in (and written to) known_hosts
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    known_hosts: tuple[str, ...] = DEFAULT_KNOWN_HOSTS
    record_to: str | None = None  # where accept-new records keys
    hash_known_hosts: bool = False
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    proxy_jump: str | None = None
    proxy_command: str | None = None


def default_config_path() -> str | None:
    """~/.ssh/config when it exists (as ssh reads it), else None."""
    default = os.path.expanduser(DEFAULT_SSH_CONFIG)
    return default if os.path.isfile(default) else None


def read_config(path: str) -> str:
    """The text of the ssh config at `path`; a ConfigError naming the file when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the ssh config {path}: {exc.strerror or exc}",
            file=path,
            hint="pass an existing OpenSSH client config, or none to use ~/.ssh/config",
        ) from exc


def uses_match_exec(text: str) -> bool:
    """Whether a config has a `Match exec` block (whose command paramiko runs through invoke)."""
    return _MATCH_EXEC.search(text) is not None


def known_hosts_files(given: Sequence[str] | None) -> tuple[tuple[str, ...], str | None]:
    """(the known_hosts files keys are checked against, the file accept-new records keys in).

    None means ~/.ssh/known_hosts and /etc/ssh/ssh_known_hosts, recording in the user's file;
    an explicit list records in its first file (none when the list is empty)."""
    files = tuple(os.path.expanduser(f) for f in (given if given is not None else DEFAULT_KNOWN_HOSTS))
    if given is None:
        return files, os.path.expanduser(DEFAULT_USER_KNOWN_HOSTS)
    return files, (files[0] if files else None)


def resolve(
    host: Host,
    entry: Mapping[str, Any],
    *,
    known_hosts: tuple[str, ...],
    record_to: str | None,
    connect_timeout: float,
    connect_timeout_given: bool,
) -> SSHTarget:
    """Where and how `host` is reached, given its ssh config entry (paramiko's lookup by the
    host's NAME, keys lower-cased): the entry wins for HostName/Port/User, the inventory's
    address/port/user fill the rest.  `known_hosts`/`record_to` apply unless the entry names
    UserKnownHostsFile; a `connect_timeout_given` by the operator wins over ConnectTimeout
    (like `ssh -o` over the config file)."""
    hostname = entry.get("hostname")
    address = hostname if hostname and hostname != host.name else host.address
    port = int(entry["port"]) if "port" in entry else host.port
    user = str(entry.get("user", host.user))
    alias = entry.get("hostkeyalias")
    user_files = config_files(entry.get("userknownhostsfile"))
    if user_files is not None:
        global_files = config_files(entry.get("globalknownhostsfile"))
        known = user_files + (global_files if global_files is not None else (DEFAULT_GLOBAL_KNOWN_HOSTS,))
        record = user_files[0] if user_files else None
    else:
        known, record = known_hosts, record_to
    jump = entry.get("proxyjump")
    command = entry.get("proxycommand")
    return SSHTarget(
        name=host.name,
        address=address,
        port=port,
        user=user,
        hostkey_name=str(alias).lower() if alias else hostkey_name(address, port),
        identity_files=tuple(os.path.expanduser(p) for p in entry.get("identityfile", [])),
        identities_only=str(entry.get("identitiesonly", "no")).lower() == "yes",
        known_hosts=known,
        record_to=record,
        hash_known_hosts=str(entry.get("hashknownhosts", "no")).lower() == "yes",
        connect_timeout=(float(entry["connecttimeout"]) if "connecttimeout" in entry and not connect_timeout_given
                         else connect_timeout),
        proxy_jump=None if not jump or jump == "none" else str(jump),
        proxy_command=None if not command or command == "none" else str(command),
    )


def config_files(value: str | None) -> tuple[str, ...] | None:
    """A UserKnownHostsFile/GlobalKnownHostsFile value as files; `none` is no file, None unset."""
    if value is None:
        return None
    files = tuple(os.path.expanduser(v) for v in value.split())
    return () if files == ("none",) else files


def parse_jump(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (or ssh://[user@]host[:port]) → (user, host, port)."""
    spec = spec.strip().removeprefix("ssh://")
    user, _, hostport = spec.rpartition("@")
    host, port = hostport, None
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
        port = int(port_text)
    return (user or None), host, port
