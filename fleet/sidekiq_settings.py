"""Sidekiq as it reads its settings: its command line and its YAML config file.  Pure.

Sidekiq 7 (lib/sidekiq/cli.rb) takes `-c N`, `-q QUEUE[,WEIGHT]` (repeatable), `-C FILE`,
`-r DIR` and `-e ENV`; without `-C` it reads `config/sidekiq.yml` (or `config/sidekiq.yml.erb`)
under the `-r` directory, else under its working directory.  Options on the command line win
over the file (`-q` replaces the file's queue list); the file's `ENV:` section (`production:`)
wins over its top level; without any queue the process serves `default`.

The config file is YAML run through ERB first.  fleet evaluates nothing: it reads the subset
Sidekiq configs use — a top-level mapping whose keys may be symbols (`:concurrency: 25`) or not,
`queues` as a block or flow list of names, `"name,weight"` strings or `[name, weight]` pairs,
and environment sections holding the same keys — and says what it could not read (ERB in a value
fleet needs, anchors, control flow) instead of guessing.  Everything under other keys
(`:schedule:`, `:scheduler:` …) is skipped unread.  Why not PyYAML: fleet would still have to
refuse ERB before parsing, the subset is ~150 lines, and the project adds no dependency for that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Queue = tuple[str, int | None]


@dataclass(frozen=True)
class SidekiqArgs:
    """What a Sidekiq command line says (None: not given)."""

    concurrency: int | None
    queues: tuple[Queue, ...]
    config: str | None = None  # -C
    require: str | None = None  # -r
    environment: str | None = None  # -e
    timeout: float | None = None  # -t: seconds it waits for busy jobs on a stop

    def queues_weighted(self) -> tuple[tuple[str, int], ...]:
        """The -q queues with weights as Sidekiq's heartbeat shows them (0: none given)."""
        return tuple((q, w or 0) for q, w in self.queues)


def is_sidekiq(argv: Sequence[str]) -> bool:
    return any(a.rsplit("/", 1)[-1] == "sidekiq" for a in argv)


# Sidekiq 7's options that take a value (lib/sidekiq/cli.rb), by their one-letter name.
_LONG = {"--concurrency": "c", "--queue": "q", "--config": "C", "--require": "r", "--environment": "e",
         "--timeout": "t"}
_SHORT = frozenset(_LONG.values())


def parse_argv(argv: Sequence[str]) -> SidekiqArgs | None:
    """The Sidekiq options of a command line (`[bundle exec] sidekiq …`); None when it does not run
    Sidekiq.  The one reader of Sidekiq's argv in fleet: the declaration (fleet check), status, the
    audit and Sidekiq's own view all read a command line through it.  Read as Ruby's OptionParser
    does: `-c 5`, `-c5`, `--concurrency 5`, `--concurrency=5` (and `-c=5`, which older fleet read);
    `-q NAME[,WEIGHT]` repeats; only what follows the `sidekiq` word counts.  A value that is not a
    number where one is needed is None (not given)."""
    start = next((i for i, a in enumerate(argv) if a.rsplit("/", 1)[-1] == "sidekiq"), None)
    if start is None:
        return None
    queues: list[Queue] = []
    opts: dict[str, str] = {}
    it = iter(argv[start + 1:])
    for a in it:
        opt, eq, inline = a.partition("=")
        if opt in _LONG:
            name, value = _LONG[opt], inline if eq else next(it, "")
        elif len(a) >= 2 and a[0] == "-" and a[1] in _SHORT:
            glued = a[2:]
            name = a[1]
            value = glued[1:] if glued.startswith("=") else glued if glued else next(it, "")
        else:
            continue
        if name == "q":
            queues.append(_queue(value))
        else:
            opts[name] = value  # a repeated option: the last one wins, as in Sidekiq
    timeout = _to_int(opts["t"]) if "t" in opts else None
    return SidekiqArgs(_to_int(opts["c"]) if "c" in opts else None, tuple(q for q in queues if q[0]),
                       opts.get("C"), opts.get("r"), opts.get("e"), float(timeout) if timeout is not None else None)


