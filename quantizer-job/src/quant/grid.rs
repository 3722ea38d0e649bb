//! The integer grid: scale and zero point of one group (or channel), and the
//! rounding onto it, following compressed-tensors' `calculate_qparams` and
//! `quantize` so our checkpoints dequantize in vLLM/transformers exactly as
//! llm-compressor's do:
//!
//! - codes are signed, `q ∈ [-2^(b-1), 2^(b-1) - 1]` (e.g. `[-8, 7]` for 4 bits);
//! - the observed range always contains zero: `min = min(min, 0)`, `max = max(max, 0)`;
//! - symmetric: `scale = max(|min|, |max|) / ((2^b - 1) / 2)` (4 bits: absmax / 7.5,
//!   8 bits: absmax / 127.5), zero point 0;
//! - asymmetric: `scale = (max - min) / (2^b - 1)` (each operation rounded to the
//!   scale dtype, as torch computes on FP16 weights),
//!   `zp = round(clamp(qmin - min / scale, qmin, qmax))` (a signed integer);
//! - `q = clamp(round(x / scale) + zp, qmin, qmax)`, rounding half to even as `torch.round`;
//! - dequantized `x̂ = (q - zp) · scale`.
//!
//! The scale is rounded to the checkpoint's scale dtype *before* the zero point
//! and the codes are computed, so the dequantized weights we hand back equal,
//! bit for bit, what a reader computes from the stored tensors.

use super::{FloatDtype, IntScheme, QuantError};

/// Scale and zero point of one group of one output row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    /// Step size, already representable in the scheme's scale dtype.
    pub scale: f32,
    /// Signed integer zero point (0 for symmetric grids).
    pub zero: i32,
}

/// The signed code range `[qmin, qmax]` of a `bits`-wide integer.
pub fn qrange(bits: u8) -> (i32, i32) {
    let half = 1i32 << (bits - 1);
    (-half, half - 1)
}

impl FloatDtype {
    /// Rounds `v` to the nearest value this dtype represents (ties to even).
    pub fn round(self, v: f32) -> f32 {
        match self {
            FloatDtype::F16 => half::f16::from_f32(v).to_f32(),
            FloatDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            FloatDtype::F32 => v,
        }
    }

    /// Machine epsilon of the dtype: compressed-tensors replaces a zero scale by it.
    pub fn eps(self) -> f32 {
        match self {
            FloatDtype::F16 => half::f16::EPSILON.to_f32(),
            FloatDtype::Bf16 => half::bf16::EPSILON.to_f32(),
            FloatDtype::F32 => f32::EPSILON,
        }
    }
}

/// Checks bits and group size against a layer of `in_features` columns, and
/// returns the effective group size (`in_features` for per-channel).
pub fn validate(scheme: &IntScheme, layer: &str, in_features: usize) -> Result<usize, QuantError> {
    if !matches!(scheme.bits, 2 | 3 | 4 | 8) {
        return Err(QuantError::Unsupported {
            layer: layer.to_string(),
            field: "bits",
            value: scheme.bits.to_string(),
            expected: "2, 3, 4 or 8",
        });
    }
    match scheme.group_size {
        None => Ok(in_features),
        Some(g) if g > 0 && in_features.is_multiple_of(g) => Ok(g),
        Some(g) => Err(QuantError::GroupSize {
            layer: layer.to_string(),
            in_features,
            group_size: g,
        }),
    }
}

/// Grid parameters of a group whose values span `[min, max]`.
pub fn params_from_range(min: f32, max: f32, scheme: &IntScheme) -> GroupParams {
    let (qmin, qmax) = qrange(scheme.bits);
    let min = min.min(0.0);
    let max = max.max(0.0);
    let levels = ((1u32 << scheme.bits) - 1) as f32;
    // Every operation rounds to the scale dtype, as torch does on weights of that
    // dtype: llm-compressor's scales of an FP16 model are `f16(f16(max − min) / 15)`.
    let d = scheme.scale_dtype;
    let raw = if scheme.symmetric {
        (-min).max(max) / (levels / 2.0)
    } else {
        d.round(max - min) / levels
    };
    let mut scale = d.round(raw);
    if scale == 0.0 {
        scale = d.eps();
    }
    let zero = if scheme.symmetric {
        0
    } else {
        let z = d
            .round(qmin as f32 - d.round(min / scale))
            .clamp(qmin as f32, qmax as f32);
        z.round_ties_even() as i32
    };
    GroupParams { scale, zero }
}

/// Grid parameters of a slice of weights (its min/max).
pub fn params_of(values: &[f32], scheme: &IntScheme) -> GroupParams {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if values.is_empty() {
        (lo, hi) = (0.0, 0.0);
    }
    params_from_range(lo, hi, scheme)
}

/// The code of `x` on the grid `p`.
#[inline]
pub fn quantize(x: f32, p: GroupParams, bits: u8) -> i32 {
    let (qmin, qmax) = qrange(bits);
    ((x / p.scale).round_ties_even() as i32 + p.zero).clamp(qmin, qmax)
}

/// The value a code stands for, computed exactly as the reader does.
#[inline]
pub fn dequantize(q: i32, p: GroupParams) -> f32 {
    (q - p.zero) as f32 * p.scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme(bits: u8, symmetric: bool) -> IntScheme {
        IntScheme {
            bits,
            symmetric,
            group_size: None,
            scale_dtype: FloatDtype::F32,
        }
    }

    #[test]
    fn ranges_match_compressed_tensors() {
        assert_eq!(qrange(4), (-8, 7));
        assert_eq!(qrange(8), (-128, 127));
        assert_eq!(qrange(3), (-4, 3));
        assert_eq!(qrange(2), (-2, 1));
    }

    #[test]
    fn symmetric_scale_is_absmax_over_half_levels() {
        let p = params_of(&[-1.5, 0.3, 0.75], &scheme(4, true));
        assert_eq!(p.scale, 1.5 / 7.5);
        assert_eq!(p.zero, 0);
        // -1.5 / 0.2 = -7.5 rounds (half to even) to -8: representable.
        assert_eq!(quantize(-1.5, p, 4), -8);
        assert_eq!(quantize(1.5, p, 4), 7);
    }

    #[test]
    fn asymmetric_zero_point_is_signed_and_clamped() {
        // Range [0, 1.5] (min clamped to 0): scale 0.1, zp = -8 - 0 = -8.
        let p = params_of(&[0.2, 1.5], &scheme(4, false));
        assert!((p.scale - 0.1).abs() < 1e-7);
        assert_eq!(p.zero, -8);
        assert_eq!(quantize(1.5, p, 4), 7);
        assert_eq!(quantize(0.0, p, 4), -8);
        // Range [-1, 0.5]: scale 0.1, zp = -8 + 10 = 2.
        let p = params_of(&[-1.0, 0.5], &scheme(4, false));
        assert_eq!(p.zero, 2);
        assert!((dequantize(quantize(-1.0, p, 4), p) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn zero_group_gets_eps_scale() {
        let p = params_of(&[0.0; 4], &scheme(4, false));
        assert_eq!(p.scale, f32::EPSILON);
        assert_eq!(quantize(0.0, p, 4) - p.zero, 0);
    }

    #[test]
    fn indivisible_group_names_the_layer() {
        let s = IntScheme {
            group_size: Some(128),
            ..scheme(4, true)
        };
        let err = validate(&s, "model.layers.0.mlp.down_proj", 1000).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("down_proj") && msg.contains("1000") && msg.contains("128"));
    }
}
