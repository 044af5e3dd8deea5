"""The hosts' history, read in the collection's own round trip: the section is asked for with
what this checkout saw last, cut out of the output before the host's state is parsed, and
parsed on its own — a history the parser refuses never makes the host unknown.

The host's answer is a captured collection output (tests/fixtures/collect/) with the history
section the collection script asked for run for real with `sh` on a directory standing for
/var/lib/fleet, so what is parsed is what a host prints."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from fleet import history
from fleet.actions import Action, Change
from fleet.collect import collector
from fleet.collect.collector import HistoryAsk, collect_all
from fleet.collect.parse import parse_host
from fleet.errors import ParseError
from fleet.model import Desired, HostState
from fleet.remote import STATE
from fleet.transport.fake import Call, FakeTransport
from fleet.transport.protocol import RunResult

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "collect" / "bare-fritz.txt"
HOST = "fritz"
START = Change(HOST, Action.START, "mastodon-web.service", "declared to run here", "web", before="inactive/dead",
               after="active/running")


def desired_with_fritz() -> Desired:
    from observed import example

    return example()


def append(state: Path, n: int) -> None:
    f = state / history.HISTORY_FILE
    done = len(f.read_text().splitlines()) if f.exists() else 0  # each record of its own run
    for i in range(done, done + n):
        body = history.step_body(START, run_id=f"20261128T1403{i:02d}-aaaaaa", who="alice@laptop", desired_hash="dh",
                                 started=1_764_338_587.0 + i)
        command, stdin = history.append_command(body, state_dir=str(state))
        assert subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, check=False).returncode == 0


def answering_with_history(fake: FakeTransport, state: Path, *, section: str | None = None) -> None:
    """The host answers the collection with the captured output, its history section run for real
    on `state` (or `section` instead, as printed)."""

    def hook(call: Call) -> RunResult | None:
        text = FIXTURE.read_text()
        m = re.search(r"echo '@@history'\n.*(?=echo '@@end'\n\Z)", call.command, re.DOTALL)
        if m is None:
            return call.reply(text)
        if section is None:
            done = subprocess.run(["sh", "-c", m.group(0).replace(STATE, str(state))], capture_output=True,
                                  check=False, timeout=60)
            assert done.returncode == 0, done.stderr
            printed = done.stdout.decode()
        else:
            printed = section
        return call.reply(text.replace("@@end\n", printed + "@@end\n"))

    fake.hook = hook


def test_a_collection_reads_the_hosts_history_in_the_same_round_trip_and_its_state_is_the_same(
        tmp_path: Path) -> None:
    append(tmp_path, 2)
    desired = desired_with_fritz()
    fritz = [h for h in desired.hosts if h.name == HOST]
    fake = FakeTransport()
    answering_with_history(fake, tmp_path)
    got = collect_all(desired, fake, fritz, history_of={HOST: HistoryAsk()})
    assert len(fake.calls) == 1 and "@@history" in fake.calls[0].command
    state = got.results[HOST]
    assert isinstance(state, HostState)
    assert state.units == parse_host(HOST, FIXTURE.read_text()).units
    read = got.history[HOST]
    assert isinstance(read, history.HistoryRead) and read.status == "ok" and read.breaks == ()
    assert [r.seq for r in read.records] == [1, 2] and read.last_seen is not None and read.last_seen.seq == 2
    # The next collection asks only for what came after.
    append(tmp_path, 1)
    again = collect_all(desired, fake, fritz, history_of={HOST: HistoryAsk(read.last_seen)}).history[HOST]
    assert isinstance(again, history.HistoryRead) and [r.seq for r in again.records] == [3]


def test_a_history_the_parser_refuses_is_a_problem_of_its_own_and_the_host_stays_known(tmp_path: Path) -> None:
    desired = desired_with_fritz()
    fritz = [h for h in desired.hosts if h.name == HOST]
    fake = FakeTransport()
    answering_with_history(fake, tmp_path, section="@@history\nv 1\nthis is no line of the script\nlock -\nend\n")
    got = collect_all(desired, fake, fritz, history_of={HOST: HistoryAsk()})
    assert isinstance(got.results[HOST], HostState)
    problem = got.history[HOST]
    assert isinstance(problem, ParseError) and problem.message.startswith("fritz: unexpected line in the history")


def test_without_being_asked_the_collection_reads_no_history(tmp_path: Path) -> None:
    append(tmp_path, 1)
    desired = desired_with_fritz()
    fake = FakeTransport()
    answering_with_history(fake, tmp_path)
    got = collect_all(desired, fake, [h for h in desired.hosts if h.name == HOST])
    assert "@@history" not in fake.calls[0].command and got.history == {}
    assert isinstance(got.results[HOST], HostState)


def test_the_history_read_is_bounded_well_inside_the_collections_output_limit() -> None:
    from fleet.workflows.observe import MAX_OUTPUT

    assert collector.HISTORY_READ_BYTES + 256 * 1024 < MAX_OUTPUT


def test_an_observation_merges_each_hosts_history_into_the_journals_cache_and_asks_only_for_what_is_new(
        tmp_path: Path) -> None:
    from fleet.history_cache import HistoryCache
    from fleet.journal import Journal, journal_path
    from fleet.targets import Targets
    from fleet.workflows.base import Common, Scope
    from fleet.workflows.observe import observe

    class Quiet:
        def note(self, line: str) -> None:
            raise AssertionError(line)

        def progress(self, line: str) -> None:
            pass

    append(tmp_path / "host", 2)
    desired = desired_with_fritz()
    fritz = tuple(h for h in desired.hosts if h.name == HOST)
    fake = FakeTransport()
    answering_with_history(fake, tmp_path / "host")
    common = Common.at(tmp_path, state_dir=tmp_path / "state")
    targets = Targets(hosts=fritz, ssh_config=None, known_hosts=None, lab=False)
    seen = observe(common, Scope(), "status", desired, targets, fake, Quiet())  # type: ignore[arg-type]
    assert isinstance(seen.results[HOST], HostState) and seen.history_problems == {}
    append(tmp_path / "host", 1)
    observe(common, Scope(), "status", desired, targets, fake, Quiet())  # type: ignore[arg-type]
    with Journal.open(journal_path(common.state_dir)) as journal:
        cache = HistoryCache(journal)
        assert [r.seq for r in cache.records(host=HOST)] == [1, 2, 3]
        last = cache.last_seen(HOST)
    assert last is not None and last.seq == 3
    assert f"S={2}" in fake.calls[1].command  # the second read asked only for what came after record 2
