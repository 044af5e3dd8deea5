"""The whole-process benchmark runs (`python -m bench --quick --no-core`), so that it cannot rot.

It is run as a user runs it, in its own process, at its smallest sizes; what it measures is
reported, never asserted: this checks that every command ran, at every size and scenario, with
the exit status it should have, and that a growth exponent came out for each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

COMMANDS = {"status --observed", "plan --observed", "plan --observed -o", "show"}


def test_the_quick_whole_process_benchmark_runs_every_command(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-core", "--work", str(tmp_path),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = json.loads(out.read_text())["whole"]
    cases = whole["cases"]
    assert not [c for c in cases if "error" in c], [c["error"] for c in cases if "error" in c][:3]
    for n in (10, 20):
        for scenario in ("converged", "drift", "bare"):
            got = {c["command"] for c in cases if c["hosts"] == n and c["scenario"] == scenario}
            assert got == COMMANDS, (n, scenario, got)
        assert {c["command"] for c in cases if c["hosts"] == n and c["scenario"] == "-"} == {"check", "--help"}
    saved = [c for c in cases if c["command"] == "plan --observed -o"]
    assert all(c["plan_file_bytes"] for c in saved)
    assert len(whole["growth"]) == 3 * len(COMMANDS) + 2  # one step, 10 → 20, per (scenario, command)
    assert "## whole fleet processes" in done.stdout
