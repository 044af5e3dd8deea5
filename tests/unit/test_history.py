"""The hosts' history (fleet/history.py): the record format, the chain check, and the shell that
appends and reads it — run for real with `sh` in a temporary directory standing in for
/var/lib/fleet (no SSH needed: the snippets are what a host's sudo shell runs).

Hostile input: edited, removed, forged, cut-off and garbage lines, a line far too long, a file
far too large, parser input that is not the script's output; and no clear secret in a record."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from logged_tools import logging_tools, started
from observed import EXAMPLE_SECRETS, bare, converged, example

from fleet import history
from fleet.actions import Action, Change, EnvFilePayload, KeyChange, UnitFilePayload
from fleet.diff import diff
from fleet.envfile import fingerprint
from fleet.errors import ParseError
from fleet.history import (
    GENESIS,
    Break,
    HistoryRead,
    LastSeen,
    append_command,
    host_line,
    line_hash,
    outcome_body,
    parse_appended,
    parse_read,
    parse_record,
    read_section,
    split_lines,
    step_body,
    verify,
    with_record,
)
from fleet.journal import _details


def _env(host: str, path: str, reason: str, keys: tuple[tuple[str, str, str, str], ...] = (), *, before: str = "",
         after: str = "", name: str = "mastodon", owner: str = "", group: str = "", mode: str = "0600") -> Change:
    """A write-env change as diff makes it (keys as (key, op, before, after))."""
    payload = EnvFilePayload(keys=tuple(KeyChange(*k) for k in keys), content_hash="", name=name, owner=owner,
                             group=group, mode=mode)
    return Change(host, Action.WRITE_ENV, path, reason, None, before, after, payload)


T0 = 1_795_000_000.25  # 2026-11-18
HOST = "franz"
ENV = "/home/mastodon/live/.env.production"
WRITE_ENV = _env(HOST, ENV, "2 key(s) differ",
                 (("S3_ENABLED", "change", "FALSE", "true"), ("3_BUCKET", "remove", "files", "")),
                 before="24 keys", after="23 keys")
START = Change(HOST, Action.START, "mastodon-web.service", "declared to run here", "web", before="inactive/dead",
               after="active/running")


def body(i: int, change: Change = START, run: str = "20261118T000000-aaaaaa") -> str:
    return step_body(change, run_id=run, who="alice@laptop", desired_hash="d" * 64, started=T0 + i,
                     fleet="hachyderm", plan_id="p1", commit="3f2a9c1d0b7e4a55" + "0" * 24, dirty=False)


def chain(n: int, *, first: int = 1, prev: str = GENESIS, host: str = HOST) -> list[str]:
    """n record lines as a host's appender writes them."""
    lines = []
    for i in range(n):
        line = host_line(body(i, START if i % 2 else WRITE_ENV).replace(f'"host":"{HOST}"', f'"host":"{host}"'),
                         seq=first + i, prev=prev)
        lines.append(line)
        prev = line_hash(line)
    return lines


def messages(breaks: Sequence[Break]) -> list[str]:
    return [b.message for b in breaks]


# ---------------------------------------------------------------- the record


def test_a_step_record_holds_the_journals_data_for_the_step_and_who_ran_it() -> None:
    line = host_line(body(0, WRITE_ENV), seq=7, prev="a" * 64)
    r = parse_record(line)
    assert (r.seq, r.prev, r.kind, r.run_id, r.change_id, r.host) == (
        7, "a" * 64, "step", "20261118T000000-aaaaaa", WRITE_ENV.id, HOST)
    assert (r.action, r.target, r.reason, r.before, r.after) == ("write-env", ENV, "2 key(s) differ", "24 keys",
                                                                 "23 keys")
    assert r.details == json.loads(json.dumps(_details(WRITE_ENV)))
    assert r.keys == ("S3_ENABLED", "3_BUCKET")
    assert (r.user, r.machine, r.commit, r.dirty, r.fleet, r.plan_id) == (
        "alice", "laptop", "3f2a9c1d0b7e4a55" + "0" * 24, False, "hachyderm", "p1")
    assert r.started == T0  # sub-second precision survives: attribution windows compare it
    assert r.hash == hashlib.sha256(line.encode() + b"\n").hexdigest()
    assert line.isascii() and "\n" not in line


