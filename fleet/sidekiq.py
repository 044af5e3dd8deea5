"""Sidekiq's own view of the fleet: its heartbeats and queues in Redis, and what they say about it.

systemd only knows what it started; Sidekiq knows what actually runs.  Every Sidekiq 7 process
heartbeats into its Redis: the set `processes` names each process (`hostname:pid:hex`), the hash
at that name holds `info` (JSON), `busy`, `beat`, `quiet`, `rss` and `rtt_us` and expires 60 s
after the last beat; jobs wait in the lists `queue:NAME`, the set `queues` names them, and a
queue's latency is the age of its oldest job (`LINDEX queue:NAME -1`, its `enqueued_at`).

This module owns, all pure:

* `section_script` — the shell of a collection section that reads that data with `redis-cli`
  (read-only commands, bounded) on the host where the Sidekiq Redis is declared, finding Redis the
  way Mastodon does from the declared env file; the password travels in `REDISCLI_AUTH`, never in
  an argv, and is never printed;
* `parse_section` — its parser into a `SidekiqView` (ParseError naming the section otherwise);
* `join`, `check` — the view cross-checked with systemd's units and the declaration: findings;
* `load_policy` — the validator of `[policy.sidekiq]`; `locate_redis` — where to read from.

Nothing here does I/O.
"""

from __future__ import annotations

import calendar
import json
import math
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fleet.errors import ParseError
from fleet.model import (
    SIDEKIQ_QUEUES,
    Desired,
    Finding,
    HostResult,
    HostState,
    Kind,
    Service,
    SidekiqPolicy,
    SidekiqSpec,
    UnitState,
)
from fleet.sidekiq_settings import parse_argv
from fleet.textutil import did_you_mean

SECTION = "sidekiq"

# Bounds of what the section reads and prints: a flood of processes or a huge job must cost neither
# the Redis host's memory nor fleet's.  A Mastodon fleet runs a handful to a few dozen processes and
# seven queues; a heartbeat's fields are about half a KiB.
MAX_PROCESSES = 256
MAX_QUEUES = 64
MAX_LINE = 16_384  # one process's heartbeat fields, as printed
MAX_NAME = 1_024  # an identity or a queue name, as printed (escaped)
MAX_ENV_LINES = 5_000
REDIS_TIMEOUT = 10  # seconds for each redis-cli call

BEAT_EXPIRY = 60.0  # Sidekiq's heartbeat hash expires this long after the last beat
DEFAULT_SHUTDOWN_TIMEOUT = 25.0  # Sidekiq's -t default
HEARTBEAT_FIELDS = ("info", "busy", "beat", "quiet", "rss", "rtt_us", "concurrency")

# The env keys Mastodon reads to find Sidekiq's Redis (lib/mastodon/redis_configuration.rb).
REDIS_ENV_KEYS = (
    "SIDEKIQ_REDIS_URL", "SIDEKIQ_REDIS_SENTINEL_MASTER", "SIDEKIQ_REDIS_SENTINELS", "SIDEKIQ_REDIS_HOST",
    "SIDEKIQ_REDIS_PORT", "SIDEKIQ_REDIS_DB", "SIDEKIQ_REDIS_USER", "SIDEKIQ_REDIS_PASSWORD",
    "REDIS_URL", "REDIS_SENTINEL_MASTER", "REDIS_SENTINELS", "REDIS_HOST", "REDIS_PORT", "REDIS_DB",
    "REDIS_USER", "REDIS_PASSWORD", "REDIS_NAMESPACE",
)  # fmt: skip


# ================================================================ the remote section

# awk: the env file's Redis keys (the last assignment wins, as for systemd and dotenv), resolved
# with Mastodon's precedence, printed as shell assignments for `eval` — into a command
# substitution, never to the output.  Values are read like fleet.envfile.parse_value reads them.
# "\047" is a single quote: the program holds none, so it quotes as one plain word.
_ENV_AWK = r"""
function closed(v,   n, i) {
  sub(/[ \t]+$/, "", v)
  if (length(v) < 2 || substr(v, length(v), 1) != "\"") return 0
  n = 0
  for (i = length(v) - 1; i >= 1 && substr(v, i, 1) == "\\"; i--) n++
  return n % 2 == 0
}
function unquote(v,   inner, out, i, c, n) {
  if (length(v) >= 2 && substr(v, 1, 1) == "\047" && substr(v, length(v), 1) == "\047")
    return substr(v, 2, length(v) - 2)
  if (length(v) >= 2 && substr(v, 1, 1) == "\"" && substr(v, length(v), 1) == "\"") {
    inner = substr(v, 2, length(v) - 2); out = ""
    for (i = 1; i <= length(inner); i++) {
      c = substr(inner, i, 1)
      if (c == "\\" && i < length(inner)) {
        n = substr(inner, i + 1, 1)
        if (n == "n") c = "\n"; else if (n == "r") c = "\r"; else if (n == "t") c = "\t"
        else if (n == "\"" || n == "\\" || n == "$") c = n
        else n = ""
        if (n != "") i++
      }
      out = out c
    }
    return out
  }
  sub(/[ \t]+#.*$/, "", v); sub(/[ \t]+$/, "", v)
  return v
}
function sq(s,   out, i) {
  out = ""
  while ((i = index(s, "\047")) > 0) { out = out substr(s, 1, i - 1) "\047\"\047\"\047"; s = substr(s, i + 1) }
  return "\047" out s "\047"
}
function has(k) { return (k in val) && val[k] != "" }
function fail(code) { print "sk_err=" sq(code " " src); failed = 1 }
function hexval(c) { return index("0123456789abcdef", tolower(c)) - 1 }
# URI.decode_www_form_component, as redis-client decodes a URL's password
function form(s,   out, i, c) {
  out = ""
  for (i = 1; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (c == "+") c = " "
    else if (c == "%" && substr(s, i + 1, 2) ~ /^[0-9A-Fa-f][0-9A-Fa-f]$/) {
      c = sprintf("%c", hexval(substr(s, i + 1, 1)) * 16 + hexval(substr(s, i + 2, 1))); i += 2
    }
    out = out c
  }
  return out
}
function setup(h, p, d, u, pw) {
  if (h == "") h = "localhost"
  if (p == "") p = "6379"
  if (d == "") d = "0"
  if (h !~ /^[A-Za-z0-9._-]+$/ && h !~ /^[0-9A-Fa-f:.]+$/) return fail("bad-host")
  if (p !~ /^[0-9]+$/ || p + 0 < 1 || p + 0 > 65535) return fail("bad-port")
  if (d !~ /^[0-9]+$/ || length(d) > 5) return fail("bad-db")
  print "sk_src=" sq(src); print "sk_host=" sq(h); print "sk_port=" sq(p); print "sk_db=" sq(d)
  print "sk_tls=" sq(tls); print "sk_user=" sq(u); print "sk_pass=" sq(pw)
}
# redis[s]://[user:password@ | password@]host[:port][/db], as redis-client reads it
function from_url(   u, rest, auth, at, c, h, p, d, us, pw) {
  u = val[src]
  if (substr(u, 1, 9) == "rediss://") { tls = "tls"; rest = substr(u, 10) }
  else if (substr(u, 1, 8) == "redis://") rest = substr(u, 9)
  else return fail("bad-url")
  sub(/[?#].*$/, "", rest)
  c = index(rest, "/")
  d = ""
  if (c) { d = substr(rest, c + 1); rest = substr(rest, 1, c - 1) }
  at = 0
  for (c = length(rest); c > 0; c--) if (substr(rest, c, 1) == "@") { at = c; break }
  us = ""; pw = ""
  if (at) {
    auth = substr(rest, 1, at - 1); rest = substr(rest, at + 1)
    c = index(auth, ":")
    if (c) { us = substr(auth, 1, c - 1); pw = form(substr(auth, c + 1)) } else pw = form(auth)
  }
  h = rest; p = ""
  if (h ~ /^\[[0-9A-Fa-f:.]+\](:[0-9]*)?$/) { c = index(h, "]"); p = substr(h, c + 2); h = substr(h, 2, c - 2) }
  else if ((c = index(h, ":")) > 0) { p = substr(h, c + 1); h = substr(h, 1, c - 1) }
  return setup(h, p, d, us, pw)
}
# Mastodon builds redis://user:password@host/db from the parts; redis-client then takes a user
# without a password for the password.
function parts(pre,   h, us, pw) {
  h = has(pre "HOST") ? val[pre "HOST"] : "localhost"
  us = val[pre "USER"]; pw = val[pre "PASSWORD"]
  if (us != "" && pw == "") { pw = us; us = "" }
  return setup(h, val[pre "PORT"], val[pre "DB"], us, pw)
}
BEGIN {
  n = split("REDIS_KEYS", w, " ")
  for (i = 1; i <= n; i++) want[w[i]] = 1
  tls = "plain"
}
{ line = $0; sub(/^[ \t]+/, "", line); sub(/\r$/, "", line) }
line == "" || substr(line, 1, 1) == "#" { next }
NR > maxl { exit }
{
  sub(/^export[ \t]+/, "", line)
  eq = index(line, "=")
  if (eq < 2) next
  k = substr(line, 1, eq - 1); sub(/[ \t]+$/, "", k)
  v = substr(line, eq + 1); sub(/^[ \t]+/, "", v)
  if (substr(v, 1, 1) == "\"")
    while (!closed(v) && NR <= maxl && (getline nxt) > 0) { sub(/\r$/, "", nxt); v = v "\n" nxt }
  sub(/[ \t]+$/, "", v)
  if (k in want) val[k] = unquote(v)
}
END {
  # Sidekiq 7 has no namespaces, and Mastodon refuses REDIS_NAMESPACE since it moved to it.
  if (has("REDIS_NAMESPACE")) { src = "REDIS_NAMESPACE"; fail("namespace"); exit }
  if (has("SIDEKIQ_REDIS_URL")) { src = "SIDEKIQ_REDIS_URL"; from_url() }
  else if (has("SIDEKIQ_REDIS_SENTINEL_MASTER") && has("SIDEKIQ_REDIS_SENTINELS")) {
    src = "SIDEKIQ_REDIS_SENTINELS"; fail("sentinel")
  }
  else if (has("SIDEKIQ_REDIS_HOST")) { src = "SIDEKIQ_REDIS_HOST"; parts("SIDEKIQ_REDIS_") }
  else if (has("REDIS_URL")) { src = "REDIS_URL"; from_url() }
  else if (has("REDIS_SENTINEL_MASTER") && has("REDIS_SENTINELS")) { src = "REDIS_SENTINELS"; fail("sentinel") }
  else { src = has("REDIS_HOST") ? "REDIS_HOST" : "default"; parts("REDIS_") }
}
""".replace("REDIS_KEYS", " ".join(REDIS_ENV_KEYS))

