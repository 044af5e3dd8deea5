#!/usr/bin/env bash
# Static checks, as CI runs them (.ci/run, after the tests): ruff over fleet, tests and bench
# (the rules in pyproject.toml, RUF100 included), and mypy --strict over fleet.  Installs the
# pinned tools of the `lint` extra into ./.venv first (scripts/setup.sh makes the venv).
# Exits non-zero when either finds anything; both run, so one run shows everything.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "lint: no .venv here; run scripts/setup.sh first" >&2
  exit 2
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[lint]' || exit 2
status=0
echo "lint: ruff check fleet tests bench" >&2
.venv/bin/ruff check --no-cache fleet tests bench || status=1
echo "lint: mypy --strict fleet" >&2
.venv/bin/mypy --strict fleet || status=1
if [ "$status" -ne 0 ]; then
  echo "lint: FAILED (see above)" >&2
fi
exit "$status"
