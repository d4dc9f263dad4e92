#!/bin/sh
# The Xen lab test, run inside dom0 by dom0-init.sh: `domsnap --host xen` against real guests
# whose init keeps a counter in sector 0 of every disk and in memory (domU-init.sh) and logs
# MISMATCH when a disk does not hold what this memory last wrote. One boot of the Xen host runs
# every part; each part writes "CHECK <name>: PASS|FAIL" lines and "TIMING ..." figures to
# /mnt/results.txt. /mnt/test.env (optional, sourced) may set SKIP_CRASH=1 (domsnap built
# without failpoints) and PARTS (default: every part, in this order):
#   pv        PV guest, one qcow2 disk: checkpoint, revert, disk-only snapshot of the shut-off
#             domain and a --running revert to it, delete, list/history, one `xl list -l` per
#             command, kill -9 of a create and of a revert (journaled outcome checked)
#   multi     PV guest with two qcow2 disks: checkpoint and revert of both at one instant,
#             kill -9 of a create and of a revert, delete
#   thin      PV guest with a qcow2 disk and an LVM thin volume (phy: on blkback): checkpoint
#             and revert of both, kill -9 of a create and of a revert in the middle of the LVM
#             apply, a full thin pool, --external refused
#   refuse    domains domsnap must refuse, each with nothing changed: a raw image file, a thick
#             LV, a block device that is no LVM volume, a disk moved since its snapshot
#   ext       external snapshots of a running PV guest through QMP: create, revert, delete
#             (the base streamed into the overlay), kill -9 of an external create
#   contract  the Host contract suite on XenHost with a qcow2 disk and an LVM thin volume
#   pvh, hvm  PVH and HVM guests: checkpoint, revert, kill -9 of a create
exec > /mnt/results.txt 2>&1
[ -f /mnt/test.env ] && . /mnt/test.env
. /root/lab-lib.sh
export LVM_SUPPRESS_FD_WARNINGS=1
PARTS=${PARTS:-pv multi thin refuse ext contract pvh hvm}
SAVEFP=engine::create::after-save-memory   # between xl save -p and the disk snapshots
STOPFP=engine::revert::after-stop-domain   # after xl destroy, before the disks are reverted
# `xl` behind a wrapper that counts how often domsnap runs each subcommand
mkdir -p /usr/local/bin; REAL_XL=$(command -v xl)
printf '#!/bin/sh\necho "$*" >> /tmp/xl.calls\nexec %s "$@"\n' "$REAL_XL" > /usr/local/bin/xl
chmod +x /usr/local/bin/xl; export PATH=/usr/local/bin:$PATH
t start

# an LVM volume group on a loop device, with a thin pool (for the parts that need it)
lvm_setup() {
  [ -e /dev/vg0/pool ] && return 0
  local a; a=$(now)
  truncate -s 600M $IMAGES/pv.img; LOOP=$(losetup -f); losetup $LOOP $IMAGES/pv.img
  pvcreate -q $LOOP && vgcreate -q vg0 $LOOP && lvcreate -q --type thin-pool -L 400M -n pool vg0
  echo "TIMING lvm setup: $(since $a) s"
}

# crash_create DOM SNAP [ARGS]: kill -9 of `domsnap create DOM SNAP ARGS` once xl save -p
# has left the domain paused; then recover. Checks the journaled roll-back and the domain
# running again. Prefix: $P (the part).
crash_create() {
  local dom=$1 snap=$2; shift 2
  : > /tmp/xl.calls
  FAILPOINTS="$SAVEFP=sleep(600000)" domsnap --host xen --state $S create $dom $snap "$@" > /tmp/crash.out 2>&1 &
  local pid=$!
  wait_then_kill $pid "grep -q '^save' /tmp/xl.calls && paused $dom && ! ps | grep -v grep | grep -q 'xl save'"
  cat /tmp/crash.out
  check "$P: kill -9 create: crash window reached (domain paused after xl save -p)" $HIT
  D recover; check "$P: kill -9 create: recover" $?
  check "$P: kill -9 create: journaled as rolled back" $([ "$(lastoutcome $dom)" = rolled-back ]; echo $?)
  waitticks $dom 2 120
  check "$P: kill -9 create: domain runs again" $(running $dom; echo $?)
  check "$P: kill -9 create: no MISMATCH" $(mism $dom)
}

