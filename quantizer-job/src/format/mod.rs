//! Checkpoint formats: the compressed-tensors writer and reader.
