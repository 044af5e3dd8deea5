"""Data stores, observed as they run: Postgres clusters, Redis and PgBouncer behind their units.

systemd alone gets a data store wrong.  On Debian a Postgres server runs as the cluster unit
`postgresql@VERSION-NAME.service`; `postgresql.service` is only an `active/exited` parent that
stays "active" when the cluster under it has failed.  So for every declared `postgres`, `redis`
and `pgbouncer` service this kind asks the host's own tools, in the one collection round trip:

* Postgres: the cluster units systemd has loaded (`postgresql@*.service`) and their states (from
  the units' own `show` when a discovery glob named them all); each cluster as `pg_lsclusters -s`
  lists it where postgresql-common is installed (version, name, port, online/down, recovery,
  start.conf) — read from the files pg_lsclusters reads, by `pg_clusters.awk`, and from
  pg_lsclusters itself only where those files do not decide; `pg_isready` on each cluster's port;
  and — only for a service declared with `probe = true` — one read-only query through `psql` as the postgres user
  (`default_transaction_read_only`, a statement timeout): primary or standby
  (`pg_is_in_recovery()`), the WAL positions (a primary's current LSN; a standby's received and
  replayed LSN and how long ago it last replayed a transaction), a standby's upstream
  (`pg_stat_wal_receiver`) and a primary's standbys (`pg_stat_replication`).  LSNs are kept as
  numbers so that a standby on one host can be compared with its primary on another.
* Redis, on the declared port of 127.0.0.1: `PING`, `ROLE` (master or replica, its master and
  link state, the replication offsets), `DBSIZE`, and the Sidekiq jobs waiting (the sum of
  `LLEN queue:NAME` over the set `queues`, in one `EVAL_RO` script, which Redis refuses to let
  write).  The password is the one Mastodon uses, read from the env file declared on the host
  with fleet/sidekiq.py's reader, and handed to redis-cli in `REDISCLI_AUTH`: never in an argv,
  never printed.
* PgBouncer: `pg_isready` on its port.

`problems` turns what was seen into the status cell's `(!)` and `fleet audit`'s errors: a failed
cluster unit, a failed readiness check, a role other than the declared one.  `notes` says what
runs: `15/main: primary, accepting on 5432`.  Move gates (issue 15, part B) read the same facts
through `HostState.facts_of("stores")` and `clusters_of`/`redis_of`.

Section `@@stores` (every line bounded by the script with one awk, and again by the parser):

    service UNIT KIND PORT probe|-     one per declared data store on the host: what was asked
    pg-unit UNIT LOAD ACTIVE SUB       each postgresql@*.service systemd has loaded
    pg-clusters none                   pg_lsclusters is not installed (declared ports are used)
    pg-cluster VER NAME PORT STATUS OWNER   a line as `pg_lsclusters -s --no-header` prints it
    pg-ready PORT CODE                 pg_isready's exit status on PORT (`-`: not installed)
    pg-sql PORT LINE                   psql's output on PORT: `tag|a|b|c` rows, messages, `exit N`
    redis PORT LINE                    redis-cli --csv: replies to PING, ROLE, DBSIZE and the
                                       queued-jobs script, messages, `exit N`
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.collect.sections import Collected, SectionParser, too_much
from fleet.errors import ParseError
from fleet.model import Desired, HostState, Kind, Service
from fleet.resources.base import Problem, Resource
from fleet.sidekiq import redis_settings_command
from fleet.textutil import digits

SECTION = "stores"
KINDS = (Kind.POSTGRES, Kind.REDIS, Kind.PGBOUNCER)

# What one host's section may hold (the script cuts to these; the parser refuses more).
MAX_SERVICES = 64
MAX_CLUSTERS = 64  # clusters and cluster units each: a host has one or two
MAX_SQL_LINES = 41  # per port: 4 rows + 16 standbys + messages + the exit line
MAX_REDIS_LINES = 12  # per port: 4 replies, a few messages, the exit line
MAX_LINE = 300  # characters of a line as the tools print it
MAX_LINES = 4 * MAX_SERVICES + 2 * MAX_CLUSTERS + MAX_CLUSTERS * (MAX_SQL_LINES + 1) + MAX_SERVICES * (
    MAX_REDIS_LINES + MAX_SQL_LINES + 2)
TIMEOUT = 10  # seconds for each tool call on the host
MAX_QUEUES = 64  # Sidekiq queues summed (Mastodon has seven)

# One read-only query: rows `tag|a|b|c`.  CASE, not WHERE: pg_current_wal_lsn() raises on a standby.
SQL = """SELECT 'recovery', pg_is_in_recovery()::text, '', ''
UNION ALL SELECT 'lsn',
  CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_receive_lsn()::text, '-') ELSE pg_current_wal_lsn()::text END,
  CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn()::text, '-') ELSE '-' END,
  CASE WHEN pg_is_in_recovery()
       THEN coalesce(floor(extract(epoch FROM now() - pg_last_xact_replay_timestamp()))::text, '-') ELSE '-' END
UNION ALL (SELECT 'upstream', status, coalesce(sender_host, '-'), coalesce(sender_port::text, '-')
           FROM pg_stat_wal_receiver LIMIT 1)
