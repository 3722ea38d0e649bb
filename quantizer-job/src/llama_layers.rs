//! The Llama family's side of sequential quantization: which Linears share
//! an input, which op absorbs AWQ's scales, and the conversions between the
//! model's candle tensors and the algorithms' plain matrices.

use crate::config::LlamaConfig;
use crate::family::moe::ExpertLinear;
use crate::family::{LayerNorm, NormPlacement};
use crate::model::{LinearId, LinearKind, LlamaModel, NormId, NormKind};
use crate::quant::{Matrix, ScaleSink, fold_into_linear, fold_into_norm};
use crate::sequential::{CaptureSink, InputGroup, LayeredModel};
use anyhow::Context;
use candle_core::{Device, Tensor};
use quantops_api::Method;

/// A Llama model seen layer by layer.
pub struct LlamaLayers<'a> {
    pub model: &'a mut LlamaModel,
}

fn module(layer: usize, kind: LinearKind) -> String {
    LinearId { layer, kind }.module_name()
}

/// Converts a 2-D tensor to a matrix (f32, row-major).
pub fn to_matrix(t: &Tensor) -> anyhow::Result<Matrix> {
    let (rows, cols) = t.dims2()?;
    let data = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    Ok(Matrix::new(rows, cols, data)?)
}

/// Converts a matrix to a 2-D CPU tensor.
pub fn to_tensor(m: &Matrix) -> anyhow::Result<Tensor> {
    Ok(Tensor::from_slice(&m.data, (m.rows, m.cols), &Device::Cpu)?)
}

/// Why a quantization method cannot run exactly on a family's block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FamilyMethodError {
    /// AWQ needs a norm before q/k/v and gate/up to fold its scales into.
    #[error(
        "spec.quantization.method: awq is not supported for {architecture}: AWQ folds the scales of q_proj/k_proj/v_proj and gate_proj/up_proj into the RMSNorm before them, and {architecture} has none there (its norms follow the attention and the MLP), so the folded model would not be the quantized one; supported for {architecture}: gptq, rtn, int8, fp8"
    )]
    AwqWithoutInputNorms {
        /// `architectures[0]`.
        architecture: &'static str,
    },
    /// The calibrated methods would need each expert's statistics from the
    /// tokens routed to it, which the driver does not gather yet: refused
    /// rather than calibrating the experts on nothing.
    #[error(
        "spec.quantization.method: {method} is not supported for {architecture}: it is a mixture of experts (config.json num_experts / num_local_experts), and per-expert calibration (each expert's GPTQ Hessian or AWQ statistics from the tokens routed to it) is not implemented yet; the data-free methods quantize every expert: supported for {architecture}: rtn, int8, fp8"
    )]
    MixtureOfExperts {
        /// `architectures[0]`.
        architecture: &'static str,
        /// The recipe's method (`gptq`, `awq`).
        method: &'static str,
    },
    /// AWQ's folds divide a norm's weight, but a `1 + weight` norm (Gemma)
    /// would need the stored weight rewritten as `(1 + w) / s - 1`, which
    /// neither fold implements.
    #[error(
        "spec.quantization.method: awq is not supported for {architecture}: its RMSNorms scale by 1 + weight, and AWQ's scale folds into input_layernorm and pre_feedforward_layernorm are implemented for plain weights only, so the folded model would not be the quantized one; supported for {architecture}: gptq, rtn, int8, fp8"
    )]
    AwqIntoOffsetNorms {
        /// `architectures[0]`.
        architecture: &'static str,
    },
}

/// Refuses, before any work, a method the family's block cannot run
/// exactly: AWQ with the norms after the sublayers (OLMo 2,
/// [`NormPlacement::Post`]), where its input scales have nowhere to go, and
/// AWQ into Gemma's `1 + weight` norms
/// ([`crate::family::Block::norm_unit_offset`]).
/// Every other method needs no fold and runs on every dense family. A
/// mixture of experts takes the data-free methods only (RTN, INT8, FP8
/// quantize each expert from its weights alone).
pub fn check_method(cfg: &LlamaConfig, method: Method) -> Result<(), FamilyMethodError> {
    let architecture = cfg.architecture.hf_name();
    if cfg.block.moe.is_some() && method.needs_calibration() {
        return Err(FamilyMethodError::MixtureOfExperts {
            architecture,
            method: method.as_str(),
        });
    }
    if method != Method::Awq {
        return Ok(());
    }
    if cfg.block.norms == NormPlacement::Post {
        return Err(FamilyMethodError::AwqWithoutInputNorms { architecture });
    }
    if cfg.block.norm_unit_offset {
        return Err(FamilyMethodError::AwqIntoOffsetNorms { architecture });
    }
    Ok(())
}

