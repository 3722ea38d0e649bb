//! The model card: the artifact's `README.md` with Hugging Face front matter
//! (`base_model`, `base_model_relation: quantized`, tags), so the hub and
//! model registries show the lineage, plus everything a reviewer asks before
//! serving it: the recipe, the calibration data, every gate with baseline,
//! value and threshold, size and timings, and the limits of what was measured.

pub mod svg;

use crate::loadtest::Report as LoadReport;
use crate::quant::{FloatDtype, WeightScheme};
use crate::report_sections::{self, ArtifactFacts, CalibrationFacts, ModelFacts};
use crate::stages::serving_speed::ServingSpeed;
use quantops_api::{Method, QuantizedModelSpec, Report, variant};
use std::fmt::Write;
use svg::format_value;

/// File name of the chart written beside the card.
pub const CHART_FILE: &str = "metrics.svg";

/// Renders the card from the spec and the validation report.
pub fn render(spec: &QuantizedModelSpec, report: &Report) -> String {
    let q = &spec.quantization;
    let model: Option<ModelFacts> = report_sections::get(report, report_sections::MODEL);
    let artifact: Option<ArtifactFacts> = report_sections::get(report, report_sections::ARTIFACT);
    let calibration: Option<CalibrationFacts> =
        report_sections::get(report, report_sections::CALIBRATION);
    let mut md = String::new();

    let _ = writeln!(md, "---");
    let _ = writeln!(md, "base_model: {}", spec.base_model.name);
    let _ = writeln!(md, "base_model_relation: quantized");
    let _ = writeln!(md, "library_name: transformers");
    let _ = writeln!(md, "pipeline_tag: text-generation");
    let _ = writeln!(md, "tags:");
    for tag in tags(spec) {
        let _ = writeln!(md, "- {tag}");
    }
    let _ = writeln!(md, "---\n");

    let verdict = if report.overall_pass {
        "passed"
    } else {
        "FAILED"
    };
    let _ = writeln!(md, "# {}\n", report.variant);
    let _ = writeln!(
        md,
        "{} quantized to {} with {} ({}) by quantops. Validation gates: **{verdict}**.\n",
        spec.base_model.name,
        scheme_name(spec),
        q.method.as_str().to_uppercase(),
        grouping(spec),
    );

    let _ = writeln!(md, "## Base model\n");
    let _ = writeln!(md, "| | |\n| --- | --- |");
    let _ = writeln!(md, "| name | `{}` |", spec.base_model.name);
    if let Some(m) = &model {
        let _ = writeln!(
            md,
            "| architecture | {} ({} layers) |",
            m.architecture, m.layers
        );
        let _ = writeln!(md, "| parameters | {} |", m.parameters);
        let _ = writeln!(md, "| size | {} ({}) |", human_bytes(m.size_bytes), m.dtype);
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Quantization\n");
    let _ = writeln!(md, "| setting | value |\n| --- | --- |");
    let _ = writeln!(md, "| method | {} |", q.method);
    let _ = writeln!(md, "| weight bits | {} |", q.bits);
    let _ = writeln!(md, "| grouping | {} |", grouping(spec));
    if matches!(q.method, Method::Rtn | Method::Gptq | Method::Awq) {
        let _ = writeln!(md, "| symmetric | {} |", q.symmetric);
    }
    if q.method == Method::Gptq {
        let _ = writeln!(md, "| act-order | {} |", q.act_order);
        let _ = writeln!(md, "| dampening | {} |", q.damp_percent);
    }
    let ignored = if q.ignore.is_empty() {
        "none".to_string()
    } else {
        q.ignore.join(", ")
    };
    let _ = writeln!(md, "| left in full precision | {ignored} |");
    let _ = writeln!(md, "| activations | not quantized (weight-only) |");
    let _ = writeln!(
        md,
        "| checkpoint format | compressed-tensors (`{}`) |",
        format_name(spec)
    );
    let _ = writeln!(
        md,
        "\nThe full recipe is in `recipe.yaml` beside this card.\n"
    );

    let _ = writeln!(md, "## Calibration data\n");
    match (&calibration, &spec.calibration) {
        (Some(c), _) => {
            let _ = writeln!(
                md,
                "{} samples of {} tokens drawn with seed {} from `{}` (unique-token ratio {:.2}).\n",
                c.samples, c.sequence_length, c.seed, c.path, c.unique_token_ratio
            );
        }
        (None, Some(c)) => {
            let _ = writeln!(
                md,
                "Configured: {} samples of {} tokens from `{}`.\n",
                c.samples, c.sequence_length, c.path
            );
        }
        (None, None) => {
            let _ = writeln!(md, "None: {} needs no calibration data.\n", q.method);
        }
    }

    let _ = writeln!(md, "## Accuracy\n");
    if let Some(e) = &spec.validation.eval_text {
        let _ = writeln!(
            md,
            "Perplexity is token-level (exp of the mean next-token NLL) over at most {} non-overlapping windows of {} tokens of `{}`, for the baseline and the quantized weights alike.\n",
            e.max_windows, e.window_tokens, e.path
        );
    }
    let _ = writeln!(
        md,
        "| gate | metric | baseline | quantized | threshold | verdict |"
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- |");
    for g in &report.gates {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            g.name,
            g.metric,
            g.baseline.map(format_value).unwrap_or_else(|| "-".into()),
            format_value(g.value),
            format_value(g.threshold),
            if g.passed { "pass" } else { "**fail**" }
        );
    }
    if let (Some(b), Some(v)) = (report.baseline.perplexity, report.quantized.perplexity) {
        let _ = writeln!(md, "\nPerplexity change: {}.", percent_change(b, v));
    }
    let _ = writeln!(md, "\n![baseline against quantized]({CHART_FILE})\n");

    let _ = writeln!(md, "## Performance\n");
    let _ = writeln!(md, "| figure | value |\n| --- | --- |");
    if let Some(a) = &artifact {
        let _ = writeln!(md, "| artifact size | {} |", human_bytes(a.size_bytes));
        if let Some(m) = &model
            && a.size_bytes > 0
        {
            let _ = writeln!(
                md,
                "| size vs base | {:.2}x smaller |",
                m.size_bytes as f64 / a.size_bytes as f64
            );
        }
        let _ = writeln!(md, "| weights digest | `{}` |", a.digest);
    }
    for (stage, seconds) in &report.timings_s {
        let _ = writeln!(md, "| {stage} time | {seconds:.1} s |");
    }
    let _ = writeln!(md);
    if let Some(speed) = report_sections::get(report, report_sections::SERVING_SPEED) {
        serving_speed(&mut md, &speed);
    }

    let _ = writeln!(md, "## Usage\n");
    let _ = writeln!(
        md,
        "```bash\nvllm serve ./{} --quantization compressed-tensors\n```\n",
        report.variant
    );
    let _ = writeln!(
        md,
        "transformers loads it as well, with the `compressed-tensors` package installed.\n"
    );

    let _ = writeln!(md, "## Recommendations and known limitations\n");
    for line in recommendations(spec, report) {
        let _ = writeln!(md, "- {line}");
    }
    md
}

/// How one row of the serving-speed table reads a load test.
type Figure = fn(&LoadReport) -> String;

/// The validation load test, baseline against variant.
fn serving_speed(md: &mut String, s: &ServingSpeed) {
    let b = &s.baseline;
    let _ = writeln!(
        md,
        "Serving speed, measured by the validation stage: {} requests of {} prompt and {} output tokens, {} at a time, against the worker's own server (dequantized weights on the validate machine, not vLLM's kernels).\n",
        b.requests,
        b.prompt_tokens_target,
        b.max_tokens,
        b.concurrency.unwrap_or(1)
    );
    let _ = writeln!(md, "| figure | baseline | quantized |\n| --- | --- | --- |");
    let rows: [(&str, Figure); 5] = [
        ("output tokens/s", |r| {
            format!("{:.1}", r.output_tokens_per_s)
        }),
        ("requests/s", |r| format!("{:.2}", r.requests_per_s)),
        ("time to first token p50", |r| ms(r.ttft_s.p50)),
        ("inter-token latency p50", |r| ms(r.itl_s.p50)),
        ("end-to-end latency p50", |r| ms(r.e2e_s.p50)),
    ];
    for (name, value) in rows {
        let _ = writeln!(md, "| {name} | {} | {} |", value(b), value(&s.quantized));
    }
    let _ = writeln!(
        md,
        "\nThroughput ratio (quantized / baseline): {:.2}; median latency speed-up: {:.2}.\n",
        s.throughput_ratio, s.latency_speedup
    );
}

fn ms(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1e3)
}

