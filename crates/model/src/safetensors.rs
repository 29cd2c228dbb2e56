//! Loading a Hugging Face folder: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) and the tokenizer files.
//!
//! Every tensor is converted to f32 on load: the forward pass keeps activations in f32 and a plain
//! f32 `QMatMul::Tensor` is exact, whereas keeping f16/bf16 weights would need a conversion of the
//! activations at every matmul. The files are memory-mapped, so only one tensor at a time is held
//! in its original dtype next to its f32 copy.
//!
//! Loading checks before it reads any tensor data: every name the model needs must be present,
//! with the shape `config.json` implies and a float dtype. A mismatched config and checkpoint is
//! the usual way a folder goes wrong, and it must surface as an error naming file and tensor, not
//! as a panic deep inside a matmul.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};
use minserve_tokenizer::Tokenizer;
use serde::Deserialize;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::hf_norms::HfNorms;
use crate::quantized_checkpoint::{QuantScheme, RawTensor, TensorSource};
use crate::weights::{Embedding, LayerWeights, Linear, LinearWeight, LlamaWeights};

/// The single-file checkpoint name `transformers` writes and looks for first.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint, mapping each tensor name to its shard file.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Loads a Hugging Face model folder into f32 weights (`weights_format` and `repack_for_cpu` as in
/// `LoadOptions`) and its tokenizer.
pub fn load_folder(
    dir: &Path,
    weights_format: Option<GgmlDType>,
    repack_for_cpu: bool,
) -> Result<(LlamaWeights, Tokenizer)> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ModelError::Format {
            path: dir.to_path_buf(),
            message: "no config.json: not a Hugging Face model folder \
                      (expected config.json, model.safetensors and tokenizer.json)"
                .into(),
        });
    }
    let (checkpoint, config, scheme) = open_checked(dir, &config_path)?;
    let tokenizer = Tokenizer::from_hf_folder(dir).map_err(ModelError::tokenizer(dir))?;
    let weights = build_weights(
        &checkpoint,
        config,
        scheme.as_ref(),
        weights_format,
        repack_for_cpu,
    )?;
    Ok((weights, tokenizer))
}

/// [`load_folder`]'s weights alone: a folder without tokenizer files loads too (tests build
/// tiny checkpoints this way).
pub fn load_folder_weights(
    dir: &Path,
    weights_format: Option<GgmlDType>,
    repack_for_cpu: bool,
) -> Result<LlamaWeights> {
    let (checkpoint, config, scheme) = open_checked(dir, &dir.join("config.json"))?;
    build_weights(
        &checkpoint,
        config,
        scheme.as_ref(),
        weights_format,
        repack_for_cpu,
    )
}

/// Reads `config.json` (and its quantization scheme, if any), opens the checkpoint and checks
/// names, dtypes and shapes from the headers alone, so that a wrong checkpoint fails in
/// milliseconds, before the tokenizer or gigabytes of tensor data are read. Projections stored
/// quantized are checked as they load (`crate::quantized_checkpoint`).
fn open_checked(
    dir: &Path,
    config_path: &Path,
) -> Result<(Checkpoint, ModelConfig, Option<QuantScheme>)> {
    let config = ModelConfig::from_hf_config(config_path)?;
    let scheme = QuantScheme::from_folder(config_path)?;
    let checkpoint = Checkpoint::open(dir)?;
    let plan = tensor_plan(&config);
    for (name, shape) in &plan {
        let quantized = |scheme: &QuantScheme| {
            let base = name.strip_suffix(".weight").unwrap_or(name);
            scheme.stores_quantized(&checkpoint, base)
        };
        if !scheme.as_ref().is_some_and(quantized) {
            checkpoint.check(name, shape)?;
        }
    }
    warn_unused(&checkpoint, &plan, &config, scheme.as_ref());
    if let Some(scheme) = &scheme {
        tracing::info!(folder = %dir.display(), "loading a {} checkpoint", scheme.name());
    }
    Ok((checkpoint, config, scheme))
}

