//! `tradeoff`: the paper's test loss vs inference cost scatter, one labelled point per policy.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::render::{
    bold, finite, fmt_num, font, log_ticks, nice_ticks, printable, text_size, truncate, Axis,
    Bounds, Figure,
};
use super::CostPoint;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 500;
const TITLE_H: u32 = 58;
const LABEL_FONT: f64 = 13.0;
const MARKER: i32 = 5;
const POINT: RGBColor = RGBColor(31, 90, 170);

/// A validated tradeoff figure.
pub(crate) struct Tradeoff<'a> {
    points: &'a [CostPoint],
    labels: Vec<String>,
    log_x: bool,
    pareto: Vec<bool>,
}

impl<'a> Tradeoff<'a> {
    /// Checks `points` (finite losses, errors ≥ 0, costs > 0) and picks the x scale.
    pub(crate) fn new(points: &'a [CostPoint]) -> Result<Self> {
        if points.is_empty() {
            bail!("no points to draw");
        }
        for (i, p) in points.iter().enumerate() {
            let name = || format!("point {i} ({:?})", p.label);
            finite(p.mean_loss, || format!("mean_loss of {}", name()))?;
            let se = finite(p.standard_error, || format!("standard_error of {}", name()))?;
            if se < 0.0 {
                bail!("standard_error of {} is negative ({se})", name());
            }
            let t = finite(p.time_vs_one_expert, || {
                format!("time_vs_one_expert of {}", name())
            })?;
            if t <= 0.0 {
                bail!("time_vs_one_expert of {} is {t}; it must be > 0", name());
            }
        }
        let (lo, hi) = min_max(points.iter().map(|p| p.time_vs_one_expert));
        let pareto = points
            .iter()
            .map(|p| {
                !points.iter().any(|q| {
                    q.time_vs_one_expert <= p.time_vs_one_expert
                        && q.mean_loss <= p.mean_loss
                        && (q.time_vs_one_expert < p.time_vs_one_expert
                            || q.mean_loss < p.mean_loss)
                })
            })
            .collect();
        Ok(Self {
            points,
            labels: points
                .iter()
                .map(|p| truncate(&printable(&p.label), 32))
                .collect(),
            log_x: hi / lo > 10.0,
            pareto,
        })
    }

    /// Position of a cost on the (possibly log10-transformed) x axis.
    fn x(&self, time: f64) -> f64 {
        if self.log_x {
            time.log10()
        } else {
            time
        }
    }

    /// x range and tick positions, in axis units; room is left on the right for labels.
    fn x_axis(&self) -> (f64, f64, Vec<f64>) {
        let (lo, hi) = min_max(self.points.iter().map(|p| self.x(p.time_vs_one_expert)));
        let (lo, hi) = widen(lo, hi, if self.log_x { 1.0 } else { lo.abs().max(1.0) });
        let span = hi - lo;
        let mut start = lo - 0.06 * span;
        let end = hi + 0.22 * span;
        if !self.log_x && start < 0.0 && lo >= 0.0 {
            start = 0.0;
        }
        let ticks = if self.log_x {
            let ticks = log_ticks(10f64.powf(start), 10f64.powf(end));
            ticks.into_iter().map(f64::log10).collect()
        } else {
            nice_ticks(start, end, 8)
        };
        (start, end, ticks)
    }

    fn y_axis(&self) -> (f64, f64, Vec<f64>) {
        let (lo, _) = min_max(self.points.iter().map(|p| p.mean_loss - p.standard_error));
        let (_, hi) = min_max(self.points.iter().map(|p| p.mean_loss + p.standard_error));
        let (lo, hi) = widen(lo, hi, lo.abs().max(0.1));
        let span = hi - lo;
        let (start, end) = (lo - 0.08 * span, hi + 0.1 * span);
        (start, end, nice_ticks(start, end, 8))
    }
}

