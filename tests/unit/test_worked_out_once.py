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


# -- a first install: a service's unit files, enables and starts made on the first host where none of
# its units is there, and copied to the next such host with that host's own name

def first_install_fleet(hosts: tuple[str, ...]) -> Desired:
    """A plain service, a template with a wrapper whose instances differ on the last host, and one
    whose unit text names nothing of a host (a wrapper with the operator's own text)."""
    from fleet.model import Wrapper

    plain = UnitSpec(exec_start="/bin/web", environment=(("A", "1"),))
    tmpl = UnitSpec(exec_start="/bin/stream --port %i")
    wrap = UnitSpec(exec_start="/bin/true", text="[Unit]\nDescription=together\n[Service]\nType=oneshot\n"
                    "RemainAfterExit=yes\nExecStart=/bin/true\n", remain_after_exit=True)
    return Desired(
        name="t", hosts=tuple(Host(h, h) for h in hosts),
        services=(Service("web", Kind.WEB, "web.service", hosts, unit_spec=plain),
                  Service("stream", Kind.STREAMING, "stream@.service", hosts, unit_spec=tmpl,
                          instances=("4000", "4001"), host_instances=((hosts[-1], ("4002",)),),
                          wrapper=Wrapper("stream.service", wrap))))


def alone(desired: Desired, observed: dict[str, Any], host: str) -> list[Any]:
    """The host's changes when it is the only one diffed: nothing learnt from another host."""
    from fleet.diff import diff

    return list(diff(desired, {host: observed[host]}, {}, prune=False).changes)


def each_hosts_own(desired: Desired, observed: dict[str, Any]) -> None:
    from fleet.diff import diff

    together = diff(desired, observed, {}, prune=False).changes
    for h in observed:
        mine = [c for c in together if c.host == h]
        assert mine == alone(desired, observed, h), h
        assert all(h in c.payload.diff for c in mine if c.action.value == "write-unit")  # type: ignore[union-attr]


def not_found(name: str, **kw: Any) -> UnitState:
    return UnitState(name, "not-found", kw.pop("active", "inactive"), "dead", kw.pop("file_state", ""), **kw)


def test_a_first_install_copied_from_host_to_host_is_each_hosts_own() -> None:
    hosts = ("web-1", "web-2", "web-3", "web-4")
    desired = first_install_fleet(hosts)
    states = [(), (not_found("web.service"), not_found("stream@4000.service")),
              tuple(not_found(u) for u in ("web.service", "stream@4000.service", "stream@4001.service",
                                          "stream.service")),
              (not_found("stream@4002.service"),)]
    observed = {h: HostState(h, HostFacts(), units, ()) for h, units in zip(hosts, states, strict=True)}
    each_hosts_own(desired, observed)
    from fleet.diff import diff

    changes = diff(desired, observed, {}, prune=False).changes
    last = [(c.action.value, c.target) for c in changes if c.host == "web-4"]
    assert ("start", "stream@4002.service") in last and ("start", "stream@4000.service") not in last
    diffs = {c.payload.diff for c in changes if c.target == "web.service" and c.action.value == "write-unit"}  # type: ignore[union-attr]
    assert len(diffs) == 4  # one per host: each names its own


def test_a_unit_that_is_partly_there_is_not_given_the_first_installs_answer() -> None:
    """Hosts after the first whose units are not quite absent (a unit file state, an active unit
    systemd cannot find, a drop-in, a text, a loaded unit) each get their own diff."""
    hosts = ("h1", "h2", "h3", "h4", "h5", "h6", "h7")
    desired = first_install_fleet(hosts)
    odd = [(), (not_found("web.service", file_state="masked"),), (not_found("web.service", active="active"),),
           (not_found("web.service", drop_in_paths=("/etc/systemd/system/web.service.d/x.conf",)),),
           (not_found("web.service", text="# /etc/systemd/system/web.service\n[Unit]\n"),),
           (UnitState("web.service", "loaded", "inactive", "dead", "disabled"),
            UnitState("stream@4000.service", "loaded", "failed", "failed", "enabled")),
           ()]
    observed = {h: HostState(h, HostFacts(), units, ()) for h, units in zip(hosts, odd, strict=True)}
    each_hosts_own(desired, observed)


def test_a_host_whose_name_is_in_its_changes_texts_is_not_copied_from() -> None:
    """`a` is in "absent" and in the unit's text: what a names is not copied to b (nor b's name missed)."""
    desired = first_install_fleet(("a", "b", "ab"))
    observed = {h: HostState(h, HostFacts(), (), ()) for h in ("a", "b", "ab")}
    each_hosts_own(desired, observed)


