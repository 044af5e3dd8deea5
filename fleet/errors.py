"""The exception hierarchy: one root, each error carrying the context a 3 a.m. reader needs.

Per-host outcomes are values (see fleet.collect); these exceptions are for conditions that
stop a whole command, or that a caller converts into a per-host value.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error fleet raises on purpose.  `hint` says what to do about it."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(FleetError):
    """The desired state or inventory cannot be loaded at all (a missing file or directory)."""

    def __init__(self, message: str, *, file: str = "", key: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.file = file
        self.key = key


class TransportError(FleetError):
    """Talking to one host failed.  `kind` is one of: unreachable, auth, hostkey, timeout,
    protocol, sudo, output-too-large."""

    def __init__(self, host: str, kind: str, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.host = host
        self.kind = kind


class ParseError(FleetError):
    """Output from a host did not have the expected shape."""

    def __init__(self, message: str, *, host: str = "", section: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.host = host
        self.section = section


class LabError(FleetError):
    """The local lab fleet could not be built, booted or torn down."""
