"""Sidekiq's own view wired into fleet: read in the collection of the Redis host, kept in the
snapshots, shown by `fleet status` (text and JSON) beside systemd's view, judged by `fleet audit`,
and `[policy.sidekiq]` read by config.  Over the shipped example, converged (tests/unit/observed.py),
with a view that agrees with it and one defect at a time."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from observed import EXAMPLE_SECRETS, REPO, converged, example, stopped
from redis_server import Redis

from fleet.audit import build_audit
from fleet.collect.collector import collect
from fleet.collect.parse import parse_host
from fleet.collect.script import build_script, spec_for
from fleet.config import load
from fleet.errors import FleetError
from fleet.model import Desired, HostResult, HostState, SidekiqSpec
from fleet.output.json import status_json
from fleet.output.text import status_text
from fleet.sidekiq import (
    SECTION,
    QueueState,
    SidekiqProcess,
    SidekiqView,
    beat_script,
    gone_script,
    judge_beat,
    quiet_since,
    sidekiq_units,
)
from fleet.snapshot import pack, unpack
from fleet.status import build_status
from fleet.transport.fake import FakeTransport

NOW = 1_800_000_000.0
QUEUES = ("default", "push", "ingress", "mailers", "pull", "scheduler", "fasp")
FIXTURES = REPO / "tests" / "fixtures"


def process(host: str, pid: int, queues: tuple[tuple[str, int], ...], concurrency: int, **kw: Any) -> SidekiqProcess:
    fields: dict[str, Any] = dict(identity=f"{host}:{pid}:0123456789ab", hostname=host, pid=pid, tag="live",
                                  concurrency=concurrency, queues=queues, labels=(), started_at=NOW - 3600,
                                  version="7.3.9", busy=1, beat=NOW - 3, quiet=False, rss=200_000, rtt_us=300)
    return SidekiqProcess(**(fields | kw))


def fleet(*extra: SidekiqProcess, skip: tuple[str, ...] = (), **queues: QueueState) -> tuple[Desired, dict[str, Any]]:
    """The example converged, with the view its Redis would hold: a process per active declared
    unit (but those of the units named in `skip`), the `extra` ones, and the queues."""
    desired = example()
    results: dict[str, HostResult] = dict(converged(desired, EXAMPLE_SECRETS))
    for unit in skip:
        for host, r in results.items():
            if isinstance(r, HostState) and r.unit(unit) is not None:
                results[host] = stopped(r, unit)
    procs = [process(u.host, u.main_pid, u.queues, u.concurrency or 0)
             for u in sidekiq_units(desired, results) if u.active and u.declared]
    procs += extra
    states = tuple(queues.get(q, QueueState(q, 0, None, 0.0)) for q in QUEUES)
    view = SidekiqView(redis_time=NOW, processes=tuple(procs), queues=states, processes_total=len(procs),
                       queues_total=len(states))
    return desired, with_view(results, "nietzsche", view)


def with_view(results: dict[str, HostResult], host: str, view: SidekiqView) -> dict[str, HostResult]:
    state = results[host]
    assert isinstance(state, HostState)
    return results | {host: dataclasses.replace(state, extra=(*state.extra, (SECTION, view)))}


# ------------------------------------------------------------------------- collection and snapshots

def test_the_view_is_read_in_the_round_trip_to_the_redis_host_and_nowhere_else() -> None:
    desired = example()
    scripts = {h.name: build_script(spec_for(desired, h.name)) for h in desired.hosts}
    assert {h for h, s in scripts.items() if "echo '@@sidekiq'" in s} == {"nietzsche"}  # where Redis is declared
    assert "f=/home/mastodon/live/.env.production" in scripts["nietzsche"]
    fake = FakeTransport()
    fake.respond("", "not the collection output\n")
    with fake:
        collect(desired, fake)
    assert sorted(c.host for c in fake.calls) == sorted(scripts)  # still one command per host
    assert [c.host for c in fake.calls if "echo '@@sidekiq'" in c.command] == ["nietzsche"]


def _output_with(section: str) -> str:
    base = (FIXTURES / "collect" / "stores-converged-nietzsche.txt").read_text()
    assert base.endswith("@@end\n")
    return base[:-len("@@end\n")] + section + "@@end\n"


def test_the_sidekiq_section_of_a_hosts_output_becomes_its_view() -> None:
    section = (FIXTURES / "sidekiq" / "fleet-with-backlog.txt").read_text()
    state = parse_host("nietzsche", _output_with(section))
    view = state.facts_of(SECTION)
    assert isinstance(view, SidekiqView) and not view.error
    assert {p.hostname for p in view.processes} == {"freud", "nietzsche", "cdn-frankfurt-1"}
    mailers = view.queue("mailers")
    assert mailers is not None and mailers.size == 50 and mailers.latency >= 600


def test_a_sidekiq_section_fleet_cannot_read_costs_the_view_not_the_host() -> None:
    state = parse_host("nietzsche", _output_with('@@sidekiq\ntarget REDIS_HOST 127.0.0.1 6379 0 plain none\n'
                                                 'time "1","2"\nsurprise\n'))
    view = state.facts_of(SECTION)
    assert isinstance(state, HostState) and state.unit("redis-server.service") is not None
    assert isinstance(view, SidekiqView) and view.error.startswith("unreadable: ")


def test_an_output_without_the_section_has_no_view() -> None:
    state = parse_host("nietzsche", _output_with(""))
    assert state.facts_of(SECTION) is None


def test_the_view_is_kept_in_the_snapshot_and_read_back_the_same() -> None:
    _, results = fleet(process("franz", 31337, (("default", 0),), 10, quiet=True),
                       mailers=QueueState("mailers", 50, NOW - 700, 700.0))
    back = unpack(pack(results))
    assert back["nietzsche"].facts_of(SECTION) == results["nietzsche"].facts_of(SECTION)  # type: ignore[union-attr]
    assert back["freud"].facts_of(SECTION) is None  # type: ignore[union-attr]


# ------------------------------------------------------------------------- status and audit

def test_a_fleet_running_as_declared_shows_every_process_with_its_unit_and_no_findings() -> None:
    desired, results = fleet()
    report = build_status(desired, results)
    assert report.live is not None and report.live.findings == ()
    assert all(m.unit is not None and m.how == "pid" for m in report.live.matches)
    assert not [f for f in build_audit(desired, results).findings if f.code.startswith("sidekiq.")]
    mailers = next(q for q in report.live.queues if q.name == "mailers")
    assert mailers.by_systemd == ("freud:mastodon-sidekiq-default.service",)
    assert mailers.by_heartbeat == ("freud:1000",)


def test_a_sidekiq_started_by_hand_on_the_cdn_host_shows_with_no_unit_and_audit_names_host_and_queues() -> None:
    desired, results = fleet(process("franz", 31337, (("default", 0), ("push", 0)), 10))
    report = build_status(desired, results)
    assert report.live is not None
    by_hand = next(m for m in report.live.matches if m.process.pid == 31337)
    assert by_hand.host == "franz" and by_hand.unit is None
    text = status_text(report, now=NOW)
    assert "31337" in text and "NO UNIT (!)" in text
    audit = build_audit(desired, results)
    unmanaged = [f for f in audit.errors if f.code == "sidekiq.process-unmanaged"]
    assert len(unmanaged) == 1 and unmanaged[0].host == "franz" and "default, push" in unmanaged[0].message
    assert any(f.code == "placement.forbidden" and f.host == "franz" for f in audit.errors)
    live = status_json(report)["sidekiq"]["live"]
    proc = next(p for p in live["processes"] if p["pid"] == 31337)
    assert proc["host"] == "franz" and proc["unit"] is None
    assert [q["name"] for q in proc["queues"]] == ["default", "push"]


def test_a_backlog_with_its_only_unit_stopped_shows_size_and_latency_served_by_nobody() -> None:
    desired, results = fleet(skip=("mastodon-sidekiq-default.service",),
                             mailers=QueueState("mailers", 50, NOW - 610, 610.0))
    report = build_status(desired, results)
    assert report.live is not None
    mailers = next(q for q in report.live.queues if q.name == "mailers")
    assert (mailers.size, mailers.by_systemd, mailers.by_heartbeat) == (50, (), ())
    assert mailers.latency is not None and mailers.latency >= 600
    live_table = status_text(report, now=NOW).split("Sidekiq's own view", 1)[1]
    row = next(line for line in live_table.splitlines() if line.startswith("mailers "))
    assert row.split() == ["mailers", "50", "610s", "-", "NOBODY", "(!)"]
    codes = {f.code for f in build_audit(desired, results).errors}
    assert "sidekiq.queue-stalled" in codes
    doc = json.loads(json.dumps(status_json(report)))
    assert next(q for q in doc["sidekiq"]["live"]["queues"] if q["name"] == "mailers")["size"] == 50


def test_an_active_unit_that_stopped_heartbeating_is_an_audit_error() -> None:
    desired, results = fleet()
    view = results["nietzsche"].facts_of(SECTION)
    assert isinstance(view, SidekiqView)
    hung = dataclasses.replace(view, processes=tuple(p for p in view.processes if p.pid != 1003),
                               processes_total=len(view.processes) - 1)
    results = with_view(results | {"nietzsche": dataclasses.replace(results["nietzsche"], extra=())},
                        "nietzsche", hung)
    report = build_status(desired, results)
    assert report.live is not None
    assert [u.unit for u in report.live.silent] == ["mastodon-sidekiq-scheduler.service"]
    assert "no heartbeat" in status_text(report, now=NOW)
    f = next(f for f in build_audit(desired, results).errors if f.code == "sidekiq.no-heartbeat")
    assert f.host == "nietzsche" and "mastodon-sidekiq-scheduler.service" in f.message


def test_a_process_quiet_since_the_previous_observation_beyond_its_timeout_is_stuck() -> None:
    quiet = process("franz", 31337, (("default", 0),), 10, quiet=True)
    desired, before = fleet(quiet)
    desired, now = fleet(dataclasses.replace(quiet, beat=NOW + 57))
    view = now["nietzsche"].facts_of(SECTION)
    assert isinstance(view, SidekiqView)
    now = with_view(now | {"nietzsche": dataclasses.replace(now["nietzsche"], extra=())}, "nietzsche",
                    dataclasses.replace(view, redis_time=NOW + 60))
    assert build_status(desired, now).live.findings  # type: ignore[union-attr]  # the unmanaged one
    without = {f.code for f in build_status(desired, now).live.findings}  # type: ignore[union-attr]
    assert "sidekiq.quiet-stuck" not in without  # no earlier observation: since when is unknown
    report = build_status(desired, now, quiet=quiet_since(before))
    stuck = [f for f in report.live.findings if f.code == "sidekiq.quiet-stuck"]  # type: ignore[union-attr]
    assert len(stuck) == 1 and "60 s" in stuck[0].message


def test_an_unreadable_view_is_shown_as_unavailable_with_one_warning() -> None:
    desired, results = fleet()
    results = results | {"nietzsche": dataclasses.replace(results["nietzsche"], extra=())}
    results = with_view(results, "nietzsche", SidekiqView(error="cannot reach Redis: Connection refused"))
    report = build_status(desired, results)
    assert report.live is not None
    assert "unavailable: cannot reach Redis" in status_text(report, now=NOW)
    assert [f.code for f in report.live.findings] == ["sidekiq.view-unavailable"]


def test_status_without_a_view_has_no_live_member() -> None:
    desired = example()
    results: dict[str, HostResult] = dict(converged(desired, EXAMPLE_SECRETS))
    report = build_status(desired, results)
    assert report.live is None and status_json(report)["sidekiq"]["live"] is None
    assert "Sidekiq's own view" not in status_text(report, now=NOW)


# ------------------------------------------------------------------------- [policy.sidekiq]

def _config(tmp_path: Path, policy: str) -> tuple[Path, Path]:
    text = (REPO / "desired_state.toml").read_text()
    path = tmp_path / "desired_state.toml"
    path.write_text(text + "\n[policy.sidekiq]\n" + policy)
    return path, REPO / "hosts"


def test_policy_sidekiq_is_read_into_the_desired_state(tmp_path: Path) -> None:
    loaded = load(*_config(tmp_path, 'max_latency = 60\nmax_latency_error = 120\nenv_file = "mastodon"\n'))
    assert loaded.desired is not None and not [f for f in loaded.findings if f.is_error]
    p = loaded.desired.sidekiq_policy
    assert (p.max_latency, p.max_latency_error, p.env_file) == (60.0, 120.0, "mastodon")


def test_a_bad_policy_sidekiq_value_names_the_file_the_key_and_its_line(tmp_path: Path) -> None:
    path, hosts = _config(tmp_path, 'max_latency = "soon"\nenv_file = "mastodn"\n')
    loaded = load(path, hosts)
    lines = path.read_text().splitlines()
    bad = {f.key: f for f in loaded.findings if f.key.startswith("policy.sidekiq")}
    assert set(bad) == {"policy.sidekiq.max_latency", "policy.sidekiq.env_file"}
    for key, f in bad.items():
        assert f.file == str(path) and f.line is not None and lines[f.line - 1].startswith(key.rsplit(".", 1)[1])
    assert "mastodon" in bad["policy.sidekiq.env_file"].hint


# ------------------------------------------------------------------------- quiet, across observations

def test_status_and_audit_learn_since_when_a_process_is_quiet_from_the_journals_earlier_snapshot(
        tmp_path: Path) -> None:
    from fleet.journal import Journal, journal_path
    from fleet.workflows.base import Common
    from fleet.workflows.observe import Observation, previous_quiet

    common = Common.at(tmp_path)
    quiet = process("franz", 31337, (("default", 0),), 10, quiet=True)
    desired, before = fleet(quiet)
    _, now = fleet(dataclasses.replace(quiet, beat=NOW + 57))
    assert previous_quiet(common, desired, Observation(now, "")) == {}  # no journal yet
    with Journal.open(journal_path(common.state_dir)) as journal:
        journal.save_snapshot(command="status", fleet=desired.name, lab=False, hosts={}, data=pack(before),
                              operator="t", now=NOW)
        journal.save_snapshot(command="status", fleet="another", lab=False, hosts={}, data=pack(now),
                              operator="t", now=NOW + 10)
        current = journal.save_snapshot(command="status", fleet=desired.name, lab=False, hosts={},
                                        data=pack(now), operator="t", now=NOW + 60)
    assert previous_quiet(common, desired, Observation(now, current)) == {quiet.identity: NOW}
    working = fleet(dataclasses.replace(quiet, quiet=False))[1]
    assert previous_quiet(common, desired, Observation(working, current)) == {}  # nobody quiet: no look back


# ------------------------------------------------------------------------- apply: a restart waits for the old process

def _gone(redis: Redis, tmp_path: Path, pid: str, *, env: str | None = None, timeout: int = 1,
          script: Any = gone_script) -> str:
    """`script` (gone_script, beat_script) run here against the throwaway Redis, found from `env`."""
    path = tmp_path / ".env.production"
    path.write_text(redis.env() if env is None else env)
    done = subprocess.run(["sh", "-c", script(str(path), pid, timeout=timeout)], capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"], "LC_ALL": "C"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def test_a_sidekiq_restart_waits_until_the_old_process_has_left_processes(redis: Redis, tmp_path: Path) -> None:
    redis.flush()
    me = Path("/proc/sys/kernel/hostname").read_text().strip()
    old, other = f"{me}:4242:0123456789ab", f"{me}:42420:0123456789ab"  # a pid that merely starts the same
    redis.cli("SADD", "processes", old, other, "elsewhere:4242:0123456789ab")
    for identity in (old, other):
        redis.cli("HSET", identity, "beat", str(time.time()), "info", "{}")
    assert _gone(redis, tmp_path, "4242") == f"@@sidekiq-gone timeout {old}\n"  # still heartbeating
    redis.cli("DEL", old)  # its hash expired (a killed process): it no longer counts
    assert _gone(redis, tmp_path, "4242") == "@@sidekiq-gone ok\n"
    redis.cli("SREM", "processes", old)  # a clean stop removes the member itself
    assert _gone(redis, tmp_path, "4242") == "@@sidekiq-gone ok\n"
    assert _gone(redis, tmp_path, "0") == "@@sidekiq-gone ok\n"  # the unit ran no process


def test_a_restart_cannot_wait_without_redis_and_says_why(redis: Redis, tmp_path: Path) -> None:
    assert _gone(redis, tmp_path, "4242", env="REDIS_NAMESPACE=x\n").startswith("@@sidekiq-gone skipped (namespace")
    wrong = redis.env().replace("REDIS_PASSWORD=", "REDIS_PASSWORD=x")
    assert _gone(redis, tmp_path, "4242", env=wrong) == "@@sidekiq-gone skipped (Redis did not answer)\n"


def test_a_sidekiq_restart_runs_the_wait_and_other_restarts_do_not() -> None:
    from fleet.resources.unit_state import _sidekiq_env

    desired = example()
    by_kind = {s.kind.value: s for s in desired.services if s.unit_spec is not None}
    assert _sidekiq_env(desired, by_kind["sidekiq"]) == "/home/mastodon/live/.env.production"
    assert _sidekiq_env(desired, by_kind["web"]) is None


# ------------------------------------------------------------------------- apply: the Sidekiq health gate

DECLARED = SidekiqSpec(concurrency=25, queues=(("default", 8), ("ingress", 6), ("mailers", 2)))


def _info(host: str, pid: int, queues: dict[str, int], concurrency: int) -> str:
    """A heartbeat's `info` as Sidekiq 7 writes it (launcher.rb)."""
    return json.dumps({"hostname": host, "started_at": NOW, "pid": pid, "tag": "live", "concurrency": concurrency,
                       "queues": list(queues), "weights": [queues], "labels": [], "identity": f"{host}:{pid}:x",
                       "version": "7.3.9"})


