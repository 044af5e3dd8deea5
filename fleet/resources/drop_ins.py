"""Drop-ins: the `*.conf` files in `/etc/systemd/system/UNIT.d/` of every declared unit, observed
with their sha256 and shown on the unit's status cell (and so in `fleet audit`) as "has drop-ins";
and, for a service that declares its drop-ins (`[services.NAME.dropins]`), written and removed
(write-drop-in, remove-drop-in).

The units section reports a unit's drop-ins as systemd has them loaded (DropInPaths); this one
reads the directory itself, so a drop-in written since the last daemon-reload — which changes
the unit at its next restart — is seen too, and it is what the diff judges.

Who owns a drop-in: a service without `dropins` declares none and owns none here (a rewrite of
a unit fleet writes still removes the drop-ins in its directory, fleet/resources/unit_file.py:
that unit's text is the declaration alone).  A service with `dropins` (an empty table too) owns
every `*.conf` directly in its unit's directory: a declared one missing or different (by
sha256) is written (0644 root), any other there is removed (backed up); either is followed by a
daemon-reload and the restart of what runs from the unit.  A template's drop-ins are the
template's directory (`x@.service.d/`), which every instance loads; an instance's own directory
is never fleet's.  Paths from a host are data: only a plain `NAME.conf` (unitfile.DROPIN_NAME)
directly in that directory is acted on; anything else there is reported, never touched.

Section `@@dropins`: `sha256sum` lines, `SHA256  DIR/NAME.conf`; a name holding a backslash or a
line break comes escaped, the line starting with a backslash (as GNU sha256sum writes it).
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fleet import remote
from fleet.actions import Action, Change, ObservedKind, Payload, Phase, UnitFilePayload
from fleet.collect.sections import Collected, SectionParser, too_much
from fleet.config import UNIT_NAME
from fleet.errors import FleetError, ParseError
from fleet.model import Desired, DropInSpec, HostState, Service, template_of
from fleet.resources.base import (
    DIFF,
    PLAIN,
    ActionSpec,
    Detail,
    Execution,
    HostDiff,
    Problem,
    Resource,
    StepView,
    empty,
    hash_problem,
    text,
)
from fleet.textutil import sha256_hex
from fleet.unitfile import DROPIN_NAME
from fleet.units import UNIT_DIR, drop_in_dir, mask_unit_text, removable_unit_file, unit_file_texts

MAX_DROP_INS = 1_000  # per host: a unit has a handful
SHOWN = 5  # drop-ins named in a status cell before "and N more"
_LINE = re.compile(r"([0-9a-f]{64})  (/.*/([^/\n]+)\.d/[^/]+\.conf)", re.DOTALL)
_ESCAPES = {"\\\\": "\\", "\\n": "\n", "\\r": "\r"}


@dataclass(frozen=True, order=True)
class DropIn:
    unit: str
    path: str
    sha256: str

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class _Judged:
    """A service's drop-ins on a host, as the diff and the status see them."""

    write: tuple[tuple[DropInSpec, DropIn | None], ...]  # declared, and missing (None) or different
    remove: tuple[DropIn, ...]  # in its directory, not declared
    untouchable: tuple[DropIn, ...]  # in its directory under a name fleet never acts on


