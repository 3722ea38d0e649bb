//! quantizer-job library: the quantization algorithms and the
//! compressed-tensors checkpoint writer and reader used by the worker binary.

pub mod format;
pub mod quant;
