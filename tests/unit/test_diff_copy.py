"""A host's unit file, drop-in and unit state changes copied at once from an earlier host with the
same services and units, none of them there yet (fleet/diff.py, `_GroupCopies`): each host still
gets exactly what it gets when it is diffed alone, and the copy is made where it may be."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.diff import diff
from fleet.model import (
    Desired,
    DropInSpec,
    EnvFile,
    EnvFileState,
    Host,
    HostFacts,
    HostState,
    Kind,
    SecretSource,
    Service,
    UnitSpec,
    UnitState,
    Wrapper,
)
from fleet.resources.unit_file import UnitFiles


def not_found(name: str, **kw: Any) -> UnitState:
    return UnitState(name, "not-found", kw.pop("active", "inactive"), "dead", kw.pop("file_state", ""), **kw)


def fleet_of(hosts: tuple[str, ...], *, odd_instances: str | None = None, dropins_on: tuple[str, ...] = (),
             only_web: tuple[str, ...] = ()) -> Desired:
    """web (plain, loads the env file /e), stream (a template with a wrapper; `odd_instances` runs
    other instances), cfg (drop-ins, on `dropins_on`), and hosts in `only_web` run web alone.  The
    env file's DB_HOST names the host on each host (an override), its secret is the same."""
    plain = UnitSpec(exec_start="/bin/web", environment=(("A", "1"),), environment_files=("/e",))
    tmpl = UnitSpec(exec_start="/bin/stream --port %i")
    wrap = UnitSpec(exec_start="/bin/true", text="[Unit]\nDescription=together\n[Service]\nType=oneshot\n"
                    "RemainAfterExit=yes\nExecStart=/bin/true\n", remain_after_exit=True)
    both = tuple(h for h in hosts if h not in only_web)
    services = [Service("web", Kind.WEB, "web.service", hosts, unit_spec=plain),
                Service("stream", Kind.STREAMING, "stream@.service", both, unit_spec=tmpl, instances=("4000", "4001"),
                        host_instances=((odd_instances, ("4002",)),) if odd_instances else (),
                        wrapper=Wrapper("stream.service", wrap))]
    if dropins_on:
        services.append(Service("cfg", Kind.SIDEKIQ, "cfg.service", dropins_on, unit_spec=UnitSpec(exec_start="/bin/c"),
                                dropins=(DropInSpec("10-x.conf", "[Service]\nNice=5\n", "x.conf"),)))
    return Desired(
        name="t", hosts=tuple(Host(h, h) for h in hosts), services=tuple(services),
        env_files=(EnvFile("e", "/e", hosts, values=(("DB_HOST", "db"),),
                           overrides=tuple((h, (("DB_HOST", f"{h}.internal"),)) for h in hosts),
                           sensitive=(("SECRET_KEY_BASE", SecretSource("file")),)),))


SECRETS = {("e", "SECRET_KEY_BASE"): "s3cret"}


def check_each_hosts_own(desired: Desired, observed: dict[str, Any]) -> list[Any]:
    together = diff(desired, observed, SECRETS, prune=False).changes
    for h in observed:
        mine = [c for c in together if c.host == h]
        assert mine == list(diff(desired, {h: observed[h]}, SECRETS, prune=False).changes), h
        assert all(f"--- {h}:" in c.payload.diff for c in mine if c.action.value == "write-unit")  # type: ignore[union-attr]
    return list(together)


def counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hosts UnitFiles.diff_service is asked about (once per service): the hosts not copied."""
    asked: list[str] = []
    real = UnitFiles.diff_service

    def spy(self: UnitFiles, ctx: Any, service: Service) -> None:
        asked.append(ctx.host)
        real(self, ctx, service)

    monkeypatch.setattr(UnitFiles, "diff_service", spy)
    return asked


def test_bare_hosts_with_the_same_services_are_copied_from_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = ("h1", "h2", "h3", "h4")
    desired = fleet_of(hosts)
    observed = {h: HostState(h, HostFacts(), (), (EnvFileState("/e", False),) if h == "h3" else ()) for h in hosts}
    asked = counting(monkeypatch)
    changes = diff(desired, observed, SECRETS, prune=False).changes
    assert asked == ["h1", "h1"]  # two services, diffed on the first host only
    monkeypatch.undo()
    assert list(changes) == check_each_hosts_own(desired, observed)
    env = {c.host: str(c.payload) for c in changes if c.action.value == "write-env"}
    assert "h4.internal" in env["h4"] and "h1.internal" not in env["h4"]  # the env file is each host's own


def test_where_the_copy_must_not_be_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another instance set, a unit partly there, a service with drop-ins, fewer services: each
    diffed on its own; a host whose name is in its texts (`a` in "absent") is not copied from."""
    hosts = ("h1", "h2", "h3", "h4", "h5", "a", "h7")
    desired = fleet_of(hosts, odd_instances="h2", dropins_on=("h4",), only_web=("h5",))
    units: dict[str, tuple[UnitState, ...]] = {"h3": (not_found("stream.service", file_state="masked"),)}
    observed = {h: HostState(h, HostFacts(), units.get(h, ()), ()) for h in hosts}
    asked = counting(monkeypatch)
    diff(desired, observed, SECRETS, prune=False)
    assert sorted(set(asked)) == ["h1", "h2", "h3", "h4", "h5"]  # a and h7 copied from h1
    monkeypatch.undo()
    check_each_hosts_own(desired, observed)
    # drop-ins: what a host has in the unit's drop-in directory is in its drop-ins section, not in
    # its units: d2's cfg.service looks as bare as d1's, its undeclared drop-in is its own
    from fleet.resources.drop_ins import DropIn

    with_dropins = fleet_of(("d1", "d2"), dropins_on=("d1", "d2"))
    theirs = DropIn("cfg.service", "/etc/systemd/system/cfg.service.d/90-theirs.conf", "a" * 64)
    observed = {"d1": HostState("d1", HostFacts(), (), (), extra=(("dropins", ()),)),
                "d2": HostState("d2", HostFacts(), (), (), extra=(("dropins", (theirs,)),))}
    changes = check_each_hosts_own(with_dropins, observed)
    assert [c.host for c in changes if c.action.value == "remove-drop-in"] == ["d2"]
    first_a = fleet_of(("a", "h1", "h2"))
    observed = {h: HostState(h, HostFacts(), (), ()) for h in ("a", "h1", "h2")}
    asked = counting(monkeypatch)
    diff(first_a, observed, SECRETS, prune=False)
    assert asked == ["a", "a", "h1", "h1", "h2", "h2"]  # learnt from a: not copyable, not tried again
    monkeypatch.undo()
    check_each_hosts_own(first_a, observed)


HOSTS = ("h1", "h2", "h3", "h4", "h5", "h6")
partly = st.sampled_from([
    not_found("web.service", file_state="masked"), not_found("stream@4000.service", active="active"),
    not_found("stream.service", drop_in_paths=("/etc/systemd/system/stream.service.d/x.conf",)),
    not_found("web.service", text="# /etc/systemd/system/web.service\n[Unit]\n"),
    UnitState("web.service", "loaded", "active", "running", "enabled"),
    not_found("web.service"), not_found("stream@4001.service"), not_found("cfg.service")])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(units=st.lists(st.lists(partly, max_size=2), min_size=len(HOSTS), max_size=len(HOSTS)),
       odd=st.sampled_from((None, *HOSTS)), dropins=st.sets(st.sampled_from(HOSTS)),
       only_web=st.sets(st.sampled_from(HOSTS)), names=st.sampled_from((HOSTS, ("a", "b", "ab", "h", "s", "w"))))
def test_any_fleet_each_host_gets_its_own(units: list[list[UnitState]], odd: str | None, dropins: set[str],
                                          only_web: set[str], names: tuple[str, ...]) -> None:
    rename = dict(zip(HOSTS, names, strict=True))
    desired = fleet_of(names, odd_instances=rename[odd] if odd else None,
                       dropins_on=tuple(rename[h] for h in sorted(dropins)),
                       only_web=tuple(rename[h] for h in sorted(only_web)))
    observed = {rename[h]: HostState(rename[h], HostFacts(), tuple(u), ()) for h, u in zip(HOSTS, units, strict=True)}
    check_each_hosts_own(desired, observed)