class DropIns(Resource):
    kind = "drop-ins"
    section = "dropins"
    actions = {
        Action.WRITE_DROPIN: ActionSpec(Phase.WRITE, "~", "change", needs_reload=True),
        Action.REMOVE_DROPIN: ActionSpec(Phase.WRITE, "-", "change", needs_reload=True),
    }
    explained = {Action.WRITE_DROPIN: frozenset({ObservedKind.UNIT_TEXT}),
                 Action.REMOVE_DROPIN: frozenset({ObservedKind.UNIT_TEXT})}
    per_service = True

    # -- collection

    def to_collect(self, desired: Desired, host: str) -> tuple[str, ...]:
        """The drop-in directory of each unit declared on the host (a template's, its instances',
        its wrapper's)."""
        return tuple(dict.fromkeys(drop_in_dir(u) for s in desired.services_on(host)
                                   for u in (s.unit, *s.all_units_on(host))))

    def script(self, what: Any) -> str:
        # -xtype f: regular files, or links to one; never a FIFO sha256sum would wait on forever.
        dirs = " ".join(shlex.quote(d) for d in what)
        # The loop and `head` (a subshell and a process) only where one of the directories exists.
        return ("echo '@@dropins'\n"
                f"dd=; for d in {dirs}; do [ -d \"$d\" ] && dd=1; done\n"
                f"[ -z \"$dd\" ] || for d in {dirs}; do [ -d \"$d\" ] || continue; "
                "find \"$d\" -maxdepth 1 -name '*.conf' -xtype f -exec sha256sum -- {} + 2>/dev/null; "
                f"done | head -n {MAX_DROP_INS + 1}")

    def parser(self, host: str) -> SectionParser:
        return _DropInSection(host)

    # -- status

    def notes(self, state: HostState, unit: str) -> list[str]:
        found = _found(state)
        names = {unit, template_of(unit) or unit}  # an instance also reads its template's drop-ins
        mine = [d for d in found or () if d.unit in names]
        if not mine:
            return []
        named = ", ".join(f"{d.name} sha256:{d.sha256[:8]}" for d in mine[:SHOWN])
        more = f" and {len(mine) - SHOWN} more" if len(mine) > SHOWN else ""
        return [f"has drop-ins: {named}{more}"]

    def problems(self, state: HostState, service: Service) -> list[Problem]:
        judged = judge(service, state)
        if judged is None:
            return []
        out = [Problem("drop-in.missing" if have is None else "drop-in.differs",
                       f"drop-in {spec.name} " + ("missing" if have is None else
                                                  f"differs (sha256:{have.sha256[:8]}, declared "
                                                  f"sha256:{sha256_hex(spec.text)[:8]})"),
                       "fleet apply writes it") for spec, have in judged.write]
        out += [Problem("drop-in.undeclared", f"drop-in {d.name} is not declared",
                        f"declare it in [services.{service.name}.dropins], or let fleet apply remove it")
                for d in judged.remove]
        out += [Problem("drop-in.undeclared", f"drop-in {d.path!r} is not declared",
                        "fleet never touches a file of that name: look at the host") for d in judged.untouchable]
        return out

    # -- diff

    def diff_service(self, ctx: HostDiff, service: Service) -> None:
        s = service
        judged = judge(s, ctx.state)
        if judged is None:
            return
        u = ctx.state.unit((s.units_on(ctx.host) or (s.unit,))[0])
        loaded = unit_file_texts(u) if u is not None else {}
        for spec, have in judged.write:
            path = f"{drop_in_dir(s.unit)}/{spec.name}"
            before_text = loaded.get(path, "") if have is not None else ""
            after_text = mask_unit_text(spec.text)
            udiff = _unified_diff(mask_unit_text(before_text), after_text,
                                  f"{ctx.host}:{path} (now)", f"{ctx.host}:{path} (desired)")
            if have is not None and before_text == "":  # written since the last daemon-reload: text unseen
                udiff = _unified_diff("", after_text, f"{ctx.host}:{path} (sha256:{have.sha256[:8]})",
                                      f"{ctx.host}:{path} (desired)")
            reason = f"declared drop-in of {s.unit} " + ("is missing" if have is None else "differs")
            ctx.add(Change(ctx.host, Action.WRITE_DROPIN, path, reason, s.name,
                           before="absent" if have is None else f"sha256:{have.sha256[:8]}",
                           after=f"sha256:{sha256_hex(spec.text)[:8]}",
                           payload=UnitFilePayload(sha256_hex(spec.text), diff=udiff)))
        for d in judged.remove:
            ctx.add(Change(ctx.host, Action.REMOVE_DROPIN, d.path,
                           f"{s.name} declares its drop-ins, and not this one", s.name,
                           before=f"sha256:{d.sha256[:8]}", after="absent"))
        for d in judged.untouchable:
            ctx.problems.append(f"on {ctx.host}, {d.path!r} is in the drop-in directory of {s.unit}, which "
                                f"{s.name} owns, but fleet never acts on a file of that name: remove or "
                                "rename it by hand")
        if judged.write or judged.remove:
            ctx.rewritten_units.add(s.unit)  # what runs from the unit restarts (fleet/resources/unit_state.py)

    def affects(self, change: Change, desired: Desired) -> Iterable[str]:
        svc = desired.service(change.service or "")
        return svc.units_on(change.host) if svc is not None else ()

    # -- plan file

    def load(self, action: Action, fields: Mapping[str, Any]) -> Payload:
        if action == Action.REMOVE_DROPIN:
            return super().load(action, fields)
        empty(fields, "keys", "steps", "meta", "remove_files")
        return UnitFilePayload(text(fields, "content_hash"), diff=text(fields, "diff"))

    def problem(self, change: Change) -> str | None:
        unit = _unit_of(change.target)
        if unit is None:
            return f"{change.target!r} is not a drop-in fleet may write or remove (a NAME.conf in {UNIT_DIR}/UNIT.d/)"
        if change.action == Action.WRITE_DROPIN:
            return hash_problem(_payload(change).content_hash)
        return None

    # -- apply

    def check_content(self, change: Change, desired: Desired, secrets: Mapping[tuple[str, str], str]) -> str | None:
        svc = desired.service(change.service or "")
        spec = _declared(svc, change.target) if svc is not None else None
        if change.action == Action.WRITE_DROPIN:
            if spec is None or sha256_hex(spec.text) != _payload(change).content_hash:
                return f"{change.host}: the drop-in {change.target} would differ from the plan"
        elif svc is None or svc.dropins is None or spec is not None \
                or not change.target.startswith(drop_in_dir(svc.unit) + "/"):
            return f"{change.host}: the drop-in {change.target} is no longer one fleet removes"
        return None

    def execute(self, change: Change, step: Execution) -> None:
        if _unit_of(change.target) is None:  # the last line of defence: the diff never plans these
            raise FleetError(f"refusing to touch {change.target!r}: not a NAME.conf in {UNIT_DIR}/UNIT.d/")
        if change.action == Action.REMOVE_DROPIN:
            step.run(remote.remove_files((change.target,), run_id=step.run_id))
            step.backed_up((change.target,))  # a rollback puts it back
            return
        spec = _declared(step.service(change.service), change.target)
        if spec is None:
            raise FleetError(f"service {change.service} no longer declares the drop-in {change.target}")
        step.run(f"mkdir -p -m 0755 -- {remote.q(posixpath.dirname(change.target))}\necho @@ok\n")
        step.write(change.target, spec.text, mode="0644", owner="root", group="root")

    # -- journal and plan text

    def sentence(self, step: StepView) -> str:
        if step.action == Action.REMOVE_DROPIN:
            return f"removed drop-in {step.target} (was {step.before})"
        return f"wrote drop-in {step.target} ({'new' if step.before == 'absent' else 'was ' + step.before})"

    def symbol(self, change: Change) -> str:
        if change.action == Action.REMOVE_DROPIN:
            return "-"
        return "+" if change.before == "absent" else "~"

    def details(self, change: Change) -> list[Detail]:
        if change.action != Action.WRITE_DROPIN:
            return [(PLAIN, f"was {change.before}")]
        p = _payload(change)
        return [(DIFF, p.diff)] if p.diff else []


