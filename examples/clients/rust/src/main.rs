//! A small Rust client of `moerged`, on `moerge-bus` only (no candle, no sled): lists the
//! experts, fuses a uniform merge of some of them, scores a completion, streams a
//! generation, and releases the model.
//!
//! ```text
//! cargo run -p moerge-client-example -- upper,rot13 'upper kiwi>' 'KIWI\n'
//! ```
//!
//! It talks to the session bus; set `DBUS_SESSION_BUS_ADDRESS` to reach another bus.

use std::process::ExitCode;

use futures_util::StreamExt;
use moerge_bus::{Daemon1Proxy, GenerateOptions, Model1Proxy, MoergeError};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let experts = args.first().map(String::as_str).unwrap_or("upper,rot13");
    let prompt = args.get(1).map(String::as_str).unwrap_or("upper kiwi>");
    let completion = args
        .get(2)
        .map(|c| c.replace("\\n", "\n"))
        .unwrap_or_else(|| "KIWI\n".into());
    match run(experts, prompt, &completion).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moerge-client-example: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(experts: &str, prompt: &str, completion: &str) -> Result<(), MoergeError> {
    let bus = zbus::Connection::session().await?;
    let daemon = Daemon1Proxy::new(&bus).await?;
    let listed = daemon.list_experts().await?;
    for e in &listed {
        println!(
            "{:20} {:12} {}",
            e.name,
            e.state,
            &e.hash[..e.hash.len().min(12)]
        );
    }

    let wanted: Vec<&str> = experts.split(',').collect();
    let mut refs = Vec::new();
    for name in &wanted {
        let Some(e) = listed.iter().find(|e| e.name == *name) else {
            return Err(MoergeError::NoSuchExpert(format!(
                "{name} is not in the library"
            )));
        };
        refs.push(format!(r#"{{"name": {:?}, "hash": {:?}}}"#, e.name, e.hash));
    }
    let weight = 1.0 / wanted.len() as f64;
    let weights = vec![weight.to_string(); wanted.len()].join(", ");
    let plan = format!(
        r#"{{"moerge_plan": 1, "experts": [{}], "default": {{"static": {{"weights": [{weights}], "space": "lowrank"}}}}}}"#,
        refs.join(", ")
    );
    let path = daemon.fuse_plan(&plan).await?;
    println!("model: {path}");
    let model = Model1Proxy::builder(&bus).path(path).build().await?;

    let score = model.score(prompt, completion).await?;
    println!(
        "mean NLL {:.4} over {} tokens",
        score.mean_nll,
        score.token_nll.len()
    );

    // Streaming: subscribe first, then ask; pieces arrive as Token signals, then Done.
    let mut tokens = model.receive_token().await?;
    let mut done = model.receive_done().await?;
    let request = model
        .generate_stream(prompt, GenerateOptions::greedy(24).to_dict())
        .await?;
    let end = done
        .next()
        .await
        .ok_or(MoergeError::Internal("the bus closed".into()))?;
    let end = end.args()?;
    let mut streamed = String::new();
    while streamed.len() < end.text().len() {
        let Some(t) = tokens.next().await else { break };
        let t = t.args()?;
        if *t.request() == request {
            print!("{}", t.text());
            streamed.push_str(t.text());
        }
    }
    println!();
    if !end.error().is_empty() {
        eprintln!("generation failed: {}", end.error());
    }
    model.release().await?;
    Ok(())
}
