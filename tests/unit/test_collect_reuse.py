"""Installed, idle units left out of the `show` while unchanged (fleet.collect.script.idle_offers,
idle_part; docs/PERFORMANCE.md, "The `show` of installed, idle units").

The script's own shell runs here with `sh` over unit directories built in tmp_path, the real
`sha256sum`, and a `systemctl` first on PATH that records any call (the script must make none: no
PID 1).  Every change systemd would see in a unit it loads — its text, a drop-in of its own, of
its type or of a name prefix, an override of its fragment, a mask, a link, an alias, its
enablement (a `.wants`/`.requires` symlink, at run time too) — must make the script name it in the
`show` again."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from fleet.collect.parse import parse_host
from fleet.collect.script import (
    CollectSpec,
    _dropin_dirs,
    build_script,
    discover_part,
    idle_offers,
    idle_part,
    script_parts,
)
from fleet.errors import ParseError
from fleet.model import HostFacts, HostState, UnitState

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "collect"

FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >>"$FAKE_CALLS"
exit 1
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Host:
    """Unit directories (etc before lib, as systemd's search path), `lib` also reachable through a
    symlinked directory (`merged`: /lib → /usr/lib), and a systemctl that records its calls."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc, self.rundir, self.usr = root / "etc", root / "run", root / "usr-lib"
        for d in (self.etc, self.rundir, self.usr):
            d.mkdir()
        self.lib = root / "lib"
        self.lib.symlink_to(self.usr)  # merged /usr: every file of /usr/lib is also under /lib
        self.dirs = (str(self.etc), str(self.rundir), str(self.usr), str(self.lib))
        self.bin = root / "bin"
        self.bin.mkdir()
        fake = self.bin / "systemctl"
        fake.write_text(FAKE_SYSTEMCTL)
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
        self.calls = root / "calls"
        self.calls.write_text("")

    def install(self, name: str, text: str = "[Service]\nExecStart=/bin/true\n") -> None:
        (self.usr / name).write_text(text)

    def seen(self, name: str) -> UnitState:
        """The unit as a fresh `show` of it, not loaded before, would describe it."""
        frag = self.lib / name
        return UnitState(unit=name, load_state="loaded", active_state="inactive", sub_state="dead",
                         unit_file_state="disabled", result="success",
                         exec_start=("/bin/true",), fragment_path=str(frag), file_hashes=((str(frag), sha(frag)),),
                         text_hash="kept")

    def run(self, offers: tuple[UnitState, ...], globs: list[str], hostname: str = "") -> tuple[list[str], list[str]]:
        """(the names the script reused, what `$found` names for the `show` then); `hostname`: the
        one the units were kept under (default: this machine's)."""
        hostname = hostname or Path("/proc/sys/kernel/hostname").read_text().strip()
        script = "\n".join(("set -f", discover_part(globs, self.dirs), idle_part(offers, hostname, self.dirs),
                            "echo '@@found'", "echo $found"))
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "LC_ALL": "C",
               "FAKE_CALLS": str(self.calls)}
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env, timeout=30, check=True)
        head, _, tail = done.stdout.partition("@@found\n")
        assert head.startswith("@@reused\n")
        return head.split("\n", 1)[1].split(), tail.split()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    h = Host(tmp_path)
    h.install("postgresql.service")
    h.install("redis-server.service")
    return h


def both(host: Host) -> tuple[UnitState, ...]:
    return host.seen("postgresql.service"), host.seen("redis-server.service")


GLOBS = ["postgresql*", "redis*"]


def test_unchanged_idle_units_are_reused_and_left_out_of_the_show(host: Host) -> None:
    reused, found = host.run(both(host), GLOBS)
    assert reused == ["postgresql.service", "redis-server.service"]
    assert found == []
    assert host.calls.read_text() == ""  # systemd is not asked anything


def test_nothing_is_reused_once_the_host_has_another_name(host: Host) -> None:
    assert host.run(both(host), GLOBS, hostname="another-name") == ([], ["postgresql.service", "redis-server.service"])


def test_without_offers_every_found_unit_is_named(host: Host) -> None:
    reused, found = host.run((), GLOBS)
    assert reused == [] and found == ["postgresql.service", "redis-server.service"]


def change_text(host: Host) -> None:
    (host.usr / "redis-server.service").write_text("[Service]\nExecStart=/bin/false\n")