UNION ALL (SELECT 'replica', coalesce(host(client_addr), 'local'), coalesce(state, '-'), coalesce(replay_lsn::text, '-')
           FROM pg_stat_replication LIMIT 16)"""

# Read-only by construction (EVAL_RO refuses a script that writes); at most MAX_QUEUES queues summed,
# and the set's size, so that a partial sum is known to be partial.
QUEUED_LUA = (f"local qs = redis.call('SRANDMEMBER', 'queues', {MAX_QUEUES}) local n = 0 "
              "for _, q in ipairs(qs) do n = n + redis.call('LLEN', 'queue:' .. q) end "
              "return {n, redis.call('SCARD', 'queues')}")
REDIS_COMMANDS = ("PING", "ROLE", "DBSIZE", f'EVAL_RO "{QUEUED_LUA}" 0')

READY = {0: "accepting connections", 1: "rejecting connections", 2: "no response", 3: "no attempt",
         124: f"no answer within {TIMEOUT} s"}


# ================================================================ what the script is asked


@dataclass(frozen=True)
class Asked:
    """One declared data store on the host, as the script is told about it (and echoes back)."""

    unit: str
    kind: str  # postgres | redis | pgbouncer
    port: int
    probe: bool = False


@dataclass(frozen=True)
class ToCollect:
    services: tuple[Asked, ...]
    env_path: str = ""  # the env file whose Redis password to use ("" when none is declared here)
    units_shown: bool = False  # the units' `show` named every loaded postgresql@*.service (a discovery glob)

    def __bool__(self) -> bool:
        return bool(self.services)


def cluster_id(unit: str) -> str | None:
    """`15-main` for `postgresql@15-main.service`; None for any other unit."""
    m = re.fullmatch(r"postgresql@(.+)\.service", unit)
    return m.group(1) if m else None


# ================================================================ what was seen


@dataclass(frozen=True)
class ClusterUnit:
    unit: str
    load_state: str
    active_state: str
    sub_state: str

    @property
    def failed(self) -> bool:
        return self.active_state == "failed"


@dataclass(frozen=True)
class Cluster:
    """A line of `pg_lsclusters -s`."""

    version: str
    name: str
    port: int
    status: str  # e.g. "online", "down", "online,recovery"; with -s also auto | manual | disabled
    owner: str = ""

    @property
    def id(self) -> str:
        return f"{self.version}-{self.name}"

    @property
    def unit(self) -> str:
        return f"postgresql@{self.id}.service"

    @property
    def label(self) -> str:
        return f"{self.version}/{self.name}"

    @property
    def online(self) -> bool:
        return "online" in self.status.split(",")

    @property
    def recovery(self) -> bool:
        return "recovery" in self.status.split(",")

    @property
    def start(self) -> str:
        """start.conf: auto (started with the system), manual or disabled; "" when not said."""
        return next((w for w in self.status.split(",") if w in ("auto", "manual", "disabled")), "")


@dataclass(frozen=True)
class Upstream:
    """A standby's WAL receiver (pg_stat_wal_receiver)."""

    status: str  # streaming | catchup | stopping …
    host: str  # the primary it streams from (an address, a name, or a socket directory)
    port: int | None


@dataclass(frozen=True)
class Standby:
    """A standby as its primary sees it (pg_stat_replication)."""

    address: str  # its client address, or "local" (a Unix socket)
    state: str  # streaming | catchup | backup …
    replay_lsn: int | None


@dataclass(frozen=True)
class Probe:
    """What the server itself said (psql, probe = true)."""

    port: int
    error: str = ""  # why it could not be asked; everything else is then unknown
    in_recovery: bool | None = None  # True: a standby
    lsn: int | None = None  # a primary's current WAL position; a standby's last received one
    replay_lsn: int | None = None  # a standby's last replayed WAL position
    replay_age: int | None = None  # a standby: seconds since it last replayed a transaction
    upstream: Upstream | None = None
    standbys: tuple[Standby, ...] = ()

    @property
    def role(self) -> str:
        return "" if self.in_recovery is None else "standby" if self.in_recovery else "primary"

    @property
    def lag_bytes(self) -> int | None:
        """A standby's WAL received but not yet replayed (its own view; its primary's view is in
        the primary's `standbys`)."""
        if self.lsn is None or self.replay_lsn is None or not self.in_recovery:
            return None
        return max(0, self.lsn - self.replay_lsn)


@dataclass(frozen=True)
class RedisState:
    """One Redis on the host, as redis-cli saw it."""

    port: int
    error: str = ""  # it could not be asked (no redis-cli, no connection): everything else unknown
    ping: str = ""  # "PONG", or the error it answered (NOAUTH …, LOADING …)
    auth: str = ""  # what redis-cli said about the password (WRONGPASS …), "" when nothing
    role: str = ""  # master | slave | sentinel; "" unknown
    master: tuple[str, int] | None = None  # a replica's master
    link: str = ""  # a replica's link to its master: connect | connecting | sync | connected
    offset: int | None = None  # replication offset (a master's, or what a replica has processed)
    replicas: tuple[tuple[str, int, int], ...] = ()  # a master's replicas: (ip, port, offset)
    keys: int | None = None  # DBSIZE of database 0
    queued: int | None = None  # Sidekiq jobs waiting (of the first MAX_QUEUES queues)
    queues: int | None = None  # members of the set `queues`
    installed: bool = True  # False: the host has no redis-cli (nothing could be asked)

    @property
    def answers(self) -> bool:
        """Redis answered (PONG, or an error that says it is up: a password is needed)."""
        return self.ping == "PONG" or self.ping.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))

    @property
    def replication_role(self) -> str:
        return {"master": "primary", "slave": "standby"}.get(self.role, "")


