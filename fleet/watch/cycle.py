"""One watch cycle's bookkeeping: from the last committed state to the next, through the outbox.

The order is what makes a crash harmless, so it lives here once rather than in each caller:

1. read the notified state from the outbox's checkpoint (what the last committed cycle told);
2. compute this cycle's events (fleet.watch.events.advance, pure);
3. commit the events' messages AND the new state in one atomic write (Outbox.commit);
4. deliver (Outbox.deliver) — separately, so a dead receiver never blocks the commit.

A kill before 3 leaves the previous state: the next run recomputes from it, with its own newer
observation, and nothing had been sent.  A kill after 3 leaves the messages pending and the
state advanced: the next run announces nothing twice and delivers what waits.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleet.notify import Outbox, Target
from fleet.watch.events import Cycle, Event, NotifiedState, advance


def load_state(outbox: Outbox) -> NotifiedState:
    """The notified state of the last committed cycle (empty before the first)."""
    return NotifiedState.from_json(outbox.checkpoint(), where=str(outbox.path))


def record_cycle(outbox: Outbox, cycle: Cycle, targets: Sequence[Target], *, fleet: str,
                 remind_every: float | None = None) -> tuple[list[Event], NotifiedState]:
    """Steps 1–3 above; the caller then writes the metrics and the page, and delivers."""
    events, state = advance(load_state(outbox), cycle, remind_every=remind_every)
    outbox.commit(events, targets, fleet=fleet, checkpoint=state.to_json())
    return events, state
