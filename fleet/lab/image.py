"""The lab's root file system: its recipe, the build (debootstrap), and the machine-wide cache.

The image is built once per recipe and kept as `<cache>/fleet-lab-<suite>-<hash>.tar.zst`, where
the hash covers everything that shapes the image (package list, setup steps, stand-in scripts,
a recipe version) but not the mirror, so any checkout on the machine — CI in a fresh clone
included — reuses it.  Builds happen in a temporary directory next to the cache and end with a
rename, so an interrupted build never leaves a tarball that looks complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import LabError
from fleet.lab import system

RECIPE_VERSION = 2  # bump when the build changes in a way the recipe data below does not show
SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES: tuple[str, ...] = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "libpam-systemd",
    "procps", "python3", "sudo", "curl", "redis-server", "postgresql",
)
# Real packages, installed but off: fleet has to enable and start them where they are declared.
DISABLED_UNITS: tuple[str, ...] = ("postgresql.service", "redis-server.service")
# Chores that do disk or network work, and gettys nobody logs in on.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.service", "apt-daily.timer", "apt-daily-upgrade.service",
    "apt-daily-upgrade.timer", "e2scrub_all.service", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.service", "fstrim.timer", "dpkg-db-backup.service",
    "dpkg-db-backup.timer", "man-db.timer", "logrotate.timer", "console-getty.service",
    "getty@tty1.service", "container-getty@.service", "systemd-pstore.service",
)
MASTODON_HOME = "/home/mastodon"
# Commands run with chroot inside the fresh root file system, in order.
SETUP_STEPS: tuple[tuple[str, ...], ...] = (
    ("systemctl", "disable", "--quiet", *DISABLED_UNITS),
    ("systemctl", "mask", "--quiet", *MASKED_UNITS),
    ("useradd", "--create-home", "--home-dir", MASTODON_HOME, "--shell", "/bin/bash",
     "--user-group", "mastodon"),
    ("install", "-d", "-o", "mastodon", "-g", "mastodon", "-m", "0755",
     f"{MASTODON_HOME}/live", f"{MASTODON_HOME}/.rbenv", f"{MASTODON_HOME}/.rbenv/shims"),
)
# Paths (inside the image) deleted after setup: downloaded packages, indexes, docs, host keys.
REMOVED_PATHS: tuple[str, ...] = (
    "/var/cache/apt/archives/*.deb", "/var/cache/apt/*.bin", "/var/lib/apt/lists/*",
    "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
    "/etc/ssh/ssh_host_*", "/etc/hostname", "/var/log/*.log", "/debootstrap",
    "/var/lib/dbus/machine-id",
)
SSHD_DROPIN = (
    "# fleet lab: only the per-host ed25519 key written before boot; keys only.\n"
    "HostKey /etc/ssh/ssh_host_ed25519_key\n"
    "PasswordAuthentication no\n"
    "KbdInteractiveAuthentication no\n"
    "UseDNS no\n"
)
# The lab's Redis takes the rest of its settings from a file `up` writes into each host (it holds the
# lab's Redis password): listening on the lab network, so that Sidekiq on other hosts reaches it.
REDIS_LAB_CONF = "/etc/redis/fleet-lab.conf"
REDIS_INCLUDE = f"\n# fleet lab: bind and requirepass, written by `fleet lab up`\ninclude {REDIS_LAB_CONF}\n"
STANDINS_DIR = Path(__file__).with_name("standins")


@dataclass(frozen=True)
class Standin:
    """A stand-in executable: source file in fleet/lab/standins/, path and owner in the image."""

    source: str
    target: str
    owner: str


STANDINS: tuple[Standin, ...] = (
    Standin("bundle", f"{MASTODON_HOME}/.rbenv/shims/bundle", "mastodon"),
    Standin("node", "/usr/bin/node", "root"),
)


def recipe() -> dict[str, object]:
    """Everything that shapes the image, as plain data (hashed into the cache file name)."""
    return {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "variant": VARIANT,
        "packages": list(PACKAGES),
        "setup": [list(step) for step in SETUP_STEPS],
        "removed": list(REMOVED_PATHS),
        "sshd_dropin": SSHD_DROPIN,
        "redis_include": REDIS_INCLUDE,
        "standins": {
            s.target: [s.owner, hashlib.sha256((STANDINS_DIR / s.source).read_bytes()).hexdigest()]
            for s in STANDINS
        },
    }


def recipe_hash() -> str:
    text = json.dumps(recipe(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def image_path(cache: Path) -> Path:
    return cache / f"fleet-lab-{SUITE}-{recipe_hash()}.tar.zst"


# -- mirror -----------------------------------------------------------------------------------


def find_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (FLEET_LAB_MIRROR wins); security suites are
    skipped because debootstrap needs the main archive."""
    override = os.environ.get("FLEET_LAB_MIRROR", "").strip()
    if override:
        return override
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        for uri in _deb822_uris(path.read_text()):
            return uri
    lists = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.is_file():
            for uri in _one_line_uris(path.read_text()):
                return uri
    raise LabError(
        f"cannot find a Debian mirror in {sources_dir}/sources.list(.d)",
        hint="set FLEET_LAB_MIRROR to the URL of a Debian archive mirror",
    )


def _deb822_uris(text: str) -> Iterator[str]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if any(s.endswith("-security") for s in fields.get("suites", "").split()):
            continue
        for uri in fields.get("uris", "").split():
            if "security" not in uri:
                yield uri


def _one_line_uris(text: str) -> Iterator[str]:
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and not words[2].endswith("-security"):
            if "security" not in words[1]:
                yield words[1]


