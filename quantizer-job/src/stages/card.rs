//! The card stage: the model card and its chart from `report.json`.

use super::{StageInput, read_json, summary_from_report};
use crate::card;
use crate::layout::files;
use anyhow::Context;
use quantops_api::{Report, StageSummary};

pub fn run(input: &StageInput) -> anyhow::Result<StageSummary> {
    let report: Report = read_json(&input.layout.artifact_file(files::REPORT), "validate")?;
    let card_path = input.layout.artifact_file(files::CARD);
    std::fs::write(&card_path, card::render(input.spec, &report))
        .with_context(|| format!("cannot write {}", card_path.display()))?;
    let chart_path = input.layout.artifact_file(card::CHART_FILE);
    std::fs::write(
        &chart_path,
        card::svg::gates_chart(&report.variant, &report.gates),
    )
    .with_context(|| format!("cannot write {}", chart_path.display()))?;
    tracing::info!(card = %card_path.display(), "model card written");
    Ok(summary_from_report(input, &report))
}
