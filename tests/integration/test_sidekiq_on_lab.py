"""Sidekiq's own view on the lab: the stand-in heartbeats into the lab's real Redis as Sidekiq 7 does,
and fleet's Sidekiq section (fleet.sidekiq.section_script, run on the Redis host as the collector
runs its script) reads it back through the real redis-cli with the lab's Redis password."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import (
    REDIS_HOST,
    enqueue,
    fleet,
    fleet_json,
    install_unit,
    lab_redis_password,
    redis_cli,
    reset_all,
    sidekiq_unit,
)

from fleet import remote
from fleet.config import load
from fleet.journal import journal_path
from fleet.model import HealthCheck
from fleet.resources.unit_state import sidekiq_gate
from fleet.sidekiq import (
    SidekiqPolicy,
    SidekiqView,
    check_latency,
    check_unserved,
    decode_token,
    judge_beat,
    parse_section,
    section_script,
)

ENV = "/home/mastodon/live/.env.production"
BUNDLE = "/home/mastodon/.rbenv/shims/bundle"
# (host, unit, queues with weights, concurrency) as desired_state.toml declares them
DECLARED = [
    ("freud", "mastodon-sidekiq-default.service", (("default", 8), ("ingress", 6), ("mailers", 2)), 25),
    ("freud", "mastodon-sidekiq-push-pull.service", (("push", 6), ("pull", 4), ("fasp", 1)), 20),
    ("nietzsche", "mastodon-sidekiq-push-pull.service", (("push", 6), ("pull", 4), ("fasp", 1)), 20),
    ("nietzsche", "mastodon-sidekiq-scheduler.service", (("scheduler", 1),), 5),
]


def read_view(lab: Any) -> tuple[SidekiqView, str]:
    """The Sidekiq section, run on the Redis host as root (as the collector runs its script): its view
    and its raw output."""
    done = lab.ssh(REDIS_HOST, ["sh", "-c", section_script(ENV)], user="root")
    lines = done.stdout.split("\n")
    assert lines[0] == "@@sidekiq", done.stdout
    return parse_section(REDIS_HOST, lines[1:]), done.stdout


def poll(what: Callable[[], Any], timeout: float, message: str) -> Any:
    """what() until it returns something true, at most `timeout` seconds (Redis is polled, not slept on)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, message
        time.sleep(0.5)


def main_pid(lab: Any, host: str, unit: str) -> int:
    return int(lab.ssh(host, f"systemctl show -p MainPID --value {unit}").stdout.strip())


def process_of(view: SidekiqView, host: str, pid: int) -> Any:
    return next((p for p in view.processes if p.hostname == host and p.pid == pid), None)


def all_heartbeating(lab: Any) -> SidekiqView | None:
    view, _ = read_view(lab)
    pids = [(h, main_pid(lab, h, u)) for h, u, _, _ in DECLARED]
    return view if all(process_of(view, h, pid) for h, pid in pids) else None