def _beat(redis: Redis, tmp_path: Path, pid: str, *, env: str | None = None) -> str:
    return _gone(redis, tmp_path, pid, env=env, script=beat_script)


def test_the_sidekiq_gate_reads_the_heartbeat_of_the_new_process_and_judges_its_queues(
        redis: Redis, tmp_path: Path) -> None:
    redis.flush()
    me = Path("/proc/sys/kernel/hostname").read_text().strip()
    new, other = f"{me}:4242:0123456789ab", f"{me}:42420:0123456789ab"  # a pid that merely starts the same
    redis.cli("SADD", "processes", other, "elsewhere:4242:0123456789ab")
    redis.cli("HSET", other, "beat", str(NOW), "info", _info(me, 42420, {"default": 8}, 25))
    none = _beat(redis, tmp_path, "4242")  # the new process has not beaten yet: none within the window
    assert none == f"@@sidekiq-beat none\n@@sidekiq-beat other {other}\n"
    assert judge_beat(none, me, DECLARED, 1) == (f"no Sidekiq heartbeat from its new process within 1 s; this "
                                                 f"host's processes in Redis: {other}")
    redis.cli("SADD", "processes", new)
    redis.cli("HSET", new, "beat", str(NOW), "busy", "0", "quiet", "false",
              "info", _info(me, 4242, {"default": 8, "ingress": 6, "mailers": 2}, 25))
    good = _beat(redis, tmp_path, "4242")
    assert good.splitlines()[0] == f"@@sidekiq-beat id {new}"
    assert judge_beat(good, me, DECLARED, 1) == ""
    redis.cli("HSET", new, "info", _info(me, 4242, {"default": 1}, 10))  # a unit started with other -q and -c
    wrong = judge_beat(_beat(redis, tmp_path, "4242"), me, DECLARED, 1)
    assert wrong == ("its new process (pid 4242) heartbeats with queues default,1 (declared: default,8, ingress,6, "
                     "mailers,2) and concurrency 10 (declared: 25)")


