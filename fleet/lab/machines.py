"""One lab host's life: its overlay tree, what we write into it before boot, the boot itself,
and waiting until it answers SSH with a finished systemd boot.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import LabError
from fleet.lab import image, settings, sshfiles, system
from fleet.lab.inventory import LabHost
from fleet.lab.settings import LabPaths

UP_STATES = ("running", "degraded")


def mount_overlay(paths: LabPaths, host: LabHost) -> Path:
    """Mount the host's overlay (shared read-only lower, its own upper) and return the root."""
    top = paths.host_dir(host.name)
    upper, work, merged = top / "upper", top / "work", top / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={paths.lower},upperdir={upper},workdir={work}"
    system.run(["mount", "-t", "overlay", f"{settings.LAB_NAME}-{host.name}", "-o", options,
                merged])
    return merged


def write_host_files(root: Path, host: LabHost, all_hosts: list[LabHost], client_key: str,
                     redis_password: str) -> str:
    """Personalise a host's tree before boot; returns its new SSH host public key."""
    host_key = sshfiles.generate_host_key(root / "etc/ssh", host.name)
    (root / "etc/hostname").write_text(f"{host.name}\n")
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{host.name}",
             "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{h.address}\t{' '.join((h.name, *h.aliases))}" for h in all_hosts]
    (root / "etc/hosts").write_text("\n".join(lines) + "\n")
    _authorize(root, "root", client_key)
    write_redis_conf(root, redis_password)
    level = sshd_log_level()
    if level:  # e.g. DEBUG1 for the test suite, so that a failed lab test keeps what sshd saw
        conf = root / "etc/ssh/sshd_config.d/fleet-lab-log.conf"
        conf.write_text(f"# fleet lab: {SSHD_LOG_ENV}\nLogLevel {level}\n")
    if host.user != "root":
        if not _passwd_entry(root, host.user):
            system.run(["chroot", root, "useradd", "--create-home", "--shell", "/bin/bash",
                        "--user-group", host.user],
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
        _authorize(root, host.user, client_key)
        sudoers = root / "etc/sudoers.d" / f"fleet-lab-{host.user}"
        sudoers.write_text(f"# fleet lab: the inventory user\n{host.user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        os.chmod(sudoers, 0o440)
    return host_key


def write_redis_conf(root: Path, password: str) -> None:
    """The lab's Redis (where it is enabled) listens on the lab network and wants the lab's password,
    which Sidekiq and fleet get from the env file fleet deploys.  Readable by redis only."""
    entry = _passwd_entry(root, "redis")
    if entry is None:
        raise LabError("user 'redis' missing in the lab host's /etc/passwd (is redis-server in the image?)")
    conf = root / image.REDIS_LAB_CONF.lstrip("/")
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        f.write(f"# fleet lab: written by `fleet lab up`\nbind 0.0.0.0 -::1\nrequirepass {password}\n")
    os.chown(conf, 0, int(entry[3]))
    os.chmod(conf, 0o640)


SSHD_LOG_ENV = "FLEET_LAB_SSHD_LOG_LEVEL"
SSHD_LOG_LEVELS = ("QUIET", "FATAL", "ERROR", "INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3")


def sshd_log_level() -> str:
    """sshd's LogLevel on the lab hosts from $FLEET_LAB_SSHD_LOG_LEVEL ("" keeps sshd's INFO)."""
    level = os.environ.get(SSHD_LOG_ENV, "").strip().upper()
    if level and level not in SSHD_LOG_LEVELS:
        raise LabError(f"{SSHD_LOG_ENV}={level!r} is not an sshd LogLevel",
                       hint=f"one of {', '.join(SSHD_LOG_LEVELS)}, or unset it")
    return level


def _passwd_entry(root: Path, user: str) -> list[str] | None:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields
    return None


def _authorize(root: Path, user: str, client_key: str) -> None:
    entry = _passwd_entry(root, user)
    if entry is None:
        raise LabError(f"user {user!r} missing in the lab host's /etc/passwd")
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    ssh_dir = root / home.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(client_key + "\n")
    for path, mode in ((ssh_dir, 0o700), (keys, 0o600)):
        os.chown(path, uid, gid)
        os.chmod(path, mode)


def boot(paths: LabPaths, host: LabHost) -> subprocess.Popen[bytes]:
    """Start systemd-nspawn for the host, detached: own session, own cgroup, console to a file.

    Each nspawn starts in the host's own cgroup directory (in every hierarchy), or it would
    create /payload and /supervisor at the top of the tree where two hosts collide.
    """
    procs_files = []
    for cgroup in system.host_cgroups(host.name):
        cgroup.mkdir(parents=True, exist_ok=True)
        procs_files.append(str(cgroup / "cgroup.procs"))

    def enter_cgroups() -> None:  # runs in the child between fork and exec
        for procs in procs_files:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    argv = [
        "systemd-nspawn", "-q",
        "-D", str(paths.merged(host.name)),
        "-M", host.name, f"--hostname={host.name}",
        "-b", "--register=no", "--keep-unit", "--console=read-only",
        f"--network-namespace-path=/run/netns/{host.netns}",
        "--link-journal=no", "--resolv-conf=off", "--timezone=off",
    ]
    log = open(paths.console_log(host.name), "ab")  # handed to the child
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=enter_cgroups,  # called before any thread starts
            close_fds=True,
        )
    finally:
        log.close()


@dataclass(frozen=True)
class Readiness:
    """How a host's boot ended: `state` is systemd's word for it, `error` empty when it's up."""

    name: str
    state: str
    seconds: float
    error: str = ""
    failed_units: tuple[str, ...] = ()

    @property
    def up(self) -> bool:
        return not self.error and self.state in UP_STATES


def ssh_argv(ssh_config: Path, host: str, *command: str) -> list[str]:
    return ["ssh", "-F", str(ssh_config), host, *command]


def port_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_ready(
    host: LabHost, process: subprocess.Popen[bytes], ssh_config: Path, deadline: float,
    started: float,
) -> Readiness:
    """Poll until the host answers SSH and its boot has finished (running or degraded)."""
    last = "no answer on port 22"
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            return Readiness(host.name, "off", time.monotonic() - started,
                             f"systemd-nspawn exited with status {code}")
        if not port_open(host.address, settings.SSH_PORT):
            time.sleep(0.1)
            continue
        remaining = max(1.0, deadline - time.monotonic())
        try:
            done = subprocess.run(
                ssh_argv(ssh_config, host.name, "systemctl", "is-system-running", "--wait"),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=remaining,
            )
        except subprocess.TimeoutExpired:
            last = "boot did not finish (systemctl is-system-running --wait timed out)"
            break
        state = done.stdout.strip()
        if done.returncode == 255 or not state:  # ssh itself failed: sshd not ready yet
            last = f"ssh failed: {done.stderr.strip() or 'exit status 255'}"
            time.sleep(0.2)
            continue
        took = time.monotonic() - started
        if state == "degraded":
            units = subprocess.run(
                ssh_argv(ssh_config, host.name, "systemctl", "--failed", "--plain",
                         "--no-legend"),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
            ).stdout.split("\n")
            failed = tuple(u.split()[0] for u in units if u.strip())
            return Readiness(host.name, state, took, failed_units=failed)
        if state in UP_STATES:
            return Readiness(host.name, state, took)
        return Readiness(host.name, state, took, f"systemd says the system is {state!r}")
    return Readiness(host.name, "unknown", time.monotonic() - started, f"timed out: {last}")


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def console_tail(path: Path, lines: int = 25) -> str:
    """The last non-blank lines of a console log, without terminal colour codes."""
    try:
        text = ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return "(no console log)"
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(console log is empty)"
