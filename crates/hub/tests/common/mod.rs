//! A fake Hugging Face Hub on 127.0.0.1, speaking just enough of the protocol `hf-hub` uses
//! (a `Range: bytes=0-0` metadata request, then a ranged download), plus helpers.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use minserve_hub::{CatalogEntry, FetchOptions, ModelFormat, PipSource};

/// The commit hash the fake Hub reports for every file.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub struct FakeHub {
    pub endpoint: String,
    downloads: Arc<AtomicUsize>,
}

impl FakeHub {
    /// Serves `files`, keyed by `owner/name/file`, at revision `main`.
    pub fn serve(files: &[(&str, Vec<u8>)]) -> Self {
        let files: HashMap<String, Arc<Vec<u8>>> = files
            .iter()
            .map(|(k, v)| {
                let (repo, file) = k.rsplit_once('/').expect("owner/name/file");
                (format!("/{repo}/resolve/main/{file}"), Arc::new(v.clone()))
            })
            .collect();
        let files = Arc::new(files);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let downloads = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&downloads);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let files = Arc::clone(&files);
                let counter = Arc::clone(&counter);
                thread::spawn(move || {
                    let _ = handle(stream, &files, &counter);
                });
            }
        });
        Self {
            endpoint,
            downloads,
        }
    }

    /// Data requests served (not counting the one-byte metadata probes).
    pub fn downloads(&self) -> usize {
        self.downloads.load(Ordering::SeqCst)
    }
}

fn handle(
    stream: TcpStream,
    files: &HashMap<String, Arc<Vec<u8>>>,
    downloads: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").map(String::from);
            }
        }
    }
    let mut out = stream;
    let Some(body) = files.get(&path) else {
        return out.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let len = body.len();
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => (
            a.parse().unwrap_or(0),
            b.parse().unwrap_or(len.saturating_sub(1)),
        ),
        None => (0, len.saturating_sub(1)),
    };
    if !(start == 0 && end == 0) {
        downloads.fetch_add(1, Ordering::SeqCst);
    }
    let end = end.min(len.saturating_sub(1));
    let chunk = if len == 0 {
        &[][..]
    } else {
        &body[start..=end]
    };
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{len}\r\n\
         ETag: \"etag-{}-{len}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        chunk.len(),
        path.len(),
    );
    out.write_all(head.as_bytes())?;
    out.write_all(chunk)?;
    out.flush()
}

/// A server that accepts connections and never answers: a stalled Hub.
pub fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let held = Arc::new(Mutex::new(Vec::new()));
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Ok(mut held) = held.lock() {
                held.push(stream);
            }
        }
    });
    endpoint
}

/// A GGUF-looking file of `len` bytes (magic, version 3, then a pattern).
pub fn fake_gguf(len: usize) -> Vec<u8> {
    let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
    bytes.extend((0..len.saturating_sub(8)).map(|i| (i % 251) as u8));
    bytes
}

/// A catalog entry for a GGUF file in `repo`.
pub fn gguf_entry(
    repo: &str,
    file: &str,
    size: Option<u64>,
    pip: Option<PipSource>,
) -> CatalogEntry {
    CatalogEntry {
        description: "test model".into(),
        format: ModelFormat::Gguf,
        hf_repo: repo.into(),
        revision: None,
        file: Some(file.into()),
        files: Vec::new(),
        size,
        sha256: None,
        pip,
        pip_parts: Vec::new(),
    }
}

/// Options that touch nothing outside `root`, and no network unless the test says so: the Hub
/// is a closed local port and the Python does not exist.
pub fn isolated(root: &Path) -> FetchOptions {
    FetchOptions {
        offline: false,
        quiet: true,
        models_dir: Some(root.join("models")),
        hub_endpoint: Some("http://127.0.0.1:9".into()),
        hub_cache_dir: Some(root.join("hf-cache")),
        python: Some(root.join("no-such-python")),
        connect_timeout: Duration::from_secs(3),
        stall_timeout: Duration::from_secs(10),
    }
}

/// Names in `dir`, sorted, to check what a fetch left behind.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

pub fn path_of(root: &Path, parts: &[&str]) -> PathBuf {
    parts
        .iter()
        .fold(root.to_path_buf(), |p, part| p.join(part))
}
