//! Where a decoder block's RMSNorms sit on the device
//! ([`crate::family::NormPlacement`]), the twin of the CPU forward's
//! `layer_forward_at`: before each sublayer (Llama and most families), or
//! after it (OLMo 2: the attention and the MLP read the residual stream
//! itself, their outputs are normed before the residual add), or both
//! (Gemma's sandwich). [`crate::family::NormPlacement::attention`] and
//! [`crate::family::NormPlacement::mlp`] say which, for both backends. The same
//! `rms_norm` kernel either way, so the rounding is the hidden-state norms'.

use cudarc::driver::CudaSlice;

use super::{DeviceLayer, GpuError, LlamaOps};
use crate::gpu::error::DriverContext;

/// The norms of one sublayer: before it (read by its Linears) or after it.
#[derive(Clone, Copy)]
pub(super) struct SublayerNorms<'l> {
    pub(super) before: Option<&'l CudaSlice<f32>>,
    pub(super) after: Option<&'l CudaSlice<f32>>,
}

impl DeviceLayer {
    /// The weights of a sublayer's norms, as the family's placement names them.
    fn sublayer(&self, norms: crate::family::SublayerNorms) -> SublayerNorms<'_> {
        SublayerNorms {
            before: norms.before.and_then(|n| self.layer_norm(n)),
            after: norms.after.and_then(|n| self.layer_norm(n)),
        }
    }

    /// The attention's norms.
    pub(super) fn attention_norms(&self) -> SublayerNorms<'_> {
        self.sublayer(self.placement.attention())
    }

    /// The MLP's norms.
    pub(super) fn mlp_norms(&self) -> SublayerNorms<'_> {
        self.sublayer(self.placement.mlp())
    }
}

impl LlamaOps<'_> {
    /// What a sublayer's Linears read: `norm(x)` with the norm before it,
    /// else a copy of the residual stream `x [rows, hidden]`.
    pub(super) fn sublayer_input(
        &self,
        x: &CudaSlice<f32>,
        norms: SublayerNorms<'_>,
        rows: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        match norms.before {
            Some(w) => self.rms_norm(&x.as_view(), w, rows),
            None => self
                .gpu
                .stream()
                .clone_dtod(x)
                .during("copying the residual stream"),
        }
    }

    /// What a sublayer adds to the residual: its output, normed when the
    /// norm follows it.
    pub(super) fn sublayer_output(
        &self,
        y: CudaSlice<f32>,
        norms: SublayerNorms<'_>,
        rows: usize,
    ) -> Result<CudaSlice<f32>, GpuError> {
        match norms.after {
            Some(w) => self.rms_norm(&y.as_view(), w, rows),
            None => Ok(y),
        }
    }
}
