//! `data:`: where the images are and how batches are drawn.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the images are and how batches are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// A split manifest written by `handid-trainer splits` (required; `train
    /// --manifest` sets it).
    pub manifest: PathBuf,
    /// Dataset root (default: the manifest's `root`).
    pub root: Option<PathBuf>,
    /// The split trained on (training persons only).
    pub train_split: String,
    /// More splits trained on besides `train_split` (e.g. `train_extra` from
    /// `splits --train-extra`); they may add persons. None may hold a person
    /// of the manifest's `test` split.
    pub extra_train_splits: Vec<String>,
    /// Validation queries: held-out images of training persons.
    pub val_query_split: String,
    /// Validation gallery (training persons).
    pub val_gallery_split: String,
    /// How training batches are drawn (default P x K).
    pub sampler: BatchSampler,
    /// Persons per batch (P; CLIP-ReID: 16, so P x K = 64).
    pub persons_per_batch: usize,
    /// Images per person (K; CLIP-ReID's `NUM_INSTANCE`: 4).
    pub images_per_person: usize,
    /// Decoding threads.
    pub workers: usize,
    /// Keep decoded images in memory across epochs.
    pub cache_decoded: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            manifest: PathBuf::new(),
            root: None,
            train_split: "train".to_owned(),
            extra_train_splits: Vec::new(),
            val_query_split: "val".to_owned(),
            val_gallery_split: "train".to_owned(),
            sampler: BatchSampler::Pk,
            persons_per_batch: 16,
            images_per_person: 4,
            workers: 2,
            cache_decoded: true,
        }
    }
}

/// How training batches are drawn (YAML: `{kind: pk}`, `{kind: random, batch_size: 32}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BatchSampler {
    /// `persons_per_batch` x `images_per_person` (re-id's P x K sampler, which
    /// the triplet loss needs: every anchor has a positive).
    #[default]
    Pk,
    /// Plain shuffled batches, the last one partial (a dissertation recipe).
    Random {
        /// Images per batch.
        batch_size: usize,
    },
}
