//! What sets one family of the Llama block layout apart from another.
//!
//! Llama, Mistral, Qwen2, Qwen3, Granite, Phi-3, OLMo 2, Gemma 2 and Gemma 3
//! share one decoder block (RMSNorm, grouped-query attention with RoPE, a
//! gated MLP); they differ in a few switches and scalars — where the norms
//! sit ([`NormPlacement`]), what the q/k norms cover ([`QkNormScope`]),
//! Gemma's `1 + weight` norms, GeGLU ([`Activation`]) and soft-caps
//! ([`Softcap`]) — in how the checkpoint stores the Linears ([`Fused`]), and
//! (Gemma) in which layers are local ([`LayerType`], [`LocalRope`]). Mixtral,
//! Qwen2-MoE, Qwen3-MoE and OLMoE replace the MLP by a router plus experts
//! ([`moe::Moe`]). [`crate::config`] reads them from `config.json` once into a
//! [`Block`], and everything that touches a model reads that one value: the
//! checkpoint's tensor list ([`crate::config::LlamaConfig::expected_tensors`]),
//! the CPU forward ([`crate::model`]), the GPU forward ([`crate::gpu::llama`])
//! and the AWQ fold table ([`crate::llama_layers`]). A family is therefore
//! described in one place and cannot be half-supported on one backend.

pub mod moe;
pub mod moe_linears;

use serde::{Deserialize, Serialize};

use crate::model::LinearKind;

mod attention;

pub use attention::{LayerType, LocalRope};

/// The switches of the shared decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Block {
    /// `q_proj`, `k_proj` and `v_proj` carry a bias (Qwen2; `attention_bias`).
    pub qkv_bias: bool,
    /// `o_proj` carries a bias (`attention_bias` of Llama, Mistral, Qwen3).
    pub o_bias: bool,
    /// Queries and keys go through an RMSNorm (weights
    /// [`HeadNorm::weight_name`], eps `rms_norm_eps`) after the projection and
    /// before RoPE: Qwen3 per head, OLMo 2 over the whole projection
    /// ([`Block::qk_norm_scope`]).
    #[serde(default)]
    pub qk_norm: bool,
    /// What the q/k norms normalise over, when [`Block::qk_norm`].
    #[serde(default)]
    pub qk_norm_scope: QkNormScope,
    /// Where the two RMSNorms of a block sit.
    #[serde(default)]
    pub norms: NormPlacement,
    /// Granite's scalar multipliers (all neutral for the other families).
    #[serde(default)]
    pub scalars: Scalars,
    /// The checkpoint stores q/k/v as one `self_attn.qkv_proj` and gate/up
    /// as one `mlp.gate_up_proj` (Phi-3, [`Fused`]).
    #[serde(default)]
    pub fused_projections: bool,
    /// The MLP is a router plus experts ([`moe::Moe`]: Mixtral, Qwen2-MoE,
    /// Qwen3-MoE, OLMoE) instead of one dense gated MLP.
    #[serde(default)]
    pub moe: Option<moe::Moe>,
    /// Every RMSNorm (the layers', the final one, the q/k norms) scales by
    /// `1 + weight` instead of `weight` (Gemma stores the weight minus one).
    /// The model keeps the stored weights, so what is written back is what
    /// the checkpoint holds; the forwards add the one.
    #[serde(default)]
    pub norm_unit_offset: bool,
    /// The MLP's gate activation.
    #[serde(default)]
    pub activation: Activation,
    /// Gemma 2's `tanh` soft-capping of attention scores and logits.
    #[serde(default)]
    pub softcap: Softcap,
}

/// The activation of the gate branch of the gated MLP, `down(act(gate) · up)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Activation {
    /// SwiGLU, `hidden_act: silu` (Llama and most families).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU, `hidden_activation:
    /// gelu_pytorch_tanh` (Gemma): `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
    GeluTanh,
}

/// `cap · tanh(x / cap)`, as Gemma 2 bounds its attention scores (after
/// the score scale, before the mask) and its final logits.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Softcap {
    /// `attn_logit_softcapping`.
    pub attention: Option<f64>,
    /// `final_logit_softcapping`.
    pub final_logits: Option<f64>,
}

impl Softcap {
    /// `attn_logit_softcapping` in f32, as PyTorch applies a Python float.
    pub fn attention_cap(&self) -> Option<f32> {
        self.attention.map(|c| c as f32)
    }

