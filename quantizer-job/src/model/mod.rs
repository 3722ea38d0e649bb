//! A Llama-family decoder in f32 on the candle CPU backend, with a
//! layer-by-layer API so sequential quantizers (GPTQ, AWQ) can run one
//! decoder layer at a time, capture each Linear's inputs and swap weights.

mod block_ops;
mod generate;
mod linear;
mod moe;
mod norm;
mod rope;

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor};

pub use generate::{Decoding, KvCache, SamplingParams, pick_greedy, pick_sampled};
pub use linear::{Capture, LinearId, LinearKind};
pub use norm::{NormId, NormKind};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::LlamaConfig;
use crate::family::{HeadNorm, LayerNorm, QkNormScope, SublayerNorms};
use block_ops::{rms_norm, softcap};
use linear::Linear;
use moe::{GatedMlp, MoeMlp};
use rope::Rope;

/// The name of the output projection in [`LlamaModel::linear_names`].
pub const LM_HEAD: &str = "lm_head.weight";

/// Why building or running the model failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor the config requires was not supplied.
    #[error("missing tensor {name} in the weight source")]
    MissingTensor {
        /// The tensor's name.
        name: String,
    },
    /// A tensor's shape disagrees with the config.
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's name.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape supplied.
        found: Vec<usize>,
    },
    /// A layer index past the last layer.
    #[error("layer {index} out of range: the model has {layers} layers")]
    LayerOutOfRange {
        /// The requested index.
        index: usize,
        /// Number of layers.
        layers: usize,
    },
    /// A name that is not one of [`LlamaModel::linear_names`].
    #[error("unknown linear weight {name}")]
    UnknownLinear {
        /// The requested name.
        name: String,
    },
    /// A sequence longer than the RoPE tables (max_position_embeddings).
    #[error("sequence of {len} positions exceeds max_position_embeddings {max}")]
    SequenceTooLong {
        /// Positions requested.
        len: usize,
        /// Positions supported.
        max: usize,
    },
    /// An empty token sequence.
    #[error("empty token sequence")]
    EmptyInput,
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfVocabulary {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result alias for model operations.
pub type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, Clone)]
struct DecoderLayer {
    /// The layer's RMSNorms, those its family's
    /// [`crate::family::NormPlacement`] lists (two, or Gemma's four).
    norms: Vec<(LayerNorm, Tensor)>,
    /// The RMSNorms of queries and keys, when the family has them
    /// ([`crate::family::Block::qk_norm`]): `[head_dim]` per head, or the
    /// whole projection's width ([`QkNormScope`]).
    head_norms: Option<HeadNorms>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    mlp: Mlp,
}

/// A decoder layer's MLP: one gated MLP, or a router plus experts
/// ([`crate::family::Block::moe`]), both gated by
/// [`crate::family::Block::activation`].
#[derive(Debug, Clone)]
enum Mlp {
    Dense(GatedMlp),
    Moe(MoeMlp),
}

/// The `q_norm` and `k_norm` weights of one layer (Qwen3, OLMo 2).
#[derive(Debug, Clone)]
struct HeadNorms {
    q: Tensor,
    k: Tensor,
}

impl HeadNorms {
    fn get(&self, norm: HeadNorm) -> &Tensor {
        match norm {
            HeadNorm::Query => &self.q,
            HeadNorm::Key => &self.k,
        }
    }
}

impl DecoderLayer {
    /// Normalises the last dimension of `x` with the layer's `norm` when the
    /// family has one (before RoPE, as transformers does): each head of `[b,
    /// heads, t, head_dim]`, or a whole projection `[b·t, heads·head_dim]`.
    fn head_norm(
        &self,
        norm: HeadNorm,
        x: Tensor,
        eps: f64,
        offset: f32,
    ) -> candle_core::Result<Tensor> {
        match &self.head_norms {
            Some(norms) => rms_norm(&x, norms.get(norm), eps, offset),
            None => Ok(x),
        }
    }

