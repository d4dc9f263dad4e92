#!/bin/bash
# Boots Xen 4.17 + the dom0 initrd under QEMU (TCG by default); QEMU exits when dom0 reboots (-no-reboot).
# Env: XEN_LAB_DIR, ACCEL (tcg|kvm), CPU, SMP, MEM, TIMEOUT (s), LOG (serial log file),
#      SHARE (host dir mounted on /mnt in dom0; default $XEN_LAB_DIR/share), XEN_EXTRA, DOM0_EXTRA.
set -uo pipefail
LAB=${XEN_LAB_DIR:-/tmp/domsnap-xen-lab}; cd "$LAB"
KVER=$(cat kver)
ACCEL=${ACCEL:-tcg}
CPU=${CPU:-qemu64,+svm,+npt}
LOG=${LOG:-$LAB/serial.log}
SHARE=${SHARE:-$LAB/share}; mkdir -p "$SHARE"
QEMU=$(command -v qemu-system-x86_64 || true); QARGS=()
if [ -z "$QEMU" ]; then   # the emulator unpacked by setup.sh
  QEMU=$LAB/hostq/usr/bin/qemu-system-x86_64; QARGS=(-L "$LAB/hostq/usr/share/qemu" -L "$LAB/hostq/usr/share/seabios")
  export LD_LIBRARY_PATH=$LAB/hostq/usr/lib/x86_64-linux-gnu:$LAB/hostq/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
[ -x "$QEMU" ] || { echo "xen-lab: ERROR: no qemu-system-x86_64 (run setup.sh)" >&2; exit 3; }
XEN_CMD="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all console_timestamps=boot dom0_mem=1536M,max:1536M ${XEN_EXTRA:-}"
DOM0_CMD="console=hvc0 earlyprintk=xen rdinit=/init loglevel=5 ${DOM0_EXTRA:-}"
timeout --foreground "${TIMEOUT:-1500}" "$QEMU" "${QARGS[@]}" \
  -machine q35,accel=$ACCEL -cpu $CPU -smp ${SMP:-2} -m ${MEM:-3G} \
  -nographic -monitor none -serial stdio -no-reboot \
  -kernel xen -append "$XEN_CMD" \
  -initrd "x/boot/vmlinuz-$KVER $DOM0_CMD,dom0.cpio.gz" \
  -virtfs local,path=$SHARE,mount_tag=hostshare,security_model=none,id=hs \
  < /dev/null > "$LOG" 2>&1
