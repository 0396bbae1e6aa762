#!/usr/bin/env bash
# Builds mount_vfs, generates a small sample scene, snapshots it into a local CAS, mounts the
# manifest, shows the mounted tree and reads a file back, then unmounts; then mounts it
# --writable (the seed invocation), renders a frame into it, patches an input, and exports what
# changed as a new manifest and a diff. Needs root and /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked
bin=target/release/mount_vfs
work=${DEMO_DIR:-$(mktemp -d /tmp/mount_vfs_demo.XXXXXX)}
mkdir -p "$work"
trap 'umount -l "$work/vfs" 2>/dev/null || true; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null || true' EXIT

echo "== generating a sample scene in $work/scene"
mkdir -p "$work/scene/shots/sq010/sh0420" "$work/scene/textures" "$work/scene/bin"
for frame in 1001 1002 1003 1004; do
  head -c $((8 << 20)) /dev/urandom > "$work/scene/shots/sq010/sh0420/beauty.$frame.exr"
done
head -c $((2 << 20)) /dev/urandom > "$work/scene/textures/wood_diffuse.tif"
printf 'shot sq010/sh0420, frames 1001-1004\n' > "$work/scene/README.txt"
printf '#!/bin/sh\necho rendering\n' > "$work/scene/bin/render.sh" && chmod +x "$work/scene/bin/render.sh"

echo "== snapshot into the local CAS $work/cas"
"$bin" snapshot "$work/scene" --cas "$work/cas" --output "$work/job.manifest"
"$bin" validate "$work/job.manifest"

echo "== mounting on $work/vfs"
mkdir -p "$work/vfs"
"$bin" "$work/job.manifest" "$work/vfs" --cas "$work/cas" --memory-limit 256M &
pid=$!
for _ in $(seq 100); do mountpoint -q "$work/vfs" && break; sleep 0.1; done
find "$work/vfs" | sort
cat "$work/vfs/README.txt"
cmp "$work/vfs/shots/sq010/sh0420/beauty.1003.exr" "$work/scene/shots/sq010/sh0420/beauty.1003.exr" && echo "beauty.1003.exr: identical bytes through the mount"
dd if="$work/vfs/shots/sq010/sh0420/beauty.1001.exr" of=/dev/null bs=1M iflag=direct 2>&1 | tail -1

echo "== unmounting"
kill -TERM "$pid"; wait "$pid"; pid=

echo "== mounting --writable (overlay in $work/vfs-cache/Overlay)"
"$bin" "$work/job.manifest" "$work/vfs" --writable --cache-dir "$work/vfs-cache" --cas "$work/cas" --memory-limit 256M &
pid=$!
for _ in $(seq 100); do mountpoint -q "$work/vfs" && break; sleep 0.1; done
mkdir -p "$work/vfs/renders"
head -c $((16 << 20)) /dev/urandom > "$work/vfs/renders/beauty.1001.png"   # a job's output
printf 'notes: frame 1001 rendered\n' >> "$work/vfs/README.txt"            # appended to an input
sync "$work/vfs/renders/beauty.1001.png"
ls -l "$work/vfs/renders" && cat "$work/vfs/README.txt"
kill -TERM "$pid"; wait "$pid"; pid=

echo "== export: the tree as it is now, and what changed"
"$bin" export --cache-dir "$work/vfs-cache" --manifest "$work/job.manifest" --cas "$work/cas" \
  --output "$work/job-after.manifest" --diff "$work/job.diff"
"$bin" validate "$work/job-after.manifest"
cat "$work/job.diff"; echo
echo "demo done: $work"
