"""The hosts' history in the local journal (fleet/history_cache.py): merged once however often it
is read, the copy first collected kept, breaks kept, the "interrupted" rule, and `fleet log`'s
view of every checkout's applies."""

from __future__ import annotations

import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import pytest

from fleet import journal as journal_module
from fleet.actions import Action, Change, EnvFilePayload, KeyChange
from fleet.history import (
    GENESIS,
    Break,
    HistoryRead,
    HistoryRecord,
    LastSeen,
    append_command,
    host_line,
    line_hash,
    outcome_body,
    parse_read,
    parse_record,
    read_section,
    step_body,
    verify,
)
from fleet.history_cache import (
    INTERRUPTED,
    RUNNING,
    HistoryCache,
    LockSeen,
    host_steps,
    merged_log,
)
from fleet.journal import SCHEMA_VERSION, Journal, journal_path, sentence
from fleet.output.json import log_json
from fleet.textutil import mask

T0 = 1_795_000_000.0
A_RUN = "20261118T000000-aaaaaa"  # alice's run, from her checkout
B_RUN = "20261118T010000-bbbbbb"
START = Change("franz", Action.START, "mastodon-web.service", "declared to run here", "web", before="inactive/dead",
               after="active/running")
STOP = Change("franz", Action.RESTART, "mastodon-sidekiq.service", "running, and its unit file changes",
              before="active/running", after="active/running with the new configuration")
COMMIT = "3f2a9c1d0b7e4a55" + "0" * 24


class FakeHost:
    """A host's history file as the appender writes it (what fleet/history.py's snippet does)."""

    def __init__(self, name: str = "franz") -> None:
        self.name = name
        self.lines: list[str] = []

    def append(self, body: str) -> HistoryRecord:
        prev = line_hash(self.lines[-1]) if self.lines else GENESIS
        self.lines.append(host_line(body, seq=len(self.lines) + 1, prev=prev))
        return parse_record(self.lines[-1])

    def step(self, change: Change, run: str = A_RUN, at: float = T0, who: str = "alice@laptop") -> HistoryRecord:
        return self.append(step_body(change, run_id=run, who=who, desired_hash="d" * 64, started=at,
                                     fleet="hachyderm", plan_id="p1", commit=COMMIT, dirty=True))

    def outcome(self, change: Change, outcome: str = "ok", run: str = A_RUN, at: float = T0 + 1,
                error: str = "") -> HistoryRecord:
        return self.append(outcome_body(change, run_id=run, outcome=outcome, error=error, ended=at))

    def read(self, *, lock: tuple[bool | None, str] = (False, "")) -> HistoryRead:
        """Everything, as a first read would return it."""
        records, breaks = verify(self.lines, host=self.name)
        last = LastSeen(records[-1].seq, records[-1].hash, "") if records else None
        return HistoryRead(self.name, "ok", tuple(records), tuple(breaks), last, lock_held=lock[0], lock_run=lock[1])


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    j = Journal.open(journal_path(tmp_path / ".fleet"))
    yield j  # type: ignore[misc]
    j.close()


# ---------------------------------------------------------------- the schema


def test_a_journal_gets_the_history_tables_by_migration(tmp_path: Path) -> None:
    path = journal_path(tmp_path / "old")
    path.parent.mkdir()
    with closing(sqlite3.connect(path)) as conn:  # a journal written by the fleet before this one
        for i, statements in enumerate(journal_module.MIGRATIONS[:2]):
            for s in statements:
                conn.execute(s)
            conn.execute(f"PRAGMA user_version = {i + 1}")
        conn.commit()
    with Journal.open(path) as j:
        HistoryCache(j).merge(FakeHost().read())
    with closing(sqlite3.connect(path)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"runs", "steps", "snapshots", "host_records", "host_history", "host_breaks"} <= tables
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# ---------------------------------------------------------------- merging


def test_merging_the_same_read_twice_stores_each_record_once(journal: Journal) -> None:
    h = FakeHost()
    h.step(START)
    h.outcome(START)
    cache = HistoryCache(journal)
    first = cache.merge(h.read(), now=T0 + 10)
    again = cache.merge(h.read(), now=T0 + 20)
    assert (first.added, first.already, again.added, again.already) == (2, 0, 0, 2)
    assert [r.line for r in cache.records()] == h.lines
    assert cache.last_seen("franz") == LastSeen(2, line_hash(h.lines[-1]), "")


