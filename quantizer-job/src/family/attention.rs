//! What the attention of one decoder layer sees and how it rotates, when
//! the layers of a model differ: Gemma 2 and 3 alternate local layers
//! (a sliding window) with global ones (full causal attention), and Gemma 3
//! gives each kind its own RoPE. [`crate::config::LlamaConfig::window`] and
//! [`crate::config::LlamaConfig::rope_of`] answer per layer, for both
//! forwards.

use serde::{Deserialize, Serialize};

use crate::rope::RopeScaling;

/// The attention of one layer, as `config.json`'s `layer_types` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerType {
    /// `full_attention`: every earlier position.
    Full,
    /// `sliding_attention`: the last `sliding_window` positions only, with
    /// the local RoPE where the family has one.
    Sliding,
}

impl LayerType {
    /// Parses `full_attention` or `sliding_attention`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "full_attention" => Some(LayerType::Full),
            "sliding_attention" => Some(LayerType::Sliding),
            _ => None,
        }
    }

    /// transformers' default pattern for a config without `layer_types`:
    /// every `pattern`-th layer (1-based) global, the others local.
    pub fn pattern(layers: usize, pattern: usize) -> Vec<LayerType> {
        (0..layers)
            .map(|i| match (i + 1).is_multiple_of(pattern) {
                true => LayerType::Full,
                false => LayerType::Sliding,
            })
            .collect()
    }
}

/// The RoPE of the local layers when it differs from the global layers'
/// (Gemma 3: `rope_parameters.sliding_attention`, or `rope_local_base_freq`
/// in configs written for transformers 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalRope {
    /// Base frequency.
    pub theta: f64,
    /// Scaling (Gemma 3 ships `default`).
    pub scaling: RopeScaling,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_patterns_are_transformers() {
        use LayerType::{Full, Sliding};
        assert_eq!(LayerType::pattern(4, 2), [Sliding, Full, Sliding, Full]);
        assert_eq!(
            LayerType::pattern(7, 6),
            [Sliding, Sliding, Sliding, Sliding, Sliding, Full, Sliding]
        );
        assert_eq!(LayerType::parse("chunked_attention"), None);
    }
}
