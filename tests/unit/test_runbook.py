"""A declared Postgres move carried out as a runbook (fleet/resources/runbook.py): the steps' order
in the plan around the plan's own changes, their gates judged on what the hosts answer, the halt
of a failed gate before any env file is written, and the saved-plan verification of such a plan.
The hosts are FakeTransport's: every answer below is one psql or systemctl would print."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import FleetDir
from observed import EXAMPLE_SECRETS as S
from observed import distro_unit, with_unit
from test_apply import Rig, outcomes, rig
from test_moves import (
    DECLARED,
    PRIMARY,
    REDIS_HOST_NIETZSCHE,
    REDIS_ON_NIETZSCHE,
    STREAMING,
    before_the_move,
    loaded,
    with_facts,
)

from fleet.actions import Action, MovePayload
from fleet.model import Desired, HostResult
from fleet.moves import Gate
from fleet.output.text import plan_text
from fleet.plan import Plan, PlanFileError, build_plan, first_difference, plan_from_json
from fleet.resources import runbook
from fleet.resources.stores import Probe
from fleet.transport.fake import Call
from fleet.transport.protocol import RunResult
from fleet.workflows.apply import same_as_saved

__all__ = ["rig"]  # the executor rig, a fixture: test_apply's

RUNBOOK = [Action.MOVE_CHECK, Action.MOVE_QUIET, Action.MOVE_DRAINED, Action.MOVE_READ_ONLY, Action.MOVE_CAUGHT_UP,
           Action.MOVE_PROMOTE]
# The example's Sidekiq units (quieted by the move) as their hosts answer: unit, kernel hostname, MainPID.
SIDEKIQ = {"freud": [("mastodon-sidekiq-default.service", 101), ("mastodon-sidekiq-push-pull.service", 102)],
           "nietzsche": [("mastodon-sidekiq-push-pull.service", 201), ("mastodon-sidekiq-scheduler.service", 202)]}
STANDBY = Probe(5432, in_recovery=True, lsn=5000, replay_lsn=5000, upstream=STREAMING)


def postgres_moving(example: FleetDir, standby: Probe = STANDBY) -> tuple[Desired, dict[str, HostResult]]:
    """Postgres declared (probed) on nietzsche with its move from freud; redis stays on freud.
    Observed: freud's 15/main the primary, nietzsche's a standby (running) of it."""
    observed = before_the_move(example)
    example.edit(REDIS_ON_NIETZSCHE, REDIS_ON_NIETZSCHE.replace("nietzsche", "freud"))
    example.edit(REDIS_HOST_NIETZSCHE, REDIS_HOST_NIETZSCHE.replace("nietzsche", "freud"))
    example.edit('unit = "postgresql.service"\nhosts = ["nietzsche"]',
                 'unit = "postgresql.service"\nhosts = ["nietzsche"]\nprobe = true')
    desired = loaded(example.append(DECLARED))
    observed["freud"] = with_facts(observed["freud"], probe=PRIMARY)
    target = with_unit(observed["nietzsche"], distro_unit("postgresql.service", sub="exited"))  # type: ignore[arg-type]
    observed["nietzsche"] = with_facts(target, probe=standby)
    return desired, observed


def waves_of(plan: Plan) -> list[list[str]]:
    return [[f"{plan.change(cid).host}:{plan.change(cid).action}" for cid in wave] for wave in plan.waves]


# ------------------------------------------------------------------ the plan


def test_the_runbook_wraps_the_plan_gates_first_each_alone_and_the_old_server_stopped_last(
        example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    plan = build_plan(desired, observed, S)
    waves = waves_of(plan)
    assert waves[:6] == [["nietzsche:move-check"], ["freud:move-quiet"], ["freud:move-drained"],
                         ["freud:move-read-only"], ["nietzsche:move-caught-up"], ["nietzsche:move-promote"]]
    assert waves[-1] == ["freud:move-stop-source"]
    assert plan.change("freud:move-stop-source:postgresql@15-main.service").payload == MovePayload(
        "freud", "nietzsche", 5432, 5432, "postgresql@15-main.service")
    at = {cid: i for i, wave in enumerate(plan.waves) for cid in wave}
    promote = "nietzsche:move-promote:postgres:5432"
    writes = [c.id for c in plan.changes if c.action == Action.WRITE_ENV]
    restarts = [c.id for c in plan.changes if c.action in (Action.RESTART, Action.START)]
    assert writes and restarts
    assert all(at[w] > at[promote] for w in writes)  # DB_HOST rewritten only after the promote
    stop = "freud:move-stop-source:postgresql@15-main.service"
    assert set(plan.deps[stop]) == set(restarts)  # and the old server stopped after every (re)start
    # Each step waits for the one before it, and the plan's first changes for the promote.
    chain = [c.id for c in plan.changes[:6]]
    assert [plan.deps[c] for c in chain] == [(), *((c,) for c in chain[:5])]
    assert all(plan.deps[c] == (promote,) for c in plan.waves[6])


def test_plan_text_shows_the_runbook_in_order_with_the_gates_current_answers(example: FleetDir) -> None:
    lagging = dataclasses.replace(STANDBY, lsn=4000, replay_lsn=4000)
    desired, observed = postgres_moving(example, lagging)
    text = plan_text(build_plan(desired, observed, S))
    assert ("  ? move-check postgres:5432  — move postgres freud -> nietzsche: the data gates, asked again when the "
            "step runs\n      now: ok: freud is the primary: 15/main on freud is a primary at WAL 5000\n"
            "      now: ok: nietzsche is a standby of freud: 15/main on nietzsche streams from "
            "freud.hachyderm.internal:5432 (streaming)\n"
            "      now: NOT YET: caught up: 1000 bytes of WAL behind freud\n") in text
    order = text.split("Order (", 1)[1]
    assert order.index("1. nietzsche:move-check") < order.index("2. freud:move-quiet") < order.index(
        "3. freud:move-drained") < order.index("4. freud:move-read-only") < order.index(
        "5. nietzsche:move-caught-up") < order.index("6. nietzsche:move-promote") < order.index("write-env") < \
        order.index("freud:move-stop-source")


def test_two_moves_at_once_are_still_refused(example: FleetDir) -> None:
    from fleet.moves import MoveRefused
    observed = before_the_move(example)
    desired = loaded(example.append(DECLARED + '\n[moves.redis]\nfrom = "freud"\nto = "nietzsche"\n'
                                               'method = "redis-replica"\n'))
    with pytest.raises(MoveRefused, match="fleet runs one move's runbook at a time"):
        build_plan(desired, observed, S)


def test_a_move_whose_source_shows_no_primary_cluster_is_refused_at_plan_time(example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    observed["freud"] = with_facts(observed["freud"], probe=dataclasses.replace(PRIMARY, in_recovery=True))
    with pytest.raises(runbook.RunbookRefused, match="no primary cluster of postgresql.service on freud"):
        build_plan(desired, observed, S)


def test_a_move_limited_away_from_one_of_its_hosts_is_refused(example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    limited = dataclasses.replace(desired, hosts=tuple(h for h in desired.hosts if h.name != "freud"))
    with pytest.raises(runbook.RunbookRefused, match="needs both hosts, and this run leaves out freud"):
        build_plan(limited, {h: r for h, r in observed.items() if h != "freud"}, S, inventory=desired)


# ------------------------------------------------------------------ the saved plan


def test_a_saved_runbook_plan_is_verified_field_by_field_but_not_by_its_gate_answers(example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    saved = plan_from_json(build_plan(desired, observed, S).to_json())
    assert saved.change("nietzsche:move-check:postgres:5432").payload == MovePayload(
        "freud", "nietzsche", 5432, 5432, "postgresql@15-main.service")
    # The standby replayed more since: the plan is the same (its gates are asked again when it runs) …
    later = dict(observed, nietzsche=with_facts(observed["nietzsche"], probe=dataclasses.replace(
        STANDBY, lsn=9000, replay_lsn=4000)))
    fresh = build_plan(desired, later, S)
    assert fresh.change("nietzsche:move-check:postgres:5432").before != saved.change(
        "nietzsche:move-check:postgres:5432").before
    assert first_difference(saved, fresh) is None
    same_as_saved(saved, fresh)
    # … but a move edited in the file is not the plan fleet computes now.
    edited = plan_from_json(moved_to(saved, source_port=5433).to_json())
    assert first_difference(edited, fresh) == (
        "change nietzsche:move-check:postgres:5432: meta differs (plan: source=freud, source_port=5433, "
        "source_unit=postgresql@15-main.service, target=nietzsche, target_port=5432, now: source=freud, "
        "source_port=5432, source_unit=postgresql@15-main.service, target=nietzsche, target_port=5432)")


def moved_to(plan: Plan, **payload: object) -> Plan:
    """`plan` with every runbook step's move edited (as a hand-edited plan file would hold it)."""
    changes = tuple(dataclasses.replace(c, payload=dataclasses.replace(c.payload, **payload))  # type: ignore[arg-type]
                    if isinstance(c.payload, MovePayload) else c for c in plan.changes)
    return dataclasses.replace(plan, changes=changes)


