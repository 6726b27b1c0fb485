//! The training configuration: one YAML file per experiment (`configs/`).
//!
//! # Layout
//! One file per section: [`model`], [`data`], [`method`] (with its
//! [`losses`] and [`optim`]), [`evaluation`] (validation and export).
//!
//! Every struct refuses unknown keys, and errors name the offending key
//! (`method.losses.triplet.margn: unknown field`). Defaults live in each
//! struct's `Default`, and follow CLIP-ReID's official configuration (Li et
//! al., AAAI 2023; `configs/person/vit_clipreid.yml`) unless a field says
//! otherwise. A method's defaults depend on its kind ([`Method::defaults`]):
//! the config's `method:` is laid over them key by key, except `losses`
//! (given, it replaces the default terms: an absent term is off) and tagged
//! values whose `kind` changes (a `schedule` or `optimizer` of another kind
//! replaces the default one).

use std::path::Path;

use anyhow::Context;
use handid_model::Feature;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

pub mod data;
pub mod evaluation;
pub mod losses;
pub mod method;
pub mod model;
pub mod optim;

pub use data::{BatchSampler, DataConfig};
pub use evaluation::{ExportConfig, SelectBy, ValidationConfig};
pub use losses::{
    CenterLossConfig, I2tLoss, IdLoss, ImageTextLoss, LossConfig, SupConLoss, TrainFeature, TripletLoss,
};
pub use method::{
    Classifier, Compatibility, HeadConfig, Method, NeckFeat, OldClassifier, Phase, PromptSgConfig,
    PromptSgInference, Stage1, Stage2,
};
pub use model::{Arch, BackboneNorm, ModelConfig};
pub use optim::{OptimConfig, ScheduleUnit, TrainPrecision};

use crate::data::AugmentConfig;

/// A whole experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Experiment name (reports, provenance; configs/ names files after it).
    pub name: String,
    /// Free text: what the experiment is and where its recipe comes from.
    pub description: String,
    /// Seeds the weights, the sampler and the augmentations.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The network.
    pub model: ModelConfig,
    /// The data.
    pub data: DataConfig,
    /// Training-time augmentation.
    pub augment: AugmentConfig,
    /// What is trained, and how.
    pub method: Method,
    /// Validation during training (training persons only).
    pub validation: ValidationConfig,
    /// What `export` writes.
    pub export: ExportConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            description: String::new(),
            seed: 1,
            device: "cpu".to_owned(),
            model: ModelConfig::default(),
            data: DataConfig::default(),
            augment: AugmentConfig::default(),
            method: Method::ZeroShot,
            validation: ValidationConfig::default(),
            export: ExportConfig::default(),
        }
    }
}

/// Keys replaced as a whole rather than merged into the defaults.
const REPLACED_WHOLE: [&str; 1] = ["losses"];

/// Lays `over` onto `base`: mappings merge key by key (recursively), except
/// the keys of [`REPLACED_WHOLE`] and mappings whose `kind` differs, which
/// `over` replaces; any other value of `over` wins.
fn overlay(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Mapping(mut base), Value::Mapping(over)) => {
            let kind = Value::from("kind");
            if over.get(&kind).is_some_and(|k| base.get(&kind) != Some(k)) {
                return Value::Mapping(over);
            }
            for (key, value) in over {
                let whole = key.as_str().is_some_and(|k| REPLACED_WHOLE.contains(&k));
                let merged = match base.remove(&key) {
                    Some(old) if !whole => overlay(old, value),
                    _ => value,
                };
                base.insert(key, merged);
            }
            Value::Mapping(base)
        }
        (_, over) => over,
    }
}

