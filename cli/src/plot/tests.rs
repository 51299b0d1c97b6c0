//! Tests of the plot module: files written, picture sizes, text in the SVGs, validation
//! errors, the cluster ordering and the JSON form of `Figures`.

use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::heatmap::{cluster_order, Routing, Similarity};
use super::render::{self, Figure};
use super::{draw, CostPoint, Figures, GreedyCurve, LayerWeights, RoutingMap, SimilarityMatrix};

/// A fresh, empty directory under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("moerge-plot-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn point(label: &str, loss: f64, time: f64) -> CostPoint {
    CostPoint {
        label: label.to_string(),
        mean_loss: loss,
        standard_error: 0.02,
        passes_per_token: time.ceil(),
        time_vs_one_expert: time,
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn small_figures() -> Figures {
    let experts = vec![
        "alpha".to_string(),
        "bravo".into(),
        "charlie".into(),
        "delta".into(),
    ];
    let tokens = vec![
        "<s>".to_string(),
        "Hello".into(),
        " world".into(),
        "\n".into(),
        "!".into(),
    ];
    let layer = |name: &str, shift: usize| LayerWeights {
        layer: name.to_string(),
        weights: (0..tokens.len())
            .map(|t| {
                (0..experts.len())
                    .map(|e| if (t + shift) % 4 == e { 0.7 } else { 0.1 })
                    .collect()
            })
            .collect(),
    };
    Figures {
        tradeoff: vec![
            point("uniform merge", 2.1, 1.0),
            point("router top-2", 1.9, 2.0),
            point("ensemble", 1.8, 4.0),
        ],
        greedy: Some(GreedyCurve {
            order: experts.clone(),
            curve: vec![2.2, 2.0, 1.95, 1.94],
            full: 1.94,
            oracle: Some(1.9),
            base: None,
            active: 3,
            tolerance: 0.01,
        }),
        routing: Some(RoutingMap {
            title: "test prompt".to_string(),
            tokens: tokens.clone(),
            experts: experts.clone(),
            layers: vec![layer("layer_early", 0), layer("layer_late", 1)],
        }),
        similarity: Some(SimilarityMatrix {
            experts: experts.clone(),
            similarity: (0..4)
                .map(|i| {
                    (0..4)
                        .map(|j| {
                            if i == j {
                                1.0
                            } else {
                                -0.375 + 0.125 * (i + j) as f64
                            }
                        })
                        .collect()
                })
                .collect(),
            clusters: vec![1, 0, 1, 0],
        }),
    }
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = fs::read(path).unwrap();
    assert!(
        bytes.len() > 24,
        "{} is too short for a PNG",
        path.display()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} lacks the PNG signature",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

fn sorted_names(paths: impl IntoIterator<Item = PathBuf>) -> Vec<String> {
    let mut names: Vec<String> = paths
        .into_iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn draw_writes_all_eight_files_with_the_intended_sizes_and_text() {
    let scratch = Scratch::new("all");
    let figures = small_figures();
    let written = draw(&figures, &scratch.0).unwrap();

    let expected: Vec<String> = ["greedy", "routing", "similarity", "tradeoff"]
        .iter()
        .flat_map(|n| [format!("{n}.png"), format!("{n}.svg")])
        .collect();
    assert_eq!(sorted_names(written.clone()), expected);
    let on_disk = fs::read_dir(&scratch.0).unwrap().map(|e| e.unwrap().path());
    assert_eq!(sorted_names(on_disk), expected);

    render::register_fonts().unwrap();
    let intended = [
        (
            "tradeoff",
            super::tradeoff::Tradeoff::new(&figures.tradeoff)
                .unwrap()
                .size(),
        ),
        (
            "greedy",
            super::greedy::Greedy::new(figures.greedy.as_ref().unwrap())
                .unwrap()
                .size(),
        ),
        (
            "routing",
            Routing::new(figures.routing.as_ref().unwrap())
                .unwrap()
                .size(),
        ),
        (
            "similarity",
            Similarity::new(figures.similarity.as_ref().unwrap())
                .unwrap()
                .size(),
        ),
    ];
    assert_eq!(intended[0].1, (800, 500));
    for (name, size) in intended {
        let got = png_size(&scratch.0.join(format!("{name}.png")));
        assert_eq!(got, size, "{name}.png");
        assert!(
            size.0 >= 300 && size.1 >= 200 && size.0 <= 1400 && size.1 <= 1400,
            "{name}: {size:?}"
        );
        let svg = fs::read_to_string(scratch.0.join(format!("{name}.svg"))).unwrap();
        assert!(svg.contains("<svg"), "{name}.svg");
        assert!(
            svg.contains(&format!("width=\"{}\" height=\"{}\"", size.0, size.1)),
            "{name}.svg size"
        );
    }

    let svg = |name: &str| fs::read_to_string(scratch.0.join(format!("{name}.svg"))).unwrap();
    let has_text = |svg: &str, text: &str| svg.contains(&format!(">\n{text}\n</text>"));
    let tradeoff = svg("tradeoff");
    for label in [
        "uniform merge",
        "router top-2",
        "ensemble",
        "Loss vs inference cost",
    ] {
        assert!(has_text(&tradeoff, label), "tradeoff.svg lacks {label:?}");
    }
    assert!(has_text(&tradeoff, "time per token vs one adapter"));
    assert!(has_text(&tradeoff, "test loss (nats/token)"));
    let greedy = svg("greedy");
    for text in [
        "all 4 experts (1.94)",
        "active set: 3 of 4 (within 1 %)",
        "experts selected",
        "charlie",
    ] {
        assert!(has_text(&greedy, text), "greedy.svg lacks {text:?}");
    }
    let routing = svg("routing");
    for text in ["alpha", "delta", "Hello", "·world", "↵", "&lt;s&gt;"] {
        assert!(has_text(&routing, text), "routing.svg lacks {text:?}");
    }
    assert!(routing.contains("layer_early") && routing.contains("layer_late"));
    let similarity = svg("similarity");
    for text in [
        "alpha",
        "bravo",
        "charlie",
        "delta",
        "cluster 0",
        "cluster 1",
    ] {
        assert!(has_text(&similarity, text), "similarity.svg lacks {text:?}");
    }
}

#[test]
fn only_the_figures_present_are_drawn() {
    let scratch = Scratch::new("only-tradeoff");
    let figures = Figures {
        tradeoff: small_figures().tradeoff,
        greedy: None,
        routing: None,
        similarity: None,
    };
    let written = draw(&figures, &scratch.0).unwrap();
    assert_eq!(sorted_names(written), ["tradeoff.png", "tradeoff.svg"]);
    assert_eq!(fs::read_dir(&scratch.0).unwrap().count(), 2);

    let nothing = Figures {
        tradeoff: vec![],
        greedy: None,
        routing: None,
        similarity: None,
    };
    let empty = Scratch::new("nothing");
    assert!(draw(&nothing, &empty.0).unwrap().is_empty());
    assert!(
        !empty.0.exists(),
        "nothing to draw must not create the directory"
    );
}

#[test]
fn cluster_order_groups_clusters_and_keeps_the_input_order_within_each() {
    let clusters = [2, 0, 1, 0, 2, 1, 0, 7];
    let order = cluster_order(&clusters);

    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..clusters.len()).collect::<Vec<_>>(),
        "not a permutation"
    );
    assert_eq!(order, [1, 3, 6, 2, 5, 0, 4, 7]);
    // Members of a cluster are adjacent: each cluster id starts exactly one run.
    let ids: Vec<usize> = order.iter().map(|&i| clusters[i]).collect();
    let mut runs: Vec<usize> = ids
        .windows(2)
        .filter(|w| w[0] != w[1])
        .map(|w| w[1])
        .collect();
    runs.insert(0, ids[0]);
    let mut unique = runs.clone();
    unique.dedup();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(runs.len(), unique.len(), "a cluster is split: {ids:?}");
    // Stable: within a cluster, indices increase.
    for w in order.windows(2) {
        if clusters[w[0]] == clusters[w[1]] {
            assert!(w[0] < w[1], "order within a cluster changed: {order:?}");
        }
    }
    assert!(cluster_order(&[]).is_empty());
    assert_eq!(cluster_order(&[5, 5, 5]), [0, 1, 2]);
}

/// The error chain of drawing `figures`, which must fail without writing anything.
fn failure(figures: &Figures, name: &str) -> String {
    let scratch = Scratch::new(name);
    let error = draw(figures, &scratch.0).expect_err("invalid data must be refused");
    assert!(
        !scratch.0.exists(),
        "nothing may be written when the data is invalid"
    );
    format!("{error:#}")
}

#[test]
fn non_square_similarity_is_an_error_naming_the_figure() {
    let mut figures = small_figures();
    figures.similarity.as_mut().unwrap().similarity[2].pop();
    let message = failure(&figures, "non-square");
    assert!(message.contains("`similarity` figure"), "{message}");
    assert!(message.contains("square"), "{message}");

    let mut figures = small_figures();
    figures.similarity.as_mut().unwrap().clusters.pop();
    assert!(failure(&figures, "clusters").contains("`similarity` figure"));
}

#[test]
fn mismatched_or_non_finite_data_is_an_error_naming_the_figure() {
    let mut figures = small_figures();
    figures.routing.as_mut().unwrap().layers[1].weights.pop();
    let message = failure(&figures, "routing-rows");
    assert!(
        message.contains("`routing` figure") && message.contains("layer_late"),
        "{message}"
    );

    let mut figures = small_figures();
    figures.tradeoff[1].mean_loss = f64::NAN;
    let message = failure(&figures, "nan-loss");
    assert!(
        message.contains("`tradeoff` figure") && message.contains("router top-2"),
        "{message}"
    );

    let mut figures = small_figures();
    let greedy = figures.greedy.as_mut().unwrap();
    greedy.curve.clear();
    greedy.order.clear();
    assert!(failure(&figures, "empty-curve").contains("`greedy` figure"));

    let mut figures = small_figures();
    figures.greedy.as_mut().unwrap().active = 9;
    assert!(failure(&figures, "active").contains("`greedy` figure"));

    let mut figures = small_figures();
    figures.routing.as_mut().unwrap().layers[0].weights[0][0] = 1.5;
    assert!(failure(&figures, "weight-range").contains("`routing` figure"));
}

#[test]
fn figures_round_trip_through_json() {
    let figures = small_figures();
    let json = serde_json::to_string(&figures).unwrap();
    let back: Figures = serde_json::from_str(&json).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    assert_eq!(format!("{back:?}"), format!("{figures:?}"));
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["tradeoff"][1]["label"], "router top-2");
    assert_eq!(value["greedy"]["base"], serde_json::Value::Null);
}

