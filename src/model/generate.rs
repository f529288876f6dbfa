//! Text generation: prefill the prompt, then sample one token at a time,
//! reusing the KV cache. Sampling runs on the host from the last logits row
//! with a seeded generator, so a seed fixes the output.

use std::time::{Duration, Instant};

use mlx_rs::{Array, Dtype};

use crate::rng::SeededRng;

use super::attention::Layout;
use super::linear::ProjectionAdapter;
use super::{Decoder, KvCache, ModelError};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// reaches `top_p` (1 keeps all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 100,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
    pub stopped_at_eos: bool,
}

impl GenerationStats {
    pub fn prompt_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    pub fn generation_tokens_per_sec(&self) -> f64 {
        self.generated_tokens as f64 / self.generation_time.as_secs_f64().max(1e-9)
    }
}

/// Generates up to `params.max_tokens` tokens after `prompt`, calling
/// `on_token` with each one as soon as it is chosen; it returns whether to go
/// on (a server stops at a stop string, or when its client is gone). Stops
/// at any `stop_ids` (which is not passed on). `use_cache = false` recomputes the whole
/// sequence every step: slow, and only there to check the cache.
pub fn generate(
    model: &Decoder,
    adapter: Option<&dyn ProjectionAdapter>,
    prompt: &[u32],
    params: &SamplingParams,
    stop_ids: &[u32],
    use_cache: bool,
    mut on_token: impl FnMut(u32) -> Result<bool, ModelError>,
) -> Result<(Vec<u32>, GenerationStats), ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::BadInput("the prompt has no tokens".into()));
    }
    if !(params.temperature.is_finite() && params.temperature >= 0.0) {
        return Err(ModelError::BadInput(format!("temperature must be >= 0, got {}", params.temperature)));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(ModelError::BadInput(format!("top_p must be in (0, 1], got {}", params.top_p)));
    }
    let vocab = model.args().vocab_size as usize;
    let mut rng = SeededRng::new(params.seed);
    let mut caches: Vec<KvCache> = model.new_cache();
    let mut sequence: Vec<u32> = prompt.to_vec();
    let mut generated = Vec::new();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };

    let started = Instant::now();
    if use_cache && params.temperature == 0.0 {
        greedy_pipelined(model, adapter, prompt, params.max_tokens as usize, stop_ids, &mut caches, &mut generated, &mut stats, started, &mut on_token)?;
    } else {
        let mut input: Vec<u32> = prompt.to_vec();
        while generated.len() < params.max_tokens as usize {
            let window = if use_cache { &input[..] } else { &sequence[..] };
            let tokens = Array::from_slice(&window.iter().map(|&t| t as i32).collect::<Vec<_>>(), &[1, window.len() as i32]);
            let logits = model.forward_adapted(&tokens, use_cache.then_some(&mut caches[..]), Layout::ROWS, adapter)?;
            check_vocab(&logits, vocab)?;
            let last = logits
                .take_axis(Array::from_int(window.len() as i32 - 1), 1)?
                .as_dtype(Dtype::Float32)?;
            last.eval()?;
            let token = sample(last.as_slice(), params, &mut rng);
            if !take_token(token, stop_ids, &mut generated, &mut stats, started, &mut on_token)? {
                break;
            }
            sequence.push(token);
            input = vec![token];
        }
    }
    stats.generated_tokens = generated.len();
    stats.generation_time = started.elapsed().saturating_sub(stats.prompt_time);
    Ok((generated, stats))
}

/// Greedy decoding with the cache, as mlx-lm decodes: the next token is the
/// argmax on the device, fed to the next forward pass without a trip to the
/// host, and token n + 1 is queued (`async_eval`) before token n is read,
/// so the host builds one step while the device computes the other.
#[allow(clippy::too_many_arguments)]
fn greedy_pipelined(
    model: &Decoder,
    adapter: Option<&dyn ProjectionAdapter>,
    prompt: &[u32],
    max_tokens: usize,
    stop_ids: &[u32],
    caches: &mut [KvCache],
    generated: &mut Vec<u32>,
    stats: &mut GenerationStats,
    started: Instant,
    on_token: &mut impl FnMut(u32) -> Result<bool, ModelError>,
) -> Result<(), ModelError> {
    let vocab = model.args().vocab_size as usize;
    // The argmax of the last position's logits, as a [1, 1] token array.
    let next_after = |tokens: &Array, caches: &mut [KvCache]| -> Result<Array, ModelError> {
        let logits = model.forward_adapted(tokens, Some(caches), Layout::ROWS, adapter)?;
        check_vocab(&logits, vocab)?;
        let positions = tokens.shape()[1];
        let last = logits.take_axis(Array::from_int(positions - 1), 1)?;
        let token = mlx_rs::ops::indexing::argmax_axis(&last, -1, true)?.as_dtype(Dtype::Int32)?;
        mlx_rs::transforms::async_eval([&token])?;
        Ok(token)
    };
    if max_tokens == 0 {
        return Ok(());
    }
    let prompt = Array::from_slice(&prompt.iter().map(|&t| t as i32).collect::<Vec<_>>(), &[1, prompt.len() as i32]);
    let mut next = next_after(&prompt, caches)?;
    loop {
        // Queue the token after `next` unless `next` is the last one asked for.
        let following = if generated.len() + 1 < max_tokens { Some(next_after(&next, caches)?) } else { None };
        let go_on = read_token(&next).and_then(|token| take_token(token, stop_ids, generated, stats, started, on_token));
        match (go_on, following) {
            (Ok(true), Some(following)) => next = following,
            (go_on, following) => {
                // Nothing may still compute once this returns.
                if following.is_some() {
                    crate::mlx_env::wait_for_queued_work().map_err(ModelError::BadInput)?;
                }
                return go_on.map(|_| ());
            }
        }
    }
}

