//! Template transformation: a small network that maps an old model's
//! embeddings into a new model's space, so stored templates can be upgraded
//! without a single image (Ramanujan et al., "Forward Compatible Training
//! for Large-Scale Embedding Retrieval Systems", CVPR 2022).
//!
//! The architecture is the paper's (`MLP_BN_SIDE_PROJECTION` of its code,
//! 1x1 convolutions on a 1x1 map being linear layers): the old embedding
//! through two blocks (to 2 x old, then 2 x new width), the side-information
//! through two blocks of its own (to 2 x side, then 2 x new), both
//! concatenated and mixed by three blocks (to `inner`, `inner`, then the new
//! width, the last without normalisation or activation). A block is linear,
//! batch normalisation, ReLU. The side-information is either a
//! side-information model's feature of the same image, stored beside the
//! old template at enrolment (the paper's sec. 3.2: a task-independent
//! feature learnt with the old model, in preparation for models to come;
//! [`SideInfo`]), or, without such a model, the old embedding itself, what
//! the paper's code uses when no side-information model is given.
//!
//! [`TransformArch::Linear`] (ours, not the paper's) is one affine map of
//! the old embedding (and the side-information, concatenated), for fitting
//! sets of a few hundred images, where the paper's network learns its
//! training pairs and generalises worse to new persons
//! (docs/model-upgrades.md); `fit-transform` fits it in closed form.
//!
//! A transform lives in a folder: `transform.safetensors` (the weights) and
//! `transform.yaml` ([`TransformManifest`]: from which model and space to
//! which, the widths, how it was fitted), written last.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn, nn::ModuleT};

use crate::{Error, Result, l2_normalize};

/// The weights' file in a transform folder.
pub const TRANSFORM_WEIGHTS: &str = "transform.safetensors";
/// The manifest's file in a transform folder.
pub const TRANSFORM_MANIFEST: &str = "transform.yaml";

/// What a transform maps, and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformManifest {
    /// The old model's id (its weights' sha256).
    pub from_model: String,
    /// The old model's embedding space.
    pub from_space: String,
    /// The new model's id.
    pub to_model: String,
    /// The new model's embedding space.
    pub to_space: String,
    /// Old embedding width.
    pub from_dim: usize,
    /// New embedding width.
    pub to_dim: usize,
    /// The network (the paper's when absent).
    #[serde(default, skip_serializing_if = "TransformArch::is_mlp")]
    pub arch: TransformArch,
    /// Width of the mixer's hidden layers (2048 in the paper; 0 for a
    /// linear transform, which has none).
    pub inner_dim: usize,
    /// The side-information model whose features the transform takes beside
    /// the old embedding; absent, the old embedding is the side-information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side_info: Option<SideInfo>,
    /// How it was fitted: `key: value` lines (manifest, images, epochs,
    /// final loss...).
    pub provenance: Vec<(String, String)>,
}

/// The network of a transform.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransformArch {
    /// The paper's network (the module's doc).
    #[default]
    Mlp,
    /// One affine map, `W [old; side] + b`.
    Linear,
}

impl TransformArch {
    fn is_mlp(&self) -> bool {
        *self == Self::Mlp
    }
}

impl TransformManifest {
    /// How many values the network's linear weights hold at least (its
    /// norms and biases add more), for this manifest's architecture and
    /// widths; `None` when that overflows. [`TemplateTransform::load`]
    /// checks it against the weights file before allocating the network,
    /// so that a manifest naming absurd widths is refused, not allocated.
    fn weight_floor(&self) -> Option<u64> {
        let (from, to, inner) = (self.from_dim as u64, self.to_dim as u64, self.inner_dim as u64);
        let side = self.side_info.as_ref().map(|s| s.dim as u64);
        let product = |a: u64, b: u64| a.checked_mul(b);
        let sum = |terms: &[Option<u64>]| {
            terms
                .iter()
                .try_fold(0u64, |total, term| total.checked_add((*term)?))
        };
        match self.arch {
            TransformArch::Linear => product(from.checked_add(side.unwrap_or(0))?, to),
            TransformArch::Mlp => {
                let side = side.unwrap_or(from);
                sum(&[
                    product(from, from.checked_mul(2)?),
                    product(from.checked_mul(2)?, to.checked_mul(2)?),
                    product(side, side.checked_mul(2)?),
                    product(side.checked_mul(2)?, to.checked_mul(2)?),
                    product(to.checked_mul(4)?, inner),
                    product(inner, inner),
                    product(inner, to),
                ])
            }
        }
    }
}