/// The HF name of layer `i`'s tensor `rest` (e.g. `self_attn.q_proj.weight`).
fn layer_name(i: usize, rest: &str) -> String {
    format!("model.layers.{i}.{rest}")
}

/// Whether the attention output projection has a bias. HF Llama's `attention_bias` covers all
/// four projections; Qwen2 has biases on q/k/v only, and Mistral has none.
fn o_proj_has_bias(config: &ModelConfig) -> bool {
    config.attention_bias && config.architecture == "llama"
}

/// Every tensor the model reads, with the shape `config` implies for it.
pub(crate) fn tensor_plan(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let q_dim = c.num_heads * c.head_dim;
    let kv_dim = c.num_kv_heads * c.head_dim;
    let (h, ff) = (c.hidden_size, c.intermediate_size);
    let norms = HfNorms::of(c);
    let mut plan = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_layers {
        let mut add = |rest: &str, shape: Vec<usize>| plan.push((layer_name(i, rest), shape));
        add(&format!("{}.weight", norms.attention), vec![h]);
        add("self_attn.q_proj.weight", vec![q_dim, h]);
        add("self_attn.k_proj.weight", vec![kv_dim, h]);
        add("self_attn.v_proj.weight", vec![kv_dim, h]);
        add("self_attn.o_proj.weight", vec![h, q_dim]);
        if c.attention_bias {
            add("self_attn.q_proj.bias", vec![q_dim]);
            add("self_attn.k_proj.bias", vec![kv_dim]);
            add("self_attn.v_proj.bias", vec![kv_dim]);
        }
        if o_proj_has_bias(c) {
            add("self_attn.o_proj.bias", vec![h]);
        }
        if c.block.qk_norm {
            add("self_attn.q_norm.weight", vec![c.head_dim]);
            add("self_attn.k_norm.weight", vec![c.head_dim]);
        }
        add(&format!("{}.weight", norms.feed_forward), vec![h]);
        if let Some((attention, feed_forward)) = norms.post {
            add(&format!("{attention}.weight"), vec![h]);
            add(&format!("{feed_forward}.weight"), vec![h]);
        }
        add("mlp.gate_proj.weight", vec![ff, h]);
        add("mlp.up_proj.weight", vec![ff, h]);
        add("mlp.down_proj.weight", vec![h, ff]);
    }
    plan.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        plan.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    plan
}

/// Tensors in the checkpoint that the model does not read are most likely harmless (rotary
/// caches, a duplicate `lm_head.weight` of a tied model), but a weight we silently ignore would
/// change the model's output, so name them.
fn warn_unused(
    checkpoint: &Checkpoint,
    plan: &[(String, Vec<usize>)],
    config: &ModelConfig,
    scheme: Option<&QuantScheme>,
) {
    let wanted: BTreeSet<&str> = plan.iter().map(|(n, _)| n.as_str()).collect();
    // A quantized projection's tensors, `P.<suffix>` for the `P.weight` of the plan.
    let quantized_part = |name: &str| {
        scheme.is_some_and(|s| {
            s.tensor_suffixes().iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .and_then(|base| base.strip_suffix('.'))
                    .is_some_and(|base| wanted.contains(format!("{base}.weight").as_str()))
            })
        })
    };
    let unused: Vec<&str> = checkpoint
        .names()
        .filter(|n| !wanted.contains(n) && !quantized_part(n))
        .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
        .filter(|n| !(config.tie_word_embeddings && *n == "lm_head.weight"))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            count = unused.len(),
            first = ?&unused[..unused.len().min(8)],
            "ignoring checkpoint tensors the model does not use"
        );
    }
}

