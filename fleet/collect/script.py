"""The one remote shell script that observes a host, and what it is asked to look at.

One SSH round trip per host: a POSIX `sh` script (no remote Python) prints every fact fleet
needs in sections that `fleet.collect.parse` reads.  Secrets never leave the host: for keys
that are (or look) sensitive the script prints only a sha256 of the raw value.

The script is assembled from parts: this module's own (the host's facts and its systemd
units, which every unit-based kind reads), then the part of each kind of resource that has
sections of its own (`Resource.script`, fleet/resources/), in the registry's order.  Every name
that reaches the script is either validated by the loader (unit names, patterns, env keys) or
passed through `shlex.quote`.

What the host pays for (docs/PERFORMANCE.md, "The remote script"): two `systemctl` processes —
the manager's two facts, and one `show` of every property of every unit, declared or discovered.
Discovery asks systemd nothing of its own: unit files come from the shell's glob over the unit
directories, loaded units without a file from `show`'s glob.  Output format (version 1):

    @@fleet 1
    @@facts            KEY=value lines (hostname, kernel, uptime, load, mem_*, os) and the
                       manager's Version=/SystemState=
    @@units            `systemctl show` blocks, one per unit, separated by blank lines
    @@hashes           `sha256sum` lines for every fragment and drop-in of those units
    @@text             `@@file UNIT PATH` then the file's lines, each prefixed by `|`
    @@NAME [ARG] …     the sections of the kinds (e.g. `@@env PATH`, fleet/resources/env_file.py)
    @@end
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from fleet.mastodon import SECRET_NAME_PATTERN
from fleet.model import Desired
from fleet.resources.registry import RESOURCES
from fleet.unitfile import MAX_LINES

SCRIPT_VERSION = 1

UNIT_PROPERTIES = (
    "Id", "LoadState", "ActiveState", "SubState", "UnitFileState", "ExecStart", "MainPID",
    "FragmentPath", "DropInPaths", "ActiveEnterTimestamp", "NRestarts", "Result", "Environment",
    "EnvironmentFiles", "WorkingDirectory",
)  # fmt: skip

MAX_TEXT_LINES = MAX_LINES  # per unit file: a unit is a few dozen lines; more is not a unit


@dataclass(frozen=True)
class CollectSpec:
    """What to observe on one host."""

    units: tuple[str, ...] = ()  # declared unit names
    managed: tuple[str, ...] = ()  # units whose full text is wanted (fleet writes them)
    patterns: tuple[str, ...] = ()  # discovery globs
    kinds: tuple[tuple[str, Any], ...] = ()  # (section, what that kind looks at), e.g. ("env", ((path, keys),))

    def of(self, section: str) -> Any:
        """What the kind printing `section` looks at on the host (None: nothing)."""
        return next((what for name, what in self.kinds if name == section), None)


def spec_for(desired: Desired, host: str) -> CollectSpec:
    services = desired.services_on(host)
    # A declared template's instances are looked for like a discovery pattern's units, so that an
    # instance nobody declared (`mastodon-streaming@4002.service`) is seen, not hidden.
    templates = tuple(f"{s.unit[:s.unit.index('@.') + 1]}*{s.unit[s.unit.index('@.') + 1:]}"
                      for s in services if s.is_template)
    return CollectSpec(
        units=tuple(dict.fromkeys(u for s in services for u in s.all_units_on(host))),
        managed=tuple(dict.fromkeys(u for s in services if not s.observe_only for u in s.all_units_on(host))),
        patterns=(*(p.pattern for p in desired.discover),
                  *(t for t in dict.fromkeys(templates) if t not in {p.pattern for p in desired.discover})),
        kinds=tuple((r.section, what) for r in RESOURCES if r.section and (what := r.to_collect(desired, host))),
    )


_FACTS = r"""
echo '@@facts'
read -r v </proc/sys/kernel/hostname && echo "hostname=$v"
read -r v </proc/sys/kernel/osrelease && echo "kernel=$v"
read -r v _ </proc/uptime && echo "uptime=$v"
read -r a b c _ </proc/loadavg && echo "load=$a $b $c"
while read -r k v _; do
  case $k in MemTotal:) echo "mem_total_kb=$v";; MemAvailable:) echo "mem_available_kb=$v"; break;; esac
done </proc/meminfo
if [ -r /etc/os-release ]; then
  while IFS='=' read -r k v; do [ "$k" = PRETTY_NAME ] && echo "os=$v"; done </etc/os-release
