#!/usr/bin/env bash
# Object store backends against the cluster's own benchmark, in one run on one cluster:
# `rados bench` write and seq (OBJECT_SIZE objects, 16 in flight) vs domsnap's RADOS and S3
# backends writing and reading the same number of objects of the same size
# (store/examples/throughput.rs). Starts a throw-away single-node Ceph (tests/ceph-lab/)
# unless DOMSNAP_TEST_CEPH names a running one.
#
#   benches/store-vs-rados-bench.sh [OBJECT_SIZE_MIB=4] [SECONDS=20] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-4}; SECS=${2:-20}; RUNS=${3:-3}
: "${CARGO_TARGET_DIR:=target}"
cargo build --release -q -p store --features rados,s3 --example throughput
BIN=$CARGO_TARGET_DIR/release/examples/throughput
if [ -n "${DOMSNAP_TEST_CEPH:-}" ]; then
  D=$DOMSNAP_TEST_CEPH
else
  D=$(mktemp -d /tmp/domsnap-bench-ceph.XXXXXX); rmdir "$D"
  trap 'tests/ceph-lab/down.sh "$D"' EXIT
  PORT=${PORT:-23300} tests/ceph-lab/up.sh "$D"
fi
. "$D/env"
for run in $(seq "$RUNS"); do
  w=$(rados bench -p "$DOMSNAP_RADOS_POOL" "$SECS" write -b $((MIB << 20)) -t 16 --no-cleanup \
      2>/dev/null | awk '/^Total writes made/ {n=$4} /^Bandwidth/ {bw=$3} END {print n, bw}')
  objects=${w% *}; wbw=${w#* }
  rbw=$(rados bench -p "$DOMSNAP_RADOS_POOL" "$SECS" seq -t 16 2>/dev/null \
      | awk '/^Bandwidth/ {print $3}')
  rados -p "$DOMSNAP_RADOS_POOL" cleanup >/dev/null 2>&1
  echo "run $run: rados bench ${MIB} MiB x $objects: write $wbw MB/s, seq $rbw MB/s"
  "$BIN" rados "$DOMSNAP_RADOS_POOL" "bench-$run-$$" "${MIB}M" "$objects" 16
  "$BIN" s3 "$DOMSNAP_S3_ENDPOINT" "$DOMSNAP_S3_BUCKET" "bench-$run-$$" "${MIB}M" \
    "$(( objects < 256 ? objects : 256 ))" 16
done
