//! Errors of the quantization algorithms, each naming the layer and what was expected.

use thiserror::Error;

/// Why a quantization step refused or failed.
#[derive(Debug, Error)]
pub enum QuantError {
    /// A tensor's shape does not fit the operation.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// The layer's input width is not a multiple of the group size.
    #[error("layer {layer}: in_features {in_features} is not divisible by group_size {group_size}")]
    GroupSize {
        layer: String,
        in_features: usize,
        group_size: usize,
    },
    /// The recipe asks for something this scheme cannot do.
    #[error("layer {layer}: unsupported {field}: {value} (expected {expected})")]
    Unsupported {
        layer: String,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The Hessian is not positive definite even after dampening.
    #[error(
        "layer {layer}: Hessian is not positive definite at column {column} (pivot {pivot:e}); raise damp_percent"
    )]
    NotPositiveDefinite {
        layer: String,
        column: usize,
        pivot: f64,
    },
    /// The layer saw no calibration activations.
    #[error("layer {layer}: no calibration samples were accumulated")]
    NoSamples { layer: String },
    /// The compute backend (the GPU) failed underneath the algorithm.
    #[error("compute backend failed: {0}")]
    Backend(String),
}
