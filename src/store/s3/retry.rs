//! Retry policy: bounded attempts with exponential backoff and full jitter, and which failures
//! deserve a retry at all.

use std::time::Duration;

use super::config::S3Tuning;

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
