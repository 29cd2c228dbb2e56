//! How a Hugging Face checkpoint names and stores the RMSNorm weights of a layer. Llama, Qwen
//! and Mistral keep two norms per layer and store the multiplier itself. Gemma 3 keeps four
//! (`post_attention_layernorm` is its norm of the attention *output*, so the norm before the
//! MLP is `pre_feedforward_layernorm`), and its RMSNorm multiplies by `1 + w` while storing `w`.
//! GGUF files and minserve's forward pass hold the multiplier (llama.cpp's converter adds the
//! 1), so the export, the safetensors loader and AWQ's scale folding all convert here.

use crate::config::ModelConfig;
use crate::observer::ProjectionSite;

/// The norms of one layer of a model, by their Hugging Face names (without the layer prefix
/// and the `.weight` suffix), and how their weights are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfNorms {
    /// Before q/k/v.
    pub attention: &'static str,
    /// Before gate/up.
    pub feed_forward: &'static str,
    /// On the attention output and on the MLP output, before each joins the residual stream.
    pub post: Option<(&'static str, &'static str)>,
    /// What the stored weight is short of the multiplier: 1 for Gemma's `(1 + w)`, else 0.
    stored_offset: f32,
}

impl HfNorms {
    pub fn of(config: &ModelConfig) -> Self {
        let stored_offset = match config.architecture.as_str() {
            "gemma3" => 1.0,
            _ => 0.0,
        };
        match config.block.post_norms {
            true => Self {
                attention: "input_layernorm",
                feed_forward: "pre_feedforward_layernorm",
                post: Some(("post_attention_layernorm", "post_feedforward_layernorm")),
                stored_offset,
            },
            false => Self {
                attention: "input_layernorm",
                feed_forward: "post_attention_layernorm",
                post: None,
                stored_offset,
            },
        }
    }

    /// The norm whose output the projections at `site` read, where AWQ can fold a per-channel
    /// scale; `None` where no norm precedes them (o_proj reads the attention, down_proj the
    /// gated activation).
    pub fn before(&self, site: ProjectionSite) -> Option<&'static str> {
        match site {
            ProjectionSite::Attention => Some(self.attention),
            ProjectionSite::Mlp => Some(self.feed_forward),
            ProjectionSite::AttentionOutput | ProjectionSite::MlpOutput => None,
        }
    }

    /// Every norm weight of the model is stored with the same convention, q/k norms and the
    /// final norm included.
    pub fn multiplier(&self, stored: f32) -> f32 {
        stored + self.stored_offset
    }

    pub fn stored(&self, multiplier: f32) -> f32 {
        multiplier - self.stored_offset
    }

    /// `multiplier - stored`: 1 for Gemma, 0 for the others.
    pub fn stored_offset(&self) -> f32 {
        self.stored_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_names_four_norms_and_stores_one_less() {
        let gemma = HfNorms::of(&crate::synthetic::preset("tiny-gemma3").unwrap());
        assert_eq!(
            gemma.before(ProjectionSite::Mlp),
            Some("pre_feedforward_layernorm")
        );
        assert_eq!(gemma.post.unwrap().0, "post_attention_layernorm");
        assert_eq!(gemma.stored(1.25), 0.25);
        assert_eq!(gemma.multiplier(0.25), 1.25);
        let llama = HfNorms::of(&crate::synthetic::preset("tiny").unwrap());
        assert_eq!(
            llama.before(ProjectionSite::Mlp),
            Some("post_attention_layernorm")
        );
        assert_eq!(llama.before(ProjectionSite::MlpOutput), None);
        assert_eq!(llama.stored(1.25), 1.25);
        assert_eq!(llama.stored_offset(), 0.0);
    }
}
