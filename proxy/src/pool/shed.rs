//! Load shedding: predicting waits from the release rate, and detecting sustained overload.
//!
//! Two signals decide whether a new request may queue (see "Fail at Scale", ACM Queue 2015):
//! - the **predicted wait**: the requests ahead of it divided by the recent rate at which server
//!   connections are released; a request that would wait past its timeout is refused at once
//!   (`predicted_timeout`) instead of timing out later, having held a queue slot for nothing;
//! - **overload**, as that article's adaptation of CoDel puts it: when the queue has not been
//!   empty for a whole `interval`, and has not drained in it either, it is a standing queue, not
//!   a burst being worked off. While that lasts (until the queue empties), new
//!   arrivals may only queue if their predicted wait is within `target`, and a request whose turn
//!   comes after it has waited more than 1.5 × `target` is refused rather than served (`overload`):
//!   the requests admitted keep a wait close to `target` however long the overload lasts, where
//!   queueing them all would make every one of them wait about `wait_timeout`. A burst that
//!   drains within `interval` is served whole. An empty queue ends the state.

use std::time::Duration;

use tokio::time::Instant;

use super::Reason;

/// A rate-measurement window closes after at least this long and `WINDOW_RELEASES` releases,
/// or after `WINDOW_MAX` whatever the count, so one slow transaction is not taken for the rate.
const WINDOW: Duration = Duration::from_millis(250);
const WINDOW_RELEASES: u32 = 8;
const WINDOW_MAX: Duration = Duration::from_secs(2);

pub struct Shedder {
    target: Duration,
    interval: Duration,
    /// When the current window began and releases seen in it.
    window_start: Option<Instant>,
    window_count: u32,
    last_release: Option<Instant>,
    /// Since when requests have been queueing (none while capacity is free).
    saturated_since: Option<Instant>,
    /// While requests queue: when the current interval began, and the longest the queue has
    /// been since.
    mark: Option<(Instant, u32)>,
    /// The queue stood for an interval without draining (see the module's documentation).
    overloaded: bool,
    /// Smoothed releases per second; `None` until a first window closes.
    rate: Option<f64>,
    /// The last window's rate: predictions use the higher of the two, so a rate that is
    /// rising is believed at once and shedding errs towards admitting.
    last_rate: f64,
}

impl Shedder {
    pub fn new(target: Duration, interval: Duration) -> Self {
        Shedder {
            target,
            interval,
            window_start: None,
            window_count: 0,
            last_release: None,
            saturated_since: None,
            mark: None,
            overloaded: false,
            rate: None,
            last_rate: 0.0,
        }
    }

    /// Releases are counted only while requests queue: then their rate is the capacity, not
    /// the demand, which is all a light load would measure.
    ///
    /// `steady` is false while server connections are being opened: capacity is still growing,
    /// so the window measuring the rate starts over.
    pub fn on_release(&mut self, now: Instant, steady: bool) {
        if self.saturated_since.is_none() {
            return;
        }
        if !steady {
            self.window_start = Some(now);
            self.window_count = 0;
            return;
        }
        let start = *self.window_start.get_or_insert(now);
        self.window_count += 1;
        self.last_release = Some(now);
        let elapsed = now.saturating_duration_since(start);
        if (elapsed >= WINDOW && self.window_count >= WINDOW_RELEASES) || elapsed >= WINDOW_MAX {
            let r = f64::from(self.window_count) / elapsed.as_secs_f64();
            self.last_rate = r;
            self.rate = Some(match self.rate {
                Some(old) => 0.5 * old + 0.5 * r,
                None => r,
            });
            self.window_start = Some(now);
            self.window_count = 0;
        }
    }

