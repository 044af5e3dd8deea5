"""Sidekiq's own view, observed: its heartbeats and queues, read from the Sidekiq Redis in the
round trip fleet already makes to the host where that Redis is declared.

Where to read is `sidekiq.locate_redis` (the Redis host, and the env file the Sidekiq services
load, or `policy.sidekiq.env_file`); what to run and how to read it are `sidekiq.section_script`
and `sidekiq.parse_section`.  The view lands in `HostState.extra["sidekiq"]` of that one host;
status, audit and the snapshots read it from there (fleet/sidekiq.py: `sidekiq_report`).

A section fleet cannot read whole (a hostile entry in `processes`, a flood) is refused as a
view with an error, not as a host error: the Redis host's units and data stores are still
reported, and the status says why Sidekiq's view is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fleet.collect.sections import Collected, SectionParser
from fleet.errors import ParseError
from fleet.model import Desired, Kind
from fleet.resources.base import Resource
from fleet.sidekiq import SECTION, RedisSource, SidekiqView, locate_redis, parse_section, section_script


class SidekiqHeartbeats(Resource):
    kind = "sidekiq view"
    section = SECTION

    def to_collect(self, desired: Desired, host: str) -> str | None:
        """The env file to find Redis with, on the host of the declared Sidekiq Redis only."""
        # services_on is indexed: only a Redis host pays for locate_redis (a scan of the services).
        if not any(s.kind == Kind.REDIS for s in desired.services_on(host)):
            return None
        where = locate_redis(desired, desired.sidekiq_policy)
        return where.env_path if isinstance(where, RedisSource) and where.host == host else None

    def script(self, what: Any) -> str:
        return section_script(str(what))

    def parser(self, host: str) -> SectionParser:
        return _ViewSection(host)


class _ViewSection:
    def __init__(self, host: str) -> None:
        self.host = host
        self.view: SidekiqView | None = None  # None: not collected (an older script's output)

    def section(self, arg: str, lines: Iterator[str]) -> None:
        if arg:
            raise ParseError(f"{self.host}: unexpected section '{SECTION} {arg[:40]}'", host=self.host,
                             section=SECTION)
        try:
            self.view = parse_section(self.host, lines)
        except ParseError as e:
            for _ in lines:  # the rest of the section is skipped, bounded by the output's own cap
                pass
            self.view = SidekiqView(error=f"unreadable: {e.message}")

    def finish(self, collected: Collected) -> None:
        if self.view is not None:
            collected.extra[SECTION] = self.view
