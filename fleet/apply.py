"""Executing a plan: wave by wave, hosts in parallel, health-gated, halting at the first failure.

The I/O edge of the write path.  What to do is decided by the plan (and its graph); this module
only carries it out through a transport and writes down every step in the journal — the intent
before a step runs and its outcome after, so a crash mid-apply leaves "started, never finished"
visible.  A failed health gate halts the rollout: nothing new starts, what is in flight finishes,
the failed service on that host is put back to its previous unit/env content, dependents are
skipped.

With a `Recording`, each step is also written down on its host (fleet/history.py): the step
record travels with the step's FIRST remote command, appended before anything else runs in it
(so a change is never made without its record), and an outcome record follows once the step
has ended.  A record the host could not append stops the step before it changed anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleet import history, remote
from fleet.actions import Change
from fleet.errors import FleetError, TransportError
from fleet.model import Desired, Host, Service
from fleet.plan import Plan
from fleet.resources.registry import owner
from fleet.results import ApplyResult, StepOutcome
from fleet.textutil import sha256_hex
from fleet.transport.protocol import DEFAULT_MAX_SESSIONS, Transport, in_parallel

log = logging.getLogger(__name__)

MAX_WORKERS = 32
STEPS_PER_HOST = DEFAULT_MAX_SESSIONS  # a host's changes of a wave at once, as many as its connection carries


class JournalLike(Protocol):
    """What the executor needs of the journal (fleet.journal.Journal)."""

    def step_started(self, run_id: str, change: Change) -> int: ...
    def step_finished(self, step_id: int, outcome: str, error: str = "") -> None: ...
    def record_skipped(self, run_id: str, change: Change, reason: str) -> int: ...


@dataclass(frozen=True)
class Recording:
    """What every step's record on its host says about the run (fleet/history.py): who ran it,
    from which plan and which version of the desired state; and where the host keeps it."""

    who: str  # user@machine
    desired_hash: str
    fleet: str = ""
    plan_id: str = ""
    lab: bool = False
    commit: str | None = None  # git commit of the desired state (fleet/provenance.py); None: not in git
    dirty: bool | None = None
    state_dir: str = remote.STATE


OUTCOME_TIMEOUT = 60.0  # seconds the outcome record's append may take


class StaleInputError(FleetError):
    """The desired state or the secrets changed since the plan was computed."""


def check_contents(plan: Plan, desired: Desired, secrets: Mapping[tuple[str, str], str]) -> None:
    """Refuse to write anything other than what the plan showed: every unit text and env file
    content must hash to what the plan recorded (each resource checks its own)."""
    problems = [p for c in plan.changes if (p := owner(c.action).check_content(c, desired, secrets))]
    if problems:
        raise StaleInputError("the plan no longer matches what would be written:\n  " + "\n  ".join(problems),
                              hint="compute a new plan with `fleet plan -o FILE`, review it, and apply that")


# Seconds a remote command of a step may run past its own budget (the start timeout, settle
# period and health-check timeout it waits for) before fleet gives up on it and drops its
# connection: `fleet apply --command-grace` (docs/apply.md).
COMMAND_GRACE = 30.0


class Executor:
    def __init__(self, plan: Plan, desired: Desired, hosts: Sequence[Host], secrets: Mapping[tuple[str, str], str],
                 transport: Transport, journal: JournalLike, run_id: str, *, settle: float = 3.0,
                 start_timeout: float = 30.0, report: Callable[[str], None] = lambda s: None,
                 forks: int | None = None, recording: Recording | None = None,
                 accept_queued: int | None = None, command_grace: float = COMMAND_GRACE) -> None:
        self.plan, self.desired, self.secrets = plan, desired, secrets
        self.hosts = {h.name: h for h in hosts}
        self.transport, self.journal, self.run_id = transport, journal, run_id
        self.settle, self.start_timeout, self.command_grace = settle, start_timeout, command_grace
        self.accept_queued = accept_queued
        self.report = report
        self.forks = forks or MAX_WORKERS
        self.recording = recording
        self.halted: str = ""
        self._lock = threading.Lock()
        self.written: dict[str, list[str]] = {}  # host -> files written this run (for rollback)

    # ------------------------------------------------------------------ execution

    def execute(self) -> ApplyResult:
        result = ApplyResult(self.run_id)
        by_id = {c.id: c for c in self.plan.changes}
        for n, wave in enumerate(self.plan.waves, 1):
            changes = [by_id[cid] for cid in wave]
            if self.halted:
                for c in changes:
                    result.outcomes.append(self._skip(c))
                continue
            self.report(f"wave {n}/{len(self.plan.waves)}: {len(changes)} change(s)")
            per_host: dict[str, list[Change]] = {}
            for c in changes:
                per_host.setdefault(c.host, []).append(c)
            for outcomes in in_parallel(self._run_host, list(per_host.values()), self.forks):
                result.outcomes += outcomes
        return result

    def _skip(self, c: Change) -> StepOutcome:
        reason = f"not attempted: the rollout halted after {self.halted}"
        self.journal.record_skipped(self.run_id, c, reason)
        return StepOutcome(c, "skipped", reason)

    def _run_host(self, changes: list[Change]) -> list[StepOutcome]:
        """One host's changes of one wave: independent of each other (the graph put them in one
        wave), so they run at once, each on its own channel of the host's one connection — e.g.
        postgres and redis starting and passing their health gates side by side.

        They start together: the halt is checked once for the host, before any of them starts,
        never between siblings.  Checked per step, a sibling whose thread had not yet reached
        its check when another failed was skipped, and whether it was depended on thread timing
        (a CI failure: `{'failed', 'skipped'}` where all were sent at once)."""
        with self._lock:
            halted = self.halted
        if halted:
            return [self._skip(c) for c in changes]
        return in_parallel(self._run_change, changes, STEPS_PER_HOST)

    def _run_change(self, c: Change) -> StepOutcome:
        step = self.journal.step_started(self.run_id, c)
        log.debug("step %s: started", c.id)
        t0 = time.monotonic()
        outcome = StepOutcome(c, "ok")
        resource = owner(c.action)
        here = _Step(self, c.host, self._step_body(c))
        try:
            resource.execute(c, here)
        except TransportError as e:
            outcome.outcome, outcome.error = "failed", f"{e.kind}: {e.message}"
        except FleetError as e:
            outcome.outcome, outcome.error = "failed", e.message
        outcome.detail = here.detail
        outcome.duration = time.monotonic() - t0
        if outcome.outcome == "failed":
            with self._lock:
                if not self.halted:
                    self.halted = f"{c.action} {c.target} failed on {c.host}"  # "… halted after <this>"
            outcome.rollback = resource.rollback(c, here)
        error = outcome.error + (f"; {outcome.rollback}" if outcome.rollback else "")
        log.debug("step %s: %s after %.3fs%s", c.id, outcome.outcome, outcome.duration, f": {error}" if error else "")
        self.journal.step_finished(step, outcome.outcome, error)
        if here.record_sent:
            self._record_outcome(c, outcome.outcome, error)
        mark = "ok" if outcome.outcome == "ok" else "FAILED: " + outcome.error
        self.report(f"  {c.host}: {c.action} {c.target} — {mark} ({outcome.duration:.1f}s)")
        return outcome

    def _step_body(self, c: Change) -> str | None:
        """The step record to send with the step's first remote command; None: not recording."""
        r = self.recording
        if r is None:
            return None
        return history.step_body(c, run_id=self.run_id, who=r.who, desired_hash=r.desired_hash, started=time.time(),
                                 fleet=r.fleet, plan_id=r.plan_id, lab=r.lab, commit=r.commit, dirty=r.dirty)

    def _record_outcome(self, c: Change, outcome: str, error: str) -> None:
        """Append how the step ended to its host's history.  If that fails, the step record stays
        unanswered and later readers call the step interrupted: said now, never fatal."""
        assert self.recording is not None
        body = history.outcome_body(c, run_id=self.run_id, outcome=outcome, error=error, ended=time.time())
        command, stdin = history.append_command(body, state_dir=self.recording.state_dir)
        try:
            res = self.transport.run(self.hosts[c.host], command, stdin=stdin, timeout=OUTCOME_TIMEOUT)
            if b"@@ok" in res.stdout:
                return
            why = (res.stderr.decode("utf-8", "replace").strip().splitlines() or [res.exit_text])[-1]
        except TransportError as e:
            why = f"{e.kind}: {e.message}"
        self.report(f"  warning: {c.host}: the outcome of {c.action} {c.target} could not be recorded in its history "
                    f"({why}); `fleet log` will show that step as interrupted")


