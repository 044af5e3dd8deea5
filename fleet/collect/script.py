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
the manager's two facts, and one `show` of every property of every unit, declared or discovered —
and, when the client hands it kept idle units, one `sha256sum` and one `find` over the unit
directories that spare PID 1 loading those units for the `show`; an env file whose hash the client
offers as known (`reuse_offers`) is not parsed again.
Discovery asks systemd nothing of its own: unit files come from the shell's glob over the unit
directories, loaded units without a file from `show`'s glob.  Output format (version 1):

    @@fleet 1
    @@facts            KEY=value lines (hostname, kernel, uptime, load, mem_*, os) and the
                       manager's Version=/SystemState=
    @@reused           only when the client offered kept idle units (`idle_offers`): the names of
                       those left out of the `show`, their files and enablement unchanged
    @@units            `systemctl show` blocks, one per unit, separated by blank lines
    @@hashes           `sha256sum` lines for every fragment and drop-in of those units, and for
                       each declared env file (its section reads the hash: `known` when offered)
    @@text             `@@file UNIT PATH` then the file's lines, each prefixed by `|`
    @@NAME [ARG] …     the sections of the kinds (e.g. `@@env PATH`, fleet/resources/env_file.py)
    @@end
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from fleet.mastodon import SECRET_NAME_PATTERN
from fleet.model import Desired, HostState, UnitState
from fleet.resources.env_file import env_offers
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
    # Installed, idle units as the kept observation saw them (`idle_offers`): the script leaves
    # each out of the `show` when its files and enablement are still those, and says so (@@reused).
    idle: tuple[UnitState, ...] = ()
    idle_hostname: str = ""  # the host's name when they were kept: a unit's %H/%l expand to it

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


# What a kept observation may hand the script: names and paths that need no quoting inside the
# script's own word lists (they are still quoted where they are written into it).
_IDLE_NAME = re.compile(r"[A-Za-z0-9:_.-]{1,255}")
_IDLE_PATH = re.compile(r"/[A-Za-z0-9/._:+@-]{1,4095}")
_IDLE_ENABLEMENT = ("disabled", "static")  # what the script can confirm from the symlinks alone
_SHA256 = re.compile(r"[0-9a-f]{64}")


def reuse_offers(spec: CollectSpec, kept: HostState | None) -> CollectSpec:
    """`spec` with everything the kept observation `kept` lets the script skip while unchanged:
    its installed, idle units (`idle_offers`) and the parse of each env file whose hash it knows
    (fleet/resources/env_file.py `env_offers`)."""
    spec = idle_offers(spec, kept)
    env = spec.of("env")
    if not env or kept is None:
        return spec
    offers = env_offers(env, kept)
    return replace(spec, kinds=tuple((name, offers if name == "env" else what) for name, what in spec.kinds))


def known_env(spec: CollectSpec) -> dict[str, str]:
    """path -> the hash offered for that env file (none offered: not in it)."""
    return {item[0]: item[2] for item in (spec.of("env") or ()) if len(item) > 2 and item[2]}


def idle_offers(spec: CollectSpec, kept: HostState | None) -> CollectSpec:
    """`spec` with the units of the kept observation `kept` that the script may leave out of its
    `show` (docs/PERFORMANCE.md, "The `show` of installed, idle units"): found by a discovery
    pattern, not declared, and seen exactly as systemd shows a unit it loads only to answer —
    loaded from a plain fragment, inactive/dead, never started since it was loaded, `disabled` or
    `static` (an enablement the script confirms from symlinks, `_IDLE_SH`).  Such a unit is
    loaded and freed by PID 1 for every `show`; while its files and enablement are unchanged and it
    is not loaded, a `show` would print what was kept.  Anything else is not offered."""
    if kept is None or not spec.patterns or not _IDLE_NAME.fullmatch(kept.facts.hostname):
        return spec
    declared = set(spec.units)
    offers = []
    for u in kept.units:
        files = ((u.fragment_path,) + u.drop_in_paths)
        if (u.unit in declared or not _IDLE_NAME.fullmatch(u.unit) or "@" in u.unit
                or not any(fnmatchcase(u.unit, p) for p in spec.patterns)
                or (u.load_state, u.active_state, u.sub_state, u.result) != ("loaded", "inactive", "dead", "success")
                or u.main_pid or u.n_restarts or u.active_enter or u.text is not None
                or u.unit_file_state not in _IDLE_ENABLEMENT
                or u.fragment_path == "/dev/null" or u.fragment_path.rsplit("/", 1)[-1] != u.unit
                or not all(_IDLE_PATH.fullmatch(f) for f in files)
                or tuple(p for p, _ in u.file_hashes) != files
                or not all(_SHA256.fullmatch(h) for _, h in u.file_hashes)):
            continue
        offers.append(u)
    return replace(spec, idle=tuple(offers), idle_hostname=kept.facts.hostname if offers else "")


