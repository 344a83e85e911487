#!/usr/bin/env bash
# Backpressure and load shedding under sustained overload: Sluice in front of a small PostgreSQL,
# driven far past what its server-connection budget can serve.
#
#   bash benches/shedding.sh                     # two 30 s scenarios (about 1.5 minutes)
#   bash benches/shedding.sh --quick             # two 8 s scenarios (CI smoke test; < 1 minute)
#   bash benches/shedding.sh --out /tmp/shedding.md --bin-dir target/release
#
# Starts a throwaway PostgreSQL (max_connections 50, fsync off) and, for each scenario, a fresh
# Sluice in front of it with a budget of 20 (--max-server-connections 20 --pool-size 20; the
# default wait_timeout 5s, shed_target 500ms, shed_interval 1s), then drives it with
# sluice-loadtest, warm function containers, workload `slow` (BEGIN; SELECT pg_sleep(0.05);
# COMMIT: each transaction holds a server connection for about 50 ms, so the budget serves at most
# ~400 transactions/s):
#
#   closed  200 workers back to back (a fan-out of 10x the budget), like pgbench
#   open    a constant arrival rate of about twice the capacity (default 800/s) that does not slow
#           down when served slowly, up to 2,000 concurrent invocations
#
# The slow workload writes nothing, so next to it, through the same Sluice and in the same group
# (same user), a small write probe (`--workload write`, 25 invocations/s) suffers the same
# queueing and shedding and has every acknowledged write checked on a direct connection (no row
# lost, none duplicated by a retry).
#
# While each scenario runs, /metrics is scraped once a second. Reported: pool wait percentiles of
# the admitted requests (from the deltas of sluice_pool_wait_seconds_bucket, interpolated within
# buckets like Prometheus's histogram_quantile), p99 wait and rejections per 5 s interval,
# rejections by reason, throughput, and the load generator's successes, failures by SQLSTATE,
# retries and end-to-end latency. Prints a Markdown report (and writes it to --out FILE).
#
# Exits non-zero when PostgreSQL itself refused a connection ("too many clients", SQLSTATE 53300
# not from Sluice), when an acknowledged write was lost or duplicated (or could not be verified),
# or when the load generator failed to run.
#
# Everything runs on this machine over 127.0.0.1: the load generator, Sluice and PostgreSQL share
# the CPUs. The numbers describe Sluice's admission control, not a production machine.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash benches/shedding.sh [--quick] [--out FILE] [--bin-dir DIR] [--duration SECONDS]
                                [--workers N] [--rate R] [--scenarios LIST]

  --quick          8 s scenarios (a smoke test of this script, for CI)
  --duration S     seconds of load per scenario (default 30)
  --workers N      closed-loop workers (default 200: 10x the budget of 20)
  --rate R         open-loop arrivals per second (default 800: about twice the capacity)
  --scenarios L    comma-separated subset of closed,open (default closed,open)
  --out FILE       also write the Markdown report to FILE
  --bin-dir DIR    use the sluice and sluice-loadtest binaries in DIR (e.g. target/release)
                   instead of building them
EOF
}

CMDLINE="bash benches/shedding.sh${*:+ $*}"
for v in SLUICE_SHED_INTERVAL SLUICE_SHED_TARGET SLUICE_WAIT_TIMEOUT SLUICE_LOADTEST_IGNORE_RETRY_HINT; do
    [[ -z ${!v:-} ]] || CMDLINE="$v=${!v} $CMDLINE"
done
DURATION=30 WORKERS=200 RATE=800 SCENARIOS=closed,open OUT='' BIN_DIR=''
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) DURATION=8 ;;
        --duration) DURATION=${2:?}; shift ;;
        --workers) WORKERS=${2:?}; shift ;;
        --rate) RATE=${2:?}; shift ;;
        --scenarios) SCENARIOS=${2:?}; shift ;;
        --out) OUT=${2:?}; shift ;;
        --bin-dir) BIN_DIR=${2:?}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
