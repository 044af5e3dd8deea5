"""The lab fleet: real hosts on this machine to rehearse on.

One systemd-nspawn container per inventory file, each with systemd as PID 1, a real OpenSSH
server, its own network namespace and address on a private bridge, and its own SSH host key.
Root only; see docs/LAB.md.  The CLI hook is fleet.lab.cli (add_lab_parser, run_lab).
"""

from fleet.lab.image import ensure_image, find_mirror, image_path, recipe_hash
from fleet.lab.inventory import LabHost, read_inventory
from fleet.lab.lifecycle import (
    HostStatus,
    LabRecord,
    LabStatus,
    down,
    read_record,
    ssh_command,
    status,
    up,
)
from fleet.lab.settings import LabPaths

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
