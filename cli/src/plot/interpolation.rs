//! `interpolation`: loss of the merge (1-t)·A + t·B along t, on both experts' tasks, with the
//! per-example oracle (best of A and B) and the base model as reference lines — the paper's
//! mode-connectivity figure.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::render::{bold, finite, fmt_num, font, nice_ticks, truncate, Axis, Figure};
use super::InterpolationCurve;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 520;
const TITLE_H: u32 = 58;
const BOTH: RGBColor = RGBColor(31, 90, 170);
const TASK_COLOURS: [RGBColor; 2] = [RGBColor(200, 110, 20), RGBColor(140, 60, 170)];
const ORACLE: RGBColor = RGBColor(30, 140, 60);
const BASE: RGBColor = RGBColor(110, 110, 110);

/// A validated interpolation figure.
pub(crate) struct Interpolation<'a> {
    data: &'a InterpolationCurve,
}

impl<'a> Interpolation<'a> {
    /// Checks that there are at least two points, increasing `t` in `[0, 1]`, finite losses
    /// and per-task curves as long as the main one.
    pub(crate) fn new(data: &'a InterpolationCurve) -> Result<Self> {
        let n = data.t.len();
        if n < 2 {
            bail!("the interpolation has {n} points; it needs at least 2");
        }
        if data.loss.len() != n {
            bail!("{n} values of t but {} losses", data.loss.len());
        }
        if !data.t.windows(2).all(|w| w[0] < w[1]) || data.t[0] < 0.0 || data.t[n - 1] > 1.0 {
            bail!("t must increase within [0, 1]: {:?}", data.t);
        }
        for (i, v) in data.loss.iter().enumerate() {
            finite(*v, || format!("loss[{i}]"))?;
        }
        for (task, curve) in &data.tasks {
            if curve.len() != n {
                bail!("task {task:?} has {} losses for {n} points", curve.len());
            }
            for (i, v) in curve.iter().enumerate() {
                finite(*v, || format!("task {task:?} loss[{i}]"))?;
            }
        }
        finite(data.oracle, || "the oracle loss".to_string())?;
        if let Some(v) = data.base {
            finite(v, || "the base loss".to_string())?;
        }
        Ok(Self { data })
    }
}

impl Figure for Interpolation<'_> {
    const NAME: &'static str = "interpolation";

    fn size(&self) -> (u32, u32) {
        (WIDTH, HEIGHT)
    }

    fn render<DB>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        let d = self.data;
        let top = Pos::new(HPos::Center, VPos::Top);
        let centre = (WIDTH / 2) as i32;
        let title = format!(
            "Interpolating {} → {}",
            truncate(&d.a, 28),
            truncate(&d.b, 28)
        );
        root.draw_text(&title, &bold(22.0).color(&BLACK).pos(top), (centre, 8))?;
        let note = format!(
            "merge (1-t)·A + t·B ({} space), both tasks' records",
            d.space
        );
        let grey = RGBColor(90, 90, 90);
        root.draw_text(&note, &font(13.0).color(&grey).pos(top), (centre, 36))?;

        let mut values: Vec<f64> = d.loss.clone();
        values.extend(d.tasks.iter().flat_map(|(_, c)| c.iter().copied()));
        values.push(d.oracle);
        values.extend(d.base);
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo { hi - lo } else { 0.1 };
        let (y0, y1) = (lo - 0.08 * span, hi + 0.2 * span);

        let (_, body) = root.split_vertically(TITLE_H);
        let mut chart = ChartBuilder::on(&body)
            .margin_left(8)
            .margin_right(16)
            .margin_bottom(6)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(
                Axis {
                    lo: -0.02,
                    hi: 1.02,
                    ticks: nice_ticks(0.0, 1.0, 10),
                },
                Axis {
                    lo: y0,
                    hi: y1,
                    ticks: nice_ticks(y0, y1, 8),
                },
            )?;
        chart
            .configure_mesh()
            .x_desc("t  (0 = A, 1 = B)")
            .y_desc("mean loss per completion token")
            .x_label_formatter(&|v| fmt_num(*v))
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(font(13.0))
            .axis_desc_style(font(15.0))
            .bold_line_style(BLACK.mix(0.1))
            .light_line_style(TRANSPARENT)
            .draw()?;

        let legend_line = |colour: RGBColor| {
            move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
        };
        let reference = |value: f64, colour: RGBColor| {
            DashedLineSeries::new(
                vec![(0.0, value), (1.0, value)],
                8,
                5,
                colour.stroke_width(2),
            )
        };
        chart
            .draw_series(reference(d.oracle, ORACLE))?
            .label(format!(
                "per-example best of A and B ({})",
                fmt_num(d.oracle)
            ))
            .legend(legend_line(ORACLE));
        if let Some(v) = d.base {
            chart
                .draw_series(reference(v, BASE))?
                .label(format!("base model ({})", fmt_num(v)))
                .legend(legend_line(BASE));
        }
        for ((task, curve), colour) in d.tasks.iter().zip(TASK_COLOURS) {
            let points: Vec<(f64, f64)> = d.t.iter().copied().zip(curve.iter().copied()).collect();
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(1)))?
                .label(format!("task {}", truncate(task, 24)))
                .legend(legend_line(colour));
        }
        let points: Vec<(f64, f64)> = d.t.iter().copied().zip(d.loss.iter().copied()).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), BOTH.stroke_width(3)))?
            .label("both tasks")
            .legend(legend_line(BOTH));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, BOTH.filled())))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperMiddle)
            .label_font(font(13.0))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .draw()?;
        Ok(())
    }
}
