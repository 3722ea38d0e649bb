//! Rotary position embeddings of every rope type the worker supports,
//! described once: `config.json`'s `rope_parameters` (or the older
//! `rope_scaling`) become a [`RopeScaling`], and [`tables`] turns it into the
//! cos/sin tables that both backends rotate with (the CPU forward in
//! `model::rope`, the GPU forward in `gpu::llama`). The formulas are
//! transformers' (`modeling_rope_utils`), checked against its logits by the
//! family conformance fixtures (`tests/families.rs`).
//!
//! `longrope` (Phi-3 / 3.5 / 4-mini) has two frequency sets, and which one a
//! forward uses depends on its sequence: transformers' `longrope_frequency_update`
//! takes the long factors when the last position plus one exceeds
//! `original_max_position_embeddings`, the short ones otherwise, for every
//! position of that forward. Both sets are tabulated once ([`FrequencySet`])
//! and each forward picks with [`RopeScaling::set_for`] from the length it
//! runs to (its offset plus its tokens), on both backends; a KV cache keeps
//! the keys rotated as they were, exactly as transformers' cache does.
//!
//! `dynamic`, whose frequencies are recomputed for every length past the
//! trained one, is refused when the config is read: no fixed set of tables
//! expresses it, and computing it as `default` would be silently wrong.

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// How the RoPE frequencies are scaled (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// `default`: `theta^(-2i/d)`.
    #[default]
    Default,
    /// `linear`: every frequency divided by `factor` (position interpolation).
    Linear {
        /// The interpolation factor.
        factor: f64,
    },
    /// `llama3` (Llama 3.1–3.3): low frequencies divided by `factor`, high
    /// ones kept, the band between blended smoothly.
    Llama3 {
        /// The interpolation factor of the low frequencies.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// `yarn`: interpolation blended with extrapolation over a ramp of
    /// dimensions, and cos/sin scaled by an attention factor.
    Yarn {
        /// The context extension factor.
        factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
        /// Scale of cos and sin (`0.1 ln(factor) + 1` when not given).
        attention_factor: f64,
        /// Rotations at which extrapolation ends (default 32).
        beta_fast: f64,
        /// Rotations at which interpolation starts (default 1).
        beta_slow: f64,
        /// Whether the ramp's ends are rounded to whole dimensions (default true).
        truncate: bool,
    },
    /// `longrope` (Phi-3): each base frequency divided by a per-dimension
    /// factor, `short_factor` for sequences up to the original length,
    /// `long_factor` past it, and cos/sin scaled by an attention factor.
    #[serde(rename = "longrope")]
    LongRope {
        /// Divisors of the `head_dim / 2` frequencies, up to the original length.
        short_factor: Vec<f64>,
        /// Divisors past the original length.
        long_factor: Vec<f64>,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
        /// Scale of cos and sin (`sqrt(1 + ln(factor) / ln(original))` when
        /// not given, `factor` being `max_position_embeddings / original`).
        attention_factor: f64,
    },
}

/// Which of a rope's frequency sets a forward rotates with: every rope type
/// has [`FrequencySet::Short`] only, but `longrope` has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrequencySet {
    /// The only set, or longrope's `short_factor`.
    Short,
    /// longrope's `long_factor`.
    Long,
}

/// The raw rope fields of a `config.json`, as transformers 4 (`rope_scaling`
/// beside a top-level `rope_theta`) and 5 (`rope_parameters`) write them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRope {
    /// The rope type (`type` in some older configs).
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    /// The base frequency (transformers 5 keeps it here).
    pub rope_theta: Option<f64>,
    /// Scaling factor of `linear`, `llama3`, `yarn`.
    pub factor: Option<f64>,
    /// `llama3`.
    pub low_freq_factor: Option<f64>,
    /// `llama3`.
    pub high_freq_factor: Option<f64>,
    /// `llama3`, `yarn`.
    pub original_max_position_embeddings: Option<f64>,
    /// `yarn`.
    pub attention_factor: Option<f64>,
    /// `yarn`.
    pub beta_fast: Option<f64>,
    /// `yarn`.
    pub beta_slow: Option<f64>,
    /// `yarn` (DeepSeek-style models): not supported.
    pub mscale: Option<f64>,
    /// `yarn` (DeepSeek-style models): not supported.
    pub mscale_all_dim: Option<f64>,
    /// `yarn`.
    pub truncate: Option<bool>,
    /// `longrope`.
    pub short_factor: Option<Vec<f64>>,
    /// `longrope`.
    pub long_factor: Option<Vec<f64>>,
    /// A rotary width smaller than the head: not supported.
    pub partial_rotary_factor: Option<f64>,
}