impl Figure for Tradeoff<'_> {
    const NAME: &'static str = "tradeoff";

    fn size(&self) -> (u32, u32) {
        (WIDTH, HEIGHT)
    }

    fn render<DB>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        let centre = (WIDTH / 2) as i32;
        let top = Pos::new(HPos::Center, VPos::Top);
        root.draw_text(
            "Loss vs inference cost",
            &bold(22.0).color(&BLACK).pos(top),
            (centre, 8),
        )?;
        let scale = if self.log_x { "log scale; " } else { "" };
        let note = format!(
            "lower-left is better · filled: Pareto-optimal · bars: ±1 standard error · x: {scale}1× = one adapter"
        );
        root.draw_text(
            &note,
            &font(13.0).color(&RGBColor(90, 90, 90)).pos(top),
            (centre, 36),
        )?;

        let (_, body) = root.split_vertically(TITLE_H);
        let (x0, x1, x_ticks) = self.x_axis();
        let (y0, y1, y_ticks) = self.y_axis();
        let mut chart = ChartBuilder::on(&body)
            .margin_left(8)
            .margin_right(16)
            .margin_bottom(8)
            .x_label_area_size(44)
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
                    ticks: y_ticks,
                },
            )?;
        let log_x = self.log_x;
        let x_fmt = move |v: &f64| {
            let t = if log_x { 10f64.powf(*v) } else { *v };
            format!("{}×", fmt_num(t))
        };
        chart
            .configure_mesh()
            .x_desc("time per token vs one adapter")
            .y_desc("test loss (nats/token)")
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(font(13.0))
            .axis_desc_style(font(15.0))
            .bold_line_style(BLACK.mix(0.1))
            .light_line_style(TRANSPARENT)
            .draw()?;

        // Pareto front, cheapest first.
        let mut front: Vec<(f64, f64)> = (self.points.iter().zip(&self.pareto))
            .filter(|(_, on)| **on)
            .map(|(p, _)| (self.x(p.time_vs_one_expert), p.mean_loss))
            .collect();
        front.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart.draw_series(DashedLineSeries::new(
            front,
            6,
            4,
            POINT.mix(0.45).stroke_width(1),
        ))?;

        let bar = POINT.mix(0.8).stroke_width(1);
        let mut obstacles = Vec::new();
        for (p, on_front) in self.points.iter().zip(&self.pareto) {
            let x = self.x(p.time_vs_one_expert);
            let (lo, hi) = (
                p.mean_loss - p.standard_error,
                p.mean_loss + p.standard_error,
            );
            chart.draw_series([PathElement::new(vec![(x, lo), (x, hi)], bar)])?;
            for y in [lo, hi] {
                let cap = EmptyElement::at((x, y)) + PathElement::new(vec![(-4, 0), (4, 0)], bar);
                chart.draw_series([cap])?;
            }
            let marker = if *on_front {
                POINT.filled()
            } else {
                WHITE.filled()
            };
            chart.draw_series([Circle::new((x, p.mean_loss), MARKER, marker)])?;
            chart.draw_series([Circle::new((x, p.mean_loss), MARKER, POINT.stroke_width(2))])?;

            let (cx, cy) = chart.backend_coord(&(x, p.mean_loss));
            let (_, top) = chart.backend_coord(&(x, hi));
            let (_, bottom) = chart.backend_coord(&(x, lo));
            obstacles.push(Bounds {
                x0: cx - MARKER - 1,
                y0: cy - MARKER - 1,
                x1: cx + MARKER + 1,
                y1: cy + MARKER + 1,
            });
            obstacles.push(Bounds {
                x0: cx - 4,
                y0: top - 1,
                x1: cx + 4,
                y1: bottom + 1,
            });
        }

        // Labels: each takes the first of a few spots around its marker that hits nothing.
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let frame = Bounds {
            x0: xs.start,
            y0: ys.start,
            x1: xs.end,
            y1: ys.end,
        };
        let style = font(LABEL_FONT)
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Top));
        let mut order: Vec<(usize, (i32, i32))> = (self.points.iter().enumerate())
            .map(|(i, p)| {
                (
                    i,
                    chart.backend_coord(&(self.x(p.time_vs_one_expert), p.mean_loss)),
                )
            })
            .collect();
        order.sort_by_key(|(_, (x, y))| (*x, *y));
        for (i, centre) in order {
            let label = &self.labels[i];
            let size = text_size(label, &font(LABEL_FONT))?;
            let spot = place_label(centre, size, &obstacles, &frame);
            if let Some((start, end)) = leader(centre, &spot) {
                root.draw(&PathElement::new(
                    vec![start, end],
                    BLACK.mix(0.4).stroke_width(1),
                ))?;
            }
            root.draw_text(label, &style, (spot.x0, spot.y0))?;
            obstacles.push(spot);
        }
        Ok(())
    }
}

