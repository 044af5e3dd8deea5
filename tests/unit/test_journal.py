"""The journal: intent before outcome, what a crash leaves behind, filters, the file's mode and
WAL, no clear secret anywhere in its bytes, threads writing at once, --since, the `fleet log`
sentences and JSON."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleet import journal as journal_module
from fleet.actions import Action, Change, EnvFilePayload, KeyChange, PrunePayload, UnitFilePayload
from fleet.errors import FleetError
from fleet.journal import (
    SCHEMA_VERSION,
    Journal,
    JournalError,
    RunRecord,
    StepRecord,
    journal_path,
    operator,
    parse_since,
    scrub,
    sentence,
)
from fleet.output.json import log_json
from fleet.textutil import mask

NOW = datetime(2026, 11, 28, 14, 3, 7, tzinfo=UTC).timestamp()

def env_payload(*keys: tuple[str, str, str, str], **meta: str) -> EnvFilePayload:
    """A write-env's payload with these key changes (owner/mode as the example declares them)."""
    return EnvFilePayload(keys=tuple(KeyChange(*k) for k in keys), content_hash="",
                          **({"name": "mastodon", "owner": "mastodon", "group": "mastodon", "mode": "0600"} | meta))


PRUNE_SIDEKIQ = Change("franz", Action.PRUNE, "mastodon-sidekiq.service",
                       "undeclared on franz (matches mastodon-*, prune = true)",
                       before="active/running, enabled, `-c 10 -q default`", after="stopped, disabled",
                       payload=PrunePayload(steps=("stop", "disable")))
WRITE_ENV = Change("fritz", Action.WRITE_ENV, "/home/mastodon/live/.env.production", "2 key(s) differ",
                   before="24 keys, mastodon:mastodon 0600", after="23 keys, mastodon:mastodon 0600",
                   payload=env_payload(("S3_ENABLED", "change", "FALSE", "true"), ("3_BUCKET", "remove", "files", "")))
START_DEFAULT = Change("freud", Action.START, "mastodon-sidekiq-default.service",
                       "declared to run here; now inactive/dead", "sidekiq-default",
                       before="inactive/dead", after="active/running")


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return journal_path(tmp_path / ".fleet")


@pytest.fixture
def j(jpath: Path) -> Iterator[Journal]:
    with Journal.open(jpath) as journal:
        yield journal


def new_run(j: Journal, *, now: float = NOW, operator: str = "alice@laptop", lab: bool = False) -> str:
    return j.start_run(operator=operator, plan_id="p1", plan_hash="ph", desired_hash="dh", fleet="hachyderm",
                       lab=lab, now=now)


def only_step(j: Journal) -> StepRecord:
    (step,) = j.steps()
    return step


# --- intent before outcome ---------------------------------------------------------------------


def test_a_started_step_is_visible_to_another_reader_before_it_finishes(j: Journal, jpath: Path) -> None:
    run = new_run(j)
    j.step_started(run, PRUNE_SIDEKIQ, now=NOW)
    with closing(sqlite3.connect(jpath)) as other:
        rows = other.execute("SELECT change_id, outcome, ended FROM steps").fetchall()
    assert rows == [("franz:prune:mastodon-sidekiq.service", None, None)]


