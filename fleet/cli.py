"""The `fleet` command: argparse and exit codes only.

Per command: its parser (`_add_COMMAND`), its options object built once from the parsed
arguments, its workflow (fleet/workflows/) called, its result handed to fleet/output/ and mapped
to an exit code (`_run_COMMAND`).  Each command imports what it needs when it runs, so that
`fleet --help` and `fleet check` load neither paramiko, networkx nor tabulate.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from fleet import __version__
from fleet.errors import FleetError
from fleet.textutil import accept_queued_option, positive_int_option, printable, seconds_option

if TYPE_CHECKING:
    from fleet.model import Finding
    from fleet.plan import Plan
    from fleet.workflows.base import Common, Scope

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

GLOBAL_HELP = """\
exit codes (every command):
  0  success: no errors (check), every host answered (status)
  1  error: invalid input, a host could not be reached, a failed step
  2  (plan) changes are pending; see `fleet plan --help`
  64 bad usage (unknown option or command)

files:
  DIR/desired_state.toml   services, env files, policy (docs/desired-state.md)
  DIR/hosts/*.toml         one inventory file per host
  DIR/.fleet/              fleet's state: lab keys and ssh_config, journal
"""


def say(text: str = "", *, err: bool = False) -> None:
    """Print fleet's own words with data in them (names, paths, what a host said), escaped like
    everything fleet/output/text.py makes: a control character from a file or a host is shown, not obeyed."""
    print(printable(text), file=sys.stderr if err else sys.stdout, flush=err)


def _write(text: str) -> None:
    sys.stdout.write(text)


def _write_plan(plan: Plan) -> None:
    """The plan as text, written in pieces (`joined`): the same bytes as `_write(plan_text(...))`."""
    from fleet.output.text import joined, plan_lines

    for piece in joined(plan_lines(plan, color=_color())):
        sys.stdout.write(piece)


def _color() -> bool:
    from fleet.output.text import use_color

    return use_color(sys.stdout.isatty())


class TerminalReporter:
    """The workflows' `Reporter` on a terminal: progress and warnings on stderr (progress only
    when a person watches it), questions on the terminal, the plan to review on stdout."""

    def note(self, line: str) -> None:
        say(line, err=True)

    def progress(self, line: str) -> None:
        if sys.stderr.isatty():
            say(line, err=True)

    def findings(self, findings: Sequence[Finding]) -> None:
        from fleet.output.text import findings_text, use_color

        print(findings_text(findings, color=use_color(sys.stderr.isatty())), file=sys.stderr)

    def review(self, plan: Plan) -> None:
        _write_plan(plan)

    def confirm(self, question: str) -> bool | None:
        if not sys.stdin.isatty():
            return None
        try:
            return input(f"{question} Only 'yes' will be accepted: ").strip() == "yes"
        except EOFError:
            return False


# ===================================================================================== parsing


def _global_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, suppress: bool) -> None:
    def d(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--dir", default=d("."), metavar="DIR",
                   help="directory holding desired_state.toml and hosts/ (default: current directory)")
    p.add_argument("--desired", default=d(None), metavar="FILE",
                   help="desired-state file (default: DIR/desired_state.toml)")
    p.add_argument("--hosts", default=d(None), metavar="DIR", help="inventory directory (default: DIR/hosts)")
    p.add_argument("--state-dir", default=d(None), metavar="DIR", help="fleet's state directory (default: DIR/.fleet)")
    p.add_argument("--lab", action="store_true", default=d(False),
                   help="talk to the local lab hosts (see `fleet lab`) instead of the real addresses")
    p.add_argument("--accept-new-host-keys", action="store_true", default=d(False),
                   help="record UNKNOWN SSH host keys in known_hosts on first use (like OpenSSH "
                        "accept-new); changed keys are always refused")
    p.add_argument("--debug-log", default=d(os.environ.get("FLEET_DEBUG_LOG") or None), metavar="FILE",
                   help="append a debug log (fleet's steps, SSH connections and channels, paramiko) to FILE; "
                        "default: $FLEET_DEBUG_LOG.  It names hosts and commands, never secret values")
    p.add_argument("--connect-timeout", type=seconds_option(), default=d(None), metavar="S",
                   help="seconds to connect and authenticate to a host (default: the ssh config's "
                        "ConnectTimeout, else 10)")


def _host_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", metavar="HOSTS", help="only these hosts: names or globs, comma-separated")
    p.add_argument("--forks", type=positive_int_option, metavar="N",
                   help="hosts contacted in parallel (default: all, up to 32)")
    p.add_argument("--timeout", type=seconds_option(), default=60.0, metavar="S",
                   help="seconds the remote collection may run per host (default 60)")


def _command(sub: Subparsers, common: argparse.ArgumentParser, name: str,
             summary: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=summary, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _observed_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--observed", metavar="FILE|SNAPSHOT",
                   help=f"{what} a kept observation instead of contacting the hosts: a file written by "
                        "`fleet status --json`, or a snapshot id from `fleet history`")


def _add_adopt(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "adopt", "write what the hosts run as a new fleet directory (desired_state.toml, hosts/, units/)",
        "Observe the inventory's hosts (--dir's hosts/, or --hosts) and write into TARGET a desired state "
        "declaring every running, enabled unit the patterns match, with the hosts' own unit files in "
        "units/ byte for byte, so that `fleet --dir TARGET plan` is empty.  Prints what it could not "
        "express.  Changes nothing on the hosts.",
        "exit codes:\n  0  written, every host observed\n  1  a host could not be observed (the rest is "
        "written), TARGET is not empty without --force, or invalid input\n")
    _host_options(p)
    p.add_argument("target", metavar="TARGET", help="the directory to write (new or empty)")
    p.add_argument("--pattern", action="append", metavar="GLOB",
                   help="units to adopt, a systemd glob; repeatable (default: mastodon-*, postgresql.service, "
                        "redis-server.service)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty TARGET, replacing desired_state.toml, hosts/ and units/ files")
    p.add_argument("--name", metavar="NAME", help="the fleet's name (default: TARGET's directory name)")


def _add_check(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "check", "validate the desired state, the inventory and the domain policies (offline)",
        "Validate desired_state.toml and hosts/ and apply the domain policies (Sidekiq queues, "
        "placement, env keys).  Prints every finding at once, each with file, key, line and a hint.",
        "exit codes:\n  0  no errors (warnings allowed)\n  1  at least one error\n")
    p.add_argument("--json", action="store_true", help="machine-readable findings (see docs/desired-state.md)")


def _add_status(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "status", "what runs where: every service on every host, live",
        "Collect the actual systemd state of every host (one SSH round trip each, in parallel) "
        "and show one row per service and per undeclared unit, one column per host.",
        "exit codes:\n  0  every host answered\n  1  a host could not be reached or observed "
        "(everything that answered is still shown), or invalid input\n"
        "JSON schema: docs/status.md\n")
    _host_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable report (docs/status.md)")
    _observed_option(p, "show")


def _add_plan(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "plan", "what would change, host by host, ordered by dependencies (changes nothing)",
        "Collect the fleet, diff it against the desired state and print the plan: grouped by host, "
        "with unit diffs, env key diffs (secrets masked) and the order of waves.",
        "exit codes (like terraform plan -detailed-exitcode):\n  0  no changes\n  1  error (invalid "
        "desired state, policy errors, missing secrets)\n  2  changes are pending (or the plan is "
        "incomplete because a host could not be observed)\n")
    _host_options(p)
    p.add_argument("-o", "--out", metavar="FILE", help="save the plan as JSON for `fleet show`/`fleet apply`")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (docs/plan.md)")
    p.add_argument("--no-prune", action="store_true",
                   help="do not prune undeclared units this run (they are still reported)")
    p.add_argument("--secrets", metavar="FILE",
                   help="secrets file for \"file\" sources "
                        "(default: STATE/secrets.toml; with --lab: STATE/lab/secrets.toml)")
    _observed_option(p, "plan from (offline; such a plan is marked with it and cannot be applied)")


def _add_show(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "show", "print a saved plan file", "Print a plan saved with `fleet plan -o FILE`.",
                 "exit codes: 0 no changes, 1 unreadable plan, 2 changes\n")
    p.add_argument("plan_file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_apply(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "apply", "make the fleet match the desired state: ordered, health-gated, journaled",
        "Without PLAN: compute a plan, show it and ask for confirmation.  With PLAN (from "
        "`fleet plan -o PLAN`): apply exactly that plan, after checking that its hosts have not changed "
        "since (a stale plan is refused).  Changes run wave by wave, hosts in parallel; every start or "
        "restart must pass its health gate or the rollout halts and that service is rolled back.  Every "
        "step is written to the journal (`fleet log`).",
        "exit codes:\n  0  applied (or nothing to do)\n  1  a step failed (rolled back where it can be), "
        "the plan is stale/incomplete, a host is locked, or invalid input\n")
    p.add_argument("plan_file", nargs="?", metavar="PLAN", help="a saved plan to apply exactly")
    _host_options(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--no-prune", action="store_true", help="do not prune undeclared units this run")
    p.add_argument("--secrets", metavar="FILE", help="secrets file (as for `fleet plan`)")
    p.add_argument("--settle", type=seconds_option(zero_ok=True), default=3.0, metavar="S",
                   help="seconds a started unit must stay up without restarting (default 3)")
    p.add_argument("--start-timeout", type=seconds_option(), default=30.0, metavar="S",
                   help="seconds a unit may take to become active (default 30)")
    p.add_argument("--command-grace", type=seconds_option(), default=30.0, metavar="S",  # fleet.apply.COMMAND_GRACE
                   help="seconds a start's or restart's remote command may run past its own budget (start "
                        "timeout, settle, health-check timeout) before fleet ends it and drops the connection "
                        "(default 30)")
    p.add_argument("--accept-queued", type=accept_queued_option, default=None, metavar="N",
                   help="a declared move may go on with up to N jobs still queued in quiet Sidekiq (they run after "
                        "Sidekiq restarts, against the new server); without it, any queued job halts the move")
    p.add_argument("--notify", action="append", default=[], metavar="SPEC",
                   help="also post the apply's start and result here (repeatable; besides the desired state's "
                        "[watch] notify): a webhook URL, discord:/slack:/webhook:URL, or env:VAR (docs/watch.md)")


def _add_lock(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "lock", "show or break the per-host apply locks",
        "Every apply takes a lock on each host it changes (/var/lib/fleet/lock on the host).  "
        "`status` shows who holds them; `break` removes a stale one left by an apply that died.")
    p.add_argument("lock_action", choices=("status", "break"))
    _host_options(p)
    p.add_argument("--yes", action="store_true", help="break without asking")
    p.add_argument("--json", action="store_true", help="with status: machine-readable locks (docs/apply.md)")


def _add_log(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "log", "who changed what, from what to what, when (the journal and the hosts' history)",
        "Print every apply's steps as sentences, oldest first, times in UTC, each run headed by who ran it, "
        "its id and the desired state's git commit.  The hosts' history (what any checkout applied) is read "
        "first, one round trip per host; a host not reached is a warning.",
        "--since accepts 2026-11-28, 2026-11-28T14:03, '2026-11-28 14:03:07' (UTC) or 30m, 2h, 3d, 1w.\n"
        "exit codes: 0 ok, 1 unreadable journal\n")
    p.add_argument("--host", metavar="HOST", help="only steps on this host (and read only its history)")
    p.add_argument("--since", metavar="TIME", help="only steps since TIME")
    p.add_argument("--cached", action="store_true",
                   help="do not read the hosts' history first: show what this checkout's journal holds")
    p.add_argument("--json", action="store_true", help="one object per step (docs/journal.md)")


def _add_audit(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "audit", "post-incident state audit: what runs where, drift, findings, what changed",
        "Collect the fleet live and report what runs where, drift (managed/changed/missing/unmanaged, "
        "with coverage), the domain policies judged on what actually runs, and — with --since — every "
        "change since then, attributed to a journaled fleet apply or marked as changed outside fleet.",
        "exit codes:\n  0  no error-level findings\n  1  could not audit (invalid input)\n"
        "  2  error-level findings (a host unreachable counts as one)\n"
        "--since: a snapshot id from `fleet history`, or a time (2026-11-28, 2026-11-28T14:03, 2h, 3d)\n")
    _host_options(p)
    p.add_argument("--since", metavar="TIME|SNAPSHOT", help="also report what changed since then")
    p.add_argument("--format", choices=("text", "md", "json"), default="text",
                   help="text (default), md (ready for a postmortem) or json")
    p.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    _observed_option(p, "audit")


def _add_history(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "history", "the fleet's runs (from the hosts' history) and the kept observations",
        "List every run, newest first, as the hosts' history records it (read first, one round trip per host, "
        "as `fleet log` does, so a checkout that never applied anything sees them): when, who, the desired "
        "state's git commit, the hosts it touched and how its steps went.  Then the kept observations "
        "(snapshots), oldest first.  A broken history chain is a warning, an acknowledged one a note.\n\n"
        "`fleet history ack HOST --reason TEXT`: after looking into a host's broken history chain, record on "
        "the host (as a new record of its chain) who acknowledged it, when and why; the audit then reports "
        "it as a note, and any later break as an error again.  Refused when nothing is broken.",
        "exit codes: 0 ok, 1 unreadable journal, or (ack) nothing to acknowledge or the host not reached\n")
    p.add_argument("history_action", nargs="?", choices=("ack",), metavar="ack",
                   help="acknowledge HOST's broken history chain")
    p.add_argument("ack_host", nargs="?", metavar="HOST")
    p.add_argument("--reason", metavar="TEXT", help="with ack: what you found, and why the history can be trusted")
    p.add_argument("--since", metavar="TIME", help="only runs started and snapshots taken since TIME")
    p.add_argument("--cached", action="store_true",
                   help="do not read the hosts' history first: show what this checkout's journal holds")
    p.add_argument("--snapshots", action="store_true", help="only the kept observations (no network)")
    p.add_argument("--json", action="store_true", help="runs and snapshots (docs/journal.md, docs/audit.md)")


def _add_diff(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "diff", "what changed between two snapshots, or a snapshot and now",
        "Compare two observations: A and B are snapshot ids from `fleet history`; B defaults to "
        "`now` (collect live).  Each change is attributed to a fleet apply or marked as changed "
        "outside fleet.",
        "exit codes: 0 no changes, 1 error, 2 changes\n")
    p.add_argument("snap_a", metavar="A")
    p.add_argument("snap_b", metavar="B", nargs="?", default="now")
    _host_options(p)
    p.add_argument("--json", action="store_true")


def _add_watch(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _command(
        sub, common, "watch", "observe the fleet every few minutes and tell the team what changed (changes nothing)",
        "Observe every host each --every seconds, keep the observation as a snapshot, and compare it with "
        "the desired state and with the previous observation.  Events — a new or resolved finding or drift, "
        "a change made outside fleet, an apply started or finished, a host unreachable or back — are printed "
        "and posted to the --notify targets (and the desired state's [watch] notify), each once.  Optionally "
        "writes Prometheus metrics and a status page each cycle.  SIGTERM ends it between cycles.",
        "exit codes:\n  0  --once: the cycle ran (what it found is in its events; a message not delivered "
        "waits for the next cycle); without --once: stopped by SIGTERM\n  1  could not watch (invalid input, "
        "an unusable --notify, an unreadable state directory)\n"
        "SPEC: a webhook URL, discord:URL, slack:URL, webhook:URL, or env:VAR (the URL in $VAR); see docs/watch.md\n")
    _host_options(p)
    p.add_argument("--every", type=seconds_option(), default=300.0, metavar="S",
                   help="seconds from one cycle's start to the next (default 300)")
    p.add_argument("--once", action="store_true", help="run one cycle and exit (for a timer, cron or a test)")
    p.add_argument("--notify", action="append", default=[], metavar="SPEC",
                   help="post events here (repeatable), besides the desired state's [watch] notify")
    p.add_argument("--remind-every", metavar="DURATION",
                   help='tell an open item again after this long ("30m", "4h", "1d" or seconds, at least 60); '
                        "default: the desired state's [watch] remind_every, else never")
    p.add_argument("--metrics-file", metavar="PATH.prom",
                   help="write Prometheus metrics here each cycle (node_exporter's textfile collector)")
    p.add_argument("--html", metavar="DIR", help="write the status page DIR/index.html each cycle")
    p.add_argument("--print-systemd-unit", action="store_true",
                   help="print a systemd unit that runs this watch on an operations host, and exit")
    p.add_argument("--timer", action="store_true",
                   help="with --print-systemd-unit: a oneshot service running --once and a timer starting it")


def _add_lab(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    try:
        from fleet.lab.cli import add_lab_parser
    except ImportError:  # pragma: no cover - lab package absent in a stripped install
        return
    add_lab_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet",
        description="What runs where on a small fleet of servers, and making it so.",
        epilog=GLOBAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    _global_options(parser, suppress=False)
    # The same options after the command (`fleet check --dir X`); SUPPRESS keeps a value given
    # before the command unless it is given again after it.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common.add_argument_group("global options (also accepted before the command)"), suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_check, _add_status, _add_plan, _add_show, _add_apply, _add_lock, _add_log, _add_audit,
                _add_history, _add_diff, _add_adopt, _add_watch, _add_lab):
        add(sub, common)
    return parser


# ================================================================================= options


def _common(args: argparse.Namespace) -> Common:
    from fleet.workflows.base import Common

    return Common.at(args.dir, desired=args.desired, hosts=args.hosts, state_dir=args.state_dir, lab=args.lab,
                     accept_new_host_keys=args.accept_new_host_keys, connect_timeout=args.connect_timeout)


def _scope(args: argparse.Namespace) -> Scope:
    from fleet.workflows.base import Scope

    return Scope(limit=args.limit, forks=args.forks, timeout=args.timeout)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


# ================================================================================ commands


def _run_check(args: argparse.Namespace) -> int:
    from fleet.workflows.check import check

    result = check(_common(args))
    if args.json:
        from fleet.output import json

        _write(json.dumps(json.check_json(result.findings)))
    else:
        from fleet.output.text import check_text

        _write(check_text(result.desired, result.findings, color=_color()))
    return EXIT_ERROR if result.errors else EXIT_OK


def _run_status(args: argparse.Namespace) -> int:
    from fleet.workflows.status import StatusOptions, status

    with _offline(args.observed is not None):
        result = status(StatusOptions(_common(args), _scope(args), observed=args.observed), TerminalReporter())
        if args.json:
            from fleet.output import json

            _write(json.dumps(json.status_json(result.report)))
        else:
            from fleet.output.text import status_text

            _write(status_text(result.report))
    return EXIT_OK if result.complete else EXIT_ERROR


@contextlib.contextmanager
def _offline(active: bool) -> Iterator[None]:
    """An offline command (`--observed`, `show`) reads, builds and prints a few million objects
    and ends: the cycle collector, run again and again over a heap that only grows, cost it a
    fifth of its CPU at 1,000 hosts, for no cycle worth collecting before the process exits.
    Paused for the command, back on after it (refcounting frees what it can all along).  What
    the command made is handed to the collector's oldest generation as it is (`freeze` then
    `unfreeze`, each a splice of lists): switched back on with all of it young, the collector
    traversed the whole heap at the next allocation (~45 ms at 1,000 bare hosts) to find nothing."""
    if not active or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()  # every tracked object to the permanent generation, the young count to 0
        gc.unfreeze()  # and from there into the oldest: collected with it, when that one is
        gc.enable()


def _plan_exit(plan: Plan) -> int:
    return EXIT_CHANGES if plan.changes or not plan.complete else EXIT_OK


def _print_plan(plan: Plan, as_json: bool) -> None:
    if as_json:
        from fleet.output import json

        _write(json.dumps(json.plan_json(plan)))
    else:
        _write_plan(plan)


def _run_plan(args: argparse.Namespace) -> int:
    from fleet.workflows.plan import PlanOptions, plan

    options = PlanOptions(_common(args), _scope(args), out=_path(args.out), no_prune=args.no_prune,
                          secrets=_path(args.secrets), observed=args.observed)
    with _offline(args.observed is not None):
        result = plan(options, TerminalReporter())
        _print_plan(result.plan, args.json)
    if result.saved_to is not None and not args.json:
        say(f"Saved to {args.out} (plan {result.plan.plan_id}); apply exactly this with `fleet apply {args.out}`.")
    return _plan_exit(result.plan)


def _run_show(args: argparse.Namespace) -> int:
    from fleet.workflows.plan import show

    with _offline(True):
        plan = show(args.plan_file)
        _print_plan(plan, args.json)
    return _plan_exit(plan)


def _run_apply(args: argparse.Namespace) -> int:
    from fleet.workflows.apply import ApplyOptions, apply

    options = ApplyOptions(_common(args), _scope(args), plan_file=args.plan_file or None, yes=args.yes,
                           no_prune=args.no_prune, secrets=_path(args.secrets), settle=args.settle,
                           start_timeout=args.start_timeout, command_grace=args.command_grace,
                           notify=tuple(args.notify),
                           accept_queued=args.accept_queued)
    outcome = apply(options, TerminalReporter())
    if outcome.cancelled:
        print("Apply cancelled; nothing was changed.")
        return EXIT_ERROR
    if outcome.result is None:
        print("Nothing to apply.")
        return EXIT_OK
    from fleet.output.text import apply_text

    _write(apply_text(outcome.result))
    say(f"Journal: run {outcome.run_id} — `fleet log` shows every step.")
    return EXIT_OK if outcome.ok else EXIT_ERROR


def _run_lock(args: argparse.Namespace) -> int:
    from fleet.workflows.lock import LockOptions, lock

    breaking = args.lock_action == "break"
    if breaking and args.json:
        raise FleetError("`fleet lock break` prints no JSON", hint="see the locks with `fleet lock status --json`")
    report = lock(LockOptions(_common(args), _scope(args), breaking=breaking, yes=args.yes), TerminalReporter())
    if args.json:
        from fleet.output import json

        _write(json.dumps(json.lock_json(report)))
    else:
        from fleet.output.text import lock_text

        _write(lock_text(report))
    for run_id in report.interrupted:
        say(f"Journal: run {run_id} marked interrupted (its lock was broken); "
            "`fleet log` shows the steps it started and never finished.")
    return EXIT_OK if report.ok else EXIT_ERROR


def _run_log(args: argparse.Namespace) -> int:
    from fleet.workflows.log import LogOptions, log

    result = log(LogOptions(_common(args), host=args.host, since=args.since, cached=args.cached))
    for line in result.warnings:
        say(line, err=True)
    if args.json:  # without a journal too: an empty document, not a sentence
        from fleet.output import json

        _write(json.dumps(json.log_json(result.steps, result.runs)))
    elif not result.exists:
        say(f"No journal yet at {result.journal}: nothing has been applied from this state directory, and no "
            "host's history was read.")
    else:
        from fleet.output.text import log_text

        _write(log_text(result.steps, result.runs))
    return EXIT_OK


def _run_audit(args: argparse.Namespace) -> int:
    from fleet.workflows.audit import AuditOptions, audit

    report = audit(AuditOptions(_common(args), _scope(args), since=args.since, observed=args.observed),
                   TerminalReporter())
    if args.format == "json":
        from fleet.output import json

        _write(json.dumps(json.audit_json(report)))
    elif args.format == "md":
        from fleet.output.markdown import audit_markdown

        _write(audit_markdown(report))
    else:
        from fleet.output.text import audit_text

        _write(audit_text(report))
    return EXIT_CHANGES if report.errors else EXIT_OK


def _run_history(args: argparse.Namespace) -> int:
    from fleet.workflows.audit import HistoryOptions, history

    if args.history_action == "ack":
        return _run_history_ack(args)
    if args.ack_host is not None or args.reason is not None:
        raise FleetError("HOST and --reason go with `fleet history ack HOST --reason TEXT`")
    result = history(HistoryOptions(_common(args), since=args.since, cached=args.cached,
                                    snapshots_only=args.snapshots))
    for line in result.warnings:
        say(printable(line, multiline=False), err=True)  # a reason is operator text: one line, escaped
    if args.json:  # without a journal too: an empty document, not a sentence
        from fleet.output import json

        _write(json.dumps(json.history_json(result.snapshots, None if args.snapshots else result.runs)))
    elif not result.exists:
        say(f"No journal yet at {result.journal}: nothing has been observed or applied from this state directory, "
            "and no host's history was read.")
    else:
        from fleet.output.text import history_text

        _write(history_text(result.snapshots, None if args.snapshots else result.runs))
    return EXIT_OK


def _run_history_ack(args: argparse.Namespace) -> int:
    from fleet.workflows.audit import AckOptions, ack
    from fleet.workflows.base import Scope

    if not args.ack_host or args.reason is None:
        raise FleetError("`fleet history ack` needs HOST and --reason TEXT",
                         hint="e.g. fleet history ack franz --reason 'restored from backup, checked'")
    result = ack(AckOptions(_common(args), args.ack_host, args.reason, Scope(limit=args.ack_host)),
                 TerminalReporter())
    say(printable(f"Acknowledged on {result.host} (record {result.seq} of its history): "
                  + "; ".join(b.brk.message for b in result.acknowledged), multiline=False))
    return EXIT_OK


def _run_diff(args: argparse.Namespace) -> int:
    from fleet.workflows.audit import DiffOptions, diff

    result = diff(DiffOptions(_common(args), _scope(args), a=args.snap_a, b=args.snap_b), TerminalReporter())
    if args.json:
        from fleet.output import json

        _write(json.dumps(json.diff_json(result.changes)))
    else:
        from fleet.output.text import diff_text

        _write(diff_text(result.a.id, result.b, result.changes))
    return EXIT_CHANGES if result.changes else EXIT_OK


def _run_adopt(args: argparse.Namespace) -> int:
    from fleet.output.text import adopt_text
    from fleet.workflows.adopt import DEFAULT_PATTERNS, AdoptOptions, adopt

    result = adopt(AdoptOptions(_common(args), _scope(args), Path(args.target),
                                patterns=tuple(args.pattern or DEFAULT_PATTERNS), force=args.force, name=args.name),
                   TerminalReporter())
    _write(adopt_text(result))
    return EXIT_OK if result.complete else EXIT_ERROR


def _run_watch(args: argparse.Namespace) -> int:
    if args.timer and not args.print_systemd_unit:
        raise FleetError("--timer only goes with --print-systemd-unit", hint="fleet watch --print-systemd-unit --timer")
    remind = None
    if args.remind_every is not None:
        from fleet.notify import parse_duration

        remind = parse_duration(args.remind_every)
        if remind is None:
            raise FleetError(f"--remind-every {printable(args.remind_every)!r} is not a duration of at least a minute",
                             hint='e.g. --remind-every 4h (also "30m", "1d" or seconds)')
    if args.print_systemd_unit:
        _write(_watch_units(args))
        return EXIT_OK
    import signal
    import threading

    from fleet.workflows.watch import CycleResult, WatchOptions, watch

    options = WatchOptions(_common(args), _scope(args), every=args.every, once=args.once, notify=tuple(args.notify),
                           metrics_file=_path(args.metrics_file), html_dir=_path(args.html), remind_every=remind)
    stop = threading.Event()
    if not args.once:
        # SIGTERM (systemctl stop) only asks: the cycle under way ends, then the loop does.
        signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())

    def show(result: CycleResult) -> None:
        from fleet.notify import event_line

        for event in result.events:
            say(event_line(event))
        sys.stdout.flush()

    watch(options, TerminalReporter(), stop=stop, on_cycle=show)
    return EXIT_OK


def _watch_units(args: argparse.Namespace) -> str:
    """The unit(s) running the watch as these options describe it, paths made absolute."""
    from fleet.watch.unit import UnitOptions, service_unit, timer_units

    def absolute(path: str | None) -> str:
        return os.path.abspath(path) if path else ""

    extra: list[str] = []
    for flag, value in (("--desired", args.desired), ("--hosts", args.hosts)):
        if value:
            extra += [flag, absolute(value)]
    if args.lab:
        extra.append("--lab")
    own: list[str] = []
    for flag, value in (("--limit", args.limit), ("--remind-every", args.remind_every)):
        if value:
            own += [flag, value]
    options = UnitOptions(fleet=_fleet_executable(), directory=absolute(args.dir), state_dir=absolute(args.state_dir),
                          every=args.every, metrics_file=absolute(args.metrics_file), html_dir=absolute(args.html),
                          notify=tuple(args.notify), extra_args=tuple(extra), watch_args=tuple(own))
    if args.timer:
        service, timer = timer_units(options)
        return f"# /etc/systemd/system/fleet-watch.service\n{service}\n# /etc/systemd/system/fleet-watch.timer\n{timer}"
    return f"# /etc/systemd/system/fleet-watch.service\n{service_unit(options)}"


def _fleet_executable() -> str:
    """The `fleet` being run (the unit runs the same one), else the one on PATH."""
    import shutil

    if os.path.basename(sys.argv[0]) == "fleet" and os.path.exists(sys.argv[0]):
        return os.path.abspath(sys.argv[0])
    found = shutil.which("fleet")
    if found is None:
        raise FleetError("cannot tell where the fleet executable is", hint="run it as `fleet`, installed on PATH")
    return os.path.abspath(found)


def _run_lab(args: argparse.Namespace) -> int:
    from fleet.lab.cli import run_lab

    return run_lab(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": _run_check, "status": _run_status, "plan": _run_plan, "show": _run_show, "apply": _run_apply,
    "lock": _run_lock, "log": _run_log, "audit": _run_audit, "history": _run_history, "diff": _run_diff,
    "adopt": _run_adopt, "watch": _run_watch, "lab": _run_lab,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors; 2 means "changes" here
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.debug_log:
            _start_debug_log(args.debug_log)
        return COMMANDS[args.command](args)
    except FleetError as e:
        say(f"fleet: error: {e}", err=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `fleet log | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _start_debug_log(path: str) -> None:
    """fleet's and paramiko's debug records, with times and threads, appended to `path`: what a
    failure that cannot be reproduced at will needs to be diagnosed afterwards.  Commands are
    logged by their first 80 characters; file contents travel on stdin and are never logged."""
    import logging

    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:
        raise FleetError(f"cannot write the debug log {path}: {e.strerror or e}",
                         hint="pass a writable path to --debug-log (or FLEET_DEBUG_LOG)") from e
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s.%(msecs)03d pid {os.getpid()} %(threadName)s %(name)s %(levelname)s %(message)s",
        "%Y-%m-%dT%H:%M:%S"))
    for name in ("fleet", "paramiko"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    logging.getLogger("fleet").debug("fleet %s: %s", __version__, " ".join(sys.argv[1:]))


def entry() -> None:
    sys.exit(main())
