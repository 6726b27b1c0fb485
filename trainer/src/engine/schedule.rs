//! Learning-rate schedules, as multipliers of each parameter group's base
//! learning rate, indexed by optimizer step (so they resume exactly).

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// A learning-rate schedule (YAML: `kind: cosine`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up from `warmup_factor` x base, then cosine decay to
    /// `min_factor` x base at `total_steps` (CLIP-ReID's `WarmupCosineLR`).
    Cosine {
        /// Steps of linear warm-up.
        warmup_steps: u64,
        /// Multiplier at step 0.
        warmup_factor: f64,
        /// Length of the whole schedule.
        total_steps: u64,
        /// Final multiplier.
        min_factor: f64,
    },
    /// Linear warm-up, then the rate is multiplied by `gamma` at each
    /// milestone (CLIP-ReID's `WarmupMultiStepLR`).
    Step {
        /// Steps of linear warm-up.
        warmup_steps: u64,
        /// Multiplier at step 0.
        warmup_factor: f64,
        /// Steps at which the rate drops.
        milestones: Vec<u64>,
        /// Drop factor.
        gamma: f64,
    },
    /// One-cycle policy (Smith & Topin 2018; PyTorch's `OneCycleLR`, cosine
    /// annealing): from base/`div_factor` up to base over `pct_start` of the
    /// steps, then down to base/(`div_factor` x `final_div_factor`).
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
    /// The multiplier of the base learning rate at optimizer step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Cosine {
                warmup_steps,
                warmup_factor,
                total_steps,
                min_factor,
            } => {
                if step < warmup_steps {
                    return warmup(step, warmup_steps, warmup_factor);
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1);
                let t = ((step - warmup_steps) as f64 / span as f64).min(1.0);
                min_factor + (1.0 - min_factor) * (1.0 + (PI * t).cos()) / 2.0
            }
            Schedule::Step {
                warmup_steps,
                warmup_factor,
                ref milestones,
                gamma,
            } => {
                let drops = milestones.iter().filter(|&&m| step >= m).count() as i32;
                let base = gamma.powi(drops);
                if step < warmup_steps {
                    base * warmup(step, warmup_steps, warmup_factor)
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
                let s = step as f64;
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
    fn cosine_warms_up_then_decays_to_the_floor() {
        let s = Schedule::Cosine {
            warmup_steps: 10,
            warmup_factor: 0.1,
            total_steps: 110,
            min_factor: 0.01,
        };
        assert!(close(s.factor(0), 0.1));
        assert!(close(s.factor(5), 0.55));
        assert!(close(s.factor(10), 1.0));
        assert!(close(s.factor(60), 0.01 + 0.99 * 0.5));
        assert!(close(s.factor(110), 0.01));
        assert!(close(s.factor(500), 0.01));
    }

    #[test]
    fn step_drops_at_milestones() {
        let s = Schedule::Step {
            warmup_steps: 4,
            warmup_factor: 0.5,
            milestones: vec![10, 20],
            gamma: 0.1,
        };
        assert!(close(s.factor(0), 0.5));
        assert!(close(s.factor(2), 0.75));
        assert!(close(s.factor(9), 1.0));
        assert!(close(s.factor(10), 0.1));
        assert!(close(s.factor(25), 0.01));
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
