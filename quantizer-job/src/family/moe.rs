//! The mixture-of-experts MLP: a router (`gate`) that picks `top_k` of
//! `num_experts` SwiGLU experts per token, optionally renormalising their
//! softmax weights, plus (Qwen2-MoE) one shared expert scaled by a sigmoid
//! gate.
//!
//! Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE share the attention of the dense
//! block ([`super::Block`]) and replace its MLP by this one; the families
//! differ only in the switches here and in their checkpoint's names
//! ([`ExpertNaming`]). [`Moe::from_config`] reads them from `config.json`
//! once, refusing by key what neither forward implements, and the tensor
//! list, the CPU forward ([`crate::model`]) and the refusals of the paths
//! that do not run experts yet all read that one value.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// The routed-experts MLP of every decoder layer of a MoE family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moe {
    /// Experts per layer (`num_local_experts` / `num_experts`).
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// The `top_k` softmax weights are divided by their sum (Mixtral
    /// always; the others when `norm_topk_prob`).
    pub renormalize: bool,
    /// Width of each routed expert's SwiGLU.
    pub expert_intermediate_size: usize,
    /// Width of the shared expert (Qwen2-MoE's
    /// `shared_expert_intermediate_size`), whose output is multiplied by
    /// `sigmoid(shared_expert_gate(x))` and added to the routed experts'.
    pub shared_expert_intermediate_size: Option<usize>,
    /// How the checkpoint names the router and the experts.
    pub naming: ExpertNaming,
}

/// The checkpoint layout of a MoE MLP: one tensor per expert and Linear
/// (what transformers 5.17 writes for all four families, converting its
/// fused in-memory experts back on save).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpertNaming {
    /// `block_sparse_moe.gate`, `block_sparse_moe.experts.N.w1/w3/w2`.
    Mixtral,
    /// `mlp.gate`, `mlp.experts.N.gate_proj/up_proj/down_proj` (Qwen2-MoE,
    /// Qwen3-MoE, OLMoE), `mlp.shared_expert.*`, `mlp.shared_expert_gate`.
    Qwen,
}

/// One of an expert's three Linears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExpertLinear {
    /// The SiLU branch (`w1` / `gate_proj`).
    Gate,
    /// The linear branch (`w3` / `up_proj`).
    Up,
    /// The output projection (`w2` / `down_proj`).
    Down,
}

impl ExpertLinear {
    /// All three, in forward order.
    pub const ALL: [ExpertLinear; 3] = [ExpertLinear::Gate, ExpertLinear::Up, ExpertLinear::Down];
}

impl ExpertNaming {
    /// The MLP's module inside a decoder layer.
    pub fn module(self) -> &'static str {
        match self {
            ExpertNaming::Mixtral => "block_sparse_moe",
            ExpertNaming::Qwen => "mlp",
        }
    }

    /// The leaf name of an expert's Linear.
    pub fn leaf(self, linear: ExpertLinear) -> &'static str {
        match (self, linear) {
            (ExpertNaming::Mixtral, ExpertLinear::Gate) => "w1",
            (ExpertNaming::Mixtral, ExpertLinear::Up) => "w3",
            (ExpertNaming::Mixtral, ExpertLinear::Down) => "w2",
            (ExpertNaming::Qwen, ExpertLinear::Gate) => "gate_proj",
            (ExpertNaming::Qwen, ExpertLinear::Up) => "up_proj",
            (ExpertNaming::Qwen, ExpertLinear::Down) => "down_proj",
        }
    }
}

/// The MoE keys of `config.json` (all families'; each reads its own).
#[derive(Deserialize)]
struct RawMoe {
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    moe_intermediate_size: Option<usize>,
    intermediate_size: usize,
    shared_expert_intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    clip_qkv: Option<f64>,
}

