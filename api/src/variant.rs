//! Naming of variants and their artifacts, defined once: the worker writes to
//! these paths and the operator and the GitOps writer read from them.

use crate::quantized_model::{Method, QuantizationSpec, QuantizedModelSpec};

/// `int4`, `int8`, `fp8`, ...: the weight precision part of a variant name.
pub fn precision(q: &QuantizationSpec) -> String {
    match q.method {
        Method::Fp8 => "fp8".to_string(),
        Method::Int8 => "int8".to_string(),
        _ => format!("int{}", q.bits),
    }
}

/// The recipe part of a variant name: method and grouping, `gptq-g128` or
/// `rtn-ch` (per channel); `-asym` marks an asymmetric integer grid.
pub fn config(q: &QuantizationSpec) -> String {
    let grouping = if q.group_size > 0 && q.method != Method::Fp8 {
        format!("g{}", q.group_size)
    } else {
        "ch".to_string()
    };
    let asym = if q.symmetric || q.method == Method::Fp8 {
        ""
    } else {
        "-asym"
    };
    format!("{}-{grouping}{asym}", q.method)
}

/// The model's short name: the last segment of `baseModel.name`.
pub fn model_short_name(spec: &QuantizedModelSpec) -> &str {
    spec.base_model
        .name
        .rsplit('/')
        .next()
        .unwrap_or(&spec.base_model.name)
}

/// `{model}-{version}-{precision}-{config}`, e.g. `tiny-llama-v1.2-int4-gptq-g128-asym`.
pub fn variant_name(spec: &QuantizedModelSpec) -> String {
    format!(
        "{}-{}-{}-{}",
        model_short_name(spec),
        spec.version,
        precision(&spec.quantization),
        config(&spec.quantization)
    )
}

/// The artifact directory relative to the output root:
/// `{model}/{version}-{precision}-{config}`.
pub fn artifact_dir(spec: &QuantizedModelSpec) -> String {
    format!(
        "{}/{}-{}-{}",
        model_short_name(spec),
        spec.version,
        precision(&spec.quantization),
        config(&spec.quantization)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec_file::parse_quantized_model;

    #[test]
    fn names_follow_design() {
        let qm = parse_quantized_model(
            "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: x}\nspec:\n  baseModel: {name: example/tiny-llama, path: m}\n  version: v1.2\n  quantization: {method: gptq, bits: 4, groupSize: 128, symmetric: false}\n  calibration: {path: c.txt}\n",
            "inline",
        )
        .expect("valid spec");
        assert_eq!(
            variant_name(&qm.spec),
            "tiny-llama-v1.2-int4-gptq-g128-asym"
        );
        assert_eq!(
            artifact_dir(&qm.spec),
            "tiny-llama/v1.2-int4-gptq-g128-asym"
        );
    }
}
