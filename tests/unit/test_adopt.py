"""`fleet adopt`: what the hosts run written as a fleet whose plan is empty (fleet/adopt.py, the
pure builder; fleet/workflows/adopt.py, the command).  The observed states are the stock fleet
of tests/fixtures/stock/ as its hosts report it once running, and the captured drifted host of
tests/fixtures/collect/ (a drop-in, a secret in a unit's Environment=)."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
from observed import (
    EXAMPLE_SECRETS,
    REPO,
    converged,
    edited,
    example,
    failed,
    hand_made_unit,
    set_env_value,
    with_drop_in,
    with_unit,
)

from fleet import cli, config, policy
from fleet.adopt import build, fragment_text
from fleet.collect.parse import parse_host
from fleet.model import Desired, HostResult, HostState
from fleet.plan import build_plan
from fleet.resources.drop_ins import DropIn
from fleet.textutil import sha256_hex
from fleet.workflows import observe as observing

STOCK = REPO / "tests" / "fixtures" / "stock"
COLLECT = REPO / "tests" / "fixtures" / "collect"


def stock() -> Desired:
    loaded = config.load(STOCK / "desired_state.toml", STOCK / "hosts")
    assert loaded.desired is not None and not loaded.errors, loaded.findings
    return loaded.desired


def write(tmp_path: Path, results: Mapping[str, HostState], name: str = "stock",
          hosts_dir: Path = STOCK / "hosts") -> Path:
    """The builder's files written as the workflow writes them, with the inventory's host files."""
    a = build(name, ["mastodon-*"], results)
    out = tmp_path / "adopted"
    (out / "hosts").mkdir(parents=True)
    (out / "desired_state.toml").write_text(a.desired_state)
    for h in results:
        shutil.copy(hosts_dir / f"{h}.toml", out / "hosts" / f"{h}.toml")
    for path, text in a.units:
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(text.encode())
    return out


def load_checked(directory: Path) -> Desired:
    loaded, findings = config.load_checked(directory / "desired_state.toml", directory / "hosts", policy.check)
    errors = [f for f in findings if f.is_error]
    assert loaded.desired is not None and not errors, errors
    return loaded.desired


def test_the_stock_fleet_adopted_plans_nothing_and_its_unit_files_are_the_hosts_own(tmp_path: Path) -> None:
    seen = converged(stock(), {})
    out = write(tmp_path, seen)
    adopted = load_checked(out)
    plan = build_plan(adopted, dict(seen), {})
    assert plan.complete and plan.changes == (), [c.id for c in plan.changes]
    for unit in ("mastodon-web.service", "mastodon-sidekiq.service", "mastodon-streaming@.service",
                 "mastodon-streaming.service"):
        assert (out / "units" / unit).read_bytes() == (STOCK / "units" / unit).read_bytes()
    streaming = adopted.service("streaming")
    assert streaming is not None and streaming.unit == "mastodon-streaming@.service"
    assert streaming.instances == ("4000", "4001") and streaming.wrapper is not None
    assert streaming.wrapper.unit == "mastodon-streaming.service"
    assert {s.name: (s.kind.value, s.hosts) for s in adopted.services} == {
        "web": ("web", ("fritz",)), "streaming": ("streaming", ("fritz",)), "sidekiq": ("sidekiq", ("freud",))}


def test_the_example_fleet_adopted_declares_its_env_files_with_every_secret_present(tmp_path: Path) -> None:
    seen = converged(example(), EXAMPLE_SECRETS)
    out = write(tmp_path, seen, "hachyderm", REPO / "hosts")
    text = (out / "desired_state.toml").read_text()
    assert not any(secret in text for secret in EXAMPLE_SECRETS.values())
    adopted = load_checked(out)
    (ef,) = adopted.env_files
    assert ef.path == "/home/mastodon/live/.env.production" and ef.name == "production"
    assert {k for k, _ in ef.sensitive} >= {"SECRET_KEY_BASE", "DB_PASS"}
    assert all(src.kind == "present" for _, src in ef.sensitive)
    assert dict(ef.values)["S3_ENABLED"] == "true"
    # the data stores DB_HOST and REDIS_HOST name are declared where they run, observe-only
    stores = {s.unit: (s.kind.value, s.observe_only, s.hosts) for s in adopted.services if s.observe_only}
    assert stores == {"postgresql.service": ("postgres", True, ("nietzsche",)),
                      "redis-server.service": ("redis", True, ("nietzsche",))}
    assert build_plan(adopted, dict(seen), {}).changes == ()


def test_hosts_holding_different_env_files_get_one_declaration_each(tmp_path: Path) -> None:
    seen = converged(example(), EXAMPLE_SECRETS)
    seen["franz"] = set_env_value(seen["franz"], "S3_ENABLED", "false")
    out = write(tmp_path, seen, "hachyderm", REPO / "hosts")
    adopted = load_checked_allowing(out, "env.inconsistent")
    by_name = {ef.name: ef for ef in adopted.env_files}
    assert set(by_name) == {"production", "production-2"}
    franz = next(ef for ef in by_name.values() if "franz" in ef.hosts)
    assert franz.hosts == ("franz",) and dict(franz.values)["S3_ENABLED"] == "false"
    assert build_plan(adopted, dict(seen), {}).changes == ()


def load_checked_allowing(directory: Path, *codes: str) -> Desired:
    """Loaded; the only errors are what the hosts really hold (the checks judge it, as they should)."""
    loaded, findings = config.load_checked(directory / "desired_state.toml", directory / "hosts", policy.check)
    errors = [f for f in findings if f.is_error and f.code not in codes]
    assert loaded.desired is not None and not errors, errors
    return loaded.desired


def test_per_host_instances_become_overrides(tmp_path: Path) -> None:
    d = stock()
    seen = converged(d, {})
    fritz = seen["fritz"]
    # a second app host running only @4000 (same files)
    only_4000 = tuple(u for u in fritz.units if u.unit != "mastodon-streaming@4001.service")
    freud = HostState(host="freud", facts=seen["freud"].facts, units=seen["freud"].units + only_4000, env_files=())
    out = write(tmp_path, {"fritz": fritz, "freud": freud})
    text = (out / "desired_state.toml").read_text()
    assert '[services.streaming.overrides.freud]\ninstances = ["4000"]' in text
    adopted = load_checked(out)
    assert build_plan(adopted, {"fritz": fritz, "freud": freud}, {}).changes == ()


def test_hosts_running_different_texts_of_one_unit_get_a_service_each(tmp_path: Path) -> None:
    seen = converged(stock(), {})
    web = seen["fritz"].unit("mastodon-web.service")
    assert web is not None
    seen["freud"] = with_unit(seen["freud"], web)
    seen["freud"] = edited(seen["freud"], "mastodon-web.service")
    out = write(tmp_path, seen)
    adopted = load_checked(out)
    webs = {s.name: (s.hosts, s.unit_spec.source if s.unit_spec else "") for s in adopted.services
            if s.unit == "mastodon-web.service"}
    # in inventory order: freud (its edited text) first
    assert webs == {"web": (("freud",), "units/mastodon-web.service"),
                    "web-2": (("fritz",), "units/2/mastodon-web.service")}
    assert (out / "units" / "mastodon-web.service").read_text().endswith("Nice=5\n")
    stock_web = (STOCK / "units" / "mastodon-web.service").read_bytes()
    assert (out / "units" / "2" / "mastodon-web.service").read_bytes() == stock_web
    assert build_plan(adopted, dict(seen), {}).changes == ()


def test_a_failed_instance_is_left_out_and_said(tmp_path: Path) -> None:
    seen = converged(stock(), {})
    seen["fritz"] = failed(seen["fritz"], "mastodon-streaming@4001.service")
    a = build("stock", ["mastodon-*"], seen)
    assert 'instances = ["4000"]' in a.desired_state
    assert any("mastodon-streaming@4001.service is failed/failed" in n and "fleet would start it" in n
               for n in a.notes), a.notes


def test_the_captured_drifted_host_is_observed_only_where_its_file_cannot_be_written_back(tmp_path: Path) -> None:
    franz = parse_host("franz", (COLLECT / "drifted-franz.txt").read_text())
    web = franz.unit("mastodon-web.service")
    # its Environment= carries AWS_SECRET_ACCESS_KEY, masked on the host: the text is not the file
    assert web is not None and web.text is not None and "(masked-on-host)" in web.text and fragment_text(web) is None
    a = build("x", ["mastodon-*"], {"franz": franz})
    assert a.units == ()  # nothing fleet may write: the web unit has a drop-in, Sidekiq's text was not dumped
    assert "observe_only = true" in a.desired_state
    assert any("mastodon-web.service has drop-ins" in n for n in a.notes)
    assert any("mastodon-sidekiq.service's file did not come back byte for byte" in n for n in a.notes)
    assert any("postgresql.service is inactive/dead: not declared" in n for n in a.notes)


def test_a_unit_with_a_drop_in_is_adopted_with_the_drop_in_declared_and_the_plan_is_empty(tmp_path: Path) -> None:
    seen = converged(stock(), {})
    limits = "[Service]\nLimitNOFILE=131072\n"
    seen["fritz"] = with_drop_in(seen["fritz"], "mastodon-web.service", "10-limits.conf", limits)
    path = "/etc/systemd/system/mastodon-web.service.d/10-limits.conf"
    seen["fritz"] = dataclasses.replace(seen["fritz"], extra=(("dropins", (
        DropIn("mastodon-web.service", path, sha256_hex(limits)),)),))
    web = seen["fritz"].unit("mastodon-web.service")
    assert web is not None and fragment_text(web) == (STOCK / "units" / "mastodon-web.service").read_text()
    out = write(tmp_path, seen)
    assert (out / "units" / "mastodon-web.service").read_text() == fragment_text(web)
    assert (out / "units" / "mastodon-web.service.d" / "10-limits.conf").read_text() == limits
    adopted = load_checked(out)
    svc = adopted.service("web")
    assert svc is not None and not svc.observe_only
    assert svc.dropins is not None and [(d.name, d.text) for d in svc.dropins] == [("10-limits.conf", limits)]
    assert build_plan(adopted, dict(seen), {}).changes == ()
    # the drop-in is what keeps the plan empty: without it declared, the rewrite would remove it
    bare_web = (out / "desired_state.toml").read_text().replace(
        '[services.web.dropins]\n"10-limits.conf" = "units/mastodon-web.service.d/10-limits.conf"\n', "")
    (out / "desired_state.toml").write_text(bare_web)
    assert [c.action.value for c in build_plan(load_checked(out), dict(seen), {}).changes][:1] == ["write-unit"]


def test_an_instances_own_drop_in_cannot_be_declared_and_its_service_is_observed_only() -> None:
    seen = converged(stock(), {})
    seen["fritz"] = with_drop_in(seen["fritz"], "mastodon-streaming@4001.service", "10-x.conf", "[Service]\n")
    a = build("stock", ["mastodon-*"], seen)
    assert "dropins" not in a.desired_state
    assert any("mastodon-streaming@4001.service has drop-ins fleet cannot declare" in n for n in a.notes), a.notes


def test_a_unit_whose_secret_was_masked_on_the_host_is_not_written_masked() -> None:
    seen = converged(stock(), {})
    u = hand_made_unit("mastodon-extra.service", "/usr/bin/true")
    text = "[Service]\nEnvironment=\"DB_PASS=(masked-on-host)\"\nExecStart=/usr/bin/true\n"
    masked = u.__class__(**{**u.__dict__, "text": f"# {u.fragment_path}\n{text}",
                            "file_hashes": ((u.fragment_path, "0" * 64),)})
    a = build("stock", ["mastodon-*"], {**seen, "fritz": with_unit(seen["fritz"], masked)})
    assert all("mastodon-extra" not in path for path, _ in a.units)
    assert any("mastodon-extra.service's file did not come back byte for byte" in n for n in a.notes)


def test_adopt_refuses_a_non_empty_target_without_force_and_touches_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "t"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    monkeypatch.setattr(observing, "observe", lambda *a, **k: pytest.fail("observed before refusing"))
    code = cli.main(["--dir", str(STOCK), "adopt", str(target)])
    assert code == 1
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_adopt_refuses_a_target_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    assert cli.main(["--dir", str(STOCK), "adopt", str(target)]) == 1
    assert "is not a directory" in capsys.readouterr().err and target.read_text() == "x"


def test_adopt_writes_the_fleet_through_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, HostResult] = dict(converged(stock(), {}))
    calls: list[Desired] = []

    def observe(common: object, scope: object, command: str, desired: Desired, *rest: object) -> observing.Observation:
        calls.append(desired)
        return observing.Observation(seen, "")

    monkeypatch.setattr(observing, "observe", observe)
    monkeypatch.setattr(observing, "open_transport", lambda *a: _Closing())
    target = tmp_path / "new"
    code = cli.main(["--dir", str(STOCK), "--state-dir", str(tmp_path / "state"), "adopt", str(target)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 service(s), 4 unit file(s)" in out and "health checks are not observed" in out
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "desired_state.toml", "hosts/freud.toml", "hosts/fritz.toml", "units/mastodon-sidekiq.service",
        "units/mastodon-streaming.service", "units/mastodon-streaming@.service", "units/mastodon-web.service"]
    # the second collection declares every unit the first found, so that their text is dumped
    assert calls[0].services == () and {s.unit for s in calls[1].services} >= {"mastodon-web.service",
                                                                               "mastodon-streaming@4001.service"}
    assert build_plan(load_checked(target), seen, {}).changes == ()


class _Closing:
    def __enter__(self) -> _Closing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
