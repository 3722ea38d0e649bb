//! The CUDA backend: the same algorithms as [`crate::quant`]'s CPU twin, on
//! an NVIDIA GPU through cudarc.
//!
//! Nothing here is linked at build time: cudarc loads libcuda, NVRTC, cuBLAS
//! and cuSOLVER when [`Gpu::open`] is called, and the kernels are CUDA C
//! compiled by NVRTC for the device at hand. So the one binary built on a
//! machine without CUDA runs the CPU path there and the GPU path where a GPU
//! is visible, and CI checks the kernels' source with NVRTC alone.

mod awq;
mod backend;
pub mod check;
mod error;
pub mod llama;
mod memory;
pub mod moe;
pub mod pipeline;
mod quant;
pub mod staging;
pub mod tensors;

pub use backend::CudaBackend;
pub use error::GpuError;
pub use quant::{DeviceHessian, DeviceQuantizer};

use std::sync::{Arc, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::cusolver::DnHandle;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use error::DriverContext;

/// Where the worker computes: `auto` takes a GPU when one is visible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The GPU when libcuda loads and sees a device, else the CPU.
    #[default]
    Auto,
    /// The CPU, even when a GPU is visible.
    Cpu,
    /// The GPU; an error when none is usable.
    Cuda,
}

/// The CUDA C source of the quantization kernels.
pub const QUANT_KERNELS: &str = include_str!("kernels/quant.cu");

/// One GPU, its stream, library handles and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// cuBLAS and cuSOLVER, created on first use: loading and initialising
    /// them takes a good part of a second, which a weight-only job (RTN,
    /// INT8, FP8) never needs.
    blas: OnceLock<CudaBlas>,
    solver: OnceLock<DnHandle>,
    quant: Arc<CudaModule>,
    name: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("name", &self.name).finish()
    }
}

/// Restores cuBLAS's default f32 math when dropped (see [`Gpu::tf32`]).
pub struct Tf32Guard<'g> {
    gpu: &'g Gpu,
}

impl Drop for Tf32Guard<'_> {
    fn drop(&mut self) {
        let Some(blas) = self.gpu.blas.get() else {
            return;
        };
        if let Err(e) = set_math_mode(blas, cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
        {
            tracing::warn!(error = %e, "could not restore cuBLAS's default math mode");
        }
    }
}

fn set_math_mode(blas: &CudaBlas, mode: cudarc::cublas::sys::cublasMath_t) -> Result<(), GpuError> {
    // SAFETY: the handle is alive for as long as `blas`.
    let status = unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) };
    status.result().during("setting cuBLAS's math mode")
}

/// Fails with [`GpuError::MissingLibrary`] instead of cudarc's panic when a
/// library cannot be loaded.
fn require_libraries() -> Result<(), GpuError> {
    // SAFETY: these only try `dlopen` on the library names cudarc would use.
    let present = unsafe {
        [
            ("cuda", cudarc::driver::sys::is_culib_present()),
            ("nvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("cublas", cudarc::cublas::sys::is_culib_present()),
            ("cusolver", cudarc::cusolver::sys::is_culib_present()),
        ]
    };
    match present.iter().find(|(_, ok)| !ok) {
        Some((library, _)) => Err(GpuError::MissingLibrary { library }),
        None => Ok(()),
    }
}

/// The cell's value, created by `init` the first time.
fn created_once<T>(
    cell: &OnceLock<T>,
    init: impl FnOnce() -> Result<T, GpuError>,
) -> Result<&T, GpuError> {
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let value = init()?;
    Ok(cell.get_or_init(|| value))
}

/// Compiles CUDA C for the given compute capability with NVRTC.
pub fn compile(
    module: &'static str,
    source: &str,
    arch: &'static str,
) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    let opts = CompileOptions {
        arch: Some(arch),
        // IEEE division and square roots, no flush to zero: the codes must
        // equal the CPU twin's bit for bit.
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options: vec!["--std=c++17".to_string()],
        name: Some(format!("{module}.cu")),
        ..CompileOptions::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| GpuError::Compile {
        module,
        log: e.to_string(),
    })
}

