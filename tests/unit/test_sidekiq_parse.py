"""The Sidekiq section's parser: captured real output (tests/fixtures/sidekiq/) read exactly, and
anything else — truncated, repeated, oversized, malformed, hostile — refused with a ParseError
naming the section, never another exception."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.errors import ParseError
from fleet.sidekiq import (
    MAX_LINE,
    MAX_SECTION_LINES,
    SidekiqView,
    decode_token,
    enqueued_seconds,
    parse_section,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sidekiq"


def body(name: str) -> list[str]:
    lines = (FIXTURES / name).read_text().split("\n")
    assert lines[0] == "@@sidekiq"
    return lines[1:]


def parse(lines: list[str]) -> SidekiqView:
    return parse_section("nietzsche", lines)


def refused(lines: list[str], message: str = "") -> ParseError:
    with pytest.raises(ParseError) as e:
        parse(lines)
    assert e.value.section == "sidekiq" and e.value.host == "nietzsche"
    assert "sidekiq section" in e.value.message and message in e.value.message, e.value.message
    return e.value


def test_a_captured_fleet_with_a_backlog_reads_exactly() -> None:
    view = parse(body("fleet-with-backlog.txt"))
    assert view.target is not None and (view.target.source, view.target.port, view.target.auth) == (
        "REDIS_HOST", 33559, True)
    assert view.redis_time == 1796171223.637911
    assert view.complete and view.processes_total == 4 and view.queues_total == 7
    assert [p.identity for p in view.processes] == [
        "cdn-frankfurt-1:31337:0badc0ffee00", "freud:4711:3f2a9c0d1b7e", "nietzsche:812:a1b2c3d4e5f6"]
    assert view.stale == ("fritz:99:deadbeef0000",)
    cdn, freud, nietzsche = view.processes
    assert (cdn.hostname, cdn.pid, cdn.concurrency, cdn.queues) == ("cdn-frankfurt-1", 31337, 10, (("default", 0),))
    assert freud.queues == (("default", 8), ("ingress", 6), ("mailers", 2)) and freud.busy == 4
    assert freud.version == "7.3.9" and freud.rss == 187432 and freud.rtt_us == 412 and not freud.quiet
    assert view.redis_time - freud.beat == pytest.approx(3.5 + 0.23, abs=0.1)
    assert nietzsche.version == "8.0.4" and nietzsche.concurrency == 5 and nietzsche.quiet
    assert nietzsche.labels == ("leader",) and nietzsche.queues == (("scheduler", 0),)
    assert [q.name for q in view.queues] == ["default", "fasp", "ingress", "mailers", "pull", "push", "scheduler"]
    mailers, pull = view.queue("mailers"), view.queue("pull")
    assert mailers is not None and mailers.size == 50 and mailers.latency == pytest.approx(649.2, abs=0.1)
    assert pull is not None and pull.size == 1 and pull.oldest_enqueued_at == 1796171180.905  # milliseconds
    assert all(q.size == 0 and q.latency == 0 and q.oldest_enqueued_at is None
               for q in view.queues if q.name not in ("mailers", "pull"))


def test_the_captured_lab_shows_the_stand_ins_as_declared() -> None:
    view = parse(body("lab-converged.txt"))
    assert view.target is not None and view.target.describe() == (
        "redis://nietzsche.hachyderm.internal:6379/0 (from REDIS_HOST)") and view.target.auth
    assert view.complete and not view.stale and view.queues == ()
    got = sorted((p.hostname, p.concurrency, p.queues) for p in view.processes)
    assert got == [("freud", 20, (("push", 6), ("pull", 4), ("fasp", 1))),
                   ("freud", 25, (("default", 8), ("ingress", 6), ("mailers", 2))),
                   ("nietzsche", 5, (("scheduler", 1),)),
                   ("nietzsche", 20, (("push", 6), ("pull", 4), ("fasp", 1)))]
    for p in view.processes:
        assert p.identity == f"{p.hostname}:{p.pid}:{p.identity[-12:]}" and p.version == "7.3.9" and p.tag == "live"
        assert 0 <= view.redis_time - p.beat < 60 and not p.quiet and p.rss > 0


def test_a_captured_truncated_read_says_so() -> None:
    view = parse(body("truncated-view.txt"))
    assert not view.complete and view.processes_total == 4 and len(view.processes) + len(view.stale) == 2
    assert view.queues_total == 7 and len(view.queues) == 3


@pytest.mark.parametrize(("name", "error"), [
    ("redis-unreachable.txt", "cannot reach Redis: Could not connect to Redis at 127.0.0.1:1: Connection refused"),
    ("wrong-password.txt", "Redis refused: NOAUTH Authentication required."),
    ("namespace.txt", "REDIS_NAMESPACE is set: Sidekiq 7 has no namespaces (Mastodon refuses it)"),
])
def test_captured_failures_are_a_view_with_an_error(name: str, error: str) -> None:
    view = parse(body(name))
    assert view.error == error and not view.processes and not view.complete


def test_a_captured_empty_redis_is_an_empty_complete_view() -> None:
    view = parse(body("empty-redis.txt"))
    assert view.complete and not view.processes and not view.queues and not view.error


# ------------------------------------------------------------------------- hostile and malformed


def test_a_truncated_output_is_refused_at_every_cut() -> None:
    lines = body("fleet-with-backlog.txt")
    end = lines.index("end")
    for cut in range(end):
        refused(lines[:cut])  # no end line
    for cut in range(1, end):
        if lines[cut].startswith(("P ", "L ", "J ")):
            refused(lines[:cut] + ["end"], "do not match")


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda ls: ls + ["end"], "continuing after"),
    (lambda ls: [ls[0], ls[0], *ls[1:]], "unexpected line"),  # a second target
    (lambda ls: [*ls[:2], ls[1], *ls[2:]], "unexpected line"),  # a second time
    (lambda ls: ["@@fleet 1", *ls], "unexpected line"),
    (lambda ls: [ls[0], "error meltdown now", *ls[1:]], "unknown error"),
    (lambda ls: [ls[0], "error connect x", *ls[1:]], "continuing after"),
    (lambda ls: [x.replace('"freud:4711', '"freud\\q4711') for x in ls], "unknown escape"),
    (lambda ls: [x.replace('"freud:4711', '"freud\\xff4711') for x in ls], "not UTF-8"),
    (lambda ls: [x.replace('"freud:4711', '"fr\u00e9ud:4711') for x in ls], "not ASCII"),
    (lambda ls: [x.replace("processes 4", "processes four") for x in ls], "number was expected"),
    (lambda ls: [x.replace('"1796171223"', '"soon"') for x in ls], "number was expected"),
    (lambda ls: [x.replace("L 50", "L 5e1") for x in ls], "number was expected"),
    (lambda ls: [x.replace("L 50", "L 99999999999999999999999") for x in ls], "number was expected"),
    (lambda ls: [x.replace("J 1796170574", "J nan") for x in ls], "unexpected job line"),
    (lambda ls: [x.replace('"412",NULL', '"412",NULL,NULL') for x in ls], "values where 7"),
    (lambda ls: [x.replace('"412",NULL', '"412"NULL') for x in ls], "malformed value"),
    (lambda ls: [x.replace("target REDIS_HOST", "target REDIS HOST") for x in ls], "malformed target"),
    (lambda ls: [x.replace(" plain password", " plain maybe") for x in ls], "malformed target"),
    (lambda ls: [x.replace("P NULL,NULL", "P toolong 99999") for x in ls], "heartbeat longer than"),
    (lambda ls: [x.replace('p "fritz', 'p toolong 9999 "fritz') for x in ls], "identity longer than"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_output_that_is_not_the_scripts_is_refused(mutate: object, message: str) -> None:
    lines = body("fleet-with-backlog.txt")
    refused(mutate(lines), message)  # type: ignore[operator]


def test_a_heartbeat_sidekiq_would_not_write_is_refused() -> None:
    lines = body("fleet-with-backlog.txt")
    p = next(i for i, x in enumerate(lines) if x.startswith('P "{\\"hostname\\":\\"freud'))
    for bad, message in [
        ('"[1]"', "not a JSON object"),
        ('"' + "[" * 5000 + "]" * 5000 + '"', "not JSON"),
        ('"{\\"concurrency\\":true}"', "malformed 'concurrency'"),
        ('"{\\"concurrency\\":5,\\"pid\\":1.5}"', "malformed 'pid'"),
        ('"{\\"concurrency\\":5,\\"started_at\\":\\"yesterday\\"}"', "malformed 'started_at'"),
        ('"{\\"concurrency\\":5,\\"labels\\":\\"x\\"}"', "malformed 'labels'"),
        ('"{\\"concurrency\\":5,\\"capsules\\":{\\"default\\":7}}"', "malformed capsule"),
        ('"{\\"concurrency\\":5,\\"weights\\":[7]}"', "malformed weights"),
    ]:
        tail = lines[p][lines[p].index('}",') + 2:]  # the six fields after `info`, kept as captured
        refused(lines[:p] + [f"P {bad}{tail}"] + lines[p + 1:], message)


def test_too_many_lines_or_too_long_a_line_is_refused_before_it_is_kept() -> None:
    lines = body("fleet-with-backlog.txt")
    refused(lines[:3] + ['p "x"'] * (MAX_SECTION_LINES + 1), "longer than")
    refused(lines[:3] + ['p "' + "x" * (MAX_LINE + 100) + '"'], "a line of")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.sampled_from(body("fleet-with-backlog.txt")),
    st.text(max_size=80),
    st.from_regex(r'(target|error|time|processes|queues|p|q|P|L|J|end|incomplete) [ -~]{0,60}', fullmatch=True),
), max_size=40))
def test_any_input_is_a_view_or_a_parse_error(lines: list[str]) -> None:
    try:
        view = parse(lines)
    except ParseError as e:
        assert e.section == "sidekiq"
    else:
        assert isinstance(view, SidekiqView)


# ------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize(("text", "seconds"), [
    ("1712345678.25", 1712345678.25),  # Sidekiq 7: a float of seconds
    ("1712345678250", 1712345678.25),  # Sidekiq 8: integer milliseconds
    ("1.71234567825e9", 1712345678.25),
    ("-", None), ("", None), ("1e999", None), ("12abc", None),
])
def test_enqueued_at_is_seconds_as_a_float_and_milliseconds_as_an_integer(text: str, seconds: float | None) -> None:
    assert enqueued_seconds(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_a_job_without_enqueued_at_falls_back_to_created_at() -> None:
    lines = [x.replace("J 1796170574.4053154 ", "J - ") for x in body("fleet-with-backlog.txt")]
    mailers = parse(lines).queue("mailers")
    assert mailers is not None and mailers.oldest_enqueued_at == 1796170574.4053154


@pytest.mark.parametrize(("token", "text"), [
    ('"plain"', "plain"), ('"a\\"b\\\\c"', 'a"b\\c'), ('"\\n\\r\\t\\a\\b"', "\n\r\t\a\b"),
    ('"\\xc3\\xa9"', "é"), ('""', ""),
])
def test_redis_cli_tokens_decode_to_their_text(token: str, text: str) -> None:
    assert decode_token(token) == text


@pytest.mark.parametrize("token", ['"\\q"', '"\\xZZ"', "NULL", '"open', "", '"\\xff"', '"é"'])
def test_a_token_redis_cli_would_not_print_is_refused(token: str) -> None:
    with pytest.raises(ValueError):
        decode_token(token)
