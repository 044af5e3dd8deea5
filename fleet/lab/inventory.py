"""The lab's reading of the inventory: which hosts to boot, under what name and login user.

Deliberately minimal (file stem, `user`): the lab must come up even when the rest of the
inventory is being edited, and fleet.config remains the one validator of the real thing.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import LabError
from fleet.lab import settings
from fleet.textutil import digits

HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class LabHost:
    """One lab host: inventory name, lab address, login user (inventory `user`)."""

    name: str
    index: int
    address: str
    user: str
    aliases: tuple[str, ...] = ()  # the inventory `address` when it is a name, for /etc/hosts

    @property
    def netns(self) -> str:
        return settings.netns_of(self.name)

    @property
    def veth(self) -> str:
        return settings.veth_of(self.index)


def read_inventory(hosts_dir: Path) -> list[LabHost]:
    """One LabHost per `*.toml` in hosts_dir, addresses given in sorted name order."""
    if not hosts_dir.is_dir():
        raise LabError(
            f"inventory directory not found: {hosts_dir}",
            hint="pass --hosts DIR (one TOML file per host) or --dir pointing at the repo",
        )
    files = sorted(hosts_dir.glob("*.toml"), key=lambda p: p.stem)
    if not files:
        raise LabError(f"no host files (*.toml) in {hosts_dir}", hint="add one file per host")
    if len(files) > settings.MAX_HOSTS:
        raise LabError(f"{len(files)} hosts is more than the lab's {settings.MAX_HOSTS}")
    hosts = []
    for index, path in enumerate(files):
        name = path.stem
        if not HOSTNAME.match(name):
            raise LabError(
                f"{path}: host name {name!r} is not a valid hostname",
                hint="use lower-case letters, digits and '-' in host file names",
            )
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LabError(f"{path}: cannot read host file: {exc}") from exc
        user = data.get("user", "root")
        if not isinstance(user, str) or not USERNAME.match(user):
            raise LabError(f"{path}: user {user!r} is not a valid login name")
        address = data.get("address")
        aliases: tuple[str, ...] = ()
        if isinstance(address, str) and address != name and HOSTNAME.match(
            address.split(".")[0]
        ) and not digits(address.replace(".", "")):
            aliases = (address,)
        hosts.append(
            LabHost(name=name, index=index, address=settings.address_of(index), user=user,
                    aliases=aliases)
        )
    return hosts
