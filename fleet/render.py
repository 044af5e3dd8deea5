"""Turning plain data into text for humans: strings only, no I/O."""

from __future__ import annotations

import os
from collections.abc import Sequence

from fleet.model import Finding


def use_color(stream_isatty: bool) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream_isatty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _paint(text: str, code: str, color: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if color else text


def finding_location(f: Finding) -> str:
    loc = f.file or ""
    if f.line is not None:
        loc += f":{f.line}" + (f":{f.column}" if f.column is not None else "")
    return loc


def findings_text(findings: Sequence[Finding], *, color: bool = False) -> str:
    """Errors first, then warnings; each with where, what, and how to fix it."""
    lines: list[str] = []
    ordered = sorted(findings, key=lambda f: (not f.is_error, f.file, f.line or 0))
    for f in ordered:
        label = _paint(f"{f.severity}:", "31;1" if f.is_error else "33;1", color)
        where = finding_location(f)
        head = f"{label} {where}" + (f" [{f.key}]" if f.key else "")
        lines.append(head.rstrip())
        lines.append(f"  {f.message}")
        if f.hint:
            lines.append(f"  hint: {f.hint}")
    return "\n".join(lines)


def findings_summary(findings: Sequence[Finding]) -> str:
    errors = sum(f.is_error for f in findings)
    warnings = len(findings) - errors
    return f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