@dataclass(frozen=True)
class StoreFacts:
    services: tuple[Asked, ...] = ()
    units: tuple[ClusterUnit, ...] = ()
    clusters: tuple[Cluster, ...] | None = None  # None: pg_lsclusters is not installed
    ready: tuple[tuple[int, int | None], ...] = ()  # (port, pg_isready exit status; None: not installed)
    probes: tuple[Probe, ...] = ()
    redis: tuple[RedisState, ...] = ()

    def asked(self, unit: str) -> Asked | None:
        return next((s for s in self.services if s.unit == unit), None)

    def ready_at(self, port: int) -> int | None | str:
        """pg_isready's exit status on `port`; None: not installed; "": not run."""
        return next((code for p, code in self.ready if p == port), "")

    def probe_at(self, port: int) -> Probe | None:
        return next((p for p in self.probes if p.port == port), None)

    def unit_state(self, unit: str) -> ClusterUnit | None:
        return next((u for u in self.units if u.unit == unit), None)


@dataclass(frozen=True)
class ClusterView:
    """One cluster of a declared postgres service, everything known about it joined."""

    label: str  # "15/main", or "port 5432" without pg_lsclusters
    port: int
    cluster: Cluster | None  # None without pg_lsclusters
    unit: ClusterUnit | None  # None: systemd has no such unit loaded
    ready: int | None | str  # pg_isready's exit status (None: not installed, "": not run)
    probe: Probe | None  # None: not probed

    @property
    def expected_up(self) -> bool:
        """start.conf says it starts with the system (or nothing says otherwise)."""
        return self.cluster is None or self.cluster.start in ("auto", "")

    @property
    def role(self) -> str:
        """primary | standby from the server (probe), else from pg_lsclusters' recovery flag while
        online; "" when unknown."""
        if self.probe is not None and self.probe.role:
            return self.probe.role
        if self.cluster is not None and self.cluster.online:
            return "standby" if self.cluster.recovery else "primary"
        return ""


def facts(state: HostState) -> StoreFacts | None:
    """What the section found on the host; None when it was not collected."""
    found = state.facts_of(SECTION)
    return found if isinstance(found, StoreFacts) else None


def clusters_of(state: HostState, unit: str) -> list[ClusterView]:
    """The clusters of the postgres service whose unit is `unit` on this host: the one cluster of a
    `postgresql@V-N.service`, every cluster on the host for any other unit (postgresql.service)."""
    f = facts(state)
    asked = f.asked(unit) if f is not None else None
    if f is None or asked is None:
        return []
    if f.clusters is None:  # no pg_lsclusters: the declared port is all there is
        own = f.unit_state(unit) if cluster_id(unit) else None
        return [ClusterView(f"port {asked.port}", asked.port, None, own, f.ready_at(asked.port),
                            f.probe_at(asked.port))]
    only = cluster_id(unit)
    return [ClusterView(c.label, c.port, c, f.unit_state(c.unit), f.ready_at(c.port), f.probe_at(c.port))
            for c in f.clusters if only is None or c.id == only]


def redis_of(state: HostState, unit: str) -> RedisState | None:
    f = facts(state)
    asked = f.asked(unit) if f is not None else None
    if f is None or asked is None:
        return None
    return next((r for r in f.redis if r.port == asked.port), None)


# ================================================================ the kind


class DataStores(Resource):
    kind = "data store"
    section = SECTION

    # -- collection

    def to_collect(self, desired: Desired, host: str) -> ToCollect:
        here = [s for s in desired.services_on(host) if s.kind in KINDS]
        # A declared move's source no longer declares the store, but its gates read it there.
        here += [s for m in desired.moves if m.source == host and (s := desired.service(m.service)) is not None
                 and s.unit not in {t.unit for t in here}]
        services = tuple(Asked(s.unit, s.kind.value, s.port or 0, s.probe) for s in here)
        return ToCollect(services, mastodon_env_path(desired, host) if any(s.kind == "redis" for s in services) else "",
                         units_shown=any(_covers_cluster_units(p.pattern) for p in desired.discover))

    def script(self, what: Any) -> str:
        assert isinstance(what, ToCollect)
        return section_script(what)

    def parser(self, host: str) -> SectionParser:
        return _StoresSection(host)

    # -- status and audit

    def notes(self, state: HostState, unit: str) -> list[str]:
        f = facts(state)
        asked = f.asked(unit) if f is not None else None
        if asked is None:
            return []
        if asked.kind == Kind.POSTGRES:
            return [_cluster_note(v) for v in clusters_of(state, unit)] or ["no Postgres cluster on this host"]
        if asked.kind == Kind.REDIS:
            r = redis_of(state, unit)
            return [_redis_note(r)] if r is not None else []
        assert f is not None
        return [f"{_ready_text(f.ready_at(asked.port))} on {asked.port}"]

    def problems(self, state: HostState, service: Service) -> list[Problem]:
        f = facts(state)
        if f is None or f.asked(service.unit) is None:
            return []
        if service.kind == Kind.POSTGRES:
            return _postgres_problems(service, clusters_of(state, service.unit), f.clusters is not None)
        if service.kind == Kind.REDIS:
            r = redis_of(state, service.unit)
            return _redis_problems(service, r) if r is not None else []
        code = f.ready_at(service.port or 0)
        if isinstance(code, int) and code != 0:
            return [Problem("store.not-ready", f"pg_isready on port {service.port}: {_ready_text(code)}",
                            f"look at PgBouncer on the host (systemctl status {service.unit}, its log)")]
        return []


def _covers_cluster_units(pattern: str) -> bool:
    """Does the discovery glob match every `postgresql@X.service`?  Only a plain prefix then `*` is
    trusted to (`postgresql*`, `postgresql@*`): the script's `show` of it named each one loaded."""
    head = pattern[:-1]
    return pattern.endswith("*") and not any(ch in head for ch in "*?[]") and "postgresql@".startswith(head)


