"""The machine and software a result was measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def details(repo: Path) -> dict[str, Any]:
    mem_kb = _first("/proc/meminfo", "MemTotal").split()[0]
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(int(mem_kb) / 2**20, 1) if mem_kb.isdigit() else "?",
        "kernel": platform.release(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "os": _first_os(),
        "python": platform.python_version(),
        "paramiko": _version("paramiko"),
        "cryptography": _version("cryptography"),
        "networkx": _version("networkx"),
        "openssh": _run(["ssh", "-V"]),
        "fleet_commit": _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "loadavg": os.getloadavg(),
    }


def _first_os() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "?"
