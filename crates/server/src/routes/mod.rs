//! The HTTP routes, one file per family. Handlers only read the request and call the modules
//! that do the work; [`crate::router`] maps paths to them.

pub(crate) mod chat;
pub(crate) mod completions;
pub(crate) mod dashboard;
mod generation;
pub(crate) mod models;
pub(crate) mod monitoring;
pub(crate) mod openapi;
pub(crate) mod responses;
pub(crate) mod tokenize;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;

use crate::error::ApiError;
use crate::json_body::JsonBody;
use crate::state::{AppState, ReadyModel};

/// The size of a body, for [`crate::cpu_work::CpuWork::run`] (0 when it could not be read:
/// the error is answered at once).
fn body_size(body: &Result<Bytes, BytesRejection>) -> usize {
    body.as_ref().map_or(0, Bytes::len)
}

/// The body of a model route as an object, and the model its `model` names (the first served
/// one when absent); or the error to answer (400, 404 listing the served models, 503).
fn model_request(
    body: Result<Bytes, BytesRejection>,
    state: &AppState,
) -> Result<(JsonBody, ReadyModel), ApiError> {
    let body = JsonBody::parse(body, state.options.max_body_bytes)?;
    let model = state.ready_model(body.str("model")?)?;
    Ok((body, model))
}
