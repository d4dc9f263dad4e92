#!/usr/bin/env bash
# Times domsnap's internal snapshot operations (disk crate) against `qemu-img snapshot`
# on the same images in the same run, and prints medians and ratios (goal: <= 0.5).
#
# Images: 1 GiB / 16 GiB / 128 GiB virtual holding 0.25 / 2 / 8 GiB of data (64 KiB
# clusters), written by qemu-io in 32 MiB extents spread over the disk.
# Usage: benches/disk-vs-qemu-img.sh [RUNS] [WORKDIR]   (default 5 runs, a temp dir)
# SIZES="1:0.25 16:2" restricts the set (virtual GiB:data GiB).
set -euo pipefail

RUNS=${1:-5}
WORK=${2:-$(mktemp -d /var/tmp/disk-bench.XXXXXX)}
SIZES=${SIZES:-"1:0.25 16:2 128:8"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

cargo build -q --release -p disk --example disk-snap --manifest-path "$ROOT/Cargo.toml"
BIN=$CARGO_TARGET_DIR/release/examples/disk-snap
mkdir -p "$WORK"
echo "work dir: $WORK; qemu-img: $(qemu-img --version | head -1)"

# Appends to array $1 the milliseconds a command took, to 0.1 ms (its output discarded).
# Runs in this shell, not in a `$(...)` subshell (which would ignore `set -e`): a failing
# command stops the script instead of being timed as a fast run. Whole milliseconds made
# the ratios of the 1 GiB image, a few ms each, mostly rounding.
time_into() {
    local -n into=$1
    shift
    local t0 t1
    t0=$(date +%s%N)
    if ! "$@" >/dev/null; then
        echo "failed: $*" >&2
        exit 1
    fi
    t1=$(date +%s%N)
    into+=("$(awk -v d=$((t1 - t0)) 'BEGIN {printf "%.1f", d / 1000000}')")
}

# Fails unless the image's snapshot table lists (want=1) or lacks (want=0) tag $2.
has_snapshot() { # image tag want
    local found=0
    if qemu-img snapshot -l "$1" | awk 'NR > 2 {print $2}' | grep -qx -- "$2"; then
        found=1
    fi
    if [[ $found != "$3" ]]; then
        echo "snapshot $2 of $1: expected present=$3, found present=$found" >&2
        exit 1
    fi
}

# Fails unless the first MiB of the image holds pattern byte $2 (what the apply restored).
holds_pattern() { # image pattern
    local out
    out=$(qemu-io -r -f qcow2 -c "read -P $2 0 1M" "$1")
    if [[ $out == *"verification failed"* || $out != *"read 1048576/1048576"* ]]; then
        echo "after apply, $1 does not hold the snapshot's data: $out" >&2
        exit 1
    fi
}

median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

make_image() { # path virtual_gib data_gib
    local img=$1 vgib=$2 dgib=$3
    [[ -f $img ]] && return
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$img.tmp" "${vgib}G"
    local extent=$((32 << 20))
    local n
    n=$(awk -v d="$dgib" -v e=$extent 'BEGIN {printf "%d", d * 1073741824 / e}')
    local stride=$(((vgib << 30) / n / extent * extent))
    local cmds=() i
    for ((i = 0; i < n; i++)); do
        cmds+=(-c "write -P $((i % 250 + 1)) $((i * stride)) $extent")
    done
    # In batches: qemu-io handles many -c per invocation.
    local b
    for ((b = 0; b < ${#cmds[@]}; b += 256)); do
        qemu-io -f qcow2 "${cmds[@]:b:256}" "$img.tmp" >/dev/null
    done
    mv "$img.tmp" "$img"
}

printf '\n%-22s %9s %9s %9s   %9s %9s %9s   %6s %6s %6s\n' image \
    q-create q-apply q-delete d-create d-apply d-delete r-c r-a r-d
for spec in $SIZES; do
    vgib=${spec%%:*}
    dgib=${spec##*:}
    img=$WORK/v${vgib}g-d${dgib}g.qcow2
    make_image "$img" "$vgib" "$dgib"
    qc=() qa=() qd=() dc=() da=() dd=()
    for ((r = 0; r < RUNS; r++)); do
        # Same sequence for both tools: create, a guest write, apply, delete; each checked
        # (outside the timing) to have done what it should.
        time_into qc qemu-img snapshot -c "q$r" "$img"
        has_snapshot "$img" "q$r" 1
        qemu-io -f qcow2 -c "write -P 0x77 0 1M" "$img" >/dev/null
        time_into qa qemu-img snapshot -a "q$r" "$img"
        holds_pattern "$img" 1
        time_into qd qemu-img snapshot -d "q$r" "$img"
        has_snapshot "$img" "q$r" 0
        time_into dc "$BIN" create "$img" "d$r"
        has_snapshot "$img" "d$r" 1
        qemu-io -f qcow2 -c "write -P 0x78 0 1M" "$img" >/dev/null
        time_into da "$BIN" apply "$img" "d$r"
        holds_pattern "$img" 1
        time_into dd "$BIN" delete "$img" "d$r"
        has_snapshot "$img" "d$r" 0
    done
    qemu-img check -q "$img"
    m() { echo "$@" | median; }
    Qc=$(m "${qc[@]}") Qa=$(m "${qa[@]}") Qd=$(m "${qd[@]}")
    Dc=$(m "${dc[@]}") Da=$(m "${da[@]}") Dd=$(m "${dd[@]}")
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }
    printf '%-22s %7sms %7sms %7sms   %7sms %7sms %7sms   %6s %6s %6s\n' \
        "${vgib}G/${dgib}G" "$Qc" "$Qa" "$Qd" "$Dc" "$Da" "$Dd" \
        "$(ratio "$Dc" "$Qc")" "$(ratio "$Da" "$Qa")" "$(ratio "$Dd" "$Qd")"
done
echo "(medians of $RUNS runs, warm page cache; r-* = domsnap / qemu-img)"
