"""Domain rules for a Mastodon fleet, as pure functions returning findings.

The rules are written over small records (`SidekiqProcess`, `EnvPlacement`) rather than over
`Desired` directly, so that the same rule judges the declared fleet (`fleet check`) and, later,
the observed one (`fleet audit`): "no process serves `pull`" is the same finding either way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from fleet.mastodon import BOOLEAN_KEYS, KNOWN_ENV_KEYS, looks_secret
from fleet.model import DEFAULT_PORTS, SIDEKIQ_QUEUES, Desired, EnvFile, Finding, Kind, Service
from fleet.textutil import damerau_levenshtein, did_you_mean, digits


@dataclass(frozen=True)
class SidekiqProcess:
    """One Sidekiq process on one host: declared (from a service) or observed (from argv)."""

    host: str
    unit: str
    queues: tuple[str, ...]
    concurrency: int | None
    db_pool: int | None  # the effective DB_POOL, None when unknown
    key: str = ""  # where it is declared, for messages (e.g. services.sidekiq-default)
    file: str = ""
    unknown: str = ""  # why its queues are not known (they are then ()): read on the host, or unreadable there
    source: str = ""  # where its queues come from: "-q", or the config file Sidekiq reads


def check_queues(processes: Sequence[SidekiqProcess], *, what: str = "declared", file: str = "") -> list[Finding]:
    """Every Mastodon queue served somewhere; `scheduler` exactly once; DB_POOL ≥ -c.
    `file` is where fleet-wide findings point (default: where the processes are declared).

    A process whose queues are not known is said so: declared, it reads them from the config file
    on the host (one warning: coverage is judged by `fleet status`, which reads that file);
    running, its config file could not be read (an error naming host, unit and file).  Coverage
    then cannot be judged, and is not: what the known processes leave unserved is one warning
    naming the unknown processes, never "served by nobody"."""
    out: list[Finding] = []
    file = file or next((p.file for p in processes if p.file), "")
    unknown = [p for p in processes if p.unknown]
    served = {q for p in processes for q in p.queues}
    schedulers = [p for p in processes if "scheduler" in p.queues]
    if unknown:
        listed = ", ".join(f"{p.unit} on {p.host}" for p in unknown)
        if what == "declared":
            one = len(unknown) == 1
            out.append(Finding(
                "warning", "sidekiq.queues-on-host",
                f"{listed} read{'s' if one else ''} {'its' if one else 'their'} queues from config/sidekiq.yml on "
                "the host (no -q in ExecStart): fleet check cannot judge queue coverage offline",
                file=file, key=unknown[0].key or "services",
                hint="`fleet status` and `fleet audit` read that file on the host and judge the queues it lists"))
        else:
            for p in unknown:
                out.append(Finding(
                    "error", "sidekiq.config-unreadable", f"{p.unit} on {p.host}: {p.unknown}: its queues are unknown",
                    host=p.host, hint="fix the file on the host; fleet reads its YAML without evaluating ERB "
                                      "(docs/status.md, \"Sidekiq's queues\")"))
            missing = [q for q in SIDEKIQ_QUEUES if q not in served]
            if missing:
                out.append(Finding(
                    "warning", "sidekiq.coverage-unknown",
                    f"queue coverage cannot be judged: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                    f"served by no {what} Sidekiq process whose queues fleet could read, and {listed} may serve "
                    f"{'it' if len(missing) == 1 else 'them'}", file=file, key="services",
                    hint="make the config file readable (see sidekiq.config-unreadable), then look again"))
    else:
        for q in SIDEKIQ_QUEUES:
            if q not in served:
                out.append(Finding(
                    "error", "sidekiq.queue-unserved",
                    f"queue {q!r} is served by no {what} Sidekiq process: its jobs would pile up unprocessed",
                    file=file, key="services",
                    hint=f"add {q!r} to the queues of a Sidekiq service (e.g. queues = {{ {q} = 1 }})"))
    if len(schedulers) > 1 or not schedulers and not unknown:
        where = ", ".join(f"{p.unit} on {p.host}" for p in schedulers) or "none"
        out.append(Finding(
            "error", "sidekiq.scheduler-count",
            f"the scheduler queue must run in exactly one Sidekiq process fleet-wide; {what}: "
            f"{len(schedulers)} ({where})",
            file=file, key=schedulers[0].key if schedulers else "services",
            hint="keep `scheduler` in the queues of exactly one service on exactly one host"))
    for p in processes:
        if p.concurrency is not None and p.db_pool is not None and p.db_pool < p.concurrency:
            out.append(Finding(
                "error", "sidekiq.db-pool",
                f"{p.unit} on {p.host} runs {p.concurrency} threads (-c {p.concurrency}) but DB_POOL={p.db_pool}: "
                "threads would wait for database connections",
                file=p.file, key=p.key, host=p.host,
                hint=f"set DB_POOL to at least {p.concurrency}, or lower the concurrency"))
        for q in p.queues:
            if q not in SIDEKIQ_QUEUES:
                out.append(Finding(
                    "error", "sidekiq.unknown-queue",
                    f"{p.unit} on {p.host} serves queue {q!r}, which Mastodon never uses",
                    file=p.file, key=f"{p.key}.queues" if p.key else "", host=p.host,
                    hint=did_you_mean(q, SIDEKIQ_QUEUES) or f"Mastodon's queues: {', '.join(SIDEKIQ_QUEUES)}"))
    return _dedupe(out)


def check_placement(desired: Desired, placements: Iterable[tuple[str, Kind, str, str]]) -> list[Finding]:
    """`placements` are (host, kind, unit, key) pairs; a host's roles may forbid a kind."""
    out: list[Finding] = []
    roles = {h.name: h.roles for h in desired.hosts}
    for host, kind, unit, key in placements:
        for rule in desired.placement:
            if rule.role in roles.get(host, ()) and kind.value in rule.forbid:
                out.append(Finding(
                    "error", "placement.forbidden",
                    f"{kind.value} ({unit}) on {host}, whose role {rule.role!r} forbids {kind.value}",
                    file=desired.source, key=key, host=host,
                    hint=f"move it to another host, or change policy.placement.{rule.role}.forbid"))
    return out


