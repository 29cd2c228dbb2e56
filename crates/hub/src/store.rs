//! The local models folder: locking, temp files, verification and the final atomic rename.
//!
//! Every byte reaches `models/<alias>/` the same way: written (or hard-linked) under a hidden
//! temp name in that same folder, checked, then renamed onto its final name. A rename within
//! one folder is atomic, so a reader sees either no file or the complete, verified one; a
//! killed download leaves only a hidden temp file, which the next fetch sweeps away.

use std::fs::{self, File, TryLockError};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::FetchError;

/// What a downloaded GGUF file must match, as its catalog entry says.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Expected<'a> {
    /// Exact length in bytes.
    pub size: Option<u64>,
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: Option<&'a str>,
}

/// Prefix of everything transient we create in a model folder.
const TEMP_PREFIX: &str = ".minserve-tmp-";
/// Folder (inside the models folder) of the per-model fetch locks. The locks live outside the
/// model folders so that a failed fetch can remove the model folder it created, and the
/// folder of a fetched model holds nothing but the model.
const LOCKS_DIR: &str = ".minserve-locks";
/// The GGUF magic, the first four bytes of every GGUF file.
pub(crate) const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Smallest GGUF we accept when the catalog gives no exact size: real models are tens of
/// megabytes at least, while error pages and truncated bodies are small.
pub(crate) const MIN_GGUF_BYTES: u64 = 1 << 20;

/// Held while fetching into a model folder; dropping it releases the lock.
pub(crate) struct DirLock {
    _file: File,
}

/// Takes the fetch lock of model `alias` in `models`, waiting for another fetcher if there is
/// one: two `minserve` processes (or parallel tests) asking for the same model then download
/// it once, and the second simply finds the finished file.
pub(crate) fn lock_model(models: &Path, alias: &str, quiet: bool) -> Result<DirLock, FetchError> {
    let locks = models.join(LOCKS_DIR);
    fs::create_dir_all(&locks).map_err(|source| FetchError::Io {
        context: "cannot create the lock folder",
        path: locks.clone(),
        source,
    })?;
    let path = locks.join(format!("{alias}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| FetchError::Io {
            context: "cannot open the fetch lock",
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            if !quiet {
                eprintln!("minserve: waiting for another download of `{alias}` to finish");
            }
            file.lock().map_err(|source| FetchError::Io {
                context: "cannot lock",
                path: path.clone(),
                source,
            })?;
        }
        // Some network file systems have no locks; fetching unlocked is still safe for
        // readers (atomic renames), it can only waste a duplicate download.
        Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {
            tracing::warn!("no file locking at {}: {e}", path.display());
        }
        Err(TryLockError::Error(source)) => {
            return Err(FetchError::Io {
                context: "cannot lock",
                path,
                source,
            })
        }
    }
    Ok(DirLock { _file: file })
}

/// Removes leftovers of killed fetches. Only called with the folder's lock held, so nothing
/// in there is still being written.
pub(crate) fn sweep_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::debug!("removed stale {}", path.display()),
            Err(e) => tracing::warn!("cannot remove stale {}: {e}", path.display()),
        }
    }
}

/// A hidden path in a model folder that is deleted on drop unless persisted, so every error
/// path (and panic) cleans up after itself.
pub(crate) struct TempPath {
    path: PathBuf,
    keep: bool,
}

