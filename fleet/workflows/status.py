"""`fleet status`: what runs where, live — the fleet observed and compared with the desired state."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fleet.status import StatusReport, build_status
from fleet.targets import resolve
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Reporter, Scope
from fleet.workflows.check import load_valid


@dataclass(frozen=True)
class StatusOptions:
    common: Common
    scope: Scope
    observed: str | None = None  # show this kept observation (a file or snapshot id), contacting no host


@dataclass(frozen=True)
class StatusResult:
    report: StatusReport
    snapshot_id: str

    @property
    def complete(self) -> bool:
        """Every host answered."""
        return not self.report.unreachable


def status(options: StatusOptions, reporter: Reporter) -> StatusResult:
    common = options.common
    desired = load_valid(common, reporter)
    targets = resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=options.scope.limit)
    seen, quiet = observing.now_or_kept(common, options.scope, "status", desired, desired, targets, options.observed,
                                        reporter)
    return StatusResult(build_status(replace(desired, hosts=targets.hosts), seen.results, quiet=quiet),
                        seen.snapshot_id)