def test_a_crash_mid_step_leaves_it_listed_as_unfinished_and_said_so(jpath: Path) -> None:
    # A real crash: another process records the intent, then dies without closing anything.
    script = (
        "import os, sys\n"
        "from fleet.journal import Journal\n"
        "from fleet.actions import Action, Change\n"
        "j = Journal.open(sys.argv[1])\n"
        "run = j.start_run(operator='alice@laptop', plan_id='p', plan_hash='h', desired_hash='d',"
        " fleet='f', lab=False, now=float(sys.argv[2]))\n"
        "j.step_started(run, Change('franz', Action.RESTART, 'mastodon-web.service', 'r', before='active/running'),"
        " now=float(sys.argv[2]))\n"
        "os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(jpath), str(NOW)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    with Journal.open(jpath) as j:
        (step,) = j.unfinished()
        run = j.run(step.run_id)
    assert run is not None and run.ended is None and run.outcome is None
    assert step.outcome is None and step.ended is None and not step.finished
    assert sentence(step, run) == ("2026-11-28 14:03:07 alice@laptop: on franz, restarted mastodon-web.service "
                                   "(was active/running) — STARTED, NEVER FINISHED")


def test_an_interrupted_run_names_its_end_in_the_unfinished_sentence(j: Journal) -> None:
    run = new_run(j)
    j.step_started(run, START_DEFAULT, now=NOW)
    j.finish_run(run, "interrupted", "Ctrl-C", now=NOW + 5)
    (step,) = j.unfinished()
    assert sentence(step, j.run(run)).endswith("— STARTED, NEVER FINISHED (the run ended interrupted)")


def test_a_finished_step_is_no_longer_unfinished_and_keeps_its_times(j: Journal) -> None:
    run = new_run(j)
    step_id = j.step_started(run, START_DEFAULT, now=NOW)
    j.step_finished(step_id, "ok", now=NOW + 2.5)
    assert j.unfinished() == []
    step = only_step(j)
    assert (step.started, step.ended, step.outcome, step.error) == (NOW, NOW + 2.5, "ok", None)


def test_a_skipped_step_is_recorded_without_running_with_its_reason(j: Journal) -> None:
    run = new_run(j)
    j.record_skipped(run, START_DEFAULT, "halted: franz:prune:mastodon-sidekiq.service failed", now=NOW)
    step = only_step(j)
    assert (step.outcome, step.started, step.ended) == ("skipped", NOW, NOW)
    assert j.unfinished() == []
    assert sentence(step, j.run(run)).endswith(
        "— not attempted (halted: franz:prune:mastodon-sidekiq.service failed)")


def test_a_skip_reason_that_already_says_not_attempted_is_not_said_twice(j: Journal) -> None:
    run = new_run(j)
    j.record_skipped(run, START_DEFAULT, "not attempted: the rollout halted (start x failed on y)", now=NOW)
    assert sentence(only_step(j), j.run(run)).endswith("— not attempted (the rollout halted (start x failed on y))")


def test_a_run_records_who_what_plan_and_how_it_ended(j: Journal) -> None:
    run_id = new_run(j, lab=True)
    assert j.run(run_id) == RunRecord(run_id, "alice@laptop", NOW, None, "p1", "ph", "dh", "hachyderm", True,
                                      None, "")
    j.finish_run(run_id, "failed", "3 ok, 1 failed, 2 skipped", now=NOW + 60)
    run = j.run(run_id)
    assert run is not None
    assert (run.ended, run.outcome, run.summary) == (NOW + 60, "failed", "3 ok, 1 failed, 2 skipped")
    assert j.run("no-such-run") is None


def test_a_run_records_the_git_commit_of_its_desired_state_and_whether_it_was_dirty(j: Journal) -> None:
    commit = "3f2a9c1d0b7e4a55" + "0" * 24
    run_id = j.start_run(operator="alice@laptop", plan_id="p1", plan_hash="ph", desired_hash="dh", fleet="hachyderm",
                         lab=False, commit=commit, dirty=True, now=NOW)
    run = j.run(run_id)
    assert run is not None and (run.commit, run.dirty) == (commit, True)
    assert run.provenance() == "desired state at git 3f2a9c1d0b7e (dirty)"
    plain = j.run(new_run(j))
    assert plain is not None and (plain.commit, plain.dirty, plain.provenance()) == (None, None, "")


def test_runs_of_a_journal_from_before_provenance_are_kept_and_name_no_commit(jpath: Path) -> None:
    jpath.parent.mkdir(parents=True)
    with closing(sqlite3.connect(jpath)) as conn:  # schema version 3: no commit columns yet
        for i, statements in enumerate(journal_module.MIGRATIONS[:3]):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {i + 1}")
        conn.execute("INSERT INTO runs (id, operator, started, plan_id, plan_hash, desired_hash, fleet, lab) "
                     "VALUES ('r1', 'bob@ci', 1.0, 'p', 'ph', 'dh', 'f', 0)")
        conn.commit()
    with Journal.open(jpath) as j:
        (run,) = j.runs()
    assert (run.id, run.operator, run.commit, run.dirty) == ("r1", "bob@ci", None, None)


def test_run_ids_are_utc_time_sortable_and_unique(j: Journal) -> None:
    ids = [new_run(j, now=NOW + i * 3600) for i in (2, 0, 1)] + [new_run(j, now=NOW) for _ in range(20)]
    assert all(re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{6}", i) for i in ids)
    assert ids[1].startswith("20261128T140307-")
    assert sorted(ids[:3]) == [ids[1], ids[2], ids[0]]
    assert len(set(ids)) == len(ids)


def test_unknown_outcomes_runs_and_steps_are_refused(j: Journal) -> None:
    run = new_run(j)
    step_id = j.step_started(run, START_DEFAULT, now=NOW)
    with pytest.raises(ValueError, match="ok, failed, skipped, rolled-back"):
        j.step_finished(step_id, "done")
    with pytest.raises(ValueError, match="ok, failed, refused, interrupted"):
        j.finish_run(run, "rolled-back")
    with pytest.raises(JournalError, match="no step 999"):
        j.step_finished(999, "ok")
    with pytest.raises(JournalError, match="no run 'nope'"):
        j.finish_run("nope", "ok")


def test_a_step_of_an_unknown_run_is_refused_because_foreign_keys_are_on(j: Journal) -> None:
    with pytest.raises(JournalError, match="no run 'nope'"):
        j.step_started("nope", START_DEFAULT)


def test_a_closed_journal_says_so(jpath: Path) -> None:
    j = Journal.open(jpath)
    j.close()
    j.close()
    with pytest.raises(JournalError, match="is closed"):
        j.runs()


# --- queries -----------------------------------------------------------------------------------


def test_steps_filter_by_host_since_and_run_in_time_order(j: Journal) -> None:
    first, second = new_run(j, now=NOW), new_run(j, now=NOW + 86400)
    j.step_started(first, START_DEFAULT, now=NOW + 2)
    j.step_started(first, PRUNE_SIDEKIQ, now=NOW + 1)
    j.step_started(second, WRITE_ENV, now=NOW + 86401)
    j.step_started(second, START_DEFAULT, now=NOW + 86402)
    assert [s.host for s in j.steps()] == ["franz", "freud", "fritz", "freud"]
    assert [(s.run_id, s.started) for s in j.steps(host="freud")] == [(first, NOW + 2), (second, NOW + 86402)]
    assert [s.host for s in j.steps(since=NOW + 3600)] == ["fritz", "freud"]
    assert [s.host for s in j.steps(run_id=first)] == ["franz", "freud"]
    assert [s.started for s in j.steps(host="freud", since=NOW + 3600, run_id=second)] == [NOW + 86402]
    assert j.steps(host="nietzsche") == []
    assert [r.id for r in j.runs()] == [first, second]
    assert [r.id for r in j.runs(since=NOW + 1)] == [second]


def test_a_step_keeps_the_change_as_the_plan_showed_it(j: Journal) -> None:
    write_unit = Change("fritz", Action.WRITE_UNIT, "mastodon-web.service", "unit file differs from the declaration",
                        "web", before="/etc/systemd/system/mastodon-web.service",
                        after="/etc/systemd/system/mastodon-web.service",
                        payload=UnitFilePayload("abc", diff="--- a\n+++ b\n-x\n+y\n",
                                                remove_files=("/etc/systemd/system/mastodon-web.service.d/x.conf",)))
    run = new_run(j)
    j.step_started(run, write_unit, now=NOW)
    step = only_step(j)
    assert (step.change_id, step.host, step.action, step.target, step.service, step.reason, step.before,
            step.after) == (write_unit.id, "fritz", "write-unit", "mastodon-web.service", "web",
                            write_unit.reason, write_unit.before, write_unit.after)
    assert step.details == {"keys": [], "steps": [],
                            "remove_files": ["/etc/systemd/system/mastodon-web.service.d/x.conf"],
                            "diff": "--- a\n+++ b\n-x\n+y\n", "content_hash": "abc", "meta": {}}


# --- the file ----------------------------------------------------------------------------------


def test_the_journal_is_created_0600_in_a_new_0700_directory_and_so_are_its_wal_files(jpath: Path) -> None:
    with Journal.open(jpath) as j:
        new_run(j)
        assert stat.S_IMODE(jpath.parent.stat().st_mode) == 0o700
        for p in (jpath, Path(f"{jpath}-wal"), Path(f"{jpath}-shm")):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_an_existing_journal_readable_by_others_is_tightened_to_0600(jpath: Path) -> None:
    Journal.open(jpath).close()
    jpath.chmod(0o644)
    Journal.open(jpath).close()
    assert stat.S_IMODE(jpath.stat().st_mode) == 0o600


def test_the_journal_runs_in_wal_mode_with_a_busy_timeout_and_foreign_keys(j: Journal, jpath: Path) -> None:
    conn = j._connection()
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    with closing(sqlite3.connect(jpath)) as other:  # WAL is a property of the file: every reader sees it
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_the_schema_is_versioned_and_reopening_keeps_the_data(jpath: Path) -> None:
    with Journal.open(jpath) as j:
        run = new_run(j)
    with Journal.open(jpath) as j:
        assert [r.id for r in j.runs()] == [run]
    with closing(sqlite3.connect(jpath)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
    assert {"runs", "steps", "steps_host", "steps_started", "runs_started"} <= tables


def test_a_journal_from_a_newer_fleet_is_refused_with_a_hint(jpath: Path) -> None:
    Journal.open(jpath).close()
    with closing(sqlite3.connect(jpath, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="schema version") as e:
        Journal.open(jpath)
    assert "upgrade fleet" in str(e.value)


def test_a_file_that_is_not_a_journal_gives_a_journal_error(jpath: Path) -> None:
    jpath.parent.mkdir(parents=True)
    jpath.write_text("not a database, just text that is long enough to have a header..." * 10)
    with pytest.raises(JournalError):
        Journal.open(jpath)


# --- secrets -----------------------------------------------------------------------------------

CLEAR = ("hunter2-old-db-pass", "hunter2-new-db-pass", "s3cr3t-in-a-reason", "k3y-base in quotes",
         "t0ken-in-an-error", "aws-s3cr3t-in-diff", "sneaky-lowercase-pw")


def leaky_change() -> Change:
    return Change(
        "fritz", Action.WRITE_ENV, "/home/mastodon/live/.env.production",
        f"hand edit found: Environment=DB_PASS={CLEAR[2]}",
        before=f'Environment="SECRET_KEY_BASE={CLEAR[3]}"',
        after="25 keys",
        payload=env_payload(("DB_PASS", "change", CLEAR[0], CLEAR[1]), ("S3_ENABLED", "change", "false", "true"),
                            ("OTP_SECRET", "set", "", mask("already-masked")), owner=f"smtp_password={CLEAR[6]}"),
    )


def leaky_unit_change() -> Change:
    return Change("fritz", Action.WRITE_UNIT, "mastodon-web.service", "unit file differs", "web",
                  payload=UnitFilePayload("", diff=f"-AWS_SECRET_ACCESS_KEY={CLEAR[5]}\n"
                                                   f"+AWS_SECRET_ACCESS_KEY={mask(CLEAR[5])}\n"))


def test_no_clear_secret_reaches_any_byte_of_the_journal_or_its_wal(jpath: Path) -> None:
    with Journal.open(jpath) as j:
        run = new_run(j)
        step_id = j.step_started(run, leaky_change(), now=NOW)
        j.step_finished(j.step_started(run, leaky_unit_change(), now=NOW), "ok", now=NOW + 1)
        j.step_finished(step_id, "failed", f"curl https://x/?token={CLEAR[4]} failed", now=NOW + 1)
        j.finish_run(run, "failed", f"DB_PASS={CLEAR[0]}", now=NOW + 2)
        files = [jpath, Path(f"{jpath}-wal")]
        assert Path(f"{jpath}-wal").stat().st_size > 0  # the rows are in the WAL now
        blobs = [p.read_bytes() for p in files]
        step, unit_step = j.steps()
    blobs.append(jpath.read_bytes())  # after close, checkpointed into the main file
    for blob in blobs:
        for clear in CLEAR:
            assert clear.encode() not in blob, clear
    assert step.keys[0] == ("DB_PASS", "change", mask(CLEAR[0]), mask(CLEAR[1]))
    assert step.keys[1] == ("S3_ENABLED", "change", "false", "true")  # not secret: kept readable
    assert step.keys[2] == ("OTP_SECRET", "set", "", mask("already-masked"))  # masked once, not twice
    assert step.reason == f"hand edit found: Environment=DB_PASS={mask(CLEAR[2])}"
    assert step.error == f"curl https://x/?token={mask(CLEAR[4])} failed"
    assert step.details["meta"]["owner"] == f"smtp_password={mask(CLEAR[6])}"
    assert unit_step.details["diff"] == (f"-AWS_SECRET_ACCESS_KEY={mask(CLEAR[5])}\n"
                                         f"+AWS_SECRET_ACCESS_KEY={mask(CLEAR[5])}\n")


@pytest.mark.parametrize(("text", "expected"), [
    ("DB_PASS=hunter2", f"DB_PASS={mask('hunter2')}"),
    ("S3_BUCKET=files DB_PASS=hunter2 x", f"S3_BUCKET=files DB_PASS={mask('hunter2')} x"),
    ('Environment="RAILS_ENV=production" "DB_PASS=two words"',
     f'Environment="RAILS_ENV=production" "DB_PASS={mask("two words")}"'),
    ("Environment=SMTP_PASSWORD=pw", f"Environment=SMTP_PASSWORD={mask('pw')}"),
    ("REDIS_PASSWORD='a b c'", f"REDIS_PASSWORD={mask('a b c')}"),
    ("?api_key=abc&x=1", f"?api_key={mask('abc&x=1')}"),
    (f"DB_PASS={mask('x')}", f"DB_PASS={mask('x')}"),
    (f"(was DB_PASS={mask('x')}), ok", f"(was DB_PASS={mask('x')}), ok"),
    (f'"DB_PASS={mask("x")}"', f'"DB_PASS={mask("x")}"'),
    (f"DB_PASS={mask('x')}hunter2", f"DB_PASS={mask(mask('x') + 'hunter2')}"),
    ('"DB_PASS=a\\" b" x', '"DB_PASS=' + mask('a\\" b') + '" x'),  # systemd's escaped quote
    ("DB_PASS='unterminated value", f"DB_PASS={mask('unterminated value')}"),
    ("DB_PASS= and nothing", "DB_PASS= and nothing"),
    ("S3_ENABLED=true, no secret here", "S3_ENABLED=true, no secret here"),
    ("a -> b, active/running", "a -> b, active/running"),
])
def test_scrub_masks_values_of_secret_looking_keys_only(text: str, expected: str) -> None:
    assert scrub(text) == expected


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=20), value=st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp"),
                                                                 blacklist_characters="\"'\x85\x1c\x1d\x1e\x1f"),
                                                   min_size=8, max_size=40),
       key=st.sampled_from(["DB_PASS", "SECRET_KEY_BASE", "AWS_ACCESS_KEY_ID", "MY_API_KEY", "auth_token"]),
       form=st.sampled_from(["{k}={v}", '{k}="{v}"', "{k}='{v}'", '"{k}={v}"', "Environment={k}={v}"]))
