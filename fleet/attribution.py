"""Crediting observed changes to fleet runs from the hosts' history, whoever ran them.  Pure.

`fleet.audit.attribute` decides whether a journaled step could have made an observed change
(same host and target, the right kind of action, in the window between two observations).
This module feeds it the steps the hosts recorded — made from any checkout — next to this
checkout's own journal steps, and says who ran the crediting run: user, machine, run id and
the desired state's git commit.  The rules are audit's own (`attribute`, `_explains`); nothing
here decides what explains what.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from fleet.audit import JournalStep, ObservedChange, attribute
from fleet.history import HistoryRecord
from fleet.history_cache import HostStep


@dataclass(frozen=True)
class Credit:
    """Who made a change fleet made."""

    run_id: str
    user: str
    machine: str
    commit: str | None  # git commit of the desired state; None: not in git, or not known
    dirty: bool | None
    desired_hash: str
    verified: bool  # False: the crediting record's chain link on its host is broken
    source: str  # "host" (a host's history record) | "journal" (this checkout's journal only)

    def describe(self) -> str:
        """`alice@laptop, desired state at git 3f2a9c1d0b7e (dirty)`."""
        who = f"{self.user}@{self.machine}" if self.machine else self.user
        if self.commit:
            who += f", desired state at git {self.commit[:12]}" + (" (dirty)" if self.dirty else "")
        return who


@dataclass(frozen=True)
class Attributed:
    change: ObservedChange
    credit: Credit | None  # None: changed outside fleet


def journal_step(hs: HostStep) -> JournalStep:
    """A host's step in the shape audit's rules take (a write-env's keys included)."""
    r = hs.record
    return JournalStep(run_id=r.run_id, host=r.host, action=r.action, target=r.target, started=r.started,
                       outcome=hs.outcome, keys=r.keys)


def attribute_with_history(changes: Sequence[ObservedChange], host_steps: Sequence[HostStep], t0: float, t1: float,
                           *, local_steps: Sequence[JournalStep] = (),
                           local_operators: Mapping[str, str] | None = None) -> list[Attributed]:
    """Credit each change seen between t0 and t1 to a run whose step (recorded on the host, or in
    this checkout's journal) could have made it; everything else is "changed outside fleet".

    A run both sources know is described from its host records (they carry the commit).  The
    attribution sentence names who ran the crediting run and the desired state's commit; a
    credit from a record whose chain link is broken says so (the broken chain itself is
    reported as a finding elsewhere)."""
    by_run: dict[str, HistoryRecord] = {}
    records: dict[tuple[str, str, str, str, float | None], HistoryRecord] = {}
    steps: list[JournalStep] = list(local_steps)  # a step both know twice: the same run either way
    for hs in sorted(host_steps, key=lambda s: (s.record.started or 0.0, s.record.seq)):
        r = hs.record
        by_run.setdefault(r.run_id, r)
        records[(r.run_id, r.host, r.action, r.target, r.started)] = r
        steps.append(journal_step(hs))
    steps.sort(key=lambda s: s.started if s.started is not None else 0.0)
    credits = {rid: _credit(r) for rid, r in by_run.items()}
    for rid, op in (local_operators or {}).items():
        if rid not in credits:
            user, _, machine = op.rpartition("@") if "@" in op else (op, "", "")
            credits[rid] = Credit(rid, user, machine, None, None, "", True, "journal")
    operators = {rid: c.describe() for rid, c in credits.items()}
    out: list[Attributed] = []
    for c in attribute(changes, steps, operators, t0, t1):
        if not c.run_id:
            out.append(Attributed(c, None))
            continue
        credit = credits.get(c.run_id)
        rec = next((r for (rid, host, _a, target, started), r in records.items()
                    if rid == c.run_id and host == c.host and target == c.target and started == c.at), None)
        if rec is not None and not rec.verified:
            credit = replace(credit, verified=False) if credit else credit
            c = replace(c, attribution=f"{c.attribution} (its record on {c.host} is not verified: the history "
                                       "chain there is broken)")
        out.append(Attributed(c, credit))
    return out


def _credit(r: HistoryRecord) -> Credit:
    return Credit(run_id=r.run_id, user=r.user, machine=r.machine, commit=r.commit, dirty=r.dirty,
                  desired_hash=r.desired_hash, verified=r.verified, source="host")
