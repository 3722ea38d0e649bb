//! Dense tensors and the byte conversions between f32 and stored dtypes.

use safetensors::Dtype;

use super::FormatError;
use crate::quant::FloatDtype;

/// An unquantized tensor, held as f32 whatever its stored dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// An unquantized tensor as the writer takes it. Most of a checkpoint's
/// dense bytes (the embedding above all) are copied from the base model
/// unchanged, so they go out as stored instead of being widened to f32 and
/// rounded back; values the worker computed (AWQ's folded norms) are rounded
/// to the checkpoint's dtype.
#[derive(Clone, Debug)]
pub enum DenseInput<'a> {
    /// Values to round to the checkpoint's dtype.
    Values(DenseTensor),
    /// Bytes of a source checkpoint, written as they are when their dtype is
    /// the checkpoint's, converted otherwise.
    Stored {
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: &'a [u8],
    },
}

impl From<DenseTensor> for DenseInput<'_> {
    fn from(t: DenseTensor) -> Self {
        Self::Values(t)
    }
}

pub(crate) fn float_dtype(d: FloatDtype) -> Dtype {
    match d {
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::Bf16 => Dtype::BF16,
        FloatDtype::F32 => Dtype::F32,
    }
}

/// Little-endian bytes of `data` in the float dtype `d` (rounding to nearest even).
pub(crate) fn floats_to_bytes(data: &[f32], d: FloatDtype) -> Vec<u8> {
    match d {
        FloatDtype::F16 => le_bytes(data, |v| half::f16::from_f32(*v).to_le_bytes()),
        FloatDtype::Bf16 => le_bytes(data, |v| half::bf16::from_f32(*v).to_le_bytes()),
        FloatDtype::F32 => le_bytes(data, |v| v.to_le_bytes()),
    }
}

pub(crate) fn i32_bytes(data: &[i32]) -> Vec<u8> {
    le_bytes(data, |v| v.to_le_bytes())
}

/// Each value's `N` bytes into one buffer sized up front (a `flat_map`
/// collect grows its buffer step by step, which dominated writing a large
/// tensor).
fn le_bytes<T, const N: usize>(data: &[T], bytes: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    let mut out = vec![0u8; data.len() * N];
    for (chunk, v) in out.chunks_exact_mut(N).zip(data) {
        chunk.copy_from_slice(&bytes(v));
    }
    out
}

/// Floats of a stored F16/BF16/F32 tensor.
pub(crate) fn bytes_to_floats(name: &str, dtype: Dtype, b: &[u8]) -> Result<Vec<f32>, FormatError> {
    Ok(match dtype {
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => {
            return Err(FormatError::Dtype {
                name: name.to_string(),
                expected: "F16, BF16 or F32".to_string(),
                got: format!("{other:?}"),
            });
        }
    })
}

/// Integers of a stored I8/I32/I64 tensor.
pub(crate) fn bytes_to_ints(name: &str, dtype: Dtype, b: &[u8]) -> Result<Vec<i64>, FormatError> {
    Ok(match dtype {
        Dtype::I8 => b.iter().map(|v| i64::from(*v as i8)).collect(),
        Dtype::I32 => b
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        other => {
            return Err(FormatError::Dtype {
                name: name.to_string(),
                expected: "I8, I32 or I64".to_string(),
                got: format!("{other:?}"),
            });
        }
    })
}