# crash_revert DOM SNAP FAILPOINT COND: kill -9 of `domsnap revert DOM SNAP` held at
# FAILPOINT once COND holds; then recover. Checks the journaled roll-forward and that the
# domain goes on from the snapshot's counter (between $B and $A + 1).
crash_revert() {
  local dom=$1 snap=$2 fp=$3 cond=$4 tb f
  tb=$(lasttick $dom); : > $(gl $dom)
  FAILPOINTS="$fp=sleep(600000)" domsnap --host xen --state $S revert $dom $snap > /tmp/crash.out 2>&1 &
  local pid=$!
  wait_then_kill $pid "$cond"
  cat /tmp/crash.out
  check "$P: kill -9 revert: crash window reached" $HIT
  D recover; check "$P: kill -9 revert: recover" $?
  check "$P: kill -9 revert: journaled as rolled forward" $([ "$(lastoutcome $dom)" = rolled-forward ]; echo $?)
  waitticks $dom 3 180; tail -2 $(gl $dom)
  f=$(firstread $dom $tb); echo "first read after the rolled-forward revert: $f ($snap between $B and $A)"
  check "$P: kill -9 revert: domain runs from the snapshot's counter" $(( ${f:-999999} < B || ${f:-999999} > A + 1 ))
  check "$P: kill -9 revert: no MISMATCH" $(mism $dom)
}

# checkpoint_and_revert DOM SNAP [CREATE_ARGS]: create SNAP of the running domain, let it run
# on, revert; sets B and A (the counter before and after the create).
checkpoint_and_revert() {
  local dom=$1 snap=$2 tb f; shift 2
  B=$(lastcnt $dom); D create $dom $snap "$@"; check "$P: create $snap (running)" $?; A=$(lastcnt $dom)
  echo "counter before/after create: $B/$A"
  check "$P: domain runs again after create" $(running $dom; echo $?)
  waitticks $dom 3 90
  tb=$(lasttick $dom); : > $(gl $dom)
  D revert $dom $snap; check "$P: revert $snap" $?
  waitticks $dom 3 180; tail -2 $(gl $dom)
  f=$(firstread $dom $tb); echo "first read after revert: $f (checkpoint between $B and $A)"
  check "$P: domain runs after revert" $(running $dom; echo $?)
  check "$P: domU continues from the checkpoint counter" $(( ${f:-999999} < B || ${f:-999999} > A + 1 || $(ticks $dom) < 3 ))
  check "$P: no MISMATCH after revert" $(mism $dom)
}

