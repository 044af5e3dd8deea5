"""The shell scripts `fleet apply` sends, run for real with the local `sh` (dash) in a temp dir.

We run as root, so chown works; every path is under tmp_path instead of /etc, and the state,
lock and backup directories are pointed at tmp_path before a script is built.  The health gate
runs against fake `systemctl`, `journalctl` and `curl` put first on PATH; the TCP check runs
against a real socket.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis_server import Redis

from fleet import remote
from fleet.model import HealthCheck

SH = "sh"
SCRIPTS = settings(max_examples=25, deadline=None,
                   suppress_health_check=[HypothesisHealthCheck.function_scoped_fixture])

# Values the remote shell must only ever see quoted.
NASTY = ["it's", 'say "hi"', "a b  c", "$HOME", "$(touch pwned)", "`touch pwned`", "x; touch pwned",
         "new\nline", "*", "-rf", "a\\b", "|| touch pwned", "&", "é✓"]


def sh(script: str, *, stdin: bytes = b"", cwd: Path | None = None,
       env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SH, "-c", script], input=stdin, capture_output=True, cwd=cwd,
                          env=None if env is None else dict(env), timeout=30, check=False)


def parses(script: str) -> bool:
    return subprocess.run([SH, "-n", "-c", script], capture_output=True, check=False).returncode == 0


def out(r: subprocess.CompletedProcess[bytes]) -> str:
    return r.stdout.decode("utf-8", "replace")


@dataclass
class State:
    """fleet's state directory on the "host", moved under tmp_path."""

    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    def backups(self, run_id: str) -> Path:
        return self.root / "backup" / run_id

    def backup_of(self, path: Path, run_id: str) -> Path:
        return self.backups(run_id) / remote.backup_name(str(path))


def point_state_at(monkeypatch: pytest.MonkeyPatch, root: Path) -> State:
    monkeypatch.setattr(remote, "STATE", str(root))
    monkeypatch.setattr(remote, "LOCK", f"{root}/lock")
    monkeypatch.setattr(remote, "BACKUPS", f"{root}/backup")
    return State(root)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> State:
    return point_state_at(monkeypatch, tmp_path / "var-lib-fleet")


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir()
    return d


def write(path: Path, text: str, *, mode: int = 0o644, owner: str = "root") -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    subprocess.run(["chown", owner, str(path)], check=True)
    return path


def owner_group(path: Path) -> tuple[str, str]:
    import grp
    import pwd

    st_ = path.stat()
    return pwd.getpwuid(st_.st_uid).pw_name, grp.getgrgid(st_.st_gid).gr_name


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".fleet."))


# ------------------------------------------------------------------ write_file


def test_write_file_creates_a_new_file_from_stdin_with_the_given_mode_owner_and_group(state: State,
                                                                                       etc: Path) -> None:
    target = etc / "app.env"
    r = sh(remote.write_file(str(target), mode="0640", owner="nobody", group="nogroup", run_id="r1"),
           stdin=b"A=1\nB=two words\n")
    assert r.returncode == 0 and out(r) == "@@ok\n", r.stderr
    assert target.read_bytes() == b"A=1\nB=two words\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert owner_group(target) == ("nobody", "nogroup")
    assert leftovers(etc) == []


def test_write_file_replaces_an_existing_file_and_keeps_the_old_one_as_a_backup(state: State, etc: Path) -> None:
    target = write(etc / "web.service", "old\n", mode=0o600)
    r = sh(remote.write_file(str(target), mode="0644", owner="root", group="root", run_id="r1"), stdin=b"new\n")
    assert out(r) == "@@ok\n", r.stderr
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    backup = state.backup_of(target, "r1")
    assert backup.read_text() == "old\n"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600, "the backup keeps the old file's mode"
    assert stat.S_IMODE(state.backups("r1").stat().st_mode) == 0o700, "backups may hold secrets"
    assert leftovers(etc) == []


def test_write_file_replaces_the_file_by_rename_so_readers_see_old_or_new_never_half(state: State,
                                                                                    etc: Path) -> None:
    target = write(etc / "app.env", "old\n")
    inode = target.stat().st_ino
    sh(remote.write_file(str(target), mode="0600", run_id="r1"), stdin=b"new\n")
    assert target.stat().st_ino != inode, "a new inode: written aside, then renamed over the old file"


def test_write_file_without_owner_keeps_the_owner_the_file_had(state: State, etc: Path) -> None:
    target = write(etc / "app.env", "old\n", owner="nobody:nogroup")
    r = sh(remote.write_file(str(target), mode="0600", run_id="r1"), stdin=b"new\n")
    assert out(r) == "@@ok\n", r.stderr
    assert owner_group(target) == ("nobody", "nogroup")


def test_write_file_with_only_a_group_changes_only_the_group(state: State, etc: Path) -> None:
    target = write(etc / "app.env", "old\n", owner="nobody")
    r = sh(remote.write_file(str(target), mode="0600", group="nogroup", run_id="r1"), stdin=b"new\n")
    assert out(r) == "@@ok\n", r.stderr
    assert owner_group(target)[1] == "nogroup"


