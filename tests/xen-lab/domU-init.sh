#!/bin/sh
# domU init. Without a disk: prints "DOMU tick N" every 2 s. With a vbd (xvda): keeps a counter in
# sector 0 of /dev/xvda ("CNT=<n> ..."): each tick reads it (page cache dropped first, so the read
# comes from the backend), checks it equals the value this domU last wrote (MISMATCH otherwise, e.g.
# after the disk was reverted underneath a running/restored domain), writes n+1 with fsync, reads back.
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev 2>/dev/null
echo "DOMU-INIT up, uptime: $(cat /proc/uptime)"
D=
if ls /sys/bus/xen/devices/ 2>/dev/null | grep -q '^vbd-'; then
  insmod /modules/xen-blkfront.ko
  for i in $(seq 1 30); do [ -b /dev/xvda ] && { D=/dev/xvda; break; }; sleep 1; done
  echo "DOMU disk: ${D:-vbd present but /dev/xvda did not appear} $(cat /sys/block/xvda/size 2>/dev/null) sectors"
fi
rd() { echo 3 > /proc/sys/vm/drop_caches; dd if=$D bs=512 count=1 2>/dev/null | head -c 100 | tr -d '\000' | sed -n 's/^CNT=\([0-9]*\).*/\1/p'; }
wr() { printf 'CNT=%d uptime=%s\n' $1 "$(cut -d' ' -f1 /proc/uptime)" | dd of=$D bs=512 count=1 conv=sync,fsync 2>/dev/null; }
if [ -n "$D" ]; then n=$(rd); n=${n:-0}; echo "DOMU disk initial CNT=$n"; fi
i=0
while true; do
  i=$((i+1)); u=$(cut -d' ' -f1 /proc/uptime)
  if [ -n "$D" ]; then
    c=$(rd); c=${c:-0}; [ "$c" = "$n" ] && st=ok || st="MISMATCH(expected=$n)"
    n=$((c+1)); wr $n; b=$(rd)
    echo "DOMU tick $i uptime=$u disk read=$c $st wrote=$n readback=$b"
  else
    echo "DOMU tick $i uptime=$u"
  fi
  sleep 2
done
