"""A declared Redis move carried out as a runbook (fleet/resources/runbook_redis.py, laid out by
fleet/resources/runbook.py): the steps around the plan's own changes, their gates judged on what
Redis answered (hostile answers included), the halt of a failed gate before any env file is
written, the source made writable again when a later gate fails — and the remote commands run
for real against the throwaway redis-server (with a password: redis_server.py)."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FleetDir
from observed import EXAMPLE_SECRETS as S
from observed import distro_unit, with_unit
from redis_server import PASSWORD, Redis
from test_apply import Rig, outcomes, rig
from test_moves import DB_HOST_NIETZSCHE, POSTGRES_ON_NIETZSCHE, before_the_move, loaded, with_facts
from test_runbook import SIDEKIQ, answer, moved_to

from fleet.actions import Action, MovePayload
from fleet.model import Desired, HostResult, MoveSpec
from fleet.moves import Gate
from fleet.output.text import plan_text
from fleet.plan import PlanFileError, build_plan, plan_from_json
from fleet.resources import runbook_redis as rr
from fleet.resources.stores import RedisState
from fleet.transport.fake import Call
from fleet.transport.protocol import RunResult

__all__ = ["rig"]  # the executor rig, a fixture: test_apply's

DECLARED = '\n[moves.redis]\nfrom = "freud"\nto = "nietzsche"\nmethod = "redis-replica"\n'
MASTER = RedisState(6379, ping="PONG", role="master", offset=900, keys=12)
REPLICA = RedisState(6379, ping="PONG", role="slave", master=("freud.hachyderm.internal", 6379), link="connected",
                     offset=900, keys=12)
MOVE = MoveSpec("redis", "freud", "nietzsche", "redis-replica")
CHECK, READ_ONLY = "nietzsche:move-check:redis:6379", "freud:move-read-only:redis-server.service"
CAUGHT_UP, PROMOTE = "nietzsche:move-caught-up:redis:6379", "nietzsche:move-promote:redis:6379"
STOP = "freud:move-stop-source:redis-server.service"
QUIET, DRAINED = "nietzsche:move-quiet:sidekiq", "nietzsche:move-drained:sidekiq"

SOURCE_INFO = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_repl_offset:4242\r\n"
TARGET_INFO = ("# Replication\r\nrole:slave\r\nmaster_host:freud.hachyderm.internal\r\nmaster_port:6379\r\n"
               "master_link_status:up\r\nslave_repl_offset:4242\r\n")


def redis_moving(example: FleetDir) -> tuple[Desired, dict[str, HostResult]]:
    """Redis declared on nietzsche with its move from freud; postgres stays on freud.  Observed:
    freud's Redis the master, nietzsche's running as its replica."""
    observed = before_the_move(example)
    example.edit(POSTGRES_ON_NIETZSCHE, POSTGRES_ON_NIETZSCHE.replace("nietzsche", "freud"))
    example.edit(DB_HOST_NIETZSCHE, DB_HOST_NIETZSCHE.replace("nietzsche", "freud"))
    desired = loaded(example.append(DECLARED))
    observed["freud"] = with_facts(observed["freud"], redis=MASTER)
    target = with_unit(observed["nietzsche"], distro_unit("redis-server.service"))  # type: ignore[arg-type]
    observed["nietzsche"] = with_facts(target, redis=REPLICA)
    return desired, observed


# ------------------------------------------------------------------ the plan


def test_a_declared_redis_move_is_planned_as_its_runbook_around_the_repointing_of_redis_host(
        example: FleetDir) -> None:
    desired, observed = redis_moving(example)
    plan = build_plan(desired, observed, S)
    waves = [[plan.change(cid).id for cid in wave] for wave in plan.waves]
    # Sidekiq quieted and drained (runbook_quiet.py: on its Redis host as declared) before writes stop.
    assert waves[:6] == [[CHECK], [QUIET], [DRAINED], [READ_ONLY], [CAUGHT_UP], [PROMOTE]] and waves[-1] == [STOP]
    assert plan.change(STOP).payload == MovePayload("freud", "nietzsche", 6379, 6379, "redis-server.service")
    at = {cid: i for i, wave in enumerate(plan.waves) for cid in wave}
    writes = [c.id for c in plan.changes if c.action == Action.WRITE_ENV]
    restarts = [c.id for c in plan.changes if c.action in (Action.RESTART, Action.START)]
    assert writes and restarts and all(at[w] > at[PROMOTE] for w in writes)  # REDIS_HOST after the promote
    assert set(plan.deps[STOP]) == set(restarts)
    text = plan_text(plan)
    assert ("  ? move-check redis:6379  — move redis freud -> nietzsche: the data gates, asked again when the step "
            "runs\n      now: ok: freud is the primary: redis on freud: master\n      now: ok: nietzsche is a "
            "replica of freud: redis on nietzsche replicates freud.hachyderm.internal:6379 (link connected)\n"
            "      now: ok: holds the source's keys: 12 keys on nietzsche, 12 on freud\n") in text
    assert "the replica becomes the primary Mastodon is pointed at" in text
    # A saved plan reads back the same; a source unit edited into something else is refused.
    assert plan_from_json(plan.to_json()).change(STOP).payload == plan.change(STOP).payload
    edited = moved_to(plan, source_unit="ssh.service").to_json()
    with pytest.raises(PlanFileError, match=re.escape("'ssh.service' is not a Postgres cluster unit (nor a Redis")):
        plan_from_json(edited)


def test_a_redis_move_whose_source_redis_was_not_asked_is_refused_at_plan_time(example: FleetDir) -> None:
    from fleet.resources.runbook import RunbookRefused
    desired, observed = redis_moving(example)
    observed["freud"] = with_facts(observed["freud"])  # no Redis answer from freud
    with pytest.raises(RunbookRefused, match="fleet did not ask Redis"):
        build_plan(desired, observed, S)


# ------------------------------------------------------------------ judging what Redis answered


def test_info_keeps_key_value_lines_and_nothing_a_host_could_smuggle_in() -> None:
    assert rr.info(SOURCE_INFO) == {"role": "master", "connected_slaves": "1", "master_repl_offset": "4242"}
    hostile = ("role:master\r\nrole:slave\n" + "x" * 10_000 + ":1\nMaster_Host:evil\nmaster repl offset:9\n"
               "\x1b[2J:1\n" + "".join(f"k{i}:v\n" for i in range(500)))
    fields = rr.info(hostile)
    assert fields["role"] == "master"  # the first wins
    assert len(fields) <= rr.MAX_INFO_LINES and "Master_Host" not in fields and "master repl offset" not in fields
    assert rr.said("\x1b[31mERR\x07 boom\r\n") == "?[31mERR? boom" and rr.said("") == "no answer"


def test_the_source_gate_wants_a_master_and_its_offset() -> None:
    assert rr.judge_source(MOVE, SOURCE_INFO) == (
        Gate("freud is the primary", True, "redis on freud is a master at offset 4242"), 4242)
    assert rr.judge_source(MOVE, "role:master\nmaster_repl_offset:-1\n")[1] is None
    assert rr.judge_source(MOVE, "role:master\nmaster_repl_offset:" + "9" * 40)[1] is None
    assert rr.judge_source(MOVE, "role:slave\nmaster_host:fritz\n") == (
        Gate("freud is the primary", False, "redis on freud is a replica of fritz"), None)
    assert rr.judge_source(MOVE, "NOAUTH Authentication required.") == (
        Gate("freud is the primary", False, "redis on freud answered 'NOAUTH Authentication required.'"), None)


def test_the_replica_gate_wants_the_source_as_its_master_with_the_link_up(example: FleetDir) -> None:
    desired, _ = redis_moving(example)
    ok = rr.judge_replica(desired, MOVE, TARGET_INFO)
    assert ok == Gate("nietzsche is a replica of freud", True,
                      "redis on nietzsche replicates freud.hachyderm.internal:6379 (link up)")
    assert not rr.judge_replica(desired, MOVE, TARGET_INFO.replace("link_status:up", "link_status:down")).ok
    assert not rr.judge_replica(desired, MOVE, TARGET_INFO.replace("freud.hachyderm", "fritz.hachyderm")).ok
    alone = rr.judge_replica(desired, MOVE, "role:master\r\nmaster_repl_offset:0\r\n")
    assert not alone.ok and "a master of its own" in alone.detail
    assert not rr.judge_replica(desired, MOVE, "Could not connect to Redis at 127.0.0.1:6379: Connection refused").ok


def test_the_offset_gate_wants_the_replica_at_or_past_the_source_s_offset_with_the_link_up() -> None:
    assert rr.judge_offset(MOVE, 4242, TARGET_INFO, 2).ok
    assert rr.judge_offset(MOVE, 4000, TARGET_INFO, 2).ok  # past it: the source's pings since
    behind = rr.judge_offset(MOVE, 5000, TARGET_INFO, 2)
    assert behind == Gate("caught up", False, "758 bytes of replication behind freud (at offset 5000) after "
                                              "waiting 2s for them")
    down = rr.judge_offset(MOVE, 4242, TARGET_INFO.replace("link_status:up", "link_status:down"), 2)
    assert not down.ok and "link to its master down" in down.detail
    assert not rr.judge_offset(MOVE, 4242, "role:slave\nslave_repl_offset:lots\n", 2).ok
    assert not rr.judge_offset(MOVE, 4242, "role:master\nmaster_repl_offset:9999\n", 2).ok


def test_the_read_only_gate_wants_the_test_write_refused_with_noreplicas() -> None:
    refused = rr.judge_refused(MOVE, "set OK \nwrite NOREPLICAS Not enough good replicas to write. \n")
    assert refused == Gate("source refuses writes", True,
                           "a write on freud is refused: NOREPLICAS Not enough good replicas to write.")
    assert rr.judge_refused(MOVE, "set OK OK\nwrite NOREPLICAS Not enough\n").ok  # max-lag set too
    accepted = rr.judge_refused(MOVE, "set OK\nwrite 0\n")
    assert not accepted.ok and "was not refused (DEL answered '0')" in accepted.detail
    noauth = rr.judge_refused(MOVE, "set NOAUTH Authentication required.\nwrite NOREPLICAS x\n")
    assert not noauth.ok and "answered 'NOAUTH Authentication required.'" in noauth.detail
    assert not rr.judge_refused(MOVE, "write NOREPLICAS x\n").ok  # nothing says it was set


def test_the_promote_gate_wants_a_master_whose_config_file_names_no_master() -> None:
    done = rr.judge_promoted(MOVE, "replicaof OK\nconfig /etc/redis/redis.conf\nrewrite -\nnames 0\nrole:master\n")
    assert done.ok and done.detail.endswith("its config file (/etc/redis/redis.conf) names no master")
    rewritten = rr.judge_promoted(MOVE, "replicaof OK\nconfig /etc/r.conf\nrewrite OK\nnames 0\nrole:master\n")
    assert rewritten.ok and "CONFIG REWRITE took the replicaof line out of /etc/r.conf" in rewritten.detail
    kept = rr.judge_promoted(MOVE, "replicaof OK\nconfig /etc/r.conf\nrewrite ERR denied\nnames 1\nrole:master\n")
    assert not kept.ok and "would be a replica again" in kept.detail
    still = rr.judge_promoted(MOVE, "replicaof ERR nope\nconfig -\nrewrite -\nnames 0\nrole:slave\n")
    assert not still.ok and "still a replica" in still.detail


# ------------------------------------------------------------------ carried out


def healthy_move(rig: Rig) -> None:
    answer(rig, "freud", "INFO replication", SOURCE_INFO + "@@ok\n")
    answer(rig, "nietzsche", "INFO replication", TARGET_INFO + "@@ok\n")
    answer(rig, "freud", "min-replicas-to-write 2147483647", "set OK \nwrite NOREPLICAS Not enough good replicas\n"
                                                             "@@ok\n")
    answer(rig, "nietzsche", "REPLICAOF NO ONE", "replicaof OK\nconfig /etc/redis/redis.conf\nrewrite -\nnames 0\n"
                                                 "role:master\n@@ok\n")
    answer(rig, "freud", "systemctl stop", "inactive\n@@ok\n")
    # Sidekiq's units name their main PIDs (and take the TSTP); its Redis, read from nietzsche (its
    # host as declared), says each of them is quiet and idle, nothing queued.
    for host, units in SIDEKIQ.items():
        answer(rig, host, "@@quiet", "".join(f"@@quiet {u} {host} {pid}\n" for u, pid in units) + "@@ok\n")
    beats = "".join(f"@@move-sidekiq p {h}:{pid}: {h}:{pid}:0a1b true 0\n" for h, units in SIDEKIQ.items()
                    for _, pid in units)
    answer(rig, "nietzsche", "@@move-sidekiq", beats + "@@move-sidekiq q 0 default\n@@ok\n")


def env_writes(rig: Rig) -> list[int]:
    """The calls that write an env file (fleet's Redis commands only read one)."""
    return [c.seq for c in rig.fake.calls if ".env.production" in c.command and "redis-cli" not in c.command]


def sent(rig: Rig, needle: str, host: str | None = None) -> list[int]:
    return [c.seq for c in rig.fake.calls if needle in c.command and (host is None or c.host == host)]


def test_a_redis_move_runs_its_steps_in_order_and_rewrites_redis_host_only_after_the_promote(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = redis_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    result = rig.executor(plan, desired).execute()
    assert set(outcomes(result).values()) == {"ok"}, [(o.change.id, o.error) for o in result.outcomes]
    check = sent(rig, "INFO replication", "nietzsche")[0]
    read_only, = sent(rig, "CONFIG SET min-replicas-to-write 2147483647")
    promote, = sent(rig, "REPLICAOF NO ONE")
    stop, = sent(rig, "systemctl stop -- redis-server.service")
    env = env_writes(rig)
    restarts = sent(rig, "systemctl restart")
    assert env and restarts
    assert check < read_only < promote < min(env) and max(restarts) < stop
    waits = sent(rig, "slave_repl_offset")
    assert len(waits) == 2 and waits[0] < read_only < waits[1] < promote  # caught up after writes stopped
    assert rig.fake.calls[read_only].host == "freud" and rig.fake.calls[promote].host == "nietzsche"
    # Redis is asked on loopback with the password of the host's env file, handed over in the
    # environment: no password in any command line.
    command = rig.fake.calls[read_only].command
    assert "REDISCLI_AUTH=$sk_pass timeout 10 redis-cli -h 127.0.0.1 -p 6379" in command
    assert "f=/home/mastodon/live/.env.production" in command
    assert not [c for c in rig.fake.commands() if S[("mastodon", "REDIS_PASSWORD")] in c]


@pytest.mark.parametrize(("needle", "host", "reply", "says"), [
    ("INFO replication", "nietzsche", TARGET_INFO.replace("link_status:up", "link_status:down") + "@@ok\n",
     "gate 'nietzsche is a replica of freud' did not pass: redis on nietzsche replicates "
     "freud.hachyderm.internal:6379 (link down)"),
    ("INFO replication", "nietzsche", "role:master\nmaster_repl_offset:0\n@@ok\n",
     "gate 'nietzsche is a replica of freud' did not pass: redis on nietzsche is a master of its own"),
    ("slave_repl_offset", "nietzsche", TARGET_INFO.replace(":4242", ":4000") + "@@ok\n",
     "gate 'caught up' did not pass: 242 bytes of replication behind freud (at offset 4242) after waiting 1s"),
    ("INFO replication", "freud", "NOAUTH Authentication required.\n@@ok\n",
     "gate 'freud is the primary' did not pass: redis on freud answered 'NOAUTH Authentication required.'"),
])
def test_a_failed_redis_gate_halts_before_any_env_file_is_written_and_says_what_redis_answered(
        rig: Rig, example: FleetDir, needle: str, host: str, reply: str, says: str) -> None:
    desired, observed = redis_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, host, needle, reply)
    result = rig.executor(plan, desired).execute()
    done = outcomes(result)
    assert done[CHECK] == "failed" and {o for cid, o in done.items() if cid != CHECK} == {"skipped"}
    assert not env_writes(rig)
    assert not sent(rig, "CONFIG SET")
    [step] = [s for s in rig.steps(rig.runs[-1]).values() if s.action == "move-check"]
    assert step.error is not None and step.error.startswith(says), step.error


def test_a_replica_that_does_not_catch_up_after_writes_stopped_gives_the_source_its_writes_back(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = redis_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, "freud", "CONFIG SET min-replicas-to-write 0", "OK\n@@ok\n")
    replies = iter([TARGET_INFO, TARGET_INFO.replace(":4242", ":4100")])  # caught up at the check, not after

    def wait(call: Call) -> RunResult | None:
        return call.reply(next(replies) + "@@ok\n") if "slave_repl_offset" in call.command else None

    rig.fake.hook = wait
    result = rig.executor(plan, desired).execute()
    done = outcomes(result)
    assert done[CAUGHT_UP] == "failed" and done[PROMOTE] == "skipped"
    assert sent(rig, "CONFIG SET min-replicas-to-write 0", "freud")  # freud takes writes again
    assert not sent(rig, "REPLICAOF NO ONE") and not env_writes(rig)
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert failed.rollback.startswith("freud takes writes again (min-replicas-to-write 0); the fleet still points "
                                      "at it; ")
    assert "restarted the Sidekiq units quieted for the move, which resume against the source" in failed.rollback


def test_a_promoted_target_keeps_the_source_refusing_writes(rig: Rig, example: FleetDir) -> None:
    desired, observed = redis_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, "nietzsche", "REPLICAOF NO ONE", "replicaof OK\nconfig /etc/r.conf\nrewrite ERR x\nnames 1\n"
                                                 "role:master\n@@ok\n")
    rig.fake.hook = lambda call: call.reply("role:master\n@@ok\n") if (
        call.host == "nietzsche" and "INFO replication" in call.command and "REPLICAOF" not in call.command
        and "slave_repl_offset" not in call.command and sent(rig, "REPLICAOF NO ONE")) else None
    result = rig.executor(plan, desired).execute()
    assert outcomes(result)[PROMOTE] == "failed"
    assert not sent(rig, "CONFIG SET min-replicas-to-write 0")
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert failed.rollback.startswith("freud left refusing writes: redis on nietzsche is no longer a replica; ")
    assert "restarted" not in failed.rollback  # Sidekiq stays quiet: its jobs would fail against freud


