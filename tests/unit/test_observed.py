"""`--observed FILE|SNAPSHOT`: plan, status and audit from a kept observation, no host contacted.

The observation is what `fleet status --json` carries (and the journal keeps as a snapshot):
planned from it, a fleet gets the very changes a live observation would give; read back, it is
data from disk, refused in one line naming the file and the key; a plan made from it is marked
and `fleet apply` refuses it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import fleet_executable
from hypothesis import HealthCheck, given, settings
from observed import EXAMPLE_SECRETS, bare, converged, edited, fleets, set_env_secret
from observed import example as example_desired

from fleet.errors import FleetError
from fleet.journal import Journal, journal_path
from fleet.model import HostResult
from fleet.output.json import status_json
from fleet.plan import build_plan
from fleet.snapshot import from_record, pack, to_record
from fleet.status import build_status

FleetDir = Any  # conftest.FleetDir
SEVERAL = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WEB = "mastodon-web.service"


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)  # a JSON string is a TOML basic string for these values


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.toml"
    path.write_text("[mastodon]\n" + "".join(f"{k} = {toml_str(v)}\n" for (_, k), v in EXAMPLE_SECRETS.items()))
    path.chmod(0o600)
    return path


def status_file(path: Path, results: dict[str, HostResult]) -> Path:
    """What `fleet status --json > FILE` writes for these results."""
    path.write_text(json.dumps(status_json(build_status(example_desired(), results))))
    return path


def fleet(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([fleet_executable(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False, env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin"})


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    first, *rest = err.rstrip("\n").split("\n")
    assert first.startswith("fleet: error: "), err
    assert all(line.startswith("  hint: ") for line in rest), err
    return first


def comparable(results: dict[str, HostResult]) -> dict[str, Any]:
    try:
        plan = build_plan(example_desired(), results, EXAMPLE_SECRETS)
    except FleetError as e:  # a refused move: refused alike
        return {"refused": str(e)}
    return {"changes": [c.as_dict() for c in plan.changes], "deps": plan.deps, "waves": plan.waves,
            "unknown": plan.unknown, "notes": plan.notes, "problems": plan.problems}


# ---------------------------------------------------------------- the observation carries the diff


@SEVERAL
@given(fleets(example_desired(), EXAMPLE_SECRETS, unreachable_hosts=True))
def test_a_plan_from_the_kept_observation_is_the_plan_from_the_live_one(results: dict[str, HostResult]) -> None:
    kept = from_record(json.loads(json.dumps(to_record(results))), "obs.json")
    assert comparable(kept) == comparable(results)


def test_each_distinct_unit_text_is_kept_once() -> None:
    record = to_record(converged(example_desired(), EXAMPLE_SECRETS))
    assert len(record["texts"]) == len(set(record["texts"]))
    refs = [u["text"] for h in record["hosts"].values() for u in h["units"] if u["text"] is not None]
    assert len(refs) > len(record["texts"])  # hosts share their services' texts


def test_a_snapshot_keeps_no_secret_beyond_its_first_8_hex_digits() -> None:
    host = "fritz"
    results = converged(example_desired(), EXAMPLE_SECRETS)
    results[host] = set_env_secret(results[host], "DB_PASS", "changed-on-the-host")
    record = to_record(results)
    for h in record["hosts"].values():
        for e in h["env_files"]:
            assert all(fp.startswith("sha256:") and len(fp) == 15 for _, fp in e["secrets"])


# ---------------------------------------------------------------- the CLI, offline


def test_plan_observed_from_a_status_file_of_a_converged_fleet_is_empty(
        example: FleetDir, secrets: Path, tmp_path: Path) -> None:
    obs = status_file(tmp_path / "status.json", converged(example_desired(), EXAMPLE_SECRETS))
    run = fleet("--dir", example.root, "plan", "--secrets", secrets, "--observed", obs)
    assert run.returncode == 0, run.stderr
    assert "Planned from a kept observation" in run.stdout and str(obs) in run.stdout
    assert not (example.root / ".fleet").exists()  # no journal written: nothing was observed


def test_a_plan_observed_is_marked_and_apply_refuses_it(example: FleetDir, secrets: Path, tmp_path: Path) -> None:
    results = bare(example_desired())
    results["fritz"] = edited(converged(example_desired(), EXAMPLE_SECRETS)["fritz"], WEB)
    obs = status_file(tmp_path / "status.json", results)
    saved = tmp_path / "plan.json"
    run = fleet("--dir", example.root, "plan", "--secrets", secrets, "--observed", obs, "-o", saved)
    assert run.returncode == 2, run.stderr
    assert "-Nice=5" in run.stdout  # the unit diff shows the host's text, kept in the observation
    assert json.loads(saved.read_text())["observed"].startswith(str(obs))
    shown = fleet("--dir", example.root, "show", saved)
    assert shown.returncode == 2 and "Planned from a kept observation" in shown.stdout
    applied = fleet("--dir", example.root, "apply", saved, "--yes", "--secrets", secrets)
    assert applied.returncode == 1
    assert "stale by construction" in one_line_error(applied.stderr) and str(saved) in applied.stderr


def test_a_target_host_the_observation_lacks_is_not_observed(example: FleetDir, secrets: Path, tmp_path: Path) -> None:
    results = converged(example_desired(), EXAMPLE_SECRETS)
    del results["fritz"]
    obs = status_file(tmp_path / "status.json", results)
    run = fleet("--dir", example.root, "plan", "--secrets", secrets, "--observed", obs)
    assert run.returncode == 2, run.stderr
    assert "fritz: UNKNOWN" in run.stdout and "not-observed" in run.stdout


def test_status_and_audit_read_the_observation(example: FleetDir, tmp_path: Path) -> None:
    results = converged(example_desired(), EXAMPLE_SECRETS)
    results["fritz"] = edited(results["fritz"], WEB)
    obs = status_file(tmp_path / "status.json", results)
    status = fleet("--dir", example.root, "status", "--observed", obs)
    assert status.returncode == 0, status.stderr
    assert "active/running (!)" in status.stdout and f"observed: {obs}" in status.stderr  # fritz: drift
    again = fleet("--dir", example.root, "status", "--observed", obs, "--json")
    assert json.loads(again.stdout)["observation"] == json.loads(obs.read_text())["observation"]
    audit = fleet("--dir", example.root, "audit", "--observed", obs, "--json")
    assert audit.returncode in (0, 2), audit.stderr
    assert json.loads(audit.stdout)["format"] == 1


def test_plan_observed_from_a_snapshot_id(example: FleetDir, secrets: Path) -> None:
    results = converged(example_desired(), EXAMPLE_SECRETS)
    results["fritz"] = edited(results["fritz"], WEB)
    state = example.root / ".fleet"
    state.mkdir()
    with Journal.open(journal_path(state)) as journal:
        snap = journal.save_snapshot(command="status", fleet=example_desired().name, lab=False,
                                     hosts={h: "ok" for h in results}, data=pack(results), operator="test")
    run = fleet("--dir", example.root, "plan", "--secrets", secrets, "--observed", snap)
    assert run.returncode == 2, run.stderr
    assert f"snapshot {snap}" in run.stdout and "-Nice=5" in run.stdout
    missing = fleet("--dir", example.root, "plan", "--secrets", secrets, "--observed", "no-such-snapshot")
    assert missing.returncode == 1 and "no-such-snapshot" in one_line_error(missing.stderr)


# ---------------------------------------------------------------- hostile observations


def _units(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["observation"]["hosts"]["fritz"]["units"]


def _envs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["observation"]["hosts"]["fritz"]["env_files"]


BAD = {
    "format": (lambda d: d["observation"].update(format=99), "format 99"),
    "hosts-a-list": (lambda d: d["observation"].update(hosts=[]), "hosts"),
    "main-pid-text": (lambda d: _units(d)[0].update(main_pid="12; rm -rf /"), "hosts.fritz.units[0].main_pid"),
    "units-missing": (lambda d: d["observation"]["hosts"]["fritz"].pop("units"), "hosts.fritz.units"),
    "text-ref-out-of-range": (lambda d: _units(d)[0].update(text=10_000), "hosts.fritz.units[0].text"),
    "secret-in-clear": (lambda d: _envs(d)[0]["secrets"].append(["DB_PASS", "hunter2"]),
                        "hosts.fritz.env_files[0].secrets"),
    "bad-host-name": (lambda d: d["observation"]["hosts"].update({"a;b": {}}), "hosts.a;b"),
    "load-not-numbers": (lambda d: d["observation"]["hosts"]["fritz"]["facts"].update(load=["x", 1, 2]),
                         "hosts.fritz.facts.load"),
    "too-many-units": (lambda d: _units(d).extend([_units(d)[0]] * 10_001), "hosts.fritz.units"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_observation_file_is_one_line_naming_the_file_and_the_key(
        example: FleetDir, secrets: Path, tmp_path: Path, case: str) -> None:
    obs = status_file(tmp_path / "status.json", converged(example_desired(), EXAMPLE_SECRETS))
    doc = json.loads(obs.read_text())
    damage, key = BAD[case]
    damage(doc)
    obs.write_text(json.dumps(doc))
    out = tmp_path / "plan.json"
    run = fleet("--dir", example.root, "plan", "--secrets", secrets, "--observed", obs, "-o", out)
    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert str(obs) in line and key in line, line
    assert "hunter2" not in run.stderr
    assert not out.exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b"null"],
                         ids=["syntax", "binary", "list", "null"])
def test_a_file_that_is_no_observation_is_one_line(example: FleetDir, tmp_path: Path, content: bytes) -> None:
    obs = tmp_path / "obs.json"
    obs.write_bytes(content)
    run = fleet("--dir", example.root, "status", "--observed", obs)
    assert run.returncode == 1
    assert str(obs) in one_line_error(run.stderr)


def test_an_offline_plan_and_show_run_without_the_cycle_collector_and_give_it_back(
        example: FleetDir, secrets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`plan --observed`, `show` and `status --observed` pause the cycle collector while they
    read, plan and print (a fifth of their CPU at 1,000 hosts), and turn it back on after."""
    import gc

    from fleet import cli
    from fleet import plan as planning

    seen: list[bool] = []
    real = planning.build_plan

    def build_plan(*a: Any, **k: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*a, **k)

    monkeypatch.setattr("fleet.workflows.plan.build_plan", build_plan)
    results = bare(example_desired())
    obs = status_file(tmp_path / "status.json", results)
    saved = tmp_path / "plan.json"
    assert gc.isenabled()
    code = cli.main(["--dir", str(example.root), "plan", "--secrets", str(secrets), "--observed", str(obs),
                     "-o", str(saved)])
    assert code == 2 and seen == [False] and gc.isenabled()
    shown: list[bool] = []
    real_show = planning.plan_from_json
    monkeypatch.setattr("fleet.workflows.plan.plan_from_json",
                        lambda *a: shown.append(gc.isenabled()) or real_show(*a))
    assert cli.main(["--dir", str(example.root), "show", str(saved)]) == 2
    assert shown == [False] and gc.isenabled()
    assert "Plan for" in capsys.readouterr().out


def test_what_an_offline_command_made_goes_to_the_oldest_generation_untraversed() -> None:
    """Back on after an offline command, the cycle collector does not traverse all it made as
    young objects at the next allocation: they are in its oldest generation, uncollected."""
    import gc

    from fleet import cli

    assert gc.isenabled()
    with cli._offline(True):
        made = [[i] for i in range(50_000)]
    runs: list[int] = []
    callback = lambda phase, info: runs.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.callbacks.append(callback)
    try:
        more = [[i] for i in range(1_000)]  # allocations that would start a collection of the young
    finally:
        gc.callbacks.remove(callback)
    assert gc.isenabled() and more
    assert runs == [] or max(runs) < 2
    assert any(o is made[0] for o in gc.get_objects(generation=2))
