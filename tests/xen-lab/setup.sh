#!/bin/bash
# One-time setup of the Xen lab on a Debian 12 (bookworm) host, as root (apt-get download).
# Nothing is installed on the host: Debian packages are downloaded and unpacked under
# $XEN_LAB_DIR:
#   x/      Xen 4.17 hypervisor, toolstack (xl, libxl, libxenctrl...), the dom0/domU kernel,
#           LVM (lvm2, thin-provisioning-tools: thin pools in dom0) and SeaBIOS (HVM guests)
#   xdm/    qemu-system-xen (the device model / qdisk backend) and qemu-utils, for dom0
#   hostq/  qemu-system-x86_64 + busybox-static and the libraries they need that the host lacks
#           (installing qemu-system-x86 on a host with a newer qemu-utils would downgrade it)
# Idempotent: a complete lab of this version (marker file .setup-done) is left as it is.
set -euo pipefail
LAB=${XEN_LAB_DIR:-/tmp/domsnap-xen-lab}
mkdir -p "$LAB/debs" "$LAB/debs-dm" "$LAB/debs-host" "$LAB/share"
cd "$LAB"
# Bumped whenever the package list changes: an older lab directory is set up again.
VERSION=2
[ "$(cat .setup-done 2>/dev/null)" = "$VERSION" ] && { echo "xen-lab: setup already done in $LAB"; exit 0; }
command -v apt-get >/dev/null || { echo "xen-lab: apt-get missing: the lab needs a Debian 12 host" >&2; exit 3; }
KVER=${KVER:-$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*-amd64\)$/\1/p' | head -1)}
KVER=${KVER:-6.1.0-56-amd64}
dl() { # dl DIR PKG... : apt-get download into DIR (runs apt-get update once if needed)
  local d=$1; shift
  (cd "$d" && apt-get download "$@" 2>&1 | grep -v unsandboxed) || {
    apt-get update -qq; (cd "$d" && apt-get download "$@" 2>&1 | grep -v unsandboxed); }
}
rm -f debs/*.deb debs-dm/*.deb debs-host/*.deb
dl debs xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils libxenmisc4.17 \
  libxenstore4 libxencall1 libxendevicemodel1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 \
  libxenhypfs1 libxentoollog1 libxentoolcore1 libyajl2 libxen-dev "linux-image-$KVER" \
  lvm2 dmsetup libdevmapper1.02.1 libdevmapper-event1.02.1 libaio1 libedit2 \
  thin-provisioning-tools seabios
# qemu-utils pinned to the device model's version (the host may have a newer one installed)
DMVER=$(apt-cache policy qemu-system-xen | sed -n 's/^ *Candidate: //p')
dl debs-dm "qemu-system-xen=$DMVER" "qemu-utils=$DMVER"
# Host-side emulator and busybox: whatever `apt-get install` would add, minus what it would remove.
HOSTPKGS=$(apt-get install -s --no-install-recommends qemu-system-x86 busybox-static 2>/dev/null | awk '/^Inst /{print $2}')
[ -n "$HOSTPKGS" ] && dl debs-host $HOSTPKGS
command -v qemu-system-x86_64 >/dev/null || ls debs-host/qemu-system-x86_*.deb >/dev/null 2>&1 || {
  echo "xen-lab: ERROR: qemu-system-x86_64 is not installed and could not be downloaded" >&2; exit 3; }
rm -rf x xdm hostq && mkdir x xdm hostq
for d in debs/*.deb; do dpkg-deb -x "$d" x; done
for d in debs-dm/*.deb; do dpkg-deb -x "$d" xdm; done
for d in debs-host/*.deb; do [ -e "$d" ] && dpkg-deb -x "$d" hostq; done
zcat x/boot/xen-4.17-amd64.gz > xen   # QEMU -kernel needs the uncompressed multiboot ELF
echo "$KVER" > kver
echo "$VERSION" > .setup-done
echo "xen-lab: setup done in $LAB (kernel $KVER)"
