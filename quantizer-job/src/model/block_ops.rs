//! The element-wise steps of the decoder block that differ between
//! families ([`crate::family::Block`]): the RMSNorm with its optional
//! `1 + weight` (Gemma), the gate activation of the MLP (SiLU or GELU-tanh)
//! and Gemma 2's `tanh` soft-capping. Each computes in f32 in the order
//! transformers does, so the CPU forward matches it to f32 rounding.

use candle_core::{D, Device, Result, Tensor};

use crate::family::Activation;

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) · (offset +
/// w)`, computed in f32 as transformers does (Gemma's norms: offset 1).
pub(super) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f32) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    match offset {
        0.0 => normed.broadcast_mul(weight),
        // `1.0 + weight.float()`: one f32 addition per element.
        _ => normed.broadcast_mul(&weight.affine(1.0, f64::from(offset))?),
    }
}

/// The MLP's gated product `act(gate) · up`.
pub(super) fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    let gate = match activation {
        Activation::Silu => gate.silu()?,
        // candle's `gelu` is the tanh approximation (`gelu_pytorch_tanh`).
        Activation::GeluTanh => gate.gelu()?,
    };
    gate * up
}

/// `cap · tanh(x / cap)` when a cap is set: divided, then multiplied, as
/// transformers does.
pub(super) fn softcap(x: Tensor, cap: Option<f32>) -> Result<Tensor> {
    match cap {
        Some(cap) => x
            .broadcast_div(&Tensor::new(cap, &Device::Cpu)?)?
            .tanh()?
            .affine(f64::from(cap), 0.0),
        None => Ok(x),
    }
}
