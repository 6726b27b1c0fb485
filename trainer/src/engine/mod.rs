//! The training engine: optimizers, learning-rate schedules, checkpoints,
//! the steps of each phase and the training loop.

mod optim;
mod run;
mod schedule;
pub mod state;
pub mod steps;

pub use optim::{Optimizer, OptimizerKind, ParamGroup};
pub use run::{RunData, RunOptions, RunSummary, load_data, sorted_vars, train};
pub use schedule::Schedule;
pub use steps::{ImageTrainer, LossTerm, PromptTrainer, TermValue, loss_terms};
