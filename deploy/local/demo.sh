#!/usr/bin/env bash
# The Sluice demo: a Lambda-style connection storm against a small PostgreSQL, directly and
# through Sluice, side by side.
#
#   bash deploy/local/demo.sh            # 1,000 cold invocations in 1 s (about 15 s, plus the
#                                        # release build the first time)
#   bash deploy/local/demo.sh --quick    # 200 invocations in 100 ms, shorter pauses (CI runs this)
#   bash deploy/local/demo.sh --keep     # leave PostgreSQL and Sluice running afterwards
#
# On a Debian or Ubuntu machine with a Rust toolchain, as root or with sudo. It installs the
# PostgreSQL server packages (and curl) with apt-get when missing, builds sluice and
# sluice-loadtest, starts a throwaway PostgreSQL with max_connections = 50 on a free loopback
# port, starts Sluice in front of it with a budget of 40 server connections, and runs the same
# burst of writes directly and through Sluice with `sluice-loadtest --compare`. Everything it
# started is stopped and deleted on exit, Ctrl-C or error (unless --keep).
#
# Exit status: 0 when the run through Sluice lost nothing (every invocation succeeded and every
# acknowledged write is in the table exactly once), 1 otherwise or on error.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash deploy/local/demo.sh [--quick] [--keep] [--burst N] [--bin-dir DIR]

  --quick        a smaller burst (200 invocations in 100 ms) and shorter pauses, for CI
  --keep         leave PostgreSQL and Sluice running at the end and print how to connect
  --burst N      invocations in the burst (default 1000, or 200 with --quick)
  --bin-dir DIR  use the sluice and sluice-loadtest binaries in DIR (e.g. target/release)
                 instead of building them; they must be release builds, debug ones are far
                 too slow at SCRAM logins for the burst
EOF
}

QUICK=no KEEP=no BURST='' BIN_DIR=''
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) QUICK=yes ;;
        --keep) KEEP=yes ;;
        --burst) BURST=${2:?--burst needs a number}; shift ;;
        --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
if [[ $QUICK == yes ]]; then
    BURST=${BURST:-200}
    WINDOW=100ms
    PAUSE=1s
else
    BURST=${BURST:-1000}
    WINDOW=1s
    PAUSE=3s
fi
[[ $BURST =~ ^[1-9][0-9]*$ ]] || { echo "--burst needs a positive number" >&2; exit 2; }

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_MAX_CONNECTIONS=50
BUDGET=40
APP_USER=app
APP_DB=appdb
APP_PW=demo-pw-$RANDOM$RANDOM
WORK=
LT_PID=
FINISHED=no

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $KEEP == yes && $FINISHED == yes ]]; then
        exit "$rc"
    fi
    [[ -n $LT_PID ]] && sl_stop_pid "$LT_PID" TERM 2
    if [[ -n ${SL_SLUICE_PID:-} || -n ${SL_PG_PID:-} || -n $WORK ]]; then
        sl_header "Cleaning up"
        sl_sluice_stop
        sl_pg_stop
        [[ -n $WORK ]] && rm -rf "$WORK"
        sl_info "stopped Sluice and PostgreSQL, removed ${WORK:-nothing}"
    fi
    exit "$rc"
}
sl_traps cleanup

# ----------------------------------------------------------------------------------------------
sl_header "1. Packages"
sl_need_pkg '/usr/lib/postgresql/*/bin/initdb' postgresql
sl_need_pkg curl curl
sl_need_pkg setpriv util-linux
sl_info "PostgreSQL binaries: $(sl_pg_bindir)"

sl_header "2. Building sluice and sluice-loadtest"
sl_build "$BIN_DIR"
sl_info "($SL_BUILD_DESC)"
sl_info "$SL_SLUICE"
sl_info "$SL_LOADTEST"

