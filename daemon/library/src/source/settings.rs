//! [`HubSettings`]: the hub endpoint, cache folder, token and offline switch, read from the
//! environment the way `huggingface_hub` reads them (`hf-hub` reads only some of them).

use std::fmt;
use std::path::PathBuf;

use super::DEFAULT_ENDPOINT;

/// How to reach the hub and where its cache lives.
#[derive(Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// Base URL of the hub, without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache folder, holding `models--org--name` folders (`HF_HUB_CACHE`).
    pub cache_dir: PathBuf,
    /// Use the cache only; never touch the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Sent as `Authorization: Bearer <token>` (`HF_TOKEN` or the saved token file).
    pub token: Option<String>,
}

impl fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HubSettings {
    /// Reads the settings the way `huggingface_hub` does:
    /// - `HF_ENDPOINT` (default `https://huggingface.co`);
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, where
    ///   `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - `HF_HUB_OFFLINE` set to `1`, `true`, `yes` or `on` (any case);
    /// - token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH`,
    ///   else `$HF_HOME/token` (what `huggingface-cli login` writes).
    pub fn from_env() -> HubSettings {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`HubSettings::from_env`] with the variables read through `lookup` (for tests and
    /// for callers with their own environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> HubSettings {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let home = var("HOME")
            .or_else(|| var("USERPROFILE"))
            .map(PathBuf::from);
        let expand = |value: String| -> PathBuf {
            match (value.strip_prefix("~/"), &home) {
                (Some(rest), Some(home)) => home.join(rest),
                _ if value == "~" => home.clone().unwrap_or_else(|| PathBuf::from(&value)),
                _ => PathBuf::from(value),
            }
        };

        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());

        let hf_home = var("HF_HOME").map(&expand).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(&expand)
                .unwrap_or_else(|| home.clone().unwrap_or_default().join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(&expand)
            .unwrap_or_else(|| hf_home.join("hub"));

        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });

        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(&expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                let text = std::fs::read_to_string(path).ok()?;
                let text = text.trim();
                (!text.is_empty()).then(|| text.to_string())
            });

        HubSettings {
            endpoint,
            cache_dir,
            offline,
            token,
        }
    }
}
