"""What a kind's section of the collection output is parsed with (fleet/resources/ hold the kinds).

The collection output is `@@NAME [ARG]` sections (fleet/collect/script.py).  The facts and the
systemd units are parsed by fleet/collect/parse.py itself; every other section belongs to the
kind of resource whose `section` is NAME, which gets a `SectionParser` per host: each of its
sections is handed over as it is met (lines are produced lazily, never a list of the whole
output), and at the end the parser puts what it found into the host's `Collected`.

A parser keeps what it reads bounded (`capped`, `too_much`): a host that prints 100 MB costs a
parse error, not 100 MB of memory (docs/RELIABILITY.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleet.errors import ParseError
from fleet.model import EnvFileState


@dataclass
class Collected:
    """What one host's kind sections yielded, filled by their parsers: the typed env files, and
    per-kind facts (`HostState.extra`) for kinds that have no field of their own."""

    host: str
    env_files: tuple[EnvFileState, ...] = ()
    known_env: dict[str, str] = field(default_factory=dict)  # path -> the offered hash the script said it has
    extra: dict[str, Any] = field(default_factory=dict)


class SectionParser(Protocol):
    def section(self, arg: str, lines: Iterator[str]) -> None:
        """One `@@NAME ARG` section of this kind; ParseError on anything unexpected."""
        ...

    def finish(self, collected: Collected) -> None:
        """Every section seen: put what was found into `collected`."""
        ...


def too_much(host: str, section: str, what: str) -> ParseError:
    return ParseError(f"{host}: the {section} section of the collection output holds more than {what}; "
                      "fleet refuses it", host=host,
                      section=section, hint="the host printed far more than its units and env files; inspect "
                                            "it by hand (a shell profile or a wrapper printing to stdout?)")


def capped(lines: Iterable[str], limit: int, host: str, section: str) -> Iterator[str]:
    for n, line in enumerate(lines):
        if n >= limit:
            raise too_much(host, section, f"{limit:,} lines")
        yield line


def to_int(s: str) -> int:
    """A number a host printed, or 0: a malformed number is not worth refusing the host for."""
    try:
        return int(s.strip() or 0)
    except ValueError:
        return 0
