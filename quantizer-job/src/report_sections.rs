//! The typed sections the worker adds to `report.json` beyond the contract's
//! keys. Stages write them and the model card reads them, so each is defined
//! once here rather than as loose JSON in two places.

use quantops_api::Report;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Report key of [`ModelFacts`].
pub const MODEL: &str = "base_model";
/// Report key of [`ArtifactFacts`].
pub const ARTIFACT: &str = "artifact";
/// Report key of [`CalibrationFacts`].
pub const CALIBRATION: &str = "calibration";
/// Report key of the recipe (the spec's `quantization` block).
pub const RECIPE: &str = "recipe";
/// Report key of [`crate::stages::serving_speed::ServingSpeed`].
pub const SERVING_SPEED: &str = "serving_speed";

/// The base checkpoint, as loaded.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ModelFacts {
    pub name: String,
    pub architecture: String,
    pub parameters: u64,
    pub layers: usize,
    pub size_bytes: u64,
    pub dtype: String,
}

/// The written artifact.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ArtifactFacts {
    pub path: String,
    /// `sha256:` digest over the artifact's weight files, in name order.
    pub digest: String,
    pub size_bytes: u64,
    pub format: String,
}

/// The calibration set actually used.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CalibrationFacts {
    pub path: String,
    pub samples: usize,
    pub sequence_length: usize,
    pub seed: u64,
    pub unique_token_ratio: f64,
}

/// Stores a section under `key`.
pub fn set<T: Serialize>(report: &mut Report, key: &str, value: &T) {
    if let Ok(json) = serde_json::to_value(value) {
        report.extra.insert(key.to_string(), json);
    }
}

/// Reads a section; `None` when a stage that writes it has not run.
pub fn get<T: DeserializeOwned>(report: &Report, key: &str) -> Option<T> {
    report
        .extra
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}
