//! The model configuration read from a Hugging Face `config.json`.
//!
//! Only decoder-only Llama-family architectures are supported: the forward
//! passes implement exactly one layer layout, with the switches of
//! [`crate::family::Block`] (biases, Qwen3's q/k norms, Gemma's in
//! `config/gemma.rs`) filled in here, so
//! anything else is refused up front with an error naming the architecture
//! or key instead of failing later on a missing tensor.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::ops::Range;

use crate::family::moe::{Moe, MoeFamily};
use crate::family::{
    Block, Fused, HeadNorm, LayerType, LocalRope, NormPlacement, QkNormScope, Scalars,
};
use crate::model::{LinearId, LinearKind};
use crate::rope::{RawRope, RopeError, RopeScaling};

mod gemma;

/// The Llama-family architectures the CPU forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM` (Llama layout with sliding-window attention).
    Mistral,
    /// `Qwen2ForCausalLM` (Llama layout plus biases on q/k/v).
    Qwen2,
    /// `Qwen3ForCausalLM` (Llama layout plus per-head RMSNorm of q and k).
    Qwen3,
    /// `GraniteForCausalLM` (Llama layout plus the scalar multipliers of
    /// [`crate::family::Scalars`]).
    Granite,
    /// `Phi3ForCausalLM` (Phi-3, 3.5, 4-mini: Llama layout with fused
    /// `qkv_proj` and `gate_up_proj`, [`crate::family::Fused`]; longrope).
    Phi3,
    /// `Olmo2ForCausalLM` (norms after the sublayers, q/k RMSNorm over the
    /// whole projections: [`crate::family::NormPlacement::Post`],
    /// [`crate::family::QkNormScope::Projection`]).
    Olmo2,
    /// `MixtralForCausalLM` (Mistral attention, [`crate::family::moe`] MLP).
    Mixtral,
    /// `Qwen2MoeForCausalLM` (Qwen2 attention, experts plus a shared expert).
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM` (Qwen3 attention, experts).
    Qwen3Moe,
    /// `OlmoeForCausalLM` (pre-norms, q/k RMSNorm over the whole
    /// projections, experts).
    Olmoe,
    /// `Gemma2ForCausalLM` (`1 + weight` norms, GeGLU, sandwich norms,
    /// scaled embeddings, soft-capping, alternating local/global layers:
    /// `config/gemma.rs`).
    Gemma2,
    /// `Gemma3ForCausalLM`, text only (Gemma 2's block with per-head q/k
    /// norms and a local RoPE of its own, [`crate::family::LocalRope`]).
    Gemma3,
}

impl Architecture {
    /// The name as written in `config.json`'s `architectures` list.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Granite => "GraniteForCausalLM",
            Architecture::Phi3 => "Phi3ForCausalLM",
            Architecture::Olmo2 => "Olmo2ForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Olmoe => "OlmoeForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    fn from_hf_name(name: &str) -> Option<Self> {
        [
            Self::Llama,
            Self::Mistral,
            Self::Qwen2,
            Self::Qwen3,
            Self::Granite,
            Self::Phi3,
            Self::Olmo2,
            Self::Mixtral,
            Self::Qwen2Moe,
            Self::Qwen3Moe,
            Self::Olmoe,
            Self::Gemma2,
            Self::Gemma3,
        ]
        .into_iter()
        .find(|a| a.hf_name() == name)
    }
}

/// Why a `config.json` could not be turned into a [`LlamaConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read model config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid JSON or a field has the wrong type. Like
    /// every variant here, the message names the field, never the text read
    /// from the file ([`crate::content_free`]): a spec can name any file.
    #[error("model config {path} is not a valid config.json: {reason}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What is wrong, without the file's text.
        reason: String,
    },
    /// The architecture is not one the forward pass implements.
    #[error(
        "unsupported architecture in {path} (architectures[0]): supported are LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GraniteForCausalLM, Phi3ForCausalLM, Olmo2ForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM"
    )]
    UnsupportedArchitecture {
        /// The config file.
        path: PathBuf,
        /// The architecture named there, for callers (not in the message).
        found: String,
    },
    /// The rope fields describe a RoPE variant the tables cannot express.
    #[error("{source} (in {key} of {path})")]
    Rope {
        /// The config file.
        path: PathBuf,
        /// `rope_parameters` or `rope_scaling`.
        key: &'static str,
        /// What is wrong with it.
        source: RopeError,
    },
    /// A config key that changes the model's math in a way the forward pass
    /// does not implement: refused rather than ignored.
    #[error("unsupported {key} in {path}: {supported}")]
    UnsupportedFeature {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Its value, for callers (not in the message: a spec can name any file).
        found: String,
        /// What the worker supports instead.
        supported: &'static str,
    },
    /// A field has a value the forward pass cannot work with.
    #[error("invalid field {field} in {path}: {reason}")]
    InvalidField {
        /// The config file.
        path: PathBuf,
        /// The offending field.
        field: &'static str,
        /// What was expected.
        reason: String,
    },
}