def without_history_lines(out: str) -> str:
    """A step command's output without the history append's own `@@history` line."""
    if "@@history" not in out:
        return out
    return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("@@history "))


class _Step:
    """What a resource carries out one change with (resources.base.Execution): the executor's
    transport to the change's host, its run's backups, and the declaration."""

    def __init__(self, executor: Executor, host: str, record: str | None = None) -> None:
        self._ex = executor
        self.host = executor.hosts[host]
        self._record = record  # the step record, until the first remote command carries it
        self.record_sent = False  # it went to the host (and may be there): its outcome must follow
        self.desired, self.secrets, self.run_id = executor.desired, executor.secrets, executor.run_id
        self.settle, self.start_timeout = executor.settle, executor.start_timeout
        self.command_grace = executor.command_grace
        self.accept_queued, self.plan_changes = executor.accept_queued, executor.plan.changes
        self.detail = ""

    def _carry_record(self, command: str, stdin: bytes | None) -> tuple[str, bytes | None]:
        if self._record is None:
            return command, stdin
        body, self._record = self._record, None
        self.record_sent = True
        assert self._ex.recording is not None
        return history.with_record(command, stdin, body, state_dir=self._ex.recording.state_dir)

    def run(self, command: str, *, stdin: bytes | None = None, timeout: float = 120) -> str:
        command, stdin = self._carry_record(command, stdin)
        res = self._ex.transport.run(self.host, command, stdin=stdin, timeout=timeout)
        if res.exit_code == history.APPEND_FAILED_EXIT and history.parse_appended(
                res.stdout.decode("utf-8", "replace")) is None:
            self.record_sent = False  # the snippet refused before appending: no record, nothing was run
        out = without_history_lines(res.stdout.decode("utf-8", "replace"))
        if "@@ok" not in out and "@@gate" not in out:
            err = res.stderr.decode("utf-8", "replace")
            lines = err.strip().splitlines() or out.strip().splitlines() or ["(no output)"]
            # systemctl's cause comes before its "See systemctl status …" line: keep a few lines
            tail = " / ".join(line.strip() for line in lines[-3:])
            raise FleetError(f"{res.exit_text}: {tail}")
        return out

    def run_on(self, host: str, command: str, *, timeout: float = 120) -> str:
        """`run` on another host of the plan, without the step record (it travels to the step's own host)."""
        other = self._ex.hosts.get(host)
        if other is None:
            raise FleetError(f"the step needs {host}, which this run does not cover")
        res = self._ex.transport.run(other, command, timeout=timeout)
        out = res.stdout.decode("utf-8", "replace")
        if "@@ok" not in out:
            lines = res.stderr.decode("utf-8", "replace").strip().splitlines() or out.strip().splitlines()
            raise FleetError(f"on {host}, {res.exit_text}: {' / '.join(line.strip() for line in lines[-3:])}"
                             if lines else f"on {host}, {res.exit_text}: (no output)")
        return out

    def run_unchecked(self, command: str, *, timeout: float) -> None:
        command, stdin = self._carry_record(command, None)
        self._ex.transport.run(self.host, command, stdin=stdin, timeout=timeout)

    def write(self, path: str, text: str, *, mode: str, owner: str | None, group: str | None,
              keep_keys: tuple[str, ...] = ()) -> None:
        data = text.encode("utf-8")
        self.run(remote.write_file(path, run_id=self.run_id, mode=mode, owner=owner, group=group,
                                   keep_keys=keep_keys, sha256=sha256_hex(data)), stdin=data)
        self.backed_up((path,))

    def backed_up(self, paths: Iterable[str]) -> None:
        with self._ex._lock:
            self._ex.written.setdefault(self.host.name, []).extend(paths)

    def written(self) -> list[str]:
        with self._ex._lock:
            return list(self._ex.written.get(self.host.name, []))

    def service(self, name: str | None) -> Service:
        svc = self.desired.service(name or "")
        if svc is None:
            raise FleetError(f"the plan names service {name!r}, which the desired state no longer declares")
        return svc
