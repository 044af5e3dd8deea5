"""Unit files: the file fleet writes for a managed service (write-unit), and the systemd reload
that every written unit file implies on its host (daemon-reload).

A managed unit is rewritten when its fragment is not byte for byte what fleet renders
(fleet/units.py) or when drop-ins in fleet's own directory change it; those drop-ins are removed
with the rewrite (backed up first).  Drop-ins elsewhere are reported, never touched.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from fleet import remote
from fleet.actions import Action, Change, ObservedKind, Payload, Phase, UnitFilePayload
from fleet.config import UNIT_NAME
from fleet.errors import FleetError
from fleet.model import Desired, Service
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
    mask_unit_text,
    refused_unit_files,
    removable_unit_file,
    render_unit,
    unit_file_differs,
    unit_path,
)


class UnitTexts:
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
        u = ctx.state.unit(s.unit)
        if s.unit_spec is not None:
            drop_ins = tuple(p for p in (u.drop_in_paths if u else ()) if removable_unit_file(p, s.unit))
            units: UnitTexts = ctx.cache.setdefault(self.kind, UnitTexts())
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
                ctx.add(Change(host, Action.WRITE_UNIT, s.unit, reason, s.name, before=before,
                               after=unit_path(s.unit),
                               payload=UnitFilePayload(content_hash, diff=udiff, remove_files=drop_ins)))
                ctx.rewritten_units.add(s.unit)
        foreign = [p for p in (u.drop_in_paths if u else ()) if not p.startswith(UNIT_DIR + "/")]
        report_refused(ctx, s.unit, refused_unit_files(s.unit, u.drop_in_paths if u else ()))
        if foreign:
            ctx.problems.append(f"on {host}, {s.unit} also reads drop-in(s) {', '.join(foreign)}, outside "
                                f"{UNIT_DIR}: fleet does not remove them, and they may change the unit "
                                f"(now {describe_unit(u)}); remove them by hand if they are not wanted")

    def implied(self, ctx: HostDiff) -> None:
        # After the host's other changes: a prune that removes a unit file reloads systemd itself,
        # after its stop, and must not hold up the reload that new units on this host wait for.
        if ctx.reload_needed:
            ctx.add(Change(ctx.host, Action.DAEMON_RELOAD, "systemd", "unit files changed on this host"))

    def affects(self, change: Change, desired: Desired) -> Iterable[str]:
        return (change.target,) if change.action == Action.WRITE_UNIT else ()

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
        if svc is None or svc.unit_spec is None or sha256_hex(render_unit(svc)) != _payload(change).content_hash:
            return f"{change.host}: the unit {change.target} would differ from the plan"
        return None

    def execute(self, change: Change, step: Execution) -> None:
        if change.action == Action.DAEMON_RELOAD:
            step.run(remote.systemctl("daemon-reload"))
            return
        removes = _payload(change).remove_files
        refuse_removals(removes, change.target)
        svc = step.service(change.service)
        step.run(remote.remove_files(removes, run_id=step.run_id))
        step.backed_up(removes)  # a rollback puts them back with the unit
        step.write(unit_path(change.target), render_unit(svc), mode="0644", owner="root", group="root")

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
