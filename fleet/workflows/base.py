"""What every workflow is given: where fleet's files are and how hosts are reached (`Common`),
which hosts to talk to (`Scope`), and the `Reporter` it speaks to a person through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fleet import config

if TYPE_CHECKING:
    from fleet.model import Finding
    from fleet.plan import Plan


@dataclass(frozen=True)
class Common:
    """The global options, with their defaults resolved once (`--dir` and what follows from it)."""

    desired: Path  # desired_state.toml
    hosts: Path  # the inventory directory
    state_dir: Path  # fleet's own state: lab keys, the journal
    lab: bool = False  # talk to the lab's twins of the hosts (fleet.targets)
    accept_new_host_keys: bool = False
    connect_timeout: float | None = None  # None: the ssh config's ConnectTimeout, else 10 s

    @classmethod
    def at(cls, directory: str | Path, *, desired: str | Path | None = None, hosts: str | Path | None = None,
           state_dir: str | Path | None = None, lab: bool = False, accept_new_host_keys: bool = False,
           connect_timeout: float | None = None) -> Common:
        """The options for a fleet directory: DIR/desired_state.toml, DIR/hosts, DIR/.fleet unless named."""
        desired_file, inventory = config.default_paths(str(directory), str(desired) if desired else None,
                                                       str(hosts) if hosts else None)
        return cls(desired=desired_file, hosts=inventory,
                   state_dir=Path(state_dir) if state_dir else Path(directory) / ".fleet",
                   lab=lab, accept_new_host_keys=accept_new_host_keys, connect_timeout=connect_timeout)


@dataclass(frozen=True)
class Scope:
    """Which hosts a command talks to, and how many at once."""

    limit: str | None = None  # names or globs, comma-separated; None: every host
    forks: int | None = None  # hosts contacted in parallel; None: all, up to 32
    timeout: float = 60.0  # seconds the remote collection may run per host


class Reporter(Protocol):
    """How a workflow speaks to the person running it, while it runs.  Its result is returned,
    never printed: these are only what cannot wait for the end."""

    def note(self, line: str) -> None:
        """A line to show now, whoever is watching: a warning, a step of an apply."""
        ...

    def progress(self, line: str) -> None:
        """A line of progress, worth showing only to a person watching (a terminal)."""
        ...

    def findings(self, findings: Sequence[Finding]) -> None:
        """Findings that warn about, or stop, what the workflow was asked to do."""
        ...

    def review(self, plan: Plan) -> None:
        """Show the plan an apply computed, before it is confirmed and carried out."""
        ...

    def confirm(self, question: str) -> bool | None:
        """Ask a yes/no question; None when there is nobody to ask (no terminal)."""
        ...
