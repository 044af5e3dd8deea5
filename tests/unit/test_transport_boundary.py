"""The transport's boundary: paramiko is imported by fleet.transport.ssh alone, and only code
that opens a connection imports that module, so rendering, planning, `fleet check` and the
package itself never load paramiko (~90 ms of CPU on every invocation)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "fleet"
HEAVY = ("paramiko", "invoke", "cryptography", "nacl", "bcrypt")


def loaded_after(code: str) -> list[str]:
    """The heavy modules (paramiko and what it pulls in) loaded by `code` in a fresh interpreter."""
    probe = (f"{code}\nimport sys\n"
             f"print('@@heavy', *sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", probe], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=True, stdin=subprocess.DEVNULL)
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("@@heavy")]
    return line.split()[1:]


@pytest.mark.parametrize("module", ["fleet.output.text", "fleet.output.json", "fleet.cli", "fleet.transport",
                                    "fleet.apply", "fleet.collect.collector", "fleet.transport.fake",
                                    "fleet.transport.config", "fleet.transport.known_hosts"])
def test_importing_loads_no_paramiko(module: str) -> None:
    assert loaded_after(f"import {module}") == []


def test_importing_the_ssh_transport_does_load_paramiko() -> None:
    """The probe above can see paramiko when it is there."""
    assert "paramiko" in loaded_after("import fleet.transport.ssh")


def test_a_command_that_connects_to_nothing_loads_no_paramiko() -> None:
    code = f"from fleet import cli\nassert cli.main(['check', '--dir', {str(REPO)!r}]) in (0, 1)"
    assert loaded_after(code) == []


def importers_of(module: str) -> set[str]:
    """Files under fleet/ with an import statement of `module` or a submodule of it (by the
    syntax tree: a comment or a string naming it does not count)."""
    found = set()
    for path in FLEET.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]  # from a import b
            else:
                continue
            if any(name == module or name.startswith(module + ".") for name in names):
                found.add(path.relative_to(REPO).as_posix())
    return found


def test_paramiko_is_imported_by_the_ssh_transport_alone() -> None:
    assert importers_of("paramiko") == {"fleet/transport/ssh.py"}


def test_the_ssh_transport_is_imported_only_where_a_connection_is_opened() -> None:
    assert importers_of("fleet.transport.ssh") == {"fleet/workflows/observe.py"}
