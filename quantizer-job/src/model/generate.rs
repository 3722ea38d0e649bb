//! Autoregressive decoding with a key/value cache: greedy (for the output
//! consistency check) and temperature/top-p sampling (for serving).

use candle_core::{D, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{LlamaModel, ModelError, Result};

/// Keys and values of every layer for the positions decoded so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Option<Tensor>, Option<Tensor>)>,
    len: usize,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Parameters of sampled decoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`: sample among the most likely tokens whose
    /// probabilities sum to at least this.
    pub top_p: f32,
}

impl LlamaModel {
    /// An empty cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![(None, None); self.layers.len()],
            len: 0,
        }
    }

    /// Feeds `tokens` (one sequence) after the cached positions and returns
    /// the logits `[V]` of the last one.
    pub fn forward_with_cache(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let input = self.token_tensor(&[tokens.to_vec()])?;
        let mut hidden = self.embed(&input)?;
        let offset = cache.len;
        for (i, slot) in cache.layers.iter_mut().enumerate() {
            hidden = self.layer_forward_at(i, &hidden, offset, Some(slot), None)?;
        }
        cache.len += tokens.len();
        let t = tokens.len();
        let last = hidden.narrow(1, t - 1, 1)?;
        Ok(self.final_logits(&last)?.flatten_all()?)
    }

    /// Greedy decoding with the KV cache: returns the generated tokens (not
    /// the prompt), stopping after `eos` (included) or `max_new_tokens`.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        self.generate_with(prompt, max_new_tokens, eos, argmax)
    }

    /// Greedy decoding that recomputes the whole sequence at every step; the
    /// reference the cached path is tested against.
    pub fn generate_greedy_uncached(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        let mut seq = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..max_new_tokens {
            let logits = self.forward(&self.token_tensor(&[seq.clone()])?)?;
            let last = logits.get(0)?.get(seq.len() - 1)?;
            let next = argmax(&last)?;
            out.push(next);
            seq.push(next);
            if Some(next) == eos {
                break;
            }
        }
        Ok(out)
    }

    /// Sampled decoding with temperature and top-p, drawing from `rng` so a
    /// seeded RNG gives reproducible output.
    pub fn generate_sampled<R: Rng>(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
        params: SamplingParams,
        rng: &mut R,
    ) -> Result<Vec<u32>> {
        self.generate_with(prompt, max_new_tokens, eos, |logits| {
            pick_sampled(logits, params, rng)
        })
    }

    /// Starts a decoding of `prompt` that yields at most `max_new_tokens`
    /// tokens and stops after `eos` (included). The server pulls tokens one
    /// at a time from it to stream them; [`Self::generate_greedy`] and
    /// [`Self::generate_sampled`] are built on it, so both follow one rule.
    pub fn start_decoding(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Decoding<'_>> {
        if prompt.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        Ok(Decoding {
            model: self,
            cache: self.new_cache(),
            prompt: prompt.to_vec(),
            last: None,
            produced: 0,
            max_new_tokens,
            eos,
            finished: max_new_tokens == 0,
        })
    }

    fn generate_with(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
        mut pick: impl FnMut(&Tensor) -> Result<u32>,
    ) -> Result<Vec<u32>> {
        let mut decoding = self.start_decoding(prompt, max_new_tokens, eos)?;
        let mut out = Vec::with_capacity(max_new_tokens);
        while let Some(next) = decoding.next_token(&mut pick)? {
            out.push(next);
        }
        Ok(out)
    }
}

/// One decoding in progress: the prompt is fed on the first
/// [`Decoding::next_token`] (the prefill), every later call feeds the token
/// picked before it (one decode step with the KV cache).
#[derive(Debug)]
pub struct Decoding<'m> {
    model: &'m LlamaModel,
    cache: KvCache,
    prompt: Vec<u32>,
    last: Option<u32>,
    produced: usize,
    max_new_tokens: usize,
    eos: Option<u32>,
    finished: bool,
}

impl Decoding<'_> {
    /// Runs one forward step and picks the next token from its logits with
    /// `pick`; `None` once `max_new_tokens` are out or `eos` was picked.
    pub fn next_token(
        &mut self,
        pick: &mut impl FnMut(&Tensor) -> Result<u32>,
    ) -> Result<Option<u32>> {
        if self.finished {
            return Ok(None);
        }
        let logits = match self.last {
            None => self
                .model
                .forward_with_cache(&self.prompt, &mut self.cache)?,
            Some(token) => self.model.forward_with_cache(&[token], &mut self.cache)?,
        };
        let next = pick(&logits)?;
        self.produced += 1;
        self.last = Some(next);
        self.finished = Some(next) == self.eos || self.produced >= self.max_new_tokens;
        Ok(Some(next))
    }

    /// Tokens produced so far.
    pub fn produced(&self) -> usize {
        self.produced
    }
}

/// Picks the next token as greedy decoding does (the largest logit).
pub fn pick_greedy(logits: &Tensor) -> Result<u32> {
    argmax(logits)
}

/// Picks the next token as sampled decoding does: greedy when
/// `temperature <= 0`, otherwise temperature and top-p sampling from `rng`.
pub fn pick_sampled<R: Rng>(logits: &Tensor, params: SamplingParams, rng: &mut R) -> Result<u32> {
    if params.temperature <= 0.0 {
        argmax(logits)
    } else {
        sample_top_p(logits, params, rng)
    }
}

/// Index of the largest logit (the first one on ties, like torch.argmax).
fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
}

fn sample_top_p<R: Rng>(logits: &Tensor, params: SamplingParams, rng: &mut R) -> Result<u32> {
    let values = logits.to_vec1::<f32>()?;
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / params.temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top_p = params.top_p.clamp(f32::MIN_POSITIVE, 1.0);
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f32>() * mass;
    for (id, p) in &probs {
        if draw < *p {
            return Ok(*id);
        }
        draw -= p;
    }
    Ok(probs.last().map_or(0, |p| p.0))
}
