"""build_status: what runs where, one row per declared service and per undeclared unit found
by discovery, one cell per host; plus which Sidekiq process serves which queue."""

from __future__ import annotations

import dataclasses
import re

import pytest
from observed import (
    EXAMPLE_SECRETS,
    change_unit,
    converged,
    disabled,
    distro_unit,
    edited,
    example,
    set_env_value,
    stopped,
    undeclared_sidekiq,
    unit_of,
    unreachable,
    with_drop_in,
    with_unit,
    without_unit,
)

from fleet import status as status_module
from fleet.model import HostResult, HostState, Service
from fleet.output.json import status_json
from fleet.output.text import cell_text, hosts_text, sidekiq_text, status_text
from fleet.resources.base import Problem, Resource
from fleet.status import (
    ABSENT,
    DRIFT,
    OK,
    PRESENT,
    UNKNOWN,
    UNMANAGED,
    Cell,
    Row,
    StatusReport,
    build_status,
)

S = EXAMPLE_SECRETS
BUNDLE = ("/home/mastodon/.rbenv/shims/bundle", "exec", "sidekiq")


@pytest.fixture
def fleet() -> dict[str, HostState]:
    return converged(example(), S)


def status(observed: dict[str, HostState] | dict[str, HostResult]) -> StatusReport:
    return build_status(example(), dict(observed))


def row(report: StatusReport, unit: str) -> Row:
    return next(r for r in report.rows if r.unit == unit)


def cell(report: StatusReport, unit: str, host: str) -> Cell:
    return next(c for c in row(report, unit).cells if c.host == host)


def test_a_converged_fleet_is_ok_wherever_a_service_is_declared_and_absent_elsewhere(
        fleet: dict[str, HostState]) -> None:
    report = status(fleet)
    assert report.hosts == ("franz", "freud", "fritz", "nietzsche")
    assert [r.service for r in report.rows] == [s.name for s in example().services]
    for r in report.rows:
        for c in r.cells:
            assert c.status == (OK if c.host in r.declared_hosts else ABSENT), (r.unit, c)
    assert report.unreachable == ()


def test_a_converged_fleet_serves_every_queue_with_declared_processes_and_no_findings(
        fleet: dict[str, HostState]) -> None:
    report = status(fleet)
    assert {(p.host, p.unit) for p in report.sidekiq} == {
        ("freud", "mastodon-sidekiq-default.service"), ("freud", "mastodon-sidekiq-push-pull.service"),
        ("nietzsche", "mastodon-sidekiq-push-pull.service"), ("nietzsche", "mastodon-sidekiq-scheduler.service")}
    assert all(p.declared for p in report.sidekiq)
    default = next(p for p in report.sidekiq if p.unit == "mastodon-sidekiq-default.service")
    assert (default.concurrency, default.queues, default.db_pool) == (
        25, (("default", 8), ("ingress", 6), ("mailers", 2)), 25)
    assert report.queue_findings == ()


def test_an_undeclared_sidekiq_on_the_cdn_node_is_an_unmanaged_row_and_process(fleet: dict[str, HostState]) -> None:
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    report = status(fleet)
    r = row(report, "mastodon-sidekiq.service")
    assert (r.service, r.kind, r.declared_hosts) == (None, "", ())
    assert cell(report, "mastodon-sidekiq.service", "franz").status == UNMANAGED
    assert cell(report, "mastodon-sidekiq.service", "franz").state == "active/running"
    assert {c.status for c in r.cells if c.host != "franz"} == {ABSENT}
    (proc,) = [p for p in report.sidekiq if p.host == "franz"]
    assert (proc.unit, proc.declared, proc.concurrency, proc.queues) == (
        "mastodon-sidekiq.service", False, 10, (("default", None),))


def test_each_host_gets_its_own_sidekiq_command_line_read_when_hosts_share_a_unit_name(
        fleet: dict[str, HostState]) -> None:
    # status reads each distinct command line once: a host must still get its own line's answer
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq(args="-c 10 -q default"))
    fleet["fritz"] = with_unit(fleet["fritz"], undeclared_sidekiq(args="-c 3 -q push,2 -q pull"))
    fleet["freud"] = with_unit(fleet["freud"], undeclared_sidekiq(args="-c 10 -q default"))
    fleet["nietzsche"] = with_unit(fleet["nietzsche"], undeclared_sidekiq(args="-q mailers"))
    report = status(fleet)
    assert {p.host: (p.concurrency, p.queues) for p in report.sidekiq if p.unit == "mastodon-sidekiq.service"} == {
        "franz": (10, (("default", None),)), "freud": (10, (("default", None),)),
        "fritz": (3, (("push", 2), ("pull", None))), "nietzsche": (None, (("mailers", None),))}


