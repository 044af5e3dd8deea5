"""Integration tests run against the lab fleet: real hosts (systemd-nspawn + OpenSSH) on this
machine, brought up once per session by the real command and always torn down at the end.

Everything under tests/integration/ gets the `lab` marker (select with `-m lab`, exclude with
`-m "not lab"`).  If the lab cannot start here (not root, tools missing, `up` fails), the tests
are skipped with the reason — unless CI=true or FLEET_REQUIRE_LAB=1, where tests/conftest.py makes
that skip a failure.

Use it through the session fixture `lab` (a `Lab`):
    lab.hosts["fritz"].address          lab.names              lab.state_dir / lab.ssh_config
    lab.ssh("fritz", "systemctl is-system-running")            # as the inventory user
    lab.ssh("fritz", ["systemctl", "start", "x"], user="root")  # a list is quoted for you
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# The one place that says how the lab is driven: by default the documented `fleet lab`, through
# the `fleet` console script of the Python running the tests (helpers.fleet_argv says why not the
# first one on PATH).  FLEET_LAB_COMMAND overrides it (e.g. "python3 -m fleet.lab");
# `python -m fleet.lab` itself is covered by test_docs.py.
LAB_COMMAND: list[str] = shlex.split(os.environ.get("FLEET_LAB_COMMAND", "")) or [
    str(Path(sys.executable).with_name("fleet")), "lab",
]
UP_TIMEOUT = 900  # seconds; the first up on a machine builds the image (about a minute)

REQUIRED_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ssh": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "ip": "iproute2",
    "zstd": "zstd",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab: needs the lab fleet (root, systemd-nspawn); brought up once per session"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.lab)
    # test_lab.py proves facts about freshly booted hosts (nothing enabled, no failure injected):
    # it runs before the modules that converge, drift and break the shared session lab.
    items.sort(key=lambda item: Path(str(item.path)).name != "test_lab.py")


def lab_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in REQUIRED_TOOLS.items()
               if shutil.which(tool) is None]
    if missing:
        return f"missing on this machine: {', '.join(missing)}"
    return None


def cannot_have_lab(reason: str) -> None:
    # In CI (or with FLEET_REQUIRE_LAB=1) the root conftest's switch turns this skip into a failure.
    pytest.skip(f"lab fleet unavailable: {reason}")


@dataclass(frozen=True)
class LabHostInfo:
    name: str
    address: str
    user: str  # the inventory user; ssh_config logs in as this user


@dataclass
class Lab:
    """The running lab, as the tests see it (paths are absolute)."""

    repo: Path
    state_dir: Path  # the --state-dir given to the lab (its files are in state_dir / "lab")
    hosts: dict[str, LabHostInfo] = field(default_factory=dict)

    @property
    def lab_dir(self) -> Path:
        return self.state_dir / "lab"

    @property
    def ssh_config(self) -> Path:
        return self.lab_dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.lab_dir / "known_hosts"

    @property
    def identity(self) -> Path:
        return self.lab_dir / "id_ed25519"

    @property
    def record(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.lab_dir / "lab.json").read_text())
        return data

    @property
    def names(self) -> list[str]:
        return sorted(self.hosts)

    @property
    def addresses(self) -> dict[str, str]:
        return {name: h.address for name, h in self.hosts.items()}

    def command(self, *args: str, timeout: float = UP_TIMEOUT,
                check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the lab command (`up`, `down`, `status --json`, ...) for this lab."""
        argv = [*LAB_COMMAND, *args[:1], "--dir", str(self.repo), "--state-dir",
                str(self.state_dir), *args[1:]]
        return subprocess.run(argv, cwd=self.repo, capture_output=True, text=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    def up(self) -> subprocess.CompletedProcess[str]:
        done = self.command("up")
        if done.returncode == 0:
            self.hosts = {
                str(h["name"]): LabHostInfo(str(h["name"]), str(h["address"]), str(h["user"]))
                for h in self.record["hosts"]  # type: ignore[attr-defined]
            }
        return done

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.command("down", timeout=120)

    def ssh(
        self,
        host: str,
        command: str | Sequence[str],
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on a lab host over the real OpenSSH client (`ssh -F ssh_config`).
        A string goes to the remote shell as is; a list is shell-quoted first."""
        remote = command if isinstance(command, str) else shlex.join(command)
        argv = ["ssh", "-F", str(self.ssh_config)]
        if user:
            argv += ["-l", user]
        argv += [host, remote]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(
                f"ssh {host} {remote!r} exited {done.returncode}\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done


LAB_LOCK = Path(os.environ.get("FLEET_LAB_LOCK", "/tmp/fleet-lab-session.lock"))


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent pid
    return pids


def _lock_holders(path: Path) -> set[int]:
    """PIDs holding a flock on `path`, from /proc/locks (`N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...`)."""
    inode = path.stat().st_ino
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(inode):
            holders.add(int(f[4]))
    return holders


@contextmanager
def machine_lab_lock() -> Iterator[None]:
    """There is one lab per machine (fixed names; `up` tears down whatever lab runs): the session
    holds the machine-wide lab lock while its lab exists, waiting for any other holder.  Inside
    `flock -x LAB_LOCK pytest …` (the documented way, which other tools use too) the lock is
    already ours, through an ancestor: then it is not taken twice, which would wait forever."""
    import fcntl

    LAB_LOCK.touch(exist_ok=True)
    with open(LAB_LOCK, "rb") as f:
        if _lock_holders(LAB_LOCK) & _ancestors():
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The lab fleet, up for the whole session; torn down at the end whatever happened."""
    reason = lab_unavailable_reason()
    if reason:
        cannot_have_lab(reason)
    the_lab = Lab(repo=REPO, state_dir=tmp_path_factory.mktemp("lab") / ".fleet")
    with machine_lab_lock():
        yield from _lab_session(the_lab)


def _lab_session(the_lab: Lab) -> Iterator[Lab]:
    try:
        done = the_lab.up()
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-30:])
            cannot_have_lab(f"`{shlex.join(LAB_COMMAND)} up` exited {done.returncode}:\n{tail}")
        yield the_lab
    finally:
        down = the_lab.down()
        if down.returncode != 0:
            sys.stderr.write(f"lab teardown failed:\n{down.stdout}\n{down.stderr}\n")