fi
systemctl show --no-pager -p Version -p SystemState
"""

# awk: replace the value of every secret-looking KEY=value word of an Environment= line by a
# placeholder, so that a secret someone put into a unit never leaves the host.  Quoted values
# with spaces span several words: masking continues to the closing quote.
_MASK_AWK = r"""
function maskenv(line,   head, n, w, i, out, k, masking) {
  head = line; sub(/Environment=.*/, "", head)
  n = split(substr(line, length(head) + 13), w, " ")
  out = ""; masking = 0
  for (i = 1; i <= n; i++) {
    if (masking) { if (w[i] ~ /"$/) masking = 0; continue }
    k = w[i]; sub(/^"/, "", k); sub(/=.*/, "", k)
    if (index(w[i], "=") && k ~ secret_re) {
      out = out (out == "" ? "" : " ") (substr(w[i], 1, 1) == "\"" ? "\"" : "") k "=(masked-on-host)"
      if (substr(w[i], 1, 1) == "\"") { if (w[i] ~ /.."$/) out = out "\""; else { masking = 1; out = out "\"" } }
      continue
    }
    out = out (out == "" ? "" : " ") w[i]
  }
  return head "Environment=" out
}
"""

# awk: dump fragment and drop-ins of the managed units, each line prefixed so that no line
# of a file can ever be mistaken for a section marker.  An Environment= assignment continued on
# the next lines (an odd number of trailing backslashes) is masked on each of them.
_TEXT_AWK = _MASK_AWK + r"""
function dump(f, u,   l, n, c) {
  print "@@file " u " " f
  n = 0; c = 0
  while ((getline l < f) > 0) {
    if (++n > maxl) { print "@@truncated"; break }
    if (l ~ /^[ \t]*Environment=/) { c = (l ~ /(^|[^\\])(\\\\)*\\$/); l = maskenv(l) }
    else if (c && l !~ /^[ \t]*[#;]/) {
      c = (l ~ /(^|[^\\])(\\\\)*\\$/); l = "  " substr(maskenv("Environment=" l), 13)
    }
    print "|" l
  }
  close(f)
}
function flush(   i, k) {
  if (id != "" && index(m, " " id " ")) {
    if (frag != "") dump(frag, id)
    k = split(drop, a, " "); for (i = 1; i <= k; i++) dump(a[i], id)
  }
  id = ""; frag = ""; drop = ""
}
/^Id=/ { id = substr($0, 4) }
/^FragmentPath=/ { frag = substr($0, 14) }
/^DropInPaths=/ { drop = substr($0, 13) }
/^$/ { flush() }
END { flush() }
"""

# systemd's unit search path for the system manager (`systemd-analyze unit-paths`, systemd 252;
# /lib/systemd/system for hosts without a merged /usr), in its order of precedence.
UNIT_DIRS = (
    "/etc/systemd/system.control", "/run/systemd/system.control", "/run/systemd/transient",
    "/run/systemd/generator.early", "/etc/systemd/system", "/etc/systemd/system.attached", "/run/systemd/system",
    "/run/systemd/system.attached", "/run/systemd/generator", "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system", "/run/systemd/generator.late", "/lib/systemd/system",
)  # fmt: skip

# What `list-unit-files` would list: a unit's file, not a drop-in or .wants directory beside it.
UNIT_TYPES = ("service", "socket", "target", "path", "timer", "mount", "automount", "swap", "slice", "scope",
              "device")

_GLOB_WORD = re.compile(r"[A-Za-z0-9*?\[\]:_.@-]{1,255}")

# awk over `systemctl show`: each unit's block once (a unit named and also matched by a glob is
# printed twice), every Environment= line masked.  A block is held until its end (its Id= may
# come after its Environment=); systemctl's complaint lines pass through as they come.
_SHOW_AWK = _MASK_AWK + r"""
function flush(   i) {
  if (n && !(id in seen)) { for (i = 1; i <= n; i++) print b[i]; print "" }
  if (id != "") seen[id] = 1
  n = 0; id = ""
}
/^$/ { flush(); next }
/^Id=/ { id = substr($0, 4) }
/^Environment=/ { b[++n] = maskenv($0); next }
/^[A-Za-z][A-Za-z0-9]*=/ { b[++n] = $0; next }
{ print }
END { flush() }
"""


def discover_part(globs: list[str], dirs: tuple[str, ...] = UNIT_DIRS) -> str:
    """sh setting `$found` to the names of the unit files in `dirs` that match `globs` (checked
    by `_glob_word`): once each, templates and drop-in or .wants directories left out."""
    return "\n".join((
        "found=; set +f",
        f"for d in {' '.join(shlex.quote(d) for d in dirs)}; do [ -d \"$d\" ] || continue",
        "  for f in " + " ".join(f'"$d"/{g}' for g in globs) + "; do n=${f##*/}",
        f"    case $n in *@.*) continue;; {'|'.join('*.' + t for t in UNIT_TYPES)}) ;; *) continue;; esac",
        "    { [ -e \"$f\" ] || [ -L \"$f\" ]; } || continue",
        "    case \" $found \" in *\" $n \"*) ;; *) found=\"$found $n\";; esac",
        "  done",
        "done; set -f",
    ))


def _glob_word(pattern: str) -> str:
    """A discovery pattern as the shell's glob: it must stay unquoted to be a glob, so it is
    checked here to hold only the characters the loader allows (no quote, space or `$`)."""
    if not _GLOB_WORD.fullmatch(pattern):
        raise ValueError(f"discovery pattern {pattern!r} holds characters a unit name cannot")
    return pattern


def build_script(spec: CollectSpec, *, history: str = "") -> str:
    """The complete remote script for one host (POSIX sh, dash-compatible); `history`, when
    given, is the host history's section (fleet.history.read_section), printed last."""
    return "\n".join(part for _, part in script_parts(spec, history=history)) + "\n"


def script_parts(spec: CollectSpec, *, history: str = "") -> list[tuple[str, str]]:
    """The script as (name, shell text) parts in the order they run, what bench/remote_cost.py
    profiles one by one (a part may use the variables an earlier one set)."""
    q = shlex.quote
    parts: list[tuple[str, str]] = [
        ("header", "\n".join((
            "export LC_ALL=C SYSTEMD_PAGER= SYSTEMD_COLORS=0 PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "set -f",  # names are data, never globs for the shell
            f"echo '@@fleet {SCRIPT_VERSION}'",
        ))),
        ("facts", _FACTS),
    ]
    declared = " ".join(q(u) for u in spec.units)
    globs = [_glob_word(p) for p in spec.patterns]
    if globs:
        # Units with a file but not loaded (disabled, never started) are found by the shell's own
        # glob over systemd's unit directories: no `list-unit-files`, whose answer costs PID 1 a
        # scan of every unit file and its enablement.  Loaded units without a file of their own
        # (instances, units whose file was removed) come from `show`'s glob, which expands against
        # the loaded units.  Templates cannot be shown; names are collected once.
        parts.append(("discover", discover_part(globs)))
    names = " ".join(x for x in ("$found" if globs else "", declared, " ".join(q(p) for p in spec.patterns)) if x)
    props = ",".join(UNIT_PROPERTIES)
    # One `systemctl show` for every property of every unit.  A unit both named and matched by a
    # glob is printed twice: the awk keeps its first block only, and masks secrets on the way.
    parts.append(("units", "\n".join((
        "echo '@@units'",
        (f"show=$(systemctl show --no-pager -p {props} -- {names} 2>&1 | "
         f"awk -v secret_re={q(SECRET_NAME_PATTERN)} {q(_SHOW_AWK)})") if names else "show=",
        'printf \'%s\\n\' "$show"',
    ))))
    parts.append(("hashes", "\n".join((
        "echo '@@hashes'",
        "paths=$(printf '%s\\n' \"$show\" | awk '/^FragmentPath=./{print substr($0,14)} "
        "/^DropInPaths=./{n=split(substr($0,13),a,\" \");for(i=1;i<=n;i++)print a[i]}')",
        '[ -n "$paths" ] && sha256sum -- $paths 2>/dev/null',
    ))))
    text = "echo '@@text'"
    if spec.managed:
        managed = " " + " ".join(spec.managed) + " "
        text += (f"\nprintf '%s\\n\\n' \"$show\" | awk -v m={q(managed)} -v maxl={MAX_TEXT_LINES} "
                 f"-v secret_re={q(SECRET_NAME_PATTERN)} {q(_TEXT_AWK)}")
    parts.append(("text", text))
    for r in RESOURCES:
        what = spec.of(r.section) if r.section else None
        if what:
            parts.append((r.section, r.script(what)))
    if history:
        parts.append(("history", history))
    parts.append(("end", "echo '@@end'"))
    return parts
