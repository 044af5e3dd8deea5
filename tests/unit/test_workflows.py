"""The workflows (fleet/workflows/) return values and speak only through the reporter they are
given: called directly, with a recording reporter, they print nothing, ask their question of
the reporter, and a "no" or "nobody to ask" ends them without a change."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import FleetDir
from observed import EXAMPLE_SECRETS, bare, example

from fleet.errors import FleetError
from fleet.model import Finding
from fleet.plan import Plan
from fleet.transport.fake import FakeTransport
from fleet.workflows import observe as observing
from fleet.workflows.apply import ApplyOptions, apply
from fleet.workflows.base import Common, Scope
from fleet.workflows.lock import LockOptions, holder_info, lock
from fleet.workflows.observe import Observation


@dataclass
class Recorder:
    """A Reporter that keeps what it was told and answers questions with `answer`."""

    answer: bool | None = True
    notes: list[str] = field(default_factory=list)
    findings_seen: list[Finding] = field(default_factory=list)
    reviewed: list[Plan] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.notes.append(line)

    def progress(self, line: str) -> None:
        self.notes.append(line)

    def findings(self, findings: Sequence[Finding]) -> None:
        self.findings_seen += findings

    def review(self, plan: Plan) -> None:
        self.reviewed.append(plan)

    def confirm(self, question: str) -> bool | None:
        self.questions.append(question)
        return self.answer


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeTransport:
    """Every host behind a fake transport that grants locks; observing finds bare hosts."""
    transport = FakeTransport()
    transport.respond("mkdir -p", "@@locked\n")

    def observe(common: Any, scope: Any, command: str, desired: Any, targets: Any, t: Any, r: Any) -> Observation:
        return Observation({h.name: bare(example())[h.name] for h in targets.hosts}, "")

    monkeypatch.setattr(observing, "open_transport", lambda common, targets, scope: transport)
    monkeypatch.setattr(observing, "observe", observe)
    return transport


def secrets_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.toml"
    path.write_text("[mastodon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for (_, k), v in EXAMPLE_SECRETS.items()))
    path.chmod(0o600)
    return path


def changes_sent(fake: FakeTransport) -> list[str]:
    return [c for c in fake.commands() if "/var/lib/fleet/lock" not in c]


@pytest.mark.parametrize("answer", [False, None])
def test_an_apply_not_confirmed_changes_nothing_and_prints_nothing(
        capsys: pytest.CaptureFixture[str], example: FleetDir, tmp_path: Path, fake: FakeTransport,
        answer: bool | None) -> None:
    reporter = Recorder(answer=answer)
    options = ApplyOptions(Common.at(example.root), Scope(), secrets=secrets_file(tmp_path))
    if answer is None:  # nobody to ask: refused, never taken for a yes
        with pytest.raises(FleetError, match="no terminal to ask on"):
            apply(options, reporter)
    else:
        outcome = apply(options, reporter)
        assert outcome.cancelled and outcome.result is None and not outcome.ok
    [plan] = reporter.reviewed
    assert plan.changes and reporter.questions == [
        f"Apply these {len(plan.changes)} change(s) to {len({c.host for c in plan.changes})} host(s)?"]
    assert changes_sent(fake) == []
    assert any("rm -rf" in c for c in fake.commands()), "the locks it took are released"
    assert capsys.readouterr() == ("", "")


def test_lock_status_is_a_report_and_break_asks_the_reporter(
        capsys: pytest.CaptureFixture[str], example: FleetDir, fake: FakeTransport) -> None:
    fake.respond("if [ -d", "@@free\n")
    fake.respond("if [ -d", f"@@held\n{holder_info('0123456789abcdef', 'bob@desk')}\n", host="fritz")
    common = Common.at(example.root)
    report = lock(LockOptions(common, Scope()), Recorder())
    assert {r.host: r.lock for r in report.rows} == {"franz": "free", "freud": "free", "fritz": "locked",
                                                     "nietzsche": "free"}
    assert report.ok
    nobody = Recorder(answer=None)
    kept = lock(LockOptions(common, Scope(limit="fritz"), breaking=True), nobody)
    assert [(r.lock, r.ok) for r in kept.rows] == [("locked (kept)", False)] and not kept.ok
    assert nobody.questions and nobody.questions[0].startswith("fritz is locked by bob@desk from ")
    assert not any(c.startswith("rm -rf") for c in fake.commands("fritz"))
    assert capsys.readouterr() == ("", "")
