"""Small pure helpers shared by the loader, the policies and the renderers, and the JSON text
every document fleet writes is made of (`indented_json`)."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterable
from json.encoder import encode_basestring_ascii
from types import GeneratorType
from typing import Any

# What a terminal acts on instead of showing: C0 controls (ESC starts colour, cursor moves, OSC
# titles and links; CR and BS overwrite a line), DEL, C1 controls (0x9b is a one-byte CSI), and
# the Unicode line separators and bidirectional overrides that reorder or break what is shown.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and
    transpositions each cost 1 (so `3_BUCKET`→`S3_BUCKET` is 1, `frtiz`→`fritz` is 1)."""
    a, b = a.lower(), b.lower()
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def damerau_levenshtein(a: str, b: str) -> int:
    """The fewest insertions, deletions, substitutions and adjacent transpositions that turn `a`
    into `b`, letter case ignored.  Unlike `edit_distance` (optimal string alignment) a later edit
    may touch what an earlier one produced: `ACTIVE` → `ATIVE` → `TAIVE` is 2 here, 3 there, which
    matters when "two slips" is the rule.  (Lowrance–Wagner.)"""
    a, b = a.lower(), b.lower()
    big = len(a) + len(b)
    # d[i + 1][j + 1]: the distance between a[:i] and b[:j]; row and column 0 hold `big` as a sentinel
    d = [[big] * (len(b) + 2) for _ in range(len(a) + 2)]
    for i in range(len(a) + 1):
        d[i + 1][1] = i
    for j in range(len(b) + 1):
        d[1][j + 1] = j
    last_row: dict[str, int] = {}  # the last row of `a` (1-based) holding each character
    for i in range(1, len(a) + 1):
        last_col = 0  # the last column of `b` in this row whose character matched a[i - 1]
        for j in range(1, len(b) + 1):
            k, col = last_row.get(b[j - 1], 0), last_col
            cost = 0 if a[i - 1] == b[j - 1] else 1
            if cost == 0:
                last_col = j
            d[i + 1][j + 1] = min(d[i][j] + cost, d[i + 1][j] + 1, d[i][j + 1] + 1,
                                  d[k][col] + (i - k - 1) + 1 + (j - col - 1))
        last_row[a[i - 1]] = i
    return d[len(a) + 1][len(b) + 1]


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate, if it is close enough to be a plausible typo."""
    best: tuple[int, str] | None = None
    for cand in candidates:
        d = edit_distance(word, cand)
        if best is None or d < best[0]:
            best = (d, cand)
    if best is None:
        return None
    limit = max(1, min(3, len(word) // 3))
    return best[1] if best[0] <= limit else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    s = suggest(word, candidates)
    return f"did you mean {s}?" if s else ""


def digits(text: str) -> bool:
    """ASCII digits only, at least one: a number as int() reads it.  str.isdigit() also says yes
    to '¹' or '①', on which int() raises: never enough for text from a file, a plan or a host."""
    return text.isascii() and text.isdigit()


def mask(value: str) -> str:
    """How a secret is shown anywhere fleet prints or stores it."""
    return f"(sensitive, sha256:{sha256_hex(value)[:8]})"


def sha256_hex(value: str | bytes) -> str:
    import hashlib

    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str, *, multiline: bool = True) -> str:
    """`text` as it is safe to show on a terminal: every control character spelled out, ESC as
    the four characters `\\x1b`, so that nothing read from a file or a host can colour, move,
    hide or rewrite what a reviewer sees.  Tabs are kept (they only move to the next column);
    `multiline` keeps newlines too (unit file diffs, tables), a single-line field (a name, a key,
    one line of a listing) does not.  Applied to human output only:
    JSON escapes control characters itself and stays exact."""
    pattern = _CONTROL_BUT_LINES if multiline else _CONTROL
    return pattern.sub(_escape, text) if pattern.search(text) else text


def is_printable(text: str, *, multiline: bool = True) -> bool:
    """`printable(text, multiline=...)` would return `text` as it is: nothing in it to escape.
    (With `multiline`, true of a text exactly when it is true of each of its lines alone.)"""
    return not (_CONTROL_BUT_LINES if multiline else _CONTROL).search(text)


MAX_SECONDS = 86400.0  # a day: longer than any wait fleet has a reason for; bigger overflows timers


def seconds_option(*, zero_ok: bool = False) -> Callable[[str], float]:
    """An argparse `type=` for a duration in seconds: finite, above 0 (or 0 when `zero_ok`), at
    most a day.  nan, inf and -1 would reach timers and shell arithmetic as OverflowError, a
    negative wait or "timed out after -5s"; argparse names the option in its error."""
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0) and value <= MAX_SECONDS):
            least = "0 or more" if zero_ok else "above 0"
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds {least} and at most "
                                             f"{MAX_SECONDS:.0f} (a day)")
        return value

    return seconds


def positive_int_option(text: str) -> int:
    """An argparse `type=` for a count that must be at least 1 (e.g. --forks)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def accept_queued_option(text: str) -> int:
    """An argparse `type=` for apply's --accept-queued: a whole number of jobs, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of jobs (0 or more): give the count of "
                                         "queued jobs the halted move reported")
    return value


_string = encode_basestring_ascii  # json's own C function for a string, as json.dumps writes it


def indented_json(value: Any, newline: str = "\n") -> str:
    """`json.dumps(value, indent=2)`, the same text, at C speed for the strings.  json's own
    indenting encoder is written in Python and, given a plan's whole dict, keeps every change's
    dict alive at once: for a first install of 1,000 hosts (62,000 changes, 55 MB) it took longer
    than planning.  A generator stands for a list whose items are made and written one by one.
    `newline` is a newline and the indentation of the line `value` starts on."""
    if type(value) is str:
        return _string(value)
    if type(value) is dict and (not value or set(map(type, value)) == {str}):
        if not value:
            return "{}"
        inner = newline + "  "
        return "{" + inner + ("," + inner).join([
            _string(k) + ": " + (_string(v) if type(v) is str else indented_json(v, inner))
            for k, v in value.items()]) + newline + "}"
    if type(value) in (list, tuple, GeneratorType):
        inner = newline + "  "
        items = [_string(v) if type(v) is str else indented_json(v, inner) for v in value]
        return "[" + inner + ("," + inner).join(items) + newline + "]" if items else "[]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return int.__repr__(value)
    # Anything else (floats, subclasses, dicts with other keys, what json refuses): json itself;
    # its lines only need this line's indentation, since no JSON string holds a raw newline.
    return json.dumps(value, indent=2).replace("\n", newline)
