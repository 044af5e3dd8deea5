"""systemd's unit file syntax (fleet/unitfile.py): the one parser fleet reads unit text with, and
the directives renderer and specifier rules it writes with."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.unitfile import (
    UnitSyntaxError,
    bad_specifiers,
    environment,
    environment_files,
    exec_start,
    literal_percent,
    parse,
    render_directives,
    words,
)

HARDENED = """\
# a comment
; another comment
[Unit]
Description=mastodon-streaming on port %I
PartOf=mastodon-streaming.service

[Service]
Environment="NODE_ENV=production"
Environment="PORT=%I"
ExecStart=/usr/bin/node ./streaming
RestrictAddressFamilies=AF_INET
RestrictAddressFamilies=AF_INET6
SystemCallFilter=~@cpu-emulation @debug \\
    @keyring @ipc
SystemCallFilter=pipe

[Install]
WantedBy=multi-user.target mastodon-streaming.service
"""


def test_every_assignment_is_kept_in_order_with_its_section_and_line() -> None:
    unit = parse(HARDENED)
    assert unit.sections == ("Unit", "Service", "Install")
    assert [(d.section, d.key) for d in unit.directives][:4] == [
        ("Unit", "Description"), ("Unit", "PartOf"), ("Service", "Environment"), ("Service", "Environment")]
    assert unit.assignments("Service", "RestrictAddressFamilies") == ["AF_INET", "AF_INET6"]
    assert unit.directives[0].line == 4


def test_a_continued_line_is_one_value_with_the_backslash_as_a_space() -> None:
    unit = parse(HARDENED)
    assert unit.values("Service", "SystemCallFilter") == ["~@cpu-emulation @debug  @keyring @ipc", "pipe"]
    (d,) = [d for d in unit.directives if d.value.startswith("~@cpu")]
    assert d.line == 13  # where the continued assignment starts


def test_comment_lines_inside_a_continuation_are_skipped_as_systemd_does() -> None:
    unit = parse("[Service]\nExecStart=/bin/a \\\n# not part of it\n  b\n")
    assert unit.value("Service", "ExecStart") == "/bin/a  b"


def test_an_escaped_backslash_at_the_end_does_not_continue_the_line() -> None:
    unit = parse("[Service]\nExecStart=/bin/echo a\\\\\nUser=x\n")
    assert unit.value("Service", "ExecStart") == "/bin/echo a\\\\"
    assert unit.value("Service", "User") == "x"


def test_an_empty_assignment_resets_a_list_setting_and_the_last_scalar_wins() -> None:
    unit = parse("[Service]\nEnvironmentFile=/a\nEnvironmentFile=\nEnvironmentFile=-/b\nUser=x\nUser=y\n")
    assert environment_files(unit) == ["/b"]
    assert unit.value("Service", "User") == "y"
    assert unit.value("Service", "Group") is None


def test_the_environment_is_read_with_systemds_quoting_later_assignments_winning() -> None:
    unit = parse('[Service]\nEnvironment="A=1 2" B=3\nEnvironment=\'C=x"y\' A=4\n')
    assert environment(unit) == [("A", "4"), ("B", "3"), ("C", 'x"y')]


def test_exec_start_is_the_first_command_without_its_prefix_characters() -> None:
    assert exec_start(parse("[Service]\nExecStart=-/usr/bin/a x\nExecStart=/usr/bin/b\n")) == "/usr/bin/a x"
    assert exec_start(parse("[Service]\nType=oneshot\n")) == ""


def test_words_unquote_and_unescape_as_systemd_splits_a_command_line() -> None:
    assert words('/bin/echo "two words" \'single\' a\\ b "q\\"x"') == ["/bin/echo", "two words", "single", "a b",
                                                                       'q"x']


@pytest.mark.parametrize("text, why", [
    ("ExecStart=/bin/a\n", "outside of any [Section]"),
    ("[Service\nExecStart=/bin/a\n", "malformed section header"),
    ("[Service]\njust words\n", "neither a [Section] header nor a Key=value line"),
])
def test_text_systemd_would_not_read_is_refused_with_its_line(text: str, why: str) -> None:
    with pytest.raises(UnitSyntaxError, match=re.escape(why)) as e:
        parse(text)
    assert e.value.line in (1, 2)


def test_directives_render_in_the_order_given_repeating_keys_and_sections() -> None:
    text = render_directives([("Unit", "Description", "x"), ("Service", "ExecStart", "/bin/a"),
                              ("Service", "RestrictAddressFamilies", "AF_INET"),
                              ("Service", "RestrictAddressFamilies", "AF_UNIX"), ("Install", "WantedBy", "a.target"),
                              ("Unit", "After", "b.target")])
    assert text == ("[Unit]\nDescription=x\n\n[Service]\nExecStart=/bin/a\nRestrictAddressFamilies=AF_INET\n"
                    "RestrictAddressFamilies=AF_UNIX\n\n[Install]\nWantedBy=a.target\n\n[Unit]\nAfter=b.target\n")
    assert [(d.section, d.key, d.value) for d in parse(text).directives] == [
        ("Unit", "Description", "x"), ("Service", "ExecStart", "/bin/a"),
        ("Service", "RestrictAddressFamilies", "AF_INET"), ("Service", "RestrictAddressFamilies", "AF_UNIX"),
        ("Install", "WantedBy", "a.target"),
        ("Unit", "After", "b.target")]


_names = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
_values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20).map(str.strip).filter(
    lambda v: not v.endswith("\\"))


@given(st.lists(st.tuples(_names, _names, _values), min_size=1, max_size=12))
def test_rendered_directives_parse_back_to_the_same_directives(triples: list[tuple[str, str, str]]) -> None:
    assert [(d.section, d.key, d.value) for d in parse(render_directives(triples)).directives] == triples


def test_specifiers_pass_and_a_percent_that_starts_none_is_doubled() -> None:
    assert literal_percent("port %i of %I, 100% done, %%h stays") == "port %i of %I, 100%% done, %%h stays"
    assert literal_percent("ends in %") == "ends in %%"
    assert bad_specifiers("%i %I %% %h") == []
    assert bad_specifiers("100% done, %Q and %") == ["% ", "%Q", "%"]