/// `method.compatibility` belongs to the image-training stage
/// ([`Stage2::compatibility`]), which is `method:` itself for `finetune` but
/// a sub-mapping for `clip_reid` (`stage2`) and `prompt_sg` (`train`): there
/// it is moved into the stage, so the one key works for every kind that
/// trains. A zero-shot run trains nothing, so it cannot be made compatible.
fn relocate_compatibility(method: &mut Value, kind: &str) -> anyhow::Result<()> {
    let stage = match kind {
        "clip_reid" => "stage2",
        "prompt_sg" => "train",
        "zero_shot" => {
            anyhow::ensure!(
                method.get("compatibility").is_none(),
                "method.compatibility: a zero_shot run trains nothing; backward-compatible training \
                 needs a method that trains (finetune, clip_reid or prompt_sg)"
            );
            return Ok(());
        }
        _ => return Ok(()),
    };
    let Some(map) = method.as_mapping_mut() else {
        return Ok(());
    };
    let Some(compatibility) = map.remove("compatibility") else {
        return Ok(());
    };
    let Some(stage_map) = map
        .entry(Value::from(stage))
        .or_insert_with(|| Value::Mapping(serde_yaml::Mapping::new()))
        .as_mapping_mut()
    else {
        anyhow::bail!("method.{stage} must be a mapping");
    };
    anyhow::ensure!(
        !stage_map.contains_key("compatibility"),
        "method.compatibility and method.{stage}.compatibility are the same key: give it once"
    );
    stage_map.insert(Value::from("compatibility"), compatibility);
    Ok(())
}

