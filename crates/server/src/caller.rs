//! Who a generation request is from and which conversation it continues: its tenant (set by
//! the API key check, see `tenants.rs`) and its session (the `x-session-id` header).
//!
//! A session id asks the engine to keep the request's cached prefix ahead of other cached
//! blocks for `--session-ttl` after it ends (`minserve_core::block_manager`), so that the
//! conversation's next turn finds its earlier turns cached. A header rather than the body's
//! `user` field: `user` names an end user, who may hold several conversations at once, and a
//! header can be set by a gateway or router without rewriting the body (as sticky-session
//! routing does).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use minserve_core::Session;

use crate::error::ApiError;
use crate::state::AppState;
use crate::tenants::Tenant;

/// The header that names a request's conversation session.
pub const SESSION_HEADER: &str = "x-session-id";

/// Longest session id accepted.
const MAX_SESSION_ID_BYTES: usize = 256;

/// The caller of a generation request.
#[derive(Clone, Default)]
pub(crate) struct Caller {
    pub tenant: Option<Arc<Tenant>>,
    pub session: Option<Session>,
}

/// Put into a request's extensions by the API key check when the key belongs to a tenant.
#[derive(Clone)]
pub(crate) struct CallerTenant(pub Arc<Tenant>);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let tenant = parts.extensions.get::<CallerTenant>().map(|t| t.0.clone());
        let session = match parts.headers.get(SESSION_HEADER) {
            None => None,
            Some(value) => {
                let id = value
                    .to_str()
                    .ok()
                    .filter(|id| {
                        !id.is_empty()
                            && id.len() <= MAX_SESSION_ID_BYTES
                            && id.bytes().all(|b| b.is_ascii_graphic())
                    })
                    .ok_or_else(|| {
                        ApiError::invalid(
                            SESSION_HEADER,
                            format!(
                                "the `{SESSION_HEADER}` header must be 1 to \
                                 {MAX_SESSION_ID_BYTES} visible ASCII characters"
                            ),
                        )
                    })?;
                Some(Session {
                    id: id.into(),
                    ttl: state.options.session_ttl,
                })
            }
        };
        Ok(Self { tenant, session })
    }
}
