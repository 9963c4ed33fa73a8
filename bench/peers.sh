#!/usr/bin/env bash
# make bench-peers: edgehook beside the peers of ../shared/bench/peers on the same
# MQTT -> webhook work (system under test) and on inbound hooks (beside adnanh/webhook).
#   bash bench/peers.sh            full run (3 repetitions, ~10 min; the first run also
#                                  installs the peers under $PB, default /tmp/peerbench)
#   bash bench/peers.sh --quick    smoke run
# Every other argument goes to the harness (bench.py --help). The harness prints the
# tables with every figure as a ratio to the bare paho+requests loop of the same
# repetition; results.{md,json} land in $PB/results/<timestamp>/.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS_DIR=${PEERS_DIR:-$REPO/../shared/bench/peers}
RUN_SH=$PEERS_DIR/run.sh
[ -f "$RUN_SH" ] || { echo "bench/peers.sh: no harness at $RUN_SH (set PEERS_DIR)" >&2; exit 1; }
EDGEHOOK=$REPO/.venv/bin/edgehook
[ -x "$EDGEHOOK" ] || { echo "bench/peers.sh: $EDGEHOOK missing: run make first" >&2; exit 1; }

# Each start gets a fresh state directory (the harness starts the command several
# times; $$ is the pid of the harness's `bash -c`, which execs into edgehook).
STATE_ROOT=${BENCH_STATE_ROOT:-/var/tmp/edgehook-bench-state}  # a real disk: fsyncs cost what they cost
rm -rf "$STATE_ROOT"
mkdir -p "$STATE_ROOT"
trap 'rm -rf "$STATE_ROOT"' EXIT

SUT="edgehook|bench/edgehook|env BENCH_STATE=$STATE_ROOT/out-\$\$ $EDGEHOOK run -c $REPO/bench/edgehook-peer.yaml"
# The durable floor: the bare loop that first fsyncs each message (bench/baseline_durable.py),
# once with an fdatasync'd append and once with a plain SQLite synchronous=FULL insert.
# What durability itself costs on this disk; edgehook's latency is read beside it.
FLOOR="$REPO/.venv/bin/python $REPO/bench/baseline_durable.py"
ARGS=(--sut "$SUT"
      --sut "durable-file|bench/durable-file|env BENCH_DURABLE=file BENCH_STATE=$STATE_ROOT/df-\$\$ $FLOOR"
      --sut "durable-sqlite|bench/durable-sqlite|env BENCH_DURABLE=sqlite BENCH_STATE=$STATE_ROOT/ds-\$\$ $FLOOR")
if grep -q '"/hooks/' "$REPO/daemon/edgehook/api.py"; then
  # the harness gives an inbound system BENCH_HTTP_PORT; our config reads BENCH_EDGEHOOK_HTTP
  INB="edgehook-sync|/hooks/relay|env BENCH_STATE=$STATE_ROOT/in-\$\$ BENCH_EDGEHOOK_HTTP=127.0.0.1:\$BENCH_HTTP_PORT $EDGEHOOK run -c $REPO/bench/edgehook-peer-hook.yaml"
  ARGS+=(--inbound "$INB")
fi
echo "bench/peers.sh: $(date -Is) $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores" >&2
bash "$RUN_SH" "${ARGS[@]}" "$@"
