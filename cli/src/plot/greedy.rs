//! `greedy`: mean validation loss as the greedy search adds experts one by one, with the
//! all-experts / oracle / base losses as reference lines and the chosen active set marked.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use super::render::{
    bold, finite, fmt_num, font, max_text_width, nice_ticks, printable, text_size, truncate, Axis,
    Figure,
};
use super::GreedyCurve;

const WIDTH: u32 = 800;
const TITLE_H: u32 = 58;
const NAME_FONT: f64 = 12.0;
/// Expert names are written under the axis up to this many experts.
const MAX_NAMED: usize = 40;
const CURVE: RGBColor = RGBColor(31, 90, 170);
const FULL: RGBColor = RGBColor(200, 40, 40);
const ORACLE: RGBColor = RGBColor(30, 140, 60);
const BASE: RGBColor = RGBColor(110, 110, 110);
const ACTIVE: RGBColor = RGBColor(150, 80, 0);

/// A validated greedy-selection figure.
pub(crate) struct Greedy<'a> {
    data: &'a GreedyCurve,
    /// Shown names, or empty when there are too many experts to name.
    names: Vec<String>,
    /// Height of the rotated names under the axis (0 without names).
    names_h: u32,
}

impl<'a> Greedy<'a> {
    /// Checks lengths, finiteness and `1 ≤ active ≤ n`.
    pub(crate) fn new(data: &'a GreedyCurve) -> Result<Self> {
        let n = data.curve.len();
        if n == 0 {
            bail!("the greedy curve is empty");
        }
        if data.order.len() != n {
            bail!(
                "the greedy curve has {n} points but `order` names {} experts",
                data.order.len()
            );
        }
        for (i, v) in data.curve.iter().enumerate() {
            finite(*v, || format!("curve[{i}]"))?;
        }
        finite(data.full, || "the all-experts loss `full`".to_string())?;
        if let Some(v) = data.oracle {
            finite(v, || "the `oracle` loss".to_string())?;
        }
        if let Some(v) = data.base {
            finite(v, || "the `base` loss".to_string())?;
        }
        if data.active == 0 || data.active > n {
            bail!("active set size {} is outside 1..={n}", data.active);
        }
        let tolerance = finite(data.tolerance, || "the tolerance".to_string())?;
        if tolerance < 0.0 {
            bail!("the tolerance is negative ({tolerance})");
        }
        let names: Vec<String> = if n <= MAX_NAMED {
            data.order
                .iter()
                .map(|s| truncate(&printable(s), 18))
                .collect()
        } else {
            Vec::new()
        };
        let names_h = if names.is_empty() {
            0
        } else {
            max_text_width(&names, &font(NAME_FONT))? as u32 + 6
        };
        Ok(Self {
            data,
            names,
            names_h,
        })
    }

    fn height(&self) -> u32 {
        (450 + self.names_h).clamp(500, 640)
    }
}

