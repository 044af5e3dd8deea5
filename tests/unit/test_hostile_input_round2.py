"""Hostile and broken input, round 2 (issue 12): what still got through or crashed.

Each test here failed before its fix (docs/RELIABILITY.md, "Hostile and broken input", lists
them).  Saved plans edited into harm have their own file, test_saved_plan_verification.py.

* env keys from every source go through one validator (no line injection into .env files);
* paths a host reports are never removed unless they are plainly fleet's to remove;
* control characters are escaped in every human output, never in JSON;
* deep nesting, unwritable outputs, binary/FIFO/directory files and absurd numbers are one-line
  errors, never tracebacks; a run that would select no host is an error;
* a broken host file is reported as the root cause, without the policy findings that only
  follow from it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from fleet import cli
from fleet.errors import FleetError
from fleet.output import text as text_output
from fleet.secrets import load_secrets
from fleet.workflows import observe as observing
from fleet.workflows.observe import Observation

FleetDir = Any  # conftest.FleetDir
DESIRED = "desired_state.toml"


def toml_str(s: str) -> str:
    """A TOML basic string (JSON string syntax; TOML also wants DEL escaped)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def check_json(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, "--dir", root, "check", "--json")
    return code, json.loads(out)


# ====================================================================== env keys: one validator

BAD_KEYS = {
    "newline-injection": "EVIL\nLD_PRELOAD",
    "carriage-return": "EVIL\rX",
    "equals-sign": "A=B",
    "space": "A B",
    "empty": "",
    "unicode": "ÄPFEL",
    "too-long": "K" * 129,
}


def _values(fd: FleetDir, key: str) -> str:
    fd.edit('SMTP_PORT = "587"', f'SMTP_PORT = "587"\n{toml_str(key)} = "x"')
    return f"env_files.mastodon.values.{key}"


def _override(fd: FleetDir, key: str) -> str:
    fd.append(f'[env_files.mastodon.overrides.fritz]\n{toml_str(key)} = "x"\n')
    return f"env_files.mastodon.overrides.fritz.{key}"


def _sensitive(fd: FleetDir, key: str) -> str:
    fd.edit('SMTP_PASSWORD = "file"', f'SMTP_PASSWORD = "file"\n{toml_str(key)} = "env:EVILVAR"')
    return f"env_files.mastodon.sensitive.{key}"


def _extra_key(fd: FleetDir, key: str) -> str:
    fd.append(f"[policy.env]\nextra_keys = [{toml_str(key)}]\n")
    return "policy.env.extra_keys"


def _unit_environment(fd: FleetDir, key: str) -> str:
    old = 'environment = { NODE_ENV = "production",'
    fd.edit(old, f'environment = {{ {toml_str(key)} = "x", NODE_ENV = "production",')
    return f"services.streaming.unit_file.environment.{key}"


KEY_SOURCES = {"values": _values, "overrides": _override, "sensitive": _sensitive, "extra_keys": _extra_key,
               "unit_file.environment": _unit_environment}


@pytest.mark.parametrize("cls", list(BAD_KEYS))
@pytest.mark.parametrize("source", list(KEY_SOURCES))
def test_a_bad_env_key_from_any_source_is_a_bad_name_finding(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                                             source: str, cls: str) -> None:
    key = KEY_SOURCES[source](example, BAD_KEYS[cls])
    code, report = check_json(capsys, example.root)
    assert code == 1
    named = [f for f in report["findings"] if f["code"] == "config.bad-name" and f["key"] == key]
    assert named, json.dumps(report["findings"], indent=1)
    assert "letters, digits and underscores" in named[0]["hint"]


def test_the_injected_key_of_the_issue_never_reaches_a_plan(capsys: pytest.CaptureFixture[str],
                                                            example: FleetDir) -> None:
    """`"EVIL\\nLD_PRELOAD" = "env:EVILVAR"` plus the same name in extra_keys passed `check`."""
    example.edit('SMTP_PASSWORD = "file"', 'SMTP_PASSWORD = "file"\n"EVIL\\nLD_PRELOAD" = "env:EVILVAR"')
    example.append('[policy.env]\nextra_keys = ["EVIL\\nLD_PRELOAD"]\n')
    code, out, err = run(capsys, "--dir", example.root, "check")
    assert code == 1 and "Traceback" not in out + err
    assert "'EVIL\\nLD_PRELOAD' is not a valid environment variable name" in out


