"""Every JSON document fleet prints follows one convention (fleet/output/json.py): one object,
`"format"` its first member, lists as named members; written by one function, as
`json.dumps(indent=2)` writes it.  And `fleet lock status --json`, the document added with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FleetDir
from observed import EXAMPLE_SECRETS, bare, converged, example

from fleet import cli
from fleet.actions import Action, Change
from fleet.audit import ObservedChange, build_audit
from fleet.journal import Journal, journal_path
from fleet.output import json as json_out
from fleet.plan import build_plan
from fleet.status import build_status
from fleet.transport.fake import FakeTransport
from fleet.workflows import observe as observing
from fleet.workflows.lock import LockHolder, LockReport, LockRow, holder_info

NOW = 1795000000.0


def documents(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """One of each document, from small but real results."""
    fleet = converged(example(), EXAMPLE_SECRETS)
    with Journal.open(tmp_path / "journal.sqlite") as j:
        run = j.start_run(operator="alice@laptop", plan_id="p1", plan_hash="h", desired_hash="d", fleet="hachyderm",
                          lab=False, now=NOW)
        j.step_started(run, Change("fritz", Action.START, "mastodon-web.service", "not running", "web"), now=NOW)
        j.save_snapshot(command="status", fleet="hachyderm", lab=False, hosts={"fritz": "ok"}, data=b"x",
                        operator="alice@laptop", now=NOW)
        steps, runs, snapshots = j.steps(), j.runs(), j.snapshots()
    change = ObservedChange("fritz", "mastodon-web.service", "on fritz, mastodon-web.service stopped",
                            "changed outside fleet")
    held = LockHolder.parse(holder_info("0123456789abcdef", "alice@laptop", run_id="r1", plan_id="p1"))
    return {
        "check": json_out.check_json([]),
        "status": json_out.status_json(build_status(example(), fleet)),
        "plan": json.loads(json_out.dumps(json_out.plan_json(build_plan(example(), bare(example()), EXAMPLE_SECRETS)))),
        "log": json_out.log_json(steps, runs),
        "audit": json_out.audit_json(build_audit(example(), fleet)),
        "history": json_out.history_json(snapshots),
        "diff": json_out.diff_json([change]),
        "lock": json_out.lock_json(LockReport((LockRow("fritz", "locked", held.describe(), held),
                                               LockRow("franz", "free", "")))),
    }


def test_every_document_is_an_object_whose_first_member_is_its_format(tmp_path: Path) -> None:
    for name, doc in documents(tmp_path).items():
        assert isinstance(doc, dict), name
        assert next(iter(doc)) == "format" and doc["format"] == (2 if name == "plan" else 1), name  # plan: groups


def test_lists_are_named_members_with_their_old_fields(tmp_path: Path) -> None:
    docs = documents(tmp_path)
    assert set(docs["log"]) == {"format", "steps"} and docs["log"]["steps"][0]["host"] == "fritz"
    assert set(docs["history"]) == {"format", "snapshots"}
    assert set(docs["history"]["snapshots"][0]) == {"id", "taken", "operator", "command", "fleet", "lab", "hosts"}
    assert docs["diff"] == {"format": 1, "changes": [{"host": "fritz", "target": "mastodon-web.service",
                                                      "change": "on fritz, mastodon-web.service stopped",
                                                      "attribution": "changed outside fleet", "run_id": None}]}
    assert set(docs["check"]) == {"format", "ok", "errors", "warnings", "findings"}


def test_the_lock_document_shows_the_holder_record_without_its_token(tmp_path: Path) -> None:
    locked, free = documents(tmp_path)["lock"]["locks"]
    assert locked["record"]["operator"] == "alice@laptop" and locked["record"]["run_id"] == "r1"
    assert "token" not in locked["record"] and "0123456789abcdef" not in json.dumps(locked)
    assert free == {"host": "franz", "lock": "free", "holder": "", "record": None}


def test_the_one_writer_writes_what_json_dumps_writes_and_a_newline(tmp_path: Path) -> None:
    for name, doc in documents(tmp_path).items():
        assert json_out.dumps(doc) == json.dumps(doc, indent=2) + "\n", name


def test_plan_json_prints_the_plan_document() -> None:
    plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS)
    assert json_out.dumps(json_out.plan_json(plan)) == plan.document_json()


@pytest.mark.parametrize(("args", "members"), [(["log"], ("steps",)), (["history"], ("runs", "snapshots")),
                                               (["history", "--snapshots"], ("snapshots",))])
def test_without_a_journal_the_json_is_an_empty_document_not_a_sentence(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], members: tuple[str, ...]) -> None:
    # --cached: log and history read the hosts' history first otherwise
    assert cli.main(["--state-dir", str(tmp_path / "state"), *args, "--json", "--cached"]) == 0
    assert json.loads(capsys.readouterr().out) == {"format": 1, **{m: [] for m in members}}


# ------------------------------------------------------------------ fleet lock status --json


@pytest.fixture
def hosts(monkeypatch: pytest.MonkeyPatch) -> FakeTransport:
    """The example's hosts behind a fake transport: fritz holds a lock, the others are free."""
    fake = FakeTransport()
    fake.respond("if [ -d", "@@free\n")
    holder = holder_info("0123456789abcdef", "alice@laptop", run_id="20260101T000000-dead00", plan_id="p1")
    fake.respond("if [ -d", f"@@held\n{holder}\n", host="fritz")
    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: fake)
    return fake


