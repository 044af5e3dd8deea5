"""Thin, checked wrappers around the machine: commands, mounts, cgroups, processes, sysctl.

Every command is an argv list (never a shell string), and a failing command becomes a LabError
that names the command, its exit status and its stderr.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from fleet.errors import LabError
from fleet.lab import settings
from fleet.textutil import digits

# Which Debian package provides each tool the lab calls.
TOOLS: dict[str, str] = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "ip": "iproute2",
    "zstd": "zstd",
    "tar": "tar",
    "chroot": "coreutils",
    "mount": "mount",
    "umount": "mount",
}
UP_TOOLS = tuple(TOOLS)
DOWN_TOOLS = ("ip", "umount")


def progress(message: str) -> None:
    """Progress for humans goes to stderr, so stdout stays parseable."""
    print(f"fleet lab: {message}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float | None = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell), capture text output; raise LabError on failure when `check`."""
    args = [os.fspath(a) for a in argv]
    try:
        done = subprocess.run(
            args,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise missing_tool(args[0]) from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout} s: {shlex.join(args)}") from exc
    if check and done.returncode != 0:
        raise LabError(
            f"command failed with exit status {done.returncode}: {shlex.join(args)}\n"
            + indent(done.stderr.strip() or done.stdout.strip() or "(no output)")
        )
    return done


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def missing_tool(tool: str) -> LabError:
    package = TOOLS.get(tool, "")
    hint = f"install it: apt-get install -y {package}" if package else "install it"
    return LabError(f"`{tool}` is not installed on this machine", hint=hint)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "fleet lab needs root: it creates network namespaces, mounts and containers",
            hint="run it as root (e.g. sudo -E fleet lab up)",
        )


def require_tools(tools: Iterable[str]) -> None:
    """Fail with the first missing tool and the Debian package that provides it."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = sorted({TOOLS.get(t, t) for t in missing})
        raise LabError(
            f"missing on this machine: {', '.join(missing)}",
            hint=f"install them: apt-get install -y {' '.join(packages)}",
        )


# -- mounts -----------------------------------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and digits(field[i + 1 : i + 4]) and len(field) >= i + 4:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[Path, str]]:
    """(mount point, filesystem type) of every mount in this mount namespace, in mount order."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = _unescape_mount_field(left.split()[4])
            result.append((Path(point), right.split()[0]))
    return result


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below root, deepest (last mounted) first, without duplicates."""
    seen: list[Path] = []
    for point, _ in reversed(mounts()):
        if (point == root or root in point.parents) and point not in seen:
            seen.append(point)
    return seen


def is_mountpoint(path: Path) -> bool:
    return any(point == path for point, _ in mounts())


def unmount(path: Path) -> None:
    """Unmount path, falling back to a lazy unmount if it stays busy."""
    for _ in range(20):
        done = run(["umount", path], check=False)
        if done.returncode == 0 or not is_mountpoint(path):
            return
        time.sleep(0.1)
    run(["umount", "--lazy", path])


def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into a mounted file system (e.g. a leftover /proc)."""
    if path.exists() or path.is_symlink():
        run(["rm", "-rf", "--one-file-system", path])


# -- cgroups ----------------------------------------------------------------------------------


def cgroup_roots() -> list[Path]:
    """Hierarchies a lab host's cgroup directory is made in.

    With cgroup v1 (this machine) systemd-nspawn needs the named `systemd` hierarchy and the
    empty v2 tree at `unified`; on a pure v2 machine it is the one tree at /sys/fs/cgroup.
    """
    root = settings.CGROUP_ROOT
    if (root / "cgroup.controllers").exists():
        return [root]
    return [p for p in (root / "systemd", root / "unified") if (p / "cgroup.procs").exists()]


def lab_cgroups() -> list[Path]:
    """Existing lab cgroup directories (the lab's own, per root)."""
    return [r / settings.LAB_NAME for r in cgroup_roots() if (r / settings.LAB_NAME).is_dir()]


def host_cgroups(name: str) -> list[Path]:
    return [r / settings.LAB_NAME / name for r in cgroup_roots()]


def cgroup_pids(directory: Path) -> set[int]:
    """Every process in a cgroup directory and all its descendants."""
    pids: set[int] = set()
    for dirpath, _, filenames in os.walk(directory):
        if "cgroup.procs" in filenames:
            try:
                text = Path(dirpath, "cgroup.procs").read_text()
            except OSError:
                continue
            pids.update(int(p) for p in text.split())
    return pids


def remove_cgroup_tree(directory: Path) -> None:
    """rmdir a cgroup directory bottom-up (cgroupfs only lets empty directories go)."""
    for dirpath, _, _ in sorted(os.walk(directory), key=lambda w: -len(Path(w[0]).parts)):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass


# -- processes --------------------------------------------------------------------------------


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def pss_kib(pids: Iterable[int]) -> int:
    """Sum of proportional set size (KiB) of the given processes."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, ValueError):
            continue
    return total


# -- sysctl -----------------------------------------------------------------------------------


def raise_inotify_limit(saved: Path) -> None:
    """Raise fs.inotify.max_user_instances (nspawn needs one per host) and remember the old
    value in `saved` — only the first time, so a crashed run does not record its own raise."""
    current = int(settings.INOTIFY_SYSCTL.read_text())
    if not saved.exists():
        saved.write_text(f"{current}\n")
    if current < settings.INOTIFY_WANTED:
        settings.INOTIFY_SYSCTL.write_text(f"{settings.INOTIFY_WANTED}\n")


def restore_inotify_limit(saved: Path) -> str | None:
    """Put back the remembered value; returns it, or None if nothing was remembered."""
    if not saved.exists():
        return None
    value = saved.read_text().strip()
    if digits(value):
        settings.INOTIFY_SYSCTL.write_text(f"{value}\n")
    saved.unlink()
    return value