# awk: the first round's replies (TIME, SCARD processes, SRANDMEMBER processes N, SCARD queues,
# SRANDMEMBER queues N, PING, in redis-cli's --csv form) as section lines; each member on its own line
# as the quoted, escaped token redis-cli printed — which redis-cli reads back as the same bytes.
# Exit status 1 when the second round must not run.
_MEMBERS_AWK = r"""
function members(s, kind,   t) {
  if (substr(s, 1, 6) == "ERROR,") { print "error redis " substr(s, 7, 300); bad = 1; return }
  while (s != "") {
    if (!match(s, /^"([^"\\]|\\.)*"/)) { print "error malformed " kind; bad = 1; return }
    t = substr(s, 1, RLENGTH); s = substr(s, RLENGTH + 1)
    if (length(t) > maxname) { print kind " toolong " length(t); bad = 1 }
    else print kind " " t
    if (s != "") {
      if (substr(s, 1, 1) != ",") { print "error malformed " kind; bad = 1; return }
      s = substr(s, 2)
    }
  }
}
NR > 1 && substr($0, 1, 6) == "ERROR," { print "error redis " substr($0, 7, 300); bad = 1; exit 1 }
NR == 1 { print "time " substr($0, 1, 100) }
NR == 2 { print "processes " substr($0, 1, 300) }
NR == 3 { members($0, "p") }
NR == 4 { print "queues " substr($0, 1, 300) }
NR == 5 { members($0, "q") }
NR == 6 { last = $0 }
END { if (!bad && (NR != 6 || last != "\"PONG\"")) { print "incomplete " NR " 6"; bad = 1 } exit bad }
"""

# sh: the second round's commands, from the member lines (`p "ID"`: HMGET "ID" FIELDS…; `q "NAME"`:
# LLEN and LINDEX of "queue:NAME"), printed by the shell's own loop over `$out` (no awk start).
_COMMANDS_SH = (
    "{ IFS=$nl; for l in $out; do case $l in\n"
    "  'p \"'*) printf 'HMGET %s " + " ".join(HEARTBEAT_FIELDS) + "\\n' \"${l#p }\";;\n"
    "  'q \"'*) t=\"\\\"queue:${l#q \\\"}\"; printf 'LLEN %s\\nLINDEX %s -1\\n' \"$t\" \"$t\";;\n"
    "esac; done; }"
)

# awk: the second round's replies: each process's heartbeat fields as printed (bounded), each
# queue's length, and of its oldest job only the top-level enqueued_at and created_at — a job's
# arguments may be large, and only its age matters here.  In the escaped text a top-level key is
# \"key\": while a key inside a string value is preceded by one more backslash; the last top-level
# one wins, as Sidekiq writes enqueued_at after the arguments.
_REPLIES_AWK = r"""
function num(s, key,   needle, best, pos, p, tail) {
  needle = "\\\"" key "\\\":"
  best = "-"; pos = 0
  while ((p = index(substr(s, pos + 1), needle)) > 0) {
    pos += p
    if (pos == 1 || substr(s, pos - 1, 1) != "\\") {
      tail = substr(s, pos + length(needle), 64)
      sub(/^ */, "", tail)
      if (match(tail, /^-?[0-9][0-9.eE+-]*/)) best = substr(tail, 1, RLENGTH)
    }
  }
  return best
}
NR <= np { if (length($0) > maxline) print "P toolong " length($0); else print "P " $0; next }
(NR - np) % 2 == 1 { print "L " substr($0, 1, 300); next }
$0 == "NULL" { print "J NULL"; next }
substr($0, 1, 6) == "ERROR," { print "J " substr($0, 1, 300); next }
{ print "J " num($0, "enqueued_at") " " num($0, "created_at") " " length($0) }
END { if (NR != np + 2 * nq) print "incomplete " NR " " (np + 2 * nq) }
"""


def redis_settings_command(path: str) -> str:
    """The shell command that reads, from the env file at `path` (a shell word, e.g. `"$f"`), where
    and how Mastodon reaches Sidekiq's Redis, and prints it as assignments for `eval`: `sk_err`
    (set when it cannot be told: `CODE SOURCE`), `sk_src`, `sk_host`, `sk_port`, `sk_db`, `sk_tls`,
    `sk_user` and `sk_pass`.  Never printed to the output: `eval "$(…)"` it; the password then
    goes to redis-cli in `REDISCLI_AUTH` only.  (fleet/resources/stores.py reads Redis with it too.)"""
    return f"awk -v maxl={MAX_ENV_LINES} {shlex.quote(_ENV_AWK)} {path}"


