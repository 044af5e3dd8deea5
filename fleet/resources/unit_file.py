"""Unit files: the files fleet writes for a managed service (write-unit), and the systemd reload
that every written unit file implies on its host (daemon-reload).

A service's files are its unit (a template's: the template file its instances load) and its
wrapper's, each either rendered from the keyed form or the operator's own text (fleet/units.py).
A file is rewritten when it is not byte for byte what was declared, or when drop-ins in fleet's
own directory change it; those drop-ins are removed with the rewrite (backed up first), unless
the service declares its drop-ins: then they are fleet/resources/drop_ins.py's.  Drop-ins
elsewhere are reported, never touched; an instance's own drop-ins (`x@4000.service.d/`) are the
instance's, not the template's, and are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fleet import remote
from fleet.actions import Action, Change, ObservedKind, Payload, Phase, UnitFilePayload
from fleet.config import UNIT_NAME
from fleet.errors import FleetError
from fleet.model import Desired, Service, UnitState
from fleet.resources.base import (
    DIFF,
    PLAIN,
    ActionSpec,
    Detail,
    Execution,
    HostDiff,
    Resource,
    StepView,
    empty,
    hash_problem,
    refuse_removals,
    removal_problem,
    report_refused,
    text,
    texts,
)
from fleet.textutil import sha256_hex
from fleet.units import (
    UNIT_DIR,
    as_observed_text,
    describe_unit,
    file_text,
    foreign_drop_ins,
    mask_unit_text,
    not_there,
    refused_unit_files,
    removable_unit_file,
    unit_file_differs,
    unit_files,
    unit_path,
)


class UnitTexts:
    """A managed unit's text depends on its service only, and so does the diff that installs it
    where it is missing: worked out once per service and diff(), not once per host (a first
    install of 1,000 hosts would render and diff each unit 1,000 times)."""

    def __init__(self) -> None:
        self._rendered: dict[tuple[int, str], tuple[Service, str, str]] = {}
        self._bodies: dict[tuple[str, str], str] = {}

    def of(self, s: Service, unit: str, text: str) -> tuple[str, str]:
        """(sha256 of the unit file's text, that text as the collector shows it)."""
        hit = self._rendered.get((id(s), unit))
        if hit is None or hit[0] is not s:
            hit = (s, sha256_hex(text), as_observed_text(s, unit))
            self._rendered[(id(s), unit)] = hit
        return hit[1], hit[2]

    def unified_diff(self, before: str, after: str, fromfile: str, tofile: str) -> str:
        """`difflib.unified_diff` of the two texts, joined; only its ---/+++ lines name the host."""
        body = self._bodies.get((before, after))
        if body is None:
            import difflib  # only a drifted unit file is diffed: start-up need not import it

            lines = list(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                              fromfile="-", tofile="+"))
            body = "".join(lines[2:])  # without the two header lines, which unified_diff omits for no change
            self._bodies[(before, after)] = body
        return f"--- {fromfile}\n+++ {tofile}\n{body}" if body else ""


_FIRST_INSTALLS = "unit file: first installs"


class FirstInstalls:
    """A service's unit files written on a host where none of its units is there yet (`not_there`)
    are the same on every such host with the same units but for the host's name: worked out on the
    first and copied (a first install of 1,000 hosts made them 1,000 times).  Per service and its
    units on the host: (the units looked at, and per file (unit, reason, before, after, content
    hash, the diff's body below its ---/+++ lines, which name the host)), or None when what the
    first host got cannot be copied."""

    def __init__(self) -> None:
        self._made: dict[tuple[int, tuple[str, ...]], tuple[Service, Any]] = {}

    def get(self, s: Service, runs: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]] | None:
        hit = self._made.get((id(s), runs))
        return hit[1] if hit is not None and hit[0] is s else None

    def learn(self, s: Service, runs: tuple[str, ...], files: tuple[tuple[str, str, str], ...], ctx: HostDiff,
              made: list[Change]) -> None:
        """What the full diff of `s` just made on ctx's host (with no problem or note), kept if it
        can be copied to another host: none of the service's units was there, it made one
        write-unit per file, and the host's name is in none of their fields but the diff's ---/+++
        lines.  Learnt once per service and units (a copy that cannot be made is not tried again)."""
        hit = self._made.get((id(s), runs))
        if hit is not None and hit[0] is s:
            return
        looked_at = tuple(dict.fromkeys((*runs, *(probe for _, _, probe in files), *(unit for unit, _, _ in files))))
        if not all(not_there(ctx.state.unit(u)) for u in looked_at):
            return  # not a first install here: learnt from a host where it is
        host = ctx.host
        kept = None
        if len(made) == len(files):
            rows = []
            for (unit, _, _), c in zip(files, made, strict=True):
                p = c.payload
                header = f"--- {host}:{unit} (now)\n+++ {host}:{unit} (desired)\n"
                body = p.diff[len(header):] if isinstance(p, UnitFilePayload) and p.diff.startswith(header) else None
                if (c.host != host or c.action != Action.WRITE_UNIT or c.target != unit or c.service != s.name
                        or not isinstance(p, UnitFilePayload) or p.remove_files or (body is None and p.diff)
                        or any(host in f for f in (c.reason, c.before, c.after, p.content_hash, body or ""))):
                    break
                rows.append((unit, c.reason, c.before, c.after, p.content_hash, body or ""))
            else:
                kept = (looked_at, tuple(rows))
        self._made[(id(s), runs)] = (s, kept)