/// Hub tags: the tool, the format, the method and the scheme.
fn tags(spec: &QuantizedModelSpec) -> Vec<String> {
    vec![
        "quantops".to_string(),
        "compressed-tensors".to_string(),
        spec.quantization.method.as_str().to_string(),
        variant::precision(&spec.quantization),
        scheme_name(spec).to_lowercase(),
    ]
}

/// The vLLM-style scheme name: weight bits and activation bits.
fn scheme_name(spec: &QuantizedModelSpec) -> String {
    match spec.quantization.method {
        Method::Fp8 => "FP8 (W8A16)".to_string(),
        _ => format!("W{}A16", spec.quantization.bits),
    }
}

fn grouping(spec: &QuantizedModelSpec) -> String {
    let q = &spec.quantization;
    if q.group_size > 0 && q.method != Method::Fp8 {
        format!("groups of {} columns", q.group_size)
    } else {
        "one scale per output channel".to_string()
    }
}

/// The compressed-tensors format the recipe is written in.
fn format_name(spec: &QuantizedModelSpec) -> &'static str {
    let scheme = WeightScheme::from_spec(&spec.quantization, FloatDtype::F16);
    crate::format::compressed_tensors::format_name(&scheme)
}

fn percent_change(base: f64, value: f64) -> String {
    if base > 0.0 {
        format!(
            "{:+.2}% ({} → {})",
            (value / base - 1.0) * 100.0,
            format_value(base),
            format_value(value)
        )
    } else {
        "n/a".to_string()
    }
}

