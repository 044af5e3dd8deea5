"""Shared fixtures for the unit tests: the shipped example, copied and edited, and small fleets.

`example` is a private copy of the repository's desired_state.toml and hosts/ in tmp_path.
Tests introduce one defect at a time with `example.edit(old, new)`, which fails loudly when
`old` is not in the file, so a change to the shipped example cannot silently turn a defect
test into a test of the unchanged example.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis_server import redis  # noqa: F401  (a throwaway redis-server on loopback, module-scoped)
from sshd_server import sshd  # noqa: F401  (a throwaway OpenSSH server on loopback, module-scoped)
from webhook_server import receiver  # noqa: F401  (a webhook receiver on 127.0.0.1, per test)

from fleet import config, policy
from fleet.model import Finding

REPO = Path(__file__).resolve().parents[2]
DESIRED = "desired_state.toml"

# A two-host inventory for tests that build a fleet from small TOML strings.
SMALL_HOSTS: dict[str, str] = {
    "a.toml": 'address = "a.example.org"\nroles = ["app"]\n',
    "b.toml": 'address = "b.example.org"\nroles = ["cdn"]\n',
}


@dataclass(frozen=True, repr=False)
class ExampleTexts:
    """The shipped example, as text: desired_state.toml and hosts/<file> -> text."""

    desired: str
    hosts: Mapping[str, str]

    def __repr__(self) -> str:  # hypothesis prints fixture arguments with every failing example
        return "ExampleTexts(<the shipped example>)"


@dataclass
class FleetDir:
    """A desired_state.toml plus hosts/ in one directory, with helpers to edit and check it."""

    root: Path

    @property
    def desired_path(self) -> Path:
        return self.root / DESIRED

    @property
    def hosts_dir(self) -> Path:
        return self.root / "hosts"

    @classmethod
    def create(cls, root: Path, desired: str | bytes, hosts: Mapping[str, str | bytes]) -> FleetDir:
        root.mkdir(parents=True, exist_ok=True)
        (root / "hosts").mkdir(exist_ok=True)
        fd = cls(root)
        fd.write(DESIRED, desired)
        for name, text in hosts.items():
            fd.write(f"hosts/{name}", text)
        return fd

    def write(self, relpath: str, content: str | bytes) -> Path:
        path = self.root / relpath
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def text(self, relpath: str = DESIRED) -> str:
        return (self.root / relpath).read_text(encoding="utf-8")

    def edit(self, old: str, new: str, file: str = DESIRED, count: int = 1) -> FleetDir:
        """Replace `old` by `new`; `old` must occur exactly `count` times (0 = any number ≥ 1)."""
        text = self.text(file)
        found = text.count(old)
        assert found and (count == 0 or found == count), (
            f"{file}: expected {old!r} {count or 'at least 1'} time(s), found it {found} time(s); "
            "did the shipped example change?")
        self.write(file, text.replace(old, new))
        return self

    def append(self, text: str, file: str = DESIRED) -> FleetDir:
        self.write(file, self.text(file).rstrip("\n") + "\n\n" + text.lstrip("\n"))
        return self

    def load(self) -> config.Loaded:
        return config.load(self.desired_path, self.hosts_dir)

    def check(self) -> list[Finding]:
        """What `fleet check` reports: loader findings, then the policies' (with lines)."""
        return config.load_checked(self.desired_path, self.hosts_dir, policy.check)[1]


@pytest.fixture(scope="session")
def example_texts() -> ExampleTexts:
    hosts = {p.name: p.read_text(encoding="utf-8") for p in sorted((REPO / "hosts").glob("*.toml"))}
    return ExampleTexts((REPO / DESIRED).read_text(encoding="utf-8"), hosts)


@pytest.fixture
def example(tmp_path: Path) -> FleetDir:
    """A private, editable copy of the shipped example (desired_state.toml and hosts/)."""
    root = tmp_path / "example"
    root.mkdir()
    shutil.copy(REPO / DESIRED, root / DESIRED)
    shutil.copytree(REPO / "hosts", root / "hosts")
    return FleetDir(root)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Callable[..., FleetDir]:
    """make_fleet(desired_text, hosts={file: text}) -> FleetDir; hosts default to SMALL_HOSTS."""
    counter = iter(range(1_000_000))

    def make(desired: str | bytes, hosts: Mapping[str, str | bytes] | None = None) -> FleetDir:
        return FleetDir.create(tmp_path / f"fleet{next(counter)}", desired,
                               SMALL_HOSTS if hosts is None else hosts)

    return make


@pytest.fixture(scope="session")
def fleet_dir() -> type[FleetDir]:
    """The FleetDir class itself, for hypothesis tests that build fleets in their own temp dirs."""
    return FleetDir


def fleet_executable() -> str:
    """The `fleet` console script of the Python running these tests (the checkout's venv), never
    whatever `fleet` comes first on PATH: that may be another checkout's install."""
    exe = Path(sys.executable).with_name("fleet")
    if not exe.is_file():
        pytest.fail(f"no `fleet` console script next to {sys.executable}; run `pip install -e .` in that environment")
    return str(exe)
