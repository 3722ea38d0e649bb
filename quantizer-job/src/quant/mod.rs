//! Weight quantization behind one backend seam.
//!
//! The pipeline talks to [`QuantBackend`]: it feeds each Linear's captured input
//! activations (`[n, in]` f32) into a [`Hessian`], then asks for one
//! [`QuantizedLinear`] per layer. [`CpuBackend`] implements it with rayon; a
//! cudarc backend implements the same trait over device buffers later, and the
//! CPU twin stays the reference it is tested against.
//!
//! Every [`QuantizedLinear`] carries both the integer (or FP8) codes that the
//! checkpoint writer stores and the `dequantized` weight that the pipeline puts
//! back into the model so the next layers calibrate on quantized outputs.

pub(crate) mod awq;
mod error;
mod fp8;
mod gptq;
pub mod grid;
mod hessian;
mod linalg;
mod matrix;
mod rtn;

pub use awq::{
    AwqConfig, AwqMapping, AwqResult, ScaleSink, awq_search, fold_into_linear, fold_into_norm,
    llama_awq_mappings,
};
pub use error::QuantError;
pub use fp8::{e4m3_to_f32, f32_to_e4m3, quantize_fp8};
pub use gptq::gptq;
pub use hessian::Hessian;
pub use matrix::{Matrix, dot, output_error};
pub use rtn::rtn;

use std::borrow::Cow;

use quantops_api::quantized_model::{Method, QuantizationSpec};

use crate::format::pack;

/// A floating-point storage dtype: of the scales (compressed-tensors: the model's dtype
/// unless `scale_dtype` says otherwise) and of the unquantized tensors. Scales are rounded to it while
/// quantizing so that stored and in-memory dequantization agree bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F16,
    Bf16,
    F32,
}

impl FloatDtype {
    /// The dtype's safetensors name (`F16`, `BF16`, `F32`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            FloatDtype::F16 => "F16",
            FloatDtype::Bf16 => "BF16",
            FloatDtype::F32 => "F32",
        }
    }
}

/// An integer weight grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntScheme {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    /// Symmetric (zero point 0) or asymmetric (min-max with a zero point).
    pub symmetric: bool,
    /// Columns per group; `None` = one group per output channel.
    pub group_size: Option<usize>,
    pub scale_dtype: FloatDtype,
}

/// GPTQ column order, in compressed-tensors' `actorder` vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActOrder {
    /// Columns in their natural order; group parameters fixed when a group starts.
    None,
    /// `actorder: static` (alias `weight`), what llm-compressor's reference used:
    /// group parameters come from the original weight in natural column order,
    /// columns are then processed by decreasing `diag(H)`. Groups stay
    /// contiguous, so no `g_idx` is stored and kernels need no reordering.
    Static,
    /// `actorder: group` (alias `dynamic`): groups are formed along the permuted
    /// order, parameters fixed when a group starts; column `c`'s group is `g_idx[c]`.
    Group,
}

impl ActOrder {
    /// The `actorder` value written into `quantization_config`.
    pub fn config_value(self) -> Option<&'static str> {
        match self {
            ActOrder::None => None,
            ActOrder::Static => Some("static"),
            ActOrder::Group => Some("group"),
        }
    }
}

/// How a Linear's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightScheme {
    Int(IntScheme),
    /// FP8 E4M3 with one scale per output channel.
    Fp8 {
        scale_dtype: FloatDtype,
    },
}

impl WeightScheme {
    /// The scheme a recipe asks for. INT8 is symmetric per channel whatever the
    /// recipe's grouping says (it is the W8A16 preset); FP8 is per channel.
    pub fn from_spec(spec: &QuantizationSpec, scale_dtype: FloatDtype) -> Self {
        let group_size = usize::try_from(spec.group_size).ok().filter(|g| *g > 0);
        match spec.method {
            Method::Fp8 => WeightScheme::Fp8 { scale_dtype },
            Method::Int8 => WeightScheme::Int(IntScheme {
                bits: 8,
                symmetric: true,
                group_size: None,
                scale_dtype,
            }),
            Method::Rtn | Method::Gptq | Method::Awq => WeightScheme::Int(IntScheme {
                bits: spec.bits,
                symmetric: spec.symmetric,
                group_size,
                scale_dtype,
            }),
        }
    }
}

/// Stored codes of one Linear, row-major `[out, in]`.
#[derive(Clone, Debug, PartialEq)]
pub enum Codes {
    /// Signed integer codes in `[-2^(b-1), 2^(b-1) - 1]`, one per byte.
    Int(Vec<i8>),
    /// Integer codes already packed the way the artifact stores them
    /// ([`crate::format::pack`]): the GPU packs on the device, so a 4-bit
    /// model's codes cross PCIe and wait for the writer at half a byte each.
    Packed(PackedCodes),
    /// FP8 E4M3 bit patterns.
    Fp8(Vec<u8>),
}

