"""Load: the collector against 32 lab hosts, 20 times in a row, loses no result and leaks no
connection, thread or file descriptor.  Counts, not timings (timings live in bench/)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from helpers import fleet_argv

from fleet import config
from fleet.collect.collector import collect
from fleet.model import HostState
from fleet.targets import resolve
from fleet.transport.ssh import SSHTransport

N_HOSTS = 32
RUNS = 20


def write_fleet(root: Path) -> None:
    (root / "hosts").mkdir(parents=True)
    names = [f"load{i:02d}" for i in range(N_HOSTS)]
    for i, name in enumerate(names):
        user, sudo = ("deploy", "true") if i % 2 else ("root", "false")
        (root / "hosts" / f"{name}.toml").write_text(
            f'address = "{name}.load.internal"\nuser = "{user}"\nsudo = {sudo}\nroles = ["app"]\n')
    hosts = ", ".join(f'"{n}"' for n in names)
    (root / "desired_state.toml").write_text(
        '[fleet]\nname = "load"\n\n[[discover]]\npattern = "mastodon-*"\nprune = true\n\n'
        '[[discover]]\npattern = "postgresql*"\n\n'
        f'[services.sshd]\nkind = "generic"\nunit = "ssh.service"\nhosts = [{hosts}]\nobserve_only = true\n')


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thirty_two_hosts_twenty_times_lose_nothing_and_leak_nothing(lab: Any, tmp_path: Path) -> None:
    root = tmp_path / "load"
    write_fleet(root)
    state = root / ".fleet"
    try:
        up = subprocess.run([*fleet_argv(), "lab", "up", "--dir", str(root), "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert up.returncode == 0, up.stdout + up.stderr
        loaded = config.load(root / "desired_state.toml", root / "hosts")
        assert loaded.desired is not None and not loaded.errors
        targets = resolve(loaded.desired, state_dir=str(state), lab=True)
        assert len(targets.hosts) == N_HOSTS
        threads0, fds0 = threading.active_count(), open_fds()
        for run in range(RUNS):
            with SSHTransport(ssh_config=targets.ssh_config, known_hosts=targets.known_hosts) as transport:
                results = collect(loaded.desired, transport, targets.hosts)
                stats = transport.stats()
            assert sorted(results) == sorted(h.name for h in targets.hosts), f"run {run} lost a host"
            failed = {h: r for h, r in results.items() if not isinstance(r, HostState)}
            assert not failed, f"run {run}: {failed}"
            assert all(isinstance(r, HostState) and r.unit("ssh.service") is not None and
                       r.unit("ssh.service").running for r in results.values())  # type: ignore[union-attr]
            assert all(s == {"connections": 1, "channels": 1} for s in stats.values()), stats
            # paramiko's reader threads end shortly after close(): allow them a moment
            deadline = time.monotonic() + 10
            while threading.active_count() > threads0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert threading.active_count() == threads0, f"run {run}: {threading.enumerate()}"
            assert open_fds() <= fds0 + 2, f"run {run}: {open_fds()} fds open, {fds0} before"
    finally:
        subprocess.run([*fleet_argv(), "lab", "down", "--state-dir", str(state)], capture_output=True,
                       timeout=300, stdin=subprocess.DEVNULL)
        restored = lab.up()  # the session's 4-host lab, for the modules after this one
        assert restored.returncode == 0, restored.stdout + restored.stderr
