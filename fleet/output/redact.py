"""What may leave fleet in a chat message, a metrics file or a status page: secrets masked
*without* their fingerprints, webhook URLs cut to a recognisable stub.

fleet's own terminal output and journal show a secret as `(sensitive, sha256:1a2b3c4d)`: the
operator at the keyboard may compare fingerprints.  A chat channel, a status page on a phone and
a metrics scraper are read by more people and kept by third parties, so there even the 8 hex
digits go: a fingerprint of a low-entropy secret is a guessing oracle.  `redact` is the last line
of defence; the builders of those texts already leave values of sensitive keys out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from fleet.journal import scrub

SENSITIVE = "(sensitive)"

# fleet's mask, a bare `sha256:…` fingerprint (audit messages cut secrets to `sha256:` + 8 hex),
# and any long hex run (a full fingerprint that reached a text by another road).
_MASK = re.compile(r"\(sensitive(?:, sha256:[0-9a-fA-F]*)?\)")
_FINGERPRINT = re.compile(r"sha256:[0-9a-fA-F]{4,}")
_LONG_HEX = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{32,}(?![0-9A-Za-z])")
# user:password@ in any URL: the password goes, the user stays (it says which account).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@")


def redact(text: str, *, urls: Iterable[str] = ()) -> str:
    """`text` with every secret-looking `KEY=value` value, fingerprint, URL password and each of
    `urls` (webhook URLs: credentials) replaced.  Idempotent."""
    for url in sorted((u for u in urls if u), key=len, reverse=True):  # the longest first: one may prefix another
        text = text.replace(url, redact_url(url))
    text = scrub(text)
    text = _MASK.sub(SENSITIVE, text)
    text = _FINGERPRINT.sub(SENSITIVE, text)
    text = _LONG_HEX.sub(SENSITIVE, text)
    return _USERINFO.sub(r"\1:***@", text)


def redact_url(url: str) -> str:
    """A webhook URL as it may be shown: `https://discord.com/…a1b2` — scheme, host and the last
    4 characters, enough to tell two configured hooks apart and useless to post with."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        parts, host = None, ""
    tail = url.strip()[-4:] if len(url.strip()) > 12 else ""
    if parts is None or not parts.scheme or not host:
        return f"…{tail}" if tail else "…"
    return f"{parts.scheme}://{host}/…{tail}"
