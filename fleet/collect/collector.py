"""Observing the fleet: one script per host, run in parallel, every host a value.

The I/O edge of the read path.  It asks the transport to run each host's script once and
turns whatever comes back — output, a transport failure, unparseable text — into a
`HostState` or a `HostError`.  Nothing here raises for one host's failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from fleet.collect.parse import parse_host
from fleet.collect.script import build_script, spec_for
from fleet.errors import ParseError, TransportError
from fleet.model import Desired, Host, HostError, HostResult
from fleet.transport.protocol import RunResult, Transport

DEFAULT_MAX_FORKS = 32


def collect(
    desired: Desired,
    transport: Transport,
    hosts: Sequence[Host] | None = None,
    *,
    forks: int | None = None,
    timeout: float | None = None,
    progress: Callable[[str, HostResult], None] | None = None,
) -> dict[str, HostResult]:
    """Observe `hosts` (default: every host in the inventory); returns host name → result."""
    targets = list(desired.hosts if hosts is None else hosts)
    scripts = {h.name: build_script(spec_for(desired, h.name)) for h in targets}
    results: dict[str, HostResult] = {}

    def done(name: str, outcome: RunResult | TransportError) -> None:
        results[name] = to_result(name, outcome)
        if progress is not None:
            progress(name, results[name])

    raw = transport.run_many(
        targets, lambda h: scripts[h.name], forks=forks or min(len(targets), DEFAULT_MAX_FORKS) or 1,
        timeout=timeout, on_done=done,
    )
    for name, outcome in raw.items():  # in case on_done was not called for some host
        if name not in results:
            results[name] = to_result(name, outcome)
    return {h.name: results[h.name] for h in targets if h.name in results}


def to_result(host: str, outcome: RunResult | TransportError) -> HostResult:
    now = time.time()
    if isinstance(outcome, TransportError):
        return HostError(host=host, kind=outcome.kind, message=outcome.message, hint=outcome.hint, collected_at=now)
    text = outcome.stdout.decode("utf-8", errors="replace")
    if outcome.exit_code != 0 and not text.startswith("@@fleet "):
        err = outcome.stderr.decode("utf-8", errors="replace").strip().splitlines()
        tail = err[-1] if err else "(no error output)"
        kind = "sudo" if "password is required" in tail or "sudo:" in tail else "remote"
        return HostError(host=host, kind=kind,
                         message=f"the collection script failed on {host} ({outcome.exit_text}): {tail}",
                         hint="check that the SSH user can run systemctl"
                              + (" (and sudo -n without a password)" if kind == "sudo" else ""),
                         collected_at=now)
    try:
        return parse_host(host, text, collected_at=now, duration=outcome.duration)
    except ParseError as e:
        return HostError(host=host, kind="parse", message=e.message, hint=e.hint, collected_at=now)
