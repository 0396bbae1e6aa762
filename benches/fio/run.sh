#!/usr/bin/env bash
# fio against a mount_vfs mount and against tmpfs, in one go, with the job files beside this
# script: sequential 1 MiB, random 4 KiB and random 1 MiB reads; 1 job and N jobs; buffered and
# O_DIRECT. Each job reads its own file (f.0 .. f.N-1, random bytes). The same files are put in
# a tmpfs directory and snapshotted into a local CAS (`mount_vfs snapshot`), which is mounted
# with --shards SHARDS; every file is read once through both before the jobs (warm: mount_vfs
# serves from its shards' pools, tmpfs from memory). For each job, tmpfs runs, then the mount,
# right after it; the table gives both and mount_vfs / tmpfs.
#
# Usage: benches/fio/run.sh [MOUNT_VFS_BIN]   (root, /dev/fuse; installs fio with apt-get when
#   it is missing). MOUNT_VFS_BIN defaults to target/release/mount_vfs, else mount_vfs on PATH.
# Environment: FIO_JOBS (N, default the CPU count, at most 8), FIO_SIZE_MIB (per file, default
#   256), FIO_RUNTIME (seconds per job, default 5), SHARDS (default FIO_JOBS), FIO_WORK (where
#   the tree and the CAS go, default /var/tmp/mount_vfs_fio; the tmpfs copy is in /dev/shm).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-}
if [ -z "$bin" ]; then
  if [ -x "$here/../../target/release/mount_vfs" ]; then
    bin=$here/../../target/release/mount_vfs
  else
    bin=$(command -v mount_vfs || true)
  fi
fi
[ -x "$bin" ] || { echo "no mount_vfs binary: pass its path (e.g. target/release/mount_vfs)" >&2; exit 2; }
if ! command -v fio >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "fio is not installed: apt-get install -y fio (as root)" >&2; exit 2; }
  apt-get install -y fio >/dev/null
fi
cpus=$(nproc)
jobs=${FIO_JOBS:-$((cpus < 8 ? cpus : 8))}
size_mib=${FIO_SIZE_MIB:-256}
runtime=${FIO_RUNTIME:-5}
shards=${SHARDS:-$jobs}
work=${FIO_WORK:-/var/tmp/mount_vfs_fio}
shm=/dev/shm/mount_vfs_fio
mnt=$work/mnt
daemon=
cleanup() {
  if [ -n "$daemon" ]; then
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
  fi
  mountpoint -q "$mnt" 2>/dev/null && umount -l "$mnt" || true
  rm -rf "$work" "$shm"
}
trap cleanup EXIT
rm -rf "$work" "$shm"
mkdir -p "$work/tree" "$mnt" "$shm"
# The shard mount_vfs gives inode INO to, for SHARDS shards (src/namespace/mod.rs: owner).
owner() { echo $(((((${1} * -7046029254386353131) >> 32) & 0xFFFFFFFF) % shards)); }
# Files get inodes 2, 3, ... in name order; empty pads (f.I.pN sorts between f.I and f.I+1) move
# each job's file to a shard no other job's file is on, as long as there are shards left.
declare -A taken=()
ino=2
for i in $(seq 0 $((jobs - 1))); do
  pad=0
  while [ "${#taken[@]}" -lt "$shards" ] && [ -n "${taken[$(owner "$ino")]:-}" ]; do
    : >"$work/tree/f.$((i - 1)).p$pad"
    pad=$((pad + 1))
    ino=$((ino + 1))
  done
  taken[$(owner "$ino")]=1
  ino=$((ino + 1))
  head -c $((size_mib << 20)) /dev/urandom >"$work/tree/f.$i"
  cp "$work/tree/f.$i" "$shm/f.$i"
done
"$bin" snapshot "$work/tree" --cas "$work/cas" --output "$work/job.manifest" 2>/dev/null
# A pool per shard that holds all files warm should they land on one shard (3/4 of a pool is
# cache; at most 1 GiB a shard).
per_shard=$((size_mib * 2 * jobs))
per_shard=$((per_shard < 1024 ? per_shard : 1024))
"$bin" "$work/job.manifest" "$mnt" --cas "$work/cas" --shards "$shards" \
  --memory-limit "$((per_shard * shards))M" >/dev/null 2>"$work/mount.log" &
daemon=$!
for _ in $(seq 200); do mountpoint -q "$mnt" && break; sleep 0.05; done
mountpoint -q "$mnt" || { echo "mount_vfs did not mount:" >&2; cat "$work/mount.log" >&2; exit 1; }
owners=()
for i in $(seq 0 $((jobs - 1))); do
  cmp "$mnt/f.$i" "$shm/f.$i" || { echo "f.$i: the mount returned wrong bytes" >&2; exit 1; }
  owners+=("$(owner "$(stat -c %i "$mnt/f.$i")")")
done
rm -rf "$work/tree"

# One job: prints "MiB/s IOPS" (read bandwidth and IOPS of the group, from fio's terse output);
# fails with fio's output when fio does.
run_job() { # DIR JOBFILE JOBS DIRECT
  local out
  if ! out=$(FIO_DIR=$1 FIO_JOBS=$3 FIO_DIRECT=$4 FIO_SIZE=${size_mib}M FIO_RUNTIME=$runtime \
    fio --readonly --output-format=terse --terse-version=3 "$here/$2" 2>&1) ||
    ! grep -q '^3;' <<<"$out"; then
    echo "fio $2 on $1 failed: $out" >&2
    return 1
  fi
  awk -F';' '$1 == 3 { printf "%.0f %.0f\n", $7 / 1024, $8 }' <<<"$out"
}

echo "# fio $(fio --version) against mount_vfs $("$bin" --version 2>/dev/null | head -1) (--shards $shards, local CAS, warm) and tmpfs"
echo "# shard of each job's file: ${owners[*]}"
echo "# machine: $cpus CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC'); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# ${size_mib} MiB per file, ${runtime} s per job, psync; tmpfs, then the mount, for each job"
printf '| %-8s | %-4s | %-8s | %-22s | %-22s | %-14s |\n' pattern jobs mode "tmpfs MiB/s (IOPS)" "mount_vfs MiB/s (IOPS)" "mount_vfs/tmpfs"
printf '|%s|%s|%s|%s|%s|%s|\n' ---------- ------ ---------- ------------------------ ------------------------ ----------------
for job in seq-1m rand-4k rand-1m; do
  for n in $(printf '%s\n' 1 "$jobs" | sort -un); do
    for direct in 0 1; do
      tmpfs=$(run_job "$shm" "$job.fio" "$n" "$direct")
      mount=$(run_job "$mnt" "$job.fio" "$n" "$direct")
      read -r t_bw t_iops <<<"$tmpfs"
      read -r m_bw m_iops <<<"$mount"
      ratio=$(awk -v m="$m_bw" -v t="$t_bw" 'BEGIN { printf (t > 0 ? "%.2fx" : "-"), m / t }')
      mode=$([ "$direct" = 1 ] && echo O_DIRECT || echo buffered)
      printf '| %-8s | %-4s | %-8s | %-22s | %-22s | %-14s |\n' "$job" "$n" "$mode" \
        "$t_bw ($t_iops)" "$m_bw ($m_iops)" "$ratio"
    done
  done
done
kill -0 "$daemon" || { echo "mount_vfs exited during the run:" >&2; cat "$work/mount.log" >&2; exit 1; }