    /// The recent release rate, decayed when releases stopped coming.
    fn rate(&self, now: Instant) -> Option<f64> {
        let rate = self.rate?.max(self.last_rate);
        // Only a busy spell says anything about slowness: with nobody queueing, the time since
        // the last release is just a quiet period.
        let Some(saturated) = self.saturated_since else {
            return Some(rate);
        };
        let since = self.last_release.map_or(saturated, |r| r.max(saturated));
        let quiet = now.saturating_duration_since(since);
        if quiet > WINDOW_MAX {
            // Nothing released for a while: the true rate is at most one per quiet period.
            return Some(rate.min(1.0 / quiet.as_secs_f64()));
        }
        Some(rate)
    }

    pub fn retarget(&mut self, target: Duration, interval: Duration) {
        self.target = target;
        self.interval = interval;
    }

    /// The server came back from an outage: the release rate measured the outage, not the
    /// capacity, and is measured anew.
    pub fn outage_over(&mut self, now: Instant) {
        self.rate = None;
        self.last_rate = 0.0;
        self.last_release = None;
        self.window_start = Some(now);
        self.window_count = 0;
    }

    /// The requests held through an outage have all been served: a queue that stands from now
    /// on stands for the load.
    pub fn restart_spell(&mut self, now: Instant) {
        if self.saturated_since.is_some() {
            self.saturated_since = Some(now);
            self.mark = Some((now, 0));
        }
        self.overloaded = false;
    }

    /// The first request of a busy spell started queueing.
    pub fn queue_started(&mut self, now: Instant) {
        if self.saturated_since.is_none() {
            self.saturated_since = Some(now);
            self.mark = Some((now, 0));
            // A window spanning an unsaturated spell would understate the rate.
            self.window_start = Some(now);
            self.window_count = 0;
        }
    }

    pub fn queue_empty(&mut self) {
        self.saturated_since = None;
        self.mark = None;
        self.overloaded = false;
    }

    /// Takes note of the queue's length (`waiting`). A queue that has not emptied for an
    /// interval and is about as long at its end as it was at its longest (it did not drain by a
    /// tenth) stands: overload, until it empties. One that drains — a burst being worked off —
    /// starts another interval.
    pub fn observe(&mut self, now: Instant, waiting: u32) {
        if self.overloaded {
            return;
        }
        let Some((since, peak)) = &mut self.mark else {
            return;
        };
        *peak = (*peak).max(waiting);
        if now.saturating_duration_since(*since) >= self.interval {
            if u64::from(waiting) * 10 >= u64::from(*peak) * 9 {
                self.overloaded = true;
            } else {
                self.mark = Some((now, waiting));
            }
        }
    }

    pub fn is_overloaded(&self) -> bool {
        self.overloaded
    }

    /// While overloaded, the longest a request may have waited when its turn comes and still
    /// be served: 1.5 × `target`.
    pub fn max_wait(&self) -> Option<Duration> {
        self.overloaded.then(|| self.target.mul_f64(1.5))
    }