# A near miss is one slip from a known key: a character dropped, added or changed, or two neighbours
# swapped, letter case ignored (Damerau-Levenshtein distance ≤ 1); two slips from a key of LONG_KEY characters or
# more.  Below that length two edits join distinct documented settings (CAS_ENABLED/PAM_ENABLED,
# DB_HOST/ES_PORT, SMTP_SSL/SMTP_TLS), so a key two edits away is as likely someone's own as a typo;
# from LONG_KEY on, the documented keys within two edits of each other are only HOST/PORT siblings.
# Keys shorter than SHORT_KEY (an operator's own `TZ` in extra_keys) have no near misses.
SHORT_KEY = 4
LONG_KEY = 20


def near_miss(key: str, known: Iterable[str]) -> str | None:
    """The known key that `key` is a slip of (the closest; alphabetically first of equals), or None
    when `key` is itself known or no known key is that close."""
    known = frozenset(known)
    if key in known:
        return None
    best: tuple[int, str] | None = None
    for cand in known:
        limit = 2 if len(cand) >= LONG_KEY else 1 if len(cand) >= SHORT_KEY else -1
        if abs(len(cand) - len(key)) > limit:
            continue  # the distance is at least the difference in length: skip the computation
        d = damerau_levenshtein(key, cand)
        if d <= limit and (best is None or (d, cand) < best):
            best = (d, cand)
    return best[1] if best else None


