"""The runbook of a declared Redis move (`method = "redis-replica"`): what each of the runbook's
steps (fleet/resources/runbook.py lays them out, one a wave, around the plan's own changes) does
on the hosts when the store is Redis, and how its gates judge what Redis answered.

  1. move-check      (target) the gates asked again at run time: the source's `INFO
                     replication` says `role:master`; the target's says `role:slave`, its
                     `master_host` is the source (by inventory name or address) and
                     `master_link_status:up`; then the target is given up to the start timeout
                     for its `slave_repl_offset` to reach the source's `master_repl_offset`;
  2. move-read-only  (source) `CONFIG SET min-replicas-to-write 2147483647` (and
                     `min-replicas-max-lag 10` where it is 0, which turns the check off): a
                     master with fewer good replicas than that refuses every write command with
                     NOREPLICAS, for as long as the server runs (CLIENT PAUSE WRITE would expire).
                     Gate: a write on the source (`DEL` of a key fleet never uses) is refused;
  3. move-caught-up  (target) the source's `master_repl_offset` now, and the replica's
                     `slave_repl_offset` has reached it with its link up;
  4. move-promote    (target) `REPLICAOF NO ONE`; where the server's config file (INFO server's
                     `config_file`) names a master (`replicaof`/`slaveof`), `CONFIG REWRITE`
                     takes the line out so that a restart does not make it a replica again.
                     Gate: `role:master`, and the config file names no master;
  5. the plan's own changes (REDIS_HOST/REDIS_URL rewritten, Mastodon restarted wave by wave);
  6. move-stop-source (source) the source's unit stopped last (runbook.py's own step).

A read-only, catch-up or promote that fails puts `min-replicas-to-write` back to 0 (Redis's
default) on the source while the target is still a replica: the fleet, still pointed at the
source, writes again (and Sidekiq, quieted before, resumes: fleet/resources/runbook_quiet.py).

Redis is asked on 127.0.0.1 at the port the plan names, with the password Mastodon uses there:
read on the host from the env file the desired state declares on it (fleet/sidekiq.py's reader,
as fleet/resources/stores.py does) and handed to redis-cli in `REDISCLI_AUTH` — never in an argv,
never printed, never journaled.  The replica's own `masterauth` is the operator's setup.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping

from fleet.actions import Action, Change, MovePayload
from fleet.errors import FleetError
from fleet.model import DEFAULT_PORTS, Desired, HostState, Kind, MoveSpec, Service
from fleet.moves import Gate
from fleet.policy import resolve_host
from fleet.resources.base import Execution
from fleet.resources.stores import TIMEOUT, mastodon_env_path, redis_of
from fleet.sidekiq import redis_settings_command

# More good replicas than any Redis has: the master refuses every write (NOREPLICAS).
NO_WRITES = 2147483647  # INT_MAX, the setting's upper bound (Redis's config.c)
MAX_LAG = 10  # Redis's default min-replicas-max-lag; 0 would turn the check off
WRITE_CHECK_KEY = "fleet:move:write-check"  # deleted to test the source refuses writes: never set by anyone
MAX_INFO_LINES = 80
MAX_INFO_LINE = 300
POLL = 0.2  # seconds between two answers of the replica while it is given time to catch up

_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_OFFSET = re.compile(r"[0-9]{1,19}")
UNIT = re.compile(r"redis[A-Za-z0-9@:_.-]{0,100}\.service")  # a Redis move's unit in a plan file (redis-server…)


# ================================================================ planning (pure)


def payload(svc: Service, move: MoveSpec, source: HostState, now: str) -> MovePayload:
    """The move's hosts, ports and the unit stopped last: the source's Redis at the port the
    observation asked it on, the target's at the service's declared port; RunbookRefused when
    the source's Redis was not asked."""
    from fleet.resources.runbook import RunbookRefused  # runbook.py dispatches here: imported when used

    seen = redis_of(source, svc.unit)
    if seen is None:
        raise RunbookRefused(f"the move of {move.service} from {move.source} to {move.target} cannot be laid out: "
                             f"fleet did not ask Redis ({svc.unit}) on {move.source} (its data now: {now})",
                             hint=f"run `fleet status` to see {move.source}'s Redis, then plan again")
    return MovePayload(move.source, move.target, seen.port, svc.port or DEFAULT_PORTS[Kind.REDIS], svc.unit)


