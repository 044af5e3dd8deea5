"""The change record each host keeps of what fleet did to it: format, chain, append, read.  Pure.

Every apply step that changes a host also appends, in the same remote command, one JSON line to
`/var/lib/fleet/history.jsonl` on that host (root-owned, 0600): so a team's applies, made from
any checkout, stay with the fleet, and a checkout that never applied anything can read them.
This module owns, as plain data and shell text (nothing here does I/O):

* the record format: a `step` record (the intent, appended before the step's own command runs)
  and a later `outcome` record for the same step.  Each line starts with
  `{"v":1,"seq":N,"prev":"<sha256>",` — written by the HOST, which computes `prev` (the sha256 of
  the previous line's exact bytes, newline included) and `seq` from its own file under a
  `flock`, so two checkouts, or two steps of one run in parallel, never fork the chain;
* `verify`: the chain check over a file's lines — an edited, removed, forged or cut-off record,
  and a file that does not continue its rotated predecessor, each become a `Break` saying
  "history on HOST was edited or truncated after record N";
* `append_snippet` / `with_record` / `append_command`: the shell that appends one record
  (rotation by size with the chain carried over, `mkdir`/`chmod`, the lock);
* `read_section` / `parse_read`: the collection section that prints the records since the last
  one this checkout saw (bounded in bytes and records) and the pure parser of its output,
  which checks that the part collected before has not changed since (a digest the host
  computes over it) and that the new part continues it.

Why the record travels on stdin: the record is the first line of the step command's stdin,
read with the shell's `read` (which, on a pipe, never consumes past the newline, so a step that
reads stdin — a file write — gets the rest untouched).  On a command line it would be visible
in every local user's `ps` (a record may hold non-secret values of a 0600 env file) and limited
by Linux to 128 KiB per argument; on stdin it is neither.  It never holds a clear secret anyway:
it is built from a plan `Change` (masked already) and scrubbed like the journal.

The chain detects accidental and naive edits, truncation and removal; it is not a signature
(root on the host can rewrite the whole file consistently).  What a checkout collected before
is pinned by the digest check, so rewriting already-collected history is detected too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet.actions import Change
from fleet.errors import ParseError
from fleet.journal import _details, scrub
from fleet.remote import STATE
from fleet.textutil import digits, sha256_hex
from fleet.transport.protocol import quote

HISTORY_FILE = "history.jsonl"
LOCK_FILE = "history.lock"
RECORD_VERSION = 1
GENESIS = "0" * 64  # the `prev` of the first record a host ever holds
KINDS = ("step", "outcome", "ack")  # ack: an operator acknowledged a broken chain (fleet history ack)
OUTCOMES = ("ok", "failed", "skipped", "rolled-back")

ROTATE_BYTES = 1024 * 1024  # history.jsonl is renamed to history.jsonl.1 beyond this
KEEP_ROTATED = 4  # history.jsonl.1 … .4 are kept: at most ~5 MiB per host
MAX_RECORD_BYTES = 64 * 1024  # what fleet writes: a record is cut down to this (the diff first)
MAX_LINE_BYTES = 2 * MAX_RECORD_BYTES  # what fleet reads: a longer line is not a fleet record
HUGE_FILE_BYTES = 64 * 1024 * 1024  # a history file beyond this is not read at all
READ_MAX_BYTES = 4 * 1024 * 1024  # one collection's share of a host's history…
READ_MAX_RECORDS = 10_000  # …the rest comes with the next collection ("more")
APPEND_FAILED_EXIT = 97  # the step command was not run: its record could not be appended

_PREFIX = re.compile(r'\{"v":(\d+),"seq":([1-9]\d{0,15}),"prev":"([0-9a-f]{64})",')
_NUMBERED = re.compile(r'\{"v":1,"seq":([1-9]\d{0,15}),')  # what the appender's sed takes a number from
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"history\.jsonl(\.[1-9][0-9]?)?")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class AckedBreak:
    """One break an ack record acknowledges, as the acknowledging checkout knew it: where it is
    (`after`: the last intact record), the hash of that record as collected (GENESIS for 0) and
    what was found."""

    after: int
    intact: str
    detail: str


@dataclass(frozen=True)
class HistoryRecord:
    """One line of a host's history, parsed.  `hash` is the sha256 of the line and its newline
    (what the next record's `prev` must be); `line` is the exact text, kept for the cache."""

    seq: int
    prev: str
    hash: str
    kind: str  # step | outcome | ack
    run_id: str
    change_id: str
    host: str
    line: str
    action: str = ""
    target: str = ""
    service: str | None = None
    who: str = ""  # user@machine
    fleet: str = ""
    plan_id: str = ""
    lab: bool = False
    desired_hash: str = ""
    commit: str | None = None  # git commit of the desired state; None: not in git
    dirty: bool | None = None
    reason: str = ""
    before: str = ""
    after: str = ""
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)
    started: float | None = None  # step: when the intent was recorded (UNIX seconds, operator's clock)
    outcome: str | None = None  # outcome: ok | failed | skipped | rolled-back
    error: str = ""
    ended: float | None = None
    verified: bool = True  # both its chain links intact (set by verify)
    acked: tuple[AckedBreak, ...] = ()  # ack: the breaks it acknowledges (`who`, `reason`, `started` say the rest)

    @property
    def user(self) -> str:
        return self.who.rpartition("@")[0] or self.who

    @property
    def machine(self) -> str:
        return self.who.rpartition("@")[2] if "@" in self.who else ""

    @property
    def keys(self) -> tuple[str, ...]:
        """For a write-env step: the env keys it set, changed or removed."""
        return tuple(str(k[0]) for k in self.details.get("keys", ()) if isinstance(k, list | tuple) and k)


