"""`fleet log`: every apply's steps, oldest first — this checkout's journal and the hosts' history.

The hosts keep the record of what fleet did to them (fleet/history.py), whoever applied it;
the journal holds a cache of it (fleet/history_cache.py).  `fleet log` first reads each host's
history since the last record this checkout saw — one round trip per host, again while a host
has more than one read returns — so a checkout that never applied anything, or whose state
directory was deleted, still shows every apply.  A host that cannot be reached is a warning:
what the cache already holds of it is shown.  `--cached` reads the cache alone (no network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleet.collect.collector import HistoryAsk, collect_history
from fleet.errors import FleetError, ParseError, TransportError
from fleet.history_cache import HistoryCache, judge_breaks, merged_log
from fleet.journal import Journal, RunRecord, StepRecord, journal_path, parse_since
from fleet.model import Host
from fleet.targets import Targets, resolve
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Scope
from fleet.workflows.check import check

MAX_READS = 50  # rounds of reading a host's history at one `fleet log` (each bounded: HISTORY_READ_BYTES)


@dataclass(frozen=True)
class LogOptions:
    common: Common
    host: str | None = None  # only steps on this host
    since: str | None = None  # only steps since then (journal.parse_since)
    cached: bool = False  # do not read the hosts' history first: what the journal holds
    scope: Scope = Scope()


@dataclass(frozen=True)
class LogResult:
    journal: Path
    exists: bool  # False: nothing was ever applied from this state directory, nor read from a host
    steps: tuple[StepRecord, ...] = ()
    runs: tuple[RunRecord, ...] = ()
    warnings: tuple[str, ...] = ()  # hosts whose history could not be read, broken chains


def log(options: LogOptions) -> LogResult:
    path = journal_path(options.common.state_dir)
    since = parse_since(options.since) if options.since else None
    warnings: list[str] = []
    if not options.cached:
        targets = read_targets(options, warnings)
        if targets is not None:
            warnings += refresh(options.common, options.scope, targets)
    if not path.exists():
        return LogResult(path, exists=False, warnings=tuple(warnings))
    with Journal.open(path) as journal:
        cache = HistoryCache(journal)
        steps, runs = merged_log(journal, cache, host=options.host, since=since)
        for host in sorted({b.brk.host for b in cache.breaks(options.host)}):
            acknowledged, open_ = judge_breaks(cache.breaks(host), cache.acks(host))
            warnings += [f"warning: {b.brk.message}" for b in open_]
            warnings += [f"note: {b.brk.message} (acknowledged in record {a.record.seq})" for b, a in acknowledged]
    return LogResult(path, True, tuple(steps), tuple(runs), tuple(warnings))


def read_targets(options: LogOptions, warnings: list[str]) -> Targets | None:
    """The hosts to read (the inventory's, or --host's), and how to reach them; None when there
    is no inventory to read them from (then the journal alone is shown, and the reason said)."""
    common = options.common
    if not common.desired.exists():
        warnings.append(f"note: no desired state at {common.desired}: the hosts' history was not read; this shows "
                        "what the journal holds")
        return None
    desired = check(common).desired  # a policy finding does not stop reading what was done
    if desired is None:
        warnings.append("note: the desired state cannot be read (see `fleet check`): the hosts' history was not "
                        "read; this shows what the journal holds")
        return None
    if options.host is not None and not any(h.name == options.host for h in desired.hosts):
        warnings.append(f"note: {options.host} is not in the inventory: its history was not read; this shows what "
                        "the journal holds of it")
        return None
    try:
        return resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=options.host)
    except FleetError as e:  # e.g. --lab with no lab up: what the journal holds is still worth showing
        warnings.append(f"note: the hosts' history was not read: {e.message}; this shows what the journal holds")
        return None


def refresh(common: Common, scope: Scope, targets: Targets) -> list[str]:
    """Read the hosts' history into the journal's cache until every host's is read to its end;
    the warnings to show (a host not reached, a history that could not be read)."""
    warnings: list[str] = []
    pending = list(targets.hosts)
    with Journal.open(journal_path(common.state_dir)) as journal, \
            observing.open_transport(common, targets, scope) as transport:
        cache = HistoryCache(journal)
        for _ in range(MAX_READS):
            if not pending:
                break
            asks = {h.name: HistoryAsk(cache.last_seen(h.name), cache.known(h.name)) for h in pending}
            reads = collect_history(transport, pending, asks, forks=scope.forks, timeout=scope.timeout)
            more: list[Host] = []
            for h in pending:
                r = reads.get(h.name)
                if isinstance(r, TransportError):
                    warnings.append(f"warning: {h.name}: its history was not read ({r.kind}: {r.message}); this shows "
                                    "what the journal already holds of it")
                elif isinstance(r, ParseError):
                    warnings.append(f"warning: {r.message}")
                elif r is not None and r.status in ("busy", "unreadable"):
                    warnings.append(f"warning: {h.name}: its history could not be read ({r.status})")
                elif r is not None:
                    cache.merge(r)
                    if r.more:
                        more.append(h)
            pending = more
    return warnings
