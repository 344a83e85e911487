# shellcheck shell=bash disable=SC2034 # SL_* variables are for the scripts that source this file
# Helpers shared by deploy/local/demo.sh and the benchmark scripts in benches/. Sourced, not run.
#
# They install Debian packages when missing, build the binaries, pick free loopback ports and
# run a throwaway PostgreSQL (initdb into a temporary directory, SCRAM authentication, listening
# on 127.0.0.1 only). PostgreSQL and PgBouncer refuse to run as root: when the script runs as root
# they run as the `postgres` OS user (created by Debian's postgresql package), else as `nobody`.
#
# Every process started here is a direct child of the script (`$!`), so the caller's EXIT trap
# can stop it by its PID; nothing is ever killed by name.

SL_ROOT=${SL_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
SL_APT_UPDATED=no
SL_PORTS_TAKEN=" "

sl_header() { printf '\n=== %s ===\n' "$*"; }
sl_info() { printf '  %s\n' "$*"; }
sl_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, else with sudo.
sl_as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        sl_die "need root (or sudo) to run: $*"
    fi
}

# sl_need_pkg TEST PACKAGE: apt-get install PACKAGE unless TEST holds. TEST is a command name
# looked up on PATH, or (when it contains a '/') a glob that must match an existing file.
# (The same rule as .ci/run's need_pkg.)
sl_need_pkg() {
    local test=$1 pkg=$2
    if [[ $test == */* ]]; then
        if compgen -G "$test" >/dev/null; then return 0; fi
    elif command -v "$test" >/dev/null 2>&1; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        sl_die "$pkg is missing ($test) and there is no apt-get: install it by hand"
    sl_info "installing $pkg (missing: $test)"
    if [[ $SL_APT_UPDATED == no ]]; then
        sl_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        SL_APT_UPDATED=yes
    fi
    sl_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$pkg" >/dev/null
}

# The PostgreSQL server binaries: $PGTEST_BINDIR, else the newest /usr/lib/postgresql/*/bin.
sl_pg_bindir() {
    if [[ -n ${PGTEST_BINDIR:-} ]]; then
        echo "$PGTEST_BINDIR"
        return
    fi
    local d
    d=$(compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -n 1 || true)
    [[ -n $d ]] || sl_die "PostgreSQL server binaries not found (set PGTEST_BINDIR)"
    dirname "$d"
}

# sl_build [BIN_DIR]: builds sluice and sluice-loadtest in release mode with cargo and sets
# SL_SLUICE and SL_LOADTEST to the binaries; with BIN_DIR, uses the binaries already there (e.g.
# target/release) and builds nothing.
sl_build() {
    local bindir=${1:-} profile=release tdir
    if [[ -n $bindir ]]; then
        bindir=$(cd "$bindir" 2>/dev/null && pwd) || sl_die "no such directory: $1"
        SL_SLUICE=$bindir/sluice
        SL_LOADTEST=$bindir/sluice-loadtest
        [[ -x $SL_SLUICE && -x $SL_LOADTEST ]] ||
            sl_die "no sluice and sluice-loadtest binaries in $bindir (build them first)"
        SL_BUILD_DESC="prebuilt binaries from $bindir"
        return 0
    fi
    SL_BUILD_DESC="release build"
    command -v cargo >/dev/null 2>&1 ||
        sl_die "cargo not found: install a Rust toolchain (https://rustup.rs) and run again"
    (cd "$SL_ROOT" && cargo build -q --release -p sluice -p sluice-loadtest) ||
        sl_die "cargo build failed"
    tdir=$(cd "$SL_ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    [[ -n $tdir ]] || tdir=${CARGO_TARGET_DIR:-$SL_ROOT/target}
    SL_SLUICE=$tdir/$profile/sluice
    SL_LOADTEST=$tdir/$profile/sluice-loadtest
    [[ -x $SL_SLUICE && -x $SL_LOADTEST ]] || sl_die "built binaries not found in $tdir/$profile"
}

# Prints a free TCP port on 127.0.0.1 (nothing accepts connections on it) not handed out before,
# outside the kernel's ephemeral range (where outgoing connections could hold it).
sl_pick_port() {
    local p i lo=32768 hi=60999 from=10000 to
    read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    if ((lo - from > 2000)); then to=$((lo - 1)); else from=$((hi + 1)) to=65000; fi
    for ((i = 0; i < 200; i++)); do
        p=$((from + RANDOM % (to - from + 1)))
        [[ $SL_PORTS_TAKEN == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            SL_PORTS_TAKEN+="$p "
            echo "$p"
            return 0
        fi
    done
    sl_die "no free port found on 127.0.0.1"
}

# True while PID is alive (and not a zombie of ours).
sl_alive() {
    local pid=$1 state
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null || true)
    [[ $state != Z ]]
}

# sl_stop_pid PID SIGNAL GRACE_SECONDS: sends SIGNAL, waits up to GRACE seconds, then SIGKILL.
sl_stop_pid() {
    local pid=$1 sig=$2 grace=$3 i
    sl_alive "$pid" || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        sl_alive "$pid" || break
        sleep 0.1
    done
    if sl_alive "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Raises the soft limit on open files (often 1024) towards the hard limit: a burst of 1,000
# connections needs more than that in sluice-loadtest, Sluice and PgBouncer. Children inherit it.
sl_raise_nofile() {
    local hard
    hard=$(ulimit -Hn)
    if [[ $hard == unlimited ]] || ((hard > 65536)); then hard=65536; fi
    if (($(ulimit -Sn) < hard)); then ulimit -Sn "$hard" 2>/dev/null || true; fi
}

# The unprivileged user that runs PostgreSQL and PgBouncer: none (ourselves) unless we are root.
sl_pick_run_user() {
    SL_RUN_AS=()
    SL_RUN_USER=$(id -un)
    if [[ $EUID -eq 0 ]]; then
        if id postgres >/dev/null 2>&1; then SL_RUN_USER=postgres; else SL_RUN_USER=nobody; fi
        SL_RUN_AS=(setpriv --reuid="$(id -u "$SL_RUN_USER")" --regid="$(id -g "$SL_RUN_USER")"
            --init-groups --)
    fi
}

# Makes a path owned by the run user (when we are root).
sl_give() {
    if [[ $EUID -eq 0 ]]; then chown -R "$SL_RUN_USER:$(id -gn "$SL_RUN_USER")" "$@"; fi
}

# sl_pg_start DIR MAX_CONNECTIONS [extra postgresql.conf lines...]
# initdb into DIR/data (superuser postgres, password in SL_PG_SUPERPW), start it on a free port
# and wait until it accepts connections. Sets SL_PG_PORT, SL_PG_PID, SL_PG_LOG.
sl_pg_start() {
    local dir=$1 maxconn=$2
    shift 2
    local bindir attempt i
    bindir=$(sl_pg_bindir)
    SL_PG_BINDIR=$bindir
    SL_PG_SUPERPW=${SL_PG_SUPERPW:-super-$RANDOM$RANDOM}
    mkdir -p "$dir"
    printf '%s\n' "$SL_PG_SUPERPW" >"$dir/superpw"
    sl_give "$dir"
    "${SL_RUN_AS[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --pwfile="$dir/superpw" \
        --auth=scram-sha-256 -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        sl_die "initdb failed"
    }
    rm -f "$dir/superpw"
    {
        echo "# --- throwaway server (deploy/local/lib.sh) ---"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "max_connections = $maxconn"
        echo "password_encryption = 'scram-sha-256'"
        echo "fsync = off"
        echo "synchronous_commit = off"
        echo "full_page_writes = off"
        echo "log_min_messages = warning"
        echo "log_connections = off"
        local line
        for line in "$@"; do echo "$line"; done
    } >>"$dir/data/postgresql.conf"
    SL_PG_LOG=$dir/postgres.log
    for attempt in 1 2 3 4 5; do
        SL_PG_PORT=$(sl_pick_port)
        : >"$SL_PG_LOG"
        sl_give "$SL_PG_LOG"
        "${SL_RUN_AS[@]}" "$bindir/postgres" -D "$dir/data" -p "$SL_PG_PORT" \
            </dev/null >>"$SL_PG_LOG" 2>&1 &
        SL_PG_PID=$!
        for ((i = 0; i < 300; i++)); do
            if ! sl_alive "$SL_PG_PID"; then break; fi
            if "$bindir/pg_isready" -q -h 127.0.0.1 -p "$SL_PG_PORT" -t 1 2>/dev/null; then
                return 0
            fi
            sleep 0.1
        done
        if sl_alive "$SL_PG_PID"; then
            cat "$SL_PG_LOG" >&2
            sl_die "PostgreSQL did not become ready within 30 s"
        fi
        wait "$SL_PG_PID" 2>/dev/null || true
        SL_PG_PID=
        grep -q 'could not bind\|in use' "$SL_PG_LOG" || {
            cat "$SL_PG_LOG" >&2
            sl_die "PostgreSQL failed to start (attempt $attempt)"
        }
    done
    sl_die "PostgreSQL: no usable port after 5 attempts"
}

# Fast shutdown (SIGINT) of the PostgreSQL started by sl_pg_start, immediate after 15 s.
sl_pg_stop() {
    [[ -n ${SL_PG_PID:-} ]] || return 0
    local i
    if sl_alive "$SL_PG_PID"; then
        kill -INT "$SL_PG_PID" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            sl_alive "$SL_PG_PID" || break
            sleep 0.1
        done
        # Still there: immediate shutdown, then SIGKILL.
        sl_alive "$SL_PG_PID" && sl_stop_pid "$SL_PG_PID" QUIT 5
    fi
    wait "$SL_PG_PID" 2>/dev/null || true
    SL_PG_PID=
}

# sl_psql DB SQL: runs SQL as the superuser over TCP; prints rows unaligned.
sl_psql() {
    PGPASSWORD=$SL_PG_SUPERPW PGCONNECT_TIMEOUT=10 "$SL_PG_BINDIR/psql" -X -A -t -q \
        -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SL_PG_PORT" -U postgres -d "$1" -c "$2" </dev/null
}

# sl_scram_userlist FILE USER: a PgBouncer auth_file holding USER's SCRAM verifier, copied from
# pg_authid, so that PgBouncer logs in to the server for its clients without the password (and
# runs no PBKDF2 per client login, as it would with the plaintext password there).
sl_scram_userlist() {
    local verifier
    verifier=$(sl_psql postgres "SELECT rolpassword FROM pg_authid WHERE rolname = '$2'")
    [[ $verifier == SCRAM-SHA-256* ]] || sl_die "unexpected verifier for $2"
    printf '"%s" "%s"\n' "$2" "$verifier" >"$1"
}

# sl_pgbouncer_ini DIR DB LISTEN_PORT AUTH_TYPE AUTH_FILE POOL_SIZE MAX_CLIENT_CONN: the
# benchmarks' PgBouncer configuration on standard output: transaction pooling of DB on the
# PostgreSQL of sl_pg_start, listening on 127.0.0.1:LISTEN_PORT only (no Unix socket), its log
# and pid file in DIR, connections not logged.
sl_pgbouncer_ini() {
    printf '%s\n' "[databases]" "$2 = host=127.0.0.1 port=$SL_PG_PORT dbname=$2" "" \
        "[pgbouncer]" "listen_addr = 127.0.0.1" "listen_port = $3" "unix_socket_dir =" \
        "auth_type = $4" "auth_file = $5" "pool_mode = transaction" "default_pool_size = $6" \
        "max_client_conn = $7" "logfile = $1/pgbouncer.log" "pidfile = $1/pgbouncer.pid" \
        "log_connections = 0" "log_disconnections = 0"
}

# sl_wait_port PID PORT [TENTHS]: waits up to TENTHS tenths of a second (default 100) until
# something accepts connections on 127.0.0.1:PORT; fails sooner if process PID ends.
sl_wait_port() {
    local i
    for ((i = 0; i < ${3:-100}; i++)); do
        sl_alive "$1" || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# sl_sluice_start LOG ARGS...: starts Sluice on free ports (retrying if a port was taken) and
# waits until /readyz answers 200. Sets SL_SLUICE_PID, SL_SLUICE_PORT, SL_ADMIN_PORT.
sl_sluice_start() {
    local log=$1 attempt i
    shift
    for attempt in 1 2 3 4 5; do
        SL_SLUICE_PORT=$(sl_pick_port)
        SL_ADMIN_PORT=$(sl_pick_port)
        # No load balancer to leave: stop at once on SIGTERM.
        SLUICE_SHUTDOWN_GRACE=${SLUICE_SHUTDOWN_GRACE:-0} \
            "$SL_SLUICE" --listen "127.0.0.1:$SL_SLUICE_PORT" \
            --admin-listen "127.0.0.1:$SL_ADMIN_PORT" "$@" </dev/null >>"$log" 2>&1 &
        SL_SLUICE_PID=$!
        for ((i = 0; i < 300; i++)); do
            sl_alive "$SL_SLUICE_PID" || break
            if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$SL_ADMIN_PORT/readyz" \
                2>/dev/null; then
                return 0
            fi
            sleep 0.1
        done
        if sl_alive "$SL_SLUICE_PID"; then
            tail -n 20 "$log" >&2
            sl_die "Sluice did not become ready within 30 s (log: $log)"
        fi
        wait "$SL_SLUICE_PID" 2>/dev/null || true
        SL_SLUICE_PID=
        grep -qi 'in use' "$log" || {
            tail -n 20 "$log" >&2
            sl_die "Sluice exited at start-up (attempt $attempt)"
        }
    done
    sl_die "Sluice: no usable port after 5 attempts"
}

# Graceful stop of Sluice (SIGTERM drains; clients are gone by now, so 10 s is plenty).
sl_sluice_stop() {
    [[ -n ${SL_SLUICE_PID:-} ]] || return 0
    sl_stop_pid "$SL_SLUICE_PID" TERM 10
    SL_SLUICE_PID=
}

# CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
SL_CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
sl_cpu_seconds() {
    awk -v tck="$SL_CLK_TCK" '{ sub(/^.*\) /, ""); printf "%.3f\n", ($12 + $13) / tck }' \
        "/proc/$1/stat"
}

# sl_traps CLEANUP: runs the function CLEANUP when the script exits, also on Ctrl-C (exit status
# 130) and SIGTERM (143). CLEANUP starts with `local rc=$?; trap - EXIT INT TERM`.
sl_traps() {
    trap "$1" EXIT
    trap 'echo "interrupted" >&2; exit 130' INT
    trap 'exit 143' TERM
}

# sl_left_behind WORK PID...: removes the directory WORK; fails, naming them, if any PID or any
# process whose command line mentions WORK is still running (nothing a script started may
# outlive it).
sl_left_behind() {
    local work=$1 pid left=()
    shift
    for pid in "$@"; do sl_alive "$pid" && left+=("$pid"); done
    if [[ -n $work ]]; then
        while read -r pid; do [[ -n $pid ]] && left+=("$pid"); done < <(pgrep -f "$work" || true)
        rm -rf "$work"
    fi
    if ((${#left[@]} > 0)); then
        echo "error: processes left behind: ${left[*]}" >&2
        return 1
    fi
}

# sl_metric NAME [LABEL=VALUE]: the samples of series NAME on Sluice's /metrics (SL_ADMIN_PORT)
# whose labels include LABEL=VALUE, summed; 0 when there are none or the scrape fails.
sl_metric() {
    curl -fsS --max-time 2 "http://127.0.0.1:$SL_ADMIN_PORT/metrics" 2>/dev/null |
        awk -v n="$1" -v l="${2:-}" '$1 ~ "^" n "([{]|$)" && (l == "" || index($1, l)) { s += $NF }
            END { print s + 0 }'
}