# ================================================================ judging (pure)


def info(text: str) -> dict[str, str]:
    """`INFO` as redis-cli prints it: `key:value` lines (sections, blanks and anything else
    skipped), the first of each key kept; bounded, so that no host answer grows it."""
    out: dict[str, str] = {}
    for line in text.replace("\r", "").splitlines()[:MAX_INFO_LINES]:
        key, sep, value = line[:MAX_INFO_LINE].partition(":")
        if sep and _KEY.fullmatch(key) and key not in out:
            out[key] = value.strip()
    return out


def said(text: str) -> str:
    """What Redis answered, for a message: its first line, short, printable."""
    first = next((line.strip() for line in text.replace("\r", "").splitlines() if line.strip()), "")
    return "".join(c if c.isprintable() else "?" for c in first[:160]) or "no answer"


def _offset(fields: Mapping[str, str], key: str) -> int | None:
    value = fields.get(key, "")
    return int(value) if _OFFSET.fullmatch(value) else None


def _tagged(lines: list[str]) -> dict[str, str]:
    """`TAG text` lines as {TAG: text}, the first of each tag kept."""
    out: dict[str, str] = {}
    for line in lines[:MAX_INFO_LINES]:
        tag, _, text = line.partition(" ")
        out.setdefault(tag, text.strip())
    return out


def judge_source(move: MoveSpec, answer: str) -> tuple[Gate, int | None]:
    """The source's `INFO replication`: a master, and its replication offset."""
    fields = info(answer)
    offset = _offset(fields, "master_repl_offset")
    check = f"{move.source} is the primary"
    if fields.get("role") == "master" and offset is not None:
        return Gate(check, True, f"redis on {move.source} is a master at offset {offset}"), offset
    if fields.get("role") == "slave":
        return Gate(check, False, f"redis on {move.source} is a replica of {said(fields.get('master_host', ''))}"), None
    return Gate(check, False, f"redis on {move.source} answered {said(answer)!r}"), None


def judge_replica(desired: Desired, move: MoveSpec, answer: str) -> Gate:
    """The target's `INFO replication`: a replica of the source (by inventory name or address)
    whose link to it is up."""
    fields = info(answer)
    check = f"{move.target} is a replica of {move.source}"
    role = fields.get("role")
    if role == "master":
        return Gate(check, False, f"redis on {move.target} is a master of its own (an empty new server would be one): "
                                  "make it a replica of the source first (REPLICAOF)")
    if role != "slave":
        return Gate(check, False, f"redis on {move.target} answered {said(answer)!r}")
    host, port, link = said(fields.get("master_host", "")), said(fields.get("master_port", "")), \
        said(fields.get("master_link_status", ""))
    ok = move.source in resolve_host(desired, fields.get("master_host", "")) and link == "up"
    return Gate(check, ok, f"redis on {move.target} replicates {host}:{port} (link {link})")


def judge_offset(move: MoveSpec, source_offset: int, answer: str, waited: float) -> Gate:
    """The target's `INFO replication` after waiting up to `waited` seconds for its offset to
    reach `source_offset`: link up, and the offset at least the source's."""
    fields = info(answer)
    offset, link = _offset(fields, "slave_repl_offset"), fields.get("master_link_status", "")
    if fields.get("role") != "slave" or offset is None:
        return Gate("caught up", False, f"redis on {move.target} could not say its replication offset "
                                        f"({said(answer)})")
    if link != "up":
        return Gate("caught up", False, f"redis on {move.target}: link to its master {said(link)}, at offset {offset} "
                                        f"of {move.source}'s {source_offset}")
    if offset < source_offset:
        return Gate("caught up", False, f"{source_offset - offset} bytes of replication behind {move.source} (at "
                                        f"offset {source_offset}) after waiting {waited:g}s for them")
    return Gate("caught up", True, f"redis on {move.target} has processed {move.source}'s replication stream up to "
                                   f"offset {source_offset}")


