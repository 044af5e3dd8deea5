"""Drop-ins, observed: the `*.conf` files in `/etc/systemd/system/UNIT.d/` of every declared unit,
with their sha256, shown on the unit's status cell (and so in `fleet audit`) as "has drop-ins".

The units section reports a unit's drop-ins as systemd has them loaded (DropInPaths); this one
reads the directory itself, so a drop-in written since the last daemon-reload — which changes
the unit at its next restart — is seen too.  fleet does not act on them here (a rewrite of a
managed unit removes the drop-ins in fleet's directory, fleet/resources/unit_file.py).

Section `@@dropins`: `sha256sum` lines, `SHA256  DIR/NAME.conf`; a name holding a backslash or a
line break comes escaped, the line starting with a backslash (as GNU sha256sum writes it).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fleet.collect.sections import Collected, SectionParser, too_much
from fleet.errors import ParseError
from fleet.model import Desired, HostState, template_of
from fleet.resources.base import Resource
from fleet.units import unit_path

MAX_DROP_INS = 1_000  # per host: a unit has a handful
SHOWN = 5  # drop-ins named in a status cell before "and N more"
_LINE = re.compile(r"([0-9a-f]{64})  (/.*/([^/\n]+)\.d/[^/]+\.conf)", re.DOTALL)
_ESCAPES = {"\\\\": "\\", "\\n": "\n", "\\r": "\r"}


@dataclass(frozen=True, order=True)
class DropIn:
    unit: str
    path: str
    sha256: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class DropIns(Resource):
    kind = "drop-ins"
    section = "dropins"

    def to_collect(self, desired: Desired, host: str) -> tuple[str, ...]:
        """The drop-in directory of each unit declared on the host (a template's, its instances',
        its wrapper's)."""
        return tuple(dict.fromkeys(f"{unit_path(u)}.d" for s in desired.services_on(host)
                                   for u in (s.unit, *s.all_units_on(host))))

    def script(self, what: Any) -> str:
        dirs = " ".join(shlex.quote(d) for d in what)
        return ("echo '@@dropins'\n"
                f"for d in {dirs}; do [ -d \"$d\" ] || continue; "
                "find \"$d\" -maxdepth 1 -name '*.conf' ! -type d -exec sha256sum -- {} + 2>/dev/null; "
                f"done | head -n {MAX_DROP_INS + 1}")

    def parser(self, host: str) -> SectionParser:
        return _DropInSection(host)

    def notes(self, state: HostState, unit: str) -> list[str]:
        found = state.facts_of(self.section)
        names = {unit, template_of(unit) or unit}  # an instance also reads its template's drop-ins
        mine = [d for d in found if isinstance(d, DropIn) and d.unit in names] if isinstance(found, tuple) else []
        if not mine:
            return []
        named = ", ".join(f"{d.name} sha256:{d.sha256[:8]}" for d in mine[:SHOWN])
        more = f" and {len(mine) - SHOWN} more" if len(mine) > SHOWN else ""
        return [f"has drop-ins: {named}{more}"]


class _DropInSection:
    def __init__(self, host: str) -> None:
        self.host = host
        self.found: list[DropIn] = []
        self.seen = False  # an output without the section (an older script's) did not look

    def section(self, arg: str, lines: Iterator[str]) -> None:
        self.seen = True
        if arg:
            raise ParseError(f"{self.host}: unexpected section 'dropins {arg[:40]}'", host=self.host,
                             section="dropins")
        for line in lines:
            if not line:
                continue
            if len(self.found) >= MAX_DROP_INS:
                raise too_much(self.host, "dropins", f"{MAX_DROP_INS:,} drop-ins")
            m = _LINE.fullmatch(_unescape(line[1:]) if line.startswith("\\") else line)
            if m is None:
                raise ParseError(f"{self.host}: unexpected line in drop-ins: {line[:80]!r}", host=self.host,
                                 section="dropins")
            self.found.append(DropIn(unit=m.group(3), path=m.group(2), sha256=m.group(1)))

    def finish(self, collected: Collected) -> None:
        if self.seen:
            collected.extra["dropins"] = tuple(sorted(self.found))


def _unescape(text: str) -> str:
    """sha256sum's escaping of a file name: \\\\ for a backslash, \\n for a line break."""
    return re.sub(r"\\[\\nr]", lambda m: _ESCAPES[m.group(0)], text)
