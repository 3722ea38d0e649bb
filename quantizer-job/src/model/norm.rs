//! The names of a decoder layer's two RMSNorms, parsed in one place: AWQ
//! folds its scales into them by name, and the artifact writer looks them up
//! by checkpoint name.

/// Which RMSNorm of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `input_layernorm`, before attention.
    Input,
    /// `post_attention_layernorm`, before the MLP.
    PostAttention,
}

/// One decoder layer's RMSNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormId {
    pub layer: usize,
    pub kind: NormKind,
}

impl NormId {
    /// Parses `model.layers.{i}.input_layernorm` or
    /// `model.layers.{i}.post_attention_layernorm`, with or without the
    /// trailing `.weight`; anything else is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("model.layers.")?;
        let rest = rest.strip_suffix(".weight").unwrap_or(rest);
        let (index, leaf) = rest.split_once('.')?;
        let kind = match leaf {
            "input_layernorm" => NormKind::Input,
            "post_attention_layernorm" => NormKind::PostAttention,
            _ => return None,
        };
        Some(NormId {
            layer: index.parse().ok()?,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_norms_with_and_without_weight_suffix() {
        let id = |layer, kind| Some(NormId { layer, kind });
        assert_eq!(
            NormId::parse("model.layers.3.input_layernorm"),
            id(3, NormKind::Input)
        );
        assert_eq!(
            NormId::parse("model.layers.12.post_attention_layernorm.weight"),
            id(12, NormKind::PostAttention)
        );
        for other in [
            "model.layers.3.self_attn.q_proj.weight",
            "model.norm.weight",
            "model.layers.x.input_layernorm",
            "model.layers.3.input_layernorm.bias",
        ] {
            assert_eq!(NormId::parse(other), None, "{other}");
        }
    }
}