def check_env_keys(keys: Iterable[tuple[str, str, str, str]], extra_keys: Iterable[str] = ()) -> list[Finding]:
    """`keys` are (file, key path, env key, host) tuples.  A near miss of a known key is an error
    (Mastodon would silently ignore the setting the operator meant); any other key outside
    Mastodon's configuration reference and `extra_keys` a warning (it may be meant for something
    else that reads the environment)."""
    known = KNOWN_ENV_KEYS | frozenset(extra_keys)
    out: list[Finding] = []
    for file, path, key, host in keys:
        if key in known:
            continue
        on = f" (on {host})" if host else ""
        extra = "if it is intentional, list it in policy.env.extra_keys"
        meant = near_miss(key, known)
        if meant:
            out.append(Finding(
                "error", "env.near-miss",
                f"{key!r} is not a Mastodon setting{on}: Mastodon would silently ignore it",
                file=file, key=path, host=host, hint=f"did you mean {meant}? {extra}"))
        else:
            out.append(Finding(
                "warning", "env.unknown-key",
                f"{key!r} is not a Mastodon setting{on}: Mastodon's configuration reference does not list it, "
                "so only something else that reads the environment would use it",
                file=file, key=path, host=host, hint=extra))
    return out


def check_env_value(file: str, path: str, key: str, value: str, host: str = "") -> list[Finding]:
    """Mastodon compares booleans with == 'true': `FALSE`, `True` or `1` silently mean false."""
    if key in BOOLEAN_KEYS and value not in ("true", "false"):
        severity = "error" if key == "S3_ENABLED" else "warning"
        return [Finding(severity, "env.not-boolean",
                        f"{key}={value!r} is not a boolean Mastodon understands (exactly true or false)"
                        + (f" on {host}" if host else ""),
                        file=file, key=path, host=host, hint=f"write {key} = \"true\" or \"false\"")]
    return []


def check(desired: Desired) -> list[Finding]:
    """All domain rules over the declared fleet."""
    out: list[Finding] = []
    out += check_queues(declared_sidekiq(desired), file=desired.source)
    out += _check_unit_secrets(desired)
    out += check_placement(desired, ((h, s.kind, s.unit, f"services.{s.name}.hosts")
                                     for s in desired.services for h in s.hosts))
    out += _check_env_files(desired)
    out += check_store_settings(desired)
    return out


def _check_unit_secrets(desired: Desired) -> list[Finding]:
    """A unit's Environment= is as public as the repository: secrets belong in an env file."""
    out = []
    for s in desired.services:
        for k, _ in s.unit_spec.environment if s.unit_spec else ():
            if looks_secret(k):
                out.append(Finding(
                    "error", "env.secret-in-clear",
                    f"{k} is a secret, and its value is written in clear in the repository (unit Environment=)",
                    file=desired.source, key=f"services.{s.name}.unit_file.environment.{k}",
                    hint=f"move {k} to an env file's [sensitive] table and rotate it: it is in the history now"))
    return out


def declared_sidekiq(desired: Desired) -> list[SidekiqProcess]:
    """One process per Sidekiq service, host and unit.  A service's processes differ only in
    host, unit and DB_POOL: each is made from the service's shared fields (18,000 processes at
    1,000 hosts: the dataclass's `__init__`, a frozen setter per field, was most of the check)."""
    procs: list[SidekiqProcess] = []
    db_pool = _db_pools(desired)
    new = object.__new__
    for s in desired.services:
        if s.sidekiq is None:
            continue
        queues, key = s.sidekiq.queue_names(), f"services.{s.name}"
        unknown = "reads its queues from config/sidekiq.yml on the host" if s.sidekiq.queues_from_config else ""
        concurrency, file = s.sidekiq.concurrency, desired.source
        for h in s.hosts:
            pool = db_pool(s, h)
            for unit in s.units_on(h):
                p = new(SidekiqProcess)
                # every field, in the dataclass's order (test_worked_out_once.py pins it)
                p.__dict__.update(host=h, unit=unit, queues=queues, concurrency=concurrency, db_pool=pool,
                                  key=key, file=file, unknown=unknown, source="")
                procs.append(p)
    return procs


