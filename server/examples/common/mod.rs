//! What the service benchmarks share.

use std::path::Path;

use handid_model::ClipVisionConfig;

/// A benchmark's error.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The first `n` JPEGs of the 11k Hands sample (`../shared/data`).
pub fn sample_photos(n: usize) -> Result<Vec<Vec<u8>>, Error> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/11k-hands-sample/Hands");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    paths.sort();
    paths.truncate(n);
    paths.into_iter().map(|p| Ok(std::fs::read(p)?)).collect()
}

/// The image tower of `--arch`: `tiny_vit`, `vit_b16` or `rn50`.
pub fn vision_config(arch: &str) -> Result<ClipVisionConfig, Error> {
    Ok(match arch {
        "tiny_vit" => ClipVisionConfig::tiny_vit(),
        "vit_b16" => ClipVisionConfig::vit_b16(),
        "rn50" => ClipVisionConfig::rn50(),
        other => return Err(format!("unknown --arch {other}").into()),
    })
}
