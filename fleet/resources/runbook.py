"""A declared move's runbook, carried out by `fleet apply`: the steps around the plan's own
changes that make a move of Postgres (`method = "streaming-replica"`) safe, and the resource
that owns their actions.  A Redis move (`method = "redis-replica"`) has the same steps in the
same layout; what they do on its hosts is fleet/resources/runbook_redis.py's (`_is_redis`).

The plan stays pure data.  A declared move adds changes of its own to the plan, each in a wave
of its own, chained, around the waves the ordinary diff made:

  1. move-check      (target) the data gates asked again of the hosts at apply time: the source
                     is a primary, the target a standby streaming from it, and the standby has
                     replayed what the primary had written when asked (waiting up to the start
                     timeout);
  2. move-read-only  (source) `default_transaction_read_only` set (ALTER SYSTEM, reloaded), the
                     sessions inside a transaction ended; gate: a new session is read-only;
  3. move-caught-up  (target) the standby has replayed the read-only source's last WAL position:
                     0 bytes behind;
  4. move-promote    (target) `pg_promote()`; gate: the target is out of recovery;
  5. the plan's own changes — env files rewritten, Mastodon restarted wave by wave behind its
     health gates (every change of the ordinary first wave waits for the promote);
  6. move-stop-source (source) the old cluster stopped, after every start and restart of the plan.

The executor halts at the first step that fails, so a gate that does not pass leaves every env
file as it was: the fleet still points at the source.  A failed catch-up or promote puts the
source back to read-write (its rollback) while the target is still a standby.

The gates' answers at plan time are the move-check's `before` (shown by `fleet plan`); they
change with every WAL record, so a saved plan's verification leaves that field out
(`volatile_fields`): what counts is the check made when the step runs.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from fleet.actions import Action, Change, MovePayload, ObservedKind, Phase
from fleet.errors import FleetError
from fleet.model import DEFAULT_PORTS, Desired, HostResult, HostState, Kind, MoveSpec
from fleet.moves import Gate, data_gates
from fleet.policy import resolve_host
from fleet.resources import runbook_quiet, runbook_redis
from fleet.resources.base import PLAIN, ActionSpec, Detail, Execution, PayloadError, Resource, StepView, empty
from fleet.resources.stores import clusters_of
from fleet.textutil import digits

# The runbook's steps before the plan's own changes, in order; the stop of the source comes last.
# Sidekiq's quiet and drain (fleet/resources/runbook_quiet.py) come only when the run has Sidekiq.
BEFORE = (Action.MOVE_CHECK, Action.MOVE_QUIET, Action.MOVE_DRAINED, Action.MOVE_READ_ONLY, Action.MOVE_CAUGHT_UP,
          Action.MOVE_PROMOTE)
LAST = Action.MOVE_STOP_SOURCE
ON_SOURCE = frozenset({Action.MOVE_READ_ONLY, Action.MOVE_STOP_SOURCE})

_LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")
_CLUSTER_UNIT = re.compile(r"postgresql@[0-9.]{1,8}-[A-Za-z0-9_.-]{1,63}\.service")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_META = ("source", "source_port", "source_unit", "target", "target_port")


class RunbookRefused(FleetError):
    """A declared move whose runbook fleet cannot lay out from what it observed."""


# ================================================================ planning (pure)


def steps(desired: Desired, move: MoveSpec, observed: Mapping[str, HostResult],
          scope: Collection[str]) -> list[Change]:
    """The runbook's changes for a declared Postgres or Redis move, in order (BEFORE, then LAST); the
    move-check's `before` holds the data gates' answers in `observed`.  RunbookRefused when
    the run does not cover both hosts (`scope`, after --limit) or the observation does not say
    which clusters to work on."""
    svc = desired.service(move.service)
    assert svc is not None and svc.kind in (Kind.POSTGRES, Kind.REDIS)
    outside = [h for h in (move.source, move.target) if h not in scope]
    if outside:
        raise RunbookRefused(f"the move of {move.service} from {move.source} to {move.target} needs both hosts, "
                             f"and this run leaves out {', '.join(outside)}",
                             hint="plan the move without --limit, or with both hosts in it")
    gates = data_gates(desired, move, observed)
    now = "; ".join(g.line() for g in gates)
    src = observed.get(move.source)
    if not isinstance(src, HostState):
        raise RunbookRefused(f"the move of {move.service}: {now}")
    standby = "standby"
    if svc.kind == Kind.REDIS:  # its own module: fleet/resources/runbook_redis.py (the layout is this one)
        payload, standby = runbook_redis.payload(svc, move, src, now), "replica"
    else:
        primary = next((v for v in clusters_of(src, svc.unit) if v.role == "primary" and v.cluster is not None), None)
        if primary is None or primary.cluster is None:
            raise RunbookRefused(f"the move of {move.service} from {move.source} to {move.target} cannot be laid out: "
                                 f"fleet found no primary cluster of {svc.unit} on {move.source} to make read-only and "
                                 f"stop (its data now: {now})",
                                 hint=f"start the source's cluster, or allow fleet to ask it: probe = true on "
                                      f"services.{svc.name}")
        # The target's cluster is the one Mastodon will connect to: on the service's declared port.
        payload = MovePayload(move.source, move.target, primary.port, svc.port or DEFAULT_PORTS[Kind.POSTGRES],
                              primary.cluster.unit)
    said = f"{move.service} {move.source} -> {move.target}"
    reasons = {
        Action.MOVE_CHECK: (move.target, f"move {said}: the data gates, asked again when the step runs", now),
        Action.MOVE_READ_ONLY: (move.source, f"move {said}: no write reaches the source after the last check", ""),
        Action.MOVE_CAUGHT_UP: (move.target, f"move {said}: the {standby} has replayed the source's last write", ""),
        Action.MOVE_PROMOTE: (move.target, f"move {said}: the {standby} becomes the primary Mastodon is pointed "
                                           "at", ""),
        LAST: (move.source, f"move {said}: the old server stops once every Mastodon process runs against the new "
                            "one", ""),
    }
    out = []
    for action, (host, reason, before) in reasons.items():  # in order (the Sidekiq steps: runbook_quiet)
        target = payload.source_unit if host == move.source else f"{svc.kind.value}:{payload.target_port}"
        out.append(Change(host, action, target, reason, svc.name, before=before, payload=payload))
    return out


def wrap(book: Sequence[Change], changes: Sequence[Change], deps: Mapping[str, tuple[str, ...]],
         waves: Sequence[tuple[str, ...]], groups: Mapping[str, tuple[str, ...]] | None = None,
         ) -> tuple[tuple[Change, ...], dict[str, tuple[str, ...]], tuple[tuple[str, ...], ...],
                    dict[str, tuple[str, ...]]]:
    """The plan's changes, deps, waves and groups (fleet/graph.py `order`) with the runbook around
    them: its steps before the plan's first wave, one a wave, each after the one before; every
    change of the plan that waited for nothing waits for the promote; the book's restarts of
    quieted Sidekiq units the plan does not restart (runbook_quiet.around) in a wave after the
    plan's; the old server's stop after every change that (re)starts a unit (or after the promote,
    when nothing restarts).  The groups are the plan's own: no runbook step belongs to one."""
    groups = dict(groups or {})
    if not book:
        return tuple(changes), dict(deps), tuple(waves), groups
    first, last = [c for c in book if c.action in BEFORE], [c for c in book if c.action == LAST]
    resumes = [c for c in book if c.action not in BEFORE and c.action != LAST]
    steps_in = [BEFORE.index(c.action) for c in first]
    assert steps_in == sorted(set(steps_in)) and {BEFORE[0], BEFORE[-1]} <= {c.action for c in first} \
        and len(last) == 1, "a runbook is BEFORE (in order), then LAST"
    out_deps: dict[str, tuple[str, ...]] = {}
    for prev, c in zip([None, *first], first, strict=False):
        out_deps[c.id] = (prev.id,) if prev is not None else ()
    promote = first[-1].id
    for c in changes:
        out_deps[c.id] = tuple(deps.get(c.id, ())) or (promote,)
    from fleet.resources.registry import SPECS  # the registry imports this module's resource

    for c in resumes:
        out_deps[c.id] = (promote,)
    runs = [c.id for c in (*changes, *resumes) if SPECS[c.action].phase == Phase.RUN]
    out_deps[last[0].id] = tuple(runs) or (promote,)
    resumed = (tuple(c.id for c in resumes),) if resumes else ()
    all_waves = (*((c.id,) for c in first), *waves, *resumed, (last[0].id,))
    return (*first, *changes, *resumes, last[0]), out_deps, tuple(all_waves), groups