/// The side-information model a transform was fitted with: its features of
/// the enrolment images are stored beside the old templates, and the
/// transform needs them to map a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideInfo {
    /// The side-information model's id (its weights' sha256).
    pub model: String,
    /// Its embedding space.
    pub space: String,
    /// Its feature width.
    pub dim: usize,
}

struct Block {
    linear: nn::Linear,
    norm: Option<nn::BatchNorm>,
}

impl Block {
    fn new(path: nn::Path, from: i64, to: i64, last: bool) -> Self {
        let linear = nn::linear(
            &path / "linear",
            from,
            to,
            nn::LinearConfig {
                bias: last,
                ..Default::default()
            },
        );
        let norm = (!last).then(|| nn::batch_norm1d(&path / "norm", to, Default::default()));
        Self { linear, norm }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.apply(&self.linear);
        match &self.norm {
            Some(norm) => norm.forward_t(&y, train).relu(),
            None => y,
        }
    }
}

/// The paper's network's layers.
struct Mlp {
    old: [Block; 2],
    side: [Block; 2],
    mixer: [Block; 3],
}

/// The layers of [`TransformArch`].
enum Net {
    Mlp(Box<Mlp>),
    Linear(nn::Linear),
}

/// The transformation network with its manifest.
pub struct TemplateTransform {
    vs: nn::VarStore,
    net: Net,
    manifest: TransformManifest,
}

impl std::fmt::Debug for TemplateTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateTransform")
            .field("manifest", &self.manifest)
            .finish()
    }
}

impl TemplateTransform {
    /// A new network (libtorch's default initialisation) for `manifest`'s
    /// architecture and widths, on `device`.
    pub fn new(manifest: TransformManifest, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (from, to, inner) = (
            manifest.from_dim as i64,
            manifest.to_dim as i64,
            manifest.inner_dim as i64,
        );
        let net = match manifest.arch {
            TransformArch::Mlp => {
                let old = [
                    Block::new(&root / "old" / 0, from, 2 * from, false),
                    Block::new(&root / "old" / 1, 2 * from, 2 * to, false),
                ];
                // Without a side-information model the side branch takes the
                // old embedding: same input width.
                let side_dim = manifest.side_info.as_ref().map_or(from, |s| s.dim as i64);
                let side = [
                    Block::new(&root / "side" / 0, side_dim, 2 * side_dim, false),
                    Block::new(&root / "side" / 1, 2 * side_dim, 2 * to, false),
                ];
                let mixer = [
                    Block::new(&root / "mixer" / 0, 4 * to, inner, false),
                    Block::new(&root / "mixer" / 1, inner, inner, false),
                    Block::new(&root / "mixer" / 2, inner, to, true),
                ];
                Net::Mlp(Box::new(Mlp { old, side, mixer }))
            }
            TransformArch::Linear => {
                let side_dim = manifest.side_info.as_ref().map_or(0, |s| s.dim as i64);
                Net::Linear(nn::linear(
                    &root / "linear",
                    from + side_dim,
                    to,
                    Default::default(),
                ))
            }
        };
        Self { vs, net, manifest }
    }

    /// Sets a linear transform's map to `weight [to, from (+ side)]` and
    /// `bias [to]` (what `fit-transform` solves for).
    pub fn set_affine(&mut self, weight: &Tensor, bias: &Tensor) -> Result<()> {
        let Net::Linear(linear) = &mut self.net else {
            return Err(Error::InvalidInput(
                "only a linear transform is set as one affine map".to_owned(),
            ));
        };
        if weight.size() != linear.ws.size() || Some(bias.size()) != linear.bs.as_ref().map(Tensor::size) {
            return Err(Error::InvalidInput(format!(
                "the linear transform's weight is {:?} and bias [{}], got {:?} and {:?}",
                linear.ws.size(),
                self.manifest.to_dim,
                weight.size(),
                bias.size()
            )));
        }
        tch::no_grad(|| {
            let device = linear.ws.device();
            linear.ws.copy_(&weight.to_device(device).to_kind(Kind::Float));
            if let Some(bs) = &mut linear.bs {
                bs.copy_(&bias.to_device(device).to_kind(Kind::Float));
            }
        });
        Ok(())
    }