impl TrainConfig {
    /// Parses YAML; errors name the offending key.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        let mut value: Value = serde_yaml::from_str(text).context("not YAML")?;
        if let Some(method) = value.get_mut("method") {
            let kind = method
                .get("kind")
                .and_then(Value::as_str)
                .context("method.kind is required (zero_shot, finetune, clip_reid or prompt_sg)")?
                .to_owned();
            relocate_compatibility(method, &kind)?;
            // An unknown kind falls through to serde, which names the ones allowed.
            if let Some(defaults) = Method::defaults(&kind) {
                *method = overlay(serde_yaml::to_value(defaults)?, std::mem::take(method));
            }
        }
        let config: TrainConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("{path}: {}", e.into_inner())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.name.is_empty(), "name: every experiment needs a name");
        let d = &self.data;
        anyhow::ensure!(
            !d.manifest.as_os_str().is_empty(),
            "data.manifest: name the split manifest (or pass --manifest)"
        );
        match d.sampler {
            BatchSampler::Pk => anyhow::ensure!(
                d.persons_per_batch >= 2 && d.images_per_person >= 1,
                "data.persons_per_batch must be at least 2 and data.images_per_person at least 1"
            ),
            BatchSampler::Random { batch_size } => {
                anyhow::ensure!(batch_size >= 2, "data.sampler.batch_size must be at least 2")
            }
        }
        if let Some(patience) = self.validation.early_stop_patience {
            anyhow::ensure!(patience >= 1, "validation.early_stop_patience must be at least 1");
        }
        if self.validation.select_by == SelectBy::CrossModelMap {
            anyhow::ensure!(
                self.method.stage2().is_some_and(|s| s.compatibility.is_some()),
                "validation.select_by: cross_model_map needs method.compatibility (the old model \
                 whose validation gallery the new model's queries search)"
            );
        }
        if let Some([h, w]) = self.model.input_size {
            anyhow::ensure!(
                h > 0 && w > 0,
                "model.input_size must be positive, got [{h}, {w}]"
            );
        }
        if let Some(stride) = self.model.last_stride {
            anyhow::ensure!(
                matches!(
                    vision_backbone(&self.model),
                    handid_model::Backbone::ModifiedResnet { .. }
                ),
                "model.last_stride: only a ResNet has a last stride (got stride {stride} for a ViT)"
            );
        }
        let vision = self.model.vision();
        vision
            .validate()
            .map_err(|e| anyhow::anyhow!("model.vision: {e}"))?;
        handid_model::ImageEncoder::feature_dim(&vision, self.model.feature)
            .map_err(|e| anyhow::anyhow!("model.feature: {e}"))?;
        anyhow::ensure!(
            self.model.text().output_dim == vision.output_dim,
            "model.text.output_dim ({}) must equal model.vision.output_dim ({}): both towers share one space",
            self.model.text().output_dim,
            vision.output_dim
        );
        let stages: Vec<(&str, &Stage2)> = match &self.method {
            Method::ZeroShot => Vec::new(),
            Method::Finetune(s) => vec![("method", s)],
            Method::PromptSg { prompt, train } => {
                anyhow::ensure!(
                    prompt.template.matches("{}").count() == 1,
                    "method.prompt.template must hold one {{}} for the pseudo-word, got {:?}",
                    prompt.template
                );
                let dim = self.model.vision().output_dim;
                anyhow::ensure!(
                    prompt.heads >= 1 && dim % prompt.heads == 0 && prompt.blocks >= 0,
                    "method.prompt.heads ({}) must divide the embedding width {dim}; blocks must be >= 0",
                    prompt.heads
                );
                anyhow::ensure!(
                    self.model.feature == Feature::Projected,
                    "model.feature must be projected for PromptSG (the interaction works in the joint space)"
                );
                anyhow::ensure!(
                    prompt.inversion_hidden >= 1,
                    "method.prompt.inversion_hidden must be at least 1"
                );
                vec![("method.train", train)]
            }
            Method::ClipReid { stage1, stage2 } => {
                anyhow::ensure!(
                    stage1.template.matches("{}").count() == 1,
                    "method.stage1.template must hold one {{}} where the context words go, got {:?}",
                    stage1.template
                );
                anyhow::ensure!(stage1.n_ctx >= 1, "method.stage1.n_ctx must be at least 1");
                anyhow::ensure!(
                    stage1.batch_size >= 2,
                    "method.stage1.batch_size must be at least 2"
                );
                if let Some(t) = stage1.temperature {
                    anyhow::ensure!(t > 0.0, "method.stage1.temperature must be positive");
                }
                check_optim("method.stage1.optim", &stage1.optim)?;
                vec![("method.stage2", stage2)]
            }
        };
        for (at, stage) in stages {
            check_optim(&format!("{at}.optim"), &stage.optim)?;
            let l = &stage.losses;
            anyhow::ensure!(
                l.id.is_some()
                    || l.triplet.is_some()
                    || l.sup_con.is_some()
                    || l.i2t.is_some()
                    || l.image_text.is_some(),
                "{at}.losses: at least one of id, triplet, sup_con, i2t, image_text is needed"
            );
            let promptsg = matches!(self.method, Method::PromptSg { .. });
            if let Some(it) = &l.image_text {
                anyhow::ensure!(
                    promptsg || matches!(self.method, Method::ClipReid { .. }),
                    "{at}.losses.image_text needs text features: use method kind prompt_sg (the \
                     composed prompt) or clip_reid (the stage-1 prompts)"
                );
                if let Some(t) = it.temperature {
                    anyhow::ensure!(t > 0.0, "{at}.losses.image_text.temperature must be positive");
                }
            }
            if let Some(dim) = stage.head.reduction_dim {
                anyhow::ensure!(dim >= 1, "{at}.head.reduction_dim must be positive");
                anyhow::ensure!(
                    stage.head.neck_feat == NeckFeat::Before,
                    "{at}.head.reduction_dim: the reduced feature only feeds the classifier, so \
                     neck_feat must be before"
                );
            }
            if let Some(t) = &l.triplet {
                anyhow::ensure!(
                    promptsg || !t.features.contains(&TrainFeature::Fused),
                    "{at}.losses.triplet.features: fused exists for method kind prompt_sg only"
                );
            }
            anyhow::ensure!(
                stage.head.bnneck || stage.head.neck_feat == NeckFeat::Before,
                "{at}.head.neck_feat: after needs bnneck: true"
            );
            if l.i2t.is_some() {
                anyhow::ensure!(
                    matches!(self.method, Method::ClipReid { .. }),
                    "{at}.losses.i2t needs the stage-1 text features: use method kind clip_reid"
                );
            }
            if let Some(id) = &l.id {
                anyhow::ensure!(
                    (0.0..1.0).contains(&id.label_smoothing),
                    "{at}.losses.id.label_smoothing must be in [0, 1)"
                );
            }
            if let Some(c) = &stage.compatibility {
                anyhow::ensure!(
                    !c.old.as_os_str().is_empty(),
                    "{at}.compatibility.old: name the old model (its run folder, a training checkpoint \
                     or a serving checkpoint)"
                );
                anyhow::ensure!(
                    c.influence_weight.is_finite() && c.influence_weight > 0.0,
                    "{at}.compatibility.influence_weight must be positive, got {}",
                    c.influence_weight
                );
                anyhow::ensure!(
                    c.scale.is_finite() && c.scale > 0.0,
                    "{at}.compatibility.scale must be positive, got {}",
                    c.scale
                );
            }
        }
        anyhow::ensure!(
            self.export.fmrs.iter().all(|f| *f > 0.0 && *f < 1.0),
            "export.fmrs must lie in (0, 1)"
        );
        Ok(())
    }
}

