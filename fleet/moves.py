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
from fleet.model import MOVE_METHODS, Desired, HostResult, HostState, Kind, Service
from fleet.policy import STORE_SETTINGS, setting_hosts

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
                if setting.key in sensitive:
                    continue
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


def refuse_undeclared(desired: Desired, observed: Mapping[str, HostResult]) -> None:
    """MoveRefused for a plan that would move a data store: undeclared, not as declared, or —
    until fleet carries out the runbook a declaration asks for (issue 15, part B) — at all."""
    moves = pending(desired, observed)
    refused = refusals(desired, moves)
    if refused:
        message = "; ".join(m for m, _ in refused)
        hint = "\n  ".join(h for _, h in refused)
        raise MoveRefused(f"refusing to plan: {message}", hint=hint)
    if moves:
        m = moves[0]
        raise MoveRefused(f"refusing to plan: the move of {m.service} from {m.sources[0]} to {m.targets[0]} is "
                          f"declared, but this version of fleet cannot yet carry out a move's runbook ({GUIDE})",
                          hint=f"move {m.service} by hand as the guide says, or keep it on {m.sources[0]} for now")
