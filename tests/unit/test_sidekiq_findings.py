"""Sidekiq's view cross-checked with systemd and the declaration: the join, each finding, the
[policy.sidekiq] validator and where the view is read from.  Expectation tables over the shipped
example, converged (tests/unit/observed.py), with a view that agrees with it and one defect at a time."""

from __future__ import annotations

import calendar
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from observed import (
    EXAMPLE_SECRETS,
    change_unit,
    converged,
    example,
    stopped,
    undeclared_sidekiq,
    unreachable,
    with_unit,
)

from fleet.model import Desired, Finding, HostResult, HostState
from fleet.sidekiq import (
    BEAT_EXPIRY,
    QueueState,
    RedisSource,
    SidekiqPolicy,
    SidekiqProcess,
    SidekiqView,
    active_since,
    check,
    host_names,
    join,
    load_policy,
    locate_redis,
    sidekiq_units,
    track_quiet,
)

NOW = 1_800_000_000.0
QUEUES = ("default", "push", "ingress", "mailers", "pull", "scheduler", "fasp")


def fleet() -> tuple[Desired, dict[str, HostResult]]:
    desired = example()
    return desired, dict(converged(desired, EXAMPLE_SECRETS))


def process(host: str, pid: int, queues: tuple[tuple[str, int], ...], concurrency: int, **kw: Any) -> SidekiqProcess:
    fields: dict[str, Any] = dict(identity=f"{host}:{pid}:0123456789ab", hostname=host, pid=pid, tag="live",
                                  concurrency=concurrency, queues=queues, labels=(), started_at=NOW - 3600,
                                  version="7.3.9", busy=0, beat=NOW - 3, quiet=False, rss=200_000, rtt_us=300)
    fields.update(kw)
    return SidekiqProcess(**fields)


def agreeing_view(desired: Desired, results: dict[str, HostResult], **queues: QueueState) -> SidekiqView:
    """What Redis shows when every declared Sidekiq unit runs as declared."""
    procs = []
    for u in sidekiq_units(desired, results):
        if u.active and u.declared:
            assert u.concurrency is not None
            procs.append(process(u.host, u.main_pid, u.queues, u.concurrency))
    states = tuple(queues.get(q, QueueState(q, 0, None, 0.0)) for q in QUEUES)
    return SidekiqView(redis_time=NOW, processes=tuple(procs), queues=states, processes_total=len(procs),
                       queues_total=len(states))


def without(view: SidekiqView, host: str, unit_pid: int) -> SidekiqView:
    kept = tuple(p for p in view.processes if not (p.hostname == host and p.pid == unit_pid))
    return dataclasses.replace(view, processes=kept, processes_total=len(kept) + len(view.stale))


def adding(view: SidekiqView, *extra: SidekiqProcess) -> SidekiqView:
    procs = view.processes + extra
    return dataclasses.replace(view, processes=procs, processes_total=len(procs) + len(view.stale))


def pid_of(results: dict[str, HostResult], host: str, unit: str) -> int:
    state = results[host]
    assert isinstance(state, HostState)
    u = state.unit(unit)
    assert u is not None
    return u.main_pid


