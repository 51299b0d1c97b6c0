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

/// Writes a byte-level `tokenizer.json` to `dir`: token id == UTF-8 byte value (vocabulary
/// 256, no merges, no special tokens), in the format transformers and `tokenizers` read.
pub fn write_byte_level_tokenizer(dir: &Path) -> Result<()> {
    // GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others are
    // shifted past U+00FF in byte order.
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    let mut vocab = serde_json::Map::new();
    for b in 0u32..256 {
        let ch = if printable(b) {
            char::from_u32(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted)
        };
        vocab.insert(ch.expect("valid code point").to_string(), b.into());
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    let path = dir.join("tokenizer.json");
    let text = serde_json::to_string_pretty(&json).expect("JSON serialises");
    std::fs::write(&path, text).map_err(|e| EngineError::Tokenizer {
        path,
        message: e.to_string(),
    })
}

/// Turns a stream of token ids into a stream of text pieces, holding back bytes that do not
/// yet form a whole UTF-8 character (byte-level tokenizers split characters across tokens).
/// Only the ids since the last emitted piece are decoded again, so a long generation costs
/// linear, not quadratic, time.
pub struct StreamDecoder<'t> {
    tokenizer: &'t TextTokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded each time: a piece boundary already emitted.
    window: usize,
    /// End of the part of the window already emitted.
    emitted: usize,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder that has seen nothing yet.
    pub fn new(tokenizer: &'t TextTokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            window: 0,
            emitted: 0,
        }
    }

    /// Adds one token and returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        // Decoding from a boundary (rather than the single new id) keeps tokenizers that
        // look at neighbours, such as SentencePiece's leading spaces, right.
        let before = self
            .tokenizer
            .decode(&self.ids[self.window..self.emitted])?;
        let text = self.tokenizer.decode(&self.ids[self.window..])?;
        // A trailing U+FFFD means the last character is still incomplete.
        if text.len() <= before.len()
            || text.ends_with('\u{FFFD}')
            || !text.is_char_boundary(before.len())
        {
            return Ok(None);
        }
        let piece = text[before.len()..].to_string();
        self.window = self.emitted;
        self.emitted = self.ids.len();
        Ok(Some(piece))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> TextTokenizer {
        let fixtures = std::env::var_os("MOERGE_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
            });
        TextTokenizer::from_dir(&fixtures.join("dev-phi")).unwrap()
    }

    #[test]
    fn written_byte_level_tokenizer_matches_the_fixture() {
        let tmp = tempfile::tempdir().unwrap();
        write_byte_level_tokenizer(tmp.path()).unwrap();
        let ours = TextTokenizer::from_dir(tmp.path()).unwrap();
        let theirs = tokenizer();
        let text = "Hé >\n\t~\u{7f} ✓ 57-12=45";
        assert_eq!(ours.encode(text).unwrap(), theirs.encode(text).unwrap());
        assert_eq!(
            ours.encode(text).unwrap(),
            text.bytes().map(u32::from).collect::<Vec<_>>()
        );
        let all: Vec<u32> = (0..256).collect();
        assert_eq!(ours.decode(&all).unwrap(), theirs.decode(&all).unwrap());
    }

    #[test]
    fn streams_whole_characters_only() {
        let tok = tokenizer();
        let text = "héllo, wörld ✓!";
        let ids = tok.encode(text).unwrap();
        // Byte level: one id per UTF-8 byte, so "é" takes two ids and "✓" three.
        assert_eq!(ids.len(), text.len());
        let mut decoder = StreamDecoder::new(&tok);
        let mut pieces = Vec::new();
        for id in ids {
            if let Some(p) = decoder.push(id).unwrap() {
                pieces.push(p);
            }
        }
        assert_eq!(pieces.concat(), text);
        assert!(
            pieces.contains(&"é".to_string()) && pieces.contains(&"✓".to_string()),
            "{pieces:?}"
        );
    }
}
