//! The norms, residual adds and activation function made row by row inside the activation
//! quantization (`llama.rs` `project_rows`) give the same bits as the same rows stored first,
//! which is the path a pass takes when an observer needs to see them.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use minserve_core::StepBatch;
use minserve_model::{
    ActivationObserver, KvCache, KvDtype, KvGroups, LlamaModel, ModelConfig, ProjectionSite,
};

/// Looks at every input and replaces nothing: the pass stores its rows, and computes the same.
struct Passive {
    sites: usize,
}

impl ActivationObserver for Passive {
    fn observe(
        &mut self,
        _layer: usize,
        _site: ProjectionSite,
        _input: &[f32],
        _rows: usize,
    ) -> minserve_model::Result<Option<Vec<Tensor>>> {
        self.sites += 1;
        Ok(None)
    }
}

/// Logits of three 100-token prompts in one step (enough rows for the quantization to run on
/// the thread pool), through the fused path or, with `observer`, the stored one.
fn logits(model: &LlamaModel, observer: Option<&mut dyn ActivationObserver>) -> Vec<f32> {
    let block_size = 16;
    let blocks_per_prompt = 100usize.div_ceil(block_size);
    let config = model.config();
    let mut cache = KvCache::with_groups(
        config,
        KvGroups::single(config),
        KvDtype::F16,
        block_size,
        3 * blocks_per_prompt,
    );
    let mut batch = StepBatch::new();
    for i in 0..3u32 {
        let prompt: Vec<u32> = (0..100).map(|t| 1 + (t * 13 + i * 31) % 500).collect();
        let first = i * blocks_per_prompt as u32;
        let table: Vec<u32> = (first..first + blocks_per_prompt as u32).collect();
        batch.push_sequence(&prompt, 0, &table, block_size, true);
    }
    model
        .forward_observed(&batch, &mut cache, observer)
        .unwrap()
}

fn assert_fused_equals_stored(name: &str, mut config: ModelConfig, format: GgmlDType) {
    config.block.sliding_window = None;
    let weights = minserve_model::synthetic::build(&config, 11, format, true).unwrap();
    let model = LlamaModel::new(weights);
    let fused = logits(&model, None);
    let mut passive = Passive { sites: 0 };
    let stored = logits(&model, Some(&mut passive));
    assert_eq!(
        passive.sites,
        4 * config.num_layers,
        "{name}: sites observed"
    );
    assert_eq!(fused.len(), stored.len());
    let differing = fused
        .iter()
        .zip(&stored)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "{name} {format:?}: logits differ");
}

#[test]
fn fused_rows_give_the_stored_rows_bits_on_every_packed_format() {
    let tiny = minserve_model::synthetic::preset("tiny").unwrap();
    let gemma = minserve_model::synthetic::preset("tiny-gemma3").unwrap();
    for format in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        assert_fused_equals_stored("tiny", tiny.clone(), format);
        assert_fused_equals_stored("tiny-gemma3", gemma.clone(), format);
    }
    // The k-quants read Q8_K super-blocks of 256: every input width a multiple of it.
    let mut wide = tiny;
    wide.hidden_size = 256;
    wide.intermediate_size = 512;
    wide.head_dim = 256 / wide.num_heads;
    for format in [GgmlDType::Q4K, GgmlDType::Q6K] {
        assert_fused_equals_stored("tiny, 256 wide", wide.clone(), format);
    }
}