def test_the_queue_table_names_each_process_once_per_queue_it_serves(fleet: dict[str, HostState]) -> None:
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq(args="-q default -q fasp -q default,3"))
    report = status(fleet)
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in sidekiq_text(report).splitlines()
             if line.split(None, 1)[:1] in (["default"], ["fasp"], ["push"])}
    for q in ("default", "fasp", "push"):  # in the order of the processes, each process once
        assert lines[q].split(", ") == [f"{p.host}:{p.unit}" for p in report.sidekiq
                                        if any(n == q for n, _ in p.queues)]
    assert lines["default"].count("franz:") == 1 and lines["fasp"].count("franz:") == 1
    assert "franz:" not in lines["push"]


def test_a_declared_service_running_on_a_host_it_is_not_declared_for_is_unmanaged_there(
        fleet: dict[str, HostState]) -> None:
    fleet["franz"] = with_unit(fleet["franz"], unit_of(fleet["freud"], "mastodon-sidekiq-default.service"))
    report = status(fleet)
    assert cell(report, "mastodon-sidekiq-default.service", "franz").status == UNMANAGED
    assert cell(report, "mastodon-sidekiq-default.service", "freud").status == OK
    assert not any(r.service is None for r in report.rows)
    moved = [p for p in report.sidekiq if p.host == "franz"]
    assert [p.declared for p in moved] == [False]


