//! Faults a test injects into a running server, to prove it survives them:
//! a pause between a write's commit and its index update, or between a
//! reload's index load and its publication.
//!
//! Only with the `fault-injection` feature (the server's own tests turn it
//! on through their dev-dependency on this crate); without it every probe
//! below is a constant "no fault" the compiler removes, and the arming
//! functions do not exist. The faults are process-wide: tests that arm them
//! run one at a time.

use std::time::Duration;

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Debug, Default)]
    pub(super) struct Faults {
        pub(super) pause_after_commit: Option<Duration>,
        pub(super) pause_after_index_load: Option<Duration>,
    }

    pub(super) static FAULTS: Mutex<Faults> = Mutex::new(Faults {
        pause_after_commit: None,
        pause_after_index_load: None,
    });

    pub(super) fn with<T>(f: impl FnOnce(&mut Faults) -> T) -> T {
        f(&mut FAULTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Every write pauses this long between its commit and its index update
/// (`None`: no pause).
#[cfg(feature = "fault-injection")]
pub fn pause_after_commit(pause: Option<Duration>) {
    armed::with(|f| f.pause_after_commit = pause);
}

/// A reload pauses this long once its new index is loaded, before it
/// catches it up and publishes it (`None`: no pause).
#[cfg(feature = "fault-injection")]
pub fn pause_after_index_load(pause: Option<Duration>) {
    armed::with(|f| f.pause_after_index_load = pause);
}

/// Clears every fault.
#[cfg(feature = "fault-injection")]
pub fn clear() {
    armed::with(|f| *f = armed::Faults::default());
}

/// The pause between a write's commit and its index update.
pub(crate) fn after_commit() -> Option<Duration> {
    #[cfg(feature = "fault-injection")]
    {
        armed::with(|f| f.pause_after_commit)
    }
    #[cfg(not(feature = "fault-injection"))]
    None
}

/// The pause of a reload between its index load and its publication.
pub(crate) fn after_index_load() -> Option<Duration> {
    #[cfg(feature = "fault-injection")]
    {
        armed::with(|f| f.pause_after_index_load)
    }
    #[cfg(not(feature = "fault-injection"))]
    None
}
