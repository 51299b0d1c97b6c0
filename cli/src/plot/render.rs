//! Shared drawing machinery: font registration, the "one figure, two backends" helper,
//! text measurement and clean-up, tick placement and number formatting.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontDesc, FontFamily, FontStyle};

/// Largest side of any figure, in pixels.
pub(crate) const MAX_SIDE: u32 = 1400;

/// Registers the embedded DejaVu Sans (regular and bold) as plotters' `sans-serif` family.
///
/// plotters' `ab_glyph` text backend knows no system fonts: every family used must be
/// registered first, and both backends need it (the SVG backend measures text with it).
/// Runs once per process; later calls only report the outcome of the first.
pub(crate) fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if !ok {
        bail!("cannot load the embedded DejaVu Sans font");
    }
    Ok(())
}

/// A figure that can be drawn on any plotters backend. The same `render` runs for the SVG
/// and for the PNG file, so every figure's drawing code exists once.
pub(crate) trait Figure {
    /// File stem and name used in error messages: `tradeoff`, `greedy`, ...
    const NAME: &'static str;

    /// Size of the picture in pixels (the PNG's width and height).
    fn size(&self) -> (u32, u32);

    /// Draws the figure on `root`, which is `size()` large and already white.
    fn render<DB>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static;
}

/// Draws `figure` into `dir/NAME.svg` and `dir/NAME.png`; returns both paths.
pub(crate) fn write_both<F: Figure>(figure: &F, dir: &Path) -> Result<Vec<PathBuf>> {
    let size = figure.size();
    let svg = dir.join(format!("{}.svg", F::NAME));
    present(SVGBackend::new(&svg, size), figure).with_context(|| {
        format!(
            "cannot draw the `{}` figure into {}",
            F::NAME,
            svg.display()
        )
    })?;
    let png = dir.join(format!("{}.png", F::NAME));
    super::raster::write_png(figure, &png).with_context(|| {
        format!(
            "cannot draw the `{}` figure into {}",
            F::NAME,
            png.display()
        )
    })?;
    Ok(vec![svg, png])
}

fn present<DB, F>(backend: DB, figure: &F) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    F: Figure,
{
    let root = backend.into_drawing_area();
    root.fill(&WHITE)?;
    figure.render(&root)?;
    root.present()?;
    Ok(())
}

/// The regular sans-serif font at `size` (plotters' size: glyph height ≈ 0.7 × size).
pub(crate) fn font(size: f64) -> FontDesc<'static> {
    FontDesc::new(FontFamily::SansSerif, size, FontStyle::Normal)
}

/// The bold sans-serif font at `size`.
pub(crate) fn bold(size: f64) -> FontDesc<'static> {
    FontDesc::new(FontFamily::SansSerif, size, FontStyle::Bold)
}

/// Width and height in pixels of `text` set in `font`, unrotated. Needs [`register_fonts`].
pub(crate) fn text_size(text: &str, font: &FontDesc<'_>) -> Result<(i32, i32)> {
    let (w, h) = font
        .box_size(text)
        .map_err(|e| anyhow::anyhow!("cannot measure text {text:?}: {e}"))?;
    Ok((w as i32, h as i32))
}

/// Widest of `texts` in `font`, in pixels (0 when empty).
pub(crate) fn max_text_width(texts: &[String], font: &FontDesc<'_>) -> Result<i32> {
    let mut widest = 0;
    for text in texts {
        widest = widest.max(text_size(text, font)?.0);
    }
    Ok(widest)
}

/// `text` with control characters made visible (`\n` → `↵`, `\t` → `→`, others as `\xNN`),
/// so labels never carry characters that SVG forbids or fonts cannot show.
pub(crate) fn printable(text: &str) -> String {
    escape(text, false)
}

/// Like [`printable`], and a space is shown as `·` and an empty token as `∅`: for tokens,
/// whose leading spaces and newlines matter.
pub(crate) fn visible_token(text: &str) -> String {
    if text.is_empty() {
        return "∅".to_string();
    }
    escape(text, true)
}

