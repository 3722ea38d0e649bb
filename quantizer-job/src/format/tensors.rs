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
        FloatDtype::F16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        FloatDtype::Bf16 => data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        FloatDtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub(crate) fn i32_bytes(data: &[i32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
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