# ----------------------------------------------------------------------------------------------
sl_header "3. A throwaway PostgreSQL (max_connections = $PG_MAX_CONNECTIONS)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-demo.XXXXXX")
chmod 711 "$WORK"
cd "$WORK"
sl_pick_run_user
sl_raise_nofile
sl_pg_start "$WORK/pg" "$PG_MAX_CONNECTIONS"
sl_psql postgres "CREATE ROLE $APP_USER LOGIN PASSWORD '$APP_PW'" >/dev/null
sl_psql postgres "CREATE DATABASE $APP_DB OWNER $APP_USER" >/dev/null
DIRECT_URL="postgres://$APP_USER:$APP_PW@127.0.0.1:$SL_PG_PORT/$APP_DB"
sl_info "PostgreSQL $("$SL_PG_BINDIR/postgres" --version | awk '{print $3}') on 127.0.0.1:$SL_PG_PORT" \
    "(data in $WORK/pg/data, running as $SL_RUN_USER, SCRAM-SHA-256)"
sl_info "role $APP_USER, database $APP_DB"

# ----------------------------------------------------------------------------------------------
sl_header "4. Sluice in front of it (budget $BUDGET server connections)"
# The upstream URL (with its password) goes in the environment rather than on the command line.
SLUICE_UPSTREAM="postgres://$APP_USER:$APP_PW@127.0.0.1:$SL_PG_PORT/$APP_DB" \
    sl_sluice_start "$WORK/sluice.log" --pool-size "$BUDGET" --max-server-connections "$BUDGET"
PROXY_URL="postgres://$APP_USER:$APP_PW@127.0.0.1:$SL_SLUICE_PORT/$APP_DB"
sl_info "Sluice (pid $SL_SLUICE_PID) on 127.0.0.1:$SL_SLUICE_PORT, admin on 127.0.0.1:$SL_ADMIN_PORT"
sl_info "log: $WORK/sluice.log"

# ----------------------------------------------------------------------------------------------
sl_header "5. Fan-out: $BURST cold invocations of a write within $WINDOW, directly and through Sluice"
sl_info "Each invocation opens its own connection (a cold Lambda), inserts a row and exits;"
sl_info "errors that are safe to retry are retried with backoff (up to 5 attempts, 10 s)."
sl_info "PostgreSQL takes $PG_MAX_CONNECTIONS connections; Sluice holds at most $BUDGET of them."
echo
REPORT=$WORK/report.json
LT_RC=0
"$SL_LOADTEST" --compare "$DIRECT_URL" "$PROXY_URL" --verify-url "$DIRECT_URL" --setup \
    --workload write --model cold --profile burst --burst-size "$BURST" --burst-window "$WINDOW" \
    --compare-pause "$PAUSE" --allow-loss --quiet --json "$REPORT" </dev/null &
LT_PID=$!
wait "$LT_PID" || LT_RC=$?
LT_PID=
[[ $LT_RC -eq 0 ]] || sl_die "sluice-loadtest failed (exit $LT_RC)"

# Flatten the pretty-printed JSON report into path=value lines (scalars; strings keep their
# quotes), e.g. proxy.counts.failed=0, direct.counts.by_error.53300=12, proxy.verification.error=null.
declare -A R=()
while IFS='=' read -r k v; do R[$k]=$v; done < <(awk '
    function path(   i, p) {
        p = ""
        for (i = 1; i <= n; i++) if (st[i] != "") p = p (p == "" ? "" : ".") st[i]
        return p
    }
    /^[ \t]*"[^"]*": [{[][ \t]*$/ { match($0, /"[^"]*"/); st[++n] = substr($0, RSTART + 1, RLENGTH - 2); next }
    /^[ \t]*[{[][ \t]*$/ { st[++n] = ""; next }
    /^[ \t]*[]}],?[ \t]*$/ { n--; next }
    /^[ \t]*"[^"]*": / {
        match($0, /"[^"]*": /); k = substr($0, RSTART + 1, RLENGTH - 4)
        v = substr($0, RSTART + RLENGTH); sub(/,[ \t]*$/, "", v)
        p = path(); print (p == "" ? "" : p ".") k "=" v
    }' "$REPORT")
num() { echo "${R[$1]:-0}"; }

