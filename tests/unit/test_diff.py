"""diff(desired, observed, secrets): what must change on which host, and why.  Plain data only.

The desired state is the shipped example (hachyderm: fritz app, franz CDN, freud worker and
former db host, nietzsche db + worker); observed states come from tests/unit/observed.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import pytest
from observed import (
    ENV_PATH,
    EXAMPLE_SECRETS,
    bare,
    bare_host,
    change_unit,
    converged,
    disabled,
    distro_unit,
    drop_env_key,
    edited,
    env_meta,
    example,
    failed,
    hand_made_unit,
    service,
    set_env_secret,
    set_env_value,
    stopped,
    undeclared_sidekiq,
    unit_of,
    unreachable,
    with_drop_in,
    with_unit,
    without_unit,
)

from fleet.actions import Action, Change
from fleet.collect.parse import parse_texts, parse_units
from fleet.diff import Diff, diff
from fleet.envfile import fingerprint
from fleet.model import Desired, HostResult, HostState, SecretSource
from fleet.textutil import sha256_hex
from fleet.units import as_observed_text, mask_unit_text, render_unit

S = EXAMPLE_SECRETS
MASKED = re.compile(r"^\(sensitive, sha256:[0-9a-f]{8}\)$")
WEB, STREAMING = "mastodon-web.service", "mastodon-streaming.service"
SK_DEFAULT, SK_PUSH = "mastodon-sidekiq-default.service", "mastodon-sidekiq-push-pull.service"


@pytest.fixture
def desired() -> Desired:
    return example()


@pytest.fixture
def fleet(desired: Desired) -> dict[str, HostState]:
    """The example fleet, converged: tests drift one thing at a time from here."""
    return converged(desired, S)


def on(d: Diff, host: str) -> list[Change]:
    return [c for c in d.changes if c.host == host]


def ids(changes: list[Change] | Diff) -> set[str]:
    return {c.id for c in (changes.changes if isinstance(changes, Diff) else changes)}


def one(d: Diff, host: str, action: Action, target: str) -> Change:
    found = [c for c in d.changes if (c.host, c.action, c.target) == (host, action, target)]
    assert len(found) == 1, f"expected one {host}:{action}:{target}, plan has:\n" + "\n".join(sorted(ids(d)))
    return found[0]


def masked(fp: str) -> str:
    return f"(sensitive, sha256:{fp[:8]})"


# ------------------------------------------------------------------ bare hosts


def test_a_bare_host_gets_each_managed_unit_written_enabled_and_started(desired: Desired) -> None:
    d = diff(desired, {"fritz": bare_host(desired, "fritz")}, S)
    assert ids(d) == {
        f"fritz:write-env:{ENV_PATH}",
        f"fritz:write-unit:{WEB}", f"fritz:enable:{WEB}", f"fritz:start:{WEB}",
        f"fritz:write-unit:{STREAMING}", f"fritz:enable:{STREAMING}", f"fritz:start:{STREAMING}",
        "fritz:daemon-reload:systemd",
    }
    write = one(d, "fritz", Action.WRITE_UNIT, WEB)
    assert (write.service, write.before, write.after) == ("web", "absent", "/etc/systemd/system/mastodon-web.service")
    assert write.payload.content_hash == sha256_hex(render_unit(service(desired, "web")))
    assert "+ExecStart=/home/mastodon/.rbenv/shims/bundle exec puma -C config/puma.rb" in write.payload.diff
    assert one(d, "fritz", Action.START, WEB).after == "active/running"


def test_observe_only_services_are_enabled_and_started_but_never_written(desired: Desired) -> None:
    d = diff(desired, {"nietzsche": bare_host(desired, "nietzsche")}, S)
    for unit in ("postgresql.service", "redis-server.service"):
        assert {c.action for c in d.changes if c.target == unit} == {Action.ENABLE, Action.START}
    written = {c.target for c in d.changes if c.action == Action.WRITE_UNIT}
    assert written == {SK_PUSH, "mastodon-sidekiq-scheduler.service"}


def test_a_missing_env_file_is_written_with_every_key_set_and_secrets_masked(desired: Desired) -> None:
    d = diff(desired, {"freud": bare_host(desired, "freud")}, S)
    w = one(d, "freud", Action.WRITE_ENV, ENV_PATH)
    ef = desired.env_files[0]
    assert w.before == "absent" and w.reason == "file is missing"
    assert {k for k, *_ in w.payload.keys} == set(ef.values_for("freud")) | set(ef.sensitive_keys())
    assert {op for _, op, _, _ in w.payload.keys} == {"set"}
    shown = {k: after for k, _, _, after in w.payload.keys}
    for key in ef.sensitive_keys():
        assert MASKED.match(shown[key]), shown[key]
        assert shown[key] == masked(fingerprint(S[("mastodon", key)]))
    assert shown["S3_BUCKET"] == "hachyderm-media"  # plain values are shown as they are
    p = w.payload
    assert (p.owner, p.group, p.mode, p.name) == ("mastodon", "mastodon", "0600", "mastodon")


def test_the_changes_never_hold_a_secret_value(desired: Desired) -> None:
    text = repr(diff(desired, bare(desired), S))
    for value in S.values():
        assert value not in text


def test_every_change_has_a_one_line_reason(desired: Desired) -> None:
    for c in diff(desired, bare(desired), S).changes:
        assert c.reason and "\n" not in c.reason, c


# ------------------------------------------------------------------ converged and drifted


def test_a_converged_fleet_has_nothing_to_do(desired: Desired, fleet: dict[str, HostState]) -> None:
    assert diff(desired, fleet, S) == Diff(changes=())


def test_volatile_facts_like_pids_and_restart_counts_are_not_drift(desired: Desired,
                                                                   fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = change_unit(fleet["fritz"], WEB, main_pid=77, n_restarts=9, active_enter="yesterday")
    assert diff(desired, fleet, S).changes == ()


def test_an_env_only_change_rewrites_the_file_and_restarts_every_unit_that_loads_it(
        desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = set_env_value(fleet["fritz"], "S3_BUCKET", "old-bucket")
    d = diff(desired, fleet, S)
    assert ids(d) == {f"fritz:write-env:{ENV_PATH}", f"fritz:restart:{WEB}", f"fritz:restart:{STREAMING}"}
    w = one(d, "fritz", Action.WRITE_ENV, ENV_PATH)
    assert w.payload.keys == (("S3_BUCKET", "change", "old-bucket", "hachyderm-media"),)
    assert w.reason == "1 key(s) differ"
    r = one(d, "fritz", Action.RESTART, WEB)
    assert ENV_PATH in r.reason and r.before.startswith("active/running")


def test_a_changed_secret_is_shown_by_its_fingerprint_only(desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["freud"] = set_env_secret(fleet["freud"], "DB_PASS", "old-password")
    d = diff(desired, fleet, S)
    w = one(d, "freud", Action.WRITE_ENV, ENV_PATH)
    assert w.payload.keys == (("DB_PASS", "change", masked(fingerprint("old-password")),
                       masked(fingerprint(S[("mastodon", "DB_PASS")]))),)
    assert "old-password" not in repr(d) and S[("mastodon", "DB_PASS")] not in repr(d)
    assert {c.action for c in d.changes} == {Action.WRITE_ENV, Action.RESTART}


def test_a_missing_key_is_set_and_an_undeclared_one_removed(desired: Desired, fleet: dict[str, HostState]) -> None:
    state = drop_env_key(fleet["franz"], "CDN_HOST")
    state = drop_env_key(state, "SMTP_PORT")
    state = set_env_value(state, "3_BUCKET", "typo")
    state = set_env_secret(state, "CACHE_REDIS_PASSWORD", "leftover")
    fleet["franz"] = state
    w = one(diff(desired, fleet, S), "franz", Action.WRITE_ENV, ENV_PATH)
    assert set(w.payload.keys) == {
        ("SMTP_PORT", "set", "", "587"),
        ("3_BUCKET", "remove", "typo", ""),
        ("CACHE_REDIS_PASSWORD", "remove", masked(fingerprint("leftover")), ""),
    }


def test_a_wrong_owner_or_mode_rewrites_the_env_file_and_says_so(desired: Desired,
                                                                 fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = env_meta(fleet["fritz"], mode="0644", owner="root")
    w = one(diff(desired, fleet, S), "fritz", Action.WRITE_ENV, ENV_PATH)
    assert w.payload.keys == ()
    assert "owner/mode root:mastodon 0644, should be mastodon:mastodon 0600" in w.reason


@pytest.mark.parametrize(("meta", "observed"), [
    ({"owner": "root"}, "root:mastodon 0600"),
    ({"group": "root"}, "mastodon:root 0600"),
    ({"mode": "0640"}, "mastodon:mastodon 0640"),
], ids=["owner-alone", "group-alone", "mode-alone"])
def test_each_of_owner_group_and_mode_alone_is_drift_of_the_env_file(desired: Desired, fleet: dict[str, HostState],
                                                                     meta: dict[str, str], observed: str) -> None:
    fleet["fritz"] = env_meta(fleet["fritz"], **meta)
    d = diff(desired, fleet, S)
    w = one(d, "fritz", Action.WRITE_ENV, ENV_PATH)
    assert w.payload.keys == ()
    assert w.reason == f"owner/mode {observed}, should be mastodon:mastodon 0600"
    assert ids(d) == {f"fritz:write-env:{ENV_PATH}", f"fritz:restart:{WEB}", f"fritz:restart:{STREAMING}"}


@pytest.mark.parametrize("held", ["TRUE", "True", "true ", " true"])
def test_an_env_value_differing_only_in_case_or_spacing_is_drift(desired: Desired, fleet: dict[str, HostState],
                                                                  held: str) -> None:
    # The postmortem: the host said S3_ENABLED=TRUE, the declaration "true"; Mastodon compares
    # exactly (ENV["S3_ENABLED"] == "true"), so TRUE left object storage off.
    assert desired.env_files[0].values_for("fritz")["S3_ENABLED"] == "true"
    fleet["fritz"] = set_env_value(fleet["fritz"], "S3_ENABLED", held)
    w = one(diff(desired, fleet, S), "fritz", Action.WRITE_ENV, ENV_PATH)
    assert w.payload.keys == (("S3_ENABLED", "change", held, "true"),)


def test_an_edited_unit_is_rewritten_with_a_unified_diff_then_reloaded_and_restarted(
        desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = edited(fleet["fritz"], WEB, "Nice=5")
    d = diff(desired, fleet, S)
    assert ids(d) == {f"fritz:write-unit:{WEB}", "fritz:daemon-reload:systemd", f"fritz:restart:{WEB}"}
    w = one(d, "fritz", Action.WRITE_UNIT, WEB)
    assert w.reason == "unit file differs from the declaration"
    assert w.before == w.after == "/etc/systemd/system/mastodon-web.service"
    assert w.payload.diff.startswith("--- fritz:mastodon-web.service (now)\n+++ fritz:mastodon-web.service (desired)\n")
    assert "\n-Nice=5\n" in w.payload.diff
    assert [ln for ln in w.payload.diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")] == ["-Nice=5"]
    assert "unit file" in one(d, "fritz", Action.RESTART, WEB).reason


def test_a_hand_made_drop_in_is_removed_by_the_unit_write(desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["freud"] = with_drop_in(fleet["freud"], SK_DEFAULT)
    d = diff(desired, fleet, S)
    w = one(d, "freud", Action.WRITE_UNIT, SK_DEFAULT)
    assert w.payload.remove_files == ("/etc/systemd/system/mastodon-sidekiq-default.service.d/override.conf",)
    assert "removes 1 drop-in(s)" in w.reason
    assert "-Environment=DB_POOL=5" in w.payload.diff
    assert ids(d) == {w.id, "freud:daemon-reload:systemd", f"freud:restart:{SK_DEFAULT}"}


def test_a_unified_diff_of_a_new_unit_is_the_whole_rendered_text(desired: Desired) -> None:
    w = one(diff(desired, {"fritz": bare_host(desired, "fritz")}, S), "fritz", Action.WRITE_UNIT, STREAMING)
    added = [ln[1:] for ln in w.payload.diff.splitlines(keepends=True)[3:]]
    assert "".join(added) == as_observed_text(service(desired, "streaming"))


def test_every_unit_diff_is_difflibs_for_its_own_host_although_bodies_are_computed_once(desired: Desired) -> None:
    """diff() diffs a (before, after) pair of texts once and reuses the body on every host."""
    observed: dict[str, HostResult] = dict(bare(desired))
    observed["fritz"] = edited(converged(desired, S)["fritz"], WEB, "Nice=5")
    observed["franz"] = edited(converged(desired, S)["franz"], WEB, "Nice=5")
    observed["freud"] = edited(converged(desired, S)["freud"], SK_DEFAULT, "Nice=7")
    writes = [c for c in diff(desired, observed, S).changes if c.action == Action.WRITE_UNIT]
    assert {c.host for c in writes} == {"fritz", "franz", "freud", "nietzsche"}
    for c in writes:
        state = observed[c.host]
        assert isinstance(state, HostState)
        u = state.unit(c.target)
        before = mask_unit_text(u.text or "") if u is not None and u.exists else ""
        after = as_observed_text(service(desired, c.service or ""))
        want = "".join(difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True),
            fromfile=f"{c.host}:{c.target} (now)", tofile=f"{c.host}:{c.target} (desired)"))
        assert c.payload.diff == want and want


def test_a_stopped_unit_is_started_and_a_disabled_one_enabled_without_rewrites(
        desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["nietzsche"] = disabled(stopped(fleet["nietzsche"], "redis-server.service"), SK_PUSH)
    d = diff(desired, fleet, S)
    assert ids(d) == {"nietzsche:start:redis-server.service", f"nietzsche:enable:{SK_PUSH}"}
    s = one(d, "nietzsche", Action.START, "redis-server.service")
    assert s.before == "inactive/dead, enabled" and s.reason == "declared to run here; now inactive/dead, enabled"
    assert one(d, "nietzsche", Action.ENABLE, SK_PUSH).before == "disabled"


def test_a_failed_unit_is_started_again(desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["freud"] = failed(fleet["freud"], SK_DEFAULT)
    assert ids(diff(desired, fleet, S)) == {f"freud:start:{SK_DEFAULT}"}


def test_a_managed_unit_that_is_active_but_not_running_is_restarted(desired: Desired,
                                                                    fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = change_unit(fleet["fritz"], STREAMING, sub_state="exited")
    assert ids(diff(desired, fleet, S)) == {f"fritz:restart:{STREAMING}"}


def test_postgres_active_but_exited_is_healthy_because_it_is_observe_only(desired: Desired,
                                                                         fleet: dict[str, HostState]) -> None:
    assert unit_of(fleet["nietzsche"], "postgresql.service").sub_state == "exited"
    assert diff(desired, fleet, S).changes == ()


def test_an_observe_only_unit_with_any_text_is_never_rewritten(desired: Desired,
                                                               fleet: dict[str, HostState]) -> None:
    fleet["nietzsche"] = change_unit(fleet["nietzsche"], "postgresql.service", text_hash="0" * 64)
    assert diff(desired, fleet, S).changes == ()


def test_a_unit_removed_from_a_host_is_installed_again(desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["franz"] = without_unit(fleet["franz"], WEB)
    d = diff(desired, fleet, S)
    assert ids(d) == {f"franz:write-unit:{WEB}", f"franz:enable:{WEB}", f"franz:start:{WEB}",
                      "franz:daemon-reload:systemd"}


def test_a_present_secret_missing_on_the_host_is_a_problem_fleet_does_not_fix(desired: Desired) -> None:
    ef = desired.env_files[0]
    ef2 = dataclasses.replace(ef, sensitive=ef.sensitive + (("ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY",
                                                              SecretSource("present")),))
    desired2 = dataclasses.replace(desired, env_files=(ef2,))
    d = diff(desired2, converged(desired, S), S)
    assert d.changes == ()
    assert len(d.problems) == 4 and all("ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY" in p for p in d.problems)


def test_a_secret_with_no_resolved_value_is_neither_set_nor_removed(desired: Desired,
                                                                   fleet: dict[str, HostState]) -> None:
    partial = {k: v for k, v in S.items() if k[1] != "SMTP_PASSWORD"}
    assert diff(desired, fleet, partial).changes == ()


# ------------------------------------------------------------------ pruning


def test_an_undeclared_sidekiq_on_the_cdn_node_is_pruned_with_stop_disable_remove(
        desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    d = diff(desired, fleet, S)
    p = one(d, "franz", Action.PRUNE, "mastodon-sidekiq.service")
    assert ids(d) == {p.id}
    assert p.payload.steps == ("stop", "disable", "remove")
    assert p.payload.remove_files == ("/etc/systemd/system/mastodon-sidekiq.service",)
    assert p.before == "active/running, enabled, `-c 10 -q default`"
    assert p.after == "stopped, disabled, unit file removed"
    assert p.reason == "undeclared on franz (matches mastodon-*, prune = true)"
    assert p.service is None and d.notes == ()


def test_with_pruning_off_the_undeclared_sidekiq_is_only_noted(desired: Desired,
                                                              fleet: dict[str, HostState]) -> None:
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    d = diff(desired, fleet, S, prune=False)
    assert d.changes == ()
    assert d.notes == ("on franz, mastodon-sidekiq.service is undeclared (active/running, enabled, "
                       "`-c 10 -q default`); left alone: pruning is off for this run (--no-prune)",)


def test_postgres_left_running_on_the_old_db_host_is_noted_never_pruned(desired: Desired,
                                                                      fleet: dict[str, HostState]) -> None:
    fleet["freud"] = with_unit(fleet["freud"], distro_unit("postgresql.service", sub="exited"))
    fleet["freud"] = with_unit(fleet["freud"], distro_unit("postgresql@15-main.service"))
    d = diff(desired, fleet, S, prune=True)
    assert d.changes == ()
    assert len(d.notes) == 2
    assert all(n.startswith("on freud, postgresql") and n.endswith("left alone: postgresql* has prune = false")
               for n in d.notes)


def test_a_postgres_instance_unit_belongs_to_the_declared_postgres_where_it_runs(
        desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["nietzsche"] = with_unit(fleet["nietzsche"], distro_unit("postgresql@15-main.service"))
    assert diff(desired, fleet, S) == Diff(changes=())


def test_an_idle_distro_unit_matching_a_pattern_is_not_even_noted(desired: Desired,
                                                                 fleet: dict[str, HostState]) -> None:
    idle = distro_unit("redis-server.service", active="inactive", sub="dead", enabled="disabled")
    fleet["fritz"] = with_unit(fleet["fritz"], idle)
    assert diff(desired, fleet, S) == Diff(changes=())


def test_a_unit_matching_no_pattern_is_none_of_fleets_business(desired: Desired,
                                                               fleet: dict[str, HostState]) -> None:
    fleet["franz"] = with_unit(fleet["franz"], hand_made_unit("cron.service", "/usr/sbin/cron -f"))
    assert diff(desired, fleet, S) == Diff(changes=())


def test_a_pruned_unit_shipped_outside_etc_is_stopped_and_disabled_but_its_file_kept(
        desired: Desired, fleet: dict[str, HostState]) -> None:
    unit = hand_made_unit("mastodon-old.service", "/usr/bin/old", directory="/lib/systemd/system")
    fleet["fritz"] = with_unit(fleet["fritz"], unit)
    p = one(diff(desired, fleet, S), "fritz", Action.PRUNE, "mastodon-old.service")
    assert (p.payload.steps, p.payload.remove_files, p.after) == (("stop", "disable"), (), "stopped, disabled")


def test_an_undeclared_stopped_unit_file_in_etc_is_pruned_by_removal_alone(desired: Desired,
                                                                          fleet: dict[str, HostState]) -> None:
    unit = undeclared_sidekiq(active=False, enabled=False)
    fleet["franz"] = with_unit(fleet["franz"], unit)
    p = one(diff(desired, fleet, S), "franz", Action.PRUNE, "mastodon-sidekiq.service")
    assert p.payload.steps == ("remove",)


def test_a_static_undeclared_unit_is_stopped_and_removed_but_not_disabled(desired: Desired,
                                                                         fleet: dict[str, HostState]) -> None:
    # A static unit has no [Install] section: `systemctl disable` has nothing to undo there.
    unit = dataclasses.replace(undeclared_sidekiq(), unit_file_state="static")
    fleet["franz"] = with_unit(fleet["franz"], unit)
    p = one(diff(desired, fleet, S), "franz", Action.PRUNE, "mastodon-sidekiq.service")
    assert p.payload.steps == ("stop", "remove")


def test_a_service_running_on_a_host_it_left_is_pruned_there_and_named(desired: Desired,
                                                                       fleet: dict[str, HostState]) -> None:
    """sidekiq-default moved from franz to freud: still running on franz."""
    old = unit_of(fleet["freud"], SK_DEFAULT)
    fleet["franz"] = with_unit(fleet["franz"], old)
    p = one(diff(desired, fleet, S), "franz", Action.PRUNE, SK_DEFAULT)
    assert p.service == "sidekiq-default" and p.payload.steps == ("stop", "disable", "remove")


# ------------------------------------------------------------------ unknown hosts


def test_an_unreachable_host_is_unknown_never_empty(desired: Desired) -> None:
    observed: dict[str, HostResult] = {**bare(desired), "nietzsche": unreachable("nietzsche")}
    d = diff(desired, observed, S)
    assert on(d, "nietzsche") == []
    assert [e.host for e in d.unknown] == ["nietzsche"]
    assert on(d, "fritz") and on(d, "freud") and on(d, "franz")


def test_a_host_that_was_not_observed_is_outside_the_diff(desired: Desired) -> None:
    d = diff(desired, {"franz": bare_host(desired, "franz")}, S)
    assert {c.host for c in d.changes} == {"franz"} and d.unknown == ()


def test_a_daemon_reload_follows_unit_writes_only(desired: Desired, fleet: dict[str, HostState]) -> None:
    fleet["fritz"] = stopped(fleet["fritz"], WEB)
    fleet["franz"] = with_unit(fleet["franz"], undeclared_sidekiq())
    assert Action.DAEMON_RELOAD not in {c.action for c in diff(desired, fleet, S).changes}


# ------------------------------------------------------------------ what the host wrote into a unit


def test_a_secret_in_a_hand_edited_unit_never_reaches_the_unified_diff(desired: Desired,
                                                                      fleet: dict[str, HostState]) -> None:
    """Through the collector's parser, as on a real host: someone added a password to the unit."""
    path = "/etc/systemd/system/mastodon-web.service"
    content = render_unit(service(desired, "web")) + 'Environment="DB_PASS=hunter2-on-the-host" "RAILS_ENV=x"\n'
    texts = parse_texts("fritz", [f"@@file {WEB} {path}", *(f"|{line}" for line in content.splitlines())])
    (u,) = parse_units("fritz", [f"Id={WEB}", "LoadState=loaded", "ActiveState=active", "SubState=running",
                                 "UnitFileState=enabled", f"FragmentPath={path}"],
                       {path: sha256_hex(content)}, texts)
    fleet["fritz"] = with_unit(fleet["fritz"], u)
    w = one(diff(desired, fleet, S), "fritz", Action.WRITE_UNIT, WEB)
    assert "DB_PASS" in w.payload.diff and "RAILS_ENV=x" in w.payload.diff
    assert "hunter2-on-the-host" not in w.payload.diff


