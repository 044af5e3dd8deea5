"""Sidekiq quieted and drained in a declared move's runbook (issue 15): the steps between the
data check and the moment the source stops taking writes, for any declared move, and the
resource that owns their actions.

  move-quiet    (the Sidekiq Redis host) every Sidekiq unit of the run that runs a declared
                Sidekiq service (template instances included) is sent TSTP on its host
                (`systemctl kill -s TSTP --kill-whom=main`), so it takes no new job; gate:
                Sidekiq's own heartbeat in its Redis says each of those processes is quiet,
                within the start timeout (Sidekiq writes `quiet` at its next beat, every 10 s);
  move-drained  (the same host) every quieted process's `busy` reaches 0 within the start
                timeout (no job in flight hits a read-only database); then the jobs still
                queued are counted per queue, as the Sidekiq view counts them: 0 passes, as
                does a count the operator accepted (`fleet apply --accept-queued N`, N at least
                the total); otherwise the gate fails naming the count per queue and the option.

Both are ONE change for the whole run, not one per host: a halt must restart every unit that
was quieted, and per-host changes of one wave run in parallel, so one host's rollback could
race another host's TSTP (a restart before it, and that host's units would stay quiet with
nobody to restart them).  One change sends TSTP host after host (a few ms each), then waits
on Sidekiq's view once for all of them.

A halt after move-quiet (this module's gates, or the runbook's later ones before the env files
are rewritten) restarts every quieted unit: they resume against the unchanged source
(`resume`).  On success the plan's own restarts of Sidekiq (the rewritten env file) un-quiet
them; a quieted unit the plan does not restart gets a restart of its own, after the plan's
changes and before the old server stops (`around`).

Where Sidekiq's Redis is read is `sidekiq.locate_redis`, as for the collection's view: the
Redis host finds it from the env file Sidekiq loads; the password goes to redis-cli in its
environment only (`sidekiq.redis_prelude`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fleet.actions import Action, Change, Phase, QuietPayload
from fleet.config import UNIT_NAME
from fleet.errors import FleetError, TransportError
from fleet.model import Desired, HostResult, HostState, Kind, MoveSpec
from fleet.moves import Gate
from fleet.resources.base import PLAIN, ActionSpec, Detail, Execution, PayloadError, Resource, StepView, empty
from fleet.sidekiq import (
    MAX_NAME,
    MAX_QUEUES,
    RedisSource,
    find_view,
    host_names,
    join,
    locate_redis,
    redis_prelude,
    sidekiq_units,
)
from fleet.textutil import digits
from fleet.units import describe_unit

QUIET, DRAINED = Action.MOVE_QUIET, Action.MOVE_DRAINED
TARGET = "sidekiq"
MARK = "@@move-sidekiq"
RUNNING = ("active", "activating", "reloading")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class QuietRefused(FleetError):
    """A declared move whose Sidekiq steps fleet cannot lay out (or gate) from what it observed."""


# ================================================================ planning (pure)


def to_quiet(desired: Desired, observed: Mapping[str, HostResult], scope: Collection[str]) -> list[tuple[str, str]]:
    """(host, unit) of every running unit of a declared Sidekiq service on the run's hosts
    (`scope`), template instances included, in inventory and declaration order."""
    out = []
    for h in desired.hosts:
        state = observed.get(h.name)
        if h.name not in scope or not isinstance(state, HostState):
            continue
        for s in desired.services_on(h.name):
            if s.kind != Kind.SIDEKIQ:
                continue
            for unit in s.units_on(h.name):
                u = state.unit(unit)
                if u is not None and u.active_state in RUNNING:
                    out.append((h.name, unit))
    return out


def around(book: Sequence[Change], desired: Desired, move: MoveSpec, observed: Mapping[str, HostResult],
           scope: Collection[str], changes: Sequence[Change]) -> list[Change]:
    """A move's runbook `book` (its check first) with move-quiet and move-drained after the check,
    and a restart of each quieted unit the plan's own `changes` do not (re)start, before the
    book's last step.  `book` unchanged when the run has no Sidekiq unit to quiet; QuietRefused
    when fleet could not read Sidekiq's heartbeats to gate it."""
    units = to_quiet(desired, observed, scope)
    if not book or not units:
        return list(book)
    said = f"{move.service} {move.source} -> {move.target}"
    where = locate_redis(desired, desired.sidekiq_policy)
    if not isinstance(where, RedisSource):
        raise QuietRefused(f"the move of {said} must quiet Sidekiq first, and fleet cannot read Sidekiq's heartbeats: "
                           f"{where.message}", hint=where.hint)
    if where.host not in scope:
        raise QuietRefused(f"the move of {said} gates Sidekiq's quiet on its Redis host {where.host}, and this run "
                           f"leaves it out", hint=f"plan the move without --limit, or with {where.host} in it")
    payload = QuietPayload(tuple(units), where.env_path)
    quiet_now, queued_now = observed_now(desired, observed, units)
    quiet = Change(where.host, QUIET, TARGET, f"move {said}: Sidekiq takes no new job (TSTP) before the source "
                                              "stops taking writes", move.service, before=quiet_now, payload=payload)
    drained = Change(where.host, DRAINED, TARGET, f"move {said}: jobs in flight finished; jobs still queued "
                                                  "counted (0, or accepted with --accept-queued N)", move.service,
                     before=queued_now, payload=payload)
    restarted = {(c.host, c.target) for c in changes if c.action in (Action.RESTART, Action.START)}
    resumes = []
    for host, unit in units:
        svc = next(s for s in desired.services_on(host) if s.kind == Kind.SIDEKIQ and unit in s.units_on(host))
        state = observed[host]
        assert isinstance(state, HostState)  # to_quiet found it running there
        if (host, unit) not in restarted:
            resumes.append(Change(host, Action.RESTART, unit, f"move {said}: quieted for the move, and the plan "
                                                              "does not restart it otherwise", svc.name,
                                  before=describe_unit(state.unit(unit)), after="active/running, no longer quiet"))
    return [book[0], quiet, drained, *book[1:-1], *resumes, *book[-1:]]


