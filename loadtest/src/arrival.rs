//! Open-loop arrival schedules: the *intended* start time of every invocation.
//!
//! The schedule is computed up front from the profile alone and never looks
//! at how fast the target answers; latency is measured from these instants so
//! that a slow target cannot hide its queueing (coordinated omission).
//! Offsets are produced lazily so a long, high-rate run needs no big vector.

use std::time::Duration;

use crate::config::Profile;

/// Iterator over intended start offsets (from the run's t0), in order.
#[derive(Debug, Clone)]
pub struct Arrivals {
    kind: Kind,
    next: u64,
    total: u64,
}

#[derive(Debug, Clone)]
enum Kind {
    Constant {
        rate: f64,
    },
    /// Rate r(t) = from + (to - from) t / d, so the cumulative count is
    /// N(t) = from t + a t^2 with a = (to - from) / (2 d).
    Ramp {
        from: f64,
        a: f64,
    },
    Burst {
        size: u64,
        window: Duration,
        interval: Duration,
    },
}

impl Arrivals {
    /// `None` for the closed-loop profile, which has no schedule.
    pub fn new(profile: &Profile) -> Option<Arrivals> {
        let (kind, total) = match *profile {
            Profile::Constant { rate, duration } => (
                Kind::Constant { rate },
                (rate * duration.as_secs_f64()).floor() as u64,
            ),
            Profile::Ramp { from, to, duration } => {
                let d = duration.as_secs_f64();
                (
                    Kind::Ramp {
                        from,
                        a: (to - from) / (2.0 * d),
                    },
                    // Area under the rate line; small epsilon so 0.5*(1+3)*2
                    // computed as 3.9999999 still yields 4.
                    ((from + to) / 2.0 * d + 1e-9).floor() as u64,
                )
            }
            Profile::Burst {
                size,
                window,
                bursts,
                interval,
            } => (
                Kind::Burst {
                    size,
                    window,
                    interval,
                },
                size * u64::from(bursts),
            ),
            Profile::Closed { .. } => return None,
        };
        Some(Arrivals {
            kind,
            next: 0,
            total,
        })
    }

    /// Number of invocations the schedule will start.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Intended offset of invocation `i` (0-based).
    pub fn offset(&self, i: u64) -> Duration {
        let secs = match self.kind {
            Kind::Constant { rate } => i as f64 / rate,
            Kind::Ramp { from, a } => {
                if i == 0 {
                    0.0
                } else {
                    // Solve from t + a t^2 = i. This form of the quadratic root
                    // stays exact when a -> 0 and is valid for a < 0 (ramp
                    // down) as long as the discriminant is positive, which it
                    // is for every i below `total`.
                    let i = i as f64;
                    let disc = (from * from + 4.0 * a * i).max(0.0);
                    2.0 * i / (from + disc.sqrt())
                }
            }
            Kind::Burst {
                size,
                window,
                interval,
            } => {
                let burst = i / size;
                let within = i % size;
                burst as f64 * interval.as_secs_f64()
                    + window.as_secs_f64() * within as f64 / size as f64
            }
        };
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// When the last invocation is scheduled to start.
    pub fn span(&self) -> Duration {
        if self.total == 0 {
            Duration::ZERO
        } else {
            self.offset(self.total - 1)
        }
    }
}

impl Iterator for Arrivals {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.next >= self.total {
            return None;
        }
        let o = self.offset(self.next);
        self.next += 1;
        Some(o)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.total - self.next) as usize;
        (n, Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn constant_is_evenly_spaced() {
        let a = Arrivals::new(&Profile::Constant {
            rate: 4.0,
            duration: Duration::from_secs(2),
        })
        .unwrap();
        let v: Vec<f64> = a.map(secs).collect();
        assert_eq!(v, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]);
    }

    #[test]
    fn ramp_up_counts_and_accelerates() {
        let d = Duration::from_secs(10);
        let a = Arrivals::new(&Profile::Ramp {
            from: 0.0,
            to: 100.0,
            duration: d,
        })
        .unwrap();
        assert_eq!(a.total(), 500);
        let v: Vec<f64> = a.clone().map(secs).collect();
        assert!(v.windows(2).all(|w| w[1] >= w[0]));
        assert!(v.iter().all(|&t| t <= 10.0 + 1e-9));
        // Gaps shrink as the rate rises.
        assert!(v[1] - v[0] > v[499] - v[498]);
        // Half way through the time only a quarter of arrivals happened.
        let by_5s = v.iter().filter(|&&t| t < 5.0).count();
        assert!((by_5s as i64 - 125).abs() <= 1, "{by_5s}");
    }

    #[test]
    fn ramp_down_and_flat_ramp() {
        let a = Arrivals::new(&Profile::Ramp {
            from: 100.0,
            to: 0.0,
            duration: Duration::from_secs(10),
        })
        .unwrap();
        assert_eq!(a.total(), 500);
        let v: Vec<f64> = a.map(secs).collect();
        assert!(v.windows(2).all(|w| w[1] > w[0]));
        assert!(v[499] <= 10.0 && v[499] > 8.0);
        let by_5s = v.iter().filter(|&&t| t < 5.0).count();
        assert!((by_5s as i64 - 375).abs() <= 1, "{by_5s}");

        let flat = Arrivals::new(&Profile::Ramp {
            from: 10.0,
            to: 10.0,
            duration: Duration::from_secs(1),
        })
        .unwrap();
        let v: Vec<f64> = flat.map(secs).collect();
        assert_eq!(v.len(), 10);
        for (i, t) in v.iter().enumerate() {
            assert!((t - i as f64 / 10.0).abs() < 1e-9);
        }
    }

    #[test]
    fn burst_releases_within_window_and_repeats() {
        let a = Arrivals::new(&Profile::Burst {
            size: 2000,
            window: Duration::from_secs(1),
            bursts: 2,
            interval: Duration::from_secs(5),
        })
        .unwrap();
        assert_eq!(a.total(), 4000);
        let v: Vec<f64> = a.map(secs).collect();
        assert!(v[..2000].iter().all(|&t| (0.0..1.0).contains(&t)));
        assert!(v[2000..].iter().all(|&t| (5.0..6.0).contains(&t)));
        assert_eq!(v[2000], 5.0);

        let instant = Arrivals::new(&Profile::Burst {
            size: 3,
            window: Duration::ZERO,
            bursts: 1,
            interval: Duration::ZERO,
        })
        .unwrap();
        assert_eq!(instant.span(), Duration::ZERO);
        assert_eq!(instant.count(), 3);
    }

    #[test]
    fn closed_loop_has_no_schedule() {
        assert!(Arrivals::new(&Profile::Closed {
            workers: 4,
            duration: Duration::from_secs(1),
            max_invocations: None,
        })
        .is_none());
    }
}
