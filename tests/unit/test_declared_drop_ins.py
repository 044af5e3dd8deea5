"""Declared drop-ins (`[services.NAME.dropins]`): validated like unit files, written byte for byte
when missing or different, undeclared ones in the unit's directory removed — only when the service
declares its drop-ins — each followed by a daemon-reload and the restart of what runs from the unit."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import FleetDir
from observed import REPO, converged, with_drop_in

from fleet.actions import Action, UnitFilePayload
from fleet.audit import build_audit
from fleet.model import Desired, HostState
from fleet.plan import build_plan, plan_from_json
from fleet.resources.drop_ins import DropIn
from fleet.resources.registry import owner
from fleet.status import build_status
from fleet.textutil import sha256_hex

STOCK = REPO / "tests" / "fixtures" / "stock"
WEB = "mastodon-web.service"
DIR = f"/etc/systemd/system/{WEB}.d"
WEB_TEXT = (STOCK / "units" / WEB).read_text()
LIMITS = "[Service]\nLimitNOFILE=131072\n"
STREAM = "mastodon-streaming@.service"


def web_fleet(make_fleet: Callable[..., FleetDir], dropins: str | None = '"10-limits.conf" = "units/10-limits.conf"',
              observe_only: bool = False) -> FleetDir:
    unit = 'observe_only = true\n' if observe_only else '\n[services.web.unit_file]\nsource = "units/web"\n'
    table = f"\n[services.web.dropins]\n{dropins}\n" if dropins is not None else ""
    fd = make_fleet(f'[services.web]\nkind = "web"\nunit = "{WEB}"\nhosts = ["a"]\n{unit}{table}',
                    {"a.toml": 'address = "a.example.org"\n'})
    (fd.root / "units").mkdir()
    fd.write("units/web", WEB_TEXT)
    fd.write("units/10-limits.conf", LIMITS)
    return fd


def loaded(fd: FleetDir) -> Desired:
    result = fd.load()
    assert result.desired is not None and not result.errors, result.findings
    return result.desired


def on_host(d: Desired, *found: DropIn, host: str = "a") -> dict[str, HostState]:
    """The converged fleet, with these files in the drop-in directories of `host`."""
    c = dict(converged(d, {}))
    c[host] = dataclasses.replace(c[host], extra=(("dropins", tuple(sorted(found))),))
    return c


def drop_in(name: str, text: str, unit: str = WEB) -> DropIn:
    return DropIn(unit, f"/etc/systemd/system/{unit}.d/{name}", sha256_hex(text))


# ---------------------------------------------------------------- check


def config_errors(fd: FleetDir) -> list[Any]:
    """The errors about the files themselves (a lone web service also draws Mastodon's queue rules)."""
    return [f for f in fd.check() if f.is_error and f.code.startswith("config.")]


def test_a_declared_drop_in_is_the_repository_files_text_byte_for_byte(make_fleet: Callable[..., FleetDir]) -> None:
    svc = loaded(web_fleet(make_fleet)).service("web")
    assert svc is not None and svc.dropins is not None
    assert [(d.name, d.text, d.source) for d in svc.dropins] == [("10-limits.conf", LIMITS, "units/10-limits.conf")]
    none = loaded(web_fleet(make_fleet, dropins=None)).service("web")
    empty = loaded(web_fleet(make_fleet, dropins="")).service("web")
    assert none is not None and none.dropins is None  # declares none: owns none
    assert empty is not None and empty.dropins == ()  # declares that there are none: owns the directory


@pytest.mark.parametrize(("entry", "code", "key"), [
    ('"../10-limits.conf" = "units/10-limits.conf"', "config.bad-name", 'services.web.dropins."../10-limits.conf"'),
    ('"a/b.conf" = "units/10-limits.conf"', "config.bad-name", 'services.web.dropins."a/b.conf"'),
    ('"limits.txt" = "units/10-limits.conf"', "config.bad-name", 'services.web.dropins."limits.txt"'),
    ('".conf" = "units/10-limits.conf"', "config.bad-name", 'services.web.dropins.".conf"'),
    ('"x.conf" = 3', "config.wrong-type", 'services.web.dropins."x.conf"'),
    ('"x.conf" = "units/nothing.conf"', "config.unreadable", 'services.web.dropins."x.conf"'),
    ('"x.conf" = "../10-limits.conf"', "config.bad-value", 'services.web.dropins."x.conf"'),
    ('"x.conf" = "/etc/passwd"', "config.bad-value", 'services.web.dropins."x.conf"'),
])
def test_a_bad_drop_in_is_one_error_naming_the_key(make_fleet: Callable[..., FleetDir], entry: str, code: str,
                                                   key: str) -> None:
    errors = config_errors(web_fleet(make_fleet, dropins=entry))
    assert [(f.code, f.key) for f in errors] == [(code, key)], errors
    assert "\n" not in errors[0].message and errors[0].hint


def test_a_drop_in_that_is_no_unit_file_is_an_error_at_its_own_file_and_line(
        make_fleet: Callable[..., FleetDir]) -> None:
    fd = web_fleet(make_fleet)
    fd.write("units/10-limits.conf", "[Service]\nthis is no directive\n")
    (f,) = config_errors(fd)
    assert (f.code, f.file.endswith("units/10-limits.conf"), f.line) == ("config.unit-syntax", True, 2)


def test_drop_ins_of_an_observe_only_unit_are_refused(make_fleet: Callable[..., FleetDir]) -> None:
    errors = config_errors(web_fleet(make_fleet, observe_only=True))
    assert [(f.code, f.key) for f in errors] == [("config.bad-key", "services.web.dropins")]


# ---------------------------------------------------------------- diff


def test_a_missing_declared_drop_in_is_written_then_systemd_reloads_then_the_unit_restarts(
        make_fleet: Callable[..., FleetDir]) -> None:
    d = loaded(web_fleet(make_fleet))
    plan = build_plan(d, on_host(d), {})
    assert [c.id for c in plan.changes] == [f"a:write-drop-in:{DIR}/10-limits.conf", f"a:restart:{WEB}",
                                            "a:daemon-reload:systemd"]
    write = plan.changes[0]
    assert isinstance(write.payload, UnitFilePayload) and write.payload.content_hash == sha256_hex(LIMITS)
    assert write.before == "absent" and "+LimitNOFILE=131072" in write.payload.diff
    wave = {cid: i for i, ids in enumerate(plan.waves) for cid in ids}
    assert wave[write.id] < wave["a:daemon-reload:systemd"] < wave[f"a:restart:{WEB}"]


def test_a_declared_drop_in_as_declared_plans_nothing_and_one_that_differs_is_rewritten(
        make_fleet: Callable[..., FleetDir]) -> None:
    d = loaded(web_fleet(make_fleet))
    assert build_plan(d, on_host(d, drop_in("10-limits.conf", LIMITS)), {}).changes == ()
    changed = build_plan(d, on_host(d, drop_in("10-limits.conf", "[Service]\nLimitNOFILE=1024\n")), {})
    assert [c.id for c in changed.changes][:1] == [f"a:write-drop-in:{DIR}/10-limits.conf"]
    assert changed.changes[0].before == "sha256:" + sha256_hex("[Service]\nLimitNOFILE=1024\n")[:8]


def test_a_loaded_declared_drop_in_does_not_make_the_unit_file_differ(make_fleet: Callable[..., FleetDir]) -> None:
    d = loaded(web_fleet(make_fleet))
    c = on_host(d, drop_in("10-limits.conf", LIMITS))
    c["a"] = with_drop_in(c["a"], WEB, "10-limits.conf", LIMITS)  # systemd loads it too (DropInPaths)
    assert build_plan(d, c, {}).changes == ()


def test_an_undeclared_drop_in_is_removed_only_when_the_service_declares_its_drop_ins(
        make_fleet: Callable[..., FleetDir]) -> None:
    stray = drop_in("override.conf", "[Service]\nNice=5\n")
    d = loaded(web_fleet(make_fleet))
    plan = build_plan(d, on_host(d, drop_in("10-limits.conf", LIMITS), stray), {})
    assert [c.id for c in plan.changes] == [f"a:remove-drop-in:{DIR}/override.conf", f"a:restart:{WEB}",
                                            "a:daemon-reload:systemd"]
    nothing = loaded(web_fleet(make_fleet, dropins=None))
    assert build_plan(nothing, on_host(nothing, stray), {}).changes == ()  # owns none: never removed
    owns_all = loaded(web_fleet(make_fleet, dropins=""))
    assert [c.action for c in build_plan(owns_all, on_host(owns_all, stray), {}).changes][:1] == [
        Action.REMOVE_DROPIN]


def test_a_hostile_path_or_name_from_the_host_is_never_acted_on(make_fleet: Callable[..., FleetDir]) -> None:
    d = loaded(web_fleet(make_fleet))
    outside = DropIn(WEB, f"/etc/systemd/system/x/../{WEB}.d/evil.conf", "a" * 64)
    odd = DropIn(WEB, f"{DIR}/odd\nname.conf", "b" * 64)
    plan = build_plan(d, on_host(d, drop_in("10-limits.conf", LIMITS), outside, odd), {})
    assert plan.changes == ()
    assert any("odd\\nname.conf" in p and "by hand" in p for p in plan.problems), plan.problems


def test_a_template_declares_the_drop_ins_every_instance_loads_and_each_restarts() -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from fleet import config
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "stock"
        shutil.copytree(STOCK, root)
        (root / "units" / "limits.conf").write_text(LIMITS)
        text = (root / "desired_state.toml").read_text()
        (root / "desired_state.toml").write_text(text + '\n[services.streaming.dropins]\n"10-limits.conf" = '
                                                 '"units/limits.conf"\n')
        result = config.load(root / "desired_state.toml", root / "hosts")
    d = result.desired
    assert d is not None and not result.errors, result.findings
    svc = d.service("streaming")
    assert svc is not None and svc.unit == STREAM
    host = svc.hosts[0]
    plan = build_plan(d, on_host(d, host=host), {})
    ids = [c.id for c in plan.changes]
    assert ids[0] == f"{host}:write-drop-in:/etc/systemd/system/{STREAM}.d/10-limits.conf"
    assert [i for i in ids if ":restart:" in i] == [f"{host}:restart:{u}" for u in svc.units_on(host)]


# ---------------------------------------------------------------- status, audit, plan file


def test_an_undeclared_or_different_drop_in_is_drift_in_status_and_an_error_in_audit(
        make_fleet: Callable[..., FleetDir]) -> None:
    d = loaded(web_fleet(make_fleet))
    fleet = on_host(d, drop_in("10-limits.conf", "[Service]\n"), drop_in("override.conf", "x"))
    (row,) = [r for r in build_status(d, fleet).rows if r.unit == WEB]
    (cell,) = row.cells
    assert cell.status == "drift"
    assert [p.code for p in cell.problems] == ["drop-in.differs", "drop-in.undeclared"]
    codes = [f.code for f in build_audit(d, fleet).errors]
    assert "drop-in.differs" in codes and "drop-in.undeclared" in codes
    converged_ = on_host(d, drop_in("10-limits.conf", LIMITS))
    (ok,) = [r for r in build_status(d, converged_).rows if r.unit == WEB][0].cells
    assert ok.status == "ok"


def test_a_saved_plan_round_trips_and_a_target_outside_a_drop_in_directory_is_refused(
        make_fleet: Callable[..., FleetDir]) -> None:
    d = loaded(web_fleet(make_fleet))
    plan = build_plan(d, on_host(d, drop_in("10-limits.conf", LIMITS), drop_in("override.conf", "x")), {})
    again = plan_from_json(plan.to_json())
    assert [c.id for c in again.changes] == [c.id for c in plan.changes]
    for c in again.changes:
        assert owner(c.action).problem(c) is None
    document = json.loads(plan.to_json())
    for target in ("/etc/shadow", f"{DIR}/../../../etc/shadow.conf", f"{DIR}/x.txt", "/run/systemd/system/a.d/x.conf"):
        bad = dataclasses.replace(again.changes[0], target=target)
        assert owner(bad.action).problem(bad), target
    assert document["changes"][0][1] == "remove-drop-in"  # plan file format 2: one row per change
