//! Tenants: who a request is from, read from its API key (`--api-keys FILE`), and the limits
//! that keep one tenant from taking the server from the others.
//!
//! ```toml
//! [[tenant]]
//! name = "alice"
//! keys = ["sk-alice-1", "sk-alice-2"]
//! weight = 3                      # fair-share weight, the tenant's priority class (default 1)
//! max_concurrent_requests = 8     # default: no limit
//! tokens_per_minute = 60000       # prompt + max_tokens of each request; default: no limit
//! ```
//!
//! Three mechanisms, from the outside in:
//! * the key: a key not in the file is a 401 (and a key dropped from the file stops working
//!   at the next reload);
//! * the limits, checked at admission ([`TenantPermit::acquire`]): over `max_concurrent_requests` or
//!   `tokens_per_minute`, a 429 with `Retry-After` (OpenAI's `rate_limit_error`);
//! * inside the engine, weighted fair queuing across tenants by `weight`
//!   (`minserve_core::fair_share`): what is admitted queues fairly.
//!
//! The file is reloaded on SIGHUP ([`reload_api_keys_on_sighup`](crate::reload_api_keys_on_sighup)): the new table
//! replaces the old one in one swap, so a request sees either the old keys or the new ones,
//! never a mix; a file that does not parse leaves the old keys in place and the reason is
//! logged. A tenant keeps its counters (requests in flight, tokens used) across reloads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use minserve_core::fair_share::TenantShare;
use serde::Deserialize;
use toml::Spanned;

use crate::config_text::at_line;
use crate::error::ApiError;

/// A tenant's limits, as the file sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLimits {
    pub weight: u32,
    pub max_concurrent_requests: Option<usize>,
    pub tokens_per_minute: Option<u64>,
}

/// A tenant and what it is using now.
pub struct Tenant {
    name: Arc<str>,
    limits: RwLock<TenantLimits>,
    in_flight: AtomicUsize,
    /// Tokens it may still use, refilled continuously at `tokens_per_minute`.
    bucket: Mutex<TokenBucket>,
}

struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl Tenant {
    fn new(name: &str, limits: TenantLimits) -> Self {
        Self {
            name: name.into(),
            bucket: Mutex::new(TokenBucket {
                tokens: limits.tokens_per_minute.unwrap_or(0) as f64,
                refilled: Instant::now(),
            }),
            limits: RwLock::new(limits),
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limits(&self) -> TenantLimits {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the engine's fair queue knows of it.
    pub fn share(&self) -> TenantShare {
        TenantShare {
            tenant: self.name.clone(),
            weight: self.limits().weight,
        }
    }

    /// Takes `tokens` from the bucket, or says in how many seconds they will be there.
    fn take_tokens(&self, tokens: u64, per_minute: u64) -> Result<(), u64> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let rate = per_minute as f64 / 60.0;
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(per_minute as f64);
        bucket.refilled = now;
        let tokens = tokens as f64;
        if bucket.tokens >= tokens {
            bucket.tokens -= tokens;
            return Ok(());
        }
        Err(((tokens - bucket.tokens) / rate).ceil().max(1.0) as u64)
    }
}

/// A request counted against its tenant's concurrency until dropped.
pub(crate) struct TenantPermit {
    tenant: Arc<Tenant>,
}

impl Drop for TenantPermit {
    fn drop(&mut self) {
        self.tenant.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TenantPermit {
    /// Admits a request of `tenant` that may cost `tokens` (prompt plus the most it may
    /// generate), or refuses it: 429 with `Retry-After` over a limit, 400 for a request larger
    /// than a whole minute's tokens (retrying cannot help).
    pub fn acquire(tenant: &Arc<Tenant>, tokens: u64) -> Result<Self, ApiError> {
        let limits = tenant.limits();
        let before = tenant.in_flight.fetch_add(1, Ordering::SeqCst);
        let permit = Self {
            tenant: tenant.clone(),
        };
        if let Some(max) = limits.max_concurrent_requests {
            if before >= max {
                return Err(ApiError::tenant_limit(
                    format!(
                        "Tenant `{}` has {before} requests in flight, its limit is {max}; retry \
                         when one has finished.",
                        tenant.name
                    ),
                    1,
                ));
            }
        }
        if let Some(per_minute) = limits.tokens_per_minute {
            if tokens > per_minute {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "this request may use {tokens} tokens (prompt plus max_tokens times n), \
                         more than the {per_minute} per minute of tenant `{}`; ask for fewer",
                        tenant.name
                    ),
                ));
            }
            if let Err(wait) = tenant.take_tokens(tokens, per_minute) {
                return Err(ApiError::tenant_limit(
                    format!(
                        "Tenant `{}` has used its {per_minute} tokens per minute; this request \
                         may use {tokens}.",
                        tenant.name
                    ),
                    wait,
                ));
            }
        }
        Ok(permit)
    }
}

/// The keys of the `--api-keys` file, each with its tenant.
pub struct ApiKeys {
    path: PathBuf,
    by_key: HashMap<String, Arc<Tenant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(rename = "tenant", default)]
    tenants: Vec<TenantShape>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantShape {
    name: Spanned<String>,
    keys: Vec<Spanned<String>>,
    weight: Option<Spanned<u32>>,
    max_concurrent_requests: Option<Spanned<usize>>,
    tokens_per_minute: Option<Spanned<u64>>,
}

impl ApiKeys {
    /// Reads the file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Self::read(path, None).map_err(anyhow::Error::msg)
    }

    /// Reads `path` again, keeping the counters of the tenants still there.
    pub fn reload(&self) -> Result<Self, String> {
        Self::read(&self.path, Some(self))
    }

    fn read(path: &Path, previous: Option<&ApiKeys>) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the API keys file {}: {e}", path.display()))?;
        Self::parse(&text, previous)
            .map(|by_key| Self {
                path: path.to_path_buf(),
                by_key,
            })
            .map_err(|e| format!("{}:{e}", path.display()))
    }

    fn parse(
        text: &str,
        previous: Option<&ApiKeys>,
    ) -> Result<HashMap<String, Arc<Tenant>>, String> {
        let shape: FileShape = toml::from_str(text)
            .map_err(|e| at_line(text, e.span().unwrap_or(0..0), e.message().trim()))?;
        let refuse = |span, message: String| at_line(text, span, &message);
        let mut by_key = HashMap::new();
        let mut names: Vec<&str> = Vec::new();
        for t in &shape.tenants {
            let name = t.name.get_ref();
            if name.is_empty() || names.contains(&name.as_str()) {
                return Err(refuse(
                    t.name.span(),
                    format!("tenant names must be unique and not empty: `{name}`"),
                ));
            }
            names.push(name);
            let weight = t.weight.as_ref().map_or(Ok(1), |w| match *w.get_ref() {
                0 => Err(refuse(w.span(), "weight must be at least 1".into())),
                w => Ok(w),
            })?;
            for limit in [
                t.max_concurrent_requests
                    .as_ref()
                    .map(|l| (l.span(), *l.get_ref() as u64)),
                t.tokens_per_minute
                    .as_ref()
                    .map(|l| (l.span(), *l.get_ref())),
            ]
            .into_iter()
            .flatten()
            {
                if limit.1 == 0 {
                    return Err(refuse(limit.0, "a limit must be at least 1".into()));
                }
            }
            let limits = TenantLimits {
                weight,
                max_concurrent_requests: t.max_concurrent_requests.as_ref().map(|l| *l.get_ref()),
                tokens_per_minute: t.tokens_per_minute.as_ref().map(|l| *l.get_ref()),
            };
            let kept = previous.and_then(|p| p.tenant_named(name));
            let tenant = match kept {
                Some(tenant) => {
                    *tenant.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
                    tenant
                }
                None => Arc::new(Tenant::new(name, limits)),
            };
            if t.keys.is_empty() {
                return Err(refuse(
                    t.name.span(),
                    format!("tenant `{name}` has no keys"),
                ));
            }
            for key in &t.keys {
                if key.get_ref().trim().is_empty() {
                    return Err(refuse(key.span(), "an API key cannot be empty".into()));
                }
                if by_key
                    .insert(key.get_ref().clone(), tenant.clone())
                    .is_some()
                {
                    return Err(refuse(key.span(), "this key is given twice".into()));
                }
            }
        }
        Ok(by_key)
    }

    fn tenant_named(&self, name: &str) -> Option<Arc<Tenant>> {
        self.by_key.values().find(|t| &*t.name == name).cloned()
    }

    /// The tenant of `key`, if the key is in the file.
    pub fn tenant(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[tenant]]
