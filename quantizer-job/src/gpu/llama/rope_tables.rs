//! The RoPE tables on the device: the host's [`crate::rope::tables`] for
//! each frequency set of the config's scaling (longrope has a short and a
//! long one), uploaded once per model, and the choice of set by the length
//! a forward runs to ([`crate::rope::RopeScaling::set_for`]), as the CPU's
//! `model::rope` chooses.

use cudarc::driver::CudaSlice;

use super::{Gpu, GpuError, shape_error};
use crate::config::LlamaConfig;
use crate::gpu::error::DriverContext;
use crate::rope::{FrequencySet, RopeScaling};

/// cos and sin `[max_position_embeddings, head_dim / 2]` per frequency set.
pub(super) struct DeviceRope {
    scaling: RopeScaling,
    sets: Vec<(FrequencySet, CudaSlice<f32>, CudaSlice<f32>)>,
}

impl DeviceRope {
    /// The tables of base `theta` and `scaling` (the global RoPE, or Gemma
    /// 3's local one, [`LlamaConfig::local_rope`]).
    pub(super) fn upload(
        gpu: &Gpu,
        cfg: &LlamaConfig,
        theta: f64,
        scaling: &RopeScaling,
    ) -> Result<Self, GpuError> {
        let stream = gpu.stream();
        let sets = scaling
            .sets()
            .iter()
            .map(|&set| {
                let (cos, sin) = crate::rope::tables(
                    scaling,
                    cfg.head_dim,
                    theta,
                    cfg.max_position_embeddings,
                    set,
                );
                Ok((
                    set,
                    stream
                        .clone_htod(&cos)
                        .during("uploading the RoPE cosines")?,
                    stream.clone_htod(&sin).during("uploading the RoPE sines")?,
                ))
            })
            .collect::<Result<_, GpuError>>()?;
        Ok(Self {
            scaling: scaling.clone(),
            sets,
        })
    }

    /// The (cos, sin) tables of a forward running to `len` positions.
    pub(super) fn for_len(
        &self,
        len: usize,
    ) -> Result<(&CudaSlice<f32>, &CudaSlice<f32>), GpuError> {
        let want = self.scaling.set_for(len);
        self.sets
            .iter()
            .find(|(set, _, _)| *set == want)
            .map(|(_, cos, sin)| (cos, sin))
            .ok_or_else(|| shape_error("RoPE tables", format!("{want:?} frequencies"), "none"))
    }
}
