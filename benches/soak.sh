#!/usr/bin/env bash
# Soak: 10,000 connected clients through one Sluice for 10 minutes, most of them holding idle
# connections, with connection churn and writes beside them; Sluice's memory must stay flat and
# nothing may be left behind on the server.
#
#   bash benches/soak.sh                                 # 10 minutes (about 12 in all)
#   bash benches/soak.sh --minutes 2 --clients 2000      # shorter
#   bash benches/soak.sh --bin-dir target/release --out /tmp/soak.md
#
# Starts a throwaway PostgreSQL (max_connections 100, fsync off) and a Sluice in front of it
# (release build; pool and budget 20, max_client_connections 12,000, everything else default),
# then three sluice-loadtest processes at once:
#
#   holds   CLIENTS warm function containers, connected before the run and kept connected, running
#           point reads at 50 invocations/s among them (most sit idle the whole run: idle holds)
#   churn   a new connection per invocation (cold model), 50/s: ~30,000 logins and hang-ups in
#           10 minutes
#   writes  warm containers writing at 20/s, every acknowledged write checked afterwards on a
#           direct connection (none lost, none duplicated)
#
# Every 10 s it samples Sluice's RSS and open descriptors, its client and server connection
# gauges, and on PostgreSQL the connections of the benchmark role by state. Reported: the
# timeline, RSS growth from the first sample with every hold connected to the end, the loadgen
# reports, and at the end (load stopped) what is left: server connections of the role, any of them
# `idle in transaction` or `active`, Sluice's client gauge.
#
# Exits non-zero when a write was lost or duplicated, a transaction was left open on the server,
# more server connections than the budget were seen, Sluice's RSS grew by more than 10 % (plus
# 8 MiB) between the first full sample and the last, or a load generator failed.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash benches/soak.sh [--minutes M] [--clients N] [--out FILE] [--bin-dir DIR]

  --minutes M    length of the run (default 10)
  --clients N    warm clients holding connections (default 10000)
  --out FILE     also write the Markdown report to FILE
  --bin-dir DIR  use the sluice and sluice-loadtest binaries in DIR instead of building them
EOF
}

CMDLINE="bash benches/soak.sh${*:+ $*}"
MINUTES=10 CLIENTS=10000 OUT='' BIN_DIR=''
while [[ $# -gt 0 ]]; do
    case $1 in
        --minutes) MINUTES=${2:?}; shift ;;
        --clients) CLIENTS=${2:?}; shift ;;
        --out) OUT=${2:?}; shift ;;
        --bin-dir) BIN_DIR=${2:?}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
for v in "$MINUTES" "$CLIENTS"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "expected a positive number, got '$v'" >&2; exit 2; }
done
[[ -z $OUT ]] || OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/lib.sh"

PG_MAX_CONNECTIONS=100
BUDGET=20
HOLD_RATE=50
CHURN_RATE=50
WRITE_RATE=20
SAMPLE=10 # seconds between samples
BENCH_USER=soak
BENCH_DB=soakdb
BENCH_PW=soak-pw-$RANDOM$RANDOM
WORK=
LOAD_PIDS=()
STARTED_PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${LOAD_PIDS[@]}"; do sl_stop_pid "$pid" TERM 2; done
    sl_sluice_stop
    sl_pg_stop
    sl_left_behind "$WORK" "${STARTED_PIDS[@]}" || { [[ $rc -ne 0 ]] || rc=1; }
    exit "$rc"
}
sl_traps cleanup

sl_header "Setup"
sl_need_pkg '/usr/lib/postgresql/*/bin/initdb' postgresql
sl_need_pkg curl curl
sl_need_pkg jq jq
sl_need_pkg setpriv util-linux
sl_need_pkg pgrep procps
sl_build "$BIN_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-soak.XXXXXX")
chmod 711 "$WORK"
cd "$WORK"
sl_pick_run_user
sl_raise_nofile
(($(ulimit -Sn) >= CLIENTS + 1000)) || # per process: Sluice, the holds generator
    sl_die "--clients $CLIENTS needs $((CLIENTS + 1000)) open files per process; the limit is $(ulimit -Sn)"

