//! The admin HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the process is
//! alive) and `/readyz` (Sluice can reach the database and is not draining).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Installs the process-wide Prometheus recorder once and returns its handle. Later calls (more
/// proxies in one process, as in tests) share it.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(crate::metrics::SECONDS_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        match builder.install_recorder() {
            Ok(h) => h,
            // Another recorder is installed (an embedding program's): render ours unattached.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// Whether Sluice can serve: the server answers on its port (probed once a second), and the
/// latest real login to it of at least one (database, user) pool succeeded. Logins are the
/// sessions' own and the warm-up's; when none has happened for [`Readiness::STALE`], the
/// housekeeping logs in once itself (never one login per probe).
#[derive(Default)]
pub struct Readiness {
    pub upstream_ok: AtomicBool,
    /// Shutting down: still serving, for `shutdown_grace`, but out of rotation.
    pub draining: AtomicBool,
    /// `max_server_connections = 0` and the server has not yet told its limit: serving with a
    /// provisional budget of one connection, out of rotation.
    pub budget_pending: AtomicBool,
    /// The configured budget is yet to be checked against the server's limit (no effect on
    /// readiness).
    pub budget_unchecked: AtomicBool,
    /// The latest login outcome of each pool, by (database, user), and when it was.
    logins: Mutex<HashMap<(String, String), (bool, Instant)>>,
}

impl Readiness {
    /// How old the latest login outcome may be before the housekeeping logs in itself.
    pub const STALE: Duration = Duration::from_secs(10);

    /// Records the outcome of a real login to the server as `user` to `database`.
    pub fn login(&self, database: &str, user: &str, ok: bool) {
        self.logins.lock().insert(
            (database.to_string(), user.to_string()),
            (ok, Instant::now()),
        );
    }

    /// Whether some pool's latest login succeeded (with none yet: false).
    pub fn logins_ok(&self) -> bool {
        self.logins.lock().values().any(|(ok, _)| *ok)
    }

    /// The pool to log in to for readiness, if one is due: while logins fail, the one whose
    /// latest outcome is the oldest, every time (a failed login holds no backend); otherwise
    /// that one only once even the newest outcome is older than [`Readiness::STALE`]; `first`
    /// when there is no outcome yet.
    pub fn stale(&self, first: Option<(String, String)>) -> Option<(String, String)> {
        let logins = self.logins.lock();
        let newest = logins.values().map(|(_, at)| *at).max();
        let failing = !logins.values().any(|(ok, _)| *ok);
        match newest {
            None => first,
            Some(at) if at.elapsed() < Self::STALE && !failing => None,
            Some(_) => logins
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone()),
        }
    }

    /// Whether `/readyz` answers 200 (draining aside).
    pub fn ready(&self) -> bool {
        self.upstream_ok.load(Ordering::Relaxed)
            && self.logins_ok()
            && !self.budget_pending.load(Ordering::Relaxed)
    }
}

/// Brings gauges that are cheaper to read than to maintain up to date before a scrape.
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// The status page's data, as JSON (`GET /status`).
pub type StatusReport = Arc<dyn Fn() -> String + Send + Sync>;

/// The status page: one self-contained HTML file (no external assets: it works on a host with
/// no internet), which reads `/status` every second.
const STATUS_PAGE: &str = include_str!("status.html");

#[derive(Clone)]
struct AppState {
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
    refresh: Refresh,
    report: StatusReport,
}

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
    refresh: Refresh,
    report: StatusReport,
) {
    let state = AppState {
        ready,
        shutdown: shutdown.clone(),
        refresh,
        report,
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let upkeep = tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            recorder().run_upkeep();
        }
    });
    let stop = shutdown.clone();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::warn!(error = %e, "admin endpoint failed");
    }
    upkeep.abort();
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (s.refresh)();
    let mut body = recorder().render();
    crate::metrics::render_seconds(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything is inline; nothing may be fetched from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        STATUS_PAGE,
    )
}

async fn status(State(s): State<AppState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        (s.report)(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.shutdown.is_cancelled() || s.ready.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !s.ready.upstream_ok.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "database unreachable, or its TLS certificate not accepted (server_tls)\n",
        )
    } else if !s.ready.logins_ok() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "logins to the database fail (see the log and sluice_server_connects_total)\n",
        )
    } else if !s.ready.ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "max_server_connections is not derived yet: the server's max_connections could not be read (see the log)\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_latest_logins() {
        let r = Readiness::default();
        r.upstream_ok.store(true, Ordering::Relaxed);
        let first = Some(("db".to_string(), "u".to_string()));
        // No login yet: not ready, and the first pool is due.
        assert!(!r.ready());
        assert_eq!(r.stale(first.clone()), first);
        r.login("db", "u", true);
        assert!(r.ready());
        assert_eq!(r.stale(first.clone()), None, "fresh and fine: nothing due");
        // One pool failing while another serves: still ready.
        r.login("db", "other", false);
        assert!(r.ready());
        r.login("db", "u", false);
        assert!(!r.ready());
        // While every login fails, one is due every time: the oldest outcome.
        let due = r.stale(first.clone()).expect("due while failing");
        assert_eq!(due, ("db".to_string(), "other".to_string()));
        r.login("db", "other", true);
        assert!(r.ready());
        r.upstream_ok.store(false, Ordering::Relaxed);
        assert!(!r.ready(), "the port must answer too");
    }
}
