//! The Hub path end to end against a fake Hub on 127.0.0.1: hf-hub's real client, cache and
//! progress hooks, our verification, atomic install and locking.

mod common;

use std::fs;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{fake_gguf, gguf_entry, isolated, listing, silent_server, FakeHub};
use minserve_hub::{fetch, CatalogEntry, FetchError, ModelFormat};

#[test]
fn downloads_into_the_models_folder_and_reuses_the_hf_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = fake_gguf(3 << 20);
    let hub = FakeHub::serve(&[("org/tiny-GGUF/tiny.gguf", bytes.clone())]);
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(hub.endpoint.clone());
    let entry = gguf_entry("org/tiny-GGUF", "tiny.gguf", Some(bytes.len() as u64), None);

    let path = fetch("tiny", &entry, &opts).expect("fetched");
    assert_eq!(
        path,
        tmp.path().join("models").join("tiny").join("tiny.gguf")
    );
    assert_eq!(fs::read(&path).expect("read"), bytes);
    assert_eq!(hub.downloads(), 1);
    assert_eq!(
        listing(&tmp.path().join("models").join("tiny")),
        ["tiny.gguf"]
    );

    // A second models folder sharing the Hugging Face cache gets the file with the Hub gone.
    let mut again = opts.clone();
    again.models_dir = Some(tmp.path().join("models2"));
    again.hub_endpoint = Some("http://127.0.0.1:9".into());
    let path2 = fetch("tiny", &entry, &again).expect("from the cache");
    assert_eq!(fs::read(&path2).expect("read"), bytes);
    assert_eq!(hub.downloads(), 1, "no second download");
}

#[test]
fn a_wrong_file_from_the_hub_is_rejected_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = FakeHub::serve(&[
        ("org/bad/html.gguf", b"<html>rate limited</html>".to_vec()),
        ("org/bad/short.gguf", fake_gguf(2 << 20)),
    ]);
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(hub.endpoint.clone());

    let entry = gguf_entry("org/bad", "html.gguf", None, None);
    let err = fetch("html", &entry, &opts).expect_err("not gguf");
    assert!(err.to_string().contains("GGUF magic"), "{err}");
    assert!(!tmp.path().join("models").join("html").exists());

    let entry = gguf_entry("org/bad", "short.gguf", Some(3 << 20), None);
    let err = fetch("short", &entry, &opts).expect_err("wrong size");
    assert!(err.to_string().contains("the catalog expects"), "{err}");
    assert!(!tmp.path().join("models").join("short").exists());
}

#[test]
fn a_missing_repo_file_reports_the_http_status() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = FakeHub::serve(&[]);
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(hub.endpoint.clone());
    let entry = gguf_entry("org/none", "m.gguf", None, None);
    let err = fetch("none", &entry, &opts).expect_err("404");
    assert!(err.to_string().contains("404"), "{err}");
}

#[test]
fn a_stalled_hub_is_abandoned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(silent_server());
    opts.stall_timeout = Duration::from_secs(1);
    let entry = gguf_entry("org/slow", "m.gguf", None, None);
    let start = Instant::now();
    let err = fetch("slow", &entry, &opts).expect_err("stalled");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("stalled"), "{err}");
}

#[test]
fn concurrent_fetches_download_once_and_agree() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = fake_gguf(4 << 20);
    let hub = Arc::new(FakeHub::serve(&[("org/shared/m.gguf", bytes.clone())]));
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(hub.endpoint.clone());
    let entry = gguf_entry("org/shared", "m.gguf", Some(bytes.len() as u64), None);

    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (opts, entry) = (opts.clone(), entry.clone());
            thread::spawn(move || fetch("shared", &entry, &opts))
        })
        .collect();
    let paths: Vec<_> = workers
        .into_iter()
        .map(|w| w.join().expect("no panic").expect("fetched"))
        .collect();
    assert!(paths.windows(2).all(|w| w[0] == w[1]), "{paths:?}");
    assert_eq!(fs::read(&paths[0]).expect("read"), bytes);
    assert_eq!(
        hub.downloads(),
        1,
        "the lock makes the others wait and reuse"
    );
}

