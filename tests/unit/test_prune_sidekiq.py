"""A prune (or a rollback) that stops a unit running Sidekiq waits until its process has left Sidekiq's `processes`
(issue 16): the plan records the env file Redis is found through, the plan file keeps and checks
it, and the executor reads the MainPID before the stop and waits for that process to go."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from observed import ENV_PATH, EXAMPLE_SECRETS, converged, example, hand_made_unit, undeclared_sidekiq, with_unit
from redis_server import Redis

from fleet.actions import Action, Change, PrunePayload
from fleet.diff import diff
from fleet.errors import FleetError
from fleet.model import Host, UnitState
from fleet.plan import build_plan, plan_from_json
from fleet.resources.undeclared import UndeclaredUnits, prune_sidekiq
from fleet.sidekiq import gone_timeout

SK = "mastodon-sidekiq.service"


def pruned_on_franz(unit: UnitState) -> Change:
    fleet: dict[str, Any] = dict(converged(example(), EXAMPLE_SECRETS))
    fleet["franz"] = with_unit(fleet["franz"], unit)
    [c] = [c for c in diff(example(), fleet, EXAMPLE_SECRETS).changes if c.action == Action.PRUNE]
    return c


# ------------------------------------------------------------------ the plan


def test_the_prune_of_a_running_sidekiq_unit_carries_the_env_file_sidekiqs_view_reads() -> None:
    c = pruned_on_franz(undeclared_sidekiq())  # the postmortem's unit: it loads no env file
    assert isinstance(c.payload, PrunePayload) and c.payload.sidekiq_env == ENV_PATH
    assert c.fields()["meta"] == {"sidekiq_env": ENV_PATH}


def test_a_sidekiq_unit_loading_its_own_env_file_is_waited_on_through_that_one() -> None:
    own = dataclasses.replace(undeclared_sidekiq(), environment_files=("/etc/mastodon/sidekiq.env",))
    assert pruned_on_franz(own).payload == PrunePayload(("stop", "disable", "remove"), (f"/etc/systemd/system/{SK}",),
                                                        "/etc/mastodon/sidekiq.env")
    both = dataclasses.replace(own, environment_files=("/etc/mastodon/sidekiq.env", ENV_PATH))
    assert pruned_on_franz(both).payload.sidekiq_env == ENV_PATH  # type: ignore[union-attr]
    # a path a host reports that a plan could not carry is not taken
    climbing = dataclasses.replace(own, environment_files=("/etc/../etc/shadow",))
    assert pruned_on_franz(climbing).payload.sidekiq_env == ENV_PATH  # type: ignore[union-attr]


def test_a_prune_of_a_unit_not_running_sidekiq_or_not_running_at_all_waits_for_nothing() -> None:
    node = pruned_on_franz(hand_made_unit("mastodon-extra.service", "/usr/bin/node streaming.js"))
    assert node.payload == PrunePayload(("stop", "disable", "remove"), ("/etc/systemd/system/mastodon-extra.service",))
    assert "meta" not in node.fields() or node.fields()["meta"] == {}
    idle = pruned_on_franz(undeclared_sidekiq(active=False))
    assert isinstance(idle.payload, PrunePayload) and "stop" not in idle.payload.steps
    assert idle.payload.sidekiq_env == ""


def test_the_env_file_survives_the_plan_file_and_shows_in_the_plan_text() -> None:
    fleet: dict[str, Any] = dict(converged(example(), EXAMPLE_SECRETS))
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    plan = build_plan(example(), fleet, EXAMPLE_SECRETS)
    loaded = plan_from_json(plan.to_json())
    assert loaded.change(f"franz:prune:{SK}").payload == plan.change(f"franz:prune:{SK}").payload
    assert loaded.change(f"franz:prune:{SK}").payload.sidekiq_env == ENV_PATH  # type: ignore[union-attr]
    details = [t for _, t in UndeclaredUnits().details(plan.change(f"franz:prune:{SK}"))]
    assert details[-1] == f"then waits until its Sidekiq process has left `processes` (Redis as {ENV_PATH} says)"


# ------------------------------------------------------------------ the executor


class _Step:
    """What UndeclaredUnits.execute needs of an execution: a run id and one canned output."""

    def __init__(self, out: str) -> None:
        self.host, self.desired, self.out, self.run_id = Host(name="franz", address="franz"), example(), out, "r1"
        self.commands: list[str] = []

    def run(self, command: str, *, stdin: bytes | None = None, timeout: float = 120) -> str:
        self.commands.append(command)
        return self.out


def _pruned(out: str, env: str = ENV_PATH) -> tuple[str, _Step]:
    change = Change("franz", Action.PRUNE, SK, "", None,
                    payload=PrunePayload(("stop", "disable", "remove"), (f"/etc/systemd/system/{SK}",), env))
    step = _Step(out)
    try:
        UndeclaredUnits().execute(change, step)  # type: ignore[arg-type]
    except FleetError as e:
        return e.message, step
    return "", step


def test_the_prune_command_reads_the_main_pid_before_the_stop_and_waits_for_that_process_after_it() -> None:
    env = "/home/mastodon/live/.env production"  # a path with a space: quoted, never split
    _, step = _pruned("@@ok\n@@sidekiq-gone ok\n", env)
    [command] = step.commands
    capture = f"p0=$(systemctl show -p MainPID --value -- {SK})"
    assert command.index(capture) < command.index(f"systemctl stop -- {SK}") < command.index("@@sidekiq-gone")
    assert f"f={shlex.quote(env)}" in command and "sk_p=\"$p0\"" in command and "REDISCLI_AUTH" in command
    _, plain = _pruned("@@ok\n", "")
    assert "@@sidekiq-gone" not in plain.commands[0] and "MainPID" not in plain.commands[0]


def test_a_process_still_heartbeating_after_the_bound_fails_the_prune_naming_it() -> None:
    why, _ = _pruned("@@ok\n@@sidekiq-gone timeout franz:3131:0123456789ab\n")
    assert why == (f"the Sidekiq process franz:3131:0123456789ab of {SK} still heartbeats in Redis 60 s after the "
                   "unit was stopped")
    assert _pruned("@@ok\n@@sidekiq-gone ok\n")[0] == ""
    assert _pruned("@@ok\n@@sidekiq-gone skipped (no redis-cli on the host)\n")[0] == ""  # says why, holds nothing up
    assert gone_timeout("| @@sidekiq-gone timeout x\n@@sidekiq-gone ok\n") is None  # the line itself, not a quote


def _run_here(redis: Redis, tmp_path: Path, pid: str, env_text: str | None = None) -> str:
    """prune_sidekiq (a stop only) run here with a stand-in systemctl: `show` prints the MainPID
    until `stop` sets it to 0, and every call is logged."""
    (tmp_path / "pid").write_text(pid)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n'
                    f'case $1 in show) cat {tmp_path}/pid;; stop) echo 0 > {tmp_path}/pid;; esac\n')
    fake.chmod(0o755)
    env = tmp_path / ".env.production"
    env.write_text(redis.env() if env_text is None else env_text)
    script = prune_sidekiq(SK, PrunePayload(("stop",), (), str(env)), run_id="r1", timeout=1)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "LC_ALL": "C"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_prune_command_waits_on_the_process_that_ran_before_the_stop(redis: Redis, tmp_path: Path) -> None:
    redis.flush()
    me = Path("/proc/sys/kernel/hostname").read_text().strip()
    old = f"{me}:4242:0123456789ab"
    redis.cli("SADD", "processes", old)
    redis.cli("HSET", old, "beat", str(time.time()), "info", "{}")
    out = _run_here(redis, tmp_path, "4242")
    assert out.splitlines() == ["@@ok", f"@@sidekiq-gone timeout {old}"]  # the pid read before the stop
    assert gone_timeout(out) == old
    assert (tmp_path / "calls").read_text().splitlines() == [f"show -p MainPID --value -- {SK}", f"stop -- {SK}"]
    redis.cli("SREM", "processes", old)  # what Sidekiq does on a clean stop
    assert _run_here(redis, tmp_path, "4242").splitlines() == ["@@ok", "@@sidekiq-gone ok"]


def test_the_prune_command_says_why_it_could_not_wait_and_still_ends_ok(redis: Redis, tmp_path: Path) -> None:
    wrong = redis.env().replace("REDIS_PASSWORD=", "REDIS_PASSWORD=x")  # a password Redis refuses
    out = _run_here(redis, tmp_path, "4242", wrong)
    assert out.splitlines() == ["@@ok", "@@sidekiq-gone skipped (Redis did not answer)"]


@pytest.mark.parametrize("env", ["etc/mastodon.env", "/home/../etc/shadow", "/x\n/y", "/a/./b", "/dir/"])
def test_a_plan_file_whose_prune_names_a_hostile_env_file_is_refused(env: str) -> None:
    change = Change("franz", Action.PRUNE, SK, "", None, payload=PrunePayload(("stop",), (), env))
    assert "sidekiq_env" in (UndeclaredUnits().problem(change) or "")


def test_a_plan_file_whose_prune_meta_holds_anything_else_is_malformed() -> None:
    from fleet.resources.base import PayloadError

    fields: dict[str, Any] = {"steps": ["stop"], "remove_files": [], "meta": {"sidekiq_env": ENV_PATH, "x": "y"}}
    with pytest.raises(PayloadError):
        UndeclaredUnits().load(Action.PRUNE, fields)
    with pytest.raises(PayloadError):
        UndeclaredUnits().load(Action.PRUNE, {**fields, "meta": {"sidekiq_env": ["/a"]}})
    assert UndeclaredUnits().load(Action.PRUNE, {**fields, "meta": {}}) == PrunePayload(("stop",), ())


# ------------------------------------------------------------------ a rollback's stop has the same wait


class _RollbackStep(_Step):
    """What UnitStates.rollback needs: the declaration, the files written (none), the start timeout."""

    def __init__(self, out: str) -> None:
        super().__init__(out)
        self.host, self.start_timeout, self.command_grace = Host(name="freud", address="freud"), 30.0, 30.0
        self.unchecked: list[str] = []

    def written(self) -> list[str]:
        return []

    def service(self, name: str | None) -> Any:
        return self.desired.service(name or "")

    def run_unchecked(self, command: str, *, timeout: float) -> None:
        self.unchecked.append(command)


def _rolled_back(unit: str, out: str) -> tuple[str, _RollbackStep]:
    from fleet.resources.unit_state import UnitStates

    name = next(s.name for s in example().services if s.unit == unit)
    step = _RollbackStep(out)
    change = Change("freud", Action.START, unit, "", name, before="inactive/dead")
    return UnitStates().rollback(change, step), step  # type: ignore[arg-type]


def test_a_rollback_stopping_a_sidekiq_unit_waits_for_its_process_and_says_if_it_outlived_the_stop() -> None:
    unit = "mastodon-sidekiq-default.service"
    said, step = _rolled_back(unit, "@@ok\n@@sidekiq-gone ok\n")
    assert said == f"rolled back {unit} on freud: restored nothing written; stopped it (it was not running before)"
    [command] = step.commands
    assert command.index(f"p0=$(systemctl show -p MainPID --value -- {unit})") < command.index(
        f"systemctl stop -- {unit}") < command.index("@@sidekiq-gone")
    assert f"f={shlex.quote(ENV_PATH)}" in command and step.unchecked == []
    said, _ = _rolled_back(unit, "@@ok\n@@sidekiq-gone timeout freud:77:0123456789ab\n")
    assert said.endswith("stopped it (it was not running before); its Sidekiq process freud:77:0123456789ab still "
                         "heartbeats in Redis 60 s after the stop: find it (ps) and stop it")
    said, step = _rolled_back("mastodon-web.service", "")  # not Sidekiq: stopped as before, nothing waited on
    assert step.commands == [] and "@@sidekiq-gone" not in step.unchecked[0]
