"""Moves of a data store (fleet/moves.py, `[moves.SERVICE]` in config.py): a plan that would move
postgres or redis to another host, or repoint DB_HOST/REDIS_HOST, without a declaration is
refused — naming the service, from, to, and the TOML that declares it; the declaration itself is
validated like every other key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FleetDir
from observed import EXAMPLE_SECRETS as S
from observed import bare, converged, distro_unit, set_env_value, with_unit
from observed import example as shipped

from fleet import cli
from fleet.model import Desired, HostResult, HostState
from fleet.moves import MoveRefused, data_gates, pending
from fleet.plan import build_plan, desired_hash
from fleet.resources.stores import Asked, Cluster, DataStores, Probe, RedisState, StoreFacts, Upstream
from fleet.workflows import observe as observing
from fleet.workflows.observe import Observation

POSTGRES_ON_NIETZSCHE = 'unit = "postgresql.service"\nhosts = ["nietzsche"]'
REDIS_ON_NIETZSCHE = 'unit = "redis-server.service"\nhosts = ["nietzsche"]'
DB_HOST_NIETZSCHE = 'DB_HOST = "nietzsche.hachyderm.internal"'
REDIS_HOST_NIETZSCHE = 'REDIS_HOST = "nietzsche.hachyderm.internal"'
DECLARED = '[moves.postgres]\nfrom = "freud"\nto = "nietzsche"\nmethod = "streaming-replica"\n'


def loaded(fd: FleetDir) -> Desired:
    result = fd.load()
    assert result.desired is not None and not result.errors, result.findings
    return result.desired


def before_the_move(fd: FleetDir) -> dict[str, HostResult]:
    """The fleet as it runs before the postmortem's action: postgres and redis on freud, and
    every env file pointing there — observed, as fleet would see it once converged."""
    before = FleetDir.create(fd.root.parent / "before", fd.text(), {p.name: p.read_text() for p in
                                                                     fd.hosts_dir.glob("*.toml")})
    before.edit(POSTGRES_ON_NIETZSCHE, POSTGRES_ON_NIETZSCHE.replace("nietzsche", "freud"))
    before.edit(REDIS_ON_NIETZSCHE, REDIS_ON_NIETZSCHE.replace("nietzsche", "freud"))
    before.edit(DB_HOST_NIETZSCHE, DB_HOST_NIETZSCHE.replace("nietzsche", "freud"))
    before.edit(REDIS_HOST_NIETZSCHE, REDIS_HOST_NIETZSCHE.replace("nietzsche", "freud"))
    return dict(converged(loaded(before), S))


def refusal(desired: Desired, observed: dict[str, HostResult]) -> MoveRefused:
    with pytest.raises(MoveRefused) as e:
        build_plan(desired, observed, S)
    return e.value


def test_moving_postgres_and_redis_without_a_declaration_is_refused_with_the_toml_to_declare(
        example: FleetDir) -> None:
    observed = before_the_move(example)
    e = refusal(loaded(example), observed)
    assert e.message.startswith("refusing to plan: postgres would move from freud to nietzsche without a move "
                                "declaration (postgresql.service runs on freud, where postgres is not declared, "
                                "and would start on nietzsche; DB_HOST on ")
    assert "redis would move from freud to nietzsche without a move declaration" in e.message
    assert "REDIS_HOST on franz, freud, fritz, nietzsche points at freud and would point at nietzsche" in e.message
    assert '[moves.postgres]\n    from = "freud"\n    to = "nietzsche"\n    method = "streaming-replica"' in e.hint
    assert '[moves.redis]\n    from = "freud"\n    to = "nietzsche"\n    method = "redis-replica"' in e.hint
    assert str(example.desired_path) in e.hint


def test_repointing_db_host_alone_is_a_move_while_the_old_server_runs(example: FleetDir) -> None:
    """Both servers run (nietzsche a standby, say): rewriting DB_HOST is the dangerous step."""
    desired = loaded(example)
    observed = dict(converged(desired, S))
    observed["freud"] = with_unit(observed["freud"], distro_unit("postgresql.service", sub="exited"))
    for h in ("franz", "freud", "fritz", "nietzsche"):
        observed[h] = set_env_value(observed[h], "DB_HOST", "freud")  # by inventory name
    [move] = pending(desired, observed)
    assert (move.service, move.sources, move.targets) == ("postgres", ("freud",), ("nietzsche",))
    assert move.evidence == ("DB_HOST on franz, freud, fritz, nietzsche points at freud and would point at nietzsche",)
    assert "[moves.postgres]" in refusal(desired, observed).hint


def test_a_server_left_running_where_nothing_points_is_a_note_not_a_move(example: FleetDir) -> None:
    desired = loaded(example)
    observed = dict(converged(desired, S))
    observed["freud"] = with_unit(observed["freud"], distro_unit("postgresql.service", sub="exited"))
    assert pending(desired, observed) == []
    assert build_plan(desired, observed, S).changes == ()


def test_a_repointed_setting_whose_old_host_runs_no_store_is_no_move(example: FleetDir) -> None:
    """DB_HOST pointed at fritz, where no postgres runs: Mastodon had no database there to lose."""
    desired = loaded(example)
    observed = dict(converged(desired, S))
    observed["fritz"] = set_env_value(observed["fritz"], "DB_HOST", "fritz")
    assert pending(desired, observed) == []
    assert [c.id for c in build_plan(desired, observed, S).changes][0].startswith("fritz:write-env:")


def test_a_first_install_moves_nothing() -> None:
    assert pending(shipped(), bare(shipped())) == []


def test_a_declared_move_against_another_source_is_refused_naming_the_declaration(example: FleetDir) -> None:
    observed = before_the_move(example)
    example.append(DECLARED.replace('from = "freud"', 'from = "fritz"'))
    e = refusal(loaded(example), observed)
    assert ("postgres would move from freud to nietzsche, but [moves.postgres] declares fritz -> nietzsche"
            in e.message)
    assert 'from = "freud"' in e.hint


def test_a_declared_redis_move_with_a_postgres_move_is_refused_one_at_a_time(example: FleetDir) -> None:
    observed = before_the_move(example)
    example.append(DECLARED + '\n[moves.redis]\nfrom = "freud"\nto = "nietzsche"\nmethod = "redis-replica"\n')
    e = refusal(loaded(example), observed)
    assert e.message.startswith("refusing to plan: the move of postgres from freud to nietzsche (its data now: ")
    assert "; and of redis from freud to nietzsche (its data now: " in e.message
    assert "is declared, but fleet runs one move's runbook at a time" in e.message


def test_a_declaration_changes_nothing_when_there_is_nothing_to_move(example: FleetDir) -> None:
    """The move is done (or the table stayed): the plan is the one without the table."""
    desired = loaded(example.append(DECLARED))
    observed = dict(converged(desired, S))
    assert build_plan(desired, observed, S).changes == ()


def test_plans_without_a_move_declaration_keep_their_desired_hash(example: FleetDir) -> None:
    """No `moves` table: the desired state hashes as before moves existed (saved plans stay valid)."""
    plain = desired_hash(loaded(example))
    assert plain == desired_hash(shipped())
    assert desired_hash(loaded(example.append(DECLARED))) != plain


@pytest.mark.parametrize(("table", "key", "code", "says"), [
    ('[moves.postgre]\nfrom = "freud"\nto = "nietzsche"\nmethod = "streaming-replica"\n', "moves.postgre",
     "config.unknown-service", "[moves.postgre] names no declared service"),
    ('[moves.web]\nfrom = "freud"\nto = "nietzsche"\nmethod = "streaming-replica"\n', "moves.web",
     "config.bad-value", "service web is of kind 'web'; only postgres and redis services are moved this way"),
    ('[moves.postgres]\nfrom = "froud"\nto = "nietzsche"\nmethod = "streaming-replica"\n', "moves.postgres.from",
     "config.unknown-host", "moves.postgres.from = 'froud' is no host of the inventory"),
    ('[moves.postgres]\nfrom = "nietzsche"\nto = "nietzsche"\nmethod = "streaming-replica"\n', "moves.postgres.to",
     "config.bad-value", "moves.postgres moves postgres from nietzsche to the same host"),
    ('[moves.postgres]\nfrom = "freud"\nto = "fritz"\nmethod = "streaming-replica"\n', "moves.postgres.to",
     "config.bad-value", "moves.postgres.to = 'fritz', but services.postgres.hosts does not list it"),
    ('[moves.redis]\nfrom = "freud"\nto = "nietzsche"\nmethod = "streaming-replica"\n', "moves.redis.method",
     "config.bad-value", "moves.redis.method = 'streaming-replica' is not how fleet moves a redis service"),
    ('[moves.postgres]\nfrom = "freud"\nto = "nietzsche"\n', "moves.postgres.method",
     "config.missing-key", "missing required key 'moves.postgres.method'"),
    ('[moves.postgres]\nfrom = "freud"\nto = "nietzsche"\nmethod = "streaming-replica"\ndrain = true\n',
     "moves.postgres.drain", "config.unknown-key", "unknown key 'moves.postgres.drain'"),
    ('[moves]\npostgres = "nietzsche"\n', "moves.postgres", "config.wrong-type", "'moves.postgres' must be a table"),
])
def test_a_bad_move_declaration_is_an_error_naming_file_key_and_line(
        example: FleetDir, table: str, key: str, code: str, says: str) -> None:
    example.append(table)
    errors = [f for f in example.check() if f.is_error]
    assert [(f.code, f.key) for f in errors] == [(code, key)], errors
    [f] = errors
    assert says in f.message and f.file == str(example.desired_path) and f.hint
    first = len(example.text().rstrip("\n").splitlines()) - len(table.rstrip("\n").splitlines()) + 1
    assert f.line is not None and f.line >= first


def test_the_source_still_declared_is_an_error(example: FleetDir) -> None:
    example.edit(POSTGRES_ON_NIETZSCHE, 'unit = "postgresql.service"\nhosts = ["nietzsche", "freud"]')
    example.append(DECLARED)
    errors = [f for f in example.check() if f.is_error and f.key.startswith("moves.")]
    assert [(f.code, f.key) for f in errors] == [("config.bad-value", "moves.postgres.from")]
    assert "remove freud from services.postgres.hosts" in errors[0].hint


@pytest.mark.parametrize("command", [["plan"], ["apply", "--yes"], ["plan", "--json"],
                                     ["plan", "--limit", "fritz"], ["apply", "--yes", "--limit", "fritz"]])
def test_fleet_plan_and_apply_exit_1_with_the_refusal_and_the_hint(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], example: FleetDir, tmp_path: Path,
        command: list[str]) -> None:
    from fleet.transport.fake import FakeTransport
    observed = before_the_move(example)
    fake = FakeTransport()
    fake.respond("mkdir -p", "@@locked\n")

    def observe(common: Any, scope: Any, name: str, desired: Any, targets: Any, t: Any, r: Any) -> Observation:
        return Observation({h.name: observed[h.name] for h in targets.hosts}, "")

    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: fake)
    monkeypatch.setattr(observing, "observe", observe)
    secrets = tmp_path / "secrets.toml"
    secrets.write_text("[mastodon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for (_, k), v in S.items()))
    secrets.chmod(0o600)
    code = cli.main(["--dir", str(example.root), "--state-dir", str(tmp_path / "state"), *command[:1],
                     "--secrets", str(secrets), *command[1:]])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("fleet: error: refusing to plan: postgres would move from freud to nietzsche without a "
                          "move declaration"), err
    assert '  hint: declare the move in ' in err and '    [moves.postgres]\n    from = "freud"\n' in err
    assert [c for c in fake.commands() if "/var/lib/fleet/lock" not in c] == []  # nothing sent but locks


# ------------------------------------------------------------------ the data gates of a declared move

PG = Asked("postgresql.service", "postgres", 5432, True)
REDIS = Asked("redis-server.service", "redis", 6379)


def with_facts(state: HostResult, *, probe: Probe | None = None, redis: RedisState | None = None) -> HostState:
    assert isinstance(state, HostState)
    clusters = (Cluster("15", "main", 5432, "online,recovery" if probe and probe.in_recovery else "online"),)
    f = StoreFacts(services=(PG, REDIS), clusters=clusters, ready=((5432, 0),),
                   probes=(probe,) if probe else (), redis=(redis,) if redis else ())
    return dataclasses.replace(state, extra=(("stores", f),))


def moving(example: FleetDir, *, probe: bool = True) -> Desired:
    if probe:
        example.edit(POSTGRES_ON_NIETZSCHE, POSTGRES_ON_NIETZSCHE + "\nprobe = true")
    return loaded(example.append(DECLARED + '\n[moves.redis]\nfrom = "freud"\nto = "nietzsche"\n'
                                            'method = "redis-replica"\n'))


def gates_of(desired: Desired, service: str, source: HostState, target: HostState) -> list[tuple[str, bool, str]]:
    move = desired.move(service)
    assert move is not None
    observed: dict[str, HostResult] = {"freud": source, "nietzsche": target}
    return [(g.check, g.ok, g.detail) for g in data_gates(desired, move, observed)]


PRIMARY = Probe(5432, in_recovery=False, lsn=5000)
STREAMING = Upstream("streaming", "freud.hachyderm.internal", 5432)  # the source by its address


def test_the_source_of_a_declared_move_is_asked_about_its_store_though_no_longer_declared_there(
        example: FleetDir) -> None:
    plain = loaded(example)
    assert DataStores().to_collect(plain, "freud").services == ()
    desired = moving(example)
    assert [a.unit for a in DataStores().to_collect(desired, "freud").services] == [
        "postgresql.service", "redis-server.service"]


def test_a_caught_up_streaming_standby_of_the_source_passes_every_postgres_gate(example: FleetDir) -> None:
    desired, base = moving(example), converged(shipped(), S)
    target = with_facts(base["nietzsche"], probe=Probe(5432, in_recovery=True, lsn=5000, replay_lsn=5000,
                                                        upstream=STREAMING))
    assert gates_of(desired, "postgres", with_facts(base["freud"], probe=PRIMARY), target) == [
        ("freud is the primary", True, "15/main on freud is a primary at WAL 5000"),
        ("nietzsche is a standby of freud", True,
         "15/main on nietzsche streams from freud.hachyderm.internal:5432 (streaming)"),
        ("caught up", True, "replayed everything the primary had written")]


def test_a_lagging_standby_is_not_caught_up_by_the_bytes_it_has_not_replayed(example: FleetDir) -> None:
    desired, base = moving(example), converged(shipped(), S)
    target = with_facts(base["nietzsche"], probe=Probe(5432, in_recovery=True, lsn=4000, replay_lsn=3000,
                                                        upstream=STREAMING))
    assert gates_of(desired, "postgres", with_facts(base["freud"], probe=PRIMARY), target)[-1] == (
        "caught up", False, "2000 bytes of WAL behind freud")


def test_an_empty_new_cluster_on_the_target_is_no_standby_of_the_source(example: FleetDir) -> None:
    desired, base = moving(example), converged(shipped(), S)
    target = with_facts(base["nietzsche"], probe=Probe(5432, in_recovery=False, lsn=100))
    [_, (check, ok, detail)] = gates_of(desired, "postgres", with_facts(base["freud"], probe=PRIMARY), target)
    assert (check, ok) == ("nietzsche is a standby of freud", False)
    assert detail.startswith("no standby cluster of postgresql.service on nietzsche (15/main: primary): a new, empty")


def test_a_standby_of_another_host_is_not_the_source_s_standby(example: FleetDir) -> None:
    desired, base = moving(example), converged(shipped(), S)
    target = with_facts(base["nietzsche"], probe=Probe(5432, in_recovery=True, lsn=5000, replay_lsn=5000,
                                                        upstream=Upstream("streaming", "fritz", 5432)))
    gates = gates_of(desired, "postgres", with_facts(base["freud"], probe=PRIMARY), target)
    assert gates[-1] == ("nietzsche is a standby of freud", False,
                         "15/main on nietzsche streams from fritz:5432 (streaming)")


def test_without_probe_the_postgres_gates_say_what_to_allow(example: FleetDir) -> None:
    desired, base = moving(example, probe=False), converged(shipped(), S)
    [(check, ok, detail)] = gates_of(desired, "postgres", with_facts(base["freud"]), with_facts(base["nietzsche"]))
    assert (check, ok) == ("probe allowed", False) and "probe = true" in detail


def test_a_redis_replica_holds_the_source_s_keys_only_with_as_many(example: FleetDir) -> None:
    desired, base = moving(example), converged(shipped(), S)
    source = with_facts(base["freud"], redis=RedisState(6379, ping="PONG", role="master", keys=1200, queued=3))
    full = RedisState(6379, ping="PONG", role="slave", master=("freud", 6379), link="connected", keys=1200)
    assert gates_of(desired, "redis", source, with_facts(base["nietzsche"], redis=full)) == [
        ("freud is the primary", True, "redis on freud: master"),
        ("nietzsche is a replica of freud", True, "redis on nietzsche replicates freud:6379 (link connected)"),
        ("holds the source's keys", True, "1200 keys on nietzsche, 1200 on freud")]
    empty = dataclasses.replace(full, keys=0, link="sync")
    assert gates_of(desired, "redis", source, with_facts(base["nietzsche"], redis=empty))[1:] == [
        ("nietzsche is a replica of freud", False, "redis on nietzsche replicates freud:6379 (link sync)")]
    alone = RedisState(6379, ping="PONG", role="master", keys=0)
    assert gates_of(desired, "redis", source, with_facts(base["nietzsche"], redis=alone))[1][:2] == (
        "nietzsche is a replica of freud", False)


def test_the_refusal_of_a_declared_move_says_what_its_data_gates_see_now(example: FleetDir) -> None:
    observed = before_the_move(example)
    desired = moving(example)
    observed["freud"] = with_facts(observed["freud"], probe=PRIMARY)
    observed["nietzsche"] = with_facts(observed["nietzsche"], probe=Probe(5432, in_recovery=True, lsn=4000,
                                                                          replay_lsn=4000, upstream=STREAMING))
    e = refusal(desired, observed)
    assert ("the move of postgres from freud to nietzsche (its data now: ok: freud is the primary: 15/main on "
            "freud is a primary at WAL 5000; ok: nietzsche is a standby of freud: 15/main on nietzsche streams from "
            "freud.hachyderm.internal:5432 (streaming); NOT YET: caught up: 1000 bytes of WAL behind freud); and "
            "of redis from freud to nietzsche (its data now: NOT YET: freud is the primary: redis on freud was "
            "not asked; NOT YET: nietzsche is a replica of freud: redis on nietzsche: not asked; make it a replica "
            "of the source first (REPLICAOF)) is declared") in e.message
