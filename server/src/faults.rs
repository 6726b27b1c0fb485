//! Faults a test injects into a running server, to prove it survives them:
//! a panic or a device error in the forward thread, a model that cannot run
//! at all, a non-finite embedding, a pause between an enrolment's embedding
//! and its commit, between a write's commit and its index update or a
//! reload's load and publication, a follower that dies.
//!
//! Only with the `fault-injection` feature (the server's own tests turn it
//! on through their dev-dependency on this crate); without it every probe
//! below is a constant "no fault" the compiler removes, and the arming
//! functions do not exist. The faults are process-wide: tests that arm them
//! run one at a time.

use std::time::Duration;

/// What the forward thread is told to do with its next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFault {
    /// Panic inside the forward pass.
    Panic,
    /// Fail the forward pass with an error, as libtorch reports a CUDA
    /// fault.
    DeviceError,
    /// Return NaN for every embedding of the batch.
    NonFinite,
}

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::ForwardFault;

    #[derive(Debug, Default)]
    pub(super) struct Faults {
        pub(super) forward: Vec<ForwardFault>,
        pub(super) model_broken: bool,
        pub(super) pause_before_commit: Option<Duration>,
        pub(super) pause_after_commit: Option<Duration>,
        pub(super) pause_after_index_load: Option<Duration>,
        pub(super) follower_panics: usize,
    }

    pub(super) static FAULTS: Mutex<Faults> = Mutex::new(Faults {
        forward: Vec::new(),
        model_broken: false,
        pause_before_commit: None,
        pause_after_commit: None,
        pause_after_index_load: None,
        follower_panics: 0,
    });

    pub(super) fn with<T>(f: impl FnOnce(&mut Faults) -> T) -> T {
        f(&mut FAULTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// Arms `fault` for the next batch (queued after those already armed).
#[cfg(feature = "fault-injection")]
pub fn arm_forward(fault: ForwardFault) {
    armed::with(|f| f.forward.push(fault));
}

/// While `broken`, every forward pass and every self-test fails, as on a
/// GPU whose context a fault has destroyed.
#[cfg(feature = "fault-injection")]
pub fn break_model(broken: bool) {
    armed::with(|f| f.model_broken = broken);
}

/// Every enrolment pauses this long between embedding its images and its
/// commit (`None`: no pause).
#[cfg(feature = "fault-injection")]
pub fn pause_before_commit(pause: Option<Duration>) {
    armed::with(|f| f.pause_before_commit = pause);
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

/// The follower panics at its next step, `times` times over.
#[cfg(feature = "fault-injection")]
pub fn kill_follower(times: usize) {
    armed::with(|f| f.follower_panics = times);
}

/// Clears every fault.
#[cfg(feature = "fault-injection")]
pub fn clear() {
    armed::with(|f| *f = armed::Faults::default());
}

/// The fault for the batch about to run, if one is armed.
pub(crate) fn forward() -> Option<ForwardFault> {
    #[cfg(feature = "fault-injection")]
    {
        armed::with(|f| {
            if f.model_broken {
                Some(ForwardFault::DeviceError)
            } else if f.forward.is_empty() {
                None
            } else {
                Some(f.forward.remove(0))
            }
        })
    }
    #[cfg(not(feature = "fault-injection"))]
    None
}

/// Whether the model is broken for good (the self-test consults it).
pub(crate) fn model_broken() -> bool {
    #[cfg(feature = "fault-injection")]
    {
        armed::with(|f| f.model_broken)
    }
    #[cfg(not(feature = "fault-injection"))]
    false
}

/// The pause between an enrolment's embedding and its commit.
pub(crate) fn before_commit() -> Option<Duration> {
    #[cfg(feature = "fault-injection")]
    {
        armed::with(|f| f.pause_before_commit)
    }
    #[cfg(not(feature = "fault-injection"))]
    None
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

/// Whether the follower must die now.
pub(crate) fn follower_dies() -> bool {
    #[cfg(feature = "fault-injection")]
    {
        armed::with(|f| {
            let die = f.follower_panics > 0;
            f.follower_panics = f.follower_panics.saturating_sub(1);
            die
        })
    }
    #[cfg(not(feature = "fault-injection"))]
    false
}