@pytest.mark.parametrize(("edit", "says"), [
    ({"source_unit": "postgresql@15-main.service; reboot"}, "is not a Postgres cluster unit"),
    ({"target_port": 70000}, "its ports are out of range"),
    ({"target": "freud"}, "is not between two host names"),
])
def test_a_plan_file_whose_move_was_edited_into_something_unsafe_is_refused(
        example: FleetDir, edit: dict[str, object], says: str) -> None:
    desired, observed = postgres_moving(example)
    text = moved_to(build_plan(desired, observed, S), **edit).to_json()
    with pytest.raises(PlanFileError, match=re.escape(says)):
        plan_from_json(text)


# ------------------------------------------------------------------ judging what the hosts answer


def test_the_gates_judge_what_psql_printed(example: FleetDir) -> None:
    desired, _ = postgres_moving(example)
    move = desired.move("postgres")
    assert move is not None
    assert runbook.judge_source(move, "f|0/3000060") == Gate(
        "freud is the primary", True, "freud is a primary at WAL 0/3000060")
    assert not runbook.judge_source(move, "t|").ok
    assert runbook.judge_target(desired, move, "t|freud.hachyderm.internal|5432|streaming").ok
    empty = runbook.judge_target(desired, move, "f|||")
    assert not empty.ok and "not in recovery" in empty.detail
    assert not runbook.judge_target(desired, move, "t|fritz|5432|streaming").ok  # another host's standby
    assert not runbook.judge_target(desired, move, "t|freud|5432|catchup").ok
    assert runbook.judge_replay(move, "0/3000060", "behind 0", 1).ok
    assert runbook.judge_replay(move, "0/3000060", "behind -24", 1).ok  # replayed past it (a checkpoint since)
    assert runbook.judge_replay(move, "0/3000060", "behind 1000", 1) == Gate(
        "caught up", False, "1000 bytes of WAL behind freud (at 0/3000060) after waiting 1s for it to replay them")
    assert not runbook.judge_replay(move, "0/3000060", "behind ", 1).ok
    assert runbook.lsn("16/B374D848") == (0x16 << 32) + 0xB374D848 and runbook.lsn("16/B3;x") is None


