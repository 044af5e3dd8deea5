"""`fleet watch`: observe the fleet every few minutes and tell the team what changed — never
changing a host.

One cycle, in the order that makes a crash harmless (fleet/watch/cycle.py says why):

  load the desired state → the outbox's checkpoint (what was last told, and the observation it
  was based on) → observe every host and keep the snapshot ("watch") → judge it (`build_audit`)
  → the changes since the checkpoint's snapshot, each attributed to a journaled apply or marked
  as made outside fleet → the apply runs the journal shows → `Cycle.from_audit` → `record_cycle`
  (the events' messages and the new checkpoint in one atomic write) → the metrics file and the
  status page → deliver what is pending.

`watch` repeats cycles every `every` seconds until `stop` is set (the CLI sets it on SIGTERM),
so a stop ends it between cycles.  A cycle that fails (the desired state broken by a commit, the
journal locked) is reported and the next one tries again: a watch that dies on the first problem
tells nobody about the next.

`fleet apply` reaches the same targets through `notify_apply` (the apply workflow calls it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fleet.audit import ObservedChange, build_audit
from fleet.errors import FleetError
from fleet.journal import Journal, journal_path
from fleet.model import Desired, HostResult, HostState
from fleet.notify import Delivery, DeliveryReport, NotifyError, Outbox, Target, parse_target
from fleet.output.html import status_page, write_status_page
from fleet.output.metrics import metrics_path_problem, metrics_text, write_metrics
from fleet.snapshot import unpack
from fleet.targets import resolve
from fleet.watch.cycle import load_state, record_cycle
from fleet.watch.events import ApplyRun, Cycle, Event, runs_to_read
from fleet.workflows import observe as observing
from fleet.workflows.audit import changes_since
from fleet.workflows.base import Common, Reporter, Scope
from fleet.workflows.check import load_valid

DEFAULT_EVERY = 300.0
MIN_EVERY = 10.0  # below this a cycle would overlap the next on any real fleet
WATCH_DELIVERY = Delivery()
# An apply waits for its own posts: shorter than the watch's, and what fails waits in the outbox.
APPLY_DELIVERY = Delivery(timeout=5.0, attempts=2)


@dataclass(frozen=True)
class WatchOptions:
    common: Common
    scope: Scope
    every: float = DEFAULT_EVERY  # seconds from the start of one cycle to the start of the next
    once: bool = False
    notify: tuple[str, ...] = ()  # --notify SPECs, added to the desired state's [watch] notify
    metrics_file: Path | None = None
    html_dir: Path | None = None
    remind_every: float | None = None  # None: the desired state's [watch] remind_every


@dataclass(frozen=True)
class CycleResult:
    at: float  # when the observation started
    events: tuple[Event, ...]  # what this cycle told (committed to the outbox)
    unreachable: tuple[str, ...]  # hosts that could not be observed
    snapshot_id: str
    delivery: DeliveryReport


def check_options(options: WatchOptions) -> None:
    """Refuse what cannot work before the first cycle, with the option named."""
    if not options.once and options.every < MIN_EVERY:
        raise FleetError(f"--every {options.every:g}: a cycle every less than {MIN_EVERY:g} seconds would overlap "
                         "the next", hint="watch every few minutes, e.g. --every 300 (the default)")
    if options.metrics_file is not None:
        problem = metrics_path_problem(options.metrics_file)
        if problem:
            raise FleetError(f"--metrics-file {problem}", hint="e.g. --metrics-file /var/lib/prometheus/"
                                                               "node-exporter/fleet.prom")


def notify_targets(desired: Desired, extra: Iterable[str], *, environ: Mapping[str, str] | None = None,
                   lenient: bool = False, reporter: Reporter | None = None) -> list[Target]:
    """The targets of the desired state's `[watch] notify` and of `--notify`, each once.
    `lenient` (fleet apply): a `[watch]` target whose environment variable is not set here is
    skipped with a note — an operator's laptop need not hold the team's webhook to apply."""
    targets: list[Target] = []
    where = f"{desired.source or 'desired_state.toml'} [watch] notify"
    for spec in desired.watch.notify:
        try:
            targets.append(parse_target(spec, origin=where, environ=environ))
        except NotifyError as e:
            if not lenient:
                raise
            if reporter is not None:
                reporter.note(f"notify: skipped: {e.message}")
    targets += [parse_target(spec, origin="--notify", environ=environ) for spec in extra]
    return list({t.key: t for t in targets}.values())


def watch(options: WatchOptions, reporter: Reporter, *, stop: threading.Event | None = None,
          on_cycle: Callable[[CycleResult], None] = lambda _: None,
          monotonic: Callable[[], float] = time.monotonic) -> int:
    """Cycles until `stop` is set (one with `once`); the number of cycles run.  With `once`, a
    failing cycle raises; otherwise it is reported and the next cycle comes as planned."""
    check_options(options)
    stop = stop or threading.Event()
    if options.once:
        on_cycle(run_cycle(options, reporter))
        return 1
    cycles = 0
    while not stop.is_set():
        started = monotonic()
        try:
            on_cycle(run_cycle(options, reporter))
        except FleetError as e:
            reporter.note(f"fleet watch: this cycle failed: {e}; trying again in {options.every:g} s")
        cycles += 1
        if stop.wait(max(0.0, started + options.every - monotonic())):
            break
    return cycles


def run_cycle(options: WatchOptions, reporter: Reporter, *, now: Callable[[], float] = time.time,
              delivery: Delivery = WATCH_DELIVERY, sleep: Callable[[float], None] = time.sleep) -> CycleResult:
    """One cycle (module docstring)."""
    common = options.common
    desired = load_valid(common, reporter)
    targets_to = notify_targets(desired, options.notify)
    remind = options.remind_every if options.remind_every is not None else desired.watch.remind_every
    hosts = resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=options.scope.limit)
    scoped = replace(desired, hosts=hosts.hosts)
    outbox = Outbox(common.state_dir)
    state = load_state(outbox)
    at = now()
    with observing.open_transport(common, hosts, options.scope) as transport:
        seen = observing.observe(common, options.scope, "watch", scoped, hosts, transport, reporter)
    report = replace(build_audit(scoped, seen.results), snapshot_id=seen.snapshot_id)
    since, unfinished = runs_to_read(state, at)
    previous, changes, runs = _from_journal(common, state.snapshot, seen.results, at, since, unfinished, reporter)
    cycle = Cycle.from_audit(report, at=at, changes=changes, runs=runs, previous=previous,
                             snapshot=seen.snapshot_id,
                             sensitive_keys={k for e in scoped.env_files for k in e.sensitive_keys()})
    events, new_state = record_cycle(outbox, cycle, targets_to, fleet=desired.name, remind_every=remind)
    if options.metrics_file is not None:
        write_metrics(options.metrics_file, metrics_text(report, now=at))
    if options.html_dir is not None:
        write_status_page(options.html_dir, status_page(report, new_state.recent, now=at))
    sent = outbox.deliver(targets_to, delivery=delivery, sleep=sleep)
    for line in sent.lines():
        reporter.note(line)
    down = tuple(h for h, r in seen.results.items() if not isinstance(r, HostState))
    return CycleResult(at, tuple(events), down, seen.snapshot_id, sent)


def _from_journal(common: Common, base_id: str, results: dict[str, HostResult], at: float, since: float,
                  unfinished: Sequence[str], reporter: Reporter) -> tuple[
        dict[str, HostResult], list[ObservedChange], list[ApplyRun]]:
    """The previous observation, what changed since it (attributed) and the apply runs to tell.
    Without a journal, or without the previous snapshot (pruned, or never kept), there is no
    "what changed": the events still tell new drift and findings."""
    path = journal_path(common.state_dir)
    if not path.exists():
        return {}, [], []
    with Journal.open(path) as journal:
        runs = {r.id: r for r in journal.runs(since=since)}
        for rid in unfinished:
            record = journal.run(rid)
            if record is not None:
                runs[rid] = record
        told = [ApplyRun.of(r) for r in runs.values() if r.lab == common.lab]
        base = next((s for s in journal.snapshots() if s.id == base_id), None) if base_id else None
        if base is None:
            if base_id:
                reporter.note(f"fleet watch: the previous observation ({base_id}) is no longer in the journal; "
                              "what changed since it cannot be told this cycle")
            return {}, [], told
        data = journal.snapshot_data(base.id)
        previous = unpack(data) if data is not None else {}
        changes, _ = changes_since(journal, base, results, at)
    return previous, changes, told


def notify_apply(common: Common, desired: Desired, extra: Sequence[Target], event: Event, reporter: Reporter, *,
                 delivery: Delivery = APPLY_DELIVERY) -> None:
    """Post an apply's start or result to the watch's targets (the desired state's, and `extra`:
    apply's own --notify, parsed before anything was touched) through the outbox in the state
    directory, so that `fleet watch` reading the same run from the journal tells it no second
    time.  Never raises: a post that fails must not fail the apply — it stays in the outbox and
    the next cycle of `fleet watch` (or the next apply) delivers it."""
    try:
        targets = notify_targets(desired, (), lenient=True, reporter=reporter)
        targets = list({t.key: t for t in (*targets, *extra)}.values())
        if not targets:
            return
        outbox = Outbox(common.state_dir)
        outbox.commit([event], targets, fleet=desired.name, keep_checkpoint=True)
        for line in outbox.deliver(targets, delivery=delivery).lines():
            reporter.note(line)
    except FleetError as e:
        reporter.note(f"notify: {e}; the apply goes on")