def judge_refused(move: MoveSpec, answer: str) -> Gate:
    """The read-only step's lines: `set …` (CONFIG SET's answer) and `write …` (the test write's):
    the write refused with NOREPLICAS."""
    lines = _tagged(answer.replace("\r", "").splitlines())
    check = "source refuses writes"
    write, setting = lines.get("write", ""), lines.get("set", "")
    if not setting.split() or set(setting.split()) != {"OK"}:
        return Gate(check, False, f"CONFIG SET min-replicas-to-write on {move.source} answered {said(setting)!r}")
    if write.startswith("NOREPLICAS"):
        return Gate(check, True, f"a write on {move.source} is refused: {said(write)}")
    return Gate(check, False, f"a write on {move.source} was not refused (DEL answered {said(write)!r})")


def judge_promoted(move: MoveSpec, answer: str) -> Gate:
    """The promote's lines: `replicaof …`, `config FILE`, `rewrite …|-`, `names N` (lines of the
    config file that still name a master), then the target's `INFO replication`."""
    lines = _tagged(answer.replace("\r", "").splitlines()[:4])
    fields = info(answer)
    check = "target is a master"
    if fields.get("role") != "master":
        return Gate(check, False, f"REPLICAOF NO ONE on {move.target} answered {said(lines.get('replicaof', ''))!r}, "
                                  f"and it is {'still a replica' if fields.get('role') == 'slave' else 'role unknown'}")
    conf, rewrite, names = said(lines.get("config", "")), lines.get("rewrite", "-"), lines.get("names", "0")
    if names != "0":
        return Gate(check, False, f"redis on {move.target} is a master, but its config file {conf} still names a "
                                  f"master (CONFIG REWRITE answered {said(rewrite)!r}): at a restart it would be a "
                                  "replica again; take the replicaof line out by hand")
    kept = f"CONFIG REWRITE took the replicaof line out of {conf}" if rewrite != "-" else \
        f"its config file ({conf}) names no master"
    return Gate(check, True, f"redis on {move.target} is a master; {kept}")


# ================================================================ the remote side


def env_of(desired: Desired, host: str) -> str:
    """The env file the desired state declares on `host` for a Mastodon service: it holds the
    Redis password Mastodon uses ("" when none is declared there)."""
    return mastodon_env_path(desired, host)


def cli(path: str, port: int, body: str) -> str:
    """A command whose `body` calls `rc ARGS…`: redis-cli on 127.0.0.1:`port`, with the user and
    password of the env file at `path` on the host (none when ""), in REDISCLI_AUTH only."""
    q = shlex.quote
    parts = ["cd / && export LC_ALL=C && unset REDISCLI_AUTH", "sk_err= sk_user= sk_pass="]
    if path:
        parts.append(f"f={q(path)}")
        read_env = redis_settings_command('"$f"')
        parts.append(f'if [ -r "$f" ] && conf=$({read_env} 2>/dev/null); then eval "$conf"; fi')
    parts.append("rc() {\n"
                 '  if [ -n "$sk_user" ]; then set -- --user "$sk_user" "$@"; fi\n'
                 "  # The password goes to redis-cli in its environment only: never in an argv, never printed.\n"
                 f'  if [ -n "$sk_pass" ]; then REDISCLI_AUTH=$sk_pass timeout {TIMEOUT} redis-cli -h 127.0.0.1 '
                 f'-p {int(port)} "$@" 2>&1\n'
                 f'  else timeout {TIMEOUT} redis-cli -h 127.0.0.1 -p {int(port)} "$@" 2>&1; fi\n'
                 "}")
    parts.append(body)
    return "\n".join(parts)


