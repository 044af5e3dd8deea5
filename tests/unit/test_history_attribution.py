"""Crediting observed changes from the hosts' history (fleet/attribution.py): a checkout that never
applied anything credits another checkout's changes to its run — user, machine, run id, commit —
by exactly audit's rules, which the equivalence test holds it to."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from observed import ENV_PATH, EXAMPLE_SECRETS, converged, disabled, edited, example, set_env_value, stopped

from fleet.attribution import attribute_with_history, journal_step
from fleet.audit import EXPLAINED_BY, JournalStep, ObservedChange, attribute, changes_between
from fleet.diff import ACTIONS, Change
from fleet.history import GENESIS, HistoryRecord, host_line, line_hash, outcome_body, parse_record, step_body, verify
from fleet.history_cache import HostStep, host_steps
from fleet.model import HostResult, HostState

WEB = "mastodon-web.service"
T0, T1 = 1_800_000_000.0, 1_800_000_600.0
A_RUN = "20270115T080000-a1a1a1"
COMMIT = "3f2a9c1d0b7e4a55" + "0" * 24


def fritz_changes(change: Callable[[HostState], HostState]) -> list[ObservedChange]:
    old: dict[str, HostResult] = dict(converged(example(), EXAMPLE_SECRETS))
    new = dict(old)
    fritz = old["fritz"]
    assert isinstance(fritz, HostState)
    new["fritz"] = change(fritz)
    return changes_between(old, new)


def records(*steps: tuple[Change, str | None], at: float = T0 + 60, run: str = A_RUN,
            who: str = "alice@laptop") -> list[HistoryRecord]:
    """What the host holds after these steps: each step record, then its outcome record if any."""
    lines: list[str] = []

    def add(body: str) -> None:
        lines.append(host_line(body, seq=len(lines) + 1, prev=line_hash(lines[-1]) if lines else GENESIS))

    for i, (change, outcome) in enumerate(steps):
        add(step_body(change, run_id=run, who=who, desired_hash="d" * 64, started=at + i, commit=COMMIT, dirty=False))
        if outcome is not None:
            add(outcome_body(change, run_id=run, outcome=outcome, ended=at + i + 0.5))
    return [parse_record(line) for line in lines]


def write_env(keys: tuple[str, ...]) -> Change:
    return Change("fritz", "write-env", ENV_PATH, "keys differ", keys=tuple((k, "change", "a", "b") for k in keys))


def test_a_fresh_checkout_credits_another_checkouts_change_to_its_run_and_who_ran_it() -> None:
    changes = fritz_changes(lambda s: set_env_value(set_env_value(s, "S3_ENABLED", "false"), "SMTP_PORT", "2525"))
    got = attribute_with_history(changes, host_steps(records((write_env(("SMTP_PORT",)), "ok"))), T0, T1)
    by_key = {a.change.key: a for a in got}
    assert by_key["S3_ENABLED"].credit is None
    assert by_key["S3_ENABLED"].change.attribution == "changed outside fleet"
    credit = by_key["SMTP_PORT"].credit
    assert credit is not None
    assert (credit.run_id, credit.user, credit.machine, credit.commit, credit.dirty, credit.source) == (
        A_RUN, "alice", "laptop", COMMIT, False, "host")
    assert by_key["SMTP_PORT"].change.attribution == (
        f"fleet apply run {A_RUN} by alice@laptop, desired state at git {COMMIT[:12]}")
    assert by_key["SMTP_PORT"].change.run_id == A_RUN and by_key["SMTP_PORT"].change.at == T0 + 60


def test_a_step_killed_mid_way_still_explains_what_it_may_have_done() -> None:
    changes = fritz_changes(lambda s: stopped(s, WEB))
    (a,) = attribute_with_history(changes, host_steps(records((Change("fritz", "stop", WEB, "r"), None))), T0, T1)
    assert a.credit is not None and a.credit.run_id == A_RUN


def test_a_step_outside_the_window_or_on_another_host_explains_nothing() -> None:
    changes = fritz_changes(lambda s: stopped(s, WEB))
    late = attribute_with_history(changes, host_steps(records((Change("fritz", "stop", WEB, "r"), "ok"),
                                                              at=T1 + 1)), T0, T1)
    elsewhere = attribute_with_history(changes, host_steps(records((Change("franz", "stop", WEB, "r"), "ok"))),
                                       T0, T1)
    assert [a.credit for a in late + elsewhere] == [None, None]


def test_a_record_whose_chain_is_broken_still_credits_but_says_so() -> None:
    recs = records((Change("fritz", "stop", WEB, "r"), "ok"))
    lines = [r.line for r in recs]
    lines[0] = lines[0].replace('"reason":"r"', '"reason":"x"')
    checked, breaks = verify(lines, host="fritz")
    assert breaks and not checked[0].verified
    (a,) = attribute_with_history(fritz_changes(lambda s: stopped(s, WEB)), host_steps(checked), T0, T1)
    assert a.credit is not None and not a.credit.verified
    assert a.change.attribution.endswith("(its record on fritz is not verified: the history chain there is broken)")


def test_the_journals_own_steps_and_the_hosts_records_are_one_source() -> None:
    changes = fritz_changes(lambda s: disabled(stopped(s, WEB), WEB))
    local = [JournalStep("local-run", "fritz", "disable", WEB, T0 + 10, "ok")]
    got = attribute_with_history(changes, host_steps(records((Change("fritz", "stop", WEB, "r"), "ok"))), T0, T1,
                                 local_steps=local, local_operators={"local-run": "bob@desk"})
    by_kind = {a.change.kind: a for a in got}
    assert by_kind["unit-state"].credit is not None and by_kind["unit-state"].credit.run_id == A_RUN
    enabled = by_kind["unit-enablement"]
    assert enabled.credit is not None and (enabled.credit.run_id, enabled.credit.user, enabled.credit.source) == (
        "local-run", "bob", "journal")
    assert enabled.change.attribution == "fleet apply run local-run by bob@desk"


def test_a_run_the_journal_and_the_host_both_know_is_described_from_the_host_with_its_commit() -> None:
    changes = fritz_changes(lambda s: stopped(s, WEB))
    local = [JournalStep(A_RUN, "fritz", "stop", WEB, T0 + 60, "ok")]
    (a,) = attribute_with_history(changes, host_steps(records((Change("fritz", "stop", WEB, "r"), "ok"))), T0, T1,
                                  local_steps=local, local_operators={A_RUN: "alice@laptop"})
    assert a.credit is not None and a.credit.source == "host" and a.credit.commit == COMMIT


# The same rules as audit.attribute: every kind of observed change against every action and
# outcome a recorded step can have, with and without the key a write-env touched.
KINDS = sorted(EXPLAINED_BY) + ["unclassified"]


@pytest.mark.parametrize(("action", "outcome"), list(itertools.product(ACTIONS, ["ok", "failed", "skipped",
                                                                                  "rolled-back", None])))
def test_history_credits_exactly_what_the_journal_would(action: str, outcome: str | None) -> None:
    changes = [ObservedChange("fritz", WEB, f"{kind} {key}", kind="" if kind == "unclassified" else kind, key=key)
               for kind in KINDS for key in ("K", "OTHER")]
    recs = records((Change("fritz", action, WEB, "r", keys=(("K", "change", "a", "b"),)), outcome))
    hs: list[HostStep] = host_steps(recs)
    assert [journal_step(s) for s in hs] == [JournalStep(A_RUN, "fritz", action, WEB, T0 + 60, outcome, ("K",))]
    expected = attribute(changes, [journal_step(s) for s in hs], {A_RUN: "x"}, T0, T1)
    got = attribute_with_history(changes, hs, T0, T1)
    assert [a.change.run_id for a in got] == [c.run_id for c in expected]
    assert any(c.run_id for c in expected) == (outcome in ("ok", "failed", None))  # the comparison is not vacuous


def test_an_edited_unit_is_not_credited_to_a_start_recorded_on_the_host() -> None:
    changes = fritz_changes(lambda s: edited(s, WEB))
    got = attribute_with_history(changes, host_steps(records((Change("fritz", "start", WEB, "r"), "ok"))), T0, T1)
    assert [a.credit for a in got] == [None]
