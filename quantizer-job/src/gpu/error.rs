//! What can go wrong on the GPU path, worded for the person who asked for it.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;

use crate::quant::QuantError;

/// A failure of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A CUDA library is not on the loader's path.
    #[error(
        "the CUDA library {library} could not be loaded: put the directory that holds it on LD_LIBRARY_PATH (it ships with the NVIDIA driver, the CUDA toolkit or the nvidia-* Python wheels), or run with --device cpu"
    )]
    MissingLibrary {
        /// The library's base name, e.g. `nvrtc`.
        library: &'static str,
    },
    /// The driver is there but sees no GPU.
    #[error(
        "no CUDA device is visible (CUDA_VISIBLE_DEVICES, the container's GPU request); run with --device cpu"
    )]
    NoDevice,
    /// A driver call failed.
    #[error("CUDA driver call failed while {action}: {source}")]
    Driver {
        /// What the backend was doing.
        action: String,
        /// The driver's error.
        source: DriverError,
    },
    /// NVRTC refused the kernels' source: a bug in quantops, with the compiler log.
    #[error("NVRTC could not compile the {module} kernels: {log}")]
    Compile {
        /// Which kernel module.
        module: &'static str,
        /// The compiler's log.
        log: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS failed while {action}: {source}")]
    Cublas {
        /// What the backend was doing.
        action: String,
        /// cuBLAS's status.
        source: CublasError,
    },
    /// A cuSOLVER call failed.
    #[error("cuSOLVER failed while {action}: status {status}")]
    Cusolver {
        /// What the backend was doing.
        action: String,
        /// cuSOLVER's status, as it prints.
        status: String,
    },
    /// The damped Hessian had a non-positive pivot.
    #[error(
        "{layer}: the damped Hessian is not positive definite (cuSOLVER stopped at column {column} while {step}); raise spec.quantization.dampPercent or calibrate on more tokens"
    )]
    NotPositiveDefinite {
        /// The Linear.
        layer: String,
        /// The failing column (1-based, as cuSOLVER reports it).
        column: i32,
        /// Which factorisation.
        step: &'static str,
    },
    /// The job's estimate does not fit the GPU.
    #[error(
        "this job needs about {needed_gib:.1} GiB of GPU memory ({detail}) but the GPU has {free_gib:.1} GiB free of {total_gib:.1} GiB; use a larger GPU, fewer calibration samples or a shorter sequence length"
    )]
    TooSmall {
        /// The estimate.
        needed_gib: f64,
        /// Free memory when the job started.
        free_gib: f64,
        /// The device's memory.
        total_gib: f64,
        /// What the estimate is made of.
        detail: String,
    },
    /// The request itself is invalid (shape, bits, group size).
    #[error(transparent)]
    Quant(#[from] QuantError),
}

/// Adds what the backend was doing to a driver error.
pub(crate) trait DriverContext<T> {
    fn during(self, action: impl Into<String>) -> Result<T, GpuError>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn during(self, action: impl Into<String>) -> Result<T, GpuError> {
        self.map_err(|source| GpuError::Driver {
            action: action.into(),
            source,
        })
    }
}

impl<T> DriverContext<T> for Result<T, CublasError> {
    fn during(self, action: impl Into<String>) -> Result<T, GpuError> {
        self.map_err(|source| GpuError::Cublas {
            action: action.into(),
            source,
        })
    }
}