def test_an_outcome_record_names_its_step_its_outcome_and_error() -> None:
    r = parse_record(host_line(outcome_body(START, run_id="r1", outcome="failed", error="exit 1: boom",
                                            ended=T0 + 5), seq=2, prev=GENESIS))
    assert (r.kind, r.run_id, r.change_id, r.outcome, r.error, r.ended) == (
        "outcome", "r1", START.id, "failed", "exit 1: boom", T0 + 5)
    with pytest.raises(ValueError, match="not one of"):
        outcome_body(START, run_id="r1", outcome="maybe", ended=T0)


def test_a_record_too_large_is_cut_to_fit_its_diff_first_and_says_so() -> None:
    big = Change(HOST, Action.WRITE_UNIT, "x.service", "text differs", "web",
                 payload=UnitFilePayload(content_hash="", diff="+Nice=5\n" * 40_000))
    line = host_line(step_body(big, run_id="r", who="a@b", desired_hash="", started=T0), seq=1, prev=GENESIS)
    assert len(line) + 1 <= history.MAX_RECORD_BYTES
    r = parse_record(line)
    assert r.details["diff_truncated"] == len(big.fields()["diff"])
    assert r.details["diff"] and big.fields()["diff"].startswith(r.details["diff"])


@pytest.mark.parametrize(("line", "why"), [
    ("hello", "does not start like a fleet record"),
    ('{"v":2,"seq":1,"prev":"' + "0" * 64 + '","kind":"step"}', "record version 2"),
    ('{"v":1,"seq":1,"prev":"' + "0" * 64 + '",}', "not valid JSON"),
    ('{"v":1,"seq":1,"prev":"' + "0" * 64 + '","kind":"note","run":"r","step":"s","host":"h"}', "unknown kind"),
    ('{"v":1,"seq":1,"prev":"' + "0" * 64 + '","kind":"step","run":"r","step":"s","host":"h"}', "started"),
    ('{"v":1,"seq":01,"prev":"' + "0" * 64 + '","kind":"step"}', "does not start like"),
])
def test_a_line_that_is_not_a_record_says_why(line: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_record(line)


# ---------------------------------------------------------------- secrets


def secret_needles() -> dict[str, str]:
    """Every form in which a secret in a record would be a leak (the JSON escapes included)."""
    out = {}
    for (_, key), value in EXAMPLE_SECRETS.items():
        for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
                     hashlib.sha256(value.encode()).hexdigest(), fingerprint(value)):
            out[form] = key
    return out


def test_no_clear_secret_reaches_a_record_nor_the_hosts_file(tmp_path: Path) -> None:
    desired = example()
    other = {k: v + "-old" for k, v in EXAMPLE_SECRETS.items()}
    changes = [*diff(desired, bare(desired), EXAMPLE_SECRETS).changes,
               *diff(desired, converged(desired, other), EXAMPLE_SECRETS).changes]
    assert any(c.action == Action.WRITE_ENV and any(k[0] == "DB_PASS" for k in c.fields()["keys"]) for c in changes)
    leaky = _env(HOST, ENV, f"found DB_PASS={EXAMPLE_SECRETS[('mastodon', 'DB_PASS')]}",
                 (("SMTP_PASSWORD", "change", "a", EXAMPLE_SECRETS[("mastodon", "SMTP_PASSWORD")]),))
    bodies = [step_body(c, run_id="r", who="a@b", desired_hash="", started=T0) for c in [*changes, leaky]]
    bodies.append(outcome_body(leaky, run_id="r", outcome="failed", ended=T0,
                               error=f"DB_PASS={EXAMPLE_SECRETS[('mastodon', 'DB_PASS')]} rejected"))
    state = tmp_path / "state"
    for b in bodies[:12] + bodies[-2:]:  # through the real shell too: what lands on the host's disk
        assert sh(*append_command(b, state_dir=str(state))).returncode == 0
    data = "\n".join(bodies) + (state / "history.jsonl").read_text()
    leaks = [f"{key} as {form!r}" for form, key in secret_needles().items() if form in data]
    assert leaks == []
    assert "(sensitive, sha256:" in data  # the control: secrets are there, masked


# ---------------------------------------------------------------- verify


def test_an_intact_chain_verifies_every_record() -> None:
    records, breaks = verify(chain(5), host=HOST)
    assert breaks == [] and [r.seq for r in records] == [1, 2, 3, 4, 5] and all(r.verified for r in records)


