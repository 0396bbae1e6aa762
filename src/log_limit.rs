//! Per-cause rate limits for log lines, so that a storm (thousands of failing reads of one bad
//! object, S3 5xx retries) writes a few lines and a count instead of thousands of lines.
//!
//! Each cause (a call site, or an entry of a static table) owns one [`LogLimit`]: at most
//! [`LINES_PER_WINDOW`] lines per [`WINDOW_SECS`]-second window; the first line of a later
//! window is preceded by one "suppressed K similar messages" line. It is three relaxed atomics
//! and no lock, and it is only consulted on failure paths, after the level was found enabled.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Lines one cause may write per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// Length of a window, in seconds.
pub const WINDOW_SECS: u64 = 10;

/// What a limiter says about one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `suppressed` lines of this cause were dropped since the last written one (say
    /// so first when it is not 0).
    Write { suppressed: u64 },
    /// Drop it (counted).
    Suppress,
}

/// The rate limit of one cause.
#[derive(Debug)]
pub struct LogLimit {
    /// What the suppression line names.
    pub cause: &'static str,
    /// Index of the current window (monotonic seconds / [`WINDOW_SECS`]), plus one (0: none yet).
    window: AtomicU64,
    written: AtomicU32,
    suppressed: AtomicU64,
}

impl LogLimit {
    pub const fn new(cause: &'static str) -> LogLimit {
        LogLimit {
            cause,
            window: AtomicU64::new(0),
            written: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// The verdict for a line now.
    pub fn check(&self) -> Verdict {
        self.check_at(monotonic_secs())
    }

    /// The verdict for a line at `now` (monotonic seconds). Racing callers may let a line or two
    /// more through at a window's start; none is lost from the suppressed count.
    pub fn check_at(&self, now: u64) -> Verdict {
        let window = now / WINDOW_SECS + 1;
        let seen = self.window.load(Relaxed);
        let mut suppressed = 0;
        if window > seen
            && self
                .window
                .compare_exchange(seen, window, Relaxed, Relaxed)
                .is_ok()
        {
            self.written.store(0, Relaxed);
            suppressed = self.suppressed.swap(0, Relaxed);
        }
        if self.written.fetch_add(1, Relaxed) < LINES_PER_WINDOW {
            Verdict::Write { suppressed }
        } else {
            // A winner of the window change that is itself over the limit (racers took the
            // slots) hands its count back.
            self.suppressed.fetch_add(suppressed + 1, Relaxed);
            Verdict::Suppress
        }
    }
}

/// CLOCK_MONOTONIC_COARSE in seconds: a few nanoseconds, and a window needs no more precision.
fn monotonic_secs() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64
}

/// `tracing::event!` through a rate limit: `limited!(Level::WARN, "cause", ...)` keeps one
/// [`LogLimit`] for the call site; `limited!(limit = TABLE[i], Level::WARN, ...)` uses the one
/// given (a cause chosen at run time from a static table).
#[macro_export]
macro_rules! limited {
    (limit = $limit:expr, $level:expr, $($arg:tt)+) => {{
        if tracing::enabled!($level) {
            let limit: &$crate::log_limit::LogLimit = &$limit;
            if let $crate::log_limit::Verdict::Write { suppressed } = limit.check() {
                if suppressed > 0 {
                    tracing::event!(
                        $level,
                        "suppressed {suppressed} similar messages ({}) in the last {}s",
                        limit.cause,
                        $crate::log_limit::WINDOW_SECS
                    );
                }
                tracing::event!($level, $($arg)+);
            }
        }
    }};
    ($level:expr, $cause:literal, $($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new($cause);
        $crate::limited!(limit = LIMIT, $level, $($arg)+)
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_writes_the_limit_then_one_count_per_window() {
        let limit = LogLimit::new("test");
        let verdicts: Vec<_> = (0..1000).map(|_| limit.check_at(100)).collect();
        let written = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Write { .. }))
            .count();
        assert_eq!(written, LINES_PER_WINDOW as usize);
        assert_eq!(verdicts[0], Verdict::Write { suppressed: 0 });
        // Still the same window: nothing more.
        assert_eq!(limit.check_at(109), Verdict::Suppress);
        // The next window writes again and reports what was dropped.
        assert_eq!(
            limit.check_at(100 + WINDOW_SECS),
            Verdict::Write { suppressed: 991 }
        );
        assert_eq!(
            limit.check_at(100 + WINDOW_SECS),
            Verdict::Write { suppressed: 0 }
        );
    }

    #[test]
    fn causes_are_limited_apart() {
        let (a, b) = (LogLimit::new("a"), LogLimit::new("b"));
        for _ in 0..100 {
            a.check_at(5);
        }
        assert_eq!(a.check_at(5), Verdict::Suppress);
        assert_eq!(b.check_at(5), Verdict::Write { suppressed: 0 });
    }

    #[test]
    fn racing_threads_write_about_the_limit() {
        let limit = std::sync::Arc::new(LogLimit::new("race"));
        let written: usize = (0..4)
            .map(|_| {
                let limit = limit.clone();
                std::thread::spawn(move || {
                    (0..10_000)
                        .filter(|_| matches!(limit.check_at(7), Verdict::Write { .. }))
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        // A racer's line at the window's start may slip through as the winner resets the count
        // (documented on `check_at`): at most one per other thread. None is lost from the count.
        let most = LINES_PER_WINDOW as usize + 3;
        assert!(
            (LINES_PER_WINDOW as usize..=most).contains(&written),
            "{written}"
        );
        assert_eq!(
            limit.check_at(7 + WINDOW_SECS),
            Verdict::Write {
                suppressed: 40_000 - written as u64
            }
        );
    }
}
