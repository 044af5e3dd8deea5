"""The per-host apply lock: its holder record (written, and parsed in one place), taking,
relabelling and releasing it for an apply; `fleet lock status` and `fleet lock break`, and
closing in the journal the run whose lock was broken.

The lock is a directory on the host (/var/lib/fleet/lock, fleet.remote); its `holder` file is
a JSON record of who took it — a random token (only the apply that took a lock releases it),
the operator, the machine and pid, when, and once the plan is known, the run and the plan.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as random_source
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet import remote
from fleet.errors import FleetError, TransportError
from fleet.journal import Journal, journal_path, operator
from fleet.model import Host
from fleet.targets import resolve
from fleet.transport.protocol import DEFAULT_MAX_FORKS, Transport, in_parallel
from fleet.workflows import observe as observing
from fleet.workflows.base import Common, Reporter, Scope
from fleet.workflows.check import load_valid

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------- the holder


def lock_token() -> str:
    """A random lock token: only the apply that took a lock can release it."""
    return random_source.token_hex(8)


def holder_info(token: str, operator: str, *, run_id: str = "", plan_id: str = "") -> str:
    """What a lock says about its holder: who, from where, since when, which run and plan."""
    return json.dumps({"token": token, "operator": operator, "from": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_id": run_id,
                       "plan_id": plan_id}, sort_keys=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can judge: assume it runs
    return True


@dataclass(frozen=True)
class LockHolder:
    """A lock's holder file as read from a host: its text, and the record in it when the text is
    one (a lock taken by another version of fleet, or damaged, is shown as it is)."""

    text: str
    record: Mapping[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> LockHolder:
        """The one reader of a holder record (see holder_info)."""
        text = text.strip()
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        return cls(text, record if isinstance(record, dict) else None)

    @classmethod
    def after_first_line(cls, output: str, *, missing: str = "") -> LockHolder:
        """The holder a lock command printed after its status line (`@@held`); `missing` when
        the output has no second line."""
        return cls.parse(output.split("\n", 1)[1] if "\n" in output else missing)

    @property
    def run_id(self) -> str:
        return str(self.record.get("run_id") or "") if self.record is not None else ""

    def describe(self) -> str:
        """The holder as a sentence: who, from where, since when, which run and plan."""
        if not self.text:
            return "another apply that is just starting (it has not recorded its holder yet)"
        h = self.record
        if h is None:
            return self.text[:200]
        pid = f" (pid {h['pid']})" if h.get("pid") else ""
        text = f"{h.get('operator', '?')} from {h.get('from', '?')}{pid} since {h.get('since', '?')}"
        ids = [f"{k} {h[k2]}" for k, k2 in (("run", "run_id"), ("plan", "plan_id")) if h.get(k2)]
        return text + (f" ({', '.join(ids)})" if ids else "")

    def stale_note(self, *, machine: str | None = None, alive: Callable[[int], bool] = _pid_alive) -> str:
        """'; its process … is gone: the lock is stale' when the holder is an apply started on this
        very machine whose process no longer runs (killed, or the machine rebooted).  Empty
        otherwise: a holder on another machine cannot be judged from here."""
        h = self.record
        if h is None or h.get("from") != (machine or socket.gethostname()):
            return ""
        pid = h.get("pid")
        if not isinstance(pid, int) or pid <= 0 or alive(pid):
            return ""
        return f"; its process {pid} on this machine is gone: the lock is stale"

    def public(self) -> dict[str, Any] | None:
        """The record without its token (what `fleet lock status --json` shows)."""
        return None if self.record is None else {k: v for k, v in self.record.items() if k != "token"}


# ------------------------------------------------------------------------ taking and releasing


def lock_hosts(transport: Transport, hosts: Sequence[Host], holder: str, *, forks: int = DEFAULT_MAX_FORKS) -> None:
    """Take every host's lock, or none: a refusal names the holder.  Taken before the hosts are
    observed, so that what is planned is what is applied, and two applies never overlap."""
    def one(host: Host) -> tuple[Host, str | None]:
        try:
            out = transport.run(host, remote.acquire_lock(holder), timeout=30).stdout.decode("utf-8", "replace")
        except TransportError as e:
            how = f"\n    {e.hint}" if e.hint else ""  # e.g. how to check and accept a changed host key
            return host, f"{host.name}: cannot take the lock ({e.kind}): {e.message}{how}"
        if out.startswith("@@locked"):
            return host, None
        held = LockHolder.after_first_line(out, missing="(unknown holder)")
        return host, f"{host.name}: locked by another apply: {held.describe()}{held.stale_note()}"

    taken: list[Host] = []
    refusals: list[str] = []
    for host, refusal in in_parallel(one, hosts, forks):
        if refusal is None:
            taken.append(host)
        else:
            refusals.append(refusal)
    if refusals:
        unlock_hosts(transport, taken, json.loads(holder)["token"])
        raise FleetError("cannot lock the hosts, nothing was changed:\n  " + "\n  ".join(refusals),
                         hint="a host fleet cannot reach cannot be planned either: fix it or exclude it with "
                              "--limit; a host locked by an apply that died: see `fleet lock status`, then "
                              "`fleet lock break --limit HOST` (docs/apply.md)")


def relabel_lock(transport: Transport, hosts: Sequence[Host], holder: str,
                 report: Callable[[str], None] = lambda s: None) -> None:
    """Once the plan is known, the lock also names the run and the plan.  A host that cannot be
    relabelled keeps its lock (which still names its holder) and the apply carries on, but it is
    said at once: a connection lost here is the first sign of what will fail that host's steps,
    and silence made such a failure look as if it came from nowhere (issue 12)."""
    command = remote.update_lock(holder, json.loads(holder)["token"])

    def one(host: Host) -> None:
        try:
            transport.run(host, command, timeout=30)
        except TransportError as e:
            log.debug("relabelling the lock on %s failed: %s: %s", host.name, e.kind, e.message)
            report(f"warning: could not record this run in the lock on {host.name} ({e.kind}): {e.message}")

    in_parallel(one, hosts, DEFAULT_MAX_FORKS)


def unlock_hosts(transport: Transport, hosts: Sequence[Host], token: str,
                 report: Callable[[str], None] = lambda s: None) -> None:
    def one(host: Host) -> None:
        try:
            transport.run(host, remote.release_lock(token), timeout=30)
        except TransportError as e:
            report(f"warning: could not release the lock on {host.name}: {e.message} "
                   f"(break it with `fleet lock break --limit {host.name}`)")

    in_parallel(one, hosts, DEFAULT_MAX_FORKS)


# ------------------------------------------------------------------ fleet lock status | break


@dataclass(frozen=True)
class LockOptions:
    common: Common
    scope: Scope
    breaking: bool = False  # `fleet lock break` (else `status`)
    yes: bool = False  # break without asking


@dataclass(frozen=True)
class LockRow:
    host: str
    lock: str  # free | locked | broken | locked (kept) | unknown (KIND)
    holder: str  # the holder as a sentence (with its stale note), or why the host could not be asked
    record: LockHolder | None = None  # the holder as read, when the host is (or was) locked
    ok: bool = True  # False: the host could not be asked, or its lock was kept when told to break it


@dataclass(frozen=True)
class LockReport:
    rows: tuple[LockRow, ...]
    interrupted: tuple[str, ...] = ()  # runs marked interrupted in the journal: their lock was broken

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def lock(options: LockOptions, reporter: Reporter) -> LockReport:
    common = options.common
    desired = load_valid(common, reporter)
    if options.breaking and not options.scope.limit:
        raise FleetError("`fleet lock break` needs --limit HOSTS", hint="name the hosts whose stale lock to break")
    targets = resolve(desired, state_dir=str(common.state_dir), lab=common.lab, limit=options.scope.limit)
    rows: list[LockRow] = []
    broken: dict[str, list[str]] = {}  # run id in the broken lock's holder -> hosts
    with observing.open_transport(common, targets, options.scope) as transport:
        for host in targets.hosts:
            row = _one(transport, host, options, reporter)
            rows.append(row)
            if row.lock == "broken" and row.record is not None:
                broken.setdefault(row.record.run_id, []).append(host.name)
    return LockReport(tuple(rows), close_broken_runs(common, broken))


def _one(transport: Transport, host: Host, options: LockOptions, reporter: Reporter) -> LockRow:
    try:
        out = transport.run(host, remote.read_lock(), timeout=30).stdout.decode("utf-8", "replace")
    except TransportError as e:
        return LockRow(host.name, f"unknown ({e.kind})", e.message, ok=False)
    if not out.startswith("@@held"):
        return LockRow(host.name, "free", "")
    held = LockHolder.after_first_line(out)
    holder = held.describe() + held.stale_note()
    if not options.breaking:
        return LockRow(host.name, "locked", holder, held)
    if not options.yes and not reporter.confirm(f"{host.name} is locked by {holder}. Break this lock?"):
        return LockRow(host.name, "locked (kept)", holder, held, ok=False)
    transport.run(host, remote.break_lock(), timeout=30)
    return LockRow(host.name, "broken", holder, held)


def close_broken_runs(common: Common, broken: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """A run whose lock was broken will never finish: say so in this state directory's journal
    (when that run is in it), so that `fleet log` stops showing it as possibly still running.
    Its unfinished steps stay as they are: "started, never finished" is what is known of them.
    Returns the runs so marked."""
    path = journal_path(common.state_dir)
    runs = [r for r in broken if r]
    if not runs or not path.exists():
        return ()
    closed: list[str] = []
    with Journal.open(path) as journal:
        for run_id in runs:
            run = journal.run(run_id)
            if run is None or run.ended is not None:
                continue
            hosts = ", ".join(broken[run_id])
            journal.finish_run(run_id, "interrupted", f"never finished: its lock on {hosts} was broken by {operator()}")
            closed.append(run_id)
    return tuple(closed)