def test_an_edited_record_breaks_the_chain_and_only_what_precedes_it_is_trusted() -> None:
    lines = chain(5)
    lines[2] = lines[2].replace('"after":"', '"after":"not ')
    assert lines[2] != chain(5)[2]
    records, breaks = verify(lines, host=HOST)
    assert messages(breaks) == ["history on franz was edited or truncated after record 2: record 4 does not "
                                "continue record 3: one of the two was changed"]
    assert [r.seq for r in records if not r.verified] == [3, 4]


def test_a_removed_record_is_named() -> None:
    lines = chain(5)
    del lines[2]
    _, breaks = verify(lines, host=HOST)
    assert messages(breaks) == ["history on franz was edited or truncated after record 2: record 3 is missing "
                                "(record 4 follows record 2)"]


def test_removed_records_at_the_start_of_a_first_file() -> None:
    _, breaks = verify(chain(5)[2:], host=HOST)
    assert messages(breaks) == ["history on franz was edited or truncated at its start: record 3 does not start "
                                "the chain (its prev is not the genesis)"]


def test_a_file_cut_mid_line_is_truncated_after_its_last_whole_record() -> None:
    text = "\n".join(chain(4)) + "\n"
    lines, complete = split_lines(text[:-40])
    assert not complete
    records, breaks = verify(lines, host=HOST, complete=complete)
    assert [r.seq for r in records] == [1, 2, 3]
    assert breaks[0].after == 3 and "cut off" in breaks[0].message
    assert breaks[0].message.startswith("history on franz was edited or truncated after record 3: ")


def test_a_forged_record_with_a_valid_looking_hash_but_the_wrong_prev_is_found() -> None:
    lines = chain(3)
    forged = host_line(body(9, START, run="20261118T000000-forged"), seq=4, prev=hashlib.sha256(b"x").hexdigest())
    records, breaks = verify([*lines, forged], host=HOST)
    assert len(breaks) == 1 and "record 4 does not continue record 3" in breaks[0].detail
    assert not records[-1].verified


def test_a_forged_record_that_skips_a_number_is_found_even_with_the_right_prev() -> None:
    lines = chain(3)
    forged = host_line(body(9), seq=9, prev=line_hash(lines[-1]))
    _, breaks = verify([*lines, forged], host=HOST)
    assert messages(breaks) == ["history on franz was edited or truncated after record 3: records 4–8 are missing "
                                "(record 9 follows record 3)"]


def test_a_garbage_line_is_a_break_and_the_chain_goes_on_from_it() -> None:
    lines = chain(2)
    garbage = "someone was here"
    after = host_line(body(3), seq=3, prev=line_hash(garbage))  # what the appender writes after it
    records, breaks = verify([*lines, garbage, after], host=HOST)
    assert messages(breaks) == ["history on franz was edited or truncated after record 2: the line after record 2 "
                                "is not a fleet record (it does not start like a fleet record)"]
    assert [r.seq for r in records] == [1, 2, 3] and not records[-1].verified


def test_a_chain_that_does_not_continue_its_rotated_predecessor_is_found() -> None:
    old = chain(3)
    new = chain(2, first=4, prev="e" * 64)
    _, breaks = verify(new, host=HOST, prev=line_hash(old[-1]), first_seq=4, after=3,
                       predecessor="the last record of history.jsonl.1")
    assert messages(breaks) == ["history on franz was edited or truncated after record 3: record 4 does not "
                                "continue the last record of history.jsonl.1"]
    assert verify(chain(2, first=4, prev=line_hash(old[-1])), host=HOST, prev=line_hash(old[-1]),
                  first_seq=4, after=3)[1] == []


def test_a_record_copied_from_another_host_is_found() -> None:
    lines = chain(2)
    lines.append(host_line(body(2).replace('"host":"franz"', '"host":"fritz"'), seq=3, prev=line_hash(lines[-1])))
    _, breaks = verify(lines, host=HOST)
    assert messages(breaks) == ["history on franz was edited or truncated after record 2: record 3 names another "
                                "host ('fritz')"]


def test_a_line_too_long_to_read_is_a_break() -> None:
    lines: list[str | None] = [*chain(2), None]
    _, breaks = verify(lines, host=HOST)
    assert messages(breaks) == ["history on franz was edited or truncated after record 2: the line after record 2 "
                                "is longer than any fleet record"]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 8), data=st.data())