fn vision_backbone(model: &ModelConfig) -> handid_model::Backbone {
    model
        .vision
        .clone()
        .unwrap_or_else(|| model.arch.towers().0)
        .backbone
}

fn check_optim(at: &str, optim: &OptimConfig) -> anyhow::Result<()> {
    anyhow::ensure!(optim.lr > 0.0, "{at}.lr must be positive");
    anyhow::ensure!(optim.bias_lr_factor > 0.0, "{at}.bias_lr_factor must be positive");
    anyhow::ensure!(optim.accumulate >= 1, "{at}.accumulate must be at least 1");
    if let Some(c) = optim.clip_grad_norm {
        anyhow::ensure!(c > 0.0, "{at}.clip_grad_norm must be positive");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{OptimizerKind, Schedule};

    const MINIMAL: &str = "
name: t
model: {arch: tiny_vit}
data: {manifest: m.txt}
method:
  kind: finetune
  epochs: 2
  losses: {id: {}, triplet: {margin: 0.3}}
  optim: {lr: 0.001}
";

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = TrainConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.seed, 1);
        assert_eq!(c.data.persons_per_batch, 16);
        let Method::Finetune(s) = &c.method else { panic!() };
        assert_eq!(s.losses.id.as_ref().unwrap().label_smoothing, 0.1);
        assert!(s.head.bnneck);
        assert_eq!(s.optim.optimizer, OptimizerKind::default());
        assert_eq!(c.export.fmrs, vec![1e-2, 1e-3, 1e-4]);
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let bad = MINIMAL.replace("triplet: {margin: 0.3}", "triplet: {margn: 0.3}");
        let err = TrainConfig::from_yaml(&bad).unwrap_err().to_string();
        // Inside the tagged `method` enum serde can only point at `method`,
        // but the message names the key and the ones allowed.
        assert!(
            err.contains("method") && err.contains("margn") && err.contains("margin"),
            "{err}"
        );
        let bad = MINIMAL.replace("name: t", "name: t\nepochz: 3");
        let err = TrainConfig::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.contains("epochz"), "{err}");
    }

    #[test]
    fn impossible_values_are_refused() {
        let bad = MINIMAL.replace("lr: 0.001", "lr: 0");
        assert!(
            TrainConfig::from_yaml(&bad)
                .unwrap_err()
                .to_string()
                .contains("method.optim.lr")
        );
        let bad = MINIMAL.replace("{id: {}, triplet: {margin: 0.3}}", "{i2t: {}}");
        assert!(
            TrainConfig::from_yaml(&bad)
                .unwrap_err()
                .to_string()
                .contains("clip_reid")
        );
        let bad = MINIMAL.replace("arch: tiny_vit", "arch: tiny_resnet, feature: class_token");
        assert!(
            TrainConfig::from_yaml(&bad)
                .unwrap_err()
                .to_string()
                .contains("model.feature")
        );
    }

    #[test]
    fn a_method_starts_from_its_papers_recipe_and_overrides_key_by_key() {
        let yaml = "
name: t
data: {manifest: m.txt}
method:
  kind: prompt_sg
  train:
    epochs: 3
    optim: {lr: 1.0e-5}
";
        let c = TrainConfig::from_yaml(yaml).unwrap();
        let Method::PromptSg { prompt, train } = &c.method else {
            panic!()
        };
        assert_eq!(train.epochs, 3);
        assert_eq!(train.optim.lr, 1e-5);
        // Not given: PromptSG's recipe, not the generic defaults.
        assert_eq!(train.optim.head_lr, Some(5e-5));
        assert!(
            matches!(&train.optim.schedule, Schedule::Step { milestones, .. } if *milestones == [21, 41])
        );
        assert_eq!(train.losses.image_text.as_ref().unwrap().weight, 0.5);
        assert_eq!(prompt.inversion_hidden, 512);

        // Given losses replace the default terms; a schedule of another kind replaces the default one.
        let yaml = "
name: t
data: {manifest: m.txt}
method:
  kind: clip_reid
  stage2:
    losses: {triplet: {}}
    optim: {schedule: {kind: constant}}
";
        let c = TrainConfig::from_yaml(yaml).unwrap();
        let Method::ClipReid { stage1, stage2 } = &c.method else {
            panic!()
        };
        assert!(stage2.losses.id.is_none() && stage2.losses.i2t.is_none());
        assert_eq!(stage2.optim.schedule, Schedule::Constant);
        assert_eq!(stage2.optim.bias_lr_factor, 2.0);
        assert_eq!(stage1.epochs, 120);
        assert_eq!(stage1.optim.lr, 3.5e-4);

        let defaults =
            TrainConfig::from_yaml("name: t\ndata: {manifest: m}\nmethod: {kind: clip_reid}\n").unwrap();
        let stage2 = defaults.method.stage2().unwrap();
        assert_eq!(stage2.losses.id.as_ref().unwrap().weight, 0.25);
        assert_eq!(stage2.losses.triplet.as_ref().unwrap().features.len(), 3);
    }

    #[test]
    fn required_values_are_named_when_missing() {
        let err = TrainConfig::from_yaml("name: t\nmethod: {kind: zero_shot}\n").unwrap_err();
        assert!(err.to_string().contains("data.manifest"), "{err}");
        let err = TrainConfig::from_yaml("name: t\ndata: {manifest: m}\nmethod: {epochs: 3}\n").unwrap_err();
        assert!(err.to_string().contains("method.kind"), "{err}");
        let bad = MINIMAL.replace("arch: tiny_vit", "arch: tiny_vit, last_stride: 1");
        let err = TrainConfig::from_yaml(&bad).unwrap_err();
        assert!(err.to_string().contains("model.last_stride"), "{err}");
    }

    #[test]
    fn compatibility_is_a_method_key_of_every_kind_that_trains() {
        let bct = MINIMAL.replace("  epochs: 2\n", "  epochs: 2\n  compatibility: {old: runs/a}\n");
        let c = TrainConfig::from_yaml(&bct).unwrap();
        let compat = c.method.stage2().unwrap().compatibility.as_ref().unwrap();
        assert_eq!(compat.old, Path::new("runs/a"));
        assert_eq!((compat.influence_weight, compat.scale), (1.0, 30.0));
        assert_eq!(compat.classifier, OldClassifier::Auto);
        let forced = bct.replace("{old: runs/a}", "{old: runs/a, classifier: synthesised}");
        let c2 = TrainConfig::from_yaml(&forced).unwrap();
        assert_eq!(
            c2.method
                .stage2()
                .unwrap()
                .compatibility
                .as_ref()
                .unwrap()
                .classifier,
            OldClassifier::Synthesised
        );
        let err = TrainConfig::from_yaml(&bct.replace("{old: runs/a}", "{old: runs/a, classifier: best}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("best") && err.contains("synthesised"), "{err}");
        // What a run stores reads back as the same config (resume compares them).
        let again: TrainConfig = serde_yaml::from_str(&serde_yaml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        assert_eq!(
            TrainConfig::from_yaml(&serde_yaml::to_string(&c).unwrap()).unwrap(),
            c
        );
        // Selecting the epoch by the cross-model validation needs the old model.
        let select = "validation: {select_by: cross_model_map}\n";
        let c = TrainConfig::from_yaml(&format!("{bct}{select}")).unwrap();
        assert_eq!(c.validation.select_by, SelectBy::CrossModelMap);
        let err = TrainConfig::from_yaml(&format!("{MINIMAL}{select}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cross_model_map") && err.contains("method.compatibility"),
            "{err}"
        );
        // Without it nothing is written: older runs' configs stay as they were.
        let plain = TrainConfig::from_yaml(MINIMAL).unwrap();
        assert!(!serde_yaml::to_string(&plain).unwrap().contains("compatibility"));

        // CLIP-ReID and PromptSG train in a sub-stage: the key moves there.
        for (kind, stage) in [("clip_reid", "stage2"), ("prompt_sg", "train")] {
            let yaml = format!(
                "name: t\ndata: {{manifest: m}}\nmethod:\n  kind: {kind}\n  compatibility: {{old: a, \
                 influence_weight: 0.5}}\n"
            );
            let c = TrainConfig::from_yaml(&yaml).unwrap();
            let compat = c.method.stage2().unwrap().compatibility.as_ref().unwrap();
            assert_eq!(compat.influence_weight, 0.5, "{kind}");
            let stored = serde_yaml::to_value(&c.method).unwrap();
            assert!(stored[stage]["compatibility"].is_mapping(), "{kind}: {stored:?}");
            let twice = format!("{yaml}  {stage}: {{compatibility: {{old: b}}}}\n");
            let err = TrainConfig::from_yaml(&twice).unwrap_err().to_string();
            assert!(err.contains("give it once"), "{err}");
        }
    }

    #[test]
    fn compatibility_refusals_name_the_key() {
        let with = |compat: &str| MINIMAL.replace("  epochs: 2\n", &format!("  epochs: 2\n  {compat}\n"));
        let refused = |yaml: &str| TrainConfig::from_yaml(yaml).unwrap_err().to_string();
        let err = refused(&with("compatibility: {influence_weight: 1.0}"));
        assert!(
            err.contains("method.compatibility.old") && err.contains("name the old model"),
            "{err}"
        );
        let err = refused(&with("compatibility: {old: a, influence_weight: 0}"));
        assert!(
            err.contains("method.compatibility.influence_weight must be positive"),
            "{err}"
        );
        let err = refused(&with("compatibility: {old: a, influence_weight: -1}"));
        assert!(err.contains("influence_weight"), "{err}");
        let err = refused(&with("compatibility: {old: a, scale: 0}"));
        assert!(err.contains("method.compatibility.scale"), "{err}");
        let err = refused(&with("compatibility: {old: a, influence_wieght: 1}"));
        assert!(
            err.contains("influence_wieght") && err.contains("influence_weight"),
            "{err}"
        );
        let err =
            refused("name: t\ndata: {manifest: m}\nmethod: {kind: zero_shot, compatibility: {old: a}}\n");
        assert!(
            err.contains("method.compatibility") && err.contains("zero_shot"),
            "{err}"
        );
        let err = refused(
            "name: t\ndata: {manifest: m}\nmethod: {kind: prompt_sg, train: {compatibility: {old: a, scale: -2}}}\n",
        );
        assert!(err.contains("method.train.compatibility.scale"), "{err}");
    }

    #[test]
    fn sup_con_weight_ramps_linearly() {
        let s = SupConLoss {
            weight: 1.0,
            temperature: 0.1,
            ramp_epochs: 4,
        };
        assert_eq!(s.weight_at(0), 0.25);
        assert_eq!(s.weight_at(3), 1.0);
        assert_eq!(s.weight_at(10), 1.0);
    }
}
