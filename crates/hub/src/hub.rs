//! The Hugging Face Hub and its local cache, through `hf-hub`.
//!
//! `hf-hub` (0.4, ureq backend) sets no read timeout and resolves host names without one, so on
//! a machine with no route to the Hub a plain download can hang for a long time. Two guards
//! bound it here without forking the library:
//! - a reachability probe before the first request: DNS plus a TCP connect to the endpoint (or
//!   to the proxy ureq would use), run on a helper thread and abandoned after
//!   `connect_timeout`;
//! - a stall watchdog: the download runs on a worker thread and reports every chunk through
//!   `hf_hub::api::Progress`; if nothing arrives for `stall_timeout` we give up on it. The
//!   worker thread is left to die with the process; it only ever writes inside the Hugging Face
//!   cache (under hf-hub's own lock and `.part` file), never into the models folder.

use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

/// The variables ureq reads for a proxy, in its order of precedence.
const PROXY_VARS: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
];

/// How to reach the Hub, resolved from options and environment.
pub(crate) struct HubConfig {
    /// `None`: hf-hub's built-in endpoint.
    pub endpoint: Option<String>,
    pub cache_dir: PathBuf,
    pub connect_timeout: Duration,
    pub stall_timeout: Duration,
    pub quiet: bool,
}

/// The Hugging Face cache folder the way hf-hub 0.4 finds it (`$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`), but without its panic when there is no home folder.
pub(crate) fn default_cache_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(home).join("hub"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .or_else(|| std::env::var_os("USERPROFILE").filter(|v| !v.is_empty()))?;
    Some(
        PathBuf::from(home)
            .join(".cache")
            .join("huggingface")
            .join("hub"),
    )
}

fn repo(repo_id: &str, revision: Option<&str>) -> Repo {
    match revision {
        Some(rev) => Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::model(repo_id.to_string()),
    }
}

/// A file already in the Hugging Face cache (put there by us, `huggingface-cli` or Python).
pub(crate) fn cached(
    cache_dir: &Path,
    repo_id: &str,
    revision: Option<&str>,
    file: &str,
) -> Option<PathBuf> {
    Cache::new(cache_dir.to_path_buf())
        .repo(repo(repo_id, revision))
        .get(file)
}

/// A connection to one repo, checked to be reachable.
pub(crate) struct HubRepo {
    repo: Arc<ApiRepo>,
    stall_timeout: Duration,
    quiet: bool,
}

impl HubRepo {
    /// Builds the client and probes the endpoint, so an unreachable Hub costs at most
    /// `connect_timeout` rather than a hang.
    pub(crate) fn connect(
        config: &HubConfig,
        repo_id: &str,
        revision: Option<&str>,
        probe_file: &str,
    ) -> Result<Self, String> {
        let mut builder = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
            .with_progress(false)
            .with_retries(2)
            .with_user_agent("minserve", env!("CARGO_PKG_VERSION"));
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        // hf-hub 0.4 reads the token file under HF_HOME but not the HF_TOKEN variable, which
        // is how most people (and CI) pass one.
        if let Some(token) = std::env::var("HF_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
        {
            builder = builder.with_token(Some(token));
        }
        let api = builder
            .build()
            .map_err(|e| format!("cannot set up the client: {e}"))?;
        let repo = api.repo(repo(repo_id, revision));
        let url = repo.url(probe_file);
        probe(&url, config.connect_timeout)?;
        Ok(Self {
            repo: Arc::new(repo),
            stall_timeout: config.stall_timeout,
            quiet: config.quiet,
        })
    }

    /// Downloads `file` into the Hugging Face cache and returns its path there.
    pub(crate) fn download(&self, file: &str) -> Result<PathBuf, String> {
        let activity = Arc::new(Activity::new());
        let progress = WatchedProgress {
            activity: Arc::clone(&activity),
            bar: (!self.quiet).then(StderrBar::new),
        };
        let (tx, rx) = mpsc::channel();
        let repo = Arc::clone(&self.repo);
        let name = file.to_string();
        thread::Builder::new()
            .name("minserve-hub-download".into())
            .spawn(move || {
                let result = repo.download_with_progress(&name, progress);
                let _ = tx.send(result.map_err(|e| e.to_string()));
            })
            .map_err(|e| format!("cannot start the download thread: {e}"))?;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(result) => return result,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let idle = activity.idle();
                    if idle >= self.stall_timeout {
                        if !self.quiet {
                            eprintln!();
                        }
                        return Err(format!(
                            "no data for {}s, giving up (stalled connection)",
                            idle.as_secs()
                        ));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(
                        "the download thread stopped without a result (hf-hub panicked)".into(),
                    )
                }
            }
        }
    }
}

/// Resolves and connects to whatever the HTTP client will connect to first, within `timeout`.
fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    let proxy = PROXY_VARS
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()));
    match &proxy {
        Some(p) => reach(p, " (the proxy from the environment)", timeout),
        None => reach(url, "", timeout),
    }
}

