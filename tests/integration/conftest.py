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
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# The one place that says how the lab is driven.  FLEET_LAB_COMMAND (e.g. "fleet lab") overrides;
# the default works before the main `fleet` console script exists.
LAB_COMMAND: list[str] = shlex.split(os.environ.get("FLEET_LAB_COMMAND", "")) or [
    sys.executable, "-m", "fleet.lab",
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


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """The lab fleet, up for the whole session; torn down at the end whatever happened."""
    reason = lab_unavailable_reason()
    if reason:
        cannot_have_lab(reason)
    the_lab = Lab(repo=REPO, state_dir=tmp_path_factory.mktemp("lab") / ".fleet")
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
