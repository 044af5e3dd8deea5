"""Builders for observed host states, as the collector would report them (test-only).

`converged(desired, secrets)` is what every host reports once fleet has applied everything;
`bare(desired)` is hosts with nothing installed.  The small mutators each introduce one kind of
drift into a `HostState` and return a new one (the model is frozen).  They follow the
collector's conventions (fleet.collect.parse / script):

* a unit reports (path, sha256) of its fragment then its drop-ins as `file_hashes`, and its
  `text_hash` is sha256 over those as "PATH FILEHASH" lines;
* a declared unit that is not installed is listed as LoadState=not-found;
* env file keys that are declared sensitive or look secret are reported as fingerprints
  (`envfile.fingerprint`, the sha256 of the raw text after `=`), never as values;
* modes are four octal digits ("0600").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fleet import config
from fleet.envfile import fingerprint
from fleet.mastodon import SECRET_KEYS, looks_secret
from fleet.model import (
    Desired,
    EnvFile,
    EnvFileState,
    HostError,
    HostFacts,
    HostResult,
    HostState,
    Service,
    UnitSpec,
    UnitState,
    instance_of,
)
from fleet.textutil import mask, sha256_hex
from fleet.unitfile import words
from fleet.units import as_observed_text, file_text, unit_path

REPO = Path(__file__).resolve().parents[2]
DISTRO_UNIT_DIR = "/lib/systemd/system"
ENV_PATH = "/home/mastodon/live/.env.production"

# Secrets for the shipped example, chosen to need quoting in an env file ($, quotes, spaces,
# backslashes, a newline, unicode) so that fingerprints of rendered values are exercised.
EXAMPLE_SECRETS: dict[tuple[str, str], str] = {
    ("mastodon", "SECRET_KEY_BASE"): "s3cr3t-key-base-0123456789abcdef",
    ("mastodon", "OTP_SECRET"): 'otp with "quotes" and $HOME',
    ("mastodon", "VAPID_PRIVATE_KEY"): "vapid\\private`key`",
    ("mastodon", "DB_PASS"): "hunter2-db-pass",
    ("mastodon", "AWS_ACCESS_KEY_ID"): "AKIAEXAMPLEACCESSKEY",
    ("mastodon", "AWS_SECRET_ACCESS_KEY"): "aws/secret+key=with\nnewline",
    ("mastodon", "SMTP_PASSWORD"): "smtp pässwörd ✓",
    ("mastodon", "REDIS_PASSWORD"): "redis pass: with spaces, 'quotes' and a # hash",
}


@functools.cache
def example() -> Desired:
    """The shipped example (desired_state.toml + hosts/), loaded once; it must load cleanly."""
    loaded = config.load(REPO / "desired_state.toml", REPO / "hosts")
    assert loaded.desired is not None and not loaded.errors, loaded.findings
    return loaded.desired


def service(desired: Desired, name: str) -> Service:
    s = desired.service(name)
    assert s is not None, f"no service {name}"
    return s


def unit_of(state: HostState, unit: str) -> UnitState:
    u = state.unit(unit)
    assert u is not None, f"{state.host} reports no {unit}"
    return u


# ---------------------------------------------------------------- units


def hashed(files: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`text_hash` and `file_hashes` of a unit made of (path, content) files, fragment first."""
    file_hashes = tuple((p, sha256_hex(c)) for p, c in files)
    return {"file_hashes": file_hashes, "text_hash": hashes_to_text_hash(file_hashes)}


def hashes_to_text_hash(file_hashes: Iterable[tuple[str, str]]) -> str:
    return sha256_hex("\n".join(f"{p} {h}" for p, h in file_hashes))


def _spec_of(service: Service, unit: str | None) -> UnitSpec:
    if service.wrapper is not None and unit == service.wrapper.unit:
        return service.wrapper.unit_spec
    assert service.unit_spec is not None, f"{service.name} is observe-only"
    return service.unit_spec


def _expanded(value: str, unit: str | None) -> str:
    """What systemd shows for a value of an instance's unit: %i and %I expanded."""
    inst = instance_of(unit or "")
    return value if inst is None else value.replace("%i", inst).replace("%I", inst.replace("-", "/"))


