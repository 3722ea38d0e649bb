//! The model card committed beside the serving manifests. The worker's full
//! card lives with the artifact on the model volume, which the operator does
//! not mount; this one is composed from the QuantizedModel's status, so that
//! a reviewer of the GitOps commit sees what is being served and why it was
//! allowed, and where the full card is. Deterministic: no clock in it.

use quantops_api::{Environment, QuantizedModel};
use std::fmt::Write as _;

/// Markdown with Hugging Face front matter.
pub fn promotion_card(qm: &QuantizedModel, environment: Environment, promotion: &str) -> String {
    let status = qm.status.clone().unwrap_or_default();
    let q = &qm.spec.quantization;
    let variant = status.variant.as_deref().unwrap_or("unknown");
    let mut card = String::new();
    let _ = writeln!(card, "---");
    let _ = writeln!(card, "base_model: {}", qm.spec.base_model.name);
    let _ = writeln!(card, "base_model_relation: quantized");
    let _ = writeln!(
        card,
        "tags: [quantops, {}, {}-bit]",
        q.method.as_str(),
        q.bits
    );
    let _ = writeln!(card, "---\n");
    let _ = writeln!(card, "# {variant}\n");
    let _ = writeln!(
        card,
        "Served in **{}** by promotion `{promotion}` from QuantizedModel `{}`: {} at {} bits{} of `{}` {}.\n",
        environment.as_str(),
        qm.metadata.name.as_deref().unwrap_or("unknown"),
        q.method.as_str(),
        q.bits,
        if q.group_size > 0 {
            format!(", group size {}", q.group_size)
        } else {
            ", per channel".to_string()
        },
        qm.spec.base_model.name,
        qm.spec.version
    );
    let _ = writeln!(card, "| gate | baseline | value | threshold | verdict |");
    let _ = writeln!(card, "| --- | --- | --- | --- | --- |");
    for g in &status.gates {
        let baseline = g.baseline.map_or("—".to_string(), |b| format!("{b:.4}"));
        let verdict = if g.passed { "pass" } else { "FAIL" };
        let _ = writeln!(
            card,
            "| {} | {baseline} | {:.4} | {:.4} | {verdict} |",
            g.name, g.value, g.threshold
        );
    }
    let _ = writeln!(card);
    if let (Some(b), Some(v)) = (status.baseline_perplexity, status.quantized_perplexity) {
        let _ = writeln!(
            card,
            "Perplexity {b:.4} → {v:.4} ({}).\n",
            status.perplexity_delta.as_deref().unwrap_or("n/a")
        );
    }
    let _ = writeln!(
        card,
        "Artifact: `{}` ({}); the full model card is `README.md` in that directory.",
        status.artifact_path.as_deref().unwrap_or("unknown"),
        status.artifact_digest.as_deref().unwrap_or("no digest")
    );
    card
}
