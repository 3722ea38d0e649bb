//! The operator's settings, from flags and environment (see `main.rs`);
//! kept free of clap so that tests and the e2e harness can build one directly.

use crate::pipeline::RetryPolicy;
use crate::promotion::PromotionSettings;
use crate::scope::WatchScope;
use std::collections::BTreeMap;
use std::time::Duration;

/// How the pipeline Jobs are rendered.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSettings {
    /// The worker image, e.g. `quantops/quantizer-job:0.1.0`.
    pub image: String,
    /// The PVC holding checkpoints, data and artifacts, mounted at `/models`.
    pub model_claim: String,
    /// Where the Jobs' pods may run (GPU nodes).
    pub node_selector: BTreeMap<String, String>,
    /// Service account of the Jobs' pods; the namespace default when unset.
    pub service_account: Option<String>,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            image: format!("quantops/quantizer-job:{}", env!("CARGO_PKG_VERSION")),
            model_claim: "quantops-models".to_string(),
            node_selector: BTreeMap::from([(
                "quantops.dev/gpu-node".to_string(),
                "true".to_string(),
            )]),
            service_account: None,
        }
    }
}

/// Everything `run` needs besides a client.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// The namespaces whose QuantizedModels and ModelPromotions are served.
    pub watch: WatchScope,
    pub jobs: JobSettings,
    pub retry: RetryPolicy,
    /// How often a running stage is looked at even without a watch event.
    pub resync: Duration,
    /// Reconciliations running at once: bounds the load the operator puts
    /// on the API server when thousands of models change together.
    pub max_concurrent_reconciles: u16,
    /// Where and how ModelPromotions commit and what they follow.
    pub promotion: PromotionSettings,
    /// How long a stage's pod may stay unschedulable before the stage
    /// counts as broken (its Job deleted, retried like any broken stage);
    /// `None` waits for capacity indefinitely.
    pub unschedulable_timeout: Option<Duration>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            watch: WatchScope::Cluster,
            jobs: JobSettings::default(),
            retry: RetryPolicy::default(),
            resync: Duration::from_secs(300),
            max_concurrent_reconciles: 16,
            promotion: PromotionSettings::default(),
            unschedulable_timeout: Some(Duration::from_secs(1800)),
        }
    }
}
