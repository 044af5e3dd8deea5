"""Sidekiq's config file, observed: for every Sidekiq unit whose ExecStart has no `-q`, the file
Sidekiq reads its queues (and concurrency) from, read on the host in the same round trip.

Which file: `-C FILE`, else `config/sidekiq.yml` (or `config/sidekiq.yml.erb`) under the `-r`
directory when that is one, else under the unit's WorkingDirectory (fleet/sidekiq_settings.py says why).
The host only prints the file; fleet parses it (fleet/sidekiq_settings.py), evaluating nothing.  What is
read feeds the Sidekiq view of `fleet status` and the queue rules of `fleet audit`
(fleet/status.py); a file that cannot be read is said so, naming host, unit and file.

Section `@@sidekiqconf` (printed whenever collected, so that "no Sidekiq without -q" is told apart
from "not looked"), then per unit `@@sidekiqconf UNIT` with one line `!file PATH` and the file's
lines each prefixed by `|`, or `!none PATH` (no config file: Sidekiq's defaults), `!missing PATH`
(a `-C` file that is not there), `!unreadable PATH`, `!toolarge PATH`.  The unit's lines come from
the units section's `systemctl show` output, which this part of the script reads (`$show`).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fleet.collect.sections import Collected, SectionParser, too_much
from fleet.errors import ParseError
from fleet.model import Desired, HostState
from fleet.resources.base import Resource
from fleet.sidekiq_settings import SidekiqConfig, parse_config

MAX_BYTES = 64 * 1024  # per file: Mastodon's is 2 KiB
MAX_LINES = 2_000
MAX_UNITS = 200  # Sidekiq units without -q on one host
SECTION = "sidekiqconf"  # not "sidekiq": that is Sidekiq's own view (fleet/sidekiq.py)

# awk over `systemctl show` blocks: for a unit running sidekiq without -q, print
# UNIT <tab> +WORKDIR <tab> +(-C value) <tab> +(-r value), absent ones empty: the `+` keeps an
# empty field a field (a tab is IFS white space, so `read` would merge two tabs into one).  argv
# is systemd's `argv[]=… ; ignore_errors=…` rendering, words separated by single spaces.  The options are read
# as fleet/sidekiq_settings.parse_argv reads them (after the sidekiq word: -X V, -XV, -X=V,
# --long V, --long=V; the last one wins; a -q with no queue name is none), so that the host reads
# the file fleet's parser says Sidekiq reads.
_FIND_AWK = r"""
function flush(   n, w, i, b, q, c, r, sk, o, v) {
  if (id != "" && argv != "") {
    n = split(argv, w, " "); q = 0; c = ""; r = ""; sk = 0
    for (i = 1; i <= n; i++) {
      b = w[i]; sub(/.*\//, "", b)
      if (!sk) { if (b == "sidekiq") sk = 1; continue }
      o = ""; v = ""
      if (w[i] ~ /^--(queue|config|require|concurrency|environment|timeout)=/) {
        o = w[i]; sub(/=.*/, "", o); v = substr(w[i], length(o) + 2)
      } else if (w[i] ~ /^--(queue|config|require|concurrency|environment|timeout)$/) {
        o = w[i]; v = w[i + 1]; i++
      } else if (w[i] ~ /^-[qCrcet]/) {
        o = substr(w[i], 1, 2); v = substr(w[i], 3)
        if (v == "") { v = w[i + 1]; i++ } else sub(/^=/, "", v)
      }
      if ((o == "-q" || o == "--queue") && v ~ /^[^,]/) q = 1
      if (o == "-C" || o == "--config") c = v
      if (o == "-r" || o == "--require") r = v
    }
    if (sk && !q && ++found <= max) print id "\t+" wd "\t+" c "\t+" r
  }
  id = ""; argv = ""; wd = ""
}
/^Id=/ { id = substr($0, 4) }
/^WorkingDirectory=/ { wd = substr($0, 18); sub(/^[-!]/, "", wd) }
/^ExecStart=/ {
  i = index($0, "argv[]=")
  if (i) { a = substr($0, i + 7); j = index(a, " ; ignore_errors="); argv = j ? substr(a, 1, j - 1) : a }
}
/^$/ { flush() }
END { flush() }
"""

# sh: for each such unit, find the file as Sidekiq would and print it, bounded: one awk prints its
# first lines each prefixed by `|` and ended by a newline (`head | sed` was two starts, and left a
# last line without a newline unended, gluing the next header to it).
_PRINT_SH = r"""
  wd=${wd#+} c=${c#+} r=${r#+}
  echo "@@sidekiqconf $u"
  case $wd in ''|'~') wd=/;; esac
  if [ -n "$c" ]; then
    case $c in /*) f=$c;; *) f=$wd/$c;; esac
    [ -e "$f" ] || { echo "!missing $f"; continue; }
  else
    case $r in '') d=$wd;; /*) d=$r;; *) d=$wd/$r;; esac
    [ -d "$d" ] || d=$wd
    f=$d/config/sidekiq.yml
    [ -e "$f" ] || f=$d/config/sidekiq.yml.erb
    [ -e "$f" ] || { echo "!none $d/config/sidekiq.yml"; continue; }
  fi
  if [ ! -f "$f" ] || [ ! -r "$f" ]; then echo "!unreadable $f"
  elif [ "$(wc -c <"$f")" -gt %(bytes)d ]; then echo "!toolarge $f"
  else echo "!file $f"; awk '{ print "|" $0 } NR >= %(lines)d { exit }' "$f"; fi
"""


@dataclass(frozen=True)
class ConfigFile:
    """What a host said about one unit's Sidekiq config file."""

    unit: str
    path: str
    status: str  # file | none | missing | unreadable | toolarge
    config: SidekiqConfig | None = None  # parsed, when status == "file"

    def problem(self) -> str:
        """Why Sidekiq's queues cannot be known from this file ("" when they can)."""
        return {"missing": f"{self.path} does not exist (ExecStart names it with -C)",
                "unreadable": f"{self.path} cannot be read",
                "toolarge": f"{self.path} is larger than {MAX_BYTES} bytes"}.get(self.status, "")


class SidekiqConfigs(Resource):
    kind = "sidekiq config"
    section = SECTION

    def to_collect(self, desired: Desired, host: str) -> bool:
        # Any unit the units section shows may run Sidekiq (declared or discovered): look at them all.
        return bool(desired.services_on(host) or desired.discover)

    def script(self, what: Any) -> str:
        body = _PRINT_SH % {"bytes": MAX_BYTES, "lines": MAX_LINES}
        return (f"echo '@@{SECTION}'\n"
                f"printf '%s\\n\\n' \"$show\" | awk -v max={MAX_UNITS} {shlex.quote(_FIND_AWK)} | "
                # a tab written into the script: `$(printf '\\t')` was a subshell at every turn
                "while IFS='\t' read -r u wd c r; do" + body + "done")

    def parser(self, host: str) -> SectionParser:
        return _Section(host)

    def notes(self, state: HostState, unit: str) -> list[str]:
        f = config_file(state, unit)
        if f is None or f.status == "none":
            return []
        short = {"missing": "missing", "unreadable": "unreadable", "toolarge": "too large to read"}.get(f.status)
        problem = f.config.problem or f.config.top.queues_problem if f.config is not None else ""
        why = short or (f"cannot read it ({problem})" if problem else "")
        return [f"queues from {f.path}" + (f": {why}" if why else "")]


def config_file(state: HostState, unit: str) -> ConfigFile | None:
    """The config file the host reported for `unit` (None: not collected, or the unit has -q)."""
    found = state.facts_of(SECTION)
    if not isinstance(found, tuple):
        return None
    return next((f for f in found if isinstance(f, ConfigFile) and f.unit == unit), None)


def collected(state: HostState) -> bool:
    return state.facts_of(SECTION) is not None


class _Section:
    def __init__(self, host: str) -> None:
        self.host = host
        self.found: list[ConfigFile] = []
        self.seen = False

    def error(self, what: str) -> ParseError:
        return ParseError(f"{self.host}: {what} in the sidekiq section", host=self.host, section=SECTION)

    def section(self, arg: str, lines: Iterator[str]) -> None:
        self.seen = True
        if not arg:
            if any(line for line in lines):
                raise self.error("unexpected lines")
            return
        if len(self.found) >= MAX_UNITS:
            raise too_much(self.host, SECTION, f"{MAX_UNITS} units")
        head = next(lines, "")
        status, _, path = head.partition(" ")
        if status not in ("!file", "!none", "!missing", "!unreadable", "!toolarge") or not path:
            raise self.error(f"unexpected line {head[:80]!r}")
        body: list[str] = []
        size = 0
        for line in lines:
            if not line:
                continue
            if not line.startswith("|") or status != "!file":
                raise self.error(f"unexpected line {line[:80]!r}")
            size += len(line)
            if len(body) >= MAX_LINES or size > MAX_BYTES + MAX_LINES:
                raise too_much(self.host, SECTION, f"{MAX_LINES} lines or {MAX_BYTES} bytes per file")
            body.append(line[1:])
        config = parse_config("\n".join(body)) if status == "!file" else None
        self.found.append(ConfigFile(unit=arg, path=path, status=status[1:], config=config))

    def finish(self, collected: Collected) -> None:
        if self.seen:
            collected.extra[SECTION] = tuple(self.found)