# ------------------------------------------------------------------ carried out


def answer(rig: Rig, host: str, needle: str, text: str) -> None:
    rig.fake.respond(re.compile(re.escape(needle)), text, host=host)


def healthy_move(rig: Rig) -> None:
    answer(rig, "nietzsche", "pg_stat_wal_receiver", "t|freud.hachyderm.internal|5432|streaming\n@@ok\n")
    answer(rig, "freud", "pg_current_wal_lsn", "f|0/3000060\n@@ok\n")
    answer(rig, "nietzsche", "pg_wal_lsn_diff", "behind 0\n@@ok\n")
    answer(rig, "freud", "SHOW default_transaction_read_only", "on\n@@ok\n")
    answer(rig, "nietzsche", "SELECT pg_is_in_recovery()'", "f\n@@ok\n")
    answer(rig, "freud", "systemctl stop", "inactive\n@@ok\n")
    sidekiq_answers(rig)


def sidekiq_answers(rig: Rig, *, quiet: str = "true", busy: str = "0", queued: dict[str, str] | None = None) -> None:
    """The Sidekiq units' hosts name their main PIDs (and take the TSTP); Sidekiq's Redis on freud
    says each of those processes is `quiet` with `busy` jobs, and the queues hold `queued`."""
    for host, units in SIDEKIQ.items():
        answer(rig, host, "@@quiet", "".join(f"@@quiet {u} {host} {pid}\n" for u, pid in units) + "@@ok\n")
    beats = "".join(f"@@move-sidekiq p {h}:{pid}: {h}:{pid}:0a1b {quiet} {busy}\n"
                    for h, units in SIDEKIQ.items() for _, pid in units)
    queues = "".join(f"@@move-sidekiq q {n} {name}\n" for name, n in (queued or {"default": "0"}).items())
    answer(rig, "freud", "@@move-sidekiq", beats + queues + "@@ok\n")


