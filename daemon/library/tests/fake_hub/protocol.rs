//! What the fake hub answers: the hub's file-resolution protocol as `hf-hub` 0.5 uses it.
//!
//! `GET /<org>/<name>/resolve/<revision>/<file>` with a `Range` header, answered with
//! `206`, `Content-Range`, `ETag` and `X-Repo-Commit`; `*.safetensors` files are "LFS"
//! files answered with a `302` to a CDN-like URL plus `X-Linked-Etag`, as the real hub
//! does; `404` for unknown revisions and files, `401` for unknown repos.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::{commit_of, Seen};

type Response = (u16, Vec<(String, String)>, Vec<u8>);

pub(super) fn serve(
    mut stream: TcpStream,
    root: &Path,
    addr: SocketAddr,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let request = Seen {
        method,
        path,
        headers,
    };
    seen.lock().unwrap().push(request.clone());

    let (status, headers, body) = route(&request, root, addr);
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Whatever",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in &headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(out.as_bytes())?;
    if request.method != "HEAD" {
        stream.write_all(&body)?;
    }
    stream.flush()
}

fn error(status: u16, code: &str) -> Response {
    (
        status,
        vec![("X-Error-Code".into(), code.into())],
        code.as_bytes().to_vec(),
    )
}

/// The bytes of `data` that a `Range` header asks for.
fn ranged(range: Option<&str>, data: &[u8], mut headers: Vec<(String, String)>) -> Response {
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return (200, headers, data.to_vec());
    };
    let (start, end) = spec.split_once('-').unwrap();
    let start: usize = start.parse().unwrap();
    let end: usize = if end.is_empty() {
        data.len().saturating_sub(1)
    } else {
        end.parse::<usize>().unwrap().min(data.len() - 1)
    };
    if start >= data.len() || start > end {
        return error(416, "RangeNotSatisfiable");
    }
    headers.push((
        "Content-Range".into(),
        format!("bytes {start}-{end}/{}", data.len()),
    ));
    (206, headers, data[start..=end].to_vec())
}

fn route(request: &Seen, root: &Path, addr: SocketAddr) -> Response {
    if request.method != "GET" && request.method != "HEAD" {
        return error(405, "MethodNotAllowed");
    }
    let path = request.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let range = request.header("range");

    // The "CDN" that LFS files redirect to: /cdn/<org>/<name>/<revision dir>/<file>.
    if segments.first() == Some(&"cdn") && segments.len() >= 5 {
        let file = root.join(segments[1..].join("/"));
        return match std::fs::read(file) {
            Ok(data) => ranged(range, &data, vec![]),
            Err(_) => error(404, "NoSuchKey"),
        };
    }

    // /<org>/<name>/resolve/<revision>/<file>
    if segments.len() < 5 || segments[2] != "resolve" {
        return error(404, "NotFound");
    }
    let repo = format!("{}/{}", segments[0], segments[1]);
    let repo_dir = root.join(&repo);
    if segments[0].contains("..") || segments[1].contains("..") || !repo_dir.is_dir() {
        // The hub answers 401 for repos it does not know (they might be private).
        return error(401, "RepositoryNotFound");
    }
    // A revision is a folder (named with %2F for '/', as hf-hub sends it) or its commit.
    let asked = segments[3];
    let revision_dir = std::fs::read_dir(&repo_dir)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|dir| dir == asked || commit_of(&repo, &dir.replace("%2F", "/")) == asked);
    let Some(revision_dir) = revision_dir else {
        return error(404, "RevisionNotFound");
    };
    let commit = commit_of(&repo, &revision_dir.replace("%2F", "/"));
    let file = segments[4..].join("/");
    if file.split('/').any(|part| part == ".." || part.is_empty()) {
        return error(404, "EntryNotFound");
    }
    let Ok(data) = std::fs::read(repo_dir.join(&revision_dir).join(&file)) else {
        let (status, mut headers, body) = error(404, "EntryNotFound");
        headers.push(("X-Repo-Commit".into(), commit));
        return (status, headers, body);
    };
    let hash = blake3::hash(&data).to_hex().to_string();
    if file.ends_with(".safetensors") {
        // LFS: the hub redirects to storage elsewhere and names the blob in X-Linked-Etag.
        let location = format!("http://{addr}/cdn/{repo}/{revision_dir}/{file}");
        let headers = vec![
            ("Location".into(), location),
            ("X-Repo-Commit".into(), commit),
            ("X-Linked-Etag".into(), format!("\"{hash}\"")),
            ("X-Linked-Size".into(), data.len().to_string()),
            ("ETag".into(), format!("\"{}\"", &hash[..40])),
        ];
        return (302, headers, Vec::new());
    }
    let headers = vec![
        ("X-Repo-Commit".into(), commit),
        ("ETag".into(), format!("\"{}\"", &hash[..40])),
    ];
    ranged(range, &data, headers)
}