/// The input groups of decoder layer `layer` of a Llama-family model, in
/// AWQ's folding order: a group that folds into a Linear comes before the
/// group that quantizes that Linear (`o` before `q,k,v`, `down` before
/// `gate,up`), so no fold ever touches quantized weights. `o_proj` folds
/// into `v_proj` only without grouped-query attention. The CPU driver (through
/// [`LayeredModel::input_groups`]) and the GPU pipeline both take them from here.
///
/// With Qwen3's per-head q/k norms ([`crate::family::Block::qk_norm`]) these
/// folds stay exact: `input_layernorm` absorbs the scales of q/k/v's *input*
/// channels, so the projections' outputs, and what the norms see, do not
/// change. No group may fold into `q_proj` or `k_proj` (scaling their output
/// channels): the norm after them would undo a per-channel scale only where
/// it is uniform over a head, so such a fold would change the model. None
/// does (the only Linear sinks are `v_proj` and `up_proj`), and
/// `qk_norm_layers_never_fold_into_q_or_k` keeps it that way.
///
/// With the norms after the sublayers (OLMo 2) q/k/v and gate/up have no
/// norm before them: their groups get no fold (AWQ is refused for such a
/// family by [`check_method`]; the groups still tell GPTQ which Linears
/// share a Hessian).
///
/// A mixture of experts replaces the MLP's groups by each expert's
/// (routed, then shared): `gate,up` and `down`, without folds (only the
/// data-free methods run on experts, see [`check_method`]). The router and
/// the shared expert's gate are in no group, so they stay in full precision.
pub fn llama_input_groups(cfg: &LlamaConfig, layer: usize) -> Vec<InputGroup> {
    let v_out = cfg.num_key_value_heads * cfg.head_dim;
    let o_in = cfg.num_attention_heads * cfg.head_dim;
    let m = |kind| module(layer, kind);
    let o_fold = (v_out == o_in).then(|| ScaleSink::Linear(m(LinearKind::VProj)));
    // Only a plain norm right before the Linears can absorb their input
    // scales: Gemma's (`1 + weight`) cannot, and neither can a missing one
    // (OLMo 2). The folds (`NormId`) reach `input_layernorm` and
    // `post_attention_layernorm` only, so a sandwich's
    // `pre_feedforward_layernorm` gets no fold either.
    let foldable = !cfg.block.norm_unit_offset;
    let norm = |before: Option<LayerNorm>| {
        before
            .filter(|n| foldable && matches!(n, LayerNorm::Input | LayerNorm::PostAttention))
            .map(|n| ScaleSink::Norm(format!("model.layers.{layer}.{}", n.leaf())))
    };
    let placement = cfg.block.norms;
    let attention = [
        InputGroup {
            linears: vec![m(LinearKind::OProj)],
            fold: o_fold,
        },
        InputGroup {
            linears: vec![
                m(LinearKind::QProj),
                m(LinearKind::KProj),
                m(LinearKind::VProj),
            ],
            fold: norm(placement.attention().before),
        },
    ];
    let Some(moe) = &cfg.block.moe else {
        return attention
            .into_iter()
            .chain(dense_mlp_groups(layer, norm(placement.mlp().before)))
            .collect();
    };
    let expert = |slot, linears: &[ExpertLinear]| InputGroup {
        linears: linears
            .iter()
            .map(|l| moe.slot_module(layer, slot, *l))
            .collect(),
        fold: None,
    };
    let experts = moe.slots().into_iter().flat_map(|slot| {
        [
            expert(slot, &[ExpertLinear::Gate, ExpertLinear::Up]),
            expert(slot, &[ExpertLinear::Down]),
        ]
    });
    attention.into_iter().chain(experts).collect()
}

/// A dense MLP's groups: `down` (folding into `up`), then `gate,up`
/// (folding into `gate_up_fold`, the norm before the MLP when it can absorb
/// the scales).
fn dense_mlp_groups(layer: usize, gate_up_fold: Option<ScaleSink>) -> [InputGroup; 2] {
    let m = |kind| module(layer, kind);
    [
        InputGroup {
            linears: vec![m(LinearKind::DownProj)],
            fold: Some(ScaleSink::Linear(m(LinearKind::UpProj))),
        },
        InputGroup {
            linears: vec![m(LinearKind::GateProj), m(LinearKind::UpProj)],
            fold: gate_up_fold,
        },
    ]
}

