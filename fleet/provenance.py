"""Which version of the desired state a run applied: its git commit, and whether it was dirty.

When desired_state.toml lives in a git repository, each run records the commit of HEAD and
whether the desired state (desired_state.toml, the inventory directory, units/ when present)
differed from it — modified, staged or untracked files all count — so that "which version of
the desired state did this" has an answer in `fleet log` and in the hosts' history.

The only subprocess here is `git`, read-only: `GIT_OPTIONAL_LOCKS=0` so that `git status` never
takes the index lock an operator's own git command may be waiting for, and repository hooks
such as `core.fsmonitor` are switched off.  No git, not a repository, a repository without
a commit, one git refuses (owned by another user), a timeout: the answer is None, never an
error — provenance is worth having, not worth failing a command for.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GIT_TIMEOUT = 5.0
# What makes git look somewhere other than the directory it is pointed at.
_REDIRECTING = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
                "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES")


@dataclass(frozen=True)
class Provenance:
    commit: str  # full hex id of HEAD
    dirty: bool  # the desired state differs from that commit (or lies partly outside the repository)

    def describe(self) -> str:
        """`git 3f2a9c1d0b7e` or `git 3f2a9c1d0b7e (dirty)`."""
        return f"git {self.commit[:12]}" + (" (dirty)" if self.dirty else "")


def desired_paths(desired_file: Path, hosts_dir: Path | None = None) -> list[Path]:
    """What the desired state is made of: the file, the inventory, units/ next to the file if present."""
    paths = [desired_file]
    if hosts_dir is not None:
        paths.append(hosts_dir)
    units = desired_file.parent / "units"
    if units.is_dir():
        paths.append(units)
    return paths


def git_provenance(paths: Sequence[Path], *, git: str = "git", timeout: float = GIT_TIMEOUT) -> Provenance | None:
    """The commit of the repository holding `paths[0]` and whether any of `paths` is dirty;
    None when there is no such commit to name (see the module docstring)."""
    if not paths:
        return None
    first = Path(paths[0])
    where = first if first.is_dir() else first.parent
    top = _git(git, where, ["rev-parse", "--show-toplevel"], timeout)
    commit = _git(git, where, ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], timeout)
    if top is None or commit is None or not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", commit.strip()):
        return None
    root = Path(top.strip()).resolve()
    inside: list[str] = []
    outside = False
    for p in paths:
        resolved = Path(p).resolve()
        if resolved == root or resolved.is_relative_to(root):
            inside.append(str(resolved.relative_to(root)) or ".")
        else:
            outside = True  # that commit does not pin it
    status = _git(git, root, ["status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *inside], timeout)
    if status is None:
        return None
    return Provenance(commit=commit.strip(), dirty=outside or bool(status))


def _git(git: str, where: Path, args: list[str], timeout: float) -> str | None:
    env = {k: v for k, v in os.environ.items() if k not in _REDIRECTING}
    env.update(GIT_OPTIONAL_LOCKS="0", LC_ALL="C", GIT_TERMINAL_PROMPT="0")
    try:
        done = subprocess.run([git, "-c", "core.fsmonitor=false", "-C", str(where), *args], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode("utf-8", "replace")