impl ConfigError {
    /// [`ConfigError::Parse`] for a serde error, naming no text of the file.
    pub(crate) fn parse(path: &Path, e: &serde_json::Error) -> Self {
        ConfigError::Parse {
            path: path.to_path_buf(),
            reason: crate::content_free::json(e),
        }
    }

    /// [`ConfigError::UnsupportedFeature`].
    pub(crate) fn unsupported(
        path: &Path,
        key: &'static str,
        found: String,
        supported: &'static str,
    ) -> Self {
        ConfigError::UnsupportedFeature {
            path: path.to_path_buf(),
            key,
            found,
            supported,
        }
    }
}

/// The hyper-parameters of a Llama-family decoder, with defaults resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Which architecture the checkpoint declares.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer).
    pub num_key_value_heads: usize,
    /// Per-head width (`hidden_size / num_attention_heads` when absent).
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE scaling (`rope_type` and its parameters).
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    /// Keys each query sees at most (itself and the `window - 1` before it),
    /// in every layer: Mistral's `sliding_window`; `None` is full causal
    /// attention.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Each layer's attention when the layers differ (Gemma's alternating
    /// local/global layers, see [`Self::window`]); empty when every layer
    /// attends alike.
    #[serde(default)]
    pub layer_types: Vec<LayerType>,
    /// The local layers' RoPE when it is not the global one (Gemma 3).
    #[serde(default)]
    pub local_rope: Option<LocalRope>,
    /// Longest sequence the RoPE tables are built for.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// What distinguishes the family's decoder block (biases, q/k norms).
    pub block: Block,
    /// Beginning-of-sequence token id, if declared.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, if declared (the first one when a list).
    pub eos_token_id: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn first(&self) -> Option<u32> {
        match self {
            OneOrMany::One(v) => Some(*v),
            OneOrMany::Many(v) => v.first().copied(),
        }
    }
}

/// `rope_parameters` as transformers 5 writes it: one set for every layer,
/// or (Gemma 3) one per layer type.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum RopeParameters {
    PerLayerType {
        full_attention: Box<RawRope>,
        sliding_attention: Box<RawRope>,
    },
    Single(Box<RawRope>),
}

/// A key that may be present with `null` (`Some(None)`), unlike an absent
/// one (`None`): Gemma 2 defaults its soft-caps when absent only.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RawRope>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    mlp_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    /// Qwen2-MoE's switch for the q/k/v biases.
    qkv_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
    embedding_multiplier: Option<f64>,
    residual_multiplier: Option<f64>,
    attention_multiplier: Option<f64>,
    logits_scaling: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    partial_rotary_factor: Option<f64>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    final_logit_softcapping: Option<Option<f64>>,
    #[serde(alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    use_bidirectional_attention: Option<bool>,
}

/// `value` when absent or finite and positive, else an error naming
/// `field`: the multipliers, caps and scalars that scale or divide.
fn positive(
    path: &Path,
    field: &'static str,
    value: Option<f64>,
) -> Result<Option<f64>, ConfigError> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(ConfigError::InvalidField {
            path: path.to_path_buf(),
            field,
            reason: "must be a finite positive number".into(),
        }),
        _ => Ok(value),
    }
}

