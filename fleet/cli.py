"""The `fleet` command: argument parsing, exit codes and wiring.  No logic of its own."""

from __future__ import annotations

import argparse
import os
import secrets as random_source
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fleet import __version__, config, policy, remote
from fleet.apply import (
    Executor,
    check_contents,
    describe_holder,
    holder_info,
    lock_hosts,
    parse_holder,
    relabel_lock,
    stale_note,
    unlock_hosts,
)
from fleet.audit import JournalStep, ObservedChange, attribute, build_audit, changes_between
from fleet.collect.collector import collect
from fleet.errors import FleetError, TransportError
from fleet.journal import (
    Journal,
    SnapshotRecord,
    journal_path,
    operator,
    parse_since,
    sentence,
    sentence_without_time,
)
from fleet.model import Desired, Finding, HostResult, HostState
from fleet.output import json as json_out
from fleet.output.markdown import audit_markdown
from fleet.output.text import (
    apply_summary,
    apply_text,
    audit_text,
    findings_summary,
    findings_text,
    plan_text,
    status_text,
    table,
    use_color,
)
from fleet.plan import Plan, build_plan, first_difference, plan_from_json
from fleet.secrets import ensure_lab_secrets, load_secrets
from fleet.snapshot import host_summary, pack, unpack
from fleet.status import build_status
from fleet.targets import Targets, resolve
from fleet.textutil import positive_int_option, printable, seconds_option, sha256_hex
from fleet.transport.protocol import Transport

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2

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

    p_check = sub.add_parser(
        "check", parents=[common], help="validate the desired state, the inventory and the domain policies (offline)",
        description="Validate desired_state.toml and hosts/ and apply the domain policies (Sidekiq queues, "
                    "placement, env keys).  Prints every finding at once, each with file, key, line and a hint.",
        epilog="exit codes:\n  0  no errors (warnings allowed)\n  1  at least one error\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_check.add_argument("--json", action="store_true", help="machine-readable findings (see docs/desired-state.md)")

    p_status = sub.add_parser(
        "status", parents=[common], help="what runs where: every service on every host, live",
        description="Collect the actual systemd state of every host (one SSH round trip each, in parallel) "
                    "and show one row per service and per undeclared unit, one column per host.",
        epilog="exit codes:\n  0  every host answered\n  1  a host could not be reached or observed "
               "(everything that answered is still shown), or invalid input\n"
               "JSON schema: docs/status.md\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _host_options(p_status)
    p_status.add_argument("--json", action="store_true", help="machine-readable report (docs/status.md)")

    p_plan = sub.add_parser(
        "plan", parents=[common], help="what would change, host by host, ordered by dependencies (changes nothing)",
        description="Collect the fleet, diff it against the desired state and print the plan: grouped by host, "
                    "with unit diffs, env key diffs (secrets masked) and the order of waves.",
        epilog="exit codes (like terraform plan -detailed-exitcode):\n  0  no changes\n  1  error (invalid "
               "desired state, policy errors, missing secrets)\n  2  changes are pending (or the plan is "
               "incomplete because a host could not be observed)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _host_options(p_plan)
    p_plan.add_argument("-o", "--out", metavar="FILE", help="save the plan as JSON for `fleet show`/`fleet apply`")
    p_plan.add_argument("--json", action="store_true", help="print the plan as JSON (docs/plan.md)")
    p_plan.add_argument("--no-prune", action="store_true",
                        help="do not prune undeclared units this run (they are still reported)")
    p_plan.add_argument("--secrets", metavar="FILE",
                        help="secrets file for \"file\" sources "
                             "(default: STATE/secrets.toml; with --lab: STATE/lab/secrets.toml)")

    p_show = sub.add_parser("show", parents=[common], help="print a saved plan file",
                            description="Print a plan saved with `fleet plan -o FILE`.",
                            epilog="exit codes: 0 no changes, 1 unreadable plan, 2 changes\n",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p_show.add_argument("plan_file", metavar="FILE")
    p_show.add_argument("--json", action="store_true", help="print the plan as JSON")

    p_apply = sub.add_parser(
        "apply", parents=[common], help="make the fleet match the desired state: ordered, health-gated, journaled",
        description="Without PLAN: compute a plan, show it and ask for confirmation.  With PLAN (from "
                    "`fleet plan -o PLAN`): apply exactly that plan, after checking that its hosts have not changed "
                    "since (a stale plan is refused).  Changes run wave by wave, hosts in parallel; every start or "
                    "restart must pass its health gate or the rollout halts and that service is rolled back.  Every "
                    "step is written to the journal (`fleet log`).",
        epilog="exit codes:\n  0  applied (or nothing to do)\n  1  a step failed (rolled back where it can be), "
               "the plan is stale/incomplete, a host is locked, or invalid input\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_apply.add_argument("plan_file", nargs="?", metavar="PLAN", help="a saved plan to apply exactly")
    _host_options(p_apply)
    p_apply.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p_apply.add_argument("--no-prune", action="store_true", help="do not prune undeclared units this run")
    p_apply.add_argument("--secrets", metavar="FILE", help="secrets file (as for `fleet plan`)")
    p_apply.add_argument("--settle", type=seconds_option(zero_ok=True), default=3.0, metavar="S",
                         help="seconds a started unit must stay up without restarting (default 3)")
    p_apply.add_argument("--start-timeout", type=seconds_option(), default=30.0, metavar="S",
                         help="seconds a unit may take to become active (default 30)")

    p_lock = sub.add_parser(
        "lock", parents=[common], help="show or break the per-host apply locks",
        description="Every apply takes a lock on each host it changes (/var/lib/fleet/lock on the host).  "
                    "`status` shows who holds them; `break` removes a stale one left by an apply that died.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_lock.add_argument("lock_action", choices=("status", "break"))
    _host_options(p_lock)
    p_lock.add_argument("--yes", action="store_true", help="break without asking")

    p_log = sub.add_parser(
        "log", parents=[common], help="who changed what, from what to what, when (the journal)",
        description="Print the journal of applies as sentences, oldest first, times in UTC.",
        epilog="--since accepts 2026-11-28, 2026-11-28T14:03, '2026-11-28 14:03:07' (UTC) or 30m, 2h, 3d, 1w.\n"
               "exit codes: 0 ok, 1 unreadable journal\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_log.add_argument("--host", metavar="HOST", help="only steps on this host")
    p_log.add_argument("--since", metavar="TIME", help="only steps since TIME")
    p_log.add_argument("--json", action="store_true", help="one object per step (docs/journal.md)")

    p_audit = sub.add_parser(
        "audit", parents=[common], help="post-incident state audit: what runs where, drift, findings, what changed",
        description="Collect the fleet live and report what runs where, drift (managed/changed/missing/unmanaged, "
                    "with coverage), the domain policies judged on what actually runs, and — with --since — every "
                    "change since then, attributed to a journaled fleet apply or marked as changed outside fleet.",
        epilog="exit codes:\n  0  no error-level findings\n  1  could not audit (invalid input)\n"
               "  2  error-level findings (a host unreachable counts as one)\n"
               "--since: a snapshot id from `fleet history`, or a time (2026-11-28, 2026-11-28T14:03, 2h, 3d)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _host_options(p_audit)
    p_audit.add_argument("--since", metavar="TIME|SNAPSHOT", help="also report what changed since then")
    p_audit.add_argument("--format", choices=("text", "md", "json"), default="text",
                         help="text (default), md (ready for a postmortem) or json")
    p_audit.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")

    p_history = sub.add_parser("history", parents=[common], help="list the kept observations (snapshots)",
                               description="Every status, plan, apply and audit keeps its observation in the "
                                           "journal; this lists them, oldest first.")
    p_history.add_argument("--since", metavar="TIME", help="only snapshots since TIME")
    p_history.add_argument("--json", action="store_true")

    p_diff = sub.add_parser(
        "diff", parents=[common], help="what changed between two snapshots, or a snapshot and now",
        description="Compare two observations: A and B are snapshot ids from `fleet history`; B defaults to "
                    "`now` (collect live).  Each change is attributed to a fleet apply or marked as changed "
                    "outside fleet.",
        epilog="exit codes: 0 no changes, 1 error, 2 changes\n", formatter_class=argparse.RawDescriptionHelpFormatter)
    p_diff.add_argument("snap_a", metavar="A")
    p_diff.add_argument("snap_b", metavar="B", nargs="?", default="now")
    _host_options(p_diff)
    p_diff.add_argument("--json", action="store_true")

    try:
        from fleet.lab.cli import add_lab_parser
    except ImportError:  # pragma: no cover - lab package absent in a stripped install
        pass
    else:
        add_lab_parser(sub)
    return parser


def _host_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", metavar="HOSTS", help="only these hosts: names or globs, comma-separated")
    p.add_argument("--forks", type=positive_int_option, metavar="N",
                   help="hosts contacted in parallel (default: all, up to 32)")
    p.add_argument("--timeout", type=seconds_option(), default=60.0, metavar="S",
                   help="seconds the remote collection may run per host (default 60)")


def _finish_paths(args: argparse.Namespace) -> None:
    """Resolve the path defaults in one place, so every command sees the same files."""
    desired, hosts = config.default_paths(args.dir, args.desired, args.hosts)
    args.desired = str(desired)
    args.hosts = str(hosts)
    args.state_dir = args.state_dir or str(Path(args.dir) / ".fleet")


def load_checked(args: argparse.Namespace) -> tuple[config.Loaded, list[Finding]]:
    """Load the files and run every policy; returns the load and all findings."""
    return config.load_checked(Path(args.desired), Path(args.hosts), policy.check)


def cmd_check(args: argparse.Namespace) -> int:
    loaded, findings = load_checked(args)
    errors = [f for f in findings if f.is_error]
    if args.json:
        sys.stdout.write(json_out.dumps(json_out.check_json(findings)))
    else:
        if findings:
            print(findings_text(findings, color=use_color(sys.stdout.isatty())))
            print()
        d = loaded.desired
        if d is not None and not errors:
            say(f"{d.name}: {len(d.hosts)} hosts, {len(d.services)} services, "
                f"{len(d.env_files)} env files — {findings_summary(findings)}")
        else:
            print(f"check failed: {findings_summary(findings)}")
    return EXIT_ERROR if errors else EXIT_OK


def load_valid(args: argparse.Namespace) -> Desired:
    """The desired state for commands that act on it: any error-level finding stops them."""
    loaded, findings = load_checked(args)
    errors = [f for f in findings if f.is_error]
    if errors or loaded.desired is None:
        print(findings_text(errors, color=use_color(sys.stderr.isatty())), file=sys.stderr)
        raise FleetError(f"the desired state has {findings_summary(errors)}", hint="fix them (see `fleet check`)")
    return loaded.desired


def open_transport(args: argparse.Namespace, targets: Targets) -> Transport:
    # Imported here, not at the top: paramiko costs ~90 ms of CPU, and `check`, `show`, `log`,
    # `history` and `--help` never connect to anything.
    from fleet.transport.ssh import SSHTransport

    # 4 MiB: a real collection is tens of KB (unit texts are capped at 5,000 lines); a host that
    # prints more is refused ("output-too-large") before its output can cost much memory.
    return SSHTransport(ssh_config=targets.ssh_config, known_hosts=targets.known_hosts,
                        accept_new=args.accept_new_host_keys, connect_timeout=args.connect_timeout,
                        command_timeout=getattr(args, "timeout", 60.0), max_output=4 << 20)


def observe(args: argparse.Namespace, desired: Desired, targets: Targets,
            transport: Transport) -> dict[str, HostResult]:
    """Collect every target host, with progress on stderr when a person is watching, and keep
    the observation as a snapshot in the journal (`fleet history`)."""
    tty = sys.stderr.isatty()

    def progress(name: str, result: HostResult) -> None:
        if tty:
            what = "ok" if isinstance(result, HostState) else f"FAILED ({result.kind})"
            say(f"  {name}: {what}", err=True)

    if tty:
        print(f"collecting {len(targets.hosts)} host(s){' (lab)' if targets.lab else ''}…", file=sys.stderr)
    results = collect(desired, transport, targets.hosts, forks=args.forks, timeout=args.timeout, progress=progress)
    args.snapshot_id = keep_snapshot(args, desired, results)
    return results


def keep_snapshot(args: argparse.Namespace, desired: Desired, results: dict[str, HostResult]) -> str:
    """Store the observation; a journal that cannot be written is a warning, never a failure of
    a read command."""
    try:
        with Journal.open(journal_path(args.state_dir)) as journal:
            return journal.save_snapshot(command=args.command, fleet=desired.name, lab=args.lab,
                                         hosts=host_summary(results), data=pack(results), operator=operator(),
                                         keep_days=desired.snapshot_retention_days)
    except FleetError as e:
        say(f"warning: this observation was not kept in the journal: {e.message}", err=True)
        return ""


def cmd_status(args: argparse.Namespace) -> int:
    desired = load_valid(args)
    targets = resolve(desired, state_dir=args.state_dir, lab=args.lab, limit=args.limit)
    with open_transport(args, targets) as transport:
        results = observe(args, desired, targets, transport)
    report = build_status(replace(desired, hosts=targets.hosts), results)
    if args.json:
        sys.stdout.write(json_out.dumps(json_out.status_json(report)))
    else:
        sys.stdout.write(status_text(report))
    return EXIT_ERROR if report.unreachable else EXIT_OK


def secrets_path(args: argparse.Namespace) -> Path:
    if getattr(args, "secrets", None):
        return Path(args.secrets)
    return Path(args.state_dir) / ("lab" if args.lab else "") / "secrets.toml"


@dataclass(frozen=True)
class Prepared:
    """What a planning command works with: the desired state scoped to its hosts, where those
    hosts are, and the resolved secrets (in memory only)."""

    desired: Desired
    targets: Targets
    secrets: dict[tuple[str, str], str]


def prepare(args: argparse.Namespace) -> Prepared:
    desired = load_valid(args)
    targets = resolve(desired, state_dir=args.state_dir, lab=args.lab, limit=args.limit)
    path = secrets_path(args)
    if args.lab and not getattr(args, "secrets", None) and ensure_lab_secrets(desired, path):
        say(f"lab: generated random secrets in {path}", err=True)
    secret_values, findings = load_secrets(desired, path)
    errors = [f for f in findings if f.is_error]
    for f in findings:
        if not f.is_error:
            print(findings_text([f]), file=sys.stderr)
    if errors:
        print(findings_text(errors, color=use_color(sys.stderr.isatty())), file=sys.stderr)
        raise FleetError(f"{len(errors)} secret(s) cannot be resolved; nothing was planned")
    return Prepared(replace(desired, hosts=targets.hosts), targets, secret_values)


def compute_plan(args: argparse.Namespace, prep: Prepared, transport: Transport) -> Plan:
    results = observe(args, prep.desired, prep.targets, transport)
    return build_plan(prep.desired, results, prep.secrets, prune=not args.no_prune, lab=args.lab)


def _plan_exit(plan: Plan) -> int:
    return EXIT_CHANGES if plan.changes or not plan.complete else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    if args.out:  # before any host is contacted: a plan computed for nothing costs every host a round trip
        check_writable(Path(args.out), "the plan")
    prep = prepare(args)
    with open_transport(args, prep.targets) as transport:
        plan = compute_plan(args, prep, transport)
    if args.out:
        write_private_file(Path(args.out), plan.to_json(), "the plan")
    if args.json:
        sys.stdout.write(json_out.dumps(json_out.plan_json(plan)))
    else:
        sys.stdout.write(plan_text(plan, color=use_color(sys.stdout.isatty())))
        if args.out:
            say(f"Saved to {args.out} (plan {plan.plan_id}); apply exactly this with `fleet apply {args.out}`.")
    return _plan_exit(plan)


def cmd_show(args: argparse.Namespace) -> int:
    plan = plan_from_json(_read(Path(args.plan_file)), args.plan_file)
    if args.json:
        sys.stdout.write(json_out.dumps(json_out.plan_json(plan)))
    else:
        sys.stdout.write(plan_text(plan, color=use_color(sys.stdout.isatty())))
    return _plan_exit(plan)


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


def lock_token() -> str:
    """A random lock token: only the apply that took a lock can release it."""
    return random_source.token_hex(8)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} Only 'yes' will be accepted: ").strip() == "yes"
    except EOFError:
        return False


def _same_as_saved(saved: Plan, fresh: Plan) -> None:
    """Refuse a saved plan unless fleet, planning now under the lock from the same desired state
    and the fresh observation, arrives at exactly that plan.  Stale plans are named by what
    changed on the hosts; anything else that differs was edited (or damaged)."""
    again = "compute a new plan with `fleet plan -o FILE` and review it"
    if saved.desired_hash != fresh.desired_hash:
        raise FleetError("the desired state changed since the plan was computed; refusing a stale plan", hint=again)
    reasons = _stale_reasons(saved, fresh)
    if reasons:
        raise FleetError("refusing a stale plan: the hosts changed since it was computed\n  " + "\n  ".join(reasons),
                         hint=again)
    difference = first_difference(saved, fresh)
    if difference is not None:
        raise FleetError("refusing the saved plan: it is not the plan fleet computes now from the same desired "
                         f"state and hosts (edited, or computed with other options): {difference}",
                         hint=again + " (a plan made with --no-prune is applied with --no-prune)")


def _stale_reasons(saved: Plan, fresh: Plan) -> list[str]:
    """What differs between the saved plan and one computed now: the reader's 'what changed'."""
    old = {c.id: c for c in saved.changes}
    new = {c.id: c for c in fresh.changes if c.host in saved.fingerprints}
    out = [f"{h}: observed state changed since the plan" for h in saved.fingerprints
           if fresh.fingerprints.get(h) not in (None, saved.fingerprints[h])]
    out += [f"  no longer needed: {cid}" for cid in old if cid not in new]
    out += [f"  newly needed: {cid} ({new[cid].reason})" for cid in new if cid not in old]
    out += [f"  different now: {cid} (was {old[cid].before!r}, now {new[cid].before!r})"
            for cid in new if cid in old and new[cid].before != old[cid].before]
    return out[:30]


def cmd_apply(args: argparse.Namespace) -> int:
    saved: Plan | None = None
    if args.plan_file:
        if args.limit:
            raise FleetError("a saved plan covers its own hosts; --limit cannot change it",
                             hint="make a new plan with `fleet plan --limit … -o FILE`")
        saved = plan_from_json(_read(Path(args.plan_file)), args.plan_file)
        if saved.lab != args.lab:
            raise FleetError(f"{args.plan_file} was computed {'for the lab' if saved.lab else 'for real hosts'}; "
                             f"this run is {'--lab' if args.lab else 'not --lab'}", hint="use the matching --lab")
        if not saved.complete:
            raise FleetError(f"{args.plan_file} is incomplete: {', '.join(h for h, _, _ in saved.unknown)} could not "
                             "be observed when it was computed", hint="plan again, or exclude them with --limit")
        args.limit = ",".join(saved.hosts)
    prep = prepare(args)
    who = operator()
    token = lock_token()
    holder = holder_info(token, who)

    def report(line: str) -> None:
        say(line, err=True)

    with open_transport(args, prep.targets) as transport:
        # Lock first, then observe: what is planned is what gets applied, and a second apply
        # started meanwhile is refused instead of planning against a moving fleet.
        lock_hosts(transport, prep.targets.hosts, holder, forks=args.forks or 32)
        try:
            plan = _plan_under_lock(args, prep, transport, saved)
            if plan is None:
                return EXIT_OK
            return _execute(args, prep, plan, transport, token, who, report)
        except _Cancelled:
            print("Apply cancelled; nothing was changed.")
            return EXIT_ERROR
        finally:
            unlock_hosts(transport, prep.targets.hosts, token, report)


class _Cancelled(Exception):
    pass


def _plan_under_lock(args: argparse.Namespace, prep: Prepared, transport: Transport,
                     saved: Plan | None) -> Plan | None:
    """The plan to execute (None: nothing to do), after the stale check or the confirmation."""
    plan = compute_plan(args, prep, transport)
    if saved is not None:
        _same_as_saved(saved, plan)
        # What runs is the plan computed now, never fields read from the file: the two are
        # equal by the check above, and the saved plan's time keeps its plan id in the journal.
        plan = replace(plan, created_at=saved.created_at)
    else:
        sys.stdout.write(plan_text(plan, color=use_color(sys.stdout.isatty())))
    if not plan.complete:
        raise FleetError("the plan is incomplete (a host could not be observed); nothing was changed",
                         hint="fix the host, or exclude it with --limit")
    if plan.empty:
        print("Nothing to apply.")
        return None
    if saved is None and not args.yes:
        if not sys.stdin.isatty():
            raise FleetError("refusing to apply without confirmation: no terminal to ask on",
                             hint="review with `fleet plan`, then run `fleet apply --yes` (or apply a saved plan)")
        n_hosts = len({c.host for c in plan.changes})
        if not _confirm(f"Apply these {len(plan.changes)} change(s) to {n_hosts} host(s)?"):
            raise _Cancelled()
    return plan


def _execute(args: argparse.Namespace, prep: Prepared, plan: Plan, transport: Transport, token: str, who: str,
             report: Callable[[str], None]) -> int:
    check_contents(plan, prep.desired, prep.secrets)
    touched = [h for h in prep.targets.hosts if any(c.host == h.name for c in plan.changes)]
    with Journal.open(journal_path(args.state_dir)) as journal:
        run_id = journal.start_run(operator=who, plan_id=plan.plan_id, plan_hash=sha256_hex(plan.to_json()),
                                   desired_hash=plan.desired_hash, fleet=plan.fleet, lab=plan.lab)
        relabel_lock(transport, touched, holder_info(token, who, run_id=run_id, plan_id=plan.plan_id), report)
        ex = Executor(plan, prep.desired, prep.targets.hosts, prep.secrets, transport, journal, run_id,
                      settle=args.settle, start_timeout=args.start_timeout, report=report, forks=args.forks)
        outcome = "interrupted"
        try:
            result = ex.execute()
            outcome = "ok" if result.ok else "failed"
        finally:
            if outcome == "interrupted":
                journal.finish_run(run_id, outcome, "interrupted")
        journal.finish_run(run_id, outcome, apply_summary(result))
    sys.stdout.write(apply_text(result))
    say(f"Journal: run {run_id} — `fleet log` shows every step.")
    return EXIT_OK if result.ok else EXIT_ERROR


def cmd_lock(args: argparse.Namespace) -> int:
    desired = load_valid(args)
    if args.lock_action == "break" and not args.limit:
        raise FleetError("`fleet lock break` needs --limit HOSTS", hint="name the hosts whose stale lock to break")
    targets = resolve(desired, state_dir=args.state_dir, lab=args.lab, limit=args.limit)
    rows, code = [], EXIT_OK
    broken: dict[str, list[str]] = {}  # run id in the broken lock's holder -> hosts
    with open_transport(args, targets) as transport:
        for host in targets.hosts:
            try:
                out = transport.run(host, remote.read_lock(), timeout=30).stdout.decode("utf-8", "replace")
            except TransportError as e:
                rows.append([host.name, f"unknown ({e.kind})", e.message])
                code = EXIT_ERROR
                continue
            if not out.startswith("@@held"):
                rows.append([host.name, "free", ""])
                continue
            held = out.split("\n", 1)[1].strip() if "\n" in out else ""
            holder = describe_holder(held) + stale_note(held)
            if args.lock_action == "break":
                if not args.yes and not _confirm(f"{host.name} is locked by {holder}. Break this lock?"):
                    rows.append([host.name, "locked (kept)", holder])
                    code = EXIT_ERROR
                    continue
                transport.run(host, remote.break_lock(), timeout=30)
                rows.append([host.name, "broken", holder])
                broken.setdefault(_holder_run(held), []).append(host.name)
            else:
                rows.append([host.name, "locked", holder])
    print(table(rows, ["HOST", "LOCK", "HOLDER"]))
    _close_broken_runs(args, broken)
    return code


def _holder_run(holder: str) -> str:
    h = parse_holder(holder)
    return str(h.get("run_id") or "") if h is not None else ""


def _close_broken_runs(args: argparse.Namespace, broken: dict[str, list[str]]) -> None:
    """A run whose lock was broken will never finish: say so in this state directory's journal
    (when that run is in it), so that `fleet log` stops showing it as possibly still running.
    Its unfinished steps stay as they are: "started, never finished" is what is known of them."""
    path = journal_path(args.state_dir)
    runs = [r for r in broken if r]
    if not runs or not path.exists():
        return
    with Journal.open(path) as journal:
        for run_id in runs:
            run = journal.run(run_id)
            if run is None or run.ended is not None:
                continue
            hosts = ", ".join(broken[run_id])
            journal.finish_run(run_id, "interrupted",
                               f"never finished: its lock on {hosts} was broken by {operator()}")
            say(f"Journal: run {run_id} marked interrupted (its lock was broken); "
                "`fleet log` shows the steps it started and never finished.")


def cmd_log(args: argparse.Namespace) -> int:
    path = journal_path(args.state_dir)
    if not path.exists():
        say(f"No journal yet at {path}: nothing has been applied from this state directory.")
        return EXIT_OK
    since = parse_since(args.since) if args.since else None
    with Journal.open(path) as journal:
        steps = journal.steps(host=args.host, since=since)
        runs = journal.runs()
    if args.json:
        sys.stdout.write(json_out.dumps(json_out.log_json(steps, runs)))
    else:
        by_id = {r.id: r for r in runs}
        for step in steps:
            say(printable(sentence(step, by_id.get(step.run_id)), multiline=False))
    return EXIT_OK


def _baseline(journal: Journal, since: str) -> SnapshotRecord:
    """--since: a snapshot id, or the last snapshot taken at or before a time."""
    snaps = journal.snapshots()
    exact = next((x for x in snaps if x.id == since), None)
    if exact is not None:
        return exact
    t = parse_since(since)
    before = [x for x in snaps if x.taken <= t]
    if before:
        return before[-1]
    raise FleetError(f"no snapshot was taken at or before {since}",
                     hint="see `fleet history` for what is kept" + (f"; the oldest is {snaps[0].id}" if snaps else ""))


def _changes_since(journal: Journal, base: SnapshotRecord, new: dict[str, HostResult],
                   until: float) -> tuple[list[ObservedChange], list[tuple[float, str]]]:
    data = journal.snapshot_data(base.id)
    assert data is not None
    old = unpack(data)
    scope = set(new)
    old = {h: r for h, r in old.items() if h in scope}
    runs = {r.id: r for r in journal.runs(since=base.taken)}
    steps = [x for x in journal.steps(since=base.taken) if x.started is None or x.started <= until]
    changes = attribute(changes_between(old, new),
                        [JournalStep(x.run_id, x.host, x.action, x.target, x.started, x.outcome,
                                     tuple(k[0] for k in x.keys)) for x in steps],
                        {rid: r.operator for rid, r in runs.items()}, base.taken, until)
    timeline = [(x.started or x.ended or base.taken, sentence_without_time(x, runs.get(x.run_id))) for x in steps]
    timeline += [(until, f"{c.what} — changed outside fleet (between {base.id} and now)")
                 for c in changes if not c.run_id]
    return changes, sorted(timeline, key=lambda t: t[0])


def cmd_audit(args: argparse.Namespace) -> int:
    desired = load_valid(args)
    targets = resolve(desired, state_dir=args.state_dir, lab=args.lab, limit=args.limit)
    scoped = replace(desired, hosts=targets.hosts)
    base: SnapshotRecord | None = None
    if args.since:  # resolved before observing, so that "now" is never its own baseline
        with Journal.open(journal_path(args.state_dir)) as journal:
            base = _baseline(journal, args.since)
    with open_transport(args, targets) as transport:
        results = observe(args, scoped, targets, transport)
    report = build_audit(scoped, results)
    report.snapshot_id = args.snapshot_id
    if base is not None:
        with Journal.open(journal_path(args.state_dir)) as journal:
            report.changes, report.timeline = _changes_since(journal, base, results, time.time())
        taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(base.taken))
        report.since = f"snapshot {base.id} ({base.command}, {taken})"
    if args.format == "json":
        sys.stdout.write(json_out.dumps(json_out.audit_json(report)))
    elif args.format == "md":
        sys.stdout.write(audit_markdown(report))
    else:
        sys.stdout.write(audit_text(report))
    return EXIT_CHANGES if report.errors else EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    path = journal_path(args.state_dir)
    if not path.exists():
        say(f"No journal yet at {path}: nothing has been observed from this state directory.")
        return EXIT_OK
    with Journal.open(path) as journal:
        snaps = journal.snapshots(since=parse_since(args.since) if args.since else None)
    if args.json:
        sys.stdout.write(json_out.dumps(json_out.history_json(snaps)))
        return EXIT_OK
    rows = [[x.id, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(x.taken)), x.operator, x.command,
             x.fleet + (" (lab)" if x.lab else ""),
             ", ".join(h if v == "ok" else f"{h}: {v}" for h, v in sorted(x.hosts.items()))] for x in snaps]
    print(table(rows, ["SNAPSHOT", "TAKEN (UTC)", "OPERATOR", "BY", "FLEET", "HOSTS"]))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    path = journal_path(args.state_dir)
    if not path.exists():
        raise FleetError(f"no journal at {path}", hint="snapshots are kept by status, plan, apply and audit")
    with Journal.open(path) as journal:
        a = _baseline(journal, args.snap_a)
    if args.snap_b == "now":
        desired = load_valid(args)
        targets = resolve(desired, state_dir=args.state_dir, lab=args.lab, limit=args.limit)
        with open_transport(args, targets) as transport:
            new = observe(args, replace(desired, hosts=targets.hosts), targets, transport)
        until = time.time()
    else:
        with Journal.open(path) as journal:
            b = _baseline(journal, args.snap_b)
            data = journal.snapshot_data(b.id)
        assert data is not None
        new, until = unpack(data), b.taken
    with Journal.open(path) as journal:
        changes, _ = _changes_since(journal, a, new, until)
    if args.json:
        sys.stdout.write(json_out.dumps(json_out.diff_json(changes)))
    else:
        say(f"Changes from {a.id} to {args.snap_b}:" if changes else f"No changes from {a.id} to {args.snap_b}.")
        for c in changes:
            say(printable(f"  • {c.what} — {c.attribution}", multiline=False))
    return EXIT_CHANGES if changes else EXIT_OK


def _read(path: Path) -> str:
    """A plan file's text: a directory, a FIFO (never waited on), a device or bytes that are not
    UTF-8 are refused in one line."""
    hint = "pass a plan file written by `fleet plan -o FILE`"
    try:
        raw = config.read_regular_file(path)
    except config.NotAFileError as e:
        raise FleetError(f"cannot read {path}: it is {e.kind}, not a file", hint=hint) from None
    except OSError as e:
        raise FleetError(f"cannot read {path}: {e.strerror or e}", hint=hint) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FleetError(f"{path} is not a plan: it is not UTF-8 text (byte {e.start})", hint=hint) from None


COMMANDS = {"check": cmd_check, "status": cmd_status, "plan": cmd_plan, "show": cmd_show, "apply": cmd_apply,
            "lock": cmd_lock, "log": cmd_log, "audit": cmd_audit, "history": cmd_history, "diff": cmd_diff}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors; 2 means "changes" here
        return EXIT_OK if e.code == 0 else 64
    if args.command is None:
        parser.print_help()
        return 64
    _finish_paths(args)
    try:
        if args.debug_log:
            _start_debug_log(args.debug_log)
        if args.command == "lab":
            from fleet.lab.cli import run_lab

            return run_lab(args)
        return COMMANDS[args.command](args)
    except FleetError as e:
        say(f"fleet: error: {e}", err=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        return 130
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
