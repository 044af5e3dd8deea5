"""The hosts' history records, collected into the local journal: a cache any checkout can rebuild.

Each host keeps the record of what fleet did to it (fleet/history.py).  A collection reads the
part this checkout has not seen yet; `HistoryCache.merge` stores it in three tables of the
journal (schema version 3): `host_records` (every record, its exact line, keyed by host and
line hash — so merging the same read twice, or the same record from two reads, stores it once),
`host_history` (per host: the last record read, for the next read, and the host's apply lock as
seen then) and `host_breaks` (every broken chain ever found, kept: a hand edit stays a finding
after the next clean read).  Records are never deleted or rewritten: an edited record on the
host arrives as a new line (a new hash) next to the original, which the cache still holds.

`host_steps` joins step records with their outcome records and says what an unanswered step
is (the "interrupted" rule below); `merged_log` gives `fleet log` the journal's own steps plus
every step known only from the hosts, in the journal's `StepRecord`/`RunRecord` shapes.

When a step record has no outcome record (the rule, applied at read time, never stored):
* it is **interrupted** once its run is known to be over on that host — the local journal
  says the run ended; or a later record on the same host belongs to another run (a run
  appends only while it holds the host's apply lock, so another run appending means this
  run's lock was released or broken); or, at the last collection, the host's lock was free
  or held by another run (the lock is looked at after the records are read, so the run had
  appended this record and no longer held the host);
* otherwise it is **running**: its run may still hold the host (the lock was held by it, by a
  holder not naming a run yet, or was never seen).
An outcome record arriving later always wins: nothing is decided for good.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleet.history import Break, HistoryRead, HistoryRecord, LastSeen, parse_record
from fleet.journal import Journal, RunRecord, StepRecord

RUNNING = "running"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class LockSeen:
    """A host's apply lock as the last collection saw it."""

    held: bool | None  # None: not known
    run_id: str  # the holder's run id; "" when free, unknown, or not named yet
    collected: float


@dataclass(frozen=True)
class Merged:
    host: str
    added: int  # records new to this checkout
    already: int  # records it held already
    new_breaks: tuple[Break, ...]  # breaks not found before


@dataclass(frozen=True)
class KnownBreak:
    brk: Break
    found: float


@dataclass(frozen=True)
class AckSeen:
    """An ack record (an operator acknowledged a broken chain) and when this checkout read it."""

    record: HistoryRecord
    collected: float


@dataclass(frozen=True)
class HostStep:
    """A step as a host's history tells it: the intent, its outcome record if any, and its state."""

    record: HistoryRecord
    outcome_record: HistoryRecord | None
    state: str  # the outcome (ok | failed | skipped | rolled-back), or running | interrupted

    @property
    def outcome(self) -> str | None:
        """What attribution and the journal's shapes take: None while unanswered."""
        return self.outcome_record.outcome if self.outcome_record is not None else None


