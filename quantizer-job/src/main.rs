//! The worker binary; the pipeline and CLI are wired in by the integration
//! branch. The library (`quantizer_job::quant`, `quantizer_job::format`) holds
//! the quantization algorithms and the checkpoint writer and reader.

fn main() {}
