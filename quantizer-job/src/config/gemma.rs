//! Gemma 2 and Gemma 3 (text) as [`crate::family::Block`] switches, read
//! from the config keys transformers' `Gemma2Config` / `Gemma3TextConfig`
//! define, with their defaults. The block is the Llama one with `1 + weight`
//! norms, a GeGLU MLP, sandwich norms, the embeddings scaled by
//! `sqrt(hidden_size)`, the score scale `query_pre_attn_scalar ** -0.5`,
//! optional tanh soft-capping, alternating local/global layers and (Gemma 3)
//! per-head q/k norms and a RoPE of their own for the local layers.
//!
//! Keys that change the math in a way the forwards do not implement are
//! refused here, naming the key.

use std::path::Path;

use super::{Architecture, ConfigError, RawConfig};
use crate::family::{Activation, Block, LayerType, NormPlacement, QkNormScope, Scalars, Softcap};

/// The per-layer part of a Gemma config that is not a [`Block`] switch.
pub(super) struct GemmaLayers {
    pub(super) block: Block,
    pub(super) layer_types: Vec<LayerType>,
}

/// `head_dim` when the key is absent (both configs default to 256).
pub(super) const DEFAULT_HEAD_DIM: usize = 256;

/// The only MLP activation the Gemma forwards implement.
const GELU_TANH: &str = "gelu_pytorch_tanh";

/// Reads the Gemma switches of `raw` (`architecture` is Gemma 2 or 3).
pub(super) fn gemma(
    raw: &RawConfig,
    path: &Path,
    architecture: Architecture,
) -> Result<GemmaLayers, ConfigError> {
    let gemma3 = architecture == Architecture::Gemma3;
    let unsupported = |key: &'static str, found: String, supported: &'static str| {
        ConfigError::unsupported(path, key, found, supported)
    };
    let positive = |field: &'static str, value: Option<f64>| super::positive(path, field, value);
    // transformers' Gemma reads hidden_activation only (hidden_act, which
    // older configs also carry, is ignored there too).
    let activation = raw.hidden_activation.as_deref().unwrap_or(GELU_TANH);
    if activation != GELU_TANH {
        return Err(unsupported(
            "hidden_activation",
            activation.to_string(),
            "only \"gelu_pytorch_tanh\" (GeGLU with the tanh approximation)",
        ));
    }
    if raw.use_bidirectional_attention == Some(true) {
        return Err(unsupported(
            "use_bidirectional_attention",
            "true".into(),
            "causal attention only (false or absent)",
        ));
    }
    // Gemma2Config's defaults are 50 and 30; Gemma3TextConfig's are none.
    let (attention_default, logits_default) = match gemma3 {
        true => (None, None),
        false => (Some(50.0), Some(30.0)),
    };
    let softcap = Softcap {
        attention: positive(
            "attn_logit_softcapping",
            raw.attn_logit_softcapping.unwrap_or(attention_default),
        )?,
        final_logits: positive(
            "final_logit_softcapping",
            raw.final_logit_softcapping.unwrap_or(logits_default),
        )?,
    };
    let query_scalar =
        positive("query_pre_attn_scalar", raw.query_pre_attn_scalar)?.unwrap_or(256.0);
    let layer_types = match &raw.layer_types {
        Some(names) => {
            let types = names
                .iter()
                .map(|name| {
                    LayerType::parse(name).ok_or_else(|| {
                        unsupported(
                            "layer_types",
                            format!("{name:?}"),
                            "\"sliding_attention\" and \"full_attention\"",
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if types.len() != raw.num_hidden_layers {
                return Err(ConfigError::InvalidField {
                    path: path.to_path_buf(),
                    field: "layer_types",
                    reason: format!(
                        "{} entries for num_hidden_layers {}",
                        types.len(),
                        raw.num_hidden_layers
                    ),
                });
            }
            types
        }
        // Gemma 2 alternates local and global layers; Gemma 3 has one
        // global layer in sliding_window_pattern (default 6).
        None => {
            let pattern = match gemma3 {
                true => raw.sliding_window_pattern.unwrap_or(6),
                false => 2,
            };
            if pattern == 0 {
                return Err(ConfigError::InvalidField {
                    path: path.to_path_buf(),
                    field: "sliding_window_pattern",
                    reason: "must be positive".into(),
                });
            }
            LayerType::pattern(raw.num_hidden_layers, pattern)
        }
    };
    let attention_bias = raw.attention_bias.unwrap_or(false);
    let block = Block {
        qkv_bias: attention_bias,
        o_bias: attention_bias,
        qk_norm: gemma3,
        qk_norm_scope: QkNormScope::Head,
        norms: NormPlacement::Sandwich,
        scalars: Scalars {
            // `torch.tensor(hidden_size ** 0.5)` in the forward's dtype, f32 here.
            embedding_multiplier: (raw.hidden_size as f64).sqrt(),
            attention_multiplier: Some(query_scalar.powf(-0.5)),
            ..Scalars::default()
        },
        fused_projections: false,
        // No Gemma 2/3 text model routes its MLP through experts.
        moe: None,
        norm_unit_offset: true,
        activation: Activation::GeluTanh,
        softcap,
    };
    Ok(GemmaLayers { block, layer_types })
}
