#!/usr/bin/env bash
# Cold reads through small buffer pools (issue 8): one 512 MiB v2023 object, one shard, read once
# with O_DIRECT 1 MiB reads right after mounting, for each --memory-limit. Prints, per binary and
# limit, the runs that finished within 60 s out of the runs tried, the median and range of the
# throughput, and the store bytes fetched per byte read (--stats). Every read is compared with the
# source outside the timed region (cmp of what dd wrote).
#
# Usage: benches/small_pools.sh [BIN [BASELINE_BIN]]   (root, /dev/fuse)
#   BIN defaults to target/release/mount_vfs; BASELINE_BIN (e.g. a build of an older commit) is
#   measured in the same run for a ratio. RUNS (default 3), SIZE_MIB (default 512), LIMITS
#   (default "32M 64M 128M 256M 1G").
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/mount_vfs}
BASELINE=${2:-}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-512}
work=$(mktemp -d)
mnt=$work/mnt
cleanup() {
  pkill -f "mount_vfs $work/job.manifest" 2>/dev/null || true
  sleep 0.5
  mountpoint -q "$mnt" 2>/dev/null && umount -l "$mnt" || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/tree" "$mnt"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/tree/big.bin"
"$BIN" snapshot "$work/tree" --cas "$work/cas" --output "$work/job.manifest" 2>/dev/null

echo "# small_pools: ${SIZE_MIB} MiB object, --shards 1, cold O_DIRECT 1 MiB reads, $RUNS runs"
echo "# machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-10s %-14s %-8s %-28s %s\n' binary memory-limit ok "MB/s median (range)" "fetched/read"
for limit in ${LIMITS:-32M 64M 128M 256M 1G}; do
  for which in new baseline; do
    bin=$BIN
    if [ "$which" = baseline ]; then
      [ -n "$BASELINE" ] || continue
      bin=$BASELINE
    fi
    speeds=()
    ratios=()
    for _ in $(seq "$RUNS"); do
      "$bin" "$work/job.manifest" "$mnt" --cas "$work/cas" --shards 1 --memory-limit "$limit" \
        --stats >/dev/null 2>"$work/log" &
      daemon=$!
      for _ in $(seq 200); do mountpoint -q "$mnt" && break; sleep 0.05; done
      start=$(date +%s.%N)
      if timeout 60 dd if="$mnt/big.bin" of="$work/out" bs=1M iflag=direct status=none; then
        secs=$(echo "$(date +%s.%N) - $start" | bc)
        cmp -s "$work/out" "$work/tree/big.bin" || { echo "WRONG BYTES ($which $limit)"; exit 1; }
        speeds+=("$(echo "$SIZE_MIB * 1.048576 / $secs" | bc)")
      fi
      kill -TERM "$daemon" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$daemon" 2>/dev/null; then kill -KILL "$daemon"; fi
      wait "$daemon" 2>/dev/null || true
      mountpoint -q "$mnt" && umount -l "$mnt"
      fetched=$(grep '"final"' "$work/log" | grep -o '"total":{"bytes_fetched":[0-9]*' | grep -o '[0-9]*$' || true)
      [ -n "$fetched" ] && ratios+=("$(echo "scale=2; $fetched / ($SIZE_MIB * 1048576)" | bc)")
      rm -f "$work/out"
    done
    ok=${#speeds[@]}
    if [ "$ok" -gt 0 ]; then
      sorted=$(printf '%s\n' "${speeds[@]}" | sort -n)
      median=$(echo "$sorted" | sed -n "$(((ok + 1) / 2))p")
      summary="$median ($(echo "$sorted" | head -1)-$(echo "$sorted" | tail -1))"
      [ "$ok" -eq 1 ] && summary="$median (single sample)"
    else
      summary="hung (no run finished in 60 s)"
    fi
    printf '%-10s %-14s %-8s %-28s %s\n' "$which" "$limit" "$ok/$RUNS" "$summary" "${ratios[*]:-n/a}"
  done
done
