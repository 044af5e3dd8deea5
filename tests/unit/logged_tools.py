"""Stand-ins for tools that log their own start, then run the real one: what a script starts is
counted, not guessed (tests/unit/test_host_processes.py, test_history.py)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path


def logging_tools(directory: Path, tools: Sequence[str]) -> Path:
    """In `directory` (made here), each of `tools` as a script that appends its name to the log,
    then execs the real one found on PATH; the log's path (it exists once a tool has started)."""
    directory.mkdir()
    log = directory / "started.log"
    for tool in tools:
        real = shutil.which(tool)
        assert real is not None, tool
        wrapper = directory / tool
        wrapper.write_text(f'#!/bin/sh\necho {tool} >>{log}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return log


def started(log: Path) -> list[str]:
    """The tools started, in the order they wrote to the log."""
    return log.read_text().split() if log.exists() else []