#[test]
fn an_hf_folder_is_fetched_file_by_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let header = br#"{"__metadata__":{"format":"pt"}}"#;
    let mut weights = (header.len() as u64).to_le_bytes().to_vec();
    weights.extend_from_slice(header);
    let hub = FakeHub::serve(&[
        (
            "org/folder/config.json",
            br#"{"model_type":"llama"}"#.to_vec(),
        ),
        ("org/folder/tokenizer.json", br#"{"model":{}}"#.to_vec()),
        ("org/folder/model.safetensors", weights),
    ]);
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(hub.endpoint.clone());
    let entry = CatalogEntry {
        description: "folder".into(),
        format: ModelFormat::Hf,
        hf_repo: "org/folder".into(),
        revision: None,
        file: None,
        files: vec![
            "config.json".into(),
            "tokenizer.json".into(),
            "model.safetensors".into(),
        ],
        size: None,
        sha256: None,
        pip: None,
        pip_parts: Vec::new(),
    };
    let dir = fetch("folder", &entry, &opts).expect("fetched");
    assert_eq!(dir, tmp.path().join("models").join("folder"));
    assert_eq!(
        listing(&dir),
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    assert_eq!(hub.downloads(), 3);
}

#[test]
fn a_partly_missing_hf_folder_names_the_missing_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hub = FakeHub::serve(&[("org/partial/tokenizer.json", b"{}".to_vec())]);
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(hub.endpoint.clone());
    let entry = CatalogEntry {
        description: "folder".into(),
        format: ModelFormat::Hf,
        hf_repo: "org/partial".into(),
        revision: None,
        file: None,
        files: vec!["config.json".into(), "tokenizer.json".into()],
        size: None,
        sha256: None,
        pip: None,
        pip_parts: Vec::new(),
    };
    let err = fetch("partial", &entry, &opts).expect_err("config.json missing");
    let FetchError::AllSourcesFailed { attempts, .. } = &err else {
        panic!("expected AllSourcesFailed, got {err}");
    };
    let hub_failure = attempts.last().expect("attempts");
    assert!(hub_failure.reason.contains("config.json"), "{hub_failure}");
    let dir = tmp.path().join("models").join("partial");
    assert!(
        !dir.join("config.json").exists(),
        "an incomplete folder is not a model"
    );
}

#[test]
fn a_hub_file_with_the_right_size_but_wrong_sha256_is_rejected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = fake_gguf(2 << 20);
    let mut served = good.clone();
    served[4096] ^= 1;
    let hub = FakeHub::serve(&[("org/flipped/m.gguf", served)]);
    let mut opts = isolated(tmp.path());
    opts.hub_endpoint = Some(hub.endpoint.clone());
    let mut entry = gguf_entry("org/flipped", "m.gguf", Some(good.len() as u64), None);
    // sha256 of `fake_gguf(2 << 20)`, computed apart from minserve:
    // python3 -c "import hashlib;b=b'GGUF\x03\0\0\0'+bytes(i%251 for i in range(2*2**20-8));print(hashlib.sha256(b).hexdigest())"
    entry.sha256 = Some(GOOD_SHA256.into());
    let err = fetch("flipped", &entry, &opts).expect_err("one bit off");
    assert!(
        err.to_string().contains("sha256") && err.to_string().contains(GOOD_SHA256),
        "{err}"
    );
    assert!(!tmp.path().join("models").join("flipped").exists());

    // Once the Hub serves the right bytes, the fetch recovers although the wrong ones are still
    // in the Hugging Face cache: the cache step fails the checksum, the Hub step downloads anew.
    let fixed = FakeHub::serve(&[("org/flipped/m.gguf", good.clone())]);
    opts.hub_endpoint = Some(fixed.endpoint.clone());
    let path = fetch("flipped", &entry, &opts).expect("the right bytes pass");
    assert!(fs::read(path).expect("read") == good);
}

const GOOD_SHA256: &str = "409e0f58d6fe54db47bf8659cf5c90c9002ec189bd67edcf7c021f11751d9f02";