def new_drop_in(host: Host) -> None:
    (host.etc / "redis-server.service.d").mkdir()
    (host.etc / "redis-server.service.d" / "override.conf").write_text("[Service]\nNice=5\n")


def prefix_drop_in(host: Host) -> None:
    (host.rundir / "redis-.service.d").mkdir()
    (host.rundir / "redis-.service.d" / "x.conf").write_text("[Service]\nNice=5\n")


def type_drop_in(host: Host) -> None:
    (host.etc / "service.d").mkdir()
    (host.etc / "service.d" / "all.conf").write_text("[Service]\nNice=5\n")


def override(host: Host) -> None:
    (host.etc / "redis-server.service").write_text((host.usr / "redis-server.service").read_text())


def mask(host: Host) -> None:
    (host.etc / "redis-server.service").symlink_to("/dev/null")


def enable(host: Host) -> None:
    (host.etc / "multi-user.target.wants").mkdir()
    (host.etc / "multi-user.target.wants" / "redis-server.service").symlink_to(host.lib / "redis-server.service")


def enable_at_run_time_under_another_name(host: Host) -> None:
    (host.rundir / "default.target.requires").mkdir()
    (host.rundir / "default.target.requires" / "keydb.service").symlink_to(host.usr / "redis-server.service")


def enable_dangling(host: Host) -> None:  # a symlink of its name, whatever it points at
    (host.etc / "multi-user.target.wants").mkdir()
    (host.etc / "multi-user.target.wants" / "redis-server.service").symlink_to(host.root / "nowhere")


def link(host: Host) -> None:
    (host.etc / "redis-server.service").symlink_to(host.usr / "redis-server.service")


def removed(host: Host) -> None:
    (host.usr / "redis-server.service").unlink()


def alias(host: Host) -> None:
    (host.etc / "keydb.service").symlink_to(host.lib / "redis-server.service")


@pytest.mark.parametrize("change", [change_text, new_drop_in, prefix_drop_in, override, mask, link, enable,
                                    enable_at_run_time_under_another_name, enable_dangling, removed, alias])
def test_a_unit_whose_files_or_enablement_changed_is_named_in_the_show_again(host: Host, change: object) -> None:
    offers = both(host)
    change(host)  # type: ignore[operator]
    reused, found = host.run(offers, GLOBS)
    if change is removed:  # a kept fragment gone: `find` cannot compare with it, nothing is reused
        assert (reused, found) == ([], ["postgresql.service"])
        return
    assert reused == ["postgresql.service"]
    assert "redis-server.service" in found
    assert "postgresql.service" not in found
    assert host.calls.read_text() == ""


def test_a_drop_in_for_every_unit_of_the_type_names_them_all_again(host: Host) -> None:
    offers = both(host)
    type_drop_in(host)
    assert host.run(offers, GLOBS) == ([], ["postgresql.service", "redis-server.service"])


def test_a_kept_drop_in_that_no_longer_applies_names_the_unit_again(host: Host) -> None:
    new_drop_in(host)
    conf = host.etc / "redis-server.service.d" / "override.conf"
    seen = host.seen("redis-server.service")
    kept = replace(seen, drop_in_paths=(str(conf),), file_hashes=(*seen.file_hashes, (str(conf), sha(conf))))
    assert host.run((kept,), GLOBS)[0] == ["redis-server.service"]  # still there: reused
    # moved aside (same name, same text, another unit's directory): it no longer applies
    (host.etc / "redis-server.service.d").rename(host.etc / "other.service.d")
    (host.etc / "redis-server.service.d").mkdir()
    reused, found = host.run((kept,), GLOBS)
    assert reused == [] and "redis-server.service" in found


def test_an_enablement_symlink_of_another_unit_changes_nothing(host: Host) -> None:
    (host.etc / "multi-user.target.wants").mkdir()
    (host.etc / "multi-user.target.wants" / "cron.service").symlink_to("/lib/systemd/system/cron.service")
    assert host.run(both(host), GLOBS) == (["postgresql.service", "redis-server.service"], [])


def test_the_drop_in_directories_are_the_units_its_types_and_its_name_prefixes() -> None:
    assert _dropin_dirs("a-b-c.service") == ["a-b-c.service.d", "service.d", "a-b-.service.d", "a-.service.d"]
    assert _dropin_dirs("postgresql.service") == ["postgresql.service.d", "service.d"]


