"""Observing the fleet: one script per host, run in parallel, every host a value.

The I/O edge of the read path.  It asks the transport to run each host's script once and
turns whatever comes back — output, a transport failure, unparseable text — into a
`HostState` or a `HostError`.  Nothing here raises for one host's failure.

Asked to, the same round trip reads each host's history (fleet/history.py): the records since
the last one this checkout saw, as a `@@history` section printed last.  It is cut out of the
output before the host's state is parsed and parsed on its own, so that a history the parser
refuses is a finding about that host's history, never a host fleet cannot see.  It is not a
kind of resource: what it asks depends on this checkout's cache, not on the desired state,
and what it reads is not the host's state (it is merged into the cache, never kept in a
snapshot).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fleet import history
from fleet.collect.parse import parse_host
from fleet.collect.script import CollectSpec, build_script, known_env, reuse_offers, spec_for
from fleet.errors import ParseError, TransportError
from fleet.model import Desired, EnvFileState, Host, HostError, HostResult, HostState
from fleet.transport.protocol import RunResult, Transport

DEFAULT_MAX_FORKS = 32
# One collection's share of a host's history: well inside the transport's output limit
# (fleet/workflows/observe.py, 4 MiB) next to the units; the rest comes with the next read.
HISTORY_READ_BYTES = 1 << 20
HISTORY_READ_RECORDS = 5_000


@dataclass(frozen=True)
class HistoryAsk:
    """What to ask a host's history for: the last record this checkout saw, and the copies it
    holds (seq → hash) to name a changed record by."""

    last: history.LastSeen | None = None
    known: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Collection:
    """One collection: every host's state or error, and what each host's history section gave —
    a read, or the ParseError that says why it could not be read (the host's state stands)."""

    results: dict[str, HostResult]
    history: dict[str, history.HistoryRead | ParseError] = field(default_factory=dict)


def collect(
    desired: Desired,
    transport: Transport,
    hosts: Sequence[Host] | None = None,
    *,
    forks: int | None = None,
    timeout: float | None = None,
    progress: Callable[[str, HostResult], None] | None = None,
    kept: Mapping[str, HostState] | None = None,
) -> dict[str, HostResult]:
    """Observe `hosts` (default: every host in the inventory); returns host name → result."""
    return collect_all(desired, transport, hosts, forks=forks, timeout=timeout, progress=progress, kept=kept).results


def collect_all(
    desired: Desired,
    transport: Transport,
    hosts: Sequence[Host] | None = None,
    *,
    forks: int | None = None,
    timeout: float | None = None,
    progress: Callable[[str, HostResult], None] | None = None,
    history_of: Mapping[str, HistoryAsk] | None = None,
    kept: Mapping[str, HostState] | None = None,
) -> Collection:
    """Observe `hosts` and, for each host in `history_of`, read its history in the same round trip.
    `kept`: the hosts as the last kept observation saw them, whose installed, idle units the
    script may then leave out of its `show` while they are unchanged (script.idle_offers), and whose
    env files' parses stand for the files while they hash the same (script.reuse_offers)."""
    targets = list(desired.hosts if hosts is None else hosts)
    asks = history_of or {}
    specs, scripts = collection_scripts(desired, targets, history_of=asks, kept=kept)
    results: dict[str, HostResult] = {}
    reads: dict[str, history.HistoryRead | ParseError] = {}
    known = {name: {p: e for p, h in known_env(spec).items()
                    if (e := kept[name].env_file(p)) is not None and e.sha256 == h}
             for name, spec in specs.items() if kept and name in kept}

    def done(name: str, outcome: RunResult | TransportError) -> None:
        outcome, read = _split_history(name, outcome, asks.get(name))
        if read is not None:
            reads[name] = read
        results[name] = to_result(name, outcome, specs.get(name), known.get(name))
        if progress is not None:
            progress(name, results[name])

    raw = transport.run_many(
        targets, lambda h: scripts[h.name], forks=forks or min(len(targets), DEFAULT_MAX_FORKS) or 1,
        timeout=timeout, on_done=done,
    )
    for name, outcome in raw.items():  # in case on_done was not called for some host
        if name not in results:
            outcome, read = _split_history(name, outcome, asks.get(name))
            if read is not None:
                reads[name] = read
            results[name] = to_result(name, outcome, specs.get(name), known.get(name))
    return Collection({h.name: results[h.name] for h in targets if h.name in results},
                      {h.name: reads[h.name] for h in targets if h.name in reads})


def collection_scripts(desired: Desired, hosts: Sequence[Host], *, history_of: Mapping[str, HistoryAsk] | None = None,
                       kept: Mapping[str, HostState] | None = None) -> tuple[dict[str, CollectSpec], dict[str, str]]:
    """What `collect_all` asks each host to look at, and the remote script it sends for it (before
    the transport's sudo and stdin wrapping): the bench's OpenSSH floor sends these same texts."""
    asks = history_of or {}
    specs = {h.name: reuse_offers(spec_for(desired, h.name), (kept or {}).get(h.name)) for h in hosts}
    return specs, {h.name: build_script(specs[h.name], history=_history_section(asks.get(h.name))) for h in hosts}


def _history_section(ask: HistoryAsk | None) -> str:
    if ask is None:
        return ""
    return history.read_section(ask.last, max_bytes=HISTORY_READ_BYTES, max_records=HISTORY_READ_RECORDS)


_HISTORY_HEADER = b"\n@@history\n"


def _split_history(host: str, outcome: RunResult | TransportError, ask: HistoryAsk | None
                   ) -> tuple[RunResult | TransportError, history.HistoryRead | ParseError | None]:
    """The outcome without its history section, and that section parsed (None: not asked, or
    not printed — the host's script did not get that far)."""
    if ask is None or isinstance(outcome, TransportError):
        return outcome, None
    out = outcome.stdout
    start = out.find(_HISTORY_HEADER)
    if start < 0:
        return outcome, None
    body_at = start + len(_HISTORY_HEADER)
    # The section's lines never start with `@@`: it ends where the next section (`@@end`) starts.
    end = out.find(b"\n@@", body_at - 1)
    stop = len(out) if end < 0 else end + 1
    body = out[body_at:stop].decode("utf-8", "surrogateescape")
    rest = out[:start + 1] + out[stop:]
    try:
        read: history.HistoryRead | ParseError = history.parse_read(
            host, body, ask.last, known=ask.known, max_bytes=HISTORY_READ_BYTES, max_records=HISTORY_READ_RECORDS)
    except ParseError as e:
        read = e
    return dataclasses.replace(outcome, stdout=rest), read


def to_result(host: str, outcome: RunResult | TransportError, spec: CollectSpec | None = None,
              known: Mapping[str, EnvFileState] | None = None) -> HostResult:
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
        return parse_host(host, text, collected_at=now, duration=outcome.duration,
                          idle=spec.idle if spec is not None else (), known_env=known)
    except ParseError as e:
        return HostError(host=host, kind="parse", message=e.message, hint=e.hint, collected_at=now)


def collect_history(transport: Transport, hosts: Sequence[Host], asks: Mapping[str, HistoryAsk], *,
                    forks: int | None = None, timeout: float | None = None
                    ) -> dict[str, history.HistoryRead | ParseError | TransportError]:
    """Only the hosts' history (what `fleet log` reads from a checkout that has not collected it
    yet): one round trip per host, the same section the full collection prints."""
    scripts = {h.name: "export LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin\necho '@@fleet-history 1'\n"
               + _history_section(asks.get(h.name, HistoryAsk())) + "echo '@@end'\n" for h in hosts}
    raw = transport.run_many(list(hosts), lambda h: scripts[h.name],
                             forks=forks or min(len(hosts), DEFAULT_MAX_FORKS) or 1, timeout=timeout)
    out: dict[str, history.HistoryRead | ParseError | TransportError] = {}
    for h in hosts:
        outcome = raw.get(h.name)
        if outcome is None:
            continue
        if isinstance(outcome, TransportError):
            out[h.name] = outcome
            continue
        _, read = _split_history(h.name, outcome, asks.get(h.name, HistoryAsk()))
        if read is None:
            err = outcome.stderr.decode("utf-8", "replace").strip().splitlines()
            read = ParseError(f"{h.name}: its history could not be read ({outcome.exit_text}"
                              + (f": {err[-1][:200]}" if err else "") + ")", host=h.name, section="history")
        out[h.name] = read
    return out