def test_scrub_never_lets_a_secret_value_through(prefix: str, value: str, key: str, form: str) -> None:
    assume(value not in prefix and value not in mask(value))
    assume(not any(c.isspace() for c in value))
    text = f"{prefix} {form.format(k=key, v=value)} tail"
    assert value not in scrub(text)


# --- threads -----------------------------------------------------------------------------------


def test_threads_applying_hosts_in_parallel_all_get_their_steps_recorded(j: Journal) -> None:
    run = new_run(j)
    errors: list[BaseException] = []
    ids: list[int] = []
    start = threading.Barrier(8)

    def host_worker(n: int) -> None:
        try:
            start.wait()
            for k in range(25):
                c = Change(f"host{n}", Action.RESTART, f"unit{k}.service", "r", before="active/running")
                step_id = j.step_started(run, c)
                ids.append(step_id)
                j.step_finished(step_id, "ok" if k % 5 else "failed", "" if k % 5 else "boom")
                j.steps(host=f"host{n}")  # reads interleave with other threads' writes
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=host_worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(ids)) == 200
    steps = j.steps(run_id=run)
    assert len(steps) == 200 and j.unfinished() == []
    assert sum(s.outcome == "failed" for s in steps) == 40
    assert {len(j.steps(host=f"host{n}")) for n in range(8)} == {25}