/// `pack-quantized` words of `bits`-bit codes: `[out, ceil(in / (32 / bits))]`
/// little-endian int32s, as bytes so that the writer stores them as they are.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedCodes {
    pub bits: u8,
    pub words: Vec<u8>,
}

impl Codes {
    /// The integer codes one per value (unpacked when packed), for
    /// comparisons and dequantization; `None` for FP8 and for codes that do
    /// not fill `[rows, cols]`.
    pub fn ints(&self, [rows, cols]: [usize; 2]) -> Option<Cow<'_, [i8]>> {
        match self {
            Codes::Int(codes) if codes.len() == rows * cols => Some(Cow::Borrowed(codes)),
            Codes::Packed(p)
                if pack::packs(p.bits)
                    && p.words.len() == 4 * rows * cols.div_ceil(pack::pack_factor(p.bits)) =>
            {
                Some(Cow::Owned(pack::unpack_row_bytes(
                    &p.words, rows, cols, p.bits,
                )))
            }
            _ => None,
        }
    }
}

/// One quantized Linear: what the writer stores and what the model continues with.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLinear {
    /// `[out_features, in_features]`.
    pub shape: [usize; 2],
    pub scheme: WeightScheme,
    pub act_order: ActOrder,
    pub codes: Codes,
    /// `[out, groups]` (`groups = 1` per channel), values exact in the scale dtype.
    pub scales: Matrix,
    /// `[out, groups]` signed zero points; `None` for symmetric grids and FP8.
    pub zero_points: Option<Vec<i8>>,
    /// Group of each input column (only for [`ActOrder::Group`]).
    pub g_idx: Option<Vec<i32>>,
    /// `(q - zp) · scale` (or `fp8(q) · scale`), bit-identical to what the reader returns.
    /// Empty (0 × 0) when the GPU pipeline kept it on the device, where the
    /// model continues with it; the writer only reads codes and scales.
    pub dequantized: Matrix,
}

impl QuantizedLinear {
    /// How many codes differ from `other`'s, packed or not; `None` when the
    /// two cannot be compared (other shape, integer against FP8).
    pub fn codes_differing(&self, other: &QuantizedLinear) -> Option<usize> {
        if self.shape != other.shape {
            return None;
        }
        fn count<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
            (a.len() == b.len()).then(|| a.iter().zip(b).filter(|(x, y)| x != y).count())
        }
        match (&self.codes, &other.codes) {
            (Codes::Fp8(a), Codes::Fp8(b)) => count(a, b),
            (a, b) => count(&a.ints(self.shape)?, &b.ints(self.shape)?),
        }
    }

    /// Recomputes the weight from the stored codes, scales, zero points and
    /// `g_idx` (what a kernel or a reader does), independent of `dequantized`.
    pub fn dequantize_codes(&self) -> Result<Matrix, QuantError> {
        let [out, inp] = self.shape;
        let groups = self.scales.cols.max(1);
        let group_size = inp / groups;
        let mut data = vec![0.0f32; out * inp];
        match &self.codes {
            Codes::Fp8(codes) => {
                for (k, (d, b)) in data.iter_mut().zip(codes).enumerate() {
                    *d = e4m3_to_f32(*b) * self.scales.data[k / inp];
                }
            }
            Codes::Int(_) | Codes::Packed(_) => {
                let codes = self
                    .codes
                    .ints(self.shape)
                    .ok_or_else(|| QuantError::Shape {
                        what: "integer codes".to_string(),
                        expected: format!("{out} × {inp} codes"),
                        got: "codes that do not fill the shape".to_string(),
                    })?;
                for r in 0..out {
                    for c in 0..inp {
                        let g = match &self.g_idx {
                            Some(idx) => idx[c] as usize,
                            None => c / group_size,
                        };
                        let k = r * groups + g;
                        let zp = self.zero_points.as_ref().map_or(0, |z| i32::from(z[k]));
                        data[r * inp + c] =
                            (i32::from(codes[r * inp + c]) - zp) as f32 * self.scales.data[k];
                    }
                }
            }
        }
        Matrix::new(out, inp, data)
    }
}

/// Builds a [`QuantizedLinear`] from integer codes and per-(row, group) grids,
/// computing the dequantized weight with the stored (rounded) scales.
pub(crate) fn assemble_int(
    shape: [usize; 2],
    scheme: IntScheme,
    act_order: ActOrder,
    codes: Vec<i32>,
    params: &[grid::GroupParams],
    groups: usize,
    g_idx: Option<Vec<i32>>,
) -> Result<QuantizedLinear, QuantError> {
    let [out, inp] = shape;
    let group_size = inp / groups;
    let mut deq = vec![0.0f32; out * inp];
    for r in 0..out {
        for c in 0..inp {
            let g = match &g_idx {
                Some(idx) => idx[c] as usize,
                None => c / group_size,
            };
            deq[r * inp + c] = grid::dequantize(codes[r * inp + c], params[r * groups + g]);
        }
    }
    let scales = Matrix::new(out, groups, params.iter().map(|p| p.scale).collect())?;
    let zero_points =
        (!scheme.symmetric).then(|| params.iter().map(|p| p.zero as i8).collect::<Vec<_>>());
    Ok(QuantizedLinear {
        shape,
        scheme: WeightScheme::Int(scheme),
        act_order,
        codes: Codes::Int(codes.into_iter().map(|q| q as i8).collect()),
        scales,
        zero_points,
        g_idx,
        dequantized: Matrix::new(out, inp, deq)?,
    })
}

