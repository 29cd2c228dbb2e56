//! Broken model files give clear errors naming the file and the cause, never a panic.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use minserve_model::load_model;

fn error_of(path: &Path) -> String {
    match load_model(path) {
        Ok(_) => panic!("{} loaded, but it should not", path.display()),
        Err(e) => e.to_string(),
    }
}

/// A small GGUF with the given metadata and one tensor called `weight`.
fn write_gguf(path: &Path, metadata: &[(&str, Value)]) {
    let tensor = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let tensor = QTensor::quantize(&tensor, GgmlDType::F32).unwrap();
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &[("weight", &tensor)]).unwrap();
}

#[test]
fn missing_file() {
    let err = error_of(Path::new("/nonexistent/model.gguf"));
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"this is not a model").unwrap();
    let err = error_of(&path);
    assert!(
        err.contains("model.gguf") && err.contains("not a readable GGUF"),
        "{err}"
    );
}

#[test]
fn truncated_download() {
    let real = std::fs::read(common::default_model_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &real[..real.len() / 2]).unwrap();
    let err = error_of(&path);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bert.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("bert".into()))],
    );
    let err = error_of(&path);
    assert!(
        err.contains("bert.gguf") && err.contains("`bert` is not supported"),
        "{err}"
    );
}

#[test]
fn tokenizer_that_cannot_be_built() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notok.gguf");
    let u32 = Value::U32;
    write_gguf(
        &path,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", u32(64)),
            ("llama.feed_forward_length", u32(128)),
            ("llama.block_count", u32(1)),
            ("llama.attention.head_count", u32(4)),
            ("llama.vocab_size", u32(32)),
        ],
    );
    let err = error_of(&path);
    assert!(err.contains("notok.gguf: tokenizer"), "{err}");
}

#[test]
fn unsupported_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("oddtype.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("llama".into()))],
    );
    // Patch the tensor's type id (the u32 after its name, dimension count and dimensions) to
    // one no GGUF reader knows.
    let mut bytes = std::fs::read(&path).unwrap();
    let name_at = bytes.windows(6).position(|w| w == b"weight").unwrap();
    let type_at = name_at + 6 + 4 + 2 * 8;
    bytes[type_at..type_at + 4].copy_from_slice(&250u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = error_of(&path);
    assert!(
        err.contains("oddtype.gguf") && err.contains("not a readable GGUF"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_names_the_key_and_what_is_supported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phi.gguf");
    write_gguf(
        &path,
        &[("general.architecture", Value::String("phi3".into()))],
    );
    let err = error_of(&path);
    assert!(
        err.contains("`phi3`")
            && err.contains("general.architecture")
            && err.contains("llama")
            && err.contains("gemma3"),
        "{err}"
    );
}