fn escape(text: &str, show_space: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('↵'),
            '\t' => out.push('→'),
            '\r' => out.push_str("\\r"),
            ' ' if show_space => out.push('·'),
            c if c.is_control() => {
                let code = u32::from(c);
                if code <= 0xff {
                    out.push_str(&format!("\\x{code:02x}"));
                } else {
                    out.push_str(&format!("\\u{{{code:x}}}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// `text` cut to at most `max` characters, ending in `…` when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A number for a tick label or an annotation: about three significant digits, no
/// trailing zeros.
pub(crate) fn fmt_num(v: f64) -> String {
    let a = v.abs();
    let decimals = if a == 0.0 || a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else if a >= 0.01 {
        3
    } else {
        return format!("{v:.1e}");
    };
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if s == "-0" {
        s = "0".to_string();
    }
    s
}

/// At most about `max` round tick values (1, 2 or 5 × 10^k apart) inside `[lo, hi]`.
pub(crate) fn nice_ticks(lo: f64, hi: f64, max: usize) -> Vec<f64> {
    let span = hi - lo;
    if span.is_nan() || span <= 0.0 || !span.is_finite() || max == 0 {
        return vec![lo];
    }
    let raw = span / max as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// Tick values for a log axis on `[lo, hi]` (both > 0): 1-2-5 steps per decade, thinned to
/// powers of ten on wide ranges and thickened on narrow ones.
pub(crate) fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let within = |mantissas: &[f64]| -> Vec<f64> {
        let first = lo.log10().floor() as i32;
        let last = hi.log10().ceil() as i32;
        let mut ticks = Vec::new();
        for k in first..=last {
            for m in mantissas {
                let v = m * 10f64.powi(k);
                if v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9) {
                    ticks.push(v);
                }
            }
        }
        ticks
    };
    let ticks = within(&[1.0, 2.0, 5.0]);
    if ticks.len() > 10 {
        within(&[1.0])
    } else if ticks.len() < 4 {
        within(&[1.0, 1.5, 2.0, 3.0, 5.0, 7.0])
    } else {
        ticks
    }
}

/// Fails unless `v` is a finite number; `what` names it in the message.
pub(crate) fn finite(v: f64, what: impl FnOnce() -> String) -> Result<f64> {
    if !v.is_finite() {
        bail!("{} is {v}, not a finite number", what());
    }
    Ok(v)
}

/// A rectangle in backend pixels: left, top, right, bottom.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bounds {
    pub(crate) x0: i32,
    pub(crate) y0: i32,
    pub(crate) x1: i32,
    pub(crate) y1: i32,
}

impl Bounds {
    /// Pixels shared by `self` and `other`.
    pub(crate) fn overlap(&self, other: &Bounds) -> i64 {
        let w = (self.x1.min(other.x1) - self.x0.max(other.x0)).max(0) as i64;
        let h = (self.y1.min(other.y1) - self.y0.max(other.y0)).max(0) as i64;
        w * h
    }

    /// Pixels of `self` outside `frame`.
    pub(crate) fn outside(&self, frame: &Bounds) -> i64 {
        let area = ((self.x1 - self.x0) as i64) * ((self.y1 - self.y0) as i64);
        area - self.overlap(frame)
    }
}

/// A linear f64 axis on `lo..hi` whose ticks (and grid lines) are exactly `ticks`.
///
/// plotters' `WithKeyPoints<RangedCoordf64>` cannot take a label formatter, hence this.
pub(crate) struct Axis {
    pub(crate) lo: f64,
    pub(crate) hi: f64,
    pub(crate) ticks: Vec<f64>,
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, (from, to): (i32, i32)) -> i32 {
        let span = self.hi - self.lo;
        if span.is_nan() || span <= 0.0 {
            return (from + to) / 2;
        }
        let t = (v - self.lo) / span;
        from + ((to - from) as f64 * t).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}