# ================================================================ judging (pure)


def lsn(text: str) -> int | None:
    """A WAL position as psql prints it (`16/B374D848`), as a byte number; None if it is not one."""
    text = text.strip().upper()
    if not _LSN.fullmatch(text):
        return None
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def judge_source(move: MoveSpec, answer: str) -> Gate:
    """`pg_is_in_recovery()|pg_current_wal_lsn()` of the source: a primary, with its position."""
    cols = answer.strip().split("|")
    ok = len(cols) == 2 and cols[0] == "f" and lsn(cols[1]) is not None
    said = f"a primary at WAL {cols[1]}" if ok else "a standby" if cols[0] == "t" else f"answered {answer.strip()!r}"
    return Gate(f"{move.source} is the primary", ok, f"{move.source} is {said}" if ok or cols[0] == "t" else
                f"{move.source} {said}")


def judge_target(desired: Desired, move: MoveSpec, answer: str) -> Gate:
    """`pg_is_in_recovery()|sender_host|sender_port|status` of the target: a standby whose WAL
    receiver streams from the source (by inventory name or address)."""
    cols = answer.strip().split("|")
    check = f"{move.target} is a standby of {move.source}"
    if len(cols) != 4:
        return Gate(check, False, f"{move.target} answered {answer.strip()!r}")
    recovery, host, port, status = cols
    if recovery != "t":
        return Gate(check, False, f"{move.target} is not in recovery: a primary of its own (a new, empty cluster "
                                  "would be one); make it a streaming standby of the source first")
    if not host:
        return Gate(check, False, f"{move.target} is a standby with no WAL receiver")
    ok = move.source in resolve_host(desired, host) and status == "streaming"
    return Gate(check, ok, f"{move.target} streams from {host}:{port} ({status})")


