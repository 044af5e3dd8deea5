"""The status bench's OpenSSH floor runs exactly what `fleet status` sends each host.

Until 3 December the floor built the collection script without the host history's section
(fleet.history.read_section), so "OpenSSH running fleet's own script" ran less than fleet did and
the status ratios against it were flattered.  Here the floor's wires are compared with what the
status workflow itself hands its transport (through the SSH transport's own wrapping), before and
after a status run has kept its observation in the journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FleetDir

from bench.status import _Quiet, floor_wires
from fleet.transport.fake import FakeTransport
from fleet.transport.ssh import _eof_safe
from fleet.workflows.base import Common, Scope
from fleet.workflows.observe import observe

LAB_HOSTS = {"franz": ("10.251.0.10", "deploy"), "freud": ("10.251.0.11", "deploy"),
             "fritz": ("10.251.0.12", "deploy"), "nietzsche": ("10.251.0.13", "root")}


def _lab_record(state: Path, runtime: Path) -> None:
    """A lab record as `fleet lab up` leaves it, for `--lab` targets (no host is contacted)."""
    lab = state / "lab"
    lab.mkdir(parents=True)
    record = {"hosts": [{"name": n, "address": a, "user": u} for n, (a, u) in LAB_HOSTS.items()],
              "booted": "2026-12-03T00:00:00Z", "image": "test", "runtime": str(runtime),
              "ssh_config": str(lab / "ssh_config"), "known_hosts": str(lab / "known_hosts"),
              "identity": str(lab / "id_ed25519"), "lab_id": "floor-under-test"}
    (lab / "lab.json").write_text(json.dumps(record))
    (lab / "known_hosts").write_text("")
    runtime.mkdir(parents=True)
    (runtime / "current").write_text("floor-under-test\n")


def _status_sends(root: Path, state: Path) -> dict[str, str]:
    """Host -> the text the SSH transport would send for `fleet --lab status` now."""
    from bench.status import _load

    desired, targets = _load(root, state)
    common = Common(desired=root / "desired_state.toml", hosts=root / "hosts", state_dir=state, lab=True)
    fake = FakeTransport()
    observe(common, Scope(), "status", desired, targets, fake, _Quiet())
    return {c.host: _eof_safe(c.command, c.stdin, c.sudo) for c in fake.calls}


def test_the_floor_sends_each_host_exactly_what_fleet_status_sends_history_included(
        example: FleetDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_LAB_RUNTIME", str(tmp_path / "runtime"))
    state = tmp_path / "state"
    _lab_record(state, tmp_path / "runtime")

    first = floor_wires(example.root, state)
    assert first == _status_sends(example.root, state)
    assert set(first) == set(LAB_HOSTS)
    for host, wire in first.items():
        assert "@@history" in wire, host
        assert wire.startswith("exec </dev/null\n")
        assert wire.split("\n", 1)[1].startswith("sudo -n -- sh -c ") == (LAB_HOSTS[host][1] != "root")

    # A second time: the journal now holds a snapshot (the hosts answered nothing fleet could
    # parse, so nothing idle is offered) and the floor still matches, asked afresh.
    assert floor_wires(example.root, state) == _status_sends(example.root, state)
