#!/usr/bin/env bash
# User-space instructions per transaction of Sluice, counted by callgrind: a number that barely
# moves on a shared, noisy machine (unlike time), for comparing two commits.
#
#   bash benches/callgrind.sh                        # 20,000 counted transactions per protocol
#   bash benches/callgrind.sh --transactions 50000 --keep
#   bash benches/callgrind.sh --pgbouncer            # and PgBouncer, counted the same way
#
# Builds Sluice (cargo build --release -p sluice, in the checkout this script belongs to: its
# parent directory; CARGO_TARGET_DIR is honoured), starts a throwaway PostgreSQL (initdb into a
# temporary directory, its own port, SCRAM; deploy/local/lib.sh), initialises a small pgbench
# database (pgbench -i -s 1) directly, and runs Sluice under
# `valgrind --tool=callgrind` (transaction pooling, pool size 20, worker_threads = 1 when the
# checkout has that setting, plain TCP on both hops, SCRAM logins). Then, for -M simple and
# -M extended in turn:
#
#   1. warm-up: pgbench -n -S -M MODE -c 10 -j 2, 2,000 transactions (--warmup);
#   2. callgrind_control -z: the counters are zeroed;
#   3. the counted run: the same pgbench command with the number of transactions asked for
#      (--transactions, spread over the clients with -t);
#   4. callgrind_control -d: the counters since step 2 are dumped (and zeroed), and the dump's
#      `summary:` line (instructions, Ir: callgrind_annotate's PROGRAM TOTALS) is divided by the
#      transactions pgbench reports.
#
# Counted are all of Sluice's threads in user space, from the zeroing to the dump: the
# transactions, and also the counted run's client logins and disconnections (10 SCRAM logins,
# about 65,000 instructions each: some 0.3% of the total at 20,000 transactions) and what Sluice
# does on its own meanwhile (the once-a-second sweep of idle clients, the metrics exporter's
# histogram upkeep). Kernel time (system calls, loopback TCP) is not counted. Instructions, not
# time: the count depends on the code and the compiler, not on how fast the machine is; compare
# commits built with the same toolchain. It still moves from run to run (by a few per cent with
# 10 clients), because of timing: how many requests are ready each time the runtime wakes up.
# Each time none is, tokio's scheduler parks (Context::park: epoll_wait, then the readiness
# events handed out to the tasks), at a cost of some 1,000-2,000 instructions; between runs of
# the same binary the parks per transaction went from 0.33 to 0.86. So the table also has the
# parks per transaction and the instructions per transaction outside those calls, which varied
# several times less here. The first is the measure; the second is the steadier view of the
# code around the runtime (it assumes tokio: with no Context::park in the profile it equals the
# first). Smaller effects: background ticks that fall in the run (the once-a-second sweep of
# idle clients, the metrics exporter's histogram upkeep), the allocator's state. --rounds N
# repeats the counted run and reports medians.
#
# With --pgbouncer, PgBouncer (transaction pooling, default_pool_size 20, auth_type
# scram-sha-256 with the role's SCRAM verifier from pg_authid in its auth_file, as compare.sh
# configures it: with a plaintext password there it would run PBKDF2 at every login) then runs
# under callgrind too, after Sluice has stopped, and is counted the same way. It has no
# Context::park: its last column equals its first.
#
# Prints a table: target, protocol, transactions, instructions, instructions per transaction, parks
# (event-loop waits) per transaction, instructions per transaction outside them. With --keep
# the callgrind dumps are kept (callgrind_annotate reads them), in a directory it names.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash benches/callgrind.sh [--transactions N] [--warmup N] [--clients N] [--rounds N]
                                 [--pgbouncer] [--keep]

  --transactions N  transactions counted per protocol (default 20000; rounded up to a multiple
                    of --clients: pgbench's -t is per client)
  --warmup N        transactions before the counters are zeroed, per protocol (default 2000)
  --clients N       pgbench clients, -c (default 10; -j 2, or 1 for one client). With 1 the
                    count varies less between runs (each transaction waits alone), but it is
                    another workload: compare like with like
  --rounds N        counted runs per protocol after its warm-up (default 1); with more than
                    one, each is a row and the median is reported too
  --pgbouncer       count PgBouncer the same way too, after Sluice (needs pgbouncer)
  --keep            keep the callgrind dumps (callgrind.out.simple, callgrind.out.extended,
                    with .N appended with --rounds; PgBouncer's with a pgbouncer. prefix) in a
                    new directory under ${TMPDIR:-/tmp}, printed at the end
EOF
}

TRANSACTIONS=20000 WARMUP=2000 CLIENTS=10 ROUNDS=1 KEEP=no PGBOUNCER=no
while [[ $# -gt 0 ]]; do
    case $1 in
        --transactions) TRANSACTIONS=${2:?}; shift ;;
        --warmup) WARMUP=${2:?}; shift ;;
        --clients) CLIENTS=${2:?}; shift ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --keep) KEEP=yes ;;
        --pgbouncer) PGBOUNCER=yes ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
