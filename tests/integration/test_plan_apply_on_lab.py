"""`fleet --lab plan` and `fleet --lab apply` against real hosts: convergence, drift repair,
health-gated halts with rollback, locks, stale plans, and the journal."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    REPO,
    STREAMING_HEALTH,
    WEB_HEALTH,
    fleet,
    fleet_argv,
    fleet_json,
    install_unit,
    reset_all,
    sidekiq_unit,
    sshd_stopped,
    with_health_timeout,
)

SETTLE = ("--settle", "1")
WEB_CHECK_TIMEOUT = 6  # seconds: more than one of the gate's 3-second probes
ENV = "/home/mastodon/live/.env.production"


def apply(lab: Any, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return fleet(lab, "apply", *SETTLE, *args, timeout=300, **kw)


def plan_json(lab: Any, *args: str, **kw: Any) -> dict[str, Any]:
    return fleet_json(lab, "plan", *args, ok_codes=(0, 2), **kw)


def ids(plan: dict[str, Any]) -> set[str]:
    return {c["id"] for c in plan["changes"]}


def assert_converged(lab: Any) -> None:
    """The lab is as fleet converges it: its plan is empty."""
    done = fleet(lab, "plan")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def bare(lab: Any) -> Iterator[Any]:
    reset_all(lab)
    yield lab


@pytest.fixture
def converged(lab: Any) -> Iterator[Any]:
    """The lab as fleet converges it.  A lab the previous test left converged (its plan is empty,
    no lock, no injected failure) is used as it is; anything else is reset to bare and applied."""
    for h in lab.names:
        lab.ssh(h, "rm -rf /home/mastodon/live/STANDIN_FAIL /var/lib/fleet/lock", user="root", check=False)
    if fleet(lab, "plan").returncode != 0:
        reset_all(lab)
        done = apply(lab, "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
    yield lab
    for h in lab.names:
        lab.ssh(h, "rm -rf /home/mastodon/live/STANDIN_FAIL /var/lib/fleet/lock", user="root", check=False)


def test_a_bare_lab_plans_to_install_everything_declared(bare: Any) -> None:
    done = fleet(bare, "plan", "--json")
    assert done.returncode == 2, done.stderr
    plan = json.loads(done.stdout)
    assert plan["complete"] is True
    got = ids(plan)
    for host, unit in [("fritz", "mastodon-web.service"), ("franz", "mastodon-web.service"),
                       ("fritz", "mastodon-streaming.service"), ("freud", "mastodon-sidekiq-default.service"),
                       ("freud", "mastodon-sidekiq-push-pull.service"),
                       ("nietzsche", "mastodon-sidekiq-push-pull.service"),
                       ("nietzsche", "mastodon-sidekiq-scheduler.service")]:
        assert {f"{host}:write-unit:{unit}", f"{host}:enable:{unit}", f"{host}:start:{unit}"} <= got
    for unit in ("postgresql.service", "redis-server.service"):  # observe-only: never written
        assert {f"nietzsche:enable:{unit}", f"nietzsche:start:{unit}"} <= got
        assert not any(c["action"] == "write-unit" and c["target"] == unit for c in plan["changes"])
    assert {f"{h}:write-env:{ENV}" for h in ("fritz", "franz", "freud", "nietzsche")} <= got
    # postgres and redis come first: every Mastodon start depends on them, transitively.
    waves = {cid: i for i, w in enumerate(plan["waves"]) for cid in w}
    assert waves["nietzsche:start:postgresql.service"] < waves["fritz:start:mastodon-web.service"]
    assert "(sensitive, sha256:" in done.stdout
    secrets = (bare.lab_dir / "secrets.toml").read_text()
    for line in secrets.splitlines():
        if "=" in line:
            assert line.split('"')[1] not in done.stdout  # the clear secret never reaches the plan


def test_a_saved_plan_prints_the_same_with_fleet_show(bare: Any, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = fleet(bare, "plan", "-o", str(out))
    assert done.returncode == 2
    shown = subprocess.run([*fleet_argv(), "show", str(out)], capture_output=True, text=True)
    assert shown.returncode == 2
    assert shown.stdout.splitlines()[-1] == done.stdout.splitlines()[-2]  # the summary line
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_apply_converges_a_bare_lab_and_a_second_plan_is_empty(bare: Any) -> None:
    done = apply(bare, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Apply complete" in done.stdout
    again = fleet(bare, "plan")
    assert again.returncode == 0, again.stdout
    assert "No changes" in again.stdout
    status = fleet_json(bare, "status")
    for row in status["services"]:
        for host in row["declared_hosts"]:
            assert row["cells"][host]["status"] == "ok", (row["unit"], host, row["cells"][host])
    assert status["sidekiq"]["findings"] == []
    env = bare.ssh("fritz", f"stat -c '%a %U %G' {ENV}", user="root").stdout.split()
    assert env == ["600", "mastodon", "mastodon"]
    assert bare.ssh("fritz", "curl -fsS http://127.0.0.1:3000/health", user="root").stdout.strip() == "OK"


def test_hand_made_drift_is_planned_exactly_and_repaired(converged: Any) -> None:
    lab = converged
    lab.ssh("freud", "systemctl stop mastodon-sidekiq-push-pull.service", user="root")
    lab.ssh("fritz", f"sed -i 's/^S3_ENABLED=.*/S3_ENABLED=FALSE/' {ENV}", user="root")
    install_unit(lab, "franz", "mastodon-sidekiq.service", sidekiq_unit("-c 10 -q default"))
    lab.ssh("nietzsche", "sed -i 's/-c 5 -q scheduler,1/-c 5 -q scheduler,1 -q default/' "
                         "/etc/systemd/system/mastodon-sidekiq-scheduler.service && systemctl daemon-reload",
            user="root")
    plan = plan_json(lab)
    assert ids(plan) == {
        "freud:start:mastodon-sidekiq-push-pull.service",
        f"fritz:write-env:{ENV}",
        "fritz:restart:mastodon-web.service",
        "fritz:restart:mastodon-streaming.service",
        "franz:prune:mastodon-sidekiq.service",
        "nietzsche:write-unit:mastodon-sidekiq-scheduler.service",
        "nietzsche:daemon-reload:systemd",
        "nietzsche:restart:mastodon-sidekiq-scheduler.service",
    }
    env = next(c for c in plan["changes"] if c["action"] == "write-env")
    assert env["keys"] == [["S3_ENABLED", "change", "FALSE", "true"]]
    prune = next(c for c in plan["changes"] if c["action"] == "prune")
    assert prune["steps"] == ["stop", "disable", "remove"] and "-q default" in prune["before"]
    text = fleet(lab, "plan").stdout
    assert "~ S3_ENABLED: FALSE → true" in text and "-q default" in text

    done = apply(lab, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert fleet(lab, "plan").returncode == 0
    assert lab.ssh("franz", "test -e /etc/systemd/system/mastodon-sidekiq.service", user="root",
                   check=False).returncode == 1
    log = fleet(lab, "log", "--host", "franz").stdout
    assert "on franz, stopped and disabled mastodon-sidekiq.service" in log and "-c 10 -q default" in log


def test_a_failing_health_check_halts_the_rollout_and_rolls_back(converged: Any) -> None:
    lab = converged
    # web on fritz will exit a second after every start: its health gate must fail.
    lab.ssh("fritz", "echo exit > /home/mastodon/live/STANDIN_FAIL && systemctl stop mastodon-web.service",
            user="root")
    install_unit(lab, "franz", "mastodon-sidekiq.service", sidekiq_unit("-c 10 -q default"))
    # The stand-in dies ~1.2 s after its start: a 3 s settle period always sees it go (with a 1 s
    # one the gate could pass the settle and catch the death while awaiting the health check).
    done = apply(lab, "--yes", "--settle", "3")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "Apply FAILED" in out
    assert re.search(r"on fritz, start mastodon-web\.service: unit (stopped|restarted) during the settle period",
                     out), out
    assert "rolled back mastodon-web.service on fritz" in out
    assert "last journal lines of the unit" in out
    assert "Not attempted:" in out and "on franz, prune mastodon-sidekiq.service" in out  # make-before-break
    assert lab.ssh("fritz", "systemctl is-active mastodon-web.service", user="root", check=False).stdout.strip() \
        in ("inactive", "failed")
    assert lab.ssh("franz", "systemctl is-active mastodon-sidekiq.service", user="root").stdout.strip() == "active"
    log = fleet(lab, "log", "--json").stdout
    steps = json.loads(log)["steps"]
    outcomes = {(s["host"], s["action"], s["target"]): s["outcome"] for s in steps}
    assert outcomes[("fritz", "start", "mastodon-web.service")] == "failed"
    assert outcomes[("franz", "prune", "mastodon-sidekiq.service")] == "skipped"
    # once the cause is gone, the same command converges
    lab.ssh("fritz", "rm -f /home/mastodon/live/STANDIN_FAIL", user="root")
    assert apply(lab, "--yes").returncode == 0
    assert fleet(lab, "plan").returncode == 0


def test_a_failed_restart_puts_the_previous_env_file_back(converged: Any, tmp_path: Path) -> None:
    lab = converged
    # The gates wait for web's and streaming's declared check timeouts while the stand-ins answer
    # 503: the repository's 30 s would be 30 s of waiting for the same facts (the failed gate, the
    # env file restored), so the copy declares shorter ones (as the hanging-check fault test does).
    work = with_health_timeout(tmp_path / "fleet", WEB_CHECK_TIMEOUT, WEB_HEALTH, STREAMING_HEALTH)
    desired = (work / "desired_state.toml").read_text()
    (work / "desired_state.toml").write_text(desired.replace('SMTP_PORT = "587"', 'SMTP_PORT = "2525"'))
    before = lab.ssh("fritz", f"sha256sum {ENV}", user="root").stdout.split()[0]
    lab.ssh("fritz", "echo unhealthy > /home/mastodon/live/STANDIN_FAIL", user="root")
    done = apply(lab, "--yes", directory=work)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"health check GET http://127.0.0.1:3000/health did not pass within {WEB_CHECK_TIMEOUT}s" in done.stdout
    assert f"restored {ENV}" in done.stdout
    after = lab.ssh("fritz", f"sha256sum {ENV}", user="root").stdout.split()[0]
    assert after == before
    assert lab.ssh("fritz", "systemctl is-active mastodon-web.service", user="root").stdout.strip() == "active"
    # Undo what the test changed, no more (cheaper than a reset to bare and a converge): fritz's
    # stand-ins still answer 503 (they read STANDIN_FAIL when they start), so they are healed and
    # restarted; the other hosts took the copy's SMTP_PORT, so the repository's desired state is
    # applied.  An empty plan is the proof that the lab is converged again for the next test.
    lab.ssh("fritz", "rm -f /home/mastodon/live/STANDIN_FAIL && "
                     "systemctl restart mastodon-web.service mastodon-streaming.service", user="root")
    back = apply(lab, "--yes")
    assert back.returncode == 0, back.stdout + back.stderr
    assert_converged(lab)


def test_a_second_apply_while_one_runs_is_refused_by_the_lock(converged: Any) -> None:
    lab = converged
    lab.ssh("freud", "systemctl stop mastodon-sidekiq-default.service", user="root")
    first = subprocess.Popen([*fleet_argv(), "--lab", "--dir", str(REPO), "--state-dir", str(lab.state_dir),
                              "apply", "--yes", "--settle", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while lab.ssh("freud", "test -d /var/lib/fleet/lock", user="root", check=False).returncode != 0:
            assert time.monotonic() < deadline, "the first apply never took the lock"
            time.sleep(0.2)
        second = apply(lab, "--yes")
        assert second.returncode == 1
        assert "locked by another apply" in second.stderr and "freud" in second.stderr
        assert "run " in second.stderr  # the holder names its run
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    assert lab.ssh("freud", "test -d /var/lib/fleet/lock", user="root", check=False).returncode == 1


def test_a_stale_lock_is_reported_with_its_holder_and_can_be_broken(converged: Any) -> None:
    lab = converged
    holder = json.dumps({"run_id": "20260101T000000-dead00", "operator": "alice@laptop", "from": "laptop",
                         "since": "2026-01-01T00:00:00Z", "plan_id": "0123456789abcdef"})
    lab.ssh("fritz", f"mkdir -p /var/lib/fleet/lock && printf '%s\\n' '{holder}' > /var/lib/fleet/lock/holder",
            user="root")
    lab.ssh("fritz", "systemctl stop mastodon-streaming.service", user="root")
    refused = apply(lab, "--yes")
    assert refused.returncode == 1
    assert "alice@laptop from laptop since 2026-01-01T00:00:00Z" in refused.stderr
    status = fleet(lab, "lock", "status")
    assert "alice@laptop" in status.stdout and "fritz" in status.stdout
    broken = fleet(lab, "lock", "break", "--limit", "fritz", "--yes")
    assert broken.returncode == 0 and "broken" in broken.stdout
    assert apply(lab, "--yes").returncode == 0


def test_a_saved_plan_made_stale_by_a_hand_change_is_refused(converged: Any, tmp_path: Path) -> None:
    lab = converged
    lab.ssh("fritz", "systemctl stop mastodon-streaming.service", user="root")
    saved = tmp_path / "plan.json"
    assert fleet(lab, "plan", "-o", str(saved)).returncode == 2
    lab.ssh("freud", "systemctl stop mastodon-sidekiq-default.service", user="root")  # the hand change
    done = apply(lab, str(saved))
    assert done.returncode == 1
    assert "stale" in done.stderr and "freud" in done.stderr
    assert "newly needed: freud:start:mastodon-sidekiq-default.service" in done.stderr
    # a fresh plan, saved and applied exactly, is accepted
    assert fleet(lab, "plan", "-o", str(saved)).returncode == 2
    ok = apply(lab, str(saved))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_apply_without_a_terminal_and_without_yes_refuses(converged: Any) -> None:
    lab = converged
    lab.ssh("fritz", "systemctl stop mastodon-streaming.service", user="root")
    done = apply(lab)
    assert done.returncode == 1
    assert "no terminal" in done.stderr
    assert lab.ssh("fritz", "systemctl is-active mastodon-streaming.service", user="root",
                   check=False).stdout.strip() == "inactive"
    lab.ssh("fritz", "systemctl start mastodon-streaming.service", user="root")  # the test's change, undone
    assert_converged(lab)


def test_an_unreachable_host_makes_the_plan_incomplete_and_apply_refuses(converged: Any, tmp_path: Path) -> None:
    lab = converged
    with sshd_stopped(lab, "nietzsche"):
        saved = tmp_path / "plan.json"
        done = fleet(lab, "plan", "--json", "-o", str(saved))
        assert done.returncode == 2
        plan = json.loads(done.stdout)
        assert plan["complete"] is False
        assert [u["host"] for u in plan["unknown"]] == ["nietzsche"]
        assert not any(c["host"] == "nietzsche" for c in plan["changes"])
        refused = apply(lab, str(saved))
        assert refused.returncode == 1 and "incomplete" in refused.stderr
        refused = apply(lab, "--yes")  # fleet cannot even lock it: refused before anything is observed
        assert refused.returncode == 1
        assert "nietzsche: cannot take the lock (unreachable)" in refused.stderr and "--limit" in refused.stderr