#[test]
fn the_embedded_font_draws_visible_text() {
    render::register_fonts().unwrap();
    let (w, h) = (120u32, 40u32);
    let mut buffer = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (w, h)).into_drawing_area();
        root.draw_text("Tokens", &render::font(20.0).color(&BLACK), (5, 10))
            .unwrap();
        root.present().unwrap();
    }
    let dark = buffer
        .chunks_exact(3)
        .filter(|p| p.iter().all(|v| *v < 100))
        .count();
    assert!(
        dark > 50,
        "only {dark} dark pixels: the font did not render"
    );
}

#[test]
fn tokens_and_labels_are_made_visible() {
    assert_eq!(render::visible_token(" the"), "·the");
    assert_eq!(render::visible_token("\n"), "↵");
    assert_eq!(render::visible_token("a\tb\r\u{1b}"), "a→b\\r\\x1b");
    assert_eq!(render::visible_token(""), "∅");
    assert_eq!(render::printable("two words\n"), "two words↵");
    assert_eq!(render::truncate("abcdef", 4), "abc…");
    assert_eq!(render::truncate("abc", 4), "abc");
}

#[test]
fn numbers_and_ticks_are_round() {
    assert_eq!(render::fmt_num(1.0), "1");
    assert_eq!(render::fmt_num(0.25), "0.25");
    assert_eq!(render::fmt_num(21.43), "21.4");
    assert_eq!(render::fmt_num(-0.0001), "-1.0e-4");
    assert_eq!(
        render::nice_ticks(0.0, 1.0, 5),
        [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
    );
    assert_eq!(render::log_ticks(0.9, 25.0), [1.0, 2.0, 5.0, 10.0, 20.0]);
}

#[test]
fn large_routing_maps_stay_within_bounds_and_readable() {
    render::register_fonts().unwrap();
    let (layers, experts, tokens) = (8, 32, 40);
    let map = RoutingMap {
        title: "large".to_string(),
        tokens: names("tok", tokens),
        experts: names("expert-", experts),
        layers: (0..layers)
            .map(|l| LayerWeights {
                layer: format!("layers.{l}.mlp"),
                weights: vec![vec![1.0 / experts as f64; experts]; tokens],
            })
            .collect(),
    };
    let routing = Routing::new(&map).unwrap();
    let (w, h) = routing.size();
    assert!(w <= 1400 && h <= 1400, "{w}×{h}");
    let layout = super::heatmap::routing::layout(layers, &map.experts, &map.tokens, 0).unwrap();
    assert!(
        layout.cols > 1,
        "8 layers should be laid out in a grid: {layout:?}"
    );
    assert!(
        layout.cw >= 8 && layout.ch >= 8,
        "cells too small to read: {layout:?}"
    );

    let one = RoutingMap {
        layers: map.layers[..1].to_vec(),
        ..map.clone()
    };
    let layout = super::heatmap::routing::layout(1, &one.experts, &one.tokens, 0).unwrap();
    assert_eq!(layout.cols, 1);
}

#[test]
fn labels_avoid_obstacles_when_there_is_room() {
    use super::render::Bounds;
    let frame = Bounds {
        x0: 0,
        y0: 0,
        x1: 400,
        y1: 300,
    };
    let blocker = Bounds {
        x0: 105,
        y0: 90,
        x1: 200,
        y1: 110,
    }; // right of the marker
    let spot = super::tradeoff::place_label((100, 100), (60, 12), &[blocker], &frame);
    assert_eq!(spot.overlap(&blocker), 0, "{spot:?}");
    assert_eq!(spot.outside(&frame), 0, "{spot:?}");
}

#[test]
fn a_file_that_cannot_be_written_is_an_error_naming_figure_and_file() {
    let scratch = Scratch::new("unwritable");
    fs::create_dir_all(scratch.0.join("greedy.png")).unwrap(); // a directory in the way
    let figures = Figures {
        tradeoff: vec![],
        ..small_figures()
    };
    let message = format!("{:#}", draw(&figures, &scratch.0).unwrap_err());
    assert!(
        message.contains("`greedy` figure") && message.contains("greedy.png"),
        "{message}"
    );
}
