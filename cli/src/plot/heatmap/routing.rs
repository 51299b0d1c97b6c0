//! `routing`: one heat-map panel per layer, experts as rows and tokens as columns.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::super::render::{bold, fmt_num, printable, truncate, visible_token, Figure, MAX_SIDE};
use super::super::RoutingMap;
use super::{
    check_range, colour_bar, font_for, heading, heading_width, label_extent, names, sequential,
    Grid, BAR_MIN_H, BAR_W, MARGIN, TITLE_H,
};

/// Height of a panel's title.
const PANEL_TITLE_H: i32 = 22;
/// Space between panels.
const GAP: i32 = 18;
/// Largest cell width (a token) and height (an expert).
const CW_MAX: i32 = 28;
const CH_MAX: i32 = 20;
/// Cells at least this large are "readable"; layouts are ranked by this first.
const READABLE: i32 = 12;

/// Where the panels go and how large the cells and labels are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    /// Panels per row of the grid (1: stacked vertically).
    pub(crate) cols: usize,
    /// Rows of panels.
    pub(crate) rows: usize,
    /// Cell width (one token) and height (one expert), in pixels.
    pub(crate) cw: i32,
    pub(crate) ch: i32,
    /// Font sizes of expert (row) and token (column) labels.
    pub(crate) row_font: f64,
    pub(crate) col_font: f64,
    /// Width of the expert labels and height of the token labels.
    pub(crate) label_w: i32,
    pub(crate) token_h: i32,
    /// Token labels under every panel (else only under the lowest panel of each column).
    pub(crate) tokens_every_row: bool,
    /// Size of the picture.
    pub(crate) width: u32,
    pub(crate) height: u32,
}

/// A validated routing figure.
pub(crate) struct Routing<'a> {
    map: &'a RoutingMap,
    title: String,
    tokens: Vec<String>,
    experts: Vec<String>,
    vmax: f64,
    layout: Layout,
}

impl<'a> Routing<'a> {
    /// Checks shapes and that every weight is in [0, 1], then lays the panels out.
    pub(crate) fn new(map: &'a RoutingMap) -> Result<Self> {
        let (t, e) = (map.tokens.len(), map.experts.len());
        if map.layers.is_empty() || t == 0 || e == 0 {
            bail!(
                "nothing to draw: {} layers, {t} tokens, {e} experts",
                map.layers.len()
            );
        }
        let mut vmax: f64 = 0.0;
        for layer in &map.layers {
            if layer.weights.len() != t {
                bail!(
                    "layer {:?} has weights for {} tokens, but there are {t} tokens",
                    layer.layer,
                    layer.weights.len()
                );
            }
            for (i, row) in layer.weights.iter().enumerate() {
                if row.len() != e {
                    bail!(
                        "layer {:?}, token {i}: {} weights for {e} experts",
                        layer.layer,
                        row.len()
                    );
                }
                for (j, w) in row.iter().enumerate() {
                    check_range(*w, (0.0, 1.0), || {
                        format!("layer {:?}, token {i}, expert {j}: the weight", layer.layer)
                    })?;
                    vmax = vmax.max(*w);
                }
            }
        }
        let vmax = if vmax > 0.0 { vmax.min(1.0) } else { 1.0 };
        let tokens: Vec<String> = map
            .tokens
            .iter()
            .map(|s| truncate(&visible_token(s), 12))
            .collect();
        let experts = names(&map.experts, 20);
        let title = truncate(&printable(&map.title), 90);
        let min_width = heading_width(&title, &note(vmax))?;
        let layout = layout(map.layers.len(), &experts, &tokens, min_width)?;
        Ok(Self {
            map,
            title,
            tokens,
            experts,
            vmax,
            layout,
        })
    }

    /// Top-left corner of panel `i`'s cells.
    fn panel_origin(&self, i: usize) -> (i32, i32) {
        let l = &self.layout;
        let (r, c) = ((i / l.cols) as i32, (i % l.cols) as i32);
        let panel_w = self.tokens.len() as i32 * l.cw;
        let panel_h = self.experts.len() as i32 * l.ch;
        let below = if l.tokens_every_row { l.token_h } else { 0 };
        let x = MARGIN + l.label_w + c * (panel_w + GAP);
        let y = TITLE_H + r * (PANEL_TITLE_H + panel_h + below + GAP) + PANEL_TITLE_H;
        (x, y)
    }
}

fn note(vmax: f64) -> String {
    format!(
        "rows: experts · columns: tokens · colour: routing weight, 0 (white) to {} (max)",
        fmt_num(vmax)
    )
}