/// Why the rope fields cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RopeError {
    /// A rope type the tables cannot express (the type is kept for
    /// callers, not put in the message: a spec can name any file).
    #[error(
        "unsupported rope_type: supported are \"default\", \"linear\", \"llama3\", \"yarn\" and \"longrope\""
    )]
    UnsupportedType(String),
    /// A required field is missing or out of range.
    #[error("rope field {field}: {reason}")]
    Field {
        /// The field inside `rope_parameters`.
        field: &'static str,
        /// What was expected.
        reason: String,
    },
}

impl RawRope {
    /// The scaling this rope describes; `max_position_embeddings` is the
    /// config's top-level value (yarn and longrope derive their factor from
    /// it), `original_fallback` the top-level `original_max_position_embeddings`
    /// that Phi-3 configs written for transformers 4 keep outside
    /// `rope_scaling`, and `head_dim` the width the longrope factors must
    /// cover (one per rotated pair).
    pub fn scaling(
        &self,
        max_position_embeddings: usize,
        original_fallback: Option<f64>,
        head_dim: usize,
    ) -> Result<RopeScaling, RopeError> {
        if let Some(p) = self.partial_rotary_factor
            && p != 1.0
        {
            return Err(field(
                "partial_rotary_factor",
                "only 1.0 (the whole head rotates) is supported".into(),
            ));
        }
        let kind = self.rope_type.as_deref().unwrap_or("default");
        let factor = || {
            self.factor
                .filter(|f| f.is_finite() && *f >= 1.0)
                .ok_or_else(|| field("factor", "required, a number >= 1".into()))
        };
        let original = || {
            self.original_max_position_embeddings
                .filter(|n| *n >= 1.0)
                .ok_or_else(|| {
                    field(
                        "original_max_position_embeddings",
                        "required, a positive length".into(),
                    )
                })
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
            "llama3" => {
                let low = self.low_freq_factor.unwrap_or(1.0);
                let high = self.high_freq_factor.unwrap_or(4.0);
                if high <= low {
                    return Err(field(
                        "high_freq_factor",
                        format!("must exceed low_freq_factor {low}, found {high}"),
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: factor()?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original()?,
                })
            }
            "yarn" => {
                if self.mscale.is_some() || self.mscale_all_dim.is_some() {
                    return Err(field(
                        "mscale",
                        "DeepSeek-style yarn (mscale, mscale_all_dim) is not supported".into(),
                    ));
                }
                // As transformers: with an original length given, the factor
                // is the ratio of the two lengths.
                let (factor, original) = match self.original_max_position_embeddings {
                    Some(o) if o >= 1.0 => (max_position_embeddings as f64 / o, o),
                    _ => (factor()?, max_position_embeddings as f64),
                };
                let attention_factor = self.attention_factor.unwrap_or_else(|| {
                    if factor <= 1.0 {
                        1.0
                    } else {
                        0.1 * factor.ln() + 1.0
                    }
                });
                Ok(RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    attention_factor,
                    beta_fast: self.beta_fast.unwrap_or(32.0),
                    beta_slow: self.beta_slow.unwrap_or(1.0),
                    truncate: self.truncate.unwrap_or(true),
                })
            }
            "longrope" => self.longrope(max_position_embeddings, original_fallback, head_dim),
            other => Err(RopeError::UnsupportedType(other.to_string())),
        }
    }

