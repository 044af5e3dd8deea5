"""Property tests: whatever is in the files, loading gives findings, never a traceback.

Each example writes a fleet into its own `tempfile` directory (hypothesis runs many examples per
test, so the function-scoped tmp_path would be shared between them) and calls `config.load` and
`policy.check` on it.  The only exception allowed out of the loader is `ConfigError`, and only
when a file or directory is missing altogether, which these tests never arrange.
"""

from __future__ import annotations

import json
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet import config, policy
from fleet.model import Finding

FleetDirClass = Any  # conftest.FleetDir, handed in by the session-scoped `fleet_dir` fixture
ExampleTexts = Any  # conftest.ExampleTexts

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_and_check(fleet_dir: FleetDirClass, desired: str | bytes, hosts: dict[str, str | bytes]) -> config.Loaded:
    """Load a fleet written to a fresh temp dir; check every finding is well-formed."""
    with tempfile.TemporaryDirectory() as tmp:
        fd = fleet_dir.create(Path(tmp), desired, hosts)
        loaded = fd.load()
        findings = list(loaded.findings)
        if loaded.desired is not None:
            findings += config.with_lines(policy.check(loaded.desired), loaded)
        texts = dict(loaded.texts)
        for f in findings:
            assert_well_formed(f, texts)
        if not loaded.errors:
            assert loaded.desired is not None, "no errors, yet nothing loaded"
        return loaded


def assert_well_formed(f: Finding, texts: dict[str, str]) -> None:
    assert f.severity in ("error", "warning"), f
    assert f.code and f.message, f
    assert f.file, f  # every finding says which file (or directory) to look at
    if f.line is not None:
        assert f.line >= 1, f
        text = texts.get(f.file)
        if text is not None:
            assert f.line <= max(1, text.count("\n") + 1), f


# ------------------------------------------------------------------ raw bytes and TOML-ish text


@PROPERTY
@given(raw=st.binary(max_size=400))
def test_random_bytes_as_the_desired_file_give_findings(fleet_dir: FleetDirClass, example_texts: ExampleTexts,
                                                        raw: bytes) -> None:
    loaded = load_and_check(fleet_dir, raw, dict(example_texts.hosts))
    assert loaded.findings or loaded.desired is not None


@PROPERTY
@given(raw=st.binary(max_size=200))
def test_random_bytes_as_a_host_file_give_findings(fleet_dir: FleetDirClass, example_texts: ExampleTexts,
                                                   raw: bytes) -> None:
    load_and_check(fleet_dir, example_texts.desired, {**example_texts.hosts, "franz.toml": raw})


TOML_TOKENS = ["[services.web]", "[services.web.unit_file]", "[[discover]]", "[env_files.m]", "[policy.placement.cdn]",
               "[fleet]", "kind", "unit", "hosts", "requires", "queues", "concurrency", "exec_start", "values",
               "sensitive", "overrides", "forbid", "pattern", "health", " = ", "=", '"', "'", "[", "]", "{", "}",
               ",", ".", "\n", " ", "#", "true", "false", "1", "-1", "1.5", "nan", "inf", '"sidekiq"', '"web"',
               '"fritz"', '"/bin/x"', '""', "x.service", "\\", "\"\"\"", "1979-05-27", "\t", "é", "\x00"]


@PROPERTY
@given(tokens=st.lists(st.sampled_from(TOML_TOKENS), max_size=60))
def test_random_toml_ish_text_gives_findings(fleet_dir: FleetDirClass, example_texts: ExampleTexts,
                                             tokens: list[str]) -> None:
    load_and_check(fleet_dir, "".join(tokens), dict(example_texts.hosts))


@PROPERTY
@given(tokens=st.lists(st.sampled_from(TOML_TOKENS), max_size=30))
def test_random_toml_ish_host_files_give_findings(fleet_dir: FleetDirClass, example_texts: ExampleTexts,
                                                  tokens: list[str]) -> None:
    load_and_check(fleet_dir, example_texts.desired, {**example_texts.hosts, "fritz.toml": "".join(tokens)})


# ------------------------------------------------------------------ mutations of the shipped example


@st.composite
def mutated(draw: st.DrawFn, text: str) -> str:
    """The text after 1–4 edits: delete, duplicate or truncate a line, change or drop a character."""
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "change", "truncate-line", "truncate-file"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "change" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            c = draw(st.one_of(st.sampled_from(list("\"'[]{}=,.#\\ 0_-\n")), st.characters(codec="utf-8")))
            lines[i] = lines[i][:j] + c + lines[i][j + 1:]
        elif op == "truncate-line":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif op == "truncate-file":
            lines = lines[:i]
    return "".join(lines)


@PROPERTY
@given(data=st.data())
def test_mutations_of_the_shipped_example_give_findings(fleet_dir: FleetDirClass, example_texts: ExampleTexts,
                                                        data: st.DataObject) -> None:
    load_and_check(fleet_dir, data.draw(mutated(example_texts.desired)), dict(example_texts.hosts))


@PROPERTY
@given(data=st.data())
def test_mutations_of_the_shipped_host_files_give_findings(fleet_dir: FleetDirClass, example_texts: ExampleTexts,
                                                           data: st.DataObject) -> None:
    hosts = dict(example_texts.hosts)
    name = data.draw(st.sampled_from(sorted(hosts)))
    hosts[name] = data.draw(mutated(hosts[name]))
    load_and_check(fleet_dir, example_texts.desired, hosts)


