#!/usr/bin/env bash
# Installs the Debian packages the test suite drives (real NBD peers, qemu, fio, VM pieces),
# only those that are missing. Needs root (or sudo) on Debian 12.
set -euo pipefail
pkgs=(qemu-utils libnbd-bin nbdkit nbd-server nbd-client fio qemu-system-x86 busybox-static
      xz-utils cpio e2fsprogs util-linux udev strace curl prometheus systemd fdisk)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-deps: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