    /// Predicted wait for a request with `ahead` requests to be served before it (itself included).
    pub fn predict(&self, now: Instant, ahead: u32) -> Option<Duration> {
        let rate = self.rate(now)?;
        if rate <= 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(
            (f64::from(ahead) / rate).min(3600.0),
        ))
    }

    /// Whether a request that must queue should be refused now, and why.
    pub fn check(&self, now: Instant, ahead: u32, timeout: Duration) -> Option<(Reason, String)> {
        let predicted = self.predict(now, ahead);
        if let Some(p) = predicted {
            if p > timeout {
                return Some((
                    Reason::PredictedTimeout,
                    format!(
                        "predicted wait {} ms exceeds wait_timeout ({} ms): {ahead} requests ahead, servers freeing at {:.0}/s",
                        p.as_millis(),
                        timeout.as_millis(),
                        f64::from(ahead) / p.as_secs_f64().max(1e-9)
                    ),
                ));
            }
        }
        if self.overloaded && predicted.is_some_and(|p| p > self.target) {
            return Some((
                Reason::Overload,
                format!(
                    "requests have been queueing for over {} ms (shed_interval) and this one would wait more than {} ms (shed_target)",
                    self.interval.as_millis(),
                    self.target.as_millis()
                ),
            ));
        }
        None
    }

    /// A suggested retry delay: roughly the time the current queue needs to drain.
    pub fn retry_after(&self, waiting: u32, timeout: Duration) -> Duration {
        let now = Instant::now();
        let guess = self.predict(now, waiting.max(1)).unwrap_or(timeout / 4);
        guess.clamp(
            Duration::from_millis(50),
            timeout.max(Duration::from_millis(50)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn predicts_from_release_rate() {
        // Overload aside (a target past every prediction here).
        let mut s = Shedder::new(Duration::from_secs(1), Duration::from_millis(200));
        assert_eq!(s.predict(Instant::now(), 10), None);
        s.on_release(Instant::now(), true);
        assert_eq!(
            s.predict(Instant::now(), 10),
            None,
            "releases under light load say nothing"
        );
        s.queue_started(Instant::now());
        // 100 releases per second for one second.
        for _ in 0..100 {
            tokio::time::advance(Duration::from_millis(10)).await;
            s.on_release(Instant::now(), true);
        }
        let p = s.predict(Instant::now(), 50).unwrap();
        assert!(
            p > Duration::from_millis(400) && p < Duration::from_millis(600),
            "{p:?}"
        );
        assert!(s
            .check(Instant::now(), 50, Duration::from_secs(1))
            .is_none());
        let (reason, _) = s
            .check(Instant::now(), 500, Duration::from_secs(1))
            .unwrap();
        assert_eq!(reason, Reason::PredictedTimeout);
        // Releases stop: the estimate decays rather than staying optimistic.
        tokio::time::advance(Duration::from_secs(10)).await;
        let p = s.predict(Instant::now(), 5).unwrap();
        assert!(p >= Duration::from_secs(5), "{p:?} {:?}", s.rate);
        // An idle spell is not slowness: a new busy spell starts from the last known rate,
        // and so does a request that finds the queue empty after a quiet spell.
        s.queue_empty();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(s.predict(Instant::now(), 1).unwrap() < Duration::from_millis(100));
        s.queue_started(Instant::now());
        let p = s.predict(Instant::now(), 5).unwrap();
        assert!(p < Duration::from_millis(100), "{p:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn overload_is_a_queue_that_stands_for_an_interval_without_draining() {
        let mut s = Shedder::new(Duration::from_millis(50), Duration::from_millis(200));
        s.queue_started(Instant::now());
        // 100 releases per second while the queue grows by one every 10 ms.
        for waiting in 1..=30 {
            tokio::time::advance(Duration::from_millis(10)).await;
            s.on_release(Instant::now(), true);
            s.observe(Instant::now(), waiting);
        }
        let now = Instant::now();
        assert!(
            s.is_overloaded(),
            "queued for 300 ms, growing, interval 200 ms"
        );
        assert_eq!(s.max_wait(), Some(Duration::from_millis(75)));
        // Within target (4 ahead, 40 ms): admitted; past it: shed.
        assert!(s.check(now, 4, Duration::from_secs(5)).is_none());
        let (reason, detail) = s.check(now, 20, Duration::from_secs(5)).unwrap();
        assert_eq!(reason, Reason::Overload, "{detail}");
        // Only an empty queue ends it.
        s.observe(now, 1);
        assert!(s.is_overloaded());
        s.queue_empty();
        assert!(!s.is_overloaded());
        assert_eq!(s.max_wait(), None);
        // A burst being worked off is no overload, however long it takes to drain.
        s.queue_started(Instant::now());
        for waiting in (1..=40).rev() {
            s.observe(Instant::now(), waiting);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(!s.is_overloaded(), "draining for 400 ms");
        assert!(s
            .check(Instant::now(), 20, Duration::from_secs(5))
            .is_none());
        // One that stands, at any length, is.
        for _ in 0..21 {
            s.observe(Instant::now(), 5);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        s.observe(Instant::now(), 5);
        assert!(s.is_overloaded());
        // After an outage's backlog the spell starts over.
        s.restart_spell(Instant::now());
        assert!(!s.is_overloaded());
    }
}