impl TempPath {
    /// A fresh, unused name in `dir`: pid plus a counter keeps threads and processes apart.
    pub(crate) fn new_in(dir: &Path, label: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{TEMP_PREFIX}{}-{n}-{label}", std::process::id());
        Self {
            path: dir.join(name),
            keep: false,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temp file onto `dest`, after which it is no longer ours to delete.
    pub(crate) fn persist(mut self, dest: &Path) -> io::Result<()> {
        fs::rename(&self.path, dest)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = if self.path.is_dir() {
            fs::remove_dir_all(&self.path)
        } else {
            fs::remove_file(&self.path)
        };
    }
}

/// Checks that `path` starts like a GGUF file: magic, then a known version (1 to 3).
pub(crate) fn check_gguf_header(path: &Path) -> Result<(), String> {
    let mut head = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("cannot read the GGUF header: {e}"))?;
    if &head[..4] != GGUF_MAGIC {
        return Err(format!(
            "does not start with the GGUF magic (first bytes {:?})",
            String::from_utf8_lossy(&head[..4])
        ));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(1..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    Ok(())
}

/// Verifies a downloaded file before it gets its final name. What "plausible" means depends
/// on the kind of file: GGUF header, size and checksum, JSON that parses, a safetensors header.
pub(crate) fn verify(path: &Path, name: &str, expected: Expected) -> Result<(), String> {
    let len = fs::metadata(path)
        .map_err(|e| format!("cannot stat the download: {e}"))?
        .len();
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".gguf") {
        check_gguf_header(path)?;
        match expected.size {
            Some(size) if len != size => {
                return Err(format!(
                "size is {len} bytes, the catalog expects {size} (truncated or a different file)"
            ))
            }
            None if len < MIN_GGUF_BYTES => {
                return Err(format!(
                    "only {len} bytes, too small for a model (truncated download?)"
                ))
            }
            _ => {}
        }
        if let Some(want) = expected.sha256 {
            let got = sha256_of(path)?;
            if got != want {
                return Err(format!(
                    "sha256 is {got}, the catalog expects {want} (corrupted download or a different file)"
                ));
            }
        }
    } else if lower.ends_with(".json") {
        let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        serde_json::from_reader::<_, serde_json::Value>(BufReader::new(file))
            .map_err(|e| format!("not valid JSON: {e}"))?;
    } else if lower.ends_with(".safetensors") {
        let mut head = [0u8; 9];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .map_err(|e| format!("cannot read the safetensors header: {e}"))?;
        let header_len = u64::from_le_bytes([
            head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
        ]);
        if head[8] != b'{' || header_len.saturating_add(8) > len {
            return Err("not a safetensors file (bad header)".into());
        }
    } else if len == 0 {
        return Err("empty file".into());
    }
    Ok(())
}

/// Lower-case hex SHA-256 of a file's bytes.
pub(crate) fn sha256_of(path: &Path) -> Result<String, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Places a copy of `src` (a file in the Hugging Face cache) at `dest`, verified. A hard link
/// costs no space or time; across file systems we fall back to copying.
pub(crate) fn install_copy(src: &Path, dest: &Path, expected: Expected) -> Result<(), String> {
    // The cache's snapshot entries are symlinks into blobs/; link the blob itself.
    let src = fs::canonicalize(src).map_err(|e| format!("cannot open {}: {e}", src.display()))?;
    let dir = parent_of(dest)?;
    let name = file_name_of(dest)?;
    let tmp = TempPath::new_in(dir, &name);
    if fs::hard_link(&src, tmp.path()).is_err() {
        fs::copy(&src, tmp.path())
            .map_err(|e| format!("cannot copy {} into {}: {e}", src.display(), dir.display()))?;
    }
    verify(tmp.path(), &name, expected)?;
    tmp.persist(dest)
        .map_err(|e| format!("cannot rename into {}: {e}", dest.display()))
}

/// Lets `write` fill a temp file beside `dest` (returning how many bytes it wrote), then
/// verifies, syncs and renames it: the file of several streams (a model split over packages)
/// reaches its final name as whole as a single download does.
pub(crate) fn install_written(
    dest: &Path,
    expected: Expected,
    write: impl FnOnce(&mut dyn Write) -> Result<u64, String>,
) -> Result<u64, String> {
    let dir = parent_of(dest)?;
    let name = file_name_of(dest)?;
    let tmp = TempPath::new_in(dir, &name);
    let mut file = File::create(tmp.path())
        .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
    let written = write(&mut file).map_err(|e| format!("{name}: {e}"))?;
    // Synced before the rename: after a crash the final name must never point at lost data.
    file.sync_all()
        .map_err(|e| format!("cannot flush {name}: {e}"))?;
    drop(file);
    verify(tmp.path(), &name, expected)?;
    tmp.persist(dest)
        .map_err(|e| format!("cannot rename into {}: {e}", dest.display()))?;
    Ok(written)
}

fn parent_of(path: &Path) -> Result<&Path, String> {
    path.parent()
        .ok_or_else(|| format!("{} has no parent folder", path.display()))
}

fn file_name_of(path: &Path) -> Result<String, String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} has no file name", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install_bytes(bytes: &[u8], dest: &Path, expected: Expected) -> Result<u64, String> {
        install_written(dest, expected, |file| {
            io::copy(&mut &bytes[..], file).map_err(|e| e.to_string())
        })
    }

    fn size(bytes: u64) -> Expected<'static> {
        Expected {
            size: Some(bytes),
            sha256: None,
        }
    }

    fn gguf_bytes(len: usize) -> Vec<u8> {
        let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
        bytes.resize(len, 0);
        bytes
    }

    #[test]
    fn verify_checks_magic_version_and_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        fs::write(&path, gguf_bytes(4096)).expect("write");
        assert!(verify(&path, "m.gguf", size(4096)).is_ok());
        assert!(verify(&path, "m.gguf", size(4097))
            .expect_err("size")
            .contains("expects 4097"));
        assert!(verify(&path, "m.gguf", Expected::default())
            .expect_err("min size")
            .contains("too small"));
        fs::write(&path, b"<html>not found</html>").expect("write");
        assert!(verify(&path, "m.gguf", Expected::default())
            .expect_err("magic")
            .contains("magic"));
        fs::write(&path, b"GGUF\x09\x00\x00\x00").expect("write");
        assert!(verify(&path, "m.gguf", Expected::default())
            .expect_err("version")
            .contains("version"));
    }

    #[test]
    fn verify_checks_the_sha256_of_a_gguf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        let mut bytes = gguf_bytes(4096);
        fs::write(&path, &bytes).expect("write");
        // Computed independently of `sha256_of`:
        // python3 -c "import hashlib;print(hashlib.sha256(b'GGUF\x03\0\0\0'+bytes(4088)).hexdigest())"
        let good = "d3e7a1b9ae65886f0202a4b2a5171212307ee7726ff2822af9eba522f17f5dcb";
        assert_eq!(sha256_of(&path).expect("hash"), good);
        let expected = |sha256| Expected {
            size: Some(4096),
            sha256: Some(sha256),
        };
        assert!(verify(&path, "m.gguf", expected(good)).is_ok());
        bytes[100] ^= 1; // same size, one bit flipped
        fs::write(&path, &bytes).expect("write");
        let err = verify(&path, "m.gguf", expected(good)).expect_err("corrupted");
        assert!(err.contains("sha256") && err.contains(good), "{err}");
    }

    #[test]
    fn verify_checks_json_and_safetensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("config.json");
        fs::write(&json, b"{\"a\":1}").expect("write");
        assert!(verify(&json, "config.json", Expected::default()).is_ok());
        fs::write(&json, b"{\"a\":").expect("write");
        assert!(verify(&json, "config.json", Expected::default()).is_err());

        let st = dir.path().join("model.safetensors");
        let header = b"{\"__metadata__\":{}}";
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        fs::write(&st, &bytes).expect("write");
        assert!(verify(&st, "model.safetensors", Expected::default()).is_ok());
        bytes[0] = 200; // header longer than the file
        fs::write(&st, &bytes).expect("write");
        assert!(verify(&st, "model.safetensors", Expected::default()).is_err());
    }

    #[test]
    fn failed_installs_leave_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("m.gguf");
        let err = install_bytes(b"not a model", &dest, Expected::default()).expect_err("invalid");
        assert!(err.contains("magic"), "{err}");
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 0);

        let bytes = gguf_bytes(2048);
        let written = install_bytes(&bytes, &dest, size(2048)).expect("valid");
        assert_eq!(written, 2048);
        assert_eq!(fs::read(&dest).expect("read"), bytes);
        assert_eq!(fs::read_dir(dir.path()).expect("read_dir").count(), 1);
    }

    #[test]
    fn install_copy_links_or_copies_and_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("blob");
        fs::write(&src, gguf_bytes(1024)).expect("write");
        let dest_dir = dir.path().join("alias");
        fs::create_dir(&dest_dir).expect("mkdir");
        let dest = dest_dir.join("m.gguf");
        install_copy(&src, &dest, size(1024)).expect("install");
        assert_eq!(fs::read(&dest).expect("read").len(), 1024);
        let other = dest_dir.join("n.gguf");
        assert!(install_copy(&src, &other, size(1)).is_err());
        assert!(!other.exists());
    }

    #[test]
    fn sweep_removes_only_temp_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keep = dir.path().join("m.gguf");
        fs::write(&keep, b"x").expect("write");
        let stale = TempPath::new_in(dir.path(), "m.gguf");
        fs::write(stale.path(), b"half").expect("write");
        let stale_path = stale.path().to_path_buf();
        std::mem::forget(stale); // as if the process had been killed
        let stale_dir = TempPath::new_in(dir.path(), "pip");
        fs::create_dir(stale_dir.path()).expect("mkdir");
        let stale_dir_path = stale_dir.path().to_path_buf();
        std::mem::forget(stale_dir);
        sweep_stale(dir.path());
        assert!(keep.exists());
        assert!(!stale_path.exists());
        assert!(!stale_dir_path.exists());
    }
}
