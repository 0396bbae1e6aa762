//! SIGINT/SIGTERM handling for the mount's main thread: the handlers only set flags (the only
//! async-signal-safe thing to do); the main thread polls them and unmounts cleanly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Signals {
    interrupt: Arc<AtomicBool>,
    terminate: Arc<AtomicBool>,
}

impl Signals {
    /// Installs the handlers. A second SIGINT/SIGTERM still only sets the flag: unmounting must
    /// finish, or the mountpoint would be left stale.
    pub fn new() -> Signals {
        let interrupt = Arc::new(AtomicBool::new(false));
        let terminate = Arc::new(AtomicBool::new(false));
        for (signal, flag) in [
            (signal_hook::consts::SIGINT, &interrupt),
            (signal_hook::consts::SIGTERM, &terminate),
        ] {
            if let Err(e) = signal_hook::flag::register(signal, flag.clone()) {
                tracing::warn!("cannot handle signal {signal}: {e}");
            }
        }
        Signals {
            interrupt,
            terminate,
        }
    }

    /// Waits up to `timeout` for a signal; returns which one arrived.
    pub fn wait(&self, timeout: Duration) -> Option<&'static str> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.interrupt.load(Ordering::Relaxed) {
                return Some("received SIGINT");
            }
            if self.terminate.load(Ordering::Relaxed) {
                return Some("received SIGTERM");
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Signals {
    /// Forgets the signals seen so far, so that [`wait`](Self::wait) reports the next one.
    pub fn reset(&self) {
        self.interrupt.store(false, Ordering::Relaxed);
        self.terminate.store(false, Ordering::Relaxed);
    }
}

impl Default for Signals {
    fn default() -> Signals {
        Signals::new()
    }
}