def test_reads_from_two_checkouts_of_overlapping_parts_merge_into_one_history(journal: Journal) -> None:
    h = FakeHost()
    h.step(START)
    cache = HistoryCache(journal)
    cache.merge(h.read())
    h.outcome(START)
    h.step(STOP, run=B_RUN, at=T0 + 50, who="bob@desk")
    cache.merge(h.read())  # a read from scratch: every record again, and the new ones
    assert [(r.seq, r.kind, r.run_id) for r in cache.records()] == [
        (1, "step", A_RUN), (2, "outcome", A_RUN), (3, "step", B_RUN)]


def test_a_broken_chain_stays_a_finding_after_later_clean_reads(journal: Journal) -> None:
    cache = HistoryCache(journal)
    brk = Break("franz", 3, "record 4 is missing (record 5 follows record 3)")
    read = HistoryRead("franz", "ok", breaks=(brk,), last_seen=LastSeen(5, "a" * 64, "b" * 64))
    assert cache.merge(read, now=T0).new_breaks == (brk,)
    assert cache.merge(read, now=T0 + 5).new_breaks == ()
    cache.merge(HistoryRead("franz", "ok", last_seen=LastSeen(5, "a" * 64, "b" * 64)), now=T0 + 9)
    # `found` is when a read last reported it: a repeat after an acknowledgement is a new finding
    assert [(k.brk, k.found) for k in cache.breaks("franz")] == [(brk, T0 + 5)]
    assert cache.breaks("fritz") == []


def test_forgetting_hosts_made_anew_drops_their_records_position_and_breaks_only(journal: Journal) -> None:
    cache = HistoryCache(journal)
    brk = Break("franz", 3, "record 4 is missing (record 5 follows record 3)")
    for host in ("franz", "fritz"):
        cache.merge(HistoryRead(host, "ok", breaks=(brk,) if host == "franz" else (),
                                last_seen=LastSeen(5, "a" * 64, "b" * 64)), now=T0)
    assert cache.forget(["franz", "freud"]) == 1
    assert cache.breaks("franz") == [] and cache.last_seen("franz") is None
    assert cache.last_seen("fritz") == LastSeen(5, "a" * 64, "b" * 64)  # the others are kept
    assert cache.forget([]) == 0


def test_a_lab_made_anew_forgets_the_cached_history_of_its_hosts(tmp_path: Path) -> None:
    from fleet.lab.cli import forget_history
    from fleet.lab.settings import LabPaths

    state = tmp_path / ".fleet"
    paths = LabPaths.from_state_dir(state)
    forget_history(paths, ["franz"])
    assert not journal_path(state).exists()  # no journal yet: none is made
    with Journal.open(journal_path(state)) as j:
        HistoryCache(j).merge(HistoryRead("franz", "ok", last_seen=LastSeen(2, "a" * 64, "b" * 64)), now=T0)
    forget_history(paths, ["franz"])
    with Journal.open(journal_path(state)) as j:
        assert HistoryCache(j).last_seen("franz") is None


def test_a_record_edited_on_the_host_leaves_the_copy_collected_first_in_charge(journal: Journal) -> None:
    h = FakeHost()
    original = h.step(START)
    h.outcome(START)
    cache = HistoryCache(journal)
    cache.merge(h.read())
    h.lines[0] = h.lines[0].replace('"after":"active/running"', '"after":"stopped"')
    records, breaks = verify(h.lines, host="franz")
    cache.merge(HistoryRead("franz", "ok", tuple(records), tuple(breaks), None))
    kept = [r for r in cache.records() if r.kind == "step"]
    assert len(kept) == 1 and kept[0].line == original.line and kept[0].verified
    assert cache.known("franz")[1] == original.hash


