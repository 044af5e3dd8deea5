#!/usr/bin/env bash
# From nothing to a booted lab fleet running the example desired state:
#   set up, boot one container host per hosts/*.toml, show what runs where, plan, apply, status.
# Arguments are fleet's global options, given to every fleet command it runs, e.g.
# `bash scripts/demo.sh --state-dir /tmp/demo/.fleet` keeps the lab's keys and the journal there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fleet=(.venv/bin/fleet "$@")
shown=$(printf '%q ' "${fleet[@]}")
shown=${shown% }
echo "== fleet check: validate the example desired state"
"${fleet[@]}" check
echo "== fleet lab up: boot the lab hosts"
"${fleet[@]}" lab up
"${fleet[@]}" --lab lab status
echo "== fleet --lab status: the lab starts bare, so everything declared is missing"
"${fleet[@]}" --lab status
echo "== fleet --lab plan: what it would take to converge"
"${fleet[@]}" --lab plan || [ $? -eq 2 ]
echo "== fleet --lab apply --yes: make it so (ordered, health-gated, journaled)"
"${fleet[@]}" --lab apply --yes
echo "== fleet --lab status: what runs where now"
"${fleet[@]}" --lab status
echo "== fleet log: who changed what, when"
"${fleet[@]}" log | tail -n 12
echo
echo "The lab stays up: try \`$shown --lab status\`, break something with \`$shown lab ssh fritz\`,"
echo "then \`$shown --lab plan\`.  \`$shown lab down\` removes it."