def test_any_change_to_a_record_before_the_last_is_found(n: int, data: st.DataObject) -> None:
    lines = chain(n)
    i = data.draw(st.integers(0, n - 2), label="record")
    j = data.draw(st.integers(0, len(lines[i]) - 1), label="byte")
    c = data.draw(st.characters(codec="ascii").filter(lambda ch: ch != lines[i][j] and ch != "\n"), label="char")
    lines[i] = lines[i][:j] + c + lines[i][j + 1:]
    _, breaks = verify(lines, host=HOST)
    assert breaks and min(b.after for b in breaks) <= i


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 8), data=st.data())
def test_removing_any_record_but_the_last_is_found(n: int, data: st.DataObject) -> None:
    lines = chain(n)
    i = data.draw(st.integers(0, n - 2))
    _, breaks = verify(lines[:i] + lines[i + 1:], host=HOST)
    assert breaks and min(b.after for b in breaks) <= i


# ---------------------------------------------------------------- appending, for real


def sh(command: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, timeout=120, check=False)


def host_lines(state: Path, name: str = "history.jsonl") -> list[str]:
    lines, complete = split_lines((state / name).read_text())
    assert complete
    return lines


def test_a_step_runs_after_its_record_with_its_own_stdin_untouched(tmp_path: Path) -> None:
    state, payload = tmp_path / "var-lib-fleet", tmp_path / "payload"
    content = b"KEY=value\n\nweird \\ line 'x' $HOME\x00\xff\nno final newline"
    command, stdin = with_record(f"set -e\ncat > {payload}\necho @@ok\n", content, body(0), state_dir=str(state))
    done = sh(command, stdin)
    assert done.returncode == 0, done.stderr
    assert payload.read_bytes() == content
    out = done.stdout.decode()
    assert "@@ok" in out and parse_appended(out) == (1, GENESIS)
    assert host_lines(state) == [host_line(body(0), seq=1, prev=GENESIS)]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "history.jsonl").stat().st_mode) == 0o600


def test_the_record_is_appended_before_the_step_runs(tmp_path: Path) -> None:
    state = tmp_path / "s"
    command, stdin = with_record(f"wc -l < {state}/history.jsonl; echo @@ok\n", None, body(0), state_dir=str(state))
    assert sh(command, stdin).stdout.decode().splitlines()[1].strip() == "1"


def test_when_the_record_cannot_be_appended_the_step_does_not_run(tmp_path: Path) -> None:
    state, marker = tmp_path / "s", tmp_path / "ran"
    state.write_text("a file where the directory should be")
    command, stdin = with_record(f"touch {marker}; echo @@ok\n", None, body(0), state_dir=str(state))
    done = sh(command, stdin)
    assert done.returncode == history.APPEND_FAILED_EXIT
    assert b"nothing was done: the step could not be recorded" in done.stderr
    assert not marker.exists() and b"@@ok" not in done.stdout


def test_a_malformed_record_on_stdin_is_refused_before_the_step(tmp_path: Path) -> None:
    state, marker = tmp_path / "s", tmp_path / "ran"
    command, _ = with_record(f"touch {marker}\n", None, body(0), state_dir=str(state))
    done = sh(command, b"not json\n")
    assert done.returncode == history.APPEND_FAILED_EXIT and b"malformed history record" in done.stderr
    assert not marker.exists()
    with pytest.raises(ValueError, match="one JSON object on one line"):
        with_record("true", None, body(0) + "\n" + body(1))


def test_appends_in_parallel_never_fork_the_chain(tmp_path: Path) -> None:
    """Two checkouts (or one run's steps on one host, in parallel) appending at once."""
    state = tmp_path / "s"

    def one(i: int) -> int:
        return sh(*append_command(body(i), state_dir=str(state))).returncode

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(one, range(24))) == {0}
    records, breaks = verify(host_lines(state), host=HOST)
    assert breaks == [] and [r.seq for r in records] == list(range(1, 25))


def test_a_cut_last_line_gets_its_newline_so_the_next_record_is_a_line_of_its_own(tmp_path: Path) -> None:
    state = tmp_path / "s"
    for i in range(2):
        sh(*append_command(body(i), state_dir=str(state)))
    f = state / "history.jsonl"
    f.write_bytes(f.read_bytes()[:-30])  # a truncation, or an interrupted write
    assert sh(*append_command(body(2), state_dir=str(state))).returncode == 0
    records, breaks = verify(host_lines(state), host=HOST)
    assert [r.seq for r in records] == [1, 3]  # the cut record 2 stays visible, as garbage
    assert messages(breaks) == ["history on franz was edited or truncated after record 1: the line after record 1 "
                                "is not a fleet record (it is not valid JSON)"]