def exec_argv(service: Service, unit: str | None = None) -> tuple[str, ...]:
    """argv as `systemctl show` reports it: the operator's text unquoted as systemd does."""
    spec = _spec_of(service, unit)
    if spec.text is None:
        return tuple(spec.exec_start.split())
    return tuple(_expanded(" ".join(words(spec.exec_start)), unit).split())


def managed_unit(service: Service, *, pid: int = 4242, unit: str | None = None) -> UnitState:
    """A fleet-written unit, loaded, enabled and running exactly as declared.  `unit`: one of a
    template's instances (its file is the template's) or the service's wrapper (active/exited)."""
    name = unit or service.unit
    spec = _spec_of(service, unit)
    file_unit = service.wrapper.unit if service.wrapper is not None and name == service.wrapper.unit \
        else service.unit
    text = file_text(service, file_unit)
    assert text is not None
    return UnitState(
        unit=name, load_state="loaded", active_state="active",
        sub_state="exited" if spec.remain_after_exit else "running",
        unit_file_state="enabled", exec_start=exec_argv(service, unit), main_pid=0 if spec.remain_after_exit else pid,
        fragment_path=unit_path(file_unit), drop_in_paths=(), active_enter="Mon 2026-11-23 10:00:00 UTC",
        n_restarts=0, result="success", **hashed([(unit_path(file_unit), text)]),
        text=as_observed_text(service, file_unit),
        environment=tuple((k, mask(v) if looks_secret(k) else _expanded(v, unit)) for k, v in spec.environment),
        environment_files=spec.environment_files,
    )


def distro_unit(unit: str, *, active: str = "active", sub: str = "running", enabled: str = "enabled",
                argv: tuple[str, ...] = (), pid: int = 900) -> UnitState:
    """A unit shipped by a package (fragment under /lib/systemd/system), e.g. postgresql."""
    path = f"{DISTRO_UNIT_DIR}/{unit}"
    return UnitState(
        unit=unit, load_state="loaded", active_state=active, sub_state=sub, unit_file_state=enabled,
        exec_start=argv, main_pid=pid if active == "active" else 0, fragment_path=path,
        **hashed([(path, f"[Unit]\nDescription={unit} from its package\n")]), result="success",
    )


def observe_only_unit(service: Service) -> UnitState:
    """How a distro-managed data store reports when healthy.  Debian's postgresql.service is
    a oneshot wrapper (active/exited); redis-server is active/running."""
    sub = "exited" if service.kind.value == "postgres" else "running"
    return distro_unit(service.unit, sub=sub, argv=() if sub == "exited" else (f"/usr/bin/{service.name}",))


def hand_made_unit(unit: str, argv: str, *, active: bool = True, enabled: bool = True,
                   directory: str = "/etc/systemd/system", pid: int = 3131) -> UnitState:
    """A unit somebody wrote by hand, e.g. a Sidekiq on the CDN node."""
    path = f"{directory}/{unit}"
    content = f"[Service]\nExecStart={argv}\n"
    return UnitState(
        unit=unit, load_state="loaded", active_state="active" if active else "inactive",
        sub_state="running" if active else "dead", unit_file_state="enabled" if enabled else "disabled",
        exec_start=tuple(argv.split()), main_pid=pid if active else 0, fragment_path=path,
        **hashed([(path, content)]), text=f"# {path}\n{content}",
    )


