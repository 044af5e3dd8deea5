"""Sidekiq's queues as Sidekiq sees them: without -q, from the config file it reads (fleet/sidekiq_settings.py,
fleet/resources/sidekiq_config.py), read on the host in the same round trip and judged by the
queue rules of `fleet status` and `fleet audit`."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
from observed import REPO, converged

from fleet import config, policy
from fleet.audit import build_audit
from fleet.collect.parse import parse_host
from fleet.collect.script import build_script, spec_for
from fleet.errors import ParseError
from fleet.model import SIDEKIQ_QUEUES, Desired, HostState, UnitState
from fleet.output.text import status_text
from fleet.resources.sidekiq_config import ConfigFile, SidekiqConfigs
from fleet.sidekiq_settings import (
    Settings,
    SidekiqArgs,
    SidekiqConfig,
    environment_of,
    is_sidekiq,
    parse_argv,
    parse_config,
    served,
)
from fleet.status import build_status

STOCK = REPO / "tests" / "fixtures" / "stock"
SIDEKIQ = "mastodon-sidekiq.service"
LIVE = "/home/mastodon/live"

# The shape of Mastodon's config/sidekiq.yml (4.x): symbol keys, [name, weight] pairs, [name]
# alone, a scheduler section and a schedule whose crons are ERB.  Written for these tests.
MASTODON_SHAPED = """\
---
:concurrency: 5
:queues:
  - [default, 8]
  - [push, 6]
  - [ingress, 4]
  - [mailers, 2]
  - [pull]
  - [scheduler]
  - [fasp]

:scheduler:
  :listened_queues_only: true
:schedule:
  scheduled_statuses_scheduler:
    every: '5m'
    class: Scheduler::ScheduledStatusesScheduler
  media_cleanup_scheduler:
    cron: '<%= Random.rand(0..59) %> <%= Random.rand(3..5) %> * * *'
    class: Scheduler::MediaCleanupScheduler
