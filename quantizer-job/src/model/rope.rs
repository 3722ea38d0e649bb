//! Rotary position embeddings on candle: the tables of [`crate::rope`]
//! (every supported rope type, shared with the GPU path) applied as
//! transformers' `rotate_half`.

use candle_core::{D, Device, Result, Tensor};

use crate::rope::{RopeScaling, tables};

/// Precomputed cos/sin tables of shape `[max_positions, head_dim]`, laid out
/// as transformers does (`cat(freqs, freqs)`), so `rotate_half` matches.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub(crate) fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: usize,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let (cos_half, sin_half) = tables(scaling, head_dim, theta, max_positions);
        // `cat(freqs, freqs)`: each row's half repeated.
        let repeat = |t: &[f32]| -> Vec<f32> {
            t.chunks(half)
                .flat_map(|row| row.iter().chain(row.iter()).copied())
                .collect()
        };
        let (cos, sin) = (repeat(&cos_half), repeat(&sin_half));
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_positions, head_dim), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_positions, head_dim), &Device::Cpu)?,
        })
    }

    /// Longest sequence the tables cover.
    pub(crate) fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` of shape `[b, heads, t, head_dim]` whose first position is
    /// `offset`.
    pub(crate) fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}
