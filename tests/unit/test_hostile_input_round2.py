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
from pathlib import Path
from typing import Any

import pytest

from fleet import cli
from fleet.errors import FleetError
from fleet.secrets import load_secrets

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