    /// `final_logit_softcapping` in f32.
    pub fn logits_cap(&self) -> Option<f32> {
        self.final_logits.map(|c| c as f32)
    }
}

/// Where a decoder block's RMSNorms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NormPlacement {
    /// Before each sublayer (Llama and most families): `input_layernorm`
    /// normalises the attention's input, `post_attention_layernorm` the
    /// MLP's input; the sublayers' outputs go to the residual unchanged.
    #[default]
    Pre,
    /// After each sublayer (OLMo 2): the attention and the MLP read the
    /// residual stream itself, `post_attention_layernorm` normalises the
    /// attention's output and `post_feedforward_layernorm` the MLP's output
    /// before each is added to the residual. There is no `input_layernorm`,
    /// so no norm for AWQ to fold the scales of q/k/v or gate/up into.
    Post,
    /// Before and after each sublayer (Gemma 2 and 3): `input_layernorm`
    /// and `post_attention_layernorm` around the attention,
    /// `pre_feedforward_layernorm` and `post_feedforward_layernorm` around
    /// the MLP.
    Sandwich,
}

/// One of the RMSNorms of a decoder layer, by its checkpoint leaf name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerNorm {
    /// `input_layernorm`.
    Input,
    /// `post_attention_layernorm`.
    PostAttention,
    /// `pre_feedforward_layernorm`.
    PreFeedforward,
    /// `post_feedforward_layernorm`.
    PostFeedforward,
}

impl LayerNorm {
    /// All four, in forward order.
    pub const ALL: [LayerNorm; 4] = [
        LayerNorm::Input,
        LayerNorm::PostAttention,
        LayerNorm::PreFeedforward,
        LayerNorm::PostFeedforward,
    ];

    /// The module's leaf name in a checkpoint.
    pub fn leaf(self) -> &'static str {
        match self {
            LayerNorm::Input => "input_layernorm",
            LayerNorm::PostAttention => "post_attention_layernorm",
            LayerNorm::PreFeedforward => "pre_feedforward_layernorm",
            LayerNorm::PostFeedforward => "post_feedforward_layernorm",
        }
    }

    /// `model.layers.{layer}.{leaf}.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.leaf())
    }

    /// Parses a name written by [`Self::weight_name`].
    pub fn parse(name: &str) -> Option<(usize, LayerNorm)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (index, leaf) = rest.split_once('.')?;
        let leaf = leaf.strip_suffix(".weight")?;
        let norm = Self::ALL.into_iter().find(|n| n.leaf() == leaf)?;
        Some((index.parse().ok()?, norm))
    }
}

/// The norms around one sublayer (attention or MLP): the one its Linears
/// read the output of, and the one its output goes through before the
/// residual add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SublayerNorms {
    /// Normalises the sublayer's input.
    pub before: Option<LayerNorm>,
    /// Normalises the sublayer's output.
    pub after: Option<LayerNorm>,
}

impl NormPlacement {
    /// The norms a layer of this placement has, in forward order.
    pub fn norms(self) -> Vec<LayerNorm> {
        let (a, m) = (self.attention(), self.mlp());
        [a.before, a.after, m.before, m.after]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The norms around the attention.
    pub fn attention(self) -> SublayerNorms {
        let (before, after) = match self {
            NormPlacement::Pre => (Some(LayerNorm::Input), None),
            NormPlacement::Post => (None, Some(LayerNorm::PostAttention)),
            NormPlacement::Sandwich => (Some(LayerNorm::Input), Some(LayerNorm::PostAttention)),
        };
        SublayerNorms { before, after }
    }

    /// The norms around the MLP.
    pub fn mlp(self) -> SublayerNorms {
        let (before, after) = match self {
            NormPlacement::Pre => (Some(LayerNorm::PostAttention), None),
            NormPlacement::Post => (None, Some(LayerNorm::PostFeedforward)),
            NormPlacement::Sandwich => (
                Some(LayerNorm::PreFeedforward),
                Some(LayerNorm::PostFeedforward),
            ),
        };
        SublayerNorms { before, after }
    }
}

/// What [`Block::qk_norm`] normalises over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum QkNormScope {
    /// Each head on its own, weights `[head_dim]` (Qwen3).
    #[default]
    Head,
    /// The whole projection output, all heads at once, weights
    /// `[num_heads · head_dim]` and `[num_kv_heads · head_dim]` (OLMo 2).
    Projection,
}

