#!/usr/bin/env bash
# The whole test suite, unit and integration, against a real lab fleet (root on Debian).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not lab"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLEET_REQUIRE_LAB="${FLEET_REQUIRE_LAB:-1}"
exec .venv/bin/python -m pytest -q --durations=20 "$@"  # the slowest tests, in every CI log
