"""Rendering a plan as text without a call per line (fleet/output/text.py `_details`): the same
text as escaping and painting each diff line alone, with and without colour, whatever the diff
holds (control characters, ESC, line separators, `+`/`-` lines, trailing newlines)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.actions import Action, Change, UnitFilePayload
from fleet.output import text as render
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
    assert render._details(c, color) == details_line_by_line(c, color)


def test_a_clean_diff_takes_the_fast_way_and_a_dirty_one_is_escaped() -> None:
    clean, dirty = "+Nice=5\n-Nice=0\n context", "+Exec=\x1b[31mred\n-x"
    assert is_printable(clean) and not is_printable(dirty)
    assert not is_printable("a\nb", multiline=False) and is_printable("a\nb")
    assert render._details(write_unit(dirty), False) == ["      +Exec=\\x1b[31mred", "      -x"]
    assert render._details(write_unit(clean), True) == ["      \033[32m+Nice=5\033[0m", "      \033[31m-Nice=0\033[0m",
                                                        "       context"]
    assert printable(clean) is clean