name = "alice"
keys = ["ka1", "ka2"]
weight = 3
max_concurrent_requests = 2

[[tenant]]
name = "bob"
keys = ["kb"]
tokens_per_minute = 600
"#;

    fn keys(text: &str) -> Result<HashMap<String, Arc<Tenant>>, String> {
        ApiKeys::parse(text, None)
    }

    #[test]
    fn keys_name_their_tenant_and_its_limits() {
        let by_key = keys(FILE).unwrap();
        assert_eq!(by_key["ka2"].name(), "alice");
        assert_eq!(by_key["ka1"].share().weight, 3);
        assert_eq!(by_key["kb"].share().weight, 1);
        assert_eq!(by_key["kb"].limits().tokens_per_minute, Some(600));
        assert!(Arc::ptr_eq(&by_key["ka1"], &by_key["ka2"]));
    }

    #[test]
    fn mistakes_are_refused_at_their_line() {
        for (from, to, line) in [
            ("weight = 3", "wieght = 3", 5),
            ("weight = 3", "weight = 0", 5),
            ("keys = [\"kb\"]", "keys = [\"ka1\"]", 10),
            ("name = \"bob\"", "name = \"alice\"", 9),
            ("tokens_per_minute = 600", "tokens_per_minute = -1", 11),
        ] {
            let error = keys(&FILE.replace(from, to)).err().unwrap();
            assert!(error.starts_with(&format!("{line}:")), "{to}: {error}");
        }
    }

    #[test]
    fn concurrency_over_the_limit_is_a_429_and_permits_give_it_back() {
        let alice = keys(FILE).unwrap()["ka1"].clone();
        let first = TenantPermit::acquire(&alice, 10).unwrap();
        let _second = TenantPermit::acquire(&alice, 10).unwrap();
        let refused = TenantPermit::acquire(&alice, 10).err().unwrap();
        assert_eq!(refused.status.as_u16(), 429);
        assert_eq!(refused.retry_after, Some(1));
        drop(first);
        assert!(TenantPermit::acquire(&alice, 10).is_ok());
    }

    #[test]
    fn tokens_per_minute_are_a_bucket_that_refills() {
        let bob = keys(FILE).unwrap()["kb"].clone();
        assert!(TenantPermit::acquire(&bob, 500).is_ok());
        let refused = TenantPermit::acquire(&bob, 500).err().unwrap();
        assert_eq!(refused.status.as_u16(), 429);
        // 400 tokens missing at 10 per second.
        let wait = refused.retry_after.unwrap();
        assert!((39..=40).contains(&wait), "{wait}");
        let too_big = TenantPermit::acquire(&bob, 601).err().unwrap();
        assert_eq!(too_big.status.as_u16(), 400);
    }

    #[test]
    fn a_reload_keeps_the_counters_of_tenants_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, FILE).unwrap();
        let before = ApiKeys::load(&path).unwrap();
        let alice = before.tenant("ka1").unwrap().clone();
        let _held = TenantPermit::acquire(&alice, 1).unwrap();
        std::fs::write(&path, FILE.replace("\"ka1\", ", "")).unwrap();
        let after = before.reload().unwrap();
        assert!(after.tenant("ka1").is_none(), "a revoked key is gone");
        let still = after.tenant("ka2").unwrap();
        assert!(Arc::ptr_eq(still, &alice));
        assert_eq!(still.in_flight.load(Ordering::SeqCst), 1);
        std::fs::write(&path, "[[tenant]]\nnmae = 1\n").unwrap();
        assert!(after.reload().is_err());
    }
}