"""
ALL = tuple((q, w) for q, w in (("default", 8), ("push", 6), ("ingress", 4), ("mailers", 2), ("pull", None),
                                 ("scheduler", None), ("fasp", None)))


def stock() -> Desired:
    loaded = config.load(STOCK / "desired_state.toml", STOCK / "hosts")
    assert loaded.desired is not None and not loaded.errors, loaded.findings
    return loaded.desired


# ---------------------------------------------------------------- the file, parsed


def test_mastodons_shape_is_read_with_weights_and_concurrency_and_the_schedule_is_skipped() -> None:
    c = parse_config(MASTODON_SHAPED)
    assert c.problem == "" and c.top == Settings(concurrency=5, queues=ALL)


@pytest.mark.parametrize("text, queues", [
    ("queues:\n- default\n- mailers   # a comment\n", (("default", None), ("mailers", None))),
    (":queues: [default, 'push,3', [pull, 2]]\n", (("default", None), ("push", 3), ("pull", 2))),
    (':queues:\n  - "default,8"\n  - [ "push" , 6 ]\n', (("default", 8), ("push", 6))),
    (":queues: [default,\n  push]\n", (("default", None), ("push", None))),
])
def test_queues_are_read_in_every_shape_sidekiq_accepts(text: str, queues: tuple[tuple[str, int | None]]) -> None:
    assert parse_config(text).top.queues == queues


def test_an_environment_section_overrides_the_top_level_for_that_environment_only() -> None:
    c = parse_config(MASTODON_SHAPED + "production:\n  :concurrency: 30\n  :queues: [default]\n")
    assert c.for_environment("production") == Settings(concurrency=30, queues=(("default", None),))
    assert c.for_environment("development") == Settings(concurrency=5, queues=ALL)


def test_erb_in_a_value_fleet_needs_is_reported_not_evaluated_and_elsewhere_is_ignored() -> None:
    c = parse_config(":concurrency: <%= ENV.fetch('SIDEKIQ_THREADS', 25) %>\n:queues: [default]\n"
                     ":schedule:\n  x:\n    cron: '<%= Random.rand(0..59) %> * * * *'\n")
    assert c.top.concurrency is None and "ERB" in c.top.concurrency_problem and "line 1" in c.top.concurrency_problem
    assert c.top.queues == (("default", None),) and c.top.queues_problem == ""


@pytest.mark.parametrize("text, why", [
    ("<% if ENV['X'] %>\n:queues: [default]\n<% end %>\n", "ERB control flow"),
    (":queues: <%= ENV['QUEUES'] %>\n", "ERB"),
    (":queues: *shared\n", "YAML fleet does not read"),
    (":queues:\n  - [default, eight]\n", "not an integer"),
    ("- just\n- a list\n", "is not a `key: value` line"),
    (":queues:\n\t- default\n", "tab"),
])
def test_what_cannot_be_read_is_said_with_its_line(text: str, why: str) -> None:
    c = parse_config(text)
    problem = c.problem or c.top.queues_problem
    assert why in problem and "line " in problem, problem
    assert c.for_environment("production").queues is None


# ---------------------------------------------------------------- the command line: the one parser

SK = ("/home/mastodon/.rbenv/shims/bundle", "exec", "sidekiq")


@pytest.mark.parametrize(("args", "expected"), [
    # what status (parse_sidekiq_argv) read
    (("-c", "10", "-q", "default"), SidekiqArgs(10, (("default", None),))),
    (("-q", "default,8", "-q", "push,6"), SidekiqArgs(None, (("default", 8), ("push", 6)))),
    (("--concurrency=5", "--queue=x"), SidekiqArgs(5, (("x", None),))),
    (("--concurrency", "7", "--queue", "mailers,2"), SidekiqArgs(7, (("mailers", 2),))),
    (("-C", "config/sidekiq.yml"), SidekiqArgs(None, (), config="config/sidekiq.yml")),
    (("-c", "many", "-q", ""), SidekiqArgs(None, ())),
    (("-c",), SidekiqArgs(None, ())),
    # what Sidekiq's own view (argv_settings) read: -t, `-c=N`, a weight that is no number
    (("-c", "25", "-q", "default,8", "-q", "push"), SidekiqArgs(25, (("default", 8), ("push", None)))),
    (("--concurrency=5", "--queue=pull,4", "-t", "60"), SidekiqArgs(5, (("pull", 4),), timeout=60.0)),
    (("--timeout=8",), SidekiqArgs(None, (), timeout=8.0)),
    (("-c=3", "-q=x"), SidekiqArgs(3, (("x", None),))),
    (("-q", "push,x", "-c", "-5", "-t", "soon"), SidekiqArgs(None, (("push", None),))),
    (("-q", ",2"), SidekiqArgs(None, ())),
    # what the declaration (config, sidekiq_settings) read: -C -r -e, long and short
    (("-q", "push,2", "-C", "c.yml", "-e", "staging", "-r", "./app"),
     SidekiqArgs(None, (("push", 2),), config="c.yml", require="./app", environment="staging")),
    (("--config", "c.yml", "--environment=production", "--require", "/srv/app"),
     SidekiqArgs(None, (), config="c.yml", require="/srv/app", environment="production")),
    # Ruby's OptionParser also takes a short option's value glued on; the last -c wins
    (("-c25", "-qdefault,3", "-Cconfig/x.yml", "-eproduction"),
     SidekiqArgs(25, (("default", 3),), config="config/x.yml", environment="production")),
    (("-c", "5", "-c", "9"), SidekiqArgs(9, ())),
])
def test_one_parser_reads_every_form_of_a_sidekiq_command_line(args: tuple[str, ...], expected: SidekiqArgs) -> None:
    assert parse_argv((*SK, *args)) == expected
    assert parse_argv(("/usr/local/bin/sidekiq", *args)) == expected  # bundle exec or not
    assert parse_argv(("sidekiq", *args)) == expected


def test_only_what_follows_the_sidekiq_word_is_sidekiqs() -> None:
    argv = ("/usr/bin/env", "-C", "/srv", "bundle", "exec", "sidekiq", "-q", "push")
    assert parse_argv(argv) == SidekiqArgs(None, (("push", None),))


def test_the_heartbeat_shows_a_queue_without_weight_as_weight_0() -> None:
    args = parse_argv((*SK, "-q", "default,8", "-q", "push"))
    assert args is not None and args.queues_weighted() == (("default", 8), ("push", 0))


@pytest.mark.parametrize("argv", [
    ("/home/mastodon/.rbenv/shims/bundle", "exec", "puma", "-C", "config/puma.rb"),
    ("bundle", "exec", "puma", "-c", "5"),
    ("/usr/bin/node", "./streaming"),
    ("/usr/bin/sidekiq-like", "-q", "default"),
    (),
])
def test_other_commands_are_not_sidekiq(argv: tuple[str, ...]) -> None:
    assert parse_argv(argv) is None and not is_sidekiq(argv)


def test_options_on_the_command_line_win_and_without_any_queue_sidekiq_serves_default() -> None:
    cfg = parse_config(MASTODON_SHAPED)
    args = parse_argv(("/home/mastodon/.rbenv/shims/bundle", "exec", "sidekiq", "-c", "25"))
    assert args is not None
    assert served(args, "production", "/x/config/sidekiq.yml", cfg, "").queues == ALL
    assert served(args, "production", "/x/config/sidekiq.yml", cfg, "").concurrency == 25  # -c beats the file
    assert served(args, "production", "", None, "").queues == (("default", None),)  # no file at all
    q = parse_argv(("bundle", "exec", "sidekiq", "-q", "push,2", "-C", "c.yml", "-e", "staging"))
    assert q is not None and (q.queues, q.config, q.environment) == ((("push", 2),), "c.yml", "staging")
    assert served(q, "staging", "c.yml", cfg, "").queues == (("push", 2),)  # -q replaces the file's list
    no_c = parse_argv(("sidekiq",))
    assert no_c is not None
    assert served(no_c, "production", "f", SidekiqConfig(), "", env=[("RAILS_MAX_THREADS", "12")]).concurrency == 12
    assert served(no_c, "production", "f", None, "f does not exist").queues == ()
    assert environment_of(no_c, [("RAILS_ENV", "production")]) == "production"
    assert environment_of(no_c, []) == "development"


# ---------------------------------------------------------------- collected on the host

SHOW = ("Id=" + SIDEKIQ + "\nExecStart={ path=/b ; argv[]=/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 25 ; "
        "ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }\n"
        "WorkingDirectory={wd}\n\n"
        "Id=mastodon-sidekiq-q.service\nExecStart={ path=/b ; argv[]=/b exec sidekiq -c 5 -q default ; "
        "ignore_errors=no }\nWorkingDirectory={wd}\n\n"
        "Id=mastodon-sidekiq-c.service\nExecStart={ path=/b ; argv[]=/b exec sidekiq --config=missing.yml ; "
        "ignore_errors=no }\nWorkingDirectory={wd}\n\n"
        "Id=mastodon-web.service\nExecStart={ path=/b ; argv[]=/b exec puma -C config/puma.rb ; "
        "ignore_errors=no }\nWorkingDirectory={wd}")


def run_section(show: str) -> tuple[str, tuple[ConfigFile, ...]]:
    r = SidekiqConfigs()
    out = subprocess.run(["sh", "-c", 'show=$1\n' + r.script(True), "sh", show], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out.startswith("@@sidekiqconf\n")
    # Through the host parser, as a collection's output is read: every header the script prints
    # must reach this section (a per-unit header of another section's name made the host UNKNOWN).
    found = parse_host("h", collection(f"Id={SIDEKIQ}\nLoadState=loaded", out)).facts_of("sidekiqconf")
    assert isinstance(found, tuple)
    return out, found


@pytest.mark.skipif(not all(shutil.which(t) for t in ("sh", "awk", "head", "sed", "wc")),
                    reason="needs sh, awk, head, sed and wc to run the section's script")
def test_the_section_prints_the_file_sidekiq_would_read_for_each_unit_without_q(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "sidekiq.yml").write_text(MASTODON_SHAPED)
    out, found = run_section(SHOW.replace('{wd}', str(tmp_path)))
    by_unit = {f.unit: f for f in found}
    assert set(by_unit) == {SIDEKIQ, "mastodon-sidekiq-c.service"}  # -q and puma are not looked at
    f = by_unit[SIDEKIQ]
    assert (f.status, f.path) == ("file", f"{tmp_path}/config/sidekiq.yml")
    assert f.config is not None and f.config.top.queues == ALL
    missing = by_unit["mastodon-sidekiq-c.service"]
    assert (missing.status, missing.path) == ("missing", f"{tmp_path}/missing.yml")
    assert "does not exist" in missing.problem()


@pytest.mark.skipif(not all(shutil.which(t) for t in ("sh", "awk", "head", "sed", "wc")),
                    reason="needs sh, awk, head, sed and wc to run the section's script")
def test_without_a_config_file_the_section_says_none_and_sidekiq_gets_its_defaults(tmp_path: Path) -> None:
    _, found = run_section(SHOW.replace('{wd}', str(tmp_path)).split("\n\nId=mastodon-sidekiq-q")[0])
    assert [(f.unit, f.status, f.path) for f in found] == [(SIDEKIQ, "none", f"{tmp_path}/config/sidekiq.yml")]


@pytest.mark.skipif(not all(shutil.which(t) for t in ("sh", "awk", "head", "sed", "wc")),
                    reason="needs sh, awk, head, sed and wc to run the section's script")
def test_a_file_too_large_is_not_printed(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "sidekiq.yml").write_text("# x\n" * 40_000)
    out, found = run_section(SHOW.replace('{wd}', str(tmp_path)).split("\n\nId=mastodon-sidekiq-q")[0])
    assert [f.status for f in found] == ["toolarge"] and "# x" not in out


AGREE = [
    "-c 5 -q default", "-qdefault", "-q=default", "--queue=push,2", "--queue push", "-q ,2", "-q", "--queue=",
    "-c 25", "-C glued.yml", "-Cglued.yml", "-C=glued.yml", "--config other.yml", "--config=other.yml",
    "-C a.yml -C b.yml", "-r app", "-rapp", "--require=app -e production", "-e -q", "-c 5 -t 8 -q mailers",
]


@pytest.mark.skipif(not all(shutil.which(t) for t in ("sh", "awk", "head", "sed", "wc")),
                    reason="needs sh, awk, head, sed and wc to run the section's script")
@pytest.mark.parametrize("args", AGREE)
def test_the_host_reads_the_config_file_fleets_parser_says_sidekiq_reads(tmp_path: Path, args: str) -> None:
    """The collection's awk (on the host) and parse_argv (here) read one command line alike."""
    (tmp_path / "app").mkdir()  # the -r directory (a missing one falls back to WorkingDirectory)
    argv = ("/b", "exec", "sidekiq", *args.split())
    show = (f"Id={SIDEKIQ}\nExecStart={{ path=/b ; argv[]={' '.join(argv)} ; ignore_errors=no }}\n"
            f"WorkingDirectory={tmp_path}")
    _, found = run_section(show)
    parsed = parse_argv(argv)
    assert parsed is not None
    if parsed.queues:
        assert found == (), found  # -q: the file is not Sidekiq's business
        return
    d = tmp_path if parsed.require is None else tmp_path / parsed.require
    expected = tmp_path / parsed.config if parsed.config else d / "config" / "sidekiq.yml"
    assert [(f.unit, f.path) for f in found] == [(SIDEKIQ, str(expected))]


