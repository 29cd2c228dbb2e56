//! Charts, drawn once as SVG and once as PNG from the same code ([`Figure`], [`render`]): the
//! sweep chart here (output throughput against TPOT p50, what each client feels while tokens
//! stream, and against TTFT p99, how long the unluckiest wait to start; one point per
//! concurrency level), and `simulate cluster`'s day.

use std::path::Path;
use std::sync::Once;

use anyhow::Context;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::serve::ServingReport;

const SIZE: (u32, u32) = (1200, 520);

/// Printable ASCII of DejaVu Sans (see assets/fonts/README.md): the PNG needs glyphs, and an
/// embedded font avoids both system fonts and a font library.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-ascii.ttf");

/// One concurrency level of a sweep, as plotted.
#[derive(Debug, Clone, Copy)]
pub struct ChartPoint {
    pub concurrency: usize,
    pub output_throughput: f64,
    pub tpot_p50_ms: f64,
    pub ttft_p99_ms: f64,
}

impl ChartPoint {
    /// `None` for a level with nothing to plot (every request failed or made one token).
    pub fn of(report: &ServingReport) -> Option<Self> {
        Some(Self {
            concurrency: report.concurrency?,
            output_throughput: report.output_throughput,
            tpot_p50_ms: report.tpot_ms?.p50,
            ttft_p99_ms: report.ttft_ms?.p99,
        })
    }
}

/// Something drawn on any plotters backend.
pub trait Figure {
    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static;

    /// Width and height in pixels.
    fn size(&self) -> (u32, u32) {
        SIZE
    }
}

/// Draws `figure` into `svg` and `png` (1200 x 520 unless it says otherwise).
pub fn render(figure: &impl Figure, svg: &Path, png: &Path) -> anyhow::Result<()> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            unreachable!("the embedded font is a valid TrueType file");
        }
    });

    let size = figure.size();
    {
        let root = SVGBackend::new(svg, size).into_drawing_area();
        figure
            .draw_on(&root)
            .with_context(|| format!("drawing {}", svg.display()))?;
    }
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        figure
            .draw_on(&root)
            .with_context(|| format!("drawing {}", png.display()))?;
    }
    let file = std::fs::File::create(png).with_context(|| format!("creating {}", png.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), size.0, size.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&rgb))
        .with_context(|| format!("writing {}", png.display()))
}

struct SweepChart<'a> {
    title: &'a str,
    points: &'a [ChartPoint],
}

impl Figure for SweepChart<'_> {
    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        draw_on(root, self.title, self.points)
    }
}

pub fn draw(title: &str, points: &[ChartPoint], svg: &Path, png: &Path) -> anyhow::Result<()> {
    render(&SweepChart { title, points }, svg, png)
}

/// A panel's x axis: its label and what it plots.
type Axis = (&'static str, fn(&ChartPoint) -> f64);

fn draw_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    points: &[ChartPoint],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let body = root.titled(title, ("sans-serif", 20))?;
    let panels = body.split_evenly((1, 2));
    let top = |values: &mut dyn Iterator<Item = f64>| values.fold(0.0, f64::max).max(1e-3) * 1.15;
    let y_max = top(&mut points.iter().map(|p| p.output_throughput));
    let axes: [Axis; 2] = [
        ("TPOT p50 (ms)", |p| p.tpot_p50_ms),
        ("TTFT p99 (ms)", |p| p.ttft_p99_ms),
    ];
    for (panel, (x_desc, x_of)) in panels.iter().zip(axes) {
        let x_max = top(&mut points.iter().map(x_of));
        let mut chart = ChartBuilder::on(panel)
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("output tokens/s")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()?;
        let xy: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (x_of(p), p.output_throughput))
            .collect();
        chart.draw_series(LineSeries::new(xy.clone(), BLUE.stroke_width(2)))?;
        chart.draw_series(points.iter().zip(xy).map(|(p, at)| {
            EmptyElement::at(at)
                + Circle::new((0, 0), 4, BLUE.filled())
                + Text::new(
                    format!("c={}", p.concurrency),
                    (6, -18),
                    ("sans-serif", 14).into_font(),
                )
        }))?;
    }
    root.present()?;
    Ok(())
}
