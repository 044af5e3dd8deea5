"""The declared fleet as plain, immutable data.

Everything downstream (policy, diff, plan, render) reads these frozen dataclasses; only
`fleet.config` builds them from files.  Nothing here does I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property


class Kind(StrEnum):
    """What a service is, which decides the domain rules that apply to it."""

    WEB = "web"
    STREAMING = "streaming"
    SIDEKIQ = "sidekiq"
    POSTGRES = "postgres"
    REDIS = "redis"
    PGBOUNCER = "pgbouncer"  # a connection pooler in front of Postgres (Mastodon's scaling guide)
    ELASTICSEARCH = "elasticsearch"  # or OpenSearch: full-text search (ES_HOST)
    GENERIC = "generic"


KINDS: tuple[str, ...] = tuple(k.value for k in Kind)

# The data stores: Mastodon's settings point at them (DB_HOST, REDIS_HOST …), and fleet observes
# them as they run (fleet/resources/stores.py).  Each listens on a port, by default this one.
DEFAULT_PORTS: dict[Kind, int] = {Kind.POSTGRES: 5432, Kind.REDIS: 6379, Kind.PGBOUNCER: 6432,
                                  Kind.ELASTICSEARCH: 9200}
ROLES: tuple[str, ...] = ("primary", "standby")  # a data store's declared replication role

# Sidekiq queues Mastodon uses (fasp since 4.4).  Mastodon's admin dashboard flags any
# queue that no process listens to.
SIDEKIQ_QUEUES: tuple[str, ...] = (
    "default",
    "push",
    "ingress",
    "mailers",
    "pull",
    "scheduler",
    "fasp",
)

DEFAULT_SIDEKIQ_COMMAND = "/home/mastodon/.rbenv/shims/bundle exec sidekiq"


@dataclass(frozen=True)
class Host:
    """One inventory file in hosts/."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    sudo: bool = False
    roles: tuple[str, ...] = ()
    source: str = ""  # the file it came from, for messages


@dataclass(frozen=True)
class HealthCheck:
    """Exactly one of command / http / tcp / sidekiq is set; all run on the host itself.  `sidekiq`:
    the unit's new process must heartbeat in Sidekiq's Redis with its declared queues and
    concurrency (fleet/sidekiq.py, beat_script), within apply's start timeout."""

    command: str | None = None
    http: str | None = None
    tcp: int | None = None
    timeout: float = 10.0
    sidekiq: bool = False

    def describe(self) -> str:
        if self.sidekiq:
            return "Sidekiq heartbeat with its declared queues"
        if self.http is not None:
            return f"GET {self.http}"
        if self.tcp is not None:
            return f"TCP port {self.tcp}"
        return f"command `{self.command}`"


@dataclass(frozen=True)
class UnitSpec:
    """The contents of a systemd unit fleet writes (never for observe-only services).

    Either fleet renders it from the fields below (the keyed form of `unit_file`), or the operator
    owns its text (`text`, from a file in the repository or from declared directives): then fleet
    writes that text byte for byte and the fields are what fleet READ from it (fleet/unitfile.py),
    for the rules that need them (DB_POOL, env files loaded, ExecStart)."""

    exec_start: str
    description: str = ""
    user: str | None = None
    group: str | None = None
    working_directory: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    environment_files: tuple[str, ...] = ()
    exec_reload: str | None = None
    restart: str | None = None
    restart_sec: str | None = None
    after: tuple[str, ...] = ("network.target",)
    wanted_by: tuple[str, ...] = ("multi-user.target",)
    text: str | None = None  # operator-owned: the exact text fleet writes
    source: str = ""  # where that text comes from, for messages: "units/x.service" or "directives"
    remain_after_exit: bool = False  # Type=oneshot with RemainAfterExit=yes: up is active/exited

    def env(self) -> dict[str, str]:
        return dict(self.environment)


@dataclass(frozen=True)
class DropInSpec:
    """A drop-in fleet writes for a service's unit: `/etc/systemd/system/UNIT.d/NAME`, the
    operator's text byte for byte (a file in the repository)."""

    name: str  # `10-limits.conf`: a plain *.conf name, no path parts
    text: str
    source: str  # the repository file it comes from, for messages


