//! The generation APIs, chat and text completions and the Responses API: one code path, a few
//! names apart.

/// The generation APIs; they name some parameters differently and only completions echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GenerationApi {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completion,
    /// `/v1/responses`: a conversation like chat's, in OpenAI's newer request and response
    /// shapes (`responses/`).
    Responses,
}

impl GenerationApi {
    /// The route, as the request's log line names it.
    pub fn path(self) -> &'static str {
        match self {
            GenerationApi::Chat => "/v1/chat/completions",
            GenerationApi::Completion => "/v1/completions",
            GenerationApi::Responses => "/v1/responses",
        }
    }

    /// The field the prompt comes from.
    pub fn prompt_param(self) -> &'static str {
        match self {
            GenerationApi::Chat => "messages",
            GenerationApi::Completion => "prompt",
            GenerationApi::Responses => "input",
        }
    }

    /// The field that asks for alternatives with each token's log probability.
    pub fn logprobs_param(self) -> &'static str {
        match self {
            GenerationApi::Chat | GenerationApi::Responses => "top_logprobs",
            GenerationApi::Completion => "logprobs",
        }
    }
}
