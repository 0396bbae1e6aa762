#!/usr/bin/env bash
# Soak test of stopping under load (not run in CI): CYCLES times, mount, start four readers that
# compare whole files (two O_DIRECT, two buffered) and a process whose working directory is in
# the mount, SIGTERM the daemon at a random moment, then check that
#   - the mountpoint is free within 3 s (no stale mount),
#   - every reader finishes within 60 s with the right bytes (none hung, none got EIO),
#   - the daemon exits once the last user is gone.
# Usage: scripts/soak-stop.sh [CYCLES]   (root, /dev/fuse; BIN=path/to/mount_vfs to override)
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES=${1:-100}
BIN=${BIN:-target/release/mount_vfs}
[ -x "$BIN" ] || cargo build --release --locked
work=$(mktemp -d)
mnt=$work/mnt
daemon=
cleanup() {
  [ -n "$daemon" ] && kill -KILL "$daemon" 2>/dev/null || true
  mountpoint -q "$mnt" 2>/dev/null && umount -l "$mnt" || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/tree" "$mnt"
for i in 0 1 2 3; do head -c $((48 << 20)) /dev/urandom >"$work/tree/f$i.bin"; done
mkdir -p "$work/tree/dir" && echo x >"$work/tree/dir/x"
"$BIN" snapshot "$work/tree" --cas "$work/cas" --output "$work/job.manifest" 2>/dev/null

fail() { echo "soak: cycle $cycle: $*" >&2; tail -20 "$work/log" >&2; exit 1; }
for cycle in $(seq 1 "$CYCLES"); do
  "$BIN" "$work/job.manifest" "$mnt" --cas "$work/cas" --shards 2 --stop-grace 20 \
    >/dev/null 2>"$work/log" &
  daemon=$!
  for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.05; done
  mountpoint -q "$mnt" || fail "not mounted after 5 s"
  readers=()
  for i in 0 1 2 3; do
    if [ $((i % 2)) -eq 0 ]; then
      timeout 60 bash -c "dd if='$mnt/f$i.bin' bs=1M iflag=direct status=none | cmp - '$work/tree/f$i.bin'" &
    else
      timeout 60 cmp "$mnt/f$i.bin" "$work/tree/f$i.bin" &
    fi
    readers+=($!)
  done
  (cd "$mnt/dir" && exec sleep 30) &
  resident=$!
  sleep "0.$((RANDOM % 8 + 2))"
  kill -TERM "$daemon"
  for _ in $(seq 60); do mountpoint -q "$mnt" || break; sleep 0.05; done
  mountpoint -q "$mnt" && fail "still mounted 3 s after SIGTERM (stale mount)"
  for r in "${readers[@]}"; do
    status=0; wait "$r" || status=$?
    [ "$status" -eq 124 ] && fail "a reader hung"
    [ "$status" -ne 0 ] && fail "a reader failed (exit $status)"
  done
  kill "$resident"; wait "$resident" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$daemon" 2>/dev/null && fail "the daemon did not exit after its last user left"
  wait "$daemon" || fail "the daemon exited with $?"
  daemon=
  printf '\rsoak: %d/%d cycles ok' "$cycle" "$CYCLES"
done
echo
