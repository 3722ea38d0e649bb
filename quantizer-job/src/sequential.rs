//! Layer-by-layer quantization, as GPTQ and AWQ need it: the calibration
//! set's hidden states go through the decoder one layer at a time; each
//! layer's Linears learn from the activations that the *already quantized*
//! earlier layers produce, so every layer compensates for the error of the
//! ones before it. Only one layer's activations live at a time, which keeps
//! memory flat in the model's depth.
//!
//! The driver knows the algorithms, not the architecture: a model describes
//! its layers through [`LayeredModel`] (which Linears share an input, and which
//! op before them can absorb AWQ's scales).

use crate::progress::Progress;
use crate::quant::awq::RowSampler;
use crate::quant::{
    ActOrder, AwqConfig, Hessian, IntScheme, Matrix, QuantBackend, QuantizedLinear, ScaleSink,
    WeightScheme,
};
use anyhow::Context;
use quantops_api::{Method, QuantizationSpec};
use std::collections::BTreeMap;

/// Linears that read the same input tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct InputGroup {
    /// Module names, e.g. `model.layers.0.self_attn.q_proj`.
    pub linears: Vec<String>,
    /// Where AWQ folds `1/s`; `None` when nothing can absorb it exactly.
    pub fold: Option<ScaleSink>,
}

/// Receives a Linear's input activations `[n, in]`, named by its module.
pub type CaptureSink<'a> = &'a mut dyn FnMut(&str, Matrix) -> anyhow::Result<()>;

/// What the driver needs of a model.
pub trait LayeredModel {
    /// The hidden states of one calibration batch between decoder layers.
    type Hidden;
    fn num_layers(&self) -> usize;
    /// The input groups of decoder layer `layer`, in AWQ's folding order
    /// (a group whose fold target is a Linear of a later group comes first).
    fn input_groups(&self, layer: usize) -> Vec<InputGroup>;
    /// Linears outside the decoder layers (e.g. `lm_head`).
    fn outer_linears(&self) -> Vec<String>;
    fn weight(&self, module: &str) -> anyhow::Result<Matrix>;
    fn set_weight(&mut self, module: &str, weight: &Matrix) -> anyhow::Result<()>;
    /// Divides output channel `c` of `target` by `scales[c]`.
    fn fold_scales(&mut self, target: &ScaleSink, scales: &[f32]) -> anyhow::Result<()>;
    /// Runs decoder layer `layer`; `capture` receives the input `[n, in]` of
    /// the *first* Linear of each input group.
    fn forward_layer(
        &self,
        layer: usize,
        hidden: &Self::Hidden,
        capture: Option<CaptureSink<'_>>,
    ) -> anyhow::Result<Self::Hidden>;
}

/// Whether a Linear stays in full precision: `ignore` entries match a whole
/// dotted suffix of the module name (`lm_head`, `mlp.down_proj`) or, written
/// `re:...`, a regular expression as in llm-compressor recipes.
pub fn is_ignored(module: &str, ignore: &[String]) -> bool {
    ignore
        .iter()
        .any(|pattern| match pattern.strip_prefix("re:") {
            Some(re) => regex::Regex::new(re).is_ok_and(|r| r.is_match(module)),
            None => module == pattern || module.ends_with(&format!(".{pattern}")),
        })
}

/// Quantizes every Linear of `model` that `recipe` does not ignore, leaving
/// the dequantized weights (and AWQ's folded scales) in the model, and
/// returns what the checkpoint writer stores. `batches` are the calibration
/// set's embedded inputs; methods without calibration ignore them.
pub fn quantize_model<M: LayeredModel, B: QuantBackend>(
    model: &mut M,
    backend: &B,
    recipe: &QuantizationSpec,
    scheme: WeightScheme,
    batches: Vec<M::Hidden>,
) -> anyhow::Result<BTreeMap<String, QuantizedLinear>> {
    let mut out = BTreeMap::new();
    let layers = model.num_layers();
    let progress = Progress::new("quantize", layers);
    let mut hidden = batches;
    for layer in 0..layers {
        let groups = model.input_groups(layer);
        let captured = if recipe.method.needs_calibration() {
            capture_layer(model, backend, layer, &groups, &hidden, recipe.method)?
        } else {
            BTreeMap::new()
        };
        for (index, group) in groups.iter().enumerate() {
            let input = captured.get(&index);
            quantize_group(model, backend, recipe, scheme, group, input, &mut out)
                .with_context(|| format!("decoder layer {layer}"))?;
        }
        if recipe.method.needs_calibration() && layer + 1 < layers {
            hidden = hidden
                .iter()
                .map(|h| model.forward_layer(layer, h, None))
                .collect::<anyhow::Result<_>>()?;
        }
        progress.step(layer + 1, "layer");
    }
    for module in model.outer_linears() {
        if is_ignored(&module, &recipe.ignore) {
            continue;
        }
        let group = InputGroup {
            linears: vec![module],
            fold: None,
        };
        quantize_group(model, backend, recipe, scheme, &group, None, &mut out)?;
    }
    Ok(out)
}

/// What one input group learned from the calibration set.
enum Captured {
    Hessian(Hessian),
    Samples(Matrix),
}

