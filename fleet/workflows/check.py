"""`fleet check`: the desired state and the inventory loaded, and every policy applied, offline;
and `load_valid`, the same check as the first step of every command that acts on the fleet."""

from __future__ import annotations

from dataclasses import dataclass

from fleet import config, policy
from fleet.errors import FleetError
from fleet.model import Desired, Finding
from fleet.output.text import findings_summary
from fleet.workflows.base import Common, Reporter


@dataclass(frozen=True)
class CheckResult:
    desired: Desired | None  # None: the files could not be read as a desired state at all
    findings: tuple[Finding, ...]  # every finding at once: host files, the desired state, the policies

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.is_error]


def check(common: Common) -> CheckResult:
    loaded, findings = config.load_checked(common.desired, common.hosts, policy.check)
    return CheckResult(loaded.desired, tuple(findings))


def load_valid(common: Common, reporter: Reporter) -> Desired:
    """The desired state for commands that act on it: any error-level finding stops them (the
    errors are shown through the reporter, the summary is the error)."""
    result = check(common)
    if result.errors or result.desired is None:
        reporter.findings(result.errors)
        raise FleetError(f"the desired state has {findings_summary(result.errors)}",
                         hint="fix them (see `fleet check`)")
    return result.desired
