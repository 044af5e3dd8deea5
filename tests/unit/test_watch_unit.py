"""The systemd units for `fleet watch`: what they run, checked by systemd's own parser
(`systemd-analyze verify`), with every argument quoted so that systemd reads back exactly the
path that was given — and never a webhook URL on a command line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fleet.errors import FleetError
from fleet.watch.unit import SERVICE, TIMER, UnitOptions, command, service_unit, systemd_quote, timer_units

HOSTILE_DIR = "dir with space 100% $HOME"  # systemd refuses quotes and backslashes in an executable's path


def options(fleet: str = "/srv/fleet/.venv/bin/fleet", **kw: object) -> UnitOptions:
    base: dict[str, object] = {"fleet": fleet, "directory": "/srv/fleet", "metrics_file":
                               "/var/lib/prometheus/node-exporter/fleet.prom", "html_dir": "/var/www/fleet",
                               "notify": ("env:FLEET_WEBHOOK", "slack:env:FLEET_SLACK")}
    return UnitOptions(**{**base, **kw})  # type: ignore[arg-type]


def setting(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def verify(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package, which scripts/setup.sh brings)")
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return subprocess.run([analyze, "verify", *(str(d / n) for n in files)], capture_output=True, text=True,
                          timeout=120, cwd=d)  # hang guard


def fake_fleet(directory: Path) -> str:
    """An executable named fleet, for systemd-analyze to find (it checks ExecStart's program)."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "fleet"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return str(exe)


def test_the_service_runs_watch_every_interval_and_restarts_after_a_crash(tmp_path: Path) -> None:
    o = options(fake_fleet(tmp_path / "bin"), every=120)
    text = service_unit(o)
    [exec_start] = setting(text, "ExecStart")
    assert exec_start == (f"{o.fleet} --dir /srv/fleet --state-dir /srv/fleet/.fleet watch --every 120 "
                          "--notify env:FLEET_WEBHOOK --notify slack:env:FLEET_SLACK "
                          "--metrics-file /var/lib/prometheus/node-exporter/fleet.prom --html /var/www/fleet")
    assert setting(text, "Type") == ["exec"] and setting(text, "Restart") == ["on-failure"]
    assert setting(text, "KillSignal") == ["SIGTERM"] and setting(text, "WantedBy") == ["multi-user.target"]
    assert setting(text, "EnvironmentFile") == ["-/etc/fleet/watch.env"]
    assert setting(text, "ReadWritePaths") == ["/srv/fleet/.fleet /var/lib/prometheus/node-exporter /var/www/fleet"]
    assert setting(text, "ProtectSystem") == ["strict"] and setting(text, "User") == ["fleet"]
    done = verify(tmp_path, {SERVICE: text})
    assert done.returncode == 0, done.stderr


def test_the_timer_variant_runs_once_per_tick_and_never_overlaps(tmp_path: Path) -> None:
    o = options(fake_fleet(tmp_path / "bin"), every=600, extra_args=("--lab",))
    service, timer = timer_units(o)
    assert setting(service, "Type") == ["oneshot"] and "--once" in setting(service, "ExecStart")[0]
    assert "--every" not in service and "Restart=" not in service and "[Install]" not in service
    assert " --lab watch --once" in setting(service, "ExecStart")[0]
    assert setting(timer, "OnUnitInactiveSec") == ["600s"] and setting(timer, "Unit") == [SERVICE]
    assert setting(timer, "WantedBy") == ["timers.target"]
    done = verify(tmp_path, {SERVICE: service, TIMER: timer})
    assert done.returncode == 0, done.stderr


def test_a_path_with_spaces_quotes_and_specifiers_reaches_systemd_intact(tmp_path: Path) -> None:
    """systemd-analyze checks that ExecStart's program exists: it finds the hostile path only if
    systemd's own parser reads back exactly what was written."""
    exe = fake_fleet(tmp_path / HOSTILE_DIR)
    text = service_unit(options(exe, directory=str(tmp_path / f'{HOSTILE_DIR} "quoted" \\back')))
    done = verify(tmp_path, {SERVICE: text})
    assert done.returncode == 0, done.stderr
    # The check can fail: the same path written naively is not found.
    naive = text.replace(systemd_quote(exe, command_line=False), '"' + exe.replace("$", "$$") + '"', 1)
    assert naive != text
    bad = verify(tmp_path, {SERVICE: naive})
    assert bad.returncode != 0 and "fleet" in bad.stderr


@pytest.mark.parametrize("word, quoted", [
    ("/srv/fleet", "/srv/fleet"),
    ("a b", '"a b"'),
    ("100%", "100%%"),
    ("$HOME", '"$$HOME"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("", '""'),
])
def test_systemd_quoting(word: str, quoted: str) -> None:
    assert systemd_quote(word) == quoted
    assert systemd_quote("$HOME", command_line=False) == '"$HOME"'


@pytest.mark.parametrize("bad", [{"directory": "/srv/flee\nt"}, {"fleet": "/bin/fleet\x1b"},
                                 {"extra_args": ("--lab\n[Service]",)}, {"directory": "relative/path"},
                                 {"metrics_file": "fleet.prom"}, {"user": "Robert'); DROP"}, {"every": 5},
                                 {"every": 10 * 86400}, {"directory": "/srv/fleet "},
                                 {"fleet": "/home/o'brien/fleet"}, {"fleet": '/opt/"fleet"/bin/fleet'}])
def test_what_could_break_or_widen_the_unit_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(FleetError) as e:
        service_unit(options(**bad))
    assert e.value.hint and "\n" not in e.value.message


@pytest.mark.parametrize("spec", ["https://discord.com/api/webhooks/1/SecretToken",
                                  "slack:https://hooks.slack.com/services/SecretToken"])
def test_a_webhook_url_is_never_put_on_a_command_line(spec: str) -> None:
    with pytest.raises(FleetError) as e:
        timer_units(options(notify=(spec,)))
    assert "SecretToken" not in str(e.value) and "env:" in e.value.hint


def test_the_state_directory_defaults_to_the_checkouts_dot_fleet() -> None:
    argv = command(options(directory="/srv/fleet", state_dir=""), once=True)
    assert argv[argv.index("--state-dir") + 1] == "/srv/fleet/.fleet"
    argv = command(options(state_dir="/var/lib/fleet"), once=True)
    assert argv[argv.index("--state-dir") + 1] == "/var/lib/fleet"


def test_the_units_hold_no_credential() -> None:
    for text in (service_unit(options()), *timer_units(options())):
        assert "https://" not in text and "hooks." not in text
    assert os.path.basename(SERVICE) == "fleet-watch.service"