impl Block {
    /// What every RMSNorm adds to its weight before scaling: 1 for Gemma's
    /// `1 + weight` norms ([`Block::norm_unit_offset`]), else 0.
    pub fn norm_offset(&self) -> f32 {
        match self.norm_unit_offset {
            true => 1.0,
            false => 0.0,
        }
    }

    /// The factor the attention scores `q·k` are multiplied by: Granite's
    /// `attention_multiplier` (Gemma's `query_pre_attn_scalar ** -0.5` is
    /// read into the same field), else `1 / sqrt(head_dim)`.
    pub fn attention_scale(&self, head_dim: usize) -> f64 {
        self.scalars
            .attention_multiplier
            .unwrap_or_else(|| 1.0 / (head_dim as f64).sqrt())
    }
}

/// Scalars that transformers' Granite multiplies into an otherwise Llama
/// forward (`modeling_granite.py`), read from `config.json`'s keys of the
/// same names. Each is applied in f32 exactly where transformers applies it,
/// on both backends: a neutral value (1, or `None`) is skipped, which changes
/// nothing since multiplying by 1 is exact.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scalars {
    /// `embedding_multiplier`: the embeddings are multiplied by it before
    /// the first layer.
    pub embedding_multiplier: f64,
    /// `residual_multiplier`: each block's attention and MLP output is
    /// multiplied by it before it is added to the residual stream.
    pub residual_multiplier: f64,
    /// `attention_multiplier`: the attention score scale, replacing
    /// `1 / sqrt(head_dim)`; `None` keeps that default.
    pub attention_multiplier: Option<f64>,
    /// `logits_scaling`: the logits are divided by it.
    pub logits_scaling: f64,
}

impl Default for Scalars {
    fn default() -> Self {
        Self {
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            attention_multiplier: None,
            logits_scaling: 1.0,
        }
    }
}

impl Scalars {
    /// The factor the embeddings are multiplied by, `None` when neutral.
    pub fn embedding(&self) -> Option<f32> {
        neutral_free(self.embedding_multiplier)
    }

    /// The factor each sublayer's output is multiplied by, `None` when neutral.
    pub fn residual(&self) -> Option<f32> {
        neutral_free(self.residual_multiplier)
    }

    /// The divisor of the logits, `None` when neutral.
    pub fn logits_divisor(&self) -> Option<f32> {
        neutral_free(self.logits_scaling)
    }
}

/// `value` in f32 (as PyTorch applies a Python float to an f32 tensor), or
/// `None` for 1.
fn neutral_free(value: f64) -> Option<f32> {
    (value != 1.0).then_some(value as f32)
}

/// One of the q/k RMSNorms of [`Block::qk_norm`]. They are not Linears:
/// never quantized, and written unchanged into an artifact beside the other
/// norms. AWQ never folds into them and never scales what they normalise
/// (see [`crate::llama_layers::llama_input_groups`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadNorm {
    /// `self_attn.q_norm`, over the queries.
    Query,
    /// `self_attn.k_norm`, over the keys.
    Key,
}

impl HeadNorm {
    /// Both, queries first.
    pub const ALL: [HeadNorm; 2] = [HeadNorm::Query, HeadNorm::Key];

    /// The module's leaf name in a checkpoint.
    pub fn leaf(self) -> &'static str {
        match self {
            HeadNorm::Query => "q_norm",
            HeadNorm::Key => "k_norm",
        }
    }

    /// `model.layers.{layer}.self_attn.{q,k}_norm.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.self_attn.{}.weight", self.leaf())
    }

    /// Parses a name written by [`Self::weight_name`].
    pub fn parse(name: &str) -> Option<(usize, HeadNorm)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (index, leaf) = rest.split_once(".self_attn.")?;
        let norm = Self::ALL
            .into_iter()
            .find(|n| leaf.strip_suffix(".weight") == Some(n.leaf()))?;
        Some((index.parse().ok()?, norm))
    }
}

