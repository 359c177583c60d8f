//! The SVG of a bench report (plotters).

use std::path::Path;

use super::report::BenchReport;

/// The SVG: cycle latency distributions per case (CDF, log µs) and cycle cost against live
/// placements.
pub fn plot(r: &BenchReport, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let vals = r
        .cycle_samples
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = vals.fold((f64::MAX, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if hi > 0.0 {
        (lo * 0.8, hi * 1.25)
    } else {
        (1.0, 1000.0)
    };
    let mut ch = ChartBuilder::on(&left)
        .caption(
            "map+unmap cycle cost, distribution (no background)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)?;
    ch.configure_mesh()
        .x_desc("µs per cycle (log scale)")
        .y_desc("fraction of cycles")
        .draw()?;
    for (i, (name, v)) in r.cycle_samples.iter().enumerate() {
        let mut v = v.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len().max(1) as f64;
        let color = Palette99::pick(i).to_rgba();
        ch.draw_series(LineSeries::new(
            v.iter()
                .enumerate()
                .map(|(k, x)| (x.max(lo), (k + 1) as f64 / n)),
            color.stroke_width(2),
        ))?
        .label(name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;

    let max_live = r
        .cases
        .iter()
        .flat_map(|c| c.sweep.iter().map(|p| p.live))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let ys = r
        .cases
        .iter()
        .flat_map(|c| c.sweep.iter().map(|p| p.cycle_us.p50))
        .filter(|v| *v > 0.0);
    let (ylo, yhi) = ys.fold((f64::MAX, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (ylo, yhi) = if yhi > 0.0 {
        (ylo * 0.7, yhi * 1.5)
    } else {
        (1.0, 1000.0)
    };
    let mut ch = ChartBuilder::on(&right)
        .caption(
            "map+unmap cycle p50 against live placements",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..max_live * 1.05, (ylo..yhi).log_scale())?;
    ch.configure_mesh()
        .x_desc("placements live in the window")
        .y_desc("µs per cycle (log scale)")
        .draw()?;
    for (i, c) in r.cases.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = c
            .sweep
            .iter()
            .filter(|p| p.cycle_us.p50 > 0.0)
            .map(|p| (p.live as f64, p.cycle_us.p50))
            .collect();
        ch.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(c.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        ch.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
