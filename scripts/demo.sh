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
echo "== fleet --lab apply --yes: make it so (ordered, health-gated, journaled)"
$fleet --lab apply --yes
echo "== fleet --lab status: what runs where now"
$fleet --lab status
echo "== fleet log: who changed what, when"
$fleet log | tail -n 12
echo
echo "The lab stays up: try \`$fleet --lab status\`, break something with \`$fleet lab ssh fritz\`,"
echo "then \`$fleet --lab plan\`.  \`$fleet lab down\` removes it."
