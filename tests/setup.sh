#!/usr/bin/env bash
# Installs what building and testing domsnap needs on Debian 12 (run as root, or with sudo
# available): a C/C++ toolchain and libclang for RocksDB's bindings, qemu-utils (qemu-img,
# qemu-io) for the qcow2 interop checks, libxen-dev for the Xen host support, librados-dev
# for the Ceph RADOS store, and Ceph itself (monitor, manager, OSD, radosgw: the tests start a
# throw-away single-node cluster, tests/ceph-lab/). The Xen lab test installs its own extra
# packages (tests/xen-lab/setup.sh).
set -euo pipefail
need=()
for pkg in build-essential clang libclang-dev qemu-utils libxen-dev pkg-config \
  librados-dev ceph-mon ceph-mgr ceph-osd ceph-common radosgw uuid-runtime curl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
