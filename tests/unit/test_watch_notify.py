"""Notifications: targets from specs and the desired state, messages per kind of receiver, and
delivery through the outbox to a real HTTP server on 127.0.0.1 — exactly once across a server
that is down, a receiver that fails or hangs, and a process that dies between any two steps."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from watch_scenarios import T0, WEBHOOK_URLS, baseline, cycle, incident, leaks, s3_hand_edit
from webhook_server import HANG, Receiver

from fleet import notify
from fleet.notify import (
    DISCORD,
    SLACK,
    WEBHOOK,
    Delivery,
    NotifyError,
    Outbox,
    Target,
    parse_target,
    render,
    send,
    validate_watch,
)
from fleet.watch.events import ApplyRun, Event, NotifiedState, advance, apply_finished, apply_started

DISCORD_URL, SLACK_URL, GENERIC_URL = WEBHOOK_URLS
FAST = Delivery(timeout=2.0, attempts=3, backoff=1.0, max_backoff=8.0)


class Crash(Exception):
    """A simulated kill of the process at one step of delivery."""


def events_of(results: dict[str, Any], previous: dict[str, Any] | None = None) -> list[Event]:
    state = advance(NotifiedState(), cycle(previous or baseline(), at=T0)[0])[1]
    return advance(state, cycle(results, at=T0 + 300, previous=previous or baseline())[0])[0]


def no_sleep(waits: list[float]) -> Any:
    return waits.append


# ---------------------------------------------------------------- targets


@pytest.mark.parametrize("spec, kind", [
    ("https://discord.com/api/webhooks/1/abc", DISCORD),
    ("https://discordapp.com/api/webhooks/1/abc", DISCORD),
    ("https://ptb.discord.com/api/webhooks/1/abc", DISCORD),
    ("https://hooks.slack.com/services/T/B/x", SLACK),
    ("https://chat.example.org/hooks/abc", WEBHOOK),
    ("https://discord.com/not-a-webhook", WEBHOOK),
    ("slack:https://mattermost.example.org/hooks/abc", SLACK),
    ("discord:https://relay.example.org/x", DISCORD),
    ("WEBHOOK:https://discord.com/api/webhooks/1/abc", WEBHOOK),
])
def test_the_kind_follows_the_url_or_an_explicit_prefix(spec: str, kind: str) -> None:
    assert parse_target(spec).kind == kind


def test_env_references_read_the_url_from_the_environment() -> None:
    t = parse_target("env:HOOK", environ={"HOOK": SLACK_URL})
    assert (t.kind, t.url) == (SLACK, SLACK_URL) and "env:HOOK" in t.origin
    assert parse_target("discord:env:HOOK", environ={"HOOK": GENERIC_URL}).kind == DISCORD
    assert parse_target("env:HOOK", environ={"HOOK": f"webhook:{DISCORD_URL}"}).kind == WEBHOOK
    with pytest.raises(NotifyError, match="HOOK is not set"):
        parse_target("env:HOOK", environ={})
    with pytest.raises(NotifyError, match="not an environment variable name"):
        parse_target("env:NO-DASH", environ={})


@pytest.mark.parametrize("spec", ["ftp://discord.com/api/webhooks/1/SecretTokenPart", "https:///SecretTokenPart",
                                  "https://host:99999/SecretTokenPart", "https://host/Secret TokenPart",
                                  "discord:SecretTokenPart-no-url"])
def test_a_bad_target_is_a_clear_error_that_never_shows_the_url(spec: str) -> None:
    with pytest.raises(NotifyError) as e:
        parse_target(spec, origin="--notify")
    assert "--notify" in str(e.value) and e.value.hint
    assert "SecretTokenPart" not in str(e.value)


def test_a_target_never_prints_its_url() -> None:
    t = parse_target(DISCORD_URL)
    for shown in (repr(t), str(t), t.shown, f"{t}", t.key):
        assert leaks(shown) == [], shown
    assert t.shown == "discord:https://discord.com/…mnop"
    assert parse_target(DISCORD_URL).key == t.key != parse_target(SLACK_URL).key


# ---------------------------------------------------------------- [watch] in desired_state.toml


def test_a_good_watch_table_gives_its_settings_and_no_finding() -> None:
    settings, findings = validate_watch({"notify": ["env:FLEET_HOOK", "slack:env:OPS", "http://127.0.0.1:9/h"],
                                         "remind_every": "4h"}, file="desired_state.toml")
    assert findings == []
    assert settings.notify == ("env:FLEET_HOOK", "slack:env:OPS", "http://127.0.0.1:9/h")
    assert settings.remind_every == 4 * 3600
    assert validate_watch(None, file="d.toml") == (notify.WatchSettings(), [])


@pytest.mark.parametrize("table, code, key", [
    ({"notify": [DISCORD_URL]}, "config.credential-in-clear", "watch.notify"),
    ({"notify": ["discord:" + SLACK_URL]}, "config.credential-in-clear", "watch.notify"),
    ({"notify": ["ftp://x/y"]}, "config.bad-value", "watch.notify"),
    ({"notify": ["teams:https://x/y"]}, "config.bad-value", "watch.notify"),
    ({"notify": ["env:BAD-NAME"]}, "config.bad-name", "watch.notify"),
    ({"notify": [1]}, "config.wrong-type", "watch.notify"),
    ({"notify": "env:X"}, "config.wrong-type", "watch.notify"),
    ({"notfy": []}, "config.unknown-key", "watch.notfy"),
    ({"remind_every": "soon"}, "config.bad-value", "watch.remind_every"),
    ({"remind_every": 5}, "config.bad-value", "watch.remind_every"),
    ({"remind_every": True}, "config.bad-value", "watch.remind_every"),
    ("notify", "config.wrong-type", "watch"),
])
def test_a_bad_watch_table_is_one_finding_naming_file_and_key_and_never_the_url(table: object, code: str,
                                                                                  key: str) -> None:
    _, findings = validate_watch(table, file="desired_state.toml")
    assert [(f.severity, f.code, f.file, f.key) for f in findings] == [("error", code, "desired_state.toml", key)]
    f = findings[0]
    assert f.hint and "\n" not in f.message
    assert leaks(f.message + f.hint) == []
    if code == "config.unknown-key":
        assert "did you mean notify?" in f.hint


# ---------------------------------------------------------------- messages


def test_discord_gets_content_without_mentions_and_slack_gets_text() -> None:
    events = events_of(s3_hand_edit(baseline()))
    [d] = render(events, parse_target(DISCORD_URL), fleet="hachyderm")
    assert set(d) == {"content", "allowed_mentions"} and d["allowed_mentions"] == {"parse": []}
    assert "franz" in d["content"] and "S3\\_ENABLED" in d["content"] and "CHANGED OUTSIDE FLEET" in d["content"]
    [s] = render(events, parse_target(SLACK_URL), fleet="hachyderm")
    assert set(s) == {"text"} and "S3_ENABLED" in s["text"] and "outside fleet" in s["text"]


def test_a_generic_webhook_gets_each_event_as_data() -> None:
    events = events_of(s3_hand_edit(baseline()))
    bodies = render(events, parse_target(GENERIC_URL), fleet="hachyderm")
    assert len(bodies) == len(events)
    outside = next(b for b in bodies if b["kind"] == "change.outside")
    assert outside["fleet"] == "hachyderm" and outside["host"] == "franz" and outside["id"].startswith("change.")
    assert outside["data"]["key"] == "S3_ENABLED" and (outside["data"]["old"], outside["data"]["new"]) == (
        "true", "false")


def test_hostile_text_cannot_ping_link_or_format_in_chat() -> None:
    e = Event("x", "finding.new", T0, "error",
              "@everyone <@123> [click](https://evil.example) **bold** <!channel> & co")
    [d] = render([e], parse_target(DISCORD_URL), fleet="f")
    assert "\\[click\\]\\(https://evil.example\\)" in d["content"] and "\\*\\*bold\\*\\*" in d["content"]
    assert "\\<@123\\>" in d["content"] and d["allowed_mentions"] == {"parse": []}
    [s] = render([e], parse_target(SLACK_URL), fleet="f")
    assert "&lt;!channel&gt; &amp; co" in s["text"] and "<!channel>" not in s["text"]


def test_a_long_digest_is_split_to_the_receivers_limit_and_keeps_every_event() -> None:
    many = [Event(f"e{i}", "drift.new", T0, "warning", f"drift {i}: " + "x" * 150) for i in range(40)]
    for url, field, limit in ((DISCORD_URL, "content", notify.DISCORD_LIMIT), (SLACK_URL, "text", notify.SLACK_LIMIT)):
        bodies = render(many, parse_target(url), fleet="f")
        assert len(bodies) > 1 and all(len(b[field]) <= limit for b in bodies)
        text = "\n".join(b[field] for b in bodies)
        assert all(f"drift {i}: " in text for i in range(40))
        assert f"(part {len(bodies)}/{len(bodies)})" in bodies[-1][field]
    huge = [Event("h", "drift.new", T0, "warning", "y" * 10_000)]
    assert len(render(huge, parse_target(DISCORD_URL), fleet="f")[0]["content"]) <= notify.DISCORD_LIMIT


def test_no_message_holds_a_secret_a_fingerprint_or_a_webhook_url() -> None:
    events = events_of(incident())
    # An event text that quotes a webhook URL (as an error message might) is redacted too.
    events.append(Event("u", "host.unreachable", T0, "error", f"relay {GENERIC_URL} said no"))
    targets = [parse_target(u) for u in WEBHOOK_URLS]
    for t in targets:
        bodies = render(events, t, fleet="hachyderm", urls=[x.url for x in targets])
        dumped = json.dumps(bodies, ensure_ascii=False)
        assert leaks(dumped) == [], t.kind
        assert "(sensitive" in dumped  # the secrets were there, masked
    [one] = render([events[-1]], targets[0], fleet="f", urls=[GENERIC_URL])
    assert "relay https://alerts.example.org/…t123 said no" in one["content"]
    [alone] = render([events[-1]], targets[0], fleet="f")  # not a configured URL: its token=… still goes
    assert leaks(alone["content"]) == []


# ---------------------------------------------------------------- sending


def test_a_failing_receiver_is_retried_with_exponential_backoff_until_it_accepts(receiver: Receiver) -> None:
    receiver.answers = [503, 502, 200]
    waits: list[float] = []
    result = send(parse_target(receiver.url()), {"text": "hi"}, message_id="m1", delivery=FAST,
                  sleep=no_sleep(waits))
    assert (result.ok, result.status, result.attempts) == (True, 200, 3)
    assert waits == [1.0, 2.0]
    assert [r.headers["idempotency-key"] for r in receiver.requests] == ["m1"] * 3
    assert receiver.requests[0].headers["content-type"] == "application/json"
    assert receiver.requests[0].headers["user-agent"].startswith("fleet/")


def test_retries_are_bounded_and_their_waits_capped(receiver: Receiver) -> None:
    receiver.default = 500
    waits: list[float] = []
    result = send(parse_target(receiver.url()), {"text": "hi"}, message_id="m",
                  delivery=Delivery(timeout=2, attempts=6, backoff=1.0, max_backoff=4.0), sleep=no_sleep(waits))
    assert not result.ok and result.status == 500 and result.attempts == 6 and len(receiver.requests) == 6
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert "500" in result.error


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_a_client_error_is_not_retried_in_the_same_cycle(receiver: Receiver, status: int) -> None:
    receiver.default = status
    result = send(parse_target(receiver.url()), {}, message_id="m", delivery=FAST, sleep=no_sleep([]))
    assert (result.ok, result.status, result.attempts) == (False, status, 1)


def test_a_redirect_is_reported_not_followed(receiver: Receiver) -> None:
    receiver.answers, receiver.location = [302], "/elsewhere"
    result = send(parse_target(receiver.url()), {}, message_id="m", delivery=FAST, sleep=no_sleep([]))
    assert (result.ok, result.status) == (False, 302)
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_a_receiver_that_hangs_times_out(receiver: Receiver) -> None:
    receiver.answers = [HANG]
    result = send(parse_target(receiver.url()), {}, message_id="m",
                  delivery=Delivery(timeout=0.3, attempts=1), sleep=no_sleep([]))
    assert (result.ok, result.status) == (False, 0) and "timed out" in result.error


def test_a_refused_connection_is_retried_and_reported_without_the_url(receiver: Receiver) -> None:
    receiver.down()
    waits: list[float] = []
    t = parse_target(receiver.url("/hook/SecretTokenPart"))
    result = send(t, {}, message_id="m", delivery=FAST, sleep=no_sleep(waits))
    assert (result.ok, result.status, result.attempts) == (False, 0, 3) and len(waits) == 2
    assert "refused" in result.error.lower() and "SecretTokenPart" not in result.error


# ---------------------------------------------------------------- the outbox


def box(tmp_path: Path, clock: list[float] | None = None) -> Outbox:
    now = clock if clock is not None else [T0]
    return Outbox(tmp_path / "state", now=lambda: now[0])


def deliver(outbox: Outbox, targets: list[Target], **kw: Any) -> notify.DeliveryReport:
    return outbox.deliver(targets, delivery=FAST, sleep=no_sleep([]), **kw)


def test_a_committed_cycle_is_delivered_once_to_every_target(tmp_path: Path, receiver: Receiver) -> None:
    chat = parse_target("slack:" + receiver.url("/chat"))
    hook = parse_target(receiver.url("/events"))
    events = events_of(s3_hand_edit(baseline()))
    outbox = box(tmp_path)
    added = outbox.commit(events, [chat, hook], fleet="hachyderm", checkpoint={"cycle": 1})
    assert len(added) == 1 + len(events) and outbox.checkpoint() == {"cycle": 1}
    report = deliver(outbox, [chat, hook])
    assert len(report.sent) == len(added) and report.kept == 0 and report.failed == {}
    assert [r.path for r in receiver.requests] == ["/chat"] + ["/events"] * len(events)
    assert deliver(outbox, [chat, hook]).sent == [] and len(receiver.requests) == 1 + len(events)
    # the same events committed again (a recomputed cycle) are not sent again
    assert outbox.commit(events, [chat, hook], fleet="hachyderm") == []


def test_a_receiver_down_for_one_cycle_gets_the_message_on_the_next_once(tmp_path: Path,
                                                                         receiver: Receiver) -> None:
    t = parse_target("discord:" + receiver.url())
    outbox = box(tmp_path)
    outbox.commit(events_of(s3_hand_edit(baseline())), [t], fleet="hachyderm")
    receiver.down()
    first = deliver(outbox, [t])
    assert first.sent == [] and first.kept == 1 and t.shown in first.failed
    assert leaks("\n".join(first.lines()), urls=[t.url]) == [] and "kept for the next cycle" in first.lines()[0]
    [pending] = outbox.pending()
    assert pending.attempts == 3 and "refused" in pending.last_error.lower()

    receiver.up()
    second = deliver(outbox, [t])
    assert len(second.sent) == 1 and second.kept == 0
    assert len(receiver.requests) == 1 and "S3\\_ENABLED" in receiver.requests[0].body["content"]
    assert deliver(outbox, [t]).sent == [] and len(receiver.requests) == 1


def test_a_failing_target_waits_without_holding_back_the_others(tmp_path: Path, receiver: Receiver) -> None:
    good = parse_target("slack:" + receiver.url("/good"))
    bad = parse_target("slack:" + receiver.url("/bad"))
    receiver.answers = [503, 503, 503]  # the first message tried: the bad target's, three times
    outbox = box(tmp_path)
    outbox.commit([Event("e1", "drift.new", T0, "warning", "one")], [bad, good], fleet="f")
    outbox.commit([Event("e2", "drift.new", T0, "warning", "two")], [bad, good], fleet="f")
    report = deliver(outbox, [bad, good])
    assert [r.path for r in receiver.requests] == ["/bad"] * 3 + ["/good", "/good"]
    assert report.kept == 2 and set(report.failed) == {bad.shown}
    assert deliver(outbox, [bad, good]).kept == 0
    assert [r.body["text"].splitlines()[1] for r in receiver.requests[-2:]] == ["[DRIFT] one", "[DRIFT] two"]


@pytest.mark.parametrize("step", ["send", "accepted", "removed"])
def test_a_crash_at_any_step_of_delivery_loses_nothing_and_repeats_only_in_the_documented_window(
        tmp_path: Path, receiver: Receiver, step: str) -> None:
    t = parse_target(receiver.url())
    events = events_of(s3_hand_edit(baseline()))
    box(tmp_path).commit(events, [t], fleet="hachyderm")

    def crash(at: str, message: notify.Pending) -> None:
        if at == step and message.events[0] == events[1].id:
            raise Crash(at)

    with pytest.raises(Crash):
        deliver(box(tmp_path), [t], hook=crash)
    deliver(box(tmp_path), [t])  # the restarted process
    ids = [r.body["id"] for r in receiver.requests]
    assert set(ids) == {e.id for e in events}, "nothing lost"
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if step == "accepted":
        # Accepted with a 2xx, then the process died before the removal reached the disk: the one
        # duplicate window.  It carries the same message id, so a receiver can drop it.
        assert repeated == [events[1].id]
        keys = [r.headers["idempotency-key"] for r in receiver.requests if r.body["id"] == events[1].id]
        assert len(keys) == 2 and keys[0] == keys[1]
    else:
        assert repeated == []
    assert box(tmp_path).pending() == []


def test_a_crash_while_committing_leaves_the_previous_outbox_whole(tmp_path: Path, receiver: Receiver,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    t = parse_target(receiver.url())
    outbox = box(tmp_path)
    outbox.commit([Event("e1", "drift.new", T0, "warning", "one")], [t], fleet="f", checkpoint={"n": 1})
    before = outbox.path.read_bytes()

    def killed(*_: Any) -> None:
        raise Crash("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Crash):
        outbox.commit([Event("e2", "drift.new", T0, "warning", "two")], [t], fleet="f", checkpoint={"n": 2})
    monkeypatch.undo()
    assert outbox.path.read_bytes() == before and outbox.checkpoint() == {"n": 1}
    assert [p.name for p in outbox.dir.iterdir() if p.name.endswith(".tmp")] == []
    outbox.commit([Event("e2", "drift.new", T0, "warning", "two")], [t], fleet="f", checkpoint={"n": 2})
    deliver(outbox, [t])
    assert [r.body["id"] for r in receiver.requests] == ["e1", "e2"]


def test_an_apply_posted_by_apply_and_read_by_watch_is_one_message(tmp_path: Path, receiver: Receiver) -> None:
    t = parse_target("slack:" + receiver.url())
    run = ApplyRun("20270115T080000-abc123", "alice@laptop", T0, T0 + 60, "ok", "2 changed")
    apply_box = box(tmp_path)
    apply_box.commit([apply_started(run)], [t], fleet="f", keep_checkpoint=True)
    deliver(apply_box, [t])
    apply_box.commit([apply_finished(run)], [t], fleet="f", keep_checkpoint=True)  # not delivered yet
    # fleet watch reads both from the journal in its next cycle
    watch_box = box(tmp_path)
    assert watch_box.commit([apply_started(run), apply_finished(run)], [t], fleet="f", checkpoint={"w": 1}) == []
    deliver(watch_box, [t])
    texts = [r.body["text"] for r in receiver.requests]
    assert len(texts) == 2 and "started by alice@laptop" in texts[0] and "finished: ok" in texts[1]
    assert watch_box.checkpoint() == {"w": 1}


def test_apply_posting_leaves_the_watch_checkpoint_alone(tmp_path: Path) -> None:
    t = parse_target("https://relay.example.org/h")
    outbox = box(tmp_path)
    outbox.commit([], [t], fleet="f", checkpoint={"watch": "state"})
    outbox.commit([Event("a", "apply.started", T0, "info", "x")], [t], fleet="f", keep_checkpoint=True)
    assert outbox.checkpoint() == {"watch": "state"}


def test_messages_for_a_target_no_longer_configured_wait_unsent(tmp_path: Path, receiver: Receiver) -> None:
    old = parse_target(receiver.url("/old"))
    outbox = box(tmp_path)
    outbox.commit([Event("e1", "drift.new", T0, "warning", "one")], [old], fleet="f")
    report = deliver(outbox, [parse_target(receiver.url("/new"))])
    assert receiver.requests == [] and report.unknown_targets == 1 and report.kept == 1
    assert deliver(outbox, [old]).kept == 0 and len(receiver.requests) == 1


def test_a_full_outbox_drops_its_oldest_and_says_so(tmp_path: Path, receiver: Receiver,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "MAX_PENDING", 3)
    t = parse_target(receiver.url())
    outbox = box(tmp_path)
    outbox.commit([Event(f"e{i}", "drift.new", T0, "warning", str(i)) for i in range(5)], [t], fleet="f")
    report = deliver(outbox, [t])
    assert report.dropped == 2 and any("2 oldest" in line for line in report.lines())
    assert [r.body["id"] for r in receiver.requests] == ["e2", "e3", "e4"]


def test_the_outbox_is_private_and_holds_no_url_or_secret(tmp_path: Path) -> None:
    targets = [parse_target(u) for u in WEBHOOK_URLS]
    outbox = box(tmp_path)
    outbox.commit(events_of(incident()), targets, fleet="hachyderm", checkpoint={"k": "v"})
    assert stat.S_IMODE(outbox.path.stat().st_mode) == 0o600
    assert leaks(outbox.path.read_text()) == []


def test_the_outbox_forgets_delivered_ids_after_a_month(tmp_path: Path, receiver: Receiver) -> None:
    t = parse_target(receiver.url())
    clock = [T0]
    outbox = box(tmp_path, clock)
    outbox.commit([Event("e1", "drift.new", T0, "warning", "one")], [t], fleet="f")
    deliver(outbox, [t])
    assert outbox.commit([Event("e1", "drift.new", T0, "warning", "one")], [t], fleet="f") == []
    clock[0] = T0 + notify.DELIVERED_MEMORY_SECONDS + 1
    outbox.commit([], [t], fleet="f")  # any write prunes
    assert "e1" not in outbox.path.read_text()


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 7}', b'{"format": 1, "pending": [{}], "delivered": {}}',
                                     b"[]"])
def test_a_damaged_outbox_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    outbox = box(tmp_path)
    outbox.dir.mkdir(parents=True)
    outbox.path.write_bytes(content)
    with pytest.raises(NotifyError) as e:
        outbox.pending()
    assert str(outbox.path) in e.value.message and "move it away" in e.value.hint


def test_commits_from_two_processes_sharing_a_state_directory_are_all_kept(tmp_path: Path) -> None:
    t = parse_target("https://relay.example.org/h")
    start = threading.Barrier(4)

    def writer(n: int) -> None:
        outbox = box(tmp_path)  # its own open file descriptions, as another process would have
        start.wait(10)  # hang guard
        for i in range(15):
            outbox.commit([Event(f"w{n}-{i}", "drift.new", T0, "warning", "x")], [t], fleet="f", keep_checkpoint=True)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)  # hang guard
    assert sorted(p.events[0] for p in box(tmp_path).pending()) == sorted(f"w{n}-{i}" for n in range(4)
                                                                           for i in range(15))
