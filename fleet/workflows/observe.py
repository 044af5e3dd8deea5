"""Observing the fleet, the step status, plan, apply, audit and diff share: a transport opened
to the target hosts, every host collected (a state or an error), and the observation kept in
the journal as a snapshot (`fleet history`).

The same round trip reads each host's history since the last record this checkout saw
(fleet/history.py) and merges it into the journal's cache (fleet/history_cache.py), so that
`fleet log` and `fleet audit` know the applies made from any checkout."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fleet import config
from fleet.errors import FleetError, ParseError
from fleet.journal import Journal, journal_path, operator
from fleet.model import Desired, Host, HostError, HostResult, HostState
from fleet.sidekiq import find_view, quiet_since
from fleet.snapshot import from_record, host_summary, pack, unpack
from fleet.targets import Targets
from fleet.workflows.base import Common, Reporter, Scope

if TYPE_CHECKING:  # what observing the hosts needs, imported where it is done: `--observed` reads a file
    from fleet.collect.collector import HistoryAsk
    from fleet.history import HistoryRead
    from fleet.transport.protocol import Transport

# How many earlier snapshots to look through for Sidekiq's view (a status of a fleet without it
# reads none: only an observation with a quiet process looks back at all).
LOOK_BACK = 5

# 4 MiB: a real collection is tens of KB (unit texts are capped at 5,000 lines); a host that
# prints more is refused ("output-too-large") before its output can cost much memory.
MAX_OUTPUT = 4 << 20


@dataclass(frozen=True)
class Observation:
    results: dict[str, HostResult]  # host name -> HostState | HostError, in the targets' order
    snapshot_id: str  # the journal's snapshot of it; "" when it could not be kept
    history_problems: dict[str, str] = field(default_factory=dict)  # host -> why its history could not be read
    more_history: tuple[str, ...] = ()  # hosts whose history was read only in part (bounded): read again
    kept: str = ""  # --observed: which kept observation this is ("snapshot ID, taken …" or "FILE, collected …")


def open_transport(common: Common, targets: Targets, scope: Scope) -> Transport:
    # Imported here, not at the top: paramiko costs ~90 ms of CPU, and `check`, `show`, `log`,
    # `history` and `--help` never connect to anything.
    from fleet.transport.ssh import SSHTransport

    return SSHTransport(ssh_config=targets.ssh_config, known_hosts=targets.known_hosts,
                        accept_new=common.accept_new_host_keys, connect_timeout=common.connect_timeout,
                        command_timeout=scope.timeout, max_output=MAX_OUTPUT)


def observe(common: Common, scope: Scope, command: str, desired: Desired, targets: Targets, transport: Transport,
            reporter: Reporter) -> Observation:
    """Collect every target host, with progress for a person watching, and keep the observation
    as a snapshot in the journal, named by the `command` that took it."""
    from fleet.collect.collector import collect_all

    def progress(name: str, result: HostResult) -> None:
        what = "ok" if isinstance(result, HostState) else f"FAILED ({result.kind})"
        reporter.progress(f"  {name}: {what}")

    reporter.progress(f"collecting {len(targets.hosts)} host(s){' (lab)' if targets.lab else ''}…")
    asks = history_asks(common, targets.hosts, reporter)
    got = collect_all(desired, transport, targets.hosts, forks=scope.forks, timeout=scope.timeout, progress=progress,
                      history_of=asks, kept=kept_states(common, desired, targets.hosts))
    problems, more = merge_history(common, got.history, reporter) if asks else ({}, [])
    return Observation(got.results, keep_snapshot(common, command, desired, got.results, reporter), problems,
                       tuple(more))


def kept_states(common: Common, desired: Desired, hosts: Sequence[Host]) -> dict[str, HostState]:
    """Each host as the newest kept snapshot of this fleet that observed it saw it (looking back
    LOOK_BACK snapshots): what the collection hands the script so that the `show` may leave out
    installed, idle units that did not change (fleet.collect.script.idle_offers), and skip parsing
    an env file that hashes as it did (fleet.collect.script.reuse_offers).  Empty when
    there is no journal or it cannot be read: the collection then names every unit, as a first one."""
    path = journal_path(common.state_dir)
    if not path.exists():
        return {}
    wanted = {h.name for h in hosts}
    found: dict[str, HostState] = {}
    try:
        with Journal.open(path) as journal:
            mine = [s for s in journal.snapshots() if s.fleet == desired.name and s.lab == common.lab]
            for record in reversed(mine[-LOOK_BACK:]):
                if not (wanted - set(found)) & set(record.hosts):
                    continue
                data = journal.snapshot_data(record.id)
                if data is None:
                    continue
                for name, r in unpack(data).items():
                    if name in wanted and name not in found and isinstance(r, HostState):
                        found[name] = r
                if not wanted - set(found):
                    break
    except FleetError:
        return {}  # a damaged journal costs this saving, never the observation
    return found


def history_asks(common: Common, hosts: Sequence[Host], reporter: Reporter) -> dict[str, HistoryAsk]:
    """What to ask each host's history for, from the journal's cache; none when the journal
    cannot be opened (said once: the observation itself does not need it)."""
    from fleet.collect.collector import HistoryAsk
    from fleet.history_cache import HistoryCache

    try:
        with Journal.open(journal_path(common.state_dir)) as journal:
            cache = HistoryCache(journal)
            return {h.name: HistoryAsk(cache.last_seen(h.name), cache.known(h.name)) for h in hosts}
    except FleetError as e:
        reporter.note(f"warning: the hosts' history was not read: {e.message}")
        return {}


def merge_history(common: Common, reads: dict[str, HistoryRead | ParseError], reporter: Reporter
                  ) -> tuple[dict[str, str], list[str]]:
    """Store what the hosts' history sections gave; (host -> why its history could not be read,
    hosts with more to read)."""
    from fleet.history_cache import HistoryCache

    problems = {h: r.message for h, r in reads.items() if isinstance(r, ParseError)}
    good = [r for r in reads.values() if not isinstance(r, ParseError)]
    for h, r in reads.items():
        if not isinstance(r, ParseError) and r.status in ("busy", "unreadable"):
            problems[h] = (f"{h}: its history could not be read ("
                           + ("its history lock stayed busy" if r.status == "busy" else "permission denied") + ")")
    try:
        with Journal.open(journal_path(common.state_dir)) as journal:
            cache = HistoryCache(journal)
            for r in good:
                if r.status in ("ok", "none", "refused"):
                    cache.merge(r)
    except FleetError as e:
        reporter.note(f"warning: the hosts' history was read but not kept: {e.message}")
    return problems, [r.host for r in good if r.more]


def keep_snapshot(common: Common, command: str, desired: Desired, results: dict[str, HostResult],
                  reporter: Reporter) -> str:
    """Store the observation; a journal that cannot be written is a warning, never a failure of
    a read command."""
    try:
        with Journal.open(journal_path(common.state_dir)) as journal:
            return journal.save_snapshot(command=command, fleet=desired.name, lab=common.lab,
                                         hosts=host_summary(results), data=pack(results), operator=operator(),
                                         keep_days=desired.snapshot_retention_days)
    except FleetError as e:
        reporter.note(f"warning: this observation was not kept in the journal: {e.message}")
        return ""


def previous_quiet(common: Common, desired: Desired, observation: Observation) -> dict[str, float]:
    """Since when each Sidekiq process quiet now is known to have been quiet: the time of the newest
    earlier snapshot of this fleet that saw it quiet too (sidekiq.quiet_since).  The view says only
    *that* a process is quiet; this is what tells "stopping" from "stuck".  Empty when no process is
    quiet, or the journal cannot tell."""
    found = find_view(observation.results)
    if found is None or not any(p.quiet for p in found[1].processes):
        return {}
    path = journal_path(common.state_dir)
    if not path.exists():
        return {}
    try:
        with Journal.open(path) as journal:
            earlier = [s for s in journal.snapshots() if s.id != observation.snapshot_id
                       and s.fleet == desired.name and s.lab == common.lab]
            for record in reversed(earlier[-LOOK_BACK:]):
                data = journal.snapshot_data(record.id)
                if data is not None and find_view(previous := unpack(data)) is not None:
                    return quiet_since(previous)
    except FleetError:
        return {}  # a damaged journal costs this one finding, never the status
    return {}


def recall(common: Common, desired: Desired, targets: Targets, observed: str) -> Observation:
    """--observed: the target hosts as a kept observation saw them, instead of contacting them —
    a file written by `fleet status --json` (or holding only its `observation`), else a snapshot
    id from `fleet history`.  It is read as data from disk, checked field by field within the
    bounds of a collection; a target host it does not hold is a host not observed."""
    path = Path(observed)
    if path.exists():
        record, kept = _observation_file(path, len(targets.hosts)), str(path)
    else:
        record, kept = _observation_snapshot(common, desired, observed)
    seen = from_record(record, kept)
    when = ""
    results: dict[str, HostResult] = {}
    for h in targets.hosts:
        results[h.name] = seen.get(h.name) or HostError(
            host=h.name, kind="not-observed", message=f"{h.name} is not in the observation {kept}",
            hint="observe it (fleet status --json), or leave it out with --limit")
    times = [r.collected_at for r in results.values() if isinstance(r, HostState) and r.collected_at]
    if times and path.exists():
        when = time.strftime(" (collected %Y-%m-%d %H:%M:%S UTC)", time.gmtime(min(times)))
    return Observation(results, "", kept=f"{kept}{when}")


def _observation_file(path: Path, n_hosts: int) -> object:
    hint = "pass a file written by `fleet status --json`, or a snapshot id from `fleet history`"
    try:  # as large as the hosts' collections may be, and no larger
        raw = config.read_regular_file(path, MAX_OUTPUT * max(n_hosts, 1) + 1)
    except config.NotAFileError as e:
        raise FleetError(f"cannot read {path}: it is {e.kind}, not a file", hint=hint) from None
    except config.FileTooLargeError as e:
        raise FleetError(f"{path} is {e.size} bytes, more than the collections of {n_hosts} host(s) may be",
                         hint=hint) from None
    except OSError as e:
        raise FleetError(f"cannot read {path}: {e.strerror or e}", hint=hint) from None
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise FleetError(f"{path} nests too deeply to be an observation", hint=hint) from None
    except ValueError as e:  # UnicodeDecodeError too
        raise FleetError(f"{path} is not JSON: {e}", hint=hint) from None
    if isinstance(doc, dict) and "observation" in doc:  # a `fleet status --json` document
        return doc["observation"]
    return doc


def _observation_snapshot(common: Common, desired: Desired, snap_id: str) -> tuple[object, str]:
    hint = "pass a snapshot id from `fleet history`, or a file written by `fleet status --json`"
    path = journal_path(common.state_dir)
    if not path.exists():
        raise FleetError(f"--observed {snap_id}: no such file, and no journal at {path} to hold a snapshot",
                         hint=hint)
    with Journal.open(path) as journal:
        record = next((s for s in journal.snapshots() if s.id == snap_id), None)
        data = journal.snapshot_data(snap_id) if record is not None else None
    if record is None or data is None:
        raise FleetError(f"--observed {snap_id}: no such file, nor snapshot in {path}", hint=hint)
    if record.fleet != desired.name or record.lab != common.lab:
        raise FleetError(f"snapshot {snap_id} observed {'the lab of ' if record.lab else ''}fleet {record.fleet!r}; "
                         f"this is {'the lab of ' if common.lab else ''}fleet {desired.name!r}", hint=hint)
    try:
        record_data = json.loads(zlib.decompress(data))
    except (zlib.error, ValueError, RecursionError) as e:
        raise FleetError(f"snapshot {snap_id} in the journal is damaged ({type(e).__name__})",
                         hint="pick another snapshot (fleet history)") from None
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.taken))
    return record_data, f"snapshot {snap_id} ({record.command}, {taken})"


def now_or_kept(common: Common, scope: Scope, command: str, desired: Desired, observe_as: Desired, targets: Targets,
                observed: str | None, reporter: Reporter) -> tuple[Observation, dict[str, float]]:
    """What `status` and `audit` judge: the hosts observed now (`observe_as`: the desired state the
    collection asks about), or the kept observation `--observed` names; with the quiet-since times
    of Sidekiq processes (none for a kept observation: the journal's earlier snapshots are not
    earlier than it)."""
    if observed is not None:
        seen = recall(common, desired, targets, observed)
        reporter.note(f"observed: {seen.kept}, not now")
        return seen, {}
    with open_transport(common, targets, scope) as transport:
        seen = observe(common, scope, command, observe_as, targets, transport, reporter)
    return seen, previous_quiet(common, desired, seen)
