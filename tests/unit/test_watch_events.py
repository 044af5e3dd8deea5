"""`fleet watch` events: told once when first seen, once when resolved; the same finding is
recognised across cycles by its identity, not its text; an unreachable host is news, not a fix;
no secret or fingerprint reaches an event."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from observed import ENV_PATH, EXAMPLE_SECRETS, set_env_value, unreachable
from watch_scenarios import T0, baseline, cycle, desired, host, incident, leaks, s3_hand_edit

from fleet.audit import ObservedChange, build_audit
from fleet.model import Finding
from fleet.watch import events as ev
from fleet.watch.events import (
    ApplyRun,
    Cycle,
    Event,
    NotifiedState,
    WatchStateError,
    advance,
    finding_subject,
    runs_to_read,
)

REPO = Path(__file__).resolve().parents[2]


def settled(results: dict, at: float = T0) -> NotifiedState:  # type: ignore[type-arg]
    """The state after a first cycle on `results` (whatever it announced)."""
    return advance(NotifiedState(), cycle(results, at=at)[0])[1]


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def test_a_converged_fleet_announces_nothing_and_records_its_observation() -> None:
    events, state = advance(NotifiedState(), cycle(baseline(), at=T0, snapshot="S1")[0])
    assert events == []
    assert state.observed_at == T0 and state.snapshot == "S1" and not state.open


def test_a_hand_edit_is_told_once_as_outside_fleet_then_nothing_then_its_resolution() -> None:
    old = baseline()
    state = settled(old)
    new = s3_hand_edit(old)
    events, state = advance(state, cycle(new, at=T0 + 300, previous=old)[0])

    outside = [e for e in events if e.kind == ev.CHANGE_OUTSIDE]
    assert len(outside) == 1
    change = outside[0]
    assert change.host == "franz" and "S3_ENABLED" in change.text and "outside fleet" in change.text
    assert dict(change.data).items() >= {"key": "S3_ENABLED", "old": "true", "new": "false", "host": "franz",
                                         "attribution": "changed outside fleet"}.items()
    assert ev.DRIFT_NEW in kinds(events) and ev.FINDING_NEW in kinds(events)
    drift = next(e for e in events if e.kind == ev.DRIFT_NEW)
    assert drift.host == "franz" and ENV_PATH in drift.text and "S3_ENABLED" in drift.text

    again, state = advance(state, cycle(new, at=T0 + 600, previous=new)[0])
    assert again == [], "a persisting drift or finding is told once"

    fixed, state = advance(state, cycle(old, at=T0 + 900, previous=new)[0])
    assert sorted(set(kinds(fixed))) == [ev.CHANGE_OUTSIDE, ev.DRIFT_RESOLVED, ev.FINDING_RESOLVED]
    assert all(e.severity == "ok" for e in fixed if e.kind.endswith("resolved"))
    assert not state.open


def test_a_finding_whose_message_changes_is_still_the_same_finding() -> None:
    old = baseline()
    first = s3_hand_edit(old)
    state = settled(first)
    # Another wrong value: the env.inconsistent message now says franz=off instead of franz=false.
    second = dict(first)
    second["franz"] = set_env_value(host(first, "franz"), "S3_ENABLED", "off")
    c, report = cycle(second, at=T0 + 300, previous=first)
    assert any("franz=off" in f.message for f in report.findings)
    events, _ = advance(state, c)
    # `off` is also not a boolean: that finding is new; env.inconsistent is not told again.
    assert [e.data for e in events if e.kind == ev.FINDING_NEW] == [
        (("type", "finding"), ("code", "env.not-boolean"), ("host", "franz"), ("severity", "error"))]
    assert ev.FINDING_RESOLVED not in kinds(events)
    assert kinds(events).count(ev.CHANGE_OUTSIDE) == 1  # the change itself is news


def test_a_drift_whose_detail_changes_is_told_as_changed() -> None:
    first = s3_hand_edit(baseline())
    state = settled(first)
    second = dict(first)
    second["franz"] = set_env_value(host(first, "franz"), "S3_BUCKET", "elsewhere")
    events, _ = advance(state, cycle(second, at=T0 + 300)[0])
    changed = [e for e in events if e.kind == ev.DRIFT_CHANGED]
    assert len(changed) == 1 and "S3_BUCKET differs" in changed[0].text and "was:" in changed[0].text


def test_a_reminder_repeats_an_open_item_once_per_interval() -> None:
    broken = s3_hand_edit(baseline())
    _, state = advance(NotifiedState(), cycle(broken, at=T0)[0], remind_every=3600)
    opened = len(state.open)
    assert opened >= 2
    quiet, state = advance(state, cycle(broken, at=T0 + 1800)[0], remind_every=3600)
    assert quiet == []
    due, state = advance(state, cycle(broken, at=T0 + 3600)[0], remind_every=3600)
    assert kinds(due) == [ev.REMINDER] * opened
    assert all("still open since 2027-01-15 08:00:00 UTC" in e.text for e in due)
    assert advance(state, cycle(broken, at=T0 + 3700)[0], remind_every=3600)[0] == []
    assert advance(state, cycle(broken, at=T0 + 99999)[0])[0] == [], "no interval, no reminder"


def test_an_unreachable_host_is_told_once_and_keeps_its_open_items_open() -> None:
    broken = s3_hand_edit(baseline())
    state = settled(broken)
    drift_open = [s for s, o in state.open.items() if o.type == "drift" and o.host == "franz"]
    assert drift_open

    down = dict(broken)
    down["franz"] = unreachable("franz")
    events, state = advance(state, cycle(down, at=T0 + 300)[0])
    assert kinds(events).count(ev.HOST_UNREACHABLE) == 1
    assert not [e for e in events if e.kind == ev.DRIFT_RESOLVED], "silence is not a fix"
    assert all(s in state.open for s in drift_open)
    assert "unreachable" in events[0].text and events[0].host == "franz"

    still, state = advance(state, cycle(down, at=T0 + 600)[0])
    assert ev.HOST_UNREACHABLE not in kinds(still)

    back, state = advance(state, cycle(baseline(), at=T0 + 900)[0])
    assert ev.HOST_BACK in kinds(back) and ev.DRIFT_RESOLVED in kinds(back)
    assert "franz answers again" in next(e.text for e in back if e.kind == ev.HOST_BACK)


def test_the_audit_unreachable_finding_is_not_told_twice() -> None:
    down = baseline()
    down["franz"] = unreachable("franz")
    events, _ = advance(NotifiedState(), cycle(down, at=T0)[0])
    assert not [e for e in events if "audit.unreachable" in e.text]
    assert kinds(events).count(ev.HOST_UNREACHABLE) == 1


def test_items_of_a_host_out_of_scope_are_neither_resolved_nor_reminded() -> None:
    broken = s3_hand_edit(baseline())
    state = settled(broken)
    limited = {h: r for h, r in baseline().items() if h != "franz"}
    c = cycle(limited, at=T0 + 300)[0]
    events, after = advance(state, dataclasses.replace(c, drift=tuple(d for d in c.drift if d.host != "franz")))
    assert not [e for e in events if e.kind == ev.DRIFT_RESOLVED and e.host == "franz"]


def test_apply_runs_are_told_started_then_finished_once_each() -> None:
    state = settled(baseline())
    since, unfinished = runs_to_read(state, T0 + 300)
    assert since == T0 and unfinished == ()
    running = ApplyRun("20270115T080100-a1b2c3", "alice@laptop", started=T0 + 60)
    events, state = advance(state, cycle(baseline(), at=T0 + 300, runs=(running,))[0])
    assert [(e.kind, e.id) for e in events] == [(ev.APPLY_STARTED, f"apply.started:{running.id}")]
    assert running.id in events[0].text and "alice@laptop" in events[0].text
    assert runs_to_read(state, T0 + 600) == (T0 + 300, (running.id,))

    done = dataclasses.replace(running, ended=T0 + 400, outcome="ok", summary="3 changed, 0 failed")
    events, state = advance(state, cycle(baseline(), at=T0 + 600, runs=(done,))[0])
    assert kinds(events) == [ev.APPLY_FINISHED]
    assert "finished: ok" in events[0].text and "3 changed, 0 failed" in events[0].text
    assert events[0].severity == "ok"
    assert advance(state, cycle(baseline(), at=T0 + 900, runs=(done,))[0])[0] == []


def test_an_apply_that_ran_while_nobody_watched_is_told_whole() -> None:
    state = settled(baseline())
    run = ApplyRun("R2", "bob@ops", started=T0 + 10, ended=T0 + 20, outcome="failed", summary="1 failed")
    events, _ = advance(state, cycle(baseline(), at=T0 + 300, runs=(run,))[0])
    assert kinds(events) == [ev.APPLY_STARTED, ev.APPLY_FINISHED]
    assert events[1].severity == "error"


def test_the_apply_events_are_the_same_whoever_builds_them() -> None:
    run = ApplyRun("R3", "carol@ops", started=T0, ended=T0 + 5, outcome="ok")
    assert ev.apply_started(run).id == "apply.started:R3" and ev.apply_finished(run).id == "apply.finished:R3"
    assert ev.apply_started(run) == ev.apply_started(dataclasses.replace(run))


def test_changes_made_by_fleet_and_host_reachability_changes_are_not_outside_changes() -> None:
    ours = ObservedChange("fritz", ENV_PATH, "on fritz, S3_BUCKET in … changed", attribution="fleet apply run R by a",
                          run_id="R", kind="env-key", key="S3_BUCKET")
    host_change = ObservedChange("fritz", "(host)", "on fritz, the host went from answering to not answering")
    c = dataclasses.replace(cycle(baseline(), at=T0)[0], changes=(ours, host_change))
    assert advance(settled(baseline()), c)[0] == []


def test_the_same_cycle_computed_twice_gives_the_same_event_ids() -> None:
    old = baseline()
    state = settled(old)
    c = cycle(s3_hand_edit(old), at=T0 + 300, previous=old)[0]
    assert [e.id for e in advance(state, c)[0]] == [e.id for e in advance(state, c)[0]]
    ids = [e.id for e in advance(state, c)[0]]
    assert len(set(ids)) == len(ids)


def test_no_secret_value_or_fingerprint_reaches_an_event_or_the_state() -> None:
    old = baseline()
    state = settled(old)
    bad = incident()
    events, state = advance(state, cycle(bad, at=T0 + 300, previous=old)[0])
    secret_changes = [e for e in events if e.kind == ev.CHANGE_OUTSIDE and "sensitive: value not shown" in e.text]
    # each of the example's secrets, value not shown
    assert len(secret_changes) == len(EXAMPLE_SECRETS), [e.text for e in events]
    assert all("old" not in dict(e.data) and "new" not in dict(e.data) for e in secret_changes)
    dumped = json.dumps([e.as_dict() for e in events]) + json.dumps(state.to_json())
    assert leaks(dumped) == []
    assert leaks(" ".join(e.text for e in events)) == []


def test_a_declared_sensitive_key_is_masked_whatever_its_name() -> None:
    old = baseline()
    new = dict(old)
    new["franz"] = set_env_value(host(old, "franz"), "S3_BUCKET", "bucket-name-that-is-secret")
    c = cycle(new, at=T0 + 300, previous=old)[0]
    c = dataclasses.replace(c, sensitive_keys=c.sensitive_keys | {"S3_BUCKET"})
    events, _ = advance(settled(old), c)
    change = next(e for e in events if e.kind == ev.CHANGE_OUTSIDE)
    assert "bucket-name-that-is-secret" not in change.text and "sensitive" in change.text


def test_the_notified_state_round_trips_through_json() -> None:
    _, state = advance(NotifiedState(), cycle(incident(), at=T0, snapshot="S9",
                                              runs=(ApplyRun("R", "a@b", started=T0 - 10),))[0])
    text = json.dumps(state.to_json())
    assert NotifiedState.from_json(json.loads(text)) == state
    assert NotifiedState.from_json(None) == NotifiedState()


@pytest.mark.parametrize("damage", [
    {"format": 99}, [], {"format": 1}, {"format": 1, "open": [{"subject": 1}], "runs": {}, "observed_at": None},
    {"format": 1, "open": [], "runs": {}, "observed_at": "yesterday"},
])
def test_a_damaged_state_is_a_clear_error(damage: object) -> None:
    with pytest.raises(WatchStateError) as e:
        NotifiedState.from_json(damage, where="STATE/watch-outbox.json")
    assert "STATE/watch-outbox.json" in e.value.message and e.value.hint


# ---------------------------------------------------------------- identities of findings

# The codes `fleet check` reports on the declared state only; watch judges the observed fleet.
DECLARED_ONLY = {"env.secret-in-clear", "env.not-loaded", "sidekiq.queues-on-host"}


def test_every_rule_code_the_audit_can_report_has_a_subject_pattern() -> None:
    codes: set[str] = set()
    for module in ("fleet/policy.py", "fleet/audit.py"):
        codes |= set(re.findall(r'"(?:error|warning)", "([a-z]+\.[a-z-]+)"', (REPO / module).read_text()))
        codes |= set(re.findall(r'severity, "([a-z]+\.[a-z-]+)"', (REPO / module).read_text()))
    assert len(codes) >= 12, codes
    missing = codes - set(ev._SUBJECT) - ev._TOLD_ELSEWHERE - DECLARED_ONLY
    assert missing == set(), f"add a subject pattern to fleet/watch/events.py for {sorted(missing)}"


def test_the_subject_patterns_match_the_real_messages_of_the_audit() -> None:
    observed = incident()  # its 3_BUCKET is a near miss; add a key that is merely unknown
    observed["franz"] = set_env_value(host(observed, "franz"), "MY_OWN_SETTING", "x")
    report = build_audit(desired(), observed)
    findings = [f for f in report.findings if f.code not in ev._TOLD_ELSEWHERE]
    codes = {f.code for f in findings}
    assert codes >= {"placement.forbidden", "sidekiq.queue-unserved", "sidekiq.scheduler-count", "sidekiq.db-pool",
                     "env.near-miss", "env.unknown-key", "env.not-boolean", "env.inconsistent",
                     "env.invalid-lines"}, codes
    for f in findings:
        pattern = ev._SUBJECT[f.code]
        assert pattern is None or pattern.search(f.message), f"{f.code}: {f.message!r} no longer matches"
    subjects = [finding_subject(f) for f in findings]
    assert len(set(subjects)) == len(subjects), "two different findings share an identity"


def test_a_finding_identity_ignores_counts_and_values_but_not_its_subject() -> None:
    a = Finding("warning", "env.invalid-lines", f"{ENV_PATH} on fritz has 1 line(s) that are not KEY=value",
                host="fritz")
    b = dataclasses.replace(a, message=f"{ENV_PATH} on fritz has 7 line(s) that are not KEY=value")
    c = dataclasses.replace(a, message="/etc/other.env on fritz has 1 line(s) that are not KEY=value")
    assert finding_subject(a) == finding_subject(b) != finding_subject(c)
    k1 = Finding("error", "env.unknown-key", "'3_BUCKET' is not a Mastodon setting (on franz): …", host="franz")
    k2 = dataclasses.replace(k1, message="'OLD_FLAG' is not a Mastodon setting (on franz): …")
    assert finding_subject(k1) != finding_subject(k2)
    s1 = Finding("error", "sidekiq.scheduler-count", "… running: 0 (none)")
    s2 = Finding("error", "sidekiq.scheduler-count", "… running: 2 (a on x, b on y)")
    assert finding_subject(s1) == finding_subject(s2)


def test_an_unknown_rule_falls_back_to_its_message_and_never_merges_two_findings() -> None:
    a = Finding("error", "future.rule", "one thing", host="h")
    b = Finding("error", "future.rule", "another thing", host="h")
    assert finding_subject(a) != finding_subject(b)


def test_subjects_are_unambiguous_whatever_the_names_hold() -> None:
    from fleet.audit import DriftItem
    assert ev.drift_subject(DriftItem("a|b", "unit", "c", "changed")) != ev.drift_subject(
        DriftItem("a", "unit", "b|c", "changed"))


def test_a_cycle_from_an_audit_keeps_what_the_events_need() -> None:
    report = build_audit(desired(), incident())
    c = Cycle.from_audit(report, at=T0, runs=[ApplyRun("R", "a@b", T0)], snapshot="S")
    assert c.findings == tuple(report.findings) and c.drift == report.drift.items
    assert set(c.results) == set(report.status.results) and c.snapshot == "S"


def test_the_state_keeps_the_last_events_for_the_timeline() -> None:
    old = baseline()
    state = settled(old)
    events, state = advance(state, cycle(s3_hand_edit(old), at=T0 + 300, previous=old)[0])
    assert state.recent == tuple(events)
    fixed, state = advance(state, cycle(old, at=T0 + 600, previous=s3_hand_edit(old))[0])
    assert state.recent == (*events, *fixed)
    for i in range(ev.RECENT_EVENTS):
        run = ApplyRun(f"R{i:03d}", "a@b", started=T0 + 700 + i)
        _, state = advance(state, cycle(old, at=T0 + 700 + i, runs=(run,))[0])
    assert len(state.recent) == ev.RECENT_EVENTS and state.recent[-1].text.startswith("fleet apply run R049")
    assert NotifiedState.from_json(json.loads(json.dumps(state.to_json()))).recent == state.recent


def test_a_finding_that_names_its_subject_is_known_by_it() -> None:
    a = Finding("error", "future.rule", "S3 is off on franz", host="franz", extra={"subject": "S3_ENABLED"})
    b = dataclasses.replace(a, message="S3 is now OFF on franz", extra={"subject": "S3_ENABLED"})
    c = dataclasses.replace(a, extra={"subject": "S3_BUCKET"})
    assert finding_subject(a) == finding_subject(b) != finding_subject(c)
