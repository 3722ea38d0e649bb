//! Commit messages: the audit trail. `git log` on the GitOps repository says
//! which variant went where, why it was allowed (its gates), and which
//! promotion did it; trailers make the same facts machine-readable, which is
//! how the writer recognises its own earlier commits and never makes one
//! twice.

use quantops_api::GateResult;
use quantops_api::model_promotion::Environment;

/// Trailer naming the promotion, `namespace/name`.
pub const TRAILER_PROMOTION: &str = "Quantops-Promotion";
/// Trailer with the promotion's UID: survives renames, differs after a
/// delete and re-create.
pub const TRAILER_UID: &str = "Quantops-Promotion-Uid";
/// Trailer with the promotion's `metadata.generation` at commit time.
pub const TRAILER_GENERATION: &str = "Quantops-Generation";
/// Trailer of a revert commit naming the reverted commit's SHA.
pub const TRAILER_REVERT_OF: &str = "Quantops-Revert-Of";
/// Trailer naming the variant served.
pub const TRAILER_VARIANT: &str = "Quantops-Variant";
/// Trailer naming the environment.
pub const TRAILER_ENVIRONMENT: &str = "Quantops-Environment";

/// The promotion a commit belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromotionId {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
}

/// Everything the message of a promotion commit says.
#[derive(Clone, Debug, PartialEq)]
pub struct PromotionMessage<'a> {
    pub promotion: &'a PromotionId,
    pub variant: &'a str,
    pub environment: Environment,
    /// The serving folder written, `envs/{env}/{model}`.
    pub folder: &'a str,
    pub gates: &'a [GateResult],
}