def test_the_script_has_the_section_after_the_units_it_reads() -> None:
    script = build_script(spec_for(stock(), "freud"))
    assert "echo '@@sidekiqconf'" in script and script.index("@@sidekiqconf") > script.index("show=$(")
    assert "WorkingDirectory" in script


def collection(units_show: str, sidekiq: str) -> str:
    return ("@@fleet 1\n@@facts\nhostname=freud\n@@units\n" + units_show + "\n@@hashes\n@@text\n"
            + sidekiq + "@@end\n")


def test_a_host_output_with_the_section_parses_to_the_config_per_unit() -> None:
    body = "@@sidekiqconf\n@@sidekiqconf " + SIDEKIQ + "\n!file /l/config/sidekiq.yml\n" + "".join(
        f"|{line}\n" for line in MASTODON_SHAPED.split("\n"))
    state = parse_host("freud", collection(f"Id={SIDEKIQ}\nLoadState=loaded", body))
    (f,) = state.facts_of("sidekiqconf")  # type: ignore[misc]
    assert isinstance(f, ConfigFile) and f.config is not None and f.config.top.queues == ALL


def test_an_older_output_without_the_section_means_not_collected() -> None:
    state = parse_host("freud", collection(f"Id={SIDEKIQ}", ""))
    assert state.facts_of("sidekiqconf") is None


