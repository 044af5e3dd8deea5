"""The shape issue 13 gave the code, held by tests: actions are compared only inside the kinds
of resource that own them, every action has exactly one owner, and the layers import downwards
(the renderer does not load the executor; the journal and the audit do not load the diff;
the core does not load the lab).

Read from the syntax tree of fleet/, so a comment or a string does not count."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Collection, Iterable
from pathlib import Path

import pytest

from fleet.actions import Action
from fleet.resources.base import Resource
from fleet.resources.registry import BY_ACTION, RESOURCES

REPO = Path(__file__).resolve().parents[2]
FLEET = REPO / "fleet"
OWNERS = {"fleet/actions.py"}  # the vocabulary itself; and everything under fleet/resources/


def _outside_resources() -> list[Path]:
    return [p for p in FLEET.rglob("*.py") if p.relative_to(REPO).as_posix() not in OWNERS
            and "resources" not in p.relative_to(FLEET).parts]


def _action_dispatch(path: Path) -> list[str]:
    """Where `path` names an action member (Action.START) or compares something with an action
    (`x.action == …`, `action in (…)`, or with one of the actions' own strings)."""
    values = {a.value for a in Action}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Action"
                and node.attr.isupper()):
            found.append(f"{where}: Action.{node.attr}")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = {o.attr if isinstance(o, ast.Attribute) else o.id if isinstance(o, ast.Name) else None
                     for o in operands}
            strings = {c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)}
            if "action" in names or strings & values:
                found.append(f"{where}: {ast.unparse(node)}")
    return found


def test_no_code_outside_the_resources_switches_on_an_action() -> None:
    assert [hit for p in _outside_resources() for hit in _action_dispatch(p)] == []


def test_the_dispatch_check_sees_a_switch_on_an_action(tmp_path: Path) -> None:
    """The probe above finds what it looks for."""
    probe = FLEET / "resources" / "unit_state.py"  # the one place such a switch belongs
    assert any("Action.START" in hit for hit in _action_dispatch(probe))
    assert any(".action" in hit for hit in _action_dispatch(probe))


def test_every_action_has_exactly_one_resource() -> None:
    owners = [a for r in RESOURCES for a in r.actions]
    assert sorted(owners) == sorted(Action) and set(BY_ACTION) == set(Action)
    assert all(isinstance(r, Resource) and r.kind for r in RESOURCES)
    assert len({r.kind for r in RESOURCES}) == len(RESOURCES)
    sections = [r.section for r in RESOURCES if r.section]
    assert len(set(sections)) == len(sections)
    assert not {"facts", "units", "hashes", "text", "fleet", "end", "file", "truncated"} & set(sections)


def _module_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:  # statements at module level only
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(("module", "must_not"), [
    ("output/text", "fleet.apply"),
    ("output/json", "fleet.apply"),
    ("output/markdown", "fleet.apply"),
    ("journal", "fleet.diff"),
    ("audit", "fleet.diff"),
    ("targets", "fleet.lab"),
    ("results", "fleet.apply"),
])
def test_a_layer_does_not_import_the_one_above_it(module: str, must_not: str) -> None:
    imported = _module_level_imports(FLEET / f"{module}.py")
    assert not {n for n in imported if n == must_not or n.startswith(must_not + ".")}


def _probe(probe: str) -> list[str]:
    """What a fresh interpreter running `probe` printed, as words (the probe prints the modules
    it loaded, after any first word of its own)."""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60,
                          check=True, stdin=subprocess.DEVNULL)
    return done.stdout.split()


def _among(loaded: Iterable[str], packages: Collection[str]) -> set[str]:
    """The modules of `loaded` that are one of `packages` or inside one."""
    return {m for m in loaded for n in packages if m == n or m.startswith(n + ".")}


@pytest.mark.parametrize(("module", "never"), [
    ("fleet.output.text", ("fleet.apply", "fleet.transport.ssh", "fleet.lab")),
    ("fleet.targets", ("fleet.lab",)),
    ("fleet.journal", ("fleet.diff", "fleet.apply")),
    ("fleet.audit", ("fleet.diff", "fleet.apply")),
])
def test_importing_a_module_loads_nothing_above_it(module: str, never: tuple[str, ...]) -> None:
    probe = f"import sys, {module}\nprint(*sorted(m for m in sys.modules if m.startswith('fleet')))"
    loaded = set(_probe(probe))
    assert module in loaded
    assert not _among(loaded, never)