def section_script(env_path: str, *, max_processes: int = MAX_PROCESSES, max_queues: int = MAX_QUEUES,
                   max_line: int = MAX_LINE, max_name: int = MAX_NAME, timeout: int = REDIS_TIMEOUT) -> str:
    """The POSIX sh of the Sidekiq collection section: reads Sidekiq's Redis as Mastodon finds it
    from the env file at `env_path` on the host, and prints `@@sidekiq` and its lines.

    Section lines (parse_section reads them):
        target SOURCE HOST PORT DB plain|tls password|none   where it read from (SOURCE: the env key)
        error CODE [DETAIL]          nothing (more) could be read, and why; ends the section
        time "S","US"                Redis's clock (TIME)
        processes N / queues N       how many members `processes` / `queues` have (SCARD)
        p "IDENTITY" / q "NAME"      the members read (SRANDMEMBER, at most max_processes/max_queues)
        P <csv>                      per p: HMGET of info busy beat quiet rss rtt_us concurrency
        L <int> / J ENQ CREATED LEN  per q: LLEN, and its oldest job's enqueued_at, created_at, size
        end                          everything was read
    Strings are redis-cli's --csv tokens: quoted, with \\xHH, \\n, \\" … escapes, so no value can
    break a line or pass for a section header.
    """
    q = shlex.quote
    # Smaller bounds are for tests; larger ones would print what parse_section refuses.
    n_p, n_q = min(int(max_processes), MAX_PROCESSES), min(int(max_queues), MAX_QUEUES)
    max_line, max_name = min(int(max_line), MAX_LINE), min(int(max_name), MAX_NAME)
    # PING last: its answer is never empty, so no reply is lost to $(…) dropping trailing blank lines.
    first = f"TIME\\nSCARD processes\\nSRANDMEMBER processes {n_p}\\nSCARD queues\\nSRANDMEMBER queues {n_q}\\nPING\\n"
    return f"""echo '@@{SECTION}'
(
export LC_ALL=C
unset REDISCLI_AUTH
f={q(env_path)}
if [ ! -f "$f" ]; then echo 'error env-missing'; exit 0; fi
if ! command -v redis-cli >/dev/null 2>&1; then echo 'error no-redis-cli'; exit 0; fi
sk_err= sk_src= sk_host= sk_port= sk_db= sk_tls= sk_user= sk_pass=
if ! conf=$({redis_settings_command('"$f"')} 2>/dev/null); then echo 'error env-unreadable'; exit 0; fi
eval "$conf"
if [ -n "$sk_err" ]; then echo "error $sk_err"; exit 0; fi
if [ -n "$sk_pass" ]; then sk_auth=password; else sk_auth=none; fi
echo "target $sk_src $sk_host $sk_port $sk_db $sk_tls $sk_auth"
set -- -h "$sk_host" -p "$sk_port" -n "$sk_db" --csv
if [ -n "$sk_user" ]; then set -- "$@" --user "$sk_user"; fi
if [ "$sk_tls" = tls ]; then set -- "$@" --tls; fi
# The password goes to redis-cli in its environment only: never in an argv, never printed.
sk_cli() {{
  if [ -n "$sk_pass" ]; then REDISCLI_AUTH=$sk_pass timeout {int(timeout)} redis-cli "$@"
  else timeout {int(timeout)} redis-cli "$@"; fi
}}
r1=$(printf '{first}' | sk_cli "$@" 2>/dev/null)
case $r1 in
'"'*) ;;
ERROR,*) printf '%s\\n' "$r1" | awk 'NR == 1 {{ print "error redis " substr($0, 7, 294); exit }}'; exit 0;;
*) m=$(sk_cli "$@" PING 2>&1 >/dev/null | awk 'NR == 1 {{ print substr($0, 1, 300); exit }}')
   printf 'error connect %s\\n' "${{m:-no answer within {int(timeout)} s}}"; exit 0;;
esac
out=$(printf '%s\\n' "$r1" | awk -v maxname={int(max_name)} {q(_MEMBERS_AWK)})
st=$?
printf '%s\\n' "$out"
[ "$st" -eq 0 ] || exit 0
# the members counted by the shell itself (as `grep -c` would: lines that start so), no process
set -f; nl='
' np=0 nq=0 oifs=$IFS; IFS=$nl
for l in $out; do case $l in 'p "'*) np=$((np + 1));; 'q "'*) nq=$((nq + 1));; esac; done
IFS=$oifs
if [ "$np" -gt 0 ] || [ "$nq" -gt 0 ]; then
  {_COMMANDS_SH} | sk_cli "$@" 2>/dev/null |
    awk -v np="$np" -v nq="$nq" -v maxline={int(max_line)} {q(_REPLIES_AWK)}
fi
echo end
)
"""


def redis_prelude(env_path: str, marker: str) -> str:
    """The start of apply's scripts that poll Sidekiq's Redis from a Sidekiq unit's host: Redis found
    from the env file at `env_path` as the collection section finds it, `sk_cli` (the password in
    its environment only), "$@" its connection options, `sk_h` the kernel hostname Sidekiq puts in
    its identity.  What makes Redis unreadable prints `MARKER skipped (WHY)` and ends the script."""
    return f"""f={shlex.quote(env_path)}
sk_err= sk_src= sk_host= sk_port= sk_db= sk_tls= sk_user= sk_pass=
if ! command -v redis-cli >/dev/null 2>&1; then echo '{marker} skipped (no redis-cli on the host)'; exit 0; fi
if [ ! -r "$f" ] || ! conf=$({redis_settings_command('"$f"')} 2>/dev/null); then
  echo '{marker} skipped (the env file cannot be read)'; exit 0
fi
eval "$conf"
if [ -n "$sk_err" ]; then echo "{marker} skipped ($sk_err)"; exit 0; fi
set -- -h "$sk_host" -p "$sk_port" -n "$sk_db"
if [ -n "$sk_user" ]; then set -- "$@" --user "$sk_user"; fi
if [ "$sk_tls" = tls ]; then set -- "$@" --tls; fi
sk_cli() {{
  if [ -n "$sk_pass" ]; then REDISCLI_AUTH=$sk_pass timeout 10 redis-cli "$@"
  else timeout 10 redis-cli "$@"; fi
}}
read -r sk_h </proc/sys/kernel/hostname"""


def _poll(env_path: str, pid: str, marker: str, *, no_pid: str, timeout: int) -> str:
    """The head of apply's Redis polls: the prelude, the deadline, and the loop's first read —
    `$ids` (PONG, then the members of `processes`) and `$mine` (those of process `pid` on this
    host).  A `pid` of 0 or nothing prints `MARKER NO_PID` and ends the script.  Ends inside the
    loop, IFS as usual: the caller writes the rest of the loop body and its `done`."""
    # PING first: redis-cli exits 0 on a refused password too, and an error is no member
    return f"""set -f
nl='
'
sk_ifs=$IFS
sk_p={pid}
if [ "${{sk_p:-0}}" = 0 ]; then echo '{marker} {no_pid}'; exit 0; fi
{redis_prelude(env_path, marker)}
end=$(( $(date +%s) + {int(timeout)} ))
while :; do
  ids=$(printf 'PING\\nSMEMBERS processes\\n' | sk_cli "$@" 2>/dev/null)
  case $ids in PONG|PONG"$nl"*) ;; *) echo '{marker} skipped (Redis did not answer)'; exit 0;; esac
  mine=$(printf '%s\\n' "$ids" | sed 1d | head -n {MAX_PROCESSES * 4} |
    awk -v pre="$sk_h:$sk_p:" 'index($0, pre) == 1')"""


def gone_script(env_path: str, pid: str, *, timeout: int = int(BEAT_EXPIRY) + 10) -> str:
    """POSIX sh for apply, run on the host of a Sidekiq unit just stopped or restarted: wait (at
    most `timeout` s) until no live heartbeat of its old process (`pid`, a shell word, e.g. "$p0")
    is left in `processes` — Sidekiq removes its own on a clean stop; a killed one's hash expires
    60 s after its last beat.  Redis is found from the env file at `env_path` as the collection
    section finds it; the password goes to redis-cli in its environment only.  Prints one line:
    `@@sidekiq-gone ok`, `@@sidekiq-gone timeout IDENTITY` or `@@sidekiq-gone skipped REASON`."""
    marker = "@@sidekiq-gone"
    return f"""(
{_poll(env_path, pid, marker, no_pid="ok", timeout=timeout)}
  live=
  IFS=$nl
  for id in $mine; do
    [ "$(sk_cli "$@" EXISTS "$id" 2>/dev/null)" = 1 ] && live=$id
  done
  IFS=$sk_ifs
  if [ -z "$live" ]; then echo '{marker} ok'; exit 0; fi
  if [ "$(date +%s)" -ge "$end" ]; then echo "{marker} timeout $live"; exit 0; fi
  sleep 0.5
done
)"""


def gone_timeout(out: str) -> str | None:
    """The identity of the old process that still heartbeated when gone_script gave up, read from
    the output it was part of; None when it left (or the wait was skipped, which says why)."""
    line = next((ln for ln in out.splitlines() if ln.startswith("@@sidekiq-gone ")), "")
    return line.split(" ", 2)[2] if line.startswith("@@sidekiq-gone timeout ") else None


BEAT = "@@sidekiq-beat"