def test_drift_says_what_is_wrong(fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = disabled(stopped(fleet["fritz"], "mastodon-web.service"), "mastodon-streaming.service")
    report = status(fleet)
    web = cell(report, "mastodon-web.service", "fritz")
    assert (web.status, web.state, web.detail) == (DRIFT, "inactive/dead", "should be active/running")
    streaming = cell(report, "mastodon-streaming.service", "fritz")
    assert (streaming.status, streaming.detail) == (DRIFT, "disabled")


def test_a_different_command_line_is_drift(fleet: dict[str, HostState]) -> None:
    argv = (*BUNDLE, "-c", "25", "-q", "default")
    fleet["freud"] = change_unit(fleet["freud"], "mastodon-sidekiq-default.service", exec_start=argv)
    c = cell(status(fleet), "mastodon-sidekiq-default.service", "freud")
    assert (c.status, c.detail) == (DRIFT, "ExecStart differs")


def test_an_edited_unit_file_is_drift_but_a_runtime_drop_in_is_not(fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = edited(fleet["fritz"], "mastodon-web.service")
    fleet["franz"] = with_drop_in(fleet["franz"], "mastodon-web.service", directory="/run/systemd/system")
    report = status(fleet)
    fritz = cell(report, "mastodon-web.service", "fritz")
    assert (fritz.status, fritz.detail) == (DRIFT, "unit file differs")
    assert cell(report, "mastodon-web.service", "franz").status == OK


def test_a_missing_declared_unit_is_drift_not_absent(fleet: dict[str, HostState]) -> None:
    fleet["nietzsche"] = without_unit(fleet["nietzsche"], "redis-server.service")
    c = cell(status(fleet), "redis-server.service", "nietzsche")
    assert (c.status, c.state, c.detail) == (DRIFT, "missing", "not installed")


@pytest.mark.parametrize(("active", "sub"), [("active", "running"), ("activating", "auto-restart"),
                                           ("reloading", "reload")])
def test_an_undeclared_unit_starting_or_reloading_counts_as_running_there(fleet: dict[str, HostState],
                                                                         active: str, sub: str) -> None:
    # A crash-looping hand-made Sidekiq is mostly `activating/auto-restart`: it still takes jobs.
    rogue = dataclasses.replace(undeclared_sidekiq(), active_state=active, sub_state=sub)
    fleet["franz"] = with_unit(fleet["franz"], rogue)
    c = cell(status(fleet), "mastodon-sidekiq.service", "franz")
    assert (c.status, c.state) == (UNMANAGED, f"{active}/{sub}")


def test_postgres_left_installed_on_the_old_db_host_is_present_or_unmanaged(fleet: dict[str, HostState]) -> None:
    fleet["freud"] = with_unit(fleet["freud"], distro_unit("postgresql.service", sub="exited"))
    fleet["fritz"] = with_unit(fleet["fritz"], distro_unit("postgresql.service", active="inactive", sub="dead"))
    report = status(fleet)
    assert cell(report, "postgresql.service", "freud").status == UNMANAGED
    assert cell(report, "postgresql.service", "fritz").status == PRESENT
    assert cell(report, "postgresql.service", "nietzsche").status == OK


def test_the_postgres_instance_unit_is_no_row_of_its_own(fleet: dict[str, HostState]) -> None:
    fleet["nietzsche"] = with_unit(fleet["nietzsche"], distro_unit("postgresql@15-main.service"))
    assert not any(r.unit == "postgresql@15-main.service" for r in status(fleet).rows)


def test_an_unreachable_host_is_unknown_in_every_row(fleet: dict[str, HostState]) -> None:
    observed: dict[str, HostResult] = {**fleet, "nietzsche": unreachable("nietzsche")}
    report = status(observed)
    assert {cell(report, r.unit, "nietzsche").status for r in report.rows} == {UNKNOWN}
    assert [e.host for e in report.unreachable] == ["nietzsche"]
    doc = status_json(report)
    assert doc["hosts"]["nietzsche"]["reachable"] is False
    assert doc["hosts"]["nietzsche"]["error"]["kind"] == "unreachable"


def test_a_queue_nobody_serves_is_a_finding_once_the_scheduler_stops(fleet: dict[str, HostState]) -> None:
    fleet["nietzsche"] = stopped(fleet["nietzsche"], "mastodon-sidekiq-scheduler.service")
    findings = status(fleet).queue_findings
    assert findings and any("scheduler" in f.message for f in findings)


def test_db_pool_from_the_env_file_overrides_the_units_environment(fleet: dict[str, HostState]) -> None:
    fleet["freud"] = set_env_value(fleet["freud"], "DB_POOL", "10")
    procs = {p.unit: p for p in status(fleet).sidekiq if p.host == "freud"}
    assert procs["mastodon-sidekiq-default.service"].db_pool == 10


def test_the_status_json_marks_declared_cells(fleet: dict[str, HostState]) -> None:
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    doc = status_json(status(fleet))
    web = next(r for r in doc["services"] if r["unit"] == "mastodon-web.service")
    assert web["cells"]["franz"]["declared"] is True and web["cells"]["freud"]["declared"] is False
    assert web["cells"]["franz"]["unit"]["text_hash"]
    assert [p["declared"] for p in doc["sidekiq"]["processes"] if p["host"] == "franz"] == [False]
    assert "franz:mastodon-sidekiq.service" in doc["sidekiq"]["queues"]["default"]


# ------------------------------------------------------------------ the human table


def table_cells(text: str) -> dict[tuple[str, str], str]:
    """(unit, host) -> what `fleet status` prints in that cell, its lines joined by " / "."""
    lines = text.split("\nlegend:")[0].splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [header[a:b].strip() for a, b in spans]
    cells: dict[tuple[str, str], str] = {}
    unit = ""
    for line in rows:
        values = [line[a:b].strip() for a, b in spans]  # tabulate pads each cell to its rule
        unit = values[1] or unit  # a drift reason continues its cell on the next line
        for host, value in zip(names[2:], values[2:], strict=True):
            if value:
                cells[(unit, host)] = f"{cells[(unit, host)]} / {value}" if (unit, host) in cells else value
    return cells


def test_the_status_table_marks_each_kind_of_cell_as_its_legend_says(fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = stopped(fleet["fritz"], "mastodon-web.service")
    fleet["fritz"] = with_unit(fleet["fritz"], distro_unit("postgresql.service", active="inactive", sub="dead"))
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    observed: dict[str, HostResult] = {**fleet, "nietzsche": unreachable("nietzsche")}
    text = status_text(status(observed), now=0)
    cells = table_cells(text)
    assert cells[("mastodon-web.service", "fritz")] == "inactive/dead (!) / should be active/running"
    assert cells[("mastodon-web.service", "franz")] == "active/running"
    assert cells[("mastodon-web.service", "freud")] == "·"
    assert cells[("mastodon-web.service", "nietzsche")] == "?"
    assert cells[("mastodon-sidekiq.service", "franz")] == "active/running (unmanaged)"
    assert cells[("postgresql.service", "fritz")] == "inactive/dead (undeclared)"
    assert "legend: (!) differs from the desired state · (unmanaged) runs where nobody declared it · " \
           "(undeclared) installed, not declared here · '·' absent · '?' host did not answer" in text


def test_a_converged_fleet_has_no_mark_in_its_status_table(fleet: dict[str, HostState]) -> None:
    cells = table_cells(status_text(status(fleet), now=0))
    assert set(cells.values()) == {"active/running", "active/exited", "·"}, cells


def test_the_sidekiq_table_marks_undeclared_processes_and_has_no_empty_column_otherwise() -> None:
    desired = example()
    fleet: dict[str, HostResult] = dict(converged(desired, EXAMPLE_SECRETS))
    clean = sidekiq_text(build_status(desired, fleet)).splitlines()
    assert clean[1].split() == ["HOST", "UNIT", "-c", "QUEUES", "DB_POOL"]
    assert len(clean[2].split()) == 5, clean  # the rule under the headers: no empty sixth column
    franz = fleet["franz"]
    assert isinstance(franz, HostState)
    fleet["franz"] = with_unit(franz, undeclared_sidekiq())
    marked = sidekiq_text(build_status(desired, fleet))
    assert "franz      mastodon-sidekiq.service" in marked and "UNDECLARED" in marked


class _Noting(Resource):
    """A kind that has something to say about the web unit on fritz."""

    kind = "test notes"

    def notes(self, state: HostState, unit: str) -> list[str]:
        return [f"seen by {self.kind}"] if (state.host, unit) == ("fritz", "mastodon-web.service") else []


class _Judging(Resource):
    """A kind that finds the web service wrong on fritz, and has nothing to note."""

    kind = "test problems"

    def problems(self, state: HostState, service: Service) -> list[Problem]:
        return [Problem("test.wrong", "judged wrong")] if (state.host, service.name) == ("fritz", "web") else []


def test_a_kind_that_only_judges_is_asked_for_every_declared_cell(
        fleet: dict[str, HostState], monkeypatch: pytest.MonkeyPatch) -> None:
    # status asks only the kinds that override notes or problems: one overriding problems alone counts
    monkeypatch.setattr(status_module, "RESOURCES", (*status_module.RESOURCES, _Judging()))
    report = status(fleet)
    web = next(r for r in report.rows if r.service == "web")
    assert {c.host: (c.status, c.detail) for c in web.cells}["fritz"] == (DRIFT, "judged wrong")
    assert {c.status for c in web.cells if c.host != "fritz"} == {OK, ABSENT}


def test_what_a_kind_notes_about_a_unit_is_shown_in_its_cell_table_and_json(
        fleet: dict[str, HostState], monkeypatch: pytest.MonkeyPatch) -> None:
    plain = status_text(status(fleet), now=0)
    monkeypatch.setattr(status_module, "RESOURCES", (*status_module.RESOURCES, _Noting()))
    report = status(fleet)
    assert cell(report, "mastodon-web.service", "fritz").notes == ("seen by test notes",)
    assert cell(report, "mastodon-web.service", "franz").notes == ()
    assert cell(report, "mastodon-web.service", "fritz").status == OK  # a note is no drift
    assert "active/running\nseen by test notes" in cell_text(cell(report, "mastodon-web.service", "fritz"))
    assert "seen by test notes" in status_text(report, now=0) and "seen by test notes" not in plain
    web = next(r for r in status_json(report)["services"] if r["unit"] == "mastodon-web.service")
    assert web["cells"]["fritz"]["notes"] == ["seen by test notes"] and web["cells"]["franz"]["notes"] == []


class _CountedRows(tuple):  # type: ignore[type-arg]
    """A report's rows that count how often they are walked through."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        type(self).walks += 1
        return super().__iter__()


def test_the_host_table_walks_the_rows_once_not_once_per_host() -> None:
    """The hosts' problems are gathered in one pass over the rows: a pass per host made `fleet
    status` quadratic in hosts (1 s of 2.6 at 1,000 hosts)."""
    report = build_status(example(), converged(example(), EXAMPLE_SECRETS))
    assert len(report.hosts) > 1
    counted = dataclasses.replace(report, rows=_CountedRows(report.rows))
    _CountedRows.walks = 0
    hosts_text(counted, now=0.0)
    assert _CountedRows.walks == 1
