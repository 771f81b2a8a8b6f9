//! Rate-limited logging for every line a guest or a front-end can cause (feature
//! `std`). It lives in the lowest crate so that every layer above shares one limiter;
//! it does no I/O itself: the macro expands to `log` calls in the calling crate, which
//! must depend on `log`.
//!
//! A hostile peer must not be able to fill the host's disk through the log: a guest
//! that sends a malformed chain per microsecond would otherwise produce a log line per
//! microsecond. [`log_limited!`](crate::log_limited) admits [`BURST`] lines per
//! [`PERIOD`] at each call site (process-wide), drops the rest, and prefixes the next
//! admitted line with how many it dropped. Counters (the devices' metrics) keep the
//! exact numbers; the log only has to say that something happens and what.
//!
//! Written here rather than taken from a crate: the `log` ecosystem's rate limiters
//! either come with a logger of their own or with a `tracing` dependency; this is one
//! atomic word per call site and a few lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines admitted per call site and period.
pub const BURST: u64 = 10;
/// The period, in seconds.
pub const PERIOD: u64 = 5;

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// The state of one call site: the current period's number and the lines seen in it
/// (admitted or not), packed into one word so that admitting is one compare-exchange,
/// plus the lines dropped since the last admitted one.
#[derive(Debug)]
pub struct LogLimit {
    /// High 40 bits: period number; low 24 bits: lines seen in it (saturating).
    state: AtomicU64,
    dropped: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimit {
    /// A call site that has logged nothing.
    pub const fn new() -> Self {
        LogLimit {
            state: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines dropped
    /// since the last admitted one, or `None` (the line is dropped and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_secs())
    }

    fn admit_at(&self, secs: u64) -> Option<u64> {
        // Period 0 is "never logged", so periods count from 1.
        let period = secs / PERIOD + 1;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (p, n) = (cur >> 24, cur & 0xff_ffff);
            let next = if p == period {
                (p << 24) | (n + 1).min(0xff_ffff)
            } else {
                (period << 24) | 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    let seen = next & 0xff_ffff;
                    if seen <= BURST {
                        return Some(self.dropped.swap(0, Ordering::Relaxed));
                    }
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(actual) => cur = actual,
            }
        }
    }
}

/// `log::log!` with a per-call-site rate limit (see the [module docs](self)):
/// `log_limited!(log::Level::Warn, "bad chain {head}")`.
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        let level: ::log::Level = $level;
        if ::log::log_enabled!(level) {
            if let Some(dropped) = LIMIT.admit() {
                if dropped > 0 {
                    ::log::log!(level, "({dropped} similar lines dropped by the rate limit)");
                }
                ::log::log!(level, $($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_a_burst_per_period_and_counts_the_rest() {
        let l = LogLimit::new();
        for _ in 0..BURST {
            assert_eq!(l.admit_at(7), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.admit_at(8), None);
        }
        // Next period: admitted again, with the count of what was dropped.
        assert_eq!(l.admit_at(7 + PERIOD), Some(1000));
        assert_eq!(l.admit_at(7 + PERIOD), Some(0));
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let l = LogLimit::new();
        let admitted = (0..1_000_000u64)
            .filter(|i| l.admit_at(i / 100_000).is_some())
            .count() as u64;
        // 1e6 lines over 10 s: at most BURST per period.
        assert!(admitted <= BURST * (10 / PERIOD + 1), "{admitted}");
    }

    #[test]
    fn the_macro_logs_through_log() {
        for i in 0..100 {
            crate::log_limited!(log::Level::Debug, "line {i}");
        }
    }
}