@dataclass(frozen=True)
class Wrapper:
    """The unit that starts a template's instances together (Mastodon's `mastodon-streaming.service`,
    a oneshot with RemainAfterExit that the instances are WantedBy/PartOf).  fleet writes, enables
    and starts it, and never restarts it: through PartOf= that would restart every instance at once."""

    unit: str
    unit_spec: UnitSpec


@dataclass(frozen=True)
class SidekiqSpec:
    """A Sidekiq service's process: declared (`concurrency`, `queues`: fleet derives ExecStart), or
    read from the operator's unit text (-c and -q of its ExecStart; without -q, Sidekiq reads its
    queues from config/sidekiq.yml on the host, which only `fleet status` can see)."""

    concurrency: int | None
    queues: tuple[tuple[str, int | None], ...]  # (queue, weight) in order
    command: str = DEFAULT_SIDEKIQ_COMMAND
    queues_from_config: bool = False

    def queue_names(self) -> tuple[str, ...]:
        return tuple(q for q, _ in self.queues)

    def argv_tail(self) -> list[str]:
        args = ["-c", str(self.concurrency)]
        for queue, weight in self.queues:
            args += ["-q", queue if weight is None else f"{queue},{weight}"]
        return args

    def exec_start(self) -> str:
        return " ".join([self.command, *self.argv_tail()])


@dataclass(frozen=True)
class StoreSpec:
    """What is declared about a data store beyond its unit (only when something is)."""

    role: str | None = None  # "primary" | "standby" (postgres, redis): checked against what runs
    probe: bool = False  # postgres: fleet may ask the server itself (read-only SQL via psql)
    port: int | None = None  # where it listens, when not the health check's TCP port or the default


MOVE_METHODS: dict[Kind, str] = {Kind.POSTGRES: "streaming-replica", Kind.REDIS: "redis-replica"}


@dataclass(frozen=True)
class MoveSpec:
    """A declared move of a data store (`[moves.SERVICE]`): the operator's replication brings the
    data from `source` to `target` by `method`; fleet checks that it did and orders the switch."""

    service: str
    source: str  # `from`: the host it runs on now
    target: str  # `to`: the host it runs on after
    method: str  # MOVE_METHODS[kind]: how the data gets there (fleet never copies it)


