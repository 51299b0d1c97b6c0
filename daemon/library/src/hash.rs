//! Content hashes: an adapter's identity is the blake3 hash of its two files.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of every adapter hash, so an adapter's hash can never equal the hash of some
/// other object that happens to contain the same bytes.
const DOMAIN: &[u8] = b"moerge adapter content v1\0";

/// The identity of an adapter: blake3 over both of its files.
///
/// Exactly: `blake3(DOMAIN ‖ frame("adapter_config.json", config) ‖
/// frame("adapter_model.safetensors", safetensors))`, where `DOMAIN` is
/// `b"moerge adapter content v1\0"` and `frame(name, bytes)` is the name's length as a
/// little-endian u64, the name, the content's length as a little-endian u64, the content.
/// Length prefixes keep the framing unambiguous. Renaming or moving the folder keeps the
/// hash; changing any byte of either file changes it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Ord, PartialOrd, Debug)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The first 12 hex characters, for tables and log lines.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_owned()
    }

    /// Hashes both files held in memory. [`crate::Adapter::load`] computes the same value
    /// while it streams through the mapped file.
    pub fn of_adapter_files(config: &[u8], safetensors: &[u8]) -> ContentHash {
        let mut hasher = AdapterHasher::new(config, safetensors.len() as u64);
        hasher.update(safetensors);
        hasher.finish()
    }
}

/// Streams an adapter's bytes into the hash; the safetensors content is fed in pieces.
pub(crate) struct AdapterHasher(blake3::Hasher);

impl AdapterHasher {
    pub(crate) fn new(config: &[u8], safetensors_len: u64) -> AdapterHasher {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        frame(&mut h, "adapter_config.json", config.len() as u64);
        h.update(config);
        frame(&mut h, "adapter_model.safetensors", safetensors_len);
        AdapterHasher(h)
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub(crate) fn finish(&self) -> ContentHash {
        ContentHash(*self.0.finalize().as_bytes())
    }
}

fn frame(h: &mut blake3::Hasher, name: &str, len: u64) {
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update(&len.to_le_bytes());
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The hex string was not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a content hash (expected 64 hex digits): {0:?}")]
pub struct ParseHashError(pub String);

impl FromStr for ContentHash {
    type Err = ParseHashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseHashError(s.to_owned());
        if s.len() != 64 || !s.is_ascii() {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(ContentHash(out))
    }
}

impl Serialize for ContentHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ContentHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_short() {
        let h = ContentHash(std::array::from_fn(|i| i as u8 * 7));
        let hex = h.to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("00070e151c23"), "{hex}");
        assert_eq!(h.short(), "00070e151c23");
        assert_eq!(hex.parse::<ContentHash>().unwrap(), h);
        assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{hex}\""));
        assert!("00ff".parse::<ContentHash>().is_err());
        assert!("zz".repeat(32).parse::<ContentHash>().is_err());
    }

    #[test]
    fn framing_separates_the_two_files() {
        // Moving a byte from one file to the other must change the hash.
        let a = ContentHash::of_adapter_files(b"{}x", b"y");
        let b = ContentHash::of_adapter_files(b"{}", b"xy");
        assert_ne!(a, b);
        // Streaming in pieces equals hashing at once.
        let mut s = AdapterHasher::new(b"{}", 2);
        s.update(b"x");
        s.update(b"y");
        assert_eq!(s.finish(), b);
    }
}
