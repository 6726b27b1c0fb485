//! `handid-trainer embed`: embeddings of image files with a serving checkpoint.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use handid_model::{DecodeLimits, Embedder, decode, parse_device};
use tch::Tensor;

/// Output file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// NumPy `.npy`, `[images, dim]` little-endian f32, rows in argument order.
    Npy,
    /// JSON: model id, dimension, and one `{image, embedding}` per image.
    Json,
}

/// Arguments of `embed`.
#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// Serving checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Images (JPEG, PNG, BMP, PGM).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Npy)]
    pub format: Format,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

/// Embeds every image and writes the file.
pub fn run(args: &EmbedArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device).context("choosing the device")?;
    let embedder = Embedder::load(&args.model, device)
        .with_context(|| format!("loading the checkpoint {}", args.model.display()))?;
    let mut rows = Vec::new();
    for chunk in args.images.chunks(args.batch_size.max(1)) {
        let images = chunk
            .iter()
            .map(|path| {
                let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                decode(&bytes, &DecodeLimits::default())
                    .with_context(|| format!("decoding {}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        rows.push(embedder.embed_images(&images).context("embedding")?);
    }
    let embeddings = Tensor::cat(&rows, 0);
    let dim = embedder.dim();
    let values: Vec<f32> = embeddings
        .flatten(0, 1)
        .try_into()
        .context("reading embeddings")?;
    let bytes = match args.format {
        Format::Npy => npy_f32(&values, args.images.len(), dim),
        Format::Json => json(&args.images, &values, dim, embedder.model_id())?,
    };
    std::fs::write(&args.out, bytes).with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{} embeddings of dimension {dim} from model {} written to {}",
        args.images.len(),
        embedder.model_id(),
        args.out.display()
    );
    Ok(())
}

/// A version 1.0 `.npy` file of a C-order `[rows, cols]` f32 matrix.
fn npy_f32(values: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // The header, with its 10-byte preamble, is padded with spaces to a
    // multiple of 64 bytes and ends in a newline (NEP 1).
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn json(images: &[PathBuf], values: &[f32], dim: usize, model_id: &str) -> anyhow::Result<Vec<u8>> {
    let rows: Vec<serde_json::Value> = images
        .iter()
        .zip(values.chunks(dim.max(1)))
        .map(|(path, row): (&PathBuf, &[f32])| {
            serde_json::json!({ "image": path.display().to_string(), "embedding": row })
        })
        .collect();
    let doc = serde_json::json!({ "model_id": model_id, "dim": dim, "embeddings": rows });
    let mut out = serde_json::to_vec_pretty(&doc).context("serialising JSON")?;
    out.write_all(b"\n").context("serialising JSON")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn sample_images(n: usize) -> Vec<PathBuf> {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/data/11k-hands-sample/Hands"
        ));
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("sample")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        paths.truncate(n);
        paths
    }

    #[test]
    fn npy_header_is_aligned_and_data_follows() {
        let bytes = npy_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("ascii");
        assert!(header.contains("'shape': (2, 3)") && header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + header_len + 24);
        assert_eq!(
            &bytes[10 + header_len..10 + header_len + 4],
            &1.0f32.to_le_bytes()
        );
    }

    #[test]
    fn embeds_sample_hands_to_npy_and_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model");
        let manifest =
            handid_model::create_random_checkpoint(&model, &handid_model::ClipVisionConfig::tiny_vit(), 3)
                .expect("checkpoint");
        let images = sample_images(3);
        let npy = dir.path().join("e.npy");
        let mut args = EmbedArgs {
            model: model.clone(),
            images: images.clone(),
            format: Format::Npy,
            out: npy.clone(),
            device: "cpu".to_owned(),
            batch_size: 2,
        };
        run(&args).expect("npy");
        let bytes = std::fs::read(&npy).expect("npy file");
        assert!(String::from_utf8_lossy(&bytes[..128]).contains("'shape': (3, 16)"));

        args.format = Format::Json;
        args.out = dir.path().join("e.json");
        run(&args).expect("json");
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&args.out).expect("json")).expect("parse");
        assert_eq!(doc["model_id"], manifest.model_id.as_str());
        let rows = doc["embeddings"].as_array().expect("rows");
        assert_eq!(rows.len(), 3);
        let first: Vec<f64> = serde_json::from_value(rows[0]["embedding"].clone()).expect("floats");
        let norm: f64 = first.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5 && first.len() == 16);

        args.images.push(dir.path().join("missing.jpg"));
        let err = format!("{:#}", run(&args).expect_err("missing image accepted"));
        assert!(err.contains("missing.jpg"), "{err}");
    }
}