/// A Linear that Phi-3 checkpoints store as the row-wise concatenation of
/// the block's Linears sharing its input: `qkv_proj = [q; k; v]` and
/// `gate_up_proj = [gate; up]` (transformers' `Phi3Attention` slices q, k, v
/// off the columns of its output in that order, `Phi3MLP` chunks gate then
/// up).
///
/// Both forwards run the split Linears: the checkpoint
/// ([`crate::checkpoint::Checkpoint::raw`]) and the model's loader
/// ([`crate::model::LlamaModel::from_tensors`]) hand out each part as rows
/// of the fused tensor ([`crate::config::LlamaConfig::fused_part`]), so the
/// one forward, the capture points and the quantizers need nothing new. The
/// writer fuses the quantized parts again under the checkpoint's name
/// ([`crate::format::fused`]), because transformers, vLLM and llm-compressor
/// expect `qkv_proj` and `gate_up_proj` for Phi-3. That is exact: every
/// scheme's scales are per output row (per channel, or per group along the
/// input), so the parts' rows are the fused Linear's rows, quantized with the
/// same input statistics (one Hessian or AWQ scale per shared input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fused {
    /// `self_attn.qkv_proj`: `q_proj`, `k_proj`, `v_proj`.
    Qkv,
    /// `mlp.gate_up_proj`: `gate_proj`, `up_proj`.
    GateUp,
}

impl Fused {
    /// Both, in forward order.
    pub const ALL: [Fused; 2] = [Fused::Qkv, Fused::GateUp];

    /// The module path inside a decoder layer.
    pub fn leaf(self) -> &'static str {
        match self {
            Fused::Qkv => "self_attn.qkv_proj",
            Fused::GateUp => "mlp.gate_up_proj",
        }
    }

    /// `model.layers.{layer}.{leaf}`.
    pub fn module_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.leaf())
    }

    /// The Linears it holds, in row order.
    pub fn parts(self) -> &'static [LinearKind] {
        match self {
            Fused::Qkv => &[LinearKind::QProj, LinearKind::KProj, LinearKind::VProj],
            Fused::GateUp => &[LinearKind::GateProj, LinearKind::UpProj],
        }
    }

    /// The fused Linear holding `kind`, if any.
    pub fn of(kind: LinearKind) -> Option<Fused> {
        Self::ALL.into_iter().find(|f| f.parts().contains(&kind))
    }

    /// Parses a module name written by [`Self::module_name`].
    pub fn parse(module: &str) -> Option<(usize, Fused)> {
        let rest = module.strip_prefix("model.layers.")?;
        let (index, leaf) = rest.split_once('.')?;
        let fused = Self::ALL.into_iter().find(|f| f.leaf() == leaf)?;
        Some((index.parse().ok()?, fused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_names_round_trip_and_cover_every_shared_input() {
        for fused in Fused::ALL {
            assert_eq!(Fused::parse(&fused.module_name(3)), Some((3, fused)));
            for kind in fused.parts() {
                assert_eq!(Fused::of(*kind), Some(fused));
            }
        }
        assert_eq!(Fused::of(LinearKind::OProj), None);
        assert_eq!(Fused::of(LinearKind::DownProj), None);
        assert_eq!(Fused::parse("model.layers.3.self_attn.q_proj"), None);
    }

    #[test]
    fn layer_norm_names_round_trip_and_placements_list_each_once() {
        for norm in LayerNorm::ALL {
            assert_eq!(LayerNorm::parse(&norm.weight_name(5)), Some((5, norm)));
        }
        assert_eq!(LayerNorm::parse("model.layers.5.input_layernorm"), None);
        assert_eq!(LayerNorm::parse("model.norm.weight"), None);
        assert_eq!(
            LayerNorm::parse("model.layers.x.input_layernorm.weight"),
            None
        );
        assert_eq!(NormPlacement::Pre.norms().len(), 2);
        assert_eq!(NormPlacement::Post.norms().len(), 2);
        assert_eq!(NormPlacement::Sandwich.norms(), LayerNorm::ALL.to_vec());
    }

    #[test]
    fn head_norm_names_round_trip() {
        for norm in HeadNorm::ALL {
            let name = norm.weight_name(7);
            assert_eq!(HeadNorm::parse(&name), Some((7, norm)), "{name}");
        }
        for other in [
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.x.self_attn.q_norm.weight",
            "model.layers.1.self_attn.q_norm.bias",
        ] {
            assert_eq!(HeadNorm::parse(other), None, "{other}");
        }
    }
}
