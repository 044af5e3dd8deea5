"""The journal: an SQLite record of every apply run and every step it took or skipped.

It is the post-incident record — who changed what, on which host, from what to what, when,
and how it ended.  One file, `<state_dir>/journal.sqlite` (mode 0600), in WAL mode so that
`fleet log` and the sqlite3 CLI can read it while an apply writes.

A step's INTENT is committed before the step runs (`step_started`, outcome NULL) and its
outcome after (`step_finished`): a crash, a kill -9 or a lost laptop leaves "started, never
finished" visible instead of nothing.  Commits are `synchronous=FULL` for the same reason.

The journal never holds a clear secret.  Changes arrive masked already; every text is still
run through `scrub` on the way in, as the last line of defence.

Times are stored as UNIX seconds (REAL) and shown in UTC.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from fleet.actions import Change, KeyChange
from fleet.errors import FleetError
from fleet.mastodon import looks_secret
from fleet.resources.base import was
from fleet.resources.registry import for_action
from fleet.textutil import mask

JOURNAL_FILE = "journal.sqlite"
BUSY_TIMEOUT_MS = 5000

RUN_OUTCOMES = ("ok", "failed", "refused", "interrupted")
STEP_OUTCOMES = ("ok", "failed", "skipped", "rolled-back")

# One entry per schema version: entry i takes a journal from user_version i to i + 1.
# Never edit a released entry; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            operator TEXT NOT NULL,          -- user@machine
            started REAL NOT NULL,           -- UNIX seconds
            ended REAL,                      -- NULL: the run never finished (crash, kill)
            plan_id TEXT NOT NULL,
            plan_hash TEXT NOT NULL,
            desired_hash TEXT NOT NULL,
            fleet TEXT NOT NULL,
            lab INTEGER NOT NULL,            -- 1: the local lab fleet
            outcome TEXT,                    -- ok | failed | refused | interrupted; NULL while running
            summary TEXT NOT NULL DEFAULT ''
        )""",
        """CREATE TABLE steps (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id),
            change_id TEXT NOT NULL,         -- host:action:target, as in the plan
            host TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            service TEXT,
            reason TEXT NOT NULL,            -- why the plan wanted this change
            before TEXT NOT NULL,
            after TEXT NOT NULL,
            details TEXT NOT NULL,           -- JSON: keys, steps, remove_files, diff, content_hash, meta
            started REAL,                    -- intent recorded; equals ended for a skipped step
            ended REAL,                      -- NULL: started, never finished
            outcome TEXT,                    -- ok | failed | skipped | rolled-back; NULL: never finished
            error TEXT                       -- what failed, or why a step was not attempted
        )""",
        "CREATE INDEX steps_host ON steps(host)",
        "CREATE INDEX steps_started ON steps(started)",
        "CREATE INDEX steps_run ON steps(run_id)",
        "CREATE INDEX runs_started ON runs(started)",
    ),
    (
        """CREATE TABLE snapshots (
            id TEXT PRIMARY KEY,             -- time-sortable, like run ids
            taken REAL NOT NULL,             -- UNIX seconds
            operator TEXT NOT NULL,          -- user@machine
            command TEXT NOT NULL,           -- status | plan | apply | audit
            fleet TEXT NOT NULL,
            lab INTEGER NOT NULL,
            hosts TEXT NOT NULL,             -- JSON: {host: "ok" | error kind}
            data BLOB NOT NULL               -- zlib(JSON) of the observed state (fleet/snapshot.py), masked
        )""",
        "CREATE INDEX snapshots_taken ON snapshots(taken)",
    ),
    (  # the hosts' history, collected: a cache (fleet/history_cache.py, docs/journal.md)
        """CREATE TABLE host_records (
            host TEXT NOT NULL,
            hash TEXT NOT NULL,              -- sha256 of the line and its newline (the next record's prev)
            seq INTEGER NOT NULL,
            prev TEXT NOT NULL,
            kind TEXT NOT NULL,              -- step | outcome
            run_id TEXT NOT NULL,
            change_id TEXT NOT NULL,
            time REAL NOT NULL,              -- step: started; outcome: ended (UNIX seconds)
            outcome TEXT,                    -- outcome records: ok | failed | skipped | rolled-back
            verified INTEGER NOT NULL,       -- 1: both its chain links held when it was collected
            line TEXT NOT NULL,              -- the record exactly as the host holds it (masked already)
            collected REAL NOT NULL,
            PRIMARY KEY (host, hash)
        )""",
        "CREATE INDEX host_records_run ON host_records(run_id)",
        "CREATE INDEX host_records_time ON host_records(time)",
        """CREATE TABLE host_history (
            host TEXT PRIMARY KEY,
            seq INTEGER,                     -- the last record collected (fleet.history.LastSeen); NULL: none
            hash TEXT,
            digest TEXT,
            collected REAL NOT NULL,         -- when the host's history was last read
            lock_held INTEGER,               -- its apply lock, seen after that read; NULL: not known
            lock_run TEXT
        )""",
        """CREATE TABLE host_breaks (
            host TEXT NOT NULL,
            after INTEGER NOT NULL,          -- the last intact record before the break
            detail TEXT NOT NULL,
            found REAL NOT NULL,             -- when a collection first saw it
            PRIMARY KEY (host, after, detail)
        )""",
    ),
    (  # which version of the desired state this checkout's own runs applied (fleet/provenance.py)
        "ALTER TABLE runs ADD COLUMN git_commit TEXT",  # NULL: the desired state is not in git
        "ALTER TABLE runs ADD COLUMN git_dirty INTEGER",  # 1: it differed from that commit
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class JournalError(FleetError):
    """The journal cannot be opened, read or written."""

    def __init__(self, message: str, *, path: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


@dataclass(frozen=True)
class RunRecord:
    """One `fleet apply` run."""

    id: str
    operator: str
    started: float
    ended: float | None
    plan_id: str
    plan_hash: str
    desired_hash: str
    fleet: str
    lab: bool
    outcome: str | None
    summary: str
    commit: str | None = None  # git commit of the desired state; None: not in git, or not known
    dirty: bool | None = None

    def provenance(self) -> str:
        """`desired state at git 3f2a9c1d0b7e (dirty)`, or "" when no commit is known."""
        if not self.commit:
            return ""
        return f"desired state at git {self.commit[:12]}" + (" (dirty)" if self.dirty else "")


@dataclass(frozen=True)
class SnapshotRecord:
    id: str
    taken: float
    operator: str
    command: str
    fleet: str
    lab: bool
    hosts: dict[str, str]  # host -> "ok" or the error kind


@dataclass(frozen=True)
class StepRecord:
    """One change of a run: attempted (started, maybe finished) or skipped."""

    id: int
    run_id: str
    change_id: str
    host: str
    action: str
    target: str
    service: str | None
    reason: str
    before: str
    after: str
    details: Mapping[str, Any] = field(hash=False)
    started: float | None
    ended: float | None
    outcome: str | None
    error: str | None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def keys(self) -> tuple[KeyChange, ...]:
        """Env key changes: (key, op set|change|remove, before, after), masked."""
        return tuple(KeyChange(str(k[0]), str(k[1]), str(k[2]), str(k[3])) for k in self.details.get("keys", ()))


# ---------------------------------------------------------------------------------------------
# Secrets


_MASKED = re.compile(r"\(sensitive, sha256:[0-9a-f]{8}\)")
_KEY_EQ = re.compile(r"(?<![A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]*)=")


def _is_masked(value: str) -> bool:
    return _MASKED.fullmatch(value) is not None


def _secret_key(key: str) -> bool:
    return looks_secret(key) or looks_secret(key.upper())


def scrub(text: str) -> str:
    """`text` with the value of every secret-looking `KEY=value` replaced by its mask.

    A value runs to the next whitespace or quote; after a quote (`"DB_PASS=a b"`, systemd's
    Environment= quoting) it runs to the closing quote; a quoted value (`DB_PASS="a b"`) to
    its closing quote, backslash escapes skipped.  A value that is exactly a mask is left
    alone.  Over-masking is the safe failure: it only costs readability.
    """
    out: list[str] = []
    pos = 0
    search_from = 0
    while True:
        m = _KEY_EQ.search(text, search_from)
        if m is None:
            break
        start = m.end()
        search_from = start  # a non-secret KEY= may have KEY2=secret inside its value
        if not _secret_key(m.group(1)):
            continue
        opening = text[m.start() - 1] if m.start() > 0 else ""
        if start < len(text) and text[start] in "\"'":
            close = _closing_quote(text, start + 1, text[start])
            value, end = text[start + 1:close], min(close + 1, len(text))
        elif opening and opening in "\"'":
            end = _closing_quote(text, start, opening)
            value = text[start:end]
        else:
            already = _MASKED.match(text, start)
            end = _word_end(text, already.end() if already else start)
            value = text[start:end]
            if already and not value[already.end() - start:].strip("),;.]}"):
                search_from = already.end()
                continue
        if not value or _is_masked(value):
            search_from = max(search_from, end)
            continue
        out.append(text[pos:start])
        out.append(mask(value))
        pos = end
        search_from = end
    out.append(text[pos:])
    return "".join(out)


def _closing_quote(text: str, i: int, quote: str) -> int:
    """Index of the quote closing a value that starts at `i` (len(text) if none)."""
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i
        i += 1
    return len(text)


def _word_end(text: str, i: int) -> int:
    while i < len(text) and not text[i].isspace() and text[i] not in "\"'":
        i += 1
    return i


def _scrub_key(k: tuple[str, str, str, str] | list[str]) -> list[str]:
    key, op, before, after = (str(x) for x in k)
    if _secret_key(key):
        before = before if not before or _is_masked(before) else mask(before)
        after = after if not after or _is_masked(after) else mask(after)
    return [key, op, scrub(before), scrub(after)]


def _details(change: Change) -> dict[str, Any]:
    f = change.fields()
    return {
        "keys": [_scrub_key(k) for k in f["keys"]],
        "steps": [scrub(s) for s in f["steps"]],
        "remove_files": [scrub(p) for p in f["remove_files"]],
        "diff": scrub(f["diff"]),
        "content_hash": f["content_hash"],
        "meta": {k: scrub(v) for k, v in f["meta"].items()},
    }


# ---------------------------------------------------------------------------------------------
# The journal


def journal_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the journal of a state directory lives."""
    return Path(state_dir) / JOURNAL_FILE


def operator() -> str:
    """`user@machine` of whoever runs fleet, from the environment; never raises."""
    try:
        user = getpass.getuser()
    except Exception:  # KeyError/OSError: no LOGNAME/USER and no passwd entry (containers)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    try:
        machine = socket.gethostname()
    except OSError:
        machine = ""
    user = _printable(user) or "unknown"
    machine = _printable(machine) or "unknown-machine"
    return f"{user}@{machine}"


def _printable(s: str) -> str:
    return "".join(c for c in s if c.isprintable() and not c.isspace())


def new_run_id(now: float) -> str:
    """Time-sortable: `20261128T140307-a1b2c3` (UTC)."""
    import secrets  # here, not at the top: `secrets` imports `random`, which `status` and `plan` never need

    return f"{datetime.fromtimestamp(now, UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


class Journal:
    """The journal file, open.  Thread-safe: one connection, one lock — hosts applied in
    parallel write their steps through the same Journal."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.RLock()
        self.path = path

    # -- opening and closing -------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Journal:
        """Open (creating, and migrating to the current schema) the journal at `path`.

        A missing parent directory is created 0700; a new file 0600, and an existing one
        readable by others is tightened to 0600 (the journal names hosts, operators and
        fingerprints of secrets)."""
        path = Path(path)
        try:
            if not path.parent.exists():
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
        except OSError as e:
            raise JournalError(f"cannot create the journal {path}: {e.strerror or e}", path=str(path),
                               hint="check the state directory's owner and permissions (--state-dir)") from e
        try:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open the journal {path}: {e}", path=str(path)) from e
        journal = cls(conn, path)
        try:
            with journal._writing("open"):
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.execute("PRAGMA foreign_keys = ON")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise JournalError(f"the journal {path} cannot use WAL mode (got {mode})", path=str(path),
                                       hint="put the state directory on a local file system")
                # Intent must survive a power cut, not only a crash: fsync every commit.
                conn.execute("PRAGMA synchronous = FULL")
                journal._migrate()
        except BaseException:
            journal.close()
            raise
        return journal

    def _migrate(self) -> None:
        conn = self._connection()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalError(f"the journal {self.path} has schema version {version}; this fleet knows up to "
                               f"{SCHEMA_VERSION}", path=str(self.path), hint="upgrade fleet to read it")
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")  # two fleets opening a new journal at once: one migrates
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for i in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[i]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {i + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- snapshots ------------------------------------------------------------------------------

    def save_snapshot(self, *, command: str, fleet: str, lab: bool, hosts: Mapping[str, str], data: bytes,
                      operator: str, keep_days: float | None = None, now: float | None = None) -> str:
        """Store one collection (already compact and masked: fleet/snapshot.py); snapshots older
        than `keep_days` are deleted in the same transaction (the retention setting)."""
        taken = time.time() if now is None else now
        snap_id = new_run_id(taken)
        with self._transaction("store a snapshot") as conn:
            conn.execute("INSERT INTO snapshots (id, taken, operator, command, fleet, lab, hosts, data) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (snap_id, taken, operator, command, fleet, int(lab), json.dumps(dict(hosts)), data))
            if keep_days is not None:
                conn.execute("DELETE FROM snapshots WHERE taken < ?", (taken - keep_days * 86400,))
        return snap_id

    def snapshots(self, since: float | None = None) -> list[SnapshotRecord]:
        """Every snapshot (without its data), oldest first."""
        rows = self._connection().execute(
            "SELECT id, taken, operator, command, fleet, lab, hosts FROM snapshots WHERE taken >= ? "
            "ORDER BY taken, id", (since if since is not None else float("-inf"),)).fetchall()
        return [SnapshotRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), json.loads(r[6])) for r in rows]

    def snapshot_data(self, snap_id: str) -> bytes | None:
        row = self._connection().execute("SELECT data FROM snapshots WHERE id = ?", (snap_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL into the main file).  Idempotent."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"the journal {self.path} is closed", path=str(self.path))
        return self._conn

    @contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as e:
                raise JournalError(f"journal {self.path}: cannot {what}: {e}", path=str(self.path),
                                   hint="if another fleet holds it locked, wait for it to finish") from e

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """`_writing`, as one transaction: all of the block's statements are kept, or none."""
        with self._writing(what) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # -- writing --------------------------------------------------------------------------------

    def start_run(self, *, operator: str, plan_id: str, plan_hash: str, desired_hash: str, fleet: str,
                  lab: bool, commit: str | None = None, dirty: bool | None = None, now: float | None = None) -> str:
        """Record the start of an apply run (with the desired state's git commit, if known); returns its new id."""
        started = time.time() if now is None else now
        with self._writing("record a new run") as conn:
            for attempt in range(5):
                run_id = new_run_id(started)
                try:
                    conn.execute(
                        "INSERT INTO runs (id, operator, started, plan_id, plan_hash, desired_hash, fleet, lab,"
                        " summary, git_commit, git_dirty) VALUES (?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?)",
                        (run_id, scrub(operator), started, plan_id, plan_hash, desired_hash, fleet, int(lab), commit,
                         None if dirty is None else int(dirty)))
                    return run_id
                except sqlite3.IntegrityError:
                    if attempt == 4:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    def step_started(self, run_id: str, change: Change, *, now: float | None = None) -> int:
        """Record the intent to carry out `change`, committed before it runs; returns the step id."""
        return self._insert_step(run_id, change, started=time.time() if now is None else now)

    def record_skipped(self, run_id: str, change: Change, reason: str, *, now: float | None = None) -> int:
        """Record a change that was not attempted (an earlier failure halted the run…)."""
        at = time.time() if now is None else now
        return self._insert_step(run_id, change, started=at, ended=at, outcome="skipped", error=reason)

    def _insert_step(self, run_id: str, change: Change, *, started: float, ended: float | None = None,
                     outcome: str | None = None, error: str | None = None) -> int:
        row = (run_id, scrub(change.id), change.host, change.action.value, scrub(change.target),
               None if change.service is None else scrub(change.service), scrub(change.reason),
               scrub(change.before), scrub(change.after), json.dumps(_details(change), ensure_ascii=False),
               started, ended, outcome, None if error is None else scrub(error))
        with self._writing(f"record step {change.id}") as conn:
            try:
                cur = conn.execute(
                    "INSERT INTO steps (run_id, change_id, host, action, target, service, reason, before, after,"
                    " details, started, ended, outcome, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row)
            except sqlite3.IntegrityError as e:
                raise JournalError(f"journal {self.path}: no run {run_id!r} to record {change.id} in",
                                   path=str(self.path)) from e
            assert cur.lastrowid is not None
            return cur.lastrowid

    def step_finished(self, step_id: int, outcome: str, error: str = "", *, now: float | None = None) -> None:
        """Record how a started step ended: ok, failed (with `error`) or rolled-back."""
        if outcome not in STEP_OUTCOMES:
            raise ValueError(f"step outcome {outcome!r} is not one of {', '.join(STEP_OUTCOMES)}")
        ended = time.time() if now is None else now
        with self._writing(f"record the outcome of step {step_id}") as conn:
            cur = conn.execute("UPDATE steps SET ended = ?, outcome = ?, error = ? WHERE id = ?",
                               (ended, outcome, scrub(error) or None, step_id))
            if cur.rowcount != 1:
                raise JournalError(f"journal {self.path}: no step {step_id}", path=str(self.path))

    def finish_run(self, run_id: str, outcome: str, summary: str = "", *, now: float | None = None) -> None:
        """Record how a run ended: ok, failed, refused (stale or incomplete plan…) or interrupted."""
        if outcome not in RUN_OUTCOMES:
            raise ValueError(f"run outcome {outcome!r} is not one of {', '.join(RUN_OUTCOMES)}")
        ended = time.time() if now is None else now
        with self._writing(f"record the end of run {run_id}") as conn:
            cur = conn.execute("UPDATE runs SET ended = ?, outcome = ?, summary = ? WHERE id = ?",
                               (ended, outcome, scrub(summary), run_id))
            if cur.rowcount != 1:
                raise JournalError(f"journal {self.path}: no run {run_id!r}", path=str(self.path))

    # -- reading --------------------------------------------------------------------------------

    _RUN_COLUMNS = ("id, operator, started, ended, plan_id, plan_hash, desired_hash, fleet, lab, outcome, summary,"
                    " git_commit, git_dirty")
    _STEP_COLUMNS = ("s.id, s.run_id, s.change_id, s.host, s.action, s.target, s.service, s.reason, s.before,"
                     " s.after, s.details, s.started, s.ended, s.outcome, s.error")

    def run(self, run_id: str) -> RunRecord | None:
        """The run `run_id`, or None."""
        with self._writing("read runs") as conn:
            row = conn.execute(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else _run_record(row)

    def runs(self, since: float | None = None) -> list[RunRecord]:
        """Runs started at or after `since` (all by default), oldest first."""
        where, args = ("WHERE started >= ?", (since,)) if since is not None else ("", ())
        with self._writing("read runs") as conn:
            rows = conn.execute(f"SELECT {self._RUN_COLUMNS} FROM runs {where} ORDER BY started, id",
                                args).fetchall()
        return [_run_record(r) for r in rows]

    def steps(self, *, host: str | None = None, since: float | None = None,
              run_id: str | None = None) -> list[StepRecord]:
        """Steps matching every given filter, in the order they were started."""
        clauses: list[str] = []
        args: list[Any] = []
        if host is not None:
            clauses.append("s.host = ?")
            args.append(host)
        if since is not None:
            clauses.append("s.started >= ?")
            args.append(since)
        if run_id is not None:
            clauses.append("s.run_id = ?")
            args.append(run_id)
        return self._steps(" AND ".join(clauses), args)

    def unfinished(self) -> list[StepRecord]:
        """Steps started and never finished: the run crashed, was killed, or is still running."""
        return self._steps("s.outcome IS NULL", [])

    def _steps(self, where: str, args: list[Any]) -> list[StepRecord]:
        sql = f"SELECT {self._STEP_COLUMNS} FROM steps s"
        if where:
            sql += f" WHERE {where}"
        with self._writing("read steps") as conn:
            rows = conn.execute(sql + " ORDER BY s.started, s.id", args).fetchall()
        return [_step_record(r) for r in rows]


def _run_record(r: tuple[Any, ...]) -> RunRecord:
    return RunRecord(id=r[0], operator=r[1], started=r[2], ended=r[3], plan_id=r[4], plan_hash=r[5],
                     desired_hash=r[6], fleet=r[7], lab=bool(r[8]), outcome=r[9], summary=r[10] or "",
                     commit=r[11] or None, dirty=None if r[12] is None else bool(r[12]))


def _step_record(r: tuple[Any, ...]) -> StepRecord:
    try:
        details = json.loads(r[10]) if r[10] else {}
    except ValueError:
        details = {"unreadable": r[10]}  # hand-edited row: show it rather than fail the whole log
    return StepRecord(id=r[0], run_id=r[1], change_id=r[2], host=r[3], action=r[4], target=r[5], service=r[6],
                      reason=r[7], before=r[8], after=r[9], details=details if isinstance(details, dict) else {},
                      started=r[11], ended=r[12], outcome=r[13], error=r[14])


# ---------------------------------------------------------------------------------------------
# Sentences for `fleet log`

def _utc(t: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(t, UTC).strftime(fmt)


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _what(step: StepRecord) -> str:
    """The past-tense phrase, as the resource of the step's action words it:
    `stopped and disabled mastodon-sidekiq.service (was …)`."""
    resource = for_action(step.action)
    if resource is None:  # an action this fleet does not know (a journal written by another version)
        return f"{step.action} {step.target}" + was(step.before)
    return resource.sentence(step)


def _ending(step: StepRecord, run: RunRecord | None) -> str:
    error = _one_line(step.error or "")
    if step.outcome is None:
        if run is not None and run.outcome is not None:
            return f"STARTED, NEVER FINISHED (the run ended {run.outcome})"
        return "STARTED, NEVER FINISHED"
    if step.outcome == "ok":
        return "ok"
    if step.outcome == "failed":
        return f"FAILED: {error}" if error else "FAILED"
    if step.outcome == "skipped":
        why = re.sub(r"^not attempted\b[:,]?\s*", "", error, flags=re.IGNORECASE)  # the executor may say it too
        return f"not attempted ({why})" if why else "not attempted"
    if step.outcome == "rolled-back":
        return f"rolled back: {error}" if error else "rolled back"
    return step.outcome + (f": {error}" if error else "")


def sentence(step: StepRecord, run: RunRecord | None) -> str:
    """One line of `fleet log`, times in UTC:
    `2026-11-28 14:03:07 alice@laptop: on franz, stopped and disabled X (was …) — ok`."""
    t = step.started if step.started is not None else step.ended
    when = _utc(t) if t is not None else "????-??-?? ??:??:??"
    return f"{when} {sentence_without_time(step, run)}"


def sentence_without_time(step: StepRecord, run: RunRecord | None) -> str:
    """The sentence without its time, for readers that show the time apart (an audit's
    timeline): `alice@laptop: on franz, stopped and disabled X (was …) — ok`."""
    who = run.operator if run is not None else "(unknown operator)"
    return f"{who}: on {step.host}, {_what(step)} — {_ending(step, run)}"


def iso_time(t: float | None) -> str | None:
    """A time as `fleet log --json` and the other JSON documents write it: ISO 8601, UTC."""
    return None if t is None else _utc(t, "%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# --since

_RELATIVE = re.compile(r"(\d+)\s*([mhdw])")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SINCE_FORMS = ("2026-11-28, 2026-11-28T14:03, '2026-11-28 14:03:07' (UTC; a trailing Z is allowed), "
               "or 30m, 2h, 3d, 1w ago")


def parse_since(text: str, *, now: float | None = None) -> float:
    """`--since`: an ISO date or time (naive means UTC) or a duration back from `now`."""
    s = text.strip()
    m = _RELATIVE.fullmatch(s.lower())
    if m:
        if len(m.group(1)) > 9:  # beyond 30 years in seconds; a float would overflow further on
            raise FleetError(f"--since {text!r} reaches back further than fleet keeps anything",
                             hint=f"accepted forms: {SINCE_FORMS}")
        return (time.time() if now is None else now) - int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|z|[+-]\d{2}:?\d{2})?", s):
        try:
            dt = datetime.fromisoformat(s[:-1].rstrip() if s[-1] in "Zz" else s)
        except ValueError:
            dt = None
        if dt is not None:
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            return dt.timestamp()
    raise FleetError(f"--since {text!r} is neither a date, a time nor a duration",
                     hint=f"accepted forms: {SINCE_FORMS}")

