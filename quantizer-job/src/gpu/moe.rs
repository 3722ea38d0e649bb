//! The GPU path's stance on mixture-of-experts models: it has no router or
//! expert kernels yet, so every entry into it (uploading a model for
//! evaluation, generation or serving; the quantization pipeline) refuses a
//! MoE family up front, naming the feature and the way out, instead of
//! failing later on a missing `mlp.gate_proj` or running a wrong model.
//! The CPU path (`--device cpu`) runs these families.

use crate::config::LlamaConfig;

/// A mixture-of-experts model asked of the GPU path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{architecture}: mixture-of-experts MLPs (router plus experts, config.json num_experts / num_local_experts) are not implemented on the GPU path yet; run this model on the CPU path (--device cpu, QUANTOPS_DEVICE=cpu)"
)]
pub struct MoeOnGpu {
    /// `architectures[0]`.
    pub architecture: &'static str,
}

/// Refuses a MoE family; every dense family passes.
pub fn refuse_moe(cfg: &LlamaConfig) -> Result<(), MoeOnGpu> {
    match cfg.block.moe {
        Some(_) => Err(MoeOnGpu {
            architecture: cfg.architecture.hf_name(),
        }),
        None => Ok(()),
    }
}
