//! Heat maps: `routing` (routing weights, one panel per layer) and `similarity` (cosine
//! similarity of the experts' updates, grouped by cluster), and the cell-grid, label and
//! colour-bar drawing they share.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontTransform;

use super::render::{bold, finite, fmt_num, font, max_text_width, printable, text_size, truncate};

pub(super) mod routing;
mod similarity;

pub(crate) use routing::Routing;
#[cfg(test)]
pub(crate) use similarity::cluster_order;
pub(crate) use similarity::Similarity;

/// Outer margin of a heat-map figure.
const MARGIN: i32 = 14;
/// Height of the figure title and its one-line note.
const TITLE_H: i32 = 58;
/// Width reserved on the right for the colour bar and its tick labels.
const BAR_W: i32 = 96;
/// Smallest colour-bar height; figures are at least tall enough to hold it.
const BAR_MIN_H: i32 = 80;
/// Largest label font; labels shrink with the cells down to `MIN_FONT`.
const MAX_FONT: f64 = 13.0;
const MIN_FONT: f64 = 8.0;
const GREY: RGBColor = RGBColor(90, 90, 90);

/// White → dark blue, for `t` in [0, 1] (ColorBrewer "Blues").
pub(crate) fn sequential(t: f64) -> RGBColor {
    const STOPS: [[u8; 3]; 5] = [
        [255, 255, 255],
        [198, 219, 239],
        [107, 174, 214],
        [33, 113, 181],
        [8, 48, 107],
    ];
    interpolate(&STOPS, t)
}

/// Blue (-1) → white (0) → red (+1) ("RdBu" reversed).
pub(crate) fn diverging(v: f64) -> RGBColor {
    const STOPS: [[u8; 3]; 7] = [
        [33, 102, 172],
        [103, 169, 207],
        [209, 229, 240],
        [255, 255, 255],
        [253, 219, 199],
        [239, 138, 98],
        [178, 24, 43],
    ];
    interpolate(&STOPS, (v + 1.0) / 2.0)
}

fn interpolate(stops: &[[u8; 3]], t: f64) -> RGBColor {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let pos = t * (stops.len() - 1) as f64;
    let i = (pos.floor() as usize).min(stops.len() - 2);
    let f = pos - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (stops[i], stops[i + 1]);
    RGBColor(mix(a[0], b[0]), mix(a[1], b[1]), mix(a[2], b[2]))
}

/// Label font size for cells `cell` pixels tall (or wide, for rotated labels).
fn font_for(cell: i32) -> f64 {
    (cell as f64 + 1.0).clamp(MIN_FONT, MAX_FONT)
}

/// Every how many cells a label fits, so labels in small cells do not overlap.
fn stride(cell: i32, size: f64) -> usize {
    let needed = size * 0.8;
    if cell as f64 >= needed {
        1
    } else {
        (needed / cell.max(1) as f64).ceil() as usize
    }
}

/// A block of `rows × cols` cells, each `cw × ch` pixels, with its top-left corner at (x, y).
#[derive(Debug, Clone, Copy)]
struct Grid {
    x: i32,
    y: i32,
    cw: i32,
    ch: i32,
    rows: usize,
    cols: usize,
}

impl Grid {
    fn width(&self) -> i32 {
        self.cw * self.cols as i32
    }

    fn height(&self) -> i32 {
        self.ch * self.rows as i32
    }

