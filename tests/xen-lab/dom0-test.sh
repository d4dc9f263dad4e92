#!/bin/sh
# The Xen lab test, run inside dom0 by dom0-init.sh. Drives `domsnap --host xen` against a PV
# domU ("domd") whose init keeps a counter in sector 0 of its qcow2 disk and in memory, and logs
# "DOMU tick N ... disk read=R ok|MISMATCH(expected=M) wrote=W" every 2 s (MISMATCH: the disk
# does not hold what this memory last wrote, e.g. memory restored onto a disk not reverted).
# Writes everything to /mnt/results.txt; one "CHECK <name>: PASS|FAIL" line per check.
# /mnt/test.env (optional, sourced) may set SKIP_CRASH=1 (domsnap built without failpoints).
exec > /mnt/results.txt 2>&1
[ -f /mnt/test.env ] && . /mnt/test.env
S=/var/lib/domsnap; IMG=/var/lib/images/domd.qcow2; CFG=/root/domd.cfg
GL=/var/log/xen/console/guest-domd.log
FP=${FP:-engine::create::after-save-memory}   # failpoint between xl save -p and the disk snapshots
RFP=${RFP:-engine::revert::after-stop-domain}  # failpoint after xl destroy, before the disks are reverted
t() { echo "T+$(cut -d' ' -f1 /proc/uptime)s: $*"; }
check() { if [ "$2" = 0 ]; then echo "CHECK $1: PASS"; else echo "CHECK $1: FAIL"; fi; }
D() { t "domsnap $*"; domsnap --host xen --state $S "$@"; local rc=$?; echo "[rc=$rc]"; return $rc; }
ticks() { local n; n=$(grep -c 'DOMU tick' $GL 2>/dev/null); echo ${n:-0}; }
waitticks() { local want=$(( $(ticks) + $1 )) i=0; while [ $(ticks) -lt $want ] && [ $i -lt ${2:-120} ]; do sleep 1; i=$((i+1)); done; }
lastcnt() { grep 'DOMU tick' $GL | tail -1 | sed -n 's/.*wrote=\([0-9]*\).*/\1/p'; }
lasttick() { grep 'DOMU tick' $GL | tail -1 | awk '{print $3}'; }
# the first line of the restored domU: its tick numbers restart from the checkpoint, below $1
# (the tick of the old domU when the revert began; the old domU may still log a line or two)
firstread() { grep 'DOMU tick' $GL | awk -v m=$1 '$3+0 <= m+0 {print; exit}' | sed -n 's/.*disk read=\([0-9]*\).*/\1/p'; }
mism() { local n; n=$(grep -c MISMATCH $GL 2>/dev/null); echo ${n:-0}; }
xlstate() { xl list domd 2>/dev/null | awk '$1=="domd"{print $5}'; }   # e.g. -b----, --p---; empty: none
running() { local s; s=$(xlstate); [ -n "$s" ] && ! echo "$s" | grep -q p; }
paused() { xlstate | grep -q p; }
waitdm() { for i in $(seq 1 150); do ps | grep -v grep | grep -q xen-qemu-system || return 0; sleep 0.2; done; echo "device model still running"; }
# the counter in sector 0 of the image (domain shut off)
sec0() { rm -f /tmp/sec0; qemu-img dd -f qcow2 -O raw if=$IMG of=/tmp/sec0 bs=512 count=1 >/dev/null && head -c 40 /tmp/sec0 | sed -n 's/^CNT=\([0-9]*\).*/\1/p'; }
tags() { qemu-img snapshot -l -U $IMG | awk 'NR>2{print $2}' | sort -u | tr '\n' ' '; }    # qcow2 table
hastag() { tags | tr ' ' '\n' | grep -qE "^$1(@|\$)"; }   # snapshot $1's disk tag is in the table
cattags() { domsnap --host xen --state $S --json list domd 2>/dev/null | tr ',{}[]' '\n\n\n\n\n' | sed -n 's/^ *"tag" *: *"\([^"]*\)".*/\1/p' | sort -u | tr '\n' ' '; }

t start; mkdir -p /var/lib/images $S
qemu-img create -q -f qcow2 $IMG 64M
xl create $CFG; echo "xl create rc=$?"; waitticks 3 180; t "domU up"; tail -1 $GL
check "domU runs with its qcow2 disk" $(( $(ticks) < 3 || $(mism) > 0 ))

t "=== checkpoint c1 of the running domain"
B=$(lastcnt); D create domd c1; R=$?; A=$(lastcnt); echo "counter before/after create: $B/$A"
check "create c1 (running)" $(( R != 0 ))
check "domain runs again after create" $(running; echo $?)
echo "qcow2 snapshots: $(tags)"
check "c1 in the qcow2 snapshot table" $(hastag c1; echo $?)

t "=== let the counter advance"; waitticks 4 90; C2=$(lastcnt); echo "counter now $C2"

t "=== revert to c1"
TB=$(lasttick); : > $GL
D revert domd c1; R=$?
check "revert c1" $(( R != 0 ))
waitticks 4 120; t "after revert"; head -3 $GL; tail -1 $GL
F=$(firstread $TB); echo "first read after revert: $F (checkpoint between $B and $A; before revert $C2)"
check "domain runs after revert" $(running; echo $?)
check "domU continues from the checkpoint counter" $(( ${F:-999999} < B || ${F:-999999} > A + 1 || $(ticks) < 3 ))
check "no MISMATCH after revert" $(mism)

