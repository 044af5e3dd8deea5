"""Whole watch cycles from the building blocks, against a real HTTP receiver on 127.0.0.1: the
issue's story (a hand edit told once, silence, the apply and the resolution), a receiver down for
a cycle, and a process killed between any two steps of a cycle — nothing lost, nothing repeated."""

from __future__ import annotations

from pathlib import Path

import pytest
from observed import ENV_PATH
from watch_scenarios import T0, baseline, desired, s3_hand_edit
from webhook_server import Receiver

from fleet.audit import JournalStep, attribute, build_audit, changes_between
from fleet.model import HostResult
from fleet.notify import Delivery, Outbox, Target, parse_target
from fleet.watch.cycle import load_state, record_cycle
from fleet.watch.events import ApplyRun, Cycle, apply_finished, apply_started, runs_to_read

RUN = "20270115T081200-c0ffee"


class Killed(Exception):
    """The process dies here."""


class Watch:
    """What phase 2's `fleet watch` does each cycle, spelled with the building blocks."""

    def __init__(self, state_dir: Path, target: Target) -> None:
        self.state_dir, self.target = state_dir, target
        self.previous: dict[str, HostResult] | None = None  # the journal's snapshot of the last cycle

    def outbox(self) -> Outbox:
        return Outbox(self.state_dir)  # a new process each time: nothing kept in memory

    def cycle(self, results: dict[str, HostResult], at: float, *, runs: tuple[ApplyRun, ...] = (),
              steps: tuple[JournalStep, ...] = (), kill: str = "") -> None:
        outbox = self.outbox()
        state = load_state(outbox)
        since, _unfinished = runs_to_read(state, at)
        report = build_audit(desired(), results)
        changes = [] if self.previous is None else attribute(
            changes_between(self.previous, results), list(steps), {RUN: "alice@laptop"}, state.observed_at or at, at)
        c = Cycle.from_audit(report, at=at, changes=changes, runs=[r for r in runs if r.started >= since or
                                                                  r.id in _unfinished],
                             previous=self.previous or {}, snapshot=f"S{int(at)}")
        if kill == "before-commit":
            raise Killed(kill)
        record_cycle(outbox, c, [self.target], fleet="hachyderm")
        self.previous = dict(results)
        if kill == "before-delivery":
            raise Killed(kill)
        outbox.deliver([self.target], delivery=Delivery(timeout=2, attempts=2, backoff=0.5), sleep=lambda _: None)


def texts(receiver: Receiver) -> list[str]:
    return [r.body["text"] for r in receiver.requests]


def chat(receiver: Receiver) -> Target:
    return parse_target("slack:" + receiver.url("/chat"))


def test_a_hand_edit_is_one_message_then_silence_then_the_apply_and_the_resolution(tmp_path: Path,
                                                                                    receiver: Receiver) -> None:
    watch = Watch(tmp_path / "state", chat(receiver))
    good = baseline()
    watch.cycle(good, T0)
    assert receiver.requests == [], "a converged fleet is not news"

    broken = s3_hand_edit(good)
    watch.cycle(broken, T0 + 300)
    [message] = texts(receiver)
    assert "franz" in message and "S3_ENABLED" in message and "changed outside fleet" in message
    assert "from `true` to `false`" in message

    watch.cycle(broken, T0 + 600)
    assert len(receiver.requests) == 1, "nothing changed, nothing posted"

    # fleet apply fixes it, posting its start and result to the same targets
    run = ApplyRun(RUN, "alice@laptop", started=T0 + 720, ended=T0 + 760, outcome="ok", summary="1 changed")
    apply_box = watch.outbox()
    apply_box.commit([apply_started(run)], [watch.target], fleet="hachyderm", keep_checkpoint=True)
    apply_box.deliver([watch.target], sleep=lambda _: None)
    apply_box.commit([apply_finished(run)], [watch.target], fleet="hachyderm", keep_checkpoint=True)
    apply_box.deliver([watch.target], sleep=lambda _: None)
    assert "started by alice@laptop" in texts(receiver)[1] and "finished: ok" in texts(receiver)[2]

    step = JournalStep(RUN, "franz", "write-env", ENV_PATH, T0 + 730, "ok", ("S3_ENABLED",))
    watch.cycle(good, T0 + 900, runs=(run,), steps=(step,))
    assert len(receiver.requests) == 4
    resolution = texts(receiver)[3]
    assert resolution.count("[RESOLVED]") == 2 and "S3_ENABLED" in resolution
    assert "outside fleet" not in resolution, "fleet's own change is not an outside change"
    assert RUN not in resolution, "the apply was told once, by apply itself"


def test_a_receiver_down_for_one_cycle_gets_the_event_on_the_next_once(tmp_path: Path, receiver: Receiver) -> None:
    watch = Watch(tmp_path / "state", chat(receiver))
    watch.cycle(baseline(), T0)
    receiver.down()
    watch.cycle(s3_hand_edit(baseline()), T0 + 300)
    receiver.up()
    assert receiver.requests == []
    watch.cycle(s3_hand_edit(baseline()), T0 + 600)
    [message] = texts(receiver)
    assert "S3_ENABLED" in message
    watch.cycle(s3_hand_edit(baseline()), T0 + 900)
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("kill", ["before-commit", "before-delivery"])
def test_a_watch_killed_mid_cycle_and_restarted_loses_and_repeats_nothing(tmp_path: Path, receiver: Receiver,
                                                                         kill: str) -> None:
    watch = Watch(tmp_path / "state", chat(receiver))
    watch.cycle(baseline(), T0)
    with pytest.raises(Killed):
        watch.cycle(s3_hand_edit(baseline()), T0 + 300, kill=kill)
    assert receiver.requests == []
    # restarted: the next cycle observes the same broken fleet
    watch.cycle(s3_hand_edit(baseline()), T0 + 600)
    watch.cycle(s3_hand_edit(baseline()), T0 + 900)
    [message] = texts(receiver)
    assert message.count("S3_ENABLED") >= 2 and "changed outside fleet" in message
    assert Outbox(tmp_path / "state").pending() == []
