#!/usr/bin/env bash
# End-to-end comparison of Sluice with PgBouncer (and PostgreSQL directly): pgbench workloads,
# memory per idle client, and one large result relayed; in plain TCP and, for some workloads and
# the idle clients, with TLS on both hops (client to pooler, pooler to server).
#
#   bash benches/compare.sh                      # 3 rounds of 10 s runs, scale 10 (~20 minutes)
#   bash benches/compare.sh --quick              # 1 round of 1 s runs, small sizes (CI; ~1 minute)
#   bash benches/compare.sh --rounds 5 --duration 20 --out /tmp/results.md
#
# Starts a throwaway PostgreSQL (max_connections 60, SCRAM), PgBouncer (transaction pooling,
# default_pool_size 20; scram-sha-256 with the verifier copied from pg_authid, or, for the md5
# workload, a second configuration with auth_type md5 and the plaintext password in its
# userlist) and Sluice (pool size 20, budget 20; SLUICE_CLIENT_AUTH=md5 for the md5 workload),
# initialises pgbench data directly, then:
#
# TLS: a throwaway CA and server certificate (ECDSA P-256, SHA-256 signatures, SAN IP:127.0.0.1
# and DNS:localhost, valid 2 days) are made with openssl in the temporary directory. PostgreSQL
# runs with ssl = on and that certificate, and still accepts plain TCP (pg_hba "host" lines). The
# plain-TCP rows stay plain on both hops: clients get PGSSLMODE=disable, Sluice's upstream URL
# says sslmode=disable, PgBouncer has no TLS settings. The TLS rows (marked "TLS") use a third
# PgBouncer configuration (client_tls_sslmode = allow with the certificate and key,
# server_tls_sslmode = require; its default TLS protocols and ciphers) and Sluice with
# client_tls = allow and the same certificate and key, and upstream sslmode=require
# (server_tls = require); clients use PGSSLMODE=require, hold_clients --tls-ca (rustls, verifying
# the certificate). Before each TLS run, psql logs in through the target with sslmode=verify-full
# against the CA and asks PostgreSQL about its own end of the connection (pg_stat_ssl of
# pg_backend_pid(): the pooler's server connection), and tries channel_binding=require; the
# script stops with an error unless both hops are TLS. After each pooler run, the pooler's server
# connections are read from pg_stat_ssl: all must be TLS in the TLS rows, none in the others.
#
# 1. pgbench workloads (select-only, -S), each against each target, in rounds whose target order
#    alternates: simple, extended and prepared protocol with 50 clients; a new connection per
#    transaction (-C) with 50 clients, SCRAM and md5 client authentication; -C with 400 clients;
#    5,000 persistent clients; with TLS: simple protocol with 50 clients, and a connection per
#    transaction with 50 clients (a TLS handshake and a SCRAM login each). The pooler's CPU is
#    also kept as user and system time apart (a table of its own for the steady workloads). Each pooler runs only during its own runs (started fresh before,
#    stopped after), so the server connections it keeps cannot take room from the other targets:
#    60 connections do not fit 50 direct clients next to two pools of 20. Before each run, the
#    authentication the target asks for is read from its reply to a startup packet, so the
#    report shows what was negotiated (md5 or SCRAM-SHA-256). Reported per workload and target:
#    medians over the rounds of tps, average latency, tps as a ratio to PgBouncer's and to
#    PostgreSQL's directly in the same round, the CPU seconds the pooler process used per 1,000
#    transactions (utime + stime from /proc/PID/stat) and its ratio to PgBouncer's; failed
#    transactions and aborted clients are summed over the rounds. Also measured in every run, for
#    the "where the CPU goes" table: pgbench's CPU (the shell's children times around its wait)
#    and PostgreSQL's (the postmaster, its live children and its reaped children, from
#    /proc/PID/stat), per 1,000 transactions. PgBouncer 1.18 has no
#    protocol-level prepared statements in transaction pooling: its -M prepared run is made and
#    reported as it goes, but is no baseline; that row's Sluice ratio is to direct. The md5
#    workload has no direct run of its own (PostgreSQL here asks for SCRAM): its "vs direct"
#    uses the SCRAM -C run of the same round.
# 2. Idle clients: for each pooler (fresh), a warm-up of 50 connections that each run SELECT 1
#    and leave, then VmRSS; then benches' hold_clients opens 5,000 connections (64 at a time,
#    SELECT 1 on each) and holds them idle, and VmRSS again: (held - before) / 5,000 per client.
#    Then the same with TLS clients (each pooler fresh, in its TLS configuration).
# 3. One large result: psql fetching SELECT repeat('x', 1000) FROM generate_series(1, N) (about
#    1 KB of DataRow per row: 10 MB and 50 MB) directly and through each pooler, timed
#    repetitions in alternating order; both poolers run through this phase, and their VmRSS before
#    and after and VmHWM (peak) after each size show whether their memory follows the result size.
# 4. Many connected clients, open loop (sluice-loadtest: point reads by primary key over the
#    extended protocol, the unnamed statement; md5 logins, so that the clients connect within
#    seconds): first each pooler's capacity, a closed loop of 100 workers for DURATION s (warm
#    model, 100 containers); then, in ROUNDS rounds whose order alternates, arrivals at a fixed
#    rate of --open-load per cent of the smaller capacity for 2 x DURATION s with
#    --open-clients containers, each connected before the run (warm model: that many clients
#    connected to the pooler throughout) and max concurrency as large. Reported: the
#    invocations' p50 and p99 latency (from the intended start, so queueing counts), failures,
#    and the pooler's CPU per invocation. For this phase only, Sluice's max_client_connections is
#    raised above the clients (its default is 10,000).
#
# Prints a Markdown report: the pgbench table, the issue's targets with the measured value and
# whether each is met, and the memory and large-result tables (and writes it to --out FILE).
#
# Everything runs on this machine over 127.0.0.1, pgbench included, so the targets share the
# CPUs with the load generator: compare the targets with each other, not with other machines.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash benches/compare.sh [--quick] [--rounds N] [--duration SECONDS] [--scale N]
                               [--fanout-clients N] [--many-clients N] [--idle-clients N]
                               [--large-reps N] [--open-clients N] [--open-load PERCENT]
                               [--sluice-threads N] [--out FILE] [--bin-dir DIR]

  --quick            1 round of 1 s runs at scale 1, 500 many/idle/open-loop clients, 1
                     repetition of the large results (a smoke test of this script, for CI)
  --rounds N         rounds; the order of the targets alternates between them (default 3)
  --duration S       seconds per pgbench run (default 10)
  --scale N          pgbench -i scale factor (default 10)
  --fanout-clients N clients of the fan-out workload, a connection per transaction (default 400)
  --many-clients N   persistent clients of the many-clients workload (default 5000)
  --idle-clients N   idle clients held for the memory measurement (default 5000)
  --large-reps N     timed repetitions of each large result per target (default 5)
  --open-clients N   connected clients of the open-loop phase (default 10000)
  --open-load P      its arrival rate, in per cent of the smaller closed-loop capacity
                     (default 70)
  --sluice-threads N Sluice's worker_threads (default 0: Sluice's own default, which is one
                     thread on a host of one or two CPUs and one per CPU on larger ones)
  --out FILE         also write the Markdown report to FILE
  --bin-dir DIR      use the sluice, sluice-loadtest and hold_clients binaries in DIR (e.g.
                     target/release, or $CARGO_TARGET_DIR/release) instead of building them;
                     without it they are built into cargo's target directory (CARGO_TARGET_DIR
                     is honoured)
EOF
}

ROUNDS=3 DURATION=10 SCALE=10 FANOUT=400 MANY=5000 IDLE=5000 LARGE_REPS=5 SLUICE_THREADS=0 OUT='' BIN_DIR=''
OPEN_CLIENTS=10000 OPEN_LOAD=70
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) ROUNDS=1 DURATION=1 SCALE=1 MANY=500 IDLE=500 LARGE_REPS=1 OPEN_CLIENTS=500 ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --duration) DURATION=${2:?}; shift ;;
        --scale) SCALE=${2:?}; shift ;;
        --fanout-clients) FANOUT=${2:?}; shift ;;
        --many-clients) MANY=${2:?}; shift ;;
        --idle-clients) IDLE=${2:?}; shift ;;
        --large-reps) LARGE_REPS=${2:?}; shift ;;
        --open-clients) OPEN_CLIENTS=${2:?}; shift ;;
        --open-load) OPEN_LOAD=${2:?}; shift ;;
        --sluice-threads) SLUICE_THREADS=${2:?}; shift ;;
        --out) OUT=${2:?}; shift ;;
        --bin-dir) BIN_DIR=${2:?}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
for v in "$ROUNDS" "$DURATION" "$SCALE" "$FANOUT" "$MANY" "$IDLE" "$LARGE_REPS" "$OPEN_CLIENTS" \
    "$OPEN_LOAD"; do
    [[ $v =~ ^[1-9][0-9]*$ ]] || { echo "expected a positive number, got '$v'" >&2; exit 2; }
done
[[ $SLUICE_THREADS =~ ^[0-9]+$ ]] || { echo "expected a number of threads, got '$SLUICE_THREADS'" >&2; exit 2; }
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
WARM_CLIENTS=50       # connections of the warm-up before the idle-client measurement
LARGE_MB=(10 50)      # large results, in thousands of 1,000-byte rows (about MB of DataRows)
GROWTH_LIMIT_KIB=2048 # "does not grow with result size": peak RSS after 50 MB within this of 10 MB