def mastodon_env_path(desired: Desired, host: str) -> str:
    """The env file on `host` that a Mastodon service loads: it holds the Redis password."""
    loaded = {p for s in desired.services if s.unit_spec is not None for p in s.unit_spec.environment_files}
    return next((e.path for e in desired.env_files_on(host) if e.path in loaded), "")


# ================================================================ the remote section

_PG_FUNCTIONS = r"""
pg_ready() {
  if [ -n "$2" ] && [ -x "$2/pg_isready" ]; then r=$2/pg_isready
  elif command -v pg_isready >/dev/null 2>&1; then r=pg_isready
  else echo "pg-ready $1 -"; return; fi
  timeout @TIMEOUT@ "$r" -q -t 5 -p "$1" </dev/null >/dev/null 2>&1
  echo "pg-ready $1 $?"
}
pg_sql() {
  if [ -n "$2" ] && [ -x "$2/psql" ]; then s=$2/psql
  elif command -v psql >/dev/null 2>&1; then s=psql
  else printf 'pg-sql %s psql is not installed\npg-sql %s exit 127\n' "$1" "$1"; return; fi
  { timeout @TIMEOUT@ runuser -u postgres -- env PGCONNECT_TIMEOUT=5 \
      PGOPTIONS='-c default_transaction_read_only=on -c statement_timeout=5000 -c lock_timeout=1000' \
      "$s" -X -A -t -q -F '|' -d postgres -p "$1" -c "$pg_query" </dev/null 2>&1; echo "exit $?"; } |
    awk -v n=@MAXSQL@ -v w=@MAXLINE@ -v p="pg-sql $1 " "$bound_awk"
}
"""

# pg_lsclusters (a Perl program, ~80 ms a call) read without Perl: the awk in pg_clusters.awk does
# what postgresql-common's cluster_info does for the plain Debian case (postgresql.conf, its conf.d,
# the data directory's postgresql.auto.conf, the external PID file and /proc/PID/cmdline for
# online/down, standby.signal/recovery.signal for recovery, start.conf); `stat` names the owner.
# Anything else (no external_pid_file, a PID file whose process is gone, an include_dir other than
# conf.d, a line it cannot read) and pg_lsclusters itself is asked, as before.
_PG_CLUSTERS_FUNCTION = r"""
pg_clusters() {
  set +f; set -- @CONF@/*/*/conf.d/*.conf; incl="$*"; set -- @CONF@/*/*/postgresql.conf; set -f
  { [ -e "$1" ] || [ -L "$1" ]; } || return 0
  found=$(awk -v incl="$incl" -v proc=@PROC@ @AWK@ "$@" 2>/dev/null) || found=fallback
  if [ "$found" = fallback ]; then timeout @TIMEOUT@ pg_lsclusters -s --no-header </dev/null 2>/dev/null; return; fi
  # a here-document, not `printf | while`: no subshell for the loop
  while read -r v c p st d; do
    [ -n "$v" ] || continue
    o=$(stat -c %U -- "$d" 2>/dev/null) || o='<unknown>'
    [ -e "@PGLIB@/$v/bin/postgres" ] || st=$st,binaries_missing
    echo "$v $c $p $st $o $d"
  done <<EOF
$found
EOF
}
"""

_PG_CLUSTERS = r"""
@UNITS@
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_clusters | awk -v n=@MAXCL@ -v w=@MAXLINE@ -v p= "$bound_awk" |
  while read -r v c p st o _; do
    [ -n "$v" ] || continue
    echo "pg-cluster $v $c $p $st $o"
    case $v in ''|*[!0-9.]*) continue;; esac
    case $p in ''|*[!0-9]*) continue;; esac
    # The version's own tools: pg_wrapper's Perl start costs ~30 ms a call.
    pg_ready "$p" "/usr/lib/postgresql/$v/bin"
    case $st in online*) ;; *) continue;; esac
    case " $pg_probe " in *" all "*|*" $v-$c "*) pg_sql "$p" "/usr/lib/postgresql/$v/bin";; esac
  done
else
  echo 'pg-clusters none'
"""

# The cluster units systemd has loaded: from the units' `show` the script already ran when a
# discovery pattern covers every `postgresql@*.service` (its glob then named them all), else asked.
# Either way one awk prints the first @MAXCL@ as `pg-unit UNIT LOAD ACTIVE SUB`, its first four
# words split as `read -r u l a s _` split them (no `head`, no `while` subshell).
_UNITS_ASKED = ("systemctl list-units --all --plain --no-legend --no-pager -- 'postgresql@*.service' 2>/dev/null |\n"
                "  awk 'NR <= @MAXCL@ { print \"pg-unit \" $1 \" \" $2 \" \" $3 \" \" $4 } NR >= @MAXCL@ { exit }'")
_UNITS_FROM_SHOW = r"""printf '%s\n\n' "$show" | awk '
/^Id=/ { id = substr($0, 4) } /^LoadState=/ { l = substr($0, 11) } /^ActiveState=/ { a = substr($0, 13) }
/^SubState=/ { s = substr($0, 10) }
/^$/ { if (id ~ /^postgresql@.+\.service$/ && !(id in seen)) { seen[id] = 1; u[++n] = id " " l " " a " " s }
       id = ""; l = ""; a = ""; s = "" }
END { for (i = 2; i <= n; i++) for (j = i; j > 1 && u[j - 1] > u[j]; j--) { t = u[j]; u[j] = u[j - 1]; u[j - 1] = t }
      for (i = 1; i <= n && i <= @MAXCL@; i++) { $0 = u[i]; print "pg-unit " $1 " " $2 " " $3 " " $4 } }'"""

