//! The Linears of a mixture-of-experts MLP as quantization sees them: each
//! routed expert's and the shared expert's SwiGLU Linears are quantized
//! under the checkpoint's own per-expert names (what transformers and vLLM
//! load), while the router and the shared expert's gate stay in full
//! precision (vLLM builds them unquantized) and are named in the
//! artifact's `quantization_config.ignore`.

use super::moe::{ExpertLinear, Moe};

/// Which SwiGLU of a MoE MLP a Linear belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertSlot {
    /// Routed expert `N`.
    Routed(usize),
    /// Qwen2-MoE's shared expert.
    Shared,
}

impl Moe {
    /// The module name of `linear` in `slot` of layer `layer`.
    pub fn slot_module(&self, layer: usize, slot: ExpertSlot, linear: ExpertLinear) -> String {
        match slot {
            ExpertSlot::Routed(expert) => self.expert_module(layer, expert, linear),
            ExpertSlot::Shared => self.shared_expert_module(layer, linear),
        }
    }

    /// Every SwiGLU of a layer: the routed experts, then the shared one.
    pub fn slots(&self) -> Vec<ExpertSlot> {
        let mut slots: Vec<ExpertSlot> = (0..self.num_experts).map(ExpertSlot::Routed).collect();
        if self.shared_expert_intermediate_size.is_some() {
            slots.push(ExpertSlot::Shared);
        }
        slots
    }

    /// Reads a module name of layer `layer`'s MLP back into its slot and
    /// Linear; `None` for the router, the shared gate or any other name.
    pub fn parse_module(&self, layer: usize, module: &str) -> Option<(ExpertSlot, ExpertLinear)> {
        self.slots().into_iter().find_map(|slot| {
            ExpertLinear::ALL
                .into_iter()
                .find(|l| self.slot_module(layer, slot, *l) == module)
                .map(|l| (slot, l))
        })
    }

    /// The modules of layer `layer` that stay in full precision: the router
    /// and (Qwen2-MoE) the shared expert's gate, as full module names, which
    /// both vLLM's exact-name match and the worker's suffix match accept.
    pub fn full_precision_modules(&self, layer: usize) -> Vec<String> {
        let mut out = vec![self.router_module(layer)];
        if self.shared_expert_intermediate_size.is_some() {
            out.push(self.shared_expert_gate_module(layer));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::moe::ExpertNaming;

    fn qwen2_moe() -> Moe {
        Moe {
            num_experts: 4,
            top_k: 2,
            renormalize: false,
            expert_intermediate_size: 32,
            shared_expert_intermediate_size: Some(64),
            naming: ExpertNaming::Qwen,
        }
    }

    #[test]
    fn module_names_parse_back_and_the_gates_are_no_expert_linears() {
        let moe = qwen2_moe();
        for slot in moe.slots() {
            for linear in ExpertLinear::ALL {
                let name = moe.slot_module(1, slot, linear);
                assert_eq!(moe.parse_module(1, &name), Some((slot, linear)), "{name}");
                assert_eq!(moe.parse_module(0, &name), None, "{name} is layer 1's");
            }
        }
        for gate in moe.full_precision_modules(1) {
            assert_eq!(moe.parse_module(1, &gate), None, "{gate}");
        }
        assert_eq!(
            moe.full_precision_modules(1),
            [
                "model.layers.1.mlp.gate",
                "model.layers.1.mlp.shared_expert_gate"
            ]
        );
    }
}