# ---- what the client offers -------------------------------------------------------------------

SPEC = CollectSpec(units=("mastodon-web.service",), managed=("mastodon-web.service",),
                   patterns=("postgresql*", "redis*"))
IDLE = UnitState(unit="redis-server.service", load_state="loaded", active_state="inactive", sub_state="dead",
                 unit_file_state="disabled", result="success", fragment_path="/lib/systemd/system/redis-server.service",
                 file_hashes=(("/lib/systemd/system/redis-server.service", "a" * 64),), text_hash="t")


FACTS = HostFacts(hostname="bench-01")


def kept(*units: UnitState) -> HostState:
    return HostState(host="h", facts=FACTS, units=units, env_files=())


def test_the_first_collection_without_a_kept_observation_is_todays_script() -> None:
    assert idle_offers(SPEC, None) == SPEC
    assert idle_offers(SPEC, replace(kept(IDLE), facts=HostFacts(hostname="it's"))) == SPEC
    assert "@@reused" not in build_script(idle_offers(SPEC, None))
    assert "@@reused" in build_script(idle_offers(SPEC, kept(IDLE)))


@pytest.mark.parametrize("unit", [
    replace(IDLE, active_state="active", sub_state="running", main_pid=42),  # running: never reused
    replace(IDLE, active_state="failed", sub_state="failed", result="exit-code"),
    replace(IDLE, n_restarts=1),
    replace(IDLE, active_enter="Wed 2026-12-02 10:00:00 UTC"),  # ran since it was loaded
    replace(IDLE, unit="mastodon-web.service"),  # declared
    replace(IDLE, unit="nginx.service"),  # not found by a discovery pattern
    replace(IDLE, unit="redis-server@6380.service"),
    replace(IDLE, text="[Service]\n"),  # managed
    replace(IDLE, load_state="masked", unit_file_state="masked", fragment_path="/dev/null",
            file_hashes=(("/dev/null", "e" * 64),)),
    replace(IDLE, unit_file_state=""),
    replace(IDLE, unit_file_state="enabled"),  # idle but enabled: only a systemctl could confirm it
    replace(IDLE, unit_file_state="indirect"),
    replace(IDLE, fragment_path="/lib/systemd/system/redis.service",  # loaded through an alias's name
            file_hashes=(("/lib/systemd/system/redis.service", "a" * 64),)),
    replace(IDLE, file_hashes=(("/lib/systemd/system/redis-server.service", "-"),)),  # not hashed
    replace(IDLE, drop_in_paths=("/etc/systemd/system/redis-server.service.d/x.conf",)),  # hash missing
    replace(IDLE, fragment_path="/lib/systemd/system/it's $(touch pwned).service",
            file_hashes=(("/lib/systemd/system/it's $(touch pwned).service", "a" * 64),)),
    replace(IDLE, unit_file_state="disabled'; touch pwned; '"),
])
def test_only_a_plain_idle_discovered_unit_is_offered(unit: UnitState) -> None:
    assert idle_offers(SPEC, kept(unit)).idle == ()


def test_every_value_sent_to_the_host_is_quoted(tmp_path: Path) -> None:
    # Offered values are plain by construction; the script quotes them all the same, so that a
    # shell reading it sees each as one word of data.
    offered = idle_offers(SPEC, kept(IDLE)).idle
    assert offered == (IDLE,)
    part = dict(script_parts(idle_offers(SPEC, kept(IDLE))))["idle"]
    assert "idle redis-server.service /lib/systemd/system/redis-server.service '" in part
    assert 'if [ "$name_now" = bench-01 ] && [ -n "$frags" ] && refs=$(find -L $dirs -maxdepth 2 \\( ' in part
    assert ("-samefile /lib/systemd/system/redis-server.service -o -name redis-server.service -o "
            "-path '*/redis-server.service.d/*.conf' -o -path '*/service.d/*.conf' -o -path '*/redis-.service.d/*.conf'"
            in part)
    assert re.search(r"'a{64}  /lib/systemd/system/redis-server.service'", part)
    done = subprocess.run(["sh", "-n", "-c", build_script(idle_offers(SPEC, kept(IDLE)))], capture_output=True,
                          check=False)
    assert done.returncode == 0, done.stderr


# ---- the client merges what the script reused -------------------------------------------------