def beat_script(env_path: str, pid: str, *, timeout: int, each: str = ":") -> str:
    """POSIX sh for apply's Sidekiq health gate, run on the host of a Sidekiq unit just started or
    restarted: wait (at most `timeout` s) until its new process (`pid`, a shell word, e.g. "$p0")
    heartbeats in Redis — found, and the password passed, as gone_script does — running `each`
    (a shell command, e.g. the gate's check that the unit is still up) between reads.  Prints:
        @@sidekiq-beat id IDENTITY / @@sidekiq-beat live CSV   its heartbeat (HMGET of HEARTBEAT_FIELDS)
        @@sidekiq-beat none, then @@sidekiq-beat other IDENTITY  no heartbeat in time; this host's others
        @@sidekiq-beat skipped (WHY)                           Redis could not be read
    judge_beat reads that; nothing is judged here."""
    fields = " ".join(HEARTBEAT_FIELDS)
    return f"""(
{_poll(env_path, pid, BEAT, no_pid="skipped (the unit has no main process)", timeout=timeout)}
  IFS=$nl
  for id in $mine; do
    r=$(sk_cli "$@" --csv HMGET "$id" {fields} 2>/dev/null | head -n 1 | cut -c1-{MAX_LINE + 1})
    case $r in '"'*)
      printf '{BEAT} id %s\\n{BEAT} live %s\\n' "$(printf '%s' "$id" | cut -c1-{MAX_NAME})" "$r"; exit 0;; esac
  done
  IFS=$sk_ifs
  {each}
  if [ "$(date +%s)" -ge "$end" ]; then
    echo '{BEAT} none'
    printf '%s\\n' "$ids" | sed 1d | awk -v pre="$sk_h:" 'index($0, pre) == 1' | head -n 8 | cut -c1-200 |
      sed 's/^/{BEAT} other /'
    exit 0
  fi
  sleep 0.5
done
)"""


# ================================================================ the view, parsed


@dataclass(frozen=True)
class RedisTarget:
    """Where the section read from (never the password: only whether there is one)."""

    source: str  # the env key that decided (REDIS_URL, SIDEKIQ_REDIS_HOST …) or "default"
    host: str
    port: int
    db: int
    tls: bool
    auth: bool

    def describe(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db} (from {self.source})"


@dataclass(frozen=True)
class SidekiqProcess:
    """One live Sidekiq process as its heartbeat says."""

    identity: str
    hostname: str
    pid: int
    tag: str
    concurrency: int
    queues: tuple[tuple[str, int], ...]  # (queue, weight) in Sidekiq's order; weight 0 = unweighted
    labels: tuple[str, ...]
    started_at: float
    version: str
    busy: int
    beat: float  # epoch seconds of the last heartbeat
    quiet: bool
    rss: int  # kB
    rtt_us: int

    def queue_names(self) -> tuple[str, ...]:
        return tuple(q for q, _ in self.queues)


@dataclass(frozen=True)
class QueueState:
    name: str
    size: int
    oldest_enqueued_at: float | None  # epoch seconds (Sidekiq 8's milliseconds converted); None when empty
    latency: float  # seconds the oldest job has waited, at Redis's clock; 0 when empty (as Sidekiq)


@dataclass(frozen=True)
class SidekiqView:
    """What the section found.  `error` set: nothing could be read (Redis down, no env file …)."""

    target: RedisTarget | None = None
    error: str = ""
    redis_time: float = 0.0
    processes: tuple[SidekiqProcess, ...] = ()
    queues: tuple[QueueState, ...] = ()
    processes_total: int = 0  # members of `processes` (SCARD), live or not, read or not
    queues_total: int = 0
    stale: tuple[str, ...] = ()  # members read whose heartbeat hash has expired (a dead process)

    @property
    def complete(self) -> bool:
        """Every member of `processes` and `queues` was read."""
        return (not self.error and self.processes_total == len(self.processes) + len(self.stale)
                and self.queues_total == len(self.queues))

    def queue(self, name: str) -> QueueState | None:
        return next((q for q in self.queues if q.name == name), None)


_ERRORS = {
    "env-missing": "the env file is not on the host",
    "env-unreadable": "the env file cannot be read",
    "no-redis-cli": "redis-cli is not installed on the host",
    "namespace": "REDIS_NAMESPACE is set: Sidekiq 7 has no namespaces (Mastodon refuses it)",
    "sentinel": "Sidekiq's Redis is behind Sentinel ({detail}), which fleet does not read",
    "bad-url": "{detail} is not a redis:// or rediss:// URL",
    "bad-host": "the Redis host from {detail} is not a host name or address",
    "bad-port": "the Redis port from {detail} is not a port number",
    "bad-db": "the Redis database from {detail} is not a number",
    "connect": "cannot reach Redis: {detail}",
    "redis": "Redis refused: {detail}",
    "malformed": "redis-cli printed something unexpected",
}
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|NULL|-?[0-9]+')
_ESCAPE = re.compile(rb'\\(x[0-9a-fA-F]{2}|[nrtab"\\])')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b", b'"': b'"', b"\\": b"\\"}
_NUMBER = re.compile(r"-?[0-9][0-9.eE+-]*")
MAX_SECTION_LINES = 16 + 2 * MAX_PROCESSES + 3 * MAX_QUEUES


def parse_section(host: str, lines: Iterable[str]) -> SidekiqView:
    """The section's lines (without its `@@sidekiq` header) as a `SidekiqView`.  Anything that is
    not what section_script prints — or more of it than its bounds allow — raises ParseError."""
    try:
        return _Reader(host).read(lines)
    except ParseError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
        raise _bad(host, f"malformed ({type(e).__name__})") from None


def _bad(host: str, what: str) -> ParseError:
    return ParseError(f"{host}: the {SECTION} section of the collection output is {what}"[:400], host=host,
                      section=SECTION, hint="fleet refuses Sidekiq data it cannot read whole; inspect Redis by hand "
                                            "(redis-cli SMEMBERS processes) for entries Sidekiq did not write")