def undeclared_sidekiq(unit: str = "mastodon-sidekiq.service", args: str = "-c 10 -q default",
                       **kw: object) -> UnitState:
    return hand_made_unit(unit, f"/home/mastodon/.rbenv/shims/bundle exec sidekiq {args}", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- env files


def collector_secret_keys(ef: EnvFile) -> set[str]:
    """Keys whose values the collector reports only as fingerprints in this file."""
    return set(ef.sensitive_keys()) | set(SECRET_KEYS)


def is_reported_secret(ef: EnvFile, key: str) -> bool:
    return key in collector_secret_keys(ef) or looks_secret(key)


def env_state_from(ef: EnvFile, items: Iterable[tuple[str, str]], *, owner: str, group: str, mode: str,
                   extra_secrets: Iterable[tuple[str, str]] = ()) -> EnvFileState:
    """The collector's report of a file holding `items` (KEY, value) in order; `extra_secrets`
    are (KEY, fingerprint) pairs for values fleet never sees ("present" secrets)."""
    keys: list[str] = []
    values: list[tuple[str, str]] = []
    secrets: list[tuple[str, str]] = []
    for k, v in items:
        keys.append(k)
        if is_reported_secret(ef, k):
            secrets.append((k, fingerprint(v)))
        else:
            values.append((k, v))
    for k, fp in extra_secrets:
        keys.append(k)
        secrets.append((k, fp))
    return EnvFileState(path=ef.path, present=True, mode=mode, owner=owner, group=group,
                        size=sum(len(k) + len(v) + 2 for k, v in items), keys=tuple(keys), values=tuple(values),
                        secrets=tuple(secrets))


def converged_env(ef: EnvFile, host: str, secrets: Mapping[tuple[str, str], str]) -> EnvFileState:
    items = list(ef.values_for(host).items())
    items += [(k, secrets[(ef.name, k)]) for k, src in ef.sensitive
              if src.kind != "present" and (ef.name, k) in secrets]
    present = [(k, sha256_hex(f"the host's own {k}")) for k, src in ef.sensitive if src.kind == "present"]
    return env_state_from(ef, items, owner=ef.owner or "root", group=ef.group or "root",
                          mode=ef.mode.rjust(4, "0"), extra_secrets=present)


# ---------------------------------------------------------------- hosts


def facts(host: str) -> HostFacts:
    return HostFacts(hostname=host, os="Debian GNU/Linux 12 (bookworm)", kernel="6.1.0-27-amd64",
                     systemd_version="252", system_state="running", uptime_seconds=86400.0,
                     load=(0.1, 0.2, 0.3), mem_total_kb=8_000_000, mem_available_kb=4_000_000)


def converged_host(desired: Desired, host: str, secrets: Mapping[tuple[str, str], str]) -> HostState:
    units = tuple(observe_only_unit(s) if s.observe_only and not s.is_template else
                  distro_unit(u) if s.observe_only else
                  managed_unit(s, pid=1000 + i) if not s.is_template else managed_unit(s, pid=1000 + i * 10 + j, unit=u)
                  for i, s in enumerate(desired.services_on(host)) for j, u in enumerate(s.all_units_on(host)))
    envs = tuple(converged_env(ef, host, secrets) for ef in desired.env_files_on(host))
    return HostState(host=host, facts=facts(host), units=units, env_files=envs, collected_at=1_800_000_000.0)


def converged(desired: Desired, secrets: Mapping[tuple[str, str], str]) -> dict[str, HostState]:
    """Every host as it reports once fleet has applied everything."""
    return {h.name: converged_host(desired, h.name, secrets) for h in desired.hosts}


def not_found(unit: str) -> UnitState:
    """How systemctl shows a unit name it has no file for."""
    return UnitState(unit=unit, load_state="not-found", active_state="inactive", sub_state="dead",
                     unit_file_state="", result="success")


def bare_host(desired: Desired, host: str) -> HostState:
    """A host with none of its declared units installed and its env files absent."""
    units = tuple(not_found(u) for s in desired.services_on(host) for u in s.all_units_on(host))
    envs = tuple(EnvFileState(path=ef.path, present=False) for ef in desired.env_files_on(host))
    return HostState(host=host, facts=facts(host), units=units, env_files=envs, collected_at=1_800_000_000.0)


def bare(desired: Desired) -> dict[str, HostState]:
    return {h.name: bare_host(desired, h.name) for h in desired.hosts}


def unreachable(host: str) -> HostError:
    return HostError(host=host, kind="unreachable", message=f"{host}: connection refused",
                     hint="is sshd running?")


# ---------------------------------------------------------------- mutators


def with_unit(state: HostState, unit: UnitState) -> HostState:
    """`unit` added, or replacing the unit of the same name."""
    others = tuple(u for u in state.units if u.unit != unit.unit)
    return dataclasses.replace(state, units=others + (unit,))


def without_unit(state: HostState, unit: str) -> HostState:
    return dataclasses.replace(state, units=tuple(u for u in state.units if u.unit != unit))


def change_unit(state: HostState, unit: str, **fields: object) -> HostState:
    u = state.unit(unit)
    assert u is not None, f"{state.host} has no {unit}"
    return with_unit(state, dataclasses.replace(u, **fields))  # type: ignore[arg-type]


def stopped(state: HostState, unit: str) -> HostState:
    return change_unit(state, unit, active_state="inactive", sub_state="dead", main_pid=0)


def failed(state: HostState, unit: str) -> HostState:
    return change_unit(state, unit, active_state="failed", sub_state="failed", main_pid=0, result="exit-code")


def disabled(state: HostState, unit: str) -> HostState:
    return change_unit(state, unit, unit_file_state="disabled")


def _files(u: UnitState) -> list[tuple[str, str]]:
    """(path, content) of each file in a unit's collected text, split at its "# PATH" headers."""
    assert u.text is not None, f"{u.unit}: no text collected"
    headers = {f"# {p}" for p in (u.fragment_path, *u.drop_in_paths)}
    files: list[tuple[str, list[str]]] = []
    for line in u.text.splitlines(keepends=True):
        if line.rstrip("\n") in headers:
            files.append((line[2:].rstrip("\n"), []))
        else:
            files[-1][1].append(line)
    return [(p, "".join(c)) for p, c in files]


def edited(state: HostState, unit: str, extra_line: str = "Nice=5") -> HostState:
    """The unit's fragment was edited in place: another text, another hash."""
    files = _files(unit_of(state, unit))
    files[0] = (files[0][0], files[0][1] + extra_line + "\n")
    return change_unit(state, unit, text="".join(f"# {p}\n{c}" for p, c in files), **hashed(files))


def with_drop_in(state: HostState, unit: str, name: str = "override.conf",
                 content: str = "[Service]\nEnvironment=DB_POOL=5\n",
                 directory: str = "/etc/systemd/system") -> HostState:
    """A drop-in next to the unit (as `systemctl edit` makes), which changes its text hash."""
    u = unit_of(state, unit)
    path = f"{directory}/{unit}.d/{name}"
    files = [*_files(u), (path, content)]
    return change_unit(state, unit, drop_in_paths=u.drop_in_paths + (path,),
                       text="".join(f"# {p}\n{c}" for p, c in files), **hashed(files))


def _replace_env(state: HostState, path: str, env: EnvFileState) -> HostState:
    return dataclasses.replace(state, env_files=tuple(env if e.path == path else e for e in state.env_files))


def env_of(state: HostState, path: str = ENV_PATH) -> EnvFileState:
    e = state.env_file(path)
    assert e is not None, f"{state.host} reports no {path}"
    return e


def set_env_value(state: HostState, key: str, value: str, path: str = ENV_PATH) -> HostState:
    """A non-secret key now holds `value` (added at the end when it was not there)."""
    e = env_of(state, path)
    values = dict(e.values)
    keys = e.keys if key in values else e.keys + (key,)
    values[key] = value
    return _replace_env(state, path, dataclasses.replace(e, keys=keys, values=tuple(values.items())))


def set_env_secret(state: HostState, key: str, value: str, path: str = ENV_PATH) -> HostState:
    """A secret key now holds `value` (reported by fingerprint only)."""
    e = env_of(state, path)
    secrets = dict(e.secrets)
    keys = e.keys if key in secrets else e.keys + (key,)
    secrets[key] = fingerprint(value)
    return _replace_env(state, path, dataclasses.replace(e, keys=keys, secrets=tuple(secrets.items())))


def drop_env_key(state: HostState, key: str, path: str = ENV_PATH) -> HostState:
    e = env_of(state, path)
    return _replace_env(state, path, dataclasses.replace(
        e, keys=tuple(k for k in e.keys if k != key), values=tuple((k, v) for k, v in e.values if k != key),
        secrets=tuple((k, v) for k, v in e.secrets if k != key)))


def env_meta(state: HostState, path: str = ENV_PATH, **fields: str) -> HostState:
    """Change owner / group / mode of an env file."""
    return _replace_env(state, path, dataclasses.replace(env_of(state, path), **fields))  # type: ignore[arg-type]


# ---------------------------------------------------------------- random fleets (hypothesis)

MUTATIONS = ("stop", "fail", "disable", "edit", "drop-in", "remove-unit", "env-value", "env-secret", "env-drop",
             "env-extra", "env-mode", "env-absent", "undeclared", "old-postgres")

# Values a host may hold: anything a parsed env file can yield (one line, no NUL).
host_values = st.text(st.characters(codec="utf-8", exclude_characters="\x00\n\r"), max_size=20)


def mutate(desired: Desired, state: HostState, what: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> HostState:
    """One random drift of kind `what` on `state`, or `state` itself when it does not apply."""
    host = state.host
    units = [u.unit for u in state.units]
    managed = [u for u in units if (s := _declared(desired, host, u)) is not None and not s.observe_only]
    env = state.env_file(ENV_PATH)
    has_env = env is not None and env.present
    if what in ("stop", "fail", "disable", "remove-unit") and units:
        unit = draw(st.sampled_from(units))
        fn = {"stop": stopped, "fail": failed, "disable": disabled, "remove-unit": without_unit}[what]
        return fn(state, unit)
    if what in ("edit", "drop-in") and managed:
        unit = draw(st.sampled_from(managed))
        if what == "edit":
            return edited(state, unit)
        return with_drop_in(state, unit, name=f"local-{draw(st.integers(0, 9))}.conf")
    if what == "env-value" and has_env:
        ef = desired.env_files_on(host)[0]
        return set_env_value(state, draw(st.sampled_from(sorted(ef.values_for(host)))), draw(host_values))
    if what == "env-secret" and has_env:
        return set_env_secret(state, draw(st.sampled_from(sorted(desired.env_files[0].sensitive_keys()))),
                              draw(host_values))
    if what == "env-drop" and has_env and env is not None and env.keys:
        return drop_env_key(state, draw(st.sampled_from(env.keys)))
    if what == "env-extra" and has_env:
        key = draw(st.sampled_from(["3_BUCKET", "OLD_FLAG", "CACHE_REDIS_PASSWORD", "S3_ENDPOINT"]))
        return set_env_secret(state, key, draw(host_values)) if looks_secret(key) else set_env_value(
            state, key, draw(host_values))
    if what == "env-mode" and has_env:
        return env_meta(state, mode=draw(st.sampled_from(["0644", "0640", "0600"])),
                        owner=draw(st.sampled_from(["root", "mastodon"])))
    if what == "env-absent" and has_env:
        return _replace_env(state, ENV_PATH, EnvFileState(path=ENV_PATH, present=False))
    if what == "undeclared":
        elsewhere = [managed_unit(s) for s in desired.services if s.unit_spec and host not in s.hosts]
        made = [undeclared_sidekiq(), hand_made_unit("mastodon-old-web.service", "/usr/bin/old-web -p 3000")]
        unit = draw(st.sampled_from(elsewhere + made))
        unit = dataclasses.replace(
            unit, active_state=draw(st.sampled_from(["active", "inactive", "failed"])),
            unit_file_state=draw(st.sampled_from(["enabled", "disabled", "static", "enabled-runtime"])),
            fragment_path=draw(st.sampled_from([unit.fragment_path, f"{DISTRO_UNIT_DIR}/{unit.unit}"])))
        return with_unit(state, unit)
    if what == "old-postgres" and _declared(desired, host, "postgresql.service") is None:
        return with_unit(state, distro_unit("postgresql.service", sub="exited"))
    return state


def _declared(desired: Desired, host: str, unit: str) -> Service | None:
    return next((s for s in desired.services_on(host) if unit in s.all_units_on(host)), None)


@st.composite
def fleets(draw: st.DrawFn, desired: Desired, secrets: Mapping[tuple[str, str], str], *,
           unreachable_hosts: bool = False) -> dict[str, HostResult]:
    """Each host bare, converged, or converged then drifted by a few random mutations (and, if
    asked, unreachable)."""
    kinds = ["bare", "converged", "drifted"] + (["unreachable"] if unreachable_hosts else [])
    out: dict[str, HostResult] = {}
    for h in desired.hosts:
        kind = draw(st.sampled_from(kinds), label=f"{h.name} is")
        if kind == "unreachable":
            out[h.name] = unreachable(h.name)
            continue
        state = bare_host(desired, h.name) if kind == "bare" else converged_host(desired, h.name, secrets)
        if kind == "drifted":
            for what in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4), label=f"{h.name} drift"):
                state = mutate(desired, state, what, draw)
        out[h.name] = state
    return out
