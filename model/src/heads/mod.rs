//! Re-identification heads put on top of a CLIP image encoder.
//!
//! Parameter names follow CLIP-ReID (`model/make_model_clipreid.py`):
//! `bottleneck.*` for the BNNeck, `classifier.weight` for the ID classifier,
//! so checkpoints of that code base load by name.
//!
//! One file per head: [`BnNeck`], [`LinearClassifier`], [`ArcFace`].

mod arcface;
mod bnneck;
mod linear;

pub use arcface::{ArcFace, ArcFaceConfig};
pub use bnneck::BnNeck;
pub use linear::LinearClassifier;

/// A CPU VarStore after seeding libtorch's generator, for the heads' tests.
#[cfg(test)]
fn seeded_store() -> tch::nn::VarStore {
    tch::manual_seed(0);
    tch::nn::VarStore::new(tch::Device::Cpu)
}
