"""Docs are tested: every command line shown in README.md and docs/*.md runs, against the lab.

What counts as a command line:
- in a fenced ```sh block (also `bash`, `shell`): every line that is not blank or a comment; a
  command goes on over the next lines while a quote is open or a line ends with `\\`, `|`, `&&`
  or `||`;
- in any other fenced block (```console, plain ```): a line starting with `$ ` (continued the
  same way);
- in the text: an inline code span starting with `fleet ` (it may wrap lines; `\\|` in a table is
  `|`).  A span may be a synopsis: `[…]` is optional and `a|b` are alternatives; the span runs
  once without the optional parts and once per alternative with all of them
  (`fleet audit [--since TIME|SNAPSHOT]` runs `fleet audit`, `… --since TIME`, `… --since SNAPSHOT`).
- `.venv/bin/fleet` is fleet.  The hints scripts/demo.sh prints at its end count too.

The exit status a command must end with is 0, unless the docs say otherwise where it is readable
in the rendered page: a block line's trailing comment that starts with `exit N`
(`fleet --lab plan   # exit 2: changes are pending`), or `(exit N)` right after an inline span.
A block line whose trailing comment starts with `destructive` (inline: `(destructive)` after the
span) is not run; DESTRUCTIVE must list exactly those.  Every command also fails on a Python
traceback in its output.

Placeholders — ALL-CAPS words such as HOST, FILE, A, B, TIME|SNAPSHOT, and the example values
`plan.json` and `/srv/fleet` — are substituted from PLACEHOLDERS with values from the lab run (a
snapshot id from `fleet history --json`, a plan written by `fleet plan -o`); a placeholder missing
from that table fails the test.  Commands that are not fleet's run only if RUN_OTHER allows them;
the rest must be in EXEMPT, with the reason: a command line that is neither fails the test.

How it runs: every fleet command gets the options the other lab tests use — the `fleet` console
script next to this Python, `--lab --dir WORK --state-dir STATE` — where WORK is a temporary copy
of the repository's desired_state.toml and hosts/ (a fresh one per block, so a block may edit it)
and STATE a state directory that starts empty, like a new clone's `.fleet`.  Blocks are scripts:
their lines run in order, through bash (`fleet` is a shell function adding those options), each
block from a fresh WORK; README.md first (DOC_ORDER_FIRST), then the other docs/*.md by name, then
the inline spans, then docs/LAB.md (DOC_ORDER_LAST).  So the lab goes through what a reader does:
scripts/demo.sh (README's first command, sharing STATE) boots bare hosts — the clean start; no
reset needed — and converges them, README boots a bare lab again and converges it, docs/audit.md
converges (already done: its apply has nothing to do), breaks and repairs it.  Then the inline
spans run, each distinct one once, on the converged fleet, ordered so that what they need comes
first (a plan before `fleet show FILE`, `lab down` before `lab up`).  docs/LAB.md comes last: it
boots bare hosts itself, converges them, rehearses an incident and ends with a bare lab; run before
the others, it left them a bare lab, and one more converge from bare (~12 s at the documented
settle), for no fact the test checks.  `fleet lab up` replaces the session's lab (there is one per
machine); at the end the session's lab is booted again (`Lab.up`), so later test modules find it
as the fixture left it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import fleet_argv

REPO = Path(__file__).resolve().parents[2]

# README first (its first command boots the lab), then the rest by name; how the lab works last
# (after the inline spans): it starts and ends with bare hosts, so the docs before it share one
# converged fleet.
DOC_ORDER_FIRST = ["README.md"]
DOC_ORDER_LAST = ["docs/LAB.md"]

TRACEBACK = "Traceback (most recent call last)"
TIMEOUT = 300  # seconds for one command line; every one ends well within it
DEMO_TIMEOUT = 900

# Lines that are not fleet commands and run anyway: regex on the command (continuation lines
# joined), why it is safe and how it runs.
DEMO = r"bash scripts/demo\.sh"
RUN_OTHER: list[tuple[str, str]] = [
    (DEMO, "README's first command; runs from the repository with the test's "
     "global options appended (the demo passes them to every fleet command it runs)"),
    (r"ip netns exec fleetlab-[a-z0-9-]+ ip link set host0 (down|up)", "the rehearsal cuts a lab host's network "
     "and restores it (a lab namespace only)"),
    (r"sed -i .* desired_state\.toml", "edits the block's temporary copy of the desired state"),
]

# Command lines shown but not run: regex on the command, and why.
EXEMPT: list[tuple[str, str]] = [
    (r"bash scripts/test\.sh", "the whole test suite, this test included"),
    (r"flock -x /tmp/fleet-lab-session\.lock (\.venv/bin/)?python -m pytest .*", "runs modules of this test "
     "suite (this one too), under the lab lock"),
    (r"([A-Z_]+=\S+ )*(\.venv/bin/)?python -m pytest .*", "runs tests of this suite (with CI=true: the check "
     "that no test skips, which CI itself does)"),
    (r"python -m bench( .*)?", "the benchmark: up to 12 minutes of lab time, run on its own (docs/PERFORMANCE.md)"),
    (r"python -m bench\.(report|core) .*", "the benchmark's report and profiler (docs/PERFORMANCE.md)"),
    (r"apt-get install .*", "installs Debian packages on the machine; scripts/setup.sh does that, and "
     "scripts/demo.sh runs it here"),
    (r"J=\.fleet/journal\.sqlite", "names the journal for the sqlite3 queries that follow"),
    (r"\(?(umask 077; )?sqlite3 .*", "needs the sqlite3 command-line tool, which is not a dependency of fleet "
     "(Debian package sqlite3; scripts/setup.sh does not install it)"),
]

# Command lines the docs mark destructive (not run): command -> why.  Must match the markers.
DESTRUCTIVE: dict[str, str] = {}

PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
EXIT_MARK = re.compile(r"exit (\d+)\b")
INLINE_MARK = re.compile(r"\s*\((exit (\d+)|destructive)\)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
SCRIPT_LANGUAGES = {"sh", "bash", "shell"}


# ============================================================== reading the docs


@dataclass(frozen=True)
class DocCommand:
    """One command line as shown in a doc."""

    where: str  # FILE:LINE
    text: str  # as written: a block line verbatim (continuations and comments kept); a span unescaped
    inline: bool
    exit: int = 0
    destructive: bool = False

    @property
    def code(self) -> str:
        """The command without comments, on one line (for matching RUN_OTHER and EXEMPT)."""
        return " ".join(shell_parts(self.text).code.replace("\\\n", " ").split())


@dataclass(frozen=True)
class Block:
    where: str
    commands: list[DocCommand]


@dataclass(frozen=True)
class Doc:
    path: str
    blocks: list[Block]
    spans: list[DocCommand]


@dataclass
class ShellParts:
    code: str = ""  # the text without comments
    comments: list[str] = field(default_factory=list)
    open_quote: bool = False
    words: list[tuple[int, int]] = field(default_factory=list)  # unquoted word spans in the text


def shell_parts(text: str) -> ShellParts:
    """Split shell text into code and comments, quote-aware (what bash would see as comments)."""
    parts = ShellParts()
    code: list[str] = []
    i, quote, word_start = 0, "", -1
    while i < len(text):
        c = text[i]
        if quote == "'":
            quote = "" if c == "'" else quote
        elif quote == '"':
            if c == "\\":
                code.append(text[i:i + 2])
                i += 2
                continue
            quote = "" if c == '"' else quote
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;|&("):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            parts.comments.append(text[i + 1:end].strip())
            i = end
            continue
        elif c in "'\"":
            quote = c
        elif c == "\\":
            code.append(text[i:i + 2])
            i += 2
            continue
        if not quote and c not in "'\"" and not c.isspace() and c not in ";|&()<>":
            if word_start < 0:
                word_start = i
        elif word_start >= 0:
            parts.words.append((word_start, i))
            word_start = -1
        code.append(c)
        i += 1
    if word_start >= 0:
        parts.words.append((word_start, len(text)))
    parts.code = "".join(code)
    parts.open_quote = bool(quote)
    return parts


def continues(text: str) -> bool:
    parts = shell_parts(text)
    code = parts.code.rstrip()
    return parts.open_quote or text.endswith("\\") or code.endswith(("|", "&&", "||"))


def marks(comments: list[str]) -> tuple[int, bool]:
    """(expected exit, destructive) from a line's trailing comment."""
    last = comments[-1] if comments else ""
    exit_mark = EXIT_MARK.match(last)
    return (int(exit_mark.group(1)) if exit_mark else 0), last.startswith("destructive")


