"""diff(desired, observed) -> changes: what must happen on which host, and why.  Pure.

Level-based and idempotent, like a Kubernetes controller: the changes depend only on the
desired and the observed state, so diffing a converged fleet yields nothing.  An unreachable
host is never treated as empty: it yields no changes and is reported as unknown.

Secrets: desired values arrive resolved in `secrets` (never stored in a Change); a Change
only ever holds masked text and sha256 fingerprints.
"""

from __future__ import annotations

import difflib
import fnmatch
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from fleet.actions import Action, Change, EnvFilePayload, KeyChange, PrunePayload, UnitFilePayload
from fleet.envfile import fingerprint
from fleet.model import (
    Desired,
    DiscoveryPattern,
    EnvFile,
    EnvFileState,
    HostError,
    HostResult,
    HostState,
    Service,
    UnitState,
)
from fleet.textutil import mask, sha256_hex
from fleet.units import (
    UNIT_DIR,
    as_observed_text,
    instance_owner,
    mask_unit_text,
    refused_unit_files,
    removable_unit_file,
    render_unit,
    unit_file_differs,
    unit_path,
)


@dataclass(frozen=True)
class Diff:
    changes: tuple[Change, ...]
    unknown: tuple[HostError, ...] = ()  # hosts that could not be observed: nothing planned for them
    notes: tuple[str, ...] = ()  # things reported, deliberately not changed (e.g. a db left running)
    problems: tuple[str, ...] = ()  # things fleet cannot fix (e.g. a "present" secret that is missing)


def describe_unit(u: UnitState | None) -> str:
    """`active/running, enabled, -c 10 -q default` — what a reader needs to recognise it."""
    if u is None or not u.exists:
        return "not installed"
    parts = [u.state(), u.unit_file_state or "no unit file"]
    args = _interesting_args(u.exec_start)
    if args:
        parts.append(f"`{args}`")
    return ", ".join(parts)


def _interesting_args(argv: tuple[str, ...]) -> str:
    """The part of a command line that tells processes apart (Sidekiq's -c/-q, puma's -C)."""
    if not argv:
        return ""
    for i, a in enumerate(argv):
        if a.startswith("-"):
            return shlex.join(argv[i:])
    return ""


def diff(desired: Desired, observed: Mapping[str, HostResult], secrets: Mapping[tuple[str, str], str],
         *, prune: bool = True) -> Diff:
    """All changes for the observed hosts.  `secrets` maps (env file name, key) -> value."""
    changes: list[Change] = []
    unknown: list[HostError] = []
    notes: list[str] = []
    problems: list[str] = []
    # Make-before-break needs the whole fleet in view: with a host excluded (--limit) or
    # unobservable, the instance a prune would stop may be the only one left.  Report instead.
    whole = all(isinstance(observed.get(h.name), HostState) for h in desired.hosts)
    units = _UnitTexts()
    for host in desired.hosts:
        result = observed.get(host.name)
        if result is None:
            continue  # not targeted (--limit)
        if isinstance(result, HostError):
            unknown.append(result)
            continue
        host_changes = _host_changes(desired, result, secrets, problems, units)
        pruned, host_notes = _prune_changes(desired, result, prune, whole, problems)
        changes += host_changes + pruned
        notes += host_notes
        # A prune that removes a unit file reloads systemd itself, after its stop: it must not
        # hold up the reload that new units on this host wait for.
        if any(c.action == Action.WRITE_UNIT for c in host_changes):
            changes.append(Change(host.name, Action.DAEMON_RELOAD, "systemd", "unit files changed on this host"))
    return Diff(changes=tuple(changes), unknown=tuple(unknown), notes=tuple(notes), problems=tuple(problems))