class _Reader:
    def __init__(self, host: str) -> None:
        self.host = host
        self.target: RedisTarget | None = None
        self.error = ""
        self.time: float | None = None
        self.totals: dict[str, int] = {}
        self.members: dict[str, list[str]] = {"p": [], "q": []}
        self.heartbeats: list[list[str | None]] = []
        self.lengths: list[int] = []
        self.jobs: list[tuple[str, str] | None] = []
        self.ended = False

    def bad(self, what: str) -> ParseError:
        return _bad(self.host, what)

    def read(self, lines: Iterable[str]) -> SidekiqView:
        for n, line in enumerate(lines):
            if n >= MAX_SECTION_LINES:
                raise self.bad(f"longer than {MAX_SECTION_LINES:,} lines")
            if len(line) > MAX_LINE + 64:
                raise self.bad(f"holding a line of {len(line):,} characters")
            if line:
                self.line(line)
        if self.error:
            return SidekiqView(target=self.target, error=self.error)
        if not self.ended:
            raise self.bad("truncated (no end line)")
        return self.view()

    def line(self, line: str) -> None:
        tag, _, rest = line.partition(" ")
        if tag == "end" and self.error and not self.ended:  # after an incomplete second round
            self.ended = True
            return
        if self.ended or self.error:
            raise self.bad(f"continuing after its {'end' if self.ended else 'error'} line")
        if tag == "target" and self.target is None:
            self.target = self.parse_target(rest)
        elif tag == "error":
            code, _, detail = rest.partition(" ")
            if code not in _ERRORS:
                raise self.bad(f"holding an unknown error {code[:40]!r}")
            detail = detail.strip()[:300]
            if code == "redis" and len(detail) >= 2 and detail[0] == detail[-1] == '"':
                detail = detail[1:-1]  # redis-cli's quoted error text
            self.error = _ERRORS[code].format(detail=detail)
        elif tag == "incomplete":
            self.error = "Redis stopped answering part way (the read was incomplete)"
        elif tag == "time" and self.time is None:
            seconds, micros = (self.integer(t) for t in self.csv(rest, 2))
            self.time = seconds + micros / 1e6
        elif tag in ("processes", "queues") and tag not in self.totals:
            self.totals[tag] = self.integer(rest)
        elif tag in ("p", "q"):
            if rest.startswith("toolong"):
                raise self.bad(f"holding a {'process identity' if tag == 'p' else 'queue name'} longer than "
                               f"{MAX_NAME:,} characters")
            self.members[tag].append(self.string(self.csv(rest, 1)[0]))
        elif tag == "P":
            if rest.startswith("toolong"):
                raise self.bad(f"holding a heartbeat longer than {MAX_LINE:,} characters")
            self.heartbeats.append(self.csv(rest, len(HEARTBEAT_FIELDS)))
        elif tag == "L":
            self.lengths.append(self.integer(rest))
        elif tag == "J":
            if rest == "NULL":
                self.jobs.append(None)
            else:
                fields = rest.split(" ")
                if len(fields) != 3 or not all(f == "-" or _NUMBER.fullmatch(f) for f in fields[:2]):
                    raise self.bad(f"holding an unexpected job line {rest[:60]!r}")
                self.jobs.append((fields[0], fields[1]))
        elif tag == "end":
            self.ended = True
        else:
            raise self.bad(f"holding an unexpected line {line[:60]!r}")

    def parse_target(self, rest: str) -> RedisTarget:
        f = rest.split(" ")
        if len(f) != 6 or f[4] not in ("plain", "tls") or f[5] not in ("password", "none"):
            raise self.bad(f"holding a malformed target line {rest[:60]!r}")
        return RedisTarget(source=f[0], host=f[1], port=self.integer(f[2]), db=self.integer(f[3]),
                           tls=f[4] == "tls", auth=f[5] == "password")

    def csv(self, text: str, count: int) -> list[str | None]:
        """redis-cli --csv: `count` tokens separated by commas."""
        out: list[str | None] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise self.bad(f"holding a malformed value near {text[pos:pos + 40]!r}")
            out.append(None if m.group() == "NULL" else m.group())
            pos = m.end()
            if pos < len(text):
                if text[pos] != ",":
                    raise self.bad(f"holding a malformed value near {text[pos:pos + 40]!r}")
                pos += 1
        if len(out) != count:
            raise self.bad(f"holding {len(out)} values where {count} were expected")
        return out

    def string(self, token: str | None) -> str:
        try:
            return decode_token(token)
        except ValueError as e:
            raise self.bad(f"holding {e}") from None

    def integer(self, token: str | None) -> int:
        text = token[1:-1] if token and token.startswith('"') else token
        if text is None or not re.fullmatch(r"-?[0-9]{1,19}", text):
            raise self.bad(f"holding {str(token)[:40]!r} where a number was expected")
        return int(text)

    def view(self) -> SidekiqView:
        procs, queues = self.members["p"], self.members["q"]
        if self.time is None or set(self.totals) != {"processes", "queues"}:
            raise self.bad("missing its time or counts")
        if (len(self.heartbeats), len(self.lengths), len(self.jobs)) != (len(procs), len(queues), len(queues)):
            raise self.bad("holding replies that do not match the members read")
        if len(procs) > MAX_PROCESSES or len(queues) > MAX_QUEUES:
            raise self.bad("holding more members than fleet reads")
        live: list[SidekiqProcess] = []
        stale: list[str] = []
        for identity, fields in zip(procs, self.heartbeats, strict=True):
            if fields[0] is None:  # the hash expired: a process that died without saying so
                stale.append(identity)
            else:
                live.append(self.process(identity, [None if f is None else self.string(f) for f in fields]))
        states = [self.queue(name, size, job) for name, size, job in zip(queues, self.lengths, self.jobs, strict=True)]
        return SidekiqView(
            target=self.target, redis_time=self.time,
            processes=tuple(sorted(live, key=lambda p: (p.hostname, p.pid, p.identity))),
            queues=tuple(sorted(states, key=lambda s: s.name)),
            processes_total=self.totals["processes"], queues_total=self.totals["queues"],
            stale=tuple(sorted(stale)),
        )

    def process(self, identity: str, fields: list[str | None]) -> SidekiqProcess:
        info_text, busy, beat, quiet, rss, rtt_us, concurrency = fields
        assert info_text is not None
        try:
            info = json.loads(info_text)
        except (ValueError, RecursionError):
            raise self.bad(f"holding a heartbeat of {identity[:60]!r} whose info is not JSON") from None
        if not isinstance(info, dict):
            raise self.bad(f"holding a heartbeat of {identity[:60]!r} whose info is not a JSON object")

        def field(name: str, kind: type, default: object) -> object:
            value = info.get(name, default)
            ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise self.bad(f"holding a heartbeat of {identity[:60]!r} with a malformed {name!r}")
            return value

        names = field("queues", list, [])
        labels = field("labels", list, [])
        assert isinstance(names, list) and isinstance(labels, list)
        if not all(isinstance(q, str) for q in names) or not all(isinstance(x, str) for x in labels):
            raise self.bad(f"holding a heartbeat of {identity[:60]!r} with malformed queues or labels")
        weights, capsule_threads = self.weights(identity, info)
        threads = concurrency if concurrency is not None else info.get("concurrency", capsule_threads)
        return SidekiqProcess(
            identity=identity,
            hostname=str(field("hostname", str, "")),
            pid=int(field("pid", int, 0)),  # type: ignore[call-overload]
            tag=str(field("tag", str, "")),
            concurrency=self.count(threads, identity, "concurrency"),
            queues=tuple((q, weights.get(q, 0)) for q in dict.fromkeys(names)),
            labels=tuple(labels),
            started_at=float(field("started_at", float, 0.0)),  # type: ignore[arg-type]
            version=str(field("version", str, "")),
            busy=self.count(busy or 0, identity, "busy"),
            beat=self.seconds(beat, identity),
            quiet=quiet == "true",
            rss=self.count(rss or 0, identity, "rss"),
            rtt_us=self.count(rtt_us or 0, identity, "rtt_us"),
        )

    def weights(self, identity: str, info: dict[str, object]) -> tuple[dict[str, int], int | None]:
        """Queue weights: Sidekiq 7 lists one {queue: weight} per capsule under `weights`; Sidekiq 8
        also describes each capsule (threads, weights) under `capsules`."""
        out: dict[str, int] = {}
        threads: int | None = None
        capsules = info.get("capsules")
        tables: list[object] = []
        if isinstance(capsules, dict):
            threads = 0
            for cap in capsules.values():
                if not isinstance(cap, dict):
                    raise self.bad(f"holding a heartbeat of {identity[:60]!r} with a malformed capsule")
                tables.append(cap.get("weights", {}))
                threads += self.count(cap.get("concurrency", 0), identity, "concurrency")
        raw = info.get("weights", [])
        tables += raw if isinstance(raw, list) else [raw]
        for table in tables:
            if not isinstance(table, dict):
                raise self.bad(f"holding a heartbeat of {identity[:60]!r} with malformed weights")
            for q, w in table.items():
                out.setdefault(q, self.count(w, identity, "weights"))
        return out, threads

    def count(self, value: object, identity: str, name: str) -> int:
        if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**12:
            return value
        raise self.bad(f"holding a heartbeat of {identity[:60]!r} with a malformed {name!r}")

    def seconds(self, value: str | None, identity: str) -> float:
        try:
            beat = float(value or "")
        except ValueError:
            raise self.bad(f"holding a heartbeat of {identity[:60]!r} with a malformed 'beat'") from None
        if not math.isfinite(beat):
            raise self.bad(f"holding a heartbeat of {identity[:60]!r} with a malformed 'beat'")
        return beat

    def queue(self, name: str, size: int, job: tuple[str, str] | None) -> QueueState:
        when = None if job is None else enqueued_seconds(job[0] if job[0] != "-" else job[1])
        assert self.time is not None
        latency = max(0.0, self.time - when) if when is not None else 0.0
        return QueueState(name=name, size=max(0, size), oldest_enqueued_at=when, latency=latency)