# ------------------------------------------------------------------ structured tables, wrong types everywhere


def toml_string(s: str) -> str:
    # JSON string syntax is TOML basic-string syntax, except that TOML also wants DEL escaped.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


def table(header: str, items: dict[str, Any]) -> str:
    return f"[{header}]\n" + "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in items.items())


def document(data: dict[str, Any]) -> str:
    """A desired-state dict as TOML: top-level keys inline first (TOML wants them before any
    header), then one [services.NAME] / [env_files.NAME] table per entry."""
    sections = {k: v for k, v in data.items() if k in ("services", "env_files")}
    text = "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in data.items() if k not in sections)
    for section, entries in sections.items():
        for name, body in entries.items():
            text += table(f"{section}.{toml_string(name)}", body)
    return text


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
SCALARS = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), TEXT,
    st.sampled_from(["web", "sidekiq", "generic", "fritz", "franz", "default", "scheduler", "fasp", "/bin/true",
                     "file", "env:X", "present", "0600", "x.service", "http://127.0.0.1/", " ", "always"]))
INNER_KEYS = st.sampled_from(["default", "push", "scheduler", "S3_BUCKET", "S3_ENABLED", "DB_POOL", "DB_PASS",
                              "fritz", "franz", "http", "tcp", "command", "timeout", "x"])
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(INNER_KEYS, inner, max_size=3)), max_leaves=6)

SERVICE_KEYS = [*config.SERVICE_KEYS, "bogus"]
UNIT_FILE_KEYS = [*config.UNIT_FILE_KEYS, "exec_stat"]
ENV_FILE_KEYS = [*config.ENV_FILE_KEYS, "value"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(service=st.dictionaries(st.sampled_from(SERVICE_KEYS), VALUES, max_size=8),
       unit_file=st.one_of(st.none(), st.dictionaries(st.sampled_from(UNIT_FILE_KEYS), VALUES, max_size=6)),
       env_file=st.dictionaries(st.sampled_from(ENV_FILE_KEYS), VALUES, max_size=6),
       kind=st.sampled_from(["sidekiq", "web", "generic", None]))
def test_wrong_types_in_any_service_or_env_file_slot_give_only_findings(
        fleet_dir: FleetDirClass, example_texts: ExampleTexts, service: dict[str, Any],
        unit_file: dict[str, Any] | None, env_file: dict[str, Any], kind: str | None) -> None:
    service.pop("unit_file", None)  # written as its own table below
    if kind is not None:
        service["kind"] = kind
    text = table("services.s", service)
    if unit_file is not None:
        text += table("services.s.unit_file", unit_file)
    text += table("env_files.e", env_file)
    tomllib.loads(text)  # the generator writes valid TOML; only the loader's judgement is under test
    load_and_check(fleet_dir, text, dict(example_texts.hosts))


@settings(max_examples=200, deadline=None)
@given(host=st.dictionaries(st.sampled_from([*config.HOST_KEYS, "adress"]), VALUES, max_size=6))
def test_wrong_types_in_any_host_slot_give_only_findings(fleet_dir: FleetDirClass, example_texts: ExampleTexts,
                                                         host: dict[str, Any]) -> None:
    text = "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in host.items())
    load_and_check(fleet_dir, example_texts.desired, {**example_texts.hosts, "franz.toml": text})


def test_the_example_written_back_by_this_module_is_unchanged_and_clean(fleet_dir: FleetDirClass,
                                                                       example_texts: ExampleTexts) -> None:
    data = tomllib.loads(example_texts.desired)
    assert tomllib.loads(document(data)) == data
    loaded = load_and_check(fleet_dir, document(data), dict(example_texts.hosts))
    assert loaded.findings == ()


@settings(max_examples=100, deadline=None)
@given(edits=st.dictionaries(st.sampled_from(["web", "sidekiq-default", "sidekiq-scheduler", "postgres"]),
                             st.dictionaries(st.sampled_from(SERVICE_KEYS), VALUES, min_size=1, max_size=3),
                             min_size=1, max_size=2))
def test_wrong_types_injected_into_the_example_services_give_only_findings(
        fleet_dir: FleetDirClass, example_texts: ExampleTexts, edits: dict[str, dict[str, Any]]) -> None:
    data = tomllib.loads(example_texts.desired)
    for name, changes in edits.items():
        data["services"][name].update(changes)
    loaded = load_and_check(fleet_dir, document(data), dict(example_texts.hosts))
    assert loaded.desired is not None  # a bad service never loses the rest of the fleet


# ------------------------------------------------------------------ locate


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from(list("ab.=[]\"{}, \n#")), max_size=80),
       key=st.text(st.sampled_from(list("ab.[]\"")), max_size=8))
def test_locate_never_raises_and_points_inside_the_text(text: str, key: str) -> None:
    line = config.locate(text, key)
    assert line is None or 1 <= line <= max(1, len(text.splitlines()))


NAMES = ["web", "sidekiq", "postgres", "redis", "streaming"]


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(NAMES)), max_size=12))
def test_the_cycle_check_without_networkx_agrees_with_networkx(edges: list[tuple[str, str]]) -> None:
    """`fleet check` imports networkx only to name a cycle its own check found (config._has_cycle)."""
    import networkx as nx

    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from(NAMES)
    graph.add_edges_from((a, b) for a, b in edges if a != b)  # a service requiring itself is reported apart
    assert config._has_cycle(NAMES, edges) == (not nx.is_directed_acyclic_graph(graph))
