#!/usr/bin/env bash
# Runs every check and test of mount_vfs: formatting, clippy, unit and integration tests (real
# FUSE mounts, the real Deadline client). Needs root and /dev/fuse. Used verbatim by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Mount tests start their own daemons; two at a time keeps a 2-core machine responsive.
cargo test --workspace --locked -- --test-threads=2