    /// The network's output for old embeddings `[n, from_dim]` and, for a
    /// transform with a side-information model, their side-information
    /// `[n, side dim]` (ignored without one); not normalised, `train` selects
    /// batch statistics. Shapes are the caller's to check ([`Self::apply`]
    /// does).
    pub fn forward_t(&self, old: &Tensor, side: Option<&Tensor>, train: bool) -> Tensor {
        let side = match (&self.manifest.side_info, side) {
            (Some(_), Some(side)) => Some(side),
            _ => None,
        };
        match &self.net {
            Net::Mlp(mlp) => {
                let mut a = old.shallow_clone();
                for block in &mlp.old {
                    a = block.forward(&a, train);
                }
                let mut b = side.unwrap_or(old).shallow_clone();
                for block in &mlp.side {
                    b = block.forward(&b, train);
                }
                let mut x = Tensor::cat(&[a, b], 1);
                for block in &mlp.mixer {
                    x = block.forward(&x, train);
                }
                x
            }
            Net::Linear(linear) => match side {
                Some(side) => Tensor::cat(&[old, side], 1).apply(linear),
                None => old.apply(linear),
            },
        }
    }

    /// Old templates `[n, from_dim]` as unit vectors of the new space, with
    /// their side-information `[n, side dim]` when the transform was fitted
    /// with a side-information model (refused otherwise, and refused
    /// missing when it was).
    pub fn apply(&self, old: &Tensor, side: Option<&Tensor>) -> Result<Tensor> {
        let width = old.size().get(1).copied().unwrap_or(0);
        if old.dim() != 2 || width != self.manifest.from_dim as i64 {
            return Err(Error::InvalidInput(format!(
                "the transform maps {}-d embeddings, got shape {:?}",
                self.manifest.from_dim,
                old.size()
            )));
        }
        let device = self.vs.device();
        let side = match (&self.manifest.side_info, side) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(Error::InvalidInput(
                    "the transform takes no side-information (it was fitted without a side-information model)"
                        .to_owned(),
                ));
            }
            (Some(info), None) => {
                return Err(Error::InvalidInput(format!(
                    "the transform needs the side-information of model {} ({}-d) beside each template",
                    info.model, info.dim
                )));
            }
            (Some(info), Some(side)) => {
                if side.dim() != 2 || side.size() != [old.size()[0], info.dim as i64] {
                    return Err(Error::InvalidInput(format!(
                        "the transform takes {}-d side-information for each of the {} templates, got shape {:?}",
                        info.dim,
                        old.size()[0],
                        side.size()
                    )));
                }
                Some(side.to_device(device).to_kind(Kind::Float))
            }
        };
        let x = old.to_device(device).to_kind(Kind::Float);
        Ok(tch::no_grad(|| {
            l2_normalize(&self.forward_t(&x, side.as_ref(), false))
        }))
    }

    /// The side-information model the transform needs, if any.
    pub fn side_info(&self) -> Option<&SideInfo> {
        self.manifest.side_info.as_ref()
    }

    /// The trainable variables.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// What it maps.
    pub fn manifest(&self) -> &TransformManifest {
        &self.manifest
    }

    /// Replaces the provenance lines (before [`Self::save`]).
    pub fn set_provenance(&mut self, provenance: Vec<(String, String)>) {
        self.manifest.provenance = provenance;
    }

    /// Writes the folder: the weights, then the manifest (a folder with a
    /// manifest is complete).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        let named: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.to_device(Device::Cpu).contiguous()))
            .collect();
        let refs: Vec<(&str, Tensor)> = named
            .iter()
            .map(|(n, t)| (n.as_str(), t.shallow_clone()))
            .collect();
        Tensor::write_safetensors(&refs, dir.join(TRANSFORM_WEIGHTS))?;
        let path = dir.join(TRANSFORM_MANIFEST);
        let text = serde_yaml::to_string(&self.manifest).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let partial = dir.join(format!("{TRANSFORM_MANIFEST}.partial"));
        fs::write(&partial, text).map_err(io(&partial))?;
        fs::rename(&partial, &path).map_err(io(&path))
    }

    /// Reads a folder written by [`Self::save`].
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let path = dir.join(TRANSFORM_MANIFEST);
        let text = fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: TransformManifest = serde_yaml::from_str(&text).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if manifest.from_dim == 0
            || manifest.to_dim == 0
            || (manifest.arch == TransformArch::Mlp && manifest.inner_dim == 0)
            || manifest.side_info.as_ref().is_some_and(|s| s.dim == 0)
        {
            return Err(Error::Manifest {
                path,
                reason: "from_dim, to_dim, side_info.dim and the inner_dim of the paper's network must \
                         be at least 1"
                    .to_owned(),
            });
        }
        // Each value takes at least two bytes (half precision) in the file.
        let weights = dir.join(TRANSFORM_WEIGHTS);
        let file_bytes = fs::metadata(&weights)
            .map_err(|source| Error::Io {
                path: weights.clone(),
                source,
            })?
            .len();
        if manifest
            .weight_floor()
            .and_then(|values| values.checked_mul(2))
            .is_none_or(|bytes| bytes > file_bytes)
        {
            return Err(Error::Manifest {
                path,
                reason: format!(
                    "its widths (from_dim {}, to_dim {}, inner_dim {}{}) need more weights than {} holds \
                     ({file_bytes} bytes)",
                    manifest.from_dim,
                    manifest.to_dim,
                    manifest.inner_dim,
                    manifest
                        .side_info
                        .as_ref()
                        .map_or(String::new(), |s| format!(", side_info.dim {}", s.dim)),
                    weights.display()
                ),
            });
        }
        let transform = Self::new(manifest, device);
        let tensors = Tensor::read_safetensors(&weights)?;
        crate::checkpoint::load_strict(&transform.vs, tensors)?;
        Ok(transform)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> TransformManifest {
        TransformManifest {
            from_model: "a".into(),
            from_space: "a".into(),
            to_model: "b".into(),
            to_space: "b".into(),
            from_dim: 4,
            to_dim: 6,
            arch: TransformArch::Mlp,
            inner_dim: 8,
            side_info: None,
            provenance: vec![("images".into(), "3".into())],
        }
    }

    #[test]
    fn a_saved_transform_loads_and_maps_alike() {
        tch::manual_seed(1);
        let transform = TemplateTransform::new(manifest(), Device::Cpu);
        let old = l2_normalize(&Tensor::randn([5, 4], (Kind::Float, Device::Cpu)));
        let mapped = transform.apply(&old, None).expect("apply");
        assert_eq!(mapped.size(), [5, 6]);
        let norms = mapped.norm_scalaropt_dim(2.0, [1], false);
        assert!(norms.allclose(&Tensor::ones([5], (Kind::Float, Device::Cpu)), 1e-5, 1e-5, false));
        let dir = tempfile::tempdir().expect("tempdir");
        transform.save(dir.path()).expect("save");
        let back = TemplateTransform::load(dir.path(), Device::Cpu).expect("load");
        assert_eq!(back.manifest(), transform.manifest());
        assert!(
            back.apply(&old, None)
                .expect("apply")
                .allclose(&mapped, 1e-6, 1e-6, false)
        );
        assert!(
            back.apply(&Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)), None)
                .is_err()
        );
        // Side-information given to a transform fitted without it.
        assert!(back.apply(&old, Some(&old)).is_err());

        // A manifest whose widths the weights file cannot hold is refused
        // before the network is allocated (here 100000 wide: 80 GB of
        // weights; and widths whose product overflows), naming them; one
        // that merely disagrees with the weights, by the weights' names
        // and shapes.
        let with = |edit: &dyn Fn(&mut TransformManifest)| {
            let mut edited = manifest();
            edit(&mut edited);
            let path = dir.path().join(TRANSFORM_MANIFEST);
            fs::write(&path, serde_yaml::to_string(&edited).expect("yaml")).expect("write");
            TemplateTransform::load(dir.path(), Device::Cpu).map(|_| ())
        };
        let huge = with(&|m| m.from_dim = 100_000).expect_err("100000 wide");
        assert!(
            matches!(&huge, Error::Manifest { reason, .. } if reason.contains("from_dim 100000")),
            "{huge}"
        );
        let overflow = with(&|m| m.inner_dim = usize::MAX / 2).expect_err("overflow");
        assert!(matches!(overflow, Error::Manifest { .. }), "{overflow}");
        let mut linear = manifest();
        linear.arch = TransformArch::Linear;
        linear.side_info = Some(SideInfo {
            model: "s".into(),
            space: "s".into(),
            dim: usize::MAX,
        });
        assert_eq!(linear.weight_floor(), None);
        let other = with(&|m| m.to_dim = 5).expect_err("other shapes");
        assert!(matches!(other, Error::WeightMismatch { .. }), "{other}");
        with(&|_| {}).expect("the manifest as written loads again");
    }

    #[test]
    fn a_transform_with_side_information_needs_it_and_uses_it() {
        tch::manual_seed(2);
        let options = (Kind::Float, Device::Cpu);
        let mut with_side = manifest();
        with_side.side_info = Some(SideInfo {
            model: "s".into(),
            space: "s".into(),
            dim: 3,
        });
        let transform = TemplateTransform::new(with_side, Device::Cpu);
        let old = l2_normalize(&Tensor::randn([5, 4], options));
        let side = l2_normalize(&Tensor::randn([5, 3], options));
        let mapped = transform.apply(&old, Some(&side)).expect("apply");
        assert_eq!(mapped.size(), [5, 6]);
        // Other side-information, another result: the branch is used.
        let other = l2_normalize(&Tensor::randn([5, 3], options));
        let remapped = transform.apply(&old, Some(&other)).expect("apply");
        assert!(!remapped.allclose(&mapped, 1e-4, 1e-4, false));
        let missing = transform.apply(&old, None).expect_err("no side-information");
        assert!(missing.to_string().contains("side-information"), "{missing}");
        assert!(transform.apply(&old, Some(&old)).is_err(), "4-d side-information");
        assert!(
            transform.apply(&old, Some(&side.narrow(0, 0, 4))).is_err(),
            "one row short"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        transform.save(dir.path()).expect("save");
        let back = TemplateTransform::load(dir.path(), Device::Cpu).expect("load");
        assert_eq!(back.side_info(), transform.side_info());
        assert!(
            back.apply(&old, Some(&side))
                .expect("apply")
                .allclose(&mapped, 1e-6, 1e-6, false)
        );
    }

    #[test]
    fn a_linear_transform_is_its_affine_map_with_and_without_side_information() {
        let options = (Kind::Float, Device::Cpu);
        let mut linear = manifest();
        linear.arch = TransformArch::Linear;
        linear.inner_dim = 0;
        let mut transform = TemplateTransform::new(linear.clone(), Device::Cpu);
        let weight = Tensor::randn([6, 4], options);
        let bias = Tensor::randn([6], options);
        transform.set_affine(&weight, &bias).expect("set");
        let old = l2_normalize(&Tensor::randn([5, 4], options));
        let mapped = transform.apply(&old, None).expect("apply");
        let expected = l2_normalize(&(old.matmul(&weight.tr()) + &bias));
        assert!(mapped.allclose(&expected, 1e-5, 1e-5, false));
        assert!(
            transform.set_affine(&weight.narrow(1, 0, 3), &bias).is_err(),
            "3 columns"
        );
        // Written with its architecture, read back the same; an MLP's
        // manifest names none (read by servers that know only the MLP).
        let dir = tempfile::tempdir().expect("tempdir");
        transform.save(dir.path()).expect("save");
        let text = fs::read_to_string(dir.path().join(TRANSFORM_MANIFEST)).expect("manifest");
        assert!(text.contains("arch: linear"), "{text}");
        let back = TemplateTransform::load(dir.path(), Device::Cpu).expect("load");
        assert_eq!(back.manifest().arch, TransformArch::Linear);
        assert!(
            back.apply(&old, None)
                .expect("apply")
                .allclose(&mapped, 1e-6, 1e-6, false)
        );
        let mlp = serde_yaml::to_string(&manifest()).expect("yaml");
        assert!(!mlp.contains("arch"), "{mlp}");
        let read: TransformManifest = serde_yaml::from_str(&mlp).expect("read");
        assert_eq!(read.arch, TransformArch::Mlp);
        assert!(
            TemplateTransform::new(manifest(), Device::Cpu)
                .set_affine(&weight, &bias)
                .is_err(),
            "the paper's network is no affine map"
        );

        // With side-information the map takes [old; side].
        linear.side_info = Some(SideInfo {
            model: "s".into(),
            space: "s".into(),
            dim: 3,
        });
        let mut transform = TemplateTransform::new(linear, Device::Cpu);
        let weight = Tensor::randn([6, 7], options);
        transform.set_affine(&weight, &bias).expect("set");
        let side = l2_normalize(&Tensor::randn([5, 3], options));
        let mapped = transform.apply(&old, Some(&side)).expect("apply");
        let expected = l2_normalize(&(Tensor::cat(&[&old, &side], 1).matmul(&weight.tr()) + &bias));
        assert!(mapped.allclose(&expected, 1e-5, 1e-5, false));
        assert!(transform.apply(&old, None).is_err(), "side-information missing");
    }
}
