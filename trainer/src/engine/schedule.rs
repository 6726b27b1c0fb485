//! Learning-rate schedules, as multipliers of each parameter group's base
//! learning rate, evaluated once per epoch (a pure function of the epoch, so
//! a resumed run sees the same rates).
//!
//! `cosine` and `step` are CLIP-ReID's two schedulers exactly (Syliz517/CLIP-ReID
//! at eb1898b): both are stepped *before* each epoch trains
//! (`scheduler.step(epoch)` with `epoch` from 1 in
//! `processor_clipreid_stage1.py`, `scheduler.step()` in
//! `processor_clipreid_stage2.py`), so the first epoch already sees `t = 1`:
//! [`Schedule::factor`] of the 0-based epoch `e` evaluates them at `t = e + 1`.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// A learning-rate schedule (YAML: `kind: cosine`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// timm's `CosineLRScheduler` as CLIP-ReID's `create_scheduler` builds
    /// it for stage 1 (`solver/scheduler_factory.py`, `cosine_lr.py`): at
    /// `t < warmup_steps` the rate rises linearly from `warmup_factor`
    /// (`warmup_lr_init / base`) by `(1 - warmup_factor) / warmup_steps` per
    /// epoch; from then on it is `min + (1 - min) (1 + cos(π t / total)) / 2`
    /// (the cosine counts from 0, not from the end of the warm-up), and
    /// `min_factor` (`lr_min / base`) once `t >= total_steps`.
    Cosine {
        /// Epochs of linear warm-up.
        warmup_steps: u64,
        /// Multiplier at t = 0.
        warmup_factor: f64,
        /// Length of the cosine (`t_initial`, the epochs of the stage).
        total_steps: u64,
        /// Final multiplier.
        min_factor: f64,
    },
    /// CLIP-ReID's `WarmupMultiStepLR` (`solver/lr_scheduler.py`): at `t <
    /// warmup_steps` a linear factor `warmup_factor (1 - t / warmup_steps) +
    /// t / warmup_steps`, times `gamma` to the number of milestones `<= t`.
    Step {
        /// Epochs of linear warm-up.
        warmup_steps: u64,
        /// Multiplier at t = 0.
        warmup_factor: f64,
        /// Epochs at which the rate drops.
        milestones: Vec<u64>,
        /// Drop factor.
        gamma: f64,
    },
    /// One-cycle policy (Smith & Topin 2018; PyTorch's `OneCycleLR`, cosine
    /// annealing), here evaluated at the 0-based epoch: from
    /// base/`div_factor` up to base over `pct_start` of the epochs, then
    /// down to base/(`div_factor` x `final_div_factor`).
    OneCycle {
        /// Length of the whole schedule.
        total_steps: u64,
        /// Share of the steps spent rising.
        pct_start: f64,
        /// Initial rate = base / div_factor.
        div_factor: f64,
        /// Final rate = initial / final_div_factor.
        final_div_factor: f64,
    },
}

impl Schedule {
    /// The multiplier of the base learning rate in the 0-based `epoch`.
    pub fn factor(&self, epoch: u64) -> f64 {
        // CLIP-ReID's schedulers have been stepped once when an epoch starts.
        let t = epoch + 1;
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Cosine {
                warmup_steps,
                warmup_factor,
                total_steps,
                min_factor,
            } => {
                if t < warmup_steps {
                    warmup_factor + t as f64 * (1.0 - warmup_factor) / warmup_steps as f64
                } else if t >= total_steps {
                    min_factor
                } else {
                    let progress = t as f64 / total_steps as f64;
                    min_factor + 0.5 * (1.0 - min_factor) * (1.0 + (PI * progress).cos())
                }
            }
            Schedule::Step {
                warmup_steps,
                warmup_factor,
                ref milestones,
                gamma,
            } => {
                let drops = milestones.iter().filter(|&&m| m <= t).count() as i32;
                let base = gamma.powi(drops);
                if t < warmup_steps {
                    base * warmup(t, warmup_steps, warmup_factor)
                } else {
                    base
                }
            }
            Schedule::OneCycle {
                total_steps,
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = 1.0 / div_factor;
                let last = initial / final_div_factor;
                let up = ((pct_start * total_steps as f64) - 1.0).max(1.0);
                let down = (total_steps as f64 - 1.0 - up).max(1.0);
                let s = epoch as f64;
                if s <= up {
                    cosine_between(initial, 1.0, s / up)
                } else {
                    cosine_between(1.0, last, ((s - up) / down).min(1.0))
                }
            }
        }
    }
}

