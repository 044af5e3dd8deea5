"""`fleet lab …` through the main CLI's parser: the lab's arguments share the main namespace.

No lab is needed: a state directory without a lab record makes `fleet lab ssh` stop with its
one-line error before anything runs.  (On the lab: tests/integration/test_docs.py.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fleet.cli import build_parser, main

# Shared on purpose: `fleet --dir X lab up` and `fleet lab up --dir X` mean the same.
SHARED_DESTS = {"help", "dir", "hosts", "state_dir"}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_no_lab_argument_overwrites_a_main_cli_dest() -> None:
    parser = build_parser()
    main_dests = {a.dest for a in parser._actions}
    lab = subparsers(parser)["lab"]
    clashes = {
        (name, action.dest)
        for name, sub in {"lab": lab, **subparsers(lab)}.items()
        for action in sub._actions
        if action.dest in main_dests - SHARED_DESTS
    }
    assert clashes == set()


@pytest.mark.parametrize("remote", [["systemctl", "is-system-running"], []], ids=["with-command", "login-shell"])
def test_lab_ssh_parses_as_the_lab_command_with_its_remote_command(remote: list[str]) -> None:
    args = build_parser().parse_args(["lab", "ssh", "franz", *remote])
    assert (args.command, args.lab_command, args.host, args.remote_command) == ("lab", "ssh", "franz", remote)


@pytest.mark.parametrize("remote", [["systemctl", "is-system-running"], []], ids=["with-command", "login-shell"])
def test_lab_ssh_without_a_lab_is_a_one_line_error_not_a_traceback(
    remote: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--state-dir", str(tmp_path / ".fleet"), "lab", "ssh", "franz", *remote])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("fleet lab: error: the lab is not up for the state directory"), err
    assert "Traceback" not in out + err