@dataclass(frozen=True)
class Service:
    name: str
    kind: Kind
    unit: str
    hosts: tuple[str, ...]
    requires: tuple[str, ...] = ()
    observe_only: bool = False
    unit_spec: UnitSpec | None = None  # None exactly when observe_only
    sidekiq: SidekiqSpec | None = None
    health: HealthCheck | None = None
    max_unavailable: int = 1
    # A template unit (`unit = "x@.service"`) runs as instances: these on every host, unless the
    # host has its own list (per-host overrides); the wrapper, if any, starts them together.
    instances: tuple[str, ...] = ()
    host_instances: tuple[tuple[str, tuple[str, ...]], ...] = ()
    wrapper: Wrapper | None = None
    store: StoreSpec | None = None  # None: nothing declared beyond the unit (see StoreSpec)
    # The drop-ins of its unit (a template's: of the template, which every instance loads).  None:
    # none declared, and fleet owns none of them; a tuple (empty too): fleet owns UNIT.d/*.conf,
    # writes these and removes any other.
    dropins: tuple[DropInSpec, ...] | None = None

    @property
    def port(self) -> int | None:
        """The port a data store listens on: `port`, else its TCP health check's, else the kind's
        default; None for a service that is no data store."""
        if self.store is not None and self.store.port is not None:
            return self.store.port
        if self.kind not in DEFAULT_PORTS:
            return None
        return self.health.tcp if self.health is not None and self.health.tcp is not None else DEFAULT_PORTS[self.kind]

    @property
    def role(self) -> str | None:
        return self.store.role if self.store is not None else None

    @property
    def probe(self) -> bool:
        return self.store is not None and self.store.probe

    @cached_property
    def is_template(self) -> bool:  # cached: the diff and the checks ask for every host of the service
        return is_template(self.unit)

    @cached_property
    def _own_unit(self) -> tuple[str]:
        return (self.unit,)

    def instances_on(self, host: str) -> tuple[str, ...]:
        return dict(self.host_instances).get(host, self.instances) if self.is_template else ()

    def units_on(self, host: str) -> tuple[str, ...]:
        """The units that run for this service on `host`: its instances, or its unit."""
        if not self.is_template:
            return self._own_unit
        return tuple(instance_unit(self.unit, i) for i in self.instances_on(host))

    def all_units_on(self, host: str) -> tuple[str, ...]:
        """Every unit of the service on `host`: what runs, then the wrapper."""
        return self.units_on(host) + ((self.wrapper.unit,) if self.wrapper else ())

    def run_units(self) -> tuple[str, ...]:
        """What runs for this service on any of its hosts, in declaration order."""
        return tuple(dict.fromkeys(u for h in self.hosts for u in self.units_on(h))) if self.is_template \
            else (self.unit,)

    def owns(self, unit: str) -> bool:
        """Is `unit` one of this service's units on some host (its unit, an instance, its wrapper)?"""
        return unit == self.unit or unit in self.run_units() or (self.wrapper is not None and unit == self.wrapper.unit)

    def health_for(self, unit: str) -> HealthCheck | None:
        """The health check of one of its units: a template's `%i`/`%I` name the instance; a
        wrapper has none (it only starts the instances, which have their own)."""
        h = self.health
        if h is None or (self.wrapper is not None and unit == self.wrapper.unit):
            return None
        if not self.is_template:
            return h
        inst = instance_of(unit) or ""
        # %I is systemd's unescaped instance: `-` stands for `/` (fleet accepts no `\xNN` escapes)
        names = {"%i": inst, "%I": inst.replace("-", "/"), "%%": "%"}

        def sub(text: str) -> str:
            return re.sub(r"%[iI%]", lambda m: names[m.group(0)], text)

        return HealthCheck(command=sub(h.command) if h.command is not None else None,
                           http=sub(h.http) if h.http is not None else None, tcp=h.tcp, timeout=h.timeout,
                           sidekiq=h.sidekiq)


def is_template(unit: str) -> bool:
    """`x@.service`: a template, which systemd runs only as instances (`x@4000.service`)."""
    return "@." in unit and unit.index("@.") == unit.rindex(".") - 1


def instance_unit(template: str, instance: str) -> str:
    """`x@.service` + `4000` → `x@4000.service`."""
    at = template.index("@.")
    return f"{template[:at + 1]}{instance}{template[at + 1:]}"


def template_of(unit: str) -> str | None:
    """`x@4000.service` → `x@.service`; None when `unit` is no instance."""
    if "@" not in unit or "." not in unit or is_template(unit):
        return None
    return unit[:unit.index("@") + 1] + unit[unit.rindex("."):]


def instance_of(unit: str) -> str | None:
    """`x@4000.service` → `4000`; None when `unit` is no instance."""
    if template_of(unit) is None:
        return None
    return unit[unit.index("@") + 1:unit.rindex(".")]


@dataclass(frozen=True)
class SecretSource:
    """Where a sensitive value comes from; the value itself is never in the model."""

    kind: str  # "file" | "env" | "present"
    var: str | None = None  # for kind == "env"

    def describe(self) -> str:
        return f"env:{self.var}" if self.kind == "env" else self.kind


@dataclass(frozen=True)
class EnvFile:
    name: str
    path: str
    hosts: tuple[str, ...]  # resolved: explicit hosts plus the hosts of `services`
    services: tuple[str, ...] = ()
    values: tuple[tuple[str, str], ...] = ()
    sensitive: tuple[tuple[str, SecretSource], ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # host -> values
    owner: str | None = None
    group: str | None = None
    mode: str = "0600"

    def values_for(self, host: str) -> dict[str, str]:
        """The non-sensitive key/values this file must hold on `host`."""
        merged = dict(self.values)
        merged.update(dict(dict(self.overrides).get(host, ())))
        return merged

    def sensitive_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.sensitive)


@dataclass(frozen=True)
class DiscoveryPattern:
    pattern: str  # a systemd unit glob, e.g. "mastodon-*"
    prune: bool = False