part_pv() {
  P=pv; t "=== $P: PV guest, one qcow2 disk"
  local img=$IMAGES/pv1.qcow2 v
  qemu-img create -q -f qcow2 $img 64M
  mkcfg pv1 pv 128 "$(qcow2 $img xvda)"
  boot pv1; check "$P: domU runs with its qcow2 disk" $(( $? != 0 || $(mism pv1) > 0 ))
  : > /tmp/xl.calls
  checkpoint_and_revert pv1 c1
  grep -c '^list -l' /tmp/xl.calls > /tmp/n; echo "xl calls of create + revert: $(tr '\n' ';' < /tmp/xl.calls)"
  check "$P: one xl list -l per command" $([ "$(cat /tmp/n)" -le 2 ]; echo $?)
  check "$P: c1 in the qcow2 snapshot table" $(hastag $img c1; echo $?)

  t "=== $P: disk-only snapshot of the shut-off domain, revert to it with --running"
  xl destroy pv1; waitgone pv1
  D create pv1 d1 --disk-only; check "$P: create d1 --disk-only (shut off)" $?
  check "$P: d1 in the qcow2 snapshot table" $(hastag $img d1; echo $?)
  v=$(sec0 qcow2 $img); echo "counter in d1: $v"; : > $(gl pv1)
  D revert pv1 d1 --running; check "$P: revert d1 --running" $?
  waitticks pv1 2 180; grep 'initial CNT' $(gl pv1)
  check "$P: domain boots with the d1 disk" $(( $(grep 'initial CNT' $(gl pv1) | tr -d '\r' | grep -cx "DOMU disk initial CNT=$v") != 1 ))

  D delete pv1 c1; check "$P: delete c1" $?
  check "$P: c1 gone from the qcow2 snapshot table" $(hastag $img c1; echo $(( $? == 0 )))
  D --json list pv1 > /tmp/list.json; check "$P: list --json" $(( $? != 0 || $(grep -c '"d1"' /tmp/list.json) == 0 ))
  echo "catalog tags: [$(cattags pv1 xvda)] qcow2 table: [$(tags $img)]"
  check "$P: catalog matches the qcow2 snapshot table" $([ "$(cattags pv1 xvda)" = "$(tags $img)" ]; echo $?)
  D --json history pv1 > /tmp/history.json; check "$P: history --json" $(( $? != 0 || $(grep -c revert /tmp/history.json) == 0 ))

  [ "${SKIP_CRASH:-0}" = 1 ] && return
  waitticks pv1 2 60
  crash_create pv1 k1
  echo "catalog tags: [$(cattags pv1 xvda)] qcow2 table: [$(tags $img)]"
  check "$P: kill -9 create: catalog matches the qcow2 snapshot table" $([ "$(cattags pv1 xvda)" = "$(tags $img)" ]; echo $?)
  B=$(lastcnt pv1); D create pv1 k2; A=$(lastcnt pv1); waitticks pv1 3 90
  crash_revert pv1 k2 $STOPFP "gone pv1 && ! ps | grep -v grep | grep -q xen-qemu-system"
  check "$P: kill -9 revert: catalog matches the qcow2 snapshot table" $([ "$(cattags pv1 xvda)" = "$(tags $img)" ]; echo $?)
  xl destroy pv1; waitgone pv1
}

part_multi() {
  P=multi; t "=== $P: PV guest, two qcow2 disks"
  local a=$IMAGES/mul1-a.qcow2 b=$IMAGES/mul1-b.qcow2
  qemu-img create -q -f qcow2 $a 64M; qemu-img create -q -f qcow2 $b 64M
  mkcfg mul1 pv 128 "$(qcow2 $a xvda)" "$(qcow2 $b xvdb)"
  boot mul1; check "$P: domU runs with two disks" $(( $? != 0 || $(mism mul1) > 0 )) || return
  running mul1 || return
  checkpoint_and_revert mul1 m1
  echo "xvda [$(tags $a)] xvdb [$(tags $b)]"
  check "$P: m1 on both disks" $(hastag $a m1 && hastag $b m1; echo $?)
  if [ "${SKIP_CRASH:-0}" != 1 ]; then
    waitticks mul1 2 60
    crash_create mul1 k1
    check "$P: kill -9 create: no snapshot left on any disk" $(! hastag $a k1 && ! hastag $b k1; echo $?)
    B=$(lastcnt mul1); D create mul1 k2; A=$(lastcnt mul1); waitticks mul1 3 90
    crash_revert mul1 k2 $STOPFP "gone mul1 && ! ps | grep -v grep | grep -q xen-qemu-system"
  fi
  D delete mul1 m1; check "$P: delete m1" $?
  check "$P: m1 gone from both disks" $(! hastag $a m1 && ! hastag $b m1; echo $?)
  xl destroy mul1; waitgone mul1
}