def collection(units_section: str, reused: list[str]) -> str:
    text = (FIXTURES / "light-app-bench-01.txt").read_text()
    head, rest = text.split("@@units\n", 1)
    body, tail = rest.split("\n@@hashes", 1)
    return f"{head}@@reused\n" + "".join(f"{r}\n" for r in reused) + f"@@units\n{units_section}\n@@hashes{tail}"


def without(block_of: str, text: str) -> str:
    blocks = text.split("\n\n")
    return "\n\n".join(b for b in blocks if f"Id={block_of}\n" not in f"{b}\n")


def test_a_reused_unit_is_the_kept_one_and_a_shown_one_wins_over_it() -> None:
    full = (FIXTURES / "light-app-bench-01.txt").read_text()
    fresh = parse_host("bench-01", full)
    pg = fresh.unit("postgresql.service")
    assert pg is not None
    units = full.split("@@units\n", 1)[1].split("\n@@hashes", 1)[0]
    # left out of the show, named in @@reused: the kept unit stands in for it, the same as fresh
    reused = parse_host("bench-01", collection(without("postgresql.service", units), ["postgresql.service"]),
                        idle=(pg,))
    assert reused.unit("postgresql.service") == pg
    assert sorted(u.unit for u in reused.units) == sorted(u.unit for u in fresh.units)
    # loaded since (matched by the show's glob): the fresh block wins over the kept one
    stale = replace(pg, unit_file_state="enabled")
    both_ways = parse_host("bench-01", collection(units, ["postgresql.service"]), idle=(stale,))
    assert both_ways.unit("postgresql.service") == pg


def test_a_reused_name_the_client_did_not_offer_is_refused() -> None:
    full = (FIXTURES / "light-app-bench-01.txt").read_text()
    units = full.split("@@units\n", 1)[1].split("\n@@hashes", 1)[0]
    with pytest.raises(ParseError, match="not offered"):
        parse_host("bench-01", collection(units, ["sshd.service"]))


# ---- where the kept observation comes from ---------------------------------------------------


def test_the_kept_states_are_each_hosts_newest_snapshot_of_this_fleet(tmp_path: Path) -> None:
    from fleet.journal import Journal, journal_path
    from fleet.model import Desired, Host, HostError
    from fleet.snapshot import host_summary, pack
    from fleet.workflows.base import Common
    from fleet.workflows.observe import kept_states

    common = Common(desired=tmp_path / "d.toml", hosts=tmp_path / "hosts", state_dir=tmp_path / "state")
    desired = Desired(name="hachyderm", hosts=(Host(name="a", address="a"), Host(name="b", address="b")), services=())
    hosts = desired.hosts
    assert kept_states(common, desired, hosts) == {}  # no journal: a first collection

    def state(host: str, enablement: str) -> HostState:
        return HostState(host=host, facts=FACTS, units=(replace(IDLE, unit_file_state=enablement),), env_files=())

    def save(fleet: str, results: dict[str, HostState | HostError], lab: bool = False, now: float = 0) -> None:
        (tmp_path / "state").mkdir(exist_ok=True)
        with Journal.open(journal_path(common.state_dir)) as j:
            j.save_snapshot(command="status", fleet=fleet, lab=lab, hosts=host_summary(results), data=pack(results),
                            operator="t", now=now)

    save("hachyderm", {"a": state("a", "old"), "b": state("b", "old")}, now=1)
    save("hachyderm", {"a": state("a", "new"), "b": HostError(host="b", kind="connect", message="down")}, now=2)
    save("other", {"a": state("a", "other fleet")}, now=3)
    save("hachyderm", {"a": state("a", "the lab's")}, lab=True, now=4)
    kept = kept_states(common, desired, hosts)
    assert {h: s.units[0].unit_file_state for h, s in kept.items()} == {"a": "new", "b": "old"}


def test_find_walks_a_directory_reached_by_two_names_once(host: Host) -> None:
    # merged /usr: /lib/systemd/system is /usr/lib/systemd/system, the largest unit directory
    part = idle_part(both(host), Path("/proc/sys/kernel/hostname").read_text().strip(), host.dirs)
    done = subprocess.run(["sh", "-c", f"set -f; found=; {part}\necho \"@@dirs $dirs\""], capture_output=True,
                          text=True, check=True)
    assert done.stdout.rsplit("@@dirs ", 1)[1].split() == [str(host.etc), str(host.rundir), str(host.usr)]