# --- --since -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-28", datetime(2026, 11, 28, tzinfo=UTC)),
    ("2026-11-28T14:03", datetime(2026, 11, 28, 14, 3, tzinfo=UTC)),
    ("2026-11-28 14:03:07", datetime(2026, 11, 28, 14, 3, 7, tzinfo=UTC)),
    ("2026-11-28T14:03:07Z", datetime(2026, 11, 28, 14, 3, 7, tzinfo=UTC)),
    ("2026-11-28T14:03Z", datetime(2026, 11, 28, 14, 3, tzinfo=UTC)),
    (" 2026-11-28T16:03:07+02:00 ", datetime(2026, 11, 28, 14, 3, 7, tzinfo=UTC)),
])
def test_since_accepts_iso_dates_and_times_naive_meaning_utc(text: str, expected: datetime) -> None:
    assert parse_since(text) == expected.timestamp()


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("2h", 7200), ("3d", 3 * 86400), ("1w", 604800),
                                               ("0m", 0), ("2H", 7200)])
def test_since_accepts_durations_back_from_now(text: str, seconds: int) -> None:
    assert parse_since(text, now=NOW) == NOW - seconds


@pytest.mark.parametrize("text", ["", "yesterday", "30", "30s", "-2h", "2h30m", "28/11/2026", "2026-13-01",
                                  "2026-11-28T25:00", "2026-11-28T14", "1.5h"])
