#!/usr/bin/env bash
# End-to-end comparison of Sluice with PgBouncer (and PostgreSQL directly) under pgbench.
#
#   bash benches/compare.sh                      # 3 rounds of 10 s runs, scale 10 (~7 minutes)
#   bash benches/compare.sh --quick              # 1 round of 2 s runs, scale 1 (CI; < 1 minute)
#   bash benches/compare.sh --rounds 5 --duration 20 --out /tmp/results.md
#
# Starts a throwaway PostgreSQL (max_connections 60, SCRAM), PgBouncer (transaction pooling,
# default_pool_size 20, scram-sha-256 with the verifier copied from pg_authid) and Sluice (pool
# size 20, budget 20), initialises pgbench data directly, then runs each workload against each
# target. Each pooler runs only during its own runs (started fresh before, stopped after), so
# the server connections it keeps cannot take room from the other targets: 60 connections do
# not fit 50 direct clients next to two pools of 20. The order of the targets alternates between
# rounds. Reported per workload and target: medians over the rounds of tps, average latency, tps
# as a ratio to PgBouncer's in the same round, and the CPU seconds the pooler process used per
# 1,000 transactions (utime + stime from /proc/PID/stat); failed transactions and aborted
# clients are summed over the rounds. Prints a Markdown table (and writes it to --out FILE).
#
# Everything runs on this machine over 127.0.0.1, pgbench included, so the targets share the
# CPUs with the load generator: compare the targets with each other, not with other machines.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash benches/compare.sh [--quick] [--rounds N] [--duration SECONDS] [--scale N]
                               [--fanout-clients N] [--out FILE] [--bin-dir DIR]

  --quick            1 round of 2 s runs at scale 1 (a smoke test of this script, for CI)
  --rounds N         rounds; the order of the targets alternates between them (default 3)
  --duration S       seconds per pgbench run (default 10)
  --scale N          pgbench -i scale factor (default 10)
  --fanout-clients N clients of the fan-out workload (default 400)
  --out FILE         also write the Markdown report to FILE
  --bin-dir DIR      use the sluice and sluice-loadtest binaries in DIR (e.g. target/release)
                     instead of building them
EOF
}

ROUNDS=3 DURATION=10 SCALE=10 FANOUT=400 OUT='' BIN_DIR=''
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) ROUNDS=1 DURATION=2 SCALE=1 ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --duration) DURATION=${2:?}; shift ;;
        --scale) SCALE=${2:?}; shift ;;
        --fanout-clients) FANOUT=${2:?}; shift ;;
        --out) OUT=${2:?}; shift ;;
        --bin-dir) BIN_DIR=${2:?}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
for v in "$ROUNDS" "$DURATION" "$SCALE" "$FANOUT"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "expected a positive number, got '$v'" >&2; exit 2; }
done
[[ -z $OUT ]] || OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/lib.sh"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" # pgbouncer is in /usr/sbin