def _db_pools(desired: Desired) -> Callable[[Service, str], int | None]:
    """`_effective_db_pool`, worked out once per service and set of env files: a host without
    overrides sees exactly its env files' values, so hosts with the same env files share the
    answer (a Sidekiq service on 1,000 hosts asked 1,000 times).  A host with an override in
    any env file is worked out on its own.  A host's set of env files is found once, not once
    per Sidekiq service on it."""
    overridden = {h for ef in desired.env_files for h, _ in ef.overrides}
    memo: dict[tuple[int, tuple[int, ...]], int | None] = {}
    files_of: dict[str, tuple[int, ...]] = {}

    def of(service: Service, host: str) -> int | None:
        if host in overridden:
            return _effective_db_pool(desired, service, host)
        files = files_of.get(host)
        if files is None:
            files = files_of[host] = tuple(map(id, desired.env_files_on(host)))  # all alive for this call
        key = (id(service), files)
        if key not in memo:
            memo[key] = _effective_db_pool(desired, service, host)
        return memo[key]

    return of


def _effective_db_pool(desired: Desired, service: Service, host: str) -> int | None:
    """systemd lets EnvironmentFile= override Environment=, so the env file wins."""
    spec = service.unit_spec
    if spec is None:
        return None
    value = spec.env().get("DB_POOL")
    for ef in desired.env_files_on(host):
        if ef.path in spec.environment_files and "DB_POOL" in ef.values_for(host):
            value = ef.values_for(host)["DB_POOL"]
    try:
        return int(value) if value is not None else None
    except ValueError:
        return 0  # unparseable: Mastodon's Integer() would fail; report as too small


def _check_env_files(desired: Desired) -> list[Finding]:
    out: list[Finding] = []
    src = desired.source
    for ef in desired.env_files:
        p = f"env_files.{ef.name}"
        keys = [(src, f"{p}.values.{k}", k, "") for k, _ in ef.values]
        keys += [(src, f"{p}.sensitive.{k}", k, "") for k in ef.sensitive_keys()]
        keys += [(src, f"{p}.overrides.{h}.{k}", k, "") for h, kv in ef.overrides for k, _ in kv]
        out += check_env_keys(keys, desired.extra_env_keys)
        for k, v in ef.values:
            out += check_env_value(src, f"{p}.values.{k}", k, v)
        for h, kv in ef.overrides:
            for k, v in kv:
                out += check_env_value(src, f"{p}.overrides.{h}.{k}", k, v, h)
        sensitive = set(ef.sensitive_keys())
        clear = [(f"{p}.values.{k}", k) for k, _ in ef.values]
        clear += [(f"{p}.overrides.{h}.{k}", k) for h, kv in ef.overrides for k, _ in kv]
        for path, k in clear:
            if k in sensitive or looks_secret(k):
                out.append(Finding(
                    "error", "env.secret-in-clear",
                    f"{k} is a secret, and its value is written in clear in the repository",
                    file=src, key=path,
                    hint=f"remove the value, declare {k} under [{p}.sensitive] (\"file\", \"env:VAR\" or "
                         "\"present\"), and rotate the secret: it is in the history now"))
        for s in ef.services:
            svc = desired.service(s)
            if svc is not None and svc.unit_spec is not None and ef.path not in svc.unit_spec.environment_files:
                out.append(Finding(
                    "warning", "env.not-loaded",
                    f"env file {ef.name!r} ({ef.path}) is declared for {s}, but {svc.unit} does not load it",
                    file=src, key=f"services.{s}.unit_file.environment_files",
                    hint=f"add {ef.path!r} to environment_files, or drop {s} from {p}.services"))
    out += _check_env_consistency(desired)
    return out