class HistoryCache:
    """The hosts' history held in a journal.  Thread-safe as the journal is (its lock)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    # -- what the next read needs -----------------------------------------------------------------

    def last_seen(self, host: str) -> LastSeen | None:
        with self.journal._writing("read the hosts' history") as conn:  # the journal's one connection and lock
            row = conn.execute("SELECT seq, hash, digest FROM host_history WHERE host = ?", (host,)).fetchone()
        if row is None or row[0] is None:
            return None
        return LastSeen(int(row[0]), str(row[1]), str(row[2] or ""))

    def known(self, host: str) -> dict[int, str]:
        """seq → hash of the record first collected with that number (the copy to compare with)."""
        with self.journal._writing("read the hosts' history") as conn:
            rows = conn.execute("SELECT seq, hash FROM host_records WHERE host = ? AND verified = 1 "
                                "ORDER BY collected DESC, seq DESC", (host,)).fetchall()
        return {int(seq): str(h) for seq, h in rows}  # the earliest collected wins: it comes last

    def forget(self, hosts: Iterable[str]) -> int:
        """Drop everything collected from these hosts: records, read position, breaks.  For hosts
        that were destroyed and made anew under the same names (`fleet lab down`/`up`): their old
        history went with them, and keeping it would report every new host's history as "files
        gone" for good.  Returns how many hosts had anything cached."""
        names = sorted(set(hosts))
        if not names:
            return 0
        marks = ", ".join("?" * len(names))
        with self.journal._transaction("forget the hosts' history") as conn:
            had = conn.execute(f"SELECT COUNT(*) FROM host_history WHERE host IN ({marks})", names).fetchone()[0]
            for table in ("host_records", "host_history", "host_breaks"):  # fixed names, values bound
                conn.execute(f"DELETE FROM {table} WHERE host IN ({marks})", names)
        return int(had)

    # -- merging ------------------------------------------------------------------------------------

    def merge(self, read: HistoryRead, *, now: float | None = None) -> Merged:
        """Store what one read of `read.host` learnt, in one transaction; idempotent."""
        at = time.time() if now is None else now
        added = 0
        new_breaks: list[Break] = []
        with self.journal._transaction(f"store the history of {read.host}") as conn:
            for r in read.records:
                t = r.ended if r.kind == "outcome" else r.started  # a step: its intent; an ack: when it was made
                cur = conn.execute(
                    "INSERT OR IGNORE INTO host_records (host, hash, seq, prev, kind, run_id, change_id, time,"
                    " outcome, verified, line, collected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (read.host, r.hash, r.seq, r.prev, r.kind, r.run_id, r.change_id, t, r.outcome,
                     int(r.verified), r.line, at))
                added += cur.rowcount
            for b in read.breaks:
                had = conn.execute("SELECT 1 FROM host_breaks WHERE host = ? AND after = ? AND detail = ?",
                                   (read.host, b.after, b.detail)).fetchone()
                # `found` is the LAST read that reported it: the same edit made again after an
                # operator acknowledged the first one is a new finding (`judge_breaks`).
                conn.execute("INSERT INTO host_breaks (host, after, detail, found) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(host, after, detail) DO UPDATE SET found = excluded.found",
                             (read.host, b.after, b.detail, at))
                if had is None:
                    new_breaks.append(b)
            last = read.last_seen
            conn.execute(
                "INSERT INTO host_history (host, seq, hash, digest, collected, lock_held, lock_run)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(host) DO UPDATE SET seq = excluded.seq,"
                " hash = excluded.hash, digest = excluded.digest, collected = excluded.collected,"
                " lock_held = excluded.lock_held, lock_run = excluded.lock_run",
                (read.host, last.seq if last else None, last.hash if last else None,
                 last.digest if last else None, at, None if read.lock_held is None else int(read.lock_held),
                 read.lock_run))
        return Merged(read.host, added, len(read.records) - added, tuple(new_breaks))

    # -- reading ------------------------------------------------------------------------------------

    def records(self, *, host: str | None = None, run_id: str | None = None) -> list[HistoryRecord]:
        """Every collected record (hosts by name, then in each host's order); one per step and kind:
        when a host's file was edited, the copy first collected (verified) is the one kept."""
        clauses, args = [], []
        if host is not None:
            clauses.append("host = ?")
            args.append(host)
        if run_id is not None:
            clauses.append("run_id = ?")
            args.append(run_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.journal._writing("read the hosts' history") as conn:
            rows = conn.execute(f"SELECT line, verified FROM host_records{where} "
                                "ORDER BY host, verified DESC, collected, seq", args).fetchall()
        chosen: dict[tuple[str, str, str, str], HistoryRecord] = {}
        for line, verified in rows:
            try:
                r = parse_record(str(line))
            except ValueError:  # a hand-edited cache row: it was a record when stored
                continue
            key = (r.host, r.run_id, r.change_id, r.kind)
            if key not in chosen:
                chosen[key] = r if verified else dataclasses.replace(r, verified=False)
        return sorted(chosen.values(), key=lambda r: (r.host, r.seq))

    def breaks(self, host: str | None = None) -> list[KnownBreak]:
        where, args = ("WHERE host = ?", (host,)) if host is not None else ("", ())
        with self.journal._writing("read the hosts' history") as conn:
            rows = conn.execute(f"SELECT host, after, detail, found FROM host_breaks {where} "
                                "ORDER BY host, after, found", args).fetchall()
        return [KnownBreak(Break(str(h), int(a), str(d)), float(f)) for h, a, d, f in rows]

    def acks(self, host: str) -> list[AckSeen]:
        """The ack records collected from `host` whose chain links held, with when they were read."""
        with self.journal._writing("read the hosts' history") as conn:
            rows = conn.execute("SELECT line, collected FROM host_records WHERE host = ? AND kind = 'ack' "
                                "AND verified = 1 ORDER BY seq", (host,)).fetchall()
        out: list[AckSeen] = []
        for line, collected in rows:
            try:
                out.append(AckSeen(parse_record(str(line)), float(collected)))
            except ValueError:  # a hand-edited cache row
                continue
        return out

    def locks(self) -> dict[str, LockSeen]:
        with self.journal._writing("read the hosts' history") as conn:
            rows = conn.execute("SELECT host, lock_held, lock_run, collected FROM host_history").fetchall()
        return {str(h): LockSeen(None if held is None else bool(held), str(run or ""), float(c))
                for h, held, run, c in rows}


# --------------------------------------------------------------------------- steps and their state


def host_steps(records: Iterable[HistoryRecord], *, locks: Mapping[str, LockSeen] | None = None,
               ended_runs: Collection[str] = ()) -> list[HostStep]:
    """Step records joined with their outcome records, each with its state (module docstring)."""
    locks = locks or {}
    by_host: dict[str, list[HistoryRecord]] = {}
    for r in records:
        if r.kind in ("step", "outcome"):  # an ack is no run's: it says nothing of a step's state
            by_host.setdefault(r.host, []).append(r)
    out: list[HostStep] = []
    for host, recs in by_host.items():
        recs.sort(key=lambda r: r.seq)
        outcomes = {(r.run_id, r.change_id): r for r in recs if r.kind == "outcome"}
        last_other: dict[str, int] = {}  # run id -> the highest seq of a record of ANOTHER run
        top_by_run: dict[str, int] = {}
        for r in recs:
            top_by_run[r.run_id] = max(top_by_run.get(r.run_id, 0), r.seq)
        lock = locks.get(host)
        for r in recs:
            if r.kind != "step":
                continue
            done = outcomes.get((r.run_id, r.change_id))
            if done is not None:
                out.append(HostStep(r, done, str(done.outcome)))
                continue
            if r.run_id not in last_other:
                last_other[r.run_id] = max((s for run, s in top_by_run.items() if run != r.run_id), default=0)
            over = (r.run_id in ended_runs or last_other[r.run_id] > r.seq
                    or (lock is not None and lock.held is False)
                    or (lock is not None and lock.held is True and lock.run_id not in ("", r.run_id)))
            out.append(HostStep(r, None, INTERRUPTED if over else RUNNING))
    out.sort(key=lambda s: (s.record.started or 0.0, s.record.host, s.record.seq))
    return out


# --------------------------------------------------------------------------- acknowledged breaks


def judge_breaks(breaks: Iterable[KnownBreak], acks: Iterable[AckSeen]) -> tuple[
        list[tuple[KnownBreak, AckSeen]], list[KnownBreak]]:
    """(acknowledged breaks, each with the ack that covers it; open breaks).

    An ack record covers a break when it names the break's position (`after`), comes after it
    in the host's chain (its seq is beyond `after`), its own chain links held when it was read
    (a forged or edited ack is a break itself, never an acknowledgement), and the break was
    last reported no later than the ack was read: the same edit made again, or any edit found
    by a later read — before the ack in the chain or after it — is a new finding."""
    acks = [a for a in acks if a.record.kind == "ack" and a.record.verified]
    acknowledged: list[tuple[KnownBreak, AckSeen]] = []
    open_: list[KnownBreak] = []
    for kb in breaks:
        by = next((a for a in acks if a.record.host == kb.brk.host and kb.brk.after < a.record.seq
                   and kb.found <= a.collected and any(x.after == kb.brk.after for x in a.record.acked)), None)
        if by is None:
            open_.append(kb)
        else:
            acknowledged.append((kb, by))
    return acknowledged, open_


# --------------------------------------------------------------------------- `fleet history`: the runs


@dataclass(frozen=True)
class RunSummary:
    """One run as `fleet history` lists it: who, from which desired state, where, how it went."""

    run_id: str
    started: float
    who: str  # user@machine
    commit: str | None  # git commit of the desired state; None: not in git, or not known
    dirty: bool | None
    hosts: tuple[str, ...]  # the hosts it has steps on
    ok: int = 0
    failed: int = 0  # failed or rolled back
    skipped: int = 0
    interrupted: int = 0
    running: int = 0
    on_hosts: bool = False  # its steps are (also) in the hosts' history, not only this journal


def summarize_runs(found: Iterable[HostStep], local_steps: Iterable[StepRecord], local_runs: Iterable[RunRecord],
                   *, since: float | None = None) -> list[RunSummary]:
    """Every run with a step, newest first: the hosts' history (`host_steps`) merged with this
    checkout's journal, each step counted once.  A step the host left unanswered takes the
    journal's outcome when this checkout has one; a journal step with no outcome is interrupted
    once its run ended, running otherwise."""
    runs = {r.id: r for r in local_runs}
    states: dict[tuple[str, str], tuple[str, str]] = {}  # (run, step) -> (host, state)
    first: dict[str, HistoryRecord] = {}
    for hs in found:
        r = hs.record
        states[(r.run_id, r.change_id)] = (r.host, hs.state)
        if r.run_id not in first or (r.started or 0.0) < (first[r.run_id].started or 0.0):
            first[r.run_id] = r
    for st in local_steps:
        key = (st.run_id, st.change_id)
        run = runs.get(st.run_id)
        mine = st.outcome or (INTERRUPTED if run is not None and run.ended is not None else RUNNING)
        if key not in states or (states[key][1] in (RUNNING, INTERRUPTED) and st.outcome):
            states[key] = (st.host, mine)
    by_run: dict[str, list[tuple[str, str]]] = {}
    for (run_id, _), hs_state in states.items():
        by_run.setdefault(run_id, []).append(hs_state)
    out: list[RunSummary] = []
    for run_id, steps in by_run.items():
        local, rec = runs.get(run_id), first.get(run_id)
        if local is not None:
            started, who, commit, dirty = local.started, local.operator, local.commit, local.dirty
        else:
            assert rec is not None  # a run with no journal row has host records
            started, who, commit, dirty = rec.started or 0.0, rec.who or "(unknown operator)", rec.commit, rec.dirty
        if since is not None and started < since:
            continue
        count = {k: sum(1 for _, state in steps if state == k) for k in ("ok", "skipped", INTERRUPTED, RUNNING)}
        out.append(RunSummary(run_id, started, who, commit, dirty, tuple(sorted({h for h, _ in steps})),
                              ok=count["ok"], failed=sum(1 for _, x in steps if x in ("failed", "rolled-back")),
                              skipped=count["skipped"], interrupted=count[INTERRUPTED], running=count[RUNNING],
                              on_hosts=rec is not None))
    out.sort(key=lambda x: (x.started, x.run_id), reverse=True)
    return out


# --------------------------------------------------------------------------- `fleet log` from both


def merged_log(journal: Journal, cache: HistoryCache, *, host: str | None = None, since: float | None = None,
               run_id: str | None = None) -> tuple[list[StepRecord], list[RunRecord]]:
    """The journal's steps and every step known only from the hosts' history, in the journal's
    shapes (for `fleet.journal.sentence` and `log_json`), in the order they started.

    A step both knows (this checkout's own runs) is shown once, from the journal — with the
    host's outcome when the journal has none (this checkout died after the host recorded it)."""
    local = journal.steps(host=host, since=since, run_id=run_id)
    runs = {r.id: r for r in journal.runs()}
    ended = {r.id for r in runs.values() if r.ended is not None}
    found = host_steps(cache.records(host=host, run_id=run_id), locks=cache.locks(), ended_runs=ended)
    by_key = {(s.run_id, s.change_id): i for i, s in enumerate(local)}
    steps = list(local)
    only_hosts: dict[str, list[HostStep]] = {}
    for hs in found:
        r = hs.record
        key = (r.run_id, r.change_id)
        if key in by_key:
            i = by_key[key]
            if steps[i].outcome is None and hs.outcome_record is not None:
                o = hs.outcome_record
                steps[i] = dataclasses.replace(steps[i], outcome=o.outcome, ended=o.ended, error=o.error or None)
            continue
        if since is not None and (r.started is None or r.started < since):
            continue
        steps.append(as_step_record(hs))
        only_hosts.setdefault(r.run_id, []).append(hs)
    for rid, hss in only_hosts.items():
        if rid not in runs:
            runs[rid] = as_run_record(rid, hss)
    steps.sort(key=lambda s: (s.started if s.started is not None else 0.0, s.host, s.id))
    wanted = {s.run_id for s in steps}
    return steps, [r for r in sorted(runs.values(), key=lambda r: (r.started, r.id)) if r.id in wanted]


def as_step_record(hs: HostStep) -> StepRecord:
    """A host-only step in the journal's shape (id 0: it has no row in this journal)."""
    r, o = hs.record, hs.outcome_record
    return StepRecord(id=0, run_id=r.run_id, change_id=r.change_id, host=r.host, action=r.action, target=r.target,
                      service=r.service, reason=r.reason, before=r.before, after=r.after, details=dict(r.details),
                      started=r.started, ended=o.ended if o else None, outcome=o.outcome if o else None,
                      error=(o.error or None) if o else None)


def as_run_record(run_id: str, steps: Sequence[HostStep]) -> RunRecord:
    """A run this checkout did not make, as its hosts' records describe it."""
    first = min(steps, key=lambda s: s.record.started or 0.0).record
    states = {s.state for s in steps}
    if INTERRUPTED in states:
        outcome: str | None = INTERRUPTED
    elif RUNNING in states:
        outcome = None
    elif states & {"failed", "rolled-back"}:
        outcome = "failed"
    else:
        outcome = "ok"
    ends = [s.outcome_record.ended for s in steps if s.outcome_record is not None and s.outcome_record.ended]
    commit = ""
    if first.commit:
        commit = f"; desired state at git {first.commit[:12]}" + (" (dirty)" if first.dirty else "")
    return RunRecord(id=run_id, operator=first.who or "(unknown operator)", started=first.started or 0.0,
                     ended=max(ends) if ends and outcome is not None else None, plan_id=first.plan_id, plan_hash="",
                     desired_hash=first.desired_hash, fleet=first.fleet, lab=first.lab, outcome=outcome,
                     summary=f"known from the hosts' history{commit}", commit=first.commit, dirty=first.dirty)
