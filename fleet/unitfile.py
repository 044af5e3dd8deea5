"""systemd's unit file syntax, read and written: the one parser of unit text in fleet.

A unit file is lines: `[Section]` headers, `Key=Value` assignments, comments (`#` or `;` first)
and blank lines.  A line ending in a backslash continues on the next one (the backslash becomes
a space and the next line is appended; comment lines inside a continuation are skipped, as
systemd does).  A key may be assigned many times: for list settings (`Environment=`,
`ExecStart=`, `RestrictAddressFamilies=` …) each assignment adds to the list and an empty one
resets it; for the others the last one wins.  This module keeps every assignment, in order, and
answers both questions (`values`, `value`), so that fleet can read what it needs from a unit it
does not model (ExecStart, EnvironmentFile, WorkingDirectory, User …) while writing the
operator's text byte for byte.

`render_directives` writes an ordered list of (section, key, value) back as unit text, and
`bad_specifiers` finds `%` sequences systemd would refuse (a literal percent sign is `%%`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Every %-specifier systemd 252 knows (systemd.unit(5), "Specifiers"); `%%` is a literal `%`.
SPECIFIERS = frozenset("aAbBCdDEfgGhHiIjJlLmMnNopPqsStTuUvVwWyY%")
# A drop-in's file name as fleet declares, writes and removes it: a plain `*.conf` directly in
# UNIT.d/ (no path parts, no leading dot, systemd's unit-name characters).
DROPIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9:_.@+-]{0,250}\.conf$")
MAX_LINES = 5000  # a unit is a few dozen lines; the collector refuses more (fleet/collect/script.py)
SECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,63}$")
KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,99}$")


class UnitSyntaxError(ValueError):
    """Text that is not a unit file: `line` is 1-based."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class Directive:
    section: str
    key: str
    value: str
    line: int  # 1-based line of the assignment's first line


@dataclass(frozen=True)
class UnitText:
    """A parsed unit file: every assignment, in file order."""

    directives: tuple[Directive, ...]
    sections: tuple[str, ...]  # in order of first appearance

    def assignments(self, section: str, key: str) -> list[str]:
        """Every value assigned to `key` in `section`, in order, empty ones included."""
        return [d.value for d in self.directives if d.section == section and d.key == key]

    def values(self, section: str, key: str) -> list[str]:
        """The list a list setting ends up with: each assignment adds, an empty one resets."""
        out: list[str] = []
        for v in self.assignments(section, key):
            if v == "":
                out = []
            else:
                out.append(v)
        return out

    def value(self, section: str, key: str) -> str | None:
        """A scalar setting: its last assignment (None when never assigned)."""
        found = self.assignments(section, key)
        return found[-1] if found else None


def parse(text: str) -> UnitText:
    """Parse unit text as systemd reads it; UnitSyntaxError for a line systemd would not accept
    (an assignment outside a section, a line that is neither header nor assignment)."""
    directives: list[Directive] = []
    sections: list[str] = []
    section: str | None = None
    pending: list[str] = []  # the parts of a continued line so far
    start = 0
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if pending:
            if line.startswith(("#", ";")):
                continue  # a comment inside a continuation is skipped
        elif not line or line.startswith(("#", ";")):
            continue
        if _continued(line):
            if not pending:
                start = n
            pending.append(line[:-1] + " ")
            continue
        if pending:
            line = "".join([*pending, line])
            pending = []
        else:
            start = n
        section = _take(line, start, section, sections, directives)
    if pending:  # the file ends in a backslash: systemd takes what came so far
        _take("".join(pending), start, section, sections, directives)
    return UnitText(tuple(directives), tuple(sections))


def _continued(line: str) -> bool:
    """Ends in a backslash that is not itself escaped (an odd number of them)."""
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def _take(line: str, n: int, section: str | None, sections: list[str], directives: list[Directive]) -> str | None:
    line = line.strip()
    if line.startswith("["):
        if not line.endswith("]") or len(line) < 3:
            raise UnitSyntaxError(f"malformed section header {line[:60]!r}", n)
        name = line[1:-1]
        if name not in sections:
            sections.append(name)
        return name
    key, eq, value = line.partition("=")
    if not eq:
        raise UnitSyntaxError(f"{line[:60]!r} is neither a [Section] header nor a Key=value line", n)
    if section is None:
        raise UnitSyntaxError(f"assignment {key.strip()[:60]!r} outside of any [Section]", n)
    directives.append(Directive(section, key.strip(), value.strip(), n))
    return section


