"""Domain rules for a Mastodon fleet, as pure functions returning findings.

The rules are written over small records (`SidekiqProcess`, `EnvPlacement`) rather than over
`Desired` directly, so that the same rule judges the declared fleet (`fleet check`) and, later,
the observed one (`fleet audit`): "no process serves `pull`" is the same finding either way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleet.mastodon import BOOLEAN_KEYS, KNOWN_ENV_KEYS, looks_secret
from fleet.model import SIDEKIQ_QUEUES, Desired, Finding, Kind, Service
from fleet.textutil import did_you_mean


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


def check_env_keys(keys: Iterable[tuple[str, str, str, str]], extra_keys: Iterable[str] = ()) -> list[Finding]:
    """`keys` are (file, key path, env key, host) tuples; unknown keys get a suggestion."""
    known = KNOWN_ENV_KEYS | frozenset(extra_keys)
    out: list[Finding] = []
    for file, path, key, host in keys:
        if key not in known:
            hint = did_you_mean(key, known)
            out.append(Finding(
                "error", "env.unknown-key",
                f"{key!r} is not a Mastodon setting" + (f" (on {host})" if host else "")
                + ": Mastodon would silently ignore it",
                file=file, key=path, host=host,
                hint=(hint + " " if hint else "") + "if it is intentional, list it in policy.env.extra_keys"))
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
    procs: list[SidekiqProcess] = []
    for s in desired.services:
        if s.sidekiq is None:
            continue
        for h in s.hosts:
            procs.extend(SidekiqProcess(
                host=h, unit=unit, queues=s.sidekiq.queue_names(), concurrency=s.sidekiq.concurrency,
                db_pool=_effective_db_pool(desired, s, h), key=f"services.{s.name}", file=desired.source,
                unknown="reads its queues from config/sidekiq.yml on the host" if s.sidekiq.queues_from_config
                else "") for unit in s.units_on(h))
    return procs


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
    for svc in desired.services:
        if svc.unit_spec is None:
            continue
        for path in svc.unit_spec.environment_files:
            base: dict[str, dict[str, str]] = defaultdict(dict)  # key -> host -> value
            for h in svc.hosts:
                for ef in desired.env_files_on(h):
                    if ef.path == path:
                        for k, v in ef.values:
                            base[k][h] = v
            for k, per_host in base.items():
                if len(set(per_host.values())) > 1:
                    shown = ", ".join(f"{h}={v!r}" if not looks_secret(k) else h for h, v in sorted(per_host.items()))
                    out.append(Finding(
                        "error", "env.inconsistent",
                        f"{k} differs between hosts of service {svc.name} ({shown})",
                        file=desired.source, key=f"services.{svc.name}",
                        hint="use one value, or declare the difference in [env_files.NAME.overrides.HOST]"))
    return _dedupe(out)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for f in findings:
        k = (f.code, f.message, f.key)
        if k not in seen:
            seen.add(k)
            out.append(f)
    return out


__all__ = ["SidekiqProcess", "check", "check_queues", "check_placement", "check_env_keys", "check_env_value",
           "declared_sidekiq"]
