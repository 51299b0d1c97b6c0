//! Scoring, top tokens and generation against the plain forward pass they are built on.

mod common;

use std::ops::ControlFlow;

use candle_core::{IndexOp, D};
use common::fixtures;
use moerge_engine::inference::{self, GenerateOptions};
use moerge_engine::{BaseModel, Precision};
use moerge_library::Adapter;

fn model() -> BaseModel {
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    base.with_adapter(&Adapter::load(&fixtures().join("dev-phi/adapters/rot13")).unwrap())
        .unwrap()
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap() as u32
}

#[test]
fn greedy_generation_with_the_cache_equals_argmax_of_full_passes() {
    let model = model();
    let prompt: Vec<u32> = b"abc>".iter().map(|&b| u32::from(b)).collect();
    let opts = GenerateOptions {
        max_tokens: 8,
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let out = inference::generate(&model, &prompt, &opts, |id| {
        streamed.push(id);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(out, streamed);
    assert_eq!(out.len(), 8);
    // Without a cache: one full forward per step over everything so far.
    let mut seq = prompt.clone();
    for &id in &out {
        let logits = inference::logits(&model, &seq).unwrap();
        let last = logits.i(seq.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(argmax(&last), id);
        seq.push(id);
    }
}

#[test]
fn generation_stops_before_a_stop_id_and_when_told() {
    let model = model();
    let prompt: Vec<u32> = b"xyz>".iter().map(|&b| u32::from(b)).collect();
    let free = inference::generate(
        &model,
        &prompt,
        &GenerateOptions {
            max_tokens: 6,
            ..Default::default()
        },
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let stop = GenerateOptions {
        max_tokens: 6,
        stop_ids: vec![free[2]],
        ..Default::default()
    };
    let cut = inference::generate(&model, &prompt, &stop, |_| ControlFlow::Continue(())).unwrap();
    let first = free.iter().position(|&id| id == free[2]).unwrap();
    assert_eq!(cut, free[..first]);
    let mut calls = 0;
    let told = inference::generate(
        &model,
        &prompt,
        &GenerateOptions {
            max_tokens: 6,
            ..Default::default()
        },
        |_| {
            calls += 1;
            if calls == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    assert_eq!(told, free[..3]);
}

#[test]
fn score_and_top_tokens_agree_with_the_logits() {
    let model = model();
    let prompt: Vec<u32> = b"hello>".iter().map(|&b| u32::from(b)).collect();
    let completion: Vec<u32> = b"uryyb".iter().map(|&b| u32::from(b)).collect();
    let all: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
    let log_probs =
        candle_nn::ops::log_softmax(&inference::logits(&model, &all).unwrap(), D::Minus1).unwrap();
    let score = inference::score(&model, &prompt, &completion).unwrap();
    for (j, nll) in score.token_nll.iter().enumerate() {
        let row = log_probs
            .i(prompt.len() - 1 + j)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((nll + row[completion[j] as usize]).abs() < 1e-5);
    }
    let mean = score.token_nll.iter().sum::<f32>() / completion.len() as f32;
    assert!((score.mean_nll() - mean).abs() < 1e-6);

    let top = inference::top_tokens(&model, &prompt, 5).unwrap();
    let row = log_probs
        .i(prompt.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(top.len(), 5);
    assert_eq!(top[0].0, argmax(&row));
    for w in top.windows(2) {
        assert!(w[0].1 >= w[1].1);
    }
    for (id, p) in &top {
        assert!((p.ln() - row[*id as usize]).abs() < 1e-4);
    }
}

#[test]
fn bad_arguments_are_named() {
    let model = model();
    let check = |err: moerge_engine::EngineError, word: &str| {
        let msg = err.to_string();
        assert!(msg.contains(word), "{msg}");
    };
    check(inference::score(&model, &[], &[1]).unwrap_err(), "prompt");
    check(
        inference::score(&model, &[1], &[]).unwrap_err(),
        "completion",
    );
    check(inference::logits(&model, &[1, 300]).unwrap_err(), "300");
    let opts = GenerateOptions {
        temperature: -1.0,
        ..Default::default()
    };
    check(
        inference::generate(&model, &[1], &opts, |_| ControlFlow::Continue(())).unwrap_err(),
        "temperature",
    );
    // Past max_position_embeddings (128 for dev-phi) is refused, not wrapped around.
    check(
        inference::logits(&model, &vec![65; 200]).unwrap_err(),
        "max_position_embeddings",
    );
}
