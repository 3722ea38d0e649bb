//! The model card's chart: one small panel per gate, baseline against the
//! quantized value with the threshold marked, each panel on its own scale
//! (a perplexity and a rate share no axis). Plain SVG, so it renders on the
//! Hugging Face hub, in GitHub and in any browser without scripts.

use quantops_api::GateResult;
use std::fmt::Write;

const WIDTH: f64 = 640.0;
const PANEL_HEIGHT: f64 = 64.0;
const LABEL_WIDTH: f64 = 170.0;
const BAR_HEIGHT: f64 = 16.0;
const BASELINE_COLOUR: &str = "#8c8c8c";
const PASS_COLOUR: &str = "#2b7bb9";
const FAIL_COLOUR: &str = "#d62728";
const NOTE_COLOUR: &str = "#555555";

/// Renders the gates as a bar chart; an empty gate list gives a chart that says so.
pub fn gates_chart(title: &str, gates: &[GateResult]) -> String {
    let height = 40.0 + PANEL_HEIGHT * gates.len().max(1) as f64 + 24.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    if gates.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="10" y="60">No gates were evaluated.</text>"#
        );
    }
    for (i, gate) in gates.iter().enumerate() {
        panel(&mut svg, 40.0 + PANEL_HEIGHT * i as f64, gate);
    }
    let legend_y = height - 12.0;
    let _ = writeln!(
        svg,
        r#"<rect x="10" y="{}" width="10" height="10" fill="{BASELINE_COLOUR}"/><text x="24" y="{legend_y}">baseline (FP16)</text><rect x="130" y="{}" width="10" height="10" fill="{PASS_COLOUR}"/><text x="144" y="{legend_y}">quantized, gate passed</text><rect x="300" y="{}" width="10" height="10" fill="{FAIL_COLOUR}"/><text x="314" y="{legend_y}">quantized, gate failed</text><line x1="470" x2="470" y1="{}" y2="{}" stroke="black" stroke-dasharray="3,2"/><text x="476" y="{legend_y}">threshold</text>"#,
        legend_y - 9.0,
        legend_y - 9.0,
        legend_y - 9.0,
        legend_y - 11.0,
        legend_y + 1.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, top: f64, gate: &GateResult) {
    let values = [gate.baseline.unwrap_or(0.0), gate.value, gate.threshold];
    let max = values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let scale = if max > 0.0 {
        (WIDTH - LABEL_WIDTH - 80.0) / (max * 1.05)
    } else {
        0.0
    };
    let x0 = LABEL_WIDTH;
    let _ = writeln!(
        svg,
        r#"<text x="10" y="{}" font-weight="bold">{}</text><text x="10" y="{}" fill="{NOTE_COLOUR}">{}</text>"#,
        top + 16.0,
        escape(&gate.name),
        top + 32.0,
        escape(&gate.metric)
    );
    if let Some(base) = gate.baseline {
        bar(svg, x0, top + 4.0, base * scale, BASELINE_COLOUR, base);
    }
    let colour = if gate.passed {
        PASS_COLOUR
    } else {
        FAIL_COLOUR
    };
    bar(
        svg,
        x0,
        top + 8.0 + BAR_HEIGHT,
        gate.value * scale,
        colour,
        gate.value,
    );
    let tx = x0 + gate.threshold * scale;
    if tx.is_finite() {
        let _ = writeln!(
            svg,
            r#"<line x1="{tx:.1}" x2="{tx:.1}" y1="{}" y2="{}" stroke="black" stroke-dasharray="3,2"/>"#,
            top,
            top + 12.0 + 2.0 * BAR_HEIGHT
        );
    }
}

fn bar(svg: &mut String, x: f64, y: f64, width: f64, colour: &str, value: f64) {
    let width = if width.is_finite() {
        width.max(0.0)
    } else {
        0.0
    };
    let _ = writeln!(
        svg,
        r#"<rect x="{x:.1}" y="{y:.1}" width="{width:.1}" height="{BAR_HEIGHT}" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
        x + width + 4.0,
        y + BAR_HEIGHT - 4.0,
        format_value(value)
    );
}

/// Four significant figures: enough to see a 0.1% perplexity change.
pub fn format_value(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_string();
    }
    if value.abs() >= 100.0 {
        format!("{value:.1}")
    } else if value.abs() >= 10.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_panel_per_gate_and_marks_failures() {
        let gates = vec![
            GateResult {
                name: "perplexity".into(),
                metric: "perplexity".into(),
                baseline: Some(29.0),
                value: 29.2,
                threshold: 29.87,
                passed: true,
            },
            GateResult {
                name: "task:<even>".into(),
                metric: "accuracy".into(),
                baseline: Some(0.8),
                value: 0.5,
                threshold: 0.76,
                passed: false,
            },
        ];
        let svg = gates_chart("tiny-llama", &gates);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("task:&lt;even&gt;"), "names are escaped");
        assert!(svg.contains(">29.20<") && svg.contains(">29.00<"));
        assert_eq!(
            svg.matches(FAIL_COLOUR).count(),
            2,
            "one failed bar plus the legend"
        );
    }
}
