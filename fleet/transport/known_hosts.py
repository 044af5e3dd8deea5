"""known_hosts files and the verdict on a host key a server offers.

Owns parsing (plain, comma lists, `[addr]:port`, hashed `|1|salt|hmac`, `*`/`?` wildcards,
`!negation`, `@revoked`; `@cert-authority` lines are kept but never trusted), appending a newly
accepted key (hashed when the config asks for HashKnownHosts), the verdict on an offered key
(known, unknown, changed, other-type, revoked) and the refusal messages saying how to verify a
key.  Keys are compared as raw blobs, so nothing here needs paramiko: a key type paramiko
cannot parse does not break the file.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from fleet.errors import TransportError
from fleet.transport.protocol import quote

log = logging.getLogger(__name__)

DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
DEFAULT_KNOWN_HOSTS: tuple[str, ...] = (DEFAULT_USER_KNOWN_HOSTS, DEFAULT_GLOBAL_KNOWN_HOSTS)



def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob: `SHA256:` + unpadded base64."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def blob_key_type(blob: bytes) -> str:
    """The key type name embedded at the start of an SSH public key blob."""
    if len(blob) < 4:
        return "?"
    length = int.from_bytes(blob[:4], "big")
    return blob[4 : 4 + length].decode("ascii", "replace")


def hostkey_name(address: str, port: int) -> str:
    """How known_hosts names a host: `address` on port 22, `[address]:port` otherwise."""
    address = address.lower()
    return address if port == 22 else f"[{address}]:{port}"


def hash_hostname(name: str, salt: bytes) -> str:
    """The `|1|salt|hmac` form OpenSSH writes with HashKnownHosts (HMAC-SHA1, base64)."""
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    b64 = base64.b64encode
    return f"|1|{b64(salt).decode()}|{b64(digest).decode()}"


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        parts = pattern.split("|")
        if len(parts) != 4:
            return False
        try:
            salt = base64.b64decode(parts[2])
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hash_hostname(name, salt), pattern)
    return fnmatch.fnmatchcase(name, pattern.lower())


@dataclass(frozen=True)
class KnownKey:
    """One usable line of a known_hosts file."""

    file: str
    line: int
    patterns: tuple[str, ...]
    key_type: str
    blob: bytes
    marker: str = ""  # "", "@revoked" or "@cert-authority"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def matches(self, name: str) -> bool:
        """Whether this line applies to `name` (already in `hostkey_name` form)."""
        name = name.lower()
        matched = False
        for pattern in self.patterns:
            if pattern.startswith("!"):
                if _pattern_matches(pattern[1:], name):
                    return False  # a negated pattern vetoes the whole line
            elif _pattern_matches(pattern, name):
                matched = True
        return matched


class KnownHosts:
    """The parsed contents of one known_hosts file (plain, hashed, `[addr]:port`, wildcard and
    negated patterns, `@revoked`; `@cert-authority` lines are kept but never trusted)."""

    def __init__(self, path: str, keys: Sequence[KnownKey] = ()) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._exact: dict[str, list[KnownKey]] = {}
        self._scan: list[KnownKey] = []
        self._lines = 0
        for key in keys:
            self._index(key)

    def _index(self, key: KnownKey) -> None:
        self._lines = max(self._lines, key.line)
        if all(not p.startswith(("|", "!")) and not any(c in p for c in "*?") for p in key.patterns):
            for pattern in key.patterns:
                self._exact.setdefault(pattern.lower(), []).append(key)
        else:
            self._scan.append(key)

    @classmethod
    def load(cls, path: str) -> KnownHosts:
        """Parse `path`; a missing or unreadable file is an empty set of keys."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot read known_hosts file %s: %s", path, exc)
            return cls(path)
        return cls.parse(path, text)

    @classmethod
    def parse(cls, path: str, text: str) -> KnownHosts:
        keys: list[KnownKey] = []
        lineno = 0
        for lineno, raw in enumerate(text.splitlines(), start=1):
            fields = raw.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = ""
            if fields[0].startswith("@"):
                marker, fields = fields[0], fields[1:]
            if len(fields) < 3:
                continue
            try:
                blob = base64.b64decode(fields[2], validate=True)
            except (binascii.Error, ValueError):
                log.debug("%s:%d: not a key, skipped", path, lineno)
                continue
            keys.append(KnownKey(path, lineno, tuple(fields[0].split(",")), fields[1], blob, marker))
        known = cls(path, keys)
        known._lines = lineno
        return known

    def lookup(self, name: str) -> list[KnownKey]:
        """Every line that applies to `name`, in file order."""
        name = name.lower()
        with self._lock:
            found = list(self._exact.get(name, ()))
            found += [key for key in self._scan if key.matches(name)]
        return sorted(found, key=lambda k: k.line)

    def append(self, name: str, key_type: str, blob: bytes, *, hashed: bool = False) -> KnownKey:
        """Record a key for `name` at the end of the file (created 0600, parent 0700)."""
        field0 = hash_hostname(name.lower(), os.urandom(20)) if hashed else name.lower()
        line = f"{field0} {key_type} {base64.b64encode(blob).decode()}\n"
        with self._lock:
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "r+b") as f:
                existing = f.read()
                prefix = b"\n" if existing and not existing.endswith(b"\n") else b""
                f.write(prefix + line.encode())
            self._lines = existing.count(b"\n") + (1 if prefix else 0) + 1
            key = KnownKey(self.path, self._lines, (field0,), key_type, blob)
        with self._lock:
            self._index(key)
        return key


