#!/usr/bin/env bash
# From nothing to a booted lab fleet running the example desired state:
#   set up, boot one container host per hosts/*.toml, show what runs where, plan, apply, status.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fleet=.venv/bin/fleet
echo "== fleet check: validate the example desired state"
$fleet check
echo "== fleet lab up: boot the lab hosts"
$fleet lab up
$fleet --lab lab status
echo "== fleet --lab status: the lab starts bare, so everything declared is missing"
$fleet --lab status || true
echo "== fleet --lab plan: what it would take to converge"
$fleet --lab plan || [ $? -eq 2 ]