def _queue(spec: str) -> Queue:
    name, _, weight = spec.partition(",")
    return name, _to_int(weight) if weight else None


def _to_int(s: str) -> int | None:
    """A non-negative decimal number, else None (Sidekiq refuses the rest)."""
    return int(s) if re.fullmatch(r"[0-9]+", s) else None


# ---------------------------------------------------------------- the config file


@dataclass(frozen=True)
class Settings:
    """One layer of the file (its top level, or an environment's section): None = not set there;
    a problem says why a key that IS set cannot be read."""

    concurrency: int | None = None
    queues: tuple[Queue, ...] | None = None
    concurrency_problem: str = ""
    queues_problem: str = ""


@dataclass(frozen=True)
class SidekiqConfig:
    top: Settings = Settings()
    environments: tuple[tuple[str, Settings], ...] = ()
    problem: str = ""  # the file as a whole cannot be read

    def for_environment(self, environment: str) -> Settings:
        """The settings a process in `environment` gets: its section's keys over the top level's."""
        if self.problem:
            return Settings(concurrency_problem=self.problem, queues_problem=self.problem)
        env = dict(self.environments).get(environment)
        if env is None:
            return self.top
        c = env if env.concurrency is not None or env.concurrency_problem else self.top
        q = env if env.queues is not None or env.queues_problem else self.top
        return Settings(c.concurrency, q.queues, c.concurrency_problem, q.queues_problem)


class _Unreadable(ValueError):
    pass


_KEY = re.compile(r"^(?::?([A-Za-z_][A-Za-z0-9_.-]*)|\"([^\"]+)\"|'([^']+)')\s*:(?:\s+(.*))?$")
_ERB = re.compile(r"<%(.*?)%>")


def parse_config(text: str) -> SidekiqConfig:
    """Read a Sidekiq config file's settings without evaluating anything."""
    try:
        lines = _logical_lines(text)
        top = _mapping(lines)
    except _Unreadable as e:
        return SidekiqConfig(problem=str(e))
    settings = _settings(top)
    envs = []
    for key, _line, value, children in top:
        if key in ("concurrency", "queues") or value or not children:
            continue
        try:
            nested = _mapping(children)
        except _Unreadable as e:
            envs.append((key, Settings(concurrency_problem=str(e), queues_problem=str(e))))
            continue
        found = _settings(nested)
        if found != Settings():
            envs.append((key, found))
    return SidekiqConfig(settings, tuple(envs))


Line = tuple[int, int, str]  # (1-based line number, indentation, content without comment)
Entry = tuple[str, int, str, list[Line]]  # (key without symbol colons, line, inline value, nested lines)


def _logical_lines(text: str) -> list[Line]:
    out: list[Line] = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = _ERB.sub(lambda m: "" if m.group(1).startswith("#") else m.group(0), raw)
        for m in _ERB.finditer(line):
            if not m.group(1).startswith(("=", "-=")):
                raise _Unreadable(f"line {n}: ERB control flow ({_short(m.group(0))}), which fleet does not evaluate")
        if "<%" in line.replace("<%%", "") and not _ERB.search(line):
            raise _Unreadable(f"line {n}: an ERB tag spans several lines, which fleet does not read")
        body = _strip_comment(line).rstrip()
        if not body.strip():
            continue
        if body.strip() in ("---", "..."):
            if out:
                break  # a second document: Sidekiq reads the first
            continue
        indent = len(body) - len(body.lstrip(" "))
        if body[indent:indent + 1] == "\t":
            raise _Unreadable(f"line {n}: a tab indents the line; YAML allows only spaces")
        out.append((n, indent, body.strip()))
    return out