class _UnitTexts:
    """A managed unit's text depends on its service only, and so does the diff that installs it
    where it is missing: worked out once per service and diff(), not once per host (a first
    install of 1,000 hosts would render and diff each unit 1,000 times)."""

    def __init__(self) -> None:
        self._rendered: dict[int, tuple[Service, str, str]] = {}
        self._bodies: dict[tuple[str, str], str] = {}

    def of(self, s: Service) -> tuple[str, str]:
        """(sha256 of the rendered unit, the rendered unit as the collector shows it)."""
        hit = self._rendered.get(id(s))
        if hit is None or hit[0] is not s:
            hit = (s, sha256_hex(render_unit(s)), as_observed_text(s))
            self._rendered[id(s)] = hit
        return hit[1], hit[2]

    def unified_diff(self, before: str, after: str, fromfile: str, tofile: str) -> str:
        """`difflib.unified_diff` of the two texts, joined; only its ---/+++ lines name the host."""
        body = self._bodies.get((before, after))
        if body is None:
            lines = list(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                              fromfile="-", tofile="+"))
            body = "".join(lines[2:])  # without the two header lines, which unified_diff omits for no change
            self._bodies[(before, after)] = body
        return f"--- {fromfile}\n+++ {tofile}\n{body}" if body else ""


def _host_changes(desired: Desired, state: HostState, secrets: Mapping[tuple[str, str], str],
                  problems: list[str], units: _UnitTexts) -> list[Change]:
    out: list[Change] = []
    host = state.host
    env_written: set[str] = set()
    for ef in desired.env_files_on(host):
        c = _env_change(ef, state, secrets, problems)
        if c is not None:
            out.append(c)
            env_written.add(ef.path)
    for s in desired.services_on(host):
        out += _service_changes(s, state, env_written, problems, units)
    return out


def _service_changes(s: Service, state: HostState, env_written: set[str], problems: list[str],
                     units: _UnitTexts) -> list[Change]:
    host = state.host
    u = state.unit(s.unit)
    out: list[Change] = []
    rewritten = False
    if s.unit_spec is not None:
        drop_ins = tuple(p for p in (u.drop_in_paths if u else ()) if removable_unit_file(p, s.unit))
        content_hash, observed_text = units.of(s)
        if unit_file_differs(s, u, content_hash):
            before_text = mask_unit_text(u.text or "") if u is not None else ""
            udiff = units.unified_diff(before_text, observed_text,
                                       fromfile=f"{host}:{s.unit} (now)", tofile=f"{host}:{s.unit} (desired)")
            installed = u is not None and u.exists
            reason = "unit file differs from the declaration" if installed else "unit is not installed"
            if drop_ins:
                reason += f"; removes {len(drop_ins)} drop-in(s) fleet did not write"
            before = (u.fragment_path or unit_path(s.unit)) if u is not None and installed else "absent"
            out.append(Change(host, Action.WRITE_UNIT, s.unit, reason, s.name, before=before,
                              after=unit_path(s.unit),
                              payload=UnitFilePayload(content_hash, diff=udiff, remove_files=drop_ins)))
            rewritten = True
    foreign = [p for p in (u.drop_in_paths if u else ()) if not p.startswith(UNIT_DIR + "/")]
    _report_refused(host, s.unit, refused_unit_files(s.unit, u.drop_in_paths if u else ()), problems)
    if foreign:
        problems.append(f"on {host}, {s.unit} also reads drop-in(s) {', '.join(foreign)}, outside "
                        f"{UNIT_DIR}: fleet does not remove them, and they may change the unit "
                        f"(now {describe_unit(u)}); remove them by hand if they are not wanted")
    if u is None or not u.exists or not u.enabled:
        out.append(Change(host, Action.ENABLE, s.unit, "declared units start at boot", s.name,
                          before=(u.unit_file_state or "absent") if u is not None else "absent", after="enabled"))
    loads_changed = [p for p in (s.unit_spec.environment_files if s.unit_spec else ()) if p in env_written]
    running = u is not None and u.active_state == "active" and (u.sub_state == "running" or s.observe_only)
    if not running:
        was = describe_unit(u)
        action = Action.RESTART if u is not None and u.active_state == "active" else Action.START
        out.append(Change(host, action, s.unit, f"declared to run here; now {was}", s.name,
                          before=was, after="active/running"))
    elif rewritten or loads_changed:
        why = "its unit file changes" if rewritten else f"{', '.join(loads_changed)} changes"
        out.append(Change(host, Action.RESTART, s.unit, f"running, and {why}", s.name,
                          before=describe_unit(u), after="active/running with the new configuration"))
    return out


