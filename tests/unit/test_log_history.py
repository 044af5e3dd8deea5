"""`fleet log` from any checkout: the hosts' history read first (one round trip per host, again
while a host has more), merged into the journal's cache, and shown with who ran each run, its
id and the desired state's git commit.

The hosts are a FakeTransport whose history script runs for real with `sh` on a directory per
host standing for /var/lib/fleet; records are appended there by fleet's own append command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import FleetDir

from fleet import cli, history
from fleet.actions import Action, Change
from fleet.collect import collector
from fleet.errors import TransportError
from fleet.remote import STATE
from fleet.transport.fake import Call, FakeTransport
from fleet.transport.protocol import RunResult
from fleet.workflows import observe as observing

COMMIT = "3f2a9c1d0b7e4a55" + "0" * 24
RUN = "20261128T140307-a1b2c3"


def start(host: str, unit: str = "mastodon-web.service") -> Change:
    return Change(host, Action.START, unit, "declared to run here", "web", before="inactive/dead",
                  after="active/running")


class Hosts(FakeTransport):
    """Hosts whose history scripts run for real on `root/<host>`."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.dirs = root
        self.hook = self._history

    def state(self, host: str) -> Path:
        return self.dirs / host

    def _history(self, call: Call) -> RunResult | None:
        if "@@fleet-history" not in call.command:
            return None
        done = subprocess.run(["sh", "-c", call.command.replace(STATE, str(self.state(call.host)))],
                              capture_output=True, check=False, timeout=60)
        return call.reply(done.stdout, done.stderr, done.returncode)

    def append(self, host: str, body: str) -> None:
        command, stdin = history.append_command(body, state_dir=str(self.state(host)))
        done = subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, check=False, timeout=60)
        assert done.returncode == 0, done.stderr

    def applied(self, host: str, change: Change, *, outcome: str | None = "ok", run: str = RUN,
                who: str = "alice@laptop", at: float = 1_764_338_587.0) -> None:
        self.append(host, history.step_body(change, run_id=run, who=who, desired_hash="dh", started=at,
                                            fleet="hachyderm", commit=COMMIT, dirty=True))
        if outcome is not None:
            self.append(host, history.outcome_body(change, run_id=run, outcome=outcome, ended=at + 1))


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Hosts:
    fake = Hosts(tmp_path / "hosts")
    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: fake)
    return fake


