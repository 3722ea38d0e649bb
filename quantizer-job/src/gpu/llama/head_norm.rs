//! The RMSNorm of queries and keys on the device
//! ([`crate::family::Block::qk_norm`]), the twin of the CPU's
//! `DecoderLayer::head_norm`: per head (Qwen3) or over the whole projection
//! (OLMo 2, [`QkNormScope`]); Gemma 3's scale by `1 + weight`, an argument
//! of the shared kernel.
//!
//! The projections are row-major `[tokens, heads · head_dim]`, which is the
//! same buffer as `[tokens · heads, head_dim]`: per head, each head of each
//! token is one row; over the projection, each token is. Either way the
//! forward's `rms_norm` kernel (one block per row, any width) normalises the
//! rows with the matching weight, after the projection and before RoPE as
//! transformers does. No new kernel, hence the same rounding as the
//! hidden-state norms.

use cudarc::driver::CudaSlice;

use super::{Gpu, GpuError, LlamaGpuError, LlamaOps, WeightSource, upload};
use crate::family::{HeadNorm, QkNormScope};

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
        let norm = |n: HeadNorm| {
            upload(
                gpu,
                source,
                &n.weight_name(layer),
                &[cfg.head_norm_width(n)],
            )
        };
        Ok(Some(Self {
            q: norm(HeadNorm::Query)?,
            k: norm(HeadNorm::Key)?,
        }))
    }
}

impl LlamaOps<'_> {
    /// Normalises `q [rows, heads · head_dim]` and `k [rows, kv_heads ·
    /// head_dim]`, per head or per token as the family's scope says.
    pub(super) fn head_norms(
        &self,
        norms: &DeviceHeadNorms,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let heads = self.heads();
        let d = heads.head_dim;
        // (rows, width) of the normed rows, for q then k.
        let ((qr, qc), (kr, kc)) = match self.cfg.block.qk_norm_scope {
            QkNormScope::Head => ((rows * heads.heads, d), (rows * heads.kv_heads, d)),
            QkNormScope::Projection => ((rows, heads.q_width()), (rows, heads.kv_width())),
        };
        *q = self.rms_norm_rows(&q.as_view(), &norms.q, qr, qc)?;
        *k = self.rms_norm_rows(&k.as_view(), &norms.k, kr, kc)?;
        Ok(())
    }
}
