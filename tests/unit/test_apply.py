"""The executor: waves, one step at a time per host, contents on stdin, health gates that halt
and roll back, all-or-nothing locks, the stale-input check, and what the journal holds after a
run, a failure and a crash.

The transport is fleet.transport.fake's scripted host: it records every command (with its
stdin, tagged with the change running on that host) and answers by the command's text; lock
commands alone run for real with `sh` in a per-host directory, so lock semantics are the
shell's, not the fake's.  The journal
is a real `Journal` on tmp_path, watched by a recorder that keeps the order of events across
threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import FleetDir
from observed import (
    EXAMPLE_SECRETS,
    bare,
    converged,
    edited,
    example,
    service,
    undeclared_sidekiq,
    with_drop_in,
    with_unit,
)

from fleet import apply as apply_module
from fleet import history, remote
from fleet.actions import Change
from fleet.apply import ApplyResult, Executor, StaleInputError, check_contents
from fleet.envfile import render_value
from fleet.errors import FleetError, TransportError
from fleet.graph import EVERY_RUN
from fleet.journal import Journal, StepRecord
from fleet.model import Desired, Host, HostResult
from fleet.plan import Plan, build_plan
from fleet.transport.fake import Call, FakeTransport
from fleet.transport.protocol import RunResult
from fleet.units import render_unit, unit_path
from fleet.workflows.lock import LockHolder, holder_info, lock_hosts, relabel_lock, unlock_hosts

S = EXAMPLE_SECRETS
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
ENV = "/home/mastodon/live/.env.production"
WEB = "mastodon-web.service"
STATE = "/FLEET-STATE"  # remote.STATE while these tests run; the fake maps it to a dir per host
OTHER_HOLDER = json.dumps({"token": "0ther0ther0ther0", "run_id": "20261128T140307-0ther1", "operator": "bob@desk",
                           "from": "build-box", "since": "2026-11-28T14:03:07Z", "plan_id": "feedbeef"}, sort_keys=True)


def plan_for(observed: Mapping[str, HostResult], desired: Desired | None = None,
             secrets: Mapping[tuple[str, str], str] = S) -> Plan:
    return build_plan(desired or example(), observed, secrets, now=NOW)


def bare_plan() -> Plan:
    return plan_for(bare(example()))


def web_edited_on_fritz_and_franz() -> Plan:
    """write-unit on both → daemon-reload on both → restart on fritz → restart on franz."""
    fleet = converged(example(), S)
    return plan_for(fleet | {h: edited(fleet[h], WEB) for h in ("fritz", "franz")})


# ------------------------------------------------------------------ the fakes


class Recorder:
    """The executor's journal: a real Journal, plus the order of start/end/skip events."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.events: list[tuple[str, str]] = []
        self.running: dict[str, set[str]] = {}  # host -> ids of its changes running now
        self.thread_step: dict[int, str] = {}  # thread -> the change it runs (a step runs in one thread)
        self._changes: dict[int, Change] = {}
        self._lock = threading.Lock()

    def step_started(self, run_id: str, change: Change) -> int:
        step = self.journal.step_started(run_id, change)
        with self._lock:
            self.events.append(("start", change.id))
            self.running.setdefault(change.host, set()).add(change.id)
            self.thread_step[threading.get_ident()] = change.id
            self._changes[step] = change
        return step

    def step_finished(self, step_id: int, outcome: str, error: str = "") -> None:
        with self._lock:
            change = self._changes[step_id]
            self.events.append(("end", change.id))
            self.running[change.host].discard(change.id)
            if not self.running[change.host]:
                del self.running[change.host]
            self.thread_step.pop(threading.get_ident(), None)
        self.journal.step_finished(step_id, outcome, error)

    def record_skipped(self, run_id: str, change: Change, reason: str) -> int:
        with self._lock:
            self.events.append(("skip", change.id))
        return self.journal.record_skipped(run_id, change, reason)

    def index(self, kind: str, change_id: str) -> int:
        return self.events.index((kind, change_id))


class Hosts(FakeTransport):
    """The hosts an apply talks to: commands answer `@@ok` and health gates `@@gate ok` unless a
    test says otherwise (`hook`, `gate`); lock commands run for real with sh in
    `<root>/<host>/state`.  Each call is tagged with the change its thread runs (`Call.tag`)."""

    def __init__(self, root: Path, recorder: Recorder) -> None:
        super().__init__(root=root, rewrite={STATE: "state"},
                         tag=lambda: recorder.thread_step.get(threading.get_ident()))
        self.execute(re.compile(re.escape(f"{STATE}/lock")))
        self.respond(re.compile(r"^u="), "@@gate ok\n")

    def hold(self, host: str, holder: str = OTHER_HOLDER) -> None:
        """Another apply holds `host`."""
        assert self.sh(host, remote.acquire_lock(holder)).stdout == b"@@locked\n"

    def holder(self, host: str) -> str | None:
        f = self.host_dir(host) / "state" / "lock" / "holder"
        return f.read_text().strip() if f.exists() else None


@dataclass
class Rig:
    fake: Hosts
    journal: Journal
    recorder: Recorder
    runs: list[str] = field(default_factory=list)

    def executor(self, plan: Plan, desired: Desired | None = None,
                 secrets: Mapping[tuple[str, str], str] = S, forks: int | None = None,
                 recording: apply_module.Recording | None = None,
                 command_grace: float = apply_module.COMMAND_GRACE) -> Executor:
        desired = desired or example()
        run_id = self.journal.start_run(operator="tester@ci", plan_id=plan.plan_id, plan_hash=plan.plan_id,
                                        desired_hash=plan.desired_hash, fleet=plan.fleet, lab=False)
        self.runs.append(run_id)
        return Executor(plan, desired, desired.hosts, secrets, self.fake, self.recorder, run_id, settle=0.1,
                        start_timeout=1, forks=forks, recording=recording, command_grace=command_grace)

    def steps(self, run_id: str) -> dict[str, StepRecord]:
        steps = self.journal.steps(run_id=run_id)
        assert len({s.change_id for s in steps}) == len(steps), "each change is recorded once"
        return {s.change_id: s for s in steps}


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setattr(remote, "STATE", STATE)
    monkeypatch.setattr(remote, "LOCK", f"{STATE}/lock")
    monkeypatch.setattr(remote, "BACKUPS", f"{STATE}/backup")
    journal = Journal.open(tmp_path / "journal.sqlite")
    recorder = Recorder(journal)
    yield Rig(Hosts(tmp_path / "hosts", recorder), journal, recorder)
    journal.close()


