"""A scripted host for unit tests: `FakeTransport`, a `Transport` that reaches no host.

It records every call — host, command, stdin, effective sudo, timeout, the calling thread and
an optional tag of the caller's choosing — and answers by rules, so that the collector, the
executor or the CLI can be tested against exactly the outcomes a test needs:

1. `hook(call)`, if set, runs first: it may wait (to force an interleaving), raise (a
   TransportError, or anything else to simulate a crash) or answer with a RunResult;
2. a host made to fail (`fail`) raises its TransportError;
3. the most recently added matching rule answers: a canned reply (`respond`), or the command
   run for real (`execute`) by `sh` in a directory of that host, so that shell semantics such
   as `mkdir` locks are the shell's, not the fake's;
4. anything else answers `@@ok` with exit 0 (what fleet's remote commands print on success).

A rule's pattern is a prefix (`str`) or a regular expression searched anywhere in the command
(`re.Pattern`), optionally for one host.  `run_many` is the shared one of
`fleet.transport.protocol`, threads and all, so code under test sees the real concurrency.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from fleet.errors import TransportError
from fleet.model import Host
from fleet.transport.protocol import CommandFor, OnDone, Outcome, RunResult, run_many

DEFAULT_REPLY = b"@@ok\n"
SHELL_TIMEOUT = 10.0  # seconds a command run for real may take when the caller gives no timeout

Pattern: TypeAlias = str | re.Pattern[str]  # a prefix, or a regular expression searched in the command


def _bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else text


@dataclass(frozen=True)
class Call:
    """One `run` as the fake saw it.  `seq` numbers calls in the order they arrived; `sudo` is
    what the command would have run as (the host's default applied); `thread` is the calling
    thread's name; `tag` is what the transport's `tag` callable returned in that thread."""

    seq: int
    host: str
    command: str
    stdin: bytes | None
    sudo: bool
    timeout: float | None
    thread: str
    tag: str | None = None

    def reply(self, stdout: str | bytes = b"", stderr: str | bytes = b"", exit_code: int = 0) -> RunResult:
        """A RunResult answering this call (for hooks); exit_code -1 is "no exit status"."""
        return RunResult(self.host, self.command, exit_code, _bytes(stdout), _bytes(stderr), 0.0)


Hook = Callable[[Call], RunResult | None]


@dataclass(frozen=True)
class _Rule:
    pattern: Pattern
    host: str | None
    reply: tuple[bytes, bytes, int] | None  # None: run the command for real

    def matches(self, call: Call) -> bool:
        if self.host is not None and self.host != call.host:
            return False
        if isinstance(self.pattern, str):
            return call.command.startswith(self.pattern)
        return self.pattern.search(call.command) is not None


class FakeTransport:
    """A Transport whose hosts are scripted; see the module docstring.  Thread-safe.

    root: the directory under which each host gets `root/<host>` for commands run for real
        (`execute`, `sh`); None when no command is to run for real.
    rewrite: for commands run for real, each key found in the command is replaced by the path
        of the value inside the host's directory, e.g. {"/var/lib/fleet": "state"} makes
        `/var/lib/fleet/lock` mean `root/<host>/state/lock`.
    tag: called in the calling thread for every call; its value is kept as `Call.tag` (e.g.
        which apply step the thread runs, to check that a command was sent by that step).
    delay: seconds each call waits after the hook and before it is answered (lets threads
        interleave; never a timing assertion).
    """

    def __init__(
        self,
        *,
        root: Path | None = None,
        rewrite: Mapping[str, str] | None = None,
        tag: Callable[[], str | None] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.root = root
        self.rewrite = dict(rewrite or {})
        self.tag = tag
        self.delay = delay
        self.hook: Hook = lambda call: None
        self.calls: list[Call] = []
        self.closed = 0  # how many times close() was called (a context manager closes once)
        self._rules: list[_Rule] = []
        self._failing: dict[str, TransportError] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ scripting

    def respond(self, pattern: Pattern, stdout: str | bytes = b"", *, stderr: str | bytes = b"",
                exit_code: int = 0, host: str | None = None) -> None:
        """Commands matching `pattern` (on `host`, or any) answer this; a later rule wins."""
        with self._lock:
            self._rules.append(_Rule(pattern, host, (_bytes(stdout), _bytes(stderr), exit_code)))

    def execute(self, pattern: Pattern, *, host: str | None = None) -> None:
        """Commands matching `pattern` (on `host`, or any) run for real with `sh -c` in the host's
        directory (see `root` and `rewrite`), stdin passed through; a later rule wins.  They run
        on this machine as the test's user: an absolute path not rewritten is this machine's."""
        if self.root is None:
            raise ValueError("FakeTransport(root=...) is needed to run commands for real")
        with self._lock:
            self._rules.append(_Rule(pattern, host, None))

    def fail(self, host: str, error: TransportError | None = None) -> None:
        """Every later call to `host` raises `error` (default: unreachable, connection refused)."""
        with self._lock:
            self._failing[host] = error or TransportError(
                host, "unreachable", f"cannot reach {host}: connection refused",
                hint="is sshd running and listening? (a FakeTransport host made to fail)")

    def recover(self, host: str) -> None:
        """`host` answers again after `fail`."""
        with self._lock:
            self._failing.pop(host, None)

    def host_dir(self, host: str) -> Path:
        """The directory standing in for `host`'s filesystem when commands run for real."""
        if self.root is None:
            raise ValueError("FakeTransport(root=...) is needed to run commands for real")
        return self.root / host

    def sh(self, host: str, command: str, stdin: bytes | None = None, timeout: float | None = None) -> RunResult:
        """Run `command` for real in `host`'s directory now, unrecorded (to set a host up)."""
        directory = self.host_dir(host)
        directory.mkdir(parents=True, exist_ok=True)
        for needle, inside in self.rewrite.items():
            command = command.replace(needle, str(directory / inside))
        started = time.monotonic()
        limit = SHELL_TIMEOUT if timeout is None else timeout
        try:
            done = subprocess.run(["sh", "-c", command], cwd=directory, input=stdin or b"", capture_output=True,
                                  check=False, timeout=limit)
        except subprocess.TimeoutExpired as exc:
            raise TransportError(host, "timeout", f"`{command[:80]}` on {host} did not finish within {limit:g}s",
                                 hint="a command run for real by FakeTransport hung") from exc
        return RunResult(host, command, done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    # ------------------------------------------------------------------ what was sent

    def on(self, host: str) -> list[Call]:
        """The calls sent to `host`, in order."""
        with self._lock:
            return [c for c in self.calls if c.host == host]

    def commands(self, host: str | None = None) -> list[str]:
        """The commands sent (to `host`, or to any host), in order."""
        with self._lock:
            return [c.command for c in self.calls if host is None or c.host == host]

    # ------------------------------------------------------------------ the Transport protocol

    def run(self, host: Host, command: str, *, sudo: bool | None = None, stdin: bytes | None = None,
            timeout: float | None = None) -> RunResult:
        tag = self.tag() if self.tag is not None else None
        with self._lock:
            call = Call(len(self.calls), host.name, command, stdin, host.sudo if sudo is None else sudo, timeout,
                        threading.current_thread().name, tag)
            self.calls.append(call)
        answer = self.hook(call)
        if answer is not None:
            return answer
        with self._lock:
            failure = self._failing.get(host.name)
            rule = next((r for r in reversed(self._rules) if r.matches(call)), None)
        if failure is not None:  # a fresh exception per call: calls from several threads may raise it at once
            raise TransportError(failure.host, failure.kind, failure.message, hint=failure.hint)
        if self.delay:
            time.sleep(self.delay)
        if rule is None:
            return call.reply(DEFAULT_REPLY)
        if rule.reply is None:
            result = self.sh(host.name, command, stdin, timeout)
            return RunResult(host.name, command, result.exit_code, result.stdout, result.stderr, result.duration)
        return call.reply(*rule.reply)

    def run_many(self, hosts: Sequence[Host], command_for: CommandFor, *, forks: int | None = None,
                 sudo: bool | None = None, timeout: float | None = None,
                 on_done: OnDone | None = None) -> dict[str, Outcome]:
        return run_many(self, hosts, command_for, forks=forks, sudo=sudo, timeout=timeout, on_done=on_done,
                        thread_name_prefix="fleet-fake")

    def close(self) -> None:
        with self._lock:
            self.closed += 1

    def __enter__(self) -> FakeTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
