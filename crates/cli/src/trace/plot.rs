//! `minserve trace plot`: four panels over the step number, drawn with the charting code of
//! `bench sweep` ([`crate::bench::chart`]): KV blocks in use (and cached), running / waiting /
//! swapped sequences, prefill tokens and decode tokens, and step time. A red line marks each
//! step that preempted.

use std::path::Path;

use minserve_core::trace::{StepRecord, TraceRecord};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::bench::chart::{render, Figure};

/// One line of a panel: its legend and its value at a step.
type Line = (&'static str, RGBColor, fn(&StepRecord, usize) -> f64);

struct TraceChart<'a> {
    title: &'a str,
    steps: Vec<&'a StepRecord>,
    num_blocks: usize,
}

pub fn draw(title: &str, records: &[TraceRecord], out: &Path) -> anyhow::Result<()> {
    let num_blocks = records
        .iter()
        .find_map(|r| match r {
            TraceRecord::Header(h) => Some(h.num_blocks),
            _ => None,
        })
        .unwrap_or(1);
    let steps: Vec<&StepRecord> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Step(step) => Some(step),
            _ => None,
        })
        .collect();
    anyhow::ensure!(!steps.is_empty(), "the trace has no step records");
    let chart = TraceChart {
        title,
        steps,
        num_blocks,
    };
    render(&chart, &out.join("trace.svg"), &out.join("trace.png"))
}

impl TraceChart<'_> {
    fn panels(&self) -> [(&'static str, Vec<Line>); 4] {
        [
            (
                "KV blocks (% of the pool)",
                vec![
                    ("used", BLUE, |s, n| 100.0 * s.blocks_used as f64 / n as f64),
                    ("cached, free", GREEN, |s, n| {
                        100.0 * s.blocks_cached as f64 / n as f64
                    }),
                ],
            ),
            (
                "sequences",
                vec![
                    ("running", BLUE, |s, _| s.running as f64),
                    ("waiting", MAGENTA, |s, _| s.waiting as f64),
                    ("swapped", GREEN, |s, _| s.swapped as f64),
                ],
            ),
            (
                "tokens in the step",
                vec![
                    ("prefill", MAGENTA, |s, _| s.prefill_tokens as f64),
                    ("decode", BLUE, |s, _| s.decode_tokens as f64),
                ],
            ),
            (
                "step time (ms)",
                vec![("duration", BLUE, |s, _| s.duration_ms)],
            ),
        ]
    }
}

impl Figure for TraceChart<'_> {
    fn size(&self) -> (u32, u32) {
        (1200, 800)
    }

    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(self.title, ("sans-serif", 20))?;
        let areas = body.split_evenly((2, 2));
        let last_step = self.steps.last().map_or(1, |s| s.step) as f64;
        let preempting: Vec<f64> = self
            .steps
            .iter()
            .filter(|s| !s.preempted.is_empty())
            .map(|s| s.step as f64)
            .collect();
        for (area, (y_desc, lines)) in areas.iter().zip(self.panels()) {
            let y_max = lines
                .iter()
                .flat_map(|(_, _, value)| self.steps.iter().map(|s| value(s, self.num_blocks)))
                .fold(0.0, f64::max)
                .max(1.0)
                * 1.1;
            let mut chart = ChartBuilder::on(area)
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..last_step + 1.0, 0f64..y_max)?;
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(y_desc)
                .label_style(("sans-serif", 13))
                .axis_desc_style(("sans-serif", 15))
                .draw()?;
            chart
                .draw_series(preempting.iter().map(|&x| {
                    PathElement::new(vec![(x, 0.0), (x, y_max)], RED.mix(0.35).stroke_width(1))
                }))?
                .label("preemption")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
            for (name, color, value) in lines {
                let points = self
                    .steps
                    .iter()
                    .map(|s| (s.step as f64, value(s, self.num_blocks)));
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}