/// Keeps a value on one line so it cannot break the message's structure.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Numbers as people read them: up to four decimals, no trailing zeros.
fn number(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

fn trailers(promotion: &PromotionId) -> String {
    format!(
        "{TRAILER_PROMOTION}: {}/{}\n{TRAILER_UID}: {}\n{TRAILER_GENERATION}: {}\n",
        one_line(&promotion.namespace),
        one_line(&promotion.name),
        one_line(&promotion.uid),
        promotion.generation
    )
}

/// The subject of a promotion commit.
pub fn promotion_subject(variant: &str, environment: Environment) -> String {
    format!("Promote {} to {}", one_line(variant), environment.as_str())
}

/// The full message of a promotion commit.
pub fn promotion_message(m: &PromotionMessage<'_>) -> String {
    let p = m.promotion;
    let mut out = promotion_subject(m.variant, m.environment);
    out.push_str("\n\n");
    out.push_str(&format!(
        "ModelPromotion {}/{} (generation {}) serves {} in {} from {}/.\n\n",
        one_line(&p.namespace),
        one_line(&p.name),
        p.generation,
        one_line(m.variant),
        m.environment.as_str(),
        m.folder
    ));
    if m.gates.is_empty() {
        out.push_str("Gates: none recorded.\n");
    } else {
        let passed = m.gates.iter().filter(|g| g.passed).count();
        out.push_str(&format!("Gates ({passed}/{} passed):\n", m.gates.len()));
        for g in m.gates {
            let baseline = g
                .baseline
                .map(|b| format!(", baseline {}", number(b)))
                .unwrap_or_default();
            out.push_str(&format!(
                "- {} ({}): value {}, threshold {}{}: {}\n",
                one_line(&g.name),
                one_line(&g.metric),
                number(g.value),
                number(g.threshold),
                baseline,
                if g.passed { "pass" } else { "FAIL" }
            ));
        }
    }
    out.push('\n');
    out.push_str(&trailers(p));
    out.push_str(&format!(
        "{TRAILER_VARIANT}: {}\n{TRAILER_ENVIRONMENT}: {}\n",
        one_line(m.variant),
        m.environment.as_str()
    ));
    out
}

/// The message of a revert commit: git's own `Revert "<subject>"` form,
/// the reason, and the trailers.
pub fn revert_message(
    reverted_subject: &str,
    reverted_sha: &str,
    reason: &str,
    promotion: &PromotionId,
) -> String {
    let reason = reason.trim();
    let reason = if reason.is_empty() {
        "no reason given"
    } else {
        reason
    };
    format!(
        "Revert \"{}\"\n\nThis reverts commit {reverted_sha}.\n\nReason: {reason}\n\n{TRAILER_REVERT_OF}: {reverted_sha}\n{}",
        one_line(reverted_subject),
        trailers(promotion)
    )
}

/// The trailers of a commit message, in order (libgit2's parser, the same
/// rules as `git interpret-trailers`).
pub fn parse_trailers(message: &str) -> Vec<(String, String)> {
    match git2::message_trailers_strs(message) {
        Ok(trailers) => trailers
            .iter()
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn trailer<'t>(trailers: &'t [(String, String)], key: &str) -> Option<&'t str> {
    trailers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

fn same_promotion(trailers: &[(String, String)], promotion: &PromotionId) -> bool {
    trailer(trailers, TRAILER_UID) == Some(promotion.uid.as_str())
        && trailer(trailers, TRAILER_GENERATION).and_then(|g| g.parse::<i64>().ok())
            == Some(promotion.generation)
}

/// Whether a message is the promotion commit of this promotion's UID and
/// generation (and not a revert, which carries the same trailers).
pub fn is_promotion_commit(message: &str, promotion: &PromotionId) -> bool {
    let t = parse_trailers(message);
    same_promotion(&t, promotion) && trailer(&t, TRAILER_REVERT_OF).is_none()
}

/// Whether a message is this promotion's revert of `sha`.
pub fn is_revert_of(message: &str, sha: &str, promotion: &PromotionId) -> bool {
    let t = parse_trailers(message);
    trailer(&t, TRAILER_UID) == Some(promotion.uid.as_str())
        && trailer(&t, TRAILER_REVERT_OF).is_some_and(|s| s.eq_ignore_ascii_case(sha))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn promotion() -> PromotionId {
        PromotionId {
            namespace: "experiment".to_string(),
            name: "tiny-llama-to-test".to_string(),
            uid: "6f1c1e9e-0000-4000-8000-000000000001".to_string(),
            generation: 3,
        }
    }

    fn gates() -> Vec<GateResult> {
        vec![
            GateResult {
                name: "perplexity".to_string(),
                metric: "perplexity".to_string(),
                baseline: Some(32.475),
                value: 32.715,
                threshold: 33.449_26,
                passed: true,
            },
            GateResult {
                name: "system-tests".to_string(),
                metric: "pass_rate".to_string(),
                baseline: None,
                value: 0.875,
                threshold: 0.8,
                passed: true,
            },
        ]
    }

    #[test]
    fn promotion_message_names_variant_gates_and_promotion() {
        let p = promotion();
        let g = gates();
        let msg = promotion_message(&PromotionMessage {
            promotion: &p,
            variant: "tiny-llama-v1.2-int4-gptq-g128-asym",
            environment: Environment::Test,
            folder: "envs/test/tiny-llama",
            gates: &g,
        });
        let subject = msg.lines().next().expect("subject");
        assert_eq!(
            subject,
            "Promote tiny-llama-v1.2-int4-gptq-g128-asym to test"
        );
        assert!(msg.contains(
            "- perplexity (perplexity): value 32.715, threshold 33.4493, baseline 32.475: pass\n"
        ));
        assert!(msg.contains("- system-tests (pass_rate): value 0.875, threshold 0.8: pass\n"));
        assert!(msg.contains("ModelPromotion experiment/tiny-llama-to-test (generation 3)"));
        let t = parse_trailers(&msg);
        assert_eq!(
            trailer(&t, TRAILER_PROMOTION),
            Some("experiment/tiny-llama-to-test")
        );
        assert_eq!(trailer(&t, TRAILER_UID), Some(p.uid.as_str()));
        assert_eq!(trailer(&t, TRAILER_GENERATION), Some("3"));
        assert!(is_promotion_commit(&msg, &p));
        let mut next = p.clone();
        next.generation = 4;
        assert!(!is_promotion_commit(&msg, &next));
    }

    #[test]
    fn revert_message_is_recognised_and_not_a_promotion() {
        let p = promotion();
        let msg = revert_message(
            "Promote x to prod",
            "0123456789abcdef0123456789abcdef01234567",
            "canary analysis failed: error-rate 0.2 > 0.01\nsecond line",
            &p,
        );
        assert!(msg.starts_with("Revert \"Promote x to prod\"\n\nThis reverts commit 0123"));
        assert!(is_revert_of(
            &msg,
            "0123456789abcdef0123456789abcdef01234567",
            &p
        ));
        assert!(!is_revert_of(&msg, "ffff", &p));
        assert!(!is_promotion_commit(&msg, &p));
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(33.449_26), "33.4493");
        assert_eq!(number(-0.00001), "0");
    }
}