PG_MAX_CONNECTIONS=60
POOL_SIZE=20
BENCH_USER=bench
BENCH_DB=benchdb
BENCH_PW=bench-pw-$RANDOM$RANDOM
TARGETS=(direct pgbouncer sluice)
# name|pgbench options (each run adds -n: no vacuum first, the tables are only read)
WORKLOADS=(
    "select simple|-S -M simple -c 50 -j 2"
    "select extended|-S -M extended -c 50 -j 2"
    "select, connection per transaction|-S -C -c 50 -j 2"
    "fan-out: $FANOUT clients, connection per transaction|-S -C -c $FANOUT -j 2"
)
WORK=
PGB_PID=
BENCH_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $BENCH_PID ]] && sl_stop_pid "$BENCH_PID" TERM 2
    [[ -n $PGB_PID ]] && sl_stop_pid "$PGB_PID" INT 5
    sl_sluice_stop
    sl_pg_stop
    [[ -n $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

sl_header "Setup"
sl_need_pkg '/usr/lib/postgresql/*/bin/initdb' postgresql
sl_need_pkg pgbouncer pgbouncer
sl_need_pkg curl curl
sl_need_pkg setpriv util-linux
sl_build "$BIN_DIR"
PGB_BIN=$(command -v pgbouncer)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
chmod 711 "$WORK"
cd "$WORK"
sl_pick_run_user
# PgBouncer and Sluice want a descriptor per client and server connection.
sl_raise_nofile

sl_pg_start "$WORK/pg" "$PG_MAX_CONNECTIONS" "shared_buffers = 256MB"
PGBENCH=$SL_PG_BINDIR/pgbench
sl_psql postgres "SET password_encryption = 'scram-sha-256';
    CREATE ROLE $BENCH_USER LOGIN PASSWORD '$BENCH_PW'" >/dev/null
sl_psql postgres "CREATE DATABASE $BENCH_DB OWNER $BENCH_USER" >/dev/null
sl_info "PostgreSQL on 127.0.0.1:$SL_PG_PORT (max_connections $PG_MAX_CONNECTIONS); pgbench -i -s $SCALE"
PGPASSWORD=$BENCH_PW "$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "$SL_PG_PORT" -U "$BENCH_USER" \
    "$BENCH_DB" >"$WORK/pgbench-init.log" 2>&1 || {
    cat "$WORK/pgbench-init.log" >&2
    sl_die "pgbench -i failed"
}

# PgBouncer: scram-sha-256 with the server's own verifier, so it can log in to PostgreSQL on
# the client's behalf (SCRAM pass-through) without knowing the password.
mkdir -p "$WORK/pgbouncer"
VERIFIER=$(sl_psql postgres "SELECT rolpassword FROM pg_authid WHERE rolname = '$BENCH_USER'")
[[ $VERIFIER == SCRAM-SHA-256* ]] || sl_die "unexpected verifier for $BENCH_USER: $VERIFIER"
printf '"%s" "%s"\n' "$BENCH_USER" "$VERIFIER" >"$WORK/pgbouncer/userlist.txt"
PGB_PORT=$(sl_pick_port)
cat >"$WORK/pgbouncer/pgbouncer.ini" <<EOF
[databases]
$BENCH_DB = host=127.0.0.1 port=$SL_PG_PORT dbname=$BENCH_DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/pgbouncer/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = 10000
; Sluice's listener has tokio's backlog of 1024; give PgBouncer the same.
listen_backlog = 1024
logfile = $WORK/pgbouncer/pgbouncer.log
pidfile = $WORK/pgbouncer/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
chmod 600 "$WORK/pgbouncer/userlist.txt"
sl_give "$WORK/pgbouncer"

start_pgbouncer() {
    local i
    "${SL_RUN_AS[@]}" "$PGB_BIN" -q "$WORK/pgbouncer/pgbouncer.ini" </dev/null \
        >>"$WORK/pgbouncer/stdout.log" 2>&1 &
    PGB_PID=$!
    for ((i = 0; i < 100; i++)); do
        sl_alive "$PGB_PID" || break
        if (exec 3<>"/dev/tcp/127.0.0.1/$PGB_PORT") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    tail -n 20 "$WORK/pgbouncer/pgbouncer.log" "$WORK/pgbouncer/stdout.log" >&2 || true
    sl_die "PgBouncer did not start"
}
stop_pgbouncer() {
    sl_stop_pid "$PGB_PID" INT 10 # SIGINT: safe shutdown, waits for transactions to end
    PGB_PID=
}
start_sluice() {
    SLUICE_UPSTREAM="postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_PG_PORT/$BENCH_DB" \
        sl_sluice_start "$WORK/sluice.log" --pool-size "$POOL_SIZE" \
        --max-server-connections "$POOL_SIZE"
}

# Versions for the report.
PG_VERSION=$("$SL_PG_BINDIR/postgres" --version | awk '{print $3}')
PGB_VERSION=$("$PGB_BIN" --version | awk 'NR == 1 {print $2}')
SLUICE_VERSION=$("$SL_SLUICE" --version | awk '{print $2}')
SLUICE_COMMIT=$(cd "$SL_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$SL_ROOT" && git status --porcelain -- proxy 2>/dev/null) ]]; then
    SLUICE_COMMIT+=" (with local changes)"
fi

# run_one WORKLOAD_INDEX TARGET ROUND: one pgbench run; records the results in R[...].
declare -A R=()
run_one() {
    local wi=$1 target=$2 round=$3 port pid='' cpu0=0 cpu1=0 log rc=0
    local spec=${WORKLOADS[$wi]}
    local opts=${spec#*|}
    case $target in
        direct) port=$SL_PG_PORT ;;
        pgbouncer) start_pgbouncer; port=$PGB_PORT; pid=$PGB_PID ;;
        sluice) start_sluice; port=$SL_SLUICE_PORT; pid=$SL_SLUICE_PID ;;
    esac
    log=$WORK/run-$round-$wi-$target.log
    [[ -n $pid ]] && cpu0=$(sl_cpu_seconds "$pid")
    # shellcheck disable=SC2086 # $opts is a list of options
    PGPASSWORD=$BENCH_PW PGCONNECT_TIMEOUT=10 "$PGBENCH" -n -T "$DURATION" $opts \
        -h 127.0.0.1 -p "$port" -U "$BENCH_USER" "$BENCH_DB" </dev/null >"$log" 2>&1 &
    BENCH_PID=$!
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=
    [[ -n $pid ]] && cpu1=$(sl_cpu_seconds "$pid")
    case $target in
        pgbouncer) stop_pgbouncer ;;
        sluice) sl_sluice_stop ;;
    esac

    local txns tps lat failed aborted cpu_k
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log")
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log" | head -n 1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$log")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log")
    aborted=$(grep -c 'client [0-9]* aborted' "$log" || true)
    txns=${txns:-0} tps=${tps:-0} lat=${lat:-nan} failed=${failed:-0}
    if [[ -n $pid && $txns -gt 0 ]]; then
        cpu_k=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$txns" 'BEGIN { printf "%.4f", (b - a) * 1000 / n }')
    else
        cpu_k=nan
    fi
    R[$wi|$target|$round|tps]=$tps
    R[$wi|$target|$round|lat]=$lat
    R[$wi|$target|$round|failed]=$failed
    R[$wi|$target|$round|aborted]=$aborted
    R[$wi|$target|$round|cpu]=$cpu_k
    printf '  round %d  %-11s %-52s tps %9.1f  lat %7s ms  failed %s  aborted %s  cpu/1k %s%s\n' \
        "$round" "$target" "${spec%%|*}" "$tps" "$lat" "$failed" "$aborted" "$cpu_k" \
        "$([[ $rc -ne 0 ]] && echo "  (pgbench exit $rc)")"
    sleep 0.5
}