def decode_token(token: str | None) -> str:
    """The text a quoted, escaped redis-cli --csv token stands for (UTF-8); ValueError otherwise."""
    if token is None or len(token) < 2 or token[0] != '"' or token[-1] != '"':
        raise ValueError("a value that is not a string")
    try:
        raw = token[1:-1].encode("ascii")
    except UnicodeEncodeError:  # redis-cli escapes every byte that is not printable ASCII
        raise ValueError("text that is not ASCII, as redis-cli never prints it") from None
    if b"\\" in _ESCAPE.sub(b"", raw):
        raise ValueError("an unknown escape sequence")

    def one(m: re.Match[bytes]) -> bytes:
        e = m.group(1)
        return bytes([int(e[1:], 16)]) if e[:1] == b"x" else _ESCAPES[e]

    try:
        return _ESCAPE.sub(one, raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("text that is not UTF-8") from None


def enqueued_seconds(text: str) -> float | None:
    """A job's enqueued_at (or created_at) as epoch seconds: a float is seconds (Sidekiq 7), an
    integer milliseconds (Sidekiq 8) — the test Sidekiq's own Queue#latency makes."""
    if text == "-" or not _NUMBER.fullmatch(text):
        return None
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text) / 1000.0
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


# ================================================================ policy

POLICY_KEYS = ("max_latency", "max_latency_error", "env_file")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def load_policy(table: object, *, file: str = "", env_files: Sequence[str] | None = None,
                prefix: str = "policy.sidekiq") -> tuple[SidekiqPolicy, list[Finding]]:
    """Validate the `[policy.sidekiq]` table (as tomllib gives it); every problem is a Finding and
    a valid default stands in for the bad value.  `env_files`: the declared env file names."""
    out: list[Finding] = []

    def error(key: str, message: str, hint: str, code: str = "config.invalid") -> None:
        out.append(Finding("error", code, message, file=file, key=f"{prefix}.{key}" if key else prefix, hint=hint))

    if table is None:
        return SidekiqPolicy(), out
    if not isinstance(table, dict):
        error("", f"'{prefix}' must be a table", f"write [{prefix}] with max_latency = 300", "config.wrong-type")
        return SidekiqPolicy(), out
    for key in table:
        if key not in POLICY_KEYS:
            error(str(key), f"unknown key '{prefix}.{key}'",
                  did_you_mean(str(key), POLICY_KEYS) or f"allowed keys here: {', '.join(POLICY_KEYS)}",
                  "config.unknown-key")
    default = SidekiqPolicy()
    limits: dict[str, float] = {}
    for key in ("max_latency", "max_latency_error"):
        value = table.get(key, getattr(default, key))
        if isinstance(value, bool) or not isinstance(value, int | float):
            error(key, f"'{prefix}.{key}' must be a number of seconds", f"write {key} = {getattr(default, key):g}",
                  "config.wrong-type")
            value = getattr(default, key)
        elif not math.isfinite(value) or not 0 < value <= 7 * 86400:
            error(key, f"'{prefix}.{key}' = {value!r} is not a latency (seconds, above 0, at most a week)",
                  f"write {key} = {getattr(default, key):g}", "config.bad-value")
            value = getattr(default, key)
        limits[key] = float(value)
    if limits["max_latency_error"] <= limits["max_latency"]:
        if "max_latency_error" in table or "max_latency" in table:
            error("max_latency_error", f"'{prefix}.max_latency_error' ({limits['max_latency_error']:g} s) must be "
                  f"above max_latency ({limits['max_latency']:g} s): above it a latency is an error, above "
                  "max_latency a warning", "raise max_latency_error, or lower max_latency", "config.bad-value")
        limits["max_latency_error"] = max(limits["max_latency"] * 2, default.max_latency_error)
    env_file = table.get("env_file")
    if env_file is not None:
        if not isinstance(env_file, str) or not _NAME.fullmatch(env_file):
            error("env_file", f"'{prefix}.env_file' must be the name of an [env_files.NAME] table",
                  "write env_file = \"mastodon\"", "config.wrong-type")
            env_file = None
        elif env_files is not None and env_file not in env_files:
            error("env_file", f"'{prefix}.env_file' names {env_file!r}, which no [env_files.…] table declares",
                  did_you_mean(env_file, env_files) or f"declared env files: {', '.join(env_files) or 'none'}",
                  "config.bad-reference")
            env_file = None
    return SidekiqPolicy(limits["max_latency"], limits["max_latency_error"], env_file), out


@dataclass(frozen=True)
class RedisSource:
    """Where the collection reads Sidekiq's view: on `host`, Redis as the env file at `env_path` says."""

    host: str
    env_path: str
    env_file: str  # its name in desired_state.toml


def locate_redis(desired: Desired, policy: SidekiqPolicy) -> RedisSource | Finding:
    """The host of the declared Redis and the env file that tells Sidekiq where Redis is: the
    policy's env_file, else the one every Sidekiq service loads; a Finding when there is none."""
    redis = [s for s in desired.services if s.kind == Kind.REDIS and s.hosts]
    sidekiq = [s for s in desired.services if s.kind == Kind.SIDEKIQ]
    if not redis or not sidekiq:
        return Finding("warning", "sidekiq.view-unavailable",
                       "no Redis or no Sidekiq service is declared: fleet cannot read Sidekiq's own view",
                       file=desired.source, key="services",
                       hint="declare the Sidekiq Redis as a service of kind \"redis\"")
    host = redis[0].hosts[0]
    def loaded(path: str) -> bool:
        return all(s.unit_spec is None or path in s.unit_spec.environment_files for s in sidekiq)

    files = [e for e in desired.env_files_on(host)
             if (e.name == policy.env_file if policy.env_file else loaded(e.path))]
    if not files:
        return Finding("warning", "sidekiq.view-unavailable",
                       f"no env file that the Sidekiq services load is declared on {host}, the Redis host: fleet "
                       "cannot tell where Sidekiq's Redis is", file=desired.source, key="env_files", host=host,
                       hint=f"add {host} to the hosts of that env file, or name it in policy.sidekiq.env_file")
    return RedisSource(host=host, env_path=files[0].path, env_file=files[0].name)


# ================================================================ systemd's side, and the join

@dataclass(frozen=True)
class SidekiqUnit:
    """A Sidekiq unit on a host as systemd shows it, with what is declared for it."""

    host: str
    unit: str
    service: str  # the declared service; "" for a unit found by discovery only
    active: bool
    main_pid: int
    active_since: float | None  # epoch seconds, when systemd says it in UTC
    queues: tuple[tuple[str, int], ...]  # declared (weights as Sidekiq shows them: 0 = none), else from argv
    concurrency: int | None
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT

    @property
    def declared(self) -> bool:
        return bool(self.service)


_UTC_STAMP = re.compile(r"^\w{3} (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) (?:UTC|GMT)$")


def active_since(unit: UnitState) -> float | None:
    """ActiveEnterTimestamp as epoch seconds, when systemd printed it in UTC (else unknown)."""
    m = _UTC_STAMP.match(unit.active_enter)
    if not m:
        return None
    return float(calendar.timegm(tuple(int(x) for x in m.groups()) + (0, 0, 0)))


def sidekiq_units(desired: Desired, results: Mapping[str, HostResult]) -> list[SidekiqUnit]:
    """Every Sidekiq unit systemd shows on an observed host: declared Sidekiq services, and any
    other unit whose ExecStart runs sidekiq (found by discovery)."""
    out: list[SidekiqUnit] = []
    for host, result in sorted(results.items()):
        if not isinstance(result, HostState):
            continue
        declared: dict[str, Service] = {s.unit: s for s in desired.services_on(host) if s.kind == Kind.SIDEKIQ}
        for u in result.units:
            service = declared.get(u.unit)
            args = parse_argv(u.exec_start)
            if service is None and args is None:
                continue
            concurrency, queues = (args.concurrency, args.queues_weighted()) if args else (None, ())
            timeout = args.timeout if args and args.timeout is not None else DEFAULT_SHUTDOWN_TIMEOUT
            if service is not None and service.sidekiq is not None:
                concurrency = service.sidekiq.concurrency
                queues = tuple((q, w or 0) for q, w in service.sidekiq.queues)
            out.append(SidekiqUnit(host=host, unit=u.unit, service=service.name if service else "",
                                   active=u.active_state == "active", main_pid=u.main_pid,
                                   active_since=active_since(u), queues=queues, concurrency=concurrency,
                                   shutdown_timeout=timeout))
    return out


