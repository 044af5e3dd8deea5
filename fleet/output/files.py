"""Writing a file others read while fleet rewrites it: whole or not at all.

node_exporter's textfile collector, a web server serving the status page and a restarted
`fleet watch` reading its outbox may all open the file at any moment.  So the new content goes
to a temporary file in the same directory (same file system: the rename is atomic), is flushed
to disk, and replaces the old file by one rename; the directory is synced so that the rename
itself survives a power cut.  A reader sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from fleet.errors import FleetError


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, what: str = "the file") -> None:
    """Replace `path` by `data` atomically, with permissions `mode`.  The temporary file is
    `.NAME.XXXX.tmp`: hidden, and not ending in `.prom` or `.html`, so no collector or server
    picks it up half-written.  Failure is a FleetError naming the file; no temporary file is left."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = ""
        _sync_directory(directory)
    except OSError as e:
        raise FleetError(f"cannot write {what} {target}: {e.strerror or e}",
                         hint=f"check that {directory} exists and is writable, and the free space") from None
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some file systems do not let a directory be opened; the rename is done anyway
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
