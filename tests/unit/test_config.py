"""The loader: desired_state.toml and hosts/*.toml -> Desired, with every problem a Finding.

Small fleets are written as TOML strings (hosts `a` and `b` from conftest.SMALL_HOSTS); the
shipped example is edited one defect at a time.  Assertions name the finding code, the key path
and what the message or hint says, not just how many findings there are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from fleet import config
from fleet.errors import ConfigError
from fleet.model import DEFAULT_SIDEKIQ_COMMAND, Finding, Kind, SecretSource

# The fixtures `example` (an editable copy of the shipped example) and `make_fleet` come from
# conftest.py; FleetDir is defined there and not importable from a test module.
FleetDir = Any
MakeFleet = Callable[..., Any]


# ------------------------------------------------------------------ helpers


def generic(name: str, *, hosts: Sequence[str] = ("a",), requires: Sequence[str] = (), unit: str | None = None,
            extra: str = "", unit_file: str | None = None) -> str:
    """A [services.NAME] table of kind generic, valid unless told otherwise."""
    unit_file = f'exec_start = "/usr/bin/{name}"' if unit_file is None else unit_file
    return (f'[services.{name}]\nkind = "generic"\nunit = "{unit or name + ".service"}"\n'
            f"hosts = {json.dumps(list(hosts))}\nrequires = {json.dumps(list(requires))}\n{extra}\n"
            f"[services.{name}.unit_file]\n{unit_file}\n\n")


def sidekiq(name: str, *, queues: str = "{ default = 1 }", concurrency: str = "5", hosts: Sequence[str] = ("a",),
            extra: str = "", unit_file: str = 'user = "mastodon"') -> str:
    return (f'[services.{name}]\nkind = "sidekiq"\nunit = "{name}.service"\nhosts = {json.dumps(list(hosts))}\n'
            f"concurrency = {concurrency}\nqueues = {queues}\n{extra}\n"
            f"[services.{name}.unit_file]\n{unit_file}\n\n")


def only(findings: Iterable[Finding], code: str) -> Finding:
    """The one finding with `code`; fails showing every finding otherwise."""
    findings = list(findings)
    matching = [f for f in findings if f.code == code]
    assert len(matching) == 1, f"expected exactly one {code}, got:\n" + "\n".join(map(repr, findings))
    return matching[0]


def by_key(findings: Iterable[Finding], key: str) -> list[Finding]:
    return [f for f in findings if f.key == key]


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.is_error]


# ------------------------------------------------------------------ locate


def test_locate_finds_a_leaf_key_below_its_table_header() -> None:
    text = '[fleet]\nname = "x"\n\n[services.web]\nkind = "web"\nunit = "w.service"\n'
    assert config.locate(text, "services.web.unit") == 6
    assert config.locate(text, "services.web") == 4
    assert config.locate(text, "fleet.name") == 2


def test_locate_finds_a_key_inside_an_inline_table() -> None:
    text = '[services.web]\nkind = "web"\nhealth = { http = "http://x/", timeout = 3 }\n'
    assert config.locate(text, "services.web.health.timeout") == 3


def test_locate_finds_an_array_of_tables_header() -> None:
    assert config.locate('[fleet]\nname = "x"\n\n[[discover]]\npattern = "a*"\n', "discover") == 4


def test_locate_does_not_look_past_the_next_table_for_a_leaf() -> None:
    text = '[services.a]\nkind = "web"\n\n[services.b]\nunit = "b.service"\n'
    # services.a has no `unit`; the one in services.b must not be reported as its line.
    assert config.locate(text, "services.a.unit") == 1


def test_locate_returns_none_without_text_or_key_or_match() -> None:
    assert config.locate("", "a") is None
    assert config.locate("a = 1\n", "") is None
    assert config.locate("a = 1\n", "zzz") is None


def test_locate_does_not_place_a_top_level_key_inside_another_table() -> None:
    text = '[services.web]\nkind = "web"\n\n[env_files.m]\nservices = ["web"]\n'
    # "services" is the [services.*] tables, never the `services = [...]` of an env file.
    assert config.locate(text, "services") in (None, 1)


@pytest.mark.parametrize("separator", ["\x85", "\u2028", "\u2029"])
def test_locate_counts_lines_as_toml_does(separator: str) -> None:
    text = f'# a comment with {separator} in it\n[services.web]\nkind = "web"\n'
    assert config.locate(text, "services.web.kind") == 3


# ------------------------------------------------------------------ read_toml


def test_a_toml_syntax_error_is_a_finding_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[fleet]\nname = "unterminated\n')
    ctx = config._Ctx(str(path))
    assert config.read_toml(path, ctx) is None
    f = only(ctx.findings, "toml.syntax")
    assert (f.severity, f.file, f.line, f.column) == ("error", str(path), 2, 21)
    assert f.message == "TOML syntax error: Illegal character '\\n'"
    assert "(at line" not in f.message  # the position lives in line/column, not the text
    assert f.hint


def test_a_toml_error_at_the_end_of_the_document_is_still_reported(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("x = [1,\n")
    ctx = config._Ctx(str(path))
    assert config.read_toml(path, ctx) is None
    f = only(ctx.findings, "toml.syntax")
    assert "end of document" in f.message


def test_a_table_declared_twice_is_a_syntax_error_pointing_at_the_second(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[services.a]\nkind = "web"\n[services.a]\n')
    ctx = config._Ctx(str(path))
    config.read_toml(path, ctx)
    f = only(ctx.findings, "toml.syntax")
    assert f.line == 3
    assert "twice" in f.message


def test_a_file_that_is_not_utf8_is_a_finding_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    ctx = config._Ctx(str(path))
    assert config.read_toml(path, ctx) is None
    f = only(ctx.findings, "config.encoding")
    assert "byte 11" in f.message
    assert "UTF-8" in f.hint


def test_a_huge_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_bytes(b"#" * (config.MAX_FILE_BYTES + 1))
    ctx = config._Ctx(str(path))
    assert config.read_toml(path, ctx) is None
    assert f"{config.MAX_FILE_BYTES + 1} bytes" in only(ctx.findings, "config.too-large").message


def test_an_unreadable_path_is_a_finding_not_an_exception(tmp_path: Path) -> None:
    path = tmp_path / "dir.toml"
    path.mkdir()
    ctx = config._Ctx(str(path))
    assert config.read_toml(path, ctx) is None
    assert str(path) in only(ctx.findings, "config.unreadable").message


def test_read_toml_keeps_the_text_for_line_lookups(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('a = 1\n[b]\nc = "d"\n')
    ctx = config._Ctx(str(path))
    assert config.read_toml(path, ctx) == {"a": 1, "b": {"c": "d"}}
    assert ctx.text == 'a = 1\n[b]\nc = "d"\n'
    assert ctx.findings == []


# ------------------------------------------------------------------ hosts


def write_hosts(tmp_path: Path, files: dict[str, str | bytes]) -> Path:
    d = tmp_path / "hosts"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


def test_hosts_load_sorted_by_name_with_defaults(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"zeta.toml": 'address = "10.0.0.2"\n',
                               "alpha.toml": 'name = "alpha"\naddress = "alpha.example"\nport = 2222\n'
                                             'user = "deploy"\nsudo = true\nroles = ["cdn", "app"]\n'})
    hosts, findings = config.load_hosts(d)
    assert findings == []
    assert [h.name for h in hosts] == ["alpha", "zeta"]
    alpha, zeta = hosts
    assert (alpha.address, alpha.port, alpha.user, alpha.sudo, alpha.roles) == (
        "alpha.example", 2222, "deploy", True, ("cdn", "app"))
    assert (zeta.port, zeta.user, zeta.sudo, zeta.roles) == (22, "root", False, ())
    assert zeta.source == str(d / "zeta.toml")


def test_a_missing_hosts_directory_raises_a_config_error_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        config.load_hosts(tmp_path / "nope")
    assert "does not exist" in e.value.message
    assert "--hosts" in e.value.hint


def test_an_empty_hosts_directory_is_an_error(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"README.md": "not a host"})
    hosts, findings = config.load_hosts(d)
    assert hosts == ()
    assert "no host files" in only(findings, "hosts.empty").message


def test_a_hosts_file_whose_name_disagrees_with_its_content_says_how_to_reconcile(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"franz.toml": 'name = "frank"\naddress = "franz.example"\n'})
    hosts, findings = config.load_hosts(d)
    f = only(findings, "hosts.name-mismatch")
    assert (f.key, f.line, f.file) == ("name", 1, str(d / "franz.toml"))
    assert "franz.toml declares name = 'frank'" in f.message
    assert "rename the file to frank.toml" in f.hint and 'name = "franz"' in f.hint


def test_an_unknown_host_key_suggests_the_closest_known_key(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'adress = "a.example"\n'})
    _, findings = config.load_hosts(d)
    f = only(findings, "config.unknown-key")
    assert f.key == "adress" and f.message == "unknown key 'adress'"
    assert f.hint == "did you mean address?"
    assert only(findings, "config.missing-key").key == "address"


def test_an_unknown_key_far_from_every_known_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "a.example"\nflavour = "vanilla"\n'})
    _, findings = config.load_hosts(d)
    assert only(findings, "config.unknown-key").hint.startswith("allowed keys here: name, address, port")


def test_a_port_of_the_wrong_type_names_both_types(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "a.example"\nport = "22"\n'})
    _, findings = config.load_hosts(d)
    f = only(findings, "config.wrong-type")
    assert (f.key, f.line) == ("port", 2)
    assert f.message == "'port' must be an integer, not a string"


def test_a_boolean_is_not_accepted_where_an_integer_is_required(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "a.example"\nport = true\n'})
    _, findings = config.load_hosts(d)
    assert only(findings, "config.wrong-type").message == "'port' must be an integer, not a boolean"


def test_a_port_out_of_range_is_an_error(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "a.example"\nport = 70000\n'})
    hosts, findings = config.load_hosts(d)
    assert hosts == ()
    assert "70000 is outside 1–65535" in only(findings, "hosts.bad-port").message


def test_two_host_files_for_one_address_are_an_error(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "Same.Example"\n', "b.toml": 'address = "same.example"\n'})
    _, findings = config.load_hosts(d)
    f = only(findings, "hosts.same-address")
    assert "hosts a and b both point at same.example:22" in f.message


def test_sudo_as_root_is_only_a_warning(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "a.example"\nsudo = true\n'})
    hosts, findings = config.load_hosts(d)
    f = only(findings, "config.warning")
    assert (f.severity, f.key) == ("warning", "sudo")
    assert [h.name for h in hosts] == ["a"]


def test_a_host_file_name_with_a_space_is_refused(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"bad name.toml": 'address = "a.example"\n'})
    hosts, findings = config.load_hosts(d)
    assert hosts == ()
    assert "host file name 'bad name'" in only(findings, "config.bad-name").message


def test_a_role_that_is_not_a_string_is_a_wrong_type(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "a.example"\nroles = ["cdn", 5]\n'})
    _, findings = config.load_hosts(d)
    assert only(findings, "config.wrong-type").message == "'.roles[1]' must be a string, not an integer"


def test_one_broken_host_file_does_not_hide_the_others(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": "address = \n", "b.toml": 'address = "b.example"\n',
                               "c.toml": 'address = "c.example"\nport = 0\n'})
    hosts, findings = config.load_hosts(d)
    assert [h.name for h in hosts] == ["b"]
    assert sorted(f.code for f in findings) == ["hosts.bad-port", "toml.syntax"]
    assert {Path(f.file).name for f in findings} == {"a.toml", "c.toml"}


def test_an_address_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    d = write_hosts(tmp_path, {"a.toml": 'address = "a.example\\n"\n'})
    hosts, findings = config.load_hosts(d)
    assert hosts == ()
    assert only(findings, "config.bad-name").key == "address"


# ------------------------------------------------------------------ load: the whole desired state


def test_a_missing_desired_file_raises_a_config_error_saying_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    with pytest.raises(ConfigError) as e:
        config.load(tmp_path / "desired_state.toml", tmp_path / "hosts")
    assert str(tmp_path / "desired_state.toml") in e.value.message
    assert "--dir" in e.value.hint


def test_the_shipped_example_loads_without_findings(example: FleetDir) -> None:
    loaded = example.load()
    assert loaded.findings == ()
    d = loaded.desired
    assert d is not None
    assert d.name == "hachyderm"
    assert [h.name for h in d.hosts] == ["franz", "freud", "fritz", "nietzsche"]
    assert [s.name for s in d.services] == ["postgres", "redis", "web", "streaming", "sidekiq-default",
                                            "sidekiq-push-pull", "sidekiq-scheduler"]
    assert [(p.pattern, p.prune) for p in d.discover][:2] == [("mastodon-*", True), ("sidekiq*", True)]
    assert [(r.role, r.forbid) for r in d.placement] == [("cdn", ("sidekiq", "postgres", "redis"))]


def test_a_sidekiq_exec_start_is_derived_from_concurrency_and_weighted_queues(example: FleetDir) -> None:
    d = example.load().desired
    svc = d.service("sidekiq-default")
    assert svc.kind is Kind.SIDEKIQ
    assert svc.unit_spec.exec_start == (
        "/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 25 -q default,8 -q ingress,6 -q mailers,2")


def test_db_pool_defaults_to_the_sidekiq_concurrency_but_an_explicit_one_is_kept(example: FleetDir) -> None:
    d = example.load().desired
    assert d.service("sidekiq-push-pull").unit_spec.env()["DB_POOL"] == "20"  # derived
    assert d.service("sidekiq-scheduler").unit_spec.env()["DB_POOL"] == "5"  # derived
    assert d.service("sidekiq-default").unit_spec.env()["DB_POOL"] == "25"  # written in the file


def test_an_observe_only_service_has_no_unit_spec(example: FleetDir) -> None:
    pg = example.load().desired.service("postgres")
    assert pg.observe_only and pg.unit_spec is None
    assert pg.health.tcp == 5432 and pg.health.timeout == 15.0


def test_an_env_file_reaches_every_host_of_its_services(example: FleetDir) -> None:
    d = example.load().desired
    (ef,) = d.env_files
    assert set(ef.hosts) == {"fritz", "franz", "freud", "nietzsche"}
    assert ef.mode == "0600" and ef.owner == "mastodon"
    assert dict(ef.sensitive)["SECRET_KEY_BASE"] == SecretSource("file")
    assert ef.values_for("fritz")["S3_ENABLED"] == "true"


def test_every_finding_is_reported_in_one_run_not_just_the_first(example: FleetDir) -> None:
    example.edit('name = "hachyderm"', 'name = "hachyderm"\nowner = "ops"')
    example.edit('max_unavailable = 1\nhealth = { http', 'max_unavailabel = 1\nhealth = { http')
    example.edit('hosts = ["fritz"]\nrequires', 'hosts = ["frtiz"]\nrequires')
    example.edit('concurrency = 5', 'concurrency = "5"')
    found = {(f.code, f.key) for f in example.load().findings}
    assert {("config.unknown-key", "fleet.owner"), ("config.unknown-key", "services.web.max_unavailabel"),
            ("config.unknown-host", "services.streaming.hosts"),
            ("config.wrong-type", "services.sidekiq-scheduler.concurrency")} <= found


def test_an_unknown_top_level_table_suggests_the_known_one(example: FleetDir) -> None:
    example.edit("[fleet]", "[flete]")
    f = only(example.load().findings, "config.unknown-key")
    assert (f.key, f.line, f.hint) == ("flete", 9, "did you mean fleet?")


def test_a_misspelled_service_key_suggests_the_right_one_with_its_line(example: FleetDir) -> None:
    example.edit('max_unavailable = 1\nhealth = { http', 'max_unavailabel = 1\nhealth = { http')
    f = only(example.load().findings, "config.unknown-key")
    assert f.key == "services.web.max_unavailabel"
    assert f.line == 60
    assert f.hint == "did you mean max_unavailable?"


def test_a_misspelled_unit_file_key_suggests_the_right_one(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit_file='exec_start = "/bin/app"\nenviroment_files = []'))
    f = only(fd.load().findings, "config.unknown-key")
    assert f.key == "services.app.unit_file.enviroment_files"
    assert f.hint == "did you mean environment_files?"


def test_a_concurrency_written_as_a_string_is_a_wrong_type_with_its_line(example: FleetDir) -> None:
    example.edit("concurrency = 25", 'concurrency = "25"')
    f = only(example.load().findings, "config.wrong-type")
    assert (f.key, f.line) == ("services.sidekiq-default.concurrency", 97)
    assert f.message == "'services.sidekiq-default.concurrency' must be an integer, not a string"


@pytest.mark.parametrize(("slot", "value", "expected"), [
    ("hosts", '"a"', "'services.app.hosts' must be an array, not a string"),
    ("observe_only", '"yes"', "'services.app.observe_only' must be a boolean (true/false), not a string"),
    ("max_unavailable", "1.5", "'services.app.max_unavailable' must be an integer, not a number"),
    ("requires", "{ x = 1 }", "'services.app.requires' must be an array, not a table"),
    ("health", '"http://x"', "'services.app.health' must be a table, not a string"),
])
def test_a_service_key_of_the_wrong_type_names_the_expected_type(
        make_fleet: MakeFleet, slot: str, value: str, expected: str) -> None:
    text = generic("app").replace('kind = "generic"', f'kind = "generic"\n{slot} = {value}', 1)
    if slot in ("hosts", "requires"):  # the helper already wrote them; replace rather than repeat
        text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{slot} = [")) + "\n"
    f = [f for f in make_fleet(text).load().findings if f.code == "config.wrong-type"]
    assert [x.message for x in f] == [expected]


def test_a_wrong_type_finding_says_how_to_fix_it(example: FleetDir) -> None:
    example.edit("concurrency = 25", 'concurrency = "25"')
    assert only(example.load().findings, "config.wrong-type").hint


def test_a_sidekiq_service_with_a_bad_concurrency_does_not_also_ask_for_exec_start(example: FleetDir) -> None:
    example.edit("concurrency = 25", 'concurrency = "25"')
    assert [f.code for f in example.load().findings] == ["config.wrong-type"]


@pytest.mark.parametrize(("missing", "key"), [
    ('kind = "generic"\n', "services.app.kind"),
    ('unit = "app.service"\n', "services.app.unit"),
    ('hosts = ["a"]\n', "services.app.hosts"),
])
def test_a_missing_required_service_key_is_named_with_its_path(make_fleet: MakeFleet, missing: str, key: str) -> None:
    fd = make_fleet(generic("app").replace(missing, ""))
    f = only(fd.load().findings, "config.missing-key")
    assert f.key == key
    assert f.message == f"missing required key '{key}'"
    assert f.line == 1  # the [services.app] header, the table it belongs in
    assert f"`{key.rsplit('.', 1)[1]} = …`" in f.hint


def test_a_missing_exec_start_is_named(make_fleet: MakeFleet) -> None:
    f = only(make_fleet(generic("app", unit_file='user = "app"')).load().findings, "config.missing-key")
    assert f.key == "services.app.unit_file.exec_start"


def test_a_managed_service_without_a_unit_file_is_told_about_observe_only(make_fleet: MakeFleet) -> None:
    text = '[services.app]\nkind = "web"\nunit = "app.service"\nhosts = ["a"]\n'
    f = only(make_fleet(text).load().findings, "config.missing-key")
    assert f.key == "services.app.unit_file"
    assert "observe_only = true" in f.hint


def test_a_file_without_services_is_an_error(make_fleet: MakeFleet) -> None:
    f = only(make_fleet('[fleet]\nname = "x"\n').load().findings, "config.missing-key")
    assert (f.key, f.message) == ("services", "no services declared")


def test_the_fleet_name_defaults_to_the_directory_name(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app"))
    assert fd.load().desired.name == fd.root.name


def test_a_service_naming_a_host_without_a_file_suggests_the_closest_host(example: FleetDir) -> None:
    example.edit('hosts = ["fritz", "franz"]', 'hosts = ["frtiz", "franz"]')
    loaded = example.load()
    f = only(loaded.findings, "config.unknown-host")
    assert f.key == "services.web.hosts" and f.line == 58
    assert f"service 'web' names host 'frtiz', which has no file in {example.hosts_dir}/" == f.message
    assert f.hint == "did you mean fritz?"
    assert loaded.desired.service("web").hosts == ("franz",)  # the rest of the service is still judged


def test_an_unknown_host_far_from_every_host_says_which_file_to_add(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", hosts=["zebra"]))
    assert only(fd.load().findings, "config.unknown-host").hint == (
        f"add {fd.hosts_dir}/zebra.toml or remove it from the list")


def test_a_host_listed_twice_for_a_service_is_an_error(make_fleet: MakeFleet) -> None:
    f = only(make_fleet(generic("app", hosts=["a", "a"])).load().findings, "config.duplicate")
    assert f.message == "host 'a' is listed twice in services.app.hosts"


def test_a_service_on_a_host_whose_file_is_invalid_does_not_claim_the_file_is_missing(example: FleetDir) -> None:
    example.edit("port = 22", "port = 0", file="hosts/franz.toml")
    assert "config.unknown-host" not in [f.code for f in example.load().findings]


def test_a_requires_naming_an_unknown_service_suggests_the_closest(example: FleetDir) -> None:
    example.edit('hosts = ["fritz"]\nrequires = ["postgres", "redis"]',
                 'hosts = ["fritz"]\nrequires = ["postgres", "rediss"]')
    f = only(example.load().findings, "config.unknown-service")
    assert (f.key, f.line) == ("services.streaming.requires", 77)
    assert f.message == "service 'streaming' requires unknown service 'rediss'"
    assert f.hint == "did you mean redis?"


def test_a_service_requiring_itself_is_a_cycle(make_fleet: MakeFleet) -> None:
    f = only(make_fleet(generic("app", requires=["app"])).load().findings, "config.cycle")
    assert f.message == "service 'app' requires itself"


def _cycle_in(message: str) -> list[str]:
    assert message.startswith("dependency cycle: ")
    return message.removeprefix("dependency cycle: ").split(" (")[0].split(" -> ")


def test_a_dependency_cycle_is_shown_as_a_closed_chain(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("a", requires=["b"]) + generic("b", requires=["a"]))
    f = only(fd.load().findings, "config.cycle")
    assert f.message in ("dependency cycle: a -> b -> a (each requires the previous)",
                         "dependency cycle: b -> a -> b (each requires the previous)")
    assert f.hint == "break the cycle by removing one of these requires"


def test_a_three_service_cycle_lists_each_service_once_in_requires_order(make_fleet: MakeFleet) -> None:
    requires = {"x": "z", "y": "x", "z": "y"}  # y requires x, z requires y, x requires z
    fd = make_fleet("".join(generic(n, requires=[r]) for n, r in requires.items()))
    chain = _cycle_in(only(fd.load().findings, "config.cycle").message)
    assert chain[0] == chain[-1] and sorted(chain[:-1]) == ["x", "y", "z"]
    for before, after in zip(chain, chain[1:], strict=False):
        assert requires[after] == before  # "each requires the previous"


def test_the_shipped_example_with_redis_requiring_web_shows_that_cycle(example: FleetDir) -> None:
    example.edit('unit = "redis-server.service"\n', 'unit = "redis-server.service"\nrequires = ["web"]\n')
    f = only(example.load().findings, "config.cycle")
    assert sorted(_cycle_in(f.message)[:-1]) == ["redis", "web"]
    assert f.key.endswith(".requires") and f.line is not None


def test_two_services_claiming_one_unit_on_one_host_are_an_error(example: FleetDir) -> None:
    example.edit('unit = "mastodon-sidekiq-scheduler.service"', 'unit = "mastodon-sidekiq-push-pull.service"')
    f = only(example.load().findings, "config.duplicate-unit")
    assert (f.key, f.line) == ("services.sidekiq-scheduler.unit", 128)
    assert f.message == ("services 'sidekiq-push-pull' and 'sidekiq-scheduler' both claim "
                         "mastodon-sidekiq-push-pull.service on host nietzsche")


def test_one_unit_name_on_different_hosts_is_fine(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("x", unit="same.service", hosts=["a"]) + generic("y", unit="same.service", hosts=["b"]))
    assert fd.load().findings == ()


def test_a_hosts_file_that_disagrees_with_its_name_is_reported_by_load(example: FleetDir) -> None:
    example.edit('name = "franz"', 'name = "frank"', file="hosts/franz.toml")
    f = only(example.load().findings, "hosts.name-mismatch")
    assert f.file == str(example.hosts_dir / "franz.toml") and f.line == 2


# ------------------------------------------------------------------ sidekiq services


def test_sidekiq_queues_in_array_form_have_no_weights(make_fleet: MakeFleet) -> None:
    svc = make_fleet(sidekiq("sk", queues='["default", "push"]')).load().desired.service("sk")
    assert svc.sidekiq.queues == (("default", None), ("push", None))
    assert svc.unit_spec.exec_start == f"{DEFAULT_SIDEKIQ_COMMAND} -c 5 -q default -q push"


def test_a_custom_sidekiq_command_prefixes_the_derived_arguments(make_fleet: MakeFleet) -> None:
    fd = make_fleet(sidekiq("sk", extra='sidekiq_command = "/opt/bin/sidekiq"'))
    assert fd.load().desired.service("sk").unit_spec.exec_start == "/opt/bin/sidekiq -c 5 -q default,1"


def test_a_sidekiq_service_may_not_set_exec_start(make_fleet: MakeFleet) -> None:
    fd = make_fleet(sidekiq("sk", unit_file='exec_start = "/bin/sidekiq -c 5"'))
    f = only(fd.load().findings, "config.bad-key")
    assert f.key == "services.sk.unit_file.exec_start"
    assert "derived from concurrency and queues" in f.message


@pytest.mark.parametrize(("queues", "code", "key", "text"), [
    ("{ default = 0 }", "config.bad-value", "services.sk.queues.default", "must be a positive integer"),
    ('{ default = "8" }', "config.bad-value", "services.sk.queues.default", "must be a positive integer"),
    ("{}", "config.bad-value", "services.sk.queues", "at least one queue"),
    ('["default", 3]', "config.wrong-type", "services.sk.queues", "queue names must be strings"),
    ('{ "de fault" = 1 }', "config.bad-name", "services.sk.queues", "contains characters Sidekiq does not use"),
    ('"default"', "config.wrong-type", "services.sk.queues", "must be a table or an array, not a string"),
])
def test_malformed_sidekiq_queues_are_findings(make_fleet: MakeFleet, queues: str, code: str, key: str,
                                               text: str) -> None:
    f = only(make_fleet(sidekiq("sk", queues=queues)).load().findings, code)
    assert f.key == key and text in f.message


@pytest.mark.parametrize("concurrency", ["0", "1001"])
def test_a_sidekiq_concurrency_outside_1_to_1000_is_an_error(make_fleet: MakeFleet, concurrency: str) -> None:
    f = only(make_fleet(sidekiq("sk", concurrency=concurrency)).load().findings, "config.bad-value")
    assert f.message == f"concurrency {concurrency} is outside 1–1000"


def test_sidekiq_keys_on_another_kind_are_an_error(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", extra="concurrency = 5"))
    f = only(fd.load().findings, "config.bad-key")
    assert f.key == "services.app.concurrency"
    assert f.hint == 'remove it, or set kind = "sidekiq"'


# ------------------------------------------------------------------ other service keys


def test_an_unknown_kind_suggests_the_closest(make_fleet: MakeFleet) -> None:
    f = only(make_fleet(generic("app").replace('"generic"', '"sidekick"')).load().findings, "config.bad-value")
    assert (f.key, f.message, f.hint) == ("services.app.kind", "unknown kind 'sidekick'", "did you mean sidekiq?")


def test_an_observe_only_service_may_not_have_a_unit_file(make_fleet: MakeFleet) -> None:
    f = only(make_fleet(generic("app", extra="observe_only = true")).load().findings, "config.bad-key")
    assert f.key == "services.app.unit_file"


def test_a_max_unavailable_below_one_is_an_error(make_fleet: MakeFleet) -> None:
    f = only(make_fleet(generic("app", extra="max_unavailable = 0")).load().findings, "config.bad-value")
    assert f.key == "services.app.max_unavailable"


@pytest.mark.parametrize(("health", "key", "text"), [
    ("{ tcp = 1, http = \"http://x/\" }", "services.app.health",
     "exactly one of command, http, tcp, sidekiq = true (has http, tcp)"),
    ("{ timeout = 3 }", "services.app.health", "(has none)"),
    ('{ http = "ftp://x/" }', "services.app.health.http", "is not an http:// or https:// URL"),
    ("{ tcp = 0 }", "services.app.health.tcp", "port 0 is outside 1–65535"),
    ("{ tcp = 80, timeout = 0 }", "services.app.health.timeout", "timeout must be positive"),
])
def test_a_malformed_health_check_is_an_error(make_fleet: MakeFleet, health: str, key: str, text: str) -> None:
    f = only(make_fleet(generic("app", extra=f"health = {health}")).load().findings, "config.bad-value")
    assert f.key == key and text in f.message


def test_a_health_timeout_of_nan_is_an_error(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", extra="health = { tcp = 80, timeout = nan }"))
    assert only(fd.load().findings, "config.bad-value").key == "services.app.health.timeout"


def test_each_health_check_form_is_described(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("h", extra='health = { http = "http://127.0.0.1/h" }')
                    + generic("t", extra="health = { tcp = 5432 }")
                    + generic("c", extra='health = { command = "true", timeout = 2.5 }'))
    d = fd.load().desired
    assert [d.service(n).health.describe() for n in "htc"] == ["GET http://127.0.0.1/h", "TCP port 5432",
                                                               "command `true`"]
    assert d.service("c").health.timeout == 2.5


ENV_LOADED = 'user = "mastodon"\nenvironment_files = ["/home/mastodon/live/.env.production"]'


def test_a_sidekiq_service_may_gate_on_its_heartbeat(make_fleet: MakeFleet) -> None:
    fd = make_fleet(sidekiq("sk", extra="health = { sidekiq = true }", unit_file=ENV_LOADED))
    loaded = fd.load()
    assert [f for f in loaded.findings if f.severity == "error"] == []
    health = loaded.desired.service("sk").health
    assert health is not None and health.sidekiq and health.describe() == "Sidekiq heartbeat with its declared queues"


@pytest.mark.parametrize(("service", "key", "code", "text"), [
    (generic("sk", extra="health = { sidekiq = true }"), "services.sk.health.sidekiq", "config.bad-value",
     'only applies to kind = "sidekiq"'),
    (sidekiq("sk", extra="health = { sidekiq = true }"), "services.sk.health.sidekiq", "config.bad-value",
     "this service loads none"),
    (sidekiq("sk", extra="health = { sidekiq = true, timeout = 5 }", unit_file=ENV_LOADED),
     "services.sk.health.timeout", "config.bad-key", "has no timeout of its own"),
    (sidekiq("sk", extra="health = { sidekiq = true, tcp = 80 }", unit_file=ENV_LOADED), "services.sk.health",
     "config.bad-value", "(has tcp, sidekiq)"),
    (sidekiq("sk", extra='health = { sidekiq = "yes" }', unit_file=ENV_LOADED), "services.sk.health.sidekiq",
     "config.wrong-type", "must be a boolean"),
])
def test_a_misplaced_sidekiq_health_check_is_an_error(make_fleet: MakeFleet, service: str, key: str, code: str,
                                                      text: str) -> None:
    f = only(make_fleet(service).load().findings, code)
    assert f.key == key and text in f.message, f


def test_a_misspelled_restart_value_suggests_the_systemd_one(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit_file='exec_start = "/bin/app"\nrestart = "allways"'))
    f = only(fd.load().findings, "config.bad-value")
    assert (f.key, f.hint) == ("services.app.unit_file.restart", "did you mean always?")


def test_a_relative_exec_start_is_an_error_naming_the_program(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit_file='exec_start = "bundle exec puma"'))
    f = only(fd.load().findings, "config.bad-value")
    assert f.message == "ExecStart must start with an absolute path, got 'bundle'"


def test_an_empty_exec_start_is_a_finding_not_a_crash(make_fleet: MakeFleet) -> None:
    f = only(make_fleet(generic("app", unit_file='exec_start = ""')).load().findings, "config.bad-value")
    assert f.key == "services.app.unit_file.exec_start"


def test_a_relative_environment_file_is_an_error(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit_file='exec_start = "/bin/app"\nenvironment_files = ["../.env"]'))
    assert only(fd.load().findings, "config.bad-value").key == "services.app.unit_file.environment_files"


def test_an_invalid_environment_variable_name_is_an_error(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit_file='exec_start = "/bin/app"\nenvironment = { "MY-VAR" = "1" }'))
    f = only(fd.load().findings, "config.bad-name")
    assert f.key == "services.app.unit_file.environment.MY-VAR"


def test_a_newline_in_a_unit_setting_is_an_error(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit_file='exec_start = "/bin/app"\ndescription = "two\\nlines"'))
    f = only(fd.load().findings, "config.bad-value")
    assert f.key == "services.app.unit_file.description"
    assert "newline or control character" in f.message


def test_a_unit_name_with_a_trailing_newline_is_refused(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit="app.service\\n"))
    assert only(fd.load().findings, "config.bad-name").key == "services.app.unit"


def test_unit_file_defaults_and_values_are_carried_into_the_spec(make_fleet: MakeFleet) -> None:
    fd = make_fleet(generic("app", unit_file='exec_start = "/bin/app"\nenvironment = { PORT = 3000 }\n'
                                             'after = ["network-online.target"]'))
    spec = fd.load().desired.service("app").unit_spec
    assert spec.env() == {"PORT": "3000"}
    assert spec.after == ("network-online.target",)
    assert spec.wanted_by == ("multi-user.target",)


# ------------------------------------------------------------------ policy, discover


def test_an_unknown_kind_in_a_placement_rule_suggests_the_closest(example: FleetDir) -> None:
    example.edit('forbid = ["sidekiq", "postgres", "redis"]', 'forbid = ["sidekiq", "postgress", "redis"]')
    loaded = example.load()
    f = only(loaded.findings, "config.bad-value")
    assert (f.key, f.line, f.hint) == ("policy.placement.cdn.forbid", 14, "did you mean postgres?")
    assert loaded.desired.placement[0].forbid == ("sidekiq", "redis")


def test_a_placement_rule_without_forbid_is_missing_a_key(make_fleet: MakeFleet) -> None:
    fd = make_fleet("[policy.placement.cdn]\nallow = []\n" + generic("app"))
    found = {(f.code, f.key) for f in fd.load().findings}
    assert found == {("config.unknown-key", "policy.placement.cdn.allow"),
                     ("config.missing-key", "policy.placement.cdn.forbid")}


def test_extra_env_keys_are_loaded_from_the_policy(make_fleet: MakeFleet) -> None:
    fd = make_fleet('[policy.env]\nextra_keys = ["MY_FEATURE"]\n' + generic("app"))
    assert fd.load().desired.extra_env_keys == ("MY_FEATURE",)


def test_a_discover_entry_needs_a_pattern_of_unit_glob_characters(make_fleet: MakeFleet) -> None:
    fd = make_fleet('[[discover]]\nprune = true\n\n[[discover]]\npattern = "a b*"\n\n' + generic("app"))
    found = {(f.code, f.key) for f in fd.load().findings}
    assert found == {("config.missing-key", "discover.pattern"), ("config.bad-name", "discover.pattern")}


def test_discover_must_be_an_array_of_tables(make_fleet: MakeFleet) -> None:
    f = only(make_fleet('discover = ["mastodon-*"]\n' + generic("app")).load().findings, "config.wrong-type")
    assert f.message == "'discover[0]' must be a table"


# ------------------------------------------------------------------ env files


ENV_BASE = generic("app", unit_file='exec_start = "/bin/app"\nenvironment_files = ["/srv/.env"]')


def test_an_env_file_needs_a_path_and_a_target(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\nvalues = { LOCAL_DOMAIN = "x" }\n')
    found = {(f.code, f.key) for f in fd.load().findings}
    assert found == {("config.missing-key", "env_files.e.path"), ("config.missing-key", "env_files.e")}


def test_an_env_file_naming_an_unknown_service_or_host_suggests_names(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\npath = "/srv/.env"\nservices = ["ap"]\nhosts = ["bb"]\n')
    findings = fd.load().findings
    assert only(findings, "config.unknown-service").hint == "did you mean app?"
    assert only(findings, "config.unknown-host").message == (
        f"env file 'e' names host 'bb', which has no file in {fd.hosts_dir}/")


def test_an_override_for_a_host_that_does_not_get_the_file_is_an_error(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\npath = "/srv/.env"\nservices = ["app"]\n\n'
                               '[env_files.e.overrides.b]\nS3_BUCKET = "x"\n')
    f = only(fd.load().findings, "config.unknown-host")
    assert f.key == "env_files.e.overrides.b"
    assert f.message == "override for host 'b', which does not get env file 'e'"


def test_env_values_become_strings_and_overrides_win_per_host(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\npath = "/srv/.env"\nservices = ["app"]\nhosts = ["b"]\nmode = "640"\n'
                               'values = { S3_ENABLED = true, DB_PORT = 5432, S3_BUCKET = "main" }\n\n'
                               '[env_files.e.overrides.b]\nS3_BUCKET = "edge"\n')
    loaded = fd.load()
    assert loaded.findings == ()
    (ef,) = loaded.desired.env_files
    assert ef.hosts == ("b", "a")
    assert ef.mode == "0640"
    assert ef.values_for("a") == {"S3_ENABLED": "true", "DB_PORT": "5432", "S3_BUCKET": "main"}
    assert ef.values_for("b")["S3_BUCKET"] == "edge"


def test_sensitive_sources_are_file_env_var_or_present(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\npath = "/srv/.env"\nservices = ["app"]\n'
                               'sensitive = { DB_PASS = "file", OTP_SECRET = "env:FLEET_OTP", '
                               'SECRET_KEY_BASE = "present" }\n')
    (ef,) = fd.load().desired.env_files
    assert dict(ef.sensitive) == {"DB_PASS": SecretSource("file"), "OTP_SECRET": SecretSource("env", "FLEET_OTP"),
                                  "SECRET_KEY_BASE": SecretSource("present")}
    assert [s.describe() for _, s in ef.sensitive] == ["file", "env:FLEET_OTP", "present"]


def test_a_secret_written_where_its_source_belongs_says_to_rotate_it(example: FleetDir) -> None:
    example.edit('DB_PASS = "file"', 'DB_PASS = "hunter2"')
    f = only(example.load().findings, "env.bad-secret-source")
    assert (f.key, f.line) == ("env_files.mastodon.sensitive.DB_PASS", 179)
    assert "must say where the secret comes from, not hold it" in f.message
    assert "rotate it" in f.hint
    assert "hunter2" not in f.message + f.hint


def test_an_octal_mode_is_required(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\npath = "/srv/.env"\nservices = ["app"]\nmode = "rw-------"\n')
    assert only(fd.load().findings, "config.bad-value").key == "env_files.e.mode"


def test_two_env_files_writing_one_path_on_one_host_are_an_error(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\npath = "/srv/.env"\nservices = ["app"]\n\n'
                               '[env_files.f]\npath = "/srv/.env"\nhosts = ["a"]\n')
    f = only(fd.load().findings, "env.duplicate-path")
    assert f.message == "env files 'e' and 'f' both write /srv/.env on host a"


def test_an_env_value_of_a_table_type_is_a_wrong_type(make_fleet: MakeFleet) -> None:
    fd = make_fleet(ENV_BASE + '[env_files.e]\npath = "/srv/.env"\nservices = ["app"]\n'
                               "values = { S3_BUCKET = [1] }\n")
    f = only(fd.load().findings, "config.wrong-type")
    assert f.message == "'env_files.e.values.S3_BUCKET' must be a string, not an array"


# ------------------------------------------------------------------ with_lines


def test_with_lines_gives_policy_findings_the_line_of_their_key(example: FleetDir) -> None:
    loaded = example.load()
    f = Finding("error", "x", "m", file=str(example.desired_path), key="services.sidekiq-scheduler.queues")
    other = Finding("error", "x", "m", file="elsewhere.toml", key="services.web")
    assert [g.line for g in config.with_lines([f, other], loaded)] == [132, None]


def test_default_paths_resolve_against_dir_unless_given() -> None:
    assert config.default_paths("/srv/fleet", None, None) == (Path("/srv/fleet/desired_state.toml"),
                                                              Path("/srv/fleet/hosts"))
    assert config.default_paths("/srv", "/etc/d.toml", "/etc/h") == (Path("/etc/d.toml"), Path("/etc/h"))


def test_every_toml_example_in_the_format_docs_is_valid_toml() -> None:
    import re
    import tomllib

    doc = (Path(__file__).resolve().parents[2] / "docs" / "desired-state.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert len(blocks) >= 8
    for block in blocks:
        tomllib.loads(block)


class _ScannedList(list[str]):
    """A list that counts the scans `in` makes of it."""

    scans = 0

    def __contains__(self, item: object) -> bool:
        self.scans += 1
        return super().__contains__(item)


def test_a_service_on_every_host_is_checked_without_a_scan_of_the_inventory_per_host(tmp_path: Path) -> None:
    """At 1,000 hosts × 23 services, a scan of the host files per listed host was a quarter of a
    second of every command."""
    names = [f"h{i:03d}" for i in range(40)]
    files = _ScannedList(names)
    ctx = config._Ctx("desired_state.toml")
    table = {"kind": "postgres", "unit": "postgresql.service", "hosts": [*names, "h999"], "observe_only": True}
    svc = config._load_service(ctx, "db", table, names, files, tmp_path, tmp_path)
    assert svc is not None and svc.hosts == tuple(names)
    assert files.scans == 0
    assert [f.code for f in ctx.findings] == ["config.unknown-host"] and "'h999'" in ctx.findings[0].message
