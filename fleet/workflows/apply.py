"""`fleet apply [PLAN]`: lock → observe → plan → saved-plan check → confirm → execute → journal →
unlock; its start and result posted to the watch's notification targets.

The hosts are locked before they are observed, so that what is planned is what is applied and
a second apply started meanwhile is refused.  With a saved plan, fleet plans again under the
lock and applies only if it arrives at exactly that plan (`same_as_saved`); what runs is always
the plan computed now, never fields read from the file.  Every step is journaled by the
executor (fleet/apply.py); the run is opened here, and closed whatever happens to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fleet import provenance
from fleet.apply import COMMAND_GRACE, Executor, Recording, check_contents
from fleet.errors import FleetError
from fleet.journal import Journal, journal_path, operator
from fleet.notify import Target, parse_target
from fleet.output.text import apply_summary
from fleet.plan import Plan, first_difference
from fleet.resources.registry import owner
from fleet.results import ApplyResult
from fleet.textutil import sha256_hex
from fleet.transport.protocol import DEFAULT_MAX_FORKS, Transport
from fleet.watch.events import ApplyRun, apply_finished, apply_started
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Reporter, Scope
from fleet.workflows.lock import holder_info, lock_hosts, lock_token, relabel_lock, unlock_hosts
from fleet.workflows.plan import Prepared, compute, prepare, read_plan
from fleet.workflows.watch import notify_apply


@dataclass(frozen=True)
class ApplyOptions:
    common: Common
    scope: Scope
    plan_file: str | None = None  # a saved plan to apply exactly, as named on the command line
    yes: bool = False  # do not ask for confirmation
    no_prune: bool = False
    secrets: Path | None = None  # None: the state directory's secrets file
    settle: float = 3.0  # seconds a started unit must stay up
    start_timeout: float = 30.0  # seconds a unit may take to become active
    command_grace: float = COMMAND_GRACE  # seconds a step's remote command may run past its own budget
    accept_queued: int | None = None  # a move's Sidekiq jobs left queued, accepted (--accept-queued N)
    notify: tuple[str, ...] = ()  # --notify SPECs: where its start and result are posted, besides [watch] notify


@dataclass(frozen=True)
class ApplyOutcome:
    """What an apply came to.  `result` is None when nothing was executed: nothing to do, or
    the person asked said no (`cancelled`)."""

    plan: Plan
    result: ApplyResult | None = None
    run_id: str = ""  # the journal's run, when something was executed
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        return not self.cancelled and (self.result is None or self.result.ok)


def apply(options: ApplyOptions, reporter: Reporter) -> ApplyOutcome:
    common, scope = options.common, options.scope
    saved: Plan | None = None
    if options.plan_file is not None:
        saved = _saved_plan(options)
        scope = replace(scope, limit=",".join(saved.hosts))  # the saved plan's hosts, and only those
    prep = prepare(common, scope, options.secrets, reporter)
    # --notify is checked before any host is touched (an unset variable is bad input); the
    # desired state's [watch] targets are looked up only when posting, leniently.
    notify = [parse_target(spec, origin="--notify") for spec in options.notify]
    who = operator()
    token = lock_token()
    with observing.open_transport(common, prep.targets, scope) as transport:
        lock_hosts(transport, prep.targets.hosts, holder_info(token, who), forks=scope.forks or DEFAULT_MAX_FORKS)
        try:
            plan = _plan_under_lock(options, scope, prep, transport, saved, reporter)
            if plan.empty:
                return ApplyOutcome(plan)
            if saved is None and not options.yes and not _confirmed(plan, reporter):
                return ApplyOutcome(plan, cancelled=True)
            return _execute(options, prep, plan, transport, token, who, reporter, notify)
        finally:
            unlock_hosts(transport, prep.targets.hosts, token, reporter.note)


def _saved_plan(options: ApplyOptions) -> Plan:
    """The saved plan, refused at once when it cannot be this run's: limited, for the other
    kind of hosts (lab or real), or incomplete."""
    name = options.plan_file
    assert name is not None
    if options.scope.limit:
        raise FleetError("a saved plan covers its own hosts; --limit cannot change it",
                         hint="make a new plan with `fleet plan --limit … -o FILE`")
    saved = read_plan(name)
    if saved.observed:
        raise FleetError(f"{name} was planned from a kept observation ({saved.observed}), not from the hosts as "
                         "they are: it is stale by construction and cannot be applied",
                         hint="plan from the hosts themselves (`fleet plan -o FILE`, without --observed), "
                              "review it, and apply that")
    lab = options.common.lab
    if saved.lab != lab:
        raise FleetError(f"{name} was computed {'for the lab' if saved.lab else 'for real hosts'}; "
                         f"this run is {'--lab' if lab else 'not --lab'}", hint="use the matching --lab")
    if not saved.complete:
        raise FleetError(f"{name} is incomplete: {', '.join(h for h, _, _ in saved.unknown)} could not "
                         "be observed when it was computed", hint="plan again, or exclude them with --limit")
    return saved


def _plan_under_lock(options: ApplyOptions, scope: Scope, prep: Prepared, transport: Transport, saved: Plan | None,
                     reporter: Reporter) -> Plan:
    """The plan to execute, computed now under the lock: checked against the saved plan, or
    shown for review.  An incomplete plan is refused."""
    plan = compute(options.common, scope, "apply", prep, transport, reporter, no_prune=options.no_prune)
    if saved is not None:
        same_as_saved(saved, plan)
        # What runs is the plan computed now, never fields read from the file: the two are
        # equal by the check above, and the saved plan's time keeps its plan id in the journal.
        plan = replace(plan, created_at=saved.created_at)
    else:
        reporter.review(plan)
    if not plan.complete:
        raise FleetError("the plan is incomplete (a host could not be observed); nothing was changed",
                         hint="fix the host, or exclude it with --limit")
    return plan


def _confirmed(plan: Plan, reporter: Reporter) -> bool:
    n_hosts = len({c.host for c in plan.changes})
    answer = reporter.confirm(f"Apply these {len(plan.changes)} change(s) to {n_hosts} host(s)?")
    if answer is None:
        raise FleetError("refusing to apply without confirmation: no terminal to ask on",
                         hint="review with `fleet plan`, then run `fleet apply --yes` (or apply a saved plan)")
    return answer


def same_as_saved(saved: Plan, fresh: Plan) -> None:
    """Refuse a saved plan unless fleet, planning now under the lock from the same desired state
    and the fresh observation, arrives at exactly that plan.  Stale plans are named by what
    changed on the hosts; anything else that differs was edited (or damaged)."""
    again = "compute a new plan with `fleet plan -o FILE` and review it"
    if saved.desired_hash != fresh.desired_hash:
        raise FleetError("the desired state changed since the plan was computed; refusing a stale plan", hint=again)
    reasons = stale_reasons(saved, fresh)
    if reasons:
        raise FleetError("refusing a stale plan: the hosts changed since it was computed\n  " + "\n  ".join(reasons),
                         hint=again)
    difference = first_difference(saved, fresh)
    if difference is not None:
        raise FleetError("refusing the saved plan: it is not the plan fleet computes now from the same desired "
                         f"state and hosts (edited, or computed with other options): {difference}",
                         hint=again + " (a plan made with --no-prune is applied with --no-prune)")


def stale_reasons(saved: Plan, fresh: Plan) -> list[str]:
    """What differs between the saved plan and one computed now: the reader's 'what changed'."""
    old = {c.id: c for c in saved.changes}
    new = {c.id: c for c in fresh.changes if c.host in saved.fingerprints}
    out = [f"{h}: observed state changed since the plan" for h in saved.fingerprints
           if fresh.fingerprints.get(h) not in (None, saved.fingerprints[h])]
    out += [f"  no longer needed: {cid}" for cid in old if cid not in new]
    out += [f"  newly needed: {cid} ({new[cid].reason})" for cid in new if cid not in old]
    out += [f"  different now: {cid} (was {old[cid].before!r}, now {new[cid].before!r})"
            for cid in new if cid in old and new[cid].before != old[cid].before
            and "before" not in owner(new[cid].action).volatile_fields]  # a move's gate answers: asked again
    return out[:30]


