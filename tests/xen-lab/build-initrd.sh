#!/bin/bash
# Builds the lab's boot images in $XEN_LAB_DIR (made by setup.sh):
#   dom0.cpio.gz  busybox + Xen 4.17 toolstack + the Xen device model (qdisk backend, HVM
#                 device model, hvmloader and SeaBIOS) + qemu-img + LVM with thin-pool support
#                 + domsnap + /root/test.sh (the in-dom0 test) + the domU kernel and initrd
#   domU.cpio.gz  busybox whose /init keeps a counter in sector 0 of every disk and in memory
# Env: XEN_LAB_DIR, DOMSNAP_BIN (domsnap built with --features xen; required), TEST_SCRIPT
#      (default: dom0-test.sh next to this file), EXTRA_BINS ("SRC:DEST ..." more binaries).
set -euo pipefail
LAB=${XEN_LAB_DIR:-/tmp/domsnap-xen-lab}; HERE=$(cd "$(dirname "$0")" && pwd)
DOMSNAP_BIN=${DOMSNAP_BIN:?set DOMSNAP_BIN to a domsnap binary built with --features xen}
DOMSNAP_BIN=$(readlink -f "$DOMSNAP_BIN")
TEST_SCRIPT=$(readlink -f "${TEST_SCRIPT:-$HERE/dom0-test.sh}")
cd "$LAB"
[ -f .setup-done ] || { echo "xen-lab: $LAB is not set up: run setup.sh first" >&2; exit 1; }
X=$PWD/x; H=$PWD/hostq; KVER=$(cat kver)
BB=/bin/busybox; [ -x $BB ] || BB=$H/bin/busybox
HOSTLIBS=$H/usr/lib/x86_64-linux-gnu:$H/lib/x86_64-linux-gnu
R=$PWD/dom0root; M=$X/lib/modules/$KVER/kernel
mkcpio() { (cd "$1" && find . | $BB cpio -o -H newc 2>/dev/null | gzip -${2:-1}); }
rm -rf "$R" domUroot
# ---------- domU ----------
mkdir -p domUroot/{bin,proc,sys,dev,tmp,modules}
cp $BB domUroot/bin/busybox
for a in $($BB --list); do [ -e domUroot/bin/$a ] || ln -s busybox domUroot/bin/$a; done
cp $M/drivers/block/xen-blkfront.ko domUroot/modules/
cp "$HERE/domU-init.sh" domUroot/init && chmod +x domUroot/init
mkcpio domUroot 9 > domU.cpio.gz
# ---------- dom0 ----------
mkdir -p $R/{bin,sbin,etc,proc,sys,dev,tmp,root,run,var/log/xen/console,var/lib/xen,var/lib/xenstored,lib64,usr/lib/x86_64-linux-gnu,usr/bin,usr/sbin,usr/libexec,usr/share/qemu,mnt,modules}
ln -s usr/lib $R/lib; ln -s ../run $R/var/run
cp $BB $R/bin/busybox
for a in $($BB --list); do [ -e $R/bin/$a ] || ln -s busybox $R/bin/$a; done
cp -a $X/usr/lib/xen-4.17 $X/usr/lib/xen-common $R/usr/lib/
cp -a $X/usr/lib/x86_64-linux-gnu/. $R/usr/lib/x86_64-linux-gnu/
rm -f $R/usr/lib/x86_64-linux-gnu/*.a; rm -f $R/usr/lib/xen-4.17/boot/xen-shim   # hvmloader stays
cp -a $X/usr/bin/xenstore* $R/usr/bin/
cp -a $X/etc/xen $R/etc/ 2>/dev/null || true
cp -L /lib64/ld-linux-x86-64.so.2 $R/lib64/
for l in libc.so.6 liblzma.so.5 libuuid.so.1 libz.so.1 libzstd.so.1 libgcc_s.so.1 libm.so.6; do
  cp -L /lib/x86_64-linux-gnu/$l $R/usr/lib/x86_64-linux-gnu/; done
add_bin() {  # add_bin SRC DEST: a binary and every shared library it needs (Xen libs from x/)
  install -D -m755 "$1" "$R$2"
  local out; out=$(LD_LIBRARY_PATH=$X/usr/lib/x86_64-linux-gnu:$HOSTLIBS ldd "$1")
  if grep -q 'not found' <<<"$out"; then echo "xen-lab: ERROR: libraries missing for $1:" >&2
    grep 'not found' <<<"$out" >&2; exit 1; fi
  for l in $(awk '$2=="=>" && $3 ~ /^\// {print $3}' <<<"$out"); do
    [ -e "$R/usr/lib/x86_64-linux-gnu/$(basename $l)" ] || cp -L "$l" $R/usr/lib/x86_64-linux-gnu/; done
}
# libxl 4.17 starts the device model from /usr/libexec/xen-qemu-system-i386; "-vnc none" still
# loads a keymap, without which the device model exits at once.
add_bin xdm/usr/libexec/xen-qemu-system-i386 /usr/libexec/xen-qemu-system-i386
add_bin xdm/usr/bin/qemu-img /usr/bin/qemu-img
add_bin xdm/usr/bin/qemu-io /usr/bin/qemu-io
KM=/usr/share/qemu/keymaps; [ -f $KM/en-us ] || KM=$H/usr/share/qemu/keymaps
[ -f $KM/en-us ] || { echo "xen-lab: ERROR: no QEMU keymaps (qemu-system-data)" >&2; exit 1; }
cp -a $KM $R/usr/share/qemu/
# debug information only makes the initrd big: strip a copy
if command -v strip >/dev/null; then strip -o "$LAB/domsnap.stripped" "$DOMSNAP_BIN" && DOMSNAP_BIN=$LAB/domsnap.stripped; fi
add_bin "$DOMSNAP_BIN" /usr/bin/domsnap
# the hotplug scripts of phy: disks (/etc/xen/scripts/block) are bash scripts that lock with
# flock(1), which busybox lacks, and compare `stat -L -c %D.%i` of /dev/stdin and the lock file
# (coreutils' stat and expr, as the scripts expect)
add_bin /bin/bash /bin/bash
for b in flock stat expr; do add_bin "$(command -v $b)" /usr/bin/$b; done
# LVM for thin pools on a loop device (no udev in dom0: LVM makes its own device nodes)
add_bin $X/sbin/lvm /sbin/lvm
add_bin $X/sbin/dmsetup /sbin/dmsetup
add_bin $X/usr/sbin/pdata_tools /usr/sbin/pdata_tools
for t in thin_check thin_dump thin_repair; do ln -sf pdata_tools $R/usr/sbin/$t; done
for t in lvs vgs pvs lvcreate lvremove lvrename lvchange lvextend vgcreate pvcreate vgchange; do ln -sf lvm $R/sbin/$t; done
mkdir -p $R/etc/lvm $R/run/lvm $R/run/lock/lvm
cat > $R/etc/lvm/lvm.conf <<'EOL'
devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 scan = [ "/dev" ]
          global_filter = [ "a|^/dev/loop|", "r|.*|" ] }
activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 0 monitoring = 0 }
global { use_lvmpolld = 0 thin_check_executable = "/usr/sbin/thin_check" }
backup { backup = 0 archive = 0 }
EOL
# HVM guests: option ROMs and VGA BIOS for the device model (SeaBIOS is inside hvmloader)
QD=$H/usr/share/qemu; SB=$H/usr/share/seabios
mkdir -p $R/usr/share/seabios
for f in linuxboot.bin linuxboot_dma.bin kvmvapic.bin multiboot.bin; do [ -f $QD/$f ] && cp $QD/$f $R/usr/share/qemu/; done
for f in bios-256k.bin vgabios-stdvga.bin vgabios-cirrus.bin; do
  [ -f $SB/$f ] && { cp $SB/$f $R/usr/share/seabios/; ln -sf ../seabios/$f $R/usr/share/qemu/$f; }; done
for e in ${EXTRA_BINS:-}; do add_bin "${e%%:*}" "${e#*:}"; done
for m in drivers/xen/xen-privcmd.ko drivers/xen/xenfs/xenfs.ko drivers/xen/xen-evtchn.ko \
         drivers/xen/xen-gntdev.ko drivers/xen/xen-gntalloc.ko drivers/block/xen-blkback/xen-blkback.ko \
         drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_modern_dev.ko \
         drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko net/9p/9pnet.ko \
         net/9p/9pnet_virtio.ko fs/netfs/netfs.ko fs/fscache/fscache.ko fs/9p/9p.ko \
         crypto/crc32c_generic.ko lib/libcrc32c.ko drivers/md/dm-mod.ko drivers/md/dm-bufio.ko \
         drivers/md/dm-bio-prison.ko drivers/md/persistent-data/dm-persistent-data.ko \
         drivers/md/dm-thin-pool.ko drivers/md/dm-snapshot.ko drivers/block/loop.ko; do
  [ -f $M/$m ] && cp $M/$m $R/modules/ || echo "xen-lab: missing module $m"; done
cp $X/boot/vmlinuz-$KVER $R/root/vmlinuz
cp domU.cpio.gz $R/root/domU.cpio.gz
cp "$HERE/lab-lib.sh" $R/root/lab-lib.sh
cp "$HERE/dom0-init.sh" $R/init
cp "$TEST_SCRIPT" $R/root/test.sh
chmod +x $R/init $R/root/test.sh
mkcpio $R 1 > dom0.cpio.gz
ls -la dom0.cpio.gz domU.cpio.gz