@pytest.mark.parametrize("cls", list(BAD_KEYS))
def test_a_bad_key_in_the_secrets_file_is_an_error_naming_the_file_and_never_the_value(
        example: FleetDir, tmp_path: Path, cls: str) -> None:
    desired = example.load().desired
    assert desired is not None
    path = tmp_path / "secrets.toml"
    path.write_text(f'[mastodon]\nDB_PASS = "p"\n{toml_str(BAD_KEYS[cls])} = "the-secret-value"\n')
    path.chmod(0o600)
    _, findings = load_secrets(desired, path, environ={})
    bad = [f for f in findings if f.code == "secrets.bad-key"]
    assert len(bad) == 1 and bad[0].is_error and bad[0].file == str(path)
    assert "the-secret-value" not in bad[0].message + bad[0].hint


def test_the_one_validator_accepts_env_names_and_refuses_the_rest() -> None:
    from fleet.envfile import key_problem

    assert key_problem("S3_BUCKET") is None and key_problem("3_BUCKET") is None
    for bad in BAD_KEYS.values():
        assert key_problem(bad) is not None


def test_the_env_file_writer_refuses_a_key_that_would_break_a_line() -> None:
    from fleet.envfile import render_file

    with pytest.raises(FleetError, match="not a valid environment variable name"):
        render_file([("EVIL\nLD_PRELOAD", "/tmp/x.so")])


# ====================================================================== paths a host reports

UNIT = "mastodon-evil.service"
HOSTILE_FRAGMENTS = {
    "climbs-out": "/etc/systemd/system/../../../etc/shadow",
    "climbs-out-and-back": "/etc/systemd/system/../system/mastodon-evil.service",
    "double-slash": "/etc/systemd/system//mastodon-evil.service",
    "dot-segment": "/etc/systemd/system/./mastodon-evil.service",
    "another-units-file": "/etc/systemd/system/ssh.service",
    "a-subdirectory": "/etc/systemd/system/multi-user.target.wants/mastodon-evil.service",
    "the-directory-itself": "/etc/systemd/system/",
    "newline": "/etc/systemd/system/mastodon-evil.service\n/etc/passwd",
}
HOSTILE_DROP_INS = {
    "climbs-out": "/etc/systemd/system/mastodon-evil.service.d/../../../../etc/passwd",
    "not-a-conf": "/etc/systemd/system/mastodon-evil.service.d/authorized_keys",
    "another-units-dir": "/etc/systemd/system/ssh.service.d/override.conf",
    "nested": "/etc/systemd/system/mastodon-evil.service.d/x/override.conf",
    "bare-conf": "/etc/systemd/system/mastodon-evil.service.d/.conf",
    "prefix-drop-in-dir": "/etc/systemd/system/mastodon-.service.d/override.conf",
}