    /// transformers' `_compute_longrope_parameters`.
    fn longrope(
        &self,
        max_position_embeddings: usize,
        original_fallback: Option<f64>,
        head_dim: usize,
    ) -> Result<RopeScaling, RopeError> {
        let original = self
            .original_max_position_embeddings
            .or(original_fallback)
            .filter(|n| *n >= 1.0)
            .ok_or_else(|| {
                field(
                    "original_max_position_embeddings",
                    "required by longrope, a positive length".into(),
                )
            })?;
        let factors = |name: &'static str, given: &Option<Vec<f64>>| {
            let values = given
                .clone()
                .ok_or_else(|| field(name, "required by longrope".into()))?;
            if values.len() != head_dim / 2 {
                return Err(field(
                    name,
                    format!(
                        "needs one factor per rotated pair, {} for head_dim {head_dim}, found {}",
                        head_dim / 2,
                        values.len()
                    ),
                ));
            }
            if values.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return Err(field(
                    name,
                    "every factor must be finite and positive".into(),
                ));
            }
            Ok(values)
        };
        let short_factor = factors("short_factor", &self.short_factor)?;
        let long_factor = factors("long_factor", &self.long_factor)?;
        let factor = match self.factor {
            Some(f) if f.is_finite() && f > 0.0 => f,
            Some(_) => return Err(field("factor", "must be finite and positive".into())),
            None => max_position_embeddings as f64 / original,
        };
        let attention_factor = match self.attention_factor {
            Some(a) => a,
            None if factor <= 1.0 => 1.0,
            None => (1.0 + factor.ln() / original.ln()).sqrt(),
        };
        Ok(RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: original,
            attention_factor,
        })
    }
}

fn field(field: &'static str, reason: String) -> RopeError {
    RopeError::Field { field, reason }
}

impl RopeScaling {
    /// The frequency sets this scaling has, each tabulated once.
    pub fn sets(&self) -> &'static [FrequencySet] {
        match self {
            RopeScaling::LongRope { .. } => &[FrequencySet::Short, FrequencySet::Long],
            _ => &[FrequencySet::Short],
        }
    }

    /// The set a forward running to `len` positions (its first position's
    /// offset plus its tokens) rotates every one of its tokens with:
    /// longrope's long factors when `len` exceeds the original length, as
    /// transformers' `longrope_frequency_update` chooses.
    pub fn set_for(&self, len: usize) -> FrequencySet {
        match self {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } if len as f64 > *original_max_position_embeddings => FrequencySet::Long,
            _ => FrequencySet::Short,
        }
    }

    /// The rotation frequencies of a head of width `head_dim` (`head_dim / 2`
    /// of them) in frequency set `set`, in f32 as transformers computes them,
    /// and the factor cos and sin are multiplied by.
    pub fn frequencies(&self, head_dim: usize, theta: f64, set: FrequencySet) -> (Vec<f32>, f32) {
        let half = head_dim / 2;
        // transformers: 1 / base ** (arange(0, d, 2).float() / d), in f32.
        let exponent = |i: usize| (2 * i) as f32 / head_dim as f32;
        let base: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf(exponent(i)))
            .collect();
        match *self {
            RopeScaling::Default => (base, 1.0),
            RopeScaling::Linear { factor } => {
                (base.iter().map(|f| f / factor as f32).collect(), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let scaled = base
                    .iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .map(|f| f as f32)
                    .collect();
                (scaled, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast,
                beta_slow,
                truncate,
            } => {
                let d = head_dim as f64;
                let correction = |rotations: f64| {
                    d * (original / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let blended = (0..half)
                    .map(|i| {
                        let pos_freq = (theta as f32).powf(exponent(i));
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor as f32 * pos_freq);
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extrapolation_weight = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_weight)
                            + extrapolation * extrapolation_weight
                    })
                    .collect();
                (blended, attention_factor as f32)
            }
            RopeScaling::LongRope {
                ref short_factor,
                ref long_factor,
                attention_factor,
                ..
            } => {
                let ext = match set {
                    FrequencySet::Short => short_factor,
                    FrequencySet::Long => long_factor,
                };
                // transformers: 1 / (ext_factors * base ** (arange(0, d, 2) / d)),
                // the factors as an f32 tensor.
                let freqs = (0..half)
                    .map(|i| 1.0 / (ext[i] as f32 * (theta as f32).powf(exponent(i))))
                    .collect();
                (freqs, attention_factor as f32)
            }
        }
    }
}

