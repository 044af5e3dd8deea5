"""The one remote shell script that observes a host, and what it is asked to look at.

One SSH round trip per host: a POSIX `sh` script (no remote Python) prints every fact fleet
needs in sections that `fleet.collect.parse` reads.  Secrets never leave the host: for keys
that are (or look) sensitive the script prints only a sha256 of the raw value.

Every name that reaches the script is either validated by the loader (unit names, patterns,
env keys) or passed through `shlex.quote`.  Output format (version 1):

    @@fleet 1
    @@facts            KEY=value lines (hostname, kernel, uptime, load, mem_*, os) and the
                       manager's Version=/SystemState=
    @@units            `systemctl show` blocks, one per unit, separated by blank lines
    @@hashes           `sha256sum` lines for every fragment and drop-in of those units
    @@text             `@@file UNIT PATH` then the file's lines, each prefixed by `|`
    @@env PATH         `absent`, or `meta MODE OWNER GROUP SIZE` then `V KEY raw`,
                       `secret KEY SHA256` and `invalid` lines
    @@end
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from fleet.mastodon import SECRET_KEYS, SECRET_NAME_PATTERN
from fleet.model import Desired

SCRIPT_VERSION = 1

UNIT_PROPERTIES = (
    "Id", "LoadState", "ActiveState", "SubState", "UnitFileState", "ExecStart", "MainPID",
    "FragmentPath", "DropInPaths", "ActiveEnterTimestamp", "NRestarts", "Result", "Environment",
    "EnvironmentFiles",
)  # fmt: skip

MAX_TEXT_LINES = 5000  # per unit file: a unit is a few dozen lines; more is not a unit
MAX_ENV_LINES = 5000


@dataclass(frozen=True)
class CollectSpec:
    """What to observe on one host."""

    units: tuple[str, ...] = ()  # declared unit names
    managed: tuple[str, ...] = ()  # units whose full text is wanted (fleet writes them)
    patterns: tuple[str, ...] = ()  # discovery globs
    env_files: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (path, sensitive keys)


def spec_for(desired: Desired, host: str) -> CollectSpec:
    services = desired.services_on(host)
    return CollectSpec(
        units=tuple(dict.fromkeys(s.unit for s in services)),
        managed=tuple(dict.fromkeys(s.unit for s in services if not s.observe_only)),
        patterns=tuple(p.pattern for p in desired.discover),
        env_files=tuple((e.path, e.sensitive_keys()) for e in desired.env_files_on(host)),
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
# of a file can ever be mistaken for a section marker.
_TEXT_AWK = _MASK_AWK + r"""
function dump(f, u,   l, n) {
  print "@@file " u " " f
  n = 0
  while ((getline l < f) > 0) {
    if (++n > maxl) { print "@@truncated"; break }
    if (l ~ /^[ \t]*Environment=/) l = maskenv(l)
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

# awk: classify each line of an env file; sensitive values go to the shell loop for hashing
# and never to stdout.
_ENV_AWK = r"""
# A double-quoted value may span lines (fleet writes a newline in a value that way): it ends at
# the first line ending in an unescaped quote.
function esc(v, dbl,   out, i, c) {
  out = ""
  for (i = 1; i <= length(v); i++) {
    c = substr(v, i, 1)
    if (c == "\n") out = out "\\n"; else if (dbl && c == "\\") out = out "\\\\"; else out = out c
  }
  return out
}
function closed(v,   n, i) {
  sub(/[ \t]+$/, "", v)
  if (length(v) < 2 || substr(v, length(v), 1) != "\"") return 0
  n = 0
  for (i = length(v) - 1; i >= 1 && substr(v, i, 1) == "\\"; i--) n++
  return n % 2 == 0
}
{ line = $0; sub(/^[ \t]+/, "", line); sub(/\r$/, "", line) }
line == "" || substr(line, 1, 1) == "#" { next }
NR > maxl { print "invalid"; exit }
{
  sub(/^export[ \t]+/, "", line)
  eq = index(line, "=")
  if (eq < 2) { print "invalid"; next }
  k = substr(line, 1, eq - 1); sub(/[ \t]+$/, "", k)
  v = substr(line, eq + 1); sub(/^[ \t]+/, "", v)
  if (substr(v, 1, 1) == "\"")
    while (!closed(v) && NR <= maxl && (getline nxt) > 0) { sub(/\r$/, "", nxt); v = v "\n" nxt }
  sub(/[ \t]+$/, "", v)
  if (k !~ /^[A-Za-z0-9_.]+$/) { print "invalid"; next }
  # one line per key on the way out: newlines travel as \n (and, for secrets, \ as \\, so that
  # the shell's printf %b restores the exact raw text before hashing it)
  if (index(s, " " k " ") || k ~ secret_re) print "S " k " " esc(v, 1)
  else print "V " k " " esc(v, 0)
}
"""


def build_script(spec: CollectSpec) -> str:
    """The complete remote script for one host (POSIX sh, dash-compatible)."""
    q = shlex.quote
    parts = [
        "export LC_ALL=C SYSTEMD_PAGER= SYSTEMD_COLORS=0 PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "set -f",  # names are data, never globs for the shell
        f"echo '@@fleet {SCRIPT_VERSION}'",
        _FACTS,
        "echo '@@units'",
    ]
    patterns = " ".join(q(p) for p in spec.patterns)
    found = ""
    if patterns:
        # `show` with a glob only sees loaded units: a disabled, never-started unit would be
        # missing.  Unit files and all units together see everything; templates are skipped.
        parts.append(
            "found=$({ systemctl list-unit-files --no-legend --no-pager --plain -- "
            f"{patterns} 2>/dev/null; systemctl list-units --all --no-legend --no-pager --plain -- "
            f"{patterns} 2>/dev/null; }} | while read -r n _; do case $n in *@.*) ;; *) echo \"$n\";; esac; done)"
        )
        found = "$found "
    declared = " ".join(q(u) for u in spec.units)
    parts.append(f"names=$(printf '%s\\n' {found}{declared} | awk 'NF && !s[$0]++')")
    props = ",".join(UNIT_PROPERTIES)
    mask_show = _MASK_AWK + "/^Environment=/ { print maskenv($0); next } { print }"
    parts.append(f'if [ -n "$names" ]; then show=$(systemctl show --no-pager -p {props} -- $names 2>&1 | '
                 f'awk -v secret_re={q(SECRET_NAME_PATTERN)} {q(mask_show)}); else show=; fi')
    parts.append('printf \'%s\\n\' "$show"')
    parts.append("echo '@@hashes'")
    parts.append(
        "paths=$(printf '%s\\n' \"$show\" | awk '/^FragmentPath=./{print substr($0,14)} "
        "/^DropInPaths=./{n=split(substr($0,13),a,\" \");for(i=1;i<=n;i++)print a[i]}')"
    )
    parts.append('[ -n "$paths" ] && sha256sum -- $paths 2>/dev/null')
    parts.append("echo '@@text'")
    if spec.managed:
        managed = " " + " ".join(spec.managed) + " "
        parts.append(f"printf '%s\\n\\n' \"$show\" | awk -v m={q(managed)} -v maxl={MAX_TEXT_LINES} "
                     f"-v secret_re={q(SECRET_NAME_PATTERN)} {q(_TEXT_AWK)}")
    for path, sensitive in spec.env_files:
        sens = " " + " ".join(sorted(set(sensitive) | SECRET_KEYS)) + " "
        p = q(path)
        parts.append(
            f"echo '@@env '{p}\n"
            f"if [ -f {p} ]; then stat -c 'meta 0%a %U %G %s' -- {p}; "
            f"awk -v s={q(sens)} -v secret_re={q(SECRET_NAME_PATTERN)} -v maxl={MAX_ENV_LINES} {q(_ENV_AWK)} {p} "
            "| while IFS= read -r l; do case $l in "
            "'S '*) k=${l#S }; v=${k#* }; k=${k%% *}; "
            "set -- $(printf '%b' \"$v\" | sha256sum); echo \"secret $k $1\";; "
            "*) printf '%s\\n' \"$l\";; esac; done; "
            "else echo absent; fi"
        )
    parts.append("echo '@@end'")
    return "\n".join(parts) + "\n"
