//! The quantops operator as a library: the QuantizedModel reconciler, the
//! pipeline state machine it shares with local mode, Job rendering, leader
//! election, metrics, the CRD generator and the GitOps renderer and writer
//! ([`gitops`]). The `quantops` binary is a thin
//! command line over these; tests start the controller in-process with
//! [`controller::run`].

pub mod api_requests;
pub mod conditions;
pub mod config;
pub mod controller;
pub mod crds;
pub mod gitops;
pub mod job;
pub mod k8s;
pub mod lanes;
pub mod leader;
pub mod local;
pub mod local_serving;
pub mod metrics;
pub mod model_watch;
pub mod output_claim;
pub mod outputs;
pub mod pipeline;
pub mod promotion;
pub mod scope;
pub mod server;

pub use config::{JobSettings, OperatorConfig};
pub use controller::run;