def env_writes(rig: Rig) -> list[int]:
    """The calls that write an env file (the Sidekiq Redis polls only read one)."""
    return [c.seq for c in rig.fake.calls if ".env.production" in c.command and "@@move-sidekiq" not in c.command]


def sent(rig: Rig, needle: str) -> list[int]:
    return [c.seq for c in rig.fake.calls if needle in c.command]


def test_a_move_runs_its_steps_in_order_and_rewrites_db_host_only_after_the_promote(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    result = rig.executor(plan, desired).execute()
    assert set(outcomes(result).values()) == {"ok"}, [(o.change.id, o.error) for o in result.outcomes]
    check, = sent(rig, "pg_stat_wal_receiver")
    alter, = sent(rig, "ALTER SYSTEM SET default_transaction_read_only = on")
    promote, = sent(rig, "pg_promote(true, 60)")
    stop, = sent(rig, "systemctl stop -- postgresql@15-main.service")
    env = env_writes(rig)
    restarts = [c.seq for c in rig.fake.calls if "systemctl restart" in c.command]
    assert env and restarts
    assert check < alter < promote < min(env) and max(restarts) < stop
    replays = [c.seq for c in rig.fake.calls if "pg_wal_lsn_diff" in c.command and "0/3000060" in c.command]
    assert len(replays) == 2 and alter < replays[1] < promote  # caught up after the source went read-only
    assert rig.fake.calls[alter].host == "freud" and rig.fake.calls[promote].host == "nietzsche"
    # SQL runs as the postgres user, every statement quoted as one argument; fleet's own writes in a
    # read-write session, and the gate on the source's read-only state in a session as Mastodon's.
    assert ("runuser -u postgres -- env PGCONNECT_TIMEOUT=5 PGOPTIONS='-c statement_timeout=10000 -c "
            "default_transaction_read_only=off' psql -X -A -t -q -F '|' -d postgres -p 5432 -c 'ALTER SYSTEM SET "
            "default_transaction_read_only = on' -c 'SELECT pg_reload_conf()' -c ") in rig.fake.calls[alter].command
    show, = sent(rig, "SHOW default_transaction_read_only")
    assert "PGOPTIONS='-c statement_timeout=10000' psql" in rig.fake.calls[show].command


@pytest.mark.parametrize(("needle", "host", "reply", "says"), [
    ("pg_wal_lsn_diff", "nietzsche", "behind 1000\n@@ok\n",
     "gate 'caught up' did not pass: 1000 bytes of WAL behind freud (at 0/3000060)"),
    ("pg_stat_wal_receiver", "nietzsche", "f|||\n@@ok\n",
     "gate 'nietzsche is a standby of freud' did not pass: nietzsche is not in recovery"),
    ("pg_current_wal_lsn", "freud", "t|\n@@ok\n", "gate 'freud is the primary' did not pass: freud is a standby"),
])
def test_a_failed_gate_halts_before_any_env_file_is_written_and_says_what_the_host_answered(
        rig: Rig, example: FleetDir, needle: str, host: str, reply: str, says: str) -> None:
    desired, observed = postgres_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, host, needle, reply)
    run = rig.executor(plan, desired)
    result = run.execute()
    done = outcomes(result)
    assert done["nietzsche:move-check:postgres:5432"] == "failed"
    assert {o for cid, o in done.items() if cid != "nietzsche:move-check:postgres:5432"} == {"skipped"}
    assert not env_writes(rig) and not sent(rig, "ALTER SYSTEM")
    [step] = [s for s in rig.steps(rig.runs[-1]).values() if s.action == "move-check"]
    assert step.error is not None and step.error.startswith(says), step.error