for v in "$DURATION" "$WORKERS" "$RATE"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "expected a positive number, got '$v'" >&2; exit 2; }
done
IFS=, read -r -a SCENARIO_LIST <<<"$SCENARIOS"
for s in "${SCENARIO_LIST[@]}"; do
    [[ $s == closed || $s == open ]] || { echo "unknown scenario '$s'" >&2; exit 2; }
done
[[ -z $OUT ]] || OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/lib.sh"

PG_MAX_CONNECTIONS=50
BUDGET=20
SLEEP=50ms
INTERVAL=5          # seconds per row of the timeline
PROBE_RATE=25       # write-probe invocations per second
OPEN_CONCURRENCY=2000
BENCH_USER=shed
BENCH_DB=sheddb
BENCH_PW=shed-pw-$RANDOM$RANDOM
WORK=
MAIN_PID=
PROBE_PID=
STARTED_PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $MAIN_PID ]] && sl_stop_pid "$MAIN_PID" TERM 2
    [[ -n $PROBE_PID ]] && sl_stop_pid "$PROBE_PID" TERM 2
    sl_sluice_stop
    sl_pg_stop
    # Nothing this script started may outlive it.
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
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-shed.XXXXXX")
chmod 711 "$WORK"
cd "$WORK"
sl_pick_run_user
sl_raise_nofile

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
OTHERS=$({ pgrep -x 'postgres|sluice|sluice-loadtest|pgbench|pgbouncer|cargo|rustc' || true; } | wc -l)
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
sl_info "PostgreSQL on 127.0.0.1:$SL_PG_PORT (max_connections $PG_MAX_CONNECTIONS, fsync off); tables set up"

PG_VERSION=$("$SL_PG_BINDIR/postgres" --version | awk '{print $3}')
SLUICE_VERSION=$("$SL_SLUICE" --version | awk '{print $2}')
SLUICE_COMMIT=$(cd "$SL_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$SL_ROOT" && git status --porcelain -- proxy 2>/dev/null) ]]; then
    SLUICE_COMMIT+=" (with local changes)"
fi
MEM_GIB=$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)

now() { date +%s.%N; }
mfile() { printf '%s/m-%04d.prom' "$1" "$2"; }

# scrape DIR INDEX T0: saves /metrics as DIR/m-INDEX.prom and its time since T0 in DIR/times.
scrape() {
    local dir=$1 i=$2 t0=$3 t file
    file=$(mfile "$dir" "$i")
    t=$(now)
    if ! curl -fsS --max-time 2 "http://127.0.0.1:$SL_ADMIN_PORT/metrics" >"$file" 2>/dev/null; then
        # A missed scrape repeats the previous one (counters only grow; 0 would look like a reset).
        if ((i > 0)); then cp "$(mfile "$dir" $((i - 1)))" "$file"; else : >"$file"; fi
        echo "warning: scrape $i of /metrics failed" >&2
    fi
    awk -v i="$i" -v t="$t" -v t0="$t0" 'BEGIN { printf "%d %.3f\n", i, t - t0 }' >>"$dir/times"
}

