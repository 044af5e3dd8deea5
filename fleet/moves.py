"""Moves of a data store: which postgres or redis service a plan would move, and the refusal of a
move nobody declared.  Pure: the desired and the observed state in, moves and refusals out.

A move shows two ways, either of which is enough:

* the service's unit runs on a host where the service is no longer declared (its old home), and
  the plan would start it on a declared host where it does not run;
* a setting Mastodon writes through (DB_HOST, DATABASE_URL, REDIS_HOST, REDIS_URL and Sidekiq's
  own) is observed pointing at one host and the desired env file points it at another, while
  the old host still runs the store (or could not be observed).

Either way, what a plan would otherwise do — start the new server, rewrite the env files,
restart Mastodon — points Mastodon at a server nobody checked holds the data, and leaves the
jobs queued in the old Redis behind.  So a plan that would move a store without a
`[moves.SERVICE]` declaration (or against the one declared) is refused, naming the service,
the hosts, what showed the move, and the exact TOML to declare it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fleet.errors import FleetError
from fleet.model import MOVE_METHODS, Desired, HostResult, HostState, Kind, MoveSpec, Service
from fleet.policy import STORE_SETTINGS, resolve_host, setting_hosts
from fleet.resources.stores import ClusterView, RedisState, clusters_of, redis_of

# The settings a move repoints: where Mastodon writes (the read replica and the cache lose nothing).
MOVE_SETTINGS = tuple(s for s in STORE_SETTINGS
                      if s.key in ("DB_HOST", "DATABASE_URL", "REDIS_HOST", "REDIS_URL", "SIDEKIQ_REDIS_HOST",
                                   "SIDEKIQ_REDIS_URL"))
RUNNING = ("active", "activating", "reloading")
GUIDE = "docs/apply.md, \"Moving a database\""


class MoveRefused(FleetError):
    """A plan would move a data store in a way nobody declared."""


@dataclass(frozen=True)
class Move:
    """A data store the plan would move: off `sources`, onto `targets`, and what showed it."""

    service: str
    kind: Kind
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    evidence: tuple[str, ...]

    def toml(self) -> str:
        """The declaration that would allow it (one source and one target: a move at a time)."""
        return (f"[moves.{self.service}]\nfrom = \"{self.sources[0]}\"\nto = \"{self.targets[0]}\"\n"
                f"method = \"{MOVE_METHODS[self.kind]}\"")


def pending(desired: Desired, observed: Mapping[str, HostResult]) -> list[Move]:
    """Every postgres or redis service the plan would move, in declaration order."""
    states = {h: r for h, r in observed.items() if isinstance(r, HostState)}
    found: dict[str, tuple[dict[str, None], dict[str, None], list[str]]] = {}

    def add(s: Service, sources: list[str], targets: list[str], evidence: str) -> None:
        src, dst, why = found.setdefault(s.name, ({}, {}, []))
        src.update(dict.fromkeys(sources))
        dst.update(dict.fromkeys(targets))
        why.append(evidence)

    stores = [s for s in desired.services if s.kind in MOVE_METHODS]
    for s in stores:
        homes = {h for t in stores if t.unit == s.unit for h in t.hosts}  # a unit declared there is at home
        left = [h for h, st in states.items() if h not in homes and _runs(st, s.unit)]
        # Only a plan that would start it elsewhere moves it: a server left running where nothing
        # points at it any more is a note (diff's), not a move.
        starts = [h for h in s.hosts if h in states and not _runs(states[h], s.unit)]
        if left and starts:
            add(s, left, starts, f"{s.unit} runs on {', '.join(left)}, where {s.name} is not declared, "
                f"and would start on {', '.join(starts)}")
    for ef in desired.env_files:
        sensitive = set(ef.sensitive_keys())
        for host in ef.hosts:
            st = states.get(host)
            seen = st.env_file(ef.path) if st is not None else None
            if seen is None or not seen.present:
                continue  # a new env file points nowhere yet: nothing is repointed
            now, want = seen.value_map(), ef.values_for(host)
            for setting in MOVE_SETTINGS:
                said = (setting.key, *setting.port_keys)
                if setting.key in sensitive or [now.get(k) for k in said] == [want.get(k) for k in said]:
                    continue  # unchanged: nothing to resolve (a scan of the inventory per host and key)
                old = setting_hosts(desired, host, setting, now)
                new = setting_hosts(desired, host, setting, want)
                if not old or not new or set(old) == set(new):
                    continue
                svc = next((s for s in stores if s.kind == setting.kind and set(s.hosts) & set(new)), None)
                gone = [h for h in old if h not in new and (h not in states or _runs(states[h], svc.unit))] \
                    if svc is not None else []
                if svc is not None and gone:
                    add(svc, gone, [h for h in new if h in svc.hosts],
                        f"{setting.key} on {host} points at {', '.join(gone)} and would point at {', '.join(new)}")
    moves = []
    for s in stores:
        if s.name in found:
            src, dst, why = found[s.name]
            moves.append(Move(s.name, s.kind, tuple(src), tuple(dst), tuple(_grouped(why))))
    return moves


def _runs(state: HostState, unit: str) -> bool:
    u = state.unit(unit)
    return u is not None and u.active_state in RUNNING


def _grouped(evidence: list[str]) -> list[str]:
    """`DB_HOST on fritz …` and `DB_HOST on franz …` as one `DB_HOST on fritz, franz …`."""
    out: dict[tuple[str, str], list[str]] = {}
    for e in evidence:
        if " on " in e and " points at " in e:
            key, rest = e.split(" on ", 1)
            host, tail = rest.split(" points at ", 1)
            out.setdefault((key, tail), []).append(host)
        else:
            out.setdefault((e, ""), [])
    return [f"{k} on {', '.join(sorted(set(hosts)))} points at {tail}" if tail else k
            for (k, tail), hosts in out.items()]


def refusals(desired: Desired, moves: list[Move]) -> list[tuple[str, str]]:
    """(message, hint) for each move that is not declared, or not as declared."""
    out = []
    for m in moves:
        said = f"{m.service} would move from {', '.join(m.sources)} to {', '.join(m.targets) or 'nowhere'}"
        why = "; ".join(m.evidence)
        declared = desired.move(m.service)
        if declared is None:
            single = "" if len(m.sources) == 1 and len(m.targets) == 1 else " (one source and one target at a time)"
            out.append((f"{said} without a move declaration ({why})",
                        f"declare the move{single} in {desired.source or 'the desired state'}, then plan again "
                        f"({GUIDE}); or keep {m.service} where it runs:\n" + _indented(m.toml())))
        elif m.sources != (declared.source,) or declared.target not in m.targets:
            out.append((f"{said}, but [moves.{m.service}] declares {declared.source} -> {declared.target} ({why})",
                        f"correct [moves.{m.service}] to the move the plan would make, or the desired state to the "
                        f"move declared ({GUIDE}):\n" + _indented(m.toml())))
    return out


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@dataclass(frozen=True)
class Gate:
    """One check of a move's data, judged on what the hosts' own tools said (the data stores
    kind's read-only probes, fleet/resources/stores.py); `detail` says what was seen."""

    check: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'NOT YET'}: {self.check}: {self.detail}"


