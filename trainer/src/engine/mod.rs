//! The training engine's building blocks.

mod schedule;

pub use schedule::Schedule;
