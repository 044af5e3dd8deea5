"""Data stores observed as they run (fleet/resources/stores.py): captured lab outputs of the
`@@stores` section parsed, judged into status cells, audit findings and the host summary; hostile
section text refused cleanly.

The captures (tests/fixtures/collect/README.md) are of the lab's database host, nietzsche: the
example converged, then its Postgres cluster killed, a streaming standby added, things stopped."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from observed import EXAMPLE_SECRETS, REPO, converged, example

from fleet import config
from fleet.audit import build_audit
from fleet.collect.parse import parse_host
from fleet.collect.script import build_script, spec_for
from fleet.errors import ParseError
from fleet.model import Desired, HostState, Kind, Service, StoreSpec
from fleet.output.json import status_json
from fleet.output.text import audit_text, status_text
from fleet.plan import desired_hash
from fleet.resources.stores import (
    MAX_LINES,
    Cluster,
    ClusterUnit,
    Probe,
    RedisState,
    StoreFacts,
    Upstream,
    clusters_of,
    facts,
    redis_of,
)
from fleet.status import Cell, build_status

LSN = 0x3016B78  # 0/3016B78, where the captured primary and standby stood


def capture(name: str) -> str:
    return (REPO / "tests" / "fixtures" / "collect" / f"{name}-nietzsche.txt").read_text()


def nietzsche(name: str, text: str | None = None) -> HostState:
    return parse_host("nietzsche", capture(name) if text is None else text)


def declared(**changes: StoreSpec | None) -> Desired:
    """The example with `store` (role, probe, port) set on its services by name."""
    d = example()
    services = tuple(dataclasses.replace(s, store=changes[s.name]) if s.name in changes else s for s in d.services)
    return dataclasses.replace(d, services=services)


def fleet_with(state: HostState, desired: Desired | None = None) -> tuple[Desired, dict[str, HostState]]:
    d = desired or example()
    return d, {**converged(d, EXAMPLE_SECRETS), "nietzsche": state}


def cell(desired: Desired, results: dict[str, HostState], service: str, host: str = "nietzsche") -> Cell:
    row = next(r for r in build_status(desired, dict(results)).rows if r.service == service)
    return next(c for c in row.cells if c.host == host)


# ------------------------------------------------------------------ what the captures say


def test_the_converged_database_host_reports_its_cluster_its_servers_answer_and_redis() -> None:
    f = facts(nietzsche("stores-converged"))
    assert f is not None
    assert [(s.unit, s.kind, s.port, s.probe) for s in f.services] == [
        ("postgresql.service", "postgres", 5432, True), ("redis-server.service", "redis", 6379, False)]
    assert f.units == (ClusterUnit("postgresql@15-main.service", "loaded", "active", "running"),)
    assert f.clusters == (Cluster("15", "main", 5432, "online,auto", "postgres"),)
    assert f.ready == ((5432, 0),)
    assert f.probes == (Probe(5432, in_recovery=False, lsn=0x1500790),)
    assert f.redis == (RedisState(6379, ping="PONG", role="master", offset=0, keys=5, queued=0, queues=0),)


def test_a_killed_cluster_is_failed_down_and_not_ready_while_its_parent_unit_stays_active() -> None:
    state = nietzsche("stores-cluster-killed")
    parent = state.unit("postgresql.service")
    assert parent is not None and parent.state() == "active/exited"
    (view,) = clusters_of(state, "postgresql.service")
    assert view.unit == ClusterUnit("postgresql@15-main.service", "loaded", "failed", "failed")
    assert view.cluster is not None and not view.cluster.online and view.ready == 2
    assert view.probe is None  # psql only asks an online cluster


def test_a_primary_and_its_standby_report_their_roles_upstream_and_wal_positions() -> None:
    views = {v.label: v for v in clusters_of(nietzsche("stores-primary-and-standby"), "postgresql.service")}
    primary, standby = views["15/main"], views["15/standby"]
    assert (primary.role, standby.role) == ("primary", "standby")
    assert primary.probe is not None and primary.probe.lsn == LSN
    assert [(s.address, s.state, s.replay_lsn) for s in primary.probe.standbys] == [("local", "streaming", LSN)]
    assert standby.probe is not None
    assert standby.probe.upstream == Upstream("streaming", "/var/run/postgresql", 5432)
    assert (standby.probe.lsn, standby.probe.replay_lsn, standby.probe.lag_bytes) == (LSN, LSN, 0)
    assert standby.probe.replay_age == 2
    assert standby.cluster is not None and standby.cluster.recovery


def test_redis_that_is_down_or_wants_a_password_fleet_lacks_is_told_apart() -> None:
    down = redis_of(nietzsche("stores-standby-stopped-redis-down"), "redis-server.service")
    assert down is not None and not down.answers
    assert down.error == "Could not connect to Redis at 127.0.0.1:6379: Connection refused"
    locked = redis_of(nietzsche("stores-redis-no-password"), "redis-server.service")
    assert locked is not None and locked.answers and locked.error == ""
    assert locked.ping == "NOAUTH Authentication required." and locked.role == "" and locked.keys is None


def test_an_output_without_the_section_has_no_store_facts_as_before() -> None:
    state = parse_host("nietzsche", (REPO / "tests" / "fixtures" / "collect" / "databases-nietzsche.txt").read_text())
    assert facts(state) is None and clusters_of(state, "postgresql.service") == []


# ------------------------------------------------------------------ status, audit, host summary


def test_a_killed_cluster_is_a_drift_cell_an_audit_error_naming_its_unit_and_in_the_host_summary() -> None:
    d, results = fleet_with(nietzsche("stores-cluster-killed"))
    c = cell(d, results, "postgres")
    assert c.status == "drift" and c.state == "active/exited"
    assert c.detail == ("cluster unit postgresql@15-main.service failed "
                        "(pg_isready on port 5432: no response)")
    text = status_text(build_status(d, dict(results)), now=1_800_000_000.0)
    assert "active/exited (!)" in text
    summary = text.split("HOST ", 1)[1].split("Sidekiq", 1)[0]
    assert "(!) postgres: cluster unit postgresql@15-main.service failed" in summary
    report = build_audit(d, results)
    errors = [f for f in report.errors if f.code == "store.cluster-failed"]
    assert [(f.host, f.message) for f in errors] == [
        ("nietzsche", "postgres on nietzsche: cluster unit postgresql@15-main.service failed "
                      "(pg_isready on port 5432: no response)")]
    assert "journalctl -u postgresql@15-main.service" in errors[0].hint
    assert "postgresql@15-main.service failed" in audit_text(report, now=1_800_000_000.0)
    cells = status_json(build_status(d, dict(results)))["services"]
    pg = next(r for r in cells if r["service"] == "postgres")["cells"]["nietzsche"]
    assert pg["status"] == "drift" and pg["problems"][0]["code"] == "store.cluster-failed"


def test_the_same_host_converged_is_ok_with_what_runs_in_its_notes_and_no_audit_error() -> None:
    d, results = fleet_with(nietzsche("stores-converged"))
    pg, redis = cell(d, results, "postgres"), cell(d, results, "redis")
    assert pg.status == "ok" and redis.status == "ok"
    assert pg.notes == ("15/main: primary, accepting connections on 5432",)
    assert redis.notes == ("redis on 6379: PONG, master, 5 key(s)",)
    assert not [f for f in build_audit(d, results).errors if f.code.startswith("store.")]


def test_a_stopped_cluster_and_a_redis_that_does_not_answer_are_not_ready() -> None:
    d, results = fleet_with(nietzsche("stores-standby-stopped-redis-down"))
    pg, redis = cell(d, results, "postgres"), cell(d, results, "redis")
    assert pg.detail == ("cluster 15/standby on port 5433: no response "
                         "(unit postgresql@15-standby.service inactive/dead)")
    assert redis.status == "drift"
    assert redis.detail == ("should be active, redis-cli PING on port 6379: Could not connect to Redis at "
                            "127.0.0.1:6379: Connection refused")
    errors = build_audit(d, results).errors
    codes = sorted((f.code, f.message.split(":")[0]) for f in errors if f.code.startswith("store"))
    assert codes == [("store.not-ready", "postgres on nietzsche"), ("store.not-ready", "redis on nietzsche")]


def test_redis_without_the_password_is_up_and_says_why_its_role_is_unknown() -> None:
    d, results = fleet_with(nietzsche("stores-redis-no-password"))
    redis = cell(d, results, "redis")
    assert redis.status == "ok"
    assert redis.notes == ("redis on 6379: PING: NOAUTH Authentication required., it needs a password "
                           "fleet found in no env file on this host",)


def test_a_declared_role_is_checked_against_the_server_and_pg_lsclusters() -> None:
    state = nietzsche("stores-primary-and-standby")
    d, results = fleet_with(state, declared(postgres=StoreSpec(role="primary", probe=True)))
    pg = cell(d, results, "postgres")
    assert pg.detail == "15/standby is a standby, declared primary: the server says so (pg_is_in_recovery)"
    # Without the probe's answer, pg_lsclusters' recovery flag says the same.
    unprobed = parse_host("nietzsche", "\n".join(x for x in capture("stores-primary-and-standby").split("\n")
                                                 if not x.startswith("pg-sql ")))
    d, results = fleet_with(unprobed, declared(postgres=StoreSpec(role="primary")))
    assert cell(d, results, "postgres").problems[0].message == (
        "15/standby is a standby, declared primary: pg_lsclusters says so (recovery)")


def test_each_cluster_unit_declared_as_its_own_service_is_judged_alone() -> None:
    """A primary and a standby on one host are two services, one per cluster unit."""
    text = capture("stores-primary-and-standby").replace(
        "service postgresql.service postgres 5432 probe\n",
        "service postgresql@15-main.service postgres 5432 probe\nservice postgresql@15-standby.service postgres 5433 "
        "probe\n")
    d = example()
    pg = next(s for s in d.services if s.name == "postgres")
    services = [s for s in d.services if s.name != "postgres"] + [
        dataclasses.replace(pg, name="pg-main", unit="postgresql@15-main.service", store=StoreSpec(role="primary")),
        dataclasses.replace(pg, name="pg-standby", unit="postgresql@15-standby.service",
                            store=StoreSpec(role="standby", port=5433))]
    d = dataclasses.replace(d, services=tuple(services))
    _, results = fleet_with(nietzsche("", text), d)
    main, standby = cell(d, results, "pg-main"), cell(d, results, "pg-standby")
    assert main.status == standby.status == "ok", (main, standby)
    assert main.notes == ("15/main: primary, accepting connections on 5432, standbys: local streaming lag 0 B",)
    assert standby.notes == ("15/standby: standby, accepting connections on 5433, of /var/run/postgresql:5432 "
                             "(streaming), replay lag 0 B, last replayed 2 s ago",)


def test_a_redis_replica_declared_primary_is_a_role_problem() -> None:
    state = nietzsche("stores-converged")
    f = facts(state)
    assert f is not None
    replica = RedisState(6379, ping="PONG", role="slave", master=("10.0.0.9", 6379), link="connected", offset=77)
    state = dataclasses.replace(state, extra=(("stores", dataclasses.replace(f, redis=(replica,))),))
    d, results = fleet_with(state, declared(redis=StoreSpec(role="primary")))
    redis = cell(d, results, "redis")
    assert redis.detail == "Redis on port 6379 is a replica, declared primary (ROLE)"
    assert redis.notes == ("redis on 6379: PONG, replica of 10.0.0.9:6379 (link connected)",)


def test_pgbouncer_that_does_not_accept_connections_is_not_ready() -> None:
    d = example()
    bouncer = Service(name="pgbouncer", kind=Kind.PGBOUNCER, unit="pgbouncer.service", hosts=("nietzsche",),
                      observe_only=True)
    d = dataclasses.replace(d, services=(*d.services, bouncer))
    text = capture("stores-converged").replace(
        "service redis-server.service redis 6379 -\n",
        "service redis-server.service redis 6379 -\nservice pgbouncer.service pgbouncer 6432 -\n").replace(
        "redis 6379 \"PONG\"", "pg-ready 6432 2\nredis 6379 \"PONG\"")
    text = text.replace("Id=redis-server.service\n", "Id=redis-server.service\n", 1)
    state = nietzsche("", text)
    state = dataclasses.replace(state, units=(*state.units, dataclasses.replace(
        state.units[0], unit="pgbouncer.service", active_state="active", sub_state="running")))
    _, results = fleet_with(state, d)
    c = cell(d, results, "pgbouncer")
    assert c.detail == "pg_isready on port 6432: no response"


def test_a_plans_desired_hash_does_not_change_for_services_that_declare_no_store_keys() -> None:
    """Saved plans stay valid across this change: `store` is left out of the hash while unset."""
    d = example()
    assert all(s.store is None for s in d.services)
    with_role = declared(postgres=StoreSpec(role="primary"))
    assert desired_hash(with_role) != desired_hash(d)
    assert desired_hash(declared(postgres=None)) == desired_hash(d)


# ------------------------------------------------------------------ the script asks what is declared


def test_only_hosts_with_a_declared_data_store_run_the_section_and_psql_only_when_probing() -> None:
    d = example()
    assert "@@stores" not in build_script(spec_for(d, "fritz"))
    script = build_script(spec_for(d, "nietzsche"))
    assert "echo 'service postgresql.service postgres 5432 -'" in script
    assert "pg_probe=''" in script  # no cluster is asked anything with psql
    probing = build_script(spec_for(declared(postgres=StoreSpec(probe=True)), "nietzsche"))
    assert "pg_probe=all" in probing
    assert "f=/home/mastodon/live/.env.production" in script  # where the Redis password is read


# ------------------------------------------------------------------ hostile section text


def section(body: str) -> str:
    return capture("stores-converged").split("@@stores\n", 1)[0] + "@@stores\n" + body + "@@end\n"


BAD = [
    ("unknown tag", "rm -rf /\n"),
    ("a section argument", None),
    ("port zero", "pg-ready 0 0\n"),
    ("port too large", "redis 70000 exit 0\n"),
    ("bad service kind", "service x.service mysql 5432 -\n"),
    ("cluster unit not a cluster", "pg-unit sshd.service loaded active running\n"),
    ("cluster unit with a space state", "pg-unit postgresql@15-main.service loaded active\n"),
    ("malformed cluster", "pg-cluster fifteen main 5432 online postgres\n"),
    ("cluster after none", "pg-clusters none\npg-cluster 15 main 5432 online postgres\n"),
    ("readiness word", "pg-ready 5432 yes\n"),
    ("bad lsn", "pg-sql 5432 recovery|false||\npg-sql 5432 lsn|nonsense|-|-\npg-sql 5432 exit 0\n"),
    ("short row", "pg-sql 5432 recovery|false||\npg-sql 5432 replica|only-two\npg-sql 5432 exit 0\n"),
    ("age not a number", "pg-sql 5432 recovery|true||\npg-sql 5432 lsn|0/1|0/1|soon\npg-sql 5432 exit 0\n"),
    ("three replies", "redis 6379 \"PONG\"\nredis 6379 \"master\",0,\nredis 6379 5\nredis 6379 exit 0\n"),
    ("malformed role", "redis 6379 \"PONG\"\nredis 6379 \"slave\",\"x\"\nredis 6379 5\nredis 6379 0,0\n"
                       "redis 6379 exit 0\n"),
    ("keys not a number", "redis 6379 \"PONG\"\nredis 6379 \"master\",0,\nredis 6379 \"many\"\nredis 6379 0,0\n"
                          "redis 6379 exit 0\n"),
    ("broken quote", "redis 6379 \"PONG\nredis 6379 \"master\",0,\nredis 6379 5\nredis 6379 0,0\nredis 6379 exit 0\n"),
    ("a very long line", "redis 6379 " + "x" * 5000 + "\n"),
    ("too many sql lines", "".join(f"pg-sql 5432 notice {i}\n" for i in range(100))),
    ("too many clusters", "".join(f"pg-cluster 15 c{i} {5000 + i} online postgres\n" for i in range(100))),
]


@pytest.mark.parametrize(("what", "body"), BAD, ids=[b[0] for b in BAD])
def test_a_malformed_section_is_a_parse_error_naming_the_section(what: str, body: str | None) -> None:
    text = section(body or "").replace("@@stores\n", "@@stores extra\n") if body is None else section(body)
    with pytest.raises(ParseError) as e:
        parse_host("nietzsche", text)
    assert e.value.section == "stores" and e.value.host == "nietzsche"


def test_a_flood_of_lines_is_refused_by_count_before_it_costs_memory() -> None:
    with pytest.raises(ParseError, match="more than"):
        parse_host("nietzsche", section("pg-ready 5432 0\n" * (MAX_LINES + 1)))


CUT = [
    ("psql cut short", "pg-sql 5432 recovery|false||\n", "psql", "its output was cut short"),
    ("psql failed", "pg-sql 5432 psql: error: connection refused\npg-sql 5432 exit 2\n", "psql",
     "psql: error: connection refused"),
    ("psql timed out", "pg-sql 5432 exit 124\n", "psql", "psql: no answer within 10 s"),
    ("psql no answer", "pg-sql 5432 exit 0\n", "psql", "psql printed no answer"),
    ("redis cut short", "redis 6379 \"PONG\"\n", "redis", "redis-cli's output was cut short"),
    ("redis stopped part way", "redis 6379 \"PONG\"\nredis 6379 exit 124\n", "redis",
     "redis-cli: no answer within 10 s"),
    ("no redis-cli", "redis 6379 redis-cli is not installed\nredis 6379 exit 127\n", "redis",
     "redis-cli is not installed"),
]


@pytest.mark.parametrize(("what", "body", "tool", "error"), CUT, ids=[c[0] for c in CUT])
def test_a_tool_that_failed_or_was_cut_short_is_an_error_value_not_a_parse_error(what: str, body: str, tool: str,
                                                                               error: str) -> None:
    f = facts(parse_host("nietzsche", section(body)))
    assert f is not None
    got = f.probes[0].error if tool == "psql" else f.redis[0].error
    assert got == error


def test_messages_and_escapes_in_what_the_tools_print_stay_text() -> None:
    body = ("service redis-server.service redis 6379 -\n"
            "redis 6379 AUTH failed: WRONGPASS invalid username-password pair\n"
            "redis 6379 ERROR,\"NOAUTH \\\"Authentication\\\" required.\"\nredis 6379 ERROR,\"x\"\n"
            "redis 6379 ERROR,\"x\"\nredis 6379 ERROR,\"x\"\nredis 6379 exit 0\n")
    r = facts(parse_host("nietzsche", section(body)))
    assert r is not None
    assert r.redis == (RedisState(6379, ping='NOAUTH "Authentication" required.',
                                  auth="WRONGPASS invalid username-password pair"),)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_garbage_in_the_section_is_a_parse_error_never_a_crash(text: str) -> None:
    try:
        parse_host("nietzsche", section(text.replace("@@", "") + "\n"))
    except ParseError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_captured_section_with_lines_damaged_parses_or_fails_cleanly(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(["stores-converged", "stores-primary-and-standby", "stores-redis-no-password",
                                      "stores-standby-stopped-redis-down", "stores-cluster-killed"]))
    head, body = capture(name).split("@@stores\n", 1)
    lines = body.split("\n")
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = rng.randrange(len(lines) - 2)
        action = rng.choice(["drop", "cut", "dup", "swap"])
        if action == "drop":
            del lines[i]
        elif action == "cut":
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif action == "dup":
            lines.insert(i, lines[i])
        else:
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
    try:
        state = parse_host("nietzsche", head + "@@stores\n" + "\n".join(lines))
    except ParseError:
        return
    d, results = fleet_with(state)
    json.dumps(status_json(build_status(d, dict(results))))
    build_audit(d, results)


def test_hand_made_facts_the_parser_could_give_judge_without_crashing() -> None:
    """Every combination of what a cluster can report is judged into text (the notes and problems
    are total over the facts' fields)."""
    state = nietzsche("stores-converged")
    f = facts(state)
    assert f is not None
    d = declared(postgres=StoreSpec(role="standby", probe=True))
    for status in ("online", "down,auto", "down,manual", "online,recovery,auto"):
        for unit in (None, ClusterUnit("postgresql@15-main.service", "loaded", "failed", "failed")):
            for ready in (0, 1, 2, 3, 124, None):
                for probe in (None, Probe(5432, error="x"), Probe(5432, in_recovery=True, lsn=5, replay_lsn=3,
                                                                   upstream=None)):
                    facts_ = dataclasses.replace(
                        f, clusters=(Cluster("15", "main", 5432, status),), units=(unit,) if unit else (),
                        ready=((5432, ready),), probes=(probe,) if probe else ())
                    s = dataclasses.replace(state, extra=(("stores", facts_),))
                    _, results = fleet_with(s, d)
                    c = cell(d, results, "postgres")
                    assert c.notes and c.notes[0].startswith("15/main: ")


def test_the_facts_are_plain_frozen_data() -> None:
    f = facts(nietzsche("stores-primary-and-standby"))
    assert isinstance(f, StoreFacts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.units = ()  # type: ignore[misc]
    assert hash(f) == hash(facts(nietzsche("stores-primary-and-standby")))


def test_the_example_still_loads_with_no_store_keys() -> None:
    loaded = config.load(REPO / "desired_state.toml", REPO / "hosts")
    assert loaded.desired is not None and not loaded.errors