def test_a_record_after_a_garbage_tail_still_gets_the_next_number(tmp_path: Path) -> None:
    state = tmp_path / "s"
    for i in range(3):
        sh(*append_command(body(i), state_dir=str(state)))
    with open(state / "history.jsonl", "a") as f:
        f.write("# a note someone added\n")
    out = sh(*append_command(body(3), state_dir=str(state))).stdout.decode()
    assert parse_appended(out) == (4, line_hash("# a note someone added"))
    records, breaks = verify(host_lines(state), host=HOST)
    assert [r.seq for r in records] == [1, 2, 3, 4] and [b.after for b in breaks] == [3]


def test_rotation_by_size_keeps_n_files_and_carries_the_chain_over(tmp_path: Path) -> None:
    state = tmp_path / "s"
    size = len(host_line(body(0), seq=10, prev=GENESIS)) + 1
    for i in range(14):  # 3 records per file, then it rotates
        done = sh(*append_command(body(i), state_dir=str(state), rotate_bytes=3 * size - 10, keep=2))
        assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in state.iterdir() if p.name.startswith("history.jsonl"))
    assert names == ["history.jsonl", "history.jsonl.1", "history.jsonl.2"]
    old, older, new = host_lines(state, "history.jsonl.1"), host_lines(state, "history.jsonl.2"), host_lines(state)
    assert [len(older), len(old), len(new)] == [3, 3, 2]
    assert parse_record(new[0]).prev == line_hash(old[-1])  # the chain carried over
    records, breaks = verify(older + old + new, host=HOST, prev=None)
    assert breaks == [] and [r.seq for r in records] == list(range(7, 15))
    _, breaks = verify(new, host=HOST, prev=line_hash(old[-1]), first_seq=parse_record(old[-1]).seq + 1)
    assert breaks == []


