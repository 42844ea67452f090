#!/bin/sh
# What `make test-vm` / `make test-vm-arm64` run inside the guest: the routes `kpod-metrics
# check` chooses on this kernel (for the run log), then pytest on the files given as
# arguments, then (KPOD_VM_FORCED_TESTS) those files again with the older kernels' routes
# forced (KPOD_BPF_FORCE_ROUTES=KPOD_VM_FORCED_ROUTES, see docs/KERNELS.md).
set -u
cd "$(dirname "$0")/../.."
config=$(mktemp)
echo 'kpod: {profile: comprehensive, discovery: {mode: local}}' > "$config"
echo "== kpod-metrics check (comprehensive profile) on $(uname -r) =="
.venv/bin/kpod-metrics check --config "$config"
echo "== pytest $* =="
# No cache provider: the repo is on the read-only host root under a RAM overlay anyway.
.venv/bin/pytest -q -p no:cacheprovider --durations=10 "$@"
rc=$?
if [ -n "${KPOD_VM_FORCED_TESTS:-}" ]; then
    echo "== pytest again on the older kernels' routes: KPOD_BPF_FORCE_ROUTES=${KPOD_VM_FORCED_ROUTES:-} =="
    echo "kpod: {profile: comprehensive, discovery: {mode: local}, bpf: {force_routes: [${KPOD_VM_FORCED_ROUTES:-}]}}" > "$config"
    .venv/bin/kpod-metrics check --config "$config"
    # shellcheck disable=SC2086  # a list of files
    KPOD_BPF_FORCE_ROUTES="${KPOD_VM_FORCED_ROUTES:-}" .venv/bin/pytest -q -p no:cacheprovider $KPOD_VM_FORCED_TESTS || rc=1
fi
exit $rc
