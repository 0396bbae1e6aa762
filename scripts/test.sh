#!/usr/bin/env bash
# Runs every check and test of mount_vfs: formatting, clippy, unit and integration tests (real
# FUSE mounts, the real Deadline client). Needs root and /dev/fuse. Used verbatim by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

# Tests whose prerequisite is missing fail unless MOUNT_VFS_ALLOW_SKIP names them; the ones
# skipped on purpose are logged here and counted at the end (tests/support/skip.rs).
export MOUNT_VFS_SKIP_LOG="${MOUNT_VFS_SKIP_LOG:-$(mktemp)}"
: >"$MOUNT_VFS_SKIP_LOG"
report_skips() {
  local n
  n=$(wc -l <"$MOUNT_VFS_SKIP_LOG")
  echo "skipped tests: $n"
  sed 's/^/  skipped: /' "$MOUNT_VFS_SKIP_LOG"
}
trap report_skips EXIT

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Mount tests start their own daemons; two at a time keeps a 2-core machine responsive.
cargo test --workspace --locked -- --test-threads=2