/// NVRTC's architecture name for a compute capability NVRTC knows.
fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        // A newer part runs the PTX of the newest architecture named here.
        _ if major >= 9 => "sm_90",
        _ => "sm_80",
    }
}

impl Gpu {
    /// Opens GPU `ordinal`: loads the libraries, creates the context, the
    /// stream and the library handles, and compiles the kernels.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        let opening = std::time::Instant::now();
        require_libraries()?;
        // cuInit fails (CUDA_ERROR_NO_DEVICE) where the driver is installed
        // but no GPU is visible: that is "no device", not a broken driver.
        let count = CudaContext::device_count().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "the CUDA driver reports no device");
            0
        });
        if count <= ordinal as i32 {
            return Err(GpuError::NoDevice);
        }
        let ctx = CudaContext::new(ordinal).during("creating the context")?;
        let stream = ctx.new_stream().during("creating a stream")?;
        let (major, minor) = ctx
            .compute_capability()
            .during("reading the compute capability")?;
        let compiling = std::time::Instant::now();
        let ptx = compile("quant", QUANT_KERNELS, arch_name(major, minor))?;
        let compile_s = compiling.elapsed().as_secs_f64();
        let quant = ctx.load_module(ptx).during("loading the quant kernels")?;
        let name = ctx.name().during("reading the device name")?;
        tracing::info!(
            device = %name,
            compute_capability = format!("{major}.{minor}"),
            compile_s,
            open_s = opening.elapsed().as_secs_f64(),
            "GPU opened"
        );
        Ok(Self {
            ctx,
            stream,
            blas: OnceLock::new(),
            solver: OnceLock::new(),
            quant,
            name,
        })
    }

    /// The GPU the choice asks for, `None` for the CPU. `auto` falls back to
    /// the CPU only when no GPU is usable, and says why.
    pub fn for_choice(choice: DeviceChoice) -> Result<Option<Self>, GpuError> {
        match choice {
            DeviceChoice::Cpu => Ok(None),
            DeviceChoice::Cuda => Self::open(0).map(Some),
            DeviceChoice::Auto => match Self::open(0) {
                Ok(gpu) => Ok(Some(gpu)),
                Err(e @ (GpuError::MissingLibrary { .. } | GpuError::NoDevice)) => {
                    tracing::info!(reason = %e, "no usable GPU: computing on the CPU");
                    Ok(None)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        self.ctx.mem_get_info().during("reading free memory")
    }

    /// The context every allocation of this backend belongs to.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A device buffer that the next operation on [`Gpu::stream`] fills
    /// entirely (a kernel or a copy), so it is not zeroed first:
    /// `alloc_zeros` costs a memset launch and a pass over the buffer, as
    /// much as a weight-only kernel's own writes. Only for plain numbers,
    /// for which every bit pattern is a value.
    pub(crate) fn buffer_to_fill<T: DeviceRepr>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>, GpuError> {
        // SAFETY: the buffer is filled by an operation queued before any
        // read of it on the same stream, and T is a plain number type.
        unsafe { self.stream.alloc::<T>(len) }.during(format!("allocating {what}"))
    }

    /// The cuBLAS handle, bound to [`Gpu::stream`].
    pub fn blas(&self) -> Result<&CudaBlas, GpuError> {
        created_once(&self.blas, || {
            CudaBlas::new(self.stream.clone()).during("creating the cuBLAS handle")
        })
    }

    /// A function of the quantization kernels.
    pub(crate) fn quant_fn(&self, name: &str) -> Result<CudaFunction, GpuError> {
        self.quant
            .load_function(name)
            .during(format!("loading kernel {name}"))
    }

    /// Waits for the stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().during("synchronizing")
    }

    /// Loads another module of kernels compiled from `source` for this device.
    pub fn load_module(
        &self,
        module: &'static str,
        source: &str,
    ) -> Result<Arc<CudaModule>, GpuError> {
        let (major, minor) = self
            .ctx
            .compute_capability()
            .during("reading the compute capability")?;
        let ptx = compile(module, source, arch_name(major, minor))?;
        self.ctx
            .load_module(ptx)
            .during(format!("loading the {module} kernels"))
    }

    /// Lets cuBLAS's f32 products use the tensor cores (TF32 inputs, f32
    /// accumulation) until the guard is dropped. The quantization pipeline's
    /// forward passes and Hessians take it: calibration statistics tolerate
    /// TF32's 10-bit mantissas (llm-compressor runs this forward in bf16),
    /// and it makes those products several times faster. Evaluation keeps
    /// full f32.
    pub fn tf32(&self) -> Result<Tf32Guard<'_>, GpuError> {
        set_math_mode(
            self.blas()?,
            cudarc::cublas::sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        )?;
        Ok(Tf32Guard { gpu: self })
    }

    pub(crate) fn solver(&self) -> Result<&DnHandle, GpuError> {
        created_once(&self.solver, || {
            DnHandle::new(self.stream.clone()).map_err(|e| GpuError::Cusolver {
                action: "creating the cuSOLVER handle".to_string(),
                status: format!("{e:?}"),
            })
        })
    }
}

