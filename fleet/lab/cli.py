"""`fleet lab up|down|status|ssh`: argument parsing and output only; the work is in lifecycle.

The main CLI calls `add_lab_parser(subparsers)` and, for the `lab` command, `run_lab(args)`.
Location options (`dir`, `hosts`, `state_dir`) are read with getattr and defaults, so they may
come from the main CLI's global options or from the lab's own.  Every other dest is the lab's
own (`lab_command`, `remote_command`, ...): the lab's arguments land in the main CLI's namespace,
and a dest it already uses (`command`, its subcommand) would be overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet.errors import LabError
from fleet.lab.settings import DEFAULT_TIMEOUT, LabPaths
from fleet.textutil import printable, seconds_option

EXIT_OK = 0
EXIT_FAILED = 1  # an error, or (status) not every host up
EXIT_INTERRUPTED = 130

EPILOG = """\
exit status: 0 success (status: every host up); 1 error, or (status) some host not up.
Needs root.  Environment: FLEET_LAB_CACHE (image cache, default
/var/cache/fleet-lab), FLEET_LAB_RUNTIME (default /var/lib/fleet-lab), FLEET_LAB_MIRROR
(Debian mirror for the one-time image build; default: this machine's apt sources).
"""


def add_lab_parser(subparsers: Any) -> None:
    """Add the `lab` command (with up/down/status/ssh) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "lab",
        help="a local fleet of real hosts (systemd-nspawn) to rehearse on",
        description="A local fleet of real hosts: one systemd-nspawn container per inventory "
        "file, with systemd, OpenSSH and its own address on a private bridge.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_lab_commands(parser)


def add_location_options(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """--dir/--hosts/--state-dir.  On subcommands they default to SUPPRESS, so they never
    overwrite the same options given globally (argparse copies subparser defaults over)."""
    parser.add_argument("--dir", default=default, help="project directory (default: .)")
    parser.add_argument("--hosts", default=default, metavar="DIR",
                        help="inventory directory, one TOML file per host (default: DIR/hosts)")
    parser.add_argument("--state-dir", dest="state_dir", default=default, metavar="DIR",
                        help="state directory; the lab writes DIR/lab/ (default: DIR/.fleet)")


def add_lab_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)
    up = commands.add_parser("up", help="(re)create the lab: one host per inventory file",
                             description="Tear down any previous lab, then boot one host per "
                             "inventory file; returns when all answer SSH with a finished boot.")
    add_location_options(up)
    up.add_argument("--timeout", type=seconds_option(), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help="how long hosts may take to boot (default: %(default)s)")
    down = commands.add_parser("down", help="remove every trace of the lab (idempotent)")
    add_location_options(down)
    status = commands.add_parser("status", help="per host: container, systemd state, SSH")
    add_location_options(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    ssh = commands.add_parser("ssh", help="OpenSSH to a lab host: ssh HOST [COMMAND...]")
    add_location_options(ssh)
    ssh.add_argument("host", metavar="HOST")
    ssh.add_argument("remote_command", nargs=argparse.REMAINDER, metavar="COMMAND",
                     help="command to run on the host, joined with spaces and run by its shell, "
                     "exiting with its status (default: a login shell, with a terminal when "
                     "stdin is one)")


def locations(args: argparse.Namespace) -> tuple[Path, LabPaths]:
    """(inventory dir, lab paths) from args, with the main CLI's defaults."""
    base = Path(getattr(args, "dir", None) or ".")
    hosts = Path(getattr(args, "hosts", None) or base / "hosts")
    state_dir = Path(getattr(args, "state_dir", None) or base / ".fleet")
    return hosts, LabPaths.from_state_dir(state_dir)


def run_lab(args: argparse.Namespace) -> int:
    """Run the lab command in args; returns the exit status."""
    # Here, not at the top: `fleet --help` builds this parser and never needs the lab's machinery.
    from fleet.lab import lifecycle

    hosts_dir, paths = locations(args)
    command = getattr(args, "lab_command", None)
    try:
        if command == "up":
            return _up(hosts_dir, paths, float(getattr(args, "timeout", DEFAULT_TIMEOUT)))
        if command == "down":
            lifecycle.down(paths, report=print)
            forget_history(paths, _inventory_names(hosts_dir))
            return EXIT_OK
        if command == "status":
            return _status(hosts_dir, paths, bool(getattr(args, "json", False)))
        if command == "ssh":
            argv = lifecycle.ssh_command(paths, args.host, list(getattr(args, "remote_command", [])))
            sys.stdout.flush()
            sys.stderr.flush()
            os.execvp(argv[0], argv)
        raise LabError(f"unknown lab command {command!r}", hint="use up, down, status or ssh")
    except LabError as exc:
        print(printable(f"fleet lab: error: {exc}"), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fleet lab: interrupted; `fleet lab down` cleans up whatever was made",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def forget_history(paths: LabPaths, hosts: Sequence[str]) -> None:
    """The lab's hosts are made anew by `up` and gone after `down`, and their history files with
    them: the checkout's cache of those histories (its journal) must forget them, or every later
    audit would report each host's history as edited away (fleet/history_cache.py)."""
    from fleet.history_cache import HistoryCache
    from fleet.journal import Journal, journal_path

    journal_file = journal_path(paths.state.parent)
    if not journal_file.exists():  # nothing cached; and `lab down` must not create a journal
        return
    with Journal.open(journal_file) as journal:
        if HistoryCache(journal).forget(hosts):
            print("forgot the cached history of the lab's previous hosts")


def _inventory_names(hosts_dir: Path) -> list[str]:
    from fleet.config import load_hosts

    return [h.name for h in load_hosts(hosts_dir)[0]] if hosts_dir.is_dir() else []


def _up(hosts_dir: Path, paths: LabPaths, timeout: float) -> int:
    from fleet.lab import lifecycle

    record = lifecycle.up(hosts_dir, paths, timeout=timeout)
    forget_history(paths, [str(h["name"]) for h in record.hosts])
    rows = [(h["name"], h["address"], h["user"]) for h in record.hosts]
    print(_table(rows, ["HOST", "ADDRESS", "USER"]))
    print(printable(f"\nssh -F {paths.ssh_config} HOST"))
    return EXIT_OK


def _status(hosts_dir: Path, paths: LabPaths, as_json: bool) -> int:
    from fleet.lab import lifecycle

    state = lifecycle.status(paths, hosts_dir)
    if as_json:
        print(json.dumps(state.to_dict(), indent=2))
        return EXIT_OK if state.all_up else EXIT_FAILED
    if not state.recorded:
        print(printable(f"the lab is not up for the state directory {paths.state.parent}"))
    rows = [
        (
            h.name,
            h.address,
            "running" if h.running else "not running",
            h.system_state or "-",
            "yes" if h.reachable else "no",
            f"{h.pss_kib / 1024:.0f} MiB" if h.pss_kib else "-",
        )
        for h in state.hosts
    ]
    if rows:
        print(_table(rows, ["HOST", "ADDRESS", "STATE", "SYSTEMD", "SSH", "PSS"]))
    if state.recorded:
        print(printable(f"\nbooted {state.booted}; ssh -F {state.ssh_config} HOST"))
    return EXIT_OK if state.all_up else EXIT_FAILED


def _table(rows: Sequence[Sequence[object]], headers: list[str]) -> str:
    """What the hosts report (their system state) may hold control characters: shown, not obeyed."""
    from tabulate import tabulate  # here: `fleet --help` builds this module's parser, and draws no table

    return str(tabulate([[printable(str(c), multiline=False) for c in row] for row in rows], headers=headers))