def read_doc(path: Path) -> Doc:
    rel = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    lines = path.read_text().split("\n")
    blocks: list[Block] = []
    prose = list(lines)  # the text with fenced blocks blanked (line numbers kept)
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        marker, language = fence.group(1), fence.group(2)
        start = i
        body: list[tuple[int, str]] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(marker[0] * len(marker)):
            body.append((i + 1, lines[i]))
            i += 1
        for n in range(start, min(i + 1, len(lines))):
            prose[n] = ""
        i += 1
        commands = block_commands(rel, body, script=language in SCRIPT_LANGUAGES)
        if commands:
            blocks.append(Block(f"{rel}:{start + 1}", commands))
    return Doc(rel, blocks, inline_commands(rel, "\n".join(prose)))


def block_commands(rel: str, body: list[tuple[int, str]], *, script: bool) -> list[DocCommand]:
    commands: list[DocCommand] = []
    pending: list[str] = []
    first = 0
    for number, raw in body:
        line = raw.strip() if not pending else raw
        if not pending:
            if line.startswith("$ "):
                line = line[2:]
            elif not script or not line or line.startswith("#"):
                continue
            first = number
        pending.append(line)
        text = "\n".join(pending)
        if continues(text):
            continue
        exit_code, destructive = marks(shell_parts(text).comments)
        commands.append(DocCommand(f"{rel}:{first}", text, inline=False, exit=exit_code, destructive=destructive))
        pending = []
    if pending:
        raise AssertionError(f"{rel}:{first}: a command line never ends (open quote or continuation)")
    return commands


