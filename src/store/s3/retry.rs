//! Retry policy: bounded attempts with exponential backoff and full jitter, and which failures
//! deserve a retry at all.

use std::time::Duration;

use super::config::S3Tuning;
use crate::store::RetryCause;

/// How long to wait before attempt `attempt + 1` after `attempt` failures (`attempt >= 1`):
/// uniform in `[0, min(cap, base * 2^(attempt - 1))]` ("full jitter", so shards that failed
/// together do not retry together).
pub fn backoff(tuning: &S3Tuning, attempt: u32) -> Duration {
    let exp = tuning
        .backoff_base
        .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20));
    let ceiling = exp.min(tuning.backoff_cap);
    ceiling.mul_f64(fastrand::f64())
}

/// Why a transient status (see [`retryable_status`]) with S3 error `code` failed.
pub fn status_cause(status: u16, code: &str) -> RetryCause {
    match (status, code) {
        (_, "SlowDown" | "Throttling") | (429 | 503, _) => RetryCause::Throttled,
        (_, "RequestTimeout") => RetryCause::Timeout,
        _ => RetryCause::ServerError,
    }
}

/// Whether an HTTP status with S3 error `code` is transient: throttling, server errors and
/// S3's own timeouts. 403 and 404 are answers, not failures, and are never retried.
pub fn retryable_status(status: u16, code: &str) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504)
        || matches!(
            code,
            "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable" | "Throttling"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let tuning = S3Tuning::default();
        for attempt in 1..40 {
            assert!(backoff(&tuning, attempt) <= tuning.backoff_cap);
        }
        let first_max = tuning.backoff_base;
        assert!((0..100).all(|_| backoff(&tuning, 1) <= first_max));
        // It grows: the largest of many draws follows base * 2^(n-1) until the cap.
        let largest = |attempt| (0..2000).map(|_| backoff(&tuning, attempt)).max().unwrap();
        let ceiling =
            |attempt: u32| (tuning.backoff_base * (1 << (attempt - 1))).min(tuning.backoff_cap);
        for attempt in 1..=8 {
            let seen = largest(attempt);
            assert!(seen <= ceiling(attempt), "attempt {attempt}: {seen:?}");
            assert!(
                seen >= ceiling(attempt) * 9 / 10,
                "attempt {attempt}: only {seen:?}"
            );
        }
        assert!(largest(3) > largest(1) * 3);
    }

    #[test]
    fn retried_statuses_have_their_cause() {
        assert_eq!(status_cause(503, "SlowDown"), RetryCause::Throttled);
        assert_eq!(status_cause(429, ""), RetryCause::Throttled);
        assert_eq!(status_cause(400, "Throttling"), RetryCause::Throttled);
        assert_eq!(status_cause(400, "RequestTimeout"), RetryCause::Timeout);
        assert_eq!(status_cause(500, "InternalError"), RetryCause::ServerError);
        assert_eq!(status_cause(504, ""), RetryCause::ServerError);
    }

    #[test]
    fn only_transient_failures_retry() {
        assert!(retryable_status(503, "SlowDown"));
        assert!(retryable_status(500, ""));
        assert!(retryable_status(400, "RequestTimeout"));
        assert!(!retryable_status(403, "AccessDenied"));
        assert!(!retryable_status(404, "NoSuchKey"));
    }
}