class UnitFiles(Resource):
    kind = "unit file"
    actions = {
        Action.WRITE_UNIT: ActionSpec(Phase.WRITE, "~", "change", needs_reload=True),
        Action.DAEMON_RELOAD: ActionSpec(Phase.RELOAD, "~", "change", shows_target=False),
    }
    explained = {Action.WRITE_UNIT: frozenset({ObservedKind.UNIT_APPEARED, ObservedKind.UNIT_TEXT,
                                               ObservedKind.UNIT_ENABLEMENT})}
    per_service = True

    # -- diff

    def diff_service(self, ctx: HostDiff, service: Service) -> None:
        s, host = service, ctx.host
        runs = s.units_on(host)
        unit_of = ctx.state.unit
        if runs and not not_there(unit_of(runs[0])):  # it is (partly) here: diffed here, nothing learnt
            self._diff_files(ctx, s, unit_files(s, host))
            return
        installs: FirstInstalls | None = ctx.cache.get(_FIRST_INSTALLS)
        if installs is None:
            installs = ctx.cache[_FIRST_INSTALLS] = FirstInstalls()
        made = installs.get(s, runs)
        if made is not None:
            for u in made[0]:
                if not not_there(unit_of(u)):
                    break
            else:  # none of its units here yet: as on the host it was learnt from
                for unit, reason, before, after, content_hash, body in made[1]:
                    header = f"--- {host}:{unit} (now)\n+++ {host}:{unit} (desired)\n" if body else ""
                    ctx.add(Change(host, Action.WRITE_UNIT, unit, reason, s.name, before=before, after=after,
                                   payload=UnitFilePayload(content_hash, diff=header + body)))
                    ctx.rewritten_units.add(unit)
                return
        first = (len(ctx.changes), len(ctx.problems), len(ctx.notes))
        files = unit_files(s, host)
        self._diff_files(ctx, s, files)
        if made is None and (len(ctx.problems), len(ctx.notes)) == first[1:]:
            installs.learn(s, runs, files, ctx, ctx.changes[first[0]:])  # if none of its units is here

    def _diff_files(self, ctx: HostDiff, s: Service, files: tuple[tuple[str, str, str], ...]) -> None:
        host = ctx.host
        for unit, content, probe in files:
            self._diff_file(ctx, s, unit, content, ctx.state.unit(probe))
        for run_unit in s.units_on(host) if s.unit_spec is None else ():
            self._report_drop_ins(ctx, run_unit, ctx.state.unit(run_unit))  # observe-only: only reported
        for run_unit in s.units_on(host)[1:] if s.unit_spec is not None else ():
            self._report_drop_ins(ctx, run_unit, ctx.state.unit(run_unit))  # the other instances

    def _diff_file(self, ctx: HostDiff, s: Service, unit: str, content: str, u: UnitState | None) -> None:
        """One of the service's unit files; `u` the unit whose state shows it (for a template,
        its first instance on the host)."""
        host = ctx.host
        drop_ins = tuple(p for p in foreign_drop_ins(s, unit, u) if removable_unit_file(p, unit)) \
            if u is not None and u.drop_in_paths else ()  # most units have none: no scan
        units: UnitTexts | None = ctx.cache.get(self.kind)
        if units is None:  # not setdefault(): that would build a UnitTexts for every host and file
            units = ctx.cache[self.kind] = UnitTexts()
        content_hash, observed_text = units.of(s, unit, content)
        if unit_file_differs(s, u, content_hash, unit):
            before_text = mask_unit_text(u.text or "") if u is not None else ""
            udiff = units.unified_diff(before_text, observed_text,
                                       fromfile=f"{host}:{unit} (now)", tofile=f"{host}:{unit} (desired)")
            installed = u is not None and u.exists
            reason = "unit file differs from the declaration" if installed else "unit is not installed"
            if drop_ins:
                reason += f"; removes {len(drop_ins)} drop-in(s) fleet did not write"
            before = (u.fragment_path or unit_path(unit)) if u is not None and installed else "absent"
            ctx.add(Change(host, Action.WRITE_UNIT, unit, reason, s.name, before=before,
                           after=unit_path(unit),
                           payload=UnitFilePayload(content_hash, diff=udiff, remove_files=drop_ins)))
            ctx.rewritten_units.add(unit)
        self._report_drop_ins(ctx, u.unit if u is not None else unit, u)

    def _report_drop_ins(self, ctx: HostDiff, unit: str, u: UnitState | None) -> None:
        if u is None or not u.drop_in_paths:
            return  # nothing to report (asked for each of the fleet's units on each host)
        foreign = [p for p in u.drop_in_paths if not p.startswith(UNIT_DIR + "/")]
        report_refused(ctx, unit, refused_unit_files(unit, u.drop_in_paths))
        if foreign:
            ctx.problems.append(f"on {ctx.host}, {unit} also reads drop-in(s) {', '.join(foreign)}, outside "
                                f"{UNIT_DIR}: fleet does not remove them, and they may change the unit "
                                f"(now {describe_unit(u)}); remove them by hand if they are not wanted")

    def implied(self, ctx: HostDiff) -> None:
        # After the host's other changes: a prune that removes a unit file reloads systemd itself,
        # after its stop, and must not hold up the reload that new units on this host wait for.
        if ctx.reload_needed:
            ctx.add(Change(ctx.host, Action.DAEMON_RELOAD, "systemd", "unit files changed on this host"))

    def affects(self, change: Change, desired: Desired) -> Iterable[str]:
        if change.action != Action.WRITE_UNIT:
            return ()
        svc = desired.service(change.service or "")
        if svc is not None and svc.is_template and change.target == svc.unit:
            return svc.units_on(change.host)  # a template file: what runs from it is its instances
        return (change.target,)

    # -- plan file

    def load(self, action: Action, fields: Mapping[str, Any]) -> Payload:
        if action == Action.DAEMON_RELOAD:
            return super().load(action, fields)
        empty(fields, "keys", "steps", "meta")
        return UnitFilePayload(text(fields, "content_hash"), diff=text(fields, "diff"),
                               remove_files=texts(fields, "remove_files"))

    def problem(self, change: Change) -> str | None:
        if change.action == Action.DAEMON_RELOAD:
            return None if change.target == "systemd" else \
                f"a daemon-reload targets 'systemd', not {change.target!r}"
        if not UNIT_NAME.fullmatch(change.target):
            return f"unit name {change.target!r} is not one `fleet check` accepts"
        p = _payload(change)
        return hash_problem(p.content_hash) or removal_problem(p.remove_files, change.target)

    # -- apply

    def check_content(self, change: Change, desired: Desired, secrets: Mapping[tuple[str, str], str]) -> str | None:
        if change.action != Action.WRITE_UNIT:
            return None
        svc = desired.service(change.service or "")
        text = file_text(svc, change.target) if svc is not None else None
        if text is None or sha256_hex(text) != _payload(change).content_hash:
            return f"{change.host}: the unit {change.target} would differ from the plan"
        return None

    def execute(self, change: Change, step: Execution) -> None:
        if change.action == Action.DAEMON_RELOAD:
            step.run(remote.systemctl("daemon-reload"))
            return
        removes = _payload(change).remove_files
        refuse_removals(removes, change.target)
        svc = step.service(change.service)
        text = file_text(svc, change.target)
        if text is None:
            raise FleetError(f"service {svc.name} no longer declares the unit file {change.target}")
        step.run(remote.remove_files(removes, run_id=step.run_id))
        step.backed_up(removes)  # a rollback puts them back with the unit
        step.write(unit_path(change.target), text, mode="0644", owner="root", group="root")

    # -- journal and plan text

    def sentence(self, step: StepView) -> str:
        if step.action == Action.DAEMON_RELOAD:
            return "reloaded systemd"
        if step.before == "absent":
            how = "new"
        elif step.before and step.before != step.after:
            how = f"was {step.before}"
        else:
            how = "changed"
        n = len(step.details.get("remove_files", ()))
        if n:
            how += f"; removed {n} drop-in{'s' if n != 1 else ''}"
        return f"wrote unit file {step.target} ({how})"

    def symbol(self, change: Change) -> str:
        return "+" if change.action == Action.WRITE_UNIT and change.before == "absent" else "~"

    def bucket(self, change: Change) -> str:
        return "install" if change.action == Action.WRITE_UNIT and change.before == "absent" else "change"

    def details(self, change: Change) -> list[Detail]:
        if change.action != Action.WRITE_UNIT:
            return []
        p = _payload(change)
        return [(PLAIN, f"- remove {f}") for f in p.remove_files] + ([(DIFF, p.diff)] if p.diff else [])


def _payload(change: Change) -> UnitFilePayload:
    if not isinstance(change.payload, UnitFilePayload):
        raise FleetError(f"{change.id} carries no unit file to write")  # only a Change built by hand lacks it
    return change.payload