def test_the_file_permissions_are_put_back_when_appending(tmp_path: Path) -> None:
    state = tmp_path / "s"
    sh(*append_command(body(0), state_dir=str(state)))
    os.chmod(state / "history.jsonl", 0o644)
    os.chmod(state, 0o755)
    sh(*append_command(body(1), state_dir=str(state)))
    assert stat.S_IMODE((state / "history.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_parse_appended_takes_only_the_snippets_line() -> None:
    assert parse_appended("@@history 12 " + "a" * 64 + "\n@@ok\n") == (12, "a" * 64)
    assert parse_appended("| @@history 12 " + "a" * 64 + "\n") is None
    assert parse_appended("@@history x " + "a" * 64) is None


# ---------------------------------------------------------------- reading, for real


def read(state: Path, last: LastSeen | None, *, known: dict[int, str] | None = None, **bounds: int) -> HistoryRead:
    done = sh(read_section(last, state_dir=str(state), **bounds))
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    header, _, rest = done.stdout.decode().partition("\n")
    assert header == "@@history"
    assert not any(line.startswith("@@") for line in rest.splitlines())  # never mistaken for a section
    return parse_read(HOST, rest, last, known=known, **bounds)


def edit(state: Path, seq: int, old: str, new: str) -> None:
    """A hand edit of record `seq` on the host that keeps it a well-formed record."""
    f = state / "history.jsonl"
    lines = f.read_text().split("\n")
    i = next(i for i, line in enumerate(lines) if line.startswith(f'{{"v":1,"seq":{seq},'))
    assert old in lines[i]
    lines[i] = lines[i].replace(old, new, 1)
    f.write_text("\n".join(lines))


def appended(state: Path, n: int, *, first: int = 0, **opts: int) -> None:
    for i in range(first, first + n):
        assert sh(*append_command(body(i), state_dir=str(state), **opts)).returncode == 0


def test_a_host_without_history_says_so(tmp_path: Path) -> None:
    r = read(tmp_path / "nothing", None)
    assert (r.status, r.records, r.breaks, r.lock_held) == ("none", (), (), False)


def test_a_first_read_returns_every_record_and_what_to_ask_next_time(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 4)
    r = read(state, None)
    assert (r.status, r.breaks, r.more, r.notes) == ("ok", (), False, ())
    assert [x.seq for x in r.records] == [1, 2, 3, 4]
    data = (state / "history.jsonl").read_bytes()
    assert r.last_seen == LastSeen(4, r.records[-1].hash, hashlib.sha256(data).hexdigest())


def test_the_next_read_returns_only_the_new_records(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 3)
    first = read(state, None)
    again = read(state, first.last_seen)
    assert (again.records, again.breaks, again.last_seen) == ((), (), first.last_seen)
    appended(state, 2, first=3)
    then = read(state, first.last_seen)
    assert [x.seq for x in then.records] == [4, 5] and then.breaks == () and all(x.verified for x in then.records)


@pytest.mark.parametrize("bounds", [{"max_records": 3}, {"max_bytes": 2500}])
def test_reads_are_bounded_and_go_on_where_they_stopped(tmp_path: Path, bounds: dict[str, int]) -> None:
    state = tmp_path / "s"
    appended(state, 10)
    seen: list[int] = []
    last = None
    reads = []
    for _ in range(10):
        r = read(state, last, **bounds)
        reads.append(r)
        assert r.breaks == ()
        assert len(r.records) <= bounds.get("max_records", 10)
        assert sum(len(x.line) + 2 for x in r.records) <= bounds.get("max_bytes", 1 << 30)
        seen += [x.seq for x in r.records]
        last = r.last_seen
        if not r.more:
            break
    assert seen == list(range(1, 11))
    assert len(reads) >= 3 and all(r.more for r in reads[:-1])


def test_a_read_follows_the_last_seen_record_into_its_rotated_file(tmp_path: Path) -> None:
    state = tmp_path / "s"
    size = len(host_line(body(0), seq=10, prev=GENESIS)) + 1
    opts = {"rotate_bytes": 3 * size - 10, "keep": 3}
    appended(state, 2, **opts)
    first = read(state, None)
    appended(state, 5, first=2, **opts)  # record 2's file is history.jsonl.1 now
    r = read(state, first.last_seen)
    assert [x.seq for x in r.records] == [3, 4, 5, 6, 7] and r.breaks == () and r.notes == ()


def test_records_rotated_out_before_they_were_read_are_a_note_not_a_break(tmp_path: Path) -> None:
    state = tmp_path / "s"
    size = len(host_line(body(0), seq=10, prev=GENESIS)) + 1
    opts = {"rotate_bytes": 2 * size - 10, "keep": 1}
    appended(state, 2, **opts)
    first = read(state, None)
    appended(state, 6, first=2, **opts)
    r = read(state, first.last_seen)
    assert r.breaks == () and [x.seq for x in r.records] == [5, 6, 7, 8]
    assert r.notes == ("records 3–4 on franz were rotated out before this checkout read them",)


def test_a_hand_edit_of_a_collected_record_is_found_and_named(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 5)
    first = read(state, None)
    known = {x.seq: x.hash for x in first.records}
    edit(state, 2, '"after":"', '"after":"not ')
    r = read(state, first.last_seen, known=known)
    assert messages(r.breaks)[0] == ("history on franz was edited or truncated after record 1: record 2 differs "
                                     "from the copy collected before")
    without = read(state, first.last_seen)  # a checkout that kept no copy still sees the chain break
    assert "after record 1" in messages(without.breaks)[0]


def test_an_edit_of_the_last_collected_record_is_found(tmp_path: Path) -> None:
    """The last record has no successor to break the chain: only the digest of what was collected tells."""
    state = tmp_path / "s"
    appended(state, 3)
    first = read(state, None)
    edit(state, 3, '"after":"', '"after":"not ')
    r = read(state, first.last_seen, known={x.seq: x.hash for x in first.records})
    assert messages(r.breaks) == ["history on franz was edited or truncated after record 2: record 3 differs from "
                                  "the copy collected before"]


def test_a_file_truncated_after_it_was_collected_is_found(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 5)
    first = read(state, None)
    f = state / "history.jsonl"
    f.write_text("".join(line + "\n" for line in host_lines(state)[:3]))
    r = read(state, first.last_seen)
    assert messages(r.breaks) == ["history on franz was edited or truncated after record 3: record 5 had been "
                                  "collected, the history now ends at record 3"]


def test_a_file_cut_mid_line_is_found_on_read(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 4)
    f = state / "history.jsonl"
    f.write_bytes(f.read_bytes()[:-25])
    r = read(state, None)
    assert [x.seq for x in r.records] == [1, 2, 3]
    assert len(r.breaks) == 1 and r.breaks[0].after == 3 and "cut off" in r.breaks[0].detail


def test_history_deleted_after_it_was_collected_is_found(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 2)
    first = read(state, None)
    (state / "history.jsonl").unlink()
    r = read(state, first.last_seen)
    assert messages(r.breaks) == ["history on franz was edited or truncated at its start: its history files are "
                                  "gone (record 2 had been collected)"]
    assert r.last_seen is None


def test_the_lock_is_reported_with_its_run(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 1)
    (state / "lock").mkdir()
    (state / "lock" / "holder").write_text(json.dumps({"token": "t", "run_id": "20261118T000000-bbbbbb"}) + "\n")
    r = read(state, None)
    assert (r.lock_held, r.lock_run) == (True, "20261118T000000-bbbbbb")


def test_a_line_far_too_long_on_the_host_is_not_printed_but_is_a_break(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 2)
    with open(state / "history.jsonl", "a") as f:
        f.write("x" * (history.MAX_LINE_BYTES + 10) + "\n")
    appended(state, 1, first=2)
    done = sh(read_section(None, state_dir=str(state)))
    assert len(done.stdout) < 20_000
    r = parse_read(HOST, done.stdout.decode().partition("\n")[2], None)
    assert [x.seq for x in r.records] == [1, 2, 3]
    assert messages(r.breaks) == ["history on franz was edited or truncated after record 2: the line after record 2 "
                                  "is longer than any fleet record"]


def test_binary_garbage_and_section_markers_in_the_file_are_only_lines_that_are_not_records(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 2)
    with open(state / "history.jsonl", "ab") as f:
        f.write(b"@@end\n@@units\n\x00\xff\xfe binary \r\x1b[31m\n" + b'{"v":1,"seq":3,"prev":"' + b"a" * 64 + b'",}\n')
    appended(state, 1, first=2)  # the appender numbers it after the last readable number: 4
    done = sh(read_section(None, state_dir=str(state)))
    text = done.stdout.decode("utf-8", errors="replace")  # as the collector decodes a host's output
    assert not any(line.startswith("@@") for line in text.splitlines()[1:])
    r = parse_read(HOST, text.partition("\n")[2], None)
    assert [x.seq for x in r.records] == [1, 2, 4]
    assert [b.after for b in r.breaks] == [2, 2, 2, 2]
    assert all("is not a fleet record" in b.detail for b in r.breaks)


def test_a_history_file_far_too_large_is_not_read(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 1)
    os.truncate(state / "history.jsonl", history.HUGE_FILE_BYTES + 1)  # sparse: costs no disk
    r = read(state, None)
    assert r.status == "refused" and r.records == ()
    assert "far beyond what fleet writes" in r.breaks[0].message


# ---------------------------------------------------------------- the parser, hostile


def section(*lines: str) -> str:
    return "\n".join(["v 1", *lines, "lock -", "end"]) + "\n"


def test_the_parser_refuses_a_flood_before_keeping_any_of_it() -> None:
    huge = section("file history.jsonl 1 1", "anchor none", "in history.jsonl", *["|x"] * 500)
    with pytest.raises(ParseError, match="more than .* lines; fleet refuses it"):
        parse_read(HOST, huge, None, max_records=10)
    with pytest.raises(ParseError, match="more than .* bytes; fleet refuses it"):
        parse_read(HOST, section("|" + "x" * 200_000), None, max_bytes=1000)
    with pytest.raises(ParseError, match="a line of"):
        parse_read(HOST, section("file history.jsonl 1 1", "anchor none", "in history.jsonl",
                                 "|" + "x" * (history.MAX_LINE_BYTES + 1)), None)


@pytest.mark.parametrize(("text", "error"), [
    ("", "does not start with its version line"),
    ("v 1\nfile history.jsonl 10 1\nanchor none\n", "truncated"),
    (section("anchor none"), "unexpected line"),  # an anchor before any file
    (section("file history.jsonl 10 1", "|{}"), "unexpected line"),  # a line before its file
    (section("file history.jsonl 10 1", "anchor none", "in elsewhere"), "unexpected line"),
    (section("file ../../etc/passwd 10 1 x"), "unexpected line"),
    (section("file history.jsonl 10 1", "anchor ok", "in history.jsonl", "|{}"), "not asked about"),
    (section("@@units"), "unexpected line"),
    (section("file history.jsonl 10 1"), "lacks its anchor"),
])
def test_output_the_script_cannot_have_printed_is_refused(text: str, error: str) -> None:
    with pytest.raises(ParseError, match=error):
        parse_read(HOST, text, None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.sampled_from(["v 1", "lock -", "end", "none", "more", "anchor ok", "anchor none", "anchor changed",
                     "file history.jsonl 100 1", "file history.jsonl.1 5 0", "in history.jsonl", "long 3 999999",
                     "digest " + "a" * 64, "huge history.jsonl 99999999999"]),
    st.text(max_size=40).map(lambda s: "|" + s.replace("\n", "")),
    st.text(max_size=40)), max_size=14), st.booleans())