# sh: the fragments and drop-ins named in `$show`, as words for `sha256sum`, read by the shell's own
# loop over the lines (no `$(printf | awk)`: a subshell, a fork and an awk start less).  The words
# are those the awk's `FragmentPath=` value and `DropInPaths=` split on blanks gave (`set -f`).
HASH_PATHS_SH = """nl='
' paths= oifs=$IFS; IFS=$nl
for l in $show; do case $l in FragmentPath=?*) paths="$paths$nl${l#FragmentPath=}";; \\
DropInPaths=?*) paths="$paths$nl${l#DropInPaths=}";; esac; done
IFS=$oifs"""

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


# sh deciding which kept idle units (`idle_offers`) the `show` may leave out.  One `find` lists
# every path in the unit directories (and one level below: `.wants`, `.requires`, `.upholds`,
# drop-in directories) that is one of the units' fragments (`-samefile`, following symlinks), that
# bears one of their names, or that is a drop-in systemd would read for one of them — its own,
# its type's, its name's prefixes'.  `idle UNIT FRAGMENT SUMS [DROP-IN…]` then succeeds only when
# UNIT is still found as a unit file, its files hash to SUMS (`sha256sum` lines), nothing of its
# name is anything but FRAGMENT itself (no override, mask, link, enabling symlink), nothing else
# is FRAGMENT (no alias, no enabling symlink under another name), and its drop-ins are exactly
# the kept DROP-INs.  Its enablement is then still the kept one without asking systemctl: the
# client offers only units kept `disabled` or `static`, and with no such symlink and the same
# files, systemd's answer is the same (it is one of those two exactly when no symlink enables the
# unit; which one follows from the file's [Install] section).  Whether the unit is loaded is not
# asked: a loaded one is matched by the discovery glob handed to the `show`, and its fresh block wins.
_IDLE_SH = r"""
idle() {
  u=$1 frag=$2 want=$3; shift 3
  case " $found " in *" $u "*) ;; *) return 1;; esac
  t=${u##*.}; p=${u%.*}; dd="$u.d $t.d"
  while :; do case $p in *-*) p=${p%-*}; dd="$dd $p-.$t.d";; *) break;; esac; done
  seen=; oifs=$IFS; IFS=$nl
  for l in $want; do case "$nl$sums$nl" in *"$nl$l$nl"*) ;; *) IFS=$oifs; return 1;; esac; done
  for f in $refs; do
    IFS=$oifs
    if [ "${f##*/}" = "$u" ]; then
      [ "$f" = "$frag" ] || { [ ! -L "$f" ] && [ "$f" -ef "$frag" ]; } || return 1
    elif [ "$f" -ef "$frag" ]; then
      return 1
    else
      for x in $dd; do
        case $f in */"$x"/*.conf) ;; *) continue;; esac
        ok=
        for k; do
          if [ "$f" = "$k" ] || { [ ! -L "$f" ] && [ "$f" -ef "$k" ]; }; then ok=1; seen="$seen $k"; break; fi
        done
        [ -n "$ok" ] || return 1
      done
    fi
    IFS=$nl
  done
  IFS=$oifs
  for k; do case " $seen " in *" $k "*) ;; *) return 1;; esac; done
  reused="$reused $u"
}
"""


