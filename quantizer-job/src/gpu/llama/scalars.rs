//! Granite's scalar multipliers on the device ([`crate::family::Scalars`]),
//! the twins of the CPU forward's `affine` and `broadcast_div`: embeddings
//! and each sublayer's output multiplied, logits divided, each element
//! rounded once (`__fmul_rn`, `__fdiv_rn`) as candle and PyTorch round it.
//! The attention multiplier needs no kernel: it is the `alpha` of the score
//! GEMM, as `1 / sqrt(head_dim)` is for the other families.
//!
//! The kernels are their own small module, compiled only for a model whose
//! scalars are not neutral, so the other families pay nothing for them.

use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};

use super::{Gpu, GpuError, LlamaOps, per_element};
use crate::gpu::error::DriverContext;

const SCALAR_KERNELS: &str = r#"
extern "C" __global__ void scale_inplace(float* __restrict__ x, float m, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = __fmul_rn(x[i], m);
    }
}

extern "C" __global__ void divide_inplace(float* __restrict__ x, float d, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = __fdiv_rn(x[i], d);
    }
}
"#;

/// The compiled multiply and divide kernels.
pub(super) struct ScalarKernels {
    scale: CudaFunction,
    divide: CudaFunction,
}

impl ScalarKernels {
    /// Compiles the kernels when `cfg`'s family has a non-neutral scalar.
    pub(super) fn load(
        gpu: &Gpu,
        cfg: &crate::config::LlamaConfig,
    ) -> Result<Option<Self>, GpuError> {
        let s = cfg.block.scalars;
        if s.embedding().is_none() && s.residual().is_none() && s.logits_divisor().is_none() {
            return Ok(None);
        }
        let module = gpu.load_module("llama_scalars", SCALAR_KERNELS)?;
        let load = |name: &str| {
            module
                .load_function(name)
                .during(format!("loading kernel {name}"))
        };
        Ok(Some(Self {
            scale: load("scale_inplace")?,
            divide: load("divide_inplace")?,
        }))
    }
}

impl LlamaOps<'_> {
    fn scalar_launch(
        &self,
        x: &mut CudaSlice<f32>,
        value: Option<f32>,
        pick: fn(&ScalarKernels) -> &CudaFunction,
        what: &str,
    ) -> Result<(), GpuError> {
        let (Some(value), Some(kernels)) = (value, self.scalars.as_ref()) else {
            return Ok(());
        };
        let n = x.len() as i64;
        let launch_cfg = per_element(x.len());
        let mut launch = self.gpu.stream().launch_builder(pick(kernels));
        launch.arg(x).arg(&value).arg(&n);
        // SAFETY: the kernel touches x[0..n] only, and x holds n values.
        unsafe { launch.launch(launch_cfg) }.during(format!("launching {what}"))?;
        Ok(())
    }

    /// Multiplies embeddings by `embedding_multiplier`.
    pub(crate) fn scale_embeddings(&self, x: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let m = self.cfg.block.scalars.embedding();
        self.scalar_launch(x, m, |k| &k.scale, "scale_inplace (embeddings)")
    }

    /// Multiplies a sublayer's output by `residual_multiplier`.
    pub(super) fn scale_residual(&self, x: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let m = self.cfg.block.scalars.residual();
        self.scalar_launch(x, m, |k| &k.scale, "scale_inplace (residual)")
    }

    /// Divides logits by `logits_scaling`.
    pub(super) fn scale_logits(&self, x: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let d = self.cfg.block.scalars.logits_divisor();
        self.scalar_launch(x, d, |k| &k.divide, "divide_inplace (logits)")
    }
}