def inline_commands(rel: str, prose: str) -> list[DocCommand]:
    found = []
    for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, re.S):
        span = " ".join(m.group(2).split()).replace("\\|", "|")
        if not span.startswith("fleet "):
            continue
        mark = INLINE_MARK.match(prose, m.end())
        exit_code = int(mark.group(2)) if mark and mark.group(2) else 0
        destructive = bool(mark and mark.group(1) == "destructive")
        line = prose.count("\n", 0, m.start()) + 1
        found.append(DocCommand(f"{rel}:{line}", span, inline=True, exit=exit_code, destructive=destructive))
    return found


def doc_paths() -> list[Path]:
    rest = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
    middle = [r for r in rest if r not in DOC_ORDER_FIRST + DOC_ORDER_LAST]
    return [REPO / name for name in DOC_ORDER_FIRST + middle + DOC_ORDER_LAST]


def all_docs() -> list[Doc]:
    return [read_doc(p) for p in doc_paths()]


# ============================================================== synopses and placeholders


def variants(span: str) -> list[list[str]]:
    """The argv lists a synopsis stands for: without the optional parts, and with all of them
    once per alternative (the i-th variant takes the i-th alternative of each choice, or its last)."""
    tokens = re.findall(r"\[|\]|[^\s\[\]]+", span)

    def parse(pos: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        while pos < len(tokens):
            token = tokens[pos]
            if token == "[":
                group, pos = parse(pos + 1)
                items.append(("opt", group))
            elif token == "]":
                return items, pos + 1
            else:
                items.append(("word", token.split("|")))
                pos += 1
        return items, pos

    items, _ = parse(0)

    def widest(items: list[Any]) -> int:
        return max([1] + [len(x[1]) if x[0] == "word" else widest(x[1]) for x in items])

    def form(items: list[Any], pick: int, optional: bool) -> list[str]:
        out: list[str] = []
        for kind, value in items:
            if kind == "word":
                out.append(value[min(pick, len(value) - 1)])
            elif optional:
                out += form(value, pick, optional)
        return out

    forms = [form(items, 0, False)] + [form(items, i, True) for i in range(widest(items))]
    unique: list[list[str]] = []
    for f in forms:
        if f not in unique:
            unique.append(f)
    return unique


def placeholders_in(word: str) -> list[str]:
    """Placeholder names in one unquoted word: the whole word (HOST, plan.json), or the first
    part of a path (DIR/hosts)."""
    if word in EXAMPLE_VALUES or PLACEHOLDER.fullmatch(word):
        return [word]
    head = re.match(r"([A-Z][A-Z0-9_]*)/", word)
    return [head.group(1)] if head else []


def substitute_word(word: str, value: Callable[[str], str]) -> str:
    names = placeholders_in(word)
    return value(names[0]) + word[len(names[0]):] if names else word


def substitute_shell(text: str, value: Callable[[str], str]) -> str:
    """Replace the placeholders in the unquoted words of shell text, shell-quoted."""
    out, last = [], 0
    for start, end in shell_parts(text).words:
        word = text[start:end]
        if placeholders_in(word):
            out += [text[last:start], shlex.quote(substitute_word(word, value))]
            last = end
    return "".join(out) + text[last:]


def shell_placeholders(text: str) -> list[str]:
    return [name for start, end in shell_parts(text).words for name in placeholders_in(text[start:end])]


def is_fleet_command(text: str) -> bool:
    return any(text[s:e] in ("fleet", ".venv/bin/fleet") for s, e in shell_parts(text).words)


def matches(table: list[tuple[str, str]], command: DocCommand) -> str | None:
    return next((reason for pattern, reason in table if re.fullmatch(pattern, command.code)), None)


def classify(command: DocCommand) -> str:
    """run | exempt | destructive | unknown."""
    if command.destructive:
        return "destructive"
    if command.inline or is_fleet_command(command.text) or matches(RUN_OTHER, command):
        return "run"
    return "exempt" if matches(EXEMPT, command) else "unknown"


# ============================================================== running them


@dataclass
class Result:
    what: str  # where, and the command as run
    expected: int
    code: int | None
    output: str
    seconds: float = 0.0  # how long it ran: the report says where the test's time goes (not asserted)

    @property
    def problem(self) -> str | None:
        if self.code is None:
            return f"did not end within its timeout\n{tail(self.output)}"
        if TRACEBACK in self.output:
            return f"printed a traceback (exit {self.code})\n{tail(self.output, 40)}"
        if self.code != self.expected:
            return f"exited {self.code}, the docs say {self.expected}\n{tail(self.output)}"
        return None


def tail(text: str, n: int = 25) -> str:
    return "\n".join("    | " + line for line in text.rstrip().splitlines()[-n:])


PRELUDE = """\
fleet() { "$DOC_FLEET" --lab --dir "$DOC_WORK" --state-dir "$DOC_STATE" "$@"; }
export -f fleet
"""


class DocRun:
    """The state of one run through the docs: the state dir, work copies, values of placeholders."""

    def __init__(self, lab: Any, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.state = root / "state" / ".fleet"
        self.state.parent.mkdir(parents=True)
        self.exe = fleet_argv()[0]
        self.results: list[Result] = []
        self.hints: list[DocCommand] = []
        self._plan: Path | None = None
        self._works = 0
        self.work = self.fresh_work()

    # -- where commands run
    def fresh_work(self) -> Path:
        """A copy of the repository's desired state and inventory, for one block."""
        self._works += 1
        work = self.root / f"work-{self._works}"
        work.mkdir()
        shutil.copy2(REPO / "desired_state.toml", work / "desired_state.toml")
        shutil.copytree(REPO / "hosts", work / "hosts")
        self.work = work
        return work

    def global_options(self) -> list[str]:
        return ["--lab", "--dir", str(self.work), "--state-dir", str(self.state)]

    def fleet(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.exe, *self.global_options(), *args], cwd=self.work, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    # -- placeholders
    def value(self, name: str) -> str:
        if name not in PLACEHOLDERS:
            raise Unsubstituted(name)
        return PLACEHOLDERS[name][1](self)

    def snapshots(self) -> list[dict[str, Any]]:
        # `--snapshots`: the kept observations only, from the journal (no host is read, nothing
        # merged into the state dir as a side effect of looking a placeholder up; ~0.2 s, not ~0.8)
        done = self.fleet("history", "--snapshots", "--json")
        assert done.returncode == 0, done.stderr
        data: list[dict[str, Any]] = json.loads(done.stdout)["snapshots"]
        assert data, "no snapshot in the journal yet, but the docs name one here"
        return data

    def plan_file(self) -> str:
        """A plan written by `fleet plan -o` in this run (the first time one is needed)."""
        if self._plan is None:
            path = self.root / "plan.json"
            done = self.fleet("plan", "-o", str(path))
            assert done.returncode in (0, 2) and path.is_file(), f"fleet plan -o failed: {done.stderr}"
            self._plan = path
        return str(self._plan)

    # -- running
    def record(self, what: str, expected: int, run: Callable[[], subprocess.CompletedProcess[str]]) -> Result:
        started = time.monotonic()
        try:
            done = run()
            result = Result(what, expected, done.returncode, done.stdout + done.stderr)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            result = Result(what, expected, None, out.decode(errors="replace") if isinstance(out, bytes) else out)
        except Unsubstituted as e:
            result = Result(what, expected, -1, f"placeholder {e.args[0]} has no value in PLACEHOLDERS")
        result.seconds = time.monotonic() - started
        self.results.append(result)
        return result

    def shell(self, command: DocCommand) -> Result:
        text = re.sub(r"(?<![\w/.-])\.venv/bin/fleet(?=\s)", "fleet", command.text)

        def run() -> subprocess.CompletedProcess[str]:
            script = substitute_shell(text, self.value)
            env = {**os.environ, "DOC_FLEET": self.exe, "DOC_WORK": str(self.work), "DOC_STATE": str(self.state)}
            return subprocess.run(["bash", "-o", "pipefail", "-c", PRELUDE + script], cwd=self.work, env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)

        return self.record(f"{command.where}: {command.text}", command.exit, run)

    def inline(self, command: DocCommand, argv: list[str]) -> Result:
        def run() -> subprocess.CompletedProcess[str]:
            args = [substitute_word(word, self.value) for word in argv[1:]]
            return self.fleet(*args)

        return self.record(f"{command.where}: {shlex.join(argv)}", command.exit, run)

    def demo(self, command: DocCommand) -> Result:
        """scripts/demo.sh, from the repository, sharing this run's state dir; then its hints."""
        argv = ["bash", "scripts/demo.sh", *self.global_options()]
        result = self.record(f"{command.where}: {shlex.join(argv)}", command.exit, lambda: subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=DEMO_TIMEOUT, stdin=subprocess.DEVNULL))
        self.hints = demo_hints(result.output)
        for hint in self.hints:
            self.shell(hint)
        return result

    @property
    def problems(self) -> list[str]:
        return [f"{r.what}\n  {r.problem}" for r in self.results if r.problem]


class Unsubstituted(Exception):
    pass


def latest(run: DocRun, by: str | None = None, back: int = 0) -> str:
    snaps = [s for s in run.snapshots() if by is None or s["command"] == by]
    assert len(snaps) > back, f"fewer than {back + 1} snapshot(s){' by ' + by if by else ''} in the journal"
    return str(snaps[-1 - back]["id"])


def newest_taken(run: DocRun) -> str:
    """The newest snapshot's time, in a form `--since` documents (UTC, to the second)."""
    return str(run.snapshots()[-1]["taken"]).replace("T", " ").rstrip("Z")


# name -> (what it stands for, its value in this run)
PLACEHOLDERS: dict[str, tuple[str, Callable[[DocRun], str]]] = {
    "HOST": ("a lab host", lambda run: "fritz"),
    "COMMAND": ("a command for `fleet lab ssh HOST [COMMAND]`", lambda run: "true"),
    "DIR": ("the project directory: the work copy", lambda run: str(run.work)),
    "/srv/fleet": ("an example project directory: the work copy", lambda run: str(run.work)),
    "STATE": ("the state directory", lambda run: str(run.state)),
    "FILE": ("a plan file", DocRun.plan_file),
    "PLAN": ("a plan file", DocRun.plan_file),
    "plan.json": ("a plan file", DocRun.plan_file),
    "A": ("a snapshot: the one before the newest", lambda run: latest(run, back=1)),
    "B": ("a snapshot: the newest", lambda run: latest(run)),
    "SNAPSHOT": ("a snapshot: the newest", lambda run: latest(run)),
    "S": ("the snapshot of the last `fleet audit`", lambda run: latest(run, "audit")),
    "S2": ("the snapshot of the last `fleet audit`", lambda run: latest(run, "audit")),
    "TIME": ("a time: the newest snapshot's", newest_taken),
    "T": ("a time: the newest snapshot's", newest_taken),
}
EXAMPLE_VALUES = {name for name in PLACEHOLDERS if not PLACEHOLDER.fullmatch(name)}


def demo_hints(output: str) -> list[DocCommand]:
    """The commands scripts/demo.sh tells the reader to try next (its last lines)."""
    ending = output[output.rfind("The lab stays up"):] if "The lab stays up" in output else ""
    return [DocCommand("scripts/demo.sh (its hints)", hint, inline=False)
            for hint in re.findall(r"`([^`]*fleet [^`]*)`", ending)]


def inline_rank(argv: list[str]) -> int:
    """Order of the inline spans on the converged fleet: a plan is written before it is read,
    reads before changes, and the lab's own lifecycle last (down before up)."""
    words = [w for w in argv[1:] if not w.startswith("-")]
    sub = words[:2]
    if sub[:1] == ["plan"] and ("-o" in argv or "--out" in argv):
        return 0
    if sub[:1] == ["apply"]:
        return 2
    if sub == ["lock", "break"]:
        return 3
    if sub[:1] == ["lab"]:
        return {"down": 5, "up": 6}.get(sub[1] if len(sub) > 1 else "", 4)
    return 1


# ============================================================== offline: the inventory


def test_the_extractor_follows_the_documented_conventions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.md"
    sample.write_text(
        "Run `fleet plan [-o FILE]` or\n`fleet lock status\\|break --limit\n HOST` (exit 1) and `fleet lab ssh` "
        "(destructive); not `pip install`.\n\n"
        "```sh\nfleet lab up     # boots\n# a comment\nprintf '%s\\n' 'a b' \\\n  'c' |\n"
        "  fleet lab ssh fritz 'cat; exit 3'   # exit 3: the remote status\n```\n\n"
        "```\n$ fleet check   # exit 1\nerror: output is not a command\n```\n"
    )
    doc = read_doc(sample)
    assert [(c.text, c.exit, c.destructive) for c in doc.spans] == [
        ("fleet plan [-o FILE]", 0, False),
        ("fleet lock status|break --limit HOST", 1, False),
        ("fleet lab ssh", 0, True),
    ]
    assert [[(c.text, c.exit) for c in b.commands] for b in doc.blocks] == [
        [("fleet lab up     # boots", 0),
         ("printf '%s\\n' 'a b' \\\n  'c' |\n  fleet lab ssh fritz 'cat; exit 3'   # exit 3: the remote status", 3)],
        [("fleet check   # exit 1", 1)],
    ]
    assert variants("fleet plan [-o FILE]") == [["fleet", "plan"], ["fleet", "plan", "-o", "FILE"]]
    assert variants("fleet audit [--since TIME|SNAPSHOT] [--format text|md|json]") == [
        ["fleet", "audit"], ["fleet", "audit", "--since", "TIME", "--format", "text"],
        ["fleet", "audit", "--since", "SNAPSHOT", "--format", "md"],
        ["fleet", "audit", "--since", "SNAPSHOT", "--format", "json"],
    ]
    assert shell_placeholders("fleet --lab diff S2 now 'NOT A' # HOST") == ["S2"]
    assert placeholders_in("DIR/hosts") == ["DIR"] and placeholders_in("plan.json") == ["plan.json"]
    assert substitute_shell("fleet diff A 'A' B", lambda n: f"<{n}>") == "fleet diff '<A>' 'A' '<B>'"


def test_every_command_line_in_the_docs_is_run_or_exempted() -> None:
    docs = all_docs()
    commands = [c for d in docs for b in d.blocks for c in b.commands] + [c for d in docs for c in d.spans]
    assert len(commands) > 100, "the docs show more command lines than this: is the extractor broken?"
    unknown = [f"{c.where}: {c.text}" for c in commands if classify(c) == "unknown"]
    assert not unknown, ("neither run nor exempted (add them to RUN_OTHER or EXEMPT, with the reason):\n"
                         + "\n".join(unknown))
    marked = {c.code for c in commands if c.destructive}
    assert marked == set(DESTRUCTIVE), "the docs' destructive marks and DESTRUCTIVE differ"
    used = [p for p, _ in EXEMPT if any(re.fullmatch(p, c.code) for c in commands if classify(c) == "exempt")]
    assert used == [p for p, _ in EXEMPT], f"EXEMPT entries that match nothing: {set(p for p, _ in EXEMPT) - set(used)}"
    missing = sorted({
        f"{c.where}: {name}" for c in commands if classify(c) == "run"
        for name in (
            [n for argv in variants(c.text) for w in argv for n in placeholders_in(w)] if c.inline
            else shell_placeholders(c.text)
        )
        if name not in PLACEHOLDERS
    })
    assert not missing, "placeholders with no substitution in PLACEHOLDERS:\n" + "\n".join(missing)


# ============================================================== `fleet lab ssh`, as the docs use it


def lab_cli(lab: Any, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`fleet lab ssh …` through the console script, as README and the demo tell users to run it."""
    argv = [*fleet_argv(), "--dir", str(lab.repo), "--state-dir", str(lab.state_dir), "lab", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


def test_fleet_lab_ssh_runs_the_command_and_exits_with_its_status(lab: Any) -> None:
    done = lab_cli(lab, "ssh", "franz", "hostname; exit 7", stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout) == (7, "franz\n"), done.stderr
    state = lab_cli(lab, "ssh", "franz", "systemctl", "is-system-running", stdin=subprocess.DEVNULL)
    assert TRACEBACK not in state.stderr
    assert (state.stdout.strip(), state.returncode) in {("running", 0), ("degraded", 1)}, state.stderr


def test_fleet_lab_ssh_without_a_command_runs_a_login_shell_on_stdin(lab: Any) -> None:
    done = lab_cli(lab, "ssh", "franz", input="echo hello from $(hostname); exit 3\n")
    assert TRACEBACK not in done.stderr
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.endswith("\nhello from franz\n"), done.stdout  # after the login banner (motd)


def test_fleet_lab_ssh_without_a_command_on_a_terminal_gets_a_terminal(lab: Any) -> None:
    argv = [*fleet_argv(), "--dir", str(lab.repo), "--state-dir", str(lab.state_dir), "lab", "ssh", "franz"]
    primary, secondary = pty.openpty()
    process = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    output = b""
    try:
        os.write(primary, b"tty; exit 4\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1)
            if not ready:
                continue
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: every process holding the terminal has ended
                break
            if not chunk:
                break
            output += chunk
        code = process.wait(timeout=30)
    finally:
        os.close(primary)
        if process.poll() is None:
            process.kill()
    text = output.decode(errors="replace")
    assert TRACEBACK not in text
    assert code == 4, text
    assert re.search(r"/dev/pts/\d+\r\n", text), text  # `tty` answered: the shell has a terminal


def test_python_m_fleet_lab_drives_the_same_lab(lab: Any) -> None:
    base = [sys.executable, "-m", "fleet.lab", "--dir", str(lab.repo), "--state-dir", str(lab.state_dir)]
    status = subprocess.run([*base, "status", "--json"], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert status.returncode == 0, status.stdout + status.stderr
    assert sorted(h["name"] for h in json.loads(status.stdout)["hosts"]) == lab.names
    ssh = subprocess.run([*base, "ssh", "freud", "hostname; exit 5"], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert (ssh.returncode, ssh.stdout) == (5, "freud\n"), ssh.stderr


# ============================================================== on the lab: every command line


@pytest.fixture
def doc_run(lab: Any, tmp_path: Path) -> Iterator[DocRun]:
    """A run through the docs; afterwards the session's lab is booted again for later modules
    (the docs' `fleet lab up`/`down` replace it or take it down)."""
    run = DocRun(lab, tmp_path)
    try:
        yield run
    finally:
        again = lab.up()
        assert again.returncode == 0, f"the session's lab did not come back:\n{again.stdout}\n{again.stderr}"


def run_blocks(run: DocRun, docs: list[Doc]) -> bool:
    """Every block of these docs, in order, each from a fresh WORK; True if the demo ran."""
    ran_demo = False
    for doc in docs:
        for block in doc.blocks:
            run.fresh_work()
            for command in block.commands:
                kind = classify(command)
                if kind != "run":
                    assert kind in ("exempt", "destructive"), f"{command.where}: {command.text}: {kind}"
                    continue
                if re.fullmatch(DEMO, command.code):
                    run.demo(command)
                    ran_demo = True
                else:
                    run.shell(command)
    return ran_demo


def test_every_documented_command_line_runs_as_documented(doc_run: DocRun) -> None:
    run = doc_run
    docs = all_docs()
    last = [d for d in docs if d.path in DOC_ORDER_LAST]
    assert [d.path for d in last] == DOC_ORDER_LAST, "a doc of DOC_ORDER_LAST is missing"
    ran_demo = run_blocks(run, [d for d in docs if d.path not in DOC_ORDER_LAST])

    # The inline spans, each distinct command once, on the converged fleet.
    run.fresh_work()
    converge = run.fleet("apply", "--yes")
    assert converge.returncode == 0, f"could not converge before the inline spans:\n{converge.stderr}"
    seen: set[tuple[str, ...]] = set()
    spans = [(argv, c) for d in docs for c in d.spans if not c.destructive for argv in variants(c.text)]
    for argv, command in sorted(spans, key=lambda ac: inline_rank(ac[0])):
        if tuple(argv) not in seen:
            seen.add(tuple(argv))
            run.inline(command, argv)

    # docs/LAB.md's blocks: they boot bare hosts themselves (`fleet lab up` runs `down` first).
    ran_demo = run_blocks(run, last) or ran_demo

    report = run.root / "doc-commands.txt"
    report.write_text("".join(f"== exit {r.code} (expected {r.expected}, {r.seconds:.1f} s): {r.what}\n{r.output}\n"
                              for r in run.results))
    problems = run.problems
    assert not problems, (f"{len(problems)} of {len(run.results)} documented command lines failed "
                          f"(all of them, with their output: {report}):\n\n" + "\n\n".join(problems))
    assert ran_demo, "README's `bash scripts/demo.sh` was not run"
    assert any("lab ssh fritz" in h.text for h in run.hints), f"the demo's hints: {run.hints}"
    assert len(run.results) > 80, f"only {len(run.results)} command lines ran"