    /// Fills every cell with `colour(row, col)` and frames the block.
    fn cells<DB>(
        &self,
        root: &DrawingArea<DB, Shift>,
        colour: impl Fn(usize, usize) -> RGBColor,
    ) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        for r in 0..self.rows {
            for c in 0..self.cols {
                let x = self.x + c as i32 * self.cw;
                let y = self.y + r as i32 * self.ch;
                let corners = [(x, y), (x + self.cw, y + self.ch)];
                root.draw(&Rectangle::new(corners, colour(r, c).filled()))?;
            }
        }
        let frame = [
            (self.x, self.y),
            (self.x + self.width(), self.y + self.height()),
        ];
        root.draw(&Rectangle::new(frame, BLACK.mix(0.5)))?;
        Ok(())
    }

    /// Row labels, right-aligned just left of the block.
    fn row_labels<DB>(
        &self,
        root: &DrawingArea<DB, Shift>,
        labels: &[String],
        size: f64,
    ) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        let style = font(size)
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (r, label) in labels.iter().enumerate().step_by(stride(self.ch, size)) {
            let y = self.y + r as i32 * self.ch + self.ch / 2;
            root.draw_text(label, &style, (self.x - 5, y))?;
        }
        Ok(())
    }

    /// Column labels, rotated to read upwards, hanging below the block.
    fn col_labels<DB>(
        &self,
        root: &DrawingArea<DB, Shift>,
        labels: &[String],
        size: f64,
    ) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        let style = font(size)
            .color(&BLACK)
            .pos(Pos::new(HPos::Right, VPos::Center))
            .transform(FontTransform::Rotate270);
        for (c, label) in labels.iter().enumerate().step_by(stride(self.cw, size)) {
            let x = self.x + c as i32 * self.cw + self.cw / 2;
            root.draw_text(label, &style, (x, self.y + self.height() + 5))?;
        }
        Ok(())
    }
}

/// A vertical colour bar at (x, y), `h` pixels tall, for values `lo..=hi`, ticks labelled.
fn colour_bar<DB>(
    root: &DrawingArea<DB, Shift>,
    (x, y, h): (i32, i32, i32),
    (lo, hi): (f64, f64),
    ticks: &[f64],
    colour: impl Fn(f64) -> RGBColor,
    caption: &str,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    const W: i32 = 14;
    let caption_style = font(12.0)
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Bottom));
    root.draw_text(caption, &caption_style, (x, y - 6))?;
    for i in 0..h {
        let v = hi - (hi - lo) * i as f64 / (h - 1).max(1) as f64;
        root.draw(&Rectangle::new(
            [(x, y + i), (x + W, y + i + 1)],
            colour(v).filled(),
        ))?;
    }
    root.draw(&Rectangle::new([(x, y), (x + W, y + h)], BLACK.mix(0.5)))?;
    let style = font(12.0)
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for &t in ticks {
        let ty = y + ((hi - t) / (hi - lo) * (h - 1) as f64).round() as i32;
        root.draw(&PathElement::new(vec![(x + W, ty), (x + W + 4, ty)], BLACK))?;
        root.draw_text(&fmt_num(t), &style, (x + W + 7, ty))?;
    }
    Ok(())
}

/// Draws the figure title and a grey note under it, left-aligned at the margin.
fn heading<DB>(root: &DrawingArea<DB, Shift>, title: &str, note: &str) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let top_left = Pos::new(HPos::Left, VPos::Top);
    root.draw_text(title, &bold(18.0).color(&BLACK).pos(top_left), (MARGIN, 10))?;
    root.draw_text(note, &font(12.0).color(&GREY).pos(top_left), (MARGIN, 36))?;
    Ok(())
}

/// Width needed to show the heading in full.
fn heading_width(title: &str, note: &str) -> Result<i32> {
    let title_w = text_size(title, &bold(18.0))?.0;
    let note_w = text_size(note, &font(12.0))?.0;
    Ok(title_w.max(note_w) + 2 * MARGIN)
}

/// Fails unless every value is finite and within `[lo, hi]` (up to rounding).
fn check_range(v: f64, (lo, hi): (f64, f64), what: impl Fn() -> String) -> Result<()> {
    finite(v, &what)?;
    if v < lo - 1e-6 || v > hi + 1e-6 {
        bail!("{} is {v}, outside [{lo}, {hi}]", what());
    }
    Ok(())
}

/// Labels with control characters made visible and long names cut.
fn names(labels: &[String], max: usize) -> Vec<String> {
    labels
        .iter()
        .map(|s| truncate(&printable(s), max))
        .collect()
}

/// Widest label at `size`, plus room for the gap to the cells.
fn label_extent(labels: &[String], size: f64) -> Result<i32> {
    Ok(max_text_width(labels, &font(size))? + 10)
}
