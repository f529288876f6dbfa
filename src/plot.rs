//! Figures as SVGs a person can glance at: per-round metrics (losses on
//! top, agreement and exact match below) and how a figure scales with a
//! size (log-log).

use std::path::Path;

use plotters::prelude::*;

/// One line: a name and (round, value) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: &str, rounds: &[f64], values: impl Iterator<Item = f64>) -> Self {
        Self {
            name: name.to_owned(),
            points: rounds.iter().copied().zip(values).filter(|(_, v)| v.is_finite()).collect(),
        }
    }
}

const COLORS: [RGBColor; 4] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

/// Each series as a line in its color, and the legend.
fn draw_lines<'a, DB, X, Y>(chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>, series: &[Series]) -> Result<(), String>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(|e| e.to_string())?;
    Ok(())
}

fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, caption: &str, series: &[Series], y_range: Option<(f64, f64)>) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    let x_max = all.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1.0);
    let (y_min, y_max) = y_range.unwrap_or_else(|| {
        let lo = all.iter().map(|p| p.1).fold(f64::MAX, f64::min);
        let hi = all.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let pad = ((hi - lo) * 0.1).max(1e-3);
        if lo > hi { (0.0, 1.0) } else { (lo - pad, hi + pad) }
    });
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("round").draw().map_err(|e| e.to_string())?;
    draw_lines(&mut chart, series)?;
    Ok(())
}

/// Writes `upper` (free y range) over `lower` (0..1) into an SVG at `path`.
pub fn plot_rounds(path: &Path, title: &str, upper: &[Series], lower: &[Series]) -> Result<(), String> {
    let root = SVGBackend::new(path, (800, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(340);
    panel(&top, &format!("loss — {title}"), upper, None)?;
    panel(&bottom, "agreement and exact match", lower, Some((0.0, 1.05)))?;
    root.present().map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `series` (x, y > 0) on log-log axes into an SVG at `path`:
/// how a figure grows with a size.
pub fn plot_scaling(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<(), String> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
    let bounds = |values: Vec<f64>| {
        let lo = values.iter().copied().fold(f64::MAX, f64::min);
        let hi = values.iter().copied().fold(f64::MIN, f64::max);
        if lo > hi { (1.0, 10.0) } else { (lo / 1.5, hi * 1.5) }
    };
    let (x_min, x_max) = bounds(all.iter().map(|p| p.0).collect());
    let (y_min, y_max) = bounds(all.iter().map(|p| p.1).collect());
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(|e| e.to_string())?;
    draw_lines(&mut chart, series)?;
    root.present().map_err(|e| format!("{}: {e}", path.display()))
}
