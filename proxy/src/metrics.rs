//! Metric names and cheap handles, recorded through the `metrics` facade.
//!
//! Every name is `sluice_*` with its unit in the name. Handles that the hot path touches are
//! registered once and cached ([`GroupMetrics`], [`Global`]), so recording is an atomic add, not
//! a registry lookup. Label sets are fixed; group labels are capped by
//! [`group_label`] so a flood of application names cannot grow the series without bound.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics::{Counter, Gauge, Histogram, Unit};

mod seconds;
pub use self::seconds::{render as render_seconds, Seconds, SECONDS_BUCKETS};

const POOL_WAIT_HELP: &str = "Time to borrow a server connection";
const TRANSACTION_TIME_HELP: &str = "Time a server connection was held per checkout";

pub const CLIENT_CONNECTIONS: &str = "sluice_client_connections";
pub const CLIENT_ACCEPTED: &str = "sluice_client_connections_accepted_total";
pub const CLIENT_REJECTED: &str = "sluice_client_connections_rejected_total";
pub const CLIENT_AUTH_FAILURES: &str = "sluice_client_auth_failures_total";
pub const CLIENT_LOGINS: &str = "sluice_client_logins_total";
pub const SERVER_LOGINS: &str = "sluice_server_logins_total";
pub const QUERIES_REJECTED: &str = "sluice_queries_rejected_total";
pub const POOL_WAIT: &str = "sluice_pool_wait_seconds";
pub const POOL_WAITING: &str = "sluice_pool_waiting_clients";
pub const POOL_OLDEST_WAIT: &str = "sluice_pool_oldest_wait_seconds";
pub const SERVER_CONNECTIONS: &str = "sluice_server_connections";
pub const SERVER_BUDGET: &str = "sluice_server_connections_budget";
pub const FLEET_SLOTS: &str = "sluice_fleet_slots";
pub const FLEET_INSTANCES: &str = "sluice_fleet_instances";
pub const FLEET_WANTING: &str = "sluice_fleet_wanting";
pub const FLEET_ERRORS: &str = "sluice_fleet_coordination_errors_total";
pub const FLEET_STATEMENTS: &str = "sluice_fleet_coordination_statements_total";
pub const SERVER_CONNECTS: &str = "sluice_server_connects_total";
pub const SERVER_CONNECT_TIME: &str = "sluice_server_connect_seconds";
pub const SERVER_CLOSED: &str = "sluice_server_connections_closed_total";
pub const SERVER_UNAVAILABLE: &str = "sluice_server_unavailable";
pub const CLIENT_TIMEOUTS: &str = "sluice_client_timeouts_total";
pub const QUERIES_CANCELLED: &str = "sluice_queries_cancelled_total";
pub const TRANSACTIONS: &str = "sluice_transactions_total";
pub const TRANSACTION_TIME: &str = "sluice_transaction_seconds";
pub const BYTES: &str = "sluice_bytes_total";
pub const PINNED_SESSIONS: &str = "sluice_pinned_sessions";
pub const SESSION_PINS: &str = "sluice_session_pins_total";
pub const CLIENT_TLS: &str = "sluice_client_connections_tls_total";
pub const SERVER_TLS: &str = "sluice_server_connections_tls";
pub const TLS_HANDSHAKE_FAILURES: &str = "sluice_tls_handshake_failures_total";

/// The label values each labelled counter can take. Every one is exported at 0 from start-up
/// ([`zero_initialise`]), so `rate()` and alert rules work from the first scrape; recording a
/// value missing here is a bug (checked in debug builds).
pub const CLIENT_REJECT_REASONS: &[&str] = &["max_client_connections", "tls_required"];
pub const CLIENT_TIMEOUT_REASONS: &[&str] = &[
    "idle_transaction_timeout",
    "client_stall_timeout",
    "query_timeout",
];
pub const CANCEL_REASONS: &[&str] = &["query_timeout"];
pub const QUERY_REJECT_REASONS: &[&str] = &[
    "queue_full",
    "predicted_timeout",
    "overload",
    "wait_timeout",
    "server_unavailable",
    "shutting_down",
];
/// How clients authenticate to Sluice (`method` of [`CLIENT_LOGINS`]).
/// `password`: a cleartext password, which passthrough authentication has the server verify.
pub const CLIENT_LOGIN_METHODS: &[&str] =
    &["scram-sha-256", "scram-sha-256-plus", "md5", "password"];