def test_the_parser_never_fails_with_anything_but_a_parse_error(lines: list[str], with_last: bool) -> None:
    last = LastSeen(3, "b" * 64, "c" * 64) if with_last else None
    try:
        r = parse_read(HOST, "\n".join(lines) + "\n", last)
    except ParseError:
        return
    assert r.status in ("ok", "none", "busy", "unreadable", "refused")


def test_records_read_are_exactly_the_lines_on_the_host() -> None:
    lines = chain(3)
    text = section("file history.jsonl 100 1", "anchor none", "in history.jsonl", *("|" + x for x in lines),
                   "digest " + "f" * 64)
    r = parse_read(HOST, text, None)
    assert [x.line for x in r.records] == lines and r.last_seen == LastSeen(3, line_hash(lines[-1]), "f" * 64)
    assert re.fullmatch(r"[0-9a-f]{64}", r.records[0].hash)


def test_a_change_of_thousands_of_long_non_ascii_keys_still_makes_a_readable_record() -> None:
    keys = tuple((f"KEY_{i}", "change", "é" * 3000, "✓" * 3000) for i in range(5000))
    # (a write-env carries no diff and only its four meta fields now: the long values go where they can)
    huge = _env(HOST, ENV, "ü" * 100_000 + "日本" * 50_000, keys, before="ß" * 50_000, after="x",
                name="ö" * 1000, owner="ö" * 500)
    text = step_body(huge, run_id="20261118T000000-aaaaaa", who="alice@laptop", desired_hash="d" * 64,
                     started=T0, commit="3f2a9c1d0b7e4a55" + "0" * 24, dirty=True)
    line = host_line(text, seq=1, prev=GENESIS)
    assert len(line) + 1 <= history.MAX_RECORD_BYTES
    r = parse_record(line)
    assert (r.run_id, r.change_id, r.desired_hash, r.commit, r.started) == (
        "20261118T000000-aaaaaa", huge.id, "d" * 64, "3f2a9c1d0b7e4a55" + "0" * 24, T0)
    assert json.loads(line)["truncated"] is True and r.keys[:3] == ("KEY_0", "KEY_1", "KEY_2")