/// Where to put a `(w, h)` label for the marker at `centre`: the nearest of many candidate
/// spots around it (right of the marker preferred) that overlaps no obstacle and stays inside
/// `frame`, else the one that overlaps least.
pub(crate) fn place_label(
    (cx, cy): (i32, i32),
    (w, h): (i32, i32),
    obstacles: &[Bounds],
    frame: &Bounds,
) -> Bounds {
    let gap = MARKER + 3;
    let mut candidates = vec![
        (cx + gap, cy - h / 2),         // right
        (cx + gap - 2, cy - h - 2),     // upper right
        (cx + gap - 2, cy + 2),         // lower right
        (cx - gap - w, cy - h / 2),     // left
        (cx - gap - w + 2, cy - h - 2), // upper left
        (cx - gap - w + 2, cy + 2),     // lower left
        (cx - w / 2, cy - gap - h),     // above
        (cx - w / 2, cy + gap),         // below
    ];
    // Farther away, up and down in label-height steps: these get a leader line.
    let mut far = Vec::new();
    for dx in [gap + 14, gap + 40] {
        for step in 0..=8 {
            for sign in [-1, 1] {
                let dy = sign * step * (h + 2);
                far.push((cx + dx, cy - h / 2 + dy));
                far.push((cx - dx - w, cy - h / 2 + dy));
            }
        }
    }
    let distance = |&(x, y): &(i32, i32)| {
        let (bx, by) = (x + w / 2 - cx, y + h / 2 - cy);
        let d = ((bx * bx + by * by) as f64).sqrt();
        if x < cx {
            d * 1.2 // prefer the right side
        } else {
            d
        }
    };
    far.sort_by(|a, b| distance(a).total_cmp(&distance(b)));
    candidates.extend(far);

    let mut best: Option<(i64, Bounds)> = None;
    for (x, y) in candidates {
        let spot = Bounds {
            x0: x,
            y0: y,
            x1: x + w,
            y1: y + h,
        };
        let cost: i64 =
            obstacles.iter().map(|o| spot.overlap(o)).sum::<i64>() + 4 * spot.outside(frame);
        if cost == 0 {
            return spot;
        }
        if best.is_none_or(|(c, _)| cost < c) {
            best = Some((cost, spot));
        }
    }
    best.map_or(
        Bounds {
            x0: cx + gap,
            y0: cy - h / 2,
            x1: cx + gap + w,
            y1: cy + h / 2,
        },
        |(_, spot)| spot,
    )
}

/// A leader line from the marker at `(x, y)` to the nearest point of its label `spot`, when
/// the label is too far away to read as the marker's own.
fn leader((x, y): (i32, i32), spot: &Bounds) -> Option<((i32, i32), (i32, i32))> {
    let end = (x.clamp(spot.x0, spot.x1), y.clamp(spot.y0, spot.y1));
    let (dx, dy) = ((end.0 - x) as f64, (end.1 - y) as f64);
    let length = (dx * dx + dy * dy).sqrt();
    if length <= (MARKER + 7) as f64 {
        return None;
    }
    let r = (MARKER + 2) as f64 / length;
    let start = (x + (dx * r).round() as i32, y + (dy * r).round() as i32);
    Some((start, end))
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// `[lo, hi]`, or a range of width `fallback` centred on it when it is a single value.
fn widen(lo: f64, hi: f64, fallback: f64) -> (f64, f64) {
    if hi > lo {
        (lo, hi)
    } else {
        (lo - fallback / 2.0, hi + fallback / 2.0)
    }
}
