//! `optim:` of a training stage: update rule, learning rates per parameter
//! group, schedule and numerics.

use serde::{Deserialize, Serialize};

use crate::engine::{OptimizerKind, Schedule};

/// Optimiser, learning rates per parameter group, schedule and numerics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// The update rule (default Adam, CLIP-ReID's `OPTIMIZER_NAME`).
    pub optimizer: OptimizerKind,
    /// Base learning rate of the image encoder (and of everything not
    /// named by another group).
    pub lr: f64,
    /// Weight decay of the image encoder.
    pub weight_decay: f64,
    /// Learning rate of the new modules (heads, classifiers, PromptSG's
    /// modules); default: `lr`.
    pub head_lr: Option<f64>,
    /// Weight decay of the new modules; default: `weight_decay`.
    pub head_weight_decay: Option<f64>,
    /// Multiplier of the learning rate of every parameter whose name holds
    /// `bias` (CLIP-ReID's `BIAS_LR_FACTOR`: 2, `make_optimizer_prompt.py`).
    pub bias_lr_factor: f64,
    /// Weight decay of those parameters (CLIP-ReID's `WEIGHT_DECAY_BIAS`);
    /// default: their group's.
    pub bias_weight_decay: Option<f64>,
    /// Learning rate of prompt parameters; default: `lr`.
    pub prompt_lr: Option<f64>,
    /// Weight decay of prompt parameters; default: `weight_decay`.
    pub prompt_weight_decay: Option<f64>,
    /// Learning-rate multiplier by epoch (CLIP-ReID steps its schedulers
    /// once per epoch; `warmup_steps`, `total_steps` and `milestones` count
    /// epochs here).
    pub schedule: Schedule,
    /// What the schedule counts: epochs (CLIP-ReID steps its schedulers once
    /// per epoch) or optimizer steps (`step`: PyTorch's `OneCycleLR` stepped
    /// after every batch, the dissertation's); `warmup_steps`, `total_steps`
    /// and `milestones` are in that unit.
    pub schedule_unit: ScheduleUnit,
    /// Clip the total gradient norm to this value before each step.
    pub clip_grad_norm: Option<f64>,
    /// Batches whose gradients are summed before one optimizer step.
    pub accumulate: u64,
    /// `f32`, or `amp` (autocast with a dynamic loss scale, GPU only).
    pub precision: TrainPrecision,
}

impl Default for OptimConfig {
    /// CLIP-ReID's ViT-B/16 stage 2 (`configs/person/vit_clipreid.yml`):
    /// Adam, lr 5e-6, weight decay 1e-4 (biases: lr x2, decay 1e-4),
    /// linear warm-up over 10 epochs from x0.1, x0.1 at epochs 30 and 50.
    fn default() -> Self {
        Self {
            optimizer: OptimizerKind::default(),
            lr: 5e-6,
            weight_decay: 1e-4,
            head_lr: None,
            head_weight_decay: None,
            bias_lr_factor: 2.0,
            bias_weight_decay: None,
            prompt_lr: None,
            prompt_weight_decay: None,
            schedule: Schedule::Step {
                warmup_steps: 10,
                warmup_factor: 0.1,
                milestones: vec![30, 50],
                gamma: 0.1,
            },
            schedule_unit: ScheduleUnit::Epoch,
            clip_grad_norm: None,
            accumulate: 1,
            precision: TrainPrecision::F32,
        }
    }
}

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainPrecision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: autocast forward, loss scaling (GPU only).
    Amp,
}

/// What a learning-rate schedule counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleUnit {
    /// The 0-based epoch.
    #[default]
    Epoch,
    /// Optimizer steps taken before this one in the phase.
    Step,
}

impl OptimConfig {
    /// The multiplier of the base rates in the 0-based `epoch`, before the
    /// optimizer's `step`-th update (0-based) of the phase.
    pub fn lr_factor(&self, epoch: u64, step: u64) -> f64 {
        match self.schedule_unit {
            ScheduleUnit::Epoch => self.schedule.factor(epoch),
            ScheduleUnit::Step => self.schedule.factor(step),
        }
    }
}