def test_a_missing_env_file_copied_from_host_to_host_is_each_hosts_own() -> None:
    """The write of a missing env file is made once per file and values: a host with an override
    (DB_HOST), one whose file is there, one reported absent but with keys, get their own."""
    from fleet.model import EnvFileState, SecretSource

    hosts = ("a1", "a2", "b1", "a3", "c1", "a4")
    spec = UnitSpec(exec_start="/bin/web", environment_files=("/e",))
    desired = Desired(
        name="t", hosts=tuple(Host(h, h) for h in hosts),
        services=(Service("web", Kind.WEB, "web.service", hosts, unit_spec=spec),),
        env_files=(EnvFile("e", "/e", hosts, values=(("DB_HOST", "db"), ("LOCAL_DOMAIN", "x")),
                           overrides=(("b1", (("DB_HOST", "b1-db"),)),),
                           sensitive=(("SECRET_KEY_BASE", SecretSource("file")),)),))
    envs: dict[str, tuple[EnvFileState, ...]] = {
        "a3": (EnvFileState("/e", True, "0600", "root", "root", keys=("DB_HOST",), values=(("DB_HOST", "db"),)),),
        "c1": (EnvFileState("/e", False, keys=("LOCAL_DOMAIN",), values=(("LOCAL_DOMAIN", "y"),)),),
        "a4": (EnvFileState("/e", False),)}
    observed = {h: HostState(h, HostFacts(), (), envs.get(h, ())) for h in hosts}
    from fleet.diff import diff

    secrets = {("e", "SECRET_KEY_BASE"): "s3cret"}
    together = diff(desired, observed, secrets, prune=False).changes
    for h in hosts:
        alone_h = list(diff(desired, {h: observed[h]}, secrets, prune=False).changes)
        assert [c for c in together if c.host == h] == alone_h, h
    writes = {c.host: c for c in together if c.action.value == "write-env"}
    assert writes["b1"].payload != writes["a1"].payload == writes["a2"].payload == writes["a4"].payload
    assert "b1-db" in str(writes["b1"].payload) and "b1-db" not in str(writes["a2"].payload)


def test_a_declared_sidekiq_process_is_the_one_its_constructor_makes() -> None:
    """declared_sidekiq fills each process's fields from its service's shared ones: every field
    is there, in the dataclass's order, and the process equals (and hashes as) a constructed one."""
    from dataclasses import asdict, fields

    procs = policy.declared_sidekiq(sidekiq_fleet())
    made = [policy.SidekiqProcess(**asdict(p)) for p in procs]
    assert [list(vars(p)) for p in procs] == [[f.name for f in fields(policy.SidekiqProcess)]] * len(procs)
    assert procs == made and [hash(p) for p in procs] == [hash(p) for p in made]
    assert [repr(p) for p in procs] == [repr(p) for p in made]
    assert procs[0] == policy.SidekiqProcess("a", "sk.service", ("default",), 5, 7, key="services.sk", file="")


def test_services_sharing_an_env_file_path_each_name_their_own_hosts_values() -> None:
    """Hosts' env files at a path are found once per host, then shared by every service that
    loads the path: each service's finding still lists only its own hosts, with their values."""
    spec = UnitSpec(exec_start="/bin/x", environment_files=("/e", "/f"))
    d = Desired(name="t", hosts=tuple(Host(h, h) for h in "abcd"),
                services=(Service("s", Kind.WEB, "s.service", ("a", "b", "c"), unit_spec=spec),
                          Service("t", Kind.WEB, "t.service", ("c", "d"), unit_spec=spec)),
                env_files=(EnvFile("e1", "/e", ("a", "c"), values=(("S3_BUCKET", "one"),)),
                           EnvFile("e2", "/e", ("b", "d"), values=(("S3_BUCKET", "two"),)),
                           EnvFile("f1", "/f", ("c",), values=(("CDN_HOST", "x"),)),
                           EnvFile("f2", "/f", ("d",), values=(("CDN_HOST", "y"),))))
    found = [f.message for f in policy.check(d) if f.code == "env.inconsistent"]
    assert found == ["S3_BUCKET differs between hosts of service s (a='one', b='two', c='one')",
                     "S3_BUCKET differs between hosts of service t (c='one', d='two')",
                     "CDN_HOST differs between hosts of service t (c='x', d='y')"]