/// Who judged a client's password (`auth` of [`CLIENT_LOGINS`]): its configured secret
/// (`users`, unknown users too where no other mode applies), the server (`passthrough`), or
/// the secret `auth_query` fetched.
pub const CLIENT_AUTH_MODES: &[&str] = &["users", "passthrough", "auth_query"];
/// How Sluice authenticates to the server (`method` of [`SERVER_LOGINS`]): `server_auth`.
pub const SERVER_LOGIN_METHODS: &[&str] = &["password", "rds_iam"];
/// `result` of [`CLIENT_LOGINS`] and [`SERVER_LOGINS`]: accepted; refused (a wrong password
/// or token); error (no credential could be had, or the exchange broke off); limited (a
/// passthrough login refused without a try, after too many failures).
pub const LOGIN_RESULTS: &[&str] = &["ok", "refused", "error", "limited"];

pub const CONNECT_RESULTS: &[&str] = &[
    "ok",
    "refused",
    "timeout",
    "tls",
    "auth_failed",
    "rejected",
    "read_only",
    "error",
];
pub const FLEET_ERROR_KINDS: &[&str] = &["connect", "query", "lost"];

pub const CLOSE_REASONS: &[&str] = &[
    "idle_timeout",
    "lifetime",
    "evicted",
    "error",
    "client_gone",
    "dead_on_checkout",
    "failed_check",
    "outage",
    "reconnect",
    "idle_transaction_timeout",
    "client_stall_timeout",
    "query_timeout",
    "pool_full",
    "closed_by_server",
    "fleet_share",
];
pub const PIN_REASONS: &[&str] = &[
    "set",
    "listen",
    "advisory_lock",
    "temp_table",
    "with_hold_cursor",
    "sql_prepare",
    "load",
];
pub const TLS_FAILURE_REASONS: &[&str] = &[
    "unknown_issuer",
    "expired",
    "not_yet_valid",
    "wrong_host",
    "revoked",
    "bad_certificate",
    "protocol",
    "io",
    "unsupported",
    "no_alpn",
];