def test_since_refuses_anything_else_showing_the_accepted_forms(text: str) -> None:
    with pytest.raises(FleetError) as e:
        parse_since(text, now=NOW)
    assert "2026-11-28T14:03" in e.value.hint and "30m, 2h, 3d, 1w" in e.value.hint


# --- sentences ---------------------------------------------------------------------------------

LONG_ERROR = "health check GET http://10.0.0.3:3000/health failed:\n  connection refused"


def record(j: Journal, change: Change, outcome: str = "ok", error: str = "") -> tuple[StepRecord, RunRecord]:
    run_id = new_run(j)
    step_id = j.step_started(run_id, change, now=NOW)
    j.step_finished(step_id, outcome, error, now=NOW + 1)
    (step,) = j.steps(run_id=run_id)
    run = j.run(run_id)
    assert run is not None
    return step, run


@pytest.mark.parametrize(("change", "outcome", "error", "expected"), [
    (PRUNE_SIDEKIQ, "ok", "",
     "on franz, stopped and disabled mastodon-sidekiq.service (was active/running, enabled, `-c 10 -q default`) — ok"),
    (WRITE_ENV, "ok", "",
     "on fritz, wrote /home/mastodon/live/.env.production (S3_ENABLED: FALSE → true; removed 3_BUCKET) — ok"),
    (START_DEFAULT, "failed", LONG_ERROR,
     "on freud, started mastodon-sidekiq-default.service (was inactive/dead) — FAILED: health check GET "
     "http://10.0.0.3:3000/health failed: connection refused"),
    (Change("franz", Action.PRUNE, "mastodon-sidekiq.service", "r", before="active/running, enabled",
            payload=PrunePayload(steps=("stop", "disable", "remove"),
                                 remove_files=("/etc/systemd/system/mastodon-sidekiq.service",))),
     "ok", "", "on franz, stopped and disabled mastodon-sidekiq.service and removed its unit file "
     "(was active/running, enabled) — ok"),
    (Change("franz", Action.PRUNE, "mastodon-old.service", "r", before="inactive/dead, disabled",
            payload=PrunePayload(steps=("remove",))),
     "ok", "", "on franz, removed the unit file of mastodon-old.service (was inactive/dead, disabled) — ok"),
    (Change("nietzsche", Action.WRITE_UNIT, "mastodon-web.service", "unit is not installed", "web", before="absent",
            after="/etc/systemd/system/mastodon-web.service", payload=UnitFilePayload("")),
     "ok", "", "on nietzsche, wrote unit file mastodon-web.service (new) — ok"),
    (Change("fritz", Action.WRITE_UNIT, "mastodon-web.service", "r", "web",
            before="/lib/systemd/system/mastodon-web.service", after="/etc/systemd/system/mastodon-web.service",
            payload=UnitFilePayload("", remove_files=("/etc/systemd/system/x.d/a.conf",))),
     "ok", "", "on fritz, wrote unit file mastodon-web.service (was /lib/systemd/system/mastodon-web.service; "
     "removed 1 drop-in) — ok"),
    (Change("fritz", Action.WRITE_UNIT, "mastodon-web.service", "r", "web",
            before="/etc/systemd/system/mastodon-web.service",
            after="/etc/systemd/system/mastodon-web.service", payload=UnitFilePayload("")),
     "rolled-back", "restart failed", "on fritz, wrote unit file mastodon-web.service (changed) — rolled back: "
     "restart failed"),
    (Change("fritz", Action.WRITE_ENV, "/home/mastodon/live/.env.production", "file is missing", before="absent",
            after="25 keys, mastodon:mastodon 0600", payload=env_payload(("S3_ENABLED", "set", "", "true"))),
     "ok", "", "on fritz, wrote /home/mastodon/live/.env.production (new file: 25 keys, mastodon:mastodon 0600) — ok"),
    (Change("fritz", Action.WRITE_ENV, "/e", "owner/mode", before="3 keys, root:root 0644",
            after="3 keys, root:root 0600", payload=env_payload()),
     "ok", "", "on fritz, wrote /e (was 3 keys, root:root 0644; now 3 keys, root:root 0600) — ok"),
    (Change("fritz", Action.WRITE_ENV, "/e", "r", before="9 keys", after="9 keys",
            payload=env_payload(*((f"K{i}", "set", "", str(i)) for i in range(8)),
                                ("DB_PASS", "change", mask("a"), mask("b")))),
     "ok", "", "on fritz, wrote /e (added K0: 0; added K1: 1; added K2: 2; added K3: 3; added K4: 4; added K5: 5; "
     "… and 3 more) — ok"),
    (Change("fritz", Action.DAEMON_RELOAD, "systemd", "unit files changed on this host"),
     "ok", "", "on fritz, reloaded systemd — ok"),
    (Change("fritz", Action.ENABLE, "mastodon-web.service", "r", before="disabled", after="enabled"),
     "ok", "", "on fritz, enabled mastodon-web.service (was disabled) — ok"),
    (Change("fritz", Action.RESTART, "mastodon-web.service", "r",
            before="active/running, enabled, `-C config/puma.rb`"),
     "ok", "", "on fritz, restarted mastodon-web.service (was active/running, enabled, `-C config/puma.rb`) — ok"),
    (Change("fritz", Action.ENABLE, "mastodon-web.service", "r", before="disabled"),
     "failed", "", "on fritz, enabled mastodon-web.service (was disabled) — FAILED"),
], ids=lambda v: v.action if isinstance(v, Change) else None)
def test_every_action_reads_as_a_past_tense_sentence(j: Journal, change: Change, outcome: str, error: str,
                                                      expected: str) -> None:
    step, run = record(j, change, outcome, error)
    assert sentence(step, run) == f"2026-11-28 14:03:07 alice@laptop: {expected}"