def judge_replay(move: MoveSpec, source_lsn: str, answer: str, waited: float) -> Gate:
    """The standby's bytes behind `source_lsn`, after waiting up to `waited` seconds for them
    to reach 0 (`behind N` from the host's loop)."""
    said = answer.strip().removeprefix("behind ").strip()
    try:
        behind: int | None = int(float(said))
    except ValueError:
        behind = None
    if behind is None:
        return Gate("caught up", False, f"{move.target} could not say how far behind it is ({said or 'no answer'})")
    if behind > 0:
        return Gate("caught up", False, f"{behind} bytes of WAL behind {move.source} (at {source_lsn}) after "
                                        f"waiting {waited:g}s for it to replay them")
    return Gate("caught up", True, f"{move.target} has replayed {move.source}'s WAL up to {source_lsn}")


def halted(gates: Sequence[Gate]) -> str:
    """A step's error when one of its gates did not pass: which, and what the hosts answered."""
    failed = next(g for g in gates if not g.ok)
    passed = [g for g in gates if g.ok]
    before = f" (passed: {'; '.join(f'{g.check}: {g.detail}' for g in passed)})" if passed else ""
    return f"gate {failed.check!r} did not pass: {failed.detail}{before}"


# ================================================================ the remote side


def psql(port: int, *sql: str, read_only: bool | None = True) -> str:
    """psql as the postgres user on `port`, each statement its own transaction (`-c` …), rows
    as `a|b`.  Its sessions are read-only (True), read-write whatever the server's default
    (False: fleet's own writes, ALTER SYSTEM), or as the server's configuration makes every new
    session (None: what Mastodon would get).  Every value quoted."""
    options = "-c statement_timeout=10000"
    if read_only is not None:
        options += f" -c default_transaction_read_only={'on' if read_only else 'off'}"
    cs = " ".join(f"-c {shlex.quote(s)}" for s in sql)
    return (f"runuser -u postgres -- env PGCONNECT_TIMEOUT=5 PGOPTIONS={shlex.quote(options)} "
            f"psql -X -A -t -q -F '|' -d postgres -p {int(port)} {cs}")