def judge(service: Service, state: HostState) -> _Judged | None:
    """What differs between the drop-ins the service declares and those in its unit's directory on
    the host; None when it declares none (it owns none) or the host's were not collected."""
    if service.dropins is None or service.observe_only:
        return None  # before the host's drop-ins are looked at: most services declare none
    found = _found(state)
    if found is None:
        return None
    directory = drop_in_dir(service.unit)
    here = [d for d in found if posixpath.dirname(d.path) == directory]
    ok = {d.name: d for d in here if d.path == f"{directory}/{d.name}" and DROPIN_NAME.fullmatch(d.name)
          and removable_unit_file(d.path, service.unit)}
    declared = {spec.name for spec in service.dropins}
    write = tuple((spec, ok.get(spec.name)) for spec in service.dropins
                  if spec.name not in ok or ok[spec.name].sha256 != sha256_hex(spec.text))
    remove = tuple(d for name, d in ok.items() if name not in declared)
    untouchable = tuple(d for d in here if d.name not in ok)
    return _Judged(write, remove, untouchable)


def _found(state: HostState) -> tuple[DropIn, ...] | None:
    found = state.facts_of("dropins")
    return tuple(d for d in found if isinstance(d, DropIn)) if isinstance(found, tuple) else None


def _declared(svc: Service, path: str) -> DropInSpec | None:
    if svc.dropins is None:
        return None
    return next((d for d in svc.dropins if f"{drop_in_dir(svc.unit)}/{d.name}" == path), None)


def _unit_of(path: str) -> str | None:
    """The unit whose drop-in `path` is, when it is one fleet may write or remove; else None."""
    parent, name = posixpath.split(path)
    top, directory = posixpath.split(parent)
    unit = directory.removesuffix(".d")
    if top != UNIT_DIR or not directory.endswith(".d") or not UNIT_NAME.fullmatch(unit) \
            or not DROPIN_NAME.fullmatch(name) or not removable_unit_file(path, unit):
        return None
    return unit


def _unified_diff(before: str, after: str, fromfile: str, tofile: str) -> str:
    import difflib  # only a drifted drop-in is diffed: start-up need not import it

    lines = list(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                      fromfile=fromfile, tofile=tofile))
    return "".join(lines)


def _payload(change: Change) -> UnitFilePayload:
    if not isinstance(change.payload, UnitFilePayload):
        raise FleetError(f"{change.id} carries no drop-in to write")  # only a Change built by hand lacks it
    return change.payload


class _DropInSection:
    def __init__(self, host: str) -> None:
        self.host = host
        self.found: list[DropIn] = []
        self.seen = False  # an output without the section (an older script's) did not look

    def section(self, arg: str, lines: Iterator[str]) -> None:
        self.seen = True
        if arg:
            raise ParseError(f"{self.host}: unexpected section 'dropins {arg[:40]}'", host=self.host,
                             section="dropins")
        for line in lines:
            if not line:
                continue
            if len(self.found) >= MAX_DROP_INS:
                raise too_much(self.host, "dropins", f"{MAX_DROP_INS:,} drop-ins")
            m = _LINE.fullmatch(_unescape(line[1:]) if line.startswith("\\") else line)
            if m is None:
                raise ParseError(f"{self.host}: unexpected line in drop-ins: {line[:80]!r}", host=self.host,
                                 section="dropins")
            self.found.append(DropIn(unit=m.group(3), path=m.group(2), sha256=m.group(1)))

    def finish(self, collected: Collected) -> None:
        if self.seen:
            collected.extra["dropins"] = tuple(sorted(self.found))


def _unescape(text: str) -> str:
    """sha256sum's escaping of a file name: \\\\ for a backslash, \\n for a line break."""
    return re.sub(r"\\[\\nr]", lambda m: _ESCAPES[m.group(0)], text)
