#!/usr/bin/env bash
# domsnap's memory figures beside their references, in one run, on the same bytes.
#
#   benches/compare.sh [RUNS]        (default 5; medians of RUNS runs)
#
# Needs: a release build of domsnap (DOMSNAP_BIN, default $CARGO_TARGET_DIR/release/domsnap
# or target/release/domsnap), python3, dd, and restic (Debian: apt-get install restic).
# SIZE_MIB sets the domain's memory (default 1024). Work files go to BENCH_DIR (default: the
# target directory), on the disk the store would use, not a tmpfs.
#
# Rows (each a whole command, timed as a process):
#   1. full checkpoint of a running domain whose memory is random, vs dd oflag=direct of
#      the same bytes (goal: >= 0.9 x dd's throughput);
#   2. the same with memory-like memory (40% zero pages, 10% duplicate pages, 50% random),
#      vs dd and restic backup --stdin (goal: faster than dd);
#   3. a second checkpoint after 5% of the pages changed at random: time vs the full one
#      (goal <= 0.25 x) and bytes written to the state directory (packs, manifests, the
#      journal's files) vs the changed bytes (goal <= 1.3 x); restic's repository growth;
#   4. the pause window of the full checkpoint (history --json pause_ms) vs the time to
#      read the memory once (goal <= 1.1 x);
#   5. revert to the full checkpoint with the store's files evicted from the page cache,
#      vs a cold dd iflag=direct read of the image and restic dump (goal <= 1.5 x the cold
#      read, faster than restic).
# If benches/commands.sh exists (whole-command figures of the journal and disk commands),
# its rows are printed after these.
set -euo pipefail

RUNS=${1:-5}
SIZE_MIB=${SIZE_MIB:-1024}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
BIN=${DOMSNAP_BIN:-$target/release/domsnap}
BENCH_DIR=${BENCH_DIR:-$target}

die() { echo "compare.sh: $*" >&2; exit 1; }
[ -x "$BIN" ] || die "no domsnap binary at $BIN (cargo build --release -p domsnap, or set DOMSNAP_BIN)"
command -v restic >/dev/null || die "restic is missing (Debian: apt-get install restic)"
command -v python3 >/dev/null || die "python3 is missing"
LOAD=${SIM_LOAD_MEMORY:-$target/release/examples/sim-load-memory}
[ -x "$LOAD" ] || die "no $LOAD (cargo build --release -p xen --example sim-load-memory)"