def test_the_sidekiq_gate_fails_when_redis_cannot_be_read_and_says_why(redis: Redis, tmp_path: Path) -> None:
    wrong = redis.env().replace("REDIS_PASSWORD=", "REDIS_PASSWORD=x")
    out = _beat(redis, tmp_path, "4242", env=wrong)
    assert out == "@@sidekiq-beat skipped (Redis did not answer)\n"
    assert judge_beat(out, "h", DECLARED, 1) == "cannot read Sidekiq's heartbeats in Redis (Redis did not answer)"
    assert judge_beat(_beat(redis, tmp_path, "0"), "h", DECLARED, 1).endswith("(the unit has no main process)")


def _live(queues: dict[str, int], concurrency: int) -> str:
    info = _info("freud", 77, queues, concurrency).replace("\\", "\\\\").replace('"', '\\"')
    return f'@@sidekiq-beat id freud:77:ab\n@@sidekiq-beat live "{info}","0","{NOW}","false","1","2",NULL\n'


def test_judging_a_heartbeat_checks_only_what_is_declared() -> None:
    from_file = SidekiqSpec(concurrency=None, queues=(), queues_from_config=True)
    assert judge_beat(_live({"anything": 3}, 99), "freud", from_file, 30) == ""  # no -q, no -c: any queues
    strict = SidekiqSpec(concurrency=5, queues=(("a", None), ("b", None)))
    assert judge_beat(_live({"a": 0, "b": 0}, 5), "freud", strict, 30) == ""
    assert "queues b, a (declared: a, b)" in judge_beat(_live({"b": 0, "a": 0}, 5), "freud", strict, 30)  # order
    assert judge_beat("@@sidekiq-beat none\n", "freud", strict, 30) == (
        "no Sidekiq heartbeat from its new process within 30 s; no process of this host is in Redis")
    broken = '@@sidekiq-beat id freud:77:ab\n@@sidekiq-beat live "not json","0","1","false","1","2",NULL\n'
    assert "cannot be read" in judge_beat(broken, "freud", strict, 30)
    assert "printed nothing fleet reads" in judge_beat("", "freud", strict, 30)