for v in "$TRANSACTIONS" "$WARMUP" "$CLIENTS" "$ROUNDS"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "expected a positive number, got '$v'" >&2; exit 2; }
done
PROTOCOLS=(simple extended)
JOBS=$((CLIENTS < 2 ? CLIENTS : 2))
PG_MAX_CONNECTIONS=$((CLIENTS + 30))
POOL_SIZE=20
BENCH_USER=bench
BENCH_DB=benchdb
BENCH_PW=bench-pw-$RANDOM$RANDOM
export PGSSLMODE=disable
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" # pgbouncer is in /usr/sbin

# The checkout this script is in: its own helpers and its own Sluice.
SL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=deploy/local/lib.sh
source "$SL_ROOT/deploy/local/lib.sh"

WORK=
KEEP_DIR=
BENCH_PID=
PGB_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $BENCH_PID ]] && sl_stop_pid "$BENCH_PID" TERM 2
    [[ -n $PGB_PID ]] && sl_stop_pid "$PGB_PID" INT 5
    sl_sluice_stop
    sl_pg_stop
    if [[ -n $KEEP_DIR ]] && compgen -G "$KEEP_DIR/*" >/dev/null; then
        echo "callgrind dumps kept in $KEEP_DIR"
    elif [[ -n $KEEP_DIR ]]; then
        rmdir "$KEEP_DIR" 2>/dev/null || true
    fi
    [[ -n $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
sl_traps cleanup

sl_header "Setup"
sl_need_pkg '/usr/lib/postgresql/*/bin/initdb' postgresql
sl_need_pkg valgrind valgrind
sl_need_pkg curl curl
sl_need_pkg setpriv util-linux
command -v callgrind_control >/dev/null 2>&1 || sl_die "callgrind_control not found (valgrind)"
if [[ $PGBOUNCER == yes ]]; then sl_need_pkg pgbouncer pgbouncer; fi
command -v cargo >/dev/null 2>&1 ||
    sl_die "cargo not found: install a Rust toolchain (https://rustup.rs) and run again"
(cd "$SL_ROOT" && cargo build -q --release -p sluice) || sl_die "cargo build failed"
TARGET_DIR=$(cd "$SL_ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $TARGET_DIR ]] || TARGET_DIR=${CARGO_TARGET_DIR:-$SL_ROOT/target}
SLUICE_BIN=$TARGET_DIR/release/sluice
[[ -x $SLUICE_BIN ]] || sl_die "built binary not found: $SLUICE_BIN"
COMMIT=$(cd "$SL_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$SL_ROOT" && git status --porcelain -- proxy 2>/dev/null) ]]; then
    COMMIT+=" (with local changes in proxy/)"
fi
sl_info "Sluice: $SLUICE_BIN ($COMMIT)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-callgrind.XXXXXX")
chmod 711 "$WORK"
cd "$WORK"
if [[ $KEEP == yes ]]; then KEEP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sluice-callgrind-out.XXXXXX"); fi
sl_pick_run_user

sl_pg_start "$WORK/pg" "$PG_MAX_CONNECTIONS"
PGBENCH=$SL_PG_BINDIR/pgbench
sl_psql postgres "SET password_encryption = 'scram-sha-256';
    CREATE ROLE $BENCH_USER LOGIN PASSWORD '$BENCH_PW'" >/dev/null
sl_psql postgres "CREATE DATABASE $BENCH_DB OWNER $BENCH_USER" >/dev/null
sl_info "PostgreSQL on 127.0.0.1:$SL_PG_PORT; pgbench -i -s 1"
PGPASSWORD=$BENCH_PW "$PGBENCH" -i -s 1 -q -h 127.0.0.1 -p "$SL_PG_PORT" -U "$BENCH_USER" \
    "$BENCH_DB" >"$WORK/pgbench-init.log" 2>&1 || {
    cat "$WORK/pgbench-init.log" >&2
    sl_die "pgbench -i failed"
}