def _check_env_consistency(desired: Desired) -> list[Finding]:
    """Hosts of one service must see the same value for a key, unless declared as an override."""
    out: list[Finding] = []
    # path -> host -> (ids, the host's env files at that path): found once per host and path, not
    # once more for every service on the host that loads the path
    at_path: dict[str, dict[str, tuple[tuple[int, ...], list[EnvFile]]]] = {}
    for svc in desired.services:
        if svc.unit_spec is None:
            continue
        for path in svc.unit_spec.environment_files:
            # A host's values here are its env files' `values` (not its overrides): the same for
            # every host with the same env files (in the same order), so hosts are grouped by them
            # and each group's values merged once, not once per host and key.
            on = at_path.setdefault(path, {})
            groups: dict[tuple[int, ...], tuple[dict[str, str], list[str]]] = {}
            for h in svc.hosts:
                mine = on.get(h)
                if mine is None:
                    files = [ef for ef in desired.env_files_on(h) if ef.path == path]
                    mine = on[h] = (tuple(map(id, files)), files)  # all alive for this call
                group = groups.get(mine[0])
                if group is None:
                    group = groups[mine[0]] = ({k: v for ef in mine[1] for k, v in ef.values}, [])
                group[1].append(h)
            keys = dict.fromkeys(k for values, _ in groups.values() for k in values)  # in the hosts' order
            for k in keys:
                if len({values[k] for values, _ in groups.values() if k in values}) > 1:
                    per_host = {h: values[k] for values, hosts in groups.values() if k in values for h in hosts}
                    shown = ", ".join(f"{h}={v!r}" if not looks_secret(k) else h for h, v in sorted(per_host.items()))
                    out.append(Finding(
                        "error", "env.inconsistent",
                        f"{k} differs between hosts of service {svc.name} ({shown})",
                        file=desired.source, key=f"services.{svc.name}",
                        hint="use one value, or declare the difference in [env_files.NAME.overrides.HOST]"))
    return _dedupe(out)


# ---------------------------------------------------------------- settings against placement

@dataclass(frozen=True)
class StoreSetting:
    """A Mastodon setting that says where a data store runs (lib/mastodon/redis_configuration.rb,
    config/database.yml, config/chewy.yml)."""

    key: str
    kind: Kind  # what it points at (a Postgres setting may also point at PgBouncer)
    port_keys: tuple[str, ...] = ()  # where its port is read, in order; () for a URL (the port is in it)
    writes: bool = False  # Mastodon writes through it: a standby behind it is an error
    prepared: tuple[str, ...] = ()  # the keys saying whether it uses prepared statements, in order

    @property
    def url(self) -> bool:
        return self.key.endswith("_URL")


_PG = ("PREPARED_STATEMENTS",)
_REPLICA_PG = ("REPLICA_PREPARED_STATEMENTS", "PREPARED_STATEMENTS")
STORE_SETTINGS: tuple[StoreSetting, ...] = (
    StoreSetting("DB_HOST", Kind.POSTGRES, ("DB_PORT",), writes=True, prepared=_PG),
    StoreSetting("DATABASE_URL", Kind.POSTGRES, writes=True, prepared=_PG),
    StoreSetting("REPLICA_DB_HOST", Kind.POSTGRES, ("REPLICA_DB_PORT", "DB_PORT"), prepared=_REPLICA_PG),
    StoreSetting("REPLICA_DATABASE_URL", Kind.POSTGRES, prepared=_REPLICA_PG),
    StoreSetting("REDIS_HOST", Kind.REDIS, ("REDIS_PORT",)),
    StoreSetting("REDIS_URL", Kind.REDIS),
    StoreSetting("SIDEKIQ_REDIS_HOST", Kind.REDIS, ("SIDEKIQ_REDIS_PORT",)),
    StoreSetting("SIDEKIQ_REDIS_URL", Kind.REDIS),
    StoreSetting("CACHE_REDIS_HOST", Kind.REDIS, ("CACHE_REDIS_PORT",)),
    StoreSetting("CACHE_REDIS_URL", Kind.REDIS),
    StoreSetting("ES_HOST", Kind.ELASTICSEARCH, ("ES_PORT",)),
)
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
_SCHEMES = {Kind.POSTGRES: ("postgres", "postgresql"), Kind.REDIS: ("redis", "rediss", "unix"),
            Kind.ELASTICSEARCH: ("http", "https")}
PGBOUNCER_GUIDE = "https://docs.joinmastodon.org/admin/scaling/#pgbouncer"