/// Granite's multipliers, each defaulting to transformers' `GraniteConfig`
/// default (1.0) and required finite and positive: a zero or negative
/// multiplier is no model anyone trained, and `logits_scaling` divides.
fn granite_scalars(raw: &RawConfig, path: &Path) -> Result<Scalars, ConfigError> {
    let check = |field: &'static str, value: Option<f64>| positive(path, field, value);
    Ok(Scalars {
        embedding_multiplier: check("embedding_multiplier", raw.embedding_multiplier)?
            .unwrap_or(1.0),
        residual_multiplier: check("residual_multiplier", raw.residual_multiplier)?.unwrap_or(1.0),
        // GraniteConfig defaults attention_multiplier to 1.0, not to
        // 1/sqrt(head_dim): an absent key means a scale of 1.
        attention_multiplier: Some(
            check("attention_multiplier", raw.attention_multiplier)?.unwrap_or(1.0),
        ),
        logits_scaling: check("logits_scaling", raw.logits_scaling)?.unwrap_or(1.0),
    })
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and validates the text of a `config.json`; `path` only names
    /// the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| ConfigError::parse(path, &e))?;
        let invalid = |field: &'static str, reason: String| ConfigError::InvalidField {
            path: path.to_path_buf(),
            field,
            reason,
        };
        let arch_name = raw
            .architectures
            .first()
            .cloned()
            .unwrap_or_else(|| "<none>".to_string());
        let architecture = Architecture::from_hf_name(&arch_name).ok_or_else(|| {
            ConfigError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: arch_name.clone(),
            }
        })?;
        let gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
        // Gemma's activation is hidden_activation (config/gemma.rs).
        if let Some(act) = &raw.hidden_act
            && act != "silu"
            && !gemma
        {
            return Err(invalid("hidden_act", "expected \"silu\"".to_string()));
        }
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        let (rope_key, rope, local_rope) = match (&raw.rope_parameters, &raw.rope_scaling) {
            (
                Some(RopeParameters::PerLayerType {
                    full_attention,
                    sliding_attention,
                }),
                _,
            ) => (
                "rope_parameters",
                RawRope::clone(full_attention),
                Some(RawRope::clone(sliding_attention)),
            ),
            (Some(RopeParameters::Single(r)), _) => ("rope_parameters", RawRope::clone(r), None),
            (None, Some(r)) => ("rope_scaling", r.clone(), None),
            (None, None) => ("rope_parameters", RawRope::default(), None),
        };
        // Gemma3TextConfig's default global base is 1e6.
        let default_theta = match architecture {
            Architecture::Gemma3 => 1_000_000.0,
            _ => 10_000.0,
        };
        let rope_theta = rope.rope_theta.or(raw.rope_theta).unwrap_or(default_theta);
        let unsupported = |key: &'static str, found: String, supported: &'static str| {
            ConfigError::unsupported(path, key, found, supported)
        };
        // Configs written for transformers 4 (Phi-4-mini among them) keep
        // it at the top level; transformers 5 moves it into rope_parameters,
        // where `RawRope::scaling` refuses it the same way.
        if let Some(p) = raw.partial_rotary_factor
            && p != 1.0
        {
            return Err(unsupported(
                "partial_rotary_factor",
                p.to_string(),
                "only 1.0: RoPE over the whole head",
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err(unsupported(
                "mlp_bias",
                "true".into(),
                "the MLP projections carry no bias",
            ));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(unsupported(
                "use_sliding_window",
                "true".into(),
                "sliding-window attention only as Mistral declares it (sliding_window in every layer)",
            ));
        }
        if let Some(kind) = raw
            .layer_types
            .iter()
            .flatten()
            .find(|kind| *kind != "full_attention" && !gemma)
        {
            return Err(unsupported(
                "layer_types",
                format!("{kind:?}"),
                "every layer \"full_attention\"",
            ));
        }
        let sliding_window = match architecture {
            // transformers' Phi-3 masks with the window whenever one is set.
            Architecture::Mistral | Architecture::Phi3 | Architecture::Mixtral => {
                raw.sliding_window
            }
            // Qwen2 and Qwen3 write a window they do not use unless
            // use_sliding_window (refused above).
            Architecture::Llama
            | Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Granite
            | Architecture::Olmo2
            | Architecture::Qwen2Moe
            | Architecture::Qwen3Moe
            | Architecture::Olmoe => None,
            // The local layers' window (config/gemma.rs says which); 4096
            // is both Gemma configs' default.
            Architecture::Gemma2 | Architecture::Gemma3 => Some(raw.sliding_window.unwrap_or(4096)),
        };
        if sliding_window == Some(0) {
            return Err(invalid("sliding_window", "must be positive".into()));
        }
        if raw.num_attention_heads == 0 {
            return Err(invalid("num_attention_heads", "must be positive".into()));
        }
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_key_value_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {}",
                    raw.num_attention_heads
                ),
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(match gemma {
            true => gemma::DEFAULT_HEAD_DIM,
            false => raw.hidden_size / raw.num_attention_heads,
        });
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!("must be positive and even for RoPE, found {head_dim}"),
            ));
        }
        let rope_scaling = rope
            .scaling(
                max_position_embeddings,
                // Phi3Config's default when the key is absent.
                raw.original_max_position_embeddings
                    .or((architecture == Architecture::Phi3).then_some(4096.0)),
                head_dim,
            )
            .map_err(|source| ConfigError::Rope {
                path: path.to_path_buf(),
                key: rope_key,
                source,
            })?;
        let local_rope = match (architecture, local_rope) {
            (Architecture::Gemma3, Some(local)) => Some(LocalRope {
                theta: local.rope_theta.unwrap_or(10_000.0),
                scaling: local
                    .scaling(max_position_embeddings, None, head_dim)
                    .map_err(|source| ConfigError::Rope {
                        path: path.to_path_buf(),
                        key: "rope_parameters.sliding_attention",
                        source,
                    })?,
            }),
            // Configs written for transformers 4: rope_local_base_freq,
            // default RoPE.
            (Architecture::Gemma3, None) => Some(LocalRope {
                theta: raw.rope_local_base_freq.unwrap_or(10_000.0),
                scaling: RopeScaling::Default,
            }),
            (_, None) => None,
            (_, Some(_)) => {
                return Err(unsupported(
                    "rope_parameters",
                    "per layer type".into(),
                    "one set of RoPE parameters for every layer (per layer type for Gemma3ForCausalLM only)",
                ));
            }
        };
        let mut layer_types = Vec::new();
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let block = match architecture {
            // transformers' Qwen2 hard-codes its biases, whatever attention_bias says.
            Architecture::Qwen2 => Block {
                qkv_bias: true,
                o_bias: false,
                ..Block::default()
            },
            Architecture::Llama | Architecture::Mistral => Block {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                ..Block::default()
            },
            Architecture::Qwen3 => Block {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                qk_norm: true,
                ..Block::default()
            },
            Architecture::Granite => Block {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                scalars: granite_scalars(&raw, path)?,
                ..Block::default()
            },
            // transformers' Phi-3 has no biases, whatever attention_bias says.
            Architecture::Phi3 => Block {
                fused_projections: true,
                ..Block::default()
            },
            Architecture::Olmo2 => Block {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                qk_norm: true,
                qk_norm_scope: QkNormScope::Projection,
                norms: NormPlacement::Post,
                ..Block::default()
            },
            Architecture::Mixtral => Block {
                moe: Some(Moe::from_config(text, path, MoeFamily::Mixtral)?),
                ..Block::default()
            },
            // Qwen2MoeConfig's qkv_bias defaults to true.
            Architecture::Qwen2Moe => Block {
                qkv_bias: raw.qkv_bias.unwrap_or(true),
                moe: Some(Moe::from_config(text, path, MoeFamily::Qwen2Moe)?),
                ..Block::default()
            },
            Architecture::Qwen3Moe => Block {
                qkv_bias: attention_bias,
                o_bias: attention_bias,
                qk_norm: true,
                moe: Some(Moe::from_config(text, path, MoeFamily::Qwen3Moe)?),
                ..Block::default()
            },
            // transformers' OLMoE has no o_proj bias, whatever attention_bias says.
            Architecture::Olmoe => Block {
                qkv_bias: attention_bias,
                qk_norm: true,
                qk_norm_scope: QkNormScope::Projection,
                moe: Some(Moe::from_config(text, path, MoeFamily::Olmoe)?),
                ..Block::default()
            },
            Architecture::Gemma2 | Architecture::Gemma3 => {
                let layers = gemma::gemma(&raw, path, architecture)?;
                layer_types = layers.layer_types;
                layers.block
            }
        };
        Ok(LlamaConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            // The architectures' config defaults: Phi3Config, Olmo2Config,
            // MixtralConfig and OlmoeConfig 1e-5.
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(match architecture {
                Architecture::Phi3
                | Architecture::Olmo2
                | Architecture::Mixtral
                | Architecture::Olmoe => 1e-5,
                _ => 1e-6,
            }),
            rope_theta,
            rope_scaling,
            sliding_window,
            layer_types,
            local_rope,
            max_position_embeddings,
            // Gemma's configs tie by default.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            block,
            bos_token_id: raw.bos_token_id.as_ref().and_then(OneOrMany::first),
            eos_token_id: raw.eos_token_id.as_ref().and_then(OneOrMany::first),
        })
    }

    /// Every tensor the forward pass needs, with the shape it must have
    /// (`lm_head.weight` is absent when the embeddings are tied).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let m = self.intermediate_size;
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for norm in self.block.norms.norms() {
                out.push((norm.weight_name(i), vec![h]));
            }
            if self.block.fused_projections {
                let qkv = Fused::Qkv.module_name(i);
                out.push((format!("{qkv}.weight"), vec![q + 2 * kv, h]));
            } else {
                out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
                out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
                out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if self.block.qk_norm {
                for norm in HeadNorm::ALL {
                    out.push((norm.weight_name(i), vec![self.head_norm_width(norm)]));
                }
            }
            if self.block.qkv_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            if self.block.o_bias {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            if let Some(moe) = &self.block.moe {
                out.extend(moe.expected_tensors(i, h));
            } else if self.block.fused_projections {
                let gate_up = Fused::GateUp.module_name(i);
                out.push((format!("{gate_up}.weight"), vec![2 * m, h]));
            } else {
                out.push((format!("{p}.mlp.gate_proj.weight"), vec![m, h]));
                out.push((format!("{p}.mlp.up_proj.weight"), vec![m, h]));
            }
            if self.block.moe.is_none() {
                out.push((format!("{p}.mlp.down_proj.weight"), vec![h, m]));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }

    /// The sliding window of layer `layer`'s attention: `sliding_window`
    /// in every layer unless [`Self::layer_types`] makes it global.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerType::Full) => None,
            Some(LayerType::Sliding) | None => self.sliding_window,
        }
    }

    /// The base frequency and scaling layer `layer` rotates with: the
    /// local RoPE in a sliding layer of a family that has one, else the
    /// global `rope_theta` and `rope_scaling`.
    pub fn rope_of(&self, layer: usize) -> (f64, &RopeScaling) {
        match (&self.local_rope, self.uses_local_rope(layer)) {
            (Some(local), true) => (local.theta, &local.scaling),
            _ => (self.rope_theta, &self.rope_scaling),
        }
    }

    /// Whether layer `layer` rotates with [`Self::local_rope`].
    pub fn uses_local_rope(&self, layer: usize) -> bool {
        self.local_rope.is_some() && self.layer_types.get(layer) == Some(&LayerType::Sliding)
    }

    /// The width of a q/k norm's weight: `head_dim` per head (Qwen3), or
    /// the whole projection's (OLMo 2).
    pub fn head_norm_width(&self, norm: HeadNorm) -> usize {
        match self.block.qk_norm_scope {
            QkNormScope::Head => self.head_dim,
            QkNormScope::Projection => match norm {
                HeadNorm::Query => self.num_attention_heads * self.head_dim,
                HeadNorm::Key => self.num_key_value_heads * self.head_dim,
            },
        }
    }

    /// Output rows `(out)` of each Linear, as [`Fused`] stacks them.
    fn linear_rows(&self, kind: LinearKind) -> usize {
        match kind {
            LinearKind::QProj => self.num_attention_heads * self.head_dim,
            LinearKind::KProj | LinearKind::VProj => self.num_key_value_heads * self.head_dim,
            LinearKind::OProj | LinearKind::DownProj => self.hidden_size,
            LinearKind::GateProj | LinearKind::UpProj => self.intermediate_size,
        }
    }

    /// The rows `kind` occupies in its fused Linear.
    pub fn fused_rows(&self, fused: Fused, kind: LinearKind) -> Option<Range<usize>> {
        let mut start = 0;
        for part in fused.parts() {
            let rows = self.linear_rows(*part);
            if *part == kind {
                return Some(start..start + rows);
            }
            start += rows;
        }
        None
    }

    /// Where the split Linear weight `name` (e.g.
    /// `model.layers.0.self_attn.k_proj.weight`) lives when this family
    /// stores it fused: the fused tensor's name and the rows it takes.
    /// `None` for a tensor stored under its own name.
    pub fn fused_part(&self, name: &str) -> Option<(String, Range<usize>)> {
        if !self.block.fused_projections {
            return None;
        }
        let id = LinearId::parse(name)?;
        let fused = Fused::of(id.kind)?;
        let rows = self.fused_rows(fused, id.kind)?;
        Some((format!("{}.weight", fused.module_name(id.layer)), rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: serde_json::Value, arch: &str) -> Result<LlamaConfig, ConfigError> {
        let mut json = serde_json::json!({
            "architectures": [arch],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
        });
        if let (Some(base), Some(extra)) = (json.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        LlamaConfig::from_json(&json.to_string(), "config.json".as_ref())
    }

    #[test]
    fn granite_reads_its_multipliers_with_transformers_defaults() {
        let c = parse(
            serde_json::json!({"logits_scaling": 8.0}),
            "GraniteForCausalLM",
        )
        .expect("granite");
        assert_eq!(c.architecture, Architecture::Granite);
        let s = c.block.scalars;
        assert_eq!(s.logits_scaling, 8.0);
        assert_eq!(s.embedding_multiplier, 1.0);
        // GraniteConfig's default is 1.0, not 1/sqrt(head_dim).
        assert_eq!(c.block.attention_scale(c.head_dim), 1.0);
        // Llama ignores Granite's keys, as transformers does.
        let llama = parse(
            serde_json::json!({"logits_scaling": 8.0}),
            "LlamaForCausalLM",
        )
        .expect("llama");
        assert_eq!(llama.block.scalars, Scalars::default());
        assert_eq!(llama.block.attention_scale(16), 0.25);
    }

    #[test]
    fn granite_refuses_a_non_positive_multiplier_naming_the_key() {
        for key in [
            "embedding_multiplier",
            "residual_multiplier",
            "attention_multiplier",
            "logits_scaling",
        ] {
            let err =
                parse(serde_json::json!({ key: 0.0 }), "GraniteForCausalLM").expect_err("refused");
            assert!(
                matches!(&err, ConfigError::InvalidField { field, .. } if *field == key),
                "{err:?}"
            );
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn phi3_reads_fused_projections_and_refuses_a_partial_rotary_factor() {
        let c = parse(serde_json::json!({}), "Phi3ForCausalLM").expect("phi3");
        assert!(c.block.fused_projections);
        let names: Vec<String> = c.expected_tensors().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.layers.0.self_attn.qkv_proj.weight".to_string()));
        assert!(!names.iter().any(|n| n.ends_with("q_proj.weight")));
        // k's rows follow q's 4 heads of 16.
        assert_eq!(
            c.fused_part("model.layers.1.self_attn.k_proj.weight"),
            Some((
                "model.layers.1.self_attn.qkv_proj.weight".to_string(),
                64..96
            ))
        );
        assert_eq!(
            c.fused_part("model.layers.1.mlp.up_proj.weight"),
            Some((
                "model.layers.1.mlp.gate_up_proj.weight".to_string(),
                128..256
            ))
        );
        assert_eq!(c.fused_part("model.layers.1.self_attn.o_proj.weight"), None);
        // Phi-4-mini's 0.75, at the top level (transformers 4) or in
        // rope_parameters (transformers 5).
        let err = parse(
            serde_json::json!({"partial_rotary_factor": 0.75}),
            "Phi3ForCausalLM",
        )
        .expect_err("top level");
        assert!(
            matches!(&err, ConfigError::UnsupportedFeature { key, .. } if *key == "partial_rotary_factor"),
            "{err:?}"
        );
        assert!(!err.to_string().contains("0.75"), "{err}");
        let err = parse(
            serde_json::json!({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}}),
            "Phi3ForCausalLM",
        )
        .expect_err("rope_parameters");
        assert!(err.to_string().contains("partial_rotary_factor"), "{err}");
    }

    #[test]
    fn gemma_reads_transformers_defaults() {
        let c = parse(serde_json::json!({}), "Gemma2ForCausalLM").expect("gemma2");
        let b = c.block;
        assert_eq!(b.norms, NormPlacement::Sandwich);
        assert!(b.norm_unit_offset && !b.qk_norm);
        assert_eq!(b.activation, crate::family::Activation::GeluTanh);
        assert_eq!(b.softcap.attention, Some(50.0));
        assert_eq!(b.softcap.final_logits, Some(30.0));
        assert_eq!(b.scalars.embedding_multiplier, 8.0);
        assert_eq!(b.attention_scale(c.head_dim), 1.0 / 16.0);
        assert_eq!((c.head_dim, c.tie_word_embeddings), (256, true));
        assert_eq!((c.window(0), c.window(1)), (Some(4096), None));
        assert!(c.local_rope.is_none());
        // An explicit null turns a soft-cap off.
        let c = parse(
            serde_json::json!({"attn_logit_softcapping": null}),
            "Gemma2ForCausalLM",
        )
        .expect("gemma2");
        assert_eq!(c.block.softcap.attention, None);
        // Gemma 3 as transformers 4 wrote it: rope_local_base_freq, one
        // global layer in sliding_window_pattern.
        let c = parse(
            serde_json::json!({
                "sliding_window_pattern": 3, "rope_local_base_freq": 20000.0,
                "rope_theta": 500000.0, "num_hidden_layers": 3,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            }),
            "Gemma3ForCausalLM",
        )
        .expect("gemma3");
        assert!(c.block.qk_norm && c.block.softcap.attention.is_none());
        assert_eq!(c.rope_of(0), (20000.0, &RopeScaling::Default));
        assert_eq!(
            c.rope_of(2),
            (500000.0, &RopeScaling::Linear { factor: 8.0 })
        );
        assert_eq!(c.window(2), None);
    }

    #[test]
    fn gemma_refuses_what_it_does_not_implement_naming_the_key() {
        let cases = [
            (
                "Gemma2ForCausalLM",
                serde_json::json!({"hidden_activation": "gelu"}),
                "hidden_activation",
            ),
            (
                "Gemma3ForCausalLM",
                serde_json::json!({"use_bidirectional_attention": true}),
                "use_bidirectional_attention",
            ),
            (
                "Gemma2ForCausalLM",
                serde_json::json!({"layer_types": ["sliding_attention", "chunked_attention"]}),
                "layer_types",
            ),
            (
                "LlamaForCausalLM",
                serde_json::json!({"rope_parameters": {
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "default"},
                }}),
                "rope_parameters",
            ),
            (
                "Gemma2ForCausalLM",
                serde_json::json!({"final_logit_softcapping": 0.0}),
                "final_logit_softcapping",
            ),
            (
                "Gemma2ForCausalLM",
                serde_json::json!({"layer_types": ["full_attention"]}),
                "layer_types",
            ),
        ];
        for (arch, extra, key) in cases {
            let err = parse(extra, arch).expect_err(key);
            assert!(
                matches!(&err, ConfigError::UnsupportedFeature { key: k, .. }
                    | ConfigError::InvalidField { field: k, .. } if *k == key),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{err}");
        }
        // Gemma's own activation key, not the silu check of the others.
        parse(
            serde_json::json!({"hidden_act": "gelu_pytorch_tanh"}),
            "Gemma2ForCausalLM",
        )
        .expect("gemma2 with hidden_act");
    }
}