# Sluice under callgrind. The wrapper execs valgrind, which runs Sluice in its own process: the
# PID sl_sluice_start records is the one callgrind_control talks to. Older checkouts may not have
# worker_threads (the configuration refuses unknown keys): set it only when it exists.
SLUICE_ENV=("SLUICE_UPSTREAM=postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_PG_PORT/$BENCH_DB"
    SLUICE_POOL_MODE=transaction)
THREADS_DESC="worker_threads not in this checkout's configuration: the default runtime"
if grep -q 'worker_threads' "$SL_ROOT/proxy/src/config.rs"; then
    SLUICE_ENV+=(SLUICE_WORKER_THREADS=1)
    THREADS_DESC="worker_threads = 1"
fi
mkdir -p "$WORK/cg"
cat >"$WORK/sluice-callgrind" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --log-file='$WORK/valgrind.log' \\
    --callgrind-out-file='$WORK/cg/callgrind.out.%p' '$SLUICE_BIN' "\$@"
EOF
chmod +x "$WORK/sluice-callgrind"
SL_SLUICE=$WORK/sluice-callgrind
# sl_sluice_start waits up to 30 s for /readyz; Sluice starts in a few seconds under callgrind.
export "${SLUICE_ENV[@]}"
sl_sluice_start "$WORK/sluice.log" --pool-size "$POOL_SIZE" --max-server-connections "$POOL_SIZE"
for v in "${SLUICE_ENV[@]}"; do unset "${v%%=*}"; done
sl_info "Sluice under callgrind on 127.0.0.1:$SL_SLUICE_PORT (PID $SL_SLUICE_PID; transaction pooling, $THREADS_DESC)"

# pgbench_run MODE TRANSACTIONS LOG: select-only pgbench through the pooler counted (its port
# in CG_PORT); sets RUN_TXNS to the
# transactions it reports as processed. Fails when any failed or when fewer ran than asked for.
# (Not in a command substitution: the EXIT trap must know BENCH_PID.)
pgbench_run() {
    local mode=$1 per=$((($2 + CLIENTS - 1) / CLIENTS)) log=$3 rc=0 processed failed
    PGPASSWORD=$BENCH_PW PGCONNECT_TIMEOUT=30 "$PGBENCH" -n -S -M "$mode" -c "$CLIENTS" -j "$JOBS" \
        -t "$per" -h 127.0.0.1 -p "$CG_PORT" -U "$BENCH_USER" "$BENCH_DB" \
        </dev/null >"$log" 2>&1 &
    BENCH_PID=$!
    wait "$BENCH_PID" || rc=$?
    BENCH_PID=
    processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log")
    if [[ $rc -ne 0 || ${processed:-0} -ne $((per * CLIENTS)) || ${failed:-0} -ne 0 ]]; then
        tail -n 20 "$log" >&2
        sl_die "pgbench -M $mode: exit $rc, ${processed:-0} of $((per * CLIENTS)) transactions, ${failed:-?} failed (log $log)"
    fi
    RUN_TXNS=$processed
}

# callgrind CMD...: callgrind_control on the counted pooler's process (CG_PID), its output kept
# in the log; as the user the pooler runs as (CG_AS: vgdb wakes a process blocked in a system
# call with ptrace, which needs that user, or CAP_SYS_PTRACE).
CG_AS=()
callgrind() {
    "${CG_AS[@]}" callgrind_control "$@" "$CG_PID" >>"$WORK/callgrind_control.log" 2>&1 || {
        tail -n 20 "$WORK/callgrind_control.log" >&2
        sl_die "callgrind_control $* failed"
    }
}

