"""The two text formats fleet writes: systemd units (units.py) and .env files (envfile.py).

The hashes a plan compares must be the ones the collector computes on a host, so the unit text
hash is checked against fleet.collect.parse, and env fingerprints against the real collection
script run locally on a rendered file (skipped where sh/awk/sha256sum are missing).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from observed import example, service

from fleet.collect.parse import parse_host, parse_units
from fleet.collect.script import CollectSpec, build_script
from fleet.envfile import fingerprint, parse_value, render_file, render_value
from fleet.model import Kind, Service, UnitSpec
from fleet.textutil import sha256_hex
from fleet.units import as_observed_text, desired_text_hash, render_unit, unit_path

QUICK = settings(max_examples=300, deadline=None)

# Values people put in .env files, and the characters that break naive quoting.
nasty_text = st.text(
    alphabet=st.one_of(st.sampled_from(list("\"'$`\\=# \t\n\r%{}!;&|*?~") + ["é", "✓", "ß", "\u00a0"]),
                       st.characters(codec="utf-8", exclude_characters="\x00")),
    max_size=40)


# What can reach an env file at all: `fleet check` and the secrets loader refuse control
# characters other than tab and newline (a CR, a NUL … cannot be carried portably).
env_text = nasty_text.filter(lambda v: not any(ord(c) < 32 and c not in "\t\n" or c == "\x7f" for c in v))


def generic(exec_start: str = "/usr/bin/thing --flag", **spec: object) -> Service:
    return Service(name="thing", kind=Kind.GENERIC, unit="thing.service", hosts=("a",),
                   unit_spec=UnitSpec(exec_start=exec_start, **spec))  # type: ignore[arg-type]


# ------------------------------------------------------------------ units


def test_a_rendered_unit_says_it_is_managed_and_holds_the_declaration() -> None:
    web = service(example(), "web")
    text = render_unit(web)
    lines = text.splitlines()
    assert lines[0].startswith("# Managed by fleet (service web).")
    for line in ("[Unit]", "Description=mastodon-web", "After=network.target", "[Service]", "Type=simple",
                 "User=mastodon", "WorkingDirectory=/home/mastodon/live",
                 'Environment="RAILS_ENV=production"', 'Environment="PORT=3000"',
                 "EnvironmentFile=/home/mastodon/live/.env.production",
                 "ExecStart=/home/mastodon/.rbenv/shims/bundle exec puma -C config/puma.rb",
                 "ExecReload=/bin/kill -SIGUSR1 $MAINPID", "Restart=always", "[Install]",
                 "WantedBy=multi-user.target"):
        assert line in lines, line
    assert text.endswith("\n") and render_unit(web) == text


def test_a_sidekiq_unit_runs_the_derived_command_line() -> None:
    sk = service(example(), "sidekiq-default")
    assert ("ExecStart=/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 25 -q default,8 -q ingress,6 -q mailers,2"
            in render_unit(sk).splitlines())
    assert 'Environment="DB_POOL=25"' in render_unit(sk)


def test_optional_unit_lines_are_left_out_when_not_declared() -> None:
    text = render_unit(generic(after=(), wanted_by=()))
    for absent in ("After=", "User=", "Group=", "WorkingDirectory=", "Environment", "ExecReload=", "Restart=",
                   "[Install]"):
        assert absent not in text


def test_environment_values_are_quoted_with_percent_doubled_and_quotes_escaped() -> None:
    text = render_unit(generic(environment=(("MSG", 'say "hi" 100% C:\\dir'),)))
    assert 'Environment="MSG=say \\"hi\\" 100%% C:\\\\dir"' in text.splitlines()


def test_an_observe_only_service_has_no_unit_to_render() -> None:
    with pytest.raises(ValueError, match="observe-only"):
        render_unit(service(example(), "postgres"))


def test_the_desired_text_hash_is_what_the_collector_computes_for_the_written_unit() -> None:
    for s in example().services:
        if s.observe_only:
            continue
        path = unit_path(s.unit)
        block = [f"Id={s.unit}", "LoadState=loaded", "ActiveState=active", "SubState=running",
                 "UnitFileState=enabled", f"FragmentPath={path}", "DropInPaths="]
        (u,) = parse_units("h", block, {path: sha256_hex(render_unit(s))}, {s.unit: [(path, render_unit(s))]})
        assert u.text_hash == desired_text_hash(s)
        assert u.text == as_observed_text(s)


def test_a_drop_in_changes_the_collected_text_hash() -> None:
    s = service(example(), "web")
    path, drop = unit_path(s.unit), f"{unit_path(s.unit)}.d/override.conf"
    block = [f"Id={s.unit}", "LoadState=loaded", f"FragmentPath={path}", f"DropInPaths={drop}"]
    (u,) = parse_units("h", block, {path: sha256_hex(render_unit(s)), drop: sha256_hex("x")}, {})
    assert u.text_hash != desired_text_hash(s)


def test_the_collected_unit_text_reads_back_as_the_rendered_text() -> None:
    """Through the whole parser: what a host prints for the written unit is what diff compares."""
    s = service(example(), "streaming")
    path, rendered = unit_path(s.unit), render_unit(s)
    out = "\n".join(["@@fleet 1", "@@facts", "hostname=fritz", "@@units", f"Id={s.unit}", "LoadState=loaded",
                     f"FragmentPath={path}", "", "@@hashes", f"{sha256_hex(rendered)}  {path}", "@@text",
                     f"@@file {s.unit} {path}", *(f"|{line}" for line in rendered.splitlines()), "@@end", ""])
    u = parse_host("fritz", out).unit(s.unit)
    assert u is not None and u.text == as_observed_text(s) and u.text_hash == desired_text_hash(s)


def test_any_change_to_the_declaration_changes_the_text_hash() -> None:
    s = service(example(), "web")
    assert s.unit_spec is not None
    other = dataclasses.replace(s, unit_spec=dataclasses.replace(s.unit_spec, restart="on-failure"))
    assert desired_text_hash(other) != desired_text_hash(s)


# ------------------------------------------------------------------ env values


@QUICK
@given(nasty_text)
def test_any_value_survives_render_then_parse(value: str) -> None:
    assert parse_value(render_value(value)) == value


@QUICK
@given(nasty_text)
def test_a_rendered_value_has_no_surrounding_blanks_and_breaks_lines_only_inside_quotes(value: str) -> None:
    raw = render_value(value)
    assert raw == raw.strip() or raw.startswith('"')
    if "\n" in raw:  # systemd and dotenv both read a double-quoted value across lines
        assert raw.startswith('"') and raw.endswith('"')


@pytest.mark.parametrize("value", ["\n", "token\n", "s3cr3t-key\n"])
def test_a_value_ending_in_a_newline_survives_render_then_parse(value: str) -> None:
    raw = render_value(value)
    assert raw.startswith('"') and raw.endswith('\n"')
    assert parse_value(raw) == value


@pytest.mark.parametrize(("value", "raw"), [
    ("hachyderm.io", "hachyderm.io"),
    ("", ""),
    ("a=b,c:d/e@f+g%h-i_j", "a=b,c:d/e@f+g%h-i_j"),
    ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("$HOME", '"\\$HOME"'),
    ("back\\slash", '"back\\\\slash"'),
    ("line\nbreak", '"line\nbreak"'),
    ("`cmd`", '"`cmd`"'),
    ("café", '"café"'),
])
def test_safe_values_are_written_bare_and_the_rest_double_quoted(value: str, raw: str) -> None:
    assert render_value(value) == raw


@pytest.mark.parametrize(("raw", "value"), [
    ("'single $quoted'", "single $quoted"),
    ("bare # a comment", "bare"),
    ("  padded  ", "padded"),
    ('"tab\\there"', "tab\there"),
    ('"keeps \\q unknown escapes"', "keeps \\q unknown escapes"),
    ("a#b", "a#b"),
])
def test_hand_written_forms_are_read_too(raw: str, value: str) -> None:
    assert parse_value(raw) == value


@given(nasty_text)
@settings(max_examples=100, deadline=None)
def test_a_fingerprint_is_the_sha256_of_the_text_written_after_the_equals_sign(value: str) -> None:
    assert fingerprint(value) == sha256_hex(render_value(value))


def test_a_rendered_file_has_the_header_as_comments_then_one_line_per_key() -> None:
    text = render_file([("A", "1"), ("B", "two words")], header="Managed by fleet\n\nedit the desired state")
    assert text == '# Managed by fleet\n#\n# edit the desired state\nA=1\nB="two words"\n'


# ------------------------------------------------------------------ against the real collector

_TOOLS = all(shutil.which(t) for t in ("sh", "awk", "sha256sum", "stat"))


@pytest.mark.skipif(not _TOOLS, reason="needs sh, awk, sha256sum and stat to run the collection script")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(env_text, min_size=1, max_size=6))
def test_the_collector_reads_a_rendered_file_back_with_the_same_values_and_fingerprints(values: list[str]) -> None:
    plain = [(f"KEY_{i}", v) for i, v in enumerate(values)]
    secret = [(f"SECRET_{i}", v) for i, v in enumerate(values)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, ".env.production")
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_file(plain + secret, header="written by a test"))
        script = build_script(CollectSpec(kinds=(("env", ((path, tuple(k for k, _ in secret)),)),)))
        out = subprocess.run(["sh", "-c", script], capture_output=True, timeout=30, check=False).stdout
    state = parse_host("local", out.decode("utf-8"))
    (env,) = state.env_files
    assert env.invalid_lines == 0
    assert env.keys == tuple(k for k, _ in plain + secret)
    assert dict(env.values) == dict(plain)
    assert dict(env.secrets) == {k: fingerprint(v) for k, v in secret}


def test_a_service_s_unit_is_rendered_without_hashing_the_service_on_each_call() -> None:
    """The diff asks for each service's unit once per host; hashing the frozen Service (every
    host name it lists) on each ask was a third of `plan` at 1,000 hosts × 20 services."""
    from fleet.model import Service
    from fleet.units import render_unit

    class Counted(Service):
        hashes = 0

        def __hash__(self) -> int:
            type(self).hashes += 1
            return super().__hash__()

    web = service(example(), "web")
    counted = Counted(**{f.name: getattr(web, f.name) for f in dataclasses.fields(web)})
    texts = {render_unit(counted) for _ in range(50)}
    assert texts == {render_unit(web)}
    assert Counted.hashes <= 1
    equal = Counted(**{f.name: getattr(web, f.name) for f in dataclasses.fields(web)})
    assert render_unit(equal) == render_unit(web)  # another, equal service: the same text
