#!/usr/bin/env bash
# Read throughput over cores, from built executables alone (no cargo, no build, no download on
# the machine measured): for each --shards N, N readers each read their own file with 1 MiB
# O_DIRECT reads through a do-nothing FUSE server (the ceiling), mount_vfs on a local CAS (cold,
# then warm) and mount_vfs on S3 (an in-process S3 server; cold, then warm). Writes one table
# (scaling.txt) and one chart (scaling.svg, with scaling.json) into OUT_DIR.
#
# Usage: benches/scaling.sh MOUNT_VFS SCALING_BENCH [OUT_DIR] [--shards N...] [--size-mib M]
#          [--runs R]
#   MOUNT_VFS      a release mount_vfs (target/release/mount_vfs)
#   SCALING_BENCH  the compiled bench (target/release/deps/scaling-HASH: `cargo bench --no-run
#                  --bench scaling` names it)
#   OUT_DIR        default ./scaling-results
#   --shards       default 1 2 4 8 16; --size-mib per reader, default 512; --runs, default 3
#
# To carry them to a many-core machine (both need only glibc; root and /dev/fuse there, about
# 4 x N x size-mib of free memory, 2 x N x size-mib of disk under /var/tmp or BENCH_DIR):
#   cargo bench --no-run --bench scaling          # on the build machine
#   scp target/release/mount_vfs target/release/deps/scaling-HASH node:/tmp/
#   scp benches/scaling.sh node:/tmp/
#   ssh node sudo /tmp/scaling.sh /tmp/mount_vfs /tmp/scaling-HASH /tmp/scaling-results
set -euo pipefail
usage() { sed -n '8,14p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
mount_vfs=$(realpath "$1")
bench=$(realpath "$2")
shift 2
out=./scaling-results
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  out=$1
  shift
fi
shards="1 2 4 8 16"
size_mib=512
runs=3
while [ $# -gt 0 ]; do
  case $1 in
    --shards)
      shift
      shards=
      while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do shards="$shards $1"; shift; done
      ;;
    --size-mib) size_mib=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[ -x "$mount_vfs" ] || { echo "$mount_vfs: not an executable mount_vfs" >&2; exit 2; }
[ -x "$bench" ] || { echo "$bench: not an executable (the compiled scaling bench)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run as root (mounts, drop_caches)" >&2; exit 2; }
[ -e /dev/fuse ] || { echo "/dev/fuse is missing (modprobe fuse)" >&2; exit 2; }
"$mount_vfs" --version >/dev/null || { echo "$mount_vfs does not run here" >&2; exit 2; }
mkdir -p "$out"
out=$(realpath "$out")
max=0
for n in $shards; do [ "$n" -gt "$max" ] && max=$n; done
echo "# scaling.sh: --shards $shards, $size_mib MiB per reader, $runs runs; $(nproc) CPUs; results in $out"
[ "$max" -le "$(nproc)" ] || echo "# note: --shards $max is more than the $(nproc) CPUs here"
MOUNT_VFS_BIN=$mount_vfs BENCH_RESULTS_DIR=$out BENCH_SHARDS=$shards BENCH_SIZE_MIB=$size_mib \
  BENCH_RUNS=$runs "$bench" --bench | tee "$out/scaling.txt"