# -- cache and build --------------------------------------------------------------------------


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock, so two checkouts never build (or boot) at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_image(cache: Path) -> Path:
    """Path of the cached image tarball, building it first if this recipe has none yet."""
    target = image_path(cache)
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / ".lock"):
        if target.is_file():  # another process built it while we waited
            return target
        for stale in cache.glob(".build-*"):  # left by an interrupted build; we hold the lock
            _discard_build_dir(stale)
        build_image(target)
        _prune(cache, keep=target)
    return target


def _prune(cache: Path, keep: Path, others: int = 2) -> None:
    """Keep the new image and the `others` most recent older ones (other checkouts' recipes)."""
    old = sorted(
        (p for p in cache.glob("fleet-lab-*.tar.zst") if p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in old[others:]:
        path.unlink(missing_ok=True)
        system.progress(f"removed old image {path}")


def build_image(target: Path) -> float:
    """debootstrap + setup + pack into `target` atomically; returns the seconds it took."""
    system.require_tools(["debootstrap", "chroot", "tar", "zstd"])
    mirror = find_mirror()
    started = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        rootfs = build / "rootfs"
        system.progress(
            f"building the lab image with debootstrap from {mirror} (about a minute, once)"
        )
        _debootstrap(rootfs, mirror, build / "debootstrap.log")
        customize(rootfs)
        archive = build / "image.tar.zst"
        system.progress("packing the image")
        pack(rootfs, archive)
        os.chmod(archive, 0o644)
        os.rename(archive, target)
    finally:
        _discard_build_dir(build)
    took = time.monotonic() - started
    system.progress(
        f"image ready in {took:.0f} s: {target} ({target.stat().st_size / 1e6:.0f} MB)"
    )
    return took


def _discard_build_dir(build: Path) -> None:
    for point in system.mounts_under(build):  # debootstrap mounts /proc, /sys in the target
        system.unmount(point)
    system.remove_tree(build)


def _debootstrap(rootfs: Path, mirror: str, log: Path) -> None:
    argv = [
        "debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
        SUITE, str(rootfs), mirror,
    ]
    with open(log, "w") as out:
        try:
            code = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                   timeout=1800)
        except subprocess.TimeoutExpired as exc:
            raise LabError("debootstrap took more than 30 minutes") from exc
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        inner = rootfs / "debootstrap" / "debootstrap.log"
        if inner.is_file():
            tail += "\n" + "\n".join(inner.read_text(errors="replace").splitlines()[-15:])
        raise LabError(
            f"debootstrap failed (exit status {code}) with mirror {mirror}:\n"
            + system.indent(tail),
            hint="check the mirror is reachable, or set FLEET_LAB_MIRROR to another one",
        )


def customize(rootfs: Path) -> None:
    """Turn a debootstrapped tree into the lab image (runs the recipe's setup steps)."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
    for step in SETUP_STEPS:
        system.run(["chroot", str(rootfs), *step], env=env)
    for standin in STANDINS:
        dest = rootfs / standin.target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(STANDINS_DIR / standin.source, dest)
        uid, gid = _ids(rootfs, standin.owner)
        os.chown(dest, uid, gid)
        os.chmod(dest, 0o755)
    dropin = rootfs / "etc/ssh/sshd_config.d/fleet-lab.conf"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(SSHD_DROPIN)
    with open(rootfs / "etc/redis/redis.conf", "a") as conf:  # last, so that its settings win
        conf.write(REDIS_INCLUDE)
    for pattern in REMOVED_PATHS:
        for path in rootfs.glob(pattern.lstrip("/")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # Empty, not absent: systemd then makes a fresh id per boot, so every host differs.  D-Bus's
    # copy must follow it, or systemd "initializes machine ID from D-Bus" and all hosts share it.
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus").mkdir(parents=True, exist_ok=True)
    (rootfs / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")


def _ids(rootfs: Path, user: str) -> tuple[int, int]:
    for line in (rootfs / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise LabError(f"user {user!r} missing from the image's /etc/passwd")


def pack(rootfs: Path, archive: Path) -> None:
    """tar | zstd, both multi-threaded-friendly and without a shell."""
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "--numeric-owner", "--xattrs", "--xattrs-include=*",
         "-cf", "-", "."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    assert tar.stdout is not None
    zstd = subprocess.run(
        ["zstd", "-q", "-T0", "-6", "-o", str(archive)], stdin=tar.stdout,
        capture_output=True, text=True,
    )
    tar.stdout.close()
    tar_err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
    if tar.wait() != 0 or zstd.returncode != 0:
        raise LabError(f"packing the image failed:\n{system.indent(tar_err + zstd.stderr)}")


def unpack(archive: Path, dest: Path) -> None:
    """zstd -d | tar -x into dest (which must exist)."""
    zstd = subprocess.Popen(
        ["zstd", "-q", "-d", "-c", str(archive)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    assert zstd.stdout is not None
    tar = subprocess.run(
        ["tar", "-C", str(dest), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xf", "-"],
        stdin=zstd.stdout, capture_output=True, text=True,
    )
    zstd.stdout.close()
    zstd_err = zstd.stderr.read().decode(errors="replace") if zstd.stderr else ""
    if zstd.wait() != 0 or tar.returncode != 0:
        raise LabError(
            f"unpacking {archive} failed:\n{system.indent(zstd_err + tar.stderr)}",
            hint=f"the cached image may be damaged: delete {archive} and run `fleet lab up` again",
        )
