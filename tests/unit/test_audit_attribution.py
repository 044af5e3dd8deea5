"""Who made an observed change: a journaled fleet step that could have made it, or nobody
(changed outside fleet) — judged by the kind of change, not only by host, target and time."""

from __future__ import annotations

from collections.abc import Callable

from observed import (
    ENV_PATH,
    EXAMPLE_SECRETS,
    converged,
    disabled,
    edited,
    example,
    set_env_value,
    stopped,
    undeclared_sidekiq,
    with_unit,
)

from fleet.audit import JournalStep, ObservedChange, attribute, changes_between
from fleet.model import HostResult, HostState

WEB = "mastodon-web.service"
T0, T1 = 1_800_000_000.0, 1_800_000_600.0
OPS = {"r1": "alice@laptop"}


def step(action: str, target: str, *, host: str = "fritz", outcome: str | None = "ok",
         keys: tuple[str, ...] = (), at: float = T0 + 60) -> JournalStep:
    return JournalStep("r1", host, action, target, at, outcome, keys)


def fritz_changes(change: Callable[[HostState], HostState]) -> list[ObservedChange]:
    old: dict[str, HostResult] = dict(converged(example(), EXAMPLE_SECRETS))
    new = dict(old)
    fritz = old["fritz"]
    assert isinstance(fritz, HostState)
    new["fritz"] = change(fritz)
    return changes_between(old, new)


def who(changes: list[ObservedChange], steps: list[JournalStep]) -> dict[str, str]:
    return {c.what: c.attribution for c in attribute(changes, steps, OPS, T0, T1)}


def test_an_env_key_is_fleets_only_when_fleets_write_touched_that_key() -> None:
    changes = fritz_changes(lambda s: set_env_value(set_env_value(s, "S3_ENABLED", "false"), "SMTP_PORT", "2525"))
    assert [c.kind for c in changes] == ["env-key", "env-key"]
    got = who(changes, [step("write-env", ENV_PATH, keys=("SMTP_PORT",))])
    assert got == {
        f"on fritz, S3_ENABLED in {ENV_PATH} changed from `true` to `false`": "changed outside fleet",
        f"on fritz, SMTP_PORT in {ENV_PATH} changed from `587` to `2525`": "fleet apply run r1 by alice@laptop",
    }


def test_a_new_execstart_is_not_explained_by_a_start_of_the_same_unit() -> None:
    changes = fritz_changes(lambda s: edited(s, WEB))
    assert [c.kind for c in changes] == ["unit-text"]
    assert set(who(changes, [step("start", WEB), step("restart", WEB)]).values()) == {"changed outside fleet"}
    assert set(who(changes, [step("write-unit", WEB)]).values()) == {"fleet apply run r1 by alice@laptop"}
    # a failed start rolled its files back: that explains a unit file going back to what it was
    assert set(who(changes, [step("start", WEB, outcome="failed")]).values()) == {
        "fleet apply run r1 by alice@laptop"}


def test_state_and_enablement_are_explained_by_the_actions_that_make_them() -> None:
    changes = fritz_changes(lambda s: disabled(stopped(s, WEB), WEB))
    assert sorted(c.kind for c in changes) == ["unit-enablement", "unit-state"]
    by_kind = {c.kind: c for c in attribute(changes, [step("restart", WEB)], OPS, T0, T1)}
    assert by_kind["unit-state"].run_id == "r1"
    assert by_kind["unit-enablement"].attribution == "changed outside fleet", "a restart does not disable"
    by_kind = {c.kind: c for c in attribute(changes, [step("prune", WEB)], OPS, T0, T1)}
    assert {c.run_id for c in by_kind.values()} == {"r1"}, "a prune stops and disables"


def test_a_unit_that_appeared_is_fleets_only_if_fleet_wrote_it() -> None:
    changes = fritz_changes(lambda s: with_unit(s, undeclared_sidekiq()))
    assert [c.kind for c in changes] == ["unit-appeared"]
    assert set(who(changes, [step("start", "mastodon-sidekiq.service")]).values()) == {"changed outside fleet"}
    assert set(who(changes, [step("write-unit", "mastodon-sidekiq.service")]).values()) == {
        "fleet apply run r1 by alice@laptop"}


def test_steps_outside_the_window_on_other_hosts_or_skipped_explain_nothing() -> None:
    changes = fritz_changes(lambda s: edited(s, WEB))
    for s in (step("write-unit", WEB, at=T1 + 1), step("write-unit", WEB, at=T0 - 1),
              step("write-unit", WEB, host="franz"), step("write-unit", WEB, outcome="skipped"),
              step("write-unit", "mastodon-streaming.service")):
        assert set(who(changes, [s]).values()) == {"changed outside fleet"}, s


def test_a_change_of_a_kind_fleet_does_not_classify_goes_by_host_target_and_time() -> None:
    c = ObservedChange("fritz", WEB, "on fritz, something about mastodon-web.service")
    assert attribute([c], [step("daemon-reload", WEB)], OPS, T0, T1)[0].run_id == "r1"