def host_names(desired: Desired, results: Mapping[str, HostResult]) -> dict[str, str]:
    """Sidekiq's `hostname` (the host's kernel hostname) → the inventory host it is."""
    out: dict[str, str] = {}
    for h in desired.hosts:
        out.setdefault(h.address, h.name)
    for h in desired.hosts:
        out[h.name] = h.name
    for name, r in results.items():
        if isinstance(r, HostState) and r.facts.hostname:
            out[r.facts.hostname] = name
    return out


def inventory_host(hostname: str, names: Mapping[str, str]) -> str:
    return names.get(hostname) or names.get(hostname.split(".", 1)[0], "")


@dataclass(frozen=True)
class Match:
    """A live process, the inventory host it runs on ("" when none) and its unit (None: none found)."""

    process: SidekiqProcess
    host: str
    unit: SidekiqUnit | None
    how: str = ""  # "pid" (MainPID) or "queues" (same host, same queues)


def join(processes: Sequence[SidekiqProcess], units: Sequence[SidekiqUnit],
         names: Mapping[str, str]) -> tuple[list[Match], list[SidekiqUnit]]:
    """Each process with its unit — by host and MainPID, else by host and the same queues — and
    the units no process was joined to."""
    free = list(units)
    hosts = {p.identity: inventory_host(p.hostname, names) for p in processes}
    found: dict[str, tuple[SidekiqUnit, str]] = {}
    for p in processes:
        unit = next((u for u in free if u.host == hosts[p.identity] and u.main_pid and u.main_pid == p.pid), None)
        if unit is not None:
            found[p.identity] = (unit, "pid")
            free.remove(unit)
    for p in processes:
        if p.identity in found:
            continue
        unit = next((u for u in free if u.host == hosts[p.identity] and u.active and u.queues
                     and {q for q, _ in u.queues} == set(p.queue_names())), None)
        if unit is not None:
            found[p.identity] = (unit, "queues")
            free.remove(unit)
    matches = [Match(p, hosts[p.identity], *found.get(p.identity, (None, ""))) for p in processes]
    return matches, free


# ================================================================ apply's Sidekiq health gate


def judge_beat(out: str, host: str, expected: SidekiqSpec, window: float) -> str:
    """What beat_script printed, judged against the unit's declaration: "" when its new process
    heartbeats with the declared queues (unless Sidekiq reads them from its config file) and
    concurrency (when declared), else why the gate fails, saying what was read."""
    lines = [ln[len(BEAT) + 1:] for ln in out.splitlines() if ln.startswith(BEAT + " ")]
    tagged = [ln.partition(" ") for ln in lines]
    first = tagged[0][0] if tagged else ""
    if first == "skipped":
        return f"cannot read Sidekiq's heartbeats in Redis {tagged[0][2]}"
    if first == "none":
        others = [rest[:200] for tag, _, rest in tagged if tag == "other"]
        seen = f"; this host's processes in Redis: {', '.join(others)}" if others else \
            "; no process of this host is in Redis"
        return f"no Sidekiq heartbeat from its new process within {window:g} s{seen}"
    found = dict((tag, rest) for tag, _, rest in tagged)
    if first != "id" or "live" not in found:
        return "the Sidekiq heartbeat check printed nothing fleet reads (no heartbeat was judged)"
    identity = found["id"][:MAX_NAME]
    reader = _Reader(host)
    try:
        fields = reader.csv(found["live"], len(HEARTBEAT_FIELDS))
        p = reader.process(identity, [None if f is None else reader.string(f) for f in fields])
    except ParseError as e:
        return f"the heartbeat of {identity!r} cannot be read: {e.message}"
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
        return f"the heartbeat of {identity!r} cannot be read ({type(e).__name__})"
    declared = tuple((q, w or 0) for q, w in expected.queues)
    problems = []
    if not expected.queues_from_config and not _same_queues(declared, p.queues):
        problems.append(f"queues {_queues(p)} (declared: {_weighted(declared)})")
    if expected.concurrency is not None and p.concurrency != expected.concurrency:
        problems.append(f"concurrency {p.concurrency} (declared: {expected.concurrency})")
    if problems:
        return f"its new process (pid {p.pid}) heartbeats with {' and '.join(problems)}"
    return ""


# ================================================================ findings


def track_quiet(previous: Mapping[str, float], view: SidekiqView, now: float) -> dict[str, float]:
    """identity → when it was first seen quiet, carried from one observation to the next (the view
    says only *that* a process is quiet, not since when)."""
    return {p.identity: previous.get(p.identity, now) for p in view.processes if p.quiet}


def check(desired: Desired, results: Mapping[str, HostResult], view: SidekiqView, now: float,
          policy: SidekiqPolicy, *, quiet_since: Mapping[str, float] | None = None) -> list[Finding]:
    """Sidekiq's view cross-checked with systemd and the declaration (see the check_* functions)."""
    if view.error:
        where = f" ({view.target.describe()})" if view.target else ""
        return [Finding("warning", "sidekiq.view-unavailable", f"cannot read Sidekiq's view{where}: {view.error}",
                        file=desired.source, hint="check the Redis service and the env file's REDIS_* keys",
                        extra={"subject": "view"})]
    names = host_names(desired, results)
    matches, unmatched = join(view.processes, sidekiq_units(desired, results), names)
    out: list[Finding] = []
    if not view.complete:
        out.append(Finding(
            "warning", "sidekiq.view-truncated",
            f"Redis lists {view.processes_total} Sidekiq processes and {view.queues_total} queues; fleet read "
            f"{len(view.processes) + len(view.stale)} and {len(view.queues)}: findings that need every process "
            "are skipped", file=desired.source,
            hint="find what floods the `processes` or `queues` set (redis-cli SCARD processes)",
            extra={"subject": "view"}))
    out += check_unmanaged(desired, results, matches)
    if view.complete:
        out += check_heartbeats(unmatched, now)
        out += check_unserved(view)
    out += check_latency(view, policy, desired.source)
    out += check_drift(matches, desired.source)
    out += check_quiet(matches, quiet_since or {}, now, desired.source)
    return out


def _queues(p: SidekiqProcess) -> str:
    return _weighted(p.queues)


def _weighted(queues: Sequence[tuple[str, int]]) -> str:
    return ", ".join(q if not w else f"{q},{w}" for q, w in queues) or "none"


def check_unmanaged(desired: Desired, results: Mapping[str, HostResult], matches: Sequence[Match]) -> list[Finding]:
    """A live process with no declared unit behind it — started by hand, by another unit, or on a
    machine fleet does not know — is an error, and the placement policy applies to its host."""
    from fleet.policy import check_placement  # the rule for declared services, applied to what runs

    out: list[Finding] = []
    for m in matches:
        p = m.process
        if m.unit is not None and m.unit.declared:
            continue
        if m.host and not isinstance(results.get(m.host), HostState):
            continue  # its host was not observed: whether a unit runs it is unknown
        where = m.host or f"{p.hostname} (not in the inventory)"
        by = f"unit {m.unit.unit}, which is not declared" if m.unit else "no systemd unit"
        out.append(Finding(
            "error", "sidekiq.process-unmanaged",
            f"a live Sidekiq process on {where} (pid {p.pid}, queues {_queues(p)}, concurrency {p.concurrency}) "
            f"is run by {by}", file=desired.source, host=m.host,
            hint="stop it, or declare it as a Sidekiq service (fleet plan then takes it over)",
            extra={"identity": p.identity, "subject": p.identity}))
        if m.host:
            out += check_placement(desired, [(m.host, Kind.SIDEKIQ, f"the Sidekiq process pid {p.pid}", "")])
    return out


def check_heartbeats(unmatched: Sequence[SidekiqUnit], now: float) -> list[Finding]:
    """A declared unit systemd calls active whose process has not heartbeated for longer than the
    heartbeat's expiry: hung, stopped, or pointed at another Redis."""
    out: list[Finding] = []
    for u in unmatched:
        if not u.declared or not u.active:
            continue
        if u.active_since is not None and now - u.active_since <= BEAT_EXPIRY:
            continue  # still booting: Sidekiq beats once its app has loaded
        out.append(Finding(
            "error", "sidekiq.no-heartbeat",
            f"{u.unit} on {u.host} is active (pid {u.main_pid}) but no Sidekiq process of it has heartbeated "
            f"in Redis for more than {BEAT_EXPIRY:g} s", host=u.host,
            hint="it is hung, stopped (SIGSTOP), or reads another Redis than the one fleet reads: check its "
                 "journal and its REDIS_* settings, then restart it", extra={"subject": u.unit}))
    return out


