#!/bin/sh
# Alternative in-dom0 test: the generic Host contract suite (xen::contract) on XenHost, through
# the xenhost-smoke example. Run it with
#   cargo build --release --features xen -p xen --example xenhost-smoke
#   DOMSNAP_BIN=target/release/domsnap EXTRA_BINS=target/release/examples/xenhost-smoke:/usr/bin/xenhost-smoke \
#     TEST_SCRIPT=tests/xen-lab/dom0-contract.sh tests/xen-lab/run.sh
exec > /mnt/results.txt 2>&1
S=/var/lib/domsnap; IMG=/var/lib/images/domd.qcow2
t() { echo "T+$(cut -d' ' -f1 /proc/uptime)s: $*"; }
mkdir -p /var/lib/images $S; qemu-img create -q -f qcow2 $IMG 64M
# XenHost knows a shut-off domain once it has seen it active
xl create -p /root/domd.cfg; xenhost-smoke $S info domd; xl destroy domd
t contract
xenhost-smoke $S contract domd 2>&1 | grep -v '^ '
R=$(grep -c 'smoke contract: ok' /mnt/results.txt)
if [ "$R" = 1 ]; then echo "CHECK Host contract on XenHost: PASS"; else echo "CHECK Host contract on XenHost: FAIL"; fi
t end
