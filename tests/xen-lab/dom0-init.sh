#!/bin/sh
# dom0 /init: Xen modules, xenstored, xenconsoled, host share on /mnt, then the test
# (/root/test.sh, or /mnt/test.sh if present, or kernel arg xentest=/path|shell); powers off.
export PATH=/usr/lib/xen-4.17/bin:/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
# what udev would make: the disk hotplug script's lock stats /dev/stdin
ln -s /proc/self/fd /dev/fd; ln -s fd/0 /dev/stdin; ln -s fd/1 /dev/stdout; ln -s fd/2 /dev/stderr
mkdir -p /run/xen /run/xenstored /var/log/xen/console
echo "DOM0-INIT: uptime $(cut -d' ' -f1 /proc/uptime)"
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc xen-blkback \
         crc32c_generic libcrc32c dm-mod dm-bufio dm-bio-prison dm-persistent-data dm-thin-pool dm-snapshot loop; do
  insmod /modules/$m.ko || echo "insmod $m failed"; done
mount -t xenfs xenfs /proc/xen
xenstored --pid-file /run/xenstored.pid
for i in 1 2 3 4 5 6 7 8 9 10; do xenstore-read -s / >/dev/null 2>&1 && break; sleep 1; done
xen-init-dom0 || echo "xen-init-dom0 failed"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "DOM0-TOOLS-UP: uptime $(cut -d' ' -f1 /proc/uptime)"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p; do insmod /modules/$m.ko 2>/dev/null; done
sleep 1
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 hostshare /mnt && echo "DOM0: share mounted on /mnt"
T=/root/test.sh; [ -f /mnt/test.sh ] && T=/mnt/test.sh
for a in $(cat /proc/cmdline); do case $a in xentest=/*) T=${a#xentest=};; esac; done
if grep -q xentest=shell /proc/cmdline; then
  setsid cttyhack sh
else
  echo "DOM0: running $T"
  sh $T 2>&1
  echo "DOM0-TEST-DONE rc=$?"
fi
sync
reboot -f   # with QEMU -no-reboot this ends the emulator
