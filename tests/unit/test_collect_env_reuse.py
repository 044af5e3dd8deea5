"""Env files read by content address (fleet/resources/env_file.py `env_offers`, `fill_known`;
docs/PERFORMANCE.md, "Fourth round"): the script hashes each declared env file in the units' one
`sha256sum` and prints its parse only when that hash is not the one the client offered from its
kept observation; the client then fills the file in from the kept parse, with the meta read now.

The script's own parts run here with `sh` over env files in tmp_path (real `awk`, real
`sha256sum` behind a shim that logs each start).  What must hold: a known, unchanged file is not
parsed again and yields the same facts as a fresh parse (kept the way the journal keeps them); a
changed file — a value, a typo'd key, a key removed — is parsed again whatever was offered; a
mode change is seen either way; the parser takes `known` only for the hash it offered for that
path; a file that changed while it was read keeps no hash to be reused by."""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from fleet.collect.parse import parse_host
from fleet.collect.script import CollectSpec, known_env, reuse_offers, script_parts
from fleet.errors import ParseError
from fleet.model import EnvFileState, HostFacts, HostState
from fleet.plan import fingerprint
from fleet.resources.env_file import EnvFiles, env_offers, parse_env
from fleet.snapshot import pack, unpack

ENV = """# Mastodon
LOCAL_DOMAIN=example.org
S3_ENABLED=true
S3_BUCKET=files
export S3_REGION=eu-central-1
AWS_ACCESS_KEY_ID=AKIAEXAMPLE
AWS_SECRET_ACCESS_KEY="with spaces and 'quotes'"
SECRET_KEY_BASE=abcdef
DB_PASS=
"""