def log(capsys: pytest.CaptureFixture[str], example: FleetDir, state: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--dir", str(example.root), "--state-dir", str(state), "log", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_fresh_checkout_shows_the_applies_recorded_on_a_host_with_who_run_and_commit(
        hosts: Hosts, example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts.applied("fritz", start("fritz"))
    code, out, err = log(capsys, example, tmp_path / "fresh", "--host", "fritz")
    assert code == 0 and err == ""
    heading, sentence = out.splitlines()
    assert heading == f"run {RUN} by alice@laptop, desired state at git 3f2a9c1d0b7e (dirty)"
    assert sentence.startswith("  2025-11-28 ") and sentence.endswith(
        "alice@laptop: on fritz, started mastodon-web.service (was inactive/dead) — ok")
    assert {c.host for c in hosts.calls} == {"fritz"}  # --host reads that host's history alone


def test_a_step_without_its_outcome_whose_run_no_longer_holds_the_host_is_shown_interrupted(
        hosts: Hosts, example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts.applied("fritz", start("fritz"), outcome=None)  # the host's apply lock is free
    code, out, _ = log(capsys, example, tmp_path / "fresh", "--host", "fritz")
    assert code == 0
    assert out.splitlines()[1].endswith("— STARTED, NEVER FINISHED (the run ended interrupted)")


def test_every_host_is_read_and_a_second_log_reads_only_what_is_new_without_showing_anything_twice(
        hosts: Hosts, example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts.applied("fritz", start("fritz"))
    hosts.applied("franz", start("franz"), at=1_764_338_600.0)
    state = tmp_path / "fresh"
    _, first, _ = log(capsys, example, state)
    assert len(first.splitlines()) == 3 and "on fritz" in first and "on franz" in first
    hosts.applied("franz", start("franz", "mastodon-streaming.service"), run="20261128T150000-b0b0b0", who="bob@ci",
                  at=1_764_342_000.0)
    _, second, _ = log(capsys, example, state)
    lines = second.splitlines()
    assert lines[:3] == first.splitlines() and len(lines) == 5
    assert lines[3].startswith("run 20261128T150000-b0b0b0 by bob@ci")


def test_a_long_history_is_read_in_bounded_reads_until_its_end(
        hosts: Hosts, example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector, "HISTORY_READ_RECORDS", 3)
    for i in range(5):
        hosts.applied("fritz", start("fritz", f"unit{i}.service"), at=1_764_338_587.0 + i)
    _, out, _ = log(capsys, example, tmp_path / "fresh", "--host", "fritz")
    assert [line.split("started ")[1].split(" ")[0] for line in out.splitlines()[1:]] == [
        f"unit{i}.service" for i in range(5)]
    assert len(hosts.calls) > 2


def test_a_host_not_reached_is_a_warning_and_what_the_journal_holds_is_shown(
        hosts: Hosts, example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts.applied("fritz", start("fritz"))
    state = tmp_path / "fresh"
    log(capsys, example, state, "--host", "fritz")
    hosts.hook = lambda call: None  # (the hook answers before a failing host fails)
    hosts.fail("fritz", TransportError("fritz", "unreachable", "fritz: connection refused"))
    code, out, err = log(capsys, example, state, "--host", "fritz")
    assert code == 0 and "on fritz, started mastodon-web.service" in out
    assert err.startswith("warning: fritz: its history was not read (unreachable: fritz: connection refused)")


def test_cached_reads_no_host(hosts: Hosts, example: FleetDir, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    hosts.applied("fritz", start("fritz"))
    code, out, _ = log(capsys, example, tmp_path / "fresh", "--cached")
    assert code == 0 and hosts.calls == [] and "nothing has been applied" in out


def test_a_hand_edited_history_is_a_warning_of_fleet_log(
        hosts: Hosts, example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts.applied("fritz", start("fritz"))
    hosts.applied("fritz", start("fritz", "mastodon-streaming.service"), run="20261128T150000-b0b0b0")
    f = hosts.state("fritz") / history.HISTORY_FILE
    f.write_text(f.read_text().replace("inactive/dead", "active/running", 1))
    code, _, err = log(capsys, example, tmp_path / "fresh", "--host", "fritz")
    assert code == 0
    assert err == ("warning: history on fritz was edited or truncated at its start: record 2 does not continue "
                   "record 1: one of the two was changed\n")


# ---------------------------------------------------------------- fleet audit from any checkout


def test_an_audit_credits_a_change_to_a_run_only_the_hosts_history_knows(tmp_path: Path) -> None:
    from observed import EXAMPLE_SECRETS, converged, example, stopped

    from fleet.history import GENESIS, HistoryRead, host_line, line_hash, parse_record
    from fleet.history_cache import HistoryCache
    from fleet.journal import Journal
    from fleet.snapshot import host_summary, pack
    from fleet.workflows.audit import changes_since

    old = dict(converged(example(), EXAMPLE_SECRETS))
    new = dict(old)
    new["fritz"] = stopped(old["fritz"], "mastodon-web.service")
    t0 = 1_800_000_000.0
    stop = Change("fritz", Action.RESTART, "mastodon-web.service", "its unit file changed")
    lines = [host_line(history.step_body(stop, run_id=RUN, who="alice@laptop", desired_hash="dh", started=t0 + 60,
                                         commit=COMMIT, dirty=False), seq=1, prev=GENESIS)]
    lines.append(host_line(history.outcome_body(stop, run_id=RUN, outcome="ok", ended=t0 + 61), seq=2,
                           prev=line_hash(lines[0])))
    with Journal.open(tmp_path / "b" / "journal.sqlite") as journal:  # checkout B: it never applied anything
        journal.save_snapshot(command="status", fleet="hachyderm", lab=False, hosts=host_summary(old), data=pack(old),
                              operator="bob@desk", now=t0)
        (base,) = journal.snapshots()
        HistoryCache(journal).merge(HistoryRead("fritz", "ok", tuple(parse_record(x) for x in lines)))
        changes, timeline = changes_since(journal, base, new, t0 + 120)
    web = [c for c in changes if c.target == "mastodon-web.service"]
    assert web and all(c.attribution == f"fleet apply run {RUN} by alice@laptop, desired state at git "
                                        f"{COMMIT[:12]}" for c in web)
    assert any("alice@laptop: on fritz, restarted mastodon-web.service" in line for _, line in timeline)


def test_a_broken_chain_on_a_host_is_an_error_finding_of_the_audit_for_that_host(tmp_path: Path) -> None:
    from fleet.history import Break, HistoryRead
    from fleet.history_cache import HistoryCache
    from fleet.journal import Journal
    from fleet.workflows.audit import history_findings
    from fleet.workflows.base import Common

    common = Common.at(tmp_path, state_dir=tmp_path / "state")
    assert history_findings(common, ["fritz"], {}) == []  # no journal yet: nothing known, nothing to say
    with Journal.open(tmp_path / "state" / "journal.sqlite") as journal:
        HistoryCache(journal).merge(HistoryRead("fritz", "ok", breaks=(Break("fritz", 6, "record 8 does not "
                                                                              "continue record 7"),)))
    found = history_findings(common, ["fritz", "franz"], {"franz": "franz: unexpected line in the history section"})
    assert [(f.severity, f.code, f.host) for f in found] == [
        ("error", "history.broken", "fritz"), ("error", "history.unreadable", "franz")]
    assert found[0].message == ("history on fritz was edited or truncated after record 6: record 8 does not continue "
                                "record 7")
    assert history_findings(common, ["franz"], {}) == []  # only the hosts audited


# ---------------------------------------------------------------- `fleet history` and `fleet history ack`


class AckingHosts(Hosts):
    """Hosts that also run the ack's append for real (its record on stdin, as the host gets it)."""

    def _history(self, call: Call) -> RunResult | None:
        if "echo @@ok" in call.command and STATE in call.command:
            done = subprocess.run(["sh", "-c", call.command.replace(STATE, str(self.state(call.host)))],
                                  input=call.stdin, capture_output=True, check=False, timeout=60)
            return call.reply(done.stdout, done.stderr, done.returncode)
        return super()._history(call)


def run(capsys: pytest.CaptureFixture[str], example: FleetDir, state: Path, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--dir", str(example.root), "--state-dir", str(state), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_history_lists_the_runs_recorded_on_the_hosts_from_a_checkout_that_never_applied(
        hosts: Hosts, example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hosts.applied("fritz", start("fritz"))
    hosts.applied("franz", start("franz"), outcome="failed")
    hosts.applied("franz", start("franz", "x.service"), run="20261128T150000-b0b0b0", who="bob@ci",
                  at=1_764_342_000.0, outcome=None)  # its host's lock is free: interrupted
    code, out, err = run(capsys, example, tmp_path / "fresh", "history")
    assert code == 0 and err == ""
    runs = out.split("Snapshots (oldest first):")[0].splitlines()
    assert runs[0] == "Runs (newest first):" and "20261128T150000-b0b0b0" in runs[3] and RUN in runs[4]
    assert "bob@ci" in runs[3] and runs[3].rstrip().endswith("1 interrupted")
    assert "alice@laptop" in runs[4] and "git 3f2a9c1d0b7e (dirty)" in runs[4] and "franz, fritz" in runs[4]
    assert runs[4].rstrip().endswith("1 ok, 1 failed")
    code, out, _ = run(capsys, example, tmp_path / "fresh", "history", "--cached", "--json")
    doc = json.loads(out)
    assert [r["run_id"] for r in doc["runs"]] == ["20261128T150000-b0b0b0", RUN] and doc["snapshots"] == []
    calls = len(hosts.calls)
    code, out, _ = run(capsys, example, tmp_path / "fresh", "history", "--snapshots")
    assert code == 0 and "Runs" not in out and len(hosts.calls) == calls  # no network


def test_history_ack_records_the_acknowledgement_on_the_host_and_refuses_an_intact_chain(
        tmp_path: Path, example: FleetDir, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = AckingHosts(tmp_path / "hosts")
    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: hosts)
    hosts.applied("fritz", start("fritz"))
    hosts.applied("fritz", start("fritz", "x.service"), at=1_764_338_600.0)
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = run(capsys, example, a, "history", "ack", "fritz", "--reason", "looked")
    assert code == 1 and "the history on fritz has no unacknowledged break: nothing to acknowledge" in err
    file = hosts.state("fritz") / "history.jsonl"
    file.write_text(file.read_text().replace('"target":"mastodon-web.service"', '"target":"mastodon-wob.service"', 1))
    code, _, err = run(capsys, example, a, "history")
    assert err == "warning: history on fritz was edited or truncated at its start: record 1 differs from the copy " \
                  "collected before\n"
    code, out, err = run(capsys, example, a, "history", "ack", "fritz", "--reason", "restored\x1b[2J by hand")
    assert code == 0 and out.startswith("Acknowledged on fritz (record 5 of its history): history on fritz was")
    record = json.loads(file.read_text().splitlines()[-1])
    assert (record["kind"], record["reason"], record["breaks"][0]["after"]) == ("ack", "restored\x1b[2J by hand", 0)
    for state in (a, b):  # b: a checkout that never read fritz honours the ack too
        code, _, err = run(capsys, example, state, "history")
        assert code == 0 and err.startswith("note: history on fritz was edited or truncated at its start: ")
        assert "restored\\x1b[2J by hand" in err and "\x1b" not in err  # operator text, escaped
    code, _, err = run(capsys, example, a, "history", "ack", "fritz", "--reason", "again")
    assert code == 1 and "nothing to acknowledge" in err