def test_the_cache_holds_no_clear_secret(journal: Journal) -> None:
    clear = "hunter2-db-pass-in-the-cache"
    leaky = Change("franz", Action.WRITE_ENV, "/home/mastodon/live/.env.production", f"DB_PASS={clear} found",
                   payload=EnvFilePayload(keys=(KeyChange("DB_PASS", "change", "old", clear),), content_hash="",
                                          name="mastodon", owner="", group="", mode="0600"))
    h = FakeHost()
    h.step(leaky)
    h.outcome(leaky, "failed", error=f"token={clear}")
    HistoryCache(journal).merge(h.read())
    blobs = [journal.path.read_bytes(), Path(f"{journal.path}-wal").read_bytes()]
    assert all(clear.encode() not in b for b in blobs)
    assert any(mask(clear).encode() in b for b in blobs)


def test_the_cache_feeds_the_next_read_of_the_real_file(tmp_path: Path, journal: Journal) -> None:
    state = tmp_path / "var-lib-fleet"
    cache = HistoryCache(journal)

    def sh(cmd: str, stdin: bytes = b"") -> str:
        done = subprocess.run(["sh", "-c", cmd], input=stdin, capture_output=True, timeout=60, check=True)
        return done.stdout.decode()

    def collect() -> None:
        last = cache.last_seen("franz")
        out = sh(read_section(last, state_dir=str(state))).partition("\n")[2]
        cache.merge(parse_read("franz", out, last, known=cache.known("franz")))

    for i in range(3):
        sh(*append_command(step_body(START, run_id=f"run-{i}", who="a@b", desired_hash="", started=T0 + i),
                           state_dir=str(state)))
    collect()
    sh(*append_command(outcome_body(START, run_id="run-2", outcome="ok", ended=T0 + 9), state_dir=str(state)))
    collect()
    collect()
    assert [r.seq for r in cache.records()] == [1, 2, 3, 4] and cache.breaks() == []
    with open(state / "history.jsonl", "r+") as f:  # a hand edit of record 2, collected before
        text = f.read()
        f.seek(0)
        f.write(text.replace('"run":"run-1"', '"run":"run-X"'))
    collect()
    assert [k.brk.message for k in cache.breaks()] == [
        "history on franz was edited or truncated after record 1: record 2 differs from the copy collected before"]


# ---------------------------------------------------------------- the interrupted rule


def states(records: list[HistoryRecord], **kw: object) -> list[tuple[str, str]]:
    return [(s.record.change_id, s.state) for s in host_steps(records, **kw)]  # type: ignore[arg-type]


def test_a_step_with_its_outcome_record_has_that_outcome() -> None:
    h = FakeHost()
    recs = [h.step(START), h.outcome(START, "failed", error="health check failed")]
    (s,) = host_steps(recs)
    assert (s.state, s.outcome, s.outcome_record and s.outcome_record.error) == ("failed", "failed",
                                                                                  "health check failed")


@pytest.mark.parametrize(("lock", "expected"), [
    (None, RUNNING),  # never seen the lock: nothing says the run is over
    (LockSeen(True, A_RUN, T0 + 5), RUNNING),  # its own run holds the host
    (LockSeen(True, "", T0 + 5), RUNNING),  # a holder not naming its run yet
    (LockSeen(None, "", T0 + 5), RUNNING),
    (LockSeen(False, "", T0 + 5), INTERRUPTED),  # the lock was free after the record was read
    (LockSeen(True, B_RUN, T0 + 5), INTERRUPTED),  # another run holds the host now
])
def test_an_unanswered_step_is_interrupted_once_its_run_no_longer_holds_the_host(lock: LockSeen | None,
                                                                                 expected: str) -> None:
    h = FakeHost()
    recs = [h.step(START)]
    assert states(recs, locks={"franz": lock} if lock else {}) == [(START.id, expected)]


def test_an_unanswered_step_followed_by_another_runs_record_is_interrupted() -> None:
    h = FakeHost()
    recs = [h.step(START), h.step(STOP, run=B_RUN, at=T0 + 60)]
    assert states(recs) == [(START.id, INTERRUPTED), (STOP.id, RUNNING)]  # no lock seen: the order tells


def test_an_unanswered_step_of_a_run_the_journal_saw_end_is_interrupted() -> None:
    h = FakeHost()
    recs = [h.step(START)]
    assert states(recs, ended_runs={A_RUN}) == [(START.id, INTERRUPTED)]
    assert states(recs, ended_runs={B_RUN}) == [(START.id, RUNNING)]