@dataclass(frozen=True)
class PlacementRule:
    role: str
    forbid: tuple[str, ...]  # service kinds


@dataclass(frozen=True)
class SidekiqPolicy:
    """`[policy.sidekiq]`: when queue latency is a warning and when an error; which env file
    says where Sidekiq's Redis is (default: the one the Sidekiq services load).  Validated by
    fleet.sidekiq.load_policy."""

    max_latency: float = 300.0
    max_latency_error: float = 1800.0
    env_file: str | None = None


@dataclass(frozen=True)
class WatchSettings:
    """The `[watch]` table of desired_state.toml (validated by fleet.notify.validate_watch)."""

    notify: tuple[str, ...] = ()  # SPECs as written: env:VAR references (or loopback URLs)
    remind_every: float | None = None  # seconds; None: a persisting finding is told once


@dataclass(frozen=True)
class Desired:
    """The whole declared fleet: inventory, services, env files and policy."""

    name: str
    hosts: tuple[Host, ...]
    services: tuple[Service, ...]
    env_files: tuple[EnvFile, ...] = ()
    discover: tuple[DiscoveryPattern, ...] = ()
    placement: tuple[PlacementRule, ...] = ()
    extra_env_keys: tuple[str, ...] = ()
    snapshot_retention_days: float = 90.0  # how long the journal keeps observed snapshots
    watch: WatchSettings = WatchSettings()  # where `fleet watch` and `fleet apply` tell the team
    moves: tuple[MoveSpec, ...] = ()  # declared moves of data stores ([moves.SERVICE])
    source: str = ""
    hosts_dir: str = ""
    sidekiq_policy: SidekiqPolicy = SidekiqPolicy()

    def host(self, name: str) -> Host | None:
        return self._hosts_by_name.get(name)

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    @cached_property
    def _hosts_by_name(self) -> dict[str, Host]:
        """name -> the first host of that name, built once: the policies look a host up for every
        setting of every host, and a scan per lookup made `fleet check` quadratic in hosts."""
        out: dict[str, Host] = {}
        for h in self.hosts:
            out.setdefault(h.name, h)
        return out

    def move(self, service: str) -> MoveSpec | None:
        return next((m for m in self.moves if m.service == service), None)

    def services_on(self, host: str) -> tuple[Service, ...]:
        return self._by_host[0].get(host, ())

    def env_files_on(self, host: str) -> tuple[EnvFile, ...]:
        return self._by_host[1].get(host, ())

    @cached_property
    def _by_host(self) -> tuple[dict[str, tuple[Service, ...]], dict[str, tuple[EnvFile, ...]]]:
        """host -> its services and env files, built once: scanning every host list for every
        host made planning quadratic in the fleet's size (bench/, docs/PERFORMANCE.md)."""
        services: dict[str, list[Service]] = {}
        for s in self.services:
            for h in dict.fromkeys(s.hosts):
                services.setdefault(h, []).append(s)
        envs: dict[str, list[EnvFile]] = {}
        for e in self.env_files:
            for h in dict.fromkeys(e.hosts):
                envs.setdefault(h, []).append(e)
        return ({h: tuple(v) for h, v in services.items()}, {h: tuple(v) for h, v in envs.items()})


@dataclass(frozen=True)
class Finding:
    """One diagnostic: an error stops the run, a warning is reported and allowed."""

    severity: str  # "error" | "warning"
    code: str  # stable identifier, e.g. "env.unknown-key"
    message: str  # what is wrong
    file: str = ""
    key: str = ""  # dotted key path, e.g. services.web.hosts
    line: int | None = None
    column: int | None = None
    hint: str = ""  # how to fix it
    host: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def as_dict(self) -> dict[str, object]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "file": self.file,
            "key": self.key,
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
            "host": self.host,
        }


# ---------------------------------------------------------------- observed state
# What the collector found on a host.  Built only by fleet.collect.parse from text a host
# printed; secrets never appear here in clear (only sha256 fingerprints).