/// Linear ramp from `start` to 1 over `steps` steps.
fn warmup(step: u64, steps: u64, start: f64) -> f64 {
    let alpha = step as f64 / steps as f64;
    start * (1.0 - alpha) + alpha
}

/// Cosine interpolation from `from` (t = 0) to `to` (t = 1).
fn cosine_between(from: f64, to: f64, t: f64) -> f64 {
    to + (from - to) * (1.0 + (PI * t).cos()) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn cosine_is_timms_scheduler_stepped_before_each_epoch() {
        // CLIP-ReID stage 1: base 3.5e-4, warmup_lr_init 1e-5 over 5 epochs,
        // lr_min 1e-6, t_initial 120; timm's _get_lr(t) for t = epoch + 1.
        let (base, init, min) = (3.5e-4, 1e-5, 1e-6);
        let s = Schedule::Cosine {
            warmup_steps: 5,
            warmup_factor: init / base,
            total_steps: 120,
            min_factor: min / base,
        };
        let lr = |epoch| base * s.factor(epoch);
        let timm = |t: f64| {
            if t < 5.0 {
                init + t * (base - init) / 5.0
            } else {
                min + 0.5 * (base - min) * (1.0 + (PI * t / 120.0).cos())
            }
        };
        for epoch in [0u64, 1, 3, 4, 5, 30, 60, 118] {
            assert!(
                (lr(epoch) - timm((epoch + 1) as f64)).abs() < 1e-15,
                "epoch {epoch}"
            );
        }
        // The first epoch is already past t = 0; the last one ends at lr_min.
        assert!((lr(0) - 7.8e-5).abs() < 1e-15);
        assert!((lr(119) - min).abs() < 1e-15);
    }

    #[test]
    fn step_is_warmup_multi_step_lr_stepped_before_each_epoch() {
        // WarmupMultiStepLR(milestones [30, 50], gamma 0.1, factor 0.1, 10 iters):
        // get_lr at last_epoch = epoch + 1.
        let s = Schedule::Step {
            warmup_steps: 10,
            warmup_factor: 0.1,
            milestones: vec![30, 50],
            gamma: 0.1,
        };
        assert!(close(s.factor(0), 0.1 * 0.9 + 0.1));
        assert!(close(s.factor(4), 0.1 * 0.5 + 0.5));
        assert!(close(s.factor(9), 1.0));
        assert!(close(s.factor(28), 1.0));
        assert!(close(s.factor(29), 0.1));
        assert!(close(s.factor(49), 0.01));
    }

    #[test]
    fn one_cycle_matches_pytorch_endpoints() {
        // PyTorch OneCycleLR(max_lr=1, total_steps=100, pct_start=0.3,
        // div_factor=25, final_div_factor=1e4): lr 0.04 at step 0, 1.0 at step
        // 29, 4e-6 at step 99.
        let s = Schedule::OneCycle {
            total_steps: 100,
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
        };
        assert!(close(s.factor(0), 0.04));
        assert!(close(s.factor(29), 1.0));
        assert!(close(s.factor(99), 0.04 / 1e4));
        assert!(s.factor(15) > 0.04 && s.factor(15) < 1.0);
    }

    #[test]
    fn reads_yaml_and_names_unknown_keys() {
        let s: Schedule = serde_yaml::from_str(
            "kind: cosine\nwarmup_steps: 5\nwarmup_factor: 0.1\ntotal_steps: 50\nmin_factor: 0.0\n",
        )
        .expect("yaml");
        assert!(matches!(s, Schedule::Cosine { warmup_steps: 5, .. }));
        let err = serde_yaml::from_str::<Schedule>("kind: step\nwarmup: 3\n").expect_err("unknown key");
        assert!(err.to_string().contains("warmup"), "{err}");
    }
}