fn build_weights(
    ckpt: &Checkpoint,
    config: ModelConfig,
    scheme: Option<&QuantScheme>,
    weights_format: Option<GgmlDType>,
    repack_for_cpu: bool,
) -> Result<LlamaWeights> {
    let shapes: HashMap<String, Vec<usize>> = tensor_plan(&config).into_iter().collect();
    let linear = |name: String, bias: bool| -> Result<Linear> {
        let weight_name = format!("{name}.weight");
        let quantized = match (scheme, shapes.get(&weight_name).map(Vec::as_slice)) {
            (Some(scheme), Some(&[n, k])) => scheme.load_linear(ckpt, &name, n, k)?,
            _ => None,
        };
        let weight = match quantized {
            Some(matrix) => matrix.into_linear(repack_for_cpu, weights_format)?,
            None => {
                let weight = ckpt.load_f32(&weight_name)?;
                match weights_format {
                    Some(format) => LinearWeight::from_f32(weight, format, repack_for_cpu)?,
                    None => LinearWeight::dense(weight),
                }
            }
        };
        let bias = match bias {
            true => Some(ckpt.load_f32(&format!("{name}.bias"))?),
            false => None,
        };
        Ok(Linear { weight, bias })
    };
    let norms = HfNorms::of(&config);
    // The forward pass multiplies by the norm's multiplier (see `HfNorms`).
    let norm = |name: &str| -> Result<Tensor> {
        Ok(ckpt
            .load_f32(name)?
            .affine(1.0, norms.stored_offset() as f64)?)
    };
    let layer_norm = |i: usize, name: &str| norm(&layer_name(i, &format!("{name}.weight")));
    let qk_norm = |i: usize, name: &str| -> Result<Option<Tensor>> {
        match config.block.qk_norm {
            true => Ok(Some(layer_norm(i, &format!("self_attn.{name}"))?)),
            false => Ok(None),
        }
    };
    let post_norm = |i: usize, pick: fn((&'static str, &'static str)) -> &'static str| {
        norms
            .post
            .map(|names| layer_norm(i, pick(names)))
            .transpose()
    };
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let attn = |proj: &str| layer_name(i, &format!("self_attn.{proj}"));
        let mlp = |proj: &str| layer_name(i, &format!("mlp.{proj}"));
        let bias = config.attention_bias;
        layers.push(LayerWeights {
            attn_norm: layer_norm(i, norms.attention)?,
            q_proj: linear(attn("q_proj"), bias)?,
            k_proj: linear(attn("k_proj"), bias)?,
            v_proj: linear(attn("v_proj"), bias)?,
            o_proj: linear(attn("o_proj"), o_proj_has_bias(&config))?,
            ffn_norm: layer_norm(i, norms.feed_forward)?,
            gate_proj: linear(mlp("gate_proj"), false)?,
            up_proj: linear(mlp("up_proj"), false)?,
            down_proj: linear(mlp("down_proj"), false)?,
            q_norm: qk_norm(i, "q_norm")?,
            k_norm: qk_norm(i, "k_norm")?,
            post_attention_norm: post_norm(i, |(attention, _)| attention)?,
            post_ffn_norm: post_norm(i, |(_, feed_forward)| feed_forward)?,
        });
    }
    let embedding = ckpt.load_f32("model.embed_tokens.weight")?;
    let lm_head = match config.tie_word_embeddings {
        // A clone shares the storage: tied weights stay one copy in memory.
        true => Linear {
            weight: LinearWeight::dense(embedding.clone()),
            bias: None,
        },
        // Not `linear`: the lm_head stays dense (see `LoadOptions::weights_format`).
        false => Linear {
            weight: LinearWeight::dense(ckpt.load_f32("lm_head.weight")?),
            bias: None,
        },
    };
    let final_norm = norm("model.norm.weight")?;
    Ok(LlamaWeights {
        config,
        embedding: Embedding::Dense(embedding),
        layers,
        final_norm,
        lm_head,
    })
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The memory-mapped safetensors files of a folder, with which file holds which tensor.
struct Checkpoint {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    routing: HashMap<String, usize>,
    /// Where a missing tensor should have been: the single file, or the shard index.
    listing: PathBuf,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or else the shards named by `model.safetensors.index.json`
    /// (the order in which `transformers` looks for them).
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        let index_path = dir.join(WEIGHTS_INDEX_FILE);
        let (paths, listing) = if single.is_file() {
            (vec![single.clone()], single)
        } else if index_path.is_file() {
            (shard_paths(dir, &index_path)?, index_path)
        } else {
            return Err(ModelError::Format {
                path: dir.to_path_buf(),
                message: format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in the folder"),
            });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut routing = HashMap::new();
        for path in paths {
            let st = mmap(&path)?;
            for (name, _) in st.tensors() {
                routing.insert(name, files.len());
            }
            files.push((path, st));
        }
        Ok(Self {
            files,
            routing,
            listing,
        })
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.routing.keys().map(String::as_str)
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::Tensor {
            path: self.listing.clone(),
            name: name.to_string(),
            message: "missing from the checkpoint".into(),
        }
    }

