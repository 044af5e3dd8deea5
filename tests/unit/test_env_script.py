"""The env file's part of the remote script, run here with `sh` over files built in tmp_path: every
secret hashed exactly as the one-`sha256sum`-per-secret script did, with one `sha256sum` process
per SECRETS_PER_HASH secrets, the lines in the file's order."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from fleet.envfile import fingerprint
from fleet.mastodon import SECRET_NAME_PATTERN
from fleet.resources.env_file import _ENV_AWK, SECRETS_PER_HASH, EnvFiles, parse_env

# The script as it was (fleet 2026-12-01): one `printf %b | sha256sum` per secret.  Its hashes are
# what observations kept in the journal hold; the new script must print the same ones.
OLD_LOOP = ("| while IFS= read -r l; do case $l in "
            "'S '*) k=${l#S }; v=${k#* }; k=${k%% *}; "
            "printf 'secret %s ' \"$k\"; printf '%b' \"$v\" | sha256sum;; "
            "*) printf '%s\\n' \"$l\";; esac; done")


def shim(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose sha256sum logs each start (and its argv) before running the real one."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sha256sum.log"
    bin_dir.mkdir()
    real = subprocess.run(["sh", "-c", "command -v sha256sum"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (bin_dir / "sha256sum").write_text(f'#!/bin/sh\necho "$*" >>{log}\nexec {real} "$@"\n')
    (bin_dir / "sha256sum").chmod(0o755)
    return {**os.environ, "LC_ALL": "C", "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


VALUES = {
    "SECRET_KEY_BASE": "a" * 128,
    "OTP_SECRET": r"back\slash\\and\nnot-a-newline",
    "DB_PASS": "",
    "REDIS_PASSWORD": "with spaces and 'quotes' and $dollar `tick`",
    "LOCAL_DOMAIN": "example.org",
    "VAPID_PRIVATE_KEY": "-starts-with-a-dash",
    "SMTP_PASSWORD": "pct%s%b%%",
    "AWS_SECRET_ACCESS_KEY": "x" * 70_000,  # more than a pipe's buffer
    "S3_ENABLED": "true",
    "ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY": "p1",
    "ACTIVE_RECORD_ENCRYPTION_DETERMINISTIC_KEY": "p2",
    "ACTIVE_RECORD_ENCRYPTION_KEY_DERIVATION_SALT": "p3",
    "MY_API_KEY": "p4",
}


def env_text() -> str:
    lines = [f"{k}={v}" for k, v in VALUES.items()]
    lines.insert(3, 'MULTI_TOKEN="line one\nline two"')
    return "\n".join(lines) + "\n"


def run(script: str, env: dict[str, str]) -> str:
    return subprocess.run(["sh", "-c", "set -f\n" + script], capture_output=True, text=True, check=True,
                          env=env).stdout


@pytest.mark.parametrize("secrets", [0, 1, SECRETS_PER_HASH, SECRETS_PER_HASH + 1, 2 * SECRETS_PER_HASH + 1])
def test_every_secret_is_hashed_as_before_with_one_sha256sum_per_batch(tmp_path: Path, secrets: int) -> None:
    path = tmp_path / ".env.production"
    plain = [f"PLAIN_{i}=v{i}" for i in range(3)]
    items = [f"K{i}_SECRET=s\\{i}\\n{i}" for i in range(secrets)]
    path.write_text("\n".join(x for pair in zip(items, plain * 10, strict=False) for x in pair) + "\n"
                    + "\n".join(items[len(plain) * 10:] + plain[secrets:]) + "\n")
    env, log = shim(tmp_path)
    new = run(EnvFiles().script(((str(path), ()),)), env)
    # the secrets' batches; the whole file's hash after the parse reads stdin (no argument)
    calls = [c for c in (log.read_text().splitlines() if log.exists() else []) if c]
    assert len(calls) == -(-secrets // SECRETS_PER_HASH)  # ceil: one process per batch
    assert all("/dev/fd/" in c and "SECRET" not in c for c in calls)  # values never in an argv
    log.unlink(missing_ok=True)
    q = shlex.quote
    old = run(f"awk -v s=' ' -v secret_re={q(SECRET_NAME_PATTERN)} -v maxl=5000 {q(_ENV_AWK)} {path} {OLD_LOOP}", env)
    assert len(log.read_text().splitlines()) == secrets if secrets else not log.exists()
    new_lines = new.splitlines()[2:]  # after `@@env PATH` and `meta …`
    assert new_lines.pop() == f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert [x.split(" ")[:3] for x in new_lines] == [x.split(" ")[:3] for x in old.splitlines()]


def test_the_hashes_are_the_fingerprints_of_the_raw_values_in_the_files_order(tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    path.write_text(env_text())
    env, log = shim(tmp_path)
    out = run(EnvFiles().script(((str(path), ("DB_PASS",)),)), env)
    assert out.splitlines()[0] == f"@@env {path}"
    state = parse_env("h", str(path), out.splitlines()[1:])
    expected_keys = list(VALUES)
    expected_keys.insert(3, "MULTI_TOKEN")
    assert list(state.keys) == expected_keys
    secrets = dict(state.secrets)
    assert set(secrets) == {k for k in expected_keys if k not in ("LOCAL_DOMAIN", "S3_ENABLED")}
    for k, v in VALUES.items():
        if k in secrets and "\\" not in v:
            assert secrets[k] == hashlib.sha256(v.encode()).hexdigest(), k  # the raw text, as before
    assert secrets["SECRET_KEY_BASE"] == fingerprint(VALUES["SECRET_KEY_BASE"])
    assert secrets["MULTI_TOKEN"] == hashlib.sha256(b'"line one\nline two"').hexdigest()
    assert dict(state.values) == {"LOCAL_DOMAIN": "example.org", "S3_ENABLED": "true"}
    assert len([c for c in log.read_text().splitlines() if c]) == 2  # 11 secrets: two processes, not eleven
    for k, v in VALUES.items():
        if k in secrets and len(v) > 3:
            assert v not in out
