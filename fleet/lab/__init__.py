"""The lab fleet: real hosts on this machine to rehearse on.

One systemd-nspawn container per inventory file, each with systemd as PID 1, a real OpenSSH
server, its own network namespace and address on a private bridge, and its own SSH host key.
Root only; see docs/LAB.md.  The CLI hook is fleet.lab.cli (add_lab_parser, run_lab).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.lab.image import ensure_image, find_mirror, image_path, recipe_hash
    from fleet.lab.inventory import LabHost, read_inventory
    from fleet.lab.lifecycle import HostStatus, LabRecord, LabStatus, down, read_record, ssh_command, status, up
    from fleet.lab.settings import LabPaths

# Where each name lives, imported on first use (PEP 562): `fleet --help` adds the lab's parser
# (fleet.lab.cli) and must not pay for booting machinery it never runs.
_HOME = {"ensure_image": "image", "find_mirror": "image", "image_path": "image", "recipe_hash": "image",
         "LabHost": "inventory", "read_inventory": "inventory", "LabPaths": "settings",
         **dict.fromkeys(("HostStatus", "LabRecord", "LabStatus", "down", "read_record", "ssh_command", "status",
                          "up"), "lifecycle")}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'fleet.lab' has no attribute {name!r}")
    return getattr(import_module(f"fleet.lab.{home}"), name)


__all__ = [
    "HostStatus",
    "LabHost",
    "LabPaths",
    "LabRecord",
    "LabStatus",
    "down",
    "ensure_image",
    "find_mirror",
    "image_path",
    "read_inventory",
    "read_record",
    "recipe_hash",
    "ssh_command",
    "status",
    "up",
]
