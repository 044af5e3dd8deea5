"""A stock-shaped lab (tests/integration/stock.py): Mastodon's hardened units, templated streaming
with two instances and its wrapper, Sidekiq without -q reading config/sidekiq.yml — declared with
fleet's model in tests/fixtures/stock/ and judged on real systemd."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import fleet, fleet_json
from stock import LIVE, STOCK, file_on, shape_stock, units_on, unshape_stock

from fleet.model import SIDEKIQ_QUEUES

FAILED = "mastodon-streaming@4001.service"


@pytest.fixture
def stock(lab: Any) -> Iterator[Any]:
    shape_stock(lab)
    yield lab
    lab.ssh("fritz", f"rm -f {LIVE}/STANDIN_FAIL", user="root", check=False)
    unshape_stock(lab)


def run(lab: Any, *args: str, timeout: float = 180) -> Any:
    return fleet(lab, *args, directory=STOCK, timeout=timeout)


def assert_files_as_declared(lab: Any) -> None:
    """Every unit file on the hosts is the stock file, byte for byte: every directive kept."""
    for host in ("fritz", "freud"):
        for unit, text in units_on(host).items():
            assert file_on(lab, host, f"/etc/systemd/system/{unit}") == text, f"{host}:{unit} differs"


def test_the_stock_fleet_declared_with_templates_and_its_own_unit_text_plans_nothing(stock: Any) -> None:
    check = fleet(stock, "check", directory=STOCK)
    assert check.returncode == 0, check.stdout + check.stderr
    done = run(stock, "plan", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    plan = json.loads(done.stdout)
    assert plan["complete"] is True and plan["changes"] == [], plan["changes"]


def test_stock_sidekiq_without_q_serves_every_queue_its_config_lists(stock: Any) -> None:
    status = fleet_json(stock, "status", directory=STOCK)
    (proc,) = status["sidekiq"]["processes"]
    assert (proc["host"], proc["unit"], proc["concurrency"], proc["db_pool"]) == (
        "freud", "mastodon-sidekiq.service", 25, 25)
    assert proc["queues_from"] == f"{LIVE}/config/sidekiq.yml" and proc["problem"] == ""
    assert [q["name"] for q in proc["queues"]] == list(SIDEKIQ_QUEUES)
    assert all(status["sidekiq"]["queues"][q] == ["freud:mastodon-sidekiq.service"] for q in SIDEKIQ_QUEUES)
    assert status["sidekiq"]["findings"] == []
    text = run(stock, "status")
    assert text.returncode == 0 and "NOBODY" not in text.stdout and "queue-unserved" not in text.stdout
    assert f"queues from {LIVE}/config/sidekiq.yml" in text.stdout


def fail_instance(lab: Any, unit: str) -> None:
    """The instance's stand-in exits at once until systemd gives up on it (start limit): failed."""
    lab.ssh("fritz", f"echo exit > {LIVE}/STANDIN_FAIL && systemctl restart {unit}", user="root", check=False)
    deadline = time.monotonic() + 60
    while lab.ssh("fritz", f"systemctl is-failed --quiet {unit}", user="root", check=False).returncode != 0:
        assert time.monotonic() < deadline, lab.ssh("fritz", f"systemctl status {unit}", user="root",
                                                    check=False).stdout
        time.sleep(0.5)
    lab.ssh("fritz", f"rm -f {LIVE}/STANDIN_FAIL", user="root")


def test_a_failed_streaming_instance_is_flagged_audited_and_brought_back(stock: Any) -> None:
    fail_instance(stock, FAILED)
    status = run(stock, "status")
    row = next(line for line in status.stdout.splitlines() if FAILED in line)
    assert "failed/failed (!)" in row, status.stdout
    assert "mastodon-streaming@4000.service" in status.stdout  # its sibling, a row of its own
    audit = run(stock, "audit", "--format", "json")
    assert audit.returncode == 2, audit.stdout + audit.stderr
    errors = [f for f in json.loads(audit.stdout)["findings"] if f["severity"] == "error"]
    assert [(f["code"], f["host"]) for f in errors] == [("unit.down", "fritz")] and FAILED in errors[0]["message"]
    plan = fleet_json(stock, "plan", directory=STOCK, ok_codes=(2,))
    assert [c["id"] for c in plan["changes"]] == [f"fritz:start:{FAILED}"]
    applied = run(stock, "apply", "--yes", "--settle", "1", timeout=300)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert stock.ssh("fritz", f"systemctl is-active {FAILED}", user="root").stdout.strip() == "active"
    assert stock.ssh("fritz", "curl -fsS http://127.0.0.1:4001/api/v1/streaming/health", user="root").stdout == "OK"
    assert run(stock, "plan").returncode == 0
    assert_files_as_declared(stock)


def test_after_an_apply_the_hardened_unit_files_still_hold_every_directive(stock: Any) -> None:
    assert_files_as_declared(stock)
    # an operator's edit on the host: fleet puts the declared file back, every directive with it
    stock.ssh("fritz", "sed -i 's/^ProtectSystem=strict$/ProtectSystem=full/' "
                       "/etc/systemd/system/mastodon-web.service /etc/systemd/system/mastodon-streaming@.service",
              user="root")
    plan = fleet_json(stock, "plan", directory=STOCK, ok_codes=(2,))
    writes = {c["target"] for c in plan["changes"] if c["action"] == "write-unit"}
    assert writes == {"mastodon-web.service", "mastodon-streaming@.service"}
    restarts = [c["target"] for c in plan["changes"] if c["action"] == "restart"]
    assert sorted(restarts) == ["mastodon-streaming@4000.service", "mastodon-streaming@4001.service",
                                "mastodon-web.service"]
    applied = run(stock, "apply", "--yes", "--settle", "1", timeout=300)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert_files_as_declared(stock)
    assert run(stock, "plan").returncode == 0