# dump_totals NAME: dumps the counters, waits for the new dump file, renames it
# callgrind.out.NAME and sets DUMP_TOTAL to its total Ir, DUMP_PARKS to the calls of the
# runtime's Context::park in it (the scheduler waiting in epoll_wait when no task is ready, and
# then handing out the readiness events), and DUMP_PARK_IR to the instructions of those calls.
dump_totals() {
    local name=$1 before file='' total='' i
    before=$(compgen -G "$WORK/cg/callgrind.out.*" | sort || true)
    callgrind --dump="$name"
    for ((i = 0; i < 600; i++)); do
        file=$(compgen -G "$WORK/cg/callgrind.out.*" | sort | comm -13 <(printf '%s\n' "$before") - |
            head -n 1 || true)
        if [[ -n $file ]]; then
            # summary: is callgrind_annotate's PROGRAM TOTALS; totals: (the sum of the cost
            # lines) differs from it by a few hundred.
            total=$(awk '$1 == "summary:" { s = $2 } $1 == "totals:" { t = $2 }
                END { print (s != "" ? s : t) }' "$file")
            [[ -n $total ]] && break
        fi
        sleep 0.1
    done
    [[ -n $total ]] || sl_die "no callgrind dump with a total appeared for $name"
    mv "$file" "$WORK/cg/callgrind.out.$name"
    DUMP_TOTAL=$total
    # Function names are compressed: "cfn=(ID) NAME" the first time, "cfn=(ID)" after; a
    # "calls=N ..." line after a cfn= line is N calls to that function, and the line after it
    # their inclusive cost ("POSITION IR").
    read -r DUMP_PARKS DUMP_PARK_IR < <(awk '
        /^c?fn=\(/ {
            id = $1; sub(/^c?fn=/, "", id)
            nm = $0; sub(/^c?fn=\([0-9]+\) ?/, "", nm)
            if (nm != "") names[id] = nm
            if ($0 ~ /^cfn=/) callee = id
            next
        }
        take { ir += $2; take = 0; next }
        /^calls=/ {
            if (names[callee] ~ /::Context::park$/) { n = $1; sub(/^calls=/, "", n); parks += n; take = 1 }
        }
        END { printf "%d %d\n", parks, ir }' "$WORK/cg/callgrind.out.$name")
}

# count TARGET: the counted runs of the pooler in CG_PID / CG_PORT: per protocol a warm-up,
# then ROUNDS times zero, count, dump.
declare -A TXNS=() INSTR=() PARKS=() PARK_IR=()
count() {
    local t=$1 mode r name
    for mode in "${PROTOCOLS[@]}"; do
        sl_header "$t: -M $mode"
        pgbench_run "$mode" "$WARMUP" "$WORK/warmup-$t-$mode.log"
        sl_info "warm-up: $RUN_TXNS transactions"
        for ((r = 1; r <= ROUNDS; r++)); do
            name=$mode
            if ((ROUNDS > 1)); then name+=.$r; fi
            if [[ $t != sluice ]]; then name=$t.$name; fi
            callgrind --zero
            pgbench_run "$mode" "$TRANSACTIONS" "$WORK/counted-$name.log"
            TXNS[$t|$mode|$r]=$RUN_TXNS
            dump_totals "$name"
            INSTR[$t|$mode|$r]=$DUMP_TOTAL PARKS[$t|$mode|$r]=$DUMP_PARKS
            PARK_IR[$t|$mode|$r]=$DUMP_PARK_IR
            sl_info "counted: $RUN_TXNS transactions, $DUMP_TOTAL instructions; $DUMP_PARKS event-loop waits, $DUMP_PARK_IR instructions in them"
            if [[ $KEEP == yes ]]; then cp "$WORK/cg/callgrind.out.$name" "$KEEP_DIR/"; fi
        done
    done
}
CG_PID=$SL_SLUICE_PID CG_PORT=$SL_SLUICE_PORT
count sluice
TARGETS=(sluice)
PGB_VERSION=

# PgBouncer, configured as compare.sh does, under callgrind as the run user (it refuses to run
# as root); valgrind's PID is PgBouncer's.
if [[ $PGBOUNCER == yes ]]; then
    sl_sluice_stop
    PGB_BIN=$(command -v pgbouncer)
    PGB_VERSION=$("$PGB_BIN" --version | awk 'NR == 1 { print $2 }')
    mkdir -p "$WORK/pgbouncer"
    sl_scram_userlist "$WORK/pgbouncer/userlist.txt" "$BENCH_USER"
    PGB_PORT=$(sl_pick_port)
    sl_pgbouncer_ini "$WORK/pgbouncer" "$BENCH_DB" "$PGB_PORT" scram-sha-256 \
        "$WORK/pgbouncer/userlist.txt" "$POOL_SIZE" 1000 >"$WORK/pgbouncer/pgbouncer.ini"
    chmod 600 "$WORK/pgbouncer/userlist.txt"
    sl_give "$WORK/pgbouncer"
    sl_give "$WORK/cg"
    "${SL_RUN_AS[@]}" valgrind --tool=callgrind --log-file="$WORK/pgbouncer/valgrind.log" \
        --callgrind-out-file="$WORK/cg/callgrind.out.%p" "$PGB_BIN" -q \
        "$WORK/pgbouncer/pgbouncer.ini" </dev/null >>"$WORK/pgbouncer/stdout.log" 2>&1 &
    PGB_PID=$!
    sl_wait_port "$PGB_PID" "$PGB_PORT" 300 || {
        tail -n 20 "$WORK/pgbouncer/pgbouncer.log" "$WORK/pgbouncer/valgrind.log" >&2 || true
        sl_die "PgBouncer did not start under callgrind"
    }
    sl_info "PgBouncer $PGB_VERSION under callgrind on 127.0.0.1:$PGB_PORT (PID $PGB_PID; transaction pooling, the SCRAM verifier in auth_file)"
    CG_PID=$PGB_PID CG_PORT=$PGB_PORT CG_AS=("${SL_RUN_AS[@]}")
    count pgbouncer
    TARGETS+=(pgbouncer)
fi

per_txn() { awk -v i="$1" -v t="$2" -v f="${3:-%.0f}" 'BEGIN { printf f, i / t }'; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

sl_header "Instructions per transaction (Sluice $COMMIT${PGB_VERSION:+, PgBouncer $PGB_VERSION}, user space, callgrind)"
echo
echo "| target | protocol | transactions | instructions | instructions / transaction | event-loop waits / transaction | instructions / transaction outside the waits |"
echo "|---|---|---:|---:|---:|---:|---:|"
range() { printf '%s (%s to %s)' "$(median "$@")" "$(printf '%s\n' "$@" | sort -n | head -n 1)" \
    "$(printf '%s\n' "$@" | sort -n | tail -n 1)"; }
declare -A MED=()
for t in "${TARGETS[@]}"; do
    for mode in "${PROTOCOLS[@]}"; do
        ipt=() opt=()
        for ((r = 1; r <= ROUNDS; r++)); do
            label=$mode
            if ((ROUNDS > 1)); then label+=" ($r)"; fi
            k="$t|$mode|$r"
            ipt+=("$(per_txn "${INSTR[$k]}" "${TXNS[$k]}")")
            opt+=("$(per_txn "$((INSTR[$k] - PARK_IR[$k]))" "${TXNS[$k]}")")
            printf '| %s | %s | %d | %d | %s | %s | %s |\n' "$t" "$label" "${TXNS[$k]}" \
                "${INSTR[$k]}" "${ipt[-1]}" "$(per_txn "${PARKS[$k]}" "${TXNS[$k]}" %.2f)" "${opt[-1]}"
        done
        MED[$t|$mode]=$(median "${ipt[@]}")
        if ((ROUNDS > 1)); then
            printf '| %s | %s, median (lowest to highest) | | | %s | | %s |\n' "$t" "$mode" \
                "$(range "${ipt[@]}")" "$(range "${opt[@]}")"
        fi
    done
done
if [[ $PGBOUNCER == yes ]]; then
    echo
    for mode in "${PROTOCOLS[@]}"; do
        echo "- $mode: Sluice $(awk -v a="${MED[sluice|$mode]}" -v b="${MED[pgbouncer|$mode]}" \
            'BEGIN { printf "%.2fx", a / b }') PgBouncer's instructions per transaction"
    done
fi
echo
echo "pgbench -n -S -M PROTOCOL -c $CLIENTS -j $JOBS through Sluice${PGB_VERSION:+, then PgBouncer,} under callgrind ($(valgrind --version));"
echo "$WARMUP transactions of warm-up per protocol, then per counted run: counters zeroed"
echo "(callgrind_control -z), the run, a dump (callgrind_control -d); $THREADS_DESC, transaction"
echo "pooling, SCRAM logins${PGB_VERSION:+ (PgBouncer: a SCRAM verifier in its auth_file)}. Event-loop waits: calls of tokio's Context::park (no task ready: the"
echo "scheduler waits in epoll_wait, then hands out the readiness events). How many there are"
echo "depends on how the clients' requests happen to bunch up, and is most of what varies from run"
echo "to run; the last column leaves the instructions inside those calls out."
