"""What the desired-state check and the diff work out once per distinct value rather than once
per host (a host's units by name, a Sidekiq service's DB_POOL per set of env files, a service's
env values per set of env files) still answers for the very host asked about."""

from __future__ import annotations

from typing import Any

from fleet import policy
from fleet.model import (
    Desired,
    EnvFile,
    Host,
    HostFacts,
    HostState,
    Kind,
    Service,
    SidekiqSpec,
    UnitSpec,
    UnitState,
)


def unit(name: str, active: str) -> UnitState:
    return UnitState(name, "loaded", active, "running" if active == "active" else "dead", "enabled")


def test_a_hosts_unit_looked_up_by_name_is_that_hosts_own() -> None:
    a = HostState("a", HostFacts(), (unit("x.service", "active"), unit("y.service", "failed")), ())
    b = HostState("b", HostFacts(), (unit("y.service", "active"), unit("x.service", "inactive")), ())
    assert [a.unit("x.service").active_state, b.unit("x.service").active_state] == ["active", "inactive"]  # type: ignore[union-attr]
    assert [a.unit("y.service").active_state, b.unit("y.service").active_state] == ["failed", "active"]  # type: ignore[union-attr]
    assert a.unit("z.service") is None


def test_a_unit_listed_twice_on_a_host_is_looked_up_as_its_first() -> None:
    a = HostState("a", HostFacts(), (unit("x.service", "failed"), unit("x.service", "active")), ())
    assert a.unit("x.service").active_state == "failed"  # type: ignore[union-attr]


def sidekiq_fleet() -> Desired:
    """Four hosts of one Sidekiq service: a and b read env file `pool` (DB_POOL 7), c reads
    `other` (DB_POOL 3), d reads `pool` too but overrides DB_POOL to 9; the unit says 5."""
    spec = UnitSpec(exec_start="/bin/sidekiq", environment=(("DB_POOL", "5"),), environment_files=("/e",))
    hosts = ("a", "b", "c", "d", "e")
    return Desired(
        name="t", hosts=tuple(Host(h, h) for h in hosts),
        services=(Service("sk", Kind.SIDEKIQ, "sk.service", hosts, unit_spec=spec,
                          sidekiq=SidekiqSpec(5, (("default", None),))),),
        env_files=(EnvFile("pool", "/e", ("a", "b", "d"), values=(("DB_POOL", "7"),),
                           overrides=(("d", (("DB_POOL", "9"),)),)),
                   EnvFile("other", "/e", ("c",), values=(("DB_POOL", "3"),))))


def test_each_hosts_sidekiq_gets_the_db_pool_of_its_own_env_files_and_overrides() -> None:
    procs = policy.declared_sidekiq(sidekiq_fleet())
    assert [(p.host, p.db_pool) for p in procs] == [("a", 7), ("b", 7), ("c", 3), ("d", 9), ("e", 5)]


def test_a_value_differing_only_on_hosts_asked_later_is_still_named_per_host() -> None:
    """b and d share their env files with a and c: each host is shown with its own value."""
    spec = UnitSpec(exec_start="/bin/x", environment_files=("/e",))
    d = Desired(name="t", hosts=tuple(Host(h, h) for h in "abcd"),
                services=(Service("s", Kind.WEB, "s.service", ("a", "b", "c", "d"), unit_spec=spec),),
                env_files=(EnvFile("e1", "/e", ("a", "b"), values=(("S3_BUCKET", "one"), ("LOCAL_DOMAIN", "x"))),
                           EnvFile("e2", "/e", ("c", "d"), values=(("S3_BUCKET", "two"), ("LOCAL_DOMAIN", "x")))))
    found = [f for f in policy.check(d) if f.code == "env.inconsistent"]
    assert [f.message for f in found] == [
        "S3_BUCKET differs between hosts of service s (a='one', b='one', c='two', d='two')"]


def test_a_store_setting_read_on_many_hosts_is_judged_with_each_hosts_own_port(example: Any) -> None:
    """REDIS_HOST reads the same on every host, but freud (read after others) overrides REDIS_PORT."""
    example.append('[env_files.mastodon.overrides.freud]\nREDIS_PORT = "6380"\n')
    found = [f for f in example.check() if f.code.startswith("store.")]
    assert [(f.code, f.key, f.host) for f in found] == [
        ("store.setting-port", "env_files.mastodon.values.REDIS_HOST", "freud")]
    assert found[0].message.endswith("(read on freud)")


def test_secret_fingerprints_kept_for_a_diff_are_each_env_files_own() -> None:
    from fleet.envfile import fingerprint
    from fleet.model import SecretSource
    from fleet.resources.env_file import env_digest, secret_fingerprints

    web = EnvFile("web", "/w", ("a",), sensitive=(("SECRET_KEY_BASE", SecretSource("file")),))
    worker = EnvFile("worker", "/k", ("a",), sensitive=(("SECRET_KEY_BASE", SecretSource("file")),
                                                       ("OTP_SECRET", SecretSource("present"))))
    secrets = {("web", "SECRET_KEY_BASE"): "one", ("worker", "SECRET_KEY_BASE"): "two"}
    cache: dict[str, Any] = {}
    for _ in range(2):  # asked again: from the cache
        assert secret_fingerprints(web, secrets, cache) == (("SECRET_KEY_BASE", fingerprint("one")),)
        assert secret_fingerprints(worker, secrets, cache) == (("SECRET_KEY_BASE", fingerprint("two")),)
    assert env_digest(worker, "a", secrets, secret_fingerprints(worker, secrets, cache)) == \
        env_digest(worker, "a", secrets)
