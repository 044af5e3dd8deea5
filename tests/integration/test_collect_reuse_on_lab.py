"""Installed, idle units reused from the kept snapshot (fleet.collect.script.idle_offers): the
script leaves them out of its `show` while their files and enablement are unchanged.  On real
hosts: a unit whose files change between two collections, and one whose enablement changes, are
still seen changed by `fleet audit`; one that stays idle is reported unchanged — and the reuse
was really in play (the script, given the kept snapshot, reused the idle units before the change
and stopped reusing the changed one after it).

Env files read by content address (fleet/resources/env_file.py `env_offers`): a hand edit of
.env.production (the postmortem's S3_ENABLED and `3_BUCKET`) after a collection that reused the
file's kept parse is reported by `fleet status` and `fleet plan`; and the reuse was in play (the
script, given the kept snapshot, said `known` for the file before the edit and parsed it after)."""

from __future__ import annotations

import re
from typing import Any

from helpers import REPO, fleet, fleet_json

from fleet import config
from fleet.collect.script import build_script, idle_offers, reuse_offers, spec_for
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


ENV = "/home/mastodon/live/.env.production"
ENV_HOST = "franz"


def env_section(lab: Any, host: str, kept: HostState) -> list[str]:
    """The env file's section of the script `fleet` would send `host` with `kept` kept."""
    desired = config.load(REPO / "desired_state.toml", REPO / "hosts").desired
    assert desired is not None
    out = lab.ssh(host, "sh -s", user="root", input=build_script(reuse_offers(spec_for(desired, host), kept))).stdout
    return out.split(f"@@env {ENV}\n", 1)[1].split("\n@@", 1)[0].splitlines()


def observed(status: dict[str, Any], host: str) -> HostState:
    """The host as a `fleet status --json` document observed it (the snapshot it keeps)."""
    state = from_record(status["observation"])[host]
    assert isinstance(state, HostState)
    return state


def env_cell(status: dict[str, Any], host: str) -> list[dict[str, Any]]:
    return [e for e in status["observation"]["hosts"][host]["env_files"] if e["path"] == ENV]


def test_a_hand_edit_of_an_env_file_is_seen_after_a_collection_that_reused_its_parse(lab: Any) -> None:
    converge = fleet(lab, "apply", "--yes", "--settle", "1", timeout=300)
    assert converge.returncode == 0, converge.stdout + converge.stderr
    try:
        fleet_json(lab, "status", ok_codes=(0, 1, 2, 3))
        reused = fleet_json(lab, "status", ok_codes=(0, 1, 2, 3))  # taken with the first kept
        kept = observed(reused, ENV_HOST)
        (kept_env,) = [e for e in kept.env_files if e.path == ENV]
        assert len(kept_env.sha256) == 64 and dict(kept_env.values)["S3_ENABLED"] == "true"
        section = env_section(lab, ENV_HOST, kept)
        assert section[1:] == [f"known {kept_env.sha256}"], section  # the reuse is in play
        plan = fleet_json(lab, "plan", ok_codes=(0, 2))
        assert not [c for c in plan["changes"] if c["host"] == ENV_HOST and c["target"] == ENV], plan["changes"]

        lab.ssh(ENV_HOST, f"sed -i -e 's/^S3_ENABLED=.*/S3_ENABLED=FALSE/' -e 's/^S3_BUCKET=/3_BUCKET=/' {ENV}",
                user="root")
        section = env_section(lab, ENV_HOST, kept)
        assert "V S3_ENABLED FALSE" in section and "V 3_BUCKET hachyderm-media" in section, section

        status = fleet_json(lab, "status", ok_codes=(0, 1, 2, 3))
        (seen,) = env_cell(status, ENV_HOST)
        values = dict(map(tuple, seen["values"]))
        assert values.get("S3_ENABLED") == "FALSE" and "3_BUCKET" in seen["keys"] and "S3_BUCKET" not in seen["keys"]
        assert seen["sha256"] != kept_env.sha256
        plan = fleet_json(lab, "plan", ok_codes=(2,))
        (write,) = [c for c in plan["changes"] if c["host"] == ENV_HOST and c["target"] == ENV]
        keys = {k[0]: k[1] for k in write["keys"]}
        assert keys == {"S3_ENABLED": "change", "S3_BUCKET": "set", "3_BUCKET": "remove"}, write

        # the edited file kept, then collected again with its new parse reused: still seen
        again = fleet_json(lab, "status", ok_codes=(0, 1, 2, 3))
        assert env_cell(again, ENV_HOST) == [seen]
        assert env_section(lab, ENV_HOST, observed(again, ENV_HOST))[1:] == [f"known {seen['sha256']}"]
        replan = fleet_json(lab, "plan", ok_codes=(2,))
        assert [c for c in replan["changes"] if c["host"] == ENV_HOST and c["target"] == ENV] == [write]
    finally:
        repair = fleet(lab, "apply", "--yes", "--settle", "1", timeout=300)
        assert repair.returncode == 0, repair.stdout + repair.stderr
