//! The Responses API, `POST /v1/responses`: OpenAI's newer surface for the same conversation as
//! chat completions, in other shapes.
//!
//! ```text
//! request:  input.rs (`instructions` + `input` items -> chat messages)
//!           -> routes/chat.rs `conversation` (chat's path: fields.rs, params.rs, tools.rs,
//!              structured.rs, the chat template), with GenerationApi::Responses naming the
//!              fields (`max_output_tokens`, `text.format`, flat `tools`)
//!           -> submit.rs, the engine, choices.rs, as for chat
//! response: output.rs (output pieces -> `message` / `function_call` items and the stream
//!           events that build them) -> object.rs (the `response` object) -> stream.rs (SSE)
//!           or collect.rs (one body)
//! ```
//!
//! A finished response is kept in memory (store.rs, bounded) unless `store: false`, so a
//! later request may continue it with `previous_response_id`; or an agent loop sends its whole
//! conversation, earlier `function_call` and `function_call_output` items included, in
//! `input`. Stored `conversation` objects are not supported.

pub(crate) mod input;
pub(crate) mod object;
pub(crate) mod output;
pub(crate) mod store;
pub(crate) mod stream;