def _with_hostile_unit(fragment: str = "/etc/systemd/system/mastodon-evil.service",
                       drop_ins: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    from dataclasses import replace

    from observed import converged, example, hand_made_unit, with_unit

    from fleet.model import HostState

    desired = example()
    fleet: dict[str, HostState] = dict(converged(desired, EXAMPLE_SECRETS()))
    u = replace(hand_made_unit(UNIT, "/usr/bin/evil"), fragment_path=fragment, drop_in_paths=drop_ins)
    fleet["franz"] = with_unit(fleet["franz"], u)
    return desired, fleet


def EXAMPLE_SECRETS() -> dict[tuple[str, str], str]:  # a constant, imported late
    from observed import EXAMPLE_SECRETS as S

    return S


@pytest.mark.parametrize("path", list(HOSTILE_FRAGMENTS.values()), ids=list(HOSTILE_FRAGMENTS))
def test_a_pruned_units_fragment_outside_fleets_own_files_is_never_removed_and_is_reported(path: str) -> None:
    from fleet.plan import build_plan

    desired, fleet = _with_hostile_unit(fragment=path)
    plan = build_plan(desired, fleet, EXAMPLE_SECRETS())
    [prune] = [c for c in plan.changes if c.target == UNIT]
    assert path not in prune.payload.remove_files and "remove" not in prune.payload.steps
    assert prune.payload.steps == ("stop", "disable")  # the unit is still stopped and disabled
    assert any("franz" in p and UNIT in p and repr(path)[1:-1] in p for p in plan.problems), plan.problems


@pytest.mark.parametrize("path", list(HOSTILE_DROP_INS.values()), ids=list(HOSTILE_DROP_INS))
def test_a_pruned_units_drop_in_outside_its_own_directory_is_never_removed_and_is_reported(path: str) -> None:
    from fleet.plan import build_plan

    desired, fleet = _with_hostile_unit(drop_ins=(path,))
    plan = build_plan(desired, fleet, EXAMPLE_SECRETS())
    [prune] = [c for c in plan.changes if c.target == UNIT]
    assert prune.payload.remove_files == ("/etc/systemd/system/mastodon-evil.service",)
    assert any("franz" in p and UNIT in p and path in p for p in plan.problems), plan.problems


@pytest.mark.parametrize("path", list(HOSTILE_DROP_INS.values()), ids=list(HOSTILE_DROP_INS))
def test_a_managed_units_drop_in_outside_its_own_directory_is_never_removed_by_a_rewrite(path: str) -> None:
    from observed import change_unit, converged, example

    from fleet.plan import build_plan

    desired = example()
    fleet = dict(converged(desired, EXAMPLE_SECRETS()))
    web = "mastodon-web.service"
    fleet["fritz"] = change_unit(fleet["fritz"], web, drop_in_paths=(path.replace("mastodon-evil.service", web),))
    plan = build_plan(desired, fleet, EXAMPLE_SECRETS())
    assert all(not c.fields()["remove_files"] for c in plan.changes if c.host == "fritz"), plan.changes
    assert any("fritz" in p and web in p for p in plan.problems), plan.problems


def test_fleets_own_files_of_a_unit_are_still_removed() -> None:
    from fleet.plan import build_plan

    own = ("/etc/systemd/system/mastodon-evil.service.d/override.conf",)
    desired, fleet = _with_hostile_unit(drop_ins=own)
    plan = build_plan(desired, fleet, EXAMPLE_SECRETS())
    [prune] = [c for c in plan.changes if c.target == UNIT]
    assert prune.payload.remove_files == ("/etc/systemd/system/mastodon-evil.service", *own)
    assert prune.payload.steps == ("stop", "disable", "remove") and not plan.problems


@pytest.mark.parametrize(("path", "unit", "ok"), [
    ("/etc/systemd/system/a.service", "a.service", True),
    ("/etc/systemd/system/a.service.d/x.conf", "a.service", True),
    ("/etc/systemd/system/a@.service", "a@1.service", True),  # an instance's template
    ("/etc/systemd/system/a@.service.d/x.conf", "a@1.service", True),
    ("/etc/systemd/system/a@1.service.d/x.conf", "a@1.service", True),
    ("/etc/systemd/system/b.service", "a.service", False),
    ("/lib/systemd/system/a.service", "a.service", False),
    ("/etc/systemd/system/a.service.d/../a.service", "a.service", False),
    ("/etc/systemd/system/a.service.d/x.conf/", "a.service", False),
    ("etc/systemd/system/a.service", "a.service", False),
    ("", "a.service", False),
])
def test_one_helper_says_which_reported_paths_fleet_may_remove(path: str, unit: str, ok: bool) -> None:
    from fleet.units import removable_unit_file

    assert removable_unit_file(path, unit) is ok


class _Recorder:
    """A transport and a journal in one: records every command, answers `@@ok`."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.outcomes: list[tuple[str, str]] = []

    def run(self, host: Any, command: str, **kw: Any) -> Any:
        from fleet.transport.protocol import RunResult

        self.commands.append(command)
        return RunResult(str(host), command, 0, b"@@ok\n", b"", 0.0)

    def step_started(self, run_id: str, change: Any) -> int:
        return 1

    def step_finished(self, step_id: int, outcome: str, error: str = "") -> None:
        self.outcomes.append((outcome, error))

    def record_skipped(self, run_id: str, change: Any, reason: str) -> int:
        return 1


@pytest.mark.parametrize("action", ["write-unit", "prune"])
def test_the_executor_refuses_to_remove_a_path_that_is_not_the_units_own_file(action: str) -> None:
    from observed import example

    from fleet.actions import Action, Change, PrunePayload, UnitFilePayload
    from fleet.apply import Executor
    from fleet.plan import Plan

    desired = example()
    payload = (PrunePayload(steps=("stop", "disable", "remove"), remove_files=("/etc/passwd",)) if action == "prune"
               else UnitFilePayload("0" * 64, remove_files=("/etc/passwd",)))
    change = Change("fritz", Action(action), "mastodon-web.service", "edited", "web", payload=payload)
    plan = Plan(fleet="x", created_at="", desired_hash="", hosts=("fritz",), fingerprints={}, changes=(change,),
                deps={change.id: ()}, waves=((change.id,),))
    rec = _Recorder()
    result = Executor(plan, desired, desired.hosts, EXAMPLE_SECRETS(), rec, rec, "run1").execute()
    assert not result.ok and rec.outcomes[0][0] == "failed" and "/etc/passwd" in rec.outcomes[0][1]
    assert not any("/etc/passwd" in c for c in rec.commands)


# ====================================================================== control characters in human output

ESC = "\x1b"
# What a crafted file or host could use to hide a line from the reviewer: clear the line, move
# up, set the window title (OSC), conceal, a one-byte CSI, a carriage return, a bidi override.
PAYLOADS = {
    "clear-line": "\x1b[2K",
    "cursor-up": "\x1b[1A",
    "osc-title": "\x1b]0;pwned\x07",
    "conceal": "\x1b[8m",
    "c1-csi": "\x9b2K",
    "carriage-return": "\r",
    "backspace": "\x08",
    "delete": "\x7f",
    "bidi-override": "\u202e",
}
CONTROL = set(map(chr, range(0x20))) - {"\n"} | {"\x7f"} | set(map(chr, range(0x80, 0xA0))) | {"\u202e"}


def assert_printable(text: str) -> None:
    bad = sorted({c for c in text if c in CONTROL and c != "\t"})
    assert not bad, f"raw control characters {bad!r} in: {text!r}"


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_a_fleet_name_with_control_characters_is_printed_escaped_by_check(
        capsys: pytest.CaptureFixture[str], example: FleetDir, payload: str) -> None:
    example.edit('name = "hachyderm"', f"name = {toml_str('hachyderm' + payload + 'x')}")
    code, out, err = run(capsys, "--dir", example.root, "check")
    assert code == 0
    assert_printable(out + err)
    assert out.startswith("hachyderm\\x") or out.startswith("hachyderm\\u")


def test_a_key_path_with_a_newline_is_printed_escaped_in_findings(capsys: pytest.CaptureFixture[str],
                                                                 example: FleetDir) -> None:
    example.edit('SMTP_PASSWORD = "file"', 'SMTP_PASSWORD = "file"\n"EVIL\\nLD_PRELOAD" = "env:EVILVAR"')
    code, out, _ = run(capsys, "--dir", example.root, "check")
    assert code == 1
    assert "[env_files.mastodon.sensitive.EVIL\\x0aLD_PRELOAD]" in out
    code, out, _ = run(capsys, "--dir", example.root, "check", "--json")
    keys = [f["key"] for f in json.loads(out)["findings"]]
    assert "env_files.mastodon.sensitive.EVIL\nLD_PRELOAD" in keys  # JSON stays exact


def _hostile_plan_doc() -> dict[str, Any]:
    from observed import EXAMPLE_SECRETS as S
    from observed import bare, example

    from fleet.plan import build_plan, pack_document

    doc: dict[str, Any] = build_plan(example(), bare(example()), S).to_dict()
    doc["fleet"] = "hachyderm\x1b]0;owned\x07"
    doc["changes"][0]["reason"] = "fine\x1b[2K\r  ~ nothing to see here\x1b[8m"
    doc["notes"] = ["note\x1b[1A"]
    doc["problems"] = ["problem\x9b2K"]
    return pack_document(doc)  # the plan file's shape


@pytest.mark.parametrize("color", [False, True])
def test_fleet_show_escapes_control_characters_from_the_plan_file(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, color: bool) -> None:
    import re

    monkeypatch.setattr(text_output, "use_color", lambda isatty: color)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_hostile_plan_doc()))
    code, out, err = run(capsys, "show", path)
    assert code == 2, err
    own = re.sub(r"\x1b\[[0-9;]*m", "", out) if color else out  # fleet's own colours, and nothing else
    assert_printable(own)
    assert "fine\\x1b[2K\\x0d  ~ nothing to see here\\x1b[8m" in out
    assert "hachyderm\\x1b]0;owned\\x07" in out and "note\\x1b[1A" in out and "problem\\x9b2K" in out
    code, out, _ = run(capsys, "show", path, "--json")
    assert json.loads(out)["changes"][0]["reason"] == "fine\x1b[2K\r  ~ nothing to see here\x1b[8m"


def _hostile_observation() -> tuple[Any, dict[str, Any]]:
    from dataclasses import replace

    from observed import EXAMPLE_SECRETS as S
    from observed import converged, example, hand_made_unit, set_env_value, unreachable, with_unit

    from fleet.model import HostError, HostState

    desired = example()
    fleet: dict[str, HostState | HostError] = dict(converged(desired, S))
    u = replace(hand_made_unit("mastodon-evil.service", "/usr/bin/evil --x \x1b[2K"),
                active_state="active\x1b[8m", sub_state="running\r")
    fritz = fleet["fritz"]
    assert isinstance(fritz, HostState)
    fleet["fritz"] = set_env_value(with_unit(fritz, u), "S3_BUCKET", "bucket\x1b]0;x\x07")
    fleet["nietzsche"] = replace(unreachable("nietzsche"), message="refused\x1b[2K\rall good")
    return desired, fleet


def test_status_audit_and_markdown_escape_what_hosts_report() -> None:
    from fleet.audit import build_audit
    from fleet.output.markdown import audit_markdown
    from fleet.output.text import audit_text, status_text
    from fleet.status import build_status

    desired, fleet = _hostile_observation()
    assert_printable(status_text(build_status(desired, fleet)))
    report = build_audit(desired, fleet)
    assert_printable(audit_text(report))
    assert_printable(audit_markdown(report))
    assert "refused\\x1b[2K\\x0dall good" in status_text(build_status(desired, fleet))


def test_apply_output_escapes_what_a_host_answered() -> None:
    from observed import example

    from fleet.actions import Action, Change
    from fleet.output.text import apply_text
    from fleet.results import ApplyResult, StepOutcome

    c = Change("fritz", Action.START, "mastodon-web.service", "x", "web")
    result = ApplyResult("run", [StepOutcome(c, "failed", "exit 1: \x1b[2Kok", detail="| \x1b]0;t\x07 line\r",
                                             rollback="rolled\x1b[1A back")])
    assert example() is not None
    text = apply_text(result)
    assert_printable(text)
    assert "exit 1: \\x1b[2Kok" in text


def test_fleet_log_escapes_journal_text_and_its_json_stays_exact(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from fleet.actions import Action, Change
    from fleet.journal import Journal, journal_path

    state = tmp_path / ".fleet"
    with Journal.open(journal_path(str(state))) as journal:
        run_id = journal.start_run(operator="eve\x1b[2K@host", plan_id="p", plan_hash="h", desired_hash="d",
                                   fleet="f\x1b]0;x\x07", lab=False)
        step = journal.step_started(run_id, Change("fritz", Action.START, "mastodon-web.service", "why\x1b[1A", "web",
                                                   before="inactive\r", after="active"))
        journal.step_finished(step, "failed", "boom\x1b[8m hidden")
        journal.finish_run(run_id, "failed", "x")
    code, out, _ = run(capsys, "--state-dir", state, "log", "--cached")
    assert code == 0
    assert_printable(out)
    assert "eve\\x1b[2K@host" in out and "boom\\x1b[8m hidden" in out
    code, out, _ = run(capsys, "--state-dir", state, "log", "--cached", "--json")
    [entry] = json.loads(out)["steps"]
    assert entry["error"] == "boom\x1b[8m hidden" and entry["operator"] == "eve\x1b[2K@host"


def test_an_error_naming_a_hostile_path_is_printed_escaped(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    code, out, err = run(capsys, "show", tmp_path / "plan\x1b[2K\r.json")
    assert code == 1 and err.startswith("fleet: error:")
    assert_printable(err)
    assert "plan\\x1b[2K\\x0d.json" in err


def test_lab_status_escapes_what_a_lab_host_reports(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fleet.lab import lifecycle

    state = lifecycle.LabStatus(hosts=[lifecycle.HostStatus("fritz", "10.0.0.1", "root", True,
                                                            "degraded\x1b[2K\rrunning", True)],
                                booted="now\x1b]0;x\x07", ssh_config="/x", recorded=True)
    monkeypatch.setattr(lifecycle, "status", lambda paths, hosts_dir: state)
    code, out, err = run(capsys, "--dir", tmp_path, "lab", "status")
    assert code == 1
    assert_printable(out + err)
    assert "degraded\\x1b[2K\\x0drunning" in out



# ====================================================================== tracebacks become one-line errors


class Contacted(AssertionError):
    pass


@pytest.fixture
def no_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as contacting (or even connecting to) a host."""
    def refuse(*a: Any, **kw: Any) -> Any:
        raise Contacted("a host was contacted")

    monkeypatch.setattr(observing, "open_transport", refuse)
    monkeypatch.setattr(observing, "observe", refuse)


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    first, *rest = err.rstrip("\n").split("\n")
    assert first.startswith("fleet: error: "), err
    assert all(line.startswith("  hint: ") for line in rest), err
    return first


DEEP = 100_000


@pytest.mark.parametrize("shape", ["arrays", "inline-tables"])
def test_a_deeply_nested_desired_state_is_a_finding_not_a_traceback(capsys: pytest.CaptureFixture[str],
                                                                   example: FleetDir, shape: str) -> None:
    value = "[" * DEEP + "]" * DEEP if shape == "arrays" else "{a=" * 3000 + "1" + "}" * 3000
    example.edit('name = "hachyderm"', f"name = {value}")
    code, out, err = run(capsys, "--dir", example.root, "check")
    assert code == 1 and "Traceback" not in out + err
    assert "nests too deeply" in out and "desired_state.toml" in out


def test_a_deeply_nested_host_file_is_a_finding_for_that_host(capsys: pytest.CaptureFixture[str],
                                                             example: FleetDir) -> None:
    example.write("hosts/franz.toml", "roles = " + "[" * DEEP + "]" * DEEP + "\n")
    code, out, err = run(capsys, "--dir", example.root, "check")
    assert code == 1 and "Traceback" not in out + err
    assert "franz.toml" in out and "nests too deeply" in out


@pytest.mark.parametrize("shape", ["arrays", "inline-tables"])
def test_a_deeply_nested_secrets_file_is_a_one_line_error_before_any_host(
        capsys: pytest.CaptureFixture[str], example: FleetDir, tmp_path: Path, no_hosts: None, shape: str) -> None:
    deep = tmp_path / "secrets.toml"
    value = "[" * DEEP + "]" * DEEP if shape == "arrays" else "{a=" * 3000 + "1" + "}" * 3000
    deep.write_text(f"[mastodon]\nDB_PASS = {value}\n")
    deep.chmod(0o600)
    code, out, err = run(capsys, "--dir", example.root, "plan", "--secrets", deep)
    assert code == 1 and "Traceback" not in out + err
    assert "nests too deeply" in err


def test_lab_secrets_that_nest_too_deeply_are_refused_without_a_traceback(example: FleetDir,
                                                                         tmp_path: Path) -> None:
    from fleet.secrets import ensure_lab_secrets

    path = tmp_path / "secrets.toml"
    path.write_text("x = " + "[" * DEEP + "]" * DEEP + "\n")
    desired = example.load().desired
    assert desired is not None
    with pytest.raises(FleetError, match="nests too deeply"):
        ensure_lab_secrets(desired, path)
    assert path.read_text().startswith("x = [[[")  # nothing was overwritten


@pytest.mark.parametrize("where", ["missing-directory", "a-directory", "a-file-as-directory"])
def test_plan_to_an_unwritable_path_is_refused_before_any_host_is_contacted(
        capsys: pytest.CaptureFixture[str], example: FleetDir, tmp_path: Path, no_hosts: None, where: str) -> None:
    (tmp_path / "file").write_text("x")
    out_path = {"missing-directory": tmp_path / "nonexistent" / "dir" / "p.json",
                "a-directory": tmp_path,
                "a-file-as-directory": tmp_path / "file" / "p.json"}[where]
    code, out, err = run(capsys, "--dir", example.root, "plan", "-o", out_path)
    assert code == 1
    assert str(out_path) in one_line_error(err)


def test_a_plan_that_cannot_be_written_at_the_end_is_a_clean_error(
        capsys: pytest.CaptureFixture[str], example: FleetDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from observed import EXAMPLE_SECRETS as S
    from observed import bare
    from observed import example as example_desired

    secrets = tmp_path / "secrets.toml"
    secrets.write_text("[mastodon]\n" + "".join(f"{k} = {toml_str(v)}\n" for (_, k), v in S.items()))
    secrets.chmod(0o600)

    class Nothing:
        def __enter__(self) -> Nothing:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def observe(*a: Any, **kw: Any) -> Observation:
        return Observation(dict(bare(example_desired())), "")

    def full_disk(*a: Any, **kw: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(observing, "open_transport", lambda *a: Nothing())
    monkeypatch.setattr(observing, "observe", observe)
    monkeypatch.setattr(os, "replace", full_disk)
    out_path = tmp_path / "p.json"
    code, out, err = run(capsys, "--dir", example.root, "plan", "--secrets", secrets, "-o", out_path)
    assert code == 1
    assert "No space left on device" in one_line_error(err) and str(out_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example", "secrets.toml"]  # no temporary file left


def _in_thread(fn: Any, *args: Any) -> Any:
    """Run fn(*args) in a thread; fail (instead of hanging) if it blocks."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "blocked"
    return result[0]


PLAN_FILES = {
    "invalid-utf8": lambda p: p.write_bytes(b"{\"format\": 1, \"fleet\": \"\xff\xfe\"}"),
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "a-directory": lambda p: p.mkdir(),
    "a-fifo": lambda p: os.mkfifo(p),
}


@pytest.mark.parametrize("command", ["show", "apply"])
@pytest.mark.parametrize("kind", list(PLAN_FILES))
def test_a_plan_file_that_is_not_text_or_not_a_file_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str], example: FleetDir, tmp_path: Path, no_hosts: None,
        command: str, kind: str) -> None:
    path = tmp_path / "plan.json"
    PLAN_FILES[kind](path)
    code = _in_thread(cli.main, ["--dir", str(example.root), command, str(path)])
    _, err = capsys.readouterr()
    assert code == 1
    assert str(path) in one_line_error(err)


FLOAT_OPTIONS = [
    (["apply"], "--start-timeout"), (["apply"], "--settle"), (["apply"], "--command-grace"), (["apply"], "--timeout"),
    (["status"], "--timeout"),
    (["plan"], "--timeout"), (["audit"], "--timeout"), (["lock", "status"], "--timeout"),
    (["diff", "x"], "--timeout"), (["status"], "--connect-timeout"), (["--connect-timeout"], ""),
    (["lab", "up"], "--timeout"),
]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-1", "1e400", "1e9"])
@pytest.mark.parametrize(("command", "option"), FLOAT_OPTIONS, ids=[" ".join(c + [o]) for c, o in FLOAT_OPTIONS])
def test_every_duration_option_refuses_absurd_values_naming_the_option(
        capsys: pytest.CaptureFixture[str], example: FleetDir, no_hosts: None, command: list[str], option: str,
        value: str) -> None:
    if option:  # the option after the command
        argv = ["--dir", str(example.root), *command, f"{option}={value}"]
    else:  # a global option before the command
        argv = ["--dir", str(example.root), f"{command[0]}={value}", "status"]
    code, out, err = run(capsys, *argv)
    assert code == 64, err
    assert "Traceback" not in err
    assert f"argument {option or command[0]}" in err and "seconds" in err


@pytest.mark.parametrize(("option", "value"), [("--settle", "0"), ("--start-timeout", "0.5"), ("--timeout", "7")])
def test_sensible_durations_are_still_accepted(example: FleetDir, option: str, value: str) -> None:
    args = cli.build_parser().parse_args(["apply", f"{option}={value}"])
    assert getattr(args, option[2:].replace("-", "_")) == float(value)


@pytest.mark.parametrize("option", ["--start-timeout", "--command-grace", "--timeout", "--connect-timeout"])
def test_a_zero_duration_is_refused(capsys: pytest.CaptureFixture[str], option: str) -> None:
    code, _, err = run(capsys, "apply", f"{option}=0")
    assert code == 64 and f"argument {option}" in err


# ====================================================================== wrong answers


@pytest.mark.parametrize("limit", [",,", ",", " ", " , "])
@pytest.mark.parametrize("command", ["status", "plan", "apply", "audit"])
def test_a_limit_that_selects_no_host_is_an_error(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                                 no_hosts: None, command: str, limit: str) -> None:
    code, out, err = run(capsys, "--dir", example.root, command, "--limit", limit, "--yes" if command == "apply"
                         else "--timeout=5")
    assert code == 1
    assert "--limit" in one_line_error(err) and "matches the desired state" not in out


@pytest.mark.parametrize("value", ["0", "-1", "-32", "x"])
def test_forks_must_be_a_positive_number(capsys: pytest.CaptureFixture[str], value: str) -> None:
    code, _, err = run(capsys, "status", f"--forks={value}")
    assert code == 64 and "argument --forks" in err


def test_an_unreadable_hosts_directory_is_one_error_naming_it_and_the_reason(
        capsys: pytest.CaptureFixture[str], example: FleetDir, monkeypatch: pytest.MonkeyPatch) -> None:
    real_scandir = os.scandir
    hosts = str(example.hosts_dir)

    def scandir(path: Any = ".") -> Any:  # root reads any directory: simulate `chmod 000 hosts`
        if os.fspath(path).rstrip("/") == hosts:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = run(capsys, "--dir", example.root, "check")
    assert code == 1
    line = one_line_error(err)
    assert hosts in line and "Permission denied" in line
    assert out == ""


def test_a_hosts_path_through_a_file_says_so(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                            tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    code, _, err = run(capsys, "--dir", example.root, "--hosts", tmp_path / "afile" / "hosts", "check")
    assert code == 1
    assert "Not a directory" in one_line_error(err)
    code, _, err = run(capsys, "--dir", example.root, "--hosts", tmp_path / "afile", "check")
    assert code == 1 and "is a file, not a directory" in one_line_error(err)


@pytest.mark.parametrize(("kind", "says"), [("directory", "is a directory, not a file"),
                                            ("fifo", "is a FIFO (named pipe), not a file")])
def test_a_desired_state_that_is_not_a_file_says_what_it_is(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                                           kind: str, says: str) -> None:
    example.desired_path.unlink()
    if kind == "directory":
        example.desired_path.mkdir()
    else:
        os.mkfifo(example.desired_path)
    code = _in_thread(cli.main, ["--dir", str(example.root), "check"])
    _, err = capsys.readouterr()
    assert code == 1
    line = one_line_error(err)
    assert says in line and "does not exist" not in line


def test_a_broken_host_file_is_the_root_cause_without_its_follow_on_policy_findings(
        capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    """Port 70000 on freud (the Sidekiq host) used to come after 8 queue errors it caused."""
    example.edit("port = 22", "port = 70000", file="hosts/freud.toml")
    code, report = check_json(capsys, example.root)
    assert code == 1
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert [(f["code"], f["file"].rsplit("/", 1)[-1]) for f in errors] == [("hosts.bad-port", "freud.toml")], errors
    assert "findings that follow from this were not shown" in errors[0]["message"]
    code, out, _ = run(capsys, "--dir", example.root, "check")
    assert out.startswith("error: ") and "port 70000" in out.split("\n")[1]


def test_a_finding_that_does_not_follow_from_the_broken_host_is_still_shown(
        capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    example.edit("port = 22", "port = 70000", file="hosts/freud.toml")
    example.edit("queues = { push = 6, pull = 4, fasp = 1 }", "queues = { push = 6, fasp = 1 }")  # pull: nobody
    _, report = check_json(capsys, example.root)
    codes = sorted(f["code"] for f in report["findings"] if f["severity"] == "error")
    assert codes == ["hosts.bad-port", "sidekiq.queue-unserved"], report["findings"]
    assert any("'pull'" in f["message"] for f in report["findings"])


def test_a_broken_sidekiq_service_is_the_root_cause_of_its_unserved_queues(
        capsys: pytest.CaptureFixture[str], example: FleetDir) -> None:
    example.edit("concurrency = 25", 'concurrency = "25"')
    _, report = check_json(capsys, example.root)
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert [f["code"] for f in errors] == ["config.wrong-type"], errors
    assert "findings that follow from this were not shown" in errors[0]["message"]