def test_every_known_action_has_its_own_past_tense_verb() -> None:
    for action in Action:
        step = StepRecord(1, "r", f"h:{action}:t", "h", action, "t", None, "", "", "", {}, NOW, NOW, "ok", None)
        phrase = journal_module._what(step)
        assert not phrase.startswith(action + " "), phrase  # the fallback for an unknown action


def test_a_step_of_an_action_this_fleet_does_not_know_still_reads() -> None:
    step = StepRecord(1, "r", "h:stop:u.service", "h", "stop", "u.service", None, "", "active/running", "", {},
                      NOW, NOW, "ok", None)
    assert journal_module._what(step) == "stop u.service (was active/running)"


def test_a_sentence_without_its_run_still_reads(j: Journal) -> None:
    step, _ = record(j, START_DEFAULT)
    assert sentence(step, None).startswith("2026-11-28 14:03:07 (unknown operator): on freud, started ")


# --- JSON --------------------------------------------------------------------------------------


def test_log_json_has_one_documented_object_per_step_with_its_run(j: Journal) -> None:
    step, run = record(j, WRITE_ENV)
    unfinished_run = new_run(j, operator="bob@desk")
    j.step_started(unfinished_run, START_DEFAULT, now=NOW + 10)
    doc = log_json(j.steps(), j.runs())
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc) == {"format", "steps"} and doc["format"] == 1
    first, second = doc["steps"]
    assert set(first) == {"run_id", "operator", "time", "ended", "host", "action", "target", "service", "reason",
                          "before", "after", "details", "outcome", "error", "sentence", "step_id", "change_id",
                          "fleet", "lab", "plan_id", "run_outcome", "commit", "dirty"}
    assert first | {"details": None} == {
        "run_id": run.id, "operator": "alice@laptop", "time": "2026-11-28T14:03:07Z", "ended": "2026-11-28T14:03:08Z",
        "host": "fritz", "action": "write-env", "target": WRITE_ENV.target, "service": None,
        "reason": "2 key(s) differ", "before": WRITE_ENV.before, "after": WRITE_ENV.after, "details": None,
        "outcome": "ok", "error": None, "sentence": sentence(step, run), "step_id": step.id,
        "change_id": WRITE_ENV.id, "fleet": "hachyderm", "lab": False, "plan_id": "p1", "run_outcome": None,
        "commit": None, "dirty": None,
    }
    assert first["details"]["keys"] == [["S3_ENABLED", "change", "FALSE", "true"], ["3_BUCKET", "remove", "files", ""]]
    assert (second["operator"], second["outcome"], second["ended"]) == ("bob@desk", None, None)
    assert second["sentence"].endswith("STARTED, NEVER FINISHED")


def test_log_json_of_a_step_whose_run_is_not_given_has_null_run_facts(j: Journal) -> None:
    step, _ = record(j, START_DEFAULT)
    (obj,) = log_json([step], [])["steps"]
    assert obj["operator"] is None and obj["run_outcome"] is None and obj["host"] == "freud"


# --- operator ----------------------------------------------------------------------------------


def test_operator_is_user_at_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "alice")
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop")
    assert operator() == "alice@laptop"


def test_operator_still_answers_when_the_environment_knows_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 4242")

    def no_host() -> str:
        raise OSError("no hostname")

    monkeypatch.setattr(getpass, "getuser", no_user)
    monkeypatch.setattr(socket, "gethostname", no_host)
    assert operator() == f"uid{os.getuid()}@unknown-machine"


def test_operator_drops_whitespace_and_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "al ice\n")
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    assert operator() == "alice@unknown-machine"