t "=== disk-only snapshot of the destroyed domain"
xl destroy domd; waitdm
D create domd d1 --disk-only; R=$?
check "create d1 --disk-only (destroyed domain)" $(( R != 0 ))
echo "qcow2 snapshots: $(tags)"
check "d1 in the qcow2 snapshot table" $(hastag d1; echo $?)

t "=== revert to the disk-only snapshot, booting the domain (xl create from its remembered config)"
V=$(sec0); echo "counter in d1: $V"; : > $GL
D revert domd d1 --running; R=$?
waitticks 2 180; grep 'initial CNT' $GL; tail -1 $GL
check "revert d1 --running" $(( R != 0 ))
check "domain boots with the d1 disk" $(( $(grep 'initial CNT' $GL | tr -d '\r' | grep -cx "DOMU disk initial CNT=$V") != 1 ))
check "domain runs after revert d1" $(running; echo $?)

t "=== delete c1"
D delete domd c1; R=$?
check "delete c1" $(( R != 0 ))
check "c1 gone from the qcow2 snapshot table" $(hastag c1; echo $(( $? == 0 )))

t "=== list and history"
D --json list domd > /tmp/list.json; R=$?; cat /tmp/list.json; echo
check "list --json" $(( R != 0 || $(grep -c '"d1"' /tmp/list.json) == 0 ))
check "catalog matches the qcow2 snapshot table" $([ "$(cattags)" = "$(tags)" ]; echo $?)
echo "catalog tags: [$(cattags)] qcow2 table: [$(tags)]"
D --json history > /tmp/history.json; R=$?; head -c 3000 /tmp/history.json; echo
check "history --json" $(( R != 0 || $(grep -c revert /tmp/history.json) == 0 ))

if [ "${SKIP_CRASH:-0}" != 1 ]; then
t "=== crash: kill -9 between xl save -p and the disk snapshot"
: > $GL; running || xl create $CFG; waitticks 3 180; t "domU up"
FAILPOINTS="$FP=sleep(60000)" domsnap --host xen --state $S create domd k1 > /tmp/k1.out 2>&1 &
P=$!; hit=1; seen=0
saving() { ps | grep -v grep | grep -q 'xl save'; }
for i in $(seq 1 1200); do
  saving && seen=1
  # xl save -p has run and finished, the domain is paused: domsnap waits at the failpoint
  if [ $seen = 1 ] && paused && ! saving; then sleep 2
    paused && ! saving && kill -0 $P 2>/dev/null && { hit=0; break; }; fi
  kill -0 $P 2>/dev/null || break
  sleep 0.3
done
t "killing domsnap (pid $P) with the domain $(xlstate)"; kill -9 $P; wait $P 2>/dev/null; cat /tmp/k1.out
check "crash window reached (domain paused after xl save -p)" $hit
echo "qcow2 snapshots after the crash: $(tags)"
D recover; R=$?
check "recover after kill -9" $(( R != 0 ))
sleep 2; waitticks 2 60
check "domain runs again after recovery" $(running; echo $?)
echo "catalog tags: [$(cattags)] qcow2 table: [$(tags)]"
check "catalog matches the qcow2 snapshot table after the crash" $([ "$(cattags)" = "$(tags)" ]; echo $?)
check "no MISMATCH after the crash" $(mism)

t "=== crash: kill -9 of a revert after xl destroy; recovery rolls forward"
B=$(lastcnt); D create domd k2; A=$(lastcnt); echo "counter before/after create k2: $B/$A"
waitticks 3 90; TB=$(lasttick); : > $GL
FAILPOINTS="$RFP=sleep(60000)" domsnap --host xen --state $S revert domd k2 > /tmp/k2.out 2>&1 &
P=$!; hit=1
for i in $(seq 1 1200); do
  if [ -z "$(xlstate)" ] && ! ps | grep -v grep | grep -q xen-qemu-system; then sleep 2
    [ -z "$(xlstate)" ] && kill -0 $P 2>/dev/null && { hit=0; break; }; fi
  kill -0 $P 2>/dev/null || break
  sleep 0.3
done
t "killing domsnap (pid $P); domain: '$(xlstate)'"; kill -9 $P; wait $P 2>/dev/null; cat /tmp/k2.out
check "crash window reached (revert: domain destroyed)" $hit
D recover; R=$?
check "recover after kill -9 in revert" $(( R != 0 ))
waitticks 3 120; t "after recovery"; tail -2 $GL
F=$(firstread $TB); echo "first read after the rolled-forward revert: $F (k2 between $B and $A)"
check "recovery restored the domain from k2 (roll forward)" $(running; echo $?)
check "domU continues from k2's counter after the revert crash" $(( ${F:-999999} < B || ${F:-999999} > A + 1 ))
check "no MISMATCH after the revert crash" $(mism)
echo "catalog tags: [$(cattags)] qcow2 table: [$(tags)]"
check "catalog matches the qcow2 snapshot table after the revert crash" $([ "$(cattags)" = "$(tags)" ]; echo $?)
D --json history > /tmp/history.json; tail -c 2500 /tmp/history.json; echo
fi
t end
grep CHECK /mnt/results.txt
