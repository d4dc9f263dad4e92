#!/usr/bin/env bash
# Stops the daemons that up.sh started in DIR (by their recorded pids: nothing else is
# touched) and deletes DIR.   tests/ceph-lab/down.sh DIR    (KEEP=1 keeps DIR, e.g. its logs)
D=${1:?usage: down.sh DIR}
[ -d "$D/run" ] || exit 0
pids=$(cat "$D"/run/*.pid 2>/dev/null || true)
[ -n "$pids" ] && kill $pids 2>/dev/null
for _ in $(seq 100); do                      # up to 10 s for a clean exit
  alive=0
  for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 0.1
done
for p in $pids; do kill -9 "$p" 2>/dev/null; done
rm -f "$D"/run/*.pid
[ "${KEEP:-0}" = 1 ] || rm -rf "$D"
exit 0