# norm FILE: one Prometheus scrape reduced to the series used here, summed over groups, as
# "KEY SUBKEY VALUE" lines: b LE CUMULATIVE | count - N | sum - S | rej REASON N | tx - N |
# waiting - N | conn RESULT N
norm() {
    awk '
        function lbl(name,   r) {
            if (match($0, name "=\"[^\"]*\"")) {
                r = substr($0, RSTART, RLENGTH); sub(/^[^"]*"/, "", r); sub(/"$/, "", r); return r
            }
            return "-"
        }
        /^#/ { next }
        /^sluice_pool_wait_seconds_bucket[{]/ { b[lbl("le")] += $NF; next }
        /^sluice_pool_wait_seconds_count/ { c += $NF; next }
        /^sluice_pool_wait_seconds_sum/ { s += $NF; next }
        /^sluice_queries_rejected_total[{]/ { r[lbl("reason")] += $NF; next }
        /^sluice_transactions_total/ { tx += $NF; next }
        /^sluice_pool_waiting_clients/ { w += $NF; next }
        /^sluice_server_connects_total/ { cn[lbl("result")] += $NF; next }
        END {
            for (l in b) print "b", l, b[l]
            print "count - " c + 0; print "sum - " s + 0; print "tx - " tx + 0; print "waiting - " w + 0
            for (x in r) print "rej", x, r[x]
            for (x in cn) print "conn", x, cn[x]
        }' "$1"
}

# delta A B: the counters of scrape B minus those of scrape A (the gauge "waiting": B's value).
delta() {
    awk 'NR == FNR { a[$1 " " $2] = $3; next }
        $1 == "waiting" { print; next }
        { print $1, $2, $3 - a[$1 " " $2] }' <(norm "$1") <(norm "$2")
}

# quantile Q < DELTA: histogram_quantile over the b lines (cumulative counts by le).
quantile() {
    awk -v q="$1" '
        $1 == "b" { le = ($2 == "+Inf") ? "inf" : $2 + 0; n++; L[n] = le; C[n] = $3 }
        END {
            if (n == 0) { print "nan"; exit }
            # sort by le (+Inf last)
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
                if (L[i] == "inf" || (L[j] != "inf" && L[j] < L[i])) { t = L[i]; L[i] = L[j]; L[j] = t; t = C[i]; C[i] = C[j]; C[j] = t }
            total = C[n]
            if (total <= 0) { print "nan"; exit }
            rank = q * total
            for (i = 1; i <= n; i++) if (C[i] >= rank) break
            if (L[i] == "inf") { print L[n - 1] * 1000; exit }
            lo = (i == 1) ? 0 : L[i - 1]; clo = (i == 1) ? 0 : C[i - 1]
            cnt = C[i] - clo
            v = (cnt > 0) ? lo + (L[i] - lo) * (rank - clo) / cnt : L[i]
            printf "%.1f\n", v * 1000
        }'
}

# qbucket Q < DELTA: the bucket "(LO, HI] s" the Q-quantile falls in.
qbucket() {
    awk -v q="$1" '
        $1 == "b" { le = ($2 == "+Inf") ? 1e99 : $2 + 0; n++; L[n] = le; C[n] = $3 }
        END {
            for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++)
                if (L[j] < L[i]) { t = L[i]; L[i] = L[j]; L[j] = t; t = C[i]; C[i] = C[j]; C[j] = t }
            if (n == 0 || C[n] <= 0) { print "-"; exit }
            for (i = 1; i <= n; i++) if (C[i] >= q * C[n]) break
            printf "(%s, %s] s\n", (i == 1) ? 0 : L[i - 1], (L[i] == 1e99) ? "+Inf" : L[i]
        }'
}

# above SECONDS < DELTA: the share (%) of the requests counted in the histogram that waited more
# than SECONDS (exact when SECONDS is a bucket bound).
above() {
    awk -v x="$1" '$1 == "b" && $2 != "+Inf" && ($2 + 0) == (x + 0) { le = $3 } $1 == "count" { c = $3 }
        END { if (c > 0) printf "%.1f%%", 100 * (c - le) / c; else print "-" }'
}

# field KEY [SUBKEY] < NORMALIZED: the value (0 when absent).
field() { awk -v k="$1" -v k2="${2:--}" '$1 == k && $2 == k2 { print $3; f = 1 } END { if (!f) print 0 }'; }
fmt_ms() { awk -v x="$1" 'BEGIN { if (x == "nan" || x == "") print "-"; else if (x + 0 >= 100) printf "%.0f", x; else printf "%.1f", x }'; }

REASONS=(overload predicted_timeout queue_full wait_timeout shutting_down)
declare -A SC=()  # per scenario results for the summary
FAIL_REASONS=()

# run_scenario NAME: one scenario against a fresh Sluice; appends its Markdown to $WORK/NAME.md.
run_scenario() {
    local name=$1
    local dir=$WORK/$name desc load_args=() main_rc=0 probe_rc=0 t0 i next t
    mkdir -p "$dir"
    case $name in
        closed)
            desc="closed loop, $WORKERS workers back to back (fan-out of $((WORKERS / BUDGET))x the budget)"
            load_args=(--profile closed --workers "$WORKERS" --containers "$WORKERS")
            ;;
        open)
            desc="open loop, constant $RATE arrivals/s (up to $OPEN_CONCURRENCY concurrent invocations)"
            load_args=(--profile constant --rate "$RATE" --max-concurrency "$OPEN_CONCURRENCY"
                --containers "$WORKERS")
            ;;
    esac
    sl_header "Scenario $name: $desc, ${DURATION}s"
    SLUICE_UPSTREAM="postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_PG_PORT/$BENCH_DB" \
        sl_sluice_start "$dir/sluice.log" --pool-size "$BUDGET" --max-server-connections "$BUDGET"
    STARTED_PIDS+=("$SL_SLUICE_PID")
    local proxy_url="postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_SLUICE_PORT/$BENCH_DB"
    local cpu0 cpu1
    cpu0=$(sl_cpu_seconds "$SL_SLUICE_PID")

    t0=$(now)
    scrape "$dir" 0 "$t0"
    "$SL_LOADTEST" --quiet --workload slow --sleep "$SLEEP" --model warm --duration "${DURATION}s" \
        "${load_args[@]}" --json "$dir/main.json" "$proxy_url" \
        </dev/null >"$dir/main.txt" 2>"$dir/main.err" &
    MAIN_PID=$!
    STARTED_PIDS+=("$MAIN_PID")
    "$SL_LOADTEST" --quiet --workload write --profile constant --rate "$PROBE_RATE" \
        --duration "${DURATION}s" --model warm --containers 10 --verify-url "$DIRECT_URL" \
        --json "$dir/probe.json" "$proxy_url" </dev/null >"$dir/probe.txt" 2>"$dir/probe.err" &
    PROBE_PID=$!
    STARTED_PIDS+=("$PROBE_PID")

    # Scrape once a second until both load generators are done.
    i=0
    local main_exit=''
    while sl_alive "$MAIN_PID" || sl_alive "$PROBE_PID"; do
        i=$((i + 1))
        next=$(awk -v t0="$t0" -v i="$i" 'BEGIN { printf "%.3f", t0 + i }')
        # Wait for the next whole second, noting (to 0.1 s) when the main load generator exits.
        while t=$(awk -v n="$next" -v now="$(now)" 'BEGIN { d = n - now; if (d <= 0) exit 1; printf "%.3f", (d > 0.1) ? 0.1 : d }'); do
            sleep "$t"
            if [[ -z $main_exit ]] && ! sl_alive "$MAIN_PID"; then
                main_exit=$(awk -v t0="$t0" -v now="$(now)" 'BEGIN { printf "%.3f", now - t0 }')
            fi
        done
        scrape "$dir" "$i" "$t0"
    done
    wait "$MAIN_PID" || main_rc=$?
    MAIN_PID=
    wait "$PROBE_PID" || probe_rc=$?
    PROBE_PID=
    local last=$i
    cpu1=$(sl_cpu_seconds "$SL_SLUICE_PID")
    sl_sluice_stop

    # --- analysis ---
    local first final end_load
    first=$(mfile "$dir" 0)
    final=$(mfile "$dir" "$last")
    # The load began when the main load generator had connected its warm containers: its report's
    # elapsed time counts from there to its end. The last scrape at or before the end of the load
    # (the drain of invocations in flight follows) bounds the "load only" figures.
    local load_start load_end
    load_start=$(jq -r --arg exit "${main_exit:-0}" '($exit | tonumber) - (.elapsed_secs // 0) | if . < 0 then 0 else . end' "$dir/main.json" 2>/dev/null || echo 0)
    load_end=$(awk -v a="$load_start" -v d="$DURATION" 'BEGIN { print a + d }')
    end_load=$(awk -v e="$load_end" '$2 <= e + 0.5 { i = $1 } END { print i + 0 }' "$dir/times")
    local load_file
    load_file=$(mfile "$dir" "$end_load")
    delta "$first" "$final" >"$dir/run.delta"
    delta "$first" "$load_file" >"$dir/load.delta"

    local p50 p90 p99 p99l admitted tps rej_total
    p50=$(quantile 0.5 <"$dir/run.delta")
    p90=$(quantile 0.9 <"$dir/run.delta")
    p99=$(quantile 0.99 <"$dir/run.delta")
    p99l=$(quantile 0.99 <"$dir/load.delta")
    admitted=$(field count <"$dir/run.delta")
    # Throughput while saturated: checkouts per second over the 1 s scrape intervals that began
    # and ended with clients waiting (so the budget was the limit, not the offered load).
    local j wa wb sat_tx=0 sat_t=0 ta tb
    wa=$(norm "$(mfile "$dir" 0)" | field waiting)
    for ((j = 1; j <= last; j++)); do
        wb=$(norm "$(mfile "$dir" "$j")" | field waiting)
        if awk -v a="$wa" -v b="$wb" 'BEGIN { exit !(a > 0 && b > 0) }'; then
            ta=$(awk -v i=$((j - 1)) '$1 == i { print $2 }' "$dir/times")
            tb=$(awk -v i="$j" '$1 == i { print $2 }' "$dir/times")
            sat_tx=$((sat_tx + $(delta "$(mfile "$dir" $((j - 1)))" "$(mfile "$dir" "$j")" | field tx)))
            sat_t=$(awk -v s="$sat_t" -v a="$ta" -v b="$tb" 'BEGIN { print s + b - a }')
        fi
        wa=$wb
    done
    tps=$(awk -v n="$sat_tx" -v d="$sat_t" 'BEGIN { if (d > 0) printf "%.0f", n / d; else print "-" }')
    local mean
    mean=$(awk '$1 == "count" { c = $3 } $1 == "sum" { s = $3 } END { if (c > 0) printf "%.1f", s / c * 1000; else print "nan" }' "$dir/run.delta")

    # Load generator reports.
    local m=$dir/main.json p=$dir/probe.json
    [[ -s $m ]] || { FAIL_REASONS+=("$name: the load generator wrote no report (exit $main_rc; $(tail -n 3 "$dir/main.err" | tr '\n' ' '))"); }
    [[ -s $p ]] || { FAIL_REASONS+=("$name: the write probe wrote no report (exit $probe_rc; $(tail -n 3 "$dir/probe.err" | tr '\n' ' '))"); }
    [[ -s $m ]] || echo '{}' >"$m"
    [[ -s $p ]] || echo '{}' >"$p"
    ((main_rc == 0)) || FAIL_REASONS+=("$name: sluice-loadtest (slow) exited $main_rc")
    ((probe_rc == 0 || probe_rc == 3)) || FAIL_REASONS+=("$name: sluice-loadtest (write probe) exited $probe_rc")

    # PostgreSQL's own "too many clients": in its log, or as a 53300 whose message is not Sluice's.
    local pg_refusals foreign
    pg_refusals=$(cat "$SL_PG_LOG" "$dir/sluice.log" 2>/dev/null | grep -c 'too many clients' || true)
    foreign=$(jq -rs '[.[] | .error_examples // {} | to_entries[] | select(.key == "53300")
        | select(.value | startswith("Sluice is at capacity") | not) | .value] | length' "$m" "$p")
    if ((pg_refusals > 0 || foreign > 0)); then
        FAIL_REASONS+=("$name: PostgreSQL refused connections itself (\"too many clients\": $pg_refusals in the logs, $foreign non-Sluice 53300 messages)")
    fi
    local lost dup verr
    lost=$(jq -r '.verification.lost // "n/a"' "$p")
    dup=$(jq -r '.verification.duplicated // "n/a"' "$p")
    verr=$(jq -r '.verification.error // ""' "$p")
    if [[ $lost != 0 || $dup != 0 || -n $verr ]]; then
        FAIL_REASONS+=("$name: write verification: lost $lost, duplicated $dup${verr:+, error: $verr}")
    fi

    SC[$name|p99]=$p99 SC[$name|p99load]=$p99l SC[$name|tps]=$tps
    SC[$name|p50]=$p50 SC[$name|p99b]=$(qbucket 0.99 <"$dir/run.delta")
    SC[$name|over]=$(above 0.5 <"$dir/run.delta") SC[$name|over1]=$(above 1 <"$dir/run.delta")
    SC[$name|admitted]=$admitted
    SC[$name|rej]=$(awk '$1 == "rej" { n += $3 } END { print n + 0 }' "$dir/run.delta")
    SC[$name|reasons]=$(awk '$1 == "rej" && $3 > 0 { printf "%s%s %d", sep, $2, $3; sep = ", " }' "$dir/run.delta")
    SC[$name|ok]=$(jq -r '"\(.counts.succeeded // 0) of \(.counts.invocations // 0)"' "$m")
    SC[$name|e2e]=$(jq -r '"\(.latency_ms.p50 // 0 | round) / \(.latency_ms.p99 // 0 | round)"' "$m")

    # Markdown for this scenario.
    {
        echo "### Scenario \`$name\`: $desc"
        echo
        echo "sluice-loadtest \`--workload slow --sleep $SLEEP --model warm ${load_args[*]} --duration ${DURATION}s\`, plus the write probe (\`--workload write --profile constant --rate $PROBE_RATE\`) through the same Sluice. Load for ${DURATION} s, then the drain of invocations in flight (${last} s in all). Sluice used $(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.1f", b - a }') CPU s."
        echo
        echo "**Pool wait of admitted requests** (\`sluice_pool_wait_seconds\`, all groups, whole run including the drain). Percentiles are interpolated within the buckets (…, 0.25, 0.5, 1, 2.5, 5, 10 s) like Prometheus's \`histogram_quantile\`, so a percentile that falls in a wide bucket is only known to lie within it; the shares above a bucket bound are exact:"
        echo
        echo "| admitted | mean ms | p50 ms | p90 ms | p99 ms | p99 ms, load only | waited > 0.5 s | > 1 s | > 2.5 s | Sluice checkouts/s while saturated |"
        echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        echo "| $admitted | $(fmt_ms "$mean") | $(fmt_ms "$p50") | $(fmt_ms "$p90") | $(fmt_ms "$p99") | $(fmt_ms "$p99l") | $(above 0.5 <"$dir/run.delta") | $(above 1 <"$dir/run.delta") | $(above 2.5 <"$dir/run.delta") | $tps |"
        echo
        echo "**Rejections** (\`sluice_queries_rejected_total\`, whole run):"
        echo
        printf '|'; for r in "${REASONS[@]}"; do printf ' %s |' "$r"; done; echo ' total | rejected / (admitted + rejected) |'
        printf '|'; for r in "${REASONS[@]}"; do printf -- '---:|'; done; printf -- '---:|---:|\n'
        rej_total=0
        local n
        printf '|'
        for r in "${REASONS[@]}"; do
            n=$(field rej "$r" <"$dir/run.delta"); rej_total=$((rej_total + n)); printf ' %s |' "$n"
        done
        printf ' %s | %s |\n' "$rej_total" "$(awk -v r="$rej_total" -v a="$admitted" 'BEGIN { if (r + a > 0) printf "%.1f%%", 100 * r / (r + a); else print "-" }')"
        echo
        echo "**Timeline** (per ${INTERVAL} s from the start of the load generators; the load itself ran from about $(printf '%.0f' "$load_start") s, after the warm containers connected, to about $(printf '%.0f' "$load_end") s; *drain* = after the load stopped, while invocations in flight finish; rejections by reason in the interval):"
        echo
        echo "| t s | admitted | checkouts/s | wait p50 ms | wait p99 ms | waited > 0.5 s | overload | predicted_timeout | queue_full | wait_timeout | clients waiting (max of 1 s scrapes) |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        local k a b ta tb d wmax j w
        for ((k = 0; k * INTERVAL < last; k++)); do
            a=$((k * INTERVAL)); b=$(((k + 1) * INTERVAL)); ((b <= last)) || b=$last
            ta=$(awk -v i="$a" '$1 == i { print $2 }' "$dir/times"); tb=$(awk -v i="$b" '$1 == i { print $2 }' "$dir/times")
            d=$(delta "$(mfile "$dir" "$a")" "$(mfile "$dir" "$b")")
            wmax=0
            for ((j = a + 1; j <= b; j++)); do
                w=$(norm "$(mfile "$dir" "$j")" | field waiting)
                wmax=$(awk -v x="$w" -v y="$wmax" 'BEGIN { print (x > y) ? x : y }')
            done
            printf '| %s–%s%s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$a" "$b" "$(awk -v a="$a" -v e="$load_end" 'BEGIN { if (a + 0.5 >= e) print " (drain)" }')" \
                "$(field count <<<"$d")" \
                "$(awk -v n="$(field tx <<<"$d")" -v x="$ta" -v y="$tb" 'BEGIN { printf "%.0f", (y > x) ? n / (y - x) : 0 }')" \
                "$(fmt_ms "$(quantile 0.5 <<<"$d")")" "$(fmt_ms "$(quantile 0.99 <<<"$d")")" "$(above 0.5 <<<"$d")" \
                "$(field rej overload <<<"$d")" "$(field rej predicted_timeout <<<"$d")" \
                "$(field rej queue_full <<<"$d")" "$(field rej wait_timeout <<<"$d")" "$wmax"
        done
        echo
        echo "<details><summary>Second by second</summary>"
        echo
        echo "| t s | admitted | wait p50 ms | waited > 0.5 s | > 1 s | > 2.5 s | rejected (overload / predicted_timeout / other) | clients waiting at the end |"
        echo "|---|---:|---:|---:|---:|---:|---|---:|"
        for ((j = 1; j <= last; j++)); do
            d=$(delta "$(mfile "$dir" $((j - 1)))" "$(mfile "$dir" "$j")")
            printf '| %s–%s | %s | %s | %s | %s | %s | %s / %s / %s | %s |\n' $((j - 1)) "$j" \
                "$(field count <<<"$d")" "$(fmt_ms "$(quantile 0.5 <<<"$d")")" \
                "$(above 0.5 <<<"$d")" "$(above 1 <<<"$d")" "$(above 2.5 <<<"$d")" \
                "$(field rej overload <<<"$d")" "$(field rej predicted_timeout <<<"$d")" \
                "$(awk '$1 == "rej" && $2 != "overload" && $2 != "predicted_timeout" { n += $3 } END { print n + 0 }' <<<"$d")" \
                "$(field waiting <<<"$d")"
        done
        echo
        echo "</details>"
        echo
        echo "**Load generator** (latency from each invocation's intended start to its end, retries included):"
        echo
        echo "| run | invocations | succeeded | failed (by SQLSTATE or reason) | retries (by cause) | throughput /s | latency p50 / p90 / p99 / max ms | lost / duplicated writes |"
        echo "|---|---:|---:|---|---|---:|---|---|"
        local f label
        for f in "$m" "$p"; do
            if [[ $f == "$m" ]]; then label="slow ($name)"; else label="write probe"; fi
            jq -r --arg run "$label" '
                def kv: to_entries | map("\(.key): \(.value)") | join(", ") | if . == "" then "0" else . end;
                def ms: if . >= 100 then (. | round | tostring) else ((. * 10 | round) / 10 | tostring) end;
                "| \($run) | \(.counts.invocations // 0) | \(.counts.succeeded // 0) | \(.counts.failed // 0)\(if (.counts.failed // 0) > 0 then " (" + (.counts.by_error | kv) + ")" else "" end) | \(.counts.retries // 0)\(if (.counts.retries // 0) > 0 then " (" + (.counts.retries_by_error | kv) + "; \(.counts.retries_hinted // 0) waited the hinted delay)" else "" end) | \((.throughput // 0) | round) | \(.latency_ms.p50 // 0 | ms) / \(.latency_ms.p90 // 0 | ms) / \(.latency_ms.p99 // 0 | ms) / \(.latency_ms.max // 0 | ms) | \(if .verification then "\(.verification.lost) / \(.verification.duplicated) of \(.verification.checked)" else "not checked (no writes)" end) |"' "$f"
        done
        echo
        local ex
        ex=$(jq -rs '[.[] | .error_examples // {} | to_entries[]] | unique_by(.key) | map("- `\(.key)`: \(.value | gsub("\n"; " ") | .[0:220])") | .[]' "$m" "$p")
        if [[ -n $ex ]]; then
            echo "First message seen for each error:"
            echo
            echo "$ex"
            echo
        fi
        echo "PostgreSQL \"too many clients\" refusals: $pg_refusals in the PostgreSQL and Sluice logs; 53300 messages not from Sluice: $foreign."
        echo
    } >"$WORK/$name.md"
    sed -n '1,200p' "$WORK/$name.md" | grep -E '^\| (slow|write)' | sed 's/^/  /' || true
    sl_info "pool wait p50 $(fmt_ms "$p50") ms, p90 $(fmt_ms "$p90") ms, p99 $(fmt_ms "$p99") ms; $tps checkouts/s; $rej_total rejected"
    sleep 1
}

T_START=$(date +%s)
for s in "${SCENARIO_LIST[@]}"; do run_scenario "$s"; done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

report() {
    echo "## Sluice under sustained overload: backpressure and shedding"
    echo
    echo "- $(date -u '+%Y-%m-%d %H:%M UTC'); \`$CMDLINE\`; ${DURATION} s of load per scenario"
    echo "- PostgreSQL $PG_VERSION (max_connections $PG_MAX_CONNECTIONS, fsync off); Sluice $SLUICE_VERSION at $SLUICE_COMMIT ($SL_BUILD_DESC): \`--pool-size $BUDGET --max-server-connections $BUDGET\`, wait_timeout ${SLUICE_WAIT_TIMEOUT:-5s}, shed_target ${SLUICE_SHED_TARGET:-500ms}, shed_interval ${SLUICE_SHED_INTERVAL:-1s}$([[ -z ${SLUICE_WAIT_TIMEOUT:-}${SLUICE_SHED_TARGET:-}${SLUICE_SHED_INTERVAL:-} ]] && echo ' (the defaults)' || echo ' (set through SLUICE_* variables)')"
    echo "- workload \`slow\`: BEGIN; SELECT pg_sleep(0.05); COMMIT — about 50 ms of server time each, so the budget of $BUDGET serves at most ~$((BUDGET * 1000 / 50)) transactions/s"
    echo "- $(nproc) CPUs, ${MEM_GIB} GiB memory, shared by the load generators, Sluice and PostgreSQL over 127.0.0.1; load average before $LOAD_BEFORE, after $LOAD_AFTER; $OTHERS other database/build processes were running when it started"
    echo
    echo "| scenario | admitted | pool wait p50 ms | p99 ms (interpolated) | p99 bucket | waited > 0.5 s | > 1 s | checkouts/s while saturated | rejected (by reason) | slow invocations succeeded | their latency p50 / p99 ms |"
    echo "|---|---:|---:|---:|---|---:|---:|---:|---|---|---|"
    local s
    for s in "${SCENARIO_LIST[@]}"; do
        echo "| $s | ${SC[$s|admitted]} | $(fmt_ms "${SC[$s|p50]}") | $(fmt_ms "${SC[$s|p99]}") | ${SC[$s|p99b]} | ${SC[$s|over]} | ${SC[$s|over1]} | ${SC[$s|tps]} | ${SC[$s|rej]}${SC[$s|reasons]:+ (${SC[$s|reasons]})} | ${SC[$s|ok]} | ${SC[$s|e2e]} |"
    done
    echo
    for s in "${SCENARIO_LIST[@]}"; do cat "$WORK/$s.md"; done
    if ((${#FAIL_REASONS[@]} > 0)); then
        echo "**FAILED:**"
        echo
        printf -- '- %s\n' "${FAIL_REASONS[@]}"
    else
        echo "**Checks passed:** no \"too many clients\" from PostgreSQL, no acknowledged write lost or duplicated."
    fi
}

sl_header "Results ($(($(date +%s) - T_START)) s of runs)"
REPORT=$(report)
echo
echo "$REPORT"
if [[ -n $OUT ]]; then
    printf '%s\n' "$REPORT" >"$OUT"
    sl_info "written to $OUT"
fi
sl_pg_stop
if ((${#FAIL_REASONS[@]} > 0)); then
    exit 1
fi
