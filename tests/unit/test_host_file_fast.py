"""Host files of the common shape (bare keys, plain strings, booleans, integers, arrays of
strings, comments) are read without tomllib's parser: the result must be exactly tomllib's,
and any other text must go to tomllib, which names its errors."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import config

# Lines of the simple shape, lines just outside it (escapes, tables, dotted or quoted keys,
# floats, signs, underscores, leading zeros, inline tables, trailing comments, CR, control
# characters, a BOM, huge integers, mixed arrays, unterminated strings) and plain bad TOML.
LINES = [
    'name = "h1"', 'address = "10.0.0.1"', "port = 22", "port = 0", "sudo = true", "sudo = false",
    'roles = ["db", "worker"]', "roles = []", "roles = [ ]", 'roles=["a","b"]', '  user = "deploy"  ',
    "# a comment", "#", "", "   ", "\t# tab\tcomment", 'name = "ünïcödé ✓"', 'x-y_z = "a\tb"',
    'name = "a\\"b"', 'name = "a\\nb"', "name = 'literal'", '"quoted" = 1', "a.b = 1", "[table]",
    "[[array]]", "port = 022", "port = +22", "port = -1", "port = 1_000", "port = 0x16", "port = 22.0",
    "port = 1e3", "port = 99999999999999999999999", "port = 999999999999999999", 'roles = ["a", 1]',
    'roles = ["a",]', 'roles = [\n"a"]', "t = { a = 1 }", 'name = "h1" # trailing', "sudo = True",
    'name = "a\rb"', "name = \"a\x00\"", "# bell \x07", "# del \x7f", "\ufeffname = \"x\"", 'name = "x',
    "name =", "= 1", "name = \"\"", "d = 1979-05-27", "port = inf", "port = nan", 'roles = [["a"]]',
]


def tomllib_says(text: str) -> Any:
    try:
        return ("ok", tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        return ("error", str(e))


def typed(value: Any) -> Any:
    """`True == 1`: compare values with their types."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}, list(value)
    if isinstance(value, list):
        return [typed(v) for v in value]
    return type(value), value


@settings(max_examples=400)
@given(lines=st.lists(st.sampled_from(LINES), max_size=8), end=st.sampled_from(["", "\n", "\r\n"]))
def test_a_simple_text_reads_as_tomllib_reads_it_and_any_other_is_left_to_tomllib(lines: list[str], end: str) -> None:
    text = "\n".join(lines) + end
    fast = config._simple_toml(text)
    said = tomllib_says(text)
    if fast is not None:
        assert said[0] == "ok" and typed(fast) == typed(said[1]), text
    elif said[0] == "ok":  # left to tomllib: only texts outside the simple shape
        assert any(config._SIMPLE_LINE.fullmatch(line) is None for line in text.split("\n")) or \
            len({line.split("=")[0].strip() for line in lines if "=" in line}) < sum("=" in line for line in lines)


def test_the_bench_host_file_shape_is_read_by_the_fast_path() -> None:
    text = ('name = "h00000"\naddress = "h00000.bench.internal"\nuser = "deploy"\nsudo = true\n'
            'roles = ["db", "worker"]\n')
    assert config._simple_toml(text) == tomllib.loads(text)
    assert list(config._simple_toml(text) or {}) == ["name", "address", "user", "sudo", "roles"]


@pytest.mark.parametrize("line", ['port = 022', 'name = "a\\nb"', "[table]", 'name = "x" # c', "port = 1_000"])
def test_a_text_outside_the_shape_is_not_read_by_the_fast_path(line: str) -> None:
    assert config._simple_toml(f'name = "h1"\n{line}\n') is None