def desired_env_items(ef: EnvFile, host: str, secrets: Mapping[tuple[str, str], str]) -> list[tuple[str, str]]:
    """The key/values fleet writes into `ef` on `host` ("present" secrets are kept by the
    writer from the host's own file and are not in this list)."""
    items = list(ef.values_for(host).items())
    for key, src in ef.sensitive:
        if src.kind != "present" and (ef.name, key) in secrets:
            items.append((key, secrets[(ef.name, key)]))
    return items


def _env_change(ef: EnvFile, state: HostState, secrets: Mapping[tuple[str, str], str],
                problems: list[str]) -> Change | None:
    host = state.host
    obs = state.env_file(ef.path) or EnvFileState(path=ef.path, present=False)
    want_values = ef.values_for(host)
    sensitive = dict(ef.sensitive)
    want_secret = {k: fingerprint(secrets[(ef.name, k)]) for k, src in ef.sensitive
                   if src.kind != "present" and (ef.name, k) in secrets}
    have_values, have_secret = obs.value_map(), obs.secret_map()
    keys: list[KeyChange] = []

    def shown(key: str, value: str | None, fp: str | None) -> str:
        if fp is not None:
            return f"(sensitive, sha256:{fp[:8]})"
        return "" if value is None else value

    for k, v in want_values.items():
        if k in have_secret:  # the host holds it under a secret-looking name; compare by fingerprint
            if have_secret[k] != fingerprint(v):
                keys.append(KeyChange(k, "change", shown(k, None, have_secret[k]), mask(v)))
        elif k not in have_values:
            keys.append(KeyChange(k, "set", "", v))
        elif have_values[k] != v:
            keys.append(KeyChange(k, "change", have_values[k], v))
    for k, fp in want_secret.items():
        if k not in have_secret and k not in have_values:
            keys.append(KeyChange(k, "set", "", shown(k, None, fp)))
        elif have_secret.get(k) != fp:
            before = shown(k, None, have_secret[k]) if k in have_secret else mask(have_values[k])
            keys.append(KeyChange(k, "change", before, shown(k, None, fp)))
    for k, src in ef.sensitive:
        if src.kind == "present" and k not in have_secret and k not in have_values and obs.present:
            problems.append(f"on {host}, {ef.path} lacks {k}, declared \"present\" (fleet never writes its value): "
                            "add it on the host by hand")
    for k in dict.fromkeys(obs.keys):
        if k not in want_values and k not in sensitive:
            before = shown(k, have_values.get(k), have_secret.get(k))
            keys.append(KeyChange(k, "remove", before, ""))
    reasons = []
    if not obs.present:
        reasons.append("file is missing")
    elif keys:
        reasons.append(f"{len(keys)} key(s) differ")
    if obs.present and len(obs.keys) != len(set(obs.keys)):
        reasons.append("a key appears more than once")
    if obs.present and obs.invalid_lines:
        reasons.append(f"{obs.invalid_lines} line(s) are not KEY=value")
    mode = ef.mode if len(ef.mode) == 4 else "0" + ef.mode
    meta_wrong = obs.present and (obs.mode != mode or (ef.owner and obs.owner != ef.owner)
                                  or (ef.group and obs.group != ef.group))
    if meta_wrong:
        reasons.append(f"owner/mode {obs.owner}:{obs.group} {obs.mode}, should be "
                       f"{ef.owner or obs.owner}:{ef.group or obs.group} {mode}")
    if not reasons:
        return None
    return Change(host, Action.WRITE_ENV, ef.path, "; ".join(reasons), None,
                  before="absent" if not obs.present else f"{len(obs.keys)} keys, {obs.owner}:{obs.group} {obs.mode}",
                  after=f"{len(want_values) + len(sensitive)} keys, {ef.owner or 'root'}:{ef.group or 'root'} {mode}",
                  payload=EnvFilePayload(keys=tuple(keys), content_hash=env_digest(ef, host, secrets), name=ef.name,
                                         owner=ef.owner or "", group=ef.group or "", mode=mode))


