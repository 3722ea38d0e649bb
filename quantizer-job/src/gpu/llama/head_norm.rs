//! Qwen3's per-head RMSNorm of queries and keys on the device
//! ([`crate::family::Block::qk_norm`]), the twin of the CPU's
//! `DecoderLayer::head_norm`.
//!
//! The projections are row-major `[tokens, heads · head_dim]`, which is the
//! same buffer as `[tokens · heads, head_dim]`: each head of each token is one
//! row, so the forward's `rms_norm` kernel (one block per row, any width)
//! normalises them with the `[head_dim]` weight, after the projection and
//! before RoPE as transformers does. No new kernel, hence the same rounding
//! as the hidden-state norms.

use cudarc::driver::CudaSlice;

use super::{Gpu, GpuError, LlamaGpuError, LlamaOps, WeightSource, upload};
use crate::family::HeadNorm;

/// One layer's `q_norm` and `k_norm` weights `[head_dim]` on the device.
pub(super) struct DeviceHeadNorms {
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
}

impl DeviceHeadNorms {
    /// Uploads layer `layer`'s norms when the family has them, else `None`.
    pub(super) fn load(
        gpu: &Gpu,
        source: &dyn WeightSource,
        layer: usize,
    ) -> Result<Option<Self>, LlamaGpuError> {
        let cfg = source.config();
        if !cfg.block.qk_norm {
            return Ok(None);
        }
        let norm = |n: HeadNorm| upload(gpu, source, &n.weight_name(layer), &[cfg.head_dim]);
        Ok(Some(Self {
            q: norm(HeadNorm::Query)?,
            k: norm(HeadNorm::Key)?,
        }))
    }
}

impl LlamaOps<'_> {
    /// Normalises every head of `q [rows, heads · head_dim]` and `k [rows,
    /// kv_heads · head_dim]`.
    pub(super) fn head_norms(
        &self,
        norms: &DeviceHeadNorms,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let heads = self.heads();
        let d = heads.head_dim;
        *q = self.rms_norm_rows(&q.as_view(), &norms.q, rows * heads.heads, d)?;
        *k = self.rms_norm_rows(&k.as_view(), &norms.k, rows * heads.kv_heads, d)?;
        Ok(())
    }
}
