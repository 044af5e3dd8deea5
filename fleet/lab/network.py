"""The lab's private network: one bridge on the machine, one namespace + veth per host.

Host i lives in namespace `fleetlab-<name>`, reached through the veth pair
`fleetlab-v<i>` (on the bridge) / `host0` (inside) at 10.251.0.(10+i)/24.  There is no default
route inside, so lab hosts can reach this machine and each other, and nothing else.
"""

from __future__ import annotations

import json

from fleet.lab import settings, system
from fleet.lab.inventory import LabHost
from fleet.textutil import digits


def create_bridge() -> None:
    system.run(["ip", "link", "add", settings.BRIDGE, "type", "bridge"])
    system.run(["ip", "addr", "add", f"{settings.GATEWAY}/{settings.PREFIX_LEN}",
                "dev", settings.BRIDGE])
    system.run(["ip", "link", "set", settings.BRIDGE, "up"])


def create_host_network(host: LabHost) -> None:
    ns = host.netns
    system.run(["ip", "netns", "add", ns])
    system.run(["ip", "link", "add", host.veth, "type", "veth",
                "peer", "name", settings.GUEST_IFACE, "netns", ns])
    system.run(["ip", "link", "set", host.veth, "master", settings.BRIDGE, "up"])
    system.run(["ip", "-n", ns, "addr", "add", f"{host.address}/{settings.PREFIX_LEN}",
                "dev", settings.GUEST_IFACE])
    system.run(["ip", "-n", ns, "link", "set", settings.GUEST_IFACE, "up"])
    system.run(["ip", "-n", ns, "link", "set", "lo", "up"])


def lab_namespaces() -> list[str]:
    """Network namespaces that carry the lab's prefix (whoever made them)."""
    done = system.run(["ip", "-json", "netns", "list"], check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    names = [entry.get("name", "") for entry in json.loads(done.stdout)]
    return sorted(n for n in names if n.startswith(settings.NETNS_PREFIX))


def lab_links() -> list[str]:
    """Links on the machine that carry the lab's prefix: the bridge and host-side veths."""
    done = system.run(["ip", "-json", "link", "show"], check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    names = [entry.get("ifname", "") for entry in json.loads(done.stdout)]
    return sorted(n for n in names if n.startswith(settings.LAB_NAME))


def namespace_pids(ns: str) -> set[int]:
    done = system.run(["ip", "netns", "pids", ns], check=False)
    return {int(p) for p in done.stdout.split() if digits(p)}


def delete_namespace(ns: str) -> None:
    system.run(["ip", "netns", "delete", ns], check=False)


def delete_link(name: str) -> None:
    system.run(["ip", "link", "delete", name], check=False)
