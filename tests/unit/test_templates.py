"""Template units and their instances (`unit = "x@.service"`, `instances = [...]`, a wrapper): one
status cell per instance, a failed or missing one is (!) and an audit error, plans start, restart
(rolling across instances) and prune instances, and what the operator writes (`%i`) survives."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from conftest import FleetDir
from observed import (
    EXAMPLE_SECRETS,
    bare,
    converged,
    edited,
    example,
    failed,
    hand_made_unit,
    set_env_value,
    with_unit,
    without_unit,
)
from simulate import simulate

from fleet.actions import Action, PrunePayload
from fleet.audit import build_audit
from fleet.collect.script import spec_for
from fleet.diff import diff
from fleet.model import Desired, Finding, HostResult, Service
from fleet.output.text import status_text
from fleet.plan import build_plan
from fleet.status import build_status
from fleet.units import render_unit

HOSTS = {"a.toml": 'address = "a.example.org"\n', "b.toml": 'address = "b.example.org"\n'}
STREAMING = """
[[discover]]
pattern = "mastodon-*"
prune = true

[services.streaming]
kind = "streaming"
unit = "mastodon-streaming@.service"
hosts = ["a", "b"]
instances = ["4000", "4001"]
max_unavailable = 1
health = { http = "http://127.0.0.1:%i/api/v1/streaming/health" }

[services.streaming.unit_file]
description = "mastodon-streaming on port %I"
user = "mastodon"
environment = { PORT = "%i", NOTE = "100% node" }
exec_start = "/usr/bin/node ./streaming"

[services.streaming.overrides.b]
instances = ["4000", "4001", "4002"]

