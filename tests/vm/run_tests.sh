#!/bin/sh
# What `make test-vm` runs inside the guest: the routes `kpod-metrics check` chooses on this
# kernel (for the run log), then pytest on the files given as arguments.
set -u
cd "$(dirname "$0")/../.."
config=$(mktemp)
echo 'kpod: {profile: comprehensive, discovery: {mode: local}}' > "$config"
echo "== kpod-metrics check (comprehensive profile) on $(uname -r) =="
.venv/bin/kpod-metrics check --config "$config"
echo "== pytest $* =="
# No cache provider: the repo is on the read-only host root under a RAM overlay anyway.
exec .venv/bin/pytest -q -p no:cacheprovider --durations=10 "$@"
