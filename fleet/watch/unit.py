"""The systemd units that run `fleet watch` on an operations host (`--print-systemd-unit`).

Two variants, pick one:

* `service_unit` — a long-running `fleet-watch.service`: `fleet watch --every N`.  SIGTERM (a stop,
  a restart) ends it between cycles; systemd restarts it after a crash, and the outbox and
  notified state in the state directory make that lose and repeat nothing.
* `timer_units` — a oneshot `fleet-watch.service` running `fleet watch --once`, and a
  `fleet-watch.timer` starting it every N seconds after the previous run ended (cron-like,
  nothing resident between cycles).

Webhook URLs are credentials, and `systemctl show` prints a unit's command line to every local
user: the units take them from an `EnvironmentFile=` (mode 0600) through `--notify env:VAR` or
`[watch] notify = ["env:VAR"]`, and refuse a literal URL.  Every argument is quoted for
systemd's own command-line syntax (quotes, `\\`, and `%`/`$`, which systemd would expand), and a
value that could break the unit's line structure (a line break, a control character) is refused.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fleet.errors import FleetError
from fleet.textutil import printable

SERVICE = "fleet-watch.service"
TIMER = "fleet-watch.timer"
DEFAULT_ENVIRONMENT_FILE = "/etc/fleet/watch.env"

_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class UnitOptions:
    fleet: str  # absolute path of the fleet executable, e.g. /srv/fleet/.venv/bin/fleet
    directory: str  # absolute: the checkout holding desired_state.toml and hosts/
    state_dir: str = ""  # default: DIRECTORY/.fleet
    user: str = "fleet"  # who runs it: its ~/.ssh keys and known_hosts reach the fleet
    every: float = 300.0
    metrics_file: str = ""
    html_dir: str = ""
    notify: tuple[str, ...] = ()  # --notify specs: env:VAR references only
    environment_file: str = DEFAULT_ENVIRONMENT_FILE  # holds the VARs (webhook URLs): root-owned, 0600
    extra_args: tuple[str, ...] = ()  # further fleet options, e.g. ("--lab",)
    watch_args: tuple[str, ...] = ()  # further options of the watch command, e.g. ("--limit", "web*")

    @property
    def state(self) -> str:
        return self.state_dir or posixpath.join(self.directory, ".fleet")


def service_unit(o: UnitOptions) -> str:
    """The long-running variant."""
    _check(o)
    return _service(o, once=False)


def timer_units(o: UnitOptions) -> tuple[str, str]:
    """The timer variant: (fleet-watch.service, fleet-watch.timer)."""
    _check(o)
    every = _seconds(o.every)
    timer = "\n".join([
        "[Unit]",
        f"Description=fleet watch every {every}: drift detection for the fleet in {_value(o.directory)}",
        "",
        "[Timer]",
        "OnBootSec=2min",
        f"OnUnitInactiveSec={every}",  # from the end of the previous run: runs never overlap
        "AccuracySec=10s",
        f"Unit={SERVICE}",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])
    return _service(o, once=True), timer


def command(o: UnitOptions, *, once: bool) -> list[str]:
    """fleet's argv in the unit (before quoting)."""
    argv = [o.fleet, "--dir", o.directory, "--state-dir", o.state, *o.extra_args, "watch"]
    argv += ["--once"] if once else ["--every", _number(o.every)]
    for spec in o.notify:
        argv += ["--notify", spec]
    if o.metrics_file:
        argv += ["--metrics-file", o.metrics_file]
    if o.html_dir:
        argv += ["--html", o.html_dir]
    return argv + list(o.watch_args)


def systemd_quote(arg: str, *, command_line: bool = True) -> str:
    """One word as systemd reads it back (systemd.service(5) "Command lines", systemd.syntax(7)):
    `%` is a specifier everywhere and, in a command's arguments, `$` a variable — unless doubled;
    inside double quotes `\\` and `"` are backslash-escaped.  `command_line=False` for a word
    where `$` means itself: a list setting (ReadWritePaths=) or the executable of ExecStart=."""
    if "\n" in arg or "\r" in arg or not printable(arg, multiline=False) == arg:
        raise FleetError(f"{printable(arg)!r} cannot go into a unit file: it holds a line break or a control character",
                         hint="use paths and values without control characters")
    doubled = arg.replace("%", "%%")
    if command_line:
        doubled = doubled.replace("$", "$$")
    if arg and _SAFE.fullmatch(arg):
        return doubled
    return '"' + doubled.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Sequence[str]) -> str:
    """ExecStart='s value.  systemd substitutes `$` variables in the arguments, not in the
    executable (measured: `$$` stays doubled there), and refuses an executable whose path holds
    a quote or a backslash at all ("Executable name contains special characters")."""
    return " ".join([systemd_quote(argv[0], command_line=False), *(systemd_quote(a) for a in argv[1:])])