@dataclass(frozen=True)
class _Target:
    """Where a setting points: a host part ("" for the host itself, through a Unix socket) and a port."""

    host: str
    port: int | None  # None: not a port number
    shown: str  # how messages show it (a URL's host:port only: it may hold a password)


def check_store_settings(desired: Desired) -> list[Finding]:
    """Each setting that says where a data store runs (DB_HOST, REDIS_URL …, on every host that
    reads the env file, per-host overrides included) must point at a host where a service of that
    kind is declared, at the port it listens on; PgBouncer in front needs PREPARED_STATEMENTS=false.
    A setting pointing outside the inventory is left alone when no service of its kind is declared
    anywhere (an external database fleet knows nothing about)."""
    found: dict[tuple[str, str, str, str], tuple[Finding, list[str]]] = {}
    check_setting = _setting_checker(desired)
    for ef in desired.env_files:
        sensitive = set(ef.sensitive_keys())
        for host in ef.hosts:
            values = ef.values_for(host)
            for setting in STORE_SETTINGS:
                if setting.key not in values or setting.key in sensitive:
                    continue
                if setting.kind == Kind.ELASTICSEARCH and values.get("ES_ENABLED") != "true":
                    continue  # Mastodon reads ES_HOST only with ES_ENABLED=true
                path = _setting_path(ef, host, setting.key)
                for f in check_setting(host, setting, values, path):
                    group = (f.code, f.key, f.message, f.hint)
                    found.setdefault(group, (f, []))[1].append(host)
    out = []
    for f, hosts in found.values():
        where = hosts[0] if len(hosts) == 1 else ", ".join(hosts)
        out.append(Finding(f.severity, f.code, f"{f.message} (read on {where})", file=f.file, key=f.key,
                           hint=f.hint, host=hosts[0] if len(hosts) == 1 else ""))
    return out


def setting_hosts(desired: Desired, host: str, setting: StoreSetting, values: dict[str, str]) -> tuple[str, ...]:
    """The inventory hosts `setting`, read on `host` with `values`, points at: the host itself for
    localhost or a socket; () when it is unset, unreadable or outside the inventory."""
    if setting.key not in values:
        return ()
    target = _target(setting, values)
    if target is None:
        return ()
    if target.host == "" or _is_local(target.host):
        return (host,)
    return _resolve(desired, target.host)


def resolve_host(desired: Desired, name: str) -> tuple[str, ...]:
    """The inventory hosts a host name or address (as a setting or a replication link says it) names."""
    return _resolve(desired, name)


def _setting_path(ef: EnvFile, host: str, key: str) -> str:
    if key in dict(dict(ef.overrides).get(host, ())):
        return f"env_files.{ef.name}.overrides.{host}.{key}"
    return f"env_files.{ef.name}.values.{key}"


def _setting_checker(desired: Desired) -> Callable[[str, StoreSetting, dict[str, str], str], list[Finding]]:
    """`_check_setting`, worked out once per setting, key path and the values it reads, where
    its target is another host: then the answer does not depend on the host reading it (1,000
    hosts read one DB_HOST).  A local target (localhost, a socket) is each reading host itself,
    and is checked for every host."""
    memo: dict[tuple[int, str, tuple[str | None, ...]], list[Finding]] = {}
    local: set[tuple[int, str, tuple[str | None, ...]]] = set()

    def check(host: str, setting: StoreSetting, values: dict[str, str], path: str) -> list[Finding]:
        key = (id(setting), path, tuple(values.get(k) for k in (setting.key, *setting.port_keys, *setting.prepared)))
        hit = memo.get(key)
        if hit is not None:
            return hit
        out = _check_setting(desired, host, setting, values, path)
        if key not in local:
            target = _target(setting, values)
            if target is not None and (target.host == "" or _is_local(target.host)):
                local.add(key)
            else:
                memo[key] = out
        return out

    return check


