"""A saved plan cannot be edited into harm (issue 12).

`fleet apply PLAN` used to compare only change ids, `before` and content hashes with a plan
computed under the lock, then executed the file's own fields: a write-unit's `remove_files` set
to /etc/passwd ran `rm -f -- /etc/passwd` on the host.  Now the saved plan is applied only if
fleet, planning again under the lock from the same desired state and the fresh observation,
arrives at the same plan; the fresh plan is what runs.  And a loaded plan's names and paths
must pass the rules `fleet check` applies, so `fleet show` refuses a hostile file too.

These tests drive `fleet.cli.main` end to end with the SSH transport and the collection
replaced: the fake transport records every command and holds the lock like a host would.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import FleetDir
from observed import (
    EXAMPLE_SECRETS,
    converged,
    edited,
    env_meta,
    example,
    stopped,
    undeclared_sidekiq,
    with_unit,
)

from fleet import cli
from fleet.graph import EVERY_RUN
from fleet.model import Host, HostResult
from fleet.plan import Plan, PlanFileError, pack_document, plan_file_text, plan_from_json, unpack_document
from fleet.transport.protocol import RunResult
from fleet.workflows import apply as applying
from fleet.workflows import observe as observing
from fleet.workflows import plan as planning
from fleet.workflows.observe import Observation

WEB = "mastodon-web.service"
ENV = "/home/mastodon/live/.env.production"


def drifted() -> dict[str, HostResult]:
    """A write-unit (+ restart) on fritz, a start there, an undeclared Sidekiq to prune on franz
    and an env file with the wrong mode on freud: every kind of field a plan carries."""
    fleet: dict[str, HostResult] = dict(converged(example(), EXAMPLE_SECRETS))
    base = converged(example(), EXAMPLE_SECRETS)
    fleet["fritz"] = edited(stopped(base["fritz"], "mastodon-streaming.service"), WEB)
    fleet["franz"] = with_unit(base["franz"], undeclared_sidekiq())
    fleet["freud"] = env_meta(base["freud"], mode="0644")
    return fleet


@dataclass
class FakeHosts:
    """Every host as the transport and collector see it: `observed` is what collection returns
    (changeable between plan and apply); each command sent is recorded; locks behave."""

    observed: dict[str, HostResult] = field(default_factory=drifted)
    commands: list[tuple[str, str]] = field(default_factory=list)
    locked: set[str] = field(default_factory=set)

    def __enter__(self) -> FakeHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, host: Host, command: str, *, sudo: bool | None = None, stdin: bytes | None = None,
            timeout: float | None = None) -> RunResult:
        self.commands.append((host.name, command))
        if "&& echo @@locked" in command:
            self.locked.add(host.name)
            return RunResult(host.name, command, 0, b"@@locked\n", b"", 0.0)
        if command.startswith("u="):
            return RunResult(host.name, command, 0, b"@@gate ok\n", b"", 0.0)
        return RunResult(host.name, command, 0, b"@@ok\n", b"", 0.0)

    def changes_sent(self) -> list[tuple[str, str]]:
        """Commands other than taking, relabelling and releasing the lock."""
        return [(h, c) for h, c in self.commands if "/var/lib/fleet/lock" not in c]


@dataclass
class Rig:
    root: Path
    hosts: FakeHosts
    secrets: Path
    capsys: pytest.CaptureFixture[str]

    def fleet(self, *args: str | Path) -> tuple[int, str, str]:
        code = cli.main(["--dir", str(self.root), "--state-dir", str(self.root / ".fleet"), *map(str, args)])
        out, err = self.capsys.readouterr()
        return code, out, err

    def save_plan(self) -> Path:
        path = self.root / "plan.json"
        code, _, err = self.fleet("plan", "--secrets", self.secrets, "-o", path)
        assert code == 2, err
        return path

    def apply(self, path: Path) -> tuple[int, str, str]:
        return self.fleet("apply", str(path), "--secrets", self.secrets, "--settle", "0.01", "--start-timeout", "1")


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


@pytest.fixture
def rig(example: FleetDir, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    hosts = FakeHosts()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text("[mastodon]\n" + "".join(f"{k} = {toml_str(v)}\n" for (_, k), v in EXAMPLE_SECRETS.items()))
    secrets.chmod(0o600)

    def observe(common: Any, scope: Any, command: str, desired: Any, targets: Any, transport: Any,
                reporter: Any) -> Observation:
        return Observation({h.name: hosts.observed[h.name] for h in targets.hosts}, "")

    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: hosts)
    monkeypatch.setattr(observing, "observe", observe)
    yield Rig(example.root, hosts, secrets, capsys)


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the plan file as its document (every change an object), written back packed as fleet writes it."""
    doc = unpack_document(json.loads(path.read_text()), str(path))
    change(doc)
    path.write_text(plan_file_text(pack_document(doc)))