@pytest.mark.parametrize("body", [
    "@@sidekiqconf\nunexpected\n",
    f"@@sidekiqconf\n@@sidekiqconf {SIDEKIQ}\n!weird /x\n",
    f"@@sidekiqconf\n@@sidekiqconf {SIDEKIQ}\n!none /x\n|a line for no file\n",
])
def test_a_malformed_section_is_a_parse_error(body: str) -> None:
    with pytest.raises(ParseError, match="sidekiq"):
        parse_host("freud", collection(f"Id={SIDEKIQ}", body))


# ---------------------------------------------------------------- judged


def with_config(state: HostState, unit: str, f: ConfigFile | None) -> HostState:
    return dataclasses.replace(state, extra=(*state.extra, ("sidekiqconf", () if f is None else (f,))))


def stock_observed(f: ConfigFile | None) -> dict[str, HostState]:
    c = converged(stock(), {})
    return {**c, "freud": with_config(c["freud"], SIDEKIQ, f)}


def test_stock_sidekiq_without_q_serves_every_queue_its_config_lists() -> None:
    f = ConfigFile(SIDEKIQ, f"{LIVE}/config/sidekiq.yml", "file", parse_config(MASTODON_SHAPED))
    report = build_status(stock(), stock_observed(f))
    (p,) = report.sidekiq
    assert (p.queues, p.concurrency, p.db_pool, p.source) == (ALL, 25, 25, f"{LIVE}/config/sidekiq.yml")
    assert report.queue_findings == ()
    text = status_text(report, now=1_800_000_000)
    assert "NOBODY" not in text and "default,8 push,6" in text
    assert not build_audit(stock(), stock_observed(f)).errors