part_thin() {
  P=thin; t "=== $P: PV guest, a qcow2 disk and an LVM thin volume"
  lvm_setup; lvcreate -q -V 64M --thin -n thn1-b vg0/pool
  local a=$IMAGES/thn1-a.qcow2 c=/dev/vg0/thn1-b
  qemu-img create -q -f qcow2 $a 64M
  mkcfg thn1 pv 128 "$(qcow2 $a xvda)" "$(phy $c xvdb)"
  boot thn1; check "$P: domU runs with a qcow2 disk and a thin volume" $(( $? != 0 || $(mism thn1) > 0 ))
  running thn1 || return
  checkpoint_and_revert thn1 m1
  echo "xvda [$(tags $a)] xvdb [$(lvtags vg0 thn1-b)]"
  check "$P: m1 on both disks (qcow2 table, thin snapshot LV)" $(hastag $a m1 && lvtags vg0 thn1-b | grep -q '^m1@'; echo $?)
  D create thn1 x1 --external; R=$?
  check "$P: --external refused (exit 2) with a thin volume" $([ $R = 2 ]; echo $?)
  check "$P: --external refusal changed nothing" $(running thn1 && [ "$(lastoutcome thn1)" = committed ] && ! hastag $a x1; echo $?)
  # a thin pool too full for another snapshot: the create rolls back, the domain runs on
  lvcreate -q -V 500M --thin -n filler vg0/pool
  dd if=/dev/zero of=/dev/vg0/filler bs=1M count=386 conv=fsync 2>/dev/null
  lvs vg0/pool
  D create thn1 full1; R=$?
  check "$P: create with a full thin pool fails" $([ $R = 1 ]; echo $?)
  check "$P: full pool: journaled as rolled back" $([ "$(lastoutcome thn1)" = rolled-back ]; echo $?)
  check "$P: full pool: no snapshot left on any disk" $(! hastag $a full1 && ! lvtags vg0 thn1-b | grep -q full1; echo $?)
  check "$P: full pool: domain runs on" $(running thn1; echo $?)
  lvremove -q -f vg0/filler
  if [ "${SKIP_CRASH:-0}" != 1 ]; then
    waitticks thn1 2 60
    crash_create thn1 k1
    check "$P: kill -9 create: no snapshot left on any disk" $(! hastag $a k1 && ! lvtags vg0 thn1-b | grep -q k1; echo $?)
    B=$(lastcnt thn1); D create thn1 k2; A=$(lastcnt thn1); waitticks thn1 3 90
    # held in the middle of the LVM apply: the origin renamed away, the new one not yet in place
    crash_revert thn1 k2 disk::lvm::apply::after-rename-origin "lvs vg0/thn1-b.revert-old >/dev/null 2>&1"
    lvs -a vg0
    check "$P: kill -9 revert: no scratch volume left" $(lvs --noheadings -o lv_name vg0 | grep -c revert-)
  fi
  D delete thn1 m1; check "$P: delete m1" $?
  check "$P: m1 gone from both disks" $(! hastag $a m1 && ! lvtags vg0 thn1-b | grep -q '^m1@'; echo $?)
  xl destroy thn1; waitgone thn1
}

part_refuse() {
  P=refuse; t "=== $P: what domsnap refuses, changing nothing"
  lvm_setup; lvcreate -q -L 16M -n thick vg0 2>/dev/null
  local q=$IMAGES/ref-q.qcow2 raw=$IMAGES/ref.raw dev R
  qemu-img create -q -f qcow2 $q 16M; truncate -s 16M $raw
  truncate -s 16M $IMAGES/plain.img; dev=$(losetup -f); losetup $dev $IMAGES/plain.img
  for kind in raw thick plain; do
    case $kind in raw) d="format=raw, vdev=xvdb, access=rw, backendtype=qdisk, target=$raw" ;;
                  thick) d=$(phy /dev/vg0/thick xvdb) ;; plain) d=$(phy $dev xvdb) ;; esac
    mkcfg ref-$kind pv 128 "$(qcow2 $q xvda)" "$d"
    xl create -p /root/ref-$kind.cfg > /tmp/ref.out 2>&1 || cat /tmp/ref.out
    D create ref-$kind s1 > /tmp/ref.out 2>&1; R=$?; cat /tmp/ref.out
    check "$P: $kind disk refused (exit 2, naming xvdb)" $([ $R = 2 ] && grep -q xvdb /tmp/ref.out; echo $?)
    check "$P: $kind disk: nothing changed" $(paused ref-$kind && ! hastag $q s1 && [ -z "$(lastoutcome ref-$kind)" ]; echo $?)
    xl destroy ref-$kind; waitgone ref-$kind
  done
  # a disk moved to another image since its snapshot: revert refuses before touching anything
  mkcfg ref-mv pv 128 "$(qcow2 $q xvda)"
  xl create -p /root/ref-mv.cfg; xl destroy ref-mv; waitgone ref-mv
  D create ref-mv s1; check "$P: disk-only snapshot s1 of ref-mv" $?
  cp $q $IMAGES/ref-moved.qcow2; mkcfg ref-mv pv 128 "$(qcow2 $IMAGES/ref-moved.qcow2 xvda)"
  xl create -p /root/ref-mv.cfg
  D revert ref-mv s1 > /tmp/ref.out 2>&1; R=$?; cat /tmp/ref.out
  check "$P: disk moved since the snapshot: revert refused (exit 2)" $([ $R = 2 ] && grep -q ref-moved /tmp/ref.out; echo $?)
  check "$P: disk moved: nothing changed" $(paused ref-mv; echo $?)
  xl destroy ref-mv; waitgone ref-mv
}

