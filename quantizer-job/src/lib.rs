//! The quantops worker: the stages the operator's Jobs run. The algorithms
//! (`quant`), the checkpoint format (`format`) and the model sit behind
//! plain data types so that a GPU backend plugs into the same pipeline.

pub mod artifact;
pub mod card;
pub mod format;
pub mod gates;
pub mod layout;
pub mod progress;
pub mod quant;
pub mod report_sections;
pub mod sequential;
pub mod stages;
pub mod termination;
