"""What every transport is: the `Transport` protocol, `RunResult`, and what any transport shares.

The rest of fleet talks to hosts only through this interface — `run` one command on one host,
`run_many` one command per host in parallel with every outcome a value — and is handed a
transport rather than building one (`fleet.transport.ssh.SSHTransport` for real hosts,
`fleet.transport.fake.FakeTransport` in unit tests).  This module owns:

* `RunResult` (what one command did), the `Transport` protocol and the limits the rest of fleet
  sizes itself by;
* `run_many`, the transport-agnostic parallel run (a thread pool over hosts, every outcome a
  value) that a transport's own `run_many` delegates to;
* the shell helpers every command line is built with: `quote` (EVERY value that reaches a
  remote shell goes through it), `sudo_command` and `sudo_refusal`.

Nothing here may import paramiko: importing the renderer, the planner or this module must not
load it.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Protocol, Self, TypeAlias, TypeVar

from fleet.errors import TransportError
from fleet.model import Host

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_MAX_OUTPUT = 64 * MIB
DEFAULT_MAX_SESSIONS = 8  # channels at once on one connection; sshd's MaxSessions defaults to 10
DEFAULT_MAX_FORKS = 32  # hosts run_many runs at once when not told

# What `sudo -n` prints when it cannot run the command without asking for something.
_SUDO_REFUSALS = (
    "a password is required",
    "a terminal is required",
    "you must have a tty",
    "is not in the sudoers file",
    "is not allowed to run sudo",
    "may not run sudo",
    "is not allowed to execute",
)


# --------------------------------------------------------------------------- shell helpers


def quote(value: str) -> str:
    """Quote `value` as ONE word for a POSIX shell (shlex.quote).

    Every value that reaches a remote shell — unit names, paths, file contents, environment
    values, anything that came from a file or a host — must go through this function; commands
    are strings run by the remote user's shell, so an unquoted value is a command injection.
    """
    return shlex.quote(value)


def sudo_command(command: str) -> str:
    """`command` wrapped to run as root through non-interactive sudo.

    `-n` makes sudo fail instead of prompting for a password (there is no terminal to answer
    it); `sh -c` runs the whole command line, pipes and redirections included, as root.
    Standard input passes through sudo to the command.
    """
    return f"sudo -n -- sh -c {quote(command)}"


def sudo_refusal(exit_code: int, stderr: bytes) -> str | None:
    """What sudo said when it refused to run the command, or None if it did not refuse.

    sudo's refusal ("sudo: a password is required") is the last thing on stderr, since the
    command never started; earlier lines may come from sshd or the login shell ("Could not
    chdir to home directory ...").  Only failed commands are looked at.
    """
    if exit_code == 0:
        return None
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if exit_code == 127 and "sudo" in last and "not found" in last:
        return last
    if last.startswith("sudo:") and any(phrase in last for phrase in _SUDO_REFUSALS):
        return last
    return None


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RunResult:
    """What one command did on one host.

    `command` is the command as the caller gave it (before any sudo wrapping); `exit_code` is
    -1 when the remote side sent no exit status (the command was killed by a signal);
    `duration` is the wall time of the command's channel, connection setup excluded.
    """

    host: str
    command: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def exit_text(self) -> str:
        """How the command ended, for a message: `exit 3`, or what a missing exit status means."""
        if self.exit_code == -1:
            return ("no exit status: the command was killed by a signal or its SSH session ended "
                    f"(is {self.host} shutting down, or was its sshd killed?)")
        return f"exit {self.exit_code}"


Outcome: TypeAlias = RunResult | TransportError  # what one host's command came to, as a value
CommandFor: TypeAlias = Callable[[Host], str] | str  # one command for every host, or one per host
OnDone: TypeAlias = Callable[[str, Outcome], None]  # told each host's outcome as it finishes


# --------------------------------------------------------------------------- the interface


class Transport(Protocol):
    """Runs shell commands on hosts.  What the collector and the executor are given.

    `run` returns a RunResult for any exit code (non-zero is not an error) and raises
    TransportError, and only that, when the command could not be run to its end (kinds:
    unreachable, auth, hostkey, timeout, protocol, sudo, output-too-large).  `run_many` never
    raises for a host.  Thread-safe; a context manager whose exit closes it.
    """

    def run(self, host: Host, command: str, *, sudo: bool | None = None, stdin: bytes | None = None,
            timeout: float | None = None) -> RunResult:
        """Run `command` (a shell command line) on `host`: as root through `sudo_command` when
        `sudo` (default: `host.sudo`), `stdin` sent then end-of-file, bounded by `timeout`
        seconds (default: the transport's)."""
        ...

    def run_many(self, hosts: Sequence[Host], command_for: CommandFor, *, forks: int | None = None,
                 sudo: bool | None = None, timeout: float | None = None,
                 on_done: OnDone | None = None) -> dict[str, Outcome]:
        """Run a command on every host in parallel; every host gets a value (see `run_many`)."""
        ...

    def close(self) -> None:
        """Release what the transport holds (connections); a later `run` may open them again."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


def run_many(
    transport: Transport,
    hosts: Sequence[Host],
    command_for: CommandFor,
    *,
    forks: int | None = None,
    sudo: bool | None = None,
    timeout: float | None = None,
    on_done: OnDone | None = None,
    thread_name_prefix: str = "fleet-run",
) -> dict[str, Outcome]:
    """Run a command on every host through `transport.run`, in parallel; every host gets a value.

    `command_for` is one command for all hosts or a function of the host.  At most `forks`
    hosts (default: min(len(hosts), 32)) run at once.  Each outcome is a RunResult or a
    TransportError; an unexpected exception (a bug, a failing `command_for`) becomes
    TransportError(kind="protocol").  `on_done(host_name, outcome)` is called in the calling
    thread as hosts finish, so progress output needs no locking.  The dict is in `hosts`
    order; a host name listed twice runs once.
    """
    unique = list({h.name: h for h in reversed(hosts)}.values())[::-1]
    outcomes: dict[str, Outcome] = {}
    if not unique:
        return outcomes
    workers = max(1, forks if forks is not None else min(len(unique), DEFAULT_MAX_FORKS))

    def one(host: Host) -> Outcome:
        try:
            command = command_for(host) if callable(command_for) else command_for
            return transport.run(host, command, sudo=sudo, timeout=timeout)
        except TransportError as exc:
            return exc
        except Exception as exc:  # one host's bug must not hide the others
            log.debug("unexpected error on %s", host.name, exc_info=True)
            return TransportError(host.name, "protocol", f"{host.name}: {type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix) as pool:
        futures: dict[Future[Outcome], str] = {pool.submit(one, host): host.name for host in unique}
        try:
            for future in as_completed(futures):
                name = futures[future]
                outcomes[name] = future.result()
                if on_done is not None:
                    on_done(name, outcomes[name])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return {h.name: outcomes[h.name] for h in unique}


_T = TypeVar("_T")
_R = TypeVar("_R")


def in_parallel(fn: Callable[[_T], _R], items: Sequence[_T], workers: int) -> list[_R]:
    """[fn(item) for item in items], up to `workers` at once (in order; the first exception is
    raised).  Hosts in parallel make one round trip of wall time, not one per host."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        return list(pool.map(fn, items))