part_ext() {
  P=ext; t "=== $P: external snapshots of a running PV guest (QMP)"
  local img=$IMAGES/ext1.qcow2 ov
  qemu-img create -q -f qcow2 $img 64M
  mkcfg ext1 pv 128 "$(qcow2 $img xvda)"
  boot ext1; check "$P: domU runs with its qcow2 disk" $(( $? != 0 || $(mism ext1) > 0 ))
  checkpoint_and_revert ext1 e1 --external
  ls -la $IMAGES | grep ext1; ov=$(domsnap --host xen --state $S --json domain info ext1 | sed -n 's/.*"path" *: *"\([^"]*\)".*/\1/p' | head -1)
  echo "disk image now: $ov"
  check "$P: the disk is on an overlay of the frozen image" $([ "$ov" != "$img" ] && qemu-img info -U $ov | grep -q "backing file: .*ext1.qcow2"; echo $?)
  [ "${SKIP_CRASH:-0}" != 1 ] && { waitticks ext1 2 60; crash_create ext1 k1 --external; }
  D delete ext1 e1; check "$P: delete e1 (its image streamed into the overlay)" $?
  check "$P: e1's image removed" $([ ! -e $img ]; echo $?)
  waitticks ext1 3 90
  check "$P: domain runs on after delete, no MISMATCH" $(running ext1 && [ $(mism ext1) = 0 ]; echo $?)
  xl destroy ext1; waitgone ext1
}

part_contract() {
  P=contract; t "=== $P: Host contract suite, qcow2 disk + LVM thin volume"
  lvm_setup; lvcreate -q -V 32M --thin -n con1-b vg0/pool
  qemu-img create -q -f qcow2 $IMAGES/con1.qcow2 32M
  mkcfg con1 pv 128 "$(qcow2 $IMAGES/con1.qcow2 xvda)" "$(phy /dev/vg0/con1-b xvdb)"
  # XenHost knows a shut-off domain once it has seen it active
  xl create -p /root/con1.cfg; xenhost-smoke $S info con1; xl destroy con1; waitgone con1
  local a; a=$(now)
  xenhost-smoke $S contract con1 > /tmp/contract.out 2>&1; cat /tmp/contract.out | tail -20
  echo "TIMING contract: $(since $a) s"
  check "$P: Host contract on XenHost (qcow2 + LVM thin)" $(grep -q 'smoke contract: ok' /tmp/contract.out; echo $?)
}

part_guest() {   # part_guest TYPE: pvh or hvm
  P=$1; t "=== $P: $1 guest, one qcow2 disk"
  local img=$IMAGES/$1.qcow2 mem=128
  qemu-img create -q -f qcow2 $img 64M
  mkcfg g$1 $1 $mem "$(qcow2 $img xvda)"
  boot g$1; check "$P: domU runs with its qcow2 disk" $(( $? != 0 || $(mism g$1) > 0 ))
  checkpoint_and_revert g$1 c1
  [ "${SKIP_CRASH:-0}" != 1 ] && { waitticks g$1 2 60; crash_create g$1 k1; }
  xl destroy g$1; waitgone g$1
}

for part in $PARTS; do
  a=$(now)
  case $part in pvh|hvm) part_guest $part ;; *) part_$part ;; esac
  echo "TIMING part $part: $(since $a) s"
done
t end
grep -E '^(CHECK|TIMING)' /mnt/results.txt
