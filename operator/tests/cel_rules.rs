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

/// The value rules of `quantops_api::rules` as CEL: every path, name,
/// digest and quantity the adversarial specs used is refused by
/// both validators, naming the field; the valid forms pass both.
#[test]
fn value_rules_agree_and_name_the_field() {
    let digest = "0".repeat(64);
    let spec = |base: &str, version: &str, rest: &str| {
        format!(
            "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {{name: x, namespace: experiment}}\nspec:\n  baseModel: {base}\n  version: '{version}'\n  quantization: {{method: rtn}}\n{rest}"
        )
    };
    let good = spec(
        &format!(
            "{{name: meta-llama/Llama-3.2-1B, path: models/llama, sha256: {{model.safetensors: '{digest}'}}}}"
        ),
        "v1.2",
        "  validation: {evalText: {path: text/eval.txt}, tasks: [{name: chat-choice, path: tasks/c.jsonl}], systemTests: {path: s.yaml}, consistency: {path: p.jsonl}}\n  output: {path: out/q}\n  resources: {gpus: 0, memory: 1.5Gi, cpu: 500m}\n",
    );
    assert!(parse_quantized_model(&good, "t").is_ok(), "{good}");
    let qm: QuantizedModel = serde_yaml::from_str(&good).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(validate_cel(&qm).err().map(|e| e.to_string()), None);

    let m = "{name: a/b, path: m}";
    for (text, field) in [
        (
            spec("{name: a/b, path: /etc}", "v1", ""),
            "spec.baseModel.path",
        ),
        (
            spec("{name: a/b, path: m/../../x}", "v1", ""),
            "spec.baseModel.path",
        ),
        (
            spec("{name: evil/.., path: m}", "v1", ""),
            "spec.baseModel.name",
        ),
        (
            spec("{name: a/b/c, path: m}", "v1", ""),
            "spec.baseModel.name",
        ),
        (spec(m, "..", ""), "spec.version"),
        (spec(m, "v1/x", ""), "spec.version"),
        (
            spec(
                "{name: a/b, path: m, sha256: {m.safetensors: not-a-digest}}",
                "v1",
                "",
            ),
            "spec.baseModel.sha256",
        ),
        (
            spec(
                &format!("{{name: a/b, path: m, sha256: {{'/etc/passwd': '{digest}'}}}}"),
                "v1",
                "",
            ),
            "spec.baseModel.sha256",
        ),
        (
            spec(m, "v1", "  calibration: {path: ../../../etc/passwd}\n"),
            "spec.calibration.path",
        ),
        (
            spec(
                m,
                "v1",
                "  validation: {evalText: {path: /proc/self/environ}}\n",
            ),
            "spec.validation.evalText.path",
        ),
        (
            spec(m, "v1", "  validation: {tasks: [{name: t, path: a//b}]}\n"),
            "spec.validation.tasks[].path",
        ),
        (
            spec(m, "v1", "  validation: {tasks: [{name: ../t, path: t}]}\n"),
            "spec.validation.tasks[].name",
        ),
        (
            spec(
                m,
                "v1",
                "  validation: {systemTests: {path: /var/run/secrets/kubernetes.io/serviceaccount/token}}\n",
            ),
            "spec.validation.systemTests.path",
        ),
        (
            spec(m, "v1", "  validation: {consistency: {path: ./p.jsonl}}\n"),
            "spec.validation.consistency.path",
        ),
        (
            spec(m, "v1", "  output: {path: ../tmp/x}\n"),
            "spec.output.path",
        ),
        (
            spec(m, "v1", "  resources: {memory: lots}\n"),
            "spec.resources.memory",
        ),
        (
            spec(m, "v1", "  resources: {cpu: '-3'}\n"),
            "spec.resources.cpu",
        ),
        (
            spec(m, "v1", "  resources: {memory: '0'}\n"),
            "spec.resources.memory",
        ),
    ] {
        let local = parse_quantized_model(&text, "t")
            .err()
            .map(|e| e.to_string());
        assert!(
            local.as_deref().is_some_and(|e| e.contains(field)),
            "local: {local:?} for {text}"
        );
        let qm: QuantizedModel = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        let cel = validate_cel(&qm).err().map(|e| e.to_string());
        assert!(
            cel.as_deref().is_some_and(|e| e.contains(field)),
            "CEL: {cel:?} for {text}"
        );
    }
}