def _check_setting(desired: Desired, host: str, setting: StoreSetting, values: dict[str, str],
                   path: str) -> list[Finding]:
    key, kind = setting.key, setting.kind
    target = _target(setting, values)
    src = desired.source

    def error(code: str, message: str, hint: str) -> Finding:
        return Finding("error", code, message, file=src, key=path, hint=hint)

    if target is None:
        return [error("store.setting-invalid", f"{key} is not a {'/'.join(_SCHEMES[kind])}:// URL fleet can read",
                      f"write it as {_SCHEMES[kind][0]}://HOST:PORT/…")]
    kinds = (kind, Kind.PGBOUNCER) if kind == Kind.POSTGRES else (kind,)
    declared = [(s, h) for s in desired.services if s.kind in kinds for h in s.hosts]
    what = "postgres (or pgbouncer)" if kind == Kind.POSTGRES else kind.value
    where = _where(desired, [h for s, h in declared if s.kind == kind] or [h for _, h in declared])
    local = target.host == "" or _is_local(target.host)
    resolved = (host,) if local else _resolve(desired, target.host)
    said = f"{key} = {target.shown!r}"
    if not resolved:
        if not declared:
            return []  # an external service: nothing declared to check it against
        return [error("store.setting-nowhere",
                      f"{said} points at {target.host}, which is no host of the inventory; {kind.value} is "
                      f"declared on {where}",
                      f"point {key} at {where.split(' (')[0]} (by inventory name or address), or add the host "
                      "it names to the inventory and declare the service there")]
    here = [(s, h) for s, h in declared if h in resolved]
    # A local target is a different host for each host reading it: said so, so that they group.
    named = "the host reading it" if local else ", ".join(resolved)
    if not here:
        elsewhere = f"{kind.value} is declared on {where}" if declared else f"no {what} service is declared anywhere"
        return [error("store.setting-nowhere",
                      f"{said} points at {named}, where no {what} service is declared; {elsewhere}",
                      (f"point {key} at {where.split(' (')[0]}, or declare {kind.value} on {named}" if declared
                       else f"declare the {kind.value} that runs on {named} (observe_only = true for a distro "
                            "unit), so that fleet checks and watches it"))]
    if target.port is None:
        return [error("store.setting-port", f"{said}: its port {_port_text(setting, values)!r} is not a number",
                      "write the port as a number, e.g. 5432")]
    at_port = [(s, h) for s, h in here if s.port == target.port]
    if not at_port:
        listening = ", ".join(f"{s.kind.value} ({s.name}) listens on {s.port}" for s, _ in here)
        bouncer = kind == Kind.POSTGRES and target.port == DEFAULT_PORTS[Kind.PGBOUNCER]
        return [error("store.setting-port",
                      f"{said} with port {target.port} points at {named}, where {listening}"
                      + (" and no pgbouncer service is declared" if bouncer else ""),
                      (f"declare PgBouncer on {named} as a service of kind \"pgbouncer\" (port = "
                       f"{target.port}), or point {key}'s port at Postgres" if bouncer else
                       f"use the port the service listens on, or declare it (`port = {target.port}`)"))]
    out: list[Finding] = []
    svc = at_port[0][0]
    if svc.kind == Kind.PGBOUNCER:
        value = next((values[k] for k in setting.prepared if k in values), None)
        if value != "false":
            shown = f"{setting.prepared[0]} is {value!r}" if value is not None else \
                f"{' or '.join(setting.prepared)} is not set (Mastodon then uses prepared statements)"
            out.append(error("store.pgbouncer-prepared-statements",
                             f"{said} with port {target.port} points at PgBouncer ({svc.name}) on {named}, and "
                             f"{shown}: PgBouncer in transaction pooling mode breaks prepared statements",
                             f"set {setting.prepared[0]} = \"false\" in this env file (Mastodon's scaling guide, "
                             f"{PGBOUNCER_GUIDE})"))
    if setting.writes and svc.role == "standby":
        out.append(error("store.setting-standby",
                         f"{said} points at {svc.name} on {named}, declared a standby: Mastodon writes through "
                         f"{key}, and a standby refuses writes",
                         "point it at the primary (REPLICA_DB_HOST is where a read replica goes)"))
    return out