_INFO = f"rc INFO replication | tr -d '\\r' | head -n {MAX_INFO_LINES} | cut -c1-{MAX_INFO_LINE}"


def info_command(env: str, port: int) -> str:
    return cli(env, port, f"r=$({_INFO})\nprintf '%s\\n@@ok\\n' \"$r\"")


def wait_command(env: str, port: int, offset: int, seconds: float) -> str:
    """The replica's INFO replication, asked every POLL s until its offset reaches `offset` or
    `seconds` passed; the last answer printed."""
    tries = max(1, int(seconds / POLL))
    return cli(env, port,
               f"i=0\nwhile :; do r=$({_INFO}); o=$(printf '%s\\n' \"$r\" | sed -n 's/^slave_repl_offset://p'); "
               f"i=$((i + 1)); case $o in ''|*[!0-9]*) ;; *) [ \"$o\" -ge {int(offset)} ] && break;; esac; "
               f"[ $i -ge {tries} ] && break; sleep {POLL}; done\nprintf '%s\\n@@ok\\n' \"$r\"")


def read_only_command(env: str, port: int) -> str:
    def one(cmd: str) -> str:
        return f"$(rc {cmd} | head -n 3 | cut -c1-{MAX_INFO_LINE} | tr '\\n' ' ')"

    return cli(env, port,
               f"lag=$(rc CONFIG GET min-replicas-max-lag | sed -n 2p)\n"
               f"s={one(f'CONFIG SET min-replicas-to-write {NO_WRITES}')}\n"
               f"case $lag in 0) s=\"$s\"{one(f'CONFIG SET min-replicas-max-lag {MAX_LAG}')};; esac\n"
               f"w={one(f'DEL {WRITE_CHECK_KEY}')}\n"
               "printf 'set %s\\nwrite %s\\n@@ok\\n' \"$s\" \"$w\"")


def promote_command(env: str, port: int) -> str:
    names = "grep -Eic '^[[:space:]]*(replicaof|slaveof)[[:space:]]' \"$cf\""
    return cli(env, port,
               f"p=$(rc REPLICAOF NO ONE | head -n 1 | cut -c1-{MAX_INFO_LINE})\n"
               f"cf=$(rc INFO server | tr -d '\\r' | sed -n 's/^config_file://p' | head -n 1)\n"
               "w=- n=0\n"
               f"if [ -n \"$cf\" ] && [ -r \"$cf\" ]; then n=$({names}); "
               f"if [ \"$n\" != 0 ]; then w=$(rc CONFIG REWRITE | head -n 1 | cut -c1-{MAX_INFO_LINE}); "
               f"n=$({names}); fi; fi\n"
               f"r=$({_INFO})\n"
               "printf 'replicaof %s\\nconfig %s\\nrewrite %s\\nnames %s\\n%s\\n@@ok\\n' "
               "\"$p\" \"${cf:--}\" \"$w\" \"$n\" \"$r\"")


def writable_command(env: str, port: int) -> str:
    return cli(env, port, f"s=$(rc CONFIG SET min-replicas-to-write 0 | head -n 1 | cut -c1-{MAX_INFO_LINE})"
                                    "\nprintf '%s\\n@@ok\\n' \"$s\"")


def _answer(out: str) -> str:
    return out.replace("@@ok", "").strip()


# ================================================================ the steps


def _on_target(step: Execution, move: MoveSpec, p: MovePayload, command: Callable[[str, int], str]) -> str:
    """A command's answer from the target's Redis (a target step's own host)."""
    return _answer(step.run(command(env_of(step.desired, move.target), p.target_port)))