def one(doc: dict[str, Any], change_id: str) -> dict[str, Any]:
    return next(c for c in doc["changes"] if c["id"] == change_id)


# ------------------------------------------------------------------ the attack of the issue


def test_a_write_unit_edited_to_remove_etc_passwd_is_refused_and_nothing_runs(rig: Rig) -> None:
    path = rig.save_plan()
    edit(path, lambda d: one(d, f"fritz:write-unit:{WEB}").update(remove_files=["/etc/passwd"]))
    code, out, err = rig.apply(path)
    assert code == 1 and "Traceback" not in err
    assert "/etc/passwd" in err and f"fritz:write-unit:{WEB}" in err
    assert rig.hosts.commands == []  # refused on reading the file: no host was even contacted
    assert not any("/etc/passwd" in c for _, c in rig.hosts.commands)


@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/sudoers", "/root/.ssh/authorized_keys",
                                  "/etc/systemd/system/../../etc/shadow", f"/etc/systemd/system/{WEB}.d/../../x"])
def test_fleet_show_refuses_a_plan_whose_files_to_remove_are_not_the_units_own(
        rig: Rig, path: str) -> None:
    saved = rig.save_plan()
    edit(saved, lambda d: one(d, f"fritz:write-unit:{WEB}").update(remove_files=[path]))
    code, out, err = rig.fleet("show", saved)
    assert code == 1 and err.startswith("fleet: error:") and "remove" in err and out == ""


# ------------------------------------------------------------------ edits that pass the file checks


