"""Git provenance of the desired state (fleet/provenance.py), against real throwaway repositories:
the commit and whether the desired state is dirty; never an error, whatever git says."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleet.provenance import Provenance, desired_paths, git_provenance


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "ops"
    (r / "hosts").mkdir(parents=True)
    (r / "desired_state.toml").write_text('fleet = "x"\n')
    (r / "hosts" / "franz.toml").write_text('address = "franz"\n')
    (r / "README").write_text("not the desired state\n")
    git(r, "init", "-q")
    git(r, "add", ".")
    git(r, "commit", "-q", "-m", "one")
    return r


def paths(repo: Path) -> list[Path]:
    return desired_paths(repo / "desired_state.toml", repo / "hosts")


def test_a_clean_checkout_names_its_commit(repo: Path) -> None:
    p = git_provenance(paths(repo))
    assert p == Provenance(git(repo, "rev-parse", "HEAD"), dirty=False)
    assert p is not None and p.describe() == f"git {p.commit[:12]}"


@pytest.mark.parametrize("change", ["modified", "staged", "untracked host", "removed"])
def test_any_change_to_the_desired_state_makes_it_dirty(repo: Path, change: str) -> None:
    if change == "modified":
        (repo / "desired_state.toml").write_text('fleet = "y"\n')
    elif change == "staged":
        (repo / "hosts" / "franz.toml").write_text('address = "fritz"\n')
        git(repo, "add", "hosts/franz.toml")
    elif change == "untracked host":
        (repo / "hosts" / "fritz.toml").write_text('address = "fritz"\n')
    else:
        (repo / "hosts" / "franz.toml").unlink()
    p = git_provenance(paths(repo))
    assert p is not None and p.dirty and p.describe().endswith(" (dirty)")


def test_changes_outside_the_desired_state_do_not_make_it_dirty(repo: Path) -> None:
    (repo / "README").write_text("edited\n")
    (repo / "notes.txt").write_text("new\n")
    p = git_provenance(paths(repo))
    assert p is not None and not p.dirty


def test_units_next_to_the_desired_state_are_part_of_it(repo: Path) -> None:
    (repo / "units").mkdir()
    (repo / "units" / "x.service").write_text("[Service]\n")
    assert repo / "units" in paths(repo)
    p = git_provenance(paths(repo))
    assert p is not None and p.dirty


def test_an_inventory_outside_the_repository_is_not_pinned_by_its_commit(repo: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "hosts-elsewhere"
    elsewhere.mkdir()
    p = git_provenance(desired_paths(repo / "desired_state.toml", elsewhere))
    assert p is not None and p.dirty


def test_a_subdirectory_of_a_repository_works(tmp_path: Path) -> None:
    r = tmp_path / "mono"
    (r / "ops" / "hosts").mkdir(parents=True)
    (r / "ops" / "desired_state.toml").write_text("x\n")
    git(r, "init", "-q")
    git(r, "add", ".")
    git(r, "commit", "-q", "-m", "one")
    p = git_provenance(desired_paths(r / "ops" / "desired_state.toml", r / "ops" / "hosts"))
    assert p is not None and not p.dirty and p.commit == git(r, "rev-parse", "HEAD")


def test_not_a_repository_no_commit_yet_or_no_git_is_none(tmp_path: Path, repo: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "desired_state.toml").write_text("x\n")
    assert git_provenance([plain / "desired_state.toml"]) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    assert git_provenance([empty / "desired_state.toml"]) is None
    assert git_provenance(paths(repo), git=str(tmp_path / "no-such-git")) is None
    assert git_provenance([]) is None


def test_a_git_that_fails_or_hangs_is_none(tmp_path: Path, repo: Path) -> None:
    failing = tmp_path / "git-failing"
    failing.write_text("#!/bin/sh\necho 'fatal: detected dubious ownership' >&2\nexit 128\n")
    failing.chmod(0o755)
    assert git_provenance(paths(repo), git=str(failing)) is None
    hanging = tmp_path / "git-hanging"
    hanging.write_text("#!/bin/sh\nexec sleep 30\n")
    hanging.chmod(0o755)
    assert git_provenance(paths(repo), git=str(hanging), timeout=0.2) is None


def test_git_environment_pointing_elsewhere_is_ignored(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    p = git_provenance(paths(repo))
    monkeypatch.delenv("GIT_DIR")
    assert p is not None and p.commit == git(repo, "rev-parse", "HEAD")
