//! The CPU forward of a mixture-of-experts MLP ([`crate::family::moe`]):
//! softmax router, top-k routing, each expert run on the tokens routed to
//! it and scattered back weighted, as transformers' eager experts loop does,
//! plus Qwen2-MoE's sigmoid-gated shared expert. Every expert applies the
//! family's gate activation ([`crate::family::Block::activation`]; SiLU for
//! all four MoE families), as the dense MLP does.

use candle_core::{Device, Tensor};

use super::block_ops::gated;
use super::linear::Linear;
use super::{Result, softmax_last};
use crate::family::Activation;
use crate::family::moe::{ExpertLinear, Moe};
use crate::family::moe_linears::ExpertSlot;

/// A gated MLP, `down(act(gate(x)) · up(x))` (SwiGLU or GeGLU, by
/// [`Activation`]): one expert, the shared expert, or a dense block's MLP.
#[derive(Debug, Clone)]
pub(crate) struct GatedMlp {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl GatedMlp {
    /// The input of the down projection for `[n, h]` activations.
    pub(crate) fn gated(&self, x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
        gated(&self.gate.forward(x)?, &self.up.forward(x)?, activation)
    }

    /// The MLP's output for `[n, h]` activations.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        activation: Activation,
    ) -> candle_core::Result<Tensor> {
        self.down.forward(&self.gated(x, activation)?)
    }

    fn linear(&self, linear: ExpertLinear) -> &Linear {
        match linear {
            ExpertLinear::Gate => &self.gate,
            ExpertLinear::Up => &self.up,
            ExpertLinear::Down => &self.down,
        }
    }

    fn linear_mut(&mut self, linear: ExpertLinear) -> &mut Linear {
        match linear {
            ExpertLinear::Gate => &mut self.gate,
            ExpertLinear::Up => &mut self.up,
            ExpertLinear::Down => &mut self.down,
        }
    }

    /// Loads the three Linears (no biases) through `module`'s names.
    fn load(
        take: &mut dyn FnMut(&str) -> Result<Tensor>,
        module: impl Fn(ExpertLinear) -> String,
    ) -> Result<Self> {
        let mut linear = |l| {
            Ok::<_, super::ModelError>(Linear {
                weight: take(&format!("{}.weight", module(l)))?,
                bias: None,
            })
        };
        Ok(GatedMlp {
            gate: linear(ExpertLinear::Gate)?,
            up: linear(ExpertLinear::Up)?,
            down: linear(ExpertLinear::Down)?,
        })
    }
}

/// One decoder layer's router, experts and shared expert, in f32.
#[derive(Debug, Clone)]
pub(crate) struct MoeMlp {
    spec: Moe,
    /// `[num_experts, h]`.
    router: Tensor,
    experts: Vec<GatedMlp>,
    /// The shared expert and its gate `[1, h]` (Qwen2-MoE).
    shared: Option<(GatedMlp, Tensor)>,
}

impl MoeMlp {
    /// Takes layer `layer`'s MLP tensors through `take` (which checks shapes).
    pub(crate) fn load(
        spec: Moe,
        layer: usize,
        take: &mut dyn FnMut(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        let router = take(&format!("{}.weight", spec.router_module(layer)))?;
        let experts = (0..spec.num_experts)
            .map(|e| GatedMlp::load(take, |l| spec.expert_module(layer, e, l)))
            .collect::<Result<Vec<_>>>()?;
        let shared = match spec.shared_expert_intermediate_size {
            Some(_) => {
                let mlp = GatedMlp::load(take, |l| spec.shared_expert_module(layer, l))?;
                let gate = take(&format!("{}.weight", spec.shared_expert_gate_module(layer)))?;
                Some((mlp, gate))
            }
            None => None,
        };
        Ok(MoeMlp {
            spec,
            router,
            experts,
            shared,
        })
    }

    /// The expert Linear named `module` (of layer `layer`), for the
    /// quantization driver; `None` for the router, the shared gate and
    /// names of other layers, which stay as loaded.
    pub(crate) fn linear(&self, layer: usize, module: &str) -> Option<&Linear> {
        let (slot, linear) = self.spec.parse_module(layer, module)?;
        let mlp = match slot {
            ExpertSlot::Routed(expert) => self.experts.get(expert)?,
            ExpertSlot::Shared => &self.shared.as_ref()?.0,
        };
        Some(mlp.linear(linear))
    }

    /// [`Self::linear`], to replace its weight.
    pub(crate) fn linear_mut(&mut self, layer: usize, module: &str) -> Option<&mut Linear> {
        let (slot, linear) = self.spec.parse_module(layer, module)?;
        let mlp = match slot {
            ExpertSlot::Routed(expert) => self.experts.get_mut(expert)?,
            ExpertSlot::Shared => &mut self.shared.as_mut()?.0,
        };
        Some(mlp.linear_mut(linear))
    }

    /// Which experts each of the `[n, h]` tokens goes to, with its weights:
    /// per expert, the token rows and their routing weights.
    pub(crate) fn routing(&self, x: &Tensor) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
        let probs = softmax_last(&x.matmul(&self.router.t()?)?)?.to_vec2::<f32>()?;
        let mut routed = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (token, row) in probs.iter().enumerate() {
            for (expert, weight) in self.spec.route(row) {
                if let Some((tokens, weights)) = routed.get_mut(expert) {
                    tokens.push(token as u32);
                    weights.push(weight);
                }
            }
        }
        Ok(routed)
    }

    /// The MLP's output for `[n, h]` activations, every expert gated by
    /// `activation`.
    pub(crate) fn forward(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let mut out = x.zeros_like()?;
        for (expert, (tokens, weights)) in self.experts.iter().zip(self.routing(x)?) {
            if tokens.is_empty() {
                continue;
            }
            let m = tokens.len();
            let index = Tensor::from_vec(tokens, m, &Device::Cpu)?;
            let weights = Tensor::from_vec(weights, (m, 1), &Device::Cpu)?;
            let y = expert
                .forward(&x.index_select(&index, 0)?, activation)?
                .broadcast_mul(&weights)?;
            out = out.index_add(&index, &y, 0)?;
        }
        if let Some((shared, gate)) = &self.shared {
            let z = x.matmul(&gate.t()?)?;
            let sigmoid = (z.neg()?.exp()? + 1.0)?.recip()?;
            out = (out + shared.forward(x, activation)?.broadcast_mul(&sigmoid)?)?;
        }
        Ok(out)
    }
}