@dataclass(frozen=True)
class UnitState:
    unit: str
    load_state: str  # loaded | not-found | masked | error …
    active_state: str  # active | inactive | failed | activating …
    sub_state: str  # running | dead | exited | auto-restart …
    unit_file_state: str  # enabled | disabled | static | masked | "" …
    exec_start: tuple[str, ...] = ()  # argv of the first ExecStart
    main_pid: int = 0
    fragment_path: str = ""
    drop_in_paths: tuple[str, ...] = ()
    active_enter: str = ""
    n_restarts: int = 0
    result: str = ""
    text_hash: str = ""  # sha256 over (path, file hash) of fragment and drop-ins; "" when no file
    file_hashes: tuple[tuple[str, str], ...] = ()  # (path, sha256) of fragment then drop-ins
    text: str | None = None  # full text (fragment then drop-ins), only for fleet-managed units
    environment: tuple[tuple[str, str], ...] = ()  # Environment=, secret-looking values masked
    environment_files: tuple[str, ...] = ()  # EnvironmentFile= paths

    @property
    def exists(self) -> bool:
        return self.load_state not in ("not-found", "")

    @property
    def running(self) -> bool:
        return self.active_state == "active" and self.sub_state == "running"

    @property
    def enabled(self) -> bool:
        return self.unit_file_state in ("enabled", "enabled-runtime", "static", "alias", "indirect", "generated")

    def state(self) -> str:
        """How the status table shows it: `missing`, or ActiveState/SubState."""
        if not self.exists:
            return "missing"
        return f"{self.active_state}/{self.sub_state}"


@dataclass(frozen=True)
class EnvFileState:
    path: str
    present: bool
    mode: str = ""  # octal, e.g. "0600"
    owner: str = ""
    group: str = ""
    size: int = 0
    keys: tuple[str, ...] = ()  # every key, in file order (duplicates kept)
    values: tuple[tuple[str, str], ...] = ()  # non-sensitive keys only
    secrets: tuple[tuple[str, str], ...] = ()  # sensitive key -> sha256 of its raw value
    invalid_lines: int = 0  # lines that are neither KEY=value, comments nor blank
    # sha256 of the whole file as the parse above read it ("" unknown): a later collection that
    # finds the same hash on the host reuses this parse instead of reading the file again
    # (fleet/resources/env_file.py, `env_offers`).
    sha256: str = ""

    def value_map(self) -> dict[str, str]:
        return dict(self.values)

    def secret_map(self) -> dict[str, str]:
        return dict(self.secrets)


@dataclass(frozen=True)
class HostFacts:
    hostname: str = ""
    os: str = ""
    kernel: str = ""
    systemd_version: str = ""
    system_state: str = ""  # systemctl is-system-running: running | degraded | …
    uptime_seconds: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mem_total_kb: int = 0
    mem_available_kb: int = 0


@dataclass(frozen=True)
class HostState:
    """A host that answered: everything the collector saw, at `collected_at` (epoch seconds)."""

    host: str
    facts: HostFacts
    units: tuple[UnitState, ...]
    env_files: tuple[EnvFileState, ...]
    collected_at: float = 0.0
    duration: float = 0.0
    # Facts of the kinds of resource that have no field of their own: (kind's section name, its
    # frozen data), filled by that kind's parser (fleet/collect/sections.py).
    extra: tuple[tuple[str, object], ...] = ()

    def unit(self, name: str) -> UnitState | None:
        return self._units_by_name.get(name)

    @cached_property
    def _units_by_name(self) -> dict[str, UnitState]:
        """name -> the first unit of that name, built once: the diff looks each of a host's
        declared units up two or three times, and a scan per lookup is quadratic in its units."""
        out: dict[str, UnitState] = {}
        for u in self.units:
            out.setdefault(u.unit, u)
        return out

    def env_file(self, path: str) -> EnvFileState | None:
        return next((e for e in self.env_files if e.path == path), None)

    def facts_of(self, section: str) -> object | None:
        """What the kind printing `section` found on this host; None when it was not collected."""
        return next((data for name, data in self.extra if name == section), None)


@dataclass(frozen=True)
class HostError:
    """A host that could not be observed.  Never treated as an empty host."""

    host: str
    kind: str  # unreachable | auth | hostkey | timeout | protocol | sudo | parse | …
    message: str
    hint: str = ""
    collected_at: float = 0.0


HostResult = HostState | HostError
