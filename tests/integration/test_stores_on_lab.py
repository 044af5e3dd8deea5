"""Data stores on real hosts: the lab's Postgres cluster killed under its active/exited parent unit,
a streaming standby made beside it, Redis read with the lab's password (fleet/resources/stores.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, fleet, fleet_json, reset_all

DB = "nietzsche"
CLUSTER_UNIT = "postgresql@15-main.service"


def cell(report: dict[str, Any], service: str, host: str = DB) -> dict[str, Any]:
    row = next(r for r in report["services"] if r["service"] == service)
    found: dict[str, Any] = row["cells"][host]
    return found


@pytest.fixture(scope="module")
def converged_once(lab: Any) -> Iterator[Any]:
    """Converged once for the module: each test leaves the lab as it found it (the cluster it killed
    started again, the standby cluster it made dropped), so the next needs no reset and apply — and
    the module leaves the example converged, which the next module's `converge` starts from."""
    reset_all(lab)
    done = fleet(lab, "apply", "--yes", "--settle", "1", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    yield lab


@pytest.fixture
def converged(converged_once: Any) -> Iterator[Any]:
    lab = converged_once
    yield lab
    lab.ssh(DB, f"systemctl reset-failed {CLUSTER_UNIT}; systemctl start {CLUSTER_UNIT}", user="root", check=False)


def test_a_killed_cluster_is_flagged_by_status_and_audit_while_postgresql_service_stays_active(converged: Any) -> None:
    lab = converged
    before = fleet_json(lab, "status")
    pg, redis = cell(before, "postgres"), cell(before, "redis")
    assert pg["status"] == "ok" and pg["notes"] == ["15/main: primary, accepting connections on 5432"]
    # Redis read with the password fleet apply wrote into the env file (REDISCLI_AUTH, never an argv).
    assert redis["status"] == "ok" and redis["notes"][0].startswith("redis on 6379: PONG, master, ")

    lab.ssh(DB, "kill -9 $(head -n 1 /var/lib/postgresql/15/main/postmaster.pid)", user="root")
    lab.ssh(DB, f"for i in $(seq 50); do systemctl is-failed --quiet {CLUSTER_UNIT} && exit 0; sleep 0.1; done; "
                "exit 1", user="root")

    report = fleet_json(lab, "status")
    pg = cell(report, "postgres")
    assert pg["state"] == "active/exited"  # the parent unit says nothing is wrong …
    assert pg["status"] == "drift"  # … the cluster under it does
    assert [p["code"] for p in pg["problems"]] == ["store.cluster-failed"]
    assert CLUSTER_UNIT in pg["detail"] and "pg_isready on port 5432: no response" in pg["detail"]
    text = fleet(lab, "status")
    assert text.returncode == 0, text.stderr
    postgres_line = next(line for line in text.stdout.splitlines() if line.startswith("postgres "))
    assert "active/exited (!)" in postgres_line
    hosts = text.stdout.split("HOST ", 1)[1]
    assert f"(!) postgres: cluster unit {CLUSTER_UNIT} failed" in hosts

    audit = fleet(lab, "audit", "--json")
    assert audit.returncode == 2, audit.stdout + audit.stderr
    errors = [f for f in json.loads(audit.stdout)["findings"] if f["severity"] == "error"]
    assert [(f["code"], f["host"]) for f in errors] == [("store.cluster-failed", DB)], errors  # nothing else
    audit_text = fleet(lab, "audit")
    assert audit_text.returncode == 2
    assert f"postgres on {DB}: cluster unit {CLUSTER_UNIT} failed" in audit_text.stdout

    lab.ssh(DB, f"systemctl reset-failed {CLUSTER_UNIT} && systemctl start {CLUSTER_UNIT}", user="root")
    after = fleet_json(lab, "audit")
    assert not [f for f in after["findings"] if f["code"].startswith("store.")], after["findings"]


@pytest.fixture
def with_standby(converged: Any, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    """A second cluster, 15/standby on port 5433, streaming from 15/main; and a copy of the example
    that lets fleet probe both and declares each cluster unit with its role."""
    lab = converged
    lab.ssh(DB, "pg_createcluster 15 standby -p 5433 >/dev/null && rm -rf /var/lib/postgresql/15/standby/* && cd / && "
                "runuser -u postgres -- pg_basebackup -D /var/lib/postgresql/15/standby -p 5432 -R -X stream && "
                "systemctl start postgresql@15-standby.service", user="root", timeout=120)
    root = tmp_path / "fleet"
    shutil.copytree(REPO / "hosts", root / "hosts")
    text = (REPO / "desired_state.toml").read_text()
    old = 'unit = "postgresql.service"\nhosts = ["nietzsche"]\nobserve_only = true'
    assert text.count(old) == 1
    text = text.replace(old, f'unit = "{CLUSTER_UNIT}"\nhosts = ["nietzsche"]\nobserve_only = true\n'
                             'role = "primary"\nprobe = true')
    text += ('\n[services.postgres-standby]\nkind = "postgres"\nunit = "postgresql@15-standby.service"\n'
             'hosts = ["nietzsche"]\nobserve_only = true\nrole = "standby"\nprobe = true\nport = 5433\n')
    (root / "desired_state.toml").write_text(text)
    yield lab, root
    lab.ssh(DB, "pg_dropcluster --stop 15 standby", user="root", check=False)


def test_a_streaming_standby_is_seen_as_one_and_a_promoted_one_breaks_its_declared_role(
        with_standby: tuple[Any, Path]) -> None:
    lab, root = with_standby
    report = fleet_json(lab, "status", directory=root)
    primary, standby = cell(report, "postgres"), cell(report, "postgres-standby")
    assert primary["status"] == "ok" and standby["status"] == "ok", (primary, standby)
    assert primary["notes"][0].startswith("15/main: primary, accepting connections on 5432, standbys: local streaming")
    assert standby["notes"][0].startswith("15/standby: standby, accepting connections on 5433, of "
                                          "/var/run/postgresql:5432 (streaming)")

    lab.ssh(DB, "pg_ctlcluster 15 standby promote", user="root")
    audit = fleet(lab, "audit", "--json", directory=root)
    assert audit.returncode == 2, audit.stdout + audit.stderr
    report = fleet_json(lab, "status", directory=root)
    standby = cell(report, "postgres-standby")
    assert standby["status"] == "drift"
    assert [p["message"] for p in standby["problems"]] == [
        "15/standby is a primary, declared standby: the server says so (pg_is_in_recovery)"]
