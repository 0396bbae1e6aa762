#!/usr/bin/env bash
# Soak test of --writable (not run in CI): the model tests of tests/writable_model.rs with
# MODEL_OPS operations each (default 1000000: one writer on 1 shard, and two concurrent writers
# on 2 shards), then the crash tests of tests/writable_crash.rs with CRASH_ROUNDS kills between
# operations (default 100) and CRASH_INFLIGHT_ROUNDS kills during them (default 100). Every
# operation is compared with a tmpfs reference; a failure prints the MODEL_SEED that replays it
# (MODEL_SEED=... scripts/soak-writable.sh). Runs SEEDS times (default 1) with fresh seeds.
# Usage: scripts/soak-writable.sh [SEEDS]   (root, /dev/fuse; about 20 minutes per run on 2 cores
# with the default sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SEEDS=${1:-1}
export MODEL_OPS=${MODEL_OPS:-1000000}
# Longer epochs than CI: the overlay's journal grows over more operations before each remount.
export MODEL_EPOCH_OPS=${MODEL_EPOCH_OPS:-100000}
export CRASH_ROUNDS=${CRASH_ROUNDS:-100}
export CRASH_INFLIGHT_ROUNDS=${CRASH_INFLIGHT_ROUNDS:-100}
cargo test --locked --test writable_model --test writable_crash --no-run
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for run in $(seq 1 "$SEEDS"); do
  echo "soak-writable: run $run of $SEEDS"
  status=0
  cargo test --locked --test writable_model --test writable_crash -- --test-threads=2 --nocapture \
    >"$log" 2>&1 || status=$?
  grep -E '^(MODEL_SEED|test |[0-9]+ ops|[0-9]+ kills|[0-9]+ rounds)' "$log" || true
  if [ "$status" != 0 ]; then
    grep -E -A40 'panicked' "$log" >&2 || tail -100 "$log" >&2
    echo "soak-writable: run $run failed (the MODEL_SEED above replays it)" >&2
    exit 1
  fi
done
echo "soak-writable: $SEEDS run(s) passed"
