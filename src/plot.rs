//! Benchmark plots (PNG, plotters): the selective scan's time against sequence length on log-log
//! axes, generation throughput against batch size and training memory against sequence length,
//! one line per (model, dtype, figure) —
//! ours and whatever baselines the figures include (scripts/gpu_baselines.py writes them in the
//! same JSON-lines schema).

use crate::bench::Figure;
use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// A panel: which figures it takes, its x value, its axis titles.
struct Panel {
    title: &'static str,
    x_label: &'static str,
    y_label: &'static str,
    take: fn(&Figure) -> Option<f64>,
    log_y: bool,
}

const PANELS: &[Panel] = &[
    Panel {
        title: "Selective scan (D=1024, N=16, batch 1): forward time",
        x_label: "sequence length",
        y_label: "ms",
        take: |f| (f.bench == "scan" && f.unit == "ms").then_some(f.length as f64),
        log_y: true,
    },
    Panel {
        title: "Generation throughput (prompt 2048 + 128 generated)",
        x_label: "batch size",
        y_label: "tokens / s",
        take: |f| (f.bench == "generate" && f.figure == "tokens_per_s").then_some(f.batch as f64),
        log_y: false,
    },
    Panel {
        title: "Training memory (batch 1, per-layer recompute)",
        x_label: "sequence length",
        y_label: "peak GB",
        take: |f| (f.bench == "train" && f.figure == "peak_memory_gb" && f.batch == 1).then_some(f.length as f64),
        log_y: false,
    },
];

/// Draws every panel that `figs` has data for, side by side, into `path`.
pub fn draw(figs: &[Figure], path: &Path) -> Result<()> {
    let panels: Vec<&Panel> = PANELS.iter().filter(|p| figs.iter().any(|f| (p.take)(f).is_some())).collect();
    if panels.is_empty() {
        bail!("nothing to plot: the figures have no scan times, generation throughput or training memory");
    }
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let root = BitMapBackend::new(path, (900 * panels.len() as u32, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let areas = root.split_evenly((1, panels.len()));
    for (p, area) in panels.iter().zip(&areas) {
        panel(p, figs, area).map_err(|e| anyhow!("plot {}: {e}", path.display()))?;
    }
    root.present().map_err(|e| anyhow!("cannot write {}: {e}", path.display()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn panel(p: &Panel, figs: &[Figure], area: &Area) -> Result<(), Box<dyn std::error::Error>> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for f in figs {
        if let Some(x) = (p.take)(f) {
            series.entry(format!("{} {} {}", f.model, f.dtype, f.figure)).or_default().push((x, f.value));
        }
    }
    let xs = series.values().flatten().map(|v| v.0);
    let ys = series.values().flatten().map(|v| v.1);
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let mut b = ChartBuilder::on(area);
    b.caption(p.title, ("sans-serif", 20)).margin(15).x_label_area_size(45).y_label_area_size(70);
    let palette = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc(p.x_label).y_desc(p.y_label).draw()?;
            for (i, (name, mut pts)) in series.into_iter().enumerate() {
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                let c = palette[i % palette.len()];
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
                chart.draw_series(pts.into_iter().map(|q| Circle::new(q, 3, c.filled())))?;
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        }};
    }
    if p.log_y {
        body!(b.build_cartesian_2d((x0..x1 * 1.2).log_scale(), (y0 * 0.8..y1 * 1.25).log_scale())?);
    } else {
        body!(b.build_cartesian_2d(x0 * 0.9..x1 * 1.1, 0.0..y1 * 1.1)?);
    }
    Ok(())
}

/// Training and validation loss against tokens seen, into `path` (`train --plot`).
pub fn loss_curves(train: &[(f64, f64)], val: &[(f64, f64)], path: &Path) -> Result<()> {
    if train.is_empty() {
        bail!("nothing to plot: no training steps logged");
    }
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let all = train.iter().chain(val);
        let x1 = all.clone().fold(0.0f64, |a, p| a.max(p.0));
        let (y0, y1) = all.fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let mut chart = ChartBuilder::on(&root)
            .caption("Loss", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x1 * 1.02, (y0 - 0.05 * (y1 - y0))..(y1 + 0.05 * (y1 - y0)))?;
        chart.configure_mesh().x_desc("tokens").y_desc("cross-entropy (nats)").draw()?;
        for (name, pts, c) in [("train", train, &BLUE), ("validation", val, &RED)] {
            if pts.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(pts.to_vec(), c.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}
