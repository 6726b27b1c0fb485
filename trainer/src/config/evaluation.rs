//! `validation:` and `export:`: model selection on training persons and the
//! thresholds a serving checkpoint is calibrated at.

use serde::{Deserialize, Serialize};

/// Validation on training persons during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every N epochs (and after the last).
    pub every_epochs: u64,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Which metric picks the best epoch (and counts as an improvement for
    /// early stopping). A validation that ties the best makes the later
    /// epoch the best (a saturated metric keeps the last epoch, not the
    /// first), but only a strictly better one resets early stopping.
    pub select_by: SelectBy,
    /// End the image-training phase after this many validations in a row
    /// without a better best; absent: train every epoch.
    pub early_stop_patience: Option<u64>,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            every_epochs: 1,
            batch_size: 64,
            select_by: SelectBy::Map,
            early_stop_patience: None,
        }
    }
}

/// The validation metric that selects the best epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectBy {
    /// Mean average precision.
    #[default]
    Map,
    /// Rank-1 (ties broken by mAP).
    Rank1,
    /// Backward-compatible training only (`method.compatibility`): the mAP
    /// of the validation queries, embedded by the model being trained,
    /// against the old model's embeddings of the validation gallery,
    /// M(new, old), the search a compatible model is swapped in for (ties
    /// broken by the new model's own mAP).
    CrossModelMap,
}

/// What `export` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// False match rates at which thresholds are calibrated on validation persons.
    pub fmrs: Vec<f64>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            fmrs: vec![1e-2, 1e-3, 1e-4],
        }
    }
}
