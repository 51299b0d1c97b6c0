//! `similarity`: the experts' cosine-similarity matrix, experts grouped by cluster.

use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::super::render::{font, text_size, Figure, MAX_SIDE};
use super::super::SimilarityMatrix;
use super::{
    check_range, colour_bar, diverging, font_for, heading, heading_width, label_extent, names,
    Grid, BAR_MIN_H, BAR_W, GREY, MARGIN, TITLE_H,
};

/// Height of the strip above the matrix that names the clusters.
const CLUSTER_H: i32 = 20;
const CELL_MAX: i32 = 30;
const TITLE: &str = "Similarity of the experts' updates (cosine)";

/// Indices of the experts in drawing order: grouped by cluster (clusters in increasing id),
/// keeping the input order within a cluster. A permutation of `0..clusters.len()`.
pub(crate) fn cluster_order(clusters: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..clusters.len()).collect();
    order.sort_by_key(|&i| clusters[i]); // stable
    order
}

/// A validated similarity figure.
pub(crate) struct Similarity<'a> {
    matrix: &'a SimilarityMatrix,
    /// `order[k]`: the expert drawn k-th.
    order: Vec<usize>,
    /// Names in drawing order.
    names: Vec<String>,
    cell: i32,
    font: f64,
    label_w: i32,
    width: u32,
    height: u32,
}

impl<'a> Similarity<'a> {
    /// Checks that the matrix is square, matches the names and clusters, and holds values
    /// in [-1, 1]; then sizes the cells from the number of experts.
    pub(crate) fn new(matrix: &'a SimilarityMatrix) -> Result<Self> {
        let n = matrix.experts.len();
        if n == 0 {
            bail!("no experts");
        }
        if matrix.similarity.len() != n {
            bail!(
                "the matrix has {} rows for {n} experts",
                matrix.similarity.len()
            );
        }
        for (i, row) in matrix.similarity.iter().enumerate() {
            if row.len() != n {
                bail!(
                    "row {i} of the matrix has {} values for {n} experts: it must be square",
                    row.len()
                );
            }
            for (j, v) in row.iter().enumerate() {
                check_range(*v, (-1.0, 1.0), || format!("similarity[{i}][{j}]"))?;
            }
        }
        if matrix.clusters.len() != n {
            bail!("{} cluster ids for {n} experts", matrix.clusters.len());
        }
        let order = cluster_order(&matrix.clusters);
        let all = names(&matrix.experts, 20);
        let names: Vec<String> = order.iter().map(|&i| all[i].clone()).collect();

        let max = MAX_SIDE as i32;
        let cell_for = |label_w: i32| {
            let by_w = (max - 2 * MARGIN - label_w - BAR_W) / n as i32;
            let by_h = (max - TITLE_H - CLUSTER_H - MARGIN - label_w) / n as i32;
            by_w.min(by_h).clamp(2, CELL_MAX)
        };
        let font = font_for(cell_for(label_extent(&names, 13.0)?));
        let label_w = label_extent(&names, font)?;
        let cell = cell_for(label_w);
        let side = n as i32 * cell;
        let min_width = heading_width(TITLE, &note(matrix))?;
        let width = (2 * MARGIN + label_w + side + BAR_W).max(min_width);
        let height = (TITLE_H + CLUSTER_H + side + label_w + MARGIN)
            .max(TITLE_H + CLUSTER_H + BAR_MIN_H + 2 * MARGIN);
        Ok(Self {
            matrix,
            order,
            names,
            cell,
            font,
            label_w,
            width: width as u32,
            height: height as u32,
        })
    }

    /// Runs of equal cluster id in drawing order: (cluster, first index, end index).
    fn blocks(&self) -> Vec<(usize, usize, usize)> {
        let mut blocks: Vec<(usize, usize, usize)> = Vec::new();
        for (k, &i) in self.order.iter().enumerate() {
            let c = self.matrix.clusters[i];
            match blocks.last_mut() {
                Some(last) if last.0 == c => last.2 = k + 1,
                _ => blocks.push((c, k, k + 1)),
            }
        }
        blocks
    }
}

fn note(matrix: &SimilarityMatrix) -> String {
    let mut ids = matrix.clusters.clone();
    ids.sort_unstable();
    ids.dedup();
    format!(
        "{} experts in {} clusters, grouped by cluster (lines separate clusters) · blue −1, white 0, red +1",
        matrix.experts.len(),
        ids.len()
    )
}

impl Figure for Similarity<'_> {
    const NAME: &'static str = "similarity";

    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn render<DB>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        heading(root, TITLE, &note(self.matrix))?;
        let n = self.order.len();
        let grid = Grid {
            x: MARGIN + self.label_w,
            y: TITLE_H + CLUSTER_H,
            cw: self.cell,
            ch: self.cell,
            rows: n,
            cols: n,
        };
        let m = &self.matrix.similarity;
        grid.cells(root, |r, c| diverging(m[self.order[r]][self.order[c]]))?;
        grid.row_labels(root, &self.names, self.font)?;
        grid.col_labels(root, &self.names, self.font)?;

        // Cluster boundaries and names.
        let side = n as i32 * self.cell;
        let line = BLACK.stroke_width(if self.cell >= 14 { 2 } else { 1 });
        let label_style = font(11.0)
            .color(&GREY)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        for (k, &(cluster, start, end)) in self.blocks().iter().enumerate() {
            let a = start as i32 * self.cell;
            let b = end as i32 * self.cell;
            if k > 0 {
                root.draw(&PathElement::new(
                    vec![(grid.x + a, grid.y), (grid.x + a, grid.y + side)],
                    line,
                ))?;
                root.draw(&PathElement::new(
                    vec![(grid.x, grid.y + a), (grid.x + side, grid.y + a)],
                    line,
                ))?;
            }
            let long = format!("cluster {cluster}");
            let text = [long, cluster.to_string()]
                .into_iter()
                .find(|t| text_size(t, &font(11.0)).is_ok_and(|(w, _)| w + 4 <= b - a));
            if let Some(text) = text {
                root.draw_text(&text, &label_style, (grid.x + (a + b) / 2, grid.y - 4))?;
            }
        }
        let bar_h = side.clamp(BAR_MIN_H, 260);
        let ticks = [-1.0, -0.5, 0.0, 0.5, 1.0];
        colour_bar(
            root,
            (grid.x + side + 18, grid.y, bar_h),
            (-1.0, 1.0),
            &ticks,
            diverging,
            "cosine",
        )?;
        Ok(())
    }
}
