//! The CustomResourceDefinitions, generated from the Rust types in
//! `quantops-api` so that the schema the API server enforces can never drift
//! from what the operator and the worker deserialize.

use kube::CustomResourceExt;
use quantops_api::{ModelPromotion, QuantizedModel};

/// File names of the committed CRDs under `crds/` (and the chart's `crds/`),
/// paired with their YAML as generated from the types.
pub fn generated() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    Ok(vec![
        (
            "quantizedmodels.quantops.dev.yaml",
            serde_yaml::to_string(&QuantizedModel::crd())?,
        ),
        (
            "modelpromotions.quantops.dev.yaml",
            serde_yaml::to_string(&ModelPromotion::crd())?,
        ),
    ])
}

/// Both CRDs as one multi-document YAML stream, as `quantops crds` prints it.
pub fn render_all() -> Result<String, serde_yaml::Error> {
    let docs = generated()?;
    Ok(docs
        .into_iter()
        .map(|(_, yaml)| format!("---\n{yaml}"))
        .collect::<String>())
}
