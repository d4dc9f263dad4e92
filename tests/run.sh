#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace —
# unit tests, qemu-img interop, CLI scenarios, crash tests (failpoints), the Ceph store
# backends against a real single-node Ceph (tests/ceph-lab/) and the real-Xen lab test (Xen
# 4.17 booted under QEMU) — in one release build.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
exec cargo test --release --workspace --features domsnap/failpoints,domsnap/xen,store/rados,store/s3 "$@"