    /// The weight of `norm`, when the layer has it.
    fn norm(&self, norm: LayerNorm) -> Option<&Tensor> {
        self.norms.iter().find(|(n, _)| *n == norm).map(|(_, w)| w)
    }

    fn norm_mut(&mut self, norm: LayerNorm) -> Option<&mut Tensor> {
        self.norms
            .iter_mut()
            .find(|(n, _)| *n == norm)
            .map(|(_, w)| w)
    }

    /// `x` through the sublayer norm `norm` when there is one, else `x`.
    fn normed(
        &self,
        norm: Option<LayerNorm>,
        x: &Tensor,
        eps: f64,
        offset: f32,
    ) -> candle_core::Result<Tensor> {
        match norm.and_then(|n| self.norm(n)) {
            Some(w) => rms_norm(x, w, eps, offset),
            None => Ok(x.clone()),
        }
    }

    /// The Linear `kind`; `None` for the dense MLP's Linears of a layer
    /// whose MLP is a mixture of experts.
    fn linear(&self, kind: LinearKind) -> Option<&Linear> {
        Some(match (kind, &self.mlp) {
            (LinearKind::QProj, _) => &self.q_proj,
            (LinearKind::KProj, _) => &self.k_proj,
            (LinearKind::VProj, _) => &self.v_proj,
            (LinearKind::OProj, _) => &self.o_proj,
            (_, Mlp::Moe(_)) => return None,
            (LinearKind::GateProj, Mlp::Dense(m)) => &m.gate,
            (LinearKind::UpProj, Mlp::Dense(m)) => &m.up,
            (LinearKind::DownProj, Mlp::Dense(m)) => &m.down,
        })
    }

    fn linear_mut(&mut self, kind: LinearKind) -> Option<&mut Linear> {
        Some(match (kind, &mut self.mlp) {
            (LinearKind::QProj, _) => &mut self.q_proj,
            (LinearKind::KProj, _) => &mut self.k_proj,
            (LinearKind::VProj, _) => &mut self.v_proj,
            (LinearKind::OProj, _) => &mut self.o_proj,
            (_, Mlp::Moe(_)) => return None,
            (LinearKind::GateProj, Mlp::Dense(m)) => &mut m.gate,
            (LinearKind::UpProj, Mlp::Dense(m)) => &mut m.up,
            (LinearKind::DownProj, Mlp::Dense(m)) => &mut m.down,
        })
    }
}

/// A Llama-family causal LM held in f32.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: Rope,
    /// The local layers' RoPE when the family has its own for them (Gemma 3).
    local_rope: Option<Rope>,
}

/// Takes a tensor out of the weight map, checking its shape.
fn take(
    tensors: &mut HashMap<String, Tensor>,
    shapes: &HashMap<String, Vec<usize>>,
    name: &str,
) -> Result<Tensor> {
    let tensor = tensors
        .remove(name)
        .ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
        })?;
    if let Some(expected) = shapes.get(name)
        && tensor.dims() != expected.as_slice()
    {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.clone(),
            found: tensor.dims().to_vec(),
        });
    }
    Ok(tensor.to_dtype(DType::F32)?)
}

impl LlamaModel {
    /// Loads every weight of an opened checkpoint (converted to f32).
    pub fn from_checkpoint(checkpoint: &Checkpoint) -> Result<Self> {
        let tensors = checkpoint.load_all_f32()?;
        Self::from_tensors(checkpoint.config().clone(), tensors)
    }