sl_pg_start "$WORK/pg" "$PG_MAX_CONNECTIONS"
STARTED_PIDS+=("$SL_PG_PID")
sl_psql postgres "SET password_encryption = 'scram-sha-256';
    CREATE ROLE $BENCH_USER LOGIN PASSWORD '$BENCH_PW'" >/dev/null
sl_psql postgres "CREATE DATABASE $BENCH_DB OWNER $BENCH_USER" >/dev/null
DIRECT_URL="postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_PG_PORT/$BENCH_DB"
"$SL_LOADTEST" --setup-only --rows 1000 "$DIRECT_URL" >"$WORK/setup.log" 2>&1 || {
    cat "$WORK/setup.log" >&2
    sl_die "sluice-loadtest --setup-only failed"
}
SLUICE_UPSTREAM="$DIRECT_URL" SLUICE_MAX_CLIENT_CONNECTIONS=$((CLIENTS + 2000)) \
    sl_sluice_start "$WORK/sluice.log" --pool-size "$BUDGET" --max-server-connections "$BUDGET"
STARTED_PIDS+=("$SL_SLUICE_PID")
PROXY_URL="postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_SLUICE_PORT/$BENCH_DB"
sl_info "PostgreSQL on 127.0.0.1:$SL_PG_PORT, Sluice on 127.0.0.1:$SL_SLUICE_PORT (pid $SL_SLUICE_PID)"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$SL_SLUICE_PID/status"; }
fds() { find "/proc/$SL_SLUICE_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
# pg_states: the benchmark role's server connections, as "total idle_in_tx active".
pg_states() {
    sl_psql postgres "SELECT count(*), count(*) FILTER (WHERE state LIKE 'idle in transaction%'),
        count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity WHERE usename = '$BENCH_USER'" |
        tr '|' ' '
}

SECS=$((MINUTES * 60))
BASE_RSS=$(rss_kib)
sl_header "Load: $CLIENTS held clients, churn $CHURN_RATE/s, writes $WRITE_RATE/s, ${MINUTES} min"
"$SL_LOADTEST" --quiet --model warm --containers "$CLIENTS" --max-concurrency "$CLIENTS" \
    --profile constant --rate "$HOLD_RATE" --duration "${SECS}s" --timeout 120s --workload point-read \
    --no-verify --json "$WORK/holds.json" "$PROXY_URL" </dev/null >"$WORK/holds.txt" 2>"$WORK/holds.err" &
LOAD_PIDS+=($!)
"$SL_LOADTEST" --quiet --model cold --profile constant --rate "$CHURN_RATE" --duration "${SECS}s" \
    --workload point-read --no-verify --json "$WORK/churn.json" "$PROXY_URL" \
    </dev/null >"$WORK/churn.txt" 2>"$WORK/churn.err" &
LOAD_PIDS+=($!)
"$SL_LOADTEST" --quiet --model warm --containers 10 --profile constant --rate "$WRITE_RATE" \
    --duration "${SECS}s" --workload write --verify-url "$DIRECT_URL" --json "$WORK/writes.json" \
    "$PROXY_URL" </dev/null >"$WORK/writes.txt" 2>"$WORK/writes.err" &
LOAD_PIDS+=($!)
STARTED_PIDS+=("${LOAD_PIDS[@]}")

T0=$(date +%s)
printf 'secs rss_kib fds clients_idle clients_active clients_waiting servers pg_total pg_idle_in_tx pg_active\n' >"$WORK/samples"
max_pg=0
while :; do
    alive=0
    for pid in "${LOAD_PIDS[@]}"; do sl_alive "$pid" && alive=1; done
    read -r pg_total pg_itx pg_act < <(pg_states)
    ((pg_total > max_pg)) && max_pg=$pg_total
    printf '%s %s %s %s %s %s %s %s %s %s\n' $(($(date +%s) - T0)) "$(rss_kib)" "$(fds)" \
        "$(sl_metric sluice_client_connections 'state="idle"')" \
        "$(sl_metric sluice_client_connections 'state="active"')" \
        "$(sl_metric sluice_client_connections 'state="waiting"')" \
        "$(sl_metric sluice_server_connections)" "$pg_total" "$pg_itx" "$pg_act" >>"$WORK/samples"
    ((alive)) || break
    sleep "$SAMPLE"
done
FAIL=()
for pid in "${LOAD_PIDS[@]}"; do
    wait "$pid" || FAIL+=("a load generator (pid $pid) exited with $?")
done
LOAD_PIDS=()
sleep 5
read -r end_total end_itx end_act < <(pg_states)
end_clients=$(sl_metric sluice_client_connections)
end_rss=$(rss_kib)

# The first sample with every hold connected (at least CLIENTS clients), and the last sample
# before the load ended.
read -r first_t first_rss < <(awk -v n="$CLIENTS" 'NR > 1 && $4 + $5 + $6 >= n { print $1, $2; exit }' "$WORK/samples")
read -r last_t last_rss < <(awk -v n="$CLIENTS" 'NR > 1 && $4 + $5 + $6 >= n { t = $1; r = $2 } END { print t, r }' "$WORK/samples")
[[ -n ${first_rss:-} ]] || { FAIL+=("the $CLIENTS holds never were all connected"); first_rss=0; last_rss=0; first_t=0; last_t=0; }
growth=$((last_rss - first_rss))
allowed=$((first_rss / 10 + 8192))
((growth <= allowed)) || FAIL+=("RSS grew by $growth KiB between ${first_t}s and ${last_t}s (allowed $allowed)")
((max_pg <= BUDGET)) || FAIL+=("$max_pg server connections of the role seen, over the budget of $BUDGET")
((end_itx == 0)) || FAIL+=("$end_itx transactions left open on the server")
((end_act == 0)) || FAIL+=("$end_act server connections still active after the load")

report_line() { # NAME: one load generator's figures
    jq -r --arg n "$1" '"| \($n) | \(.counts.invocations) | \(.counts.succeeded) | \(.counts.failed) \(.counts.by_error | if length > 0 then tostring else "" end) | \(.latency_ms.p50 * 10 | round / 10) | \(.latency_ms.p99 * 10 | round / 10) | \(if .verification then "\(.verification.lost) / \(.verification.duplicated) of \(.verification.checked)" else "-" end) |"' "$WORK/$1.json" 2>/dev/null || echo "| $1 | (no report) | | | | | |"
}
for f in writes; do
    lost=$(jq -r 'if .verification == null or .verification.error != null then 1 else .verification.lost + .verification.duplicated end' "$WORK/$f.json" 2>/dev/null || echo 1)
    ((lost == 0)) || FAIL+=("$lost writes lost or duplicated")
done

{
    echo "## Soak: $CLIENTS clients, ${MINUTES} minutes ($(date -u +%Y-%m-%d))"
    echo
    echo "\`$CMDLINE\` — Sluice $("$SL_SLUICE" --version | awk '{print $2}') ($(cd "$SL_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)), $(nproc) CPUs shared by PostgreSQL, Sluice and the load generators."
    echo
    echo "| load | invocations | succeeded | failed | p50 ms | p99 ms | writes lost / duplicated |"
    echo "|---|---|---|---|---|---|---|"
    report_line holds
    report_line churn
    report_line writes
    echo
    echo "Sluice's RSS with every hold connected: $first_rss KiB at ${first_t}s, $last_rss KiB at ${last_t}s (growth $growth KiB), against $BASE_RSS KiB before the load: $(awk -v r="$first_rss" -v b="$BASE_RSS" -v n="$CLIENTS" 'BEGIN { printf "%.2f", (r - b) / n }') KiB per connected client; $end_rss KiB after the load."
    echo "Server connections of the role: at most $max_pg (budget $BUDGET); after the load $end_total, of them $end_itx idle in transaction and $end_act active. Sluice's clients after the load: $end_clients."
    echo
    echo "| s | RSS KiB | fds | clients idle | active | waiting | server conns | PG conns | PG idle in tx | PG active |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    awk -v every=$((60 / SAMPLE)) 'NR > 1 && ((NR - 2) % every == 0) { printf "| %s |", $1; for (i = 2; i <= NF; i++) printf " %s |", $i; print "" }' "$WORK/samples"
    echo
    if ((${#FAIL[@]} == 0)); then echo "Verdict: pass."; else printf 'Verdict: FAIL: %s\n' "${FAIL[@]}"; fi
} | tee "$WORK/report.md"
[[ -z $OUT ]] || cp "$WORK/report.md" "$OUT"
((${#FAIL[@]} == 0))