# awk doing what `head -n N | cut -c1-W | sed "s/^/P/"` did, in one process: the first N lines,
# each cut to W characters (bytes: LC_ALL=C) and prefixed by P.
BOUND_AWK = "{ print p substr($0, 1, w) } NR >= n { exit }"

_PG_AWK = (Path(__file__).with_name("pg_clusters.awk")).read_text()

_REDIS = r"""
rcli() {
  set -- -h 127.0.0.1 -p "$1" --csv
  if [ -n "$sk_user" ]; then set -- "$@" --user "$sk_user"; fi
  # The password goes to redis-cli in its environment only: never in an argv, never printed.
  if [ -n "$sk_pass" ]; then REDISCLI_AUTH=$sk_pass timeout @TIMEOUT@ redis-cli "$@"
  else timeout @TIMEOUT@ redis-cli "$@"; fi
}
redis_probe() {
  if ! command -v redis-cli >/dev/null 2>&1; then
    printf 'redis %s redis-cli is not installed\nredis %s exit 127\n' "$1" "$1"; return
  fi
  # the commands in a here-document, not `printf |`: no subshell to feed them
  { rcli "$1" 2>&1 <<'EOF'
@COMMANDS@
EOF
    echo "exit $?"; } | awk -v n=@MAXREDIS@ -v w=@MAXLINE@ -v p="redis $1 " "$bound_awk"
}
"""


def section_script(what: ToCollect, *, pg_lib: str = "/usr/lib/postgresql", pg_conf: str = "/etc/postgresql",
                   proc: str = "/proc") -> str:
    """The POSIX sh of the section for one host (in a subshell: its functions and variables end
    with it).  `pg_lib` holds each version's own tools (`VERSION/bin/pg_isready`), `pg_conf` the
    clusters' configuration, `proc` the processes; tests move them."""
    q = shlex.quote
    parts = ["echo '@@stores'", "(", "export LC_ALL=C", "unset REDISCLI_AUTH PGOPTIONS", "cd / || exit 0"]
    parts += [f"echo {q(' '.join(('service', s.unit, s.kind, str(s.port), 'probe' if s.probe else '-')))}"
              for s in what.services]
    postgres = [s for s in what.services if s.kind == Kind.POSTGRES]
    bouncers = [s for s in what.services if s.kind == Kind.PGBOUNCER]
    redis = dict.fromkeys(s.port for s in what.services if s.kind == Kind.REDIS)
    if postgres or bouncers or redis:
        parts.append(f"bound_awk={q(BOUND_AWK)}")
    if postgres or bouncers:
        parts.append(_fill(_PG_FUNCTIONS))
    if postgres:
        # A probe service whose unit is one cluster's asks only that cluster; postgresql.service all.
        ids = {cluster_id(s.unit) or "all" for s in postgres if s.probe}
        parts.append(f"pg_query={q(SQL)}")
        parts.append(f"pg_probe={q(' '.join(sorted(ids)))}")
        parts.append(pg_clusters_function(pg_conf=pg_conf, proc=proc, pg_lib=pg_lib))
        units = _fill(_UNITS_FROM_SHOW if what.units_shown else _UNITS_ASKED)
        parts.append(_fill(_PG_CLUSTERS).replace("@UNITS@", units)
                     .replace("/usr/lib/postgresql", pg_lib).rstrip("\n"))
        ports = dict.fromkeys(s.port for s in postgres)
        parts.append(f"  for p in {' '.join(str(p) for p in ports)}; do pg_ready \"$p\" ''; done")
        probed = dict.fromkeys(s.port for s in postgres if s.probe)
        if probed:
            parts.append(f"  for p in {' '.join(str(p) for p in probed)}; do pg_sql \"$p\" ''; done")
        parts.append("fi")
    for port in dict.fromkeys(s.port for s in bouncers):
        parts.append(f"pg_ready {port} ''")
    if redis:
        parts.append("sk_err= sk_user= sk_pass=")
        if what.env_path:
            parts.append(f"f={q(what.env_path)}")
            read_env = redis_settings_command('"$f"')
            parts.append(f'if [ -r "$f" ] && conf=$({read_env} 2>/dev/null); then eval "$conf"; fi')
        parts.append(_fill(_REDIS).replace("@COMMANDS@", "\n".join(REDIS_COMMANDS)).strip("\n"))
        parts.append(f"for p in {' '.join(str(p) for p in redis)}; do redis_probe \"$p\"; done")
    parts.append(")")
    return "\n".join(parts)


def pg_clusters_function(*, pg_conf: str = "/etc/postgresql", proc: str = "/proc",
                         pg_lib: str = "/usr/lib/postgresql") -> str:
    """sh defining `pg_clusters`, which prints what `pg_lsclusters -s --no-header` prints (its first
    six columns), reading the files itself, and runs pg_lsclusters only where they do not decide."""
    q = shlex.quote
    return (_fill(_PG_CLUSTERS_FUNCTION).replace("@CONF@", q(pg_conf)).replace("@PROC@", q(proc))
            .replace("@AWK@", q(_PG_AWK)).replace("@PGLIB@", q(pg_lib)).strip("\n"))


def _fill(template: str) -> str:
    return (template.replace("@TIMEOUT@", str(TIMEOUT)).replace("@MAXSQL@", str(MAX_SQL_LINES))
            .replace("@MAXREDIS@", str(MAX_REDIS_LINES)).replace("@MAXCL@", str(MAX_CLUSTERS))
            .replace("@MAXLINE@", str(MAX_LINE)))


# ================================================================ the parser

