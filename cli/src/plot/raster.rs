//! PNG output, supersampled: the figure is drawn at `FACTOR`× on an in-memory bitmap and
//! box-filtered down.
//!
//! plotters' bitmap backend draws aliased lines and, with the `ab_glyph` font backend,
//! places each glyph at a whole pixel and ignores its side bearing, so small text comes out
//! with colliding letters ("Tr" in "Translate") and raised full stops. Drawing at 3× and
//! averaging cuts those errors to a third of a pixel and anti-aliases every edge.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use plotters::style::FontDesc;
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};

use super::render::Figure;

/// How many pixels a side each output pixel is drawn with.
const FACTOR: u32 = 3;

/// Draws `figure` into the PNG file `path` at `figure.size()`.
pub(crate) fn write_png<F: Figure>(figure: &F, path: &Path) -> Result<()> {
    let (w, h) = figure.size();
    let (bw, bh) = (w * FACTOR, h * FACTOR);
    let mut big = vec![255u8; bw as usize * bh as usize * 3];
    {
        let backend = Supersampled {
            inner: BitMapBackend::with_buffer(&mut big, (bw, bh)),
        };
        let root = backend.into_drawing_area();
        root.fill(&WHITE)?;
        figure.render(&root)?;
        root.present()?;
    }
    let small = downsample(&big, (w, h));
    let mut out = BitMapBackend::new(path, (w, h));
    out.blit_bitmap((0, 0), (w, h), &small)?;
    out.present()?;
    Ok(())
}

/// Averages each `FACTOR × FACTOR` block of the RGB buffer `big` into one pixel.
///
/// Written as plain index loops: this runs over every large pixel, and stays quick even in
/// an unoptimised build.
fn downsample(big: &[u8], (w, h): (u32, u32)) -> Vec<u8> {
    let (k, w, h) = (FACTOR as usize, w as usize, h as usize);
    let row_len = w * k * 3;
    let n = (k * k) as u32;
    let mut small = vec![0u8; w * h * 3];
    let mut sums = vec![0u32; w * 3];
    for y in 0..h {
        sums.fill(0);
        for big_row in big[y * k * row_len..(y + 1) * k * row_len].chunks_exact(row_len) {
            let mut i = 0;
            let mut out = 0;
            while out < w * 3 {
                // `k` pixels of the large row fold into one output pixel.
                let mut j = 0;
                while j < k {
                    sums[out] += u32::from(big_row[i]);
                    sums[out + 1] += u32::from(big_row[i + 1]);
                    sums[out + 2] += u32::from(big_row[i + 2]);
                    i += 3;
                    j += 1;
                }
                out += 3;
            }
        }
        let dst = &mut small[y * w * 3..(y + 1) * w * 3];
        for (d, s) in dst.iter_mut().zip(&sums) {
            *d = ((s + n / 2) / n) as u8;
        }
    }
    small
}

/// A backend of the figure's size that draws everything `FACTOR`× larger on `inner`.
struct Supersampled<'a> {
    inner: BitMapBackend<'a>,
}

/// A style with its stroke `FACTOR`× wider.
struct Wide<'s, S>(&'s S);

impl<S: BackendStyle> BackendStyle for Wide<'_, S> {
    fn color(&self) -> BackendColor {
        self.0.color()
    }

    fn stroke_width(&self) -> u32 {
        self.0.stroke_width() * FACTOR
    }
}

type Error<'a> = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

const K: i32 = FACTOR as i32;

/// Centre of pixel `p` on the large bitmap.
fn centre(p: BackendCoord) -> BackendCoord {
    (p.0 * K + K / 2, p.1 * K + K / 2)
}

impl<'a> Supersampled<'a> {
    /// Fills the large-bitmap rectangle `[x0, x1) × [y0, y1)`.
    fn fill(
        &mut self,
        (x0, y0): BackendCoord,
        (x1, y1): BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Error<'a>>> {
        if x1 <= x0 || y1 <= y0 {
            return Ok(());
        }
        self.inner.draw_rect((x0, y0), (x1, y1), &color, true)
    }
}

impl<'a> DrawingBackend for Supersampled<'a> {
    type ErrorType = Error<'a>;

    fn get_size(&self) -> (u32, u32) {
        let (w, h) = self.inner.get_size();
        (w / FACTOR, h / FACTOR)
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        p: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.fill((p.0 * K, p.1 * K), (p.0 * K + K, p.1 * K + K), color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let t = (style.stroke_width() * FACTOR) as i32;
        if from.1 == to.1 || from.0 == to.0 {
            // Axis-aligned: an exact band, so grid lines and cell borders stay crisp.
            let (a, b) = (centre(from), centre(to));
            let (x0, x1) = (a.0.min(b.0), a.0.max(b.0));
            let (y0, y1) = (a.1.min(b.1), a.1.max(b.1));
            let (x0, x1, y0, y1) = if from.1 == to.1 {
                (x0 - K / 2, x1 + K - K / 2, y0 - t / 2, y0 - t / 2 + t)
            } else {
                (x0 - t / 2, x0 - t / 2 + t, y0 - K / 2, y1 + K - K / 2)
            };
            return self.fill((x0, y0), (x1, y1), style.color());
        }
        self.inner.draw_line(centre(from), centre(to), &Wide(style))
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let (x0, y0) = (
            upper_left.0.min(bottom_right.0) * K,
            upper_left.1.min(bottom_right.1) * K,
        );
        let (x1, y1) = (
            upper_left.0.max(bottom_right.0) * K,
            upper_left.1.max(bottom_right.1) * K,
        );
        let color = style.color();
        if fill {
            // The bitmap backend fills [upper_left, bottom_right) (SVG does the same).
            return self.fill((x0, y0), (x1, y1), color);
        }
        // An outline runs through pixels x0..=x1, y0..=y1.
        let t = (style.stroke_width() * FACTOR) as i32;
        let (x1, y1) = (x1 + K, y1 + K);
        self.fill((x0, y0), (x1, y0 + t), color)?;
        self.fill((x0, y1 - t), (x1, y1), color)?;
        self.fill((x0, y0 + t), (x0 + t, y1 - t), color)?;
        self.fill((x1 - t, y0 + t), (x1, y1 - t), color)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let points: Vec<BackendCoord> = path.into_iter().map(centre).collect();
        self.inner.draw_path(points, &Wide(style))
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner
            .draw_circle(centre(center), radius * FACTOR, &Wide(style), fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let points: Vec<BackendCoord> = vert.into_iter().map(centre).collect();
        self.inner.fill_polygon(points, style)
    }

    fn draw_text<TStyle: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let font = FontDesc::new(style.family(), style.size() * FACTOR as f64, style.style())
            .transform(style.transform());
        let large = TextStyle {
            font,
            color: style.color(),
            pos: style.anchor(),
        };
        self.inner.draw_text(text, &large, (pos.0 * K, pos.1 * K))
    }
}
