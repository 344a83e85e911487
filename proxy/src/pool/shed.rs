//! Load shedding: predicting waits from the release rate, and detecting sustained overload.
//!
//! Two signals decide whether a new request may queue (see "Fail at Scale", ACM Queue 2015):
//! - the **predicted wait**: the requests ahead of it divided by the recent rate at which server
//!   connections are released; a request that would wait past its timeout is refused at once
//!   (`predicted_timeout`) instead of timing out later, having held a queue slot for nothing;
//! - **overload**, in the spirit of CoDel: when the queueing delay of every request served has
//!   stayed above `target` for a whole `interval`, the queue is a standing one. While that lasts
//!   new arrivals may only queue if their predicted wait is within `target`, so those admitted keep
//!   a bounded wait (`overload`). An empty queue ends the state.

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
    /// Smoothed releases per second; `None` until a first window closes.
    rate: Option<f64>,
    /// The last window's rate: predictions use the higher of the two, so a rate that is
    /// rising is believed at once and shedding errs towards admitting.
    last_rate: f64,
    /// When a run of served requests that waited above target began.
    above_since: Option<Instant>,
    /// While overloaded: when served requests started waiting less than target again.
    below_since: Option<Instant>,
    overloaded: bool,
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
            rate: None,
            last_rate: 0.0,
            above_since: None,
            below_since: None,
            overloaded: false,
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

    /// A waiter was served after `waited`.
    pub fn on_dequeue(&mut self, now: Instant, waited: Duration) {
        if waited < self.target {
            self.above_since = None;
            // Hysteresis: overload ends only once waits have stayed below target for a whole
            // interval, else admitting everything again rebuilds the standing queue at once.
            if self.overloaded {
                let since = *self.below_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= self.interval {
                    self.overloaded = false;
                    self.below_since = None;
                }
            }
            return;
        }
        self.below_since = None;
        let since = *self.above_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.interval {
            self.overloaded = true;
        }
    }

    /// Forgets the release rate measured so far (it measured an outage, not the capacity) and
    /// starts measuring anew.
    pub fn restart_rate(&mut self, now: Instant) {
        self.rate = None;
        self.last_rate = 0.0;
        self.last_release = None;
        self.window_start = Some(now);
        self.window_count = 0;
    }

    /// The first request of a busy spell started queueing.
    pub fn queue_started(&mut self, now: Instant) {
        if self.saturated_since.is_none() {
            self.saturated_since = Some(now);
            // A window spanning an unsaturated spell would understate the rate.
            self.window_start = Some(now);
            self.window_count = 0;
        }
    }

    pub fn queue_empty(&mut self) {
        self.above_since = None;
        self.below_since = None;
        self.overloaded = false;
        self.saturated_since = None;
    }

    pub fn is_overloaded(&self) -> bool {
        self.overloaded
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
        if self.overloaded && predicted.is_none_or(|p| p > self.target) {
            return Some((
                Reason::Overload,
                format!(
                    "queueing delay has stayed above {} ms for {} ms",
                    self.target.as_millis(),
                    self.interval.as_millis()
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
        let mut s = Shedder::new(Duration::from_millis(50), Duration::from_millis(200));
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
    async fn overload_needs_a_sustained_standing_queue() {
        let mut s = Shedder::new(Duration::from_millis(50), Duration::from_millis(200));
        let slow = Duration::from_millis(80);
        s.on_dequeue(Instant::now(), slow);
        assert!(!s.is_overloaded());
        tokio::time::advance(Duration::from_millis(100)).await;
        s.on_dequeue(Instant::now(), Duration::from_millis(10));
        tokio::time::advance(Duration::from_millis(150)).await;
        s.on_dequeue(Instant::now(), slow);
        assert!(
            !s.is_overloaded(),
            "a fast dequeue in between resets the run"
        );
        tokio::time::advance(Duration::from_millis(250)).await;
        s.on_dequeue(Instant::now(), slow);
        assert!(s.is_overloaded());
        assert_eq!(
            s.check(Instant::now(), 1, Duration::from_secs(5))
                .unwrap()
                .0,
            Reason::Overload
        );
        // One fast request does not end overload; waits below target for an interval do.
        s.on_dequeue(Instant::now(), Duration::from_millis(10));
        assert!(s.is_overloaded());
        tokio::time::advance(Duration::from_millis(250)).await;
        s.on_dequeue(Instant::now(), Duration::from_millis(10));
        assert!(!s.is_overloaded());
        s.on_dequeue(Instant::now(), slow);
        tokio::time::advance(Duration::from_millis(250)).await;
        s.on_dequeue(Instant::now(), slow);
        assert!(s.is_overloaded());
        s.queue_empty();
        assert!(!s.is_overloaded());
    }
}