@dataclass(frozen=True)
class HostKeyCheck:
    """The verdict on an offered host key: known, unknown, changed, other-type or revoked.

    `stored` is the known_hosts line the verdict rests on (None when unknown).
    """

    verdict: str
    stored: KnownKey | None = None

    @property
    def trusted(self) -> bool:
        return self.verdict == "known"


def check_host_key(entries: Sequence[KnownKey], blob: bytes) -> HostKeyCheck:
    """Judge the offered key `blob` against the known_hosts lines that apply to the host.

    Like OpenSSH: a matching @revoked line refuses, a matching plain line accepts, a plain line
    with the same key type but another key means the key CHANGED.  A host for which only keys
    of other types are known is refused too ("other-type") rather than treated as new: the
    transport asks for the known types first, so the server no longer offering them is news.
    """
    key_type = blob_key_type(blob)
    plain = [e for e in entries if not e.marker]
    for entry in entries:
        if entry.marker == "@revoked" and entry.blob == blob:
            return HostKeyCheck("revoked", entry)
    for entry in plain:
        if entry.blob == blob:
            return HostKeyCheck("known", entry)
    for entry in plain:
        if blob_key_type(entry.blob) == key_type:
            return HostKeyCheck("changed", entry)
    if plain:
        return HostKeyCheck("other-type", plain[0])
    return HostKeyCheck("unknown")


def _host_key_pub_path(key_type: str) -> str:
    short = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa", "ssh-dss": "dsa"}.get(key_type)
    if short is None:
        short = "ecdsa" if key_type.startswith("ecdsa-") else key_type
    return f"/etc/ssh/ssh_host_{short}_key.pub"


def hostkey_error(
    name: str, address: str, port: int, blob: bytes, check: HostKeyCheck, record_to: str | None
) -> TransportError:
    """The refusal for an offered host key that is not trusted, saying how to verify it."""
    key_type = blob_key_type(blob)
    offered = f"{key_type} {fingerprint(blob)}"
    where = f"{name} ({address}:{port})"
    verify = (
        f"verify on the host's console that `ssh-keygen -lf {_host_key_pub_path(key_type)}` "
        f"prints {fingerprint(blob)} (`ssh-keyscan -p {port} {address} | ssh-keygen -lf -` "
        "shows what the network offers)"
    )
    stored = check.stored
    if check.verdict == "unknown":
        target = record_to or DEFAULT_USER_KNOWN_HOSTS
        return TransportError(
            name,
            "hostkey",
            f"host key of {where} is not known; the server offered {offered}",
            hint=(
                f"{verify}; then add it to {target} "
                f"(`ssh-keyscan -p {port} {address} >> {target}`) "
                "or re-run with --accept-new-host-keys"
            ),
        )
    assert stored is not None
    known = f"{blob_key_type(stored.blob)} {stored.fingerprint} ({stored.where})"
    remove = f"`ssh-keygen -R {quote(hostkey_name(address, port))} -f {quote(stored.file)}`"
    if check.verdict == "revoked":
        return TransportError(
            name,
            "hostkey",
            f"host key of {where} is REVOKED: {offered} is marked @revoked at {stored.where}",
            hint="the host offers a key that was explicitly revoked; do not connect until the "
            "host's keys have been regenerated and verified",
        )
    if check.verdict == "changed":
        return TransportError(
            name,
            "hostkey",
            f"host key of {where} has CHANGED (possible man-in-the-middle attack): the server "
            f"offered {offered}, known_hosts has {known}",
            hint=f"if the host was legitimately reinstalled, {verify}, then remove the old line "
            f"with {remove} and accept the new key; fleet never replaces a known key itself",
        )
    return TransportError(
        name,
        "hostkey",
        f"host key of {where} does not match: the server offered {offered}, but known_hosts "
        f"only has keys of another type for it, e.g. {known}",
        hint=f"{verify}; if the host's keys really changed, remove the old lines with {remove} and accept the new key",
    )