sl_header "Runs: $ROUNDS round(s) x ${#WORKLOADS[@]} workloads x ${#TARGETS[@]} targets, $DURATION s each"
T_START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
    order=("${TARGETS[@]}")
    if ((round % 2 == 0)); then order=(sluice pgbouncer direct); fi
    for wi in "${!WORKLOADS[@]}"; do
        for target in "${order[@]}"; do
            run_one "$wi" "$target" "$round"
        done
    done
done

# median of the arguments ("nan" values are skipped; "-" when none is left)
median() {
    printf '%s\n' "$@" | awk '$1 != "nan" && $1 != "" { v[n++] = $1 }
        END {
            if (n == 0) { print "-"; exit }
            for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
            m = (n % 2) ? v[int(n / 2)] : (v[n / 2 - 1] + v[n / 2]) / 2
            print m
        }'
}
fmt() { awk -v x="$1" -v f="$2" 'BEGIN { if (x == "-" || x == "nan") print "-"; else printf f, x }'; }

report() {
    echo "### Sluice vs PgBouncer: pgbench through each pooler (and directly)"
    echo
    echo "- $(date -u '+%Y-%m-%d %H:%M UTC'); $ROUNDS round(s) of $DURATION s per run; pgbench scale $SCALE, select-only (\`-S\`)"
    echo "- PostgreSQL $PG_VERSION (max_connections $PG_MAX_CONNECTIONS), PgBouncer $PGB_VERSION (transaction pooling, default_pool_size $POOL_SIZE, scram-sha-256), Sluice $SLUICE_VERSION at $SLUICE_COMMIT ($SL_BUILD_DESC; pool_size $POOL_SIZE, max_server_connections $POOL_SIZE)"
    echo "- $(nproc) CPUs shared by pgbench, the pooler and PostgreSQL, all over 127.0.0.1; load average before the runs $LOAD_BEFORE, after $LOAD_AFTER"
    echo
    echo "| workload | target | tps | vs PgBouncer | avg latency ms | failed txns | aborted clients | pooler CPU s / 1k txns |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    local wi target r tpss lats cpus ratios failed aborted b
    for wi in "${!WORKLOADS[@]}"; do
        for target in "${TARGETS[@]}"; do
            tpss=() lats=() cpus=() ratios=() failed=0 aborted=0
            for ((r = 1; r <= ROUNDS; r++)); do
                tpss+=("${R[$wi|$target|$r|tps]}")
                lats+=("${R[$wi|$target|$r|lat]}")
                cpus+=("${R[$wi|$target|$r|cpu]}")
                failed=$((failed + R[$wi|$target|$r|failed]))
                aborted=$((aborted + R[$wi|$target|$r|aborted]))
                b=${R[$wi|pgbouncer|$r|tps]}
                ratios+=("$(awk -v a="${R[$wi|$target|$r|tps]}" -v b="$b" 'BEGIN { if (b > 0) printf "%.4f", a / b; else print "nan" }')")
            done
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$([[ $target == "${TARGETS[0]}" ]] && echo "${WORKLOADS[$wi]%%|*}: \`${WORKLOADS[$wi]#*|}\`")" \
                "$target" "$(fmt "$(median "${tpss[@]}")" '%.0f')" \
                "$(fmt "$(median "${ratios[@]}")" '%.2fx')" "$(fmt "$(median "${lats[@]}")" '%.2f')" \
                "$failed" "$aborted" "$(fmt "$(median "${cpus[@]}")" '%.3f')"
        done
    done
    echo
    echo "Medians over the rounds (tps, latency, ratio, CPU); failed transactions and aborted clients"
    echo "are summed over the rounds. \"vs PgBouncer\" is each target's tps divided by PgBouncer's in"
    echo "the same round. Pooler CPU is the utime + stime of the pooler process during the run per"
    echo "1,000 transactions (direct: no pooler). With \`-C\` every transaction opens a connection"
    echo "(SCRAM-SHA-256 login); directly, clients beyond max_connections are refused (53300, \"too"
    echo "many clients\") and pgbench aborts them."
}

LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
sl_header "Results ($(($(date +%s) - T_START)) s of runs)"
REPORT=$(report)
echo
echo "$REPORT"
if [[ -n $OUT ]]; then
    printf '%s\n' "$REPORT" >"$OUT"
    sl_info "written to $OUT"
fi