def observed_now(desired: Desired, observed: Mapping[str, HostResult],
                 units: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """What the observation's Sidekiq view says now, for `fleet plan`: each unit's process (quiet
    or not, busy), and the jobs queued per queue; "; "-separated lines."""
    found = find_view(observed)
    if found is None or found[1].error:
        why = f"Sidekiq's view: {found[1].error if found is not None else 'not read in this observation'}"
        return "; ".join([*(f"{h} {u}" for h, u in units), why]), why
    _, view, _ = found
    wanted = set(units)
    seen = [u for u in sidekiq_units(desired, observed) if (u.host, u.unit) in wanted]
    matches, _ = join(view.processes, seen, host_names(desired, observed))
    by_unit = {(m.unit.host, m.unit.unit): m.process for m in matches if m.unit is not None}
    lines = []
    for host, unit in units:
        p = by_unit.get((host, unit))
        lines.append(f"{host} {unit}: " + (f"pid {p.pid}, {'quiet' if p.quiet else 'working'}, busy {p.busy}"
                                           if p is not None else "no heartbeat in Sidekiq's Redis"))
    queued = {q.name: q.size for q in view.queues if q.size}
    return "; ".join(lines), f"jobs queued: {_counted(queued)}"


def _counted(queued: Mapping[str, int]) -> str:
    total = sum(queued.values())
    return f"{total} ({', '.join(f'{n}: {c}' for n, c in queued.items())})" if total else "none"


# ================================================================ the remote side


def tstp_script(units: Sequence[str], *, send: bool = True) -> str:
    """POSIX sh for one host: each unit's main PID and the host's kernel hostname (what Sidekiq
    puts in its identity) as `@@quiet UNIT HOSTNAME PID`, then TSTP to the main process of every
    unit that has one.  Every unit name quoted."""
    names = " ".join(shlex.quote(u) for u in units)
    return ("read -r h </proc/sys/kernel/hostname\nset --\n"
            f"for u in {names}; do\n"
            "  p=$(systemctl show -p MainPID --value -- \"$u\")\n"
            "  printf '@@quiet %s %s %s\\n' \"$u\" \"$h\" \"${p:-0}\"\n"
            "  if [ \"${p:-0}\" != 0 ]; then set -- \"$@\" \"$u\"; fi\n"
            "done\n"
            + ("if [ $# -gt 0 ]; then systemctl kill -s TSTP --kill-whom=main -- \"$@\" || exit 1; fi\n"
               if send else "")
            + "echo @@ok\n")


def restart_script(units: Sequence[str]) -> str:
    return f"systemctl restart -- {' '.join(shlex.quote(u) for u in units)} && echo @@ok"


def poll_script(env_path: str, prefixes: Sequence[str], *, until: str, timeout: int) -> str:
    """POSIX sh for the Sidekiq Redis host: wait (at most `timeout` s) until the live process of
    each identity prefix (`HOSTNAME:PID:`) is quiet (`until="quiet"`) or has no job in flight
    (`until="idle"`), or has left `processes`; then print, one line each:
        @@move-sidekiq p PREFIX IDENTITY|- QUIET|- BUSY|-    what its heartbeat says
        @@move-sidekiq q LEN NAME                           each queue's length (`idle` only)
        @@move-sidekiq skipped (WHY)                        Redis could not be read
    and `@@ok`.  Nothing is judged here (judge_quiet, judge_drained)."""
    assert until in ("quiet", "idle")
    words = " ".join(shlex.quote(p) for p in prefixes)
    done = '[ "$q" = true ]' if until == "quiet" else '[ "$b" = 0 ]'
    queues = "" if until == "quiet" else f"""
qs=$(sk_cli "$@" SMEMBERS queues 2>/dev/null | head -n {MAX_QUEUES})
IFS=$nl
for name in $qs; do
  IFS=$sk_ifs
  n=$(sk_cli "$@" LLEN "queue:$name" 2>/dev/null | head -n 1 | cut -c1-20)
  printf '{MARK} q %s %s\\n' "${{n:--}}" "$(printf '%s' "$name" | cut -c1-{MAX_NAME})"
done
IFS=$sk_ifs"""
    return f"""(
set -f
nl='
'
sk_ifs=$IFS
{redis_prelude(env_path, MARK)}
end=$(( $(date +%s) + {int(timeout)} ))
while :; do
  ids=$(printf 'PING\\nSMEMBERS processes\\n' | sk_cli "$@" 2>/dev/null)
  case $ids in PONG|PONG"$nl"*) ;; *) echo '{MARK} skipped (Redis did not answer)'; exit 0;; esac
  rows= left=0
  for pre in {words}; do
    id=$(printf '%s\\n' "$ids" | sed 1d | awk -v pre="$pre" 'index($0, pre) == 1' | head -n 1 | cut -c1-{MAX_NAME})
    q=- b=-
    if [ -n "$id" ]; then
      q=$(sk_cli "$@" HGET "$id" quiet 2>/dev/null | head -n 1 | cut -c1-20)
      b=$(sk_cli "$@" HGET "$id" busy 2>/dev/null | head -n 1 | cut -c1-20)
      {done} || left=$((left + 1))
    fi
    rows="$rows{MARK} p $pre ${{id:--}} ${{q:--}} ${{b:--}}$nl"
  done
  if [ "$left" = 0 ] || [ "$(date +%s)" -ge "$end" ]; then break; fi
  sleep 0.5
done
printf '%s' "$rows"{queues}
)
echo @@ok"""


# ================================================================ judging (pure)


@dataclass(frozen=True)
class Quieted:
    """A unit sent TSTP (or found with no main process: nothing to quiet), and the identity
    prefix its process heartbeats under."""

    host: str
    unit: str
    hostname: str
    pid: int

    @property
    def prefix(self) -> str:
        return f"{self.hostname}:{self.pid}:"


@dataclass(frozen=True)
class Beat:
    identity: str  # "" when no live member of `processes` has the prefix
    quiet: str
    busy: str


def read_tstp(host: str, out: str) -> list[Quieted]:
    """tstp_script's `@@quiet` lines as Quieted units."""
    found = []
    for line in out.splitlines():
        parts = line.split(" ")
        if len(parts) == 4 and parts[0] == "@@quiet" and digits(parts[3]):
            found.append(Quieted(host, parts[1], parts[2], int(parts[3])))
    return found


def read_poll(out: str) -> tuple[str, dict[str, Beat], dict[str, int | None]]:
    """poll_script's lines: (why it skipped, or ""; prefix → heartbeat; queue → length, None when
    redis-cli did not print a number)."""
    beats: dict[str, Beat] = {}
    queues: dict[str, int | None] = {}
    for line in out.splitlines():
        if not line.startswith(MARK + " "):
            continue
        tag, _, rest = line[len(MARK) + 1:].partition(" ")
        if tag == "skipped":
            return rest, {}, {}
        if tag == "p":
            parts = rest.split(" ")
            if len(parts) == 4:
                prefix, identity, quiet, busy = parts
                beats[prefix] = Beat("" if identity == "-" else identity, quiet, busy)
        elif tag == "q":
            n, _, name = rest.partition(" ")
            queues[name] = int(n) if digits(n) else None
    return "", beats, queues


def _who(u: Quieted) -> str:
    return f"{u.unit} on {u.host} (pid {u.pid})"


def judge_quiet(units: Sequence[Quieted], out: str, waited: float) -> Gate:
    """Every quieted process is quiet as its heartbeat says (a unit with no main process has
    nothing to quiet)."""
    check = "Sidekiq quiet"
    skipped, beats, _ = read_poll(out)
    if skipped:
        return Gate(check, False, f"cannot read Sidekiq's heartbeats in Redis {skipped}")
    running = [u for u in units if u.pid]
    problems = []
    for u in running:
        beat = beats.get(u.prefix)
        if beat is None or not beat.identity:
            problems.append(f"{_who(u)} has no heartbeat in Sidekiq's Redis")
        elif beat.quiet != "true":
            problems.append(f"{_who(u)} heartbeats quiet={beat.quiet} after {waited:g}s")
    if problems:
        return Gate(check, False, "; ".join(problems))
    idle = [u for u in units if not u.pid]
    return Gate(check, True, f"{len(running)} Sidekiq process(es) quiet" +
                (f" ({', '.join(f'{u.unit} on {u.host}' for u in idle)} not running)" if idle else ""))


def judge_drained(units: Sequence[Quieted], out: str, waited: float, accepted: int | None,
                  move: MoveSpec | None) -> list[Gate]:
    """Every quieted process has no job in flight, then the jobs still queued: none, or no more
    than the operator accepted.  The first gate that did not pass ends the list."""
    skipped, beats, queues = read_poll(out)
    if skipped:
        return [Gate("Sidekiq idle", False, f"cannot read Sidekiq's heartbeats in Redis {skipped}")]
    busy = []
    for u in units:
        beat = beats.get(u.prefix)
        if u.pid and beat is not None and beat.identity and beat.quiet != "true":
            busy.append(f"{_who(u)} is not quiet (quiet={beat.quiet}): restarted since move-quiet, it takes jobs")
        elif u.pid and beat is not None and beat.identity and beat.busy != "0":
            busy.append(f"{_who(u)} has {beat.busy} job(s) in flight after {waited:g}s")
        elif u.pid and (beat is None or not beat.identity):
            busy.append(f"{_who(u)} left Sidekiq's processes since it was quieted (restarted?): a new process "
                        "may be taking jobs")
    if busy:
        return [Gate("Sidekiq idle", False, "; ".join(busy))]
    gates = [Gate("Sidekiq idle", True, f"no job in flight in {sum(1 for u in units if u.pid)} quiet process(es)")]
    unknown = [n for n, c in queues.items() if c is None]
    if unknown:
        gates.append(Gate("queues drained", False, f"could not count the jobs in queue(s) {', '.join(unknown)}"))
        return gates
    queued = {n: c for n, c in queues.items() if c is not None and c > 0}
    total = sum(queued.values())
    counted = _counted(queued)
    if total == 0:
        gates.append(Gate("queues drained", True, "no job queued"))
    elif accepted is not None and accepted >= total:
        gates.append(Gate("queues drained", True, f"{counted} job(s) queued, accepted (--accept-queued {accepted}): "
                                                  "they run once Sidekiq restarts"))
    else:
        where = f", against {move.target}" if move is not None else ""
        more = f", more than --accept-queued {accepted} accepts" if accepted else ""
        gates.append(Gate("queues drained", False,
                          f"{counted} job(s) still queued{more}; quiet Sidekiq takes no new job, so they stay "
                          f"queued: to move with them, apply again with --accept-queued {total} (they run after "
                          f"Sidekiq restarts{where}), or let them be worked off first"))
    return gates


def halted(gates: Sequence[Gate]) -> str:
    failed = next(g for g in gates if not g.ok)
    passed = [g for g in gates if g.ok]
    before = f" (passed: {'; '.join(f'{g.check}: {g.detail}' for g in passed)})" if passed else ""
    return f"gate {failed.check!r} did not pass: {failed.detail}{before}"


# ================================================================ carried out


def _payload(change: Change) -> QuietPayload:
    if not isinstance(change.payload, QuietPayload):
        raise FleetError(f"{change.id} carries no Sidekiq units")
    return change.payload


def _by_host(units: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for host, unit in units:
        out.setdefault(host, []).append(unit)
    return out


def _on(step: Execution, host: str, command: str, timeout: float = 120) -> str:
    """The step's own host through `run` (the step's record travels with it), another through run_on."""
    return step.run(command, timeout=timeout) if host == step.host.name else step.run_on(host, command,
                                                                                         timeout=timeout)


def _ask(step: Execution, p: QuietPayload, script: Callable[[Sequence[str]], str]) -> list[Quieted]:
    """Each planned unit's main process as its host said; FleetError for one its host did not name."""
    found: list[Quieted] = []
    for host, units in _by_host(p.units).items():
        said = read_tstp(host, _on(step, host, script(units)))
        missing = [u for u in units if u not in {q.unit for q in said}]
        if missing:
            raise FleetError(f"{host} did not say the main PID of {', '.join(missing)}")
        found += said
    return found


def pids_script(units: Sequence[str]) -> str:
    """tstp_script without the TSTP: the `@@quiet` lines only (move-drained waits on the same processes)."""
    return tstp_script(units, send=False)


def _poll(step: Execution, p: QuietPayload, units: Sequence[Quieted], until: str) -> tuple[str, float]:
    waited = float(int(step.start_timeout))
    prefixes = [u.prefix for u in units if u.pid]
    return step.run(poll_script(p.sidekiq_env, prefixes, until=until, timeout=int(waited)),
                    timeout=waited + 60), waited


def _quiet(step: Execution, change: Change) -> None:
    p = _payload(change)
    units = _ask(step, p, tstp_script)
    out, waited = _poll(step, p, units, "quiet")
    gate = judge_quiet(units, out, waited)
    if not gate.ok:
        raise FleetError(halted([gate]))
    step.detail = gate.line()


def _drained(step: Execution, change: Change) -> None:
    p = _payload(change)
    units = _ask(step, p, pids_script)
    out, waited = _poll(step, p, units, "idle")
    gates = judge_drained(units, out, waited, step.accept_queued, step.desired.move(change.service or ""))
    if not all(g.ok for g in gates):
        raise FleetError(halted(gates))
    step.detail = "; ".join(g.line() for g in gates)


def resume(step: Execution, plan: Sequence[Change]) -> str:
    """After a halt between move-quiet and the env files' rewrite: restart every Sidekiq unit the
    plan's move-quiet quieted (they resume against the unchanged source); what was done, for the
    journal.  "" when the plan quiets nothing."""
    quiet = next((c for c in plan if c.action == QUIET and isinstance(c.payload, QuietPayload)), None)
    if quiet is None:
        return ""
    p = _payload(quiet)
    done, failed = [], []
    for host, units in _by_host(p.units).items():
        try:
            _on(step, host, restart_script(units), timeout=step.start_timeout + 60)
            done.append(f"{', '.join(units)} on {host}")
        except (FleetError, TransportError) as e:
            failed.append(f"{', '.join(units)} on {host} ({e.message})")
    said = f"restarted the Sidekiq units quieted for the move, which resume against the source: {'; '.join(done)}" \
        if done else ""
    if failed:
        said += ("; " if said else "") + f"could NOT restart (still quiet: restart them by hand): {'; '.join(failed)}"
    return said


def left_quiet(plan: Sequence[Change], why: str) -> str:
    """The journal's word when a halt leaves the quieted units quiet on purpose."""
    quiet = next((c for c in plan if c.action == QUIET and isinstance(c.payload, QuietPayload)), None)
    if quiet is None:
        return ""
    units = "; ".join(f"{', '.join(u)} on {h}" for h, u in _by_host(_payload(quiet).units).items())
    return f"Sidekiq left quiet ({units}): {why}; restart them once the fleet points at a writable primary"


# ================================================================ the resource


class QuietSteps(Resource):
    """move-quiet and move-drained: planned by `around` (through fleet.plan.build_plan), never by
    a host's diff."""

    kind = "move sidekiq"
    actions: ClassVar[Mapping[Action, ActionSpec]] = {
        QUIET: ActionSpec(Phase.RUN, "~", "change", "quieted Sidekiq for the move:"),
        DRAINED: ActionSpec(Phase.RUN, "?", "change", "checked quiet Sidekiq drained:"),
    }
    volatile_fields: ClassVar[frozenset[str]] = frozenset({"before"})

    def load(self, action: Action, fields: Mapping[str, Any]) -> QuietPayload:
        empty(fields, "diff", "keys", "content_hash", "remove_files")
        meta, steps = fields.get("meta"), fields.get("steps")
        if not isinstance(meta, dict) or sorted(meta) != ["sidekiq_env"] or not isinstance(meta["sidekiq_env"], str):
            raise PayloadError("its meta is not the Sidekiq env file")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise PayloadError("its steps are not the Sidekiq units to quiet")
        units = []
        for s in steps:
            host, _, unit = s.partition(" ")
            units.append((host, unit))
        return QuietPayload(tuple(units), meta["sidekiq_env"])

    def problem(self, change: Change) -> str | None:
        p = change.payload
        if not isinstance(p, QuietPayload):
            return "it carries no Sidekiq units"
        if change.target != TARGET:
            return f"its target is {change.target!r}, not {TARGET!r}"
        if not p.sidekiq_env.startswith("/") or any(c in p.sidekiq_env for c in "\n\r\0"):
            return f"its env file {p.sidekiq_env!r} is not an absolute path"
        for host, unit in p.units:
            if not _HOST.fullmatch(host) or not UNIT_NAME.fullmatch(unit):
                return f"{host!r} {unit!r} is not a host and a unit name"
        return None

    def execute(self, change: Change, step: Execution) -> None:
        (_quiet if change.action == QUIET else _drained)(step, change)

    def rollback(self, change: Change, step: Execution) -> str:
        return resume(step, step.plan_changes)

    def sentence(self, step: StepView) -> str:
        spec = self.actions[Action(step.action)]
        return f"{spec.past} {step.target}" + (f" (when planned: {step.before})" if step.before else "")

    def details(self, change: Change) -> list[Detail]:
        return [(PLAIN, f"now: {line}") for line in change.before.split("; ") if line]