impl LayeredModel for LlamaLayers<'_> {
    type Hidden = Tensor;

    fn num_layers(&self) -> usize {
        self.model.num_layers()
    }

    fn input_groups(&self, layer: usize) -> Vec<InputGroup> {
        llama_input_groups(self.model.config(), layer)
    }

    fn outer_linears(&self) -> Vec<String> {
        vec!["lm_head".to_string()]
    }

    fn weight(&self, module: &str) -> anyhow::Result<Matrix> {
        to_matrix(self.model.linear_weight(&format!("{module}.weight"))?)
    }

    fn set_weight(&mut self, module: &str, weight: &Matrix) -> anyhow::Result<()> {
        self.model
            .set_linear_weight(&format!("{module}.weight"), to_tensor(weight)?)?;
        Ok(())
    }

    fn fold_scales(&mut self, target: &ScaleSink, scales: &[f32]) -> anyhow::Result<()> {
        match target {
            ScaleSink::Linear(module) => {
                let mut w = self.weight(module)?;
                fold_into_linear(&mut w, scales)?;
                self.set_weight(module, &w)
            }
            ScaleSink::Norm(name) => {
                let NormId { layer, kind } = NormId::parse(name)
                    .with_context(|| format!("{name} is not a decoder layer's RMSNorm"))?;
                let post = kind == NormKind::PostAttention;
                let current = if post {
                    self.model.post_attention_layernorm(layer)?
                } else {
                    self.model.input_layernorm(layer)?
                };
                let mut gamma = current
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?;
                fold_into_norm(&mut gamma, scales)?;
                let t = Tensor::from_slice(&gamma, gamma.len(), &Device::Cpu)?;
                if post {
                    self.model.set_post_attention_layernorm(layer, t)?;
                } else {
                    self.model.set_input_layernorm(layer, t)?;
                }
                Ok(())
            }
        }
    }

    fn forward_layer(
        &self,
        layer: usize,
        hidden: &Tensor,
        capture: Option<CaptureSink<'_>>,
    ) -> anyhow::Result<Tensor> {
        let Some(sink) = capture else {
            return Ok(self.model.layer_forward(layer, hidden, None)?);
        };
        // Linears sharing an input see the same activations: hand over the
        // first of each group only.
        let mut failure: Option<anyhow::Error> = None;
        let mut forward = |id: LinearId, x: &Tensor| {
            if failure.is_some()
                || !matches!(
                    id.kind,
                    LinearKind::QProj
                        | LinearKind::OProj
                        | LinearKind::GateProj
                        | LinearKind::DownProj
                )
            {
                return;
            }
            let result = to_matrix(x).and_then(|m| sink(&module(id.layer, id.kind), m));
            if let Err(error) = result {
                failure = Some(error);
            }
        };
        let out = self
            .model
            .layer_forward(layer, hidden, Some(&mut forward))?;
        match failure {
            Some(error) => Err(error),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(arch: &str, kv_heads: usize) -> LlamaConfig {
        let text = serde_json::json!({
            "architectures": [arch],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": kv_heads,
            "head_dim": 16,
            "vocab_size": 256,
        });
        LlamaConfig::from_json(&text.to_string(), "config.json".as_ref()).expect("config")
    }

    #[test]
    fn qk_norm_layers_never_fold_into_q_or_k() {
        // With and without grouped-query attention (without it o_proj folds
        // into v_proj, which has no norm after it).
        for kv_heads in [2, 4] {
            let cfg = config("Qwen3ForCausalLM", kv_heads);
            assert!(cfg.block.qk_norm);
            for layer in 0..cfg.num_hidden_layers {
                for group in llama_input_groups(&cfg, layer) {
                    if let Some(ScaleSink::Linear(module)) = &group.fold {
                        assert!(
                            !module.ends_with("q_proj") && !module.ends_with("k_proj"),
                            "{module} feeds a per-head norm"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn awq_is_refused_for_post_norm_families_and_nothing_folds_into_their_norms() {
        let cfg = config("Olmo2ForCausalLM", 2);
        let err = check_method(&cfg, Method::Awq).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("Olmo2ForCausalLM") && text.contains("awq"),
            "{text}"
        );
        for method in [Method::Gptq, Method::Rtn, Method::Int8, Method::Fp8] {
            assert_eq!(check_method(&cfg, method), Ok(()), "{method:?}");
        }
        for group in llama_input_groups(&cfg, 0) {
            assert!(
                !matches!(group.fold, Some(ScaleSink::Norm(_))),
                "{:?} folds into a norm",
                group.linears
            );
        }
        // The pre-norm families keep AWQ and their norm folds.
        let llama = config("LlamaForCausalLM", 2);
        assert_eq!(check_method(&llama, Method::Awq), Ok(()));
        assert!(
            llama_input_groups(&llama, 0)
                .iter()
                .any(|g| matches!(g.fold, Some(ScaleSink::Norm(_))))
        );
    }

    #[test]
    fn awq_is_refused_for_one_plus_weight_norms_and_nothing_folds_into_them() {
        for arch in ["Gemma2ForCausalLM", "Gemma3ForCausalLM"] {
            let cfg = config(arch, 2);
            let err = check_method(&cfg, Method::Awq).expect_err("refused");
            let text = err.to_string();
            assert!(text.contains(arch) && text.contains("1 + weight"), "{text}");
            assert_eq!(check_method(&cfg, Method::Gptq), Ok(()));
            for group in llama_input_groups(&cfg, 1) {
                assert!(
                    !matches!(group.fold, Some(ScaleSink::Norm(_))),
                    "{:?} folds into a norm",
                    group.linears
                );
            }
        }
    }
}
