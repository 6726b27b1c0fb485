//! Losses for identity fine-tuning, one per file (torchreid's layout).
//!
//! All take and return `tch::Tensor`s and are differentiable; labels are
//! int64 person indices `[batch]`.

mod center;
mod contrastive;
mod cross_entropy;
mod triplet;

pub use center::CenterLoss;
pub use contrastive::{image_text_contrastive, sup_con, sup_con_cross};
pub use cross_entropy::cross_entropy_label_smooth;
pub use triplet::{TripletMargin, batch_hard_triplet, euclidean_distances};