def test_a_redis_step_refuses_a_plan_that_would_stop_another_unit_than_the_service_s(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = redis_moving(example)
    plan = build_plan(desired, observed, S)
    other = dataclasses.replace(desired, services=tuple(
        dataclasses.replace(s, unit="redis-server@main.service") if s.name == "redis" else s
        for s in desired.services))
    result = rig.executor(plan, other).execute()
    assert outcomes(result)[CHECK] == "failed" and not sent(rig, "INFO replication")


# ------------------------------------------------------------------ the commands, run for real


SH = shutil.which("sh") or "/bin/sh"


def sh(command: str) -> str:
    done = subprocess.run([SH, "-c", command], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    assert done.returncode == 0 and "@@ok" in done.stdout, done.stdout + done.stderr
    return done.stdout.replace("@@ok", "").strip()


@pytest.fixture
def env_file(redis: Redis, tmp_path: Path) -> Iterator[str]:
    path = tmp_path / ".env.production"
    path.write_text(redis.env())
    yield str(path)
    redis.cli("CONFIG", "SET", "min-replicas-to-write", "0")


def test_the_commands_read_only_and_writable_again_on_a_real_redis_with_a_password(
        redis: Redis, env_file: str) -> None:
    redis.cli("SET", "fleet:kept", "1")
    source, offset = rr.judge_source(MOVE, sh(rr.info_command(env_file, redis.port)))
    assert source.ok and offset is not None
    gate = rr.judge_refused(MOVE, sh(rr.read_only_command(env_file, redis.port)))
    assert gate.ok, gate
    assert redis.cli("SET", "fleet:kept", "2").startswith("NOREPLICAS")  # and it lasts: no timeout, no pause
    assert redis.cli("GET", "fleet:kept").strip() == "1"
    assert rr.said(sh(rr.writable_command(env_file, redis.port))) == "OK"
    assert redis.cli("SET", "fleet:kept", "3").strip() == "OK"
    # Without the env file's password Redis refuses fleet: the gate says so, nothing is printed of it.
    noauth = sh(rr.read_only_command("", redis.port))
    assert not rr.judge_refused(MOVE, noauth).ok and PASSWORD not in noauth
    assert PASSWORD not in rr.read_only_command(env_file, redis.port)


def test_the_promote_on_a_real_redis_takes_the_replicaof_line_out_of_its_config_file(
        redis: Redis, env_file: str) -> None:
    conf = redis.dir / "redis.conf"
    before = conf.read_text()
    conf.write_text(before + "replicaof 127.0.0.1 1\n")  # what an operator's replica setup would hold
    try:
        gate = rr.judge_promoted(MOVE, sh(rr.promote_command(env_file, redis.port)))
        assert gate.ok, gate
        assert "CONFIG REWRITE took the replicaof line out of" in gate.detail
        assert "replicaof" not in conf.read_text()
        again = rr.judge_promoted(MOVE, sh(rr.promote_command(env_file, redis.port)))
        assert again.ok and again.detail.endswith("names no master")
    finally:
        conf.write_text(before)


def test_a_source_whose_writes_are_not_refused_halts_the_move_and_is_given_its_writes_back(
        rig: Rig, example: FleetDir) -> None:
    desired, observed = redis_moving(example)
    plan = build_plan(desired, observed, S)
    healthy_move(rig)
    answer(rig, "freud", "min-replicas-to-write 2147483647", "set OK \nwrite 0 \n@@ok\n")  # the setting took no effect
    answer(rig, "freud", "CONFIG SET min-replicas-to-write 0", "OK\n@@ok\n")
    result = rig.executor(plan, desired).execute()
    done = outcomes(result)
    assert done[READ_ONLY] == "failed" and done[CAUGHT_UP] == "skipped" and not env_writes(rig)
    failed = next(o for o in result.outcomes if o.outcome == "failed")
    assert failed.error.startswith("gate 'source refuses writes' did not pass: a write on freud was not refused")
    assert failed.rollback.startswith("freud takes writes again (min-replicas-to-write 0)")
    assert rig.fake.calls[sent(rig, "INFO replication", "nietzsche")[-1]].seq < sent(rig, "min-replicas-to-write 0")[0]
