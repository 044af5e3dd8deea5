"""`fleet log`: the journal's steps, oldest first, with the runs they belong to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fleet.journal import Journal, RunRecord, StepRecord, journal_path, parse_since
from fleet.workflows.base import Common


@dataclass(frozen=True)
class LogOptions:
    common: Common
    host: str | None = None  # only steps on this host
    since: str | None = None  # only steps since then (journal.parse_since)


@dataclass(frozen=True)
class LogResult:
    journal: Path
    exists: bool  # False: nothing was ever applied from this state directory
    steps: tuple[StepRecord, ...] = ()
    runs: tuple[RunRecord, ...] = ()


def log(options: LogOptions) -> LogResult:
    path = journal_path(options.common.state_dir)
    if not path.exists():
        return LogResult(path, exists=False)
    since = parse_since(options.since) if options.since else None
    with Journal.open(path) as journal:
        return LogResult(path, True, tuple(journal.steps(host=options.host, since=since)), tuple(journal.runs()))