sl_header "6. What happened"
for side in direct proxy; do
    if [[ $side == direct ]]; then name="directly:"; else name="through Sluice:"; fi
    printf '  %-16s %s of %s invocations succeeded, %s failed, %s retries\n' "$name" \
        "$(num "$side.counts.succeeded")" "$(num "$side.counts.invocations")" \
        "$(num "$side.counts.failed")" "$(num "$side.counts.retries")"
    # Each error seen: how many invocations it failed, how many retries it caused, an example.
    codes=$(printf '%s\n' "${!R[@]}" | sed -n "s/^$side\.counts\.\(retries_\)\{0,1\}by_error\.//p" | sort -u)
    for code in $codes; do
        example=${R[$side.error_examples.$code]:-}
        example=${example#\"}
        example=${example%\"}
        ((${#example} <= 64)) || example="${example:0:63}…"
        printf '  %-16s   %s: %s failed, %s retried  "%s"\n' "" "$code" \
            "$(num "$side.counts.by_error.$code")" "$(num "$side.counts.retries_by_error.$code")" "$example"
    done
    printf '  %-16s   writes verified: %s, lost: %s, duplicated: %s\n' "" \
        "$(num "$side.verification.checked")" "$(num "$side.counts.lost")" "$(num "$side.counts.duplicated")"
done
P_FAILED=$(num proxy.counts.failed)
P_LOST=$(num proxy.counts.lost)
P_DUP=$(num proxy.counts.duplicated)
P_INV=$(num proxy.counts.invocations)
P_CHECKED=$(num proxy.verification.checked)
VERDICT_OK=yes
if [[ $P_INV -ne $BURST || $P_FAILED -ne 0 || $P_LOST -ne 0 || $P_DUP -ne 0 ]]; then
    VERDICT_OK=no
fi
# The writes were verified on the database itself (no verification error, every ack checked).
if [[ ${R[proxy.verification.error]:-missing} != null || $P_CHECKED -ne $P_INV ]]; then
    VERDICT_OK=no
fi
echo
if [[ $VERDICT_OK == yes ]]; then
    sl_info "Through Sluice: all $P_INV invocations succeeded and all $P_CHECKED writes are in the table: none lost."
    sl_info "Sluice queued the burst onto at most $BUDGET server connections instead of letting"
    sl_info "PostgreSQL refuse it (compare the latency and connect rows above)."
else
    sl_info "FAILED: through Sluice $P_FAILED of $P_INV invocations failed, $P_LOST writes lost," \
        "$P_DUP duplicated (verified $P_CHECKED). Sluice log: $WORK/sluice.log"
fi

# ----------------------------------------------------------------------------------------------
sl_header "7. Metrics"
METRICS_URL="http://127.0.0.1:$SL_ADMIN_PORT/metrics"
sl_info "Prometheus metrics: $METRICS_URL   (also /healthz and /readyz on that port)"
curl -fsS --max-time 5 "$METRICS_URL" |
    grep -E '^sluice_(transactions_total|client_connections_accepted_total|server_connections(_budget)?|server_connects_total|pool_wait_seconds_(count|sum)|queries_rejected_total)[{ ]' |
    head -n 16 | sed 's/^/    /' || true

FINISHED=yes
if [[ $KEEP == yes ]]; then
    cat >"$WORK/stop.sh" <<EOF
#!/usr/bin/env bash
# Stops what deploy/local/demo.sh --keep left running and deletes its files.
kill -TERM $SL_SLUICE_PID 2>/dev/null
kill -INT $SL_PG_PID 2>/dev/null
for i in \$(seq 100); do kill -0 $SL_PG_PID 2>/dev/null || kill -0 $SL_SLUICE_PID 2>/dev/null || break; sleep 0.1; done
rm -rf '$WORK'
echo stopped
EOF
    sl_header "Left running (--keep)"
    sl_info "through Sluice:  psql '$PROXY_URL'"
    sl_info "directly:        psql '$DIRECT_URL'"
    sl_info "superuser:       psql 'postgres://postgres:$SL_PG_SUPERPW@127.0.0.1:$SL_PG_PORT/postgres'"
    sl_info "metrics:         curl $METRICS_URL"
    sl_info "load again:      $SL_LOADTEST --compare '$DIRECT_URL' '$PROXY_URL' --workload write --profile burst --burst-size $BURST"
    sl_info "stop it all:     bash $WORK/stop.sh"
fi
[[ $VERDICT_OK == yes ]] || exit 1
