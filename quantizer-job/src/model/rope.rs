//! Rotary position embeddings on candle: the tables of [`crate::rope`]
//! (every supported rope type, shared with the GPU path) applied as
//! transformers' `rotate_half`, with the frequency set each forward's length
//! selects (longrope's short or long factors, [`RopeScaling::set_for`]).

use candle_core::{D, Device, Result, Tensor};

use crate::rope::{FrequencySet, RopeScaling, tables};

/// Precomputed cos/sin tables of shape `[max_positions, head_dim]`, laid out
/// as transformers does (`cat(freqs, freqs)`), so `rotate_half` matches: one
/// pair per frequency set of the scaling.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    scaling: RopeScaling,
    /// `(set, cos, sin)` for each of [`RopeScaling::sets`].
    sets: Vec<(FrequencySet, Tensor, Tensor)>,
    max_positions: usize,
}

impl Rope {
    pub(crate) fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: usize,
    ) -> Result<Self> {
        let half = head_dim / 2;
        // `cat(freqs, freqs)`: each row's half repeated.
        let repeat = |t: &[f32]| -> Vec<f32> {
            t.chunks(half)
                .flat_map(|row| row.iter().chain(row.iter()).copied())
                .collect()
        };
        let sets = scaling
            .sets()
            .iter()
            .map(|&set| {
                let (cos_half, sin_half) = tables(scaling, head_dim, theta, max_positions, set);
                let (cos, sin) = (repeat(&cos_half), repeat(&sin_half));
                Ok((
                    set,
                    Tensor::from_vec(cos, (max_positions, head_dim), &Device::Cpu)?,
                    Tensor::from_vec(sin, (max_positions, head_dim), &Device::Cpu)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Rope {
            scaling: scaling.clone(),
            sets,
            max_positions,
        })
    }

    /// Longest sequence the tables cover.
    pub(crate) fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `x` of shape `[b, heads, t, head_dim]` whose first position is
    /// `offset`, with the set a forward running to `offset + t` positions uses.
    pub(crate) fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let want = self.scaling.set_for(offset + t);
        let (_, cos, sin) = self
            .sets
            .iter()
            .find(|(set, _, _)| *set == want)
            .or(self.sets.first())
            .ok_or_else(|| candle_core::Error::Msg("no RoPE tables".into()))?;
        let cos = cos.narrow(0, offset, t)?;
        let sin = sin.narrow(0, offset, t)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}
