"""Installed, idle units reused from the kept snapshot (fleet.collect.script.idle_offers): the
script leaves them out of its `show` while their files and enablement are unchanged.  On real
hosts: a unit whose files change between two collections, and one whose enablement changes, are
still seen changed by `fleet audit`; one that stays idle is reported unchanged — and the reuse
was really in play (the script, given the kept snapshot, reused the idle units before the change
and stopped reusing the changed one after it)."""

from __future__ import annotations

import re
from typing import Any

from helpers import REPO, fleet_json

from fleet import config
from fleet.collect.script import build_script, idle_offers, spec_for
from fleet.model import HostState
from fleet.snapshot import from_record

APP = "fritz"  # postgresql and redis installed, neither declared there: found by discovery, idle
OTHER = "franz"
DROP_IN = "/etc/systemd/system/redis-server.service.d/fleet-reuse-test.conf"


def reused_by_script(lab: Any, host: str, kept: HostState) -> list[str]:
    """Run the collection script `fleet` would send `host` with `kept` as its kept observation."""
    desired = config.load(REPO / "desired_state.toml", REPO / "hosts").desired
    assert desired is not None
    spec = idle_offers(spec_for(desired, host), kept)
    out = lab.ssh(host, "sh -s", user="root", input=build_script(spec)).stdout
    section = re.search(r"^@@reused\n(.*?)^@@", out, re.MULTILINE | re.DOTALL)
    assert section is not None, out[:2000]
    units = out.split("@@units\n", 1)[1].split("\n@@hashes", 1)[0]
    names = section.group(1).split()
    for name in names:  # left out of the show: PID 1 was not asked to load it
        assert f"Id={name}\n" not in units + "\n"
    return names


def kept_of(lab: Any, snapshot: str, host: str) -> HostState:
    doc = fleet_json(lab, "status", "--observed", snapshot, ok_codes=(0, 1, 2, 3))
    state = from_record(doc["observation"])[host]
    assert isinstance(state, HostState)
    return state


def idle(lab: Any, host: str) -> None:
    lab.ssh(host, f"systemctl disable --now --quiet postgresql redis-server 2>/dev/null; rm -f {DROP_IN}; "
                  "rmdir /etc/systemd/system/redis-server.service.d 2>/dev/null; systemctl daemon-reload; "
                  "systemctl reset-failed", user="root", check=False)


def test_a_unit_changed_between_two_collections_is_seen_changed_and_an_idle_one_unchanged(lab: Any) -> None:
    for h in (APP, OTHER):
        idle(lab, h)
    try:
        # Two collections, so that the second is taken with the first kept (as every status after the first).
        fleet_json(lab, "audit", ok_codes=(0, 2))
        baseline = fleet_json(lab, "audit", ok_codes=(0, 2))["snapshot"]
        kept = kept_of(lab, baseline, APP)
        for name in ("postgresql.service", "redis-server.service"):
            unit = kept.unit(name)
            assert unit is not None and unit.state() == "inactive/dead" and unit.unit_file_state == "disabled"
        assert reused_by_script(lab, APP, kept) == ["postgresql.service", "redis-server.service"]

        # On APP, redis-server gains a drop-in (its files change); on OTHER it is enabled, not started.
        lab.ssh(APP, f"mkdir -p {DROP_IN.rsplit('/', 1)[0]} && printf '[Service]\\nNice=5\\n' > {DROP_IN} "
                     "&& systemctl daemon-reload", user="root")
        lab.ssh(OTHER, "systemctl enable --quiet redis-server", user="root")
        assert reused_by_script(lab, APP, kept) == ["postgresql.service"]

        report = fleet_json(lab, "audit", "--since", baseline, ok_codes=(0, 2))
        changes = [c["change"] for c in report["changes"]]
        assert f"on {APP}, the unit file of redis-server.service changed" in changes, changes
        assert f"on {OTHER}, redis-server.service went from disabled to enabled" in changes, changes
        assert not [c for c in changes if "postgresql.service" in c and (APP in c or OTHER in c)], changes
        seen = kept_of(lab, report["snapshot"], APP).unit("redis-server.service")
        assert seen is not None and DROP_IN in seen.drop_in_paths
    finally:
        for h in (APP, OTHER):
            idle(lab, h)
