//! The contracts of quantops, in one place so that the operator and the worker
//! can never disagree about them: the two custom resources (`QuantizedModel`,
//! `ModelPromotion`) whose field names are fixed by DESIGN.md, the value
//! rules every spec field obeys, the variant and artifact naming rules, and
//! the `report.json` / termination-message schema the worker hands back to
//! the operator.

pub mod model_promotion;
pub mod probe;
pub mod quantized_model;
pub mod report;
pub mod rules;
pub mod spec_file;
pub mod variant;

pub use model_promotion::{
    CanarySpec, CanaryStep, Environment, GitOpsSpec, ModelPromotion, ModelPromotionSpec,
    ModelPromotionStatus, ModelRef, QualitySample, QualitySpec, QualityStatus, ServingSpec,
};
pub use probe::{ProbeLatency, ProbeResult};
pub use quantized_model::{
    CalibrationSpec, EvalTextSpec, GatesSpec, LoadtestSpec, Method, QuantizationSpec,
    QuantizedModel, QuantizedModelSpec, QuantizedModelStatus, ValidationSpec,
};
pub use report::{GateResult, ModelMetrics, Report, StageSummary};

/// The API group of every quantops resource.
pub const GROUP: &str = "quantops.dev";
/// The API version served by this release.
pub const VERSION: &str = "v1alpha1";
