"""What an apply did, step by step, as plain data: the executor (fleet/apply.py) makes it, the
renderer (fleet/output/) and the CLI read it.  Kept apart from the executor so that reading
results never loads what executing needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet.actions import Change


@dataclass
class StepOutcome:
    change: Change
    outcome: str  # ok | failed | skipped
    error: str = ""
    detail: str = ""  # e.g. the unit's last journal lines
    duration: float = 0.0
    rollback: str = ""


@dataclass
class ApplyResult:
    run_id: str
    outcomes: list[StepOutcome] = field(default_factory=list)

    @property
    def failed(self) -> list[StepOutcome]:
        return [o for o in self.outcomes if o.outcome == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed and not any(o.outcome == "skipped" for o in self.outcomes)