def data_gates(desired: Desired, move: MoveSpec, observed: Mapping[str, HostResult]) -> list[Gate]:
    """Whether the target holds the source's data now: for Postgres a streaming standby of the
    source that has replayed all the source's WAL; for Redis a connected replica of the source
    with as many keys.  Read from one observation; the first that cannot pass ends the list."""
    svc = desired.service(move.service)
    src, dst = observed.get(move.source), observed.get(move.target)
    if svc is None:
        return []
    for host, state in ((move.source, src), (move.target, dst)):
        if not isinstance(state, HostState):
            return [Gate(f"{host} observed", False, f"{host} could not be observed")]
    assert isinstance(src, HostState) and isinstance(dst, HostState)
    if svc.kind == Kind.POSTGRES:
        return _postgres_gates(desired, svc, move, clusters_of(src, svc.unit), clusters_of(dst, svc.unit))
    return _redis_gates(desired, move, redis_of(src, svc.unit), redis_of(dst, svc.unit))


def _postgres_gates(desired: Desired, svc: Service, move: MoveSpec, source: list[ClusterView],
                    target: list[ClusterView]) -> list[Gate]:
    if not svc.probe:
        return [Gate("probe allowed", False, f"services.{svc.name} does not say probe = true: fleet reads a "
                     "standby's upstream and replay position only through psql, and only when allowed")]
    primary = next((v for v in source if v.probe is not None and v.probe.role == "primary"), None)
    out = [Gate(f"{move.source} is the primary", primary is not None,
                f"{primary.label} on {move.source} is a primary at WAL {primary.probe.lsn}"
                if primary is not None and primary.probe is not None else
                f"no probed primary cluster of {svc.unit} on {move.source} ({_pg_seen(source)})")]
    standby = next((v for v in target if v.probe is not None and v.probe.in_recovery), None)
    if standby is None or standby.probe is None:
        out.append(Gate(f"{move.target} is a standby of {move.source}", False,
                        f"no standby cluster of {svc.unit} on {move.target} ({_pg_seen(target)}): a new, empty "
                        "cluster would pass a TCP check; make it a streaming standby of the source first"))
        return out
    up = standby.probe.upstream
    from_source = up is not None and move.source in resolve_host(desired, up.host)
    out.append(Gate(f"{move.target} is a standby of {move.source}", from_source and up is not None
                    and up.status == "streaming",
                    f"{standby.label} on {move.target} streams from {up.host}:{up.port} ({up.status})"
                    if up is not None else f"{standby.label} on {move.target} has no WAL receiver"))
    if primary is None or primary.probe is None or primary.probe.lsn is None or not out[-1].ok:
        return out
    replayed = standby.probe.replay_lsn
    behind = primary.probe.lsn - replayed if replayed is not None else None
    out.append(Gate("caught up", behind is not None and behind <= 0,
                    f"{behind} bytes of WAL behind {move.source}" if behind is not None and behind > 0 else
                    "replayed everything the primary had written" if behind is not None else
                    "its replay position is unknown"))
    return out