@pytest.fixture(scope="module")
def converged(lab: Any) -> Iterator[Any]:
    reset_all(lab)
    done = fleet(lab, "apply", "--settle", "1", "--yes", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # Each stand-in beats once it has started (Sidekiq: once its app has loaded).
    poll(lambda: all_heartbeating(lab), 30, "not every declared Sidekiq unit heartbeats")
    yield lab
    reset_all(lab)


def test_each_sidekiq_unit_heartbeats_with_its_declared_queues_and_concurrency(converged: Any) -> None:
    view, out = read_view(converged)
    read_ended = time.time()  # the lab's hosts share this machine's clock
    assert view.target is not None and view.target.source == "REDIS_HOST" and view.target.auth
    assert view.target.host == "nietzsche.hachyderm.internal" and view.target.port == 6379
    # Every member of `processes` was read.  A member whose hash expired (`stale`: a process killed
    # without leaving, e.g. by an earlier module) is Redis's state, not this unit's: not judged here.
    assert view.complete, out
    for host, unit, queues, concurrency in DECLARED:
        p = process_of(view, host, main_pid(converged, host, unit))
        assert p is not None, f"{unit} on {host}: no heartbeat in\n{out}"
        # every message carries what was read: this test once failed in a full run, never alone
        assert p.queues == queues and p.concurrency == concurrency, f"{unit} on {host}: {p}\n{out}"
        assert p.identity.startswith(f"{host}:{p.pid}:") and len(p.identity.rsplit(":", 1)[1]) == 12, out
        assert p.version.startswith("7.") and p.tag == "live" and not p.quiet and p.rss > 0, f"{p}\n{out}"
        # Fresh: at most 60 s older than the read (the hash expires 60 s after the last beat).  Not
        # "no newer than Redis's TIME": the section reads TIME in its first round and the hashes in its
        # second, so a beat that lands between the two is newer than TIME — this assertion's old form
        # failed once in a full run that way (docs/RELIABILITY.md).  A beat is never newer than the
        # end of the read.
        assert view.redis_time - 60 <= p.beat <= read_ended, f"{p} read ended {read_ended}\n{out}"
    hashes = redis_cli(converged, [["TTL", p.identity] for p in view.processes])
    assert all(0 < int(ttl) <= 60 for ttl in hashes), f"TTLs {hashes}\n{out}"


def test_stopping_a_unit_removes_its_process_and_starting_it_brings_a_new_one(converged: Any) -> None:
    host, unit = "nietzsche", "mastodon-sidekiq-scheduler.service"
    before = main_pid(converged, host, unit)
    assert process_of(read_view(converged)[0], host, before)
    converged.ssh(host, f"systemctl stop {unit}", user="root")
    # Sidekiq leaves `processes` as it shuts down: gone as soon as the stop has finished.
    view, _ = read_view(converged)
    assert process_of(view, host, before) is None
    assert not any(p.hostname == host and ("scheduler", 1) in p.queues for p in view.processes)
    converged.ssh(host, f"systemctl start {unit}", user="root")
    after = main_pid(converged, host, unit)
    assert after != before
    poll(lambda: process_of(read_view(converged)[0], host, after), 30, f"{unit} did not heartbeat again")


def test_a_sidekiq_started_by_hand_on_the_cdn_node_shows_and_goes_quiet_on_tstp(converged: Any) -> None:
    host = "franz"
    start = ("cd /home/mastodon/live && echo $$ > /tmp/hand-sidekiq.pid && "
             f"RAILS_ENV=production exec {BUNDLE} exec sidekiq -c 10 -q default")
    converged.ssh(host, f"setsid -f runuser -u mastodon -- sh -c '{start}' >/tmp/hand-sidekiq.log 2>&1 </dev/null",
                  user="root")
    pid = int(poll(lambda: converged.ssh(host, "cat /tmp/hand-sidekiq.pid", user="root", check=False).stdout.strip(),
                   10, "the hand-made Sidekiq did not start"))
    try:
        p = poll(lambda: process_of(read_view(converged)[0], host, pid), 30, "the hand-made Sidekiq does not show")
        assert p.queues == (("default", 0),) and p.concurrency == 10 and not p.quiet
        units = converged.ssh(host, "systemctl show -p MainPID --value 'mastodon-*'", user="root").stdout.split()
        assert str(pid) not in units  # no systemd unit runs it
        # TSTP: quiet from its next heartbeat on (Sidekiq beats every 10 s), still listed.
        converged.ssh(host, f"kill -TSTP {pid}", user="root")
        quiet = poll(lambda: (q := process_of(read_view(converged)[0], host, pid)) and q.quiet and q, 25,
                     "TSTP did not make the process quiet")
        assert quiet.identity == p.identity
    finally:
        converged.ssh(host, f"kill -TERM {pid}", user="root", check=False)
    poll(lambda: process_of(read_view(converged)[0], host, pid) is None, 30, "a stopped process stays listed")


def test_jobs_enqueued_like_sidekiqs_client_show_with_their_latency_and_are_worked_off(converged: Any) -> None:
    host, unit = "freud", "mastodon-sidekiq-default.service"  # the one process that serves mailers
    converged.ssh(host, f"systemctl stop {unit}", user="root")
    try:
        jids = enqueue(converged, "mailers", 50, enqueued_at=time.time() - 600)
        assert len(set(jids)) == 50
        view, _ = read_view(converged)
        mailers = view.queue("mailers")
        assert mailers is not None and mailers.size == 50 and mailers.latency >= 600
        assert mailers.oldest_enqueued_at is not None and abs(mailers.oldest_enqueued_at - (time.time() - 600)) < 60
        stalled = check_unserved(view)
        assert [f.code for f in stalled] == ["sidekiq.queue-stalled"] and "'mailers'" in stalled[0].message
        assert [f.severity for f in check_latency(view, SidekiqPolicy())] == ["warning"]
        oldest = json.loads(decode_token(redis_cli(converged, [["LINDEX", "queue:mailers", "-1"]])[0]))
        assert oldest["jid"] == jids[0] and oldest["class"] == "ActionMailer::MailDeliveryJob"
        assert isinstance(oldest["enqueued_at"], float)  # Sidekiq 7: seconds as a float
    finally:
        converged.ssh(host, f"systemctl start {unit}", user="root")
    poll(lambda: (q := read_view(converged)[0].queue("mailers")) is not None and q.size == 0, 30,
         "the restarted process did not work the mailers queue off")


def test_sidekiq_8_millisecond_timestamps_give_the_same_latency(converged: Any) -> None:
    queue = "fleet-lab-test"  # served by nobody: the job stays
    try:
        enqueue(converged, queue, 1, enqueued_at=time.time() - 600, sidekiq8=True)
        q = read_view(converged)[0].queue(queue)
        assert q is not None and q.size == 1 and 600 <= q.latency < 660
    finally:
        redis_cli(converged, [["DEL", f"queue:{queue}"], ["SREM", "queues", queue]])


def test_the_redis_password_is_in_no_argv_journal_log_or_output(converged: Any) -> None:
    password = lab_redis_password(converged)
    assert len(password) >= 32
    _, out = read_view(converged)
    assert password not in out
    for host in converged.names:
        argv = converged.ssh(host, "ps -eo args", user="root").stdout
        assert password not in argv, f"the Redis password is in a command line on {host}"
        journal = converged.ssh(host, "journalctl --no-pager -o cat", user="root", timeout=120).stdout
        assert password not in journal, f"the Redis password is in {host}'s journal"
    log = converged.ssh(REDIS_HOST, "cat /var/log/redis/redis-server.log", user="root").stdout
    assert password not in log
    for args in (("status", "--json"), ("status",), ("audit",), ("audit", "--format", "json")):
        done = fleet(converged, *args)
        assert "Sidekiq's own view" in done.stdout or '"live"' in done.stdout  # the section ran
        assert password not in done.stdout + done.stderr, f"fleet {' '.join(args)} printed the Redis password"
    for host in converged.names:  # and the collection left it in no journal
        journal = converged.ssh(host, "journalctl --no-pager -o cat --since -5min", user="root", timeout=120).stdout
        assert password not in journal, f"the Redis password is in {host}'s journal"
    journal = journal_path(converged.state_dir)  # the snapshots of those runs, Sidekiq's view in them
    kept = list(journal.parent.glob(journal.name + "*"))
    assert kept and all(password.encode() not in p.read_bytes() for p in kept)


# ------------------------------------------------------------------ through `fleet status` and `fleet audit`

def live(lab: Any) -> dict[str, Any]:
    doc = fleet_json(lab, "status", ok_codes=(0, 1, 2))
    section: dict[str, Any] = doc["sidekiq"]["live"]
    assert section is not None and section["error"] is None, section
    return section


def start_by_hand(lab: Any, host: str, args: str) -> int:
    start = ("cd /home/mastodon/live && echo $$ > /tmp/hand-sidekiq.pid && "
             f"RAILS_ENV=production exec {BUNDLE} exec sidekiq {args}")
    lab.ssh(host, f"setsid -f runuser -u mastodon -- sh -c '{start}' >/tmp/hand-sidekiq.log 2>&1 </dev/null",
            user="root")
    return int(poll(lambda: lab.ssh(host, "cat /tmp/hand-sidekiq.pid", user="root", check=False).stdout.strip(),
                    10, "the hand-made Sidekiq did not start"))


def test_fleet_status_shows_a_sidekiq_started_by_hand_on_the_cdn_host_and_audit_exits_2_naming_it(
        converged: Any) -> None:
    host = "franz"
    pid = start_by_hand(converged, host, "-c 10 -q default -q push")
    try:
        poll(lambda: process_of(read_view(converged)[0], host, pid), 30, "the hand-made Sidekiq does not heartbeat")
        section = live(converged)
        proc = next(p for p in section["processes"] if p["pid"] == pid)
        assert proc["host"] == host and proc["unit"] is None and proc["concurrency"] == 10
        assert [q["name"] for q in proc["queues"]] == ["default", "push"]
        assert all(p["unit_declared"] for p in section["processes"] if p["pid"] != pid)  # the rest: joined
        text = fleet(converged, "status").stdout
        assert "NO UNIT (!)" in text and str(pid) in text
        audit = fleet(converged, "audit")
        assert audit.returncode == 2, audit.stdout + audit.stderr
        line = next(x for x in audit.stdout.splitlines() if "error: a live Sidekiq process" in x)
        assert f"on {host} (pid {pid}, queues default, push" in line
    finally:
        converged.ssh(host, f"kill -TERM {pid}", user="root", check=False)
    poll(lambda: process_of(read_view(converged)[0], host, pid) is None, 30, "a stopped process stays listed")


def test_fleet_status_shows_50_mailers_jobs_waiting_with_their_unit_stopped_and_audit_reports_it(
        converged: Any) -> None:
    host, unit = "freud", "mastodon-sidekiq-default.service"  # the one process that serves mailers
    converged.ssh(host, f"systemctl stop {unit}", user="root")
    try:
        enqueue(converged, "mailers", 50, enqueued_at=time.time() - 600)
        mailers = next(q for q in live(converged)["queues"] if q["name"] == "mailers")
        assert mailers["size"] == 50 and mailers["latency"] >= 600
        assert mailers["by_heartbeat"] == [] and mailers["by_systemd"] == []
        audit = fleet(converged, "audit")
        assert audit.returncode == 2, audit.stdout + audit.stderr
        assert "error: queue 'mailers' holds 50 job(s)" in audit.stdout
    finally:
        converged.ssh(host, f"systemctl start {unit}", user="root")
    poll(lambda: (q := read_view(converged)[0].queue("mailers")) is not None and q.size == 0, 30,
         "the restarted process did not work the mailers queue off")


# ------------------------------------------------------------------ apply's Sidekiq health gate

def sidekiq_gate_on(lab: Any, host: str, unit: str, service: str) -> tuple[str, str]:
    """Restart `unit`, then run its Sidekiq health gate: the script apply builds for the service of
    the lab's desired state declared with `health = { sidekiq = true }`: (why it failed or "", output)."""
    desired = load(lab.repo / "desired_state.toml", lab.repo / "hosts").desired
    assert desired is not None
    declared = desired.service(service)
    assert declared is not None and declared.sidekiq is not None
    svc = dataclasses.replace(declared, health=HealthCheck(sidekiq=True))
    then, window = sidekiq_gate(desired, svc, start_timeout=30)
    lab.ssh(host, f"systemctl restart {unit}", user="root")
    gate = remote.health_gate(unit, svc.health, settle=1, start_timeout=30, then=then)
    out = lab.ssh(host, ["sh", "-c", gate], user="root", timeout=120).stdout
    assert "@@gate ok" in out.splitlines() and "@@gate fail" not in out, out
    return judge_beat(out, host, declared.sidekiq, window), out


def test_the_sidekiq_health_gate_passes_a_restart_and_fails_a_process_serving_other_queues(converged: Any) -> None:
    host, unit = "nietzsche", "mastodon-sidekiq-scheduler.service"
    why, out = sidekiq_gate_on(converged, host, unit, "sidekiq-scheduler")
    assert why == "", out
    assert f"@@sidekiq-beat id {host}:{main_pid(converged, host, unit)}:" in out  # the new process's own
    drop_in = f"/etc/systemd/system/{unit}.d/zz-wrong-queues.conf"
    wrong = f"[Service]\nExecStart=\nExecStart={BUNDLE} exec sidekiq -c 5 -q default\n"
    converged.ssh(host, f"mkdir -p /etc/systemd/system/{unit}.d && printf '{wrong}' > {drop_in} && "
                        "systemctl daemon-reload", user="root")
    try:
        why, out = sidekiq_gate_on(converged, host, unit, "sidekiq-scheduler")
        pid = main_pid(converged, host, unit)
        assert why == f"its new process (pid {pid}) heartbeats with queues default (declared: scheduler,1)", out
    finally:
        converged.ssh(host, f"rm -f {drop_in} && systemctl daemon-reload && systemctl restart {unit}", user="root")
    poll(lambda: all_heartbeating(converged), 30, f"{unit} did not heartbeat again once restored")


# ------------------------------------------------------------------ apply's prune of an undeclared Sidekiq

def test_apply_prunes_a_hand_made_sidekiq_unit_on_the_cdn_node_and_returns_once_its_process_left_processes(
        converged: Any) -> None:
    """The postmortem's unit (mastodon-* prunes): apply stops it and waits for its heartbeat to go
    (fleet/resources/undeclared.py), so the view read once, right after apply, no longer has it."""
    host, unit = "franz", "mastodon-sidekiq.service"
    install_unit(converged, host, unit, sidekiq_unit("-c 10 -q default"))
    pid = main_pid(converged, host, unit)
    try:
        poll(lambda: process_of(read_view(converged)[0], host, pid), 30, f"{unit} on {host} does not heartbeat")
        done = fleet(converged, "apply", "--settle", "1", "--yes", timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        view, out = read_view(converged)  # once: apply returned only when the process had left
        assert process_of(view, host, pid) is None, out
        assert converged.ssh(host, f"systemctl is-active {unit}", user="root", check=False).stdout.strip() != "active"
        left = converged.ssh(host, f"ls /etc/systemd/system/{unit}", user="root", check=False)
        assert left.returncode != 0, left.stdout
    finally:  # the lab as `converged` expects it, whatever failed above
        converged.ssh(host, f"systemctl disable --now --quiet {unit} 2>/dev/null; rm -f /etc/systemd/system/{unit}; "
                            "systemctl daemon-reload; systemctl reset-failed", user="root", check=False)


# ------------------------------------------------------------------ a process that stops heartbeating (last)

def stopped(lab: Any, host: str, pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc/PID/stat, so it writes nothing more to Redis."""
    stat: str = lab.ssh(host, f"cat /proc/{pid}/stat", user="root").stdout
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def test_an_active_unit_whose_process_stops_heartbeating_is_reported_within_70_s(converged: Any) -> None:
    """A process that stops beating (SIGSTOP) leaves its heartbeat hash to Redis, which drops it once its
    60 s TTL (Sidekiq's EXPIRE after every beat) runs out; fleet then reports the unit.  The test does
    not wait those 60 s: once the process is stopped it runs the TTL out in Redis (PEXPIRE 1 ms), which
    is what Redis would do by itself a minute later.  The unit has been active since the module's
    converge, and fleet reports it once that is longer than the 60 s a starting Sidekiq is given to
    beat first: hence this test comes last in the module (the poll waits out what is left of them)."""
    host, unit = "nietzsche", "mastodon-sidekiq-push-pull.service"
    pid = main_pid(converged, host, unit)
    beating = process_of(read_view(converged)[0], host, pid)
    assert beating
    ttl = int(redis_cli(converged, [["TTL", beating.identity]])[0])
    assert 0 < ttl <= 60, f"the heartbeat hash's TTL is {ttl}, not Sidekiq's 60 s expiry"
    converged.ssh(host, f"kill -STOP {pid}", user="root")
    stopped_at = time.monotonic()
    try:
        poll(lambda: stopped(converged, host, pid), 10, f"{unit}'s process {pid} did not stop")
        assert redis_cli(converged, [["PEXPIRE", beating.identity, "1"]]) == ["1"]

        def reported() -> bool:
            found = [f for f in live(converged)["findings"] if f["code"] == "sidekiq.no-heartbeat"]
            return any(unit in f["message"] and f["host"] == host for f in found)

        poll(reported, 70, f"{unit}, stopped, was not reported within 70 s")
        assert time.monotonic() - stopped_at <= 70
        assert converged.ssh(host, f"systemctl is-active {unit}", user="root").stdout.strip() == "active"
        assert beating.identity in read_view(converged)[0].stale  # still a member of `processes`, its hash gone
    finally:
        converged.ssh(host, f"kill -CONT {pid}", user="root", check=False)
    poll(lambda: process_of(read_view(converged)[0], host, pid), 30, f"{unit} did not heartbeat again after CONT")