def _target(setting: StoreSetting, values: dict[str, str]) -> _Target | None:
    """The host part and port a setting names; None when a URL cannot be read."""
    value = values[setting.key].strip()
    if not setting.url:
        host = value
        if setting.kind == Kind.ELASTICSEARCH and "://" in host:  # ES_HOST may carry a scheme
            host = urlsplit(host).hostname or ""
        port_text = _port_text(setting, values)
        port = int(port_text) if digits(port_text) and 0 < int(port_text) < 65536 else None
        local = host.startswith("/")  # DB_HOST may be a Unix socket directory: the host itself
        return _Target("" if local else host, port, value)
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:
        return None
    if url.scheme not in _SCHEMES[setting.kind]:
        return None
    if url.scheme == "unix":
        return _Target("", DEFAULT_PORTS[setting.kind], "unix socket")
    host = url.hostname or ""
    if not host and setting.kind == Kind.POSTGRES:  # postgres:///db?host=/run/postgresql
        host = (parse_qs(url.query).get("host") or [""])[0]
    local = not host or host.startswith("/")
    port = port or DEFAULT_PORTS[setting.kind]
    return _Target("" if local else host, port, f"{url.scheme}://{host or 'localhost'}:{port}/…")


def _port_text(setting: StoreSetting, values: dict[str, str]) -> str:
    return next((values[k].strip() for k in setting.port_keys if k in values), str(DEFAULT_PORTS[setting.kind]))


def _is_local(name: str) -> bool:
    """localhost, or a loopback address: the host that reads the setting."""
    text = name.strip().strip("[]").lower().rstrip(".")
    try:
        return text in _LOCAL_NAMES or ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def _resolve(desired: Desired, name: str) -> tuple[str, ...]:
    """The inventory hosts a setting's host part names: those whose inventory name or address it is,
    else — settings name hosts by DNS while inventories often hold IP addresses or ssh aliases — the
    host whose inventory name is its first label (`nietzsche.hachyderm.internal` is nietzsche)."""
    norm = _address(name.strip().strip("[]"))
    by_key, by_name = _HostIndex.of(desired)
    exact = by_key.get(norm, ())
    if exact or "." not in norm or _is_ip(norm):
        return exact
    return by_name.get(norm.split(".", 1)[0], ())


class _HostIndex:
    """The inventory by normalised name and address, and by lowercase name, built once per
    desired state: every setting of every host is resolved, and a scan of the inventory per
    setting (each address parsed again) made `fleet check` quadratic — 30 s at 1,000 hosts."""

    _last: tuple[Desired, tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]] | None = None

    @classmethod
    def of(cls, desired: Desired) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
        last = cls._last
        if last is not None and last[0] is desired:
            return last[1]
        by_key: dict[str, list[str]] = {}
        by_name: dict[str, list[str]] = {}
        for h in desired.hosts:
            for key in dict.fromkeys((h.name.lower(), _address(h.address))):  # a host once per key
                by_key.setdefault(key, []).append(h.name)
            by_name.setdefault(h.name.lower(), []).append(h.name)
        index = ({k: tuple(v) for k, v in by_key.items()}, {k: tuple(v) for k, v in by_name.items()})
        cls._last = (desired, index)
        return index


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.lower().rstrip(".")


def _where(desired: Desired, hosts: Iterable[str]) -> str:
    shown = []
    for name in dict.fromkeys(hosts):
        h = desired.host(name)
        shown.append(f"{name} ({h.address})" if h is not None and h.address != name else name)
    return ", ".join(shown) or "no host"


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for f in findings:
        k = (f.code, f.message, f.key)
        if k not in seen:
            seen.add(k)
            out.append(f)
    return out


__all__ = ["SidekiqProcess", "StoreSetting", "check", "check_queues", "check_placement", "check_env_keys",
           "check_env_value", "check_store_settings", "declared_sidekiq", "near_miss", "resolve_host", "setting_hosts"]