def outcomes(result: ApplyResult) -> dict[str, str]:
    return {o.change.id: o.outcome for o in result.outcomes}


def gate(rig: Rig, host: str, unit: str, answer: str) -> None:
    """What the health gate of `unit` on `host` prints."""
    rig.fake.respond(re.compile(rf"^u={re.escape(shlex.quote(unit))}\n"), answer, host=host)


def fail_gate(rig: Rig, host: str, unit: str, reason: str = "unit failed to start (failed/failed)") -> None:
    gate(rig, host, unit, f"@@gate fail {reason}\n| Nov 28 14:03:07 {host} puma[100]: boot failed\n"
                                    f"| Nov 28 14:03:08 {host} systemd[1]: {unit}: Failed\n")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """A hang guard, not a measurement: what it waits for takes milliseconds (the timeout is
    hundreds of times that), and the timeout only turns a missed event into a failure."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


# ------------------------------------------------------------------ order


def web_edited_and_a_sidekiq_to_prune() -> Plan:
    """web restarts on fritz and franz; an undeclared Sidekiq on franz is pruned after every
    (re)start of the plan (make-before-break: one dependency on the group of them all)."""
    fleet = converged(example(), S)
    observed = fleet | {h: edited(fleet[h], WEB) for h in ("fritz", "franz")}
    plan = plan_for(observed | {"franz": with_unit(observed["franz"], undeclared_sidekiq())})
    assert plan.deps[PRUNE] == (EVERY_RUN,) and len(plan.groups[EVERY_RUN]) == 2
    return plan


PRUNE = "franz:prune:mastodon-sidekiq.service"


@pytest.mark.parametrize("make", [bare_plan, web_edited_and_a_sidekiq_to_prune])
def test_every_change_starts_only_after_all_of_its_dependencies_finished(rig: Rig, make: Callable[[], Plan]) -> None:
    plan = make()
    rig.fake.delay = 0.002
    result = rig.executor(plan).execute()
    assert result.ok and set(outcomes(result).values()) == {"ok"}
    assert sorted(outcomes(result)) == sorted(c.id for c in plan.changes)
    for c in plan.changes:
        for dep in plan.waits_for(c.id):  # a group spelled out: every change of it
            assert rig.recorder.index("end", dep) < rig.recorder.index("start", c.id), f"{c.id} before {dep}"


def test_a_failed_restart_leaves_the_prune_that_waits_for_every_restart_unattempted(rig: Rig) -> None:
    plan = web_edited_and_a_sidekiq_to_prune()
    fail_gate(rig, "fritz", WEB)
    result = rig.executor(plan).execute()
    got = outcomes(result)
    assert got[f"fritz:restart:{WEB}"] == "failed" and got[PRUNE] == "skipped"
    assert not any(c.tag == PRUNE for c in rig.fake.calls), "the old Sidekiq is left running"


def test_a_wave_finishes_on_every_host_before_the_next_wave_starts(rig: Rig) -> None:
    plan = bare_plan()
    rig.fake.delay = 0.002
    rig.executor(plan).execute()
    for earlier, later in zip(plan.waves, plan.waves[1:], strict=False):
        last_end = max(rig.recorder.index("end", c) for c in earlier)
        first_start = min(rig.recorder.index("start", c) for c in later)
        assert last_end < first_start


def test_a_hosts_steps_of_one_wave_run_at_once_and_hosts_run_in_parallel(rig: Rig) -> None:
    plan = bare_plan()
    group = [c for c in plan.waves[0] if c.startswith(("fritz:", "nietzsche:"))]
    assert len([c for c in group if c.startswith("fritz:")]) > 1 and len(group) > 3  # what the test needs
    # Each of these steps waits at its first command until all of them are running: one after
    # the other (per host, or host by host) they would never meet and the barrier breaks.
    barrier = threading.Barrier(len(group), timeout=5)
    met: set[str] = set()
    lock = threading.Lock()

    def meet(call: Call) -> RunResult | None:
        with lock:
            first = call.tag in group and call.tag not in met
            met.add(call.tag or "")
        if first:
            barrier.wait()
        return None

    rig.fake.hook = meet
    assert rig.executor(plan).execute().ok
    wave_of = {cid: n for n, wave in enumerate(plan.waves) for cid in wave}
    ended: set[str] = set()
    for kind, cid in rig.recorder.events:  # and a wave starts only once the one before has ended
        if kind == "start":
            assert all(c in ended for c in plan.waves[wave_of[cid] - 1]) if wave_of[cid] else True, cid
        else:
            ended.add(cid)


def test_every_command_of_a_step_is_sent_while_that_step_runs(rig: Rig) -> None:
    plan = bare_plan()
    rig.executor(plan).execute()
    assert all(c.tag is not None and c.tag.startswith(c.host + ":") for c in rig.fake.calls)
    assert {c.tag for c in rig.fake.calls} == {c.id for c in plan.changes}


# ------------------------------------------------------------------ what is sent


def test_file_contents_go_on_stdin_and_a_secret_never_appears_in_any_command(rig: Rig) -> None:
    plan = bare_plan()
    rig.executor(plan).execute()
    env_writes = [c for c in rig.fake.calls if c.tag and ":write-env:" in c.tag]
    assert {c.host for c in env_writes} == {"franz", "freud", "fritz", "nietzsche"}
    for value in S.values():
        for call in rig.fake.calls:
            assert value not in call.command and render_value(value) not in call.command
            in_stdin = call.stdin is not None and render_value(value).encode() in call.stdin
            assert in_stdin == (call in env_writes), f"{value!r} in the stdin of {call.tag}"


def test_a_unit_file_is_written_from_its_rendered_text_as_root_0644(rig: Rig) -> None:
    rig.executor(bare_plan()).execute()
    web = service(example(), "web")
    [call] = [c for c in rig.fake.on("fritz") if c.tag == f"fritz:write-unit:{WEB}" and c.stdin is not None]
    assert call.stdin == render_unit(web).encode()
    assert call.command == remote.write_file(unit_path(WEB), mode="0644", owner="root", group="root",
                                             run_id=rig.runs[0], sha256=hashlib.sha256(call.stdin).hexdigest())


def test_an_env_file_is_written_with_its_declared_owner_group_and_mode(rig: Rig) -> None:
    rig.executor(bare_plan()).execute()
    [call] = [c for c in rig.fake.on("freud") if c.tag == f"freud:write-env:{ENV}"]
    assert call.stdin is not None
    assert call.command == remote.write_file(ENV, mode="0600", owner="mastodon", group="mastodon",
                                             run_id=rig.runs[0], sha256=hashlib.sha256(call.stdin).hexdigest())
    text = call.stdin.decode()
    assert "LOCAL_DOMAIN=hachyderm.io\n" in text and "S3_ENABLED=true\n" in text


def test_a_present_secret_is_never_sent_and_the_hosts_own_line_is_kept(rig: Rig, example: FleetDir) -> None:
    desired = example.edit('DB_PASS = "file"', 'DB_PASS = "present"').load().desired
    assert desired is not None
    plan = plan_for(bare(desired), desired)
    rig.executor(plan, desired).execute()
    [call] = [c for c in rig.fake.on("fritz") if c.tag == f"fritz:write-env:{ENV}"]
    assert call.stdin is not None and b"DB_PASS" not in call.stdin
    assert call.command == remote.write_file(ENV, mode="0600", owner="mastodon", group="mastodon",
                                             run_id=rig.runs[0], keep_keys=("DB_PASS",),
                                             sha256=hashlib.sha256(call.stdin).hexdigest())
    assert S[("mastodon", "DB_PASS")].encode() not in b"".join(c.stdin or b"" for c in rig.fake.calls)


def test_every_started_unit_is_health_gated_with_its_check_and_the_settle_time(rig: Rig) -> None:
    plan = bare_plan()
    rig.executor(plan).execute()
    gates = [c for c in rig.fake.calls if c.command.startswith("u=")]
    started = {c.id for c in plan.changes if c.action in ("start", "restart")}
    assert {c.tag for c in gates} == started
    [web_gate] = [c for c in gates if c.tag == f"fritz:start:{WEB}"]
    assert web_gate.command == remote.health_gate(WEB, service(example(), "web").health, settle=0.1,
                                                  start_timeout=1)


def test_a_start_and_its_gate_may_run_the_command_grace_past_their_own_budget(rig: Rig) -> None:
    plan = bare_plan()
    rig.executor(plan, command_grace=7).execute()
    web = [c for c in rig.fake.calls if c.tag == f"fritz:start:{WEB}"]
    [start] = [c for c in web if "systemctl start" in c.command]
    [gate] = [c for c in web if c.command.startswith("u=")]
    check = service(example(), "web").health
    assert check is not None and check.timeout > 0
    assert start.timeout == 1 + 7  # --start-timeout, then the grace
    assert gate.timeout == 1 + 0.1 + check.timeout + 7  # start timeout, settle, the check's timeout, the grace


def test_the_command_grace_is_30_seconds_unless_given() -> None:
    from fleet import cli
    from fleet.workflows.apply import ApplyOptions

    assert apply_module.COMMAND_GRACE == 30.0
    assert inspect.signature(Executor).parameters["command_grace"].default == 30.0
    assert {f.name: f.default for f in dataclasses.fields(ApplyOptions)}["command_grace"] == 30.0
    assert cli.build_parser().parse_args(["apply"]).command_grace == 30.0
    assert cli.build_parser().parse_args(["apply", "--command-grace", "5"]).command_grace == 5.0


# ------------------------------------------------------------------ the journal


def test_after_a_run_the_journal_has_every_step_with_an_outcome_and_no_secret(rig: Rig, tmp_path: Path) -> None:
    plan = bare_plan()
    ex = rig.executor(plan)
    ex.execute()
    steps = rig.steps(ex.run_id)
    assert sorted(steps) == sorted(c.id for c in plan.changes)
    assert {s.outcome for s in steps.values()} == {"ok"}
    assert rig.journal.unfinished() == []
    rig.journal.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("journal.sqlite*"))
    for value in S.values():
        assert value.encode() not in stored and render_value(value).encode() not in stored


def test_a_crash_during_a_step_leaves_it_visible_as_unfinished(rig: Rig) -> None:
    plan = bare_plan()
    crash_in = f"fritz:write-unit:{WEB}"

    def crash(call: Call) -> RunResult | None:
        if call.tag == crash_in:
            raise KeyboardInterrupt
        return None

    rig.fake.hook = crash
    ex = rig.executor(plan)
    with pytest.raises(KeyboardInterrupt):
        ex.execute()
    assert [s.change_id for s in rig.journal.unfinished()] == [crash_in]
    steps = rig.steps(ex.run_id)
    later = {c for wave in plan.waves[1:] for c in wave}
    assert not later & set(steps), "nothing after the crash's wave was started"


# ------------------------------------------------------------------ failures halt the rollout


def test_a_failed_gate_halts_the_rollout_and_every_later_wave_is_skipped(rig: Rig) -> None:
    plan = bare_plan()
    fail_gate(rig, "nietzsche", "postgresql.service")
    pg, redis = "nietzsche:start:postgresql.service", "nietzsche:start:redis-server.service"

    def fail_once_redis_runs(call: Call) -> RunResult | None:
        if call.tag == pg and call.command.startswith("u="):  # pg's gate fails with redis in flight
            wait_until(lambda: ("start", redis) in rig.recorder.events)
        return None

    rig.fake.hook = fail_once_redis_runs
    ex = rig.executor(plan)
    result = ex.execute()
    assert not result.ok
    got = outcomes(result)
    assert got[pg] == "failed"
    assert got[redis] == "ok", "in flight beside the failure on the same host: it finishes"
    assert {got[c] for c in plan.waves[-1]} == {"skipped"}
    assert {got[c] for wave in plan.waves[:3] for c in wave} == {"ok"}
    steps = rig.steps(ex.run_id)
    assert sorted(steps) == sorted(c.id for c in plan.changes)
    assert rig.journal.unfinished() == []
    assert all(steps[c].outcome == "skipped" for c in plan.waves[-1])
    assert steps[plan.waves[-1][0]].error == (
        "not attempted: the rollout halted after start postgresql.service failed on nietzsche")
    assert not any(c.tag in plan.waves[-1] for c in rig.fake.calls), "a skipped step sends nothing"


def test_a_failed_gate_fails_its_step_with_the_reason_the_journal_lines_and_the_rollback(rig: Rig) -> None:
    fail_gate(rig, "nietzsche", "postgresql.service", "unit restarted during the settle period (NRestarts 0 -> 1)")
    ex = rig.executor(bare_plan())
    [failed] = ex.execute().failed
    assert failed.error == "unit restarted during the settle period (NRestarts 0 -> 1)"
    assert failed.detail == ("Nov 28 14:03:07 nietzsche puma[100]: boot failed\n"
                             "Nov 28 14:03:08 nietzsche systemd[1]: postgresql.service: Failed")
    assert failed.rollback == ("rolled back postgresql.service on nietzsche: restored nothing written; "
                               "stopped it (it was not running before)")
    step = rig.steps(ex.run_id)["nietzsche:start:postgresql.service"]
    assert step.outcome == "failed"
    assert step.error == f"{failed.error}; {failed.rollback}"


def test_a_failed_start_is_rolled_back_by_stopping_the_unit_and_restoring_its_files(rig: Rig) -> None:
    fail_gate(rig, "fritz", WEB)
    ex = rig.executor(bare_plan())
    result = ex.execute()
    [failed] = result.failed
    assert failed.change.id == f"fritz:start:{WEB}"
    after_gate = [c.command for c in rig.fake.on("fritz") if c.tag == failed.change.id][2:]
    assert after_gate[0] == remote.systemctl("stop", WEB) + remote.reset_failed(WEB), \
        "stopped first (a crash-looping unit must not restart), and its failed state forgotten"
    assert sorted(after_gate[1:3]) == sorted([remote.restore_file(unit_path(WEB), run_id=ex.run_id),
                                              remote.restore_file(ENV, run_id=ex.run_id)])
    assert after_gate[3:] == [remote.systemctl("daemon-reload")], "no restart: it was not running before"
    assert failed.rollback.startswith(f"rolled back {WEB} on fritz: restored ")
    assert failed.rollback.endswith("; stopped it (it was not running before)")
    assert ENV in failed.rollback and unit_path(WEB) in failed.rollback


def test_a_failed_restart_is_rolled_back_by_restoring_the_unit_reloading_and_restarting_it(rig: Rig) -> None:
    plan = web_edited_on_fritz_and_franz()
    assert [len(w) for w in plan.waves] == [2, 2, 1, 1]
    fail_gate(rig, "fritz", WEB)
    ex = rig.executor(plan)
    result = ex.execute()
    assert outcomes(result) == {f"fritz:write-unit:{WEB}": "ok", f"franz:write-unit:{WEB}": "ok",
                                "fritz:daemon-reload:systemd": "ok", "franz:daemon-reload:systemd": "ok",
                                f"fritz:restart:{WEB}": "failed", f"franz:restart:{WEB}": "skipped"}
    after_gate = [c.command for c in rig.fake.on("fritz") if c.tag == f"fritz:restart:{WEB}"][2:]
    assert after_gate == [remote.restore_file(unit_path(WEB), run_id=ex.run_id), remote.systemctl("daemon-reload"),
                          remote.systemctl("restart", WEB)]
    assert result.failed[0].rollback == (f"rolled back {WEB} on fritz: restored {unit_path(WEB)}; restarted it")
    assert not any(c.host == "franz" and "restart" in c.command for c in rig.fake.calls)


def test_a_command_that_ends_without_an_exit_status_says_what_that_means(rig: Rig) -> None:
    # what a host shutting down does to a running command: its session ends, no exit status
    plan = web_edited_on_fritz_and_franz()

    def killed_on_franz(call: Call) -> RunResult | None:
        if call.host == "franz" and call.tag is not None:
            return call.reply(exit_code=-1)
        return None

    rig.fake.hook = killed_on_franz
    result = rig.executor(plan).execute()
    assert [o.error for o in result.failed] == [
        "no exit status: the command was killed by a signal or its SSH session ended (is franz shutting "
        "down, or was its sshd killed?): (no output)"]


def test_a_transport_error_fails_that_step_and_halts_the_rollout(rig: Rig) -> None:
    plan = web_edited_on_fritz_and_franz()

    def unreachable_franz(call: Call) -> RunResult | None:
        if call.host == "franz":
            raise TransportError("franz", "unreachable", "franz: connection refused")
        return None

    rig.fake.hook = unreachable_franz
    ex = rig.executor(plan)
    result = ex.execute()
    got = outcomes(result)
    assert got[f"franz:write-unit:{WEB}"] == "failed"
    assert [o.error for o in result.failed] == ["unreachable: franz: connection refused"]
    assert {got[c] for wave in plan.waves[1:] for c in wave} == {"skipped"}
    assert ex.halted == f"write-unit {WEB} failed on franz"
    assert rig.journal.unfinished() == []


def test_steps_in_flight_on_other_hosts_finish_when_one_host_fails(rig: Rig) -> None:
    plan = bare_plan()
    failed_now = threading.Event()

    def nietzsche_fails_while_others_write(call: Call) -> RunResult | None:
        if call.host == "nietzsche":
            wait_until(lambda: len(rig.recorder.running) == 4)
            failed_now.set()
            raise TransportError("nietzsche", "timeout", "nietzsche: no answer within 120s")
        failed_now.wait(5)
        time.sleep(0.05)  # still in flight when the failure is recorded
        return None

    rig.fake.hook = nietzsche_fails_while_others_write
    result = rig.executor(plan).execute()
    got = outcomes(result)
    started = {cid for kind, cid in rig.recorder.events if kind == "start"}
    others = [c for c in plan.waves[0] if not c.startswith("nietzsche:")]
    assert {got[c] for c in others if c in started} == {"ok"}, "in-flight steps finish"
    assert {got[c] for c in others if c not in started} <= {"skipped"}
    assert {o.change.host for o in result.failed} == {"nietzsche"}
    assert {got[c] for wave in plan.waves[1:] for c in wave} == {"skipped"}


def test_hosts_not_yet_started_in_a_wave_are_not_attempted_after_a_failure(rig: Rig) -> None:
    plan = bare_plan()
    first_host: list[str] = []

    def the_first_host_fails(call: Call) -> RunResult | None:
        if call.tag is not None:
            if not first_host:
                first_host.append(call.host)
            if call.host == first_host[0]:
                raise TransportError(call.host, "unreachable", f"{call.host}: connection refused")
        return None

    rig.fake.hook = the_first_host_fails
    result = rig.executor(plan, forks=1).execute()  # one host at a time
    got = outcomes(result)
    failing = first_host[0]
    assert {got[c] for c in plan.waves[0] if c.startswith(failing + ":")} == {"failed"}
    assert {got[c] for c in plan.waves[0] if not c.startswith(failing + ":")} == {"skipped"}, "nothing new starts"
    assert not any(c.tag is not None and c.host != failing for c in rig.fake.calls)


def test_a_hosts_steps_of_one_wave_start_together_so_a_failing_sibling_never_skips_another(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    # One step at a time per host makes the order of siblings deterministic: the first one fails
    # before the second is picked up.  The second was sent with the first, so it runs (and here
    # fails too, being on the same unreachable host); it is never `skipped` by its sibling's
    # failure.  With the halt checked per step this was {'failed', 'skipped'}: the CI failure of
    # issue 12, which with 8 threads per host depended on which thread ran first.
    monkeypatch.setattr(apply_module, "STEPS_PER_HOST", 1)
    plan = bare_plan()
    fritz_first_wave = [c for c in plan.waves[0] if c.startswith("fritz:")]
    assert len(fritz_first_wave) > 1  # what the test needs

    def fritz_is_down(call: Call) -> RunResult | None:
        if call.host == "fritz" and call.tag is not None:
            raise TransportError("fritz", "unreachable", "fritz: connection refused")
        return None

    rig.fake.hook = fritz_is_down
    got = outcomes(rig.executor(plan, forks=1).execute())
    assert {got[c] for c in fritz_first_wave} == {"failed"}
    attempted = {c.tag for c in rig.fake.calls if c.tag is not None}
    assert set(fritz_first_wave) <= attempted


def test_siblings_of_a_failing_step_on_a_healthy_host_still_run_to_their_end(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apply_module, "STEPS_PER_HOST", 1)
    plan = bare_plan()
    fritz_first_wave = [c for c in plan.waves[0] if c.startswith("fritz:")]
    failing = fritz_first_wave[0]

    def only_the_first_fails(call: Call) -> RunResult | None:
        if call.tag == failing:
            return call.reply(stderr=b"mktemp: No space left on device\n", exit_code=1)
        return None

    rig.fake.hook = only_the_first_fails
    got = outcomes(rig.executor(plan, forks=1).execute())
    assert got[failing] == "failed"
    assert {got[c] for c in fritz_first_wave[1:]} == {"ok"}
    assert {got[c] for wave in plan.waves[1:] for c in wave} == {"skipped"}


def test_a_rollback_that_cannot_reach_the_host_says_so(rig: Rig) -> None:
    fail_gate(rig, "fritz", WEB)

    def gone_after_the_gate(call: Call) -> RunResult | None:
        if call.host == "fritz" and any(c.command.startswith("u=") for c in rig.fake.on("fritz")):
            if not call.command.startswith("u="):
                raise TransportError("fritz", "unreachable", "fritz: connection reset")
        return None

    rig.fake.hook = gone_after_the_gate
    ex = rig.executor(web_edited_on_fritz_and_franz())
    [failed] = ex.execute().failed
    assert failed.rollback == "rollback on fritz failed: fritz: connection reset"
    assert rig.steps(ex.run_id)[f"fritz:restart:{WEB}"].error == (
        "unit failed to start (failed/failed); rollback on fritz failed: fritz: connection reset")


def test_a_command_that_does_not_confirm_with_ok_fails_its_step_with_its_last_error_lines(rig: Rig) -> None:
    def refuse(call: Call) -> RunResult | None:
        if call.host == "fritz" and "mktemp" in call.command:
            return call.reply(stderr=b"mkdir: cannot create directory\nmktemp: Read-only file system\n", exit_code=1)
        return None

    rig.fake.hook = refuse
    result = rig.executor(web_edited_on_fritz_and_franz()).execute()
    [failed] = result.failed
    assert failed.change.id == f"fritz:write-unit:{WEB}"
    assert failed.error == "exit 1: mkdir: cannot create directory / mktemp: Read-only file system"


def test_a_failed_restart_after_removing_a_drop_in_restores_the_drop_in_too(rig: Rig) -> None:
    fleet = converged(example(), S)
    plan = plan_for(fleet | {"fritz": with_drop_in(fleet["fritz"], WEB)})
    [write] = [c for c in plan.changes if c.action == "write-unit"]
    [drop_in] = write.payload.remove_files
    fail_gate(rig, "fritz", WEB)
    ex = rig.executor(plan)
    ex.execute()
    rollback = [c.command for c in rig.fake.on("fritz") if c.tag == f"fritz:restart:{WEB}"][2:]
    assert remote.restore_file(drop_in, run_id=ex.run_id) in rollback


def test_a_failed_gate_is_not_taken_for_a_pass_when_the_units_journal_mentions_gate_ok(rig: Rig) -> None:
    gate(rig, "fritz", WEB, "@@gate fail unit failed to start (failed/failed)\n| echo '@@gate ok'\n")
    result = rig.executor(web_edited_on_fritz_and_franz()).execute()
    assert outcomes(result)[f"fritz:restart:{WEB}"] == "failed"


# ------------------------------------------------------------------ locks


def hosts(*names: str) -> list[Host]:
    desired = example()
    return [h for h in desired.hosts if h.name in names] if names else list(desired.hosts)


def test_lock_hosts_takes_every_host_and_unlock_hosts_releases_them(rig: Rig) -> None:
    lock_hosts(rig.fake, hosts(), holder_info("0123456789abcdef", "tester@ci"))
    for h in hosts():
        holder = json.loads(rig.fake.holder(h.name) or "{}")
        assert (holder["token"], holder["operator"]) == ("0123456789abcdef", "tester@ci")
    unlock_hosts(rig.fake, hosts(), "0123456789abcdef")
    assert all(rig.fake.holder(h.name) is None for h in hosts())


def test_lock_refused_by_one_held_host_names_the_holder_and_releases_the_hosts_already_locked(rig: Rig) -> None:
    rig.fake.hold("nietzsche")
    with pytest.raises(FleetError) as e:
        lock_hosts(rig.fake, hosts(), holder_info("0123456789abcdef", "tester@ci"))
    assert "nothing was changed" in e.value.message
    assert ("nietzsche: locked by another apply: bob@desk from build-box since 2026-11-28T14:03:07Z "
            "(run 20261128T140307-0ther1, plan feedbeef)") in e.value.message
    assert all(rig.fake.holder(h) is None for h in ("franz", "freud", "fritz")), "all or nothing"
    assert rig.fake.holder("nietzsche") == OTHER_HOLDER, "the other apply keeps its lock"


def test_lock_on_an_unreachable_host_locks_nothing(rig: Rig) -> None:
    def freud_down(call: Call) -> RunResult | None:
        if call.host == "freud":
            raise TransportError("freud", "unreachable", "freud: no route to host")
        return None

    rig.fake.hook = freud_down
    with pytest.raises(FleetError, match=r"freud: cannot take the lock \(unreachable\): freud: no route to host"):
        lock_hosts(rig.fake, hosts("franz", "freud", "fritz"), holder_info("0123456789abcdef", "tester@ci"))
    assert rig.fake.holder("franz") is None and rig.fake.holder("fritz") is None


def test_unlock_hosts_releases_only_the_lock_its_token_took(rig: Rig) -> None:
    rig.fake.hold("fritz")
    lock_hosts(rig.fake, hosts("franz"), holder_info("0123456789abcdef", "tester@ci"))
    unlock_hosts(rig.fake, hosts("franz", "fritz"), "0123456789abcdef")
    assert rig.fake.holder("franz") is None
    assert rig.fake.holder("fritz") == OTHER_HOLDER


def test_unlock_hosts_that_cannot_reach_a_host_reports_it_and_carries_on(rig: Rig) -> None:
    lock_hosts(rig.fake, hosts("franz", "fritz"), holder_info("0123456789abcdef", "tester@ci"))
    reports: list[str] = []

    def franz_down(call: Call) -> RunResult | None:
        if call.host == "franz":
            raise TransportError("franz", "unreachable", "franz: connection refused")
        return None

    rig.fake.hook = franz_down
    unlock_hosts(rig.fake, hosts("franz", "fritz"), "0123456789abcdef", reports.append)
    assert len(reports) == 1
    assert reports[0].startswith("warning: could not release the lock on franz: franz: connection refused")
    assert "fleet lock break --limit franz" in reports[0]
    assert rig.fake.holder("fritz") is None


def test_relabel_lock_names_the_run_and_plan_in_the_lock_this_apply_holds(rig: Rig) -> None:
    rig.fake.hold("fritz")
    lock_hosts(rig.fake, hosts("franz"), holder_info("0123456789abcdef", "tester@ci"))
    relabel_lock(rig.fake, hosts("franz", "fritz"),
                 holder_info("0123456789abcdef", "tester@ci", run_id="20261128T140307-a1b2c3", plan_id="abc"))
    mine = json.loads(rig.fake.holder("franz") or "{}")
    assert (mine["token"], mine["run_id"], mine["plan_id"]) == ("0123456789abcdef", "20261128T140307-a1b2c3", "abc")
    assert rig.fake.holder("fritz") == OTHER_HOLDER


def test_relabel_lock_carries_on_past_an_unreachable_host(rig: Rig) -> None:
    lock_hosts(rig.fake, hosts("franz", "fritz"), holder_info("0123456789abcdef", "tester@ci"))

    def franz_down(call: Call) -> RunResult | None:
        if call.host == "franz":
            raise TransportError("franz", "unreachable", "franz: connection refused")
        return None

    rig.fake.hook = franz_down
    reports: list[str] = []
    relabel_lock(rig.fake, hosts("franz", "fritz"), holder_info("0123456789abcdef", "tester@ci", run_id="r-2"),
                 reports.append)
    assert json.loads(rig.fake.holder("fritz") or "{}")["run_id"] == "r-2"
    assert reports == ["warning: could not record this run in the lock on franz (unreachable): "
                       "franz: connection refused"]


def test_a_lock_holder_is_described_as_who_from_where_since_when_and_which_run() -> None:
    assert LockHolder.parse(OTHER_HOLDER).describe() == ("bob@desk from build-box since 2026-11-28T14:03:07Z "
                                                         "(run 20261128T140307-0ther1, plan feedbeef)")
    assert LockHolder.parse("not json at all").describe() == "not json at all"


def test_describing_a_lock_holder_file_that_is_json_but_not_an_object_does_not_raise() -> None:
    assert "42" in LockHolder.parse("42").describe()


# ------------------------------------------------------------------ check_contents


def test_check_contents_accepts_the_inputs_the_plan_was_computed_from_and_no_other_content() -> None:
    plan = bare_plan()
    writes = [c for c in plan.changes if c.action in ("write-unit", "write-env")]
    assert {c.action for c in writes} == {"write-unit", "write-env"}
    check_contents(plan, example(), S)  # the plan's own inputs: accepted
    for c in writes:  # each content the plan recorded is checked: one hash off, and it is refused
        edited = dataclasses.replace(c, payload=dataclasses.replace(c.payload, content_hash="0" * 64))
        tampered = dataclasses.replace(plan, changes=tuple(edited if x is c else x for x in plan.changes))
        with pytest.raises(StaleInputError, match=f"{c.host}: .*{re.escape(c.target)} would differ from the plan"):
            check_contents(tampered, example(), S)


def test_check_contents_refuses_when_a_units_rendered_text_differs_from_the_plan() -> None:
    desired = example()
    web = service(desired, "web")
    assert web.unit_spec is not None
    changed = dataclasses.replace(web, unit_spec=dataclasses.replace(web.unit_spec, description="puma, renamed"))
    desired = dataclasses.replace(desired, services=tuple(changed if s.name == "web" else s
                                                          for s in desired.services))
    with pytest.raises(StaleInputError) as e:
        check_contents(bare_plan(), desired, S)
    assert f"fritz: the unit {WEB} would differ from the plan" in e.value.message
    assert f"franz: the unit {WEB} would differ from the plan" in e.value.message
    assert "mastodon-streaming" not in e.value.message
    assert "fleet plan -o FILE" in e.value.hint


def test_check_contents_refuses_when_an_env_secret_differs_from_the_plan_without_showing_it() -> None:
    secrets = dict(S)
    secrets[("mastodon", "DB_PASS")] = "a-new-db-pass"
    with pytest.raises(StaleInputError) as e:
        check_contents(bare_plan(), example(), secrets)
    assert f"fritz: {ENV} would differ from the plan" in e.value.message
    assert "a-new-db-pass" not in str(e.value) and S[("mastodon", "DB_PASS")] not in str(e.value)


def test_check_contents_refuses_when_a_secret_is_no_longer_available() -> None:
    secrets = {k: v for k, v in S.items() if k != ("mastodon", "SMTP_PASSWORD")}
    with pytest.raises(StaleInputError, match="would differ from the plan"):
        check_contents(bare_plan(), example(), secrets)


def test_check_contents_refuses_when_the_service_is_no_longer_declared() -> None:
    desired = example()
    desired = dataclasses.replace(desired, services=tuple(s for s in desired.services if s.name != "streaming"))
    with pytest.raises(StaleInputError, match="fritz: the unit mastodon-streaming.service would differ"):
        check_contents(bare_plan(), desired, S)


@pytest.mark.parametrize("action", ["relabel", "unlock"])
def test_relabel_and_unlock_reach_the_hosts_in_parallel(rig: Rig, action: str) -> None:
    holder = holder_info("0123456789abcdef", "tester@ci")
    lock_hosts(rig.fake, hosts(), holder)
    barrier = threading.Barrier(len(hosts()), timeout=5)  # host by host, the first would wait alone

    def meet(call: Call) -> RunResult | None:
        barrier.wait()
        return None

    rig.fake.hook = meet
    if action == "relabel":
        relabel_lock(rig.fake, hosts(), holder_info("0123456789abcdef", "tester@ci", run_id="r1"))
    else:
        unlock_hosts(rig.fake, hosts(), "0123456789abcdef")
    rig.fake.hook = lambda call: None
    assert all((rig.fake.holder(h.name) is None) == (action == "unlock") for h in hosts())
    if action == "relabel":
        assert all('"run_id": "r1"' in (rig.fake.holder(h.name) or "") for h in hosts())


def test_a_lock_held_by_a_gone_process_on_this_machine_is_called_stale() -> None:
    holder = holder_info("0123456789abcdef", "ops@vm")  # this machine, this pid
    gone = json.dumps({**json.loads(holder), "pid": 4242})
    assert LockHolder.parse(gone).stale_note(alive=lambda pid: pid != 4242) == (
        "; its process 4242 on this machine is gone: the lock is stale")
    assert LockHolder.parse(holder).stale_note() == "", "this very process runs"
    assert LockHolder.parse(gone).stale_note(alive=lambda pid: True) == ""
    elsewhere = json.dumps({**json.loads(gone), "from": "another-machine.example"})
    assert LockHolder.parse(elsewhere).stale_note(alive=lambda pid: False) == "", (
        "a holder elsewhere cannot be judged from here")
    assert LockHolder.parse("not json").stale_note(alive=lambda pid: False) == ""
    assert LockHolder.parse(json.dumps({**json.loads(gone), "pid": "4242"})).stale_note(alive=lambda pid: False) == ""


def test_the_refusal_of_a_lock_says_when_its_holder_is_gone(rig: Rig) -> None:
    stale = holder_info("feedfeedfeedfeed", "ops@vm")
    with subprocess.Popen(["true"]) as p:
        p.wait()
    stale = json.dumps({**json.loads(stale), "pid": p.pid})  # a process that has exited
    rig.fake.hold("franz", stale)
    with pytest.raises(FleetError) as e:
        lock_hosts(rig.fake, hosts(), holder_info("0123456789abcdef", "tester@ci"))
    assert f"franz: locked by another apply: ops@vm from {socket.gethostname()} (pid {p.pid})" in e.value.message
    assert f"its process {p.pid} on this machine is gone: the lock is stale" in e.value.message


# ------------------------------------------------------------------ the record each step leaves on its host

COMMIT = "3f2a9c1d0b7e4a55" + "0" * 24
SNIPPET = history.append_snippet(state_dir=STATE)


def recording() -> apply_module.Recording:
    return apply_module.Recording(who="alice@laptop", desired_hash="dh", fleet="hachyderm", plan_id="p1",
                                  commit=COMMIT, dirty=True, state_dir=STATE)


def record_for_real(rig: Rig, hosts: Mapping[str, Host]) -> None:
    """Every command carrying a history record: its append runs for real with sh in the host's
    directory (with the record line of its stdin), the step command after it as the rig answers
    it (with the rest of the stdin) — so the file on the "host" is what a real host would hold."""

    def hook(call: Call) -> RunResult | None:
        if not call.command.startswith(SNIPPET):
            return None
        assert call.stdin is not None
        record, _, rest_stdin = call.stdin.partition(b"\n")
        appended = rig.fake.sh(call.host, SNIPPET, record + b"\n")
        if appended.exit_code != 0:
            return call.reply(appended.stdout, appended.stderr, appended.exit_code)
        rest = rig.fake.run(hosts[call.host], call.command[len(SNIPPET):], stdin=rest_stdin or None)
        return call.reply(appended.stdout + rest.stdout, appended.stderr + rest.stderr, rest.exit_code)

    rig.fake.hook = hook


def host_history(rig: Rig, host: str) -> list[history.HistoryRecord]:
    f = rig.fake.host_dir(host) / "state" / history.HISTORY_FILE
    lines, complete = history.split_lines(f.read_text() if f.exists() else "")
    records, breaks = history.verify(lines, host=host, complete=complete)
    assert breaks == [], breaks
    return records


def test_every_step_leaves_its_record_then_its_outcome_on_its_host_in_one_chain(rig: Rig) -> None:
    plan = bare_plan()
    desired = example()
    record_for_real(rig, {h.name: h for h in desired.hosts})
    result = rig.executor(plan, recording=recording()).execute()
    assert result.ok
    run_id = rig.runs[-1]
    for host in {c.host for c in plan.changes}:
        records = host_history(rig, host)
        steps = [r for r in records if r.kind == "step"]
        done = {r.change_id: r for r in records if r.kind == "outcome"}
        assert sorted(r.change_id for r in steps) == sorted(c.id for c in plan.changes if c.host == host)
        assert len(records) == 2 * len(steps), "one step record and one outcome record per step, nothing twice"
        for r in steps:
            assert (r.run_id, r.who, r.commit, r.dirty, r.plan_id, r.fleet) == (
                run_id, "alice@laptop", COMMIT, True, "p1", "hachyderm")
            assert done[r.change_id].outcome == "ok"
            assert r.seq < done[r.change_id].seq  # the intent before how it ended


def test_a_write_still_gets_its_content_on_stdin_after_the_record(rig: Rig) -> None:
    plan = bare_plan()
    desired = example()
    record_for_real(rig, {h.name: h for h in desired.hosts})
    rig.executor(plan, recording=recording()).execute()
    carried = [c for c in rig.fake.calls if c.command.startswith(SNIPPET) and c.tag and ":write-env:" in c.tag]
    inner = [c for c in rig.fake.calls if not c.command.startswith(SNIPPET) and c.tag and ":write-env:" in c.tag
             and c.stdin]
    assert carried and len(inner) == len(carried)
    for outer, own in zip(carried, inner, strict=True):
        assert outer.stdin is not None and own.stdin is not None
        line, _, rest = outer.stdin.partition(b"\n")
        assert line.startswith(b'{"') and rest == own.stdin  # the step's own stdin, untouched


def test_a_failed_step_records_its_failure_and_a_skipped_step_leaves_no_record(rig: Rig) -> None:
    plan = bare_plan()
    desired = example()
    fail_gate(rig, "nietzsche", "postgresql.service")
    record_for_real(rig, {h.name: h for h in desired.hosts})
    result = rig.executor(plan, recording=recording()).execute()
    skipped = {o.change.id for o in result.outcomes if o.outcome == "skipped"}
    assert skipped and not result.ok
    recorded = {r.change_id: r for h in {c.host for c in plan.changes} for r in host_history(rig, h)
                if r.kind == "outcome"}
    assert not skipped & set(recorded)
    (failed,) = [r for r in recorded.values() if r.outcome == "failed"]
    assert "postgresql.service" in failed.target and "unit failed to start" in failed.error
    assert "@@history" not in failed.error


def test_a_step_whose_record_cannot_be_appended_does_nothing_and_fails_saying_so(rig: Rig) -> None:
    plan = bare_plan()
    desired = example()
    record_for_real(rig, {h.name: h for h in desired.hosts})
    state = rig.fake.host_dir("franz") / "state"
    state.mkdir(parents=True)
    (state / history.HISTORY_FILE).mkdir()  # the host cannot append to its history file
    result = rig.executor(plan, recording=recording()).execute()
    failed = [o for o in result.outcomes if o.outcome == "failed"]
    assert failed and {o.change.host for o in failed} == {"franz"}
    assert all("the step could not be recorded" in o.error and "@@history" not in o.error for o in failed)
    failed_ids = {o.change.id for o in failed}
    inner = [c for c in rig.fake.on("franz") if not c.command.startswith(SNIPPET) and "lock" not in c.command]
    carried = [c for c in rig.fake.on("franz") if c.command.startswith(SNIPPET)]
    # Only rollback commands ran after a refused record, never a step command of its own, and
    # no outcome record was sent for a step whose record is not there.
    assert all(c.tag in failed_ids for c in inner)
    assert sorted(c.tag or "" for c in carried) == sorted(failed_ids)
    assert not any(c.stdin and b'"kind":"outcome"' in c.stdin.partition(b"\n")[0] for c in carried)


def test_an_outcome_that_cannot_be_recorded_is_a_warning_and_the_step_keeps_its_outcome(rig: Rig) -> None:
    plan = bare_plan()
    desired = example()
    record_for_real(rig, {h.name: h for h in desired.hosts})
    inner = rig.fake.hook
    assert inner is not None

    def outcome_unreachable(call: Call) -> RunResult | None:
        if call.host == "fritz" and call.stdin and b'"kind":"outcome"' in call.stdin.partition(b"\n")[0]:
            raise TransportError("fritz", "unreachable", "fritz: connection reset")
        return inner(call)

    rig.fake.hook = outcome_unreachable
    said: list[str] = []
    executor = rig.executor(plan, recording=recording())
    executor.report = said.append
    assert executor.execute().ok
    warnings = [s for s in said if "could not be recorded in its history" in s]
    assert warnings and all("fritz" in w and "interrupted" in w for w in warnings)
    assert all(r.kind == "step" for r in host_history(rig, "fritz"))


def test_without_a_recording_no_command_carries_a_record(rig: Rig) -> None:
    rig.executor(bare_plan()).execute()
    assert not any(c.command.startswith(SNIPPET) or "history" in c.command for c in rig.fake.calls)