def write_fleet(tmp: Path, n: int, last: str) -> tuple[Path, Path]:
    hosts = tmp / "hosts"
    hosts.mkdir()
    for i in range(n):
        text = f'name = "h{i:03d}"\naddress = "h{i:03d}.example"\nuser = "deploy"\nsudo = true\nroles = ["app"]\n'
        (hosts / f"h{i:03d}.toml").write_text(last if i == n - 1 else text)
    desired = tmp / "desired_state.toml"
    desired.write_text('[services.web]\nkind = "web"\nunit = "mastodon-web.service"\nhosts = ["h000"]\n'
                       'observe_only = true\n')
    return desired, hosts


@pytest.mark.parametrize(("last", "where"), [
    ('name = "h999"\naddress = "h999.example"\nport = 022\n', (3, 9)),  # tomllib's syntax error, line and column
    ('name = "h999"\naddress = "h999.example"\naddress = "again"\n', (3, 18)),
])
def test_a_syntax_error_in_host_999_of_1000_is_named_with_its_file_line_and_column(
        tmp_path: Path, last: str, where: tuple[int, int]) -> None:
    desired, hosts = write_fleet(tmp_path, 1000, last)
    errors = [f for f in config.load(desired, hosts).findings if f.is_error]
    assert [(f.code, f.file, f.line, f.column) for f in errors] == [
        ("toml.syntax", str(hosts / "h999.toml"), *where)]
    assert errors[0].message == "TOML syntax error: " + str(tomllib_says(last)[1]).rsplit(" (at line", 1)[0]


def test_a_bad_value_in_host_999_of_1000_is_named_with_its_file_and_key(tmp_path: Path) -> None:
    desired, hosts = write_fleet(tmp_path, 1000, 'name = "h999"\naddress = "h999.example"\nport = 70000\n'
                                                 '# an unusual but valid shape:\n\troles=[ "a" ,"b" ]  \n')
    errors = [f for f in config.load(desired, hosts).findings if f.is_error]
    assert [(f.file, f.key, f.line, f.message) for f in errors] == [
        (str(hosts / "h999.toml"), "port", 3, "port 70000 is outside 1–65535")]


def test_an_unusual_but_valid_host_file_loads_as_tomllib_reads_it(tmp_path: Path) -> None:
    shape = '# h999\n\n  name="h999"\naddress   =\t"h999.example"  \nport = 2222\nsudo = false\nroles = [ ]\n'
    desired, hosts = write_fleet(tmp_path, 3, shape.replace("h999", "h002"))
    loaded = config.load(desired, hosts)
    assert not loaded.errors
    h = loaded.desired.hosts[-1]  # type: ignore[union-attr]
    assert (h.name, h.address, h.port, h.sudo, h.roles, h.user) == ("h002", "h002.example", 2222, False, (), "root")


def test_a_file_read_in_pieces_is_read_whole(tmp_path: Path) -> None:
    """The first read is sized by fstat; a file longer than that (it grew) is read on to its end,
    and a limit still stops the read."""
    p = tmp_path / "f"
    p.write_bytes(b"x" * 200_000)
    assert config.read_regular_file(p) == b"x" * 200_000
    assert config.read_regular_file(p, 300_000) == b"x" * 200_000
    with pytest.raises(config.FileTooLargeError):
        config.read_regular_file(p, 200_000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(config.NotAFileError):
        config.read_regular_file(fifo)


@pytest.mark.parametrize("address", ["db.example.org", "DB.Example.ORG.", "10.0.0.1", "10.0.0.1.", "010.0.0.1",
                                     "::1", "0::1", "fe80::1", "2001:DB8::1", "3232235777", "1.2.3", "١٢.٣.٤.٥",
                                     "h00000.bench.internal", "a-b.c", "1.2.3.4a"])
def test_an_address_is_spelled_as_ipaddress_would_spell_it(address: str) -> None:
    """A name skips ipaddress; anything that may be an IP address still goes through it."""
    import ipaddress

    try:
        expected = str(ipaddress.ip_address(address))
    except ValueError:
        expected = address.lower().rstrip(".")
    assert config._same_address(address) == expected
