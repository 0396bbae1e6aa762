//! Where log lines go and which are written: `RUST_LOG` when set, else `--log-level`, else info;
//! to `--log-file` or stderr. Rate limits of noisy causes are `crate::log_limit`.

use std::path::Path;

use clap::ValueEnum;

/// `--log-level`: the level when `RUST_LOG` is unset or empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The filter: a non-empty `rust_log` wins (a whole filter, per module if need be), then
/// `level`, then info. `level` above info applies to mount_vfs's own lines only: other crates
/// stay at info (fuser alone logs every FUSE request at debug); `RUST_LOG` reaches them.
/// Whatever either says, aws-sigv4 stays at debug: its trace lines carry each request's
/// signing parameters, the access key id included.
pub fn filter(rust_log: Option<&str>, level: Option<LogLevel>) -> tracing_subscriber::EnvFilter {
    let fallback = match level.unwrap_or(LogLevel::Info) {
        verbose @ (LogLevel::Debug | LogLevel::Trace) => {
            let l = verbose.directive();
            format!("info,mount_vfs={l},mount_vfs_executors={l},deadline_vfs={l}")
        }
        quiet => quiet.directive().to_owned(),
    };
    let filter = match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(spec) => tracing_subscriber::EnvFilter::try_new(spec)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&fallback)),
        None => tracing_subscriber::EnvFilter::new(&fallback),
    };
    filter.add_directive("aws_sigv4=debug".parse().expect("a valid directive"))
}

/// Installs the global subscriber: to `log_file` (appended, no colours) or stderr (colours on
/// a terminal). The error names the file that cannot be opened.
pub fn init(log_file: Option<&Path>, level: Option<LogLevel>) -> Result<(), String> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(rust_log.as_deref(), level);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open --log-file {}: {e}", path.display()))?;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init();
        }
        None => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_wins_over_the_flag_and_empty_means_unset() {
        let shown = |rust_log, level| filter(rust_log, level).to_string();
        assert!(shown(None, None).contains("info"));
        assert!(!shown(None, None).contains("mount_vfs="));
        assert!(shown(None, Some(LogLevel::Warn)).contains("warn"));
        let trace = shown(Some(""), Some(LogLevel::Trace));
        assert!(
            trace.contains("mount_vfs=trace") && trace.contains("info"),
            "{trace}"
        );
        let rust_log = shown(Some("error"), Some(LogLevel::Trace));
        assert!(
            rust_log.contains("error") && !rust_log.contains("trace"),
            "{rust_log}"
        );
        for level in [None, Some(LogLevel::Trace)] {
            for rust_log in [None, Some("trace")] {
                assert!(shown(rust_log, level).contains("aws_sigv4=debug"));
            }
        }
    }
}