# /run: `systemctl edit --runtime`; /etc/systemd/system.control: `systemctl set-property`, next to
# fleet's directory and sharing its prefix but for the slash.
OTHER_DROP_IN_DIRS = ["/run/systemd/system", "/etc/systemd/system.control"]


@pytest.mark.parametrize("directory", OTHER_DROP_IN_DIRS)
def test_a_drop_in_outside_etc_is_not_fleets_to_remove_and_forces_no_rewrite(desired: Desired,
                                                                             fleet: dict[str, HostState],
                                                                             directory: str) -> None:
    fleet["fritz"] = with_drop_in(fleet["fritz"], WEB, content="[Service]\nNice=5\n", directory=directory)
    assert diff(desired, fleet, S).changes == ()


@pytest.mark.parametrize("directory", OTHER_DROP_IN_DIRS)
def test_a_drop_in_in_etc_next_to_a_drop_in_in_run_is_removed_alone(desired: Desired,
                                                                   fleet: dict[str, HostState], directory: str) -> None:
    state = with_drop_in(fleet["fritz"], WEB, name="runtime.conf", directory=directory)
    fleet["fritz"] = with_drop_in(state, WEB, name="local.conf")
    w = one(diff(desired, fleet, S), "fritz", Action.WRITE_UNIT, WEB)
    assert w.payload.remove_files == ("/etc/systemd/system/mastodon-web.service.d/local.conf",)


def test_a_drop_in_fleet_may_not_remove_that_changes_the_command_is_reported_by_the_plan(
        desired: Desired, fleet: dict[str, HostState]) -> None:
    path = "/run/systemd/system/mastodon-web.service.d/evil.conf"
    state = with_drop_in(fleet["fritz"], WEB, name="evil.conf", directory="/run/systemd/system",
                         content="[Service]\nExecStart=\nExecStart=/usr/bin/other -x\n")
    fleet["fritz"] = change_unit(state, WEB, exec_start=("/usr/bin/other", "-x"))
    d = diff(desired, fleet, S)
    assert any(path in text for text in d.problems + d.notes + tuple(c.reason for c in d.changes))
