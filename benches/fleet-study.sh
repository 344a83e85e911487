#!/usr/bin/env bash
# The fleet scale study: the real coordinator as many Sluice instances (one process, each with
# its own pools, port and coordination session) sharing one budget through one PostgreSQL,
# under load that moves between them. Writes benches/FLEET.md's measurements.
#
#   bash benches/fleet-study.sh                          # 50 instances, budget 400, 10 s phases
#   bash benches/fleet-study.sh --instances 10 --budget 60 --phase-secs 3   # a quick look
#   bash benches/fleet-study.sh --out /tmp/fleet.md
#
# Starts a throwaway PostgreSQL (max_connections budget + 50, log_connections and
# log_disconnections on, so that the server's own count of connections open at once can be
# rebuilt), builds benches' fleet_study in release mode and runs it (see its source for what
# each column means). Everything runs on this machine over 127.0.0.1: the clients, the
# instances and PostgreSQL share its CPUs. Exits non-zero if the server's own log shows more
# connections open at once than the budget.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=../deploy/local/lib.sh
source deploy/local/lib.sh

INSTANCES=50 BUDGET=400 PHASE_SECS=10 INTERVAL_MS=1000 OUT=
while [[ $# -gt 0 ]]; do
    case $1 in
    --instances) INSTANCES=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --phase-secs) PHASE_SECS=$2; shift 2 ;;
    --fleet-interval-ms) INTERVAL_MS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) sl_die "unknown argument $1 (see the top of $0)" ;;
    esac
done

sl_raise_nofile
sl_pick_run_user
cargo build --release -q -p sluice-benches --bin fleet_study
tmp=$(mktemp -d -t sluice-bench.XXXXXX)
sl_give "$tmp"
trap 'sl_pg_stop; rm -rf "$tmp"' EXIT
sl_pg_start "$tmp/pg" "$((BUDGET + 50))" "log_connections = on" "log_disconnections = on" \
    "log_line_prefix = '%m [%p] '" "shared_buffers = '64MB'"
sl_psql postgres "CREATE ROLE study LOGIN PASSWORD 'study-pw'"
sl_psql postgres "CREATE DATABASE study OWNER study"
report=$(target/release/fleet_study \
    --upstream "postgres://study:study-pw@127.0.0.1:$SL_PG_PORT/study" \
    --superuser "postgres://postgres:$SL_PG_SUPERPW@127.0.0.1:$SL_PG_PORT/study" \
    --pg-log "$SL_PG_LOG" --instances "$INSTANCES" --budget "$BUDGET" \
    --phase-secs "$PHASE_SECS" --fleet-interval-ms "$INTERVAL_MS")
printf '%s\n' "$report"
if [[ -n $OUT ]]; then
    {
        echo "$INSTANCES instances, budget $BUDGET, fleet_interval ${INTERVAL_MS} ms, ${PHASE_SECS} s phases ($(date -u +%Y-%m-%d), $(nproc) CPUs):"
        echo
        printf '%s\n' "$report"
    } >"$OUT"
fi