def _set(change_id: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: one(d, change_id).update(**fields)


PRUNE = "franz:prune:mastodon-sidekiq.service"
EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "remove-another-drop-in": (_set(f"fritz:write-unit:{WEB}",
                                    remove_files=[f"/etc/systemd/system/{WEB}.d/override.conf"]),
                               f"change fritz:write-unit:{WEB}: remove_files differs "
                               f"(plan: /etc/systemd/system/{WEB}.d/override.conf, now: none)"),
    "prune-fewer-steps": (_set(PRUNE, steps=["disable", "remove"]),
                          f"change {PRUNE}: steps differs (plan: disable, remove, now: stop, disable, remove)"),
    "prune-keeps-its-file": (_set(PRUNE, remove_files=[]), f"change {PRUNE}: remove_files differs"),
    "prune-waits-on-another-redis": (_set(PRUNE, meta={"sidekiq_env": "/etc/other.env"}),
                                     f"change {PRUNE}: meta differs (plan: sidekiq_env=/etc/other.env, "
                                     f"now: sidekiq_env={ENV})"),
    "prune-does-not-wait": (_set(PRUNE, meta={}), f"change {PRUNE}: meta differs (plan: none, now: sidekiq_env="),
    "env-mode": (lambda d: one(d, f"freud:write-env:{ENV}")["meta"].update(mode="0666"),
                 f"change freud:write-env:{ENV}: meta differs"),
    "env-owner": (lambda d: one(d, f"freud:write-env:{ENV}")["meta"].update(owner="root"),
                  f"change freud:write-env:{ENV}: meta differs"),
    "content-hash": (_set(f"fritz:write-unit:{WEB}", content_hash="0" * 64),
                     f"change fritz:write-unit:{WEB}: content_hash differs"),
    "service": (_set("fritz:start:mastodon-streaming.service", service="web"),
                "change fritz:start:mastodon-streaming.service: service differs (plan: web, now: streaming)"),
    "after": (_set("fritz:start:mastodon-streaming.service", after="stopped"),
              "change fritz:start:mastodon-streaming.service: after differs"),
    "reason-shown-to-the-reviewer": (_set(f"fritz:write-unit:{WEB}", reason="cosmetic"),
                                     f"change fritz:write-unit:{WEB}: reason differs"),
    "diff-shown-to-the-reviewer": (_set(f"fritz:write-unit:{WEB}", diff=""),
                                   f"change fritz:write-unit:{WEB}: diff differs"),
    "deps": (lambda d: one(d, f"fritz:restart:{WEB}").update(deps=[]), f"change fritz:restart:{WEB}: deps differ"),
    "prune-waits-for-nothing": (lambda d: one(d, PRUNE).update(deps=[]),
                                f"change {PRUNE}: deps differ (plan: none, now: {EVERY_RUN})"),
    "group-without-a-restart": (lambda d: d["groups"][EVERY_RUN].remove(f"fritz:restart:{WEB}"),
                                f"group {EVERY_RUN} differs (plan: freud:restart:mastodon-sidekiq-default.service, "
                                f"freud:restart:mastodon-sidekiq-push-pull.service, fritz:start:"),
    "waves-merged": (lambda d: d.update(waves=[[cid for w in d["waves"] for cid in w]]), "waves differ"),
    # a host left out: the desired state scoped to the plan's hosts is another one
    "a-host-left-out": (lambda d: (d.update(hosts=[h for h in d["hosts"] if h != "nietzsche"]),
                                   d["fingerprints"].pop("nietzsche")), "refusing a stale plan"),
    "notes": (lambda d: d.update(notes=["all is well"]), "notes differ"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edited_plan_is_refused_naming_the_first_difference_and_nothing_runs(rig: Rig, name: str) -> None:
    change, says = EDITS[name]
    path = rig.save_plan()
    edit(path, change)
    plan_from_json(path.read_text())  # the edit passes every check of the file on its own
    code, _, err = rig.apply(path)
    assert code == 1 and "Traceback" not in err
    assert says in err, err
    assert "refusing" in err and "fleet plan -o FILE" in err
    assert rig.hosts.changes_sent() == []
    assert rig.hosts.locked == set(json.loads(path.read_text())["hosts"])  # checked under the lock


# ------------------------------------------------------------------ stale plans: the messages stay


def test_a_plan_made_stale_by_a_change_on_a_host_is_still_refused_as_stale(rig: Rig) -> None:
    path = rig.save_plan()
    base = converged(example(), EXAMPLE_SECRETS)
    rig.hosts.observed["nietzsche"] = stopped(base["nietzsche"], "redis-server.service")
    code, _, err = rig.apply(path)
    assert code == 1
    assert "refusing a stale plan: the hosts changed since it was computed" in err
    assert "nietzsche: observed state changed since the plan" in err
    assert "newly needed: nietzsche:" in err
    assert rig.hosts.changes_sent() == []


def test_a_plan_whose_before_was_edited_is_refused_as_different_now(rig: Rig) -> None:
    path = rig.save_plan()
    edit(path, _set("fritz:start:mastodon-streaming.service", before="active/running"))
    code, _, err = rig.apply(path)
    assert code == 1 and "different now: fritz:start:mastodon-streaming.service" in err
    assert rig.hosts.changes_sent() == []


# ------------------------------------------------------------------ what runs is the fresh plan


def test_an_unedited_saved_plan_is_applied_and_what_runs_is_the_plan_computed_now(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    path = rig.save_plan()
    saved = plan_from_json(path.read_text())
    fresh: list[Plan] = []
    executed: list[Plan] = []
    real_build, real_executor = planning.build_plan, applying.Executor

    def build_plan(*a: Any, **kw: Any) -> Plan:
        fresh.append(real_build(*a, **kw))
        return fresh[-1]

    def executor(plan: Plan, *a: Any, **kw: Any) -> Any:
        executed.append(plan)
        return real_executor(plan, *a, **kw)

    monkeypatch.setattr(planning, "build_plan", build_plan)
    monkeypatch.setattr(applying, "Executor", executor)
    code, out, err = rig.apply(path)
    assert code == 0, err
    [plan] = executed
    assert all(a is b for a, b in zip(plan.changes, fresh[-1].changes, strict=True))  # never the file's
    assert plan.plan_id == saved.plan_id  # the journal names the plan the reviewer saw
    sent = rig.hosts.changes_sent()
    assert any(h == "fritz" and "restart" in c for h, c in sent) and any(h == "franz" for h, _ in sent)


# ------------------------------------------------------------------ names and paths in a loaded plan


def _doc() -> dict[str, Any]:
    from fleet.plan import build_plan

    plan = build_plan(example(), drifted(), EXAMPLE_SECRETS)
    return plan.to_dict()


def _rename(doc: dict[str, Any], old_id: str, **fields: Any) -> None:
    """Change a change's identity fields and keep waves and deps naming it consistently."""
    c = one(doc, old_id)
    c.update(fields)
    new_id = f"{c['host']}:{c['action']}:{c['target']}"
    c["id"] = new_id
    doc["waves"] = [[new_id if x == old_id else x for x in w] for w in doc["waves"]]
    for other in doc["changes"]:
        other["deps"] = [new_id if x == old_id else x for x in other.get("deps", [])]


HOSTILE_PLANS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unit-with-shell": lambda d: _rename(d, "fritz:start:mastodon-streaming.service", target="x;reboot.service"),
    "unit-as-a-path": lambda d: _rename(d, "fritz:start:mastodon-streaming.service", target="../../etc/x.service"),
    "unit-with-a-newline": lambda d: _rename(d, "fritz:start:mastodon-streaming.service", target="a\nb.service"),
    "host-climbing": lambda d: (_rename(d, "fritz:start:mastodon-streaming.service", host="../x"),
                                d["hosts"].append("../x")),
    "host-in-hosts-list": lambda d: d["hosts"].append("a b"),
    "change-on-a-host-the-plan-does-not-cover": lambda d: _rename(d, "fritz:start:mastodon-streaming.service",
                                                                  host="zeus"),
    "env-path-relative": lambda d: _rename(d, f"freud:write-env:{ENV}", target="etc/passwd"),
    "env-path-climbing": lambda d: _rename(d, f"freud:write-env:{ENV}", target="/home/../etc/passwd"),
    "env-key-with-a-newline": lambda d: one(d, f"freud:write-env:{ENV}").update(
        keys=[["EVIL\nLD_PRELOAD", "set", "", "x"]]),
    "env-owner-with-shell": lambda d: one(d, f"freud:write-env:{ENV}")["meta"].update(owner="root;id"),
    "env-mode-not-octal": lambda d: one(d, f"freud:write-env:{ENV}")["meta"].update(mode="9999"),
    "service-name-with-shell": lambda d: one(d, "fritz:start:mastodon-streaming.service").update(service="a;b"),
    "prune-unknown-step": lambda d: one(d, PRUNE).update(steps=["stop", "rm -rf /"]),
    "prune-sidekiq-env-climbing": lambda d: one(d, PRUNE).update(meta={"sidekiq_env": "/home/../etc/shadow"}),
    "prune-sidekiq-env-relative": lambda d: one(d, PRUNE).update(meta={"sidekiq_env": "$(id)"}),
    "prune-meta-other-key": lambda d: one(d, PRUNE).update(meta={"sidekiq_env": ENV, "owner": "root"}),
    "content-hash-not-a-hash": lambda d: one(d, f"fritz:write-unit:{WEB}").update(content_hash="$(id)"),
    "daemon-reload-with-a-target": lambda d: _rename(d, "fritz:daemon-reload:systemd", target="x.service"),
    "fingerprint-of-another-host": lambda d: d["fingerprints"].update(zeus="0" * 64),
}


@pytest.mark.parametrize("name", list(HOSTILE_PLANS))
def test_a_loaded_plan_with_a_hostile_name_or_path_is_a_plan_file_error(name: str) -> None:
    doc = copy.deepcopy(_doc())
    HOSTILE_PLANS[name](doc)
    with pytest.raises(PlanFileError):
        plan_from_json(plan_file_text(pack_document(doc)))


def test_the_plans_fleet_writes_pass_the_same_checks() -> None:
    plan_from_json(plan_file_text(pack_document(_doc())))