def _on_source(step: Execution, move: MoveSpec, p: MovePayload, command: Callable[[str, int], str]) -> str:
    """A command's answer from the source's Redis, asked from a step on the target."""
    return _answer(step.run_on(move.source, command(env_of(step.desired, move.source), p.source_port)))


def _source(step: Execution, move: MoveSpec, p: MovePayload, gates: list[Gate]) -> int | None:
    gate, offset = judge_source(move, _on_source(step, move, p, info_command))
    gates.append(gate)
    return offset


def _caught_up(step: Execution, move: MoveSpec, p: MovePayload, gates: list[Gate]) -> None:
    """Gates of the source's offset and the replica's processing of it; FleetError naming the
    first that did not pass."""
    from fleet.resources.runbook import halted

    offset = _source(step, move, p, gates)
    if offset is not None:
        waited = step.start_timeout
        said_now = _on_target(step, move, p, lambda env, port: wait_command(env, port, offset, waited))
        gates.append(judge_offset(move, offset, said_now, waited))
    if not all(g.ok for g in gates):
        raise FleetError(halted(gates))
    step.detail = "; ".join(g.line() for g in gates)


def _move(step: Execution, change: Change) -> tuple[MoveSpec, MovePayload]:
    from fleet.resources.runbook import _move as declared

    move, p = declared(step, change)
    svc = step.service(move.service)
    if p.source_unit != svc.unit:
        raise FleetError(f"the plan stops {p.source_unit} on {p.source}, which is not {move.service}'s unit "
                         f"({svc.unit})")
    return move, p


def _check(step: Execution, change: Change) -> None:
    from fleet.resources.runbook import halted

    move, p = _move(step, change)
    gates = [judge_replica(step.desired, move, _on_target(step, move, p, info_command))]
    if not gates[0].ok:
        raise FleetError(halted(gates))
    _caught_up(step, move, p, gates)


def _read_only(step: Execution, change: Change) -> None:
    from fleet.resources.runbook import halted

    move, p = _move(step, change)
    gate = judge_refused(move, _answer(step.run(read_only_command(env_of(step.desired, move.source),
                                                                  p.source_port))))
    if not gate.ok:
        raise FleetError(halted([gate]))
    step.detail = gate.line()


def _catch_up(step: Execution, change: Change) -> None:
    move, p = _move(step, change)
    _caught_up(step, move, p, [])


def _promote(step: Execution, change: Change) -> None:
    from fleet.resources.runbook import halted

    move, p = _move(step, change)
    gate = judge_promoted(move, _on_target(step, move, p, promote_command))
    if not gate.ok:
        raise FleetError(halted([gate]))
    step.detail = gate.line()


def back_to_writable(step: Execution, change: Change) -> tuple[bool, str]:
    """After a failed read-only, catch-up or promote: the source takes writes again while the
    target is still its replica (a promoted target keeps the source refusing: two masters must
    never both take writes).  (whether the source takes writes again, what was done)."""
    move, p = _move(step, change)
    asked = step.run_on(move.target, info_command(env_of(step.desired, move.target), p.target_port))
    if info(_answer(asked)).get("role") != "slave":
        return False, f"{move.source} left refusing writes: redis on {move.target} is no longer a replica"
    answer = _on_source(step, move, p, writable_command)
    if said(answer) != "OK":
        return False, f"{move.source} could not be made writable again (CONFIG SET answered {said(answer)!r})"
    return True, f"{move.source} takes writes again (min-replicas-to-write 0); the fleet still points at it"


def _stop_source(step: Execution, change: Change) -> None:
    from fleet.resources.runbook import _stop_source as stop

    _move(step, change)  # the unit it stops is the service's
    stop(step, change)


RUN: dict[Action, Callable[[Execution, Change], None]] = {
    Action.MOVE_CHECK: _check, Action.MOVE_READ_ONLY: _read_only, Action.MOVE_CAUGHT_UP: _catch_up,
    Action.MOVE_PROMOTE: _promote, Action.MOVE_STOP_SOURCE: _stop_source}
