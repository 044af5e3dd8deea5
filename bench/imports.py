"""The fixed cost of every `fleet` invocation: interpreter start and imports.

Each case is a fresh `python -c CODE` process (median of several), CPU from wait4.  Stubbing
`networkx` with an empty module shows what `fleet status` would pay if networkx were imported
only where plans are ordered (fleet.config imports it at module level for one cycle check of
`requires`, which the standard library's graphlib can do).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

_STUB_NX = "import sys, types; sys.modules['networkx'] = types.ModuleType('networkx'); "

CASES: tuple[tuple[str, str], ...] = (
    ("python -c pass", "pass"),
    ("import networkx", "import networkx"),
    ("import paramiko (as the transport does, invoke blocked)", "import fleet.transport.ssh"),
    ("import tabulate", "import tabulate"),
    ("import fleet.cli (what every fleet command pays)", "import fleet.cli"),
    ("import fleet.cli, networkx stubbed", _STUB_NX + "import fleet.cli"),
    ("what status needs (config, policy, targets, collector, transport, status), networkx stubbed",
     _STUB_NX + "import fleet.config, fleet.policy, fleet.targets, fleet.collect.collector, "
                "fleet.transport.ssh, fleet.status, fleet.lab.lifecycle"),
)


def _one(code: str) -> tuple[float, float]:
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.execv(sys.executable, [sys.executable, "-c", code])
        finally:
            os._exit(127)
    _, _, usage = os.wait4(pid, 0)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def measure(repeats: int = 9) -> list[dict[str, Any]]:
    out = []
    for label, code in CASES:
        samples = [_one(code) for _ in range(repeats)]
        out.append({"case": label, "code": code, "wall_median_s": statistics.median(s[0] for s in samples),
                    "cpu_median_s": statistics.median(s[1] for s in samples), "repeats": repeats})
    return out