def _strip_comment(line: str) -> str:
    quote = ""
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'" and (i == 0 or line[i - 1] in " \t[,-:{"):
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _mapping(lines: list[Line]) -> list[Entry]:
    """A block mapping: its entries at the first line's indentation, each with what is nested."""
    if not lines:
        return []
    indent = lines[0][1]
    out: list[Entry] = []
    i = 0
    while i < len(lines):
        n, ind, body = lines[i]
        if ind != indent:
            raise _Unreadable(f"line {n}: unexpected indentation")
        m = _KEY.match(body)
        if m is None:
            raise _Unreadable(f"line {n}: {_short(body)} is not a `key: value` line")
        j = i + 1
        # what belongs to the key: deeper lines, and a sequence written at the key's own indentation
        while j < len(lines) and (lines[j][1] > indent or lines[j][1] == indent and lines[j][2].startswith("- ")):
            j += 1
        key = (m.group(1) or m.group(2) or m.group(3)).lstrip(":")
        out.append((key, n, (m.group(4) or "").strip(), lines[i + 1:j]))
        i = j
    return out


def _settings(entries: list[Entry]) -> Settings:
    c: int | None = None
    q: tuple[Queue, ...] | None = None
    cp = qp = ""
    for key, n, value, children in entries:
        try:
            if key == "concurrency":
                c, cp = _concurrency(n, value, children), ""
            elif key == "queues":
                q, qp = _queues(n, value, children), ""
        except _Unreadable as e:
            if key == "concurrency":
                c, cp = None, str(e)
            else:
                q, qp = None, str(e)
    return Settings(c, q, cp, qp)


def _concurrency(n: int, value: str, children: list[Line]) -> int:
    if children or not value:
        raise _Unreadable(f"line {n}: concurrency is not a number")
    word = _scalar(n, value, "concurrency")
    if not re.fullmatch(r"[+-]?[0-9]+", word):
        raise _Unreadable(f"line {n}: concurrency {_short(word)} is not an integer")
    return int(word)


def _queues(n: int, value: str, children: list[Line]) -> tuple[Queue, ...]:
    if value:
        if children and value.startswith("["):  # a flow list over several lines
            value = " ".join([value, *(b for _, _, b in children)])
        elif children:
            raise _Unreadable(f"line {n}: queues has a value and nested lines")
        items = _flow(n, value, "queues")
        if not isinstance(items, list):
            raise _Unreadable(f"line {n}: queues is not a list")
        return tuple(_queue_item(n, item) for item in items)
    if not children:
        return ()  # `queues:` with nothing: null, as no list
    indent = children[0][1]
    out: list[Queue] = []
    for k, ind, body in children:
        if ind != indent or not (body == "-" or body.startswith("- ")):
            raise _Unreadable(f"line {k}: queues is not a list of names or [name, weight] pairs")
        out.append(_queue_item(k, _flow(k, body[1:].strip(), "queues")))
    return tuple(out)


def _queue_item(n: int, item: object) -> Queue:
    parts: list[object]
    if isinstance(item, str):
        name_part, _, weight_part = item.partition(",")  # Sidekiq splits a string item at its comma
        parts = [name_part, weight_part] if weight_part else [name_part]
    elif isinstance(item, list) and 1 <= len(item) <= 2:
        parts = item
    else:
        raise _Unreadable(f"line {n}: a queue is a name or [name, weight], not {_short(str(item))}")
    name = parts[0]
    if not isinstance(name, str) or not name:
        raise _Unreadable(f"line {n}: a queue name is not a plain name")
    weight: int | None = None
    if len(parts) == 2:
        w = parts[1]
        if not isinstance(w, str) or not re.fullmatch(r"[0-9]+", w.strip()):
            raise _Unreadable(f"line {n}: the weight of queue {name!r} is not an integer")
        weight = int(w)
    return name, weight