# The pgbench workloads, in the order they run and are reported. Each run adds -n (no vacuum
# first: the tables are only read) and -T DURATION.
#   WL_NAME    label in the report
#   WL_OPTS    pgbench options
#   WL_AUTH    client authentication the poolers ask for: scram or md5
#   WL_TARGETS targets run
#   WL_DIRECT  workload whose direct run is this one's "vs direct" baseline (default: itself)
#   WL_NOPGB   why PgBouncer cannot serve this workload (it is not run; empty: it can)
#   WL_EXTRA_T seconds added to -T: pgbench connects its clients (one at a time per thread)
#              within -T, before the timed part starts
#   WL_TLS     yes: TLS on both hops (see the top of this file)
WORKLOADS=(simple extended prepared connect connect_md5 fanout many simple_tls connect_tls)
declare -A WL_NAME=(
    [simple]="select simple"
    [extended]="select extended"
    [prepared]="select prepared"
    [connect]="select, connection per transaction, SCRAM"
    [connect_md5]="select, connection per transaction, md5"
    [fanout]="fan-out: $FANOUT clients, connection per transaction"
    [many]="$MANY concurrent clients, md5"
    [simple_tls]="TLS, select simple"
    [connect_tls]="TLS, select, connection per transaction, SCRAM"
)
declare -A WL_OPTS=(
    [simple]="-S -M simple -c 50 -j 2"
    [extended]="-S -M extended -c 50 -j 2"
    [prepared]="-S -M prepared -c 50 -j 2"
    [connect]="-S -C -c 50 -j 2"
    [connect_md5]="-S -C -c 50 -j 2"
    [fanout]="-S -C -c $FANOUT -j 2"
    [many]="-S -c $MANY -j 2"
    [simple_tls]="-S -M simple -c 50 -j 2"
    [connect_tls]="-S -C -c 50 -j 2"
)
declare -A WL_AUTH=([connect_md5]=md5 [many]=md5)
declare -A WL_TARGETS=([connect_md5]="pgbouncer sluice" [prepared]="direct sluice")
declare -A WL_DIRECT=([connect_md5]=connect)
declare -A WL_NOPGB=(
    [prepared]="PgBouncer 1.18 has no prepared statements in transaction pooling"
)
declare -A WL_EXTRA_T=([many]=$(((MANY + 999) / 1000)))
declare -A WL_TLS=([simple_tls]=yes [connect_tls]=yes)
for k in "${WORKLOADS[@]}"; do
    : "${WL_AUTH[$k]:=scram}" "${WL_TARGETS[$k]:=${TARGETS[*]}}" "${WL_DIRECT[$k]:=$k}"
    : "${WL_NOPGB[$k]:=}" "${WL_EXTRA_T[$k]:=0}" "${WL_TLS[$k]:=no}"
done
# Plain TCP unless a run asks for TLS: PostgreSQL offers TLS here, and libpq's default (prefer)
# would take it.
export PGSSLMODE=disable

WORK=
PGB_PID=
BENCH_PID=
HOLD_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $BENCH_PID ]] && sl_stop_pid "$BENCH_PID" TERM 2
    [[ -n $HOLD_PID ]] && sl_stop_pid "$HOLD_PID" TERM 5
    [[ -n $PGB_PID ]] && sl_stop_pid "$PGB_PID" INT 5
    sl_sluice_stop
    sl_pg_stop
    [[ -n $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
sl_traps cleanup

sl_header "Setup"
sl_need_pkg '/usr/lib/postgresql/*/bin/initdb' postgresql
sl_need_pkg pgbouncer pgbouncer
sl_need_pkg curl curl
sl_need_pkg setpriv util-linux
sl_need_pkg openssl openssl
sl_build "$BIN_DIR"
# hold_clients (benches/src/bin) lives next to sluice: in DIR with --bin-dir, else built here.
HOLD_CLIENTS=$(dirname "$SL_SLUICE")/hold_clients
if [[ -z $BIN_DIR ]]; then
    (cd "$SL_ROOT" && cargo build -q --release -p sluice-benches --bin hold_clients) ||
        sl_die "cargo build of hold_clients failed"
fi
[[ -x $HOLD_CLIENTS ]] ||
    sl_die "no $HOLD_CLIENTS (cargo build --release -p sluice-benches --bin hold_clients)"
PGB_BIN=$(command -v pgbouncer)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
chmod 711 "$WORK"
cd "$WORK"
sl_pick_run_user
# PgBouncer and Sluice want a descriptor per client and server connection, and so do pgbench and
# hold_clients per connection.
sl_raise_nofile
for n in "$MANY" "$IDLE" "$FANOUT" "$OPEN_CLIENTS"; do
    (($(ulimit -Sn) >= n + 200)) ||
        sl_die "open files limit $(ulimit -Sn) is too low for $n clients (raise ulimit -n)"
done

# make_tls DIR: a throwaway CA (ca.crt) and a server certificate signed by it (server.crt,
# server.key), ECDSA P-256 with SHA-256, for 127.0.0.1 and localhost; owned by the run user (the
# key 0600, as PostgreSQL wants it). Sluice runs as the script's user: root, or the run user.
make_tls() {
    local d=$1
    mkdir -p "$d"
    cat >"$d/ca.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = sluice-bench throwaway CA
[ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    cat >"$d/server.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = 127.0.0.1
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
    {
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/ca.key" &&
            openssl req -x509 -new -key "$d/ca.key" -sha256 -days 2 -config "$d/ca.cnf" \
                -extensions ext -out "$d/ca.crt" &&
            openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$d/server.key" &&
            openssl req -new -key "$d/server.key" -config "$d/server.cnf" -out "$d/server.csr" &&
            openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" \
                -CAcreateserial -sha256 -days 2 -extfile "$d/server.cnf" -extensions ext \
                -out "$d/server.crt" &&
            openssl verify -CAfile "$d/ca.crt" "$d/server.crt"
    } >"$d/openssl.log" 2>&1 || {
        cat "$d/openssl.log" >&2
        sl_die "making the test certificates with openssl failed"
    }
    chmod 600 "$d/server.key" "$d/ca.key"
    chmod 644 "$d/ca.crt" "$d/server.crt"
    sl_give "$d"
}
TLS_DIR=$WORK/tls
make_tls "$TLS_DIR"
sl_info "TLS: throwaway CA and server certificate (ECDSA P-256) in $TLS_DIR"

sl_pg_start "$WORK/pg" "$PG_MAX_CONNECTIONS" "shared_buffers = 256MB" \
    "ssl = on" "ssl_cert_file = '$TLS_DIR/server.crt'" "ssl_key_file = '$TLS_DIR/server.key'"
PG_SSL=$(sl_psql postgres "SHOW ssl")
[[ $PG_SSL == on ]] || sl_die "PostgreSQL did not turn ssl on (SHOW ssl: $PG_SSL)"
PGBENCH=$SL_PG_BINDIR/pgbench
PSQL=$SL_PG_BINDIR/psql
sl_psql postgres "SET password_encryption = 'scram-sha-256';
    CREATE ROLE $BENCH_USER LOGIN PASSWORD '$BENCH_PW'" >/dev/null
sl_psql postgres "CREATE DATABASE $BENCH_DB OWNER $BENCH_USER" >/dev/null
sl_info "PostgreSQL on 127.0.0.1:$SL_PG_PORT (max_connections $PG_MAX_CONNECTIONS); pgbench -i -s $SCALE"
PGPASSWORD=$BENCH_PW "$PGBENCH" -i -s "$SCALE" -q -h 127.0.0.1 -p "$SL_PG_PORT" -U "$BENCH_USER" \
    "$BENCH_DB" >"$WORK/pgbench-init.log" 2>&1 || {
    cat "$WORK/pgbench-init.log" >&2
    sl_die "pgbench -i failed"
}

# PgBouncer, two configurations. scram: scram-sha-256 with the server's own verifier, so it can
# log in to PostgreSQL on the client's behalf (SCRAM pass-through) without knowing the password.
# md5: auth_type md5 needs an md5 hash or the plaintext password in the userlist, and only the
# plaintext also lets PgBouncer answer PostgreSQL's SCRAM challenge.
mkdir -p "$WORK/pgbouncer"
sl_scram_userlist "$WORK/pgbouncer/userlist-scram.txt" "$BENCH_USER"
printf '"%s" "%s"\n' "$BENCH_USER" "$BENCH_PW" >"$WORK/pgbouncer/userlist-md5.txt"
PGB_PORT=$(sl_pick_port)
for auth in scram md5 scram-tls; do
    {
        sl_pgbouncer_ini "$WORK/pgbouncer" "$BENCH_DB" "$PGB_PORT" \
            "$([[ $auth == md5 ]] && echo md5 || echo scram-sha-256)" \
            "$WORK/pgbouncer/userlist-${auth%-tls}.txt" "$POOL_SIZE" \
            $((OPEN_CLIENTS + 2000 > 10000 ? OPEN_CLIENTS + 2000 : 10000))
        echo "; Sluice's listener has tokio's backlog of 1024; give PgBouncer the same."
        echo "listen_backlog = 1024"
    } >"$WORK/pgbouncer/pgbouncer-$auth.ini"
done
cat >>"$WORK/pgbouncer/pgbouncer-scram-tls.ini" <<EOF
; TLS on both hops (the TLS rows); default client_tls_protocols and client_tls_ciphers.
client_tls_sslmode = allow
client_tls_cert_file = $TLS_DIR/server.crt
client_tls_key_file = $TLS_DIR/server.key
server_tls_sslmode = require
EOF
chmod 600 "$WORK"/pgbouncer/userlist-*.txt
sl_give "$WORK/pgbouncer"

# start_pgbouncer [scram|md5|scram-tls]
start_pgbouncer() {
    local auth=${1:-scram}
    "${SL_RUN_AS[@]}" "$PGB_BIN" -q "$WORK/pgbouncer/pgbouncer-$auth.ini" </dev/null \
        >>"$WORK/pgbouncer/stdout.log" 2>&1 &
    PGB_PID=$!
    sl_wait_port "$PGB_PID" "$PGB_PORT" && return 0
    tail -n 20 "$WORK/pgbouncer/pgbouncer.log" "$WORK/pgbouncer/stdout.log" >&2 || true
    sl_die "PgBouncer did not start"
}
stop_pgbouncer() {
    sl_stop_pid "$PGB_PID" INT 10 # SIGINT: safe shutdown, waits for transactions to end
    PGB_PID=
}
# start_sluice [scram|md5|scram-tls]: the password comes from the upstream URL (plaintext),
# which serves both exchanges; the default client_auth is SCRAM-SHA-256. Plain TCP to the server
# (sslmode=disable: PostgreSQL here offers TLS, and Sluice's default is prefer) except for
# scram-tls: TLS on both hops.
start_sluice() {
    local auth=${1:-scram}
    local upstream="postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_PG_PORT/$BENCH_DB?sslmode=disable"
    if [[ $auth == scram-tls ]]; then
        SLUICE_CLIENT_TLS=allow SLUICE_CLIENT_TLS_CERT_FILE=$TLS_DIR/server.crt \
            SLUICE_CLIENT_TLS_KEY_FILE=$TLS_DIR/server.key SLUICE_SERVER_TLS=require \
            SLUICE_WORKER_THREADS=$SLUICE_THREADS SLUICE_UPSTREAM=${upstream%=disable}=require \
            sl_sluice_start "$WORK/sluice.log" \
            --pool-size "$POOL_SIZE" --max-server-connections "$POOL_SIZE"
    elif [[ $auth == md5 ]]; then
        SLUICE_CLIENT_AUTH=md5 SLUICE_WORKER_THREADS=$SLUICE_THREADS SLUICE_UPSTREAM=$upstream \
            sl_sluice_start "$WORK/sluice.log" \
            --pool-size "$POOL_SIZE" --max-server-connections "$POOL_SIZE"
    else
        SLUICE_WORKER_THREADS=$SLUICE_THREADS SLUICE_UPSTREAM=$upstream \
            sl_sluice_start "$WORK/sluice.log" \
            --pool-size "$POOL_SIZE" --max-server-connections "$POOL_SIZE"
    fi
}
# The client port of a target (whose pooler is running).
port_of() {
    case $1 in
        direct) echo "$SL_PG_PORT" ;;
        pgbouncer) echo "$PGB_PORT" ;;
        sluice) echo "$SL_SLUICE_PORT" ;;
    esac
}

