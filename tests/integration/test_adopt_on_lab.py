"""`fleet adopt` on real systemd: a stock-shaped lab (tests/integration/stock.py) written as a fleet
directory whose plan is empty and whose unit files are the hosts' own, byte for byte."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import fleet
from stock import STOCK, file_on, shape_stock, units_on, unshape_stock


@pytest.fixture
def stock(lab: Any) -> Iterator[Any]:
    shape_stock(lab)
    yield lab
    unshape_stock(lab)


def checks_and_plans_nothing(lab: Any, target: Path) -> None:
    """The adopted fleet in `target` passes `fleet check` and its plan is complete and empty."""
    check = fleet(lab, "check", "--json", directory=target)
    assert check.returncode == 0 and json.loads(check.stdout)["errors"] == 0, check.stdout + check.stderr
    plan = fleet(lab, "plan", "--json", directory=target)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    document = json.loads(plan.stdout)
    assert document["complete"] is True and document["changes"] == [], document["changes"]


def test_adopting_the_stock_lab_writes_a_fleet_whose_plan_is_empty(stock: Any, tmp_path: Path) -> None:
    target = tmp_path / "adopted"
    done = fleet(stock, "adopt", str(target), directory=STOCK)  # STOCK's hosts/ is the inventory
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 service(s), 4 unit file(s)" in done.stdout, done.stdout
    for host in ("fritz", "freud"):
        for unit in units_on(host):
            assert (target / "units" / unit).read_bytes() == file_on(stock, host, f"/etc/systemd/system/{unit}")
    checks_and_plans_nothing(stock, target)


def test_adopt_refuses_a_non_empty_target_and_leaves_it_as_it_was(stock: Any, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "desired_state.toml").write_text("# mine\n")
    done = fleet(stock, "adopt", str(target), directory=STOCK)
    assert done.returncode == 1 and "not empty" in done.stderr, done.stdout + done.stderr
    assert [p.name for p in target.iterdir()] == ["desired_state.toml"]
    assert (target / "desired_state.toml").read_text() == "# mine\n"


def test_an_adopted_drop_in_is_declared_and_a_changed_one_is_written_byte_for_byte(stock: Any, tmp_path: Path) -> None:
    """A stock unit tuned with a drop-in: adopt declares it (the plan stays empty); the operator
    changes the file in the adopted directory, and apply writes exactly it and restarts the unit."""
    web, host = "mastodon-web.service", "fritz"
    path = f"/etc/systemd/system/{web}.d/10-limits.conf"
    stock.ssh(host, f"mkdir -p /etc/systemd/system/{web}.d && cat > {path} && systemctl daemon-reload",
              user="root", input="[Service]\nLimitNOFILE=65536\n")
    target = tmp_path / "adopted"
    done = fleet(stock, "adopt", str(target), directory=STOCK)
    assert done.returncode == 0, done.stdout + done.stderr
    declared = target / "units" / f"{web}.d" / "10-limits.conf"
    assert declared.read_bytes() == file_on(stock, host, path)
    assert '"10-limits.conf" = "units/mastodon-web.service.d/10-limits.conf"' in (
        target / "desired_state.toml").read_text()
    plan = fleet(stock, "plan", "--json", directory=target)
    assert plan.returncode == 0 and json.loads(plan.stdout)["changes"] == [], plan.stdout + plan.stderr
    declared.write_bytes(b"# raised for the scaling guide\n[Service]\nLimitNOFILE=131072\n")
    applied = fleet(stock, "apply", "--yes", "--settle", "1", directory=target, timeout=300)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert file_on(stock, host, path) == declared.read_bytes()
    limit = stock.ssh(host, f"systemctl show -p LimitNOFILE --value {web}", user="root").stdout.strip()
    assert limit == "131072"  # reloaded and restarted: the running unit has it
    again = fleet(stock, "plan", "--json", directory=target)
    assert again.returncode == 0 and json.loads(again.stdout)["changes"] == [], again.stdout + again.stderr


# Last in the module: it leaves the example converged, which the next module
# (test_audit_on_lab) starts from when fleet's plan says so, instead of converging it again from bare.
def test_adopting_the_converged_example_declares_its_env_files_and_data_stores_and_plans_nothing(
        lab: Any, tmp_path: Path) -> None:
    """README's "Bring an existing fleet under fleet": the example, converged, adopted from its inventory."""
    converge = fleet(lab, "apply", "--yes", "--settle", "1", timeout=300)
    assert converge.returncode == 0, converge.stdout + converge.stderr
    target = tmp_path / "adopted"
    done = fleet(lab, "adopt", str(target))
    assert done.returncode == 0, done.stdout + done.stderr
    text = (target / "desired_state.toml").read_text()
    assert "[env_files.production]" in text and 'SECRET_KEY_BASE = "present"' in text, text
    assert 'unit = "postgresql.service"' in text and 'kind = "postgres"' in text, text
    secrets = (lab.state_dir / "lab" / "secrets.toml")
    if secrets.exists():  # no value of the lab's secrets is written anywhere in the adopted fleet
        for line in secrets.read_text().splitlines():
            value = line.partition("=")[2].strip().strip('"')
            if len(value) >= 8:
                assert all(value not in p.read_text() for p in target.rglob("*") if p.is_file())
    checks_and_plans_nothing(lab, target)
