"""The lighter remote script's own shell and awk, run here with `sh` and `awk` over unit
directories built in tmp_path and over `systemctl show` output captured on the lab
(tests/fixtures/collect/): discovery without `list-unit-files`, one `show` whose repeated
blocks are kept once and whose secrets are masked."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from fleet.collect.parse import parse_host
from fleet.collect.script import _SHOW_AWK, CollectSpec, build_script, discover_part, script_parts
from fleet.mastodon import SECRET_NAME_PATTERN

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "collect"


def found(dirs: tuple[str, ...], globs: list[str]) -> list[str]:
    done = subprocess.run(["sh", "-c", "set -f\n" + discover_part(globs, dirs) + '\necho $found'],
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_discovery_lists_unit_files_like_list_unit_files_without_asking_systemd(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    for d in (etc, lib):
        d.mkdir()
    for name in ("mastodon-web.service", "mastodon-streaming@.service", "redis-server.service", "cron.service"):
        (lib / name).write_text("[Service]\n")
    (etc / "mastodon-web.service").write_text("[Service]\n")  # an override of the same name: listed once
    (etc / "mastodon-web.service.d").mkdir()  # drop-in directory, not a unit
    (etc / "mastodon-sidekiq.service.wants").mkdir()
    (etc / "redis.service").symlink_to("/dev/null")  # masked
    (etc / "mastodon-gone.service").symlink_to(tmp_path / "nowhere")  # dangling: still a unit file
    missing = str(tmp_path / "not-a-dir")
    assert found((str(etc), missing, str(lib)), ["mastodon-*", "redis*"]) == [
        "mastodon-gone.service", "mastodon-web.service", "redis.service", "redis-server.service"]


def test_a_glob_that_matches_nothing_finds_nothing(tmp_path: Path) -> None:
    assert found((str(tmp_path),), ["nginx*", "mastodon-streaming@*.service"]) == []


@pytest.mark.parametrize("pattern", ["x$(id)*", "a b*", "it's*", "`id`*", "x;y*"])
def test_a_discovery_pattern_a_unit_name_cannot_hold_never_reaches_the_shell_unquoted(pattern: str) -> None:
    with pytest.raises(ValueError, match="discovery pattern"):
        build_script(CollectSpec(units=("a.service",), patterns=(pattern,)))


def test_one_systemctl_show_names_the_found_the_declared_and_the_loaded_globs() -> None:
    spec = CollectSpec(units=("mastodon-web.service",), patterns=("mastodon-*", "mastodon-streaming@*.service"))
    units = dict(script_parts(spec))["units"]
    assert units.count("systemctl ") == 1
    assert ("-- $found mastodon-web.service 'mastodon-*' 'mastodon-streaming@*.service' 2>&1" in units)
    script = build_script(spec)
    assert "list-unit-files" not in script and "list-units" not in script
    assert script.count("systemctl ") == 2  # the manager's facts, and the units


def units_section(name: str) -> str:
    text = (FIXTURES / f"{name}.txt").read_text()
    return text.split("@@units\n", 1)[1].split("\n@@", 1)[0]


def show_awk(text: str) -> str:
    done = subprocess.run(["awk", "-v", f"secret_re={SECRET_NAME_PATTERN}", _SHOW_AWK], input=text,
                          capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    return done.stdout.rstrip("\n")


@pytest.mark.parametrize("name", ["drifted-franz", "databases-nietzsche", "bare-fritz"])
def test_a_unit_shown_twice_by_name_and_by_glob_is_kept_once(name: str) -> None:
    once = units_section(name)
    ids = re.findall(r"^Id=(.*)$", once, re.MULTILINE)
    kept = show_awk(f"{once}\n\n{once}")
    # an alias shown by both its names (redis.service, redis-server.service) is one unit as well
    assert re.findall(r"^Id=(.*)$", kept, re.MULTILINE) == list(dict.fromkeys(ids))
    assert kept == show_awk(once)
    before = parse_host("h", (FIXTURES / f"{name}.txt").read_text())
    doubled = (FIXTURES / f"{name}.txt").read_text().replace(once, show_awk(f"{once}\n\n{once}"))
    assert parse_host("h", doubled).units == before.units


def test_a_secret_in_a_shown_environment_is_masked_on_the_host() -> None:
    once = units_section("drifted-franz")
    assert "AWS_SECRET_ACCESS_KEY=(masked-on-host)" in once
    raw = once.replace("AWS_SECRET_ACCESS_KEY=(masked-on-host)", "AWS_SECRET_ACCESS_KEY=clear-secret-in-unit")
    assert raw != once
    assert show_awk(raw) == once
    assert re.search(r"clear-secret", show_awk(f"{raw}\n\n{raw}")) is None


def light(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text()


def test_the_lighter_script_sees_on_a_database_host_what_list_unit_files_and_list_units_saw() -> None:
    # Captured on the lab (bench-00 of a generated 16-host fleet): `list-unit-files` and
    # `list-units --all` there named postgresql.service, postgresql@15-main.service (loaded
    # only: an instance), redis.service (an alias) and redis-server.service, plus the declared units.
    state = parse_host("bench-00", light("light-db-bench-00"))
    assert [u.unit for u in state.units] == [
        "mastodon-sidekiq-push-pull.service", "mastodon-sidekiq-scheduler.service", "redis-server.service",
        "postgresql.service", "postgresql@15-main.service"]
    cluster = state.unit("postgresql@15-main.service")
    assert cluster is not None and cluster.running
    assert cluster.fragment_path == "/lib/systemd/system/postgresql@.service"
    assert all(len(u.text_hash) == 64 for u in state.units)


def test_the_lighter_script_reads_an_app_hosts_units_texts_and_secret_fingerprints() -> None:
    state = parse_host("bench-01", light("light-app-bench-01"))
    assert sorted(u.unit for u in state.units) == [
        "mastodon-sidekiq-default.service", "mastodon-sidekiq-push-pull.service", "mastodon-streaming.service",
        "mastodon-web.service", "postgresql.service", "redis-server.service"]
    web = state.unit("mastodon-web.service")
    assert web is not None and web.running and web.text is not None and web.text.startswith("# /etc/systemd/")
    pg = state.unit("postgresql.service")
    assert pg is not None and pg.unit_file_state == "disabled" and pg.text is None  # discovered, not managed
    (env,) = state.env_files
    assert len(env.secrets) == 7 and all(re.fullmatch(r"[0-9a-f]{64}", h) for _, h in env.secrets)
    assert "  -" in light("light-app-bench-01")  # sha256sum's own line, read as the hash alone