def test_a_config_that_cannot_be_read_is_an_error_naming_host_unit_and_file_never_served_by_nobody() -> None:
    f = ConfigFile(SIDEKIQ, f"{LIVE}/config/sidekiq.yml", "file",
                   parse_config(":queues: <%= ENV['QUEUES'].split(',') %>\n"))
    report = build_status(stock(), stock_observed(f))
    codes = {x.code: x for x in report.queue_findings}
    assert set(codes) == {"sidekiq.config-unreadable", "sidekiq.coverage-unknown"}
    unreadable = codes["sidekiq.config-unreadable"]
    assert unreadable.is_error and unreadable.host == "freud"
    assert SIDEKIQ in unreadable.message and f"{LIVE}/config/sidekiq.yml" in unreadable.message
    assert "ERB" in unreadable.message
    assert not codes["sidekiq.coverage-unknown"].is_error
    assert "sidekiq.queue-unserved" not in {x.code for x in build_audit(stock(), stock_observed(f)).findings}
    assert any(x.code == "sidekiq.config-unreadable" for x in build_audit(stock(), stock_observed(f)).errors)


def test_a_missing_config_file_means_sidekiqs_default_queue_only() -> None:
    f = ConfigFile(SIDEKIQ, f"{LIVE}/config/sidekiq.yml", "none")
    report = build_status(stock(), stock_observed(f))
    assert report.sidekiq[0].queues == (("default", None),)
    unserved = {x.message.split("'")[1] for x in report.queue_findings if x.code == "sidekiq.queue-unserved"}
    assert unserved == set(SIDEKIQ_QUEUES) - {"default"}