def codes(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return sorted((f.severity, f.code, f.host) for f in findings)


def only(findings: list[Finding], code: str) -> Finding:
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, findings
    return found[0]


def run(view: SidekiqView, results: dict[str, HostResult] | None = None, *, policy: SidekiqPolicy | None = None,
        quiet_since: dict[str, float] | None = None, now: float = NOW) -> list[Finding]:
    desired, fresh = fleet()
    return check(desired, results or fresh, view, now, policy or SidekiqPolicy(), quiet_since=quiet_since)


SCHEDULER = "mastodon-sidekiq-scheduler.service"
DEFAULT = "mastodon-sidekiq-default.service"


def test_a_fleet_running_as_declared_has_no_findings() -> None:
    desired, results = fleet()
    view = agreeing_view(desired, results)
    assert len(view.processes) == 4
    assert run(view, results) == []
    matches, unmatched = join(view.processes, sidekiq_units(desired, results), host_names(desired, results))
    assert unmatched == [] and all(m.unit is not None and m.how == "pid" for m in matches)


# ------------------------------------------------------------------------- processes without a unit


def test_a_sidekiq_started_by_hand_on_the_cdn_node_is_unmanaged_and_forbidden_there() -> None:
    desired, results = fleet()
    view = adding(agreeing_view(desired, results), process("franz", 5555, (("default", 0),), 10))
    findings = run(view, results)
    assert codes(findings) == [("error", "placement.forbidden", "franz"),
                               ("error", "sidekiq.process-unmanaged", "franz")]
    f = only(findings, "sidekiq.process-unmanaged")
    assert "franz" in f.message and "pid 5555" in f.message and "queues default" in f.message
    assert "no systemd unit" in f.message and f.extra["identity"] == "franz:5555:0123456789ab"
    assert "role 'cdn' forbids sidekiq" in only(findings, "placement.forbidden").message


def test_a_process_run_by_an_undeclared_unit_is_unmanaged_and_names_the_unit() -> None:
    desired, results = fleet()
    franz = results["franz"]
    assert isinstance(franz, HostState)
    results["franz"] = with_unit(franz, undeclared_sidekiq(pid=7777))
    view = adding(agreeing_view(desired, results), process("franz", 7777, (("default", 0),), 10))
    f = only(run(view, results), "sidekiq.process-unmanaged")
    assert "unit mastodon-sidekiq.service, which is not declared" in f.message


def test_a_process_on_a_machine_outside_the_inventory_is_unmanaged_without_a_placement_verdict() -> None:
    desired, results = fleet()
    view = adding(agreeing_view(desired, results), process("cdn-tokyo-9", 12, (("default", 0),), 10))
    findings = run(view, results)
    assert codes(findings) == [("error", "sidekiq.process-unmanaged", "")]
    assert "cdn-tokyo-9 (not in the inventory)" in findings[0].message


@pytest.mark.parametrize("hostname", ["franz.hachyderm.internal", "cdn-frankfurt-1", "franz"])
def test_sidekiqs_hostname_is_matched_to_the_inventory_by_address_kernel_hostname_or_name(hostname: str) -> None:
    desired, results = fleet()
    franz = results["franz"]
    assert isinstance(franz, HostState)
    results["franz"] = dataclasses.replace(franz, facts=dataclasses.replace(franz.facts, hostname="cdn-frankfurt-1"))
    view = adding(agreeing_view(desired, results), process(hostname, 5555, (("default", 0),), 10))
    assert only(run(view, results), "sidekiq.process-unmanaged").host == "franz"


def test_a_process_on_an_unreachable_host_is_not_judged() -> None:
    desired, results = fleet()
    view = adding(agreeing_view(desired, results), process("franz", 5555, (("default", 0),), 10))
    results["franz"] = unreachable("franz")
    assert run(view, results) == []


# ------------------------------------------------------------------------- units without a heartbeat


def test_an_active_unit_whose_process_stopped_heartbeating_is_an_error() -> None:
    desired, results = fleet()
    pid = pid_of(results, "nietzsche", SCHEDULER)
    view = without(agreeing_view(desired, results), "nietzsche", pid)  # SIGSTOPped: its hash expired
    f = only(run(view, results), "sidekiq.no-heartbeat")
    assert f.severity == "error" and f.host == "nietzsche"
    assert SCHEDULER in f.message and f"pid {pid}" in f.message and f"{BEAT_EXPIRY:g} s" in f.message
    assert codes(run(view, results)) == [("error", "sidekiq.no-heartbeat", "nietzsche")]


def test_a_unit_started_less_than_the_expiry_ago_may_not_have_beaten_yet() -> None:
    desired, results = fleet()
    nietzsche = results["nietzsche"]
    assert isinstance(nietzsche, HostState)
    pid = pid_of(results, "nietzsche", SCHEDULER)
    view = without(agreeing_view(desired, results), "nietzsche", pid)
    booting = change_unit(nietzsche, SCHEDULER, active_enter="Fri 2027-01-15 08:00:00 UTC")
    started = active_since(booting.unit(SCHEDULER))  # type: ignore[arg-type]
    assert started is not None
    results["nietzsche"] = booting
    assert run(view, results, now=started + 30) == []
    assert codes(run(view, results, now=started + 61)) == [("error", "sidekiq.no-heartbeat", "nietzsche")]
    # a start time systemd printed in a local zone is unknown: no grace
    results["nietzsche"] = change_unit(nietzsche, SCHEDULER, active_enter="Fri 2027-01-15 09:00:00 CET")
    assert codes(run(view, results, now=started + 30)) == [("error", "sidekiq.no-heartbeat", "nietzsche")]


def test_a_stopped_unit_is_not_expected_to_heartbeat_but_its_queue_then_stalls() -> None:
    desired, results = fleet()
    pid = pid_of(results, "freud", DEFAULT)
    nietzsche_state = results["freud"]
    assert isinstance(nietzsche_state, HostState)
    results["freud"] = stopped(nietzsche_state, DEFAULT)
    backlog = QueueState("mailers", 50, NOW - 650, 650.0)
    view = without(agreeing_view(desired, results, mailers=backlog), "freud", pid)
    findings = run(view, results)
    assert codes(findings) == [("error", "sidekiq.queue-stalled", ""), ("warning", "sidekiq.latency", "")]
    assert "'mailers' holds 50 job(s), the oldest waiting 650 s" in only(findings, "sidekiq.queue-stalled").message


def test_a_stale_member_of_processes_is_not_a_live_process() -> None:
    desired, results = fleet()
    pid = pid_of(results, "nietzsche", SCHEDULER)
    view = without(agreeing_view(desired, results), "nietzsche", pid)
    view = dataclasses.replace(view, stale=(f"nietzsche:{pid}:0123456789ab",), processes_total=len(view.processes) + 1)
    assert codes(run(view, results)) == [("error", "sidekiq.no-heartbeat", "nietzsche")]


# ------------------------------------------------------------------------- queues


@pytest.mark.parametrize(("latency", "policy", "expected"), [
    (200.0, SidekiqPolicy(), []),
    (301.0, SidekiqPolicy(), ["warning"]),
    (1801.0, SidekiqPolicy(), ["error"]),
    (100.0, SidekiqPolicy(max_latency=60, max_latency_error=90), ["error"]),
    (70.0, SidekiqPolicy(max_latency=60, max_latency_error=90), ["warning"]),
])
def test_latency_is_a_warning_above_max_latency_and_an_error_above_the_second_threshold(
        latency: float, policy: SidekiqPolicy, expected: list[str]) -> None:
    desired, results = fleet()
    view = agreeing_view(desired, results, ingress=QueueState("ingress", 3, NOW - latency, latency))
    findings = run(view, results, policy=policy)
    assert [f.severity for f in findings] == expected
    for f in findings:
        assert f.code == "sidekiq.latency" and "'ingress'" in f.message and f"{latency:.0f} s" in f.message


def test_an_empty_queue_has_no_latency_finding_whatever_its_last_job() -> None:
    desired, results = fleet()
    assert run(agreeing_view(desired, results, ingress=QueueState("ingress", 0, None, 0.0)), results) == []


def test_a_queue_served_only_by_a_quiet_process_stalls() -> None:
    desired, results = fleet()
    pid = pid_of(results, "freud", DEFAULT)
    view = agreeing_view(desired, results, mailers=QueueState("mailers", 2, NOW - 5, 5.0))
    view = dataclasses.replace(view, processes=tuple(dataclasses.replace(p, quiet=True) if p.pid == pid
                                                     and p.hostname == "freud" else p for p in view.processes))
    assert codes(run(view, results)) == [("error", "sidekiq.queue-stalled", "")]


# ------------------------------------------------------------------------- drift


@pytest.mark.parametrize(("change", "says"), [
    (lambda p: dataclasses.replace(p, queues=(("default", 1),)), "queues default,1 (declared: default,8, ingress,6"),
    (lambda p: dataclasses.replace(p, concurrency=5), "concurrency 5 (declared: 25)"),
    (lambda p: dataclasses.replace(p, queues=(("default", 8), ("ingress", 6), ("mailers", 1))), "mailers,1"),
], ids=["queues", "concurrency", "weights"])
def test_a_process_whose_live_queues_or_concurrency_differ_from_its_unit_is_an_error(
        change: Callable[[SidekiqProcess], SidekiqProcess], says: str) -> None:
    desired, results = fleet()
    pid = pid_of(results, "freud", DEFAULT)
    view = agreeing_view(desired, results)
    view = dataclasses.replace(view, processes=tuple(change(p) if (p.hostname, p.pid) == ("freud", pid) else p
                                                     for p in view.processes))
    f = only(run(view, results), "sidekiq.process-drift")
    assert f.severity == "error" and f.host == "freud" and DEFAULT in f.message and says in f.message
    assert f.key == "services.sidekiq-default"


def test_weighted_queues_in_another_order_are_the_same_strict_ones_are_not() -> None:
    from fleet.sidekiq import _same_queues

    assert _same_queues((("a", 2), ("b", 1)), (("b", 1), ("a", 2)))
    assert not _same_queues((("a", 0), ("b", 0)), (("b", 0), ("a", 0)))
    assert _same_queues((("a", 0), ("b", 0)), (("a", 0), ("b", 0)))


def test_a_process_under_a_wrapper_pid_is_joined_by_host_and_queues() -> None:
    desired, results = fleet()
    pid = pid_of(results, "nietzsche", SCHEDULER)
    view = agreeing_view(desired, results)
    view = dataclasses.replace(view, processes=tuple(dataclasses.replace(p, pid=pid + 1, identity="n:w:1")
                                                     if (p.hostname, p.pid) == ("nietzsche", pid) else p
                                                     for p in view.processes))
    assert run(view, results) == []
    matches, _ = join(view.processes, sidekiq_units(desired, results), host_names(desired, results))
    assert [m.how for m in matches if m.process.identity == "n:w:1"] == ["queues"]


# ------------------------------------------------------------------------- quiet


def test_a_process_quiet_for_longer_than_its_shutdown_timeout_is_a_warning() -> None:
    desired, results = fleet()
    pid = pid_of(results, "nietzsche", SCHEDULER)
    view = agreeing_view(desired, results)
    view = dataclasses.replace(view, processes=tuple(dataclasses.replace(p, quiet=True) if (p.hostname, p.pid) ==
                                                     ("nietzsche", pid) else p for p in view.processes))
    identity = f"nietzsche:{pid}:0123456789ab"
    since = track_quiet({}, view, NOW - 30)
    assert since == {identity: NOW - 30}
    assert track_quiet(since, view, NOW) == since  # the first time seen quiet is kept
    f = only(run(view, results, quiet_since=since), "sidekiq.quiet-stuck")
    assert f.severity == "warning" and "quiet for 30 s" in f.message and "(25 s)" in f.message
    assert run(view, results, quiet_since={identity: NOW - 20}) == []
    # -t on the unit's command line is its shutdown timeout
    nietzsche = results["nietzsche"]
    assert isinstance(nietzsche, HostState)
    unit = nietzsche.unit(SCHEDULER)
    assert unit is not None
    results["nietzsche"] = change_unit(nietzsche, SCHEDULER, exec_start=unit.exec_start + ("-t", "60"))
    assert run(view, results, quiet_since=since) == []
    assert track_quiet(since, dataclasses.replace(view, processes=()), NOW) == {}


# ------------------------------------------------------------------------- incomplete views


def test_a_view_that_could_not_be_read_is_one_warning() -> None:
    desired, results = fleet()
    findings = run(SidekiqView(error="cannot reach Redis: Connection refused"), results)
    assert codes(findings) == [("warning", "sidekiq.view-unavailable", "")]
    assert "Connection refused" in findings[0].message


def test_a_truncated_view_says_so_and_skips_what_needs_every_process() -> None:
    desired, results = fleet()
    pid = pid_of(results, "nietzsche", SCHEDULER)
    view = without(agreeing_view(desired, results, mailers=QueueState("mailers", 1, NOW - 1, 1.0)), "nietzsche", pid)
    view = dataclasses.replace(view, processes=tuple(p for p in view.processes if p.hostname != "freud"),
                               processes_total=900)
    assert codes(run(view, results)) == [("warning", "sidekiq.view-truncated", "")]


# ------------------------------------------------------------------------- systemd's side


def test_units_are_the_declared_sidekiq_services_and_any_unit_that_runs_sidekiq() -> None:
    desired, results = fleet()
    franz = results["franz"]
    assert isinstance(franz, HostState)
    results["franz"] = with_unit(franz, undeclared_sidekiq(args="-c 10 -q default -t 8"))
    results["fritz"] = unreachable("fritz")
    units = {(u.host, u.unit): u for u in sidekiq_units(desired, results)}
    assert set(units) == {("franz", "mastodon-sidekiq.service"), ("freud", DEFAULT),
                          ("freud", "mastodon-sidekiq-push-pull.service"),
                          ("nietzsche", "mastodon-sidekiq-push-pull.service"), ("nietzsche", SCHEDULER)}
    hand = units[("franz", "mastodon-sidekiq.service")]
    assert not hand.declared and hand.queues == (("default", 0),) and hand.shutdown_timeout == 8.0
    declared = units[("freud", DEFAULT)]
    assert declared.service == "sidekiq-default" and declared.concurrency == 25 and declared.active
    assert declared.active_since == calendar.timegm((2026, 11, 23, 10, 0, 0))  # Mon 2026-11-23 10:00:00 UTC


# ------------------------------------------------------------------------- [policy.sidekiq]


def test_the_policy_defaults_and_valid_values() -> None:
    assert load_policy(None) == (SidekiqPolicy(300.0, 1800.0, None), [])
    assert load_policy({}) == (SidekiqPolicy(), [])
    assert load_policy({"max_latency": 60, "max_latency_error": 120.5, "env_file": "mastodon"},
                       env_files=["mastodon"]) == (SidekiqPolicy(60.0, 120.5, "mastodon"), [])


@pytest.mark.parametrize(("table", "key", "code"), [
    ({"max_latncy": 10}, "policy.sidekiq.max_latncy", "config.unknown-key"),
    ({"max_latency": "300"}, "policy.sidekiq.max_latency", "config.wrong-type"),
    ({"max_latency": True}, "policy.sidekiq.max_latency", "config.wrong-type"),
    ({"max_latency": 0}, "policy.sidekiq.max_latency", "config.bad-value"),
    ({"max_latency": -5}, "policy.sidekiq.max_latency", "config.bad-value"),
    ({"max_latency_error": float("inf")}, "policy.sidekiq.max_latency_error", "config.bad-value"),
    ({"max_latency_error": float("nan")}, "policy.sidekiq.max_latency_error", "config.bad-value"),
    ({"max_latency": 10 ** 9}, "policy.sidekiq.max_latency", "config.bad-value"),
    ({"max_latency": 600, "max_latency_error": 600}, "policy.sidekiq.max_latency_error", "config.bad-value"),
    ({"env_file": ["mastodon"]}, "policy.sidekiq.env_file", "config.wrong-type"),
    ({"env_file": "no such"}, "policy.sidekiq.env_file", "config.wrong-type"),
    ({"env_file": "mastodn"}, "policy.sidekiq.env_file", "config.bad-reference"),
    ([1, 2], "policy.sidekiq", "config.wrong-type"),
])
def test_a_bad_policy_key_is_a_finding_naming_the_file_and_key_and_a_default_stands_in(
        table: Any, key: str, code: str) -> None:
    policy, findings = load_policy(table, file="desired_state.toml", env_files=["mastodon"])
    assert [(f.severity, f.code, f.key, f.file) for f in findings] == [("error", code, key, "desired_state.toml")]
    assert findings[0].hint
    assert policy.max_latency < policy.max_latency_error  # always usable
    if code == "config.unknown-key":
        assert "did you mean max_latency?" in findings[0].hint
    if code == "config.bad-reference":
        assert "mastodon" in findings[0].hint


# ------------------------------------------------------------------------- where to read


def test_the_view_is_read_on_the_redis_host_through_the_env_file_the_sidekiq_services_load() -> None:
    assert locate_redis(example(), SidekiqPolicy()) == RedisSource(
        host="nietzsche", env_path="/home/mastodon/live/.env.production", env_file="mastodon")


def test_without_a_redis_service_there_is_no_view(example: Any) -> None:
    found = locate_redis(example.edit('kind = "redis"', 'kind = "generic"').load().desired, SidekiqPolicy())
    assert isinstance(found, Finding) and found.code == "sidekiq.view-unavailable" and found.severity == "warning"


def test_without_the_env_file_on_the_redis_host_there_is_no_view_unless_the_policy_names_one(example: Any) -> None:
    moved = example.edit('unit = "redis-server.service"\nhosts = ["nietzsche"]',
                         'unit = "redis-server.service"\nhosts = ["fritz"]').edit(
        'services = ["web", "streaming", "sidekiq-default", "sidekiq-push-pull", "sidekiq-scheduler"]',
        'services = ["sidekiq-default", "sidekiq-push-pull", "sidekiq-scheduler"]').load().desired
    assert moved is not None
    found = locate_redis(moved, SidekiqPolicy())
    assert isinstance(found, Finding) and found.code == "sidekiq.view-unavailable" and found.host == "fritz"
    assert "policy.sidekiq.env_file" in found.hint
    named = locate_redis(fleet()[0], SidekiqPolicy(env_file="mastodon"))  # the shipped example, unedited
    assert named == RedisSource(host="nietzsche", env_path="/home/mastodon/live/.env.production", env_file="mastodon")
