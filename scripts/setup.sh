#!/usr/bin/env bash
# Install what fleet and its lab need on a Debian 12 machine (as root), and fleet itself
# into ./.venv.  Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# passwd (useradd) and procps (pgrep): the sshd unit tests create a user without sudo and look for its
# processes; redis-server (with redis-cli): the Sidekiq unit tests run the collection section against a
# throwaway Redis of their own; under CI a test that skips for want of a tool fails (tests/conftest.py).
# chromium: for the tests only — tests/unit/test_watch_html.py loads fleet watch's status page in a
# real headless browser (console errors, the page's Content-Security-Policy); fleet never runs it.
# postgresql-common (pg_lsclusters): tests/unit/test_pg_clusters.py checks fleet's reading of the clusters
# against it.
packages=(systemd-container debootstrap openssh-client openssh-server iproute2 zstd python3 python3-venv ca-certificates sudo
          passwd procps redis-server postgresql-common chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The editable install follows the source by itself; only pyproject.toml (dependencies, entry
# points) or the checkout's place can make it stale.  The stamp records both after a successful
# install, so a second run only checks instead of spending ~5 s in pip (the demo runs this first).
stamp=.venv/.fleet-setup-stamp
want="$(pwd) $(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/fleet --version >/dev/null 2>&1; then
  rm -f "$stamp"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  printf '%s\n' "$want" > "$stamp"
fi
echo "setup: fleet installed in $(pwd)/.venv ($(.venv/bin/fleet --version))" >&2