# ------------------------------------------------------------------ artifacts of a failed lab test
# A lab failure that cannot be reproduced at will must be diagnosable afterwards (issue 12): every
# `fleet` process a test runs appends its debug log (FLEET_DEBUG_LOG) to the test's own file, sshd
# on the lab hosts logs at DEBUG1 (FLEET_LAB_SSHD_LOG_LEVEL, set before the session's `lab up`),
# and when a test fails both are kept under ARTIFACTS/<test>/ with each host's ssh.service journal
# for the test's time span; the failure report names the directory and shows the last error lines.

ARTIFACTS = Path(os.environ.get("FLEET_TEST_ARTIFACTS", REPO / "test-artifacts"))
os.environ.setdefault("FLEET_LAB_SSHD_LOG_LEVEL", "DEBUG1")


def _artifact_dir(item: pytest.Item) -> Path:
    return ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]


@pytest.fixture(autouse=True)
def fleet_debug_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Every fleet process of this test appends its debug log here (helpers.fleet inherits it)."""
    path = tmp_path / "fleet-debug.log"
    before = os.environ.get("FLEET_DEBUG_LOG")
    os.environ["FLEET_DEBUG_LOG"] = str(path)
    request.node.stash[_STARTED] = time.time()
    request.node.stash[_DEBUG_LOG] = path
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("FLEET_DEBUG_LOG", None)
        else:
            os.environ["FLEET_DEBUG_LOG"] = before


_STARTED = pytest.StashKey[float]()
_DEBUG_LOG = pytest.StashKey[Path]()


def _lab_hosts() -> list[str]:
    found = subprocess.run(["pgrep", "-a", "-f", "systemd-nspawn"], capture_output=True, text=True, timeout=10)
    return sorted(set(re.findall(r" -M (\S+) ", found.stdout)))


def keep_artifacts(item: pytest.Item) -> str:
    """Copy the test's fleet debug log and every running lab host's sshd journal since the test
    started into the artifact directory; returns a short summary for the failure report."""
    from helpers import inside

    out = _artifact_dir(item)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = item.stash.get(_STARTED, time.time() - 600)
    lines = [f"kept in {out}"]
    log = item.stash.get(_DEBUG_LOG, None)
    if log is not None and log.exists():
        shutil.copyfile(log, out / "fleet-debug.log")
        bad = [ln for ln in log.read_text(errors="replace").splitlines()
               if re.search(r"(?i)error|lost|closed|eof|fail|refused|timeout", ln)]
        lines += ["fleet debug log, last lines about errors:", *("  " + ln[:300] for ln in bad[-15:])]
    for host in _lab_hosts():
        done = inside(host, "journalctl", "--no-pager", "-o", "short-iso-precise", "--since", f"@{int(started) - 1}",
                      "-u", "ssh.service", "-u", "ssh.socket")
        if done is None:
            continue
        (out / f"{host}-sshd.log").write_text(done.stdout + done.stderr)
        everything = inside(host, "journalctl", "--no-pager", "-o", "short-iso-precise", "--since",
                            f"@{int(started) - 1}")
        if everything is not None:
            (out / f"{host}-journal.log").write_text(everything.stdout + everything.stderr)
        bad = [ln for ln in done.stdout.splitlines()
               if re.search(r"(?i)error|fatal|disconnect|closed|refus|denied|timeout|exceed", ln)]
        if bad:
            lines += [f"{host} sshd, last lines about errors:", *("  " + ln[:300] for ln in bad[-10:])]
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call") and HERE in Path(str(item.path)).resolve().parents:
        try:
            report.sections.append(("lab artifacts", keep_artifacts(item)))
        except Exception as exc:  # keeping artifacts must never hide the failure itself
            report.sections.append(("lab artifacts", f"could not keep them: {type(exc).__name__}: {exc}"))