    /// Builds the model from a weight source: Hugging Face tensor names to
    /// tensors (f32, or any float dtype, converted). A compressed-tensors
    /// reader supplies dequantized linears under the same names. Extra
    /// tensors are ignored; missing or mis-shaped ones are errors.
    pub fn from_tensors(config: LlamaConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        let shapes: HashMap<String, Vec<usize>> = config.expected_tensors().into_iter().collect();
        let linear = |tensors: &mut HashMap<String, Tensor>, id: LinearId, bias: bool| {
            let name = id.weight_name();
            let weight = match config.fused_part(&name) {
                // Phi-3's fused qkv_proj / gate_up_proj: this Linear's rows.
                Some((fused, rows)) if !tensors.contains_key(&name) => {
                    let whole = tensors
                        .get(&fused)
                        .ok_or_else(|| ModelError::MissingTensor {
                            name: fused.clone(),
                        })?;
                    if let Some(expected) = shapes.get(&fused)
                        && whole.dims() != expected.as_slice()
                    {
                        return Err(ModelError::ShapeMismatch {
                            name: fused,
                            expected: expected.clone(),
                            found: whole.dims().to_vec(),
                        });
                    }
                    whole
                        .narrow(0, rows.start, rows.len())?
                        .to_dtype(DType::F32)?
                        .contiguous()?
                }
                _ => take(tensors, &shapes, &name)?,
            };
            let bias = if bias {
                let bias_name = format!("{}.bias", name.trim_end_matches(".weight"));
                Some(take(tensors, &shapes, &bias_name)?)
            } else {
                None
            };
            Ok::<_, ModelError>(Linear { weight, bias })
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let id = |kind| LinearId { layer, kind };
            let block = config.block;
            let head_norms = if block.qk_norm {
                Some(HeadNorms {
                    q: take(&mut tensors, &shapes, &HeadNorm::Query.weight_name(layer))?,
                    k: take(&mut tensors, &shapes, &HeadNorm::Key.weight_name(layer))?,
                })
            } else {
                None
            };
            let norms = block
                .norms
                .norms()
                .into_iter()
                .map(|n| Ok((n, take(&mut tensors, &shapes, &n.weight_name(layer))?)))
                .collect::<Result<_>>()?;
            let mlp = match block.moe {
                Some(spec) => Mlp::Moe(MoeMlp::load(spec, layer, &mut |name| {
                    take(&mut tensors, &shapes, name)
                })?),
                None => Mlp::Dense(GatedMlp {
                    gate: linear(&mut tensors, id(LinearKind::GateProj), false)?,
                    up: linear(&mut tensors, id(LinearKind::UpProj), false)?,
                    down: linear(&mut tensors, id(LinearKind::DownProj), false)?,
                }),
            };
            layers.push(DecoderLayer {
                head_norms,
                norms,
                q_proj: linear(&mut tensors, id(LinearKind::QProj), block.qkv_bias)?,
                k_proj: linear(&mut tensors, id(LinearKind::KProj), block.qkv_bias)?,
                v_proj: linear(&mut tensors, id(LinearKind::VProj), block.qkv_bias)?,
                o_proj: linear(&mut tensors, id(LinearKind::OProj), block.o_bias)?,
                mlp,
            });
        }
        let embed_tokens = take(&mut tensors, &shapes, "model.embed_tokens.weight")?;
        let norm = take(&mut tensors, &shapes, "model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            take(&mut tensors, &shapes, LM_HEAD)?
        };
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            &config.rope_scaling,
            config.max_position_embeddings,
        )?;
        let local_rope = config
            .local_rope
            .as_ref()
            .map(|local| {
                Rope::new(
                    config.head_dim,
                    local.theta,
                    &local.scaling,
                    config.max_position_embeddings,
                )
            })
            .transpose()?;
        Ok(LlamaModel {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            local_rope,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Builds a `[batch, len]` u32 token tensor from equal-length sequences,
    /// checking ids against the vocabulary.
    pub fn token_tensor(&self, sequences: &[Vec<u32>]) -> Result<Tensor> {
        let len = sequences.first().map_or(0, Vec::len);
        if len == 0 {
            return Err(ModelError::EmptyInput);
        }
        let mut flat = Vec::with_capacity(sequences.len() * len);
        for seq in sequences {
            if seq.len() != len {
                return Err(ModelError::ShapeMismatch {
                    name: "token batch".into(),
                    expected: vec![sequences.len(), len],
                    found: vec![sequences.len(), seq.len()],
                });
            }
            flat.extend_from_slice(seq);
        }
        Ok(Tensor::from_vec(
            flat,
            (sequences.len(), len),
            &Device::Cpu,
        )?)
    }

    /// Embeds `tokens` of shape `[b, t]` (u32) into hidden states `[b, t, h]`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if t == 0 {
            return Err(ModelError::EmptyInput);
        }
        let vocab = self.config.vocab_size;
        let ids = tokens.flatten_all()?;
        if let Some(&id) = ids
            .to_vec1::<u32>()?
            .iter()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(ModelError::TokenOutOfVocabulary { id, vocab });
        }
        let x =
            self.embed_tokens
                .index_select(&ids, 0)?
                .reshape((b, t, self.config.hidden_size))?;
        Ok(match self.config.block.scalars.embedding() {
            Some(m) => x.affine(f64::from(m), 0.0)?,
            None => x,
        })
    }

    /// Runs decoder layer `index` on hidden states `[b, t, h]` (positions
    /// starting at 0, causal attention). When `capture` is given it receives
    /// every Linear's input activations flattened to `[b*t, in]`, which is
    /// what GPTQ's Hessians and AWQ's activation statistics are built from.
    pub fn layer_forward(
        &self,
        index: usize,
        hidden: &Tensor,
        capture: Option<Capture<'_>>,
    ) -> Result<Tensor> {
        self.layer_forward_at(index, hidden, 0, None, capture)
    }

    /// The final norm and `lm_head`: hidden `[b, t, h]` to logits `[b, t, V]`.
    pub fn final_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let block = &self.config.block;
        let x = rms_norm(
            hidden,
            &self.norm,
            self.config.rms_norm_eps,
            block.norm_offset(),
        )?;
        let logits = x.reshape((b * t, h))?.matmul(&self.lm_head.t()?)?;
        let logits = match block.scalars.logits_divisor() {
            // Divided, not multiplied by the reciprocal, as transformers does.
            Some(d) => logits.broadcast_div(&Tensor::new(d, &Device::Cpu)?)?,
            None => logits,
        };
        let logits = softcap(logits, block.softcap.logits_cap())?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Full forward pass: tokens `[b, t]` to logits `[b, t, V]`.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let mut hidden = self.embed(tokens)?;
        for i in 0..self.layers.len() {
            hidden = self.layer_forward(i, &hidden, None)?;
        }
        self.final_logits(&hidden)
    }

    /// Every Linear weight name, layer by layer in forward order, then
    /// `lm_head.weight`.
    pub fn linear_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(layer, l)| {
                LinearKind::ALL
                    .into_iter()
                    .filter(|kind| l.linear(*kind).is_some())
                    .map(move |kind| LinearId { layer, kind }.weight_name())
            })
            .collect();
        names.push(LM_HEAD.to_string());
        names
    }

    /// The weight `[out, in]` of a Linear named as in [`Self::linear_names`].
    pub fn linear_weight(&self, name: &str) -> Result<&Tensor> {
        if name == LM_HEAD {
            return Ok(&self.lm_head);
        }
        Ok(&self.linear(name)?.weight)
    }

    /// Replaces a Linear's weight (e.g. by its dequantized version); the
    /// shape must stay the same.
    pub fn set_linear_weight(&mut self, name: &str, weight: Tensor) -> Result<()> {
        let weight = weight.to_dtype(DType::F32)?;
        let slot = if name == LM_HEAD {
            &mut self.lm_head
        } else {
            &mut self.linear_mut(name)?.weight
        };
        check_same_shape(name, slot, &weight)?;
        *slot = weight;
        Ok(())
    }

    /// The embedding table `[V, h]` (what a GPU copy of the model uploads).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The final norm's weight `[h]`.
    pub fn final_norm(&self) -> &Tensor {
        &self.norm
    }

    /// The bias of a Linear named as in [`Self::linear_names`], when the
    /// config gives it one (q/k/v of Qwen2, `attention_bias`).
    pub fn linear_bias(&self, name: &str) -> Result<Option<&Tensor>> {
        if name == LM_HEAD {
            return Ok(None);
        }
        Ok(self.linear(name)?.bias.as_ref())
    }

    /// Layer `index`'s `input_layernorm` weight `[h]`; an error for a
    /// family whose norms follow the sublayers (OLMo 2 has none).
    pub fn input_layernorm(&self, index: usize) -> Result<&Tensor> {
        self.layer_norm_required(index, LayerNorm::Input)
    }

    /// Layer `index`'s weight `[h]` of `norm` as the checkpoint stores it
    /// (Gemma's without the one its forward adds); `None` when the family's
    /// placement has no such norm.
    pub fn layer_norm(&self, index: usize, norm: LayerNorm) -> Result<Option<&Tensor>> {
        Ok(self.layer(index)?.norm(norm))
    }

    fn layer_norm_required(&self, index: usize, norm: LayerNorm) -> Result<&Tensor> {
        self.layer(index)?
            .norm(norm)
            .ok_or_else(|| ModelError::MissingTensor {
                name: norm.weight_name(index),
            })
    }

    /// Replaces layer `index`'s weight of `norm` (AWQ folds its scales into
    /// the norms before q/k/v and gate/up).
    fn set_layer_norm(&mut self, index: usize, norm: LayerNorm, weight: Tensor) -> Result<()> {
        let name = norm.weight_name(index);
        let slot = self
            .layer_mut(index)?
            .norm_mut(norm)
            .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
        let weight = weight.to_dtype(DType::F32)?;
        check_same_shape(&name, slot, &weight)?;
        *slot = weight;
        Ok(())
    }

    /// Layer `index`'s `post_feedforward_layernorm` weight `[h]`, when the
    /// family has one (OLMo 2, Gemma).
    pub fn post_feedforward_layernorm(&self, index: usize) -> Result<Option<&Tensor>> {
        self.layer_norm(index, LayerNorm::PostFeedforward)
    }

    /// Replaces layer `index`'s `input_layernorm` weight (AWQ folds its
    /// scales into it).
    pub fn set_input_layernorm(&mut self, index: usize, weight: Tensor) -> Result<()> {
        self.set_layer_norm(index, LayerNorm::Input, weight)
    }

    /// Layer `index`'s `q_norm` or `k_norm` weight; `None` when the family
    /// has no q/k norms.
    pub fn head_norm(&self, index: usize, norm: HeadNorm) -> Result<Option<&Tensor>> {
        Ok(self.layer(index)?.head_norms.as_ref().map(|n| n.get(norm)))
    }

    /// Layer `index`'s `post_attention_layernorm` weight `[h]`.
    pub fn post_attention_layernorm(&self, index: usize) -> Result<&Tensor> {
        self.layer_norm_required(index, LayerNorm::PostAttention)
    }

    /// Replaces layer `index`'s `post_attention_layernorm` weight.
    pub fn set_post_attention_layernorm(&mut self, index: usize, weight: Tensor) -> Result<()> {
        self.set_layer_norm(index, LayerNorm::PostAttention, weight)
    }

    fn layer(&self, index: usize) -> Result<&DecoderLayer> {
        let layers = self.layers.len();
        self.layers
            .get(index)
            .ok_or(ModelError::LayerOutOfRange { index, layers })
    }

    fn layer_mut(&mut self, index: usize) -> Result<&mut DecoderLayer> {
        let layers = self.layers.len();
        self.layers
            .get_mut(index)
            .ok_or(ModelError::LayerOutOfRange { index, layers })
    }

    /// The Linear named as in [`Self::linear_names`] (not `lm_head`).
    /// A decoder layer's Linear by weight name: attention and dense MLP
    /// Linears through [`LinearId`], a MoE layer's expert Linears
    /// (`…experts.N.w1.weight`, `…shared_expert.up_proj.weight`) through
    /// the family's names.
    fn linear(&self, name: &str) -> Result<&Linear> {
        let unknown = || ModelError::UnknownLinear {
            name: name.to_string(),
        };
        if let Some((layer, module)) = expert_module(name) {
            return match self.layers.get(layer).map(|l| &l.mlp) {
                Some(Mlp::Moe(mlp)) => mlp.linear(layer, module).ok_or_else(unknown),
                _ => Err(unknown()),
            };
        }
        let id = self.linear_id(name)?;
        self.layers[id.layer].linear(id.kind).ok_or_else(unknown)
    }

    /// [`Self::linear`], to replace its weight.
    fn linear_mut(&mut self, name: &str) -> Result<&mut Linear> {
        let unknown = || ModelError::UnknownLinear {
            name: name.to_string(),
        };
        if let Some((layer, module)) = expert_module(name) {
            return match self.layers.get_mut(layer).map(|l| &mut l.mlp) {
                Some(Mlp::Moe(mlp)) => mlp.linear_mut(layer, module).ok_or_else(unknown),
                _ => Err(unknown()),
            };
        }
        let id = self.linear_id(name)?;
        self.layers[id.layer]
            .linear_mut(id.kind)
            .ok_or_else(unknown)
    }

    fn linear_id(&self, name: &str) -> Result<LinearId> {
        LinearId::parse(name)
            .filter(|id| id.layer < self.layers.len())
            .ok_or_else(|| ModelError::UnknownLinear {
                name: name.to_string(),
            })
    }

    /// One decoder layer for positions `offset..offset+t`, optionally
    /// appending keys/values to (and attending over) `cache`.
    fn layer_forward_at(
        &self,
        index: usize,
        hidden: &Tensor,
        offset: usize,
        cache: Option<&mut (Option<Tensor>, Option<Tensor>)>,
        mut capture: Option<Capture<'_>>,
    ) -> Result<Tensor> {
        let layer = self.layer(index)?;
        let cfg = &self.config;
        let (b, t, h) = hidden.dims3()?;
        if offset + t > self.rope.max_positions() {
            return Err(ModelError::SequenceTooLong {
                len: offset + t,
                max: self.rope.max_positions(),
            });
        }
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let rep = nh / nkv;
        let mut emit = |kind: LinearKind, x: &Tensor| {
            if let Some(cb) = capture.as_mut() {
                cb(LinearId { layer: index, kind }, x);
            }
        };

        let block = &cfg.block;
        let (eps, norm_offset) = (cfg.rms_norm_eps, block.norm_offset());
        let SublayerNorms { before, after } = block.norms.attention();
        // Attention block (its input normed unless the norms follow it).
        let x = layer
            .normed(before, hidden, eps, norm_offset)?
            .reshape((b * t, h))?;
        emit(LinearKind::QProj, &x);
        emit(LinearKind::KProj, &x);
        emit(LinearKind::VProj, &x);
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        // q/k norms over the whole projection (OLMo 2) or per head (Qwen3).
        let per_head = block.qk_norm_scope == QkNormScope::Head;
        let normed = |norm, y: Tensor, here: bool| match here {
            true => layer.head_norm(norm, y, eps, norm_offset),
            false => Ok(y),
        };
        let rope = match (&self.local_rope, cfg.uses_local_rope(index)) {
            (Some(local), true) => local,
            _ => &self.rope,
        };
        let q = layer.q_proj.forward(&x)?;
        let q = heads(normed(HeadNorm::Query, q, !per_head)?, nh)?;
        let q = rope.apply(&normed(HeadNorm::Query, q, per_head)?, offset)?;
        let k = layer.k_proj.forward(&x)?;
        let k = heads(normed(HeadNorm::Key, k, !per_head)?, nkv)?;
        let k = rope.apply(&normed(HeadNorm::Key, k, per_head)?, offset)?;
        let v = heads(layer.v_proj.forward(&x)?, nkv)?;
        let (k, v) = match cache {
            Some((ck, cv)) => {
                let k = match ck.as_ref() {
                    Some(prev) => Tensor::cat(&[prev, &k], 2)?,
                    None => k,
                };
                let v = match cv.as_ref() {
                    Some(prev) => Tensor::cat(&[prev, &v], 2)?,
                    None => v,
                };
                *ck = Some(k.clone());
                *cv = Some(v.clone());
                (k, v)
            }
            None => (k, v),
        };
        let kv_len = k.dim(2)?;
        // Grouped-query attention without materialising repeated K/V: the
        // `rep` query heads sharing one KV head are stacked along the rows.
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scale = block.attention_scale(hd);
        let scores = softcap((q.matmul(&k.t()?)? * scale)?, block.softcap.attention_cap())?
            .reshape((b, nh, t, kv_len))?;
        let window = cfg.window(index).filter(|w| *w < kv_len);
        let scores = if t > 1 || window.is_some() {
            scores.broadcast_add(&causal_mask(t, kv_len, window)?)?
        } else {
            scores
        };
        let probs = softmax_last(&scores)?.reshape((b, nkv, rep * t, kv_len))?;
        let attn = probs
            .matmul(&v)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?;
        emit(LinearKind::OProj, &attn);
        let residual = block.scalars.residual();
        let scaled = |y: Tensor| match residual {
            Some(m) => y.affine(f64::from(m), 0.0),
            None => Ok(y),
        };
        let out = layer.o_proj.forward(&attn)?.reshape((b, t, h))?;
        let out = layer.normed(after, &out, eps, norm_offset)?;
        let hidden = (hidden + scaled(out)?)?;

        // MLP block (its input normed unless the norms follow it).
        let SublayerNorms { before, after } = block.norms.mlp();
        let x = layer
            .normed(before, &hidden, eps, norm_offset)?
            .reshape((b * t, h))?;
        let out = match &layer.mlp {
            Mlp::Dense(mlp) => {
                emit(LinearKind::GateProj, &x);
                emit(LinearKind::UpProj, &x);
                let gated = mlp.gated(&x, block.activation)?;
                emit(LinearKind::DownProj, &gated);
                mlp.down.forward(&gated)?
            }
            Mlp::Moe(mlp) => mlp.forward(&x, block.activation)?,
        }
        .reshape((b, t, h))?;
        let out = layer.normed(after, &out, eps, norm_offset)?;
        Ok((hidden + scaled(out)?)?)
    }
}