[services.streaming.wrapper]
unit = "mastodon-streaming.service"
directives = [
  ["Unit", "Description", "mastodon-streaming"],
  ["Service", "Type", "oneshot"],
  ["Service", "ExecStart", "/bin/true"],
  ["Service", "RemainAfterExit", "yes"],
  ["Install", "WantedBy", "multi-user.target"],
]
"""
A4000, A4001, B4002 = ("mastodon-streaming@4000.service", "mastodon-streaming@4001.service",
                       "mastodon-streaming@4002.service")
WRAPPER = "mastodon-streaming.service"


@pytest.fixture
def fleet(make_fleet: Callable[..., FleetDir]) -> Desired:
    loaded = make_fleet(STREAMING, HOSTS).load()
    assert loaded.desired is not None and not loaded.errors, loaded.findings
    return loaded.desired


def streaming(d: Desired) -> Service:
    s = d.service("streaming")
    assert s is not None
    return s


# ---------------------------------------------------------------- declaring


def test_a_template_has_its_instances_per_host_and_its_wrapper(fleet: Desired) -> None:
    s = streaming(fleet)
    assert s.units_on("a") == (A4000, A4001) and s.units_on("b") == (A4000, A4001, B4002)
    assert s.all_units_on("a") == (A4000, A4001, WRAPPER)
    assert s.health_for(A4001) is not None and s.health_for(A4001).http == \
        "http://127.0.0.1:4001/api/v1/streaming/health"  # type: ignore[union-attr]
    assert s.health_for(WRAPPER) is None


def test_check_refuses_starting_a_bare_template(make_fleet: Callable[..., FleetDir]) -> None:
    fd = make_fleet('[services.s]\nkind = "streaming"\nunit = "mastodon-streaming@.service"\nhosts = ["a"]\n'
                    'observe_only = true\n', HOSTS)
    errors = [f for f in fd.check() if f.is_error and not f.code.startswith("sidekiq.")]  # this fleet has none
    assert [f.code for f in errors] == ["config.bare-template"]
    assert "template" in errors[0].message and "instances" in errors[0].hint
    assert errors[0].key == "services.s.unit"


@pytest.mark.parametrize("instances, code", [
    ("[]", "config.bare-template"),
    ('["4000", "40 01"]', "config.bad-name"),
    ('["4000", "4000"]', "config.duplicate"),
    ('["4000", "../x"]', "config.bad-name"),
])
def test_instances_are_checked(make_fleet: Callable[..., FleetDir], instances: str, code: str) -> None:
    text = STREAMING.replace('instances = ["4000", "4001"]\n', f"instances = {instances}\n")
    found = [f for f in make_fleet(text, HOSTS).check() if f.is_error and not f.code.startswith("sidekiq.")]
    assert [(f.code, f.key) for f in found] == [(code, "services.streaming.instances")]


@pytest.mark.parametrize("old, new, code", [
    ('unit = "mastodon-streaming@.service"', 'unit = "mastodon-streaming.service"', "config.bad-key"),
    ('[services.streaming.overrides.b]', '[services.streaming.overrides.c]', "config.unknown-host"),
    ('unit = "mastodon-streaming.service"\ndirectives', 'unit = "other@.service"\ndirectives', "config.bad-value"),
    ('unit = "mastodon-streaming.service"\ndirectives', 'directives', "config.missing-key"),
])
def test_misplaced_template_keys_are_errors(make_fleet: Callable[..., FleetDir], old: str, new: str,
                                            code: str) -> None:
    assert old in STREAMING
    found = [f.code for f in make_fleet(STREAMING.replace(old, new), HOSTS).check() if f.is_error]
    assert code in found, found


def test_two_services_claiming_one_instance_on_a_host_is_an_error(make_fleet: Callable[..., FleetDir]) -> None:
    text = STREAMING + ('\n[services.other]\nkind = "generic"\nunit = "mastodon-streaming@4001.service"\n'
                        'hosts = ["a"]\nobserve_only = true\n')
    found = [f for f in make_fleet(text, HOSTS).check() if f.code == "config.duplicate-unit"]
    assert found and A4001 in found[0].message


def test_specifiers_the_operator_writes_survive_rendering_and_a_lone_percent_stays_literal(fleet: Desired) -> None:
    text = render_unit(streaming(fleet)).splitlines()
    assert "Description=mastodon-streaming on port %I" in text
    assert 'Environment="PORT=%i"' in text
    assert 'Environment="NOTE=100%% node"' in text


def test_the_collector_shows_every_instance_and_looks_for_undeclared_ones(fleet: Desired) -> None:
    spec = spec_for(fleet, "b")
    assert spec.units == (A4000, A4001, B4002, WRAPPER)
    assert "mastodon-streaming@*.service" in spec.patterns
    assert spec.of("dropins") == tuple(f"/etc/systemd/system/{u}.d" for u in (
        "mastodon-streaming@.service", A4000, A4001, B4002, WRAPPER))


# ---------------------------------------------------------------- status and audit


def unit_errors(d: Desired, observed: dict[str, HostResult]) -> list[Finding]:
    """The audit's errors but the queue rules' (these fleets run no Sidekiq)."""
    return [f for f in build_audit(d, observed).errors if not f.code.startswith("sidekiq.")]


def test_status_has_one_row_per_instance_and_the_wrapper(fleet: Desired) -> None:
    report = build_status(fleet, converged(fleet, {}))
    rows = {r.unit: r for r in report.rows}
    assert list(rows) == [A4000, A4001, B4002, WRAPPER]
    assert rows[B4002].declared_hosts == ("b",)
    assert [c.status for c in rows[B4002].cells] == ["absent", "ok"]
    assert all(c.status == "ok" for r in rows.values() if r.unit != B4002 for c in r.cells)
    assert [c.state for c in rows[WRAPPER].cells] == ["active/exited", "active/exited"]


def test_a_failed_instance_is_drift_in_status_and_an_error_in_audit(fleet: Desired) -> None:
    c = converged(fleet, {})
    observed = {**c, "a": failed(c["a"], A4001)}
    report = build_status(fleet, observed)
    (row,) = [r for r in report.rows if r.unit == A4001]
    cell = row.cells[0]
    assert (cell.status, cell.state, cell.detail) == ("drift", "failed/failed", "should be active/running")
    assert "failed/failed (!)" in status_text(report, now=0)
    errors = unit_errors(fleet, observed)
    assert [(f.code, f.host) for f in errors] == [("unit.down", "a")] and A4001 in errors[0].message


def test_a_missing_instance_is_drift_and_an_audit_error(fleet: Desired) -> None:
    c = converged(fleet, {})
    observed = {**c, "b": without_unit(c["b"], B4002)}
    (row,) = [r for r in build_status(fleet, observed).rows if r.unit == B4002]
    assert (row.cells[1].status, row.cells[1].state) == ("drift", "missing")
    assert [f.code for f in unit_errors(fleet, observed)] == ["unit.down"]


def test_an_undeclared_instance_of_a_declared_unit_is_shown_and_pruned_not_hidden() -> None:
    d = example()  # declares mastodon-streaming.service (a plain unit) on fritz, and prunes mastodon-*
    c = converged(d, EXAMPLE_SECRETS)
    extra = hand_made_unit("mastodon-streaming@4002.service", "/usr/bin/node ./streaming")
    observed = {**c, "fritz": with_unit(c["fritz"], extra)}
    rows = {r.unit: r for r in build_status(d, observed).rows}
    assert rows["mastodon-streaming@4002.service"].service is None
    assert [c.status for c in rows["mastodon-streaming@4002.service"].cells if c.host == "fritz"] == ["unmanaged"]
    got = diff(d, observed, EXAMPLE_SECRETS).changes
    assert [(ch.host, ch.action, ch.target) for ch in got] == [
        ("fritz", Action.PRUNE, "mastodon-streaming@4002.service")]


def test_a_distro_parents_instances_stay_part_of_it() -> None:
    d = example()  # postgresql.service, observe-only, on nietzsche
    c = converged(d, EXAMPLE_SECRETS)
    inst = dataclasses.replace(hand_made_unit("postgresql@15-main.service", "/usr/lib/postgresql/15/bin/postgres"),
                               fragment_path="/lib/systemd/system/postgresql@.service")
    observed = {**c, "nietzsche": with_unit(c["nietzsche"], inst)}
    assert "postgresql@15-main.service" not in {r.unit for r in build_status(d, observed).rows}


# ---------------------------------------------------------------- plans


def test_a_bare_fleet_plans_the_template_each_instance_and_the_wrapper_and_converges(fleet: Desired) -> None:
    b = bare(fleet)
    plan = build_plan(fleet, b, {})
    ids = [c.id for c in plan.changes if c.host == "b"]
    assert ids == ["b:write-unit:mastodon-streaming@.service", "b:write-unit:mastodon-streaming.service",
                   f"b:enable:{A4000}", f"b:start:{A4000}", f"b:enable:{A4001}", f"b:start:{A4001}",
                   f"b:enable:{B4002}", f"b:start:{B4002}", f"b:enable:{WRAPPER}", f"b:start:{WRAPPER}",
                   "b:daemon-reload:systemd"]
    after = simulate(plan, fleet, {}, b)
    assert build_plan(fleet, after, {}).changes == ()
    assert build_plan(fleet, converged(fleet, {}), {}).changes == ()


def test_a_failed_instance_is_started_again(fleet: Desired) -> None:
    c = converged(fleet, {})
    got = diff(fleet, {**c, "a": failed(c["a"], A4001)}, {}).changes
    assert [(ch.action, ch.target) for ch in got] == [(Action.START, A4001)]


def test_a_changed_template_restarts_every_instance_one_at_a_time_by_max_unavailable(fleet: Desired) -> None:
    c = converged(fleet, {})
    observed = {h: edited(c[h], A4000) for h in ("a", "b")}
    observed = {h: dataclasses.replace(s, units=tuple(dataclasses.replace(u, file_hashes=s.unit(A4000).file_hashes,
                                                                          text=s.unit(A4000).text)
                                                      if u.unit.startswith("mastodon-streaming@") else u
                                                      for u in s.units))
                for h, s in observed.items()}  # every instance reads the one edited template file
    plan = build_plan(fleet, observed, {})
    restarts = [c.id for c in plan.changes if c.action == Action.RESTART]
    assert restarts == [f"a:restart:{A4000}", f"a:restart:{A4001}", f"b:restart:{A4000}", f"b:restart:{A4001}",
                        f"b:restart:{B4002}"]
    wave = {cid: i for i, w in enumerate(plan.waves) for cid in w}
    assert sorted(wave[r] for r in restarts) == list(range(min(wave[r] for r in restarts),
                                                           min(wave[r] for r in restarts) + 5))
    assert not any(c.action == Action.RESTART and c.target == WRAPPER for c in plan.changes)  # never the wrapper
    simulate(plan, fleet, {}, observed)


def test_max_unavailable_two_restarts_two_instances_at_a_time(make_fleet: Callable[..., FleetDir]) -> None:
    loaded = make_fleet(STREAMING.replace("max_unavailable = 1", "max_unavailable = 2"), HOSTS).load()
    d = loaded.desired
    assert d is not None
    c = converged(d, {})
    observed = {**c, "b": edited(c["b"], A4000)}
    observed["b"] = dataclasses.replace(observed["b"], units=tuple(
        dataclasses.replace(u, file_hashes=observed["b"].unit(A4000).file_hashes)  # type: ignore[union-attr]
        if u.unit.startswith("mastodon-streaming@") else u for u in observed["b"].units))
    plan = build_plan(d, observed, {})
    restarts = [c.id for c in plan.changes if c.action == Action.RESTART]
    wave = {cid: i for i, w in enumerate(plan.waves) for cid in w}
    assert [wave[r] for r in restarts] == [wave[restarts[0]]] * 2 + [wave[restarts[0]] + 1]


def test_pruning_an_undeclared_instance_never_removes_the_template_the_declared_ones_load(fleet: Desired) -> None:
    c = converged(fleet, {})
    template = "/etc/systemd/system/mastodon-streaming@.service"
    extra = dataclasses.replace(c["a"].unit(A4000), unit="mastodon-streaming@4009.service",  # type: ignore[arg-type]
                                drop_in_paths=(f"{template}.d/all.conf",
                                               "/etc/systemd/system/mastodon-streaming@4009.service.d/own.conf"))
    got = diff(fleet, {**c, "a": with_unit(c["a"], extra)}, {}).changes
    (prune,) = got
    assert prune.action == Action.PRUNE and prune.target == "mastodon-streaming@4009.service"
    assert isinstance(prune.payload, PrunePayload)
    assert prune.payload.steps == ("stop", "disable")
    assert template not in prune.payload.remove_files and f"{template}.d/all.conf" not in prune.payload.remove_files


def test_instances_restart_after_the_env_file_they_load_is_written(make_fleet: Callable[..., FleetDir]) -> None:
    text = STREAMING.replace('exec_start = "/usr/bin/node ./streaming"',
                             'exec_start = "/usr/bin/node ./streaming"\nenvironment_files = ["/etc/m.env"]')
    text += '\n[env_files.m]\npath = "/etc/m.env"\nservices = ["streaming"]\nvalues = { LOCAL_DOMAIN = "a.example" }\n'
    d = make_fleet(text, HOSTS).load().desired
    assert d is not None
    c = converged(d, {})
    observed = {**c, "a": set_env_value(c["a"], "LOCAL_DOMAIN", "old.example", path="/etc/m.env")}
    plan = build_plan(d, observed, {})
    assert [ch.id for ch in plan.changes] == ["a:write-env:/etc/m.env", f"a:restart:{A4000}", f"a:restart:{A4001}"]
    for unit in (A4000, A4001):
        assert "a:write-env:/etc/m.env" in plan.deps[f"a:restart:{unit}"]
    simulate(plan, d, {}, observed)
