//! The training engine: optimizers, learning-rate schedules, checkpoints
//! and the training loop.

mod optim;
mod run;
mod schedule;
pub mod state;

pub use optim::{Optimizer, OptimizerKind, ParamGroup};
pub use run::{RunData, RunOptions, RunSummary, l2, load_data, loss_terms, sorted_vars, train};
pub use schedule::Schedule;
