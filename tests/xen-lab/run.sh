#!/bin/bash
# Runs the Xen lab test end to end: setup (once), boot images with the given domsnap, boot Xen
# under QEMU, run dom0-test.sh inside dom0, print its results.
#   DOMSNAP_BIN=path/to/domsnap tests/xen-lab/run.sh
# Env: XEN_LAB_DIR (default /tmp/domsnap-xen-lab), TIMEOUT (seconds for the boot, default 1140),
#      SKIP_CRASH=1 (domsnap built without the failpoints feature), FAILPOINT (the engine's
#      failpoint between `xl save -p` and the disk snapshots), PARTS (the parts of dom0-test.sh
#      to run), ACCEL, SMP, MEM.
# Exit: 0 all checks passed, 1 a check failed or the run did not finish, 3 this host cannot
# run the lab (reason on stderr).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export XEN_LAB_DIR=${XEN_LAB_DIR:-/tmp/domsnap-xen-lab}
: "${DOMSNAP_BIN:?set DOMSNAP_BIN to a domsnap built with --features xen}"
export DOMSNAP_BIN
T0=$(date +%s)
"$HERE/setup.sh" || { rc=$?; [ $rc = 3 ] && exit 3; echo "xen-lab: setup failed" >&2; exit 1; }
"$HERE/build-initrd.sh" >/dev/null || { echo "xen-lab: building the boot images failed" >&2; exit 1; }
SHARE=$XEN_LAB_DIR/share; mkdir -p "$SHARE"; rm -f "$SHARE/results.txt" "$SHARE/test.sh" "$SHARE/test.env"
[ "${SKIP_CRASH:-0}" = 1 ] && echo "SKIP_CRASH=1" >> "$SHARE/test.env"
[ -n "${FAILPOINT:-}" ] && echo "FP=$FAILPOINT" >> "$SHARE/test.env"
[ -n "${PARTS:-}" ] && echo "PARTS='$PARTS'" >> "$SHARE/test.env"
echo "xen-lab: booting Xen under QEMU (${ACCEL:-tcg}); serial log $XEN_LAB_DIR/serial.log"
TIMEOUT=${TIMEOUT:-1140} "$HERE/run-qemu.sh"; qrc=$?
T1=$(date +%s)
[ -f "$SHARE/results.txt" ] || { echo "xen-lab: no results (QEMU rc=$qrc); tail of the serial log:" >&2
  tail -30 "$XEN_LAB_DIR/serial.log" >&2; exit 1; }
cat "$SHARE/results.txt"
echo "xen-lab: finished in $((T1 - T0)) s (QEMU rc=$qrc)"
grep -q '^T+.*: end$' "$SHARE/results.txt" || { echo "xen-lab: the test did not finish" >&2; exit 1; }
grep -q '^CHECK .*: FAIL' "$SHARE/results.txt" && exit 1
grep -q '^CHECK .*: PASS' "$SHARE/results.txt" || exit 1
exit 0