class _Step:
    """What UnitStates._gate needs of an execution: the host, the declaration, one canned output."""

    def __init__(self, desired: Desired, out: str) -> None:
        from fleet.model import Host

        self.host, self.desired, self.out = Host(name="freud", address="freud"), desired, out
        self.settle, self.start_timeout, self.command_grace, self.detail = 1.0, 30.0, 30.0, ""
        self.commands: list[str] = []

    def service(self, name: str | None) -> Any:
        return self.desired.service(name or "")

    def run(self, command: str, *, stdin: bytes | None = None, timeout: float = 120) -> str:
        self.commands.append(command)
        return self.out


def _gated(out: str) -> tuple[str, _Step]:
    """UnitStates._gate of the example's default Sidekiq, declared with the Sidekiq health check."""
    from fleet.actions import Action, Change
    from fleet.model import HealthCheck
    from fleet.resources.unit_state import UnitStates

    desired = example()
    name = next(s.name for s in desired.services if s.unit == "mastodon-sidekiq-default.service")
    gated = [dataclasses.replace(s, health=HealthCheck(sidekiq=True)) if s.name == name else s
             for s in desired.services]
    step = _Step(dataclasses.replace(desired, services=tuple(gated)), out)
    change = Change("freud", Action.RESTART, "mastodon-sidekiq-default.service", "", name)
    try:
        UnitStates()._gate(change, step)  # type: ignore[arg-type]
    except FleetError as e:
        return e.message, step
    return "", step