# What `fleet --help` and `fleet check` never need: the libraries of tables, graphs and SSH, the
# lab's machinery (its parser is part of --help, its booting is not), the collector and plans;
# and, for a desired state without [watch] (the example's), the notifications.
NOT_FOR_HELP_OR_CHECK = {"paramiko", "networkx", "tabulate", "fleet.lab.lifecycle", "fleet.lab.image",
                         "fleet.lab.machines", "fleet.collect.collector", "fleet.collect.parse", "fleet.plan",
                         "fleet.transport.ssh", "fleet.notify"}
# Nor the standard library's modules fleet needs for one rarely-used function (issue 19, ninth
# round): importlib.resources (with tempfile and zipfile) for one data file, secrets (with random)
# to make a secret, hashlib (OpenSSL, ~4 ms) to hash, difflib to show a drifted unit file.
NOT_AT_START_UP = {"importlib.resources", "tempfile", "zipfile", "secrets", "random", "hashlib", "_hashlib",
                   "difflib"}


@pytest.mark.parametrize("argv", [["--help"], ["check"], ["check", "--json"]])
def test_help_and_check_load_neither_paramiko_networkx_nor_tabulate(argv: list[str]) -> None:
    """The CLI imports per command: `fleet --help` and `fleet check` draw no table, plan nothing
    and connect to nothing, so they do not pay for the libraries that do (issue 19)."""
    probe = ("import contextlib, io, sys\nfrom fleet import cli\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             f"    code = cli.main({['--dir', str(REPO), *argv]!r})\n"
             "print(code, *sorted(sys.modules))")
    code, *loaded = _probe(probe)
    assert code == "0"
    assert not _among(loaded, NOT_FOR_HELP_OR_CHECK)
    assert not _among(loaded, NOT_AT_START_UP)


def test_planning_and_rendering_a_plan_load_neither_networkx_paramiko_nor_tabulate() -> None:
    """Ordering a plan is fleet's own code (fleet.graph); networkx draws a graph only to name a
    cycle.  `plan --observed` and `show` pay for no import they do not use (issue 19)."""
    probe = ("import sys\nsys.path.insert(0, 'tests/unit')\n"
             "from observed import EXAMPLE_SECRETS, bare, example\n"
             "from fleet.output.text import plan_text\nfrom fleet.plan import build_plan, plan_from_json\n"
             "plan = build_plan(example(), bare(example()), EXAMPLE_SECRETS)\n"
             "plan_text(plan_from_json(plan.to_json(), 'plan.json'))\n"
             "print(len(plan.waves), *sorted(sys.modules))")
    waves, *loaded = _probe(probe)
    assert int(waves) > 1
    assert not _among(loaded, ("networkx", "paramiko", "tabulate"))


def test_a_plan_from_a_kept_observation_loads_no_collector_transport_history_or_notifications(
        tmp_path: Path) -> None:
    """`plan --observed FILE` reads a file and contacts no host: the collector, the transport,
    the hosts' history and (without [watch]) the notifications are not imported (issue 19)."""
    probe = ("import contextlib, io, json, sys\nsys.path.insert(0, 'tests/unit')\n"
             "from observed import EXAMPLE_SECRETS, bare, example\n"
             "from fleet import snapshot\n"
             f"obs, secrets = {str(tmp_path / 'obs.json')!r}, {str(tmp_path / 'secrets.toml')!r}\n"
             "open(obs, 'w').write(json.dumps({'observation': snapshot.to_record(bare(example()))}))\n"
             "open(secrets, 'w').write('[mastodon]\\n' + ''.join(f'{k} = {json.dumps(v)}\\n'"
             " for (_, k), v in EXAMPLE_SECRETS.items()))\n"
             "import os\nos.chmod(secrets, 0o600)\n"
             "before = set(sys.modules)\n"
             "from fleet import cli\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n"
             f"    code = cli.main(['--dir', {str(REPO)!r}, 'plan', '--observed', obs, '--secrets', secrets])\n"
             "print(code, *sorted(set(sys.modules) - before))")
    code, *loaded = _probe(probe)
    assert code == "2"  # changes: a bare fleet
    assert not _among(loaded, ("fleet.collect.collector", "fleet.history", "fleet.history_cache", "fleet.transport",
                               "fleet.notify", "paramiko", "networkx", "tabulate"))
    # a plan hashes (hashlib) and diffs the unit files it writes (difflib), and writes no file
    # without -o; it makes no secret and reads fleet's data file without importlib.resources
    assert not _among(loaded, NOT_AT_START_UP - {"hashlib", "_hashlib", "difflib"})
