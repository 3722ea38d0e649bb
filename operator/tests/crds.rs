//! The committed CRDs (`crds/` and the chart's `crds/`) must equal what the
//! Rust types generate. To regenerate after changing the types:
//!
//! ```sh
//! QUANTOPS_UPDATE_CRDS=1 cargo test --release -p quantops-operator --test crds
//! ```

use std::path::PathBuf;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const DIRS: [&str; 2] = ["crds", "charts/quantops/crds"];

#[test]
fn committed_crds_match_the_types() {
    let generated = quantops_operator::crds::generated()
        .unwrap_or_else(|e| panic!("cannot render the CRDs: {e}"));
    let update = std::env::var_os("QUANTOPS_UPDATE_CRDS").is_some();
    let mut drifted = Vec::new();
    for dir in DIRS {
        for (file, yaml) in &generated {
            let path = repo_root().join(dir).join(file);
            if update {
                std::fs::create_dir_all(path.parent().unwrap_or(&repo_root()))
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
                std::fs::write(&path, yaml)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(committed) if committed == *yaml => {}
                Ok(_) => drifted.push(format!("{dir}/{file} differs from the types")),
                Err(e) => drifted.push(format!("{dir}/{file}: {e}")),
            }
        }
    }
    assert!(
        drifted.is_empty(),
        "{}\nregenerate with: QUANTOPS_UPDATE_CRDS=1 cargo test --release -p quantops-operator --test crds",
        drifted.join("\n")
    );
}

/// The CEL rules and enums that mirror `spec_file::validate` are in the schema.
#[test]
fn schema_carries_the_validation_rules() {
    let generated = quantops_operator::crds::generated().unwrap_or_else(|e| panic!("{e}"));
    let (_, qm) = generated
        .iter()
        .find(|(file, _)| file.starts_with("quantizedmodels"))
        .unwrap_or_else(|| panic!("no QuantizedModel CRD"));
    let crd: serde_json::Value = serde_yaml::from_str(qm).unwrap_or_else(|e| panic!("{e}"));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(
        version["subresources"]["status"].is_object(),
        "status subresource"
    );
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rules = |schema: &serde_json::Value| -> Vec<(String, String)> {
        schema["x-kubernetes-validations"]
            .as_array()
            .map(|rules| {
                rules
                    .iter()
                    .map(|r| {
                        (
                            r["rule"].as_str().unwrap_or_default().to_string(),
                            r["message"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let spec_rules = rules(spec);
    assert!(
        spec_rules
            .iter()
            .any(|(rule, message)| rule.contains("has(self.calibration)")
                && message.starts_with("spec.calibration")),
        "{spec_rules:?}"
    );
    let quantization = &spec["properties"]["quantization"];
    let q_rules = rules(quantization);
    assert!(
        q_rules
            .iter()
            .any(|(r, m)| r.contains("self.groupSize == -1")
                && m.starts_with("spec.quantization.groupSize")),
        "{q_rules:?}"
    );
    assert!(
        q_rules
            .iter()
            .any(|(r, m)| r.contains("self.bits == 8") && m.starts_with("spec.quantization.bits")),
        "{q_rules:?}"
    );
    assert_eq!(
        quantization["properties"]["bits"]["enum"],
        serde_json::json!([2, 3, 4, 8])
    );
    assert_eq!(
        quantization["properties"]["groupSize"]["enum"],
        serde_json::json!([-1, 32, 64, 128])
    );
    assert_eq!(
        quantization["properties"]["method"]["enum"],
        serde_json::json!(["rtn", "gptq", "awq", "int8", "fp8"])
    );
    // Defaults come from the serde defaults.
    assert_eq!(quantization["properties"]["bits"]["default"], 4);
    let gates = &spec["properties"]["validation"]["properties"]["gates"];
    let g_rules = rules(gates);
    assert!(
        g_rules.iter().any(|(r, m)| r.contains("<= 10.0")
            && m.starts_with("spec.validation.gates.maxPerplexityIncreasePercent")),
        "{g_rules:?}"
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    for column in ["Phase", "Method", "Bits", "PPL-Delta", "Age"] {
        assert!(columns.contains(&column), "{columns:?}");
    }
}

/// `spec.quality` carries its bounds and defaults, so the API server refuses
/// a threshold outside 0..1 or an empty window before the operator sees it.
#[test]
fn promotion_quality_has_bounds_and_defaults() {
    let generated = quantops_operator::crds::generated().unwrap_or_else(|e| panic!("{e}"));
    let (_, mp) = generated
        .iter()
        .find(|(file, _)| file.starts_with("modelpromotions"))
        .unwrap_or_else(|| panic!("no ModelPromotion CRD"));
    let crd: serde_json::Value = serde_yaml::from_str(mp).unwrap_or_else(|e| panic!("{e}"));
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let quality = &schema["spec"]["properties"]["quality"]["properties"];
    assert_eq!(quality["threshold"]["minimum"], 0.0);
    assert_eq!(quality["threshold"]["maximum"], 1.0);
    assert_eq!(quality["threshold"]["default"], 0.8);
    assert_eq!(quality["window"]["minimum"], 1.0);
    assert_eq!(quality["window"]["default"], 5);
    assert_eq!(quality["schedule"]["default"], "*/5 * * * *");
    let status = &schema["status"]["properties"]["quality"]["properties"];
    for field in ["samples", "score", "threshold", "lastProbeTime"] {
        assert!(status[field].is_object(), "status.quality.{field}");
    }
}