def test_apply_gates_a_sidekiq_unit_on_its_new_process_heartbeat() -> None:
    ok, step = _gated(_live({"default": 8, "ingress": 6, "mailers": 2}, 25) + "@@gate ok\n")
    assert ok == ""
    script = step.commands[0]
    assert "@@sidekiq-beat" in script and "/home/mastodon/live/.env.production" in script and "REDISCLI_AUTH" in script
    wrong, step = _gated(_live({"default": 1}, 25) + "@@gate ok\n")
    assert wrong.startswith("the Sidekiq health check failed: its new process (pid 77) heartbeats with queues "
                            "default,1"), wrong
    assert step.detail.startswith("@@sidekiq-beat id freud:77:ab")  # what was read, for the journal and output
    # the unit stopped while the gate waited for the heartbeat: `up` failed in the subshell, and that wins
    stopped_meanwhile, _ = _gated("@@gate fail unit stopped before its Sidekiq heartbeat was read\n@@gate ok\n")
    assert stopped_meanwhile == "unit stopped before its Sidekiq heartbeat was read"


# ------------------------------------------------------------------------- metrics

def test_metrics_carry_each_queues_size_and_latency_and_nothing_without_the_view() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from fleet.output.metrics import metrics_text

    hostile = 'mail"ers\nx\\'
    desired, results = fleet(mailers=QueueState("mailers", 50, NOW - 610, 610.5))
    view = results["nietzsche"].facts_of(SECTION)
    assert isinstance(view, SidekiqView)
    more = dataclasses.replace(view, queues=(*view.queues, QueueState(hostile, 1, NOW - 1, 1.0)),
                               queues_total=view.queues_total + 1)
    results = with_view(results | {"nietzsche": dataclasses.replace(results["nietzsche"], extra=())}, "nietzsche",
                        more)
    text = metrics_text(build_audit(desired, results), now=NOW)
    found = {(f.name, s.labels["queue"]): s.value for f in text_string_to_metric_families(text) for s in f.samples
             if f.name.startswith("fleet_sidekiq_")}
    assert found[("fleet_sidekiq_queue_size", "mailers")] == 50
    assert found[("fleet_sidekiq_queue_latency_seconds", "mailers")] == 610.5
    assert found[("fleet_sidekiq_queue_size", "default")] == 0
    assert found[("fleet_sidekiq_queue_size", hostile)] == 1  # a queue name from Redis, escaped and read back
    plain = dict(converged(desired, EXAMPLE_SECRETS))
    assert "fleet_sidekiq" not in metrics_text(build_audit(desired, plain), now=NOW)
    unread = with_view(plain, "nietzsche", SidekiqView(error="cannot reach Redis: refused"))
    assert "fleet_sidekiq_queue_size{" not in metrics_text(build_audit(desired, unread), now=NOW)


def test_a_sidekiq_finding_keeps_its_identity_for_watch_while_its_numbers_change() -> None:
    from fleet.watch.events import finding_subject

    def subjects(latency: float, size: int) -> set[str]:
        desired, results = fleet(process("franz", 31337, (("default", 0),), 10),
                                 skip=("mastodon-sidekiq-default.service",),
                                 mailers=QueueState("mailers", size, NOW - latency, latency))
        return {finding_subject(f) for f in build_audit(desired, results).findings if f.code.startswith("sidekiq.")}

    first, later = subjects(400, 50), subjects(460, 52)
    live = ("sidekiq.process-unmanaged", "sidekiq.queue-stalled", "sidekiq.latency")
    assert sum(any(f'"{code}"' in s for s in first) for code in live) == 3 and first == later
