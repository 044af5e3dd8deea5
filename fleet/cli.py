"""The `fleet` command: argument parsing, exit codes and wiring.  No logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fleet import __version__, config, policy
from fleet.errors import FleetError
from fleet.model import Finding
from fleet.render import findings_summary, findings_text, use_color

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet",
        description="What runs where on a small fleet of servers, and making it so.",
        epilog=GLOBAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fleet {__version__}")
    parser.add_argument("--dir", default=".", metavar="DIR",
                        help="directory holding desired_state.toml and hosts/ (default: current directory)")
    parser.add_argument("--desired", metavar="FILE", help="desired-state file (default: DIR/desired_state.toml)")
    parser.add_argument("--hosts", metavar="DIR", help="inventory directory (default: DIR/hosts)")
    parser.add_argument("--state-dir", metavar="DIR", help="fleet's state directory (default: DIR/.fleet)")
    parser.add_argument("--lab", action="store_true",
                        help="talk to the local lab hosts (see `fleet lab`) instead of the real addresses")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_check = sub.add_parser(
        "check", help="validate the desired state, the inventory and the domain policies (offline)",
        description="Validate desired_state.toml and hosts/ and apply the domain policies (Sidekiq queues, "
                    "placement, env keys).  Prints every finding at once, each with file, key, line and a hint.",
        epilog="exit codes:\n  0  no errors (warnings allowed)\n  1  at least one error\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_check.add_argument("--json", action="store_true", help="machine-readable findings (see docs/desired-state.md)")

    try:
        from fleet.lab.cli import add_lab_parser
    except ImportError:  # pragma: no cover - lab package absent in a stripped install
        pass
    else:
        add_lab_parser(sub)
    return parser


def _finish_paths(args: argparse.Namespace) -> None:
    """Resolve the path defaults in one place, so every command sees the same files."""
    desired, hosts = config.default_paths(args.dir, args.desired, args.hosts)
    args.desired = str(desired)
    args.hosts = str(hosts)
    args.state_dir = args.state_dir or str(Path(args.dir) / ".fleet")


def load_checked(args: argparse.Namespace) -> tuple[config.Loaded, list[Finding]]:
    """Load the files and run every policy; returns the load and all findings."""
    loaded = config.load(Path(args.desired), Path(args.hosts))
    findings = list(loaded.findings)
    if loaded.desired is not None:
        findings += config.with_lines(policy.check(loaded.desired), loaded)
    return loaded, findings


def cmd_check(args: argparse.Namespace) -> int:
    loaded, findings = load_checked(args)
    errors = [f for f in findings if f.is_error]
    if args.json:
        json.dump({"ok": not errors, "errors": len(errors), "warnings": len(findings) - len(errors),
                   "findings": [f.as_dict() for f in findings]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if findings:
            print(findings_text(findings, color=use_color(sys.stdout.isatty())))
            print()
        d = loaded.desired
        if d is not None and not errors:
            print(f"{d.name}: {len(d.hosts)} hosts, {len(d.services)} services, "
                  f"{len(d.env_files)} env files — {findings_summary(findings)}")
        else:
            print(f"check failed: {findings_summary(findings)}")
    return EXIT_ERROR if errors else EXIT_OK


COMMANDS = {"check": cmd_check}


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
        if args.command == "lab":
            from fleet.lab.cli import run_lab

            return run_lab(args)
        return COMMANDS[args.command](args)
    except FleetError as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
