#!/bin/sh
# domU init: a counter kept in sector 0 of every disk ("CNT=<n> ...") and in memory. Each tick
# (every `tick=` seconds, default 1) reads every disk (page cache dropped first, so the read
# comes from the backend), checks each holds the value this domU last wrote (MISMATCH otherwise:
# a disk reverted underneath a running or restored domain, or disks from different instants),
# writes n+1 to every disk with fsync and logs
#   DOMU tick <i> uptime=<s> disk read=<r> ok|MISMATCH(...) wrote=<n+1>
# Kernel arguments: disks=xvda,xvdb,... (default: every vbd), tick=<seconds>.
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev 2>/dev/null
DISKS=; TICK=1
for a in $(cat /proc/cmdline); do case $a in
  disks=*) DISKS=$(echo "${a#disks=}" | tr , ' ') ;;
  tick=*) TICK=${a#tick=} ;;
esac; done
echo "DOMU-INIT up, uptime: $(cat /proc/uptime), disks: ${DISKS:-auto}"
if ls /sys/bus/xen/devices/ 2>/dev/null | grep -q '^vbd-'; then
  insmod /modules/xen-blkfront.ko 2>/dev/null
  if [ -z "$DISKS" ]; then
    for i in $(seq 1 30); do [ -b /dev/xvda ] && break; sleep 1; done
    DISKS=$(ls /sys/block | grep '^xvd' | tr '\n' ' ')
  fi
  for d in $DISKS; do
    for i in $(seq 1 30); do [ -b /dev/$d ] && break; sleep 1; done
    [ -b /dev/$d ] || echo "DOMU disk /dev/$d did not appear: MISMATCH"
  done
  echo "DOMU disks: $DISKS"
fi
rd() { echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/$1 bs=512 count=1 2>/dev/null | head -c 100 | tr -d '\000' | sed -n 's/^CNT=\([0-9]*\).*/\1/p'; }
wr() { printf 'CNT=%d uptime=%s\n' $2 "$(cut -d' ' -f1 /proc/uptime)" | dd of=/dev/$1 bs=512 count=1 conv=sync,fsync 2>/dev/null; }
n=
for d in $DISKS; do
  c=$(rd $d); c=${c:-0}
  if [ -z "$n" ]; then n=$c; echo "DOMU disk initial CNT=$n"
  elif [ "$c" != "$n" ]; then echo "DOMU disks disagree at boot: $d holds $c, the first $n: MISMATCH"; fi
done
i=0
while true; do
  i=$((i+1)); u=$(cut -d' ' -f1 /proc/uptime)
  if [ -n "$DISKS" ]; then
    st=ok; first=
    for d in $DISKS; do
      c=$(rd $d); c=${c:-0}; [ -z "$first" ] && first=$c
      [ "$c" = "$n" ] || st="MISMATCH($d=$c,expected=$n)"
    done
    n=$((first+1)); for d in $DISKS; do wr $d $n; done
    echo "DOMU tick $i uptime=$u disk read=$first $st wrote=$n"
  else
    echo "DOMU tick $i uptime=$u"
  fi
  sleep $TICK
done
