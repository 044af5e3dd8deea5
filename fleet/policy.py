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
from fleet.textutil import damerau_levenshtein, did_you_mean


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


def check_queues(processes: Sequence[SidekiqProcess], *, what: str = "declared", file: str = "") -> list[Finding]:
    """Every Mastodon queue served somewhere; `scheduler` exactly once; DB_POOL ≥ -c.
    `file` is where fleet-wide findings point (default: where the processes are declared)."""
    out: list[Finding] = []
    file = file or next((p.file for p in processes if p.file), "")
    served = {q for p in processes for q in p.queues}
    for q in SIDEKIQ_QUEUES:
        if q not in served:
            out.append(Finding(
                "error", "sidekiq.queue-unserved",
                f"queue {q!r} is served by no {what} Sidekiq process: its jobs would pile up unprocessed",
                file=file, key="services",
                hint=f"add {q!r} to the queues of a Sidekiq service (e.g. queues = {{ {q} = 1 }})"))
    schedulers = [p for p in processes if "scheduler" in p.queues]
    if len(schedulers) != 1:
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
            procs.append(SidekiqProcess(
                host=h, unit=s.unit, queues=s.sidekiq.queue_names(), concurrency=s.sidekiq.concurrency,
                db_pool=_effective_db_pool(desired, s, h), key=f"services.{s.name}", file=desired.source))
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
           "near_miss", "declared_sidekiq"]