# auth_request PORT: the authentication the server on PORT asks a new client for, read from its
# first reply to a startup packet (user and database of the benchmark): md5, scram (SASL),
# password (cleartext), trust, or "?" when the reply is something else (an error, nothing).
auth_request() {
    local port=$1 fd len reply
    local -a b
    len=$((8 + 5 + ${#BENCH_USER} + 1 + 9 + ${#BENCH_DB} + 1 + 1))
    exec {fd}<>"/dev/tcp/127.0.0.1/$port" || { echo '?'; return 0; }
    # Int32 length, Int32 protocol 3.0, "user\0U\0database\0D\0\0".
    # shellcheck disable=SC2059 # the format is built with the length byte in it
    printf "\\x00\\x00\\x00\\x$(printf %02x "$len")\\x00\\x03\\x00\\x00user\\x00%s\\x00database\\x00%s\\x00\\x00" \
        "$BENCH_USER" "$BENCH_DB" 1>&"$fd" 2>/dev/null || true
    reply=$(timeout 5 head -c 9 <&"$fd" | od -An -tu1 || true)
    exec {fd}>&-
    read -r -a b <<<"$reply"
    if [[ ${#b[@]} -eq 9 && ${b[0]} -eq 82 ]]; then # 'R': AuthenticationXXX, code in b[5..8]
        case $(((b[5] << 24) | (b[6] << 16) | (b[7] << 8) | b[8])) in
            0) echo trust ;;
            3) echo password ;;
            5) echo md5 ;;
            10) echo scram ;;
            *) echo '?' ;;
        esac
    else
        echo '?'
    fi
}

# tls_check TARGET: logs in through TARGET (its pooler running) with TLS, sslmode=verify-full
# against the test CA, and asks PostgreSQL about its end of that session's server connection;
# records in T[TARGET|...] the client hop's and the server hop's TLS version and cipher and
# whether channel binding (SCRAM-SHA-256-PLUS) works toward TARGET. Fails unless both hops are
# TLS: the TLS rows must not quietly measure something else.
declare -A T=()
tls_check() {
    local target=$1 port out client server
    port=$(port_of "$target")
    out=$(PGSSLMODE=verify-full PGSSLROOTCERT=$TLS_DIR/ca.crt PGPASSWORD=$BENCH_PW \
        PGCONNECT_TIMEOUT=10 "$PSQL" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" \
        -U "$BENCH_USER" -d "$BENCH_DB" -c '\conninfo' \
        -c "SELECT 'server-hop|' || ssl || '|' || coalesce(version, '') || '|' || coalesce(cipher, '')
            FROM pg_stat_ssl WHERE pid = pg_backend_pid()" </dev/null 2>&1) ||
        sl_die "TLS login (sslmode=verify-full) through $target failed: $out"
    client=$(sed -n 's/^SSL connection (protocol: \([^,]*\), cipher: \([^,)]*\).*/\1 \2/p' <<<"$out")
    server=$(awk -F'|' '$1 == "server-hop" && $2 == "true" { print $3 " " $4 }' <<<"$out")
    [[ -n $client ]] || sl_die "the TLS login through $target did not report TLS on its end: $out"
    [[ -n $server ]] || sl_die "the server connection behind $target is not TLS: $out"
    T[$target|client]=$client T[$target|server]=$server
    if PGSSLMODE=require PGCHANNELBINDING=require PGPASSWORD=$BENCH_PW PGCONNECT_TIMEOUT=10 \
        "$PSQL" -X -At -h 127.0.0.1 -p "$port" -U "$BENCH_USER" -d "$BENCH_DB" -c 'SELECT 1' \
        </dev/null >/dev/null 2>&1; then
        T[$target|cb]=yes
    else
        T[$target|cb]=no
    fi
}
# server_tls_count: "TLS/all" of the benchmark user's server connections now open.
server_tls_count() {
    sl_psql postgres "SELECT count(*) FILTER (WHERE s.ssl) || '/' || count(*)
        FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
        WHERE a.usename = '$BENCH_USER' AND a.backend_type = 'client backend'"
}
# pg_cpu_seconds: CPU seconds (user + system) PostgreSQL has used so far: the postmaster's own,
# its reaped children's (backends that ended), and its live children's.
pg_cpu_seconds() {
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } |
        awk -v pp="$SL_PG_PID" -v tck="$SL_CLK_TCK" '{
            pid = $1; sub(/^.*\) /, "")
            if (pid == pp) s += $12 + $13 + $14 + $15; else if ($2 == pp) s += $12 + $13
        } END { printf "%.3f\n", s / tck }'
}
# cpu_split PID: "USER SYSTEM" seconds the process has used so far (utime, stime).
cpu_split() {
    awk -v tck="$SL_CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.3f %.3f\n", $12 / tck, $13 / tck }' \
        "/proc/$1/stat"
}
# children_cpu FILE: user + system seconds of this shell's reaped children, from `times` output.
children_cpu() {
    awk 'NR == 2 {
        for (i = 1; i <= 2; i++) { split($i, a, "m"); sub(/s$/, "", a[2]); s += a[1] * 60 + a[2] }
        printf "%.3f\n", s
    }' "$1"
}

# Memory of a process from /proc/PID/status, in KiB: rss_kib PID [VmRSS|VmHWM].
rss_kib() {
    awk -v k="${2:-VmRSS}:" '$1 == k { print $2 }' "/proc/$1/status"
}

# median of the arguments ("nan" values are skipped; "-" when none is left)
median() {
    printf '%s\n' "$@" | awk '$1 != "nan" && $1 != "" && $1 != "-" { v[n++] = $1 }
        END {
            if (n == 0) { print "-"; exit }
            for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
            m = (n % 2) ? v[int(n / 2)] : (v[n / 2 - 1] + v[n / 2]) / 2
            print m
        }'
}
fmt() { awk -v x="$1" -v f="$2" 'BEGIN { if (x == "-" || x == "nan" || x == "") print "-"; else printf f, x }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || a == "-" || a == "" || !(b > 0)) print "nan"; else printf "%.4f", a / b }'; }