/// Picks the grid (panels per row, token labels under every panel or not) that makes the
/// cells largest, preferring readable cells, then fewer columns, then labels on every panel,
/// and sizes the picture from it (at most `MAX_SIDE` on a side unless the counts are huge).
pub(crate) fn layout(
    layers: usize,
    experts: &[String],
    tokens: &[String],
    min_width: i32,
) -> Result<Layout> {
    let (e, t) = (experts.len() as i32, tokens.len() as i32);
    let max = MAX_SIDE as i32;
    let mut best: Option<((i32, i32, bool, i32), Layout)> = None;
    for cols in 1..=layers {
        let rows = layers.div_ceil(cols);
        for every in [true, false] {
            if !every && rows == 1 {
                continue;
            }
            let (c, r) = (cols as i32, rows as i32);
            let cells = |label_w: i32, token_h: i32| {
                let avail_w = max - 2 * MARGIN - label_w - (c - 1) * GAP - BAR_W;
                let label_rows = if every { r } else { 1 };
                let avail_h = max
                    - TITLE_H
                    - MARGIN
                    - r * PANEL_TITLE_H
                    - (r - 1) * GAP
                    - label_rows * token_h;
                let cw = (avail_w / (c * t)).clamp(1, CW_MAX);
                let ch = (avail_h / (r * e)).clamp(1, CH_MAX);
                (cw, ch)
            };
            // Measure with the largest font, shrink the fonts to the cells, measure again.
            let (cw, ch) = cells(label_extent(experts, 13.0)?, label_extent(tokens, 13.0)?);
            let (row_font, col_font) = (font_for(ch), font_for(cw));
            let (label_w, token_h) = (
                label_extent(experts, row_font)?,
                label_extent(tokens, col_font)?,
            );
            let (cw, ch) = cells(label_w, token_h);
            let label_rows = if every { r } else { 1 };
            let width = (2 * MARGIN + label_w + c * t * cw + (c - 1) * GAP + BAR_W).max(min_width);
            let height = (TITLE_H
                + r * (PANEL_TITLE_H + e * ch)
                + (r - 1) * GAP
                + label_rows * token_h
                + MARGIN)
                .max(TITLE_H + PANEL_TITLE_H + BAR_MIN_H + 2 * MARGIN);
            let candidate = Layout {
                cols,
                rows,
                cw,
                ch,
                row_font,
                col_font,
                label_w,
                token_h,
                tokens_every_row: every,
                width: width as u32,
                height: height as u32,
            };
            let smallest = cw.min(ch);
            let key = (smallest.min(READABLE), -c, every, smallest);
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, candidate));
            }
        }
    }
    best.map(|(_, l)| l)
        .ok_or_else(|| anyhow::anyhow!("no layers to lay out"))
}

impl Figure for Routing<'_> {
    const NAME: &'static str = "routing";

    fn size(&self) -> (u32, u32) {
        (self.layout.width, self.layout.height)
    }

    fn render<DB>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        let l = &self.layout;
        heading(root, &self.title, &note(self.vmax))?;
        let n = self.map.layers.len();
        let (t, e) = (self.tokens.len(), self.experts.len());
        let panel_title = bold(13.0)
            .color(&BLACK)
            .pos(Pos::new(HPos::Left, VPos::Bottom));
        for (i, layer) in self.map.layers.iter().enumerate() {
            let (x, y) = self.panel_origin(i);
            let grid = Grid {
                x,
                y,
                cw: l.cw,
                ch: l.ch,
                rows: e,
                cols: t,
            };
            let layer_max = layer
                .weights
                .iter()
                .flatten()
                .fold(0.0f64, |a, b| a.max(*b));
            let name = format!(
                "{}  (max {})",
                truncate(&printable(&layer.layer), 40),
                fmt_num(layer_max)
            );
            root.draw_text(&name, &panel_title, (x, y - 5))?;
            grid.cells(root, |r, c| sequential(layer.weights[c][r] / self.vmax))?;
            if i % l.cols == 0 {
                grid.row_labels(root, &self.experts, l.row_font)?;
            }
            // Token labels under this panel if every row has them, or if no panel is below.
            if l.tokens_every_row || i + l.cols >= n {
                grid.col_labels(root, &self.tokens, l.col_font)?;
            }
        }
        let (x, y) = self.panel_origin(0);
        let bar_x = x + l.cols.min(n) as i32 * (t as i32 * l.cw + GAP) - GAP + 18;
        let bar_h = (e as i32 * l.ch).clamp(BAR_MIN_H, 260);
        let ticks = [0.0, self.vmax / 2.0, self.vmax];
        colour_bar(
            root,
            (bar_x, y, bar_h),
            (0.0, self.vmax),
            &ticks,
            |v| sequential(v / self.vmax),
            "weight",
        )?;
        Ok(())
    }
}
