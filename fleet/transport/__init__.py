"""Talking to hosts, behind one interface.

* `protocol` — the `Transport` protocol every transport satisfies, `RunResult`, the shared
  `run_many`, the limits and the shell helpers (`quote`, `sudo_command`, `sudo_refusal`);
* `known_hosts` — known_hosts files and the verdict on an offered host key;
* `config` — OpenSSH client config: where and how a host is reached (`SSHTarget`);
* `ssh` — `SSHTransport`, the only module in fleet that imports paramiko;
* `fake` — `FakeTransport`, a scripted host for unit tests.

Importing this package (or `protocol`, `known_hosts`, `config`, `fake`) never loads paramiko:
only code that really opens a connection imports `fleet.transport.ssh`.
"""

from fleet.transport.protocol import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_SESSIONS,
    MIB,
    CommandFor,
    OnDone,
    Outcome,
    RunResult,
    Transport,
    quote,
    run_many,
    sudo_command,
    sudo_refusal,
)

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_MAX_SESSIONS",
    "MIB",
    "CommandFor",
    "OnDone",
    "Outcome",
    "RunResult",
    "Transport",
    "quote",
    "run_many",
    "sudo_command",
    "sudo_refusal",
]