    /// The file holding `name`, and its view.
    fn view(&self, name: &str) -> Result<(&Path, ::safetensors::tensor::TensorView<'_>)> {
        let &index = self.routing.get(name).ok_or_else(|| self.missing(name))?;
        let (path, st) = &self.files[index];
        let view = st.get(name).map_err(|e| tensor_error(path, name, e))?;
        Ok((path, view))
    }

    /// Checks that `name` exists with `shape` and a dtype we convert to f32.
    fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        let (path, view) = self.view(name)?;
        let bad = |message: String| ModelError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            message,
        };
        use ::safetensors::Dtype;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(bad(format!(
                "dtype {:?} is not supported (F32, F16 or BF16 only)",
                view.dtype()
            )));
        }
        if view.shape() != shape {
            return Err(bad(format!(
                "shape {:?} does not match config.json, which implies {shape:?}",
                view.shape()
            )));
        }
        Ok(())
    }

    fn load_f32(&self, name: &str) -> Result<Tensor> {
        let (path, view) = self.view(name)?;
        view.load(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| tensor_error(path, name, e))
    }
}

impl TensorSource for Checkpoint {
    fn tensor(&self, name: &str) -> Result<Option<RawTensor<'_>>> {
        if !self.routing.contains_key(name) {
            return Ok(None);
        }
        let (path, view) = self.view(name)?;
        Ok(Some(RawTensor {
            path,
            name: name.to_string(),
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data(),
        }))
    }

    fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    fn path_of(&self, name: &str) -> PathBuf {
        match self.routing.get(name) {
            Some(&index) => self.files[index].0.clone(),
            None => self.listing.clone(),
        }
    }
}

fn tensor_error(path: &Path, name: &str, e: impl std::fmt::Display) -> ModelError {
    ModelError::Tensor {
        path: path.to_path_buf(),
        name: name.to_string(),
        message: e.to_string(),
    }
}

/// Maps one safetensors file and parses its header.
fn mmap(path: &Path) -> Result<MmapedSafetensors> {
    // Surface a missing or unreadable file as an I/O error on that path, not a candle error.
    std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is only sound while nobody truncates or rewrites the file underneath us;
    // that is the contract of every mmap-based checkpoint loader (transformers' included), and
    // reading gigabytes through the page cache instead of copying them first is why we map.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// The distinct shard files of a sharded checkpoint, in a stable order.
fn shard_paths(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| ModelError::io(index_path, e))?;
    let bad = |message: String| ModelError::Format {
        path: index_path.to_path_buf(),
        message,
    };
    let index: ShardIndex =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a valid shard index: {e}")))?;
    let shards: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
    if shards.is_empty() {
        return Err(bad("`weight_map` lists no tensors".into()));
    }
    shards
        .into_iter()
        .map(|shard| {
            // Shards live next to the index; a path that climbs out of the folder is not a
            // checkpoint `transformers` would write, so refuse it rather than read it.
            let plain = Path::new(shard)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            match plain {
                true => Ok(dir.join(shard)),
                false => Err(bad(format!(
                    "shard `{shard}` is not a file name in the folder"
                ))),
            }
        })
        .collect()
}