/// What a reviewer should know before serving the variant, derived from the
/// recipe and the verdicts rather than written by hand.
fn recommendations(spec: &QuantizedModelSpec, report: &Report) -> Vec<String> {
    let q = &spec.quantization;
    let mut out = Vec::new();
    if report.overall_pass {
        out.push("All gates passed: eligible for promotion to test.".to_string());
    } else {
        let failed: Vec<&str> = report
            .gates
            .iter()
            .filter(|g| !g.passed)
            .map(|g| g.name.as_str())
            .collect();
        let remedy = if matches!(q.method, Method::Rtn) {
            "Try GPTQ or AWQ, more bits or a smaller group size."
        } else {
            "Try more bits, a smaller group size or more calibration samples."
        };
        out.push(format!(
            "Do not promote: failed gate(s) {}. {remedy}",
            if failed.is_empty() {
                "none evaluated".to_string()
            } else {
                failed.join(", ")
            }
        ));
    }
    if q.bits < 4 && matches!(q.method, Method::Rtn | Method::Gptq | Method::Awq) {
        out.push(format!(
            "{}-bit weights are for experiments; vLLM's fast kernels target 4 and 8 bits.",
            q.bits
        ));
    }
    if q.method == Method::Fp8 {
        out.push("FP8 weights run natively on Hopper and Ada GPUs; older GPUs fall back to weight-only kernels.".to_string());
    } else {
        out.push(
            "Weight-only quantization: memory and bandwidth shrink, activations stay in 16 bits."
                .to_string(),
        );
    }
    if q.method.needs_calibration() {
        out.push("Quality depends on the calibration text: recalibrate on in-domain text if the serving traffic differs.".to_string());
    }
    if let Some(e) = &spec.validation.eval_text {
        out.push(format!(
            "The perplexity figures cover at most {} windows of {} tokens of one text; they bound the change on that domain only.",
            e.max_windows, e.window_tokens
        ));
    }
    out
}

/// Bytes as KiB, MiB or GiB, for people.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantops_api::GateResult;
    use quantops_api::spec_file::parse_quantized_model;

    #[test]
    fn card_has_front_matter_gates_and_recommendations() {
        let qm = parse_quantized_model(
            "apiVersion: quantops.dev/v1alpha1\nkind: QuantizedModel\nmetadata: {name: x}\nspec:\n  baseModel: {name: example/tiny-llama, path: m}\n  version: v1\n  quantization: {method: gptq, symmetric: false}\n  calibration: {path: c.txt, samples: 8, sequenceLength: 64}\n  validation: {evalText: {path: e.txt}}\n",
            "test",
        )
        .expect("valid spec");
        let mut report = Report {
            variant: "tiny-llama-v1-int4-gptq-g128-asym".into(),
            overall_pass: false,
            gates: vec![GateResult {
                name: "perplexity".into(),
                metric: "perplexity".into(),
                baseline: Some(29.0),
                value: 30.5,
                threshold: 29.87,
                passed: false,
            }],
            ..Report::default()
        };
        report.baseline.perplexity = Some(29.0);
        report.quantized.perplexity = Some(30.5);
        report_sections::set(
            &mut report,
            report_sections::MODEL,
            &ModelFacts {
                size_bytes: 4 << 20,
                ..ModelFacts::default()
            },
        );
        report_sections::set(
            &mut report,
            report_sections::ARTIFACT,
            &ArtifactFacts {
                size_bytes: 1 << 20,
                digest: "sha256:ab".into(),
                ..ArtifactFacts::default()
            },
        );
        let card = render(&qm.spec, &report);
        assert!(
            card.starts_with(
                "---\nbase_model: example/tiny-llama\nbase_model_relation: quantized\n"
            )
        );
        assert!(card.contains("- gptq") && card.contains("- w4a16"));
        assert!(
            card.contains("| perplexity | perplexity | 29.00 | 30.50 | 29.87 | **fail** |"),
            "{card}"
        );
        assert!(card.contains("+5.17%"));
        assert!(card.contains("4.00x smaller"));
        assert!(card.contains("Do not promote: failed gate(s) perplexity"));
        assert!(card.contains(CHART_FILE));
    }
}
