"""The metrics file: what the Prometheus client library's own parser (the reference reader of the
text exposition format) reads back from it — drift as a series with value 1, hosts up or down,
findings by rule — with hostile names escaped, no secret anywhere, and written atomically."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from observed import ENV_PATH, EXAMPLE_SECRETS, unreachable
from prometheus_client.parser import text_string_to_metric_families
from watch_scenarios import HOSTILE_UNIT, T0, baseline, desired, incident, leaks, s3_hand_edit

from fleet.audit import build_audit
from fleet.errors import FleetError
from fleet.model import HostResult
from fleet.output.metrics import escape_label_value, metrics_path_problem, metrics_text, write_metrics
from fleet.textutil import printable

FAMILIES = {"fleet_unit_state", "fleet_drift", "fleet_drift_coverage_ratio", "fleet_findings", "fleet_host_up",
            "fleet_last_observation_timestamp_seconds"}


def parse(results: dict[str, HostResult], now: float = T0) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = metrics_text(build_audit(desired(), results), now=now)
    families = list(text_string_to_metric_families(text))
    return {f.name: [(dict(s.labels), s.value) for s in f.samples] for f in families}


def series(parsed: dict[str, Any], name: str, **labels: str) -> list[float]:
    return [v for lbl, v in parsed[name] if all(lbl.get(k) == want for k, want in labels.items())]


def test_a_drift_is_a_series_with_value_1() -> None:
    parsed = parse(s3_hand_edit(baseline()))
    assert series(parsed, "fleet_drift", host="franz", kind="env", target=ENV_PATH, **{"class": "changed"}) == [1.0]
    assert all(v == 1.0 for _, v in parsed["fleet_drift"])
    assert series(parse(baseline()), "fleet_drift") == [], "a converged fleet has no drift series"


def test_every_family_is_a_documented_gauge_and_the_file_is_well_formed() -> None:
    text = metrics_text(build_audit(desired(), incident()), now=T0)
    families = list(text_string_to_metric_families(text))
    assert {f.name for f in families} == FAMILIES
    assert all(f.type == "gauge" and f.documentation for f in families)
    for name in FAMILIES:  # exactly one HELP and TYPE each, before the family's samples
        helps = [i for i, line in enumerate(text.splitlines()) if line.startswith(f"# HELP {name} ")]
        types = [i for i, line in enumerate(text.splitlines()) if line == f"# TYPE {name} gauge"]
        first = min((i for i, line in enumerate(text.splitlines()) if re.match(rf"{name}[{{ ]", line)), default=None)
        assert len(helps) == len(types) == 1 and (first is None or helps[0] < types[0] < first)
    assert text.endswith("\n") and "\r" not in text


def test_unit_states_say_which_status_each_unit_has_on_each_host() -> None:
    parsed = parse(incident())
    stopped = "mastodon-sidekiq-scheduler.service"
    assert series(parsed, "fleet_unit_state", host="nietzsche", unit=stopped, status="drift") == [1.0]
    assert series(parsed, "fleet_unit_state", host="nietzsche", unit=stopped, status="ok") == [0.0]
    assert series(parsed, "fleet_unit_state", host="franz", unit="mastodon-sidekiq.service", status="unmanaged",
                  service="") == [1.0]
    assert series(parsed, "fleet_unit_state", host="fritz", unit="mastodon-web.service", service="web",
                  status="ok") == [1.0]
    # one current status per unit and host
    current: dict[tuple[str, str], float] = {}
    for labels, v in parsed["fleet_unit_state"]:
        current[(labels["host"], labels["unit"])] = current.get((labels["host"], labels["unit"]), 0) + v
    assert set(current.values()) == {1.0}


def test_an_unreachable_host_is_down_and_its_units_unknown() -> None:
    results = baseline()
    results["freud"] = unreachable("freud")
    parsed = parse(results)
    assert series(parsed, "fleet_host_up", host="freud") == [0.0]
    assert series(parsed, "fleet_host_up", host="fritz") == [1.0]
    assert set(series(parsed, "fleet_unit_state", host="freud", status="unknown")) == {1.0}


def test_findings_are_counted_by_severity_and_rule() -> None:
    parsed = parse(incident())
    # S3_ENABLED and each of the example's secrets, changed by hand on franz
    assert series(parsed, "fleet_findings", severity="error", rule="env.inconsistent") == [1.0 + len(EXAMPLE_SECRETS)]
    assert series(parsed, "fleet_findings", severity="warning", rule="env.invalid-lines") == [1.0]
    assert series(parse(baseline()), "fleet_findings") == []


def test_every_series_names_its_fleet_and_the_observation_time_is_a_gauge() -> None:
    parsed = parse(baseline(), now=T0 + 0.25)
    assert all(labels["fleet"] == "hachyderm" for samples in parsed.values() for labels, _ in samples)
    assert parsed["fleet_last_observation_timestamp_seconds"] == [({"fleet": "hachyderm"}, T0 + 0.25)]


def test_hostile_names_round_trip_through_the_parser_escaped() -> None:
    results = incident()
    parsed = parse(results)
    units = {labels["unit"] for labels, _ in parsed["fleet_unit_state"]}
    assert printable(HOSTILE_UNIT) in units  # quotes and backslashes survive; ESC is spelled out
    # a quote, a backslash before a letter that is an escape (`\\n` as two characters), a line
    # feed, a carriage return (no escape in the format: spelled out) and a trailing backslash
    nasty = 'a"b\\nc\nd\re\\'
    text = f'm{{x="{escape_label_value(nasty)}",y="z"}} 1\n'
    [family] = text_string_to_metric_families(text)
    assert family.samples[0].labels == {"x": 'a"b\\nc\nd\\x0de\\', "y": "z"}


def test_no_secret_or_fingerprint_reaches_the_metrics() -> None:
    assert leaks(metrics_text(build_audit(desired(), incident()), now=T0)) == []


def test_the_file_is_replaced_atomically_and_readable_by_node_exporter(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.prom"
    write_metrics(path, "first 1\n")
    assert path.read_text() == "first 1\n" and stat.S_IMODE(path.stat().st_mode) == 0o644

    def killed(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(FleetError, match="cannot write the metrics file .*fleet.prom: No space left"):
        write_metrics(path, "second 2\n")
    monkeypatch.undo()
    assert path.read_text() == "first 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet.prom"], "no temporary file left behind"
    write_metrics(path, "third 3\n")
    assert path.read_text() == "third 3\n"


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FleetError) as e:
        write_metrics(tmp_path / "nope" / "fleet.prom", "x 1\n")
    assert "nope" in str(e.value) and e.value.hint


@pytest.mark.parametrize("name, ok", [("fleet.prom", True), ("fleet.txt", False), (".fleet.prom", False),
                                      ("fleet.prom.tmp", False)])
def test_only_a_prom_file_is_read_by_the_collector(name: str, ok: bool) -> None:
    assert (metrics_path_problem(f"/var/lib/node_exporter/{name}") is None) == ok
