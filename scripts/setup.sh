#!/usr/bin/env bash
# Installs what building and testing mount_vfs needs on a fresh Debian/Ubuntu machine (run as root).
# Idempotent: every step checks before it installs.
set -euo pipefail

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v openssl >/dev/null || need_apt+=(openssl)  # tests: a self-signed certificate for HTTPS
# tests/deadline_vfs.rs: the Deadline worker launches deadline_vfs as the job user through sudo,
# and mounts through the setuid fusermount3.
command -v sudo >/dev/null || need_apt+=(sudo)
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
# tests/mount_systemd.rs: the example unit must pass `systemd-analyze verify`.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing the Rust toolchain with rustup"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing: load the fuse module (modprobe fuse)" >&2; exit 1; }
# tests/deadline_vfs.rs: the job user mounts with allow_other (the worker agent, another user,
# reads the mount), which fusermount3 allows non-root users only with this line.
# Non-root mounts (fusermount3) open /dev/fuse as the user: distributions make it 0666, some
# containers 0600.
if [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  echo "setup: chmod 0666 /dev/fuse (non-root FUSE mounts need it)"
  chmod 0666 /dev/fuse
fi
if ! grep -qx user_allow_other /etc/fuse.conf 2>/dev/null; then
  echo "setup: adding user_allow_other to /etc/fuse.conf"
  echo user_allow_other >> /etc/fuse.conf
fi
