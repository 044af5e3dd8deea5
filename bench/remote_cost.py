"""What one host's collection costs the machine, split into the SSH client, the connection on the
remote side (sshd, PAM, sudo) and fleet's script (its shell, systemctl, awk, sha256sum, and the
work systemd's PID 1 does to answer systemctl).

On the lab every host shares the machine's cores, so the remote side is part of the measured
wall time.  Each case runs alone, one at a time, `repeats` times (OpenSSH client, like the floor):
client CPU comes from wait4, the machine's busy CPU from /proc/stat around the run, minus the
machine's idle-lab baseline for the same duration.  remote = machine - client - baseline.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.lab import Lab, run_parallel
from bench.status import KEX, _load, floor_argvs, machine_busy


def _baseline(seconds: float = 3.0) -> float:
    b0 = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - b0) / seconds


def measure_remote_cost(lab: Lab, directory: Path, repeats: int = 15) -> dict[str, Any]:
    desired, targets = _load(directory, lab.state_dir)
    floors = {argv[argv.index("-o") + 2]: argv for argv in floor_argvs(lab, directory)}
    root = next(h for h in targets.hosts if not h.sudo)
    deploy = next(h for h in targets.hosts if h.sudo)
    kex = ["-o", f"KexAlgorithms={KEX}"]
    cases = {
        f"ssh {root.name} true (root login)": lab.ssh_argv(root.name, "true", *kex),
        f"ssh {deploy.name} 'sudo -n -- sh -c true' (deploy login)":
            lab.ssh_argv(deploy.name, "sudo -n -- sh -c true", *kex),
        f"fleet's script on {root.name} (root login; 7 units)": floors[root.name],
        f"fleet's script on {deploy.name} (deploy login, sudo; 4 units)": floors[deploy.name],
    }
    baseline = _baseline()
    out: dict[str, Any] = {"baseline_busy_cores": baseline, "repeats": repeats, "cases": {}}
    for label, argv in cases.items():
        rows = []
        for i in range(repeats):
            time.sleep(0.2)
            b0 = machine_busy()
            wall, (m,) = run_parallel([argv], out_dir=lab.work / "logs", tag=f"remote-cost-{i}")
            busy = machine_busy() - b0
            rows.append({"wall_s": wall, "client_cpu_s": m.cpu_s, "machine_cpu_s": busy,
                         "remote_cpu_s": busy - m.cpu_s - baseline * wall, "rc": m.rc})
        med = statistics.median
        out["cases"][label] = {
            "wall_s": med(r["wall_s"] for r in rows),
            "client_cpu_s": med(r["client_cpu_s"] for r in rows),
            "remote_cpu_s": med(r["remote_cpu_s"] for r in rows),
            "machine_cpu_s": med(r["machine_cpu_s"] for r in rows),
            "failures": sum(1 for r in rows if r["rc"] != 0),
        }
    return out