def _service(o: UnitOptions, *, once: bool) -> str:
    writable = [o.state] + [posixpath.dirname(o.metrics_file)] * bool(o.metrics_file) + [o.html_dir] * bool(o.html_dir)
    lines = [
        "[Unit]",
        f"Description=fleet watch: drift detection for the fleet in {_value(o.directory)}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=oneshot" if once else "Type=exec",
        f"User={o.user}",
        f"WorkingDirectory={_path(o.directory)}",
        # The webhook URLs (credentials) live here, not on the command line: `systemctl show`
        # prints ExecStart= to every local user.  "-": the file is optional (no notifications).
        f"EnvironmentFile=-{_path(o.environment_file)}",
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={exec_line(command(o, once=once))}",
    ]
    if not once:
        lines += [
            "Restart=on-failure",
            "RestartSec=30s",
            # SIGTERM ends it between cycles; a cycle (observing every host, then delivering with
            # bounded retries) ends well within this, after which systemd kills it.
            "KillSignal=SIGTERM",
            "TimeoutStopSec=5min",
        ]
    lines += [
        "UMask=0027",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",  # the user's ~/.ssh is read, never written
        "ReadWritePaths=" + " ".join(systemd_quote(p, command_line=False) for p in dict.fromkeys(writable)),
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ]
    if not once:
        lines += ["", "[Install]", "WantedBy=multi-user.target"]
    return "\n".join(lines) + "\n"


def _check(o: UnitOptions) -> None:
    for what, path in (("the fleet executable", o.fleet), ("the directory", o.directory),
                       ("the state directory", o.state), ("the metrics file", o.metrics_file),
                       ("the status page directory", o.html_dir), ("the environment file", o.environment_file)):
        if path and not posixpath.isabs(path):
            raise FleetError(f"{what} {printable(path)!r} must be an absolute path in a unit file",
                             hint="systemd runs the unit from / ; give the full path")
        systemd_quote(path)
    if any(c in o.fleet for c in "\"'\\"):
        raise FleetError(f"systemd refuses to run an executable whose path holds a quote or a backslash: "
                         f"{printable(o.fleet)!r}", hint="install fleet under a path without those characters")
    if not _USER.fullmatch(o.user):
        raise FleetError(f"{printable(o.user)!r} is not a user name systemd accepts", hint="e.g. --user fleet")
    if not (60 <= o.every <= 86400):
        raise FleetError(f"an interval of {o.every:g} seconds is outside 60 s … 1 day",
                         hint="observing the fleet more often than every minute costs every host an SSH session")
    for spec in o.notify:
        body = spec.split(":", 1)[1] if spec.split(":", 1)[0].lower() in ("discord", "slack", "webhook") else spec
        if not body.startswith("env:"):
            raise FleetError("a webhook URL on a unit's command line is readable by every local user "
                             "(`systemctl show`)",
                             hint=f"put it in {o.environment_file} as FLEET_WEBHOOK=… (mode 0600) and pass "
                                  "--notify env:FLEET_WEBHOOK")
    for a in (*o.extra_args, *o.watch_args):
        systemd_quote(a)


def _seconds(every: float) -> str:
    return f"{_number(every)}s"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _path(path: str) -> str:
    """A path as a one-path setting takes it (WorkingDirectory=, EnvironmentFile=): unquoted —
    systemd reads the rest of the line — with `%` doubled (a specifier there too)."""
    if path != path.strip():
        raise FleetError(f"{printable(path)!r} starts or ends with a space, which systemd would drop",
                         hint="use a path without leading or trailing spaces")
    return path.replace("%", "%%")


def _value(text: str) -> str:
    """A value in a free-text setting (Description=): `%` is a specifier there too."""
    return printable(text, multiline=False).replace("%", "%%")
