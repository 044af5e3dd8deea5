"""Observing the fleet, the step status, plan, apply, audit and diff share: a transport opened
to the target hosts, every host collected (a state or an error), and the observation kept in
the journal as a snapshot (`fleet history`)."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.collect.collector import collect
from fleet.errors import FleetError
from fleet.journal import Journal, journal_path, operator
from fleet.model import Desired, HostResult, HostState
from fleet.snapshot import host_summary, pack
from fleet.targets import Targets
from fleet.transport.protocol import Transport
from fleet.workflows.base import Common, Reporter, Scope

# 4 MiB: a real collection is tens of KB (unit texts are capped at 5,000 lines); a host that
# prints more is refused ("output-too-large") before its output can cost much memory.
MAX_OUTPUT = 4 << 20


@dataclass(frozen=True)
class Observation:
    results: dict[str, HostResult]  # host name -> HostState | HostError, in the targets' order
    snapshot_id: str  # the journal's snapshot of it; "" when it could not be kept


def open_transport(common: Common, targets: Targets, scope: Scope) -> Transport:
    # Imported here, not at the top: paramiko costs ~90 ms of CPU, and `check`, `show`, `log`,
    # `history` and `--help` never connect to anything.
    from fleet.transport.ssh import SSHTransport

    return SSHTransport(ssh_config=targets.ssh_config, known_hosts=targets.known_hosts,
                        accept_new=common.accept_new_host_keys, connect_timeout=common.connect_timeout,
                        command_timeout=scope.timeout, max_output=MAX_OUTPUT)


def observe(common: Common, scope: Scope, command: str, desired: Desired, targets: Targets, transport: Transport,
            reporter: Reporter) -> Observation:
    """Collect every target host, with progress for a person watching, and keep the observation
    as a snapshot in the journal, named by the `command` that took it."""
    def progress(name: str, result: HostResult) -> None:
        what = "ok" if isinstance(result, HostState) else f"FAILED ({result.kind})"
        reporter.progress(f"  {name}: {what}")

    reporter.progress(f"collecting {len(targets.hosts)} host(s){' (lab)' if targets.lab else ''}…")
    results = collect(desired, transport, targets.hosts, forks=scope.forks, timeout=scope.timeout, progress=progress)
    return Observation(results, keep_snapshot(common, command, desired, results, reporter))


def keep_snapshot(common: Common, command: str, desired: Desired, results: dict[str, HostResult],
                  reporter: Reporter) -> str:
    """Store the observation; a journal that cannot be written is a warning, never a failure of
    a read command."""
    try:
        with Journal.open(journal_path(common.state_dir)) as journal:
            return journal.save_snapshot(command=command, fleet=desired.name, lab=common.lab,
                                         hosts=host_summary(results), data=pack(results), operator=operator(),
                                         keep_days=desired.snapshot_retention_days)
    except FleetError as e:
        reporter.note(f"warning: this observation was not kept in the journal: {e.message}")
        return ""