def test_declared_sidekiq_without_q_is_one_warning_in_check_not_seven_unserved_queues() -> None:
    found = policy.check(stock())
    assert [(f.severity, f.code) for f in found] == [("warning", "sidekiq.queues-on-host")]
    assert SIDEKIQ in found[0].message


def test_a_unit_the_collector_gave_no_config_for_is_not_judged_as_serving_nothing() -> None:
    report = build_status(stock(), converged(stock(), {}))  # built without the section: "not collected"
    assert {f.code for f in report.queue_findings} == {"sidekiq.config-unreadable", "sidekiq.coverage-unknown"}
    assert "not collected" in report.sidekiq[0].problem


def test_the_status_cell_notes_where_the_queues_come_from() -> None:
    f = ConfigFile(SIDEKIQ, f"{LIVE}/config/sidekiq.yml", "unreadable")
    report = build_status(stock(), stock_observed(f))
    (row,) = [r for r in report.rows if r.unit == SIDEKIQ]
    cell = next(c for c in row.cells if c.host == "freud")
    assert cell.notes == (f"queues from {LIVE}/config/sidekiq.yml: unreadable",)


def test_db_pool_is_judged_against_the_concurrency_the_config_gives() -> None:
    f = ConfigFile(SIDEKIQ, f"{LIVE}/config/sidekiq.yml", "file", parse_config(MASTODON_SHAPED))
    observed = stock_observed(f)
    u = observed["freud"].unit(SIDEKIQ)
    assert isinstance(u, UnitState)
    argv = tuple(a for a in u.exec_start if a not in ("-c", "25"))  # no -c: the file's 5, DB_POOL=25 is enough
    freud = dataclasses.replace(observed["freud"], units=(dataclasses.replace(u, exec_start=argv,
                                                                               environment=(("DB_POOL", "3"),)),))
    report = build_status(stock(), {**observed, "freud": freud})
    assert report.sidekiq[0].concurrency == 5
    assert [x.code for x in report.queue_findings] == ["sidekiq.db-pool"]


def test_a_config_file_without_a_last_newline_does_not_swallow_the_next_units_header(tmp_path: Path) -> None:
    """`head | sed` left the last line unended: the next unit's `@@sidekiqconf` header was glued to it."""
    for name in ("a", "b"):
        (tmp_path / name / "config").mkdir(parents=True)
        (tmp_path / name / "config" / "sidekiq.yml").write_text(f":queues:\n  - {name}q")  # no newline at the end
    show = "".join(f"Id=mastodon-sidekiq-{name}.service\nExecStart={{ path=/b ; argv[]=/b exec sidekiq -c 5 ; "
                   f"ignore_errors=no }}\nWorkingDirectory={tmp_path / name}\n\n" for name in ("a", "b"))
    out, found = run_section(show)
    by_unit = {f.unit: f for f in found}
    assert set(by_unit) == {"mastodon-sidekiq-a.service", "mastodon-sidekiq-b.service"}, out
    for name in ("a", "b"):
        config = by_unit[f"mastodon-sidekiq-{name}.service"].config
        assert config is not None and [q for q, _ in config.top.queues] == [f"{name}q"]
    assert out.endswith("|  - bq\n")
