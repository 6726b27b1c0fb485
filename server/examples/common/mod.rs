//! What the service benchmarks share.

use std::path::Path;

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
