//! What a hub id, a revision and a file name inside a repo may look like: the hub's own
//! rules, and whatever keeps them safe as URL parts and cache paths.

use std::path::Path;

use super::DEFAULT_REVISION;

const MAX_REPO_ID_LEN: usize = 96;
const MAX_REVISION_LEN: usize = 255;

/// Splits `org/name[@revision]` into the repo and the revision (`main` if none is given),
/// or says why `spec` is not a hub id.
pub(super) fn split_hub_id(spec: &str) -> Result<(&str, &str), String> {
    if spec.is_empty() {
        return Err("it is empty".to_string());
    }
    if spec.contains("://") {
        return Err("a URL; give the id alone, as org/name".to_string());
    }
    if Path::new(spec).is_absolute() || spec.starts_with(['.', '~']) || spec.contains('\\') {
        return Err("it looks like a path, and nothing exists there".to_string());
    }
    let (repo, revision) = spec.split_once('@').unwrap_or((spec, DEFAULT_REVISION));
    validate_repo_id(repo)?;
    validate_revision(revision)?;
    Ok((repo, revision))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// The hub's rules (`huggingface_hub.utils.validate_repo_id`), with the namespace
/// required: `org/name`, each part of `[A-Za-z0-9._-]` starting and ending with a letter,
/// digit or `_`, no `--` or `..`, not ending in `.git`, at most 96 characters.
fn validate_repo_id(repo: &str) -> Result<(), String> {
    let Some((org, name)) = repo.split_once('/') else {
        return Err("a hub id needs an owner: org/name".to_string());
    };
    if name.contains('/') {
        return Err("a hub id has exactly one '/'".to_string());
    }
    if repo.len() > MAX_REPO_ID_LEN {
        return Err(format!("longer than {MAX_REPO_ID_LEN} characters"));
    }
    for (what, part) in [("owner", org), ("name", name)] {
        if part.is_empty() {
            return Err(format!("the {what} is empty"));
        }
        if let Some(c) = part.chars().find(|&c| !is_name_char(c)) {
            return Err(format!(
                "the {what} contains '{c}'; only letters, digits, '-', '_' and '.' are allowed"
            ));
        }
        let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !edge_ok(part.chars().next()) || !edge_ok(part.chars().last()) {
            return Err(format!(
                "the {what} must start and end with a letter, a digit or '_'"
            ));
        }
    }
    if repo.contains("--") || repo.contains("..") {
        return Err("'--' and '..' are not allowed".to_string());
    }
    if repo.ends_with(".git") {
        return Err("a hub id cannot end in .git".to_string());
    }
    Ok(())
}

/// A branch, tag or commit: git-ref-like, and safe as a path under `refs/` in the cache.
fn validate_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("the revision after '@' is empty".to_string());
    }
    if revision.len() > MAX_REVISION_LEN {
        return Err(format!(
            "the revision is longer than {MAX_REVISION_LEN} characters"
        ));
    }
    if let Some(c) = revision.chars().find(|&c| !(is_name_char(c) || c == '/')) {
        return Err(format!(
            "the revision contains '{c}'; only letters, digits, '-', '_', '.' and '/' are allowed"
        ));
    }
    if revision
        .split('/')
        .any(|part| part.is_empty() || part.starts_with('.'))
        || revision.ends_with(".lock")
        || revision.contains("..")
    {
        return Err(format!("'{revision}' is not a valid revision name"));
    }
    Ok(())
}

/// A file name inside a repo (for shard names read from an index): relative, `/`
/// separated, no `.`/`..` parts, URL- and path-safe characters only.
pub(super) fn validate_repo_file(file: &str) -> Result<(), String> {
    if file.is_empty() {
        return Err("empty file name".to_string());
    }
    if let Some(c) = file.chars().find(|&c| !(is_name_char(c) || c == '/')) {
        return Err(format!("file name '{file}' contains '{c}'"));
    }
    if file
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!("file name '{file}' is not a plain relative path"));
    }
    Ok(())
}

pub(super) fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Commit hashes and etags become path components in the cache: keep them boring.
pub(super) fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in ["org/name", "a/b", "Org_1/na.me-2", "_x/y_"] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "name",
            "/name",
            "org/",
            "a/b/c",
            "org/na me",
            "org/-x",
            "org/x.",
            "o--g/x",
            "org/a..b",
            "org/x.git",
            "örg/x",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revisions() {
        for ok in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(validate_revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a b", "../x", "a//b", "x/", "/x", ".hidden", "x.lock", "a..b", "a?b",
        ] {
            assert!(validate_revision(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repo_files() {
        assert!(validate_repo_file("model-00001-of-00002.safetensors").is_ok());
        assert!(validate_repo_file("sub/model.safetensors").is_ok());
        for bad in ["", "../x", "/abs", "a//b", "./x", "a b", "a\\b", "x?y"] {
            assert!(validate_repo_file(bad).is_err(), "{bad}");
        }
    }
}