/// Resolves and connects to the host of `target` within `timeout`; `via` labels the message.
fn reach(target: &str, via: &str, timeout: Duration) -> Result<(), String> {
    let (host, port) =
        host_port(target).ok_or_else(|| format!("cannot parse a host out of `{target}`"))?;
    let (tx, rx) = mpsc::channel();
    let (h, deadline) = (host.clone(), Instant::now() + timeout);
    // getaddrinfo has no timeout of its own, hence the thread we can walk away from.
    thread::Builder::new()
        .name("minserve-hub-probe".into())
        .spawn(move || {
            let _ = tx.send(connect(&h, port, deadline));
        })
        .map_err(|e| format!("cannot start the probe thread: {e}"))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot reach {host}:{port}{via}: {e}")),
        Err(_) => Err(format!(
            "cannot reach {host}:{port}{via}: no answer within {}s (no network or DNS?)",
            timeout.as_secs_f32()
        )),
    }
}

fn connect(host: &str, port: u16, deadline: Instant) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the host name: {e}"))?
        .collect();
    let mut last = String::from("the host name has no address");
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out".into());
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// `scheme://user@host:port/path` -> (host, port), with the scheme's default port.
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        s if s.starts_with("socks") => 1080,
        _ => 80,
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port,
    };
    Some((host.to_string(), port))
}

/// When the download last moved, shared between the worker and the watchdog.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// hf-hub's progress hook: feeds the watchdog and draws our bar. (hf-hub's own bar is an
/// `indicatif` type we cannot wrap without depending on `indicatif` ourselves.)
struct WatchedProgress {
    activity: Arc<Activity>,
    bar: Option<StderrBar>,
}

impl Progress for WatchedProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.activity.touch();
        if let Some(bar) = &mut self.bar {
            bar.init(size as u64, filename);
        }
    }

    fn update(&mut self, size: usize) {
        self.activity.touch();
        if let Some(bar) = &mut self.bar {
            bar.update(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &mut self.bar {
            bar.finish();
        }
    }
}

/// A one-line progress display on stderr: redrawn in place on a terminal, a line per tenth
/// in logs (so CI output stays readable).
struct StderrBar {
    name: String,
    total: u64,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
    last_tenth: u64,
    tty: bool,
}

impl StderrBar {
    fn new() -> Self {
        Self {
            name: String::new(),
            total: 0,
            done: 0,
            started: Instant::now(),
            last_draw: None,
            last_tenth: 0,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn init(&mut self, total: u64, name: &str) {
        self.name = name.to_string();
        self.total = total;
        self.done = 0;
        self.last_tenth = 0;
        self.started = Instant::now();
    }

    fn update(&mut self, n: u64) {
        self.done = self.done.saturating_add(n);
        if self.tty {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
            if due {
                self.draw("\r");
            }
        } else if let Some(tenth) = self.done.saturating_mul(10).checked_div(self.total) {
            if tenth > self.last_tenth && tenth < 10 {
                self.last_tenth = tenth;
                self.draw("");
                eprintln!();
            }
        }
    }

    fn finish(&mut self) {
        self.draw(if self.tty { "\r" } else { "" });
        eprintln!();
    }

    fn draw(&mut self, prefix: &str) {
        const MIB: f64 = 1024.0 * 1024.0;
        self.last_draw = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let pct = if self.total > 0 {
            self.done as f64 * 100.0 / self.total as f64
        } else {
            0.0
        };
        let mut err = std::io::stderr().lock();
        // On a terminal, trailing blanks wipe what a longer previous line left behind.
        let pad = if self.tty { "   " } else { "" };
        let _ = write!(
            err,
            "{prefix}  {}: {:.1}/{:.1} MiB ({pct:.0}%), {:.1} MiB/s{pad}",
            self.name,
            self.done as f64 / MIB,
            self.total as f64 / MIB,
            self.done as f64 / MIB / secs
        );
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parses_endpoints_and_proxies() {
        let hp = |s: &str| host_port(s);
        assert_eq!(hp("http://127.0.0.1:9"), Some(("127.0.0.1".into(), 9)));
        assert_eq!(
            hp("https://example.test/a/b"),
            Some(("example.test".into(), 443))
        );
        assert_eq!(
            hp("http://u:p@proxy.test:3128/"),
            Some(("proxy.test".into(), 3128))
        );
        assert_eq!(hp("proxy.test"), Some(("proxy.test".into(), 80)));
        assert_eq!(hp("socks5://proxy.test"), Some(("proxy.test".into(), 1080)));
        assert_eq!(hp("http://[::1]:8080/x"), Some(("::1".into(), 8080)));
        assert_eq!(hp("http://:80"), None);
        assert_eq!(hp("http://host:notaport"), None);
    }

    #[test]
    fn probe_fails_fast_on_a_closed_port() {
        let start = Instant::now();
        let err = reach("http://127.0.0.1:9/x", "", Duration::from_secs(3)).expect_err("closed");
        assert!(err.contains("127.0.0.1:9"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn activity_measures_idle_time() {
        let a = Activity::new();
        thread::sleep(Duration::from_millis(30));
        assert!(a.idle() >= Duration::from_millis(30));
        a.touch();
        assert!(a.idle() < Duration::from_millis(30));
    }
}
