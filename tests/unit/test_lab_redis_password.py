"""The lab's Redis password: made once per lab state directory, given to the lab's Redis by
`fleet lab up` and to the env file's REDIS_PASSWORD by the lab secrets — the same value, never shown."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from observed import example

from fleet.errors import FleetError
from fleet.lab import image, machines
from fleet.secrets import LAB_REDIS_PASSWORD_FILE, ensure_lab_redis_password, ensure_lab_secrets


def test_the_password_is_made_once_private_and_kept(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    first = ensure_lab_redis_password(lab)
    path = lab / LAB_REDIS_PASSWORD_FILE
    assert len(first) == 48 and int(first, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_lab_redis_password(lab) == first
    assert ensure_lab_redis_password(tmp_path / "other") != first


@pytest.mark.parametrize("content", ["hunter2\n", "", "\x00\xff"])
def test_a_password_file_fleet_did_not_write_is_refused_not_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / LAB_REDIS_PASSWORD_FILE
    path.write_bytes(content.encode("latin-1"))
    if not content:
        assert len(ensure_lab_redis_password(tmp_path)) == 48  # empty: nothing to keep
        return
    with pytest.raises(FleetError, match="does not hold a password fleet made"):
        ensure_lab_redis_password(tmp_path)
    assert path.read_bytes() == content.encode("latin-1")


def test_the_lab_secrets_give_redis_password_the_lab_redis_password_and_keep_it_in_step(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    secrets = lab / "secrets.toml"
    assert ensure_lab_secrets(example(), secrets)
    password = ensure_lab_redis_password(lab)
    table = tomllib.loads(secrets.read_text())["mastodon"]
    assert table["REDIS_PASSWORD"] == password
    assert table["DB_PASS"] != password and len(table["DB_PASS"]) == 48  # others stay random
    assert not ensure_lab_secrets(example(), secrets)  # nothing to change
    # a secrets file from before (a random REDIS_PASSWORD) is brought in step with the lab's Redis
    secrets.write_text(secrets.read_text().replace(password, "0" * 48))
    assert ensure_lab_secrets(example(), secrets)
    assert tomllib.loads(secrets.read_text())["mastodon"]["REDIS_PASSWORD"] == password
    assert tomllib.loads(secrets.read_text())["mastodon"]["DB_PASS"] == table["DB_PASS"]


def test_lab_up_gives_each_host_redis_the_password_and_the_lab_network(tmp_path: Path) -> None:
    root = tmp_path / "merged"
    (root / "etc/redis").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/bash\nredis:x:104:107::/var/lib/redis:/usr/sbin/nologin\n")
    machines.write_redis_conf(root, "ab" * 24)
    conf = root / image.REDIS_LAB_CONF.lstrip("/")
    assert conf.read_text().splitlines()[1:] == ["bind 0.0.0.0 -::1", f"requirepass {'ab' * 24}"]
    st = conf.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == (0, 107)
    assert image.REDIS_INCLUDE.strip().endswith(f"include {image.REDIS_LAB_CONF}")
    assert "redis_include" in image.recipe()  # a change to it builds a new image


def test_a_host_without_a_redis_user_is_a_lab_error(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/bash\n")
    from fleet.errors import LabError

    with pytest.raises(LabError, match="redis"):
        machines.write_redis_conf(tmp_path, "ab" * 24)
    assert os.listdir(tmp_path / "etc") == ["passwd"]