/// Registers every counter whose label values are known in advance, at 0 (group counters are
/// registered with their group, [`GroupMetrics::new`]).
pub fn zero_initialise() {
    let g = global();
    for c in [
        &g.accepted,
        &g.auth_failures,
        &g.clients_tls,
        &g.clients_plain,
    ] {
        c.increment(0);
    }
    let sets: [(&'static str, &'static str, &[&'static str]); 7] = [
        (FLEET_ERRORS, "kind", FLEET_ERROR_KINDS),
        (CLIENT_REJECTED, "reason", CLIENT_REJECT_REASONS),
        (CLIENT_TIMEOUTS, "reason", CLIENT_TIMEOUT_REASONS),
        (QUERIES_CANCELLED, "reason", CANCEL_REASONS),
        (SERVER_CONNECTS, "result", CONNECT_RESULTS),
        (SERVER_CLOSED, "reason", CLOSE_REASONS),
        (SESSION_PINS, "reason", PIN_REASONS),
    ];
    for (name, label, values) in sets {
        for value in values.iter().copied() {
            counter!(name, label => value).increment(0);
        }
    }
    for method in SERVER_LOGIN_METHODS.iter().copied() {
        for result in LOGIN_RESULTS.iter().copied() {
            counter!(SERVER_LOGINS, "method" => method, "result" => result).increment(0);
        }
    }
    for auth in CLIENT_AUTH_MODES.iter().copied() {
        for method in CLIENT_LOGIN_METHODS.iter().copied() {
            for result in LOGIN_RESULTS.iter().copied() {
                counter!(CLIENT_LOGINS, "auth" => auth, "method" => method, "result" => result)
                    .increment(0);
            }
        }
    }
    for side in ["client", "server"] {
        for reason in TLS_FAILURE_REASONS.iter().copied() {
            counter!(TLS_HANDSHAKE_FAILURES, "side" => side, "reason" => reason).increment(0);
        }
    }
}

/// Describes every metric once, so the exposition carries HELP and unit lines.
pub fn describe() {
    describe_gauge!(
        CLIENT_CONNECTIONS,
        "Client connections by state (active, waiting, idle)"
    );
    describe_counter!(CLIENT_ACCEPTED, "Client connections accepted");
    describe_counter!(CLIENT_REJECTED, "Client connections refused, by reason");
    describe_counter!(CLIENT_AUTH_FAILURES, "Client authentication failures");
    describe_counter!(
        CLIENT_LOGINS,
        "Client authentications by method (scram-sha-256, scram-sha-256-plus, md5) and result (ok, refused, error)"
    );
    describe_counter!(
        SERVER_LOGINS,
        "Sluice's logins to the server by method (password, rds_iam) and result (ok, refused, error)"
    );
    describe_counter!(
        QUERIES_REJECTED,
        "Requests shed without being executed, by reason and group"
    );
    // POOL_WAIT and TRANSACTION_TIME: see `seconds`.
    describe_gauge!(
        POOL_WAITING,
        "Clients waiting for a server connection, by group"
    );
    describe_gauge!(
        POOL_OLDEST_WAIT,
        Unit::Seconds,
        "How long the longest-waiting client of the group has waited so far (0: none waits)"
    );
    describe_gauge!(
        SERVER_CONNECTIONS,
        "Server connections by state (active, idle, connecting)"
    );
    describe_gauge!(
        SERVER_BUDGET,
        "The server connection budget this instance's pools may use (a fleet member: its share)"
    );
    describe_gauge!(
        FLEET_SLOTS,
        "Fleet budget slots held: by this instance (held=\"instance\"), by the whole fleet (held=\"fleet\"), the fleet's budget (held=\"budget\")"
    );
    describe_gauge!(FLEET_INSTANCES, "Fleet members seen at the last look");
    describe_gauge!(
        FLEET_WANTING,
        "1 while this instance has waiting clients and less than its fair share"
    );
    describe_counter!(
        FLEET_STATEMENTS,
        "Statements the fleet coordination session has sent (its cost to the server)"
    );
    describe_counter!(
        FLEET_ERRORS,
        "Failures of the fleet's coordination session, by kind (connect, query, lost)"
    );
    describe_counter!(SERVER_CONNECTS, "Server connection attempts, by result");
    describe_histogram!(
        SERVER_CONNECT_TIME,
        Unit::Seconds,
        "Time to connect and authenticate to the server"
    );
    describe_counter!(SERVER_CLOSED, "Server connections closed, by reason");
    describe_gauge!(
        SERVER_UNAVAILABLE,
        "1 while the database server cannot be reached (requests wait while Sluice reconnects), else 0"
    );
    describe_counter!(
        CLIENT_TIMEOUTS,
        "Clients disconnected by a timeout, by reason (idle_transaction_timeout, client_stall_timeout)"
    );
    describe_counter!(
        QUERIES_CANCELLED,
        "Requests Sluice cancelled on their server, by reason (query_timeout)"
    );
    describe_counter!(
        TRANSACTIONS,
        "Transactions (pool checkouts) completed, by group"
    );
    describe_counter!(BYTES, Unit::Bytes, "Bytes relayed, by direction");
    describe_gauge!(
        PINNED_SESSIONS,
        "Client sessions pinned to a server connection"
    );
    describe_counter!(SESSION_PINS, "Sessions pinned, by reason");
    describe_counter!(
        CLIENT_TLS,
        "Client connections that sent a startup message, by whether they use TLS"
    );
    describe_gauge!(
        SERVER_TLS,
        "Open server connections, by whether they use TLS"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed, by side (client, server) and reason"
    );
}

/// The group names exported under their own label so far.
static GROUP_LABELS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static GROUP_LABEL_CAP: OnceLock<usize> = OnceLock::new();

/// Sets how many distinct group labels are exported before the rest become `other`.
pub fn set_group_label_cap(cap: usize) {
    let _ = GROUP_LABEL_CAP.set(cap);
}

/// The label under which a new group is exported: its name while fewer than the cap have
/// theirs (a name seen before keeps its label), else `other`.
pub fn group_label(name: &str) -> String {
    let cap = *GROUP_LABEL_CAP.get().unwrap_or(&100);
    let mut seen = GROUP_LABELS.lock();
    if seen.contains(name) {
        return name.to_string();
    }
    if seen.len() < cap {
        seen.insert(name.to_string());
        return name.to_string();
    }
    "other".to_string()
}

/// Handles for one group, registered when the group is first seen.
#[derive(Clone)]
pub struct GroupMetrics {
    pub wait: Arc<Seconds>,
    pub waiting: Gauge,
    pub oldest_wait: Gauge,
    pub transactions: Counter,
    pub transaction_time: Arc<Seconds>,
    label: String,
}

impl GroupMetrics {
    pub fn new(name: &str) -> Self {
        let label = group_label(name);
        for reason in QUERY_REJECT_REASONS.iter().copied() {
            counter!(QUERIES_REJECTED, "reason" => reason, "group" => label.clone()).increment(0);
        }
        GroupMetrics {
            wait: seconds::series(POOL_WAIT, POOL_WAIT_HELP, &label),
            waiting: gauge!(POOL_WAITING, "group" => label.clone()),
            oldest_wait: gauge!(POOL_OLDEST_WAIT, "group" => label.clone()),
            transactions: counter!(TRANSACTIONS, "group" => label.clone()),
            transaction_time: seconds::series(TRANSACTION_TIME, TRANSACTION_TIME_HELP, &label),
            label,
        }
    }

    /// Counts a shed request; reasons are few and fixed, so the lookup is rare and bounded.
    pub fn rejected(&self, reason: &'static str) {
        debug_assert!(QUERY_REJECT_REASONS.contains(&reason), "{reason}");
        counter!(QUERIES_REJECTED, "reason" => reason, "group" => self.label.clone()).increment(1);
    }
}

/// Handles that are not per group.
pub struct Global {
    pub clients_active: Gauge,
    pub clients_waiting: Gauge,
    pub clients_idle: Gauge,
    pub accepted: Counter,
    pub auth_failures: Counter,
    pub servers_active: Gauge,
    pub servers_idle: Gauge,
    pub servers_connecting: Gauge,
    pub budget: Gauge,
    pub connect_time: Histogram,
    pub bytes_to_server: Counter,
    pub bytes_to_client: Counter,
    pub pinned: Gauge,
    pub clients_tls: Counter,
    pub clients_plain: Counter,
    pub servers_tls: Gauge,
    pub servers_plain: Gauge,
    pub server_unavailable: Gauge,
}

/// The process-wide handles. Registered on first use, after the recorder is installed.
pub fn global() -> &'static Global {
    static G: OnceLock<Global> = OnceLock::new();
    G.get_or_init(|| Global {
        clients_active: gauge!(CLIENT_CONNECTIONS, "state" => "active"),
        clients_waiting: gauge!(CLIENT_CONNECTIONS, "state" => "waiting"),
        clients_idle: gauge!(CLIENT_CONNECTIONS, "state" => "idle"),
        accepted: counter!(CLIENT_ACCEPTED),
        auth_failures: counter!(CLIENT_AUTH_FAILURES),
        servers_active: gauge!(SERVER_CONNECTIONS, "state" => "active"),
        servers_idle: gauge!(SERVER_CONNECTIONS, "state" => "idle"),
        servers_connecting: gauge!(SERVER_CONNECTIONS, "state" => "connecting"),
        budget: gauge!(SERVER_BUDGET),
        connect_time: histogram!(SERVER_CONNECT_TIME),
        bytes_to_server: counter!(BYTES, "direction" => "client_to_server"),
        bytes_to_client: counter!(BYTES, "direction" => "server_to_client"),
        pinned: gauge!(PINNED_SESSIONS),
        clients_tls: counter!(CLIENT_TLS, "tls" => "true"),
        clients_plain: counter!(CLIENT_TLS, "tls" => "false"),
        servers_tls: gauge!(SERVER_TLS, "tls" => "true"),
        servers_plain: gauge!(SERVER_TLS, "tls" => "false"),
        server_unavailable: gauge!(SERVER_UNAVAILABLE),
    })
}

pub fn client_rejected(reason: &'static str) {
    debug_assert!(CLIENT_REJECT_REASONS.contains(&reason), "{reason}");
    counter!(CLIENT_REJECTED, "reason" => reason).increment(1);
}

/// A client's authentication ended: `auth` of [`CLIENT_AUTH_MODES`], `method` of
/// [`CLIENT_LOGIN_METHODS`], `result` of [`LOGIN_RESULTS`].
pub fn client_login(auth: &'static str, method: &'static str, result: &'static str) {
    debug_assert!(CLIENT_AUTH_MODES.contains(&auth), "{auth}");
    debug_assert!(CLIENT_LOGIN_METHODS.contains(&method), "{method}");
    debug_assert!(LOGIN_RESULTS.contains(&result), "{result}");
    counter!(CLIENT_LOGINS, "auth" => auth, "method" => method, "result" => result).increment(1);
}

/// A login of Sluice's to the server ended: `method` of [`SERVER_LOGIN_METHODS`], `result`
/// of [`LOGIN_RESULTS`].
pub fn server_login(method: &'static str, result: &'static str) {
    debug_assert!(SERVER_LOGIN_METHODS.contains(&method), "{method}");
    debug_assert!(LOGIN_RESULTS.contains(&result), "{result}");
    counter!(SERVER_LOGINS, "method" => method, "result" => result).increment(1);
}

pub fn server_connect(result: &'static str) {
    debug_assert!(CONNECT_RESULTS.contains(&result), "{result}");
    tally(&TALLIES.connects, CONNECT_RESULTS, result, 1);
    counter!(SERVER_CONNECTS, "result" => result).increment(1);
}

pub fn client_timed_out(reason: &'static str) {
    debug_assert!(CLIENT_TIMEOUT_REASONS.contains(&reason), "{reason}");
    counter!(CLIENT_TIMEOUTS, "reason" => reason).increment(1);
}

pub fn query_cancelled(reason: &'static str) {
    debug_assert!(CANCEL_REASONS.contains(&reason), "{reason}");
    counter!(QUERIES_CANCELLED, "reason" => reason).increment(1);
}

pub fn server_closed(reason: &'static str) {
    debug_assert!(CLOSE_REASONS.contains(&reason), "{reason}");
    counter!(SERVER_CLOSED, "reason" => reason).increment(1);
}

/// Counts a session pinned to its server connection for `reason`, until [`session_unpinned`].
pub fn session_pinned(reason: &'static str) {
    debug_assert!(PIN_REASONS.contains(&reason), "{reason}");
    counter!(SESSION_PINS, "reason" => reason).increment(1);
    global().pinned.increment(1.0);
    tally(&TALLIES.pins, PIN_REASONS, reason, 1);
    tally(&TALLIES.pinned_now, PIN_REASONS, reason, 1);
}

/// A pinned session ended.
pub fn session_unpinned(reason: &'static str) {
    global().pinned.decrement(1.0);
    tally(&TALLIES.pinned_now, PIN_REASONS, reason, -1);
}

/// Counts beside the exported series that Sluice itself reads back (the status page): the
/// `metrics` facade's handles are write-only. Indexed like the label lists above.
pub struct Tallies {
    pub connects: [AtomicI64; CONNECT_RESULTS.len()],
    pub pins: [AtomicI64; PIN_REASONS.len()],
    pub pinned_now: [AtomicI64; PIN_REASONS.len()],
}

pub static TALLIES: Tallies = Tallies {
    connects: [const { AtomicI64::new(0) }; CONNECT_RESULTS.len()],
    pins: [const { AtomicI64::new(0) }; PIN_REASONS.len()],
    pinned_now: [const { AtomicI64::new(0) }; PIN_REASONS.len()],
};

fn tally(counts: &[AtomicI64], labels: &[&str], label: &str, delta: i64) {
    if let Some(i) = labels.iter().position(|l| *l == label) {
        counts[i].fetch_add(delta, Ordering::Relaxed);
    }
}

/// The tallies as (label, value) pairs.
pub fn read_tally(counts: &[AtomicI64], labels: &[&'static str]) -> Vec<(&'static str, i64)> {
    labels
        .iter()
        .zip(counts)
        .map(|(l, c)| (*l, c.load(Ordering::Relaxed)))
        .collect()
}

/// Counts a failed TLS handshake; `side` is `client` or `server`, reasons are a fixed set.
pub fn tls_handshake_failed(side: &'static str, reason: &'static str) {
    debug_assert!(TLS_FAILURE_REASONS.contains(&reason), "{reason}");
    counter!(TLS_HANDSHAKE_FAILURES, "side" => side, "reason" => reason).increment(1);
}
