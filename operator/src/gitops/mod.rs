//! GitOps promotion, the library half: render an environment's serving
//! folder for a promotion.
//!
//! - [`render`]: the serving folder `envs/{env}/{model}/` (vLLM Deployment or,
//!   in prod, an Argo Rollouts canary with its Prometheus analysis; Service;
//!   kustomization; model card), as pure, deterministic functions.

pub mod render;

pub use render::{
    AnalysisThresholds, RenderError, RenderedFile, RenderedFolder, ServingInputs,
    ServingSettings, render_serving_folder,
};
