//! Tokenizers and chat templates for minserve.
//!
//! A [`Tokenizer`] is built either from a GGUF file's metadata ([`Tokenizer::from_gguf`]) or
//! from a Hugging Face folder ([`Tokenizer::from_hf_folder`]), and can be written back out as
//! one ([`Tokenizer::write_hf_files`]). Both paths end in the same `tokenizers::Tokenizer`, so
//! a model gives the same ids whichever way it was loaded; the GGUF path is checked against
//! llama.cpp's tokenizer in this crate's tests.
//!
//! [`ChatTemplate`] renders a conversation with the model's Jinja chat template the way
//! Hugging Face `transformers` does.

mod builtin_templates;
mod chat_template;
mod error;
mod gguf;
mod hf;
mod special_tokens;
mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate, RenderOptions};
pub use error::{Result, TokenizerError};
pub use tokenizer::Tokenizer;

/// The server shares one tokenizer between request threads and sends errors across them.
#[allow(dead_code)]
fn assert_thread_safe() {
    fn is_send_sync<T: Send + Sync + 'static>() {}
    is_send_sync::<Tokenizer>();
    is_send_sync::<ChatTemplate>();
    is_send_sync::<TokenizerError>();
}