# Versions for the report.
PG_VERSION=$("$SL_PG_BINDIR/postgres" --version | awk '{print $3}')
PGBENCH_VERSION=$("$PGBENCH" --version | awk '{print $3}')
PGB_VERSION=$("$PGB_BIN" --version | awk 'NR == 1 {print $2}')
SLUICE_VERSION=$("$SL_SLUICE" --version | awk '{print $2}')
SLUICE_COMMIT=$(cd "$SL_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$SL_ROOT" && git status --porcelain -- proxy 2>/dev/null) ]]; then
    SLUICE_COMMIT+=" (with local changes)"
fi

# run_one WORKLOAD TARGET ROUND: one pgbench run; records the results in R[...].
declare -A R=()
run_one() {
    local wl=$1 target=$2 round=$3 auth=${WL_AUTH[$1]} port pid='' cpu0=0 cpu1=0 log rc=0 asked
    local opts=${WL_OPTS[$wl]} tls=${WL_TLS[$1]} sslmode=disable pg0 pg1 cl0 cl1 srv=-
    local u0=0 s0=0 u1=0 s1=0
    if [[ $tls == yes ]]; then auth+=-tls sslmode=require; fi
    case $target in
        pgbouncer) start_pgbouncer "$auth"; pid=$PGB_PID ;;
        sluice) start_sluice "$auth"; pid=$SL_SLUICE_PID ;;
    esac
    port=$(port_of "$target")
    asked=$(auth_request "$port")
    if [[ $tls == yes ]]; then
        tls_check "$target"
        # libpq takes SCRAM-SHA-256-PLUS (channel binding) whenever it is offered over TLS.
        if [[ $asked == scram && ${T[$target|cb]} == yes ]]; then asked=scram-plus; fi
    fi
    log=$WORK/run-$round-$wl-$target.log
    [[ -n $pid ]] && cpu0=$(sl_cpu_seconds "$pid") && read -r u0 s0 < <(cpu_split "$pid")
    pg0=$(pg_cpu_seconds)
    times >"$WORK/times0"
    # shellcheck disable=SC2086 # $opts is a list of options
    PGSSLMODE=$sslmode PGPASSWORD=$BENCH_PW PGCONNECT_TIMEOUT=10 "$PGBENCH" -n \
        -T $((DURATION + WL_EXTRA_T[$wl])) $opts \
        -h 127.0.0.1 -p "$port" -U "$BENCH_USER" "$BENCH_DB" </dev/null >"$log" 2>&1 &
    BENCH_PID=$!
    wait "$BENCH_PID" || rc=$?
    times >"$WORK/times1"
    BENCH_PID=
    [[ -n $pid ]] && cpu1=$(sl_cpu_seconds "$pid") && read -r u1 s1 < <(cpu_split "$pid")
    pg1=$(pg_cpu_seconds)
    cl0=$(children_cpu "$WORK/times0") cl1=$(children_cpu "$WORK/times1")
    if [[ -n $pid ]]; then
        # The pooler's server connections, still open: TLS in the TLS rows, plain TCP in the others.
        srv=$(server_tls_count)
        if [[ $tls == yes && ${srv%/*} != "${srv#*/}" ]]; then
            sl_die "$target, ${WL_NAME[$wl]}: only $srv of its server connections use TLS"
        elif [[ $tls == no && ${srv%/*} != 0 ]]; then
            sl_die "$target, ${WL_NAME[$wl]}: $srv of its server connections use TLS (expected none)"
        fi
    fi
    case $target in
        pgbouncer) stop_pgbouncer ;;
        sluice) sl_sluice_stop ;;
    esac

    local txns tps lat failed aborted cpu_k err conn cpuu_k=nan cpus_k=nan
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$log")
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log" | head -n 1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$log")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log")
    # pgbench 15 says "client N aborted in command ..." (e.g. a refused connection with -C) or
    # "client N script M aborted in command ... query ...: ERROR ..." (an error reply).
    aborted=$(grep -cE 'client [0-9]+ (script [0-9]+ )?aborted' "$log" || true)
    conn=$(sed -n 's/^initial connection time = \([0-9.]*\) ms.*/\1/p' "$log")
    txns=${txns:-0} tps=${tps:-0} lat=${lat:-nan} failed=${failed:-0}
    # The first error pgbench printed (e.g. a refused connection, a missing prepared statement).
    err=$(grep -m 1 -E '(error|FATAL|ERROR):' "$log" | sed 's/^pgbench: //; s/[|`]/ /g' | cut -c 1-160 || true)
    if [[ $rc -ne 0 ]] && ! grep -q '^number of transactions actually processed' "$log"; then
        # pgbench gave up before running (it exits when an initial connection fails): none of
        # the clients ran.
        aborted=$(awk '{ for (i = 1; i < NF; i++) if ($i == "-c") print $(i + 1) }' <<<"$opts")
    fi
    if [[ -n $pid && $txns -gt 0 ]]; then
        cpu_k=$(awk -v a="$cpu0" -v b="$cpu1" -v n="$txns" 'BEGIN { printf "%.4f", (b - a) * 1000 / n }')
        cpuu_k=$(awk -v a="$u0" -v b="$u1" -v n="$txns" 'BEGIN { printf "%.4f", (b - a) * 1000 / n }')
        cpus_k=$(awk -v a="$s0" -v b="$s1" -v n="$txns" 'BEGIN { printf "%.4f", (b - a) * 1000 / n }')
    else
        cpu_k=nan
    fi
    local pg_k=nan cl_k=nan
    if [[ $txns -gt 0 ]]; then
        pg_k=$(awk -v a="$pg0" -v b="$pg1" -v n="$txns" 'BEGIN { printf "%.4f", (b - a) * 1000 / n }')
        cl_k=$(awk -v a="$cl0" -v b="$cl1" -v n="$txns" 'BEGIN { printf "%.4f", (b - a) * 1000 / n }')
    fi
    # A TLS row that failed (pgbench could not connect or got an error) stops the script; one that
    # merely ran no transaction (a 1 s --quick run spent connecting 50 clients on a busy machine)
    # is reported like any other run. tls_check has already shown both hops to be TLS.
    if [[ $tls == yes && $txns -eq 0 ]] && [[ $rc -ne 0 || -n $err ]]; then
        sl_die "$target, ${WL_NAME[$wl]}: no transaction over TLS (pgbench exit $rc: ${err:-no error printed}; log $log)"
    fi
    R[$wl|$target|$round|tps]=$tps
    R[$wl|$target|$round|lat]=$lat
    R[$wl|$target|$round|failed]=$failed
    R[$wl|$target|$round|aborted]=$aborted
    R[$wl|$target|$round|cpu]=$cpu_k
    R[$wl|$target|$round|cpuu]=$cpuu_k
    R[$wl|$target|$round|cpus]=$cpus_k
    R[$wl|$target|$round|auth]=$asked
    R[$wl|$target|$round|rc]=$rc
    R[$wl|$target|$round|err]=$err
    R[$wl|$target|$round|conn]=${conn:-nan}
    R[$wl|$target|$round|pgcpu]=$pg_k
    R[$wl|$target|$round|clcpu]=$cl_k
    R[$wl|$target|$round|srv]=$srv
    printf '  round %d  %-10s %-48s %-10s tps %9.1f  lat %8s ms  failed %s  aborted %s  cpu/1k %s (pgbench %s, PostgreSQL %s)  server conns TLS %s%s%s\n' \
        "$round" "$target" "${WL_NAME[$wl]}" "$asked" "$tps" "$lat" "$failed" "$aborted" "$cpu_k" \
        "$cl_k" "$pg_k" "$srv" \
        "$([[ $wl == many && -n $conn ]] && printf '  connected in %.1f s' "$(div "$conn" 1000)")" \
        "$([[ $rc -ne 0 ]] && echo "  (pgbench exit $rc)")"
    [[ -z $err ]] || printf '      first error: %s\n' "$err"
    sleep 0.5
}

# hold N LOG [tls]: starts hold_clients with N connections to the target whose port is $HOLD_PORT
# in the background (PID in HOLD_PID) and waits until they are all up; fails if they are not.
# With tls, the connections use TLS and check the certificate against the test CA.
hold() {
    local n=$1 log=$2 i limit tls_opts=()
    limit=$((60 + n / 20))
    if [[ ${3:-} == tls ]]; then tls_opts=(--tls-ca "$TLS_DIR/ca.crt"); fi
    : >"$log"
    HOLD_CLIENTS_URL="postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$HOLD_PORT/$BENCH_DB" \
        "$HOLD_CLIENTS" --clients "$n" --concurrency 64 "${tls_opts[@]}" </dev/null >>"$log" 2>&1 &
    HOLD_PID=$!
    for ((i = 0; i < limit * 10; i++)); do
        if grep -q '^all [0-9]* clients connected' "$log"; then return 0; fi
        sl_alive "$HOLD_PID" || break
        sleep 0.1
    done
    tail -n 5 "$log" >&2
    sl_die "hold_clients did not get $n clients connected (log above)"
}
# release LOG: stops the hold_clients started by hold; sets HOLD_LOST to how many of its
# connections were closed by the other end while held ("?" when it did not say).
release() {
    sl_stop_pid "$HOLD_PID" TERM 10
    HOLD_PID=
    HOLD_LOST=$(sed -n 's/.*; \([0-9]*\) closed by the other end.*/\1/p' "$1")
    HOLD_LOST=${HOLD_LOST:-?}
}

# idle_one TARGET [tls]: memory of the pooler with IDLE idle clients; records M[KEY|...], KEY
# being TARGET, or TARGET-tls for TLS clients (the pooler in its TLS configuration).
declare -A M=()
idle_one() {
    local target=$1 tls=${2:-} key=$1 pid rss0 rss1 lost secs
    [[ $tls == tls ]] && key+=-tls
    case $target in
        pgbouncer) start_pgbouncer "scram${tls:+-tls}"; pid=$PGB_PID ;;
        sluice) start_sluice "scram${tls:+-tls}"; pid=$SL_SLUICE_PID ;;
    esac
    HOLD_PORT=$(port_of "$target")
    [[ $tls == tls ]] && tls_check "$target"
    hold "$WARM_CLIENTS" "$WORK/hold-warm-$key.log" "$tls"
    release "$WORK/hold-warm-$key.log"
    sleep 1
    rss0=$(rss_kib "$pid")
    hold "$IDLE" "$WORK/hold-$key.log" "$tls"
    sleep 1
    rss1=$(rss_kib "$pid")
    release "$WORK/hold-$key.log"
    lost=$HOLD_LOST
    secs=$(sed -n 's/^all [0-9]* clients connected in \([0-9.]*\) s.*/\1/p' "$WORK/hold-$key.log")
    case $target in
        pgbouncer) stop_pgbouncer ;;
        sluice) sl_sluice_stop ;;
    esac
    M[$key|rss0]=$rss0 M[$key|rss1]=$rss1 M[$key|lost]=$lost M[$key|secs]=$secs
    M[$key|per]=$(awk -v a="$rss0" -v b="$rss1" -v n="$IDLE" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }')
    printf '  %-14s RSS %s KiB after the warm-up, %s KiB with %d idle clients (connected in %s s): %s bytes per client; closed while held: %s\n' \
        "$key" "$rss0" "$rss1" "$IDLE" "$secs" "${M[$key|per]}" "$lost"
}

