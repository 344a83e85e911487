//! Retry behaviour of a well-written function: which errors are worth
//! retrying, how long to back off, and the shared retry budget.
//!
//! Errors are reduced to a short stable key (a SQLSTATE such as `53300`, or a
//! reason such as `connect_refused`, `timeout`) used both for the retry
//! decision and for the by-error tables in the report.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, RngExt};

/// The shared retry budget's size: a token bucket of `capacity` tokens, refilled at
/// `refill_per_sec`; each retry takes one (see [`TokenBucket`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub capacity: f64,
    pub refill_per_sec: f64,
}

/// A classified failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorClass {
    /// SQLSTATE or reason, e.g. `53300`, `08006`, `connect_refused`.
    pub key: String,
    pub retryable: bool,
    /// Human-readable detail (first seen is kept for the report).
    pub detail: String,
    /// The delay the server's HINT asks a retry to wait at least (Sluice's `Retry after about
    /// N ms`).
    pub retry_after: Option<Duration>,
}

impl ErrorClass {
    pub fn new(key: &str, retryable: bool, detail: impl Into<String>) -> Self {
        ErrorClass {
            key: key.to_string(),
            retryable,
            detail: detail.into(),
            retry_after: None,
        }
    }
}

/// The retry delay in a HINT like Sluice's `Retry after about 250 ms, with backoff.`.
pub fn hinted_delay(hint: &str) -> Option<Duration> {
    let rest = hint.split("etry after about ").nth(1)?;
    let ms: u64 = rest.split(" ms").next()?.trim().parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// The wait before a retry: the exponential backoff, and when the server hinted a delay, at
/// least that delay plus up to as much again (full jitter above the floor, so the functions
/// that were refused together do not come back together).
pub fn retry_wait(backoff: Duration, hinted: Option<Duration>, rng: &mut impl Rng) -> Duration {
    match hinted {
        Some(h) if !h.is_zero() => {
            let nanos = h.as_nanos().min(u128::from(u64::MAX)) as u64;
            backoff.max(h + Duration::from_nanos(rng.random_range(0..=nanos)))
        }
        _ => backoff,
    }
}

/// SQLSTATEs a function should retry. 53300 (too many connections; Sluice
/// sheds with it and guarantees the query did not run), 57P03 (cannot connect
/// now), class 08 (connection exception), 57P01 (server terminated the
/// session, so its transaction rolled back), and the standard
/// serialization/deadlock pair, where retrying is the documented fix.
pub fn sqlstate_retryable(code: &str) -> bool {
    matches!(code, "53300" | "57P03" | "57P01" | "40001" | "40P01") || code.starts_with("08")
}

/// Classify a driver error.
pub fn classify(err: &tokio_postgres::Error) -> ErrorClass {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        let mut class = ErrorClass::new(code, sqlstate_retryable(code), db.message());
        class.retry_after = db.hint().and_then(hinted_delay);
        return class;
    }
    if err.is_closed() {
        return ErrorClass::new("connection_closed", true, err.to_string());
    }
    if let Some(ioe) = find_io_error(err) {
        let key = match ioe.kind() {
            io::ErrorKind::ConnectionRefused => "connect_refused",
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "connection_reset",
            io::ErrorKind::UnexpectedEof => "connection_closed",
            io::ErrorKind::TimedOut => "connect_timeout",
            io::ErrorKind::NotFound => "connect_not_found",
            // e.g. out of ephemeral ports or sockets: transient on this side.
            _ => "io_error",
        };
        return ErrorClass::new(key, true, format!("{err}: {ioe}"));
    }
    // tokio-postgres does not expose its error kinds; its Display strings
    // are stable and distinguish the cases that matter here.
    let text = err.to_string();
    match text.as_str() {
        "timeout waiting for server" => ErrorClass::new("connect_timeout", true, text),
        "authentication error" => ErrorClass::new("auth_error", false, full_message(err)),
        "invalid connection string" | "invalid configuration" => {
            ErrorClass::new("config_error", false, full_message(err))
        }
        "error performing TLS handshake" => ErrorClass::new("tls_error", false, full_message(err)),
        "error connecting to server" | "error communicating with the server" => {
            ErrorClass::new("io_error", true, full_message(err))
        }
        _ => ErrorClass::new("client_error", false, full_message(err)),
    }
}

/// The error and its sources on one line.
pub fn full_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        let t = e.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = e.source();
    }
    s
}

fn find_io_error(err: &tokio_postgres::Error) -> Option<&io::Error> {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = src {
        if let Some(ioe) = e.downcast_ref::<io::Error>() {
            return Some(ioe);
        }
        src = e.source();
    }
    None
}