def _report_refused(host: str, unit: str, refused: tuple[str, ...], problems: list[str]) -> None:
    if refused:
        problems.append(f"on {host}, {unit} is reported with unit file(s) {', '.join(repr(p) for p in refused)}: "
                        f"not a plain file of that unit in {UNIT_DIR} or its {unit}.d/ directory, so fleet never "
                        "removes them; look at the host: what it reports is not what systemd writes")


def _prune_changes(desired: Desired, state: HostState, prune: bool, whole: bool,
                   problems: list[str]) -> tuple[list[Change], list[str]]:
    host = state.host
    declared_here = {s.unit for s in desired.services_on(host)}
    out: list[Change] = []
    notes: list[str] = []
    for u in state.units:
        if u.unit in declared_here or not u.exists or instance_owner(desired.services_on(host), u.unit) is not None:
            continue
        pattern = _matching_pattern(desired.discover, u.unit)
        active = u.active_state in ("active", "activating", "reloading")
        if pattern is None:
            continue  # declared for another host, not matching discovery: not our business here
        _report_refused(host, u.unit, refused_unit_files(u.unit, (u.fragment_path, *u.drop_in_paths)), problems)
        ours = removable_unit_file(u.fragment_path, u.unit)
        if not active and not u.enabled and not ours:
            continue  # an installed, idle distro unit (postgresql on a non-db host): nothing to say
        if not (pattern.prune and prune and whole):
            why = (f"{pattern.pattern} has prune = false" if not pattern.prune
                   else "pruning is off for this run (--no-prune)" if not prune
                   else "not every host is in view (--limit or unreachable), so fleet cannot make sure "
                        "it runs elsewhere before stopping it here")
            notes.append(f"on {host}, {u.unit} is undeclared ({describe_unit(u)}); left alone: {why}")
            continue
        steps = [s for s, need in (("stop", active), ("disable", u.enabled and u.unit_file_state != "static"),
                                   ("remove", ours)) if need]
        if not steps:
            continue
        files = ((u.fragment_path,) if "remove" in steps else ()) + tuple(
            p for p in u.drop_in_paths if removable_unit_file(p, u.unit))
        out.append(Change(host, Action.PRUNE, u.unit,
                          f"undeclared on {host} (matches {pattern.pattern}, prune = true)",
                          _service_of(desired, u.unit), before=describe_unit(u),
                          after="stopped, disabled" + (", unit file removed" if "remove" in steps else ""),
                          payload=PrunePayload(steps=tuple(steps), remove_files=files if "remove" in steps else ())))
    return out, notes


def _matching_pattern(patterns: tuple[DiscoveryPattern, ...], unit: str) -> DiscoveryPattern | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(unit, p.pattern)), None)


def _service_of(desired: Desired, unit: str) -> str | None:
    return next((s.name for s in desired.services if s.unit == unit), None)


def env_digest(ef: EnvFile, host: str, secrets: Mapping[tuple[str, str], str]) -> str:
    """A hash of exactly what fleet would write into `ef` on `host`, computed over secret
    fingerprints rather than values, so it can be stored in a plan and re-checked at apply."""
    lines = [f"{k}={v}" for k, v in ef.values_for(host).items()]
    lines += [f"{k}=sha256:{fingerprint(secrets[(ef.name, k)])}" for k, src in ef.sensitive
              if src.kind != "present" and (ef.name, k) in secrets]
    return sha256_hex("\n".join(lines))