# fetch_large TARGET ROWS: seconds psql took to fetch ROWS rows of 1,000 bytes through TARGET
# (login included); "nan" if it failed.
fetch_large() {
    local t0 t1 port
    port=$(port_of "$1")
    t0=$EPOCHREALTIME
    if PGPASSWORD=$BENCH_PW PGCONNECT_TIMEOUT=10 "$PSQL" -X -At -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$port" -U "$BENCH_USER" -d "$BENCH_DB" \
        -c "SELECT repeat('x', 1000) FROM generate_series(1, $2)" </dev/null >/dev/null \
        2>>"$WORK/large-$1.err"; then
        t1=$EPOCHREALTIME
        awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }'
    else
        echo nan
    fi
}

# large_results: both poolers up, each size fetched LARGE_REPS times per target in alternating
# order; records L[...] (times, and the poolers' memory before and after each size).
declare -A L=()
large_results() {
    local mb rep target t p pid order
    start_pgbouncer
    start_sluice
    for target in "${TARGETS[@]}"; do fetch_large "$target" 10 >/dev/null; done # warm-up
    sleep 0.5
    for p in pgbouncer sluice; do
        pid=$([[ $p == sluice ]] && echo "$SL_SLUICE_PID" || echo "$PGB_PID")
        L[$p|rss0]=$(rss_kib "$pid") L[$p|hwm0]=$(rss_kib "$pid" VmHWM)
    done
    for mb in "${LARGE_MB[@]}"; do
        for ((rep = 1; rep <= LARGE_REPS; rep++)); do
            order=("${TARGETS[@]}")
            if ((rep % 2 == 0)); then order=(sluice pgbouncer direct); fi
            for target in "${order[@]}"; do
                t=$(fetch_large "$target" $((mb * 1000)))
                L[$mb|$target|$rep]=$t
                printf '  %2d MB  rep %d  %-10s %s s\n' "$mb" "$rep" "$target" "$t"
            done
        done
        for p in pgbouncer sluice; do
            pid=$([[ $p == sluice ]] && echo "$SL_SLUICE_PID" || echo "$PGB_PID")
            L[$mb|$p|rss]=$(rss_kib "$pid") L[$mb|$p|hwm]=$(rss_kib "$pid" VmHWM)
            printf '  %2d MB  %-10s VmRSS %s KiB, VmHWM %s KiB (before the large results: %s, %s)\n' \
                "$mb" "$p" "${L[$mb|$p|rss]}" "${L[$mb|$p|hwm]}" "${L[$p|rss0]}" "${L[$p|hwm0]}"
        done
    done
    stop_pgbouncer
    sl_sluice_stop
}

# loadtest_run TARGET PROFILE_OPTIONS... : one sluice-loadtest run against TARGET (its pooler
# running, md5 login) with --json; prints "THROUGHPUT P50 P99 SUCCEEDED FAILED CONNECTS"
# ("nan" fields when it wrote no report).
loadtest_run() {
    local target=$1 port json
    shift
    port=$(port_of "$target")
    json=$WORK/loadtest-$target-$EPOCHSECONDS-$RANDOM.json
    "$SL_LOADTEST" --no-verify --json "$json" "$@" \
        "postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$port/$BENCH_DB?sslmode=disable" \
        </dev/null >>"$WORK/loadtest-$target.log" 2>&1 || true
    if [[ -s $json ]]; then
        python3 -c 'import json, sys
d = json.load(open(sys.argv[1])); c = d["counts"]; l = d["latency_ms"]
print("%.1f %.3f %.3f %d %d %d" % (d["throughput"], l["p50"], l["p99"], c["succeeded"], c["failed"], c["connects"]))' "$json"
    else
        echo "nan nan nan 0 0 0"
    fi
}
# open_loop: the many-connected-clients phase (see the top of this file); records O[...].
declare -A O=()
open_loop() {
    local target round order pid c0 c1 tp p50 p99 ok failed connects cap secs=$((2 * DURATION))
    "$SL_LOADTEST" --setup-only \
        "postgres://$BENCH_USER:$BENCH_PW@127.0.0.1:$SL_PG_PORT/$BENCH_DB?sslmode=disable" \
        </dev/null >"$WORK/loadtest-setup.log" 2>&1 || {
        tail -n 20 "$WORK/loadtest-setup.log" >&2
        sl_die "sluice-loadtest --setup-only failed"
    }
    for target in pgbouncer sluice; do
        case $target in
            pgbouncer) start_pgbouncer md5 ;;
            sluice) start_sluice md5 ;;
        esac
        read -r tp _ < <(loadtest_run "$target" --profile closed --workers 100 --model warm \
            --containers 100 --max-concurrency 100 --duration "${DURATION}s")
        case $target in
            pgbouncer) stop_pgbouncer ;;
            sluice) sl_sluice_stop ;;
        esac
        O[$target|capacity]=$tp
        printf '  capacity  %-10s %s invocations/s (closed loop, 100 workers)\n' "$target" "$tp"
    done
    cap=$(awk -v a="${O[pgbouncer|capacity]}" -v b="${O[sluice|capacity]}" \
        'BEGIN { m = (a == "nan") ? b : (b == "nan" || a < b) ? a : b; print (m == "nan") ? 0 : m }')
    O[rate]=$(awk -v c="$cap" -v p="$OPEN_LOAD" 'BEGIN { r = int(c * p / 100); print (r < 1) ? 1 : r }')
    for ((round = 1; round <= ROUNDS; round++)); do
        order=(pgbouncer sluice)
        if ((round % 2 == 0)); then order=(sluice pgbouncer); fi
        for target in "${order[@]}"; do
            case $target in
                pgbouncer) start_pgbouncer md5; pid=$PGB_PID ;;
                sluice)
                    SLUICE_MAX_CLIENT_CONNECTIONS=$((OPEN_CLIENTS + 2000)) start_sluice md5
                    pid=$SL_SLUICE_PID
                    ;;
            esac
            # The clients connect before the counted part (the warm model's prewarm): the CPU
            # is read around the whole run, logins included, and divided by the invocations.
            c0=$(sl_cpu_seconds "$pid")
            read -r tp p50 p99 ok failed connects < <(loadtest_run "$target" --profile constant \
                --rate "${O[rate]}" --duration "${secs}s" --model warm \
                --containers "$OPEN_CLIENTS" --max-concurrency "$OPEN_CLIENTS")
            c1=$(sl_cpu_seconds "$pid")
            case $target in
                pgbouncer) stop_pgbouncer ;;
                sluice) sl_sluice_stop ;;
            esac
            O[$target|$round|p50]=$p50 O[$target|$round|p99]=$p99 O[$target|$round|ok]=$ok
            O[$target|$round|failed]=$failed O[$target|$round|connects]=$connects
            O[$target|$round|tp]=$tp
            O[$target|$round|cpu]=$(awk -v a="$c0" -v b="$c1" -v n="$ok" \
                'BEGIN { if (n > 0) printf "%.4f", (b - a) * 1000 / n; else print "nan" }')
            printf '  round %d  %-10s %s/s for %d s, %d clients: p50 %s ms, p99 %s ms, %s ok, %s failed, %s connects in the run, CPU s / 1k %s\n' \
                "$round" "$target" "${O[rate]}" "$secs" "$OPEN_CLIENTS" "$p50" "$p99" "$ok" \
                "$failed" "$connects" "${O[$target|$round|cpu]}"
            sleep 0.5
        done
    done
}

