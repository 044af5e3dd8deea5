"""A plan printed in pieces (fleet/output/text.py `joined`, fleet/cli.py `_write_plan`): the same
text as `plan_text`, never held whole.  A bare 1,000-host plan is 25 MB of text; made in one
string, then copied with its last line break and encoded in one go, it cost the process ~125 MB of
fresh pages."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_plan_text_fast import shared_body_plan

from fleet import cli
from fleet.output import text as render

lines = st.lists(st.text(st.sampled_from(["a", "\n", "—", "é", " "]), max_size=4), max_size=12)


@given(lines, st.integers(min_value=1, max_value=14))
def test_the_pieces_join_to_the_text_whatever_their_size(entries: list[str], per: int) -> None:
    pieces = list(render.joined(entries, per))
    assert "".join(pieces) == "\n".join(entries) + "\n"
    assert all(p.endswith("\n") for p in pieces)
    assert len(pieces) == max(1, -(-len(entries) // per))


@pytest.mark.parametrize("color", [False, True])
def test_plan_text_is_its_lines_joined(color: bool) -> None:
    plan = shared_body_plan(["+[Unit]\n+Description=x\n", "+y\n"])
    assert render.plan_text(plan, color=color) == "\n".join(render.plan_lines(plan, color=color)) + "\n"


def test_the_cli_writes_a_long_plan_in_pieces_that_make_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = shared_body_plan([f"+line {i}\n" for i in range(3000)])  # 9,000 changes, ~27,000 lines
    writes: list[str] = []

    class Out(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return len(s)

        def isatty(self) -> bool:
            return False

    monkeypatch.setattr(cli.sys, "stdout", Out())
    monkeypatch.setenv("NO_COLOR", "1")
    cli._print_plan(plan, as_json=False)
    assert "".join(writes) == render.plan_text(plan)
    assert len(writes) > 1
    assert max(len(w) for w in writes) < len(render.plan_text(plan)) // 2