def test_with_nothing_new_the_anchors_hash_is_the_digest_and_is_made_once(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appended(state, 5)
    first = read(state, None)
    assert first.last_seen is not None and first.last_seen.digest
    log = logging_tools(tmp_path / "logged", ("head", "sha256sum"))
    path = f"{tmp_path / 'logged'}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def logged_read() -> HistoryRead:  # `read` from where `first` left off, head and sha256sum logged
        log.unlink(missing_ok=True)
        done = subprocess.run(["sh", "-c", read_section(first.last_seen, state_dir=str(state))], capture_output=True,
                              env={**os.environ, "PATH": path}, timeout=60)
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        return parse_read(HOST, done.stdout.decode().partition("\n")[2], first.last_seen)

    again = logged_read()
    assert again.status == "ok" and again.records == () and again.breaks == ()
    assert again.last_seen == first.last_seen  # the digest of the same bytes, up to the anchor
    # the anchor's check and no second hash (a pipeline's two tools start in either order)
    assert sorted(started(log)) == ["head", "sha256sum"]
    # one record more: its own digest, hashed after the anchor's check
    appended(state, 1, first=5)
    newer = logged_read()
    assert [r.seq for r in newer.records] == [first.last_seen.seq + 1]
    assert newer.last_seen is not None and newer.last_seen.digest != first.last_seen.digest
    assert newer.last_seen == read(state, None).last_seen
    assert sorted(started(log)) == ["head", "head", "sha256sum", "sha256sum"]
