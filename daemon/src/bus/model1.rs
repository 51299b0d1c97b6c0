//! `org.moerge.Model1` at `/org/moerge/Model/<n>`: one fused model. Any local peer may use
//! it; its owner (and the daemon's user and root) may release it.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moerge_bus::{model_path, Explanation, ModelInfo, MoergeError, ScoreResult, TokenProbability};
use zbus::message::Header;
use zbus::names::BusName;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, ObjectServer, OwnedObjectPath, OwnedVariant};

use super::caller::identify;
use super::convert::{self, error};
use super::BusState;
use crate::serving::{Caller, LoadedModel};

pub struct Model1 {
    state: Arc<BusState>,
    model: Arc<LoadedModel>,
    p2p: Option<String>,
}

type Result<T> = std::result::Result<T, MoergeError>;

static STREAM_REQUESTS: AtomicU64 = AtomicU64::new(1);

fn path_of(model: &LoadedModel) -> OwnedObjectPath {
    OwnedObjectPath::try_from(model_path(model.id)).expect("model paths are valid object paths")
}

/// Puts a new model on `conn` and returns its path.
pub(crate) async fn publish(
    state: &Arc<BusState>,
    conn: &Connection,
    caller: &Caller,
    model: Arc<LoadedModel>,
    p2p: Option<String>,
) -> Result<OwnedObjectPath> {
    let path = path_of(&model);
    state.note_client(&caller.client, conn);
    let iface = Model1 {
        state: state.clone(),
        model,
        p2p,
    };
    conn.object_server().at(path.clone(), iface).await?;
    Ok(path)
}

pub(crate) fn info(model: &LoadedModel) -> ModelInfo {
    ModelInfo {
        path: path_of(model),
        owner: model.owner.clone(),
        generation: model.generation(),
        stale: model.is_stale(),
        experts: model
            .plan()
            .experts
            .iter()
            .map(|e| e.name.clone())
            .collect(),
        kind: if model.is_ensemble() {
            "ensemble"
        } else {
            "single"
        }
        .into(),
    }
}