def test_a_standby_that_does_not_catch_up_after_the_source_went_read_only_puts_the_source_back(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, "nietzsche", "SELECT pg_is_in_recovery()'", "t\n@@ok\n")  # still a standby
    replies = iter(["behind 0\n@@ok\n", "behind 52\n@@ok\n"])  # caught up at the check, not after read-only

    def replay(call: Call) -> RunResult | None:
        return call.reply(next(replies)) if "pg_wal_lsn_diff" in call.command else None

    rig.fake.hook = replay
    result = rig.executor(plan, desired).execute()
    done = outcomes(result)
    assert done["nietzsche:move-caught-up:postgres:5432"] == "failed"
    assert "nietzsche:move-promote:postgres:5432" not in {cid for cid, o in done.items() if o != "skipped"}
    assert sent(rig, "ALTER SYSTEM RESET default_transaction_read_only")  # freud writable again
    assert not sent(rig, "pg_promote") and not env_writes(rig)
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert "freud takes writes again" in failed.rollback
    # … and the Sidekiq units quieted before it resume against it.
    assert "restarted the Sidekiq units quieted for the move, which resume against the source: " \
           "mastodon-sidekiq-default.service, mastodon-sidekiq-push-pull.service on freud; " \
           "mastodon-sidekiq-push-pull.service, mastodon-sidekiq-scheduler.service on nietzsche" in failed.rollback
    resumed = sent(rig, "systemctl restart -- mastodon-sidekiq-")
    assert [rig.fake.calls[i].host for i in resumed] == ["freud", "nietzsche"]
    assert min(resumed) > max(sent(rig, "ALTER SYSTEM RESET"))


def test_a_move_step_refuses_a_plan_whose_move_is_no_longer_declared(rig: Rig, example: FleetDir) -> None:
    desired, observed = postgres_moving(example)
    plan = build_plan(desired, observed, S)
    undeclared = dataclasses.replace(desired, moves=())
    result = rig.executor(plan, undeclared).execute()
    assert outcomes(result)["nietzsche:move-check:postgres:5432"] == "failed"
    assert not sent(rig, "pg_stat_wal_receiver")
    [step] = [s for s in rig.steps(rig.runs[-1]).values() if s.action == "move-check"]
    assert step.error == "the plan moves postgres from freud to nietzsche, which the desired state no longer declares"


def test_wrap_leaves_a_plan_without_a_move_as_it_was() -> None:
    assert runbook.wrap([], [], {}, [("a",)]) == ((), {}, (("a",),), {})
    assert runbook.wrap([], [], {"p": ("@g",)}, [("r",), ("p",)], {"@g": ("r",)}) == (
        (), {"p": ("@g",)}, (("r",), ("p",)), {"@g": ("r",)})
