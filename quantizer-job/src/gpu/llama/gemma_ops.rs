//! The Gemma steps of the block on the device, the twins of the CPU's
//! `model::block_ops`: the GeGLU product `gelu_tanh(gate) · up`
//! ([`crate::family::Activation::GeluTanh`]) and the `tanh` soft-capping of
//! attention scores and logits ([`crate::family::Softcap`]). Each operation
//! is rounded on its own (`__fmul_rn`, `__fadd_rn`, `__fdiv_rn`: no fused
//! multiply-adds) in the CPU's order, so only `tanhf` may differ from the
//! host's `tanh`, by an ulp.
//!
//! The kernels are their own small module, compiled only for a model that
//! uses one of them, so the other families pay nothing for them. (The
//! `1 + weight` of Gemma's norms is an argument of the shared `rms_norm`
//! kernel, the embedding scale and `query_pre_attn_scalar` are Granite's
//! scalars: no kernel here.)

use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};

use super::{Gpu, GpuError, LlamaOps, check_len, per_element};
use crate::config::LlamaConfig;
use crate::family::Activation;
use crate::gpu::error::DriverContext;

const GEMMA_KERNELS: &str = r#"
// gate = gelu_tanh(gate) * up, gelu_tanh(v) = 0.5 v (1 + tanh(sqrt(2/pi) v (1 + 0.044715 v^2))),
// in candle's order of operations.
extern "C" __global__ void gelu_tanh_mul(float* __restrict__ gate, const float* __restrict__ up,
                                         long long n) {
    const float sqrt_two_over_pi = 0.79788456080286535587989211986876f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = gate[i];
        const float inner = __fadd_rn(1.0f, __fmul_rn(__fmul_rn(0.044715f, v), v));
        const float t = tanhf(__fmul_rn(__fmul_rn(sqrt_two_over_pi, v), inner));
        const float g = __fmul_rn(__fmul_rn(0.5f, v), __fadd_rn(1.0f, t));
        gate[i] = __fmul_rn(g, up[i]);
    }
}

// x = cap * tanh(x / cap), element-wise over n values.
extern "C" __global__ void softcap_inplace(float* __restrict__ x, float cap, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = __fmul_rn(tanhf(__fdiv_rn(x[i], cap)), cap);
    }
}
"#;

/// The compiled GeGLU and soft-capping kernels.
pub(super) struct GemmaKernels {
    gelu_tanh_mul: CudaFunction,
    softcap: CudaFunction,
}

impl GemmaKernels {
    /// Compiles the kernels when `cfg`'s family uses GeGLU or soft-capping.
    pub(super) fn load(gpu: &Gpu, cfg: &LlamaConfig) -> Result<Option<Self>, GpuError> {
        let block = cfg.block;
        let softcap = block.softcap.attention.is_some() || block.softcap.final_logits.is_some();
        if block.activation == Activation::Silu && !softcap {
            return Ok(None);
        }
        let module = gpu.load_module("llama_gemma", GEMMA_KERNELS)?;
        let load = |name: &str| {
            module
                .load_function(name)
                .during(format!("loading kernel {name}"))
        };
        Ok(Some(Self {
            gelu_tanh_mul: load("gelu_tanh_mul")?,
            softcap: load("softcap_inplace")?,
        }))
    }
}

/// The kernels, or the error of a config that needs them without them
/// (cannot happen: [`GemmaKernels::load`] reads the same config).
fn kernels<'k>(
    kernels: &'k Option<GemmaKernels>,
    what: &str,
) -> Result<&'k GemmaKernels, GpuError> {
    kernels.as_ref().ok_or_else(|| {
        super::shape_error(what, "the Gemma kernels", "not compiled for this config")
    })
}

impl LlamaOps<'_> {
    /// `gate = act(gate) · up`, with the family's activation: the shared
    /// `silu_mul` kernel (SwiGLU) or `gelu_tanh_mul` (GeGLU).
    pub(super) fn gated(
        &self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        check_len("MLP up projection", up.len(), gate.len())?;
        let (function, name) = match self.cfg.block.activation {
            Activation::Silu => (&self.kernels.silu_mul, "silu_mul"),
            Activation::GeluTanh => (
                &kernels(&self.gemma, "gelu_tanh_mul")?.gelu_tanh_mul,
                "gelu_tanh_mul",
            ),
        };
        let n = gate.len() as i64;
        let launch_cfg = per_element(gate.len());
        let mut launch = self.gpu.stream().launch_builder(function);
        launch.arg(gate).arg(up).arg(&n);
        // SAFETY: gate and up both hold n values (checked above).
        unsafe { launch.launch(launch_cfg) }.during(format!("launching {name}"))?;
        Ok(())
    }

    /// `x = cap · tanh(x / cap)` in place when `cap` is set.
    fn softcap(
        &self,
        x: &mut CudaSlice<f32>,
        cap: Option<f32>,
        what: &str,
    ) -> Result<(), GpuError> {
        let Some(cap) = cap else {
            return Ok(());
        };
        let k = kernels(&self.gemma, what)?;
        let n = x.len() as i64;
        let launch_cfg = per_element(x.len());
        let mut launch = self.gpu.stream().launch_builder(&k.softcap);
        launch.arg(x).arg(&cap).arg(&n);
        // SAFETY: the kernel touches x[0..n] only, and x holds n values.
        unsafe { launch.launch(launch_cfg) }
            .during(format!("launching softcap_inplace ({what})"))?;
        Ok(())
    }

    /// Soft-caps scaled attention scores (`attn_logit_softcapping`).
    pub(super) fn softcap_scores(&self, scores: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let cap = self.cfg.block.softcap.attention_cap();
        self.softcap(scores, cap, "attention scores")
    }

    /// Soft-caps logits (`final_logit_softcapping`).
    pub(super) fn softcap_logits(&self, logits: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let cap = self.cfg.block.softcap.logits_cap();
        self.softcap(logits, cap, "logits")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Gemma kernels compile where NVRTC is loadable (the GPU machine);
    /// `llama::tests::kernels_compile_with_nvrtc` says how to require it.
    #[test]
    fn gemma_kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen NVRTC under the names cudarc uses.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: NVRTC is not on the loader path");
            return;
        }
        if let Err(e) = crate::gpu::compile("llama_gemma", GEMMA_KERNELS, "sm_90") {
            panic!("{e}");
        }
    }
}