/// A text as a D-Bus string may carry it: D-Bus strings cannot hold NUL, and a message with
/// one makes the bus daemon drop the sender's connection, so a token that decodes to NUL
/// (a byte-level vocabulary has one) goes out as U+FFFD.
pub(crate) fn wire_text(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

fn wire_texts(texts: &mut [String]) {
    for t in texts {
        *t = wire_text(std::mem::take(t));
    }
}

impl Model1 {
    async fn caller(&self, header: &Header<'_>, conn: &Connection) -> Result<Caller> {
        identify(&self.state, header, conn, &self.p2p).await
    }
}

#[interface(name = "org.moerge.Model1")]
impl Model1 {
    /// The negative log-likelihood (nats) of each token of `completion` after `prompt`.
    #[zbus(out_args("score"))]
    async fn score(
        &self,
        prompt: &str,
        completion: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<ScoreResult> {
        let caller = self.caller(&header, conn).await?;
        let out = self
            .state
            .serving
            .score(&caller, &self.model, prompt, completion)
            .await
            .map_err(error)?;
        let mut out = convert::score(out);
        wire_texts(&mut out.tokens);
        Ok(out)
    }

    /// Generates text after `prompt`. `options` (a{sv}): max_tokens (u), temperature (d),
    /// top_p (d), seed (t), stop (as).
    #[zbus(out_args("text"))]
    async fn generate(
        &self,
        prompt: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String> {
        let caller = self.caller(&header, conn).await?;
        let request = convert::generate_request(&options)?;
        self.state
            .serving
            .generate(&caller, &self.model, prompt, request, |_| {
                ControlFlow::Continue(())
            })
            .await
            .map_err(error)
            .map(wire_text)
    }

    /// Like Generate, but returns a request id at once; the text follows as Token signals
    /// sent to the caller only, then one Done signal.
    #[zbus(out_args("request"))]
    async fn generate_stream(
        &self,
        prompt: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<u64> {
        let caller = self.caller(&header, conn).await?;
        let request = convert::generate_request(&options)?;
        // Checked here too: a stream reports later failures only in its Done signal.
        request.check().map_err(error)?;
        self.state.serving.check_generate(&request).map_err(error)?;
        let id = STREAM_REQUESTS.fetch_add(1, Ordering::Relaxed);
        let mut emitter = SignalEmitter::new(conn, path_of(&self.model))?.into_owned();
        if self.p2p.is_none() {
            let to = BusName::try_from(caller.client.clone())?;
            emitter = emitter.set_destination(to);
        }
        let serving = self.state.serving.clone();
        let model = self.model.clone();
        let prompt = prompt.to_string();
        tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let generation = tokio::spawn(async move {
                serving
                    .generate(&caller, &model, &prompt, request, move |piece| {
                        match tx.send(piece.to_string()) {
                            Ok(()) => ControlFlow::Continue(()),
                            // Nobody forwards the pieces any more: stop generating.
                            Err(_) => ControlFlow::Break(()),
                        }
                    })
                    .await
            });
            while let Some(piece) = rx.recv().await {
                if Model1::token(&emitter, id, &wire_text(piece))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let (text, failure) = match generation.await {
                Ok(Ok(text)) => (wire_text(text), String::new()),
                Ok(Err(e)) => (String::new(), error(e).to_string()),
                Err(e) => (String::new(), format!("the generation task failed: {e}")),
            };
            let _ = Model1::done(&emitter, id, &text, &failure).await;
        });
        Ok(id)
    }

    /// The `k` most likely next tokens after `prompt`, best first.
    #[zbus(out_args("tokens"))]
    async fn top_tokens(
        &self,
        prompt: &str,
        k: u32,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<TokenProbability>> {
        let caller = self.caller(&header, conn).await?;
        let top = self
            .state
            .serving
            .top_tokens(&caller, &self.model, prompt, k)
            .await
            .map_err(error)?;
        let mut top = convert::top_tokens(top);
        for t in &mut top {
            t.text = wire_text(std::mem::take(&mut t.text));
        }
        Ok(top)
    }

    /// For each routed module, the weight each expert got for each prompt token (empty for a
    /// plan that routes nothing).
    #[zbus(out_args("explanation"))]
    async fn explain(
        &self,
        prompt: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Explanation> {
        let caller = self.caller(&header, conn).await?;
        let explanation = self
            .state
            .serving
            .explain(&caller, &self.model, prompt)
            .await
            .map_err(error)?;
        let mut explanation = convert::explanation(explanation);
        wire_texts(&mut explanation.tokens);
        Ok(explanation)
    }

    /// Writes a merge plan's model as a PEFT adapter into the new folder `dir` (absolute);
    /// returns its content hash. The daemon's user and root only.
    #[zbus(out_args("hash"))]
    async fn export_peft(
        &self,
        dir: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String> {
        let caller = self.caller(&header, conn).await?;
        self.state
            .serving
            .export_peft(&caller, &self.model, dir)
            .await
            .map_err(error)
    }

    /// Frees the model: its owner, the daemon's user and root may.
    async fn release(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<()> {
        let caller = self.caller(&header, conn).await?;
        self.state
            .serving
            .release_model(&caller, self.model.id)
            .map_err(error)?;
        server.remove::<Model1, _>(path_of(&self.model)).await?;
        Ok(())
    }

    /// A piece of a GenerateStream reply's text.
    #[zbus(signal)]
    async fn token(emitter: &SignalEmitter<'_>, request: u64, text: &str) -> zbus::Result<()>;

    /// A GenerateStream request ended: its whole text, and an error message (empty on
    /// success).
    #[zbus(signal)]
    async fn done(
        emitter: &SignalEmitter<'_>,
        request: u64,
        text: &str,
        error: &str,
    ) -> zbus::Result<()>;

    /// The plan this model was built from (JSON).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn plan(&self) -> String {
        self.model.plan_json().to_string()
    }

    /// The library generation the model leased.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn generation(&self) -> u64 {
        self.model.generation()
    }

    /// True once an expert the model uses changed or was removed from the library.
    #[zbus(property)]
    pub(crate) async fn stale(&self) -> bool {
        self.model.is_stale()
    }
}