/// The operations the pipeline needs from a compute backend.
pub trait QuantBackend {
    /// Adds a batch of a Linear's input activations `[n, in]` to its Hessian.
    fn accumulate_hessian(&self, hessian: &mut Hessian, x: &Matrix) -> Result<(), QuantError>;

    /// Round-to-nearest onto the integer grid (also INT8 weight-only).
    fn quantize_rtn(
        &self,
        layer: &str,
        w: &Matrix,
        scheme: IntScheme,
    ) -> Result<QuantizedLinear, QuantError>;

    /// GPTQ with the layer's accumulated Hessian.
    fn quantize_gptq(
        &self,
        layer: &str,
        w: &Matrix,
        hessian: &Hessian,
        scheme: IntScheme,
        act_order: ActOrder,
        damp_percent: f64,
    ) -> Result<QuantizedLinear, QuantError>;

    /// AWQ scale and clipping search over Linears sharing one input `x`.
    fn quantize_awq(
        &self,
        layers: &[(&str, &Matrix)],
        x: &Matrix,
        scheme: IntScheme,
        config: &AwqConfig,
    ) -> Result<AwqResult, QuantError>;

    /// FP8 E4M3 with per-channel scales.
    fn quantize_fp8(
        &self,
        layer: &str,
        w: &Matrix,
        scale_dtype: FloatDtype,
    ) -> Result<QuantizedLinear, QuantError>;

    /// The weight `[out, in]` recomputed from a quantized Linear's codes.
    fn dequantize(&self, q: &QuantizedLinear) -> Result<Matrix, QuantError> {
        q.dequantize_codes()
    }
}

/// The CPU implementation: plain row-major loops, rayon across output rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl QuantBackend for CpuBackend {
    fn accumulate_hessian(&self, hessian: &mut Hessian, x: &Matrix) -> Result<(), QuantError> {
        hessian.add_batch(x)
    }

    fn quantize_rtn(
        &self,
        layer: &str,
        w: &Matrix,
        scheme: IntScheme,
    ) -> Result<QuantizedLinear, QuantError> {
        rtn(layer, w, scheme)
    }

    fn quantize_gptq(
        &self,
        layer: &str,
        w: &Matrix,
        hessian: &Hessian,
        scheme: IntScheme,
        act_order: ActOrder,
        damp_percent: f64,
    ) -> Result<QuantizedLinear, QuantError> {
        gptq(layer, w, hessian, scheme, act_order, damp_percent)
    }

    fn quantize_awq(
        &self,
        layers: &[(&str, &Matrix)],
        x: &Matrix,
        scheme: IntScheme,
        config: &AwqConfig,
    ) -> Result<AwqResult, QuantError> {
        awq_search(layers, x, scheme, config)
    }

    fn quantize_fp8(
        &self,
        layer: &str,
        w: &Matrix,
        scale_dtype: FloatDtype,
    ) -> Result<QuantizedLinear, QuantError> {
        quantize_fp8(layer, w, scale_dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(method: Method, bits: u8, group_size: i32, symmetric: bool) -> QuantizationSpec {
        QuantizationSpec {
            method,
            bits,
            group_size,
            symmetric,
            act_order: false,
            damp_percent: 0.01,
            ignore: vec!["lm_head".to_string()],
        }
    }

    #[test]
    fn schemes_from_recipes() {
        let f = FloatDtype::F16;
        assert_eq!(
            WeightScheme::from_spec(&spec(Method::Gptq, 4, 128, false), f),
            WeightScheme::Int(IntScheme {
                bits: 4,
                symmetric: false,
                group_size: Some(128),
                scale_dtype: f
            })
        );
        assert_eq!(
            WeightScheme::from_spec(&spec(Method::Rtn, 4, -1, true), f),
            WeightScheme::Int(IntScheme {
                bits: 4,
                symmetric: true,
                group_size: None,
                scale_dtype: f
            })
        );
        // INT8 is the W8A16 preset whatever the recipe's grouping says.
        assert_eq!(
            WeightScheme::from_spec(&spec(Method::Int8, 4, 128, false), f),
            WeightScheme::Int(IntScheme {
                bits: 8,
                symmetric: true,
                group_size: None,
                scale_dtype: f
            })
        );
        assert_eq!(
            WeightScheme::from_spec(&spec(Method::Fp8, 8, 128, true), f),
            WeightScheme::Fp8 { scale_dtype: f }
        );
    }
}
