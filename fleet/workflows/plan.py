"""`fleet plan` and `fleet show`: preparing a plan (the desired state scoped to its hosts and
its secrets resolved), computing it from a fresh observation, saving it; reading a saved one.
`fleet apply` prepares and computes the same way, under its locks."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fleet import config
from fleet.errors import FleetError
from fleet.model import Desired
from fleet.plan import Plan, build_plan, plan_from_json
from fleet.secrets import ensure_lab_secrets, load_secrets
from fleet.targets import Targets, resolve
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Reporter, Scope
from fleet.workflows.check import load_valid

if TYPE_CHECKING:
    from fleet.transport.protocol import Transport


@dataclass(frozen=True)
class PlanOptions:
    common: Common
    scope: Scope
    out: Path | None = None  # save the plan there (-o)
    no_prune: bool = False
    secrets: Path | None = None  # None: the state directory's secrets file
    observed: str | None = None  # plan from this kept observation (a file or snapshot id), contacting no host


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    saved_to: Path | None  # where it was saved (-o), if it was


@dataclass(frozen=True)
class Prepared:
    """What a planning command works with: the desired state scoped to its hosts, where those
    hosts are, and the resolved secrets (in memory only)."""

    desired: Desired
    targets: Targets
    secrets: dict[tuple[str, str], str]
    inventory: Desired | None = None  # unscoped (--limit): a move's hosts are named by the whole inventory


def secrets_path(common: Common, secrets: Path | None) -> Path:
    if secrets is not None:
        return secrets
    return common.state_dir / ("lab" if common.lab else "") / "secrets.toml"


def prepare(common: Common, scope: Scope, secrets: Path | None, reporter: Reporter) -> Prepared:
    desired = load_valid(common, reporter)
    targets = resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=scope.limit)
    everyone = targets if scope.limit is None else resolve(desired, state_dir=str(common.state_dir), lab=common.lab,
                                                           limit=None)
    inventory = replace(desired, hosts=everyone.hosts)
    path = secrets_path(common, secrets)
    if common.lab and secrets is None and ensure_lab_secrets(desired, path):
        reporter.note(f"lab: generated random secrets in {path}")
    secret_values, findings = load_secrets(desired, path)
    errors = [f for f in findings if f.is_error]
    for f in findings:
        if not f.is_error:
            reporter.findings([f])
    if errors:
        reporter.findings(errors)
        raise FleetError(f"{len(errors)} secret(s) cannot be resolved; nothing was planned")
    return Prepared(replace(desired, hosts=targets.hosts), targets, secret_values, inventory)


def compute(common: Common, scope: Scope, command: str, prep: Prepared, transport: Transport, reporter: Reporter,
            *, no_prune: bool) -> Plan:
    """The plan from a fresh observation of the prepared hosts (kept as a snapshot of `command`)."""
    seen = observing.observe(common, scope, command, prep.desired, prep.targets, transport, reporter)
    return build_plan(prep.desired, seen.results, prep.secrets, prune=not no_prune, lab=common.lab,
                      inventory=prep.inventory)


def recalled(common: Common, prep: Prepared, observed: str, *, no_prune: bool) -> Plan:
    """The plan from a kept observation (--observed), marked with it: what the plan was, or would
    have been, then.  `fleet apply` refuses it: it is stale by construction."""
    seen = observing.recall(common, prep.desired, prep.targets, observed)
    computed = build_plan(prep.desired, seen.results, prep.secrets, prune=not no_prune, lab=common.lab,
                          inventory=prep.inventory)
    return replace(computed, observed=seen.kept)


def plan(options: PlanOptions, reporter: Reporter) -> PlanResult:
    if options.out is not None:  # before any host is contacted: a plan computed for nothing costs every host a trip
        check_writable(options.out, "the plan")
    prep = prepare(options.common, options.scope, options.secrets, reporter)
    if options.observed is not None:
        computed = recalled(options.common, prep, options.observed, no_prune=options.no_prune)
    else:
        with observing.open_transport(options.common, prep.targets, options.scope) as transport:
            computed = compute(options.common, options.scope, "plan", prep, transport, reporter,
                               no_prune=options.no_prune)
    if options.out is not None:
        write_private_file(options.out, computed.to_json(), "the plan")
    return PlanResult(computed, options.out)


def show(plan_file: str) -> Plan:
    """`fleet show FILE`: a saved plan, read back and checked like `fleet apply FILE` reads it."""
    return read_plan(plan_file)


def read_plan(plan_file: str) -> Plan:
    """A plan file (named as the user gave it), refused in one line when it is not one: a
    directory, a FIFO (never waited on), a device, bytes that are not UTF-8, or text that is not
    a well-formed plan."""
    path = Path(plan_file)
    hint = "pass a plan file written by `fleet plan -o FILE`"
    try:
        raw = config.read_regular_file(path)
    except config.NotAFileError as e:
        raise FleetError(f"cannot read {path}: it is {e.kind}, not a file", hint=hint) from None
    except OSError as e:
        raise FleetError(f"cannot read {path}: {e.strerror or e}", hint=hint) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FleetError(f"{path} is not a plan: it is not UTF-8 text (byte {e.start})", hint=hint) from None
    return plan_from_json(text, plan_file)


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, a path `write_private_file` could not write: its directory is
    missing, not a directory or not writable, or the path is a directory."""
    parent = path.parent
    hint = "name a file in an existing, writable directory, e.g. -o plan.json"
    if path.is_dir():
        raise FleetError(f"cannot write {what} to {path}: it is a directory", hint=hint)
    try:
        st = os.stat(parent)
    except OSError as e:
        raise FleetError(f"cannot write {what} to {path}: {parent}: {e.strerror or e}", hint=hint) from None
    if not stat.S_ISDIR(st.st_mode):
        raise FleetError(f"cannot write {what} to {path}: {parent} is {config.file_kind(st.st_mode)}, "
                         "not a directory", hint=hint)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FleetError(f"cannot write {what} to {path}: {parent} is not writable", hint=hint)


def write_private_file(path: Path, text: str, what: str = "the file") -> None:
    """Atomically, mode 0600: plans hold no secrets, but do describe the fleet.  A failure (a
    full disk, a directory that went away) is a FleetError, and leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FleetError(f"cannot write {what} to {path}: {e.strerror or e}",
                         hint="check the free space and permissions, then run the command again") from None
