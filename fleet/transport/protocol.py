"""What every transport is: the `Transport` protocol, `RunResult`, and what any transport shares.

The rest of fleet talks to hosts only through this interface — `run` one command on one host,
`run_many` one command per host in parallel with every outcome a value — and never imports an
implementation module directly (`fleet.transport.ssh` for real hosts, `fleet.transport.fake` in
unit tests).  This module owns:

* `RunResult` (what one command did) and the limits the rest of fleet sizes itself by;
* the shell helpers every command line is built with: `quote` (EVERY value that reaches a
  remote shell goes through it), `sudo_command` and `sudo_refusal`.

Nothing here may import paramiko: importing the renderer, the planner or this module must not
load it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

MIB = 1024 * 1024
DEFAULT_MAX_OUTPUT = 64 * MIB
DEFAULT_MAX_SESSIONS = 8  # channels at once on one connection; sshd's MaxSessions defaults to 10

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


