//! PNG plots with plotters: CMC curve, ROC (log FMR, DET-like), genuine vs
//! impostor score histograms.
//!
//! Text needs a TrueType font, read at run time (ab_glyph, no fontconfig):
//! `$HANDID_FONT`, else DejaVu Sans or Liberation Sans at their usual Debian
//! paths. Without one the plots are drawn without text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::Report;
use crate::{Error, Result};

const SIZE: (u32, u32) = (800, 600);
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a font once per process; whether text can be drawn.
fn has_font() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = std::env::var("HANDID_FONT")
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()));
        candidates.filter_map(|p| std::fs::read(p).ok()).any(|bytes| {
            // plotters keeps the font for the process lifetime; leaking the
            // bytes once is what its API asks for.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        })
    })
}

fn plot_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Invalid(format!("plotting {}: {e}", path.display()))
}

const COLOURS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

/// A line chart of named series (e.g. training curves by epoch), legend
/// included when a font is available. Empty series are skipped.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let draw = || -> std::result::Result<(), String> {
        let points = || {
            series
                .iter()
                .flat_map(|(_, s)| s.iter())
                .filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points() {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-9);
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let text = has_font();
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if text {
            builder
                .caption(title, ("sans-serif", 24))
                .x_label_area_size(40)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
            .map_err(|e| e.to_string())?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc(x_desc).y_desc(y_desc);
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| e.to_string())?;
        let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK, RGBColor(255, 140, 0)];
        for (i, (name, points)) in series.iter().filter(|(_, s)| !s.is_empty()).enumerate() {
            let colour = palette[i % palette.len()];
            let drawn = chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            if text {
                drawn.label(*name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())
    };
    draw().map_err(plot_error(path))
}

/// Mean CMC over splits, ranks 1..=min(gallery, 50).
fn cmc(report: &Report, path: &Path) -> std::result::Result<(), String> {
    let n = report
        .splits
        .iter()
        .map(|s| s.cmc.len())
        .min()
        .unwrap_or(0)
        .min(50);
    let mean: Vec<(f64, f64)> = (0..n)
        .map(|k| {
            let sum: f64 = report.splits.iter().map(|s| s.cmc[k]).sum();
            ((k + 1) as f64, 100.0 * sum / report.splits.len() as f64)
        })
        .collect();
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let text = has_font();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption("CMC (mean over splits)", ("sans-serif", 24))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(1f64..n.max(2) as f64, 0f64..100f64)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("rank").y_desc("identification rate (%)");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(mean, BLUE.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// ROC of each split with FMR on a log axis.
fn roc(report: &Report, path: &Path) -> std::result::Result<(), String> {
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let text = has_font();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption("ROC (one line per split)", ("sans-serif", 24))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d((1e-5f64..1f64).log_scale(), 0f64..100f64)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("false match rate").y_desc("true match rate (%)");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (i, split) in report.splits.iter().enumerate() {
        let points = split
            .verification
            .roc
            .iter()
            .filter(|p| p.fmr > 0.0)
            .map(|p| (p.fmr, 100.0 * p.tpr));
        let colour = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(1)))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Genuine (blue) vs impostor (red) score densities of the first split.
fn scores(report: &Report, path: &Path) -> std::result::Result<(), String> {
    let Some(split) = report.splits.first() else {
        return Ok(());
    };
    let h = &split.verification.histogram;
    let density = |counts: &[usize]| -> Vec<f64> {
        let total = counts.iter().sum::<usize>().max(1) as f64;
        counts.iter().map(|&c| c as f64 / total).collect()
    };
    let (genuine, impostor) = (density(&h.genuine), density(&h.impostor));
    let top = genuine
        .iter()
        .chain(&impostor)
        .fold(0.0f64, |a, &b| a.max(b))
        .max(1e-9)
        * 1.1;
    let bins = genuine.len();
    let width = if h.hi > h.lo {
        (h.hi - h.lo) / bins as f64
    } else {
        1.0
    };
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let text = has_font();
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        let caption = format!("Scores, split {}: genuine (blue) vs impostor (red)", split.split);
        builder
            .caption(caption, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(50);
    }
    let mut chart = builder
        .build_cartesian_2d(h.lo..h.lo + width * bins as f64, 0f64..top)
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("cosine similarity").y_desc("share of pairs");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (values, colour) in [(&impostor, RED), (&genuine, BLUE)] {
        let bars = values.iter().enumerate().map(|(b, &v)| {
            let x0 = h.lo + width * b as f64;
            Rectangle::new([(x0, 0.0), (x0 + width, v)], colour.mix(0.4).filled())
        });
        chart.draw_series(bars).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Writes the three plots into `dir`.
pub(super) fn write_all(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    type Plot = fn(&Report, &Path) -> std::result::Result<(), String>;
    let plots: [(&str, Plot); 3] = [("cmc.png", cmc), ("roc.png", roc), ("scores.png", scores)];
    plots
        .into_iter()
        .map(|(name, plot)| {
            let path = dir.join(name);
            plot(report, &path).map_err(plot_error(&path))?;
            Ok(path)
        })
        .collect()
}