def test_an_outcome_arriving_later_wins_over_interrupted() -> None:
    h = FakeHost()
    recs = [h.step(START), h.step(STOP, run=B_RUN, at=T0 + 60)]
    assert states(recs)[0] == (START.id, INTERRUPTED)
    recs.append(h.outcome(START, "ok", at=T0 + 2))
    assert states(recs)[0] == (START.id, "ok")


def test_records_of_different_hosts_do_not_end_each_others_runs() -> None:
    franz, fritz = FakeHost("franz"), FakeHost("fritz")
    recs = [franz.step(START), fritz.step(Change("fritz", Action.RESTART, "x.service", "r"), run=B_RUN, at=T0 + 60)]
    assert states(recs, locks={"franz": LockSeen(True, A_RUN, T0)}) == [(START.id, RUNNING), ("fritz:restart:x.service",
                                                                                              RUNNING)]


# ---------------------------------------------------------------- `fleet log` from any checkout


def test_a_fresh_checkout_logs_every_step_another_checkout_applied(journal: Journal) -> None:
    h = FakeHost()
    h.step(START, at=T0)
    h.outcome(START, "ok", at=T0 + 3)
    h.step(STOP, at=T0 + 4)  # killed mid-step: no outcome, and the lock is gone since
    cache = HistoryCache(journal)
    cache.merge(h.read(lock=(False, "")))
    steps, runs = merged_log(journal, cache)
    by_id = {r.id: r for r in runs}
    lines = [sentence(s, by_id.get(s.run_id)) for s in steps]
    assert lines == [
        "2026-11-18 11:06:40 alice@laptop: on franz, started mastodon-web.service (was inactive/dead) — ok",
        "2026-11-18 11:06:44 alice@laptop: on franz, restarted mastodon-sidekiq.service (was active/running) — "
        "STARTED, NEVER FINISHED (the run ended interrupted)",
    ]
    assert runs[0].summary == f"known from the hosts' history; desired state at git {COMMIT[:12]} (dirty)"
    out = log_json(steps, runs)["steps"]
    assert [(o["run_id"], o["operator"], o["outcome"], o["step_id"]) for o in out] == [
        (A_RUN, "alice@laptop", "ok", 0), (A_RUN, "alice@laptop", None, 0)]


def test_a_step_both_the_journal_and_a_host_know_is_shown_once_with_the_hosts_outcome_if_needed(
        journal: Journal) -> None:
    run = journal.start_run(operator="alice@laptop", plan_id="p1", plan_hash="h", desired_hash="d", fleet="f",
                            lab=False, now=T0)
    journal.step_started(run, START, now=T0)  # this checkout died before recording the outcome
    journal.step_started(run, STOP, now=T0 + 1)
    h = FakeHost()
    h.step(START, run=run, at=T0)
    h.outcome(START, "failed", run=run, at=T0 + 2, error="exit 1")
    h.step(STOP, run=run, at=T0 + 1)
    cache = HistoryCache(journal)
    cache.merge(h.read())
    steps, runs = merged_log(journal, cache)
    assert [(s.change_id, s.outcome, s.error, s.id > 0) for s in steps] == [
        (START.id, "failed", "exit 1", True), (STOP.id, None, None, True)]
    assert [r.id for r in runs] == [run]


def test_the_merged_log_filters_by_host_run_and_time(journal: Journal) -> None:
    franz, fritz = FakeHost("franz"), FakeHost("fritz")
    franz.step(START, at=T0)
    fritz.step(Change("fritz", Action.RESTART, "x.service", "r"), run=B_RUN, at=T0 + 100, who="bob@desk")
    cache = HistoryCache(journal)
    cache.merge(franz.read())
    cache.merge(fritz.read())
    assert [s.host for s in merged_log(journal, cache)[0]] == ["franz", "fritz"]
    assert [s.host for s in merged_log(journal, cache, host="fritz")[0]] == ["fritz"]
    assert [s.run_id for s in merged_log(journal, cache, run_id=A_RUN)[0]] == [A_RUN]
    steps, runs = merged_log(journal, cache, since=T0 + 50)
    assert [s.host for s in steps] == ["fritz"] and [r.operator for r in runs] == ["bob@desk"]