def test_lock_status_json_lists_every_host_with_its_holder(
        capsys: pytest.CaptureFixture[str], example: FleetDir, hosts: FakeTransport) -> None:
    code = cli.main(["--dir", str(example.root), "lock", "status", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    by_host = {row["host"]: row for row in doc["locks"]}
    assert doc["format"] == 1 and set(by_host) == {"franz", "freud", "fritz", "nietzsche"}
    assert by_host["fritz"]["lock"] == "locked" and by_host["fritz"]["record"]["run_id"] == "20260101T000000-dead00"
    assert by_host["fritz"]["holder"].startswith("alice@laptop from ")
    assert by_host["franz"] == {"host": "franz", "lock": "free", "holder": "", "record": None}
    assert "0123456789abcdef" not in out


def test_lock_status_text_is_the_table(capsys: pytest.CaptureFixture[str], example: FleetDir,
                                       hosts: FakeTransport) -> None:
    assert cli.main(["--dir", str(example.root), "lock", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["HOST", "LOCK", "HOLDER"]
    assert any(line.startswith("fritz") and "locked" in line and "run 20260101T000000-dead00" in line for line in lines)


def test_lock_break_refuses_json_before_contacting_a_host(
        capsys: pytest.CaptureFixture[str], example: FleetDir, hosts: FakeTransport) -> None:
    code = cli.main(["--dir", str(example.root), "lock", "break", "--limit", "fritz", "--yes", "--json"])
    assert code == 1 and "prints no JSON" in capsys.readouterr().err
    assert hosts.calls == []


def test_breaking_a_lock_marks_its_run_interrupted_in_the_journal(
        capsys: pytest.CaptureFixture[str], example: FleetDir, hosts: FakeTransport) -> None:
    state = example.root / ".fleet"
    with Journal.open(journal_path(state)) as j:
        run = j.start_run(operator="alice@laptop", plan_id="p1", plan_hash="h", desired_hash="d", fleet="hachyderm",
                          lab=False)
    holder = holder_info("0123456789abcdef", "alice@laptop", run_id=run, plan_id="p1")
    hosts.respond("if [ -d", f"@@held\n{holder}\n", host="fritz")
    code = cli.main(["--dir", str(example.root), "lock", "break", "--limit", "fritz", "--yes"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Journal: run {run} marked interrupted (its lock was broken)" in out
    assert any("rm -rf" in c for c in hosts.commands("fritz"))
    with Journal.open(journal_path(state)) as j:
        closed = j.run(run)
    assert closed is not None and closed.outcome == "interrupted"