def _scalar(n: int, text: str, what: str) -> str:
    text = text.strip()
    if "<%" in text:
        raise _Unreadable(f"line {n}: {what} is ERB ({_short(text)}), which fleet does not evaluate")
    if text[:1] in ("&", "*", "!", "|", ">", "{"):
        raise _Unreadable(f"line {n}: {what} uses YAML fleet does not read ({_short(text)})")
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        if "\\" in text:
            raise _Unreadable(f"line {n}: {what} has an escape sequence fleet does not read")
        return text[1:-1]
    if text[:1] in ("'", '"'):
        raise _Unreadable(f"line {n}: {what} has an unterminated quote")
    return text


def _flow(n: int, text: str, what: str) -> object:
    """A scalar, or a flow list (`[a, [b, 2]]`) of them, as str / nested lists."""
    text = text.strip()
    if not text.startswith("["):
        return _scalar(n, text, what)
    tokens = [t for t in re.findall(r"\s*(\[|\]|,|'(?:[^']|'')*'|\"[^\"]*\"|[^\[\],'\"]+)", text) if t.strip()]
    pos = 0

    def item() -> object:
        nonlocal pos
        if pos >= len(tokens):
            raise _Unreadable(f"line {n}: {what}: an unterminated [list]")
        tok = tokens[pos]
        if tok == "[":
            pos += 1
            out: list[object] = []
            while pos < len(tokens) and tokens[pos] != "]":
                out.append(item())
                if pos < len(tokens) and tokens[pos] == ",":
                    pos += 1
            if pos >= len(tokens):
                raise _Unreadable(f"line {n}: {what}: an unterminated [list]")
            pos += 1
            return out
        if tok in ("]", ","):
            raise _Unreadable(f"line {n}: {what}: a misplaced {tok!r}")
        pos += 1
        return _scalar(n, tok, what)

    value = item()
    if pos != len(tokens):
        raise _Unreadable(f"line {n}: {what}: text after the list")
    return value


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


# ---------------------------------------------------------------- what a process serves


DEFAULT_CONCURRENCY = 5  # Sidekiq 7's default when neither -c, the file nor RAILS_MAX_THREADS says


@dataclass(frozen=True)
class Served:
    """What one Sidekiq process serves, from its command line and its config file."""

    concurrency: int | None
    queues: tuple[Queue, ...]
    source: str  # "-q" (command line), the config file's path, or "defaults" (no file, no -q)
    problem: str = ""  # why the queues could not be read (they are then ())
    concurrency_problem: str = ""  # why the concurrency could not be read (it is then None)


def served(args: SidekiqArgs, environment: str, config_path: str, config: SidekiqConfig | None,
           problem: str, env: Iterable[tuple[str, str]] = ()) -> Served:
    """What a process runs: `config` is its file as read (None: there is none), `problem` why it
    could not be read (a missing -C file, unreadable, too large); `env` its environment variables."""
    default_c = _to_int(dict(env).get("RAILS_MAX_THREADS", "")) or DEFAULT_CONCURRENCY
    s = Settings() if config is None or problem else config.for_environment(environment)
    why = problem or (f"{config_path}: {s.queues_problem}" if s.queues_problem else "")
    # concurrency: -c, else the file's, else RAILS_MAX_THREADS or Sidekiq's default
    concurrency = args.concurrency
    if concurrency is None and not problem:
        concurrency = None if s.concurrency_problem else s.concurrency if s.concurrency is not None else default_c
    c_why = problem or f"{config_path}: {s.concurrency_problem}" if concurrency is None else ""
    if args.queues:  # -q replaces the file's queue list
        return Served(concurrency, args.queues, "-q", concurrency_problem=c_why)
    if why:
        return Served(concurrency, (), config_path, why, c_why)
    return Served(concurrency, s.queues or (("default", None),), config_path if config is not None else "defaults",
                  concurrency_problem=c_why)


def environment_of(args: SidekiqArgs, env: Iterable[tuple[str, str]]) -> str:
    """Sidekiq's environment: -e, else APP_ENV, RAILS_ENV, RACK_ENV, else development."""
    env_map = dict(env)
    return args.environment or env_map.get("APP_ENV") or env_map.get("RAILS_ENV") or env_map.get(
        "RACK_ENV") or "development"