def iso(t: float) -> str:
    """UTC with microseconds: `2026-11-28T14:03:07.123456Z` (attribution windows need sub-seconds)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _from_iso(value: Any) -> float | None:
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z", value):
        return None
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def step_body(change: Change, *, run_id: str, who: str, desired_hash: str, started: float, fleet: str = "",
              plan_id: str = "", lab: bool = False, commit: str | None = None,
              dirty: bool | None = None) -> str:
    """The step record for `change` (its intent), as the one JSON line (without `v`, `seq` and
    `prev`, which the host adds) that travels to the host.  What changed is the journal's own
    data for the step (`fleet.journal._details`), scrubbed the same way."""
    record: dict[str, Any] = {
        "kind": "step", "run": run_id, "step": scrub(change.id), "host": change.host, "action": change.action,
        "target": scrub(change.target), "service": None if change.service is None else scrub(change.service),
        "who": scrub(who), "fleet": fleet, "plan": plan_id, "lab": lab, "desired": desired_hash,
        "commit": commit, "dirty": dirty, "reason": scrub(change.reason), "before": scrub(change.before),
        "after": scrub(change.after), "details": _details(change), "started": iso(started),
    }
    return _fit(record)


def outcome_body(change: Change, *, run_id: str, outcome: str, error: str = "", ended: float) -> str:
    """The outcome record of a step whose step record was appended before."""
    if outcome not in OUTCOMES:
        raise ValueError(f"step outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    record = {"kind": "outcome", "run": run_id, "step": scrub(change.id), "host": change.host,
              "action": change.action, "target": scrub(change.target), "outcome": outcome, "error": scrub(error),
              "ended": iso(ended)}
    return _fit(record)


def ack_body(host: str, breaks: Sequence[AckedBreak], *, ack_id: str, who: str, reason: str, at: float) -> str:
    """The record of an operator acknowledging the broken chain of `host`'s history (after looking
    into it): who, when, why, and which breaks.  Appended on the host like any record, so it is
    chained too and every checkout reads it; see `fleet.history_cache.judge_breaks` for what it
    covers.  The reason is operator text: scrubbed like the journal, escaped where it is shown."""
    if not breaks:
        raise ValueError(f"nothing to acknowledge on {host}")
    record = {"kind": "ack", "run": ack_id, "step": "ack", "host": host, "action": "ack-history", "target": "history",
              "who": scrub(who), "reason": scrub(reason), "started": iso(at),
              "breaks": [{"after": b.after, "intact": b.intact, "detail": b.detail[:300]} for b in breaks[:50]]}
    return _fit(record)


def _dumps(record: Mapping[str, Any]) -> str:
    # ASCII only: a line's bytes are its characters (awk's length, `head -c` offsets), and no
    # raw newline or control character can reach the file.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"), sort_keys=True)


def _fit(record: dict[str, Any]) -> str:
    """The record as one line of at most MAX_RECORD_BYTES (with the host's prefix): a unit diff
    is cut first, then the env key list, then every long text — and the record says so."""
    room = MAX_RECORD_BYTES - 120  # the host's `{"v":1,"seq":N,"prev":"…",` and the newline
    text = _dumps(record)
    details = record.get("details")
    if len(text) > room and isinstance(details, dict) and details.get("diff"):
        over = len(text) - room
        diff = str(details["diff"])
        details["diff_truncated"] = len(diff)
        details["diff"] = diff[: max(0, len(diff) - over - 200)]
        text = _dumps(record)
    if len(text) > room and isinstance(details, dict) and details.get("keys"):
        details["keys_truncated"] = len(details["keys"])
        details["keys"] = details["keys"][:50]
        text = _dumps(record)
    for limit, items in ((512, 50), (64, 10), (16, 3)):  # non-ASCII text escapes to 6 bytes a character
        if len(text) <= room:
            break
        record = {k: _cut(v, limit, items) if k in _FREE_TEXT else v for k, v in record.items()}
        record["truncated"] = True
        text = _dumps(record)
    if len(text) > room:  # cannot happen: every text is 16 characters and every list 3 items by now
        raise ValueError(f"a history record for {str(record.get('step'))[:80]} does not fit in {MAX_RECORD_BYTES} "
                         "bytes")
    return text


_FREE_TEXT = frozenset({"reason", "before", "after", "details", "error"})  # what may be cut; ids and times never


def _cut(value: Any, limit: int, items: int) -> Any:
    """Every text of `value` cut to `limit` characters and every list to `items` (keys kept)."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    if isinstance(value, dict):
        return {k: _cut(v, limit, items) for k, v in list(value.items())[:64]}
    if isinstance(value, list):
        return [_cut(v, limit, items) for v in value[:items]]
    return value


def line_hash(line: str) -> str:
    """What the next record's `prev` is: sha256 of the line's bytes and its newline, as the host's
    `tail -n 1 FILE | sha256sum` computes it."""
    return sha256_hex(line.encode("utf-8", "surrogateescape") + b"\n")


def host_line(body: str, *, seq: int, prev: str) -> str:
    """The line the host writes for `body` (what the append snippet does, for tests and the cache)."""
    return f'{{"v":{RECORD_VERSION},"seq":{seq},"prev":"{prev}",{body[1:]}'


def parse_record(line: str) -> HistoryRecord:
    """One line as a record; ValueError (saying what is wrong) if it is not a fleet record."""
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"a line of {len(line):,} bytes")
    m = _PREFIX.match(line)
    if m is None:
        raise ValueError("it does not start like a fleet record")
    if int(m.group(1)) != RECORD_VERSION:
        raise ValueError(f"record version {m.group(1)} (written by another version of fleet; upgrade)")
    try:
        d = json.loads(line)
    except ValueError:
        raise ValueError("it is not valid JSON") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    kind, run_id, change_id, host = d.get("kind"), d.get("run"), d.get("step"), d.get("host")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {str(kind)[:20]!r}")
    for name, v in (("run", run_id), ("step", change_id), ("host", host)):
        if not isinstance(v, str) or not v or len(v) > 4096:
            raise ValueError(f"no valid {name!r}")

    def text(key: str) -> str:
        v = d.get(key, "")
        if not isinstance(v, str):
            raise ValueError(f"{key!r} is not a string")
        return v

    common: dict[str, Any] = dict(seq=int(m.group(2)), prev=m.group(3), hash=line_hash(line), kind=kind,
                                  run_id=run_id, change_id=change_id, host=host, line=line, action=text("action"),
                                  target=text("target"))
    if kind == "ack":
        return HistoryRecord(**common, who=text("who"), reason=text("reason"), started=_required_time(d, "started"),
                             acked=_acked(d.get("breaks")))
    if kind == "outcome":
        outcome = d.get("outcome")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {str(outcome)[:20]!r}")
        ended = _from_iso(d.get("ended"))
        if ended is None:
            raise ValueError("no valid 'ended' time")
        return HistoryRecord(**common, outcome=outcome, error=text("error"), ended=ended)
    started = _from_iso(d.get("started"))
    if started is None:
        raise ValueError("no valid 'started' time")
    details = d.get("details", {})
    commit, dirty, service = d.get("commit"), d.get("dirty"), d.get("service")
    if not isinstance(details, dict):
        raise ValueError("'details' is not an object")
    if commit is not None and not (isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{7,64}", commit)):
        raise ValueError("'commit' is not a git commit id")
    if dirty is not None and not isinstance(dirty, bool):
        raise ValueError("'dirty' is not true, false or null")
    if service is not None and not isinstance(service, str):
        raise ValueError("'service' is not a string")
    return HistoryRecord(**common, service=service, who=text("who"), fleet=text("fleet"), plan_id=text("plan"),
                         lab=d.get("lab") is True, desired_hash=text("desired"), commit=commit, dirty=dirty,
                         reason=text("reason"), before=text("before"), after=text("after"), details=details,
                         started=started)


def _required_time(d: Mapping[str, Any], key: str) -> float:
    t = _from_iso(d.get(key))
    if t is None:
        raise ValueError(f"no valid {key!r} time")
    return t


def _acked(value: Any) -> tuple[AckedBreak, ...]:
    """An ack record's `breaks`: at least one, each with its record number, hash and detail."""
    if not isinstance(value, list) or not value or len(value) > 50:
        raise ValueError("an ack without a valid 'breaks' list")
    out: list[AckedBreak] = []
    for b in value:
        after, intact, detail = (b.get("after"), b.get("intact"), b.get("detail")) if isinstance(b, dict) else (
            None, None, None)
        if (not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 10**16
                or not isinstance(intact, str) or not _HEX64.fullmatch(intact) or not isinstance(detail, str)):
            raise ValueError("an ack's break is not {after, intact, detail}")
        out.append(AckedBreak(after, intact, detail))
    return tuple(out)


# --------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class Break:
    """Where a host's history stops being trustworthy: records up to `after` (a seq; 0 = none)
    are intact, something after them was edited, removed, forged or cut off."""

    host: str
    after: int
    detail: str

    @property
    def message(self) -> str:
        where = f"after record {self.after}" if self.after > 0 else "at its start"
        return f"history on {self.host} was edited or truncated {where}: {self.detail}"


def split_lines(data: str) -> tuple[list[str], bool]:
    """A file's text as lines (without newlines), and whether its last line was complete."""
    if not data:
        return [], True
    lines = data.split("\n")
    if lines[-1] == "":
        return lines[:-1], True
    return lines, False


def verify(lines: Sequence[str | None], *, host: str, prev: str | None = GENESIS, first_seq: int | None = None,
           complete: bool = True, cut: Iterable[int] = (), after: int = 0,
           predecessor: str = "") -> tuple[list[HistoryRecord], list[Break]]:
    """Check the chain of `lines` (one file, or files oldest first with nothing between them):
    each record's `seq` follows the previous record's and its `prev` is the previous line's hash.

    `prev`: the hash the first line must continue — GENESIS for a host's first file, the hash
    of the rotated predecessor's last line, of the last record this checkout collected — or
    None when unknown (the predecessor was rotated out; a record numbered 1 must still start at
    GENESIS).  `predecessor` names it in messages.  `first_seq`: the seq the first record must
    have, when known; `after`: the seq before the first line.  `complete`: False when the last
    line had no newline; `cut`: indexes of other lines that had none (the last of a file).
    A None line is one too long to be read (not a record).

    Returns every line that is a fleet record — each `verified` when both its links hold — and
    the breaks in order, each naming the last record before it that is intact.  Garbage is a
    break, not a record; the chain goes on from it as the host's appender does (it chains to
    whatever the last line is)."""
    cut_at = set(cut) | (set() if complete else {len(lines) - 1})
    records: list[HistoryRecord] = []
    breaks: list[Break] = []
    expect_prev, expect_seq = prev, first_seq
    prior = after  # seq of the last record read
    prev_is_record = False  # the line before this one was a record (a broken link may be its fault)
    prev_reported = False  # the line before this one was already reported (garbage, cut)
    for i, line in enumerate(lines):
        before = f"the line after record {prior}" if prior else "the first line"
        if line is None or i in cut_at:
            what = (f"{before} is longer than any fleet record" if line is None else
                    f"{before} is cut off ({len(line):,} bytes without a newline): the file was truncated, "
                    "or a write to it was interrupted")
            breaks.append(Break(host, prior, what))
            expect_prev = None if line is None else line_hash(line)
            expect_seq, prev_is_record, prev_reported = prior + 1 if prior else None, False, True
            continue
        try:
            rec = parse_record(line)
        except ValueError as e:
            breaks.append(Break(host, prior, f"{before} is not a fleet record ({e})"))
            # A record cut or edited into garbage may still show its number; the appender then
            # numbers the next record after it, as this does.
            m = _NUMBERED.match(line)
            numbered = int(m.group(1)) if m else prior
            expect_prev, expect_seq = line_hash(line), numbered + 1 if numbered else None
            prev_is_record, prev_reported = False, True
            continue
        problem, intact = "", prior
        if expect_seq is not None and rec.seq != expect_seq:
            if rec.seq > expect_seq:
                gone = (f"record {expect_seq} is" if rec.seq == expect_seq + 1
                        else f"records {expect_seq}–{rec.seq - 1} are")
                problem = f"{gone} missing (record {rec.seq} follows record {prior})"
            else:
                problem = f"record {rec.seq} follows record {prior}: the numbers go backwards"
        elif expect_prev is None and expect_seq is None and rec.seq == 1 and rec.prev != GENESIS:
            problem = "record 1 does not start the chain (its prev is not the genesis)"
        elif expect_prev is not None and rec.prev != expect_prev and not prev_reported:
            if prev_is_record:
                problem = f"record {rec.seq} does not continue record {prior}: one of the two was changed"
                intact = max(0, prior - 1)
            elif expect_prev == GENESIS:
                problem = f"record {rec.seq} does not start the chain (its prev is not the genesis)"
            else:
                problem = f"record {rec.seq} does not continue {predecessor or 'the record before it'}"
        if not problem and rec.host != host:
            problem = f"record {rec.seq} names another host ({rec.host[:40]!r})"
        # An ack exists to follow a break: chained to the exact bytes of a line that is not a
        # record (a cut or edited one), its own link still holds.
        link_ok = (not problem and not (expect_prev is not None and rec.prev != expect_prev)
                   and (not prev_reported or (rec.kind == "ack" and expect_prev is not None)))
        if problem:
            breaks.append(Break(host, intact, problem))
            if prev_is_record and intact < prior:
                records[-1] = _unverified(records[-1])
        if not link_ok and (i > 0 or problem):
            rec = _unverified(rec)
        records.append(rec)
        expect_prev, expect_seq, prior = rec.hash, rec.seq + 1, rec.seq
        prev_is_record, prev_reported = True, False
    return records, breaks


def _unverified(rec: HistoryRecord) -> HistoryRecord:
    if not rec.verified:
        return rec
    return dataclasses.replace(rec, verified=False)


# --------------------------------------------------------------------------- appending


def _state(state_dir: str) -> tuple[str, str, str]:
    return quote(state_dir), quote(f"{state_dir}/{HISTORY_FILE}"), quote(f"{state_dir}/{LOCK_FILE}")


def append_snippet(*, state_dir: str = STATE, rotate_bytes: int = ROTATE_BYTES, keep: int = KEEP_ROTATED) -> str:
    """Shell that appends the record on the first line of stdin to the host's history, then lets
    the rest of the command run; if it cannot, the command exits 97 before doing anything else
    (a change without its record would look like one made outside fleet).

    Runs in a subshell (no variable, umask or option leaks into the step).  Under an exclusive
    `flock` on history.lock: a cut-off last line gets its newline (so the record is a line of its
    own, and the cut stays visible to `verify`); beyond `rotate_bytes` the file becomes
    history.jsonl.1 (older ones shift, the oldest beyond `keep` is dropped); `prev` is the
    sha256 of the last line (of the rotated file when the new one is empty, so the chain
    carries over) and `seq` the last record's + 1.  Prints `@@history SEQ PREV`."""
    d, f, lock = _state(state_dir)
    genesis = GENESIS
    return f"""(
umask 077
IFS= read -r rec || {{ echo 'fleet: no history record on stdin' >&2; exit 1; }}
case $rec in '{{"'*'}}') ;; *) echo 'fleet: malformed history record' >&2; exit 1;; esac
mkdir -p -- {d} && chmod 700 -- {d} || exit 1
command -v flock >/dev/null 2>&1 || {{ echo 'fleet: flock (util-linux) is missing on this host' >&2; exit 1; }}
exec 9>>{lock} || exit 1
flock -w 60 9 || {{ echo 'fleet: the history lock stayed busy for 60 s' >&2; exit 1; }}
f={f}
if [ -s "$f" ] && [ "$(tail -c 1 -- "$f" | wc -l)" -eq 0 ]; then printf '\\n' >> "$f" || exit 1; fi
if [ -s "$f" ] && [ "$(wc -c < "$f")" -ge {int(rotate_bytes)} ]; then
  i={int(keep)}
  while [ "$i" -gt 1 ]; do j=$((i - 1)); if [ -e "$f.$j" ]; then mv -f -- "$f.$j" "$f.$i" || exit 1; fi; i=$j; done
  mv -f -- "$f" "$f.1" || exit 1
fi
if [ -s "$f" ]; then last=$f; elif [ -s "$f.1" ]; then last=$f.1; else last=; fi
re='s/^{{"v":1,"seq":\\([1-9][0-9]\\{{0,15\\}}\\),.*/\\1/p'
if [ -n "$last" ]; then
  prev=$(tail -n 1 -- "$last" | sha256sum) || exit 1; prev=${{prev%% *}}
  seq=$(tail -n 1 -- "$last" | sed -n "$re")
  [ -n "$seq" ] || seq=$(cat -- "$f.1" "$f" 2>/dev/null | sed -n "$re" | tail -n 1)
  seq=$(( ${{seq:-0}} + 1 ))
else
  prev={genesis}; seq=1
fi
: >> "$f" && chmod 600 -- "$f" || exit 1
printf '{{"v":1,"seq":%s,"prev":"%s",%s\\n' "$seq" "$prev" "${{rec#?}}" >> "$f" || exit 1
echo "@@history $seq $prev"
) || {{ echo 'fleet: nothing was done: the step could not be recorded in '{f} >&2; exit {APPEND_FAILED_EXIT}; }}
"""


def with_record(command: str, stdin: bytes | None, body: str, *, state_dir: str = STATE,
                rotate_bytes: int = ROTATE_BYTES, keep: int = KEEP_ROTATED) -> tuple[str, bytes]:
    """`command` (a step's remote command, and the stdin it was to be sent) with the record
    `body` appended first, in the same remote command: (command, stdin) to send instead."""
    if "\n" in body or not body.startswith('{"') or not body.endswith("}") or not body.isascii():
        raise ValueError("a history record is one JSON object on one line, in ASCII")
    snippet = append_snippet(state_dir=state_dir, rotate_bytes=rotate_bytes, keep=keep)
    return snippet + command, body.encode("ascii") + b"\n" + (stdin or b"")


def append_command(body: str, *, state_dir: str = STATE, rotate_bytes: int = ROTATE_BYTES,
                   keep: int = KEEP_ROTATED) -> tuple[str, bytes]:
    """Only the append (an outcome record, after its step): prints `@@ok` when done."""
    return with_record("echo @@ok\n", None, body, state_dir=state_dir, rotate_bytes=rotate_bytes, keep=keep)


def parse_appended(stdout: str) -> tuple[int, str] | None:
    """(seq, prev) of the record the snippet appended, from the command's output."""
    for line in stdout.splitlines():
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == "@@history" and digits(parts[1]) and _HEX64.fullmatch(parts[2]):
            return int(parts[1]), parts[2]
    return None


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class LastSeen:
    """The last record a checkout collected from a host: its seq and hash, and the digest of its
    file up to and including it (the host recomputes it to prove nothing before it changed)."""

    seq: int
    hash: str
    digest: str = ""  # "": not known (the last line read was not a record), the anchor is then checked alone


def read_section(last: LastSeen | None, *, state_dir: str = STATE, max_bytes: int = READ_MAX_BYTES,
                 max_records: int = READ_MAX_RECORDS, keep: int = KEEP_ROTATED) -> str:
    """The collection section (POSIX sh) printing a host's history since `last`.

    Output (`@@history`, then lines that never start with `@@`):
        v 1
        none | unreadable | busy   (then only the lock line and `end`)
        file NAME SIZE NL      each history file, oldest first (NL 0: no final newline)
        huge NAME SIZE         a file fleet will not read (then only the lock line and `end`)
        anchor none|ok|missing|changed
        in NAME                the lines below come from NAME
        |LINE                  a line, exactly; the first is the anchor when `anchor ok`
        long LINENO LENGTH     a line longer than fleet reads (not printed)
        more                   the bounds were reached: the rest comes with the next read
        digest SHA256          of the last printed line's file, up to and including it
        lock -|HOLDER-JSON     the host's apply lock, looked at AFTER the history was read: free,
                               or its holder record (a record read while the lock was then free
                               or another run's was appended by a run no longer holding the host)
        end
    With `anchor ok` the lines start at the last-seen record; otherwise (never seen, no longer
    there, or the part up to it changed) at the start of the oldest file.  When nothing follows
    the anchor (the common case: no change since the last collection), the digest is the one the
    anchor's check just computed over the same bytes — no second `head | sha256sum`."""
    d, f, lock = _state(state_dir)
    seq = last.seq if last else 0
    want = quote(last.digest if last else "")
    pattern = '{"v":1,"seq":'
    find = ("BEGIN { p = " + json.dumps(pattern) + " s \",\" } FNR == 1 { fi++; off = 0 } "
            "{ end = off + length($0) + 1 } index($0, p) == 1 { k = fi; n = FNR; o = end } { off = end } "
            "END { if (k) print k, n, o; else print 0, 0, 0 }")
    show = ("function base(p) { sub(/.*\\//, \"\", p); return p } "
            "FNR == 1 { fi++; off = 0 } { cur = off + length($0) + 1; at = off; off = cur } "
            "fi < sf || (fi == sf && FNR < sl) { next } "
            "fi != shown { print \"in \" base(FILENAME); shown = fi } "
            "{ w = length($0) > maxl ? 16 : length($0) + 2; "
            "  if (nr >= maxr || b + w > maxb) { print \"more\"; exit } nr++; b += w; lk = fi; lo = cur; "
            "  if (length($0) > maxl) print \"long \" FNR \" \" length($0); else print \"|\" $0 } "
            "END { print lk + 0, lo + 0 > \"/dev/stderr\" }")
    return f"""echo '@@history'
echo 'v 1'
(
d={d}; f={f}; S={int(seq)}; want={want}
if [ -e "$d" ] && ! [ -x "$d" ]; then echo unreadable; exit 0; fi
set --
i={int(keep)}; while [ "$i" -ge 1 ]; do [ -f "$f.$i" ] && set -- "$@" "$f.$i"; i=$((i - 1)); done
[ -f "$f" ] && set -- "$@" "$f"
if [ $# -eq 0 ]; then echo none; exit 0; fi
if [ -e {lock} ]; then exec 9<{lock} && flock -s -w 20 9 || {{ echo busy; exit 0; }}; fi
for x in "$@"; do
  sz=$(wc -c < "$x"); nl=$(tail -c 1 -- "$x" | wc -l)
  echo "file ${{x##*/}} $sz $nl"
  if [ "$sz" -gt {HUGE_FILE_BYTES} ]; then echo "huge ${{x##*/}} $sz"; exit 0; fi
done
from=1; line=1; anchor=none
if [ "$S" -gt 0 ]; then
  read -r k n o <<EOF
$(LC_ALL=C awk -v s="$S" {quote(find)} "$@")
EOF
  case "$k$n$o" in *[!0-9]*|'') k=0;; esac
  if [ "$k" -gt 0 ]; then
    i=0; for x in "$@"; do i=$((i + 1)); [ "$i" -eq "$k" ] && af=$x; done
    got=$(head -c "$o" -- "$af" | sha256sum); got=${{got%% *}}
    if [ -z "$want" ] || [ "$got" = "$want" ]; then from=$k; line=$n; anchor=ok; else anchor=changed; fi
  else anchor=missing; fi
fi
echo "anchor $anchor"
exec 4>&1
r=$(LC_ALL=C awk -v sf="$from" -v sl="$line" -v maxb={int(max_bytes)} -v maxr={int(max_records)} \\
  -v maxl={MAX_LINE_BYTES} {quote(show)} "$@" 2>&1 >&4)
read -r lk lo <<EOF
$r
EOF
case "$lk$lo" in *[!0-9]*|'') lk=0;; esac
if [ "$anchor" = ok ] && [ "$lk" -eq "$k" ] && [ "$lo" -eq "$o" ]; then echo "digest $got"
elif [ "$lk" -gt 0 ]; then
  i=0; for x in "$@"; do i=$((i + 1)); [ "$i" -eq "$lk" ] && lf=$x; done
  got=$(head -c "$lo" -- "$lf" | sha256sum); echo "digest ${{got%% *}}"
fi
)
if [ -d {d}/lock ]; then printf 'lock '; head -c 2048 -- {d}/lock/holder 2>/dev/null | tr -d '\\n\\r'; echo
else echo 'lock -'; fi
echo end
"""


@dataclass(frozen=True)
class HistoryRead:
    """What one collection learnt of a host's history."""

    host: str
    status: str  # ok | none (no history yet) | busy | unreadable | refused (a file too large)
    records: tuple[HistoryRecord, ...] = ()  # new since the last seen record, in order
    breaks: tuple[Break, ...] = ()
    last_seen: LastSeen | None = None  # what to pass to the next read_section
    more: bool = False  # bounded: read again for the rest
    lock_held: bool | None = None  # None: not said
    lock_run: str = ""  # the run id in the lock's holder record ("" if none or not yet set)
    notes: tuple[str, ...] = ()  # not breaks: records rotated out before this checkout saw them…


# A little more than the script's own bounds: anything beyond is not the script's output.
def _limits(max_bytes: int, max_records: int) -> tuple[int, int]:
    return max_bytes + 64 * 1024, max_records + 4 * (KEEP_ROTATED + 1) + 32


def parse_read(host: str, body: str, last: LastSeen | None, *, known: Mapping[int, str] | None = None,
               max_bytes: int = READ_MAX_BYTES, max_records: int = READ_MAX_RECORDS) -> HistoryRead:
    """Parse the body of the `@@history` section (the text after its header line) for `host`.

    `last` must be what the section was built with; `known`: seq → hash of the records this
    checkout holds for the host, to name the record that changed when the collected part no
    longer matches.  Output the script cannot have printed raises ParseError (section
    `history`), and so does more of it than the bounds allow (before anything is kept); a
    broken chain is not an error but `breaks`."""
    byte_cap, line_cap = _limits(max_bytes, max_records)
    if len(body) > byte_cap:
        raise _refuse(host, f"{byte_cap:,} bytes")
    if body.count("\n") > line_cap:
        raise _refuse(host, f"{line_cap:,} lines")
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != "v 1":
        raise ParseError(f"{host}: the history section does not start with its version line", host=host,
                         section="history")
    if len(lines) < 3 or lines[-1] != "end" or not lines[-2].startswith("lock "):
        raise ParseError(f"{host}: the history section is truncated", host=host, section="history",
                         hint="the connection dropped or the output was cut; run again")
    lock_held, lock_run = _lock(lines[-2][5:])
    status = "ok"
    files: list[tuple[str, int, bool]] = []  # (name, size, ends with a newline)
    anchor = ""
    printed: list[tuple[str, str | None]] = []  # (file, line) as printed; None: a line too long to print
    current = ""
    more = False
    digest = ""
    huge = ""
    for line in lines[1:-2]:
        if line.startswith("|"):
            if not current:
                raise _malformed(host, line)
            if len(line) - 1 > MAX_LINE_BYTES:
                raise _refuse(host, f"a line of {MAX_LINE_BYTES:,} bytes")
            printed.append((current, line[1:]))
            continue
        word, _, rest = line.partition(" ")
        if line in ("none", "busy", "unreadable") and status == "ok" and not files:
            status = line
        elif word == "file" and not anchor and status == "ok":
            parts = rest.split(" ")
            if (len(parts) != 3 or not _FILE_NAME.fullmatch(parts[0]) or not digits(parts[1])
                    or parts[2] not in ("0", "1") or len(files) > KEEP_ROTATED):
                raise _malformed(host, line)
            files.append((parts[0], int(parts[1]), parts[2] == "1"))
        elif word == "huge" and files and not anchor:
            status, huge = "refused", rest
        elif word == "anchor" and rest in ("none", "ok", "missing", "changed") and files and not anchor:
            anchor = rest
        elif word == "in" and anchor and rest in {name for name, _, _ in files}:
            current = rest
        elif word == "long" and current and len(rest.split(" ")) == 2 and digits(rest.replace(" ", "")):
            printed.append((current, None))
        elif line == "more" and anchor and not more:
            more = True
        elif word == "digest" and anchor and _HEX64.fullmatch(rest) and not digest:
            digest = rest
        else:
            raise _malformed(host, line)
    if status == "none":
        if last is not None:  # every file is gone, the last one this checkout read included
            return HistoryRead(host, "ok", breaks=(Break(host, 0, f"its history files are gone (record {last.seq} "
                                                              "had been collected)"),),
                               lock_held=lock_held, lock_run=lock_run)
        return HistoryRead(host, "none", lock_held=lock_held, lock_run=lock_run)
    if status != "ok":
        breaks: tuple[Break, ...] = ()
        if status == "refused":
            name, _, size = huge.partition(" ")
            breaks = (Break(host, last.seq if last else 0, (
                f"{name[:60]} is {size[:20]} bytes, far beyond what fleet writes (rotation at {ROTATE_BYTES:,} "
                "bytes); fleet does not read it")),)
        return HistoryRead(host, status, breaks=breaks, last_seen=last, lock_held=lock_held, lock_run=lock_run)
    if not anchor:
        raise ParseError(f"{host}: the history section lacks its anchor line", host=host, section="history")
    return _judge(host, files, anchor, printed, more, digest, last, known or {}, lock_held, lock_run)


def _lock(rest: str) -> tuple[bool, str]:
    """(held, the holder's run id) from the lock line; a holder record fleet cannot read still holds."""
    if rest == "-":
        return False, ""
    try:
        holder = json.loads(rest)
    except ValueError:
        return True, ""
    run = holder.get("run_id", "") if isinstance(holder, dict) else ""
    return True, run if isinstance(run, str) and len(run) <= 200 else ""


def _refuse(host: str, what: str) -> ParseError:
    return ParseError(f"{host}: the history section of the collection output holds more than {what}; fleet "
                      "refuses it", host=host, section="history",
                      hint="inspect /var/lib/fleet/history.jsonl* on the host by hand")


def _malformed(host: str, line: str) -> ParseError:
    return ParseError(f"{host}: unexpected line in the history section: {line[:80]!r}", host=host,
                      section="history")


def _judge(host: str, files: list[tuple[str, int, bool]], anchor: str, printed: list[tuple[str, str | None]],
           more: bool, digest: str, last: LastSeen | None, known: Mapping[int, str], lock_held: bool | None,
           lock_run: str) -> HistoryRead:
    breaks: list[Break] = []
    notes: list[str] = []
    if anchor == "ok":
        anchor_line = printed[0][1] if printed else None
        if last is None or anchor_line is None:
            raise ParseError(f"{host}: the history section claims a last-seen record it was not asked about",
                             host=host, section="history")
        if line_hash(anchor_line) != last.hash:
            breaks.append(Break(host, last.seq - 1, f"record {last.seq}, collected before, has changed since"))
        prev: str | None = last.hash
        first_seq: int | None = last.seq + 1
        after = last.seq
        printed = printed[1:]
    else:
        prev, first_seq, after = None, None, 0
    # A file without a final newline: the last line printed from it is cut — unless the bounds
    # stopped the printing inside that file (the next read gets to its end).
    no_newline = {name for name, size, nl in files if size > 0 and not nl}
    cut = [i for i, (name, _) in enumerate(printed) if name in no_newline
           and ((i + 1 == len(printed) and not more) or (i + 1 < len(printed) and printed[i + 1][0] != name))]
    records, chain = verify([t for _, t in printed], host=host, prev=prev, first_seq=first_seq, cut=cut,
                            after=after, predecessor=f"record {after}, collected before" if after else "")
    breaks += chain
    if last is not None and anchor in ("missing", "changed"):
        lost = _lost(host, last, anchor, records, known, notes)
        # One edit, one finding: where the copy collected before names the changed record, that
        # says more than the chain break the same edit caused.
        named = {b.after for b in lost}
        breaks = [b for b in breaks if b.after not in named] + lost
    elif anchor == "none" and records and records[0].seq > 1:
        notes.append(f"records 1–{records[0].seq - 1} on {host} were rotated out before this checkout read them")
    new_last = last
    if records:
        tail_is_record = printed[-1][1] == records[-1].line
        new_last = LastSeen(records[-1].seq, records[-1].hash, digest if tail_is_record else "")
    elif anchor == "ok" and last is not None:
        new_last = LastSeen(last.seq, last.hash, digest or last.digest)
    return HistoryRead(host, "ok", tuple(records), tuple(breaks), new_last, more, lock_held, lock_run, tuple(notes))


def _lost(host: str, last: LastSeen, anchor: str, records: list[HistoryRecord], known: Mapping[int, str],
          notes: list[str]) -> list[Break]:
    """The last-seen record is gone, or the part up to it changed: say what, as precisely as the
    copies this checkout kept (`known`) allow."""
    by_seq = {r.seq: r for r in records}
    low, top = (min(by_seq), max(by_seq)) if by_seq else (0, 0)
    for seq in sorted(s for s in known if low <= s <= min(top, last.seq)) if by_seq else ():
        r = by_seq.get(seq)
        if r is None:
            return [Break(host, seq - 1, f"record {seq}, collected before, is gone or no longer a record")]
        if r.hash != known[seq]:
            return [Break(host, seq - 1, f"record {seq} differs from the copy collected before")]
    if top < last.seq and (not by_seq or low <= last.seq):
        return [Break(host, top, f"record {last.seq} had been collected, the history now ends at record {top}"
                      if top else f"record {last.seq} had been collected, no record is left")]
    if by_seq and low > last.seq:
        if low == last.seq + 1 and records[0].prev == last.hash:
            return []  # the last-seen record's file was rotated out, and the chain continues exactly
        if low > last.seq + 1:
            notes.append(f"records {last.seq + 1}–{low - 1} on {host} were rotated out before this checkout read "
                         "them")
            return []
        return [Break(host, last.seq, f"record {low} does not continue record {last.seq}, collected before")]
    if anchor == "missing":
        return [Break(host, max((s for s in by_seq if s < last.seq), default=0),
                      f"record {last.seq}, collected before, is gone")]
    intact = max((s for s in by_seq if s < last.seq and known.get(s) == by_seq[s].hash), default=0)
    return [Break(host, intact, f"the history up to record {last.seq} changed since it was collected")]
