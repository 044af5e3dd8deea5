"""Drop-ins, observed: every `*.conf` in a declared unit's directory under /etc/systemd/system is
collected with its hash (loaded by systemd or not) and shown on the unit's status cell."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
from observed import EXAMPLE_SECRETS, REPO, converged, example

from fleet.audit import build_audit
from fleet.collect.parse import parse_host
from fleet.collect.script import build_script, spec_for
from fleet.collect.sections import Collected
from fleet.errors import ParseError
from fleet.model import HostState
from fleet.output.json import status_json
from fleet.output.text import audit_text, status_text
from fleet.resources.drop_ins import MAX_DROP_INS, DropIn, DropIns
from fleet.status import build_status
from fleet.textutil import sha256_hex

WEB = "mastodon-web.service"
HASH = "1a2b3c4d" + "0" * 56
DIR = f"/etc/systemd/system/{WEB}.d"


def fixture(name: str) -> str:
    """A captured collection output (tests/fixtures/collect/README.md): none has the section."""
    return (REPO / "tests" / "fixtures" / "collect" / f"{name}.txt").read_text()


def with_section(text: str, body: str) -> str:
    return text.replace("@@end\n", f"@@dropins\n{body}@@end\n")


def drop_ins(state: HostState) -> tuple[DropIn, ...] | None:
    found = state.facts_of("dropins")
    assert found is None or isinstance(found, tuple)
    return found


def test_the_script_looks_in_the_drop_in_directory_of_every_unit_declared_on_the_host() -> None:
    spec = spec_for(example(), "nietzsche")
    assert spec.of("dropins") == tuple(f"/etc/systemd/system/{s.unit}.d" for s in example().services_on("nietzsche"))
    script = build_script(spec)
    assert "echo '@@dropins'" in script and "/etc/systemd/system/postgresql.service.d" in script
    assert script.index("@@dropins") > script.index("@@env ")  # after the kinds before it in the registry


@pytest.mark.skipif(not all(shutil.which(t) for t in ("sh", "find", "sha256sum", "head")),
                    reason="needs sh, find, sha256sum and head to run the section's script")
def test_the_section_hashes_each_conf_file_of_the_directories_and_nothing_else(tmp_path: Path) -> None:
    d = tmp_path / f"{WEB}.d"
    d.mkdir()
    (d / "10-limits.conf").write_text("[Service]\nLimitNOFILE=65536\n")
    (d / "override.conf").write_text("[Service]\nEnvironment=DB_POOL=5\n")
    (d / "notes.txt").write_text("not a drop-in")
    (d / "dir.conf").mkdir()
    (d / "odd\nname.conf").write_text("x")
    missing = tmp_path / "other.service.d"
    out = subprocess.run(["sh", "-c", DropIns().script((str(d), str(missing)))], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out.startswith("@@dropins\n")
    parser = DropIns().parser("h")
    parser.section("", iter(out.split("\n")[1:]))
    collected = Collected("h")
    parser.finish(collected)
    assert collected.extra["dropins"] == tuple(sorted(
        DropIn(WEB, str(d / name), sha256_hex((d / name).read_text()))
        for name in ("10-limits.conf", "override.conf", "odd\nname.conf")))


def test_an_output_with_drop_ins_parses_them_sorted_with_their_units() -> None:
    body = (f"{'b' * 64}  {DIR}/override.conf\n{HASH}  {DIR}/10-limits.conf\n"
            f"{'c' * 64}  /etc/systemd/system/redis-server.service.d/x.conf\n")
    state = parse_host("fritz", with_section(fixture("bare-fritz"), body))
    assert drop_ins(state) == (
        DropIn(WEB, f"{DIR}/10-limits.conf", HASH), DropIn(WEB, f"{DIR}/override.conf", "b" * 64),
        DropIn("redis-server.service", "/etc/systemd/system/redis-server.service.d/x.conf", "c" * 64))


def test_a_name_sha256sum_escaped_is_read_back_as_the_name() -> None:
    state = parse_host("fritz", with_section(fixture("bare-fritz"), f"\\{HASH}  {DIR}/a\\nb\\\\c.conf\n"))
    assert drop_ins(state) == (DropIn(WEB, f"{DIR}/a\nb\\c.conf", HASH),)


def test_an_output_without_the_section_did_not_look_and_parses_as_before() -> None:
    state = parse_host("fritz", fixture("bare-fritz"))
    assert drop_ins(state) is None and state.extra == ()
    empty = parse_host("fritz", with_section(fixture("bare-fritz"), ""))
    assert drop_ins(empty) == ()


@pytest.mark.parametrize("body", [
    "not a hash line\n",
    f"{HASH}  relative/{WEB}.d/x.conf\n",
    f"{HASH}  {DIR}/x.txt\n",
    f"{HASH}  /etc/systemd/system/x.conf\n",
    f"{HASH[:-1]}  {DIR}/x.conf\n",
])
def test_a_line_that_is_not_a_drop_ins_hash_is_a_parse_error(body: str) -> None:
    with pytest.raises(ParseError, match="drop-ins") as e:
        parse_host("fritz", with_section(fixture("bare-fritz"), body))
    assert e.value.section == "dropins"


def test_a_flood_of_drop_ins_is_refused_by_name() -> None:
    body = "".join(f"{HASH}  {DIR}/{i}.conf\n" for i in range(MAX_DROP_INS + 1))
    with pytest.raises(ParseError, match=f"dropins section .* more than {MAX_DROP_INS:,} drop-ins"):
        parse_host("fritz", with_section(fixture("bare-fritz"), body))


def test_a_unit_with_drop_ins_says_so_with_their_hashes_in_status_and_audit() -> None:
    fleet: dict[str, HostState] = dict(converged(example(), EXAMPLE_SECRETS))
    found = tuple(DropIn(WEB, f"{DIR}/{n}.conf", HASH) for n in ("a", "b", "c", "d", "e", "f", "g"))
    fleet["fritz"] = dataclasses.replace(fleet["fritz"], extra=(("dropins", found),))
    report = build_status(example(), dict(fleet))
    web = next(r for r in report.rows if r.unit == WEB)
    cells = {c.host: c for c in web.cells}
    note = ("has drop-ins: a.conf sha256:1a2b3c4d, b.conf sha256:1a2b3c4d, c.conf sha256:1a2b3c4d, "
            "d.conf sha256:1a2b3c4d, e.conf sha256:1a2b3c4d and 2 more")
    assert cells["fritz"].notes == (note,) and cells["franz"].notes == ()
    assert cells["fritz"].status == "ok"  # observed, not judged
    assert "has drop-ins: a.conf sha256:1a2b3c4d" in status_text(report, now=0)
    web_json = next(r for r in status_json(report)["services"] if r["unit"] == WEB)
    assert web_json["cells"]["fritz"]["notes"] == [note]
    assert "has drop-ins: a.conf sha256:1a2b3c4d" in audit_text(build_audit(example(), fleet), now=0)
