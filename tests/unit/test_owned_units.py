"""Operator-owned unit text: `unit_file = { source = "units/NAME" }` (a file in the repository,
written byte for byte) or `directives = [[SECTION, KEY, VALUE], …]` (any directive, in order);
fleet never drops a directive it does not model, and still reads ExecStart, Environment,
EnvironmentFile, User and WorkingDirectory from the text where its rules need them."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FleetDir
from observed import REPO, bare, converged, edited, example
from simulate import simulate

from fleet import config, policy
from fleet.actions import Action, UnitFilePayload
from fleet.apply import check_contents
from fleet.collect.script import _TEXT_AWK
from fleet.errors import FleetError
from fleet.mastodon import SECRET_NAME_PATTERN
from fleet.model import Desired
from fleet.output.text import plan_text
from fleet.plan import build_plan, desired_hash
from fleet.textutil import sha256_hex
from fleet.units import mask_unit_text, render_unit

STOCK = REPO / "tests" / "fixtures" / "stock"
HOSTS = {"a.toml": 'address = "a.example.org"\n'}
WEB_TEXT = (STOCK / "units" / "mastodon-web.service").read_text()


def stock() -> Desired:
    loaded = config.load(STOCK / "desired_state.toml", STOCK / "hosts")
    assert loaded.desired is not None and not loaded.errors, loaded.findings
    return loaded.desired


def owned(make_fleet: Callable[..., FleetDir], unit_file: str, unit_text: str | bytes | None = WEB_TEXT,
          kind: str = "web") -> FleetDir:
    fd = make_fleet(f'[services.web]\nkind = "{kind}"\nunit = "mastodon-web.service"\nhosts = ["a"]\n\n'
                    f"[services.web.unit_file]\n{unit_file}\n", HOSTS)
    if unit_text is not None:
        (fd.root / "units").mkdir()
        fd.write("units/mastodon-web.service", unit_text)
    return fd


def loaded_web(fd: FleetDir) -> tuple[Desired, str]:
    loaded = fd.load()
    assert loaded.desired is not None and not loaded.errors, loaded.findings
    svc = loaded.desired.service("web")
    assert svc is not None
    return loaded.desired, render_unit(svc)


def test_a_source_file_is_written_byte_for_byte_and_read_for_what_fleet_needs(
        make_fleet: Callable[..., FleetDir]) -> None:
    d, text = loaded_web(owned(make_fleet, 'source = "units/mastodon-web.service"'))
    assert text == WEB_TEXT
    spec = d.services[0].unit_spec
    assert spec is not None and spec.source == "units/mastodon-web.service"
    assert spec.exec_start == "/home/mastodon/.rbenv/shims/bundle exec puma -C config/puma.rb"
    assert (spec.user, spec.working_directory) == ("mastodon", "/home/mastodon/live")
    assert spec.environment == (("RAILS_ENV", "production"), ("PORT", "3000"))


def test_every_hardening_directive_of_a_stock_unit_is_kept_in_order() -> None:
    svc = stock().service("web")
    assert svc is not None
    text = render_unit(svc)
    for line in ("ProtectSystem=strict", "PrivateTmp=true", "NoNewPrivileges=true", "TimeoutSec=15",
                 "RestrictAddressFamilies=AF_INET\nRestrictAddressFamilies=AF_INET6\n"
                 "RestrictAddressFamilies=AF_NETLINK\nRestrictAddressFamilies=AF_UNIX",
                 "SystemCallFilter=~@cpu-emulation", "CapabilityBoundingSet=\n"):
        assert line in text


def test_directives_render_in_order_with_repeated_keys(make_fleet: Callable[..., FleetDir]) -> None:
    d, text = loaded_web(owned(make_fleet, 'directives = [\n'
                                           '  ["Unit", "Description", "web on %H"],\n'
                                           '  ["Service", "ExecStart", "/usr/bin/web -p 3000"],\n'
                                           '  ["Service", "EnvironmentFile", "-/etc/web.env"],\n'
                                           '  ["Service", "RestrictAddressFamilies", "AF_INET"],\n'
                                           '  ["Service", "RestrictAddressFamilies", "AF_UNIX"],\n'
                                           '  ["Install", "WantedBy", "multi-user.target"],\n]', None))
    assert text == ("[Unit]\nDescription=web on %H\n\n[Service]\nExecStart=/usr/bin/web -p 3000\n"
                    "EnvironmentFile=-/etc/web.env\nRestrictAddressFamilies=AF_INET\nRestrictAddressFamilies=AF_UNIX\n"
                    "\n[Install]\nWantedBy=multi-user.target\n")
    spec = d.services[0].unit_spec
    assert spec is not None and spec.environment_files == ("/etc/web.env",)


def test_the_keyed_form_renders_exactly_as_before() -> None:
    svc = example().service("web")
    assert svc is not None and svc.unit_spec is not None and svc.unit_spec.text is None
    assert render_unit(svc).startswith("# Managed by fleet (service web). Local edits are overwritten")
    assert "Type=simple" in render_unit(svc)


@pytest.mark.parametrize("unit_file, text, code, key", [
    ('source = "units/mastodon-web.service"\nuser = "x"', WEB_TEXT, "config.bad-key", "services.web.unit_file.user"),
    ('source = "units/x.service"\ndirectives = []', WEB_TEXT, "config.bad-key", "services.web.unit_file"),
    ('source = "units/missing.service"', WEB_TEXT, "config.unreadable", "services.web.unit_file.source"),
    ('source = "../outside.service"', WEB_TEXT, "config.bad-value", "services.web.unit_file.source"),
    ('source = "/etc/systemd/system/x.service"', WEB_TEXT, "config.bad-value", "services.web.unit_file.source"),
    ('source = "units/mastodon-web.service"', b"[Service]\nExecStart=/bin/\xff\n", "config.encoding",
     "services.web.unit_file.source"),
    ('directives = [["Service", "ExecStart"]]', None, "config.wrong-type", "services.web.unit_file.directives"),
    ('directives = [["Service", "Exec Start", "/bin/a"]]', None, "config.bad-name",
     "services.web.unit_file.directives"),
    ('directives = [["Service", "ExecStart", "/bin/a\\nUser=root"]]', None, "config.bad-value",
     "services.web.unit_file.directives"),
    ('directives = [["Service", "ExecStart", "/bin/a 100%"]]', None, "config.bad-value",
     "services.web.unit_file.directives"),
])
def test_bad_operator_text_is_a_finding_naming_the_key(make_fleet: Callable[..., FleetDir], unit_file: str,
                                                       text: str | bytes | None, code: str, key: str) -> None:
    found = [f for f in owned(make_fleet, unit_file, text).check() if f.is_error and f.code.startswith("config.")]
    assert (found[0].code, found[0].key) == (code, key), found


def test_a_source_that_is_no_unit_file_is_a_finding_at_its_own_file_and_line(
        make_fleet: Callable[..., FleetDir]) -> None:
    fd = owned(make_fleet, 'source = "units/mastodon-web.service"', "[Unit]\nDescription=x\n\nthis is no unit\n")
    (f,) = [f for f in fd.check() if f.code == "config.unit-syntax"]
    assert (Path(f.file).name, f.line) == ("mastodon-web.service", 4)


def test_a_sidekiq_unit_of_the_operators_takes_c_and_q_from_its_exec_start(
        make_fleet: Callable[..., FleetDir]) -> None:
    text = WEB_TEXT.replace("puma -C config/puma.rb", "sidekiq -c 10 -q default,2 -q scheduler")
    fd = owned(make_fleet, 'source = "units/mastodon-web.service"', text, kind="sidekiq")
    d, _ = loaded_web(fd)
    sk = d.services[0].sidekiq
    assert sk is not None and (sk.concurrency, sk.queues, sk.queues_from_config) == (
        10, (("default", 2), ("scheduler", None)), False)
    fd2 = owned(make_fleet, 'source = "units/mastodon-web.service"', text, kind="sidekiq")
    fd2.edit('hosts = ["a"]', 'hosts = ["a"]\nconcurrency = 5')
    assert [f.code for f in fd2.check() if f.is_error and f.code.startswith("config.")] == ["config.bad-key"]
    not_sidekiq = [f.code for f in owned(make_fleet, 'source = "units/mastodon-web.service"', kind="sidekiq").check()
                   if f.is_error and f.code.startswith("config.")]
    assert not_sidekiq == ["config.bad-value"]


def test_a_secret_in_the_operators_environment_is_refused_and_masked_in_plans(
        make_fleet: Callable[..., FleetDir]) -> None:
    text = WEB_TEXT.replace('Environment="PORT=3000"', 'Environment="PORT=3000" "DB_PASS=hunter2"')
    fd = owned(make_fleet, 'source = "units/mastodon-web.service"', text)
    assert "env.secret-in-clear" in [f.code for f in fd.check()]
    d, _ = loaded_web(owned(make_fleet, 'source = "units/mastodon-web.service"'))
    c = converged(d, {})
    u = c["a"].unit("mastodon-web.service")
    assert u is not None and u.text is not None
    leaked = u.text.replace('Environment="PORT=3000"', 'Environment="PORT=3000" "DB_PASS=hunter2"')
    observed = {"a": dataclasses.replace(c["a"], units=(dataclasses.replace(u, text=leaked, file_hashes=(
        (u.fragment_path, "0" * 64),)),))}
    shown = plan_text(build_plan(d, observed, {}))
    assert "hunter2" not in shown and "DB_PASS=(sensitive, sha256:" in shown


# ---------------------------------------------------------------- the stock fleet


def test_the_stock_fleet_checks_clean_and_a_converged_one_plans_nothing() -> None:
    d = stock()
    found = config.load_checked(STOCK / "desired_state.toml", STOCK / "hosts", policy.check)[1]
    assert [f.code for f in found if f.is_error] == []
    assert build_plan(d, converged(d, {}), {}).changes == ()
    b = bare(d)
    assert build_plan(d, simulate(build_plan(d, b, {}), d, {}, b), {}).changes == ()


def test_a_hand_edited_hardened_unit_is_restored_byte_for_byte() -> None:
    d = stock()
    c = converged(d, {})
    observed = {**c, "freud": edited(c["freud"], "mastodon-sidekiq.service", "ProtectSystem=full")}
    plan = build_plan(d, observed, {})
    (write,) = [ch for ch in plan.changes if ch.action == Action.WRITE_UNIT]
    svc = d.service("sidekiq")
    assert svc is not None
    assert isinstance(write.payload, UnitFilePayload)
    assert write.payload.content_hash == sha256_hex((STOCK / "units" / "mastodon-sidekiq.service").read_bytes())
    assert "-ProtectSystem=full" in write.payload.diff
    assert [ch.id for ch in plan.changes] == ["freud:write-unit:mastodon-sidekiq.service",
                                              "freud:restart:mastodon-sidekiq.service", "freud:daemon-reload:systemd"]


def test_changing_the_source_file_changes_the_desired_hash_and_a_saved_plan_is_refused(tmp_path: Path) -> None:
    shutil.copytree(STOCK, tmp_path / "stock")
    d1 = config.load(tmp_path / "stock" / "desired_state.toml", tmp_path / "stock" / "hosts").desired
    assert d1 is not None
    plan = build_plan(d1, bare(d1), {})
    unit = tmp_path / "stock" / "units" / "mastodon-web.service"
    unit.write_text(unit.read_text().replace("TimeoutSec=15", "TimeoutSec=30"))
    d2 = config.load(tmp_path / "stock" / "desired_state.toml", tmp_path / "stock" / "hosts").desired
    assert d2 is not None and desired_hash(d2) != desired_hash(d1)
    with pytest.raises(FleetError, match="mastodon-web.service would differ from the plan"):
        check_contents(plan, d2, {})


CONTINUED = ('[Service]\nEnvironment="A=1" \\\n  "DB_PASS=hunter2" \\\n# a comment inside\n  "B=2"\n'
             'Environment=SECRET_KEY_BASE=abc\nExecStart=/bin/x\n')


def test_a_secret_in_a_continued_environment_line_is_masked_in_plans() -> None:
    shown = mask_unit_text(CONTINUED)
    assert "hunter2" not in shown and "abc" not in shown
    assert '  "DB_PASS=(sensitive, sha256:' in shown and '"A=1" \\' in shown and "ExecStart=/bin/x" in shown


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk to run the collection's text dump")
def test_the_host_masks_a_secret_in_a_continued_environment_line_before_it_leaves(tmp_path: Path) -> None:
    unit = tmp_path / "x.service"
    unit.write_text(CONTINUED)
    show = f"Id=x.service\nFragmentPath={unit}\nDropInPaths=\n"
    done = subprocess.run(["awk", "-v", "m= x.service ", "-v", "maxl=100", "-v", f"secret_re={SECRET_NAME_PATTERN}",
                           _TEXT_AWK], input=show + "\n", capture_output=True, text=True, timeout=30, check=True)
    assert "hunter2" not in done.stdout and "abc" not in done.stdout
    assert '|  "DB_PASS=(masked-on-host)" \\' in done.stdout and '|  "B=2"' in done.stdout