def check_unserved(view: SidekiqView) -> list[Finding]:
    """Jobs waiting in a queue that no live, working (not quiet) process takes jobs from."""
    serving = {q for p in view.processes if not p.quiet for q in p.queue_names()}
    return [Finding("error", "sidekiq.queue-stalled",
                    f"queue {q.name!r} holds {q.size} job(s), the oldest waiting {q.latency:.0f} s, and no live "
                    "Sidekiq process serves it",
                    hint=f"start a Sidekiq service with {q.name!r} in its queues", extra={"subject": q.name})
            for q in view.queues if q.size > 0 and q.name not in serving]


def check_latency(view: SidekiqView, policy: SidekiqPolicy, file: str = "") -> list[Finding]:
    out: list[Finding] = []
    for q in view.queues:
        if q.size <= 0 or q.latency <= policy.max_latency:
            continue
        error = q.latency > policy.max_latency_error
        limit = policy.max_latency_error if error else policy.max_latency
        out.append(Finding(
            "error" if error else "warning", "sidekiq.latency",
            f"queue {q.name!r}: the oldest of its {q.size} job(s) has waited {q.latency:.0f} s (more than "
            f"{limit:g} s)", file=file, key=f"policy.sidekiq.{'max_latency_error' if error else 'max_latency'}",
            hint=f"add Sidekiq capacity for {q.name!r} (processes, -c) or find what stalls its jobs",
            extra={"subject": q.name}))
    return out


def check_drift(matches: Sequence[Match], file: str = "") -> list[Finding]:
    """A process joined to its declared unit whose live queues or concurrency differ from it."""
    out: list[Finding] = []
    for m in matches:
        u, p = m.unit, m.process
        if u is None or not u.declared:
            continue
        problems = []
        if not _same_queues(u.queues, p.queues):
            problems.append(f"queues {_queues(p)} (declared: {_weighted(u.queues)})")
        if u.concurrency is not None and p.concurrency != u.concurrency:
            problems.append(f"concurrency {p.concurrency} (declared: {u.concurrency})")
        if problems:
            out.append(Finding(
                "error", "sidekiq.process-drift",
                f"{u.unit} on {u.host} runs a Sidekiq process (pid {p.pid}) with {' and '.join(problems)}",
                file=file, key=f"services.{u.service}", host=u.host,
                hint="restart it to pick up its declaration (fleet apply), or check config/sidekiq.yml and -q/-c",
                extra={"subject": u.unit}))
    return out


def _same_queues(declared: Sequence[tuple[str, int]], live: Sequence[tuple[str, int]]) -> bool:
    """Weighted queues are a set with weights; unweighted ones are checked strictly in order, so
    then the order matters too (Sidekiq's strict mode)."""
    if dict(declared) != dict(live):
        return False
    strict = all(w == 0 for _, w in live)
    return not strict or [q for q, _ in declared] == [q for q, _ in live]


def check_quiet(matches: Sequence[Match], quiet_since: Mapping[str, float], now: float,
                file: str = "") -> list[Finding]:
    """A process told to stop taking work (TSTP) that has not stopped within its shutdown timeout."""
    out: list[Finding] = []
    for m in matches:
        p = m.process
        since = quiet_since.get(p.identity)
        timeout = m.unit.shutdown_timeout if m.unit else DEFAULT_SHUTDOWN_TIMEOUT
        if not p.quiet or since is None or now - since <= timeout:
            continue
        where = f"{m.unit.unit} on {m.host}" if m.unit else f"a process on {m.host or p.hostname}"
        out.append(Finding(
            "warning", "sidekiq.quiet-stuck",
            f"{where} (pid {p.pid}) has been quiet for {now - since:.0f} s, longer than its shutdown timeout "
            f"({timeout:g} s): it takes no jobs and does not exit", file=file, host=m.host,
            hint="finish the stop or restart it (systemctl restart), and look at what its busy jobs wait for",
            extra={"subject": p.identity}))
    return out


# ================================================================ the report status and audit show


@dataclass(frozen=True)
class QueueServed:
    """One queue as both sides see it."""

    name: str
    size: int | None  # None: Redis does not list the queue (never used, or the view is missing)
    latency: float | None
    by_systemd: tuple[str, ...]  # "host:unit" of active units whose declared (or -q) queues include it
    by_heartbeat: tuple[str, ...]  # "host:pid" of live, working (not quiet) processes that serve it


@dataclass(frozen=True)
class SidekiqReport:
    """Sidekiq's own view joined with systemd's: what `fleet status` and `fleet audit` show."""

    host: str  # the inventory host whose Redis was read
    view: SidekiqView
    now: float  # the clock the ages are taken at (Redis's, else the collection's)
    matches: tuple[Match, ...]
    silent: tuple[SidekiqUnit, ...]  # Sidekiq units no live process was joined to
    queues: tuple[QueueServed, ...]
    findings: tuple[Finding, ...]


def find_view(results: Mapping[str, HostResult]) -> tuple[str, SidekiqView, float] | None:
    """(host, view, collected_at) of the host where Sidekiq's view was read; None when none was."""
    for host, r in sorted(results.items()):
        if isinstance(r, HostState):
            view = r.facts_of(SECTION)
            if isinstance(view, SidekiqView):
                return host, view, r.collected_at
    return None


def quiet_since(previous: Mapping[str, HostResult]) -> dict[str, float]:
    """identity → the earliest time it is known to have been quiet: the previous observation's
    clock, for each process that was quiet then already (what `check_quiet` needs)."""
    found = find_view(previous)
    if found is None:
        return {}
    _, view, at = found
    return track_quiet({}, view, view.redis_time or at)


def sidekiq_report(desired: Desired, results: Mapping[str, HostResult], *,
                   quiet: Mapping[str, float] | None = None) -> SidekiqReport | None:
    """The report, when a host's observation carries Sidekiq's view; None when none does."""
    found = find_view(results)
    if found is None:
        return None
    host, view, collected_at = found
    now = view.redis_time or collected_at
    units = sidekiq_units(desired, results)
    matches, silent = join(view.processes, units, host_names(desired, results)) if not view.error else ([], units)
    findings = check(desired, results, view, now, desired.sidekiq_policy, quiet_since=quiet)
    return SidekiqReport(host=host, view=view, now=now, matches=tuple(matches), silent=tuple(silent),
                         queues=tuple(_served(view, units, matches)), findings=tuple(findings))


def _served(view: SidekiqView, units: Sequence[SidekiqUnit], matches: Sequence[Match]) -> list[QueueServed]:
    names = list(dict.fromkeys([*SIDEKIQ_QUEUES, *(q.name for q in view.queues),
                                *(q for m in matches for q in m.process.queue_names()),
                                *(q for u in units for q, _ in u.queues)]))
    out = []
    for name in names:
        state = view.queue(name)
        out.append(QueueServed(
            name=name, size=state.size if state else None, latency=state.latency if state else None,
            by_systemd=tuple(f"{u.host}:{u.unit}" for u in units if u.active and name in dict(u.queues)),
            by_heartbeat=tuple(f"{m.host or m.process.hostname}:{m.process.pid}" for m in matches
                               if not m.process.quiet and name in m.process.queue_names())))
    return out


# ================================================================ the view in a snapshot


def view_record(view: SidekiqView) -> dict[str, object]:
    """The view as plain JSON data for a snapshot (nothing secret is in it: the target says only
    whether there is a password)."""
    return asdict(view)


def view_from_record(record: Mapping[str, Any]) -> SidekiqView:
    t = record.get("target")
    return SidekiqView(
        target=RedisTarget(**t) if t else None, error=record["error"], redis_time=record["redis_time"],
        processes=tuple(SidekiqProcess(**(p | {"queues": tuple((q, w) for q, w in p["queues"]),
                                              "labels": tuple(p["labels"])})) for p in record["processes"]),
        queues=tuple(QueueState(**q) for q in record["queues"]),
        processes_total=record["processes_total"], queues_total=record["queues_total"],
        stale=tuple(record["stale"]))