/// The cos and sin tables `[positions, head_dim / 2]` (row-major) of
/// frequency set `set`, each angle `position · frequency` in f32 as
/// transformers forms it, scaled by the rope's attention factor.
pub fn tables(
    scaling: &RopeScaling,
    head_dim: usize,
    theta: f64,
    positions: usize,
    set: FrequencySet,
) -> (Vec<f32>, Vec<f32>) {
    let (freqs, scale) = scaling.frequencies(head_dim, theta, set);
    let mut cos = Vec::with_capacity(positions * freqs.len());
    let mut sin = Vec::with_capacity(positions * freqs.len());
    for pos in 0..positions {
        for f in &freqs {
            let angle = pos as f32 * f;
            cos.push(angle.cos() * scale);
            sin.push(angle.sin() * scale);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: &str) -> RawRope {
        RawRope {
            rope_type: Some(kind.into()),
            ..RawRope::default()
        }
    }

    #[test]
    fn default_and_linear_frequencies() {
        let (f, s) = RopeScaling::Default.frequencies(8, 10_000.0, FrequencySet::Short);
        assert_eq!(s, 1.0);
        assert_eq!(f.len(), 4);
        assert!((f[0] - 1.0).abs() < 1e-7 && (f[1] - 0.1).abs() < 1e-6);
        let (l, _) =
            RopeScaling::Linear { factor: 2.0 }.frequencies(8, 10_000.0, FrequencySet::Short);
        assert!((l[1] - 0.05).abs() < 1e-6);
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let (base, _) = RopeScaling::Default.frequencies(128, 500_000.0, FrequencySet::Short);
        let (f, _) = s.frequencies(128, 500_000.0, FrequencySet::Short);
        assert_eq!(f[0], base[0], "the highest frequency is kept");
        assert!(
            (f[63] - base[63] / 8.0).abs() <= base[63] * 1e-6,
            "the lowest is divided"
        );
    }

    #[test]
    fn unsupported_types_and_fields_are_named() {
        assert_eq!(
            raw("dynamic").scaling(4096, None, 16),
            Err(RopeError::UnsupportedType("dynamic".into()))
        );
        assert!(matches!(
            raw("linear").scaling(4096, None, 16),
            Err(RopeError::Field {
                field: "factor",
                ..
            })
        ));
        let partial = RawRope {
            partial_rotary_factor: Some(0.5),
            ..RawRope::default()
        };
        assert!(matches!(
            partial.scaling(4096, None, 16),
            Err(RopeError::Field {
                field: "partial_rotary_factor",
                ..
            })
        ));
        assert_eq!(
            RawRope::default().scaling(4096, None, 16),
            Ok(RopeScaling::Default)
        );
    }

    #[test]
    fn yarn_scales_cos_and_sin_by_its_attention_factor() {
        let r = RawRope {
            factor: Some(4.0),
            original_max_position_embeddings: Some(64.0),
            ..raw("yarn")
        };
        let s = r.scaling(256, None, 16).expect("yarn");
        let (cos, sin) = tables(&s, 16, 10_000.0, 2, FrequencySet::Short);
        let expected = 0.1 * 4f32.ln() + 1.0;
        assert!((cos[0] - expected).abs() < 1e-6 && sin[0] == 0.0);
    }

    #[test]
    fn longrope_picks_its_set_by_length_and_scales_by_its_attention_factor() {
        let r = RawRope {
            short_factor: Some(vec![1.0, 2.0]),
            long_factor: Some(vec![4.0, 8.0]),
            original_max_position_embeddings: Some(32.0),
            ..raw("longrope")
        };
        let s = r.scaling(128, None, 4).expect("longrope");
        assert_eq!(s.sets(), &[FrequencySet::Short, FrequencySet::Long]);
        assert_eq!(s.set_for(32), FrequencySet::Short);
        assert_eq!(s.set_for(33), FrequencySet::Long);
        let (short, a) = s.frequencies(4, 10_000.0, FrequencySet::Short);
        let (long, _) = s.frequencies(4, 10_000.0, FrequencySet::Long);
        // factor 128 / 32 = 4: sqrt(1 + ln 4 / ln 32).
        let expected = (1.0 + 4f64.ln() / 32f64.ln()).sqrt() as f32;
        assert_eq!(a, expected);
        assert_eq!(short[0], 1.0);
        assert_eq!(long[0], 0.25);
        assert!((short[1] - 0.01 / 2.0).abs() < 1e-9 && (long[1] - 0.01 / 8.0).abs() < 1e-9);
        // The top-level original length of transformers 4 configs is used
        // when rope_scaling has none.
        let old = RawRope {
            original_max_position_embeddings: None,
            ..r.clone()
        };
        assert!(old.scaling(128, Some(32.0), 4).is_ok());
        assert!(matches!(
            old.scaling(128, None, 4),
            Err(RopeError::Field {
                field: "original_max_position_embeddings",
                ..
            })
        ));
        // One factor per rotated pair.
        assert!(matches!(
            r.scaling(128, None, 8),
            Err(RopeError::Field {
                field: "short_factor",
                ..
            })
        ));
    }
}