/// The token a device argmax chose (waiting for it).
fn read_token(next: &Array) -> Result<u32, ModelError> {
    let token = next.try_item_cast::<i32>()?;
    u32::try_from(token).map_err(|_| ModelError::BadInput(format!("the argmax gave token {token}")))
}

/// Records the chosen `token` and passes it on; false once generation ends
/// (an end token, which is not passed on, or `on_token` said stop).
fn take_token(
    token: u32,
    stop_ids: &[u32],
    generated: &mut Vec<u32>,
    stats: &mut GenerationStats,
    started: Instant,
    on_token: &mut impl FnMut(u32) -> Result<bool, ModelError>,
) -> Result<bool, ModelError> {
    if generated.is_empty() {
        stats.prompt_time = started.elapsed();
    }
    if stop_ids.contains(&token) {
        stats.stopped_at_eos = true;
        return Ok(false);
    }
    generated.push(token);
    on_token(token)
}

/// Logits must have one entry a vocabulary token.
fn check_vocab(logits: &Array, vocab: usize) -> Result<(), ModelError> {
    match logits.shape().last() {
        Some(&entries) if entries as usize == vocab => Ok(()),
        entries => Err(ModelError::BadInput(format!("logits have {entries:?} entries, expected {vocab}"))),
    }
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut SeededRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
            .0 as u32
    };
    if params.temperature == 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax();
    }
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, f64::from((v - max) / params.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    if params.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0;
        let cut = probs
            .iter()
            .position(|p| {
                kept += p.1 / total;
                kept >= f64::from(params.top_p)
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(cut);
    }
    let kept_total: f64 = probs.iter().map(|p| p.1).sum();
    let mut target = rng.next_f64() * kept_total;
    for &(token, p) in &probs {
        target -= p;
        if target <= 0.0 {
            return token;
        }
    }
    probs.last().map_or_else(argmax, |p| p.0)
}

/// Median prompt and generation tokens/s of greedy decoding over `repeats`
/// runs after a warm-up: a prompt of exactly `prompt_tokens` (a sentence's
/// tokens, cycled) and exactly `max_tokens` generated (never stopping early).
pub fn measure_speed(decoder: &Decoder, tokenizer: &super::Tokenizer, prompt_tokens: u32, max_tokens: u32, repeats: u32) -> Result<(f64, f64), ModelError> {
    let text = tokenizer.encode("The quick brown fox jumps over the lazy dog while the sun sets over the hills. ", false)?;
    let prompt: Vec<u32> = text.iter().copied().cycle().take(prompt_tokens as usize).collect();
    let params = SamplingParams {
        max_tokens,
        ..Default::default()
    };
    let warmup = SamplingParams { max_tokens: 2, ..params.clone() };
    generate(decoder, None, &prompt, &warmup, &[], true, |_| Ok(true))?;
    let mut runs: Vec<GenerationStats> = Vec::new();
    for _ in 0..repeats.max(1) {
        runs.push(generate(decoder, None, &prompt, &params, &[], true, |_| Ok(true))?.1);
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Ok((
        median(runs.iter().map(GenerationStats::prompt_tokens_per_sec).collect()),
        median(runs.iter().map(GenerationStats::generation_tokens_per_sec).collect()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let params = SamplingParams::default();
        assert_eq!(sample(&[0.1, 3.0, -1.0, 2.9], &params, &mut SeededRng::new(0)), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut rng = SeededRng::new(7);
        // Token 2 holds far more than half the mass: it is the only survivor.
        for _ in 0..100 {
            assert_eq!(sample(&[0.0, 0.0, 10.0, 0.0], &params, &mut rng), 2);
        }
    }

    #[test]
    fn temperature_sampling_is_seeded() {
        let params = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut rng = SeededRng::new(seed);
            (0..32).map(|_| sample(&[0.0, 0.5, 1.0, 0.2], &params, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
