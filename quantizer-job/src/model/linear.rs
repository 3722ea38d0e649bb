//! Naming of the Linear layers, shared by the forward pass, the activation
//! capture callback and the quantizers.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Which projection inside a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearKind {
    /// Query projection.
    QProj,
    /// Key projection.
    KProj,
    /// Value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MLP gate projection (the SiLU branch).
    GateProj,
    /// MLP up projection.
    UpProj,
    /// MLP down projection.
    DownProj,
}

impl LinearKind {
    /// All projections, in the order the forward pass runs them.
    pub const ALL: [LinearKind; 7] = [
        LinearKind::QProj,
        LinearKind::KProj,
        LinearKind::VProj,
        LinearKind::OProj,
        LinearKind::GateProj,
        LinearKind::UpProj,
        LinearKind::DownProj,
    ];

    /// The Hugging Face module name (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            LinearKind::QProj => "q_proj",
            LinearKind::KProj => "k_proj",
            LinearKind::VProj => "v_proj",
            LinearKind::OProj => "o_proj",
            LinearKind::GateProj => "gate_proj",
            LinearKind::UpProj => "up_proj",
            LinearKind::DownProj => "down_proj",
        }
    }

    fn block(self) -> &'static str {
        match self {
            LinearKind::QProj | LinearKind::KProj | LinearKind::VProj | LinearKind::OProj => {
                "self_attn"
            }
            LinearKind::GateProj | LinearKind::UpProj | LinearKind::DownProj => "mlp",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// One Linear of one decoder layer, as passed to the capture callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinearId {
    /// Decoder layer index.
    pub layer: usize,
    /// Which projection.
    pub kind: LinearKind,
}

impl LinearId {
    /// The checkpoint name of this Linear's weight, e.g.
    /// `model.layers.0.self_attn.q_proj.weight`.
    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.module_name())
    }

    /// The module name (the weight name without `.weight`), as recipes'
    /// `ignore` lists and the artifact's quantization config spell it.
    pub fn module_name(&self) -> String {
        format!(
            "model.layers.{}.{}.{}",
            self.layer,
            self.kind.block(),
            self.kind.name()
        )
    }

    /// Parses a weight name produced by [`LinearId::weight_name`].
    pub fn parse(weight_name: &str) -> Option<Self> {
        let rest = weight_name.strip_prefix("model.layers.")?;
        let rest = rest.strip_suffix(".weight")?;
        let mut parts = rest.split('.');
        let layer = parts.next()?.parse().ok()?;
        let block = parts.next()?;
        let kind = LinearKind::from_name(parts.next()?)?;
        (parts.next().is_none() && block == kind.block()).then_some(LinearId { layer, kind })
    }
}

/// The capture callback of [`super::LlamaModel::layer_forward`]: receives
/// each Linear's input activations flattened to `[tokens, in_features]`.
pub type Capture<'a> = &'a mut dyn FnMut(LinearId, &Tensor);

/// A dense Linear layer, `y = x Wᵀ + b`, with `W` stored `[out, in]` as in
/// the checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    /// Applies the layer to `[n, in]` activations.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