/// The layer and module of an expert Linear's weight name
/// (`model.layers.{layer}.{module}.weight` with `experts.` or
/// `shared_expert.` in the module); `None` for every other name.
fn expert_module(name: &str) -> Option<(usize, &str)> {
    let module = name.strip_suffix(".weight")?;
    let rest = module.strip_prefix("model.layers.")?;
    let (layer, _) = rest.split_once('.')?;
    let is_expert = rest.contains(".experts.") || rest.contains(".shared_expert.");
    is_expert.then_some((layer.parse().ok()?, module))
}

fn check_same_shape(name: &str, current: &Tensor, new: &Tensor) -> Result<()> {
    if current.dims() != new.dims() {
        return Err(ModelError::ShapeMismatch {
            name: name.to_string(),
            expected: current.dims().to_vec(),
            found: new.dims().to_vec(),
        });
    }
    Ok(())
}

/// Numerically stable softmax over the last dimension.
fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Additive causal mask `[t, kv_len]` for queries at the last `t` of
/// `kv_len` positions; with a sliding `window`, query `i` sees keys
/// `i - window < j <= i` (transformers' sliding-window mask).
fn causal_mask(t: usize, kv_len: usize, window: Option<usize>) -> candle_core::Result<Tensor> {
    let past = kv_len - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let last = past + i;
            let first = window.map_or(0, |w| (last + 1).saturating_sub(w));
            (0..kv_len).map(move |j| {
                if (first..=last).contains(&j) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (t, kv_len), &Device::Cpu)
}

/// Log-softmax over the last dimension (used by evaluation to score tokens).
pub fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}
