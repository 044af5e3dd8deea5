"""Rendering a plan as text without a call per line (fleet/output/text.py `_details`): the same
text as escaping and painting each diff line alone, with and without colour, whatever the diff
holds (control characters, ESC, line separators, `+`/`-` lines, trailing newlines)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.actions import Action, Change, UnitFilePayload
from fleet.output import text as render
from fleet.plan import Plan
from fleet.resources.base import DIFF
from fleet.resources.registry import BY_ACTION
from fleet.textutil import is_printable, printable

MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def details_line_by_line(c: Change, color: bool) -> list[str]:
    """`_details` as it was: every diff line escaped, then painted, on its own."""
    out: list[str] = []
    for style, text in BY_ACTION[c.action].details(c):
        if style == DIFF:
            for line in text.rstrip("\n").split("\n"):
                code = "32" if line.startswith("+") else "31" if line.startswith("-") else "0"
                out.append("      " + render._paint(line, code, color and code != "0"))
        else:
            code, whole = render._DETAIL_COLORS[style]
            out.append(render._paint(f"      {text}", code, color) if whole else render.one_line(f"      {text}"))
    return out


line = st.tuples(st.sampled_from(["", "+", "-", " ", "@@ "]),
                 st.text(st.sampled_from(["a", "=", " ", "\t", "\x1b", "\r", "\x7f", "\x9b", "\u2028", "\u202e",
                                          "é", "+", "-"]), max_size=6)).map("".join)
diffs = st.lists(line, max_size=6).map("\n".join).flatmap(lambda d: st.sampled_from([d, d + "\n", d + "\n\n"]))


def write_unit(diff: str, remove: tuple[str, ...] = ()) -> Change:
    return Change("fritz", Action.WRITE_UNIT, "mastodon-web.service", "unit file differs", "web",
                  payload=UnitFilePayload("0" * 64, diff, remove))


@MANY
@given(diffs, st.booleans(), st.lists(st.sampled_from(["/etc/systemd/system/x.service.d/a.conf", "/tmp/\x1b[2J"]),
                                      max_size=2))
def test_a_diff_renders_as_each_line_escaped_and_painted_alone(diff: str, color: bool, remove: list[str]) -> None:
    c = write_unit(diff, tuple(remove))
    assert "\n".join(render._details(c, color)) == "\n".join(details_line_by_line(c, color))


def test_a_clean_diff_takes_the_fast_way_and_a_dirty_one_is_escaped() -> None:
    clean, dirty = "+Nice=5\n-Nice=0\n context", "+Exec=\x1b[31mred\n-x"
    assert is_printable(clean) and not is_printable(dirty)
    assert not is_printable("a\nb", multiline=False) and is_printable("a\nb")
    assert render._details(write_unit(dirty), False) == ["      +Exec=\\x1b[31mred", "      -x"]
    assert render._details(write_unit(clean), True) == ["      \033[32m+Nice=5\033[0m", "      \033[31m-Nice=0\033[0m",
                                                        "       context"]
    assert printable(clean) is clean


def plan_text_line_by_line(plan: Plan, color: bool) -> list[str]:
    """`plan_text`'s host sections as they were: every change's heading and detail lines made anew."""
    out: list[str] = []
    for host in plan.hosts:
        cs = [c for c in plan.changes if c.host == host]
        if cs:
            out += ["", render.one_line(f"on {host}:")]
        for c in cs:
            sym = BY_ACTION[c.action].symbol(c)
            out.append(render._paint(f"  {sym} {render._title(c)}", render._SYMBOL_COLORS.get(sym, "0"), color)
                       + render.one_line(f"  — {c.reason}"))
            out += details_line_by_line(c, color)
    return out


def shared_body_plan(bodies: list[str]) -> Plan:
    """Hosts whose write-units share diff bodies under ---/+++ lines naming each host (a bare plan's
    shape), and a host whose header holds a control character."""
    hosts = ("a1", "a2", "b\x1b[2J")
    changes = tuple(Change(h, Action.WRITE_UNIT, f"u{k}.service", "differs\x1b" if h == hosts[2] else "not installed",
                           "web", before="absent" if k else "/x",
                           payload=UnitFilePayload("0" * 64, f"--- {h}:u{k}.service (now)\n+++ {h}:u{k}.service "
                                                   f"(desired)\n{body}" if body else "", ()))
                    for h in hosts for k, body in enumerate(bodies))
    return Plan("f", "2026-12-02T00:00:00Z", "0" * 64, hosts, {}, changes, {}, (tuple(c.id for c in changes),))


@MANY
@given(st.lists(diffs, min_size=1, max_size=3), st.booleans())
def test_a_diff_body_shared_by_hosts_renders_as_each_host_s_own(bodies: list[str], color: bool) -> None:
    plan = shared_body_plan(bodies)
    first = "Plan for f: 3 host(s), computed 2026-12-02T00:00:00Z"
    expected = [first, *plan_text_line_by_line(plan, color), "", render.summary_line(plan)]
    assert render.plan_text(plan, color=color, show_waves=False) == "\n".join(expected) + "\n"


def test_a_shared_body_is_rendered_once() -> None:
    body = "+[Unit]\n+Description=x\n"
    plan = shared_body_plan([body])
    rendered = render._Rendered(False)
    for c in plan.changes:
        rendered.details(BY_ACTION[c.action].details(c))
    assert list(rendered.bodies) == [body]


def test_the_order_names_each_change_as_it_did_change_by_change() -> None:
    plan = shared_body_plan(["+x\n", "+y\n"])
    plan = Plan(plan.fleet, plan.created_at, plan.desired_hash, plan.hosts, {}, plan.changes, {},
                (tuple(c.id for c in plan.changes[:2]), tuple(c.id for c in plan.changes[2:])))
    waves = render.plan_text(plan).split("wave(s); each wave runs in parallel after the previous one):\n")[1]
    expected = [render.one_line(f"  {i}. " + ", ".join(render._short(plan.change(cid)) for cid in wave))
                for i, wave in enumerate(plan.waves, 1)]
    assert waves.split("\n\n")[0].split("\n") == expected
    assert "b\\x1b[2J:write-unit u1.service" in waves  # the host's own name, escaped
