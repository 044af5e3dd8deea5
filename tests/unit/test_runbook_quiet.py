"""Sidekiq quieted and drained in a declared move's runbook (fleet/resources/runbook_quiet.py): the
steps' place in the plan, what `fleet plan` shows under them, the gates judged on what Sidekiq's
Redis says, the halt that restarts every quieted unit, --accept-queued, and the restart of a
quieted unit the plan would not restart.  Hosts are FakeTransport's (test_runbook's rig)."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
from conftest import FleetDir
from observed import EXAMPLE_SECRETS as S
from test_apply import Rig, outcomes
from test_runbook import SIDEKIQ, answer, env_writes, healthy_move, postgres_moving, rig, sent, sidekiq_answers

from fleet.actions import Action, Change, QuietPayload
from fleet.cli import EXIT_USAGE, main
from fleet.errors import FleetError
from fleet.model import Desired, HostResult, HostState
from fleet.output.text import plan_text
from fleet.plan import PlanFileError, build_plan, plan_from_json
from fleet.resources import runbook, runbook_quiet
from fleet.resources.runbook_quiet import Quieted, judge_drained, judge_quiet
from fleet.sidekiq import SECTION, QueueState, SidekiqProcess, SidekiqView
from fleet.textutil import accept_queued_option

__all__ = ["rig"]  # the fixture, from test_runbook

QUIETED = [("freud", "mastodon-sidekiq-default.service"), ("freud", "mastodon-sidekiq-push-pull.service"),
           ("nietzsche", "mastodon-sidekiq-push-pull.service"), ("nietzsche", "mastodon-sidekiq-scheduler.service")]
QUIET_ID = "freud:move-quiet:sidekiq"
DRAINED_ID = "freud:move-drained:sidekiq"


def with_view(observed: dict[str, HostResult], view: SidekiqView) -> dict[str, HostResult]:
    """`observed` with Sidekiq's view read on freud (the example's Redis host while postgres moves)."""
    state = observed["freud"]
    assert isinstance(state, HostState)
    return dict(observed, freud=dataclasses.replace(state, extra=(*state.extra, (SECTION, view))))


def process(host: str, pid: int, *, quiet: bool = False, busy: int = 0) -> SidekiqProcess:
    return SidekiqProcess(identity=f"{host}:{pid}:0a1b", hostname=host, pid=pid, tag="live", concurrency=5,
                          queues=(("default", 0),), labels=(), started_at=0.0, version="7.3.9", busy=busy, beat=0.0,
                          quiet=quiet, rss=1, rtt_us=1)


# ------------------------------------------------------------------ the plan


def test_the_move_quiets_every_running_sidekiq_unit_of_the_run_after_the_check_and_before_read_only(
        example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    plan = build_plan(desired, observed, S)
    quiet, drained = plan.change(QUIET_ID), plan.change(DRAINED_ID)
    # One change for the whole run, on the Sidekiq Redis host, each in a wave of its own.
    assert quiet.payload == drained.payload == QuietPayload(tuple(QUIETED), "/home/mastodon/live/.env.production")
    assert [plan.waves.index((cid,)) for cid in (QUIET_ID, DRAINED_ID)] == [1, 2]
    assert plan.deps[QUIET_ID] == ("nietzsche:move-check:postgres:5432",)
    assert plan.deps["freud:move-read-only:postgresql@15-main.service"] == (DRAINED_ID,)
    # Every quieted unit is restarted by the plan itself (DB_HOST changes in its env file) after the promote.
    at = {cid: i for i, wave in enumerate(plan.waves) for cid in wave}
    for host, unit in QUIETED:
        assert at[f"{host}:restart:{unit}"] > at["nietzsche:move-promote:postgres:5432"]


def test_a_quieted_unit_the_plan_does_not_restart_gets_a_restart_of_its_own_before_the_old_server_stops(
        example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    move = desired.move("postgres")
    assert move is not None
    scope = {h.name for h in desired.hosts}
    book = runbook.steps(desired, move, observed, scope)
    plan_restarts = [Change("freud", Action.RESTART, "mastodon-sidekiq-default.service", "env", "sidekiq-default")]
    around = runbook_quiet.around(book, desired, move, observed, scope, plan_restarts)
    assert [c.action for c in around] == [*runbook.BEFORE, Action.RESTART, Action.RESTART, Action.RESTART,
                                          Action.MOVE_STOP_SOURCE]
    resumes = [c for c in around if c.action == Action.RESTART]
    assert [(c.host, c.target, c.service) for c in resumes] == [
        ("freud", "mastodon-sidekiq-push-pull.service", "sidekiq-push-pull"),
        ("nietzsche", "mastodon-sidekiq-push-pull.service", "sidekiq-push-pull"),
        ("nietzsche", "mastodon-sidekiq-scheduler.service", "sidekiq-scheduler")]
    assert resumes[0].before.startswith("active/running")
    changes, deps, waves, _ = runbook.wrap(around, plan_restarts, {plan_restarts[0].id: ()}, [(plan_restarts[0].id,)])
    stop = around[-1].id
    assert waves[-2:] == (tuple(c.id for c in resumes), (stop,))  # after the plan's own waves, before the stop
    assert set(deps[stop]) == {plan_restarts[0].id, *(c.id for c in resumes)}


def test_a_run_without_a_running_sidekiq_unit_quiets_nothing(example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    stopped: dict[str, HostResult] = {}
    for host, state in observed.items():
        assert isinstance(state, HostState)
        units = tuple(dataclasses.replace(u, active_state="inactive", sub_state="dead")
                      if "sidekiq" in u.unit else u for u in state.units)
        stopped[host] = dataclasses.replace(state, units=units)
    assert runbook_quiet.to_quiet(desired, stopped, {h.name for h in desired.hosts}) == []
    move = desired.move("postgres")
    assert move is not None
    book = runbook.steps(desired, move, stopped, {h.name for h in desired.hosts})
    assert runbook_quiet.around(book, desired, move, stopped, {"freud", "nietzsche"}, []) == book


def test_a_move_whose_sidekiq_redis_host_is_left_out_of_the_run_is_refused(example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    move = desired.move("postgres")
    assert move is not None
    book = runbook.steps(desired, move, observed, {"freud", "nietzsche"})
    redis_on_fritz = dataclasses.replace(desired, services=tuple(
        dataclasses.replace(s, hosts=("fritz",)) if s.name == "redis" else s for s in desired.services))
    with pytest.raises(runbook_quiet.QuietRefused, match="on its Redis host fritz, and this run leaves it out"):
        runbook_quiet.around(book, redis_on_fritz, move, observed, {"freud", "nietzsche"}, [])


def test_plan_text_shows_each_units_process_and_the_jobs_queued_now_under_the_steps(example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    view = SidekiqView(processes=(process("freud", 101, busy=2), process("nietzsche", 202, quiet=True)),
                       queues=(QueueState("default", 3, 1.0, 1.0), QueueState("orphans", 4, 1.0, 1.0),
                               QueueState("mailers", 0, None, 0.0)))
    with_pids = {}
    for host, state in observed.items():
        assert isinstance(state, HostState)
        pids = dict(SIDEKIQ.get(host, []))
        with_pids[host] = dataclasses.replace(state, units=tuple(
            dataclasses.replace(u, main_pid=pids[u.unit]) if u.unit in pids else u for u in state.units))
    text = plan_text(build_plan(desired, with_view(with_pids, view), S))
    assert ("  ~ move-quiet sidekiq  — move postgres freud -> nietzsche: Sidekiq takes no new job (TSTP) before the "
            "source stops taking writes\n"
            "      now: freud mastodon-sidekiq-default.service: pid 101, working, busy 2\n"
            "      now: freud mastodon-sidekiq-push-pull.service: no heartbeat in Sidekiq's Redis\n") in text, text
    assert "      now: nietzsche mastodon-sidekiq-scheduler.service: pid 202, quiet, busy 0\n" in text
    assert ("  ? move-drained sidekiq  — move postgres freud -> nietzsche: jobs in flight finished; jobs still queued "
            "counted (0, or accepted with --accept-queued N)\n      now: jobs queued: 7 (default: 3, orphans: 4)\n"
            ) in text, text


def test_a_saved_plan_keeps_the_units_and_refuses_one_edited_into_a_command(example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    plan = build_plan(desired, observed, S)
    assert plan_from_json(plan.to_json()).change(QUIET_ID).payload == plan.change(QUIET_ID).payload
    bad = QuietPayload((("freud", "mastodon-sidekiq-default.service; reboot"),), "/home/mastodon/live/.env.production")
    edited = dataclasses.replace(plan, changes=tuple(dataclasses.replace(c, payload=bad) if c.id == QUIET_ID else c
                                                     for c in plan.changes)).to_json()
    with pytest.raises(PlanFileError, match=re.escape("'freud' 'mastodon-sidekiq-default.service; reboot' is not "
                                                      "a host and a unit name")):
        plan_from_json(edited)


# ------------------------------------------------------------------ judging what Sidekiq's Redis says

UNITS = [Quieted("freud", "a.service", "freud", 101), Quieted("nietzsche", "b.service", "nietzsche", 201),
         Quieted("nietzsche", "c.service", "nietzsche", 0)]  # c: no main process, nothing to quiet


def beats(*rows: str, queues: str = "") -> str:
    return "".join(f"@@move-sidekiq p {r}\n" for r in rows) + queues + "@@ok\n"


def test_the_quiet_gate_passes_only_when_every_heartbeat_says_quiet() -> None:
    ok = beats("freud:101: freud:101:aa true 3", "nietzsche:201: nietzsche:201:bb true 0")
    assert judge_quiet(UNITS, ok, 30).ok
    assert judge_quiet(UNITS, ok, 30).detail == "2 Sidekiq process(es) quiet (c.service on nietzsche not running)"
    late = judge_quiet(UNITS, beats("freud:101: freud:101:aa false 3", "nietzsche:201: nietzsche:201:bb true 0"), 30)
    assert not late.ok and late.detail == "a.service on freud (pid 101) heartbeats quiet=false after 30s"
    gone = judge_quiet(UNITS, beats("freud:101: - - -", "nietzsche:201: nietzsche:201:bb true 0"), 30)
    assert gone.detail == "a.service on freud (pid 101) has no heartbeat in Sidekiq's Redis"
    skipped = judge_quiet(UNITS, "@@move-sidekiq skipped (Redis did not answer)\n@@ok\n", 30)
    assert not skipped.ok and "Redis did not answer" in skipped.detail


def test_the_drain_gate_waits_for_jobs_in_flight_then_counts_the_queued_ones() -> None:
    idle = ("freud:101: freud:101:aa true 0", "nietzsche:201: nietzsche:201:bb true 0")
    queued = "@@move-sidekiq q 0 default\n@@move-sidekiq q 4 orphans\n@@move-sidekiq q 3 mailers\n"
    busy = judge_drained(UNITS, beats("freud:101: freud:101:aa true 2", idle[1]), 30, None, None)
    assert [g.ok for g in busy] == [False] and busy[0].detail == \
        "a.service on freud (pid 101) has 2 job(s) in flight after 30s"
    assert [g.ok for g in judge_drained(UNITS, beats(*idle, queues="@@move-sidekiq q 0 default\n"), 30, None,
                                        None)] == [True, True]
    left = judge_drained(UNITS, beats(*idle, queues=queued), 30, None, None)[-1]
    assert not left.ok and left.detail.startswith("7 (orphans: 4, mailers: 3) job(s) still queued; quiet Sidekiq "
                                                  "takes no new job, so they stay queued: to move with them, apply "
                                                  "again with --accept-queued 7")
    assert judge_drained(UNITS, beats(*idle, queues=queued), 30, 7, None)[-1].ok
    assert judge_drained(UNITS, beats(*idle, queues=queued), 30, 9, None)[-1].detail == \
        "7 (orphans: 4, mailers: 3) job(s) queued, accepted (--accept-queued 9): they run once Sidekiq restarts"
    fewer = judge_drained(UNITS, beats(*idle, queues=queued), 30, 5, None)[-1]
    assert not fewer.ok and ", more than --accept-queued 5 accepts" in fewer.detail
    unknown = judge_drained(UNITS, beats(*idle, queues="@@move-sidekiq q - orphans\n"), 30, 100, None)[-1]
    assert not unknown.ok and unknown.detail == "could not count the jobs in queue(s) orphans"
    restarted = judge_drained(UNITS, beats(idle[0], "nietzsche:201: - - -"), 30, None, None)
    assert not restarted[0].ok and "left Sidekiq's processes since it was quieted" in restarted[0].detail
    working = judge_drained(UNITS, beats(idle[0], "nietzsche:201: nietzsche:201:bb false 0"), 30, None, None)
    assert [g.ok for g in working] == [False] and working[0].detail == \
        "b.service on nietzsche (pid 201) is not quiet (quiet=false): restarted since move-quiet, it takes jobs"


@pytest.mark.parametrize("text", ["-1", "seven", "2.5", ""])
def test_accept_queued_refuses_what_is_not_a_whole_number_of_jobs(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="is not a whole number of jobs"):
        accept_queued_option(text)
    assert accept_queued_option("0") == 0 and accept_queued_option("12") == 12


def test_fleet_apply_names_the_option_it_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "--accept-queued", "-3"]) == EXIT_USAGE
    assert "argument --accept-queued: '-3' is not a whole number of jobs (0 or more)" in capsys.readouterr().err


# ------------------------------------------------------------------ carried out


def moving(example: FleetDir) -> tuple[Desired, dict[str, HostResult]]:
    return postgres_moving(example)


def test_the_move_sends_tstp_to_every_unit_and_quiets_them_before_the_source_goes_read_only(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    result = rig.executor(plan, desired).execute()
    assert set(outcomes(result).values()) == {"ok"}, [(o.change.id, o.error) for o in result.outcomes]
    tstp = sent(rig, "systemctl kill -s TSTP --kill-whom=main")
    assert [rig.fake.calls[i].host for i in tstp] == ["freud", "nietzsche"]
    assert "for u in mastodon-sidekiq-push-pull.service mastodon-sidekiq-scheduler.service; do" in \
        rig.fake.calls[tstp[1]].command
    polls = sent(rig, "@@move-sidekiq")
    alter, = sent(rig, "ALTER SYSTEM SET default_transaction_read_only = on")
    promote, = sent(rig, "pg_promote(true, 60)")
    assert max(tstp) < min(polls) and max(polls) < alter
    assert all(rig.fake.calls[i].host == "freud" for i in polls)
    assert "for pre in freud:101: freud:102: nietzsche:201: nietzsche:202:; do" in rig.fake.calls[polls[0]].command
    restarts = [c.seq for c in rig.fake.calls if "systemctl restart -- mastodon-sidekiq-" in c.command]
    assert len(restarts) == 4 and min(restarts) > promote  # each quieted unit restarted by the plan


def test_queued_jobs_halt_the_move_before_read_only_and_every_quieted_unit_is_restarted(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    sidekiq_answers(rig, queued={"default": "0", "orphans": "7"})
    result = rig.executor(plan, desired).execute()
    done = outcomes(result)
    assert done[DRAINED_ID] == "failed" and done[QUIET_ID] == "ok"
    assert not sent(rig, "ALTER SYSTEM") and not env_writes(rig)
    resumed = sent(rig, "systemctl restart -- ")
    assert [(rig.fake.calls[i].host, rig.fake.calls[i].command) for i in resumed] == [
        ("freud", "systemctl restart -- mastodon-sidekiq-default.service mastodon-sidekiq-push-pull.service "
                  "&& echo @@ok"),
        ("nietzsche", "systemctl restart -- mastodon-sidekiq-push-pull.service mastodon-sidekiq-scheduler.service "
                      "&& echo @@ok")]
    [step] = [s for s in rig.steps(rig.runs[-1]).values() if s.action == "move-drained"]
    assert step.error is not None and step.error.startswith(
        "gate 'queues drained' did not pass: 7 (orphans: 7) job(s) still queued; quiet Sidekiq takes no new job, so "
        "they stay queued: to move with them, apply again with --accept-queued 7 (they run after Sidekiq restarts, "
        "against nietzsche), or let them be worked off first (passed: Sidekiq idle: "), step.error
    assert step.error.endswith("; restarted the Sidekiq units quieted for the move, which resume against the "
                               "source: mastodon-sidekiq-default.service, mastodon-sidekiq-push-pull.service on "
                               "freud; mastodon-sidekiq-push-pull.service, mastodon-sidekiq-scheduler.service on "
                               "nietzsche"), step.error


def test_accepted_queued_jobs_let_the_move_go_on(rig: Rig, example: FleetDir) -> None:
    desired, observed = moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    sidekiq_answers(rig, queued={"orphans": "7"})
    executor = rig.executor(plan, desired)
    executor.accept_queued = 7
    result = executor.execute()
    assert set(outcomes(result).values()) == {"ok"}, [(o.change.id, o.error) for o in result.outcomes]
    assert sent(rig, "pg_promote")


def test_a_process_that_does_not_go_quiet_halts_the_move_and_restarts_every_quieted_unit(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    sidekiq_answers(rig, quiet="false")
    result = rig.executor(plan, desired).execute()
    assert outcomes(result)[QUIET_ID] == "failed"
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert failed.error.startswith("gate 'Sidekiq quiet' did not pass: mastodon-sidekiq-default.service on freud "
                                   "(pid 101) heartbeats quiet=false after 1s")
    assert "restarted the Sidekiq units quieted for the move" in failed.rollback
    assert len(sent(rig, "systemctl restart -- ")) == 2 and not sent(rig, "ALTER SYSTEM")


def test_a_host_that_does_not_name_a_units_pid_halts_the_quiet(rig: Rig, example: FleetDir) -> None:
    desired, observed = moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, "nietzsche", "@@quiet", "@@ok\n")
    result = rig.executor(plan, desired).execute()
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert failed.change.id == QUIET_ID and failed.error == (
        "nietzsche did not say the main PID of mastodon-sidekiq-push-pull.service, mastodon-sidekiq-scheduler.service")


def test_a_failed_promote_that_left_the_target_promoted_leaves_sidekiq_quiet_and_says_so(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, "nietzsche", "SELECT pg_is_in_recovery()'", "x\n@@ok\n")  # neither: the promote's gate fails
    result = rig.executor(plan, desired).execute()
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert failed.change.action == Action.MOVE_PROMOTE
    assert "Sidekiq left quiet (mastodon-sidekiq-default.service, mastodon-sidekiq-push-pull.service on freud; " \
           "mastodon-sidekiq-push-pull.service, mastodon-sidekiq-scheduler.service on nietzsche): the source stays " \
           "read-only" in failed.rollback
    assert not sent(rig, "systemctl restart -- ")


def test_a_source_that_does_not_turn_read_only_is_put_back_and_sidekiq_resumes(rig: Rig, example: FleetDir) -> None:
    desired, observed = moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, "freud", "SHOW default_transaction_read_only", "off\n@@ok\n")
    answer(rig, "nietzsche", "SELECT pg_is_in_recovery()'", "t\n@@ok\n")  # still a standby
    result = rig.executor(plan, desired).execute()
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert failed.change.action == Action.MOVE_READ_ONLY
    assert failed.rollback.startswith("freud takes writes again (default_transaction_read_only reset); the fleet "
                                      "still points at it; restarted the Sidekiq units quieted for the move")
    assert max(sent(rig, "ALTER SYSTEM RESET")) < min(sent(rig, "systemctl restart -- ")) and not env_writes(rig)


def test_the_replay_wait_refuses_a_position_that_is_not_one() -> None:
    with pytest.raises(FleetError, match="is not one psql prints"):
        runbook._replay_wait(5432, "0/1'); DROP TABLE x; --", 1)
    assert "0/3000060" in runbook._replay_wait(5432, "0/3000060", 1)
