# Helpers of the in-dom0 lab tests (sourced by dom0-test.sh and dom0-contract.sh; busybox sh).
# Every function that looks at a guest takes the domain name first.
S=${S:-/var/lib/domsnap}; IMAGES=/var/lib/images; KERNEL=/root/vmlinuz; INITRD=/root/domU.cpio.gz
mkdir -p $IMAGES $S

t() { echo "T+$(cut -d' ' -f1 /proc/uptime)s: $*"; }
now() { cut -d' ' -f1 /proc/uptime; }
# elapsed seconds since a `now` value, one decimal
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
check() { if [ "$2" = 0 ]; then echo "CHECK $1: PASS"; else echo "CHECK $1: FAIL"; fi; }
# `domsnap --host xen` with its duration; TIMING lines are the report's per-step figures
D() { local a rc; a=$(now); t "domsnap $*"; domsnap --host xen --state $S "$@"; rc=$?
      echo "[rc=$rc] TIMING domsnap $* : $(since $a) s"; return $rc; }

gl() { echo /var/log/xen/console/guest-$1.log; }
ticks() { local n; n=$(grep -c 'DOMU tick' $(gl $1) 2>/dev/null); echo ${n:-0}; }
waitticks() { local want=$(( $(ticks $1) + $2 )) i=0; while [ $(ticks $1) -lt $want ] && [ $i -lt ${3:-120} ]; do sleep 1; i=$((i+1)); done; }
lastcnt() { grep 'DOMU tick' $(gl $1) | tail -1 | sed -n 's/.*wrote=\([0-9]*\).*/\1/p'; }
lasttick() { grep 'DOMU tick' $(gl $1) | tail -1 | awk '{print $3}'; }
# the disk counter the first tick of a restored domU read: its tick numbers restart from the
# checkpoint's, at most $2 (the old domU's last tick when the revert began)
firstread() { grep 'DOMU tick' $(gl $1) | awk -v m=$2 '$3+0 <= m+0 {print; exit}' | sed -n 's/.*disk read=\([0-9]*\).*/\1/p'; }
mism() { local n; n=$(grep -c MISMATCH $(gl $1) 2>/dev/null); echo ${n:-0}; }
xlstate() { xl list $1 2>/dev/null | awk -v d=$1 '$1==d{print $5}'; }   # -b----, --p---; empty: none
running() { local s; s=$(xlstate $1); [ -n "$s" ] && ! echo "$s" | grep -q p; }
paused() { xlstate $1 | grep -q p; }
gone() { [ -z "$(xlstate $1)" ]; }
dm_of() { ps | grep -v grep | grep xen-qemu-system | grep -c -- "-xen-domid $1 "; }
waitgone() { local i; for i in $(seq 1 150); do gone $1 && return 0; sleep 0.2; done; echo "$1 still there"; }

# mkcfg NAME TYPE MEMORY_MB DISKSPEC... : writes /root/NAME.cfg; DISKSPEC is an xl disk spec
mkcfg() {
  local name=$1 type=$2 mem=$3 d disks= sep= vdevs= ; shift 3
  for d in "$@"; do disks="$disks$sep'$d'"; sep=", "
    vdevs="$vdevs${vdevs:+,}$(echo "$d" | sed -n 's/.*vdev=\([a-z0-9]*\).*/\1/p')"; done
  {
    echo "name = \"$name\""; echo "type = \"$type\""; echo "memory = $mem"; echo "vcpus = 1"
    echo "kernel = \"$KERNEL\""; echo "ramdisk = \"$INITRD\""
    echo "cmdline = \"console=hvc0 rdinit=/init loglevel=4 disks=$vdevs\""
    echo "on_crash = \"preserve\""
    [ "$type" = hvm ] && { echo 'vnc = 0'; echo 'vga = "none"'; echo 'serial = "none"'; }
    echo "disk = [ $disks ]"
  } > /root/$name.cfg
}
qcow2() { echo "format=qcow2, vdev=$2, access=rw, backendtype=qdisk, target=$1"; }
phy() { echo "format=raw, vdev=$2, access=rw, backendtype=phy, target=$1"; }

# boot NAME: xl create its config; waits for 3 ticks. Fails at once if xl create does.
# Under a loaded emulation the device model may miss libxl's start-up timeout: one retry.
boot() { local a; a=$(now); : > $(gl $1)
         xl create /root/$1.cfg >/tmp/create-$1.out 2>&1 || { cat /tmp/create-$1.out
           tail -40 /var/log/xen/xen-hotplug.log 2>/dev/null
           xl destroy $1 2>/dev/null; waitgone $1; echo "xl create $1 failed: once more"
           xl create /root/$1.cfg >/tmp/create-$1.out 2>&1 || { cat /tmp/create-$1.out; return 1; }; }
         waitticks $1 3 240; echo "TIMING boot $1: $(since $a) s"; tail -1 $(gl $1); [ $(ticks $1) -ge 3 ]; }

# the tags of the snapshots in a qcow2 image's table, sorted
tags() { qemu-img snapshot -l -U $1 | awk 'NR>2{print $2}' | sort -u | tr '\n' ' '; }
hastag() { tags $1 | tr ' ' '\n' | grep -qE "^$2(@|\$)"; }
# the disk tags domsnap's catalog has for disk $2 of domain $1 (internal snapshots)
cattags() { domsnap --host xen --state $S --json list $1 2>/dev/null | tr '{}[],' '\n\n\n\n\n' |
  awk -v t="\"$2\"" '/"tag"/{tag=$0} /"target"/{ if (index($0, t)) { sub(/.*"tag" *: *"/, "", tag); sub(/".*/, "", tag); print tag } }' | sort -u | tr '\n' ' '; }
# the thin snapshot LVs of LV $1/$2, as tags
lvtags() { lvs --noheadings -o lv_name,lv_tags $1 2>/dev/null | awk -v o="$2" '$2 ~ "domsnap-of="o"($|,)" {sub("^"o"\\.", "", $1); gsub(/\+/, "@", $1); print $1}' | sort -u | tr '\n' ' '; }
# the counter in sector 0 of an image (its domain shut off): sec0 qcow2|raw PATH
sec0() { rm -f /tmp/sec0; qemu-img dd -f $1 -O raw if=$2 of=/tmp/sec0 bs=512 count=1 >/dev/null 2>&1 &&
  head -c 40 /tmp/sec0 | sed -n 's/^CNT=\([0-9]*\).*/\1/p'; }

# the outcome domsnap's history journaled for the last operation on domain $1: committed,
# rolled-back or rolled-forward (step outcomes are "done" or "failed": left out)
lastoutcome() { domsnap --host xen --state $S --json history $1 2>/dev/null | tr '{},' '\n\n\n' |
  sed -n 's/^ *"outcome" *: *"\([a-z-]*\)".*/\1/p' | grep -E '^(committed|rolled-back|rolled-forward)$' | tail -1; }

# wait_then_kill PID COND... : polls COND (a shell command) until it holds twice, 2 s apart,
# while PID lives; then kill -9 PID. Sets HIT=0 if the window was reached.
wait_then_kill() {
  local p=$1 i; shift; HIT=1
  for i in $(seq 1 1200); do
    if eval "$*"; then sleep 2; eval "$*" && kill -0 $p 2>/dev/null && { HIT=0; break; }; fi
    kill -0 $p 2>/dev/null || break
    sleep 0.3
  done
  t "kill -9 domsnap (pid $p)"; kill -9 $p 2>/dev/null; wait $p 2>/dev/null
}