def test_write_file_of_a_new_file_records_that_it_did_not_exist(state: State, etc: Path) -> None:
    target = etc / "new.service"
    sh(remote.write_file(str(target), mode="0644", run_id="r1"), stdin=b"x\n")
    assert not state.backup_of(target, "r1").exists()
    assert Path(f"{state.backup_of(target, 'r1')}.absent").exists()


def test_write_file_leaves_no_temp_file_and_the_old_file_intact_when_cat_fails(state: State, etc: Path,
                                                                               tmp_path: Path) -> None:
    target = write(etc / "app.env", "old\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake_cat = bin_ / "cat"
    fake_cat.write_text("#!/bin/sh\nprintf 'half a fi'\nexit 1\n")
    fake_cat.chmod(0o755)
    r = sh(remote.write_file(str(target), mode="0600", run_id="r1"), stdin=b"new\n",
           env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"})
    assert r.returncode != 0 and "@@ok" not in out(r)
    assert target.read_text() == "old\n"
    assert leftovers(etc) == []


def test_write_file_leaves_no_temp_file_and_the_old_file_intact_when_chown_fails(state: State,
                                                                                 etc: Path) -> None:
    target = write(etc / "app.env", "old\n")
    r = sh(remote.write_file(str(target), mode="0600", owner="no-such-user-here", run_id="r1"), stdin=b"new\n")
    assert r.returncode != 0 and "@@ok" not in out(r)
    assert b"no-such-user-here" in r.stderr
    assert target.read_text() == "old\n"
    assert leftovers(etc) == []


def test_write_file_into_a_missing_directory_fails_without_creating_anything(state: State, etc: Path) -> None:
    target = etc / "missing" / "app.env"
    r = sh(remote.write_file(str(target), mode="0600", run_id="r1"), stdin=b"new\n")
    assert r.returncode != 0 and "@@ok" not in out(r)
    assert sorted(p.name for p in etc.iterdir()) == []


# ------------------------------------------------------------------ keep_keys ("present" secrets)

OLD_ENV = """\
# managed by hand once
DB_PASS=old-db-pass
export OTP_SECRET="kept with export"
  SECRET_KEY_BASE = 'kept, indented, blanks around ='
\tSMTP_PASSWORD=kept after a tab
# OTP_SECRET=a comment mentioning the key is not carried over
OTP_SECRET_OLD=a longer key with the kept key as prefix
X_OTP_SECRET=a longer key with the kept key as suffix
LOCAL_DOMAIN=OTP_SECRET=value mentioning the key
OTP_SECRET
exportOTP_SECRET=not the export keyword
"""


def test_keep_keys_carries_over_exactly_the_lines_of_the_present_keys(state: State, etc: Path) -> None:
    target = write(etc / ".env.production", OLD_ENV, mode=0o600)
    keep = ("OTP_SECRET", "SECRET_KEY_BASE", "SMTP_PASSWORD")
    r = sh(remote.write_file(str(target), mode="0600", run_id="r1", keep_keys=keep),
           stdin=b"# Managed by fleet\nLOCAL_DOMAIN=example.org\n")
    assert out(r) == "@@ok\n", r.stderr
    assert target.read_text() == (
        "# Managed by fleet\nLOCAL_DOMAIN=example.org\n"
        'export OTP_SECRET="kept with export"\n'
        "  SECRET_KEY_BASE = 'kept, indented, blanks around ='\n"
        "\tSMTP_PASSWORD=kept after a tab\n")
    assert "old-db-pass" not in target.read_text(), "a key not declared present is dropped"


def test_keep_keys_does_not_carry_over_an_invalid_line_made_of_two_kept_keys(state: State, etc: Path) -> None:
    target = write(etc / ".env.production", "DB_PASS OTP_SECRET=x\nDB_PASS=kept\n", mode=0o600)
    sh(remote.write_file(str(target), mode="0600", run_id="r1", keep_keys=("DB_PASS", "OTP_SECRET")),
       stdin=b"NEW=1\n")
    assert target.read_text() == "NEW=1\nDB_PASS=kept\n"


def test_keep_keys_with_no_old_file_writes_just_stdin(state: State, etc: Path) -> None:
    target = etc / ".env.production"
    r = sh(remote.write_file(str(target), mode="0600", run_id="r1", keep_keys=("OTP_SECRET",)), stdin=b"A=1\n")
    assert out(r) == "@@ok\n", r.stderr
    assert target.read_text() == "A=1\n"


KEYS = ["OTP_SECRET", "DB_PASS", "SECRET_KEY_BASE", "SMTP_PASSWORD", "OTP", "DB"]
env_values = st.text(st.characters(codec="utf-8", exclude_characters="\x00\n\r"), max_size=15)
assignment = st.tuples(st.sampled_from(["", " ", "\t", "export ", "  export\t"]), st.sampled_from(KEYS),
                       st.sampled_from(["=", " = ", "\t="]), env_values)
noise = st.one_of(st.builds(lambda k, v: f"# {k}={v}", st.sampled_from(KEYS), env_values),
                  st.sampled_from(["", "   ", "#", "OTP_SECRET", "export"]))


@SCRIPTS
@given(lines=st.lists(st.one_of(assignment, noise), max_size=10),
       keep=st.sets(st.sampled_from(KEYS), min_size=1))
def test_keep_keys_carries_over_a_line_exactly_when_it_assigns_a_kept_key(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        lines: list[tuple[str, str, str, str] | str], keep: set[str]) -> None:
    root = tmp_path_factory.mktemp("keep")
    point_state_at(monkeypatch, root / "state")
    text = [ln if isinstance(ln, str) else "".join(ln) for ln in lines]
    wanted = [t for t, ln in zip(text, lines, strict=True) if not isinstance(ln, str) and ln[1] in keep]
    target = root / ".env"
    target.write_text("".join(f"{t}\n" for t in text))
    r = sh(remote.write_file(str(target), mode="0600", run_id="r", keep_keys=tuple(sorted(keep))),
           stdin=b"NEW=1\n")
    assert out(r) == "@@ok\n", r.stderr
    assert target.read_text() == "NEW=1\n" + "".join(f"{t}\n" for t in wanted)


# ------------------------------------------------------------------ restore_file / remove_files


def test_restore_file_puts_the_old_content_mode_and_owner_back(state: State, etc: Path) -> None:
    target = write(etc / "web.service", "old\n", mode=0o640, owner="nobody")
    sh(remote.write_file(str(target), mode="0644", owner="root", group="root", run_id="r1"), stdin=b"new\n")
    r = sh(remote.restore_file(str(target), run_id="r1"))
    assert out(r) == "@@ok\n", r.stderr
    assert target.read_text() == "old\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert owner_group(target)[0] == "nobody"


def test_restore_file_removes_a_file_that_did_not_exist_before_the_run(state: State, etc: Path) -> None:
    target = etc / "new.service"
    sh(remote.write_file(str(target), mode="0644", run_id="r1"), stdin=b"new\n")
    assert target.exists()
    r = sh(remote.restore_file(str(target), run_id="r1"))
    assert out(r) == "@@ok\n", r.stderr
    assert not target.exists()


def test_restore_file_of_a_file_this_run_never_wrote_changes_nothing(state: State, etc: Path) -> None:
    target = write(etc / "other.service", "untouched\n")
    r = sh(remote.restore_file(str(target), run_id="r1"))
    assert out(r) == "@@ok\n", r.stderr
    assert target.read_text() == "untouched\n"


def test_restore_file_uses_the_backup_of_its_own_run(state: State, etc: Path) -> None:
    target = write(etc / "web.service", "v1\n")
    sh(remote.write_file(str(target), mode="0644", run_id="run-a"), stdin=b"v2\n")
    sh(remote.write_file(str(target), mode="0644", run_id="run-b"), stdin=b"v3\n")
    sh(remote.restore_file(str(target), run_id="run-b"))
    assert target.read_text() == "v2\n"


def test_remove_files_removes_them_keeping_backups_that_restore_file_can_put_back(state: State,
                                                                                    etc: Path) -> None:
    a = write(etc / "web.service.d-override.conf", "[Service]\nNice=5\n")
    b = write(etc / "b c.conf", "two\n")
    missing = etc / "never-there.conf"
    r = sh(remote.remove_files((str(a), str(b), str(missing)), run_id="r1"))
    assert out(r) == "@@ok\n", r.stderr
    assert not a.exists() and not b.exists() and not missing.exists()
    assert state.backup_of(a, "r1").read_text() == "[Service]\nNice=5\n"
    assert state.backup_of(b, "r1").read_text() == "two\n"
    sh(remote.restore_file(str(a), run_id="r1"))
    assert a.read_text() == "[Service]\nNice=5\n"


def test_remove_files_of_nothing_only_says_ok(state: State) -> None:
    assert out(sh(remote.remove_files((), run_id="r1"))) == "@@ok\n"


def test_backup_names_are_flat_and_distinct_for_distinct_paths() -> None:
    names = [remote.backup_name(p) for p in ["/a/b", "/a%2Fb", "/a%b", "/a/%2F"]]
    assert len(set(names)) == len(names)
    assert all("/" not in n for n in names)


# ------------------------------------------------------------------ quoting

name_chars = st.characters(codec="utf-8", exclude_characters="\x00/")
file_names = st.text(name_chars, min_size=1, max_size=25).filter(lambda s: s not in (".", ".."))
# A directory name may not end in a newline: "$(dirname …)" drops trailing newlines.  The loader
# refuses control characters in paths (config._no_control), so fleet never builds such a path.
dir_names = file_names.filter(lambda s: not s.endswith("\n"))
run_ids = st.text(name_chars, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


def nasty_cases() -> list[tuple[str, str]]:
    return [(n, "r") for n in NASTY] + [("f", n) for n in NASTY if n != "-rf"]


@SCRIPTS
@given(subdir=dir_names, name=file_names, run_id=run_ids, content=st.binary(max_size=64))
@example(subdir="x; touch pwned", name="$(touch pwned)", run_id="`touch pwned`", content=b"secret $HOME\n")
@example(subdir="-rf", name="new\nline 'q' \"dq\"", run_id="a b;c", content=b"")
def test_write_file_writes_exactly_the_named_file_whatever_its_name(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        subdir: str, name: str, run_id: str, content: bytes) -> None:
    root = tmp_path_factory.mktemp("q")
    st_ = point_state_at(monkeypatch, root / "state")
    cwd, etc_ = root / "cwd", root / "etc"
    cwd.mkdir()
    etc_.mkdir()
    (etc_ / subdir).mkdir(exist_ok=True)
    target = etc_ / subdir / name
    script = remote.write_file(str(target), mode="0600", owner="nobody", run_id=run_id)
    assert parses(script)
    r = sh(script, stdin=content, cwd=cwd)
    assert out(r) == "@@ok\n", r.stderr
    assert target.read_bytes() == content
    assert owner_group(target)[0] == "nobody" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(etc_ / subdir)) == [name], "exactly that file, and no temp file"
    assert sorted(os.listdir(etc_)) == [subdir]
    assert os.listdir(cwd) == [], "nothing escaped quoting into the working directory"
    assert os.listdir(st_.backups(run_id)) == [remote.backup_name(str(target)) + ".absent"]
    r = sh(remote.restore_file(str(target), run_id=run_id), cwd=cwd)
    assert out(r) == "@@ok\n", r.stderr
    assert not target.exists()
    assert os.listdir(cwd) == []


@SCRIPTS
@given(names=st.lists(file_names, min_size=1, max_size=3, unique=True), run_id=run_ids)
@example(names=["$(touch pwned)", "a;b", "*"], run_id="x y")
def test_remove_files_removes_exactly_the_named_files_whatever_their_names(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        names: list[str], run_id: str) -> None:
    root = tmp_path_factory.mktemp("rm")
    st_ = point_state_at(monkeypatch, root / "state")
    cwd, etc_ = root / "cwd", root / "etc"
    cwd.mkdir()
    etc_.mkdir()
    bystander = etc_ / "bystander"
    bystander.write_text("stay")
    for n in names:
        (etc_ / n).write_text(n)
    script = remote.remove_files(tuple(str(etc_ / n) for n in names), run_id=run_id)
    assert parses(script)
    assert out(sh(script, cwd=cwd)) == "@@ok\n"
    assert os.listdir(etc_) == ["bystander"] and os.listdir(cwd) == []
    assert sorted(os.listdir(st_.backups(run_id))) == sorted(remote.backup_name(str(etc_ / n)) for n in names)


@SCRIPTS
@given(value=st.one_of(st.sampled_from(NASTY), st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                                                       max_size=30)))
def test_every_builder_makes_a_script_sh_accepts_whatever_the_values(value: str) -> None:
    scripts = [
        remote.write_file(f"/etc/{value}", mode="0600", owner=value or None, group=value or None, run_id=value,
                          keep_keys=("A", "B")),
        remote.restore_file(value, run_id=value),
        remote.remove_files((value, f"/x/{value}"), run_id=value),
        remote.prune(value, ("stop", "disable", "remove"), (value,), run_id=value),
        remote.systemctl("restart", value),
        remote.health_gate(value, HealthCheck(command=value, timeout=2), settle=0.1, start_timeout=1),
        remote.health_gate(value, HealthCheck(http=value, timeout=2), settle=0.1, start_timeout=1),
        remote.acquire_lock(value),
        remote.release_lock(value),
        remote.update_lock(value, value),
    ]
    for s in scripts:
        assert parses(s), s


@pytest.mark.parametrize("check", [
    None,
    HealthCheck(http="http://127.0.0.1:3000/health", timeout=30),
    HealthCheck(tcp=5432, timeout=15),
    HealthCheck(command="systemctl is-active --quiet 'x.service' && test \"$(echo ok)\" = ok", timeout=10),
], ids=["none", "http", "tcp", "command"])
def test_health_gate_is_valid_sh_for_every_kind_of_check(check: HealthCheck | None) -> None:
    assert parses(remote.health_gate("mastodon-web.service", check, settle=3, start_timeout=30))


# ------------------------------------------------------------------ locks


def test_acquire_lock_takes_a_free_host_and_records_the_holder(state: State) -> None:
    holder = json.dumps({"run_id": "run-1", "operator": "alice@laptop"})
    r = sh(remote.acquire_lock(holder))
    assert out(r) == "@@locked\n", r.stderr
    assert json.loads((state.lock / "holder").read_text()) == json.loads(holder)
    assert stat.S_IMODE(state.root.stat().st_mode) == 0o700


def test_acquire_lock_twice_says_held_with_the_first_holders_json(state: State) -> None:
    first = json.dumps({"run_id": "run-1", "operator": "alice@laptop", "note": "it's \"quoted\" $HOME"})
    assert out(sh(remote.acquire_lock(first))) == "@@locked\n"
    r = sh(remote.acquire_lock(json.dumps({"run_id": "run-2", "operator": "bob@desk"})))
    head, body = out(r).split("\n", 1)
    assert head == "@@held"
    assert json.loads(body) == json.loads(first)


def test_read_lock_says_free_or_held_with_the_holder(state: State) -> None:
    assert out(sh(remote.read_lock())) == "@@free\n"
    sh(remote.acquire_lock('{"run_id": "run-1"}'))
    head, body = out(sh(remote.read_lock())).split("\n", 1)
    assert (head, json.loads(body)) == ("@@held", {"run_id": "run-1"})


def test_release_lock_with_another_token_does_not_release_it(state: State) -> None:
    sh(remote.acquire_lock(json.dumps({"token": "0123456789abcdef", "run_id": ""})))
    assert out(sh(remote.release_lock("fedcba9876543210"))) == "@@ok\n"
    assert state.lock.is_dir()
    assert out(sh(remote.read_lock())).startswith("@@held")


def test_release_lock_with_its_own_token_releases_it(state: State) -> None:
    sh(remote.acquire_lock(json.dumps({"token": "0123456789abcdef"})))
    assert out(sh(remote.release_lock("0123456789abcdef"))) == "@@ok\n"
    assert not state.lock.exists()
    assert out(sh(remote.acquire_lock('{"token": "next"}'))) == "@@locked\n"


def test_release_lock_of_a_free_host_only_says_ok(state: State) -> None:
    assert out(sh(remote.release_lock("0123456789abcdef"))) == "@@ok\n"
    assert not state.lock.exists()


@pytest.mark.parametrize("token", ["", "0123456789abcde", "0123456789abcdef0", "alice", "token"],
                         ids=["empty", "a-prefix", "longer", "found-in-operator", "the-field-name"])
def test_release_lock_matches_the_holders_token_field_exactly(state: State, token: str) -> None:
    sh(remote.acquire_lock(json.dumps({"operator": "alice@laptop", "token": "0123456789abcdef"})))
    sh(remote.release_lock(token))
    assert state.lock.is_dir()


def test_update_lock_rewrites_the_holder_of_a_lock_it_holds(state: State) -> None:
    sh(remote.acquire_lock(json.dumps({"token": "0123456789abcdef", "run_id": ""})))
    relabelled = json.dumps({"token": "0123456789abcdef", "run_id": "20261128T140307-a1b2c3", "op": "it's $x"})
    assert out(sh(remote.update_lock(relabelled, "0123456789abcdef"))) == "@@ok\n"
    assert json.loads((state.lock / "holder").read_text()) == json.loads(relabelled)
    assert sorted(os.listdir(state.lock)) == ["holder"]


def test_update_lock_leaves_another_applys_lock_alone(state: State) -> None:
    theirs = json.dumps({"token": "0123456789abcdef", "operator": "bob@desk"})
    sh(remote.acquire_lock(theirs))
    sh(remote.update_lock(json.dumps({"token": "fedcba9876543210", "operator": "eve"}), "fedcba9876543210"))
    assert json.loads((state.lock / "holder").read_text()) == json.loads(theirs)


def test_update_lock_does_not_create_a_lock_on_a_free_host(state: State) -> None:
    assert out(sh(remote.update_lock('{"token": "t"}', "t"))) == "@@ok\n"
    assert not state.lock.exists()


def test_break_lock_removes_anyones_lock(state: State) -> None:
    sh(remote.acquire_lock('{"run_id": "run-1"}'))
    assert out(sh(remote.break_lock())) == "@@ok\n"
    assert not state.lock.exists()
    assert out(sh(remote.read_lock())) == "@@free\n"


def test_only_one_of_many_simultaneous_acquires_gets_the_lock(state: State) -> None:
    procs = [subprocess.Popen([SH, "-c", remote.acquire_lock(json.dumps({"token": f"t{i}"}))],
                              stdout=subprocess.PIPE) for i in range(8)]
    outs = [p.communicate()[0].decode() for p in procs]
    assert sum(o.startswith("@@locked") for o in outs) == 1
    assert all(o.startswith("@@held\n") for o in outs if not o.startswith("@@locked"))
    winner = (state.lock / "holder").read_text()
    # A loser that looks between the winner's mkdir and its write of the holder sees no holder yet.
    assert all(o[len("@@held\n"):] in ("", winner) for o in outs if o.startswith("@@held"))


# ------------------------------------------------------------------ systemctl / prune (fake systemctl)


CLOCK_START = 1_764_338_587  # 2025-11-28T14:03:07Z, whole seconds like `date +%s`


@dataclass
class FakeSystemd:
    """`systemctl`, `journalctl`, `curl`, `date` and `sleep` stand-ins first on PATH.

    `systemctl show` prints show.N on its Nth call (or `show` when there is no show.N);
    every call's arguments are logged one per line, calls separated by a "--call--" line.
    `date +%s` and `sleep` share a fake clock: a sleep advances it and returns at once, so the
    health gate's timeouts are checked on that clock, never by waiting (or timing) for real."""

    dir: Path
    bin: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def show(self, active: str, sub: str, n_restarts: int = 0, pid: int = 100, *, call: int | None = None) -> None:
        name = "show" if call is None else f"show.{call}"
        (self.dir / name).write_text(f"ActiveState={active}\nSubState={sub}\nNRestarts={n_restarts}\nMainPID={pid}\n")

    def calls(self, tool: str) -> list[list[str]]:
        log = self.dir / f"{tool}.log"
        if not log.exists():
            return []
        chunks = log.read_text().split("--call--\n")[1:]
        return [c.split("\0")[:-1] for c in chunks]

    def curl_exits(self, code: int) -> None:
        (self.dir / "curl.rc").write_text(str(code))

    def sleeps(self) -> list[float]:
        return [float(seconds) for seconds, in self.calls("sleep")]

    def elapsed(self) -> float:
        """Seconds the fake clock advanced: what the gate's sleeps added up to."""
        return float((self.dir / "clock").read_text()) - CLOCK_START


@pytest.fixture
def systemd(tmp_path: Path) -> FakeSystemd:
    d, b = tmp_path / "fake", tmp_path / "bin"
    d.mkdir()
    b.mkdir()
    (d / "clock").write_text(f"{CLOCK_START}.000\n")
    real_date = shutil.which("date") or "/bin/date"
    log = 'printf -- "--call--\\n" >> {d}/{tool}.log; for a in "$@"; do printf "%s\\0" "$a" >> {d}/{tool}.log; done\n'
    scripts = {
        "systemctl": log + 'if [ "$1" = show ]; then n=$(cat {d}/count 2>/dev/null || echo 0); n=$((n + 1)); '
                           'echo $n > {d}/count; if [ -f {d}/show.$n ]; then cat {d}/show.$n; else cat {d}/show; fi; '
                           'fi\nexit 0\n',
        "journalctl": log + "echo 'Nov 28 14:03:07 host puma[100]: boot failed: no database'\n"
                            "echo 'Nov 28 14:03:08 host systemd[1]: mastodon-web.service: Failed'\n",
        "curl": log + "exit $(cat {d}/curl.rc 2>/dev/null || echo 0)\n",
        "sleep": log + 'awk -v s="$1" \'{{ printf "%.3f\\n", $1 + s }}\' {d}/clock > {d}/clock.new && '
                       'mv {d}/clock.new {d}/clock\n',
        "date": 'if [ "$*" = +%s ]; then awk \'{{ printf "%d\\n", $1 }}\' {d}/clock; else exec {date} "$@"; fi\n',
    }
    for tool, body in scripts.items():
        p = b / tool
        p.write_text("#!/bin/sh\n" + body.format(d=shlex.quote(str(d)), tool=tool, date=shlex.quote(real_date)))
        p.chmod(0o755)
    fake = FakeSystemd(d, b)
    fake.show("active", "running")
    return fake


def test_systemctl_passes_the_unit_as_one_argument_and_says_ok(systemd: FakeSystemd) -> None:
    r = sh(remote.systemctl("restart", "x; touch pwned.service"), env=systemd.env)
    assert out(r) == "@@ok\n"
    assert systemd.calls("systemctl") == [["restart", "--", "x; touch pwned.service"]]


def test_systemctl_says_nothing_when_systemctl_fails(tmp_path: Path) -> None:
    b = tmp_path / "bin"
    b.mkdir()
    (b / "systemctl").write_text("#!/bin/sh\necho 'Job failed' >&2\nexit 1\n")
    (b / "systemctl").chmod(0o755)
    r = sh(remote.systemctl("start", "x.service"), env={**os.environ, "PATH": f"{b}:{os.environ['PATH']}"})
    assert "@@ok" not in out(r)


def test_prune_stops_disables_removes_with_backups_and_reloads(state: State, etc: Path,
                                                               systemd: FakeSystemd) -> None:
    unit = write(etc / "mastodon-sidekiq.service", "[Service]\nExecStart=/bin/true\n")
    drop_in = write(etc / "override.conf", "[Service]\nNice=5\n")
    r = sh(remote.prune("mastodon-sidekiq.service", ("stop", "disable", "remove"), (str(unit), str(drop_in)),
                        run_id="r1"), env=systemd.env)
    assert out(r) == "@@ok\n", r.stderr
    assert systemd.calls("systemctl") == [["stop", "--", "mastodon-sidekiq.service"],
                                          ["disable", "--quiet", "--", "mastodon-sidekiq.service"],
                                          ["daemon-reload"]]
    assert not unit.exists() and not drop_in.exists()
    assert state.backup_of(unit, "r1").read_text() == "[Service]\nExecStart=/bin/true\n"
    assert state.backup_of(drop_in, "r1").read_text() == "[Service]\nNice=5\n"


def test_prune_of_only_stop_touches_no_file_and_does_not_reload(state: State, etc: Path,
                                                                systemd: FakeSystemd) -> None:
    unit = write(etc / "x.service", "[Service]\n")
    r = sh(remote.prune("x.service", ("stop",), (), run_id="r1"), env=systemd.env)
    assert out(r) == "@@ok\n", r.stderr
    assert systemd.calls("systemctl") == [["stop", "--", "x.service"]]
    assert unit.exists()


# ------------------------------------------------------------------ health gate (fake systemd)


def gate(systemd: FakeSystemd, check: HealthCheck | None = None, *, unit: str = "mastodon-web.service",
         settle: float = 0.1, start_timeout: float = 1) -> str:
    r = sh(remote.health_gate(unit, check, settle=settle, start_timeout=start_timeout), env=systemd.env)
    assert r.returncode == 0, r.stderr
    return out(r)


def _sidekiq_gate(systemd: FakeSystemd, redis: Redis, tmp_path: Path) -> str:
    from fleet.sidekiq import beat_script

    env = tmp_path / ".env.production"
    env.write_text(redis.env())
    then = beat_script(str(env), '"$p0"', timeout=5, each="up")
    r = sh(remote.health_gate("mastodon-sidekiq.service", HealthCheck(sidekiq=True), settle=0.1, start_timeout=1,
                              then=then), env=systemd.env)
    assert r.returncode == 0, r.stderr
    return out(r)


def test_the_sidekiq_gate_reads_the_heartbeat_of_the_units_main_pid(systemd: FakeSystemd, redis: Redis,
                                                                  tmp_path: Path) -> None:
    redis.flush()
    me = Path("/proc/sys/kernel/hostname").read_text().strip()
    redis.cli("SADD", "processes", f"{me}:100:0123456789ab")
    redis.cli("HSET", f"{me}:100:0123456789ab", "beat", "1", "info", "{}")
    text = _sidekiq_gate(systemd, redis, tmp_path)
    assert text.splitlines()[0] == f"@@sidekiq-beat id {me}:100:0123456789ab" and text.endswith("@@gate ok\n")


def test_the_sidekiq_gate_fails_at_once_when_the_unit_stops_while_it_waits_for_the_heartbeat(
        systemd: FakeSystemd, redis: Redis, tmp_path: Path) -> None:
    redis.flush()
    systemd.show("inactive", "dead", call=4)  # 1: reached active, 2: after settling, 3: first wait, 4: second
    text = _sidekiq_gate(systemd, redis, tmp_path)
    assert text.startswith("@@gate fail unit stopped before its Sidekiq heartbeat was read (now inactive/dead)\n")
    assert "@@sidekiq-beat none" not in text  # it did not wait out the window


def test_health_gate_passes_for_a_unit_that_stays_active_and_running(systemd: FakeSystemd) -> None:
    text = gate(systemd)
    assert text == "@@gate ok\n"
    assert ["show", "-p", "ActiveState", "-p", "SubState", "-p", "NRestarts", "-p", "MainPID", "--",
            "mastodon-web.service"] in systemd.calls("systemctl")


def test_health_gate_accepts_active_exited_for_oneshot_distro_units(systemd: FakeSystemd) -> None:
    systemd.show("active", "exited", pid=0)
    assert gate(systemd, unit="postgresql.service") == "@@gate ok\n"


def test_health_gate_waits_for_an_activating_unit(systemd: FakeSystemd) -> None:
    systemd.show("activating", "start", call=1)
    systemd.show("activating", "start", call=2)
    assert gate(systemd) == "@@gate ok\n"


def test_health_gate_fails_a_unit_that_reports_failed_and_shows_its_journal(systemd: FakeSystemd) -> None:
    systemd.show("failed", "failed", pid=0)
    text = gate(systemd)
    lines = text.splitlines()
    assert lines[0] == "@@gate fail unit failed to start (failed/failed)"
    assert lines[1:] == ["| Nov 28 14:03:07 host puma[100]: boot failed: no database",
                         "| Nov 28 14:03:08 host systemd[1]: mastodon-web.service: Failed"]
    assert systemd.calls("journalctl") == [["-u", "mastodon-web.service", "-n", "15", "--no-pager",
                                            "-o", "short-iso"]]


def test_health_gate_fails_a_unit_that_restarts_during_the_settle_period(systemd: FakeSystemd) -> None:
    systemd.show("active", "running", n_restarts=0, pid=100, call=1)
    systemd.show("active", "running", n_restarts=1, pid=200)
    text = gate(systemd)
    assert text.splitlines()[0] == ("@@gate fail unit restarted during the settle period "
                                    "(NRestarts 0 -> 1, MainPID 100 -> 200)")
    assert "| " in text


def test_health_gate_fails_a_unit_that_stops_during_the_settle_period(systemd: FakeSystemd) -> None:
    systemd.show("active", "running", call=1)
    systemd.show("inactive", "dead", pid=0)
    assert gate(systemd).startswith("@@gate fail unit stopped during the settle period (now inactive/dead)")


def test_health_gate_fails_a_unit_that_never_becomes_active_within_the_start_timeout(
        systemd: FakeSystemd) -> None:
    systemd.show("activating", "start")
    text = gate(systemd, start_timeout=2)
    assert text.startswith("@@gate fail unit did not reach active/running within 2s (now activating/start)")
    # It polled until the clock (whole seconds) passed the timeout, and not much longer.
    assert 2 <= systemd.elapsed() <= 3, systemd.sleeps()
    assert len([c for c in systemd.calls("systemctl") if c[0] == "show"]) == len(systemd.sleeps()) + 1


def test_health_gate_passes_when_the_http_check_answers(systemd: FakeSystemd) -> None:
    systemd.curl_exits(0)
    url = "http://127.0.0.1:3000/health?a=1&b='2'"
    assert gate(systemd, HealthCheck(http=url, timeout=1)) == "@@gate ok\n"
    assert systemd.calls("curl")[0][-1] == url


def test_health_gate_fails_within_its_timeout_when_the_http_check_never_passes(systemd: FakeSystemd) -> None:
    systemd.curl_exits(22)
    text = gate(systemd, HealthCheck(http="http://127.0.0.1:3000/health", timeout=5), settle=0.1)
    assert text.splitlines()[0] == ("@@gate fail health check GET http://127.0.0.1:3000/health "
                                    "did not pass within 5s")
    assert text.splitlines()[1].startswith("| ")
    # settle, then probes every 0.5 s until the clock (whole seconds) reaches the timeout
    assert systemd.sleeps()[0] == 0.1 and set(systemd.sleeps()[1:]) == {0.5}
    assert 4 <= systemd.elapsed() - 0.1 <= 5.5, systemd.sleeps()
    assert len(systemd.calls("curl")) == len(systemd.sleeps()), "it retries until the timeout"


def test_health_gate_names_a_crash_loop_caught_between_two_restarts_a_restart(systemd: FakeSystemd) -> None:
    systemd.show("active", "running", n_restarts=0, pid=100, call=1)
    systemd.show("activating", "auto-restart", n_restarts=1, pid=0)
    assert gate(systemd).splitlines()[0] == ("@@gate fail unit restarted during the settle period "
                                                "(NRestarts 0 -> 1, MainPID 100 -> 0)")


def test_health_gate_fails_at_once_when_the_unit_stops_while_its_health_check_is_awaited(
        systemd: FakeSystemd) -> None:
    # started (call 1), still the same process after the settle period (call 2), then it exits
    systemd.show("active", "running", n_restarts=0, pid=100, call=1)
    systemd.show("active", "running", n_restarts=0, pid=100, call=2)
    systemd.show("failed", "failed", n_restarts=0, pid=0)
    systemd.curl_exits(7)
    text = gate(systemd, HealthCheck(http="http://127.0.0.1:3000/health", timeout=30), settle=0.1)
    assert text.splitlines()[0] == "@@gate fail unit stopped before its health check passed (now failed/failed)"
    assert systemd.sleeps() == [0.1], "it fails on the first look, without waiting out the 30 s health timeout"


def test_health_gate_names_a_restart_with_a_new_pid_while_its_health_check_is_awaited(systemd: FakeSystemd) -> None:
    systemd.show("active", "running", n_restarts=0, pid=100, call=1)
    systemd.show("active", "running", n_restarts=0, pid=100, call=2)
    systemd.show("active", "running", n_restarts=1, pid=200)
    systemd.curl_exits(7)
    text = gate(systemd, HealthCheck(http="http://127.0.0.1:3000/health", timeout=30), settle=0.1)
    assert text.splitlines()[0] == ("@@gate fail unit restarted before its health check passed "
                                    "(NRestarts 0 -> 1, MainPID 100 -> 200)")
    assert systemd.sleeps() == [0.1], "it fails on the first look, without waiting out the 30 s health timeout"


def test_health_gate_passes_when_the_tcp_port_accepts_connections(systemd: FakeSystemd) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        assert gate(systemd, HealthCheck(tcp=port, timeout=1)) == "@@gate ok\n"


def test_health_gate_fails_when_the_tcp_port_stays_closed(systemd: FakeSystemd) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        text = gate(systemd, HealthCheck(tcp=port, timeout=2), settle=0.1)
    assert text.splitlines()[0] == f"@@gate fail health check TCP port {port} did not pass within 2s"
    assert 1 <= systemd.elapsed() - 0.1 <= 2.5, systemd.sleeps()


def test_health_gate_runs_a_command_check_with_its_quoting_intact(systemd: FakeSystemd, tmp_path: Path) -> None:
    flag = tmp_path / "it's ready"
    flag.write_text("")
    check = HealthCheck(command=f"test -e {shlex.quote(str(flag))} && [ \"$(echo a b)\" = 'a b' ]", timeout=1)
    assert gate(systemd, check) == "@@gate ok\n"
    flag.unlink()
    text = gate(systemd, check)
    assert text.startswith("@@gate fail health check command `test -e")


def test_health_gate_never_runs_the_unit_name_as_code(systemd: FakeSystemd, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    unit = "$(touch pwned)`touch pwned`; touch pwned.service"
    r = sh(remote.health_gate(unit, None, settle=0.1, start_timeout=1), env=systemd.env, cwd=cwd)
    assert out(r) == "@@gate ok\n"
    assert os.listdir(cwd) == []
    assert systemd.calls("systemctl")[0][-1] == unit