def _dropin_dirs(unit: str) -> list[str]:
    """The drop-in directories systemd reads for `unit` (no template): its own, its type's, and one
    per dash-separated prefix of its name (`redis-.service.d` for redis-server.service)."""
    stem, _, kind = unit.rpartition(".")
    parts = stem.split("-")
    return [f"{unit}.d", f"{kind}.d", *(f"{'-'.join(parts[:i])}-.{kind}.d" for i in range(len(parts) - 1, 0, -1))]


def idle_part(offers: tuple[UnitState, ...], hostname: str, dirs: tuple[str, ...] = UNIT_DIRS) -> str:
    """sh printing the @@reused section: the kept idle units whose files and enablement are
    unchanged, then taking them out of `$found`, so that the `show` names them only through the
    discovery glob — which matches them only when they are loaded.  None when the host's name is
    no longer `hostname` (the one they were kept under: specifiers such as %H expand to it).  Every
    value from the kept observation is quoted."""
    q = shlex.quote
    files = [p for u in offers for p in (u.fragment_path, *u.drop_in_paths)]
    tests = [f"-samefile {q(u.fragment_path)} -o -name {q(u.unit)}" for u in offers]
    tests += [f"-path {q(f'*/{d}/*.conf')}" for d in dict.fromkeys(d for u in offers for d in _dropin_dirs(u.unit))]
    lines = [
        _IDLE_SH,
        "echo '@@reused'",
        "nl='\n'",
        "reused=; name_now=; dirs=; frags=1",
        "read -r name_now </proc/sys/kernel/hostname",
        # each directory once: with a merged /usr, /lib/systemd/system is /usr/lib/systemd/system
        f"for d in {' '.join(q(d) for d in dirs)}; do [ -d \"$d\" ] || continue",
        '  for e in $dirs; do [ "$d" -ef "$e" ] && continue 2; done; dirs="$dirs $d"',
        "done",
        # find fails on a missing -samefile reference, and then lists nothing: reuse nothing then
        f"for f in {' '.join(q(u.fragment_path) for u in offers)}; do [ -e \"$f\" ] || frags=; done",
        f"if [ \"$name_now\" = {q(hostname)} ] && [ -n \"$frags\" ] && "
        f"refs=$(find -L $dirs -maxdepth 2 \\( {' -o '.join(tests)} \\) -print 2>/dev/null); then",
        f"sums=$(sha256sum -- {' '.join(q(f) for f in files)} 2>/dev/null)",
    ]
    for u in offers:
        lines.append(f"idle {q(u.unit)} {q(u.fragment_path)} "
                     + q("\n".join(f"{h}  {p}" for p, h in u.file_hashes))
                     + "".join(f" {q(d)}" for d in u.drop_in_paths))
    lines += [
        "fi",
        "for n in $reused; do echo \"$n\"; done",
        "nf=",
        'for n in $found; do case " $reused " in *" $n "*) ;; *) nf="$nf $n";; esac; done',
        "found=$nf",
    ]
    return "\n".join(lines)


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
        if spec.idle:
            parts.append(("idle", idle_part(spec.idle, spec.idle_hostname)))
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
    # The env files are hashed in the same `sha256sum` as the unit files: their sections print a
    # file's parse only when its hash (`$hs`) is not the one the client offered as known.
    env_paths = "".join(f" {q(item[0])}" for item in (spec.of("env") or ()))
    parts.append(("hashes", "\n".join((
        "echo '@@hashes'",
        HASH_PATHS_SH,
        "hs=",
        (f'hs=$(sha256sum -- $paths{env_paths} 2>/dev/null)' if env_paths
         else '[ -n "$paths" ] && hs=$(sha256sum -- $paths 2>/dev/null)'),
        '[ -n "$hs" ] && printf \'%s\\n\' "$hs"',
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
