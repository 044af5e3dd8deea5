"""`fleet watch` as wired (fleet/workflows/watch.py and the CLI): whole cycles through the workflow
with the observation scripted (everything else real: the desired state on disk, the journal and
its snapshots, the outbox, a webhook receiver on 127.0.0.1, the metrics file and the page), the
loop ending between cycles, `[watch]` in desired_state.toml, and apply's posts."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FleetDir, fleet_executable
from observed import unreachable
from prometheus_client.parser import text_string_to_metric_families
from test_workflows import Recorder, secrets_file
from watch_scenarios import WEBHOOK_URLS, baseline, s3_hand_edit, secret_needles
from webhook_server import Receiver

from fleet import cli
from fleet.errors import FleetError
from fleet.journal import Journal, journal_path
from fleet.model import HostResult
from fleet.notify import Delivery, Outbox, parse_target
from fleet.transport.fake import FakeTransport
from fleet.watch.events import ApplyRun, apply_started
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Scope
from fleet.workflows.watch import CycleResult, WatchOptions, notify_apply, run_cycle, watch

QUICK = Delivery(timeout=2, attempts=1)


class Fleet:
    """What the hosts report to the next observation (set by the test), observed through the
    real snapshot-keeping step."""

    def __init__(self) -> None:
        self.results: dict[str, HostResult] = baseline()
        self.observed = 0


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    fleet = Fleet()
    keep = observing.keep_snapshot

    def observe(common: Any, scope: Any, command: str, desired: Any, targets: Any, t: Any,
                reporter: Any) -> observing.Observation:
        assert command == "watch"
        fleet.observed += 1
        results = {h.name: fleet.results[h.name] for h in targets.hosts}
        return observing.Observation(results, keep(common, command, desired, results, reporter))

    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: FakeTransport())
    monkeypatch.setattr(observing, "observe", observe)
    yield fleet


def with_watch_table(example: FleetDir, table: str) -> None:
    example.write("desired_state.toml", example.desired_path.read_text(encoding="utf-8") + "\n" + table)


def options(example: FleetDir, tmp_path: Path, **kw: Any) -> WatchOptions:
    return WatchOptions(Common.at(example.root, state_dir=tmp_path / "state"), Scope(),
                        metrics_file=tmp_path / "fleet.prom", html_dir=tmp_path / "www", **kw)


def cycle(o: WatchOptions, reporter: Recorder | None = None) -> CycleResult:
    return run_cycle(o, reporter or Recorder(), delivery=QUICK, sleep=lambda _: None)


def texts(receiver: Receiver) -> list[str]:
    return [b["text"] for b in receiver.bodies()]


def test_a_hand_edit_is_one_message_then_silence_with_metrics_and_page(
        example: FleetDir, tmp_path: Path, hosts: Fleet, receiver: Receiver) -> None:
    with_watch_table(example, f'[watch]\nnotify = ["slack:{receiver.url("/chat")}"]\n')
    o = options(example, tmp_path)
    first = cycle(o)
    assert first.events == () and receiver.requests == [], "a converged fleet is not news"

    hosts.results = s3_hand_edit(hosts.results)
    second = cycle(o)
    [message] = texts(receiver)
    assert "franz" in message and "S3_ENABLED" in message and "changed outside fleet" in message
    assert second.snapshot_id and second.snapshot_id != first.snapshot_id
    families = {f.name: f for f in text_string_to_metric_families((tmp_path / "fleet.prom").read_text())}
    drift = [s for s in families["fleet_drift"].samples if s.labels["host"] == "franz"]
    assert drift and all(s.value == 1 for s in drift) and any(s.labels["kind"] == "env" for s in drift)
    page = (tmp_path / "www" / "index.html").read_text()
    assert "S3_ENABLED" in page and "changed outside fleet" in page

    assert cycle(o).events == () and len(receiver.requests) == 1, "nothing changed, nothing posted"

    hosts.results = baseline()  # put back by hand too: resolved, and again outside fleet
    fourth = cycle(o)
    assert {e.kind for e in fourth.events} >= {"change.outside", "drift.resolved"}
    assert len(receiver.requests) == 2 and "[RESOLVED]" in texts(receiver)[1]
    assert hosts.observed == 4


def test_an_unreachable_host_is_an_event_and_so_is_its_return(example: FleetDir, tmp_path: Path,
                                                              hosts: Fleet) -> None:
    o = options(example, tmp_path)
    cycle(o)
    hosts.results = {**hosts.results, "freud": unreachable("freud")}
    down = cycle(o)
    assert down.unreachable == ("freud",)
    assert [(e.kind, e.host) for e in down.events if e.kind.startswith("host.")] == [("host.unreachable", "freud")]
    assert down.events[0].kind == "host.unreachable", [e.text for e in down.events]
    assert cycle(o).events == ()
    hosts.results = baseline()
    back = cycle(o)
    assert [(e.kind, e.host) for e in back.events if e.kind.startswith("host.")] == [("host.back", "freud")]
    assert {e.kind for e in back.events} <= {"host.back", "finding.resolved"}


def test_a_receiver_down_gets_the_message_on_the_next_cycle_once(example: FleetDir, tmp_path: Path, hosts: Fleet,
                                                                  receiver: Receiver) -> None:
    o = options(example, tmp_path, notify=(receiver.url("/hook"),))
    cycle(o)
    receiver.down()
    hosts.results = s3_hand_edit(hosts.results)
    reporter = Recorder()
    cycle(o, reporter)
    assert any("not delivered" in n and "kept for the next cycle" in n for n in reporter.notes)
    assert not any(receiver.url("/hook") in n for n in reporter.notes), "a webhook URL is a credential"
    receiver.up()
    cycle(o)
    cycle(o)
    ids = [b["id"] for b in receiver.bodies()]
    assert ids and len(ids) == len(set(ids)), "each event delivered once"
    assert any(b["kind"] == "change.outside" and b["data"].get("key") == "S3_ENABLED" for b in receiver.bodies())


def test_nothing_secret_reaches_a_message_the_metrics_or_the_page(example: FleetDir, tmp_path: Path, hosts: Fleet,
                                                                  receiver: Receiver) -> None:
    o = options(example, tmp_path, notify=("slack:" + receiver.url("/chat"), receiver.url("/hook")))
    cycle(o)
    hosts.results = s3_hand_edit(hosts.results)
    reporter = Recorder()
    cycle(o, reporter)
    shown = [str(b) for b in receiver.bodies()] + reporter.notes + [(tmp_path / "fleet.prom").read_text(),
                                                                    (tmp_path / "www" / "index.html").read_text()]
    assert len(receiver.requests) >= 2
    for needle in [*secret_needles(), receiver.url("/chat"), receiver.url("/hook")]:
        assert not [s for s in shown if needle in s], needle


def test_the_loop_ends_between_cycles_when_asked(example: FleetDir, tmp_path: Path, hosts: Fleet) -> None:
    stop = threading.Event()
    seen: list[CycleResult] = []

    def on_cycle(result: CycleResult) -> None:
        seen.append(result)
        stop.set()  # SIGTERM during the cycle: it ends, and no other begins

    assert watch(options(example, tmp_path, every=3600), Recorder(), stop=stop, on_cycle=on_cycle) == 1
    assert len(seen) == 1 and hosts.observed == 1


def test_a_failing_cycle_does_not_end_the_loop(example: FleetDir, tmp_path: Path, hosts: Fleet) -> None:
    stop = threading.Event()
    reporter = Recorder()
    cycles = iter(range(3))

    def on_cycle(result: CycleResult) -> None:
        if next(cycles) == 1:
            stop.set()

    example.write("desired_state.toml", "this is not toml = = =\n")
    clock = iter(range(0, 10_000, 1))  # no real waiting: each cycle "took" longer than --every

    def monotonic() -> float:
        n = next(clock)
        if n == 2:  # the broken file is fixed before the second cycle
            example.write("desired_state.toml", (Path(__file__).parents[2] / "desired_state.toml").read_text())
        return float(n * 100)

    assert watch(options(example, tmp_path, every=10), reporter, stop=stop, on_cycle=on_cycle,
                 monotonic=monotonic) == 3
    assert any(n.startswith("fleet watch: this cycle failed:") for n in reporter.notes)
    assert hosts.observed == 2


def test_once_raises_what_stops_it(example: FleetDir, tmp_path: Path, hosts: Fleet,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_TEST_UNSET_HOOK", raising=False)
    with pytest.raises(FleetError, match="FLEET_TEST_UNSET_HOOK is not set"):
        watch(options(example, tmp_path, once=True, notify=("env:FLEET_TEST_UNSET_HOOK",)), Recorder())
    with pytest.raises(FleetError, match=r"only reads files named \*\.prom"):
        watch(replace_metrics(options(example, tmp_path, once=True), tmp_path / "fleet.txt"), Recorder())
    assert hosts.observed == 0


def replace_metrics(o: WatchOptions, path: Path) -> WatchOptions:
    from dataclasses import replace

    return replace(o, metrics_file=path)


def test_watch_settings_come_from_the_desired_state(example: FleetDir, tmp_path: Path, hosts: Fleet,
                                                    monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    monkeypatch.setenv("FLEET_TEST_HOOK", receiver.url("/from-env"))
    with_watch_table(example, '[watch]\nnotify = ["webhook:env:FLEET_TEST_HOOK"]\nremind_every = "1h"\n')
    o = options(example, tmp_path)
    cycle(o)
    hosts.results = s3_hand_edit(hosts.results)
    cycle(o)
    assert receiver.requests and {r.path for r in receiver.requests} == {"/from-env"}


def test_a_webhook_url_in_the_desired_state_is_refused_with_its_line(example: FleetDir) -> None:
    with_watch_table(example, f'[watch]\nnotify = ["{WEBHOOK_URLS[0]}"]\n')
    [f] = [f for f in example.check() if f.key == "watch.notify"]
    assert f.code == "config.credential-in-clear" and f.line is not None and f.is_error
    assert WEBHOOK_URLS[0] not in f.message + f.hint


def test_apply_posts_through_the_outbox_once_and_a_failed_post_is_only_a_note(
        example: FleetDir, tmp_path: Path, receiver: Receiver) -> None:
    from fleet import config

    common = Common.at(example.root, state_dir=tmp_path / "state")
    desired = config.load(common.desired, common.hosts).desired
    assert desired is not None
    target = parse_target(receiver.url("/hook"))
    run = ApplyRun("20270115T081200-c0ffee", "alice@laptop", started=1_800_000_000.0)
    receiver.down()
    reporter = Recorder()
    notify_apply(common, desired, [target], apply_started(run), reporter, delivery=QUICK)
    assert any("not delivered" in n for n in reporter.notes) and receiver.requests == []
    receiver.up()
    notify_apply(common, desired, [target], apply_started(run), Recorder(), delivery=QUICK)
    [body] = receiver.bodies()
    assert body["kind"] == "apply.started" and body["data"]["run_id"] == run.id
    assert Outbox(common.state_dir).pending() == []


def test_an_unusable_notify_on_apply_is_refused_before_any_host_is_touched(
        example: FleetDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.workflows.apply import ApplyOptions, apply

    transport = FakeTransport()
    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: transport)
    monkeypatch.delenv("FLEET_TEST_UNSET_HOOK", raising=False)
    options = ApplyOptions(Common.at(example.root, state_dir=tmp_path / "state"), Scope(), yes=True,
                           secrets=secrets_file(tmp_path), notify=("env:FLEET_TEST_UNSET_HOOK",))
    with pytest.raises(FleetError, match="--notify.*FLEET_TEST_UNSET_HOOK is not set"):
        apply(options, Recorder())
    assert transport.commands() == []


def test_a_broken_outbox_is_a_note_for_apply(example: FleetDir, tmp_path: Path, receiver: Receiver) -> None:
    from fleet import config

    common = Common.at(example.root, state_dir=tmp_path / "state")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "watch-outbox.json").write_text("{not json")
    desired = config.load(common.desired, common.hosts).desired
    assert desired is not None
    reporter = Recorder()
    notify_apply(common, desired, [parse_target(receiver.url())],
                 apply_started(ApplyRun("r1", "alice", started=1.0)), reporter, delivery=QUICK)
    assert any(n.startswith("notify: ") and "the apply goes on" in n for n in reporter.notes)


def test_the_journal_keeps_each_watch_observation(example: FleetDir, tmp_path: Path, hosts: Fleet) -> None:
    o = options(example, tmp_path)
    cycle(o)
    cycle(o)
    with Journal.open(journal_path(tmp_path / "state")) as journal:
        assert [s.command for s in journal.snapshots()] == ["watch", "watch"]


# ---------------------------------------------------------------- the command line


def run_fleet(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([fleet_executable(), *argv], capture_output=True, text=True, cwd=cwd, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_print_systemd_unit_runs_the_same_fleet_with_env_references_only(example: FleetDir) -> None:
    done = run_fleet("--dir", str(example.root), "watch", "--print-systemd-unit", "--notify", "env:FLEET_WEBHOOK",
                     "--every", "120", cwd=example.root)
    assert done.returncode == 0, done.stderr
    exec_start = next(x for x in done.stdout.splitlines() if x.startswith("ExecStart="))
    assert exec_start.startswith(f"ExecStart={fleet_executable()} --dir {example.root}")
    assert exec_start.endswith("watch --every 120 --notify env:FLEET_WEBHOOK")
    timer = run_fleet("--dir", str(example.root), "watch", "--print-systemd-unit", "--timer", cwd=example.root)
    assert "OnUnitInactiveSec=300s" in timer.stdout and "watch --once" in timer.stdout
    refused = run_fleet("--dir", str(example.root), "watch", "--print-systemd-unit", "--notify", WEBHOOK_URLS[1],
                        cwd=example.root)
    assert refused.returncode == 1 and WEBHOOK_URLS[1] not in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["--timer"], "--timer only goes with --print-systemd-unit"),
    (["--remind-every", "5s", "--once"], "--remind-every '5s' is not a duration of at least a minute"),
    (["--every", "2"], "--every 2: a cycle every less than 10 seconds"),
    (["--once", "--metrics-file", "fleet.txt"], "only reads files named *.prom"),
])
def test_bad_watch_options_are_one_line_errors(example: FleetDir, capsys: pytest.CaptureFixture[str],
                                               argv: list[str], message: str) -> None:
    assert cli.main(["--dir", str(example.root), "watch", *argv]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