fn capture_layer<M: LayeredModel, B: QuantBackend>(
    model: &M,
    backend: &B,
    layer: usize,
    groups: &[InputGroup],
    hidden: &[M::Hidden],
    method: Method,
) -> anyhow::Result<BTreeMap<usize, Captured>> {
    let index_of: BTreeMap<&str, usize> = groups
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.linears.first().map(|n| (n.as_str(), i)))
        .collect();
    let mut captured: BTreeMap<usize, Captured> = BTreeMap::new();
    // AWQ keeps about AWQ_MAX_ROWS rows per group, spread over the set.
    let mut samplers: BTreeMap<usize, RowSampler> = BTreeMap::new();
    for h in hidden {
        let mut sink = |module: &str, x: Matrix| -> anyhow::Result<()> {
            let Some(&index) = index_of.get(module) else {
                return Ok(());
            };
            let entry = captured.entry(index);
            match method {
                Method::Gptq => {
                    let Captured::Hessian(hessian) =
                        entry.or_insert_with(|| Captured::Hessian(Hessian::new(module, x.cols)))
                    else {
                        return Ok(());
                    };
                    backend.accumulate_hessian(hessian, &x)?;
                }
                _ => {
                    let sampler = samplers
                        .entry(index)
                        .or_insert_with(|| RowSampler::new(hidden.len()));
                    let Captured::Samples(samples) = entry.or_insert_with(|| {
                        Captured::Samples(Matrix {
                            rows: 0,
                            cols: x.cols,
                            data: Vec::new(),
                        })
                    }) else {
                        return Ok(());
                    };
                    for r in sampler.next_batch(x.rows) {
                        samples.data.extend_from_slice(x.row(r));
                        samples.rows += 1;
                    }
                }
            }
            Ok(())
        };
        model.forward_layer(layer, h, Some(&mut sink))?;
    }
    Ok(captured)
}

fn quantize_group<M: LayeredModel, B: QuantBackend>(
    model: &mut M,
    backend: &B,
    recipe: &QuantizationSpec,
    scheme: WeightScheme,
    group: &InputGroup,
    input: Option<&Captured>,
    out: &mut BTreeMap<String, QuantizedLinear>,
) -> anyhow::Result<()> {
    let linears: Vec<&String> = group
        .linears
        .iter()
        .filter(|m| !is_ignored(m, &recipe.ignore))
        .collect();
    if linears.is_empty() {
        return Ok(());
    }
    let weights: Vec<Matrix> = linears
        .iter()
        .map(|m| model.weight(m))
        .collect::<anyhow::Result<_>>()?;
    let results: Vec<QuantizedLinear> = match (scheme, recipe.method, input) {
        (WeightScheme::Fp8 { scale_dtype }, _, _) => linears
            .iter()
            .zip(&weights)
            .map(|(m, w)| backend.quantize_fp8(m, w, scale_dtype))
            .collect::<Result<_, _>>()?,
        (WeightScheme::Int(int), Method::Gptq, Some(Captured::Hessian(hessian))) => {
            let order = if recipe.act_order {
                ActOrder::Static
            } else {
                ActOrder::None
            };
            linears
                .iter()
                .zip(&weights)
                .map(|(m, w)| backend.quantize_gptq(m, w, hessian, int, order, recipe.damp_percent))
                .collect::<Result<_, _>>()?
        }
        (WeightScheme::Int(int), Method::Awq, Some(Captured::Samples(x)))
            if group.fold.is_some() =>
        {
            awq_group(model, backend, int, group, &linears, &weights, x)?
        }
        (WeightScheme::Int(int), _, _) => linears
            .iter()
            .zip(&weights)
            .map(|(m, w)| backend.quantize_rtn(m, w, int))
            .collect::<Result<_, _>>()?,
    };
    for (module, q) in linears.into_iter().zip(results) {
        model.set_weight(module, &q.dequantized)?;
        out.insert(module.clone(), q);
    }
    Ok(())
}

/// AWQ for one group: search, fold `1/s` into the op before, keep `Q(W·s)`.
fn awq_group<M: LayeredModel, B: QuantBackend>(
    model: &mut M,
    backend: &B,
    scheme: IntScheme,
    group: &InputGroup,
    linears: &[&String],
    weights: &[Matrix],
    x: &Matrix,
) -> anyhow::Result<Vec<QuantizedLinear>> {
    let named: Vec<(&str, &Matrix)> = linears
        .iter()
        .map(|m| m.as_str())
        .zip(weights.iter())
        .collect();
    let result = backend.quantize_awq(&named, x, scheme, &AwqConfig::default())?;
    if let Some(target) = &group.fold
        && result.alpha.is_some()
    {
        model.fold_scales(target, &result.scales)?;
    }
    tracing::debug!(group = ?group.linears, alpha = ?result.alpha, error = result.search_error, "awq");
    Ok(result.layers)
}

#[cfg(test)]
mod tests {
    use super::is_ignored;

    #[test]
    fn ignore_matches_whole_suffixes_and_regexes() {
        let ignore = vec![
            "lm_head".to_string(),
            "re:.*layers\\.0\\..*down_proj$".to_string(),
        ];
        assert!(is_ignored("lm_head", &ignore));
        assert!(is_ignored("model.layers.0.mlp.down_proj", &ignore));
        assert!(!is_ignored("model.layers.1.mlp.down_proj", &ignore));
        assert!(!is_ignored("model.layers.0.mlp.my_lm_head", &ignore));
    }
}
