#!/usr/bin/env bash
# Starts a throw-away single-node Ceph (1 mon, 1 mgr, 1 osd with bluestore on a sparse file,
# and radosgw) on 127.0.0.1, without systemd, for domsnap's tests and benchmarks.
#
#   tests/ceph-lab/up.sh DIR        # DIR must not exist; prints nothing but errors
#   . DIR/env                       # CEPH_CONF, DOMSNAP_RADOS_POOL (a pool), DOMSNAP_S3_*
#                                   # (radosgw's endpoint, a bucket, a user's keys)
#   tests/ceph-lab/down.sh DIR      # stops every daemon by its recorded pid, deletes DIR
#
# Ports: PORT (default 3300) for the monitor's v2 protocol, PORT+1 for v1, PORT+2 for
# radosgw's S3 endpoint; the mgr and osd take free ports of their own. Authentication is
# off: the cluster listens on loopback only and lives as long as the tests.
# Needs Debian's ceph-mon ceph-mgr ceph-osd ceph-common radosgw uuid-runtime curl
# (tests/setup.sh installs them).
set -euo pipefail
D=${1:?usage: up.sh DIR}
PORT=${PORT:-3300}
RGW_PORT=$((PORT + 2))
[ -e "$D" ] && { echo "up.sh: $D exists; run down.sh $D first" >&2; exit 1; }
mkdir -p "$D"/{run,log,mon.a,mgr.x,osd.0,client.rgw.0}
D=$(cd "$D" && pwd)
export CEPH_CONF=$D/ceph.conf
FSID=$(uuidgen)
MON="[v2:127.0.0.1:$PORT,v1:127.0.0.1:$((PORT + 1))]"
cat > "$CEPH_CONF" <<EOF
[global]
fsid = $FSID
mon host = $MON
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
mon data = $D/\$name
mgr data = $D/\$name
osd data = $D/\$name
keyring = $D/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mon warn on insecure global id reclaim allowed = false
mon warn on insecure global id reclaim = false
mon max pg per osd = 1000
ms mon client mode = crc
osd objectstore = bluestore
bluestore block path = $D/osd.0/block.img
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 1073741824
bluestore cache autotune = false
bluestore cache size = 268435456
mgr initial modules = iostat
EOF
log() { echo "up.sh: $*" >&2; }
fail() { log "$*; logs in $D/log"; exit 1; }
# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s; fails at once, showing its
# output, if a daemon started so far has exited.
wait_for() {
  local limit=$(( $1 * 5 )) what=$2 i=0 p; shift 2
  until "$@" >/dev/null 2>&1; do
    for p in "$D"/run/*.pid; do
      [ -e "$p" ] || continue
      kill -0 "$(cat "$p")" 2>/dev/null || {
        local name; name=$(basename "$p" .pid)
        fail "$name exited while waiting for $what: $(tail -c 2000 "$D/log/$name.out")"
      }
    done
    i=$((i + 1)); [ $i -le $limit ] || fail "timed out waiting for $what"; sleep 0.2
  done
}
# start NAME BINARY ARGS...: runs a daemon in the foreground mode, in the background.
start() {
  local name=$1; shift
  nohup "$@" -f > "$D/log/$name.out" 2>&1 &
  echo $! > "$D/run/$name.pid"
}
ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "$MON" "$D/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring" > "$D/log/mon-mkfs.out" 2>&1 \
  || fail "ceph-mon --mkfs failed"
start mon.a ceph-mon -i a
wait_for 60 "the monitor" ceph --connect-timeout 2 mon stat
start mgr.x ceph-mgr -i x
OSD_UUID=$(uuidgen)
ID=$(ceph osd new "$OSD_UUID")
ceph-osd -i "$ID" --mkfs --osd-uuid "$OSD_UUID" > "$D/log/osd-mkfs.out" 2>&1 \
  || fail "ceph-osd --mkfs failed"
start "osd.$ID" ceph-osd -i "$ID"
osd_up() { ceph osd dump | grep -q "^osd.$ID up"; }
wait_for 120 "osd.$ID" osd_up
start rgw.0 radosgw -n client.rgw.0 --rgw-frontends "beast endpoint=127.0.0.1:$RGW_PORT" \
  --rgw-data "$D/client.rgw.0"
ceph osd pool create domsnap 32 >/dev/null 2>&1
ceph osd pool application enable domsnap rados >/dev/null 2>&1
ceph osd pool create rbd 8 >/dev/null 2>&1
rbd pool init rbd
wait_for 120 "radosgw" curl -s -o /dev/null "http://127.0.0.1:$RGW_PORT/"
radosgw-admin user create --uid=domsnap --display-name=domsnap --access-key=DOMSNAPTESTKEY \
  --secret-key=DOMSNAPTESTSECRET >/dev/null 2>&1 || fail "radosgw-admin user create failed"
# The bucket the S3 tests use (each test under a key prefix of its own): a SigV4-signed PUT.
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
curl -s -f -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user DOMSNAPTESTKEY:DOMSNAPTESTSECRET \
  -H "x-amz-content-sha256: $EMPTY_SHA256" -o /dev/null "http://127.0.0.1:$RGW_PORT/domsnap" \
  || fail "cannot create the S3 bucket domsnap"
pgs_clean() {
  local n
  n=$(ceph osd pool ls detail | grep -o 'pg_num [0-9]*' | awk '{s+=$2} END {print s}')
  ceph pg stat | grep -q "^$n pgs: $n active+clean;"
}
wait_for 180 "every placement group active+clean" pgs_clean
cat > "$D/env" <<EOF
export CEPH_CONF=$CEPH_CONF
export DOMSNAP_RADOS_POOL=domsnap
export DOMSNAP_S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
export DOMSNAP_S3_BUCKET=domsnap
export DOMSNAP_S3_ACCESS_KEY=DOMSNAPTESTKEY
export DOMSNAP_S3_SECRET_KEY=DOMSNAPTESTSECRET
EOF
