"""Driving the shared lab from the benchmark: the machine-wide lock, up/down, measured processes.

The lab is one per machine, so every lab session of the benchmark runs under the same lock the
other users of this machine take (`flock -x /tmp/fleet-lab-session.lock …`), and always ends with
`fleet lab down` on the benchmark's own state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LAB_LOCK = "/tmp/fleet-lab-session.lock"


def fleet_argv() -> list[str]:
    """How to start `fleet` exactly as a user does: the console script next to this Python
    (not a pyenv shim, whose bash wrapper would add its own ~30 ms to every run)."""
    script = Path(sys.executable).with_name("fleet")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; from fleet.cli import entry; sys.argv[0] = 'fleet'; entry()"]


@dataclass(frozen=True)
class Measured:
    """One child process: wall clock, its own CPU and peak RSS (from wait4), exit code."""

    argv: tuple[str, ...]
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    stdout: str
    stderr: str
    # The child's own peak (VmHWM, polled while it runs): wait4's ru_maxrss also counts the memory
    # image it was forked from — this (large) bench process — until its exec (Linux keeps the old
    # image's high-water mark), so a small child measured from a big parent reports the parent's size.
    hwm_mb: float = 0.0

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def measure(argv: Sequence[str], *, out_dir: Path, tag: str, timeout: float = 600,
            env: dict[str, str] | None = None) -> Measured:
    """Run argv with stdout/stderr to files; rusage of exactly this child via os.wait4."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = out_dir / f"{tag}.out", out_dir / f"{tag}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        child_env = dict(os.environ if env is None else env)
        child_env["BENCH_T0"] = repr(time.monotonic())  # read by bench.collect_profile
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env)
        deadline = started + timeout
        hwm_kb = 0
        while True:
            hwm_kb = max(hwm_kb, _hwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from waiting again
    return Measured(tuple(argv), proc.returncode, wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss / 1024,
                    out_path.read_text(errors="replace"), err_path.read_text(errors="replace"), hwm_kb / 1024)


def _hwm_kb(pid: int) -> int:
    """VmHWM of a running process (kB); 0 once it has exited (a zombie has no memory image)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_parallel(argvs: Sequence[Sequence[str]], *, out_dir: Path, tag: str, timeout: float = 120
                 ) -> tuple[float, list[Measured]]:
    """Start every argv at once (one process each), wait for all; (wall of the whole, each)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    procs = []
    started = time.perf_counter()
    for i, argv in enumerate(argvs):
        out = open(out_dir / f"{tag}.{i}.out", "wb")  # closed below
        err = open(out_dir / f"{tag}.{i}.err", "wb")
        files.append((out, err))
        procs.append((argv, time.perf_counter(),
                      subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err)))
    pending = {p.pid: (argv, t0, p) for argv, t0, p in procs}
    done: dict[int, Measured] = {}
    deadline = started + timeout
    while pending:
        pid, status, usage = os.wait4(-1, os.WNOHANG)
        if not pid:
            if time.perf_counter() > deadline:
                for _, _, p in pending.values():
                    p.kill()
                deadline = float("inf")
            time.sleep(0.0005)
            continue
        if pid not in pending:
            continue
        argv, t0, p = pending.pop(pid)
        p.returncode = os.waitstatus_to_exitcode(status)
        done[pid] = Measured(tuple(argv), p.returncode, time.perf_counter() - t0, usage.ru_utime, usage.ru_stime,
                             usage.ru_maxrss / 1024, "", "")
    wall = time.perf_counter() - started
    results = []
    for i, (_, _, p) in enumerate(procs):
        out, err = files[i]
        out.close()
        err.close()
        m = done[p.pid]
        results.append(Measured(m.argv, m.rc, m.wall_s, m.user_s, m.sys_s, m.maxrss_mb,
                                (out_dir / f"{tag}.{i}.out").read_text(errors="replace"),
                                (out_dir / f"{tag}.{i}.err").read_text(errors="replace")))
    return wall, results


@contextlib.contextmanager
def lab_lock(report: Callable[[str], None] = print) -> Iterator[float]:
    """Hold the machine-wide lab lock; yields how long we waited for it."""
    fd = os.open(LAB_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for the lab lock {LAB_LOCK} (another lab session is running)…")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.monotonic() - started
    finally:
        os.close(fd)  # releases the lock


class Lab:
    """`fleet lab up/down` on the benchmark's own state directory."""

    def __init__(self, state_dir: Path, work: Path, report: Callable[[str], None] = print) -> None:
        self.state_dir = state_dir
        self.work = work
        self.report = report

    @property
    def ssh_config(self) -> Path:
        return self.state_dir / "lab" / "ssh_config"

    def fleet(self, *args: str, tag: str, timeout: float = 900) -> Measured:
        return measure([*fleet_argv(), *args], out_dir=self.work / "logs", tag=tag, timeout=timeout)

    def up(self, hosts_dir: Path, tag: str) -> Measured:
        m = self.fleet("lab", "up", "--hosts", str(hosts_dir), "--state-dir", str(self.state_dir), tag=tag)
        if m.rc != 0:
            raise RuntimeError(f"fleet lab up failed (rc {m.rc}):\n{m.stderr[-3000:]}")
        return m

    def down(self, tag: str = "lab-down") -> Measured:
        return self.fleet("lab", "down", "--state-dir", str(self.state_dir), tag=tag)

    def ssh_argv(self, host: str, command: str, *options: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), *options, host, command]

    def ssh(self, host: str, command: str, *options: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_argv(host, command, *options), capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def root(self, host: str, sudo: bool, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `command` as root on a lab host (through sudo -n for non-root logins)."""
        wire = f"sudo -n -- sh -c {shlex.quote(command)}" if sudo else command
        return self.ssh(host, wire, timeout=timeout)