_UNIT = re.compile(r"postgresql@[A-Za-z0-9:_.\\-]{1,200}\.service")
_STATE = re.compile(r"[a-z-]{1,40}")
_ASKED = re.compile(r"(\S{1,255}) (postgres|redis|pgbouncer) ([0-9]{1,5}) (probe|-)")
_CLUSTER = re.compile(r"([0-9]{1,4}(?:\.[0-9]{1,4})?) (\S{1,64}) ([0-9]{1,5}) ([a-z,]{1,64})(?: (\S{1,64}))?")
_LSN = re.compile(r"([0-9A-F]{1,8})/([0-9A-F]{1,8})")
_INT = re.compile(r"-?[0-9]{1,19}")
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([^,"]*)')
_REPLY = re.compile(r'(?:"|ERROR,|NULL|-?[0-9])')


def _port(text: str) -> int | None:
    return int(text) if digits(text) and 0 < int(text) < 65536 and len(text) <= 5 else None


class _StoresSection:
    def __init__(self, host: str) -> None:
        self.host = host
        self.seen = False
        self.services: list[Asked] = []
        self.units: list[ClusterUnit] = []
        self.clusters: list[Cluster] | None = []
        self.ready: dict[int, int | None] = {}
        self.sql: dict[int, list[str]] = {}
        self.redis: dict[int, list[str]] = {}

    def bad(self, what: str) -> ParseError:
        return ParseError(f"{self.host}: the {SECTION} section of the collection output {what}"[:400],
                          host=self.host, section=SECTION,
                          hint="fleet refuses data store facts it cannot read whole; run the tools by hand "
                               "(pg_lsclusters, pg_isready, redis-cli PING) to see what they print")

    def section(self, arg: str, lines: Iterator[str]) -> None:
        self.seen = True
        if arg:
            raise self.bad(f"has an unexpected argument {arg[:40]!r}")
        for n, line in enumerate(lines):
            if n >= MAX_LINES:
                raise too_much(self.host, SECTION, f"{MAX_LINES:,} lines")
            if len(line) > MAX_LINE + 40:
                raise self.bad(f"holds a line of {len(line):,} characters")
            if line:
                self.line(line)

    def line(self, line: str) -> None:
        tag, _, rest = line.partition(" ")
        if tag == "service":
            m = _ASKED.fullmatch(rest)
            port = _port(m.group(3)) if m else None
            if m is None or port is None:
                raise self.bad(f"holds a malformed line {line[:80]!r}")
            if len(self.services) >= MAX_SERVICES:
                raise too_much(self.host, SECTION, f"{MAX_SERVICES} data stores")
            self.services.append(Asked(m.group(1), m.group(2), port, m.group(4) == "probe"))
        elif tag == "pg-unit":
            f = rest.split(" ")
            if len(f) != 4 or not _UNIT.fullmatch(f[0]) or not all(_STATE.fullmatch(x) for x in f[1:]):
                raise self.bad(f"holds a malformed cluster unit line {line[:80]!r}")
            if len(self.units) >= MAX_CLUSTERS:
                raise too_much(self.host, SECTION, f"{MAX_CLUSTERS} cluster units")
            self.units.append(ClusterUnit(*f))
        elif tag == "pg-clusters" and rest == "none":
            self.clusters = None
        elif tag == "pg-cluster":
            m = _CLUSTER.fullmatch(rest)
            port = _port(m.group(3)) if m else None
            if m is None or port is None or self.clusters is None:
                raise self.bad(f"holds a malformed cluster line {line[:80]!r}")
            if len(self.clusters) >= MAX_CLUSTERS:
                raise too_much(self.host, SECTION, f"{MAX_CLUSTERS} clusters")
            self.clusters.append(Cluster(m.group(1), m.group(2), port, m.group(4), m.group(5) or ""))
        elif tag == "pg-ready":
            f = rest.split(" ")
            port = _port(f[0])
            if len(f) != 2 or port is None or not (f[1] == "-" or digits(f[1]) and len(f[1]) <= 3):
                raise self.bad(f"holds a malformed readiness line {line[:80]!r}")
            self.ready.setdefault(port, None if f[1] == "-" else int(f[1]))
        elif tag in ("pg-sql", "redis"):
            head, _, text = rest.partition(" ")
            port = _port(head)
            if port is None:
                raise self.bad(f"holds a malformed line {line[:80]!r}")
            kept = (self.sql if tag == "pg-sql" else self.redis).setdefault(port, [])
            limit = MAX_SQL_LINES if tag == "pg-sql" else MAX_REDIS_LINES
            if len(kept) >= limit:
                raise too_much(self.host, SECTION, f"{limit} lines of {tag} on port {port}")
            kept.append(text)
        else:
            raise self.bad(f"holds an unexpected line {line[:80]!r}")

    def finish(self, collected: Collected) -> None:
        if not self.seen:
            return
        collected.extra[SECTION] = StoreFacts(
            services=tuple(self.services), units=tuple(self.units),
            clusters=None if self.clusters is None else tuple(self.clusters),
            ready=tuple(self.ready.items()),
            probes=tuple(self.probe(port, lines) for port, lines in self.sql.items()),
            redis=tuple(self.redis_state(port, lines) for port, lines in self.redis.items()))

    # -- psql's output

    def probe(self, port: int, lines: list[str]) -> Probe:
        status = _exit(lines)
        messages = [x for x in lines[:-1] if not re.match(r"(recovery|lsn|upstream|replica)\|", x)]
        if status is None:
            return Probe(port, error="its output was cut short")
        if status != 0:
            return Probe(port, error=_failed("psql", status, messages))
        fields: dict[str, Any] = {}
        standbys: list[Standby] = []
        for row in lines[:-1]:
            if row in messages:
                continue
            tag, a, b, c = (row.split("|") + ["", "", ""])[:4] if row.count("|") == 3 else ("", "", "", "")
            if tag == "recovery" and a in ("true", "false") and "in_recovery" not in fields:
                fields["in_recovery"] = a == "true"
            elif tag == "lsn" and "lsn" not in fields:
                fields["lsn"], fields["replay_lsn"] = self.lsn(a), self.lsn(b)
                fields["replay_age"] = None if c == "-" else self.number(c)
            elif tag == "upstream" and "upstream" not in fields and _STATE.fullmatch(a) and b:
                fields["upstream"] = Upstream(a, b, None if c == "-" else _port(c))
            elif tag == "replica" and _STATE.fullmatch(b) and a:
                standbys.append(Standby(a, b, self.lsn(c)))
            else:
                raise self.bad(f"holds an unexpected psql row on port {port}: {row[:80]!r}")
        if "in_recovery" not in fields:
            return Probe(port, error="psql printed no answer" + (f": {messages[0][:200]}" if messages else ""))
        return Probe(port, standbys=tuple(standbys), **fields)

    def lsn(self, text: str) -> int | None:
        if text == "-":
            return None
        m = _LSN.fullmatch(text)
        if m is None:
            raise self.bad(f"holds {text[:40]!r} where a WAL position was expected")
        return int(m.group(1), 16) << 32 | int(m.group(2), 16)

    def number(self, text: str) -> int:
        if not _INT.fullmatch(text):
            raise self.bad(f"holds {text[:40]!r} where a number was expected")
        return int(text)

    # -- redis-cli's output

    def redis_state(self, port: int, lines: list[str]) -> RedisState:
        status = _exit(lines)
        replies = [x for x in lines[:-1] if _REPLY.match(x)]
        messages = [x for x in lines[:-1] if not _REPLY.match(x)]
        auth = next((m[len("AUTH failed: "):] for m in messages if m.startswith("AUTH failed: ")), "")
        said = [m for m in messages if not m.startswith("AUTH failed: ")]
        if status is None:
            return RedisState(port, error="redis-cli's output was cut short", auth=auth)
        if status == 127:
            return RedisState(port, error="redis-cli is not installed", auth=auth, installed=False)
        if len(replies) != len(REDIS_COMMANDS):
            if status != 0 or not replies:  # no connection, or Redis stopped answering part way
                return RedisState(port, error=_failed("redis-cli", status, said), auth=auth)
            raise self.bad(f"holds {len(replies)} Redis replies on port {port} where {len(REDIS_COMMANDS)} "
                           "were expected")
        ping, role, keys, queued = (self.tokens(r) for r in replies)
        state: dict[str, Any] = {"ping": self.error_or(ping) or (ping[0] or "")}
        if not self.error_or(role):
            state.update(self.role(role))
        if not self.error_or(keys):
            state["keys"] = self.number(keys[0] or "")
        if not self.error_or(queued):
            if len(queued) != 2:
                raise self.bad(f"holds a malformed queued-jobs reply on port {port}")
            state["queued"], state["queues"] = self.number(queued[0] or ""), self.number(queued[1] or "")
        return RedisState(port, auth=auth, **state)

    def tokens(self, reply: str) -> list[str | None]:
        """redis-cli --csv: quoted strings (None for an unquoted empty field) and bare words."""
        if reply.startswith("ERROR,"):
            return ["ERROR", self.unquote(reply[6:])]
        out: list[str | None] = []
        pos = 0
        while True:
            m = _TOKEN.match(reply, pos)
            assert m is not None  # the pattern matches the empty string
            out.append(self.unquote(m.group(0)) if m.group(1) is not None else (m.group(2) or None))
            pos = m.end()
            if pos >= len(reply):
                return out
            if reply[pos] != ",":
                raise self.bad(f"holds a malformed Redis reply {reply[:80]!r}")
            pos += 1

    def unquote(self, token: str) -> str:
        if len(token) < 2 or token[0] != '"' or token[-1] != '"':
            raise self.bad(f"holds a malformed Redis string {token[:80]!r}")
        return re.sub(r'\\(.)', lambda m: {"n": " ", "r": " ", "t": " "}.get(m.group(1), m.group(1)), token[1:-1])

    @staticmethod
    def error_or(tokens: list[str | None]) -> str:
        return (tokens[1] or "error") if len(tokens) == 2 and tokens[0] == "ERROR" else ""

    def role(self, t: list[str | None]) -> dict[str, Any]:
        kind = t[0] or ""
        if kind == "master" and len(t) >= 2:
            rest = [x for x in t[2:] if x is not None]
            if len(rest) % 3:
                raise self.bad(f"holds a malformed ROLE reply {t!r:.80}")
            replicas = tuple((rest[i], _port(rest[i + 1]) or 0, self.number(rest[i + 2]))
                             for i in range(0, len(rest), 3))
            return {"role": "master", "offset": self.number(t[1] or ""), "replicas": replicas[:16]}
        if kind == "slave" and len(t) == 5:
            return {"role": "slave", "master": (t[1] or "", _port(t[2] or "") or 0), "link": t[3] or "",
                    "offset": self.number(t[4] or "")}
        if kind in ("sentinel", "master", "slave"):
            raise self.bad(f"holds a malformed ROLE reply {t!r:.80}")
        return {"role": kind[:40]}


def _exit(lines: list[str]) -> int | None:
    """The status of the `exit N` line that ends a tool's output; None when it was cut off."""
    if not lines or not re.fullmatch(r"exit [0-9]{1,3}", lines[-1]):
        return None
    return int(lines[-1][5:])


def _failed(tool: str, status: int, messages: list[str]) -> str:
    said = next((m for m in messages if m.strip()), "")
    why = {124: f"no answer within {TIMEOUT} s", 127: "not installed"}.get(status, f"exit status {status}")
    return said.strip()[:200] if said else f"{tool}: {why}"


# ================================================================ what it means


def _ready_text(code: int | None | str) -> str:
    if code == "":
        return "not checked"
    if code is None:
        return "pg_isready is not installed"
    assert isinstance(code, int)
    return READY.get(code, f"pg_isready exit status {code}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""  # pragma: no cover


def _cluster_note(v: ClusterView) -> str:
    words: list[str] = []
    if v.role:
        words.append(v.role)
    if v.cluster is not None and not v.cluster.online:
        words.append("down" + (f" (start.conf {v.cluster.start})" if v.cluster.start not in ("auto", "") else ""))
    if isinstance(v.ready, int) and (v.ready != 0 or v.cluster is None or v.cluster.online):
        words.append(f"{_ready_text(v.ready)} on {v.port}")
    p = v.probe
    if p is not None and p.error:
        words.append(f"not probed ({p.error})")
    elif p is not None and p.in_recovery:
        if p.upstream is not None:
            port = f":{p.upstream.port}" if p.upstream.port else ""
            words.append(f"of {p.upstream.host}{port} ({p.upstream.status})")
        else:
            words.append("not streaming from a primary")
        if p.lag_bytes is not None:
            words.append(f"replay lag {_size(p.lag_bytes)}")
        if p.replay_age is not None:
            words.append(f"last replayed {p.replay_age} s ago")
    elif p is not None and p.standbys:
        words.append("standbys: " + ", ".join(
            f"{s.address} {s.state}" + (f" lag {_size(max(0, p.lsn - s.replay_lsn))}"
                                        if p.lsn is not None and s.replay_lsn is not None else "")
            for s in p.standbys))
    return f"{v.label}: {', '.join(words) or 'no state known'}"


def _redis_note(r: RedisState) -> str:
    if r.error:
        return f"redis-cli on {r.port}: {r.error}"
    words = [r.ping if r.ping == "PONG" else f"PING: {r.ping[:80]}"]
    if r.ping.startswith(("NOAUTH", "WRONGPASS")):
        words.append("the Redis password from the env file was refused" if r.auth
                     else "it needs a password fleet found in no env file on this host")
    if r.role == "slave" and r.master is not None:
        words.append(f"replica of {r.master[0]}:{r.master[1]} (link {r.link})")
    elif r.role:
        words.append(r.role + (f" with {len(r.replicas)} replica(s)" if r.replicas else ""))
    if r.keys is not None:
        words.append(f"{r.keys} key(s)")
    if r.queued is not None and r.queues:
        more = "+" if r.queues > MAX_QUEUES else ""
        words.append(f"{r.queued}{more} Sidekiq job(s) queued")
    return f"redis on {r.port}: {', '.join(words)}"


def _postgres_problems(service: Service, views: list[ClusterView], listed: bool) -> list[Problem]:
    out: list[Problem] = []
    if listed and not views:
        out.append(Problem("store.no-cluster", "pg_lsclusters lists no cluster" if cluster_id(service.unit) is None
                           else f"pg_lsclusters lists no cluster {cluster_id(service.unit)}",
                           "create the cluster (pg_createcluster), or declare postgres where it runs"))
    for v in views:
        unit = v.unit.unit if v.unit is not None else (v.cluster.unit if v.cluster is not None else "")
        ready = v.ready if isinstance(v.ready, int) else None
        not_ready = ready is not None and ready != 0
        if v.unit is not None and v.unit.failed:
            out.append(Problem("store.cluster-failed",
                               f"cluster unit {unit} failed" + (f" (pg_isready on port {v.port}: {_ready_text(ready)})"
                                                                if not_ready else ""),
                               f"look at `journalctl -u {unit}` on the host, then `systemctl start {unit}`"))
        elif not_ready and v.expected_up:
            what = f"cluster {v.label}" if v.cluster is not None else "Postgres"
            state = f" (unit {unit} {v.unit.active_state}/{v.unit.sub_state})" if v.unit is not None else ""
            out.append(Problem("store.not-ready",
                               f"{what} on port {v.port}: {_ready_text(ready)}{state}",
                               f"start it (`systemctl start {unit}`)" if unit else
                               "look at the server's log on the host"))
        if service.role and v.role and v.role != service.role and (v.cluster is None or v.cluster.online):
            how = "the server says so (pg_is_in_recovery)" if v.probe is not None and v.probe.role else \
                "pg_lsclusters says so (recovery)"
            out.append(Problem("store.role", f"{v.label} is a {v.role}, declared {service.role}: {how}",
                               "promote or rebuild it, or declare the role it has"))
    return out


def _redis_problems(service: Service, r: RedisState) -> list[Problem]:
    hint = f"look at Redis on the host (systemctl status {service.unit}, its log)"
    if r.error and r.installed:
        return [Problem("store.not-ready", f"redis-cli PING on port {r.port}: {r.error}", hint)]
    if not r.error and not r.answers:
        return [Problem("store.not-ready", f"redis-cli PING on port {r.port}: {r.ping[:120]}", hint)]
    role = r.replication_role
    if service.role and role and role != service.role:
        return [Problem("store.role", f"Redis on port {r.port} is a {'replica' if role == 'standby' else 'master'}"
                                      f", declared {service.role} (ROLE)",
                        "REPLICAOF NO ONE promotes a replica; or declare the role it has")]
    return []
