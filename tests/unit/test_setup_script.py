"""scripts/setup.sh: a second run only checks — pip runs again only when the install may be stale.

The script runs in a copy of the checkout with stand-ins on PATH and in .venv: `dpkg-query`
answers that every package is installed, and .venv/bin/python records each call (a `pip install`
also makes .venv/bin/fleet, as the real one does), so nothing is installed on the machine."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


class Checkout:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "scripts").mkdir(parents=True)
        shutil.copy2(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
        shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
        self.calls = root / "python-calls.log"
        self.bin = root / "stand-ins"
        executable(self.bin / "dpkg-query", "#!/bin/sh\nprintf 'install ok installed'\n")
        self.fail_pip = root / "fail-pip"
        executable(root / ".venv" / "bin" / "python", f"""#!/bin/sh
echo "$*" >> {self.calls}
case "$*" in
  *"pip install"*)
    [ -e {self.fail_pip} ] && exit 1
    printf '#!/bin/sh\\necho fleet 0.1.0\\n' > {root}/.venv/bin/fleet
    chmod +x {root}/.venv/bin/fleet ;;
esac
""")

    def setup(self) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"}
        return subprocess.run(["bash", "scripts/setup.sh"], cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    def pip_installs(self) -> int:
        calls = self.calls.read_text().splitlines() if self.calls.exists() else []
        return sum("pip install" in c for c in calls)


@pytest.fixture
def checkout(tmp_path: Path) -> Checkout:
    return Checkout(tmp_path / "checkout")


def test_a_second_setup_only_checks_and_does_not_run_pip_again(checkout: Checkout) -> None:
    first = checkout.setup()
    assert first.returncode == 0, first.stderr
    assert checkout.pip_installs() == 1
    again = checkout.setup()
    assert again.returncode == 0, again.stderr
    assert checkout.pip_installs() == 1, "an unchanged checkout was installed again"
    assert "setup: fleet installed in" in again.stderr and "fleet 0.1.0" in again.stderr


def test_a_changed_pyproject_installs_again(checkout: Checkout) -> None:
    assert checkout.setup().returncode == 0
    with (checkout.root / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency, say\n")
    assert checkout.setup().returncode == 0
    assert checkout.pip_installs() == 2


def test_a_broken_install_is_installed_again(checkout: Checkout) -> None:
    assert checkout.setup().returncode == 0
    (checkout.root / ".venv" / "bin" / "fleet").unlink()
    assert checkout.setup().returncode == 0
    assert checkout.pip_installs() == 2


def test_a_checkout_moved_elsewhere_installs_again(checkout: Checkout, tmp_path: Path) -> None:
    assert checkout.setup().returncode == 0
    moved = tmp_path / "moved"
    checkout.root.rename(moved)
    checkout.root = moved
    checkout.bin = moved / "stand-ins"
    # the stand-in python still logs to the old path's file name: point the log at the new place
    executable(moved / ".venv" / "bin" / "python",
               (moved / ".venv" / "bin" / "python").read_text().replace(str(tmp_path / "checkout"), str(moved)))
    checkout.calls = moved / "python-calls.log"
    checkout.fail_pip = moved / "fail-pip"
    assert checkout.setup().returncode == 0
    assert checkout.pip_installs() == 2


def test_a_failed_install_leaves_no_stamp_and_the_next_setup_tries_again(checkout: Checkout) -> None:
    checkout.fail_pip.touch()
    failed = checkout.setup()
    assert failed.returncode != 0
    checkout.fail_pip.unlink()
    assert checkout.setup().returncode == 0
    assert checkout.setup().returncode == 0
    assert checkout.pip_installs() == 2  # the failed one and the one after it; the third only checked