def _execute(options: ApplyOptions, prep: Prepared, plan: Plan, transport: Transport, token: str, who: str,
             reporter: Reporter, notify: list[Target]) -> ApplyOutcome:
    """Run the plan, journaled: the run is opened before the first step and closed whatever
    happens (an interrupted run says so, instead of looking as if it still ran).  Its start and
    its end are posted to the watch's targets (a post that fails never fails the apply)."""
    check_contents(plan, prep.desired, prep.secrets)
    changed = {c.host for c in plan.changes}
    touched = [h for h in prep.targets.hosts if h.name in changed]
    # Once per run: every step's record on its host names the same version of the desired state.
    prov = provenance.git_provenance(provenance.desired_paths(options.common.desired, options.common.hosts))
    commit, dirty = (prov.commit, prov.dirty) if prov else (None, None)
    with Journal.open(journal_path(options.common.state_dir)) as journal:
        run_id = journal.start_run(operator=who, plan_id=plan.plan_id, plan_hash=sha256_hex(plan.to_json()),
                                   desired_hash=plan.desired_hash, fleet=plan.fleet, lab=plan.lab, commit=commit,
                                   dirty=dirty)
        relabel_lock(transport, touched, holder_info(token, who, run_id=run_id, plan_id=plan.plan_id), reporter.note)
        recording = Recording(who=who, desired_hash=plan.desired_hash, fleet=plan.fleet, plan_id=plan.plan_id,
                              lab=plan.lab, commit=commit, dirty=dirty)
        _post(options, prep, journal, run_id, notify, reporter, finished=False)
        executor = Executor(plan, prep.desired, prep.targets.hosts, prep.secrets, transport, journal, run_id,
                            settle=options.settle, start_timeout=options.start_timeout, report=reporter.note,
                            forks=options.scope.forks, recording=recording, accept_queued=options.accept_queued,
                            command_grace=options.command_grace)
        outcome = "interrupted"
        try:
            result = executor.execute()
            outcome = "ok" if result.ok else "failed"
        finally:
            if outcome == "interrupted":
                journal.finish_run(run_id, outcome, "interrupted")
                _post(options, prep, journal, run_id, notify, reporter, finished=True)
        journal.finish_run(run_id, outcome, apply_summary(result))
        _post(options, prep, journal, run_id, notify, reporter, finished=True)
    return ApplyOutcome(plan, result, run_id)


def _post(options: ApplyOptions, prep: Prepared, journal: Journal, run_id: str, notify: list[Target],
          reporter: Reporter, *, finished: bool) -> None:
    """The run as the journal holds it, told as `fleet watch` would tell it (the same event id)."""
    record = journal.run(run_id)
    if record is None:
        return
    run = ApplyRun.of(record)
    event = apply_finished(run) if finished else apply_started(run)
    notify_apply(options.common, prep.desired, notify, event, reporter)
