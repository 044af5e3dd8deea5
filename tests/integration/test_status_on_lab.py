"""`fleet --lab status` against real hosts: what runs where, really."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, fleet, fleet_json, install_unit, reset_all, sidekiq_unit, sshd_stopped

from fleet import config
from fleet.units import render_unit


def web_unit() -> str:
    """Exactly the unit fleet would write for web: its cell must then be "ok"."""
    desired = config.load(REPO / "desired_state.toml", REPO / "hosts").desired
    assert desired is not None
    web = desired.service("web")
    assert web is not None
    return render_unit(web)


@pytest.fixture(scope="module")
def drifted(lab: Any) -> Iterator[Any]:
    """The postmortem's fleet, made by hand: web running on fritz as declared, the declared
    Sidekiq on freud installed but stopped, and an undeclared Sidekiq running only
    `-q default` on franz, the CDN node.  Made once for the module: its tests only read it."""
    reset_all(lab)
    lab.ssh("fritz", "install -o mastodon -g mastodon -m 600 /dev/null /home/mastodon/live/.env.production",
            user="root")
    install_unit(lab, "fritz", "mastodon-web.service", web_unit())
    install_unit(lab, "freud", "mastodon-sidekiq-default.service",
                 sidekiq_unit("-c 25 -q default,8 -q ingress,6 -q mailers,2"), start=False)
    install_unit(lab, "franz", "mastodon-sidekiq.service", sidekiq_unit("-c 10 -q default"))
    yield lab
    reset_all(lab)


def row(report: dict[str, Any], unit: str) -> dict[str, Any]:
    return next(r for r in report["services"] if r["unit"] == unit)


def test_status_shows_each_hand_made_unit_in_its_cell(drifted: Any) -> None:
    report = fleet_json(drifted, "status")
    assert all(h["reachable"] for h in report["hosts"].values())
    web = row(report, "mastodon-web.service")
    assert web["cells"]["fritz"]["status"] == "ok"
    assert web["cells"]["fritz"]["state"] == "active/running"
    assert web["cells"]["franz"]["status"] == "drift" and web["cells"]["franz"]["state"] == "missing"
    assert web["cells"]["freud"]["status"] == "absent"
    sk = row(report, "mastodon-sidekiq-default.service")
    assert sk["cells"]["freud"]["status"] == "drift"
    assert sk["cells"]["freud"]["state"] == "inactive/dead"
    assert sk["cells"]["freud"]["unit"]["unit_file_state"] == "enabled"


def test_status_flags_the_undeclared_sidekiq_on_the_cdn_host_as_unmanaged(drifted: Any) -> None:
    report = fleet_json(drifted, "status")
    rogue = row(report, "mastodon-sidekiq.service")
    assert rogue["service"] is None
    assert rogue["cells"]["franz"]["status"] == "unmanaged"
    assert rogue["cells"]["franz"]["unit"]["exec_start"][-4:] == ["-c", "10", "-q", "default"]
    assert rogue["cells"]["fritz"]["status"] == "absent"
    procs = report["sidekiq"]["processes"]
    franz = [p for p in procs if p["host"] == "franz"]
    assert franz == [{"host": "franz", "unit": "mastodon-sidekiq.service", "concurrency": 10, "db_pool": 25,
                      "declared": False, "queues": [{"name": "default", "weight": None}], "queues_from": "-q",
                      "problem": ""}]


def test_status_flags_queues_nobody_serves(drifted: Any) -> None:
    report = fleet_json(drifted, "status")
    queues = report["sidekiq"]["queues"]
    assert queues["default"] == ["franz:mastodon-sidekiq.service"]
    assert queues["push"] == [] and queues["scheduler"] == []
    codes = [(f["code"], f["message"]) for f in report["sidekiq"]["findings"]]
    unserved = {re.search(r"queue '(\w+)'", m).group(1) for c, m in codes if c == "sidekiq.queue-unserved"}  # type: ignore[union-attr]
    assert unserved == {"push", "ingress", "mailers", "pull", "scheduler", "fasp"}
    assert any(c == "sidekiq.scheduler-count" for c, _ in codes)


def table_cells(text: str) -> dict[tuple[str, str], str]:
    """(unit, host) -> what the status table prints in that cell, its lines joined by " / "."""
    lines = text.split("\nlegend:")[0].splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [header[a:b].strip() for a, b in spans]
    cells: dict[tuple[str, str], str] = {}
    unit = ""
    for line in rows:
        values = [line[a:b].strip() for a, b in spans]  # tabulate pads each cell to its rule
        unit = values[1] or unit  # a drift reason continues its cell on the next line
        for host, value in zip(names[2:], values[2:], strict=True):
            if value:
                cells[(unit, host)] = f"{cells[(unit, host)]} / {value}" if (unit, host) in cells else value
    return cells


def test_status_text_marks_drift_and_unmanaged_cells(drifted: Any) -> None:
    done = fleet(drifted, "status")
    assert done.returncode == 0, done.stderr
    cells = table_cells(done.stdout)
    assert cells[("mastodon-sidekiq-default.service", "freud")] == (
        "inactive/dead (!) / should be active/running, unit file differs")  # installed by hand, stopped
    assert cells[("mastodon-web.service", "franz")] == "missing (!) / not installed"
    assert cells[("mastodon-web.service", "fritz")] == "active/running"
    assert cells[("mastodon-sidekiq.service", "franz")] == "active/running (unmanaged)"
    assert "NOBODY (!)" in done.stdout
    assert "franz:mastodon-sidekiq.service" in done.stdout


def test_a_host_with_sshd_stopped_shows_as_unreachable_while_the_others_report(lab: Any) -> None:
    with sshd_stopped(lab, "nietzsche"):
        done = fleet(lab, "status", "--json")
        assert done.returncode == 1, done.stderr
        report = json.loads(done.stdout)
        assert report["hosts"]["nietzsche"]["reachable"] is False
        assert report["hosts"]["nietzsche"]["error"]["kind"] == "unreachable"
        assert all(report["hosts"][h]["reachable"] for h in ("fritz", "franz", "freud"))
        cell = row(report, "postgresql.service")["cells"]["nietzsche"]
        assert cell["status"] == "unknown"


def test_a_wrong_host_key_is_refused_for_that_host_only(lab: Any, tmp_path: Path) -> None:
    state = tmp_path / ".fleet"
    shutil.copytree(lab.state_dir, state)
    labdir = state / "lab"
    # Swap fritz's key for another host's: same type, wrong identity.
    lines = (labdir / "known_hosts").read_text().splitlines()
    keys = {ln.split()[0].split(",")[0]: ln for ln in lines if ln.strip()}
    other = keys["franz"].split(" ", 1)[1]
    keys["fritz"] = keys["fritz"].split(" ", 1)[0] + " " + other
    (labdir / "known_hosts").write_text("\n".join(keys.values()) + "\n")
    config = (labdir / "ssh_config").read_text().replace(str(lab.lab_dir), str(labdir))
    (labdir / "ssh_config").write_text(config)
    record = json.loads((labdir / "lab.json").read_text())
    record["ssh_config"] = str(labdir / "ssh_config")
    record["known_hosts"] = str(labdir / "known_hosts")
    (labdir / "lab.json").write_text(json.dumps(record))

    done = fleet(lab, "status", "--json", state_dir=state)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    err = report["hosts"]["fritz"]["error"]
    assert err["kind"] == "hostkey"
    assert "SHA256:" in err["message"] and "fritz" in err["message"]
    assert all(report["hosts"][h]["reachable"] for h in ("franz", "freud", "nietzsche"))


def test_limit_restricts_collection_to_matching_hosts(lab: Any) -> None:
    report = fleet_json(lab, "status", "--limit", "fri*,nietzsche")
    assert sorted(report["hosts"]) == ["fritz", "nietzsche"]


def test_the_lab_is_bare_at_first_so_every_declared_service_is_missing(lab: Any) -> None:
    reset_all(lab)
    report = fleet_json(lab, "status")
    for r in report["services"]:
        if r["service"] is None:
            continue
        for host in r["declared_hosts"]:
            assert r["cells"][host]["status"] == "drift", (r["unit"], host)
