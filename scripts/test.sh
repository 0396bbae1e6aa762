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

# The tests that mount, again with every mount served over FUSE over io_uring (issue 13). The
# kernel offers the ring only while the fuse module's enable_uring is Y: set here, and put back
# on exit, failed or not. mount_uring picks its transports itself and ran above; the Deadline
# client's mounts are the job user's, through fusermount3, which the ring (mount(2)) cannot do.
enable_uring=/sys/module/fuse/parameters/enable_uring
if [ -e "$enable_uring" ]; then
  uring_before=$(cat "$enable_uring")
  trap 'echo "$uring_before" >"$enable_uring"; report_skips' EXIT
  echo Y >"$enable_uring"
  uring_tests=()
  for test in tests/mount_*.rs tests/writable_*.rs; do
    test=$(basename "$test" .rs)
    [ "$test" = mount_uring ] || uring_tests+=(--test "$test")
  done
  uring_start=$SECONDS
  # The pass takes about 4 minutes on 2 cores; should a mount ever hang, the pass fails at 10
  # minutes instead of stalling CI.
  MOUNT_VFS_TRANSPORT=uring timeout 600 \
    cargo test --locked "${uring_tests[@]}" -- --test-threads=2
  echo "uring pass: $((SECONDS - uring_start)) s"
else
  echo "uring pass skipped: this kernel has no $enable_uring (needs CONFIG_FUSE_IO_URING)"
fi