/// Which MoE family a `config.json` declares, for [`Moe::from_config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeFamily {
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `Qwen2MoeForCausalLM` (with the shared expert).
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`.
    Qwen3Moe,
    /// `OlmoeForCausalLM`.
    Olmoe,
}

impl Moe {
    /// Reads the MoE switches of `family` from the text of its
    /// `config.json`, refusing (by key) what the forward does not implement:
    /// dense layers among the sparse ones (`decoder_sparse_step` other than
    /// 1, a non-empty `mlp_only_layers`) and OLMoE's `clip_qkv`.
    pub fn from_config(text: &str, path: &Path, family: MoeFamily) -> Result<Moe, ConfigError> {
        let raw: RawMoe = serde_json::from_str(text).map_err(|e| ConfigError::parse(path, &e))?;
        let unsupported = |key: &'static str, found: String, supported: &'static str| {
            ConfigError::unsupported(path, key, found, supported)
        };
        let required = |field: &'static str, value: Option<usize>| {
            value
                .filter(|v| *v > 0)
                .ok_or_else(|| ConfigError::InvalidField {
                    path: path.to_path_buf(),
                    field,
                    reason: "a positive integer is required for a mixture of experts".into(),
                })
        };
        if let Some(step) = raw.decoder_sparse_step
            && step != 1
        {
            return Err(unsupported(
                "decoder_sparse_step",
                step.to_string(),
                "only 1: every decoder layer a mixture of experts",
            ));
        }
        if !raw.mlp_only_layers.is_empty() {
            return Err(unsupported(
                "mlp_only_layers",
                format!("{:?}", raw.mlp_only_layers),
                "only []: every decoder layer a mixture of experts",
            ));
        }
        if let Some(clip) = raw.clip_qkv {
            return Err(unsupported(
                "clip_qkv",
                clip.to_string(),
                "only null: q/k/v are not clamped",
            ));
        }
        let num_experts = required("num_experts", raw.num_experts.or(raw.num_local_experts))?;
        let top_k = required("num_experts_per_tok", raw.num_experts_per_tok)?;
        if top_k > num_experts {
            return Err(ConfigError::InvalidField {
                path: path.to_path_buf(),
                field: "num_experts_per_tok",
                reason: format!("{top_k} exceeds the {num_experts} experts"),
            });
        }
        // The families' config defaults: Mixtral always renormalises; the
        // others' configs default norm_topk_prob to false.
        let renormalize = match family {
            MoeFamily::Mixtral => true,
            _ => raw.norm_topk_prob.unwrap_or(false),
        };
        let (naming, expert_intermediate_size, shared) = match family {
            MoeFamily::Mixtral => (ExpertNaming::Mixtral, raw.intermediate_size, None),
            MoeFamily::Olmoe => (ExpertNaming::Qwen, raw.intermediate_size, None),
            MoeFamily::Qwen3Moe => (
                ExpertNaming::Qwen,
                required("moe_intermediate_size", raw.moe_intermediate_size)?,
                None,
            ),
            MoeFamily::Qwen2Moe => (
                ExpertNaming::Qwen,
                required("moe_intermediate_size", raw.moe_intermediate_size)?,
                Some(required(
                    "shared_expert_intermediate_size",
                    raw.shared_expert_intermediate_size,
                )?),
            ),
        };
        Ok(Moe {
            num_experts,
            top_k,
            renormalize,
            expert_intermediate_size,
            shared_expert_intermediate_size: shared,
            naming,
        })
    }

    /// `model.layers.{layer}.{module}`.
    fn prefix(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.naming.module())
    }

    /// The router's module name (`…block_sparse_moe.gate` / `…mlp.gate`).
    pub fn router_module(&self, layer: usize) -> String {
        format!("{}.gate", self.prefix(layer))
    }

    /// The module name of expert `expert`'s `linear`.
    pub fn expert_module(&self, layer: usize, expert: usize, linear: ExpertLinear) -> String {
        format!(
            "{}.experts.{expert}.{}",
            self.prefix(layer),
            self.naming.leaf(linear)
        )
    }

    /// The module name of the shared expert's `linear` (Qwen2-MoE).
    pub fn shared_expert_module(&self, layer: usize, linear: ExpertLinear) -> String {
        format!(
            "{}.shared_expert.{}",
            self.prefix(layer),
            ExpertNaming::Qwen.leaf(linear)
        )
    }

    /// The shared expert's sigmoid gate's module name (Qwen2-MoE).
    pub fn shared_expert_gate_module(&self, layer: usize) -> String {
        format!("{}.shared_expert_gate", self.prefix(layer))
    }

    /// The modules that stay in full precision whatever the recipe says:
    /// the router and the shared expert's gate, as vLLM expects them
    /// (suffixes in the recipe's `ignore` syntax).
    pub fn full_precision_suffixes(&self) -> Vec<String> {
        let mut out = vec![format!("{}.gate", self.naming.module())];
        if self.shared_expert_intermediate_size.is_some() {
            out.push(format!("{}.shared_expert_gate", self.naming.module()));
        }
        out
    }

    /// Every tensor of layer `layer`'s MLP with its shape, for a residual
    /// stream of width `hidden`.
    pub fn expected_tensors(&self, layer: usize, hidden: usize) -> Vec<(String, Vec<usize>)> {
        let linear_shape = |linear: ExpertLinear, width: usize| match linear {
            ExpertLinear::Gate | ExpertLinear::Up => vec![width, hidden],
            ExpertLinear::Down => vec![hidden, width],
        };
        let mut out = vec![(
            format!("{}.weight", self.router_module(layer)),
            vec![self.num_experts, hidden],
        )];
        for expert in 0..self.num_experts {
            for linear in ExpertLinear::ALL {
                out.push((
                    format!("{}.weight", self.expert_module(layer, expert, linear)),
                    linear_shape(linear, self.expert_intermediate_size),
                ));
            }
        }
        if let Some(width) = self.shared_expert_intermediate_size {
            for linear in ExpertLinear::ALL {
                out.push((
                    format!("{}.weight", self.shared_expert_module(layer, linear)),
                    linear_shape(linear, width),
                ));
            }
            out.push((
                format!("{}.weight", self.shared_expert_gate_module(layer)),
                vec![1, hidden],
            ));
        }
        out
    }

    /// Picks each token's experts from its router probabilities (a row of
    /// softmax weights): the `top_k` largest, first index first among
    /// equals, with their weights renormalised when the family says so.
    pub fn route(&self, probs: &[f32]) -> Vec<(usize, f32)> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b)));
        let mut picked: Vec<(usize, f32)> = order
            .into_iter()
            .take(self.top_k)
            .map(|e| (e, probs[e]))
            .collect();
        if self.renormalize {
            let sum: f32 = picked.iter().map(|(_, w)| w).sum();
            if sum > 0.0 {
                for (_, w) in &mut picked {
                    *w /= sum;
                }
            }
        }
        picked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> String {
        let mut base = serde_json::json!({
            "intermediate_size": 128,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        base.to_string()
    }

    #[test]
    fn routing_takes_top_k_and_renormalises_only_when_asked() {
        let text = config(serde_json::json!({}));
        let path = Path::new("config.json");
        let mixtral = Moe::from_config(&text, path, MoeFamily::Mixtral).expect("mixtral");
        assert!(mixtral.renormalize);
        assert_eq!(mixtral.expert_intermediate_size, 128);
        let picked = mixtral.route(&[0.1, 0.4, 0.2, 0.3]);
        assert_eq!(picked.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 3]);
        assert!((picked[0].1 - 0.4 / 0.7).abs() < 1e-6);
        let qwen = Moe::from_config(&text, path, MoeFamily::Qwen3Moe).expect("qwen3");
        assert!(!qwen.renormalize);
        assert_eq!(qwen.expert_intermediate_size, 32);
        assert_eq!(qwen.route(&[0.1, 0.4, 0.2, 0.3])[1], (3, 0.3));
    }

    #[test]
    fn unimplemented_keys_are_refused_by_name() {
        let path = Path::new("config.json");
        for (extra, key) in [
            (
                serde_json::json!({"decoder_sparse_step": 2}),
                "decoder_sparse_step",
            ),
            (
                serde_json::json!({"mlp_only_layers": [0]}),
                "mlp_only_layers",
            ),
            (serde_json::json!({"clip_qkv": 8.0}), "clip_qkv"),
        ] {
            let err =
                Moe::from_config(&config(extra), path, MoeFamily::Qwen2Moe).expect_err("refused");
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = Moe::from_config(&config(serde_json::json!({})), path, MoeFamily::Qwen2Moe)
            .expect_err("no shared expert width");
        assert!(
            err.to_string().contains("shared_expert_intermediate_size"),
            "{err}"
        );
    }

    #[test]
    fn names_follow_each_checkpoint() {
        let text = config(serde_json::json!({"shared_expert_intermediate_size": 64}));
        let path = Path::new("config.json");
        let m = Moe::from_config(&text, path, MoeFamily::Mixtral).expect("mixtral");
        assert_eq!(
            m.expert_module(1, 3, ExpertLinear::Down),
            "model.layers.1.block_sparse_moe.experts.3.w2"
        );
        assert_eq!(m.router_module(0), "model.layers.0.block_sparse_moe.gate");
        let q = Moe::from_config(&text, path, MoeFamily::Qwen2Moe).expect("qwen2");
        let names: Vec<String> = q.expected_tensors(0, 8).into_iter().map(|t| t.0).collect();
        assert!(names.contains(&"model.layers.0.mlp.shared_expert_gate.weight".to_string()));
        assert!(names.contains(&"model.layers.0.mlp.experts.3.up_proj.weight".to_string()));
        assert_eq!(
            q.full_precision_suffixes(),
            ["mlp.gate", "mlp.shared_expert_gate"]
        );
    }
}
