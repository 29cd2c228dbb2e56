//! `minserve bench chart`: line charts from a JSON description, drawn by the same code as the
//! sweep chart ([`super::chart::render`]), for figures assembled by scripts from several runs
//! (`scripts/experiments`: one series per setting, one panel per measure).
//!
//! ```json
//! {"title": "...", "x_label": "requests/s", "x_log": false,
//!  "panels": [{"y_label": "TTFT p50 (ms)", "y_log": true,
//!              "series": [{"name": "continuous", "points": [[1, 40.5], [2, 44.1]]}]}]}
//! ```
//!
//! With `"categories": ["fcfs", "priority", ...]` the x axis names them instead (a point's x is
//! its category's index) and each series is drawn as bars, side by side per category.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

use super::chart::{render, Figure};

#[derive(Args)]
pub struct ChartArgs {
    /// The chart as JSON (see docs/experiments.md for the format).
    pub spec: PathBuf,
    /// Output path without extension: PREFIX.svg and PREFIX.png are written.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    #[serde(default)]
    pub x_log: bool,
    /// Names of the x positions 0, 1, ...: a bar chart.
    #[serde(default)]
    pub categories: Vec<String>,
    pub panels: Vec<Panel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Panel {
    pub y_label: String,
    #[serde(default)]
    pub y_log: bool,
    pub series: Vec<Series>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub fn run(args: ChartArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("reading {}", args.spec.display()))?;
    let chart: LineChart = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a chart description", args.spec.display()))?;
    draw(&chart, &args.out)?;
    println!(
        "wrote {} and {}",
        args.out.with_extension("svg").display(),
        args.out.with_extension("png").display()
    );
    Ok(())
}

impl LineChart {
    /// Refuses what would draw nothing or nonsense, naming the panel and series.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.panels.is_empty() {
            bail!("the chart has no panels");
        }
        if !self.categories.is_empty() && self.x_log {
            bail!("a chart of categories has no log x axis");
        }
        for (p, panel) in self.panels.iter().enumerate() {
            if panel.series.iter().all(|s| s.points.is_empty()) {
                bail!("panel {p} (`{}`) has no points", panel.y_label);
            }
            for series in &panel.series {
                for &(x, y) in &series.points {
                    let bad = |v: f64, log: bool| !v.is_finite() || (log && v <= 0.0);
                    let not_a_category = !self.categories.is_empty()
                        && (x.fract() != 0.0 || x < 0.0 || x as usize >= self.categories.len());
                    if not_a_category {
                        bail!(
                            "panel {p} (`{}`), series `{}`: x = {x} is not the index of one of \
                             the {} categories",
                            panel.y_label,
                            series.name,
                            self.categories.len()
                        );
                    }
                    if bad(x, self.x_log) || bad(y, panel.y_log) {
                        bail!(
                            "panel {p} (`{}`), series `{}`: point ({x}, {y}) cannot be drawn{}",
                            panel.y_label,
                            series.name,
                            if self.x_log || panel.y_log {
                                " (a log axis needs positive values)"
                            } else {
                                ""
                            }
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn x_range(&self) -> (f64, f64) {
        if !self.categories.is_empty() {
            return (-0.5, self.categories.len() as f64 - 0.5);
        }
        let xs = self
            .panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|s| &s.points)
            .map(|p| p.0);
        padded_range(xs, self.x_log)
    }
}

/// The range of `values` with some room around it; from 0 on a linear axis.
fn padded_range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if log {
        (lo / 1.3, hi * 1.3)
    } else {
        (lo.min(0.0), if hi > 0.0 { hi * 1.1 } else { 1.0 })
    }
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(90, 90, 90),
];

impl Figure for LineChart {
    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(&self.title, ("sans-serif", 20))?;
        let areas = body.split_evenly((1, self.panels.len()));
        let x = self.x_range();
        for (area, panel) in areas.iter().zip(&self.panels) {
            let ys = panel.series.iter().flat_map(|s| &s.points).map(|p| p.1);
            let y = padded_range(ys, panel.y_log);
            let mut builder = ChartBuilder::on(area);
            builder
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(64);
            // Log and linear axes are different types in plotters: one generic body for both.
            match (self.x_log, panel.y_log) {
                (false, false) => {
                    draw_panel(builder.build_cartesian_2d(x.0..x.1, y.0..y.1)?, self, panel)?
                }
                (true, false) => draw_panel(
                    builder.build_cartesian_2d((x.0..x.1).log_scale(), y.0..y.1)?,
                    self,
                    panel,
                )?,
                (false, true) => draw_panel(
                    builder.build_cartesian_2d(x.0..x.1, (y.0..y.1).log_scale())?,
                    self,
                    panel,
                )?,
                (true, true) => draw_panel(
                    builder.build_cartesian_2d((x.0..x.1).log_scale(), (y.0..y.1).log_scale())?,
                    self,
                    panel,
                )?,
            }
        }
        root.present()?;
        Ok(())
    }
}

fn draw_panel<'a, DB, X, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<X, Y>>,
    figure: &LineChart,
    panel: &Panel,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let categories = &figure.categories;
    let x_label = |v: &f64| match categories.is_empty() {
        true => short(*v),
        false if (v - v.round()).abs() < 1e-6 && *v >= 0.0 => categories
            .get(v.round() as usize)
            .cloned()
            .unwrap_or_default(),
        false => String::new(),
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(figure.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| short(*v))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16));
    // A log axis's default labels crowd each decade (500 600 700 ...).
    mesh.x_labels(if categories.is_empty() {
        8
    } else {
        categories.len() * 2 + 1
    });
    mesh.draw()?;
    let floor = chart.y_range().start;
    let bar_width = 0.8 / panel.series.len().max(1) as f64;
    for (i, series) in panel.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        if !categories.is_empty() {
            // Bars side by side within each category.
            let left = -0.4 + i as f64 * bar_width;
            chart
                .draw_series(series.points.iter().map(|&(x, y)| {
                    let corners = [(x + left, floor), (x + left + bar_width * 0.9, y)];
                    Rectangle::new(corners, color.filled())
                }))?
                .label(series.name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                series.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(3)));
        chart.draw_series(
            series
                .points
                .iter()
                .map(|&p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// An axis label without trailing zeros: 0.5, 12, 1.2k.
fn short(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws `chart` to `prefix`.svg and `prefix`.png.
pub fn draw(chart: &LineChart, prefix: &Path) -> anyhow::Result<()> {
    chart.check()?;
    render(
        chart,
        &prefix.with_extension("svg"),
        &prefix.with_extension("png"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(json: &str) -> anyhow::Result<LineChart> {
        let chart: LineChart = serde_json::from_str(json)?;
        chart.check()?;
        Ok(chart)
    }

    #[test]
    fn a_chart_is_drawn_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let c = chart(
            r#"{"title": "t", "x_label": "rate", "x_log": true, "panels": [
                {"y_label": "ms", "y_log": true, "series": [
                    {"name": "a", "points": [[1, 10], [2, 20], [4, 80]]},
                    {"name": "b", "points": [[1, 12], [4, 30]]}]},
                {"y_label": "tok/s", "series": [{"name": "a", "points": [[1, 100], [4, 300]]}]}]}"#,
        )
        .unwrap();
        let prefix = dir.path().join("c");
        draw(&c, &prefix).unwrap();
        let svg = std::fs::read_to_string(prefix.with_extension("svg")).unwrap();
        assert!(
            svg.contains("tok/s") && svg.contains("\nb\n"),
            "legend and labels"
        );
        assert!(
            std::fs::metadata(prefix.with_extension("png"))
                .unwrap()
                .len()
                > 1000
        );
    }

    #[test]
    fn categories_are_drawn_as_named_bars() {
        let dir = tempfile::tempdir().unwrap();
        let c = chart(
            r#"{"title": "t", "x_label": "policy", "categories": ["fcfs", "priority"],
                "panels": [{"y_label": "ms", "series": [
                    {"name": "short", "points": [[0, 10], [1, 20]]},
                    {"name": "long", "points": [[0, 30]]}]}]}"#,
        )
        .unwrap();
        let prefix = dir.path().join("bars");
        draw(&c, &prefix).unwrap();
        let svg = std::fs::read_to_string(prefix.with_extension("svg")).unwrap();
        assert!(
            svg.contains("\nfcfs\n") && svg.contains("\npriority\n"),
            "category names"
        );
        assert!(svg.matches("<rect").count() >= 3, "three bars");
        let err = chart(
            r#"{"title": "t", "x_label": "x", "categories": ["a"], "panels": [{"y_label": "y",
                "series": [{"name": "s", "points": [[1, 5]]}]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x = 1 is not the index"), "{err}");
    }

    #[test]
    fn undrawable_charts_are_refused_naming_the_point() {
        let err = chart(
            r#"{"title": "t", "x_label": "x", "panels": [{"y_label": "y", "y_log": true,
                "series": [{"name": "s", "points": [[1, 0]]}]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("series `s`") && err.contains("log axis"),
            "{err}"
        );
        assert!(chart(r#"{"title": "t", "x_label": "x", "panels": []}"#).is_err());
        let unknown = chart(r#"{"title": "t", "x_label": "x", "panels": [], "colour": 1}"#);
        assert!(unknown.unwrap_err().to_string().contains("colour"));
    }
}
