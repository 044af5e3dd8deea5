"""The .env file format, both ways: how fleet writes a value and how it reads one back.

Mastodon's .env.production is read by two parsers: systemd's EnvironmentFile= and Ruby's
dotenv.  fleet writes values in the subset both agree on: bare when the value only holds
safe characters, otherwise double-quoted with `\\`, `"`, `$` and newlines escaped.  Reading
accepts what people write by hand too (single quotes, `export`, inline comments).

Secrets are compared by fingerprint: the sha256 of the value *as written in the file* (the
raw text after `=`), which the collector computes on the host so the value never travels.
"""

from __future__ import annotations

import re

from fleet.errors import FleetError
from fleet.textutil import sha256_hex

# The one rule for an env variable name, from every source (values, overrides, sensitive keys,
# policy.env.extra_keys, a unit's Environment=, the secrets file): a name that could hold a line
# break, `=` or a space would let one declared key write a second line into the file.
ENV_KEY = re.compile(r"[A-Za-z0-9_]{1,128}")
ENV_KEY_HINT = "use letters, digits and underscores (at most 128)"
_BARE = re.compile(r"^[A-Za-z0-9_./:@,+=%-]*$")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\", "$": "$"}


def key_problem(key: str) -> str | None:
    """Why `key` cannot be an env variable name, or None when it can: the validator every key
    fleet reads or writes goes through."""
    if ENV_KEY.fullmatch(key):
        return None
    return f"{key!r} is not a valid environment variable name"


def render_value(value: str) -> str:
    """The text fleet writes after `KEY=` for `value`."""
    if _BARE.fullmatch(value):
        return value
    # A newline stays a real newline inside the quotes: systemd's EnvironmentFile= and dotenv both
    # read a quoted value across lines, while `\n` would mean a newline to one and not the other.
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{out}"'


def parse_value(raw: str) -> str:
    """The value a raw `KEY=raw` text stands for (inverse of render_value)."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        inner, out, i = raw[1:-1], [], 0
        while i < len(inner):
            c = inner[i]
            if c == "\\" and i + 1 < len(inner) and inner[i + 1] in _ESCAPES:
                out.append(_ESCAPES[inner[i + 1]])
                i += 2
            else:
                out.append(c)
                i += 1
        return "".join(out)
    # unquoted: an inline comment starts at whitespace followed by '#'
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def fingerprint(value: str) -> str:
    """sha256 of the raw text fleet would write: what the collector reports for a secret."""
    return sha256_hex(render_value(value))


def render_file(items: list[tuple[str, str]], header: str = "") -> str:
    """A whole env file: a header comment, then KEY=value lines in the given order."""
    for k, _ in items:  # validated when loaded; this is the last line of defence before a host
        problem = key_problem(k)
        if problem:
            raise FleetError(problem, hint=ENV_KEY_HINT)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{k}={render_value(v)}" for k, v in items]
    return "\n".join(lines) + "\n"