class Host:
    """An env file in tmp_path, and a PATH whose sha256sum logs each start."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".env.production"
        self.path.write_text(ENV)
        self.path.chmod(0o600)
        bin_dir, self.log = root / "bin", root / "sha256sum.log"
        bin_dir.mkdir()
        real = subprocess.run(["sh", "-c", "command -v sha256sum"], capture_output=True, text=True,
                              check=True).stdout.strip()
        (bin_dir / "sha256sum").write_text(f'#!/bin/sh\necho "+$*" >>{self.log}\nexec {real} "$@"\n')
        (bin_dir / "sha256sum").chmod(0o755)
        self.env = {**os.environ, "LC_ALL": "C", "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def spec(self, sensitive: tuple[str, ...] = ()) -> CollectSpec:
        return CollectSpec(kinds=(("env", ((str(self.path), sensitive),)),))

    def output(self, spec: CollectSpec) -> str:
        """The collection output of the script's own parts for `spec` (no unit: the facts and the
        units' `show` are stand-ins, everything from the hashes on is the script's)."""
        parts = dict(script_parts(spec))
        body = "\n".join(parts[name] for name in ("hashes", "text", "env", "end"))
        script = "set -f\necho '@@fleet 1'\necho '@@facts'\necho hostname=h\necho '@@units'\nshow=\n" + body
        self.log.unlink(missing_ok=True)
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=self.env, timeout=30,
                              check=True).stdout

    def collect(self, kept: HostState | None = None, sensitive: tuple[str, ...] = ()) -> HostState:
        """One collection as the collector makes it: the offers from `kept` (kept as the journal
        keeps it), the script run, its output parsed with the kept parses of the offered files."""
        if kept is not None:
            kept = unpack(pack({"h": kept}))["h"]  # type: ignore[assignment]
            assert isinstance(kept, HostState)
        spec = reuse_offers(self.spec(sensitive), kept)
        known = {p: e for p, h in known_env(spec).items()
                 if kept is not None and (e := kept.env_file(p)) is not None and e.sha256 == h}
        return parse_host("h", self.output(spec), known_env=known)

    def starts(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def sha(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def facts(state: HostState) -> list[tuple[object, ...]]:
    """Every field of the env files but the secret fingerprints' length: a kept observation holds
    their first 8 hex digits (fleet/snapshot.py), which the diff, audit and plan fingerprint use."""
    return [(e.path, e.present, e.mode, e.owner, e.group, e.size, e.keys, e.values,
             tuple((k, fp[:8] if len(fp) == 64 else fp[7:]) for k, fp in e.secrets), e.invalid_lines)
            for e in state.env_files]


def test_a_first_collection_parses_the_file_and_keeps_its_hash(host: Host) -> None:
    first = host.collect()
    (e,) = first.env_files
    assert e.sha256 == host.sha()
    assert "S3_BUCKET" in e.keys and ("AWS_SECRET_ACCESS_KEY" in dict(e.secrets))
    assert host.starts()[0] == f"+-- {host.path}"  # the one sha256sum (no unit here) hashes the file


def test_an_unchanged_known_file_is_not_parsed_again_and_gives_the_same_facts(host: Host) -> None:
    first = host.collect()
    out = host.output(reuse_offers(host.spec(), unpack(pack({"h": first}))["h"])  # type: ignore[arg-type]
                      )
    section = out.split(f"@@env {host.path}\n", 1)[1].split("\n@@", 1)[0].splitlines()
    assert section[1] == f"known {host.sha()}" and len(section) == 2  # meta, then `known`: no parse
    assert host.starts() == [f"+-- {host.path}"]  # no secret hashed, no second hash
    again = host.collect(first)
    assert facts(again) == facts(first)
    assert again.env_files[0].sha256 == host.sha()
    assert fingerprint(again) == fingerprint(first)  # a plan made from either is valid for the other


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("S3_ENABLED=true", "S3_ENABLED=FALSE"),
    lambda t: t.replace("S3_BUCKET=files", "3_BUCKET=files"),  # the postmortem's typo
    lambda t: t.replace("SECRET_KEY_BASE=abcdef", "SECRET_KEY_BASE=abcdeg"),
    lambda t: t.replace("DB_PASS=\n", ""),
    lambda t: t + "\n",  # a blank line: the same facts, another hash
])
def test_a_changed_file_is_parsed_again_whatever_was_offered(host: Host, edit: object) -> None:
    first = host.collect()
    assert callable(edit)
    host.path.write_text(edit(ENV))
    again = host.collect(first)
    fresh = host.collect()  # nothing offered: today's script
    assert facts(again) == facts(fresh)
    assert again.env_files[0].sha256 == host.sha() != first.env_files[0].sha256


def test_the_typo_and_the_changed_value_are_in_the_facts_after_a_reused_collection(host: Host) -> None:
    first = host.collect()
    second = host.collect(first)  # reused
    host.path.write_text(ENV.replace("S3_ENABLED=true", "S3_ENABLED=FALSE").replace("S3_BUCKET", "3_BUCKET"))
    third = host.collect(second)
    (e,) = third.env_files
    assert dict(e.values)["S3_ENABLED"] == "FALSE" and "3_BUCKET" in e.keys and "S3_BUCKET" not in e.keys


def test_a_mode_change_alone_is_seen_with_the_kept_parse(host: Host) -> None:
    first = host.collect()
    host.path.chmod(0o644)
    again = host.collect(first)
    assert again.env_files[0].mode == "0644" and facts(again)[0][2:] != facts(first)[0][2:]
    assert again.env_files[0].keys == first.env_files[0].keys


def test_a_removed_file_is_absent_whatever_was_offered(host: Host) -> None:
    first = host.collect()
    host.path.unlink()
    assert host.collect(first).env_files == (EnvFileState(path=str(host.path), present=False),)


def test_nothing_is_offered_when_a_key_would_be_split_otherwise(host: Host) -> None:
    first = host.collect()
    assert env_offers(((str(host.path), ()),), first)[0][2] == first.env_files[0].sha256
    # S3_BUCKET declared sensitive now: the kept parse holds it as a value, the script would hash it
    assert env_offers(((str(host.path), ("S3_BUCKET",)),), first)[0][2] == ""
    again = host.collect(first, sensitive=("S3_BUCKET",))
    assert "S3_BUCKET" in dict(again.env_files[0].secrets)


@pytest.mark.parametrize("kept", [
    None,
    EnvFileState(path="/x", present=True),  # another path
    EnvFileState(path="P", present=True),  # no hash kept (an older snapshot)
    EnvFileState(path="P", present=False, sha256="a" * 64),
    EnvFileState(path="P", present=True, sha256="A" * 64),
])
def test_only_a_present_file_with_a_kept_hash_is_offered(kept: EnvFileState | None) -> None:
    state = HostState(host="h", facts=HostFacts(), units=(),
                      env_files=() if kept is None else (replace(kept, path="/etc/app.env" if kept.path == "P"
                                                                 else kept.path),))
    assert env_offers((("/etc/app.env", ()),), state) == (("/etc/app.env", (), ""),)


def test_a_hostile_hash_or_path_never_reaches_the_script() -> None:
    with pytest.raises(ValueError):
        EnvFiles().script((("/etc/app.env", (), "$(reboot)" + "a" * 55),))
    with pytest.raises(ValueError):
        EnvFiles().script((("/etc/a pp.env", (), "a" * 64),))


def collection(env_section: str, hashes: str = "") -> str:
    return f"@@fleet 1\n@@facts\nhostname=h\n@@units\n@@hashes\n{hashes}@@text\n{env_section}@@end\n"


def test_a_known_marker_for_a_hash_not_offered_is_refused() -> None:
    kept = EnvFileState(path="/etc/app.env", present=True, keys=("A",), values=(("A", "1"),), sha256="a" * 64)
    section = "@@env /etc/app.env\nmeta 0600 root root 4\nknown " + "b" * 64 + "\n"
    with pytest.raises(ParseError, match="did not offer"):
        parse_host("h", collection(section), known_env={"/etc/app.env": kept})
    with pytest.raises(ParseError, match="did not offer"):  # nothing offered for that path
        parse_host("h", collection(section.replace("b" * 64, "a" * 64)), known_env={})
    with pytest.raises(ParseError):  # the standalone parser has nothing to fill it in from
        parse_env("h", "/etc/app.env", section.splitlines()[1:])
    state = parse_host("h", collection(section.replace("b" * 64, "a" * 64)), known_env={"/etc/app.env": kept})
    assert state.env_files == (replace(kept, size=4, mode="0600", owner="root", group="root"),)


def test_a_file_that_changed_while_it_was_read_keeps_no_hash() -> None:
    body = "@@env /etc/app.env\nmeta 0600 root root 4\nV A 1\nsha256 " + "c" * 64 + "\n"
    before = ("a" * 64) + "  /etc/app.env\n"
    assert parse_host("h", collection(body, before)).env_files[0].sha256 == ""
    same = ("c" * 64) + "  /etc/app.env\n"
    assert parse_host("h", collection(body, same)).env_files[0].sha256 == "c" * 64


def test_the_kept_hash_survives_the_journal_and_a_wrong_one_is_refused() -> None:
    state = HostState(host="h", facts=HostFacts(), units=(),
                      env_files=(EnvFileState(path="/e", present=True, sha256="d" * 64),))
    assert unpack(pack({"h": state}))["h"] == state
    from fleet.errors import FleetError
    from fleet.snapshot import from_record, to_record

    record = to_record({"h": state})
    record["hosts"]["h"]["env_files"][0]["sha256"] = "not-a-hash"
    with pytest.raises(FleetError, match="sha256"):
        from_record(record)


def test_a_hash_kept_by_another_version_of_the_parse_is_not_reused() -> None:
    from fleet.snapshot import ENV_PARSE, from_record, to_record

    state = HostState(host="h", facts=HostFacts(), units=(),
                      env_files=(EnvFileState(path="/e", present=True, sha256="d" * 64),))
    for slow in (False, True):  # the fast path, and the checking reader (a number the fast path declines)
        for parse, digest in ((ENV_PARSE, "d" * 64), (ENV_PARSE + 1, ""), (None, "")):
            record = to_record({"h": state})
            record["hosts"]["h"]["env_files"][0]["parse"] = parse
            if slow:
                record["hosts"]["h"]["facts"]["uptime"] = 2 ** 60
            kept = from_record(record)["h"]
            assert isinstance(kept, HostState) and kept.env_files[0].sha256 == digest, (slow, parse)
            assert env_offers((("/e", ()),), kept) == (("/e", (), digest),)