impl Figure for Greedy<'_> {
    const NAME: &'static str = "greedy";

    fn size(&self) -> (u32, u32) {
        (WIDTH, self.height())
    }

    fn render<DB>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        let d = self.data;
        let n = d.curve.len();
        let top = Pos::new(HPos::Center, VPos::Top);
        let centre = (WIDTH / 2) as i32;
        root.draw_text(
            "Greedy expert selection",
            &bold(22.0).color(&BLACK).pos(top),
            (centre, 8),
        )?;
        let note = "each point: best of the first k experts per task, averaged over tasks";
        root.draw_text(
            note,
            &font(13.0).color(&RGBColor(90, 90, 90)).pos(top),
            (centre, 36),
        )?;

        let mut values: Vec<f64> = d.curve.clone();
        values.push(d.full);
        values.extend(d.oracle);
        values.extend(d.base);
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo {
            hi - lo
        } else {
            (lo.abs() * 0.1).max(0.01)
        };
        let (y0, y1) = (lo - 0.08 * span, hi + 0.12 * span);
        let (x0, x1) = (0.5, n as f64 + 0.5);
        // A tick per expert while they are named, else round steps.
        let step = if self.names.is_empty() {
            nice_ticks(0.0, n as f64, 20)
                .get(1)
                .map_or(1.0, |s| s.max(1.0))
        } else {
            1.0
        };
        let x_ticks: Vec<f64> = (1..=n)
            .map(|i| i as f64)
            .filter(|i| *i == 1.0 || (i / step).fract() == 0.0)
            .collect();

        let (_, body) = root.split_vertically(TITLE_H);
        let mut chart = ChartBuilder::on(&body)
            .margin_left(8)
            .margin_right(16)
            .margin_bottom(6)
            .x_label_area_size(44 + self.names_h)
            .y_label_area_size(64)
            .build_cartesian_2d(
                Axis {
                    lo: x0,
                    hi: x1,
                    ticks: x_ticks,
                },
                Axis {
                    lo: y0,
                    hi: y1,
                    ticks: nice_ticks(y0, y1, 8),
                },
            )?;
        chart
            .configure_mesh()
            .x_desc("experts selected")
            .y_desc("mean validation loss over tasks")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(font(13.0))
            .axis_desc_style(font(15.0))
            .bold_line_style(BLACK.mix(0.1))
            .light_line_style(TRANSPARENT)
            .draw()?;

        let reference = |value: f64, colour: RGBColor| {
            DashedLineSeries::new(vec![(x0, value), (x1, value)], 8, 5, colour.stroke_width(2))
        };
        let legend_line = |colour: RGBColor| {
            move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
        };
        chart
            .draw_series(reference(d.full, FULL))?
            .label(format!(
                "all {} experts ({})",
                d.order.len(),
                fmt_num(d.full)
            ))
            .legend(legend_line(FULL));
        if let Some(v) = d.oracle {
            chart
                .draw_series(reference(v, ORACLE))?
                .label(format!("oracle ({})", fmt_num(v)))
                .legend(legend_line(ORACLE));
        }
        if let Some(v) = d.base {
            chart
                .draw_series(reference(v, BASE))?
                .label(format!("base model ({})", fmt_num(v)))
                .legend(legend_line(BASE));
        }

        // The active set: a vertical marker and its label.
        let k = d.active as f64;
        chart.draw_series(DashedLineSeries::new(
            vec![(k, y0), (k, y1)],
            4,
            4,
            ACTIVE.stroke_width(2),
        ))?;

        let points: Vec<(f64, f64)> = d
            .curve
            .iter()
            .enumerate()
            .map(|(i, v)| ((i + 1) as f64, *v))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), CURVE.stroke_width(2)))?
            .label("greedy selection")
            .legend(legend_line(CURVE));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, CURVE.filled())))?;
        chart.draw_series([Circle::new(points[d.active - 1], 6, ACTIVE.stroke_width(2))])?;

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(font(13.0))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .draw()?;

        let label = format!(
            "active set: {} of {} (within {} %)",
            d.active,
            n,
            fmt_num(d.tolerance * 100.0)
        );
        let (lx, _) = chart.backend_coord(&(k, y0));
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let (w, h) = text_size(&label, &font(14.0))?;
        let right_side = lx + 8 + w < xs.end - 4;
        let x = if right_side { lx + 8 } else { lx - 8 - w };
        let y = ys.start + (ys.end - ys.start) * 2 / 5;
        root.draw(&Rectangle::new(
            [(x - 3, y - 3), (x + w + 3, y + h + 3)],
            WHITE.mix(0.85).filled(),
        ))?;
        let style = font(14.0)
            .color(&ACTIVE)
            .pos(Pos::new(HPos::Left, VPos::Top));
        root.draw_text(&label, &style, (x, y))?;

        // Expert names, rotated, under the tick numbers.
        if !self.names.is_empty() {
            let style = font(NAME_FONT)
                .color(&RGBColor(70, 70, 70))
                .pos(Pos::new(HPos::Right, VPos::Center))
                .transform(FontTransform::Rotate270);
            for (i, name) in self.names.iter().enumerate() {
                let (x, _) = chart.backend_coord(&((i + 1) as f64, y0));
                root.draw_text(name, &style, (x, ys.end + 24))?;
            }
        }
        Ok(())
    }
}
