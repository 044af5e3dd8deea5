"""fleet's text tables (fleet.output.text.table): tabulate's "simple" format, drawn by fleet with
the alignment fleet knows — numbers right, text left — so that no cell is guessed at.  Pinned
here as literal text, and side by side with tabulate itself told the same alignment."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from observed import EXAMPLE_SECRETS, converged, example, undeclared_sidekiq, unreachable, with_unit
from tabulate import tabulate

from fleet.output import text as text_module
from fleet.output.text import column_alignment, status_text, table
from fleet.status import build_status
from fleet.textutil import printable


def test_a_number_column_is_right_aligned_header_included() -> None:
    assert table([["freud", 5], ["nietzsche", 12345]], ["HOST", "-c"]) == (
        "HOST          -c\n"
        "---------  -----\n"
        "freud          5\n"
        "nietzsche  12345")


def test_a_text_column_is_left_aligned_and_its_last_column_has_no_trailing_blanks() -> None:
    assert table([["freud", "active/running"], ["nietzsche", "failed"]], ["HOST", "STATE"]) == (
        "HOST       STATE\n"
        "---------  --------------\n"
        "freud      active/running\n"
        "nietzsche  failed")


def test_a_column_mixing_numbers_and_text_is_text_and_blanks_leave_a_number_column_a_number_column() -> None:
    rows = [["a", 25, 4711], ["b", "?", ""], ["c", 5, None]]
    assert table(rows, ["HOST", "-c", "PID"]) == (
        "HOST    -c      PID\n"
        "------  ----  -----\n"
        "a       25     4711\n"
        "b       ?\n"
        "c       5")


def test_a_string_of_digits_is_text_shown_as_written() -> None:
    # tabulate's guess made "1e3" the number 1000 and right-aligned "12": a name is not a number
    assert table([["1e3"], ["12"]], ["HOST"]) == "HOST\n------\n1e3\n12"


def test_a_cell_of_several_lines_makes_its_row_that_high() -> None:
    assert table([["web", "active/running (!)\nunit file differs", 3], ["db", "·", 12]], ["SVC", "h1", "N"]) == (
        "SVC    h1                    N\n"
        "-----  ------------------  ---\n"
        "web    active/running (!)    3\n"
        "       unit file differs\n"
        "db     ·                    12")


def test_cells_are_escaped_and_stripped_headers_kept() -> None:
    assert table([["  a\x1b[31m  "]], [" X"]) == " X\n---------\na\\x1b[31m"


def test_a_row_of_another_length_than_the_headers_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="2 cells long"):
        table([["a", "b"], ["c"]], ["X", "Y"])


def test_column_alignment() -> None:
    assert column_alignment([1, "", None, 7]) == "right"
    assert column_alignment([1, "?"]) == "left"
    assert column_alignment(["", None]) == "left"
    assert column_alignment(["12", "7"]) == "left"
    assert column_alignment([True, False]) == "left"


CELL = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12),
    st.none(),
    st.text(alphabet=st.sampled_from(list("ab Z09.-,e\n\t ·é:?()!") + ["\u00a0", "\x1b", "\r"]), max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=5).flatmap(lambda n: st.tuples(
    st.lists(st.text(alphabet="ABC -c", min_size=0, max_size=6), min_size=n, max_size=n),
    st.lists(st.lists(CELL, min_size=n, max_size=n), max_size=6))))
def test_the_table_is_tabulates_simple_table_told_the_same_alignment(
        case: tuple[list[str], list[list[object]]]) -> None:
    headers, rows = case
    cells = [[printable(c) if isinstance(c, str) else c for c in row] for row in rows]
    aligns = [column_alignment(column) for column in zip(*rows, strict=True)] if rows else None
    expected = tabulate(cells, headers=headers, tablefmt="simple", disable_numparse=True, colalign=aligns)
    assert table(rows, headers) == expected


def _guessing_table(rows: list[list[object]], headers: list[str]) -> str:
    """The table as fleet drew it before: tabulate guessing each cell's type."""
    cells = [[printable(c) if isinstance(c, str) else c for c in row] for row in rows]
    return str(tabulate(cells, headers=list(headers), tablefmt="simple"))


def test_the_status_text_of_the_example_is_what_tabulates_guessing_made_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    desired = example()
    fleet = converged(desired, EXAMPLE_SECRETS)
    hosts = sorted(fleet)
    mixed = {**fleet, hosts[0]: with_unit(fleet[hosts[0]], undeclared_sidekiq()), hosts[1]: unreachable(hosts[1])}
    # a process without -c and DB_POOL: the "?" that makes those columns text
    odd = with_unit(fleet[hosts[2]], dataclasses.replace(undeclared_sidekiq(args="-q push"), unit="x-sidekiq.service"))
    for results in (fleet, mixed, {**mixed, hosts[2]: odd}):
        report = build_status(desired, dict(results))
        ours = status_text(report, now=1_790_000_000.0)
        monkeypatch.setattr(text_module, "table", _guessing_table)
        theirs = status_text(report, now=1_790_000_000.0)
        monkeypatch.undo()
        assert ours == theirs