/// Whether NVRTC can be loaded here; tests that compile kernels skip
/// without it unless `QUANTOPS_REQUIRE_NVRTC` is set (as CI sets it).
#[cfg(test)]
pub(crate) fn nvrtc_for_tests() -> bool {
    // SAFETY: only tries to dlopen NVRTC.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !present {
        assert!(
            std::env::var_os("QUANTOPS_REQUIRE_NVRTC").is_none(),
            "QUANTOPS_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH)"
        );
        eprintln!("NVRTC not found: kernel compilation not checked");
    }
    present
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The GPU, or `None` (with a note) where there is none and
    /// QUANTOPS_REQUIRE_GPU is unset: the GPU tests run in CI as skips and
    /// on the device as failures when the GPU is missing.
    pub(crate) fn gpu_or_skip() -> Option<Gpu> {
        let required = std::env::var_os("QUANTOPS_REQUIRE_GPU").is_some();
        match Gpu::for_choice(DeviceChoice::Auto) {
            Ok(Some(gpu)) => Some(gpu),
            Ok(None) if !required => {
                eprintln!(
                    "skipped: no usable GPU (set QUANTOPS_REQUIRE_GPU to make this a failure)"
                );
                None
            }
            Ok(None) => panic!("QUANTOPS_REQUIRE_GPU is set but no GPU is usable"),
            Err(e) => panic!("opening the GPU: {e}"),
        }
    }

    #[test]
    fn quant_kernels_compile_for_hopper_and_ampere() {
        if !nvrtc_for_tests() {
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let ptx =
                compile("quant", QUANT_KERNELS, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            let text = ptx.to_src();
            for kernel in [
                "rtn_int",
                "fp8_rows",
                "pack_words",
                "gptq_block",
                "unpermute_codes",
                "diagonal",
                "awq_delta",
                "awq_clip",
                "sum_squares",
                "scale_columns",
                "scale_rows",
                "gather_rows",
            ] {
                assert!(
                    text.contains(kernel),
                    "{arch}: {kernel} missing from the PTX"
                );
            }
        }
    }

    #[test]
    fn cpu_is_chosen_without_a_driver_unless_cuda_is_demanded() {
        // SAFETY: only tries to dlopen libcuda.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // a GPU machine: nothing to check here
        }
        assert!(Gpu::for_choice(DeviceChoice::Auto).expect("auto").is_none());
        assert!(Gpu::for_choice(DeviceChoice::Cpu).expect("cpu").is_none());
        let err = Gpu::for_choice(DeviceChoice::Cuda).unwrap_err();
        assert!(err.to_string().contains("--device cpu"), "{err}");
    }
}