def words(value: str) -> list[str]:
    """A command line or an Environment= value split as systemd splits it: by whitespace, with
    "double" and 'single' quotes grouping and C-style backslash escapes inside and outside them."""
    out: list[str] = []
    cur: list[str] = []
    in_word = False
    quote = ""
    it = iter(range(len(value)))
    for i in it:
        c = value[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and i + 1 < len(value):
                cur.append(_unescape(value[i + 1]))
                next(it, None)
            else:
                cur.append(c)
        elif c in " \t":
            if in_word:
                out.append("".join(cur))
                cur, in_word = [], False
        elif c in "\"'" and not cur:
            quote, in_word = c, True
        elif c == "\\" and i + 1 < len(value):
            cur.append(_unescape(value[i + 1]))
            next(it, None)
            in_word = True
        else:
            cur.append(c)
            in_word = True
    if in_word:
        out.append("".join(cur))
    return out


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "s": " "}


def _unescape(c: str) -> str:
    return _ESCAPES.get(c, c)


def environment(unit: UnitText, section: str = "Service") -> list[tuple[str, str]]:
    """The KEY=value pairs of the section's Environment= settings, later ones winning (as in systemd)."""
    pairs: dict[str, str] = {}
    for value in unit.values(section, "Environment"):
        for w in words(value):
            k, eq, v = w.partition("=")
            if eq and k:
                pairs[k] = v
    return list(pairs.items())


def environment_files(unit: UnitText, section: str = "Service") -> list[str]:
    """EnvironmentFile= paths, without systemd's `-` (a missing file is fine) prefix."""
    return [v[1:] if v.startswith("-") else v for v in unit.values(section, "EnvironmentFile")]


def exec_start(unit: UnitText) -> str:
    """The first command of ExecStart= (the one a Type=simple service runs), without systemd's
    prefix characters (`-`, `+`, `!`, `:`, `@`); "" when there is none."""
    commands = unit.values("Service", "ExecStart")
    if not commands:
        return ""
    return commands[0].lstrip("-+!:@")


def is_yes(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "yes", "y", "true", "t", "on")


def render_directives(directives: Sequence[tuple[str, str, str]]) -> str:
    """Unit text for (section, key, value) triples in the order given: a `[Section]` header
    whenever the section changes (a blank line before each but the first), one `Key=value` line
    per triple.  Repeated keys and sections stay as declared."""
    lines: list[str] = []
    section = None
    for sec, key, value in directives:
        if sec != section:
            if lines:
                lines.append("")
            lines.append(f"[{sec}]")
            section = sec
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n" if lines else ""


def bad_specifiers(value: str) -> list[str]:
    """The `%x` sequences in `value` that are no systemd specifier (`%` alone at the end too)."""
    out = []
    i = value.find("%")
    while i >= 0:
        nxt = value[i + 1:i + 2]
        if nxt not in SPECIFIERS or not nxt:
            out.append("%" + nxt)
            i = value.find("%", i + 1)
        else:
            i = value.find("%", i + 2)
    return out


def literal_percent(value: str) -> str:
    """`value` with every `%` that starts no specifier doubled, so that systemd reads it as the
    `%` it is; specifiers the operator wrote (`%i`, `%I`, `%h`, `%%` …) pass unchanged."""
    out: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == "%":
            nxt = value[i + 1:i + 2]
            if nxt and nxt in SPECIFIERS:
                out.append(c + nxt)
                i += 2
                continue
            out.append("%%")
        else:
            out.append(c)
        i += 1
    return "".join(out)


def check_lines(values: Iterable[str]) -> list[str]:
    """Values that cannot be one line of a unit file (a line break or another control character)."""
    return [v for v in values if any(ord(c) < 32 and c != "\t" for c in v)]
