"""The collector's pure side: the remote script's text, parsed from output captured on real
lab hosts (tests/fixtures/collect/, see its README), and garbage that must fail cleanly."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import config
from fleet.collect.parse import MAX_FACT_LINES, _lines, parse_exec_start, parse_host
from fleet.collect.script import CollectSpec, build_script, spec_for
from fleet.envfile import fingerprint
from fleet.errors import ParseError
from fleet.model import HostState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "collect"
REPO = Path(__file__).resolve().parents[2]


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text()


def test_a_bare_host_reports_its_facts_and_every_declared_unit_as_not_found() -> None:
    state = parse_host("fritz", fixture("bare-fritz"))
    assert state.facts.hostname == "fritz"
    assert state.facts.os == "Debian GNU/Linux 12 (bookworm)"
    assert state.facts.system_state == "running"
    assert state.facts.systemd_version.startswith("252")
    assert state.facts.mem_total_kb > 0 and len(state.facts.load) == 3
    web = state.unit("mastodon-web.service")
    assert web is not None and not web.exists and web.state() == "missing"
    env = state.env_file("/home/mastodon/live/.env.production")
    assert env is not None and not env.present


def test_installed_but_disabled_distro_units_are_found_by_the_discovery_patterns() -> None:
    state = parse_host("fritz", fixture("bare-fritz"))
    pg = state.unit("postgresql.service")
    assert pg is not None and pg.exists and pg.unit_file_state == "disabled"
    assert pg.fragment_path == "/lib/systemd/system/postgresql.service"
    assert pg.text is None  # not fleet-managed: no text, only its hash
    assert len(pg.text_hash) == 64


def test_the_drifted_cdn_host_shows_the_hand_made_sidekiq_with_its_arguments() -> None:
    state = parse_host("franz", fixture("drifted-franz"))
    sk = state.unit("mastodon-sidekiq.service")
    assert sk is not None and sk.running and sk.enabled
    assert sk.exec_start == ("/home/mastodon/.rbenv/shims/bundle", "exec", "sidekiq", "-c", "10", "-q", "default")
    assert sk.main_pid > 0
    assert sk.environment_files == ("/home/mastodon/live/.env.production",)
    assert dict(sk.environment)["DB_POOL"] == "10"


def test_a_secret_in_a_unit_environment_is_masked_on_the_host_and_stays_masked() -> None:
    raw = fixture("drifted-franz")
    assert "clear-secret-in-unit" not in raw  # masked by the remote script itself
    state = parse_host("franz", raw)
    sk = state.unit("mastodon-sidekiq.service")
    assert sk is not None
    assert dict(sk.environment)["AWS_SECRET_ACCESS_KEY"] == "(masked-on-host)"
    web = state.unit("mastodon-web.service")
    assert web is not None and web.text is not None
    assert "(masked-on-host)" in web.text and "clear-secret-in-unit" not in web.text


def test_a_managed_unit_carries_its_fragment_and_drop_in_text_and_per_file_hashes() -> None:
    state = parse_host("franz", fixture("drifted-franz"))
    web = state.unit("mastodon-web.service")
    assert web is not None and web.text is not None
    assert web.drop_in_paths == ("/etc/systemd/system/mastodon-web.service.d/override.conf",)
    assert "# /etc/systemd/system/mastodon-web.service.d/override.conf\n[Service]\nEnvironment=PORT=3001\n" in web.text
    assert [p for p, _ in web.file_hashes] == [web.fragment_path, *web.drop_in_paths]
    assert all(len(h) == 64 for _, h in web.file_hashes)


def test_the_hand_written_env_file_is_read_key_by_key_with_secrets_only_as_hashes() -> None:
    raw = fixture("drifted-franz")
    assert "do-not-leak-me" not in raw and "also secret" not in raw
    env = parse_host("franz", raw).env_file("/home/mastodon/live/.env.production")
    assert env is not None and env.present
    assert (env.mode, env.owner, env.group) == ("0644", "mastodon", "mastodon")
    assert env.value_map() == {"LOCAL_DOMAIN": "hachyderm.io", "S3_ENABLED": "FALSE", "3_BUCKET": "hachyderm-media",
                               "S3_REGION": "us-west-1"}
    assert env.keys == ("LOCAL_DOMAIN", "S3_ENABLED", "3_BUCKET", "S3_REGION", "SECRET_KEY_BASE",
                        "AWS_SECRET_ACCESS_KEY")
    secrets = env.secret_map()
    assert secrets["SECRET_KEY_BASE"] == hashlib.sha256(b"do-not-leak-me").hexdigest()
    assert secrets["AWS_SECRET_ACCESS_KEY"] == hashlib.sha256(b'"also secret"').hexdigest()
    assert secrets["SECRET_KEY_BASE"] == fingerprint("do-not-leak-me")  # what fleet would write compares equal
    assert env.invalid_lines == 1


def test_the_database_host_reports_the_postgres_cluster_instance_and_redis_running() -> None:
    state = parse_host("nietzsche", fixture("databases-nietzsche"))
    pg = state.unit("postgresql.service")
    assert pg is not None and pg.state() == "active/exited" and pg.enabled
    redis = state.unit("redis-server.service")
    assert redis is not None and redis.running
    assert state.unit("postgresql@15-main.service") is not None


def test_a_units_restart_count_and_main_pid_are_read_from_its_block() -> None:
    head, rest = fixture("drifted-franz").split("@@units\n")
    units, tail = rest.split("@@hashes\n")
    blocks = units.split("\n\n")  # systemctl show: one block per unit, blank-line separated
    (i,) = [i for i, b in enumerate(blocks) if "Id=mastodon-sidekiq.service\n" in b]
    assert blocks[i].count("NRestarts=0\n") == 1
    blocks[i] = blocks[i].replace("NRestarts=0\n", "NRestarts=17\n")
    state = parse_host("franz", f"{head}@@units\n" + "\n\n".join(blocks) + f"@@hashes\n{tail}")
    sidekiq = state.unit("mastodon-sidekiq.service")
    assert sidekiq is not None and sidekiq.n_restarts == 17 and sidekiq.main_pid > 0
    assert {u.n_restarts for u in state.units if u.unit != "mastodon-sidekiq.service"} == {0}


@pytest.mark.parametrize("padding", [0, 1])
def test_a_facts_section_may_hold_exactly_its_cap_of_lines(padding: int) -> None:
    head, rest = fixture("bare-fritz").split("@@facts\n")
    facts, tail = rest.split("@@units\n")
    lines = facts.splitlines()
    lines += [f"unasked_{i}=x" for i in range(MAX_FACT_LINES - len(lines) + padding)]
    text = f"{head}@@facts\n" + "\n".join(lines) + f"\n@@units\n{tail}"
    if not padding:
        assert parse_host("h", text).facts.hostname == "fritz"
        return
    with pytest.raises(ParseError, match=f"^h: the facts section of the collection output holds more than "
                                         f"{MAX_FACT_LINES:,} lines"):
        parse_host("h", text)


def test_exec_start_is_parsed_from_systemds_rendering() -> None:
    value = ("{ path=/usr/bin/x ; argv[]=/usr/bin/x -c 10 -q default ; ignore_errors=no ; start_time=[n/a] ; "
             "stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }")
    assert parse_exec_start(value) == ("/usr/bin/x", "-c", "10", "-q", "default")
    assert parse_exec_start("") == ()


@pytest.mark.parametrize("name", ["bare-fritz", "drifted-franz", "databases-nietzsche"])
def test_output_cut_short_anywhere_is_a_parse_error_naming_the_host(name: str) -> None:
    text = fixture(name)
    for cut in range(0, len(text) - len("@@end\n"), 97):
        with pytest.raises(ParseError, match=r"^franz|^fritz|^nietzsche|^h:") as e:
            parse_host("h", text[:cut])
        assert e.value.host == "h"


def test_something_printed_before_the_script_is_explained() -> None:
    with pytest.raises(ParseError, match="shell profile"):
        parse_host("h", "Welcome to my server!\n" + fixture("bare-fritz"))


def test_a_foreign_script_version_is_refused() -> None:
    with pytest.raises(ParseError, match="version"):
        parse_host("h", fixture("bare-fritz").replace("@@fleet 1", "@@fleet 7", 1))


@pytest.mark.parametrize("section", ["facts", "units", "hashes", "text", "env /home/mastodon/live/.env.production"])
def test_a_section_printed_twice_is_refused_not_overridden_by_the_later_copy(section: str) -> None:
    text = fixture("bare-fritz")
    start = text.index(f"@@{section}\n")
    body = text[start:text.index("\n@@", start) + 1]
    with pytest.raises(ParseError, match=f"^h: section '{section[:40]}' appears twice") as e:
        parse_host("h", text.replace("@@end\n", body + "@@end\n"))
    assert e.value.host == "h"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=600))
def test_garbage_is_a_parse_error_never_a_crash(text: str) -> None:
    with pytest.raises(ParseError) as e:
        parse_host("h", text)
    assert e.value.host == "h" and e.value.message.startswith("h: ")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_real_output_with_lines_damaged_parses_or_fails_cleanly(data: st.DataObject) -> None:
    lines = fixture(data.draw(st.sampled_from(["bare-fritz", "drifted-franz", "databases-nietzsche"]))).split("\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = data.draw(st.text(max_size=80).filter(lambda s: "\n" not in s))
    try:
        result = parse_host("h", "\n".join(lines))
    except ParseError as e:
        assert e.host == "h" and e.message.startswith("h: "), e.message
        return
    assert isinstance(result, HostState) and result.host == "h"


def test_the_script_is_valid_posix_sh_for_every_example_host() -> None:
    desired = config.load(REPO / "desired_state.toml", REPO / "hosts").desired
    assert desired is not None
    for host in desired.hosts:
        script = build_script(spec_for(desired, host.name))
        done = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
        assert done.returncode == 0, done.stderr


def test_hostile_names_reach_the_script_only_quoted() -> None:
    spec = CollectSpec(units=("a.service",), patterns=("x*",),
                       kinds=(("env", (("/tmp/it's; rm -rf / $(reboot) `id`.env", ("K",)),)),))
    script = build_script(spec)
    done = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert "'/tmp/it'\"'\"'s; rm -rf / $(reboot) `id`.env'" in script


@given(st.text(alphabet="ab\n\r", max_size=80), st.data(), st.integers(min_value=1, max_value=12))
def test_lines_splits_exactly_like_str_split_whatever_the_window(text: str, data: st.DataObject,
                                                                  window: int) -> None:
    start = data.draw(st.integers(min_value=0, max_value=len(text)))
    stop = data.draw(st.integers(min_value=start, max_value=len(text)))
    assert list(_lines(text, start, stop, window)) == text[start:stop].split("\n")