def _pg_seen(views: list[ClusterView]) -> str:
    return ", ".join(f"{v.label}: {v.role or 'role unknown'}" for v in views) or "no cluster seen"


def _redis_gates(desired: Desired, move: MoveSpec, source: RedisState | None,
                 target: RedisState | None) -> list[Gate]:
    out = [Gate(f"{move.source} is the primary", source is not None and source.role == "master",
                f"redis on {move.source}: {source.role or source.error or source.ping or 'no answer'}"
                if source is not None else f"redis on {move.source} was not asked")]
    if target is None or target.role != "slave" or target.master is None:
        seen = (target.role or target.error or target.ping or "no answer") if target is not None else "not asked"
        out.append(Gate(f"{move.target} is a replica of {move.source}", False,
                        f"redis on {move.target}: {seen}; make it a replica of the source first (REPLICAOF)"))
        return out
    host, port = target.master
    linked = move.source in resolve_host(desired, host) and target.link == "connected"
    out.append(Gate(f"{move.target} is a replica of {move.source}", linked,
                    f"redis on {move.target} replicates {host}:{port} (link {target.link or 'unknown'})"))
    if not linked or source is None or source.keys is None or target.keys is None:
        return out
    out.append(Gate("holds the source's keys", target.keys == source.keys,
                    f"{target.keys} keys on {move.target}, {source.keys} on {move.source}"))
    return out


def refuse_undeclared(desired: Desired, observed: Mapping[str, HostResult]) -> list[MoveSpec]:
    """The declared moves the plan carries out as a runbook (fleet/resources/runbook.py): one move
    at a time, of Postgres by streaming replica or of Redis by replica.  MoveRefused for a plan
    that would move a data store undeclared, not as declared, or in a way fleet cannot yet run
    (two moves at once)."""
    moves = pending(desired, observed)
    refused = refusals(desired, moves)
    if refused:
        message = "; ".join(m for m, _ in refused)
        hint = "\n  ".join(h for _, h in refused)
        raise MoveRefused(f"refusing to plan: {message}", hint=hint)
    declared = [d for m in moves if (d := desired.move(m.service)) is not None]
    assert len(declared) == len(moves)  # refusals() let through only moves as declared
    if len(declared) <= 1:
        return declared
    said = []
    for d in declared:
        now = "; ".join(g.line() for g in data_gates(desired, d, observed))
        said.append(f"{d.service} from {d.source} to {d.target} (its data now: {now})")
    m = moves[0]
    why = "fleet runs one move's runbook at a time"
    raise MoveRefused(f"refusing to plan: the move of {'; and of '.join(said)} is declared, but {why} ({GUIDE})",
                      hint=f"move {m.service} by hand as the guide says, checking its data with these gates, "
                           f"or keep it on {m.sources[0]} for now")