npgb=0
for wl in "${WORKLOADS[@]}"; do
    read -r -a ts <<<"${WL_TARGETS[$wl]}"
    npgb=$((npgb + ${#ts[@]}))
done
sl_header "pgbench: $ROUNDS round(s) x $npgb runs ($DURATION s each)"
T_START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= ROUNDS; round++)); do
    for wl in "${WORKLOADS[@]}"; do
        read -r -a order <<<"${WL_TARGETS[$wl]}"
        if ((round % 2 == 0)); then
            for ((i = 0, j = ${#order[@]} - 1; i < j; i++, j--)); do
                t=${order[i]} order[i]=${order[j]} order[j]=$t
            done
        fi
        for target in "${order[@]}"; do
            run_one "$wl" "$target" "$round"
        done
    done
done

sl_header "Idle clients: $IDLE held, after a warm-up of $WARM_CLIENTS"
for target in pgbouncer sluice; do idle_one "$target"; done
sl_header "Idle TLS clients: $IDLE held, after a warm-up of $WARM_CLIENTS (TLS on both hops)"
for target in pgbouncer sluice; do idle_one "$target" tls; done

sl_header "Large results: ${LARGE_MB[*]} MB (thousands of 1,000-byte rows), $LARGE_REPS repetition(s)"
large_results

sl_header "Open loop: $OPEN_CLIENTS connected clients, arrivals at $OPEN_LOAD% of the smaller capacity"
open_loop


# stat WL TARGET FIELD: median over the rounds; ratio WL TARGET BASE_WL BASE_TARGET FIELD: median
# of the per-round ratios; total WL TARGET FIELD: sum over the rounds.
stat() {
    local r v=()
    for ((r = 1; r <= ROUNDS; r++)); do v+=("${R[$1|$2|$r|$3]:-nan}"); done
    median "${v[@]}"
}
ratio() { pair_ratio "$1|$2" "$5" "$3|$4" "$5"; }
# pair_ratio A FIELD_A B FIELD_B: median over the rounds of R[A|round|FIELD_A] /
# R[B|round|FIELD_B], A and B being "WORKLOAD|TARGET".
pair_ratio() {
    local r v=()
    for ((r = 1; r <= ROUNDS; r++)); do
        v+=("$(div "${R[$1|$r|$2]:-nan}" "${R[$3|$r|$4]:-nan}")")
    done
    median "${v[@]}"
}
# spread ...: " (lowest–highest)" of the per-round ratios (same arguments as ratio), when there
# is more than one round.
spread() {
    local r
    ((ROUNDS > 1)) || return 0
    for ((r = 1; r <= ROUNDS; r++)); do div "${R[$1|$2|$r|$5]:-nan}" "${R[$3|$4|$r|$5]:-nan}"; echo; done |
        awk '$1 != "nan" && $1 != "" { if (n++ == 0 || $1 < lo) lo = $1; if (n == 1 || $1 > hi) hi = $1 }
            END { if (n > 1) printf " (%.2f–%.2f)", lo, hi }'
}
total() {
    local r s=0
    for ((r = 1; r <= ROUNDS; r++)); do s=$((s + ${R[$1|$2|$r|$3]:-0})); done
    echo "$s"
}
# The authentication asked for in the rounds, e.g. "scram" (or "scram/?" when they differ).
asked() {
    local r
    for ((r = 1; r <= ROUNDS; r++)); do echo "${R[$1|$2|$r|auth]}"; done | sort -u | paste -sd/
}
# verdict VALUE OP LIMIT: yes/no (OP is >= or <=), "-" when there is no value.
verdict() {
    awk -v x="$1" -v op="$2" -v l="$3" 'BEGIN {
        if (x == "-" || x == "nan" || x == "") { print "-"; exit }
        ok = (op == ">=") ? (x + 0 >= l + 0) : (x + 0 <= l + 0)
        print ok ? "**yes**" : "no"
    }'
}
kib() { awk -v x="$1" 'BEGIN { printf "%.2f KiB", x / 1024 }'; }

report() {
    local wl target r tps_vs_pgb tps_vs_direct cpu_vs_pgb label first
    echo "### Sluice vs PgBouncer: pgbench through each pooler (and directly), idle clients, a large result"
    echo
    echo "- $(date -u '+%Y-%m-%d %H:%M UTC'); $ROUNDS round(s) of $DURATION s per pgbench run; pgbench $PGBENCH_VERSION, scale $SCALE, select-only (\`-S\`)"
    echo "- PostgreSQL $PG_VERSION (max_connections $PG_MAX_CONNECTIONS, SCRAM), PgBouncer $PGB_VERSION (transaction pooling, default_pool_size $POOL_SIZE, auth_type scram-sha-256, or md5 for the md5 row), Sluice $SLUICE_VERSION at $SLUICE_COMMIT ($SL_BUILD_DESC; pool_size $POOL_SIZE, max_server_connections $POOL_SIZE, worker_threads $SLUICE_THREADS; client_auth scram-sha-256, or md5 for the md5 row)"
    echo "- TLS rows: both hops TLS, a throwaway CA and ECDSA P-256 server certificate; PostgreSQL ssl = on; PgBouncer client_tls_sslmode = allow, server_tls_sslmode = require (default protocols and ciphers); Sluice client_tls = allow, server_tls = require; clients PGSSLMODE=require. Negotiated (client hop; server hop):$(for t in "${TARGETS[@]}"; do printf ' %s %s; %s; channel binding %s.' "$t" "${T[$t|client]:--}" "${T[$t|server]:--}" "${T[$t|cb]:--}"; done)"
    echo "- $(nproc) CPUs shared by the clients, the pooler and PostgreSQL, all over 127.0.0.1; load average before the runs $LOAD_BEFORE, after $LOAD_AFTER"
    echo
    echo "| workload | target | login | tps | vs PgBouncer | vs direct | avg latency ms | failed txns | aborted clients | pooler CPU s / 1k txns | CPU vs PgBouncer |"
    echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    for wl in "${WORKLOADS[@]}"; do
        first=yes
        for target in "${TARGETS[@]}"; do
            label=''
            if [[ $first == yes ]]; then label="${WL_NAME[$wl]}: \`${WL_OPTS[$wl]}\`"; fi
            if [[ " ${WL_TARGETS[$wl]} " != *" $target "* ]]; then
                # Not run: PgBouncer where it cannot serve the workload (a row saying so).
                if [[ $target == pgbouncer && -n ${WL_NOPGB[$wl]} ]]; then
                    printf '| %s | %s | | n/a: %s | | | | | | | |\n' "$label" "$target" "${WL_NOPGB[$wl]}"
                    first=no
                fi
                continue
            fi
            first=no
            if [[ -z ${WL_NOPGB[$wl]} ]]; then
                tps_vs_pgb=$(fmt "$(ratio "$wl" "$target" "$wl" pgbouncer tps)" '%.2fx')
                cpu_vs_pgb=$(fmt "$(ratio "$wl" "$target" "$wl" pgbouncer cpu)" '%.2fx')
            else
                tps_vs_pgb="n/a" cpu_vs_pgb="n/a"
            fi
            tps_vs_direct=$(fmt "$(ratio "$wl" "$target" "${WL_DIRECT[$wl]}" direct tps)" '%.2fx')
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "$label" "$target" "$(asked "$wl" "$target")" "$(fmt "$(stat "$wl" "$target" tps)" '%.0f')" \
                "$tps_vs_pgb" "$tps_vs_direct" "$(fmt "$(stat "$wl" "$target" lat)" '%.2f')" \
                "$(total "$wl" "$target" failed)" "$(total "$wl" "$target" aborted)" \
                "$(fmt "$(stat "$wl" "$target" cpu)" '%.3f')" "$cpu_vs_pgb"
        done
    done
    echo
    echo "Medians over the rounds (tps, latency, CPU, and the per-round ratios); failed transactions and"
    echo "aborted clients are summed over the rounds. \"login\" is the authentication the target asked"
    echo "for, read from its reply to a startup packet before each run. \"vs PgBouncer\" and \"vs direct\""
    echo "divide a target's tps by PgBouncer's and by PostgreSQL's directly in the same round; the md5"
    echo "connection-per-transaction workload is not run directly (PostgreSQL here asks for SCRAM): its"
    echo "direct baseline is the SCRAM row's direct run. PgBouncer does not run the prepared workload, so"
    echo "that row has no PgBouncer ratio: Sluice's baseline there is direct. The $MANY clients log in"
    echo "with md5 so that they are all connected within seconds: pgbench connects them one at a time per"
    echo "thread before the timed part, within -T, which is extended by ${WL_EXTRA_T[many]} s for that. Pooler CPU is"
    echo "the utime + stime of the pooler process during the run per 1,000 transactions (direct: no"
    echo "pooler); with \`-C\` each transaction is also a new connection and login, so it is CPU per 1,000"
    echo "connections. Directly, clients beyond max_connections are refused (53300, \"too many"
    echo "clients\"): pgbench aborts them with \`-C\`, and without \`-C\` gives up before starting (all"
    echo "its clients counted as aborted). The TLS rows have TLS on both hops (pgbench with"
    echo "PGSSLMODE=require; its direct baseline is PostgreSQL over TLS); \"scram-plus\" is SCRAM-SHA-256-PLUS,"
    echo "which libpq takes whenever the target offers channel binding; with \`-C\` each transaction is"
    echo "a TLS handshake and a SCRAM login toward the pooler (the pooler's server connections stay open)."
    local notes=''
    for wl in "${WORKLOADS[@]}"; do
        for target in "${TARGETS[@]}"; do
            for ((r = 1; r <= ROUNDS; r++)); do
                [[ -n ${R[$wl|$target|$r|err]:-} ]] || continue
                notes+="- ${WL_NAME[$wl]}, $target, round $r (pgbench exit ${R[$wl|$target|$r|rc]}): \`${R[$wl|$target|$r|err]}\`"$'\n'
            done
        done
    done
    if [[ -n $notes ]]; then
        echo
        echo "First error pgbench printed, per run that had one:"
        echo
        printf '%s' "$notes"
    fi

    # The issue's targets.
    local v d pd s10 s50 s0 p10 p50
    echo
    echo "#### Targets"
    echo
    echo "| workload | target | Sluice | PgBouncer; direct | met? |"
    echo "|---|---|---|---|:---:|"
    v=$(ratio simple sluice simple pgbouncer tps)
    echo "| ${WL_NAME[simple]} \`${WL_OPTS[simple]}\` | tps ≥ 1.15x PgBouncer | $(fmt "$v" '%.2fx')$(spread simple sluice simple pgbouncer tps) | $(fmt "$(stat simple pgbouncer tps)" '%.0f') tps; direct $(fmt "$(stat simple direct tps)" '%.0f') tps | $(verdict "$v" '>=' 1.15) |"
    v=$(ratio simple sluice simple pgbouncer cpu)
    echo "| same | CPU s per 1,000 txns ≤ 0.85x PgBouncer's | $(fmt "$v" '%.2fx')$(spread simple sluice simple pgbouncer cpu): $(fmt "$(stat simple sluice cpu)" '%.3f') s | $(fmt "$(stat simple pgbouncer cpu)" '%.3f') s | $(verdict "$v" '<=' 0.85) |"
    v=$(ratio extended sluice extended pgbouncer tps)
    echo "| ${WL_NAME[extended]} \`${WL_OPTS[extended]}\` | tps ≥ 1.15x PgBouncer | $(fmt "$v" '%.2fx')$(spread extended sluice extended pgbouncer tps) | $(fmt "$(stat extended pgbouncer tps)" '%.0f') tps; direct $(fmt "$(stat extended direct tps)" '%.0f') tps | $(verdict "$v" '>=' 1.15) |"
    v=$(ratio extended sluice extended pgbouncer cpu)
    echo "| same | CPU s per 1,000 txns ≤ 0.85x PgBouncer's | $(fmt "$v" '%.2fx')$(spread extended sluice extended pgbouncer cpu): $(fmt "$(stat extended sluice cpu)" '%.3f') s | $(fmt "$(stat extended pgbouncer cpu)" '%.3f') s | $(verdict "$v" '<=' 0.85) |"
    v=$(ratio prepared sluice prepared direct tps)
    d=$(ratio simple sluice simple direct tps)
    echo "| ${WL_NAME[prepared]} \`${WL_OPTS[prepared]}\` (PgBouncer $PGB_VERSION cannot) | Sluice's tps ratio to direct ≥ 0.9x its \`-M simple\` ratio | $(fmt "$v" '%.2fx')$(spread prepared sluice prepared direct tps) of direct ($(fmt "$(stat prepared sluice tps)" '%.0f') tps, $(total prepared sluice failed) failed txns, $(total prepared sluice aborted) aborted); \`-M simple\` $(fmt "$d" '%.2fx') of direct: $(fmt "$(div "$v" "$d")" '%.2fx') | n/a; direct $(fmt "$(stat prepared direct tps)" '%.0f') tps | $(verdict "$(div "$v" "$d")" '>=' 0.9) |"
    v=$(ratio connect_md5 sluice connect_md5 pgbouncer tps)
    echo "| ${WL_NAME[connect_md5]} \`${WL_OPTS[connect_md5]}\` (login asked for: Sluice $(asked connect_md5 sluice), PgBouncer $(asked connect_md5 pgbouncer)) | tps ≥ 1.3x PgBouncer | $(fmt "$v" '%.2fx')$(spread connect_md5 sluice connect_md5 pgbouncer tps) | $(fmt "$(stat connect_md5 pgbouncer tps)" '%.0f') tps; direct (SCRAM) $(fmt "$(stat connect direct tps)" '%.0f') tps | $(verdict "$v" '>=' 1.3) |"
    v=$(ratio connect_md5 sluice connect_md5 pgbouncer cpu)
    echo "| same | CPU per connection ≤ PgBouncer's | $(fmt "$v" '%.2fx')$(spread connect_md5 sluice connect_md5 pgbouncer cpu): $(fmt "$(stat connect_md5 sluice cpu)" '%.3f') s / 1k | $(fmt "$(stat connect_md5 pgbouncer cpu)" '%.3f') s / 1k | $(verdict "$v" '<=' 1) |"
    v=$(ratio connect sluice connect pgbouncer tps)
    echo "| ${WL_NAME[connect]} \`${WL_OPTS[connect]}\` | tps ≥ 1.3x PgBouncer | $(fmt "$v" '%.2fx')$(spread connect sluice connect pgbouncer tps) | $(fmt "$(stat connect pgbouncer tps)" '%.0f') tps; direct $(fmt "$(stat connect direct tps)" '%.0f') tps | $(verdict "$v" '>=' 1.3) |"
    v=$(total fanout sluice aborted)
    echo "| ${WL_NAME[fanout]} \`${WL_OPTS[fanout]}\`, max_connections $PG_MAX_CONNECTIONS | 0 aborted clients | $v aborted, $(total fanout sluice failed) failed txns | $(total fanout pgbouncer aborted) aborted; direct $(total fanout direct aborted) aborted | $(verdict "$v" '<=' 0) |"
    v=$(total many sluice aborted)
    echo "| ${WL_NAME[many]} \`${WL_OPTS[many]}\`, max_connections $PG_MAX_CONNECTIONS | 0 aborted clients | $v aborted, $(total many sluice failed) failed txns; all connected in $(fmt "$(div "$(stat many sluice conn)" 1000)" '%.1f') s | $(total many pgbouncer aborted) aborted, connected in $(fmt "$(div "$(stat many pgbouncer conn)" 1000)" '%.1f') s; direct $(total many direct aborted) aborted (pgbench gives up at the first refused connection) | $(verdict "$v" '<=' 0) |"
    v=${M[sluice|per]}
    echo "| $IDLE idle clients held | ≤ 1 KiB of pooler RSS per idle client | $(kib "$v") | $(kib "${M[pgbouncer|per]}") | $(verdict "$v" '<=' 1024) |"
    v=$(ratio connect_tls sluice connect_tls pgbouncer tps)
    echo "| ${WL_NAME[connect_tls]} \`${WL_OPTS[connect_tls]}\` (login: Sluice $(asked connect_tls sluice), PgBouncer $(asked connect_tls pgbouncer)) | tps ≥ 1.3x PgBouncer | $(fmt "$v" '%.2fx')$(spread connect_tls sluice connect_tls pgbouncer tps) | $(fmt "$(stat connect_tls pgbouncer tps)" '%.0f') tps; direct (TLS) $(fmt "$(stat connect_tls direct tps)" '%.0f') tps | $(verdict "$v" '>=' 1.3) |"
    v=${M[sluice-tls|per]}
    echo "| $IDLE idle TLS clients held | pooler RSS per idle TLS client ≤ PgBouncer's | $(kib "$v") | $(kib "${M[pgbouncer-tls|per]}") | $(verdict "$v" '<=' "${M[pgbouncer-tls|per]}") |"
    v=$(large_ratio 50 sluice)
    echo "| one 50 MB result | time ≤ 1.1x direct | $(fmt "$v" '%.2fx') | $(fmt "$(large_ratio 50 pgbouncer)" '%.2fx') | $(verdict "$v" '<=' 1.1) |"
    s10=${L[10|sluice|hwm]} s50=${L[50|sluice|hwm]} s0=${L[sluice|rss0]}
    p10=${L[10|pgbouncer|hwm]} p50=${L[50|pgbouncer|hwm]}
    d=$((s50 - s10)) pd=$((p50 - p10))
    echo "| same, and a 10 MB result | RSS does not grow with result size: peak (VmHWM) after 50 MB within $((GROWTH_LIMIT_KIB / 1024)) MiB of the peak after 10 MB | +$d KiB (the 10 MB peak: +$((s10 - s0)) KiB over RSS before) | +$pd KiB | $(verdict "$d" '<=' "$GROWTH_LIMIT_KIB") |"
    local pr=() r2 of=0
    for ((r2 = 1; r2 <= ROUNDS; r2++)); do
        pr+=("$(div "${O[sluice|$r2|p99]:-nan}" "${O[pgbouncer|$r2|p99]:-nan}")")
        of=$((of + ${O[sluice|$r2|failed]:-0}))
    done
    v=$(median "${pr[@]}")
    echo "| $OPEN_CLIENTS connected clients, open-loop arrivals at $OPEN_LOAD% of capacity (\`sluice-loadtest\`, ${O[rate]:-?}/s) | p99 ≤ 0.5x PgBouncer's, 0 errors | $(fmt "$v" '%.2fx')$(printf '%s\n' "${pr[@]}" | awk '$1 != "nan" { if (n++ == 0 || $1 < lo) lo = $1; if (n == 1 || $1 > hi) hi = $1 } END { if (n > 1) printf " (%.2f–%.2f)", lo, hi }'): p99 $(fmt "$(o_stat sluice p99)" '%.2f') ms, $of failed | p99 $(fmt "$(o_stat pgbouncer p99)" '%.2f') ms, $(o_total pgbouncer failed) failed | $(verdict "$([[ $of -eq 0 ]] && echo "$v" || echo 9)" '<=' 0.5) |"
    echo
    echo "Ratios are medians of the per-round ratios (in brackets: their lowest and highest over the"
    echo "rounds); aborted clients and failed transactions are summed over the rounds. \"met?\" compares"
    echo "the median (or the sum) with the target."
    echo
    echo "#### Memory per idle client"
    echo
    echo "| pooler | RSS after warm-up KiB | RSS with $IDLE idle clients KiB | per idle client | connect time s | closed while held |"
    echo "|---|---:|---:|---:|---:|---:|"
    for target in pgbouncer sluice pgbouncer-tls sluice-tls; do
        echo "| ${target/-tls/, TLS} | ${M[$target|rss0]} | ${M[$target|rss1]} | ${M[$target|per]} bytes ($(kib "${M[$target|per]}")) | ${M[$target|secs]} | ${M[$target|lost]} |"
    done
    echo
    echo "Each pooler fresh; warm-up: $WARM_CLIENTS connections that each ran SELECT 1 and left; then"
    echo "hold_clients opened $IDLE connections (64 at a time, SCRAM login, SELECT 1 on each) and held them"
    echo "idle while VmRSS was read. Per idle client: (RSS held - RSS after warm-up) / $IDLE. TLS rows:"
    echo "the pooler in its TLS configuration (TLS to the server too), hold_clients --tls-ca (rustls,"
    echo "certificate checked against the test CA; warm-up also over TLS)."

    echo
    echo "#### Where the CPU goes (plain TCP and TLS)"
    echo
    echo "| workload | target | pgbench | pooler | PostgreSQL | all three | pooler, TLS minus plain |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    local plain c_cl c_po c_pg
    for wl in simple simple_tls connect connect_tls; do
        first=yes
        plain=${wl%_tls}
        for target in "${TARGETS[@]}"; do
            label=''
            if [[ $first == yes ]]; then label="${WL_NAME[$wl]}: \`${WL_OPTS[$wl]}\`"; first=no; fi
            c_cl=$(stat "$wl" "$target" clcpu) c_po=$(stat "$wl" "$target" cpu) c_pg=$(stat "$wl" "$target" pgcpu)
            printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$target" "$(fmt "$c_cl" '%.3f')" \
                "$(fmt "$c_po" '%.3f')" "$(fmt "$c_pg" '%.3f')" \
                "$(awk -v a="$c_cl" -v b="$c_po" -v c="$c_pg" 'BEGIN { if (a == "-" || c == "-") print "-"; else printf "%.3f", a + (b == "-" ? 0 : b) + c }')" \
                "$(if [[ $wl == *_tls && $target != direct ]]; then
                    awk -v a="$c_po" -v b="$(stat "$plain" "$target" cpu)" 'BEGIN { if (a == "-" || b == "-") print "-"; else printf "%+.3f", a - b }'
                else echo; fi)"
        done
    done
    echo
    echo "CPU seconds per 1,000 transactions (= ms per transaction), medians over the rounds: pgbench"
    echo "(utime + stime of the pgbench process, from the shell's children times around its run), the"
    echo "pooler (its /proc/PID/stat), PostgreSQL (the postmaster with its live and ended children)."
    echo "With \`-C\` a transaction is also a connection: a login (and with TLS a handshake) on each side"
    echo "of the pooler's client hop. The machine is shared, so only the same run's rows compare."

    echo
    echo "#### Pooler CPU per transaction: user and system time"
    echo
    echo "| workload | target | user ms | system ms | user + system ms | vs PgBouncer | system alone vs PgBouncer's user + system |"
    echo "|---|---|---:|---:|---:|---:|---:|"
    local cu cs
    for wl in simple extended simple_tls; do
        first=yes
        for target in pgbouncer sluice; do
            label=''
            if [[ $first == yes ]]; then label="${WL_NAME[$wl]}: \`${WL_OPTS[$wl]}\`"; first=no; fi
            cu=$(stat "$wl" "$target" cpuu) cs=$(stat "$wl" "$target" cpus)
            printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$target" "$(fmt "$cu" '%.4f')" \
                "$(fmt "$cs" '%.4f')" "$(fmt "$(stat "$wl" "$target" cpu)" '%.4f')" \
                "$(fmt "$(ratio "$wl" "$target" "$wl" pgbouncer cpu)" '%.2fx')" \
                "$(fmt "$(xratio "$wl" "$target" cpus pgbouncer cpu)" '%.2fx')"
        done
    done
    echo
    echo "The pooler's utime and stime (/proc/PID/stat) during each run, per transaction (ms), medians"
    echo "over the rounds. System time is the kernel working on the pooler's behalf: its receives and"
    echo "sends, and with each send on loopback the receiver's TCP input and its wake-up."
    echo
    echo "#### Open loop: $OPEN_CLIENTS connected clients"
    echo
    echo "| round | target | rate /s | p50 ms | p99 ms | succeeded | failed | connects in the run | pooler CPU s / 1k invocations |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    local rr
    for ((rr = 1; rr <= ROUNDS; rr++)); do
        for target in pgbouncer sluice; do
            echo "| $rr | $target | ${O[rate]:-} | $(fmt "${O[$target|$rr|p50]:-nan}" '%.2f') | $(fmt "${O[$target|$rr|p99]:-nan}" '%.2f') | ${O[$target|$rr|ok]:-} | ${O[$target|$rr|failed]:-} | ${O[$target|$rr|connects]:-} | $(fmt "${O[$target|$rr|cpu]:-nan}" '%.3f') |"
        done
    done
    echo
    echo "sluice-loadtest's point reads (extended protocol, the unnamed statement) with md5 logins."
    echo "Capacity first, a closed loop of 100 workers for $DURATION s: PgBouncer $(fmt "${O[pgbouncer|capacity]:-nan}" '%.0f'), Sluice"
    echo "$(fmt "${O[sluice|capacity]:-nan}" '%.0f') invocations per second; then arrivals at $OPEN_LOAD% of the smaller, ${O[rate]:-?} per"
    echo "second, for $((2 * DURATION)) s, each pooler fresh, the $OPEN_CLIENTS clients connected before the run"
    echo "(\"connects in the run\": clients that had to connect again). Latency from each invocation's"
    echo "intended start, so time queued in the load generator counts. Pooler CPU over the whole run,"
    echo "the $OPEN_CLIENTS logins included, per 1,000 invocations that succeeded."

    echo
    echo "#### One large result"
    echo
    echo "| result | target | median s | vs direct | pooler VmRSS before → after KiB | pooler peak VmHWM KiB |"
    echo "|---|---|---:|---:|---:|---:|"
    local mb rep ts rss hwm prev
    for mb in "${LARGE_MB[@]}"; do
        first=yes
        for target in "${TARGETS[@]}"; do
            ts=()
            for ((rep = 1; rep <= LARGE_REPS; rep++)); do ts+=("${L[$mb|$target|$rep]}"); done
            label=''
            if [[ $first == yes ]]; then label="$mb MB (\`generate_series(1, $((mb * 1000)))\`)"; first=no; fi
            rss='-' hwm='-'
            if [[ $target != direct ]]; then
                prev=$([[ $mb == "${LARGE_MB[0]}" ]] && echo "${L[$target|rss0]}" || echo "${L[${LARGE_MB[0]}|$target|rss]}")
                rss="$prev → ${L[$mb|$target|rss]}"
                hwm=${L[$mb|$target|hwm]}
            fi
            echo "| $label | $target | $(fmt "$(median "${ts[@]}")" '%.3f') | $(fmt "$(large_ratio "$mb" "$target")" '%.2fx') | $rss | $hwm |"
        done
    done
    echo
    echo "psql -X -At fetching SELECT repeat('x', 1000) FROM generate_series(1, N), output to /dev/null,"
    echo "login included; $LARGE_REPS repetition(s) per target and size, the order of the targets"
    echo "alternating; \"vs direct\" is the ratio of medians. Both poolers ran through this phase; before"
    echo "it their VmRSS was ${L[pgbouncer|rss0]} KiB (PgBouncer) and ${L[sluice|rss0]} KiB (Sluice), peak"
    echo "${L[pgbouncer|hwm0]} and ${L[sluice|hwm0]} KiB."
}
# xratio WL TARGET FIELD BASE_TARGET BASE_FIELD: median of the per-round ratios of one field to
# another (e.g. Sluice's system time to PgBouncer's user + system).
xratio() { pair_ratio "$1|$2" "$3" "$1|$4" "$5"; }
# o_stat TARGET FIELD: median over the rounds of the open-loop phase; o_total: their sum.
o_stat() {
    local r v=()
    for ((r = 1; r <= ROUNDS; r++)); do v+=("${O[$1|$r|$2]:-nan}"); done
    median "${v[@]}"
}
o_total() {
    local r t=0
    for ((r = 1; r <= ROUNDS; r++)); do t=$((t + ${O[$1|$r|$2]:-0})); done
    echo "$t"
}
# large_ratio MB TARGET: median time through TARGET over median time directly.
large_ratio() {
    local rep a=() b=()
    for ((rep = 1; rep <= LARGE_REPS; rep++)); do
        a+=("${L[$1|$2|$rep]}") b+=("${L[$1|direct|$rep]}")
    done
    div "$(median "${a[@]}")" "$(median "${b[@]}")"
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
