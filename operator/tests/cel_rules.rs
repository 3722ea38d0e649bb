//! Evaluates the CRD's CEL rules (`x-kubernetes-validations`) client-side,
//! with the same CEL library kube-rs ships, on specs that `spec_file::validate`
//! accepts and on the ones it refuses: the API server and local mode must
//! agree, and each refusal must name its field.

use kube::core::cel::validate_cel;
use quantops_api::QuantizedModel;
use quantops_api::spec_file::parse_quantized_model;

const HEAD: &str = "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: x, namespace: experiment}\nspec:\n  baseModel: {name: example/tiny, path: m}\n  version: v1\n";

/// Parses without the Rust-side validation, as the API server would receive it.
fn raw(spec: &str) -> QuantizedModel {
    serde_yaml::from_str(&format!("{HEAD}{spec}")).unwrap_or_else(|e| panic!("{e}"))
}

fn cel_error(spec: &str) -> Option<String> {
    validate_cel(&raw(spec)).err().map(|e| e.to_string())
}

#[test]
fn valid_specs_pass_both_validators() {
    for spec in [
        "  quantization: {method: rtn}\n",
        "  quantization: {method: gptq, bits: 4, groupSize: 128}\n  calibration: {path: c.txt}\n",
        "  quantization: {method: awq, bits: 4, groupSize: 64}\n  calibration: {path: c.txt}\n",
        "  quantization: {method: int8, bits: 8, groupSize: -1}\n",
        "  quantization: {method: fp8, bits: 8, groupSize: -1}\n  validation: {gates: {maxPerplexityIncreasePercent: 10}}\n",
    ] {
        assert!(
            parse_quantized_model(&format!("{HEAD}{spec}"), "t").is_ok(),
            "{spec}"
        );
        assert_eq!(cel_error(spec), None, "{spec}");
    }
}

#[test]
fn refusals_agree_and_name_the_field() {
    for (spec, field) in [
        ("  quantization: {method: gptq}\n", "spec.calibration"),
        ("  quantization: {method: awq}\n", "spec.calibration"),
        (
            "  quantization: {method: fp8, bits: 8, groupSize: 128}\n",
            "spec.quantization.groupSize",
        ),
        (
            "  quantization: {method: int8, bits: 4, groupSize: -1}\n",
            "spec.quantization.bits",
        ),
        (
            "  quantization: {method: fp8, bits: 4, groupSize: -1}\n",
            "spec.quantization.bits",
        ),
        (
            "  quantization: {method: rtn}\n  validation: {gates: {maxPerplexityIncreasePercent: 12}}\n",
            "spec.validation.gates.maxPerplexityIncreasePercent",
        ),
    ] {
        let local = parse_quantized_model(&format!("{HEAD}{spec}"), "t")
            .err()
            .map(|e| e.to_string());
        assert!(
            local.as_deref().is_some_and(|e| e.contains(field)),
            "local: {local:?} for {spec}"
        );
        let cel = cel_error(spec);
        assert!(
            cel.as_deref().is_some_and(|e| e.contains(field)),
            "CEL: {cel:?} for {spec}"
        );
    }
}
