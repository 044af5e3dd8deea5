"""up, down, status and ssh for the lab fleet: the operations the CLI wires to commands.

`down` finds everything by the lab's fixed names (cgroup directory, namespace and link
prefixes, mounts under the runtime directory), never only by what a state directory recorded,
because a session may have crashed or CI may run from another checkout.  `up` runs it first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fleet.errors import LabError
from fleet.lab import image, machines, network, settings, sshfiles, system
from fleet.lab.inventory import LabHost, read_inventory
from fleet.lab.settings import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT  # `fleet lab up --timeout`'s default
from fleet.lab.settings import LabPaths
from fleet.secrets import ensure_lab_redis_password
from fleet.textutil import digits

Report = Callable[[str], None]


@dataclass(frozen=True)
class LabRecord:
    """What `up` leaves in <state>/lab/lab.json for status, ssh and the test fixture."""

    hosts: list[dict[str, object]]
    booted: str
    image: str
    runtime: str
    ssh_config: str
    known_hosts: str
    identity: str
    lab_id: str = ""  # also in <runtime>/current: tells whose lab is up on this machine
    up_seconds: float = 0.0
    version: int = 1

    def names(self) -> list[str]:
        return [str(h["name"]) for h in self.hosts]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def read_record(paths: LabPaths) -> LabRecord | None:
    """This state dir's record of the lab, if the lab now up on the machine is the one it
    describes (another checkout's `up` replaces the machine's one lab)."""
    try:
        record = LabRecord(**json.loads(paths.record.read_text()))
        current = paths.current.read_text().strip()
    except (OSError, ValueError, TypeError):
        return None
    return record if record.lab_id and record.lab_id == current else None


# -- up ---------------------------------------------------------------------------------------


def up(
    hosts_dir: Path,
    paths: LabPaths,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    report: Report = system.progress,
) -> LabRecord:
    """Tear down whatever is left, then boot one container per inventory file and return when
    every host answers SSH with a finished boot.  Raises LabError naming the host that did not
    come up, with the tail of its console log; the lab is then left up for inspection."""
    system.require_root()
    system.require_tools(system.UP_TOOLS)
    _check_runtime_path(paths.runtime)
    hosts = read_inventory(hosts_dir)
    with image.file_lock(paths.lock):
        _teardown(paths, report)
        client_key = sshfiles.ensure_client_key(paths.identity)
        redis_password = ensure_lab_redis_password(paths.state)
        archive = image.ensure_image(paths.cache)
        started = time.monotonic()
        try:
            processes = _prepare_and_boot(paths, hosts, archive, client_key, redis_password, report)
        except BaseException:
            report("setting up failed; cleaning up what was made")
            _teardown(paths, lambda _: None)
            raise
        record = LabRecord(
            hosts=[
                {"name": h.name, "address": h.address, "user": h.user, "port": settings.SSH_PORT,
                 "netns": h.netns, "aliases": list(h.aliases),
                 "console_log": str(paths.console_log(h.name))}
                for h in hosts
            ],
            booted=datetime.now(UTC).isoformat(timespec="seconds"),
            image=str(archive),
            runtime=str(paths.runtime),
            ssh_config=str(paths.ssh_config),
            known_hosts=str(paths.known_hosts),
            identity=str(paths.identity),
            lab_id=uuid.uuid4().hex,
        )
        sshfiles.write_private(paths.record, record.to_json())
        paths.current.write_text(f"{record.lab_id}\n")
        report(f"booting {len(hosts)} host(s)")
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
            outcomes = list(pool.map(
                lambda hp: machines.wait_ready(hp[0], hp[1], paths.ssh_config, deadline, started),
                zip(hosts, processes, strict=True),
            ))
        took = time.monotonic() - started
        record = LabRecord(**{**asdict(record), "up_seconds": round(took, 2)})
        sshfiles.write_private(paths.record, record.to_json())
        for outcome in outcomes:
            if outcome.state == "degraded":
                report(f"{outcome.name} is up but degraded; failed units: "
                       f"{', '.join(outcome.failed_units) or '(none listed)'}")
        failed = [o for o in outcomes if not o.up]
        if failed:
            details = "\n".join(
                f"{o.name}: {o.error}\n  console log {paths.console_log(o.name)} ends with:\n"
                + system.indent(machines.console_tail(paths.console_log(o.name)), "    | ")
                for o in failed
            )
            raise LabError(
                f"{len(failed)} of {len(hosts)} lab host(s) did not come up within "
                f"{timeout:g} s:\n{details}",
                hint="inspect with `fleet lab status` / `fleet lab ssh HOST`; "
                "`fleet lab down` cleans up",
            )
        report(f"{len(hosts)} host(s) up in {took:.1f} s; ssh -F {paths.ssh_config} HOST")
        return record


def _check_runtime_path(runtime: Path) -> None:
    # The runtime path ends up inside overlayfs mount options, where ',' ':' and spaces break.
    if any(c in str(runtime) for c in ",: \t\n"):
        raise LabError(f"the lab runtime directory {runtime} contains ',', ':' or whitespace",
                       hint="set FLEET_LAB_RUNTIME to a plain path")


def _prepare_and_boot(
    paths: LabPaths, hosts: list[LabHost], archive: Path, client_key: str, redis_password: str,
    report: Report,
) -> list[subprocess.Popen[bytes]]:
    paths.runtime.mkdir(parents=True, exist_ok=True)
    system.raise_inotify_limit(paths.saved_sysctl)
    if not system.is_mountpoint(settings.NSPAWN_RUN):
        settings.NSPAWN_RUN.mkdir(parents=True, exist_ok=True)
        system.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m",
                    f"{settings.LAB_NAME}-nspawn", settings.NSPAWN_RUN])
        (settings.NSPAWN_RUN / settings.NSPAWN_TMPFS_MARKER).write_text("fleet lab\n")
    for d in (paths.lower, paths.hosts, paths.logs):
        d.mkdir(parents=True, exist_ok=True)
    for old_log in paths.logs.glob("*.console.log"):
        old_log.unlink()
    # The shared lower layer lives in a tmpfs: unpacking is fast and teardown is one umount.
    system.run(["mount", "-t", "tmpfs", "-o", "mode=0755", f"{settings.LAB_NAME}-lower",
                paths.lower])
    t = time.monotonic()
    image.unpack(archive, paths.lower)
    report(f"unpacked {archive.name} in {time.monotonic() - t:.1f} s")
    network.create_bridge()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(network.create_host_network, hosts))

        def prepare(host: LabHost) -> str:
            root = machines.mount_overlay(paths, host)
            return machines.write_host_files(root, host, hosts, client_key, redis_password)

        host_keys = dict(zip([h.name for h in hosts], pool.map(prepare, hosts), strict=True))
    sshfiles.write_private(paths.known_hosts, sshfiles.known_hosts_text(hosts, host_keys))
    sshfiles.write_private(
        paths.ssh_config, sshfiles.ssh_config_text(hosts, paths.identity, paths.known_hosts)
    )
    # Popen with preexec_fn from this (main) thread only, after the pool has finished.
    return [machines.boot(paths, h) for h in hosts]


# -- down -------------------------------------------------------------------------------------


def down(paths: LabPaths, *, report: Report = system.progress) -> list[str]:
    """Remove every trace of the lab; idempotent, and safe after a crash.  Returns what it did."""
    system.require_root()
    system.require_tools(system.DOWN_TOOLS)
    paths.runtime.mkdir(parents=True, exist_ok=True)
    with image.file_lock(paths.lock):
        return _teardown(paths, report)


def _lab_processes(paths: LabPaths) -> set[int]:
    pids: set[int] = set()
    for cgroup in system.lab_cgroups():
        pids |= system.cgroup_pids(cgroup)
    for ns in network.lab_namespaces():
        pids |= network.namespace_pids(ns)
    pids |= _stray_nspawns(paths)
    pids.discard(os.getpid())
    return {p for p in pids if system.alive(p)}


def _stray_nspawns(paths: LabPaths) -> set[int]:
    """nspawn processes booting a tree under our runtime dir, wherever their cgroup is."""
    found = set()
    needle = str(paths.hosts).encode() + b"/"
    for entry in Path("/proc").iterdir():
        if digits(entry.name) and system.comm(int(entry.name)) == "systemd-nspawn":
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _teardown(paths: LabPaths, report: Report) -> list[str]:
    done: list[str] = []

    def note(message: str) -> None:
        done.append(message)
        report(message)

    # 1. Processes: a clean power-off first (SIGTERM to nspawn), then SIGKILL what is left.
    pids = _lab_processes(paths)
    nspawns = {p for p in pids if system.comm(p) == "systemd-nspawn"}
    if nspawns:
        system.signal_all(nspawns, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(system.alive(p) for p in nspawns):
            time.sleep(0.05)
        clean = sum(1 for p in nspawns if not system.alive(p))
        note(f"powered off {clean} of {len(nspawns)} host(s) (SIGTERM to systemd-nspawn)")
    killed: set[int] = set()
    deadline = time.monotonic() + 10
    while True:
        left = _lab_processes(paths)
        if not left:
            break
        if time.monotonic() > deadline:
            raise LabError(f"processes of the lab survive SIGKILL: {sorted(left)}",
                           hint="they may be stuck in the kernel (D state); check `ps -o stat`")
        system.signal_all(left, signal.SIGKILL)
        killed |= left
        time.sleep(0.05)
    if killed:
        note(f"killed {len(killed)} leftover process(es)")

    # 2. Mounts: overlays, then the lower tmpfs (deepest first), then nspawn's tmpfs if ours.
    points = system.mounts_under(paths.runtime)
    for point in points:
        system.unmount(point)
    if points:
        note(f"unmounted {len(points)} file system(s) under {paths.runtime}")
    if (settings.NSPAWN_RUN / settings.NSPAWN_TMPFS_MARKER).exists():
        for point in system.mounts_under(settings.NSPAWN_RUN):
            system.unmount(point)
        note(f"unmounted the tmpfs on {settings.NSPAWN_RUN}")

    # 3. Network: namespaces (their veth ends go with them), then links, then the bridge.
    namespaces = network.lab_namespaces()
    for ns in namespaces:
        network.delete_namespace(ns)
    if namespaces:
        note(f"deleted {len(namespaces)} network namespace(s)")
    links = network.lab_links()
    for link in sorted(links, key=lambda n: n == settings.BRIDGE):  # bridge last
        network.delete_link(link)
    if links:
        note(f"deleted link(s): {', '.join(links)}")
    left_ns, left_links = network.lab_namespaces(), network.lab_links()
    if left_ns or left_links:
        raise LabError(f"could not delete namespaces {left_ns} / links {left_links}")

    # 4. cgroup directories (they empty a moment after their last process exits).
    cgroups = system.lab_cgroups()
    deadline = time.monotonic() + 5
    while cgroups:
        for cgroup in cgroups:
            try:
                system.remove_cgroup_tree(cgroup)
            except OSError:
                pass
        remaining = system.lab_cgroups()
        if not remaining:
            note(f"removed cgroup directories: {', '.join(str(c) for c in cgroups)}")
            break
        if time.monotonic() > deadline:
            raise LabError(f"could not remove cgroup directories: {remaining}")
        time.sleep(0.05)

    # 5. Files: per-host trees and the (now unmounted) lower dir; console logs stay for reading.
    for tree in (paths.hosts, paths.lower):
        if tree.exists():
            system.remove_tree(tree)
            note(f"removed {tree}")

    # 6. The sysctl we raised.
    restored = system.restore_inotify_limit(paths.saved_sysctl)
    if restored is not None:
        note(f"restored fs.inotify.max_user_instances = {restored}")

    # 7. Records of this checkout: the client key stays (reused), the rest is stale now.
    for stale in (paths.current, paths.record, paths.ssh_config, paths.known_hosts):
        if stale.exists():
            stale.unlink()
    if not done:
        report("nothing to clean: the lab was down")
    return done


# -- status and ssh ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HostStatus:
    name: str
    address: str
    user: str
    running: bool  # its container's processes exist
    system_state: str  # `systemctl is-system-running`, or "" when not asked
    reachable: bool  # answered over SSH
    pss_kib: int = 0  # memory of the host's processes, nspawn included
    error: str = ""

    @property
    def up(self) -> bool:
        return self.running and self.reachable and self.system_state in machines.UP_STATES


@dataclass(frozen=True)
class LabStatus:
    hosts: list[HostStatus] = field(default_factory=list)
    booted: str = ""
    ssh_config: str = ""
    recorded: bool = False  # lab.json exists in this state dir

    @property
    def all_up(self) -> bool:
        return self.recorded and bool(self.hosts) and all(h.up for h in self.hosts)

    def to_dict(self) -> dict[str, object]:
        return {
            "up": self.all_up,
            "booted": self.booted or None,
            "ssh_config": self.ssh_config or None,
            "hosts": [{**asdict(h), "up": h.up} for h in self.hosts],
        }


def status(paths: LabPaths, hosts_dir: Path | None = None) -> LabStatus:
    """Per host: container running?  systemd's state and SSH reachability (asked in parallel)."""
    record = read_record(paths)
    if record is None:
        hosts: list[tuple[str, str, str]] = []
        if hosts_dir is not None:
            try:
                hosts = [(h.name, h.address, h.user) for h in read_inventory(hosts_dir)]
            except LabError:
                hosts = []
        return LabStatus(
            hosts=[HostStatus(n, a, u, _running(n)[0], "", False) for n, a, u in hosts]
        )

    def probe(entry: dict[str, object]) -> HostStatus:
        name, address, user = str(entry["name"]), str(entry["address"]), str(entry["user"])
        running, pids = _running(name)
        if not running:
            return HostStatus(name, address, user, False, "", False)
        try:
            done = subprocess.run(
                machines.ssh_argv(Path(record.ssh_config), name, "systemctl",
                                  "is-system-running"),
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15,
            )
        except subprocess.TimeoutExpired:
            return HostStatus(name, address, user, True, "", False, system.pss_kib(pids),
                              "ssh timed out")
        reachable = done.returncode != 255
        return HostStatus(name, address, user, True, done.stdout.strip() if reachable else "",
                          reachable, system.pss_kib(pids),
                          "" if reachable else done.stderr.strip())

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(record.hosts)))) as pool:
        results = list(pool.map(probe, record.hosts))
    return LabStatus(hosts=results, booted=record.booted, ssh_config=record.ssh_config,
                     recorded=True)


def _running(name: str) -> tuple[bool, set[int]]:
    pids: set[int] = set()
    for cgroup in system.host_cgroups(name):
        if cgroup.is_dir():
            pids |= system.cgroup_pids(cgroup)
    return bool(pids), pids


def ssh_command(paths: LabPaths, host: str, command: list[str]) -> list[str]:
    """The OpenSSH argv for `fleet lab ssh HOST [COMMAND...]`."""
    record = read_record(paths)
    if record is None or not paths.ssh_config.is_file():
        raise LabError(f"the lab is not up for the state directory {paths.state.parent}",
                       hint="run `fleet lab up` first (with the same --state-dir)")
    if host not in record.names():
        raise LabError(f"{host!r} is not a lab host; lab hosts: {', '.join(record.names())}")
    system.require_tools(["ssh"])
    return machines.ssh_argv(paths.ssh_config, host, *command)