/// Full-jitter exponential backoff before attempt `attempt + 1`, where
/// `attempt` (>= 1) is the attempt that just failed: uniform in
/// `[0, min(cap, base * 2^(attempt-1))]`. Full jitter spreads a herd of
/// simultaneously rejected functions instead of re-synchronising them.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, rng: &mut impl Rng) -> Duration {
    let ceiling = backoff_ceiling(attempt, base, cap);
    if ceiling.is_zero() {
        return Duration::ZERO;
    }
    let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// Upper bound of [`backoff`] for a given attempt.
pub fn backoff_ceiling(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << exp).min(cap)
}

/// Shared token bucket: each retry takes a token; tokens refill over time.
/// Stops a fleet of functions from multiplying load on a struggling
/// database with retries (the AWS SDK "retry quota" idea).
#[derive(Debug)]
pub struct TokenBucket {
    cfg: RetryBudget,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(cfg: RetryBudget) -> Self {
        TokenBucket {
            cfg,
            state: Mutex::new((cfg.capacity, Instant::now())),
        }
    }

    /// Take one token if available.
    pub fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> bool {
        // A poisoned lock only means another task panicked mid-update of two
        // plain numbers; the state is still usable.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(st.1).as_secs_f64();
        st.0 = (st.0 + elapsed * self.cfg.refill_per_sec).min(self.cfg.capacity);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_hinted_delay_is_waited_at_least_with_jitter_above_it() {
        assert_eq!(
            hinted_delay("Retry after about 250 ms, with backoff."),
            Some(Duration::from_millis(250))
        );
        assert_eq!(hinted_delay("Retry after about soon"), None);
        assert_eq!(hinted_delay("check the connection"), None);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let hint = Duration::from_millis(250);
        let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
        for _ in 0..2000 {
            let w = retry_wait(Duration::from_millis(10), Some(hint), &mut rng);
            min = min.min(w);
            max = max.max(w);
        }
        assert!(min >= hint && max <= hint * 2, "{min:?}..{max:?}");
        assert!(
            max > hint.mul_f64(1.9) && min < hint.mul_f64(1.1),
            "spread: {min:?}..{max:?}"
        );
        // A longer backoff wins; no hint: the backoff alone.
        let long = Duration::from_secs(3);
        assert_eq!(retry_wait(long, Some(hint), &mut rng), long);
        assert_eq!(retry_wait(hint, None, &mut rng), hint);
    }

    #[test]
    fn backoff_stays_within_full_jitter_bounds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let base = Duration::from_millis(50);
        let cap = Duration::from_secs(2);
        for attempt in 1..=12 {
            let ceil = backoff_ceiling(attempt, base, cap);
            let expect = (base * 2u32.pow(attempt - 1)).min(cap);
            assert_eq!(ceil, expect);
            let mut max_seen = Duration::ZERO;
            let mut min_seen = Duration::MAX;
            for _ in 0..2000 {
                let b = backoff(attempt, base, cap, &mut rng);
                assert!(b <= ceil);
                max_seen = max_seen.max(b);
                min_seen = min_seen.min(b);
            }
            // Full jitter: spread over the whole range, not clustered at the top.
            assert!(max_seen > ceil.mul_f64(0.9), "attempt {attempt}");
            assert!(min_seen < ceil.mul_f64(0.1), "attempt {attempt}");
        }
        assert_eq!(backoff_ceiling(1000, base, cap), cap);
        assert_eq!(backoff(3, Duration::ZERO, cap, &mut rng), Duration::ZERO);
    }

    #[test]
    fn retryable_sqlstates() {
        for c in ["53300", "57P03", "08006", "08001", "57P01", "40001"] {
            assert!(sqlstate_retryable(c), "{c}");
        }
        for c in ["42P01", "28P01", "23505", "57014"] {
            assert!(!sqlstate_retryable(c), "{c}");
        }
    }

    #[test]
    fn token_bucket_limits_and_refills() {
        let b = TokenBucket::new(RetryBudget {
            capacity: 3.0,
            refill_per_sec: 2.0,
        });
        let t0 = Instant::now();
        assert!(b.try_take_at(t0));
        assert!(b.try_take_at(t0));
        assert!(b.try_take_at(t0));
        assert!(!b.try_take_at(t0));
        assert!(!b.try_take_at(t0 + Duration::from_millis(400)));
        assert!(b.try_take_at(t0 + Duration::from_millis(600)));
        // Refill never exceeds capacity.
        let later = t0 + Duration::from_secs(100);
        assert!(b.try_take_at(later) && b.try_take_at(later) && b.try_take_at(later));
        assert!(!b.try_take_at(later));
    }
}