SOURCE_SQL = "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END"
TARGET_SQL = ("SELECT pg_is_in_recovery(), coalesce(r.sender_host, ''), coalesce(r.sender_port::text, ''), "
              "coalesce(r.status, '') FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS r ON true")
READ_ONLY_SQL = ("ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()",
                 # a session inside a transaction may have written, or be about to: ended (Mastodon reconnects)
                 "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                 "AND backend_type = 'client backend' AND state <> 'idle'")
READ_WRITE_SQL = ("ALTER SYSTEM RESET default_transaction_read_only", "SELECT pg_reload_conf()")


def _one(step: Execution, command: str, host: str | None = None) -> str:
    """The output of one psql command (its answer rows), on the step's host or `host`."""
    full = f"cd / && out=$({command}) && printf '%s\\n@@ok\\n' \"$out\""
    out = step.run(full) if host is None else step.run_on(host, full)
    return out.replace("@@ok", "").strip()


def _replay_wait(port: int, source_lsn: str, seconds: float) -> str:
    """A loop on the target: its bytes behind `source_lsn`, asked every 0.2 s until 0 or
    `seconds` passed; prints `behind N` (N as pg_wal_lsn_diff says it)."""
    if not _LSN.fullmatch(source_lsn):  # it goes into SQL text: judge_source let through only a position
        raise FleetError(f"the source's WAL position {source_lsn[:40]!r} is not one psql prints (like 16/B374D848): "
                         "fleet will not put it into SQL")
    ask = psql(port, f"SELECT pg_wal_lsn_diff('{source_lsn}', pg_last_wal_replay_lsn())")
    tries = max(1, int(seconds / 0.2))
    return (f"cd / && i=0 && while :; do b=$({ask}) || exit 1; i=$((i + 1)); "
            f"case $b in -*|0) break;; esac; [ $i -ge {tries} ] && break; sleep 0.2; done; "
            "printf 'behind %s\\n@@ok\\n' \"$b\"")


def _source_lsn(step: Execution, move: MoveSpec, port: int) -> tuple[Gate, str]:
    answer = _one(step, psql(port, SOURCE_SQL), move.source)
    gate = judge_source(move, answer)
    return gate, answer.split("|")[-1] if gate.ok else ""


def _caught_up(step: Execution, move: MoveSpec, payload: MovePayload, gates: list[Gate]) -> None:
    """Gates of the source's position and the standby's replay of it; FleetError naming the
    first that did not pass."""
    gate, position = _source_lsn(step, move, payload.source_port)
    gates.append(gate)
    if gate.ok:
        waited = step.start_timeout
        said = step.run(_replay_wait(payload.target_port, position, waited)).replace("@@ok", "")
        gates.append(judge_replay(move, position, said, waited))
    if not all(g.ok for g in gates):
        raise FleetError(halted(gates))
    step.detail = "; ".join(g.line() for g in gates)


def _move(step: Execution, change: Change) -> tuple[MoveSpec, MovePayload]:
    p = change.payload
    if not isinstance(p, MovePayload):
        raise FleetError(f"{change.id} carries no move")
    declared = step.desired.move(change.service or "")
    if declared is None or (declared.source, declared.target) != (p.source, p.target):
        raise FleetError(f"the plan moves {change.service} from {p.source} to {p.target}, which the desired state "
                         "no longer declares")
    return declared, p


def _check(step: Execution, change: Change) -> None:
    move, p = _move(step, change)
    gates = [judge_target(step.desired, move, _one(step, psql(p.target_port, TARGET_SQL)))]
    if not gates[0].ok:
        raise FleetError(halted(gates))
    _caught_up(step, move, p, gates)


def _read_only(step: Execution, change: Change) -> None:
    _, p = _move(step, change)
    ended = _one(step, psql(p.source_port, *READ_ONLY_SQL, read_only=False))
    # The reload reaches new sessions once the postmaster has read it: asked until it has.
    asked = psql(p.source_port, "SHOW default_transaction_read_only", read_only=None)
    seen = step.run(f"cd / && i=0 && while :; do r=$({asked})"
                    " || exit 1; i=$((i + 1)); [ \"$r\" = on ] || [ $i -ge 25 ] && break; sleep 0.2; done; "
                    "printf '%s\\n@@ok\\n' \"$r\"").replace("@@ok", "").strip()
    if seen != "on":
        raise FleetError(f"gate 'source read-only' did not pass: a new session on {p.source} has "
                         f"default_transaction_read_only = {seen or 'no answer'}")
    step.detail = f"read-only; sessions in a transaction ended: {ended.splitlines()[-1] if ended else '0'}"


def _catch_up(step: Execution, change: Change) -> None:
    move, p = _move(step, change)
    _caught_up(step, move, p, [])


def _promote(step: Execution, change: Change) -> None:
    move, p = _move(step, change)
    answer = _one(step, psql(p.target_port, "SELECT pg_promote(true, 60)", read_only=False))
    after = _one(step, psql(p.target_port, "SELECT pg_is_in_recovery()"))
    if after != "f":
        raise FleetError(f"gate 'target not in recovery' did not pass: pg_promote() on {move.target} answered "
                         f"{answer or 'nothing'}, and it is {'still a standby' if after == 't' else repr(after)}")
    step.detail = f"{move.target} promoted: out of recovery"


def _stop_source(step: Execution, change: Change) -> None:
    _, p = _move(step, change)
    unit = shlex.quote(p.source_unit)
    state = step.run(f"systemctl stop -- {unit}; s=$(systemctl is-active -- {unit}); "
                     "printf '%s\\n@@ok\\n' \"$s\"").replace("@@ok", "").strip()
    if state in ("active", "activating", "deactivating", "reloading"):
        raise FleetError(f"gate 'old server stopped' did not pass: {p.source_unit} on {p.source} is {state}")


def _back_to_read_write(step: Execution, change: Change) -> tuple[bool, str]:
    """After a failed read-only, catch-up or promote: the source takes writes again while the target is still
    a standby (a promoted target keeps the source read-only: two primaries must never both write).
    (whether the source takes writes again, what was done)."""
    move, p = _move(step, change)
    if _one(step, psql(p.target_port, "SELECT pg_is_in_recovery()"), move.target) != "t":
        return False, f"{move.source} left read-only: {move.target} is no longer a standby"
    _one(step, psql(p.source_port, *READ_WRITE_SQL, read_only=False), move.source)
    return True, f"{move.source} takes writes again (default_transaction_read_only reset); the fleet still points at it"


# ================================================================ the resource


def _is_redis(step: Execution, change: Change) -> bool:
    """The move's store is Redis (fleet/resources/runbook_redis.py carries out its steps)."""
    svc = step.desired.service(change.service or "")
    return svc is not None and svc.kind == Kind.REDIS


class MoveSteps(Resource):
    """The runbook's actions: planned by fleet.plan.build_plan (through `steps` and `wrap`),
    never by a host's diff."""

    kind = "move"
    actions: ClassVar[Mapping[Action, ActionSpec]] = {
        Action.MOVE_CHECK: ActionSpec(Phase.RUN, "?", "change", "checked the move's data on"),
        Action.MOVE_READ_ONLY: ActionSpec(Phase.RUN, "~", "change", "made read-only"),
        Action.MOVE_CAUGHT_UP: ActionSpec(Phase.RUN, "?", "change", "checked the standby caught up on"),
        Action.MOVE_PROMOTE: ActionSpec(Phase.RUN, "~", "change", "promoted"),
        Action.MOVE_STOP_SOURCE: ActionSpec(Phase.PRUNE, "-", "stop", "stopped the old server"),
    }
    volatile_fields: ClassVar[frozenset[str]] = frozenset({"before"})
    explained: ClassVar[Mapping[Action, frozenset[ObservedKind]]] = {
        Action.MOVE_STOP_SOURCE: frozenset({ObservedKind.UNIT_STATE})}
    _run = {Action.MOVE_CHECK: _check, Action.MOVE_READ_ONLY: _read_only, Action.MOVE_CAUGHT_UP: _catch_up,
            Action.MOVE_PROMOTE: _promote, Action.MOVE_STOP_SOURCE: _stop_source}

    def load(self, action: Action, fields: Mapping[str, Any]) -> MovePayload:
        empty(fields, "diff", "keys", "content_hash", "remove_files", "steps")
        meta = fields.get("meta")
        if not isinstance(meta, dict) or sorted(meta) != sorted(_META) or not all(
                isinstance(v, str) for v in meta.values()):
            raise PayloadError(f"its meta is not the move's {', '.join(_META)}")
        if not (digits(meta["source_port"]) and digits(meta["target_port"])):
            raise PayloadError("its ports are not numbers")
        return MovePayload(meta["source"], meta["target"], int(meta["source_port"]), int(meta["target_port"]),
                           meta["source_unit"])

    def problem(self, change: Change) -> str | None:
        p = change.payload
        if not isinstance(p, MovePayload):
            return "it carries no move"
        if not (_HOST.fullmatch(p.source) and _HOST.fullmatch(p.target)) or p.source == p.target:
            return f"its move {p.source!r} -> {p.target!r} is not between two host names"
        if change.host != (p.source if change.action in ON_SOURCE else p.target):
            return f"it runs on {change.host}, not on the move's {'source' if change.action in ON_SOURCE else 'target'}"
        if not (_CLUSTER_UNIT.fullmatch(p.source_unit) or runbook_redis.UNIT.fullmatch(p.source_unit)):
            return f"{p.source_unit!r} is not a Postgres cluster unit (nor a Redis unit)"
        if not (0 < p.source_port < 65536 and 0 < p.target_port < 65536):
            return "its ports are out of range"
        return None

    def execute(self, change: Change, step: Execution) -> None:
        run = {**self._run, **runbook_redis.RUN} if _is_redis(step, change) else self._run
        run[change.action](step, change)

    def rollback(self, change: Change, step: Execution) -> str:
        if change.action not in (Action.MOVE_READ_ONLY, Action.MOVE_CAUGHT_UP, Action.MOVE_PROMOTE):
            return ""
        try:  # (a failed read-only step may have set it: ALTER SYSTEM went through, the gate did not)
            writable, said = runbook_redis.back_to_writable(step, change) if _is_redis(step, change) else \
                _back_to_read_write(step, change)
        except FleetError as e:
            writable, said = False, f"the source could not be made writable again ({e.message})"
        # Sidekiq quieted before the source went read-only resumes against it only when it takes writes.
        sidekiq = runbook_quiet.resume(step, step.plan_changes) if writable else \
            runbook_quiet.left_quiet(step.plan_changes, "the source stays read-only")
        return "; ".join(s for s in (said, sidekiq) if s)

    def sentence(self, step: StepView) -> str:
        spec = self.actions[Action(step.action)]
        return f"{spec.past} {step.target}" + (f" (the gates when planned: {step.before})" if step.before else "")

    def details(self, change: Change) -> list[Detail]:
        return [(PLAIN, f"now: {line}") for line in change.before.split("; ") if line]

