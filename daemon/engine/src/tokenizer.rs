//! Text ↔ token ids through the base model's `tokenizer.json` (the `tokenizers` crate).

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// The tokenizer of a base model folder.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Self { inner, path })
    }

    /// Token ids of `text`, without adding special tokens (as a completion is scored).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode the text: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode token ids: {e}"),
            })
    }

    /// The id of a token string, if the vocabulary has it (e.g. an end-of-sequence marker).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a stream of token ids into a stream of text pieces, holding back bytes that do not
/// yet form a whole UTF-8 character (byte-level tokenizers split characters across tokens).
pub struct StreamDecoder<'t> {
    tokenizer: &'t TextTokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder that has seen nothing yet.
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds one token and returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        // A trailing U+FFFD means the last character is still incomplete.
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted {
            return Ok(None);
        }
        if !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}
