//! The quantops worker: the stages the operator's Jobs run.
pub mod card;
pub mod gates;
pub mod report_sections;