mkdir -p "$BENCH_DIR"
WORK=$(mktemp -d "$BENCH_DIR/compare.XXXXXX")
cleanup() {
    for s in "$WORK"/state*; do
        [ -d "$s" ] && "$BIN" --state "$s" domain destroy d >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
export RESTIC_PASSWORD=compare

now() { date +%s.%N; }
# Runs a command, prints its wall time in seconds; a failing command stops the script.
timed() {
    local start end
    start=$(now)
    if ! "$@" >"$WORK/last.out" 2>&1; then
        cat "$WORK/last.out" >&2
        die "failed: $*"
    fi
    end=$(now)
    python3 -c "print(f'{$end - $start:.4f}')"
}
median() { python3 -c "import sys,statistics; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }
# Evicts files from the page cache (posix_fadvise DONTNEED), so the next read is cold.
evict() { python3 - "$@" <<'EOF'
import os, sys
for top in sys.argv[1:]:
    for dirpath, _, files in os.walk(top) if os.path.isdir(top) else [(os.path.dirname(top), [], [os.path.basename(top)])]:
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
EOF
}

# The same bytes for every row: random, memory-like, and memory-like with 5% changed.
python3 - "$WORK" "$SIZE_MIB" <<'EOF'
import os, random, sys
work, mib = sys.argv[1], int(sys.argv[2])
page = 4096
pages = mib * 1024 * 1024 // page
rng = random.Random(1)
with open(os.path.join(work, "random.bin"), "wb") as f:
    for _ in range(mib):
        f.write(os.urandom(1 << 20))
mem = bytearray(pages * page)
for p in range(pages):
    r = rng.randrange(10)
    if r < 4:
        continue
    if r == 4 and p > 0:
        q = rng.randrange(p)
        mem[p * page:(p + 1) * page] = mem[q * page:(q + 1) * page]
    else:
        mem[p * page:(p + 1) * page] = os.urandom(page)
open(os.path.join(work, "memlike.bin"), "wb").write(mem)
changed = set()
while len(changed) < pages // 20:
    changed.add(rng.randrange(pages))
for p in changed:
    mem[p * page:(p + 1) * page] = os.urandom(page)
open(os.path.join(work, "memlike5.bin"), "wb").write(mem)
open(os.path.join(work, "changed_bytes"), "w").write(str(len(changed) * page))
EOF
CHANGED=$(cat "$WORK/changed_bytes")

# A state directory with a running (idle) domain `d` whose memory holds FILE.
domain_with() {
    local state=$1 file=$2
    "$BIN" --state "$state" domain define d --memory "${SIZE_MIB}M" --disk 64M --workload idle >/dev/null
    "$BIN" --state "$state" domain start d >/dev/null
    load_memory "$state" "$file"
}
# Memory is written through the guest, as its vCPU would write it (so the host's
# dirty-page log sees it), then synced.
load_memory() {
    "$LOAD" "$1" d "$2"
    sync "$1/sim/domains/d/memory"
}
state_bytes() { du -sb "$1/memory" "$1/journal" | awk '{s += $1} END {print s}'; }
pause_ms() {
    "$BIN" --state "$1" --json history d | python3 -c '
import json, sys
ops = [o for o in json.load(sys.stdin) if o["kind"] == "create" and o["snapshot"] == sys.argv[1]]
print(ops[-1]["pause_ms"] / 1000)' "$2"
}

declare -A T
add() { T[$1]="${T[$1]:-} $2"; }

for run in $(seq "$RUNS"); do
    echo "run $run of $RUNS" >&2
    # 1. random memory
    s="$WORK/state-r$run"
    domain_with "$s" "$WORK/random.bin"
    add full_random "$(timed "$BIN" --state "$s" create d full)"
    add dd_random "$(timed dd if="$WORK/random.bin" of="$WORK/dd.out" bs=1M oflag=direct status=none)"
    "$BIN" --state "$s" domain destroy d >/dev/null
    rm -rf "$s" "$WORK/dd.out"

    # 2-5. memory-like memory
    s="$WORK/state-m$run"
    domain_with "$s" "$WORK/memlike.bin"
    add read_once "$(timed cat "$s/sim/domains/d/memory")"
    add full_memlike "$(timed "$BIN" --state "$s" create d full)"
    add pause "$(pause_ms "$s" full)"
    add dd_memlike "$(timed dd if="$WORK/memlike.bin" of="$WORK/dd.out" bs=1M oflag=direct status=none)"
    rm -f "$WORK/dd.out"
    repo="$WORK/restic-$run"
    restic -r "$repo" init >/dev/null 2>&1
    add restic_backup "$(timed restic -r "$repo" backup --stdin --stdin-filename memory <"$WORK/memlike.bin")"
    repo_before=$(du -sb "$repo" | cut -f1)

    load_memory "$s" "$WORK/memlike5.bin"
    before=$(state_bytes "$s")
    add delta "$(timed "$BIN" --state "$s" create d delta)"
    after=$(state_bytes "$s")
    add delta_bytes "$((after - before))"
    restic -r "$repo" backup --stdin --stdin-filename memory <"$WORK/memlike5.bin" >/dev/null 2>&1
    add restic_delta_bytes "$(($(du -sb "$repo" | cut -f1) - repo_before))"

    evict "$s/memory" "$WORK/memlike.bin" "$repo"
    add cold_read "$(timed dd if="$WORK/memlike.bin" of=/dev/null bs=1M iflag=direct status=none)"
    add revert "$(timed "$BIN" --state "$s" revert d full)"
    evict "$repo"
    add restic_dump "$(timed restic -r "$repo" dump latest memory)"
    "$BIN" --state "$s" domain destroy d >/dev/null
    rm -rf "$s" "$repo"
done

m() { median ${T[$1]}; }
full_random=$(m full_random); dd_random=$(m dd_random)
full_memlike=$(m full_memlike); dd_memlike=$(m dd_memlike); restic_backup=$(m restic_backup)
delta=$(m delta); delta_bytes=$(m delta_bytes); restic_delta_bytes=$(m restic_delta_bytes)
pause=$(m pause); read_once=$(m read_once)
revert=$(m revert); cold_read=$(m cold_read); restic_dump=$(m restic_dump)
met() { python3 -c "print('met' if $1 else 'NOT met')"; }

echo
echo "domsnap memory figures, ${SIZE_MIB} MiB domain, medians of $RUNS runs ($(date -u +%F), $(nproc) cores)"
echo
echo "| what | domsnap | reference | ratio | goal |"
echo "|---|---|---|---|---|"
r=$(ratio "$dd_random" "$full_random")
echo "| full checkpoint, random memory | ${full_random} s | dd oflag=direct ${dd_random} s | $r x dd throughput | >= 0.9: $(met "$r >= 0.9") |"
r=$(ratio "$full_memlike" "$dd_memlike")
echo "| full checkpoint, memory-like | ${full_memlike} s | dd ${dd_memlike} s, restic backup ${restic_backup} s | $r x dd's time, $(ratio "$full_memlike" "$restic_backup") x restic's | < 1: $(met "$r < 1") |"
r=$(ratio "$delta" "$full_memlike")
b=$(ratio "$delta_bytes" "$CHANGED")
echo "| 5% of pages changed | ${delta} s, $(mib "$delta_bytes") MiB written | full ${full_memlike} s; $(mib "$CHANGED") MiB changed; restic $(mib "$restic_delta_bytes") MiB | $r x time, $b x changed bytes (restic $(ratio "$restic_delta_bytes" "$CHANGED") x) | <= 0.25: $(met "$r <= 0.25"); <= 1.3: $(met "$b <= 1.3") |"
r=$(ratio "$pause" "$read_once")
echo "| pause window of the full checkpoint | ${pause} s | read the memory once ${read_once} s | $r x | <= 1.1: $(met "$r <= 1.1") |"
r=$(ratio "$revert" "$cold_read")
echo "| revert (verify + restore) | ${revert} s | cold read ${cold_read} s, restic dump ${restic_dump} s | $r x cold read, $(ratio "$revert" "$restic_dump") x restic | <= 1.5: $(met "$r <= 1.5"); < restic: $(met "$revert < $restic_dump") |"

if [ -x "$here/commands.sh" ]; then
    echo
    "$here/commands.sh" "$RUNS"
fi
